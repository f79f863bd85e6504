//! Footprints: what both sides of a migration held when it ended, kept for
//! the next migration between the same two nodes, whichever VM it moves
//! and in either direction.
//!
//! Both codecs of a migration keep the same pages (the version of each
//! page last sent, see [`dwcp_hde::wire::CACHE_PAGES`]). When a migration
//! succeeds, each side writes those of the main memory to a file at their
//! places, with an index of their digests (the source knows them; the
//! destination hashes its pages). A later migration's destination offers
//! its newest footprint with the source by id and the digest of its index;
//! a source holding the same one numbers the footprint's pages the same
//! way, sends pages found in it as references, and pages that changed
//! a little as deltas against the footprint's page at the same place: two
//! VMs from one image share most of their memory.
//!
//! One footprint per peer, replaced by the next; written to a temporary
//! name and renamed (the index last): one found is whole. A reader holds
//! its files open, so replacing them does not disturb it. Footprints are
//! not flushed to disk (a second for a 1 GiB guest, while the next
//! migration waits): what the kernel holds survives the agent, and those
//! written before the machine last booted are removed when the agent
//! starts. A page that still reads wrong fails the migration's check and
//! the migration with it, never the guest.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dwcp_hde::{Digest, HeldPages, MemoryImage};

pub(crate) struct Footprints {
    dir: PathBuf,
    /// Peers whose footprint is being written (waited for: a migration
    /// that follows another at once is the case footprints are for).
    building: Mutex<HashSet<String>>,
    built: Condvar,
}

/// A footprint opened for a migration.
pub(crate) struct Footprint {
    pub(crate) id: String,
    /// Digest of its index: both sides compare theirs.
    pub(crate) digest: Digest,
    /// The RAM block it holds pages of (its index in the stream).
    pub(crate) block: u16,
    pub(crate) index: Vec<(u64, Digest)>,
    pub(crate) image: MemoryImage,
}

impl Footprint {
    /// Its distinct pages, in the order both sides number them.
    pub(crate) fn pages(&self) -> Vec<Digest> {
        dwcp_hde::index_pages(&self.index)
    }
}

/// How long a migration waits for a footprint being written.
const WAIT: Duration = Duration::from_secs(20);

impl Footprints {
    pub(crate) fn new(data_dir: &std::path::Path) -> Footprints {
        let dir = data_dir.join("footprints");
        // Left over from a build cut short, or possibly lost in part with
        // the kernel's unwritten pages.
        let boot = booted_at();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let before_boot = match (f.metadata().and_then(|m| m.modified()), boot) {
                    (Ok(m), Some(b)) => m < b,
                    _ => true,
                };
                if before_boot || f.path().extension().is_some_and(|x| x == "tmp") {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        Footprints {
            dir,
            building: Mutex::new(HashSet::new()),
            built: Condvar::new(),
        }
    }

    fn peer_dir(&self, peer: &str) -> PathBuf {
        let h = Digest::of(peer.as_bytes()).to_string();
        self.dir.join(&h[..16])
    }

    /// Keeps `held` (pages of block `block`, `length` bytes long) as the
    /// footprint of migration `id` with `peer`, written on a thread of its
    /// own; it replaces the peer's older one.
    pub(crate) fn keep(
        self: &Arc<Self>,
        peer: &str,
        id: &str,
        (block, length): (u16, u64),
        held: HeldPages,
    ) {
        if held.is_empty() {
            return;
        }
        let me = self.clone();
        let (peer, id) = (peer.to_string(), id.to_string());
        self.lock().insert(peer.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let pages = held.len();
            match me.write(&peer, &id, (block, length), held) {
                Ok(()) => {
                    tracing::info!(%peer, migration = %id, pages, secs = t.elapsed().as_secs_f64(), "footprint kept for the next migration")
                }
                Err(e) => {
                    tracing::warn!(%peer, migration = %id, "cannot keep the migration's footprint (the next one does without): {e}")
                }
            }
            me.lock().remove(&peer);
            me.built.notify_all();
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.building.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(
        &self,
        peer: &str,
        id: &str,
        (block, length): (u16, u64),
        held: HeldPages,
    ) -> Result<(), String> {
        let dir = self.peer_dir(peer);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = Digest::of(id.as_bytes()).to_string();
        let ram = dir.join(format!("{}.ram", &name[..16]));
        let idx = ram.with_extension("idx");
        let (ram_tmp, idx_tmp) = (ram.with_extension("ram.tmp"), ram.with_extension("idx.tmp"));
        let written = (|| {
            let index = held.write(length, &ram_tmp).map_err(|e| e.to_string())?;
            let mut head = Vec::with_capacity(4 + id.len());
            head.extend_from_slice(&block.to_be_bytes());
            head.extend_from_slice(&(id.len() as u16).to_be_bytes());
            head.extend_from_slice(id.as_bytes());
            head.extend_from_slice(&dwcp_hde::encode_index(&index));
            let io = |e: std::io::Error| format!("{}: {e}", idx_tmp.display());
            std::fs::write(&idx_tmp, &head).map_err(io)?;
            std::fs::rename(&ram_tmp, &ram).map_err(|e| format!("{}: {e}", ram.display()))?;
            std::fs::rename(&idx_tmp, &idx).map_err(|e| format!("{}: {e}", idx.display()))
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&ram_tmp);
            let _ = std::fs::remove_file(&idx_tmp);
            return written;
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path() != ram && e.path() != idx {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Waits (a bounded while) until no footprint with `peer` is being
    /// written.
    fn settle(&self, peer: &str) {
        let deadline = Instant::now() + WAIT;
        let mut b = self.lock();
        while b.contains(peer) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                tracing::info!(%peer, "a footprint is still being written: the migration does without");
                return;
            };
            b = self
                .built
                .wait_timeout(b, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The footprint with `peer`, once one being written is done; with
    /// `id`, only that one.
    pub(crate) fn open(&self, peer: &str, id: Option<&str>) -> Option<Footprint> {
        self.settle(peer);
        let dir = self.peer_dir(peer);
        let idx = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "idx"))?;
        let opened = (|| {
            let b = std::fs::read(&idx).map_err(|e| e.to_string())?;
            let bad = || "a footprint's index that does not parse".to_string();
            let block =
                u16::from_be_bytes(b.get(..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
            let n = u16::from_be_bytes(b.get(2..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?)
                as usize;
            let fid = std::str::from_utf8(b.get(4..4 + n).ok_or_else(bad)?).map_err(|_| bad())?;
            if id.is_some_and(|id| id != fid) {
                return Ok(None);
            }
            let rest = &b[4 + n..];
            let index = dwcp_hde::decode_index(rest).map_err(|e| e.to_string())?;
            let image = MemoryImage::from_index(&idx.with_extension("ram"), &index)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(Some(Footprint {
                id: fid.to_string(),
                digest: Digest::of(rest),
                block,
                index,
                image,
            }))
        })();
        opened
            .inspect_err(|e| tracing::warn!(%peer, file = %idx.display(), "{e}"))
            .ok()
            .flatten()
    }
}

/// When this machine booted (`btime` in `/proc/stat`).
fn booted_at() -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let secs: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}
