//! Group commit: which LSNs are written, which are durable, and who runs the next `fdatasync`.
//!
//! Appenders reserve an LSN and an offset under the append lock, then `pwrite` their own record
//! outside any lock, so writes of many committers run in parallel and overlap a running sync.
//! Writes may finish out of order; the *written* LSN is the end of the contiguous prefix of
//! finished writes. A committer that needs durability waits until the *durable* LSN covers its
//! own. If no sync is running and its record is written, it becomes the sync leader: it snapshots
//! the written LSN `W`, syncs every segment holding records up to `W`, publishes `durable = W`,
//! and wakes exactly the waiters `W` covers. While waiters remain whose records are written, the
//! leader runs another round; waiters whose records are not yet written are woken by the write
//! that makes them written.
//!
//! Invariants: `durable <= written`; both only grow; `durable = D` is published only after an
//! `fdatasync` that began after every record `<= D` was written returned success. A failed write
//! or sync poisons the log: `durable` never moves again and every waiter and later caller fails.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, Thread};

use parking_lot::Mutex;

use crate::Lsn;
use crate::error::{Error, Result};
use crate::segment::Segment;

pub(crate) struct GroupCommit {
    written: Mutex<WrittenState>,
    written_lsn: AtomicU64,
    durable_lsn: AtomicU64,
    sync: Mutex<SyncState>,
    /// A leader is running sync rounds. Changed only under the `sync` lock; read without it by
    /// writers deciding whether to wake waiters.
    syncing: AtomicBool,
    /// Number of parked waiters; lets writers skip the sync lock when nobody waits.
    waiting: AtomicUsize,
    /// Appenders whose own write finished before an earlier LSN's did: (lsn, thread).
    written_waiters: Mutex<Vec<(u64, Thread)>>,
    written_waiting: AtomicUsize,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
}

struct WrittenState {
    through: u64,
    /// Finished writes past a gap: LSN → (segment, end offset of the record).
    out_of_order: BTreeMap<u64, (Arc<Segment>, u64)>,
    /// Segments that may hold written records not yet synced, oldest first. The newest is kept
    /// after each sync because writes may still land in it.
    unsynced: Vec<Arc<Segment>>,
}

#[derive(Default)]
struct SyncState {
    /// Committers waiting for durability: (LSN, thread), unordered.
    waiters: Vec<(u64, Thread)>,
    /// Lazy waiters (`wait_durable_lazily`) in their grace: woken only by a round that covers
    /// them (or poisoning), never to lead, so writes do not wake them.
    lazy: Vec<(u64, Thread)>,
}

/// Removes the waiters whose LSN is at most `through` and returns their threads, to be unparked
/// after the lock is released (an unpark is a system call; holding the lock across it stalls
/// every writer that needs the lock).
fn take_covered(waiters: &mut Vec<(u64, Thread)>, through: u64) -> Vec<Thread> {
    let mut woken = Vec::new();
    waiters.retain(|(lsn, thread)| {
        if *lsn <= through {
            woken.push(thread.clone());
            false
        } else {
            true
        }
    });
    woken
}

impl GroupCommit {
    /// Starts with everything through `recovered` written and durable (recovery synced it).
    pub fn new(recovered: Lsn, active: Arc<Segment>) -> GroupCommit {
        GroupCommit {
            written: Mutex::new(WrittenState {
                through: recovered.0,
                out_of_order: BTreeMap::new(),
                unsynced: vec![active],
            }),
            written_lsn: AtomicU64::new(recovered.0),
            durable_lsn: AtomicU64::new(recovered.0),
            sync: Mutex::new(SyncState::default()),
            syncing: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            written_waiters: Mutex::new(Vec::new()),
            written_waiting: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
        }
    }

    pub fn written(&self) -> Lsn {
        Lsn(self.written_lsn.load(Ordering::SeqCst))
    }

    pub fn durable(&self) -> Lsn {
        Lsn(self.durable_lsn.load(Ordering::Acquire))
    }

    /// Record `lsn`, ending at offset `end` of `segment`, is completely written.
    pub fn mark_written(&self, lsn: Lsn, segment: &Arc<Segment>, end: u64) {
        let through = {
            let mut w = self.written.lock();
            if lsn.0 != w.through + 1 {
                w.out_of_order.insert(lsn.0, (segment.clone(), end));
                return;
            }
            Self::advance(&mut w, segment, end);
            loop {
                let next = w.through + 1;
                let Some((segment, end)) = w.out_of_order.remove(&next) else {
                    break;
                };
                Self::advance(&mut w, &segment, end);
            }
            self.written_lsn.store(w.through, Ordering::SeqCst);
            w.through
        };
        // Both checks pair with the SeqCst registration in the wait functions: either the waiter
        // sees the new written LSN, or this load sees the waiter.
        if self.written_waiting.load(Ordering::SeqCst) > 0 {
            let woken = {
                let mut waiters = self.written_waiters.lock();
                let woken = take_covered(&mut waiters, through);
                self.written_waiting.store(waiters.len(), Ordering::SeqCst);
                woken
            };
            woken.iter().for_each(Thread::unpark);
        }
        // While a leader syncs, it wakes the waiters this write made syncable when its round
        // ends (it re-reads the written LSN after clearing `syncing`: with the SeqCst store of
        // `written_lsn` above and this load, one of the two sides sees the other).
        if self.waiting.load(Ordering::SeqCst) > 0 && !self.syncing.load(Ordering::SeqCst) {
            let woken = {
                let mut s = self.sync.lock();
                if self.syncing.load(Ordering::SeqCst) {
                    return;
                }
                // One of the woken becomes the leader.
                let woken = take_covered(&mut s.waiters, through);
                self.waiting.store(s.waiters.len(), Ordering::SeqCst);
                woken
            };
            woken.iter().for_each(Thread::unpark);
        }
    }

    fn advance(w: &mut WrittenState, segment: &Arc<Segment>, end: u64) {
        w.through += 1;
        segment.publish_readable_end(end);
        if !w
            .unsynced
            .last()
            .is_some_and(|last| Arc::ptr_eq(last, segment))
        {
            w.unsynced.push(segment.clone());
        }
    }

    /// Blocks until `lsn` and every record before it are written (readable, and safe from a
    /// process crash). Writes finish out of order, so an appender whose own write is done may
    /// wait here for an earlier one, which is in flight and takes microseconds.
    pub fn wait_written(&self, lsn: Lsn) -> Result<()> {
        loop {
            if self.written_lsn.load(Ordering::SeqCst) >= lsn.0 {
                return Ok(());
            }
            self.check_poison()?;
            {
                let mut waiters = self.written_waiters.lock();
                waiters.push((lsn.0, thread::current()));
                self.written_waiting.store(waiters.len(), Ordering::SeqCst);
                if self.written_lsn.load(Ordering::SeqCst) >= lsn.0 || self.is_poisoned() {
                    let me = thread::current().id();
                    waiters.retain(|(_, thread)| thread.id() != me);
                    self.written_waiting.store(waiters.len(), Ordering::SeqCst);
                    continue;
                }
            }
            thread::park();
        }
    }

    /// Blocks until `lsn` is durable, leading syncs when it is this thread's turn.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<()> {
        loop {
            if self.durable_lsn.load(Ordering::Acquire) >= lsn.0 {
                return Ok(());
            }
            self.check_poison()?;
            let mut s = self.sync.lock();
            s.waiters.push((lsn.0, thread::current()));
            self.waiting.store(s.waiters.len(), Ordering::SeqCst);
            if self.durable_lsn.load(Ordering::Acquire) >= lsn.0 || self.is_poisoned() {
                s.waiters.pop();
                self.waiting.store(s.waiters.len(), Ordering::SeqCst);
                continue;
            }
            if !self.syncing.load(Ordering::SeqCst)
                && self.written_lsn.load(Ordering::SeqCst) >= lsn.0
            {
                s.waiters.pop();
                self.waiting.store(s.waiters.len(), Ordering::SeqCst);
                self.syncing.store(true, Ordering::SeqCst);
                drop(s);
                self.lead_syncs()?;
                continue;
            }
            drop(s);
            // Woken by a leader that made `lsn` durable, by the write that made it syncable, or
            // by poisoning; a spurious wake-up just loops.
            thread::park();
        }
    }

    /// `wait_durable`, but for up to `grace` it leaves the syncing to others: it waits as a
    /// follower, woken when a leader's round covers `lsn`, and leads only once `grace` has
    /// passed. For a record whose durability can wait a moment for a sync that is coming anyway
    /// (a commit of a thread about to write).
    pub fn wait_durable_lazily(&self, lsn: Lsn, grace: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + grace;
        let me = thread::current().id();
        loop {
            if self.durable_lsn.load(Ordering::Acquire) >= lsn.0 {
                return Ok(());
            }
            self.check_poison()?;
            let now = std::time::Instant::now();
            if now >= deadline {
                return self.wait_durable(lsn);
            }
            {
                let mut s = self.sync.lock();
                // Checked under the lock a leader takes to wake the waiters it covered: either
                // this sees its round's durable LSN, or the leader sees this waiter.
                if self.durable_lsn.load(Ordering::Acquire) >= lsn.0 || self.is_poisoned() {
                    continue;
                }
                s.lazy.push((lsn.0, thread::current()));
            }
            // Woken by a leader whose round covered `lsn`, by poisoning, or by the deadline;
            // every case loops.
            thread::park_timeout(deadline - now);
            self.sync
                .lock()
                .lazy
                .retain(|(_, thread)| thread.id() != me);
        }
    }

    /// Runs sync rounds while some waiter's record is written but not durable.
    fn lead_syncs(&self) -> Result<()> {
        loop {
            let (target, segments) = {
                let mut w = self.written.lock();
                let newest = w.unsynced.last().cloned();
                let segments = std::mem::take(&mut w.unsynced);
                w.unsynced.extend(newest);
                (w.through, segments)
            };
            if target > self.durable_lsn.load(Ordering::Acquire) {
                for segment in &segments {
                    if let Err(e) = segment.file.sync_data() {
                        let cause = format!("fdatasync of segment {} failed: {e}", segment.name);
                        self.poison(cause.clone());
                        self.syncing.store(false, Ordering::SeqCst);
                        return Err(Error::Poisoned { cause });
                    }
                }
                self.durable_lsn.store(target, Ordering::Release);
            }
            let (woken, more) = {
                let mut s = self.sync.lock();
                let mut woken = take_covered(&mut s.waiters, target);
                woken.extend(take_covered(&mut s.lazy, target));
                let written = self.written_lsn.load(Ordering::SeqCst);
                let more = s.waiters.iter().any(|(lsn, _)| *lsn <= written);
                if !more {
                    self.syncing.store(false, Ordering::SeqCst);
                    // A write that finished while `syncing` was set skipped waking its waiters:
                    // wake them now, and one of them leads the next round.
                    let written = self.written_lsn.load(Ordering::SeqCst);
                    woken.extend(take_covered(&mut s.waiters, written));
                }
                self.waiting.store(s.waiters.len(), Ordering::SeqCst);
                (woken, more)
            };
            woken.iter().for_each(Thread::unpark);
            if !more {
                return Ok(());
            }
        }
    }

    /// Makes every present and future wait fail: after a failed write or sync nothing may claim
    /// durability again (the kernel may have dropped the dirty pages it could not write).
    pub fn poison(&self, cause: String) {
        tracing::error!(%cause, "write-ahead log poisoned");
        {
            let mut slot = self.poison_cause.lock();
            if slot.is_none() {
                *slot = Some(cause);
            }
        }
        self.poisoned.store(true, Ordering::SeqCst);
        for (_, thread) in self.written_waiters.lock().drain(..) {
            thread.unpark();
        }
        self.written_waiting.store(0, Ordering::SeqCst);
        let mut s = self.sync.lock();
        let s = &mut *s;
        for (_, thread) in s.waiters.drain(..).chain(s.lazy.drain(..)) {
            thread.unpark();
        }
        self.waiting.store(0, Ordering::SeqCst);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    pub fn check_poison(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::Poisoned {
                cause: self
                    .poison_cause
                    .lock()
                    .clone()
                    .unwrap_or_else(|| "unknown".into()),
            });
        }
        Ok(())
    }
}
