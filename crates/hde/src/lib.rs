//! HDE: where dwcp keeps VM memory. A content-addressed page store with
//! checkpoint manifests on top.
//!
//! - [`PageStore`] keeps objects keyed by the BLAKE3 digest of their
//!   content in one redb database: 4 KiB pages (zstd, raw, or as a delta
//!   against the same page of the parent checkpoint) and blobs (the
//!   stream's non-page bytes). Identical pages are kept once, across
//!   checkpoints and VMs. Every read is checked against its digest, so data
//!   from a disk or a peer that lies is caught.
//! - A checkpoint is a [`Manifest`] (blocks, the stream's verbatim parts,
//!   statistics) and a page map: for each page of each RAM block, the
//!   digest of its content. A checkpoint's page map is stored as its
//!   changes against its parent's, so an incremental checkpoint costs
//!   little more than the pages that changed.
//! - [`CheckpointWriter`] takes the items of a live migration stream
//!   (crate `dwcp-vmstream`) and stores them; [`RestoreStream`] rebuilds a
//!   stream from a checkpoint that QEMU accepts as an incoming migration,
//!   checking each page's digest as it goes.
//!
//! Crash safety: everything is written in redb transactions, and a
//! checkpoint's manifest is committed last, so an interrupted checkpoint
//! leaves only unreferenced objects, which [`PageStore::collect_garbage`]
//! removes. Garbage collection is mark and sweep from the manifests and
//! never runs while a checkpoint is being written.
//!
//! What it does not do: talk to QEMU or the network (the agent does), or
//! keep disks (only memory and device state are checkpointed).

mod checkpoint;
pub mod codec;
mod image;
mod manifest;
mod objects;
pub mod replica;
mod restore;
mod store;
pub mod wire;

use std::fmt;

pub use checkpoint::CheckpointWriter;
pub use image::{decode_index, encode_index, index_pages, write_image, HeldPages, MemoryImage};
pub use manifest::{same_blocks, BlockInfo, CheckpointStats, Manifest, PageMap};
pub use replica::ReplicaOffer;
pub use restore::RestoreStream;
pub use store::{Health, PageReader, PageStore, StoreUsage, VerifyReport};

/// BLAKE3 digest of an object's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// The digest of a page of zeros, which is never stored.
    pub fn zero_page() -> Digest {
        static ZERO: std::sync::OnceLock<Digest> = std::sync::OnceLock::new();
        *ZERO.get_or_init(|| Digest::of(&[0u8; dwcp_vmstream::PAGE_SIZE]))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Digest {
    /// The first 16 hex digits, enough to name a page in a message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Where a page sits in a VM's memory, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageLocation {
    pub block: String,
    pub offset: u64,
}

impl fmt::Display for PageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {:?} offset {:#x}", self.block, self.offset)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HdeError {
    #[error("page store {path}")]
    Open {
        path: String,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("page store")]
    Store(#[source] Box<redb::Error>),
    #[error("zstd")]
    Compression(#[source] std::io::Error),
    #[error("checkpoint {0:?} not found")]
    NoSuchCheckpoint(String),
    #[error("checkpoint {0:?} already exists")]
    CheckpointExists(String),
    #[error("checkpoint {checkpoint}: page {digest} ({location}) is missing from the store")]
    MissingPage {
        checkpoint: String,
        digest: Digest,
        location: PageLocation,
    },
    #[error("checkpoint {checkpoint}: page {digest} ({location}) is corrupt: {problem}")]
    CorruptPage {
        checkpoint: String,
        digest: Digest,
        location: PageLocation,
        problem: String,
    },
    #[error("checkpoint {checkpoint}: {what} is missing or corrupt: {problem}")]
    CorruptBlob {
        checkpoint: String,
        what: &'static str,
        problem: String,
    },
    #[error("checkpoint {checkpoint}: its record is unreadable: {problem}")]
    CorruptManifest { checkpoint: String, problem: String },
    #[error("page store {0} is unavailable after an I/O error (the next checkpoint or restore reopens it)")]
    Unavailable(String),
    #[error("the stream cannot be checkpointed: {0}")]
    Stream(String),
}

impl From<redb::Error> for HdeError {
    fn from(e: redb::Error) -> Self {
        HdeError::Store(Box::new(e))
    }
}
impl From<redb::TransactionError> for HdeError {
    fn from(e: redb::TransactionError) -> Self {
        HdeError::Store(Box::new(e.into()))
    }
}
impl From<redb::TableError> for HdeError {
    fn from(e: redb::TableError) -> Self {
        HdeError::Store(Box::new(e.into()))
    }
}
impl From<redb::StorageError> for HdeError {
    fn from(e: redb::StorageError) -> Self {
        HdeError::Store(Box::new(e.into()))
    }
}
impl From<redb::CommitError> for HdeError {
    fn from(e: redb::CommitError) -> Self {
        HdeError::Store(Box::new(e.into()))
    }
}

#[cfg(test)]
mod tests;
