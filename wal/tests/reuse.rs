//! Released segments reused as spares: their files become new segments without being
//! zero-filled, and nothing of their previous life ever surfaces (`FORMAT.md`, "Salt").

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_wal::format::{self, RECORD_ALIGN_BYTES, Salt};
use herald_wal::{Lsn, MemStorage, Options, SegmentInfo, Storage, Wal};

const SEGMENT_BYTES: u64 = 8192;
/// Bound of any wait for the spare thread: only a hang reaches it.
const WAIT: Duration = Duration::from_secs(30);
/// Byte the records of the first life are filled with.
const OLD_FILL: u8 = 0xA5;

fn options() -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        ..Options::default()
    }
}

fn active(wal: &Wal) -> SegmentInfo {
    wal.segments()
        .into_iter()
        .find(|s| s.active)
        .expect("a log has an active segment")
}

/// A log whose active segment is a reused file: records of the first life (all `OLD_FILL`)
/// are released, and commits go on until the log has rolled over into a reused spare. Returns
/// the log and the LSNs committed since the release.
fn log_in_a_reused_segment(storage: &MemStorage) -> (Wal, Vec<Lsn>) {
    let shared: Arc<dyn Storage> = Arc::new(storage.clone());
    let wal = Wal::open_storage(shared, options()).unwrap();
    let mut last = wal.commit(1, &[OLD_FILL; 700]).unwrap();
    while wal.segments().len() < 4 {
        last = wal.commit(1, &[OLD_FILL; 700]).unwrap();
    }
    assert_eq!(wal.release_before(last.lsn).unwrap(), 3);
    let released_first = wal.first_lsn();
    let mut since = Vec::new();
    let started = Instant::now();
    loop {
        let segment = active(&wal);
        if wal.segments_reused() > 0 && segment.first_lsn > released_first {
            let bytes = storage.file_bytes(&segment.name).unwrap();
            // A reused file still holds its old records past the new ones: this is the case.
            if bytes[segment.written_bytes as usize..].contains(&OLD_FILL) {
                return (wal, since);
            }
        }
        assert!(
            started.elapsed() < WAIT,
            "the log never rolled into a reused file"
        );
        since.push(wal.commit(2, &[0x11; 300]).unwrap().lsn);
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn replayed(storage: &MemStorage) -> Vec<Lsn> {
    let shared: Arc<dyn Storage> = Arc::new(storage.clone());
    let recovery = Wal::recover_storage(shared, options()).unwrap();
    recovery.map(|r| r.unwrap().lsn).collect()
}

#[test]
fn a_reused_file_becomes_a_segment_and_a_clean_reopen_sees_only_its_own_records() {
    let storage = MemStorage::new();
    let (wal, since) = log_in_a_reused_segment(&storage);
    let next = wal.next_lsn();
    let payloads: Vec<Vec<u8>> = wal
        .records_from(*since.first().unwrap())
        .unwrap()
        .map(|r| r.unwrap().payload.to_vec())
        .collect();
    assert!(payloads.iter().all(|p| p == &[0x11; 300]));
    wal.close().unwrap();

    let lsns = replayed(&storage);
    assert_eq!(lsns.last().copied(), Some(Lsn(next.0 - 1)));
    assert!(lsns.windows(2).all(|w| w[1] == w[0].next()));
    let shared: Arc<dyn Storage> = Arc::new(storage.clone());
    let wal = Wal::open_storage(shared, options()).unwrap();
    assert_eq!(
        wal.recovery_report().truncated,
        None,
        "old records after the end are not a torn tail"
    );
    assert_eq!(wal.next_lsn(), next);
    let appended = wal.commit(3, b"after reopen").unwrap();
    assert_eq!(
        &*wal.read(appended.position).unwrap().payload,
        b"after reopen"
    );
}

#[test]
fn a_record_planted_after_the_end_of_a_reused_segment_is_refused() {
    let storage = MemStorage::new();
    let (wal, _) = log_in_a_reused_segment(&storage);
    let next = wal.next_lsn();
    let segment = active(&wal);
    wal.close().unwrap();

    // Where the next record goes, a well-formed record with the next LSN: checksummed without
    // a salt, and under a salt other than the segment's (what an old message body, or the
    // file's previous life, could hold). Neither may enter the log.
    for salt in [Salt::NONE, Salt::new(7)] {
        let mut bytes = storage.file_bytes(&segment.name).unwrap();
        let mut forged = Vec::new();
        format::encode_record(&mut forged, next, Lsn(0), 9, b"forged", salt);
        let at = segment.written_bytes.next_multiple_of(RECORD_ALIGN_BYTES) as usize;
        bytes[at..at + forged.len()].copy_from_slice(&forged);
        storage.set_file_bytes(&segment.name, bytes);

        let lsns = replayed(&storage);
        assert_eq!(lsns.last().copied(), Some(Lsn(next.0 - 1)), "{salt:?}");
        let shared: Arc<dyn Storage> = Arc::new(storage.clone());
        let wal = Wal::open_storage(shared, options()).unwrap();
        assert_eq!(wal.next_lsn(), next, "{salt:?}");
        wal.close().unwrap();
    }
}

#[test]
fn a_torn_record_in_a_reused_segment_is_cut_and_the_log_goes_on() {
    let storage = MemStorage::new();
    let (wal, _) = log_in_a_reused_segment(&storage);
    let segment = active(&wal);
    let last = wal.commit(4, &[0x22; 500]).unwrap();
    assert_eq!(
        last.position.segment, segment.first_lsn,
        "still the reused segment"
    );
    wal.close().unwrap();

    // Tear the last record's payload: recovery cuts the log before it.
    let mut bytes = storage.file_bytes(&segment.name).unwrap();
    let payload_at = last.position.offset as usize + format::RECORD_HEADER_BYTES as usize;
    bytes[payload_at + 100] ^= 0xFF;
    storage.set_file_bytes(&segment.name, bytes);
    let lsns = replayed(&storage);
    assert_eq!(lsns.last().copied(), Some(Lsn(last.lsn.0 - 1)));

    // The log continues where the torn record was, with its LSN, and reopens cleanly after.
    let shared: Arc<dyn Storage> = Arc::new(storage.clone());
    let wal = Wal::open_storage(shared.clone(), options()).unwrap();
    let truncated = wal
        .recovery_report()
        .truncated
        .clone()
        .expect("the torn record is cut");
    assert_eq!(truncated.offset, u64::from(last.position.offset));
    assert!(
        truncated.bytes_zeroed > 0,
        "the torn record's own bytes are zeroed"
    );
    assert_eq!(wal.next_lsn(), last.lsn);
    let again = wal.commit(5, b"short").unwrap();
    assert_eq!(again.lsn, last.lsn);
    wal.close().unwrap();
    let wal = Wal::open_storage(shared, options()).unwrap();
    assert_eq!(wal.next_lsn(), last.lsn.next());
    assert_eq!(&*wal.read(again.position).unwrap().payload, b"short");
}

/// Bytes borrowed from a log's mapped segment outlive the `Wal` handle: the directory stays
/// locked until the last of them drops, so another open cannot reuse that segment's file and
/// rewrite bytes handed out as immutable.
#[test]
fn the_directory_stays_locked_while_mapped_bytes_are_borrowed() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), options()).unwrap();
    let appended = wal.commit(1, &[OLD_FILL; 1000]).unwrap();
    let body = wal.read(appended.position).unwrap().payload;
    assert!(
        body.is_mapped(),
        "a sealed or active segment is read through its map"
    );
    drop(wal);
    match Wal::open(dir.path(), options()) {
        Err(herald_wal::Error::Locked { .. }) => {}
        other => panic!("expected Locked while bytes are borrowed, got {other:?}"),
    }
    assert!(body.iter().all(|&b| b == OLD_FILL));
    drop(body);
    let wal = Wal::open(dir.path(), options()).expect("unlocked once the last borrow dropped");
    assert_eq!(wal.next_lsn(), appended.lsn.next());
}
