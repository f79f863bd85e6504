//! Choosing the accelerator: KVM only where it really boots a guest.
//!
//! A `/dev/kvm` that opens is not proof: a paravirtual KVM can accept the
//! guest and then stall it in early boot. So, given a probe guest, we boot it
//! under KVM with a deadline and wait for it to print `DWCP-PROBE-OK`; if it
//! does not, TCG it is. The probe QEMU is always killed at the deadline, so
//! detection never hangs. The guest boots with its console verbose, so a
//! stall shows early as silence: a KVM that boots prints a line at least
//! every few tenths of a second, one that stalls stops after the real-mode
//! setup's `Probing EDD` and would otherwise cost the whole deadline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::qemu::QemuBinary;
use crate::Accel;

const PROBE_MARKER: &str = "DWCP-PROBE-OK";

/// The probe guest is taken to have stalled after this long without a
/// byte on its console (within the overall deadline). A boot under KVM
/// here, the kernel decompressing itself included, is never silent for
/// more than a second.
const PROBE_SILENCE: Duration = Duration::from_secs(5);

/// A kernel and initrd whose init prints `DWCP-PROBE-OK` when booted with
/// `dwcp.probe=1` (the test guest does).
#[derive(Clone, Debug)]
pub struct ProbeGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The accelerator chosen and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccelReport {
    pub accel: Accel,
    pub reason: String,
}

/// Picks KVM or TCG. `probe` is booted under KVM to prove it works.
pub async fn detect(
    qemu: &QemuBinary,
    probe: Option<&ProbeGuest>,
    timeout: Duration,
) -> AccelReport {
    let tcg = |reason: String| AccelReport {
        accel: Accel::Tcg,
        reason,
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return tcg(format!("/dev/kvm cannot be opened ({e}); using TCG"));
    }
    let Some(probe) = probe else {
        return AccelReport {
            accel: Accel::Kvm,
            reason: "/dev/kvm opens; no probe guest was configured, so KVM is used untested".into(),
        };
    };
    match boot_probe(qemu, probe, timeout).await {
        Ok(took) => AccelReport {
            accel: Accel::Kvm,
            reason: format!("KVM booted the probe guest in {:.1} s", took.as_secs_f64()),
        },
        Err(why) => tcg(format!("/dev/kvm opens but {why}; using TCG")),
    }
}

async fn boot_probe(
    qemu: &QemuBinary,
    probe: &ProbeGuest,
    timeout: Duration,
) -> Result<Duration, String> {
    for f in [&probe.kernel, &probe.initrd] {
        if !f.is_file() {
            return Err(format!("the probe guest file {} is missing", f.display()));
        }
    }
    let started = Instant::now();
    let mut child = Command::new(&qemu.path)
        .args(probe_args(probe))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("the probe QEMU could not start ({e})"))?;
    let mut stdout = child.stdout.take().ok_or("the probe QEMU has no stdout")?;
    let mut seen = Vec::new();
    let silence = PROBE_SILENCE.min(timeout);
    let outcome = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(silence, stdout.read(&mut buf)).await {
                Err(_) => return Probe::Silent,
                Ok(Ok(0) | Err(_)) => return Probe::Ended,
                Ok(Ok(n)) => {
                    seen.extend_from_slice(&buf[..n]);
                    if contains(&seen, PROBE_MARKER.as_bytes()) {
                        return Probe::Booted;
                    }
                    if seen.len() > 1 << 20 {
                        seen.drain(..seen.len() - 4096);
                    }
                }
            }
        }
    })
    .await;
    let _ = child.start_kill();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    match outcome {
        Ok(Probe::Booted) => Ok(started.elapsed()),
        Ok(Probe::Ended) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), e.read_to_string(&mut err)).await;
            }
            let detail = err.lines().last().unwrap_or("").trim().to_owned();
            Err(format!(
                "the probe QEMU under KVM ended without booting the guest ({}){}",
                match status {
                    Ok(Ok(s)) => crate::qemu::describe_exit(s),
                    _ => "still running".into(),
                },
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            ))
        }
        Ok(Probe::Silent) => Err(format!(
            "the probe guest stalled under KVM: its console was silent for {:.0} s{}",
            silence.as_secs_f64(),
            match last_line(&seen) {
                Some(l) => format!(" after \"{l}\""),
                None => " from the start".into(),
            }
        )),
        Err(_) => Err(format!(
            "the probe guest did not boot under KVM within {:.0} s (stalled)",
            timeout.as_secs_f64()
        )),
    }
}

/// How a probe boot ended, short of its deadline.
enum Probe {
    Booted,
    /// QEMU closed its console (it exited).
    Ended,
    /// Nothing on the console for [`PROBE_SILENCE`].
    Silent,
}

/// The last non-empty line of the console, shortened, for the reason.
fn last_line(console: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(console);
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    Some(line.chars().filter(|c| !c.is_control()).take(80).collect())
}

fn probe_args(probe: &ProbeGuest) -> Vec<String> {
    vec![
        "-accel".into(),
        "kvm".into(),
        "-cpu".into(),
        "host".into(),
        "-m".into(),
        "128M".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        probe.kernel.display().to_string(),
        "-initrd".into(),
        probe.initrd.display().to_string(),
        "-append".into(),
        "console=ttyS0 earlyprintk=serial panic=-1 dwcp.probe=1".into(),
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A probe guest in `dir` (as `scripts/build-guest` writes it), if present.
pub fn probe_guest_in(dir: &Path) -> Option<ProbeGuest> {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    (kernel.is_file() && initrd.is_file()).then_some(ProbeGuest { kernel, initrd })
}
