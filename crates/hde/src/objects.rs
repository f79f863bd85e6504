//! Where objects live: packs of about 64 KiB of encoded objects, and an
//! index from digest to (pack, offset, length).
//!
//! Compressed pages are 100 bytes to 4 KiB; kept one per B-tree value they
//! would waste about half of every database page. Packed, each database
//! value is a run of whole pages, and a reader that goes through a
//! checkpoint in order (a restore) reads each pack once ([`ObjectReader`]
//! keeps the last few).

use std::collections::{HashMap, HashSet};

use redb::{ReadableTable, StorageError, Table, TableDefinition};

use crate::codec::{self, ObjectHead, Page, MAX_DELTA_DEPTH};
use crate::store::{GcReport, PageProblem};
use crate::{Digest, HdeError};

/// Digest -> 16 bytes: pack id (be64), offset (be32), length (be32).
pub(crate) const INDEX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("index");
/// Pack id -> concatenated encoded objects.
pub(crate) const PACKS: TableDefinition<u64, &[u8]> = TableDefinition::new("packs");

/// A pack is sealed once it holds this much.
pub(crate) const PACK_BYTES: usize = 60 << 10;
/// Packs kept decoded by a reader.
const CACHED_PACKS: usize = 4;
/// Packs with less than this share of live bytes are rewritten by GC.
const COMPACT_BELOW: f64 = 0.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Location {
    pub pack: u64,
    pub offset: u32,
    pub len: u32,
}

impl Location {
    pub fn encode(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.pack.to_be_bytes());
        v[8..12].copy_from_slice(&self.offset.to_be_bytes());
        v[12..].copy_from_slice(&self.len.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<Location> {
        if v.len() != 16 {
            return None;
        }
        Some(Location {
            pack: u64::from_be_bytes(v[..8].try_into().ok()?),
            offset: u32::from_be_bytes(v[8..12].try_into().ok()?),
            len: u32::from_be_bytes(v[12..].try_into().ok()?),
        })
    }
}

/// Reads objects through the index, with a small cache of packs.
pub(crate) struct ObjectReader<I, P> {
    index: I,
    packs: P,
    cache: Vec<(u64, Vec<u8>)>,
}

/// A reader over a read transaction's snapshot.
pub(crate) type SnapshotReader = ObjectReader<
    redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    redb::ReadOnlyTable<u64, &'static [u8]>,
>;

/// Why an object could not be read.
pub(crate) enum Fetch {
    Missing,
    /// The index points at a pack or range that is not there.
    Broken(String),
}

impl<I, P> ObjectReader<I, P>
where
    I: ReadableTable<&'static [u8], &'static [u8]>,
    P: ReadableTable<u64, &'static [u8]>,
{
    pub fn new(index: I, packs: P) -> Self {
        ObjectReader {
            index,
            packs,
            cache: Vec::new(),
        }
    }

    /// The encoded object, or why not.
    pub fn get(&mut self, d: &Digest) -> Result<Result<Vec<u8>, Fetch>, StorageError> {
        let Some(v) = self.index.get(&d.0[..])? else {
            return Ok(Err(Fetch::Missing));
        };
        let Some(loc) = Location::decode(v.value()) else {
            return Ok(Err(Fetch::Broken("its index entry is malformed".into())));
        };
        drop(v);
        let at = match self.cache.iter().position(|(p, _)| *p == loc.pack) {
            Some(i) => i,
            None => {
                let Some(pack) = self.packs.get(loc.pack)? else {
                    return Ok(Err(Fetch::Broken(format!(
                        "its pack {} is missing",
                        loc.pack
                    ))));
                };
                if self.cache.len() >= CACHED_PACKS {
                    self.cache.remove(0);
                }
                self.cache.push((loc.pack, pack.value().to_vec()));
                self.cache.len() - 1
            }
        };
        let pack = &self.cache[at].1;
        let (start, end) = (loc.offset as usize, loc.offset as usize + loc.len as usize);
        match pack.get(start..end) {
            Some(bytes) => Ok(Ok(bytes.to_vec())),
            None => Ok(Err(Fetch::Broken(format!(
                "its range {start}..{end} is beyond the end of pack {} ({} bytes)",
                loc.pack,
                pack.len()
            )))),
        }
    }

    /// Reads and checks one page, following its delta chain.
    pub fn page(&mut self, digest: &Digest) -> Result<Box<Page>, PageProblem> {
        self.page_at(digest, 0)
    }

    fn page_at(&mut self, digest: &Digest, depth: u8) -> Result<Box<Page>, PageProblem> {
        if *digest == Digest::zero_page() {
            return Ok(Box::new([0u8; dwcp_vmstream::PAGE_SIZE]));
        }
        if depth > MAX_DELTA_DEPTH {
            return Err(PageProblem::Corrupt("its delta chain is too long".into()));
        }
        let bytes = match self.get(digest)? {
            Ok(b) => b,
            Err(Fetch::Missing) => return Err(PageProblem::Missing),
            Err(Fetch::Broken(s)) => return Err(PageProblem::Corrupt(s)),
        };
        let base = match codec::head(&bytes) {
            Ok(ObjectHead::Delta { base, .. }) => {
                Some(self.page_at(&base, depth + 1).map_err(|p| {
                    let why = match p {
                        PageProblem::Missing => "missing".to_string(),
                        PageProblem::Corrupt(s) => s,
                        PageProblem::Store(e) => e.to_string(),
                    };
                    PageProblem::Corrupt(format!("its delta base {base}: {why}"))
                })?)
            }
            _ => None,
        };
        let page = codec::decode_page(&bytes, |_| {
            base.ok_or_else(|| HdeError::Stream("no base".into()))
        })
        .map_err(PageProblem::Corrupt)?;
        let got = Digest::of(&page[..]);
        if got != *digest {
            return Err(PageProblem::Corrupt(format!("its content hashes to {got}")));
        }
        Ok(page)
    }

    /// Delta depth of a stored page (0 when it is not a delta).
    pub fn delta_depth(&mut self, digest: &Digest) -> Result<u8, StorageError> {
        Ok(match self.get(digest)? {
            Ok(b) => match codec::head(&b) {
                Ok(ObjectHead::Delta { depth, .. }) => depth,
                _ => 0,
            },
            Err(_) => 0,
        })
    }

    /// Reads and checks a blob.
    pub fn blob(&mut self, digest: &Digest) -> Result<Vec<u8>, String> {
        let bytes = match self.get(digest).map_err(|e| e.to_string())? {
            Ok(b) => b,
            Err(Fetch::Missing) => return Err(format!("object {digest} is missing")),
            Err(Fetch::Broken(s)) => return Err(format!("object {digest}: {s}")),
        };
        let data = codec::decode_blob(&bytes, crate::store::MAX_BLOB_BYTES)?;
        let got = Digest::of(&data);
        if got != *digest {
            return Err(format!("object {digest} hashes to {got}"));
        }
        Ok(data)
    }
}

/// Collects new objects into packs and writes each sealed pack with its
/// index entries (so the index never points at a pack not yet written).
pub(crate) struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<(Digest, u32, u32)>,
    /// Packs this writer wrote.
    pub written: Vec<u64>,
}

impl PackWriter {
    pub fn new() -> PackWriter {
        PackWriter {
            buf: Vec::with_capacity(PACK_BYTES + 8192),
            entries: Vec::new(),
            written: Vec::new(),
        }
    }

    /// Adds an object; seals the pack into the tables when it is full.
    pub fn add(
        &mut self,
        digest: Digest,
        bytes: &[u8],
        index: &mut Table<&'static [u8], &'static [u8]>,
        packs: &mut Table<u64, &'static [u8]>,
        next_pack: &mut u64,
    ) -> Result<(), StorageError> {
        if !self.buf.is_empty() && self.buf.len() + bytes.len() > PACK_BYTES + 4096 {
            self.seal(index, packs, next_pack)?;
        }
        self.entries
            .push((digest, self.buf.len() as u32, bytes.len() as u32));
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= PACK_BYTES {
            self.seal(index, packs, next_pack)?;
        }
        Ok(())
    }

    /// Whether `digest` sits in the pack being filled.
    pub fn holds(&self, digest: &Digest) -> bool {
        self.entries.iter().any(|(d, _, _)| d == digest)
    }

    pub fn seal(
        &mut self,
        index: &mut Table<&'static [u8], &'static [u8]>,
        packs: &mut Table<u64, &'static [u8]>,
        next_pack: &mut u64,
    ) -> Result<(), StorageError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let id = *next_pack;
        *next_pack += 1;
        packs.insert(id, self.buf.as_slice())?;
        for (d, offset, len) in self.entries.drain(..) {
            let loc = Location {
                pack: id,
                offset,
                len,
            };
            index.insert(&d.0[..], &loc.encode()[..])?;
        }
        self.buf.clear();
        self.written.push(id);
        Ok(())
    }
}

/// Removes index entries that are not `live`, drops packs left empty and
/// rewrites packs that are mostly dead (all packs, or only those in
/// `only`). Runs inside the caller's write transaction.
pub(crate) fn sweep(
    index: &mut Table<&'static [u8], &'static [u8]>,
    packs: &mut Table<u64, &'static [u8]>,
    next_pack: &mut u64,
    live: &dyn Fn(&Digest) -> bool,
    only: Option<&HashSet<u64>>,
) -> Result<GcReport, StorageError> {
    let mut report = GcReport::default();
    // pack -> live (digest, location)s, and dead entries to remove.
    let mut live_in: HashMap<u64, Vec<(Digest, Location)>> = HashMap::new();
    let mut dead = Vec::new();
    for row in index.iter()? {
        let (k, v) = row?;
        let d = crate::store::digest_from(k.value());
        let loc = Location::decode(v.value());
        match loc {
            Some(l) if only.is_some_and(|o| !o.contains(&l.pack)) => {}
            Some(l) if k.value().len() == 32 && live(&d) => {
                live_in.entry(l.pack).or_default().push((d, l))
            }
            _ => dead.push((k.value().to_vec(), loc.map_or(0, |l| l.len as u64))),
        }
    }
    for (k, n) in &dead {
        index.remove(k.as_slice())?;
        report.objects_removed += 1;
        report.bytes_removed += n;
    }
    let mut pack_ids = Vec::new();
    for row in packs.iter()? {
        let (k, v) = row?;
        if only.is_none_or(|o| o.contains(&k.value())) {
            pack_ids.push((k.value(), v.value().len()));
        }
    }
    let mut rewriter = PackWriter::new();
    for (id, size) in pack_ids {
        let entries = live_in.remove(&id).unwrap_or_default();
        let live_bytes: u64 = entries.iter().map(|(_, l)| l.len as u64).sum();
        if !entries.is_empty() && live_bytes as f64 >= size as f64 * COMPACT_BELOW {
            continue;
        }
        let old = match packs.get(id)? {
            Some(v) => v.value().to_vec(),
            None => continue,
        };
        for (d, l) in entries {
            let range = l.offset as usize..(l.offset + l.len) as usize;
            if let Some(bytes) = old.get(range) {
                rewriter.add(d, bytes, index, packs, next_pack)?;
            }
        }
        packs.remove(id)?;
        report.bytes_removed += (size as u64).saturating_sub(live_bytes);
    }
    rewriter.seal(index, packs, next_pack)?;
    Ok(report)
}
