//! Damaged logs on disk: each case must end in a clear typed error or a documented truncation,
//! never a panic, and never a silently skipped record.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use herald_wal::format::FORMAT_VERSION;
use herald_wal::{Appended, Error, Lsn, Options, Wal, segment_file_name};

fn options() -> Options {
    Options {
        segment_bytes: 16 * 1024,
        ..Options::default()
    }
}

/// Writes `count` committed records of 100..400 bytes; returns what was appended.
fn write_log(dir: &Path, count: u32) -> Vec<Appended> {
    let wal = Wal::open(dir, options()).unwrap();
    let appended = (0..count)
        .map(|i| {
            wal.commit(1, &vec![i as u8; 100 + (i as usize * 37) % 300])
                .unwrap()
        })
        .collect();
    wal.close().unwrap();
    appended
}

fn segment_path(dir: &Path, segment: Lsn) -> std::path::PathBuf {
    dir.join(segment_file_name(segment))
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
    file.sync_all().unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], offset).unwrap();
}

fn record_count(wal: &Wal) -> usize {
    wal.records_from(Lsn(0))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .len()
}

#[test]
fn zeroed_tail_is_truncated_and_appending_continues() {
    let dir = tempfile::tempdir().unwrap();
    let appended = write_log(dir.path(), 40);
    let last = appended.last().unwrap();
    // Zero the last record, as if its sectors never reached the disk.
    patch(
        &segment_path(dir.path(), last.position.segment),
        last.position.offset as u64,
        &[0u8; 512],
    );
    let wal = Wal::open(dir.path(), options()).unwrap();
    assert_eq!(wal.next_lsn(), last.lsn, "the zeroed record is cut off");
    assert_eq!(record_count(&wal), 39);
    let again = wal.commit(1, b"after the cut").unwrap();
    assert_eq!(again.lsn, last.lsn);
    assert_eq!(
        &*wal.read(again.position).unwrap().payload,
        b"after the cut"
    );
}

#[test]
fn garbage_tail_is_cut_once_and_reopening_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let appended = write_log(dir.path(), 30);
    let last = appended.last().unwrap();
    let path = segment_path(dir.path(), last.position.segment);
    let end = std::fs::read(&path).unwrap().len() as u64;
    let after_last = last.position.offset as u64 + 24 + 400;
    let garbage: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 13) as u8).collect();
    let at = after_last.min(end - garbage.len() as u64) & !7;
    patch(&path, at, &garbage);

    let wal = Wal::open(dir.path(), options()).unwrap();
    let report = wal.recovery_report().clone();
    let cut = report
        .truncated
        .expect("the garbage is reported as a cut tail");
    assert!(cut.bytes_zeroed > 0);
    assert_eq!(wal.next_lsn(), last.lsn.next());
    drop(wal);
    // Ten reopens: same state each time, nothing more cut.
    for _ in 0..10 {
        let wal = Wal::open(dir.path(), options()).unwrap();
        assert_eq!(wal.next_lsn(), last.lsn.next());
        assert_eq!(wal.recovery_report().truncated, None);
        assert_eq!(record_count(&wal), 30);
    }
}

#[test]
fn flipped_byte_mid_log_is_reported_with_segment_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let appended = write_log(dir.path(), 200);
    assert!(
        appended.last().unwrap().position.segment > Lsn(1),
        "several segments"
    );
    let victim = appended[20];
    // A payload byte of record 21: its checksum fails, later durable records prove it mattered.
    flip_byte(
        &segment_path(dir.path(), victim.position.segment),
        victim.position.offset as u64 + 24 + 50,
    );
    match Wal::open(dir.path(), options()) {
        Err(Error::Corruption {
            segment,
            offset,
            reason,
        }) => {
            assert_eq!(segment, segment_file_name(victim.position.segment));
            assert_eq!(offset, victim.position.offset as u64);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
    // Reporting is stable: the log was not modified by the failed open.
    assert!(matches!(
        Wal::open(dir.path(), options()),
        Err(Error::Corruption { .. })
    ));
}

#[test]
fn flipped_length_byte_in_active_segment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let appended = write_log(dir.path(), 200);
    let last_segment = appended.last().unwrap().position.segment;
    let in_last: Vec<_> = appended
        .iter()
        .filter(|a| a.position.segment == last_segment)
        .collect();
    assert!(in_last.len() > 3);
    let victim = in_last[1];
    // The length field: the reader loses the framing, but later records still prove damage.
    flip_byte(
        &segment_path(dir.path(), last_segment),
        victim.position.offset as u64 + 1,
    );
    match Wal::open(dir.path(), options()) {
        Err(Error::Corruption {
            segment, offset, ..
        }) => {
            assert_eq!(segment, segment_file_name(last_segment));
            assert_eq!(offset, victim.position.offset as u64);
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
}

#[test]
fn missing_middle_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let appended = write_log(dir.path(), 200);
    let mut segments: Vec<Lsn> = appended.iter().map(|a| a.position.segment).collect();
    segments.dedup();
    assert!(segments.len() >= 3);
    std::fs::remove_file(segment_path(dir.path(), segments[1])).unwrap();
    assert!(matches!(
        Wal::open(dir.path(), options()),
        Err(Error::Corruption { .. })
    ));
}

#[test]
fn truncated_header_is_a_bad_header() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5);
    let path = segment_path(dir.path(), Lsn(1));
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(10).unwrap();
    match Wal::open(dir.path(), options()) {
        Err(Error::BadSegmentHeader { segment, reason }) => {
            assert_eq!(segment, segment_file_name(Lsn(1)));
            assert!(reason.contains("10 bytes"), "{reason}");
        }
        other => panic!("expected BadSegmentHeader, got {other:?}"),
    }
}

#[test]
fn truncated_segment_body_is_a_bad_header() {
    // A shortened file could not be mapped safely: refuse it before mapping.
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5);
    let path = segment_path(dir.path(), Lsn(1));
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    match Wal::open(dir.path(), options()) {
        Err(Error::BadSegmentHeader { reason, .. }) => {
            assert!(reason.contains("truncated"), "{reason}")
        }
        other => panic!("expected BadSegmentHeader, got {other:?}"),
    }
}

#[test]
fn wrong_magic_is_a_bad_header() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5);
    patch(&segment_path(dir.path(), Lsn(1)), 0, b"NOTHERLD");
    match Wal::open(dir.path(), options()) {
        Err(Error::BadSegmentHeader { reason, .. }) => {
            assert!(reason.contains("magic"), "{reason}")
        }
        other => panic!("expected BadSegmentHeader, got {other:?}"),
    }
}

#[test]
fn segment_from_a_future_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5);
    patch(
        &segment_path(dir.path(), Lsn(1)),
        8,
        &(FORMAT_VERSION + 1).to_le_bytes(),
    );
    match Wal::open(dir.path(), options()) {
        Err(Error::UnsupportedVersion {
            found, supported, ..
        }) => assert_eq!((found, supported), (FORMAT_VERSION + 1, FORMAT_VERSION)),
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[test]
fn header_checksum_damage_is_a_bad_header() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5);
    flip_byte(&segment_path(dir.path(), Lsn(1)), 17);
    assert!(matches!(
        Wal::open(dir.path(), options()),
        Err(Error::BadSegmentHeader { .. })
    ));
}

#[test]
fn renamed_segment_disagreeing_with_its_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5);
    std::fs::rename(
        segment_path(dir.path(), Lsn(1)),
        segment_path(dir.path(), Lsn(7)),
    )
    .unwrap();
    match Wal::open(dir.path(), options()) {
        Err(Error::BadSegmentHeader { reason, .. }) => {
            assert!(reason.contains("first LSN"), "{reason}")
        }
        other => panic!("expected BadSegmentHeader, got {other:?}"),
    }
}

#[test]
fn unrelated_files_in_the_directory_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5);
    std::fs::write(dir.path().join("notes.txt"), b"operator notes").unwrap();
    let wal = Wal::open(dir.path(), options()).unwrap();
    assert_eq!(record_count(&wal), 5);
    assert!(dir.path().join("notes.txt").exists());
}
