//! Read-only memory maps of segment files: the only module of Herald with `unsafe` code.
//!
//! A [`Map`] maps a whole segment file and hands out sub-slices of it, never a slice of the
//! whole mapping. It only returns bytes below its *readable end*, and the log keeps this
//! invariant (FORMAT.md, invariant 8):
//!
//! > Bytes of a segment below the readable end of its map are never written again while the map
//! > exists, and the file is never shortened while it is mapped.
//!
//! It holds because (a) the writer only writes at offsets at or past the segment's reserved end,
//! which never moves backwards, and the readable end only advances over records whose writes have
//! completed; (b) truncating a torn tail (the only rewrite of old bytes) happens during recovery
//! before any readable end is published past it; (c) a segment file is deleted, or reused as a
//! new segment (and written again), only after the last `Arc<Segment>` is dropped and its map
//! unmapped, and Herald never shortens a segment file; and
//! (d) the directory's exclusive lock file keeps other Herald logs out — other processes, and
//! other opens in this one: every `Segment` holds the lock (`segment::DirLock`), so it is held
//! until the last map of the directory is gone, not only while a `Wal` handle lives.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// A read-only shared mapping of one segment file.
#[derive(Debug)]
pub struct Map {
    mmap: memmap2::MmapRaw,
    /// Bytes in `[0, readable_end)` are complete and immutable (module invariant above).
    readable_end: AtomicU64,
}

impl Map {
    /// Maps the first `len` bytes of `file`. The caller has checked that the file is at least
    /// `len` bytes long, so no access through the map can fault past the end of the file.
    pub fn new(file: &File, len: u64, readable_end: u64) -> io::Result<Map> {
        let actual = file.metadata()?.len();
        if actual < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file holds {actual} bytes, mapping needs {len}"),
            ));
        }
        let map_len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mapping too large"))?;
        // A raw read-only map: creating it is safe; reading through it is the unsafe part,
        // confined to `bytes` below.
        let mmap = memmap2::MmapOptions::new()
            .len(map_len)
            .map_raw_read_only(file)?;
        Ok(Map {
            mmap,
            readable_end: AtomicU64::new(readable_end.min(len)),
        })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    /// Everything below `end` is now complete and will never be written again. Only ever moves
    /// forward.
    pub fn publish_readable_end(&self, end: u64) {
        self.readable_end
            .fetch_max(end.min(self.len()), Ordering::Release);
    }

    /// Moves the readable end back to `end`. Used once, when recovery has scanned past the tail
    /// and is about to truncate it: the scanner that read beyond `end` is gone (it is consumed by
    /// `Recovery::finish`), and the records handed out lie below `end`.
    pub fn retract_readable_end(&self, end: u64) {
        self.readable_end
            .store(end.min(self.len()), Ordering::Release);
    }

    pub fn readable_end(&self) -> u64 {
        self.readable_end.load(Ordering::Acquire)
    }

    /// The bytes in `[start, start + len)`, or `None` if any of them is not yet readable.
    pub fn bytes(&self, start: u64, len: u64) -> Option<&[u8]> {
        let end = start.checked_add(len)?;
        if end > self.readable_end() {
            return None;
        }
        let start = usize::try_from(start).ok()?;
        let len = usize::try_from(len).ok()?;
        // SAFETY: `end <= readable_end <= self.mmap.len()`, so the range lies inside the mapping,
        // which stays mapped for the lifetime of `&self` (the slice borrows `self`), and the file
        // is at least as long as the mapping (checked in `new`, never shortened: invariant (c)),
        // so reading cannot fault. By the module invariant, bytes below `readable_end` are never
        // modified while the map exists, by this process or another Herald process, so the
        // shared slice is never aliased by a write for as long as it lives.
        Some(unsafe { std::slice::from_raw_parts(self.mmap.as_ptr().add(start), len) })
    }
}
