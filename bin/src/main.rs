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
    // The handlers are in place before the node says it is ready: a signal sent on that cue
    // must not meet the default action (which would kill the process without a checkpoint).
    let shutdown = ShutdownSignals::install()?;
    println!("  not serving: the network and the client are not built yet. Ctrl-C to stop.");
    shutdown.wait()?;
    broker
        .close()
        .map_err(|e| format!("closing the broker: {e}"))?;
    println!("herald node: checkpoint written, log synced and closed");
    Ok(())
}

/// SIGINT (Ctrl-C) and SIGTERM handlers, installed before the node reports it is ready.
struct ShutdownSignals {
    runtime: tokio::runtime::Runtime,
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<ShutdownSignals, String> {
        use tokio::signal::unix::{SignalKind, signal};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| format!("starting the signal runtime: {e}"))?;
        let (interrupt, terminate) = runtime.block_on(async {
            let interrupt = signal(SignalKind::interrupt())
                .map_err(|e| format!("installing the SIGINT handler: {e}"))?;
            let terminate = signal(SignalKind::terminate())
                .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
            Ok::<_, String>((interrupt, terminate))
        })?;
        Ok(ShutdownSignals {
            runtime,
            interrupt,
            terminate,
        })
    }

    /// Blocks until SIGINT or SIGTERM.
    fn wait(mut self) -> Result<(), String> {
        self.runtime.block_on(async {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
        });
        Ok(())
    }
}
