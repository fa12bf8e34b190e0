//! Benchmarks of the engine (`herald-engine`), each beside its floor measured in the same run.
//!
//! Driven by `cargo bench -p herald-benches --bench engine`; timed loops print each figure with
//! its floor and target as soon as it is measured, then a table of all of them:
//!
//! - `engine/send_1KiBx100/sync`: one producer sends 1 KiB messages, 100 per transaction,
//!   durable (`Sync`), against the log alone committing records of exactly the size of those
//!   transactions' commit records (about 100 KiB), one committer, `Sync` (target ≥ 0.7×);
//! - `engine/flow_P+C_256Bx100/*`: P producer threads send 256 B messages in transactions of
//!   100, C consumer threads RECEIVE up to 100 and commit, end to end, durable (`sync`, target
//!   ≥ 250k msg/s) and not (`none`, target ≥ 1M msg/s; separate figures, never mixed); against
//!   the same pipeline on the log alone: P threads commit records of the size of the send
//!   transactions' commit records, C threads each take 100 committed messages and commit a record
//!   of the size of a receive transaction's (same backlog bound on both);
//! - `engine/queued/heap`: heap bytes per queued message once `HERALD_BENCH_QUEUED_MESSAGES`
//!   (1M) 1 KiB messages wait in a queue, counted by this binary's global allocator (target
//!   ≤ 100 B); and the same after a reopen;
//! - `engine/queued/reopen`: `Broker::open` on the directory that left, after a checkpoint,
//!   against the log alone recovering it whole (`Wal::recover`, every record iterated,
//!   `finish`) (target ≤ 1 s). A reopen reads the checkpoint and, to check them, every queued
//!   body once: with a backlog that fills the log it reads the log much as the floor does.
//!
//! Loops and their floors run in interleaved rounds, so a disk whose speed drifts during the run
//! drifts under both sides of each ratio alike; each prints its slowest and fastest round. Each
//! engine loop also prints the CPU time per message, which tells a loop waiting on the disk from
//! one waiting on the CPU, and the CPU time other processes used meanwhile (also printed before
//! the run starts): on a machine shared with others, a CPU-bound figure is partly theirs.
//!
//! The heap is counted by `cap`'s allocator, which wraps the system allocator with one atomic
//! add per allocation and per free; it counts the bytes asked for (not the allocator's own
//! overhead). Every figure of this binary, the throughput ones included, runs under it.
//!
//! Under `cargo test --benches` (no `--bench` argument) everything runs once, on tiny sizes, as
//! a smoke test. Sizes and times are set by environment variables, see [`Settings::from_env`];
//! a filter argument (`cargo bench -p herald-benches --bench engine -- flow`) selects benchmarks
//! by name.

use std::alloc::System;
use std::hint::black_box;
use std::path::Path;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cap::Cap;
use herald_benches::floors::pattern;
use herald_benches::measure::{CpuSnapshot, CpuUse, Measured, bytes, cpu_summary, run_for, si};
use herald_benches::report::{Figure, Report, Target};
use herald_benches::scratch::{self, bench_root, filesystem_type, wait_for_spare};
use herald_benches::settings::{Invocation, env_f64, env_u64};
use herald_engine::record::{self, Op};
use herald_engine::{
    Broker, ConversationHandle, DialogOptions, Durability, QueueOptions, Receive, SentBy,
    Validation,
};
use herald_wal::Wal;
use tempfile::TempDir;

/// Counts the live heap bytes of this binary, for `engine/queued/heap`.
#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Messages per transaction, on both sides.
const MESSAGES_PER_TX: usize = 100;
/// Body size of the durable-send and queued benchmarks.
const SEND_BODY_BYTES: usize = 1024;
/// Body size of the producer/consumer benchmarks.
const FLOW_BODY_BYTES: usize = 256;
/// Producer and consumer threads (as many of each) of the producer/consumer benchmarks.
const FLOW_THREADS: [usize; 2] = [1, 2];
/// Producers pause while this many committed messages wait unreceived: the figure is a steady
/// state, not a backlog growing for as long as the loop runs.
const BACKLOG_MESSAGES_MAX: u64 = 20_000;
/// Conversations (each its own group) the queued messages are spread over.
const QUEUED_DIALOGS: usize = 100;
/// How long to wait for a log's first spare segment before a timed loop.
const SPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// Record kind of the floors' raw log records (0 is reserved).
const FLOOR_KIND: u8 = 1;
/// Where a broker keeps its log inside its data directory (`engine/DESIGN.md`).
const WAL_SUBDIR: &str = "wal";

const MESSAGE_TYPE: &str = "//bench/Message";
const CONTRACT: &str = "//bench/Contract";
const TARGET_QUEUE: &str = "TargetQueue";
const INITIATOR_QUEUE: &str = "InitiatorQueue";
const TARGET_SERVICE: &str = "//bench/Target";
const INITIATOR_SERVICE: &str = "//bench/Initiator";

fn main() {
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("bench settings: {e}");
            std::process::exit(2);
        }
    };
    if settings.invocation.list {
        for name in SUITE {
            println!("{name}: benchmark");
        }
        return;
    }
    if let Err(e) = run(&settings) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

/// Names of the suite (the filter argument selects among them by substring).
const SUITE: [&str; 7] = [
    "engine/send_1KiBx100/sync",
    "engine/flow_1+1_256Bx100/sync",
    "engine/flow_2+2_256Bx100/sync",
    "engine/flow_1+1_256Bx100/none",
    "engine/flow_2+2_256Bx100/none",
    "engine/queued/heap",
    "engine/queued/reopen",
];

fn run(settings: &Settings) -> BenchResult<()> {
    let root = bench_root()?;
    // What else runs on this machine matters as much as the disk: every CPU-bound figure here
    // shares two CPUs with it.
    let idle = CpuSnapshot::now();
    std::thread::sleep(idle_time(settings));
    let background = idle.elapsed().others_summary(idle_time(settings));
    println!(
        "herald-benches engine: {} mode, writing in {} ({}), {} CPUs; each timed loop runs {:?} \
         in {} interleaved rounds; segments {}; {} queued messages; before starting, {background}",
        if settings.invocation.bench {
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
        settings.queued_messages,
    );
    let mut report = Report::new();
    if settings.selected("engine/send_1KiBx100/sync") {
        send(settings, &root, &mut report)?;
    }
    for durability in [Durability::Sync, Durability::None] {
        for threads in FLOW_THREADS {
            flow(settings, &root, &mut report, threads, durability)?;
        }
    }
    if settings.selected("engine/queued/heap") || settings.selected("engine/queued/reopen") {
        queued(settings, &root, &mut report)?;
    }
    report.print_table();
    if !settings.invocation.bench {
        println!("(test mode: one tiny pass of each, not judged against targets)");
    }
    Ok(())
}

/// What to run, how long and how big: from the command line (mode, filter) and the environment.
#[derive(Debug)]
struct Settings {
    invocation: Invocation,
    /// Length of each timed loop.
    run: Duration,
    /// Each timed loop is cut into this many slices, interleaved with its floor's.
    rounds: u32,
    segment_bytes: u64,
    queued_messages: u64,
}

impl Settings {
    /// Reads the mode and filter from the arguments (as criterion does) and sizes from:
    ///
    /// | variable | default | |
    /// |---|---|---|
    /// | `HERALD_BENCH_SECS` | 3 | length of each timed loop (floors included) |
    /// | `HERALD_BENCH_ROUNDS` | 6 | slices each loop is cut into, interleaved with its floor; also the number of reopens |
    /// | `HERALD_BENCH_SEGMENT_BYTES` | 64 MiB | log segment size (the log's default) |
    /// | `HERALD_BENCH_QUEUED_MESSAGES` | 1000000 | 1 KiB messages queued for the heap and reopen benchmarks |
    /// | `HERALD_BENCH_DIR` | `target/bench-tmp` | where files go (must be a real disk) |
    ///
    /// Without `--bench` (test mode) the defaults shrink to a smoke test of well under a second
    /// per benchmark; the variables still apply.
    fn from_env() -> BenchResult<Settings> {
        let invocation = Invocation::from_args();
        let (secs, segment_bytes, queued_messages) = if invocation.bench {
            (3.0, 64 << 20, 1_000_000)
        } else {
            (0.02, 4 << 20, 2_000)
        };
        let settings = Settings {
            run: Duration::from_secs_f64(env_f64("HERALD_BENCH_SECS", secs)?),
            rounds: env_u64("HERALD_BENCH_ROUNDS", if invocation.bench { 6 } else { 1 })?
                .try_into()?,
            segment_bytes: env_u64("HERALD_BENCH_SEGMENT_BYTES", segment_bytes)?,
            queued_messages: env_u64("HERALD_BENCH_QUEUED_MESSAGES", queued_messages)?,
            invocation,
        };
        if settings.rounds == 0 || settings.queued_messages == 0 {
            return Err(
                "HERALD_BENCH_ROUNDS and HERALD_BENCH_QUEUED_MESSAGES must be at least 1".into(),
            );
        }
        Ok(settings)
    }

    /// `target`, in bench mode: a test-mode pass measures nothing worth judging.
    fn target(&self, target: Target) -> Option<Target> {
        self.invocation.bench.then_some(target)
    }

    /// Length of one round of a timed loop.
    fn slice(&self) -> Duration {
        self.run / self.rounds
    }

    fn selected(&self, name: &str) -> bool {
        self.invocation.selected(name)
    }

    fn engine_options(&self, durability: Durability) -> herald_engine::Options {
        herald_engine::Options {
            durability,
            segment_bytes: self.segment_bytes,
            ..herald_engine::Options::default()
        }
    }

    /// The options the broker opens its log with (`Broker::open` sets these two and leaves the
    /// rest at their defaults), so a floor's log is the broker's log without the engine.
    fn wal_options(&self, durability: Durability) -> herald_wal::Options {
        herald_wal::Options {
            durability,
            segment_bytes: self.segment_bytes,
            ..herald_wal::Options::default()
        }
    }
}

/// A broker in its own temporary directory, with the benchmark's services defined. The broker
/// drops (and its log syncs and stops its threads) before the directory is removed.
struct BenchBroker {
    broker: Broker,
    dir: TempDir,
}

impl BenchBroker {
    /// Opens a fresh broker, defines the services and waits for the log's first spare segment,
    /// so timing starts in the steady state.
    fn open(
        root: &Path,
        prefix: &str,
        options: herald_engine::Options,
    ) -> BenchResult<BenchBroker> {
        let dir = scratch::temp_dir(root, prefix)?;
        let broker = Broker::open(dir.path(), options)?;
        define_services(&broker)?;
        wait_for_spare(&dir.path().join(WAL_SUBDIR), SPARE_TIMEOUT)?;
        Ok(BenchBroker { broker, dir })
    }

    fn close(self) -> BenchResult<()> {
        let BenchBroker { broker, dir } = self;
        drop(broker);
        dir.close()?;
        Ok(())
    }
}

/// A bare log in its own temporary directory: the floors.
struct BenchLog {
    wal: Wal,
    dir: TempDir,
}

impl BenchLog {
    fn open(root: &Path, prefix: &str, options: herald_wal::Options) -> BenchResult<BenchLog> {
        let dir = scratch::temp_dir(root, prefix)?;
        let wal = Wal::open(dir.path(), options)?;
        wait_for_spare(dir.path(), SPARE_TIMEOUT)?;
        Ok(BenchLog { wal, dir })
    }

    fn close(self) -> BenchResult<()> {
        let BenchLog { wal, dir } = self;
        wal.close()?;
        dir.close()?;
        Ok(())
    }
}

/// One message type, a contract for it (initiator to target), a target service that accepts the
/// contract and an initiator service, each on its own queue.
fn define_services(broker: &Broker) -> herald_engine::Result<()> {
    let mut tx = broker.begin();
    tx.create_message_type(MESSAGE_TYPE, Validation::None)?;
    tx.create_contract(CONTRACT, &[(MESSAGE_TYPE, SentBy::Initiator)])?;
    tx.create_queue(TARGET_QUEUE, QueueOptions::default())?;
    tx.create_queue(INITIATOR_QUEUE, QueueOptions::default())?;
    tx.create_service(TARGET_SERVICE, TARGET_QUEUE, &[CONTRACT])?;
    tx.create_service(INITIATOR_SERVICE, INITIATOR_QUEUE, &[])?;
    tx.commit()
}

/// Begins `count` dialogs from the initiator to the target service (each in its own conversation
/// group), in one transaction; returns the initiator handles.
fn begin_dialogs(broker: &Broker, count: usize) -> herald_engine::Result<Vec<ConversationHandle>> {
    let mut tx = broker.begin();
    let handles = (0..count)
        .map(|_| {
            tx.begin_dialog(
                INITIATOR_SERVICE,
                TARGET_SERVICE,
                CONTRACT,
                DialogOptions::default(),
            )
        })
        .collect::<herald_engine::Result<Vec<_>>>()?;
    tx.commit()?;
    Ok(handles)
}

/// One transaction sending `count` messages of `body` on `handle`.
fn send_batch(
    broker: &Broker,
    handle: ConversationHandle,
    body: &[u8],
    count: usize,
) -> herald_engine::Result<()> {
    let mut tx = broker.begin();
    for _ in 0..count {
        tx.send(handle, MESSAGE_TYPE, body)?;
    }
    tx.commit()
}

/// Payload size of the commit record of a transaction that sends `count` messages of
/// `body_bytes` on one conversation: what the engine hands the log for it.
fn send_record_bytes(handle: ConversationHandle, count: usize, body_bytes: usize) -> usize {
    let ops: Vec<Op> = (0..count as u64)
        .map(|sequence| Op::Send {
            handle,
            message_type: MESSAGE_TYPE.into(),
            sequence,
            body: vec![0; body_bytes],
            body_range: 0..0,
        })
        .collect();
    record::encode(&ops).len()
}

/// Payload size of the commit record of a transaction that received a batch of one
/// conversation.
fn receive_record_bytes(handle: ConversationHandle) -> usize {
    record::encode(&[Op::Receive {
        handle,
        through_sequence: 0,
    }])
    .len()
}

/// One producer, durable sends of 1 KiB in transactions of 100, against the log alone
/// committing records of the same size, in interleaved rounds.
fn send(settings: &Settings, root: &Path, report: &mut Report) -> BenchResult<()> {
    let bench = "engine/send_1KiBx100/sync";
    let engine = BenchBroker::open(root, "send-", settings.engine_options(Durability::Sync))?;
    let handle = begin_dialogs(&engine.broker, 1)?[0];
    let body = pattern(SEND_BODY_BYTES);
    let record_bytes = send_record_bytes(handle, MESSAGES_PER_TX, SEND_BODY_BYTES);
    let log = BenchLog::open(root, "send-floor-", settings.wal_options(Durability::Sync))?;
    let record = pattern(record_bytes);
    let tx_bytes = (MESSAGES_PER_TX * SEND_BODY_BYTES) as u64;

    let slice = settings.slice();
    let mut floor_rounds = Rounds::default();
    let mut engine_rounds = Rounds::default();
    for _ in 0..settings.rounds {
        let cpu = CpuSnapshot::now();
        let measured = run_for(slice, || {
            log.wal
                .commit(FLOOR_KIND, &record)
                .map(|_| record_bytes as u64)
        })?;
        floor_rounds.add(measured, cpu.elapsed());
        let cpu = CpuSnapshot::now();
        let measured = run_for(slice, || {
            send_batch(&engine.broker, handle, &body, MESSAGES_PER_TX).map(|()| tx_bytes)
        })?;
        engine_rounds.add(measured, cpu.elapsed());
    }
    log.close()?;
    engine.close()?;

    // Both sides count transactions (one record each): ×100 makes them messages.
    let messages = MESSAGES_PER_TX as f64;
    let floor = Figure::per_sec("msg", floor_rounds.total.ops_per_sec() * messages);
    let floor_name = format!(
        "floor/wal_commit_{}/sync",
        bytes(record_bytes as u64).replace(' ', "")
    );
    report.floor(&floor_name, &floor);
    println!(
        "{floor_name}: {} commits/s of {record_bytes} B records (one per {MESSAGES_PER_TX} \
         messages), {:.2?} per commit; rounds {} msg/s; {}",
        si(floor_rounds.total.ops_per_sec()),
        floor_rounds.total.per_op(),
        floor_rounds.spread(messages),
        floor_rounds.cpu.others_summary(floor_rounds.total.elapsed),
    );
    let figure = Figure::per_sec("msg", engine_rounds.total.ops_per_sec() * messages);
    report.compare(
        bench,
        &figure,
        Some(("bulk-sync floor", &floor)),
        settings.target(Target::Ratio(0.7)),
    );
    println!(
        "{bench}: {} transactions/s, {:.2?} per transaction; rounds {} msg/s; {}; {}",
        si(engine_rounds.total.ops_per_sec()),
        engine_rounds.total.per_op(),
        engine_rounds.spread(messages),
        cpu_summary(
            engine_rounds.cpu.process,
            engine_rounds.total.ops * MESSAGES_PER_TX as u64,
            engine_rounds.total.elapsed,
            "message"
        ),
        engine_rounds
            .cpu
            .others_summary(engine_rounds.total.elapsed),
    );
    Ok(())
}

/// The rounds of one timed loop: their sum, each round's rate, and the CPU they used.
#[derive(Debug)]
struct Rounds {
    total: Measured,
    rates: Vec<f64>,
    cpu: CpuUse,
}

impl Default for Rounds {
    fn default() -> Rounds {
        Rounds {
            total: Measured::default(),
            rates: Vec::new(),
            cpu: CpuUse::ZERO,
        }
    }
}

impl Rounds {
    fn add(&mut self, round: Measured, cpu: CpuUse) {
        self.rates.push(round.ops_per_sec());
        self.total.add(round);
        self.cpu.add(cpu);
    }

    /// `812k–1.20M`: the slowest and fastest round, in ops/s times `scale`. On a disk or a
    /// machine shared with others, rounds differ; a wide spread says the figure is weather.
    fn spread(&self, scale: f64) -> String {
        spread(&self.rates, scale)
    }
}

/// `812k–1.20M`: the lowest and highest of `rates` times `scale`.
fn spread(rates: &[f64], scale: f64) -> String {
    let low = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let high = rates.iter().copied().fold(0.0, f64::max);
    format!("{}–{}", si(low * scale), si(high * scale))
}

/// `threads` producers and as many consumers, end to end, against the log alone carrying the
/// same commits with the same dependencies, in interleaved rounds.
fn flow(
    settings: &Settings,
    root: &Path,
    report: &mut Report,
    threads: usize,
    durability: Durability,
) -> BenchResult<()> {
    let durability_name = match durability {
        Durability::Sync => "sync",
        Durability::None => "none",
        Durability::Batched { .. } => "batched",
    };
    let bench = format!("engine/flow_{threads}+{threads}_256Bx100/{durability_name}");
    if !settings.selected(&bench) {
        return Ok(());
    }
    let engine = BenchBroker::open(root, "flow-", settings.engine_options(durability))?;
    // One conversation (so one group) per producer: consumers can work on as many groups at once.
    let handles = begin_dialogs(&engine.broker, threads)?;
    let body = pattern(FLOW_BODY_BYTES);
    let send_bytes = send_record_bytes(handles[0], MESSAGES_PER_TX, FLOW_BODY_BYTES);
    let receive_bytes = receive_record_bytes(handles[0]);
    let log = BenchLog::open(root, "flow-floor-", settings.wal_options(durability))?;

    let slice = settings.slice();
    let mut floor_total = FlowRun::default();
    let mut engine_total = FlowRun::default();
    let (mut floor_rates, mut engine_rates) = (Vec::new(), Vec::new());
    for _ in 0..settings.rounds {
        let floor = log_flow_loop(&log.wal, threads, send_bytes, receive_bytes, slice)?;
        floor_rates.push(floor.received_per_sec());
        floor_total.add(floor);
        let engine = flow_loop(&engine.broker, &handles, threads, &body, slice)?;
        engine_rates.push(engine.received_per_sec());
        engine_total.add(engine);
    }
    log.close()?;
    engine.close()?;
    if engine_total.received == 0 || floor_total.received == 0 {
        return Err(format!("{bench}: the consumers received nothing").into());
    }

    let floor = Figure::per_sec("msg", floor_total.received_per_sec());
    let floor_name = format!("floor/wal_commit_{threads}+{threads}_flow/{durability_name}");
    report.floor(&floor_name, &floor);
    println!(
        "{floor_name}: {threads}× {send_bytes} B records, {threads}× {receive_bytes} B records \
         (one each per {MESSAGES_PER_TX} messages); rounds {} msg/s; {}",
        spread(&floor_rates, 1.0),
        floor_total.cpu.others_summary(floor_total.elapsed),
    );
    let figure = Figure::per_sec("msg", engine_total.received_per_sec());
    let target = match durability {
        Durability::None => Target::AtLeast(1e6),
        _ => Target::AtLeast(250e3),
    };
    report.compare(
        &bench,
        &figure,
        Some(("log floor", &floor)),
        settings.target(target),
    );
    println!(
        "{bench}: sent {}/s, received {}/s; rounds {} msg/s; {}; {}",
        si(engine_total.sent_per_sec()),
        si(engine_total.received_per_sec()),
        spread(&engine_rates, 1.0),
        cpu_summary(
            engine_total.cpu.process,
            engine_total.received,
            engine_total.elapsed,
            "message received"
        ),
        engine_total.cpu.others_summary(engine_total.elapsed),
    );
    Ok(())
}

/// What a producer/consumer loop did: messages whose send committed, messages whose receive
/// committed, in how long, and the CPU used meanwhile.
#[derive(Debug)]
struct FlowRun {
    sent: u64,
    received: u64,
    elapsed: Duration,
    cpu: CpuUse,
}

impl Default for FlowRun {
    fn default() -> FlowRun {
        FlowRun {
            sent: 0,
            received: 0,
            elapsed: Duration::ZERO,
            cpu: CpuUse::ZERO,
        }
    }
}

impl FlowRun {
    /// Adds another loop over the same broker or log.
    fn add(&mut self, other: FlowRun) {
        self.sent += other.sent;
        self.received += other.received;
        self.elapsed += other.elapsed;
        self.cpu.add(other.cpu);
    }

    fn sent_per_sec(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn received_per_sec(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The counters and the start line that producers and consumers share, engine or floor.
struct Pipeline {
    stop: AtomicBool,
    /// Messages whose send committed.
    sent: AtomicU64,
    /// Messages a consumer has taken (floor) or whose receive committed (engine).
    taken: AtomicU64,
    /// Messages whose receive committed.
    received: AtomicU64,
    start_line: Barrier,
}

impl Pipeline {
    fn new(threads: usize) -> Pipeline {
        Pipeline {
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            received: AtomicU64::new(0),
            start_line: Barrier::new(threads + 1),
        }
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// Whether producers should wait: `BACKLOG_MESSAGES_MAX` sent and not yet received.
    fn backlog_full(&self) -> bool {
        let sent = self.sent.load(Ordering::Relaxed);
        sent.saturating_sub(self.received.load(Ordering::Relaxed)) >= BACKLOG_MESSAGES_MAX
    }

    /// Run by the thread that started the others: lets them go, waits `run`, stops them and
    /// returns what was committed within `run`.
    fn time(&self, run: Duration) -> FlowRun {
        self.start_line.wait();
        let start = Instant::now();
        let cpu = CpuSnapshot::now();
        std::thread::sleep(run);
        // Every commit counted here returned within the window.
        let measured = FlowRun {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            elapsed: start.elapsed(),
            cpu: cpu.elapsed(),
        };
        self.stop.store(true, Ordering::Relaxed);
        measured
    }
}

/// `handles.len()` producers (one per handle) each commit transactions of 100 sends of `body`;
/// `consumers` threads each RECEIVE up to 100 messages and commit; for `run`. Counts what was
/// committed within `run`.
fn flow_loop(
    broker: &Broker,
    handles: &[ConversationHandle],
    consumers: usize,
    body: &[u8],
    run: Duration,
) -> BenchResult<FlowRun> {
    let pipeline = Pipeline::new(handles.len() + consumers);
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for &handle in handles {
            let pipeline = &pipeline;
            threads.push(scope.spawn(move || -> herald_engine::Result<()> {
                pipeline.start_line.wait();
                while pipeline.running() {
                    if pipeline.backlog_full() {
                        std::thread::yield_now();
                        continue;
                    }
                    send_batch(broker, handle, body, MESSAGES_PER_TX)?;
                    pipeline
                        .sent
                        .fetch_add(MESSAGES_PER_TX as u64, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        for _ in 0..consumers {
            threads.push(scope.spawn(|| -> herald_engine::Result<()> {
                pipeline.start_line.wait();
                while pipeline.running() {
                    let mut tx = broker.begin();
                    let batch = tx.receive(TARGET_QUEUE, Receive::top(MESSAGES_PER_TX))?;
                    if batch.is_empty() {
                        tx.rollback();
                        std::thread::yield_now();
                        continue;
                    }
                    for message in &batch {
                        black_box(message.body());
                    }
                    tx.commit()?;
                    pipeline
                        .received
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        let measured = pipeline.time(run);
        for thread in threads {
            thread
                .join()
                .map_err(|_| "a producer or consumer thread panicked")??;
        }
        Ok(measured)
    })
}

/// The floor of `flow_loop`: the same pipeline with the log alone. `threads` producers commit
/// records of `send_bytes` (each counts for 100 messages, with the same backlog bound);
/// `threads` consumers each take 100 committed messages, when there are, and commit a record of
/// `receive_bytes`.
fn log_flow_loop(
    wal: &Wal,
    threads: usize,
    send_bytes: usize,
    receive_bytes: usize,
    run: Duration,
) -> BenchResult<FlowRun> {
    let send_record = pattern(send_bytes);
    let receive_record = pattern(receive_bytes);
    let batch = MESSAGES_PER_TX as u64;
    let pipeline = Pipeline::new(2 * threads);
    std::thread::scope(|scope| {
        let mut committers = Vec::new();
        for _ in 0..threads {
            let (pipeline, send_record) = (&pipeline, &send_record);
            committers.push(scope.spawn(move || -> herald_wal::Result<()> {
                pipeline.start_line.wait();
                while pipeline.running() {
                    if pipeline.backlog_full() {
                        std::thread::yield_now();
                        continue;
                    }
                    wal.commit(FLOOR_KIND, send_record)?;
                    pipeline.sent.fetch_add(batch, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        for _ in 0..threads {
            let (pipeline, receive_record) = (&pipeline, &receive_record);
            committers.push(scope.spawn(move || -> herald_wal::Result<()> {
                pipeline.start_line.wait();
                while pipeline.running() {
                    let taken = pipeline.taken.load(Ordering::Relaxed);
                    let ready = pipeline.sent.load(Ordering::Relaxed) >= taken + batch;
                    let took = ready
                        && pipeline
                            .taken
                            .compare_exchange(
                                taken,
                                taken + batch,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            )
                            .is_ok();
                    if !took {
                        std::thread::yield_now();
                        continue;
                    }
                    wal.commit(FLOOR_KIND, receive_record)?;
                    pipeline.received.fetch_add(batch, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        let measured = pipeline.time(run);
        for committer in committers {
            committer
                .join()
                .map_err(|_| "a committer thread panicked")??;
        }
        Ok(measured)
    })
}

/// Queues `queued_messages` 1 KiB messages (over `QUEUED_DIALOGS` conversations, transactions of
/// 100, not durable: durability changes nothing in the heap) and counts the heap they take; then
/// reopens the directory, timed, against the log alone recovering it, in interleaved rounds.
fn queued(settings: &Settings, root: &Path, report: &mut Report) -> BenchResult<()> {
    let count = settings.queued_messages;
    let options = settings.engine_options(Durability::None);
    let engine = BenchBroker::open(root, "queued-", options.clone())?;
    let handles = begin_dialogs(&engine.broker, QUEUED_DIALOGS)?;
    let body = pattern(SEND_BODY_BYTES);

    let heap_before = ALLOCATOR.allocated();
    let built = Instant::now();
    let mut left = count;
    for handle in handles.iter().cycle() {
        if left == 0 {
            break;
        }
        let batch = left.min(MESSAGES_PER_TX as u64);
        send_batch(&engine.broker, *handle, &body, batch as usize)?;
        left -= batch;
    }
    let build_time = built.elapsed();
    // Checkpoint first: it waits for a background checkpoint that may be running, whose
    // transient encoding buffer would otherwise be counted as if queued messages held it.
    let checkpoint = engine.broker.checkpoint()?;
    let heap = ALLOCATOR.allocated().saturating_sub(heap_before);
    let BenchBroker { broker, dir } = engine;
    drop(broker);
    println!(
        "engine/queued: queued {count} messages of {} on {QUEUED_DIALOGS} conversations in \
         {build_time:.1?} ({}/s, not durable); heap grew by {}; checkpoint of {} at LSN {}",
        bytes(SEND_BODY_BYTES as u64),
        si(count as f64 / build_time.as_secs_f64().max(1e-9)),
        bytes(heap as u64),
        bytes(checkpoint.bytes),
        checkpoint.lsn,
    );
    let body_figure = Figure::bytes("body", SEND_BODY_BYTES as f64);
    let per_message = Figure::bytes("heap per message", heap as f64 / count as f64);
    if settings.selected("engine/queued/heap") {
        report.compare(
            "engine/queued/heap",
            &per_message,
            Some(("body", &body_figure)),
            settings.target(Target::AtMost(100.0)),
        );
    }
    if !settings.selected("engine/queued/reopen") {
        dir.close()?;
        return Ok(());
    }

    let wal_dir = dir.path().join(WAL_SUBDIR);
    let wal_options = settings.wal_options(Durability::None);
    let mut recover_total = Measured::default();
    let mut reopen_total = Measured::default();
    let mut reopened_heap = 0;
    let mut log_bytes = 0;
    for round in 0..settings.rounds {
        let (measured, scanned_bytes) = recover_log(&wal_dir, wal_options.clone())?;
        recover_total.add(measured);
        log_bytes = scanned_bytes;

        let heap_before = ALLOCATOR.allocated();
        let start = Instant::now();
        let broker = Broker::open(dir.path(), options.clone())?;
        reopen_total.add(Measured {
            ops: 1,
            bytes: log_bytes,
            elapsed: start.elapsed(),
        });
        reopened_heap = ALLOCATOR.allocated().saturating_sub(heap_before);
        if round + 1 == settings.rounds {
            // A reopen that lost messages would be fast for the wrong reason.
            let found = count_queued(&broker)?;
            if found != count {
                return Err(
                    format!("reopen found {found} queued messages, {count} were sent").into(),
                );
            }
        }
        drop(broker);
    }
    dir.close()?;

    let size = bytes(log_bytes);
    let floor = Figure::seconds("recover", mean_secs(&recover_total));
    report.floor(
        &format!("floor/wal_recover_{}", size.replace(' ', "")),
        &floor,
    );
    let figure = Figure::seconds("reopen", mean_secs(&reopen_total));
    let bench = "engine/queued/reopen";
    report.compare(
        bench,
        &figure,
        Some(("WAL recovery floor", &floor)),
        settings.target(Target::AtMost(1.0)),
    );
    println!(
        "{bench}: {count} queued messages, a {size} log, after a checkpoint; {} reopens",
        reopen_total.ops
    );
    if settings.selected("engine/queued/heap") {
        report.compare(
            "engine/queued/heap (after reopen)",
            &Figure::bytes("heap per message", reopened_heap as f64 / count as f64),
            Some(("body", &body_figure)),
            None,
        );
    }
    Ok(())
}

/// `Wal::recover` over `dir`, every record iterated, then `finish`, timed; closing the log is
/// not part of it. Returns the time and the bytes of records scanned.
fn recover_log(dir: &Path, options: herald_wal::Options) -> BenchResult<(Measured, u64)> {
    let start = Instant::now();
    let mut recovery = Wal::recover(dir, options)?;
    let mut records = 0u64;
    for record in &mut recovery {
        black_box(&*record?.payload);
        records += 1;
    }
    let wal = recovery.finish()?;
    let elapsed = start.elapsed();
    let scanned: u64 = wal.segments().iter().map(|s| s.written_bytes).sum();
    wal.close()?;
    if records == 0 {
        return Err(format!("no records to recover in {}", dir.display()).into());
    }
    Ok((
        Measured {
            ops: 1,
            bytes: scanned,
            elapsed,
        },
        scanned,
    ))
}

/// Messages waiting in the target queue: received in one transaction, which then rolls back.
fn count_queued(broker: &Broker) -> herald_engine::Result<u64> {
    let mut tx = broker.begin();
    let mut found = 0;
    loop {
        let batch = tx.receive(TARGET_QUEUE, Receive::top(usize::MAX))?;
        if batch.is_empty() {
            break;
        }
        found += batch.len() as u64;
    }
    tx.rollback();
    Ok(found)
}

/// How long `run` sleeps before starting, to see what else uses the machine.
fn idle_time(settings: &Settings) -> Duration {
    if settings.invocation.bench {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(20)
    }
}

fn mean_secs(measured: &Measured) -> f64 {
    measured.elapsed.as_secs_f64() / measured.ops.max(1) as f64
}
