//! Spare segments: files of the segment size, zero-filled and synced before the log needs them.
//!
//! Why: on the disks Herald targets, an `fdatasync` that overwrites already-written blocks costs
//! about half of one that extends a file or fills fallocated blocks (no block allocation or
//! unwritten-extent conversion to journal). So the log never appends to a file: it writes records
//! over zeros that were written and synced ahead of time by a background thread.
//!
//! Protocol: a spare is written as `spare-N.zeroing`, filled with zeros, synced, renamed to
//! `spare-N.spare` and the directory synced. Only complete spares carry the `.spare` suffix, so
//! an open may reuse them; `.zeroing` leftovers of a crash are deleted.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::storage::{Storage, StorageFile, write_all_at};

pub const SPARE_SUFFIX: &str = ".spare";
pub const ZEROING_SUFFIX: &str = ".zeroing";
/// How many spares `Options::spare_segments` may ask the background thread to keep.
pub const SPARE_SEGMENTS_MAX: usize = 8;
/// Zeros are written in chunks of this many bytes.
const ZERO_CHUNK_BYTES: usize = 1024 * 1024;
/// After a failed attempt (e.g. a full disk), the background thread waits this long to retry.
const SPARE_RETRY_DELAY: Duration = Duration::from_secs(1);

/// A zero-filled, synced file of the segment size, ready to become a segment.
#[derive(Debug)]
pub(crate) struct Spare {
    pub name: String,
    pub file: Arc<dyn StorageFile>,
}

pub(crate) struct Spares {
    storage: Arc<dyn Storage>,
    segment_bytes: u64,
    target: usize,
    state: Mutex<SpareState>,
    changed: Condvar,
    /// Set once the background thread runs; before that (a new log's first segment) making a
    /// spare synchronously is expected.
    started: std::sync::atomic::AtomicBool,
}

struct SpareState {
    ready: Vec<Spare>,
    next_id: u64,
    stopping: bool,
}

/// The spare number in a file name `spare-N.spare` or `spare-N.zeroing`.
pub fn parse_spare_id(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix("spare-")?;
    if let Some(id) = rest.strip_suffix(SPARE_SUFFIX) {
        return id.parse().ok().map(|id| (id, true));
    }
    rest.strip_suffix(ZEROING_SUFFIX)?
        .parse()
        .ok()
        .map(|id| (id, false))
}

impl Spares {
    /// Takes over the complete spares found at open (`ready`) and numbers new ones after
    /// `next_id`.
    pub fn new(
        storage: Arc<dyn Storage>,
        segment_bytes: u64,
        target: usize,
        ready: Vec<Spare>,
        next_id: u64,
    ) -> Spares {
        Spares {
            storage,
            segment_bytes,
            target,
            state: Mutex::new(SpareState {
                ready,
                next_id,
                stopping: false,
            }),
            changed: Condvar::new(),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Starts the thread that keeps `target` spares ready.
    pub fn start(self: &Arc<Self>) -> Result<JoinHandle<()>> {
        self.started
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let spares = self.clone();
        std::thread::Builder::new()
            .name("herald-wal-spares".into())
            .spawn(move || spares.run())
            .map_err(|e| Error::io("starting the spare-segment thread", e))
    }

    pub fn stop(&self) {
        self.state.lock().stopping = true;
        self.changed.notify_all();
    }

    /// A ready spare, or a new one made now if none is ready (slow: the caller writes a whole
    /// segment of zeros). An error (a full disk, say) leaves the log as it was; a later call
    /// tries again.
    pub fn take(&self) -> Result<Spare> {
        let id = {
            let mut s = self.state.lock();
            if let Some(spare) = s.ready.pop() {
                self.changed.notify_all();
                return Ok(spare);
            }
            s.next_id += 1;
            s.next_id
        };
        if self.started.load(std::sync::atomic::Ordering::Relaxed) {
            // Past start-up this is a latency spike on the commit path worth knowing about.
            tracing::warn!("no spare segment ready; zero-filling one on the commit path");
        }
        self.make(id)
    }

    fn run(&self) {
        loop {
            let id = {
                let mut s = self.state.lock();
                while !s.stopping && s.ready.len() >= self.target {
                    self.changed.wait(&mut s);
                }
                if s.stopping {
                    return;
                }
                s.next_id += 1;
                s.next_id
            };
            match self.make(id) {
                Ok(spare) => self.state.lock().ready.push(spare),
                Err(e) => {
                    tracing::warn!(error = %e, "could not prepare a spare segment; retrying");
                    let mut s = self.state.lock();
                    if !s.stopping {
                        self.changed.wait_for(&mut s, SPARE_RETRY_DELAY);
                    }
                }
            }
        }
    }

    fn make(&self, id: u64) -> Result<Spare> {
        let zeroing = format!("spare-{id:06}{ZEROING_SUFFIX}");
        let name = format!("spare-{id:06}{SPARE_SUFFIX}");
        let context = |what: &str| format!("{what} spare segment {zeroing}");
        let file = self
            .storage
            .create(&zeroing)
            .map_err(|e| Error::io(context("creating"), e))?;
        let result = (|| {
            let zeros = vec![0u8; ZERO_CHUNK_BYTES];
            let mut offset = 0;
            while offset < self.segment_bytes {
                let n = (self.segment_bytes - offset).min(ZERO_CHUNK_BYTES as u64) as usize;
                write_all_at(file.as_ref(), &zeros[..n], offset)
                    .map_err(|e| Error::io(context("zero-filling"), e))?;
                offset += n as u64;
            }
            file.sync_data()
                .map_err(|e| Error::io(context("syncing"), e))?;
            self.storage
                .rename(&zeroing, &name)
                .map_err(|e| Error::io(context("renaming"), e))?;
            self.storage
                .sync_dir()
                .map_err(|e| Error::io(context("syncing the directory after"), e))
        })();
        if let Err(e) = result {
            // Give the space back (a full disk is the usual cause); a leftover is removed at
            // the next open anyway.
            let _ = self.storage.remove(&zeroing);
            return Err(e);
        }
        Ok(Spare { name, file })
    }
}
