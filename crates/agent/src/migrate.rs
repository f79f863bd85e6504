//! Live migration between agents.
//!
//! Source: QEMU migrates (precopy, no return path) into a unix socket; a
//! blocking thread parses the stream and encodes it for the wire
//! (`dwcp_hde::wire`: pages already sent go as references, the rest
//! compressed); the records go to the destination as one AMST transfer whose
//! window is about one bandwidth-delay product, so QEMU's own rate and
//! downtime estimates see the real link.
//!
//! Destination: on `migrate-prepare` it creates the VM and starts QEMU with
//! `-incoming` and `-S` (loaded, not running); it decodes the transfer into
//! QEMU's socket.
//!
//! Switch-over, so that the VM never runs twice and is never lost: when the
//! source QEMU has sent everything (and is paused) and the destination
//! acknowledged every byte, the source asks `migrate-commit`. The
//! destination starts its guest only then, and answers. On that answer the
//! source ends its QEMU and forgets the VM. If the destination refuses,
//! the source resumes its guest. If no answer comes, the source keeps its
//! guest paused and says the outcome is unknown (the destination may be
//! running it). Any failure before the commit cancels the migration on both
//! sides and the source guest runs on.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dwcp_api::{VmSpec, VmState};
use dwcp_hde::wire::{WireDecoder, WireEncoder, WireStats};
use dwcp_hypervisor::{launch, Accel, Launched, Qmp};
use dwcp_transport::{Chunk, Class, TransportConfig};
use dwcp_vmstream::StreamParser;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

use crate::checkpoint::{capabilities, recover_source, wait_loaded};
use crate::manager::{lock, AgentError, Manager};
use crate::peers::PeerError;

/// What a finished migration did.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationReport {
    pub vm: String,
    pub to: String,
    pub seconds: f64,
    /// Bytes of QEMU's own stream.
    pub stream_bytes: u64,
    /// Bytes that crossed the network (the encoded records).
    pub wire_bytes: u64,
    pub saved_by_dedup_bytes: u64,
    pub saved_by_compression_bytes: u64,
    pub pages: u64,
    pub ref_pages: u64,
    /// Pages sent as a delta against the version the destination held.
    pub delta_pages: u64,
    /// Pages the destination already held (from a replicated checkpoint).
    pub pages_known_at_destination: u64,
    /// Rounds of dirty-page sync QEMU went through.
    pub rounds: u64,
    /// QEMU's own downtime figure (taken at the source).
    pub qemu_downtime_ms: Option<u64>,
    /// From the source guest's pause to the destination's `cont`.
    pub switchover_ms: u64,
}

/// A running migration, as `GET /v1/vms/{name}/migration` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationProgress {
    pub to: String,
    /// QEMU's status (`setup`, `active`, `device`, `completed`), or
    /// `switch-over` while the destination starts the VM.
    pub status: String,
    /// Dirty-page sync rounds so far.
    pub round: u64,
    /// Bytes QEMU has sent.
    pub stream_bytes: u64,
    /// Bytes that went on the wire for them.
    pub wire_bytes: u64,
    /// Memory still dirty.
    pub remaining_bytes: u64,
    /// QEMU's measured rate, bits per second.
    pub rate_bps: f64,
    /// QEMU's estimate of the pause at switch-over.
    pub expected_downtime_ms: u64,
    pub elapsed_secs: f64,
    /// Remaining bytes at the current rate.
    pub eta_secs: Option<f64>,
}

/// A migration's handle: progress to show, and a way to cancel it.
pub(crate) struct MigrationControl {
    progress: Mutex<MigrationProgress>,
    cancel: tokio::sync::watch::Sender<bool>,
    stream_bytes: std::sync::atomic::AtomicU64,
    wire_bytes: std::sync::atomic::AtomicU64,
}

pub(crate) type Migrations = Mutex<HashMap<String, Arc<MigrationControl>>>;

#[derive(Serialize, Deserialize)]
struct Prepare {
    id: String,
    spec: VmSpec,
    accel: String,
}

/// An incoming migration on the destination.
pub(crate) struct IncomingMigration {
    vm: String,
    launched: Launched,
    accel: Accel,
    fed: tokio::task::JoinHandle<Result<u64, String>>,
}

pub(crate) type IncomingMigrations = Mutex<HashMap<String, IncomingMigration>>;

impl Manager {
    /// Moves running VM `name` to peer `to`. See the module docs.
    pub async fn migrate(
        self: &Arc<Self>,
        name: &str,
        to: &str,
    ) -> Result<MigrationReport, AgentError> {
        let started = Instant::now();
        if self.peers.is_none() {
            return Err(PeerError::NoIdentity.into());
        }
        let vm = self.vm(name)?;
        let op = vm.op.lock().await;
        let failed = |detail: String| AgentError::MigrationFailed {
            name: name.into(),
            detail,
        };
        let (qmp, spec, accel) = {
            let c = lock(&vm.cell);
            if c.rec.state != VmState::Running {
                return Err(AgentError::InvalidState {
                    name: name.into(),
                    op: "migrate",
                    state: c.rec.state,
                    hint: " (only a running VM is migrated)",
                });
            }
            let accel = c
                .rec
                .runtime
                .as_ref()
                .map(|r| r.accel.clone())
                .unwrap_or_default();
            (c.qmp.clone(), c.rec.spec.clone(), accel)
        };
        let qmp = qmp.ok_or_else(|| failed("QEMU is not connected".into()))?;
        let id = format!("{name}-{:08x}", crate::peers::rand_u64() as u32);
        let control = Arc::new(MigrationControl {
            progress: Mutex::new(MigrationProgress {
                to: to.into(),
                status: "preparing".into(),
                ..Default::default()
            }),
            cancel: tokio::sync::watch::channel(false).0,
            stream_bytes: Default::default(),
            wire_bytes: Default::default(),
        });
        lock(&self.migrations).insert(name.to_string(), control.clone());
        let result = self
            .migrate_inner(name, to, id, &vm, op, qmp, spec, accel, &control, started)
            .await;
        lock(&self.migrations).remove(name);
        result
    }

    /// The progress of VM `name`'s migration.
    pub fn migration(&self, name: &str) -> Result<MigrationProgress, AgentError> {
        let c = lock(&self.migrations).get(name).cloned();
        match c {
            Some(c) => {
                let mut p = lock(&c.progress).clone();
                p.wire_bytes = c.wire_bytes.load(std::sync::atomic::Ordering::Relaxed);
                Ok(p)
            }
            None => Err(self.no_migration(name)),
        }
    }

    /// Cancels VM `name`'s migration: it runs on here. Once the
    /// switch-over has begun, it can no longer be cancelled.
    pub fn cancel_migration(&self, name: &str) -> Result<(), AgentError> {
        let c = lock(&self.migrations).get(name).cloned();
        match c {
            Some(c) => {
                c.cancel.send_replace(true);
                Ok(())
            }
            None => Err(self.no_migration(name)),
        }
    }

    fn no_migration(&self, name: &str) -> AgentError {
        match self.vm(name) {
            Err(e) => e,
            Ok(vm) => AgentError::InvalidState {
                name: name.into(),
                op: "show or cancel the migration of",
                state: vm.state(),
                hint: " (no migration of it is running)",
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn migrate_inner(
        self: &Arc<Self>,
        name: &str,
        to: &str,
        id: String,
        vm: &Arc<crate::manager::Vm>,
        op: tokio::sync::MutexGuard<'_, ()>,
        qmp: Arc<Qmp>,
        spec: VmSpec,
        accel: String,
        control: &Arc<MigrationControl>,
        started: Instant,
    ) -> Result<MigrationReport, AgentError> {
        let peers = self.peers.clone().ok_or(PeerError::NoIdentity)?;
        let failed = |detail: String| AgentError::MigrationFailed {
            name: name.into(),
            detail,
        };
        let prepare = serde_json::to_vec(&Prepare {
            id: id.clone(),
            spec: spec.clone(),
            accel,
        })
        .map_err(|e| failed(e.to_string()))?;
        let answer = peers
            .request(to, "migrate-prepare", prepare, Duration::from_secs(60))
            .await?;
        // Pages the destination holds already (a replicated checkpoint).
        let known = dwcp_hde::replica::decode_digests(&answer).unwrap_or_default();
        let known_count = known.len() as u64;
        // Where the destination's versions of pages are found here: our
        // newest checkpoint of the VM, for the pages the destination has.
        let slots = {
            let pages = self.pages.clone();
            let set: std::collections::HashSet<dwcp_hde::Digest> = known.iter().copied().collect();
            let vm_name = name.to_string();
            tokio::task::spawn_blocking(move || -> Vec<((u16, u64), dwcp_hde::Digest)> {
                let Ok(Some(m)) = pages.latest_for(&vm_name) else {
                    return Vec::new();
                };
                let Ok((_, map)) = pages.page_map(&m.id) else {
                    return Vec::new();
                };
                map.iter()
                    .filter(|(_, _, d)| set.contains(d))
                    .map(|(b, p, d)| ((b as u16, p as u64), *d))
                    .collect()
            })
            .await
            .unwrap_or_default()
        };
        let known = (known, slots, self.pages.clone());
        tracing::info!(vm = %name, %to, %id, "migration prepared at the destination");

        let abort_remote = |why: &str| {
            let peers = peers.clone();
            let (to, id, why) = (to.to_string(), id.clone(), why.to_string());
            async move {
                let body = json!({ "id": id, "why": why }).to_string().into_bytes();
                if let Err(e) = peers
                    .request(&to, "migrate-abort", body, Duration::from_secs(20))
                    .await
                {
                    tracing::warn!(peer = %to, "cannot tell the destination to abort: {}", crate::format_chain(&e));
                }
            }
        };

        let sent = self
            .send_stream(
                &vm.dir,
                &qmp,
                &peers,
                to,
                &id,
                spec.memory_bytes,
                control,
                known,
            )
            .await;
        let (stats, rounds, downtime) = match sent {
            Ok(v) => v,
            Err(detail) => {
                lock(&control.progress).status = "aborting".into();
                recover_source(&qmp, name, true).await;
                abort_remote(&detail).await;
                return Err(failed(detail));
            }
        };
        let paused_at = Instant::now();
        lock(&control.progress).status = "switch-over".into();
        let commit = peers
            .request(
                to,
                "migrate-commit",
                json!({ "id": id }).to_string().into_bytes(),
                Duration::from_secs(90),
            )
            .await;
        match commit {
            Ok(_) => {
                let switchover_ms = paused_at.elapsed().as_millis() as u64;
                drop(op);
                // The VM runs at the destination now: end it here.
                if let Err(e) = self.delete(name, true).await {
                    tracing::warn!(vm = %name, "migrated, but the local copy was not removed: {}", crate::format_chain(&e));
                }
                let report = MigrationReport {
                    vm: name.into(),
                    to: to.into(),
                    seconds: started.elapsed().as_secs_f64(),
                    stream_bytes: stats.stream_bytes,
                    wire_bytes: stats.wire_bytes,
                    saved_by_dedup_bytes: stats.saved_by_dedup,
                    saved_by_compression_bytes: stats.saved_by_compression,
                    pages: stats.pages,
                    ref_pages: stats.ref_pages,
                    delta_pages: stats.delta_pages,
                    pages_known_at_destination: known_count,
                    rounds,
                    qemu_downtime_ms: downtime,
                    switchover_ms,
                };
                tracing::info!(vm = %name, %to, seconds = report.seconds, wire_bytes = report.wire_bytes, "migrated");
                Ok(report)
            }
            Err(PeerError::Refused { message, .. }) => {
                recover_source(&qmp, name, true).await;
                Err(failed(format!(
                    "the destination refused to start the VM ({message}); it runs on here"
                )))
            }
            Err(e) => {
                let why = format!(
                    "no answer to the switch-over ({}); the VM stays paused here because {to} may be running it: check there, then resume or delete it here",
                    crate::format_chain(&e)
                );
                let mut c = lock(&vm.cell);
                c.rec.last_error = Some(why.clone());
                self.persist(vm, &c);
                Err(failed(why))
            }
        }
    }

    /// Runs QEMU's migration into a local socket and relays it to the
    /// destination. Returns the encoder's figures, QEMU's rounds and
    /// downtime once QEMU completed and the destination has every byte.
    #[allow(clippy::too_many_arguments)]
    async fn send_stream(
        &self,
        dir: &std::path::Path,
        qmp: &Qmp,
        peers: &Arc<crate::peers::Peers>,
        to: &str,
        id: &str,
        memory_bytes: u64,
        control: &Arc<MigrationControl>,
        known: Known,
    ) -> Result<(WireStats, u64, Option<u64>), String> {
        let sock = dir.join("migrate.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| format!("{}: {e}", sock.display()))?;
        // A window of about one bandwidth-delay product: QEMU then sees the
        // link's rate, not a buffer's.
        let (rtt, rate) = peers
            .link(to)
            .unwrap_or((Duration::from_millis(100), 100e6));
        let bdp = (rate / 8.0 * rtt.as_secs_f64()) as u64;
        let cfg = TransportConfig {
            // Probes are short and so underestimate the rate (slow start):
            // never less than 8 MiB, which still keeps the relay's buffer
            // within a fraction of a second of the link.
            window_bytes: (2 * bdp).clamp(8 << 20, 64 << 20),
            // A destination gone this long fails the migration: the VM
            // runs on here.
            resume_timeout: Duration::from_secs(15),
            ..TransportConfig::default()
        };
        let session = peers
            .data_session(to, cfg)
            .await
            .map_err(|e| crate::format_chain(&e))?;
        let q = |e: dwcp_hypervisor::QmpError| e.to_string();
        qmp.execute("migrate-set-capabilities", Some(capabilities()))
            .await
            .map_err(q)?;
        let limit = (rtt.as_millis() as u64).clamp(300, 2000);
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 64u64 << 30, "downtime-limit": limit })),
        )
        .await
        .map_err(q)?;
        qmp.execute(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", sock.display()) })),
        )
        .await
        .map_err(q)?;
        let conn = match tokio::time::timeout(Duration::from_secs(10), listener.accept()).await {
            Ok(Ok((c, _))) => c,
            _ => return Err("QEMU did not connect to the migration socket".into()),
        };
        let conn = conn
            .into_std()
            .and_then(|c| c.set_nonblocking(false).map(|_| c))
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&sock);
        let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
        let counters = control.clone();
        let encoder =
            tokio::task::spawn_blocking(move || encode_stream(conn, tx, &counters, known));
        let transfer_name = format!("migrate/{id}");
        let transfer = session.send(
            &transfer_name,
            Class::Migration,
            memory_bytes,
            ChanReader::new(rx),
            |_| {},
        );
        let result = async {
            let report = transfer.await.map_err(|e| crate::format_chain(&e))?;
            let stats = encoder.await.map_err(|e| e.to_string())??;
            Ok::<_, String>((report, stats))
        };
        let mut cancel = control.cancel.subscribe();
        let watch = async {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(s) = qmp.execute("query-migrate", None).await {
                    let ram = &s["ram"];
                    let rate = ram["mbps"].as_f64().unwrap_or(0.0) * 1e6;
                    let remaining = ram["remaining"].as_u64().unwrap_or(0);
                    let mut p = lock(&control.progress);
                    p.status = s["status"].as_str().unwrap_or("?").into();
                    p.round = ram["dirty-sync-count"].as_u64().unwrap_or(0);
                    p.stream_bytes = ram["transferred"].as_u64().unwrap_or(0);
                    p.remaining_bytes = remaining;
                    p.rate_bps = rate;
                    p.expected_downtime_ms = s["expected-downtime"].as_u64().unwrap_or(0);
                    p.elapsed_secs = t0.elapsed().as_secs_f64();
                    p.eta_secs = (rate > 0.0).then(|| remaining as f64 * 8.0 / rate);
                }
            }
        };
        let outcome = tokio::select! {
            r = result => r,
            _ = cancel.wait_for(|c| *c) => Err("cancelled".to_string()),
            _ = watch => Err("the progress watcher ended".to_string()),
        };
        let (report, stats) = outcome.inspect_err(|_| session.close())?;
        session.close();
        let status = qmp.execute("query-migrate", None).await.map_err(q)?;
        if status["status"] != "completed" {
            return Err(format!("QEMU's migration ended {}", status["status"]));
        }
        let rounds = status["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        tracing::info!(
            bytes = report.bytes,
            goodput = report.goodput_bps,
            "stream sent"
        );
        Ok((stats, rounds, status["downtime"].as_u64()))
    }

    /// Destination side of requests.
    pub(crate) async fn handle_migration_request(
        self: &Arc<Self>,
        peer: &str,
        kind: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, String> {
        let id = || -> Result<String, String> {
            let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            v["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| "no id".to_string())
        };
        match kind {
            "migrate-prepare" => {
                let p: Prepare =
                    serde_json::from_slice(body).map_err(|e| format!("bad request: {e}"))?;
                let vm = p.spec.name.clone();
                self.prepare_incoming(peer, p)
                    .await
                    .map_err(|e| crate::format_chain(&e))?;
                // Offer what the store holds of this VM: those pages need
                // not travel.
                let pages = self.pages.clone();
                let known = tokio::task::spawn_blocking(move || pages.latest_pages_of(&vm))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                Ok(dwcp_hde::replica::encode_digests(&known))
            }
            "migrate-commit" => self.commit_incoming(&id()?).await.map(|_| Vec::new()),
            "migrate-abort" => {
                self.abort_incoming(&id()?, "the source aborted").await;
                Ok(Vec::new())
            }
            other => Err(format!("unknown request {other:?}")),
        }
    }

    async fn prepare_incoming(self: &Arc<Self>, peer: &str, p: Prepare) -> Result<(), AgentError> {
        let peers = self.peers.clone().ok_or(PeerError::NoIdentity)?;
        let accel = if p.accel == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        let here = self.accel().await.accel;
        if accel != here {
            return Err(AgentError::MigrationFailed {
                name: p.spec.name.clone(),
                detail: format!("it runs under {accel} and this node runs {here}"),
            });
        }
        self.create(p.spec.clone(), false).await?;
        let vm = self.vm(&p.spec.name)?;
        {
            let mut c = lock(&vm.cell);
            c.rec.incoming = true;
            c.rec.state = VmState::Starting;
            self.persist(&vm, &c);
        }
        let sock = vm.dir.join("incoming.sock");
        let _ = std::fs::remove_file(&sock);
        let mut spec = vm.launch_spec(&p.spec, accel, Some(sock.clone()));
        spec.start_paused = true;
        let launched = match launch(&self.qemu, &spec, self.cfg.qmp_timeout).await {
            Ok(l) => {
                let mut c = lock(&vm.cell);
                c.rec.runtime = Some(crate::store::Runtime {
                    pid: l.pid,
                    accel: accel.to_string(),
                    started_unix_ms: 0,
                });
                self.persist(&vm, &c);
                drop(c);
                l
            }
            Err(source) => {
                let _ = self.delete(&p.spec.name, true).await;
                return Err(AgentError::Qemu {
                    name: p.spec.name.clone(),
                    source,
                });
            }
        };
        let incoming = peers.expect(&format!("migrate/{}", p.id));
        let pages = self.pages.clone();
        let from = peer.to_string();
        let fed = tokio::spawn(async move {
            let mut inc = tokio::time::timeout(Duration::from_secs(60), incoming)
                .await
                .map_err(|_| "the stream never came".to_string())?
                .map_err(|_| "the stream never came".to_string())?;
            let mut qemu = tokio::net::UnixStream::connect(&sock)
                .await
                .map_err(|e| format!("QEMU's incoming socket: {e}"))?;
            let t0 = Instant::now();
            let mut dec = match pages.snapshot() {
                Ok(r) => WireDecoder::with_store(r),
                Err(_) => WireDecoder::new(),
            };
            let mut out = Vec::new();
            let mut total = 0u64;
            while let Some(c) = inc.chunks.recv().await {
                match c {
                    Chunk::Data(d) => {
                        out.clear();
                        dec.feed(&d, &mut out)
                            .map_err(|e| format!("from {from}: {e}"))?;
                        qemu.write_all(&out)
                            .await
                            .map_err(|e| format!("QEMU stopped taking the stream: {e}"))?;
                        total += out.len() as u64;
                    }
                    Chunk::Done { .. } => {
                        let _ = qemu.flush().await;
                        tracing::info!(
                            bytes = total,
                            secs = t0.elapsed().as_secs_f64(),
                            "incoming stream fed to QEMU"
                        );
                        return Ok(total);
                    }
                }
            }
            Err("the source abandoned the stream".to_string())
        });
        lock(&self.incoming).insert(
            p.id.clone(),
            IncomingMigration {
                vm: p.spec.name.clone(),
                launched,
                accel,
                fed,
            },
        );
        tracing::info!(vm = %p.spec.name, from = %peer, id = %p.id, "incoming migration prepared");
        Ok(())
    }

    async fn commit_incoming(self: &Arc<Self>, id: &str) -> Result<(), String> {
        tracing::info!(id, "commit asked");
        let Some(mut m) = lock(&self.incoming).remove(id) else {
            return Err(format!("no incoming migration {id}"));
        };
        let fed = match tokio::time::timeout(Duration::from_secs(60), &mut m.fed).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the stream did not end".into()),
        };
        let loaded = match &fed {
            Ok(_) => wait_loaded(&m.launched.qmp, true, Duration::from_secs(60)).await,
            Err(e) => Err(e.clone()),
        };
        tracing::info!(id, "incoming migration loaded; starting the guest");
        let started = match loaded {
            Ok(()) => m
                .launched
                .qmp
                .execute("cont", None)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match started {
            Ok(_) => {
                let vm = self.vm(&m.vm).map_err(|e| e.to_string())?;
                self.adopt(&vm, m.launched, m.accel, false);
                tracing::info!(vm = %m.vm, "incoming migration complete: running here");
                Ok(())
            }
            Err(e) => {
                let why = format!(
                    "{e}; QEMU said: {}",
                    dwcp_hypervisor::qemu::log_tail(
                        &self.vm(&m.vm).map(|v| v.qemu_log()).unwrap_or_default(),
                        3
                    )
                );
                self.drop_incoming(m).await;
                Err(why)
            }
        }
    }

    async fn abort_incoming(self: &Arc<Self>, id: &str, why: &str) {
        let m = lock(&self.incoming).remove(id);
        if let Some(m) = m {
            tracing::info!(vm = %m.vm, "incoming migration aborted: {why}");
            self.drop_incoming(m).await;
        }
        if let Some(p) = &self.peers {
            p.unexpect(&format!("migrate/{id}"));
        }
    }

    async fn drop_incoming(self: &Arc<Self>, mut m: IncomingMigration) {
        m.fed.abort();
        let _ = m.launched.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), m.launched.child.wait()).await;
        if let Err(e) = self.delete(&m.vm, true).await {
            tracing::warn!(vm = %m.vm, "cannot remove the VM of a failed incoming migration: {}", crate::format_chain(&e));
        }
    }
}

/// What the destination holds: page digests, and per page slot the version
/// it has (whose content is in our store).
type Known = (
    Vec<dwcp_hde::Digest>,
    Vec<((u16, u64), dwcp_hde::Digest)>,
    Arc<dwcp_hde::PageStore>,
);

/// Reads QEMU's stream, encodes it for the wire, hands the records on.
fn encode_stream(
    mut conn: UnixStream,
    tx: mpsc::Sender<Vec<u8>>,
    counters: &MigrationControl,
    known: Known,
) -> Result<WireStats, String> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut parser = StreamParser::new();
    let mut enc = WireEncoder::new(1).map_err(|e| e.to_string())?;
    let (digests, slots, store) = known;
    enc.receiver_has(digests);
    if let Ok(reader) = store.snapshot() {
        enc.receiver_slots(slots, reader);
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::with_capacity(2 << 20);
    let mut names: Vec<String> = Vec::new();
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading QEMU's stream: {e}")),
        };
        parser.feed(&buf[..n]);
        loop {
            match parser.next_item() {
                Ok(Some(item)) => {
                    if names.len() != parser.blocks().len() {
                        names = parser.blocks().iter().map(|b| b.name.clone()).collect();
                    }
                    enc.encode(item, &names, &mut out)
                        .map_err(|e| e.to_string())?;
                }
                Ok(None) => break,
                Err(e) => return Err(format!("QEMU's stream: {e}")),
            }
        }
        // Hand on what is there at once: QEMU has sync points.
        counters.stream_bytes.store(
            parser.consumed_bytes(),
            std::sync::atomic::Ordering::Relaxed,
        );
        if !out.is_empty() {
            counters
                .wire_bytes
                .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let chunk = std::mem::replace(&mut out, Vec::with_capacity(2 << 20));
            if tx.blocking_send(chunk).is_err() {
                return Err("the transfer to the destination ended".into());
            }
        }
    }
    parser.finish().map_err(|e| format!("QEMU's stream: {e}"))?;
    Ok(enc.stats())
}

/// An `AsyncRead` over chunks from a channel.
struct ChanReader {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChanReader {
    fn new(rx: mpsc::Receiver<Vec<u8>>) -> ChanReader {
        ChanReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl AsyncRead for ChanReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if self.pos < self.cur.len() {
                let n = (self.cur.len() - self.pos).min(buf.remaining());
                let start = self.pos;
                buf.put_slice(&self.cur[start..start + n]);
                self.pos += n;
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(c)) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
