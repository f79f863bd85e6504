//! The agent's embedded store (redb): what VMs exist, what state each
//! should be in, and the QEMU process each runs in. Every change is one
//! committed transaction, so a crash leaves either the old or the new record.

use std::path::{Path, PathBuf};

use dwcp_api::{VmSpec, VmState};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store {path} is in use by another agent")]
    Locked { path: PathBuf },
    #[error("cannot open the store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("store operation failed: {0}")]
    Db(String),
    #[error("record of VM {name} is unreadable")]
    Decode {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The QEMU process a VM runs in.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Runtime {
    pub pid: u32,
    pub accel: String,
    pub started_unix_ms: u64,
}

/// Everything the agent keeps about one VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub created_unix: u64,
    /// What the agent keeps the VM at: running, paused or stopped.
    pub desired: VmState,
    pub state: VmState,
    pub runtime: Option<Runtime>,
    pub last_error: Option<String>,
    /// Set while the VM is the destination of a migration that has not
    /// switched over: such a VM is removed if the agent restarts.
    #[serde(default)]
    pub incoming: bool,
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_owned(),
            },
            source => StoreError::Open {
                path: path.to_owned(),
                source,
            },
        })?;
        let tx = db.begin_write()?;
        tx.open_table(VMS)?;
        tx.commit()?;
        Ok(Store { db })
    }

    pub fn put(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|e| StoreError::Db(e.to_string()))?;
        let tx = self.db.begin_write()?;
        tx.open_table(VMS)?
            .insert(rec.spec.name.as_str(), bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(VMS)?.remove(name)?;
        tx.commit()?;
        Ok(())
    }

    pub fn all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VMS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let rec = serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                name: k.value().to_owned(),
                source,
            })?;
            out.push(rec);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VmRecord {
        VmRecord {
            spec: VmSpec {
                name: name.into(),
                vcpus: 1,
                memory_bytes: 64 << 20,
                kernel: Some("/k".into()),
                initrd: None,
                append: None,
                disk: None,
                labels: Default::default(),
            },
            created_unix: 1,
            desired: VmState::Running,
            state: VmState::Running,
            runtime: Some(Runtime {
                pid: 42,
                accel: "tcg".into(),
                started_unix_ms: 5,
            }),
            last_error: None,
            incoming: false,
        }
    }

    #[test]
    fn records_survive_reopen_and_second_opener_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.redb");
        {
            let store = Store::open(&path).expect("open");
            store.put(&record("a")).expect("put");
            store.put(&record("b")).expect("put");
            store.delete("a").expect("delete");
            assert!(matches!(Store::open(&path), Err(StoreError::Locked { .. })));
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.all().expect("all"), vec![record("b")]);
    }
}
