//! Shared helpers for the integration tests: they run the real `dwcp`
//! binary (agent and CLI) and boot the real test guest under TCG.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_dwcp");

/// The test guest built by `scripts/build-guest` (`make test` builds it).
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("DWCP_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file(),
        "no test guest in {} (run `scripts/build-guest target/guest`, or `make test`)",
        dir.display()
    );
    dir
}

/// Polls `f` every 100 ms until it returns Some, or panics after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `dwcp agent` process on a temp data dir with the API on a free port.
pub struct Agent {
    pub dir: PathBuf,
    pub url: String,
    /// The network namespace the agent (and so its CLI) runs in.
    netns: Option<String>,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Agent {
    pub fn start() -> Agent {
        let tmp = tempfile::Builder::new()
            .prefix("dwcp-t-")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().to_owned();
        let mut a = Agent::start_in(&dir, &["--accel", "tcg"]);
        a._tmp = Some(tmp);
        a
    }

    /// Starts an agent on an existing data dir (for restarts).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_netns(dir, extra, None)
    }

    /// Starts an agent inside network namespace `netns` (a netlab host).
    pub fn start_netns(dir: &Path, extra: &[&str], netns: Option<&str>) -> Agent {
        let addr_file = dir.join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        std::fs::create_dir_all(dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent-test.log"))
            .expect("agent log");
        let child = command_in(netns)
            .args(["agent", "--data-dir"])
            .arg(dir)
            .args(["--api", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "debug")
            .env_remove("DWCP_API")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        let mut agent = Agent {
            dir: dir.to_owned(),
            url: String::new(),
            child: Some(child),
            netns: netns.map(str::to_owned),
            _tmp: None,
        };
        let addr = wait_for("the agent to listen", Duration::from_secs(30), || {
            if let Some(c) = agent.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("agent exited early ({status}): {}", agent.log());
                }
            }
            std::fs::read_to_string(&addr_file)
                .ok()
                .filter(|s| !s.is_empty())
        });
        agent.url = format!("http://{addr}");
        agent
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent-test.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends `sig` and waits for the agent to exit; returns its status.
    pub fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        kill(child.id(), sig);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `dwcp ARGS` against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        command_in(self.netns.as_deref())
            .args(args)
            .env("DWCP_API", &self.url)
            .stdin(Stdio::null())
            .output()
            .expect("run dwcp")
    }

    /// Starts `dwcp ARGS` against this agent without waiting.
    pub fn spawn_cli(&self, args: &[&str]) -> std::process::Child {
        command_in(self.netns.as_deref())
            .args(args)
            .env("DWCP_API", &self.url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run dwcp")
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "dwcp {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "dwcp {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn show(&self, name: &str) -> Value {
        serde_json::from_str(&self.ok(&["vm", "show", name, "--json"])).expect("show json")
    }

    pub fn state(&self, name: &str) -> String {
        self.show(name)["state"].as_str().unwrap_or("?").to_owned()
    }

    pub fn console(&self, name: &str) -> String {
        self.ok(&["vm", "console", name])
    }

    /// Creates a VM booting the test guest with a small workload.
    pub fn create_guest(&self, name: &str, extra_append: &str) {
        let g = guest_dir();
        let append = format!(
            "console=ttyS0 quiet panic=-1 dwcp.mem_mb=16 dwcp.dirty_pages=200 {extra_append}"
        );
        self.ok(&[
            "vm",
            "create",
            name,
            "--memory",
            "128M",
            "--kernel",
            &g.join("vmlinuz").display().to_string(),
            "--initrd",
            &g.join("initrd.img").display().to_string(),
            "--append",
            &append,
        ]);
    }

    /// Waits until the guest has printed TICK number `n` (or later).
    pub fn wait_tick(&self, name: &str, n: u64, within: Duration) -> u64 {
        wait_for(&format!("TICK {n} from {name}"), within, || {
            let c = self.console(name);
            assert!(
                !c.contains("CORRUPT"),
                "guest {name} reports CORRUPT memory:\n{c}"
            );
            last_tick(&c).filter(|t| *t >= n)
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_qemus_under(&self.dir);
    }
}

/// `dwcp`, run in network namespace `netns` when given.
fn command_in(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    }
}

/// The TICK numbers in console text, in order.
fn ticks(console: &str) -> impl DoubleEndedIterator<Item = u64> + '_ {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TICK "))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
}

pub fn last_tick(console: &str) -> Option<u64> {
    ticks(console).next_back()
}

pub fn first_tick(console: &str) -> Option<u64> {
    ticks(console).next()
}

/// Kills every process whose command line mentions `dir` (the QEMUs of a
/// test's agent), so no test leaves a VM behind.
pub fn kill_qemus_under(dir: &Path) {
    let needle = dir.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.starts_with("qemu-system") && cmd.contains(&needle) {
                kill(pid as u32, SIGKILL);
            }
        }
    }
}

pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
                .unwrap_or(true)
        })
        .unwrap_or(false)
}

/// kill(2); a process that is already gone is fine.
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub use libc::{SIGINT, SIGKILL, SIGTERM};

/// A raw HTTP/1.1 request (the body as given, however wrong), returning
/// the status and the body.
pub fn http(url: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect to agent");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write head");
    // The server may answer (413) and close before the whole body is sent.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The `code` of a JSON error body.
pub fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {body}"
    );
    v["code"].as_str().unwrap_or("").to_owned()
}
