//! The records of the crash test and the acknowledgement lines the writer prints.
//!
//! A record's kind, length and every payload byte are a function of its [`RecordId`] alone, and
//! the id is the payload's first 8 bytes: whoever finds a record in the log can check it by its
//! bytes, whether or not the writer lived to acknowledge it. The LSN is not part of the content
//! (the writer learns it only when the append returns).
//!
//! The writer prints one [`Ack`] line per commit that returned, after it returned; the test
//! treats each complete line as a promise that the record is durable.

use std::fmt;

use herald_wal::{Lsn, Options, Position, WriteBackend};

/// Segment size of the crash log: small, so that every round crosses segment boundaries.
pub const CRASH_SEGMENT_BYTES: u64 = 64 * 1024;
/// Smallest payload: just the id.
pub const PAYLOAD_BYTES_MIN: usize = 8;
/// Largest payload (fits a 64 KiB segment with room to spare).
pub const PAYLOAD_BYTES_MAX: usize = 20 * 1024;
/// Rounds are numbered in 24 bits of the id.
pub const ROUND_MAX: u32 = (1 << 24) - 1;

/// Options the writer and the test both open the crash log with.
pub fn crash_log_options() -> Options {
    Options {
        segment_bytes: CRASH_SEGMENT_BYTES,
        ..Options::default()
    }
}

/// The write backend of the writer in `round`: odd rounds use io_uring (herald-tests builds
/// herald-wal with its `io-uring` feature), even rounds `pwrite`, so that both backends are
/// killed mid-write and recovered from.
pub fn crash_write_backend(round: u32) -> WriteBackend {
    if round % 2 == 1 {
        WriteBackend::IoUring
    } else {
        WriteBackend::Pwrite
    }
}

/// Who wrote a record: the round (one writer process per round), the thread within it, and
/// the thread's sequence number (0, 1, 2, … in the order its commits returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    pub round: u32,
    pub thread: u8,
    pub seq: u32,
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}/t{}/#{}", self.round, self.thread, self.seq)
    }
}

impl RecordId {
    /// The id as stored in the payload's first 8 bytes: `round:24 | thread:8 | seq:32`.
    pub fn to_bits(self) -> u64 {
        assert!(
            self.round <= ROUND_MAX,
            "round {} needs more than 24 bits",
            self.round
        );
        ((self.round as u64) << 40) | ((self.thread as u64) << 32) | self.seq as u64
    }

    pub fn from_bits(bits: u64) -> RecordId {
        RecordId {
            round: (bits >> 40) as u32,
            thread: (bits >> 32) as u8,
            seq: bits as u32,
        }
    }

    /// Record kind (never the reserved 0).
    pub fn kind(self) -> u8 {
        1 + (mix(self.to_bits() ^ KIND_SALT) % 255) as u8
    }

    /// Payload length: half small records, a third around a page, the rest up to 20 KiB, so
    /// that records straddle pages and segments fill unevenly.
    pub fn payload_len(self) -> usize {
        let h = mix(self.to_bits() ^ LEN_SALT);
        let pick = (h >> 32) as usize;
        match h % 100 {
            0..50 => PAYLOAD_BYTES_MIN + pick % (256 - PAYLOAD_BYTES_MIN + 1),
            50..85 => 256 + pick % (4096 - 256 + 1),
            _ => 4096 + pick % (PAYLOAD_BYTES_MAX - 4096 + 1),
        }
    }

    /// The whole payload of this record.
    pub fn payload(self) -> Vec<u8> {
        let len = self.payload_len();
        let mut out = Vec::with_capacity(len + 8);
        out.extend_from_slice(&self.to_bits().to_le_bytes());
        let seed = mix(self.to_bits() ^ PATTERN_SALT);
        let mut word = 0u64;
        while out.len() < len {
            out.extend_from_slice(&pattern_word(seed, word).to_le_bytes());
            word += 1;
        }
        out.truncate(len);
        out
    }
}

/// Checks a record found in the log by its content alone and returns its id: the kind, the
/// length and every byte must be what the id in its first 8 bytes says.
pub fn verify_record(kind: u8, payload: &[u8]) -> Result<RecordId, String> {
    let Some(id_bytes) = payload.first_chunk::<8>() else {
        return Err(format!(
            "payload of {} bytes is shorter than a record id",
            payload.len()
        ));
    };
    let id = RecordId::from_bits(u64::from_le_bytes(*id_bytes));
    if payload.len() != id.payload_len() {
        return Err(format!(
            "record {id}: payload holds {} bytes, its id says {}",
            payload.len(),
            id.payload_len()
        ));
    }
    if kind != id.kind() {
        return Err(format!(
            "record {id}: kind {kind}, its id says {}",
            id.kind()
        ));
    }
    let seed = mix(id.to_bits() ^ PATTERN_SALT);
    for (word, chunk) in payload[8..].chunks(8).enumerate() {
        let expected = pattern_word(seed, word as u64).to_le_bytes();
        if chunk != &expected[..chunk.len()] {
            return Err(format!(
                "record {id}: payload differs from its pattern in bytes {}..{}",
                8 + word * 8,
                8 + word * 8 + chunk.len()
            ));
        }
    }
    Ok(id)
}

/// One acknowledged commit, as the writer prints it: `<lsn> <segment> <offset> <round> <thread>
/// <seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub lsn: Lsn,
    pub position: Position,
    pub id: RecordId,
}

impl Ack {
    /// The line, newline included, so that it goes out in one write.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {} {} {}\n",
            self.lsn.0,
            self.position.segment.0,
            self.position.offset,
            self.id.round,
            self.id.thread,
            self.id.seq
        )
    }

    /// Parses one complete line (without its newline).
    pub fn parse(line: &str) -> Result<Ack, String> {
        let fields: Vec<&str> = line.split(' ').collect();
        let [lsn, segment, offset, round, thread, seq] = fields[..] else {
            return Err(format!("ack line {line:?} does not have 6 fields"));
        };
        let bad = |what: &str| format!("ack line {line:?}: bad {what}");
        Ok(Ack {
            lsn: Lsn(lsn.parse().map_err(|_| bad("lsn"))?),
            position: Position {
                segment: Lsn(segment.parse().map_err(|_| bad("segment"))?),
                offset: offset.parse().map_err(|_| bad("offset"))?,
            },
            id: RecordId {
                round: round.parse().map_err(|_| bad("round"))?,
                thread: thread.parse().map_err(|_| bad("thread"))?,
                seq: seq.parse().map_err(|_| bad("seq"))?,
            },
        })
    }
}

/// Splits a writer's output into its complete lines; a last line without its newline (the
/// writer died in the middle of printing it) is dropped, since nothing in it can be trusted.
pub fn parse_acks(output: &[u8]) -> Result<Vec<Ack>, String> {
    let text = std::str::from_utf8(output).map_err(|e| format!("writer output: {e}"))?;
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // after the last newline: empty, or a half-printed line
    lines.into_iter().map(Ack::parse).collect()
}

const KIND_SALT: u64 = 0x6b69_6e64_0000_0001;
const LEN_SALT: u64 = 0x6c65_6e67_0000_0002;
const PATTERN_SALT: u64 = 0x7061_7474_0000_0003;

/// splitmix64's finaliser: a cheap, well-mixed function of one word.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(crate) fn pattern_word(seed: u64, word: u64) -> u64 {
    mix(seed.wrapping_add(word.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_verify_and_damage_is_caught() {
        for seq in 0..500 {
            let id = RecordId {
                round: 7,
                thread: (seq % 4) as u8,
                seq,
            };
            let payload = id.payload();
            assert!((PAYLOAD_BYTES_MIN..=PAYLOAD_BYTES_MAX).contains(&payload.len()));
            assert_eq!(verify_record(id.kind(), &payload), Ok(id));
            let mut bad = payload.clone();
            let at = seq as usize % bad.len();
            bad[at] ^= 0x10;
            assert!(
                verify_record(id.kind(), &bad).is_err(),
                "flip at {at} of {id}"
            );
            assert!(verify_record(id.kind(), &payload[..payload.len() - 1]).is_err());
        }
    }

    #[test]
    fn ack_lines_round_trip_and_half_lines_are_dropped() {
        let ack = Ack {
            lsn: Lsn(42),
            position: Position {
                segment: Lsn(40),
                offset: 4096,
            },
            id: RecordId {
                round: 3,
                thread: 1,
                seq: 9,
            },
        };
        let mut output = ack.to_line().into_bytes();
        output.extend_from_slice(b"43 40 51");
        assert_eq!(parse_acks(&output), Ok(vec![ack]));
        assert!(
            parse_acks(b"1 2 3\n").is_err(),
            "a complete bad line is an error"
        );
    }
}
