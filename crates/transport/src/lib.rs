//! AMST: the adaptive multi-stream transport between dwcp nodes.
//!
//! placeholder docs, replaced below
pub mod frame;
pub mod identity;
pub mod sched;

/// ALPN protocol id of AMST connections.
pub const ALPN: &[u8] = b"dwcp-amst/1";
