//! Crash test with real processes: round after round, a writer process commits records to one
//! log from several threads and is killed with SIGKILL at a random moment; the test then
//! recovers the log and checks the log's promises against what the writer acknowledged.
//!
//! After every kill:
//! - every record the writer acknowledged (printed after its commit returned) is there, at the
//!   LSN and position it was acknowledged with, with intact content;
//! - records come back in strictly increasing, gap-free LSN order, and every one of them
//!   verifies by its content alone (nothing partial surfaces, acknowledged or not);
//! - each writer thread's records form a prefix of its sequence (a thread only commits its next
//!   record after the previous one returned, so the log can never hold a later one without it);
//! - everything seen in earlier rounds (and not released by the test) is still there, unchanged;
//! - the log continues cleanly: appends get the next LSNs and read back.
//!
//! Odd rounds write through io_uring, even rounds through `pwrite` (`crash_write_backend`).
//!
//! The kill schedule is a function of a seed, printed at the start (`HERALD_CRASH_SEED=<n>`
//! replays it; the writer's own timing still varies from run to run).

use std::collections::{BTreeSet, VecDeque};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use herald_tests::crash_record::{Ack, RecordId, crash_log_options, parse_acks, verify_record};
use herald_tests::kill::{Kill, crash_seed, run_until_killed};
use herald_wal::{Lsn, Position, Wal};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Writer threads per process.
const WRITER_THREADS: u8 = 4;
/// Thread id of the records the test appends itself after each recovery.
const TEST_THREAD: u8 = u8::MAX;
/// Records the test appends after each recovery.
const TEST_APPENDS: u32 = 3;
/// When the live segments exceed this, the test releases the older half of the log, so that
/// long runs stay bounded (and release, too, meets crashes).
const LOG_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// One round in this many kills the writer at a random moment after spawning it, acknowledged
/// or not: while it opens and recovers the log, or before its first commit returns.
const BLIND_KILL_ONE_IN: u32 = 5;
const BLIND_KILL_MS_MAX: u64 = 40;
/// Other rounds kill the writer this long after its first acknowledgement.
const KILL_AFTER_ACK_MS: std::ops::RangeInclusive<u64> = 5..=150;

#[test]
fn acknowledged_records_survive_sigkill() {
    run_crash_rounds(80);
}

#[test]
#[ignore = "long: 500 kill rounds (run with `cargo test -p herald-tests -- --ignored`)"]
fn acknowledged_records_survive_sigkill_long() {
    run_crash_rounds(500);
}

fn run_crash_rounds(rounds: u32) {
    let seed = crash_seed("wal_crash", rounds);
    let mut rng = SmallRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().expect("creating a temporary directory");
    let dir = tmp.path().join("wal");
    let mut log = LogModel {
        first_lsn: Lsn(1),
        records: VecDeque::new(),
    };
    let mut stats = Stats::default();
    let started = Instant::now();
    for round in 1..=rounds {
        let kill = if rng.gen_range(0..BLIND_KILL_ONE_IN) == 0 {
            Kill::Blind(Duration::from_millis(rng.gen_range(0..=BLIND_KILL_MS_MAX)))
        } else {
            Kill::AfterFirstAck(Duration::from_millis(rng.gen_range(KILL_AFTER_ACK_MS)))
        };
        run_round(&dir, round, kill, &mut log, &mut stats);
    }
    eprintln!(
        "wal_crash: {rounds} rounds in {:.1?} (seed {seed}): {} acknowledged records in {} rounds \
         ({} blind kills), {} written but unacknowledged, {} torn tails cut, {} segments \
         acknowledged into, {} released; log ends at LSN {}",
        started.elapsed(),
        stats.acked,
        stats.rounds_acked,
        stats.blind_kills,
        stats.unacked_found,
        stats.torn_tails,
        stats.ack_segments.len(),
        stats.released,
        log.end().0 - 1,
    );
    // A run that acknowledged nothing checked nothing.
    assert!(
        stats.acked > 0,
        "seed {seed}: the writer acknowledged nothing in {rounds} rounds"
    );
    assert!(
        stats.ack_segments.len() >= 2,
        "seed {seed}: acknowledged records never crossed a segment boundary"
    );
}

/// What the log holds, as far as the test knows: the record ids and positions from `first_lsn`
/// on, in LSN order.
#[derive(Debug)]
struct LogModel {
    first_lsn: Lsn,
    records: VecDeque<(RecordId, Position)>,
}

impl LogModel {
    /// LSN after the last known record.
    fn end(&self) -> Lsn {
        Lsn(self.first_lsn.0 + self.records.len() as u64)
    }

    fn get(&self, lsn: Lsn) -> Option<(RecordId, Position)> {
        let index = lsn.0.checked_sub(self.first_lsn.0)?;
        self.records.get(usize::try_from(index).ok()?).copied()
    }
}

#[derive(Debug, Default)]
struct Stats {
    acked: u64,
    rounds_acked: u32,
    blind_kills: u32,
    unacked_found: u64,
    torn_tails: u32,
    released: usize,
    ack_segments: BTreeSet<Lsn>,
}

fn run_round(dir: &Path, round: u32, kill: Kill, log: &mut LogModel, stats: &mut Stats) {
    let acks = run_writer_until_killed(dir, round, kill);
    if matches!(kill, Kill::Blind(_)) {
        stats.blind_kills += 1;
    }
    for ack in &acks {
        assert_eq!(
            ack.id.round, round,
            "round {round}: writer acknowledged {} with the wrong round",
            ack.id
        );
        stats.ack_segments.insert(ack.position.segment);
    }
    stats.acked += acks.len() as u64;
    stats.rounds_acked += u32::from(!acks.is_empty());

    // Recover, checking each record as recovery hands it out.
    let known_before = log.records.len();
    let mut recovery = Wal::recover(dir, crash_log_options())
        .unwrap_or_else(|e| panic!("round {round}: recovery refused the log: {e}"));
    let mut expected_lsn = log.first_lsn;
    let mut index = 0usize;
    let mut next_seq = [0u32; WRITER_THREADS as usize];
    for record in &mut recovery {
        let record = record.unwrap_or_else(|e| {
            panic!("round {round}: recovery failed where LSN {expected_lsn} was next: {e}")
        });
        assert_eq!(
            record.lsn, expected_lsn,
            "round {round}: recovery returned LSN {} where {expected_lsn} was next",
            record.lsn
        );
        let id = verify_record(record.kind, &record.payload).unwrap_or_else(|e| {
            panic!(
                "round {round}: record {} at {} does not verify: {e}",
                record.lsn, record.position
            )
        });
        if index < known_before {
            let (known_id, known_position) = log.records[index];
            assert_eq!(
                (id, record.position),
                (known_id, known_position),
                "round {round}: LSN {} changed since an earlier round saw it",
                record.lsn
            );
        } else {
            assert!(
                id.round == round && id.thread < WRITER_THREADS,
                "round {round}: new record {id} at LSN {} was not written by this round's writer",
                record.lsn
            );
            let next = &mut next_seq[id.thread as usize];
            assert_eq!(
                id.seq, *next,
                "round {round}: LSN {} holds {id} but thread {}'s record #{} is not before it",
                record.lsn, id.thread, *next
            );
            *next += 1;
            log.records.push_back((id, record.position));
        }
        index += 1;
        expected_lsn = expected_lsn.next();
    }
    assert!(
        index >= known_before,
        "round {round}: recovery ends before LSN {expected_lsn}, but LSNs up to {} were in the \
         log before the writer ran",
        log.first_lsn.0 + known_before as u64 - 1
    );
    for ack in &acks {
        match log.get(ack.lsn) {
            Some(found) => assert_eq!(
                found,
                (ack.id, ack.position),
                "round {round}: acknowledged LSN {} holds a different record",
                ack.lsn
            ),
            None => panic!(
                "round {round}: acknowledged record {} (LSN {} at {}) is missing; the recovered \
                 log ends before LSN {}",
                ack.id,
                ack.lsn,
                ack.position,
                log.end()
            ),
        }
    }
    stats.unacked_found += (log.records.len() - known_before).saturating_sub(acks.len()) as u64;

    let wal = recovery
        .finish()
        .unwrap_or_else(|e| panic!("round {round}: finishing recovery failed: {e}"));
    stats.torn_tails += u32::from(wal.recovery_report().truncated.is_some());
    assert_eq!(
        wal.next_lsn(),
        log.end(),
        "round {round}: next LSN after recovery"
    );
    assert_eq!(wal.first_lsn(), log.first_lsn, "round {round}: first LSN");
    append_and_read_back(&wal, round, log);
    release_if_large(&wal, round, log, stats);
    wal.close()
        .unwrap_or_else(|e| panic!("round {round}: closing the log failed: {e}"));
}

/// Spawns the writer, kills it as `kill` says, and returns the commits it acknowledged.
fn run_writer_until_killed(dir: &Path, round: u32, kill: Kill) -> Vec<Ack> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wal_crash_writer"));
    command
        .arg(dir)
        .arg(round.to_string())
        .arg(WRITER_THREADS.to_string());
    // Every complete line of this writer is an acknowledgement.
    let output = run_until_killed(command, round, kill, |_| true);
    let acks = parse_acks(&output).unwrap_or_else(|e| panic!("round {round}: {e}"));
    if matches!(kill, Kill::AfterFirstAck(_)) {
        assert!(!acks.is_empty(), "round {round}: a first line was seen");
    }
    acks
}

/// Appends a few records after recovery and reads them back, by position and by LSN.
fn append_and_read_back(wal: &Wal, round: u32, log: &mut LogModel) {
    let first_appended = log.end();
    for seq in 0..TEST_APPENDS {
        let id = RecordId {
            round,
            thread: TEST_THREAD,
            seq,
        };
        let appended = wal
            .commit(id.kind(), &id.payload())
            .unwrap_or_else(|e| panic!("round {round}: appending {id} after recovery: {e}"));
        assert_eq!(
            appended.lsn,
            log.end(),
            "round {round}: LSN of appended {id}"
        );
        let record = wal
            .read(appended.position)
            .unwrap_or_else(|e| panic!("round {round}: reading back {id}: {e}"));
        assert_eq!(
            verify_record(record.kind, &record.payload),
            Ok(id),
            "round {round}: appended record read back"
        );
        log.records.push_back((id, appended.position));
    }
    let replayed: Vec<(Lsn, RecordId)> = wal
        .records_from(first_appended)
        .unwrap_or_else(|e| panic!("round {round}: replaying the appended records: {e}"))
        .map(|r| {
            let record = r.unwrap_or_else(|e| panic!("round {round}: replaying: {e}"));
            let id = verify_record(record.kind, &record.payload)
                .unwrap_or_else(|e| panic!("round {round}: replayed record: {e}"));
            (record.lsn, id)
        })
        .collect();
    let expected: Vec<(Lsn, RecordId)> = (0..TEST_APPENDS)
        .map(|seq| {
            let lsn = Lsn(first_appended.0 + seq as u64);
            (lsn, log.get(lsn).expect("just appended").0)
        })
        .collect();
    assert_eq!(
        replayed, expected,
        "round {round}: replay of the appended records"
    );
}

/// Releases the older half of the log once it outgrows `LOG_BYTES_MAX`.
fn release_if_large(wal: &Wal, round: u32, log: &mut LogModel, stats: &mut Stats) {
    let live_bytes: u64 = wal.segments().iter().map(|s| s.segment_bytes).sum();
    if live_bytes <= LOG_BYTES_MAX {
        return;
    }
    let middle = Lsn(log.first_lsn.0 + log.records.len() as u64 / 2);
    let released = wal
        .release_before(middle)
        .unwrap_or_else(|e| panic!("round {round}: releasing before {middle}: {e}"));
    let first_lsn = wal.first_lsn();
    assert!(
        released > 0 && first_lsn <= middle,
        "round {round}: releasing before {middle} released {released} segments, first LSN {first_lsn}"
    );
    log.records
        .drain(..(first_lsn.0 - log.first_lsn.0) as usize);
    log.first_lsn = first_lsn;
    stats.released += released;
}
