//! The log's basic contract, on real files and on the memory storage.

use std::sync::Arc;

use herald_wal::{Durability, Error, Lsn, MemStorage, Options, Storage, Wal};

fn small_options() -> Options {
    Options {
        segment_bytes: 8192,
        ..Options::default()
    }
}

#[test]
fn commit_read_reopen_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut positions = Vec::new();
    {
        let wal = Wal::open(dir.path(), small_options()).unwrap();
        assert_eq!(wal.next_lsn(), Lsn(1));
        for i in 0..200u32 {
            let payload = format!("record number {i}").repeat(i as usize % 7 + 1);
            let appended = wal.commit(1 + (i % 3) as u8, payload.as_bytes()).unwrap();
            assert_eq!(appended.lsn, Lsn(i as u64 + 1));
            assert!(wal.durable_lsn() >= appended.lsn);
            positions.push((appended, payload));
        }
        for (appended, payload) in &positions {
            let record = wal.read(appended.position).unwrap();
            assert_eq!(record.lsn, appended.lsn);
            assert_eq!(&*record.payload, payload.as_bytes());
            assert!(
                record.payload.is_mapped(),
                "file storage reads through the map"
            );
        }
        assert!(
            wal.segments().len() >= 3,
            "200 records span several 8 KiB segments"
        );
    }
    let wal = Wal::open(dir.path(), small_options()).unwrap();
    assert_eq!(wal.next_lsn(), Lsn(201));
    assert_eq!(wal.recovery_report().truncated, None);
    let all: Vec<_> = wal
        .records_from(Lsn(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(all.len(), 200);
    for (record, (appended, payload)) in all.iter().zip(&positions) {
        assert_eq!(record.lsn, appended.lsn);
        assert_eq!(record.position, appended.position);
        assert_eq!(&*record.payload, payload.as_bytes());
    }
}

#[test]
fn second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _wal = Wal::open(dir.path(), small_options()).unwrap();
    match Wal::open(dir.path(), small_options()) {
        Err(Error::Locked { .. }) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn oversized_record_and_reserved_kind_are_refused() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let wal = Wal::open_storage(storage, small_options()).unwrap();
    let max = wal.record_payload_bytes_max() as usize;
    wal.commit(1, &vec![7u8; max]).expect("the maximum fits");
    match wal.commit(1, &vec![7u8; max + 1]) {
        Err(Error::RecordTooLarge { len, max: m }) => assert_eq!((len, m), (max + 1, max)),
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    assert!(matches!(wal.commit(0, b"x"), Err(Error::ReservedKind)));
    // The refused appends consumed nothing.
    assert_eq!(wal.next_lsn(), Lsn(2));
}

#[test]
fn release_removes_old_segments_but_keeps_borrowed_bytes_alive() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small_options()).unwrap();
    let first = wal
        .commit(1, b"first record, borrowed across release")
        .unwrap();
    let held = wal.read(first.position).unwrap();
    let mut last = first;
    while wal.segments().len() < 4 {
        last = wal.commit(1, &[9u8; 1000]).unwrap();
    }
    let released = wal.release_before(last.lsn).unwrap();
    assert_eq!(released, 3);
    assert_eq!(wal.segments().len(), 1);
    assert!(wal.first_lsn() > first.lsn);
    assert_eq!(&*held.payload, b"first record, borrowed across release");
    assert!(wal.read(first.position).is_err());
    drop(held);
    let count = |suffix: &str| {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().ends_with(suffix)
            })
            .count()
    };
    assert_eq!(count(".seg"), 1, "released segments are no longer live");
    // Once unused, a released file is kept to be reused as a spare (at most `spare_segments`
    // of them, renamed when a spare is wanted) or deleted.
    assert!(
        count(".released") <= small_options().spare_segments,
        "{} released files left",
        count(".released")
    );
    drop(wal);
    assert_eq!(
        count(".released"),
        0,
        "closing deletes released files kept for reuse"
    );
    let wal = Wal::open(dir.path(), small_options()).unwrap();
    assert_eq!(wal.next_lsn(), last.lsn.next());
}

#[test]
fn released_segments_are_let_go_without_a_sync_under_no_durability() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        durability: Durability::None,
        ..small_options()
    };
    let wal = Wal::open(dir.path(), options).unwrap();
    let mut last = wal.commit(1, &[7u8; 1000]).unwrap();
    while wal.segments().len() < 5 {
        last = wal.commit(1, &[7u8; 1000]).unwrap();
    }
    assert!(wal.durable_lsn() < last.lsn, "nothing synced the log");
    assert_eq!(wal.release_before(last.lsn).unwrap(), 4);
    // Released files nobody reads are reused (one is kept for that) or deleted at once; before,
    // the group commit held on to every unsynced segment until a sync that never came.
    let released = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".released")
        })
        .count();
    assert!(released <= 1, "{released} released files still held");
}

#[test]
fn concurrent_committers_all_become_durable() {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let wal = Wal::open_storage(storage, small_options()).unwrap();
    std::thread::scope(|scope| {
        for t in 0..8u8 {
            let wal = &wal;
            scope.spawn(move || {
                for i in 0..100u32 {
                    let a = wal.commit(t + 1, &i.to_le_bytes()).unwrap();
                    assert!(wal.durable_lsn() >= a.lsn);
                }
            });
        }
    });
    assert_eq!(wal.next_lsn(), Lsn(801));
    let records: Vec<_> = wal
        .records_from(Lsn(1))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(records.len(), 800);
}

#[test]
fn durability_none_survives_process_but_syncs_on_request() {
    let storage = MemStorage::new();
    let options = Options {
        durability: Durability::None,
        ..small_options()
    };
    let wal = Wal::open_storage(Arc::new(storage.clone()), options.clone()).unwrap();
    let a = wal.commit(1, b"not yet durable").unwrap();
    assert!(wal.durable_lsn() < a.lsn);
    assert_eq!(wal.sync().unwrap(), a.lsn);
    let image = storage.crash_image(None);
    std::mem::forget(wal);
    let recovered = Wal::open_storage(Arc::new(image), options).unwrap();
    assert_eq!(recovered.next_lsn(), Lsn(2));
}

#[test]
fn batched_durability_returns_early_and_syncs_in_the_background() {
    let storage = MemStorage::new();
    let options = Options {
        durability: Durability::Batched {
            max_delay: std::time::Duration::from_millis(5),
        },
        ..small_options()
    };
    let wal = Wal::open_storage(Arc::new(storage.clone()), options.clone()).unwrap();
    let appended = wal.commit(1, b"batched").unwrap();
    // The background syncer catches up without anyone asking (bounded wait on the condition).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal.durable_lsn() < appended.lsn {
        assert!(
            std::time::Instant::now() < deadline,
            "batched sync never happened"
        );
        std::thread::yield_now();
    }
    let image = storage.crash_image(None);
    drop(wal);
    let wal = Wal::open_storage(Arc::new(image), options).unwrap();
    assert_eq!(&*wal.read(appended.position).unwrap().payload, b"batched");
}

#[test]
fn recovery_replays_from_the_requested_lsn() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = Wal::open(dir.path(), small_options()).unwrap();
        for i in 0..100u32 {
            let mut payload = i.to_le_bytes().to_vec();
            payload.resize(300, 0xEE);
            wal.commit(1, &payload).unwrap();
        }
    }
    let options = Options {
        replay_from: Lsn(61),
        ..small_options()
    };
    let mut recovery = Wal::recover(dir.path(), options).unwrap();
    let replayed: Vec<_> = recovery.by_ref().map(|r| r.unwrap()).collect();
    assert_eq!(replayed.first().unwrap().lsn, Lsn(61));
    assert_eq!(replayed.len(), 40);
    for record in &replayed {
        assert_eq!(
            &record.payload[..4],
            &(record.lsn.0 as u32 - 1).to_le_bytes()
        );
    }
    assert_eq!(recovery.report().records_replayed, 40);
    // (Borrowed bytes keep the directory locked: see `reuse.rs`.)
    drop(replayed);
    let wal = recovery.finish().unwrap();
    assert_eq!(wal.next_lsn(), Lsn(101));
    // Once released, earlier LSNs cannot be replayed: a clear error, not an empty replay.
    let released = wal.release_before(Lsn(90)).unwrap();
    assert!(released > 0);
    let first = wal.first_lsn();
    drop(wal);
    let options = Options {
        replay_from: Lsn(1),
        ..small_options()
    };
    match Wal::recover(dir.path(), options) {
        Err(Error::LsnOutOfRange { lsn, first: f, .. }) => assert_eq!((lsn, f), (Lsn(1), first)),
        other => panic!("expected LsnOutOfRange, got {other:?}"),
    }
}

#[test]
fn readers_run_alongside_writers() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(
        dir.path(),
        Options {
            durability: Durability::None,
            ..small_options()
        },
    )
    .unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..3u8 {
            let (wal, done) = (&wal, &done);
            scope.spawn(move || {
                for i in 0..300u32 {
                    let payload = [t; 64]
                        .iter()
                        .chain(&i.to_le_bytes())
                        .copied()
                        .collect::<Vec<_>>();
                    let a = wal.commit(t + 1, &payload).unwrap();
                    let record = wal.read(a.position).unwrap();
                    assert_eq!(&*record.payload, &payload[..]);
                }
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            });
        }
        let (wal, done) = (&wal, &done);
        scope.spawn(move || {
            let mut passes = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || passes == 0 {
                let mut expected = wal.first_lsn();
                for record in wal.records_from(Lsn(0)).unwrap() {
                    let record = record.unwrap();
                    assert_eq!(record.lsn, expected, "records come back gap-free, in order");
                    assert_eq!(record.payload.len(), 68);
                    expected = expected.next();
                }
                passes += 1;
            }
        });
    });
    assert_eq!(wal.next_lsn(), Lsn(901));
}

#[test]
fn appended_payload_borrows_what_was_just_written() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), small_options()).unwrap();
    let appended = wal.commit(3, b"just written").unwrap();
    assert_eq!(appended.payload_len, 12);
    let bytes = wal.appended_payload(&appended).unwrap();
    assert!(bytes.is_mapped());
    assert_eq!(&*bytes, b"just written");
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let wal = Wal::open_storage(storage, small_options()).unwrap();
    let appended = wal.append(3, b"in memory").unwrap();
    assert_eq!(&*wal.appended_payload(&appended).unwrap(), b"in memory");
}

/// A lazy waiter leaves the sync to a committer that comes within its grace (one `fdatasync`
/// covers both records), and syncs itself once the grace has passed with nobody else syncing.
#[test]
fn a_lazy_wait_is_covered_by_another_committers_sync_or_syncs_after_its_grace() {
    let storage = MemStorage::new();
    let wal = Arc::new(Wal::open_storage(Arc::new(storage.clone()), small_options()).unwrap());
    // Whatever the spare thread syncs happens before the counting starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !storage.file_names().iter().any(|n| n.ends_with(".spare")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no spare segment appeared"
        );
        std::thread::yield_now();
    }
    let syncs = storage.syncs();
    let first = wal.append(1, b"arrival").unwrap();
    let lazy = {
        let wal = wal.clone();
        // A grace no test run reaches: if the commit below did not cover the record, the wait
        // would end only by syncing itself, after it, and the count would show two syncs.
        std::thread::spawn(move || {
            wal.wait_durable_lazily(first.lsn, std::time::Duration::from_secs(30))
        })
    };
    // Most likely the lazy waiter is registered by then; if not, it finds its record durable
    // at once. Either way one sync covers both.
    std::thread::sleep(std::time::Duration::from_millis(10));
    let second = wal.commit(1, b"receive and reply").unwrap();
    lazy.join().unwrap().unwrap();
    assert!(wal.durable_lsn() >= second.lsn);
    assert_eq!(storage.syncs(), syncs + 1, "one sync covered both records");

    let third = wal.append(1, b"nobody commits after this").unwrap();
    wal.wait_durable_lazily(third.lsn, std::time::Duration::from_millis(1))
        .unwrap();
    assert!(wal.durable_lsn() >= third.lsn);
    assert_eq!(storage.syncs(), syncs + 2, "the lazy waiter synced itself");
}
