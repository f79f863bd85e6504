//! Rebuilding a migration stream from a checkpoint.

use dwcp_vmstream::{ram_section_end, ram_section_header, write_page, PageData, SectionKind};

use crate::codec::{self, ObjectHead};
use crate::objects::{Fetch, ObjectReader, SnapshotReader, INDEX, PACKS};
use crate::store::{read_page_map, PageProblem};
use crate::{Digest, HdeError, Manifest, PageMap, PageStore};

/// A checkpoint as the stream QEMU takes with `-incoming`: its prologue,
/// one END section holding every page, and its device state. Each page is
/// checked against its digest as it is read; the stream stops with an
/// error naming the first page that is missing or corrupt.
///
/// It reads from one snapshot of the store, so a delete or garbage
/// collection running meanwhile changes nothing for it.
pub struct RestoreStream {
    manifest: Manifest,
    map: PageMap,
    objects: SnapshotReader,
    prologue: Vec<u8>,
    tail: Vec<u8>,
    stage: Stage,
    bytes_out: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Head,
    Pages { block: usize, page: usize },
    Tail,
    Done,
}

impl PageStore {
    /// Opens checkpoint `id` for restoring. Everything it needs is checked
    /// to be present first (pages, their delta bases, blobs), so a restore
    /// that cannot succeed is refused before anything is started.
    pub fn restore_stream(&self, id: &str) -> Result<RestoreStream, HdeError> {
        let tx = self.db()?.begin_read()?;
        let (manifest, map) = read_page_map(&tx, id)?;
        let mut objects = ObjectReader::new(tx.open_table(INDEX)?, tx.open_table(PACKS)?);
        let mut blob = |what: &'static str, d: &Digest| {
            objects.blob(d).map_err(|problem| HdeError::CorruptBlob {
                checkpoint: id.to_string(),
                what,
                problem,
            })
        };
        let mut prologue = blob("the stream prologue", &manifest.prologue)?;
        prologue.extend_from_slice(&blob("the commands between sections", &manifest.middle)?);
        prologue.extend_from_slice(&ram_section_header(
            SectionKind::End,
            manifest.ram_section_id,
        ));
        let tail = blob("the device state", &manifest.tail)?;
        let zero = Digest::zero_page();
        for (b, p, d) in map.iter() {
            if *d == zero {
                continue;
            }
            let mut at = *d;
            for _ in 0..=codec::MAX_DELTA_DEPTH {
                let head = match objects.get(&at)? {
                    Ok(v) => codec::head(&v),
                    Err(Fetch::Broken(problem)) => {
                        return Err(HdeError::CorruptPage {
                            checkpoint: id.to_string(),
                            digest: *d,
                            location: manifest.location(b, p),
                            problem,
                        })
                    }
                    Err(Fetch::Missing) => {
                        return Err(HdeError::MissingPage {
                            checkpoint: id.to_string(),
                            digest: *d,
                            location: manifest.location(b, p),
                        })
                    }
                };
                match head {
                    Ok(ObjectHead::Delta { base, .. }) if base != zero => at = base,
                    Ok(_) => break,
                    Err(problem) => {
                        return Err(HdeError::CorruptPage {
                            checkpoint: id.to_string(),
                            digest: *d,
                            location: manifest.location(b, p),
                            problem,
                        })
                    }
                }
            }
        }
        Ok(RestoreStream {
            manifest,
            map,
            objects,
            prologue,
            tail,
            stage: Stage::Head,
            bytes_out: 0,
        })
    }
}

impl RestoreStream {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Bytes handed out so far.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    /// The next piece of the stream (about `max_bytes`), `None` at the end.
    pub fn next_chunk(&mut self, max_bytes: usize) -> Result<Option<Vec<u8>>, HdeError> {
        let mut out = Vec::with_capacity(max_bytes + 8192);
        loop {
            match self.stage {
                Stage::Head => {
                    out.extend_from_slice(&self.prologue);
                    self.stage = Stage::Pages { block: 0, page: 0 };
                }
                Stage::Pages { block, page } => {
                    let Some(d) = self.map.get(block, page).copied() else {
                        self.stage = if self.map.get(block + 1, 0).is_some() {
                            Stage::Pages {
                                block: block + 1,
                                page: 0,
                            }
                        } else {
                            out.extend_from_slice(&ram_section_end(self.manifest.ram_section_id));
                            Stage::Tail
                        };
                        continue;
                    };
                    let data = if d == Digest::zero_page() {
                        PageData::Fill(0)
                    } else {
                        match self.objects.page(&d) {
                            Ok(p) => PageData::Full(p),
                            Err(problem) => return Err(self.page_error(block, page, d, problem)),
                        }
                    };
                    let name = (page == 0).then(|| self.manifest.blocks[block].name.as_str());
                    write_page(
                        &mut out,
                        (page * dwcp_vmstream::PAGE_SIZE) as u64,
                        name,
                        &data,
                    );
                    self.stage = Stage::Pages {
                        block,
                        page: page + 1,
                    };
                }
                Stage::Tail => {
                    out.extend_from_slice(&self.tail);
                    self.stage = Stage::Done;
                }
                Stage::Done => break,
            }
            if out.len() >= max_bytes {
                break;
            }
        }
        self.bytes_out += out.len() as u64;
        Ok((!out.is_empty()).then_some(out))
    }

    fn page_error(&self, block: usize, page: usize, digest: Digest, p: PageProblem) -> HdeError {
        let checkpoint = self.manifest.id.clone();
        let location = self.manifest.location(block, page);
        match p {
            PageProblem::Missing => HdeError::MissingPage {
                checkpoint,
                digest,
                location,
            },
            PageProblem::Corrupt(problem) => HdeError::CorruptPage {
                checkpoint,
                digest,
                location,
                problem,
            },
            PageProblem::Store(e) => e,
        }
    }
}
