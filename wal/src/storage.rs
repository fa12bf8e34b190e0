//! The storage seam: every byte the log reads or writes goes through these two traits.
//!
//! [`FileStorage`] is the real thing (a directory, `pwrite`, `fdatasync`, memory maps).
//! [`MemStorage`](crate::MemStorage) is the test double: it keeps what a power loss would keep
//! apart from what the page cache holds, and fails the N-th I/O on request.
//!
//! Implementations report plain `io::Error`s; the log adds the context (which file, doing what).

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::map::Map;

/// A directory of files the log lives in.
pub trait Storage: Send + Sync + Debug {
    /// Where this storage lives, for error messages.
    fn location(&self) -> PathBuf;
    /// Takes the exclusive lock of the directory, held until the returned guard drops. Fails with
    /// `ErrorKind::WouldBlock` when another opener holds it.
    fn lock(&self) -> io::Result<Box<dyn Debug + Send + Sync>>;
    /// Names of the files in the directory (not sorted).
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Renames a file, replacing any file of the new name.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals in the directory durable.
    fn sync_dir(&self) -> io::Result<()>;
}

/// One open file.
pub trait StorageFile: Send + Sync + Debug {
    /// Writes some prefix of `buf` at `offset`; may write fewer bytes than asked (a short write).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Makes the file's data (and its size) durable: `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    fn size_bytes(&self) -> io::Result<u64>;
    /// Extends (or shortens) the file to `len` bytes; new bytes read as zeros. The log only ever
    /// extends unmapped spare files with it.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Extends the file to `len` bytes, reading as zeros, with its blocks reserved, so that on
    /// file systems that write in place (ext4, xfs) writes into them do not fail for want of
    /// space (a file only extended has holes, and a write into a hole on a full disk fails —
    /// which poisons the log). Copy-on-write file systems (btrfs, zfs) may still fail such a
    /// write; where the file system cannot reserve blocks this falls back to `set_len`.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// A read-only map of the first `len` bytes, where the backend supports one; `None` means the
    /// log reads through `read_at` instead.
    fn map(&self, len: u64, readable_end: u64) -> io::Result<Option<Map>>;
}

/// Writes all of `buf` at `offset`, continuing after short writes and `EINTR`.
pub fn write_all_at(file: &dyn StorageFile, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.write_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write returned 0 bytes",
                ));
            }
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `buf` from `offset`; a file that ends first is an `UnexpectedEof` error.
pub fn read_exact_at(
    file: &dyn StorageFile,
    mut buf: &mut [u8],
    mut offset: u64,
) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file ends before offset {}", offset + buf.len() as u64),
                ));
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The log in a real directory.
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: PathBuf,
}

/// Name of the lock file inside the log directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

impl FileStorage {
    /// Uses `dir`, creating it (and its parents) if needed.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<FileStorage> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        Ok(FileStorage { dir })
    }
}

impl Storage for FileStorage {
    fn location(&self) -> PathBuf {
        self.dir.clone()
    }

    fn lock(&self) -> io::Result<Box<dyn Debug + Send + Sync>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.join(LOCK_FILE_NAME))?;
        // flock(LOCK_EX | LOCK_NB): held by the open file description, so a second opener in this
        // process is refused too; the kernel drops it when the process dies, even by SIGKILL.
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "lock file held by another opener",
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(name))?;
        Ok(Arc::new(DiskFile { file }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(name))?;
        Ok(Arc::new(DiskFile { file }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.dir.join(from), self.dir.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.dir.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

/// A file on disk: `pwrite`, `pread`, `fdatasync`.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
}

impl StorageFile for DiskFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.file.write_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        allocate(&self.file, len)
    }

    fn map(&self, len: u64, readable_end: u64) -> io::Result<Option<Map>> {
        Map::new(&self.file, len, readable_end).map(Some)
    }
}

/// `StorageFile::allocate` for a file of the OS: `fallocate` (mode 0: blocks reserved, the
/// size extended), else `set_len` where the file system does not support it.
pub(crate) fn allocate(file: &File, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
    }
    file.set_len(len)
}
