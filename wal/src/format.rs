//! The bytes on disk: segment header and record framing (see `wal/FORMAT.md`).
//!
//! Everything here is pure: encode into a buffer, decode from a slice, never trusting a byte that
//! has not been checksummed. All integers are little-endian. Decoders return typed reasons and
//! never panic, whatever the input (fuzzed by `fuzz/fuzz_targets/record_decoder.rs`).

use crate::Lsn;

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"HRLDWAL\0";
/// The segment format this build writes. Version 2 added the segment salt, which record
/// checksums start from, so that a segment file can be reused without zero-filling it: the
/// records of its previous life never check out under the new salt.
pub const FORMAT_VERSION: u32 = 2;
/// The first format, still read (and appended to, where it is the active segment): no salt,
/// and segments that were always zero-filled before use.
pub const FORMAT_VERSION_UNSALTED: u32 = 1;
/// Bytes reserved for the segment header at the start of every segment file.
pub const SEGMENT_HEADER_BYTES: u64 = 64;
/// Bytes of a record header: `len | crc32 | lsn | durable_gap | kind | reserved`.
pub const RECORD_HEADER_BYTES: u64 = 24;
/// Records start at offsets that are multiples of this, so headers are aligned in a mapping and a
/// recovery scan has few candidate offsets.
pub const RECORD_ALIGN_BYTES: u64 = 8;
/// Largest payload one record may carry, whatever the segment size.
pub const RECORD_PAYLOAD_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Smallest and largest segment sizes `Options` accepts.
pub const SEGMENT_BYTES_MIN: u64 = 4096;
pub const SEGMENT_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// Default segment size.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Fixed fields of a segment header (`FORMAT.md`, "Segment header").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub version: u32,
    /// LSN of the first record this segment holds (or will hold); also its identity and file name.
    pub first_lsn: Lsn,
    /// Size of the segment file in bytes, fixed at creation.
    pub segment_bytes: u64,
    /// What this segment's record checksums start from (none in version 1).
    pub salt: Salt,
    /// The file was a released segment before: bytes of its previous life (under another salt)
    /// may follow this segment's last record, where a new file has zeros. Recovery zeroes only
    /// this segment's own records after a break in such a file (see `FORMAT.md`).
    pub reused: bool,
}

/// What a segment's record checksums start from: a random value chosen when the segment is
/// made from a spare (format version 2), or nothing (version 1). Records written under another
/// salt — those of the file's previous life, or bytes crafted inside some message body to look
/// like a record — do not check out, whatever their contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Salt(Option<u64>);

impl Salt {
    /// Version 1 segments: checksums over the record alone.
    pub const NONE: Salt = Salt(None);

    pub const fn new(value: u64) -> Salt {
        Salt(Some(value))
    }

    /// A fresh salt no one can predict: std's `RandomState` is seeded from the operating
    /// system's random source.
    pub fn random() -> Salt {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        Salt(Some(hasher.finish()))
    }

    fn feed(self, hasher: &mut crc32fast::Hasher) {
        if let Some(value) = self.0 {
            hasher.update(&value.to_le_bytes());
        }
    }
}

/// Why a segment header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    Truncated {
        len: usize,
    },
    BadMagic,
    BadChecksum,
    UnsupportedVersion {
        found: u32,
    },
    BadSize {
        segment_bytes: u64,
    },
    /// The reuse flag is neither 0 nor 1 (or 1 in an unsalted version 1 header).
    BadReuseFlag {
        found: u8,
    },
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Truncated { len } => {
                write!(
                    f,
                    "file holds {len} bytes, fewer than the {SEGMENT_HEADER_BYTES}-byte header"
                )
            }
            HeaderError::BadMagic => write!(f, "wrong magic (not a Herald log segment)"),
            HeaderError::BadChecksum => write!(f, "header checksum mismatch"),
            HeaderError::UnsupportedVersion { found } => write!(f, "format version {found}"),
            HeaderError::BadSize { segment_bytes } => {
                write!(f, "segment size {segment_bytes} out of range")
            }
            HeaderError::BadReuseFlag { found } => write!(f, "reuse flag {found} (0 or 1)"),
        }
    }
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES as usize] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES as usize];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&(SEGMENT_HEADER_BYTES as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.first_lsn.0.to_le_bytes());
        out[24..32].copy_from_slice(&self.segment_bytes.to_le_bytes());
        if let Some(salt) = self.salt.0 {
            out[32..40].copy_from_slice(&salt.to_le_bytes());
        }
        out[40] = u8::from(self.reused);
        let crc = crc32fast::hash(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header. The magic is checked first (a foreign file), then the version
    /// (a future format may change the rest of the header, so nothing after it is trusted), then
    /// the checksum.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if bytes.len() < SEGMENT_HEADER_BYTES as usize {
            return Err(HeaderError::Truncated { len: bytes.len() });
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = read_u32(bytes, 8);
        if version != FORMAT_VERSION && version != FORMAT_VERSION_UNSALTED {
            return Err(HeaderError::UnsupportedVersion { found: version });
        }
        let stored_crc = read_u32(bytes, 60);
        if crc32fast::hash(&bytes[0..60]) != stored_crc {
            return Err(HeaderError::BadChecksum);
        }
        let segment_bytes = read_u64(bytes, 24);
        let reused = match bytes[40] {
            0 => false,
            1 if version != FORMAT_VERSION_UNSALTED => true,
            other => return Err(HeaderError::BadReuseFlag { found: other }),
        };
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&segment_bytes)
            || !segment_bytes.is_multiple_of(RECORD_ALIGN_BYTES)
        {
            return Err(HeaderError::BadSize { segment_bytes });
        }
        Ok(SegmentHeader {
            version,
            first_lsn: Lsn(read_u64(bytes, 16)),
            segment_bytes,
            salt: if version == FORMAT_VERSION_UNSALTED {
                Salt::NONE
            } else {
                Salt::new(read_u64(bytes, 32))
            },
            reused,
        })
    }
}

/// A record header that passed every check, with where its payload lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub lsn: Lsn,
    pub kind: u8,
    pub payload_len: u32,
    /// The log's durable LSN when this record was appended: `lsn - durable_gap`. A valid record
    /// whose durable LSN is at or past some earlier LSN proves that earlier record was synced, which
    /// is how recovery tells damage from a torn tail (`FORMAT.md`, invariant 6).
    pub durable_lsn: Lsn,
}

impl RecordHeader {
    /// Bytes the whole record occupies in the segment, alignment padding included.
    pub fn stored_bytes(&self) -> u64 {
        stored_bytes(self.payload_len as u64)
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies, padding included.
pub fn stored_bytes(payload_len: u64) -> u64 {
    (RECORD_HEADER_BYTES + payload_len).next_multiple_of(RECORD_ALIGN_BYTES)
}

/// Why the bytes at some offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes remain than a record header.
    Truncated,
    /// All-zero header: the written part of the segment ends here (or a write never landed).
    Zeroed,
    /// Length field larger than allowed or than the bytes left in the segment.
    BadLength {
        payload_len: u32,
    },
    BadKind,
    BadChecksum,
    /// Checksum fine, but the LSN is not the one expected at this point of the log.
    WrongLsn {
        found: Lsn,
        expected: Lsn,
    },
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Truncated => write!(f, "record header cut off by the end of the segment"),
            RecordError::Zeroed => write!(f, "zeroed record header"),
            RecordError::BadLength { payload_len } => {
                write!(f, "record length {payload_len} does not fit")
            }
            RecordError::BadKind => write!(f, "record kind 0 (reserved)"),
            RecordError::BadChecksum => write!(f, "record checksum mismatch"),
            RecordError::WrongLsn { found, expected } => {
                write!(f, "record LSN {found} where {expected} was expected")
            }
        }
    }
}

/// Appends one framed record (header, payload, zero padding) to `out`, checksummed under its
/// segment's `salt`.
pub fn encode_record(
    out: &mut Vec<u8>,
    lsn: Lsn,
    durable_lsn: Lsn,
    kind: u8,
    payload: &[u8],
    salt: Salt,
) {
    debug_assert!(kind != 0, "kind 0 is reserved");
    debug_assert!(payload.len() as u64 <= RECORD_PAYLOAD_BYTES_MAX);
    let start = out.len();
    let gap = lsn.0.saturating_sub(durable_lsn.0).min(u32::MAX as u64) as u32;
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // crc, filled below
    out.extend_from_slice(&lsn.0.to_le_bytes());
    out.extend_from_slice(&gap.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(payload);
    let padded = start + stored_bytes(payload.len() as u64) as usize;
    out.resize(padded, 0);
    let crc = record_crc(
        salt,
        &out[start..start + RECORD_HEADER_BYTES as usize],
        payload,
    );
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the record at the start of `bytes` (the rest of the segment from some offset).
/// `payload_max` bounds the length field; `expected` is the LSN the log needs next (`None` to
/// accept any LSN, as the durability-proof search does); `salt` is the segment's.
pub fn decode_record(
    bytes: &[u8],
    payload_max: u64,
    expected: Option<Lsn>,
    salt: Salt,
) -> Result<RecordHeader, RecordError> {
    let header_len = RECORD_HEADER_BYTES as usize;
    if bytes.len() < header_len {
        return Err(RecordError::Truncated);
    }
    let header = &bytes[..header_len];
    if header.iter().all(|&b| b == 0) {
        return Err(RecordError::Zeroed);
    }
    let payload_len = read_u32(header, 0);
    if payload_len as u64 > payload_max
        || header_len as u64 + payload_len as u64 > bytes.len() as u64
    {
        return Err(RecordError::BadLength { payload_len });
    }
    let kind = header[RECORD_KIND_AT];
    if kind == 0 {
        return Err(RecordError::BadKind);
    }
    let payload = &bytes[header_len..header_len + payload_len as usize];
    if record_crc(salt, header, payload) != read_u32(header, 4) {
        return Err(RecordError::BadChecksum);
    }
    let lsn = Lsn(read_u64(header, 8));
    if let Some(expected) = expected
        && lsn != expected
    {
        return Err(RecordError::WrongLsn {
            found: lsn,
            expected,
        });
    }
    let gap = read_u32(header, 16) as u64;
    Ok(RecordHeader {
        lsn,
        kind,
        payload_len,
        durable_lsn: Lsn(lsn.0.saturating_sub(gap)),
    })
}

/// Cheap pre-check (no checksum) for recovery's proof search: could the bytes at the start of
/// `bytes` be a record with an LSN in `(missing, lsn_bound]` that was appended when `missing` was
/// already durable? Only candidates that pass are checksummed by `decode_record`.
pub fn could_prove_durable(bytes: &[u8], missing: Lsn, lsn_bound: Lsn) -> bool {
    if bytes.len() < RECORD_HEADER_BYTES as usize {
        return false;
    }
    let lsn = read_u64(bytes, 8);
    let gap = read_u32(bytes, 16) as u64;
    bytes[RECORD_KIND_AT] != 0
        && lsn > missing.0
        && lsn <= lsn_bound.0
        && lsn.saturating_sub(gap) >= missing.0
}

/// Where a record header's kind lies: never 0, so every record has a non-zero byte there.
pub const RECORD_KIND_AT: usize = 20;

/// Bytes compared with zeros at a time by [`first_nonzero`] and [`last_nonzero`].
const ZERO_RUN_BYTES: usize = 4096;
static ZEROS: [u8; ZERO_RUN_BYTES] = [0; ZERO_RUN_BYTES];

/// Index of the first non-zero byte of `bytes`. Recovery looks past the end of the log on every
/// open, over the never-written rest of a segment (64 MiB by default): whole runs are compared
/// with zeros (`memcmp`), which stays fast even in unoptimized builds.
pub fn first_nonzero(bytes: &[u8]) -> Option<usize> {
    let mut start = 0;
    for run in bytes.chunks(ZERO_RUN_BYTES) {
        if run != &ZEROS[..run.len()] {
            return run.iter().position(|&b| b != 0).map(|i| start + i);
        }
        start += run.len();
    }
    None
}

/// Index of the last non-zero byte of `bytes` (see [`first_nonzero`]).
pub fn last_nonzero(bytes: &[u8]) -> Option<usize> {
    let mut end = bytes.len();
    for run in bytes.rchunks(ZERO_RUN_BYTES) {
        end -= run.len();
        if run != &ZEROS[..run.len()] {
            return run.iter().rposition(|&b| b != 0).map(|i| end + i);
        }
    }
    None
}

/// CRC-32 over the segment's salt (if any), the length field, the rest of the header after the
/// CRC field, and the payload. Covering the length means a torn length cannot send the reader
/// to a wrong payload unnoticed; starting from the salt, that only this segment's own records
/// check out in it.
fn record_crc(salt: Salt, header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    salt.feed(&mut hasher);
    hasher.update(&header[0..4]);
    hasher.update(&header[8..RECORD_HEADER_BYTES as usize]);
    hasher.update(payload);
    hasher.finalize()
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("slice of 4 bytes"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("slice of 8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: Salt = Salt(Some(0x5a17_5a17_5a17_5a17));

    #[test]
    fn a_record_checks_out_only_under_its_own_segments_salt() {
        let mut buf = Vec::new();
        encode_record(&mut buf, Lsn(3), Lsn(1), 1, b"body", SALT);
        assert!(decode_record(&buf, 1024, Some(Lsn(3)), SALT).is_ok());
        for other in [Salt::new(1), Salt::NONE, Salt::random()] {
            assert_eq!(
                decode_record(&buf, 1024, Some(Lsn(3)), other),
                Err(RecordError::BadChecksum),
                "{other:?}"
            );
        }
        // Version 1 records (no salt) still check out as such.
        let mut unsalted = Vec::new();
        encode_record(&mut unsalted, Lsn(3), Lsn(1), 1, b"body", Salt::NONE);
        assert!(decode_record(&unsalted, 1024, Some(Lsn(3)), Salt::NONE).is_ok());
        assert!(decode_record(&unsalted, 1024, Some(Lsn(3)), SALT).is_err());
    }

    #[test]
    fn fresh_salts_differ() {
        assert_ne!(Salt::random(), Salt::random());
        assert_ne!(Salt::random(), Salt::NONE);
    }

    #[test]
    fn a_version_1_header_is_read_without_a_salt() {
        let header = SegmentHeader {
            version: FORMAT_VERSION_UNSALTED,
            first_lsn: Lsn(42),
            segment_bytes: 1 << 20,
            salt: Salt::NONE,
            reused: false,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[32..60], &[0u8; 28][..], "reserved bytes stay zero");
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
    }

    #[test]
    fn nonzero_search_agrees_with_a_byte_scan_at_run_edges() {
        let len = 3 * ZERO_RUN_BYTES + 5;
        assert_eq!(first_nonzero(&[]), None);
        assert_eq!(last_nonzero(&[]), None);
        assert_eq!(first_nonzero(&vec![0; len]), None);
        assert_eq!(last_nonzero(&vec![0; len]), None);
        let edges = [
            0,
            1,
            ZERO_RUN_BYTES - 1,
            ZERO_RUN_BYTES,
            2 * ZERO_RUN_BYTES + 1,
            len - 1,
        ];
        for &at in &edges {
            let mut bytes = vec![0u8; len];
            bytes[at] = 7;
            assert_eq!(first_nonzero(&bytes), Some(at), "one byte at {at}");
            assert_eq!(last_nonzero(&bytes), Some(at), "one byte at {at}");
            for &other in &edges {
                let mut two = bytes.clone();
                two[other] = 1;
                assert_eq!(first_nonzero(&two), Some(at.min(other)));
                assert_eq!(last_nonzero(&two), Some(at.max(other)));
            }
        }
    }

    #[test]
    fn record_round_trips_with_padding() {
        let mut buf = Vec::new();
        encode_record(&mut buf, Lsn(7), Lsn(5), 3, b"hello", SALT);
        assert_eq!(buf.len() as u64, stored_bytes(5));
        assert_eq!(buf.len() % RECORD_ALIGN_BYTES as usize, 0);
        let header = decode_record(&buf, 1024, Some(Lsn(7)), SALT).expect("valid record");
        assert_eq!(header.lsn, Lsn(7));
        assert_eq!(header.kind, 3);
        assert_eq!(header.payload_len, 5);
        assert_eq!(header.durable_lsn, Lsn(5));
        assert_eq!(&buf[24..29], b"hello");
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode_record(&mut buf, Lsn(1), Lsn(0), 1, b"payload bytes", SALT);
        let used = RECORD_HEADER_BYTES as usize + 13;
        for byte in 0..used {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode_record(&bad, 1024, Some(Lsn(1)), SALT).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn wrong_lsn_and_zeroes_are_refused() {
        let mut buf = Vec::new();
        encode_record(&mut buf, Lsn(9), Lsn(0), 1, b"x", SALT);
        assert_eq!(
            decode_record(&buf, 1024, Some(Lsn(8)), SALT),
            Err(RecordError::WrongLsn {
                found: Lsn(9),
                expected: Lsn(8)
            })
        );
        assert_eq!(
            decode_record(&[0u8; 64], 1024, None, SALT),
            Err(RecordError::Zeroed)
        );
        assert_eq!(
            decode_record(&buf[..10], 1024, None, SALT),
            Err(RecordError::Truncated)
        );
    }

    #[test]
    fn durable_gap_saturates_towards_claiming_less() {
        let mut buf = Vec::new();
        encode_record(&mut buf, Lsn(u32::MAX as u64 * 3), Lsn(0), 1, b"", SALT);
        let header = decode_record(&buf, 0, None, SALT).expect("valid");
        // The stored gap saturates, so the decoded durable LSN is at most the true one (0 here
        // would be exact; anything larger would be a false durability claim).
        assert!(header.durable_lsn.0 <= u32::MAX as u64 * 2);
    }

    #[test]
    fn segment_header_round_trips_and_refuses_damage() {
        let header = SegmentHeader {
            version: FORMAT_VERSION,
            first_lsn: Lsn(42),
            segment_bytes: 1 << 20,
            salt: SALT,
            reused: true,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        assert_eq!(
            SegmentHeader::decode(&bytes[..10]),
            Err(HeaderError::Truncated { len: 10 })
        );
        let mut bad = bytes;
        bad[0] = b'X';
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderError::BadMagic));
        let mut bad = bytes;
        bad[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderError::BadChecksum));
        let mut future = bytes;
        future[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&future),
            Err(HeaderError::UnsupportedVersion { found: 3 })
        );
    }
}
