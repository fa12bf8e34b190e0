//! Herald's write-ahead log: segmented, checksummed, group-committed, read back through memory
//! maps. It is the store: a caller appends a record (an engine commit, message bodies included),
//! learns its LSN and position, waits until it is durable, reads it back by position as bytes
//! borrowed from a memory map, replays from an LSN at recovery, and releases segments whose
//! records are no longer needed — whose files then become the next segments (each segment's
//! random salt keeps their old records from ever checking out), so a busy log writes each byte
//! once and does not zero-fill new files (`FORMAT.md`).
//!
//! ```no_run
//! use herald_wal::{Options, Wal};
//! let wal = Wal::open("./herald-data/wal", Options::default())?;
//! let appended = wal.commit(1, b"a commit record")?; // durable when it returns (Sync)
//! let record = wal.read(appended.position)?;
//! assert_eq!(&*record.payload, b"a commit record");
//! # Ok::<(), herald_wal::Error>(())
//! ```
//!
//! The byte layout, the commit and sync protocol and the recovery rules are in `wal/FORMAT.md`.
#![deny(unsafe_code)]

mod error;
pub mod format;
mod group_commit;
mod log;
mod map;
mod mem_storage;
mod recovery;
mod scan;
mod segment;
mod spares;
mod storage;
#[cfg(all(target_os = "linux", feature = "io-uring"))]
mod uring;

pub use error::{Error, Result};
pub use log::{Appended, Durability, Options, Record, Records, SegmentInfo, Wal, WriteBackend};
pub use mem_storage::{MEM_SECTOR_BYTES, MemStorage};
pub use recovery::{Recovery, RecoveryReport};
pub use segment::{RecordBytes, segment_file_name};
pub use spares::SPARE_SEGMENTS_MAX;
pub use storage::{FileStorage, LOCK_FILE_NAME, Storage, StorageFile};
#[cfg(all(target_os = "linux", feature = "io-uring"))]
pub use uring::{NOWAIT_PROBE_WRITES, UringStorage};

/// Log sequence number: the number of a record, starting at 1 and growing by one per record.
/// `Lsn(0)` means "no record" (an empty log's durable LSN, or "from the start" for replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Lsn {
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

/// Where a record lives: the segment (named by its first LSN) and the byte offset of the
/// record's header in that segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub segment: Lsn,
    pub offset: u32,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", segment_file_name(self.segment), self.offset)
    }
}

/// Entry points for fuzzing and corpus replay (`fuzz/`); not part of the stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::recovery::fuzz_recovery;

    /// The salt of the segments `fuzz_recovery` builds from its input.
    pub const HARNESS_SALT: crate::format::Salt = crate::format::Salt::new(0);

    /// Runs the record decoder over arbitrary bytes at every aligned offset.
    pub fn fuzz_record_decoder(data: &[u8]) {
        let mut offset = 0;
        while offset < data.len() {
            for salt in [crate::format::Salt::NONE, HARNESS_SALT] {
                let _ = crate::format::decode_record(&data[offset..], u32::MAX as u64, None, salt);
            }
            offset += crate::format::RECORD_ALIGN_BYTES as usize;
        }
        let _ = crate::format::SegmentHeader::decode(data);
    }
}
