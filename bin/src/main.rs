//! `herald`: the node and the command-line client.
//!
//! Today only `herald node` exists, and it does only what is built: it opens (creating if
//! needed) the data directory's write-ahead log, reports what it found, and waits for Ctrl-C or
//! SIGTERM. It serves nothing yet; the engine and the network are their own issues.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_wal::{Options, Wal};

#[derive(Debug, Parser)]
#[command(name = "herald", version, about = "Herald: a durable messaging engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node on a data directory (today: open its log, report it, wait for Ctrl-C).
    Node {
        /// Data directory; created on first start.
        #[arg(long, default_value = "./herald-data")]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node { data_dir } => run_node(data_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("herald: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run_node(data_dir: PathBuf) -> Result<(), String> {
    let wal_dir = data_dir.join("wal");
    let wal = Wal::open(&wal_dir, Options::default())
        .map_err(|e| format!("opening the log in {}: {e}", wal_dir.display()))?;
    let report = wal.recovery_report();
    println!("herald node: log at {}", wal_dir.display());
    let (first, next) = (wal.first_lsn(), wal.next_lsn());
    if next > first {
        println!(
            "  {} segment(s), records {first}..={} ({} checked at recovery)",
            report.segments,
            next.0 - 1,
            report.records_scanned
        );
    } else {
        println!("  {} segment(s), no records yet", report.segments);
    }
    if let Some(tail) = &report.truncated {
        println!(
            "  cut a torn tail at {} offset {} ({})",
            tail.segment, tail.offset, tail.reason
        );
    }
    for segment in wal.segments() {
        println!(
            "  {}  {} of {} bytes written{}",
            segment.name,
            segment.written_bytes,
            segment.segment_bytes,
            if segment.active { "  (active)" } else { "" }
        );
    }
    println!("  not serving: the engine and network are not built yet. Ctrl-C to stop.");
    wait_for_shutdown_signal()?;
    wal.close().map_err(|e| format!("closing the log: {e}"))?;
    println!("herald node: log synced and closed");
    Ok(())
}

/// Blocks until SIGINT (Ctrl-C) or SIGTERM.
fn wait_for_shutdown_signal() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("starting the signal runtime: {e}"))?;
    runtime.block_on(async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.map_err(|e| format!("waiting for Ctrl-C: {e}")),
            _ = terminate.recv() => Ok(()),
        }
    })
}
