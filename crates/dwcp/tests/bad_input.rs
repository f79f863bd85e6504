//! Bad input of every kind gets a clear error, and nothing already running
//! or stored is touched.

mod common;

use std::time::Duration;

use common::*;

fn spec_json(name: &str, memory: u64, kernel: &str) -> String {
    let g = guest_dir();
    serde_json::json!({
        "name": name,
        "memory_bytes": memory,
        "kernel": kernel,
        "initrd": g.join("initrd.img"),
        "append": "console=ttyS0 dwcp.mem_mb=8",
    })
    .to_string()
}

#[test]
fn bad_requests_are_refused_and_nothing_is_touched() {
    let agent = Agent::start();
    agent.create_guest("steady", "");
    let steady = agent.show("steady");
    let kernel = guest_dir().join("vmlinuz").display().to_string();
    let url = &agent.url;

    // Through the API, each with its stable code.
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "zero memory",
            spec_json("a", 0, &kernel),
            400,
            "invalid_spec",
        ),
        (
            "absurd memory",
            spec_json("a", 1 << 50, &kernel),
            400,
            "invalid_spec",
        ),
        (
            "missing kernel",
            spec_json("a", 128 << 20, "/nonexistent/vmlinuz"),
            400,
            "invalid_spec",
        ),
        (
            "relative kernel",
            spec_json("a", 128 << 20, "vmlinuz"),
            400,
            "invalid_spec",
        ),
        (
            "duplicate name",
            spec_json("steady", 128 << 20, &kernel),
            409,
            "vm_exists",
        ),
        (
            "bad name",
            spec_json("Bad Name", 128 << 20, &kernel),
            400,
            "invalid_spec",
        ),
        (
            "malformed JSON",
            "{\"name\": \"a\", ".into(),
            400,
            "invalid_json",
        ),
        (
            "wrong type",
            "{\"name\": 5, \"memory_bytes\": \"lots\"}".into(),
            400,
            "invalid_json",
        ),
        (
            "unknown field",
            "{\"name\": \"a\", \"memory_bytes\": 134217728, \"kernal\": \"/k\"}".into(),
            400,
            "invalid_json",
        ),
        ("empty body", String::new(), 400, "invalid_json"),
    ];
    for (what, body, status, code) in cases {
        let (s, b) = http(url, "POST", "/v1/vms", body.as_bytes());
        assert_eq!((s, error_code(&b).as_str()), (status, code), "{what}: {b}");
    }
    let (s, b) = http(url, "POST", "/v1/vms", &vec![b' '; 2 << 20]);
    assert_eq!(
        (s, error_code(&b).as_str()),
        (413, "body_too_large"),
        "huge body: {b}"
    );
    let (s, b) = http(
        url,
        "POST",
        "/v1/vms?start=maybe",
        spec_json("a", 128 << 20, &kernel).as_bytes(),
    );
    assert_eq!(
        (s, error_code(&b).as_str()),
        (400, "invalid_spec"),
        "bad query: {b}"
    );

    // Unknown VMs, routes and methods.
    for (method, path) in [
        ("GET", "/v1/vms/ghost"),
        ("POST", "/v1/vms/ghost/start"),
        ("POST", "/v1/vms/ghost/stop"),
        ("DELETE", "/v1/vms/ghost"),
    ] {
        let (s, b) = http(url, method, path, b"");
        assert_eq!(
            (s, error_code(&b).as_str()),
            (404, "vm_not_found"),
            "{method} {path}: {b}"
        );
    }
    let (s, b) = http(url, "GET", "/v1/nothing-here", b"");
    assert_eq!((s, error_code(&b).as_str()), (404, "not_found"), "{b}");
    let (s, b) = http(url, "PUT", "/v1/vms", b"{}");
    assert_eq!(s, 405, "{b}");
    error_code(&b);
    let (s, b) = http(
        url,
        "POST",
        "/v1/vms/steady/stop",
        b"{\"timeout_secs\": -3}",
    );
    assert_eq!((s, error_code(&b).as_str()), (400, "invalid_json"), "{b}");

    // A QEMU that refuses to start: a disk that is not qcow2. The VM is not kept.
    let junk = agent.dir.join("junk.qcow2");
    std::fs::write(&junk, b"not a disk image").expect("junk");
    let body = serde_json::json!({"name": "broken", "memory_bytes": 128u64 << 20, "disk": junk})
        .to_string();
    let (s, b) = http(url, "POST", "/v1/vms", body.as_bytes());
    assert_eq!((s, error_code(&b).as_str()), (502, "qemu_failed"), "{b}");
    assert!(
        b.contains("qcow2"),
        "the message should carry QEMU's own reason: {b}"
    );
    let (s, _) = http(url, "GET", "/v1/vms/broken", b"");
    assert_eq!(s, 404, "a VM whose QEMU failed to start must not be kept");

    // Through the CLI: one clear line and a non-zero exit.
    for (args, want) in [
        (
            vec!["vm", "create", "x", "--memory", "12Q", "--kernel", "/k"],
            "unknown unit",
        ),
        (
            vec![
                "vm",
                "create",
                "x",
                "--memory",
                "0",
                "--kernel",
                kernel.as_str(),
            ],
            "too small",
        ),
        (
            vec![
                "vm",
                "create",
                "x",
                "--memory",
                "64T",
                "--kernel",
                kernel.as_str(),
            ],
            "more than this host can give",
        ),
        (
            vec![
                "vm",
                "create",
                "x",
                "--memory",
                "128M",
                "--kernel",
                "/no/such/kernel",
            ],
            "No such file",
        ),
        (
            vec!["vm", "create", "x", "--memory", "128M"],
            "needs a kernel or a disk",
        ),
        (
            vec![
                "vm",
                "create",
                "x",
                "--memory",
                "128M",
                "--kernel",
                kernel.as_str(),
                "--label",
                "novalue",
            ],
            "expected KEY=VALUE",
        ),
        (vec!["vm", "stop", "ghost"], "no VM named \"ghost\""),
        (vec!["vm", "frobnicate"], "unrecognized subcommand"),
        (
            vec!["vm", "list", "--api", "http://127.0.0.1:1"],
            "cannot reach the agent",
        ),
        (
            vec!["vm", "list", "--api", "ftp://x"],
            "is not an agent URL",
        ),
    ] {
        let err = agent.fails(&args);
        assert!(
            err.contains(want),
            "dwcp {args:?}: expected {want:?} in {err:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }

    // The running VM and the store are as they were.
    let after = agent.show("steady");
    assert_eq!(after["state"], "running");
    assert_eq!(after["pid"], steady["pid"]);
    let list: serde_json::Value =
        serde_json::from_str(&agent.ok(&["vm", "list", "--json"])).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    agent.wait_tick("steady", 2, Duration::from_secs(90));
}

#[test]
fn bad_agent_configuration_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "acel = \"tcg\"\n").expect("write");
    let out = std::process::Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is not valid") && err.contains("unknown field `acel`"),
        "{err}"
    );

    let out = std::process::Command::new(BIN)
        .args(["agent", "--data-dir"])
        .arg(dir.path())
        .args(["--qemu", "/nonexistent/qemu", "--api", "127.0.0.1:0"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("QEMU binary /nonexistent/qemu cannot be run"),
        "{err}"
    );

    let out = std::process::Command::new(BIN)
        .args(["agent", "--accel", "warp"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected auto, kvm or tcg"));
}

#[test]
fn config_file_env_and_flags_merge_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let from_file = dir.path().join("from-file");
    let from_flag = dir.path().join("from-flag");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{}\"\naccel = \"kvm\"\nnode_name = \"filenode\"\n",
            from_file.display()
        ),
    )
    .expect("write");
    // env beats the file (accel), the flag beats the file (data dir).
    let mut child = std::process::Command::new(BIN)
        .args(["agent", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&from_flag)
        .args(["--api", "127.0.0.1:0"])
        .env("DWCP_ACCEL", "tcg")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let addr = wait_for("api.addr", Duration::from_secs(30), || {
        std::fs::read_to_string(from_flag.join("api.addr"))
            .ok()
            .filter(|s| !s.is_empty())
    });
    let (s, b) = http(&format!("http://{addr}"), "GET", "/v1/node", b"");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(s, 200);
    let n: serde_json::Value = serde_json::from_str(&b).expect("json");
    assert_eq!(n["name"], "filenode");
    assert_eq!(n["accel"], "tcg");
    assert_eq!(n["data_dir"], from_flag.display().to_string());
    assert!(!from_file.exists());
}
