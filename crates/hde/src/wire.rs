//! The migration wire format: a VM image stream as it crosses the network.
//!
//! [`WireEncoder`] turns stream items into records: verbatim runs (stream
//! framing, device state), and pages as a fill byte, a reference to a page
//! already sent in this migration (32-byte digest), or a store object
//! (zstd, raw). [`WireDecoder`] turns records back into the exact stream
//! bytes, checking every page against its digest. Both are sans-IO.
//!
//! Record layout: a tag byte, then
//! - `0` verbatim: kind (0 meta, 1 tail), be32 length, bytes;
//! - `1` fill, `2` ref, `3` object: be16 block, be64 offset, named (0/1),
//!   then the fill byte / the digest / the digest, be32 length, object.

use std::collections::{HashMap, HashSet};

use dwcp_vmstream::{Item, MetaKind, PageData, PageRecord, StreamWriter, PAGE_SIZE};

use crate::codec::{self, Encoder};
use crate::{Digest, HdeError};

const TAG_VERBATIM: u8 = 0;
const TAG_FILL: u8 = 1;
const TAG_REF: u8 = 2;
const TAG_OBJECT: u8 = 3;
/// Largest verbatim run accepted (a device state piece).
const MAX_VERBATIM: usize = 64 << 20;

/// What the encoder did, for progress and the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    pub stream_bytes: u64,
    pub wire_bytes: u64,
    pub pages: u64,
    pub fill_pages: u64,
    /// Pages sent as a reference to content the receiver already has.
    pub ref_pages: u64,
    pub object_pages: u64,
    /// Stream bytes saved by references.
    pub saved_by_dedup: u64,
    /// Stream bytes saved by compression (deltas included).
    pub saved_by_compression: u64,
    /// Pages sent as a delta against the version the receiver holds.
    pub delta_pages: u64,
}

/// Pages kept by the encoder as delta bases for pages dirtied again.
const BASE_CACHE_PAGES: usize = 16 * 1024;

pub struct WireEncoder {
    encoder: Encoder,
    sent: HashSet<Digest>,
    stats: WireStats,
    /// Per page slot, the version the receiver holds (a delta base).
    slots: HashMap<(u16, u64), Digest>,
    /// Contents of recently sent pages, for deltas.
    cache: HashMap<Digest, Box<codec::Page>>,
    cache_order: std::collections::VecDeque<Digest>,
    /// Where contents of the receiver's pages are found (this node's copy
    /// of the checkpoint the receiver holds).
    store: Option<crate::PageReader>,
    /// Delta depth of the objects sent, so chains stay short.
    depths: HashMap<Digest, u8>,
}

impl WireEncoder {
    pub fn new(level: i32) -> Result<WireEncoder, HdeError> {
        Ok(WireEncoder {
            encoder: Encoder::new(level)?,
            sent: HashSet::new(),
            stats: WireStats::default(),
            slots: HashMap::new(),
            cache: HashMap::new(),
            cache_order: Default::default(),
            store: None,
            depths: HashMap::new(),
        })
    }

    /// The receiver holds, for these page slots (block, page index), the
    /// versions with these digests, whose contents are in `store` here:
    /// changed pages are sent as deltas against them.
    pub fn receiver_slots(
        &mut self,
        slots: impl IntoIterator<Item = ((u16, u64), Digest)>,
        store: crate::PageReader,
    ) {
        self.slots.extend(slots);
        self.store = Some(store);
    }

    fn base(&mut self, slot: (u16, u64)) -> Option<(Digest, Box<codec::Page>)> {
        let d = *self.slots.get(&slot)?;
        if let Some(p) = self.cache.get(&d) {
            return Some((d, p.clone()));
        }
        let p = self.store.as_ref()?.page(&d).ok()??;
        Some((d, p))
    }

    fn remember(&mut self, slot: (u16, u64), d: Digest, page: &codec::Page) {
        self.slots.insert(slot, d);
        if self.cache.insert(d, Box::new(*page)).is_none() {
            self.cache_order.push_back(d);
            if self.cache_order.len() > BASE_CACHE_PAGES {
                if let Some(old) = self.cache_order.pop_front() {
                    self.cache.remove(&old);
                }
            }
        }
    }

    /// Content the receiver is known to hold already.
    pub fn receiver_has(&mut self, digests: impl IntoIterator<Item = Digest>) {
        self.sent.extend(digests);
    }

    pub fn stats(&self) -> WireStats {
        self.stats
    }

    /// Appends the record for `item` to `out`.
    pub fn encode(
        &mut self,
        item: Item,
        names: &[String],
        out: &mut Vec<u8>,
    ) -> Result<(), HdeError> {
        let start = out.len();
        match item {
            Item::Meta { kind, bytes } => {
                self.stats.stream_bytes += bytes.len() as u64;
                verbatim(out, 0, kind_code(kind), &bytes);
            }
            Item::Tail(bytes) => {
                self.stats.stream_bytes += bytes.len() as u64;
                verbatim(out, 1, 0, &bytes);
            }
            Item::Page(p) => {
                let name_len = names.get(p.block as usize).map_or(0, |n| n.len());
                self.stats.stream_bytes += p.stream_len(name_len) as u64;
                self.stats.pages += 1;
                let page_head = |out: &mut Vec<u8>, tag: u8| {
                    out.push(tag);
                    out.extend_from_slice(&p.block.to_be_bytes());
                    out.extend_from_slice(&p.offset.to_be_bytes());
                    out.push(p.named as u8);
                };
                match &p.data {
                    PageData::Fill(b) => {
                        self.stats.fill_pages += 1;
                        page_head(out, TAG_FILL);
                        out.push(*b);
                    }
                    PageData::Full(data) => {
                        let d = Digest::of(&data[..]);
                        if self.sent.contains(&d) {
                            self.stats.ref_pages += 1;
                            self.stats.saved_by_dedup += PAGE_SIZE as u64;
                            page_head(out, TAG_REF);
                            out.extend_from_slice(&d.0);
                        } else {
                            let slot = (p.block, p.offset / PAGE_SIZE as u64);
                            let base = self.base(slot);
                            let base_depth = base
                                .as_ref()
                                .map_or(0, |(bd, _)| self.depths.get(bd).copied().unwrap_or(0));
                            let (obj, how) = self.encoder.page(
                                data,
                                base.as_ref().map(|(bd, bp)| (bd, &**bp, base_depth)),
                            )?;
                            if how == codec::Encoding::Delta {
                                self.stats.delta_pages += 1;
                                self.depths.insert(d, base_depth + 1);
                            }
                            self.stats.object_pages += 1;
                            self.stats.saved_by_compression +=
                                (PAGE_SIZE as u64).saturating_sub(obj.len() as u64);
                            page_head(out, TAG_OBJECT);
                            out.extend_from_slice(&d.0);
                            out.extend_from_slice(&(obj.len() as u32).to_be_bytes());
                            out.extend_from_slice(&obj);
                            self.sent.insert(d);
                            self.remember(slot, d, data);
                        }
                    }
                }
            }
        }
        self.stats.wire_bytes += (out.len() - start) as u64;
        Ok(())
    }
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

/// Rebuilds stream bytes from records, incrementally.
pub struct WireDecoder {
    buf: Vec<u8>,
    writer: StreamWriter,
    /// Pages received, in their encoded form, for references.
    pages: HashMap<Digest, Vec<u8>>,
    /// Where references to pages not sent in this migration are found
    /// (the pages this node offered from its store).
    store: Option<crate::PageReader>,
}

impl Default for WireDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl WireDecoder {
    pub fn new() -> WireDecoder {
        WireDecoder {
            buf: Vec::new(),
            writer: StreamWriter::new(),
            pages: HashMap::new(),
            store: None,
        }
    }

    /// A decoder that also finds referenced pages in a store snapshot.
    pub fn with_store(store: crate::PageReader) -> WireDecoder {
        WireDecoder {
            store: Some(store),
            ..WireDecoder::new()
        }
    }

    /// Takes received bytes; appends the stream bytes they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), HdeError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(bytes);
        let mut at = 0;
        let r = loop {
            match self.record(&buf[at..], out) {
                Ok(Some(n)) => at += n,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        buf.drain(..at);
        self.buf = buf;
        r
    }

    /// Whether no partial record is left.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty()
    }

    /// Decodes one record at the start of `b`; `None` if incomplete.
    fn record(&mut self, b: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, HdeError> {
        let bad = |w: &str| HdeError::Stream(format!("malformed migration record: {w}"));
        let Some(&tag) = b.first() else {
            return Ok(None);
        };
        if tag == TAG_VERBATIM {
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
                (0, 4) => Item::Meta {
                    kind: MetaKind::RamBlocks,
                    bytes,
                },
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
            return Ok(Some(7 + n));
        }
        if b.len() < 12 {
            return Ok(None);
        }
        let block = u16::from_be_bytes([b[1], b[2]]);
        let offset = u64::from_be_bytes(b[3..11].try_into().map_err(|_| bad("offset"))?);
        let named = match b[11] {
            0 => false,
            1 => true,
            _ => return Err(bad("named flag")),
        };
        let (data, used) = match tag {
            TAG_FILL => {
                let Some(&f) = b.get(12) else {
                    return Ok(None);
                };
                (PageData::Fill(f), 13)
            }
            TAG_REF => {
                if b.len() < 44 {
                    return Ok(None);
                }
                let d = crate::store::digest_from(&b[12..44]);
                let page = match (self.pages.get(&d).cloned(), &self.store) {
                    (Some(obj), _) => self.decode_object(&obj, &d)?,
                    (None, Some(store)) => store.page(&d)?.ok_or_else(|| {
                        HdeError::Stream(format!(
                            "a reference to page {d}, never sent and not stored here"
                        ))
                    })?,
                    (None, None) => {
                        return Err(HdeError::Stream(format!(
                            "a reference to page {d}, never sent"
                        )))
                    }
                };
                (PageData::Full(page), 44)
            }
            TAG_OBJECT => {
                if b.len() < 48 {
                    return Ok(None);
                }
                let d = crate::store::digest_from(&b[12..44]);
                let n = u32::from_be_bytes([b[44], b[45], b[46], b[47]]) as usize;
                if n > PAGE_SIZE + 64 {
                    return Err(bad("page object too large"));
                }
                if b.len() < 48 + n {
                    return Ok(None);
                }
                let obj = b[48..48 + n].to_vec();
                let page = self.decode_object(&obj, &d)?;
                self.pages.insert(d, obj);
                (PageData::Full(page), 48 + n)
            }
            _ => return Err(bad("unknown tag")),
        };
        let rec = PageRecord {
            block,
            offset,
            named,
            data,
        };
        self.writer
            .write(&Item::Page(rec), out)
            .map_err(|e| HdeError::Stream(e.to_string()))?;
        Ok(Some(used))
    }
}

impl WireDecoder {
    /// A page object's content, its delta base (if any) taken from this
    /// migration's pages or the store; checked against its digest.
    fn decode_object(&self, obj: &[u8], d: &Digest) -> Result<Box<codec::Page>, HdeError> {
        let base = match codec::head(obj) {
            Ok(codec::ObjectHead::Delta { base, .. }) => Some(self.page_of(&base, 0)?),
            _ => None,
        };
        decode_checked(obj, d, base)
    }

    fn page_of(&self, d: &Digest, depth: u8) -> Result<Box<codec::Page>, HdeError> {
        if depth > codec::MAX_DELTA_DEPTH {
            return Err(HdeError::Stream(format!("page {d}: delta chain too long")));
        }
        if let Some(obj) = self.pages.get(d) {
            let base = match codec::head(obj) {
                Ok(codec::ObjectHead::Delta { base, .. }) => Some(self.page_of(&base, depth + 1)?),
                _ => None,
            };
            return decode_checked(obj, d, base);
        }
        match &self.store {
            Some(s) => s
                .page(d)?
                .ok_or_else(|| HdeError::Stream(format!("delta base {d} is not here"))),
            None => Err(HdeError::Stream(format!("delta base {d} is not here"))),
        }
    }
}

fn decode_checked(
    obj: &[u8],
    d: &Digest,
    base: Option<Box<codec::Page>>,
) -> Result<Box<codec::Page>, HdeError> {
    let page = codec::decode_page(obj, |_| {
        base.ok_or_else(|| HdeError::Stream("a delta without its base".into()))
    })
    .map_err(|e| HdeError::Stream(format!("page {d}: {e}")))?;
    if Digest::of(&page[..]) != *d {
        return Err(HdeError::Stream(format!(
            "page {d}: its content does not match its digest"
        )));
    }
    Ok(page)
}
