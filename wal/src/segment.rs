//! One segment file of the log: its name, its map, how far it is readable, and the borrowed
//! bytes of its records.
//!
//! Invariant: a segment's readable end only moves forward, over records whose writes have
//! completed; bytes below it never change while the segment is alive. A released segment's file
//! is deleted when the last `Arc<Segment>` drops, so bytes handed out as [`RecordBytes`] stay
//! mapped and valid for as long as anyone holds them.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::Lsn;
use crate::error::{Error, Result};
use crate::format::{Salt, SegmentHeader};
use crate::map::Map;
use crate::spares::Spares;
use crate::storage::{StorageFile, read_exact_at};

/// Suffix of live segment files: `{first_lsn:020}.seg`.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of released segments waiting for their last reader: deleted at drop or at next open.
pub const RELEASED_SUFFIX: &str = ".released";

/// File name of the segment whose first record has LSN `first_lsn`.
pub fn segment_file_name(first_lsn: Lsn) -> String {
    format!("{:020}{SEGMENT_SUFFIX}", first_lsn.0)
}

/// The first LSN encoded in a segment file name, if `name` is one.
pub fn parse_segment_file_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Lsn)
}

/// The log directory's lock (`Storage::lock`), shared: the log holds it, and so does every
/// segment, so that it outlives the last `RecordBytes` borrowing a segment's map. Released
/// while bytes were still borrowed, another `Wal::open` of the directory could reuse the
/// segment's file and rewrite bytes handed out as immutable.
pub(crate) type DirLock = Arc<dyn fmt::Debug + Send + Sync>;

pub(crate) struct Segment {
    pub first_lsn: Lsn,
    pub name: String,
    /// Size of the segment file, from its header.
    pub segment_bytes: u64,
    /// What its records' checksums start from, from its header.
    pub salt: Salt,
    /// Made from a released segment's file (its header says so): see `SegmentHeader::reused`.
    pub reused: bool,
    pub file: Arc<dyn StorageFile>,
    map: Option<Map>,
    /// Bytes below this offset are complete records (or header) and never change again.
    readable_end: AtomicU64,
    /// Set by release: the file's new name, handed to the spares (reused or deleted) when this
    /// segment drops.
    retired_as: Mutex<Option<(Arc<Spares>, String)>>,
    _dir_lock: DirLock,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.name)
            .field("readable_end", &self.readable_end())
            .finish()
    }
}

impl Segment {
    pub fn new(
        header: &SegmentHeader,
        name: String,
        file: Arc<dyn StorageFile>,
        readable_end: u64,
        dir_lock: &DirLock,
    ) -> Result<Segment> {
        let segment_bytes = header.segment_bytes;
        let map = file
            .map(segment_bytes, readable_end)
            .map_err(|e| Error::io(format!("mapping segment {name}"), e))?;
        Ok(Segment {
            first_lsn: header.first_lsn,
            name,
            segment_bytes,
            salt: header.salt,
            reused: header.reused,
            file,
            map,
            readable_end: AtomicU64::new(readable_end),
            retired_as: Mutex::new(None),
            _dir_lock: dir_lock.clone(),
        })
    }

    pub fn readable_end(&self) -> u64 {
        self.readable_end.load(Ordering::Acquire)
    }

    /// Records below `end` are completely written. Only ever moves forward.
    pub fn publish_readable_end(&self, end: u64) {
        if let Some(map) = &self.map {
            map.publish_readable_end(end);
        }
        self.readable_end.fetch_max(end, Ordering::Release);
    }

    /// Recovery only: the scan read up to the file's end; the log continues from `end`.
    pub fn retract_readable_end(&self, end: u64) {
        if let Some(map) = &self.map {
            map.retract_readable_end(end);
        }
        self.readable_end.store(end, Ordering::Release);
    }

    /// The readable bytes of this segment from `start` on, for scanning: borrowed from the map,
    /// or copied once (backends without maps).
    pub fn scan_view(self: &Arc<Self>, start: u64) -> Result<ScanView> {
        let end = self.readable_end().max(start);
        if self.map.is_some() {
            return Ok(ScanView {
                source: Source::Mapped(self.clone()),
                base: start,
                len: end - start,
            });
        }
        let mut buf = vec![0u8; (end - start) as usize];
        read_exact_at(self.file.as_ref(), &mut buf, start)
            .map_err(|e| Error::io(format!("reading segment {}", self.name), e))?;
        Ok(ScanView {
            source: Source::Owned(buf.into()),
            base: start,
            len: end - start,
        })
    }

    /// Marks the segment released under `retired_name`: when the last reference drops, its file
    /// goes to `spares`, which reuse it as a spare or delete it.
    pub fn retire(&self, spares: Arc<Spares>, retired_name: String) {
        *self.retired_as.lock() = Some((spares, retired_name));
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Some((spares, name)) = self.retired_as.get_mut().take() {
            // Unmapped before the file may be reused and written again (map invariant (c)).
            drop(self.map.take());
            spares.recycle(name, self.file.clone());
        }
    }
}

#[derive(Clone)]
enum Source {
    Mapped(Arc<Segment>),
    Owned(Arc<[u8]>),
}

/// Bytes `[base, base + len)` of one segment, all below its readable end.
#[derive(Clone)]
pub(crate) struct ScanView {
    source: Source,
    base: u64,
    len: u64,
}

impl ScanView {
    /// Bytes from segment offset `offset` to the end of the view (empty if past it).
    pub fn from(&self, offset: u64) -> &[u8] {
        let all = self.all();
        let skip = offset.saturating_sub(self.base).min(all.len() as u64) as usize;
        &all[skip..]
    }

    fn all(&self) -> &[u8] {
        match &self.source {
            Source::Mapped(segment) => segment
                .map
                .as_ref()
                .and_then(|map| map.bytes(self.base, self.len))
                .expect("a scan view lies below the readable end, which only retracts after scans"),
            Source::Owned(buf) => buf,
        }
    }

    /// The record payload at segment offsets `range`, as bytes that keep the segment alive.
    pub fn record_bytes(&self, range: Range<u64>) -> RecordBytes {
        debug_assert!(range.start >= self.base && range.end <= self.base + self.len);
        let len = range.end - range.start;
        match &self.source {
            // Mapped bytes are addressed by segment offset, so they stay readable however the
            // segment's readable end moves later (it never retracts below a handed-out record).
            Source::Mapped(_) => RecordBytes {
                source: self.source.clone(),
                start: range.start as u32,
                len: len as u32,
            },
            Source::Owned(_) => RecordBytes {
                source: self.source.clone(),
                start: (range.start - self.base) as u32,
                len: len as u32,
            },
        }
    }
}

/// A record's payload, borrowed from the segment's map where there is one. Holding it keeps the
/// segment (and its map) alive, so releasing the segment never pulls the bytes away.
#[derive(Clone)]
pub struct RecordBytes {
    source: Source,
    /// Segment offset (mapped) or index into the owned buffer. Segments are at most 1 GiB, so
    /// 32 bits suffice, and every queued message of the engine holds one of these.
    start: u32,
    len: u32,
}

impl RecordBytes {
    pub(crate) fn owned(bytes: Vec<u8>) -> RecordBytes {
        RecordBytes {
            len: u32::try_from(bytes.len()).expect("a record is smaller than a segment"),
            source: Source::Owned(bytes.into()),
            start: 0,
        }
    }

    /// A sub-range of these bytes, sharing the same segment reference (no copy). Panics if
    /// `range` is out of bounds, as slice indexing does.
    pub fn slice(&self, range: Range<usize>) -> RecordBytes {
        assert!(
            range.start <= range.end && range.end <= self.len as usize,
            "range {range:?} out of bounds of {} record bytes",
            self.len
        );
        RecordBytes {
            source: self.source.clone(),
            start: self.start + range.start as u32,
            len: (range.end - range.start) as u32,
        }
    }

    /// Whether the bytes are borrowed from a memory map (as opposed to copied).
    pub fn is_mapped(&self) -> bool {
        matches!(self.source, Source::Mapped(_))
    }
}

impl Deref for RecordBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.source {
            Source::Mapped(segment) => segment
                .map
                .as_ref()
                .and_then(|map| map.bytes(self.start as u64, self.len as u64))
                .expect("record bytes lie below the readable end, which never retracts below them"),
            Source::Owned(buf) => {
                &buf[self.start as usize..self.start as usize + self.len as usize]
            }
        }
    }
}

/// Bytes that are not (or not yet) in a log, held the same way: a message built in memory.
impl From<Vec<u8>> for RecordBytes {
    fn from(bytes: Vec<u8>) -> RecordBytes {
        RecordBytes::owned(bytes)
    }
}

impl From<&[u8]> for RecordBytes {
    fn from(bytes: &[u8]) -> RecordBytes {
        RecordBytes::owned(bytes.to_vec())
    }
}

impl AsRef<[u8]> for RecordBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for RecordBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordBytes")
            .field("len", &self.len)
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

impl PartialEq<[u8]> for RecordBytes {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl Segment {
    /// Bytes `[start, start + len)` of this segment, which must lie below the readable end
    /// (`None` otherwise), unchecked: for records whose bytes this process wrote.
    pub fn payload_bytes(self: &Arc<Self>, start: u64, len: u64) -> Result<Option<RecordBytes>> {
        if start + len > self.readable_end() {
            return Ok(None);
        }
        if self.map.is_some() {
            return Ok(Some(RecordBytes {
                source: Source::Mapped(self.clone()),
                start: start as u32,
                len: len as u32,
            }));
        }
        let mut bytes = vec![0u8; len as usize];
        read_exact_at(self.file.as_ref(), &mut bytes, start)
            .map_err(|e| Error::io(format!("reading segment {}", self.name), e))?;
        Ok(Some(RecordBytes::owned(bytes)))
    }

    /// Reads and checks the record at `offset`, which must lie entirely below the readable end.
    pub fn record_at(
        self: &Arc<Self>,
        offset: u64,
        payload_max: u64,
    ) -> Result<std::result::Result<(crate::format::RecordHeader, RecordBytes), String>> {
        use crate::format::{RECORD_HEADER_BYTES, decode_record};
        let readable = self.readable_end();
        if !offset.is_multiple_of(crate::format::RECORD_ALIGN_BYTES)
            || offset < crate::format::SEGMENT_HEADER_BYTES
            || offset + RECORD_HEADER_BYTES > readable
        {
            return Ok(Err(format!(
                "offset is not a written record offset (segment readable to {readable})"
            )));
        }
        if let Some(map) = &self.map {
            let bytes = map
                .bytes(offset, readable - offset)
                .expect("range checked against the readable end above");
            return Ok(match decode_record(bytes, payload_max, None, self.salt) {
                Ok(header) => {
                    let start = offset + RECORD_HEADER_BYTES;
                    let bytes = RecordBytes {
                        source: Source::Mapped(self.clone()),
                        start: start as u32,
                        len: header.payload_len,
                    };
                    Ok((header, bytes))
                }
                Err(e) => Err(e.to_string()),
            });
        }
        let io_context = || format!("reading segment {}", self.name);
        let mut header = [0u8; RECORD_HEADER_BYTES as usize];
        read_exact_at(self.file.as_ref(), &mut header, offset)
            .map_err(|e| Error::io(io_context(), e))?;
        let payload_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
        if payload_len > payload_max || offset + RECORD_HEADER_BYTES + payload_len > readable {
            return Ok(Err(format!("record length {payload_len} does not fit")));
        }
        let mut record = vec![0u8; (RECORD_HEADER_BYTES + payload_len) as usize];
        read_exact_at(self.file.as_ref(), &mut record, offset)
            .map_err(|e| Error::io(io_context(), e))?;
        Ok(match decode_record(&record, payload_max, None, self.salt) {
            Ok(header) => {
                record.drain(..RECORD_HEADER_BYTES as usize);
                Ok((header, RecordBytes::owned(record)))
            }
            Err(e) => Err(e.to_string()),
        })
    }
}
