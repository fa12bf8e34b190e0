//! More nodes in one process on 127.0.0.1 (each with its own data directory and port, QUIC with
//! mutual TLS and pinned certificates):
//!
//! - three nodes talking at once (A to B and to C, B to C), replies flowing back, plain END and
//!   END WITH ERROR crossing nodes, every endpoint gone and every transmission queue empty at
//!   the end;
//! - a route created after the messages were sent (they wait with "no route", then go);
//! - the sending node restarted with messages in its transmission queue;
//! - a sending node whose certificate the receiver does not pin (nothing arrives, the
//!   transmission queue says why), then trusted;
//! - a dialog whose lifetime passes while the target node is down;
//! - the receiving node's disk full (its log on a `MemStorage`): what it cannot store stays in
//!   the sender's transmission queue, and arrives once space is back; the sending node's disk
//!   full when the acknowledgements come: they are recorded once space is back, no restart;
//! - bodies of several fragments, more together than one record of the receiver's log, and one
//!   larger than such a record (refused: its dialog errors at the sender).
//!
//! Every wait is bounded by [`WAIT`]; nothing asserts on elapsed time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use herald_engine::{
    Broker, ConversationHandle, DialogOptions, Durability, EndpointState, MemStorage, QueueOptions,
    Receive, Route, RouteAddress, SentBy, Validation, system,
};
use herald_net::identity::{Fingerprint, NodeIdentity, Trust};
use herald_net::node::IDENTITY_DIR;
use herald_net::proto::SEND_QUEUE_MESSAGES_MAX;
use herald_net::quic::{PeerKey, TransportOptions};
use herald_net::{Node, NodeConfig};

// Names of 8 bytes or more: see `a_checkpoint_with_short_message_type_names_in_the_transmission_queue_reopens`.
const ASK: &str = "//nodes/Ask";
const TELL: &str = "//nodes/Tell";
/// A message type whose name is shorter than 8 bytes.
const SHORT: &str = "//t/Q";
const CONTRACT: &str = "//t/Talk";
/// Every wait in these tests ends by this (a hang is a failure, not a slow pass).
const WAIT: Duration = Duration::from_secs(60);

/// A data directory with an identity made in advance, so peers can pin it before it starts.
fn prepare(dir: &Path) -> Fingerprint {
    let identity = NodeIdentity::generate().unwrap();
    identity.write(&dir.join(IDENTITY_DIR)).unwrap();
    identity.fingerprint()
}

fn start(dir: &Path, listen: SocketAddr, trusted: &[Fingerprint], durability: Durability) -> Node {
    start_with(
        dir,
        listen,
        trusted,
        herald_engine::Options {
            durability,
            segment_bytes: 1024 * 1024,
            ..herald_engine::Options::default()
        },
    )
}

/// Nodes A and B, each in its own new data directory (kept alive by the returned guards, bound
/// first so that they go after the nodes), trusting each other, both with `durability`.
fn two_nodes(durability: Durability) -> ([tempfile::TempDir; 2], Node, Node) {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    let b = start(b_dir.path(), loopback(), &[a_print], durability);
    let a = start(a_dir.path(), loopback(), &[b_print], durability);
    ([a_dir, b_dir], a, b)
}

/// [`start`] with the broker's options given whole.
fn start_with(
    dir: &Path,
    listen: SocketAddr,
    trusted: &[Fingerprint],
    broker: herald_engine::Options,
) -> Node {
    Node::start(NodeConfig {
        data_dir: dir.to_path_buf(),
        listen,
        broker,
        trust: Trust::pinned(trusted.iter().copied()),
        restricted_peers: HashMap::new(),
    })
    .unwrap()
}

/// [`start`] with an idle timeout far above [`WAIT`]: a connection to a vanished peer can end
/// within a test only by a stateless reset, never by idling out.
fn start_never_idle(
    dir: &Path,
    listen: SocketAddr,
    trusted: &[Fingerprint],
) -> herald_net::Result<Node> {
    Node::start_with(
        NodeConfig {
            data_dir: dir.to_path_buf(),
            listen,
            broker: herald_engine::Options {
                durability: Durability::Sync,
                segment_bytes: 1024 * 1024,
                ..herald_engine::Options::default()
            },
            trust: Trust::pinned(trusted.iter().copied()),
            restricted_peers: HashMap::new(),
        },
        TransportOptions {
            idle_timeout: WAIT * 10,
            ..TransportOptions::default()
        },
    )
}

/// A node whose log is on a `MemStorage` of small segments (the active one and its spare hold
/// about a hundred 1 KiB messages), with no checkpoint to release (and so free for reuse) a
/// segment: once [`fill_up`] is called, its disk fills after a few more commits.
fn start_on_a_small_disk(dir: &Path, trusted: &[Fingerprint]) -> (Node, Arc<MemStorage>) {
    let log = Arc::new(MemStorage::new());
    let node = start_with(
        dir,
        loopback(),
        trusted,
        herald_engine::Options {
            durability: Durability::Sync,
            segment_bytes: 64 * 1024,
            checkpoint_interval_bytes: 1 << 40,
            log_storage: Some(log.clone() as Arc<dyn herald_engine::Storage>),
            ..herald_engine::Options::default()
        },
    );
    (node, log)
}

/// Lets the log have its spare segment, then makes the disk refuse any new file.
fn fill_up(log: &MemStorage) {
    wait_until("the log has a spare segment", || {
        log.file_names().iter().any(|n| n.ends_with(".spare"))
    });
    log.set_disk_full(true);
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn route(service: &str, addr: SocketAddr) -> Route {
    Route {
        name: format!("to {service}"),
        service_name: Some(service.into()),
        broker_instance: None,
        address: RouteAddress::parse(&format!("quic://{addr}")).unwrap(),
        expires_at_ms: None,
    }
}

/// The catalog of one node: the message types and contract, `(queue, service)` pairs (each
/// service accepts the contract), and routes `(far service, far node)`.
fn define(node: &Node, services: &[(&str, &str)], routes: &[(&str, SocketAddr)]) {
    let broker = node.broker();
    let mut tx = broker.begin();
    if !broker.catalog().contracts.contains_key(CONTRACT) {
        tx.create_message_type(ASK, Validation::None).unwrap();
        tx.create_message_type(TELL, Validation::None).unwrap();
        tx.create_message_type(SHORT, Validation::None).unwrap();
        tx.create_contract(
            CONTRACT,
            &[
                (ASK, SentBy::Initiator),
                (TELL, SentBy::Any),
                (SHORT, SentBy::Initiator),
            ],
        )
        .unwrap();
    }
    for (queue, service) in services {
        tx.create_queue(queue, QueueOptions::default()).unwrap();
        tx.create_service(service, queue, &[CONTRACT]).unwrap();
    }
    for (service, addr) in routes {
        tx.create_route(route(service, *addr)).unwrap();
    }
    tx.commit().unwrap();
}

fn begin(broker: &Broker, from: &str, to: &str, options: DialogOptions) -> ConversationHandle {
    let mut tx = broker.begin();
    let h = tx.begin_dialog(from, to, CONTRACT, options).unwrap();
    tx.commit().unwrap();
    h
}

/// Sends requests numbered `numbers` on `h`, `per_tx` to a transaction.
fn send_numbered(
    broker: &Broker,
    h: ConversationHandle,
    numbers: std::ops::Range<u32>,
    per_tx: usize,
) {
    send_numbered_of(broker, h, numbers, per_tx, 4);
}

/// [`send_numbered`] with bodies of `body_bytes` (at least 4).
fn send_numbered_of(
    broker: &Broker,
    h: ConversationHandle,
    numbers: std::ops::Range<u32>,
    per_tx: usize,
    body_bytes: usize,
) {
    let numbers: Vec<u32> = numbers.collect();
    for chunk in numbers.chunks(per_tx) {
        let mut tx = broker.begin();
        for &i in chunk {
            tx.send(h, ASK, &numbered(i, body_bytes)).unwrap();
        }
        tx.commit().unwrap();
    }
}

/// The body of request `i`: its number, then zeros up to `body_bytes` (at least 4).
fn numbered(i: u32, body_bytes: usize) -> Vec<u8> {
    let mut body = vec![0u8; body_bytes];
    body[..4].copy_from_slice(&i.to_le_bytes());
    body
}

/// Defines A's `Client` service with a route to B and B's `Server` with a route to A.
fn define_client_and_server(a: &Node, b: &Node) {
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    define(a, &[("Client", "//t/Client")], &[("//t/Server", b_addr)]);
    define(b, &[("Server", "//t/Server")], &[("//t/Client", a_addr)]);
}

fn number(body: &[u8]) -> u32 {
    u32::from_le_bytes(body[..4].try_into().unwrap())
}

/// One received message: its conversation, type and body.
type Got = (ConversationHandle, String, Vec<u8>);

/// Receives (WAITFOR, committing) until `count` messages came from `queue`, or fails after
/// `WAIT`. With `reply`, each request is answered with a TELL of the same body in the
/// transaction that received it.
fn receive_on(broker: &Broker, queue: &str, count: usize, reply: bool) -> Vec<Got> {
    let mut got = Vec::new();
    let started = std::time::Instant::now();
    while got.len() < count {
        assert!(
            started.elapsed() < WAIT,
            "only {} of {count} messages arrived in {queue}: {:?}",
            got.len(),
            got.iter().map(|(_, t, _)| t).collect::<Vec<_>>()
        );
        let mut tx = broker.begin();
        let batch = tx
            .receive(
                queue,
                Receive::top(count - got.len()).wait(Duration::from_millis(500)),
            )
            .unwrap();
        for m in &batch {
            if reply && &*m.message_type == ASK {
                tx.send(m.conversation_handle, TELL, m.body()).unwrap();
            }
        }
        tx.commit().unwrap();
        got.extend(batch.iter().map(|m| {
            (
                m.conversation_handle,
                m.message_type.to_string(),
                m.body().to_vec(),
            )
        }));
    }
    got
}

fn receive(node: &Node, queue: &str, count: usize) -> Vec<Got> {
    receive_on(node.broker(), queue, count, false)
}

/// The numbers of `got`'s messages of type `message_type`, all on one conversation (returned).
fn numbers_of(got: &[Got], message_type: &str) -> (ConversationHandle, Vec<u32>) {
    let h = got[0].0;
    assert!(
        got.iter().all(|(c, _, _)| *c == h),
        "one conversation expected"
    );
    let numbers = got
        .iter()
        .filter(|(_, t, _)| t == message_type)
        .map(|(_, _, body)| number(body))
        .collect();
    (h, numbers)
}

/// Receives `count` messages from B's `Server` queue and checks they are the requests numbered
/// `0..count` of one conversation: each exactly once, in order.
fn receive_numbered(b: &Node, count: u32) {
    let got = receive(b, "Server", count as usize);
    assert_eq!(
        numbers_of(&got, ASK).1,
        (0..count).collect::<Vec<_>>(),
        "exactly once, in order"
    );
}

/// Waits until A's transmission queue is empty: B acknowledged everything.
fn wait_acknowledged(a: &Node) {
    wait_until("A's transmission queue is acknowledged", || {
        a.broker().transmission_queue().is_empty()
    });
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < WAIT, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The transmission statuses of `node`, for messages.
fn statuses(node: &Node) -> Vec<String> {
    node.broker()
        .transmission_queue()
        .into_iter()
        .map(|row| row.transmission_status)
        .collect()
}

fn ended_and_drained(node: &Node) -> bool {
    node.broker().conversation_endpoints().is_empty()
        && node.broker().transmission_queue().is_empty()
}

#[test]
fn three_nodes_talk_at_once_end_both_ways_and_clean_up() {
    const N: u32 = 120;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let prints: Vec<_> = dirs.iter().map(|d| prepare(d.path())).collect();
    let others =
        |i: usize| -> Vec<Fingerprint> { (0..3).filter(|j| *j != i).map(|j| prints[j]).collect() };
    let a = start(dirs[0].path(), loopback(), &others(0), Durability::Sync);
    let b = start(dirs[1].path(), loopback(), &others(1), Durability::Sync);
    let c = start(dirs[2].path(), loopback(), &others(2), Durability::Sync);
    let (a_addr, b_addr, c_addr) = (
        a.local_addr().unwrap(),
        b.local_addr().unwrap(),
        c.local_addr().unwrap(),
    );
    define(
        &a,
        &[("AtoB", "//t/A1"), ("AtoC", "//t/A2")],
        &[("//t/B1", b_addr), ("//t/C1", c_addr)],
    );
    define(
        &b,
        &[("BfromA", "//t/B1"), ("BtoC", "//t/B2")],
        &[("//t/A1", a_addr), ("//t/C2", c_addr)],
    );
    define(
        &c,
        &[("CfromA", "//t/C1"), ("CfromB", "//t/C2")],
        &[("//t/A2", a_addr), ("//t/B2", b_addr)],
    );
    let all: Vec<u32> = (0..N).collect();
    std::thread::scope(|s| {
        // A → B: B answers everything, then ends; A receives the END and ends too.
        s.spawn(|| {
            let h = begin(a.broker(), "//t/A1", "//t/B1", DialogOptions::default());
            send_numbered(a.broker(), h, 0..N, 7);
            let got = receive(&a, "AtoB", N as usize + 1);
            let (on, replies) = numbers_of(&got, TELL);
            assert_eq!(on, h);
            assert_eq!(replies, all, "A's replies from B: exactly once, in order");
            assert_eq!(got.last().unwrap().1, system::END_DIALOG);
            let mut tx = a.broker().begin();
            tx.end_conversation(h).unwrap();
            tx.commit().unwrap();
            assert!(a.broker().conversation_endpoint(h).is_none());
        });
        s.spawn(|| {
            let got = receive_on(b.broker(), "BfromA", N as usize, true);
            let (target, requests) = numbers_of(&got, ASK);
            assert_eq!(requests, all, "B's requests from A: exactly once, in order");
            let mut tx = b.broker().begin();
            tx.end_conversation(target).unwrap();
            tx.commit().unwrap();
        });
        // A → C: A ends WITH ERROR after the replies; C receives the Error and ends.
        s.spawn(|| {
            let h = begin(a.broker(), "//t/A2", "//t/C1", DialogOptions::default());
            send_numbered(a.broker(), h, 0..N, 11);
            let got = receive(&a, "AtoC", N as usize);
            assert_eq!(numbers_of(&got, TELL), (h, all.clone()));
            let mut tx = a.broker().begin();
            tx.end_conversation_with_error(h, 4242, "A has had enough")
                .unwrap();
            tx.commit().unwrap();
        });
        s.spawn(|| {
            let got = receive_on(c.broker(), "CfromA", N as usize, true);
            let (target, requests) = numbers_of(&got, ASK);
            assert_eq!(requests, all, "C's requests from A: exactly once, in order");
            let error = receive(&c, "CfromA", 1);
            assert_eq!((error[0].0, error[0].1.as_str()), (target, system::ERROR));
            let (code, description) = system::parse_error_body(&error[0].2).unwrap();
            assert_eq!((code, description.as_str()), (4242, "A has had enough"));
            let mut tx = c.broker().begin();
            tx.end_conversation(target).unwrap();
            tx.commit().unwrap();
        });
        // B → C: B (the initiator) ends first; C receives the END and ends.
        s.spawn(|| {
            let h = begin(b.broker(), "//t/B2", "//t/C2", DialogOptions::default());
            send_numbered(b.broker(), h, 0..N, 5);
            let got = receive(&b, "BtoC", N as usize);
            assert_eq!(numbers_of(&got, TELL), (h, all.clone()));
            let mut tx = b.broker().begin();
            tx.end_conversation(h).unwrap();
            tx.commit().unwrap();
        });
        s.spawn(|| {
            let got = receive_on(c.broker(), "CfromB", N as usize + 1, true);
            let (target, requests) = numbers_of(&got, ASK);
            assert_eq!(requests, all, "C's requests from B: exactly once, in order");
            assert_eq!(got.last().unwrap().1, system::END_DIALOG);
            let mut tx = c.broker().begin();
            tx.end_conversation(target).unwrap();
            tx.commit().unwrap();
        });
    });
    for (name, node) in [("A", &a), ("B", &b), ("C", &c)] {
        wait_until(
            &format!("{name}'s endpoints are gone and its transmission queue is empty"),
            || ended_and_drained(node),
        );
    }
    for queue in ["AtoB", "AtoC"] {
        assert!(a.broker().peek(queue).unwrap().is_empty());
    }
    for queue in ["BfromA", "BtoC"] {
        assert!(b.broker().peek(queue).unwrap().is_empty());
    }
    for queue in ["CfromA", "CfromB"] {
        assert!(c.broker().peek(queue).unwrap().is_empty());
    }
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    c.shutdown().unwrap();
}

#[test]
fn a_receiver_whose_disk_is_full_gets_the_rest_once_space_is_back() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    let a = start(a_dir.path(), loopback(), &[b_print], Durability::Sync);
    let (b, b_log) = start_on_a_small_disk(b_dir.path(), &[a_print]);
    define_client_and_server(&a, &b);
    fill_up(&b_log);

    const MESSAGES: u32 = 400;
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered_of(a.broker(), h, 0..MESSAGES, 20, 1024);
    // B stores what fits, then refuses; the rest waits at A, unacknowledged.
    wait_until("B stored some", || {
        !b.broker().peek("Server").unwrap().is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    let stored = b.broker().peek("Server").unwrap().len();
    assert!(
        stored < MESSAGES as usize,
        "the disk never filled: {stored}"
    );
    assert!(
        a.broker().transmission_queue_len() >= MESSAGES as usize - stored,
        "{} left at A, {stored} stored at B",
        a.broker().transmission_queue_len()
    );

    b_log.set_disk_full(false);
    receive_numbered(&b, MESSAGES);
    wait_acknowledged(&a);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn acknowledgements_a_full_disk_refused_to_record_are_recorded_once_space_is_back() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    // B is defined, then stopped: A's messages wait for it while A's disk fills up.
    let b = start(b_dir.path(), loopback(), &[a_print], Durability::Sync);
    let b_addr = b.local_addr().unwrap();
    define(&b, &[("Server", "//t/Server")], &[]);
    b.shutdown().unwrap();
    let (a, a_log) = start_on_a_small_disk(a_dir.path(), &[b_print]);
    define(&a, &[("Client", "//t/Client")], &[("//t/Server", b_addr)]);
    fill_up(&a_log);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    // Fill A's log to the last bytes: large messages, then small ones.
    let mut sent = 0u32;
    for len in [2048, 4] {
        loop {
            let mut tx = a.broker().begin();
            tx.send(h, ASK, &numbered(sent, len)).unwrap();
            if tx.commit().is_err() {
                break;
            }
            sent += 1;
            assert!(sent < 10_000, "A's disk never filled");
        }
    }
    // B comes back and takes everything; A cannot record the acknowledgements.
    let b = start(b_dir.path(), b_addr, &[a_print], Durability::Sync);
    receive_numbered(&b, sent);
    std::thread::sleep(Duration::from_secs(2));
    assert!(a.broker().transmission_queue_len() > 0);
    // Space is back: the acknowledgements are recorded without a restart, and nothing is sent
    // twice.
    a_log.set_disk_full(false);
    wait_until("A recorded every acknowledgement", || {
        a.broker().transmission_queue().is_empty()
    });
    assert!(b.broker().peek("Server").unwrap().is_empty());
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn large_bodies_cross_in_fragments_and_one_the_receivers_log_cannot_hold_is_refused() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    // A's log takes messages of several MiB; B's records hold less than 1 MiB.
    let a = start_with(
        a_dir.path(),
        loopback(),
        &[b_print],
        herald_engine::Options {
            segment_bytes: 16 * 1024 * 1024,
            ..herald_engine::Options::default()
        },
    );
    let b = start(b_dir.path(), loopback(), &[a_print], Durability::Sync);
    define_client_and_server(&a, &b);

    // Three fragments each, more of them together than one of B's records holds.
    let bodies: Vec<Vec<u8>> = (0..6u8)
        .map(|i| (0..700 * 1024).map(|j| (j % 251) as u8 ^ i).collect())
        .collect();
    // A new dialog, and `bodies` sent on it in one transaction.
    let send_on_a_dialog = |bodies: &[Vec<u8>]| {
        let h = begin(
            a.broker(),
            "//t/Client",
            "//t/Server",
            DialogOptions::default(),
        );
        let mut tx = a.broker().begin();
        for body in bodies {
            tx.send(h, ASK, body).unwrap();
        }
        tx.commit().unwrap();
        h
    };
    send_on_a_dialog(&bodies);
    let too_large = send_on_a_dialog(&[vec![7u8; 2 * 1024 * 1024]]);

    let got = receive(&b, "Server", bodies.len());
    assert!(got.iter().all(|(handle, _, _)| *handle == got[0].0));
    let received: Vec<Vec<u8>> = got.into_iter().map(|(_, _, body)| body).collect();
    assert!(received == bodies, "every body whole, once, in order");
    // The message B cannot store ends its dialog in an error at A, saying why.
    wait_until("the too-large message's dialog errored at A", || {
        a.broker()
            .conversation_endpoint(too_large)
            .is_some_and(|e| e.state == herald_engine::EndpointState::Error)
    });
    // It began no dialog at B: only the other one has an endpoint there.
    assert_eq!(b.broker().conversation_endpoints().len(), 1);
    let errors = receive(&a, "Client", 1);
    let (_, message_type, body) = &errors[0];
    assert_eq!(message_type, system::ERROR);
    assert!(
        String::from_utf8_lossy(body).contains("does not fit in one record"),
        "{}",
        String::from_utf8_lossy(body)
    );
    wait_until("A's transmission queue is empty", || {
        a.broker().transmission_queue().is_empty()
    });
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn messages_wait_for_a_route_created_after_they_were_sent() {
    let (_dirs, a, b) = two_nodes(Durability::None);
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    define(&a, &[("Client", "//t/Client")], &[]);
    define(&b, &[("Server", "//t/Server")], &[("//t/Client", a_addr)]);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), h, 0..30, 10);
    let rows = a.broker().transmission_queue();
    assert_eq!(rows.len(), 30);
    assert!(
        rows.iter()
            .all(|r| r.conversation_handle == h && r.transmission_status.contains("no route")),
        "{:?}",
        statuses(&a)
    );
    // The sender has looked at them (it wakes on each commit and on its recheck) and must
    // have left them: the status still says "no route", and B has nothing.
    std::thread::sleep(herald_net::node::ROUTE_RECHECK_INTERVAL + Duration::from_millis(200));
    assert!(
        statuses(&a).iter().all(|s| s.contains("no route")),
        "{:?}",
        statuses(&a)
    );
    assert_eq!(a.broker().transmission_queue().len(), 30);
    assert!(b.broker().peek("Server").unwrap().is_empty());

    let mut tx = a.broker().begin();
    tx.create_route(route("//t/Server", b_addr)).unwrap();
    tx.commit().unwrap();
    receive_numbered(&b, 30);
    wait_acknowledged(&a);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn a_sender_restarted_with_a_full_transmission_queue_delivers_everything_once_in_order() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    // B is started once to learn its port and make its catalog, then stopped.
    let b = start(b_dir.path(), loopback(), &[a_print], Durability::Sync);
    let b_addr = b.local_addr().unwrap();
    let a = start(a_dir.path(), loopback(), &[b_print], Durability::Sync);
    let a_addr = a.local_addr().unwrap();
    define(&b, &[("Server", "//t/Server")], &[("//t/Client", a_addr)]);
    b.shutdown().unwrap();
    define(&a, &[("Client", "//t/Client")], &[("//t/Server", b_addr)]);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), h, 0..40, 8);
    wait_until("A tried B and failed", || {
        statuses(&a).iter().any(|s| s.contains("unreachable"))
    });
    assert_eq!(a.broker().transmission_queue().len(), 40);
    a.shutdown().unwrap();

    // B is back first (so the restarted A cannot have delivered before its restart), then A.
    let b = start(b_dir.path(), b_addr, &[a_print], Durability::Sync);
    let a = start(a_dir.path(), a_addr, &[b_print], Durability::Sync);
    assert_eq!(
        a.broker().transmission_queue().len(),
        40,
        "survived the restart"
    );
    send_numbered(a.broker(), h, 40..60, 8);
    receive_numbered(&b, 60);
    wait_acknowledged(&a);
    assert_eq!(
        a.broker()
            .conversation_endpoint(h)
            .unwrap()
            .far_broker_instance,
        Some(b.broker().broker_instance())
    );
    assert!(
        b.broker().peek("Server").unwrap().is_empty(),
        "no duplicate"
    );
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// The receiving node dies (no GoAway, no CONNECTION_CLOSE) and comes back on its address: its
/// first answer to the sender's old connection is a stateless reset the sender accepts (the
/// reset key comes from the node's private key), so the sender dials again at once instead of
/// idling out. The idle timeout here is ten times the test's bound, so only that can pass.
#[test]
fn a_receiver_back_after_a_crash_gets_new_messages_without_an_idle_timeout() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    let b = start_never_idle(b_dir.path(), loopback(), &[a_print]).unwrap();
    let b_addr = b.local_addr().unwrap();
    let a = start_never_idle(a_dir.path(), loopback(), &[b_print]).unwrap();
    define(
        &b,
        &[("Server", "//t/Server")],
        &[("//t/Client", a.local_addr().unwrap())],
    );
    define(&a, &[("Client", "//t/Client")], &[("//t/Server", b_addr)]);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), h, 0..10, 5);
    assert_eq!(
        numbers_of(&receive(&b, "Server", 10), ASK).1,
        (0..10).collect::<Vec<_>>()
    );
    wait_until("A's first messages are acknowledged", || {
        a.broker().transmission_queue().is_empty()
    });

    b.abandon();
    let started = std::time::Instant::now();
    let b = loop {
        match start_never_idle(b_dir.path(), b_addr, &[a_print]) {
            Ok(node) => break node,
            Err(herald_net::Error::Io { .. }) if started.elapsed() < WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("restarting B: {e}"),
        }
    };
    send_numbered(a.broker(), h, 10..20, 5);
    assert_eq!(
        numbers_of(&receive(&b, "Server", 10), ASK).1,
        (10..20).collect::<Vec<_>>(),
        "the rest, once, in order"
    );
    wait_until("A's other messages are acknowledged", || {
        a.broker().transmission_queue().is_empty()
    });
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// Messages the engine drops from its transmission queue after the node handed them to the
/// transport (END WITH CLEANUP here, while their target is unreachable) are withdrawn from the
/// transport, so they are never sent, and nothing about them stays in the node's memory.
#[test]
fn messages_the_engine_dropped_are_withdrawn_from_the_transport() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let b_print = prepare(b_dir.path());
    prepare(a_dir.path());
    // An address nothing listens on.
    let b_addr = std::net::UdpSocket::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap();
    let a = start(a_dir.path(), loopback(), &[b_print], Durability::Sync);
    define(&a, &[("Client", "//t/Client")], &[("//t/Server", b_addr)]);
    let kept = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    let dropped = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), kept, 0..3, 3);
    send_numbered(a.broker(), dropped, 0..5, 5);
    let peer = PeerKey::Dialed(b_addr);
    wait_until("all 8 are handed to the transport", || {
        a.dispatched() == 8 && a.transport().unacknowledged_messages(&peer) == 8
    });

    let mut tx = a.broker().begin();
    tx.end_conversation_with_cleanup(dropped).unwrap();
    tx.commit().unwrap();
    wait_until("the 5 dropped ones are withdrawn", || {
        a.dispatched() == 3 && a.transport().unacknowledged_messages(&peer) == 3
    });
    assert_eq!(a.broker().transmission_queue_len(), 3);
    assert!(
        a.broker().transmission_statuses_held() <= 3,
        "no status text of a dropped message stays"
    );
    a.shutdown().unwrap();
}

#[test]
fn an_untrusted_sender_delivers_nothing_until_the_receiver_trusts_it() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    let stranger = NodeIdentity::generate().unwrap().fingerprint();
    let a = start(a_dir.path(), loopback(), &[b_print], Durability::None);
    // B pins someone else, not A.
    let b = start(b_dir.path(), loopback(), &[stranger], Durability::None);
    let b_addr = b.local_addr().unwrap();
    define_client_and_server(&a, &b);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), h, 0..25, 5);
    wait_until("A's transmission queue says why nothing goes", || {
        let s = statuses(&a);
        s.len() == 25 && s.iter().all(|s| s.contains("unreachable"))
    });
    let status = statuses(&a)[0].clone();
    assert!(status.contains(&b_addr.to_string()), "{status}");
    assert!(b.broker().peek("Server").unwrap().is_empty());
    assert!(b.broker().conversation_endpoints().is_empty());
    assert_eq!(a.broker().transmission_queue().len(), 25);
    b.shutdown().unwrap();

    let b = start(b_dir.path(), b_addr, &[stranger, a_print], Durability::None);
    receive_numbered(&b, 25);
    wait_acknowledged(&a);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// A dialog with a 2 s lifetime from A to B, B down (started once for its port and catalog):
/// A's requests wait in its transmission queue until the lifetime passes and A receives
/// the −8489 Error. Returns the nodes' directories, fingerprints, B's address and A.
fn expire_while_target_down() -> Expired {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    let b = start(b_dir.path(), loopback(), &[a_print], Durability::None);
    let b_addr = b.local_addr().unwrap();
    let a = start(a_dir.path(), loopback(), &[b_print], Durability::None);
    let a_addr = a.local_addr().unwrap();
    define(&b, &[("Server", "//t/Server")], &[("//t/Client", a_addr)]);
    b.shutdown().unwrap();
    define(&a, &[("Client", "//t/Client")], &[("//t/Server", b_addr)]);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions {
            lifetime: Some(Duration::from_secs(2)),
            ..DialogOptions::default()
        },
    );
    send_numbered(a.broker(), h, 0..10, 5);
    let got = receive(&a, "Client", 1);
    assert_eq!((got[0].0, got[0].1.as_str()), (h, system::ERROR));
    assert_eq!(
        system::parse_error_body(&got[0].2).unwrap().0,
        system::ERROR_LIFETIME_EXPIRED
    );
    assert_eq!(
        a.broker().conversation_endpoint(h).unwrap().state,
        herald_engine::EndpointState::Error
    );
    Expired {
        a,
        h,
        a_print,
        b_dir,
        b_addr,
        _a_dir: a_dir,
    }
}

struct Expired {
    a: Node,
    h: ConversationHandle,
    a_print: Fingerprint,
    b_dir: tempfile::TempDir,
    b_addr: SocketAddr,
    _a_dir: tempfile::TempDir,
}

/// The initiator of a dialog expired while its target node was down gets the −8489 Error
/// (above); ending it removes its endpoint and its messages from the transmission queue.
#[test]
fn a_dialog_expired_while_its_target_was_down_errors_at_the_initiator() {
    let expired = expire_while_target_down();
    let (a, h) = (&expired.a, expired.h);
    let mut tx = a.broker().begin();
    tx.end_conversation(h).unwrap();
    tx.commit().unwrap();
    assert!(a.broker().conversation_endpoint(h).is_none());
    assert!(
        a.broker().transmission_queue().is_empty(),
        "ending the expired dialog drops its messages: {:?}",
        statuses(a)
    );
    expired.a.shutdown().unwrap();
}

/// After the expired dialog's initiator ended it, B comes back: the expired dialog's messages
/// must not reach it. A fresh dialog sent after them (same connection, same stream: in order)
/// shows when anything sent earlier would have arrived.
#[test]
fn messages_of_a_dialog_expired_and_ended_while_its_target_was_down_never_arrive() {
    let Expired {
        a,
        h,
        a_print,
        b_dir,
        b_addr,
        _a_dir,
    } = expire_while_target_down();
    let mut tx = a.broker().begin();
    tx.end_conversation(h).unwrap();
    tx.commit().unwrap();
    assert!(a.broker().transmission_queue().is_empty());

    let b = start(b_dir.path(), b_addr, &[a_print], Durability::None);
    let fresh = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), fresh, 100..103, 3);
    wait_until("the fresh dialog is acknowledged", || {
        a.broker().transmission_queue().is_empty()
    });
    let queued = b.broker().peek("Server").unwrap();
    let got: Vec<(String, Vec<u8>)> = queued
        .iter()
        .map(|m| (m.message_type.to_string(), m.body().to_vec()))
        .collect();
    assert!(
        queued
            .iter()
            .all(|m| m.conversation_handle == queued[0].conversation_handle)
            && got.len() == 3,
        "only the fresh dialog's 3 messages should reach B; B's queue holds {} ({:?}), B has {} \
         endpoints",
        got.len(),
        got.iter().map(|(t, _)| t).collect::<Vec<_>>(),
        b.broker().conversation_endpoints().len()
    );
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// SQL Server drops an expired dialog's messages from the transmission queue when its lifetime
/// passes (the dialog is in ERROR and can send nothing more).
#[test]
fn an_expired_dialog_leaves_the_transmission_queue_at_once() {
    let expired = expire_while_target_down();
    let left: Vec<_> = expired
        .a
        .broker()
        .transmission_queue()
        .into_iter()
        .filter(|row| row.conversation_handle == expired.h)
        .collect();
    assert!(
        left.is_empty(),
        "{} messages of the expired dialog still wait: {:?}",
        left.len(),
        left.iter()
            .map(|r| &r.transmission_status)
            .collect::<Vec<_>>()
    );
    expired.a.shutdown().unwrap();
}

/// The checkpoint reader bounds the transmission queue's count with 62 bytes per row (16 for
/// the id), but a row is 8 (id) + 16 + 8 + 2 + name + 20 bytes: 54 + the message type's name.
/// With names under 8 bytes and enough rows, the checkpoint the node's clean shutdown wrote
/// cannot be read: the broker does not open again ("count N beyond the end").
#[test]
fn a_checkpoint_with_short_message_type_names_in_the_transmission_queue_reopens() {
    let (a_dir, b_print) = (
        tempfile::tempdir().unwrap(),
        NodeIdentity::generate().unwrap(),
    );
    prepare(a_dir.path());
    let a = start(
        a_dir.path(),
        loopback(),
        &[b_print.fingerprint()],
        Durability::None,
    );
    let nowhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    define(&a, &[("Client", "//t/Client")], &[("//t/Server", nowhere)]);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    let mut tx = a.broker().begin();
    for i in 0..40u32 {
        tx.send(h, SHORT, &i.to_le_bytes()).unwrap();
    }
    tx.commit().unwrap();
    a.shutdown().unwrap();
    let reopened = Node::start(NodeConfig {
        data_dir: a_dir.path().to_path_buf(),
        listen: loopback(),
        broker: herald_engine::Options {
            durability: Durability::None,
            segment_bytes: 1024 * 1024,
            ..herald_engine::Options::default()
        },
        trust: Trust::pinned([b_print.fingerprint()]),
        restricted_peers: HashMap::new(),
    });
    let a = match reopened {
        Ok(a) => a,
        Err(e) => panic!("the broker does not open after a clean shutdown: {e}"),
    };
    assert_eq!(a.broker().transmission_queue().len(), 40);
    a.shutdown().unwrap();
}

/// A peer that is down with a full send queue holds back only its own messages: another
/// peer's, sent after them, arrive meanwhile (every pass used to start again at the first
/// message refused, and wait for room there). Once it is up, its messages arrive too, each
/// once, in order — those the full queue refused included.
#[test]
fn a_peer_with_a_full_send_queue_holds_back_only_its_own_messages() {
    let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
    let [a_print, b_print, c_print] = [0, 1, 2].map(|i| prepare(dirs[i].path()));
    let b = start(dirs[1].path(), loopback(), &[a_print], Durability::None);
    let a = start(
        dirs[0].path(),
        loopback(),
        &[b_print, c_print],
        Durability::None,
    );
    define_client_and_server(&a, &b);
    // C's address answers nothing until C starts there.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let c_addr = silent.local_addr().unwrap();
    define(&a, &[], &[("//t/Later", c_addr)]);
    let to_c = begin(
        a.broker(),
        "//t/Client",
        "//t/Later",
        DialogOptions::default(),
    );
    let to_c_count = (SEND_QUEUE_MESSAGES_MAX + 1000) as u32;
    send_numbered(a.broker(), to_c, 0..to_c_count, 10_000);
    let held_by_c = || {
        a.transport()
            .unacknowledged_messages(&PeerKey::Dialed(c_addr))
    };
    wait_until("C's send queue is full", || {
        held_by_c() == SEND_QUEUE_MESSAGES_MAX
    });

    let to_b = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), to_b, 0..20, 5);
    receive_numbered(&b, 20);
    assert_eq!(held_by_c(), SEND_QUEUE_MESSAGES_MAX);

    drop(silent);
    let c = start(dirs[2].path(), c_addr, &[a_print], Durability::None);
    define(
        &c,
        &[("Server", "//t/Later")],
        &[("//t/Client", a.local_addr().unwrap())],
    );
    receive_numbered(&c, to_c_count);
    wait_acknowledged(&a);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    c.shutdown().unwrap();
}

/// Messages handed to the transport for an address that a route change no longer leads to
/// follow the route: an ALTER ROUTE from a node that never answers to the right one delivers
/// them there, then the messages sent after it, each once, in order (they used to stay with
/// the old address for ever, and the later ones wait at the new one as a gap).
#[test]
fn messages_already_handed_on_follow_an_altered_route() {
    let (_dirs, a, b) = two_nodes(Durability::Sync);
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let wrong = silent.local_addr().unwrap();
    define(&a, &[("Client", "//t/Client")], &[("//t/Server", wrong)]);
    define(&b, &[("Server", "//t/Server")], &[("//t/Client", a_addr)]);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), h, 0..10, 5);
    wait_until("the wrong address holds them", || {
        a.transport()
            .unacknowledged_messages(&PeerKey::Dialed(wrong))
            == 10
    });

    let mut tx = a.broker().begin();
    tx.alter_route(route("//t/Server", b_addr)).unwrap();
    tx.commit().unwrap();
    send_numbered(a.broker(), h, 10..15, 5);
    receive_numbered(&b, 15);
    wait_acknowledged(&a);
    assert_eq!(
        a.transport()
            .unacknowledged_messages(&PeerKey::Dialed(wrong)),
        0,
        "taken back from the wrong address"
    );
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

/// A broker error answers a message the node sent, and comes back on the connection the node
/// dialed to send it: one a peer sends on its own connection (here B, about A's dialog with
/// it) fails nothing. What B sends after it on that connection (its reply) arriving at A shows
/// the error was read first.
#[test]
fn a_broker_error_on_a_connection_the_peer_opened_fails_nothing() {
    let (_dirs, a, b) = two_nodes(Durability::None);
    define_client_and_server(&a, &b);
    let h = begin(
        a.broker(),
        "//t/Client",
        "//t/Server",
        DialogOptions::default(),
    );
    send_numbered(a.broker(), h, 0..1, 1);
    let request = receive(&b, "Server", 1);
    let conversation_id = a.broker().conversation_endpoint(h).unwrap().conversation_id;
    b.transport()
        .send_error(
            &PeerKey::Dialed(a.local_addr().unwrap()),
            conversation_id.0.to_be_bytes(),
            true,
            -8490,
            "forged",
        )
        .unwrap();
    let mut tx = b.broker().begin();
    tx.send(request[0].0, TELL, b"reply").unwrap();
    tx.commit().unwrap();
    let reply = receive(&a, "Client", 1);
    assert_eq!(reply[0].2, b"reply");
    let endpoint = a.broker().conversation_endpoint(h).unwrap();
    assert_eq!(endpoint.state, EndpointState::Conversing);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}
