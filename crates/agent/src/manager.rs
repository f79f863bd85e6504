//! The VM manager: owns every VM of this node, runs its QEMU process,
//! watches it, and keeps the store in step.
//!
//! Each VM has an operation lock (one lifecycle operation at a time) and a
//! small state cell guarded by a plain mutex that is never held across an
//! await. A monitor task per QEMU process follows its QMP events and its
//! exit, and decides between `stopped` (asked for, or the guest powered off)
//! and `crashed` (anything else, with the reason).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dwcp_api::{format_bytes, ErrorCode, NodeInfo, StopRequest, VmInfo, VmSpec, VmState};
use dwcp_hypervisor::qemu::{describe_exit, log_tail, resident_bytes, signal};
use dwcp_hypervisor::{
    accel, launch, process_alive, process_matches, Accel, AccelReport, LaunchSpec, Launched,
    MemoryFile, QemuBinary, QemuError, Qmp, QmpError,
};
use tokio::sync::watch;

use crate::config::{AccelChoice, AgentConfig};
use crate::store::{Runtime, Store, StoreError, VmRecord};

/// How long `quit` gets before QEMU is killed, and a kill before we give up.
const QUIT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no VM named {0:?}")]
    NotFound(String),
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("cannot {op} VM {name:?}: it is {state}{hint}")]
    InvalidState {
        name: String,
        op: &'static str,
        state: VmState,
        hint: &'static str,
    },
    #[error("QEMU for VM {name:?} failed")]
    Qemu {
        name: String,
        #[source]
        source: QemuError,
    },
    #[error("cannot {op} VM {name:?}")]
    Qmp {
        name: String,
        op: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("VM {name:?} did not stop: {detail}")]
    StopFailed { name: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Checkpoint(#[from] dwcp_hde::HdeError),
    #[error("checkpoint of VM {name:?} failed: {detail}")]
    CheckpointFailed { name: String, detail: String },
    #[error(transparent)]
    Peer(#[from] crate::peers::PeerError),
    #[error("checkpoint {id} is kept here, but replicating it to {peer} failed")]
    ReplicationFailed {
        id: String,
        peer: String,
        #[source]
        source: Box<AgentError>,
    },
    #[error("migration of VM {name:?} failed: {detail}")]
    MigrationFailed { name: String, detail: String },
    #[error("restore of {checkpoint} as VM {name:?} failed: {detail}")]
    RestoreFailed {
        checkpoint: String,
        name: String,
        detail: String,
    },
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::NotFound(_) => ErrorCode::VmNotFound,
            AgentError::Exists(_) => ErrorCode::VmExists,
            AgentError::InvalidSpec(_) => ErrorCode::InvalidSpec,
            AgentError::InvalidState { .. } => ErrorCode::InvalidState,
            AgentError::Qemu { .. } | AgentError::StopFailed { .. } => ErrorCode::QemuFailed,
            AgentError::Qmp { .. } => ErrorCode::QmpFailed,
            AgentError::Store(_) => ErrorCode::StoreFailed,
            AgentError::Io { .. } => ErrorCode::Internal,
            AgentError::Checkpoint(e) => match e {
                dwcp_hde::HdeError::NoSuchCheckpoint(_) => ErrorCode::CheckpointNotFound,
                dwcp_hde::HdeError::MissingPage { .. }
                | dwcp_hde::HdeError::CorruptPage { .. }
                | dwcp_hde::HdeError::CorruptBlob { .. }
                | dwcp_hde::HdeError::CorruptManifest { .. } => ErrorCode::CheckpointCorrupt,
                _ => ErrorCode::CheckpointFailed,
            },
            AgentError::CheckpointFailed { .. }
            | AgentError::RestoreFailed { .. }
            | AgentError::ReplicationFailed { .. } => ErrorCode::CheckpointFailed,
            AgentError::Peer(crate::peers::PeerError::Unknown(_)) => ErrorCode::InvalidSpec,
            AgentError::Peer(_) => ErrorCode::PeerFailed,
            AgentError::MigrationFailed { .. } => ErrorCode::MigrationFailed,
        }
    }
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct VmCell {
    pub(crate) rec: VmRecord,
    pub(crate) qmp: Option<Arc<Qmp>>,
    /// Set while the agent itself ends QEMU, so its exit is not a crash.
    stopping: bool,
    /// The guest asked to power off (QMP `SHUTDOWN` with `guest: true`).
    guest_shutdown: bool,
    /// Bumped on every start, so a stale monitor cannot touch a newer run.
    run: u64,
}

pub(crate) struct Vm {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) op: tokio::sync::Mutex<()>,
    pub(crate) cell: Mutex<VmCell>,
    state_tx: watch::Sender<VmState>,
}

impl Vm {
    /// A VM from its stored record; its files live in `DATA/vms/NAME`.
    fn new(data_dir: &Path, rec: VmRecord) -> Arc<Vm> {
        let (state_tx, _) = watch::channel(rec.state);
        Arc::new(Vm {
            name: rec.spec.name.clone(),
            dir: data_dir.join("vms").join(&rec.spec.name),
            op: tokio::sync::Mutex::new(()),
            cell: Mutex::new(VmCell {
                rec,
                qmp: None,
                stopping: false,
                guest_shutdown: false,
                run: 0,
            }),
            state_tx,
        })
    }

    fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub(crate) fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub(crate) fn state(&self) -> VmState {
        lock(&self.cell).rec.state
    }

    pub(crate) fn launch_spec(
        &self,
        spec: &VmSpec,
        accel: Accel,
        incoming: Option<PathBuf>,
    ) -> LaunchSpec {
        LaunchSpec {
            name: self.name.clone(),
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            kernel: spec.kernel.as_ref().map(PathBuf::from),
            initrd: spec.initrd.as_ref().map(PathBuf::from),
            append: spec.append.clone(),
            disk: spec.disk.as_ref().map(PathBuf::from),
            accel,
            qmp_socket: self.qmp_socket(),
            console_log: self.console_log(),
            qemu_log: self.qemu_log(),
            incoming,
            start_paused: false,
            memory_file: None,
        }
    }
}

/// How the monitor learns that QEMU ended.
enum ExitWatch {
    /// Our own child: its exit status is known.
    Child(tokio::process::Child),
    /// Found again after an agent restart: only liveness can be polled.
    Pid(u32),
}

pub struct Manager {
    pub(crate) cfg: AgentConfig,
    node_name: String,
    store: Store,
    /// Checkpoints and their pages.
    pub(crate) pages: Arc<dwcp_hde::PageStore>,
    /// Replicas' memory laid out for QEMU to map (see `warm.rs`).
    pub(crate) warm: Arc<crate::warm::WarmImages>,
    /// What the last migration with each peer left on both sides (see
    /// `footprint.rs`).
    pub(crate) footprints: Arc<crate::footprint::Footprints>,
    /// Other nodes (when this one has an identity).
    pub(crate) peers: Option<Arc<crate::peers::Peers>>,
    /// Migrations coming in, by id.
    pub(crate) incoming: crate::migrate::IncomingMigrations,
    /// Migrations going out, by VM.
    pub(crate) migrations: crate::migrate::Migrations,
    pub(crate) qemu: QemuBinary,
    accel: watch::Receiver<Option<AccelReport>>,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
}

impl Manager {
    /// Opens the store, finds the QEMU binary and starts accelerator
    /// detection. Call [`Manager::recover`] next.
    pub async fn open(cfg: AgentConfig) -> Result<Arc<Manager>, crate::StartError> {
        use crate::StartError;
        std::fs::create_dir_all(cfg.data_dir.join("vms")).map_err(|source| {
            StartError::DataDir {
                path: cfg.data_dir.clone(),
                source,
            }
        })?;
        let store = Store::open(&cfg.data_dir.join("agent.redb"))?;
        let pages_path = cfg.data_dir.join("pages.redb");
        let level = cfg.checkpoint_zstd_level;
        let pages = tokio::task::spawn_blocking(move || {
            let pages = dwcp_hde::PageStore::open(&pages_path, level)?;
            // Whatever an interrupted checkpoint left behind.
            pages.collect_garbage()?;
            Ok::<_, dwcp_hde::HdeError>(pages)
        })
        .await
        .map_err(|e| StartError::Pages(dwcp_hde::HdeError::Stream(e.to_string())))??;
        let qemu = QemuBinary::detect(&cfg.qemu_binary).await?;
        let peers = crate::peers::Peers::start(&cfg).await?;
        let node_name = match &peers {
            Some(p) => p.node_name(),
            None => cfg.node_name.clone().unwrap_or_else(host_name),
        };
        let (accel_tx, accel) = watch::channel(None);
        let report = match cfg.accel {
            AccelChoice::Tcg => Some(AccelReport {
                accel: Accel::Tcg,
                reason: "TCG set by configuration".into(),
            }),
            AccelChoice::Kvm => Some(AccelReport {
                accel: Accel::Kvm,
                reason: "KVM set by configuration".into(),
            }),
            AccelChoice::Auto => None,
        };
        match report {
            Some(r) => {
                let _ = accel_tx.send(Some(r));
            }
            None => {
                let qemu = qemu.clone();
                let probe = cfg
                    .probe_guest_dir
                    .as_deref()
                    .and_then(accel::probe_guest_in);
                let timeout = cfg.probe_timeout;
                tokio::spawn(async move {
                    let r = accel::detect(&qemu, probe.as_ref(), timeout).await;
                    tracing::info!(accel = %r.accel, reason = %r.reason, "accelerator chosen");
                    let _ = accel_tx.send(Some(r));
                });
            }
        }
        let mut vms = BTreeMap::new();
        for rec in store.all()? {
            let vm = Vm::new(&cfg.data_dir, rec);
            vms.insert(vm.name.clone(), vm);
        }
        let warm = Arc::new(crate::warm::WarmImages::new(
            &cfg.data_dir,
            (host_memory_bytes() as f64 * cfg.warm_memory_share) as u64,
        ));
        let data_dir = cfg.data_dir.clone();
        let manager = Arc::new(Manager {
            cfg,
            node_name,
            store,
            pages: Arc::new(pages),
            warm,
            footprints: Arc::new(crate::footprint::Footprints::new(&data_dir)),
            peers,
            incoming: Default::default(),
            migrations: Default::default(),
            qemu,
            accel,
            vms: Mutex::new(vms),
        });
        if let Some(p) = &manager.peers {
            p.attach(Arc::downgrade(&manager));
        }
        Ok(manager)
    }

    /// Finds the QEMU processes of stored VMs again, and starts those that
    /// should be running but whose QEMU ended while the agent was away.
    pub async fn recover(self: &Arc<Self>) {
        let vms: Vec<Arc<Vm>> = lock(&self.vms).values().cloned().collect();
        for vm in vms {
            let _op = vm.op.lock().await;
            let (runtime, desired, incoming) = {
                let c = lock(&vm.cell);
                (c.rec.runtime.clone(), c.rec.desired, c.rec.incoming)
            };
            if incoming {
                // Half an incoming migration: the source still has the VM.
                if let Some(rt) = &runtime {
                    if process_matches(rt.pid, &vm.qmp_socket()) {
                        signal(rt.pid, libc::SIGKILL);
                    }
                }
                tracing::info!(vm = %vm.name, "removing the VM of an incoming migration interrupted by a restart");
                lock(&self.vms).remove(&vm.name);
                let _ = self.store.delete(&vm.name);
                let _ = std::fs::remove_dir_all(&vm.dir);
                continue;
            }
            if let Some(rt) = runtime {
                if process_matches(rt.pid, &vm.qmp_socket()) {
                    match Qmp::connect(&vm.qmp_socket(), self.cfg.qmp_timeout).await {
                        Ok(qmp) => {
                            let status = qmp.execute("query-status", None).await;
                            let mut paused = matches!(&status, Ok(s) if s["running"] == false);
                            // A checkpoint completed but the agent died before
                            // it could resume the guest.
                            let postmigrate =
                                matches!(&status, Ok(s) if s["status"] == "postmigrate");
                            if paused && postmigrate && desired == VmState::Running {
                                match qmp.execute("cont", None).await {
                                    Ok(_) => paused = false,
                                    Err(e) => {
                                        tracing::warn!(vm = %vm.name, error = %e, "cannot resume VM left paused by a checkpoint")
                                    }
                                }
                            }
                            self.attach(&vm, Arc::new(qmp), ExitWatch::Pid(rt.pid), paused, None);
                            tracing::info!(vm = %vm.name, pid = rt.pid, "re-attached to running QEMU");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(vm = %vm.name, pid = rt.pid, error = %e, "QEMU alive but QMP unreachable; killing it");
                            signal(rt.pid, libc::SIGKILL);
                        }
                    }
                }
                let note = format!(
                    "QEMU (pid {}) ended while the agent was not running",
                    rt.pid
                );
                self.set_ended(&vm, VmState::Stopped, Some(note));
            }
            if matches!(desired, VmState::Running | VmState::Paused) {
                tracing::info!(vm = %vm.name, "starting VM whose desired state is {desired}");
                if let Err(e) = self.start_locked(&vm).await {
                    tracing::warn!(vm = %vm.name, error = %format_chain(&e), "could not restart VM");
                }
            }
        }
        // Replicas of VMs elsewhere: their memory is held here again (for a
        // migration of one of them here), after the VMs here took theirs.
        let pages = self.pages.clone();
        match crate::checkpoint::blocking(move || pages.list()).await {
            Ok(list) => {
                let here = lock(&self.vms);
                let replicas = list.into_iter().filter(|m| !here.contains_key(&m.vm));
                self.warm.restore(self.pages.clone(), replicas.collect());
            }
            Err(e) => tracing::warn!(
                "cannot list checkpoints to hold replicas again: {}",
                format_chain(&e)
            ),
        }
    }

    pub(crate) fn persist(&self, vm: &Vm, cell: &VmCell) {
        if let Err(e) = self.store.put(&cell.rec) {
            tracing::error!(vm = %vm.name, error = %e, "cannot save VM record");
        }
        vm.state_tx.send_replace(cell.rec.state);
    }

    pub(crate) fn vm(&self, name: &str) -> Result<Arc<Vm>, AgentError> {
        lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(name.to_owned()))
    }

    /// The accelerator report, waiting for detection if it still runs.
    pub(crate) async fn accel(&self) -> AccelReport {
        let mut rx = self.accel.clone();
        let report = match rx.wait_for(Option::is_some).await {
            Ok(r) => r.clone(),
            Err(_) => None,
        };
        report.unwrap_or_else(fallback_accel)
    }

    /// Starts QEMU for `spec`, giving up first the replica memory held
    /// here that the VM needs (unless its memory is such a copy).
    pub(crate) async fn launch_qemu(&self, spec: &LaunchSpec) -> Result<Launched, QemuError> {
        if !matches!(spec.memory_file, Some(MemoryFile::Shared(_))) {
            self.warm.make_room(spec.memory_bytes);
        }
        launch(&self.qemu, spec, self.cfg.qmp_timeout).await
    }

    pub fn node_info(&self) -> NodeInfo {
        let (accel, reason) = match &*self.accel.borrow() {
            Some(r) => (r.accel.to_string(), r.reason.clone()),
            None => ("detecting".into(), "booting a probe guest under KVM".into()),
        };
        let vms = lock(&self.vms);
        NodeInfo {
            name: self.node_name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            qemu_binary: self.qemu.path.display().to_string(),
            qemu_version: self.qemu.version.clone(),
            accel,
            accel_reason: reason,
            host_cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            host_memory_bytes: host_memory_bytes(),
            warm_memory_bytes: self.warm.held_bytes(),
            warm_memory_budget_bytes: self.warm.budget(),
            data_dir: self.cfg.data_dir.display().to_string(),
            vms_total: vms.len(),
            vms_running: vms.values().filter(|v| v.state().has_process()).count(),
        }
    }

    pub(crate) fn info(&self, vm: &Vm) -> VmInfo {
        let c = lock(&vm.cell);
        let rt = c.rec.runtime.as_ref().filter(|_| c.rec.state.has_process());
        VmInfo {
            spec: c.rec.spec.clone(),
            state: c.rec.state,
            desired: c.rec.desired,
            pid: rt.map(|r| r.pid),
            accel: rt.map(|r| r.accel.clone()),
            uptime_secs: rt
                .map(|r| now_unix_ms().saturating_sub(r.started_unix_ms) as f64 / 1000.0),
            resident_bytes: rt.and_then(|r| resident_bytes(r.pid)),
            last_error: c.rec.last_error.clone(),
            created_unix: c.rec.created_unix,
        }
    }

    /// The other nodes this one knows, as last measured.
    pub fn peers(&self) -> Vec<dwcp_api::PeerInfo> {
        self.peers.as_ref().map(|p| p.list()).unwrap_or_default()
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let vms: Vec<Arc<Vm>> = lock(&self.vms).values().cloned().collect();
        vms.iter().map(|vm| self.info(vm)).collect()
    }

    pub fn show(&self, name: &str) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        Ok(self.info(&vm))
    }

    /// Checks what depends on this host: files exist, memory fits.
    pub(crate) fn check_host(&self, spec: &VmSpec, except: Option<&str>) -> Result<(), AgentError> {
        for (what, path) in [
            ("kernel", &spec.kernel),
            ("initrd", &spec.initrd),
            ("disk", &spec.disk),
        ] {
            if let Some(p) = path {
                match std::fs::metadata(p) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(AgentError::InvalidSpec(format!(
                            "{what}: {p} is not a file"
                        )))
                    }
                    Err(e) => return Err(AgentError::InvalidSpec(format!("{what}: {p}: {e}"))),
                }
            }
        }
        let limit = (host_memory_bytes() as f64 * self.cfg.memory_overcommit) as u64;
        if spec.memory_bytes > limit {
            return Err(AgentError::InvalidSpec(format!(
                "memory_bytes: {} is more than this host can give ({} with memory_overcommit {})",
                format_bytes(spec.memory_bytes),
                format_bytes(limit),
                self.cfg.memory_overcommit
            )));
        }
        let committed: u64 = lock(&self.vms)
            .values()
            .filter(|v| Some(v.name.as_str()) != except)
            .map(|v| lock(&v.cell).rec.clone())
            .filter(|r| r.state.has_process())
            .map(|r| r.spec.memory_bytes)
            .sum();
        if committed + spec.memory_bytes > limit {
            return Err(AgentError::InvalidSpec(format!(
                "memory_bytes: {} does not fit: running VMs hold {} of {}",
                format_bytes(spec.memory_bytes),
                format_bytes(committed),
                format_bytes(limit)
            )));
        }
        Ok(())
    }

    pub async fn create(self: &Arc<Self>, spec: VmSpec, start: bool) -> Result<VmInfo, AgentError> {
        spec.validate()
            .map_err(|e| AgentError::InvalidSpec(e.to_string()))?;
        self.check_host(&spec, None)?;
        let name = spec.name.clone();
        let dir = self.cfg.data_dir.join("vms").join(&name);
        let vm = {
            let mut vms = lock(&self.vms);
            if vms.contains_key(&name) {
                return Err(AgentError::Exists(name));
            }
            let rec = VmRecord {
                spec,
                created_unix: now_unix_ms() / 1000,
                desired: VmState::Stopped,
                state: VmState::Stopped,
                runtime: None,
                last_error: None,
                incoming: false,
            };
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(|source| AgentError::Io {
                path: dir.clone(),
                source,
            })?;
            if let Err(e) = self.store.put(&rec) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
            let vm = Vm::new(&self.cfg.data_dir, rec);
            vms.insert(name.clone(), vm.clone());
            vm
        };
        tracing::info!(vm = %name, "created");
        if start {
            let _op = vm.op.lock().await;
            if let Err(e) = self.start_locked(&vm).await {
                // Roll the definition back: the caller asked for a running VM.
                lock(&self.vms).remove(&name);
                let _ = self.store.delete(&name);
                let _ = std::fs::remove_dir_all(&vm.dir);
                return Err(e);
            }
        }
        Ok(self.info(&vm))
    }

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        let _op = vm.op.lock().await;
        let state = vm.state();
        if !matches!(state, VmState::Stopped | VmState::Crashed) {
            return Err(AgentError::InvalidState {
                name: name.into(),
                op: "start",
                state,
                hint: "",
            });
        }
        self.start_locked(&vm).await?;
        Ok(self.info(&vm))
    }

    async fn start_locked(self: &Arc<Self>, vm: &Arc<Vm>) -> Result<(), AgentError> {
        let spec = lock(&vm.cell).rec.spec.clone();
        self.check_host(&spec, Some(&vm.name))?;
        let report = self.accel().await;
        {
            let mut c = lock(&vm.cell);
            c.rec.state = VmState::Starting;
            vm.state_tx.send_replace(VmState::Starting);
            c.stopping = false;
            c.guest_shutdown = false;
        }
        std::fs::create_dir_all(&vm.dir).map_err(|source| AgentError::Io {
            path: vm.dir.clone(),
            source,
        })?;
        let launch_spec = vm.launch_spec(&spec, report.accel, None);
        let started = Instant::now();
        match self.launch_qemu(&launch_spec).await {
            Ok(l) => {
                let pid = l.pid;
                self.adopt(vm, l, report.accel, false);
                tracing::info!(vm = %vm.name, pid, accel = %report.accel, took_ms = started.elapsed().as_millis() as u64, "started");
                Ok(())
            }
            Err(source) => {
                let err = AgentError::Qemu {
                    name: vm.name.clone(),
                    source,
                };
                let mut c = lock(&vm.cell);
                c.rec.state = VmState::Stopped;
                c.rec.runtime = None;
                c.rec.last_error = Some(format_chain(&err));
                self.persist(vm, &c);
                Err(err)
            }
        }
    }

    /// Records a live QEMU for `vm` and spawns its monitor.
    /// Makes a freshly launched QEMU the VM's running process.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        l: dwcp_hypervisor::Launched,
        accel: Accel,
        paused: bool,
    ) {
        {
            let mut c = lock(&vm.cell);
            c.rec.runtime = Some(Runtime {
                pid: l.pid,
                accel: accel.to_string(),
                started_unix_ms: now_unix_ms(),
            });
            c.rec.desired = if paused {
                VmState::Paused
            } else {
                VmState::Running
            };
            c.rec.last_error = None;
            c.rec.incoming = false;
        }
        self.attach(vm, Arc::new(l.qmp), ExitWatch::Child(l.child), paused, None);
    }

    fn attach(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        qmp: Arc<Qmp>,
        exit: ExitWatch,
        paused: bool,
        note: Option<String>,
    ) {
        let run = {
            let mut c = lock(&vm.cell);
            c.run += 1;
            c.qmp = Some(qmp.clone());
            c.rec.state = if paused {
                VmState::Paused
            } else {
                VmState::Running
            };
            if note.is_some() {
                c.rec.last_error = note;
            }
            self.persist(vm, &c);
            c.run
        };
        tokio::spawn(self.clone().monitor(vm.clone(), run, qmp, exit));
    }

    async fn monitor(self: Arc<Self>, vm: Arc<Vm>, run: u64, qmp: Arc<Qmp>, exit: ExitWatch) {
        let mut events = qmp.events();
        let ended = async {
            match exit {
                ExitWatch::Child(mut child) => match child.wait().await {
                    Ok(status) => describe_exit(status),
                    Err(e) => format!("ended (wait failed: {e})"),
                },
                ExitWatch::Pid(pid) => {
                    qmp.closed().await;
                    for _ in 0..200 {
                        if !process_alive(pid) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    "ended (exit status unknown: QEMU was re-attached after an agent restart)"
                        .into()
                }
            }
        };
        tokio::pin!(ended);
        let how = loop {
            tokio::select! {
                how = &mut ended => break how,
                ev = events.recv() => {
                    let Ok(ev) = ev else { continue };
                    let mut c = lock(&vm.cell);
                    if c.run != run {
                        return;
                    }
                    match ev.name.as_str() {
                        "SHUTDOWN" if ev.data["guest"] == true => c.guest_shutdown = true,
                        "STOP" if c.rec.state == VmState::Running => {
                            c.rec.state = VmState::Paused;
                            self.persist(&vm, &c);
                        }
                        "RESUME" if c.rec.state == VmState::Paused => {
                            c.rec.state = VmState::Running;
                            self.persist(&vm, &c);
                        }
                        _ => {}
                    }
                }
            }
        };
        let (state, note) = {
            let c = lock(&vm.cell);
            if c.run != run {
                return;
            }
            if c.stopping {
                (VmState::Stopped, None)
            } else if c.guest_shutdown {
                (
                    VmState::Stopped,
                    Some("the guest powered itself off".to_owned()),
                )
            } else {
                let stderr = log_tail(&vm.qemu_log(), 3);
                (
                    VmState::Crashed,
                    Some(format!("QEMU {how}; its last output: {stderr}")),
                )
            }
        };
        if state == VmState::Crashed {
            tracing::warn!(vm = %vm.name, reason = note.as_deref().unwrap_or(""), "VM crashed");
        } else {
            tracing::info!(vm = %vm.name, "QEMU ended ({how})");
        }
        self.set_ended(&vm, state, note);
    }

    fn set_ended(&self, vm: &Vm, state: VmState, note: Option<String>) {
        let mut c = lock(&vm.cell);
        c.rec.state = state;
        c.rec.runtime = None;
        c.qmp = None;
        if c.guest_shutdown {
            c.rec.desired = VmState::Stopped;
        }
        if note.is_some() {
            c.rec.last_error = note;
        }
        self.persist(vm, &c);
    }

    async fn wait_ended(&self, vm: &Vm, within: Duration) -> bool {
        let mut rx = vm.state_tx.subscribe();
        let ended = tokio::time::timeout(within, rx.wait_for(|s| !s.has_process())).await;
        ended.is_ok()
    }

    pub async fn stop(&self, name: &str, req: &StopRequest) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        let _op = vm.op.lock().await;
        self.stop_locked(&vm, req).await?;
        Ok(self.info(&vm))
    }

    async fn stop_locked(&self, vm: &Vm, req: &StopRequest) -> Result<(), AgentError> {
        let (qmp, pid) = {
            let mut c = lock(&vm.cell);
            c.rec.desired = VmState::Stopped;
            if !c.rec.state.has_process() {
                self.persist(vm, &c);
                return Ok(());
            }
            c.stopping = true;
            c.rec.state = VmState::Stopping;
            self.persist(vm, &c);
            (
                c.qmp.clone(),
                c.rec.runtime.as_ref().map(|r| r.pid).unwrap_or(0),
            )
        };
        let timeout = req
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.stop_timeout);
        if let (false, Some(q)) = (req.force, &qmp) {
            match q.execute("system_powerdown", None).await {
                Ok(_) => {
                    if self.wait_ended(vm, timeout).await {
                        tracing::info!(vm = %vm.name, "guest powered off");
                        return Ok(());
                    }
                    tracing::info!(vm = %vm.name, "guest did not power off within {timeout:?}; ending QEMU");
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.name, error = %e, "powerdown failed; ending QEMU")
                }
            }
        }
        if let Some(q) = &qmp {
            let _ = q.execute("quit", None).await;
            if self.wait_ended(vm, QUIT_GRACE).await {
                return Ok(());
            }
        }
        signal(pid, libc::SIGKILL);
        if self.wait_ended(vm, QUIT_GRACE).await {
            return Ok(());
        }
        if !process_alive(pid) {
            // No monitor noticed (it had no QMP to follow): record it here.
            self.set_ended(vm, VmState::Stopped, None);
            return Ok(());
        }
        Err(AgentError::StopFailed {
            name: vm.name.clone(),
            detail: format!("QEMU pid {pid} survived SIGKILL"),
        })
    }

    async fn qmp_op(
        &self,
        name: &str,
        op: &'static str,
        from: VmState,
        to: VmState,
        cmd: &str,
    ) -> Result<VmInfo, AgentError> {
        let vm = self.vm(name)?;
        let _op = vm.op.lock().await;
        let qmp = {
            let c = lock(&vm.cell);
            if c.rec.state != from {
                return Err(AgentError::InvalidState {
                    name: name.into(),
                    op,
                    state: c.rec.state,
                    hint: "",
                });
            }
            c.qmp.clone()
        };
        let qmp = qmp.ok_or(AgentError::Qmp {
            name: name.into(),
            op,
            source: QmpError::Disconnected,
        })?;
        qmp.execute(cmd, None)
            .await
            .map_err(|source| AgentError::Qmp {
                name: name.into(),
                op,
                source,
            })?;
        {
            let mut c = lock(&vm.cell);
            if c.rec.state.has_process() {
                c.rec.state = to;
                c.rec.desired = to;
                self.persist(&vm, &c);
            }
        }
        tracing::info!(vm = %name, "{op}d");
        Ok(self.info(&vm))
    }

    pub async fn pause(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.qmp_op(name, "pause", VmState::Running, VmState::Paused, "stop")
            .await
    }

    pub async fn resume(&self, name: &str) -> Result<VmInfo, AgentError> {
        self.qmp_op(name, "resume", VmState::Paused, VmState::Running, "cont")
            .await
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<(), AgentError> {
        let vm = self.vm(name)?;
        let _op = vm.op.lock().await;
        let state = vm.state();
        if state.has_process() {
            if !force {
                return Err(AgentError::InvalidState {
                    name: name.into(),
                    op: "delete",
                    state,
                    hint: " (stop it first, or delete with force)",
                });
            }
            self.stop_locked(
                &vm,
                &StopRequest {
                    timeout_secs: None,
                    force: true,
                },
            )
            .await?;
        }
        self.store.delete(name)?;
        lock(&self.vms).remove(name);
        if let Err(e) = std::fs::remove_dir_all(&vm.dir) {
            tracing::warn!(vm = %name, error = %e, "could not remove the VM directory");
        }
        tracing::info!(vm = %name, "deleted");
        Ok(())
    }

    /// The console log of `name` and a receiver that says when the VM's
    /// state changes (for following).
    pub fn console(&self, name: &str) -> Result<(PathBuf, watch::Receiver<VmState>), AgentError> {
        let vm = self.vm(name)?;
        Ok((vm.console_log(), vm.state_tx.subscribe()))
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }
}

fn fallback_accel() -> AccelReport {
    AccelReport {
        accel: Accel::Tcg,
        reason: "accelerator detection did not finish; using TCG".into(),
    }
}

/// `error: cause: cause`, for logs and stored notes.
pub fn format_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

pub fn host_memory_bytes() -> u64 {
    meminfo("MemTotal:").unwrap_or(0)
}

/// Host memory that can be had without swapping (the kernel's estimate).
pub(crate) fn host_memory_available_bytes() -> u64 {
    meminfo("MemAvailable:").unwrap_or(0)
}

/// A `/proc/meminfo` figure in bytes.
fn meminfo(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}
