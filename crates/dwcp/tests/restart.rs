//! The agent keeps its VMs across its own restarts: it re-attaches to QEMU
//! processes still running and restarts those that should run but ended.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn agent_restart_reattaches_and_restarts() {
    let tmp = tempfile::Builder::new()
        .prefix("dwcp-t-")
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path().to_owned();
    let mut agent = Agent::start_in(&dir, &["--accel", "tcg"]);
    agent.create_guest("keep", "");
    agent.create_guest("lost", "");
    agent.create_guest("idle", "");
    agent.ok(&["vm", "stop", "idle", "--force"]);
    agent.wait_tick("keep", 2, Duration::from_secs(90));
    let keep_pid = agent.show("keep")["pid"].as_u64().expect("pid") as u32;
    let lost_pid = agent.show("lost")["pid"].as_u64().expect("pid") as u32;

    // A clean SIGTERM leaves the VMs running.
    let status = agent.signal_and_wait(SIGTERM);
    assert!(status.success(), "agent exit on SIGTERM: {status}");
    assert!(
        pid_alive(keep_pid) && pid_alive(lost_pid),
        "VMs must outlive the agent"
    );

    // While the agent is away, one QEMU dies.
    kill(lost_pid, SIGKILL);
    wait_for("QEMU to die", Duration::from_secs(10), || {
        (!pid_alive(lost_pid)).then_some(())
    });

    let agent = Agent::start_in(&dir, &["--accel", "tcg"]);
    // Re-attached: same process, still counting.
    let before = last_tick(&agent.console("keep")).unwrap_or(0);
    let v = wait_for("keep to be re-attached", Duration::from_secs(30), || {
        let v = agent.show("keep");
        (v["state"] == "running").then_some(v)
    });
    assert_eq!(
        v["pid"].as_u64(),
        Some(keep_pid as u64),
        "re-attach must not start a second copy"
    );
    agent.wait_tick("keep", before + 2, Duration::from_secs(30));
    // Pause works through the re-attached QMP connection.
    agent.ok(&["vm", "pause", "keep"]);
    assert_eq!(agent.state("keep"), "paused");
    agent.ok(&["vm", "resume", "keep"]);

    // Restarted: desired state was running, QEMU had ended.
    let v = wait_for("lost to be restarted", Duration::from_secs(60), || {
        let v = agent.show("lost");
        (v["state"] == "running").then_some(v)
    });
    assert_ne!(v["pid"].as_u64(), Some(lost_pid as u64));
    agent.wait_tick("lost", 1, Duration::from_secs(90));

    // A stopped VM stays stopped.
    assert_eq!(agent.state("idle"), "stopped");

    // Killing a re-attached QEMU is seen as a crash too.
    kill(keep_pid, SIGKILL);
    let v = wait_for("keep to show crashed", Duration::from_secs(20), || {
        let v = agent.show("keep");
        (v["state"] == "crashed").then_some(v)
    });
    assert!(
        v["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("QEMU ended"),
        "{v}"
    );
    drop(tmp);
}

#[test]
fn sigint_stops_the_agent_cleanly() {
    let mut agent = Agent::start();
    let status = agent.signal_and_wait(SIGINT);
    assert!(status.success(), "{status}");
    assert!(agent.log().contains("SIGINT: shutting down"));
}
