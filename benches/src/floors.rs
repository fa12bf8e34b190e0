//! Floors: the raw I/O that a log operation cannot beat, measured on the same disk in the same
//! run as the benchmark it bounds.
//!
//! - [`OverwriteSync`]: `pwrite` of `chunk_bytes` at advancing offsets of a pre-written
//!   (zero-filled and synced) file, each followed by `fdatasync`. This is what a durable commit
//!   costs when, as Herald's log does, it writes over a spare segment: with 4 KiB chunks it is
//!   the floor of a small commit (one page per sync), with 1 MiB chunks that of bulk writes.
//! - [`AppendSync`]: the same, appended to a fresh file, so each `fdatasync` also commits block
//!   allocation and the new file size. The usual floor of "sequential write + sync".
//! - [`read_files`]: `read()` of the bytes a recovery scans, into one reused buffer.
//!
//! Written bytes are a non-zero pattern, never zeros, so no layer below can skip them.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::measure::{Measured, run_for};

/// `pwrite` of `chunk_bytes` + `fdatasync`, at advancing offsets of a file that was zero-filled
/// and synced when this was made (outside any timing), wrapping at its end. Runs may be
/// repeated, interleaved with the benchmark they bound, so both see the same disk weather.
#[derive(Debug)]
pub struct OverwriteSync {
    path: PathBuf,
    file: File,
    chunk: Vec<u8>,
    wrap_at: u64,
    offset: u64,
}

impl OverwriteSync {
    /// Makes a zero-filled, synced file of `file_bytes` in `dir` to write over.
    pub fn new(dir: &Path, chunk_bytes: usize, file_bytes: u64) -> io::Result<OverwriteSync> {
        assert!(
            chunk_bytes > 0 && file_bytes >= chunk_bytes as u64,
            "a {chunk_bytes}-byte chunk must fit a {file_bytes}-byte file"
        );
        let path = unused_path(dir, "floor-overwrite")?;
        let file = zero_filled_file(&path, file_bytes)?;
        Ok(OverwriteSync {
            path,
            file,
            chunk: pattern(chunk_bytes),
            wrap_at: file_bytes - file_bytes % chunk_bytes as u64,
            offset: 0,
        })
    }

    /// Writes and syncs chunks for `duration` (at least one).
    pub fn run(&mut self, duration: Duration) -> io::Result<Measured> {
        run_for(duration, || {
            self.file.write_all_at(&self.chunk, self.offset)?;
            self.file.sync_data()?;
            self.offset = (self.offset + self.chunk.len() as u64) % self.wrap_at;
            Ok(self.chunk.len() as u64)
        })
    }
}

impl Drop for OverwriteSync {
    fn drop(&mut self) {
        // Best effort: the file lives in a benchmark's temporary directory anyway.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `write` of `chunk_bytes` + `fdatasync`, appended to a new file that grows with each write
/// (and keeps growing across runs).
#[derive(Debug)]
pub struct AppendSync {
    path: PathBuf,
    file: File,
    chunk: Vec<u8>,
    offset: u64,
}

impl AppendSync {
    /// Creates the (empty) file in `dir`.
    pub fn new(dir: &Path, chunk_bytes: usize) -> io::Result<AppendSync> {
        assert!(chunk_bytes > 0, "chunks hold at least one byte");
        let path = unused_path(dir, "floor-append")?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(AppendSync {
            path,
            file,
            chunk: pattern(chunk_bytes),
            offset: 0,
        })
    }

    /// Appends and syncs chunks for `duration` (at least one).
    pub fn run(&mut self, duration: Duration) -> io::Result<Measured> {
        run_for(duration, || {
            self.file.write_all_at(&self.chunk, self.offset)?;
            self.file.sync_data()?;
            self.offset += self.chunk.len() as u64;
            Ok(self.chunk.len() as u64)
        })
    }
}

impl Drop for AppendSync {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the first `len` bytes of each `(path, len)` with `read()` into one buffer of
/// `buffer_bytes`, handing each filled piece to `consume`. One op per file.
pub fn read_files(
    files: &[(PathBuf, u64)],
    buffer_bytes: usize,
    mut consume: impl FnMut(&[u8]),
) -> io::Result<Measured> {
    let mut buffer = vec![0u8; buffer_bytes];
    let start = Instant::now();
    let mut measured = Measured::default();
    for (path, len) in files {
        let mut file = File::open(path)?.take(*len);
        loop {
            let n = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            consume(&buffer[..n]);
            measured.bytes += n as u64;
        }
        measured.ops += 1;
    }
    measured.elapsed = start.elapsed();
    Ok(measured)
}

/// A new file of `bytes` zeros, synced (data and directory entry), like a log's spare segment.
fn zero_filled_file(path: &Path, bytes: u64) -> io::Result<File> {
    const ZERO_CHUNK_BYTES: u64 = 1 << 20;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let zeros = vec![0u8; ZERO_CHUNK_BYTES as usize];
    let mut offset = 0;
    while offset < bytes {
        let n = (bytes - offset).min(ZERO_CHUNK_BYTES);
        file.write_all_at(&zeros[..n as usize], offset)?;
        offset += n;
    }
    file.sync_all()?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(file)
}

/// `dir/{stem}-N` for the first N that does not exist yet.
fn unused_path(dir: &Path, stem: &str) -> io::Result<PathBuf> {
    for n in 0..u32::MAX {
        let path = dir.join(format!("{stem}-{n}"));
        if !path.try_exists()? {
            return Ok(path);
        }
    }
    Err(io::Error::other(format!(
        "no free {stem}-N name in {}",
        dir.display()
    )))
}

/// `len` bytes of a fixed pseudo-random pattern (xorshift), never all zeros: what floors write,
/// and a payload for benchmarks that need one.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8 | 1
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_write_and_clean_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut overwrite = OverwriteSync::new(dir.path(), 4096, 10_000).expect("overwrite");
        for _ in 0..3 {
            let m = overwrite.run(Duration::ZERO).expect("overwrite");
            assert_eq!((m.ops, m.bytes), (1, 4096));
        }
        let mut append = AppendSync::new(dir.path(), 4096).expect("append");
        let m = append.run(Duration::ZERO).expect("append");
        assert_eq!((m.ops, m.bytes), (1, 4096));
        let count = || std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(count(), 2);
        drop((overwrite, append));
        assert_eq!(count(), 0);

        let path = dir.path().join("data");
        std::fs::write(&path, pattern(10_000)).expect("write");
        let mut seen = 0;
        let m = read_files(&[(path, 9_000)], 4096, |piece| seen += piece.len()).expect("read");
        assert_eq!((m.ops, m.bytes, seen), (1, 9_000, 9_000));
    }
}
