//! The broker: opens (or creates) a data directory, recovers its state from the log, and hands
//! out transactions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_wal::{Durability, Wal};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::lock_table::{CatalogLock, LockTable};
use crate::record::{self, KIND_COMMIT};
use crate::state::State;
use crate::transaction::Transaction;

/// How to open a broker.
#[derive(Debug, Clone)]
pub struct Options {
    /// When a commit returns: `Sync` (default) means durable against power loss.
    pub durability: Durability,
    /// How long an operation waits for a conversation group (or the catalog) locked by another
    /// transaction before failing with a lock timeout.
    pub lock_timeout: Duration,
    /// Size of the log's segment files.
    pub segment_bytes: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            durability: Durability::Sync,
            lock_timeout: Duration::from_secs(5),
            segment_bytes: herald_wal::format::SEGMENT_BYTES_DEFAULT,
        }
    }
}

/// An open data directory: the catalog, conversations and queues, persisted in one log.
/// Share it by reference between threads; each thread begins its own transactions.
pub struct Broker {
    pub(crate) wal: Wal,
    pub(crate) state: Mutex<State>,
    pub(crate) locks: LockTable,
    pub(crate) catalog_lock: CatalogLock,
    pub(crate) options: Options,
    next_tx: AtomicU64,
    dir: PathBuf,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("dir", &self.dir).finish()
    }
}

impl Broker {
    /// Opens the broker in `dir`, creating it if needed and otherwise recovering exactly the
    /// committed state. Only one broker may have a directory open at a time.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Broker> {
        let dir = dir.as_ref().to_path_buf();
        let wal_options = herald_wal::Options {
            durability: options.durability,
            segment_bytes: options.segment_bytes,
            ..herald_wal::Options::default()
        };
        let mut recovery = Wal::recover(dir.join("wal"), wal_options)?;
        let mut state = State::default();
        for record in recovery.by_ref() {
            let record = record?;
            if record.kind != KIND_COMMIT {
                return Err(Error::Corruption(format!(
                    "record {} has unknown kind {}",
                    record.lsn, record.kind
                )));
            }
            let ops = record::decode(&record.payload)
                .map_err(|e| Error::Corruption(format!("record {}: {e}", record.lsn)))?;
            for op in &ops {
                state.apply(op, &record.payload).map_err(|e| {
                    Error::Corruption(format!("replaying record {}: {e}", record.lsn))
                })?;
            }
        }
        let wal = recovery.finish()?;
        Ok(Broker {
            wal,
            state: Mutex::new(state),
            locks: LockTable::default(),
            catalog_lock: CatalogLock::default(),
            options,
            next_tx: AtomicU64::new(1),
            dir,
        })
    }

    /// Begins a transaction. Nothing it does is visible to others before `commit`; dropping it
    /// rolls it back.
    pub fn begin(&self) -> Transaction<'_> {
        Transaction::new(self, self.next_tx.fetch_add(1, Ordering::Relaxed))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
