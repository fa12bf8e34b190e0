//! Benchmarks of two nodes (`herald_net::Node`: a broker and its QUIC endpoint) on loopback, each
//! beside its floor measured in the same run.
//!
//! Driven by `cargo bench -p herald-benches --bench nodes`:
//!
//! - `nodes/bulk_1KiB/{sync,none}`: node A sends N messages of 1 KiB over 64 dialogs to node B,
//!   committing 100 sends per transaction (round-robin over the dialogs); on B one thread drains
//!   the target queue with WAITFOR receives of up to 1000, committing each. Timed from the first
//!   send until B has received all N and A's transmission queue is empty (every message
//!   acknowledged after B's commit of its arrival). Both brokers use the named durability.
//!   Floor `floor/quinn_stream_1KiB`: the same body bytes written on one raw quinn stream
//!   between two endpoints with the nodes' TLS and transport configuration, in 1 KiB writes,
//!   timed until the receiver has read them all and answered one byte; its messages/s is
//!   its byte rate over 1 KiB. Rounds interleave floor and figure. Target ≥ 0.5× the floor.
//!   Figures (2-CPU VM, 2026-11-26, three runs of the defaults, after events batched per read
//!   and the other changes listed under delivery below): sync 122–199k msg/s (0.30–0.38× of
//!   406–529k), none 244–272k (0.41–0.47× of 579–598k); CPU per message 6.8–8 µs (12 µs in a
//!   run where the floor's own rose from 2.7 to 3.8 µs), of which A's SENDs 0.9–1.7 µs and B's
//!   draining receives ~1.5 µs (the thread that drains is gone when the CPU by thread is read,
//!   so the by-thread line does not list it). Before them: sync 142–177k msg/s (0.30–0.32× of
//!   463–553k), none 206–261k (0.37–0.43× of 560–605k). Earlier: sync 149–170k msg/s (0.27–0.30× of
//!   544–561k), none 189–204k (0.31–0.35× of 568–623k); the same day's code before this round of
//!   work: sync 103–107k (0.22×), none 120k (0.25×). What changed, each measured here: bodies
//!   handed to the transport as the log's own bytes, names shared per listing and per connection,
//!   headers encoded at their size (none 120k → 157k); the session's per-message trees replaced by
//!   queues; spare zero-fills paced (rounds that overlapped one ran at ~0.5× the others, now
//!   ~0.8×); released segments reused as spares instead of zero-filled (sync 126k → 137k over four
//!   alternated runs). The run also prints the process CPU time per message, figure and floor:
//!   8.9–9.7 µs over both nodes against 2.3–2.6 µs for quinn alone (3.4–4.1×, about the inverse of
//!   the throughput ratio: the rounds are CPU-bound, so 0.5× needs at most 2× the floor's CPU per
//!   message). Where it goes (`perf record` of 160k messages, Sync): the two network threads (quinn
//!   plus framing) ~35%, the two receivers ~17% (arrivals into B's log, acknowledgements out of A's
//!   transmission queue), A's SENDs and commits ~18% (a third of it the `pwrite` copy into the page
//!   cache), B's draining receives ~10%, A's sender ~8%, the rest spare preparation and
//!   checkpoints. No single hot spot is left: reaching 0.5× would need the whole pipeline, two
//!   durable log writes per message included, to cost no more than quinn's own send and receive.
//!   More producer threads help little (2 or 4 producers over the same 64 dialogs, measured before
//!   segment reuse: 152k and 158k against 134–139k with one): the CPUs are busy.
//! - `nodes/deliver_1KiB/{sync,none}`: delivery alone, the same floor and target. Each round A
//!   sends N messages as above while its route to B is dropped (they wait in its transmission
//!   queue, untimed; then both logs' spare segments are let finish); the time runs from the
//!   commit that creates the route again until A's
//!   transmission queue is empty (each message stored durably in B's queue and acknowledged);
//!   B receives them afterwards, untimed. The network's share of the bulk figure: A's sender
//!   and receiver, quinn on both ends, B's storing of arrivals. It found that a backlog waited
//!   for the next full pass of the sender (up to `ROUTE_RECHECK_INTERVAL`, 1 s) after its
//!   route was created (18k msg/s; now the pass starts over on any route change).
//!   Figures (three runs of the defaults, 2026-11-26, late): sync 225–329k msg/s (0.48–0.64×
//!   the floor; 0.48× in the run where the floor's own CPU per message rose by a third), none
//!   310–345k (0.58–0.67×), CPU per message 5.3–7.0 µs against the floor's 2.7–3.7 µs; by
//!   thread (sync, a typical run): the two network threads 2.7 µs, the two receivers 1.3–1.6,
//!   A's sender 0.5, the acker, checkpointer and spare preparer 0.1–0.2 each. What took it there
//!   from 5.8–7.7 µs (alternated runs of 100k messages, CPU per message): the transport hands a
//!   read's events (up to `READ_CHUNKS_MAX` chunks) to the receiver as one batch, one channel
//!   operation per read instead of per message (6.3–6.7 → 5.7–5.8 µs, +10% msg/s); the
//!   receiving node's writer is no longer woken for every chunk read; the per-message maps use
//!   a keyed multiply hasher instead of SipHash; status texts without a reference count bumped
//!   from two threads per message; arrivals' catalog checks once per batch and kind; a sender
//!   behind a full send queue resumes once a whole batch fits (`SEND_QUEUE_RESUME_MESSAGES`;
//!   at 100k messages its CPU per message had doubled in some runs). Earlier the same day:
//!   sync 227–280k msg/s (0.48–0.54×), none 258–281k (0.54–0.58×), CPU per message 5.8–7.7
//!   µs against the floor's 2.7–3.3 µs. Before the nodes' UDP sockets got 4 MiB buffers
//!   (`UDP_SOCKET_BUFFER_BYTES`):
//!   sync 221–233k (0.41–0.42×), none 228–230k; quinn's statistics showed why — the receiving
//!   node's socket overflowed whenever its network thread paused, 834–1695 datagrams lost per
//!   run (~2%), each a retransmission and a congestion event; none since. The session's
//!   unacknowledged messages in a deque by send order instead of a `BTreeMap` (which moved
//!   ~1 KiB of entries per removal) took CPU per message from 6.3–6.7 to 5.8–6.2 µs.
//! - `nodes/request_reply/sync`: one dialog, durable on both sides: A sends a request and
//!   commits, B's WAITFOR receive and its reply commit in one transaction, A's WAITFOR receive
//!   of the reply commits. A round trip is timed from before A's send until A's receive
//!   returned; p50 and p99 over `HERALD_BENCH_NODES_ROUND_TRIPS` (2000) round trips. The floor
//!   reported is twice the time of one 4 KiB `pwrite` + `fdatasync` (`floors::OverwriteSync`),
//!   measured just before (loopback network not included): the two application commits on the
//!   critical path. Each node also stores what arrives (B the request, A the reply) before
//!   anyone can receive it: that commit is receivable once written, and acknowledged only once
//!   durable — by the receiving application's own commit, which the log makes durable only
//!   with everything before it, or by the node's acker after `ACK_SYNC_GRACE`. So of the five
//!   durable commits (A's send, B's arrival, B's receive + reply, A's arrival, A's receive)
//!   three `fdatasync`s follow each other; the run prints 3 × and 5 × fdatasync. Target p50 ≤
//!   1 ms. Figures (same runs as the bulk figures): p50 669–694 µs with 3 × fdatasync at
//!   385–402 µs (669–681 µs and 1.4–2.0 ms in the day's earlier runs, 0.78–0.79 ms before),
//!   p99 1.6–2.0 ms. What remains beyond the
//!   three syncs: per direction the network thread's wake-up (~40 µs scheduling delay waking an
//!   idle vCPU, `perf sched timehist`), quinn on both ends, the hand-off to the receiver thread
//!   and its write of the arrival, the wake-up of the WAITFOR receiver.
//!
//! Each bulk run also prints the CPU per message by thread name, both nodes' threads of a name
//! added up (from `/proc/self/task`, in 10 ms ticks).
//!
//! To profile only the timed parts of the bulk rounds: `mkfifo /tmp/ctl;
//! HERALD_BENCH_PERF_CONTROL=/tmp/ctl perf record -D -1 --control=fifo:/tmp/ctl <bench binary>
//! --bench nodes/deliver` (see `PerfControl`).
//!
//! Under `cargo test --benches` everything runs once on tiny sizes as a smoke test. Sizes by
//! environment variable, see [`Settings::from_env`]; a filter argument selects by name.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use herald_benches::floors::{OverwriteSync, pattern};
use herald_benches::measure::{PerfControl, si};
use herald_benches::quic_floor::RawQuicStream;
use herald_benches::report::{Figure, Report, Target};
use herald_benches::scratch::{self, bench_root, filesystem_type};
use herald_benches::settings::{Invocation, env_u64};
use herald_engine::{
    Broker, ConversationHandle, DialogOptions, Durability, QueueOptions, Receive, Route,
    RouteAddress, SentBy, Validation,
};
use herald_net::identity::{NodeIdentity, Trust};
use herald_net::node::IDENTITY_DIR;
use herald_net::{Node, NodeConfig};
use tempfile::TempDir;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const BODY_BYTES: usize = 1024;
const DIALOGS: usize = 64;
const SENDS_PER_TRANSACTION: usize = 100;
const REQUEST: &str = "//bench/Request";
const REPLY: &str = "//bench/Reply";
const CONTRACT: &str = "//bench/Contract";
/// Bound of any one wait: only a hang reaches it.
const TIMEOUT: Duration = Duration::from_secs(600);

fn main() {
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("bench settings: {e}");
            std::process::exit(2);
        }
    };
    if settings.invocation.list {
        for name in [
            bulk_name(Pipeline::EndToEnd, Durability::Sync),
            bulk_name(Pipeline::EndToEnd, Durability::None),
            bulk_name(Pipeline::DeliveryOnly, Durability::Sync),
            bulk_name(Pipeline::DeliveryOnly, Durability::None),
            RTT_NAME.to_owned(),
        ] {
            println!("{name}: benchmark");
        }
        return;
    }
    if let Err(e) = run(&settings) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

const RTT_NAME: &str = "nodes/request_reply/sync";

/// What a bulk round times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pipeline {
    /// A's application sending, delivery, B's application receiving, all at once.
    EndToEnd,
    /// Delivery alone: A's transmission queue holds the round's messages (sent while A had no
    /// route to B) when the route is created; timed until all are acknowledged — stored
    /// durably in B's queue. B's application receives them afterwards, untimed.
    DeliveryOnly,
}

fn bulk_name(pipeline: Pipeline, durability: Durability) -> String {
    let what = match pipeline {
        Pipeline::EndToEnd => "bulk_1KiB",
        Pipeline::DeliveryOnly => "deliver_1KiB",
    };
    format!("nodes/{what}/{}", durability_name(durability))
}

fn durability_name(durability: Durability) -> &'static str {
    match durability {
        Durability::Sync => "sync",
        Durability::None => "none",
        Durability::Batched { .. } => "batched",
    }
}

fn run(settings: &Settings) -> BenchResult<()> {
    let root = bench_root()?;
    println!(
        "herald-benches nodes: {} mode, writing in {} ({}), {} CPUs; bulk {} (sync) / {} (none) \
         messages of {BODY_BYTES} B over {DIALOGS} dialogs, {} interleaved rounds; {} round trips",
        if settings.invocation.bench {
            "bench"
        } else {
            "test (tiny sizes)"
        },
        root.display(),
        filesystem_type(&root).unwrap_or_else(|| "unknown filesystem".into()),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        settings.sync_messages,
        settings.none_messages,
        settings.rounds,
        settings.round_trips,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let floor = runtime.block_on(RawQuicStream::connect())?;
    let mut report = Report::new();
    for pipeline in [Pipeline::EndToEnd, Pipeline::DeliveryOnly] {
        for (durability, messages) in [
            (Durability::Sync, settings.sync_messages),
            (Durability::None, settings.none_messages),
        ] {
            if settings
                .invocation
                .selected(&bulk_name(pipeline, durability))
            {
                bulk(
                    settings,
                    &root,
                    &runtime,
                    &floor,
                    (pipeline, durability),
                    messages,
                    &mut report,
                )?;
            }
        }
    }
    runtime.block_on(floor.close());
    if settings.invocation.selected(RTT_NAME) {
        request_reply(settings, &root, &mut report)?;
    }
    report.print_table();
    if !settings.invocation.bench {
        println!("(test mode: one tiny pass of each)");
    }
    Ok(())
}

/// Each round's rate, in order (a slow round among fast ones shows where it fell).
fn spread(rates: &[f64]) -> String {
    rates.iter().map(|r| si(*r)).collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Two nodes

/// Nodes A (initiator services) and B (target services) in their own directories, trusting
/// each other, with routes both ways.
struct Pair {
    a: Node,
    b: Node,
    dirs: (TempDir, TempDir),
}

impl Pair {
    fn start(root: &Path, durability: Durability) -> BenchResult<Pair> {
        let (a_dir, b_dir) = (
            scratch::temp_dir(root, "nodes-a-")?,
            scratch::temp_dir(root, "nodes-b-")?,
        );
        let (a_identity, b_identity) = (NodeIdentity::generate()?, NodeIdentity::generate()?);
        a_identity.write(&a_dir.path().join(IDENTITY_DIR))?;
        b_identity.write(&b_dir.path().join(IDENTITY_DIR))?;
        let start = |dir: &Path, trusted: &NodeIdentity| {
            Node::start(NodeConfig {
                data_dir: dir.to_path_buf(),
                listen: loopback(),
                broker: herald_engine::Options {
                    durability,
                    ..herald_engine::Options::default()
                },
                trust: Trust::pinned([trusted.fingerprint()]),
                restricted_peers: HashMap::new(),
            })
        };
        let a = start(a_dir.path(), &b_identity)?;
        let b = start(b_dir.path(), &a_identity)?;
        // A new log zero-fills its first spare segment (64 MiB) in the background; timing
        // during that would measure the start-up, not the transfer.
        wait_spare_ready(a_dir.path())?;
        wait_spare_ready(b_dir.path())?;
        let (a_addr, b_addr) = (a.local_addr()?, b.local_addr()?);
        define(
            a.broker(),
            &[
                ("Initiator", "//bench/Initiator"),
                ("RttClient", "//bench/RttClient"),
            ],
            &[("//bench/Target", b_addr), ("//bench/RttServer", b_addr)],
        )?;
        define(
            b.broker(),
            &[
                ("Target", "//bench/Target"),
                ("RttServer", "//bench/RttServer"),
            ],
            &[("//bench/Initiator", a_addr), ("//bench/RttClient", a_addr)],
        )?;
        Ok(Pair {
            a,
            b,
            dirs: (a_dir, b_dir),
        })
    }

    fn shutdown(self) -> BenchResult<()> {
        self.a.shutdown()?;
        self.b.shutdown()?;
        Ok(())
    }

    /// Waits until A's transmission queue is empty (everything acknowledged).
    fn wait_acknowledged(&self) -> BenchResult<()> {
        let started = Instant::now();
        while self.a.broker().transmission_queue_len() > 0 {
            if started.elapsed() > TIMEOUT {
                return Err("A's transmission queue did not empty".into());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    }
}

/// Waits until the log in node directory `dir` has a spare segment ready (`wal/*.spare`) and
/// none being prepared (`wal/*.zeroing`).
fn wait_spare_ready(dir: &Path) -> BenchResult<()> {
    let started = Instant::now();
    loop {
        let (mut ready, mut preparing) = (false, false);
        for entry in std::fs::read_dir(dir.join("wal"))? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            ready |= name.ends_with(".spare");
            preparing |= name.ends_with(".zeroing");
        }
        if ready && !preparing {
            return Ok(());
        }
        if started.elapsed() > TIMEOUT {
            return Err(format!("no spare segment ready in {}", dir.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn define(
    broker: &Broker,
    services: &[(&str, &str)],
    routes: &[(&str, SocketAddr)],
) -> BenchResult<()> {
    let mut tx = broker.begin();
    tx.create_message_type(REQUEST, Validation::None)?;
    tx.create_message_type(REPLY, Validation::None)?;
    tx.create_contract(
        CONTRACT,
        &[(REQUEST, SentBy::Initiator), (REPLY, SentBy::Target)],
    )?;
    for (queue, service) in services {
        tx.create_queue(queue, QueueOptions::default())?;
        tx.create_service(service, queue, &[CONTRACT])?;
    }
    for (service, addr) in routes {
        tx.create_route(Route {
            name: format!("to {service}"),
            service_name: Some((*service).into()),
            broker_instance: None,
            address: RouteAddress::parse(&format!("quic://{addr}"))?,
            expires_at_ms: None,
        })?;
    }
    tx.commit()?;
    Ok(())
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Receives (WAITFOR, committing) from `queue` until `count` messages came; with `reply`, answers
/// each in the same transaction.
fn drain(broker: &Broker, queue: &str, count: u64, reply: Option<&[u8]>) -> BenchResult<()> {
    let started = Instant::now();
    let mut got = 0u64;
    while got < count {
        if started.elapsed() > TIMEOUT {
            return Err(format!("only {got} of {count} messages reached {queue}").into());
        }
        let mut tx = broker.begin();
        let batch = tx.receive(queue, Receive::top(1000).wait(Duration::from_secs(1)))?;
        if let Some(body) = reply {
            for m in &batch {
                tx.send(m.conversation_handle, REPLY, body)?;
            }
        }
        tx.commit()?;
        got += batch.len() as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bulk transfer over 64 dialogs

fn bulk(
    settings: &Settings,
    root: &Path,
    runtime: &tokio::runtime::Runtime,
    floor: &RawQuicStream,
    (pipeline, durability): (Pipeline, Durability),
    messages: u64,
    report: &mut Report,
) -> BenchResult<()> {
    let bench = bulk_name(pipeline, durability);
    let pair = Pair::start(root, durability)?;
    let body = pattern(BODY_BYTES);
    // Untimed: the dialogs, the connection and the pinning by one message each.
    let mut tx = pair.a.broker().begin();
    let mut dialogs = Vec::with_capacity(DIALOGS);
    for _ in 0..DIALOGS {
        let h = tx.begin_dialog(
            "//bench/Initiator",
            "//bench/Target",
            CONTRACT,
            DialogOptions::default(),
        )?;
        tx.send(h, REQUEST, &body)?;
        dialogs.push(h);
    }
    tx.commit()?;
    drain(pair.b.broker(), "Target", DIALOGS as u64, None)?;
    pair.wait_acknowledged()?;

    let volume = messages * BODY_BYTES as u64;
    let mut perf = PerfControl::from_env();
    let (mut floor_secs, mut figure_secs) = (0.0, 0.0);
    let (mut floor_rates, mut figure_rates) = (Vec::new(), Vec::new());
    let (mut floor_cpu, mut figure_cpu) = (Some(Duration::ZERO), Some(Duration::ZERO));
    let mut figure_threads: BTreeMap<String, Duration> = BTreeMap::new();
    for _ in 0..settings.rounds {
        let before = CpuSnapshot::now();
        let elapsed = runtime.block_on(floor.transfer(volume, BODY_BYTES, TIMEOUT))?;
        let after = CpuSnapshot::now();
        floor_cpu = add_cpu(floor_cpu, before.process, after.process);
        floor_secs += elapsed.as_secs_f64();
        floor_rates.push(messages as f64 / elapsed.as_secs_f64());
        let (elapsed, cpu) = match pipeline {
            Pipeline::EndToEnd => {
                let elapsed = bulk_round(&mut perf, &pair, &dialogs, &body, messages)?;
                (elapsed, (after, CpuSnapshot::now()))
            }
            Pipeline::DeliveryOnly => delivery_round(&mut perf, &pair, &dialogs, &body, messages)?,
        };
        figure_cpu = add_cpu(figure_cpu, cpu.0.process, cpu.1.process);
        for (thread, spent) in cpu.1.threads_since(&cpu.0) {
            *figure_threads.entry(thread).or_default() += spent;
        }
        figure_secs += elapsed.as_secs_f64();
        figure_rates.push(messages as f64 / elapsed.as_secs_f64());
    }
    pair.shutdown()?;
    let total = messages as f64 * f64::from(settings.rounds);
    let floor_name = format!("floor/quinn_stream_1KiB ({bench})");
    let floor_figure = Figure::per_sec("1 KiB", total / floor_secs);
    report.floor(&floor_name, &floor_figure);
    println!(
        "{floor_name}: {}B/s of body bytes; rounds {} /s",
        si(volume as f64 * f64::from(settings.rounds) / floor_secs),
        spread(&floor_rates)
    );
    report.compare(
        &bench,
        &Figure::per_sec("msg", total / figure_secs),
        Some(("quinn stream floor", &floor_figure)),
        settings.target(Target::Ratio(0.5)),
    );
    println!("{bench}: rounds {} msg/s", spread(&figure_rates));
    // At 10 ms per tick, fewer than 10 ticks say little (test mode's tiny runs).
    const CPU_MEASURED_MIN: Duration = Duration::from_millis(100);
    if let (Some(figure_cpu), Some(floor_cpu)) = (figure_cpu, floor_cpu)
        && figure_cpu >= CPU_MEASURED_MIN
        && floor_cpu >= CPU_MEASURED_MIN
    {
        let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / total;
        println!(
            "{bench}: CPU per message {:.1} µs over both nodes (floor: {:.1} µs, {:.1}×); process \
             CPU time in 10 ms ticks, the nodes' background work included in both",
            per_message(figure_cpu),
            per_message(floor_cpu),
            per_message(figure_cpu) / per_message(floor_cpu)
        );
        let mut by_thread: Vec<(String, Duration)> = figure_threads.into_iter().collect();
        by_thread.sort_by_key(|(_, spent)| std::cmp::Reverse(*spent));
        let listed: Vec<String> = by_thread
            .iter()
            .filter(|(_, spent)| !spent.is_zero())
            .map(|(thread, spent)| format!("{thread} {:.2}", per_message(*spent)))
            .collect();
        println!(
            "{bench}: CPU per message by thread name (both nodes), µs: {}",
            listed.join(", ")
        );
    }
    Ok(())
}

/// CPU time (user + system) this process has used, and each of its threads by name (both
/// nodes' threads share names: they add up), from `/proc` (Linux, where the clock tick is
/// 10 ms); `None` and no threads where there is no such file.
struct CpuSnapshot {
    process: Option<Duration>,
    threads: BTreeMap<String, Duration>,
}

impl CpuSnapshot {
    fn now() -> CpuSnapshot {
        let mut threads: BTreeMap<String, Duration> = BTreeMap::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                if let Some((name, spent)) = stat_cpu(&task.path().join("stat")) {
                    *threads.entry(name).or_default() += spent;
                }
            }
        }
        CpuSnapshot {
            process: stat_cpu(Path::new("/proc/self/stat")).map(|(_, spent)| spent),
            threads,
        }
    }

    /// CPU time each thread name used since `earlier` (threads gone meanwhile are not seen).
    fn threads_since(&self, earlier: &CpuSnapshot) -> BTreeMap<String, Duration> {
        self.threads
            .iter()
            .map(|(name, spent)| {
                let before = earlier.threads.get(name).copied().unwrap_or_default();
                (name.clone(), spent.saturating_sub(before))
            })
            .collect()
    }
}

/// The command name and CPU time (user + system) of a `/proc` `stat` file.
fn stat_cpu(path: &Path) -> Option<(String, Duration)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name is in parentheses (and may hold spaces); after it: state, ppid, pgrp,
    // session, tty, tpgid, flags, 4 fault counts, then utime and stime.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((name, Duration::from_millis(ticks * 10)))
}

/// `sum` plus the CPU time between `before` and `after`, if all are known.
fn add_cpu(
    sum: Option<Duration>,
    before: Option<Duration>,
    after: Option<Duration>,
) -> Option<Duration> {
    Some(sum? + after?.checked_sub(before?)?)
}

/// A's route to B's target service (as `define` creates it).
fn target_route(pair: &Pair) -> BenchResult<Route> {
    Ok(Route {
        name: "to //bench/Target".into(),
        service_name: Some("//bench/Target".into()),
        broker_instance: None,
        address: RouteAddress::parse(&format!("quic://{}", pair.b.local_addr()?))?,
        expires_at_ms: None,
    })
}

/// One timed delivery: with A's route to B dropped, A sends `messages` (as `bulk_round` does,
/// untimed), then the route is created again and the time runs until A's transmission queue is
/// empty; B receives them afterwards. Returns the time and the process CPU time before and after
/// it.
type CpuSpan = (CpuSnapshot, CpuSnapshot);
fn delivery_round(
    perf: &mut PerfControl,
    pair: &Pair,
    dialogs: &[ConversationHandle],
    body: &[u8],
    messages: u64,
) -> BenchResult<(Duration, CpuSpan)> {
    let mut tx = pair.a.broker().begin();
    tx.drop_route("to //bench/Target")?;
    tx.commit()?;
    send_round_robin(pair.a.broker(), dialogs, body, messages)?;
    let queued = pair.a.broker().transmission_queue_len();
    if queued as u64 != messages {
        return Err(
            format!("{queued} of {messages} messages wait in A's transmission queue").into(),
        );
    }
    // The sends used up A's spare segments: the zero-fill of new ones belongs to them, not to
    // the delivery timed next.
    wait_spare_ready(pair.dirs.0.path())?;
    wait_spare_ready(pair.dirs.1.path())?;
    let before = CpuSnapshot::now();
    let started = Instant::now();
    perf.enable();
    let mut tx = pair.a.broker().begin();
    tx.create_route(target_route(pair)?)?;
    tx.commit()?;
    pair.wait_acknowledged()?;
    perf.disable();
    let elapsed = started.elapsed();
    let after = CpuSnapshot::now();
    drain(pair.b.broker(), "Target", messages, None)?;
    Ok((elapsed, (before, after)))
}

/// A sends `messages`, 100 per commit, round-robin over `dialogs`.
fn send_round_robin(
    broker: &Broker,
    dialogs: &[ConversationHandle],
    body: &[u8],
    messages: u64,
) -> BenchResult<()> {
    let mut sent = 0u64;
    let mut next = 0usize;
    while sent < messages {
        let mut tx = broker.begin();
        let batch = (messages - sent).min(SENDS_PER_TRANSACTION as u64);
        for _ in 0..batch {
            tx.send(dialogs[next % dialogs.len()], REQUEST, body)?;
            next += 1;
        }
        tx.commit()?;
        sent += batch;
    }
    Ok(())
}

/// One timed bulk transfer: A sends `messages` (100 per commit, round-robin over `dialogs`), B
/// drains them; done when B has them all and A's transmission queue is empty.
fn bulk_round(
    perf: &mut PerfControl,
    pair: &Pair,
    dialogs: &[ConversationHandle],
    body: &[u8],
    messages: u64,
) -> BenchResult<Duration> {
    let started = Instant::now();
    perf.enable();
    let done = std::thread::scope(|s| {
        let receiver =
            s.spawn(|| drain(pair.b.broker(), "Target", messages, None).map_err(|e| e.to_string()));
        send_round_robin(pair.a.broker(), dialogs, body, messages)?;
        receiver.join().map_err(|_| "receiver panicked")??;
        pair.wait_acknowledged()
    });
    perf.disable();
    done?;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Request/reply across nodes, durable

fn request_reply(settings: &Settings, root: &Path, report: &mut Report) -> BenchResult<()> {
    let pair = Pair::start(root, Durability::Sync)?;
    let body = pattern(256);
    let mut tx = pair.a.broker().begin();
    let h = tx.begin_dialog(
        "//bench/RttClient",
        "//bench/RttServer",
        CONTRACT,
        DialogOptions::default(),
    )?;
    tx.commit()?;

    let floor_dir = scratch::temp_dir(root, "nodes-fdatasync-")?;
    let mut fdatasync = OverwriteSync::new(floor_dir.path(), 4096, 64 << 20)?;
    let floor = fdatasync.run(settings.fdatasync_run)?;
    drop(fdatasync);
    floor_dir.close()?;

    // Warm-up (connection, pinning), then the samples.
    let warm_up = 20u64.min(settings.round_trips);
    let total = warm_up + settings.round_trips;
    let mut samples = Vec::with_capacity(settings.round_trips as usize);
    std::thread::scope(|s| -> BenchResult<()> {
        let server = s.spawn(|| {
            drain(pair.b.broker(), "RttServer", total, Some(&body)).map_err(|e| e.to_string())
        });
        for i in 0..total {
            let t0 = Instant::now();
            let mut tx = pair.a.broker().begin();
            tx.send(h, REQUEST, &body)?;
            tx.commit()?;
            let mut tx = pair.a.broker().begin();
            let reply = tx.receive("RttClient", Receive::top(1).wait(TIMEOUT))?;
            tx.commit()?;
            if reply.len() != 1 {
                return Err("no reply".into());
            }
            if i >= warm_up {
                samples.push(t0.elapsed());
            }
        }
        server.join().map_err(|_| "server panicked")??;
        Ok(())
    })?;
    pair.shutdown()?;
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let (p50, p99) = (at(0.5), at(0.99));
    let floor_rtt = floor.per_op() * 2;
    let floor_figure = Figure::seconds("2 × fdatasync", floor_rtt.as_secs_f64());
    report.floor("floor/2×fdatasync_4KiB", &floor_figure);
    println!(
        "floor/2×fdatasync_4KiB: {} fdatasync/s ({:.2?} each); loopback network not included",
        si(floor.ops_per_sec()),
        floor.per_op()
    );
    println!(
        "{RTT_NAME}: durable commits on the critical path: 5 (A's send, B's arrival, B's receive \
         + reply, A's arrival, A's receive); an arrival is receivable once written and the \
         receive's commit makes it durable too, so 3 fdatasyncs follow each other (A's send, B's \
         receive + reply, A's receive) = {:.2?} of fdatasync alone (5 × = {:.2?})",
        floor.per_op() * 3,
        floor.per_op() * 5
    );
    report.compare(
        &format!("{RTT_NAME} p50"),
        &Figure::seconds("round trip", p50.as_secs_f64()),
        Some(("2 × fdatasync", &floor_figure)),
        settings.target(Target::AtMost(1e-3)),
    );
    report.compare(
        &format!("{RTT_NAME} p99"),
        &Figure::seconds("round trip", p99.as_secs_f64()),
        Some(("2 × fdatasync", &floor_figure)),
        None,
    );
    println!(
        "{RTT_NAME}: {} round trips; min {:.2?}, p50 {p50:.2?}, p99 {p99:.2?}, max {:.2?}",
        samples.len(),
        samples[0],
        samples[samples.len() - 1]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Settings

/// What to run and how big: from the command line (mode, filter) and the environment.
#[derive(Debug)]
struct Settings {
    invocation: Invocation,
    sync_messages: u64,
    none_messages: u64,
    rounds: u32,
    round_trips: u64,
    fdatasync_run: Duration,
}

impl Settings {
    /// | variable | default | |
    /// |---|---|---|
    /// | `HERALD_BENCH_NODES_SYNC_MESSAGES` | 20000 | bulk messages per round, `Sync` |
    /// | `HERALD_BENCH_NODES_NONE_MESSAGES` | 50000 | bulk messages per round, `None` |
    /// | `HERALD_BENCH_ROUNDS` | 3 | rounds, each figure interleaved with its floor |
    /// | `HERALD_BENCH_NODES_ROUND_TRIPS` | 2000 | request/reply samples |
    ///
    /// Without `--bench` (test mode): 200 messages, one round, 20 round trips.
    fn from_env() -> BenchResult<Settings> {
        let invocation = Invocation::from_args();
        let bench = invocation.bench;
        let settings = Settings {
            sync_messages: env_u64(
                "HERALD_BENCH_NODES_SYNC_MESSAGES",
                if bench { 20_000 } else { 200 },
            )?,
            none_messages: env_u64(
                "HERALD_BENCH_NODES_NONE_MESSAGES",
                if bench { 50_000 } else { 200 },
            )?,
            rounds: env_u64("HERALD_BENCH_ROUNDS", if bench { 3 } else { 1 })?.try_into()?,
            round_trips: env_u64(
                "HERALD_BENCH_NODES_ROUND_TRIPS",
                if bench { 2000 } else { 20 },
            )?,
            fdatasync_run: if bench {
                Duration::from_secs(2)
            } else {
                Duration::from_millis(20)
            },
            invocation,
        };
        if settings.rounds == 0
            || settings.sync_messages == 0
            || settings.none_messages == 0
            || settings.round_trips == 0
        {
            return Err("rounds, message counts and round trips must be positive".into());
        }
        Ok(settings)
    }

    fn target(&self, target: Target) -> Option<Target> {
        self.invocation.bench.then_some(target)
    }
}
