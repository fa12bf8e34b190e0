//! I/O failures injected through the storage seam: a failed write or sync poisons the log
//! (nothing after it may claim durability), a short write is completed, a full disk is an error
//! that goes away with the cause, and a crash image at any point holds every acknowledged commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_wal::{Error, Lsn, MemStorage, Options, Wal};

fn options() -> Options {
    Options {
        segment_bytes: 8192,
        ..Options::default()
    }
}

fn open(storage: &MemStorage) -> Wal {
    Wal::open_storage(Arc::new(storage.clone()), options()).unwrap()
}

/// Waits (bounded) until the spare-segment thread has a spare ready, so that fault counts
/// below only see the writes of the operations under test. Asked of the log, not of the file
/// names: the spare's name appears before the log counts it ready (a roll-over just then
/// found none and failed early on a full disk, and the spare, ready a moment later, made the
/// next commit succeed).
fn wait_for_spare(wal: &Wal) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while wal.spares_ready() == 0 {
        assert!(Instant::now() < deadline, "no spare segment appeared");
        std::thread::yield_now();
    }
}

#[test]
fn failed_write_poisons_and_earlier_commits_survive() {
    let storage = MemStorage::new();
    let wal = open(&storage);
    wait_for_spare(&wal);
    let kept = wal.commit(1, b"acknowledged before the failure").unwrap();
    storage.fail_nth_write(1);
    match wal.commit(1, b"this write fails") {
        Err(Error::Poisoned { cause }) => {
            assert!(cause.contains("injected write failure"), "{cause}")
        }
        other => panic!("expected Poisoned, got {other:?}"),
    }
    // Every later call that needs the log to move fails too: no pretending.
    assert!(matches!(
        wal.commit(1, b"later"),
        Err(Error::Poisoned { .. })
    ));
    assert!(matches!(wal.sync(), Err(Error::Poisoned { .. })));
    let image = storage.crash_image(None);
    drop(wal);
    let wal = Wal::open_storage(Arc::new(image), options()).unwrap();
    assert_eq!(wal.next_lsn(), kept.lsn.next());
    assert_eq!(
        &*wal.read(kept.position).unwrap().payload,
        b"acknowledged before the failure"
    );
    wal.commit(1, b"the reopened log works").unwrap();
}

#[test]
fn failed_sync_poisons_the_log() {
    let storage = MemStorage::new();
    let wal = open(&storage);
    wait_for_spare(&wal);
    let kept = wal.commit(1, b"durable").unwrap();
    storage.fail_nth_sync(1);
    match wal.commit(1, b"its sync fails") {
        Err(Error::Poisoned { cause }) => assert!(cause.contains("fdatasync"), "{cause}"),
        other => panic!("expected Poisoned, got {other:?}"),
    }
    assert!(
        wal.durable_lsn() < kept.lsn.next(),
        "durable LSN never passes a failed sync"
    );
    assert!(matches!(wal.commit(1, b"x"), Err(Error::Poisoned { .. })));
    assert!(matches!(
        wal.wait_durable(kept.lsn.next()),
        Err(Error::Poisoned { .. })
    ));
    // Reads of what was durable still work on the poisoned handle.
    assert_eq!(&*wal.read(kept.position).unwrap().payload, b"durable");
    let image = storage.crash_image(None);
    assert!(matches!(wal.close(), Err(Error::Poisoned { .. })));
    let wal = Wal::open_storage(Arc::new(image), options()).unwrap();
    assert!(wal.next_lsn() > kept.lsn);
    assert_eq!(&*wal.read(kept.position).unwrap().payload, b"durable");
}

#[test]
fn poisoning_wakes_every_waiting_committer() {
    let storage = MemStorage::new();
    let wal = open(&storage);
    wait_for_spare(&wal);
    storage.fail_nth_sync(1);
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| wal.commit(1, b"concurrent")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Some commits may have been covered by syncs before the failure; none hangs, and after
    // the failure nothing succeeds.
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(Error::Poisoned { .. })))
    );
    assert!(matches!(
        wal.commit(1, b"after"),
        Err(Error::Poisoned { .. })
    ));
}

#[test]
fn short_write_is_completed() {
    let storage = MemStorage::new();
    let wal = open(&storage);
    wait_for_spare(&wal);
    storage.short_nth_write(1);
    let payload = vec![0xAB; 3000];
    let appended = wal.commit(7, &payload).unwrap();
    assert_eq!(&*wal.read(appended.position).unwrap().payload, &payload[..]);
    drop(wal);
    let wal = open(&storage);
    let records: Vec<_> = wal
        .records_from(Lsn(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(records.len(), 1);
    assert_eq!(&*records[0].payload, &payload[..]);
}

#[test]
fn full_disk_fails_the_append_and_work_resumes_when_space_returns() {
    let storage = MemStorage::new();
    let wal = open(&storage);
    wait_for_spare(&wal);
    storage.set_disk_full(true);
    // Use the ready spare, then run out: the next roll-over finds no spare and cannot make one.
    let mut acknowledged = Vec::new();
    let error = loop {
        match wal.commit(1, &[5u8; 2000]) {
            Ok(a) => acknowledged.push(a),
            Err(e) => break e,
        }
        assert!(acknowledged.len() < 100, "the disk never filled up");
    };
    match &error {
        Error::Io { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{error}")
        }
        other => panic!("expected an Io error, got {other:?}"),
    }
    assert!(matches!(wal.commit(1, &[5u8; 2000]), Err(Error::Io { .. })));
    storage.set_disk_full(false);
    let resumed = wal
        .commit(1, &[6u8; 2000])
        .expect("work resumes once space is back");
    assert_eq!(
        resumed.lsn,
        acknowledged.last().unwrap().lsn.next(),
        "no LSN was lost"
    );
    let image = storage.crash_image(None);
    drop(wal);
    let wal = Wal::open_storage(Arc::new(image), options()).unwrap();
    assert_eq!(wal.next_lsn(), resumed.lsn.next());
}

#[test]
fn crash_image_frozen_at_a_sync_holds_everything_acknowledged_before_it() {
    let storage = MemStorage::new();
    let wal = open(&storage);
    wait_for_spare(&wal);
    let mut before_freeze = Vec::new();
    for i in 0..20u8 {
        before_freeze.push(wal.commit(1, &[i; 300]).unwrap());
    }
    // Power is "lost" right after the next sync: later commits still return (the simulated
    // disk lies about them), but the image shows the disk as of that sync.
    storage.freeze_durability_after_nth_sync(1);
    let at_freeze = wal.commit(1, b"covered by the last real sync").unwrap();
    for i in 0..20u8 {
        wal.commit(2, &[i; 300]).unwrap();
    }
    let image = storage.crash_image(Some(42));
    drop(wal);
    let wal = Wal::open_storage(Arc::new(image), options()).unwrap();
    assert_eq!(wal.next_lsn(), at_freeze.lsn.next());
    for a in before_freeze.iter().chain([&at_freeze]) {
        assert_eq!(wal.read(a.position).unwrap().lsn, a.lsn);
    }
}

#[test]
fn every_crash_point_keeps_acknowledged_commits() {
    // Freeze durability after each possible sync in turn and check the image each time.
    for freeze_after in 1..12 {
        let storage = MemStorage::new();
        let wal = open(&storage);
        wait_for_spare(&wal);
        let syncs_at_start = storage.syncs();
        storage.freeze_durability_after_nth_sync(freeze_after);
        let mut acknowledged_before_freeze = Vec::new();
        for i in 0..30u8 {
            let a = wal.commit(1, &vec![i; 100 + i as usize * 40]).unwrap();
            if storage.syncs() - syncs_at_start <= freeze_after {
                acknowledged_before_freeze.push(a);
            }
        }
        let image = storage.crash_image(Some(freeze_after));
        drop(wal);
        let wal = Wal::open_storage(Arc::new(image), options()).unwrap();
        for a in &acknowledged_before_freeze {
            let record = wal.read(a.position).unwrap();
            assert_eq!(record.lsn, a.lsn, "freeze after sync {freeze_after}");
        }
        let found = wal
            .records_from(Lsn(0))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .len();
        assert!(found >= acknowledged_before_freeze.len());
    }
}
