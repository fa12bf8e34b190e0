//! An in-memory [`Storage`] for tests: a page cache and a disk, kept apart.
//!
//! Every file has the bytes a reader sees now (`current`) and the bytes that would survive a
//! power loss (`durable`, updated by `sync_data`); the directory likewise has its current names
//! and the names made durable by `sync_dir`. [`MemStorage::crash_image`] builds the storage a
//! machine would find after losing power now, optionally keeping a random subset of the
//! unsynced 512-byte sectors (a torn write). Faults are injected by counting calls: fail the
//! N-th write or sync, make the N-th write short, or stop making syncs durable after the N-th.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::map::Map;
use crate::storage::{Storage, StorageFile};

/// Sector size of the simulated disk: the unit a torn write keeps or loses.
pub const MEM_SECTOR_BYTES: u64 = 512;

/// An in-memory directory with a simulated page cache, disk and faults. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    state: Arc<Mutex<MemState>>,
}

#[derive(Debug, Default)]
struct MemState {
    files: HashMap<u64, FileData>,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    next_file_id: u64,
    locked: bool,
    faults: Faults,
    /// The disk at the moment of the frozen sync: files and durable names.
    frozen: Option<(HashMap<u64, FileData>, BTreeMap<String, u64>)>,
}

#[derive(Debug, Default, Clone)]
struct FileData {
    current: Vec<u8>,
    /// Bytes from the start with blocks behind them (written or allocated); past them, up to
    /// `current.len()`, a hole (`set_len`), which a write on a full disk cannot fill.
    allocated_bytes: u64,
    durable: Vec<u8>,
    /// Sectors written since the last sync: a torn crash image keeps some of them.
    dirty_sectors: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct Faults {
    writes: u64,
    syncs: u64,
    fail_write_at: Option<u64>,
    short_write_at: Option<u64>,
    fail_sync_at: Option<u64>,
    freeze_after_sync: Option<u64>,
    disk_full: bool,
}

impl Faults {
    /// Power was "lost" after the frozen sync: nothing more becomes durable.
    fn is_frozen(&self) -> bool {
        self.freeze_after_sync
            .is_some_and(|frozen| self.syncs > frozen)
    }
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// The `n`-th `write_at` from now (1 = the next one) fails with an I/O error.
    pub fn fail_nth_write(&self, n: u64) {
        let mut s = self.state.lock();
        s.faults.fail_write_at = Some(s.faults.writes + n);
    }

    /// The `n`-th `write_at` from now writes only half of its bytes (at least one).
    pub fn short_nth_write(&self, n: u64) {
        let mut s = self.state.lock();
        s.faults.short_write_at = Some(s.faults.writes + n);
    }

    /// The `n`-th `sync_data` from now fails with an I/O error (and makes nothing durable).
    pub fn fail_nth_sync(&self, n: u64) {
        let mut s = self.state.lock();
        s.faults.fail_sync_at = Some(s.faults.syncs + n);
    }

    /// Syncs (of files and of the directory) after the `n`-th file sync from now still succeed
    /// but make nothing durable, as if power was lost right after that sync: a later
    /// `crash_image` shows the disk as of that moment.
    pub fn freeze_durability_after_nth_sync(&self, n: u64) {
        let mut s = self.state.lock();
        s.faults.freeze_after_sync = Some(s.faults.syncs + n);
    }

    /// While set, the disk has no free block (`ErrorKind::StorageFull`): creating a file fails,
    /// and so do writes and `allocate` past a file's blocks (into a hole `set_len` left).
    pub fn set_disk_full(&self, full: bool) {
        self.state.lock().faults.disk_full = full;
    }

    /// Number of `sync_data` calls so far.
    pub fn syncs(&self) -> u64 {
        self.state.lock().faults.syncs
    }

    /// Names in the directory now (sorted).
    pub fn file_names(&self) -> Vec<String> {
        self.state.lock().names.keys().cloned().collect()
    }

    /// The current bytes of a file, if it exists.
    pub fn file_bytes(&self, name: &str) -> Option<Vec<u8>> {
        let s = self.state.lock();
        let id = s.names.get(name)?;
        Some(s.files[id].current.clone())
    }

    /// Replaces the bytes of a file (current and durable), to plant corruption in tests.
    pub fn set_file_bytes(&self, name: &str, bytes: Vec<u8>) {
        let mut s = self.state.lock();
        let id = match s.names.get(name) {
            Some(id) => *id,
            None => {
                let id = s.next_file_id;
                s.next_file_id += 1;
                s.names.insert(name.to_owned(), id);
                s.durable_names.insert(name.to_owned(), id);
                id
            }
        };
        s.files.insert(
            id,
            FileData {
                current: bytes.clone(),
                allocated_bytes: bytes.len() as u64,
                durable: bytes,
                dirty_sectors: BTreeSet::new(),
            },
        );
    }

    /// The storage a machine would find after a power loss now: durable bytes and names only.
    /// With `torn_seed`, each sector written since its file's last sync is kept or lost at
    /// random (decided by the seed), as a disk may persist part of an unsynced write.
    pub fn crash_image(&self, torn_seed: Option<u64>) -> MemStorage {
        let s = self.state.lock();
        let (disk_files, disk_names) = match &s.frozen {
            Some((files, names)) => (files, names),
            None => (&s.files, &s.durable_names),
        };
        let mut rng = torn_seed.map(SplitMix64);
        let mut files = HashMap::new();
        let mut names = BTreeMap::new();
        for (name, id) in disk_names {
            let data = &disk_files[id];
            let mut bytes = data.durable.clone();
            if let Some(rng) = rng.as_mut() {
                for &sector in &data.dirty_sectors {
                    if rng.next() % 2 == 0 {
                        continue;
                    }
                    let start = (sector * MEM_SECTOR_BYTES) as usize;
                    let end = (start + MEM_SECTOR_BYTES as usize).min(data.current.len());
                    if start >= end {
                        continue;
                    }
                    if bytes.len() < end {
                        bytes.resize(end, 0);
                    }
                    bytes[start..end].copy_from_slice(&data.current[start..end]);
                }
            }
            files.insert(
                *id,
                FileData {
                    current: bytes.clone(),
                    allocated_bytes: bytes.len() as u64,
                    durable: bytes,
                    dirty_sectors: BTreeSet::new(),
                },
            );
            names.insert(name.clone(), *id);
        }
        MemStorage {
            state: Arc::new(Mutex::new(MemState {
                files,
                durable_names: names.clone(),
                names,
                next_file_id: s.next_file_id,
                locked: false,
                faults: Faults::default(),
                frozen: None,
            })),
        }
    }
}

/// A tiny deterministic generator, so crash images are a function of their seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

#[derive(Debug)]
struct MemLock(Arc<Mutex<MemState>>);

impl Drop for MemLock {
    fn drop(&mut self) {
        self.0.lock().locked = false;
    }
}

impl Storage for MemStorage {
    fn location(&self) -> PathBuf {
        PathBuf::from("<memory>")
    }

    fn lock(&self) -> io::Result<Box<dyn Debug + Send + Sync>> {
        let mut s = self.state.lock();
        if s.locked {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "memory storage already locked",
            ));
        }
        s.locked = true;
        Ok(Box::new(MemLock(self.state.clone())))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.file_names())
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut s = self.state.lock();
        if s.faults.disk_full {
            return Err(no_space());
        }
        if s.names.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{name} exists"),
            ));
        }
        let id = s.next_file_id;
        s.next_file_id += 1;
        s.names.insert(name.to_owned(), id);
        s.files.insert(id, FileData::default());
        Ok(Arc::new(MemFile {
            state: self.state.clone(),
            id,
        }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let s = self.state.lock();
        let id = *s.names.get(name).ok_or_else(|| not_found(name))?;
        Ok(Arc::new(MemFile {
            state: self.state.clone(),
            id,
        }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut s = self.state.lock();
        let id = s.names.remove(from).ok_or_else(|| not_found(from))?;
        s.names.insert(to.to_owned(), id);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.state.lock();
        s.names.remove(name).ok_or_else(|| not_found(name))?;
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.faults.is_frozen() {
            return Ok(());
        }
        s.durable_names = s.names.clone();
        Ok(())
    }
}

/// An open in-memory file. Keeps working after its name is removed, like an unlinked file.
#[derive(Debug)]
struct MemFile {
    state: Arc<Mutex<MemState>>,
    id: u64,
}

impl StorageFile for MemFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut s = self.state.lock();
        s.faults.writes += 1;
        let n = s.faults.writes;
        if s.faults.fail_write_at == Some(n) {
            return Err(io::Error::other("injected write failure"));
        }
        let len = if s.faults.short_write_at == Some(n) {
            buf.len().div_ceil(2)
        } else {
            buf.len()
        };
        let disk_full = s.faults.disk_full;
        let data = s.files.get_mut(&self.id).expect("open file has data");
        let start = offset as usize;
        let end = start + len;
        if disk_full && end as u64 > data.allocated_bytes {
            return Err(no_space());
        }
        data.allocated_bytes = data.allocated_bytes.max(end as u64);
        if data.current.len() < end {
            data.current.resize(end, 0);
        }
        data.current[start..end].copy_from_slice(&buf[..len]);
        if len > 0 {
            let first = offset / MEM_SECTOR_BYTES;
            let last = (end as u64 - 1) / MEM_SECTOR_BYTES;
            data.dirty_sectors.extend(first..=last);
        }
        Ok(len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let s = self.state.lock();
        let data = &s.files[&self.id];
        let start = (offset as usize).min(data.current.len());
        let end = (start + buf.len()).min(data.current.len());
        buf[..end - start].copy_from_slice(&data.current[start..end]);
        Ok(end - start)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        s.faults.syncs += 1;
        let n = s.faults.syncs;
        if s.faults.fail_sync_at == Some(n) {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        if s.faults.is_frozen() {
            return Ok(());
        }
        let data = s.files.get_mut(&self.id).expect("open file has data");
        data.durable = data.current.clone();
        data.dirty_sectors.clear();
        if s.faults.freeze_after_sync == Some(n) {
            // Power is lost right after this sync: keep the disk exactly as it is now, torn
            // sectors included, so nothing written later can leak into a crash image.
            s.frozen = Some((s.files.clone(), s.durable_names.clone()));
        }
        Ok(())
    }

    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.state.lock().files[&self.id].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        let data = s.files.get_mut(&self.id).expect("open file has data");
        data.current.resize(len as usize, 0);
        data.allocated_bytes = data.allocated_bytes.min(len);
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        let disk_full = s.faults.disk_full;
        let data = s.files.get_mut(&self.id).expect("open file has data");
        if disk_full && len > data.allocated_bytes {
            return Err(no_space());
        }
        if (data.current.len() as u64) < len {
            data.current.resize(len as usize, 0);
        }
        data.allocated_bytes = data.allocated_bytes.max(len);
        Ok(())
    }

    fn map(&self, _len: u64, _readable_end: u64) -> io::Result<Option<Map>> {
        Ok(None)
    }
}

fn no_space() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        "no space left on device (injected)",
    )
}
