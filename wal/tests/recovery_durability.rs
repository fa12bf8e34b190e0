//! What recovery must make durable and must refuse: the directory's names after a crash between
//! a rename and its directory sync, acknowledged segments after a missing one of another size,
//! a header claiming LSN 0; and a release whose directory sync failed does not block the next.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use herald_wal::{Durability, Error, MemStorage, Options, Storage, StorageFile, Wal};

/// `MemStorage` whose first `sync_dir` after a rename to a name ending in `suffix` fails, once
/// armed: a process killed before that directory sync, or a sync that reports an I/O error.
#[derive(Debug, Clone)]
struct FailingDirSync {
    inner: MemStorage,
    suffix: &'static str,
    armed: Arc<AtomicBool>,
    renamed: Arc<AtomicBool>,
}

impl FailingDirSync {
    fn new(inner: &MemStorage, suffix: &'static str) -> FailingDirSync {
        FailingDirSync {
            inner: inner.clone(),
            suffix,
            armed: Arc::new(AtomicBool::new(true)),
            renamed: Arc::default(),
        }
    }
}

impl Storage for FailingDirSync {
    fn location(&self) -> PathBuf {
        self.inner.location()
    }
    fn lock(&self) -> io::Result<Box<dyn std::fmt::Debug + Send + Sync>> {
        self.inner.lock()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        self.inner.create(name)
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        self.inner.open(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to)?;
        if self.armed.load(Ordering::SeqCst) && to.ends_with(self.suffix) {
            self.renamed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        if self.renamed.swap(false, Ordering::SeqCst) {
            self.armed.store(false, Ordering::SeqCst);
            return Err(io::Error::other("directory sync failed"));
        }
        self.inner.sync_dir()
    }
}

fn small() -> Options {
    Options {
        segment_bytes: 8192,
        ..Options::default()
    }
}

/// A process dies after renaming a spare to the log's first segment and before syncing the
/// directory. The next open commits into that segment (each commit syncs the file, not the
/// directory): a power failure then must not turn the segment back into a spare and lose the
/// acknowledged commit. Recovery syncs the directory.
#[test]
fn a_segment_renamed_before_a_crash_is_durable_once_recovered() {
    let storage = MemStorage::new();
    let dying = FailingDirSync::new(&storage, ".seg");
    assert!(Wal::open_storage(Arc::new(dying), small()).is_err());
    assert!(
        storage.file_names().iter().any(|n| n.ends_with(".seg")),
        "the crash left a renamed segment: {:?}",
        storage.file_names()
    );
    // No spare thread's directory sync may make the rename durable by chance.
    storage.set_disk_full(true);
    let wal = Wal::open_storage(Arc::new(storage.clone()), small()).unwrap();
    let acknowledged = wal.commit(1, b"acknowledged under Sync").unwrap();
    let power_loss = storage.crash_image(None);
    drop(wal);
    let wal = Wal::open_storage(Arc::new(power_loss), small()).unwrap();
    assert!(
        wal.next_lsn() > acknowledged.lsn,
        "the acknowledged commit {} survives the power loss (next LSN {})",
        acknowledged.lsn,
        wal.next_lsn()
    );
}

/// Segments of different sizes (the option changed between opens), the big one in the middle
/// lost: the records after it prove that what was in it had been durable, so the open fails
/// with `Corruption` — not a torn tail cut silently with the acknowledged segment after it.
#[test]
fn a_missing_middle_segment_of_another_size_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let big = Options {
        segment_bytes: 1 << 20,
        durability: Durability::None,
        ..Options::default()
    };
    let wal = Wal::open(dir.path(), small()).unwrap();
    wal.commit(1, b"a").unwrap();
    wal.close().unwrap();
    let wal = Wal::open(dir.path(), big).unwrap();
    // Up to the roll-over into a 1 MiB segment.
    while wal.segments().last().unwrap().segment_bytes != 1 << 20 {
        wal.append(1, &[1u8; 1000]).unwrap();
    }
    let middle = wal.segments().last().unwrap().clone();
    assert_eq!(middle.segment_bytes, 1 << 20);
    // Fill it with small records, so that its LSNs run far past what the small segments'
    // sizes allow.
    loop {
        let last = wal.segments().last().unwrap().clone();
        if last.name != middle.name || last.written_bytes + 64 > last.segment_bytes {
            break;
        }
        wal.append(1, b"").unwrap();
    }
    wal.close().unwrap();
    let wal = Wal::open(dir.path(), small()).unwrap();
    let mut acknowledged = Vec::new();
    for _ in 0..3 {
        acknowledged.push(wal.commit(1, b"after the big segment").unwrap().lsn);
    }
    wal.close().unwrap();
    std::fs::remove_file(dir.path().join(&middle.name)).unwrap();
    match Wal::open(dir.path(), small()) {
        Err(Error::Corruption { .. }) => {}
        Ok(wal) => panic!(
            "opened at LSN {} though {acknowledged:?} were acknowledged; {:?}",
            wal.next_lsn(),
            wal.recovery_report()
        ),
        Err(other) => panic!("expected Corruption, got {other}"),
    }
}

/// A segment header (checksum valid) saying its first LSN is 0: refused, by name. LSNs start at
/// 1; recovery computed "durable through first − 1" from it (a panic in debug builds, and
/// durable through u64::MAX in release ones: commits returned without a sync).
#[test]
fn a_segment_header_claiming_lsn_zero_is_refused() {
    let storage = MemStorage::new();
    {
        let wal = Wal::open_storage(Arc::new(storage.clone()), small()).unwrap();
        wal.commit(1, b"x").unwrap();
    }
    let name = storage
        .file_names()
        .into_iter()
        .find(|n| n.ends_with(".seg"))
        .unwrap();
    let mut bytes = storage.file_bytes(&name).unwrap();
    // The header: magic 8, version 4, header size 4, first LSN 8 at 16, …, CRC of the first 60
    // bytes at 60.
    bytes[16..24].copy_from_slice(&0u64.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    storage.remove(&name).unwrap();
    storage.set_file_bytes(&format!("{:020}.seg", 0), bytes);
    match Wal::open_storage(Arc::new(storage.clone()), small()) {
        Err(Error::BadSegmentHeader { reason, .. }) => {
            assert!(reason.contains("first LSN 0"), "{reason}")
        }
        other => panic!("expected BadSegmentHeader, got {:?}", other.map(|_| ())),
    }
}

/// A release whose directory sync fails reports it, and the segment is released all the same:
/// the next release does not trip over it (it tried to rename the renamed file again, for ever).
#[test]
fn a_failed_directory_sync_at_release_does_not_block_later_releases() {
    let storage = MemStorage::new();
    let failing = FailingDirSync::new(&storage, ".released");
    let wal = Wal::open_storage(Arc::new(failing), small()).unwrap();
    for _ in 0..12 {
        wal.commit(1, &[1u8; 2000]).unwrap();
    }
    let segments = wal.segments();
    assert!(segments.len() >= 3, "{segments:?}");
    match wal.release_before(segments[1].first_lsn) {
        Err(Error::Io { context, .. }) => assert!(context.contains("syncing the directory")),
        other => panic!("expected the failed sync reported, got {other:?}"),
    }
    assert_eq!(
        wal.segments().len(),
        segments.len() - 1,
        "released all the same"
    );
    let last = segments.last().unwrap().first_lsn;
    assert_eq!(wal.release_before(last).unwrap(), segments.len() - 2);
    assert_eq!(wal.segments().len(), 1);
}
