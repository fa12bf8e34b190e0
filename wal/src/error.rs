//! The one error type of `herald-wal`.
//!
//! `Corruption` is kept apart from `Io`: an I/O error may go away (space freed, device back), a
//! corrupt log will not, and the caller must be able to tell the two apart.

use std::path::PathBuf;

use crate::{Lsn, Position};

/// Result of every fallible `herald-wal` operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed; `context` says what the log was doing and with what.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A record before the tail of the log failed its checks (checksum, length, LSN order), and a
    /// later record proves that the bad one had been made durable: this is damage, not a torn write.
    #[error("log corrupt in segment {segment} at offset {offset}: {reason}")]
    Corruption {
        /// File name of the segment holding the bad record.
        segment: String,
        /// Byte offset of the bad record within that file.
        offset: u64,
        reason: String,
    },

    /// A segment file's header is not a valid Herald segment header (truncated, wrong magic, bad
    /// checksum, or a name that disagrees with its contents).
    #[error("segment {segment} has a bad header: {reason}")]
    BadSegmentHeader { segment: String, reason: String },

    /// A segment was written by a format version this build cannot read.
    #[error("segment {segment} has format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        segment: String,
        found: u32,
        supported: u32,
    },

    /// Another `Wal` (in this or another process) holds the directory's lock file — or, in this
    /// process, bytes borrowed from a closed one (`RecordBytes` of its mapped segments) still
    /// live: they hold the lock until they drop.
    #[error(
        "log directory {} is locked by another opener, or by bytes still borrowed from a log closed in this \
         process ({reason})",
        dir.display()
    )]
    Locked { dir: PathBuf, reason: String },

    /// An append asked for more bytes than one record may hold.
    #[error("record of {len} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },

    /// Record kind 0 is reserved: a zeroed header must never decode as a record.
    #[error("record kind 0 is reserved")]
    ReservedKind,

    /// A previous write or `fdatasync` failed. After a failed sync the kernel may have dropped the
    /// dirty pages, so no later commit may claim durability: close and reopen the log.
    #[error("log is poisoned by an earlier I/O failure ({cause}); reopen it to recover")]
    Poisoned { cause: String },

    /// `read` was given a position that holds no written record of this log.
    #[error("no record at {position}: {reason}")]
    NoRecordAt { position: Position, reason: String },

    /// `records_from` asked for an LSN that was released or is past the end of the log.
    #[error("LSN {lsn} is not in the log (log holds {first}..{next})")]
    LsnOutOfRange { lsn: Lsn, first: Lsn, next: Lsn },

    /// Options that cannot work, e.g. a segment size out of range.
    #[error("invalid options: {0}")]
    InvalidOptions(String),

    /// The log was closed; no further operation is possible on this handle.
    #[error("log is closed")]
    Closed,
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
