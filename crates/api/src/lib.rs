//! The dwcp agent's REST API as seen from outside: the JSON types
//! ([`VmSpec`], [`VmInfo`], [`NodeInfo`], [`ErrorBody`] with its stable
//! [`ErrorCode`]s), size parsing ([`parse_bytes`]), and the HTTP
//! [`Client`] the CLI uses.
//!
//! What it does not do: serve requests. The handlers, and the OpenAPI
//! document built from them, live with the agent (`dwcp-agent`), which
//! owns the state they act on.

pub mod client;
pub mod types;

pub use client::{Client, ClientError};
pub use types::{
    format_bytes, parse_bytes, validate_name, CheckpointHealth, CheckpointInfo,
    DeleteCheckpointResult, ErrorBody, ErrorCode, MigrateRequest, NodeInfo, PeerInfo, ReplicaInfo,
    ReplicateRequest, RestoreRequest, SpecError, StopRequest, VerifyResult, VmInfo, VmSpec,
    VmState, MAX_VCPUS, MIN_MEMORY_BYTES,
};

/// The port an agent's API listens on unless told otherwise.
pub const DEFAULT_API_PORT: u16 = 7480;
