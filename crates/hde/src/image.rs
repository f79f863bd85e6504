//! A checkpoint's memory laid out as a file: the pages of one RAM block at
//! their places (zero pages left as holes). QEMU can map such a file as a
//! guest's memory, and [`MemoryImage`] reads pages out of it by digest far
//! faster than the store does (no index lookup, no decompression): the
//! bases of deltas in a migration that follows the checkpoint.

use std::os::unix::fs::FileExt;
use std::path::Path;

use dwcp_vmstream::PAGE_SIZE;

use crate::codec::Page;
use crate::{Digest, HdeError, PageMap, PageStore};

/// Writes the pages of `block` of checkpoint `map` (from `store`) at their
/// places in a new file `path` as long as the block (`length`), and
/// flushes it to disk. Returns the pages written.
pub fn write_image(
    store: &PageStore,
    map: &PageMap,
    block: u16,
    length: u64,
    path: &Path,
) -> Result<u64, HdeError> {
    let io = |e: std::io::Error| HdeError::Stream(format!("{}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(io)?;
    file.set_len(length).map_err(io)?;
    let reader = store.snapshot()?;
    // Runs of adjacent pages go out in one write.
    const RUN: usize = 256;
    let page_size = PAGE_SIZE as u64;
    let mut run: Vec<u8> = Vec::with_capacity(RUN * PAGE_SIZE);
    let mut run_at = 0u64;
    let mut pages = 0u64;
    for (b, p, d) in map.nonzero_pages() {
        if b != block {
            continue;
        }
        if (p + 1) * page_size > length {
            return Err(HdeError::Stream(format!(
                "page {p} lies beyond the block's {length} bytes"
            )));
        }
        let page = reader
            .page(&d)?
            .ok_or_else(|| HdeError::Stream(format!("page {d} is missing from the store")))?;
        let next = run_at + run.len() as u64 / page_size;
        if !run.is_empty() && (p != next || run.len() == run.capacity()) {
            file.write_all_at(&run, run_at * page_size).map_err(io)?;
            run.clear();
        }
        if run.is_empty() {
            run_at = p;
        }
        run.extend_from_slice(&page[..]);
        pages += 1;
    }
    if !run.is_empty() {
        file.write_all_at(&run, run_at * page_size).map_err(io)?;
    }
    file.sync_all().map_err(io)?;
    Ok(pages)
}

/// Pages of an image written by [`write_image`], found by digest. What it
/// returns is not checked here: a migration checks every page it rebuilds.
pub struct MemoryImage {
    file: std::fs::File,
    at: std::collections::HashMap<Digest, u64, foldhash::fast::RandomState>,
}

impl MemoryImage {
    /// Opens the image at `path` of block `block` of checkpoint `map`.
    pub fn open(path: &Path, map: &PageMap, block: u16) -> Result<MemoryImage, HdeError> {
        let file = std::fs::File::open(path)
            .map_err(|e| HdeError::Stream(format!("{}: {e}", path.display())))?;
        let at = map
            .nonzero_pages()
            .filter(|(b, _, _)| *b == block)
            .map(|(_, p, d)| (d, p * PAGE_SIZE as u64))
            .collect();
        Ok(MemoryImage { file, at })
    }

    /// The page with digest `d`, if the image holds it.
    pub fn page(&self, d: &Digest) -> Option<Box<Page>> {
        let at = *self.at.get(d)?;
        let mut page = Box::new([0u8; PAGE_SIZE]);
        self.file.read_exact_at(&mut page[..], at).ok()?;
        Some(page)
    }
}
