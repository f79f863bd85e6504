//! The whole life of a VM through the CLI: create, list, show, console,
//! pause, resume, stop, start, delete, on a real TCG guest.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn vm_lifecycle_through_the_cli() {
    let agent = Agent::start();
    let info = agent.ok(&["node", "info"]);
    assert!(
        info.contains("accel:    tcg (TCG set by configuration)"),
        "{info}"
    );

    agent.create_guest("web", "dwcp.fill=text");
    let v = agent.show("web");
    assert_eq!(v["state"], "running");
    assert_eq!(v["accel"], "tcg");
    assert_eq!(v["spec"]["memory_bytes"], 128 << 20);
    let pid = v["pid"].as_u64().expect("pid") as u32;
    assert!(pid_alive(pid));

    let table = agent.ok(&["vm", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web ") && l.contains("running") && l.contains("128 MiB")),
        "{table}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&agent.ok(&["vm", "list", "--json"])).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // The guest runs and its memory self-check holds.
    agent.wait_tick("web", 3, Duration::from_secs(90));

    // Pause: the counter stops.
    agent.ok(&["vm", "pause", "web"]);
    assert_eq!(agent.state("web"), "paused");
    std::thread::sleep(Duration::from_millis(500));
    let frozen = last_tick(&agent.console("web"));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        last_tick(&agent.console("web")),
        frozen,
        "TICKs went on while paused"
    );
    // Pausing twice is refused with a clear message.
    let err = agent.fails(&["vm", "pause", "web"]);
    assert!(
        err.contains("cannot pause VM \"web\": it is paused [invalid_state]"),
        "{err}"
    );

    // Resume: the counter continues from where it was.
    agent.ok(&["vm", "resume", "web"]);
    assert_eq!(agent.state("web"), "running");
    let resumed = agent.wait_tick("web", frozen.unwrap_or(0) + 2, Duration::from_secs(30));
    assert!(resumed > frozen.unwrap_or(0));

    // A running VM is not deleted without --force.
    let err = agent.fails(&["vm", "delete", "web"]);
    assert!(err.contains("stop it first"), "{err}");

    // Stop: the guest honours the ACPI power button.
    let out = agent.ok(&["vm", "stop", "web", "--timeout", "30"]);
    assert!(out.contains("stopped"), "{out}");
    let v = agent.show("web");
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["desired"], "stopped");
    assert!(v.get("pid").is_none());
    assert!(!pid_alive(pid), "QEMU still alive after stop");

    // Start it again: a new boot.
    agent.ok(&["vm", "start", "web"]);
    assert_eq!(agent.state("web"), "running");
    agent.wait_tick("web", 1, Duration::from_secs(90));
    let err = agent.fails(&["vm", "start", "web"]);
    assert!(err.contains("[invalid_state]"), "{err}");

    // Follow the console until the VM stops.
    let url = agent.url.clone();
    let follower = std::thread::spawn(move || {
        std::process::Command::new(BIN)
            .args(["vm", "console", "web", "--follow"])
            .env("DWCP_API", url)
            .output()
            .expect("console --follow")
    });
    std::thread::sleep(Duration::from_secs(2));
    agent.ok(&["vm", "stop", "web", "--force"]);
    let followed = follower.join().expect("follower");
    assert!(followed.status.success());
    assert!(
        String::from_utf8_lossy(&followed.stdout).contains("TICK"),
        "follow printed no TICK"
    );

    agent.ok(&["vm", "delete", "web"]);
    let err = agent.fails(&["vm", "show", "web"]);
    assert!(err.contains("no VM named \"web\" [vm_not_found]"), "{err}");
    assert!(!agent.dir.join("vms/web").exists(), "VM files left behind");
}

#[test]
fn force_delete_of_a_running_vm_ends_its_qemu() {
    let agent = Agent::start();
    agent.create_guest("tmp", "");
    let pid = agent.show("tmp")["pid"].as_u64().expect("pid") as u32;
    agent.ok(&["vm", "delete", "tmp", "--force"]);
    wait_for("QEMU to end", Duration::from_secs(10), || {
        (!pid_alive(pid)).then_some(())
    });
    assert_eq!(agent.ok(&["vm", "list", "--json"]).trim(), "[]");
}
