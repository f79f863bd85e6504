//! Level 1 of dwcp: the local hypervisor, QEMU, driven as processes.
//!
//! - [`qemu`]: finding the QEMU binary ([`QemuBinary::detect`]), building its
//!   command line ([`LaunchSpec`]) and starting it ([`launch`]) so that it
//!   outlives the agent; finding it again by pid ([`process_matches`]).
//! - [`qmp`]: the async QMP client ([`Qmp`]): commands with timeouts, events,
//!   end-of-connection notice.
//! - [`accel`]: KVM or TCG, chosen by booting a probe guest under KVM with a
//!   deadline ([`accel::detect`]); never hangs.
//!
//! What it does not do: keep state, decide policy (when to start, restart or
//! stop a VM) or talk to other nodes. That is the agent's job.
//!
//! Typical order: `QemuBinary::detect` → `accel::detect` → `launch` → use
//! `Launched::qmp` (`query-status`, `stop`, `cont`, `system_powerdown`,
//! `quit`) → wait on the child or on `Qmp::closed`.

pub mod accel;
pub mod qemu;
pub mod qmp;

pub use accel::{AccelReport, ProbeGuest};
pub use qemu::{
    launch, process_alive, process_matches, LaunchSpec, Launched, MemoryFile, QemuBinary, QemuError,
};
pub use qmp::{Qmp, QmpError, QmpEvent};

use serde::{Deserialize, Serialize};

/// The accelerator a VM runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
