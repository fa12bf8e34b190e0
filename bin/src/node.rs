//! `herald node`: a node on the configured data directory and address, serving until SIGINT or
//! SIGTERM, when it stops cleanly (connections closed, a checkpoint taken, the log synced and
//! closed). Its start-up lines on stdout say what it found, where it listens and with which
//! certificate; tests wait for the last one ("Ctrl-C to stop").

use herald_net::identity::Fingerprint;
use herald_net::{Node, NodeConfig};

use crate::config::{self, Config};

/// Starts the node and serves until a signal.
pub fn run(config: Config) -> Result<(), String> {
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
    let routes = config::apply_routes(broker, &config.routes)?;
    if !config.routes.is_empty() {
        println!(
            "  configured routes: {} created, {} altered, {} unchanged",
            routes.created, routes.altered, routes.unchanged
        );
    }
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
    println!(
        "  serving clients (herald exec, shell, status with --data-dir {}) and peers. Ctrl-C to stop.",
        data_dir.display()
    );
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
