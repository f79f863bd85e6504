//! The HTTP client the CLI (and tests) use to talk to an agent.

use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::types::{
    CheckpointInfo, DeleteCheckpointResult, ErrorBody, ErrorCode, NodeInfo, PeerInfo,
    RestoreRequest, StopRequest, VerifyResult, VmInfo, VmSpec,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {url} (is `dwcp agent` running? set --api or DWCP_API)")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The agent answered with an error body.
    #[error("{message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        causes: Vec<String>,
    },
    #[error("unexpected answer from the agent at {url} (HTTP {status}): {detail}")]
    Unexpected {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{0:?} is not an agent URL (expected e.g. http://127.0.0.1:7480)")]
    BadUrl(String),
}

/// A client for one agent's REST API.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// `base` is like `http://127.0.0.1:7480`.
    pub fn new(base: &str) -> Result<Client, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base).map_err(|_| ClientError::BadUrl(base.clone()))?;
        if parsed.scheme() != "http" || parsed.host().is_none() {
            return Err(ClientError::BadUrl(base));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| ClientError::Connect {
                url: base.clone(),
                source,
            })?;
        Ok(Client { base, http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let resp = req.send().await.map_err(|source| ClientError::Connect {
            url: url.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(e) => Err(ClientError::Api {
                status,
                code: e.code,
                message: e.message,
                causes: e.causes,
            }),
            Err(_) => Err(ClientError::Unexpected {
                url,
                status,
                detail: text.chars().take(200).collect(),
            }),
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<T, ClientError> {
        let resp = self.send(req, path).await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Connect {
            url: self.url(path),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
            url: self.url(path),
            status,
            detail: e.to_string(),
        })
    }

    pub async fn node(&self) -> Result<NodeInfo, ClientError> {
        self.json(self.http.get(self.url("/v1/node")), "/v1/node")
            .await
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.json(self.http.get(self.url("/v1/vms")), "/v1/vms")
            .await
    }

    pub async fn show(&self, name: &str) -> Result<VmInfo, ClientError> {
        let p = format!("/v1/vms/{name}");
        self.json(self.http.get(self.url(&p)), &p).await
    }

    pub async fn create(&self, spec: &VmSpec, start: bool) -> Result<VmInfo, ClientError> {
        let p = format!("/v1/vms?start={start}");
        self.json(self.http.post(self.url(&p)).json(spec), &p).await
    }

    async fn action(
        &self,
        name: &str,
        action: &str,
        body: Option<&StopRequest>,
    ) -> Result<VmInfo, ClientError> {
        let p = format!("/v1/vms/{name}/{action}");
        let mut req = self.http.post(self.url(&p));
        if let Some(b) = body {
            req = req.json(b);
        }
        self.json(req, &p).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>, ClientError> {
        self.json(self.http.get(self.url("/v1/peers")), "/v1/peers")
            .await
    }

    /// Takes a checkpoint; with `replicate_to`, also sends it to that peer.
    pub async fn checkpoint(
        &self,
        name: &str,
        replicate_to: Option<&str>,
    ) -> Result<CheckpointInfo, ClientError> {
        let p = match replicate_to {
            Some(peer) => format!("/v1/vms/{name}/checkpoint?replicate_to={peer}"),
            None => format!("/v1/vms/{name}/checkpoint"),
        };
        self.json(self.http.post(self.url(&p)), &p).await
    }

    /// Moves VM `name` to peer `to`, live; the answer is the report.
    pub async fn migrate(
        &self,
        name: &str,
        to: &str,
        deadline_secs: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let p = format!("/v1/vms/{name}/migrate");
        let body = crate::types::MigrateRequest {
            to: to.into(),
            deadline_secs,
        };
        self.json(self.http.post(self.url(&p)).json(&body), &p)
            .await
    }

    pub async fn migration(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        let p = format!("/v1/vms/{name}/migration");
        self.json(self.http.get(self.url(&p)), &p).await
    }

    pub async fn cancel_migration(&self, name: &str) -> Result<(), ClientError> {
        let p = format!("/v1/vms/{name}/migration/cancel");
        self.send(self.http.post(self.url(&p)), &p).await?;
        Ok(())
    }

    pub async fn replicate(&self, id: &str, to: &str) -> Result<CheckpointInfo, ClientError> {
        let p = format!("/v1/checkpoints/{id}/replicate");
        let body = crate::types::ReplicateRequest { to: to.into() };
        self.json(self.http.post(self.url(&p)).json(&body), &p)
            .await
    }

    pub async fn checkpoints(&self) -> Result<Vec<CheckpointInfo>, ClientError> {
        self.json(
            self.http.get(self.url("/v1/checkpoints")),
            "/v1/checkpoints",
        )
        .await
    }

    pub async fn show_checkpoint(&self, id: &str) -> Result<CheckpointInfo, ClientError> {
        let p = format!("/v1/checkpoints/{id}");
        self.json(self.http.get(self.url(&p)), &p).await
    }

    pub async fn delete_checkpoint(&self, id: &str) -> Result<DeleteCheckpointResult, ClientError> {
        let p = format!("/v1/checkpoints/{id}");
        self.json(self.http.delete(self.url(&p)), &p).await
    }

    /// Verifies one checkpoint, or the whole store when `id` is `None`.
    pub async fn verify_checkpoints(&self, id: Option<&str>) -> Result<VerifyResult, ClientError> {
        let p = match id {
            Some(id) => format!("/v1/checkpoints/verify?id={id}"),
            None => "/v1/checkpoints/verify".to_string(),
        };
        self.json(self.http.post(self.url(&p)), &p).await
    }

    pub async fn restore(&self, id: &str, name: &str, paused: bool) -> Result<VmInfo, ClientError> {
        let p = format!("/v1/checkpoints/{id}/restore");
        let body = RestoreRequest {
            name: name.into(),
            paused,
        };
        self.json(self.http.post(self.url(&p)).json(&body), &p)
            .await
    }

    pub async fn start(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.action(name, "start", None).await
    }

    pub async fn stop(&self, name: &str, req: &StopRequest) -> Result<VmInfo, ClientError> {
        self.action(name, "stop", Some(req)).await
    }

    pub async fn pause(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.action(name, "pause", None).await
    }

    pub async fn resume(&self, name: &str) -> Result<VmInfo, ClientError> {
        self.action(name, "resume", None).await
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let p = format!("/v1/vms/{name}?force={force}");
        self.send(self.http.delete(self.url(&p)), &p)
            .await
            .map(drop)
    }

    /// The console output from byte `offset` on. With `follow`, `on_chunk`
    /// gets new output as it comes until the VM stops running.
    pub async fn console(
        &self,
        name: &str,
        offset: u64,
        follow: bool,
        mut on_chunk: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let p = format!("/v1/vms/{name}/console?offset={offset}&follow={follow}");
        let resp = self.send(self.http.get(self.url(&p)), &p).await?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| ClientError::Connect {
                url: self.url(&p),
                source,
            })?;
            on_chunk(&chunk);
        }
        Ok(())
    }

    /// The agent's OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.json(self.http.get(self.url("/openapi.json")), "/openapi.json")
            .await
    }
}
