//! Writing a checkpoint from a live migration stream.

use std::collections::HashMap;
use std::sync::MutexGuard;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dwcp_vmstream::{Item, MetaKind, PageData, SectionKind, PAGE_SIZE};
use redb::ReadableTable;

use crate::codec::{Encoder, Encoding, Page};
use crate::manifest::BlockInfo;
use crate::objects::{sweep, ObjectReader, PackWriter, INDEX, PACKS};
use crate::store::{self, PageProblem, COUNTERS, LOST, MANIFESTS, NEXT_PACK, PAGEMAPS};
use crate::{CheckpointStats, Digest, HdeError, Manifest, PageMap, PageStore};

/// Pages hashed but not yet looked up and written.
#[cfg(not(test))]
const BATCH_PAGES: usize = 1024;
#[cfg(test)]
const BATCH_PAGES: usize = 64;
/// Page maps chain at most this deep; then a checkpoint stores a full map.
const MAX_CHAIN: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Header, configuration, the START section.
    Prologue,
    /// PART and END sections.
    Ram,
    Tail,
}

/// Takes the items of one migration stream, in order, and stores them as
/// checkpoint `id`. Only one writer works on a store at a time (it holds
/// the store's writer lock). Dropping it unfinished removes what it wrote.
///
/// Call order: [`PageStore::begin_checkpoint`], [`push`](Self::push) every
/// item, [`finish`](Self::finish).
pub struct CheckpointWriter<'s> {
    db: std::sync::Arc<redb::Database>,
    _lock: MutexGuard<'s, ()>,
    id: String,
    vm: String,
    parent: Option<(Manifest, PageMap)>,
    blocks: Vec<BlockInfo>,
    map: Option<PageMap>,
    ram_section_id: Option<u32>,
    saw_end: bool,
    prologue: Vec<u8>,
    middle: Vec<u8>,
    tail: Vec<u8>,
    phase: Phase,
    encoder: Encoder,
    pending: Vec<(u16, u32, Digest, Box<Page>)>,
    /// New objects written by this checkpoint, with their sizes.
    written: HashMap<Digest, u64>,
    packer: PackWriter,
    /// Pages `verify` found missing or corrupt: stored again when met.
    lost: std::collections::HashSet<Digest>,
    stats: CheckpointStats,
    busy: std::time::Duration,
    finished: bool,
}

impl PageStore {
    /// Starts checkpoint of `vm` (waiting for any other writer to finish).
    /// Its parent is the VM's newest checkpoint, if any.
    pub fn begin_checkpoint(&self, vm: &str) -> Result<CheckpointWriter<'_>, HdeError> {
        let lock = self.lock_writer();
        let parent = match self.latest_for(vm)? {
            Some(m) => Some(self.page_map(&m.id)?),
            None => None,
        };
        let id = self.next_id(vm)?;
        let mut lost = std::collections::HashSet::new();
        {
            let tx = self.db()?.begin_read()?;
            for row in tx.open_table(LOST)?.iter()? {
                lost.insert(store::digest_from(row?.0.value()));
            }
        }
        Ok(CheckpointWriter {
            db: self.db()?,
            _lock: lock,
            id,
            vm: vm.to_string(),
            parent,
            blocks: Vec::new(),
            map: None,
            ram_section_id: None,
            saw_end: false,
            prologue: Vec::new(),
            middle: Vec::new(),
            tail: Vec::new(),
            phase: Phase::Prologue,
            encoder: Encoder::new(self.level())?,
            pending: Vec::with_capacity(BATCH_PAGES),
            written: HashMap::new(),
            packer: PackWriter::new(),
            lost,
            stats: CheckpointStats::default(),
            busy: std::time::Duration::ZERO,
            finished: false,
        })
    }
}

impl CheckpointWriter<'_> {
    /// The id the checkpoint will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The parent checkpoint, if there is one.
    pub fn parent_id(&self) -> Option<&str> {
        self.parent.as_ref().map(|(m, _)| m.id.as_str())
    }

    /// Stream bytes taken so far.
    pub fn stream_bytes(&self) -> u64 {
        self.stats.stream_bytes
    }

    /// Takes the next item of the stream.
    pub fn push(&mut self, item: Item) -> Result<(), HdeError> {
        let started = Instant::now();
        let r = self.push_inner(item);
        self.busy += started.elapsed();
        r
    }

    fn push_inner(&mut self, item: Item) -> Result<(), HdeError> {
        match item {
            Item::Meta { kind, bytes } => {
                self.stats.stream_bytes += bytes.len() as u64;
                self.meta(kind, bytes)
            }
            Item::Page(p) => {
                let offset = p.offset;
                let name_len = self
                    .blocks
                    .get(p.block as usize)
                    .map_or(0, |b| b.name.len());
                self.stats.stream_bytes += p.stream_len(name_len) as u64;
                if self.phase != Phase::Ram {
                    return Err(HdeError::Stream("a page before the RAM block list".into()));
                }
                self.stats.page_records += 1;
                let page = match p.data {
                    PageData::Fill(0) => None,
                    PageData::Fill(b) => Some(Box::new([b; PAGE_SIZE])),
                    PageData::Full(data) => Some(data),
                };
                let index = (offset / PAGE_SIZE as u64) as u32;
                let Some(map) = self.map.as_mut() else {
                    return Err(HdeError::Stream("a page before the RAM block list".into()));
                };
                match page {
                    None => {
                        map.set(p.block as usize, index as usize, Digest::zero_page());
                    }
                    Some(data) => {
                        let d = if data.iter().all(|&b| b == 0) {
                            Digest::zero_page()
                        } else {
                            Digest::of(&data[..])
                        };
                        map.set(p.block as usize, index as usize, d);
                        let unchanged = self
                            .parent
                            .as_ref()
                            .and_then(|(_, m)| m.get(p.block as usize, index as usize))
                            == Some(&d)
                            && !self.lost.contains(&d);
                        if d != Digest::zero_page() && !unchanged && !self.written.contains_key(&d)
                        {
                            self.pending.push((p.block, index, d, data));
                            if self.pending.len() >= BATCH_PAGES {
                                self.flush()?;
                            }
                        }
                    }
                }
                Ok(())
            }
            Item::Tail(bytes) => {
                self.stats.stream_bytes += bytes.len() as u64;
                if !self.saw_end {
                    return Err(HdeError::Stream(
                        "device state began before the final RAM section (a section dwcp does not understand)".into(),
                    ));
                }
                self.phase = Phase::Tail;
                self.tail.extend_from_slice(&bytes);
                if self.tail.len() > store::MAX_BLOB_BYTES {
                    return Err(HdeError::Stream("device state larger than 256 MiB".into()));
                }
                Ok(())
            }
        }
    }

    fn meta(&mut self, kind: MetaKind, bytes: Vec<u8>) -> Result<(), HdeError> {
        match (self.phase, kind) {
            (Phase::Prologue, MetaKind::RamSection(SectionKind::Start)) => {
                self.ram_section_id = Some(section_id(&bytes));
                self.prologue.extend_from_slice(&bytes);
            }
            (Phase::Prologue, MetaKind::RamBlocks) => {
                // The parser announced the blocks; read them back from the bytes.
                self.blocks = dwcp_vmstream::block_list(&bytes)
                    .map(|bs| bs.iter().map(BlockInfo::from).collect())
                    .ok_or_else(|| HdeError::Stream("an unreadable RAM block list".into()))?;
                let map = PageMap::new(&self.blocks);
                if let Some((_, pm)) = &self.parent {
                    if !pm.same_shape(&map) {
                        tracing::info!(vm = %self.vm, "memory layout changed: full checkpoint");
                        self.parent = None;
                    }
                }
                self.map = Some(map);
                self.prologue.extend_from_slice(&bytes);
            }
            (Phase::Prologue, MetaKind::RamSectionEnd) => {
                if self.map.is_none() {
                    return Err(HdeError::Stream(
                        "the START section has no RAM block list".into(),
                    ));
                }
                self.prologue.extend_from_slice(&bytes);
                self.phase = Phase::Ram;
            }
            (Phase::Prologue, _) => self.prologue.extend_from_slice(&bytes),
            (Phase::Ram, MetaKind::Command(_)) => self.middle.extend_from_slice(&bytes),
            (Phase::Ram, MetaKind::RamSection(SectionKind::End)) => self.saw_end = true,
            (Phase::Ram, MetaKind::RamSection(_) | MetaKind::RamSectionEnd) => {}
            (phase, kind) => {
                return Err(HdeError::Stream(format!(
                    "unexpected {kind:?} in {phase:?}"
                )));
            }
        }
        Ok(())
    }

    /// Looks up and writes the pending pages, in a commit of its own. The
    /// commit is durable: redb frees the space of replaced B-tree pages only
    /// at durable commits, and the index (random keys) changes everywhere
    /// in every batch, so lighter commits made the file grow 1.6x. The pack
    /// being filled carries over to the next batch.
    fn flush(&mut self) -> Result<(), HdeError> {
        // Delta bases are pages of the parent, committed long ago.
        let snapshot = self.db.begin_read()?;
        let mut bases = ObjectReader::new(snapshot.open_table(INDEX)?, snapshot.open_table(PACKS)?);
        let written_before = self.written.len();
        let tx = self.db.begin_write()?;
        {
            let mut index = tx.open_table(INDEX)?;
            let mut packs = tx.open_table(PACKS)?;
            let mut counters = tx.open_table(COUNTERS)?;
            let mut next_pack = counters.get(NEXT_PACK)?.map(|v| v.value()).unwrap_or(0);
            for (block, page_index, d, data) in self.pending.drain(..) {
                if self.written.contains_key(&d) || index.get(&d.0[..])?.is_some() {
                    continue;
                }
                let parent_digest = self
                    .parent
                    .as_ref()
                    .and_then(|(_, m)| m.get(block as usize, page_index as usize))
                    .copied()
                    .filter(|p| *p != Digest::zero_page());
                let base = match parent_digest {
                    Some(pd) => match bases.page(&pd) {
                        Ok(page) => Some((pd, page, bases.delta_depth(&pd)?)),
                        // A broken parent page is no base; verify reports it.
                        Err(PageProblem::Missing | PageProblem::Corrupt(_)) => None,
                        Err(PageProblem::Store(e)) => return Err(e),
                    },
                    None => None,
                };
                let (bytes, how) = self
                    .encoder
                    .page(&data, base.as_ref().map(|(d, p, depth)| (d, &**p, *depth)))?;
                self.packer
                    .add(d, &bytes, &mut index, &mut packs, &mut next_pack)?;
                if how == Encoding::Delta {
                    self.stats.delta_pages += 1;
                }
                self.stats.new_pages += 1;
                self.written.insert(d, bytes.len() as u64);
            }
            counters.insert(NEXT_PACK, next_pack)?;
        }
        if self.written.len() == written_before {
            // Every page was known: nothing to make durable.
            tx.abort()?;
        } else {
            tx.commit()?;
        }
        Ok(())
    }

    /// Completes the checkpoint: stores the blobs, page map and manifest in
    /// one durable commit, and removes page versions the stream superseded.
    /// `meta` is kept for whoever restores it; `pause_ms` and
    /// `qemu_downtime_ms` go into its statistics.
    pub fn finish(
        mut self,
        meta: serde_json::Value,
        pause_ms: Option<u64>,
        qemu_downtime_ms: Option<u64>,
    ) -> Result<Manifest, HdeError> {
        let started = Instant::now();
        if self.phase != Phase::Tail || !dwcp_vmstream::tail_is_complete(&self.tail) {
            return Err(HdeError::Stream(
                "the stream ended before its device state was complete".into(),
            ));
        }
        let (Some(map), Some(ram_section_id)) = (self.map.take(), self.ram_section_id) else {
            return Err(HdeError::Stream("the stream has no RAM section".into()));
        };
        self.flush()?;

        let zero = Digest::zero_page();
        let parent_map = self.parent.as_ref().map(|(_, m)| m);
        let mut live = std::collections::HashSet::new();
        for (b, p, d) in map.iter() {
            if *d == zero {
                self.stats.zero_pages += 1;
                continue;
            }
            live.insert(*d);
            if parent_map.and_then(|m| m.get(b, p)) != Some(d) {
                self.stats.changed_pages += 1;
            }
        }
        self.stats.pages = map.pages();
        self.stats.memory_digest = Some(map.fingerprint());
        let superseded: Vec<Digest> = self
            .written
            .keys()
            .filter(|d| !live.contains(d))
            .copied()
            .collect();

        let (parent, chain_depth) = match &self.parent {
            Some((m, _)) if m.chain_depth < MAX_CHAIN => (Some(m.id.clone()), m.chain_depth + 1),
            _ => (None, 0),
        };
        let changes = match parent {
            Some(_) => map.changes_from(parent_map),
            None => map.changes_from(None),
        };
        let tx = self.db.begin_write()?;
        let manifest = {
            let mut index = tx.open_table(INDEX)?;
            let mut packs = tx.open_table(PACKS)?;
            let mut counters = tx.open_table(COUNTERS)?;
            let mut next_pack = counters.get(NEXT_PACK)?.map(|v| v.value()).unwrap_or(0);
            let encoder = &mut self.encoder;
            let packer = &mut self.packer;
            let mut blob = |data: &[u8], stats: &mut CheckpointStats| -> Result<Digest, HdeError> {
                let d = Digest::of(data);
                if index.get(&d.0[..])?.is_none() && !packer.holds(&d) {
                    let bytes = encoder.blob(data)?;
                    packer.add(d, &bytes, &mut index, &mut packs, &mut next_pack)?;
                    stats.stored_bytes += bytes.len() as u64;
                }
                Ok(d)
            };
            let prologue = blob(&self.prologue, &mut self.stats)?;
            let middle = blob(&self.middle, &mut self.stats)?;
            let tail = blob(&self.tail, &mut self.stats)?;
            self.packer.seal(&mut index, &mut packs, &mut next_pack)?;
            for d in &superseded {
                if let Some(n) = self.written.remove(d) {
                    self.stats.superseded_bytes += n;
                    self.stats.new_pages -= 1;
                }
            }
            // Drop the superseded versions from this checkpoint's packs.
            let mine: std::collections::HashSet<u64> =
                self.packer.written.iter().copied().collect();
            let gone: std::collections::HashSet<Digest> = superseded.into_iter().collect();
            sweep(
                &mut index,
                &mut packs,
                &mut next_pack,
                &|d| !gone.contains(d),
                Some(&mine),
            )?;
            counters.insert(NEXT_PACK, next_pack)?;
            // Lost pages this checkpoint stored again are found.
            let mut lost = tx.open_table(LOST)?;
            for d in &self.lost {
                if index.get(&d.0[..])?.is_some() {
                    lost.remove(&d.0[..])?;
                }
            }
            self.stats.stored_bytes += self.written.values().sum::<u64>() + changes.len() as u64;
            self.stats.encode_secs = (self.busy + started.elapsed()).as_secs_f64();
            self.stats.pause_ms = pause_ms;
            self.stats.qemu_downtime_ms = qemu_downtime_ms;
            let mut manifest = Manifest {
                id: self.id.clone(),
                vm: self.vm.clone(),
                created_unix_ms: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                parent,
                chain_depth,
                origin: None,
                ram_section_id,
                blocks: self.blocks.clone(),
                prologue,
                middle,
                tail,
                meta,
                stats: self.stats.clone(),
            };
            let guess = serde_json::to_vec(&manifest).map(|v| v.len()).unwrap_or(0);
            manifest.stats.stored_bytes += guess as u64;
            let json = serde_json::to_vec(&manifest).map_err(|e| HdeError::CorruptManifest {
                checkpoint: self.id.clone(),
                problem: e.to_string(),
            })?;
            tx.open_table(MANIFESTS)?
                .insert(self.id.as_str(), json.as_slice())?;
            tx.open_table(PAGEMAPS)?
                .insert(self.id.as_str(), changes.as_slice())?;
            manifest
        };
        tx.commit()?;
        self.finished = true;
        Ok(manifest)
    }
}

impl Drop for CheckpointWriter<'_> {
    fn drop(&mut self) {
        if self.finished || self.written.is_empty() {
            return;
        }
        // Best effort: what is left is removed by the next garbage collection.
        let removed = (|| -> Result<(), HdeError> {
            let tx = self.db.begin_write()?;
            {
                let mut index = tx.open_table(INDEX)?;
                let mut packs = tx.open_table(PACKS)?;
                for d in self.written.keys() {
                    index.remove(&d.0[..])?;
                }
                for p in &self.packer.written {
                    packs.remove(*p)?;
                }
            }
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = removed {
            tracing::warn!(checkpoint = %self.id, "could not remove the pages of an abandoned checkpoint: {e}");
        }
    }
}

fn section_id(header: &[u8]) -> u32 {
    u32::from_be_bytes([header[1], header[2], header[3], header[4]])
}
