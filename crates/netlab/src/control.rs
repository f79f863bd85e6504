//! The `netlab` daemon: holds a [`Lab`] in the background and answers
//! `set`, `stats` and `shutdown` on a unix socket, one JSON line each way.
//! Its state lives in `/run/netlab/LAB/` (`lab.json`, `ctl.sock`,
//! `daemon.log`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::emulator::LinkStats;
use crate::lab::{HostInfo, Lab, LabConfig};
use crate::params::LinkOverride;

pub const STATE_ROOT: &str = "/run/netlab";
const MAX_REQUEST_BYTES: u64 = 1 << 20;

pub fn state_dir(lab: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(lab)
}

/// What `lab.json` says about a running lab.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub pid: u32,
    pub hosts: Vec<HostInfo>,
    pub config: LabConfig,
}

impl LabState {
    pub fn load(lab: &str) -> Option<LabState> {
        let text = std::fs::read_to_string(state_dir(lab).join("lab.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn host(&self, name: &str) -> Option<&HostInfo> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Whether the daemon that wrote this is still alive.
    pub fn daemon_alive(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("netlab") && c.contains("daemon")
            })
            .unwrap_or(false)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Stats,
    Set {
        all: Vec<(String, String)>,
        links: Vec<LinkOverride>,
        /// Start from the defaults instead of the current settings.
        reset: bool,
        /// Traces play from their start from now on.
        #[serde(default)]
        restart_traces: bool,
    },
    Shutdown,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkStats>,
    #[serde(default)]
    pub unroutable: u64,
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    TERMINATE.store(true, Ordering::Relaxed);
}

/// Runs the daemon for `config` with state in `dir` until told to stop
/// (SIGTERM, SIGINT or a `shutdown` request). Removes everything on exit.
pub fn run_daemon(config: LabConfig, dir: &Path) -> Result<(), String> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let mut lab = Lab::up(config).map_err(|e| chain(&e))?;
    let sock = dir.join("ctl.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let state = LabState {
        name: lab.name().to_owned(),
        pid: std::process::id(),
        hosts: lab.hosts().to_vec(),
        config: lab.config().clone(),
    };
    let tmp = dir.join("lab.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state).unwrap_or_default())
        .and_then(|_| std::fs::rename(&tmp, dir.join("lab.json")))
        .map_err(|e| format!("cannot write lab.json: {e}"))?;
    eprintln!(
        "netlab: lab {} up with {} hosts",
        lab.name(),
        lab.hosts().len()
    );
    while !TERMINATE.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if handle(&mut lab, stream) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                eprintln!("netlab: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    eprintln!("netlab: lab {} going down", lab.name());
    drop(lab);
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Answers one request; true when the daemon should stop.
fn handle(lab: &mut Lab, stream: UnixStream) -> bool {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST_BYTES));
    let req = match reader.read_line(&mut line) {
        Ok(_) => serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}")),
        Err(e) => Err(format!("cannot read request: {e}")),
    };
    let mut stop = false;
    let resp = match req {
        Err(e) => Response {
            error: Some(e),
            links: Vec::new(),
            unroutable: 0,
        },
        Ok(Request::Stats) => Response {
            error: None,
            links: lab.stats(),
            unroutable: lab.unroutable(),
        },
        Ok(Request::Set {
            all,
            links,
            reset,
            restart_traces,
        }) => {
            let result = lab.set(all, links, reset);
            if result.is_ok() && restart_traces {
                lab.restart_traces();
            }
            Response {
                error: result.err().map(|e| chain(&e)),
                links: lab.stats(),
                unroutable: lab.unroutable(),
            }
        }
        Ok(Request::Shutdown) => {
            stop = true;
            Response {
                error: None,
                links: Vec::new(),
                unroutable: 0,
            }
        }
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    let _ = (&stream).write_all(&out);
    stop
}

/// Sends one request to the daemon of `lab`.
pub fn request(lab: &str, req: &Request) -> Result<Response, String> {
    let sock = state_dir(lab).join("ctl.sock");
    let stream = UnixStream::connect(&sock)
        .map_err(|e| format!("lab {lab} is not running ({}: {e})", sock.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut msg = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    msg.push(b'\n');
    (&stream)
        .write_all(&msg)
        .map_err(|e| format!("cannot talk to lab {lab}: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from lab {lab}: {e}"))?;
    let resp: Response =
        serde_json::from_str(&line).map_err(|e| format!("bad answer from lab {lab}: {e}"))?;
    match resp.error {
        Some(e) => Err(e),
        None => Ok(resp),
    }
}

/// Waits until `pred` holds or `within` passes.
pub fn wait_until(within: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pred()
}

/// `error: cause: cause`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
