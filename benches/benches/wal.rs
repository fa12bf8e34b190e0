//! Benchmarks of the write-ahead log, each beside its floor measured in the same run.
//!
//! Two parts, both driven by `cargo bench -p herald-benches`:
//!
//! - criterion micro-benchmarks (`wal/commit_sync_128B/*`, `wal/append_none_128B`): the latency
//!   of one durable commit and of one non-durable append (separate figures, never mixed), with
//!   criterion's statistics;
//! - the throughput suite: timed loops that print each figure with its floor and the target set
//!   for it, then a table of all of them:
//!   - `wal/commit_1x128B/*`: one committer, 128 B records, `Sync`, against a 4 KiB `pwrite` +
//!     `fdatasync` loop over a pre-written file (target ≥ 0.85×);
//!   - `wal/commit_64x1KiB/*`: 64 committer threads, 1 KiB records, `Sync`, against the one
//!     committer figure (target ≥ 15×), and against the full-group ceiling: 64 × the rate of a
//!     raw sync of 64 such records, what the log would reach if every sync carried one record of
//!     every committer;
//!   - `wal/bulk_1MiB/pwrite`: one 1 MiB record per `Sync` commit, against 1 MiB `write` +
//!     `fdatasync` appended to a fresh file (target ≥ 0.8×) and over a pre-zeroed file;
//!   - `wal/recovery_1GiB`: `Wal::recover` over a 1 GiB log, every record iterated, then
//!     `finish`, against `read()` of the same bytes, with and without a CRC-32 over them
//!     (target ≥ 1 GB/s).
//!
//! The `*` is the write backend: `pwrite`, and `io_uring` when built with `--features io-uring`
//! (skipped, with the reason, where the kernel refuses it). Durable loops and their floors run
//! in interleaved rounds, so a disk whose speed drifts during the run (a shared or cloud disk
//! does) drifts under both sides of each ratio alike. Commit loops also print the CPU time per
//! commit, which tells a loop waiting on the disk from one waiting on the CPU.
//!
//! Under `cargo test --benches` (no `--bench` argument) everything runs once, on tiny sizes, as
//! a smoke test. Sizes and times are set by environment variables, see [`Settings::from_env`];
//! a filter argument (`cargo bench -p herald-benches -- recovery`) selects benchmarks by name.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use herald_benches::floors;
use herald_benches::measure::{
    Measured, bytes, cpu_summary, process_cpu_time, repeat_for, run_for,
};
use herald_benches::report::{Figure, Report, Target};
use herald_benches::scratch::{self, bench_root, filesystem_type, wait_for_spare};
use herald_benches::settings::{Invocation, env_f64, env_u64};
use herald_wal::{Durability, Options, Wal, WriteBackend};
use tempfile::TempDir;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Record kind used for every benchmark record (0 is reserved).
const KIND: u8 = 1;
/// How long to wait for a log's first spare segment before a timed loop.
const SPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// Buffer of the `read()` floor.
const READ_BUFFER_BYTES: usize = 1 << 20;

fn main() {
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("bench settings: {e}");
            std::process::exit(2);
        }
    };
    if settings.list {
        // Criterion lists its own; the suite's names follow in the same format.
        for name in SUITE {
            println!("{name}: benchmark");
        }
    }
    let mut criterion = Criterion::default().configure_from_args();
    if let Err(e) = run(&settings, &mut criterion) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
    criterion.final_summary();
}

/// Names of the throughput suite (the filter argument selects among them by substring).
const SUITE: [&str; 4] = [
    "wal/commit_1x128B",
    "wal/commit_64x1KiB",
    "wal/bulk_1MiB/pwrite",
    "wal/recovery",
];

fn run(settings: &Settings, criterion: &mut Criterion) -> BenchResult<()> {
    if settings.list {
        return Ok(());
    }
    let root = bench_root()?;
    println!(
        "herald-benches: {} mode, writing in {} ({}), {} CPUs; each timed loop runs {:?} in {} \
         interleaved rounds; segments {}; MB and GB are 10^6 and 10^9 bytes",
        if settings.bench {
            "bench"
        } else {
            "test (tiny sizes)"
        },
        root.display(),
        filesystem_type(&root).unwrap_or_else(|| "unknown filesystem".into()),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        settings.run,
        settings.rounds,
        bytes(settings.segment_bytes),
    );
    micro(settings, &root, criterion)?;
    let mut report = Report::new();
    commits(settings, &root, &mut report)?;
    if settings.selected("wal/bulk_1MiB/pwrite") {
        bulk(settings, &root, &mut report)?;
    }
    if settings.selected("wal/recovery") {
        recovery(settings, &root, &mut report)?;
    }
    report.print_table();
    if !settings.bench {
        println!("(test mode: one tiny pass of each, not judged against targets)");
    }
    Ok(())
}

/// What to run, how long and how big: from the command line (mode, filter) and the environment.
#[derive(Debug)]
struct Settings {
    /// `cargo bench` (full sizes); otherwise `cargo test --benches` (one tiny pass).
    bench: bool,
    /// `--list`: print the names only.
    list: bool,
    filter: Option<String>,
    /// Length of each timed loop.
    run: Duration,
    /// Each timed loop is cut into this many slices, interleaved with its floors'.
    rounds: u32,
    /// Measurement time of each criterion micro-benchmark.
    micro_time: Duration,
    segment_bytes: u64,
    committers: usize,
    bulk_record_bytes: usize,
    recovery_bytes: u64,
    recovery_record_bytes: usize,
}

impl Settings {
    /// Reads the mode and filter from the arguments (as criterion does) and sizes from:
    ///
    /// | variable | default | |
    /// |---|---|---|
    /// | `HERALD_BENCH_SECS` | 3 | length of each timed loop (floors included) |
    /// | `HERALD_BENCH_ROUNDS` | 3 | slices each loop is cut into, interleaved with its floors |
    /// | `HERALD_BENCH_MICRO_SECS` | 3 | criterion measurement time per micro-benchmark |
    /// | `HERALD_BENCH_SEGMENT_BYTES` | 64 MiB | log segment size (the log's default) |
    /// | `HERALD_BENCH_COMMITTERS` | 64 | threads of the concurrent commit benchmark |
    /// | `HERALD_BENCH_BULK_RECORD_BYTES` | 1 MiB | record size of the bulk benchmark |
    /// | `HERALD_BENCH_RECOVERY_BYTES` | 1 GiB | size of the log recovery scans |
    /// | `HERALD_BENCH_RECOVERY_RECORD_BYTES` | 1 KiB | record payload size in that log |
    /// | `HERALD_BENCH_DIR` | `target/bench-tmp` | where files go (must be a real disk) |
    ///
    /// Without `--bench` (test mode) the defaults shrink to a smoke test of well under a second
    /// per benchmark; the variables still apply.
    fn from_env() -> BenchResult<Settings> {
        let Invocation {
            bench,
            list,
            filter,
        } = Invocation::from_args();
        let (secs, micro_secs, segment_bytes, recovery_bytes) = if bench {
            (3.0, 3.0, 64 << 20, 1 << 30)
        } else {
            (0.02, 0.02, 4 << 20, 2 << 20)
        };
        let settings = Settings {
            bench,
            list,
            filter,
            run: Duration::from_secs_f64(env_f64("HERALD_BENCH_SECS", secs)?),
            rounds: env_u64("HERALD_BENCH_ROUNDS", if bench { 3 } else { 1 })?.try_into()?,
            micro_time: Duration::from_secs_f64(env_f64("HERALD_BENCH_MICRO_SECS", micro_secs)?),
            segment_bytes: env_u64("HERALD_BENCH_SEGMENT_BYTES", segment_bytes)?,
            committers: env_u64("HERALD_BENCH_COMMITTERS", 64)?.try_into()?,
            bulk_record_bytes: env_u64("HERALD_BENCH_BULK_RECORD_BYTES", 1 << 20)?.try_into()?,
            recovery_bytes: env_u64("HERALD_BENCH_RECOVERY_BYTES", recovery_bytes)?,
            recovery_record_bytes: env_u64("HERALD_BENCH_RECOVERY_RECORD_BYTES", 1024)?
                .try_into()?,
        };
        if settings.committers == 0 || settings.rounds == 0 {
            return Err(
                "HERALD_BENCH_COMMITTERS and HERALD_BENCH_ROUNDS must be at least 1".into(),
            );
        }
        Ok(settings)
    }

    /// `target`, in bench mode: a test-mode pass measures nothing worth judging.
    fn target(&self, target: Target) -> Option<Target> {
        self.bench.then_some(target)
    }

    /// Length of one round of a timed loop.
    fn slice(&self) -> Duration {
        self.run / self.rounds
    }

    fn selected(&self, name: &str) -> bool {
        self.filter.as_ref().is_none_or(|f| name.contains(f))
    }

    fn options(&self, durability: Durability, write_backend: WriteBackend) -> Options {
        Options {
            segment_bytes: self.segment_bytes,
            durability,
            write_backend,
            ..Options::default()
        }
    }
}

/// The write backends to compare: `pwrite` always, io_uring when built with the feature.
fn backends() -> Vec<(&'static str, WriteBackend)> {
    #[allow(unused_mut)] // pushed to only with the io-uring feature
    let mut backends = vec![("pwrite", WriteBackend::Pwrite)];
    #[cfg(feature = "io-uring")]
    backends.push(("io_uring", WriteBackend::IoUring));
    backends
}

/// A log in its own temporary directory. The log drops (and syncs, and stops its threads)
/// before the directory is removed.
struct BenchLog {
    wal: Wal,
    dir: TempDir,
}

impl BenchLog {
    /// Opens a fresh log and waits for its first spare segment, so timing starts in the steady
    /// state. `Ok(Err(why))` when an io_uring log cannot be opened here.
    fn open(root: &Path, prefix: &str, options: Options) -> BenchResult<Result<BenchLog, String>> {
        let dir = scratch::temp_dir(root, prefix)?;
        let wal = match Wal::open(dir.path(), options.clone()) {
            Ok(wal) => wal,
            Err(e) if options.write_backend == WriteBackend::IoUring => {
                return Ok(Err(format!("opening with io_uring failed: {e}")));
            }
            Err(e) => return Err(e.into()),
        };
        wait_for_spare(dir.path(), SPARE_TIMEOUT)?;
        Ok(Ok(BenchLog { wal, dir }))
    }

    fn close(self) -> BenchResult<()> {
        let BenchLog { wal, dir } = self;
        wal.close()?;
        dir.close()?;
        Ok(())
    }
}

/// Criterion micro-benchmarks: one durable commit, one non-durable append (separate figures,
/// never mixed).
fn micro(settings: &Settings, root: &Path, criterion: &mut Criterion) -> BenchResult<()> {
    let payload = payload(128);
    let mut group = criterion.benchmark_group("wal");
    group
        .sample_size(10)
        .warm_up_time(settings.micro_time.min(Duration::from_secs(1)))
        .measurement_time(settings.micro_time)
        .throughput(Throughput::Elements(1));
    for (backend_name, backend) in backends() {
        let name = format!("commit_sync_128B/{backend_name}");
        if !settings.selected(&format!("wal/{name}")) {
            continue;
        }
        let log = match BenchLog::open(root, "micro-", settings.options(Durability::Sync, backend))?
        {
            Ok(log) => log,
            Err(why) => {
                println!("wal/{name}: skipped ({why})");
                continue;
            }
        };
        let mut failure = None;
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    if let Err(e) = log.wal.commit(KIND, &payload) {
                        failure.get_or_insert(e);
                        break;
                    }
                }
                start.elapsed()
            })
        });
        log.close()?;
        if let Some(e) = failure {
            return Err(e.into());
        }
    }
    if settings.selected("wal/append_none_128B") {
        let options = settings.options(Durability::None, WriteBackend::Pwrite);
        let log = BenchLog::open(root, "micro-", options)?.map_err(|why| why.to_string())?;
        let mut failure = None;
        group.bench_function("append_none_128B", |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    if let Err(e) = log.wal.append(KIND, black_box(&payload)) {
                        failure.get_or_insert(e);
                        break;
                    }
                }
                start.elapsed()
            })
        });
        log.close()?;
        if let Some(e) = failure {
            return Err(e.into());
        }
    }
    group.finish();
    Ok(())
}

/// One committer with 128 B records against the 4 KiB `fdatasync` floor, then many committers
/// with 1 KiB records against the one committer, per backend. Floors and logs are measured in
/// interleaved rounds so a disk that drifts during the run drifts under all of them alike.
fn commits(settings: &Settings, root: &Path, report: &mut Report) -> BenchResult<()> {
    let one_name = "wal/commit_1x128B";
    let many_name = format!("wal/commit_{}x1KiB", settings.committers);
    let run_many = settings.selected(&many_name);
    if !settings.selected(one_name) && !run_many {
        return Ok(());
    }
    let slice = settings.slice();
    let dir = scratch::temp_dir(root, "floor-")?;
    let mut floor = floors::OverwriteSync::new(dir.path(), 4096, settings.segment_bytes)?;
    let mut floor_total = Measured::default();
    // The best many committers can do: every sync carries one record of each committer and
    // costs what a raw sync of that many bytes costs.
    let group_bytes = settings.committers * herald_wal::format::stored_bytes(1024) as usize;
    let mut group_floor = if run_many {
        let file_bytes = settings.segment_bytes.max(group_bytes as u64);
        Some(floors::OverwriteSync::new(
            dir.path(),
            group_bytes,
            file_bytes,
        )?)
    } else {
        None
    };
    let mut group_total = Measured::default();

    struct Contender {
        backend: &'static str,
        one: Result<BenchLog, String>,
        many: Option<Result<BenchLog, String>>,
        one_run: CommitRun,
        many_run: CommitRun,
    }
    let mut contenders = Vec::new();
    for (backend_name, backend) in backends() {
        let options = settings.options(Durability::Sync, backend);
        let one = BenchLog::open(root, "commit-", options.clone())?;
        let many = match (&one, run_many) {
            (Ok(_), true) => Some(BenchLog::open(root, "commit-", options)?),
            _ => None,
        };
        contenders.push(Contender {
            backend: backend_name,
            one,
            many,
            one_run: CommitRun::default(),
            many_run: CommitRun::default(),
        });
    }
    for _ in 0..settings.rounds {
        floor_total.add(floor.run(slice)?);
        if let Some(group_floor) = &mut group_floor {
            group_total.add(group_floor.run(slice)?);
        }
        for contender in &mut contenders {
            if let Ok(log) = &contender.one {
                contender.one_run.add(commit_loop(&log.wal, 1, 128, slice)?);
            }
            if let Some(Ok(log)) = &contender.many {
                contender
                    .many_run
                    .add(commit_loop(&log.wal, settings.committers, 1024, slice)?);
            }
        }
    }
    drop((floor, group_floor));
    dir.close()?;

    let floor = Figure::per_sec("fdatasync", floor_total.ops_per_sec());
    report.floor("floor/pwrite_4KiB+fdatasync_overwrite", &floor);
    let group_ceiling = run_many.then(|| {
        let group = Figure::per_sec("fdatasync", group_total.ops_per_sec());
        report.floor(
            &format!(
                "floor/pwrite_{}+fdatasync_overwrite",
                bytes(group_bytes as u64).replace(' ', "")
            ),
            &group,
        );
        Figure::per_sec("commit", group.value * settings.committers as f64)
    });
    for contender in contenders {
        let one_bench = format!("{one_name}/{}", contender.backend);
        let one_log = match contender.one {
            Ok(log) => log,
            Err(why) => {
                report.skipped(&one_bench, &why);
                continue;
            }
        };
        one_log.close()?;
        let one = Figure::per_sec("commit", contender.one_run.measured.ops_per_sec());
        report.compare(
            &one_bench,
            &one,
            Some(("fdatasync floor", &floor)),
            settings.target(Target::Ratio(0.85)),
        );
        println!("{one_bench}: {}", contender.one_run.cpu_summary());
        let many_bench = format!("{many_name}/{}", contender.backend);
        let many_log = match contender.many {
            None => continue,
            Some(Ok(log)) => log,
            Some(Err(why)) => {
                report.skipped(&many_bench, &why);
                continue;
            }
        };
        many_log.close()?;
        let many = Figure::per_sec("commit", contender.many_run.measured.ops_per_sec());
        report.compare(
            &many_bench,
            &many,
            Some(("one committer", &one)),
            settings.target(Target::Ratio(15.0)),
        );
        if let Some(ceiling) = &group_ceiling {
            report.compare(
                &format!("{many_bench} (vs full groups)"),
                &many,
                Some(("full-group ceiling", ceiling)),
                None,
            );
        }
        println!(
            "{many_bench}: {:.1} commits per 4 KiB floor fdatasync; {}",
            many.value / floor.value,
            contender.many_run.cpu_summary()
        );
    }
    Ok(())
}

/// What commit loops did, and the CPU time the process spent meanwhile (all threads, the log's
/// own included; `None` where it cannot be read).
#[derive(Default)]
struct CommitRun {
    measured: Measured,
    cpu: Option<Duration>,
}

impl CommitRun {
    /// Adds another loop over the same log.
    fn add(&mut self, other: CommitRun) {
        self.cpu = match (self.measured.ops, self.cpu, other.cpu) {
            (0, _, cpu) => cpu,
            (_, Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.measured.add(other.measured);
    }

    /// `cpu 31 µs per commit, 97% of 2 CPUs`: whether the loop waited on the disk or on the CPU.
    fn cpu_summary(&self) -> String {
        cpu_summary(self.cpu, self.measured.ops, self.measured.elapsed, "commit")
    }
}

/// `committers` threads commit `payload_bytes` records as fast as they can for `run`.
fn commit_loop(
    wal: &Wal,
    committers: usize,
    payload_bytes: usize,
    run: Duration,
) -> BenchResult<CommitRun> {
    let payload = payload(payload_bytes);
    // A few commits first, so the first page faults and wake-ups are not in the figure.
    for _ in 0..8 {
        wal.commit(KIND, &payload)?;
    }
    let stop = AtomicBool::new(false);
    let start_line = Barrier::new(committers + 1);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..committers)
            .map(|_| {
                scope.spawn(|| -> herald_wal::Result<u64> {
                    start_line.wait();
                    let mut done = 0;
                    while !stop.load(Ordering::Relaxed) {
                        wal.commit(KIND, &payload)?;
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        let cpu_before = process_cpu_time();
        std::thread::sleep(run);
        stop.store(true, Ordering::Relaxed);
        let mut measured = Measured::default();
        for thread in threads {
            let done = thread.join().map_err(|_| "a committer thread panicked")??;
            measured.ops += done;
            measured.bytes += done * payload_bytes as u64;
        }
        // Every counted commit returned before this: the last ones ran past `run` a little.
        measured.elapsed = start.elapsed();
        let cpu = process_cpu_time()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before));
        Ok(CommitRun { measured, cpu })
    })
}

/// One large record per `Sync` commit, against raw sequential write + `fdatasync` (appending to
/// a fresh file, and over a pre-zeroed one), in interleaved rounds.
fn bulk(settings: &Settings, root: &Path, report: &mut Report) -> BenchResult<()> {
    let record_bytes = settings.bulk_record_bytes;
    let chunk = bytes(record_bytes as u64).replace(' ', "");
    let slice = settings.slice();
    let dir = scratch::temp_dir(root, "floor-")?;
    let mut append = floors::AppendSync::new(dir.path(), record_bytes)?;
    let mut overwrite = floors::OverwriteSync::new(
        dir.path(),
        record_bytes,
        settings.segment_bytes.max(record_bytes as u64),
    )?;
    let options = settings.options(Durability::Sync, WriteBackend::Pwrite);
    let log = BenchLog::open(root, "bulk-", options)?.map_err(|why| why.to_string())?;
    let payload = payload(record_bytes);
    let mut append_total = Measured::default();
    let mut overwrite_total = Measured::default();
    let mut wal_total = Measured::default();
    for _ in 0..settings.rounds {
        append_total.add(append.run(slice)?);
        overwrite_total.add(overwrite.run(slice)?);
        wal_total.add(run_for(slice, || {
            log.wal.commit(KIND, &payload).map(|_| record_bytes as u64)
        })?);
    }
    log.close()?;
    drop((append, overwrite));
    dir.close()?;

    let append = Figure::bytes_per_sec("write", append_total.bytes_per_sec());
    report.floor(&format!("floor/write_{chunk}+fdatasync_append"), &append);
    let overwrite = Figure::bytes_per_sec("write", overwrite_total.bytes_per_sec());
    report.floor(
        &format!("floor/write_{chunk}+fdatasync_overwrite"),
        &overwrite,
    );
    let figure = Figure::bytes_per_sec("commit", wal_total.bytes_per_sec());
    let bench = format!("wal/bulk_{chunk}/pwrite");
    report.compare(
        &bench,
        &figure,
        Some(("append floor", &append)),
        settings.target(Target::Ratio(0.8)),
    );
    report.compare(
        &format!("{bench} (vs pre-zeroed)"),
        &figure,
        Some(("overwrite floor", &overwrite)),
        None,
    );
    println!(
        "{bench}: {} records of {chunk}, {:.2?} per commit",
        wal_total.ops,
        wal_total.per_op()
    );
    Ok(())
}

/// Builds a log of `recovery_bytes`, then times `Wal::recover` + iterating every record +
/// `finish` against `read()` of the same bytes. Both read from the page cache (the log was just
/// written): this measures the scan, not the disk.
fn recovery(settings: &Settings, root: &Path, report: &mut Report) -> BenchResult<()> {
    let dir = scratch::temp_dir(root, "recovery-")?;
    let options = settings.options(Durability::None, WriteBackend::Pwrite);
    let payload = payload(settings.recovery_record_bytes);
    let stored_bytes = herald_wal::format::stored_bytes(payload.len() as u64);
    let records = (settings.recovery_bytes / stored_bytes).max(1);

    let built = Instant::now();
    let wal = Wal::open(dir.path(), options.clone())?;
    for _ in 0..records {
        wal.append(KIND, &payload)?;
    }
    wal.sync()?;
    wait_for_spare(dir.path(), SPARE_TIMEOUT)?;
    let files: Vec<(PathBuf, u64)> = wal
        .segments()
        .iter()
        .map(|s| (dir.path().join(&s.name), s.written_bytes))
        .collect();
    wal.close()?;
    let log_bytes: u64 = files.iter().map(|(_, len)| len).sum();
    let size = bytes(log_bytes);
    println!(
        "wal/recovery: built a {size} log ({records} records of {}, {} segments) in {:.1?}",
        bytes(payload.len() as u64),
        files.len(),
        built.elapsed()
    );

    let read = repeat_for(settings.run, || {
        floors::read_files(&files, READ_BUFFER_BYTES, |piece| {
            black_box(piece);
        })
    })?;
    let read = Figure::bytes_per_sec("read", read.bytes_per_sec());
    report.floor(&format!("floor/read()_{size}"), &read);
    let read_crc = repeat_for(settings.run, || {
        let mut crc = crc32fast::Hasher::new();
        let measured = floors::read_files(&files, READ_BUFFER_BYTES, |piece| crc.update(piece))?;
        black_box(crc.finalize());
        Ok::<_, std::io::Error>(measured)
    })?;
    let read_crc = Figure::bytes_per_sec("read+crc32", read_crc.bytes_per_sec());
    report.floor(&format!("floor/read()+crc32_{size}"), &read_crc);

    let scan = repeat_for(settings.run, || -> BenchResult<Measured> {
        let start = Instant::now();
        let mut recovery = Wal::recover(dir.path(), options.clone())?;
        let mut seen = 0u64;
        for record in &mut recovery {
            black_box(&*record?.payload);
            seen += 1;
        }
        let wal = recovery.finish()?;
        let elapsed = start.elapsed();
        // Closing (stopping the log's threads) is not part of recovery.
        wal.close()?;
        if seen != records {
            return Err(
                format!("recovery returned {seen} records, the log holds {records}").into(),
            );
        }
        Ok(Measured {
            ops: 1,
            bytes: log_bytes,
            elapsed,
        })
    })?;
    dir.close()?;
    let figure = Figure::bytes_per_sec("scan", scan.bytes_per_sec());
    let bench = format!("wal/recovery_{size}");
    report.compare(
        &bench,
        &figure,
        Some(("read() floor", &read)),
        settings.target(Target::AtLeast(1e9)),
    );
    report.compare(
        &format!("{bench} (vs read+crc32)"),
        &figure,
        Some(("read()+crc32 floor", &read_crc)),
        None,
    );
    println!("{bench}: {} scans, {:.1?} each", scan.ops, scan.per_op());
    Ok(())
}

/// A payload of `len` non-zero bytes.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 | 1).collect()
}
