//! The client crash test's client process (see `tests/tests/client_crash.rs`):
//!
//! `client_crash_peer <node data dir> <node addr> <queue>`
//!
//! Connects to the node as its local admin, begins a transaction, receives every message of
//! `queue` (waiting for the first), prints `received <n>` and then waits, transaction open,
//! to be killed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herald_engine::Receive;
use herald_net::Client;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, addr, queue] = &args[..] else {
        panic!("usage: client_crash_peer <node data dir> <node addr> <queue>");
    };
    let dir = PathBuf::from(dir);
    let addr: SocketAddr = addr.parse().expect("node address");
    let mut client = Client::connect_local(&dir, addr).expect("connecting to the node");
    let mut tx = client.begin().expect("BEGIN TRANSACTION");
    let messages = tx
        .receive(queue, Receive::top(100_000).wait(Duration::from_secs(60)))
        .expect("RECEIVE");
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "received {}", messages.len()).expect("printing");
    stdout.flush().expect("flushing");
    drop(stdout);
    // Keep the transaction (and the process) until the test kills it.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
