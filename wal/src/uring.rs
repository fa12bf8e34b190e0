//! The io_uring write backend: a [`Storage`] whose files write with `IORING_OP_WRITE` and sync
//! with `IORING_OP_FSYNC` + `IORING_FSYNC_DATASYNC` (the io_uring form of `fdatasync`). Reads,
//! sizes and maps go to the plain file, exactly as in [`FileStorage`].
//!
//! This is the second and last module of Herald allowed `unsafe` code (after `map`): handing a
//! buffer to io_uring hands the kernel a raw pointer that it dereferences later, after the call
//! that queued it, so the borrow checker cannot see how long the buffer must live. Every
//! operation here is *submit, then wait for its own completion before returning*, so a buffer
//! borrowed for the duration of `write_at` outlives the operation that reads it. That rule is
//! enforced in one place, [`run_on_ring`], whose `// SAFETY:` comments say why it holds on every
//! path, including errors and interrupted waits.
//!
//! # One ring per thread
//!
//! A ring is not `Sync`. Each thread that writes or syncs gets its own small ring, created
//! lazily and kept in a thread-local until the thread exits. The alternative, one ring behind a
//! mutex, would put the sync leader's `fdatasync` in the same queue as the appenders' writes:
//! either the lock is held across the wait (a write waits for a whole sync, the serialization
//! group commit exists to avoid) or completions must be routed between threads (a reactor, with
//! its own thread and wake-ups). Per-thread rings keep every operation on the thread that asked
//! for it, with no lock, at the price of one ring (a file descriptor and a few pages) per thread
//! that ever wrote. A thread that cannot get a ring (creation failed, or its thread-locals are
//! being torn down) falls back to `pwrite`/`fdatasync` for that operation: the two are the same
//! operation on the same file, so durability does not depend on which carried it.
//!
//! # What the backend changes, and what it does not
//!
//! The overlap of writing batch N+1 while batch N syncs does not come from io_uring: it comes from
//! the group-commit design (`group_commit`), where appenders write their own records outside any
//! lock while one leader thread syncs, so it holds with `pwrite` too. Each call here still waits
//! for its own completion, so a thread sees the same blocking calls as with `pwrite`.
//!
//! # Writes are offered without blocking, never handed to a kernel worker
//!
//! A write the kernel cannot do at once, io_uring hands to a kernel worker thread, and the
//! waiting thread is woken when the worker is done. ext4 (and tmpfs) do no buffered write without
//! blocking at all, so there *every* write took that detour: with 64 committers the log spent
//! 25 µs of CPU per commit instead of `pwrite`'s 9 and reached half its throughput (8.3× one
//! committer against 15.9×, `cargo bench -p herald-benches --features io-uring --bench wal`).
//! So each write goes to the ring with `RWF_NOWAIT`: done inline where the file system can
//! (XFS and btrfs have non-blocking buffered writes since Linux 6.0/6.1; not measured here,
//! this machine has only ext4 and tmpfs), and otherwise answered at once (`EAGAIN`, or
//! `EOPNOTSUPP` from tmpfs) and written with `pwrite` on the calling thread, the hand-off
//! saved. A file whose first
//! [`NOWAIT_PROBE_WRITES`] writes are all refused stops offering them (counted by
//! [`UringStorage::refused_writes`]); once a write of a file was done inline, refusals are taken
//! as passing and it keeps offering. Syncs always go through the ring, and there always to a
//! worker (an `fdatasync` blocks): one per commit group. On ext4 the backend thus writes with
//! `pwrite` and syncs through the ring, and measures as `pwrite` does.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, squeue, types};

use crate::map::Map;
use crate::storage::{FileStorage, Storage, StorageFile};

/// The log in a real directory, writing and syncing through io_uring.
#[derive(Debug, Clone)]
pub struct UringStorage {
    files: FileStorage,
    counts: Arc<OperationCounts>,
}

impl UringStorage {
    /// Checks that this kernel lets this process use io_uring with the operations the backend
    /// needs (`IORING_OP_WRITE`, Linux 5.6, and `IORING_OP_FSYNC`). Fails when io_uring is
    /// missing, disabled (`kernel.io_uring_disabled`) or blocked (a seccomp filter).
    pub fn probe() -> io::Result<()> {
        let ring = new_ring()?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Write::CODE, "IORING_OP_WRITE"),
            (opcode::Fsync::CODE, "IORING_OP_FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring does not support {name}"),
                ));
            }
        }
        Ok(())
    }

    /// Uses `dir`, creating it (and its parents) if needed. Does not probe: call
    /// [`UringStorage::probe`] first (`Wal::open` does), or every operation falls back to the
    /// plain system call (counted by [`UringStorage::fallback_operations`]).
    pub fn new(dir: impl AsRef<Path>) -> io::Result<UringStorage> {
        Ok(UringStorage {
            files: FileStorage::new(dir)?,
            counts: Arc::new(OperationCounts::default()),
        })
    }

    /// Writes and syncs of this storage's files that completed through an io_uring ring.
    pub fn ring_operations(&self) -> u64 {
        self.counts.ring.load(Ordering::Relaxed)
    }

    /// Writes and syncs that went through `pwrite`/`fdatasync` instead: no ring on the calling
    /// thread, or the ring answered `EINTR`/`EAGAIN`.
    pub fn fallback_operations(&self) -> u64 {
        self.counts.fallback.load(Ordering::Relaxed)
    }

    /// Writes made with `pwrite` because the file system does not take buffered writes without
    /// blocking (ext4 and tmpfs refuse every one; see the module documentation), counting those
    /// a file no longer offers to the ring after [`NOWAIT_PROBE_WRITES`] refusals.
    pub fn refused_writes(&self) -> u64 {
        self.counts.refused_writes.load(Ordering::Relaxed)
    }

    fn file(&self, file: File) -> Arc<dyn StorageFile> {
        Arc::new(UringFile {
            file,
            counts: self.counts.clone(),
            nowait: NowaitWrites::default(),
        })
    }
}

impl Storage for UringStorage {
    fn location(&self) -> PathBuf {
        self.files.location()
    }

    fn lock(&self) -> io::Result<Box<dyn Debug + Send + Sync>> {
        self.files.lock()
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.files.list()
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.location().join(name))?;
        Ok(self.file(file))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.location().join(name))?;
        Ok(self.file(file))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.files.rename(from, to)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.files.remove(name)
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.files.sync_dir()
    }
}

/// A file on disk whose writes and syncs go through io_uring.
#[derive(Debug)]
struct UringFile {
    file: File,
    counts: Arc<OperationCounts>,
    nowait: NowaitWrites,
}

impl StorageFile for UringFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        // A longer write would be cut short by the kernel anyway (`MAX_RW_COUNT`); the caller
        // (`write_all_at`) continues after short writes.
        let len = buf.len().min(WRITE_BYTES_MAX as usize);
        let buf = &buf[..len];
        if !self.nowait.worth_offering() {
            self.counts.refused_writes.fetch_add(1, Ordering::Relaxed);
            return self.file.write_at(buf, offset);
        }
        let entry = opcode::Write::new(types::Fd(self.file.as_raw_fd()), buf.as_ptr(), len as u32)
            .offset(offset)
            .rw_flags(RWF_NOWAIT)
            .build();
        // SAFETY: the entry reads `len` bytes from `buf`, which is borrowed for this whole call,
        // and names the descriptor of `self.file`, which `&self` keeps open; `run_on_ring`
        // returns only once the operation can no longer touch either.
        let result = unsafe { run_on_ring(entry) };
        match &result {
            Some(Err(e)) if is_nowait_refusal(e) => {
                // Not written: write it here, blocking this thread as `pwrite` does, rather
                // than have a kernel worker do it and wake us.
                self.nowait.refused();
                self.counts.refused_writes.fetch_add(1, Ordering::Relaxed);
                return self.file.write_at(buf, offset);
            }
            Some(Ok(_)) => self.nowait.done_inline(),
            _ => {}
        }
        match self.finish(result) {
            Some(written) => written.map(|n| n as usize),
            None => self.file.write_at(buf, offset),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        // SAFETY: the entry borrows no memory; it names the descriptor of `self.file`, which
        // `&self` keeps open until `run_on_ring` returns, and it returns only once the operation
        // is complete or was never submitted.
        let result = unsafe { run_on_ring(entry) };
        match self.finish(result) {
            Some(synced) => synced.map(|_| ()),
            None => self.file.sync_data(),
        }
    }

    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        crate::storage::allocate(&self.file, len)
    }

    fn map(&self, len: u64, readable_end: u64) -> io::Result<Option<Map>> {
        Map::new(&self.file, len, readable_end).map(Some)
    }
}

impl UringFile {
    /// Counts an operation and decides whether the plain system call must redo it (`None`): when
    /// there was no ring, or the ring answered `EINTR` or `EAGAIN`, which for a regular file say
    /// "not done, try again", and the blocking call is the bounded way to try again.
    fn finish(&self, result: Option<io::Result<u32>>) -> Option<io::Result<u32>> {
        match result {
            Some(Err(e)) if is_transient(&e) => {}
            Some(done) => {
                self.counts.ring.fetch_add(1, Ordering::Relaxed);
                return Some(done);
            }
            None => {}
        }
        self.counts.fallback.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[derive(Debug, Default)]
struct OperationCounts {
    ring: AtomicU64,
    fallback: AtomicU64,
    refused_writes: AtomicU64,
}

/// Writes of one file refused in a row, none of its writes having been done inline before,
/// after which the file stops offering writes to the ring: its file system does not do
/// non-blocking buffered writes, and each offer would cost a system call for nothing.
pub const NOWAIT_PROBE_WRITES: u32 = 8;

/// Whether a file's writes are still worth offering to the ring as non-blocking writes.
#[derive(Debug, Default)]
struct NowaitWrites {
    /// Refusals since the file was opened, counted only while no write was done inline.
    refusals: AtomicU32,
    /// A write of this file was done inline once: its file system can, so refusals from now on
    /// are passing (a lock or a page not at hand) and the file keeps offering.
    inline_seen: AtomicBool,
}

impl NowaitWrites {
    fn worth_offering(&self) -> bool {
        self.inline_seen.load(Ordering::Relaxed)
            || self.refusals.load(Ordering::Relaxed) < NOWAIT_PROBE_WRITES
    }

    fn refused(&self) {
        if !self.inline_seen.load(Ordering::Relaxed) {
            self.refusals.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn done_inline(&self) {
        self.inline_seen.store(true, Ordering::Relaxed);
    }
}

/// `RWF_NOWAIT` (`linux/fs.h`): do the write now, without blocking, or answer `EAGAIN`; never
/// hand it to a kernel worker.
const RWF_NOWAIT: i32 = 0x8;

/// Longest single write handed to the kernel; below Linux's `MAX_RW_COUNT` (2 GiB − 4 KiB).
const WRITE_BYTES_MAX: u32 = 1 << 30;

/// Submission-queue entries per ring. A ring never holds more than one operation in flight; the
/// spare slot costs nothing (the kernel rounds up to a page).
const RING_ENTRIES: u32 = 2;

/// Marks our entries, so a completion can be checked to be the one we wait for.
const USER_DATA: u64 = 0x4845_5241_4c44; // "HERALD"

/// Pause between looks at the completion queue when waiting through `io_uring_enter` failed.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Times `io_uring_enter` may answer "try again" without taking an entry before the operation
/// falls back to the plain system call.
const SUBMIT_ATTEMPTS_MAX: u32 = 16;

enum RingSlot {
    /// This thread has not needed a ring yet.
    Untried,
    Ready(Box<IoUring>),
    /// Creating a ring failed on this thread; it uses the plain system calls from now on.
    Unavailable,
}

thread_local! {
    static RING: RefCell<RingSlot> = const { RefCell::new(RingSlot::Untried) };
}

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

fn new_ring() -> io::Result<IoUring> {
    IoUring::new(RING_ENTRIES)
}

/// Runs one operation on this thread's ring, waiting for its completion, and returns its result:
/// the byte count (writes) or 0 (syncs), or the error the kernel answered. `None` means there is
/// no ring on this thread and nothing was done: the caller must use the plain system call.
///
/// # Safety
///
/// Every buffer and file descriptor the entry names must stay valid until this returns. This
/// function keeps its side: it never returns while the kernel may still use the entry.
unsafe fn run_on_ring(entry: squeue::Entry) -> Option<io::Result<u32>> {
    let entry = entry.user_data(USER_DATA);
    // `try_with` fails while thread-locals are destroyed; `try_borrow_mut` cannot fail (nothing
    // here calls back into this function) but costs nothing to handle.
    RING.try_with(|slot| {
        let mut slot = slot.try_borrow_mut().ok()?;
        if matches!(*slot, RingSlot::Untried) {
            *slot = match new_ring() {
                Ok(ring) => RingSlot::Ready(Box::new(ring)),
                Err(e) => {
                    if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "cannot create an io_uring ring on this thread; it writes with pwrite");
                    }
                    RingSlot::Unavailable
                }
            };
        }
        let RingSlot::Ready(ring) = &mut *slot else {
            return None;
        };
        // SAFETY: our caller keeps the entry's buffer and descriptor valid until we return.
        // `submit_and_wait` below waits for this entry's completion, and on every path that
        // returns early the entry is either complete (its completion was reaped) or was never
        // consumed by the kernel, in which case the ring is dropped with the entry in it, so it
        // can never be submitted later. The queue is empty here (one operation at a time per
        // ring, always reaped before returning), so the push cannot fail for lack of room.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            // Unreachable by the reasoning above; the entry was not queued, so nothing refers to
            // the buffer.
            *slot = RingSlot::Untried;
            return None;
        }
        match wait_for_completion(ring) {
            Ok(result) => Some(result),
            Err(e) => {
                // The kernel never took the entry: drop the ring (and the entry queued in it) so
                // it can never be submitted after our caller's buffer is gone. This operation
                // falls back to the plain system call; the next one makes a new ring.
                tracing::warn!(error = %e, "io_uring refused an operation; using the plain system call");
                *slot = RingSlot::Untried;
                None
            }
        }
    })
    .ok()
    .flatten()
}

/// Submits the one queued entry and waits for its completion. `Err` means the kernel did not
/// take the entry (it is still queued, never submitted); once it is taken, this only returns
/// with its completion.
fn wait_for_completion(ring: &mut IoUring) -> io::Result<io::Result<u32>> {
    let mut refusals = 0;
    loop {
        let entered = ring.submit_and_wait(1);
        if let Some(cqe) = ring.completion().next() {
            debug_assert_eq!(
                cqe.user_data(),
                USER_DATA,
                "one operation per ring at a time"
            );
            let result = cqe.result();
            return Ok(if result < 0 {
                Err(io::Error::from_raw_os_error(-result))
            } else {
                Ok(result as u32)
            });
        }
        // Taken, and the wait ended before the completion (a signal): wait again.
        let Err(e) = entered else { continue };
        let taken = ring.submission().is_empty();
        if !taken {
            refusals += 1;
            if !is_retryable(&e) || refusals >= SUBMIT_ATTEMPTS_MAX {
                return Err(e);
            }
        } else if !is_retryable(&e) {
            // The entry is in flight and waiting through the kernel fails for another reason
            // (nothing should cause this with a valid ring). The completion will still be posted
            // to the shared queue without our help, and returning before it would let the caller
            // free a buffer the kernel may be reading: look at the queue until it comes.
            tracing::error!(error = %e, "io_uring wait failed with an operation in flight; polling for its completion");
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// `EINTR` or `EAGAIN`: nothing happened, trying again is correct.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

/// How a file system answers a non-blocking buffered write it will not do: `EAGAIN` (ext4, or a
/// passing obstacle on file systems that can), or `EOPNOTSUPP` (tmpfs).
fn is_nowait_refusal(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Unsupported
    )
}

/// `io_uring_enter` errors that mean "not now": `EINTR`, `EAGAIN`, and `EBUSY` (completion
/// queue overflowing; cannot happen with one operation in flight, but harmless to wait out).
fn is_retryable(e: &io::Error) -> bool {
    is_transient(e) || e.kind() == io::ErrorKind::ResourceBusy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_on_this_thread() -> bool {
        RING.with(|slot| matches!(*slot.borrow(), RingSlot::Ready(_)))
    }

    #[test]
    fn probe_succeeds_on_the_test_machine() {
        // Fails where io_uring is unavailable: this crate's io_uring tests need a kernel that
        // allows it.
        UringStorage::probe().expect("io_uring is available");
    }

    #[test]
    fn writes_and_syncs_go_through_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let storage = UringStorage::new(dir.path()).unwrap();
        let file = storage.create("f").unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        crate::storage::write_all_at(file.as_ref(), &data, 4096).unwrap();
        file.sync_data().unwrap();
        assert!(ring_on_this_thread());
        assert_eq!(file.size_bytes().unwrap(), 4096 + 10_000);
        let mut back = vec![0u8; data.len()];
        crate::storage::read_exact_at(file.as_ref(), &mut back, 4096).unwrap();
        assert_eq!(back, data);
        // The sync went through the ring; the writes did too, or were refused by the file
        // system and written with pwrite (ext4, where the tests run, refuses them all).
        assert!(storage.ring_operations() >= 1);
        assert!(storage.ring_operations() + storage.refused_writes() >= 2);
        assert_eq!(storage.fallback_operations(), 0);
    }

    #[test]
    fn a_file_whose_writes_are_refused_stops_offering_them_to_the_ring() {
        let nowait = NowaitWrites::default();
        for _ in 0..NOWAIT_PROBE_WRITES {
            assert!(nowait.worth_offering());
            nowait.refused();
        }
        assert!(!nowait.worth_offering());
        // One write done inline shows the file system can: refusals are passing from then on.
        let nowait = NowaitWrites::default();
        nowait.refused();
        nowait.done_inline();
        for _ in 0..10 * NOWAIT_PROBE_WRITES {
            nowait.refused();
        }
        assert!(nowait.worth_offering());
    }

    #[test]
    fn writes_a_file_system_refuses_are_written_all_the_same() {
        // tmpfs answers non-blocking buffered writes with EOPNOTSUPP (ext4 with EAGAIN): both
        // must end in a write, not an error. Needs /dev/shm, which Linux machines have.
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "this test needs a tmpfs at /dev/shm");
        let dir = tempfile::tempdir_in(shm).unwrap();
        let storage = UringStorage::new(dir.path()).unwrap();
        let file = storage.create("f").unwrap();
        let writes = 2 * u64::from(NOWAIT_PROBE_WRITES);
        for i in 0..writes {
            crate::storage::write_all_at(file.as_ref(), &i.to_le_bytes(), i * 8).unwrap();
        }
        file.sync_data().unwrap();
        for i in 0..writes {
            let mut word = [0u8; 8];
            crate::storage::read_exact_at(file.as_ref(), &mut word, i * 8).unwrap();
            assert_eq!(u64::from_le_bytes(word), i);
        }
        assert_eq!(storage.fallback_operations(), 0);
        assert!(storage.ring_operations() >= 1, "the sync");
    }

    #[test]
    fn kernel_errors_come_back_as_io_errors() {
        // Pins: a negative completion result must become an error, not a huge byte count.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ro"), b"x").unwrap();
        let file = UringFile {
            file: File::open(dir.path().join("ro")).unwrap(),
            counts: Arc::default(),
            nowait: NowaitWrites::default(),
        };
        let e = file.write_at(b"abc", 0).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(9),
            "EBADF: the file is read-only, got {e}"
        );
        assert_eq!(file.counts.ring.load(Ordering::Relaxed), 1);
        // The ring is still usable after a failed operation.
        file.sync_data().unwrap();
        assert!(ring_on_this_thread());
    }

    #[test]
    fn each_thread_gets_its_own_ring() {
        let dir = tempfile::tempdir().unwrap();
        let storage = UringStorage::new(dir.path()).unwrap();
        let file = storage.create("f").unwrap();
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let file = &file;
                scope.spawn(move || {
                    for i in 0..50u64 {
                        let offset = (t * 50 + i) * 8;
                        crate::storage::write_all_at(file.as_ref(), &offset.to_le_bytes(), offset)
                            .unwrap();
                        if i % 10 == 0 {
                            file.sync_data().unwrap();
                        }
                    }
                    assert!(ring_on_this_thread());
                });
            }
        });
        for slot in 0..200u64 {
            let mut word = [0u8; 8];
            crate::storage::read_exact_at(file.as_ref(), &mut word, slot * 8).unwrap();
            assert_eq!(u64::from_le_bytes(word), slot * 8);
        }
        assert_eq!(storage.fallback_operations(), 0);
    }
}
