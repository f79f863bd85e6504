//! Accelerator detection and the API description.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn accel_detection_decides_quickly_and_the_choice_boots() {
    let tmp = tempfile::Builder::new()
        .prefix("dwcp-t-")
        .tempdir()
        .expect("tempdir");
    let guest = guest_dir().display().to_string();
    let started = Instant::now();
    let agent = Agent::start_in(
        tmp.path(),
        &["--accel", "auto", "--probe-guest-dir", &guest],
    );
    // The probe is bounded (20 s by default): detection never hangs, and
    // a KVM that stalls the guest is found out by its silent console well
    // before that.
    let node = wait_for("accelerator detection", Duration::from_secs(40), || {
        let n: serde_json::Value =
            serde_json::from_str(&agent.ok(&["node", "info", "--json"])).expect("json");
        (n["accel"] != "detecting").then_some(n)
    });
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}: {node}");
    let accel = node["accel"].as_str().unwrap_or("");
    assert!(accel == "kvm" || accel == "tcg", "{node}");
    assert!(!node["accel_reason"].as_str().unwrap_or("").is_empty());
    // Whatever was chosen must really boot the guest.
    agent.create_guest("probe-check", "");
    assert_eq!(agent.show("probe-check")["accel"], accel);
    agent.wait_tick("probe-check", 2, Duration::from_secs(90));
    let human = agent.ok(&["node", "info"]);
    assert!(human.contains(&format!("accel:    {accel} (")), "{human}");
}

#[test]
fn committed_openapi_matches_the_served_one() {
    let agent = Agent::start();
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../api/openapi.json"
    ))
    .expect("api/openapi.json is committed");
    let printed = agent.ok(&["openapi"]);
    assert_eq!(
        committed.trim(),
        printed.trim(),
        "api/openapi.json is stale: run `cargo run -q -p dwcp -- openapi > api/openapi.json`"
    );
    let (s, served) = http(&agent.url, "GET", "/openapi.json", b"");
    assert_eq!(s, 200);
    let served: serde_json::Value = serde_json::from_str(&served).expect("json");
    let committed: serde_json::Value = serde_json::from_str(&committed).expect("json");
    assert_eq!(served, committed);
    for path in [
        "/v1/vms",
        "/v1/vms/{name}",
        "/v1/vms/{name}/console",
        "/v1/node",
    ] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
}
