//! `herald bench`: a load tool. Producers SEND on a set of dialogs, consumers RECEIVE (WAITFOR)
//! from the target queue, each message in a transaction of its own on the sending side and
//! batches of up to `RECEIVE_TOP` per transaction on the receiving side; the final table gives
//! messages sent and received, msgs/s, MB/s, and end-to-end latency percentiles (`--json`: the
//! same figures as one JSON object).
//!
//! Against an embedded broker (default: a temporary directory; `--data-dir` to choose one,
//! `--durability` for its commits) the threads use the engine's transactions directly; against
//! a node (`--node`) each thread has its own client connection.
//!
//! Latency is send-to-receive: each body starts with the time its send was due (nanoseconds
//! since the run began, 8 bytes, little-endian), and a consumer records, once its RECEIVE has
//! committed, the time since then. With `--rate`, each producer keeps a schedule (its k-th
//! message is due at `k × producers / rate` seconds) and stamps the time a message was *due*,
//! not when it went: a stall delays the messages behind it, and they count the delay, as wrk2
//! and HdrHistogram correct for coordinated omission. Without `--rate` producers send as fast
//! as their commits return, each message stamped when its send began: those latencies are
//! service times under saturation, and the report says so.
//!
//! The run's objects (a message type, a contract, two queues, two services) are named with a
//! random run id and dropped at the end, after its dialogs are ended WITH CLEANUP, so a bench
//! against a node or a kept data directory leaves nothing behind. Messages still in flight when
//! the consumers give up (`DRAIN_TIMEOUT`) are counted as sent and not received.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use herald_engine::sql::{ResultSet, Value};
use herald_engine::{Broker, ConversationHandle, Receive};

use herald_net::Client;

use crate::output::{self, TableOptions};
use crate::remote::Remote;
use crate::target::{Embedded, Target};

/// Most dialogs a run begins (one setup script; the parser allows `sql::STATEMENTS_MAX`
/// statements and each dialog takes two).
pub const DIALOGS_MAX: usize = 10_000;
/// Most producer or consumer threads.
pub const THREADS_MAX: usize = 256;
/// Messages one RECEIVE takes at most.
const RECEIVE_TOP: usize = 64;
/// How long a consumer's WAITFOR waits before it looks whether the run is over.
const RECEIVE_WAIT: Duration = Duration::from_millis(100);
/// How long consumers keep receiving after the producers stopped, for messages in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of the send-time stamp at the start of each body (the least `--message-bytes`).
const STAMP_BYTES: usize = 8;
/// Largest latency the histogram holds, in microseconds (larger ones count as this).
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits the histogram keeps (0.1 % resolution).
const HISTOGRAM_DIGITS: u8 = 3;
/// How often the progress line is refreshed.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Load a node at this address (with the admin credentials in --data-dir) instead of an
    /// embedded broker.
    #[arg(long, value_name = "ADDR")]
    pub node: Option<String>,
    /// Embedded: the data directory (default: a temporary one, removed after). With --node:
    /// the node's data directory, for its local admin credentials (default ./herald-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Embedded: commit durability, sync | none | batched-<ms> (default sync). A node's is
    /// its configuration's.
    #[arg(long, conflicts_with = "node")]
    pub durability: Option<String>,
    /// Threads sending, each message in its own transaction.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Threads receiving (WAITFOR RECEIVE TOP (64)), one transaction per batch.
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Dialogs the producers share (at least one per producer).
    #[arg(long, default_value_t = 16)]
    pub dialogs: usize,
    /// Bytes of each message body (at least 8: the send-time stamp).
    #[arg(long, default_value_t = 128)]
    pub message_bytes: usize,
    /// Seconds the producers send for.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,
    /// Target rate over all producers, in messages per second (latency is then measured from
    /// each message's intended send time).
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub rate: Option<f64>,
    /// Print the progress line even when stderr is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// Print the figures as one JSON object instead of the tables (for scripts and CI).
    #[arg(long)]
    pub json: bool,
}

/// `herald bench`; returns the exit code.
pub fn run(args: &BenchArgs) -> u8 {
    match run_bench(args) {
        Ok(report) => {
            out!("{report}");
            crate::exec::EXIT_OK
        }
        Err(message) => {
            eprintln!("herald bench: {message}");
            crate::exec::EXIT_STATEMENT_FAILED
        }
    }
}

fn run_bench(args: &BenchArgs) -> Result<String, String> {
    check(args)?;
    match &args.node {
        Some(node) => run_on_node(args, node),
        None => run_embedded(args),
    }
}

fn run_on_node(args: &BenchArgs, node: &str) -> Result<String, String> {
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::target::DEFAULT_DATA_DIR));
    let connect = || Remote::connect(node, &data_dir).map_err(|e| e.message);
    let mut setup = connect()?;
    let names = Names::new();
    let handles = names.set_up(&mut setup, args.dialogs)?;
    let target = format!("node at {node} (its own durability), one client connection per thread");
    let report = load(args, &handles, &target, || {
        Ok(NodeLoad {
            client: connect()?.into_client(),
            names: &names,
        })
    });
    let cleanup = names.clean_up(&mut setup);
    setup.into_client().close();
    let report = report?;
    cleanup?;
    Ok(report)
}

fn run_embedded(args: &BenchArgs) -> Result<String, String> {
    let durability_name = args.durability.as_deref().unwrap_or("sync");
    let durability = crate::config::parse_durability(durability_name)?;
    let (_temp, dir) = match &args.data_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("herald-bench-")
                .tempdir()
                .map_err(|e| format!("creating a temporary data directory: {e}"))?;
            let dir = temp.path().to_path_buf();
            (Some(temp), dir)
        }
    };
    let broker = Broker::open(
        &dir,
        herald_engine::Options {
            durability,
            ..herald_engine::Options::default()
        },
    )
    .map_err(|e| format!("opening {}: {e}", dir.display()))?;
    let names = Names::new();
    let mut setup = Embedded::new(&broker);
    let handles = names.set_up(&mut setup, args.dialogs)?;
    let target = format!(
        "embedded broker in {}, durability {durability_name}",
        dir.display(),
    );
    let report = {
        let broker = &broker;
        let names = &names;
        load(args, &handles, &target, || {
            Ok(EmbeddedLoad { broker, names })
        })
    };
    let cleanup = names.clean_up(&mut setup);
    drop(setup);
    broker
        .close()
        .map_err(|e| format!("closing {}: {e}", dir.display()))?;
    let report = report?;
    cleanup?;
    Ok(report)
}

/// Longest `--duration`: a year (longer ones do not fit a `Duration` from floating seconds,
/// or make no sense).
const DURATION_SECONDS_MAX: f64 = 365.0 * 24.0 * 3600.0;

fn check(args: &BenchArgs) -> Result<(), String> {
    let threads = 1..=THREADS_MAX;
    if !threads.contains(&args.producers) || !threads.contains(&args.consumers) {
        return Err(format!(
            "--producers and --consumers must be 1 to {THREADS_MAX}"
        ));
    }
    if args.dialogs < args.producers || args.dialogs > DIALOGS_MAX {
        return Err(format!(
            "--dialogs must be at least --producers ({}) and at most {DIALOGS_MAX}",
            args.producers
        ));
    }
    if args.message_bytes < STAMP_BYTES
        || args.message_bytes > herald_engine::MESSAGE_BODY_BYTES_MAX
    {
        return Err(format!(
            "--message-bytes must be {STAMP_BYTES} to {} (the body carries an {STAMP_BYTES}-byte \
             send-time stamp)",
            herald_engine::MESSAGE_BODY_BYTES_MAX
        ));
    }
    if !(args.duration > 0.0 && args.duration <= DURATION_SECONDS_MAX) {
        return Err(format!(
            "--duration must be a positive number of seconds, at most {DURATION_SECONDS_MAX}"
        ));
    }
    if let Some(rate) = args.rate
        && !(rate > 0.0 && rate.is_finite())
    {
        return Err("--rate must be a positive number of messages per second".into());
    }
    Ok(())
}

/// What a producer or consumer thread does, on its own connection (or the embedded broker).
trait Load: Send {
    /// SENDs `body` on `handle` and commits.
    fn send(&mut self, handle: u128, body: &[u8]) -> Result<(), String>;
    /// One WAITFOR RECEIVE from the target queue, committed; the stamps of the bodies taken.
    fn receive(&mut self, wait: Duration, stamps: &mut Vec<u64>) -> Result<(), String>;
    /// Done: lets go of what it holds (a node's session, at once).
    fn finish(self)
    where
        Self: Sized,
    {
    }
}

struct EmbeddedLoad<'b> {
    broker: &'b Broker,
    names: &'b Names,
}

impl Load for EmbeddedLoad<'_> {
    fn send(&mut self, handle: u128, body: &[u8]) -> Result<(), String> {
        let mut tx = self.broker.begin();
        tx.send(ConversationHandle(handle), &self.names.message_type, body)
            .map_err(|e| format!("SEND: {e}"))?;
        tx.commit().map_err(|e| format!("committing a SEND: {e}"))
    }

    fn receive(&mut self, wait: Duration, stamps: &mut Vec<u64>) -> Result<(), String> {
        let mut tx = self.broker.begin();
        let batch = tx
            .receive(
                &self.names.target_queue,
                Receive::top(RECEIVE_TOP).wait(wait),
            )
            .map_err(|e| format!("RECEIVE: {e}"))?;
        stamps.extend(batch.iter().filter_map(|m| stamp_of(m.body())));
        tx.commit()
            .map_err(|e| format!("committing a RECEIVE: {e}"))
    }
}

struct NodeLoad<'n> {
    client: Client,
    names: &'n Names,
}

impl Load for NodeLoad<'_> {
    // Each in a transaction of its own, committed by the node in the same round trip (a
    // client-side BEGIN … COMMIT around it would cost two more).
    fn send(&mut self, handle: u128, body: &[u8]) -> Result<(), String> {
        self.client
            .send(ConversationHandle(handle), &self.names.message_type, body)
            .map_err(|e| format!("SEND: {e}"))
    }

    fn receive(&mut self, wait: Duration, stamps: &mut Vec<u64>) -> Result<(), String> {
        let batch = self
            .client
            .receive(
                &self.names.target_queue,
                Receive::top(RECEIVE_TOP).wait(wait),
            )
            .map_err(|e| format!("RECEIVE: {e}"))?;
        stamps.extend(batch.iter().filter_map(|m| stamp_of(&m.body)));
        Ok(())
    }

    fn finish(self) {
        self.client.close();
    }
}

/// The run's object names, unique to it.
#[derive(Debug)]
struct Names {
    message_type: String,
    contract: String,
    initiator_queue: String,
    target_queue: String,
    initiator_service: String,
    target_service: String,
}

impl Names {
    fn new() -> Names {
        let run = run_id();
        Names {
            message_type: format!("//herald/bench/{run}/Message"),
            contract: format!("//herald/bench/{run}/Contract"),
            initiator_queue: format!("herald_bench_{run}_initiator"),
            target_queue: format!("herald_bench_{run}_target"),
            initiator_service: format!("//herald/bench/{run}/Initiator"),
            target_service: format!("//herald/bench/{run}/Target"),
        }
    }

    /// Creates the objects and begins `dialogs` dialogs, in one transaction; their initiator
    /// handles.
    fn set_up(&self, target: &mut dyn Target, dialogs: usize) -> Result<Vec<u128>, String> {
        let Names {
            message_type,
            contract,
            initiator_queue,
            target_queue,
            initiator_service,
            target_service,
        } = self;
        // One transaction: a setup that fails leaves nothing (the session's end rolls it back).
        let mut script = format!(
            "BEGIN TRANSACTION;\n\
             CREATE MESSAGE TYPE [{message_type}] VALIDATION = NONE;\n\
             CREATE CONTRACT [{contract}] ([{message_type}] SENT BY INITIATOR);\n\
             CREATE QUEUE [{initiator_queue}];\n\
             CREATE QUEUE [{target_queue}];\n\
             CREATE SERVICE [{initiator_service}] ON QUEUE [{initiator_queue}];\n\
             CREATE SERVICE [{target_service}] ON QUEUE [{target_queue}] ([{contract}]);\n\
             DECLARE @h UNIQUEIDENTIFIER;\n"
        );
        for _ in 0..dialogs {
            script.push_str(&format!(
                "BEGIN DIALOG @h FROM SERVICE [{initiator_service}] TO SERVICE \
                 '{target_service}' ON CONTRACT [{contract}];\nSELECT @h AS h;\n"
            ));
        }
        script.push_str("COMMIT;\n");
        let outcome = target.execute_script(&script);
        if let Some(error) = outcome.error {
            return Err(format!("setting up: {}", error.message));
        }
        let handles: Vec<u128> = outcome
            .results
            .iter()
            .filter_map(|r| r.result.as_ref()?.rows.first()?.first()?.as_guid())
            .collect();
        if handles.len() != dialogs {
            return Err(format!(
                "setting up: {} dialog handles came back for {dialogs} dialogs",
                handles.len()
            ));
        }
        Ok(handles)
    }

    /// Ends the run's dialogs (both sides, WITH CLEANUP) and drops its objects.
    fn clean_up(&self, target: &mut dyn Target) -> Result<(), String> {
        let failed = |error: crate::target::ScriptError| format!("cleaning up: {}", error.message);
        let listed = target.execute_script(&format!(
            "SELECT conversation_handle FROM sys.conversation_endpoints WHERE service_name = \
             N'{}';\nSELECT conversation_handle FROM sys.conversation_endpoints WHERE \
             service_name = N'{}';",
            self.initiator_service, self.target_service
        ));
        if let Some(error) = listed.error {
            return Err(failed(error));
        }
        let mut script = String::new();
        for result in &listed.results {
            for row in result.result.iter().flat_map(|set| &set.rows) {
                if let Some(Value::Guid(handle)) = row.first() {
                    let text = Value::Guid(*handle).to_string();
                    script.push_str(&format!("END CONVERSATION '{text}' WITH CLEANUP;\n"));
                }
            }
        }
        script.push_str(&format!(
            "DROP SERVICE [{0}];\nDROP SERVICE [{1}];\nDROP QUEUE [{2}];\nDROP QUEUE [{3}];\n\
             DROP CONTRACT [{4}];\nDROP MESSAGE TYPE [{5}];\n",
            self.initiator_service,
            self.target_service,
            self.initiator_queue,
            self.target_queue,
            self.contract,
            self.message_type
        ));
        match target.execute_script(&script).error {
            None => Ok(()),
            Some(error) => Err(failed(error)),
        }
    }
}

/// What the threads share.
struct Shared {
    base: Instant,
    sent: AtomicU64,
    received: AtomicU64,
    /// Set when the producers are done (their deadline passed, or one failed).
    producers_done: AtomicBool,
    /// Set when every thread must stop (the run is over, or a thread failed).
    stop: AtomicBool,
    /// Nanoseconds since `base` of the last message received.
    last_receive_ns: AtomicU64,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, message: String) {
        self.error
            .lock()
            .expect("no thread panics holding it")
            .get_or_insert(message);
        self.producers_done.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Runs the producers and consumers, each with its own `Load` from `connect`, and reports.
fn load<L: Load>(
    args: &BenchArgs,
    handles: &[u128],
    target: &str,
    connect: impl Fn() -> Result<L, String>,
) -> Result<String, String> {
    // Every connection is made before the clock starts: handshakes are not latency.
    let mut producer_loads = (0..args.producers)
        .map(|_| connect())
        .collect::<Result<Vec<L>, String>>()?;
    let mut consumer_loads = (0..args.consumers)
        .map(|_| connect())
        .collect::<Result<Vec<L>, String>>()?;
    let shared = Shared {
        base: Instant::now(),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        producers_done: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        last_receive_ns: AtomicU64::new(0),
        error: Mutex::new(None),
    };
    let duration = Duration::from_secs_f64(args.duration);
    let progress = args.progress || std::io::stderr().is_terminal();
    let histogram = std::thread::scope(|scope| {
        let shared = &shared;
        let producers: Vec<_> = producer_loads
            .drain(..)
            .enumerate()
            .map(|(index, load)| {
                let mine: Vec<u128> = handles
                    .iter()
                    .skip(index)
                    .step_by(args.producers)
                    .copied()
                    .collect();
                scope.spawn(move || {
                    let mut load = load;
                    produce(args, index, &mine, duration, shared, &mut load);
                    load.finish();
                })
            })
            .collect();
        let consumers: Vec<_> = consumer_loads
            .drain(..)
            .map(|mut load| {
                scope.spawn(move || {
                    let histogram = consume(shared, &mut load);
                    load.finish();
                    histogram
                })
            })
            .collect();
        let progress_thread = progress.then(|| scope.spawn(move || show_progress(shared)));
        for producer in producers {
            if producer.join().is_err() {
                shared.fail("a producer panicked".into());
            }
        }
        shared.producers_done.store(true, Ordering::SeqCst);
        let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
        // The consumers stop once they received all that was sent, or at the drain deadline.
        while !shared.stop.load(Ordering::SeqCst) {
            if shared.received.load(Ordering::SeqCst) >= shared.sent.load(Ordering::SeqCst)
                || Instant::now() >= drain_deadline
            {
                shared.stop.store(true, Ordering::SeqCst);
                break;
            }
            std::thread::sleep(RECEIVE_WAIT / 4);
        }
        let mut total = new_histogram();
        for consumer in consumers {
            match consumer.join() {
                Ok(histogram) => {
                    total
                        .add(&histogram)
                        .expect("histograms of the same bounds add");
                }
                Err(_) => shared.fail("a consumer panicked".into()),
            }
        }
        if let Some(thread) = progress_thread {
            let _ = thread.join();
        }
        total
    });
    if let Some(error) = shared.error.lock().expect("threads are joined").take() {
        return Err(error);
    }
    Ok(report(args, target, &shared, &histogram))
}

fn produce(
    args: &BenchArgs,
    index: usize,
    handles: &[u128],
    duration: Duration,
    shared: &Shared,
    load: &mut impl Load,
) {
    let mut body = vec![0u8; args.message_bytes];
    // With a rate: this producer's interval, and its first message's offset (producers
    // interleave their schedules).
    let interval_ns = args.rate.map(|rate| args.producers as f64 / rate * 1e9);
    let offset_ns = interval_ns.map_or(0.0, |i| i * index as f64 / args.producers as f64);
    let end_ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    let mut sent: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        let stamp = match interval_ns {
            Some(interval) => {
                let due = (offset_ns + interval * sent as f64) as u64;
                if due >= end_ns {
                    break;
                }
                let now = shared.now_ns();
                if due > now {
                    std::thread::sleep(Duration::from_nanos(due - now));
                }
                due
            }
            None => {
                let now = shared.now_ns();
                if now >= end_ns {
                    break;
                }
                now
            }
        };
        body[..STAMP_BYTES].copy_from_slice(&stamp.to_le_bytes());
        let handle = handles[(sent % handles.len() as u64) as usize];
        if let Err(e) = load.send(handle, &body) {
            shared.fail(e);
            return;
        }
        sent += 1;
        shared.sent.fetch_add(1, Ordering::SeqCst);
    }
}

fn consume(shared: &Shared, load: &mut impl Load) -> Histogram<u64> {
    let mut histogram = new_histogram();
    let mut stamps = Vec::with_capacity(RECEIVE_TOP);
    while !shared.stop.load(Ordering::SeqCst) {
        stamps.clear();
        if let Err(e) = load.receive(RECEIVE_WAIT, &mut stamps) {
            shared.fail(e);
            break;
        }
        if stamps.is_empty() {
            continue;
        }
        let now = shared.now_ns();
        for stamp in &stamps {
            histogram.saturating_record((now.saturating_sub(*stamp) / 1000).max(1));
        }
        shared
            .received
            .fetch_add(stamps.len() as u64, Ordering::SeqCst);
        shared.last_receive_ns.fetch_max(now, Ordering::SeqCst);
    }
    histogram
}

fn show_progress(shared: &Shared) {
    let terminal = std::io::stderr().is_terminal();
    let (mut last_sent, mut last_received, mut last) = (0, 0, Instant::now());
    loop {
        let next = Instant::now() + PROGRESS_INTERVAL;
        while Instant::now() < next && !shared.stop.load(Ordering::SeqCst) {
            std::thread::sleep(PROGRESS_INTERVAL / 20);
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let (sent, received) = (
            shared.sent.load(Ordering::SeqCst),
            shared.received.load(Ordering::SeqCst),
        );
        let seconds = last.elapsed().as_secs_f64();
        let line = format!(
            "{:>5.0} s: sent {sent} ({:.0} msgs/s), received {received} ({:.0} msgs/s)",
            shared.base.elapsed().as_secs_f64(),
            (sent - last_sent) as f64 / seconds,
            (received - last_received) as f64 / seconds,
        );
        if terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        (last_sent, last_received, last) = (sent, received, Instant::now());
    }
    if terminal {
        eprint!("\r\x1b[K");
    }
}

/// The figures of a run against `target` (what was loaded, for the heading).
fn report(args: &BenchArgs, target: &str, shared: &Shared, histogram: &Histogram<u64>) -> String {
    let sent = shared.sent.load(Ordering::SeqCst);
    let received = shared.received.load(Ordering::SeqCst);
    let elapsed_s = (shared.last_receive_ns.load(Ordering::SeqCst) as f64 / 1e9).max(1e-9);
    let msgs_per_s = received as f64 / elapsed_s;
    let mb_per_s = msgs_per_s * args.message_bytes as f64 / 1e6;
    if args.json {
        let quantile = |p: f64| histogram.value_at_quantile(p);
        let summary = serde_json::json!({
            "target": target,
            "producers": args.producers,
            "consumers": args.consumers,
            "dialogs": args.dialogs,
            "message_bytes": args.message_bytes,
            "duration_s": args.duration,
            "rate_msgs_per_s": args.rate,
            "sent": sent,
            "received": received,
            "not_received": sent.saturating_sub(received),
            "seconds": elapsed_s,
            "msgs_per_s": msgs_per_s,
            "mb_per_s": mb_per_s,
            // "intended": from each message's due time on the --rate schedule (corrected for
            // coordinated omission); "service": from when its send began, under saturation.
            "latency_from": if args.rate.is_some() { "intended" } else { "service" },
            "latency_us": {
                "p50": quantile(0.5),
                "p90": quantile(0.9),
                "p99": quantile(0.99),
                "p99_9": quantile(0.999),
                "max": histogram.max(),
            },
        });
        return format!("{summary}\n");
    }
    let int = |n: u64| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
    let text = |s: String| Value::Text(s);
    let throughput = ResultSet {
        columns: ["sent", "received", "seconds", "msgs/s", "MB/s"]
            .map(String::from)
            .to_vec(),
        rows: vec![vec![
            int(sent),
            int(received),
            text(format!("{elapsed_s:.2}")),
            text(format!("{msgs_per_s:.0}")),
            text(format!("{mb_per_s:.2}")),
        ]],
    };
    let percentile = |p: f64| int(histogram.value_at_quantile(p / 100.0));
    let latency = ResultSet {
        columns: ["latency_us", "p50", "p90", "p99", "p99.9", "max"]
            .map(String::from)
            .to_vec(),
        rows: vec![vec![
            text("send to receive".into()),
            percentile(50.0),
            percentile(90.0),
            percentile(99.0),
            percentile(99.9),
            int(histogram.max()),
        ]],
    };
    let mut out = format!(
        "herald bench: {target}\n{} producer(s), {} consumer(s), {} dialog(s), {}-byte bodies, \
         {} s{}\n\n",
        args.producers,
        args.consumers,
        args.dialogs,
        args.message_bytes,
        args.duration,
        match args.rate {
            Some(rate) => format!(", target rate {rate} msgs/s"),
            None => String::new(),
        }
    );
    out.push_str(&output::render_table_aligned(
        &throughput,
        TableOptions::default(),
        &[true; 5],
    ));
    out.push('\n');
    out.push_str(&output::render_table(&latency, TableOptions::default()));
    out.push('\n');
    out.push_str(match args.rate {
        Some(_) => {
            "Latency is measured from each message's intended send time on the --rate \
             schedule (corrected for coordinated omission), to its committed RECEIVE.\n"
        }
        None => {
            "Latencies are service times: without --rate, each is measured from when its send \
             began, under saturation (not corrected for coordinated omission).\n"
        }
    });
    if received < sent {
        out.push_str(&format!(
            "{} message(s) were sent and not received within {} s of the producers stopping.\n",
            sent - received,
            DRAIN_TIMEOUT.as_secs()
        ));
    }
    out.push_str(
        "seconds: from the start to the last message received; msgs/s and MB/s (bodies, 10^6 \
         bytes) are received messages over that.\n",
    );
    out
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, HISTOGRAM_DIGITS)
        .expect("the bounds are valid constants")
}

fn stamp_of(body: &[u8]) -> Option<u64> {
    let stamp: [u8; STAMP_BYTES] = body.get(..STAMP_BYTES)?.try_into().ok()?;
    Some(u64::from_le_bytes(stamp))
}

/// A random id for the run's object names (16 hex digits): half of a random (UUID v4)
/// conversation id, so two runs never share one in practice, which is all the names need.
fn run_id() -> String {
    format!("{:016x}", herald_engine::ConversationId::random().0 as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_reports_percentiles_within_its_precision() {
        let mut histogram = new_histogram();
        for us in 1..=10_000u64 {
            histogram.saturating_record(us);
        }
        let p50 = histogram.value_at_quantile(0.5);
        assert!((4_995..=5_005).contains(&p50), "p50 {p50}");
        let p99 = histogram.value_at_quantile(0.99);
        assert!((9_890..=9_910).contains(&p99), "p99 {p99}");
        histogram.saturating_record(u64::MAX);
        assert!(histogram.max() >= LATENCY_US_MAX);
    }

    #[test]
    fn a_stamp_round_trips_through_a_body() {
        let mut body = vec![0u8; 16];
        body[..STAMP_BYTES].copy_from_slice(&123_456_789u64.to_le_bytes());
        assert_eq!(stamp_of(&body), Some(123_456_789));
        assert_eq!(stamp_of(&[1, 2]), None);
    }
}
