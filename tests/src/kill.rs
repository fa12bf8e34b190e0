//! Running a writer process and SIGKILLing it: the part every crash test shares.
//!
//! The writer prints one line per acknowledged step; the harness reads its stdout to the end
//! (the kill closes it), kills it either blind (a delay after spawning, whatever it was doing)
//! or a delay after its first acknowledgement, and checks that it died of the kill rather than
//! of an error of its own.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A writer that has not acknowledged anything by then is broken (or the machine is).
pub const FIRST_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// When to kill the writer.
#[derive(Debug, Clone, Copy)]
pub enum Kill {
    /// This long after spawning it, whatever it did meanwhile.
    Blind(Duration),
    /// This long after its first acknowledgement line.
    AfterFirstAck(Duration),
}

/// Spawns `command`, SIGKILLs it as `kill` says, and returns everything it printed. A line for
/// which `is_ack` holds counts as an acknowledgement. Panics (naming `round` and showing the
/// writer's stderr) if the writer ended any other way than by the kill, or acknowledged nothing
/// within `FIRST_ACK_TIMEOUT` when the kill waits for an acknowledgement.
pub fn run_until_killed(
    mut command: Command,
    round: u32,
    kill: Kill,
    is_ack: fn(&[u8]) -> bool,
) -> Vec<u8> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the crash writer");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (first_ack_tx, first_ack_rx) = mpsc::sync_channel(1);
    let stdout_reader = std::thread::spawn(move || read_output(stdout, first_ack_tx, is_ack));
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let acknowledged_in_time = match kill {
        Kill::Blind(delay) => {
            std::thread::sleep(delay);
            true
        }
        Kill::AfterFirstAck(delay) => match first_ack_rx.recv_timeout(FIRST_ACK_TIMEOUT) {
            Ok(()) => {
                std::thread::sleep(delay);
                true
            }
            // Timed out, or the writer closed its stdout (it exited): reported below.
            Err(_) => false,
        },
    };
    // SIGKILL on Unix. On a writer that already exited (and is not yet reaped) it still succeeds.
    child.kill().expect("sending SIGKILL to the crash writer");
    let status = child.wait().expect("waiting for the crash writer");
    let output = stdout_reader.join().expect("stdout reader panicked");
    let stderr = stderr_reader.join().expect("stderr reader panicked");
    const SIGKILL: i32 = 9;
    assert_eq!(
        status.signal(),
        Some(SIGKILL),
        "round {round}: the crash writer was not killed by SIGKILL but ended with {status}; \
         its stderr:\n{stderr}"
    );
    assert!(
        acknowledged_in_time,
        "round {round}: the crash writer acknowledged nothing within {FIRST_ACK_TIMEOUT:?}; its \
         stderr:\n{stderr}"
    );
    output.unwrap_or_else(|e| panic!("round {round}: reading writer output: {e}"))
}

/// The seed of a crash test's kill schedule: `HERALD_CRASH_SEED` to replay a run, else a fresh
/// one. Printed (with how to replay it) so that a failing run can be repeated.
pub fn crash_seed(test: &str, rounds: u32) -> u64 {
    let seed = match std::env::var("HERALD_CRASH_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("HERALD_CRASH_SEED={s:?} is not a u64")),
        Err(_) => fresh_seed(),
    };
    eprintln!("{test}: {rounds} rounds, seed {seed} (HERALD_CRASH_SEED={seed} to replay)");
    seed
}

/// A seed for a run nobody asked to replay: the clock and the process id, which is all the
/// variety a schedule needs.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Reads the writer's stdout to its end (the kill closes it), signalling the first complete
/// acknowledgement line as soon as it arrives.
fn read_output(
    mut stdout: impl Read,
    first_ack: mpsc::SyncSender<()>,
    is_ack: fn(&[u8]) -> bool,
) -> std::io::Result<Vec<u8>> {
    let mut output = Vec::new();
    let mut signalled = false;
    let mut line_start = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) => return Ok(output),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let scanned = output.len();
        output.extend_from_slice(&buf[..n]);
        if signalled {
            continue;
        }
        for at in scanned..output.len() {
            if output[at] == b'\n' {
                if is_ack(&output[line_start..at]) {
                    signalled = true;
                    // The receiver may have stopped waiting (blind kill); that is fine.
                    let _ = first_ack.try_send(());
                    break;
                }
                line_start = at + 1;
            }
        }
    }
}
