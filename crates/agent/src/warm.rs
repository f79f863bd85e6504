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
//! A replica's image is also copied into memory ([`HeldMemory`], a memfd),
//! while the node has memory to spare (`warm_memory_share`). A migration
//! here then hands that copy to QEMU to map shared: the pages that changed
//! since the replica are written into memory that is already there. Mapped
//! privately, each of them is first copied into fresh memory, and on a
//! host that gets its own memory lazily (a VM, with free page reporting)
//! that first write costs 2-40 us a page: seconds for a busy guest, all of
//! them on the migration's critical path. A held copy serves one migration
//! (QEMU's writes go into it); if that migration fails, the copy is made
//! again from the image. Held copies are given up whenever a VM starting
//! here needs the memory.
//!
//! [`LaunchSpec::memory_file`]: dwcp_hypervisor::LaunchSpec::memory_file

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dwcp_hde::PageStore;
use dwcp_hypervisor::qemu::MAIN_RAM_BLOCK;

use crate::manager::{host_memory_available_bytes, host_memory_bytes, lock};

pub(crate) struct WarmImages {
    dir: PathBuf,
    /// One build at a time (two replicas of a VM arriving back to back
    /// build in turn; the newer replaces the older).
    building: Mutex<()>,
    /// Copies of images in memory, by VM (one each).
    held: Mutex<HashMap<String, HeldMemory>>,
    /// Bytes the held copies may take together.
    budget: u64,
}

/// An image copied into memory that is this process's alone (a memfd),
/// for one QEMU to map shared. Dropped, its memory goes back to the host
/// once no QEMU maps it.
pub(crate) struct HeldMemory {
    /// The image it copies.
    image: PathBuf,
    memory: File,
    bytes: u64,
}

impl HeldMemory {
    /// The path another process opens it by, while this lives.
    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.memory.as_raw_fd()
        ))
    }

    /// The image it copies.
    pub(crate) fn image(&self) -> &Path {
        &self.image
    }

    /// Copies `image` into new memory.
    fn copy(image: &Path) -> Result<HeldMemory, String> {
        let what = |e: std::io::Error| format!("{}: {e}", image.display());
        let mut from = File::open(image).map_err(what)?;
        let bytes = from.metadata().map_err(what)?.len();
        // SAFETY: the name is a NUL-terminated string.
        let fd = unsafe { libc::memfd_create(c"dwcp-warm".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: the descriptor is new, and the File its only owner.
        let mut memory = unsafe { File::from_raw_fd(fd) };
        let copied = std::io::copy(&mut from, &mut memory).map_err(what)?;
        if copied != bytes {
            return Err(format!(
                "{}: copied {copied} of {bytes} bytes",
                image.display()
            ));
        }
        Ok(HeldMemory {
            image: image.to_owned(),
            memory,
            bytes,
        })
    }
}

impl WarmImages {
    /// Images under `data_dir`; copies of them held in memory up to
    /// `budget` bytes.
    pub(crate) fn new(data_dir: &Path, budget: u64) -> WarmImages {
        WarmImages {
            dir: data_dir.join("warm"),
            building: Mutex::new(()),
            held: Mutex::new(HashMap::new()),
            budget,
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

    /// Builds the image of checkpoint `id` of `vm` on a thread of its own
    /// (a migration that comes before it is done does without); with
    /// `hold` (a replica: its VM may come here), a copy of it is then held
    /// in memory if there is room.
    pub(crate) fn build_in_background(
        self: &Arc<Self>,
        store: Arc<PageStore>,
        (vm, id): (String, String),
        hold: bool,
    ) {
        let me = self.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            match me.build(&store, &id) {
                Ok((path, n)) => {
                    tracing::info!(checkpoint = %id, pages = n, secs = t.elapsed().as_secs_f64(), image = %path.display(), "checkpoint's memory laid out for a migration");
                    if hold {
                        me.hold(&vm, &path);
                    }
                }
                Err(e) => {
                    tracing::warn!(checkpoint = %id, "cannot lay out the checkpoint's memory (a migration will do without): {e}")
                }
            }
        });
    }

    /// After a restart (held copies live in this process's memory and
    /// went with the last one): holds again the newest replica of each VM
    /// in `replicas` (checkpoint manifests from the store, a VM's newest
    /// last), laying its image out first where it is missing. The newest
    /// replicas come first, while there is room. One thread, one VM after
    /// another.
    pub(crate) fn restore(
        self: &Arc<Self>,
        store: Arc<PageStore>,
        replicas: Vec<dwcp_hde::Manifest>,
    ) {
        let mut newest: HashMap<&str, &dwcp_hde::Manifest> = HashMap::new();
        for m in &replicas {
            newest.insert(&m.vm, m);
        }
        let mut newest: Vec<_> = newest.into_values().collect();
        newest.sort_by_key(|m| std::cmp::Reverse(m.created_unix_ms));
        let wanted: Vec<(String, String, u64)> = newest
            .into_iter()
            .filter(|m| m.origin.is_some())
            .filter_map(|m| {
                let block = main_block(&m.blocks)?;
                let size = m.blocks[block as usize].length_bytes;
                Some((m.vm.clone(), m.id.clone(), size))
            })
            .collect();
        if wanted.is_empty() || self.budget == 0 {
            return;
        }
        let me = self.clone();
        std::thread::spawn(move || {
            for (vm, id, size) in wanted {
                let image = match me.find(&vm, &id, size) {
                    Some(path) => path,
                    None => match me.build(&store, &id) {
                        Ok((path, _)) => path,
                        Err(e) => {
                            tracing::warn!(checkpoint = %id, "cannot lay out the replica's memory again: {e}");
                            continue;
                        }
                    },
                };
                me.hold(&vm, &image);
            }
        });
    }

    /// Holds a copy of `image` (of VM `vm`) in memory, in place of the
    /// VM's older one, if the budget and the host's free memory allow.
    pub(crate) fn hold(&self, vm: &str, image: &Path) {
        let _one = self.building.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(bytes) = std::fs::metadata(image).map(|m| m.len()) else {
            return;
        };
        let others = {
            let mut held = lock(&self.held);
            held.remove(vm);
            total(&held)
        };
        let (available, reserve) = (host_memory_available_bytes(), reserve());
        if others + bytes > self.budget || available < bytes + reserve {
            tracing::info!(
                vm,
                bytes,
                held = others,
                budget = self.budget,
                available,
                "no room to hold the replica's memory (a migration here maps it from disk)"
            );
            return;
        }
        let t = std::time::Instant::now();
        match HeldMemory::copy(image) {
            Ok(h) => {
                tracing::info!(
                    vm,
                    bytes,
                    secs = t.elapsed().as_secs_f64(),
                    "replica's memory held for a migration here"
                );
                lock(&self.held).insert(vm.to_owned(), h);
            }
            Err(e) => tracing::warn!(vm, "cannot hold the replica's memory: {e}"),
        }
    }

    /// [`WarmImages::hold`] on a thread of its own.
    pub(crate) fn hold_in_background(self: &Arc<Self>, vm: String, image: PathBuf) {
        let me = self.clone();
        std::thread::spawn(move || me.hold(&vm, &image));
    }

    /// Bytes held in memory now.
    pub(crate) fn held_bytes(&self) -> u64 {
        total(&lock(&self.held))
    }

    /// Bytes that may be held.
    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }

    /// The held copy of `image` of VM `vm`, if there is one: it is the
    /// caller's now (for one QEMU).
    pub(crate) fn take(&self, vm: &str, image: &Path) -> Option<HeldMemory> {
        let mut held = lock(&self.held);
        if held.get(vm)?.image != image {
            return None;
        }
        held.remove(vm)
    }

    /// Gives up held copies until the host has `bytes` more to give than
    /// its reserve, or none is left.
    pub(crate) fn make_room(&self, bytes: u64) {
        let reserve = reserve();
        let mut held = lock(&self.held);
        while host_memory_available_bytes() < bytes + reserve {
            let Some(vm) = held.keys().next().cloned() else {
                return;
            };
            tracing::info!(
                vm,
                "giving up the replica's memory held here: a VM needs it"
            );
            held.remove(&vm);
        }
    }

    /// Removes the image of checkpoint `id` of `vm`, if there is one, and
    /// its copy in memory.
    pub(crate) fn forget(&self, vm: &str, id: &str) {
        let f = self.file(vm, id);
        drop(self.take(vm, &f));
        let _ = std::fs::remove_file(f);
    }
}

/// Host memory that held copies always leave available: an eighth.
fn reserve() -> u64 {
    host_memory_bytes() / 8
}

/// Bytes of the held copies in `held`.
fn total(held: &HashMap<String, HeldMemory>) -> u64 {
    held.values().map(|h| h.bytes).sum()
}

/// The index of the main memory among a checkpoint's blocks: the block an
/// image holds.
pub(crate) fn main_block(blocks: &[dwcp_hde::BlockInfo]) -> Option<u16> {
    blocks
        .iter()
        .position(|b| b.name == MAIN_RAM_BLOCK)
        .map(|i| i as u16)
}
