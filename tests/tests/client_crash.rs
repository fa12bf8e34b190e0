//! A client process SIGKILLed in the middle of a transaction: it received messages through the
//! client protocol and never committed. The node (in this process) must notice the dead
//! connection (no close arrives: at its QUIC idle timeout) and roll the session's transaction
//! back, so that every message is received again, in order, by another client.

use std::process::Command;
use std::time::Duration;

use herald_engine::{DialogOptions, Durability, Receive};
use herald_net::identity::{NodeIdentity, Trust};
use herald_net::node::IDENTITY_DIR;
use herald_net::{Client, Node, NodeConfig};
use herald_tests::kill::{Kill, run_until_killed};

const MESSAGES: usize = 50;
/// Bounds the wait for the messages to come back: the node's idle timeout (10 s) plus room
/// for a loaded machine.
const RETURN_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn a_killed_clients_received_messages_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let own = NodeIdentity::load_or_create(&dir.path().join(IDENTITY_DIR))
        .unwrap()
        .fingerprint();
    let node = Node::start(NodeConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        broker: herald_engine::Options {
            durability: Durability::Sync,
            ..herald_engine::Options::default()
        },
        trust: Trust::pinned([own]),
        restricted_peers: Default::default(),
    })
    .unwrap();
    let addr = node.local_addr().unwrap();
    let mut client = Client::connect_local(dir.path(), addr).unwrap();
    client
        .execute("CREATE QUEUE Work; CREATE SERVICE Worker ON QUEUE Work ([DEFAULT]);")
        .unwrap();
    let mut tx = client.begin().unwrap();
    let handle = tx
        .begin_dialog("Worker", "Worker", "DEFAULT", DialogOptions::default())
        .unwrap();
    for i in 0..MESSAGES {
        tx.send(handle, "DEFAULT", format!("job {i}").as_bytes())
            .unwrap();
    }
    tx.commit().unwrap();

    let mut command = Command::new(env!("CARGO_BIN_EXE_client_crash_peer"));
    command.arg(dir.path()).arg(addr.to_string()).arg("Work");
    let output = run_until_killed(command, 0, Kill::AfterFirstAck(Duration::ZERO), |line| {
        line.starts_with(b"received ")
    });
    let output = String::from_utf8_lossy(&output);
    assert!(
        output.contains(&format!("received {MESSAGES}\n")),
        "the client printed {output:?}"
    );

    let mut tx = client.begin().unwrap();
    let messages = tx
        .receive("Work", Receive::top(MESSAGES).wait(RETURN_TIMEOUT))
        .unwrap();
    let bodies: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    let expected: Vec<String> = (0..MESSAGES).map(|i| format!("job {i}")).collect();
    assert_eq!(
        bodies, expected,
        "the killed client's messages came back, in order"
    );
    tx.commit().unwrap();
    client.close();
    node.shutdown().unwrap();
}
