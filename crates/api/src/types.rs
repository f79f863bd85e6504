//! The JSON bodies of the REST API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Smallest VM memory accepted: the kernel alone needs about this much.
pub const MIN_MEMORY_BYTES: u64 = 32 << 20;
pub const MAX_VCPUS: u32 = 255;
const MAX_LABELS: usize = 64;
const MAX_APPEND_BYTES: usize = 4096;

/// What a VM is made of. Used as the body of `POST /v1/vms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Unique on this node: lower-case letters, digits and `-`, 1 to 63
    /// characters, starting with a letter or digit.
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Linux kernel to boot directly (with `initrd` and `append`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// A qcow2 disk image to boot from or attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_vcpus() -> u32 {
    1
}

/// A problem with a spec, found without touching anything.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: &'static str,
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> SpecError {
    SpecError {
        field,
        problem: problem.into(),
    }
}

/// Checks a VM name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty() || name.len() > 63 || !name.chars().all(ok_char) || name.starts_with('-') {
        return Err(bad(
            "name",
            format!(
                "{name:?} is not a valid VM name (1-63 of a-z, 0-9 and '-', not starting with '-')"
            ),
        ));
    }
    Ok(())
}

impl VmSpec {
    /// Checks what can be checked without the host: name, counts, sizes,
    /// label syntax and that there is something to boot.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(&self.name)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(bad(
                "vcpus",
                format!("{} is out of range (1 to {MAX_VCPUS})", self.vcpus),
            ));
        }
        if self.memory_bytes < MIN_MEMORY_BYTES {
            return Err(bad(
                "memory_bytes",
                format!(
                    "{} is too small (at least {})",
                    format_bytes(self.memory_bytes),
                    format_bytes(MIN_MEMORY_BYTES)
                ),
            ));
        }
        if !self.memory_bytes.is_multiple_of(1 << 20) {
            return Err(bad("memory_bytes", "must be a whole number of MiB"));
        }
        if self.kernel.is_none() && self.disk.is_none() {
            return Err(bad("kernel", "a VM needs a kernel or a disk to boot"));
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.append.is_some()) {
            return Err(bad("initrd", "initrd and append need a kernel"));
        }
        for (field, value) in [
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
            ("disk", &self.disk),
        ] {
            if let Some(v) = value {
                if !v.starts_with('/') || v.contains('\0') {
                    return Err(bad(field, format!("{v:?} must be an absolute file path")));
                }
            }
        }
        if let Some(a) = &self.append {
            if a.len() > MAX_APPEND_BYTES || a.contains(['\0', '\n']) {
                return Err(bad(
                    "append",
                    format!("must be one line of at most {MAX_APPEND_BYTES} bytes"),
                ));
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(bad("labels", format!("at most {MAX_LABELS} labels")));
        }
        for (k, v) in &self.labels {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if !key_ok {
                return Err(bad("labels", format!("{k:?} is not a valid label key")));
            }
            if v.len() > 255 || v.chars().any(char::is_control) {
                return Err(bad(
                    "labels",
                    format!("the value of {k:?} is too long or has control characters"),
                ));
            }
        }
        Ok(())
    }
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined but not running.
    Stopped,
    Starting,
    Running,
    Paused,
    Stopping,
    /// QEMU ended without being asked to: see `last_error`.
    Crashed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
        }
    }

    /// Whether a QEMU process belongs to the VM in this state.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM as the agent reports it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    pub spec: VmSpec,
    pub state: VmState,
    /// The state the agent keeps the VM in across its own restarts.
    pub desired: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `kvm` or `tcg`, while a process runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<f64>,
    /// Resident memory of the QEMU process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    /// Why the VM last stopped or crashed, or what last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix time (seconds) when the VM was created.
    pub created_unix: u64,
}

/// A checkpoint as the agent reports it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointInfo {
    /// `VM@N`.
    pub id: String,
    pub vm: String,
    pub created_unix_ms: u64,
    /// The checkpoint this one's page map is kept against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Guest memory, all RAM blocks.
    pub memory_bytes: u64,
    pub pages: u64,
    pub zero_pages: u64,
    /// Pages that differ from the parent (all non-zero pages without one).
    pub changed_pages: u64,
    /// Changed pages the store did not have yet.
    pub new_pages: u64,
    /// New pages kept as a delta against the parent's version.
    pub delta_pages: u64,
    /// Bytes the checkpoint added to the store.
    pub stored_bytes: u64,
    /// Bytes of the migration stream QEMU sent.
    pub stream_bytes: u64,
    /// Seconds spent hashing, deduplicating, compressing and writing.
    pub encode_secs: f64,
    /// How long the guest was paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// The downtime QEMU itself reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<u64>,
    /// Fingerprint of the memory: checkpoints with the same value hold
    /// exactly the same guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_digest: Option<String>,
    /// The node a replica came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// How it was sent to another node (only in the answer to replicating).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicated: Option<ReplicaInfo>,
    /// Wall time of the whole checkpoint (only in the answer to taking it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
}

/// Another node this one knows, as last measured.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct PeerInfo {
    pub name: String,
    /// Where its AMST listener is.
    pub addr: String,
    /// `up` (the last probe worked), `down` (it failed) or `unknown` (not
    /// probed yet).
    pub state: String,
    /// Round-trip time of the AMST session, from the kernel's TCP estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Goodput of the last probe transfer (bits per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goodput_bps: Option<f64>,
    /// Connections of the AMST session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<usize>,
    /// When it was last probed (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probed_unix_ms: Option<u64>,
    /// Why the last probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// How a checkpoint went to another node.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplicaInfo {
    pub peer: String,
    /// Its id there (`ORIGIN:ID`).
    pub id: String,
    /// Objects the checkpoint needs, and how many the peer lacked.
    pub objects: u64,
    pub objects_sent: u64,
    /// Bytes of the two messages on the wire.
    pub bytes_sent: u64,
    pub seconds: f64,
}

/// Body of `POST /v1/checkpoints/{id}/replicate`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicateRequest {
    /// The peer's node name.
    pub to: String,
}

/// Body of `POST /v1/vms/{name}/migrate`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The peer's node name.
    pub to: String,
    /// Give up (the VM runs on here) when the migration has not finished
    /// within this many seconds. Default: five times what the VM's memory
    /// takes on the measured link, at least two minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<u64>,
}

/// Body of `POST /v1/checkpoints/{id}/restore`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Name of the new VM.
    pub name: String,
    /// Leave the restored VM paused (resume it with `resume`).
    #[serde(default)]
    pub paused: bool,
}

/// Answer to `POST /v1/checkpoints/verify`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VerifyResult {
    pub ok: bool,
    pub objects_checked: u64,
    pub bytes_checked: u64,
    /// Objects whose content does not match their digest.
    pub corrupt_objects: Vec<String>,
    pub checkpoints: Vec<CheckpointHealth>,
    /// Corrupt objects dropped from the store's index, so that the next
    /// checkpoint holding those pages stores them afresh.
    pub dropped_objects: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointHealth {
    pub id: String,
    pub ok: bool,
    /// The first problems found, each naming the page or part.
    pub problems: Vec<String>,
    /// How many more problems there were.
    pub more_problems: u64,
}

/// Answer to `DELETE /v1/checkpoints/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DeleteCheckpointResult {
    /// Stored objects no other checkpoint needed.
    pub objects_removed: u64,
    pub bytes_removed: u64,
}

/// Body of `POST /v1/vms/{name}/stop`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the guest gets to power off after the ACPI power button
    /// before QEMU is ended (default: the agent's `stop_timeout`).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// End QEMU at once, without asking the guest.
    #[serde(default)]
    pub force: bool,
}

/// What the node is and runs on (`GET /v1/node`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    pub name: String,
    pub agent_version: String,
    pub qemu_binary: String,
    pub qemu_version: String,
    /// `kvm` or `tcg`; `detecting` while the KVM probe runs.
    pub accel: String,
    /// Why that accelerator.
    pub accel_reason: String,
    pub host_cpus: u32,
    pub host_memory_bytes: u64,
    /// Memory holding replicas' memory ready for their VMs to migrate here,
    /// and how much may (`warm_memory_share`).
    pub warm_memory_bytes: u64,
    pub warm_memory_budget_bytes: u64,
    pub data_dir: String,
    pub vms_total: usize,
    pub vms_running: usize,
}

/// An error body: a stable `code`, a one-line `message`, and the causes.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The chain of causes, outermost first (after `message`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<String>,
}

/// Stable error codes. Clients may match on these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not valid JSON or does not have the expected shape.
    InvalidJson,
    /// The body is over the size limit.
    BodyTooLarge,
    /// A value is out of range or refers to something that does not exist.
    InvalidSpec,
    VmNotFound,
    VmExists,
    /// The operation does not apply in the VM's current state.
    InvalidState,
    /// QEMU could not be started or failed.
    QemuFailed,
    /// QEMU refused or did not answer a QMP command.
    QmpFailed,
    /// The embedded store failed.
    StoreFailed,
    /// No such endpoint.
    NotFound,
    Internal,
    CheckpointNotFound,
    /// A checkpoint lacks a page or part, or one fails its digest check.
    CheckpointCorrupt,
    /// Taking or restoring a checkpoint failed; the VM and the store are
    /// as they were.
    CheckpointFailed,
    /// Another node could not be reached or refused.
    PeerFailed,
    /// A migration failed; the message says where the VM runs.
    MigrationFailed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::InvalidSpec => "invalid_spec",
            ErrorCode::VmNotFound => "vm_not_found",
            ErrorCode::VmExists => "vm_exists",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::QemuFailed => "qemu_failed",
            ErrorCode::QmpFailed => "qmp_failed",
            ErrorCode::StoreFailed => "store_failed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
            ErrorCode::CheckpointNotFound => "checkpoint_not_found",
            ErrorCode::CheckpointCorrupt => "checkpoint_corrupt",
            ErrorCode::CheckpointFailed => "checkpoint_failed",
            ErrorCode::PeerFailed => "peer_failed",
            ErrorCode::MigrationFailed => "migration_failed",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidJson | ErrorCode::InvalidSpec => 400,
            ErrorCode::VmNotFound | ErrorCode::NotFound | ErrorCode::CheckpointNotFound => 404,
            ErrorCode::VmExists | ErrorCode::InvalidState => 409,
            ErrorCode::CheckpointCorrupt => 422,
            ErrorCode::CheckpointFailed => 500,
            ErrorCode::PeerFailed | ErrorCode::MigrationFailed => 502,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::QemuFailed | ErrorCode::QmpFailed => 502,
            ErrorCode::StoreFailed | ErrorCode::Internal => 500,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses `256M`, `1G`, `1.5GiB`, `4096` (bytes), `512k`. Binary units.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 256M, 1G, 1048576)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use K, M, G or T)")),
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// `268435456` → `256 MiB`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            kernel: Some("/boot/vmlinuz".into()),
            initrd: None,
            append: None,
            disk: None,
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("256M"), Ok(256 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("12Q").is_err());
        assert!(parse_bytes("-1G").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert_eq!(format_bytes(256 << 20), "256 MiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn specs_are_checked() {
        assert_eq!(spec().validate(), Ok(()));
        type Change = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(&str, Change)> = vec![
            ("name", Box::new(|s| s.name = "Bad_Name".into())),
            ("name", Box::new(|s| s.name = String::new())),
            ("name", Box::new(|s| s.name = "x".repeat(64))),
            ("vcpus", Box::new(|s| s.vcpus = 0)),
            ("vcpus", Box::new(|s| s.vcpus = 100_000)),
            ("memory_bytes", Box::new(|s| s.memory_bytes = 0)),
            (
                "memory_bytes",
                Box::new(|s| s.memory_bytes = (256 << 20) + 1),
            ),
            ("kernel", Box::new(|s| s.kernel = None)),
            ("append", Box::new(|s| s.append = Some("a\nb".into()))),
            (
                "labels",
                Box::new(|s| {
                    s.labels.insert("bad key".into(), "v".into());
                }),
            ),
        ];
        for (field, change) in cases {
            let mut s = spec();
            change(&mut s);
            assert_eq!(s.validate().map_err(|e| e.field), Err(field), "{s:?}");
        }
    }

    #[test]
    fn spec_body_defaults_and_rejects_unknown_fields() {
        let c: VmSpec =
            serde_json::from_str(r#"{"name":"a","memory_bytes":268435456,"kernel":"/k"}"#)
                .expect("parses");
        assert_eq!(c.vcpus, 1);
        assert!(
            serde_json::from_str::<VmSpec>(r#"{"name":"a","memory_bytes":1,"kernal":"/k"}"#)
                .is_err()
        );
    }
}
