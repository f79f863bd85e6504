//! Checkpoint manifests and page maps.

use dwcp_vmstream::{Block, PAGE_SIZE};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Digest, PageLocation};

/// What a checkpoint is, apart from its page map.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// `VM@N`, unique in the store.
    pub id: String,
    pub vm: String,
    pub created_unix_ms: u64,
    /// The checkpoint whose page map this one's changes apply to.
    pub parent: Option<String>,
    /// Ancestors in the page map chain.
    pub chain_depth: u32,
    /// The node a replica came from (`None`: taken here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub ram_section_id: u32,
    pub blocks: Vec<BlockInfo>,
    /// Stream bytes before the pages (header, configuration, RAM blocks).
    pub prologue: Digest,
    /// Commands that came between the RAM sections.
    pub middle: Digest,
    /// Device state, EOF and VM description.
    pub tail: Digest,
    /// What the agent needs to start the VM again (its spec, accelerator).
    pub meta: serde_json::Value,
    pub stats: CheckpointStats,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockInfo {
    pub name: String,
    pub length_bytes: u64,
}

/// Whether a checkpoint's blocks are a stream's: same names and lengths,
/// in the same order.
pub fn same_blocks(info: &[BlockInfo], blocks: &[dwcp_vmstream::Block]) -> bool {
    info.len() == blocks.len()
        && info
            .iter()
            .zip(blocks)
            .all(|(a, b)| a.name == b.name && a.length_bytes == b.length_bytes)
}

impl From<&Block> for BlockInfo {
    fn from(b: &Block) -> Self {
        BlockInfo {
            name: b.name.clone(),
            length_bytes: b.length_bytes,
        }
    }
}

impl From<&BlockInfo> for Block {
    fn from(b: &BlockInfo) -> Self {
        Block {
            name: b.name.clone(),
            length_bytes: b.length_bytes,
        }
    }
}

/// Figures about one checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckpointStats {
    /// Bytes of the migration stream QEMU sent.
    pub stream_bytes: u64,
    /// Page records in the stream (pages dirtied during the checkpoint are
    /// sent more than once).
    pub page_records: u64,
    /// Pages of guest memory.
    pub pages: u64,
    pub zero_pages: u64,
    /// Pages whose content differs from the parent checkpoint (all
    /// non-zero pages when there is no parent).
    pub changed_pages: u64,
    /// Changed pages the store did not have yet.
    pub new_pages: u64,
    /// New pages kept as a delta against the parent's version.
    pub delta_pages: u64,
    /// Bytes this checkpoint added to the store: new pages, blobs, page
    /// map and manifest.
    pub stored_bytes: u64,
    /// Bytes of page data written and then superseded within this
    /// checkpoint (pages the guest dirtied while it was taken).
    pub superseded_bytes: u64,
    /// Seconds spent hashing, deduplicating, compressing and writing.
    pub encode_secs: f64,
    /// How long the guest was paused, as the agent measured it.
    pub pause_ms: Option<u64>,
    /// The downtime QEMU reported.
    pub qemu_downtime_ms: Option<u64>,
    /// BLAKE3 over the digests of all pages in order: two checkpoints
    /// with the same value hold exactly the same memory.
    pub memory_digest: Option<Digest>,
}

/// For every page of every block, the digest of its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageMap {
    blocks: Vec<Vec<Digest>>,
}

const ENTRY_BYTES: usize = 2 + 4 + 32;

impl PageMap {
    /// A map of all-zero memory.
    pub fn new(blocks: &[BlockInfo]) -> PageMap {
        let zero = Digest::zero_page();
        PageMap {
            blocks: blocks
                .iter()
                .map(|b| vec![zero; b.length_bytes.div_ceil(PAGE_SIZE as u64) as usize])
                .collect(),
        }
    }

    pub fn get(&self, block: usize, page: usize) -> Option<&Digest> {
        self.blocks.get(block)?.get(page)
    }

    /// Sets a page's digest; false if the block or page does not exist.
    pub fn set(&mut self, block: usize, page: usize, digest: Digest) -> bool {
        match self.blocks.get_mut(block).and_then(|b| b.get_mut(page)) {
            Some(slot) => {
                *slot = digest;
                true
            }
            None => false,
        }
    }

    pub fn pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.len() as u64).sum()
    }

    /// Whether `other` covers the same blocks with the same sizes.
    pub fn same_shape(&self, other: &PageMap) -> bool {
        self.blocks.len() == other.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&other.blocks)
                .all(|(a, b)| a.len() == b.len())
    }

    /// Every (block, page, digest), in order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize, &Digest)> {
        self.blocks
            .iter()
            .enumerate()
            .flat_map(|(b, pages)| pages.iter().enumerate().map(move |(p, d)| (b, p, d)))
    }

    /// The pages that are not all zero: (block, page index, digest).
    pub fn nonzero_pages(&self) -> impl Iterator<Item = (u16, u64, Digest)> + '_ {
        let zero = Digest::zero_page();
        self.iter()
            .filter(move |(_, _, d)| **d != zero)
            .map(|(b, p, d)| (b as u16, p as u64, *d))
    }

    /// The distinct non-zero digests, in the order of their first place:
    /// the same list wherever the same map is (a checkpoint and its
    /// replica), so a migration's two sides can name its pages by index
    /// without the list crossing the link.
    pub fn distinct_pages(&self) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::new();
        self.nonzero_pages()
            .map(|(_, _, d)| d)
            .filter(|d| seen.insert(*d))
            .collect()
    }

    /// The entries that differ from `parent` (from all-zero memory when
    /// there is none), encoded.
    pub fn changes_from(&self, parent: Option<&PageMap>) -> Vec<u8> {
        let zero = Digest::zero_page();
        let mut out = Vec::new();
        for (b, p, d) in self.iter() {
            let before = parent.and_then(|m| m.get(b, p)).unwrap_or(&zero);
            if d != before {
                out.extend_from_slice(&(b as u16).to_be_bytes());
                out.extend_from_slice(&(p as u32).to_be_bytes());
                out.extend_from_slice(&d.0);
            }
        }
        out
    }

    /// Applies encoded changes; an error names what does not fit.
    pub fn apply(&mut self, changes: &[u8]) -> Result<(), String> {
        if !changes.len().is_multiple_of(ENTRY_BYTES) {
            return Err(format!("page map of {} bytes is cut short", changes.len()));
        }
        for e in changes.chunks_exact(ENTRY_BYTES) {
            let b = u16::from_be_bytes([e[0], e[1]]) as usize;
            let p = u32::from_be_bytes([e[2], e[3], e[4], e[5]]) as usize;
            let mut d = [0u8; 32];
            d.copy_from_slice(&e[6..]);
            if !self.set(b, p, Digest(d)) {
                return Err(format!(
                    "page map names block {b} page {p}, which does not exist"
                ));
            }
        }
        Ok(())
    }

    /// Digests named by encoded changes.
    pub fn digests_in(changes: &[u8]) -> impl Iterator<Item = Digest> + '_ {
        changes.chunks_exact(ENTRY_BYTES).map(|e| {
            let mut d = [0u8; 32];
            d.copy_from_slice(&e[6..]);
            Digest(d)
        })
    }
}

impl PageMap {
    /// BLAKE3 over every page digest in order.
    pub fn fingerprint(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        for (_, _, d) in self.iter() {
            h.update(&d.0);
        }
        Digest(*h.finalize().as_bytes())
    }
}

impl Manifest {
    pub fn location(&self, block: usize, page: usize) -> PageLocation {
        PageLocation {
            block: self
                .blocks
                .get(block)
                .map(|b| b.name.clone())
                .unwrap_or_default(),
            offset: (page * PAGE_SIZE) as u64,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.length_bytes).sum()
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || serde::de::Error::custom(format!("not a digest: {s:?}"));
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Digest(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks() -> Vec<BlockInfo> {
        vec![
            BlockInfo {
                name: "pc.ram".into(),
                length_bytes: 16 * 4096,
            },
            BlockInfo {
                name: "pc.bios".into(),
                length_bytes: 2 * 4096,
            },
        ]
    }

    #[test]
    fn changes_apply_back_to_the_same_map() {
        let mut parent = PageMap::new(&blocks());
        parent.set(0, 3, Digest([3; 32]));
        parent.set(1, 1, Digest([9; 32]));
        let mut child = parent.clone();
        child.set(0, 3, Digest::zero_page());
        child.set(0, 15, Digest([7; 32]));
        let full = parent.changes_from(None);
        assert_eq!(full.len(), 2 * ENTRY_BYTES);
        let delta = child.changes_from(Some(&parent));
        assert_eq!(delta.len(), 2 * ENTRY_BYTES);
        let mut rebuilt = PageMap::new(&blocks());
        rebuilt.apply(&full).unwrap();
        assert_eq!(rebuilt, parent);
        rebuilt.apply(&delta).unwrap();
        assert_eq!(rebuilt, child);
        assert!(!rebuilt.set(0, 16, Digest([1; 32])));
        assert!(rebuilt.apply(&delta[..5]).is_err());
        let mut wrong = delta.clone();
        wrong[0] = 7;
        assert!(rebuilt
            .apply(&wrong)
            .unwrap_err()
            .contains("does not exist"));
    }

    #[test]
    fn digests_serialize_as_hex() {
        let d = Digest::of(b"x");
        let s = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&s).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"zz\"").is_err());
    }
}
