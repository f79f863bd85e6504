//! A QEMU that dies shows as crashed with its reason, never as running.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn killed_qemu_shows_as_crashed_with_reason() {
    let agent = Agent::start();
    agent.create_guest("victim", "");
    agent.create_guest("bystander", "");
    let pid = agent.show("victim")["pid"].as_u64().expect("pid") as u32;
    kill(pid, SIGKILL);
    let v = wait_for("the crash to be noticed", Duration::from_secs(10), || {
        let v = agent.show("victim");
        assert_ne!(
            v["state"], "stopped",
            "a crash must not look like a stop: {v}"
        );
        (v["state"] == "crashed").then_some(v)
    });
    let why = v["last_error"].as_str().unwrap_or("");
    assert!(why.contains("killed by signal 9 (SIGKILL)"), "{why}");
    assert!(v.get("pid").is_none());
    let table = agent.ok(&["vm", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("victim") && l.contains("crashed")),
        "{table}"
    );
    // The other VM is untouched.
    assert_eq!(agent.state("bystander"), "running");
    // A crashed VM can be started again.
    agent.ok(&["vm", "start", "victim"]);
    agent.wait_tick("victim", 1, Duration::from_secs(90));
}

#[test]
fn guest_poweroff_is_a_stop_not_a_crash() {
    let agent = Agent::start();
    // A workload that cannot run exits, and the guest's init powers off.
    agent.create_guest("short", "dwcp.fill=bogus");
    let v = wait_for("the guest to power off", Duration::from_secs(60), || {
        let v = agent.show("short");
        (v["state"] != "running").then_some(v)
    });
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["desired"], "stopped");
    assert!(
        v["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("powered itself off"),
        "{v}"
    );
    assert!(agent
        .console("short")
        .contains("dwcp.fill=bogus: expected zero, text, random or mixed"));
}
