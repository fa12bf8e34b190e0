//! Walking records in LSN order across segments: the one loop behind both recovery and
//! `Wal::records_from`.
//!
//! A [`Scanner`] expects LSNs in order from a starting segment. Each step decodes the record at
//! its cursor; a record that is not there (zeros, a bad checksum, a wrong LSN, the end of the
//! segment) ends the segment normally only if the next segment starts with the expected LSN.
//! Anything else is a *break*, which the caller judges: recovery decides between torn tail and
//! corruption, a live log calls any break past its checked prefix damage.

use std::sync::Arc;

use crate::error::Result;
use crate::format::{self, RECORD_HEADER_BYTES, RecordError, SEGMENT_HEADER_BYTES};
use crate::log::{Record, payload_max_for};
use crate::segment::{ScanView, Segment};
use crate::{Lsn, Position};

pub(crate) struct Scanner {
    pub segments: Vec<Arc<Segment>>,
    /// Index in `segments` of the segment under the cursor.
    pub index: usize,
    /// Offset of the next record in that segment.
    pub offset: u64,
    /// LSN the next record must carry.
    pub expected: Lsn,
    view: Option<ScanView>,
}

/// What one step found.
pub(crate) enum Step {
    Record(Record),
    /// The expected record is not at the cursor, and no next segment starts with it.
    Break(RecordError),
}

impl Scanner {
    /// A scanner at the first record of `segments[index]`.
    pub fn new(segments: Vec<Arc<Segment>>, index: usize) -> Scanner {
        let expected = segments.get(index).map_or(Lsn(1), |s| s.first_lsn);
        Scanner {
            segments,
            index,
            offset: SEGMENT_HEADER_BYTES,
            expected,
            view: None,
        }
    }

    /// The segment under the cursor.
    pub fn segment(&self) -> &Arc<Segment> {
        &self.segments[self.index]
    }

    /// Decodes the record at the cursor and moves past it, crossing into the next segment where
    /// the current one ends normally.
    pub fn step(&mut self) -> Result<Step> {
        loop {
            let segment = self.segments[self.index].clone();
            if self.view.is_none() {
                self.view = Some(segment.scan_view(SEGMENT_HEADER_BYTES)?);
            }
            let view = self.view.as_ref().expect("set above");
            let payload_max = payload_max_for(segment.segment_bytes);
            match format::decode_record(
                view.from(self.offset),
                payload_max,
                Some(self.expected),
                segment.salt,
            ) {
                Ok(header) => {
                    let start = self.offset + RECORD_HEADER_BYTES;
                    let record = Record {
                        lsn: header.lsn,
                        kind: header.kind,
                        position: Position {
                            segment: segment.first_lsn,
                            offset: self.offset as u32,
                        },
                        payload: view.record_bytes(start..start + header.payload_len as u64),
                    };
                    self.offset += header.stored_bytes();
                    self.expected = self.expected.next();
                    return Ok(Step::Record(record));
                }
                Err(reason) => {
                    let next_starts_here = self
                        .segments
                        .get(self.index + 1)
                        .is_some_and(|next| next.first_lsn == self.expected);
                    if !next_starts_here {
                        return Ok(Step::Break(reason));
                    }
                    self.index += 1;
                    self.offset = SEGMENT_HEADER_BYTES;
                    self.view = None;
                }
            }
        }
    }

    /// Drops the cached view (before the caller rewrites bytes past the cursor).
    pub fn release_view(&mut self) {
        self.view = None;
    }
}
