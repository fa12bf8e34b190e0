//! A node: a [`Broker`] and its QUIC endpoint, joined. Two threads bridge them:
//!
//! - the **sender** lists the broker's transmission queue (`outbound`), routes each message
//!   (`Catalog::route`), and hands it to the transport, which keeps it until the far node
//!   acknowledges it (and sends it again after each reconnection); messages that had no route
//!   are looked at again when a commit creates or alters a route, those that failed otherwise
//!   (a host name that did not resolve) every [`ROUTE_RECHECK_INTERVAL`]; a route's host name
//!   is looked up on first use and again every [`RESOLVED_ADDRESS_REFRESH_INTERVAL`], and what
//!   waits unacknowledged at an address the name no longer gives moves to the new one; messages
//!   the engine drops from its transmission queue unacknowledged (END WITH ERROR or CLEANUP,
//!   expiry) are withdrawn from the transport (`Transport::withdraw`), so they stop going out
//!   and nothing about them stays in memory. A commit that adds to the transmission queue or
//!   changes a route runs that pass itself, on the committing thread (the broker's outbound
//!   listener), once it is durable: a thread wake-up less between a SEND and the network (two
//!   per request/reply round trip). The sender thread is woken only for what a committer
//!   should not do there: a pass already running, a listing longer than one pass, a full send
//!   queue to wait on, a host name to resolve;
//! - the **receiver** takes the transport's events: messages that arrived go to the broker in
//!   batches (`accept_arrivals_written`, one local transaction each — several for a batch
//!   larger than one record of the log — which receivers see as
//!   soon as it is written) and are acknowledged only once the log is durable through it (under
//!   the default durability): the **acker** thread waits for that and sends the
//!   acknowledgements, while the receiver goes on; acknowledgements remove
//!   messages from the transmission queue (`transmitted`, which pins the dialog to the far
//!   broker); errors from far brokers put their dialogs in ERROR (`remote_failed`).
//!
//! Which local services a trusted peer may reach is decided by its certificate
//! ([`NodeConfig::restricted_peers`]): a message for another service is answered with an
//! Error (−8494) on its dialog.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herald_engine::remote::{Arrival, ArrivalOutcome, SyncPoint, codes};
use herald_engine::{
    Broker, BrokerCore, BrokerInstanceId, ConversationId, IdMap, OutboundListener, RouteAddress,
    RouteChoice,
};
use parking_lot::Mutex;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::identity::{Fingerprint, NodeIdentity, Trust};
use crate::proto::{Event, MessageHeader, OutgoingMessage, SEND_QUEUE_MESSAGES_MAX};
use crate::quic::{PeerKey, Transport, TransportConfig, TransportEvent, TransportOptions};

/// How often the sender looks again at messages it could not hand on for a reason time may cure
/// (their address did not resolve, the transport refused them with an error), while there are
/// any. Messages with no route are looked at again only when a commit creates or alters a
/// route: a backlog waiting for a route costs nothing while it waits.
pub const ROUTE_RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long the sender uses the address a route's host name resolved to before looking the name
/// up again: a node that moved (a new address under the same name) is found within this. An
/// answer that still holds the address in use keeps it (no flapping between the addresses of
/// one name); a failed lookup keeps it too.
pub const RESOLVED_ADDRESS_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// Messages the sender takes from the transmission queue per pass.
pub const SENDER_BATCH_MESSAGES_MAX: usize = 4096;
/// After a peer's send queue refused messages, the sender offers it more once acknowledgements
/// brought its unacknowledged messages down to this, so that a whole sender batch fits: waking
/// it on every acknowledgement made a pass (its listing, statuses, hand-over) per few messages
/// acknowledged, and doubled the sender's CPU per message behind a backlog larger than the
/// send queue (the nodes bench's delivery of 100k messages).
pub const SEND_QUEUE_RESUME_MESSAGES: usize = SEND_QUEUE_MESSAGES_MAX - SENDER_BATCH_MESSAGES_MAX;
/// A committing thread hands new messages to the transport itself (see `on_outbound_commit`)
/// only while at most this many wait in the transmission queue unsent; more go to the sender
/// thread. Measured with the nodes bench: inline passes cut the request/reply round trip, but
/// a bulk sender's commits of 100 SENDs each were ~10% slower doing their own passes than
/// leaving them to the sender thread on the other CPU.
pub const INLINE_PASS_MESSAGES_MAX: usize = 16;
/// How long the acker leaves the `fdatasync` that makes arrivals durable to other committers
/// before it runs one itself. An application woken by the arrivals (a WAITFOR receive) usually
/// commits within this, and its sync then covers them too; an acker that synced at once would
/// make that commit wait for two syncs instead of one (request/reply p50 ~0.9 ms eager; see
/// the nodes bench for the figure with). Acknowledgements are that much later when nobody
/// commits, which costs nothing but memory for the sender's unacknowledged messages.
pub const ACK_SYNC_GRACE: Duration = Duration::from_micros(500);
/// How often the receiver tries again to record acknowledgements its log refused (a full
/// disk): until recorded, their messages stay in the transmission queue and in `dispatched`.
pub const ACK_RECORD_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Transport events the receiver handles per batch (arrivals become one local transaction, or
/// several when their bodies pass what one record of the log holds).
pub const RECEIVER_BATCH_EVENTS_MAX: usize = 1024;
/// Worker threads of the node's network runtime (quinn's drivers and the per-peer reader and
/// writer tasks). One: the tasks hand work to each other all the time, and on one worker that
/// is a function call where on two it is a cross-thread wake-up. Two nodes on a 2-CPU machine
/// (the bulk bench) used ~17% less CPU and ~35% fewer context switches per message with one
/// than with two, at the same throughput; the engine's sender and receiver threads and its
/// committers need the other CPU.
pub const NETWORK_WORKER_THREADS: usize = 1;
/// Directory (inside the data directory) holding the node's certificate and key.
pub const IDENTITY_DIR: &str = "identity";

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// UDP address of the QUIC endpoint (port 0: any free port, see [`Node::local_addr`]).
    pub listen: SocketAddr,
    pub broker: herald_engine::Options,
    /// Peers this node accepts (and dials): pinned fingerprints or CAs.
    pub trust: Trust,
    /// Peers that may reach only the listed local services. A trusted peer not listed here may
    /// reach any service.
    pub restricted_peers: HashMap<Fingerprint, HashSet<String>>,
}

/// A running node. Dropping it without [`Node::shutdown`] stops it without the clean steps.
#[derive(Debug)]
pub struct Node {
    broker: Arc<Broker>,
    transport: Arc<Transport>,
    /// The client protocol's sessions.
    clients: Arc<crate::client::server::ClientService>,
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// What the sender and receiver threads share.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// Wakes the receiver when the node stops (its event channel stays open meanwhile).
    stopped: tokio::sync::Notify,
    /// Transmissions handed to the transport (which keeps them until acknowledged), by id,
    /// with the address they went to.
    dispatched: Mutex<IdMap<u64, SocketAddr>>,
    /// Peers whose full send queue refused messages: the receiver wakes the sender once
    /// acknowledgements brought one down to `SEND_QUEUE_RESUME_MESSAGES` (and takes it out).
    full_peers: Mutex<HashSet<SocketAddr>>,
    /// The certificate behind each dialed peer while it is connected.
    dialed: Mutex<HashMap<SocketAddr, Fingerprint>>,
    /// The sender's place in the transmission queue; held by the pass running.
    passes: Mutex<Passes>,
    /// Acknowledgements of arrivals not known durable yet, for the acker thread.
    pending_acks: Mutex<PendingAcks>,
    /// Signalled when `pending_acks` gets some (or the node stops).
    acks_waiting: parking_lot::Condvar,
    restricted_peers: HashMap<Fingerprint, HashSet<String>>,
}

impl Node {
    /// Opens the broker in `config.data_dir` (creating it, its broker instance id and the
    /// node's certificate on first start), binds the QUIC endpoint and starts delivering.
    pub fn start(config: NodeConfig) -> Result<Node> {
        Node::start_with(config, TransportOptions::default())
    }

    /// [`Node::start`] with transport options other than the defaults.
    pub fn start_with(config: NodeConfig, options: TransportOptions) -> Result<Node> {
        let broker = Arc::new(Broker::open(&config.data_dir, config.broker.clone())?);
        let identity = load_identity(&config.data_dir, broker.broker_instance())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(NETWORK_WORKER_THREADS)
            .thread_name("herald-net")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the network runtime", &e))?;
        let (transport, events) = Transport::bind_on_with(
            runtime.handle(),
            TransportConfig {
                listen: config.listen,
                identity,
                trust: config.trust.clone(),
            },
            options,
        )?;
        let transport = Arc::new(transport);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            stopped: tokio::sync::Notify::new(),
            dispatched: Mutex::new(IdMap::default()),
            full_peers: Mutex::new(HashSet::new()),
            dialed: Mutex::new(HashMap::new()),
            passes: Mutex::new(Passes::new(&broker)),
            pending_acks: Mutex::new(PendingAcks::default()),
            acks_waiting: parking_lot::Condvar::new(),
            restricted_peers: config.restricted_peers,
        });
        let clients = serve_clients(&config.data_dir, &broker, &transport, &shared)?;
        let mut threads = Vec::new();
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| Error::io(format!("starting thread {name}"), &e))
        };
        let listener: OutboundListener = {
            // Weak: the transport holds the client service, which holds the broker.
            let (transport, shared) = (Arc::downgrade(&transport), shared.clone());
            Arc::new(move |broker: &BrokerCore| {
                if let Some(transport) = transport.upgrade() {
                    on_outbound_commit(broker, &transport, &shared);
                }
            })
        };
        broker.set_outbound_listener(Some(listener));
        {
            let (broker, transport, shared) = (broker.clone(), transport.clone(), shared.clone());
            threads.push(spawn(
                "herald-sender",
                Box::new(move || run_sender(&broker, &transport, &shared)),
            )?);
        }
        {
            let (broker, transport, shared) = (broker.clone(), transport.clone(), shared.clone());
            let runtime = runtime.handle().clone();
            threads.push(spawn(
                "herald-receiver",
                Box::new(move || run_receiver(&broker, &transport, &shared, &runtime, events)),
            )?);
        }
        {
            let (broker, transport, shared) = (broker.clone(), transport.clone(), shared.clone());
            threads.push(spawn(
                "herald-acker",
                Box::new(move || run_acker(&broker, &transport, &shared)),
            )?);
        }
        tracing::info!(
            dir = %config.data_dir.display(),
            addr = ?transport.local_addr().ok(),
            broker_instance = %broker.broker_instance(),
            fingerprint = %transport.identity().fingerprint(),
            "node started"
        );
        Ok(Node {
            broker,
            transport,
            clients,
            runtime: Some(runtime),
            shared,
            threads,
        })
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The address the node listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.transport.local_addr()
    }

    /// Client sessions open now (client protocol connections being served).
    pub fn client_sessions(&self) -> usize {
        self.clients.session_count()
    }

    /// The node's QUIC transport.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Messages handed to the transport and neither acknowledged nor withdrawn yet.
    pub fn dispatched(&self) -> usize {
        self.shared.dispatched.lock().len()
    }

    /// Stops at once, as if the process died: the network runtime is dropped with its
    /// connections unclosed (peers get no GoAway and no CONNECTION_CLOSE), the broker without a
    /// checkpoint. For tests of what peers do when a node vanishes; what was committed is
    /// durable as its durability says.
    pub fn abandon(mut self) {
        self.signal_stop();
        self.join_threads();
        // Every task (the QUIC drivers among them) is dropped before the transport is, so the
        // transport's close on drop has nothing left to send it.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(crate::quic::SHUTDOWN_TIMEOUT);
        }
    }

    /// The node's certificate fingerprint (what peers pin).
    pub fn fingerprint(&self) -> Fingerprint {
        self.transport.identity().fingerprint()
    }

    /// Stops cleanly: no new work is taken, connections close with a GoAway (what is not
    /// acknowledged stays in the transmission queue for the next start), the broker takes a
    /// checkpoint and syncs and closes its log.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_threads();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(crate::quic::SHUTDOWN_TIMEOUT);
        }
        let broker = self.broker.clone();
        // The threads are joined: once `self` goes, this is the broker's last holder.
        drop(self);
        match Arc::try_unwrap(broker) {
            Ok(broker) => broker.close().map_err(Error::from),
            // Something still holds it: it closes when the last holder drops it, without the
            // checkpoint (the log is whole either way).
            Err(_) => {
                tracing::warn!("the broker is still held elsewhere: not closed by the node");
                Ok(())
            }
        }
    }

    /// Tells the client sessions, sender and receiver threads to stop, waking them wherever
    /// they wait.
    fn signal_stop(&self) {
        // Client sessions first, while the runtime still drives their connections: their
        // waits end and their transactions roll back.
        self.clients.shutdown();
        self.broker.set_outbound_listener(None);
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.stopped.notify_one();
        self.broker.wake_outbound();
        let _pending = self.shared.pending_acks.lock();
        self.shared.acks_waiting.notify_one();
    }

    fn stop_threads(&mut self) {
        self.signal_stop();
        if let Some(runtime) = &self.runtime {
            runtime.block_on(self.transport.shutdown());
        }
        self.join_threads();
    }

    /// Joins the node's threads; one that panicked is reported (its panic message went to
    /// standard error when it happened).
    fn join_threads(&mut self) {
        for thread in self.threads.drain(..) {
            let name = thread.thread().name().unwrap_or("unnamed").to_owned();
            if thread.join().is_err() {
                tracing::error!(thread = %name, "a node thread had panicked");
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_threads();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(crate::quic::SHUTDOWN_TIMEOUT);
        }
    }
}

/// The node's certificate and key, created on first start, carrying the broker's instance id
/// (the one routes name and dialogs are pinned to).
fn load_identity(data_dir: &std::path::Path, broker: BrokerInstanceId) -> Result<NodeIdentity> {
    let dir = data_dir.join(IDENTITY_DIR);
    let identity = NodeIdentity::load_or_create(&dir)?;
    let wanted = Uuid::from_u128(broker.0);
    if identity.broker_instance() == wanted {
        return Ok(identity);
    }
    let identity = NodeIdentity::from_parts(
        wanted,
        identity.certificate_chain().to_vec(),
        identity.key().clone_key(),
    )?;
    identity.write(&dir)?;
    Ok(identity)
}

/// Writes (on first start) the local admin client certificate and serves the client protocol.
fn serve_clients(
    data_dir: &std::path::Path,
    broker: &Arc<Broker>,
    transport: &Arc<Transport>,
    shared: &Arc<Shared>,
) -> Result<Arc<crate::client::server::ClientService>> {
    let admin =
        crate::identity::ClientIdentity::load_or_create_admin(&data_dir.join(IDENTITY_DIR))?;
    let status: crate::client::server::StatusSource = {
        let (broker, transport, shared) =
            (broker.clone(), Arc::downgrade(transport), shared.clone());
        Arc::new(move || status_report(&broker, transport.upgrade().as_deref(), &shared))
    };
    // A peer allowed only some services must not get a session that can do anything.
    let not_clients = shared.restricted_peers.keys().copied().collect();
    let clients = crate::client::server::ClientService::new(broker.clone(), status, not_clients);
    transport.serve_clients(admin.fingerprint(), clients.clone())?;
    Ok(clients)
}

/// The node's status for `herald status` (`Request::Status`).
fn status_report(
    broker: &Broker,
    transport: Option<&Transport>,
    shared: &Shared,
) -> crate::client::StatusReport {
    use crate::client::PeerStatus;
    use crate::client::proto::{STATUS_TEXT_BYTES_MAX, cut};
    let mut peers: Vec<PeerStatus> = Vec::new();
    if let Some(transport) = transport {
        let dialed = shared.dialed.lock().clone();
        let mut sessions = transport.peers();
        // Dialed sessions first: a peer that both dialed this node and was dialed by it has
        // two sessions (one per direction) but is one peer, shown under its route's address.
        sessions.sort_by_key(|(key, _, _)| matches!(key, PeerKey::Accepted(..)));
        for (key, remote, unacknowledged) in sessions {
            let (address, fingerprint) = match key {
                PeerKey::Dialed(addr) => (addr.to_string(), dialed.get(&addr).copied()),
                PeerKey::Accepted(fingerprint, _) => (
                    remote.map_or_else(|| "(inbound)".to_owned(), |a| a.to_string()),
                    Some(fingerprint),
                ),
            };
            let fingerprint = fingerprint.map(|f| f.0);
            let same_peer =
                fingerprint.and_then(|f| peers.iter_mut().find(|p| p.fingerprint == Some(f)));
            match same_peer {
                Some(peer) => {
                    peer.connected |= remote.is_some();
                    peer.unacknowledged_messages += unacknowledged as u64;
                }
                None => peers.push(PeerStatus {
                    address,
                    fingerprint,
                    connected: remote.is_some(),
                    unacknowledged_messages: unacknowledged as u64,
                }),
            }
        }
    }
    // Peers routes name that this node has not dialed yet.
    for route in broker.catalog().routes.values() {
        if let RouteAddress::Quic { host, port } = &route.address {
            let address = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            if !peers.iter().any(|p| p.address == address) {
                peers.push(PeerStatus {
                    address: cut(address, STATUS_TEXT_BYTES_MAX),
                    fingerprint: None,
                    connected: false,
                    unacknowledged_messages: 0,
                });
            }
        }
    }
    let mut report = crate::client::StatusReport::of_broker(broker);
    report.add_peers(peers);
    report
}

/// Looks a host name and port up (`ToSocketAddrs`, which may block); replaced in tests.
type Lookup = Box<dyn Fn(&str, u16) -> Vec<SocketAddr> + Send>;

/// The host names routes give, resolved (only by the sender thread: a lookup may block).
struct Names {
    /// (host, port) → the address its messages go to, and when it was last looked up.
    resolved: HashMap<String, HashMap<u16, (SocketAddr, Instant)>>,
    /// (host, port) whose last lookup failed, and when: looked up again only
    /// `ROUTE_RECHECK_INTERVAL` later.
    unresolved: HashMap<String, HashMap<u16, Instant>>,
    lookup: Lookup,
    /// How long a resolved address is used before the name is looked up again.
    refresh_after: Duration,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names")
            .field("resolved", &self.resolved)
            .field("unresolved", &self.unresolved)
            .finish_non_exhaustive()
    }
}

impl Names {
    fn new() -> Names {
        Names {
            resolved: HashMap::new(),
            unresolved: HashMap::new(),
            lookup: Box::new(|host, port| {
                (host, port)
                    .to_socket_addrs()
                    .map(Iterator::collect)
                    .unwrap_or_default()
            }),
            refresh_after: RESOLVED_ADDRESS_REFRESH_INTERVAL,
        }
    }

    /// The address `host:port` resolved to, however long ago.
    fn cached(&self, host: &str, port: u16) -> Option<SocketAddr> {
        let ports = self.resolved.get(host)?;
        ports.get(&port).map(|(addr, _)| *addr)
    }

    /// Whether a lookup of `host:port` failed less than `ROUTE_RECHECK_INTERVAL` ago: one
    /// lookup per name and interval, not one per message (a backlog for a name that does not
    /// resolve would hold the sender, and every other peer's messages, for a lookup each).
    /// The address of `host`: cached, else looked up (which may block) unless that failed
    /// recently.
    fn lookup(&mut self, host: &str, port: u16) -> Option<SocketAddr> {
        if let Some(addr) = self.cached(host, port) {
            return Some(addr);
        }
        if self.failed_recently(host, port) {
            return None;
        }
        self.resolve(host, port)
    }

    fn failed_recently(&self, host: &str, port: u16) -> bool {
        self.unresolved
            .get(host)
            .and_then(|ports| ports.get(&port))
            .is_some_and(|at| at.elapsed() < ROUTE_RECHECK_INTERVAL)
    }

    /// Looks `host:port` up (blocking): its first address, now cached.
    fn resolve(&mut self, host: &str, port: u16) -> Option<SocketAddr> {
        match (self.lookup)(host, port).first() {
            Some(&addr) => {
                if let Some(ports) = self.unresolved.get_mut(host) {
                    ports.remove(&port);
                }
                self.resolved
                    .entry(host.to_owned())
                    .or_default()
                    .insert(port, (addr, Instant::now()));
                Some(addr)
            }
            None => {
                self.unresolved
                    .entry(host.to_owned())
                    .or_default()
                    .insert(port, Instant::now());
                None
            }
        }
    }

    /// Looks up again the names resolved more than `refresh_after` ago (blocking). A name
    /// whose answer no longer holds its address moves to the answer's first; one whose lookup
    /// fails keeps its address (a name server's outage should not stop a working peer).
    /// Returns the addresses left that no name resolves to any more.
    fn refresh(&mut self) -> Vec<SocketAddr> {
        let stale: Vec<(String, u16)> = self
            .resolved
            .iter()
            .flat_map(|(host, ports)| {
                ports
                    .iter()
                    .filter(|(_, (_, at))| at.elapsed() >= self.refresh_after)
                    .map(move |(port, _)| (host.clone(), *port))
            })
            .collect();
        let mut left = Vec::new();
        for (host, port) in stale {
            let answer = (self.lookup)(&host, port);
            let Some(entry) = self.resolved.get_mut(&host).and_then(|p| p.get_mut(&port)) else {
                continue;
            };
            entry.1 = Instant::now();
            if let Some(&new) = answer.first()
                && !answer.contains(&entry.0)
            {
                tracing::info!(%host, port, old = %entry.0, %new, "a route's host name moved");
                left.push(std::mem::replace(&mut entry.0, new));
            }
        }
        left.retain(|old| {
            !self
                .resolved
                .values()
                .any(|ports| ports.values().any(|(addr, _)| addr == old))
        });
        left
    }
}

/// Where the sender's passes over the transmission queue are; one pass runs at a time, on the
/// sender thread or on a committing thread (see [`on_outbound_commit`]).
#[derive(Debug)]
struct Passes {
    names: Names,
    /// Passes continue after the last message listed (new ones only); a pass starts from the
    /// beginning again after a commit created or altered a route (for messages that had no
    /// route), and every `ROUTE_RECHECK_INTERVAL` while `retry_wanted`.
    cursor: Option<u64>,
    last_full_pass: Instant,
    /// Set when a pass left a message for a reason time may cure (its host name did not
    /// resolve, the transport refused it with an error other than a full send queue).
    retry_wanted: bool,
    drops_seen: u64,
    route_changes_seen: herald_engine::RouteChanges,
    /// Messages listed by passes so far (what the passes cost).
    listed: u64,
    /// Peers whose full send queue refused messages, with the first message of theirs not
    /// handed on since: their messages are held back from every listing after it (so none
    /// overtakes another) until they have room, then go from there, in order, in passes of
    /// their own. Other peers' messages go on meanwhile.
    held: IdMap<SocketAddr, u64>,
}

impl Passes {
    fn new(broker: &BrokerCore) -> Passes {
        Passes {
            names: Names::new(),
            cursor: None,
            last_full_pass: Instant::now(),
            retry_wanted: false,
            drops_seen: broker.transmission_drops(),
            route_changes_seen: broker.route_changes(),
            listed: 0,
            held: IdMap::default(),
        }
    }
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Everything listed was handed on (or has no route yet).
    Done,
    /// The listing was full, or a held peer's messages went: more may wait.
    More,
    /// An address must be resolved first (which may block): left, untouched, to the sender
    /// thread.
    Resolve,
}

/// One pass: withdraws what the engine dropped, lists the transmission queue after the
/// cursor and hands what it finds to the transport — or, when a peer held back behind its full
/// send queue has room again, resumes that peer's messages instead (see `Passes::held`).
/// `inline` (a committing thread) never resolves a host name.
fn pass(
    broker: &BrokerCore,
    transport: &Transport,
    shared: &Shared,
    passes: &mut Passes,
    inline: bool,
) -> Pass {
    let drops = broker.transmission_drops();
    if drops != passes.drops_seen {
        passes.drops_seen = drops;
        withdraw_dropped(broker, transport, shared);
    }
    // A name that moved: what went to its old address goes to the new one (the old peer, left
    // with nothing, is retired by the transport). Only the sender thread looks names up.
    if !inline {
        for old in passes.names.refresh() {
            move_off(transport, shared, old);
            passes.held.remove(&old);
            shared.full_peers.lock().remove(&old);
            list_from_start(passes);
        }
    }
    // A new or altered route may be the one messages behind the cursor waited for (a peer's
    // backlog, sent before its route existed): they go at once. Nothing else makes a message
    // with no route routable, so those are not listed again otherwise — a walk over the whole
    // transmission queue every `ROUTE_RECHECK_INTERVAL` is only for messages time may help.
    let route_changes = broker.route_changes();
    let retry_due =
        passes.retry_wanted && passes.last_full_pass.elapsed() >= ROUTE_RECHECK_INTERVAL;
    if route_changes != passes.route_changes_seen {
        // What the transport holds may have to go elsewhere now: the sender thread's, as
        // taking it back may need names looked up.
        if inline {
            return Pass::Resolve;
        }
        reroute_dispatched(broker, transport, shared, passes);
    }
    if route_changes != passes.route_changes_seen || retry_due {
        passes.route_changes_seen = route_changes;
        passes.retry_wanted = false;
        list_from_start(passes);
        passes.last_full_pass = Instant::now();
    }
    if let Some((addr, first, room)) = held_with_room(transport, shared, passes) {
        return resume_held(broker, transport, shared, passes, inline, addr, first, room);
    }
    let batch = SENDER_BATCH_MESSAGES_MAX;
    let Some(waiting) = list_waiting(broker, shared, passes, passes.cursor, batch) else {
        return Pass::More;
    };
    let more = waiting.len() == batch;
    let last = waiting.last().map(|m| m.id);
    // What goes in this pass, by address, in order: one hand-over and one status update per
    // address.
    let mut batches: IdMap<SocketAddr, Vec<OutgoingMessage>> = IdMap::default();
    for message in waiting {
        match route_message(broker, passes, message, inline) {
            Routed::To(addr, outgoing) => batches.entry(addr).or_default().push(outgoing),
            Routed::Left => {}
            // Nothing was handed on and the cursor has not moved: the sender thread takes the
            // same listing again.
            Routed::Resolve => return Pass::Resolve,
        }
    }
    if let Some(last) = last {
        passes.cursor = Some(last);
    }
    for (addr, messages) in batches {
        if let Some(first) = passes.held.get_mut(&addr) {
            // Behind what its full send queue refused: they go after it, when it has room.
            *first = (*first).min(messages[0].id);
            continue;
        }
        let handed = hand_over(broker, transport, shared, addr, messages);
        passes.retry_wanted |= handed.failed;
        if let Some(id) = handed.queue_full_at {
            hold(shared, passes, addr, id);
        }
    }
    if more { Pass::More } else { Pass::Done }
}

/// Lists the transmission queue from its start again. A held peer resumes from the start too:
/// messages before its first held back may lead to it now (a route changed, a name moved or
/// resolved at last), and those after must not overtake them.
fn list_from_start(passes: &mut Passes) {
    passes.cursor = None;
    for first in passes.held.values_mut() {
        *first = 0;
    }
}

/// Up to `batch` messages of the transmission queue after `after` that the transport does not
/// hold already (skipped without being copied). `None` if a route changed since this pass took
/// back what the old routes had sent: what it listed may be routed past a dialog's earlier
/// messages still at an old address, so nothing goes; the next pass takes those back first.
fn list_waiting(
    broker: &BrokerCore,
    shared: &Shared,
    passes: &mut Passes,
    after: Option<u64>,
    batch: usize,
) -> Option<Vec<herald_engine::remote::Outbound>> {
    let waiting = {
        let dispatched = shared.dispatched.lock();
        broker.outbound_where(after, batch, |id| !dispatched.contains_key(&id))
    };
    passes.listed += waiting.len() as u64;
    (broker.route_changes() == passes.route_changes_seen).then_some(waiting)
}

/// Holds `addr`'s messages back from `first` on: its send queue is full.
fn hold(shared: &Shared, passes: &mut Passes, addr: SocketAddr, first: u64) {
    passes.held.insert(addr, first);
    shared.full_peers.lock().insert(addr);
}

/// A held peer whose send queue has room again (acknowledgements brought it down to
/// `SEND_QUEUE_RESUME_MESSAGES`), with the first message held back and how many messages it
/// takes now; the one held back longest if several.
fn held_with_room(
    transport: &Transport,
    shared: &Shared,
    passes: &Passes,
) -> Option<(SocketAddr, u64, usize)> {
    let (addr, first, room) = passes
        .held
        .iter()
        .filter_map(|(addr, first)| {
            let queued = transport.unacknowledged_messages(&PeerKey::Dialed(*addr));
            (queued <= SEND_QUEUE_RESUME_MESSAGES)
                .then(|| (*addr, *first, SEND_QUEUE_MESSAGES_MAX - queued))
        })
        .min_by_key(|(_, first, _)| *first)?;
    shared.full_peers.lock().remove(&addr);
    Some((addr, first, room))
}

/// A pass of held peer `addr`'s own: lists from its first message held back, at most as many
/// as it has room for, and hands on its messages (the others listed are either with the
/// transport or held for their own peer). The peer is let go once a listing reaches the end
/// of the transmission queue with nothing refused.
#[allow(clippy::too_many_arguments)]
fn resume_held(
    broker: &BrokerCore,
    transport: &Transport,
    shared: &Shared,
    passes: &mut Passes,
    inline: bool,
    addr: SocketAddr,
    first: u64,
    room: usize,
) -> Pass {
    let batch = room.clamp(1, SENDER_BATCH_MESSAGES_MAX);
    let Some(waiting) = list_waiting(broker, shared, passes, first.checked_sub(1), batch) else {
        return Pass::More;
    };
    let more = waiting.len() == batch;
    let last = waiting.last().map(|m| m.id);
    let mut its = Vec::new();
    for message in waiting {
        match route_message(broker, passes, message, inline) {
            Routed::To(to, outgoing) if to == addr => its.push(outgoing),
            Routed::To(..) | Routed::Left => {}
            Routed::Resolve => return Pass::Resolve,
        }
    }
    let handed = hand_over(broker, transport, shared, addr, its);
    passes.retry_wanted |= handed.failed;
    match (handed.queue_full_at, last) {
        (Some(refused), _) => hold(shared, passes, addr, refused),
        // Its room is used up, or about to be: the receiver wakes the sender for the rest.
        (None, Some(last)) if more => hold(shared, passes, addr, last + 1),
        _ => {
            passes.held.remove(&addr);
        }
    }
    Pass::More
}

/// Where a listed message goes.
enum Routed {
    To(SocketAddr, OutgoingMessage),
    /// Not now: no route, a name that does not resolve, a LOCAL route (its status says so).
    Left,
    /// Its host name must be looked up, which a committing thread does not do.
    Resolve,
}

fn route_message(
    broker: &BrokerCore,
    passes: &mut Passes,
    message: herald_engine::remote::Outbound,
    inline: bool,
) -> Routed {
    let (host, port) = match &*message.route {
        RouteChoice::Remote {
            address: RouteAddress::Quic { host, port },
            ..
        } => (host, *port),
        // No route: `transmission_queue` says so; the next pass looks again.
        RouteChoice::NoRoute => return Routed::Left,
        RouteChoice::Remote {
            address: RouteAddress::Local,
            ..
        }
        | RouteChoice::Local => {
            broker.set_transmission_status(
                &[message.id],
                "the route says LOCAL, but the dialog's far side is not on this broker",
            );
            return Routed::Left;
        }
    };
    let addr = match passes.names.cached(host, port) {
        Some(addr) => addr,
        None => {
            if inline && !passes.names.failed_recently(host, port) {
                return Routed::Resolve;
            }
            let Some(addr) = passes.names.lookup(host, port) else {
                broker.set_transmission_status(
                    &[message.id],
                    &format!("cannot resolve {host}:{port}"),
                );
                passes.retry_wanted = true;
                return Routed::Left;
            };
            addr
        }
    };
    let outgoing = OutgoingMessage {
        id: message.id,
        header: MessageHeader {
            conversation_id: message.conversation_id.0.to_be_bytes(),
            from_initiator: message.from_initiator,
            sequence: message.sequence,
            source_service: message.from_service,
            target_service: message.to_service,
            contract: message.contract,
            message_type: message.message_type,
            target_broker_instance: message.to_broker_instance.map(|b| b.0.to_be_bytes()),
            lifetime_deadline_secs: message.expires_at_ms.div_ceil(1000),
        },
        body: message.body,
    };
    Routed::To(addr, outgoing)
}

/// The outbound listener (`BrokerCore::set_outbound_listener`): a commit changed the
/// transmission queue, so this committing thread runs the pass itself — the new messages go to
/// the transport without waking the sender thread, which matters most for a request/reply
/// round trip (two such hand-offs per round trip) — unless a pass is running already, or this
/// one leaves work the sender thread must do (more than a listing, a full send queue, a name
/// to resolve): then the sender thread is woken, as commits did before.
fn on_outbound_commit(broker: &BrokerCore, transport: &Transport, shared: &Shared) {
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    // Many messages waiting (bulk sends): the sender thread hands them on while this thread
    // goes on committing, on another CPU, rather than delaying its caller.
    let waiting = broker
        .transmission_queue_len()
        .saturating_sub(shared.dispatched.lock().len());
    if waiting > INLINE_PASS_MESSAGES_MAX {
        broker.wake_outbound();
        return;
    }
    let outcome = match shared.passes.try_lock() {
        Some(mut passes) => pass(broker, transport, shared, &mut passes, true),
        // The running pass may have listed before this commit: the sender thread looks again.
        None => Pass::More,
    };
    if outcome != Pass::Done {
        broker.wake_outbound();
    }
}

fn run_sender(broker: &Broker, transport: &Transport, shared: &Shared) {
    let waiter = broker.outbound_waiter();
    while !shared.stop.load(Ordering::SeqCst) {
        let seen = waiter.generation();
        let outcome = pass(broker, transport, shared, &mut shared.passes.lock(), false);
        match outcome {
            Pass::More | Pass::Resolve => {}
            Pass::Done => {
                // Acknowledgements may have made room before the receiver saw the peer held.
                wake_sender_if_room(broker, transport, shared);
                waiter.wait_past(seen, ROUTE_RECHECK_INTERVAL);
            }
        }
    }
}

/// Wakes the sender if acknowledgements brought a held peer's send queue down to
/// `SEND_QUEUE_RESUME_MESSAGES` (once per hold: the peer leaves `full_peers`).
fn wake_sender_if_room(broker: &BrokerCore, transport: &Transport, shared: &Shared) {
    let full: Vec<SocketAddr> = shared.full_peers.lock().iter().copied().collect();
    // Not under the lock: the transport takes the peer's session lock.
    let with_room: Vec<SocketAddr> = full
        .into_iter()
        .filter(|addr| {
            transport.unacknowledged_messages(&PeerKey::Dialed(*addr)) <= SEND_QUEUE_RESUME_MESSAGES
        })
        .collect();
    if with_room.is_empty() {
        return;
    }
    let mut full = shared.full_peers.lock();
    for addr in &with_room {
        full.remove(addr);
    }
    drop(full);
    broker.wake_outbound();
}

/// What became of messages given to `hand_over`.
#[derive(Debug)]
struct HandedOver {
    /// The first message the transport refused because its send queue was full (it and those
    /// after it were not taken).
    queue_full_at: Option<u64>,
    /// The transport refused some with another error (their status says which).
    failed: bool,
}

/// Hands messages for `addr` to the transport, recorded in `dispatched` first (so that an
/// acknowledgement arriving at once finds them there), and says so in their status.
fn hand_over(
    broker: &BrokerCore,
    transport: &Transport,
    shared: &Shared,
    addr: SocketAddr,
    messages: Vec<OutgoingMessage>,
) -> HandedOver {
    if messages.is_empty() {
        return HandedOver {
            queue_full_at: None,
            failed: false,
        };
    }
    let mut ids: Vec<u64> = messages.iter().map(|m| m.id).collect();
    {
        let mut dispatched = shared.dispatched.lock();
        dispatched.extend(ids.iter().map(|id| (*id, addr)));
    }
    let results = transport.send_all(addr, messages);
    // Past a full send queue nothing more was taken: those are simply not sent yet.
    let refused_at = results
        .iter()
        .position(|r| matches!(r, Err(Error::SendQueueFull { .. })));
    let queue_full = refused_at.map(|at| ids[at]);
    if let Some(at) = refused_at {
        let mut dispatched = shared.dispatched.lock();
        for id in ids.drain(at..) {
            dispatched.remove(&id);
        }
    }
    let failed: Vec<(u64, Error)> = ids
        .iter()
        .zip(results)
        .filter_map(|(id, result)| result.err().map(|e| (*id, e)))
        .collect();
    let any_failed = !failed.is_empty();
    if any_failed {
        let mut dispatched = shared.dispatched.lock();
        for (id, _) in &failed {
            dispatched.remove(id);
        }
        drop(dispatched);
        for (id, e) in &failed {
            broker.set_transmission_status(&[*id], &format!("not sent: {e}"));
        }
        let failed: HashSet<u64> = failed.into_iter().map(|(id, _)| id).collect();
        ids.retain(|id| !failed.contains(id));
    }
    // A peer not connected (yet, or any more) gets them when it is: its Connected event says
    // "sent" then, and a lost connection "unreachable".
    let status = if transport.is_connected(&PeerKey::Dialed(addr)) {
        format!("sent to {addr}; waiting for its acknowledgement")
    } else {
        format!("waiting for a connection to {addr}")
    };
    broker.set_transmission_status(&ids, &status);
    HandedOver {
        queue_full_at: queue_full,
        failed: any_failed,
    }
}

/// After a route change: takes back from the transport what it holds for an address its
/// message's route no longer leads to (the route was altered or dropped), so that the pass
/// that follows sends it where its route leads now, or leaves it waiting for one. A dialog's
/// messages all follow one route, so they move together and in order; left where they were,
/// the earlier ones would have been retried at the old address for ever, and the later ones,
/// sent to the new one, refused there as a gap.
fn reroute_dispatched(
    broker: &BrokerCore,
    transport: &Transport,
    shared: &Shared,
    passes: &mut Passes,
) {
    let dispatched: IdMap<u64, SocketAddr> = shared.dispatched.lock().clone();
    if dispatched.is_empty() {
        return;
    }
    let listed = broker.outbound_where(None, dispatched.len(), |id| dispatched.contains_key(&id));
    let mut moved: IdMap<SocketAddr, Vec<u64>> = IdMap::default();
    for message in listed {
        let leads_to = match &*message.route {
            RouteChoice::Remote {
                address: RouteAddress::Quic { host, port },
                ..
            } => passes.names.lookup(host, *port),
            _ => None,
        };
        let went_to = dispatched[&message.id];
        if leads_to != Some(went_to) {
            moved.entry(went_to).or_default().push(message.id);
        }
    }
    for (old, ids) in moved {
        {
            let mut dispatched = shared.dispatched.lock();
            for id in &ids {
                dispatched.remove(id);
            }
        }
        let withdrawn = transport.withdraw(old, &ids);
        tracing::debug!(%old, withdrawn, "took back what a route change sends elsewhere");
    }
}

/// The transmissions handed to the transport for `addr` and not acknowledged yet.
fn dispatched_to(shared: &Shared, addr: SocketAddr) -> Vec<u64> {
    dispatched_to_locked(&shared.dispatched.lock(), addr)
}

fn dispatched_to_locked(dispatched: &IdMap<u64, SocketAddr>, addr: SocketAddr) -> Vec<u64> {
    dispatched
        .iter()
        .filter(|(_, to)| **to == addr)
        .map(|(id, _)| *id)
        .collect()
}

/// Takes back from the transport what it handed to `old` and is not acknowledged yet, so that the
/// next pass sends it where its route's name resolves now.
fn move_off(transport: &Transport, shared: &Shared, old: SocketAddr) {
    let ids: Vec<u64> = {
        let mut dispatched = shared.dispatched.lock();
        let ids = dispatched_to_locked(&dispatched, old);
        for id in &ids {
            dispatched.remove(id);
        }
        ids
    };
    let withdrawn = transport.withdraw(old, &ids);
    tracing::debug!(%old, withdrawn, "took back what went to a moved name's old address");
}

/// Takes back from the transport what it holds for transmissions the engine dropped
/// unacknowledged (END WITH ERROR or CLEANUP, lifetime passed), so they stop going out and
/// neither `dispatched` nor the status texts keep them.
fn withdraw_dropped(broker: &BrokerCore, transport: &Transport, shared: &Shared) {
    let ids: Vec<u64> = shared.dispatched.lock().keys().copied().collect();
    let gone = broker.transmissions_gone(&ids);
    let mut by_addr: HashMap<SocketAddr, Vec<u64>> = HashMap::new();
    {
        let mut dispatched = shared.dispatched.lock();
        for id in gone {
            if let Some(addr) = dispatched.remove(&id) {
                by_addr.entry(addr).or_default().push(id);
            }
        }
    }
    for (addr, ids) in by_addr {
        let withdrawn = transport.withdraw(addr, &ids);
        tracing::debug!(%addr, withdrawn, "withdrew transmissions the engine dropped");
    }
    broker.prune_transmission_statuses();
}

fn run_receiver(
    broker: &Broker,
    transport: &Transport,
    shared: &Shared,
    runtime: &tokio::runtime::Handle,
    mut events: crate::quic::Events,
) {
    // Acknowledgements the log refused to record, by far broker: tried again with the next
    // events, or after `ACK_RECORD_RETRY_INTERVAL` if none come.
    let mut unrecorded: HashMap<[u8; 16], Vec<u64>> = HashMap::new();
    let mut recording_failed = false;
    let next = |events: &mut crate::quic::Events, retry: bool| {
        runtime.block_on(async {
            tokio::select! {
                event = events.recv() => event.map(Some),
                () = shared.stopped.notified() => None,
                // An async block, so that no timer is made unless a retry is due.
                () = async { tokio::time::sleep(ACK_RECORD_RETRY_INTERVAL).await }, if retry => {
                    Some(None)
                }
            }
        })
    };
    // Kept between batches (at most `RECEIVER_BATCH_EVENTS_MAX`): not grown again each time.
    let mut batch: Vec<TransportEvent> = Vec::new();
    while let Some(first) = next(&mut events, !unrecorded.is_empty()) {
        batch.extend(first);
        while batch.len() < RECEIVER_BATCH_EVENTS_MAX {
            match events.try_recv() {
                Some(event) => batch.push(event),
                None => break,
            }
        }
        let mut arrivals: Vec<(PeerKey, Arrival)> = Vec::with_capacity(batch.len());
        let mut acknowledged = std::mem::take(&mut unrecorded);
        for event in batch.drain(..) {
            match event {
                TransportEvent::Connected {
                    peer, fingerprint, ..
                } => {
                    if let PeerKey::Dialed(addr) = peer {
                        shared.dialed.lock().insert(addr, fingerprint);
                        // What a lost connection marked unreachable is sent again first thing
                        // on this one.
                        broker.set_transmission_status(
                            &dispatched_to(shared, addr),
                            &format!("sent to {addr}; waiting for its acknowledgement"),
                        );
                    }
                }
                TransportEvent::Session { peer, event } => match event {
                    Event::Received(message) => {
                        let header = message.header;
                        let arrival = Arrival {
                            conversation_id: ConversationId(u128::from_be_bytes(
                                header.conversation_id,
                            )),
                            from_initiator: header.from_initiator,
                            sequence: header.sequence,
                            from_service: header.source_service,
                            to_service: header.target_service,
                            contract: header.contract,
                            message_type: header.message_type,
                            body: message.body,
                            source_broker: BrokerInstanceId(u128::from_be_bytes(
                                message.source_broker_instance,
                            )),
                            expires_at_ms: header.lifetime_deadline_secs.saturating_mul(1000),
                        };
                        if let Some(refusal) = refused_by_access(shared, &peer, &arrival) {
                            reply_error(transport, &peer, &arrival, codes::NO_PERMISSION, &refusal);
                            continue;
                        }
                        arrivals.push((peer, arrival));
                    }
                    Event::Acknowledged {
                        id,
                        far_broker_instance,
                    } => acknowledged
                        .entry(far_broker_instance)
                        .or_default()
                        .push(id),
                    Event::RemoteError {
                        conversation_id,
                        from_initiator,
                        code,
                        description,
                    } => {
                        // A far broker's error answers messages this node sent, and those go
                        // only on connections it dialed: one on a connection the peer opened is
                        // about nothing this node sent it, and must not fail a dialog.
                        if let PeerKey::Accepted(fingerprint, _) = peer {
                            tracing::warn!(
                                %fingerprint,
                                "ignoring a broker error on a connection the peer opened"
                            );
                            continue;
                        }
                        let conversation = ConversationId(u128::from_be_bytes(conversation_id));
                        if let Err(e) =
                            broker.remote_failed(conversation, from_initiator, code, &description)
                        {
                            tracing::error!(error = %e, "recording a far broker's error failed");
                        }
                    }
                    Event::Connected { .. } | Event::PeerGoingAway => {}
                },
                TransportEvent::Disconnected { peer, reason } => {
                    if let PeerKey::Dialed(addr) = peer {
                        // Its next connection says again whose certificate it is; until then
                        // nothing arrives on it (events come in order), and the map holds only
                        // the peers connected now, not every address ever dialed.
                        shared.dialed.lock().remove(&addr);
                        broker.set_transmission_status(
                            &dispatched_to(shared, addr),
                            &format!("{addr} unreachable ({reason}); retrying"),
                        );
                    }
                }
                TransportEvent::Refused {
                    fingerprint,
                    reason,
                } => tracing::warn!(%fingerprint, %reason, "peer refused"),
            }
        }
        for (far_bytes, ids) in acknowledged {
            let far = BrokerInstanceId(u128::from_be_bytes(far_bytes));
            match broker.transmitted(&ids, Some(far)) {
                Ok(()) => {
                    if std::mem::take(&mut recording_failed) {
                        tracing::info!("recording acknowledgements works again");
                    }
                    let mut dispatched = shared.dispatched.lock();
                    for id in ids {
                        dispatched.remove(&id);
                    }
                    drop(dispatched);
                    wake_sender_if_room(broker, transport, shared);
                }
                // The messages stay queued (the far broker has them, so nothing is sent again
                // while this node runs); try again until the log takes the record.
                Err(e) => {
                    if !std::mem::replace(&mut recording_failed, true) {
                        tracing::error!(error = %e, "recording acknowledgements failed; trying again");
                    }
                    unrecorded.entry(far_bytes).or_default().extend(ids);
                }
            }
        }
        if !arrivals.is_empty() {
            deliver(broker, transport, shared, arrivals);
        }
    }
}

/// Acknowledgements waiting for the log to be durable through `point`: per conversation
/// direction of each peer, the highest sequence accepted (or repeated).
#[derive(Debug, Default)]
struct PendingAcks {
    acks: IdMap<(PeerKey, u128, bool), u64>,
    point: SyncPoint,
}

/// Stores a batch of arrivals (one local transaction, written and applied: receivers see them
/// at once) and answers refusals; its acknowledgements go out once the log is durable through
/// it — from the acker thread under `Sync` durability (so the receiver goes on with the next
/// batch meanwhile, and a receiving application's commit may be the sync that covers it), at
/// once otherwise (commits do not wait there either). Acks are cumulative, so each
/// conversation direction of each peer gets one, for the highest sequence accepted (or
/// repeated): the ones below it are either accepted in this batch or already here.
fn deliver(
    broker: &Broker,
    transport: &Transport,
    shared: &Shared,
    arrivals: Vec<(PeerKey, Arrival)>,
) {
    let (peers, batch): (Vec<PeerKey>, Vec<Arrival>) = arrivals.into_iter().unzip();
    let (outcomes, point) = match broker.accept_arrivals_written(&batch) {
        Ok(accepted) => accepted,
        Err(e) => {
            // Nothing is acknowledged: the senders send again.
            tracing::error!(error = %e, "storing arrived messages failed");
            return;
        }
    };
    let mut acks: IdMap<(PeerKey, u128, bool), u64> = IdMap::default();
    for ((peer, arrival), outcome) in peers.iter().zip(&batch).zip(outcomes) {
        match outcome {
            ArrivalOutcome::Accepted | ArrivalOutcome::Duplicate => {
                let highest = acks
                    .entry((*peer, arrival.conversation_id.0, arrival.from_initiator))
                    .or_insert(arrival.sequence);
                *highest = (*highest).max(arrival.sequence);
            }
            ArrivalOutcome::Gap => {}
            ArrivalOutcome::Refused { code, description } => {
                reply_error(transport, peer, arrival, code, &description);
            }
        }
    }
    if acks.is_empty() {
        return;
    }
    if !broker.waits_for_sync() {
        acknowledge(transport, acks);
        return;
    }
    let mut pending = shared.pending_acks.lock();
    for (key, sequence) in acks {
        let highest = pending.acks.entry(key).or_insert(sequence);
        *highest = (*highest).max(sequence);
    }
    pending.point = pending.point.max(point);
    drop(pending);
    shared.acks_waiting.notify_one();
}

fn acknowledge(transport: &Transport, acks: IdMap<(PeerKey, u128, bool), u64>) {
    for ((peer, conversation, from_initiator), sequence) in acks {
        let _ = transport.acknowledge(&peer, conversation.to_be_bytes(), from_initiator, sequence);
    }
}

/// The acker thread: waits for the log to be durable through what the receiver stored, then
/// acknowledges it; what arrives meanwhile is acknowledged after the next wait, together.
fn run_acker(broker: &Broker, transport: &Transport, shared: &Shared) {
    loop {
        let pending = {
            let mut pending = shared.pending_acks.lock();
            while pending.acks.is_empty() && !shared.stop.load(Ordering::SeqCst) {
                shared.acks_waiting.wait(&mut pending);
            }
            if pending.acks.is_empty() {
                return;
            }
            std::mem::take(&mut *pending)
        };
        match broker.wait_synced_lazily(pending.point, ACK_SYNC_GRACE) {
            Ok(()) => acknowledge(transport, pending.acks),
            // Nothing is acknowledged: the senders send again (after a reopen, the log is
            // whatever it could make durable).
            Err(e) => tracing::error!(error = %e, "making arrived messages durable failed"),
        }
    }
}

fn reply_error(transport: &Transport, peer: &PeerKey, arrival: &Arrival, code: i32, text: &str) {
    // The text may quote the message (a validation error names its tags): cut at a character
    // boundary.
    let description =
        crate::client::proto::cut(text.to_owned(), crate::proto::DESCRIPTION_BYTES_MAX);
    if let Err(e) = transport.send_error(
        peer,
        arrival.conversation_id.0.to_be_bytes(),
        arrival.from_initiator,
        code,
        description,
    ) {
        tracing::warn!(error = %e, "could not answer a refused message");
    }
}

/// Why `peer` may not send `arrival` (its certificate may reach only some services), if so.
fn refused_by_access(shared: &Shared, peer: &PeerKey, arrival: &Arrival) -> Option<String> {
    let fingerprint = match peer {
        PeerKey::Accepted(fingerprint, _) => *fingerprint,
        PeerKey::Dialed(addr) => *shared.dialed.lock().get(addr)?,
    };
    let allowed = shared.restricted_peers.get(&fingerprint)?;
    (!allowed.contains(&*arrival.to_service)).then(|| {
        format!(
            "the sending node ({fingerprint}) may not reach service {:?}",
            arrival.to_service
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_engine::{DialogOptions, QueueOptions, Route, SentBy, Validation};

    fn listed(node: &Node) -> u64 {
        node.shared.passes.lock().listed
    }

    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let started = Instant::now();
        while !condition() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "timed out waiting until {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A node trusting some other node (none is reached here), with `messages` (a multiple of
    /// 3) waiting in its transmission queue for service `//far`, which has no route.
    fn node_with_backlog(dir: &std::path::Path, messages: u64) -> Node {
        let stranger = NodeIdentity::generate().unwrap().fingerprint();
        node_with_backlog_trusting(dir, messages, stranger, TransportOptions::default())
    }

    /// [`node_with_backlog`] trusting the node of certificate `far`, with `options`.
    fn node_with_backlog_trusting(
        dir: &std::path::Path,
        messages: u64,
        far: Fingerprint,
        options: TransportOptions,
    ) -> Node {
        let config = NodeConfig {
            data_dir: dir.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            broker: herald_engine::Options::default(),
            trust: Trust::pinned([far]),
            restricted_peers: HashMap::new(),
        };
        let node = Node::start_with(config, options).unwrap();
        let mut tx = node.broker().begin();
        tx.create_message_type("//m", Validation::None).unwrap();
        tx.create_contract("//c", &[("//m", SentBy::Initiator)])
            .unwrap();
        tx.create_queue("q", QueueOptions::default()).unwrap();
        tx.create_service("//here", "q", &["//c"]).unwrap();
        for _ in 0..messages / 3 {
            let h = tx
                .begin_dialog("//here", "//far", "//c", DialogOptions::default())
                .unwrap();
            for _ in 0..3 {
                tx.send(h, "//m", b"waiting").unwrap();
            }
        }
        tx.commit().unwrap();
        wait_until("the backlog is listed", || listed(&node) >= messages);
        node
    }

    fn far_route(address: &str) -> Route {
        Route {
            name: "far".into(),
            service_name: Some("//far".into()),
            broker_instance: None,
            address: RouteAddress::parse(address).unwrap(),
            expires_at_ms: None,
        }
    }

    /// Commits the route of `//far` to `address`.
    fn create_far_route(node: &Node, address: &str) {
        let mut tx = node.broker().begin();
        tx.create_route(far_route(address)).unwrap();
        tx.commit().unwrap();
    }

    /// A backlog with no route is listed once, not again at every `ROUTE_RECHECK_INTERVAL`
    /// (a walk over all of it each time, for nothing); creating a route lists it again at once.
    #[test]
    fn messages_without_a_route_are_listed_again_only_when_a_route_changes() {
        const MESSAGES: u64 = 300;
        let dir = tempfile::tempdir().unwrap();
        let node = node_with_backlog(dir.path(), MESSAGES);
        let once = listed(&node);
        std::thread::sleep(ROUTE_RECHECK_INTERVAL * 5 / 2);
        assert_eq!(
            listed(&node),
            once,
            "nothing listed again without a route change"
        );
        let statuses = node.broker().transmission_queue();
        assert!(
            statuses
                .iter()
                .all(|row| row.transmission_status.contains("no route")),
            "{:?}",
            statuses[0]
        );

        // Nothing listens there: the messages are handed to the transport, which keeps trying.
        create_far_route(&node, "quic://127.0.0.1:9");
        wait_until("the backlog is handed on", || {
            node.dispatched() == MESSAGES as usize
        });
        assert!(listed(&node) >= once + MESSAGES);
        node.shutdown().unwrap();
    }

    /// The status of messages handed to a dialed peer follows its connection: "waiting for a
    /// connection" while the first dial is under way, "unreachable" while it is down, "waiting
    /// for its acknowledgement" again once a new connection sends them again; and the node
    /// remembers the peer's certificate only while it is connected.
    /// The far peer is a bare transport that never acknowledges, so nothing leaves the queue.
    #[test]
    fn the_status_of_handed_over_messages_follows_their_peers_connection() {
        const MESSAGES: u64 = 30;
        let dir = tempfile::tempdir().unwrap();
        let far_identity = NodeIdentity::generate().unwrap();
        // A dial to a port nobody listens on fails when its handshake idles out.
        let options = TransportOptions {
            idle_timeout: Duration::from_secs(2),
            ..TransportOptions::default()
        };
        let node =
            node_with_backlog_trusting(dir.path(), MESSAGES, far_identity.fingerprint(), options);
        let new_runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let far_on = |runtime: &tokio::runtime::Runtime, listen: SocketAddr| {
            Transport::bind_on(
                runtime.handle(),
                TransportConfig {
                    listen,
                    identity: far_identity.clone(),
                    trust: Trust::pinned([node.fingerprint()]),
                },
            )
            .unwrap()
        };
        // A free port for the far peer, which is down at first (its socket goes with the
        // runtime that drives it).
        let far_addr = {
            let runtime = new_runtime();
            let (far, _events) = far_on(&runtime, SocketAddr::from(([127, 0, 0, 1], 0)));
            runtime.block_on(far.shutdown());
            far.local_addr().unwrap()
        };
        let all_say = |what: &str| {
            let rows = node.broker().transmission_queue();
            rows.len() == MESSAGES as usize
                && rows
                    .iter()
                    .all(|row| row.transmission_status.contains(what))
        };
        let far_certificate = || node.shared.dialed.lock().get(&far_addr).copied();
        create_far_route(&node, &format!("quic://{far_addr}"));
        // Handed on while the dial is under way (it fails when its handshake idles out).
        wait_until("the messages wait for a connection", || {
            all_say("waiting for a connection")
        });
        wait_until("the far peer is found unreachable", || {
            all_say("unreachable")
        });
        assert_eq!(far_certificate(), None);

        let runtime = new_runtime();
        let (far, _events) = far_on(&runtime, far_addr);
        // The current-thread runtime runs the far transport only inside `block_on`.
        runtime
            .block_on(async {
                let sent_again = async {
                    while !all_say("waiting for its acknowledgement") {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                };
                tokio::time::timeout(Duration::from_secs(30), sent_again).await
            })
            .expect("the messages are sent again on the new connection");
        assert_eq!(far_certificate(), Some(far_identity.fingerprint()));

        runtime.block_on(far.shutdown());
        wait_until("the far peer is unreachable again and forgotten", || {
            all_say("unreachable") && far_certificate().is_none()
        });
        node.shutdown().unwrap();
    }

    /// A route's host name that moves to another address takes the messages not acknowledged
    /// at the old one with it; an answer that still holds the address in use keeps it.
    #[test]
    fn messages_follow_a_host_name_to_its_new_address() {
        const MESSAGES: u64 = 30;
        let dir = tempfile::tempdir().unwrap();
        let node = node_with_backlog(dir.path(), MESSAGES);
        // Nothing listens at these: the transport keeps what it is given, dialing.
        let [first, second, third] = [1, 2, 3].map(|n| SocketAddr::from(([127, 0, 0, n], 9)));
        let answer = Arc::new(Mutex::new(vec![first]));
        {
            let mut passes = node.shared.passes.lock();
            let answer = answer.clone();
            passes.names.lookup = Box::new(move |host, _| match host {
                "far.test" => answer.lock().clone(),
                _ => Vec::new(),
            });
            passes.names.refresh_after = Duration::from_millis(100);
        }
        let held = |addr| {
            node.transport()
                .unacknowledged_messages(&PeerKey::Dialed(addr))
        };
        create_far_route(&node, "quic://far.test:4022");
        wait_until("the backlog goes to the first address", || {
            held(first) == MESSAGES as usize
        });

        *answer.lock() = vec![second];
        wait_until("the backlog moves to the second address", || {
            held(second) == MESSAGES as usize && held(first) == 0
        });
        assert_eq!(node.dispatched(), MESSAGES as usize);

        *answer.lock() = vec![third, second];
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(held(second), MESSAGES as usize, "still an answer: kept");
        assert_eq!(held(third), 0);
        node.shutdown().unwrap();
    }

    /// Messages whose route names a host that does not resolve are looked at again every
    /// `ROUTE_RECHECK_INTERVAL` (the name may resolve later), and go once the route is fixed.
    #[test]
    fn messages_whose_host_does_not_resolve_are_tried_again() {
        const MESSAGES: u64 = 30;
        let dir = tempfile::tempdir().unwrap();
        let node = node_with_backlog(dir.path(), MESSAGES);
        // `.invalid` never resolves (RFC 6761).
        create_far_route(&node, "quic://herald-test.invalid:4022");
        let once = listed(&node);
        wait_until("the backlog is listed twice more", || {
            listed(&node) >= once + 2 * MESSAGES
        });
        let statuses = node.broker().transmission_queue();
        assert!(
            statuses
                .iter()
                .all(|row| row.transmission_status.contains("cannot resolve")),
            "{:?}",
            statuses[0]
        );
        assert_eq!(node.dispatched(), 0);

        let mut tx = node.broker().begin();
        tx.alter_route(far_route("quic://127.0.0.1:9")).unwrap();
        tx.commit().unwrap();
        wait_until("the backlog is handed on", || {
            node.dispatched() == MESSAGES as usize
        });
        node.shutdown().unwrap();
    }
}
