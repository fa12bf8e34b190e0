//! The process the crash test kills: opens the log in a directory and commits records from
//! several threads until it is killed, printing one acknowledgement line per commit that
//! returned (see `herald_tests::crash_record`).
//!
//! Usage: `wal_crash_writer <log-dir> <round> [threads]`. It never exits on its own before
//! `RUN_SECONDS_MAX`; any error is printed to stderr and ends the process with a non-zero code,
//! which the test reports.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use herald_tests::crash_record::{
    Ack, ROUND_MAX, RecordId, crash_log_options, crash_write_backend,
};
use herald_wal::{Options, Wal};

/// Threads committing at once (so group commit and interleaved appends are exercised).
const THREADS_DEFAULT: u8 = 4;
/// A bound on a writer nobody killed (its parent died without killing it, say).
const RUN_SECONDS_MAX: u64 = 120;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wal_crash_writer: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, round, threads) = match &args[..] {
        [dir, round] => (dir, round, None),
        [dir, round, threads] => (dir, round, Some(threads)),
        _ => return Err("usage: wal_crash_writer <log-dir> <round> [threads]".into()),
    };
    let dir = PathBuf::from(dir);
    let round: u32 = round
        .parse()
        .ok()
        .filter(|r| *r <= ROUND_MAX)
        .ok_or_else(|| format!("round {round:?} is not a number up to {ROUND_MAX}"))?;
    let threads: u8 = match threads {
        Some(t) => t
            .parse()
            .ok()
            .filter(|t| (1..=64).contains(t))
            .ok_or_else(|| format!("threads {t:?} is not a number in 1..=64"))?,
        None => THREADS_DEFAULT,
    };
    let options = Options {
        write_backend: crash_write_backend(round),
        ..crash_log_options()
    };
    let wal = Wal::open(&dir, options)
        .map_err(|e| format!("opening the log in {}: {e}", dir.display()))?;
    let deadline = Instant::now() + Duration::from_secs(RUN_SECONDS_MAX);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let wal = &wal;
                scope.spawn(move || {
                    // A failing thread ends the whole process at once: otherwise the test could
                    // SIGKILL a writer whose error it never saw, and call that a crash.
                    if let Err(message) = commit_until(wal, round, thread, deadline) {
                        eprintln!("wal_crash_writer: {message}");
                        std::process::exit(2);
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a writer thread panicked"))
            .collect::<Result<Vec<()>, String>>()
    })?;
    wal.close().map_err(|e| format!("closing the log: {e}"))
}

/// Commits this thread's records in sequence, acknowledging each after its commit returned.
fn commit_until(wal: &Wal, round: u32, thread: u8, deadline: Instant) -> Result<(), String> {
    let stdout = std::io::stdout();
    let mut seq = 0u32;
    while Instant::now() < deadline {
        let id = RecordId { round, thread, seq };
        let appended = wal
            .commit(id.kind(), &id.payload())
            .map_err(|e| format!("committing record {id}: {e}"))?;
        let line = Ack {
            lsn: appended.lsn,
            position: appended.position,
            id,
        }
        .to_line();
        // One write of one whole line, under the lock, then flushed: a kill leaves at most the
        // last line half-printed, never two lines interleaved.
        let mut out = stdout.lock();
        out.write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("printing the ack of record {id}: {e}"))?;
        seq = seq
            .checked_add(1)
            .ok_or_else(|| format!("thread {thread} ran out of sequence numbers"))?;
    }
    Ok(())
}
