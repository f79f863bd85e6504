//! netlab: the project's WAN emulator. A lab is a set of hosts, each a
//! network namespace with one TUN device; the emulator reads every packet a
//! host sends and delivers it to the destination host after the link model
//! of that direction has applied rate, delay, jitter, loss, queueing or a
//! bandwidth trace.
//!
//! - [`params`]: link settings and their text forms (`rate=100mbit`, ...).
//! - [`model`]: the sans-IO link model ([`model::LinkModel`]): each
//!   packet's fate decided on arrival, seeded, no clock.
//! - [`trace`]: mahimahi and `time Mbps` traces as a looping rate schedule.
//! - [`emulator`]: reader and delivery threads around the model.
//! - [`lab`]: [`Lab::up`] creates namespaces and TUN devices and starts the
//!   emulator in-process (what Rust tests use); dropping the lab removes it.
//! - [`control`]: the `netlab` daemon that holds a lab in the background
//!   and answers `set`/`stats`/`shutdown` on a unix socket.
//!
//! What it does not do: reorder packets (jitter never reorders), emulate
//! IPv6, or touch any interface outside the namespaces it creates. Hosts get
//! addresses 10.77.0.N/24, which exist only inside a lab's namespaces.
//! Needs root (namespaces, TUN devices).

pub mod control;
pub mod emulator;
pub mod lab;
pub mod model;
pub mod params;
pub mod sys;
pub mod trace;

pub use emulator::LinkStats;
pub use lab::{HostInfo, Lab, LabConfig, LabError};
pub use params::{Direction, LinkOverride, LinkParams};
