//! The tokio layer around the sans-IO core: TCP + TLS connections, one
//! writer and one reader task per connection, the stream-count controller,
//! and reconnection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::adapt::{Decision, StreamController};
use crate::frame::{Decoder, Frame, FrameError};
use crate::identity::{cert_node_name, IdentityError, NodeIdentity};
use crate::sched::{Class, ClassConfig, Opened, Receiver, RecvError, SendError, Sender};

pub const MAX_STREAMS: usize = 16;
const MAX_SESSIONS: usize = 256;
/// Completed transfers whose Done a reconnecting sender hears again.
const RESENT_DONES: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("protocol error from {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("the peer closed the session: {0}")]
    Closed(String),
    #[error("lost every connection to {addr} for {after:?}; giving up")]
    Unreachable { addr: SocketAddr, after: Duration },
    #[error("transfer failed: {0}")]
    Send(#[from] SendError),
    #[error("transfer corrupted: the receiver got {got_bytes} bytes with hash {got}, we sent {sent_bytes} bytes with hash {sent}")]
    HashMismatch {
        got: String,
        got_bytes: u64,
        sent: String,
        sent_bytes: u64,
    },
    #[error("cannot read the data to send")]
    Source(#[source] std::io::Error),
    #[error("invalid transport config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How many connections a session uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Streams {
    Fixed(usize),
    /// Start small; add connections while goodput grows.
    Auto,
}

impl std::str::FromStr for Streams {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Streams::Auto);
        }
        match s.parse::<usize>() {
            Ok(n) if (1..=MAX_STREAMS).contains(&n) => Ok(Streams::Fixed(n)),
            _ => Err(format!("{s:?}: expected auto or 1 to {MAX_STREAMS}")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub streams: Streams,
    /// Connections an `Auto` session opens at the start, before it
    /// measures: a long link wants more (each connection's slow start
    /// doubles its rate once per RTT from a few packets; several ramp up
    /// together).
    pub auto_start: usize,
    /// Most bytes a receiver holds out of order per transfer (and so the
    /// sender's window).
    pub window_bytes: u64,
    /// Most bytes of a transfer queued here for a connection (`None`: the
    /// window alone limits): a sender that should feel the link's pace,
    /// not a queue's, sets it to about what one RTT carries.
    pub max_unsent_bytes: Option<u64>,
    /// Size of the data frames a transfer is cut into.
    pub chunk_bytes: usize,
    /// Socket buffer size; `None` sizes it from the measured RTT and
    /// `link_rate_hint`.
    pub socket_buffer_bytes: Option<usize>,
    /// Bits per second the link may carry, to size socket buffers (BDP).
    pub link_rate_hint: u64,
    /// Congestion control to ask the kernel for.
    pub congestion: String,
    pub handshake_timeout: Duration,
    /// How long a session survives with no connection before transfers fail.
    pub resume_timeout: Duration,
    /// A connection with unacknowledged frames and nothing received for
    /// this long (or 8 RTTs, if longer) is taken for dead.
    pub stall_timeout: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            streams: Streams::Auto,
            auto_start: 2,
            window_bytes: 128 << 20,
            max_unsent_bytes: None,
            chunk_bytes: 256 << 10,
            socket_buffer_bytes: None,
            link_rate_hint: 1_000_000_000,
            congestion: "bbr".into(),
            handshake_timeout: Duration::from_secs(10),
            resume_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(5),
        }
    }
}

impl TransportConfig {
    /// Checks the settings; connect and bind refuse a config that fails.
    pub fn validate(&self) -> Result<(), TransportError> {
        let bad = |m: String| Err(TransportError::Config(m));
        if let Streams::Fixed(n) = self.streams {
            if !(1..=MAX_STREAMS).contains(&n) {
                return bad(format!("streams {n}: 1 to {MAX_STREAMS}"));
            }
        }
        if !(4096..=crate::frame::MAX_CHUNK).contains(&self.chunk_bytes) {
            return bad(format!("chunk_bytes {}: 4 KiB to 1 MiB", self.chunk_bytes));
        }
        if self.window_bytes < crate::frame::MAX_CHUNK as u64 || self.window_bytes > 4 << 30 {
            return bad(format!(
                "window_bytes {}: 1 MiB to 4 GiB",
                self.window_bytes
            ));
        }
        if self.handshake_timeout.is_zero()
            || self.resume_timeout.is_zero()
            || self.stall_timeout.is_zero()
        {
            return bad("timeouts must be above zero".into());
        }
        if self.congestion.is_empty() || self.congestion.len() > 15 {
            return bad(format!(
                "congestion {:?}: a kernel algorithm name",
                self.congestion
            ));
        }
        Ok(())
    }
}

/// Sets congestion control (falling back to CUBIC, said in the log) and
/// socket buffers. Returns the algorithm in use.
fn tune_socket(s: &TcpStream, cfg: &TransportConfig, buffer: usize) -> String {
    let fd = s.as_raw_fd();
    let _ = s.set_nodelay(true);
    let mut chosen = String::new();
    for algo in [cfg.congestion.as_str(), "cubic"] {
        // SAFETY: setsockopt with a valid fd and a byte buffer of the given length.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                algo.as_ptr().cast(),
                algo.len() as libc::socklen_t,
            )
        };
        if r == 0 {
            chosen = algo.to_owned();
            break;
        }
    }
    if chosen != cfg.congestion {
        tracing::warn!(wanted = %cfg.congestion, using = %chosen, "congestion control not available");
    }
    // Keep little unsent data in the kernel: frames wait in our scheduler
    // until a connection really has room, instead of piling up behind one
    // connection that slowed down.
    let lowat: libc::c_int = 256 * 1024;
    // SAFETY: setsockopt with a c_int option value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&lowat as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    set_socket_buffer(fd, SocketBuffer::Send, buffer);
    set_socket_buffer(fd, SocketBuffer::Receive, buffer);
    chosen
}

/// What the kernel knows of a TCP connection's round trips.
#[derive(Clone, Copy, Debug)]
enum KernelRtt {
    /// The smoothed RTT (right after the handshake: the SYN to SYN-ACK time).
    Smoothed,
    /// The smallest sample of the last minutes: the path without its queues.
    Min,
}

/// The kernel's `TCP_INFO` of the connection on `fd`.
fn tcp_info(fd: std::os::fd::RawFd) -> Option<libc::tcp_info> {
    // SAFETY: an all-zero tcp_info is a valid value (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(info)
}

/// The kernel's RTT of the connection on `fd`, if it has one.
fn kernel_rtt(fd: std::os::fd::RawFd, which: KernelRtt) -> Option<Duration> {
    let info = tcp_info(fd)?;
    let us = match which {
        KernelRtt::Smoothed => info.tcpi_rtt,
        KernelRtt::Min => info.tcpi_min_rtt,
    };
    // A zero or "no sample yet" (u32::MAX) minimum is no answer.
    (us > 0 && us != u32::MAX).then(|| Duration::from_micros(us as u64))
}

/// A connection that wrote nothing for this long starts its next write
/// with [`restart_pad`] (see [`restart_pad_after`]).
const IDLE_RESTART: Duration = Duration::from_secs(1);

/// [`restart_pad`] for a connection whose last write was at `last_write`,
/// if that was [`IDLE_RESTART`] ago or more.
fn restart_pad_after(last_write: Instant, fd: std::os::fd::RawFd) -> Option<Frame> {
    (last_write.elapsed() >= IDLE_RESTART).then(|| restart_pad(fd))
}

/// The padding a connection's first write after an idle spell starts
/// with: two full segments and a little. Linux's BBR takes a round trip
/// sample from a lone small segment for a delayed acknowledgement and does
/// not renew its minimum RTT with it; more than 10 s after the last
/// renewal the next acknowledgement then sends the connection into
/// PROBE_RTT: four packets in flight for 200 ms and a round trip, with
/// everything queued behind. A kept connection resuming after a minute
/// with a small frame (a transfer's opening, the head of a stream) stalled
/// for 1.2 s at 500 ms RTT, and the in-order stream with it. With two
/// full segments in its first flight the first acknowledgement is taken
/// at its word and nothing stalls.
fn restart_pad(fd: std::os::fd::RawFd) -> Frame {
    let mss = tcp_info(fd)
        .map(|i| i.tcpi_snd_mss as usize)
        .filter(|&m| m > 0)
        .unwrap_or(1448);
    Frame::Pad {
        len: (2 * mss + 64).min(crate::frame::MAX_PAD) as u32,
    }
}

/// One of a socket's kernel buffers.
#[derive(Clone, Copy, Debug)]
pub enum SocketBuffer {
    Send,
    Receive,
}

/// Sizes buffer `which` of socket `fd` to `bytes`: past the system's
/// limit (`wmem_max`, `rmem_max`) where the process may (root), else as
/// far as the limit allows.
pub fn set_socket_buffer(fd: std::os::fd::RawFd, which: SocketBuffer, bytes: usize) {
    let size = bytes.min(i32::MAX as usize) as libc::c_int;
    let opts = match which {
        SocketBuffer::Send => [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF],
        SocketBuffer::Receive => [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF],
    };
    for opt in opts {
        // SAFETY: setsockopt with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

fn buffer_for(cfg: &TransportConfig, rtt: Duration) -> usize {
    cfg.socket_buffer_bytes.unwrap_or_else(|| {
        let bdp = cfg.link_rate_hint as f64 / 8.0 * rtt.as_secs_f64();
        ((2.0 * bdp) as usize).clamp(256 << 10, 64 << 20)
    })
}

/// Progress of a transfer, for display.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub bytes_acked: u64,
    pub bytes_pushed: u64,
    pub streams: usize,
    pub retransmitted_frames: u64,
    pub elapsed: Duration,
}

/// One change of the number of connections, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StreamDecision {
    /// Seconds since the session started.
    pub at_secs: f64,
    pub from: usize,
    pub to: usize,
    pub reason: String,
}

/// What a finished transfer did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferReport {
    pub bytes: u64,
    pub seconds: f64,
    pub goodput_bps: f64,
    pub streams_max: usize,
    pub streams_final: usize,
    /// Goodput over the second half of the transfer (after start-up).
    pub steady_goodput_bps: f64,
    pub frames_sent: u64,
    pub retransmitted_frames: u64,
    pub reconnects: u64,
    pub hash: String,
    /// The stream-count controller's decisions during the transfer.
    pub stream_decisions: Vec<StreamDecision>,
}

/// Where the receiver's verdict on a transfer (length, hash) goes.
type DoneTx = oneshot::Sender<(u64, [u8; 32])>;
type Sessions = Arc<Mutex<HashMap<[u8; 16], Arc<ServerSession>>>>;

struct ClientInner {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    peer_label: String,
    connector: TlsConnector,
    cfg: TransportConfig,
    session: [u8; 16],
    core: Mutex<Sender>,
    wake: Notify,
    room: Notify,
    done: Mutex<HashMap<u32, DoneTx>>,
    next_conn: AtomicU16,
    next_transfer: AtomicU64,
    live: AtomicUsize,
    /// Connections being opened (TCP, TLS and hello under way).
    opening: AtomicUsize,
    /// Opens that failed since the last one that worked.
    open_failures: AtomicU64,
    target: AtomicUsize,
    max_live: AtomicUsize,
    reconnects: AtomicU64,
    retire: Mutex<Vec<u16>>,
    decisions: Mutex<Vec<StreamDecision>>,
    fatal: Mutex<Option<String>>,
    closed: AtomicBool,
    start: Instant,
    rtt: Mutex<Option<Duration>>,
}

impl ClientInner {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    /// Takes an RTT sample; the session's RTT is the smallest seen (the
    /// base RTT of the path, not of its queues), returned.
    fn note_rtt(&self, sample: Duration) -> Duration {
        let mut r = lock(&self.rtt);
        let best = r.map_or(sample, |old| old.min(sample));
        *r = Some(best);
        best
    }
    fn fail(&self, why: String) {
        let mut f = lock(&self.fatal);
        if f.is_none() {
            tracing::error!(peer = %self.peer_label, "session failed: {why}");
            *f = Some(why);
        }
        drop(f);
        lock(&self.done).clear();
        self.room.notify_waiters();
        self.wake.notify_waiters();
    }
}

/// A session to one peer: several TLS connections carrying any number of
/// transfers. Cheap to clone.
#[derive(Clone)]
pub struct Session {
    inner: Arc<ClientInner>,
}

impl Session {
    /// Connects to `addr`. With `expect`, the peer's certificate must name
    /// that node. Returns once the first connection is up.
    pub async fn connect(
        addr: SocketAddr,
        identity: &Arc<NodeIdentity>,
        expect: Option<&str>,
        cfg: TransportConfig,
    ) -> Result<Session, TransportError> {
        cfg.validate()?;
        let client = identity.client_config(expect)?;
        let name = expect.unwrap_or("dwcp-peer").to_owned();
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| TransportError::Protocol {
                peer: addr.to_string(),
                detail: format!("{name:?} is not a valid node name"),
            })?;
        let mut session = [0u8; 16];
        let seed =
            blake3::hash(format!("{:?}{}{addr}", Instant::now(), std::process::id()).as_bytes());
        session.copy_from_slice(&seed.as_bytes()[..16]);
        let initial = match cfg.streams {
            Streams::Fixed(n) => n,
            Streams::Auto => cfg.auto_start.clamp(1, MAX_STREAMS),
        };
        let inner = Arc::new(ClientInner {
            addr,
            server_name,
            peer_label: expect
                .map(str::to_owned)
                .unwrap_or_else(|| addr.to_string()),
            connector: TlsConnector::from(client),
            cfg: cfg.clone(),
            session,
            core: Mutex::new({
                // Until the receiver says what it holds (its HelloAck),
                // no more than the smallest window it may have.
                let mut s = Sender::new(cfg.window_bytes.min(crate::frame::MAX_CHUNK as u64));
                if let Some(n) = cfg.max_unsent_bytes {
                    s.set_max_unsent(n);
                }
                s
            }),
            wake: Notify::new(),
            room: Notify::new(),
            done: Mutex::new(HashMap::new()),
            next_conn: AtomicU16::new(0),
            next_transfer: AtomicU64::new(1),
            live: AtomicUsize::new(0),
            // The first connection, opened below.
            opening: AtomicUsize::new(1),
            open_failures: AtomicU64::new(0),
            target: AtomicUsize::new(initial),
            max_live: AtomicUsize::new(0),
            reconnects: AtomicU64::new(0),
            retire: Mutex::new(Vec::new()),
            decisions: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            closed: AtomicBool::new(false),
            start: Instant::now(),
            rtt: Mutex::new(None),
        });
        // All connections open at once (each costs three round trips:
        // seconds on a long link). The first is awaited here, so errors
        // (refused certificate, nothing listening) reach the caller
        // directly.
        for _ in 1..initial {
            spawn_open(&inner);
        }
        match open_conn(&inner).await {
            Ok(first) => {
                tokio::spawn(run_conn(inner.clone(), first));
            }
            Err(e) => {
                inner.closed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        tokio::spawn(supervise(inner.clone()));
        Ok(Session { inner })
    }

    /// The peer's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Connections up now.
    pub fn streams(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    pub fn rtt(&self) -> Option<Duration> {
        *lock(&self.inner.rtt)
    }

    /// Changes a class's weight and rate limit while transfers run.
    pub fn set_class(&self, class: Class, cfg: ClassConfig) {
        lock(&self.inner.core).set_class(class, cfg);
        self.inner.wake.notify_waiters();
    }

    /// Sends everything `source` yields as one transfer; returns once the
    /// receiver confirmed it by length and hash. `progress` is called about
    /// every 100 ms.
    pub async fn send(
        &self,
        name: &str,
        class: Class,
        size_hint: u64,
        mut source: impl AsyncRead + Unpin,
        mut progress_cb: impl FnMut(&Progress),
    ) -> Result<TransferReport, TransportError> {
        // When half of the expected bytes were acknowledged, for the
        // steady-state goodput.
        let mut half: Option<(Instant, u64)> = None;
        let mut progress = |p: &Progress| {
            if half.is_none() && size_hint > 0 && p.bytes_acked * 2 >= size_hint {
                half = Some((Instant::now(), p.bytes_acked));
            }
            progress_cb(p);
        };
        let inner = &self.inner;
        let id = inner.next_transfer.fetch_add(1, Ordering::Relaxed) as u32;
        let (done_tx, done_rx) = oneshot::channel();
        lock(&inner.done).insert(id, done_tx);
        let stats0 = lock(&inner.core).stats();
        lock(&inner.core).open(id, class, name, size_hint)?;
        inner.wake.notify_waiters();
        let t0 = Instant::now();
        let since = inner.start.elapsed().as_secs_f64();
        let mut last_progress = Instant::now();
        let mut max_streams = inner.live.load(Ordering::Relaxed);
        let chunk = inner.cfg.chunk_bytes.clamp(1024, crate::frame::MAX_CHUNK);
        let mut buf = vec![0u8; chunk];
        let report = |inner: &ClientInner, max_streams: usize| {
            let c = lock(&inner.core);
            let st = c.status(id).unwrap_or(crate::sched::OutStatus {
                pushed_bytes: 0,
                unacked_bytes: 0,
                acked_frames: 0,
                complete: false,
            });
            let s = c.stats();
            Progress {
                bytes_acked: st.pushed_bytes - st.unacked_bytes,
                bytes_pushed: st.pushed_bytes,
                streams: inner.live.load(Ordering::Relaxed).max(max_streams.min(1)),
                retransmitted_frames: s.frames_retransmitted - stats0.frames_retransmitted,
                elapsed: t0.elapsed(),
            }
        };
        let result: Result<(u64, [u8; 32]), TransportError> = async {
            loop {
                // Fill one chunk with what the source has: wait for the
                // first bytes, then take more only while they are there at
                // once, so a source that pauses is not held back by a
                // half-full chunk. EOF ends the transfer.
                let mut filled = 0;
                let mut eof = false;
                while filled < chunk {
                    let read = source.read(&mut buf[filled..]);
                    let n = if filled == 0 {
                        read.await
                    } else {
                        // A tokio read is cancel safe: dropped unready, it
                        // has read nothing.
                        tokio::select! {
                            biased;
                            r = read => r,
                            _ = std::future::ready(()) => break,
                        }
                    }
                    .map_err(TransportError::Source)?;
                    if n == 0 {
                        eof = true;
                        break;
                    }
                    filled += n;
                }
                let fin = eof;
                let data = buf[..filled].to_vec();
                loop {
                    let room = inner.room.notified();
                    tokio::pin!(room);
                    room.as_mut().enable();
                    if let Some(why) = lock(&inner.fatal).clone() {
                        return Err(TransportError::Closed(why));
                    }
                    if lock(&inner.core).push(id, data.clone(), fin)? {
                        inner.wake.notify_waiters();
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(100), room).await;
                    max_streams = max_streams.max(inner.live.load(Ordering::Relaxed));
                    if last_progress.elapsed() >= Duration::from_millis(100) {
                        progress(&report(inner, max_streams));
                        last_progress = Instant::now();
                    }
                }
                if fin {
                    break;
                }
                if last_progress.elapsed() >= Duration::from_millis(100) {
                    max_streams = max_streams.max(inner.live.load(Ordering::Relaxed));
                    progress(&report(inner, max_streams));
                    last_progress = Instant::now();
                }
            }
            // Wait for the receiver's verdict, showing progress meanwhile.
            tokio::pin!(done_rx);
            loop {
                tokio::select! {
                    r = &mut done_rx => {
                        return r.map_err(|_| TransportError::Closed(
                            lock(&inner.fatal).clone().unwrap_or_else(|| "session ended".into())));
                    }
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        max_streams = max_streams.max(inner.live.load(Ordering::Relaxed));
                        progress(&report(inner, max_streams));
                    }
                }
            }
        }
        .await;
        max_streams = max_streams.max(inner.live.load(Ordering::Relaxed));
        progress(&report(inner, max_streams));
        let (digest, stats) = {
            let c = lock(&inner.core);
            (c.digest(id), c.stats())
        };
        lock(&inner.core).close(id);
        lock(&inner.done).remove(&id);
        let (got_bytes, got_hash) = result?;
        let (sent_hash, sent_bytes) = digest.unwrap_or(([0; 32], 0));
        if got_hash != sent_hash || got_bytes != sent_bytes {
            return Err(TransportError::HashMismatch {
                got: hex(&got_hash),
                got_bytes,
                sent: hex(&sent_hash),
                sent_bytes,
            });
        }
        let secs = t0.elapsed().as_secs_f64();
        let goodput = sent_bytes as f64 * 8.0 / secs.max(1e-9);
        let steady = match half {
            Some((at, bytes)) if at.elapsed() > Duration::from_millis(200) => {
                (sent_bytes - bytes) as f64 * 8.0 / at.elapsed().as_secs_f64()
            }
            _ => goodput,
        };
        Ok(TransferReport {
            bytes: sent_bytes,
            seconds: secs,
            goodput_bps: goodput,
            steady_goodput_bps: steady,
            streams_max: inner.max_live.load(Ordering::Relaxed).max(max_streams),
            streams_final: inner.live.load(Ordering::Relaxed),
            frames_sent: stats.frames_sent - stats0.frames_sent,
            retransmitted_frames: stats.frames_retransmitted - stats0.frames_retransmitted,
            reconnects: inner.reconnects.load(Ordering::Relaxed),
            hash: hex(&sent_hash),
            stream_decisions: lock(&inner.decisions)
                .iter()
                .filter(|d| d.at_secs >= since)
                .cloned()
                .collect(),
        })
    }

    /// Closes every connection.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.wake.notify_waiters();
    }

    /// Whether [`close`](Self::close) was called (or the session failed).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Relaxed) || lock(&self.inner.fatal).is_some()
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects, handshakes, sends Hello. Returns the stream and conn id. The
/// peer's HelloAck is not waited for (a round trip: half a second on a
/// long link): frames follow the Hello at once, the reader takes the
/// HelloAck (see [`client_frame`]), and a peer that refuses the connection
/// closes it (see [`run_conn`]).
async fn open_conn(inner: &Arc<ClientInner>) -> Result<(u16, Tls), TransportError> {
    let addr = inner.addr;
    let to = inner.cfg.handshake_timeout;
    let t0 = Instant::now();
    let tcp = tokio::time::timeout(to, TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::Timeout { addr, after: to })?
        .map_err(|source| TransportError::Connect { addr, source })?;
    // SYN to SYN-ACK: one round trip, without TLS's CPU time in it; the
    // kernel's own sample where it has one (a busy runtime may see the
    // connect late: connections open together).
    let connect_rtt =
        kernel_rtt(tcp.as_raw_fd(), KernelRtt::Smoothed).unwrap_or_else(|| t0.elapsed());
    let rtt = (*lock(&inner.rtt)).unwrap_or(connect_rtt);
    let algo = tune_socket(&tcp, &inner.cfg, buffer_for(&inner.cfg, rtt));
    let mut tls = tokio::time::timeout(to, inner.connector.connect(inner.server_name.clone(), tcp))
        .await
        .map_err(|_| TransportError::Timeout { addr, after: to })?
        .map_err(|source| TransportError::Handshake { addr, source })?;
    let conn = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let peer = peer_name(tls.get_ref().1);
    let mut hello = Vec::new();
    Frame::Hello {
        session: inner.session,
        conn,
    }
    .encode(&mut hello);
    tokio::time::timeout(to, async {
        tls.write_all(&hello).await?;
        tls.flush().await
    })
    .await
    .map_err(|_| TransportError::Timeout { addr, after: to })?
    .map_err(|source| TransportError::Handshake { addr, source })?;
    let rtt = inner.note_rtt(connect_rtt);
    // A frame holding up in-order delivery for 4 RTTs (at least 300 ms) goes
    // out again on an idle connection.
    let hedge = (rtt * 4).max(Duration::from_millis(300));
    lock(&inner.core).set_hedge_after(Some(hedge.as_nanos() as u64));
    tracing::info!(peer = %peer, conn, congestion = %algo, "connection up");
    Ok((conn, tls))
}

/// The node name in the certificate the peer presented on this connection.
fn peer_name(state: &rustls::CommonState) -> String {
    state
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(cert_node_name)
        .unwrap_or_else(|| "?".into())
}

/// Opens one more connection in the background (counted in `opening`
/// meanwhile).
fn spawn_open(inner: &Arc<ClientInner>) {
    inner.opening.fetch_add(1, Ordering::Relaxed);
    let inner = inner.clone();
    tokio::spawn(async move {
        match open_conn(&inner).await {
            Ok(c) => {
                // Counted when the session had lost every connection.
                if inner.live.load(Ordering::Relaxed) == 0
                    && inner.max_live.load(Ordering::Relaxed) > 0
                {
                    inner.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer = %inner.peer_label, "reconnected; resuming from what the receiver acknowledged");
                }
                run_conn(inner, c).await;
            }
            Err(e) => {
                let n = inner.open_failures.fetch_add(1, Ordering::Relaxed) + 1;
                inner.opening.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(peer = %inner.peer_label, "connect failed ({n} in a row): {e}");
            }
        }
    });
}

/// Runs an opened connection until it ends.
async fn run_conn(inner: Arc<ClientInner>, (conn, tls): (u16, Tls)) {
    lock(&inner.core).conn_up(conn);
    let live = inner.live.fetch_add(1, Ordering::Relaxed) + 1;
    inner.opening.fetch_sub(1, Ordering::Relaxed);
    inner.max_live.fetch_max(live, Ordering::Relaxed);
    inner.wake.notify_waiters();
    // Valid while `tls` lives: its halves live to the end of this function.
    let fd = tls.get_ref().0.as_raw_fd();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let stop = Arc::new(Notify::new());
    let reader = {
        let inner = inner.clone();
        let stop = stop.clone();
        async move {
            let mut dec = Decoder::new();
            let mut rtt_asked = Instant::now();
            // Until the peer's HelloAck, a Close is its refusal of this
            // connection (not of the session): counted as a failed open.
            let mut welcomed = false;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                loop {
                    match dec.next_frame() {
                        Ok(Some(Frame::Close { reason })) if !welcomed => {
                            inner.open_failures.fetch_add(1, Ordering::Relaxed);
                            return Err(format!("refused: {reason}"));
                        }
                        Ok(Some(f)) => {
                            welcomed |= matches!(f, Frame::HelloAck { .. });
                            client_frame(&inner, f)?
                        }
                        Ok(None) => break,
                        Err(e) => return Err(format!("bad frame: {e}")),
                    }
                }
                // A connection whose frames go unacknowledged for `stall` is
                // dead even if TCP has not noticed (a link that went silent).
                let rtt = (*lock(&inner.rtt)).unwrap_or(Duration::from_millis(100));
                let stall = (rtt * 8).max(inner.cfg.stall_timeout);
                let n = tokio::select! {
                    r = tokio::time::timeout(stall, rd.read(&mut buf)) => match r {
                        Ok(Err(e)) if !welcomed => {
                            // TLS 1.3: the peer checks this node's
                            // certificate after the client's handshake is
                            // done, and says no with an alert here.
                            if let Some(alert) = tls_alert(&e) {
                                inner.fail(format!(
                                    "{} refused the TLS handshake: {alert}",
                                    inner.peer_label
                                ));
                            }
                            inner.open_failures.fetch_add(1, Ordering::Relaxed);
                            return Err(format!("closed before the peer's hello: {e}"));
                        }
                        Ok(r) => r.map_err(|e| e.to_string())?,
                        Err(_) if lock(&inner.core).conn_unacked_since(conn, inner.now(), stall.as_nanos() as u64) => {
                            return Err(format!("stalled: nothing acknowledged for {stall:?}"));
                        }
                        Err(_) => continue,
                    },
                    _ = stop.notified() => return Ok(()),
                };
                if n == 0 {
                    return Err("connection closed by peer".into());
                }
                dec.push(&buf[..n]);
                // A connect that met a queue (another connection's data, a
                // busy emulator or router) gave too long an RTT; the
                // kernel's smallest sample since then corrects it.
                if rtt_asked.elapsed() > Duration::from_millis(100) {
                    rtt_asked = Instant::now();
                    if let Some(min) = kernel_rtt(fd, KernelRtt::Min) {
                        inner.note_rtt(min);
                    }
                }
            }
        }
    };
    let writer = {
        let inner = inner.clone();
        async move {
            let mut out = Vec::with_capacity(2 << 20);
            let mut last_write = Instant::now();
            loop {
                if inner.closed.load(Ordering::Relaxed) || lock(&inner.fatal).is_some() {
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
                if lock(&inner.retire).contains(&conn) {
                    // Retired: take no new frames, let what it carries be
                    // acknowledged (or give up after 10 s, and it is resent
                    // elsewhere), then close.
                    for _ in 0..500 {
                        if !lock(&inner.core).conn_has_unacked(conn) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let _ = wr.shutdown().await;
                    return Ok(());
                }
                let woken = inner.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                out.clear();
                let next_timer = {
                    let mut c = lock(&inner.core);
                    let now = inner.now();
                    while out.len() < (256 << 10) {
                        match c.poll_transmit(conn, now) {
                            Some(f) => f.encode(&mut out),
                            None => break,
                        }
                    }
                    c.poll_timeout(now)
                };
                if !out.is_empty() && inner.cfg.max_unsent_bytes.is_some() {
                    // The queue shrank: a source held by it may go on.
                    inner.room.notify_waiters();
                }
                if out.is_empty() {
                    let wait = next_timer
                        .map(|t| Duration::from_nanos(t.saturating_sub(inner.now())))
                        .unwrap_or(Duration::from_millis(200));
                    let _ = tokio::time::timeout(wait, woken).await;
                    continue;
                }
                // write_all may leave TLS records buffered in rustls: flush,
                // or the last frames before a pause never leave.
                if let Err(e) = async {
                    if let Some(pad) = restart_pad_after(last_write, fd) {
                        let mut bytes = Vec::new();
                        pad.encode(&mut bytes);
                        wr.write_all(&bytes).await?;
                    }
                    wr.write_all(&out).await?;
                    wr.flush().await
                }
                .await
                {
                    return Err::<(), String>(e.to_string());
                }
                last_write = Instant::now();
            }
        }
    };
    tokio::pin!(reader);
    tokio::pin!(writer);
    let outcome = tokio::select! {
        r = &mut reader => r,
        w = &mut writer => { stop.notify_one(); w }
    };
    lock(&inner.core).conn_lost(conn);
    lock(&inner.retire).retain(|&c| c != conn);
    inner.live.fetch_sub(1, Ordering::Relaxed);
    inner.wake.notify_waiters();
    match outcome {
        Ok(()) => tracing::debug!(conn, "connection closed"),
        Err(e) => {
            tracing::warn!(peer = %inner.peer_label, conn, "connection lost: {e}; its unacknowledged frames go out on the others")
        }
    }
}

/// The TLS alert the peer sent, if that is what ended a read.
fn tls_alert(e: &std::io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(format!("received fatal alert: {a:?}")),
        _ => None,
    }
}

fn client_frame(inner: &ClientInner, f: Frame) -> Result<(), String> {
    match f {
        Frame::HelloAck { window, .. } => {
            inner.open_failures.store(0, Ordering::Relaxed);
            // The smaller of what the receiver can hold and what this
            // sender wants in flight (a migration keeps it near one BDP).
            lock(&inner.core).set_window(window.min(inner.cfg.window_bytes));
            inner.room.notify_waiters();
            inner.wake.notify_waiters();
        }
        Frame::Ack { transfer, next_seq } => {
            lock(&inner.core)
                .handle_ack(transfer, next_seq)
                .map_err(|e| e.to_string())?;
            inner.room.notify_waiters();
            inner.wake.notify_waiters();
        }
        Frame::Done {
            transfer,
            bytes,
            hash,
        } => {
            tracing::debug!(transfer, bytes, "receiver confirmed the transfer");
            if let Some(tx) = lock(&inner.done).remove(&transfer) {
                let _ = tx.send((bytes, hash));
            }
        }
        Frame::Close { reason } => {
            inner.fail(format!("peer closed the session: {reason}"));
            return Err(reason);
        }
        Frame::Pad { .. } => {}
        other => {
            return Err(format!(
                "unexpected {} frame from the receiver",
                other.kind_name()
            ))
        }
    }
    Ok(())
}

/// Keeps the number of connections at the target, reconnects after
/// failures (also after all of them died), and runs the stream controller.
async fn supervise(inner: Arc<ClientInner>) {
    let mut controller = StreamController::new(match inner.cfg.streams {
        Streams::Fixed(n) => (n, n),
        Streams::Auto => (1, MAX_STREAMS),
    });
    controller.reset(inner.target.load(Ordering::Relaxed));
    let mut retry_at = Instant::now();
    let mut alone_since: Option<Instant> = None;
    let mut last_eval = Instant::now();
    let mut last_acked = lock(&inner.core).stats().bytes_acked;
    let mut was_busy = false;
    // Looks at the sender since the last evaluation: all, and those that
    // found data waiting.
    let mut looks = (0u32, 0u32);
    loop {
        if inner.closed.load(Ordering::Relaxed) || lock(&inner.fatal).is_some() {
            return;
        }
        let live = inner.live.load(Ordering::Relaxed);
        let target = inner.target.load(Ordering::Relaxed);
        if live == 0 {
            let since = *alone_since.get_or_insert_with(Instant::now);
            if since.elapsed() > inner.cfg.resume_timeout {
                inner.fail(
                    TransportError::Unreachable {
                        addr: inner.addr,
                        after: inner.cfg.resume_timeout,
                    }
                    .to_string(),
                );
                return;
            }
        } else {
            alone_since = None;
        }
        // Missing connections open all at once; after failures, one at a
        // time with a growing pause (100 ms doubling to 2 s).
        let opening = inner.opening.load(Ordering::Relaxed);
        if live + opening < target && Instant::now() >= retry_at {
            let failures = inner.open_failures.load(Ordering::Relaxed);
            if failures == 0 {
                for _ in live + opening..target {
                    spawn_open(&inner);
                }
            } else if opening == 0 {
                spawn_open(&inner);
                let pause = Duration::from_millis(100) * (1u32 << (failures - 1).min(5));
                retry_at = Instant::now() + pause.min(Duration::from_secs(2));
            }
        }
        if live < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // Stream-count control, once per interval in which the link, not
        // the sender, was the limit: data waited to be sent at nearly every
        // look (a sender slower than the link gains nothing from more
        // connections, and its goodput's ups and downs read as gains and
        // losses).
        let rtt = (*lock(&inner.rtt)).unwrap_or(Duration::from_millis(100));
        let interval = (rtt * 8).clamp(Duration::from_millis(500), Duration::from_secs(4));
        looks.0 += 1;
        looks.1 += lock(&inner.core).has_pending() as u32;
        if last_eval.elapsed() >= interval {
            let acked = lock(&inner.core).stats().bytes_acked;
            let rate = (acked - last_acked) as f64 * 8.0 / last_eval.elapsed().as_secs_f64();
            let busy = looks.1 * 10 >= looks.0 * 9;
            looks = (0, 0);
            last_acked = acked;
            last_eval = Instant::now();
            if busy && was_busy {
                match controller.observe(live, rate) {
                    Decision::Hold => {}
                    Decision::Set { streams, reason } => {
                        tracing::info!(peer = %inner.peer_label, from = live, to = streams, "streams {live} -> {streams}: {reason}");
                        let mut d = lock(&inner.decisions);
                        if d.len() >= 1024 {
                            d.remove(0);
                        }
                        d.push(StreamDecision {
                            at_secs: inner.start.elapsed().as_secs_f64(),
                            from: live,
                            to: streams,
                            reason: reason.clone(),
                        });
                        drop(d);
                        inner.target.store(streams, Ordering::Relaxed);
                        if streams < live {
                            let mut r = lock(&inner.retire);
                            let newest = inner.next_conn.load(Ordering::Relaxed);
                            for c in (0..newest).rev().take(live - streams) {
                                r.push(c);
                            }
                            drop(r);
                            inner.wake.notify_waiters();
                        }
                    }
                }
            }
            was_busy = busy;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One incoming transfer: its chunks arrive in order on `chunks`; the last
/// item is `Chunk::Done`. A channel that ends without it means the transfer
/// was abandoned.
pub struct Incoming {
    pub peer: String,
    pub transfer: u32,
    pub class: Class,
    pub name: String,
    pub size_hint: u64,
    pub chunks: mpsc::Receiver<Chunk>,
}

#[derive(Debug)]
pub enum Chunk {
    Data(Vec<u8>),
    Done { bytes: u64, hash: [u8; 32] },
}

struct ServerSession {
    peer: String,
    /// Held across handling a frame and handing its chunks on, so chunks
    /// that arrive on different connections still reach the consumer in
    /// order.
    recv: tokio::sync::Mutex<Receiver>,
    sinks: Mutex<HashMap<u32, mpsc::Sender<Chunk>>>,
    conns: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
}

/// Accepts sessions from cluster peers and hands out their transfers.
pub struct Listener {
    addr: SocketAddr,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Incoming>>,
    sessions: Sessions,
}

impl Listener {
    pub async fn bind(
        addr: SocketAddr,
        identity: &Arc<NodeIdentity>,
        cfg: TransportConfig,
    ) -> Result<Listener, TransportError> {
        cfg.validate()?;
        let server = identity.server_config()?;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| TransportError::Listen { addr, source })?;
        let bound = tcp
            .local_addr()
            .map_err(|source| TransportError::Listen { addr, source })?;
        let (tx, rx) = mpsc::channel(64);
        let sessions: Sessions = Arc::default();
        tokio::spawn(accept_loop(
            tcp,
            TlsAcceptor::from(server),
            cfg,
            sessions.clone(),
            tx,
        ));
        Ok(Listener {
            addr: bound,
            incoming: tokio::sync::Mutex::new(rx),
            sessions,
        })
    }

    /// Waits until peers closed all their connections, at most `limit`: a
    /// receiver about to exit lets its last frames (a transfer's `Done`)
    /// reach the sender first (closing a socket with unread data resets it,
    /// and the reset discards what was still unsent).
    pub async fn wait_closed(&self, limit: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if lock(&self.sessions)
                .values()
                .all(|s| s.conns.load(Ordering::Relaxed) == 0)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next transfer any peer opens.
    pub async fn accept(&self) -> Option<Incoming> {
        self.incoming.lock().await.recv().await
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    cfg: TransportConfig,
    sessions: Sessions,
    tx: mpsc::Sender<Incoming>,
) {
    loop {
        let (sock, from) = match tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if tx.is_closed() {
            return;
        }
        let acceptor = acceptor.clone();
        let cfg = cfg.clone();
        let sessions = sessions.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(sock, from, acceptor, cfg, sessions, tx).await {
                tracing::warn!(%from, "connection ended: {e}");
            }
        });
    }
}

async fn serve_conn(
    sock: TcpStream,
    from: SocketAddr,
    acceptor: TlsAcceptor,
    cfg: TransportConfig,
    sessions: Sessions,
    tx: mpsc::Sender<Incoming>,
) -> Result<(), String> {
    tune_socket(&sock, &cfg, buffer_for(&cfg, Duration::from_millis(100)));
    let to = cfg.handshake_timeout;
    // A peer gets `handshake_timeout` for TLS and its Hello: slow or silent
    // peers are cut off.
    let mut tls = match tokio::time::timeout(to, acceptor.accept(sock)).await {
        Err(_) => {
            tracing::warn!(%from, "refused connection: no TLS handshake within {to:?}");
            return Ok(());
        }
        Ok(Err(e)) => {
            tracing::warn!(%from, "refused connection: TLS handshake failed: {e}");
            return Ok(());
        }
        Ok(Ok(t)) => t,
    };
    let peer = peer_name(tls.get_ref().1);
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 256 * 1024];
    let hello = tokio::time::timeout(to, async {
        loop {
            let n = tls.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before hello".to_owned());
            }
            dec.push(&buf[..n]);
            match dec.next_frame() {
                Ok(Some(Frame::Hello { session, conn })) => return Ok((session, conn)),
                Ok(Some(other)) => {
                    return Err(format!("expected hello, got {}", other.kind_name()))
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| format!("{peer}: no hello within {to:?}"))??;
    let (session_id, conn) = hello;
    let session = {
        let mut all = lock(&sessions);
        // Sessions idle past the resume timeout are dropped.
        all.retain(|_, s| {
            s.conns.load(Ordering::Relaxed) > 0
                || lock(&s.idle_since).is_none_or(|t| t.elapsed() < cfg.resume_timeout)
        });
        match all.get(&session_id) {
            Some(s) if s.peer != peer => {
                return Err(format!("{peer} tried to join a session of {}", s.peer));
            }
            Some(s) => s.clone(),
            None => {
                if all.len() >= MAX_SESSIONS {
                    return Err(format!("{peer}: too many sessions"));
                }
                let s = Arc::new(ServerSession {
                    peer: peer.clone(),
                    recv: tokio::sync::Mutex::new(Receiver::new(cfg.window_bytes)),
                    sinks: Mutex::new(HashMap::new()),
                    conns: AtomicUsize::new(0),
                    idle_since: Mutex::new(None),
                });
                all.insert(session_id, s.clone());
                s
            }
        }
    };
    if session.conns.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        session.conns.fetch_sub(1, Ordering::Relaxed);
        return Err(format!("{peer}: more than {MAX_STREAMS} connections"));
    }
    tracing::info!(%peer, conn, "peer connection accepted");
    let fd = tls.get_ref().0.as_raw_fd();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let (out_tx, mut out_rx) = mpsc::channel::<Frame>(1024);
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut last_write = Instant::now();
        while let Some(f) = out_rx.recv().await {
            out.clear();
            // (`fd` is valid while `wr` is: this task owns it.)
            if let Some(pad) = restart_pad_after(last_write, fd) {
                pad.encode(&mut out);
            }
            f.encode(&mut out);
            while let Ok(more) = out_rx.try_recv() {
                more.encode(&mut out);
                if out.len() > 1 << 20 {
                    break;
                }
            }
            if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                return;
            }
            last_write = Instant::now();
        }
        let _ = wr.shutdown().await;
    });
    let mut hello_ack = vec![Frame::HelloAck {
        session: session_id,
        window: cfg.window_bytes,
    }];
    // Resuming: tell the sender where every transfer stands, and the last
    // ones that completed (their Done may have died with a connection).
    {
        let recv = session.recv.lock().await;
        for (transfer, next_seq) in recv.positions() {
            hello_ack.push(Frame::Ack { transfer, next_seq });
        }
        for (transfer, bytes, hash) in recv.recently_done(RESENT_DONES) {
            hello_ack.push(Frame::Done {
                transfer,
                bytes,
                hash,
            });
        }
    }
    for f in hello_ack {
        let _ = out_tx.send(f).await;
    }
    // Ok(()) at the end of the stream; Err((violation, why)) otherwise, where
    // a violation (a malformed or lying frame) costs the peer its session
    // and a mere I/O error does not (it may come back and resume).
    let result: Result<(), (bool, String)> = async {
        loop {
            loop {
                let frame = match dec.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err((true, protocol(&peer, e))),
                };
                server_frame(&session, &peer, frame, &out_tx, &tx)
                    .await
                    .map_err(|e| (true, e))?;
            }
            let n = rd
                .read(&mut buf)
                .await
                .map_err(|e| (false, format!("{peer}: {e}")))?;
            if n == 0 {
                return Ok(());
            }
            dec.push(&buf[..n]);
        }
    }
    .await;
    let violation = matches!(result, Err((true, _)));
    if let Err((true, e)) = &result {
        let _ = out_tx.try_send(Frame::Close { reason: e.clone() });
    }
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    let last = session.conns.fetch_sub(1, Ordering::Relaxed) == 1;
    if violation {
        // A peer that broke the protocol loses the whole session: its
        // transfers end as abandoned.
        lock(&sessions).remove(&session_id);
        lock(&session.sinks).clear();
    } else if last {
        *lock(&session.idle_since) = Some(Instant::now());
        // No connection left: the peer has `resume_timeout` to come back
        // before its transfers are given up.
        let sessions = sessions.clone();
        let wait = cfg.resume_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if session.conns.load(Ordering::Relaxed) == 0 {
                lock(&sessions).remove(&session_id);
                lock(&session.sinks).clear();
            }
        });
    }
    result.map_err(|(_, e)| e)
}

fn protocol(peer: &str, e: FrameError) -> String {
    format!("{peer}: {e}")
}

async fn server_frame(
    session: &ServerSession,
    peer: &str,
    frame: Frame,
    out: &mpsc::Sender<Frame>,
    incoming: &mpsc::Sender<Incoming>,
) -> Result<(), String> {
    match frame {
        Frame::Open {
            transfer,
            class,
            size_hint,
            name,
        } => {
            let mut recv = session.recv.lock().await;
            let opened = recv
                .handle_open(transfer, class, &name, size_hint)
                .map_err(|e: RecvError| format!("{peer}: {e}"))?;
            if let Some(Opened {
                transfer,
                class,
                name,
                size_hint,
            }) = opened
            {
                let (ctx, crx) = mpsc::channel(64);
                lock(&session.sinks).insert(transfer, ctx);
                let inc = Incoming {
                    peer: peer.to_owned(),
                    transfer,
                    class,
                    name,
                    size_hint,
                    chunks: crx,
                };
                incoming
                    .send(inc)
                    .await
                    .map_err(|_| "the listener is gone".to_owned())?;
            }
            let next_seq = recv
                .positions()
                .into_iter()
                .find(|(t, _)| *t == transfer)
                .map(|(_, n)| n)
                .unwrap_or(0);
            out.send(Frame::Ack { transfer, next_seq })
                .await
                .map_err(|_| "writer gone".to_owned())?;
        }
        Frame::Data {
            transfer,
            seq,
            fin,
            payload,
        } => {
            let mut recv = session.recv.lock().await;
            let acked_before = recv
                .positions()
                .into_iter()
                .find(|(t, _)| *t == transfer)
                .map_or(0, |(_, n)| n);
            let d = recv
                .handle_data(transfer, seq, fin, payload)
                .map_err(|e| format!("{peer}: {e}"))?;
            tracing::trace!(
                transfer,
                seq,
                fin,
                ack = d.ack,
                delivered = d.chunks.len(),
                done = d.done.is_some(),
                "data"
            );
            let sink = lock(&session.sinks).get(&transfer).cloned();
            if let Some(sink) = &sink {
                'chunks: for c in d.chunks {
                    // Backpressure: a slow consumer stops this connection's
                    // reads. Meanwhile the sender hears, every second, the
                    // acknowledgement it already has: the connection is
                    // alive, only the consumer is busy (without it the
                    // sender took the silence for a dead link and dropped
                    // the connection).
                    let send = sink.send(Chunk::Data(c));
                    tokio::pin!(send);
                    loop {
                        tokio::select! {
                            r = &mut send => {
                                if r.is_err() {
                                    break 'chunks;
                                }
                                break;
                            }
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                                out.send(Frame::Ack { transfer, next_seq: acked_before })
                                    .await
                                    .map_err(|_| "writer gone".to_owned())?;
                            }
                        }
                    }
                }
            }
            out.send(Frame::Ack {
                transfer,
                next_seq: d.ack,
            })
            .await
            .map_err(|_| "writer gone".to_owned())?;
            if let Some((bytes, hash)) = d.done {
                // Only the first time: later ones answer duplicates.
                let first = lock(&session.sinks).remove(&transfer);
                if let Some(sink) = first {
                    let _ = sink.send(Chunk::Done { bytes, hash }).await;
                }
                out.send(Frame::Done {
                    transfer,
                    bytes,
                    hash,
                })
                .await
                .map_err(|_| "writer gone".to_owned())?;
            }
            drop(recv);
        }
        Frame::Close { reason } => return Err(format!("{peer} closed: {reason}")),
        Frame::Pad { .. } => {}
        other => return Err(format!("{peer}: unexpected {} frame", other.kind_name())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        assert!(TransportConfig::default().validate().is_ok());
        for bad in [
            TransportConfig {
                chunk_bytes: 10,
                ..TransportConfig::default()
            },
            TransportConfig {
                window_bytes: 1,
                ..TransportConfig::default()
            },
            TransportConfig {
                streams: Streams::Fixed(0),
                ..TransportConfig::default()
            },
            TransportConfig {
                stall_timeout: Duration::ZERO,
                ..TransportConfig::default()
            },
            TransportConfig {
                congestion: String::new(),
                ..TransportConfig::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(TransportError::Config(_))),
                "{bad:?}"
            );
        }
        assert_eq!("auto".parse::<Streams>(), Ok(Streams::Auto));
        assert_eq!("4".parse::<Streams>(), Ok(Streams::Fixed(4)));
        assert!("17".parse::<Streams>().is_err() && "0".parse::<Streams>().is_err());
    }
}
