//! `herald node`: a node on the configured data directory and address, serving until SIGINT or
//! SIGTERM, when it stops cleanly (connections closed, a checkpoint taken, the log synced and
//! closed). Its start-up lines on stdout say what it found, where it listens and with which
//! certificate; tests wait for the last one ("Ctrl-C to stop").

/// `println!` for the node's banner, ignoring a closed stdout: the node runs on whether anyone
/// reads it (`herald node | head -1` must not stop it).
macro_rules! banner {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

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
    banner!("herald node: data directory {}", data_dir.display());
    banner!(
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
        banner!(
            "  configured routes: {} created, {} altered, {} unchanged",
            routes.created,
            routes.altered,
            routes.unchanged
        );
    }
    banner!(
        "  log: {} bytes in segment files",
        broker.log_bytes_on_disk()
    );
    banner!("  broker instance {}", broker.broker_instance());
    banner!(
        "  listening on quic://{} (certificate fingerprint {}), {} trusted peer(s)",
        node.local_addr().map_err(|e| e.to_string())?,
        node.fingerprint(),
        config.peers.len() + config.ca_files.len(),
    );
    // The handlers are in place before the node says it is ready: a signal sent on that cue
    // must not meet the default action (which would kill the process without a checkpoint).
    let shutdown = ShutdownSignals::install()?;
    banner!(
        "  serving clients (herald exec, shell, status with --data-dir {}) and peers. Ctrl-C to stop.",
        data_dir.display()
    );
    let mut shutdown = shutdown;
    shutdown.wait();
    // From here a second signal, or a shutdown that takes too long, ends the process at once:
    // nothing acknowledged is lost (the log is crash-safe), only the checkpoint is not taken.
    std::thread::Builder::new()
        .name("herald-shutdown-watch".into())
        .spawn(move || shutdown.exit_on_second_or_after(SHUTDOWN_GRACE))
        .map_err(|e| format!("starting the shutdown watch: {e}"))?;
    node.shutdown()
        .map_err(|e| format!("stopping the node: {e}"))?;
    banner!("herald node: connections closed, checkpoint written, log synced and closed");
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
            .enable_time()
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
    fn wait(&mut self) {
        self.runtime.block_on(async {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
        });
    }

    /// Ends the process (exit status 1) at the next SIGINT or SIGTERM, or once `grace` has
    /// passed: the clean shutdown under way is taking too long for whoever runs the node.
    fn exit_on_second_or_after(mut self, grace: std::time::Duration) {
        let why = self.runtime.block_on(async {
            tokio::select! {
                _ = self.interrupt.recv() => "a second signal".to_owned(),
                _ = self.terminate.recv() => "a second signal".to_owned(),
                _ = tokio::time::sleep(grace) => format!("the shutdown took over {grace:?}"),
            }
        });
        eprintln!(
            "herald node: {why}: exiting now, without a checkpoint (nothing acknowledged is lost; \
             the next start recovers from the log)"
        );
        std::process::exit(1);
    }
}

/// Longest a clean shutdown may take before the process ends without it (see
/// `ShutdownSignals::exit_on_second_or_after`): client scripts stop between statements and the
/// network's drain is bounded, so only a stalled disk gets near it.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(60);
