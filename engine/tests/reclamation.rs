//! Checkpoints bound recovery and let the log release what nothing needs: disk use follows the
//! live backlog, not the history.

use std::time::Duration;

use herald_engine::{
    Broker, DialogOptions, Durability, Error, Options, QueueOptions, Receive, SentBy, Validation,
};

fn options() -> Options {
    Options {
        durability: Durability::None,
        lock_timeout: Duration::from_millis(200),
        segment_bytes: 256 * 1024,
        checkpoint_interval_bytes: 128 * 1024,
        ..Options::default()
    }
}

fn setup(broker: &Broker) -> herald_engine::ConversationHandle {
    setup_queues(broker, QueueOptions::default())
}

/// [`setup`] with queues of `queue_options`.
fn setup_queues(broker: &Broker, queue_options: QueueOptions) -> herald_engine::ConversationHandle {
    let mut tx = broker.begin();
    tx.create_message_type("//m", Validation::None).unwrap();
    tx.create_contract("//c", &[("//m", SentBy::Any)]).unwrap();
    tx.create_queue("In", queue_options).unwrap();
    tx.create_queue("Out", queue_options).unwrap();
    tx.create_service("//in", "In", &["//c"]).unwrap();
    tx.create_service("//out", "Out", &[]).unwrap();
    let h = tx
        .begin_dialog("//out", "//in", "//c", DialogOptions::default())
        .unwrap();
    tx.commit().unwrap();
    h
}

fn body(n: u64) -> Vec<u8> {
    let mut body = n.to_le_bytes().to_vec();
    body.resize(1000, (n % 251) as u8);
    body
}

#[test]
fn a_long_send_and_receive_run_keeps_the_log_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    let h = setup(&broker);
    let mut sent = 0u64;
    let mut received = 0u64;
    let mut largest = 0;
    // ~20 MiB of messages through a 256 KiB-segment log, with a backlog of at most 50.
    for _ in 0..400 {
        let mut tx = broker.begin();
        for _ in 0..50 {
            tx.send(h, "//m", &body(sent)).unwrap();
            sent += 1;
        }
        tx.commit().unwrap();
        let mut tx = broker.begin();
        for m in tx.receive("In", Receive::top(50)).unwrap() {
            assert_eq!(m.sequence, received);
            assert_eq!(m.body(), &body(received)[..]);
            received += 1;
        }
        tx.commit().unwrap();
        largest = largest.max(broker.log_bytes_on_disk());
    }
    assert_eq!(received, sent);
    // The history is ~20 MiB; the backlog never exceeds 50 KiB. A few segments at most.
    assert!(
        largest <= 8 * 256 * 1024,
        "log grew to {largest} bytes for a backlog of 50 KiB"
    );
    drop(broker);
    let broker = Broker::open(dir.path(), options()).unwrap();
    let mut tx = broker.begin();
    tx.send(h, "//m", &body(sent)).unwrap();
    tx.commit().unwrap();
    let mut tx = broker.begin();
    let m = tx.receive("In", Receive::top(10)).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(
        m[0].sequence, sent,
        "sequence numbers continue after checkpoints"
    );
}

#[test]
fn reopening_from_a_checkpoint_restores_queued_and_in_flight_messages() {
    let dir = tempfile::tempdir().unwrap();
    let h;
    {
        let broker = Broker::open(dir.path(), options()).unwrap();
        h = setup(&broker);
        let mut tx = broker.begin();
        for n in 0..20 {
            tx.send(h, "//m", &body(n)).unwrap();
        }
        tx.commit().unwrap();
        let mut tx = broker.begin();
        assert_eq!(tx.receive("In", Receive::top(5)).unwrap().len(), 5);
        tx.commit().unwrap();
        // Taken by a RECEIVE that never commits: a checkpoint must still count them as queued.
        let mut open = broker.begin();
        assert_eq!(open.receive("In", Receive::top(5)).unwrap().len(), 5);
        let info = broker.checkpoint().unwrap();
        assert!(info.lsn.0 > 0);
        std::mem::forget(open);
        // After the checkpoint: one more committed send, replayed from the log.
        let mut tx = broker.begin();
        tx.send(h, "//m", &body(20)).unwrap();
        tx.commit().unwrap();
    }
    assert!(dir.path().join("CHECKPOINT").exists());
    let broker = Broker::open(dir.path(), options()).unwrap();
    let mut tx = broker.begin();
    let rest = tx.receive("In", Receive::top(100)).unwrap();
    let sequences: Vec<u64> = rest.iter().map(|m| m.sequence).collect();
    assert_eq!(sequences, (5..=20).collect::<Vec<_>>());
    for m in &rest {
        assert_eq!(m.body(), &body(m.sequence)[..]);
    }
}

#[test]
fn a_damaged_checkpoint_is_reported_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = Broker::open(dir.path(), options()).unwrap();
        setup(&broker);
        broker.checkpoint().unwrap();
    }
    let path = dir.path().join("CHECKPOINT");
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    match Broker::open(dir.path(), options()) {
        Err(Error::Corruption(reason)) => assert!(reason.contains("checksum"), "{reason}"),
        other => panic!("expected Corruption, got {other:?}"),
    }
}

/// Checkpoint version 4 (before dialogs were marked established) is still read; a version
/// this build does not know is refused, by name.
#[test]
fn an_older_checkpoint_version_is_read_and_an_unknown_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dialog = {
        let broker = Broker::open(dir.path(), options()).unwrap();
        let dialog = setup(&broker);
        broker.checkpoint().unwrap();
        dialog
    };
    let path = dir.path().join("CHECKPOINT");
    let with_version = |version: u32| {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        let content = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..content]);
        bytes[content..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
    };
    with_version(4);
    let broker = Broker::open(dir.path(), options()).unwrap();
    assert!(
        broker
            .conversation_endpoints()
            .iter()
            .any(|e| e.handle == dialog),
        "the version 4 checkpoint's dialog is there"
    );
    drop(broker);
    with_version(99);
    match Broker::open(dir.path(), options()) {
        Err(Error::Corruption(reason)) => assert!(reason.contains("version 99"), "{reason}"),
        other => panic!("expected Corruption, got {other:?}"),
    }
}

#[test]
fn a_stuck_old_message_is_compacted_instead_of_pinning_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(dir.path(), options()).unwrap();
    let busy = setup(&broker);
    let mut tx = broker.begin();
    let stuck = tx
        .begin_dialog("//out", "//in", "//c", DialogOptions::default())
        .unwrap();
    tx.send(stuck, "//m", b"waiting a long time").unwrap();
    tx.commit().unwrap();
    let mut largest = 0;
    let mut sent = 0u64;
    for _ in 0..400 {
        let mut tx = broker.begin();
        for _ in 0..50 {
            tx.send(busy, "//m", &body(sent)).unwrap();
            sent += 1;
        }
        tx.commit().unwrap();
        // Receive only the busy conversation: the stuck message stays queued.
        let mut tx = broker.begin();
        let got = tx
            .receive(
                "In",
                Receive::top(50).conversation(busy_target(&broker, busy)),
            )
            .unwrap();
        assert_eq!(got.len(), 50);
        tx.commit().unwrap();
        largest = largest.max(broker.log_bytes_on_disk());
    }
    assert!(
        largest <= 8 * 256 * 1024,
        "one old message pinned {largest} bytes of log"
    );
    drop(broker);
    let broker = Broker::open(dir.path(), options()).unwrap();
    let mut tx = broker.begin();
    let got = tx.receive("In", Receive::top(10)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body(), b"waiting a long time");
}

/// The target side's handle of the busy conversation (its receiving endpoint).
fn busy_target(
    broker: &Broker,
    initiator: herald_engine::ConversationHandle,
) -> herald_engine::ConversationHandle {
    broker
        .conversation_endpoint(initiator)
        .and_then(|e| e.far_handle)
        .expect("both endpoints are local")
}

#[test]
fn close_checkpoints_so_the_next_open_replays_little() {
    let dir = tempfile::tempdir().unwrap();
    let h;
    {
        let broker = Broker::open(dir.path(), options()).unwrap();
        h = setup(&broker);
        let mut tx = broker.begin();
        for n in 0..10 {
            tx.send(h, "//m", &body(n)).unwrap();
        }
        tx.commit().unwrap();
        broker.close().unwrap();
    }
    assert!(dir.path().join("CHECKPOINT").exists());
    let broker = Broker::open(dir.path(), options()).unwrap();
    let mut tx = broker.begin();
    assert_eq!(tx.receive("In", Receive::top(100)).unwrap().len(), 10);
}

/// A segment of many empty messages holds few live body bytes, so it is compacted, but its
/// relocations take more than one log record (retained, each SEND leaves two messages): they
/// go in several, and checkpoints go on (the one record failed, and so did every checkpoint
/// after it, for good).
#[test]
fn relocations_larger_than_a_record_do_not_stop_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let options = || Options {
        segment_bytes: 64 * 1024,
        checkpoint_interval_bytes: 1 << 40,
        ..options()
    };
    let broker = Broker::open(dir.path(), options()).unwrap();
    let h = setup_queues(
        &broker,
        QueueOptions {
            retention: true,
            ..QueueOptions::default()
        },
    );
    let send_empty = |count: usize| {
        for _ in 0..count / 100 {
            let mut tx = broker.begin();
            for _ in 0..100 {
                tx.send(h, "//m", b"").unwrap();
            }
            tx.commit().unwrap();
        }
    };
    send_empty(6000);
    broker.checkpoint().expect("the first checkpoint");
    send_empty(6000);
    broker.checkpoint().expect("the second checkpoint");
    broker.checkpoint().expect("and the next");
    drop(broker);
    let broker = Broker::open(dir.path(), options()).unwrap();
    let mut tx = broker.begin();
    let got = tx.receive("In", Receive::top(20_000)).unwrap();
    assert_eq!(got.len(), 12_000, "every message is there once");
    tx.commit().unwrap();
}
