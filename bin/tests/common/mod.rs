//! Helpers the `herald` binary's tests share: running it, reading what it printed.
#![allow(dead_code)] // each test file uses its own subset

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

/// Runs `herald ARGS`, feeding `stdin` if given.
pub fn herald(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning herald");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .expect("writing stdin");
    }
    child.wait_with_output().expect("waiting for herald")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The messages sent and received in `herald bench`'s throughput table.
pub fn bench_sent_and_received(text: &str) -> (u64, u64) {
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .position(|l| {
            l.split_whitespace().collect::<Vec<_>>()
                == ["sent", "received", "seconds", "msgs/s", "MB/s"]
        })
        .unwrap_or_else(|| panic!("no throughput table: {text}"));
    let figures: Vec<u64> = lines[header + 2]
        .split_whitespace()
        .take(2)
        .map(|n| n.parse().unwrap_or_else(|e| panic!("{n}: {e} in {text}")))
        .collect();
    (figures[0], figures[1])
}
