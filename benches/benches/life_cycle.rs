//! Benchmarks of the dialog life cycle's waiting parts (WAITFOR, activation), each beside its
//! floor measured in the same run.
//!
//! Driven by `cargo bench -p herald-benches --bench life_cycle`; each figure is printed with its
//! floor and target as soon as it is measured, then a table of all of them:
//!
//! - `life_cycle/waitfor_wake/none`: the latency from a committed send to the return of the
//!   WAITFOR receive it wakes. One thread waits in `receive(Receive::top(1).wait(..))` on the
//!   target queue; the other sends one message on a dialog and commits (durability `None`).
//!   **t0** is read immediately *before* the sender calls `commit()` (the commit signals
//!   waiters from inside, so the receiver may return before `commit()` does: t0 after it
//!   would make some latencies negative); **t1** is read immediately after the receiver's
//!   `receive` returns with the message. The latency thus covers appending and applying the
//!   commit record, signalling the queue, waking the receiver and its second RECEIVE attempt.
//!   Floor, measured the same way: the same two threads hand a token through a
//!   `parking_lot::Mutex` + `Condvar` (t0 before the waker takes the mutex to set the token
//!   and notify; t1 when the waiter's `wait` returns), the raw cost of waking a sleeping thread
//!   on this machine. `HERALD_BENCH_WAKE_SAMPLES` (100k) round trips each, into a sorted
//!   `Vec` of nanoseconds: p50 and p99 are tabled (p99.9 and max printed), target p99 ≤ 50 µs.
//!   The receiver must really be asleep when t0 is read: it publishes the round it is about to
//!   wait for just before calling `receive` (or `wait`), and the sender then polls the
//!   receiver thread's state in `/proc/self/task/<tid>/stat` until it reads `S` (sleeping),
//!   which, with nothing else running in the broker, is the wait on the queue's condition
//!   variable. Rounds where it was not seen asleep within 50 ms are counted and printed (where
//!   `/proc` is missing, the sender sleeps 200 µs instead).
//! - `life_cycle/ping_pong/sync`: round trips per second on one dialog, durable on both sides
//!   (`Sync`): the initiator sends; the target receives it (WAITFOR) and replies in the same
//!   transaction; the initiator receives the reply (WAITFOR) and sends the next one in the same
//!   transaction. Each round trip has exactly two durable commits on its critical path, one
//!   after the other (group commit cannot merge them), so the floor is half the rate of a
//!   4 KiB `pwrite` + `fdatasync` loop over a pre-written file (`floors::OverwriteSync`, the
//!   small-commit floor of the WAL benchmarks): the ratio is against fdatasync/s ÷ 2 (target
//!   ≥ 0.7×, as for the durable send of `engine.rs`; the issue sets none).
//! - `life_cycle/activation_R/*` (R = 1, 2, 4 readers): N 256 B messages preloaded (untimed)
//!   over `DRAIN_DIALOGS` dialogs (one group each, so readers can work in parallel), then
//!   `Broker::activate` with `max_readers` = R, batches of 100 and a handler that reads every
//!   byte of every body; timed from `activate` until every message is handled and committed
//!   (the queue's depth, which counts messages taken by open transactions, is 0), then
//!   deactivated (untimed). Against the same drain of the same preload by R plain threads each
//!   looping `receive(top(100))` + commit, no activation machinery. Both drains are timed by
//!   the same loop on the calling thread, which looks every 200 µs: in trials on this project's
//!   (virtual, 2-CPU) machine, a plain drain whose calling thread merely joined its readers
//!   committed durable batches 2–3× slower than the activated one being polled (a CPU waking
//!   every 200 µs seems to make `fdatasync` completions cheaper to wake up to), so the polling
//!   must be on both sides or neither. Durability `None`
//!   (N = `HERALD_BENCH_DRAIN_MESSAGES`, 200k) and `Sync` (N =
//!   `HERALD_BENCH_DRAIN_SYNC_MESSAGES`, 50k) are separate figures. Target ≥ 0.8× (set here:
//!   the issue sets none). Each round drains once each way, the order alternating by round.
//!
//! Loops and their floors run in interleaved rounds, so a machine whose speed drifts during
//! the run drifts under both sides of each ratio alike. This machine is shared: each loop also
//! prints the CPU time other processes used meanwhile.
//!
//! Under `cargo test --benches` (no `--bench` argument) everything runs once, on tiny sizes, as
//! a smoke test. Sizes and times are set by environment variables, see [`Settings::from_env`];
//! a filter argument (`cargo bench -p herald-benches --bench life_cycle -- activation`) selects
//! benchmarks by name.

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use herald_benches::floors::{OverwriteSync, pattern};
use herald_benches::measure::{CpuSnapshot, CpuUse, Measured, bytes, si};
use herald_benches::report::{Figure, Report, Target};
use herald_benches::scratch::{self, bench_root, filesystem_type, wait_for_spare};
use herald_benches::settings::{Invocation, env_f64, env_u64};
use herald_engine::{
    ActivationOptions, Broker, ConversationHandle, DialogOptions, Durability, QueueOptions,
    Receive, SentBy, Validation,
};
use parking_lot::{Condvar, Mutex};
use tempfile::TempDir;

type BenchError = Box<dyn std::error::Error + Send + Sync>;
type BenchResult<T> = Result<T, BenchError>;

/// How long a WAITFOR receive of these benchmarks waits before the run is declared broken: far
/// beyond any wake-up, so only a lost wake-up or a failed peer thread reaches it.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sender waits for its receiver to enter the wait, and a drain to finish, before
/// the run is declared broken.
const STALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the sender polls for the receiver to be seen asleep before going on anyway.
const ASLEEP_TIMEOUT: Duration = Duration::from_millis(50);
/// Where `/proc` cannot tell, how long the sender sleeps to let the receiver fall asleep.
const ASLEEP_FALLBACK: Duration = Duration::from_micros(200);
/// How long to wait for a log's first spare segment before a timed loop.
const SPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// Where a broker keeps its log inside its data directory (`engine/DESIGN.md`).
const WAL_SUBDIR: &str = "wal";

/// Body of the wake-up and ping-pong messages.
const SMALL_BODY_BYTES: usize = 64;
/// Body of the drained messages.
const DRAIN_BODY_BYTES: usize = 256;
/// Conversations (each its own group) the drained messages are spread over.
const DRAIN_DIALOGS: usize = 100;
/// Messages per preload transaction (untimed).
const PRELOAD_MESSAGES_PER_TX: usize = 1000;
/// Messages per RECEIVE of the drains, activated or plain.
const DRAIN_BATCH_MESSAGES: usize = 100;
/// Reader counts of the activation benchmarks.
const DRAIN_READERS: [usize; 3] = [1, 2, 4];
/// How often the timer of an activated drain looks at the handled count.
const DRAIN_POLL: Duration = Duration::from_micros(200);

const MESSAGE_TYPE: &str = "//bench/Message";
/// Tells the ping-pong target to stop, without a reply.
const STOP_TYPE: &str = "//bench/Stop";
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
        for name in suite() {
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
fn suite() -> Vec<String> {
    let mut names = vec![
        "life_cycle/waitfor_wake/none".to_owned(),
        "life_cycle/ping_pong/sync".to_owned(),
    ];
    for durability in ["none", "sync"] {
        for readers in DRAIN_READERS {
            names.push(activation_name(readers, durability));
        }
    }
    names
}

fn activation_name(readers: usize, durability: &str) -> String {
    format!("life_cycle/activation_{readers}/{durability}")
}

fn run(settings: &Settings) -> BenchResult<()> {
    let root = bench_root()?;
    let idle = CpuSnapshot::now();
    std::thread::sleep(idle_time(settings));
    let background = idle.elapsed().others_summary(idle_time(settings));
    println!(
        "herald-benches life_cycle: {} mode, writing in {} ({}), {} CPUs; {} wake-ups in {} \
         interleaved rounds; ping-pong {:?} in {} rounds; drains of {} (none) and {} (sync) \
         messages, {} rounds; segments {}; before starting, {background}",
        if settings.invocation.bench {
            "bench"
        } else {
            "test (tiny sizes)"
        },
        root.display(),
        filesystem_type(&root).unwrap_or_else(|| "unknown filesystem".into()),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        settings.wake_samples,
        settings.rounds,
        settings.run,
        settings.rounds,
        settings.drain_messages,
        settings.drain_sync_messages,
        settings.drain_rounds,
        bytes(settings.segment_bytes),
    );
    let mut report = Report::new();
    if settings.selected("life_cycle/waitfor_wake/none") {
        waitfor_wake(settings, &root, &mut report)?;
    }
    if settings.selected("life_cycle/ping_pong/sync") {
        ping_pong(settings, &root, &mut report)?;
    }
    for durability in [Durability::None, Durability::Sync] {
        activation(settings, &root, &mut report, durability)?;
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
    /// Length of the ping-pong loop and of its floor.
    run: Duration,
    /// Each wake-up and ping-pong loop is cut into this many slices, interleaved with its
    /// floor's.
    rounds: u32,
    segment_bytes: u64,
    wake_samples: u64,
    drain_messages: u64,
    drain_sync_messages: u64,
    /// Drains of each kind per reader count, interleaved.
    drain_rounds: u32,
}

impl Settings {
    /// Reads the mode and filter from the arguments (as criterion does) and sizes from:
    ///
    /// | variable | default | |
    /// |---|---|---|
    /// | `HERALD_BENCH_SECS` | 3 | length of the ping-pong loop and of its floor |
    /// | `HERALD_BENCH_ROUNDS` | 6 | slices the wake-up and ping-pong loops are cut into, interleaved with their floors |
    /// | `HERALD_BENCH_WAKE_SAMPLES` | 100000 | wake-ups measured, engine and floor each |
    /// | `HERALD_BENCH_DRAIN_MESSAGES` | 200000 | messages per activation drain, durability `None` |
    /// | `HERALD_BENCH_DRAIN_SYNC_MESSAGES` | 50000 | messages per activation drain, durability `Sync` |
    /// | `HERALD_BENCH_DRAIN_ROUNDS` | 3 | drains per reader count, activated and plain each, interleaved |
    /// | `HERALD_BENCH_SEGMENT_BYTES` | 64 MiB | log segment size (the log's default) |
    /// | `HERALD_BENCH_DIR` | `target/bench-tmp` | where files go (must be a real disk) |
    ///
    /// Without `--bench` (test mode) the defaults shrink to a smoke test; the variables still
    /// apply.
    fn from_env() -> BenchResult<Settings> {
        let invocation = Invocation::from_args();
        let bench = invocation.bench;
        let pick = |full: u64, tiny: u64| if bench { full } else { tiny };
        let settings = Settings {
            run: Duration::from_secs_f64(env_f64(
                "HERALD_BENCH_SECS",
                if bench { 3.0 } else { 0.02 },
            )?),
            rounds: env_u64("HERALD_BENCH_ROUNDS", pick(6, 1))?.try_into()?,
            segment_bytes: env_u64("HERALD_BENCH_SEGMENT_BYTES", pick(64 << 20, 4 << 20))?,
            wake_samples: env_u64("HERALD_BENCH_WAKE_SAMPLES", pick(100_000, 200))?,
            drain_messages: env_u64("HERALD_BENCH_DRAIN_MESSAGES", pick(200_000, 2_000))?,
            drain_sync_messages: env_u64("HERALD_BENCH_DRAIN_SYNC_MESSAGES", pick(50_000, 500))?,
            drain_rounds: env_u64("HERALD_BENCH_DRAIN_ROUNDS", pick(3, 1))?.try_into()?,
            invocation,
        };
        if settings.rounds == 0
            || settings.drain_rounds == 0
            || settings.wake_samples < u64::from(settings.rounds)
            || settings.drain_messages == 0
            || settings.drain_sync_messages == 0
        {
            return Err(
                "HERALD_BENCH_ROUNDS, HERALD_BENCH_DRAIN_ROUNDS and the message counts \
                        must be at least 1, HERALD_BENCH_WAKE_SAMPLES at least the rounds"
                    .into(),
            );
        }
        Ok(settings)
    }

    /// `target`, in bench mode: a test-mode pass measures nothing worth judging.
    fn target(&self, target: Target) -> Option<Target> {
        self.invocation.bench.then_some(target)
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
        durability: Durability,
        settings: &Settings,
    ) -> BenchResult<BenchBroker> {
        let dir = scratch::temp_dir(root, prefix)?;
        let broker = Broker::open(dir.path(), settings.engine_options(durability))?;
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

/// One message type either side may send, a stop message type, a contract for them, a target
/// service that accepts the contract and an initiator service, each on its own queue.
fn define_services(broker: &Broker) -> herald_engine::Result<()> {
    let mut tx = broker.begin();
    tx.create_message_type(MESSAGE_TYPE, Validation::None)?;
    tx.create_message_type(STOP_TYPE, Validation::None)?;
    tx.create_contract(
        CONTRACT,
        &[(MESSAGE_TYPE, SentBy::Any), (STOP_TYPE, SentBy::Initiator)],
    )?;
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

// ---------------------------------------------------------------------------------------------
// WAITFOR wake-up latency

/// Engine wake-ups against condition-variable wake-ups, in interleaved rounds.
fn waitfor_wake(settings: &Settings, root: &Path, report: &mut Report) -> BenchResult<()> {
    let bench = "life_cycle/waitfor_wake/none";
    let engine = BenchBroker::open(root, "wake-", Durability::None, settings)?;
    let handle = begin_dialogs(&engine.broker, 1)?[0];
    let body = pattern(SMALL_BODY_BYTES);
    let rounds = u64::from(settings.rounds);
    let mut floor_total = WakeRun::default();
    let mut engine_total = WakeRun::default();
    for round in 0..rounds {
        // The last round takes what does not divide evenly.
        let samples = settings.wake_samples / rounds
            + if round + 1 == rounds {
                settings.wake_samples % rounds
            } else {
                0
            };
        floor_total.add(condvar_wake_loop(samples)?);
        engine_total.add(engine_wake_loop(&engine.broker, handle, &body, samples)?);
    }
    engine.close()?;

    let floor = Latencies::new(floor_total.latencies_ns);
    let figure = Latencies::new(engine_total.latencies_ns);
    let floor_p50 = Figure::seconds("wake p50", floor.quantile_secs(0.50));
    let floor_p99 = Figure::seconds("wake p99", floor.quantile_secs(0.99));
    report.floor("floor/condvar_wake/p50", &floor_p50);
    report.floor("floor/condvar_wake/p99", &floor_p99);
    println!(
        "floor/condvar_wake: {} wake-ups; {}; receiver not seen asleep in {} of them; {}",
        floor.len(),
        floor.summary(),
        floor_total.unconfirmed,
        floor_total.cpu.others_summary(floor_total.elapsed),
    );
    report.compare(
        &format!("{bench}/p50"),
        &Figure::seconds("wake p50", figure.quantile_secs(0.50)),
        Some(("condvar floor p50", &floor_p50)),
        None,
    );
    report.compare(
        &format!("{bench}/p99"),
        &Figure::seconds("wake p99", figure.quantile_secs(0.99)),
        Some(("condvar floor p99", &floor_p99)),
        settings.target(Target::AtMost(50e-6)),
    );
    println!(
        "{bench}: {} wake-ups (t0 before the sender's commit(), t1 when receive returns); {}; \
         receiver not seen asleep in {} of them; {}",
        figure.len(),
        figure.summary(),
        engine_total.unconfirmed,
        engine_total.cpu.others_summary(engine_total.elapsed),
    );
    Ok(())
}

/// What a wake-up loop measured.
#[derive(Debug)]
struct WakeRun {
    latencies_ns: Vec<u32>,
    /// Rounds in which the waiter was not seen asleep before t0.
    unconfirmed: u64,
    elapsed: Duration,
    cpu: CpuUse,
}

impl Default for WakeRun {
    fn default() -> WakeRun {
        WakeRun {
            latencies_ns: Vec::new(),
            unconfirmed: 0,
            elapsed: Duration::ZERO,
            cpu: CpuUse::ZERO,
        }
    }
}

impl WakeRun {
    fn add(&mut self, other: WakeRun) {
        self.latencies_ns.extend(other.latencies_ns);
        self.unconfirmed += other.unconfirmed;
        self.elapsed += other.elapsed;
        self.cpu.add(other.cpu);
    }
}

/// Latency samples, sorted.
#[derive(Debug)]
struct Latencies {
    sorted_ns: Vec<u32>,
}

impl Latencies {
    fn new(mut samples_ns: Vec<u32>) -> Latencies {
        samples_ns.sort_unstable();
        Latencies {
            sorted_ns: samples_ns,
        }
    }

    fn len(&self) -> usize {
        self.sorted_ns.len()
    }

    /// The smallest sample at or above fraction `q` of them (nearest rank), in seconds.
    fn quantile_secs(&self, q: f64) -> f64 {
        let Some(last) = self.sorted_ns.len().checked_sub(1) else {
            return 0.0;
        };
        let rank = ((q * self.sorted_ns.len() as f64).ceil() as usize).saturating_sub(1);
        f64::from(self.sorted_ns[rank.min(last)]) * 1e-9
    }

    /// `p50 4.1 µs, p99 9.8 µs, p99.9 31.0 µs, max 1.2 ms`.
    fn summary(&self) -> String {
        let micros = |secs: f64| {
            if secs >= 1e-3 {
                format!("{:.2} ms", secs * 1e3)
            } else {
                format!("{:.1} µs", secs * 1e6)
            }
        };
        format!(
            "p50 {}, p99 {}, p99.9 {}, max {}",
            micros(self.quantile_secs(0.50)),
            micros(self.quantile_secs(0.99)),
            micros(self.quantile_secs(0.999)),
            micros(self.quantile_secs(1.0)),
        )
    }
}

/// The waiter's side of round `n` of a wake-up loop: calls its `enter` argument just before it
/// blocks and returns the instant its wait returned (t1).
type WaitRound<'a> = dyn FnMut(u64, &dyn Fn()) -> BenchResult<Instant> + Send + 'a;
/// The waker's side of round `n`: calls its `mark_t0` argument just before the call that wakes
/// the waiter.
type WakeRound<'a> = dyn FnMut(u64, &dyn Fn()) -> BenchResult<()> + 'a;

/// What the two threads of a wake-up loop share.
#[derive(Debug)]
struct Handoff {
    /// Every instant is kept as nanoseconds since this one.
    base: Instant,
    /// The round the waiter has published it is about to wait for (0: none yet).
    entered: AtomicU64,
    /// t0 of the current round.
    t0_ns: AtomicU64,
    /// The waiter's kernel thread id, to watch it fall asleep in `/proc` (unset: unknown).
    waiter_tid: OnceLock<u32>,
    /// The waiter failed: the waker stops.
    failed: AtomicBool,
}

impl Handoff {
    fn new() -> Handoff {
        Handoff {
            base: Instant::now(),
            entered: AtomicU64::new(0),
            t0_ns: AtomicU64::new(0),
            waiter_tid: OnceLock::new(),
            failed: AtomicBool::new(false),
        }
    }

    fn nanos_since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The waker's side of one round: waits until the waiter has published `round` and is
    /// asleep, then `wake`s it; `wake` calls its argument to read t0 just before the call that
    /// wakes the waiter. Returns whether the waiter was seen asleep.
    fn wake_round(
        &self,
        round: u64,
        wake: &mut dyn FnMut(&dyn Fn()) -> BenchResult<()>,
    ) -> BenchResult<bool> {
        let deadline = Instant::now() + STALL_TIMEOUT;
        while self.entered.load(Ordering::SeqCst) < round {
            if self.failed.load(Ordering::SeqCst) {
                return Err("the waiting thread failed".into());
            }
            if Instant::now() >= deadline {
                return Err(format!("round {round}: the waiter never entered its wait").into());
            }
            std::thread::yield_now();
        }
        let asleep = self.waiter_tid.get().is_some_and(|tid| wait_asleep(*tid));
        if self.waiter_tid.get().is_none() {
            std::thread::sleep(ASLEEP_FALLBACK);
        }
        wake(&|| {
            self.t0_ns
                .store(self.nanos_since_base(Instant::now()), Ordering::SeqCst);
        })?;
        Ok(asleep)
    }

    /// The waiter's side of a whole loop: `wait(round, enter)` must call `enter` just before it
    /// blocks and return the instant its wait returned (t1).
    fn wait_rounds(&self, samples: u64, wait: &mut WaitRound<'_>) -> BenchResult<Vec<u32>> {
        if let Some(tid) = current_tid() {
            let _ = self.waiter_tid.set(tid);
        }
        let mut latencies = Vec::with_capacity(samples.try_into().unwrap_or(0));
        for round in 1..=samples {
            let t1 = match wait(round, &|| self.entered.store(round, Ordering::SeqCst)) {
                Ok(t1) => t1,
                Err(e) => {
                    self.failed.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            };
            // Stored before the wake, which synchronises with the waiter through the lock it
            // woke on.
            let t0 = self.t0_ns.load(Ordering::SeqCst);
            let latency = self.nanos_since_base(t1).saturating_sub(t0);
            latencies.push(u32::try_from(latency).unwrap_or(u32::MAX));
        }
        Ok(latencies)
    }

    /// Runs `samples` rounds: `wait` on a new thread, `wake` on this one.
    fn run(
        samples: u64,
        wait: &mut WaitRound<'_>,
        wake: &mut WakeRound<'_>,
    ) -> BenchResult<WakeRun> {
        let handoff = Handoff::new();
        let cpu = CpuSnapshot::now();
        let start = Instant::now();
        let (latencies, unconfirmed) = std::thread::scope(|scope| -> BenchResult<_> {
            let waiter = scope.spawn(|| handoff.wait_rounds(samples, wait));
            let mut unconfirmed = 0;
            let mut woken = Ok(());
            for round in 1..=samples {
                match handoff.wake_round(round, &mut |mark_t0| wake(round, mark_t0)) {
                    Ok(asleep) => unconfirmed += u64::from(!asleep),
                    Err(e) => {
                        woken = Err(e);
                        break;
                    }
                }
            }
            let latencies = waiter.join().map_err(|_| "the waiting thread panicked")?;
            woken?;
            Ok((latencies?, unconfirmed))
        })?;
        Ok(WakeRun {
            latencies_ns: latencies,
            unconfirmed,
            elapsed: start.elapsed(),
            cpu: cpu.elapsed(),
        })
    }
}

/// The floor: a token handed through a `parking_lot::Mutex` + `Condvar`.
fn condvar_wake_loop(samples: u64) -> BenchResult<WakeRun> {
    let token = Mutex::new(0u64);
    let changed = Condvar::new();
    Handoff::run(
        samples,
        &mut |round, enter| {
            let mut guard = token.lock();
            enter();
            while *guard < round {
                if changed.wait_for(&mut guard, WAIT_TIMEOUT).timed_out() {
                    return Err(format!("round {round}: no token within {WAIT_TIMEOUT:?}").into());
                }
            }
            Ok(Instant::now())
        },
        &mut |round, mark_t0| {
            mark_t0();
            *token.lock() = round;
            changed.notify_one();
            Ok(())
        },
    )
}

/// The engine: a WAITFOR receive woken by a committed send (`Durability::None`).
fn engine_wake_loop(
    broker: &Broker,
    handle: ConversationHandle,
    body: &[u8],
    samples: u64,
) -> BenchResult<WakeRun> {
    Handoff::run(
        samples,
        &mut |round, enter| {
            let mut tx = broker.begin();
            enter();
            let batch = tx.receive(TARGET_QUEUE, Receive::top(1).wait(WAIT_TIMEOUT))?;
            let t1 = Instant::now();
            if batch.len() != 1 {
                return Err(format!(
                    "round {round}: WAITFOR returned {} messages, not 1",
                    batch.len()
                )
                .into());
            }
            black_box(batch[0].body());
            tx.commit()?;
            Ok(t1)
        },
        &mut |_round, mark_t0| {
            let mut tx = broker.begin();
            tx.send(handle, MESSAGE_TYPE, body)?;
            mark_t0();
            tx.commit()?;
            Ok(())
        },
    )
}

/// The calling thread's kernel id, from `/proc/thread-self/stat`; `None` where that is missing.
fn current_tid() -> Option<u32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// Polls the state of thread `tid` of this process until it reads `S` (sleeping), for at most
/// `ASLEEP_TIMEOUT`; returns whether it did.
fn wait_asleep(tid: u32) -> bool {
    let path = format!("/proc/self/task/{tid}/stat");
    let deadline = Instant::now() + ASLEEP_TIMEOUT;
    loop {
        let Ok(stat) = std::fs::read_to_string(&path) else {
            std::thread::sleep(ASLEEP_FALLBACK);
            return false;
        };
        // The state is the first field after the command name, which is in parentheses.
        let state = stat
            .rfind(')')
            .and_then(|end| stat.get(end + 1..))
            .and_then(|rest| rest.split_whitespace().next());
        if state == Some("S") {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
}

// ---------------------------------------------------------------------------------------------
// Ping-pong on one dialog, durable

/// Round trips on one dialog against half the fdatasync rate, in interleaved rounds.
fn ping_pong(settings: &Settings, root: &Path, report: &mut Report) -> BenchResult<()> {
    let bench = "life_cycle/ping_pong/sync";
    let engine = BenchBroker::open(root, "ping-pong-", Durability::Sync, settings)?;
    let handle = begin_dialogs(&engine.broker, 1)?[0];
    let body = pattern(SMALL_BODY_BYTES);
    let floor_dir = scratch::temp_dir(root, "ping-pong-floor-")?;
    let mut fdatasync = OverwriteSync::new(floor_dir.path(), 4096, settings.segment_bytes)?;

    let slice = settings.run / settings.rounds;
    let mut floor_total = Measured::default();
    let mut engine_total = Measured::default();
    let (mut floor_rates, mut engine_rates) = (Vec::new(), Vec::new());
    let (mut floor_cpu, mut engine_cpu) = (CpuUse::ZERO, CpuUse::ZERO);
    for _ in 0..settings.rounds {
        let cpu = CpuSnapshot::now();
        let measured = fdatasync.run(slice)?;
        floor_cpu.add(cpu.elapsed());
        floor_rates.push(measured.ops_per_sec() / 2.0);
        floor_total.add(measured);
        let cpu = CpuSnapshot::now();
        let measured = ping_pong_loop(&engine.broker, handle, &body, slice)?;
        engine_cpu.add(cpu.elapsed());
        engine_rates.push(measured.ops_per_sec());
        engine_total.add(measured);
    }
    drop(fdatasync);
    floor_dir.close()?;
    engine.close()?;

    let floor_name = "floor/fdatasync_4KiB÷2";
    let floor = Figure::per_sec("round trip", floor_total.ops_per_sec() / 2.0);
    report.floor(floor_name, &floor);
    println!(
        "{floor_name}: {} fdatasync/s ({:.2?} each) of 4 KiB overwrites, halved: a round trip \
         has two durable commits, one after the other; rounds {} round trips/s; {}",
        si(floor_total.ops_per_sec()),
        floor_total.per_op(),
        spread(&floor_rates),
        floor_cpu.others_summary(floor_total.elapsed),
    );
    report.compare(
        bench,
        &Figure::per_sec("round trip", engine_total.ops_per_sec()),
        Some(("fdatasync floor ÷ 2", &floor)),
        settings.target(Target::Ratio(0.7)),
    );
    println!(
        "{bench}: {} round trips, {:.2?} each; rounds {} round trips/s; {}",
        engine_total.ops,
        engine_total.per_op(),
        spread(&engine_rates),
        engine_cpu.others_summary(engine_total.elapsed),
    );
    Ok(())
}

/// Round trips on `handle` for `run`: this thread is the initiator, a second one the target.
/// Counts the replies received within `run`; the last one is answered with a stop message.
fn ping_pong_loop(
    broker: &Broker,
    handle: ConversationHandle,
    body: &[u8],
    run: Duration,
) -> BenchResult<Measured> {
    std::thread::scope(|scope| {
        let target = scope.spawn(|| -> BenchResult<u64> {
            let mut replies = 0;
            loop {
                let mut tx = broker.begin();
                let batch = tx.receive(TARGET_QUEUE, Receive::top(1).wait(WAIT_TIMEOUT))?;
                let Some(message) = batch.first() else {
                    return Err(format!("target: no message within {WAIT_TIMEOUT:?}").into());
                };
                if &*message.message_type == STOP_TYPE {
                    tx.commit()?;
                    return Ok(replies);
                }
                black_box(message.body());
                tx.send(message.conversation_handle, MESSAGE_TYPE, body)?;
                tx.commit()?;
                replies += 1;
            }
        });
        let initiator = || -> BenchResult<Measured> {
            let start = Instant::now();
            let mut tx = broker.begin();
            tx.send(handle, MESSAGE_TYPE, body)?;
            tx.commit()?;
            let mut round_trips = 0;
            loop {
                let mut tx = broker.begin();
                let batch = tx.receive(INITIATOR_QUEUE, Receive::top(1).wait(WAIT_TIMEOUT))?;
                if batch.len() != 1 {
                    return Err(format!(
                        "initiator: {} replies within {WAIT_TIMEOUT:?}, not 1",
                        batch.len()
                    )
                    .into());
                }
                black_box(batch[0].body());
                round_trips += 1;
                let elapsed = start.elapsed();
                if elapsed >= run {
                    tx.send(handle, STOP_TYPE, &[])?;
                    tx.commit()?;
                    return Ok(Measured {
                        ops: round_trips,
                        bytes: 0,
                        elapsed,
                    });
                }
                tx.send(handle, MESSAGE_TYPE, body)?;
                tx.commit()?;
            }
        };
        let measured = initiator();
        let replies = target.join().map_err(|_| "the target thread panicked")?;
        let measured = measured?;
        if replies? != measured.ops {
            return Err("the target replied to a different number of messages".into());
        }
        Ok(measured)
    })
}

/// `812–1.20k`: the lowest and highest of `rates`.
fn spread(rates: &[f64]) -> String {
    let low = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let high = rates.iter().copied().fold(0.0, f64::max);
    format!("{}–{}", si(low), si(high))
}

// ---------------------------------------------------------------------------------------------
// Activation throughput

/// For 1, 2 and 4 readers: activated drains against plain-thread drains of the same preload,
/// in interleaved rounds.
fn activation(
    settings: &Settings,
    root: &Path,
    report: &mut Report,
    durability: Durability,
) -> BenchResult<()> {
    let (durability_name, messages) = match durability {
        Durability::None => ("none", settings.drain_messages),
        _ => ("sync", settings.drain_sync_messages),
    };
    let selected: Vec<usize> = DRAIN_READERS
        .into_iter()
        .filter(|r| settings.selected(&activation_name(*r, durability_name)))
        .collect();
    if selected.is_empty() {
        return Ok(());
    }
    let engine = BenchBroker::open(root, "activation-", durability, settings)?;
    let broker = &engine.broker;
    let handles = begin_dialogs(broker, DRAIN_DIALOGS)?;
    let body = pattern(DRAIN_BODY_BYTES);
    for readers in selected {
        let bench = activation_name(readers, durability_name);
        let mut floor_total = Measured::default();
        let mut engine_total = Measured::default();
        let (mut floor_rates, mut engine_rates) = (Vec::new(), Vec::new());
        let (mut floor_cpu, mut engine_cpu) = (CpuUse::ZERO, CpuUse::ZERO);
        let (mut floor_batches, mut engine_batches) = (0, 0);
        let mut peak_readers = 0;
        for round in 0..settings.drain_rounds {
            // Which drain goes first alternates, so neither always follows the other.
            let activated_first = round % 2 == 1;
            for activated in [activated_first, !activated_first] {
                preload(broker, &handles, messages, &body)?;
                let cpu = CpuSnapshot::now();
                if activated {
                    let drain = activated_drain(broker, readers, messages)?;
                    engine_cpu.add(cpu.elapsed());
                    engine_rates.push(drain.measured.ops_per_sec());
                    engine_total.add(drain.measured);
                    engine_batches += drain.batches;
                    peak_readers = peak_readers.max(drain.peak_readers);
                } else {
                    let drain = plain_drain(broker, readers, messages)?;
                    floor_cpu.add(cpu.elapsed());
                    floor_rates.push(drain.measured.ops_per_sec());
                    floor_total.add(drain.measured);
                    floor_batches += drain.batches;
                }
            }
        }
        let floor_name = format!("floor/plain_readers_{readers}/{durability_name}");
        let floor = Figure::per_sec("msg", floor_total.ops_per_sec());
        report.floor(&floor_name, &floor);
        println!(
            "{floor_name}: {readers} threads looping receive(top({DRAIN_BATCH_MESSAGES})) + \
             commit over {messages} messages on {DRAIN_DIALOGS} dialogs; {} batches committed, \
             {:.2?} each; rounds {} msg/s; {}",
            floor_batches,
            floor_total.elapsed / u32::try_from(floor_batches.max(1)).unwrap_or(u32::MAX),
            spread(&floor_rates),
            floor_cpu.others_summary(floor_total.elapsed),
        );
        report.compare(
            &bench,
            &Figure::per_sec("msg", engine_total.ops_per_sec()),
            Some(("plain-thread floor", &floor)),
            settings.target(Target::Ratio(0.8)),
        );
        println!(
            "{bench}: max_readers {readers}, batches of {DRAIN_BATCH_MESSAGES}, timed from \
             activate() to an empty queue; at most {peak_readers} readers seen running; {} \
             batches handled, {:.2?} each; rounds {} msg/s; {}",
            engine_batches,
            engine_total.elapsed / u32::try_from(engine_batches.max(1)).unwrap_or(u32::MAX),
            spread(&engine_rates),
            engine_cpu.others_summary(engine_total.elapsed),
        );
    }
    engine.close()
}

/// Sends `messages` of `body` round-robin over `handles`, `PRELOAD_MESSAGES_PER_TX` per
/// transaction (untimed).
fn preload(
    broker: &Broker,
    handles: &[ConversationHandle],
    messages: u64,
    body: &[u8],
) -> BenchResult<()> {
    let mut left = messages;
    for handle in handles.iter().cycle() {
        if left == 0 {
            break;
        }
        let batch = left.min(PRELOAD_MESSAGES_PER_TX as u64);
        let mut tx = broker.begin();
        for _ in 0..batch {
            tx.send(*handle, MESSAGE_TYPE, body)?;
        }
        tx.commit()?;
        left -= batch;
    }
    let depth = queue_depth(broker)?;
    if depth != messages {
        return Err(format!("preloaded {messages} messages, the queue holds {depth}").into());
    }
    Ok(())
}

/// Messages in the target queue, those taken by open transactions included.
fn queue_depth(broker: &Broker) -> BenchResult<u64> {
    broker
        .queues()
        .into_iter()
        .find(|q| q.name == TARGET_QUEUE)
        .map(|q| q.messages)
        .ok_or_else(|| "the target queue is missing".into())
}

/// The floor: `readers` plain threads each looping RECEIVE TOP(100), reading each body, and
/// commit, until `messages` receives have committed; timed as `activated_drain` is, by this
/// thread watching for the end.
fn plain_drain(broker: &Broker, readers: usize, messages: u64) -> BenchResult<Drain> {
    let progress = DrainProgress::default();
    let failed = AtomicBool::new(false);
    let start = Instant::now();
    let deadline = start + STALL_TIMEOUT;
    let reader = || -> BenchResult<()> {
        while progress.messages.load(Ordering::SeqCst) < messages
            && !failed.load(Ordering::SeqCst)
            && Instant::now() < deadline
        {
            let mut tx = broker.begin();
            let batch = tx.receive(TARGET_QUEUE, Receive::top(DRAIN_BATCH_MESSAGES))?;
            if batch.is_empty() {
                // Every group with messages is locked by another reader.
                tx.rollback();
                std::thread::yield_now();
                continue;
            }
            touch(&batch);
            tx.commit()?;
            progress.add(batch.len());
        }
        Ok(())
    };
    let (elapsed, peak_readers) = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..readers)
            .map(|_| {
                scope.spawn(|| {
                    let result = reader();
                    if result.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    result
                })
            })
            .collect();
        let drained = progress.wait_drained(broker, messages, start, &failed, &mut || readers);
        for thread in threads {
            thread.join().map_err(|_| "a reader thread panicked")??;
        }
        Ok::<_, BenchError>(drained)
    })??;
    Ok(Drain {
        measured: Measured {
            ops: messages,
            bytes: 0,
            elapsed,
        },
        batches: progress.batches.load(Ordering::SeqCst),
        peak_readers,
    })
}

/// `Broker::activate` with `readers` readers and a handler that reads each body, timed from
/// `activate` until `messages` are handled and the queue is empty; then deactivates.
fn activated_drain(broker: &Broker, readers: usize, messages: u64) -> BenchResult<Drain> {
    let progress = Arc::new(DrainProgress::default());
    let options = ActivationOptions {
        max_readers: readers,
        batch_messages: DRAIN_BATCH_MESSAGES,
        ..ActivationOptions::new(readers)
    };
    let handled = progress.clone();
    let start = Instant::now();
    broker.activate(TARGET_QUEUE, options, move |_tx, batch| {
        touch(batch);
        handled.add(batch.len());
        Ok(())
    })?;
    let never_fails = AtomicBool::new(false);
    let drained = progress.wait_drained(broker, messages, start, &never_fails, &mut || {
        broker.activated_readers().len()
    });
    broker.deactivate(TARGET_QUEUE)?;
    let (elapsed, peak_readers) = drained?;
    let handled = progress.messages.load(Ordering::SeqCst);
    if handled != messages {
        return Err(format!(
            "activated drain: the handler saw {handled} messages for {messages} queued (batches \
             rolled back and retried?)"
        )
        .into());
    }
    Ok(Drain {
        measured: Measured {
            ops: messages,
            bytes: 0,
            elapsed,
        },
        batches: progress.batches.load(Ordering::SeqCst),
        peak_readers,
    })
}

/// What one drain of the queue did.
#[derive(Debug)]
struct Drain {
    /// Messages drained, in how long.
    measured: Measured,
    /// Batches received (and committed).
    batches: u64,
    /// Most readers seen running at once.
    peak_readers: usize,
}

/// Messages and batches a drain's readers have handled so far.
#[derive(Debug, Default)]
struct DrainProgress {
    messages: AtomicU64,
    batches: AtomicU64,
}

impl DrainProgress {
    fn add(&self, messages: usize) {
        self.messages.fetch_add(messages as u64, Ordering::SeqCst);
        self.batches.fetch_add(1, Ordering::SeqCst);
    }

    /// Watches, every `DRAIN_POLL`, until `messages` are handled and the queue is empty (its
    /// depth counts messages taken by open transactions: 0 means every receive committed);
    /// returns the time since `start` and the most of `readers_now()` seen. Both kinds of
    /// drain are timed by this same loop, so both carry its polling.
    fn wait_drained(
        &self,
        broker: &Broker,
        messages: u64,
        start: Instant,
        failed: &AtomicBool,
        readers_now: &mut dyn FnMut() -> usize,
    ) -> BenchResult<(Duration, usize)> {
        let deadline = start + STALL_TIMEOUT;
        let mut peak = 0;
        for poll in 0u64.. {
            // Activated readers are listed behind a lock they take per batch: look less often.
            if poll.is_multiple_of(16) {
                peak = peak.max(readers_now());
            }
            // The counter first, then the depth: the last batches may still be committing.
            if self.messages.load(Ordering::SeqCst) >= messages && queue_depth(broker)? == 0 {
                return Ok((start.elapsed(), peak));
            }
            if failed.load(Ordering::SeqCst) {
                return Err("a reader failed".into());
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(DRAIN_POLL);
        }
        Err(format!(
            "drain: {} of {messages} messages handled after {STALL_TIMEOUT:?}",
            self.messages.load(Ordering::SeqCst)
        )
        .into())
    }
}

/// The trivial work of a drain: reads every byte of every body.
fn touch(batch: &[herald_engine::Message]) {
    for message in batch {
        black_box(message.body().iter().fold(0u8, |sum, byte| sum ^ byte));
    }
}

/// How long `run` sleeps before starting, to see what else uses the machine.
fn idle_time(settings: &Settings) -> Duration {
    if settings.invocation.bench {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(20)
    }
}
