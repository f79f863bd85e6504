//! Warm images: the main memory of a replicated checkpoint laid out as a
//! file, built in the background when the replica arrives. A migration of
//! that VM to this node then starts its QEMU with the file mapped as the
//! guest's memory ([`LaunchSpec::memory_file`]): the replica is in place
//! the moment QEMU starts, instead of being written through the stream
//! (seconds for a large guest, on the migration's critical path).
//!
//! QEMU maps the file privately: the guest's writes never reach it, so one
//! image serves any number of attempts, and replacing it (a new file
//! renamed over the old) leaves a QEMU that maps the old one untouched.
//! An image is written, flushed to disk, then renamed into place: one found
//! under its name is whole. Pages are checked against their digests when
//! read from the store, not again when QEMU maps them.
//!
//! [`LaunchSpec::memory_file`]: dwcp_hypervisor::LaunchSpec::memory_file

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dwcp_hde::PageStore;
use dwcp_hypervisor::qemu::MAIN_RAM_BLOCK;

pub(crate) struct WarmImages {
    dir: PathBuf,
    /// One build at a time (two replicas of a VM arriving back to back
    /// build in turn; the newer replaces the older).
    building: Mutex<()>,
}

impl WarmImages {
    pub(crate) fn new(data_dir: &Path) -> WarmImages {
        WarmImages {
            dir: data_dir.join("warm"),
            building: Mutex::new(()),
        }
    }

    fn file(&self, vm: &str, id: &str) -> PathBuf {
        let h = dwcp_hde::Digest::of(id.as_bytes());
        self.dir.join(vm).join(format!("{h}.ram"))
    }

    /// The image of checkpoint `id` of `vm`, when a whole one of `size`
    /// bytes (the VM's memory) is here.
    pub(crate) fn find(&self, vm: &str, id: &str, size: u64) -> Option<PathBuf> {
        let f = self.file(vm, id);
        (std::fs::metadata(&f).ok()?.len() == size).then_some(f)
    }

    /// Lays out checkpoint `id`'s main memory as the image of its VM,
    /// replacing that VM's older ones. Returns the image and its pages.
    pub(crate) fn build(&self, store: &PageStore, id: &str) -> Result<(PathBuf, u64), String> {
        let _one = self.building.lock().unwrap_or_else(|p| p.into_inner());
        let (m, map) = store.page_map(id).map_err(|e| e.to_string())?;
        let block = main_block(&m.blocks)
            .ok_or_else(|| format!("checkpoint {id} has no block {MAIN_RAM_BLOCK}"))?;
        let path = self.file(&m.vm, id);
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let tmp = path.with_extension("tmp");
        let length = m.blocks[block as usize].length_bytes;
        let written = dwcp_hde::write_image(store, &map, block, length, &tmp)
            .map_err(|e| e.to_string())
            .and_then(|n| {
                std::fs::rename(&tmp, &path)
                    .map(|_| n)
                    .map_err(|e| format!("{}: {e}", path.display()))
            });
        let pages = written.inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path() != path {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok((path, pages))
    }

    /// The image of checkpoint `m` (page map `map`) opened to read pages
    /// from, when a whole one of `size` bytes is here.
    pub(crate) fn open(
        &self,
        m: &dwcp_hde::Manifest,
        map: &dwcp_hde::PageMap,
        size: u64,
    ) -> Option<dwcp_hde::MemoryImage> {
        let path = self.find(&m.vm, &m.id, size)?;
        dwcp_hde::MemoryImage::open(&path, map, main_block(&m.blocks)?)
            .inspect_err(|e| tracing::warn!(checkpoint = %m.id, "{e}"))
            .ok()
    }

    /// Builds the image of checkpoint `id` on a thread of its own (a
    /// migration that comes before it is done does without).
    pub(crate) fn build_in_background(self: &Arc<Self>, store: Arc<PageStore>, id: String) {
        let me = self.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            match me.build(&store, &id) {
                Ok((path, n)) => {
                    tracing::info!(checkpoint = %id, pages = n, secs = t.elapsed().as_secs_f64(), image = %path.display(), "checkpoint's memory laid out for a migration")
                }
                Err(e) => {
                    tracing::warn!(checkpoint = %id, "cannot lay out the checkpoint's memory (a migration will do without): {e}")
                }
            }
        });
    }

    /// Removes the image of checkpoint `id` of `vm`, if there is one.
    pub(crate) fn forget(&self, vm: &str, id: &str) {
        let _ = std::fs::remove_file(self.file(vm, id));
    }
}

/// The index of the main memory among a checkpoint's blocks: the block an
/// image holds.
pub(crate) fn main_block(blocks: &[dwcp_hde::BlockInfo]) -> Option<u16> {
    blocks
        .iter()
        .position(|b| b.name == MAIN_RAM_BLOCK)
        .map(|i| i as u16)
}
