//! Where benchmarks write: temporary directories on a real disk.
//!
//! The default is `target/bench-tmp` of the workspace, not `std::env::temp_dir()`: `/tmp` is often
//! a tmpfs, where `fdatasync` costs nothing and every durable figure would be a lie. The
//! filesystem under the directory is looked up and printed, and a memory filesystem is refused.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Environment variable naming the directory benchmarks write in (it must be on the disk to be
/// measured).
pub const BENCH_DIR_ENV: &str = "HERALD_BENCH_DIR";

/// Filesystems that keep data in memory: `fdatasync` there is free.
const MEMORY_FILESYSTEMS: [&str; 3] = ["tmpfs", "ramfs", "devtmpfs"];

/// The directory benchmarks write in, created if needed: `$HERALD_BENCH_DIR`, else
/// `<workspace>/target/bench-tmp`. Fails if it lives on a memory filesystem.
pub fn bench_root() -> io::Result<PathBuf> {
    let root = match std::env::var_os(BENCH_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp"),
    };
    std::fs::create_dir_all(&root)?;
    let root = root.canonicalize()?;
    if let Some(fs) = filesystem_type(&root)
        && MEMORY_FILESYSTEMS.contains(&fs.as_str())
    {
        return Err(io::Error::other(format!(
            "{} is on {fs}, where fdatasync is free; set {BENCH_DIR_ENV} to a directory on a disk",
            root.display()
        )));
    }
    Ok(root)
}

/// A fresh directory under `root`, removed (with everything in it) when dropped.
pub fn temp_dir(root: &Path, prefix: &str) -> io::Result<TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir_in(root)
}

/// The type of the filesystem holding `path` (`ext4`, `xfs`, `tmpfs`, …), from the longest
/// matching mount point in `/proc/self/mounts`; `None` where that file does not exist.
pub fn filesystem_type(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let mount_point = fields.next()?;
            let fs_type = fields.next()?;
            Some((unescape_mount_point(mount_point), fs_type))
        })
        .filter(|(mount_point, _)| path.starts_with(mount_point))
        .max_by_key(|(mount_point, _)| mount_point.as_os_str().len())
        .map(|(_, fs_type)| fs_type.to_owned())
}

/// Waits (at most `timeout`) until the log in `dir` has a complete spare segment ready, so a
/// timed loop does not start while the log's first spare is still being zero-filled.
pub fn wait_for_spare(dir: &Path, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        for entry in std::fs::read_dir(dir)? {
            if entry?.file_name().to_string_lossy().ends_with(".spare") {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no spare segment in {} after {timeout:?}", dir.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `/proc/self/mounts` writes spaces and a few other bytes in mount points as octal escapes.
fn unescape_mount_point(escaped: &str) -> PathBuf {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |code, d| code.wrapping_mul(8).wrapping_add(d - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(
            unescape_mount_point(r"/mnt/my\040disk"),
            PathBuf::from("/mnt/my disk")
        );
        assert_eq!(unescape_mount_point("/"), PathBuf::from("/"));
    }
}
