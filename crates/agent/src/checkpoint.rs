//! Live checkpoints and restores: QEMU migrates into the agent, which keeps
//! the stream in the page store; a restore feeds a rebuilt stream into a
//! new QEMU started with `-incoming`.
//!
//! A checkpoint runs the VM's precopy migration into a unix socket that a
//! blocking thread reads, parses ([`StreamParser`]) and stores
//! ([`dwcp_hde::CheckpointWriter`]). When QEMU reports the migration
//! complete, the guest (paused by QEMU for the last round) is resumed at
//! once; its pause is measured from QEMU's own STOP and RESUME event times.
//! If anything fails, the migration is cancelled, a guest that was running
//! is resumed, and the writer removes what it stored.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use dwcp_api::{
    CheckpointHealth, CheckpointInfo, DeleteCheckpointResult, VerifyResult, VmInfo, VmSpec, VmState,
};
use dwcp_hde::{HdeError, Manifest, PageStore};
use dwcp_hypervisor::{Accel, Qmp};
use dwcp_vmstream::StreamParser;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::manager::{lock, AgentError, Manager, Vm};

/// How long QEMU gets to connect to the checkpoint socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream that stays silent this long is abandoned.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often migration progress is polled.
const POLL: Duration = Duration::from_millis(20);
/// QEMU's `max-bandwidth` when the configuration sets no limit.
const UNLIMITED_BYTES_PER_SEC: u64 = 64 << 30;
/// What the page store writer says when QEMU's side gave up first.
const ABANDONED: &str = "QEMU did not complete the migration";
/// Bytes read from or written to a stream socket at a time.
const IO_CHUNK: usize = 1 << 20;

/// Migration settings for checkpoints: nothing that hides pages from the
/// parser, no return path (the agent is no QEMU), convergence help on.
pub(crate) fn capabilities() -> Value {
    let caps = [
        ("xbzrle", false),
        ("multifd", false),
        ("postcopy-ram", false),
        ("return-path", false),
        ("mapped-ram", false),
        ("auto-converge", true),
        ("events", true),
    ];
    json!({ "capabilities": caps.iter().map(|(c, on)| json!({"capability": c, "state": on})).collect::<Vec<_>>() })
}

impl Manager {
    /// Takes a live checkpoint of VM `name`. The VM keeps running; the
    /// pause it suffers is measured and reported.
    pub async fn checkpoint(self: &Arc<Self>, name: &str) -> Result<CheckpointInfo, AgentError> {
        let started = Instant::now();
        let vm = self.vm(name)?;
        let _op = vm.op.lock().await;
        let (qmp, state, spec, accel) = {
            let c = lock(&vm.cell);
            if !matches!(c.rec.state, VmState::Running | VmState::Paused) {
                return Err(AgentError::InvalidState {
                    name: name.into(),
                    op: "checkpoint",
                    state: c.rec.state,
                    hint: " (only a running or paused VM can be checkpointed)",
                });
            }
            let accel = c.rec.runtime.as_ref().map(|r| r.accel.clone());
            (c.qmp.clone(), c.rec.state, c.rec.spec.clone(), accel)
        };
        let failed = |detail: String| AgentError::CheckpointFailed {
            name: name.into(),
            detail,
        };
        self.recover_pages().await;
        let qmp = qmp.ok_or_else(|| failed("QEMU is not connected".into()))?;
        let sock = vm.dir.join("checkpoint.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).map_err(|source| AgentError::Io {
            path: sock.clone(),
            source,
        })?;

        let (ready_tx, ready_rx) = oneshot::channel();
        let (conn_tx, conn_rx) = mpsc::channel::<UnixStream>();
        let (done_tx, done_rx) = mpsc::channel::<(Option<u64>, Option<u64>)>();
        let pages = self.pages.clone();
        let meta = json!({ "spec": spec, "accel": accel });
        let vm_name = name.to_string();
        let mut writer = tokio::task::spawn_blocking(move || {
            store_stream(&pages, &vm_name, ready_tx, conn_rx, done_rx, meta)
        });
        let id = match ready_rx.await {
            Ok(id) => id,
            Err(_) => {
                let _ = std::fs::remove_file(&sock);
                return Err(join_writer(&mut writer, name)
                    .await
                    .err()
                    .unwrap_or_else(|| failed("the page store writer ended early".into())));
            }
        };
        tracing::info!(vm = %name, checkpoint = %id, "checkpoint started");

        let was_running = state == VmState::Running;
        let limit = match self.cfg.checkpoint_max_bandwidth {
            0 => UNLIMITED_BYTES_PER_SEC,
            n => n,
        };
        let driven = drive_migration(
            &qmp,
            &listener,
            &sock,
            conn_tx,
            &mut writer,
            was_running,
            limit,
        )
        .await;
        let _ = std::fs::remove_file(&sock);
        let (pause_ms, downtime_ms) = match driven {
            Ok(times) => times,
            Err(detail) => {
                recover_source(&qmp, name, was_running).await;
                drop(done_tx);
                // The writer's own error says more when it caused the
                // failure; when it was only told to give up, QEMU's side says why.
                let err = match join_writer(&mut writer, name).await {
                    Err(AgentError::CheckpointFailed { detail: d, .. }) if d == ABANDONED => {
                        failed(detail)
                    }
                    Err(e) => e,
                    Ok(_) => failed(detail),
                };
                tracing::warn!(vm = %name, checkpoint = %id, error = %crate::format_chain(&err), "checkpoint failed");
                self.recover_pages().await;
                return Err(err);
            }
        };
        let _ = done_tx.send((pause_ms, downtime_ms));
        let manifest = match join_writer(&mut writer, name).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(vm = %name, checkpoint = %id, error = %crate::format_chain(&e), "checkpoint failed");
                self.recover_pages().await;
                return Err(e);
            }
        };
        let mut info = checkpoint_info(&manifest);
        info.took_ms = Some(started.elapsed().as_millis() as u64);
        tracing::info!(
            vm = %name, checkpoint = %id,
            pause_ms = ?pause_ms, new_pages = manifest.stats.new_pages,
            stored_bytes = manifest.stats.stored_bytes, took_ms = ?info.took_ms,
            "checkpoint taken"
        );
        Ok(info)
    }

    /// Starts a new VM `new_name` from checkpoint `id`. Refused, with
    /// nothing created, when the checkpoint is not whole; rolled back when
    /// QEMU does not take the stream.
    pub async fn restore(
        self: &Arc<Self>,
        id: &str,
        new_name: &str,
        paused: bool,
    ) -> Result<VmInfo, AgentError> {
        let failed = |detail: String| AgentError::RestoreFailed {
            checkpoint: id.into(),
            name: new_name.into(),
            detail,
        };
        self.recover_pages().await;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (path_tx, path_rx) = mpsc::channel::<PathBuf>();
        let pages = self.pages.clone();
        let ckpt = id.to_string();
        let mut feeder = Feeder {
            path_tx,
            task: tokio::task::spawn_blocking(move || {
                feed_stream(&pages, &ckpt, ready_tx, path_rx)
            }),
        };
        let manifest = match ready_rx.await {
            Ok(m) => m,
            Err(_) => {
                return Err(match join_feeder(&mut feeder.task).await {
                    Err(e) => e,
                    Ok(_) => failed("the page store reader ended early".into()),
                })
            }
        };
        let mut spec: VmSpec = serde_json::from_value(manifest.meta["spec"].clone())
            .map_err(|e| failed(format!("the checkpoint's VM spec is unreadable: {e}")))?;
        spec.name = new_name.to_string();
        let accel = match manifest.meta["accel"].as_str() {
            Some("kvm") => Accel::Kvm,
            _ => Accel::Tcg,
        };
        let node_accel = self.accel().await.accel;
        if accel != node_accel {
            return Err(failed(format!(
                "it was taken under {accel} and this node runs {node_accel}; the CPU state would not match"
            )));
        }
        // Creates the record (validating the name and spec) without starting.
        self.create(spec.clone(), false).await?;
        let vm = self.vm(new_name)?;
        let op = vm.op.lock().await;
        let result = self
            .start_incoming(&vm, id, &spec, accel, paused, &mut feeder)
            .await;
        drop(op);
        match result {
            Ok(()) => {
                tracing::info!(vm = %new_name, checkpoint = %id, "restored");
                Ok(self.info(&vm))
            }
            Err(e) => {
                tracing::warn!(vm = %new_name, checkpoint = %id, error = %crate::format_chain(&e), "restore failed; removing the new VM");
                if let Err(d) = self.delete(new_name, true).await {
                    tracing::warn!(vm = %new_name, error = %crate::format_chain(&d), "cannot remove the VM of a failed restore");
                }
                Err(e)
            }
        }
    }

    async fn start_incoming(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        id: &str,
        spec: &VmSpec,
        accel: Accel,
        paused: bool,
        feeder: &mut Feeder,
    ) -> Result<(), AgentError> {
        let failed = |detail: String| AgentError::RestoreFailed {
            checkpoint: id.into(),
            name: vm.name.clone(),
            detail,
        };
        {
            let mut c = lock(&vm.cell);
            c.rec.state = VmState::Starting;
            self.persist(vm, &c);
        }
        let sock = vm.dir.join("incoming.sock");
        let _ = std::fs::remove_file(&sock);
        let mut launch_spec = vm.launch_spec(spec, accel, Some(sock.clone()));
        launch_spec.start_paused = paused;
        let mut launched = match self.launch_qemu(&launch_spec).await {
            Ok(l) => l,
            Err(source) => {
                return Err(AgentError::Qemu {
                    name: vm.name.clone(),
                    source,
                })
            }
        };
        let _ = feeder.path_tx.send(sock.clone());
        let fed = join_feeder(&mut feeder.task).await;
        let running = match &fed {
            Ok(_) => wait_loaded(&launched.qmp, paused, Duration::from_secs(60)).await,
            Err(_) => Err(String::new()),
        };
        let _ = std::fs::remove_file(&sock);
        match (fed, running) {
            (Ok(bytes), Ok(())) => {
                tracing::info!(vm = %vm.name, bytes, "incoming stream taken");
                self.adopt(vm, launched, accel, paused);
                Ok(())
            }
            (fed, running) => {
                let _ = launched.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), launched.child.wait()).await;
                let qemu_said = dwcp_hypervisor::qemu::log_tail(&vm.qemu_log(), 3);
                Err(match fed {
                    Err(e) => e,
                    Ok(_) => failed(format!(
                        "QEMU did not start running from the stream ({}); its last output: {qemu_said}",
                        running.err().unwrap_or_default()
                    )),
                })
            }
        }
    }

    /// Reopens the page store if an I/O error (a full disk) broke it.
    async fn recover_pages(&self) {
        let pages = self.pages.clone();
        match tokio::task::spawn_blocking(move || pages.recover()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::format_chain(&e), "page store still unavailable")
            }
            Err(e) => tracing::warn!(error = %e, "page store recovery task failed"),
        }
    }

    /// Sends checkpoint `id` to peer `to`: only the objects it lacks.
    pub async fn replicate(&self, id: &str, to: &str) -> Result<CheckpointInfo, AgentError> {
        let started = Instant::now();
        let peers = self
            .peers
            .clone()
            .ok_or(crate::peers::PeerError::NoIdentity)?;
        let pages = self.pages.clone();
        let ckpt = id.to_string();
        let offer = blocking(move || pages.replica_offer(&ckpt)).await?;
        let manifest = offer.manifest.clone();
        let map = offer.map.clone();
        let objects = offer.digests.len() as u64;
        let body = dwcp_hde::replica::encode_offer(&offer)?;
        let mut bytes_sent = body.len() as u64;
        let answer = peers
            .request(to, "replica-offer", body, Duration::from_secs(120))
            .await?;
        let want = dwcp_hde::replica::decode_digests(&answer)?;
        let pages = self.pages.clone();
        let wanted = want.clone();
        let sending = blocking(move || pages.read_objects(&wanted)).await?;
        let body = dwcp_hde::replica::encode_objects(&manifest, &map, &sending)?;
        bytes_sent += body.len() as u64;
        // Over the bulk session a migration to the peer uses too: it finds
        // it at the link's rate.
        let cfg = crate::migrate::Plan::of(peers.link(to)).transport;
        let answer = peers
            .request_bulk(to, "replica-objects", body, Duration::from_secs(3600), cfg)
            .await?;
        let there: Manifest =
            serde_json::from_slice(&answer).map_err(|e| crate::peers::PeerError::Refused {
                peer: to.into(),
                message: format!("an unreadable answer: {e}"),
            })?;
        let mut info = checkpoint_info(&manifest);
        info.replicated = Some(dwcp_api::ReplicaInfo {
            peer: to.into(),
            id: there.id,
            objects,
            objects_sent: want.len() as u64,
            bytes_sent,
            seconds: started.elapsed().as_secs_f64(),
        });
        tracing::info!(checkpoint = %id, peer = %to, objects, sent = want.len(), bytes_sent, "checkpoint replicated");
        // A migration to that peer may follow: the bases of its deltas are
        // this checkpoint's pages.
        self.warm.build_in_background(
            self.pages.clone(),
            (manifest.vm.clone(), id.to_string()),
            false,
        );
        Ok(info)
    }

    /// Answers a request from another node.
    pub(crate) async fn handle_request(
        self: &Arc<Self>,
        peer: &str,
        kind: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        if kind.starts_with("migrate-") {
            return self.handle_migration_request(peer, kind, &body).await;
        }
        let pages = self.pages.clone();
        let warm = self.warm.clone();
        let origin = peer.to_string();
        let r = match kind {
            "replica-offer" => {
                blocking(move || {
                    let offer = dwcp_hde::replica::decode_offer(&body)?;
                    let missing = pages.missing(&offer.digests)?;
                    Ok(dwcp_hde::replica::encode_digests(&missing))
                })
                .await
            }
            "replica-objects" => {
                blocking(move || {
                    let (m, map, objects) = dwcp_hde::replica::decode_objects(&body)?;
                    let stored = pages.import_replica(&origin, m, &map, objects)?;
                    tracing::info!(checkpoint = %stored.id, from = %origin, "replica stored");
                    // A migration of the VM here may follow: its QEMU
                    // will map the replica's memory.
                    warm.build_in_background(
                        pages.clone(),
                        (stored.vm.clone(), stored.id.clone()),
                        true,
                    );
                    serde_json::to_vec(&stored).map_err(|e| HdeError::Stream(e.to_string()))
                })
                .await
            }
            other => return Err(format!("unknown request {other:?}")),
        };
        r.map_err(|e| crate::format_chain(&e))
    }

    pub async fn checkpoints(&self) -> Result<Vec<CheckpointInfo>, AgentError> {
        let pages = self.pages.clone();
        let list = blocking(move || pages.list()).await?;
        Ok(list.iter().map(checkpoint_info).collect())
    }

    pub async fn show_checkpoint(&self, id: &str) -> Result<CheckpointInfo, AgentError> {
        let pages = self.pages.clone();
        let id = id.to_string();
        Ok(checkpoint_info(
            &blocking(move || pages.manifest(&id)).await?,
        ))
    }

    pub async fn delete_checkpoint(&self, id: &str) -> Result<DeleteCheckpointResult, AgentError> {
        let (pages, warm) = (self.pages.clone(), self.warm.clone());
        let ckpt = id.to_string();
        let gc = blocking(move || {
            let vm = pages.manifest(&ckpt)?.vm;
            let gc = pages.delete(&ckpt)?;
            warm.forget(&vm, &ckpt);
            Ok(gc)
        })
        .await?;
        tracing::info!(checkpoint = %id, objects = gc.objects_removed, bytes = gc.bytes_removed, "checkpoint deleted");
        Ok(DeleteCheckpointResult {
            objects_removed: gc.objects_removed,
            bytes_removed: gc.bytes_removed,
        })
    }

    /// Re-hashes the store (or what one checkpoint uses).
    pub async fn verify_checkpoints(&self, id: Option<String>) -> Result<VerifyResult, AgentError> {
        let pages = self.pages.clone();
        let r = blocking(move || pages.verify(id.as_deref())).await?;
        Ok(VerifyResult {
            ok: r.ok(),
            objects_checked: r.objects_checked,
            bytes_checked: r.bytes_checked,
            corrupt_objects: r.corrupt_objects,
            dropped_objects: r.dropped_objects,
            checkpoints: r
                .checkpoints
                .into_iter()
                .map(|h| CheckpointHealth {
                    ok: h.problems.is_empty(),
                    id: h.id,
                    problems: h.problems,
                    more_problems: h.more_problems,
                })
                .collect(),
        })
    }
}

/// The thread that writes a checkpoint's stream into a restoring QEMU,
/// and how to tell it where QEMU listens.
struct Feeder {
    path_tx: mpsc::Sender<PathBuf>,
    task: tokio::task::JoinHandle<Result<u64, AgentError>>,
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HdeError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Checkpoint(HdeError::Stream(format!("store task failed: {e}"))))?
        .map_err(AgentError::Checkpoint)
}

pub(crate) fn checkpoint_info(m: &Manifest) -> CheckpointInfo {
    CheckpointInfo {
        id: m.id.clone(),
        vm: m.vm.clone(),
        created_unix_ms: m.created_unix_ms,
        parent: m.parent.clone(),
        memory_bytes: m.memory_bytes(),
        pages: m.stats.pages,
        zero_pages: m.stats.zero_pages,
        changed_pages: m.stats.changed_pages,
        new_pages: m.stats.new_pages,
        delta_pages: m.stats.delta_pages,
        stored_bytes: m.stats.stored_bytes,
        stream_bytes: m.stats.stream_bytes,
        encode_secs: m.stats.encode_secs,
        pause_ms: m.stats.pause_ms,
        qemu_downtime_ms: m.stats.qemu_downtime_ms,
        memory_digest: m.stats.memory_digest.map(|d| d.to_hex()),
        origin: m.origin.clone(),
        replicated: None,
        took_ms: None,
    }
}

/// Runs QEMU's side of a checkpoint: settings, `migrate`, progress until
/// completion, then resumes the guest. Returns the measured pause and
/// QEMU's downtime figure.
async fn drive_migration(
    qmp: &Qmp,
    listener: &tokio::net::UnixListener,
    sock: &Path,
    conn_tx: mpsc::Sender<UnixStream>,
    writer: &mut tokio::task::JoinHandle<Result<Manifest, AgentError>>,
    was_running: bool,
    max_bytes_per_sec: u64,
) -> Result<(Option<u64>, Option<u64>), String> {
    let mut events = qmp.events();
    let q = |e: dwcp_hypervisor::QmpError| e.to_string();
    qmp.execute("migrate-set-capabilities", Some(capabilities()))
        .await
        .map_err(q)?;
    let params = json!({ "max-bandwidth": max_bytes_per_sec, "downtime-limit": 300 });
    qmp.execute("migrate-set-parameters", Some(params))
        .await
        .map_err(q)?;
    let uri = format!("unix:{}", sock.display());
    qmp.execute("migrate", Some(json!({ "uri": uri })))
        .await
        .map_err(q)?;
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, listener.accept()).await {
        Ok(Ok((c, _))) => c,
        Ok(Err(e)) => return Err(format!("accepting QEMU's stream: {e}")),
        Err(_) => return Err("QEMU did not connect to the checkpoint socket".into()),
    };
    let conn = conn
        .into_std()
        .and_then(|c| c.set_nonblocking(false).map(|_| c))
        .map_err(|e| format!("checkpoint socket: {e}"))?;
    conn_tx
        .send(conn)
        .map_err(|_| "the page store writer ended early".to_string())?;

    let mut stop_us = None;
    let mut resume_us = None;
    let deadline = Instant::now() + Duration::from_secs(3600);
    let downtime = loop {
        while let Ok(ev) = events.try_recv() {
            match ev.name.as_str() {
                "STOP" => stop_us = ev.timestamp_us,
                "RESUME" => resume_us = ev.timestamp_us,
                _ => {}
            }
        }
        if writer.is_finished() {
            return Err("the page store writer stopped".into());
        }
        let status = qmp.execute("query-migrate", None).await.map_err(q)?;
        match status["status"].as_str() {
            Some("completed") => break status["downtime"].as_u64(),
            Some("failed") | Some("cancelled") => {
                let why = status["error-desc"].as_str().unwrap_or("no reason given");
                return Err(format!("QEMU's migration failed: {why}"));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err("the checkpoint did not complete within an hour".into());
        }
        tokio::time::sleep(POLL).await;
    };
    if !was_running {
        return Ok((None, downtime));
    }
    // QEMU says "completed" a moment before it leaves finish-migrate, and
    // refuses `cont` until then ("Migration is not finalized yet").
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let s = qmp.execute("query-status", None).await.map_err(q)?;
        if s["status"] != "finish-migrate" {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    qmp.execute("cont", None).await.map_err(q)?;
    let waited = tokio::time::timeout(Duration::from_secs(2), async {
        while resume_us.is_none() {
            match events.recv().await {
                Ok(ev) if ev.name == "STOP" => stop_us = ev.timestamp_us,
                Ok(ev) if ev.name == "RESUME" => resume_us = ev.timestamp_us,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    let pause = match (stop_us, resume_us, waited) {
        (Some(s), Some(r), Ok(())) if r >= s => Some((r - s) / 1000),
        _ => None,
    };
    Ok((pause, downtime))
}

/// After a failed checkpoint: cancel the migration and make sure a guest
/// that was running runs again.
pub(crate) async fn recover_source(qmp: &Qmp, name: &str, was_running: bool) {
    let _ = qmp.execute("migrate_cancel", None).await;
    if !was_running {
        return;
    }
    for _ in 0..100 {
        match qmp.execute("query-status", None).await {
            Ok(s) if s["running"] == true => return,
            Ok(s) if s["status"] == "finish-migrate" => {}
            Ok(_) => {
                if qmp.execute("cont", None).await.is_ok() {
                    tracing::info!(vm = %name, "guest resumed after a failed checkpoint");
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, "cannot check the VM after a failed checkpoint");
                return;
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn join_writer(
    writer: &mut tokio::task::JoinHandle<Result<Manifest, AgentError>>,
    name: &str,
) -> Result<Manifest, AgentError> {
    match writer.await {
        Ok(r) => r,
        Err(e) => Err(AgentError::CheckpointFailed {
            name: name.into(),
            detail: format!("the page store writer failed: {e}"),
        }),
    }
}

async fn join_feeder(
    feeder: &mut tokio::task::JoinHandle<Result<u64, AgentError>>,
) -> Result<u64, AgentError> {
    match feeder.await {
        Ok(r) => r,
        Err(e) => Err(AgentError::Checkpoint(HdeError::Stream(format!(
            "the page store reader failed: {e}"
        )))),
    }
}

/// The blocking side of a checkpoint: takes the store's writer lock, says
/// which id it got, reads QEMU's stream into the store, and finishes once
/// told how long the guest was paused.
fn store_stream(
    pages: &PageStore,
    vm: &str,
    ready: oneshot::Sender<String>,
    conn: mpsc::Receiver<UnixStream>,
    done: mpsc::Receiver<(Option<u64>, Option<u64>)>,
    meta: Value,
) -> Result<Manifest, AgentError> {
    let failed = |detail: String| AgentError::CheckpointFailed {
        name: vm.into(),
        detail,
    };
    let mut w = pages.begin_checkpoint(vm)?;
    if ready.send(w.id().to_string()).is_err() {
        return Err(failed("abandoned before it started".into()));
    }
    let mut conn = conn
        .recv_timeout(CONNECT_TIMEOUT + Duration::from_secs(5))
        .map_err(|_| failed("QEMU's stream never arrived".into()))?;
    conn.set_read_timeout(Some(STREAM_IDLE_TIMEOUT))
        .map_err(|e| failed(format!("checkpoint socket: {e}")))?;
    let mut parser = StreamParser::new();
    let mut buf = vec![0u8; IO_CHUNK];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(format!("reading QEMU's stream: {e}"))),
        };
        if n == 0 {
            break;
        }
        parser.feed(&buf[..n]);
        loop {
            match parser.next_item() {
                Ok(Some(item)) => w.push(item)?,
                Ok(None) => break,
                Err(e) => return Err(failed(format!("QEMU's stream: {e}"))),
            }
        }
    }
    parser
        .finish()
        .map_err(|e| failed(format!("QEMU's stream: {e}")))?;
    let (pause_ms, downtime_ms) = done.recv().map_err(|_| failed(ABANDONED.into()))?;
    Ok(w.finish(meta, pause_ms, downtime_ms)?)
}

/// The blocking side of a restore: opens the checkpoint (every page and
/// part checked present), hands its manifest over, then writes the stream
/// into QEMU's incoming socket once told where it is.
fn feed_stream(
    pages: &PageStore,
    id: &str,
    ready: oneshot::Sender<Manifest>,
    path: mpsc::Receiver<PathBuf>,
) -> Result<u64, AgentError> {
    let mut stream = pages.restore_stream(id)?;
    if ready.send(stream.manifest().clone()).is_err() {
        return Ok(0);
    }
    let Ok(path) = path.recv() else {
        return Ok(0);
    };
    let failed = |detail: String| AgentError::CheckpointFailed {
        name: id.into(),
        detail: format!("restoring: {detail}"),
    };
    let mut conn = None;
    for _ in 0..100 {
        match UnixStream::connect(&path) {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let mut conn = conn.ok_or_else(|| failed("QEMU's incoming socket did not appear".into()))?;
    conn.set_write_timeout(Some(STREAM_IDLE_TIMEOUT))
        .map_err(|e| failed(format!("incoming socket: {e}")))?;
    while let Some(chunk) = stream.next_chunk(IO_CHUNK)? {
        conn.write_all(&chunk)
            .map_err(|e| failed(format!("QEMU stopped taking the stream: {e}")))?;
    }
    let _ = conn.flush();
    Ok(stream.bytes_out())
}

/// Waits until QEMU says the incoming migration finished: the guest runs
/// (or, when started with `-S`, is paused).
pub(crate) async fn wait_loaded(qmp: &Qmp, paused: bool, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let want = if paused { "paused" } else { "running" };
    loop {
        match qmp.execute("query-status", None).await {
            Ok(s) if s["status"] == want => return Ok(()),
            Ok(s) if Instant::now() > deadline => {
                return Err(format!("still {} after {within:?}", s["status"]))
            }
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        tokio::time::sleep(POLL).await;
    }
}
