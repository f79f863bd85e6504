//! AMST between real processes over netlab links: byte-exact transfers,
//! connections killed mid-way, a link that goes silent, and peers whose
//! certificates must be refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::BIN;
use dwcp_netlab::{Lab, LabConfig};

fn lab(tag: &str, settings: &[(&str, &str)]) -> Lab {
    let name = format!("x{}{tag}", std::process::id() % 100_000);
    let mut cfg = LabConfig::new(&name, &["a", "b"]);
    cfg.all = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Lab::up(cfg).expect("lab up")
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tmp");
        let p = Pki { dir };
        p.dwcp(&["cluster", "init", "--dir", &p.path("ca")]);
        for n in ["alpha", "beta"] {
            p.dwcp(&[
                "cluster",
                "issue",
                "--dir",
                &p.path("ca"),
                "--node",
                n,
                "--out",
                &p.path(n),
            ]);
        }
        p
    }
    fn path(&self, p: &str) -> String {
        self.dir.path().join(p).display().to_string()
    }
    fn dwcp(&self, args: &[&str]) -> String {
        let out = Command::new(BIN).args(args).output().expect("run dwcp");
        assert!(
            out.status.success(),
            "dwcp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// A file of `mb` MiB of pseudo-random bytes.
    fn file(&self, name: &str, mb: usize) -> PathBuf {
        let path = self.dir.path().join(name);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ mb as u64;
        let mut data = Vec::with_capacity(mb << 20);
        while data.len() < mb << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(&path, &data).expect("write");
        path
    }
}

/// A child process that is killed if the test ends (or panics) first.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn recv(lab: &Lab, pki: &Pki, tls: &str, out: &Path) -> Proc {
    let addr = format!("{}:7481", lab.addr("b").expect("b"));
    lab.command("b", BIN)
        .expect("cmd")
        .args([
            "transfer",
            "recv",
            "--listen",
            &addr,
            "--tls",
            &pki.path(tls),
            "--out",
        ])
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(|c| Proc(Some(c)))
        .expect("recv")
}

fn send(lab: &Lab, pki: &Pki, tls: &str, file: &Path, extra: &[&str]) -> Proc {
    let to = format!("{}:7481", lab.addr("b").expect("b"));
    lab.command("a", BIN)
        .expect("cmd")
        .args(["transfer", "send"])
        .arg(file)
        .args(["--to", &to, "--tls", &pki.path(tls), "--json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(|c| Proc(Some(c)))
        .expect("send")
}

fn finish(mut proc: Proc, within: Duration) -> Output {
    let child = proc.0.take().expect("running");
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            if !common::pid_alive(pid) {
                return;
            }
        }
        common::kill(pid, common::SIGKILL);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = killer.join();
    out
}

fn report(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "send failed: {}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("report is not JSON ({e}): {text}"))
}

fn same(a: &Path, b: &Path) {
    let x = std::fs::read(a).expect("read a");
    let y = std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert!(x == y, "received file differs from the one sent");
}

/// Kills the sender's established connections to port 7481 (all, or the
/// first `only`) from inside host a.
fn kill_connections(lab: &Lab, only: Option<usize>) -> usize {
    let out = lab
        .command("a", "ss")
        .expect("cmd")
        .args(["-Htn", "state", "established", "( dport = :7481 )"])
        .output()
        .expect("ss");
    let ports: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)?
                .rsplit(':')
                .next()
                .map(str::to_owned)
        })
        .collect();
    let take = only.unwrap_or(ports.len()).min(ports.len());
    // All at once when all are to die: one by one, the sender would open a
    // replacement for the first before the last is gone.
    let filters: Vec<String> = match only {
        None => vec!["( dport = :7481 )".into()],
        Some(_) => ports[..take]
            .iter()
            .map(|p| format!("( sport = :{p} )"))
            .collect(),
    };
    for filter in &filters {
        lab.command("a", "ss")
            .expect("cmd")
            .args(["-K", "-Htn", "state", "established", filter])
            .output()
            .expect("ss -K");
    }
    take
}

#[test]
fn transfer_over_a_lossy_wan_link_is_byte_exact() {
    let pki = Pki::new();
    let lab = lab(
        "w",
        &[("rate", "100mbit"), ("delay", "20ms"), ("loss", "1%")],
    );
    let file = pki.file("data.bin", 24);
    let out = pki.dir.path().join("got.bin");
    let r = recv(&lab, &pki, "beta", &out);
    std::thread::sleep(Duration::from_millis(300));
    let s = finish(
        send(&lab, &pki, "alpha", &file, &["--peer", "beta"]),
        Duration::from_secs(60),
    );
    let rep = report(&s);
    let r = finish(r, Duration::from_secs(10));
    assert!(
        r.status.success(),
        "recv: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    same(&file, &out);
    assert_eq!(rep["bytes"], 24u64 << 20);
    assert!(rep["streams_max"].as_u64().unwrap_or(0) >= 1);
    // 24 MiB at 100 Mbit/s is 2 s; BBR under 1 % loss keeps most of it.
    assert!(rep["goodput_bps"].as_f64().unwrap_or(0.0) > 30e6, "{rep}");
    assert!(String::from_utf8_lossy(&r.stdout).contains("verified"));
    // Auto mode explains each change of the stream count.
    for d in rep["stream_decisions"].as_array().expect("decisions") {
        assert!(!d["reason"].as_str().unwrap_or("").is_empty(), "{d}");
        assert_ne!(d["from"], d["to"]);
    }
}

#[test]
fn connections_killed_mid_transfer_lose_and_duplicate_nothing() {
    let pki = Pki::new();
    let lab = lab("k", &[("rate", "80mbit"), ("delay", "10ms")]);
    let file = pki.file("data.bin", 48);
    for (round, only) in [(0, Some(1)), (1, None)] {
        let out = pki.dir.path().join(format!("got{round}.bin"));
        let r = recv(&lab, &pki, "beta", &out);
        std::thread::sleep(Duration::from_millis(300));
        let s = send(&lab, &pki, "alpha", &file, &["--streams", "3"]);
        // Wait until the transfer is well under way, then cut.
        std::thread::sleep(Duration::from_millis(1500));
        let killed = kill_connections(&lab, only);
        assert!(killed >= 1, "no connection to kill (round {round})");
        let rep = report(&finish(s, Duration::from_secs(60)));
        let r = finish(r, Duration::from_secs(10));
        assert!(
            r.status.success(),
            "recv: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        same(&file, &out);
        assert!(
            rep["retransmitted_frames"].as_u64().unwrap_or(0) > 0,
            "round {round}: {rep}"
        );
        if only.is_none() {
            assert!(
                rep["reconnects"].as_u64().unwrap_or(0) >= 1,
                "all connections died: {rep}"
            );
        }
    }
}

#[test]
fn a_link_that_goes_silent_resumes_when_it_comes_back() {
    let pki = Pki::new();
    let mut lab = lab("o", &[("rate", "50mbit"), ("delay", "10ms")]);
    let file = pki.file("data.bin", 32);
    let out = pki.dir.path().join("got.bin");
    let r = recv(&lab, &pki, "beta", &out);
    std::thread::sleep(Duration::from_millis(300));
    let s = send(&lab, &pki, "alpha", &file, &["--streams", "2"]);
    std::thread::sleep(Duration::from_millis(1500));
    // Every packet lost for 8 s: TCP does not notice; the stall watchdog does.
    lab.set(vec![("loss".into(), "99.99%".into())], vec![], false)
        .expect("outage");
    std::thread::sleep(Duration::from_secs(8));
    lab.set(vec![("loss".into(), "0%".into())], vec![], false)
        .expect("back");
    let rep = report(&finish(s, Duration::from_secs(90)));
    let r = finish(r, Duration::from_secs(10));
    assert!(
        r.status.success(),
        "recv: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    same(&file, &out);
    assert!(rep["reconnects"].as_u64().unwrap_or(0) >= 1, "{rep}");
}

#[test]
fn foreign_expired_and_misnamed_certificates_are_refused() {
    let pki = Pki::new();
    pki.dwcp(&["cluster", "init", "--dir", &pki.path("other-ca")]);
    pki.dwcp(&[
        "cluster",
        "issue",
        "--dir",
        &pki.path("other-ca"),
        "--node",
        "mallory",
        "--out",
        &pki.path("mallory"),
    ]);
    // Mallory knows our (public) CA certificate, so she gets as far as
    // showing her own certificate, which our CA did not sign.
    std::fs::copy(
        pki.dir.path().join("ca/ca.pem"),
        pki.dir.path().join("mallory/ca.pem"),
    )
    .expect("copy");
    pki.dwcp(&[
        "cluster",
        "issue",
        "--dir",
        &pki.path("ca"),
        "--node",
        "old",
        "--out",
        &pki.path("old"),
        "--valid-for",
        "1s",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let lab = lab("c", &[("delay", "2ms")]);
    let file = pki.file("data.bin", 1);
    let out = pki.dir.path().join("got.bin");
    let r = recv(&lab, &pki, "beta", &out);
    std::thread::sleep(Duration::from_millis(300));
    for (who, extra, want) in [
        ("mallory", vec![], "handshake"),
        ("old", vec![], "handshake"),
        (
            "alpha",
            vec!["--peer", "gamma"],
            "not valid for name \"gamma\"",
        ),
    ] {
        let o = finish(
            send(&lab, &pki, who, &file, &extra),
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{who} must be refused");
        assert!(
            err.contains(want) || err.to_lowercase().contains(&want.to_lowercase()),
            "{who}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // The receiver refused them and still takes a good transfer.
    let s = finish(
        send(&lab, &pki, "alpha", &file, &["--peer", "beta"]),
        Duration::from_secs(30),
    );
    report(&s);
    let r = finish(r, Duration::from_secs(10));
    assert!(r.status.success());
    same(&file, &out);
    let log = String::from_utf8_lossy(&r.stderr);
    let refusals = log
        .lines()
        .filter(|l| l.contains("refused connection"))
        .count();
    assert!(
        refusals >= 2,
        "receiver should log each refused peer:\n{log}"
    );
    assert!(
        log.contains("UnknownIssuer") || log.contains("unknown issuer"),
        "{log}"
    );
    assert!(log.contains("Expired") || log.contains("expired"), "{log}");
}

#[test]
fn cluster_cli_checks_its_input() {
    let pki = Pki::new();
    for (args, want) in [
        (
            vec!["cluster", "init", "--dir", &pki.path("ca")],
            "refusing to overwrite",
        ),
        (
            vec![
                "cluster",
                "issue",
                "--dir",
                &pki.path("ca"),
                "--node",
                "Bad_Name",
                "--out",
                &pki.path("x"),
            ],
            "node name",
        ),
        (
            vec![
                "cluster",
                "issue",
                "--dir",
                &pki.path("nope"),
                "--node",
                "n",
                "--out",
                &pki.path("x"),
            ],
            "cannot read",
        ),
        (
            vec![
                "cluster",
                "issue",
                "--dir",
                &pki.path("ca"),
                "--node",
                "n",
                "--out",
                &pki.path("x"),
                "--valid-for",
                "3w",
            ],
            "unit",
        ),
        (
            vec![
                "transfer",
                "send",
                "/etc/hostname",
                "--to",
                "127.0.0.1:1",
                "--tls",
                &pki.path("alpha"),
                "--streams",
                "99",
            ],
            "expected auto or 1 to 16",
        ),
        (
            vec![
                "transfer",
                "send",
                "/etc/hostname",
                "--to",
                "127.0.0.1:1",
                "--tls",
                &pki.path("none"),
            ],
            "cannot read",
        ),
        (
            vec![
                "transfer",
                "send",
                "/no/such/file",
                "--to",
                "127.0.0.1:1",
                "--tls",
                &pki.path("alpha"),
            ],
            "cannot open",
        ),
        (
            vec![
                "transfer",
                "send",
                "/etc/hostname",
                "--to",
                "127.0.0.1:1",
                "--tls",
                &pki.path("alpha"),
            ],
            "cannot connect",
        ),
    ] {
        let out = Command::new(BIN).args(&args).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
