//! `net::quic` and `net::identity` over real loopback UDP: delivery and acknowledgement of every
//! message both ways, trust by pinned fingerprint and by CA, refusal of untrusted peers at the
//! handshake, resending after a peer comes back, the identity files, and a hostile peer.
//!
//! Each test plays the engine: it takes every event, stores received messages in order per
//! conversation direction (dropping duplicates, as the engine does), acknowledges them, and
//! counts acknowledgements. Every wait is on a condition, bounded by a timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use herald_net::Error;
use herald_net::identity::{
    BROKER_ID_FILE, CERTIFICATE_FILE, Fingerprint, KEY_FILE, NodeIdentity, Trust,
    node_certificate_params,
};
use herald_net::proto::{Event, MessageHeader, OutgoingMessage};
use herald_net::quic::{
    CLOSE_PROTOCOL_VIOLATION, EVENT_OVERHEAD_BYTES, EVENTS_BYTES_MAX, PEERS_MAX, PeerKey,
    READ_CHUNKS_MAX, Transport, TransportConfig, TransportEvent, TransportOptions,
    UDP_SOCKET_BUFFER_BYTES, bind_udp_socket, client_config,
};
use parking_lot::Mutex;
use rustls::pki_types::PrivateKeyDer;
use tokio::sync::Notify;
use uuid::Uuid;

/// Bound of every test's waits: far above what the work needs, so that only a hang fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A conversation direction: (conversation id, from initiator).
type Direction = ([u8; 16], bool);

/// What the engine a test plays has seen.
#[derive(Debug, Default)]
struct Seen {
    /// Stored messages per conversation direction, in order: (sequence, body).
    stored: HashMap<Direction, Vec<(u64, Vec<u8>)>>,
    duplicates: usize,
    /// Sequences that arrived past a gap (must never happen on one connection).
    gaps: usize,
    /// How often each sent id was acknowledged.
    acknowledged: HashMap<u64, usize>,
    connected: Vec<(PeerKey, Fingerprint, Uuid)>,
    disconnected: Vec<(PeerKey, String)>,
    refused: Vec<Fingerprint>,
    going_away: usize,
    /// Broker errors from peers: (session, conversation, code, description).
    remote_errors: Vec<(PeerKey, [u8; 16], i32, String)>,
}

impl Seen {
    fn stored_count(&self) -> usize {
        self.stored.values().map(Vec::len).sum()
    }
}

/// A transport and the engine played over it.
struct Node {
    transport: Arc<Transport>,
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
    /// Whether the engine acknowledges what it stores.
    acknowledging: Arc<std::sync::atomic::AtomicBool>,
}

impl Node {
    fn start(identity: NodeIdentity, trust: Trust, listen: SocketAddr) -> herald_net::Result<Node> {
        Node::start_on(
            &tokio::runtime::Handle::current(),
            TransportOptions::default(),
            identity,
            trust,
            listen,
        )
    }

    /// A node whose transport and engine run on `runtime`.
    fn start_on(
        runtime: &tokio::runtime::Handle,
        options: TransportOptions,
        identity: NodeIdentity,
        trust: Trust,
        listen: SocketAddr,
    ) -> herald_net::Result<Node> {
        let (transport, mut events) = Transport::bind_on_with(
            runtime,
            TransportConfig {
                listen,
                identity,
                trust,
            },
            options,
        )?;
        let transport = Arc::new(transport);
        let addr = transport.local_addr()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let changed = Arc::new(Notify::new());
        let acknowledging = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let weak: Weak<Transport> = Arc::downgrade(&transport);
        let (task_seen, task_changed, task_ack) =
            (seen.clone(), changed.clone(), acknowledging.clone());
        runtime.spawn(async move {
            while let Some(event) = events.recv().await {
                play_engine(&weak, &task_seen, &task_ack, event);
                task_changed.notify_waiters();
            }
        });
        Ok(Node {
            transport,
            addr,
            seen,
            changed,
            acknowledging,
        })
    }

    fn fingerprint(&self) -> Fingerprint {
        self.transport.identity().fingerprint()
    }

    /// Waits until `done` holds of what this node has seen.
    async fn wait_for(&self, what: &str, done: impl Fn(&Seen) -> bool) {
        let waited = tokio::time::timeout(TEST_TIMEOUT, async {
            loop {
                let notified = self.changed.notified();
                if done(&self.seen.lock()) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "timed out waiting for {what}; seen: {:#?}",
                Summary(&self.seen.lock())
            );
        }
    }
}

/// `Seen` without the bodies, for failure messages.
struct Summary<'a>(&'a Seen);

impl std::fmt::Debug for Summary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seen")
            .field("stored", &self.0.stored_count())
            .field("duplicates", &self.0.duplicates)
            .field("gaps", &self.0.gaps)
            .field("acknowledged", &self.0.acknowledged.len())
            .field("connected", &self.0.connected)
            .field("disconnected", &self.0.disconnected)
            .field("refused", &self.0.refused)
            .finish()
    }
}

fn play_engine(
    transport: &Weak<Transport>,
    seen: &Mutex<Seen>,
    acknowledging: &std::sync::atomic::AtomicBool,
    event: TransportEvent,
) {
    let mut seen = seen.lock();
    match event {
        TransportEvent::Connected {
            peer,
            fingerprint,
            broker_instance,
            ..
        } => seen.connected.push((peer, fingerprint, broker_instance)),
        TransportEvent::Disconnected { peer, reason } => seen.disconnected.push((peer, reason)),
        TransportEvent::Refused { fingerprint, .. } => seen.refused.push(fingerprint),
        TransportEvent::Session { peer, event } => match event {
            Event::Received(message) => {
                let header = &message.header;
                let key = (header.conversation_id, header.from_initiator);
                let stored = seen.stored.entry(key).or_default();
                let highest = stored.last().map_or(0, |(sequence, _)| *sequence);
                let sequence = header.sequence;
                if sequence == highest + 1 {
                    stored.push((sequence, message.body));
                } else if sequence <= highest {
                    seen.duplicates += 1;
                } else {
                    seen.gaps += 1;
                    return;
                }
                if acknowledging.load(std::sync::atomic::Ordering::SeqCst)
                    && let Some(transport) = transport.upgrade()
                {
                    let highest = sequence.max(highest);
                    transport
                        .acknowledge(&peer, key.0, key.1, highest)
                        .expect("the session the message came on exists");
                }
            }
            Event::Acknowledged { id, .. } => *seen.acknowledged.entry(id).or_default() += 1,
            Event::PeerGoingAway => seen.going_away += 1,
            Event::RemoteError {
                conversation_id,
                code,
                description,
                ..
            } => seen
                .remote_errors
                .push((peer, conversation_id, code, description)),
            Event::Connected { .. } => {}
        },
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("a socket address")
}

/// The body of message `sequence` of `conversation`: `bytes` of a pattern only it has.
fn body(conversation: u8, sequence: u64, bytes: usize) -> Vec<u8> {
    (0..bytes)
        .map(|i| {
            (i as u64)
                .wrapping_mul(31)
                .wrapping_add(sequence * 7 + u64::from(conversation)) as u8
        })
        .collect()
}

fn message(
    id: u64,
    conversation: u8,
    from_initiator: bool,
    sequence: u64,
    body: Vec<u8>,
) -> OutgoingMessage {
    OutgoingMessage {
        id,
        header: MessageHeader {
            conversation_id: [conversation; 16],
            from_initiator,
            sequence,
            source_service: "//herald/test/initiator".into(),
            target_service: "//herald/test/target".into(),
            contract: "//herald/test/contract".into(),
            message_type: "//herald/test/request".into(),
            target_broker_instance: None,
            lifetime_deadline_secs: 0,
        },
        body: body.into(),
    }
}

/// Sends `count` messages from `from` to `to` over `conversations` conversations, every
/// `large_every`-th of `large_bytes`, the rest small; ids start at `first_id`. Returns the
/// (conversation, sequence, body) of each, in send order.
fn send_many(
    from: &Node,
    to: SocketAddr,
    count: u64,
    first_id: u64,
    from_initiator: bool,
    large_every: u64,
    large_bytes: usize,
) -> Vec<(u8, u64, Vec<u8>)> {
    const CONVERSATIONS: u64 = 10;
    let mut sent = Vec::new();
    for n in 0..count {
        let conversation = (n % CONVERSATIONS) as u8 + 1;
        let sequence = n / CONVERSATIONS + 1;
        let bytes = if large_every > 0 && n % large_every == large_every - 1 {
            large_bytes
        } else {
            (n as usize * 37) % 2000
        };
        let body = body(conversation, sequence, bytes);
        from.transport
            .send(
                to,
                message(
                    first_id + n,
                    conversation,
                    from_initiator,
                    sequence,
                    body.clone(),
                ),
            )
            .expect("the send queue has room");
        sent.push((conversation, sequence, body));
    }
    sent
}

/// Every message of `sent` is stored at `node`, once, in order, with its body.
fn assert_stored(node: &Node, sent: &[(u8, u64, Vec<u8>)], from_initiator: bool) {
    assert_seen_stored(&node.seen.lock(), sent, from_initiator);
}

fn assert_seen_stored(seen: &Seen, sent: &[(u8, u64, Vec<u8>)], from_initiator: bool) {
    assert_eq!(seen.gaps, 0, "no message may arrive past a gap");
    let mut expected: HashMap<Direction, Vec<(u64, &[u8])>> = HashMap::new();
    for (conversation, sequence, body) in sent {
        expected
            .entry(([*conversation; 16], from_initiator))
            .or_default()
            .push((*sequence, body));
    }
    for (key, messages) in expected {
        let stored = seen
            .stored
            .get(&key)
            .expect("the conversation's messages arrived");
        assert_eq!(stored.len(), messages.len());
        for ((sequence, body), (want_sequence, want_body)) in stored.iter().zip(messages) {
            assert_eq!(*sequence, want_sequence);
            assert!(
                body.as_slice() == want_body,
                "body of message {sequence} differs"
            );
        }
    }
}

/// Every id in `ids` was acknowledged exactly once.
fn assert_acknowledged_once(node: &Node, ids: std::ops::Range<u64>) {
    let seen = node.seen.lock();
    assert_eq!(seen.acknowledged.len(), ids.clone().count());
    for id in ids {
        assert_eq!(
            seen.acknowledged.get(&id),
            Some(&1),
            "id {id} acknowledged once"
        );
    }
}

/// The endpoints' sockets get the buffers asked for, as far as the kernel allows: with the
/// default (~208 KiB) a streaming peer overflows them whenever the network thread pauses.
#[cfg(target_os = "linux")]
#[test]
fn udp_sockets_get_large_buffers() {
    let limit = |name: &str| -> usize {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .expect("reading the kernel's socket buffer limit")
            .trim()
            .parse()
            .expect("a number")
    };
    let socket = bind_udp_socket(loopback()).expect("binding");
    let state = quinn::udp::UdpSocketState::new((&socket).into()).unwrap();
    // Linux doubles what it grants (its bookkeeping), and grants at most the limit.
    let receive = state.recv_buffer_size((&socket).into()).unwrap();
    assert_eq!(receive, 2 * UDP_SOCKET_BUFFER_BYTES.min(limit("rmem_max")));
    let send = state.send_buffer_size((&socket).into()).unwrap();
    assert_eq!(send, 2 * UDP_SOCKET_BUFFER_BYTES.min(limit("wmem_max")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_each_way_arrive_once_in_order_and_are_acknowledged_once() {
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let a = start_trusting(&a_identity, &b_identity, loopback()).unwrap();
    let b = start_trusting(&b_identity, &a_identity, loopback()).unwrap();

    const COUNT: u64 = 1000;
    // Every 100th message is 1 MiB: four fragments, and more than one transmit batch.
    let to_b = send_many(&a, b.addr, COUNT, 0, true, 100, 1024 * 1024);
    let to_a = send_many(&b, a.addr, COUNT, 10_000, false, 100, 1024 * 1024);

    for (node, what) in [(&a, "a"), (&b, "b")] {
        node.wait_for(&format!("{what}: all stored and acknowledged"), |seen| {
            seen.stored_count() == COUNT as usize && seen.acknowledged.len() == COUNT as usize
        })
        .await;
    }
    assert_stored(&b, &to_b, true);
    assert_stored(&a, &to_a, false);
    assert_acknowledged_once(&a, 0..COUNT);
    assert_acknowledged_once(&b, 10_000..10_000 + COUNT);
    assert_eq!(
        a.transport
            .unacknowledged_messages(&PeerKey::Dialed(b.addr)),
        0
    );
    // Both dialed: each sees the other's certificate and broker id on both connections.
    for (node, other) in [(&a, &b_identity), (&b, &a_identity)] {
        let seen = node.seen.lock();
        assert!(
            seen.connected
                .iter()
                .any(|(peer, fp, id)| matches!(peer, PeerKey::Dialed(_))
                    && *fp == other.fingerprint()
                    && *id == other.broker_instance())
        );
        assert!(seen.connected.iter().any(|(peer, fp, id)| matches!(
            peer,
            PeerKey::Accepted(on, _) if *on == other.fingerprint()
        ) && *fp == other.fingerprint()
            && *id == other.broker_instance()));
    }
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_certificate_is_refused_and_nothing_passes() {
    init_tracing();
    let (x_identity, y_identity) = (
        NodeIdentity::generate().unwrap(),
        NodeIdentity::generate().unwrap(),
    );
    let stranger = NodeIdentity::generate().unwrap().fingerprint();
    // X trusts someone else; Y would accept X.
    let x = Node::start(x_identity.clone(), Trust::pinned([stranger]), loopback()).unwrap();
    let y = Node::start(
        y_identity.clone(),
        Trust::pinned([x_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    x.transport
        .send(y.addr, message(1, 1, true, 1, b"hello".to_vec()))
        .unwrap();
    x.wait_for("x refuses y's certificate", |seen| {
        seen.refused.contains(&y_identity.fingerprint()) && !seen.disconnected.is_empty()
    })
    .await;
    assert_nothing_passed(&x, &y);
    x.transport.shutdown().await;
    y.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_client_certificate_is_refused_and_nothing_passes() {
    init_tracing();
    let (x_identity, y_identity) = (
        NodeIdentity::generate().unwrap(),
        NodeIdentity::generate().unwrap(),
    );
    let stranger = NodeIdentity::generate().unwrap().fingerprint();
    // X would accept Y; Y trusts someone else.
    let x = Node::start(
        x_identity.clone(),
        Trust::pinned([y_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let y = Node::start(y_identity.clone(), Trust::pinned([stranger]), loopback()).unwrap();
    x.transport
        .send(y.addr, message(1, 1, true, 1, b"hello".to_vec()))
        .unwrap();
    y.wait_for("y refuses x's certificate", |seen| {
        seen.refused.contains(&x_identity.fingerprint())
    })
    .await;
    x.wait_for("x loses the connection", |seen| {
        !seen.disconnected.is_empty()
    })
    .await;
    assert_nothing_passed(&x, &y);
    x.transport.shutdown().await;
    y.transport.shutdown().await;
}

fn assert_nothing_passed(x: &Node, y: &Node) {
    for node in [x, y] {
        let seen = node.seen.lock();
        assert!(
            seen.connected.is_empty(),
            "no session may start: {:?}",
            seen.connected
        );
        assert_eq!(seen.stored_count(), 0);
        assert!(seen.acknowledged.is_empty());
    }
    assert_eq!(
        x.transport
            .unacknowledged_messages(&PeerKey::Dialed(y.addr)),
        1
    );
}

/// A CA certificate and a function issuing node identities under it.
struct TestCa {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    certificate: rcgen::Certificate,
}

impl TestCa {
    fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "herald test CA");
        let certificate = params.self_signed(&key).unwrap();
        TestCa {
            params,
            key,
            certificate,
        }
    }

    fn issue(&self, name: &str) -> NodeIdentity {
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let certificate = node_certificate_params(name)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        NodeIdentity::from_parts(
            Uuid::new_v4(),
            vec![certificate.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap()
    }

    fn trust(&self) -> Trust {
        Trust::new().add_ca(self.certificate.der().clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_certificates_from_a_trusted_ca_connect_and_others_do_not() {
    init_tracing();
    let ca = TestCa::new();
    let a = Node::start(ca.issue("node a"), ca.trust(), loopback()).unwrap();
    let b = Node::start(ca.issue("node b"), ca.trust(), loopback()).unwrap();
    let to_b = send_many(&a, b.addr, 20, 0, true, 10, 300 * 1024);
    let to_a = send_many(&b, a.addr, 20, 100, false, 0, 0);
    for node in [&a, &b] {
        node.wait_for("all stored and acknowledged", |seen| {
            seen.stored_count() == 20 && seen.acknowledged.len() == 20
        })
        .await;
    }
    assert_stored(&b, &to_b, true);
    assert_stored(&a, &to_a, false);

    // A broker error about a received message goes back on the session it came on.
    let from_a = accepted_key(&b, a.fingerprint());
    b.transport
        .send_error(&from_a, [1; 16], false, -8490, "no such service")
        .unwrap();
    a.wait_for("a gets b's error", |seen| !seen.remote_errors.is_empty())
        .await;
    assert_eq!(
        a.seen.lock().remote_errors,
        [(
            PeerKey::Dialed(b.addr),
            [1; 16],
            -8490,
            "no such service".to_owned()
        )]
    );
    // A session that never was cannot be acknowledged on.
    assert!(matches!(
        b.transport.acknowledge(
            &PeerKey::Accepted(Fingerprint([7; 32]), 0),
            [1; 16],
            true,
            1
        ),
        Err(Error::UnknownPeer { .. })
    ));

    // A self-signed node and one from another CA are refused by the CA-trusting node.
    let other_ca = TestCa::new();
    for (name, identity) in [
        ("self-signed", NodeIdentity::generate().unwrap()),
        ("other CA", other_ca.issue("node c")),
    ] {
        let fingerprint = identity.fingerprint();
        let c = Node::start(identity, ca.trust().pin(b.fingerprint()), loopback()).unwrap();
        c.transport
            .send(b.addr, message(1, 9, true, 1, b"let me in".to_vec()))
            .unwrap();
        b.wait_for(&format!("b refuses the {name} node"), |seen| {
            seen.refused.contains(&fingerprint)
        })
        .await;
        c.wait_for("c loses the connection", |seen| {
            !seen.disconnected.is_empty()
        })
        .await;
        assert!(
            c.seen.lock().connected.is_empty(),
            "{name}: no session may start"
        );
        c.transport.shutdown().await;
    }
    assert_eq!(
        b.seen.lock().stored_count(),
        20,
        "nothing from the refused nodes was stored"
    );
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_comes_back_gets_the_unacknowledged_messages_again() {
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let a = start_trusting(&a_identity, &b_identity, loopback()).unwrap();
    let b = start_trusting(&b_identity, &a_identity, loopback()).unwrap();
    // B stores but does not acknowledge (its commits never became durable) and then goes away.
    b.acknowledging
        .store(false, std::sync::atomic::Ordering::SeqCst);
    const COUNT: u64 = 30;
    let sent = send_many(&a, b.addr, COUNT, 0, true, 10, 400 * 1024);
    b.wait_for("b stores everything", |seen| {
        seen.stored_count() == COUNT as usize
    })
    .await;
    let b_addr = b.addr;
    b.transport.shutdown().await;
    drop(b);
    assert!(a.seen.lock().acknowledged.is_empty());

    // The same node again, on the same port.
    let b = start_again(|| start_trusting(&b_identity, &a_identity, b_addr)).await;
    a.wait_for("a's messages are acknowledged by the new b", |seen| {
        seen.acknowledged.len() == COUNT as usize
    })
    .await;
    assert_stored(&b, &sent, true);
    assert_acknowledged_once(&a, 0..COUNT);
    assert!(
        a.seen
            .lock()
            .disconnected
            .iter()
            .any(|(peer, _)| *peer == PeerKey::Dialed(b_addr)),
        "a saw the connection go"
    );
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

/// A node that vanished without closing its connections (its runtime dropped, as a crash does)
/// and came back on the same address answers the old connection's packets with a stateless
/// reset its peer accepts, because its reset key comes from its private key: the peer drops
/// the connection at once ("reset by peer") and dials again. Both sides idle out only after an
/// hour, so nothing else can end the old connection within the test's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_back_on_its_address_after_a_crash_resets_the_old_connection() {
    init_tracing();
    let options = TransportOptions {
        idle_timeout: Duration::from_secs(3600),
        ..TransportOptions::default()
    };
    let (a_identity, b_identity) = (
        NodeIdentity::generate().unwrap(),
        NodeIdentity::generate().unwrap(),
    );
    let a = Node::start_on(
        &tokio::runtime::Handle::current(),
        options.clone(),
        a_identity.clone(),
        Trust::pinned([b_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let b_runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    let runtime = b_runtime();
    let b = Node::start_on(
        runtime.handle(),
        options.clone(),
        b_identity.clone(),
        Trust::pinned([a_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let b_addr = b.addr;
    a.transport
        .send(b_addr, message(0, 1, true, 1, body(1, 1, 1000)))
        .unwrap();
    a.wait_for("the first message is acknowledged", |seen| {
        seen.acknowledged.len() == 1
    })
    .await;

    // B crashes: its tasks are dropped where they are, and only then its transport (whose
    // close then has no task left to send anything); its socket closes.
    tokio::task::spawn_blocking(move || runtime.shutdown_timeout(TEST_TIMEOUT))
        .await
        .unwrap();
    drop(b);
    let runtime = b_runtime();
    let b = start_again(|| {
        Node::start_on(
            runtime.handle(),
            options.clone(),
            b_identity.clone(),
            Trust::pinned([a_identity.fingerprint()]),
            b_addr,
        )
    })
    .await;
    // Goes out on the old connection first: the new B resets it.
    a.transport
        .send(b_addr, message(1, 2, true, 1, body(2, 1, 1000)))
        .unwrap();
    a.wait_for("the second message is acknowledged by the new b", |seen| {
        seen.acknowledged.len() == 2
    })
    .await;
    let reasons: Vec<String> = a
        .seen
        .lock()
        .disconnected
        .iter()
        .filter(|(peer, _)| *peer == PeerKey::Dialed(b_addr))
        .map(|(_, reason)| reason.clone())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|reason| reason.contains("reset by peer")),
        "the old connection ended by a stateless reset: {reasons:?}"
    );
    assert_eq!(
        b.seen.lock().stored_count(),
        1,
        "the new b got the second message"
    );
    a.transport.shutdown().await;
    b.transport.shutdown().await;
    drop(b);
    runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_peer_sending_garbage_is_closed_and_others_are_still_served() {
    init_tracing();
    let (a_identity, b_identity, hostile) = (
        NodeIdentity::generate().unwrap(),
        NodeIdentity::generate().unwrap(),
        NodeIdentity::generate().unwrap(),
    );
    let a = Node::start(
        a_identity.clone(),
        Trust::pinned([b_identity.fingerprint(), hostile.fingerprint()]),
        loopback(),
    )
    .unwrap();

    // The hostile peer speaks raw QUIC with a trusted certificate and writes a frame header
    // declaring 4 GiB.
    let (endpoint, connection) = raw_connection(&hostile, &a_identity, a.addr).await;
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0xff; 64]).await.unwrap();
    let closed = tokio::time::timeout(TEST_TIMEOUT, connection.closed())
        .await
        .expect("a closes the connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CLOSE_PROTOCOL_VIOLATION);
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("exceeds the maximum"), "reason: {reason}");
        }
        other => panic!("expected an application close, got {other}"),
    }
    a.wait_for("a reports the violation", |seen| {
        seen.disconnected.iter().any(|(peer, reason)| {
            matches!(peer, PeerKey::Accepted(on, _) if *on == hostile.fingerprint())
                && reason.contains("protocol violation")
        })
    })
    .await;

    // A well-behaved peer is still served.
    let b = Node::start(
        b_identity,
        Trust::pinned([a_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let sent = send_many(&b, a.addr, 10, 0, true, 0, 0);
    b.wait_for("b's messages are acknowledged", |seen| {
        seen.acknowledged.len() == 10
    })
    .await;
    assert_stored(&a, &sent, true);
    endpoint.close(0u32.into(), b"done");
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_taking_events_holds_its_peers_back_and_loses_nothing() {
    init_tracing();
    let (a_identity, b_identity) = (
        NodeIdentity::generate().unwrap(),
        NodeIdentity::generate().unwrap(),
    );
    let a = Node::start(
        a_identity.clone(),
        Trust::pinned([b_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let (b, mut b_events) = Transport::bind(TransportConfig {
        listen: loopback(),
        identity: b_identity,
        trust: Trust::pinned([a_identity.fingerprint()]),
    })
    .unwrap();
    let b = Arc::new(b);
    let b_addr = b.local_addr().unwrap();
    // Messages of 4 KiB, three times what the event channel may hold.
    const BODY_BYTES: usize = 4096;
    let count = (3 * EVENTS_BYTES_MAX / BODY_BYTES) as u64;
    let sent = send_many(&a, b_addr, count, 0, true, 1, BODY_BYTES);

    // B's caller takes nothing: the channel fills to its bound and B stops reading.
    let per_event = BODY_BYTES + EVENT_OVERHEAD_BYTES;
    let full = EVENTS_BYTES_MAX - READ_CHUNKS_MAX * per_event;
    // The events are the Connected (charged the overhead alone) and whole messages.
    let held = |events: usize| events.saturating_sub(1) * per_event + EVENT_OVERHEAD_BYTES;
    tokio::time::timeout(TEST_TIMEOUT, async {
        while held(b_events.len()) < full {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the event channel fills");
    let waiting = b_events.len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b_events.len(), waiting, "B stopped reading");
    assert!(held(waiting) <= EVENTS_BYTES_MAX, "{waiting} events");
    // A reader waiting for room holds what it got of it so far: charged, not yet used.
    assert!(b_events.charged_bytes() <= EVENTS_BYTES_MAX);

    // B's engine catches up: every message arrives, once, in order, and is acknowledged once.
    let seen = Mutex::new(Seen::default());
    let acknowledging = std::sync::atomic::AtomicBool::new(true);
    let weak = Arc::downgrade(&b);
    tokio::time::timeout(TEST_TIMEOUT, async {
        while seen.lock().stored_count() < count as usize {
            let event = b_events.recv().await.expect("b runs");
            play_engine(&weak, &seen, &acknowledging, event);
        }
    })
    .await
    .expect("b stores every message");
    let engine = tokio::spawn(async move {
        while let Some(event) = b_events.recv().await {
            play_engine(&weak, &seen, &acknowledging, event);
        }
        seen
    });
    a.wait_for("a's messages are acknowledged", |seen| {
        seen.acknowledged.len() == count as usize
    })
    .await;
    assert_acknowledged_once(&a, 0..count);
    a.transport.shutdown().await;
    b.shutdown().await;
    drop(b);
    let seen = tokio::time::timeout(TEST_TIMEOUT, engine)
        .await
        .expect("b's events end once it is gone")
        .unwrap();
    assert_seen_stored(&seen.lock(), &sent, true);
}

fn two_identities() -> (NodeIdentity, NodeIdentity) {
    (
        NodeIdentity::generate().unwrap(),
        NodeIdentity::generate().unwrap(),
    )
}

/// A node of `identity` trusting only `peer`, on `listen`.
/// The session `node` accepted from the peer of certificate `fingerprint` (it connected).
fn accepted_key(node: &Node, fingerprint: Fingerprint) -> PeerKey {
    node.seen
        .lock()
        .connected
        .iter()
        .map(|(key, ..)| *key)
        .find(|key| matches!(key, PeerKey::Accepted(on, _) if *on == fingerprint))
        .expect("the peer connected")
}

fn start_trusting(
    identity: &NodeIdentity,
    peer: &NodeIdentity,
    listen: SocketAddr,
) -> herald_net::Result<Node> {
    Node::start(
        identity.clone(),
        Trust::pinned([peer.fingerprint()]),
        listen,
    )
}

/// A node started again on the address it had: its old socket may take a moment to be released.
async fn start_again(start: impl Fn() -> herald_net::Result<Node>) -> Node {
    tokio::time::timeout(TEST_TIMEOUT, async {
        loop {
            match start() {
                Ok(node) => return node,
                Err(Error::Io { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("starting the node again: {e}"),
            }
        }
    })
    .await
    .expect("the node's port is free again")
}

/// A raw quinn connection to the node at `addr` (whose identity is `node`), presenting
/// `identity`'s certificate: a peer that does not speak Herald's protocol, or not yet.
async fn raw_connection(
    identity: &NodeIdentity,
    node: &NodeIdentity,
    addr: SocketAddr,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
    endpoint.set_default_client_config(
        client_config(identity, &Trust::pinned([node.fingerprint()])).unwrap(),
    );
    let connection = endpoint
        .connect(addr, "herald-node")
        .unwrap()
        .await
        .unwrap();
    (endpoint, connection)
}

/// Waits until `condition` holds of `node`'s peers (polled: retiring a peer emits no event).
async fn wait_peers(node: &Node, what: &str, condition: impl Fn(&[(PeerKey, usize)]) -> bool) {
    let peers = || -> Vec<(PeerKey, usize)> {
        node.transport
            .peers()
            .into_iter()
            .map(|(key, _, unacknowledged)| (key, unacknowledged))
            .collect()
    };
    let waited = tokio::time::timeout(TEST_TIMEOUT, async {
        while !condition(&peers()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out waiting until {what}; peers and their unacknowledged messages: {:?}",
        peers()
    );
}

/// A trusted peer that connects and goes before opening its stream (it crashed, or lost its
/// network) leaves nothing behind: its session, made when the connection came, is retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_ends_before_its_stream_opens_leaves_no_peer() {
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let a = start_trusting(&a_identity, &b_identity, loopback()).unwrap();
    let (endpoint, connection) = raw_connection(&b_identity, &a_identity, a.addr).await;
    wait_peers(
        &a,
        "a made the peer's session",
        |peers| matches!(peers, [(PeerKey::Accepted(on, _), 0)] if *on == b_identity.fingerprint()),
    )
    .await;
    connection.close(0u32.into(), b"gone before the stream");
    wait_peers(&a, "a retired the peer", |peers| peers.is_empty()).await;
    endpoint.wait_idle().await;
    a.transport.shutdown().await;
}

/// Peers that come and go (a node gone for good, an address no route names any more, the
/// certificates a CA signs) must not stay in the transport — dialed for ever, counted against
/// `PEERS_MAX` until a restart: a peer whose connection ended with nothing left in its session
/// is retired, on both sides, and the next message for it makes it anew. A peer with
/// unacknowledged messages stays (and keeps dialing) until they are withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_nothing_left_is_retired_when_its_connection_ends() {
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let a = start_trusting(&a_identity, &b_identity, loopback()).unwrap();
    let b = start_trusting(&b_identity, &a_identity, loopback()).unwrap();
    let b_addr = b.addr;
    send_many(&a, b_addr, 5, 0, true, 0, 0);
    a.wait_for("a's messages are acknowledged", |seen| {
        seen.acknowledged.len() == 5
    })
    .await;
    wait_peers(
        &b,
        "b has a's session",
        |peers| matches!(peers, [(PeerKey::Accepted(on, _), 0)] if *on == a_identity.fingerprint()),
    )
    .await;

    // B goes: A's dialed peer, all acknowledged, is retired and dials no more.
    b.transport.shutdown().await;
    drop(b);
    wait_peers(&a, "a retired its peer b", |peers| peers.is_empty()).await;

    // B back on its address: the next message makes the peer again and gets through.
    let b = start_again(|| start_trusting(&b_identity, &a_identity, b_addr)).await;
    send_many(&a, b_addr, 5, 5, false, 0, 0);
    a.wait_for("the new messages are acknowledged", |seen| {
        seen.acknowledged.len() == 10
    })
    .await;
    // A goes: B's accepted peer, with nothing owed, is retired.
    a.transport.shutdown().await;
    wait_peers(&b, "b retired its peer a", |peers| peers.is_empty()).await;
    b.transport.shutdown().await;

    // C does not trust the node at `nowhere`, so each attempt fails (at once, at the
    // handshake): the peer keeps its message and dials again and again.
    let c = Node::start(
        NodeIdentity::generate().unwrap(),
        Trust::pinned([b_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let stranger = Node::start(
        NodeIdentity::generate().unwrap(),
        Trust::pinned([c.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let nowhere = stranger.addr;
    c.transport
        .send(nowhere, message(7, 1, true, 1, Vec::new()))
        .unwrap();
    c.wait_for("a failed attempt", |seen| !seen.disconnected.is_empty())
        .await;
    assert_eq!(
        c.transport.peers().len(),
        1,
        "a peer with a message to deliver stays"
    );
    assert_eq!(c.transport.withdraw(nowhere, &[7]), 1);
    wait_peers(&c, "the peer is retired after its next attempt", |peers| {
        peers.is_empty()
    })
    .await;
    c.transport.shutdown().await;
    stranger.transport.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_holds_at_most_peers_max_sessions() {
    init_tracing();
    let stranger = NodeIdentity::generate().unwrap().fingerprint();
    let a = Node::start(
        NodeIdentity::generate().unwrap(),
        Trust::pinned([stranger]),
        loopback(),
    )
    .unwrap();
    // Loopback addresses where nobody listens: each send makes a dialed session.
    let address = |n: usize| SocketAddr::from(([127, 1, (n / 256) as u8, (n % 256) as u8], 9));
    for n in 0..PEERS_MAX {
        a.transport
            .send(address(n), message(n as u64, 1, true, 1, Vec::new()))
            .unwrap();
    }
    assert_eq!(
        a.transport
            .send(address(PEERS_MAX), message(0, 1, true, 1, Vec::new()))
            .unwrap_err(),
        Error::TooManyPeers { max: PEERS_MAX }
    );
    // A peer that has a session is still served.
    a.transport
        .send(address(0), message(1, 1, true, 2, Vec::new()))
        .unwrap();
    assert_eq!(
        a.transport
            .unacknowledged_messages(&PeerKey::Dialed(address(0))),
        2
    );
    a.transport.shutdown().await;
    assert_eq!(
        a.transport
            .send(address(0), message(2, 1, true, 3, Vec::new()))
            .unwrap_err(),
        Error::ShutDown
    );
}

#[test]
fn the_identity_is_created_once_and_reloaded_identical() {
    let dir = tempfile::tempdir().unwrap();
    let created = NodeIdentity::load_or_create(dir.path()).unwrap();
    for file in [BROKER_ID_FILE, CERTIFICATE_FILE, KEY_FILE] {
        assert!(dir.path().join(file).is_file(), "{file} written");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    }
    let files = |dir: &std::path::Path| -> Vec<Vec<u8>> {
        [BROKER_ID_FILE, CERTIFICATE_FILE, KEY_FILE]
            .map(|file| std::fs::read(dir.join(file)).unwrap())
            .to_vec()
    };
    let before = files(dir.path());
    for _ in 0..3 {
        let reloaded = NodeIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(reloaded.broker_instance(), created.broker_instance());
        assert_eq!(reloaded.fingerprint(), created.fingerprint());
        assert_eq!(reloaded.certificate(), created.certificate());
        assert_eq!(reloaded.key().secret_der(), created.key().secret_der());
    }
    assert_eq!(files(dir.path()), before, "reloading writes nothing");
    let fingerprint = created.fingerprint().to_string();
    assert_eq!(fingerprint.len(), 64);
    assert_eq!(fingerprint, fingerprint.to_lowercase());
}

#[test]
fn a_corrupt_identity_file_is_a_typed_error_naming_the_file() {
    let corrupt_with = |file: &str, bytes: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        NodeIdentity::load_or_create(dir.path()).unwrap();
        std::fs::write(dir.path().join(file), bytes).unwrap();
        match NodeIdentity::load_or_create(dir.path()) {
            Err(Error::CorruptIdentity { path, reason }) => {
                assert_eq!(path, dir.path().join(file), "{reason}");
                reason
            }
            other => panic!("{file}: expected CorruptIdentity, got {other:?}"),
        }
    };
    corrupt_with(BROKER_ID_FILE, b"not a uuid\n");
    corrupt_with(CERTIFICATE_FILE, b"garbage");
    corrupt_with(CERTIFICATE_FILE, b"-----BEGIN CERTIFICATE-----\nAAAA\n");
    corrupt_with(
        KEY_FILE,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    corrupt_with(KEY_FILE, b"");
    // Half of a certificate: the key no longer matches what is left, or nothing parses.
    {
        let dir = tempfile::tempdir().unwrap();
        NodeIdentity::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(CERTIFICATE_FILE);
        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        assert!(matches!(
            NodeIdentity::load_or_create(dir.path()),
            Err(Error::CorruptIdentity { .. })
        ));
    }
    // Another node's key beside this node's certificate.
    let other = tempfile::tempdir().unwrap();
    NodeIdentity::load_or_create(other.path()).unwrap();
    let other_key = std::fs::read(other.path().join(KEY_FILE)).unwrap();
    let reason = corrupt_with(KEY_FILE, &other_key);
    assert!(reason.contains("does not match"), "{reason}");
    // A missing certificate when broker-id says the identity is complete.
    let dir = tempfile::tempdir().unwrap();
    NodeIdentity::load_or_create(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join(CERTIFICATE_FILE)).unwrap();
    assert!(matches!(
        NodeIdentity::load_or_create(dir.path()),
        Err(Error::CorruptIdentity { .. })
    ));
}

#[test]
fn an_identity_whose_creation_never_finished_is_made_anew() {
    // Creation writes broker-id last: a crash before it leaves files nobody ever used.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CERTIFICATE_FILE), b"half-written").unwrap();
    let identity = NodeIdentity::load_or_create(dir.path()).unwrap();
    let reloaded = NodeIdentity::load_or_create(dir.path()).unwrap();
    assert_eq!(identity.fingerprint(), reloaded.fingerprint());
}

#[test]
fn an_identity_file_over_its_bound_is_refused() {
    use herald_net::identity::IDENTITY_FILE_BYTES_MAX;
    let dir = tempfile::tempdir().unwrap();
    let identity = NodeIdentity::load_or_create(dir.path()).unwrap();
    let path = dir.path().join(CERTIFICATE_FILE);
    // At the bound: the PEM padded with trailing newlines still loads.
    let mut pem = std::fs::read(&path).unwrap();
    pem.resize(IDENTITY_FILE_BYTES_MAX as usize, b'\n');
    std::fs::write(&path, &pem).unwrap();
    assert_eq!(
        NodeIdentity::load_or_create(dir.path())
            .unwrap()
            .fingerprint(),
        identity.fingerprint()
    );
    // One byte more is refused.
    pem.push(b'\n');
    std::fs::write(&path, &pem).unwrap();
    assert!(matches!(
        NodeIdentity::load_or_create(dir.path()),
        Err(Error::CorruptIdentity { reason, .. }) if reason.contains("larger than")
    ));
}

/// A peer that dials this node at two addresses (two routes naming it differently, a node
/// with two interfaces) has a session here for each of its dialing sessions: each
/// connection's acknowledgements go back on it, and neither connection replaces the other.
/// With one session per certificate, each new connection closed the other (which dialed again
/// a second later), and acknowledgements went back on the connection that had not carried
/// their messages, where they were dropped: nothing was ever acknowledged for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_dialing_two_addresses_of_this_node_has_a_session_for_each() {
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let a = start_trusting(&a_identity, &b_identity, loopback()).unwrap();
    // B listens on every address: 127.0.0.1 and 127.0.0.2 both reach it.
    let b = start_trusting(&b_identity, &a_identity, "0.0.0.0:0".parse().unwrap()).unwrap();
    let [first, second] = [1, 2].map(|n| SocketAddr::from(([127, 0, 0, n], b.addr.port())));
    const COUNT: u64 = 300;
    // One direction of the conversations to each address, so that they do not mix at B.
    let to_first = send_many(&a, first, COUNT, 0, true, 0, 0);
    let to_second = send_many(&a, second, COUNT, COUNT, false, 0, 0);
    a.wait_for("every message acknowledged", |seen| {
        seen.acknowledged.len() == 2 * COUNT as usize
    })
    .await;
    assert_stored(&b, &to_first, true);
    assert_stored(&b, &to_second, false);
    assert_acknowledged_once(&a, 0..2 * COUNT);
    let sessions: Vec<PeerKey> = b
        .seen
        .lock()
        .connected
        .iter()
        .map(|(key, ..)| *key)
        .collect();
    assert_eq!(
        sessions.len(),
        2,
        "one connection each, none replaced: {sessions:?}"
    );
    assert_ne!(sessions[0], sessions[1]);
    a.transport.shutdown().await;
    b.transport.shutdown().await;
}

/// A trusted peer that opens its stream but never sends its Hello (keeping the connection alive)
/// is closed at the Hello timeout, and its session goes: it held a slot of `PEERS_MAX`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed() {
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let a = Node::start_on(
        &tokio::runtime::Handle::current(),
        TransportOptions {
            hello_timeout: Duration::from_millis(300),
            ..TransportOptions::default()
        },
        a_identity.clone(),
        Trust::pinned([b_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let (endpoint, connection) = raw_connection(&b_identity, &a_identity, a.addr).await;
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    // One byte of a frame header: the stream opens, no frame ever completes.
    send.write_all(&[1]).await.unwrap();
    let closed = tokio::time::timeout(TEST_TIMEOUT, connection.closed())
        .await
        .expect("closed within the test's timeout");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, herald_net::quic::CLOSE_PROTOCOL_VIOLATION);
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("no Hello within"), "{reason}");
        }
        other => panic!("expected a close by the node, got {other}"),
    }
    wait_peers(&a, "a retired the silent peer", |peers| peers.is_empty()).await;
    endpoint.wait_idle().await;
    a.transport.shutdown().await;
}

/// The dialer names its session (the token in the TLS server name), so one certificate could
/// make sessions without end: it gets `ACCEPTED_SESSIONS_PER_CERTIFICATE_MAX`, and another
/// peer still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_gets_a_bounded_number_of_sessions() {
    use herald_net::quic::ACCEPTED_SESSIONS_PER_CERTIFICATE_MAX as MAX;
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let c_identity = NodeIdentity::generate().unwrap();
    let a = Node::start(
        a_identity.clone(),
        Trust::pinned([b_identity.fingerprint(), c_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let connect = |identity: &NodeIdentity, token: u64| {
        let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
        endpoint.set_default_client_config(
            client_config(identity, &Trust::pinned([a_identity.fingerprint()])).unwrap(),
        );
        let connecting = endpoint
            .connect(a.addr, &format!("s{token:016x}.herald-node"))
            .unwrap();
        async move { (endpoint, connecting.await.unwrap()) }
    };
    let mut held = Vec::new();
    for token in 1..=MAX as u64 {
        held.push(connect(&b_identity, token).await);
    }
    wait_peers(&a, "a holds b's sessions", |peers| peers.len() == MAX).await;
    let (_endpoint, refused) = connect(&b_identity, MAX as u64 + 1).await;
    match tokio::time::timeout(TEST_TIMEOUT, refused.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, herald_net::quic::CLOSE_TOO_MANY_PEERS);
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(
                reason.contains(&format!("{MAX} sessions accepted")),
                "{reason}"
            );
        }
        other => panic!("expected the session past the bound refused, got {other:?}"),
    }
    let (_c_endpoint, _c) = connect(&c_identity, 1).await;
    wait_peers(&a, "another certificate still gets a session", |peers| {
        peers.len() == MAX + 1
            && peers.iter().any(
                |(key, _)| matches!(key, PeerKey::Accepted(on, _) if *on == c_identity.fingerprint()),
            )
    })
    .await;
    drop(held);
    a.transport.shutdown().await;
}

/// Anyone can start a handshake, before any certificate is seen: the handshakes in progress
/// are bounded, and once half the slots are taken an unvalidated source is sent a Retry first.
/// Initials from a source that never answers (a flood, or forged addresses) hold at most half
/// the slots; a real peer answers the Retry and still connects and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_never_finish_do_not_lock_a_real_peer_out() {
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let a = Node::start_on(
        &tokio::runtime::Handle::current(),
        TransportOptions {
            handshakes_in_progress_max: 2,
            ..TransportOptions::default()
        },
        a_identity.clone(),
        Trust::pinned([b_identity.fingerprint()]),
        loopback(),
    )
    .unwrap();
    let stalled = stall_handshakes("127.0.0.1:0", 8, &b_identity, &a_identity, a.addr);
    settle_handshakes(&a).await;
    // The rest of the flood was answered with Retries.
    assert_eq!(
        a.transport.handshakes_in_progress(),
        1,
        "an unvalidated flood holds half the slots, no more"
    );
    let b = start_trusting(&b_identity, &a_identity, loopback()).unwrap();
    send_many(&b, a.addr, 5, 0, true, 0, 0);
    b.wait_for(
        "b's messages are acknowledged while the flood stalls",
        |seen| seen.acknowledged.len() == 5,
    )
    .await;
    drop(stalled);
    b.transport.shutdown().await;
    a.transport.shutdown().await;
}

/// Initials from `from`, each of its own connection, never followed by anything: handshakes
/// that never finish. The connections are returned (dropping them sends nothing).
fn stall_handshakes(
    from: &str,
    count: usize,
    identity: &NodeIdentity,
    node: &NodeIdentity,
    addr: SocketAddr,
) -> Vec<quinn_proto::Connection> {
    let flood = std::net::UdpSocket::bind(from).unwrap();
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        true,
        None,
    );
    (0..count)
        .map(|_| {
            let config = client_config(identity, &Trust::pinned([node.fingerprint()])).unwrap();
            let (_, mut connection) = endpoint
                .connect(std::time::Instant::now(), config, addr, "herald-node")
                .unwrap();
            let mut datagram = Vec::new();
            let transmit = connection
                .poll_transmit(std::time::Instant::now(), 1, &mut datagram)
                .expect("an Initial to send");
            flood.send_to(&datagram[..transmit.size], addr).unwrap();
            connection
        })
        .collect()
}

/// Waits until `node` works on a handshake, then a moment more for the rest of a flood to be
/// handled (each Initial takes well under it: unbounded, all would be accepted by then).
async fn settle_handshakes(node: &Node) {
    let waited = tokio::time::timeout(TEST_TIMEOUT, async {
        while node.transport.handshakes_in_progress() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the flood's first handshake never began");
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// A source that could answer the Retry (its address is real) must not take every slot with
/// handshakes it never finishes: one source gets `HANDSHAKES_PER_ADDRESS_MAX`, and a peer at
/// another address still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_gets_a_bounded_number_of_handshakes() {
    use herald_net::quic::HANDSHAKES_PER_ADDRESS_MAX;
    init_tracing();
    let (a_identity, b_identity) = two_identities();
    let a = start_trusting(&a_identity, &b_identity, loopback()).unwrap();
    let stalled = stall_handshakes(
        "127.0.0.2:0",
        HANDSHAKES_PER_ADDRESS_MAX + 4,
        &b_identity,
        &a_identity,
        a.addr,
    );
    settle_handshakes(&a).await;
    assert_eq!(
        a.transport.handshakes_in_progress(),
        HANDSHAKES_PER_ADDRESS_MAX,
        "one source's share, though far fewer than all the slots are taken"
    );
    let b = start_trusting(&b_identity, &a_identity, loopback()).unwrap();
    send_many(&b, a.addr, 5, 0, true, 0, 0);
    b.wait_for("b's messages are acknowledged", |seen| {
        seen.acknowledged.len() == 5
    })
    .await;
    drop(stalled);
    b.transport.shutdown().await;
    a.transport.shutdown().await;
}
