//! Spare segments: files of the segment size, ready before the log needs them — a released
//! segment's file when one is waiting (renamed, nothing written: the new segment's salt refuses
//! its old records), else a file zero-filled and synced ahead of time.
//!
//! Why: on the disks Herald targets, an `fdatasync` that overwrites already-written blocks costs
//! about half of one that extends a file or fills fallocated blocks (no block allocation or
//! unwritten-extent conversion to journal). So the log never appends to a file: it writes records
//! over zeros that were written and synced ahead of time by a background thread.
//!
//! But zero-filling writes every byte of the log twice, which only pays while syncs are small.
//! When the log itself writes at a good share of the disk's bandwidth (bulk appends), each sync
//! moves so many bytes that the allocation it journals is noise, and the zero-filler only halves
//! the bandwidth left for the log. So the preparer measures, without a clock: if the log wrote
//! at least half a segment while one spare was being zero-filled, or if the log had to take a
//! spare that was not ready, the next spares are only *allocated* (`fallocate`: blocks reserved,
//! reading as zeros, so invariant 3 of `FORMAT.md` still holds, and the log's writes into them
//! cannot fail on a full disk) and a zero-filled spare is tried again every few segments to
//! re-measure.
//!
//! Zeros are written in the background a chunk at a time, each chunk synced and followed by a
//! short pause ([`ZERO_FILL_CHUNK_PAUSE`]): the log's own writes and syncs share the device and
//! must not queue behind a segment of zeros.
//!
//! Protocol: a spare is written as `spare-N.zeroing`, filled with zeros (or extended), synced,
//! renamed to `spare-N.spare` and the directory synced. Only complete spares carry the `.spare`
//! suffix, so an open may reuse them; `.zeroing` leftovers of a crash are deleted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// Between two chunks of a zero-fill in the background, each synced, the preparer pauses this
/// long, so that the device never holds more than one chunk of zeros ahead of the log's own
/// writes and syncs (a whole segment written back at once made them wait: in the nodes bench,
/// the rounds that overlapped a zero-fill ran at ~0.5× the others; paced, ~0.8×). A 64 MiB
/// spare then takes at least 64 × 5 ms; a log that outruns it finds no spare ready and the
/// preparer switches to extending (see the module documentation), as it does for a log that
/// writes half a segment during one fill.
pub const ZERO_FILL_CHUNK_PAUSE: Duration = Duration::from_millis(5);
/// After a failed attempt (e.g. a full disk), the background thread waits this long to retry.
const SPARE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// In bandwidth-bound mode, this many spares are only extended before one is zero-filled again
/// to re-measure.
const EXTENDED_SPARES_BEFORE_REMEASURE: u32 = 4;

/// Whether a spare is made in the background (zero-filled a paced chunk at a time) or for a
/// caller waiting for it (a new log's first segment, a roll-over that found none ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    Background,
    AtOnce,
}

/// How a spare's bytes are prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preparation {
    /// Written with zeros and synced: later syncs overwrite written blocks (cheap small syncs).
    ZeroFilled,
    /// Extended to size (holes): no bandwidth spent ahead, allocation journaled at sync time.
    Extended,
}

/// A file of the segment size, ready to become a segment: zero-filled (or extended) and synced,
/// or a released segment's file (`reused`), whose old records the new segment's salt refuses.
#[derive(Debug)]
pub(crate) struct Spare {
    pub name: String,
    pub file: Arc<dyn StorageFile>,
    pub reused: bool,
}

/// A released segment's file whose last reader is gone, waiting to become a spare.
struct Recyclable {
    /// Its name now (`{first_lsn}.released`).
    name: String,
    file: Arc<dyn StorageFile>,
}

pub(crate) struct Spares {
    storage: Arc<dyn Storage>,
    segment_bytes: u64,
    target: usize,
    state: Mutex<SpareState>,
    changed: Condvar,
    /// Bytes the log has reserved for records, ever: the preparer's yardstick for how hard the
    /// log is writing, counted in bytes rather than time.
    log_bytes: AtomicU64,
    /// Spares made from released segments since open (rather than zero-filled or extended).
    reused: AtomicU64,
}

struct SpareState {
    ready: Vec<Spare>,
    /// Released segments kept for reuse, at most `target` (more are deleted): with the ready
    /// spares, the log holds at most twice `target` files beyond its live segments.
    recyclable: Vec<Recyclable>,
    next_id: u64,
    stopping: bool,
    /// Spares still to be only extended before zero-filling is measured again.
    extend_next: u32,
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
                recyclable: Vec::new(),
                next_id,
                stopping: false,
                extend_next: 0,
            }),
            changed: Condvar::new(),
            log_bytes: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        }
    }

    /// The log reserved `bytes` more for records.
    pub fn note_log_bytes(&self, bytes: u64) {
        self.log_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    /// Spares ready to become segments now.
    pub fn ready(&self) -> usize {
        self.state.lock().ready.len()
    }

    /// Spares made from released segments since open.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// Starts the thread that keeps `target` spares ready.
    pub fn start(self: &Arc<Self>) -> Result<JoinHandle<()>> {
        let spares = self.clone();
        std::thread::Builder::new()
            .name("herald-wal-spares".into())
            .spawn(move || spares.run())
            .map_err(|e| Error::io("starting the spare-segment thread", e))
    }

    pub fn stop(&self) {
        let recyclable = {
            let mut s = self.state.lock();
            s.stopping = true;
            std::mem::take(&mut s.recyclable)
        };
        self.changed.notify_all();
        for released in recyclable {
            self.delete_released(&released.name);
        }
    }

    /// A released segment's last reader is gone: its file becomes a spare when one is needed
    /// (renamed, no byte written), or is deleted. Called from whichever thread dropped the
    /// segment last, so it only hands the file to the preparer.
    pub fn recycle(&self, released_name: String, file: Arc<dyn StorageFile>) {
        {
            let mut s = self.state.lock();
            if !s.stopping && s.recyclable.len() < self.target {
                s.recyclable.push(Recyclable {
                    name: released_name,
                    file,
                });
                drop(s);
                self.changed.notify_all();
                return;
            }
        }
        self.delete_released(&released_name);
    }

    fn delete_released(&self, name: &str) {
        if let Err(e) = self.storage.remove(name) {
            // The next open removes leftover released segments; nothing is lost.
            tracing::warn!(segment = %name, error = %e, "could not remove released segment");
        }
    }

    /// Turns a released segment's file into spare `id`: a rename and a directory sync. A file
    /// of another size (the segment size changed since it was made) is deleted instead.
    fn reuse(&self, released: Recyclable, id: u64) -> Result<Option<Spare>> {
        let size = released
            .file
            .size_bytes()
            .map_err(|e| Error::io(format!("sizing released segment {}", released.name), e))?;
        if size != self.segment_bytes {
            self.delete_released(&released.name);
            return Ok(None);
        }
        let name = format!("spare-{id:06}{SPARE_SUFFIX}");
        self.storage
            .rename(&released.name, &name)
            .and_then(|()| self.storage.sync_dir())
            .map_err(|e| Error::io(format!("reusing released segment {}", released.name), e))?;
        self.reused.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Spare {
            name,
            file: released.file,
            reused: true,
        }))
    }

    /// A ready spare, else a released segment's file, else one made now. On the commit path
    /// (`for_roll_over`) a missing spare is made by extending a file, which takes a moment, and
    /// the preparer switches to extending: the log writes faster than zeros can be laid ahead of
    /// it. A new log's first segment is zero-filled here (it has no preparer running yet). An
    /// error (a full disk, say) leaves the log as it was; a later call tries again.
    pub fn take(&self, for_roll_over: bool) -> Result<Spare> {
        loop {
            let (released, id) = {
                let mut s = self.state.lock();
                if let Some(spare) = s.ready.pop() {
                    self.changed.notify_all();
                    return Ok(spare);
                }
                let Some(released) = s.recyclable.pop() else {
                    break;
                };
                s.next_id += 1;
                (released, s.next_id)
            };
            match self.reuse(released, id) {
                Ok(Some(spare)) => return Ok(spare),
                Ok(None) => {}
                // Making one instead is as good: the file is left for the next open to delete.
                Err(e) => {
                    tracing::warn!(error = %e, "could not reuse a released segment");
                    break;
                }
            }
        }
        let id = {
            let mut s = self.state.lock();
            if for_roll_over {
                s.extend_next = EXTENDED_SPARES_BEFORE_REMEASURE;
            }
            s.next_id += 1;
            s.next_id
        };
        if for_roll_over {
            tracing::info!("no spare segment ready at roll-over; extending one instead");
            self.make(id, Preparation::Extended, Pace::AtOnce)
        } else {
            self.make(id, Preparation::ZeroFilled, Pace::AtOnce)
        }
    }

    fn run(&self) {
        loop {
            let (id, preparation) = {
                let mut s = self.state.lock();
                while !s.stopping && s.ready.len() >= self.target {
                    self.changed.wait(&mut s);
                }
                if s.stopping {
                    return;
                }
                // A released segment first: it costs a rename, where a new spare costs a
                // segment of zeros.
                if let Some(released) = s.recyclable.pop() {
                    s.next_id += 1;
                    let id = s.next_id;
                    drop(s);
                    match self.reuse(released, id) {
                        Ok(Some(spare)) => self.state.lock().ready.push(spare),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "could not reuse a released segment"),
                    }
                    continue;
                }
                s.next_id += 1;
                let preparation = if s.extend_next > 0 {
                    s.extend_next -= 1;
                    Preparation::Extended
                } else {
                    Preparation::ZeroFilled
                };
                (s.next_id, preparation)
            };
            let log_bytes_before = self.log_bytes.load(Ordering::Relaxed);
            match self.make(id, preparation, Pace::Background) {
                Ok(spare) => {
                    let log_bytes_during =
                        self.log_bytes.load(Ordering::Relaxed) - log_bytes_before;
                    let mut s = self.state.lock();
                    if preparation == Preparation::ZeroFilled
                        && log_bytes_during >= self.segment_bytes / 2
                    {
                        tracing::info!(
                            log_bytes_during,
                            "the log is bandwidth-bound; extending spares instead of zero-filling"
                        );
                        s.extend_next = EXTENDED_SPARES_BEFORE_REMEASURE;
                    }
                    s.ready.push(spare);
                }
                Err(e) => {
                    let mut s = self.state.lock();
                    if s.stopping {
                        // Closing: a fill cut short is not a failure.
                        return;
                    }
                    if !s.recyclable.is_empty() {
                        // Cut short for a released segment, taken next.
                        continue;
                    }
                    tracing::warn!(error = %e, "could not prepare a spare segment; retrying");
                    self.changed.wait_for(&mut s, SPARE_RETRY_DELAY);
                }
            }
        }
    }

    fn make(&self, id: u64, preparation: Preparation, pace: Pace) -> Result<Spare> {
        let zeroing = format!("spare-{id:06}{ZEROING_SUFFIX}");
        let name = format!("spare-{id:06}{SPARE_SUFFIX}");
        let context = |what: &str| format!("{what} spare segment {zeroing}");
        let file = self
            .storage
            .create(&zeroing)
            .map_err(|e| Error::io(context("creating"), e))?;
        let result = (|| {
            match preparation {
                Preparation::ZeroFilled => {
                    let zeros = vec![0u8; ZERO_CHUNK_BYTES];
                    let mut offset = 0;
                    while offset < self.segment_bytes {
                        let n = (self.segment_bytes - offset).min(ZERO_CHUNK_BYTES as u64) as usize;
                        write_all_at(file.as_ref(), &zeros[..n], offset)
                            .map_err(|e| Error::io(context("zero-filling"), e))?;
                        offset += n as u64;
                        if pace == Pace::Background {
                            file.sync_data()
                                .map_err(|e| Error::io(context("syncing"), e))?;
                            let cut_short = {
                                let s = self.state.lock();
                                if s.stopping {
                                    Some("the log is closing")
                                } else if !s.recyclable.is_empty() {
                                    Some("a released segment can be reused instead")
                                } else {
                                    None
                                }
                            };
                            if let Some(why) = cut_short {
                                return Err(Error::io(
                                    context("zero-filling"),
                                    std::io::Error::new(std::io::ErrorKind::Interrupted, why),
                                ));
                            }
                            std::thread::sleep(ZERO_FILL_CHUNK_PAUSE);
                        }
                    }
                }
                // Reserved, not only extended: on a nearly full disk a file with holes is made
                // at once, and then the log's writes into it fail (and poison the log) instead
                // of this, which fails the roll-over with an error that goes with the cause.
                Preparation::Extended => file
                    .allocate(self.segment_bytes)
                    .map_err(|e| Error::io(context("allocating"), e))?,
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
        Ok(Spare {
            name,
            file,
            reused: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    fn spares(storage: &MemStorage) -> Spares {
        Spares::new(Arc::new(storage.clone()), 8192, 1, Vec::new(), 0)
    }

    #[test]
    fn a_background_fill_goes_chunk_by_chunk_and_a_close_cuts_it_short() {
        let storage = MemStorage::new();
        let two_chunks = 2 * ZERO_CHUNK_BYTES as u64;
        let spares = Spares::new(Arc::new(storage.clone()), two_chunks, 1, Vec::new(), 0);
        let spare = spares
            .make(1, Preparation::ZeroFilled, Pace::Background)
            .expect("made");
        assert_eq!(spare.name, "spare-000001.spare");
        assert_eq!(spare.file.size_bytes().expect("size"), two_chunks);
        spares.stop();
        let cut = spares.make(2, Preparation::ZeroFilled, Pace::Background);
        assert!(cut.is_err(), "a close stops the fill after its chunk");
        assert_eq!(
            storage.file_names(),
            ["spare-000001.spare"],
            "nothing half-made is left"
        );
    }

    #[test]
    fn a_first_segment_is_zero_filled_and_a_missing_roll_over_spare_is_extended() {
        let storage = MemStorage::new();
        let spares = spares(&storage);
        let first = spares.take(false).unwrap();
        assert_eq!(first.file.size_bytes().unwrap(), 8192);
        assert_eq!(
            spares.state.lock().extend_next,
            0,
            "zero-filling stays the rule"
        );

        let rolled = spares.take(true).unwrap();
        assert_eq!(rolled.file.size_bytes().unwrap(), 8192);
        let bytes = storage.file_bytes(&rolled.name).unwrap();
        assert!(
            bytes.iter().all(|&b| b == 0),
            "an extended spare reads as zeros"
        );
        assert_eq!(
            spares.state.lock().extend_next,
            EXTENDED_SPARES_BEFORE_REMEASURE,
            "the log outran the preparer: the next spares are extended"
        );
        assert!(
            storage
                .file_names()
                .iter()
                .all(|n| n.ends_with(SPARE_SUFFIX))
        );
    }

    /// A spare made at a roll-over (no time to zero-fill) has its blocks reserved: the log's
    /// writes into it succeed on a disk that filled up since. (Extended with `set_len`, it had
    /// holes, the first record write failed, and the log was poisoned until reopened.)
    #[test]
    fn a_roll_over_spare_can_be_written_on_a_full_disk() {
        let storage = MemStorage::new();
        let spares = spares(&storage);
        let rolled = spares.take(true).unwrap();
        storage.set_disk_full(true);
        write_all_at(rolled.file.as_ref(), &[7u8; 8192], 0).expect("blocks were reserved");
        let hole = storage.create("sparse").unwrap_err();
        assert_eq!(
            hole.kind(),
            std::io::ErrorKind::StorageFull,
            "the disk is full"
        );
        storage.set_disk_full(false);
        let sparse = storage.create("sparse").unwrap();
        sparse.set_len(8192).unwrap();
        storage.set_disk_full(true);
        assert_eq!(
            write_all_at(sparse.as_ref(), &[7u8; 8192], 0)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::StorageFull,
            "a hole is not reserved"
        );
    }

    #[test]
    fn a_log_writing_during_a_zero_fill_switches_the_preparer_to_extending() {
        let storage = MemStorage::new();
        let spares = Arc::new(spares(&storage));
        // The log "writes" a whole segment's worth before the preparer starts measuring, then
        // keeps writing while it works: at least one zero-fill sees half a segment go by.
        let thread = spares.start().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            spares.note_log_bytes(8192);
            {
                let mut s = spares.state.lock();
                if s.extend_next > 0 {
                    break;
                }
                // Keep the preparer busy: take what it made so it makes another.
                s.ready.clear();
            }
            spares.changed.notify_all();
            assert!(
                std::time::Instant::now() < deadline,
                "the preparer never noticed the log's writing"
            );
            std::thread::yield_now();
        }
        spares.stop();
        thread.join().unwrap();
    }
}
