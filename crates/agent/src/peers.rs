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
//!
//! Requests between agents ([`Peers::request`]) are AMST transfers too: a
//! request `rpc/req/KIND/ID` goes out on this node's session to the peer;
//! the peer answers with a transfer `rpc/resp/ID` on its session to this
//! node, so peers must know each other both ways. An answer starts with
//! one byte: 0 and the body, or 1 and an error message. Small requests
//! and answers travel as control, ahead of bulk data.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dwcp_api::PeerInfo;
use dwcp_transport::{Chunk, Class, Incoming, Listener, NodeIdentity, Session, TransportConfig};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use crate::config::AgentConfig;
use crate::manager::{lock, now_unix_ms};

/// Name of the transfers that measure a link.
const PROBE: &str = "probe";

/// Where the answer to a request goes: its body, or the peer's refusal.
type AnswerTx = oneshot::Sender<Result<Vec<u8>, String>>;

/// The class a request or answer of `len` bytes travels in: small ones
/// (a migration's prepare, progress reports and commit, answers) as
/// control, ahead of the data they steer (as replication, behind a
/// migration's stream, the commit took 200 ms on a 50 ms link and the
/// destination's reports lagged as long); bulk (replicas' pages, long
/// page lists) as replication.
fn class_of(len: usize) -> Class {
    if len <= 64 << 10 {
        Class::Control
    } else {
        Class::Replication
    }
}

/// Largest request or answer body accepted.
const MAX_RPC_BYTES: usize = 4 << 30;

pub struct Peers {
    identity: Arc<NodeIdentity>,
    listen: SocketAddr,
    addrs: BTreeMap<String, SocketAddr>,
    state: Mutex<BTreeMap<String, PeerInfo>>,
    /// Requests of this node waiting for their answers, by answer name.
    waiters: Mutex<std::collections::HashMap<String, AnswerTx>>,
    /// Sessions for requests and answers, by peer name.
    sessions: tokio::sync::Mutex<BTreeMap<String, Session>>,
    /// Sessions for bulk data (migrations, replicas), by peer name.
    bulk: tokio::sync::Mutex<BTreeMap<String, Session>>,
    /// Who answers requests from other nodes.
    handler: std::sync::OnceLock<std::sync::Weak<crate::Manager>>,
    /// Transfers someone here waits for, by name (a migration's stream).
    expected: Mutex<std::collections::HashMap<String, oneshot::Sender<Incoming>>>,
}

/// Why a request to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no peer named {0:?} (see `dwcp node list`)")]
    Unknown(String),
    #[error("cannot reach peer {peer}")]
    Transport {
        peer: String,
        #[source]
        source: dwcp_transport::TransportError,
    },
    #[error("peer {peer} did not answer within {secs} s")]
    Timeout { peer: String, secs: u64 },
    #[error("peer {peer} refused: {message}")]
    Refused { peer: String, message: String },
    #[error("this node has no identity: start the agent with --identity to talk to other nodes")]
    NoIdentity,
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
            addrs: cfg.peers.clone(),
            waiters: Mutex::default(),
            sessions: tokio::sync::Mutex::default(),
            bulk: tokio::sync::Mutex::default(),
            handler: std::sync::OnceLock::new(),
            expected: Mutex::default(),
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
        tokio::spawn(peers.clone().serve(listener));
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

    /// Lets the manager answer requests from other nodes.
    pub fn attach(&self, manager: std::sync::Weak<crate::Manager>) {
        let _ = self.handler.set(manager);
    }

    /// A session to `peer` for requests and answers, reused while it lives.
    async fn session(&self, peer: &str) -> Result<Session, PeerError> {
        self.kept_session(&self.sessions, peer, TransportConfig::default())
            .await
    }

    /// The session to `peer` kept in `kept`, if it is open and has a
    /// connection up; else a new one opened with `cfg`, kept there.
    async fn kept_session(
        &self,
        kept: &tokio::sync::Mutex<BTreeMap<String, Session>>,
        peer: &str,
        cfg: TransportConfig,
    ) -> Result<Session, PeerError> {
        let addr = *self
            .addrs
            .get(peer)
            .ok_or_else(|| PeerError::Unknown(peer.to_string()))?;
        let mut kept = kept.lock().await;
        if let Some(s) = kept.get(peer) {
            if !s.is_closed() && s.streams() > 0 {
                return Ok(s.clone());
            }
        }
        let s = Session::connect(addr, &self.identity, Some(peer), cfg)
            .await
            .map_err(|source| PeerError::Transport {
                peer: peer.to_string(),
                source,
            })?;
        kept.insert(peer.to_string(), s.clone());
        Ok(s)
    }

    /// The transfer named `name`, when a peer opens it.
    pub fn expect(&self, name: &str) -> oneshot::Receiver<Incoming> {
        let (tx, rx) = oneshot::channel();
        lock(&self.expected).insert(name.to_string(), tx);
        rx
    }

    /// Stops waiting for transfer `name`.
    pub fn unexpect(&self, name: &str) {
        lock(&self.expected).remove(name);
    }

    /// The session for bulk data to `peer` (not shared with requests),
    /// opened with `cfg` if there is none. It is kept between transfers:
    /// its connections keep what their congestion control learned (BBR
    /// resumes an idle connection at the rate it had), so a migration after
    /// a checkpoint's replication starts at the link's rate, not in slow
    /// start from ten packets per connection: at 500 ms RTT the 7 MB of a
    /// migration with a replica took 3 s to cross a link that carries them
    /// in 0.3.
    pub async fn data_session(
        &self,
        peer: &str,
        cfg: TransportConfig,
    ) -> Result<Session, PeerError> {
        self.kept_session(&self.bulk, peer, cfg).await
    }

    /// The last measured link to `peer`: RTT and goodput.
    pub fn link(&self, peer: &str) -> Option<(Duration, f64)> {
        let s = lock(&self.state);
        let p = s.get(peer)?;
        Some((Duration::from_secs_f64(p.rtt_ms? / 1000.0), p.goodput_bps?))
    }

    /// Sends request `kind` to `peer` and waits for its answer.
    pub async fn request(
        &self,
        peer: &str,
        kind: &str,
        body: Vec<u8>,
        within: Duration,
    ) -> Result<Vec<u8>, PeerError> {
        self.request_over(peer, kind, body, within, None).await
    }

    /// [`request`](Self::request) with a large body: it goes over the
    /// bulk data session (see [`data_session`](Self::data_session), opened
    /// with `cfg` if there is none); the answer as usual.
    pub async fn request_bulk(
        &self,
        peer: &str,
        kind: &str,
        body: Vec<u8>,
        within: Duration,
        cfg: TransportConfig,
    ) -> Result<Vec<u8>, PeerError> {
        self.request_over(peer, kind, body, within, Some(cfg)).await
    }

    async fn request_over(
        &self,
        peer: &str,
        kind: &str,
        body: Vec<u8>,
        within: Duration,
        bulk: Option<TransportConfig>,
    ) -> Result<Vec<u8>, PeerError> {
        let id = format!("{:016x}", rand_u64());
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(format!("rpc/resp/{id}"), tx);
        // `within` bounds the whole request: a session to a peer that is
        // gone can take longer than that to fail.
        let result = async {
            let s = match bulk {
                Some(cfg) => self.data_session(peer, cfg).await?,
                None => self.session(peer).await?,
            };
            let len = body.len() as u64;
            s.send(
                &format!("rpc/req/{kind}/{id}"),
                class_of(body.len()),
                len,
                &body[..],
                |_| {},
            )
            .await
            .map_err(|source| PeerError::Transport {
                peer: peer.to_string(),
                source,
            })?;
            match rx.await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(message)) => Err(PeerError::Refused {
                    peer: peer.to_string(),
                    message,
                }),
                Err(_) => Err(PeerError::Timeout {
                    peer: peer.to_string(),
                    secs: within.as_secs(),
                }),
            }
        };
        let result = tokio::time::timeout(within, result)
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::Timeout {
                    peer: peer.to_string(),
                    secs: within.as_secs(),
                })
            });
        lock(&self.waiters).remove(&format!("rpc/resp/{id}"));
        result
    }

    /// Reads incoming transfers: probes are dropped, answers go to their
    /// waiting request, requests to the manager.
    async fn serve(self: Arc<Self>, listener: Listener) {
        while let Some(inc) = listener.accept().await {
            let me = self.clone();
            tokio::spawn(async move { me.incoming(inc).await });
        }
    }

    async fn incoming(self: Arc<Self>, mut inc: Incoming) {
        if inc.name == PROBE {
            while inc.chunks.recv().await.is_some() {}
            return;
        }
        let waiter = lock(&self.expected).remove(&inc.name);
        if let Some(tx) = waiter {
            if let Err(mut inc) = tx.send(inc) {
                while inc.chunks.recv().await.is_some() {}
            }
            return;
        }
        let name = inc.name.clone();
        let peer = inc.peer.clone();
        let body = match collect(&mut inc).await {
            Ok(b) => b,
            Err(why) => {
                tracing::warn!(%peer, transfer = %name, "incomplete transfer: {why}");
                return;
            }
        };
        if let Some(rest) = name.strip_prefix("rpc/req/") {
            let Some((kind, id)) = rest.rsplit_once('/') else {
                return;
            };
            let answer = match self.handler.get().and_then(|w| w.upgrade()) {
                Some(m) => m.handle_request(&peer, kind, body).await,
                None => Err("the agent is starting".into()),
            };
            let mut msg = Vec::new();
            match answer {
                Ok(b) => {
                    msg.push(0);
                    msg.extend_from_slice(&b);
                }
                Err(e) => {
                    msg.push(1);
                    msg.extend_from_slice(e.as_bytes());
                }
            }
            let sent = async {
                let s = self.session(&peer).await?;
                let len = msg.len() as u64;
                s.send(
                    &format!("rpc/resp/{id}"),
                    class_of(msg.len()),
                    len,
                    &msg[..],
                    |_| {},
                )
                .await
                .map_err(|source| PeerError::Transport {
                    peer: peer.clone(),
                    source,
                })
            };
            if let Err(e) = sent.await {
                tracing::warn!(%peer, kind, "cannot answer: {}", crate::format_chain(&e));
            }
        } else if name.starts_with("rpc/resp/") {
            let Some(tx) = lock(&self.waiters).remove(&name) else {
                return;
            };
            let answer = match body.split_first() {
                Some((0, b)) => Ok(b.to_vec()),
                Some((_, e)) => Err(String::from_utf8_lossy(e).into_owned()),
                None => Err("an empty answer".into()),
            };
            let _ = tx.send(answer);
        } else {
            tracing::warn!(%peer, transfer = %name, "dropping an unexpected transfer");
        }
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
            p.probed_unix_ms = Some(now_unix_ms());
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
                            // Requests to the peer (and its answers to ours)
                            // find a session up: connecting costs round
                            // trips, seconds on a long link.
                            if let Err(e) = self.session(&name).await {
                                tracing::debug!(peer = %name, "no request session: {e}");
                            }
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

/// A whole incoming transfer, bounded.
async fn collect(inc: &mut Incoming) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(c) = inc.chunks.recv().await {
        match c {
            Chunk::Data(d) => {
                if body.len() + d.len() > MAX_RPC_BYTES {
                    return Err("larger than 4 GiB".into());
                }
                body.extend_from_slice(&d);
            }
            Chunk::Done { .. } => return Ok(body),
        }
    }
    Err("abandoned by the sender".into())
}

/// A random id (from the kernel; time and pid if that fails).
pub(crate) fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        return now_unix_ms() ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(b)
}
