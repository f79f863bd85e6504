//! HDE's view of a VM: QEMU's precopy migration stream, parsed into page
//! records and rebuilt byte for byte.
//!
//! Everything dwcp moves or keeps of a VM's memory goes through this format:
//! the source QEMU migrates into the agent, [`StreamParser`] turns the bytes
//! into [`Item`]s (RAM pages, with everything else kept as verbatim bytes),
//! and [`StreamWriter`] turns items back into exactly the bytes they came
//! from. Checkpoints keep pages by content (crate `dwcp-hde`); migration
//! sends pages the destination lacks.
//!
//! What is parsed (QEMU 10, the layout of `migration/savevm.c` and
//! `migration/ram.c`): the header (`QEVM`, version 3), the configuration
//! section, commands, the `ram` section's START / PART / END framing with the
//! MEM_SIZE block list, page records (ZERO, PAGE, with or without CONTINUE),
//! EOS and section footers. Device state (FULL sections), EOF and the VM
//! description are not self-delimiting without QEMU's device models, so once
//! the first non-RAM section starts, every further byte is passed through
//! as [`Item::Tail`]; a stream whose tail does not end in a complete VM
//! description is reported as truncated by [`StreamParser::finish`].
//!
//! Stream features that hide pages (xbzrle, multifd, compression, postcopy,
//! mapped-ram, ignore-shared) must be off on the QEMU side; their records
//! are refused with [`StreamError::Unsupported`] rather than misread.
//!
//! The parser is sans-IO and incremental: [`StreamParser::feed`] bytes as
//! they arrive, then take items with [`StreamParser::next_item`] until it
//! returns `None`. It hands out every complete record at once and never
//! waits for bytes QEMU has not sent (QEMU has sync points). It holds at
//! most one record of unread input beyond what was fed, plus the last
//! [`TAIL_KEEP_BYTES`] of the tail for the completeness check.

use std::fmt;

/// Guest page size of the stream (x86 targets).
pub const PAGE_SIZE: usize = 4096;
/// The stream's magic number, `QEVM`.
pub const MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU writes.
pub const VERSION: u32 = 3;
/// How much of the tail is kept to check that it is complete.
pub const TAIL_KEEP_BYTES: usize = 16 << 20;

const SEC_EOF: u8 = 0x00;
const SEC_START: u8 = 0x01;
const SEC_PART: u8 = 0x02;
const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SEC_SUBSECTION: u8 = 0x05;
const SEC_VMDESCRIPTION: u8 = 0x06;
const SEC_CONFIGURATION: u8 = 0x07;
const SEC_COMMAND: u8 = 0x08;
const SEC_FOOTER: u8 = 0x7e;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAGS_MASK: u64 = (PAGE_SIZE as u64) - 1;

/// `MIG_CMD_PACKAGED`: a postcopy package, which hides a whole stream.
const CMD_PACKAGED: u16 = 7;
/// Longest configuration name accepted (QEMU's are machine type names).
const MAX_CONFIG_NAME: u32 = 256;
/// Most RAM blocks accepted in a MEM_SIZE list.
const MAX_BLOCKS: usize = 4096;

/// A RAM block as announced in the START section's MEM_SIZE list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub name: String,
    pub length_bytes: u64,
}

impl Block {
    pub fn pages(&self) -> u64 {
        self.length_bytes.div_ceil(PAGE_SIZE as u64)
    }
}

/// The content of one page record.
#[derive(Clone, PartialEq, Eq)]
pub enum PageData {
    /// `RAM_SAVE_FLAG_ZERO`: every byte of the page equals this one (QEMU
    /// always sends 0).
    Fill(u8),
    /// `RAM_SAVE_FLAG_PAGE`: the page's bytes.
    Full(Box<[u8; PAGE_SIZE]>),
}

impl fmt::Debug for PageData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageData::Fill(b) => write!(f, "Fill({b:#04x})"),
            PageData::Full(p) => write!(f, "Full({:02x?}..)", &p[..8]),
        }
    }
}

/// One RAM page record, with what is needed to write it back exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRecord {
    /// Index of the block in [`StreamParser::blocks`].
    pub block: u16,
    /// Byte offset in the block (page aligned).
    pub offset: u64,
    /// Whether the record named its block (CONTINUE clear) or continued
    /// the previous record's block.
    pub named: bool,
    pub data: PageData,
}

impl PageRecord {
    pub fn page_index(&self) -> u64 {
        self.offset / PAGE_SIZE as u64
    }

    /// Bytes the record takes in the stream ([`write_page`]'s layout),
    /// given the length of its block's name.
    pub fn stream_len(&self, block_name_len: usize) -> usize {
        let name = if self.named { 1 + block_name_len } else { 0 };
        let body = match self.data {
            PageData::Fill(_) => 1,
            PageData::Full(_) => PAGE_SIZE,
        };
        8 + name + body
    }
}

/// Which framing a RAM section opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    Start,
    Part,
    End,
}

/// What a run of verbatim bytes is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKind {
    /// Magic and version.
    Header,
    /// The configuration section (machine type, capabilities).
    Configuration,
    /// A `QEMU_VM_COMMAND` with its command number.
    Command(u16),
    /// The header of a `ram` section.
    RamSection(SectionKind),
    /// The MEM_SIZE record with its block list.
    RamBlocks,
    /// EOS and the section footer that close a `ram` section.
    RamSectionEnd,
}

/// A piece of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// Bytes carrying no pages, passed on verbatim.
    Meta {
        kind: MetaKind,
        bytes: Vec<u8>,
    },
    Page(PageRecord),
    /// Bytes from the first non-RAM section to the end of the stream
    /// (device state, EOF, VM description), in pieces as they arrive.
    Tail(Vec<u8>),
}

/// Why a stream cannot be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("at byte {offset}: not a QEMU migration stream (magic {magic:#010x})")]
    BadMagic { offset: u64, magic: u32 },
    #[error("at byte {offset}: stream version {version}, only version 3 is understood")]
    BadVersion { offset: u64, version: u32 },
    #[error("at byte {offset}: {what} is not supported (switch it off on the QEMU side)")]
    Unsupported { offset: u64, what: String },
    #[error("at byte {offset}: malformed stream: {what}")]
    Malformed { offset: u64, what: String },
    #[error("stream truncated after {offset} bytes: {what}")]
    Truncated { offset: u64, what: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Configuration,
    /// Expecting a section type byte.
    TopLevel,
    /// Inside a `ram` section body.
    RamBody(SectionKind),
    /// Expecting the footer of the `ram` section.
    RamFooter,
    Tail,
}

/// The incremental parser. See the crate docs for the call order.
#[derive(Debug)]
pub struct StreamParser {
    buf: Vec<u8>,
    pos: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    state: State,
    blocks: Vec<Block>,
    ram_section: Option<u32>,
    last_block: Option<u16>,
    saw_ram_end: bool,
    tail: Vec<u8>,
    tail_bytes: u64,
    opaque_reason: Option<String>,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamParser {
    pub fn new() -> StreamParser {
        StreamParser {
            buf: Vec::with_capacity(64 << 10),
            pos: 0,
            base: 0,
            state: State::Header,
            blocks: Vec::new(),
            ram_section: None,
            last_block: None,
            saw_ram_end: false,
            tail: Vec::new(),
            tail_bytes: 0,
            opaque_reason: None,
        }
    }

    /// Appends bytes read from the stream. Take items with
    /// [`next_item`](Self::next_item) before feeding more, or memory grows
    /// with what was fed.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The RAM blocks announced so far.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// The section id of `ram`, once its START section has been read.
    pub fn ram_section_id(&self) -> Option<u32> {
        self.ram_section
    }

    /// Whether the `ram` section's END (the final pages) has been read.
    pub fn ram_complete(&self) -> bool {
        self.saw_ram_end
    }

    /// Why the tail began before RAM was complete, if it did: the name of
    /// the section dwcp does not understand.
    pub fn opaque_reason(&self) -> Option<&str> {
        self.opaque_reason.as_deref()
    }

    /// Stream bytes turned into items so far.
    pub fn consumed_bytes(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Checks, once the stream has ended, that nothing is missing: the
    /// last record is complete and the tail ends with QEMU's EOF marker and
    /// a whole VM description.
    pub fn finish(&self) -> Result<(), StreamError> {
        let offset = self.base + self.buf.len() as u64;
        let truncated = |what: &str| {
            Err(StreamError::Truncated {
                offset,
                what: what.to_string(),
            })
        };
        if self.pos < self.buf.len() {
            return truncated("the last record is incomplete");
        }
        match self.state {
            State::Tail if tail_is_complete(&self.tail) => Ok(()),
            State::Tail => truncated("the device state does not end in a complete VM description"),
            State::Header | State::Configuration => truncated("the stream header is incomplete"),
            _ => truncated("the stream ends before the device state"),
        }
    }

    /// The next complete item, `None` if more bytes are needed.
    pub fn next_item(&mut self) -> Result<Option<Item>, StreamError> {
        match self.state {
            State::Header => self.header(),
            State::Configuration => self.configuration(),
            State::TopLevel => self.top_level(),
            State::RamBody(kind) => self.ram_record(kind),
            State::RamFooter => self.ram_footer(),
            State::Tail => Ok(self.tail_item()),
        }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        let v = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        v
    }

    fn malformed<T>(&self, what: impl Into<String>) -> Result<T, StreamError> {
        Err(StreamError::Malformed {
            offset: self.offset(),
            what: what.into(),
        })
    }

    fn unsupported<T>(&self, what: impl Into<String>) -> Result<T, StreamError> {
        Err(StreamError::Unsupported {
            offset: self.offset(),
            what: what.into(),
        })
    }

    fn header(&mut self) -> Result<Option<Item>, StreamError> {
        let a = self.avail();
        if a.len() < 8 {
            // A wrong magic is reported as soon as its bytes are there.
            if a.len() >= 4 && be32(a) != MAGIC {
                let magic = be32(a);
                return Err(StreamError::BadMagic { offset: 0, magic });
            }
            return Ok(None);
        }
        let (magic, version) = (be32(a), be32(&a[4..]));
        if magic != MAGIC {
            return Err(StreamError::BadMagic { offset: 0, magic });
        }
        if version != VERSION {
            return Err(StreamError::BadVersion { offset: 4, version });
        }
        self.state = State::Configuration;
        Ok(Some(meta(MetaKind::Header, self.take(8))))
    }

    /// The configuration section: `0x07`, be32 length, machine name, then
    /// optional subsections (capabilities, uuid).
    fn configuration(&mut self) -> Result<Option<Item>, StreamError> {
        let a = self.avail();
        if a.is_empty() {
            return Ok(None);
        }
        if a[0] != SEC_CONFIGURATION {
            // QEMU may skip the configuration section.
            self.state = State::TopLevel;
            return self.top_level();
        }
        if a.len() < 5 {
            return Ok(None);
        }
        let name_len = be32(&a[1..]);
        if name_len > MAX_CONFIG_NAME {
            return self.malformed(format!("configuration name of {name_len} bytes"));
        }
        let mut at = 5 + name_len as usize;
        loop {
            let Some(&next) = a.get(at) else {
                return Ok(None);
            };
            if next != SEC_SUBSECTION {
                break;
            }
            match subsection_len(&a[at..]) {
                Ok(Some(n)) => at += n,
                Ok(None) => return Ok(None),
                Err(what) => return self.unsupported(what),
            }
        }
        self.state = State::TopLevel;
        Ok(Some(meta(MetaKind::Configuration, self.take(at))))
    }

    fn top_level(&mut self) -> Result<Option<Item>, StreamError> {
        let a = self.avail();
        let Some(&kind) = a.first() else {
            return Ok(None);
        };
        match kind {
            SEC_COMMAND => {
                if a.len() < 5 {
                    return Ok(None);
                }
                let cmd = be16(&a[1..]);
                let len = be16(&a[3..]) as usize;
                if cmd == CMD_PACKAGED {
                    return self.unsupported("postcopy (a packaged command)");
                }
                if a.len() < 5 + len {
                    return Ok(None);
                }
                Ok(Some(meta(MetaKind::Command(cmd), self.take(5 + len))))
            }
            SEC_START | SEC_FULL => {
                if a.len() < 6 {
                    return Ok(None);
                }
                let id = be32(&a[1..]);
                let name_len = a[5] as usize;
                let total = 6 + name_len + 8;
                if a.len() < total {
                    return Ok(None);
                }
                let name = &a[6..6 + name_len];
                if kind == SEC_START && name == b"ram" {
                    if self.ram_section.is_some() {
                        return self.malformed("a second START section for ram");
                    }
                    self.ram_section = Some(id);
                    self.state = State::RamBody(SectionKind::Start);
                    let bytes = self.take(total);
                    return Ok(Some(meta(MetaKind::RamSection(SectionKind::Start), bytes)));
                }
                if !self.saw_ram_end {
                    self.opaque_reason = Some(String::from_utf8_lossy(name).into_owned());
                }
                self.state = State::Tail;
                Ok(self.tail_item())
            }
            SEC_PART | SEC_END => {
                if a.len() < 5 {
                    return Ok(None);
                }
                let id = be32(&a[1..]);
                if Some(id) != self.ram_section {
                    return self.malformed(format!("section {id} continued but never started"));
                }
                if self.saw_ram_end {
                    return self.malformed("ram section continued after its END");
                }
                let sk = if kind == SEC_PART {
                    SectionKind::Part
                } else {
                    self.saw_ram_end = true;
                    SectionKind::End
                };
                // The last block carries over between sections: QEMU's
                // loader keeps it, and its sender relies on that.
                self.state = State::RamBody(sk);
                Ok(Some(meta(MetaKind::RamSection(sk), self.take(5))))
            }
            SEC_EOF => {
                self.state = State::Tail;
                Ok(self.tail_item())
            }
            other => self.malformed(format!("unknown section type {other:#04x}")),
        }
    }

    fn ram_record(&mut self, kind: SectionKind) -> Result<Option<Item>, StreamError> {
        let a = self.avail();
        if a.len() < 8 {
            return Ok(None);
        }
        let word = be64(a);
        let flags = word & FLAGS_MASK;
        let addr = word & !FLAGS_MASK;
        if flags == FLAG_EOS {
            self.state = State::RamFooter;
            return self.ram_footer();
        }
        if flags == FLAG_MEM_SIZE {
            if kind != SectionKind::Start || !self.blocks.is_empty() {
                return self.malformed("a MEM_SIZE record outside the START section");
            }
            return self.ram_blocks(addr);
        }
        let page_kind = flags & !FLAG_CONTINUE;
        let body = match page_kind {
            FLAG_ZERO => 1,
            FLAG_PAGE => PAGE_SIZE,
            _ => return self.unsupported(describe_flags(flags)),
        };
        let named = flags & FLAG_CONTINUE == 0;
        let (block, name_bytes) = if named {
            let Some(&n) = a.get(8) else {
                return Ok(None);
            };
            let n = n as usize;
            if a.len() < 9 + n {
                return Ok(None);
            }
            let name = &a[9..9 + n];
            match self.blocks.iter().position(|b| b.name.as_bytes() == name) {
                Some(i) => (i as u16, 1 + n),
                None => {
                    let name = String::from_utf8_lossy(name).into_owned();
                    return self.malformed(format!("page of unknown RAM block {name:?}"));
                }
            }
        } else {
            match self.last_block {
                Some(b) => (b, 0),
                None => return self.malformed("a CONTINUE page with no block before it"),
            }
        };
        let total = 8 + name_bytes + body;
        if a.len() < total {
            return Ok(None);
        }
        let b = &self.blocks[block as usize];
        if addr >= b.length_bytes {
            let what = format!("page at {addr:#x} beyond the end of block {:?}", b.name);
            return self.malformed(what);
        }
        let data_at = self.pos + 8 + name_bytes;
        let data = if body == 1 {
            PageData::Fill(self.buf[data_at])
        } else {
            let mut p = Box::new([0u8; PAGE_SIZE]);
            p.copy_from_slice(&self.buf[data_at..data_at + PAGE_SIZE]);
            PageData::Full(p)
        };
        self.pos += total;
        self.last_block = Some(block);
        Ok(Some(Item::Page(PageRecord {
            block,
            offset: addr,
            named,
            data,
        })))
    }

    /// The MEM_SIZE record and its block list, handed out whole once all
    /// of it is there.
    fn ram_blocks(&mut self, total: u64) -> Result<Option<Item>, StreamError> {
        let a = self.avail();
        let mut at = 8;
        let mut remaining = total;
        let mut blocks = Vec::new();
        while remaining > 0 {
            let Some(&n) = a.get(at) else {
                return Ok(None);
            };
            let n = n as usize;
            if a.len() < at + 1 + n + 8 {
                return Ok(None);
            }
            let name = match std::str::from_utf8(&a[at + 1..at + 1 + n]) {
                Ok(s) if !s.is_empty() => s.to_string(),
                _ => return self.malformed("a RAM block name that is empty or not UTF-8"),
            };
            let length_bytes = be64(&a[at + 1 + n..]);
            if length_bytes > remaining || length_bytes == 0 {
                return self.malformed(format!(
                    "RAM block {name:?} of {length_bytes} bytes does not fit the announced total"
                ));
            }
            if blocks.len() >= MAX_BLOCKS || blocks.iter().any(|b: &Block| b.name == name) {
                return self.malformed(format!("RAM block {name:?} repeated or too many blocks"));
            }
            remaining -= length_bytes;
            at += 1 + n + 8;
            blocks.push(Block { name, length_bytes });
        }
        self.blocks = blocks;
        Ok(Some(meta(MetaKind::RamBlocks, self.take(at))))
    }

    /// EOS, then `0x7e` and the section id.
    fn ram_footer(&mut self) -> Result<Option<Item>, StreamError> {
        let a = self.avail();
        if a.len() < 13 {
            return Ok(None);
        }
        if a[8] != SEC_FOOTER || Some(be32(&a[9..])) != self.ram_section {
            self.pos += 8;
            return self.malformed("the ram section does not end with its footer");
        }
        self.state = State::TopLevel;
        Ok(Some(meta(MetaKind::RamSectionEnd, self.take(13))))
    }

    fn tail_item(&mut self) -> Option<Item> {
        if self.pos == self.buf.len() {
            return None;
        }
        let bytes = self.take(self.buf.len() - self.pos);
        self.tail_bytes += bytes.len() as u64;
        self.tail.extend_from_slice(&bytes);
        if self.tail.len() > TAIL_KEEP_BYTES {
            let cut = self.tail.len() - TAIL_KEEP_BYTES;
            self.tail.drain(..cut);
        }
        Some(Item::Tail(bytes))
    }
}

fn meta(kind: MetaKind, bytes: Vec<u8>) -> Item {
    Item::Meta { kind, bytes }
}

/// Length of a configuration subsection at the start of `a` (which starts
/// with `0x05`), `None` if more bytes are needed.
fn subsection_len(a: &[u8]) -> Result<Option<usize>, String> {
    let Some(&n) = a.get(1) else {
        return Ok(None);
    };
    let n = n as usize;
    let body = 2 + n + 4;
    if a.len() < body {
        return Ok(None);
    }
    match &a[2..2 + n] {
        b"configuration/capabilities" => {
            if a.len() < body + 4 {
                return Ok(None);
            }
            let count = be32(&a[body..]);
            let mut at = body + 4;
            for _ in 0..count.min(1024) {
                let Some(&l) = a.get(at) else {
                    return Ok(None);
                };
                at += 1 + l as usize;
            }
            Ok((a.len() >= at).then_some(at))
        }
        b"configuration/uuid" => Ok((a.len() >= body + 16).then_some(body + 16)),
        other => Err(format!(
            "configuration subsection {:?}",
            String::from_utf8_lossy(other)
        )),
    }
}

fn describe_flags(flags: u64) -> String {
    let name = match flags & !FLAG_CONTINUE {
        0x01 => "the obsolete FULL page record",
        0x40 => "xbzrle (RAM_SAVE_FLAG_XBZRLE)",
        0x80 => "RAM hooks (RDMA)",
        0x100 => "compressed pages",
        0x200 => "multifd (RAM_SAVE_FLAG_MULTIFD_FLUSH)",
        _ => "",
    };
    if name.is_empty() {
        format!("RAM record flags {flags:#x}")
    } else {
        name.to_string()
    }
}

/// Whether `tail` (the end of a stream's tail) ends with QEMU's EOF marker
/// followed by a complete VM description (`0x06`, be32 length, JSON).
pub fn tail_is_complete(tail: &[u8]) -> bool {
    if tail.last() != Some(&b'}') {
        return tail == [SEC_EOF];
    }
    // The JSON starts right after the length; find the length that fits.
    let end = tail.len();
    let mut search = end;
    while let Some(open) = tail[..search].iter().rposition(|&b| b == b'{') {
        if open >= 6 {
            let len = be32(&tail[open - 4..]) as usize;
            if len == end - open && tail[open - 5] == SEC_VMDESCRIPTION && tail[open - 6] == SEC_EOF
            {
                return true;
            }
        }
        search = open;
    }
    false
}

/// Writes items back into stream bytes. It learns the block names from the
/// [`MetaKind::RamBlocks`] item, so it must see the items of one stream in
/// order.
#[derive(Debug, Default)]
pub struct StreamWriter {
    blocks: Vec<String>,
}

impl StreamWriter {
    pub fn new() -> StreamWriter {
        StreamWriter::default()
    }

    /// A writer for a stream whose block list is already known.
    pub fn with_blocks(blocks: &[Block]) -> StreamWriter {
        StreamWriter {
            blocks: blocks.iter().map(|b| b.name.clone()).collect(),
        }
    }

    /// Appends the bytes of `item` to `out`. Fails only for a page of a
    /// block this writer was never told about.
    pub fn write(&mut self, item: &Item, out: &mut Vec<u8>) -> Result<(), StreamError> {
        match item {
            Item::Meta { kind, bytes } => {
                if *kind == MetaKind::RamBlocks {
                    self.blocks = block_list(bytes)
                        .ok_or(StreamError::Malformed {
                            offset: 0,
                            what: "a block list item that does not parse".into(),
                        })?
                        .into_iter()
                        .map(|b| b.name)
                        .collect();
                }
                out.extend_from_slice(bytes);
            }
            Item::Tail(bytes) => out.extend_from_slice(bytes),
            Item::Page(p) => {
                let name = match p.named {
                    true => match self.blocks.get(p.block as usize) {
                        Some(n) => Some(n.as_str()),
                        None => {
                            return Err(StreamError::Malformed {
                                offset: 0,
                                what: format!("page of block {} before its block list", p.block),
                            })
                        }
                    },
                    false => None,
                };
                write_page(out, p.offset, name, &p.data);
            }
        }
        Ok(())
    }
}

/// Writes one page record: the offset with its flags, the block name unless
/// the record continues the previous block, and the data.
pub fn write_page(out: &mut Vec<u8>, offset: u64, block: Option<&str>, data: &PageData) {
    let mut word = offset & !FLAGS_MASK;
    word |= match data {
        PageData::Fill(_) => FLAG_ZERO,
        PageData::Full(_) => FLAG_PAGE,
    };
    if block.is_none() {
        word |= FLAG_CONTINUE;
    }
    out.extend_from_slice(&word.to_be_bytes());
    if let Some(name) = block {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
    }
    match data {
        PageData::Fill(b) => out.push(*b),
        PageData::Full(p) => out.extend_from_slice(&p[..]),
    }
}

/// The bytes that close a `ram` section: EOS and the footer.
pub fn ram_section_end(section_id: u32) -> Vec<u8> {
    let mut v = FLAG_EOS.to_be_bytes().to_vec();
    v.push(SEC_FOOTER);
    v.extend_from_slice(&section_id.to_be_bytes());
    v
}

/// The header of a `ram` PART or END section.
pub fn ram_section_header(kind: SectionKind, section_id: u32) -> Vec<u8> {
    let t = match kind {
        SectionKind::Part => SEC_PART,
        SectionKind::End => SEC_END,
        SectionKind::Start => SEC_START,
    };
    let mut v = vec![t];
    v.extend_from_slice(&section_id.to_be_bytes());
    v
}

/// The blocks of a [`MetaKind::RamBlocks`] item's bytes (the MEM_SIZE
/// record and its list), `None` if they do not parse.
pub fn block_list(bytes: &[u8]) -> Option<Vec<Block>> {
    let mut at = 8;
    let mut blocks = Vec::new();
    while at < bytes.len() {
        let n = *bytes.get(at)? as usize;
        let name = std::str::from_utf8(bytes.get(at + 1..at + 1 + n)?).ok()?;
        let length_bytes = be64(bytes.get(at + 1 + n..at + 9 + n)?);
        blocks.push(Block {
            name: name.to_string(),
            length_bytes,
        });
        at += 9 + n;
    }
    (at == bytes.len()).then_some(blocks)
}

fn be16(a: &[u8]) -> u16 {
    u16::from_be_bytes([a[0], a[1]])
}

fn be32(a: &[u8]) -> u32 {
    u32::from_be_bytes([a[0], a[1], a[2], a[3]])
}

fn be64(a: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&a[..8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests;
