//! An async QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! One reader task owns the read half: replies are routed to the waiting
//! [`Qmp::execute`] call by their `id`, events go to a broadcast channel, and
//! end of stream fails every waiting call with [`QmpError::Disconnected`] and
//! wakes [`Qmp::closed`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

/// The longest QMP message we accept; QEMU's replies are far smaller.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command {command} got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QMP connection closed (QEMU exited?)")]
    Disconnected,
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP I/O error")]
    Io(#[from] std::io::Error),
}

/// An asynchronous event QEMU sent, such as `SHUTDOWN`, `STOP` or `RESUME`.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// When QEMU says the event happened, in microseconds since the epoch.
    pub timestamp_us: Option<u64>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

fn event_time(msg: &Value) -> Option<u64> {
    let t = msg.get("timestamp")?;
    let s = t.get("seconds")?.as_u64()?;
    let us = t.get("microseconds")?.as_u64()?;
    Some(s * 1_000_000 + us)
}

/// A connected, capability-negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    next_id: AtomicU64,
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode. `timeout`
    /// bounds the handshake and, later, every command.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Connect {
                path: path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let greeting = tokio::time::timeout(timeout, read_message(&mut reader))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "(greeting)".into(),
                after: timeout,
            })??
            .ok_or(QmpError::Disconnected)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting: {greeting}"
            )));
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(read_loop(
            reader,
            pending.clone(),
            events.clone(),
            closed_tx,
        ));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            closed,
            next_id: AtomicU64::new(1),
            timeout,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        if *self.closed.borrow() {
            return Err(QmpError::Disconnected);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let sent = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await
        };
        let result = tokio::time::timeout(self.timeout, async {
            sent.await?;
            rx.await.map_err(|_| QmpError::Disconnected)?
        })
        .await;
        lock(&self.pending).remove(&id);
        match result {
            Err(_) => Err(QmpError::Timeout {
                command: command.into(),
                after: self.timeout,
            }),
            Ok(Err(QmpError::Command { class, desc, .. })) => Err(QmpError::Command {
                command: command.into(),
                class,
                desc,
            }),
            Ok(r) => r,
        }
    }

    /// Events from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Resolves once the connection has ended.
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Value>, QmpError> {
    let mut buf = Vec::new();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(QmpError::Protocol(
                    "connection ended inside a message".into(),
                ))
            };
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        buf.extend_from_slice(&chunk[..take]);
        r.consume(take);
        if buf.len() > MAX_MESSAGE_BYTES {
            return Err(QmpError::Protocol(format!(
                "message over {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        if done {
            let text = String::from_utf8_lossy(&buf);
            if text.trim().is_empty() {
                buf.clear();
                continue;
            }
            return serde_json::from_str(text.trim())
                .map(Some)
                .map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU: {e}")));
        }
    }
}

async fn read_loop<R: tokio::io::AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    loop {
        let msg = match read_message(&mut reader).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                // QEMU killed or crashed: whoever owns the process reports
                // that; a broken stream alone says nothing more.
                tracing::debug!(error = %e, "QMP stream broken");
                break;
            }
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let _ = events.send(QmpEvent {
                name: name.to_owned(),
                data: msg.get("data").cloned().unwrap_or(Value::Null),
                timestamp_us: event_time(&msg),
            });
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::debug!(%msg, "QMP message without id ignored");
            continue;
        };
        let Some(tx) = lock(&pending).remove(&id) else {
            continue;
        };
        let reply = if let Some(ret) = msg.get("return") {
            Ok(ret.clone())
        } else if let Some(err) = msg.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: err
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned(),
                desc: err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned(),
            })
        } else {
            Err(QmpError::Protocol(format!(
                "reply with neither return nor error: {msg}"
            )))
        };
        let _ = tx.send(reply);
    }
    let _ = closed.send(true);
    for (_, tx) in lock(&pending).drain() {
        let _ = tx.send(Err(QmpError::Disconnected));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted peer: greets, then answers each command with `reply(cmd)`.
    async fn fake_qemu(listener: UnixListener, reply: fn(&Value) -> Option<String>) {
        let (s, _) = listener.accept().await.expect("accept");
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .expect("greet");
        let mut r = BufReader::new(r);
        while let Ok(Some(msg)) = read_message(&mut r).await {
            match reply(&msg) {
                Some(line) => w.write_all(line.as_bytes()).await.expect("reply"),
                None => return,
            }
        }
    }

    #[tokio::test]
    async fn replies_errors_events_and_disconnect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(fake_qemu(listener, |msg| {
            let id = msg["id"].as_u64().unwrap_or(0);
            match msg["execute"].as_str() {
                Some("qmp_capabilities") => Some(format!("{{\"return\": {{}}, \"id\": {id}}}\n")),
                Some("query-status") => Some(format!(
                    "{{\"event\": \"STOP\", \"data\": {{}}}}\n{{\"return\": {{\"status\": \"paused\"}}, \"id\": {id}}}\n"
                )),
                Some("bogus") => Some(format!(
                    "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}}, \"id\": {id}}}\n"
                )),
                _ => None,
            }
        }));
        let qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        let mut events = qmp.events();
        let status = qmp.execute("query-status", None).await.expect("status");
        assert_eq!(status["status"], "paused");
        assert_eq!(events.recv().await.expect("event").name, "STOP");
        match qmp.execute("bogus", None).await {
            Err(QmpError::Command { command, class, .. }) => {
                assert_eq!(
                    (command.as_str(), class.as_str()),
                    ("bogus", "CommandNotFound")
                )
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        // The fake hangs up on anything else: the call fails, closed() fires.
        assert!(matches!(
            qmp.execute("quit", None).await,
            Err(QmpError::Disconnected)
        ));
        tokio::time::timeout(Duration::from_secs(5), qmp.closed())
            .await
            .expect("closed fires");
        assert!(matches!(
            qmp.execute("query-status", None).await,
            Err(QmpError::Disconnected)
        ));
    }

    #[tokio::test]
    async fn silent_peer_times_out_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(s);
        });
        let err = Qmp::connect(&path, Duration::from_millis(200))
            .await
            .expect_err("times out");
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");

        let path = dir.path().join("garbage.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let _ = s.write_all(b"this is not json\n").await;
        });
        let err = Qmp::connect(&path, Duration::from_secs(2))
            .await
            .expect_err("refused");
        assert!(matches!(err, QmpError::Protocol(_)), "{err:?}");
    }
}
