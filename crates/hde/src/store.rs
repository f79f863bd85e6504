//! The page store: objects, manifests and page maps in one redb database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;

use crate::codec::{self, ObjectHead, Page};
use crate::objects::{sweep, ObjectReader, INDEX, PACKS};
use crate::{Digest, HdeError, Manifest, PageMap};

/// Checkpoint id -> manifest (JSON).
pub(crate) const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// Checkpoint id -> its page map's changes against its parent's.
pub(crate) const PAGEMAPS: TableDefinition<&str, &[u8]> = TableDefinition::new("pagemaps");
/// VM name -> number of its last checkpoint (ids are never reused), and
/// [`NEXT_PACK`] -> the next pack id.
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Digests of pages found missing or corrupt by `verify`: the next
/// checkpoint that meets them stores them again even where its parent
/// names the same page.
pub(crate) const LOST: TableDefinition<&[u8], u8> = TableDefinition::new("lost");
/// Key of the pack counter (no VM name can contain `#`).
pub(crate) const NEXT_PACK: &str = "#pack";

/// Largest blob read back (device state and the VM description).
pub(crate) const MAX_BLOB_BYTES: usize = 256 << 20;

/// The content-addressed store. See the crate docs.
pub struct PageStore {
    /// `None` after a failed reopen; see [`PageStore::recover`].
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
    level: i32,
    /// Held by whoever adds or removes objects: one checkpoint writer, a
    /// delete, or garbage collection. Readers use redb snapshots.
    pub(crate) writer: Mutex<()>,
}

/// Why a page could not be read.
#[derive(Debug)]
pub(crate) enum PageProblem {
    Missing,
    Corrupt(String),
    Store(HdeError),
}

impl From<redb::StorageError> for PageProblem {
    fn from(e: redb::StorageError) -> Self {
        PageProblem::Store(e.into())
    }
}

/// How much the store holds.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StoreUsage {
    pub checkpoints: u64,
    pub objects: u64,
    /// Bytes of stored objects (after compression).
    pub object_bytes: u64,
    /// Size of the database file.
    pub file_bytes: u64,
}

/// The outcome of [`PageStore::verify`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub objects_checked: u64,
    pub bytes_checked: u64,
    /// Objects whose content does not match their digest.
    pub corrupt_objects: Vec<String>,
    pub checkpoints: Vec<Health>,
    /// Corrupt objects dropped from the index.
    pub dropped_objects: u64,
    #[serde(skip)]
    corrupt: HashSet<Digest>,
    #[serde(skip)]
    missing: HashSet<Digest>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.corrupt_objects.is_empty() && self.checkpoints.iter().all(|c| c.problems.is_empty())
    }
}

/// One checkpoint's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    pub id: String,
    /// At most [`MAX_PROBLEMS`] messages, each naming a page or part.
    pub problems: Vec<String>,
    /// Problems beyond those listed.
    pub more_problems: u64,
}

pub const MAX_PROBLEMS: usize = 20;

/// What a garbage collection removed.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    pub objects_removed: u64,
    pub bytes_removed: u64,
}

impl PageStore {
    /// Opens (or creates) the store at `path`, compressing new pages at
    /// zstd `level`.
    pub fn open(path: &Path, level: i32) -> Result<PageStore, HdeError> {
        let db = open_db(path)?;
        let tx = db.begin_write()?;
        tx.open_table(INDEX)?;
        tx.open_table(PACKS)?;
        tx.open_table(LOST)?;
        tx.open_table(MANIFESTS)?;
        tx.open_table(PAGEMAPS)?;
        tx.open_table(COUNTERS)?;
        tx.commit()?;
        Ok(PageStore {
            db: RwLock::new(Some(Arc::new(db))),
            path: path.to_path_buf(),
            level,
            writer: Mutex::new(()),
        })
    }

    pub(crate) fn db(&self) -> Result<Arc<Database>, HdeError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| HdeError::Unavailable(self.path.display().to_string()))
    }

    /// After an I/O error (a full disk, say) redb refuses all further
    /// work until the database is opened again. This checks with an empty
    /// commit and reopens when needed; true when it reopened. Call it when
    /// an operation failed; it does nothing while another operation still
    /// holds the database.
    pub fn recover(&self) -> Result<bool, HdeError> {
        let _w = self.lock_writer();
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.as_ref() {
            let healthy = db.begin_write().map_err(HdeError::from).and_then(|tx| {
                tx.commit()?;
                Ok(())
            });
            match healthy {
                Ok(()) => return Ok(false),
                Err(e) => tracing::warn!("page store failed ({e}); reopening it"),
            }
            if Arc::strong_count(db) > 1 {
                return Ok(false);
            }
        }
        *slot = None;
        let db = open_db(&self.path)?;
        *slot = Some(Arc::new(db));
        drop(slot);
        tracing::info!(path = %self.path.display(), "page store reopened");
        // What the failed operation could not clean up itself.
        self.collect_garbage_locked()?;
        Ok(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All checkpoints, oldest first.
    pub fn list(&self) -> Result<Vec<Manifest>, HdeError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(MANIFESTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(parse_manifest(k.value(), v.value())?);
        }
        out.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(out)
    }

    pub fn manifest(&self, id: &str) -> Result<Manifest, HdeError> {
        let tx = self.db()?.begin_read()?;
        let t = tx.open_table(MANIFESTS)?;
        let v = t
            .get(id)?
            .ok_or_else(|| HdeError::NoSuchCheckpoint(id.to_string()))?;
        parse_manifest(id, v.value())
    }

    /// The newest checkpoint of `vm`, if any.
    pub fn latest_for(&self, vm: &str) -> Result<Option<Manifest>, HdeError> {
        Ok(self.list()?.into_iter().rev().find(|m| m.vm == vm))
    }

    /// The full page map of a checkpoint.
    pub fn page_map(&self, id: &str) -> Result<(Manifest, PageMap), HdeError> {
        let tx = self.db()?.begin_read()?;
        read_page_map(&tx, id)
    }

    /// How much the store holds.
    pub fn usage(&self) -> Result<StoreUsage, HdeError> {
        let tx = self.db()?.begin_read()?;
        let packs = tx.open_table(PACKS)?;
        Ok(StoreUsage {
            checkpoints: tx.open_table(MANIFESTS)?.len()?,
            objects: tx.open_table(INDEX)?.len()?,
            object_bytes: packs.stats()?.stored_bytes(),
            file_bytes: std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0),
        })
    }

    /// Deletes a checkpoint. Its children keep working: its page map
    /// changes are folded into theirs. Then collects garbage.
    pub fn delete(&self, id: &str) -> Result<GcReport, HdeError> {
        let _w = self.lock_writer();
        let tx = self.db()?.begin_write()?;
        {
            let mut manifests = tx.open_table(MANIFESTS)?;
            let mut maps = tx.open_table(PAGEMAPS)?;
            let gone = match manifests.get(id)? {
                Some(v) => parse_manifest(id, v.value())?,
                None => return Err(HdeError::NoSuchCheckpoint(id.to_string())),
            };
            let gone_changes = maps
                .get(id)?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            let mut children = Vec::new();
            for row in manifests.iter()? {
                let (k, v) = row?;
                let m = parse_manifest(k.value(), v.value())?;
                if m.parent.as_deref() == Some(id) {
                    children.push(m);
                }
            }
            for mut child in children {
                let own = maps
                    .get(child.id.as_str())?
                    .map(|v| v.value().to_vec())
                    .unwrap_or_default();
                let merged = merge_changes(&gone_changes, &own);
                child.parent = gone.parent.clone();
                child.chain_depth = gone.chain_depth;
                let json = serde_json::to_vec(&child).map_err(|e| HdeError::CorruptManifest {
                    checkpoint: child.id.clone(),
                    problem: e.to_string(),
                })?;
                manifests.insert(child.id.as_str(), json.as_slice())?;
                maps.insert(child.id.as_str(), merged.as_slice())?;
            }
            manifests.remove(id)?;
            maps.remove(id)?;
        }
        tx.commit()?;
        self.collect_garbage_locked()
    }

    /// Removes every object no checkpoint needs (left by an interrupted
    /// checkpoint, or freed by a delete).
    pub fn collect_garbage(&self) -> Result<GcReport, HdeError> {
        let _w = self.lock_writer();
        self.collect_garbage_locked()
    }

    fn collect_garbage_locked(&self) -> Result<GcReport, HdeError> {
        let db = self.db()?;
        let tx = db.begin_write()?;
        let report = {
            let mut marked: HashSet<Digest> = HashSet::new();
            for row in tx.open_table(MANIFESTS)?.iter()? {
                let (k, v) = row?;
                let m = parse_manifest(k.value(), v.value())?;
                marked.extend([m.prologue, m.middle, m.tail]);
            }
            for row in tx.open_table(PAGEMAPS)?.iter()? {
                let (_, v) = row?;
                marked.extend(PageMap::digests_in(v.value()));
            }
            let mut index = tx.open_table(INDEX)?;
            let mut packs = tx.open_table(PACKS)?;
            let mut counters = tx.open_table(COUNTERS)?;
            let mut next_pack = counters.get(NEXT_PACK)?.map(|v| v.value()).unwrap_or(0);
            {
                // Delta bases are needed as long as their deltas are (read
                // from a snapshot: nothing has changed yet).
                let snap = db.begin_read()?;
                let mut reader =
                    ObjectReader::new(snap.open_table(INDEX)?, snap.open_table(PACKS)?);
                let mut work: Vec<Digest> = marked.iter().copied().collect();
                while let Some(d) = work.pop() {
                    if let Ok(bytes) = reader.get(&d)? {
                        if let Ok(ObjectHead::Delta { base, .. }) = codec::head(&bytes) {
                            if marked.insert(base) {
                                work.push(base);
                            }
                        }
                    }
                }
            }
            let report = sweep(
                &mut index,
                &mut packs,
                &mut next_pack,
                &|d| marked.contains(d),
                None,
            )?;
            counters.insert(NEXT_PACK, next_pack)?;
            report
        };
        tx.commit()?;
        if report.objects_removed > 0 || report.bytes_removed > 0 {
            tracing::info!(
                objects = report.objects_removed,
                bytes = report.bytes_removed,
                "page store: garbage collected"
            );
        }
        Ok(report)
    }

    /// Re-hashes stored objects and checks that checkpoints have all they
    /// need: every object when `only` is `None`, else what checkpoint
    /// `only` uses.
    ///
    /// A corrupt object is then dropped from the index: it can never be
    /// read correctly again, and without it the next checkpoint that
    /// meets the same page stores it afresh instead of pointing at the
    /// broken copy. Checkpoints that used it stay broken (and say so).
    pub fn verify(&self, only: Option<&str>) -> Result<VerifyReport, HdeError> {
        let mut report = self.verify_snapshot(only)?;
        if !report.corrupt.is_empty() || !report.missing.is_empty() {
            let _w = self.lock_writer();
            let tx = self.db()?.begin_write()?;
            {
                let mut index = tx.open_table(INDEX)?;
                let mut lost = tx.open_table(LOST)?;
                for d in &report.corrupt {
                    if index.remove(&d.0[..])?.is_some() {
                        report.dropped_objects += 1;
                    }
                    lost.insert(&d.0[..], 0)?;
                }
                for d in &report.missing {
                    lost.insert(&d.0[..], 0)?;
                }
            }
            tx.commit()?;
            tracing::warn!(
                dropped = report.dropped_objects,
                missing = report.missing.len(),
                "page store: corrupt objects dropped, lost pages noted for the next checkpoint"
            );
        }
        Ok(report)
    }

    fn verify_snapshot(&self, only: Option<&str>) -> Result<VerifyReport, HdeError> {
        let tx = self.db()?.begin_read()?;
        let index = tx.open_table(INDEX)?;
        let mut reader = ObjectReader::new(tx.open_table(INDEX)?, tx.open_table(PACKS)?);
        let mut report = VerifyReport::default();
        // Digest -> problem (None when fine), so shared pages are checked once.
        let mut checked: HashMap<Digest, Option<String>> = HashMap::new();
        let ids: Vec<String> = match only {
            Some(id) => {
                self.manifest(id)?;
                vec![id.to_string()]
            }
            None => self.list()?.into_iter().map(|m| m.id).collect(),
        };
        if only.is_none() {
            for row in index.iter()? {
                let (k, _) = row?;
                report.objects_checked += 1;
                let d = digest_from(k.value());
                let problem = match reader.get(&d)? {
                    Err(crate::objects::Fetch::Missing) => Some("missing".to_string()),
                    Err(crate::objects::Fetch::Broken(s)) => Some(s),
                    Ok(bytes) => {
                        report.bytes_checked += bytes.len() as u64;
                        match codec::head(&bytes) {
                            Ok(ObjectHead::Blob) => reader.blob(&d).err(),
                            _ => match reader.page(&d) {
                                Ok(_) => None,
                                Err(PageProblem::Store(e)) => return Err(e),
                                Err(p) => Some(describe(p)),
                            },
                        }
                    }
                };
                if problem.is_some() {
                    report.corrupt.insert(d);
                }
                if let Some(p) = &problem {
                    report.corrupt_objects.push(format!("object {d}: {p}"));
                }
                checked.insert(d, problem);
            }
        }
        for id in ids {
            let mut health = Health {
                id: id.clone(),
                problems: Vec::new(),
                more_problems: 0,
            };
            let note = |h: &mut Health, msg: String| {
                if h.problems.len() < MAX_PROBLEMS {
                    h.problems.push(msg);
                } else {
                    h.more_problems += 1;
                }
            };
            match read_page_map(&tx, &id) {
                Err(e) => note(&mut health, e.to_string()),
                Ok((m, map)) => {
                    for (what, d) in [
                        ("prologue", m.prologue),
                        ("middle", m.middle),
                        ("device state", m.tail),
                    ] {
                        if let Err(p) = reader.blob(&d) {
                            note(&mut health, format!("{what}: {p}"));
                        }
                    }
                    for (b, p, d) in map.iter() {
                        if *d == Digest::zero_page() {
                            continue;
                        }
                        let problem = match checked.get(d) {
                            Some(p) => p.clone(),
                            None => {
                                let p = match reader.page(d) {
                                    Ok(_) => None,
                                    Err(PageProblem::Store(e)) => return Err(e),
                                    Err(PageProblem::Missing) => {
                                        report.missing.insert(*d);
                                        Some("missing".to_string())
                                    }
                                    Err(p) => {
                                        report.corrupt.insert(*d);
                                        Some(describe(p))
                                    }
                                };
                                report.objects_checked += 1;
                                checked.insert(*d, p.clone());
                                p
                            }
                        };
                        if let Some(problem) = problem {
                            let at = m.location(b, p);
                            note(&mut health, format!("page {d} ({at}): {problem}"));
                        }
                    }
                }
            }
            report.checkpoints.push(health);
        }
        Ok(report)
    }

    /// The newest checkpoint of a VM named `vm` (taken here or replicated
    /// from elsewhere) and its distinct non-zero page digests (see
    /// [`PageMap::distinct_pages`]): what a migration of that VM to this
    /// node need not send.
    pub fn latest_pages_of(&self, vm: &str) -> Result<Option<(Manifest, Vec<Digest>)>, HdeError> {
        let Some(m) = self.latest_for(vm)? else {
            return Ok(None);
        };
        let (_, map) = self.page_map(&m.id)?;
        Ok(Some((m, map.distinct_pages())))
    }

    /// Allocates the next checkpoint id of `vm` (`VM@N`).
    pub(crate) fn next_id(&self, vm: &str) -> Result<String, HdeError> {
        let tx = self.db()?.begin_write()?;
        let n = {
            let mut t = tx.open_table(COUNTERS)?;
            let n = t.get(vm)?.map(|v| v.value()).unwrap_or(0) + 1;
            t.insert(vm, n)?;
            n
        };
        tx.commit()?;
        Ok(format!("{vm}@{n}"))
    }

    /// A reader of pages on a snapshot of the store (one transaction for
    /// many reads, with the pack cache).
    pub fn snapshot(&self) -> Result<PageReader, HdeError> {
        let tx = self.db()?.begin_read()?;
        Ok(PageReader {
            reader: std::sync::Mutex::new(ObjectReader::new(
                tx.open_table(INDEX)?,
                tx.open_table(PACKS)?,
            )),
        })
    }

    /// Reads one stored page by digest, checked (for tests and tools).
    pub fn read_page(&self, digest: &Digest) -> Result<Option<Box<Page>>, HdeError> {
        let tx = self.db()?.begin_read()?;
        let mut reader = ObjectReader::new(tx.open_table(INDEX)?, tx.open_table(PACKS)?);
        match reader.page(digest) {
            Ok(p) => Ok(Some(p)),
            Err(PageProblem::Missing) => Ok(None),
            Err(PageProblem::Corrupt(s)) => Err(HdeError::Stream(format!("page {digest}: {s}"))),
            Err(PageProblem::Store(e)) => Err(e),
        }
    }
}

fn open_db(path: &Path) -> Result<Database, HdeError> {
    Database::create(path).map_err(|source| HdeError::Open {
        path: path.display().to_string(),
        source: Box::new(source),
    })
}

/// Pages read from one snapshot of the store (see [`PageStore::snapshot`]).
pub struct PageReader {
    reader: std::sync::Mutex<crate::objects::SnapshotReader>,
}

impl PageReader {
    /// A page by digest, checked; `None` when the store does not hold it.
    pub fn page(&self, d: &Digest) -> Result<Option<Box<Page>>, HdeError> {
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        match r.page(d) {
            Ok(p) => Ok(Some(p)),
            Err(PageProblem::Missing) => Ok(None),
            Err(PageProblem::Corrupt(s)) => Err(HdeError::Stream(format!("page {d}: {s}"))),
            Err(PageProblem::Store(e)) => Err(e),
        }
    }
}

pub(crate) fn describe(p: PageProblem) -> String {
    match p {
        PageProblem::Missing => "missing".into(),
        PageProblem::Corrupt(s) => format!("corrupt: {s}"),
        PageProblem::Store(e) => format!("unreadable: {e}"),
    }
}

pub(crate) fn digest_from(key: &[u8]) -> Digest {
    let mut d = [0u8; 32];
    let n = key.len().min(32);
    d[..n].copy_from_slice(&key[..n]);
    Digest(d)
}

pub(crate) fn parse_manifest(id: &str, bytes: &[u8]) -> Result<Manifest, HdeError> {
    serde_json::from_slice(bytes).map_err(|e| HdeError::CorruptManifest {
        checkpoint: id.to_string(),
        problem: e.to_string(),
    })
}

/// Builds a checkpoint's page map from its chain of changes.
pub(crate) fn read_page_map(
    tx: &redb::ReadTransaction,
    id: &str,
) -> Result<(Manifest, PageMap), HdeError> {
    let manifests = tx.open_table(MANIFESTS)?;
    let maps = tx.open_table(PAGEMAPS)?;
    let load = |id: &str| -> Result<Manifest, HdeError> {
        let v = manifests
            .get(id)?
            .ok_or_else(|| HdeError::NoSuchCheckpoint(id.to_string()))?;
        parse_manifest(id, v.value())
    };
    let top = load(id)?;
    let mut chain = vec![top.clone()];
    while let Some(p) = chain.last().and_then(|m| m.parent.clone()) {
        if chain.len() > 1 + top.chain_depth as usize || chain.iter().any(|m| m.id == p) {
            return Err(HdeError::CorruptManifest {
                checkpoint: id.to_string(),
                problem: "its chain of parents loops or is longer than recorded".into(),
            });
        }
        chain.push(load(&p)?);
    }
    let mut map = PageMap::new(&top.blocks);
    for m in chain.iter().rev() {
        let changes = maps
            .get(m.id.as_str())?
            .ok_or_else(|| HdeError::CorruptManifest {
                checkpoint: m.id.clone(),
                problem: "its page map is missing".into(),
            })?;
        map.apply(changes.value())
            .map_err(|problem| HdeError::CorruptManifest {
                checkpoint: m.id.clone(),
                problem,
            })?;
    }
    Ok((top, map))
}

/// `older` then `newer`, as one list of changes.
fn merge_changes(older: &[u8], newer: &[u8]) -> Vec<u8> {
    let mut m: BTreeMap<[u8; 6], [u8; 32]> = BTreeMap::new();
    for e in older.chunks_exact(38).chain(newer.chunks_exact(38)) {
        let mut k = [0u8; 6];
        k.copy_from_slice(&e[..6]);
        let mut d = [0u8; 32];
        d.copy_from_slice(&e[6..]);
        m.insert(k, d);
    }
    let mut out = Vec::with_capacity(m.len() * 38);
    for (k, d) in m {
        out.extend_from_slice(&k);
        out.extend_from_slice(&d);
    }
    out
}
