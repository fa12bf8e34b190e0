//! `herald`: the node and the command-line client.
//!
//! Today only `herald node` exists, and it does only what is built: it opens (creating if
//! needed) the data directory's broker, reports what it holds, and waits for Ctrl-C or SIGTERM,
//! then checkpoints and closes it. It serves nothing yet; the network and the client are their
//! own issues.
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_engine::{Broker, Options as BrokerOptions};

#[derive(Debug, Parser)]
#[command(name = "herald", version, about = "Herald: a durable messaging engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node on a data directory (today: open its broker, report it, wait for Ctrl-C).
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
    let broker = Broker::open(&data_dir, BrokerOptions::default())
        .map_err(|e| format!("opening the broker in {}: {e}", data_dir.display()))?;
    let catalog = broker.catalog();
    let endpoints = broker.conversation_endpoints();
    println!("herald node: data directory {}", data_dir.display());
    println!(
        "  {} queue(s), {} service(s), {} contract(s), {} conversation endpoint(s)",
        catalog.queues.len(),
        catalog.services.len(),
        catalog.contracts.len(),
        endpoints.len()
    );
    println!(
        "  log: {} bytes in segment files",
        broker.log_bytes_on_disk()
    );
    println!("  not serving: the network and the client are not built yet. Ctrl-C to stop.");
    wait_for_shutdown_signal()?;
    broker
        .close()
        .map_err(|e| format!("closing the broker: {e}"))?;
    println!("herald node: checkpoint written, log synced and closed");
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
