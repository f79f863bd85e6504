//! Checkpoint replicas: sending a checkpoint to another node's store, and
//! only the objects that store lacks.
//!
//! The sender offers the checkpoint ([`PageStore::replica_offer`]: its
//! manifest, full page map and every object it needs, delta bases and
//! blobs included); the receiver answers with what it lacks
//! ([`PageStore::missing`]); the sender sends those objects
//! ([`PageStore::read_objects`]); the receiver checks every one against its
//! digest and stores the checkpoint as `ORIGIN:ID`
//! ([`PageStore::import_replica`]). The byte formats of the two messages
//! are here too ([`encode_offer`], [`decode_offer`], [`encode_objects`],
//! [`decode_objects`]); nothing in them is trusted.

use std::collections::{HashMap, HashSet};

use crate::codec::{self, ObjectHead, Page, MAX_DELTA_DEPTH};
use crate::objects::{Fetch, ObjectReader, PackWriter, INDEX, PACKS};
use crate::store::{read_page_map, COUNTERS, MANIFESTS, MAX_BLOB_BYTES, NEXT_PACK, PAGEMAPS};
use crate::{Digest, HdeError, Manifest, PageMap, PageStore};

/// A checkpoint as offered to another node.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaOffer {
    pub manifest: Manifest,
    /// The full page map (changes against all-zero memory).
    pub map: Vec<u8>,
    /// Every object the checkpoint needs.
    pub digests: Vec<Digest>,
}

/// Largest manifest accepted in a message.
const MAX_MANIFEST_BYTES: usize = 16 << 20;

fn bad(what: &str) -> HdeError {
    HdeError::Stream(format!("malformed replica message: {what}"))
}

fn take<'a>(b: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], HdeError> {
    if b.len() < n {
        return Err(bad(what));
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Ok(h)
}

fn take_u32(b: &mut &[u8], what: &str) -> Result<usize, HdeError> {
    let v = take(b, 4, what)?;
    Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]) as usize)
}

fn put_head(out: &mut Vec<u8>, manifest: &Manifest, map: &[u8]) -> Result<(), HdeError> {
    let json = serde_json::to_vec(manifest).map_err(|e| bad(&e.to_string()))?;
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&(map.len() as u32).to_be_bytes());
    out.extend_from_slice(map);
    Ok(())
}

fn take_head(b: &mut &[u8]) -> Result<(Manifest, Vec<u8>), HdeError> {
    let n = take_u32(b, "manifest length")?;
    if n > MAX_MANIFEST_BYTES {
        return Err(bad("manifest too large"));
    }
    let manifest: Manifest = serde_json::from_slice(take(b, n, "manifest")?)
        .map_err(|e| bad(&format!("manifest: {e}")))?;
    let m = take_u32(b, "page map length")?;
    let map = take(b, m, "page map")?.to_vec();
    Ok((manifest, map))
}

pub fn encode_offer(o: &ReplicaOffer) -> Result<Vec<u8>, HdeError> {
    let mut out = Vec::with_capacity(o.map.len() + 32 * o.digests.len() + 4096);
    put_head(&mut out, &o.manifest, &o.map)?;
    for d in &o.digests {
        out.extend_from_slice(&d.0);
    }
    Ok(out)
}

pub fn decode_offer(mut b: &[u8]) -> Result<ReplicaOffer, HdeError> {
    let (manifest, map) = take_head(&mut b)?;
    if !b.len().is_multiple_of(32) {
        return Err(bad("digest list cut short"));
    }
    let digests = b.chunks_exact(32).map(crate::store::digest_from).collect();
    Ok(ReplicaOffer {
        manifest,
        map,
        digests,
    })
}

/// A list of digests (the receiver's answer).
pub fn encode_digests(ds: &[Digest]) -> Vec<u8> {
    ds.iter().flat_map(|d| d.0).collect()
}

pub fn decode_digests(b: &[u8]) -> Result<Vec<Digest>, HdeError> {
    if !b.len().is_multiple_of(32) {
        return Err(bad("digest list cut short"));
    }
    Ok(b.chunks_exact(32).map(crate::store::digest_from).collect())
}

pub fn encode_objects(
    manifest: &Manifest,
    map: &[u8],
    objects: &[(Digest, Vec<u8>)],
) -> Result<Vec<u8>, HdeError> {
    let total: usize = objects.iter().map(|(_, o)| o.len() + 36).sum();
    let mut out = Vec::with_capacity(total + map.len() + 4096);
    put_head(&mut out, manifest, map)?;
    for (d, o) in objects {
        out.extend_from_slice(&d.0);
        out.extend_from_slice(&(o.len() as u32).to_be_bytes());
        out.extend_from_slice(o);
    }
    Ok(out)
}

#[allow(clippy::type_complexity)]
pub fn decode_objects(
    mut b: &[u8],
) -> Result<(Manifest, Vec<u8>, Vec<(Digest, Vec<u8>)>), HdeError> {
    let (manifest, map) = take_head(&mut b)?;
    let mut objects = Vec::new();
    while !b.is_empty() {
        let d = crate::store::digest_from(take(&mut b, 32, "object digest")?);
        let n = take_u32(&mut b, "object length")?;
        if n > MAX_BLOB_BYTES + 64 {
            return Err(bad("object too large"));
        }
        objects.push((d, take(&mut b, n, "object")?.to_vec()));
    }
    Ok((manifest, map, objects))
}

impl PageStore {
    /// Checkpoint `id` with everything it needs, to offer to another node.
    pub fn replica_offer(&self, id: &str) -> Result<ReplicaOffer, HdeError> {
        let tx = self.db()?.begin_read()?;
        let (manifest, map) = read_page_map(&tx, id)?;
        let mut reader = ObjectReader::new(tx.open_table(INDEX)?, tx.open_table(PACKS)?);
        let zero = Digest::zero_page();
        let mut seen: HashSet<Digest> = HashSet::new();
        let mut digests = Vec::new();
        let mut work: Vec<Digest> = vec![manifest.prologue, manifest.middle, manifest.tail];
        work.extend(map.iter().map(|(_, _, d)| *d).filter(|d| *d != zero));
        while let Some(d) = work.pop() {
            if !seen.insert(d) {
                continue;
            }
            digests.push(d);
            if let Ok(bytes) = reader.get(&d)? {
                if let Ok(ObjectHead::Delta { base, .. }) = codec::head(&bytes) {
                    work.push(base);
                }
            }
        }
        Ok(ReplicaOffer {
            map: map.changes_from(None),
            manifest,
            digests,
        })
    }

    /// Those of `digests` this store does not hold.
    pub fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, HdeError> {
        let tx = self.db()?.begin_read()?;
        let index = tx.open_table(INDEX)?;
        let mut out = Vec::new();
        for d in digests {
            if *d != Digest::zero_page() && redb::ReadableTable::get(&index, &d.0[..])?.is_none() {
                out.push(*d);
            }
        }
        Ok(out)
    }

    /// The stored form of each object, as it goes on the wire.
    pub fn read_objects(&self, digests: &[Digest]) -> Result<Vec<(Digest, Vec<u8>)>, HdeError> {
        let tx = self.db()?.begin_read()?;
        let mut reader = ObjectReader::new(tx.open_table(INDEX)?, tx.open_table(PACKS)?);
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            match reader.get(d)? {
                Ok(b) => out.push((*d, b)),
                Err(Fetch::Missing) => {
                    return Err(HdeError::Stream(format!("object {d} is not in this store")))
                }
                Err(Fetch::Broken(s)) => return Err(HdeError::Stream(format!("object {d}: {s}"))),
            }
        }
        Ok(out)
    }

    /// Stores a checkpoint received from node `origin` as `ORIGIN:ID`.
    /// Every object is checked against its digest (a delta through its
    /// base, from the batch or the store) and the page map must be complete
    /// with what the store then holds; otherwise nothing is stored.
    pub fn import_replica(
        &self,
        origin: &str,
        mut manifest: Manifest,
        map_bytes: &[u8],
        objects: Vec<(Digest, Vec<u8>)>,
    ) -> Result<Manifest, HdeError> {
        let _w = self.lock_writer();
        let id = format!("{origin}:{}", manifest.id);
        let mut map = PageMap::new(&manifest.blocks);
        map.apply(map_bytes)
            .map_err(|problem| HdeError::CorruptManifest {
                checkpoint: id.clone(),
                problem,
            })?;
        let db = self.db()?;
        let batch: HashMap<Digest, Vec<u8>> = objects.into_iter().collect();
        {
            let snap = db.begin_read()?;
            let mut reader = ObjectReader::new(snap.open_table(INDEX)?, snap.open_table(PACKS)?);
            for d in batch.keys() {
                verify_incoming(d, &batch, &mut reader, 0).map_err(|problem| {
                    HdeError::Stream(format!("object {d} from {origin}: {problem}"))
                })?;
            }
            let zero = Digest::zero_page();
            let present = |d: &Digest,
                           reader: &mut crate::objects::SnapshotReader|
             -> Result<bool, HdeError> {
                Ok(*d == zero
                    || batch.contains_key(d)
                    || !matches!(reader.get(d)?, Err(Fetch::Missing)))
            };
            for (b, p, d) in map.iter() {
                if !present(d, &mut reader)? {
                    return Err(HdeError::MissingPage {
                        checkpoint: id.clone(),
                        digest: *d,
                        location: manifest.location(b, p),
                    });
                }
            }
            for (what, d) in [
                ("the stream prologue", manifest.prologue),
                ("the commands between sections", manifest.middle),
                ("the device state", manifest.tail),
            ] {
                if !present(&d, &mut reader)? {
                    return Err(HdeError::CorruptBlob {
                        checkpoint: id.clone(),
                        what,
                        problem: format!("{origin} did not send object {d}"),
                    });
                }
            }
        }
        let tx = db.begin_write()?;
        {
            let mut manifests = tx.open_table(MANIFESTS)?;
            if redb::ReadableTable::get(&manifests, id.as_str())?.is_some() {
                return Err(HdeError::CheckpointExists(id));
            }
            let mut index = tx.open_table(INDEX)?;
            let mut packs = tx.open_table(PACKS)?;
            let mut counters = tx.open_table(COUNTERS)?;
            let mut next_pack = redb::ReadableTable::get(&counters, NEXT_PACK)?
                .map(|v| v.value())
                .unwrap_or(0);
            let mut packer = PackWriter::new();
            let mut added = 0u64;
            for (d, bytes) in &batch {
                if redb::ReadableTable::get(&index, &d.0[..])?.is_none() && !packer.holds(d) {
                    packer.add(*d, bytes, &mut index, &mut packs, &mut next_pack)?;
                    added += bytes.len() as u64;
                }
            }
            packer.seal(&mut index, &mut packs, &mut next_pack)?;
            counters.insert(NEXT_PACK, next_pack)?;
            manifest.id = id.clone();
            manifest.parent = None;
            manifest.chain_depth = 0;
            manifest.origin = Some(origin.to_string());
            manifest.stats.stored_bytes = added + map_bytes.len() as u64;
            let json = serde_json::to_vec(&manifest).map_err(|e| HdeError::CorruptManifest {
                checkpoint: id.clone(),
                problem: e.to_string(),
            })?;
            manifests.insert(id.as_str(), json.as_slice())?;
            tx.open_table(PAGEMAPS)?.insert(id.as_str(), map_bytes)?;
        }
        tx.commit()?;
        Ok(manifest)
    }
}

/// Checks one received object: a blob or page hashes to its digest; a
/// delta's base comes from the batch (checked in turn) or the store.
fn verify_incoming(
    d: &Digest,
    batch: &HashMap<Digest, Vec<u8>>,
    reader: &mut crate::objects::SnapshotReader,
    depth: u8,
) -> Result<Box<Page>, String> {
    if depth > MAX_DELTA_DEPTH {
        return Err("its delta chain is too long".into());
    }
    let Some(bytes) = batch.get(d) else {
        return reader.page(d).map_err(crate::store::describe);
    };
    match codec::head(bytes)? {
        ObjectHead::Blob => {
            let data = codec::decode_blob(bytes, MAX_BLOB_BYTES)?;
            if Digest::of(&data) != *d {
                return Err("its content does not match its digest".into());
            }
            Ok(Box::new([0u8; dwcp_vmstream::PAGE_SIZE]))
        }
        head => {
            let base = match head {
                ObjectHead::Delta { base, .. } => {
                    Some(verify_incoming(&base, batch, reader, depth + 1)?)
                }
                _ => None,
            };
            let page = codec::decode_page(bytes, |_| {
                base.ok_or_else(|| HdeError::Stream("no base".into()))
            })?;
            if Digest::of(&page[..]) != *d {
                return Err("its content does not match its digest".into());
            }
            Ok(page)
        }
    }
}
