//! The node crash test's peer process (see `herald_tests::node_crash`):
//!
//! `node_crash_peer sender|receiver <data dir> <listen addr> <peer fingerprint> <peer addr> <seed>`
//!
//! The data directory holds the node's identity (made by the test); the peer pins the other
//! node's fingerprint. The sender's route leads to the peer address.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use herald_engine::{ConversationHandle, ConversationId, Receive, Route, RouteAddress};
use herald_net::identity::{Fingerprint, Trust};
use herald_net::{Node, NodeConfig};
use herald_tests::node_crash::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Bounds the sender's wait for its transmission queue to empty once told to stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// The sender slows down while this many messages wait to leave (the receiver may be down).
const BACKLOG_MAX: usize = 3000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, role, dir, listen, peer_print, peer_addr, seed] = &args[..] else {
        panic!(
            "usage: node_crash_peer sender|receiver <dir> <listen> <peer fingerprint> <peer addr> <seed>"
        );
    };
    let dir = PathBuf::from(dir);
    let listen: SocketAddr = listen.parse().expect("listen address");
    let peer_print: Fingerprint = peer_print.parse().expect("peer fingerprint");
    let peer_addr: SocketAddr = peer_addr.parse().expect("peer address");
    let seed: u64 = seed.parse().expect("seed");
    let node = Node::start(NodeConfig {
        data_dir: dir,
        listen,
        broker: broker_options(),
        trust: Trust::pinned([peer_print]),
        restricted_peers: Default::default(),
    })
    .expect("starting the node");
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            stop.store(true, Ordering::SeqCst);
        });
    }
    let rng = SmallRng::seed_from_u64(seed ^ u64::from(std::process::id()));
    match role.as_str() {
        "sender" => run_sender(&node, peer_addr, &stop, rng),
        "receiver" => run_receiver(&node, &stop),
        other => panic!("unknown role {other:?}"),
    }
    node.shutdown().expect("shutting the node down");
    print_line("stopped\n");
}

fn run_sender(node: &Node, receiver: SocketAddr, stop: &AtomicBool, mut rng: SmallRng) {
    let broker = node.broker();
    if !broker.catalog().services.contains_key(SENDER_SERVICE) {
        let mut tx = broker.begin();
        create_types(&mut tx).unwrap();
        tx.create_queue(SENDER_QUEUE, queue_options()).unwrap();
        tx.create_service(SENDER_SERVICE, SENDER_QUEUE, &[])
            .unwrap();
        tx.create_route(Route {
            name: "receiver".into(),
            service_name: Some(RECEIVER_SERVICE.into()),
            broker_instance: None,
            address: RouteAddress::parse(&format!("quic://{receiver}")).unwrap(),
            expires_at_ms: None,
        })
        .unwrap();
        for _ in 0..DIALOGS {
            tx.begin_dialog(
                SENDER_SERVICE,
                RECEIVER_SERVICE,
                DATA_CONTRACT,
                Default::default(),
            )
            .unwrap();
        }
        tx.commit().expect("committing the sender's catalog");
    }
    // Each dialog's next number is its endpoint's durable send sequence.
    let mut dialogs: Vec<(ConversationHandle, ConversationId, u64)> = broker
        .conversation_endpoints()
        .into_iter()
        .filter(|e| &*e.service == SENDER_SERVICE && e.is_initiator)
        .map(|e| (e.handle, e.conversation_id, e.send_sequence))
        .collect();
    assert_eq!(dialogs.len(), DIALOGS, "the sender's dialogs");
    dialogs.sort_by_key(|d| d.1.0);
    print_line("ready\n");
    let mut commits = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if commits.is_multiple_of(16) && broker.transmission_queue().len() > BACKLOG_MAX {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let count = rng.gen_range(1..=MESSAGES_PER_COMMIT_MAX);
        let mut next: Vec<u64> = dialogs.iter().map(|d| d.2).collect();
        let mut ranges: BTreeMap<ConversationId, (u64, u64)> = BTreeMap::new();
        let mut tx = broker.begin();
        for _ in 0..count {
            let i = rng.gen_range(0..dialogs.len());
            let (handle, id, _) = dialogs[i];
            let number = next[i];
            next[i] += 1;
            tx.send(handle, DATA_TYPE, &message_body(id, number))
                .expect("sending");
            ranges
                .entry(id)
                .and_modify(|r| r.1 = number)
                .or_insert((number, number));
        }
        tx.commit().expect("committing sends");
        for (dialog, n) in dialogs.iter_mut().zip(next) {
            dialog.2 = n;
        }
        print_line(&sent_line(&ranges));
        commits += 1;
        if rng.gen_bool(0.5) {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..4)));
        }
    }
    let started = Instant::now();
    loop {
        let waiting = broker.transmission_queue();
        if waiting.is_empty() {
            break;
        }
        if started.elapsed() > DRAIN_TIMEOUT {
            eprintln!(
                "{} messages still in the transmission queue after {DRAIN_TIMEOUT:?}; first: {:?}",
                waiting.len(),
                waiting.first()
            );
            std::process::exit(2);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    print_line("drained\n");
}

fn run_receiver(node: &Node, stop: &AtomicBool) {
    let broker = node.broker();
    if !broker.catalog().services.contains_key(RECEIVER_SERVICE) {
        let mut tx = broker.begin();
        create_types(&mut tx).unwrap();
        tx.create_queue(RECEIVER_QUEUE, queue_options()).unwrap();
        tx.create_service(RECEIVER_SERVICE, RECEIVER_QUEUE, &[DATA_CONTRACT])
            .unwrap();
        tx.create_queue(RECEIVER_LOG_QUEUE, queue_options())
            .unwrap();
        tx.create_service(RECEIVER_LOG_SERVICE, RECEIVER_LOG_QUEUE, &[LOG_CONTRACT])
            .unwrap();
        tx.create_queue(RECORDER_QUEUE, queue_options()).unwrap();
        tx.create_service(RECORDER_SERVICE, RECORDER_QUEUE, &[])
            .unwrap();
        begin_log_dialog(&mut tx).unwrap();
        tx.commit().expect("committing the receiver's catalog");
    }
    let log = broker
        .conversation_endpoints()
        .into_iter()
        .find(|e| &*e.service == RECORDER_SERVICE && e.is_initiator)
        .expect("the receiver's log dialog")
        .handle;
    print_line("ready\n");
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut tx = broker.begin();
        let batch = tx
            .receive(
                RECEIVER_QUEUE,
                Receive::top(RECEIVE_TOP).wait(Duration::from_millis(200)),
            )
            .expect("receiving");
        if batch.is_empty() {
            drop(tx);
            if stopping {
                return;
            }
            continue;
        }
        let mut dialog = None;
        let mut numbers = Vec::with_capacity(batch.len());
        for m in &batch {
            assert_eq!(&*m.message_type, DATA_TYPE, "message type");
            let (id, number) = verify_body(m.body()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                m.sequence, number,
                "message {number} on {id} arrived as sequence {}",
                m.sequence
            );
            assert!(
                *dialog.get_or_insert(id) == id,
                "one receive returned messages of two dialogs"
            );
            numbers.push(number);
        }
        let text = recv_text(dialog.expect("a message"), &numbers);
        tx.send(log, LOG_TYPE, text.as_bytes())
            .expect("logging the receive");
        tx.commit().expect("committing the receive");
        print_line(&format!("{text}\n"));
    }
}
