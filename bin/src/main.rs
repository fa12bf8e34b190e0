//! `herald`: the node and the command-line client.
//!
//! `herald node` runs a node: the broker in a data directory and its QUIC endpoint (mutual TLS
//! with the peers its configuration trusts), delivering dialogs to and from other nodes, until
//! Ctrl-C or SIGTERM, when it stops cleanly (connections closed, a checkpoint taken, the log
//! synced and closed). The client protocol and `herald exec` are not built yet.
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_net::identity::{Fingerprint, Trust};
use herald_net::{Node, NodeConfig};

#[derive(Debug, Parser)]
#[command(name = "herald", version, about = "Herald: a durable messaging engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the broker in a data directory and its QUIC endpoint.
    Node {
        /// Data directory; created (with its certificate and broker id) on first start.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// UDP address of the QUIC endpoint.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// A TOML configuration file (see `--print-config` for its keys); flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the effective configuration and exit.
        #[arg(long)]
        print_config: bool,
    },
}

/// The node's configuration file.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    data_dir: PathBuf,
    listen: SocketAddr,
    /// `sync` (a commit is durable when it returns), `none` (the OS decides when), or
    /// `batched-<ms>` (synced within that many milliseconds).
    durability: String,
    /// Peers this node trusts (and may reach), by certificate fingerprint (SHA-256, hex).
    peers: Vec<PeerConfig>,
    /// PEM files of CAs whose certificates this node trusts.
    ca_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct PeerConfig {
    fingerprint: String,
    /// If set, the only local services this peer may send to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    services: Option<Vec<String>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("./herald-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 4022)),
            durability: "sync".into(),
            peers: Vec::new(),
            ca_files: Vec::new(),
        }
    }
}

impl Config {
    fn load(path: Option<&PathBuf>) -> Result<Config, String> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading configuration {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("configuration {}: {e}", path.display()))
    }

    fn durability(&self) -> Result<herald_engine::Durability, String> {
        match self.durability.as_str() {
            "sync" => Ok(herald_engine::Durability::Sync),
            "none" => Ok(herald_engine::Durability::None),
            other => other
                .strip_prefix("batched-")
                .and_then(|ms| ms.parse::<u64>().ok())
                .map(|ms| herald_engine::Durability::Batched {
                    max_delay: std::time::Duration::from_millis(ms),
                })
                .ok_or_else(|| {
                    format!("durability {other:?}: expected sync, none or batched-<ms>")
                }),
        }
    }

    fn trust(&self) -> Result<(Trust, HashMap<Fingerprint, HashSet<String>>), String> {
        let mut trust = Trust::new();
        let mut restricted = HashMap::new();
        for peer in &self.peers {
            let fingerprint: Fingerprint = peer
                .fingerprint
                .parse()
                .map_err(|e| format!("peer fingerprint {:?}: {e}", peer.fingerprint))?;
            trust = trust.pin(fingerprint);
            if let Some(services) = &peer.services {
                restricted.insert(fingerprint, services.iter().cloned().collect());
            }
        }
        for path in &self.ca_files {
            let pem = std::fs::read(path)
                .map_err(|e| format!("reading CA file {}: {e}", path.display()))?;
            trust = trust
                .add_ca_pem(&pem)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
        }
        Ok((trust, restricted))
    }
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
        Command::Node {
            data_dir,
            listen,
            config,
            print_config,
        } => Config::load(config.as_ref()).and_then(|mut config| {
            if let Some(data_dir) = data_dir {
                config.data_dir = data_dir;
            }
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if print_config {
                print!(
                    "{}",
                    toml::to_string(&config).map_err(|e| format!("printing: {e}"))?
                );
                return Ok(());
            }
            run_node(config)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("herald: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run_node(config: Config) -> Result<(), String> {
    let (mut trust, restricted_peers) = config.trust()?;
    let data_dir = config.data_dir.clone();
    if config.peers.is_empty() && config.ca_files.is_empty() {
        // No peer configured: trust only this node's own certificate (no one else can
        // connect); the QUIC layer refuses an empty trust list as a likely mistake.
        trust = trust.pin(own_fingerprint(&data_dir)?);
    }
    let node = Node::start(NodeConfig {
        data_dir: data_dir.clone(),
        listen: config.listen,
        broker: herald_engine::Options {
            durability: config.durability()?,
            ..herald_engine::Options::default()
        },
        trust,
        restricted_peers,
    })
    .map_err(|e| format!("starting the node in {}: {e}", data_dir.display()))?;
    let broker = node.broker();
    let catalog = broker.catalog();
    println!("herald node: data directory {}", data_dir.display());
    println!(
        "  {} queue(s), {} service(s), {} contract(s), {} route(s), {} conversation endpoint(s), \
         {} message(s) in the transmission queue",
        catalog.queues.len(),
        catalog.services.len(),
        catalog.contracts.len(),
        catalog.routes.len(),
        broker.conversation_endpoints().len(),
        broker.transmission_queue().len(),
    );
    println!(
        "  log: {} bytes in segment files",
        broker.log_bytes_on_disk()
    );
    println!("  broker instance {}", broker.broker_instance());
    println!(
        "  listening on quic://{} (certificate fingerprint {}), {} trusted peer(s)",
        node.local_addr().map_err(|e| e.to_string())?,
        node.fingerprint(),
        config.peers.len() + config.ca_files.len(),
    );
    // The handlers are in place before the node says it is ready: a signal sent on that cue
    // must not meet the default action (which would kill the process without a checkpoint).
    let shutdown = ShutdownSignals::install()?;
    println!("  serving (the client protocol is not built yet). Ctrl-C to stop.");
    shutdown.wait()?;
    node.shutdown()
        .map_err(|e| format!("stopping the node: {e}"))?;
    println!("herald node: connections closed, checkpoint written, log synced and closed");
    Ok(())
}

/// This node's certificate fingerprint (creating its identity on first start).
fn own_fingerprint(data_dir: &std::path::Path) -> Result<Fingerprint, String> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("creating data directory {}: {e}", data_dir.display()))?;
    herald_net::identity::NodeIdentity::load_or_create(
        &data_dir.join(herald_net::node::IDENTITY_DIR),
    )
    .map(|identity| identity.fingerprint())
    .map_err(|e| format!("the node's identity in {}: {e}", data_dir.display()))
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
