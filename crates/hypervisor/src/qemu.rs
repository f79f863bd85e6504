//! Starting QEMU processes and finding them again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::qmp::{Qmp, QmpError};
use crate::Accel;

/// How long QEMU gets to open its QMP socket after it was spawned.
const QMP_APPEAR_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("QEMU binary {path} cannot be run")]
    Binary {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU binary {path} did not report its version: {detail}")]
    Version { path: PathBuf, detail: String },
    #[error("QEMU {version} is too old: dwcp needs 9.0 or newer (7.2 corrupts guest memory in multi-round TCG migrations)")]
    TooOld { version: String },
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited at start-up ({status}): {stderr}")]
    EarlyExit { status: String, stderr: String },
    #[error("QEMU did not open its QMP socket within {0:?}")]
    NoQmp(Duration),
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// A QEMU system emulator binary and its version.
#[derive(Clone, Debug)]
pub struct QemuBinary {
    pub path: PathBuf,
    pub version: String,
}

impl QemuBinary {
    /// Runs `PATH --version` (bounded to 10 s) and checks the version is
    /// recent enough.
    pub async fn detect(path: &Path) -> Result<QemuBinary, QemuError> {
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            Command::new(path)
                .arg("--version")
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .map_err(|_| QemuError::Version {
            path: path.to_owned(),
            detail: "no answer within 10 s".into(),
        })?
        .map_err(|source| QemuError::Binary {
            path: path.to_owned(),
            source,
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .next()
            .and_then(|l| l.split("version ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .ok_or_else(|| QemuError::Version {
                path: path.to_owned(),
                detail: format!("unexpected output {:?}", text.trim()),
            })?
            .to_owned();
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 9 {
            return Err(QemuError::TooOld { version });
        }
        Ok(QemuBinary {
            path: path.to_owned(),
            version,
        })
    }
}

/// What to boot and where its files go.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub disk: Option<PathBuf>,
    pub accel: Accel,
    /// QMP socket the agent talks to.
    pub qmp_socket: PathBuf,
    /// The serial console is written here.
    pub console_log: PathBuf,
    /// QEMU's own stderr goes here.
    pub qemu_log: PathBuf,
    /// Start by waiting for an incoming migration stream on this unix
    /// socket (a restore or a migration), instead of booting.
    pub incoming: Option<PathBuf>,
    /// Do not start the guest's CPUs (`-S`); `cont` starts them.
    pub start_paused: bool,
    /// Map the main memory ([`MAIN_RAM_BLOCK`]) from a file (as long as the
    /// memory; holes read as zeros): the guest starts out with the file's
    /// contents. An incoming migration then need not carry the pages the
    /// file holds.
    pub memory_file: Option<MemoryFile>,
}

/// A file the guest's main memory is mapped from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryFile {
    /// Privately: the guest's writes never reach the file, and each page
    /// the guest writes is copied into fresh memory first.
    Private(PathBuf),
    /// Shared: the file (in memory, e.g. a memfd) is the guest's memory,
    /// and the guest writes into its pages where they are.
    Shared(PathBuf),
}

/// The name of the q35 machine's main memory in the migration stream. A
/// memory backend given this id keeps that name, so a VM whose memory is
/// mapped from a file migrates to and from one started with plain `-m`.
pub const MAIN_RAM_BLOCK: &str = "pc.ram";

impl LaunchSpec {
    /// The QEMU arguments (without the binary).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("{},process=dwcp-{}", self.name, self.name),
            "-machine".into(),
            match self.memory_file {
                Some(_) => format!("q35,memory-backend={MAIN_RAM_BLOCK}"),
                None => "q35".into(),
            },
            "-accel".into(),
            self.accel.as_str().into(),
            "-cpu".into(),
            match self.accel {
                Accel::Kvm => "host".into(),
                Accel::Tcg => "max".into(),
            },
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_bytes >> 20),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-chardev".into(),
            format!("file,id=console0,path={}", self.console_log.display()),
            "-serial".into(),
            "chardev:console0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        ];
        if let Some(k) = &self.kernel {
            a.push("-kernel".into());
            a.push(k.display().to_string());
        }
        if let Some(i) = &self.initrd {
            a.push("-initrd".into());
            a.push(i.display().to_string());
        }
        if let Some(ap) = &self.append {
            a.push("-append".into());
            a.push(ap.clone());
        }
        if let Some(m) = &self.memory_file {
            let (f, share) = match m {
                MemoryFile::Private(f) => (f, "off"),
                MemoryFile::Shared(f) => (f, "on"),
            };
            a.push("-object".into());
            a.push(format!(
                "memory-backend-file,id={MAIN_RAM_BLOCK},size={}M,mem-path={},share={share}",
                self.memory_bytes >> 20,
                escape(f)
            ));
        }
        if self.start_paused {
            a.push("-S".into());
        }
        if let Some(sock) = &self.incoming {
            a.push("-incoming".into());
            a.push(format!("unix:{}", sock.display()));
        }
        if let Some(d) = &self.disk {
            a.push("-drive".into());
            a.push(format!("file={},if=virtio,format=qcow2", escape(d)));
        }
        a
    }
}

/// A path as a value in QEMU's `key=value,...` options (commas doubled).
fn escape(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// A QEMU process this agent started (it can also be found again later by
/// pid, see [`process_matches`]).
#[derive(Debug)]
pub struct Launched {
    pub pid: u32,
    pub child: Child,
    pub qmp: Qmp,
}

/// Starts QEMU and connects to its QMP socket. QEMU runs in its own process
/// group so that a Ctrl-C meant for the agent does not reach it, and it
/// outlives the agent: a restarted agent finds it again.
pub async fn launch(
    bin: &QemuBinary,
    spec: &LaunchSpec,
    qmp_timeout: Duration,
) -> Result<Launched, QemuError> {
    let _ = std::fs::remove_file(&spec.qmp_socket);
    let stderr = std::fs::File::create(&spec.qemu_log).map_err(|source| QemuError::Prepare {
        path: spec.qemu_log.clone(),
        source,
    })?;
    let mut cmd = Command::new(&bin.path);
    cmd.args(spec.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false);
    tracing::debug!(vm = %spec.name, args = ?spec.args(), "starting QEMU");
    let mut child = cmd.spawn().map_err(|source| QemuError::Binary {
        path: bin.path.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    let deadline = Instant::now() + QMP_APPEAR_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().map_err(|source| QemuError::Binary {
            path: bin.path.clone(),
            source,
        })? {
            return Err(QemuError::EarlyExit {
                status: describe_exit(status),
                stderr: log_tail(&spec.qemu_log, 5),
            });
        }
        if spec.qmp_socket.exists() {
            // QEMU answers commands only once machine set-up is done (disk
            // images opened and so on): an answer means it really started.
            let up = match Qmp::connect(&spec.qmp_socket, qmp_timeout).await {
                Ok(qmp) => qmp.execute("query-status", None).await.map(|_| qmp),
                Err(e) => Err(e),
            };
            match up {
                Ok(qmp) => return Ok(Launched { pid, child, qmp }),
                Err(QmpError::Connect { .. }) => {}
                Err(e) => {
                    // QEMU may open its QMP socket and then exit (a bad disk
                    // image, say): its own reason beats our broken socket.
                    if let Ok(Ok(status)) =
                        tokio::time::timeout(Duration::from_secs(2), child.wait()).await
                    {
                        return Err(QemuError::EarlyExit {
                            status: describe_exit(status),
                            stderr: log_tail(&spec.qemu_log, 5),
                        });
                    }
                    let _ = child.start_kill();
                    return Err(e.into());
                }
            }
        }
        if Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(QemuError::NoQmp(QMP_APPEAR_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `exited with status 1`, `killed by signal 9 (SIGKILL)`.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        format!("killed by signal {sig}{}", signal_name(sig))
    } else {
        "ended".into()
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGINT => " (SIGINT)",
        _ => "",
    }
}

/// The last `lines` non-empty lines of a log file, joined by " | ".
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(16 * 1024);
    let text = String::from_utf8_lossy(&text[start..]);
    let mut tail: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .rev()
        .take(lines)
        .collect();
    tail.reverse();
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail.join(" | ")
    }
}

/// Whether `pid` is alive (a zombie counts as gone).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Whether `pid` is a live QEMU started for this QMP socket: guards against
/// the pid having been reused by an unrelated process.
pub fn process_matches(pid: u32, qmp_socket: &Path) -> bool {
    if !process_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = format!("unix:{},", qmp_socket.display());
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg.starts_with(needle.as_bytes()))
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, signal: i32) {
    if pid == 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Resident memory of `pid` in bytes, from /proc.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_every_file_and_escape_commas() {
        let spec = LaunchSpec {
            name: "web".into(),
            vcpus: 2,
            memory_bytes: 256 << 20,
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            append: Some("console=ttyS0".into()),
            disk: Some("/d,1.qcow2".into()),
            accel: Accel::Tcg,
            qmp_socket: "/run/q.sock".into(),
            console_log: "/run/c.log".into(),
            qemu_log: "/run/q.log".into(),
            incoming: Some("/run/in.sock".into()),
            start_paused: true,
            memory_file: Some(MemoryFile::Private("/w,1.ram".into())),
        };
        let a = spec.args().join(" ");
        for want in [
            "-accel tcg",
            "-smp 2",
            "-m 256M",
            "-kernel /k",
            "-initrd /i",
            "-append console=ttyS0",
            "file=/d,,1.qcow2,if=virtio,format=qcow2",
            "unix:/run/q.sock,server=on,wait=off",
            "file,id=console0,path=/run/c.log",
            "-incoming unix:/run/in.sock",
            "-S",
            "-machine q35,memory-backend=pc.ram",
            "memory-backend-file,id=pc.ram,size=256M,mem-path=/w,,1.ram,share=off",
        ] {
            assert!(a.contains(want), "{want:?} missing from {a}");
        }
        let shared = LaunchSpec {
            memory_file: Some(MemoryFile::Shared("/proc/7/fd/9".into())),
            ..spec
        };
        let a = shared.args().join(" ");
        assert!(
            a.contains("memory-backend-file,id=pc.ram,size=256M,mem-path=/proc/7/fd/9,share=on"),
            "{a}"
        );
    }

    #[test]
    fn own_process_is_alive_and_does_not_match_a_socket() {
        let me = std::process::id();
        assert!(process_alive(me));
        assert!(!process_matches(me, Path::new("/nonexistent/q.sock")));
        assert!(!process_alive(u32::MAX - 1));
    }
}
