//! Nodes in one process on 127.0.0.1, each with its own data directory and port, talking QUIC
//! with mutual TLS: dialogs both ways, END crossing, a restricted peer answered with an Error,
//! and a receiving node restarted mid-stream — every message arrives exactly once, in order.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herald_engine::{
    ConversationHandle, DialogOptions, Durability, EndpointState, QueueOptions, Receive, Route,
    RouteAddress, SentBy, Validation, system,
};
use herald_net::identity::{Fingerprint, NodeIdentity, Trust};
use herald_net::node::IDENTITY_DIR;
use herald_net::{Node, NodeConfig};

const ASK: &str = "//t/Ask";
const TELL: &str = "//t/Tell";
const CONTRACT: &str = "//t/Talk";
/// Every wait in these tests ends by this (a hang is a failure, not a slow pass).
const WAIT: Duration = Duration::from_secs(60);

/// A data directory with an identity made in advance, so peers can pin it before it starts.
fn prepare(dir: &Path) -> Fingerprint {
    let identity = NodeIdentity::generate().unwrap();
    identity.write(&dir.join(IDENTITY_DIR)).unwrap();
    identity.fingerprint()
}

fn start(
    dir: &Path,
    listen: SocketAddr,
    trusted: &[Fingerprint],
    restricted: HashMap<Fingerprint, HashSet<String>>,
) -> Node {
    Node::start(NodeConfig {
        data_dir: dir.to_path_buf(),
        listen,
        broker: herald_engine::Options {
            durability: Durability::Sync,
            segment_bytes: 1024 * 1024,
            ..herald_engine::Options::default()
        },
        trust: Trust::pinned(trusted.iter().copied()),
        restricted_peers: restricted,
    })
    .unwrap()
}

/// The catalog: on `service`'s node its queue and service, and a route to the other service.
fn define(node: &Node, queue: &str, service: &str, accepts: bool, far: &str, far_addr: SocketAddr) {
    let broker = node.broker();
    if broker.catalog().services.contains_key(service) {
        return;
    }
    let mut tx = broker.begin();
    tx.create_message_type(ASK, Validation::None).unwrap();
    tx.create_message_type(TELL, Validation::None).unwrap();
    tx.create_contract(CONTRACT, &[(ASK, SentBy::Initiator), (TELL, SentBy::Any)])
        .unwrap();
    tx.create_queue(queue, QueueOptions::default()).unwrap();
    let contracts: &[&str] = if accepts { &[CONTRACT] } else { &[] };
    tx.create_service(service, queue, contracts).unwrap();
    tx.create_route(Route {
        name: "far".into(),
        service_name: Some(far.into()),
        broker_instance: None,
        address: RouteAddress::parse(&format!("quic://{far_addr}")).unwrap(),
        expires_at_ms: None,
    })
    .unwrap();
    tx.commit().unwrap();
}

/// Receives (committing) until `count` messages came from `queue`, or fails after `WAIT`.
fn receive(node: &Node, queue: &str, count: usize) -> Vec<(ConversationHandle, String, Vec<u8>)> {
    let mut got = Vec::new();
    let started = std::time::Instant::now();
    while got.len() < count {
        assert!(
            started.elapsed() < WAIT,
            "only {} of {count} messages arrived in {queue}; transmission queue of the sender \
             may say why",
            got.len()
        );
        let mut tx = node.broker().begin();
        let batch = tx
            .receive(queue, Receive::top(1000).wait(Duration::from_secs(1)))
            .unwrap();
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

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < WAIT, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
fn a_dialog_runs_between_two_nodes_both_ways_and_ends() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    let a = start(a_dir.path(), loopback(), &[b_print], HashMap::new());
    let b = start(b_dir.path(), loopback(), &[a_print], HashMap::new());
    assert_eq!(a.fingerprint(), a_print);
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    define(&a, "Client", "//t/Client", false, "//t/Server", b_addr);
    define(&b, "Server", "//t/Server", true, "//t/Client", a_addr);

    let mut tx = a.broker().begin();
    let h = tx
        .begin_dialog(
            "//t/Client",
            "//t/Server",
            CONTRACT,
            DialogOptions::default(),
        )
        .unwrap();
    for i in 0..50u32 {
        tx.send(h, ASK, &i.to_le_bytes()).unwrap();
    }
    tx.commit().unwrap();
    let got = receive(&b, "Server", 50);
    let bodies: Vec<u32> = got
        .iter()
        .map(|(_, _, body)| u32::from_le_bytes(body[..4].try_into().unwrap()))
        .collect();
    assert_eq!(
        bodies,
        (0..50).collect::<Vec<_>>(),
        "exactly once, in order"
    );
    let target = got[0].0;
    wait_until("A's transmission queue is acknowledged", || {
        a.broker().transmission_queue().is_empty()
    });
    assert_eq!(
        a.broker()
            .conversation_endpoint(h)
            .unwrap()
            .far_broker_instance,
        Some(b.broker().broker_instance()),
        "pinned to B by its acknowledgement"
    );

    let mut tx = b.broker().begin();
    tx.send(target, TELL, b"all done").unwrap();
    tx.end_conversation(target).unwrap();
    tx.commit().unwrap();
    let got = receive(&a, "Client", 2);
    assert_eq!(
        got.iter().map(|(_, t, _)| t.as_str()).collect::<Vec<_>>(),
        [TELL, system::END_DIALOG]
    );
    assert_eq!(
        a.broker().conversation_endpoint(h).unwrap().state,
        EndpointState::DisconnectedInbound
    );
    let mut tx = a.broker().begin();
    tx.end_conversation(h).unwrap();
    tx.commit().unwrap();
    assert!(
        a.broker().conversation_endpoint(h).is_none(),
        "B had ended: gone"
    );
    wait_until("B's end is acknowledged and its endpoint gone", || {
        b.broker().conversation_endpoint(target).is_none()
    });
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn a_restricted_peer_gets_an_error_for_a_service_it_may_not_reach() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    let a = start(a_dir.path(), loopback(), &[b_print], HashMap::new());
    let only_other = HashMap::from([(a_print, HashSet::from(["//t/Other".to_owned()]))]);
    let b = start(b_dir.path(), loopback(), &[a_print], only_other);
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    define(&a, "Client", "//t/Client", false, "//t/Server", b_addr);
    define(&b, "Server", "//t/Server", true, "//t/Client", a_addr);
    let mut tx = a.broker().begin();
    let h = tx
        .begin_dialog(
            "//t/Client",
            "//t/Server",
            CONTRACT,
            DialogOptions::default(),
        )
        .unwrap();
    tx.send(h, ASK, b"let me in").unwrap();
    tx.commit().unwrap();
    let got = receive(&a, "Client", 1);
    assert_eq!(got[0].1, system::ERROR);
    assert_eq!(
        system::parse_error_body(&got[0].2).unwrap().0,
        herald_engine::remote::codes::NO_PERMISSION
    );
    assert_eq!(
        a.broker().conversation_endpoint(h).unwrap().state,
        EndpointState::Error
    );
    assert!(b.broker().peek("Server").unwrap().is_empty());
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn a_receiving_node_restarted_mid_stream_gets_everything_once_in_order() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_print, b_print) = (prepare(a_dir.path()), prepare(b_dir.path()));
    let a = start(a_dir.path(), loopback(), &[b_print], HashMap::new());
    let b = start(b_dir.path(), loopback(), &[a_print], HashMap::new());
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    define(&a, "Client", "//t/Client", false, "//t/Server", b_addr);
    define(&b, "Server", "//t/Server", true, "//t/Client", a_addr);
    let mut tx = a.broker().begin();
    let h = tx
        .begin_dialog(
            "//t/Client",
            "//t/Server",
            CONTRACT,
            DialogOptions::default(),
        )
        .unwrap();
    tx.commit().unwrap();
    let send_batch = |from: u32| {
        let mut tx = a.broker().begin();
        for i in from..from + 20 {
            tx.send(h, ASK, &i.to_le_bytes()).unwrap();
        }
        tx.commit().unwrap();
    };
    send_batch(0);
    let mut got = receive(&b, "Server", 20);
    b.shutdown().unwrap();
    // B is down: these wait in A's transmission queue.
    send_batch(20);
    send_batch(40);
    wait_until("A notices B is gone", || {
        a.broker()
            .transmission_queue()
            .iter()
            .any(|row| !row.transmission_status.is_empty())
    });
    let b = start(b_dir.path(), b_addr, &[a_print], HashMap::new());
    got.extend(receive(&b, "Server", 40));
    let bodies: Vec<u32> = got
        .iter()
        .map(|(_, _, body)| u32::from_le_bytes(body[..4].try_into().unwrap()))
        .collect();
    assert_eq!(
        bodies,
        (0..60).collect::<Vec<_>>(),
        "exactly once, in order"
    );
    wait_until("everything is acknowledged", || {
        a.broker().transmission_queue().is_empty()
    });
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}
