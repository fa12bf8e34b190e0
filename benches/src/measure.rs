//! Timed loops and what they measured.
//!
//! A loop runs for a fixed wall-clock time rather than a fixed count: the same benchmark runs in
//! the same time on a disk that syncs in 50 µs and on one that syncs in 5 ms.

use std::time::{Duration, Instant};

/// What a timed loop did: how many operations, how many bytes, in how long.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Measured {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Measured {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed_secs()
    }

    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed_secs()
    }

    /// Mean time of one operation.
    pub fn per_op(&self) -> Duration {
        self.elapsed / self.ops.max(1).try_into().unwrap_or(u32::MAX)
    }

    /// Adds another run of the same loop.
    pub fn add(&mut self, other: Measured) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.elapsed += other.elapsed;
    }

    fn elapsed_secs(&self) -> f64 {
        // A loop always runs at least once, so `elapsed` is only zero on a clock that did not
        // tick; a nanosecond keeps the rate finite.
        self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `op` until `duration` has passed (at least once). `op` returns the bytes it moved.
pub fn run_for<E>(
    duration: Duration,
    mut op: impl FnMut() -> Result<u64, E>,
) -> Result<Measured, E> {
    let start = Instant::now();
    let mut measured = Measured::default();
    loop {
        measured.bytes += op()?;
        measured.ops += 1;
        let elapsed = start.elapsed();
        if elapsed >= duration {
            measured.elapsed = elapsed;
            return Ok(measured);
        }
    }
}

/// Runs `once` (a whole pass, timed by itself) until `run` has passed, at least once, and sums
/// the passes.
pub fn repeat_for<E>(
    run: Duration,
    mut once: impl FnMut() -> Result<Measured, E>,
) -> Result<Measured, E> {
    let start = Instant::now();
    let mut total = Measured::default();
    loop {
        total.add(once()?);
        if start.elapsed() >= run {
            return Ok(total);
        }
    }
}

/// CPU time (user + system) this process has used so far, all threads included (those that
/// exited too), from `/proc/self/stat`; `None` where that file does not exist. Its resolution
/// is one clock tick (10 ms): use it over loops of seconds.
pub fn process_cpu_time() -> Option<Duration> {
    // Clock ticks per second of /proc times: USER_HZ, fixed at 100 in the kernel's ABI.
    const TICKS_PER_SEC: u64 = 100;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces, inside parentheses) start with the
    // third field (state); utime and stime are fields 14 and 15.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime + stime;
    Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SEC))
}

/// CPU time used so far by this process and by the whole machine, to tell afterwards what a loop
/// used and what everything else on the machine (other processes, other tenants of a shared
/// machine) used meanwhile: a loop that waited on a CPU another process held is not slow code.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    process: Option<Duration>,
    machine: Option<Duration>,
}

impl CpuSnapshot {
    pub fn now() -> CpuSnapshot {
        CpuSnapshot {
            process: process_cpu_time(),
            machine: machine_cpu_time(),
        }
    }

    /// What was used between this snapshot and now.
    pub fn elapsed(&self) -> CpuUse {
        let now = CpuSnapshot::now();
        let process = now
            .process
            .zip(self.process)
            .map(|(after, before)| after.saturating_sub(before));
        let machine = now
            .machine
            .zip(self.machine)
            .map(|(after, before)| after.saturating_sub(before));
        CpuUse {
            process,
            others: machine
                .zip(process)
                .map(|(machine, process)| machine.saturating_sub(process)),
        }
    }
}

/// CPU time used over some loop: by this process, and by everything else on the machine
/// (`None`: unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuUse {
    pub process: Option<Duration>,
    pub others: Option<Duration>,
}

impl CpuUse {
    /// Nothing used yet: the start of a sum.
    pub const ZERO: CpuUse = CpuUse {
        process: Some(Duration::ZERO),
        others: Some(Duration::ZERO),
    };

    /// Adds another loop's use (a part that is unknown on either side stays unknown).
    pub fn add(&mut self, other: CpuUse) {
        let sum = |a: Option<Duration>, b: Option<Duration>| a.zip(b).map(|(a, b)| a + b);
        self.process = sum(self.process, other.process);
        self.others = sum(self.others, other.others);
    }

    /// `other processes used 45% of 2 CPUs` over `elapsed`.
    pub fn others_summary(&self, elapsed: Duration) -> String {
        let Some(others) = self.others else {
            return "other processes' cpu time unknown".into();
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = others.as_secs_f64() / (elapsed.as_secs_f64().max(1e-9) * cpus as f64);
        format!("other processes used {:.0}% of {cpus} CPUs", busy * 100.0)
    }
}

/// CPU time (all states but idle and iowait) the whole machine has used so far, all CPUs, from
/// the first line of `/proc/stat`; `None` where that file does not exist. Resolution: one clock
/// tick (10 ms) per CPU.
pub fn machine_cpu_time() -> Option<Duration> {
    const TICKS_PER_SEC: u64 = 100;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut fields = stat.lines().next()?.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| ticks.get(*i))
        .sum();
    Some(Duration::from_millis(busy * 1000 / TICKS_PER_SEC))
}

/// `cpu 31.0 µs per commit, 97% of 2 CPUs`: the CPU time (`None`: unknown) a loop of `ops`
/// operations over `elapsed` used, all threads together; it tells a loop waiting on the disk from
/// one waiting on the CPU.
pub fn cpu_summary(cpu: Option<Duration>, ops: u64, elapsed: Duration, op_name: &str) -> String {
    let Some(cpu) = cpu else {
        return "cpu time unknown".into();
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = cpu.as_secs_f64() / (elapsed.as_secs_f64().max(1e-9) * cpus as f64);
    format!(
        "cpu {:.1} µs per {op_name}, {:.0}% of {cpus} CPUs",
        cpu.as_secs_f64() * 1e6 / ops.max(1) as f64,
        busy * 100.0
    )
}

/// Formats a count per second with an SI prefix: `812`, `7.45k`, `41.0k`, `1.20M`.
pub fn si(value: f64) -> String {
    let (scaled, prefix) = if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    if prefix.is_empty() {
        format!("{scaled:.0}")
    } else if scaled >= 100.0 {
        format!("{scaled:.0}{prefix}")
    } else if scaled >= 10.0 {
        format!("{scaled:.1}{prefix}")
    } else {
        format!("{scaled:.2}{prefix}")
    }
}

/// Formats bytes per second in decimal units: `296 MB/s`, `1.42 GB/s`.
pub fn bytes_rate(bytes_per_sec: f64) -> String {
    if bytes_per_sec >= 1e9 {
        format!("{:.2} GB/s", bytes_per_sec / 1e9)
    } else if bytes_per_sec >= 100e6 {
        format!("{:.0} MB/s", bytes_per_sec / 1e6)
    } else {
        format!("{:.1} MB/s", bytes_per_sec / 1e6)
    }
}

/// Formats a byte count in binary units: `128 B`, `1 KiB`, `64 MiB`, `1 GiB`.
pub fn bytes(count: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if count >= unit && count.is_multiple_of(unit) {
            return format!("{} {name}", count / unit);
        }
        if count >= unit {
            return format!("{:.1} {name}", count as f64 / unit as f64);
        }
    }
    format!("{count} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(si(812.0), "812");
        assert_eq!(si(7450.0), "7.45k");
        assert_eq!(si(41_020.0), "41.0k");
        assert_eq!(si(1_200_000.0), "1.20M");
        assert_eq!(bytes_rate(296e6), "296 MB/s");
        assert_eq!(bytes_rate(1.424e9), "1.42 GB/s");
        assert_eq!(bytes(128), "128 B");
        assert_eq!(bytes(1024), "1 KiB");
        assert_eq!(bytes(64 << 20), "64 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn cpu_time_grows() {
        let Some(before) = process_cpu_time() else {
            return; // not Linux
        };
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = process_cpu_time().expect("read once already");
        assert!(after >= before);
    }

    #[test]
    fn machine_cpu_time_covers_this_process() {
        let snapshot = CpuSnapshot::now();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = snapshot.elapsed();
        let mut total = CpuUse::ZERO;
        total.add(used);
        assert_eq!(total, used);
        if machine_cpu_time().is_some() {
            assert!(used.others.is_some());
        }
    }

    #[test]
    fn run_for_runs_at_least_once() {
        let measured = run_for(Duration::ZERO, || Ok::<u64, ()>(10)).expect("never fails");
        assert_eq!((measured.ops, measured.bytes), (1, 10));
    }
}

/// Switches a `perf record --control=fifo:CTL -D -1` (started with events disabled) on and off
/// around the timed parts of a bench, so a profile holds only them: the fifo's path comes from
/// `HERALD_BENCH_PERF_CONTROL`; without it, nothing happens.
#[derive(Debug)]
pub struct PerfControl {
    fifo: Option<std::fs::File>,
}

impl PerfControl {
    pub fn from_env() -> PerfControl {
        let fifo = std::env::var_os("HERALD_BENCH_PERF_CONTROL").and_then(|path| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| eprintln!("HERALD_BENCH_PERF_CONTROL {path:?}: {e}"))
                .ok()
        });
        PerfControl { fifo }
    }

    pub fn enable(&mut self) {
        self.command(b"enable\n");
    }

    pub fn disable(&mut self) {
        self.command(b"disable\n");
    }

    fn command(&mut self, command: &[u8]) {
        use std::io::Write;
        if let Some(fifo) = &mut self.fifo
            && let Err(e) = fifo.write_all(command)
        {
            eprintln!("HERALD_BENCH_PERF_CONTROL: {e}");
            self.fifo = None;
        }
    }
}
