//! Replays the committed fuzz corpora (`fuzz/corpus/*`) on the stable toolchain, so that every
//! input the fuzzers were seeded with, and every crash they ever found (`seed-crash-*`), runs in
//! `cargo test`; and writes the seed corpus (`write_seed_corpus`, ignored: run it by hand after
//! a format change).
//!
//! The seeds are built with the public `format` module: valid records and segments, then the
//! damage recovery must tell apart (torn tails, zeroed regions, flipped bytes, gaps, bad
//! headers), so that fuzzing starts past the checksums instead of spending its time finding them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use herald_wal::format::{self, SEGMENT_HEADER_BYTES, SegmentHeader};
use herald_wal::fuzzing::{HARNESS_SALT, fuzz_record_decoder, fuzz_recovery};
use herald_wal::{Error, Lsn, MemStorage, Options, Storage, Wal, segment_file_name};

/// The committed seeds of each target; fewer means the corpus went missing and the replay below
/// would pass without testing anything.
const SEEDS_MIN: usize = 5;

#[test]
fn record_decoder_corpus_replays_without_panics() {
    replay("record_decoder", fuzz_record_decoder);
}

#[test]
fn recovery_corpus_replays_without_panics() {
    replay("recovery", fuzz_recovery);
}

/// Runs every file of `fuzz/corpus/<target>` (seeds and, locally, whatever the fuzzer added)
/// through `run`, and names every file that panicked.
fn replay(target: &str, run: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("listing a corpus directory").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    let seeds = files.iter().filter(|path| is_seed(path)).count();
    assert!(
        seeds >= SEEDS_MIN,
        "corpus {} holds {seeds} seed-* files, expected at least {SEEDS_MIN}",
        dir.display()
    );
    let mut panicked = Vec::new();
    for path in &files {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panicked.push(path.display().to_string());
        }
    }
    assert!(
        panicked.is_empty(),
        "{} of {} {target} corpus files panicked:\n{}",
        panicked.len(),
        files.len(),
        panicked.join("\n")
    );
    eprintln!(
        "replayed {} {target} corpus files ({seeds} seeds)",
        files.len()
    );
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn is_seed(path: &Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with("seed-"))
}

/// Writes the seed corpus into `fuzz/corpus/*/seed-*`, after checking that each recovery seed
/// meets recovery the way its name says (so the seeds keep reaching the branches they are for).
#[test]
#[ignore = "writes fuzz/corpus/*/seed-*; run by hand after a format change"]
fn write_seed_corpus() {
    let recovery = recovery_seeds();
    let astray: Vec<String> = recovery
        .iter()
        .filter_map(|seed| {
            let found = recover_like_the_harness(&seed.data);
            (found != seed.expect)
                .then(|| format!("{}: {found:?}, meant {:?}", seed.name, seed.expect))
        })
        .collect();
    assert!(
        astray.is_empty(),
        "recovery seeds that do not meet recovery as intended:\n{}",
        astray.join("\n")
    );
    let mut total = 0;
    for (target, seeds) in [
        ("record_decoder", decoder_seeds()),
        (
            "recovery",
            recovery.into_iter().map(|s| (s.name, s.data)).collect(),
        ),
    ] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("creating the corpus directory");
        for (name, data) in seeds {
            total += data.len();
            std::fs::write(dir.join(format!("seed-{name}")), &data).expect("writing a seed");
        }
    }
    assert!(
        total < 200 * 1024,
        "seed corpus of {total} bytes is too big"
    );
}

/// Segment size the recovery harness gives each 4 KiB chunk of its input.
const HARNESS_SEGMENT_BYTES: usize = 4096;
/// Largest payload a 4 KiB segment takes.
const HARNESS_PAYLOAD_MAX: usize =
    (HARNESS_SEGMENT_BYTES - SEGMENT_HEADER_BYTES as usize - format::RECORD_HEADER_BYTES as usize)
        & !(format::RECORD_ALIGN_BYTES as usize - 1);

/// One record of a seed: its LSN, the durable LSN it claims, kind and payload length.
#[derive(Debug, Clone, Copy)]
struct Rec {
    lsn: u64,
    durable: u64,
    kind: u8,
    len: usize,
}

impl Rec {
    /// A record appended when everything before it was durable except `unsynced` records.
    fn new(lsn: u64, unsynced: u64, len: usize) -> Rec {
        Rec {
            lsn,
            durable: lsn.saturating_sub(1 + unsynced),
            kind: 1 + (lsn % 7) as u8,
            len,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let payload: Vec<u8> = (0..self.len)
            .map(|i| (self.lsn as usize * 31 + i * 7) as u8)
            .collect();
        let start = out.len();
        let kind = self.kind.max(1); // the encoder refuses the reserved kind 0...
        format::encode_record(
            out,
            Lsn(self.lsn),
            Lsn(self.durable),
            kind,
            &payload,
            HARNESS_SALT,
        );
        // ...so a kind-0 record is patched in after (decoders refuse it before the checksum).
        out[start + 20] = self.kind;
    }
}

/// Records `first..first + count` with lengths cycling through `lens`, `unsynced` behind.
fn run_of(first: u64, count: u64, lens: &[usize], unsynced: u64) -> Vec<Rec> {
    (0..count)
        .map(|i| Rec::new(first + i, unsynced, lens[i as usize % lens.len()]))
        .collect()
}

/// A 4 KiB segment image: a valid header for `first_lsn`, then `records` back to back. Returns
/// the image and the offset of each record.
fn segment(first_lsn: u64, records: &[Rec]) -> (Vec<u8>, Vec<usize>) {
    let header = SegmentHeader {
        version: format::FORMAT_VERSION,
        first_lsn: Lsn(first_lsn),
        segment_bytes: HARNESS_SEGMENT_BYTES as u64,
        salt: HARNESS_SALT,
        reused: false,
    };
    let mut image = header.encode().to_vec();
    let mut offsets = Vec::new();
    for rec in records {
        offsets.push(image.len());
        rec.encode(&mut image);
    }
    assert!(
        image.len() <= HARNESS_SEGMENT_BYTES,
        "seed segment at {first_lsn} overflows"
    );
    image.resize(HARNESS_SEGMENT_BYTES, 0);
    (image, offsets)
}

/// A recovery seed and what recovering it must give.
#[derive(Debug)]
struct RecoverySeed {
    name: String,
    data: Vec<u8>,
    expect: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Recovery succeeds; the next append gets this LSN; a torn tail was (or was not) cut.
    Opens {
        next_lsn: u64,
        cut_tail: bool,
    },
    Corruption,
    BadSegmentHeader,
}

/// The harness input for `segments`: it gives even chunks a valid header itself and names each
/// chunk's segment after the previous one's first LSN plus `1 + chunk[0] % 8`. Segment 0 keeps
/// its first byte free (the harness overwrites it), so that byte says how many records the first
/// segment holds; trailing zeros of the last segment are left out (the harness pads).
fn harness_input(segments: &[Vec<u8>], records_in_first: u64) -> Vec<u8> {
    assert!(segments.len() <= 3, "the harness reads three segments");
    assert!((1..=8).contains(&records_in_first));
    let mut data: Vec<u8> = segments.concat();
    if segments.len() > 1 {
        data[0] = (records_in_first - 1) as u8;
    }
    while data.last() == Some(&0) {
        data.pop();
    }
    data
}

fn recovery_seeds() -> Vec<RecoverySeed> {
    let mut seeds = Vec::new();
    let mut add = |name: &str, data: Vec<u8>, expect: Outcome| {
        seeds.push(RecoverySeed {
            name: name.to_string(),
            data,
            expect,
        })
    };
    let opens = |next_lsn, cut_tail| Outcome::Opens { next_lsn, cut_tail };

    add("empty-log", vec![0], opens(1, false));

    let small = [0, 1, 13, 40, 100, 7];
    let (image, _) = segment(1, &run_of(1, 12, &small, 0));
    add("one-segment", harness_input(&[image], 1), opens(13, false));

    // Records of every size class, one of them the largest a 4 KiB segment takes.
    let (image, _) = segment(
        1,
        &[
            Rec::new(1, 0, 3),
            Rec::new(2, 0, 1500),
            Rec::new(3, 0, 2000),
        ],
    );
    add("mixed-sizes", harness_input(&[image], 1), opens(4, false));
    let (image, _) = segment(1, &[Rec::new(1, 0, HARNESS_PAYLOAD_MAX)]);
    add("full-segment", harness_input(&[image], 1), opens(2, false));

    // Three segments chained as the harness names them: 3 records, then 1 (the harness derives
    // the third segment's name from the magic's first byte), then several.
    let seg0 = segment(1, &run_of(1, 3, &[20, 300], 0)).0;
    let seg1 = segment(4, &[Rec::new(4, 0, 64)]).0;
    let seg2 = segment(5, &run_of(5, 6, &[8, 90, 250], 1)).0;
    add(
        "three-segments",
        harness_input(&[seg0.clone(), seg1.clone(), seg2.clone()], 3),
        opens(11, false),
    );

    // A torn last record: payload half written, then header not written at all.
    let recs = run_of(1, 6, &[200], 1);
    let (mut image, offsets) = segment(1, &recs);
    let last = offsets[5];
    image[last + 24 + 100..last + 24 + 200].fill(0);
    add("torn-payload", harness_input(&[image], 1), opens(6, true));
    let (mut image, _) = segment(1, &recs);
    image[last..last + 24].fill(0);
    add("torn-header", harness_input(&[image], 1), opens(6, true));

    // Unsynced records lost in the middle of the tail: a zeroed record followed by records that
    // do not prove it durable is a torn tail; garbage after the end likewise.
    let recs = run_of(1, 8, &[48], 4);
    let (mut image, offsets) = segment(1, &recs);
    image[offsets[5]..offsets[6]].fill(0);
    add(
        "zeroed-unsynced",
        harness_input(&[image], 1),
        opens(6, true),
    );
    let (mut image, offsets) = segment(1, &run_of(1, 4, &[60], 0));
    let end = offsets[3] + format::stored_bytes(60) as usize;
    for (i, byte) in image[end..end + 300].iter_mut().enumerate() {
        *byte = (i * 151 + 7) as u8;
    }
    add(
        "garbage-after-tail",
        harness_input(&[image], 1),
        opens(5, true),
    );

    // A record damaged before a record that proves it was durable: corruption, never skipped.
    let recs = run_of(1, 8, &[48], 0);
    let (mut image, offsets) = segment(1, &recs);
    image[offsets[3] + 30] ^= 0x40;
    add(
        "flipped-durable",
        harness_input(&[image], 1),
        Outcome::Corruption,
    );
    let (mut image, offsets) = segment(1, &recs);
    image[offsets[3]..offsets[5]].fill(0);
    add(
        "zeroed-durable",
        harness_input(&[image], 1),
        Outcome::Corruption,
    );
    // The same flip in a record nothing later proves durable: a torn tail.
    let recs = run_of(1, 8, &[48], 7);
    let (mut image, offsets) = segment(1, &recs);
    image[offsets[3] + 30] ^= 0x40;
    add(
        "flipped-unsynced",
        harness_input(&[image], 1),
        opens(4, true),
    );
    // Damage in the length field, so the scan must not follow it.
    let recs = run_of(1, 5, &[48], 0);
    let (mut image, offsets) = segment(1, &recs);
    image[offsets[2] + 1] = 0x7f;
    add(
        "bad-length",
        harness_input(&[image], 1),
        Outcome::Corruption,
    );

    // Well-formed records in the wrong order, a repeated LSN, and kind 0.
    let (image, _) = segment(
        1,
        &[Rec::new(1, 0, 8), Rec::new(3, 0, 8), Rec::new(2, 0, 8)],
    );
    add("wrong-lsn", harness_input(&[image], 1), opens(2, true));
    let (image, _) = segment(
        1,
        &[Rec::new(1, 0, 8), Rec::new(2, 0, 8), Rec::new(2, 0, 8)],
    );
    add("repeated-lsn", harness_input(&[image], 1), opens(3, true));
    let mut recs = run_of(1, 3, &[16], 2);
    recs[2].kind = 0;
    let (image, _) = segment(1, &recs);
    add("kind-zero", harness_input(&[image], 1), opens(3, true));

    // The first segment ends early: the second was never reached (a torn tail across segments)
    // or holds records proving the lost one durable (corruption across segments).
    let seg0_short = segment(1, &run_of(1, 2, &[20, 300], 0)).0;
    add(
        "gap-before-durable-segment",
        harness_input(&[seg0_short.clone(), seg1.clone(), seg2.clone()], 3),
        Outcome::Corruption,
    );
    let seg1_unsynced = segment(4, &[Rec::new(4, 3, 64)]).0;
    let seg2_unsynced = segment(5, &run_of(5, 6, &[8, 90], 8)).0;
    add(
        "gap-before-unsynced-segment",
        harness_input(&[seg0_short, seg1_unsynced, seg2_unsynced], 3),
        opens(3, true),
    );

    // Bad second segment headers: wrong first LSN, flipped byte, foreign magic.
    let mut seg1_bad = segment(9, &[Rec::new(9, 0, 64)]).0;
    add(
        "header-lsn-mismatch",
        harness_input(&[seg0.clone(), seg1_bad.clone(), seg2.clone()], 3),
        Outcome::BadSegmentHeader,
    );
    seg1_bad = seg1.clone();
    seg1_bad[20] ^= 1;
    add(
        "header-flipped",
        harness_input(&[seg0.clone(), seg1_bad.clone()], 3),
        Outcome::BadSegmentHeader,
    );
    seg1_bad = seg1.clone();
    seg1_bad[..8].copy_from_slice(b"NOTAWAL\0");
    add(
        "header-magic",
        harness_input(&[seg0, seg1_bad], 3),
        Outcome::BadSegmentHeader,
    );
    seeds
}

/// Recovers `data` laid out as `fuzz_recovery` lays it out, and says how it went.
fn recover_like_the_harness(data: &[u8]) -> Outcome {
    let storage = MemStorage::new();
    let mut first_lsn = 1u64;
    for (i, chunk) in data.chunks(HARNESS_SEGMENT_BYTES).take(3).enumerate() {
        let mut file = vec![0u8; HARNESS_SEGMENT_BYTES];
        file[..chunk.len()].copy_from_slice(chunk);
        if i % 2 == 0 {
            let header = SegmentHeader {
                version: format::FORMAT_VERSION,
                first_lsn: Lsn(first_lsn),
                segment_bytes: HARNESS_SEGMENT_BYTES as u64,
                salt: HARNESS_SALT,
                reused: i == 2,
            };
            file[..SEGMENT_HEADER_BYTES as usize].copy_from_slice(&header.encode());
        }
        storage.set_file_bytes(&segment_file_name(Lsn(first_lsn)), file);
        first_lsn += 1 + (chunk.first().copied().unwrap_or(0) as u64 % 8);
    }
    let options = Options {
        segment_bytes: HARNESS_SEGMENT_BYTES as u64,
        ..Options::default()
    };
    let storage: Arc<dyn Storage> = Arc::new(storage);
    match Wal::open_storage(storage, options) {
        Ok(wal) => Outcome::Opens {
            next_lsn: wal.next_lsn().0,
            cut_tail: wal.recovery_report().truncated.is_some(),
        },
        Err(Error::Corruption { .. }) => Outcome::Corruption,
        Err(Error::BadSegmentHeader { .. }) => Outcome::BadSegmentHeader,
        Err(other) => panic!("unexpected recovery error: {other}"),
    }
}

fn decoder_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let one = |len: usize| {
        let mut out = Vec::new();
        Rec::new(5, 1, len).encode(&mut out);
        out
    };
    for len in [0, 1, 8, 57, 300] {
        seeds.push((format!("record-{len}"), one(len)));
    }
    let mut run = Vec::new();
    for rec in run_of(100, 6, &[0, 9, 33, 120], 2) {
        rec.encode(&mut run);
    }
    seeds.push(("records".into(), run.clone()));
    let (image, _) = segment(42, &run_of(42, 5, &[16, 70], 1));
    let image_len = image.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    seeds.push(("segment".into(), image[..image_len].to_vec()));
    let header = SegmentHeader {
        version: format::FORMAT_VERSION,
        first_lsn: Lsn(7),
        segment_bytes: 1 << 20,
        salt: HARNESS_SALT,
        reused: false,
    }
    .encode();
    seeds.push(("segment-header".into(), header.to_vec()));
    let mut future = header;
    future[8] = 3;
    seeds.push(("segment-header-future".into(), future.to_vec()));

    let mut flipped = run.clone();
    flipped[40] ^= 0x08;
    seeds.push(("records-flipped".into(), flipped));
    seeds.push(("records-torn".into(), run[..run.len() - 50].to_vec()));
    let mut zeroed = run.clone();
    zeroed[..24].fill(0);
    seeds.push(("records-zeroed-header".into(), zeroed));
    let mut huge = one(20);
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    seeds.push(("record-huge-length".into(), huge));
    let mut kind_zero = one(20);
    kind_zero[20] = 0;
    seeds.push(("record-kind-zero".into(), kind_zero));
    seeds
}
