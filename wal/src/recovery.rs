//! Recovery: find the end of the log, tell a torn tail from damage, and hand back a log that
//! continues cleanly from the last valid record.
//!
//! The scan walks records in LSN order from the segment holding `Options::replay_from`. It stops
//! at the first place where the next expected record is not there (bad checksum, bad length,
//! zeros, wrong LSN, or a segment that does not start where the previous one ended): the *break*.
//! A break is a torn tail if nothing after it proves that the missing record had been made
//! durable; then the bytes after the break are zeroed and later segments removed, so a future
//! append can never be followed by stale records. A break is corruption if some valid record
//! after it was appended when the log's durable LSN already covered the missing record
//! (`FORMAT.md`, invariants 5 and 6): acknowledged data is damaged, and the open fails with
//! `Error::Corruption { segment, offset }` instead of silently dropping it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::Lsn;
use crate::error::{Error, Result};
use crate::format::{
    self, HeaderError, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, SegmentHeader,
};
use crate::log::{Options, Record, Recovered, Wal, payload_max_for};
use crate::scan::{Scanner, Step};
use crate::segment::{RELEASED_SUFFIX, Segment, parse_segment_file_name, segment_file_name};
use crate::spares::{Spare, Spares, parse_spare_id};
use crate::storage::{Storage, read_exact_at, write_all_at};

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Live segments after recovery.
    pub segments: usize,
    /// Records checked by the scan (from the segment holding `replay_from` on).
    pub records_scanned: u64,
    /// Records handed to the caller (LSN at or after `replay_from`).
    pub records_replayed: u64,
    /// LSN the next append gets.
    pub next_lsn: Lsn,
    /// Set when a torn tail was cut off.
    pub truncated: Option<TruncatedTail>,
}

/// A torn tail that recovery removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    pub segment: String,
    pub offset: u64,
    /// Why the record at `offset` was not valid.
    pub reason: String,
    /// Non-zero bytes after the break that were zeroed.
    pub bytes_zeroed: u64,
    /// Later segment files removed (they held no record proven durable).
    pub segments_removed: usize,
}

/// A log being recovered: iterate it for the records from `Options::replay_from` on, in LSN
/// order, then call [`Recovery::finish`] for the [`Wal`]. The directory is locked from
/// [`Wal::recover`] on.
pub struct Recovery {
    storage: Arc<dyn Storage>,
    options: Options,
    lock: Option<crate::segment::DirLock>,
    spares: Vec<Spare>,
    last_spare_id: u64,
    /// Walks all live segments; those before the one holding `replay_from` are only
    /// header-checked.
    scanner: Scanner,
    state: ScanState,
    report: RecoveryReport,
}

enum ScanState {
    Scanning,
    /// The valid log ends at the cursor, with this reason.
    Tail(String),
    Failed,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery")
            .field("location", &self.storage.location())
            .field("expected", &self.scanner.expected)
            .finish()
    }
}

impl Recovery {
    pub(crate) fn start(storage: Arc<dyn Storage>, options: Options) -> Result<Recovery> {
        options.validate()?;
        let lock: crate::segment::DirLock =
            Arc::from(storage.lock().map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock => Error::Locked {
                    dir: storage.location(),
                    reason: e.to_string(),
                },
                _ => Error::io(
                    format!("locking log directory {}", storage.location().display()),
                    e,
                ),
            })?);
        let names = storage.list().map_err(|e| {
            Error::io(
                format!("listing log directory {}", storage.location().display()),
                e,
            )
        })?;
        let mut segment_names = BTreeMap::new();
        let mut spares = Vec::new();
        let mut last_spare_id = 0;
        let mut removed_any = false;
        for name in names {
            if let Some(first_lsn) = parse_segment_file_name(&name) {
                segment_names.insert(first_lsn, name);
            } else if name.ends_with(RELEASED_SUFFIX) {
                remove(storage.as_ref(), &name, "released segment")?;
                removed_any = true;
            } else if let Some((id, complete)) = parse_spare_id(&name) {
                last_spare_id = last_spare_id.max(id);
                let file = storage
                    .open(&name)
                    .map_err(|e| Error::io(format!("opening spare {name}"), e))?;
                let len = file
                    .size_bytes()
                    .map_err(|e| Error::io(format!("sizing spare {name}"), e))?;
                if complete && len == options.segment_bytes {
                    // Zero-filled or a reused segment's file: which, the name does not say, so
                    // it is taken for reused (recovery then zeroes only this segment's records
                    // after a break, which is right for either).
                    spares.push(Spare {
                        name,
                        file,
                        reused: true,
                    });
                } else {
                    remove(storage.as_ref(), &name, "incomplete or mis-sized spare")?;
                    removed_any = true;
                }
            }
        }
        if removed_any {
            storage
                .sync_dir()
                .map_err(|e| Error::io("syncing log directory after cleanup", e))?;
        }
        let mut segments = Vec::with_capacity(segment_names.len());
        for (first_lsn, name) in segment_names {
            segments.push(Arc::new(open_segment(
                storage.as_ref(),
                first_lsn,
                name,
                &lock,
            )?));
        }
        let replay_from = options.replay_from;
        let scan_start = segments
            .iter()
            .rposition(|s| s.first_lsn <= replay_from)
            .unwrap_or(0);
        if let Some(first) = segments.first()
            && replay_from.0 > 0
            && replay_from < first.first_lsn
        {
            return Err(Error::LsnOutOfRange {
                lsn: replay_from,
                first: first.first_lsn,
                next: Lsn(0),
            });
        }
        let state = if segments.is_empty() {
            ScanState::Tail("new log".into())
        } else {
            ScanState::Scanning
        };
        Ok(Recovery {
            storage,
            options,
            lock: Some(lock),
            spares,
            last_spare_id,
            scanner: Scanner::new(segments, scan_start),
            state,
            report: RecoveryReport::default(),
        })
    }

    /// What the scan has found so far (complete after `finish`, see [`Wal::recovery_report`]).
    pub fn report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Completes the scan (if the caller stopped iterating), cuts off a torn tail, and returns
    /// the log ready for appends. Fails with `Error::Corruption` if the scan found damage.
    pub fn finish(mut self) -> Result<Wal> {
        while let Some(record) = self.next_record() {
            record?;
        }
        let reason = match std::mem::replace(&mut self.state, ScanState::Failed) {
            ScanState::Tail(reason) => reason,
            ScanState::Failed => {
                return Err(Error::InvalidOptions(
                    "finish called on a recovery that already failed".into(),
                ));
            }
            ScanState::Scanning => unreachable!("the scan loop runs until it leaves Scanning"),
        };
        self.scanner.release_view();
        let (index, offset, expected) = (
            self.scanner.index,
            self.scanner.offset,
            self.scanner.expected,
        );
        if !self.scanner.segments.is_empty() {
            self.cut_tail(index, offset, reason)?;
            // Make what was recovered durable: the crashed process may never have synced it, and
            // the log about to start counts all of it durable (`Wal::start`). Every segment, not
            // only those replayed: under `None`/`Batched` the pages of older ones may be dirty
            // still (a sync of a clean file costs little).
            for segment in &self.scanner.segments {
                segment
                    .file
                    .sync_data()
                    .map_err(|e| Error::io(format!("syncing segment {}", segment.name), e))?;
            }
        }
        // And the names: a crash between a spare's rename to a segment and the directory sync
        // leaves a segment whose name is not durable. Commits into it are synced file by file,
        // which does not make the rename durable: after a power failure it would be a spare
        // again, and every commit acknowledged in it lost.
        self.storage
            .sync_dir()
            .map_err(|e| Error::io("syncing the log directory after recovery", e))?;
        self.report.segments = self.scanner.segments.len().max(1);
        self.report.next_lsn = expected;
        let spares = Arc::new(Spares::new(
            self.storage.clone(),
            self.options.segment_bytes,
            self.options.spare_segments,
            std::mem::take(&mut self.spares),
            self.last_spare_id,
        ));
        let lock = self.lock.take().expect("the lock is taken once, here");
        Wal::start(Recovered {
            storage: self.storage.clone(),
            options: self.options.clone(),
            lock,
            segments: std::mem::take(&mut self.scanner.segments),
            next_lsn: expected,
            tail_offset: offset,
            spares,
            report: self.report.clone(),
        })
    }

    /// The next record from `replay_from` on; `None` at the end of the valid log.
    fn next_record(&mut self) -> Option<Result<Record>> {
        while matches!(self.state, ScanState::Scanning) {
            let reason = match self.scanner.step() {
                Ok(Step::Record(record)) => {
                    self.report.records_scanned += 1;
                    if record.lsn >= self.options.replay_from {
                        self.report.records_replayed += 1;
                        return Some(Ok(record));
                    }
                    continue;
                }
                Ok(Step::Break(reason)) => reason,
                Err(e) => {
                    self.state = ScanState::Failed;
                    return Some(Err(e));
                }
            };
            match self.find_durability_proof() {
                Ok(None) => self.state = ScanState::Tail(reason.to_string()),
                Ok(Some(proof)) => {
                    self.state = ScanState::Failed;
                    return Some(Err(Error::Corruption {
                        segment: self.scanner.segment().name.clone(),
                        offset: self.scanner.offset,
                        reason: format!(
                            "{reason} where record {} was expected; {proof}",
                            self.scanner.expected
                        ),
                    }));
                }
                Err(e) => {
                    self.state = ScanState::Failed;
                    return Some(Err(e));
                }
            }
        }
        None
    }

    /// Looks after the break for a valid record appended when the missing one was already
    /// durable. Candidates are aligned offsets; the header's LSN and durable gap are checked
    /// before the (costly) checksum, so garbage after a torn tail is rejected cheaply.
    fn find_durability_proof(&self) -> Result<Option<String>> {
        let Scanner {
            index,
            offset,
            expected,
            ref segments,
            ..
        } = self.scanner;
        for (i, segment) in segments.iter().enumerate().skip(index) {
            // No record of a segment can have an LSN beyond its first (from its header) plus
            // the record headers that fit in it. (A bound from the break's LSN and the sizes of
            // the segments present was wrong when a segment in between was missing: the later
            // segments' records were beyond it, no proof was accepted, and recovery cut
            // acknowledged segments away as a torn tail.)
            let lsn_bound = segment
                .first_lsn
                .0
                .saturating_add(segment.segment_bytes / RECORD_HEADER_BYTES);
            let view = segment.scan_view(SEGMENT_HEADER_BYTES)?;
            let payload_max = payload_max_for(segment.segment_bytes);
            let mut candidate = if i == index {
                offset + RECORD_ALIGN_BYTES
            } else {
                SEGMENT_HEADER_BYTES
            };
            while candidate + RECORD_HEADER_BYTES <= segment.segment_bytes {
                let bytes = view.from(candidate);
                // A candidate needs a non-zero kind byte (`RECORD_KIND_AT`): jump over zeros (the
                // untouched rest of a segment, on every open) to the first candidate that can
                // reach the next non-zero byte.
                let Some(nonzero) = format::first_nonzero(bytes) else {
                    break;
                };
                let reach = (nonzero as u64).saturating_sub(format::RECORD_KIND_AT as u64);
                if reach >= RECORD_ALIGN_BYTES {
                    candidate += reach - reach % RECORD_ALIGN_BYTES;
                    continue;
                }
                if format::could_prove_durable(bytes, expected, Lsn(lsn_bound))
                    && let Ok(header) =
                        format::decode_record(bytes, payload_max, None, segment.salt)
                {
                    return Ok(Some(format!(
                        "record {} at offset {candidate} of segment {} was appended when \
                             the log was durable through {}, so the bad record had been synced",
                        header.lsn, segment.name, header.durable_lsn
                    )));
                }
                candidate += RECORD_ALIGN_BYTES;
            }
        }
        Ok(None)
    }

    /// Cuts the log at the break: zeroes the written bytes after it in its segment and removes
    /// later segments. Zeroing first keeps this idempotent: a crash in between leaves a log whose
    /// next recovery finds the same break.
    fn cut_tail(&mut self, index: usize, offset: u64, reason: String) -> Result<()> {
        let segment = self.scanner.segments[index].clone();
        let last_nonzero_end = {
            let view = segment.scan_view(offset)?;
            let bytes = view.from(offset);
            if segment.reused {
                own_records_end(&segment, offset, bytes)
            } else {
                format::last_nonzero(bytes).map(|i| offset + i as u64 + 1)
            }
        };
        // Nothing was handed out past `offset`; from here on the log writes there.
        segment.retract_readable_end(offset);
        let later: Vec<Arc<Segment>> = self.scanner.segments.drain(index + 1..).collect();
        if last_nonzero_end.is_none() && later.is_empty() {
            return Ok(());
        }
        let mut bytes_zeroed = 0;
        if let Some(end) = last_nonzero_end {
            let zeros = vec![0u8; (end - offset) as usize];
            write_all_at(segment.file.as_ref(), &zeros, offset)
                .and_then(|()| segment.file.sync_data())
                .map_err(|e| Error::io(format!("zeroing torn tail of {}", segment.name), e))?;
            bytes_zeroed = end - offset;
        }
        for dropped in &later {
            remove(
                self.storage.as_ref(),
                &dropped.name,
                "segment after the tail",
            )?;
        }
        if !later.is_empty() {
            self.storage
                .sync_dir()
                .map_err(|e| Error::io("syncing log directory after truncation", e))?;
        }
        tracing::warn!(
            segment = %segment.name, offset, %reason, bytes_zeroed,
            segments_removed = later.len(), "cut a torn tail off the write-ahead log"
        );
        self.report.truncated = Some(TruncatedTail {
            segment: segment.name.clone(),
            offset,
            reason,
            bytes_zeroed,
            segments_removed: later.len(),
        });
        Ok(())
    }
}

impl Iterator for Recovery {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        self.next_record()
    }
}

fn remove(storage: &dyn Storage, name: &str, what: &str) -> Result<()> {
    storage
        .remove(name)
        .map_err(|e| Error::io(format!("removing {what} {name}"), e))
}

/// In a reused segment, where the bytes after `offset` (`bytes`, to the end of the segment) that
/// this segment itself wrote end, if any could check out again once the log writes past
/// `offset`: every record valid under the segment's salt, and the record at `offset` if its
/// header names one of the segment's LSNs (a torn record). The rest is the file's previous life,
/// checksummed under another salt: it never checks out, and is left alone rather than zeroed
/// (which would rewrite most of the segment at every open).
fn own_records_end(segment: &Segment, offset: u64, bytes: &[u8]) -> Option<u64> {
    let payload_max = payload_max_for(segment.segment_bytes);
    let lsn_bound = segment
        .first_lsn
        .0
        .saturating_add(segment.segment_bytes / RECORD_HEADER_BYTES);
    let names_own_lsn = |header: &[u8]| {
        let lsn = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        header[format::RECORD_KIND_AT] != 0 && (segment.first_lsn.0..=lsn_bound).contains(&lsn)
    };
    let mut end = None;
    let mut at = 0usize;
    while at + RECORD_HEADER_BYTES as usize <= bytes.len() {
        let candidate = &bytes[at..];
        if names_own_lsn(candidate) {
            let stored = if let Ok(header) =
                format::decode_record(candidate, payload_max, None, segment.salt)
            {
                Some(header.stored_bytes())
            } else if at == 0 {
                let payload_len = u32::from_le_bytes(candidate[0..4].try_into().expect("4 bytes"));
                Some(format::stored_bytes(u64::from(payload_len)))
            } else {
                None
            };
            if let Some(stored) = stored {
                let record_end = offset + (at as u64 + stored).min(bytes.len() as u64);
                end = end.max(Some(record_end));
            }
        }
        at += RECORD_ALIGN_BYTES as usize;
    }
    end
}

/// Opens a segment file and checks its header against its name and its size.
fn open_segment(
    storage: &dyn Storage,
    first_lsn: Lsn,
    name: String,
    dir_lock: &crate::segment::DirLock,
) -> Result<Segment> {
    let file = storage
        .open(&name)
        .map_err(|e| Error::io(format!("opening segment {name}"), e))?;
    let len = file
        .size_bytes()
        .map_err(|e| Error::io(format!("sizing segment {name}"), e))?;
    let mut header_bytes = vec![0u8; SEGMENT_HEADER_BYTES.min(len) as usize];
    read_exact_at(file.as_ref(), &mut header_bytes, 0)
        .map_err(|e| Error::io(format!("reading header of segment {name}"), e))?;
    let bad = |reason: String| Error::BadSegmentHeader {
        segment: name.clone(),
        reason,
    };
    let header = SegmentHeader::decode(&header_bytes).map_err(|e| match e {
        HeaderError::UnsupportedVersion { found } => Error::UnsupportedVersion {
            segment: name.clone(),
            found,
            supported: format::FORMAT_VERSION,
        },
        other => bad(other.to_string()),
    })?;
    if header.first_lsn.0 == 0 {
        // LSNs start at 1 (0 is "nothing": the log counts durable through `first - 1`).
        return Err(bad("header says first LSN 0; LSNs start at 1".into()));
    }
    if header.first_lsn != first_lsn {
        return Err(bad(format!(
            "header says first LSN {}, name says {first_lsn}",
            header.first_lsn
        )));
    }
    if len < header.segment_bytes {
        return Err(bad(format!(
            "file holds {len} bytes, header says {} (truncated file)",
            header.segment_bytes
        )));
    }
    debug_assert_eq!(name, segment_file_name(first_lsn));
    let readable_end = header.segment_bytes;
    Segment::new(&header, name, file, readable_end, dir_lock)
}

/// Fuzzing entry point: builds a memory log whose segment files come from `data`, recovers it,
/// and when recovery succeeds, appends, reads back and recovers again. Must never panic.
pub fn fuzz_recovery(data: &[u8]) {
    use crate::MemStorage;
    const SEGMENT_BYTES: u64 = 4096;
    let storage = MemStorage::new();
    let mut first_lsn = 1u64;
    for (i, chunk) in data.chunks(SEGMENT_BYTES as usize).take(3).enumerate() {
        let mut file = vec![0u8; SEGMENT_BYTES as usize];
        // Even-numbered chunks get a valid header (so record framing is reached); odd ones keep
        // the fuzzer's bytes there (so header decoding is reached too).
        file[..chunk.len()].copy_from_slice(chunk);
        if i % 2 == 0 {
            // A known salt, so that seeds (and the fuzzer) can hold valid records.
            let header = SegmentHeader {
                version: format::FORMAT_VERSION,
                first_lsn: Lsn(first_lsn),
                segment_bytes: SEGMENT_BYTES,
                salt: crate::fuzzing::HARNESS_SALT,
                // The third as if made from a released segment (recovery zeroes differently).
                reused: i == 2,
            };
            file[..SEGMENT_HEADER_BYTES as usize].copy_from_slice(&header.encode());
        }
        storage.set_file_bytes(&segment_file_name(Lsn(first_lsn)), file);
        first_lsn += 1 + (chunk.first().copied().unwrap_or(0) as u64 % 8);
    }
    let options = Options {
        segment_bytes: SEGMENT_BYTES,
        ..Options::default()
    };
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let Ok(recovery) = Wal::recover_storage(storage.clone(), options.clone()) else {
        return;
    };
    let replayed: Vec<Lsn> = recovery
        .filter_map(|r| r.ok())
        .map(|record| record.lsn)
        .collect();
    let _ = replayed;
    let Ok(wal) = Wal::open_storage(storage.clone(), options.clone()) else {
        return;
    };
    let appended = wal
        .commit(1, b"after recovery")
        .expect("append after a clean recovery");
    let record = wal
        .read(appended.position)
        .expect("read back what was appended");
    assert_eq!(&*record.payload, b"after recovery");
    drop(wal);
    let wal = Wal::open_storage(storage, options).expect("reopen after a clean recovery");
    assert_eq!(wal.next_lsn(), appended.lsn.next());
}
