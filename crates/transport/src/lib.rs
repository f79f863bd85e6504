//! AMST: the adaptive multi-stream transport between dwcp nodes.
//!
//! A [`Session`] to a peer is several TCP connections (1 to 16), each TLS 1.3
//! with mutual certificates from the cluster CA ([`identity`]). Transfers
//! are cut into frames carrying (transfer, sequence) ([`frame`]); the
//! sender puts each frame on whichever connection has room; the receiver
//! delivers each transfer in order with bounded reorder memory
//! ([`sched::Receiver`]). Frames on a connection that dies go out again on
//! the others; when all die, the session reconnects and resumes from what
//! the receiver acknowledged. Traffic classes: control first, then
//! weighted fair sharing with optional rate limits ([`sched::Sender`]).
//! The number of connections follows measured goodput ([`adapt`]).
//!
//! Layers: `frame`, `sched` and `adapt` are sans-IO (no sockets, no clock,
//! deterministic); `net` is the tokio layer; `identity` builds rustls
//! configurations.
//!
//! Use: `Listener::bind` then `Listener::accept` for incoming transfers;
//! `Session::connect` then `Session::send` on the other side.
//!
//! What it does not do: compress or deduplicate (that is HDE's job above
//! it), or choose rate limits (PBA will).

pub mod adapt;
pub mod frame;
pub mod identity;
pub mod net;
pub mod sched;

pub use identity::NodeIdentity;
pub use net::{
    set_socket_buffer, Chunk, Incoming, Listener, Progress, Session, SocketBuffer, StreamDecision,
    Streams, TransferReport, TransportConfig, TransportError,
};
pub use sched::{Class, ClassConfig};

/// ALPN protocol id of AMST connections.
pub const ALPN: &[u8] = b"dwcp-amst/1";
