//! The REST API (axum) and its OpenAPI document (utoipa).
//!
//! Every error is a JSON [`ErrorBody`] with a stable code, including bad JSON,
//! oversized bodies, bad query strings, unknown routes and wrong methods.

use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dwcp_api::{
    CheckpointHealth, CheckpointInfo, DeleteCheckpointResult, ErrorBody, ErrorCode, MigrateRequest,
    NodeInfo, PeerInfo, ReplicaInfo, ReplicateRequest, RestoreRequest, StopRequest, VerifyResult,
    VmInfo, VmSpec, VmState,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::{IntoParams, OpenApi};

use crate::manager::{AgentError, Manager};

/// Request bodies are small specs; anything larger is refused.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The most console output one non-following request returns.
const MAX_CONSOLE_CHUNK: u64 = 8 << 20;

pub struct ApiError {
    code: ErrorCode,
    message: String,
    causes: Vec<String>,
}

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            causes: Vec::new(),
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        let mut causes = Vec::new();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            causes.push(c.to_string());
            src = c.source();
        }
        ApiError {
            code: e.code(),
            message: e.to_string(),
            causes,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            code: self.code,
            message: self.message,
            causes: self.causes,
        };
        (status, Json(body)).into_response()
    }
}

/// A JSON body; an empty body means `T::default()` where `T` has one.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorCode::BodyTooLarge,
                    format!("request body is over the limit of {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("cannot read the request body: {rej}"),
                )
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJson(T::default()));
        }
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidJson,
                format!("request body is not valid: {e}"),
            )
        })
    }
}

/// A JSON body that must be present.
pub struct Required<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Required<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let ApiJson(v) = ApiJson::<Option<T>>::from_request(req, state).await?;
        v.map(Required).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidJson,
                "request body is empty; a JSON object is needed",
            )
        })
    }
}

/// A query string with errors as [`ApiError`].
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| {
                ApiError::new(
                    ErrorCode::InvalidSpec,
                    format!("bad query string: {}", e.body_text()),
                )
            })
    }
}

type Mgr = State<Arc<Manager>>;

#[derive(Deserialize, IntoParams)]
pub struct CreateQuery {
    /// Boot the VM right away (default true). If booting fails, the VM is
    /// not kept.
    #[serde(default = "yes")]
    start: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, IntoParams)]
pub struct DeleteQuery {
    /// Delete a running VM too, ending its QEMU at once.
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize, IntoParams)]
pub struct ConsoleQuery {
    /// Byte offset in the console log to start from.
    #[serde(default)]
    offset: u64,
    /// Keep the response open and stream new output until the VM stops.
    #[serde(default)]
    follow: bool,
}

#[utoipa::path(get, path = "/v1/node", responses((status = 200, body = NodeInfo)))]
async fn node(State(m): Mgr) -> Json<NodeInfo> {
    Json(m.node_info())
}

/// Other nodes this one knows, with their last measured RTT and goodput.
#[utoipa::path(get, path = "/v1/peers", responses((status = 200, body = Vec<PeerInfo>)))]
async fn peers(State(m): Mgr) -> Json<Vec<PeerInfo>> {
    Json(m.peers())
}

#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = Vec<VmInfo>)))]
async fn list(State(m): Mgr) -> Json<Vec<VmInfo>> {
    Json(m.list())
}

#[utoipa::path(post, path = "/v1/vms", params(CreateQuery), request_body = VmSpec,
    responses((status = 201, body = VmInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn create(
    State(m): Mgr,
    ApiQuery(q): ApiQuery<CreateQuery>,
    Required(spec): Required<VmSpec>,
) -> Result<(StatusCode, Json<VmInfo>), ApiError> {
    Ok((StatusCode::CREATED, Json(m.create(spec, q.start).await?)))
}

#[utoipa::path(get, path = "/v1/vms/{name}", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody)))]
async fn show(State(m): Mgr, Path(name): Path<String>) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(m.show(&name)?))
}

#[utoipa::path(delete, path = "/v1/vms/{name}", params(("name" = String, Path), DeleteQuery),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete(
    State(m): Mgr,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    m.delete(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/vms/{name}/start", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn start(State(m): Mgr, Path(name): Path<String>) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(m.start(&name).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/stop", params(("name" = String, Path)), request_body = StopRequest,
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn stop(
    State(m): Mgr,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<StopRequest>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(m.stop(&name, &req).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/pause", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn pause(State(m): Mgr, Path(name): Path<String>) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(m.pause(&name).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/resume", params(("name" = String, Path)),
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn resume(State(m): Mgr, Path(name): Path<String>) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(m.resume(&name).await?))
}

#[derive(Deserialize, IntoParams)]
pub struct VerifyQuery {
    /// Verify only this checkpoint (default: every object in the store).
    #[serde(default)]
    id: Option<String>,
}

/// Takes a live checkpoint; the VM keeps running (its pause is reported).
#[utoipa::path(post, path = "/v1/vms/{name}/checkpoint", params(("name" = String, Path), CheckpointQuery),
    responses((status = 200, body = CheckpointInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn checkpoint(
    State(m): Mgr,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<CheckpointQuery>,
) -> Result<Json<CheckpointInfo>, ApiError> {
    let mut info = m.checkpoint(&name).await?;
    if let Some(peer) = q.replicate_to {
        let r = m
            .replicate(&info.id, &peer)
            .await
            .map_err(|e| AgentError::ReplicationFailed {
                id: info.id.clone(),
                peer: peer.clone(),
                source: Box::new(e),
            })?;
        info.replicated = r.replicated;
    }
    Ok(Json(info))
}

#[derive(Deserialize, IntoParams)]
pub struct CheckpointQuery {
    /// Also send the checkpoint to this peer (only what it lacks).
    #[serde(default)]
    replicate_to: Option<String>,
}

/// Moves a running VM to a peer, live.
#[utoipa::path(post, path = "/v1/vms/{name}/migrate", params(("name" = String, Path)), request_body = MigrateRequest,
    responses((status = 200, body = crate::migrate::MigrationReport), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn migrate(
    State(m): Mgr,
    Path(name): Path<String>,
    Required(req): Required<MigrateRequest>,
) -> Result<Json<crate::migrate::MigrationReport>, ApiError> {
    let deadline = req.deadline_secs.map(Duration::from_secs);
    Ok(Json(m.migrate(&name, &req.to, deadline).await?))
}

/// The progress of a VM's migration.
#[utoipa::path(get, path = "/v1/vms/{name}/migration", params(("name" = String, Path)),
    responses((status = 200, body = crate::migrate::MigrationProgress), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn migration(
    State(m): Mgr,
    Path(name): Path<String>,
) -> Result<Json<crate::migrate::MigrationProgress>, ApiError> {
    Ok(Json(m.migration(&name)?))
}

/// Cancels a VM's migration before its switch-over; the VM runs on here.
#[utoipa::path(post, path = "/v1/vms/{name}/migration/cancel", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn cancel_migration(State(m): Mgr, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    m.cancel_migration(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a checkpoint to a peer: only the pages and parts it lacks.
#[utoipa::path(post, path = "/v1/checkpoints/{id}/replicate", params(("id" = String, Path)), request_body = ReplicateRequest,
    responses((status = 200, body = CheckpointInfo), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody)))]
async fn replicate(
    State(m): Mgr,
    Path(id): Path<String>,
    Required(req): Required<ReplicateRequest>,
) -> Result<Json<CheckpointInfo>, ApiError> {
    Ok(Json(m.replicate(&id, &req.to).await?))
}

#[utoipa::path(get, path = "/v1/checkpoints", responses((status = 200, body = Vec<CheckpointInfo>), (status = 500, body = ErrorBody)))]
async fn checkpoints(State(m): Mgr) -> Result<Json<Vec<CheckpointInfo>>, ApiError> {
    Ok(Json(m.checkpoints().await?))
}

#[utoipa::path(get, path = "/v1/checkpoints/{id}", params(("id" = String, Path)),
    responses((status = 200, body = CheckpointInfo), (status = 404, body = ErrorBody)))]
async fn show_checkpoint(
    State(m): Mgr,
    Path(id): Path<String>,
) -> Result<Json<CheckpointInfo>, ApiError> {
    Ok(Json(m.show_checkpoint(&id).await?))
}

/// Deletes a checkpoint; later checkpoints of the VM stay whole.
#[utoipa::path(delete, path = "/v1/checkpoints/{id}", params(("id" = String, Path)),
    responses((status = 200, body = DeleteCheckpointResult), (status = 404, body = ErrorBody)))]
async fn delete_checkpoint(
    State(m): Mgr,
    Path(id): Path<String>,
) -> Result<Json<DeleteCheckpointResult>, ApiError> {
    Ok(Json(m.delete_checkpoint(&id).await?))
}

/// Starts a new VM from a checkpoint.
#[utoipa::path(post, path = "/v1/checkpoints/{id}/restore", params(("id" = String, Path)), request_body = RestoreRequest,
    responses((status = 200, body = VmInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn restore(
    State(m): Mgr,
    Path(id): Path<String>,
    Required(req): Required<RestoreRequest>,
) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(m.restore(&id, &req.name, req.paused).await?))
}

/// Re-hashes stored objects and checks that checkpoints have all they need.
#[utoipa::path(post, path = "/v1/checkpoints/verify", params(VerifyQuery),
    responses((status = 200, body = VerifyResult), (status = 404, body = ErrorBody)))]
async fn verify_checkpoints(
    State(m): Mgr,
    ApiQuery(q): ApiQuery<VerifyQuery>,
) -> Result<Json<VerifyResult>, ApiError> {
    Ok(Json(m.verify_checkpoints(q.id).await?))
}

/// The serial console output; with `follow`, a stream that ends when the VM
/// no longer runs.
#[utoipa::path(get, path = "/v1/vms/{name}/console", params(("name" = String, Path), ConsoleQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
async fn console(
    State(m): Mgr,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
) -> Result<Response, ApiError> {
    let (path, mut state) = m.console(&name)?;
    let text = |body: Body| {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body)
            .unwrap_or_default()
    };
    if !q.follow {
        let mut out = Vec::new();
        if let Ok(mut f) = tokio::fs::File::open(&path).await {
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            if q.offset < len {
                let _ = f.seek(SeekFrom::Start(q.offset)).await;
                let _ = f.take(MAX_CONSOLE_CHUNK).read_to_end(&mut out).await;
            }
        }
        return Ok(text(Body::from(out)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut offset = q.offset;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut progressed = false;
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                if len < offset {
                    offset = 0; // a new boot truncated the log
                }
                if len > offset && f.seek(SeekFrom::Start(offset)).await.is_ok() {
                    if let Ok(n) = f.read(&mut buf).await {
                        if n > 0 {
                            offset += n as u64;
                            progressed = true;
                            if tx
                                .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            }
            if progressed {
                continue;
            }
            let running = matches!(
                *state.borrow_and_update(),
                VmState::Starting | VmState::Running | VmState::Paused
            );
            if !running || tx.is_closed() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), state.changed()).await;
        }
    });
    Ok(text(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn no_route() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint (see /openapi.json)")
}

async fn wrong_method() -> Response {
    let mut r = ApiError::new(
        ErrorCode::NotFound,
        "this endpoint does not take that method (see /openapi.json)",
    )
    .into_response();
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dwcp agent API",
        description = "Manage the virtual machines of one dwcp node."
    ),
    paths(
        node,
        peers,
        list,
        create,
        show,
        delete,
        start,
        stop,
        pause,
        resume,
        console,
        checkpoint,
        checkpoints,
        show_checkpoint,
        delete_checkpoint,
        restore,
        replicate,
        migrate,
        migration,
        cancel_migration,
        verify_checkpoints
    ),
    components(schemas(
        PeerInfo,
        VmSpec,
        VmInfo,
        VmState,
        StopRequest,
        NodeInfo,
        ErrorBody,
        ErrorCode,
        CheckpointInfo,
        RestoreRequest,
        VerifyResult,
        CheckpointHealth,
        DeleteCheckpointResult,
        ReplicaInfo,
        MigrateRequest,
        ReplicateRequest,
        crate::migrate::MigrationReport,
        crate::migrate::MigrationProgress
    ))
)]
pub struct ApiDoc;

/// The agent's OpenAPI document, pretty-printed (as committed in `api/openapi.json`).
pub fn openapi_document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/node", get(node))
        .route("/v1/peers", get(peers))
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(show).delete(delete))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/pause", post(pause))
        .route("/v1/vms/{name}/resume", post(resume))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/vms/{name}/checkpoint", post(checkpoint))
        .route("/v1/checkpoints", get(checkpoints))
        .route("/v1/checkpoints/verify", post(verify_checkpoints))
        .route(
            "/v1/checkpoints/{id}",
            get(show_checkpoint).delete(delete_checkpoint),
        )
        .route("/v1/checkpoints/{id}/restore", post(restore))
        .route("/v1/checkpoints/{id}/replicate", post(replicate))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/migration", get(migration))
        .route("/v1/vms/{name}/migration/cancel", post(cancel_migration))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(m)
}
