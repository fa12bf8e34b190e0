//! The broker over a log whose disk fills up (`Options::log_storage` with a `MemStorage`): a
//! commit that needs space the disk does not have fails with a typed error and changes nothing
//! (a RECEIVE's messages go back to their queue), what was acknowledged before stays, and work
//! resumes once space is back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_engine::{
    Broker, ConversationHandle, DialogOptions, Durability, Error, MemStorage, Options,
    QueueOptions, Receive, SentBy, Validation,
};

const BODY_BYTES: usize = 4096;

fn open(dir: &std::path::Path, storage: &Arc<MemStorage>) -> Broker {
    Broker::open(
        dir,
        Options {
            durability: Durability::Sync,
            // Small segments: the disk fills after a few dozen messages.
            segment_bytes: 64 * 1024,
            // No checkpoint releases (and so frees for reuse) a segment during the test.
            checkpoint_interval_bytes: 1 << 40,
            log_storage: Some(storage.clone() as Arc<dyn herald_engine::Storage>),
            ..Options::default()
        },
    )
    .unwrap()
}

fn define(broker: &Broker) -> ConversationHandle {
    let mut tx = broker.begin();
    tx.create_message_type("//t/Ask", Validation::None).unwrap();
    tx.create_contract("//t/Talk", &[("//t/Ask", SentBy::Initiator)])
        .unwrap();
    tx.create_queue("AskQueue", QueueOptions::default())
        .unwrap();
    tx.create_queue("ReplyQueue", QueueOptions::default())
        .unwrap();
    tx.create_service("//t/Server", "AskQueue", &["//t/Talk"])
        .unwrap();
    tx.create_service("//t/Client", "ReplyQueue", &[]).unwrap();
    let handle = tx
        .begin_dialog(
            "//t/Client",
            "//t/Server",
            "//t/Talk",
            DialogOptions::default(),
        )
        .unwrap();
    tx.commit().unwrap();
    handle
}

/// A body of `len` bytes (at least 4) that says which message it is.
fn body(n: u32, len: usize) -> Vec<u8> {
    let mut body = vec![b'.'; len];
    body[..4].copy_from_slice(&n.to_le_bytes());
    body
}

fn send(
    broker: &Broker,
    handle: ConversationHandle,
    n: u32,
    len: usize,
) -> herald_engine::Result<()> {
    let mut tx = broker.begin();
    tx.send(handle, "//t/Ask", &body(n, len))?;
    tx.commit()
}

fn is_disk_full(error: &Error) -> bool {
    matches!(
        error,
        Error::Storage(herald_wal::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::StorageFull
    )
}

fn wait_for_spare(storage: &MemStorage) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !storage.file_names().iter().any(|n| n.ends_with(".spare")) {
        assert!(Instant::now() < deadline, "no spare segment appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_full_disk_refuses_commits_changes_nothing_and_work_resumes_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(MemStorage::new());
    let broker = open(dir.path(), &storage);
    let handle = define(&broker);
    wait_for_spare(&storage);
    storage.set_disk_full(true);

    // Fill the active segment and the spare; the next roll-over cannot make a segment. A
    // record that still fits in what is left goes in: fill that too, with small messages.
    let mut acknowledged = 0u32;
    for len in [BODY_BYTES, 4] {
        let refusal = loop {
            match send(&broker, handle, acknowledged, len) {
                Ok(()) => acknowledged += 1,
                Err(e) => break e,
            }
            assert!(acknowledged < 10_000, "the disk never filled up");
        };
        assert!(is_disk_full(&refusal), "{refusal:?}");
    }
    assert!(acknowledged > 0);
    // Still full: refused again, and a RECEIVE (its record is larger than a small SEND's)
    // that cannot commit puts its messages back.
    assert!(send(&broker, handle, acknowledged, 4).is_err_and(|e| is_disk_full(&e)));
    let mut tx = broker.begin();
    let taken = tx.receive("AskQueue", Receive::top(1000)).unwrap();
    assert_eq!(taken.len(), acknowledged as usize);
    let refused = tx.commit().unwrap_err();
    assert!(is_disk_full(&refused), "{refused:?}");
    assert_eq!(
        broker.peek("AskQueue").unwrap().len(),
        acknowledged as usize
    );

    // Space is back: the same broker goes on where it stopped.
    storage.set_disk_full(false);
    send(&broker, handle, acknowledged, BODY_BYTES).expect("work resumes once space is back");
    let mut tx = broker.begin();
    let numbers: Vec<u32> = tx
        .receive("AskQueue", Receive::top(1000))
        .unwrap()
        .iter()
        .map(|m| u32::from_le_bytes(m.body()[..4].try_into().unwrap()))
        .collect();
    tx.commit().unwrap();
    // Every acknowledged message once, in order, then the one sent after; none of the refused.
    assert_eq!(numbers, (0..=acknowledged).collect::<Vec<_>>());
    broker.close().unwrap();

    // And a reopen finds the log as it was left.
    let broker = open(dir.path(), &storage);
    assert!(broker.peek("AskQueue").unwrap().is_empty());
    send(&broker, handle, 0, BODY_BYTES).unwrap();
    assert_eq!(broker.peek("AskQueue").unwrap().len(), 1);
}
