//! What the node crash test and its peer process share: the catalog, the message bodies, the
//! lines the peers print, and the harness that runs a peer process (and SIGKILLs it).
//!
//! Two peers, each a `Node` with `Durability::Sync` in its own data directory and on a port the
//! test chose: the **sender** begins [`DIALOGS`] dialogs to the receiver's service and sends
//! numbered messages on them in transactions; the **receiver** receives them with WAITFOR in
//! transactions.
//!
//! A message's number is the sequence its endpoint gives it (`send_sequence` before the send):
//! the sender keeps no other state, so a restarted sender continues exactly where its broker
//! durably is — it never re-sends a number, nor skips one. The body names the dialog (its
//! conversation id) and the number, and its length and bytes follow from them, so the
//! receiver checks every message by its content.
//!
//! Each receive transaction also sends, on a local dialog of the receiver's own broker, a log
//! message naming what it received ([`RECEIVER_LOG_QUEUE`], which nobody receives from): the
//! log is committed with the receive or not at all, so the test knows every committed receive,
//! including one whose printed line was lost to the kill.
//!
//! Lines (each written whole, then flushed):
//! - `ready` once a peer runs (catalog made, node started);
//! - sender, after each `commit` returned: `sent <dialog>:<first>-<last> …` (one range per
//!   dialog the transaction sent on);
//! - receiver, after each `commit` returned: `recv <dialog> <n>,<n>,…` (a receive takes one
//!   conversation group: one dialog);
//! - on end of standard input the sender stops sending, waits until its transmission queue is
//!   empty and prints `drained`; the receiver receives until its queue is empty; both shut
//!   their nodes down and print `stopped`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herald_engine::{
    ConversationId, DialogOptions, Durability, Options, QueueOptions, SentBy, Transaction,
    Validation,
};
use parking_lot::Mutex;

pub const DATA_TYPE: &str = "//nc/Data";
pub const LOG_TYPE: &str = "//nc/Log";
pub const DATA_CONTRACT: &str = "//nc/DataContract";
pub const LOG_CONTRACT: &str = "//nc/LogContract";
pub const SENDER_QUEUE: &str = "nc_sender_queue";
pub const SENDER_SERVICE: &str = "//nc/Sender";
pub const RECEIVER_QUEUE: &str = "nc_receiver_queue";
pub const RECEIVER_SERVICE: &str = "//nc/Receiver";
/// The receiver's log of committed receives (see the module documentation).
pub const RECEIVER_LOG_QUEUE: &str = "nc_receiver_log_queue";
pub const RECEIVER_LOG_SERVICE: &str = "//nc/ReceiverLog";
pub const RECORDER_QUEUE: &str = "nc_recorder_queue";
pub const RECORDER_SERVICE: &str = "//nc/Recorder";

/// Dialogs the sender begins (in the transaction that makes its catalog).
pub const DIALOGS: usize = 4;
/// Messages per sender transaction: 1..=this, spread over the dialogs.
pub const MESSAGES_PER_COMMIT_MAX: u64 = 20;
/// Messages per receive.
pub const RECEIVE_TOP: usize = 50;

/// Options both peers open their brokers with (and the test, to inspect them afterwards).
pub fn broker_options() -> Options {
    Options {
        durability: Durability::Sync,
        segment_bytes: 1024 * 1024,
        checkpoint_interval_bytes: 256 * 1024,
        ..Options::default()
    }
}

/// Creates what both peers' catalogs hold: the message types and contracts.
pub fn create_types(tx: &mut Transaction<'_>) -> herald_engine::Result<()> {
    tx.create_message_type(DATA_TYPE, Validation::None)?;
    tx.create_message_type(LOG_TYPE, Validation::None)?;
    tx.create_contract(DATA_CONTRACT, &[(DATA_TYPE, SentBy::Initiator)])?;
    tx.create_contract(LOG_CONTRACT, &[(LOG_TYPE, SentBy::Initiator)])
}

/// Queue options: no poison-message protection (nothing rolls back on purpose, but a receive
/// killed mid-transaction must not count against the queue).
pub fn queue_options() -> QueueOptions {
    QueueOptions {
        poison_message_handling: false,
        ..QueueOptions::default()
    }
}

/// Bytes before the filler: the conversation id (16) and the number (8).
pub const BODY_HEADER_BYTES: usize = 24;

fn body_len(dialog: ConversationId, number: u64) -> usize {
    let h = mix(dialog.0 as u64 ^ (dialog.0 >> 64) as u64 ^ number.wrapping_mul(0x9e37));
    BODY_HEADER_BYTES + (h % 600) as usize
}

fn filler(dialog: ConversationId, number: u64, at: usize) -> u8 {
    (mix(dialog.0 as u64 ^ number.rotate_left(17) ^ (at as u64 / 8)) >> ((at % 8) * 8)) as u8
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The body of message `number` on `dialog`.
pub fn message_body(dialog: ConversationId, number: u64) -> Vec<u8> {
    let len = body_len(dialog, number);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&dialog.0.to_le_bytes());
    out.extend_from_slice(&number.to_le_bytes());
    for at in BODY_HEADER_BYTES..len {
        out.push(filler(dialog, number, at));
    }
    out
}

/// Checks a body by its content alone and returns its dialog and number.
pub fn verify_body(body: &[u8]) -> Result<(ConversationId, u64), String> {
    if body.len() < BODY_HEADER_BYTES {
        return Err(format!("body of {} bytes has no header", body.len()));
    }
    let dialog = ConversationId(u128::from_le_bytes(body[..16].try_into().unwrap()));
    let number = u64::from_le_bytes(body[16..24].try_into().unwrap());
    if body != message_body(dialog, number).as_slice() {
        return Err(format!(
            "body of message {number} on {dialog} ({} bytes) is not what it should be",
            body.len()
        ));
    }
    Ok((dialog, number))
}

/// `sent` line: the ranges a committed sender transaction sent, by dialog.
pub fn sent_line(ranges: &BTreeMap<ConversationId, (u64, u64)>) -> String {
    let mut line = String::from("sent");
    for (dialog, (first, last)) in ranges {
        line.push_str(&format!(" {dialog}:{first}-{last}"));
    }
    line.push('\n');
    line
}

/// `recv` line (also the body of the receiver's log message, without the newline).
pub fn recv_text(dialog: ConversationId, numbers: &[u64]) -> String {
    let numbers: Vec<String> = numbers.iter().map(u64::to_string).collect();
    format!("recv {dialog} {}", numbers.join(","))
}

/// What a peer printed: complete lines only (a kill may cut the last one short).
pub fn complete_lines(output: &[u8]) -> Vec<String> {
    let end = output
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    String::from_utf8_lossy(&output[..end])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Parses a `sent` line into (dialog, first, last) ranges.
pub fn parse_sent(line: &str) -> Result<Vec<(String, u64, u64)>, String> {
    let rest = line
        .strip_prefix("sent ")
        .ok_or_else(|| format!("not a sent line: {line:?}"))?;
    rest.split(' ')
        .map(|range| {
            let bad = || format!("bad range {range:?} in {line:?}");
            let (dialog, numbers) = range.split_once(':').ok_or_else(bad)?;
            let (first, last) = numbers.split_once('-').ok_or_else(bad)?;
            let first: u64 = first.parse().map_err(|_| bad())?;
            let last: u64 = last.parse().map_err(|_| bad())?;
            if first > last {
                return Err(bad());
            }
            Ok((dialog.to_owned(), first, last))
        })
        .collect()
}

/// Parses a `recv` line (or log body) into the dialog and the numbers.
pub fn parse_recv(line: &str) -> Result<(String, Vec<u64>), String> {
    let bad = || format!("bad recv line {line:?}");
    let rest = line.strip_prefix("recv ").ok_or_else(bad)?;
    let (dialog, numbers) = rest.split_once(' ').ok_or_else(bad)?;
    let numbers = numbers
        .split(',')
        .map(|n| n.parse().map_err(|_| bad()))
        .collect::<Result<Vec<u64>, String>>()?;
    Ok((dialog.to_owned(), numbers))
}

/// Writes `line` whole to stdout and flushes it.
pub fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .expect("writing to stdout");
}

/// A running peer process: its output is collected as it comes, so the test can wait for a
/// line while the peer runs.
#[derive(Debug)]
pub struct Peer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Peer {
    /// Spawns `command` (named `name` in failures) with piped standard streams.
    pub fn spawn(name: impl Into<String>, mut command: Command) -> Peer {
        let name = name.into();
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let stdin = child.stdin.take();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("piped"), stdout.clone()),
            collect(child.stderr.take().expect("piped"), stderr.clone()),
        ];
        Peer {
            name,
            child,
            stdin,
            stdout,
            readers,
            stderr,
        }
    }

    /// The complete lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        complete_lines(&self.stdout.lock())
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock()).into_owned()
    }

    /// Waits until the peer printed a line equal to `line`; panics (with its stderr) if it
    /// exits first or `timeout` passes.
    pub fn wait_for_line(&mut self, line: &str, timeout: Duration) {
        let started = Instant::now();
        loop {
            if self.lines().iter().any(|l| l == line) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers take the rest of its output.
                std::thread::sleep(Duration::from_millis(50));
                if self.lines().iter().any(|l| l == line) {
                    return;
                }
                panic!(
                    "{} ended with {status} before printing {line:?}; its stderr:\n{}",
                    self.name,
                    self.stderr_text()
                );
            }
            assert!(
                started.elapsed() < timeout,
                "{} did not print {line:?} within {timeout:?}; its stderr:\n{}",
                self.name,
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the peer and returns everything it printed; panics (with its stderr) if it had
    /// ended otherwise.
    pub fn kill(mut self) -> Vec<u8> {
        // SIGKILL; on a peer that exited (not yet reaped) it still succeeds.
        self.child.kill().expect("sending SIGKILL");
        let status = self.child.wait().expect("waiting for the peer");
        self.join_readers();
        assert_eq!(
            status.signal(),
            Some(9),
            "{} was not killed by SIGKILL but ended with {status}; its stderr:\n{}",
            self.name,
            self.stderr_text()
        );
        std::mem::take(&mut *self.stdout.lock())
    }

    /// Closes the peer's standard input (it stops as the module documentation says) and waits
    /// for it to exit successfully within `timeout`; returns everything it printed.
    pub fn finish(mut self, timeout: Duration) -> Vec<u8> {
        drop(self.stdin.take());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the peer") {
                break status;
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.join_readers();
                panic!(
                    "{} did not stop within {timeout:?} of its input closing; its last lines: \
                     {:?}; its stderr:\n{}",
                    self.name,
                    self.lines().iter().rev().take(3).collect::<Vec<_>>(),
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.join_readers();
        assert!(
            status.success(),
            "{} ended with {status}; its stderr:\n{}",
            self.name,
            self.stderr_text()
        );
        std::mem::take(&mut *self.stdout.lock())
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            reader.join().expect("output reader panicked");
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // A failing test must not leave peers running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => into.lock().extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// Creates a dialog from the recorder to the receiver's log (in the receiver's catalog
/// transaction).
pub fn begin_log_dialog(tx: &mut Transaction<'_>) -> herald_engine::Result<()> {
    tx.begin_dialog(
        RECORDER_SERVICE,
        RECEIVER_LOG_SERVICE,
        LOG_CONTRACT,
        DialogOptions::default(),
    )
    .map(|_| ())
}
