//! The QUIC transport: drives one [`PeerSession`] per peer over quinn, with mutual TLS 1.3
//! ([`tls`]). This is the thin I/O half of the protocol; every decision about frames, windows,
//! acknowledgements and retransmission is `proto`'s.
//!
//! # Runtime
//!
//! A [`Transport`] runs on the tokio runtime it is bound on ([`Transport::bind`] inside a
//! runtime, or [`Transport::bind_on`] with a handle): it spawns an accept task and one task per
//! peer there. [`Transport::send`], [`Transport::acknowledge`] and [`Transport::send_error`] are
//! plain synchronous calls that never block on the network (they hand the work to the peer's
//! session under a short lock and wake its task), so an engine thread outside the runtime can
//! call them; [`Events::recv`] and [`Events::blocking_recv`] serve async and thread callers.
//!
//! # Peers and connections
//!
//! A peer session is keyed by a [`PeerKey`]:
//!
//! - [`PeerKey::Dialed`]`(address)`: the connection this node opens to an address, made on the
//!   first [`Transport::send`] (or acknowledge, or error) to it and kept open; when it is lost it
//!   is made again after [`RETRY_DELAY_INITIAL`], doubling to [`RETRY_DELAY_MAX`], for as long
//!   as its session has something to deliver. Each new connection starts with
//!   [`PeerSession::reset`], so every unacknowledged message is sent again, in order, first.
//! - [`PeerKey::Accepted`]`(fingerprint, dialer)`: connections a peer opens to this node, keyed
//!   by its certificate's fingerprint and the dialed session they belong to (a random token the
//!   dialing node keeps for as long as it dials that address, sent as the TLS server name); a
//!   new connection of the same dialed session replaces the old one (which is closed) and
//!   continues its session (pending acknowledgements are kept). A node that dials this one at
//!   two addresses (two routes naming it differently, two interfaces) has two sessions here,
//!   whose connections do not replace each other: each carries its own messages and their
//!   acknowledgements.
//!
//! A peer whose connection ended (or whose dial failed) with no message of this node
//! unacknowledged is retired: it leaves the transport, and a dialed one stops dialing; the next
//! message for it makes it anew. So peers that come and go (a node gone for good, an address
//! no route names any more, the many certificates a CA signs) do not count against
//! [`PEERS_MAX`] until a restart. Acknowledgements and errors it still owed the peer go with
//! it: they answer messages the peer holds unacknowledged, which it sends again first thing on
//! its next connection, and those duplicates are acknowledged (or refused) again then. So an
//! acknowledgement for an accepted peer retired meanwhile fails with `UnknownPeer`, and one
//! queued after the connection ended does not keep the peer either (the call retires it).
//!
//! Messages this node sends always go on its dialed connection to the address. Messages it
//! receives arrive as [`TransportEvent::Session`] with the key of the session they came on,
//! and their acknowledgements (and broker errors about them) go back on that same session:
//! pass the event's key to [`Transport::acknowledge`]. So when two nodes each dial the other
//! (a "simultaneous open"), both connections stay: each carries its own direction's messages
//! and the acknowledgements of the other's. Nothing needs to decide which one wins.
//!
//! # One connection
//!
//! The dialing side opens one bidirectional stream; each side writes its `PeerSession`'s frames
//! on its half, in batches of up to `TRANSMIT_BYTES_MAX` (one write per batch), and a reader task
//! feeds what arrives to `handle_bytes`. Reading and writing are separate tasks, so a write
//! blocked on flow control never stops the reads the peer is waiting for. Retransmission timers
//! (`poll_timeout` / `handle_timeout`) sleep on `tokio::time`. A protocol violation closes the
//! connection with [`CLOSE_PROTOCOL_VIOLATION`] and the reason.
//!
//! # Back-pressure
//!
//! Events wait for the caller up to [`EVENTS_BYTES_MAX`] (message bodies plus
//! [`EVENT_OVERHEAD_BYTES`] each); when that is reached, the reader tasks wait for the caller,
//! which stops reading from the network and lets QUIC's flow control slow the
//! peers. Acknowledgements and Connected events do not wait: they go at once, uncharged (few,
//! and not to be lost with a read dropped when its connection ends). [`Transport::send`] refuses more than `SEND_QUEUE_MESSAGES_MAX` unacknowledged
//! messages per peer with `Error::SendQueueFull`: the engine keeps them and offers them again.

pub mod tls;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use herald_engine::IdMap;
use parking_lot::Mutex;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::identity::{Fingerprint, NodeIdentity, Trust};
use crate::proto::{Event, OutgoingMessage, PeerSession, RETRY_DELAY_INITIAL, RETRY_DELAY_MAX};
pub use tls::{
    ALPN_CLIENT, ALPN_NODE, IDLE_TIMEOUT, KEEP_ALIVE_INTERVAL, client_config, server_config,
};

/// Bytes of events buffered for the caller — message bodies, plus [`EVENT_OVERHEAD_BYTES`] per
/// event — past which the transport stops reading from its peers until the caller catches up.
/// (A bound in events would not bound memory: a message may have 8 MiB.) Half a peer's
/// `IN_FLIGHT_BYTES_MAX`: the caller stores what it takes and the peers' windows reopen as it
/// acknowledges, so buffering more only holds memory. What one read yields goes as one batch;
/// a batch charged more than this whole bound (a largest message) is charged the bound.
pub const EVENTS_BYTES_MAX: usize = 8 * 1024 * 1024;

/// What each event is charged against [`EVENTS_BYTES_MAX`] beyond its message body: about its
/// own size and its allocations', so that many small events are bounded too.
pub const EVENT_OVERHEAD_BYTES: usize = 256;

/// Most chunks one read takes from a stream (`read_chunks`): the events they yield are handed
/// to the caller together, one channel operation per read instead of one per message.
pub const READ_CHUNKS_MAX: usize = 32;

/// Most peer sessions (dialed and accepted) one transport holds at once; more are refused
/// (after retiring any idle peer nobody holds).
pub const PEERS_MAX: usize = 1024;

/// Longest wait for a dialed connection's handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait, after an accepted connection's handshake, for the peer to open its stream.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Most incoming handshakes in progress at once. Anyone can start one (before any certificate
/// is seen), each costs a signature and may live [`CONNECT_TIMEOUT`], and they run on the
/// network thread every peer's traffic runs on: beyond this bound new ones are refused. From
/// half of it on, a source whose address QUIC has not validated is first sent a Retry (a
/// round trip a spoofed source cannot complete), so a flood from forged addresses cannot take
/// the slots; a real peer's dialer answers the Retry and comes in.
pub const HANDSHAKES_IN_PROGRESS_MAX: usize = 64;

/// Most incoming handshakes in progress at once from one source address (an IPv6 source's
/// /64). A source that answers the Retry has a validated address, and could otherwise keep all
/// [`HANDSHAKES_IN_PROGRESS_MAX`] slots busy with handshakes it never finishes, locking every
/// peer and client out; with this bound it takes its own few.
pub const HANDSHAKES_PER_ADDRESS_MAX: usize = 8;

/// Longest wait, once a connection's stream is open, for the peer's Hello. A peer that never
/// sends it but keeps the connection alive would otherwise hold its session — counted against
/// [`PEERS_MAX`] — for as long as it likes.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Most sessions accepted at once from one certificate. A node dialing this one at several of
/// its addresses has one each (see [`PeerKey::Accepted`]); the token telling them apart is the
/// dialer's choice, so without this bound one trusted certificate could fill [`PEERS_MAX`] and
/// lock every other peer out.
pub const ACCEPTED_SESSIONS_PER_CERTIFICATE_MAX: usize = 16;

/// Largest chunk read from a stream at once.
pub const READ_CHUNK_BYTES_MAX: usize = 256 * 1024;

/// Longest [`Transport::shutdown`] waits for the GoAway to be delivered and the connections to
/// close before it drops them.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest [`Transport::shutdown`] lets the closed endpoint linger, answering a peer's late
/// packets with the CONNECTION_CLOSE again (each close is sent at once, and the peers have had
/// their GoAway). Without this bound a dial still in its handshake (its peer down) would keep
/// the endpoint three probe timeouts of the initial RTT, about 3 s, for nobody.
pub const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_millis(500);

/// Receive and send buffer asked of the kernel for each QUIC UDP socket (Linux caps it at
/// `net.core.rmem_max` / `wmem_max` and doubles it for its bookkeeping). The default (~208 KiB,
/// some 100 full datagrams) overflows whenever the network thread is busy for a moment while a
/// peer streams: two nodes on loopback lost ~2% of their datagrams that way in the bulk bench,
/// each loss a retransmission and a halved congestion window (211–218k msg/s with losses, none
/// and 235–239k with this buffer).
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds the UDP socket of a QUIC endpoint at `addr`, with buffers of
/// [`UDP_SOCKET_BUFFER_BYTES`] (as much of it as the kernel allows: a smaller limit, or a
/// kernel that refuses the size outright as some BSDs do past their maximum, is not an error,
/// only slower under load).
pub fn bind_udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), UDP_SOCKET_BUFFER_BYTES) {
        tracing::debug!(%addr, error = %e, "UDP receive buffer size refused; kept the default");
    }
    if let Err(e) = state.set_send_buffer_size((&socket).into(), UDP_SOCKET_BUFFER_BYTES) {
        tracing::debug!(%addr, error = %e, "UDP send buffer size refused; kept the default");
    }
    tracing::debug!(
        %addr,
        receive = ?state.recv_buffer_size((&socket).into()),
        send = ?state.send_buffer_size((&socket).into()),
        "UDP socket buffers"
    );
    Ok(socket)
}

/// Tells the operator when the kernel granted a node's socket less than
/// [`UDP_SOCKET_BUFFER_BYTES`] of receive buffer (Linux grants at most `net.core.rmem_max`,
/// ~208 KiB by default): under load, datagrams are dropped and sent again, at a cost.
fn warn_if_small_receive_buffer(socket: &std::net::UdpSocket) {
    let granted = quinn::udp::UdpSocketState::new(socket.into())
        .and_then(|state| state.recv_buffer_size(socket.into()));
    if let Ok(granted) = granted
        && granted < UDP_SOCKET_BUFFER_BYTES
    {
        tracing::warn!(
            granted,
            asked = UDP_SOCKET_BUFFER_BYTES,
            "the kernel limits the UDP receive buffer (on Linux: raise net.core.rmem_max); \
             under load datagrams will be dropped and retransmitted"
        );
    }
}

/// The TLS server name a node dials with. Names are not checked (see [`tls`]), but QUIC needs one.
pub const SERVER_NAME: &str = crate::identity::CERTIFICATE_NAME;

/// Application close code: the transport is shutting down (after its GoAway).
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// Application close code: the peer broke the protocol (the reason says how).
pub const CLOSE_PROTOCOL_VIOLATION: VarInt = VarInt::from_u32(1);
/// Application close code: another connection from the same certificate replaced this one.
pub const CLOSE_REPLACED: VarInt = VarInt::from_u32(2);
/// Application close code: the connection's ALPN is not served here.
pub const CLOSE_UNKNOWN_ALPN: VarInt = VarInt::from_u32(3);
/// Application close code: the transport holds [`PEERS_MAX`] sessions.
pub const CLOSE_TOO_MANY_PEERS: VarInt = VarInt::from_u32(4);
/// Application close code: the protocol stream ended or failed, so the connection has no use.
pub const CLOSE_STREAM_ENDED: VarInt = VarInt::from_u32(5);

/// Which session a peer's traffic is on. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// The connection this node opens to an address.
    Dialed(SocketAddr),
    /// Connections a peer opens to this node, by its certificate's fingerprint and the token of
    /// the dialed session they belong to (0 when the peer sent none).
    Accepted(Fingerprint, u64),
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerKey::Dialed(addr) => write!(f, "dialed {addr}"),
            PeerKey::Accepted(fingerprint, dialer) => {
                write!(f, "accepted {fingerprint} (dialer {dialer:016x})")
            }
        }
    }
}

/// What a transport tells its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// A connection is up and the peer's Hello arrived.
    Connected {
        peer: PeerKey,
        addr: SocketAddr,
        fingerprint: Fingerprint,
        broker_instance: Uuid,
    },
    /// A protocol event of a session (never `Event::Connected`, which becomes
    /// [`TransportEvent::Connected`]): a received message (acknowledge it with this `peer`), an
    /// acknowledged one, a remote broker error, a peer going away.
    Session { peer: PeerKey, event: Event },
    /// A connection was lost or could not be made; a dialed peer is dialed again after its
    /// backoff. `reason` is for the operator (the engine's `transmission_status`).
    Disconnected { peer: PeerKey, reason: String },
    /// A peer's certificate was refused during a handshake (either side).
    Refused {
        fingerprint: Fingerprint,
        reason: String,
    },
}

/// Configuration of a [`Transport`].
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The UDP address to listen on (port 0: any free port, see [`Transport::local_addr`]).
    pub listen: SocketAddr,
    pub identity: NodeIdentity,
    pub trust: Trust,
}

/// Settings of a [`Transport`] that nodes leave at their defaults; tests change them.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// A connection with no traffic for this long is lost (the smaller of both sides' values
    /// applies). Default [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Default [`HELLO_TIMEOUT`].
    pub hello_timeout: Duration,
    /// Default [`HANDSHAKES_IN_PROGRESS_MAX`].
    pub handshakes_in_progress_max: usize,
}

impl Default for TransportOptions {
    fn default() -> TransportOptions {
        TransportOptions {
            idle_timeout: IDLE_TIMEOUT,
            hello_timeout: HELLO_TIMEOUT,
            handshakes_in_progress_max: HANDSHAKES_IN_PROGRESS_MAX,
        }
    }
}

/// Events handed over together, with what they were charged against [`EVENTS_BYTES_MAX`].
#[derive(Debug)]
struct EventBatch {
    events: Vec<TransportEvent>,
    charged: u32,
}

/// What an event is charged against [`EVENTS_BYTES_MAX`].
fn event_bytes(event: &TransportEvent) -> usize {
    // What the peer sized: a body, or a text (an Error's description, a disconnection's reason
    // quoting the peer's close) of up to a few KB, more than the overhead covers.
    let sized = match event {
        TransportEvent::Session {
            event: Event::Received(message),
            ..
        } => message.body.len(),
        TransportEvent::Session {
            event: Event::RemoteError { description, .. },
            ..
        } => description.len(),
        TransportEvent::Disconnected { reason, .. } => reason.len(),
        _ => 0,
    };
    EVENT_OVERHEAD_BYTES + sized
}

/// The transport's side of the events channel: batches go into an unbounded channel once the
/// room they are charged is taken from a semaphore of [`EVENTS_BYTES_MAX`] permits, which
/// [`Events`] gives back as it takes them.
#[derive(Debug, Clone)]
struct EventSender {
    batches: mpsc::UnboundedSender<EventBatch>,
    room: Arc<Semaphore>,
    /// Events in the channel (not yet taken into an `Events` buffer).
    queued: Arc<AtomicUsize>,
}

impl EventSender {
    fn charge(events: &[TransportEvent]) -> u32 {
        let bytes: usize = events.iter().map(event_bytes).sum();
        bytes.min(EVENTS_BYTES_MAX) as u32
    }

    /// Hands `events` over, waiting for room.
    async fn send_all(&self, events: Vec<TransportEvent>) {
        if events.is_empty() {
            return;
        }
        let charged = EventSender::charge(&events);
        // The semaphore is never closed; the permits go back when `Events` takes the batch.
        let Ok(permit) = self.room.acquire_many(charged).await else {
            return;
        };
        permit.forget();
        self.enqueue(EventBatch { events, charged });
    }

    /// Hands over what one read made of the peer's bytes. Acknowledgements and the Connected
    /// event go at once, uncharged: they are few (one per message of this node's, one per
    /// connection) and must not be lost. Were they to wait for room with the rest, a
    /// connection ending meanwhile (its writer notices first, and the read is dropped) would
    /// lose them, and the messages they acknowledge would be neither acknowledged again (the
    /// session let them go) nor sent again: stuck in the transmission queue until a restart.
    /// The rest waits for room: a received message or a broker error dropped so comes again
    /// (the peer sends the message again on its next connection; this node sends again the
    /// message the error refused, and is refused again).
    async fn pass_on(&self, events: Vec<TransportEvent>) {
        let must_not_wait = |event: &TransportEvent| {
            matches!(
                event,
                TransportEvent::Connected { .. }
                    | TransportEvent::Session {
                        event: Event::Acknowledged { .. },
                        ..
                    }
            )
        };
        if !events.iter().any(must_not_wait) {
            return self.send_all(events).await;
        }
        let (urgent, rest): (Vec<TransportEvent>, Vec<TransportEvent>) =
            events.into_iter().partition(must_not_wait);
        self.enqueue(EventBatch {
            events: urgent,
            charged: 0,
        });
        self.send_all(rest).await;
    }

    /// Hands `event` over if there is room now (best-effort: for callers that must not wait).
    fn try_send(&self, event: TransportEvent) {
        let events = vec![event];
        let charged = EventSender::charge(&events);
        if let Ok(permit) = self.room.try_acquire_many(charged) {
            permit.forget();
            self.enqueue(EventBatch { events, charged });
        }
    }

    fn enqueue(&self, batch: EventBatch) {
        let count = batch.events.len();
        self.queued.fetch_add(count, Ordering::SeqCst);
        // Fails only when the caller dropped its `Events`: then nobody is listening.
        if self.batches.send(batch).is_err() {
            self.queued.fetch_sub(count, Ordering::SeqCst);
        }
    }
}

/// A transport's events channel, empty.
fn events_channel() -> (EventSender, Events) {
    let (batches, batches_received) = mpsc::unbounded_channel();
    let sender = EventSender {
        batches,
        room: Arc::new(Semaphore::new(EVENTS_BYTES_MAX)),
        queued: Arc::new(AtomicUsize::new(0)),
    };
    let events = Events {
        batches: batches_received,
        buffered: VecDeque::new(),
        room: sender.room.clone(),
        queued: sender.queued.clone(),
    };
    (sender, events)
}

/// The receiving end of a transport's events (bounded by [`EVENTS_BYTES_MAX`]).
#[derive(Debug)]
pub struct Events {
    batches: mpsc::UnboundedReceiver<EventBatch>,
    /// The rest of the last batch taken (its room is given back already).
    buffered: VecDeque<TransportEvent>,
    room: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
}

impl Events {
    /// The next event; `None` once the transport is shut down and every event was taken.
    pub async fn recv(&mut self) -> Option<TransportEvent> {
        if self.buffered.is_empty() {
            let batch = self.batches.recv().await?;
            self.take(batch);
        }
        self.buffered.pop_front()
    }

    /// The next event, blocking the thread (not for use inside the runtime).
    pub fn blocking_recv(&mut self) -> Option<TransportEvent> {
        if self.buffered.is_empty() {
            let batch = self.batches.blocking_recv()?;
            self.take(batch);
        }
        self.buffered.pop_front()
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<TransportEvent> {
        if self.buffered.is_empty() {
            let batch = self.batches.try_recv().ok()?;
            self.take(batch);
        }
        self.buffered.pop_front()
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.buffered.len() + self.queued.load(Ordering::SeqCst)
    }

    /// Whether no event is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged for the events in the channel, and for the room a reader waiting for
    /// more holds already (at most [`EVENTS_BYTES_MAX`] in all); events taken into this side's
    /// buffer of one batch no longer count.
    pub fn charged_bytes(&self) -> usize {
        EVENTS_BYTES_MAX - self.room.available_permits()
    }

    fn take(&mut self, batch: EventBatch) {
        self.queued.fetch_sub(batch.events.len(), Ordering::SeqCst);
        self.room.add_permits(batch.charged as usize);
        self.buffered.extend(batch.events);
    }
}

/// A node's QUIC endpoint: listens for peers and dials them. See the module documentation.
#[derive(Debug)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl Transport {
    /// Binds the endpoint and starts accepting peers on the current tokio runtime (call from
    /// within one).
    pub fn bind(config: TransportConfig) -> Result<(Transport, Events)> {
        let runtime = Handle::try_current().map_err(|e| Error::Tls {
            context: "binding the QUIC transport (no tokio runtime)",
            reason: e.to_string(),
        })?;
        Transport::bind_on(&runtime, config)
    }

    /// Binds the endpoint and starts accepting peers on the runtime of `runtime`; callable from
    /// any thread.
    pub fn bind_on(runtime: &Handle, config: TransportConfig) -> Result<(Transport, Events)> {
        Transport::bind_on_with(runtime, config, TransportOptions::default())
    }

    /// [`Transport::bind_on`] with options other than the defaults.
    pub fn bind_on_with(
        runtime: &Handle,
        config: TransportConfig,
        options: TransportOptions,
    ) -> Result<(Transport, Events)> {
        let _entered = runtime.enter();
        let (event_sender, events) = events_channel();
        let refusals = event_sender.clone();
        let on_refused: tls::OnRefused = Arc::new(move |fingerprint, reason| {
            // Best-effort: the refusal is logged either way, and a full channel must not stall
            // a handshake.
            refusals.try_send(TransportEvent::Refused {
                fingerprint,
                reason,
            });
        });
        let server_config = tls::server_config_with(
            &config.identity,
            &config.trust,
            options.idle_timeout,
            on_refused.clone(),
        )?;
        let client_config = tls::client_config_with(
            &config.identity,
            &config.trust,
            options.idle_timeout,
            on_refused,
        )?;
        let bind_error =
            |e: &std::io::Error| Error::io(format!("binding UDP {}", config.listen), e);
        let socket = bind_udp_socket(config.listen).map_err(|e| bind_error(&e))?;
        warn_if_small_receive_buffer(&socket);
        let endpoint = quinn::Endpoint::new(
            tls::endpoint_config(&config.identity),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| bind_error(&e))?;
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            runtime: runtime.clone(),
            endpoint,
            client_config,
            broker_instance: *config.identity.broker_instance().as_bytes(),
            identity: config.identity,
            peers: Mutex::new(IdMap::default()),
            events: event_sender,
            shutdown,
            shut_down: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            trust: config.trust,
            idle_timeout: options.idle_timeout,
            hello_timeout: options.hello_timeout,
            handshakes: Arc::new(Semaphore::new(options.handshakes_in_progress_max)),
            handshakes_max: options.handshakes_in_progress_max,
            handshakes_by_source: Arc::default(),
            clients: Mutex::new(None),
        });
        let accept = runtime.spawn(accept_loop(shared.clone()));
        shared.tasks.lock().push(accept);
        tracing::info!(
            addr = ?shared.endpoint.local_addr().ok(),
            fingerprint = %shared.identity.fingerprint(),
            "QUIC transport listening"
        );
        Ok((Transport { shared }, events))
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.shared
            .endpoint
            .local_addr()
            .map_err(|e| Error::io("reading the endpoint's address", &e))
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.shared.identity
    }

    /// Queues a message for the node at `peer`, dialing it if there is no connection yet. The
    /// message stays queued (and is sent again after each reconnection) until the peer
    /// acknowledges it ([`Event::Acknowledged`]). Fails as `PeerSession::send` does, or if the
    /// transport is shut down.
    pub fn send(&self, peer: SocketAddr, message: OutgoingMessage) -> Result<()> {
        self.shared
            .with_session(PeerKey::Dialed(peer), |session| session.send(message))
    }

    /// [`Transport::send`] of several messages to one peer, in order, under one lock and with
    /// one wake-up: the result of each, in the same order.
    pub fn send_all(&self, peer: SocketAddr, messages: Vec<OutgoingMessage>) -> Vec<Result<()>> {
        let count = messages.len();
        let sent = self.shared.with_session(PeerKey::Dialed(peer), |session| {
            let mut full = None;
            Ok(messages
                .into_iter()
                .map(|message| {
                    // Once the queue is full, the rest cannot go either: not even encoded.
                    if let Some(e) = &full {
                        return Err(Clone::clone(e));
                    }
                    let result = session.send(message);
                    if let Err(e @ Error::SendQueueFull { .. }) = &result {
                        full = Some(e.clone());
                    }
                    result
                })
                .collect::<Vec<_>>())
        });
        match sent {
            Ok(results) => results,
            Err(e) => (0..count).map(|_| Err(e.clone())).collect(),
        }
    }

    /// Takes back messages queued for `peer` that the engine dropped unacknowledged (see
    /// `PeerSession::withdraw`): they stop being sent. Returns how many were still queued.
    pub fn withdraw(&self, peer: SocketAddr, ids: &[u64]) -> usize {
        let peer = self
            .shared
            .peers
            .lock()
            .get(&PeerKey::Dialed(peer))
            .cloned();
        peer.map_or(0, |peer| peer.session.lock().withdraw(ids))
    }

    /// Acknowledges, on the session `peer` they arrived on, every message of a conversation
    /// direction up to `sequence` (call once they are durable; see `PeerSession::acknowledge`).
    pub fn acknowledge(
        &self,
        peer: &PeerKey,
        conversation_id: [u8; 16],
        from_initiator: bool,
        sequence: u64,
    ) -> Result<()> {
        self.shared.with_session(*peer, |session| {
            session.acknowledge(conversation_id, from_initiator, sequence);
            Ok(())
        })
    }

    /// Queues a broker-generated error about a conversation on the session `peer`.
    pub fn send_error(
        &self,
        peer: &PeerKey,
        conversation_id: [u8; 16],
        from_initiator: bool,
        code: i32,
        description: impl Into<String>,
    ) -> Result<()> {
        let description = description.into();
        self.shared.with_session(*peer, |session| {
            session.send_error(conversation_id, from_initiator, code, description)
        })
    }

    /// Serves the client protocol ([`ALPN_CLIENT`]) on this endpoint from now on, with
    /// `service`: clients are trusted by the node's trust and, for clients only, by
    /// `admin_client` (the node's local admin certificate), which may not connect as a node.
    pub(crate) fn serve_clients(
        &self,
        admin_client: Fingerprint,
        service: Arc<crate::client::server::ClientService>,
    ) -> Result<()> {
        let shared = &self.shared;
        let events = shared.events.clone();
        let on_refused: tls::OnRefused = Arc::new(move |fingerprint, reason| {
            events.try_send(TransportEvent::Refused {
                fingerprint,
                reason,
            });
        });
        let trust = shared.trust.clone().pin(admin_client);
        let config = tls::server_config_for(
            &shared.identity,
            &trust,
            &[ALPN_NODE, ALPN_CLIENT],
            shared.idle_timeout,
            on_refused,
        )?;
        *shared.clients.lock() = Some(ClientService {
            service,
            admin_client,
        });
        shared.endpoint.set_server_config(Some(config));
        Ok(())
    }

    /// Incoming handshakes in progress now (at most [`HANDSHAKES_IN_PROGRESS_MAX`]).
    pub fn handshakes_in_progress(&self) -> usize {
        self.shared.handshakes_max - self.shared.handshakes.available_permits()
    }

    /// Every peer session: its key, the address of the connection driving it now (`None`: not
    /// connected), and its unacknowledged messages.
    pub fn peers(&self) -> Vec<(PeerKey, Option<SocketAddr>, usize)> {
        let peers: Vec<Arc<Peer>> = self.shared.peers.lock().values().cloned().collect();
        peers
            .iter()
            .map(|peer| {
                let remote = peer
                    .connection
                    .lock()
                    .as_ref()
                    .map(|connection| connection.remote_address());
                (
                    peer.key,
                    remote,
                    peer.session.lock().unacknowledged_messages(),
                )
            })
            .collect()
    }

    /// Whether a connection to `peer` is up now.
    pub fn is_connected(&self, peer: &PeerKey) -> bool {
        let peer = self.shared.peers.lock().get(peer).cloned();
        peer.is_some_and(|peer| peer.connection.lock().is_some())
    }

    /// Messages queued for `peer` and not yet acknowledged (0 for a peer never sent to).
    pub fn unacknowledged_messages(&self, peer: &PeerKey) -> usize {
        self.shared
            .peers
            .lock()
            .get(peer)
            .map_or(0, |p| p.session.lock().unacknowledged_messages())
    }

    /// Shuts down cleanly: each connection sends its GoAway and what else it has queued
    /// (acknowledgements), waits for the peer to have it, and closes with [`CLOSE_SHUTDOWN`];
    /// then the endpoint waits to be idle, at most [`SHUTDOWN_DRAIN_MAX`]. Bounded by
    /// [`SHUTDOWN_TIMEOUT`] overall; whatever is still running then is dropped. Unacknowledged
    /// messages are not waited for (they stay the engine's, in its transmission queue).
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        if shared.shut_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = shared.shutdown.send(true);
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *shared.tasks.lock());
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        shared.endpoint.close(CLOSE_SHUTDOWN, b"node shutting down");
        let drained_by = deadline.min(Instant::now() + SHUTDOWN_DRAIN_MAX);
        let _ = tokio::time::timeout_at(drained_by, shared.endpoint.wait_idle()).await;
        tracing::info!("QUIC transport shut down");
    }
}

impl Drop for Transport {
    /// Without [`Transport::shutdown`]: stops every task and closes the endpoint at once.
    fn drop(&mut self) {
        self.shared.shut_down.store(true, Ordering::SeqCst);
        let _ = self.shared.shutdown.send(true);
        for task in self.shared.tasks.lock().drain(..) {
            task.abort();
        }
        self.shared
            .endpoint
            .close(CLOSE_SHUTDOWN, b"node shutting down");
    }
}

/// What the transport's tasks share.
struct Shared {
    runtime: Handle,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    identity: NodeIdentity,
    broker_instance: [u8; 16],
    peers: Mutex<IdMap<PeerKey, Arc<Peer>>>,
    events: EventSender,
    /// Becomes true when the transport shuts down; every task watches it.
    shutdown: watch::Sender<bool>,
    /// The peers trusted (for `serve_clients` to extend).
    trust: Trust,
    /// How long a silent connection lives (for `serve_clients`' configuration too).
    idle_timeout: Duration,
    /// How long a connection may go without the peer's Hello.
    hello_timeout: Duration,
    /// Incoming handshakes in progress (see [`HANDSHAKES_IN_PROGRESS_MAX`]).
    handshakes: Arc<Semaphore>,
    handshakes_max: usize,
    /// Handshakes in progress by source (see [`HANDSHAKES_PER_ADDRESS_MAX`]).
    handshakes_by_source: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    /// The client protocol's service, once `serve_clients` installed it.
    clients: Mutex<Option<ClientService>>,
    shut_down: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("identity", &self.identity)
            .field("peers", &self.peers.lock().len())
            .finish_non_exhaustive()
    }
}

/// What serves client connections.
#[derive(Clone)]
struct ClientService {
    service: Arc<crate::client::server::ClientService>,
    /// Trusted for client connections only.
    admin_client: Fingerprint,
}

/// One peer session and what drives it.
struct Peer {
    key: PeerKey,
    session: Mutex<PeerSession>,
    /// Set (under the session's lock, with the peer taken out of `Shared::peers`) when the
    /// peer is retired: its connection ended and its session had nothing left. Whoever finds
    /// it set under the session's lock uses a new peer instead.
    retired: AtomicBool,
    /// Wakes the writer: new work was queued, or input arrived that may need an answer.
    wake: Notify,
    /// Held by the task driving the session over a connection, for as long as it does: one
    /// connection at a time drives a session.
    driver: tokio::sync::Mutex<()>,
    /// The connection driving the session now, to close it when another replaces it.
    connection: Mutex<Option<quinn::Connection>>,
}

impl Shared {
    /// Runs `f` on the session of `key` and wakes its writer; a dialed session is made (and its
    /// dial task started) on first use.
    fn with_session<T>(
        self: &Arc<Self>,
        key: PeerKey,
        f: impl FnOnce(&mut PeerSession) -> Result<T>,
    ) -> Result<T> {
        if self.shut_down.load(Ordering::SeqCst) {
            return Err(Error::ShutDown);
        }
        loop {
            let peer = match key {
                PeerKey::Dialed(addr) => self.peer_or_insert(key, |shared, peer| {
                    let task = shared.runtime.spawn(dial_loop(shared.clone(), peer, addr));
                    shared.track(task);
                })?,
                PeerKey::Accepted(..) => {
                    self.peers
                        .lock()
                        .get(&key)
                        .cloned()
                        .ok_or_else(|| Error::UnknownPeer {
                            peer: key.to_string(),
                        })?
                }
            };
            let mut session = peer.session.lock();
            // Retired since it was looked up: a dialed peer is made anew (the map no longer
            // has this one); an accepted one is gone until the peer connects again.
            if peer.retired.load(Ordering::SeqCst) {
                match key {
                    PeerKey::Dialed(_) => continue,
                    PeerKey::Accepted(..) => {
                        return Err(Error::UnknownPeer {
                            peer: key.to_string(),
                        });
                    }
                }
            }
            let result = f(&mut session);
            drop(session);
            peer.wake.notify_one();
            // An acknowledgement after the connection ended: its end may have found the peer
            // held by this call, so it is retired here (the map and this call hold it; the task
            // of a new connection would too).
            if matches!(key, PeerKey::Accepted(..)) && peer.connection.lock().is_none() {
                self.retire_if_idle(&peer, 2);
            }
            return result;
        }
    }

    /// The peer of `key`, made (and `start`ed) if there is none yet.
    fn peer_or_insert(
        self: &Arc<Self>,
        key: PeerKey,
        start: impl FnOnce(&Arc<Shared>, Arc<Peer>),
    ) -> Result<Arc<Peer>> {
        let mut peers = self.peers.lock();
        if let Some(peer) = peers.get(&key) {
            return Ok(peer.clone());
        }
        if peers.len() >= PEERS_MAX {
            // Peers nobody holds (no connection, no task) with nothing unacknowledged are what
            // the end of a connection could not retire (someone held the peer just then).
            peers.retain(|_, peer| Arc::strong_count(peer) > 1 || !Self::retire_locked(peer));
        }
        if peers.len() >= PEERS_MAX {
            return Err(Error::TooManyPeers { max: PEERS_MAX });
        }
        if let PeerKey::Accepted(certificate, _) = key {
            // Its idle sessions nobody holds first (as at PEERS_MAX): a node reconnecting
            // under a new token must not be refused for sessions that only could not be
            // retired when their connections ended.
            peers.retain(|other, peer| {
                !matches!(other, PeerKey::Accepted(c, _) if *c == certificate)
                    || Arc::strong_count(peer) > 1
                    || !Self::retire_locked(peer)
            });
            let sessions = peers
                .keys()
                .filter(|other| matches!(other, PeerKey::Accepted(c, _) if *c == certificate))
                .count();
            if sessions >= ACCEPTED_SESSIONS_PER_CERTIFICATE_MAX {
                return Err(Error::TooManySessionsOfPeer {
                    fingerprint: certificate.to_string(),
                    max: ACCEPTED_SESSIONS_PER_CERTIFICATE_MAX,
                });
            }
        }
        let peer = Arc::new(Peer {
            key,
            session: Mutex::new(PeerSession::new(self.broker_instance)),
            retired: AtomicBool::new(false),
            wake: Notify::new(),
            driver: tokio::sync::Mutex::new(()),
            connection: Mutex::new(None),
        });
        peers.insert(key, peer.clone());
        drop(peers);
        start(self, peer.clone());
        Ok(peer)
    }

    /// Retires `peer` if its session holds no unacknowledged message and nobody but its
    /// `holders` (the peers map and the caller's task) holds it: it leaves the peers map, so
    /// that peers that come and go (addresses routes no longer name, certificates of a CA) do
    /// not fill `PEERS_MAX` for good. A later message for it makes a new one.
    fn retire_if_idle(&self, peer: &Arc<Peer>, holders: usize) -> bool {
        let mut peers = self.peers.lock();
        if Arc::strong_count(peer) > holders
            || !peers.get(&peer.key).is_some_and(|p| Arc::ptr_eq(p, peer))
            || !Self::retire_locked(peer)
        {
            return false;
        }
        peers.remove(&peer.key);
        tracing::debug!(peer = %peer.key, "retired an idle peer");
        true
    }

    /// Marks `peer` retired if its session holds no unacknowledged message (the caller holds
    /// the peers map's lock and takes the peer out of it). What else the session holds is owed
    /// to the peer and rebuilt when it connects again (see the module documentation).
    fn retire_locked(peer: &Peer) -> bool {
        let session = peer.session.lock();
        if session.unacknowledged_messages() > 0 {
            return false;
        }
        peer.retired.store(true, Ordering::SeqCst);
        true
    }

    /// Keeps `task` for shutdown to wait on, dropping the handles of tasks already finished
    /// (peers retired and made anew, connections ended), which would otherwise pile up.
    fn track(&self, task: JoinHandle<()>) {
        let mut tasks = self.tasks.lock();
        tasks.retain(|task| !task.is_finished());
        tasks.push(task);
    }

    async fn emit(&self, event: TransportEvent) {
        self.events.send_all(vec![event]).await;
    }

    fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Dials `addr` and drives the session over each connection, reconnecting with backoff.
async fn dial_loop(shared: Arc<Shared>, peer: Arc<Peer>, addr: SocketAddr) {
    let mut shutdown = shared.shutdown.subscribe();
    // Every connection of this session names it, so that the peer keeps one session for it
    // (and another for a session dialing it at another address).
    let server_name = tls::dialer_server_name(Uuid::new_v4().as_u64_pair().0);
    let mut delay = RETRY_DELAY_INITIAL;
    while !shared.is_shutting_down() {
        let attempt = tokio::select! {
            attempt = dial(&shared, addr, &server_name) => attempt,
            _ = until_shut_down(&mut shutdown) => break,
        };
        let reason = match attempt {
            Ok((connection, send, recv, fingerprint)) => {
                let guard = peer.driver.lock().await;
                let outcome = drive(&shared, &peer, connection, send, recv, fingerprint).await;
                drop(guard);
                if outcome.connected {
                    delay = RETRY_DELAY_INITIAL;
                }
                outcome.reason
            }
            Err(reason) => reason,
        };
        if shared.is_shutting_down() {
            break;
        }
        tracing::debug!(%addr, %reason, retry_in = ?delay, "peer not connected");
        shared
            .emit(TransportEvent::Disconnected {
                peer: peer.key,
                reason,
            })
            .await;
        // Nothing to deliver: stop dialing (the map and this task hold the peer). The next
        // message for this address dials again.
        if shared.retire_if_idle(&peer, 2) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = until_shut_down(&mut shutdown) => break,
        }
        delay = (delay * 2).min(RETRY_DELAY_MAX);
    }
}

/// One connection attempt: handshake, the peer's fingerprint, the stream.
async fn dial(
    shared: &Shared,
    addr: SocketAddr,
    server_name: &str,
) -> std::result::Result<(quinn::Connection, SendStream, RecvStream, Fingerprint), String> {
    let connecting = shared
        .endpoint
        .connect_with(shared.client_config.clone(), addr, server_name)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => return Err(format!("connecting to {addr}: {e}")),
        Err(_) => {
            return Err(format!(
                "connecting to {addr}: no handshake within {CONNECT_TIMEOUT:?}"
            ));
        }
    };
    let fingerprint = tls::peer_fingerprint(&connection)
        .ok_or_else(|| format!("connecting to {addr}: the peer presented no certificate"))?;
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| format!("opening the stream to {addr}: {e}"))?;
    Ok((connection, send, recv, fingerprint))
}

/// Accepts connections and dispatches them on their ALPN.
async fn accept_loop(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            incoming = shared.endpoint.accept() => incoming,
            _ = until_shut_down(&mut shutdown) => break,
        };
        let Some(incoming) = incoming else { break };
        let in_progress = shared.handshakes_max - shared.handshakes.available_permits();
        match admit(
            in_progress,
            shared.handshakes_max,
            incoming.remote_address_validated(),
            incoming.may_retry(),
        ) {
            Admission::Accept => {
                let Some(slot) = HandshakeSlot::take(&shared, incoming.remote_address()) else {
                    tracing::debug!(addr = %incoming.remote_address(), "refusing a handshake: too many in progress from its source or in all");
                    incoming.refuse();
                    continue;
                };
                let task = shared
                    .runtime
                    .spawn(accept_one(shared.clone(), incoming, slot));
                shared.track(task);
            }
            Admission::Retry => {
                // Fails only if the address was validated after all (it is dropped then, and
                // its peer tries again).
                let _ = incoming.retry();
            }
            Admission::Refuse => {
                tracing::debug!(addr = %incoming.remote_address(), "refusing a handshake: too many in progress");
                incoming.refuse();
            }
        }
    }
}

/// One incoming handshake's share of the bounds: a slot of [`HANDSHAKES_IN_PROGRESS_MAX`] and
/// one of its source's [`HANDSHAKES_PER_ADDRESS_MAX`], both given back when dropped.
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    source: std::net::IpAddr,
    by_source: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl HandshakeSlot {
    fn take(shared: &Shared, addr: SocketAddr) -> Option<HandshakeSlot> {
        let source = handshake_source(addr.ip());
        let mut by_source = shared.handshakes_by_source.lock();
        let count = by_source.entry(source).or_default();
        if *count >= HANDSHAKES_PER_ADDRESS_MAX {
            return None;
        }
        let permit = shared.handshakes.clone().try_acquire_owned().ok()?;
        *count += 1;
        Some(HandshakeSlot {
            _permit: permit,
            source,
            by_source: shared.handshakes_by_source.clone(),
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut by_source = self.by_source.lock();
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// The source a handshake counts against: the address, or an IPv6 address's /64 (one host
/// commonly has a whole one).
fn handshake_source(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        other => other,
    }
}

/// What becomes of an incoming connection attempt (see [`HANDSHAKES_IN_PROGRESS_MAX`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Accept,
    /// Validate the source address first.
    Retry,
    Refuse,
}

fn admit(in_progress: usize, max: usize, address_validated: bool, may_retry: bool) -> Admission {
    if in_progress >= max {
        Admission::Refuse
    } else if in_progress >= max / 2 && !address_validated && may_retry {
        Admission::Retry
    } else {
        Admission::Accept
    }
}

/// Completes an incoming connection's handshake (holding one of the handshake slots until
/// then) and serves it by its ALPN.
async fn accept_one(shared: Arc<Shared>, incoming: quinn::Incoming, handshake_slot: HandshakeSlot) {
    let addr = incoming.remote_address();
    let mut shutdown = shared.shutdown.subscribe();
    // A handshake that never completes is not waited for at shutdown.
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(CONNECT_TIMEOUT, incoming) => handshake,
        _ = until_shut_down(&mut shutdown) => return,
    };
    drop(handshake_slot);
    let connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "incoming handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "incoming handshake timed out");
            return;
        }
    };
    match tls::negotiated_alpn(&connection).as_deref() {
        Some(ALPN_NODE) => accept_node(shared, connection).await,
        Some(ALPN_CLIENT) => {
            let clients = shared.clients.lock().clone();
            match clients {
                Some(clients) => {
                    clients
                        .service
                        .accept(connection, shared.hello_timeout)
                        .await
                }
                None => connection.close(CLOSE_UNKNOWN_ALPN, b"client protocol not served"),
            }
        }
        other => {
            tracing::warn!(%addr, alpn = ?other, "closing a connection with an unknown ALPN");
            connection.close(CLOSE_UNKNOWN_ALPN, b"unknown ALPN");
        }
    }
}

/// A node connected to us: find or make its session by fingerprint and dialed session, replace
/// the connection that session had, and drive the session over this one.
async fn accept_node(shared: Arc<Shared>, connection: quinn::Connection) {
    let addr = connection.remote_address();
    let Some(fingerprint) = tls::peer_fingerprint(&connection) else {
        connection.close(CLOSE_PROTOCOL_VIOLATION, b"no client certificate");
        return;
    };
    let client_only =
        shared.clients.lock().as_ref().is_some_and(|c| {
            c.admin_client == fingerprint && !shared.trust.is_pinned(&fingerprint)
        });
    if client_only {
        tracing::warn!(%addr, %fingerprint, "refusing the admin client certificate as a node");
        connection.close(
            CLOSE_PROTOCOL_VIOLATION,
            b"a client certificate is not a node's",
        );
        return;
    }
    let key = PeerKey::Accepted(fingerprint, tls::dialer_token(&connection));
    let peer = match shared.peer_or_insert(key, |_, _| {}) {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!(%addr, %fingerprint, error = %e, "refusing a connection");
            connection.close(CLOSE_TOO_MANY_PEERS, e.to_string().as_bytes());
            return;
        }
    };
    if let Some(old) = peer.connection.lock().take() {
        old.close(CLOSE_REPLACED, b"replaced by a new connection");
    }
    let mut shutdown = shared.shutdown.subscribe();
    let streams = tokio::select! {
        streams = tokio::time::timeout(STREAM_OPEN_TIMEOUT, connection.accept_bi()) => streams,
        _ = until_shut_down(&mut shutdown) => return,
    };
    let (send, recv) = match streams {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "connection closed before its stream opened");
            shared.retire_if_idle(&peer, 2);
            return;
        }
        Err(_) => {
            connection.close(CLOSE_PROTOCOL_VIOLATION, b"no stream opened");
            shared.retire_if_idle(&peer, 2);
            return;
        }
    };
    let guard = peer.driver.lock().await;
    let outcome = drive(&shared, &peer, connection, send, recv, fingerprint).await;
    drop(guard);
    if !shared.is_shutting_down() {
        shared
            .emit(TransportEvent::Disconnected {
                peer: key,
                reason: outcome.reason,
            })
            .await;
        // Unless a new connection of the same peer holds it too (it replaced this one).
        shared.retire_if_idle(&peer, 2);
    }
}

/// How a connection ended.
struct Outcome {
    /// The peer's Hello arrived: the connection worked (the dial backoff starts again).
    connected: bool,
    reason: String,
}

/// Drives `peer`'s session over one connection until it ends.
async fn drive(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    connection: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    fingerprint: Fingerprint,
) -> Outcome {
    peer.session.lock().reset();
    *peer.connection.lock() = Some(connection.clone());
    let connected = AtomicBool::new(false);
    let ended = tokio::select! {
        ended = read_loop(shared, peer, &connection, recv, fingerprint, &connected) => ended,
        ended = write_loop(shared, peer, send) => ended,
        reason = hello_deadline(shared.hello_timeout, &connected) => Ended::Violation(reason),
    };
    let reason = match ended {
        Ended::Violation(reason) => {
            tracing::warn!(peer = %peer.key, %fingerprint, %reason, "protocol violation: closing");
            connection.close(CLOSE_PROTOCOL_VIOLATION, reason.as_bytes());
            format!("protocol violation: {reason}")
        }
        Ended::Lost(reason) => {
            // The stream's error says only "connection lost"; the connection's says why (timed
            // out, reset by peer, closed by the peer with a code…).
            let reason = match connection.close_reason() {
                Some(why) => format!("{reason}: {why}"),
                None => reason,
            };
            connection.close(CLOSE_STREAM_ENDED, b"stream ended");
            reason
        }
        Ended::ShutDown => {
            connection.close(CLOSE_SHUTDOWN, b"node shutting down");
            "shut down".to_owned()
        }
    };
    {
        let mut current = peer.connection.lock();
        if current
            .as_ref()
            .is_some_and(|c| c.stable_id() == connection.stable_id())
        {
            *current = None;
        }
    }
    peer.session.lock().reset();
    Outcome {
        connected: connected.load(Ordering::SeqCst),
        reason,
    }
}

/// Completes, with the reason to close, if `greeted` is not set within `timeout` (the peer's
/// or client's Hello has not come); never completes once it is. Raced against a connection's
/// reading and writing.
pub(crate) async fn hello_deadline(timeout: Duration, greeted: &AtomicBool) -> String {
    tokio::time::sleep(timeout).await;
    if greeted.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    format!("no Hello within {timeout:?}")
}

enum Ended {
    /// The peer broke the protocol.
    Violation(String),
    /// The connection or stream is gone.
    Lost(String),
    /// This transport shut down (its GoAway was sent).
    ShutDown,
}

/// Feeds the peer's bytes to the session and passes its events on.
async fn read_loop(
    shared: &Arc<Shared>,
    peer: &Arc<Peer>,
    connection: &quinn::Connection,
    mut recv: RecvStream,
    fingerprint: Fingerprint,
    connected: &AtomicBool,
) -> Ended {
    let mut chunks = vec![Bytes::new(); READ_CHUNKS_MAX];
    let mut events = Vec::new();
    loop {
        let read = match recv.read_chunks(&mut chunks).await {
            Ok(Some(read)) => read,
            Ok(None) => return Ended::Lost("the peer ended its stream".into()),
            Err(e) => return Ended::Lost(format!("reading: {e}")),
        };
        let (handled, wake_writer) = {
            let mut session = peer.session.lock();
            let now = Instant::now().into_std();
            let handled = chunks[..read]
                .iter_mut()
                .try_for_each(|chunk| session.handle_bytes(now, &std::mem::take(chunk)));
            let mut wake_writer = session.has_control_frames();
            while let Some(event) = session.poll_event() {
                wake_writer |= !matches!(event, Event::Received(_));
                events.push(event);
            }
            (handled, wake_writer)
        };
        // Input may need an answer (the Hello), and acknowledgements open the window; messages
        // alone need none (each wake-up of the writer per chunk read cost a task poll, two
        // session locks and a timer reset on the receiving node, for nothing).
        if wake_writer {
            peer.wake.notify_one();
        }
        let batch: Vec<TransportEvent> = events
            .drain(..)
            .map(|event| match event {
                Event::Connected {
                    peer_broker_instance,
                } => {
                    connected.store(true, Ordering::SeqCst);
                    let broker_instance = Uuid::from_bytes(peer_broker_instance);
                    tracing::info!(peer = %peer.key, %fingerprint, %broker_instance, "peer connected");
                    TransportEvent::Connected {
                        peer: peer.key,
                        addr: connection.remote_address(),
                        fingerprint,
                        broker_instance,
                    }
                }
                event => TransportEvent::Session {
                    peer: peer.key,
                    event,
                },
            })
            .collect();
        shared.events.pass_on(batch).await;
        if let Err(e) = handled {
            return Ended::Violation(e.to_string());
        }
    }
}

/// Writes what the session has to send, sleeps until its next timer or a wake-up; on shutdown
/// sends the GoAway and ends the stream.
async fn write_loop(shared: &Arc<Shared>, peer: &Arc<Peer>, mut send: SendStream) -> Ended {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        loop {
            let batch = peer.session.lock().poll_transmit(Instant::now().into_std());
            let Some(batch) = batch else { break };
            // Handed over, not copied: quinn keeps the buffer until the peer has it.
            if let Err(e) = send.write_chunk(Bytes::from(batch)).await {
                return Ended::Lost(format!("writing: {e}"));
            }
        }
        let timeout = peer.session.lock().poll_timeout();
        tokio::select! {
            _ = peer.wake.notified() => {}
            _ = sleep_until(timeout) => {
                peer.session.lock().handle_timeout(Instant::now().into_std());
            }
            _ = until_shut_down(&mut shutdown) => {
                return go_away(peer, send).await;
            }
        }
    }
}

/// Sends the GoAway (and the queued acknowledgements before it), ends the stream and waits,
/// within [`SHUTDOWN_TIMEOUT`], for the peer to have it all.
async fn go_away(peer: &Arc<Peer>, mut send: SendStream) -> Ended {
    let flushed = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
        peer.session.lock().close();
        loop {
            let batch = peer.session.lock().poll_transmit(Instant::now().into_std());
            let Some(batch) = batch else { break };
            send.write_chunk(Bytes::from(batch))
                .await
                .map_err(|e| e.to_string())?;
        }
        send.finish().map_err(|e| e.to_string())?;
        send.stopped().await.map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    })
    .await;
    if let Ok(Err(e)) | Err(e) = flushed.map_err(|_| "timed out".to_owned()) {
        tracing::debug!(peer = %peer.key, error = %e, "GoAway not delivered");
    }
    Ended::ShutDown
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Resolves once the transport shuts down (or its `Shared` is gone).
async fn until_shut_down(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await: drop it here.
    let _ = shutdown.wait_for(|down| *down).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_charged_the_texts_peers_size() {
        let peer = PeerKey::Dialed("127.0.0.1:1".parse().unwrap());
        let reason = "r".repeat(3000);
        assert_eq!(
            event_bytes(&TransportEvent::Disconnected { peer, reason }),
            EVENT_OVERHEAD_BYTES + 3000
        );
        let error = Event::RemoteError {
            conversation_id: [0; 16],
            from_initiator: true,
            code: -1,
            description: "d".repeat(2000),
        };
        assert_eq!(
            event_bytes(&TransportEvent::Session { peer, event: error }),
            EVENT_OVERHEAD_BYTES + 2000
        );
    }

    #[test]
    fn handshakes_are_admitted_then_validated_first_then_refused() {
        let max = HANDSHAKES_IN_PROGRESS_MAX;
        assert_eq!(admit(0, max, false, true), Admission::Accept);
        assert_eq!(admit(max / 2 - 1, max, false, true), Admission::Accept);
        assert_eq!(admit(max / 2, max, false, true), Admission::Retry);
        assert_eq!(
            admit(max / 2, max, true, true),
            Admission::Accept,
            "validated"
        );
        assert_eq!(
            admit(max / 2, max, false, false),
            Admission::Accept,
            "a Retry once is all QUIC allows"
        );
        assert_eq!(admit(max - 1, max, true, true), Admission::Accept);
        assert_eq!(admit(max, max, true, true), Admission::Refuse);
    }

    /// A read waiting for room in the events channel when its connection ends is dropped: the
    /// acknowledgements it made of the peer's bytes must have gone over already (the session
    /// let their messages go), the messages and broker errors not (they come again).
    #[test]
    fn a_reads_acknowledgements_do_not_wait_for_room() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (sender, mut events) = events_channel();
        let peer = PeerKey::Dialed(SocketAddr::from(([127, 0, 0, 1], 1)));
        let received = |bytes: usize| TransportEvent::Session {
            peer,
            event: Event::Received(crate::proto::IncomingMessage {
                header: crate::proto::MessageHeader {
                    conversation_id: [1; 16],
                    from_initiator: true,
                    sequence: 0,
                    source_service: "//a".into(),
                    target_service: "//b".into(),
                    contract: "//c".into(),
                    message_type: "//m".into(),
                    target_broker_instance: None,
                    lifetime_deadline_secs: 0,
                },
                body: vec![0; bytes],
                source_broker_instance: [2; 16],
            }),
        };
        let acknowledged = TransportEvent::Session {
            peer,
            event: Event::Acknowledged {
                id: 7,
                far_broker_instance: [2; 16],
            },
        };
        runtime.block_on(async {
            // The channel is full: the next read's messages wait, and the connection ends.
            sender.send_all(vec![received(EVENTS_BYTES_MAX)]).await;
            let error = TransportEvent::Session {
                peer,
                event: Event::RemoteError {
                    conversation_id: [1; 16],
                    from_initiator: true,
                    code: -8490,
                    description: "refused".into(),
                },
            };
            let read = vec![received(1024), acknowledged.clone(), error, received(1024)];
            let ended = tokio::time::timeout(Duration::from_millis(50), sender.pass_on(read));
            assert!(ended.await.is_err(), "the messages wait for room");
        });
        let taken: Vec<TransportEvent> = std::iter::from_fn(|| events.try_recv()).collect();
        // Not the broker error: one lost is answered again when its message is sent again.
        assert_eq!(taken.len(), 2, "the first message and the acknowledgement");
        assert_eq!(taken[1], acknowledged);
    }

    /// The handles of finished tasks (peers retired and made anew, connections ended) leave
    /// the list shutdown waits on when the next task is tracked.
    #[test]
    fn finished_tasks_are_not_kept() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (transport, _events) = Transport::bind_on(
            runtime.handle(),
            TransportConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                identity: NodeIdentity::generate().unwrap(),
                trust: Trust::pinned([NodeIdentity::generate().unwrap().fingerprint()]),
            },
        )
        .unwrap();
        for _ in 0..100 {
            let task = runtime.spawn(async {});
            runtime.block_on(async {
                while !task.is_finished() {
                    tokio::task::yield_now().await;
                }
            });
            transport.shared.track(task);
        }
        // The accept loop and the last task tracked.
        assert_eq!(transport.shared.tasks.lock().len(), 2);
        runtime.block_on(transport.shutdown());
    }
}
