//! Live checkpoints and restores of the real guest under TCG: continuity of
//! TICK with OK, incremental sizes, byte-exact memory, corruption and
//! missing pages caught by their digests, a full disk and a killed agent
//! in the middle of a checkpoint.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use redb::ReadableTable;
use serde_json::Value;

const PAGE: u64 = 4096;

fn checkpoint(agent: &Agent, vm: &str) -> Value {
    serde_json::from_str(&agent.ok(&["vm", "checkpoint", vm, "--json"])).expect("checkpoint json")
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn checkpoint_restore_continuity_increments_and_exact_memory() {
    let agent = Agent::start();
    agent.create_guest("web", "dwcp.mem_mb=32 dwcp.fill=text dwcp.dirty_pages=300");
    agent.wait_tick("web", 2, Duration::from_secs(90));

    // A full checkpoint of a running guest: it keeps running.
    let a = checkpoint(&agent, "web");
    assert_eq!(a["id"], "web@1");
    assert!(a["parent"].is_null());
    let pause = n(&a, "pause_ms");
    assert!(pause < 5_000, "paused {pause} ms");
    assert!(n(&a, "new_pages") > 8_000, "{a}");
    // Text pages compress: the store holds less than the stream.
    assert!(n(&a, "stored_bytes") * 2 < n(&a, "stream_bytes"), "{a}");
    assert_eq!(agent.state("web"), "running");

    // The guest dirties ~300 pages a second; the next checkpoint stores
    // only what changed, mostly as small deltas.
    std::thread::sleep(Duration::from_secs(3));
    let before = last_tick(&agent.console("web")).expect("ticks");
    let b = checkpoint(&agent, "web");
    assert_eq!(b["id"], "web@2");
    assert_eq!(b["parent"], "web@1");
    let changed = n(&b, "changed_pages");
    assert!(changed > 100, "{b}");
    assert!(n(&b, "new_pages") <= changed);
    assert!(n(&b, "delta_pages") > 0, "{b}");
    assert!(
        n(&b, "stored_bytes") * 2 <= changed * PAGE * 3,
        "incremental checkpoint stored {} bytes for {changed} changed pages",
        n(&b, "stored_bytes")
    );
    assert!(n(&b, "stored_bytes") * 10 < n(&a, "stored_bytes"), "{b}");

    // Restored, the guest goes on counting from where it was, with OK.
    let out = agent.ok(&["vm", "restore", "web@2", "--name", "copy"]);
    assert!(out.contains("VM copy is running"), "{out}");
    let t = agent.wait_tick("copy", 0, Duration::from_secs(60));
    let first = first_tick(&agent.console("copy")).expect("ticks");
    assert!(
        first >= before && first <= before + 3,
        "restored guest started at TICK {first}, checkpoint taken after TICK {before}"
    );
    agent.wait_tick("copy", t + 3, Duration::from_secs(60));
    agent.ok(&["vm", "delete", "copy", "--force"]);
    // The original never noticed.
    let now = last_tick(&agent.console("web")).expect("ticks");
    agent.wait_tick("web", now + 1, Duration::from_secs(30));

    // Byte-exact: a paused guest, checkpointed, restored paused and
    // checkpointed again, has the same memory fingerprint.
    agent.ok(&["vm", "pause", "web"]);
    let c = checkpoint(&agent, "web");
    assert!(c["pause_ms"].is_null(), "a paused VM is not paused again");
    agent.ok(&[
        "vm",
        "restore",
        c["id"].as_str().unwrap(),
        "--name",
        "twin",
        "--paused",
    ]);
    assert_eq!(agent.state("twin"), "paused");
    let d = checkpoint(&agent, "twin");
    assert_eq!(c["memory_digest"], d["memory_digest"], "{c}\n{d}");
    assert!(c["memory_digest"].as_str().is_some_and(|s| s.len() == 64));
    // Every page was already stored: nothing new.
    assert_eq!(n(&d, "new_pages"), 0, "{d}");
    agent.ok(&["vm", "resume", "twin"]);
    agent.ok(&["vm", "resume", "web"]);
    let t = last_tick(&agent.console("web")).expect("ticks");
    agent.wait_tick("web", t + 1, Duration::from_secs(30));
    let t = agent.wait_tick("twin", 0, Duration::from_secs(60));
    agent.wait_tick("twin", t + 1, Duration::from_secs(60));

    // Listing, showing, deleting; later checkpoints survive their parent.
    let list = agent.ok(&["checkpoint", "list"]);
    for id in ["web@1", "web@2", "web@3", "twin@1"] {
        assert!(
            list.lines().any(|l| l.starts_with(id)),
            "{id} not in\n{list}"
        );
    }
    let shown = agent.ok(&["checkpoint", "show", "web@2"]);
    assert!(shown.contains("parent:   web@1"), "{shown}");
    let del = agent.ok(&["checkpoint", "delete", "web@1"]);
    assert!(del.starts_with("deleted checkpoint web@1"), "{del}");
    let b2: Value =
        serde_json::from_str(&agent.ok(&["checkpoint", "show", "web@2", "--json"])).expect("json");
    assert!(b2["parent"].is_null(), "{b2}");
    let err = agent.fails(&["checkpoint", "show", "web@1"]);
    assert!(err.contains("[checkpoint_not_found]"), "{err}");
    let verify = agent.ok(&["checkpoint", "verify"]);
    assert!(
        verify.contains("web@2") && !verify.contains("BROKEN"),
        "{verify}"
    );
    agent.ok(&["vm", "delete", "twin", "--force"]);
    let out = agent.ok(&["vm", "restore", "web@2", "--name", "again"]);
    assert!(out.contains("running"), "{out}");
    let t = agent.wait_tick("again", 0, Duration::from_secs(60));
    agent.wait_tick("again", t + 1, Duration::from_secs(60));

    // Bad requests are refused clearly.
    let err = agent.fails(&["vm", "restore", "web@2", "--name", "web"]);
    assert!(err.contains("[vm_exists]"), "{err}");
    let err = agent.fails(&["vm", "restore", "nope@1", "--name", "x"]);
    assert!(err.contains("[checkpoint_not_found]"), "{err}");
    let err = agent.fails(&["vm", "restore", "web@2", "--name", "Bad_Name"]);
    assert!(err.contains("[invalid_spec]"), "{err}");
    let err = agent.fails(&["vm", "checkpoint", "nope"]);
    assert!(err.contains("[vm_not_found]"), "{err}");
    agent.ok(&["vm", "stop", "again", "--force"]);
    let err = agent.fails(&["vm", "checkpoint", "again"]);
    assert!(err.contains("only a running or paused VM"), "{err}");
}

/// Flips a byte inside a stored page object, or removes its index entry,
/// with the agent stopped; returns the page's digest (16 hex digits, as
/// messages name it).
fn damage_a_page(data_dir: &Path, remove: bool, skip: usize) -> String {
    const INDEX: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("index");
    const PACKS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("packs");
    let db = redb::Database::open(data_dir.join("pages.redb")).expect("open store");
    let tx = db.begin_write().expect("write");
    let digest;
    {
        let mut index = tx.open_table(INDEX).expect("index");
        let mut packs = tx.open_table(PACKS).expect("packs");
        let mut found = None;
        let mut seen = 0;
        for row in index.iter().expect("iter") {
            let (k, v) = row.expect("row");
            let v = v.value();
            let pack = u64::from_be_bytes(v[..8].try_into().unwrap());
            let offset = u32::from_be_bytes(v[8..12].try_into().unwrap()) as usize;
            let len = u32::from_be_bytes(v[12..].try_into().unwrap()) as usize;
            let bytes = packs
                .get(pack)
                .expect("get")
                .expect("pack")
                .value()
                .to_vec();
            // Kind 1: a zstd page (not a blob, not a delta).
            if bytes[offset] == 1 && len > 200 {
                if seen == skip {
                    found = Some((k.value().to_vec(), pack, offset, len, bytes));
                    break;
                }
                seen += 1;
            }
        }
        let (key, pack, offset, len, mut bytes) = found.expect("a zstd page object");
        digest = key[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        if remove {
            index.remove(key.as_slice()).expect("remove");
        } else {
            bytes[offset + len / 2] ^= 0x5a;
            packs.insert(pack, bytes.as_slice()).expect("insert");
        }
    }
    tx.commit().expect("commit");
    digest
}

#[test]
fn corrupt_or_missing_pages_are_named_and_the_restore_refused() {
    let mut agent = Agent::start();
    agent.create_guest("web", "dwcp.mem_mb=24 dwcp.fill=text");
    agent.wait_tick("web", 1, Duration::from_secs(90));
    checkpoint(&agent, "web");
    let dir = agent.dir.clone();

    agent.signal_and_wait(libc::SIGTERM);
    let bad = damage_a_page(&dir, false, 0);
    let agent = Agent::start_in(&dir, &["--accel", "tcg"]);
    wait_for("web re-attached", Duration::from_secs(30), || {
        (agent.state("web") == "running").then_some(())
    });

    let err = agent.fails(&["vm", "restore", "web@1", "--name", "copy"]);
    assert!(
        err.contains(&format!("page {bad}"))
            && err.contains("is corrupt")
            && err.contains("[checkpoint_corrupt]"),
        "{err}"
    );
    // Nothing was left behind; the original runs on.
    assert!(!agent.ok(&["vm", "list"]).contains("copy"));
    let t = last_tick(&agent.console("web")).expect("ticks");
    agent.wait_tick("web", t + 1, Duration::from_secs(30));
    // verify names it and fails.
    let out = agent.cli(&["checkpoint", "verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("BROKEN") && text.contains(&bad), "{text}");
    let one = agent.cli(&["checkpoint", "verify", "web@1", "--json"]);
    let r: Value = serde_json::from_slice(&one.stdout).expect("json");
    assert_eq!(r["ok"], false);
    assert!(r["checkpoints"][0]["problems"][0]
        .as_str()
        .is_some_and(|p| p.contains(&bad)));

    // A missing page is caught before any QEMU starts.
    let mut agent = agent;
    agent.signal_and_wait(libc::SIGTERM);
    let gone = damage_a_page(&dir, true, 3);
    let agent = Agent::start_in(&dir, &["--accel", "tcg"]);
    let err = agent.fails(&["vm", "restore", "web@1", "--name", "copy"]);
    assert!(
        err.contains("is missing from the store [checkpoint_corrupt]"),
        "{err}"
    );
    assert!(!agent.ok(&["vm", "list"]).contains("copy"));
    let out = agent.cli(&["checkpoint", "verify", "web@1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&gone) && text.contains(&bad), "{text}");
    // A fresh checkpoint stores the damaged pages again and is whole.
    let c = checkpoint(&agent, "web");
    let ok = agent.ok(&["checkpoint", "verify", c["id"].as_str().unwrap()]);
    assert!(!ok.contains("BROKEN"), "{ok}");
}

struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_mid_checkpoint_harms_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128M", "tmpfs"])
        .arg(&small)
        .status()
        .expect("mount");
    assert!(st.success(), "mounting a tmpfs needs root");
    let _mounted = Tmpfs(small.clone());
    // The page store lives on the small disk; everything else does not.
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::os::unix::fs::symlink(small.join("pages.redb"), data.join("pages.redb")).expect("link");
    let agent = Agent::start_in(&data, &["--accel", "tcg"]);

    agent.create_guest("web", "dwcp.mem_mb=16 dwcp.fill=text");
    agent.create_guest("big", "dwcp.mem_mb=40 dwcp.fill=random");
    agent.wait_tick("web", 1, Duration::from_secs(90));
    agent.wait_tick("big", 1, Duration::from_secs(90));
    let a = checkpoint(&agent, "web");
    assert_eq!(a["id"], "web@1");

    // Leave about 8 MiB: "big" needs 40 MiB of random pages.
    let free = fs_avail(&small);
    assert!(
        free > 24 << 20,
        "only {free} bytes free after the first checkpoint"
    );

    let filler = small.join("filler");
    std::fs::write(&filler, vec![1u8; (free - (8 << 20)) as usize]).expect("fill");
    let err = agent.fails(&["vm", "checkpoint", "big"]);
    assert!(
        err.contains("No space left on device") && err.contains("[checkpoint_failed]"),
        "{err}"
    );
    // Both guests run on, unharmed; the earlier checkpoint is whole.
    for vm in ["web", "big"] {
        assert_eq!(agent.state(vm), "running");
        let t = last_tick(&agent.console(vm)).expect("ticks");
        agent.wait_tick(vm, t + 1, Duration::from_secs(30));
    }
    let list = agent.ok(&["checkpoint", "list"]);
    assert!(list.contains("web@1") && !list.contains("big@"), "{list}");
    let v = agent.ok(&["checkpoint", "verify"]);
    assert!(!v.contains("BROKEN"), "{v}");
    let out = agent.ok(&["vm", "restore", "web@1", "--name", "copy"]);
    assert!(out.contains("running"), "{out}");
    let t = agent.wait_tick("copy", 0, Duration::from_secs(60));
    agent.wait_tick("copy", t + 1, Duration::from_secs(60));
    agent.ok(&["vm", "delete", "copy", "--force"]);

    // With room again, the store works without a restart.
    std::fs::remove_file(&filler).expect("rm");

    let b = checkpoint(&agent, "big");
    assert!(n(&b, "new_pages") > 10_000, "{b}");
}

fn fs_avail(p: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

#[test]
fn an_agent_killed_mid_checkpoint_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_path_buf();
    // Slow checkpoints (8 MB/s, a few seconds each) so the kill lands in
    // the middle of one.
    std::fs::write(
        dir.join("agent.toml"),
        "checkpoint_max_bandwidth = 8000000\n",
    )
    .expect("config");
    let cfg = dir.join("agent.toml").display().to_string();
    let mut agent = Agent::start_in(&dir, &["--accel", "tcg", "--config", &cfg]);
    agent.create_guest("web", "dwcp.mem_mb=16 dwcp.fill=text");
    agent.wait_tick("web", 1, Duration::from_secs(90));
    let a = checkpoint(&agent, "web");
    assert_eq!(a["id"], "web@1");
    let objects_before = agent.ok(&["checkpoint", "verify"]);

    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_dwcp"))
        .args(["vm", "checkpoint", "web", "--api", &agent.url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cli");
    wait_for("the checkpoint to start", Duration::from_secs(10), || {
        agent.log().contains("checkpoint started").then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    agent.signal_and_wait(libc::SIGKILL);
    let out = cli.wait_with_output().expect("cli");
    assert!(
        !out.status.success(),
        "the checkpoint cannot have succeeded"
    );

    let agent = Agent::start_in(&dir, &["--accel", "tcg", "--config", &cfg]);
    wait_for(
        "web re-attached and running",
        Duration::from_secs(30),
        || (agent.state("web") == "running").then_some(()),
    );
    let t = last_tick(&agent.console("web")).expect("ticks");
    agent.wait_tick("web", t + 2, Duration::from_secs(30));
    let list = agent.ok(&["checkpoint", "list"]);
    assert!(list.contains("web@1") && !list.contains("web@2"), "{list}");
    // What the interrupted checkpoint wrote was collected on start.
    assert_eq!(agent.ok(&["checkpoint", "verify"]), objects_before);
    // The next checkpoint works, with a fresh id.
    let c = checkpoint(&agent, "web");
    assert_eq!(c["id"], "web@3");
}
