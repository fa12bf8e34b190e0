//! The log handle: append, commit, read, replay, release, close.
//!
//! Appends reserve an LSN and a place in the active segment under one short lock, then write
//! their own record with `pwrite` outside it (see `group_commit` for how durability follows).
//! When a record does not fit in the active segment, the appender activates a spare: it writes
//! the segment header, syncs it, renames the spare to the segment's name and syncs the directory
//! before any record goes into it, so a record can only be acknowledged in a segment whose name
//! and header are durable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::format::{
    self, FORMAT_VERSION, RECORD_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX, SEGMENT_BYTES_DEFAULT,
    SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN, SEGMENT_HEADER_BYTES, Salt, SegmentHeader,
};
use crate::group_commit::GroupCommit;
use crate::recovery::{Recovery, RecoveryReport};
use crate::scan::{Scanner, Step};
use crate::segment::{RELEASED_SUFFIX, RecordBytes, Segment, segment_file_name};
use crate::spares::{SPARE_SEGMENTS_MAX, Spares};
use crate::storage::{FileStorage, Storage, write_all_at};
use crate::{Lsn, Position};

/// When a commit returns, and so what a power loss can take away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `commit` returns after `fdatasync` covered the record. A returned commit survives process
    /// death and power loss.
    #[default]
    Sync,
    /// `commit` returns once the record is written to the OS; a background thread syncs at most
    /// `max_delay` later. Process death loses nothing; a power loss may lose the commits of the
    /// last `max_delay` (plus one sync).
    Batched { max_delay: Duration },
    /// `commit` returns once the record is written to the OS; nothing syncs until `sync()`,
    /// `close()` or a drop. Process death loses nothing; a power loss may lose every commit since
    /// the last explicit sync.
    None,
}

/// Which system calls carry writes and syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteBackend {
    /// io_uring where the `io-uring` feature is built and the kernel allows it, else `Pwrite`.
    #[default]
    Auto,
    /// `pwrite` + `fdatasync`.
    Pwrite,
    /// io_uring; opening fails if it is not available.
    IoUring,
}

/// How to open a log.
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of each new segment file; existing segments keep the size in their header.
    pub segment_bytes: u64,
    pub durability: Durability,
    /// Zero-filled segments kept ready ahead of need (at most `SPARE_SEGMENTS_MAX`).
    pub spare_segments: usize,
    /// Recovery scans (and checks) records from here; earlier segments are only header-checked.
    /// `Lsn(0)` scans the whole log.
    pub replay_from: Lsn,
    /// How `Wal::open`/`Wal::recover` write and sync (a caller's `Storage` decides for itself).
    /// `Pwrite` by default: io_uring becomes the default only once the bench shows it winning.
    pub write_backend: WriteBackend,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            durability: Durability::Sync,
            spare_segments: 1,
            replay_from: Lsn(0),
            write_backend: WriteBackend::Pwrite,
        }
    }
}

impl Options {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes)
            || !self
                .segment_bytes
                .is_multiple_of(format::RECORD_ALIGN_BYTES)
        {
            return Err(Error::InvalidOptions(format!(
                "segment_bytes {} must be a multiple of {} in {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}",
                self.segment_bytes,
                format::RECORD_ALIGN_BYTES
            )));
        }
        if self.spare_segments == 0 || self.spare_segments > SPARE_SEGMENTS_MAX {
            return Err(Error::InvalidOptions(format!(
                "spare_segments {} must be in 1..={SPARE_SEGMENTS_MAX}",
                self.spare_segments
            )));
        }
        if let Durability::Batched { max_delay } = self.durability
            && max_delay.is_zero()
        {
            return Err(Error::InvalidOptions(
                "Batched durability needs a max_delay above zero".into(),
            ));
        }
        Ok(())
    }

    /// Largest payload one record may carry with these options.
    pub fn record_payload_bytes_max(&self) -> u64 {
        payload_max_for(self.segment_bytes)
    }
}

/// Largest payload that fits a fresh segment of `segment_bytes`.
pub(crate) fn payload_max_for(segment_bytes: u64) -> u64 {
    RECORD_PAYLOAD_BYTES_MAX.min(
        segment_bytes.saturating_sub(SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES)
            & !(format::RECORD_ALIGN_BYTES - 1),
    )
}

/// What an append returns: the record's LSN and where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub lsn: Lsn,
    pub position: Position,
    pub payload_len: u32,
}

/// A record read back from the log.
#[derive(Debug, Clone)]
pub struct Record {
    pub lsn: Lsn,
    pub kind: u8,
    pub position: Position,
    /// The payload, borrowed from the segment's map (file storage) and keeping it alive.
    pub payload: RecordBytes,
}

/// One live segment, as `Wal::segments` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub name: String,
    pub first_lsn: Lsn,
    pub segment_bytes: u64,
    /// Bytes holding complete records (header included).
    pub written_bytes: u64,
    pub active: bool,
}

/// The write-ahead log. Cheap to share by reference across threads (`&Wal` is `Sync`).
pub struct Wal {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("location", &self.inner.storage.location())
            .field("next_lsn", &self.next_lsn())
            .field("durable_lsn", &self.durable_lsn())
            .finish()
    }
}

pub(crate) struct Inner {
    pub storage: Arc<dyn Storage>,
    pub options: Options,
    dir_lock: crate::segment::DirLock,
    append: Mutex<AppendState>,
    /// Live segments by first LSN, the active one last.
    segments: RwLock<BTreeMap<Lsn, Arc<Segment>>>,
    group: GroupCommit,
    spares: Arc<Spares>,
    stopping: AtomicBool,
    report: RecoveryReport,
}

struct AppendState {
    next_lsn: Lsn,
    active: Arc<Segment>,
    /// Offset in `active` where the next record goes: end of everything reserved so far.
    reserved_end: u64,
}

/// What recovery hands to `Wal::start`.
pub(crate) struct Recovered {
    pub storage: Arc<dyn Storage>,
    pub options: Options,
    pub lock: crate::segment::DirLock,
    /// Live segments, oldest first; the last one is active. Empty for a new log.
    pub segments: Vec<Arc<Segment>>,
    pub next_lsn: Lsn,
    /// Offset of the end of the last valid record in the last segment.
    pub tail_offset: u64,
    pub spares: Arc<Spares>,
    pub report: RecoveryReport,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, recovering it: see [`Recovery`] to see the records
    /// while recovering.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Wal> {
        Wal::recover(dir, options)?.finish()
    }

    /// Starts recovering the log in `dir`: iterate the returned [`Recovery`] to replay records
    /// from `options.replay_from`, then call `finish` to get the log.
    /// `options.write_backend` picks the storage: see [`WriteBackend`].
    pub fn recover(dir: impl AsRef<Path>, mut options: Options) -> Result<Recovery> {
        let dir = dir.as_ref();
        let (storage, backend) = match options.write_backend {
            WriteBackend::Pwrite => (file_storage(dir)?, WriteBackend::Pwrite),
            WriteBackend::IoUring => (uring_storage(dir)?, WriteBackend::IoUring),
            WriteBackend::Auto => match uring_storage(dir) {
                Ok(storage) => (storage, WriteBackend::IoUring),
                Err(e) => {
                    tracing::info!(reason = %e, "io_uring not usable; falling back to pwrite");
                    (file_storage(dir)?, WriteBackend::Pwrite)
                }
            },
        };
        tracing::info!(?backend, dir = %dir.display(), "write backend chosen");
        options.write_backend = backend;
        Recovery::start(storage, options)
    }

    /// Like [`Wal::recover`], on any [`Storage`] (e.g. [`MemStorage`](crate::MemStorage)).
    pub fn recover_storage(storage: Arc<dyn Storage>, options: Options) -> Result<Recovery> {
        Recovery::start(storage, options)
    }

    /// Like [`Wal::open`], on any [`Storage`].
    pub fn open_storage(storage: Arc<dyn Storage>, options: Options) -> Result<Wal> {
        Recovery::start(storage, options)?.finish()
    }

    pub(crate) fn start(recovered: Recovered) -> Result<Wal> {
        let Recovered {
            storage,
            options,
            lock,
            mut segments,
            next_lsn,
            tail_offset,
            spares,
            report,
        } = recovered;
        let (active, reserved_end) = match segments.last() {
            Some(active) => (active.clone(), tail_offset),
            None => {
                let active = activate_spare(storage.as_ref(), &spares, next_lsn, false, &lock)?;
                segments.push(active.clone());
                (active, SEGMENT_HEADER_BYTES)
            }
        };
        let written_through = Lsn(next_lsn.0.saturating_sub(1));
        let inner = Arc::new(Inner {
            group: GroupCommit::new(written_through, active.clone()),
            storage,
            dir_lock: lock.clone(),
            append: Mutex::new(AppendState {
                next_lsn,
                active,
                reserved_end,
            }),
            segments: RwLock::new(segments.into_iter().map(|s| (s.first_lsn, s)).collect()),
            spares,
            stopping: AtomicBool::new(false),
            options,
            report,
        });
        let mut threads = vec![inner.spares.start()?];
        if let Durability::Batched { max_delay } = inner.options.durability {
            let batch_inner = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("herald-wal-batch-sync".into())
                    .spawn(move || batch_inner.run_batch_syncer(max_delay))
                    .map_err(|e| Error::io("starting the batch-sync thread", e))?,
            );
        }
        Ok(Wal { inner, threads })
    }

    /// Appends a record without waiting for durability: when this returns the record and every
    /// record before it are written to the OS (readable, and surviving the death of this process,
    /// not a power loss). Any number of threads may append at once.
    pub fn append(&self, kind: u8, payload: &[u8]) -> Result<Appended> {
        self.inner.append(kind, payload)
    }

    /// Appends a record and waits as the log's [`Durability`] says: under `Sync`, the record is
    /// durable when this returns.
    pub fn commit(&self, kind: u8, payload: &[u8]) -> Result<Appended> {
        let appended = self.inner.append(kind, payload)?;
        if self.inner.options.durability == Durability::Sync {
            self.inner.group.wait_durable(appended.lsn)?;
        }
        Ok(appended)
    }

    /// Blocks until `lsn` (and every record before it) is durable.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<()> {
        self.inner.check_open()?;
        self.inner.group.wait_durable(lsn)
    }

    /// [`Wal::wait_durable`] that, for up to `grace`, leaves the `fdatasync` to other
    /// committers (a sync they run that covers `lsn` ends the wait) and only then syncs itself.
    /// For records whose durability is awaited off the critical path — acknowledgements of
    /// arrivals that a receiving application's commit is about to make durable anyway — so that
    /// the wait does not start a sync that the application's commit would then have to wait
    /// out before its own.
    pub fn wait_durable_lazily(&self, lsn: Lsn, grace: Duration) -> Result<()> {
        self.inner.check_open()?;
        self.inner.group.wait_durable_lazily(lsn, grace)
    }

    /// Makes every record appended so far durable; returns the durable LSN.
    pub fn sync(&self) -> Result<Lsn> {
        self.inner.check_open()?;
        let last = Lsn(self.inner.append.lock().next_lsn.0 - 1);
        self.inner.group.wait_durable(last)?;
        Ok(self.durable_lsn())
    }

    /// Spares made from released segments since open: segment files reused (renamed, their old
    /// records refused by the new salt) instead of zero-filled.
    pub fn segments_reused(&self) -> u64 {
        self.inner.spares.reused()
    }

    /// Spare segments ready for the next roll-overs now (the spare thread keeps
    /// `Options::spare_segments` of them).
    pub fn spares_ready(&self) -> usize {
        self.inner.spares.ready()
    }

    /// LSN the next append will get.
    pub fn next_lsn(&self) -> Lsn {
        self.inner.append.lock().next_lsn
    }

    /// Every record up to this LSN is durable.
    pub fn durable_lsn(&self) -> Lsn {
        self.inner.group.durable()
    }

    /// Every record up to this LSN is written to the OS and readable.
    pub fn written_lsn(&self) -> Lsn {
        self.inner.group.written()
    }

    /// The oldest LSN still in the log (not released).
    pub fn first_lsn(&self) -> Lsn {
        self.inner
            .segments
            .read()
            .keys()
            .next()
            .copied()
            .expect("a live log always has an active segment")
    }

    /// The write backend in use. For a log opened by [`Wal::open`] or [`Wal::recover`] this is
    /// `Pwrite` or `IoUring`, never `Auto`; a log on a caller's [`Storage`] reports its options'
    /// value (the storage decides how it writes).
    pub fn write_backend(&self) -> WriteBackend {
        self.inner.options.write_backend
    }

    /// What the recovery that opened this log found and did.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// Largest payload one record may carry.
    pub fn record_payload_bytes_max(&self) -> u64 {
        self.inner.options.record_payload_bytes_max()
    }

    /// Reads and checks (checksum included) the record at `position`.
    pub fn read(&self, position: Position) -> Result<Record> {
        let segment = self.segment_at(position)?;
        let payload_max = payload_max_for(segment.segment_bytes);
        match segment.record_at(position.offset as u64, payload_max)? {
            Ok((header, payload)) => Ok(Record {
                lsn: header.lsn,
                kind: header.kind,
                position,
                payload,
            }),
            Err(reason) => Err(Error::NoRecordAt { position, reason }),
        }
    }

    /// The payload of a record this handle appended (what `append` or `commit` returned), as
    /// bytes borrowed from the log, without checking its checksum again: they are the bytes
    /// this process just wrote, and reading them back through the map costs a pass over them.
    pub fn appended_payload(&self, appended: &Appended) -> Result<RecordBytes> {
        let position = appended.position;
        self.segment_at(position)?
            .payload_bytes(
                position.offset as u64 + RECORD_HEADER_BYTES,
                appended.payload_len as u64,
            )?
            .ok_or_else(|| Error::NoRecordAt {
                position,
                reason: "the record is not written yet".into(),
            })
    }

    /// The live segment `position` points into.
    fn segment_at(&self, position: Position) -> Result<Arc<Segment>> {
        self.inner
            .segments
            .read()
            .get(&position.segment)
            .cloned()
            .ok_or_else(|| Error::NoRecordAt {
                position,
                reason: "no such segment in the log (released, or never existed)".into(),
            })
    }

    /// Iterates the written records from `from` on, in LSN order, checking each.
    pub fn records_from(&self, from: Lsn) -> Result<Records> {
        let segments: Vec<Arc<Segment>> = self.inner.segments.read().values().cloned().collect();
        let first = segments.first().map(|s| s.first_lsn).unwrap_or_default();
        let written = self.written_lsn();
        let from = Lsn(from.0.max(first.0));
        if from.0 > written.0 + 1 {
            return Err(Error::LsnOutOfRange {
                lsn: from,
                first,
                next: written.next(),
            });
        }
        // Start in the last segment whose first LSN is at or before `from`.
        let start = segments
            .iter()
            .rposition(|s| s.first_lsn <= from)
            .unwrap_or(0);
        Ok(Records {
            scanner: Scanner::new(segments[start..].to_vec(), 0),
            from,
            through: written,
        })
    }

    /// Releases every segment whose records all have LSNs below `lsn` (the active segment is
    /// never released). Each is renamed `…released` (durably, oldest first, so the log stays a
    /// contiguous run of segments whatever the crash) and, when its last reader drops it, reused
    /// as a spare or deleted. Returns how many segments were released.
    ///
    /// Records of a released segment that are not durable yet (`Durability::None` or `Batched`)
    /// are synced first: until then the group commit holds the segment for its next sync, so
    /// without one (`None` and no `sync`) released files would never be let go.
    pub fn release_before(&self, lsn: Lsn) -> Result<usize> {
        self.inner.check_open()?;
        let (victims, successor): (Vec<Arc<Segment>>, Option<Lsn>) = {
            let segments = self.inner.segments.read();
            let list: Vec<&Arc<Segment>> = segments.values().collect();
            let pairs: Vec<_> = list
                .windows(2)
                .take_while(|pair| pair[1].first_lsn <= lsn)
                .collect();
            (
                pairs.iter().map(|pair| pair[0].clone()).collect(),
                pairs.last().map(|pair| pair[1].first_lsn),
            )
        };
        if let Some(successor) = successor
            && self.inner.group.durable() < Lsn(successor.0.saturating_sub(1))
        {
            self.inner
                .group
                .wait_durable(Lsn(successor.0.saturating_sub(1)))?;
        }
        for segment in &victims {
            let retired = format!("{:020}{RELEASED_SUFFIX}", segment.first_lsn.0);
            let storage = &self.inner.storage;
            storage
                .rename(&segment.name, &retired)
                .map_err(|e| Error::io(format!("releasing segment {}", segment.name), e))?;
            // Renamed, it is released whether or not the directory sync below succeeds (a
            // crash before it leaves the old name, which recovery takes as released history):
            // kept live, every later release would fail to rename it again.
            self.inner.segments.write().remove(&segment.first_lsn);
            segment.retire(self.inner.spares.clone(), retired);
            storage.sync_dir().map_err(|e| {
                Error::io(
                    format!("syncing the directory after releasing {}", segment.name),
                    e,
                )
            })?;
        }
        Ok(victims.len())
    }

    /// The live segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let active = self.inner.append.lock().active.first_lsn;
        self.inner
            .segments
            .read()
            .values()
            .map(|s| SegmentInfo {
                name: s.name.clone(),
                first_lsn: s.first_lsn,
                segment_bytes: s.segment_bytes,
                written_bytes: s.readable_end(),
                active: s.first_lsn == active,
            })
            .collect()
    }

    /// Syncs everything appended and stops the log's threads, reporting a failed final sync.
    pub fn close(mut self) -> Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<()> {
        if self.inner.stopping.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.spares.stop();
        for thread in &self.threads {
            thread.thread().unpark();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        if self.inner.group.is_poisoned() {
            return self.inner.group.check_poison();
        }
        let last = Lsn(self.inner.append.lock().next_lsn.0 - 1);
        self.inner.group.wait_durable(last)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            tracing::error!(error = %e, "final sync of the write-ahead log failed at drop");
        }
    }
}

fn file_storage(dir: &Path) -> Result<Arc<dyn Storage>> {
    let storage = FileStorage::new(dir)
        .map_err(|e| Error::io(format!("creating log directory {}", dir.display()), e))?;
    Ok(Arc::new(storage))
}

#[cfg(all(target_os = "linux", feature = "io-uring"))]
fn uring_storage(dir: &Path) -> Result<Arc<dyn Storage>> {
    crate::uring::UringStorage::probe().map_err(|e| {
        Error::io(
            "write_backend IoUring: io_uring is not usable here (kernel before 5.6, \
             kernel.io_uring_disabled, or a seccomp filter)",
            e,
        )
    })?;
    let storage = crate::uring::UringStorage::new(dir)
        .map_err(|e| Error::io(format!("creating log directory {}", dir.display()), e))?;
    Ok(Arc::new(storage))
}

#[cfg(not(all(target_os = "linux", feature = "io-uring")))]
fn uring_storage(_dir: &Path) -> Result<Arc<dyn Storage>> {
    Err(Error::InvalidOptions(
        "write_backend IoUring needs herald-wal built with its `io-uring` feature, on Linux".into(),
    ))
}

impl Inner {
    fn check_open(&self) -> Result<()> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn append(&self, kind: u8, payload: &[u8]) -> Result<Appended> {
        if kind == 0 {
            return Err(Error::ReservedKind);
        }
        let max = self.options.record_payload_bytes_max();
        if payload.len() as u64 > max {
            return Err(Error::RecordTooLarge {
                len: payload.len(),
                max: max as usize,
            });
        }
        self.check_open()?;
        self.group.check_poison()?;
        let stored = format::stored_bytes(payload.len() as u64);
        let (lsn, segment, offset) = {
            let mut state = self.append.lock();
            if state.reserved_end + stored > state.active.segment_bytes {
                let next = activate_spare(
                    self.storage.as_ref(),
                    &self.spares,
                    state.next_lsn,
                    true,
                    &self.dir_lock,
                )?;
                self.segments.write().insert(next.first_lsn, next.clone());
                state.active = next;
                state.reserved_end = SEGMENT_HEADER_BYTES;
            }
            let lsn = state.next_lsn;
            let offset = state.reserved_end;
            state.next_lsn = lsn.next();
            state.reserved_end += stored;
            self.spares.note_log_bytes(stored);
            (lsn, state.active.clone(), offset)
        };
        let mut record = Vec::with_capacity(stored as usize);
        format::encode_record(
            &mut record,
            lsn,
            self.group.durable(),
            kind,
            payload,
            segment.salt,
        );
        if let Err(e) = write_all_at(segment.file.as_ref(), &record, offset) {
            // The LSN is reserved and will never be written: no later record may become durable
            // past this gap, so the log is poisoned.
            let cause = format!(
                "writing record {lsn} to segment {} at offset {offset} failed: {e}",
                segment.name
            );
            self.group.poison(cause.clone());
            return Err(Error::Poisoned { cause });
        }
        self.group.mark_written(lsn, &segment, offset + stored);
        // Returning means "written": readable, and safe from a crash of this process, which
        // needs every earlier record written too (recovery stops at the first missing one).
        self.group.wait_written(lsn)?;
        Ok(Appended {
            lsn,
            position: Position {
                segment: segment.first_lsn,
                offset: offset as u32,
            },
            payload_len: payload.len() as u32,
        })
    }

    fn run_batch_syncer(&self, max_delay: Duration) {
        while !self.stopping.load(Ordering::SeqCst) {
            std::thread::park_timeout(max_delay);
            let written = self.group.written();
            if written > self.group.durable()
                && let Err(e) = self.group.wait_durable(written)
            {
                tracing::error!(error = %e, "batched sync failed");
                return;
            }
        }
    }
}

/// Turns a spare into the segment that starts at `first_lsn`: header written and synced, file
/// renamed to its segment name, directory synced. Only then may records go into it.
pub(crate) fn activate_spare(
    storage: &dyn Storage,
    spares: &Spares,
    first_lsn: Lsn,
    for_roll_over: bool,
    dir_lock: &crate::segment::DirLock,
) -> Result<Arc<Segment>> {
    let spare = spares.take(for_roll_over)?;
    let name = segment_file_name(first_lsn);
    let segment_bytes = spares.segment_bytes();
    // A fresh salt: whatever the file held before (a recycled segment's records) never checks
    // out as a record of this segment.
    let header = SegmentHeader {
        version: FORMAT_VERSION,
        first_lsn,
        segment_bytes,
        salt: Salt::random(),
        reused: spare.reused,
    };
    let context = |what: &str| format!("activating segment {name} ({what})");
    write_all_at(spare.file.as_ref(), &header.encode(), 0)
        .map_err(|e| Error::io(context("writing header"), e))?;
    spare
        .file
        .sync_data()
        .map_err(|e| Error::io(context("syncing header"), e))?;
    storage
        .rename(&spare.name, &name)
        .map_err(|e| Error::io(context("renaming spare"), e))?;
    storage
        .sync_dir()
        .map_err(|e| Error::io(context("syncing directory"), e))?;
    Ok(Arc::new(Segment::new(
        &header,
        name,
        spare.file,
        SEGMENT_HEADER_BYTES,
        dir_lock,
    )?))
}

/// Iterator over written records from some LSN on (see [`Wal::records_from`]).
pub struct Records {
    scanner: Scanner,
    from: Lsn,
    /// The written LSN when the iterator was made: the log is contiguous up to here.
    through: Lsn,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("expected", &self.scanner.expected)
            .field("through", &self.through)
            .finish()
    }
}

impl Iterator for Records {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        while self.scanner.expected <= self.through {
            match self.scanner.step() {
                Ok(Step::Record(record)) if record.lsn >= self.from => return Some(Ok(record)),
                Ok(Step::Record(_)) => {}
                Ok(Step::Break(reason)) => {
                    // A live log is contiguous up to its written LSN; anything else is damage
                    // that appeared after recovery checked it. Stop after reporting it.
                    self.through = Lsn(0);
                    return Some(Err(Error::Corruption {
                        segment: self.scanner.segment().name.clone(),
                        offset: self.scanner.offset,
                        reason: reason.to_string(),
                    }));
                }
                Err(e) => {
                    self.through = Lsn(0);
                    return Some(Err(e));
                }
            }
        }
        None
    }
}
