//! Nodes that know each other: two agents on a netlab link, each with a
//! node certificate and the other as a peer, measure the link over AMST;
//! a peer whose certificate names another node is refused.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use dwcp_netlab::{Lab, LabConfig};
use serde_json::Value;

fn dwcp(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_dwcp"))
        .args(args)
        .output()
        .expect("run dwcp");
    assert!(
        out.status.success(),
        "dwcp {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn peer<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no peer {name} in {list}"))
}

/// Hosts a and b of a netlab lab, and certificates of one cluster for
/// nodes alpha and beta.
struct Pair {
    lab: Lab,
    tmp: tempfile::TempDir,
}

impl Pair {
    fn new(tag: &str, settings: &[(&str, &str)]) -> Pair {
        let name = format!("{tag}{}", std::process::id() % 100_000);
        let mut cfg = LabConfig::new(&name, &["a", "b"]);
        cfg.all = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let pair = Pair {
            lab: Lab::up(cfg).expect("lab up"),
            tmp: tempfile::tempdir().expect("tmp"),
        };
        dwcp(&["cluster", "init", "--dir", &pair.path("ca")]);
        for n in ["alpha", "beta"] {
            dwcp(&[
                "cluster",
                "issue",
                "--dir",
                &pair.path("ca"),
                "--node",
                n,
                "--out",
                &pair.path(n),
            ]);
        }
        pair
    }

    fn path(&self, p: &str) -> String {
        self.tmp.path().join(p).display().to_string()
    }

    /// Where `host`'s agent listens for other nodes.
    fn amst(&self, host: &str) -> String {
        format!("{}:7481", self.lab.addr(host).expect("host"))
    }

    /// Starts `node`'s agent on `host` with `extra` flags and these peers
    /// (`NAME=ADDR`).
    fn agent(&self, node: &str, host: &str, extra: &[&str], peers: &[String]) -> Agent {
        let (identity, listen) = (self.path(node), self.amst(host));
        let mut args = vec![
            "--accel",
            "tcg",
            "--identity",
            &identity,
            "--amst-listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        for p in peers {
            args.push("--peer");
            args.push(p);
        }
        Agent::start_netns(
            &self.tmp.path().join(format!("data-{node}")),
            &args,
            Some(&self.lab.config().netns(host)),
        )
    }

    /// alpha on host a and beta on host b, each the other's peer.
    fn agents(&self) -> (Agent, Agent) {
        let alpha = self.agent("alpha", "a", &[], &[format!("beta={}", self.amst("b"))]);
        let beta = self.beta();
        (alpha, beta)
    }

    fn beta(&self) -> Agent {
        self.agent("beta", "b", &[], &[format!("alpha={}", self.amst("a"))])
    }
}

#[test]
fn peers_measure_their_link_and_refuse_a_wrong_name() {
    let pair = Pair::new("p", &[("rate", "50mbit"), ("delay", "40ms")]);
    std::fs::write(
        pair.tmp.path().join("probe.toml"),
        "probe_interval = 1.0\nprobe_bytes = 2000000\n",
    )
    .expect("config");
    let probe = pair.path("probe.toml");
    let fast_probes = ["--config", probe.as_str()];
    // "gamma" is beta's address under another name: its certificate says
    // beta, so alpha must refuse it.
    let (b, a) = (pair.amst("b"), pair.amst("a"));
    let alpha = pair.agent(
        "alpha",
        "a",
        &fast_probes,
        &[format!("beta={b}"), format!("gamma={b}")],
    );
    let beta = pair.agent("beta", "b", &fast_probes, &[format!("alpha={a}")]);

    for (agent, other) in [(&alpha, "beta"), (&beta, "alpha")] {
        let list = wait_for(&format!("{other} up"), Duration::from_secs(60), || {
            let v: Value = serde_json::from_str(&agent.ok(&["node", "list", "--json"])).ok()?;
            (peer(&v, other)["state"] == "up").then_some(v)
        });
        let p = peer(&list, other);
        let rtt = p["rtt_ms"].as_f64().expect("rtt");
        assert!(
            (78.0..110.0).contains(&rtt),
            "RTT {rtt} ms on an 80 ms link: {p}"
        );
        let goodput = p["goodput_bps"].as_f64().expect("goodput");
        assert!(
            goodput > 1e6 && goodput < 55e6,
            "goodput {goodput} on a 50 Mbit/s link: {p}"
        );
    }
    let list = wait_for("gamma refused", Duration::from_secs(60), || {
        let v: Value = serde_json::from_str(&alpha.ok(&["node", "list", "--json"])).ok()?;
        (peer(&v, "gamma")["state"] == "down").then_some(v)
    });
    let err = peer(&list, "gamma")["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("gamma") || err.contains("beta"), "{err}");
    let table = alpha.ok(&["node", "list"]);
    eprintln!("{table}");
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("beta ") && l.contains(" up ") && l.contains("ms")),
        "{table}"
    );
    let info = alpha.ok(&["node", "info"]);
    assert!(info.contains("alpha"), "{info}");
}

#[test]
fn replicated_checkpoints_send_only_what_changed_and_restore_there() {
    let pair = Pair::new(
        "r",
        &[("rate", "100mbit"), ("delay", "25ms"), ("loss", "0.5%")],
    );
    let (alpha, beta) = pair.agents();

    alpha.create_guest("web", "dwcp.mem_mb=24 dwcp.fill=text dwcp.dirty_pages=200");
    alpha.wait_tick("web", 2, Duration::from_secs(90));
    let first: Value = serde_json::from_str(&alpha.ok(&[
        "vm",
        "checkpoint",
        "web",
        "--replicate-to",
        "beta",
        "--json",
    ]))
    .expect("json");
    let r1 = &first["replicated"];
    assert_eq!(r1["id"], "alpha:web@1", "{first}");
    assert_eq!(r1["objects_sent"], r1["objects"], "{first}");

    std::thread::sleep(Duration::from_secs(3));
    let before = last_tick(&alpha.console("web")).expect("ticks");
    let second: Value = serde_json::from_str(&alpha.ok(&[
        "vm",
        "checkpoint",
        "web",
        "--replicate-to",
        "beta",
        "--json",
    ]))
    .expect("json");
    let r2 = &second["replicated"];
    let (sent, all) = (
        r2["objects_sent"].as_u64().expect("sent"),
        r2["objects"].as_u64().expect("objects"),
    );
    assert!(sent * 10 < all, "sent {sent} of {all} objects: {second}");
    let (b1, b2) = (
        r1["bytes_sent"].as_u64().expect("bytes"),
        r2["bytes_sent"].as_u64().expect("bytes"),
    );
    assert!(b2 * 5 < b1, "second replica {b2} bytes, first {b1}");
    eprintln!("first replica: {r1}\nsecond replica: {r2}");

    // On beta: listed, whole, and it runs from where it was.
    let list = beta.ok(&["checkpoint", "list"]);
    assert!(
        list.contains("alpha:web@1") && list.contains("alpha:web@2"),
        "{list}"
    );
    let v = beta.ok(&["checkpoint", "verify"]);
    assert!(!v.contains("BROKEN"), "{v}");
    let out = beta.ok(&["vm", "restore", "alpha:web@2", "--name", "web"]);
    assert!(out.contains("running"), "{out}");
    let t = beta.wait_tick("web", 0, Duration::from_secs(60));
    let first_there = first_tick(&beta.console("web")).expect("ticks");
    assert!(
        first_there >= before && first_there <= before + 3,
        "{first_there} after {before}"
    );
    beta.wait_tick("web", t + 2, Duration::from_secs(60));

    let err = alpha.fails(&["checkpoint", "replicate", "web@1", "--to", "nobody"]);
    assert!(err.contains("no peer named \"nobody\""), "{err}");
}

#[test]
fn live_migration_keeps_the_guest_counting() {
    let pair = Pair::new(
        "m",
        &[("rate", "200mbit"), ("delay", "25ms"), ("loss", "0.5%")],
    );
    let (alpha, beta) = pair.agents();

    alpha.create_guest("web", "dwcp.mem_mb=32 dwcp.fill=mixed dwcp.dirty_pages=500");
    alpha.wait_tick("web", 2, Duration::from_secs(90));
    let before = last_tick(&alpha.console("web")).expect("ticks");
    let r: Value =
        serde_json::from_str(&alpha.ok(&["vm", "migrate", "web", "--to", "beta", "--json"]))
            .expect("json");
    eprintln!("migration: {r}");
    assert!(r["wire_bytes"].as_u64().expect("wire") < r["stream_bytes"].as_u64().expect("stream"));
    // Gone here, running there, counting on from where it was, OK.
    assert!(!alpha.ok(&["vm", "list"]).contains("web"));
    assert_eq!(beta.state("web"), "running");
    let t = beta.wait_tick("web", before, Duration::from_secs(60));
    beta.wait_tick("web", t + 2, Duration::from_secs(60));
    let first = first_tick(&beta.console("web")).expect("ticks");
    assert!(
        first >= before && first <= before + 30,
        "first TICK there {first}, before {before}"
    );

    // Migrating a VM that is not there, or to nobody, is refused clearly.
    let err = beta.fails(&["vm", "migrate", "web", "--to", "nobody"]);
    assert!(err.contains("no peer named"), "{err}");
    assert_eq!(beta.state("web"), "running");

    // Back again: both nodes kept what the first migration left (its
    // footprint), so the pages that did not change since are references
    // and those that changed a little deltas against it.
    let before = last_tick(&beta.console("web")).expect("ticks");
    let back: Value =
        serde_json::from_str(&beta.ok(&["vm", "migrate", "web", "--to", "alpha", "--json"]))
            .expect("json");
    eprintln!("migration back: {back}");
    assert!(r["footprint"].is_null(), "{r}");
    let n = |v: &Value, k: &str| v[k].as_u64().expect(k);
    assert!(back["footprint"].is_string(), "{back}");
    assert!(
        n(&back, "ref_pages") + n(&back, "delta_pages") > 4000,
        "{back}"
    );
    assert!(
        n(&back, "wire_bytes") * 2 < n(&r, "wire_bytes"),
        "back {back}, there {r}"
    );
    assert_eq!(alpha.state("web"), "running");
    let t = alpha.wait_tick("web", before, Duration::from_secs(60));
    alpha.wait_tick("web", t + 2, Duration::from_secs(60));
}

#[test]
fn a_replica_at_the_destination_leaves_little_to_send() {
    let mut pair = Pair::new(
        "h",
        &[("rate", "100mbit"), ("delay", "25ms"), ("loss", "0.5%")],
    );
    // alpha holds no replica's memory in RAM: a replica there is mapped
    // from its image on disk.
    std::fs::write(
        pair.tmp.path().join("cold.toml"),
        "warm_memory_share = 0.0\n",
    )
    .expect("config");
    let cold = pair.path("cold.toml");
    let alpha = pair.agent(
        "alpha",
        "a",
        &["--config", cold.as_str()],
        &[format!("beta={}", pair.amst("b"))],
    );
    let mut beta = pair.beta();
    alpha.create_guest(
        "web",
        "dwcp.mem_mb=32 dwcp.fill=random dwcp.dirty_pages=300",
    );
    alpha.wait_tick("web", 2, Duration::from_secs(90));
    alpha.ok(&["vm", "checkpoint", "web", "--replicate-to", "beta"]);
    let held = |agent: &Agent, n: usize| {
        wait_for("the replica's memory held", Duration::from_secs(60), || {
            (agent
                .log()
                .matches("replica's memory held for a migration")
                .count()
                >= n)
                .then_some(())
        })
    };
    held(&beta, 1);
    let warm = |agent: &Agent| {
        let n: Value = serde_json::from_str(&agent.ok(&["node", "info", "--json"])).expect("json");
        n["warm_memory_bytes"].as_u64().expect("warm memory")
    };
    assert_eq!(warm(&beta), 128 << 20);
    // A migration that fails (cancelled, on a link too far for it to end
    // first) uses up the held copy: its QEMU wrote into it. The copy is
    // made again.
    let mut link = |delay: &str| {
        let settings = vec![("delay".to_string(), delay.to_string())];
        pair.lab
            .set(settings, Vec::new(), false)
            .expect("netlab set");
    };
    link("1000ms");
    let child = alpha.spawn_cli(&["vm", "migrate", "web", "--to", "beta"]);
    wait_for(
        "the destination to prepare",
        Duration::from_secs(30),
        || beta.log().contains("replica_memory=held").then_some(()),
    );
    alpha.ok(&["vm", "migrate", "web", "--cancel"]);
    let out = child.wait_with_output().expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cancelled"), "{err}");
    link("25ms");
    held(&beta, 2);
    // Held copies live in the agent's memory: a restarted agent makes
    // them again.
    beta.signal_and_wait(libc::SIGTERM);
    beta = pair.beta();
    held(&beta, 3);
    assert_eq!(warm(&beta), 128 << 20);
    runs_on(&alpha, "web");
    let r: Value =
        serde_json::from_str(&alpha.ok(&["vm", "migrate", "web", "--to", "beta", "--json"]))
            .expect("json");
    eprintln!("migration with a replica: {r}");
    let (wire, stream) = (
        r["wire_bytes"].as_u64().expect("wire"),
        r["stream_bytes"].as_u64().expect("stream"),
    );
    assert!(
        r["pages_known_at_destination"].as_u64().expect("known") > 8000,
        "{r}"
    );
    // The destination preloaded its replica: unchanged pages did not travel
    // at all, not even as references.
    assert_eq!(r["preloaded"], true, "{r}");
    assert!(r["preloaded_pages"].as_u64().expect("same") > 7000, "{r}");
    // Laid out when the replica came, the replica's memory was mapped
    // by the destination's QEMU rather than written through the stream.
    assert!(r["mapped_pages"].as_u64().expect("mapped") > 7000, "{r}");
    // Random pages do not compress: without the replica the wire would
    // carry about the whole stream.
    assert!(
        wire * 5 < stream,
        "{wire} on the wire for a {stream}-byte stream: {r}"
    );
    assert_eq!(beta.state("web"), "running");
    let t = beta.wait_tick("web", 0, Duration::from_secs(60));
    beta.wait_tick("web", t + 2, Duration::from_secs(60));
    assert_eq!(beta.log().matches("replica_memory=held").count(), 2);
    // The copy became the VM's memory.
    assert_eq!(warm(&beta), 0);

    // Back, onto a replica that alpha maps from disk.
    beta.ok(&["vm", "checkpoint", "web", "--replicate-to", "alpha"]);
    // (The first image laid out there was of alpha's own checkpoint.)
    wait_for(
        "alpha to lay out the replica",
        Duration::from_secs(60),
        || (alpha.log().matches("checkpoint's memory laid out").count() >= 2).then_some(()),
    );
    let r: Value =
        serde_json::from_str(&beta.ok(&["vm", "migrate", "web", "--to", "alpha", "--json"]))
            .expect("json");
    assert!(r["mapped_pages"].as_u64().expect("mapped") > 7000, "{r}");
    assert!(
        alpha.log().contains("replica_memory=image"),
        "{}",
        alpha.log()
    );
    assert!(!alpha.log().contains("replica's memory held for"));
    assert_eq!(alpha.state("web"), "running");
    let t = alpha.wait_tick("web", 0, Duration::from_secs(60));
    alpha.wait_tick("web", t + 2, Duration::from_secs(60));
}

/// Two agents on a slow link (so a migration takes a while).
fn slow_pair(tag: &str) -> (Pair, Agent, Agent) {
    let pair = Pair::new(tag, &[("rate", "8mbit"), ("delay", "25ms")]);
    let (alpha, beta) = pair.agents();
    (pair, alpha, beta)
}

/// Starts `dwcp vm migrate web --to beta` on alpha in the background, once
/// the guest counts; returns it when the destination holds the VM.
fn start_migration(alpha: &Agent, beta: &Agent) -> std::process::Child {
    alpha.create_guest(
        "web",
        "dwcp.mem_mb=32 dwcp.fill=random dwcp.dirty_pages=200",
    );
    alpha.wait_tick("web", 2, Duration::from_secs(90));
    let child = alpha.spawn_cli(&["vm", "migrate", "web", "--to", "beta"]);
    wait_for(
        "the destination to prepare",
        Duration::from_secs(30),
        || beta.ok(&["vm", "list"]).contains("web").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    child
}

/// The CLI's output once it exits; past `within`, it is killed and the
/// test fails with the agents' logs.
fn wait_output(
    mut child: std::process::Child,
    within: Duration,
    agents: &[&Agent],
) -> std::process::Output {
    let t = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if t.elapsed() > within {
            let _ = child.kill();
            let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
            panic!(
                "the CLI did not finish within {within:?}; logs:\n{}",
                logs.join("\n-----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.wait_with_output().expect("cli")
}

/// Waits until VM "web" is gone from `agent` (the destination's half of a
/// migration that failed).
fn dropped(agent: &Agent, what: &str, secs: u64) {
    wait_for(what, Duration::from_secs(secs), || {
        (!agent.ok(&["vm", "list"]).contains("web")).then_some(())
    });
}

fn runs_on(agent: &Agent, vm: &str) {
    assert_eq!(agent.state(vm), "running");
    let t = last_tick(&agent.console(vm)).expect("ticks");
    agent.wait_tick(vm, t + 2, Duration::from_secs(60));
}

#[test]
fn a_cancelled_migration_leaves_the_vm_where_it_was() {
    let (_pair, alpha, beta) = slow_pair("c");
    let child = start_migration(&alpha, &beta);
    let out = alpha.ok(&["vm", "migrate", "web", "--cancel"]);
    assert!(out.contains("cancelling"), "{out}");
    let out = child.wait_with_output().expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cancelled") && err.contains("[migration_failed]"),
        "{err}"
    );
    runs_on(&alpha, "web");
    dropped(&beta, "the destination to drop the VM", 30);
    let err = alpha.fails(&["vm", "migrate", "web", "--cancel"]);
    assert!(err.contains("no migration of it is running"), "{err}");

    // A deadline too short for this link ends the migration the same way.
    let err = alpha.fails(&["vm", "migrate", "web", "--to", "beta", "--deadline", "3"]);
    assert!(
        err.contains("did not finish within its deadline (3 s)"),
        "{err}"
    );
    runs_on(&alpha, "web");
    dropped(&beta, "the destination to drop the VM", 30);
}

#[test]
fn a_destination_killed_mid_migration_leaves_the_vm_running_at_the_source() {
    let (pair, alpha, mut beta) = slow_pair("k");
    let child = start_migration(&alpha, &beta);
    beta.signal_and_wait(libc::SIGKILL);
    let out = child.wait_with_output().expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("[migration_failed]"),
        "{err}"
    );
    runs_on(&alpha, "web");
    // The destination, restarted, drops its half of the migration.
    let beta = pair.beta();
    dropped(&beta, "the half-migrated VM to be removed", 30);
    assert!(
        beta.log().contains("incoming migration interrupted"),
        "{}",
        beta.log()
    );
}

#[test]
fn a_cut_link_leaves_the_vm_running_at_the_source_and_a_later_migration_works() {
    let (mut pair, alpha, beta) = slow_pair("x");
    let child = start_migration(&alpha, &beta);
    let mut link = |settings: &[(&str, &str)]| {
        let settings = settings.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        pair.lab
            .set(settings.collect(), Vec::new(), false)
            .expect("netlab set");
    };
    link(&[("loss", "100%")]);
    let t0 = std::time::Instant::now();
    let out = wait_output(child, Duration::from_secs(120), &[&alpha, &beta]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("[migration_failed]"),
        "{err}"
    );
    eprintln!(
        "the source gave up {:.1} s after the cut: {err}",
        t0.elapsed().as_secs_f64()
    );
    // Running here, and only here: the destination drops its half on its
    // own (it cannot be told).
    runs_on(&alpha, "web");
    dropped(&beta, "the destination to drop its half", 150);
    runs_on(&alpha, "web");
    // The link back (and faster: the slow link was there to catch the
    // migration mid-way): the same VM moves, nothing left over in the way.
    link(&[("loss", "0%"), ("rate", "100mbit")]);
    let before = last_tick(&alpha.console("web")).expect("ticks");
    let again = alpha.spawn_cli(&["vm", "migrate", "web", "--to", "beta"]);
    let out = wait_output(again, Duration::from_secs(240), &[&alpha, &beta]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        beta.log()
    );
    assert_eq!(beta.state("web"), "running");
    let t = beta.wait_tick("web", before, Duration::from_secs(60));
    beta.wait_tick("web", t + 2, Duration::from_secs(60));
    assert!(!alpha.ok(&["vm", "list"]).contains("web"));
}

#[test]
fn a_source_agent_restarted_mid_migration_keeps_the_vm() {
    let (pair, mut alpha, beta) = slow_pair("r");
    let child = start_migration(&alpha, &beta);
    alpha.signal_and_wait(libc::SIGKILL);
    let _ = child.wait_with_output();
    let alpha = pair.agent("alpha", "a", &[], &[format!("beta={}", pair.amst("b"))]);
    // QEMU outlived its agent; the restarted agent finds the guest
    // running (QEMU's migration failed with its socket) and keeps it.
    runs_on(&alpha, "web");
    dropped(&beta, "the destination to drop its half", 150);
    runs_on(&alpha, "web");
}

#[test]
fn a_destination_without_room_refuses_and_the_vm_stays() {
    let pair = Pair::new("o", &[("rate", "100mbit"), ("delay", "10ms")]);
    let alpha = pair.agent("alpha", "a", &[], &[format!("beta={}", pair.amst("b"))]);
    // beta gives VMs a tenth of its memory: a VM of half the host's does
    // not fit there (it boots here: memory is only touched as used).
    let cfg = pair.path("beta.toml");
    std::fs::write(&cfg, "memory_overcommit = 0.1\n").expect("config");
    let beta = pair.agent(
        "beta",
        "b",
        &["--config", &cfg],
        &[format!("alpha={}", pair.amst("a"))],
    );
    let half = format!("{}M", (dwcp_agent::manager::host_memory_bytes() / 2) >> 20);
    let g = guest_dir();
    alpha.ok(&[
        "vm",
        "create",
        "web",
        "--memory",
        &half,
        "--kernel",
        &g.join("vmlinuz").display().to_string(),
        "--initrd",
        &g.join("initrd.img").display().to_string(),
        "--append",
        "console=ttyS0 quiet panic=-1 dwcp.mem_mb=16 dwcp.dirty_pages=200",
    ]);
    alpha.wait_tick("web", 2, Duration::from_secs(90));
    let err = alpha.fails(&["vm", "migrate", "web", "--to", "beta"]);
    assert!(
        err.contains("does not fit") || err.contains("more than this host"),
        "{err}"
    );
    runs_on(&alpha, "web");
    assert!(!beta.ok(&["vm", "list"]).contains("web"));
}

#[test]
fn peers_without_a_certificate_are_refused_at_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_dwcp"))
        .args(["agent", "--data-dir"])
        .arg(tmp.path())
        .args(["--api", "127.0.0.1:0", "--peer", "beta=127.0.0.1:7481"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peers need this node's certificate"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_dwcp"))
        .args(["agent", "--data-dir"])
        .arg(tmp.path())
        .args(["--peer", "beta"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected NAME=ADDR:PORT"));
}
