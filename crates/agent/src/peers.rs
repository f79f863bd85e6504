//! Other nodes: this agent's AMST listener, and a session to each
//! configured peer whose link is measured now and then.
//!
//! Every `probe_interval` the agent sends each peer a probe transfer of
//! `probe_bytes` over its AMST session (mutual TLS; the peer's certificate
//! must carry the peer's configured name) and records the session's RTT
//! (the kernel's TCP estimate), the probe's goodput and the number of
//! connections. A failed probe marks the peer `down` with the reason; the
//! next probe connects afresh. Incoming probe transfers are read and
//! dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dwcp_api::PeerInfo;
use dwcp_transport::{Class, Listener, NodeIdentity, Session, TransportConfig};
use tokio::io::AsyncReadExt;

use crate::config::AgentConfig;
use crate::manager::lock;

/// Name of the transfers that measure a link.
const PROBE: &str = "probe";

pub struct Peers {
    identity: Arc<NodeIdentity>,
    listen: SocketAddr,
    state: Mutex<BTreeMap<String, PeerInfo>>,
}

impl Peers {
    /// Binds the AMST listener and starts probing the configured peers.
    /// `None` when the node has no identity (it then talks to no one).
    pub async fn start(cfg: &AgentConfig) -> Result<Option<Arc<Peers>>, crate::StartError> {
        let Some(dir) = &cfg.identity else {
            return Ok(None);
        };
        let identity = NodeIdentity::load(dir).map_err(crate::StartError::Identity)?;
        if let Some(n) = &cfg.node_name {
            if *n != identity.name() {
                return Err(crate::StartError::Config(crate::ConfigError::Invalid(
                    format!(
                        "node_name {n:?} but the certificate in {} is for {:?}",
                        dir.display(),
                        identity.name()
                    ),
                )));
            }
        }
        let listener = Listener::bind(cfg.amst_listen, &identity, TransportConfig::default())
            .await
            .map_err(crate::StartError::Transport)?;
        let listen = listener.local_addr();
        tracing::info!(node = %identity.name(), %listen, peers = cfg.peers.len(), "AMST listening");
        let peers = Arc::new(Peers {
            identity,
            listen,
            state: Mutex::new(
                cfg.peers
                    .iter()
                    .map(|(name, addr)| {
                        let info = PeerInfo {
                            name: name.clone(),
                            addr: addr.to_string(),
                            state: "unknown".into(),
                            rtt_ms: None,
                            goodput_bps: None,
                            streams: None,
                            probed_unix_ms: None,
                            last_error: None,
                        };
                        (name.clone(), info)
                    })
                    .collect(),
            ),
        });
        tokio::spawn(serve(listener));
        for (name, addr) in &cfg.peers {
            tokio::spawn(peers.clone().probe_loop(
                name.clone(),
                *addr,
                cfg.probe_interval,
                cfg.probe_bytes,
            ));
        }
        Ok(Some(peers))
    }

    pub fn node_name(&self) -> String {
        self.identity.name()
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn list(&self) -> Vec<PeerInfo> {
        lock(&self.state).values().cloned().collect()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut PeerInfo)) {
        if let Some(p) = lock(&self.state).get_mut(name) {
            f(p);
            p.probed_unix_ms = Some(now_ms());
        }
    }

    async fn probe_loop(
        self: Arc<Self>,
        name: String,
        addr: SocketAddr,
        every: Duration,
        bytes: u64,
    ) {
        let mut session: Option<Session> = None;
        loop {
            let s = match session.take() {
                Some(s) => Ok(s),
                None => {
                    let connect =
                        Session::connect(addr, &self.identity, Some(&name), probe_config());
                    match tokio::time::timeout(Duration::from_secs(15), connect).await {
                        Ok(r) => r.map_err(|e| crate::format_chain(&e)),
                        Err(_) => Err(format!("no answer from {addr} within 15 s")),
                    }
                }
            };
            match s {
                Ok(s) => {
                    let zeros = tokio::io::repeat(0).take(bytes);
                    let send = s.send(PROBE, Class::Background, bytes, zeros, |_| {});
                    match tokio::time::timeout(every.max(Duration::from_secs(30)), send).await {
                        Ok(Ok(report)) => {
                            let rtt = s.rtt().map(|r| r.as_secs_f64() * 1000.0);
                            let streams = s.streams();
                            self.update(&name, |p| {
                                p.state = "up".into();
                                p.rtt_ms = rtt;
                                p.goodput_bps = Some(report.goodput_bps);
                                p.streams = Some(streams);
                                p.last_error = None;
                            });
                            session = Some(s);
                        }
                        Ok(Err(e)) => self.down(&name, crate::format_chain(&e)),
                        Err(_) => self.down(&name, "the probe transfer timed out".into()),
                    }
                }
                Err(why) => self.down(&name, why),
            }
            tokio::time::sleep(every).await;
        }
    }

    fn down(&self, name: &str, why: String) {
        tracing::info!(peer = %name, "peer unreachable: {why}");
        self.update(name, |p| {
            p.state = "down".into();
            p.last_error = Some(why);
        });
    }
}

/// A probe is short: few streams, a small window.
fn probe_config() -> TransportConfig {
    TransportConfig {
        streams: dwcp_transport::Streams::Fixed(2),
        resume_timeout: Duration::from_secs(5),
        ..TransportConfig::default()
    }
}

/// Reads incoming transfers. Probes are dropped; nothing else is expected
/// yet, and anything else is dropped with a note.
async fn serve(listener: Listener) {
    while let Some(mut inc) = listener.accept().await {
        if inc.name != PROBE {
            tracing::warn!(peer = %inc.peer, transfer = %inc.name, "dropping an unexpected transfer");
        }
        tokio::spawn(async move { while inc.chunks.recv().await.is_some() {} });
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
