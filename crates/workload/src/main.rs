//! The test guest's workload: the program every dwcp test and benchmark runs
//! inside its VM to prove that the VM kept running with its memory intact.
//!
//! It owns `dwcp.mem_mb` MiB of memory, fills it with realistic contents
//! (`dwcp.fill=zero|text|random|mixed`), rewrites `dwcp.dirty_pages` pages a
//! second (`dwcp.write=small|full`, `dwcp.hot=P` percent of the pages taking
//! 90 % of the writes), and prints about once a second on the console
//!
//! ```text
//! TICK <n> writes=<w> sum=<s> OK
//! ```
//!
//! or `CORRUPT` in place of `OK` once a self-check has failed (and stays so).
//!
//! Every non-pristine page carries its index and its write generation in a
//! 16-byte header; a table outside the pages keeps each page's generation and
//! checksum. Each page is checked before it is rewritten, and a sweep checks
//! every page in turn, so a page lost or rolled back by a migration shows up.
//!
//! It deliberately uses nothing but `std`: it is linked statically and is the
//! only program in the guest besides busybox.
//!
//! Off the guest, `dwcp-workload --cmdline "dwcp.mem_mb=8 ..."` runs it with
//! the given options instead of `/proc/cmdline`, and
//! `dwcp-workload --emit-pages FILL COUNT` writes COUNT freshly filled pages
//! to stdout (to measure how they compress).

use std::alloc::{alloc_zeroed, Layout};
use std::io::{self, Write};
use std::time::{Duration, Instant};

const PAGE_BYTES: usize = 4096;
const HEADER_BYTES: usize = 16;
/// Pages re-checked each second by the sweep, besides every page written.
const SWEEP_PAGES_PER_SEC: u64 = 2048;
/// Words in the text vocabulary: sized so zstd -3 shrinks text about 3x.
const VOCABULARY_WORDS: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Zero,
    Text,
    Random,
    Mixed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteKind {
    Small,
    Full,
}

#[derive(Debug)]
struct Options {
    mem_mb: u64,
    dirty_pages: u64,
    hot_percent: u64,
    write: WriteKind,
    fill: Fill,
    seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mem_mb: 64,
            dirty_pages: 1000,
            hot_percent: 100,
            write: WriteKind::Small,
            fill: Fill::Mixed,
            seed: 1,
        }
    }
}

fn parse_fill(v: &str) -> Result<Fill, String> {
    match v {
        "zero" => Ok(Fill::Zero),
        "text" => Ok(Fill::Text),
        "random" => Ok(Fill::Random),
        "mixed" => Ok(Fill::Mixed),
        _ => Err(format!(
            "dwcp.fill={v}: expected zero, text, random or mixed"
        )),
    }
}

impl Options {
    /// Reads `dwcp.*` words from a kernel command line; other words are ignored.
    fn from_cmdline(cmdline: &str) -> Result<Options, String> {
        let mut o = Options::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{key}={value}: expected a whole number"))
            };
            match key {
                "dwcp.mem_mb" => o.mem_mb = number()?,
                "dwcp.dirty_pages" => o.dirty_pages = number()?,
                "dwcp.hot" => o.hot_percent = number()?,
                "dwcp.seed" => o.seed = number()?,
                "dwcp.write" => {
                    o.write = match value {
                        "small" => WriteKind::Small,
                        "full" => WriteKind::Full,
                        _ => return Err(format!("{key}={value}: expected small or full")),
                    }
                }
                "dwcp.fill" => o.fill = parse_fill(value)?,
                _ => {}
            }
        }
        if o.mem_mb == 0 {
            return Err("dwcp.mem_mb must be at least 1".into());
        }
        if o.hot_percent == 0 || o.hot_percent > 100 {
            return Err(format!("dwcp.hot={}: expected 1 to 100", o.hot_percent));
        }
        Ok(o)
    }
}

/// SplitMix64: small, fast and good enough to make page contents look random.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

fn mix(a: u64, b: u64, c: u64) -> u64 {
    Rng::new(a ^ b.rotate_left(21) ^ c.rotate_left(42)).next()
}

/// A pronounceable word list, made from the seed.
fn vocabulary(seed: u64) -> Vec<Vec<u8>> {
    const CONSONANTS: &[u8] = b"bcdfghklmnprstvwz";
    const VOWELS: &[u8] = b"aeiou";
    let mut rng = Rng::new(seed ^ 0x7765_7264);
    (0..VOCABULARY_WORDS)
        .map(|_| {
            let syllables = 1 + rng.below(3) as usize;
            let mut w = Vec::new();
            for _ in 0..syllables {
                w.push(CONSONANTS[rng.below(CONSONANTS.len() as u64) as usize]);
                w.push(VOWELS[rng.below(VOWELS.len() as u64) as usize]);
                if rng.below(3) == 0 {
                    w.push(CONSONANTS[rng.below(CONSONANTS.len() as u64) as usize]);
                }
            }
            w
        })
        .collect()
}

/// Which contents a page holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zero,
    Text,
    Random,
}

struct Memory {
    base: *mut u8,
    pages: usize,
    seed: u64,
    fill: Fill,
    words: Vec<Vec<u8>>,
    /// Word rank for each of 4096 uniform draws: log-uniform, so a
    /// Zipf-like spread as in real text. A table, because floating point
    /// is slow in an emulated guest (TCG): `powf` per word took minutes.
    ranks: Vec<u16>,
    /// Per page: write generation and checksum of the whole page.
    generation: Vec<u32>,
    checksum: Vec<u64>,
}

fn log_uniform_ranks(n: usize) -> Vec<u16> {
    (0..4096)
        .map(|i| ((n as f64).powf((i as f64 + 0.5) / 4096.0) as usize).saturating_sub(1) as u16)
        .collect()
}

fn page_checksum(page: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in page.chunks_exact(8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    h
}

impl Memory {
    fn new(pages: usize, seed: u64, fill: Fill) -> Memory {
        let layout = Layout::from_size_align(pages * PAGE_BYTES, PAGE_BYTES)
            .unwrap_or_else(|_| fatal("memory size too large"));
        // SAFETY: the layout has a non-zero size (pages >= 1).
        let base = unsafe { alloc_zeroed(layout) };
        if base.is_null() {
            fatal(&format!(
                "cannot allocate {} MiB",
                (pages * PAGE_BYTES) >> 20
            ));
        }
        Memory {
            base,
            pages,
            seed,
            fill,
            ranks: log_uniform_ranks(VOCABULARY_WORDS),
            words: vocabulary(seed),
            generation: vec![0; pages],
            checksum: vec![0; pages],
        }
    }

    fn page(&mut self, index: usize) -> &mut [u8] {
        assert!(index < self.pages);
        // SAFETY: `base` holds `pages` pages and `index` is in range; the
        // returned borrow is tied to `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(index * PAGE_BYTES), PAGE_BYTES) }
    }

    fn kind(&self, index: usize) -> Kind {
        match self.fill {
            Fill::Zero => Kind::Zero,
            Fill::Text => Kind::Text,
            Fill::Random => Kind::Random,
            Fill::Mixed => match mix(self.seed, index as u64, 0x6b69_6e64) % 3 {
                0 => Kind::Zero,
                1 => Kind::Text,
                _ => Kind::Random,
            },
        }
    }

    /// Writes the whole of page `index` as generation `gen` would have it.
    fn fill_page(&mut self, index: usize, gen: u32) {
        let kind = self.kind(index);
        let mut rng = Rng::new(mix(self.seed, index as u64, gen as u64));
        let words = std::mem::take(&mut self.words);
        let ranks = std::mem::take(&mut self.ranks);
        let page = self.page(index);
        match kind {
            Kind::Zero => page.fill(0),
            Kind::Random => {
                for chunk in page.chunks_exact_mut(8) {
                    chunk.copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            Kind::Text => {
                let mut at = 0;
                while at < PAGE_BYTES {
                    let rank = ranks[(rng.next() >> 52) as usize] as usize;
                    let w = &words[rank.min(words.len() - 1)];
                    let n = w.len().min(PAGE_BYTES - at);
                    page[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                    if at < PAGE_BYTES {
                        page[at] = if rng.below(12) == 0 { b'\n' } else { b' ' };
                        at += 1;
                    }
                }
            }
        }
        self.words = words;
        self.ranks = ranks;
        if !(kind == Kind::Zero && gen == 0) {
            self.write_header(index, gen);
        }
    }

    fn write_header(&mut self, index: usize, gen: u32) {
        let page = self.page(index);
        page[0..4].copy_from_slice(&(index as u32).to_le_bytes());
        page[4..8].copy_from_slice(&gen.to_le_bytes());
        page[8..16].copy_from_slice(b"dwcp-pg\n");
    }

    fn seal(&mut self, index: usize) -> (u64, u64) {
        let new = page_checksum(self.page(index));
        let old = std::mem::replace(&mut self.checksum[index], new);
        (old, new)
    }

    /// Checks page `index` against the table; returns what is wrong.
    fn check(&mut self, index: usize) -> Result<(), String> {
        let gen = self.generation[index];
        let want = self.checksum[index];
        let pristine_zero = gen == 0 && self.kind(index) == Kind::Zero;
        let page = self.page(index);
        if !pristine_zero {
            let got_index = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
            let got_gen = u32::from_le_bytes([page[4], page[5], page[6], page[7]]);
            if got_index != index as u32 || got_gen != gen {
                return Err(format!(
                    "page {index}: header says page {got_index} generation {got_gen}, expected generation {gen}"
                ));
            }
        }
        let got = page_checksum(page);
        if got != want {
            return Err(format!(
                "page {index} generation {gen}: checksum {got:016x}, expected {want:016x}"
            ));
        }
        Ok(())
    }

    /// One write: `small` changes 8 bytes of the body, `full` rewrites the page.
    fn write(&mut self, index: usize, kind: WriteKind, rng: &mut Rng) -> (u64, u64) {
        let gen = self.generation[index].wrapping_add(1);
        self.generation[index] = gen;
        match kind {
            WriteKind::Full => self.fill_page(index, gen),
            WriteKind::Small => {
                let at =
                    HEADER_BYTES + 8 * rng.below(((PAGE_BYTES - HEADER_BYTES) / 8) as u64) as usize;
                let value = rng.next().to_le_bytes();
                self.page(index)[at..at + 8].copy_from_slice(&value);
                self.write_header(index, gen);
            }
        }
        self.seal(index)
    }
}

fn fatal(msg: &str) -> ! {
    println!("dwcp-workload: {msg}");
    let _ = io::stdout().flush();
    std::process::exit(1)
}

fn run(o: &Options) {
    let pages = (o.mem_mb as usize * (1 << 20)) / PAGE_BYTES;
    println!(
        "dwcp-workload: filling {} MiB ({pages} pages, fill={:?}, write={:?}, dirty_pages={}/s, hot={}%)",
        o.mem_mb, o.fill, o.write, o.dirty_pages, o.hot_percent
    );
    let _ = io::stdout().flush();
    let started = Instant::now();
    let mut mem = Memory::new(pages, o.seed, o.fill);
    let mut sum: u64 = 0;
    for i in 0..pages {
        mem.fill_page(i, 0);
        let (_, new) = mem.seal(i);
        sum = sum.wrapping_add(new);
    }
    println!(
        "dwcp-workload: ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let hot_pages = ((pages as u64 * o.hot_percent) / 100).max(1);
    let mut rng = Rng::new(o.seed ^ 0x7772_6974);
    let mut tick: u64 = 0;
    let mut writes: u64 = 0;
    let mut corrupt: Option<String> = None;
    let mut sweep_at: usize = 0;
    let t0 = Instant::now();
    let mut next_tick = t0 + Duration::from_secs(1);
    let mut done_writes: u64 = 0;
    let mut done_sweep: u64 = 0;
    let report = |msg: String, corrupt: &mut Option<String>| {
        if corrupt.is_none() {
            println!("CORRUPT {msg}");
            *corrupt = Some(msg);
        }
    };
    loop {
        let now = Instant::now();
        let elapsed = now - t0;
        // Writes owed by now; a guest too slow to keep up carries at most 1 s.
        let due = (elapsed.as_secs_f64() * o.dirty_pages as f64) as u64;
        if due > done_writes + o.dirty_pages {
            done_writes = due - o.dirty_pages;
        }
        while done_writes < due {
            let index = if o.hot_percent >= 100 || rng.below(10) < 9 {
                rng.below(hot_pages)
            } else {
                hot_pages + rng.below((pages as u64 - hot_pages).max(1))
            } as usize
                % pages;
            if let Err(e) = mem.check(index) {
                report(e, &mut corrupt);
            }
            let (old, new) = mem.write(index, o.write, &mut rng);
            sum = sum.wrapping_sub(old).wrapping_add(new);
            writes += 1;
            done_writes += 1;
        }
        let sweep_due = (elapsed.as_secs_f64() * SWEEP_PAGES_PER_SEC as f64) as u64;
        while done_sweep < sweep_due {
            if let Err(e) = mem.check(sweep_at) {
                report(e, &mut corrupt);
            }
            sweep_at = (sweep_at + 1) % pages;
            done_sweep += 1;
        }
        if now >= next_tick {
            tick += 1;
            let verdict = if corrupt.is_some() { "CORRUPT" } else { "OK" };
            println!("TICK {tick} writes={writes} sum={sum:016x} {verdict}");
            let _ = io::stdout().flush();
            next_tick += Duration::from_secs(1);
            if next_tick < now {
                next_tick = now + Duration::from_secs(1);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn emit_pages(fill: &str, count: &str) -> Result<(), String> {
    let fill = parse_fill(fill)?;
    let count: usize = count
        .parse()
        .map_err(|_| format!("{count}: expected a page count"))?;
    let mut mem = Memory::new(count.max(1), 1, fill);
    let mut out = io::stdout().lock();
    for i in 0..count {
        mem.fill_page(i, 0);
        out.write_all(mem.page(i)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmdline = match args.as_slice() {
        [] => std::fs::read_to_string("/proc/cmdline")
            .unwrap_or_else(|e| fatal(&format!("cannot read /proc/cmdline: {e}"))),
        [flag, line] if flag == "--cmdline" => line.clone(),
        [flag, fill, count] if flag == "--emit-pages" => {
            if let Err(e) = emit_pages(fill, count) {
                fatal(&e);
            }
            return;
        }
        _ => {
            fatal("usage: dwcp-workload [--cmdline 'dwcp.mem_mb=N ...' | --emit-pages FILL COUNT]")
        }
    };
    match Options::from_cmdline(&cmdline) {
        Ok(o) => run(&o),
        Err(e) => fatal(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject() {
        let o = Options::from_cmdline(
            "console=ttyS0 dwcp.mem_mb=32 dwcp.fill=text dwcp.write=full dwcp.hot=10",
        )
        .expect("valid options");
        assert_eq!(
            (o.mem_mb, o.fill, o.write, o.hot_percent),
            (32, Fill::Text, WriteKind::Full, 10)
        );
        assert!(Options::from_cmdline("dwcp.fill=purple").is_err());
        assert!(Options::from_cmdline("dwcp.mem_mb=0").is_err());
        assert!(Options::from_cmdline("dwcp.hot=0").is_err());
    }

    #[test]
    fn writes_keep_pages_valid_and_rollbacks_are_caught() {
        for fill in [Fill::Zero, Fill::Text, Fill::Random, Fill::Mixed] {
            let mut mem = Memory::new(64, 7, fill);
            for i in 0..64 {
                mem.fill_page(i, 0);
                mem.seal(i);
            }
            let mut rng = Rng::new(3);
            for step in 0..500 {
                let i = rng.below(64) as usize;
                mem.check(i).expect("page valid before write");
                let kind = if step % 2 == 0 {
                    WriteKind::Small
                } else {
                    WriteKind::Full
                };
                mem.write(i, kind, &mut rng);
            }
            // Roll page 5 back to an older version: the check must notice.
            let before: Vec<u8> = mem.page(5).to_vec();
            mem.write(5, WriteKind::Small, &mut rng);
            mem.page(5).copy_from_slice(&before);
            assert!(
                mem.check(5).is_err(),
                "rollback of a page went unnoticed ({fill:?})"
            );
        }
    }

    #[test]
    fn pristine_zero_pages_are_all_zero() {
        let mut mem = Memory::new(4, 1, Fill::Zero);
        mem.fill_page(2, 0);
        assert!(mem.page(2).iter().all(|&b| b == 0));
    }
}
