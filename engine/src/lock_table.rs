//! Conversation-group locks and the catalog lock, owned by transactions.
//!
//! A group lock is exclusive and held until its transaction commits or rolls back. Taking a
//! lock the transaction already holds succeeds at once. Waiting is bounded: past the timeout the
//! operation fails with `Error::LockTimeout`, which is how deadlocks between transactions end.
//!
//! The catalog lock is a reader-writer lock: every operation that reads the catalog takes it
//! shared, a catalog change takes it exclusive (upgrading when its transaction is the only
//! reader), so that no transaction acts on a catalog that another is changing.

use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::clock::{self, Clock};
use crate::error::{Error, Result};
use crate::ids::{ConversationGroupId, IdMap, IdSet};

/// Identifies a transaction inside one broker.
pub type TxId = u64;

#[derive(Debug, Default)]
pub struct LockTable {
    owners: Mutex<IdMap<ConversationGroupId, TxId>>,
    released: Condvar,
}

impl LockTable {
    /// Takes `group` for `tx` if it is free (or already `tx`'s).
    pub fn try_lock(&self, group: ConversationGroupId, tx: TxId) -> bool {
        let mut owners = self.owners.lock();
        match owners.get(&group) {
            Some(owner) => *owner == tx,
            None => {
                owners.insert(group, tx);
                true
            }
        }
    }

    /// Takes `group` for `tx`, waiting at most `timeout` (on `clock`) for another transaction
    /// to release it.
    pub fn lock(
        &self,
        group: ConversationGroupId,
        tx: TxId,
        timeout: Duration,
        clock: &dyn Clock,
    ) -> Result<()> {
        // Read the clock only when there is something to wait for.
        let mut deadline = None;
        let mut owners = self.owners.lock();
        loop {
            match owners.get(&group) {
                Some(owner) if *owner == tx => return Ok(()),
                None => {
                    owners.insert(group, tx);
                    return Ok(());
                }
                Some(_) => {
                    let deadline =
                        *deadline.get_or_insert_with(|| clock::deadline_after(clock, timeout));
                    if clock::wait_until(clock, &self.released, &mut owners, deadline)
                        && owners.get(&group).is_some_and(|owner| *owner != tx)
                    {
                        return Err(Error::LockTimeout {
                            group,
                            waited_ms: timeout.as_millis() as u64,
                        });
                    }
                }
            }
        }
    }

    /// Wakes every waiter to re-check its deadline (a manual clock moved).
    pub fn wake_all(&self) {
        let _owners = self.owners.lock();
        self.released.notify_all();
    }

    /// Every group locked now, with its owner (for `invariants`).
    pub(crate) fn owners(&self) -> Vec<(ConversationGroupId, TxId)> {
        self.owners.lock().iter().map(|(g, tx)| (*g, *tx)).collect()
    }

    /// Releases every lock in `groups` held by `tx`.
    pub fn release(&self, tx: TxId, groups: &IdSet<ConversationGroupId>) {
        if groups.is_empty() {
            return;
        }
        let mut owners = self.owners.lock();
        for group in groups {
            if owners.get(group) == Some(&tx) {
                owners.remove(group);
            }
        }
        drop(owners);
        self.released.notify_all();
    }
}

/// How a transaction holds the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogMode {
    Shared,
    Exclusive,
}

#[derive(Debug, Default)]
pub struct CatalogLock {
    state: Mutex<CatalogLockState>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct CatalogLockState {
    readers: IdSet<TxId>,
    writer: Option<TxId>,
}

impl CatalogLock {
    /// Takes the catalog in `mode` for `tx` (which may already hold it shared), waiting at most
    /// `timeout` on `clock`.
    pub fn acquire(
        &self,
        tx: TxId,
        mode: CatalogMode,
        timeout: Duration,
        clock: &dyn Clock,
    ) -> Result<()> {
        let mut deadline = None;
        let mut state = self.state.lock();
        loop {
            let granted = match mode {
                CatalogMode::Shared => state.writer.is_none_or(|w| w == tx),
                CatalogMode::Exclusive => {
                    state.writer.is_none_or(|w| w == tx)
                        && state.readers.iter().all(|reader| *reader == tx)
                }
            };
            if granted {
                match mode {
                    CatalogMode::Shared => {
                        state.readers.insert(tx);
                    }
                    CatalogMode::Exclusive => state.writer = Some(tx),
                }
                return Ok(());
            }
            let deadline = *deadline.get_or_insert_with(|| clock::deadline_after(clock, timeout));
            if clock::wait_until(clock, &self.released, &mut state, deadline) {
                return Err(Error::CatalogLockTimeout {
                    waited_ms: timeout.as_millis() as u64,
                });
            }
        }
    }

    /// Wakes every waiter to re-check its deadline (a manual clock moved).
    pub fn wake_all(&self) {
        let _state = self.state.lock();
        self.released.notify_all();
    }

    /// The shared holders and the exclusive holder now (for `invariants`).
    pub(crate) fn holders(&self) -> (Vec<TxId>, Option<TxId>) {
        let state = self.state.lock();
        (state.readers.iter().copied().collect(), state.writer)
    }

    pub fn release(&self, tx: TxId) {
        let mut state = self.state.lock();
        let held = state.readers.remove(&tx) | (state.writer == Some(tx));
        if state.writer == Some(tx) {
            state.writer = None;
        }
        drop(state);
        if held {
            self.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    #[test]
    fn a_held_group_lock_times_out_for_others_and_frees_on_release() {
        let table = LockTable::default();
        let group = ConversationGroupId(7);
        assert!(table.try_lock(group, 1));
        assert!(table.try_lock(group, 1), "re-entrant for its owner");
        assert!(!table.try_lock(group, 2));
        assert!(matches!(
            table.lock(group, 2, Duration::from_millis(1), &SystemClock),
            Err(Error::LockTimeout { .. })
        ));
        table.release(1, &IdSet::from_iter([group]));
        table
            .lock(group, 2, Duration::from_millis(1), &SystemClock)
            .unwrap();
    }

    #[test]
    fn catalog_writer_excludes_readers_and_upgrades_alone() {
        let lock = CatalogLock::default();
        lock.acquire(1, CatalogMode::Shared, Duration::ZERO, &SystemClock)
            .unwrap();
        lock.acquire(2, CatalogMode::Shared, Duration::ZERO, &SystemClock)
            .unwrap();
        assert!(
            lock.acquire(
                1,
                CatalogMode::Exclusive,
                Duration::from_millis(1),
                &SystemClock
            )
            .is_err()
        );
        lock.release(2);
        lock.acquire(1, CatalogMode::Exclusive, Duration::ZERO, &SystemClock)
            .unwrap();
        assert!(
            lock.acquire(
                3,
                CatalogMode::Shared,
                Duration::from_millis(1),
                &SystemClock
            )
            .is_err()
        );
        lock.release(1);
        lock.acquire(3, CatalogMode::Shared, Duration::ZERO, &SystemClock)
            .unwrap();
    }
}
