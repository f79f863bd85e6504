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
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dwcp_api::{VmSpec, VmState};
use dwcp_hde::wire::{WireEncoder, WireStats};
use dwcp_hypervisor::qemu::MAIN_RAM_BLOCK;
use dwcp_hypervisor::{Accel, Launched, MemoryFile, Qmp};
use dwcp_transport::{Chunk, Class, TransportConfig};
use dwcp_vmstream::{Item, StreamParser};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use crate::checkpoint::{capabilities, recover_source, wait_loaded};
use crate::manager::{lock, AgentError, Manager};
use crate::peers::PeerError;

/// What a finished migration did.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationReport {
    pub vm: String,
    pub to: String,
    /// From the request until the guest runs at the destination.
    pub seconds: f64,
    /// Bytes of QEMU's own stream.
    pub stream_bytes: u64,
    /// Bytes that crossed the network (the encoded records).
    pub wire_bytes: u64,
    /// Stream bytes not sent because pages the destination held (a
    /// replica, a footprint, an earlier round, any identical page) went as
    /// references or not at all.
    pub saved_by_dedup_bytes: u64,
    /// Stream bytes saved by sending changed pages as deltas against the
    /// version the destination held (before compression).
    pub saved_by_delta_bytes: u64,
    /// Stream bytes saved by compressing what was left.
    pub saved_by_compression_bytes: u64,
    pub pages: u64,
    pub ref_pages: u64,
    /// Pages sent as a delta against the version the destination held.
    pub delta_pages: u64,
    /// Pages the destination already held (from a replicated checkpoint).
    pub pages_known_at_destination: u64,
    /// Whether the destination preloaded its replica of the VM's
    /// checkpoint into QEMU before the first page came.
    pub preloaded: bool,
    /// Pages not sent at all: the preloaded replica had them in place.
    pub preloaded_pages: u64,
    /// Of the replica's pages, those the destination did not even write
    /// into its QEMU: it mapped them from the replica's memory, laid out
    /// when the replica came (see ARCHITECTURE.md, warm images).
    pub mapped_pages: u64,
    /// The earlier migration between the two nodes whose footprint (the
    /// memory both kept when it ended) the destination offered too (see
    /// ARCHITECTURE.md, footprints).
    pub footprint: Option<String>,
    /// Rounds of dirty-page sync QEMU went through.
    pub rounds: u64,
    /// QEMU's own downtime figure (taken at the source).
    pub qemu_downtime_ms: Option<u64>,
    /// From the source's QEMU completing to the destination's answer that
    /// the guest runs there.
    pub switchover_ms: u64,
    /// The guest's pause, at most: from its stop at the source (QEMU's
    /// STOP event) to the destination's answer that it runs there.
    pub guest_pause_ms: Option<u64>,
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
    stream_bytes: AtomicU64,
    wire_bytes: AtomicU64,
    /// The migration's id, and the record bytes its destination reported
    /// done (flow control: see `encode_stream`).
    id: String,
    done_at_destination: AtomicU64,
    /// The destination has its preload (if any) behind it: QEMU may
    /// switch over.
    destination_ready: AtomicBool,
    /// The destination's QEMU mapped this many of the replica's pages.
    mapped_at_destination: AtomicU64,
    /// Record bytes the destination gets through per second of its own
    /// work (not counting its waits for this side), once ready.
    destination_capacity: AtomicU64,
    /// Wire bytes the destination reported received.
    received_at_destination: AtomicU64,
    /// QEMU is past its first round, or near its end: it may stop the
    /// guest at the end of any round from here on.
    near_the_end: AtomicBool,
    /// The relay's own pace on pages that are not `Same` (what a final
    /// round is made of): stream bytes per second of its work, and wire
    /// bytes per million stream bytes of them (see [`RelayCost`]).
    source_rate: AtomicU64,
    wire_per_million: AtomicU64,
    /// Per chunk handed on and not yet known received: the wire bytes and
    /// the record bytes handed on up to its end; and the record bytes up to
    /// the last chunk known received.
    handed_on: Mutex<(std::collections::VecDeque<(u64, u64)>, u64)>,
    /// When chunks were handed on, with the record bytes up to their end
    /// (the last [`SENT_HISTORY`]).
    sent_at: Mutex<std::collections::VecDeque<(Instant, u64)>>,
}

impl MigrationControl {
    /// Record bytes the destination may have queued: two RTTs of its work
    /// at the rate it showed (what it gets through while its report goes
    /// back and more comes, twice), at least [`MIN_BACKLOG`]; before it
    /// showed one, `guess`. In its own terms because a page sent as a
    /// delta against a replica the destination holds mapped is far less
    /// work than a guess made for all pages: with the guess alone (128 MB
    /// at 100 ms), the relay of a 1 GiB guest with a replica waited 0.7 s
    /// of 2.5 for a destination that itself waited 1.4 s for it.
    fn backlog(&self, guess: u64, rtt: Duration) -> u64 {
        match self.destination_capacity.load(Ordering::Relaxed) as f64 {
            0.0 => guess,
            rate => ((rate * rtt.as_secs_f64() * 2.0) as u64).clamp(MIN_BACKLOG, MAX_BACKLOG),
        }
    }

    /// Record bytes the destination gets through per second of its own
    /// work: as it reported, or a guess until it did.
    fn destination_rate(&self) -> f64 {
        match self.destination_capacity.load(Ordering::Relaxed) {
            0 => DESTINATION_RATE,
            r => r as f64,
        }
    }

    /// Record bytes the destination may have still to do (see
    /// [`Self::behind_beyond_pipe`]) near the end of QEMU's first round and
    /// after: half the downtime limit of its work, at least
    /// [`MIN_FINAL_BACKLOG`]. The other half is QEMU's last round's.
    fn final_backlog(&self, limit: Duration) -> u64 {
        ((self.destination_rate() * limit.as_secs_f64() / 2.0) as u64).max(MIN_FINAL_BACKLOG)
    }

    /// Notes a chunk handed on: the wire and record bytes up to its end.
    fn handed_on(&self, wire: u64, records: u64) {
        lock(&self.handed_on).0.push_back((wire, records));
        let now = Instant::now();
        let mut sent = lock(&self.sent_at);
        sent.push_back((now, records));
        while sent.len() > 2 && now - sent[1].0 > SENT_HISTORY {
            sent.pop_front();
        }
    }

    /// Record bytes the destination has not done of those handed on more
    /// than `pipe` ago (a round trip and a little: what the destination
    /// had time to get, do and report). Those are held up behind a lost
    /// packet or queued there, and the pause would wait for them; the
    /// newer ones are on their way, as the last round's pages will be.
    fn behind_beyond_pipe(&self, pipe: Duration) -> u64 {
        let Some(before) = Instant::now().checked_sub(pipe) else {
            return 0;
        };
        let sent = lock(&self.sent_at)
            .iter()
            .take_while(|(t, _)| *t <= before)
            .last()
            .map_or(0, |&(_, records)| records);
        sent.saturating_sub(self.done_at_destination.load(Ordering::Relaxed))
    }

    /// Record bytes the destination has received and not yet done, as of
    /// its last report. Not what is still on the link: that is the
    /// transport's to bound, and a page sent as a delta is 4 KiB of
    /// records in 50 bytes of link, so counting it (384 MB allowed at 500
    /// ms) held a relay with a replica at a tenth of the link's rate.
    fn queued_at_destination(&self) -> u64 {
        let received = self.received_at_destination.load(Ordering::Relaxed);
        let done = self.done_at_destination.load(Ordering::Relaxed);
        let mut h = lock(&self.handed_on);
        while h.0.front().is_some_and(|&(wire, _)| wire <= received) {
            if let Some((_, records)) = h.0.pop_front() {
                h.1 = records;
            }
        }
        h.1.saturating_sub(done)
    }
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
    /// The source.
    from: String,
    fed: tokio::task::JoinHandle<Result<Option<Held>, String>>,
    /// The image whose copy in memory its QEMU maps: held again if the
    /// migration fails.
    rehold: Option<std::path::PathBuf>,
}

pub(crate) type IncomingMigrations = Mutex<HashMap<String, IncomingMigration>>;

impl Manager {
    /// Moves running VM `name` to peer `to`. See the module docs.
    pub async fn migrate(
        self: &Arc<Self>,
        name: &str,
        to: &str,
        deadline: Option<Duration>,
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
            id: id.clone(),
            done_at_destination: Default::default(),
            destination_ready: Default::default(),
            mapped_at_destination: Default::default(),
            destination_capacity: Default::default(),
            received_at_destination: Default::default(),
            near_the_end: Default::default(),
            source_rate: Default::default(),
            wire_per_million: Default::default(),
            handed_on: Default::default(),
            sent_at: Default::default(),
        });
        lock(&self.migrations).insert(name.to_string(), control.clone());
        let result = self
            .migrate_inner(
                name, to, id, &vm, op, qmp, spec, accel, &control, started, deadline,
            )
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
                p.wire_bytes = c.wire_bytes.load(Ordering::Relaxed);
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
        deadline: Option<Duration>,
    ) -> Result<MigrationReport, AgentError> {
        let peers = self.peers.clone().ok_or(PeerError::NoIdentity)?;
        let deadline =
            deadline.unwrap_or_else(|| default_deadline(spec.memory_bytes, peers.link(to)));
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
        // The data session connects while the destination prepares (each
        // TLS connection costs round trips: seconds on a long link).
        let plan = Plan::of(peers.link(to));
        let (answer, session) = tokio::join!(
            peers.request(to, "migrate-prepare", prepare, Duration::from_secs(60)),
            peers.data_session(to, plan.transport.clone()),
        );
        let answer = answer?;
        let session = session.map_err(|e| {
            let why = crate::format_chain(&e);
            (failed(why.clone()), why)
        });
        // Pages the destination holds already (a replicated checkpoint),
        // and whether it can preload that checkpoint into its QEMU.
        let offer = dwcp_hde::wire::Offer::decode(&answer).unwrap_or_default();
        let known = {
            let (pages, warm) = (self.pages.clone(), self.warm.clone());
            let footprints = self.footprints.clone();
            let (vm_name, peer) = (name.to_string(), to.to_string());
            let memory = spec.memory_bytes;
            tokio::task::spawn_blocking(move || {
                let mut known = plan_known(
                    &pages,
                    &warm,
                    (&vm_name, memory),
                    offer.preload,
                    offer.pages,
                );
                if let Some((id, digest)) = offer.footprint {
                    known.add_footprint(footprints.open(&peer, Some(&id)), digest);
                }
                known.mapped = offer.mapped && known.preload.is_some();
                known
            })
            .await
            .map_err(|e| failed(e.to_string()))?
        };
        let (known_count, footprint) = (known.offered.len() as u64, known.footprint.clone());
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

        let session = match session {
            Ok(s) => s,
            Err((e, why)) => {
                abort_remote(&why).await;
                return Err(e);
            }
        };
        let sent = self
            .send_stream(
                &vm.dir,
                &qmp,
                session,
                &plan,
                &id,
                spec.memory_bytes,
                control,
                known,
                (started + deadline, deadline),
            )
            .await;
        let Sent {
            stats,
            preloaded,
            confirmed,
            stop_unix_us,
            held,
        } = match sent {
            Ok(v) => v,
            Err(detail) => {
                lock(&control.progress).status = "aborting".into();
                recover_source(&qmp, name, true).await;
                abort_remote(&detail).await;
                return Err(failed(detail));
            }
        };
        let paused_at = Instant::now();
        tracing::debug!("QEMU completed: asking the destination to commit");
        lock(&control.progress).status = "switch-over".into();
        let (commit, confirmed, (rounds, downtime)) = tokio::join!(
            peers.request(
                to,
                "migrate-commit",
                json!({ "id": id }).to_string().into_bytes(),
                Duration::from_secs(90),
            ),
            confirmed,
            Self::qemu_figures(&qmp),
        );
        if let Err(e) = confirmed {
            // The destination's answer says whether it has it all.
            tracing::warn!(vm = %name, "the stream's confirmation failed: {e}");
        }
        match commit {
            Ok(_) => {
                // The guest runs at the destination: the migration's time
                // ends here (the local copy's removal is housekeeping).
                let seconds = started.elapsed().as_secs_f64();
                let switchover_ms = paused_at.elapsed().as_millis() as u64;
                let guest_pause_ms = stop_unix_us
                    .map(|us| (crate::manager::now_unix_ms() * 1000).saturating_sub(us) / 1000);
                drop(op);
                if let Some((block, held)) = held {
                    self.footprints.keep(to, &id, block, held);
                }
                // The VM runs at the destination now: end it here.
                if let Err(e) = self.delete(name, true).await {
                    tracing::warn!(vm = %name, "migrated, but the local copy was not removed: {}", crate::format_chain(&e));
                }
                let report = MigrationReport {
                    vm: name.into(),
                    to: to.into(),
                    seconds,
                    stream_bytes: stats.stream_bytes,
                    wire_bytes: stats.wire_bytes,
                    saved_by_dedup_bytes: stats.saved_by_dedup,
                    saved_by_delta_bytes: stats.saved_by_delta,
                    saved_by_compression_bytes: stats.saved_by_compression,
                    pages: stats.pages,
                    ref_pages: stats.ref_pages,
                    delta_pages: stats.delta_pages,
                    preloaded,
                    preloaded_pages: stats.same_pages,
                    mapped_pages: control.mapped_at_destination.load(Ordering::Relaxed),
                    pages_known_at_destination: known_count,
                    footprint,
                    rounds,
                    qemu_downtime_ms: downtime,
                    switchover_ms,
                    guest_pause_ms,
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
        session: dwcp_transport::Session,
        plan: &Plan,
        id: &str,
        memory_bytes: u64,
        control: &Arc<MigrationControl>,
        known: Known,
        (deadline, allowed): (Instant, Duration),
    ) -> Result<Sent, String> {
        let sock = dir.join("migrate.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| format!("{}: {e}", sock.display()))?;
        let Plan {
            backlog,
            rtt,
            link_rate,
            ..
        } = *plan;
        let q = |e: dwcp_hypervisor::QmpError| e.to_string();
        qmp.execute("migrate-set-capabilities", Some(capabilities()))
            .await
            .map_err(q)?;
        let limit = Duration::from_millis((rtt.as_millis() as u64).clamp(300, 2000));
        // While the destination preloads its replica, QEMU may not switch
        // over (the pause would wait for the preload), nor during its
        // first round (see [`SwitchOver`]). Telling it the switch-over has
        // 8 KB/s makes its threshold less than a page, so it goes on with
        // its rounds. (A downtime limit of 0 does not hold it: QEMU
        // completes whenever its estimate of what is left reads 0, as it
        // does at the end of every round.)
        let mut preloading = known.preload.is_some();
        let mut switchover = SwitchOver::new(limit, link_rate);
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({
                "max-bandwidth": 64u64 << 30,
                "downtime-limit": limit.as_millis() as u64,
                "avail-switchover-bandwidth": HOLD_SWITCHOVER_BPS,
                // Nor may auto-converge throttle the guest to a standstill
                // while the preload goes on (nothing dirty completes the
                // migration too).
                "cpu-throttle-initial": if preloading { 1 } else { 20 },
                "max-cpu-throttle": if preloading { 1 } else { 99 },
            })),
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
        let mut events = qmp.events();
        let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
        let counters = control.clone();
        let encoder = tokio::task::spawn_blocking(move || {
            encode_stream(conn, tx, &counters, known, (backlog, rtt, limit))
        });
        let transfer = tokio::spawn({
            let (session, name) = (session.clone(), format!("migrate/{id}"));
            async move {
                session
                    .send(
                        &name,
                        Class::Migration,
                        memory_bytes,
                        ChanReader::new(rx),
                        |_| {},
                    )
                    .await
            }
        });
        // QEMU is done when the encoder is: its last bytes are on their
        // way, and the destination starts the guest only once it has fed
        // them all to its QEMU, so the switch-over need not wait for the
        // transfer's confirmation (a round trip more).
        let result = async { encoder.await.map_err(|e| e.to_string())? };
        let mut cancel = control.cancel.subscribe();
        let watch = async {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                let ready = control.destination_ready.load(Ordering::Relaxed);
                let queued = control.queued_at_destination();
                if preloading && ready && queued <= control.backlog(backlog, rtt) {
                    let p = json!({ "cpu-throttle-initial": 20, "max-cpu-throttle": 99 });
                    if qmp.execute("migrate-set-parameters", Some(p)).await.is_ok() {
                        tracing::info!("the destination is ready: switch-over allowed");
                        preloading = false;
                    }
                }
                let Ok(s) = qmp.execute("query-migrate", None).await else {
                    continue;
                };
                let ram = &s["ram"];
                let rate = ram["mbps"].as_f64().unwrap_or(0.0) * 1e6;
                let remaining = ram["remaining"].as_u64().unwrap_or(0);
                let round = ram["dirty-sync-count"].as_u64().unwrap_or(0);
                // Less than what QEMU sends in three of these looks is left
                // of the first round: what the destination has to do is
                // bounded from here on (see `encode_stream`).
                if round >= 2
                    || (remaining as f64) < rate / 8.0 * 3.0 * WATCH_INTERVAL.as_secs_f64()
                {
                    control.near_the_end.store(true, Ordering::Relaxed);
                }
                let path = Path {
                    round,
                    ready: ready && !preloading,
                    source_rate: control.source_rate.load(Ordering::Relaxed) as f64,
                    destination_rate: control.destination_rate(),
                    wire_per_stream_byte: control.wire_per_million.load(Ordering::Relaxed) as f64
                        / 1e6,
                    received_wire_bytes: control.received_at_destination.load(Ordering::Relaxed),
                    behind_at_destination: control.behind_beyond_pipe(pipe_of(rtt)),
                };
                if let Some(bps) = switchover.update(Instant::now(), &path) {
                    let p = json!({ "avail-switchover-bandwidth": bps });
                    if qmp
                        .execute("migrate-set-parameters", Some(p))
                        .await
                        .is_err()
                    {
                        switchover.forget_told();
                    }
                }
                tracing::debug!(
                    round,
                    remaining,
                    qemu_mbps = rate / 1e6,
                    told_bps = switchover.told(),
                    ?path,
                    "migration status"
                );
                let mut p = lock(&control.progress);
                p.status = s["status"].as_str().unwrap_or("?").into();
                p.round = round;
                p.stream_bytes = ram["transferred"].as_u64().unwrap_or(0);
                p.remaining_bytes = remaining;
                p.rate_bps = rate;
                p.expected_downtime_ms = s["expected-downtime"].as_u64().unwrap_or(0);
                p.elapsed_secs = t0.elapsed().as_secs_f64();
                p.eta_secs = (rate > 0.0).then(|| remaining as f64 * 8.0 / rate);
            }
        };
        let outcome = tokio::select! {
            r = result => r,
            _ = cancel.wait_for(|c| *c) => Err("cancelled".to_string()),
            _ = tokio::time::sleep_until(deadline.into()) => {
                let p = lock(&control.progress).clone();
                Err(format!(
                    "it did not finish within its deadline ({:.0} s): round {}, {} still dirty, sent at {:.0} Mbit/s; the guest dirties memory faster than the link carries it (a longer --deadline, or a quieter guest)",
                    allowed.as_secs_f64(),
                    p.round,
                    dwcp_api::format_bytes(p.remaining_bytes),
                    p.rate_bps / 1e6,
                ))
            }
            _ = watch => Err("the progress watcher ended".to_string()),
        };
        let mut stop_unix_us = None;
        let ended = async {
            let stats = outcome?;
            completed(qmp, &mut events, &mut stop_unix_us).await?;
            Ok::<_, String>(stats)
        };
        let encoded = ended.await.inspect_err(|_| {
            session.close();
            transfer.abort();
        })?;
        let Encoded {
            stats,
            preloaded,
            held,
        } = encoded;
        let confirmed = Box::pin(async move {
            let r = match transfer.await {
                Ok(Ok(report)) => {
                    tracing::info!(
                        bytes = report.bytes,
                        goodput = report.goodput_bps,
                        frames = report.frames_sent,
                        resent = report.retransmitted_frames,
                        streams = report.streams_max,
                        reconnects = report.reconnects,
                        "stream sent"
                    );
                    Ok(())
                }
                Ok(Err(e)) => Err(crate::format_chain(&e)),
                Err(e) => Err(e.to_string()),
            };
            // Kept open for the next transfer to the peer if it went well
            // (see `Peers::data_session`).
            if r.is_err() {
                session.close();
            }
            r
        });
        Ok(Sent {
            stats,
            preloaded,
            held,
            confirmed,
            stop_unix_us,
        })
    }

    /// QEMU's rounds and own downtime figure, once it completed.
    async fn qemu_figures(qmp: &Qmp) -> (u64, Option<u64>) {
        match qmp.execute("query-migrate", None).await {
            Ok(s) => (
                s["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                s["downtime"].as_u64(),
            ),
            Err(_) => (0, None),
        }
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
                // Offer what the store holds of this VM: those pages need
                // not travel; a checkpoint of it from this very peer can be
                // preloaded.
                // And the footprint of the last migration with this peer.
                let (pages, warm) = (self.pages.clone(), self.warm.clone());
                let footprints = self.footprints.clone();
                let (vm, size) = (p.spec.name.clone(), p.spec.memory_bytes);
                let from = peer.to_string();
                let offer = tokio::task::spawn_blocking(move || {
                    let mut offer = offer_of(&pages, &warm, &vm, size, &from);
                    offer.footprint = footprints.open(&from, None);
                    offer
                })
                .await
                .map_err(|e| e.to_string())?;
                let answer = dwcp_hde::wire::Offer {
                    preload: offer.preload.as_ref().map(|(theirs, _)| theirs.clone()),
                    footprint: offer.footprint.as_ref().map(|f| (f.id.clone(), f.digest)),
                    mapped: offer.preload.is_some() && offer.image.is_some(),
                    // With a preload the source has the pages.
                    pages: match offer.preload {
                        Some(_) => Vec::new(),
                        None => offer.digests.clone(),
                    },
                }
                .encode();
                self.prepare_incoming(peer, p, offer)
                    .await
                    .map_err(|e| crate::format_chain(&e))?;
                Ok(answer)
            }
            "migrate-commit" => self.commit_incoming(&id()?).await.map(|_| Vec::new()),
            "migrate-progress" => {
                let v: serde_json::Value =
                    serde_json::from_slice(body).map_err(|e| e.to_string())?;
                let id = v["id"].as_str().ok_or("no id")?;
                let done = v["done"].as_u64().ok_or("no progress figure")?;
                let c = lock(&self.migrations)
                    .values()
                    .find(|c| c.id == id)
                    .cloned();
                if let Some(c) = c {
                    c.done_at_destination.fetch_max(done, Ordering::Relaxed);
                    if v["ready"] == true {
                        c.destination_ready.store(true, Ordering::Relaxed);
                    }
                    if let Some(m) = v["mapped"].as_u64() {
                        c.mapped_at_destination.store(m, Ordering::Relaxed);
                    }
                    if let Some(r) = v["capacity"].as_u64() {
                        c.destination_capacity.store(r, Ordering::Relaxed);
                    }
                    if let Some(r) = v["received"].as_u64() {
                        c.received_at_destination.fetch_max(r, Ordering::Relaxed);
                    }
                }
                Ok(Vec::new())
            }
            "migrate-abort" => {
                self.abort_incoming(&id()?, "the source aborted").await;
                Ok(Vec::new())
            }
            other => Err(format!("unknown request {other:?}")),
        }
    }

    async fn prepare_incoming(
        self: &Arc<Self>,
        peer: &str,
        p: Prepare,
        offer: Offer,
    ) -> Result<(), AgentError> {
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
        // The replica's memory: its copy held in memory, mapped shared (and
        // so used up), else its image on disk, mapped privately.
        let held = (offer.image.as_deref()).and_then(|i| self.warm.take(&p.spec.name, i));
        let (memory_file, replica_memory) = match (&held, &offer.image) {
            (Some(h), _) => (Some(MemoryFile::Shared(h.path())), "held"),
            (None, Some(i)) => (Some(MemoryFile::Private(i.clone())), "image"),
            (None, None) => (None, "none"),
        };
        spec.memory_file = memory_file;
        // (If this migration fails, the copy is made again.)
        let rehold = held.as_ref().map(|h| h.image().to_owned());
        let launched = self.launch_qemu(&spec).await;
        // QEMU has mapped the held memory (it answers QMP only after).
        drop(held);
        let launched = match launched {
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
                if let Some(image) = rehold {
                    self.warm.hold_in_background(p.spec.name.clone(), image);
                }
                return Err(AgentError::Qemu {
                    name: p.spec.name.clone(),
                    source,
                });
            }
        };
        let incoming = peers.expect(&format!("migrate/{}", p.id));
        let pages = self.pages.clone();
        let from = peer.to_string();
        let id = p.id.clone();
        let me = Arc::downgrade(self);
        let fed = tokio::spawn(async move {
            let r = feed_incoming(incoming, sock, peers, pages, from, id.clone(), offer).await;
            // A stream that broke off (link cut, source gone) ends the
            // incoming migration here: no half-loaded VM is left behind.
            if let (Err(why), Some(me)) = (&r, me.upgrade()) {
                let why = why.clone();
                tokio::spawn(async move { me.abort_incoming(&id, &why).await });
            }
            r
        });
        lock(&self.incoming).insert(
            p.id.clone(),
            IncomingMigration {
                vm: p.spec.name.clone(),
                launched,
                accel,
                from: peer.to_string(),
                fed,
                rehold,
            },
        );
        tracing::info!(vm = %p.spec.name, from = %peer, id = %p.id, replica_memory = %replica_memory, "incoming migration prepared");
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
                if let Ok(Some((block, held))) = fed {
                    self.footprints.keep(&m.from, id, block, held);
                }
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
        if let Some(image) = m.rehold {
            self.warm.hold_in_background(m.vm, image);
        }
    }
}

/// Five times what `memory` takes at the link's measured rate, at least
/// two minutes.
fn default_deadline(memory: u64, link: Option<(Duration, f64)>) -> Duration {
    let rate = link.map_or(10e6, |(_, r)| r.max(1e6));
    Duration::from_secs_f64((memory as f64 * 8.0 / rate * 5.0).max(120.0))
}

/// How a migration uses the link, from its last measured RTT and goodput.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    rtt: Duration,
    /// The link's goodput as last measured (bytes per second), if it was.
    link_rate: Option<f64>,
    /// Record bytes the destination may have still to do.
    backlog: u64,
    pub(crate) transport: TransportConfig,
}

impl Plan {
    pub(crate) fn of(link: Option<(Duration, f64)>) -> Plan {
        let (rtt, rate) = link.unwrap_or((Duration::from_millis(100), 100e6));
        let bdp = (rate / 8.0 * rtt.as_secs_f64()) as u64;
        Plan {
            rtt,
            link_rate: link.map(|(_, bps)| bps / 8.0),
            // What the destination may have still to do until it showed
            // its rate (see `MigrationControl::backlog`): a guess of five
            // RTTs of its work. It counts what is on the link and in the
            // reports' way back too, and a page sent as a delta is 4 KiB
            // of work for a few bytes of link, so with less (1.5 RTTs) the
            // relay of a 1 GiB guest at 100 ms waited 6 s of 17 for it
            // while the link had room. Never far behind either: its
            // backlog adds to the guest's pause.
            backlog: ((rtt.as_secs_f64() * 5.0 * DESTINATION_RATE) as u64)
                .clamp(32 << 20, 384 << 20),
            transport: TransportConfig {
                // At 500 ms RTT two connections took 8 s to reach the
                // link's rate, eight 5 s (`dwcp transfer send --streams`,
                // 300 MB, 200 Mbit/s, 1 % loss). At 100 ms one BBR
                // connection fills the link, and a second one (with the
                // relay's CPU-bound, bursty writes) overflowed the
                // bottleneck's queue: a 1 GiB migration put 335 MB on the
                // link with one connection, 339-463 MB with two, and took
                // 15-17 s against 17-18 s.
                auto_start: (rtt.as_millis() as usize / 80).clamp(1, 8),
                // The window covers what is in flight while losses are
                // repaired: a frame held up by one holds the in-order point
                // for an RTT or more, on some connection nearly always.
                // Measured with `dwcp transfer send --window-mib` at 500
                // ms RTT and 1 % loss on 200 Mbit/s (BDP 12.5 MB): 31 MiB
                // gave 120 Mbit/s in steady state, 64 MiB 156, 128 MiB
                // 196. Probes are short and underestimate the rate, so it
                // is sized for 2 Gbit/s at the measured RTT; what it costs
                // is memory here, not queueing (see `max_unsent_bytes`).
                window_bytes: ((rtt.as_secs_f64() * 2e9 / 8.0) as u64)
                    .max(8 * bdp)
                    .clamp(16 << 20, 256 << 20),
                // Nothing queues here beyond what keeps the connections
                // busy: QEMU sees the link's pace, and the pause does not
                // wait for a queue to drain.
                max_unsent_bytes: Some(UNSENT_BYTES),
                // A destination gone this long fails the migration: the VM
                // runs on here.
                resume_timeout: Duration::from_secs(15),
                ..TransportConfig::default()
            },
        }
    }
}

/// The most stream bytes queued at the source for a connection.
const UNSENT_BYTES: u64 = 4 << 20;

/// Record bytes a destination rebuilds per second, about (store reads,
/// hashing, writing to QEMU), for the flow control's budget.
const DESTINATION_RATE: f64 = 256e6;

/// A source silent this long is taken for gone (the destination drops its
/// half of the migration).
const SILENCE: Duration = Duration::from_secs(30);

/// What QEMU is told the switch-over's bandwidth is while the destination
/// preloads (bytes per second): its threshold stays under one page.
const HOLD_SWITCHOVER_BPS: u64 = 8192;

/// Bounds on the record bytes a destination may have queued, once it
/// showed its rate.
const MIN_BACKLOG: u64 = 32 << 20;
const MAX_BACKLOG: u64 = 1 << 30;

/// How far back the source remembers when it handed on what (see
/// [`MigrationControl::behind_beyond_pipe`]).
const SENT_HISTORY: Duration = Duration::from_secs(5);

/// What the destination had time to get, do and report of what was sent:
/// a round trip, a quarter more, and its report interval.
fn pipe_of(rtt: Duration) -> Duration {
    rtt + rtt / 4 + Duration::from_millis(50)
}

/// The least the destination may have still to do near the end of QEMU's
/// first round and after it
/// (record bytes; see [`MigrationControl::final_backlog`]).
const MIN_FINAL_BACKLOG: u64 = 16 << 20;

/// The destination's backlog allowed while it preloads (record bytes,
/// the preload's pages counted): the first round starts when about this
/// much of the preload is left.
const HOLD_BACKLOG: u64 = 128 << 20;

/// Waits for QEMU's word that its migration completed: its `MIGRATION`
/// event, which is usually there already when the relay has read the
/// stream to its end (QEMU closes the socket after it); a query costs a
/// monitor round trip, 100 ms on a busy QEMU, and the commit waits for it.
/// Notes the guest's `STOP` on the way.
async fn completed(
    qmp: &Qmp,
    events: &mut tokio::sync::broadcast::Receiver<dwcp_hypervisor::QmpEvent>,
    stop_unix_us: &mut Option<u64>,
) -> Result<(), String> {
    use tokio::sync::broadcast::error::RecvError;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(ev)) if ev.name == "STOP" => *stop_unix_us = ev.timestamp_us,
            Ok(Ok(ev)) if ev.name == "MIGRATION" => match ev.data["status"].as_str() {
                Some("completed") => return Ok(()),
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(format!("QEMU's migration ended {s:?}"))
                }
                _ => {}
            },
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
            // No event (QEMU's monitor gone quiet, events lost): ask.
            Ok(Err(RecvError::Closed)) | Err(_) => break,
        }
    }
    let status = qmp
        .execute("query-migrate", None)
        .await
        .map_err(|e| e.to_string())?;
    match status["status"].as_str() {
        Some("completed") => Ok(()),
        _ => Err(format!("QEMU's migration ended {}", status["status"])),
    }
}

/// How often the source looks at QEMU's progress and retunes its
/// switch-over.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The best rate of a growing counter over windows of about a second.
#[derive(Default)]
struct BestRate {
    samples: std::collections::VecDeque<(Instant, u64)>,
    best: f64,
}

impl BestRate {
    /// Takes the counter's value at `now`; returns the best rate so far
    /// (per second).
    fn update(&mut self, now: Instant, count: u64) -> f64 {
        self.samples.push_back((now, count));
        while self.samples.len() > 2 && now - self.samples[1].0 >= Duration::from_secs(1) {
            self.samples.pop_front();
        }
        if let Some(&(t, c)) = self.samples.front() {
            let secs = (now - t).as_secs_f64();
            if secs >= 0.9 {
                self.best = self.best.max(count.saturating_sub(c) as f64 / secs);
            }
        }
        self.best
    }
}

/// What the source knows of the path, for [`SwitchOver::update`].
#[derive(Clone, Copy, Debug, Default)]
struct Path {
    /// QEMU's dirty-sync count: 1 during the first round.
    round: u64,
    /// The destination is past its preload (if any) and the source's hold
    /// for it.
    ready: bool,
    /// Stream bytes per second the relay gets through on pages it sends
    /// (not `Same`): deltas, references, whole pages.
    source_rate: f64,
    /// Record bytes per second of the destination's own work (or a guess).
    destination_rate: f64,
    /// Wire bytes per stream byte of such pages.
    wire_per_stream_byte: f64,
    /// Wire bytes the destination has received.
    received_wire_bytes: u64,
    /// Record bytes handed on more than a round trip ago and not yet done
    /// at the destination: held up behind a lost packet, or queued there.
    behind_at_destination: u64,
}

/// Chooses what QEMU is told the switch-over's bandwidth is. QEMU stops
/// the guest once what is dirty would take less than its downtime limit at
/// that rate; what the pause really is, is the time the path (the relay,
/// the link, the destination) takes for those pages, plus the
/// destination's backlog, plus the way across. So QEMU is told:
///
/// - nothing it could switch over on (8 KB/s: less than a page within the
///   limit) during its first round (a relay that skips the pages a replica
///   holds reads it at GB/s, and QEMU then stopped the guest with the rest
///   of the round unsent) and while the destination preloads;
/// - then the slowest of the path's three stages for pages that travel:
///   the relay's own rate on them, the destination's, and the link's rate
///   over the wire bytes such a page takes (the best second of wire bytes
///   seen arriving, or the link's probed goodput if higher);
/// - less what the destination has still to do of what was sent a round
///   trip ago or earlier (held up behind a lost packet, queued there):
///   with half the
///   limit's worth, QEMU gets half the limit's worth of pages; with the
///   whole limit's, nothing (the guest runs on while it drains). On a long
///   lossy link a lost packet holds up everything behind it for an RTT or
///   more, and the destination then gets it all at once: counting only
///   what it had received, a migration at 500 ms RTT stopped the guest
///   with 240 MB of the destination's work (a second) in the way.
///
/// The best second of the destination's progress, told before, read a
/// first round with a replica as a few MB/s (most of it pages that cost
/// nothing) and held QEMU for seconds; QEMU's own measure (pages skipped
/// count at GB/s) let it stop the guest with a second of the destination's
/// work left.
struct SwitchOver {
    limit: Duration,
    link_rate: Option<f64>,
    wire: BestRate,
    /// The rate last told to QEMU.
    told: Option<u64>,
}

impl SwitchOver {
    fn new(limit: Duration, link_rate: Option<f64>) -> SwitchOver {
        SwitchOver {
            limit,
            link_rate,
            wire: BestRate::default(),
            // QEMU starts held (see `send_stream`).
            told: Some(HOLD_SWITCHOVER_BPS),
        }
    }

    /// The rate to tell QEMU now, if it differs from the last told by a
    /// fifth or more (or holds or releases QEMU).
    fn update(&mut self, now: Instant, p: &Path) -> Option<u64> {
        let wire_rate = self
            .wire
            .update(now, p.received_wire_bytes)
            .max(self.link_rate.unwrap_or(0.0));
        let want = self.rate(p, wire_rate);
        let told = self.told.unwrap_or(0);
        let changed = (want == HOLD_SWITCHOVER_BPS) != (told == HOLD_SWITCHOVER_BPS)
            || want.abs_diff(told) * 5 > told;
        (self.told.is_none() || changed).then(|| {
            self.told = Some(want);
            want
        })
    }

    fn rate(&self, p: &Path, wire_rate: f64) -> u64 {
        if !p.ready || p.round < 2 {
            return HOLD_SWITCHOVER_BPS;
        }
        let destination = p.destination_rate;
        let link = match p.wire_per_stream_byte {
            w if w > 0.0 && wire_rate > 0.0 => wire_rate / w,
            _ => f64::INFINITY,
        };
        // Not measured yet (little was sent): as fast as the destination.
        let source = if p.source_rate > 0.0 {
            p.source_rate
        } else {
            destination
        };
        let path = source.min(destination).min(link);
        let limit = self.limit.as_secs_f64();
        let backlog = p.behind_at_destination as f64 / destination;
        let left = (limit - backlog) / limit;
        if left < 0.1 {
            return HOLD_SWITCHOVER_BPS;
        }
        ((path * left) as u64).max(HOLD_SWITCHOVER_BPS + 1)
    }

    /// The rate last told to QEMU.
    fn told(&self) -> Option<u64> {
        self.told
    }

    /// QEMU did not take the last rate: tell it again next time.
    fn forget_told(&mut self) {
        self.told = None;
    }
}

/// What the source's side of a migration did.
struct Sent {
    stats: WireStats,
    preloaded: bool,
    /// The transfer's end: the destination confirmed length and hash.
    confirmed: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>,
    /// When the source guest stopped (QEMU's clock, microseconds).
    stop_unix_us: Option<u64>,
    /// What the destination holds now of the main memory (its block and
    /// length): the migration's footprint.
    held: Option<Held>,
}

/// Pages of the main memory both sides hold at a migration's end, with the
/// block's index and length.
type Held = ((u16, u64), dwcp_hde::HeldPages);

/// What the encoder did.
struct Encoded {
    stats: WireStats,
    preloaded: bool,
    held: Option<Held>,
}

/// What the destination holds, as the source plans for it.
pub(crate) struct Known {
    /// Pages it offered, in its order.
    offered: Vec<dwcp_hde::Digest>,
    /// Per page slot, the version it holds (delta bases; with a preload,
    /// what its QEMU will hold).
    slots: Vec<((u16, u64), dwcp_hde::Digest)>,
    /// The checkpoint it preloads (ours) and that checkpoint's blocks.
    preload: Option<(String, Vec<dwcp_hde::BlockInfo>)>,
    store: Arc<dwcp_hde::PageStore>,
    /// Where offered pages are laid out here (delta bases): that
    /// checkpoint's memory, a footprint.
    images: Vec<dwcp_hde::MemoryImage>,
    /// Per page slot, an offered page at the same place in a footprint.
    likely: Vec<((u16, u64), dwcp_hde::Digest)>,
    /// That footprint's migration.
    footprint: Option<String>,
    /// Its QEMU maps the preload's main memory from a file: that part of
    /// the preload is done before the first page comes.
    mapped: bool,
}

impl Known {
    /// The destination offered footprint `f` (its index's digest
    /// `digest`): its pages are offered too, after the others, if it is
    /// ours as well.
    fn add_footprint(&mut self, f: Option<crate::footprint::Footprint>, digest: dwcp_hde::Digest) {
        let Some(f) = f.filter(|f| f.digest == digest) else {
            tracing::info!("the destination's footprint is not one this node holds: without it");
            return;
        };
        tracing::info!(footprint = %f.id, pages = f.index.len(), "the destination holds the footprint of an earlier migration");
        self.offered.extend(f.pages());
        self.likely = f.index.iter().map(|&(p, d)| ((f.block, p), d)).collect();
        self.images.push(f.image);
        self.footprint = Some(f.id);
    }
}

/// Plans what the destination holds from its offer: with a preload, the
/// slots and pages of that checkpoint (ours; the offer leaves the pages
/// out); else those of our newest checkpoint of the VM whose pages it has.
fn plan_known(
    store: &Arc<dwcp_hde::PageStore>,
    warm: &crate::warm::WarmImages,
    (vm, memory_bytes): (&str, u64),
    preload: Option<String>,
    offered: Vec<dwcp_hde::Digest>,
) -> Known {
    let slots_of = |map: &dwcp_hde::PageMap, keep: &dyn Fn(&dwcp_hde::Digest) -> bool| {
        map.nonzero_pages()
            .filter(|(_, _, d)| keep(d))
            .map(|(b, p, d)| ((b, p), d))
            .collect::<Vec<_>>()
    };
    let mut known = Known {
        offered,
        slots: Vec::new(),
        preload: None,
        store: store.clone(),
        images: Vec::new(),
        likely: Vec::new(),
        footprint: None,
        mapped: false,
    };
    if let Some(id) = preload {
        match store.page_map(&id) {
            Ok((m, map)) if m.vm == vm => {
                known.slots = slots_of(&map, &|_| true);
                known.offered = map.distinct_pages();
                known.images.extend(warm.open(&m, &map, memory_bytes));
                known.preload = Some((id, m.blocks));
                return known;
            }
            _ => {
                tracing::info!(vm, checkpoint = %id, "the destination's replica is not ours any more: no preload")
            }
        }
    }
    let set: std::collections::HashSet<dwcp_hde::Digest> = known.offered.iter().copied().collect();
    if let Ok(Some(m)) = store.latest_for(vm) {
        if let Ok((_, map)) = store.page_map(&m.id) {
            known.slots = slots_of(&map, &|d| set.contains(d));
        }
    }
    known
}

/// What a destination offers a migration of VM `vm` from `peer`.
pub(crate) struct Offer {
    digests: Vec<dwcp_hde::Digest>,
    /// A checkpoint of the VM replicated from `peer`: its id there, and here.
    preload: Option<(String, String)>,
    /// That checkpoint's main memory as a file, when it is laid out: QEMU
    /// maps it, and only the other blocks are preloaded.
    image: Option<std::path::PathBuf>,
    /// The last migration's footprint with `peer`: its pages are offered
    /// after `digests` (if the source holds it too).
    footprint: Option<crate::footprint::Footprint>,
}

fn offer_of(
    store: &dwcp_hde::PageStore,
    warm: &crate::warm::WarmImages,
    vm: &str,
    memory_bytes: u64,
    peer: &str,
) -> Offer {
    let Ok(Some((m, digests))) = store.latest_pages_of(vm) else {
        return Offer {
            digests: Vec::new(),
            preload: None,
            image: None,
            footprint: None,
        };
    };
    let preload = match (&m.origin, m.id.strip_prefix(&format!("{peer}:"))) {
        (Some(o), Some(theirs)) if o == peer => Some((theirs.to_string(), m.id.clone())),
        _ => None,
    };
    let image = preload
        .as_ref()
        .and_then(|(_, here)| warm.find(vm, here, memory_bytes));
    Offer {
        digests,
        preload,
        image,
        footprint: None,
    }
}

/// Destination: waits for the source's transfer, then feeds it to QEMU
/// (see [`feed_qemu`]) while telling the source how far it got.
async fn feed_incoming(
    incoming: tokio::sync::oneshot::Receiver<dwcp_transport::Incoming>,
    sock: std::path::PathBuf,
    peers: Arc<crate::peers::Peers>,
    pages: Arc<dwcp_hde::PageStore>,
    from: String,
    id: String,
    offer: Offer,
) -> Result<Option<Held>, String> {
    let inc = tokio::time::timeout(Duration::from_secs(60), incoming)
        .await
        .map_err(|_| "the stream never came".to_string())?
        .map_err(|_| "the stream never came".to_string())?;
    let qemu = tokio::net::UnixStream::connect(&sock)
        .await
        .and_then(|s| s.into_std())
        .and_then(|s| s.set_nonblocking(false).map(|_| s))
        .map_err(|e| format!("QEMU's incoming socket: {e}"))?;
    // QEMU reads its incoming stream 32 KiB at a time: with the default
    // buffer (about 200 KB) the feed and QEMU took turns (the feed waited
    // 1.5 s of a 3 s migration for QEMU, and QEMU for the feed).
    dwcp_transport::set_socket_buffer(
        std::os::fd::AsRawFd::as_raw_fd(&qemu),
        dwcp_transport::SocketBuffer::Send,
        16 << 20,
    );
    let fed = Arc::new(Fed::default());
    let reporter = tokio::spawn(report_progress(peers, from.clone(), id, fed.clone()));
    let r =
        tokio::task::spawn_blocking(move || feed_qemu(inc.chunks, qemu, &pages, offer, &from, fed))
            .await
            .map_err(|e| e.to_string());
    reporter.abort();
    r?
}

/// How far the destination got, for its reports to the source.
#[derive(Default)]
struct Fed {
    /// Record bytes written into QEMU.
    done: AtomicU64,
    /// Past the block list, and the preload (if one was asked for) done.
    ready: AtomicBool,
    /// Preloaded pages QEMU held in place (its memory mapped from the
    /// replica's image).
    mapped: AtomicU64,
    /// Record bytes per second of this side's own work since ready (see
    /// [`MigrationControl::backlog`]).
    capacity: AtomicU64,
    /// Wire bytes received (done or queued here).
    received: AtomicU64,
}

/// Destination: decodes the transfer into QEMU's incoming socket, first
/// preloading the replica the source asked for. Returns the pages both
/// sides hold now.
fn feed_qemu(
    mut chunks: mpsc::Receiver<Chunk>,
    mut qemu: UnixStream,
    store: &Arc<dwcp_hde::PageStore>,
    mut offer: Offer,
    from: &str,
    fed: Arc<Fed>,
) -> Result<Option<Held>, String> {
    let done = &fed.done;
    let t0 = Instant::now();
    let reader = store.snapshot().map_err(|e| e.to_string())?;
    let mut offered = std::mem::take(&mut offer.digests);
    let footprint = offer.footprint.take().map(|f| {
        offered.extend(f.pages());
        f.image
    });
    let mut dec =
        dwcp_hde::wire::WireDecoder::offering(offered, Some(reader)).map_err(|e| e.to_string())?;
    if let Some(image) = footprint {
        dec.bases_from(image);
    }
    dec.zero_unless_given(MAIN_RAM_BLOCK);
    let mut out = Vec::new();
    let mut total = 0u64;
    // Where the feed's time went, for the log: waiting for the source,
    // for QEMU.
    let (mut for_source, mut for_qemu) = (Duration::ZERO, Duration::ZERO);
    // When it became ready: time, time waited for the source until then,
    // record bytes done.
    let mut since_ready: Option<(Instant, Duration, u64)> = None;
    let mut write = |out: &mut Vec<u8>| -> Result<(), String> {
        let t = Instant::now();
        qemu.write_all(out)
            .map_err(|e| format!("QEMU stopped taking the stream: {e}"))?;
        for_qemu += t.elapsed();
        total += out.len() as u64;
        out.clear();
        Ok(())
    };
    // The transfer is drained as it comes, whatever this thread is doing
    // (a preload takes seconds): the source's own flow control bounds what
    // piles up here, and the transport's acknowledgements keep flowing.
    let (tx, rx) = std::sync::mpsc::channel::<Chunk>();
    std::thread::spawn({
        let fed = fed.clone();
        move || {
            while let Some(c) = chunks.blocking_recv() {
                match &c {
                    Chunk::Data(d) => {
                        fed.received.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    Chunk::Done { .. } => tracing::debug!(
                        received = fed.received.load(Ordering::Relaxed),
                        done = fed.done.load(Ordering::Relaxed),
                        "the whole stream is here"
                    ),
                }
                if tx.send(c).is_err() {
                    break;
                }
            }
        }
    });
    loop {
        // A source silent for `SILENCE` is gone (link cut, agent dead):
        // the transport on this side may not notice a link gone quiet.
        let t = Instant::now();
        let c = rx.recv_timeout(SILENCE);
        for_source += t.elapsed();
        let c = match c {
            Ok(c) => c,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "nothing came from {from} for {} s",
                    SILENCE.as_secs()
                ))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match c {
            Chunk::Data(d) => {
                dec.feed(&d, &mut out)
                    .map_err(|e| format!("from {from}: {e}"))?;
                write(&mut out)?;
                done.store(dec.record_bytes(), Ordering::Relaxed);
                if let Some(id) = dec.take_preload() {
                    let local = match &offer.preload {
                        Some((theirs, local)) if *theirs == id => local.clone(),
                        _ => return Err(format!("{from} asked to preload {id}, never offered")),
                    };
                    let image = offer.image.as_deref();
                    let (n, m) =
                        preload(&mut dec, store, &local, image, &mut out, &mut write, done)?;
                    fed.mapped.store(m, Ordering::Relaxed);
                    tracing::info!(checkpoint = %local, pages = n, mapped = m, secs = t0.elapsed().as_secs_f64(), "replica preloaded");
                    dec.feed(&[], &mut out)
                        .map_err(|e| format!("from {from}: {e}"))?;
                    write(&mut out)?;
                    done.store(dec.record_bytes(), Ordering::Relaxed);
                }
                if !dec.blocks().is_empty() {
                    // Past the block list, and the preload (if one was
                    // asked for) done.
                    fed.ready.store(true, Ordering::Relaxed);
                    let (at, waited, done0) = *since_ready.get_or_insert((
                        Instant::now(),
                        for_source,
                        dec.record_bytes(),
                    ));
                    let busy = at.elapsed().saturating_sub(for_source - waited);
                    if busy >= Duration::from_millis(100) {
                        let rate = (dec.record_bytes() - done0) as f64 / busy.as_secs_f64();
                        fed.capacity.store(rate as u64, Ordering::Relaxed);
                    }
                }
            }
            Chunk::Done { .. } => {
                if !dec.is_idle() {
                    return Err(format!("{from}'s stream ended in the middle of a record"));
                }
                tracing::info!(
                    bytes = total,
                    record_bytes = dec.record_bytes(),
                    secs = t0.elapsed().as_secs_f64(),
                    waiting_for_source = for_source.as_secs_f64(),
                    waiting_for_qemu = for_qemu.as_secs_f64(),
                    zero_pages_left_out = dec.zeros_skipped(),
                    capacity = fed.capacity.load(Ordering::Relaxed),
                    "incoming stream fed to QEMU"
                );
                let main = dec.blocks().iter().position(|b| b.name == MAIN_RAM_BLOCK);
                let held = main.map(|i| {
                    let block = (i as u16, dec.blocks()[i].length_bytes);
                    (block, dec.into_held(i as u16))
                });
                return Ok(held);
            }
        }
    }
    Err("the source abandoned the stream".to_string())
}

/// Tells the source, every 50 ms, how far the destination got (record
/// bytes written into QEMU), and at once when it becomes ready (the source
/// holds its first round until then). Reports go out without waiting for
/// each other; the source keeps the largest.
async fn report_progress(
    peers: Arc<crate::peers::Peers>,
    source: String,
    id: String,
    fed: Arc<Fed>,
) {
    let mut last = (0, false);
    let mut sent_at = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = (
            fed.done.load(Ordering::Relaxed),
            fed.ready.load(Ordering::Relaxed),
        );
        let due = sent_at.elapsed() >= Duration::from_millis(20) || now.1 != last.1;
        if now == last || !due {
            continue;
        }
        (last, sent_at) = (now, Instant::now());
        let mapped = fed.mapped.load(Ordering::Relaxed);
        let capacity = fed.capacity.load(Ordering::Relaxed);
        let received = fed.received.load(Ordering::Relaxed);
        let body = json!({ "id": id, "done": now.0, "ready": now.1, "mapped": mapped, "capacity": capacity, "received": received })
            .to_string()
            .into_bytes();
        let (peers, source) = (peers.clone(), source.clone());
        tokio::spawn(async move {
            let _ = peers
                .request(&source, "migrate-progress", body, Duration::from_secs(10))
                .await;
        });
    }
}

/// Writes checkpoint `id`'s pages into the stream (see
/// [`WireDecoder::take_preload`](dwcp_hde::wire::WireDecoder::take_preload)),
/// but for those of the main memory when QEMU maps it from the
/// checkpoint's `image`: those are only counted (and later read from the
/// image as delta bases). Returns the pages preloaded, and of them those in
/// place.
fn preload(
    dec: &mut dwcp_hde::wire::WireDecoder,
    store: &dwcp_hde::PageStore,
    id: &str,
    image: Option<&std::path::Path>,
    out: &mut Vec<u8>,
    write: &mut dyn FnMut(&mut Vec<u8>) -> Result<(), String>,
    done: &AtomicU64,
) -> Result<(u64, u64), String> {
    let (m, map) = store
        .page_map(id)
        .map_err(|e| format!("checkpoint {id}: {e}"))?;
    if !dwcp_hde::same_blocks(&m.blocks, dec.blocks()) {
        return Err(format!(
            "checkpoint {id} has another memory layout than the VM"
        ));
    }
    // (The checkpoint's blocks are the stream's, checked above.)
    let main = image.and(crate::warm::main_block(&m.blocks));
    if let (Some(path), Some(block)) = (image, main) {
        // (Gone if a newer replica replaced it meanwhile: QEMU maps it
        // still, and the bases come from the store.)
        match dwcp_hde::MemoryImage::open(path, &map, block) {
            Ok(image) => dec.bases_from(image),
            Err(e) => tracing::warn!("delta bases from the store: {e}"),
        }
    }
    let (in_place, pages): (Vec<_>, Vec<_>) =
        map.nonzero_pages().partition(|(b, _, _)| Some(*b) == main);
    for (b, p, _) in &in_place {
        dec.preload_in_place(*b, *p).map_err(|e| e.to_string())?;
    }
    // Two readers (store reads, zstd, digest checks are the work), one
    // writer; pages may reach QEMU in any order.
    const BATCH: usize = 512;
    let (tx, rx) = std::sync::mpsc::sync_channel::<
        Result<Vec<(u16, u64, Box<dwcp_hde::codec::Page>)>, String>,
    >(8);
    let readers = 2;
    std::thread::scope(|scope| {
        for r in 0..readers {
            let (tx, pages) = (tx.clone(), &pages);
            scope.spawn(move || {
                let reader = match store.snapshot() {
                    Ok(r) => r,
                    Err(e) => return drop(tx.send(Err(e.to_string()))),
                };
                for chunk in pages.chunks(BATCH).skip(r).step_by(readers) {
                    let batch: Result<Vec<_>, String> = chunk
                        .iter()
                        .map(|(b, p, d)| {
                            let page = reader
                                .page(d)
                                .map_err(|e| format!("checkpoint {id}: {e}"))?
                                .ok_or_else(|| format!("checkpoint {id}: page {d} is missing"))?;
                            Ok((*b, *p, page))
                        })
                        .collect();
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut n = 0u64;
        for batch in rx {
            for (b, p, page) in batch? {
                dec.preload_page(b, p, page, out)
                    .map_err(|e| e.to_string())?;
                n += 1;
            }
            if out.len() >= 1 << 20 {
                write(out)?;
                done.store(dec.record_bytes(), Ordering::Relaxed);
            }
        }
        if n != pages.len() as u64 {
            return Err(format!("checkpoint {id}: the preload stopped short"));
        }
        dec.end_preload();
        write(out)?;
        Ok((n + in_place.len() as u64, in_place.len() as u64))
    })
}

/// The pages of QEMU's first round the relay has seen, to know when it
/// nears its end without waiting for QEMU's own figures (asked every
/// [`WATCH_INTERVAL`], and slow to come from a busy QEMU): with a replica
/// mapped at the destination the relay reads a round in a second or two,
/// and QEMU went from 170 MB left of its first round through five more
/// rounds to its switch-over between two looks, with 390 MB still to do at
/// the destination (a pause of 5 s).
struct FirstRound {
    seen: Vec<Vec<u64>>,
    /// Pages of the memory, and of them seen.
    pages: u64,
    count: u64,
    /// Pages seen by then, a little over [`FirstRound::HORIZON`] apart.
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl FirstRound {
    /// The first round is near its end when the relay, at the pace of its
    /// last moments, would see the rest of its pages within this.
    const HORIZON: Duration = Duration::from_millis(500);

    fn new(blocks: &[dwcp_vmstream::Block]) -> FirstRound {
        FirstRound {
            seen: blocks
                .iter()
                .map(|b| vec![0; b.pages().div_ceil(64) as usize])
                .collect(),
            pages: blocks.iter().map(|b| b.pages()).sum(),
            count: 0,
            samples: Default::default(),
        }
    }

    /// Notes page `page` of block `block`. True once the first round is
    /// near its end: its pages left would be seen within
    /// [`Self::HORIZON`], or a page came again (a later round).
    fn note(&mut self, block: u16, page: u64, now: Instant) -> bool {
        let Some(word) = self
            .seen
            .get_mut(block as usize)
            .and_then(|b| b.get_mut((page / 64) as usize))
        else {
            return false;
        };
        let bit = 1 << (page % 64);
        if *word & bit != 0 {
            return true;
        }
        *word |= bit;
        self.count += 1;
        if self
            .samples
            .back()
            .is_none_or(|&(t, _)| now - t >= Self::HORIZON / 4)
        {
            self.samples.push_back((now, self.count));
            while self.samples.len() > 2 && now - self.samples[1].0 >= Self::HORIZON {
                self.samples.pop_front();
            }
        }
        let Some(&(t, n)) = self.samples.front() else {
            return false;
        };
        // (The pace of a moment is no guide: a stretch of zero pages goes
        // by at millions a second.)
        let secs = (now - t).as_secs_f64();
        if secs < Self::HORIZON.as_secs_f64() / 2.0 {
            return false;
        }
        let pace = (self.count - n) as f64 / secs;
        let unseen = self.pages.saturating_sub(self.count);
        unseen as f64 <= pace * Self::HORIZON.as_secs_f64()
    }
}

/// Reads QEMU's stream, encodes it for the wire, hands the records on.
fn encode_stream(
    mut conn: UnixStream,
    tx: mpsc::Sender<Vec<u8>>,
    counters: &MigrationControl,
    known: Known,
    (backlog, rtt, limit): (u64, Duration, Duration),
) -> Result<Encoded, String> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut parser = StreamParser::new();
    let mut enc = WireEncoder::new(WIRE_ZSTD_LEVEL).map_err(|e| e.to_string())?;
    enc.set_workers(compression_workers())
        .map_err(|e| e.to_string())?;
    let mapped = known.mapped;
    enc.receiver_has(&known.offered, known.store.snapshot().ok());
    enc.receiver_slots(known.slots);
    if let Some((id, blocks)) = known.preload {
        enc.offer_preload(&id, blocks);
    }
    for image in known.images {
        enc.bases_from(image);
    }
    enc.receiver_likely(known.likely);
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::with_capacity(2 << 20);
    let mut names: Vec<String> = Vec::new();
    let mut first_round = FirstRound::new(&[]);
    // Where the relay's time went, for the log: waiting for QEMU, for the
    // link, for the destination.
    let t0 = Instant::now();
    let mut waited = [Duration::ZERO; 3];
    // And where its work went: parsing and encoding, compressing.
    let mut worked = [Duration::ZERO; 2];
    let mut cost = RelayCost::default();
    let mut last_log = t0;
    loop {
        let t = Instant::now();
        let read = conn.read(&mut buf);
        waited[0] += t.elapsed();
        let n = match read {
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
                        first_round = FirstRound::new(parser.blocks());
                    }
                    let (before, t) = (*enc.counts(), Instant::now());
                    if let Item::Page(p) = &item {
                        if first_round.note(p.block, p.page_index(), t) {
                            counters.near_the_end.store(true, Ordering::Relaxed);
                        }
                    }
                    enc.encode(item, &names).map_err(|e| e.to_string())?;
                    let took = t.elapsed();
                    worked[0] += took;
                    cost.encoded(&before, enc.counts(), took);
                }
                Ok(None) => break,
                Err(e) => return Err(format!("QEMU's stream: {e}")),
            }
        }
        // With more from QEMU at once, the records go to the compressor's
        // jobs and on as they are done; once QEMU has given all it has, all
        // of it is flushed and handed on.
        let more = bytes_waiting(&conn) > 0;
        let t = Instant::now();
        let wire_before = out.len();
        match more {
            true => enc.compress(&mut out),
            false => enc.flush(&mut out),
        }
        .map_err(|e| e.to_string())?;
        let mut flushed = !more;
        let took = t.elapsed();
        worked[1] += took;
        cost.flushed((out.len() - wire_before) as u64, took);
        if let Some((rate, wire_per_million)) = cost.rates() {
            counters.source_rate.store(rate, Ordering::Relaxed);
            counters
                .wire_per_million
                .store(wire_per_million, Ordering::Relaxed);
        }
        counters
            .stream_bytes
            .store(parser.consumed_bytes(), Ordering::Relaxed);
        waited[1] += hand_on(&mut out, &tx, counters, &enc)?;
        // Stop reading QEMU while the destination is far behind: QEMU then
        // sees the rate the whole path really has.
        let sent = enc.counts().record_bytes;
        let mut last = (
            counters.done_at_destination.load(Ordering::Relaxed),
            Instant::now(),
        );
        let t = Instant::now();
        let (mut ahead, mut allowed);
        loop {
            let done = counters.done_at_destination.load(Ordering::Relaxed);
            // The preload counts as the records of its pages: the first
            // round waits for most of it (QEMU may complete whenever a
            // round ends with nothing dirty, so the hold on its switch-over
            // alone does not keep the pause from waiting for the preload),
            // and starts a little before its end.
            // A preload QEMU maps is done before the first page comes,
            // and is not waited for (an RTT for the report that says so).
            // Once ready, in QEMU's first round, what counts is what the
            // destination has queued (see `queued_at_destination`); what is
            // on the link is the transport's to bound.
            // Near the end of QEMU's first round and after it, what counts
            // is everything the destination has still to do, wherever it
            // is (the relay no longer reads QEMU meanwhile): QEMU may stop
            // the guest at the end of any round (whenever a round finds
            // nothing dirty, whatever it was told), and all of it is then
            // in the pause. A lost packet holds up everything behind it
            // for an RTT or more and hands it over at once: at 500 ms RTT,
            // a bound on the destination's queue alone let 240 MB (a
            // second of its work) stand in a pause.
            let near_the_end = counters.near_the_end.load(Ordering::Relaxed);
            ahead = match counters.destination_ready.load(Ordering::Relaxed) {
                true if near_the_end => {
                    allowed = counters.final_backlog(limit);
                    counters.behind_beyond_pipe(pipe_of(rtt))
                }
                true => {
                    allowed = counters.backlog(backlog, rtt);
                    counters.queued_at_destination()
                }
                false if mapped => {
                    allowed = backlog.max(HOLD_BACKLOG) + enc.preload_bytes();
                    sent.saturating_sub(done)
                }
                false => {
                    allowed = backlog.max(HOLD_BACKLOG);
                    sent.saturating_sub(done)
                }
            };
            if ahead <= allowed {
                break;
            }
            if !flushed {
                // Nothing the destination waits for stays behind here.
                enc.flush(&mut out).map_err(|e| e.to_string())?;
                waited[1] += hand_on(&mut out, &tx, counters, &enc)?;
                flushed = true;
            }
            if tx.is_closed() {
                return Err("the transfer to the destination ended".into());
            }
            if done != last.0 {
                last = (done, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(60) {
                return Err("the destination reported no progress for 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.elapsed() > Duration::from_millis(50) {
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                ahead,
                allowed,
                "waited for the destination"
            );
        }
        waited[2] += t.elapsed();
        if last_log.elapsed() >= Duration::from_secs(1) {
            last_log = Instant::now();
            let [qemu, link, destination] = waited.map(|d| d.as_secs_f64());
            tracing::debug!(
                secs = t0.elapsed().as_secs_f64(),
                stream_bytes = parser.consumed_bytes(),
                wire_bytes = counters.wire_bytes.load(Ordering::Relaxed),
                waiting_for_qemu = qemu,
                waiting_for_link = link,
                waiting_for_destination = destination,
                "relay progress"
            );
        }
    }
    parser.finish().map_err(|e| format!("QEMU's stream: {e}"))?;
    enc.flush(&mut out).map_err(|e| e.to_string())?;
    waited[1] += hand_on(&mut out, &tx, counters, &enc)?;
    drop(tx);
    let [qemu, link, destination] = waited.map(|d| d.as_secs_f64());
    let [encoding, compressing] = worked.map(|d| d.as_secs_f64());
    tracing::info!(
        secs = t0.elapsed().as_secs_f64(),
        waiting_for_qemu = qemu,
        waiting_for_link = link,
        waiting_for_destination = destination,
        encoding,
        compressing,
        "relay done"
    );
    let (stats, preloaded) = (enc.stats(), enc.preloading());
    let main = parser
        .blocks()
        .iter()
        .position(|b| b.name == MAIN_RAM_BLOCK);
    let held = main.map(|i| {
        let block = (i as u16, parser.blocks()[i].length_bytes);
        (block, enc.into_held(i as u16))
    });
    tracing::debug!(secs = t0.elapsed().as_secs_f64(), "relay's pages collected");
    Ok(Encoded {
        stats,
        preloaded,
        held,
    })
}

/// Sends the relay's compressed records in `out` on to the transfer, and
/// notes them; returns how long it waited for room.
fn hand_on(
    out: &mut Vec<u8>,
    tx: &mpsc::Sender<Vec<u8>>,
    counters: &MigrationControl,
    enc: &WireEncoder,
) -> Result<Duration, String> {
    if out.is_empty() {
        return Ok(Duration::ZERO);
    }
    let len = out.len() as u64;
    let wire = counters.wire_bytes.fetch_add(len, Ordering::Relaxed) + len;
    counters.handed_on(wire, enc.counts().record_bytes);
    let chunk = std::mem::replace(out, Vec::with_capacity(2 << 20));
    let t = Instant::now();
    tx.blocking_send(chunk)
        .map_err(|_| "the transfer to the destination ended".to_string())?;
    Ok(t.elapsed())
}

/// Bytes QEMU has written to `conn` that were not read yet.
fn bytes_waiting(conn: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(conn),
            libc::FIONREAD,
            &mut n,
        )
    };
    if r == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// zstd level of the wire stream. -1: on the test guest's text 153 MB/s to
/// compress and 742 MB/s to decompress on one core of the benchmark host,
/// against 138 and 494 MB/s for -2, which makes 4 % fewer bytes (`zstd
/// -b1 -e3`). The relay and the destination share their cores with the
/// guest, and a migration without help was held back by their CPU, not the
/// link: 17.6-17.7 s with -1 instead of 18.1-18.2 s with -2 at 100 ms RTT
/// (`scripts/bench-migrate --delay 50ms --scenarios dwcp`, both with the
/// compressor's workers), for 5 % more bytes.
const WIRE_ZSTD_LEVEL: i32 = 1;

/// How many threads compress the wire stream besides the relay's own:
/// one per core, up to four (0 on one core). zstd -1 gets 153 MB/s of the
/// test guest's text through one core of the benchmark host; the relay
/// alone, with its parsing, hashing and copies and the guest beside it,
/// got 50-65 MB/s of stream through, and a 200 Mbit/s link takes about 70
/// MB/s of such a stream. A migration without help at 100 ms RTT took
/// 18.2-20.8 s without workers, 18.1-18.2 s with two.
fn compression_workers() -> u32 {
    match std::thread::available_parallelism().map_or(1, |n| n.get()) {
        1 => 0,
        n => n.min(4) as u32,
    }
}

/// The relay's work on what it sends: every item but `Same` pages (pages
/// the destination holds in place, which cost a comparison), the way a
/// final round's pages will cost. QEMU's switch-over is sized by it (see
/// [`SwitchOver`]).
#[derive(Default)]
struct RelayCost {
    busy: Duration,
    stream_bytes: u64,
    wire_bytes: u64,
}

impl RelayCost {
    /// An item encoded in `took`, the encoder's figures before and after.
    fn encoded(&mut self, before: &WireStats, after: &WireStats, took: Duration) {
        if after.same_pages == before.same_pages {
            self.busy += took;
            self.stream_bytes += after.stream_bytes - before.stream_bytes;
        }
    }

    /// Records compressed into `wire` bytes in `took`.
    fn flushed(&mut self, wire: u64, took: Duration) {
        self.busy += took;
        self.wire_bytes += wire;
        // Recent work weighs most: a last round's pages are like the last
        // rounds', not like the first round's (whole pages, compressed,
        // where later rounds send deltas).
        if self.stream_bytes > COST_WINDOW {
            self.busy /= 2;
            self.stream_bytes /= 2;
            self.wire_bytes /= 2;
        }
    }

    /// Stream bytes per second of work, and wire bytes per million stream
    /// bytes, once there is something to tell.
    fn rates(&self) -> Option<(u64, u64)> {
        (!self.busy.is_zero() && self.stream_bytes >= 64 << 10).then(|| {
            (
                (self.stream_bytes as f64 / self.busy.as_secs_f64()) as u64,
                self.wire_bytes * 1_000_000 / self.stream_bytes,
            )
        })
    }
}

/// Stream bytes over which [`RelayCost`] averages, about.
const COST_WINDOW: u64 = 64 << 20;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_round_nears_its_end_at_the_relays_pace() {
        let t0 = Instant::now();
        let blocks = [dwcp_vmstream::Block {
            name: "pc.ram".into(),
            length_bytes: 10_000 * 4096,
        }];
        let mut r = FirstRound::new(&blocks);
        // 10,000 pages at 1,000 a second: near the end once fewer than
        // 500 (half a second's) are left, not before.
        let mut first = None;
        for p in 0..10_000u64 {
            if r.note(0, p, t0 + Duration::from_millis(p)) && first.is_none() {
                first = Some(p);
            }
        }
        let first = first.expect("near the end before the round's end");
        assert!(
            (9_490..=9_510).contains(&first),
            "near the end at page {first}"
        );
        // A burst at the start (zero pages go by at millions a second) is
        // no guide.
        let mut r = FirstRound::new(&blocks);
        assert!((0..5_000).all(|p| !r.note(0, p, t0)));
        // A page seen again is a later round; pages outside memory count
        // for nothing.
        let mut r = FirstRound::new(&blocks);
        assert!(!r.note(0, 7, t0));
        assert!(!r.note(3, 7, t0));
        assert!(!r.note(0, 1 << 40, t0));
        assert!(r.note(0, 7, t0));
    }

    #[test]
    fn the_best_rate_is_over_a_second_and_never_falls() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = BestRate::default();
        // Less than a second of samples: nothing yet.
        assert_eq!(r.update(at(0), 0), 0.0);
        assert_eq!(r.update(at(500), 50 << 20), 0.0);
        // 100 MiB in the first second.
        assert_eq!(r.update(at(1000), 100 << 20), (100 << 20) as f64);
        // Slower seconds after it do not lower it.
        assert_eq!(r.update(at(2000), 120 << 20), (100 << 20) as f64);
        // A faster one raises it: 150 MiB from 2 s to 3 s.
        assert_eq!(r.update(at(3000), 270 << 20), (150 << 20) as f64);
    }

    /// A path after the first round with the destination ready: the relay
    /// at 200 MB/s, the destination at 400 MB/s, a page's wire bytes a
    /// tenth of its stream bytes.
    fn path() -> Path {
        Path {
            round: 2,
            ready: true,
            source_rate: 200e6,
            destination_rate: 400e6,
            wire_per_stream_byte: 0.1,
            received_wire_bytes: 0,
            behind_at_destination: 0,
        }
    }

    #[test]
    fn the_switch_over_is_held_in_the_first_round_and_during_a_preload() {
        let t0 = Instant::now();
        let mut s = SwitchOver::new(Duration::from_millis(500), None);
        // Held from the start: nothing to tell.
        let first = Path { round: 1, ..path() };
        assert_eq!(s.update(t0, &first), None);
        let preloading = Path {
            ready: false,
            ..path()
        };
        assert_eq!(s.update(t0, &preloading), None);
        // Released with the slowest stage: the relay.
        assert_eq!(s.update(t0, &path()), Some(200_000_000));
        // Unchanged, or within a fifth: nothing to tell.
        assert_eq!(s.update(t0, &path()), None);
        let a_bit_faster = Path {
            source_rate: 230e6,
            ..path()
        };
        assert_eq!(s.update(t0, &a_bit_faster), None);
    }

    #[test]
    fn the_switch_over_takes_the_slowest_stage() {
        let t0 = Instant::now();
        let mut s = SwitchOver::new(Duration::from_millis(500), Some(10e6));
        // The link: 10 MB/s of wire at 0.1 wire bytes per stream byte is
        // 100 MB/s of stream.
        assert_eq!(s.update(t0, &path()), Some(100_000_000));
        // The destination slower still.
        let slow = Path {
            destination_rate: 50e6,
            ..path()
        };
        assert_eq!(s.update(t0, &slow), Some(50_000_000));
        // A faster second of wire seen arriving than the probe measured:
        // the link's rate is that (30 MB/s), the relay is the limit again.
        let mut s = SwitchOver::new(Duration::from_millis(500), Some(10e6));
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        s.update(
            at(0),
            &Path {
                received_wire_bytes: 0,
                ..path()
            },
        );
        let r = s.update(
            at(1000),
            &Path {
                received_wire_bytes: 30_000_000,
                ..path()
            },
        );
        assert_eq!(r, Some(200_000_000));
    }

    #[test]
    fn what_the_destination_has_still_to_do_takes_its_share_of_the_limit() {
        let t0 = Instant::now();
        let mut s = SwitchOver::new(Duration::from_millis(500), None);
        // 100 MB queued at 400 MB/s: 250 ms, half the limit.
        let half = Path {
            behind_at_destination: 100_000_000,
            ..path()
        };
        assert_eq!(s.update(t0, &half), Some(100_000_000));
        // A whole limit's backlog: held while it drains.
        let full = Path {
            behind_at_destination: 200_000_000,
            ..path()
        };
        assert_eq!(s.update(t0, &full), Some(HOLD_SWITCHOVER_BPS));
        assert_eq!(s.update(t0, &path()), Some(200_000_000));
    }

    #[test]
    fn a_rate_qemu_refused_is_told_again() {
        let t0 = Instant::now();
        let mut s = SwitchOver::new(Duration::from_millis(500), None);
        assert_eq!(s.update(t0, &path()), Some(200_000_000));
        s.forget_told();
        assert_eq!(s.update(t0, &path()), Some(200_000_000));
    }
}
