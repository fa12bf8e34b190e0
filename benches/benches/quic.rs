//! Benchmarks of the QUIC transport (`herald_net::quic`), each beside its floor measured in the
//! same run.
//!
//! Driven by `cargo bench -p herald-benches --bench quic`:
//!
//! - `quic/messages_{1KiB,64KiB}`: node A sends messages of that body size to node B over two
//!   transports on loopback (mutual TLS, pinned fingerprints); B's stand-in engine acknowledges
//!   each as it arrives; a message counts when A sees its `Acknowledged`. Against the floor
//!   `floor/quinn_stream`: the same body bytes written on one raw quinn stream between two
//!   endpoints with the same TLS and transport configuration, in `TRANSMIT_BYTES_MAX` writes,
//!   no protocol, timed until the receiver has read them all and answered one byte.
//!
//! Each figure and its floor run in interleaved rounds of the same byte volume, on the same
//! connection pair set up before timing (the handshake is not timed). Printed: MB/s of body
//! bytes and messages/s, and the ratio to the floor (the floor's messages/s is its byte rate
//! over the body size: what the wire could carry). No targets are set yet: these are the
//! first figures. With 1 KiB bodies the per-message work (header encoding, session
//! bookkeeping, one event and one acknowledgement per message, ~130 bytes of frame header per
//! message on the wire) dominates; with 64 KiB bodies the transport runs at the floor.
//!
//! Under `cargo test --benches` everything runs once on a tiny volume as a smoke test. Sizes by
//! environment variable, see [`Settings::from_env`]; a filter argument selects by name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_benches::floors::pattern;
use herald_benches::measure::{CpuSnapshot, si};
use herald_benches::quic_floor::RawQuicStream;
use herald_benches::report::{Figure, Report};
use herald_benches::settings::{Invocation, env_f64, env_u64};
use herald_net::identity::{NodeIdentity, Trust};
use herald_net::proto::{Event, MessageHeader, OutgoingMessage, TRANSMIT_BYTES_MAX};
use herald_net::quic::{Events, PeerKey, Transport, TransportConfig, TransportEvent};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Body sizes measured.
const BODY_BYTES: [usize; 2] = [1024, 64 * 1024];
/// Conversations the messages are spread over (each its own sequence).
const CONVERSATIONS: u64 = 16;
/// Messages A keeps handed to its transport and unacknowledged: below the session's
/// `SEND_QUEUE_MESSAGES_MAX`, as an engine feeding its transmission queue would.
const OUTSTANDING_MESSAGES_MAX: u64 = 20_000;
/// Bound of any one round: only a hang reaches it.
const ROUND_TIMEOUT: Duration = Duration::from_secs(600);

fn main() {
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("bench settings: {e}");
            std::process::exit(2);
        }
    };
    if settings.invocation.list {
        for body_bytes in BODY_BYTES {
            println!("{}: benchmark", name(body_bytes));
        }
        return;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(&settings)) {
        eprintln!("benchmark failed: {e}");
        std::process::exit(1);
    }
}

fn name(body_bytes: usize) -> String {
    format!("quic/messages_{}KiB", body_bytes / 1024)
}

async fn run(settings: &Settings) -> BenchResult<()> {
    let idle = CpuSnapshot::now();
    tokio::time::sleep(Duration::from_millis(if settings.invocation.bench {
        500
    } else {
        10
    }))
    .await;
    println!(
        "herald-benches quic: {} mode, loopback, {} CPUs; {} MiB of body bytes per round, {} \
         interleaved rounds; before starting, {}",
        if settings.invocation.bench {
            "bench"
        } else {
            "test (tiny sizes)"
        },
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        settings.round_bytes >> 20,
        settings.rounds,
        idle.elapsed()
            .others_summary(Duration::from_millis(if settings.invocation.bench {
                500
            } else {
                10
            })),
    );
    let mut report = Report::new();
    let floor = RawQuicStream::connect().await?;
    let pair = Pair::connect().await?;
    for body_bytes in BODY_BYTES {
        let name = name(body_bytes);
        if !settings.invocation.selected(&name) {
            continue;
        }
        let count = (settings.round_bytes / body_bytes as u64).max(1);
        let volume = count * body_bytes as u64;
        let (mut floor_secs, mut figure_secs) = (0.0, 0.0);
        let (mut floor_rates, mut figure_rates) = (Vec::new(), Vec::new());
        for _ in 0..settings.rounds {
            let elapsed = floor
                .transfer(volume, TRANSMIT_BYTES_MAX, ROUND_TIMEOUT)
                .await?;
            floor_secs += elapsed.as_secs_f64();
            floor_rates.push(volume as f64 / elapsed.as_secs_f64());
            let elapsed = pair.transfer(body_bytes, count).await?;
            figure_secs += elapsed.as_secs_f64();
            figure_rates.push(volume as f64 / elapsed.as_secs_f64());
        }
        let total = volume as f64 * f64::from(settings.rounds);
        let floor_bytes = Figure::bytes_per_sec("quinn stream", total / floor_secs);
        report.floor(&format!("floor/quinn_stream ({name})"), &floor_bytes);
        println!("  floor rounds: {}", spread(&floor_rates));
        let figure_bytes = Figure::bytes_per_sec("messages", total / figure_secs);
        report.compare(
            &format!("{name} MB/s"),
            &figure_bytes,
            Some(("quinn stream floor", &floor_bytes)),
            None,
        );
        let messages = count as f64 * f64::from(settings.rounds);
        let floor_messages = Figure::per_sec("msg", total / floor_secs / body_bytes as f64);
        report.compare(
            &format!("{name} msg/s"),
            &Figure::per_sec("msg", messages / figure_secs),
            Some(("floor at this body size", &floor_messages)),
            None,
        );
        println!("  transport rounds: {}", spread(&figure_rates));
    }
    pair.shutdown().await;
    floor.close().await;
    report.print_table();
    if !settings.invocation.bench {
        println!("(test mode: one tiny pass of each)");
    }
    Ok(())
}

fn spread(rates: &[f64]) -> String {
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    format!("{}B/s .. {}B/s", si(min), si(max))
}

/// Two transports, A sending to B, B acknowledging everything it receives.
struct Pair {
    a: Transport,
    a_events: tokio::sync::Mutex<Events>,
    b: Arc<Transport>,
    b_addr: SocketAddr,
    next_id: std::sync::atomic::AtomicU64,
    next_conversation: std::sync::atomic::AtomicU64,
}

impl Pair {
    async fn connect() -> BenchResult<Pair> {
        let (a_identity, b_identity) = (NodeIdentity::generate()?, NodeIdentity::generate()?);
        let (a, a_events) = Transport::bind(TransportConfig {
            listen: loopback(),
            identity: a_identity.clone(),
            trust: Trust::pinned([b_identity.fingerprint()]),
        })?;
        let (b, mut b_events) = Transport::bind(TransportConfig {
            listen: loopback(),
            identity: b_identity,
            trust: Trust::pinned([a_identity.fingerprint()]),
        })?;
        let b = Arc::new(b);
        let b_addr = b.local_addr()?;
        let acknowledger = Arc::downgrade(&b);
        // B's stand-in engine: acknowledges every message as it arrives.
        tokio::spawn(async move {
            while let Some(event) = b_events.recv().await {
                if let TransportEvent::Session {
                    peer,
                    event: Event::Received(message),
                } = event
                {
                    let Some(b) = acknowledger.upgrade() else {
                        break;
                    };
                    let header = &message.header;
                    let _ = b.acknowledge(
                        &peer,
                        header.conversation_id,
                        header.from_initiator,
                        header.sequence,
                    );
                }
            }
        });
        let pair = Pair {
            a,
            a_events: tokio::sync::Mutex::new(a_events),
            b,
            b_addr,
            next_id: 0.into(),
            next_conversation: 1.into(),
        };
        // The handshake is not timed: one message through first.
        pair.transfer(1, 1).await?;
        Ok(pair)
    }

    /// Sends `count` messages of `body_bytes` and waits for all their acknowledgements.
    async fn transfer(&self, body_bytes: usize, count: u64) -> BenchResult<Duration> {
        use std::sync::atomic::Ordering::Relaxed;
        let body: herald_engine::RecordBytes = pattern(body_bytes).into();
        let first_id = self.next_id.fetch_add(count, Relaxed);
        let first_conversation = self.next_conversation.fetch_add(CONVERSATIONS, Relaxed);
        let message = |n: u64| {
            let mut conversation_id = [0; 16];
            conversation_id[..8]
                .copy_from_slice(&(first_conversation + n % CONVERSATIONS).to_le_bytes());
            OutgoingMessage {
                id: first_id + n,
                header: MessageHeader {
                    conversation_id,
                    from_initiator: true,
                    sequence: n / CONVERSATIONS + 1,
                    source_service: "//bench/Initiator".into(),
                    target_service: "//bench/Target".into(),
                    contract: "//bench/Contract".into(),
                    message_type: "//bench/Request".into(),
                    target_broker_instance: None,
                    lifetime_deadline_secs: 0,
                },
                body: body.clone(),
            }
        };
        let mut events = self.a_events.lock().await;
        let start = Instant::now();
        let mut sent = 0;
        let mut acknowledged = 0;
        let work = async {
            while sent < count.min(OUTSTANDING_MESSAGES_MAX) {
                self.a.send(self.b_addr, message(sent))?;
                sent += 1;
            }
            while acknowledged < count {
                match events.recv().await {
                    Some(TransportEvent::Session {
                        event: Event::Acknowledged { .. },
                        ..
                    }) => {
                        acknowledged += 1;
                        if sent < count {
                            self.a.send(self.b_addr, message(sent))?;
                            sent += 1;
                        }
                    }
                    Some(TransportEvent::Disconnected { reason, .. }) => {
                        return Err(format!("connection lost during the bench: {reason}").into());
                    }
                    Some(_) => {}
                    None => return Err("transport events ended".into()),
                }
            }
            Ok::<(), Box<dyn std::error::Error>>(())
        };
        tokio::time::timeout(ROUND_TIMEOUT, work).await??;
        let elapsed = start.elapsed();
        debug_assert_eq!(
            self.a
                .unacknowledged_messages(&PeerKey::Dialed(self.b_addr)),
            0
        );
        Ok(elapsed)
    }

    async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// What to run and how big: from the command line (mode, filter) and the environment.
#[derive(Debug)]
struct Settings {
    invocation: Invocation,
    /// Body bytes per round (each figure and its floor move the same).
    round_bytes: u64,
    rounds: u32,
}

impl Settings {
    /// | variable | default | |
    /// |---|---|---|
    /// | `HERALD_BENCH_QUIC_MIB` | 256 | MiB of body bytes per round |
    /// | `HERALD_BENCH_ROUNDS` | 3 | rounds, each figure interleaved with its floor |
    ///
    /// Without `--bench` (test mode): 1 MiB, one round.
    fn from_env() -> BenchResult<Settings> {
        let invocation = Invocation::from_args();
        let (mib, rounds) = if invocation.bench {
            (256.0, 3)
        } else {
            (1.0, 1)
        };
        let settings = Settings {
            round_bytes: (env_f64("HERALD_BENCH_QUIC_MIB", mib)? * 1024.0 * 1024.0) as u64,
            rounds: env_u64("HERALD_BENCH_ROUNDS", rounds)?.try_into()?,
            invocation,
        };
        if settings.rounds == 0 || settings.round_bytes == 0 {
            return Err("HERALD_BENCH_ROUNDS and HERALD_BENCH_QUIC_MIB must be positive".into());
        }
        Ok(settings)
    }
}
