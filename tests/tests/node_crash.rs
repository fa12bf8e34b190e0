//! Two real node processes on 127.0.0.1 — a sender streaming numbered messages on a few dialogs
//! and a receiver receiving them — one of them SIGKILLed at a random moment each round
//! (alternately; now and then both, or again while it starts) and restarted on the same
//! directory and port; then the kills stop, the sender drains its transmission queue, both
//! stop cleanly, and the test checks, from what they printed and from their brokers opened
//! afterwards, that every message was received exactly once, per dialog in order, with no gaps
//! (see `herald_tests::node_crash`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use herald_engine::Broker;
use herald_net::identity::{Fingerprint, NodeIdentity};
use herald_net::node::IDENTITY_DIR;
use herald_tests::kill::crash_seed;
use herald_tests::node_crash::{
    Peer, RECEIVER_LOG_QUEUE, RECEIVER_QUEUE, RECEIVER_SERVICE, SENDER_SERVICE, broker_options,
    complete_lines, parse_recv, parse_sent, verify_body,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A peer that has not started (or restarted) by then is broken.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The sender drains its transmission queue within its own bound (120 s); this one is a
/// backstop for a hung process.
const SENDER_STOP_TIMEOUT: Duration = Duration::from_secs(180);
const RECEIVER_STOP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Sender,
    Receiver,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Sender => "sender",
            Role::Receiver => "receiver",
        }
    }
}

struct Setup {
    dirs: [tempfile::TempDir; 2],
    addrs: [SocketAddr; 2],
    prints: [Fingerprint; 2],
}

impl Setup {
    fn new() -> Setup {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let prints = [prepare(dirs[0].path()), prepare(dirs[1].path())];
        // Two free UDP ports, held together so that they differ.
        let probes = [free_socket(), free_socket()];
        let addrs = [
            probes[0].local_addr().unwrap(),
            probes[1].local_addr().unwrap(),
        ];
        Setup {
            dirs,
            addrs,
            prints,
        }
    }

    fn index(role: Role) -> (usize, usize) {
        match role {
            Role::Sender => (0, 1),
            Role::Receiver => (1, 0),
        }
    }

    fn dir(&self, role: Role) -> &Path {
        self.dirs[Setup::index(role).0].path()
    }

    fn spawn(&self, role: Role, incarnation: u32, seed: u64) -> Peer {
        let (me, peer) = Setup::index(role);
        let mut command = Command::new(env!("CARGO_BIN_EXE_node_crash_peer"));
        command
            .arg(role.name())
            .arg(self.dirs[me].path())
            .arg(self.addrs[me].to_string())
            .arg(self.prints[peer].to_string())
            .arg(self.addrs[peer].to_string())
            .arg(seed.to_string());
        Peer::spawn(format!("{} #{incarnation}", role.name()), command)
    }
}

/// A data directory with an identity made in advance, so the other peer can pin it.
fn prepare(dir: &Path) -> Fingerprint {
    let identity = NodeIdentity::generate().unwrap();
    identity.write(&dir.join(IDENTITY_DIR)).unwrap();
    identity.fingerprint()
}

fn free_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

/// One peer's role, its running process, and what its earlier processes printed.
struct Running {
    role: Role,
    peer: Option<Peer>,
    incarnations: u32,
    outputs: Vec<Vec<u8>>,
    kills: u32,
}

impl Running {
    fn start(setup: &Setup, role: Role, rng: &mut SmallRng) -> Running {
        let mut running = Running {
            role,
            peer: None,
            incarnations: 0,
            outputs: Vec::new(),
            kills: 0,
        };
        running.restart(setup, rng);
        running
    }

    fn restart(&mut self, setup: &Setup, rng: &mut SmallRng) {
        self.incarnations += 1;
        self.peer = Some(setup.spawn(self.role, self.incarnations, rng.r#gen()));
    }

    fn peer(&mut self) -> &mut Peer {
        self.peer.as_mut().expect("running")
    }

    fn kill(&mut self) {
        let output = self.peer.take().expect("running").kill();
        self.outputs.push(output);
        self.kills += 1;
    }

    fn finish(&mut self, timeout: Duration) {
        let output = self.peer.take().expect("running").finish(timeout);
        self.outputs.push(output);
    }

    fn lines(&self) -> Vec<String> {
        self.outputs
            .iter()
            .flat_map(|o| complete_lines(o))
            .collect()
    }
}

#[test]
fn nodes_killed_mid_stream_deliver_every_message_once_in_order() {
    run(12);
}

#[test]
#[ignore = "long: run with --ignored"]
fn nodes_killed_mid_stream_deliver_every_message_once_in_order_long() {
    run(80);
}

fn run(rounds: u32) {
    let seed = crash_seed("node_crash", rounds);
    let mut rng = SmallRng::seed_from_u64(seed);
    let started = Instant::now();
    let setup = Setup::new();
    // The receiver first: the sender's first messages then find it up (not required).
    let mut receiver = Running::start(&setup, Role::Receiver, &mut rng);
    receiver.peer().wait_for_line("ready", READY_TIMEOUT);
    let mut sender = Running::start(&setup, Role::Sender, &mut rng);
    sender.peer().wait_for_line("ready", READY_TIMEOUT);
    let first_victim: u32 = rng.gen_range(0..2);
    let mut startup_kills = 0;
    let mut double_kills = 0;
    for round in 0..rounds {
        let (victim, other) = if (round + first_victim).is_multiple_of(2) {
            (&mut sender, &mut receiver)
        } else {
            (&mut receiver, &mut sender)
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..1200)));
        victim.kill();
        // Now and then both go down together (a power cut), and come back in either order.
        if rng.gen_bool(0.15) {
            other.kill();
            double_kills += 1;
            if rng.gen_bool(0.5) {
                other.restart(&setup, &mut rng);
            } else {
                victim.restart(&setup, &mut rng);
                victim.peer().wait_for_line("ready", READY_TIMEOUT);
                other.restart(&setup, &mut rng);
            }
            other.peer().wait_for_line("ready", READY_TIMEOUT);
            if victim.peer.is_some() {
                continue;
            }
        }
        if rng.gen_bool(0.3) {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..400)));
        }
        victim.restart(&setup, &mut rng);
        // Now and then, kill it again while it starts (recovering its broker, binding, making
        // its catalog, or just after).
        if rng.gen_bool(0.25) {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..250)));
            victim.kill();
            startup_kills += 1;
            victim.restart(&setup, &mut rng);
        }
        victim.peer().wait_for_line("ready", READY_TIMEOUT);
    }
    std::thread::sleep(Duration::from_millis(rng.gen_range(200..800)));
    let kill_phase = started.elapsed();
    sender.finish(SENDER_STOP_TIMEOUT);
    let drain = started.elapsed() - kill_phase;
    receiver.finish(RECEIVER_STOP_TIMEOUT);
    // Receivers killed after committing a receive (so, most likely, while messages arrived).
    let receiving_kills = receiver.outputs[..receiver.outputs.len() - 1]
        .iter()
        .filter(|o| complete_lines(o).iter().any(|l| l.starts_with("recv ")))
        .count();
    let stats = check(&setup, &sender, &receiver);
    eprintln!(
        "node_crash: {rounds} rounds ({} sender kills, {} receiver kills ({receiving_kills} of \
         them after it had received), {startup_kills} kills while starting, {double_kills} \
         times both together), {} messages sent on {} dialogs in {} committed sends ({} acknowledged), \
         {} committed receives ({} printed before a kill); kills took {kill_phase:?}, \
         the drain {drain:?}, all {:?}",
        sender.kills,
        receiver.kills,
        stats.messages,
        stats.dialogs,
        stats.sends,
        stats.acknowledged,
        stats.receives,
        stats.receives_printed_before_last,
        started.elapsed(),
    );
}

#[derive(Debug, Default)]
struct Stats {
    dialogs: usize,
    messages: u64,
    sends: usize,
    acknowledged: u64,
    receives: usize,
    receives_printed_before_last: usize,
}

fn check(setup: &Setup, sender: &Running, receiver: &Running) -> Stats {
    let mut stats = Stats::default();
    let sender_lines = sender.lines();
    assert!(
        sender_lines.iter().any(|l| l == "drained"),
        "the sender's last run did not drain"
    );

    // The sender's broker: the dialogs and how far each one sent; nothing left to transmit.
    let sender_broker = Broker::open(setup.dir(Role::Sender), broker_options()).unwrap();
    let left = sender_broker.transmission_queue();
    assert!(
        left.is_empty(),
        "{} messages remain in the sender's transmission queue, first: {:?}",
        left.len(),
        left.first()
    );
    let sender_endpoints: Vec<_> = sender_broker
        .conversation_endpoints()
        .into_iter()
        .filter(|e| &*e.service == SENDER_SERVICE && e.is_initiator)
        .collect();
    let sent: BTreeMap<String, u64> = sender_endpoints
        .iter()
        .map(|e| (e.conversation_id.to_string(), e.send_sequence))
        .collect();
    sender_broker.close().unwrap();
    assert_eq!(sent.len(), herald_tests::node_crash::DIALOGS, "the dialogs");
    stats.dialogs = sent.len();
    stats.messages = sent.values().sum();
    assert!(stats.messages > 0, "the sender sent nothing");

    // What the sender acknowledged: each number at most once, each one sent.
    let mut acknowledged: HashMap<String, HashSet<u64>> = HashMap::new();
    for line in sender_lines.iter().filter(|l| l.starts_with("sent ")) {
        stats.sends += 1;
        for (dialog, first, last) in parse_sent(line).unwrap_or_else(|e| panic!("{e}")) {
            let Some(&next) = sent.get(&dialog) else {
                panic!("the sender acknowledged {line:?} on {dialog}, not one of its dialogs");
            };
            assert!(
                last < next,
                "the sender acknowledged {dialog}:{first}-{last}, but its broker sent only \
                 {next} messages on it"
            );
            let numbers = acknowledged.entry(dialog.clone()).or_default();
            for n in first..=last {
                assert!(
                    numbers.insert(n),
                    "the sender acknowledged message {n} on {dialog} twice"
                );
                stats.acknowledged += 1;
            }
        }
    }
    // Committed sends whose line was lost: at most one transaction per sender kill.
    for (dialog, &next) in &sent {
        let numbers = acknowledged.get(dialog).cloned().unwrap_or_default();
        let mut gaps = 0;
        let mut in_gap = false;
        for n in 0..next {
            let missing = !numbers.contains(&n);
            if missing && !in_gap {
                gaps += 1;
            }
            in_gap = missing;
        }
        assert!(
            gaps <= sender.kills,
            "{dialog}: {gaps} runs of committed but unacknowledged sends, for {} sender kills",
            sender.kills
        );
    }

    // The receiver's broker: its log of committed receives, and what is still queued.
    let receiver_broker = Broker::open(setup.dir(Role::Receiver), broker_options()).unwrap();
    let log: Vec<String> = receiver_broker
        .peek(RECEIVER_LOG_QUEUE)
        .unwrap()
        .iter()
        .map(|m| String::from_utf8(m.body().to_vec()).expect("log text"))
        .collect();
    let queued: Vec<(String, u64, u64)> = receiver_broker
        .peek(RECEIVER_QUEUE)
        .unwrap()
        .iter()
        .map(|m| {
            let (dialog, number) = verify_body(m.body()).unwrap_or_else(|e| panic!("{e}"));
            (dialog.to_string(), number, m.sequence)
        })
        .collect();
    // Each target endpoint: the next sequence it expects to arrive, and to be received.
    let targets: BTreeMap<String, (u64, u64)> = receiver_broker
        .conversation_endpoints()
        .into_iter()
        .filter(|e| &*e.service == RECEIVER_SERVICE)
        .map(|e| {
            (
                e.conversation_id.to_string(),
                (e.arrived_sequence, e.receive_sequence),
            )
        })
        .collect();
    let receiver_instance = receiver_broker.broker_instance();
    receiver_broker.close().unwrap();
    // The receiver's acknowledgements pinned every dialog to its broker.
    for e in &sender_endpoints {
        assert_eq!(
            e.far_broker_instance,
            Some(receiver_instance),
            "dialog {} is not pinned to the receiver's broker",
            e.conversation_id
        );
    }
    stats.receives = log.len();

    // Per dialog: what committed receives took, then what is queued, is 0, 1, 2, … up to what
    // the sender sent: each message exactly once, in order.
    let mut received: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for entry in &log {
        let (dialog, numbers) = parse_recv(entry).unwrap_or_else(|e| panic!("log: {e}"));
        received.entry(dialog).or_default().extend(numbers);
    }
    let taken: BTreeMap<String, u64> = received
        .iter()
        .map(|(dialog, numbers)| (dialog.clone(), numbers.len() as u64))
        .collect();
    for (dialog, number, sequence) in &queued {
        assert_eq!(
            number, sequence,
            "message {number} on {dialog} is queued as sequence {sequence}"
        );
        received.entry(dialog.clone()).or_default().push(*number);
    }
    for dialog in received.keys() {
        assert!(
            sent.contains_key(dialog),
            "the receiver got messages on {dialog}, which the sender did not begin"
        );
    }
    for (dialog, &next) in &sent {
        let got = received.get(dialog).map_or(&[][..], Vec::as_slice);
        if got.iter().copied().ne(0..next) {
            let mut seen = HashSet::new();
            let twice: Vec<u64> = got.iter().copied().filter(|n| !seen.insert(*n)).collect();
            let missing: Vec<u64> = (0..next).filter(|n| !seen.contains(n)).collect();
            panic!(
                "{dialog}: the sender sent 0..{next}; the receiver took (and holds) {} messages; \
                 received twice: {twice:?}; missing: {missing:?}; out of order: {}",
                got.len(),
                twice.is_empty() && missing.is_empty()
            );
        }
        let received_by_receive = taken.get(dialog).copied().unwrap_or(0);
        assert_eq!(
            targets.get(dialog).copied(),
            Some((next, received_by_receive)),
            "{dialog}: the receiver's endpoint should expect sequence {next} to arrive and \
             {received_by_receive} to be received next (arrived, received)"
        );
    }

    // Every receive the receiver printed is a committed one, in the log's order.
    let printed: Vec<String> = receiver
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("recv "))
        .collect();
    let mut at = 0;
    for line in &printed {
        match log[at..].iter().position(|entry| entry == line) {
            Some(i) => at += i + 1,
            None => panic!(
                "the receiver printed {line:?}, which is not in its log of committed receives \
                 (after entry {at})"
            ),
        }
    }
    let last_output = receiver.outputs.last().map_or(0, |o| {
        complete_lines(o)
            .iter()
            .filter(|l| l.starts_with("recv "))
            .count()
    });
    stats.receives_printed_before_last = printed.len() - last_output;
    stats
}
