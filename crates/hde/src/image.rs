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
    let reader = store.snapshot()?;
    let mut out = Layout::create(path, length)?;
    let mut pages = 0u64;
    for (b, p, d) in map.nonzero_pages() {
        if b != block {
            continue;
        }
        let page = reader
            .page(&d)?
            .ok_or_else(|| HdeError::Stream(format!("page {d} is missing from the store")))?;
        out.put(p, &page)?;
        pages += 1;
    }
    let file = out.finish()?;
    file.sync_all()
        .map_err(|e| HdeError::Stream(format!("{}: {e}", path.display())))?;
    Ok(pages)
}

/// A new file of a block's length, pages written at their places (in
/// rising order), runs of adjacent pages in one write.
struct Layout<'a> {
    file: std::fs::File,
    path: &'a Path,
    length: u64,
    run: Vec<u8>,
    run_at: u64,
}

impl<'a> Layout<'a> {
    /// Pages in one write, at most.
    const RUN: usize = 256;

    fn create(path: &'a Path, length: u64) -> Result<Layout<'a>, HdeError> {
        let file = std::fs::File::create(path).map_err(|e| Self::io(path, e))?;
        file.set_len(length).map_err(|e| Self::io(path, e))?;
        Ok(Layout {
            file,
            path,
            length,
            run: Vec::with_capacity(Self::RUN * PAGE_SIZE),
            run_at: 0,
        })
    }

    fn io(path: &Path, e: std::io::Error) -> HdeError {
        HdeError::Stream(format!("{}: {e}", path.display()))
    }

    /// Page `p` (after those put before it).
    fn put(&mut self, p: u64, page: &Page) -> Result<(), HdeError> {
        let page_size = PAGE_SIZE as u64;
        if (p + 1) * page_size > self.length {
            return Err(HdeError::Stream(format!(
                "page {p} lies beyond the block's {} bytes",
                self.length
            )));
        }
        let next = self.run_at + self.run.len() as u64 / page_size;
        if !self.run.is_empty() && (p != next || self.run.len() == self.run.capacity()) {
            self.flush()?;
        }
        if self.run.is_empty() {
            self.run_at = p;
        }
        self.run.extend_from_slice(&page[..]);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), HdeError> {
        self.file
            .write_all_at(&self.run, self.run_at * PAGE_SIZE as u64)
            .map_err(|e| Self::io(self.path, e))?;
        self.run.clear();
        Ok(())
    }

    /// Writes what is left; the file, not flushed to disk.
    fn finish(mut self) -> Result<std::fs::File, HdeError> {
        if !self.run.is_empty() {
            self.flush()?;
        }
        Ok(self.file)
    }
}

/// Pages of an image written by [`write_image`] or [`HeldPages::write`],
/// found by digest, read from the file mapped into memory (no system call
/// per page). What it returns is not checked here: a migration checks
/// every page it rebuilds.
pub struct MemoryImage {
    map: memmap2::Mmap,
    at: std::collections::HashMap<Digest, usize, foldhash::fast::RandomState>,
}

impl MemoryImage {
    /// Opens the image at `path` of block `block` of checkpoint `map`.
    pub fn open(path: &Path, map: &PageMap, block: u16) -> Result<MemoryImage, HdeError> {
        let pages = map
            .nonzero_pages()
            .filter(|(b, _, _)| *b == block)
            .map(|(_, p, d)| (p, d));
        MemoryImage::with_pages(path, pages)
    }

    /// Opens the image at `path` that holds the pages of `index`.
    pub fn from_index(path: &Path, index: &[(u64, Digest)]) -> Result<MemoryImage, HdeError> {
        MemoryImage::with_pages(path, index.iter().copied())
    }

    fn with_pages(
        path: &Path,
        pages: impl Iterator<Item = (u64, Digest)>,
    ) -> Result<MemoryImage, HdeError> {
        let io = |e: std::io::Error| HdeError::Stream(format!("{}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: images are written whole under another name and renamed
        // into place, never written or cut short afterwards (a newer one
        // replaces the name, not the file), so the mapping stays valid.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let at = pages
            .map(|(p, d)| (d, p as usize * PAGE_SIZE))
            .filter(|(_, at)| at + PAGE_SIZE <= map.len())
            .collect();
        Ok(MemoryImage { map, at })
    }

    /// The page with digest `d`, if the image holds it.
    pub fn page(&self, d: &Digest) -> Option<Box<Page>> {
        self.page_ref(d).map(|p| Box::new(*p))
    }

    /// The page with digest `d` in place, if the image holds it.
    pub fn page_ref(&self, d: &Digest) -> Option<&Page> {
        let at = *self.at.get(d)?;
        self.map.get(at..at + PAGE_SIZE)?.try_into().ok()
    }
}

/// The pages of one RAM block that both sides of a migration held when it
/// ended (their codecs keep the same pages, see
/// [`CACHE_PAGES`](crate::wire::CACHE_PAGES)): page index, content, and
/// the digest where the side knows it.
pub struct HeldPages {
    pub(crate) pages: Vec<(u64, Box<Page>, Option<Digest>)>,
}

impl HeldPages {
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Writes the pages at their places in a new file `path` of `length`
    /// bytes (the rest left as holes); hashes those whose digest is not
    /// known. Returns the file's index: (page, digest), by page. The file
    /// is not flushed to disk (the caller decides).
    pub fn write(mut self, length: u64, path: &Path) -> Result<Vec<(u64, Digest)>, HdeError> {
        self.pages.sort_unstable_by_key(|(p, _, _)| *p);
        let mut out = Layout::create(path, length)?;
        let mut index = Vec::with_capacity(self.pages.len());
        for (p, page, d) in self.pages {
            out.put(p, &page)?;
            index.push((p, d.unwrap_or_else(|| Digest::of(&page[..]))));
        }
        out.finish()?;
        Ok(index)
    }
}

/// The distinct digests of an index (see [`HeldPages::write`]), in its
/// order: the list by which both sides of a migration number its pages.
pub fn index_pages(index: &[(u64, Digest)]) -> Vec<Digest> {
    let mut seen = std::collections::HashSet::with_capacity(index.len());
    index
        .iter()
        .map(|(_, d)| *d)
        .filter(|d| seen.insert(*d))
        .collect()
}

const INDEX_ENTRY: usize = 8 + 32;

/// An index as bytes: per page, be64 page index and its digest.
pub fn encode_index(index: &[(u64, Digest)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(index.len() * INDEX_ENTRY);
    for (p, d) in index {
        out.extend_from_slice(&p.to_be_bytes());
        out.extend_from_slice(&d.0);
    }
    out
}

pub fn decode_index(b: &[u8]) -> Result<Vec<(u64, Digest)>, HdeError> {
    if !b.len().is_multiple_of(INDEX_ENTRY) {
        return Err(HdeError::Stream("a page index cut short".into()));
    }
    Ok(b.chunks_exact(INDEX_ENTRY)
        .map(|e| {
            let (p, d) = e.split_at(8);
            let p = u64::from_be_bytes(p.try_into().unwrap_or_default());
            (p, Digest(d.try_into().unwrap_or_default()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_pages_are_laid_out_and_found_by_digest() {
        let page = |b: u8| Box::new([b; PAGE_SIZE]);
        let held = HeldPages {
            pages: vec![
                (5, page(5), None),
                (1, page(1), Some(Digest::of(&[1u8; PAGE_SIZE]))),
                (2, page(7), None),
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.ram");
        let index = held.write(8 * PAGE_SIZE as u64, &path).unwrap();
        let pages: Vec<u64> = index.iter().map(|(p, _)| *p).collect();
        assert_eq!(pages, [1, 2, 5]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            8 * PAGE_SIZE as u64
        );
        let index = decode_index(&encode_index(&index)).unwrap();
        let image = MemoryImage::from_index(&path, &index).unwrap();
        assert_eq!(
            image.page(&Digest::of(&[7u8; PAGE_SIZE])).unwrap()[..],
            [7u8; PAGE_SIZE]
        );
        assert!(image.page(&Digest::of(&[9u8; PAGE_SIZE])).is_none());
        assert_eq!(index_pages(&index).len(), 3);
        assert!(decode_index(&[0u8; 39]).is_err());
        let far = HeldPages {
            pages: vec![(8, page(1), None)],
        };
        assert!(far
            .write(8 * PAGE_SIZE as u64, &dir.path().join("far.ram"))
            .is_err());
    }
}
