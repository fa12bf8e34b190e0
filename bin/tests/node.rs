//! `herald node` as a user runs it: it opens the data directory's broker, reports it, waits for
//! a signal, and checkpoints and closes it on SIGTERM; a second node on the same directory is
//! refused with a clear error.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Starts `herald node` on `data_dir` and waits (bounded) for the line saying it is up.
fn start_node(data_dir: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["node", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning herald node");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match lines_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("Ctrl-C to stop") => return (child, lines_rx),
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let output = child.wait_with_output().expect("reaping herald node");
                panic!(
                    "herald node did not report its log within 60 s ({e}); stderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

fn send_sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}

#[test]
fn node_reports_its_log_and_shuts_down_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("herald-data");
    let (child, lines) = start_node(&data_dir);
    assert!(
        data_dir
            .join("wal")
            .join("00000000000000000001.seg")
            .exists(),
        "the node created its log's first segment"
    );

    // A second node on the same directory is refused, with the reason.
    let second = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["node", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .output()
        .expect("running a second herald node");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("in use"), "second node's error: {stderr}");

    send_sigterm(&child);
    let output = child.wait_with_output().expect("waiting for herald node");
    assert!(
        output.status.success(),
        "herald node exited with {:?}",
        output.status
    );
    // The process has exited, so its stdout is closed and the reader thread ends: this drains.
    let rest: Vec<String> = lines.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("log synced and closed")),
        "output after SIGTERM: {rest:?}"
    );

    assert!(
        data_dir.join("CHECKPOINT").exists(),
        "a clean stop checkpoints"
    );
    // Restarted, it finds the same data directory.
    let (child, _lines) = start_node(&data_dir);
    send_sigterm(&child);
    assert!(child.wait_with_output().unwrap().status.success());
}

#[test]
fn print_config_shows_the_effective_configuration_and_bad_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:5000\"\ndurability = \"batched-5\"\n[[peers]]\nfingerprint = \"\
         00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"\nservices = [\"//a\"]\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "node",
            "--print-config",
            "--data-dir",
            "/tmp/elsewhere",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "listen = \"127.0.0.1:5000\"",
        "durability = \"batched-5\"",
        "data_dir = \"/tmp/elsewhere\"",
        "services = [\"//a\"]",
    ] {
        assert!(printed.contains(expected), "{expected} in {printed}");
    }
    // A flag overrides the file; a bad value is refused, naming what is expected.
    let with_flag = |durability: &str| {
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args([
                "node",
                "--print-config",
                "--durability",
                durability,
                "--config",
            ])
            .arg(&config)
            .output()
            .unwrap()
    };
    let output = with_flag("none");
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("durability = \"none\""), "{printed}");
    let output = with_flag("sometimes");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("expected sync, none or batched-<ms>"),
        "{stderr}"
    );
    std::fs::write(&config, "listen = \"127.0.0.1:5000\"\nlisten_twice = 1\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["node", "--print-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("listen_twice"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
