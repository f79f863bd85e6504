//! The migration wire format: a VM image stream as it crosses the network.
//!
//! [`WireEncoder`] turns stream items into records and compresses the
//! records as one zstd stream, flushed whenever the caller hands a chunk on
//! (so nothing waits for more input). One stream rather than a frame per
//! page lets zstd find repeats across pages, as QEMU's multifd does per
//! channel, and on top of it pages are sent
//! - as a fill byte (QEMU's zero pages),
//! - as a reference to content the receiver holds: a page it holds from
//!   earlier in this migration (both sides keep the version of each page
//!   last sent, up to [`CACHE_PAGES`]), or a page of the checkpoint the
//!   receiver offered (`Known`),
//! - as nothing at all (`Same`, in runs) when the receiver's QEMU holds that
//!   very content at that very place: the receiver preloaded a replica of
//!   this VM's checkpoint before the first page arrived,
//! - as an XOR delta against the version the receiver holds (from an
//!   earlier round, or its replica), when the page changed a little (a
//!   page sent as a delta against an offered page is not kept: that page
//!   stays its base for later rounds),
//! - or as the page itself.
//!
//! [`WireDecoder`] turns records back into a stream QEMU loads: the source's
//! bytes exactly, plus, when asked to preload, the preloaded pages written
//! right after the RAM block list. A page rebuilt from a reference or a
//! delta is checked against a digest prefix the sender put in the record.
//! Both are sans-IO.
//!
//! Record layout (inside the zstd stream): a tag byte (low bits the kind,
//! `NAMED` set when QEMU named the block), then
//! - `VERBATIM`: tail (0/1), kind, be32 length, bytes;
//! - `FILL`: be16 block, be64 offset, the byte;
//! - `PAGE`: be16 block, be64 offset, 4096 bytes;
//! - `DELTA`: be16 block, be64 offset, base ref, 8-byte check, be16 count
//!   of runs, per run be16 offset, be16 length and that many bytes of the
//!   XOR with the base (runs of whole 8-byte words that changed: the
//!   unchanged rest is not written, so zstd need not squeeze 4 KiB of
//!   zeros per page on either side);
//! - `REF`: be16 block, be64 offset, ref, 8-byte check;
//! - `SAME`: be16 block, be64 first page index, be32 count;
//! - `PRELOAD`: be16 length, the checkpoint id the receiver is to preload.
//!
//! A ref is a kind byte, a be16 and a be32: 0, the page the receiver holds
//! in that block at that page index; 1, 0, the index of a page it offered.

/// The maps here are looked up several times per page: a fast hasher
/// (seeded per process, so a peer cannot aim collisions at it).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use dwcp_vmstream::{Block, Item, MetaKind, PageData, PageRecord, StreamWriter, PAGE_SIZE};
use zstd::stream::raw::{CParameter, DParameter, InBuffer, Operation, OutBuffer};

use crate::codec::Page;
use crate::{Digest, HdeError};

const TAG_VERBATIM: u8 = 0;
const TAG_FILL: u8 = 1;
const TAG_PAGE: u8 = 2;
const TAG_DELTA: u8 = 3;
const TAG_REF: u8 = 4;
const TAG_SAME: u8 = 5;
const TAG_PRELOAD: u8 = 6;
const NAMED: u8 = 0x80;
/// Largest verbatim run accepted (a device state piece).
const MAX_VERBATIM: usize = 64 << 20;
/// Pages both sides keep of those sent in this migration (1 GiB at most,
/// only while it runs): the version of each page last sent, the target of
/// references and the base of deltas when the page is sent again in a
/// later round. Both sides keep a page when they held it already or when
/// there is room, so they agree on what is kept without saying so.
pub const CACHE_PAGES: usize = 256 * 1024;
/// zstd window: repeats within 8 MiB of stream are found.
const WINDOW_LOG: u32 = 23;
/// A changed page goes as a delta when its runs take at most this many
/// bytes.
const DELTA_MAX: usize = PAGE_SIZE / 2;
/// Runs in a delta, at most (runs of 8-byte words with gaps between).
const DELTA_MAX_RUNS: usize = PAGE_SIZE / 16;
/// What a delta or a reference counts for in [`WireStats::record_bytes`],
/// however short: the receiver's work is a page's (a base read, a page
/// written).
const DELTA_COST: u64 = 11 + REF_LEN as u64 + 8 + PAGE_SIZE as u64;

/// What a delta or reference record of `len` bytes adds to the record
/// bytes on top of itself, on both sides: the rest of [`DELTA_COST`].
fn as_page(len: usize) -> u64 {
    DELTA_COST.saturating_sub(len as u64)
}
/// What a preloaded page counts for in [`WireStats::record_bytes`].
const PRELOAD_PAGE_COST: u64 = 11 + PAGE_SIZE as u64;
/// Longest run of `Same` pages in one record.
const MAX_RUN: u32 = 1 << 20;

/// What the encoder did, for progress and the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    pub stream_bytes: u64,
    /// Bytes handed on (compressed records).
    pub wire_bytes: u64,
    /// Bytes of the records before compression: about the receiver's work
    /// (see [`WireDecoder::record_bytes`]).
    pub record_bytes: u64,
    pub pages: u64,
    pub fill_pages: u64,
    /// Pages sent as a reference to content the receiver holds.
    pub ref_pages: u64,
    /// Pages the receiver's QEMU held already where they belong (preload).
    pub same_pages: u64,
    /// Pages sent as an XOR delta against the version the receiver holds.
    pub delta_pages: u64,
    /// Pages sent whole.
    pub full_pages: u64,
    /// Stream bytes saved by references and preloaded pages.
    pub saved_by_dedup: u64,
    /// Stream bytes saved by sending changed pages as deltas: a page's
    /// bytes less its delta record's (before compression).
    pub saved_by_delta: u64,
    /// Stream bytes saved by compression.
    pub saved_by_compression: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ref {
    /// The page the receiver holds at (block, page index).
    Slot(u16, u32),
    /// The receiver's offered page of this index.
    Known(u32),
}

/// Bytes of a ref on the wire.
const REF_LEN: usize = 7;

impl Ref {
    fn put(self, out: &mut Vec<u8>) {
        let (k, b, v) = match self {
            Ref::Slot(b, i) => (0u8, b, i),
            Ref::Known(i) => (1u8, 0, i),
        };
        out.push(k);
        out.extend_from_slice(&b.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    }

    fn get(b: &[u8]) -> Option<Ref> {
        let v = u32::from_be_bytes(b.get(3..7)?.try_into().ok()?);
        match b[0] {
            0 => Some(Ref::Slot(u16::from_be_bytes([b[1], b[2]]), v)),
            1 => Some(Ref::Known(v)),
            _ => None,
        }
    }
}

/// The pages one side holds from this migration, by slot (block, page
/// index). See [`CACHE_PAGES`]. Pages a slot gave up are reused for the
/// next (a page allocated per page sent was a sixth of the sender's time).
#[derive(Default)]
struct Cache {
    at: HashMap<(u16, u64), u32>,
    pages: Vec<Box<Page>>,
    free: Vec<u32>,
}

impl Cache {
    /// Keeps `page` as the slot's version if there is room; `false` if not
    /// kept (the slot's older version, if any, is replaced in any case).
    fn keep(&mut self, slot: (u16, u64), page: &Page) -> bool {
        if let Some(&i) = self.at.get(&slot) {
            *self.pages[i as usize] = *page;
            return true;
        }
        if self.at.len() >= CACHE_PAGES || slot.1 > u32::MAX as u64 {
            return false;
        }
        let i = match self.free.pop() {
            Some(i) => {
                *self.pages[i as usize] = *page;
                i
            }
            None => {
                self.pages.push(Box::new(*page));
                self.pages.len() as u32 - 1
            }
        };
        self.at.insert(slot, i);
        true
    }

    fn forget(&mut self, slot: (u16, u64)) {
        if let Some(i) = self.at.remove(&slot) {
            self.free.push(i);
        }
    }

    fn get(&self, slot: (u16, u64)) -> Option<&Page> {
        self.at.get(&slot).map(|&i| &*self.pages[i as usize])
    }

    /// The pages held of `block`: page index and content.
    fn into_block(self, block: u16) -> impl Iterator<Item = (u64, Box<Page>)> {
        let mut pages: Vec<Option<Box<Page>>> = self.pages.into_iter().map(Some).collect();
        self.at
            .into_iter()
            .filter(move |((b, _), _)| *b == block)
            .filter_map(move |((_, p), i)| Some((p, pages.get_mut(i as usize)?.take()?)))
    }
}

fn check_of(d: &Digest) -> [u8; 8] {
    d.0[..8].try_into().unwrap_or_default()
}

/// Appends the runs of `a` XOR `b` (see the module docs); `None` when
/// they would take more than [`DELTA_MAX`] bytes (what was appended is
/// left for the caller to cut).
fn delta_into(a: &Page, b: &Page, out: &mut Vec<u8>) -> Option<usize> {
    const W: usize = 8;
    let word =
        |p: &Page, i: usize| u64::from_ne_bytes(p[i * W..i * W + W].try_into().unwrap_or_default());
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    let (mut runs, mut i) = (0u16, 0);
    while i < PAGE_SIZE / W {
        if word(a, i) == word(b, i) {
            i += 1;
            continue;
        }
        let first = i;
        while i < PAGE_SIZE / W && word(a, i) != word(b, i) {
            i += 1;
        }
        let (at, len) = (first * W, (i - first) * W);
        out.extend_from_slice(&(at as u16).to_be_bytes());
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend(
            a[at..at + len]
                .iter()
                .zip(&b[at..at + len])
                .map(|(x, y)| x ^ y),
        );
        runs += 1;
        if out.len() - start > DELTA_MAX {
            return None;
        }
    }
    out[start..start + 2].copy_from_slice(&runs.to_be_bytes());
    Some(out.len() - start)
}

/// Applies the runs at the start of `b` to `page` (with none, only checks
/// them); the bytes they took, or `None` if `b` holds only part of them.
fn apply_delta(b: &[u8], mut page: Option<&mut Page>) -> Result<Option<usize>, HdeError> {
    let bad = |w: &str| HdeError::Stream(format!("malformed migration record: {w}"));
    let Some(n) = b.get(..2) else {
        return Ok(None);
    };
    let n = u16::from_be_bytes([n[0], n[1]]) as usize;
    if n > DELTA_MAX_RUNS {
        return Err(bad("too many runs in a delta"));
    }
    let mut at = 2;
    for _ in 0..n {
        let Some(h) = b.get(at..at + 4) else {
            return Ok(None);
        };
        let off = u16::from_be_bytes([h[0], h[1]]) as usize;
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        if off + len > PAGE_SIZE {
            return Err(bad("a delta run outside the page"));
        }
        let Some(x) = b.get(at + 4..at + 4 + len) else {
            return Ok(None);
        };
        if let Some(page) = page.as_deref_mut() {
            for (p, x) in page[off..off + len].iter_mut().zip(x) {
                *p ^= x;
            }
        }
        at += 4 + len;
    }
    Ok(Some(at))
}

/// Encodes a VM image stream for the wire. See the module docs.
pub struct WireEncoder {
    zstd: zstd::stream::raw::Encoder<'static>,
    /// Records not yet compressed.
    raw: Vec<u8>,
    stats: WireStats,
    /// The slot each content was last sent to (it may hold another since).
    sent: HashMap<Digest, (u16, u64)>,
    /// What the receiver holds from this migration.
    cache: Cache,
    /// Pages the receiver offered: index in its list.
    known: HashMap<Digest, u32>,
    /// Per page slot (block, page index), the version the receiver holds.
    slots: HashMap<(u16, u64), Digest>,
    /// Per page slot, an offered page likely like its content (the same
    /// place in another VM's memory): a delta base when the receiver holds
    /// no version of the slot.
    likely: HashMap<(u16, u64), Digest>,
    /// Where contents of the receiver's offered pages are found here.
    store: Option<crate::PageReader>,
    /// Where some of them are found faster.
    images: Vec<crate::MemoryImage>,
    /// The receiver's QEMU holds `slots` already (it preloads checkpoint
    /// `.0`, whose blocks are `.1`); `None` once announced or refused.
    preload: Option<(String, Vec<crate::BlockInfo>)>,
    preloading: bool,
    /// What the preload counts for in the record bytes.
    preload_bytes: u64,
    /// A run of `Same` pages not yet written: block, first index, count.
    run: Option<(u16, u64, u32)>,
}

/// A zstd error as this crate's.
fn zstd_err(e: std::io::Error) -> HdeError {
    HdeError::Stream(format!("zstd: {e}"))
}

impl WireEncoder {
    pub fn new(level: i32) -> Result<WireEncoder, HdeError> {
        let mut zstd = zstd::stream::raw::Encoder::new(level).map_err(zstd_err)?;
        zstd.set_parameter(CParameter::WindowLog(WINDOW_LOG))
            .map_err(zstd_err)?;
        Ok(WireEncoder {
            zstd,
            raw: Vec::with_capacity(1 << 20),
            stats: WireStats::default(),
            sent: HashMap::default(),
            cache: Cache::default(),
            known: HashMap::default(),
            slots: HashMap::default(),
            likely: HashMap::default(),
            store: None,
            images: Vec::new(),
            preload: None,
            preloading: false,
            preload_bytes: 0,
            run: None,
        })
    }

    /// The receiver offered these pages (in this order): they are sent as
    /// references. `store` holds their contents here, for deltas.
    pub fn receiver_has(&mut self, offered: &[Digest], store: Option<crate::PageReader>) {
        self.known.reserve(offered.len());
        for (i, d) in offered.iter().enumerate() {
            self.known.entry(*d).or_insert(i as u32);
        }
        self.store = store;
    }

    /// Pages the receiver offered are read from `image` when it holds
    /// them (delta bases), rather than from the store.
    pub fn bases_from(&mut self, image: crate::MemoryImage) {
        self.images.push(image);
    }

    /// For these page slots, offered pages likely like what the slot
    /// holds: delta bases for slots the receiver holds no version of.
    pub fn receiver_likely(&mut self, pages: impl IntoIterator<Item = ((u16, u64), Digest)>) {
        self.likely.extend(pages);
    }

    /// The pages of `block` both sides hold at the end of the stream.
    pub fn into_held(self, block: u16) -> crate::HeldPages {
        let slots = self.slots;
        let pages = self
            .cache
            .into_block(block)
            .map(|(p, page)| (p, page, slots.get(&(block, p)).copied()))
            .collect();
        crate::HeldPages { pages }
    }

    /// The receiver holds, for these page slots (block, page index), the
    /// versions with these digests: changed pages go as deltas against
    /// them (when their content is found here).
    pub fn receiver_slots(&mut self, slots: impl IntoIterator<Item = ((u16, u64), Digest)>) {
        self.slots.extend(slots);
    }

    /// The receiver can preload checkpoint `id` (blocks `blocks`, pages
    /// given with [`receiver_slots`](Self::receiver_slots)) into its QEMU
    /// before the first page: asked for if the stream's block list is the
    /// checkpoint's. Pages unchanged since then are not sent at all.
    pub fn offer_preload(&mut self, id: &str, blocks: Vec<crate::BlockInfo>) {
        self.preload = Some((id.to_string(), blocks));
    }

    /// Whether the receiver was asked to preload.
    pub fn preloading(&self) -> bool {
        self.preloading
    }

    /// What the preload counts for in [`WireStats::record_bytes`] (0
    /// without one).
    pub fn preload_bytes(&self) -> u64 {
        self.preload_bytes
    }

    /// The figures as they stand, without the derived ones: cheap enough
    /// to take around every item.
    pub fn counts(&self) -> &WireStats {
        &self.stats
    }

    pub fn stats(&self) -> WireStats {
        let mut s = self.stats;
        s.saved_by_compression = s
            .stream_bytes
            .saturating_sub(s.saved_by_dedup)
            .saturating_sub(s.saved_by_delta)
            .saturating_sub(s.wire_bytes);
        s
    }

    /// Adds the record(s) for `item`. `names` are the stream's block names.
    pub fn encode(&mut self, item: Item, names: &[String]) -> Result<(), HdeError> {
        let Item::Page(p) = item else {
            self.end_run();
            match item {
                Item::Meta { kind, bytes } => {
                    self.stats.stream_bytes += bytes.len() as u64;
                    if kind == MetaKind::RamBlocks {
                        self.maybe_preload(&bytes);
                    }
                    verbatim(&mut self.raw, 0, kind_code(kind), &bytes);
                }
                Item::Tail(bytes) => {
                    self.stats.stream_bytes += bytes.len() as u64;
                    verbatim(&mut self.raw, 1, 0, &bytes);
                }
                Item::Page(_) => {}
            }
            return Ok(());
        };
        let name_len = names.get(p.block as usize).map_or(0, |n| n.len());
        self.stats.stream_bytes += p.stream_len(name_len) as u64;
        self.stats.pages += 1;
        let slot = (p.block, p.offset / PAGE_SIZE as u64);
        let data = match &p.data {
            PageData::Fill(b) => {
                self.end_run();
                self.stats.fill_pages += 1;
                // The receiver's version is a fill now: no base, never Same.
                self.slots.remove(&slot);
                self.cache.forget(slot);
                self.head(&p, TAG_FILL);
                self.raw.push(*b);
                return Ok(());
            }
            PageData::Full(data) => data,
        };
        // The page's digest, once taken.
        let mut digest = None;
        if self.preloading && self.holds(slot, data, &mut digest) {
            // The receiver's version is its preloaded one again.
            self.cache.forget(slot);
            self.stats.same_pages += 1;
            self.stats.saved_by_dedup += PAGE_SIZE as u64;
            match &mut self.run {
                Some((b, first, n))
                    if *b == slot.0 && *first + *n as u64 == slot.1 && *n < MAX_RUN =>
                {
                    *n += 1
                }
                _ => {
                    self.end_run();
                    self.run = Some((slot.0, slot.1, 1));
                }
            }
            return Ok(());
        }
        let d = digest.unwrap_or_else(|| Digest::of(&data[..]));
        self.end_run();
        if let Some(r) = self.reference(&d) {
            self.stats.ref_pages += 1;
            self.stats.saved_by_dedup += PAGE_SIZE as u64;
            self.head(&p, TAG_REF);
            r.put(&mut self.raw);
            self.raw.extend_from_slice(&check_of(&d));
            self.stats.record_bytes += as_page(11 + REF_LEN + 8);
            self.keep(slot, d, data);
            return Ok(());
        }
        // A delta when the receiver's version is at hand on both sides and
        // the page changed little.
        let mark = self.raw.len();
        self.head(&p, TAG_DELTA);
        let base = base_of(
            &self.cache,
            (&self.slots, &self.likely),
            &self.known,
            (&self.images, self.store.as_ref()),
            slot,
        );
        let delta = base.and_then(|(r, base, offered)| {
            r.put(&mut self.raw);
            self.raw.extend_from_slice(&check_of(&d));
            Some((delta_into(data, &base, &mut self.raw)?, offered))
        });
        if let Some((len, offered)) = delta {
            let record = 11 + REF_LEN + 8 + len;
            self.stats.delta_pages += 1;
            self.stats.saved_by_delta += (PAGE_SIZE as u64).saturating_sub(record as u64);
            // Counted as the page it stands for.
            self.stats.record_bytes += as_page(record);
            if let Some(base) = offered {
                // A delta against an offered page: that page stays the
                // slot's base, at hand on both sides without a copy (with a
                // replica, most of a first round is such deltas: copies of
                // them were a third of the sender's time, most of it the
                // kernel zeroing fresh memory for them).
                self.slots.insert(slot, d);
                self.cache.forget(slot);
                self.likely.insert(slot, base);
                return Ok(());
            }
        } else {
            self.raw.truncate(mark);
            self.stats.full_pages += 1;
            self.head(&p, TAG_PAGE);
            self.raw.extend_from_slice(&data[..]);
        }
        self.keep(slot, d, data);
        Ok(())
    }

    /// Compresses with `workers` threads besides the caller's (0: on the
    /// caller's thread only). The records are cut into jobs of 1 MiB,
    /// each compressed with the end of the one before as its history, so
    /// the ratio stays close to one thread's; [`compress`](Self::compress)
    /// then returns as soon as the records are handed to a job.
    pub fn set_workers(&mut self, workers: u32) -> Result<(), HdeError> {
        self.zstd
            .set_parameter(CParameter::NbWorkers(workers))
            .map_err(zstd_err)?;
        if workers > 0 {
            self.zstd
                .set_parameter(CParameter::JobSize(1 << 20))
                .map_err(zstd_err)?;
        }
        Ok(())
    }

    /// Hands the records added so far to the compressor and appends to
    /// `out` what it has ready, without waiting for the rest: for a
    /// caller with more to encode at once (see [`flush`](Self::flush)).
    pub fn compress(&mut self, out: &mut Vec<u8>) -> Result<(), HdeError> {
        self.compress_raw(out, false)
    }

    /// Compresses the records added so far and appends them, flushed, to
    /// `out`: the receiver can rebuild everything encoded up to here.
    pub fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), HdeError> {
        self.end_run();
        self.compress_raw(out, true)
    }

    fn compress_raw(&mut self, out: &mut Vec<u8>, flush: bool) -> Result<(), HdeError> {
        let start = out.len();
        let raw = std::mem::take(&mut self.raw);
        self.stats.record_bytes += raw.len() as u64;
        let mut input = InBuffer::around(&raw);
        loop {
            out.reserve(raw.len() / 2 + (64 << 10));
            let pos = out.len();
            let mut ob = OutBuffer::around_pos(out, pos);
            if input.pos() < raw.len() {
                self.zstd.run(&mut input, &mut ob).map_err(zstd_err)?;
            } else if !flush || self.zstd.flush(&mut ob).map_err(zstd_err)? == 0 {
                break;
            }
        }
        self.raw = raw;
        self.raw.clear();
        self.stats.wire_bytes += (out.len() - start) as u64;
        Ok(())
    }

    fn head(&mut self, p: &PageRecord, tag: u8) {
        self.raw.push(tag | if p.named { NAMED } else { 0 });
        self.raw.extend_from_slice(&p.block.to_be_bytes());
        self.raw.extend_from_slice(&p.offset.to_be_bytes());
    }

    fn end_run(&mut self) {
        if let Some((b, first, n)) = self.run.take() {
            self.raw.push(TAG_SAME);
            self.raw.extend_from_slice(&b.to_be_bytes());
            self.raw.extend_from_slice(&first.to_be_bytes());
            self.raw.extend_from_slice(&n.to_be_bytes());
        }
    }

    fn maybe_preload(&mut self, block_list: &[u8]) {
        let Some((id, blocks)) = self.preload.take() else {
            return;
        };
        let stream = dwcp_vmstream::block_list(block_list).unwrap_or_default();
        if !crate::same_blocks(&blocks, &stream) {
            // Another memory layout: the receiver's slots mean nothing.
            self.slots.clear();
            return;
        }
        // The receiver's preload is work like the records of its pages
        // would be: it counts in `record_bytes` (the sender's flow control
        // then holds the first round back until most of it is done).
        self.preload_bytes = self.slots.len() as u64 * PRELOAD_PAGE_COST;
        self.stats.record_bytes += self.preload_bytes;
        self.raw.push(TAG_PRELOAD);
        self.raw.extend_from_slice(&(id.len() as u16).to_be_bytes());
        self.raw.extend_from_slice(id.as_bytes());
        self.preloading = true;
    }

    /// Whether the receiver holds `data` at `slot` already. Compared with
    /// its version where that is at hand here (pages of the checkpoint it
    /// preloaded are, in the image): most pages of a first round are
    /// unchanged since the checkpoint, and a comparison costs a fraction
    /// of a digest. Where no version is at hand the page is hashed, and its
    /// digest left in `digest`.
    fn holds(&self, slot: (u16, u64), data: &Page, digest: &mut Option<Digest>) -> bool {
        let Some(held) = self.slots.get(&slot) else {
            return false;
        };
        // The cache holds the slot's version whenever it holds the slot.
        let version = match self.cache.get(slot) {
            Some(p) => Some(p),
            None => self.images.iter().find_map(|m| m.page_ref(held)),
        };
        match version {
            Some(p) => p == data,
            None => *digest.insert(Digest::of(&data[..])) == *held,
        }
    }

    /// Where the receiver holds content `d`: a slot that holds it still,
    /// or its offered pages.
    fn reference(&self, d: &Digest) -> Option<Ref> {
        if let Some(&slot) = self.sent.get(d) {
            if self.slots.get(&slot) == Some(d) && self.cache.get(slot).is_some() {
                return Some(Ref::Slot(slot.0, slot.1 as u32));
            }
        }
        self.known.get(d).map(|&i| Ref::Known(i))
    }

    /// The receiver holds `d` (with content `page`) at `slot` now.
    fn keep(&mut self, slot: (u16, u64), d: Digest, page: &Page) {
        self.slots.insert(slot, d);
        if self.cache.keep(slot, page) {
            self.sent.insert(d, slot);
        }
    }
}

/// Digests per page slot (block, page index).
type Slots = HashMap<(u16, u64), Digest>;

/// The receiver's version of a slot (or an offered page likely like it),
/// as a reference and its content, and the offered page's digest if the
/// base is one.
fn base_of<'a>(
    cache: &'a Cache,
    (slots, likely): (&Slots, &Slots),
    known: &HashMap<Digest, u32>,
    (images, store): (&[crate::MemoryImage], Option<&crate::PageReader>),
    slot: (u16, u64),
) -> Option<(Ref, std::borrow::Cow<'a, Page>, Option<Digest>)> {
    if let Some(p) = cache.get(slot) {
        return Some((
            Ref::Slot(slot.0, slot.1 as u32),
            std::borrow::Cow::Borrowed(p),
            None,
        ));
    }
    let (d, i) = [slots.get(&slot), likely.get(&slot)]
        .into_iter()
        .flatten()
        .find_map(|d| Some((d, *known.get(d)?)))?;
    let p = match images.iter().find_map(|m| m.page(d)) {
        Some(p) => p,
        None => store?.page(d).ok()??,
    };
    Some((Ref::Known(i), std::borrow::Cow::Owned(*p), Some(*d)))
}

/// Whether page `index` is marked in a block's bits (pages outside them
/// are not).
fn held_bit(bits: &[u64], index: u64) -> bool {
    bits.get((index / 64) as usize)
        .is_some_and(|w| w & (1 << (index % 64)) != 0)
}

fn verbatim(out: &mut Vec<u8>, tail: u8, kind: u8, bytes: &[u8]) {
    out.push(TAG_VERBATIM);
    out.push(tail);
    out.push(kind);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn kind_code(k: MetaKind) -> u8 {
    match k {
        MetaKind::Header => 0,
        MetaKind::Configuration => 1,
        MetaKind::Command(_) => 2,
        MetaKind::RamSection(_) => 3,
        MetaKind::RamBlocks => 4,
        MetaKind::RamSectionEnd => 5,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Preload {
    None,
    /// Asked for; done once the block list is written.
    Asked(String),
    /// The block list is written: the caller preloads now.
    Ready(String),
    Loading,
    Done,
}

/// Rebuilds stream bytes from the wire, incrementally. See the module docs.
pub struct WireDecoder {
    zstd: zstd::stream::raw::Decoder<'static>,
    /// Compressed bytes not yet decompressed (held while a preload runs).
    input: Vec<u8>,
    /// Decompressed bytes not yet a whole record.
    buf: Vec<u8>,
    writer: StreamWriter,
    cache: Cache,
    known: Vec<Digest>,
    store: Option<crate::PageReader>,
    /// Where some offered pages are found faster than in `store`.
    images: Vec<crate::MemoryImage>,
    /// Block of the last page written (QEMU's `CONTINUE` refers to it).
    last_block: Option<u16>,
    blocks: Vec<Block>,
    /// Per block, a bit per page: written in this stream (or preloaded).
    held: Vec<Vec<u64>>,
    preload: Preload,
    record_bytes: u64,
    /// The block whose pages QEMU holds as zeros where nothing was
    /// preloaded or written (see [`zero_unless_given`](Self::zero_unless_given)).
    zeroed: Option<String>,
    /// Zero pages left out of the stream: QEMU held zeros there.
    zeros_skipped: u64,
}

impl WireDecoder {
    pub fn new() -> Result<WireDecoder, HdeError> {
        let mut zstd = zstd::stream::raw::Decoder::new().map_err(zstd_err)?;
        zstd.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))
            .map_err(zstd_err)?;
        Ok(WireDecoder {
            zstd,
            input: Vec::new(),
            buf: Vec::new(),
            writer: StreamWriter::new(),
            cache: Cache::default(),
            known: Vec::new(),
            store: None,
            images: Vec::new(),
            last_block: None,
            blocks: Vec::new(),
            held: Vec::new(),
            preload: Preload::None,
            record_bytes: 0,
            zeroed: None,
            zeros_skipped: 0,
        })
    }

    /// A decoder for a receiver that offered pages `offered` (in this
    /// order), found in `store` or in images given with
    /// [`bases_from`](Self::bases_from).
    pub fn offering(
        offered: Vec<Digest>,
        store: Option<crate::PageReader>,
    ) -> Result<Self, HdeError> {
        let mut d = WireDecoder::new()?;
        d.known = offered;
        d.store = store;
        Ok(d)
    }

    /// Offered pages are read from `image` when it holds them, rather than
    /// from the store.
    pub fn bases_from(&mut self, image: crate::MemoryImage) {
        self.images.push(image);
    }

    /// After a preload, QEMU's block `name` holds zeros wherever the
    /// preload put nothing: its RAM starts zeroed, and a replica's image it
    /// maps has holes there. Zero pages for such places (most of a first
    /// round's) are then left out of the stream: QEMU checks a zero page
    /// against what it holds, and reading a mapped image's holes made the
    /// kernel zero a page cache page for each, a fifth of a second at the
    /// end of a 1 GiB guest's migration.
    pub fn zero_unless_given(&mut self, name: &str) {
        self.zeroed = Some(name.to_string());
    }

    /// Zero pages left out of the stream (see
    /// [`zero_unless_given`](Self::zero_unless_given)).
    pub fn zeros_skipped(&self) -> u64 {
        self.zeros_skipped
    }

    /// Whether QEMU holds zeros at `index` of `block` for sure: the block
    /// given to [`zero_unless_given`](Self::zero_unless_given), after a
    /// preload, at a page nothing was preloaded or written to.
    fn holds_zeros(&self, block: u16, index: u64) -> bool {
        self.preload == Preload::Done
            && self.zeroed.is_some()
            && self.blocks.get(block as usize).map(|b| &b.name) == self.zeroed.as_ref()
            && self
                .held
                .get(block as usize)
                .is_some_and(|bits| index < bits.len() as u64 * 64 && !held_bit(bits, index))
    }

    /// The pages of `block` both sides hold at the end of the stream.
    pub fn into_held(self, block: u16) -> crate::HeldPages {
        let pages = self
            .cache
            .into_block(block)
            .map(|(p, page)| (p, page, None))
            .collect();
        crate::HeldPages { pages }
    }

    /// Takes received bytes; appends the stream bytes they complete to
    /// `out`. While a preload is due (see [`take_preload`](Self::take_preload))
    /// the bytes are only kept.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), HdeError> {
        self.input.extend_from_slice(bytes);
        let input = std::mem::take(&mut self.input);
        let mut at = 0;
        let r = loop {
            if let Err(e) = self.records(out) {
                break Err(e);
            }
            if self.blocked() {
                break Ok(());
            }
            // Decompress a bounded piece (at most about 1 MiB beyond what
            // is held), then turn it into records.
            let mut inb = InBuffer::around(&input[at..]);
            let before = self.buf.len();
            self.buf.reserve(1 << 20);
            let mut piece = std::mem::take(&mut self.buf);
            let produced = {
                let mut ob = OutBuffer::around_pos(&mut piece, before);
                self.zstd
                    .run(&mut inb, &mut ob)
                    .map(|_| ob.pos() - before)
                    .map_err(zstd_err)
            };
            self.buf = piece;
            let used = inb.pos();
            at += used;
            match produced {
                Err(e) => break Err(e),
                Ok(0) if used == 0 => break Ok(()),
                Ok(_) => {}
            }
        };
        self.input = input;
        self.input.drain(..at);
        r
    }

    fn blocked(&self) -> bool {
        matches!(self.preload, Preload::Ready(_) | Preload::Loading)
    }

    /// Whether nothing is left half-done.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.input.is_empty()
    }

    /// The checkpoint the sender asked this node to preload, once its
    /// QEMU has the block list: the caller writes its pages with
    /// [`preload_page`](Self::preload_page), calls
    /// [`end_preload`](Self::end_preload), then feeds on.
    pub fn take_preload(&mut self) -> Option<String> {
        match std::mem::replace(&mut self.preload, Preload::Loading) {
            Preload::Ready(id) => Some(id),
            other => {
                self.preload = other;
                None
            }
        }
    }

    /// The stream's RAM blocks (known once the block list went by).
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Writes a preloaded page: page `index` of block `block`.
    pub fn preload_page(
        &mut self,
        block: u16,
        index: u64,
        page: Box<Page>,
        out: &mut Vec<u8>,
    ) -> Result<(), HdeError> {
        self.count_preloaded()?;
        let rec = PageRecord {
            block,
            offset: index * PAGE_SIZE as u64,
            named: true,
            data: PageData::Full(page),
        };
        self.write_page(rec, out)
    }

    /// Counts a preloaded page that the receiver's QEMU holds in place
    /// already (its memory is mapped from the checkpoint): as
    /// [`preload_page`](Self::preload_page), without writing it.
    pub fn preload_in_place(&mut self, block: u16, index: u64) -> Result<(), HdeError> {
        self.count_preloaded()?;
        self.hold(block, index)
            .map_err(|w| HdeError::Stream(format!("preloaded {w}")))
    }

    /// Counts a page of the preload in; refused outside one.
    fn count_preloaded(&mut self) -> Result<(), HdeError> {
        if self.preload != Preload::Loading {
            return Err(HdeError::Stream(
                "a preloaded page outside a preload".into(),
            ));
        }
        self.record_bytes += PRELOAD_PAGE_COST;
        Ok(())
    }

    /// Marks page `index` of `block` as in QEMU's memory; a page outside
    /// memory is refused.
    fn hold(&mut self, block: u16, index: u64) -> Result<(), String> {
        let bits = self
            .held
            .get_mut(block as usize)
            .filter(|b| index < b.len() as u64 * 64)
            .ok_or_else(|| format!("page {index} of block {block} is outside memory"))?;
        bits[(index / 64) as usize] |= 1 << (index % 64);
        Ok(())
    }

    pub fn end_preload(&mut self) {
        if self.preload == Preload::Loading {
            self.preload = Preload::Done;
        }
    }

    fn records(&mut self, out: &mut Vec<u8>) -> Result<(), HdeError> {
        let buf = std::mem::take(&mut self.buf);
        let mut at = 0;
        let r = loop {
            if self.blocked() {
                break Ok(());
            }
            match self.record(&buf[at..], out) {
                Ok(Some(n)) => at += n,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.buf = buf;
        self.buf.drain(..at);
        self.record_bytes += at as u64;
        r
    }

    /// Bytes of records decoded so far: the sender's
    /// [`WireStats::record_bytes`] less what is still to do here.
    pub fn record_bytes(&self) -> u64 {
        self.record_bytes
    }

    fn write_page(&mut self, mut rec: PageRecord, out: &mut Vec<u8>) -> Result<(), HdeError> {
        self.hold(rec.block, rec.offset / PAGE_SIZE as u64)
            .map_err(|w| HdeError::Stream(format!("malformed migration record: {w}")))?;
        rec.named |= self.last_block != Some(rec.block);
        self.last_block = Some(rec.block);
        self.writer
            .write(&Item::Page(rec), out)
            .map_err(|e| HdeError::Stream(e.to_string()))
    }

    fn resolve(&self, r: Ref) -> Result<Box<Page>, HdeError> {
        match r {
            Ref::Slot(b, i) => self
                .cache
                .get((b, i as u64))
                .map(|p| Box::new(*p))
                .ok_or_else(|| {
                    HdeError::Stream(format!(
                        "a reference to page {i} of block {b}, which this side does not hold"
                    ))
                }),
            Ref::Known(i) => {
                let d = self.known.get(i as usize).ok_or_else(|| {
                    HdeError::Stream(format!("a reference to offered page {i}, never offered"))
                })?;
                if let Some(p) = self.images.iter().find_map(|m| m.page(d)) {
                    return Ok(p);
                }
                let store = self.store.as_ref().ok_or_else(|| {
                    HdeError::Stream("a reference to an offered page, none offered".into())
                })?;
                store
                    .page(d)?
                    .ok_or_else(|| HdeError::Stream(format!("offered page {d} is not here")))
            }
        }
    }

    /// Decodes one record at the start of `b`; `None` if incomplete.
    fn record(&mut self, b: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, HdeError> {
        let bad = |w: &str| HdeError::Stream(format!("malformed migration record: {w}"));
        let Some(&tag) = b.first() else {
            return Ok(None);
        };
        let named = tag & NAMED != 0;
        match tag & !NAMED {
            TAG_VERBATIM => {
                if b.len() < 7 {
                    return Ok(None);
                }
                let n = u32::from_be_bytes([b[3], b[4], b[5], b[6]]) as usize;
                if n > MAX_VERBATIM {
                    return Err(bad("verbatim run too long"));
                }
                if b.len() < 7 + n {
                    return Ok(None);
                }
                let bytes = b[7..7 + n].to_vec();
                let item = match (b[1], b[2]) {
                    (1, _) => Item::Tail(bytes),
                    (0, 4) => {
                        let blocks = dwcp_vmstream::block_list(&bytes)
                            .ok_or_else(|| bad("a RAM block list that does not parse"))?;
                        self.held = blocks
                            .iter()
                            .map(|b| vec![0u64; b.pages().div_ceil(64) as usize])
                            .collect();
                        self.blocks = blocks;
                        if let Preload::Asked(id) = &self.preload {
                            self.preload = Preload::Ready(id.clone());
                        }
                        Item::Meta {
                            kind: MetaKind::RamBlocks,
                            bytes,
                        }
                    }
                    // Other meta kinds are written as they are.
                    (0, _) => Item::Meta {
                        kind: MetaKind::Header,
                        bytes,
                    },
                    _ => return Err(bad("verbatim kind")),
                };
                self.writer
                    .write(&item, out)
                    .map_err(|e| HdeError::Stream(e.to_string()))?;
                Ok(Some(7 + n))
            }
            TAG_PRELOAD => {
                if b.len() < 3 {
                    return Ok(None);
                }
                let n = u16::from_be_bytes([b[1], b[2]]) as usize;
                if b.len() < 3 + n {
                    return Ok(None);
                }
                if self.preload != Preload::None || !self.blocks.is_empty() {
                    return Err(bad("a preload asked for late or twice"));
                }
                let id = std::str::from_utf8(&b[3..3 + n]).map_err(|_| bad("preload id"))?;
                self.preload = Preload::Asked(id.to_string());
                Ok(Some(3 + n))
            }
            TAG_SAME => {
                if b.len() < 15 {
                    return Ok(None);
                }
                let block = u16::from_be_bytes([b[1], b[2]]);
                let first = u64::from_be_bytes(b[3..11].try_into().map_err(|_| bad("same"))?);
                let n = u32::from_be_bytes([b[11], b[12], b[13], b[14]]) as u64;
                let bits = self
                    .held
                    .get(block as usize)
                    .ok_or_else(|| bad("a run of pages in no block"))?;
                for i in first..first.saturating_add(n) {
                    // The QEMU holds its preloaded version again.
                    self.cache.forget((block, i));
                    if !held_bit(bits, i) {
                        return Err(HdeError::Stream(format!(
                            "page {i} of block {block} said to be here already, and it is not"
                        )));
                    }
                }
                Ok(Some(15))
            }
            tag @ (TAG_FILL | TAG_PAGE | TAG_DELTA | TAG_REF) => {
                if b.len() < 11 {
                    return Ok(None);
                }
                let block = u16::from_be_bytes([b[1], b[2]]);
                let offset = u64::from_be_bytes(b[3..11].try_into().map_err(|_| bad("offset"))?);
                let body = &b[11..];
                let slot = (block, offset / PAGE_SIZE as u64);
                let get_ref = |b: &[u8]| Ref::get(b).ok_or_else(|| bad("reference kind"));
                // After the ref: an 8-byte check, then a delta's XOR bytes.
                const CHECK: usize = REF_LEN;
                const XOR: usize = REF_LEN + 8;
                let checked = |page: Box<Page>, check: &[u8]| -> Result<Box<Page>, HdeError> {
                    if check_of(&Digest::of(&page[..]))[..] != check[..8] {
                        return Err(HdeError::Stream(format!(
                            "page at {offset:#x} of block {block}: rebuilt content does not match"
                        )));
                    }
                    Ok(page)
                };
                // Kept as the slot's version, but for a delta against an
                // offered page (see the encoder).
                let mut keep = true;
                let (data, used) = match tag {
                    TAG_FILL => {
                        let Some(&f) = body.first() else {
                            return Ok(None);
                        };
                        (PageData::Fill(f), 12)
                    }
                    TAG_PAGE => {
                        if body.len() < PAGE_SIZE {
                            return Ok(None);
                        }
                        let mut page = Box::new([0u8; PAGE_SIZE]);
                        page.copy_from_slice(&body[..PAGE_SIZE]);
                        (PageData::Full(page), 11 + PAGE_SIZE)
                    }
                    TAG_REF => {
                        if body.len() < XOR {
                            return Ok(None);
                        }
                        let page = checked(self.resolve(get_ref(body)?)?, &body[CHECK..XOR])?;
                        self.record_bytes += as_page(11 + XOR);
                        (PageData::Full(page), 11 + XOR)
                    }
                    _ => {
                        if body.len() < XOR + 2 {
                            return Ok(None);
                        }
                        // Whole before the base is read: an incomplete
                        // record is looked at again when more comes.
                        let Some(len) = apply_delta(&body[XOR..], None)? else {
                            return Ok(None);
                        };
                        let base = get_ref(body)?;
                        keep = !matches!(base, Ref::Known(_));
                        let mut page = self.resolve(base)?;
                        apply_delta(&body[XOR..], Some(&mut page))?;
                        let page = checked(page, &body[CHECK..XOR])?;
                        // Counted as the page it stands for, as the sender
                        // does.
                        self.record_bytes += as_page(11 + XOR + len);
                        (PageData::Full(page), 11 + XOR + len)
                    }
                };
                match &data {
                    PageData::Full(page) if keep => {
                        self.cache.keep(slot, page);
                    }
                    _ => self.cache.forget(slot),
                }
                if matches!(data, PageData::Fill(0)) && self.holds_zeros(block, slot.1) {
                    self.zeros_skipped += 1;
                    return Ok(Some(used));
                }
                let rec = PageRecord {
                    block,
                    offset,
                    named,
                    data,
                };
                self.write_page(rec, out)?;
                Ok(Some(used))
            }
            _ => Err(bad("unknown tag")),
        }
    }
}

/// The destination's answer to a migration's prepare.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// A checkpoint of the VM (the sender's id) it can preload. Its pages
    /// ([`PageMap::distinct_pages`](crate::PageMap::distinct_pages)), which
    /// the sender has too, are then left out of `pages` (7 MB for a 1 GiB
    /// guest, a second on a 100 ms link).
    pub preload: Option<String>,
    /// The footprint of an earlier migration between the two nodes it
    /// holds (see [`HeldPages`](crate::HeldPages)): its id and the digest
    /// of its index. Its pages ([`index_pages`](crate::index_pages)) are
    /// offered after `pages` if the sender holds the same footprint.
    pub footprint: Option<(String, Digest)>,
    /// The receiver's QEMU maps the preload's main memory from a file: that
    /// part of the preload is done before the first page comes.
    pub mapped: bool,
    pub pages: Vec<Digest>,
}

impl Offer {
    /// Layout: be16 length and the preload id (empty: none), be16 length
    /// and the footprint id (empty: none) then its 32-byte index digest,
    /// a byte (1: mapped), then the pages.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024 + self.pages.len() * 32);
        let mut string = |s: &str| {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        string(self.preload.as_deref().unwrap_or(""));
        match &self.footprint {
            Some((id, d)) => {
                string(id);
                out.extend_from_slice(&d.0);
            }
            None => string(""),
        }
        out.push(self.mapped as u8);
        out.extend(self.pages.iter().flat_map(|d| d.0));
        out
    }

    pub fn decode(b: &[u8]) -> Result<Offer, HdeError> {
        let bad = || HdeError::Stream("malformed migration offer".into());
        let string = |b: &[u8]| -> Result<(String, usize), HdeError> {
            let n = u16::from_be_bytes(b.get(..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?)
                as usize;
            let s = std::str::from_utf8(b.get(2..2 + n).ok_or_else(bad)?).map_err(|_| bad())?;
            Ok((s.to_string(), 2 + n))
        };
        let (preload, mut at) = string(b)?;
        let (footprint, n) = string(&b[at..])?;
        at += n;
        let footprint = if footprint.is_empty() {
            None
        } else {
            let d = b.get(at..at + 32).ok_or_else(bad)?;
            at += 32;
            Some((footprint, Digest(d.try_into().map_err(|_| bad())?)))
        };
        let mapped = match b.get(at) {
            Some(0) => false,
            Some(1) => true,
            _ => return Err(bad()),
        };
        Ok(Offer {
            preload: (!preload.is_empty()).then_some(preload),
            footprint,
            mapped,
            pages: crate::replica::decode_digests(&b[at + 1..])?,
        })
    }
}

#[cfg(test)]
mod delta_tests {
    use super::*;

    fn page(seed: u64) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        let mut x = seed | 1;
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p
    }

    #[test]
    fn deltas_rebuild_the_page_and_stay_short() {
        let base = page(1);
        for changes in [
            &[0usize][..],
            &[4095],
            &[7, 8],
            &[100, 101, 900, 2000, 4000],
        ] {
            let mut new = base.clone();
            for &i in changes {
                new[i] ^= 0x5a;
            }
            let mut out = vec![9];
            let len = delta_into(&new, &base, &mut out).expect("a small change is a delta");
            assert_eq!(out.len(), 1 + len);
            assert!(len <= 2 + changes.len() * (4 + 16), "{len} for {changes:?}");
            let mut rebuilt = base.clone();
            assert_eq!(
                apply_delta(&out[1..], Some(&mut rebuilt)).unwrap(),
                Some(len)
            );
            assert_eq!(rebuilt, new, "{changes:?}");
            // Any cut short is incomplete, not wrong.
            for cut in 1..len {
                assert_eq!(apply_delta(&out[1..1 + cut], None).unwrap(), None);
            }
        }
        // A page that changed all over is no delta.
        assert_eq!(delta_into(&page(2), &base, &mut Vec::new()), None);
    }

    #[test]
    fn offers_go_both_ways_and_broken_ones_are_refused() {
        let offers = [
            Offer::default(),
            Offer {
                preload: Some("a:1".into()),
                footprint: Some(("m-7".into(), Digest::of(b"index"))),
                mapped: true,
                pages: vec![Digest::of(b"x"), Digest::of(b"y")],
            },
            Offer {
                preload: None,
                footprint: Some(("m".into(), Digest::of(b"i"))),
                mapped: false,
                pages: vec![],
            },
        ];
        for o in offers {
            let b = o.encode();
            assert_eq!(Offer::decode(&b).unwrap(), o);
            for cut in [1, 3, b.len() - 1] {
                assert!(Offer::decode(&b[..cut]).is_err(), "{o:?} cut at {cut}");
            }
        }
        assert!(Offer::decode(&[0, 1, 0xff, 0, 0]).is_err());
        // A flag byte that is neither 0 nor 1.
        assert!(Offer::decode(&[0, 0, 0, 0, 2]).is_err());
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let mut p = [0u8; PAGE_SIZE];
        // A run past the page's end.
        let past = [0, 1, 0x0f, 0xfc, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(apply_delta(&past, Some(&mut p)).is_err());
        // More runs than a page can have.
        assert!(apply_delta(&[0xff, 0xff], None).is_err());
    }
}
