//! The on-disk contract, run once per write backend this build has: `Pwrite` always, `IoUring`
//! when herald-wal is built with its `io-uring` feature (as `cargo test --workspace` does, through
//! herald-tests). Each test asserts the backend it asked for is the one in use, so an io_uring run
//! can never silently be a pwrite run.

use std::os::unix::fs::FileExt;

use herald_wal::{Lsn, Options, Wal, WriteBackend};

/// Every backend this build can run. Set `HERALD_SKIP_IO_URING=1` to leave io_uring out on a
/// machine whose kernel refuses it (a seccomp filter in a container, `kernel.io_uring_disabled`);
/// otherwise such a machine fails these tests rather than skipping them silently.
fn backends() -> Vec<WriteBackend> {
    let mut backends = vec![WriteBackend::Pwrite];
    if cfg!(all(target_os = "linux", feature = "io-uring"))
        && std::env::var_os("HERALD_SKIP_IO_URING").is_none()
    {
        backends.push(WriteBackend::IoUring);
    }
    backends
}

fn options(backend: WriteBackend) -> Options {
    Options {
        segment_bytes: 8192,
        write_backend: backend,
        ..Options::default()
    }
}

fn open(dir: &std::path::Path, backend: WriteBackend) -> Wal {
    let wal = Wal::open(dir, options(backend))
        .unwrap_or_else(|e| panic!("opening with {backend:?}: {e}"));
    assert_eq!(
        wal.write_backend(),
        backend,
        "the backend asked for is in use"
    );
    println!("backend in use: {:?}", wal.write_backend());
    wal
}

fn payload(i: u32) -> Vec<u8> {
    format!("record number {i} ")
        .repeat(i as usize % 7 + 1)
        .into_bytes()
}

#[test]
fn commit_read_reopen_across_segments() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let mut appended = Vec::new();
        {
            let wal = open(dir.path(), backend);
            for i in 0..200u32 {
                let a = wal.commit(1 + (i % 3) as u8, &payload(i)).unwrap();
                assert_eq!(a.lsn, Lsn(i as u64 + 1));
                assert!(
                    wal.durable_lsn() >= a.lsn,
                    "{backend:?}: commit returned durable"
                );
                appended.push(a);
            }
            for (i, a) in appended.iter().enumerate() {
                let record = wal.read(a.position).unwrap();
                assert_eq!(record.lsn, a.lsn);
                assert_eq!(&*record.payload, &payload(i as u32)[..]);
                assert!(record.payload.is_mapped());
            }
            assert!(
                wal.segments().len() >= 3,
                "{backend:?}: 200 records span segments"
            );
        }
        for _ in 0..3 {
            let wal = open(dir.path(), backend);
            assert_eq!(wal.next_lsn(), Lsn(201));
            assert_eq!(wal.recovery_report().truncated, None);
            let records: Vec<_> = wal
                .records_from(Lsn(0))
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            assert_eq!(records.len(), 200);
            for (i, (record, a)) in records.iter().zip(&appended).enumerate() {
                assert_eq!((record.lsn, record.position), (a.lsn, a.position));
                assert_eq!(&*record.payload, &payload(i as u32)[..]);
            }
        }
    }
}

#[test]
fn concurrent_committers_are_durable_and_survive_reopen() {
    const THREADS: u8 = 8;
    const COMMITS: u32 = 100;
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = open(dir.path(), backend);
            std::thread::scope(|scope| {
                for t in 0..THREADS {
                    let wal = &wal;
                    scope.spawn(move || {
                        for i in 0..COMMITS {
                            let a = wal.commit(t + 1, &i.to_le_bytes()).unwrap();
                            assert!(wal.durable_lsn() >= a.lsn, "{backend:?}: commit returned");
                            assert_eq!(&*wal.read(a.position).unwrap().payload, &i.to_le_bytes());
                        }
                    });
                }
            });
            assert_eq!(wal.durable_lsn(), Lsn(THREADS as u64 * COMMITS as u64));
        }
        let wal = open(dir.path(), backend);
        assert_eq!(wal.next_lsn(), Lsn(THREADS as u64 * COMMITS as u64 + 1));
        // Each committer's records come back in its own order.
        let mut next_per_thread = [0u32; THREADS as usize];
        for record in wal.records_from(Lsn(1)).unwrap() {
            let record = record.unwrap();
            let t = (record.kind - 1) as usize;
            let i = u32::from_le_bytes(record.payload[..].try_into().unwrap());
            assert_eq!(
                i, next_per_thread[t],
                "{backend:?}: thread {t} out of order"
            );
            next_per_thread[t] += 1;
        }
        assert_eq!(next_per_thread, [COMMITS; THREADS as usize]);
    }
}

#[test]
fn release_before_then_reopen() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), backend);
        let first = wal.commit(1, b"first, borrowed across release").unwrap();
        let held = wal.read(first.position).unwrap();
        let mut last = first;
        while wal.segments().len() < 4 {
            last = wal.commit(1, &[9u8; 1000]).unwrap();
        }
        assert_eq!(wal.release_before(last.lsn).unwrap(), 3);
        assert_eq!(wal.segments().len(), 1);
        assert_eq!(&*held.payload, b"first, borrowed across release");
        assert!(wal.read(first.position).is_err());
        drop(held);
        let after = wal.commit(2, b"after release").unwrap();
        drop(wal);
        let wal = open(dir.path(), backend);
        assert_eq!(wal.next_lsn(), after.lsn.next());
        assert_eq!(wal.first_lsn(), wal.segments()[0].first_lsn);
        assert!(wal.first_lsn() > first.lsn);
        assert_eq!(
            &*wal.read(after.position).unwrap().payload,
            b"after release"
        );
    }
}

#[test]
fn drop_syncs_and_reopen_continues() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let mut expected = Vec::new();
        for round in 0..5u32 {
            let wal = open(dir.path(), backend);
            assert_eq!(wal.next_lsn(), Lsn(expected.len() as u64 + 1));
            for i in 0..30u32 {
                // `append` only: the drop must make these durable.
                let body = format!("round {round} record {i}").into_bytes();
                wal.append(1, &body).unwrap();
                expected.push(body);
            }
        }
        let wal = open(dir.path(), backend);
        let bodies: Vec<Vec<u8>> = wal
            .records_from(Lsn(1))
            .unwrap()
            .map(|r| r.unwrap().payload.to_vec())
            .collect();
        assert_eq!(bodies, expected, "{backend:?}");
    }
}

#[test]
fn torn_tail_is_cut_and_appends_continue() {
    for backend in backends() {
        let dir = tempfile::tempdir().unwrap();
        let last = {
            let wal = open(dir.path(), backend);
            let mut last = None;
            for i in 0..60u32 {
                last = Some(wal.commit(1, &payload(i)).unwrap());
            }
            last.unwrap()
        };
        // What a crash mid-write leaves: garbage after the last complete record.
        let wal = open(dir.path(), backend);
        let active = wal.segments().pop().unwrap();
        drop(wal);
        let tail = active.written_bytes;
        let garbage: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(&active.name))
            .unwrap();
        file.write_all_at(&garbage, tail).unwrap();
        file.sync_all().unwrap();
        drop(file);

        let wal = open(dir.path(), backend);
        let truncated = wal
            .recovery_report()
            .truncated
            .clone()
            .unwrap_or_else(|| panic!("{backend:?}: the garbage tail was not cut"));
        assert_eq!(
            (truncated.segment.as_str(), truncated.offset),
            (active.name.as_str(), tail)
        );
        assert_eq!(wal.next_lsn(), last.lsn.next());
        let next = wal.commit(2, b"after the torn tail").unwrap();
        assert_eq!(next.lsn, last.lsn.next());
        drop(wal);

        let wal = open(dir.path(), backend);
        assert_eq!(
            wal.recovery_report().truncated,
            None,
            "{backend:?}: cut once, for good"
        );
        assert_eq!(
            &*wal.read(next.position).unwrap().payload,
            b"after the torn tail"
        );
        assert_eq!(wal.records_from(Lsn(1)).unwrap().count() as u64, next.lsn.0);
    }
}

#[test]
fn auto_picks_io_uring_only_where_built() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), options(WriteBackend::Auto)).unwrap();
    let expected = if backends().contains(&WriteBackend::IoUring) {
        WriteBackend::IoUring
    } else {
        WriteBackend::Pwrite
    };
    println!("Auto chose {:?}", wal.write_backend());
    if std::env::var_os("HERALD_SKIP_IO_URING").is_none() {
        assert_eq!(wal.write_backend(), expected);
    }
    wal.commit(1, b"x").unwrap();
    assert_eq!(Options::default().write_backend, WriteBackend::Pwrite);
}

#[cfg(not(all(target_os = "linux", feature = "io-uring")))]
#[test]
fn io_uring_without_the_feature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    match Wal::open(dir.path(), options(WriteBackend::IoUring)) {
        Err(herald_wal::Error::InvalidOptions(message)) => {
            assert!(message.contains("io-uring"), "{message}")
        }
        other => panic!("expected InvalidOptions, got {other:?}"),
    }
}

#[cfg(all(target_os = "linux", feature = "io-uring"))]
#[test]
fn io_uring_storage_carries_the_writes() {
    use std::sync::Arc;

    use herald_wal::{Storage, UringStorage};
    // Pins: an io_uring backend that quietly fell back to pwrite for everything would pass
    // every other test here.
    UringStorage::probe().expect("io_uring usable (set HERALD_SKIP_IO_URING=1 where it is not)");
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(UringStorage::new(dir.path()).unwrap());
    {
        let wal = Wal::open_storage(
            storage.clone() as Arc<dyn Storage>,
            options(WriteBackend::IoUring),
        )
        .unwrap();
        std::thread::scope(|scope| {
            for t in 0..4u8 {
                let wal = &wal;
                scope.spawn(move || {
                    for i in 0..50u32 {
                        wal.commit(t + 1, &i.to_le_bytes()).unwrap();
                    }
                });
            }
        });
    }
    println!(
        "io_uring operations: {} through rings, {} writes refused by the file system, {} fell back",
        storage.ring_operations(),
        storage.refused_writes(),
        storage.fallback_operations()
    );
    // 200 record writes, their syncs, spare zero-fills and headers: every write was offered
    // to a ring as a non-blocking write (or, after the file system refused the first ones of
    // a file, written with pwrite), every sync went through a ring, and nothing fell back
    // for want of a ring.
    assert!(storage.ring_operations() + storage.refused_writes() >= 200);
    assert!(storage.ring_operations() > 0);
    assert_eq!(storage.fallback_operations(), 0);
    let wal = open(dir.path(), WriteBackend::IoUring);
    assert_eq!(wal.next_lsn(), Lsn(201));
}
