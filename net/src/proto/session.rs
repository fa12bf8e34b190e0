//! The per-peer state machine: one [`PeerSession`] per connection to a peer node, sans-IO in
//! the quinn-proto style. The driver feeds it received bytes ([`PeerSession::handle_bytes`]),
//! writes what [`PeerSession::poll_transmit`] returns, sleeps until
//! [`PeerSession::poll_timeout`] and then calls [`PeerSession::handle_timeout`], and drains
//! [`PeerSession::poll_event`] after each call. Time is only ever the `now` passed in.
//!
//! Invariants:
//!
//! 1. A message given to [`PeerSession::send`] stays in the session until an Ack covering its
//!    (conversation, direction, sequence) arrives; then, and only then,
//!    [`Event::Acknowledged`] names it, exactly once.
//! 2. Messages are first transmitted in the order they were given, and a retransmission never
//!    overtakes an earlier message that is also due: transmission order is send order, so the
//!    messages of one conversation never reorder.
//! 3. The body bytes of messages transmitted on this connection and not yet acknowledged
//!    ([`PeerSession::in_flight_bytes`]) never exceed [`IN_FLIGHT_BYTES_MAX`]; a message that
//!    does not fit waits, and so do all messages given after it.
//! 4. A message whose transmission is complete and unacknowledged is retransmitted after
//!    [`RETRY_DELAY_INITIAL`], then after twice the previous delay, capped at
//!    [`RETRY_DELAY_MAX`] (1, 2, 4, …, 32, 60, 60 s).
//! 5. No peer input panics: every protocol violation is an [`Error`] from `handle*`, after which
//!    the driver closes the connection and calls [`PeerSession::reset`].
//!
//! The session does not detect duplicate or out-of-order messages: the engine knows the highest
//! sequence it has durably received per conversation direction, drops duplicates and gaps, and
//! acknowledges through [`PeerSession::acknowledge`] once its commit is durable.

use herald_engine::{IdMap, RecordBytes};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::proto::frame::{
    self, Ack, ErrorFrame, FRAGMENT_BODY_BYTES_MAX, FRAME_BYTES_MAX, Frame, FrameDecoder, Hello,
    MESSAGE_BODY_BYTES_MAX, MessageHeader, PROTOCOL_VERSION,
};
use crate::proto::reassembly::{
    REASSEMBLY_BYTES_MAX, REASSEMBLY_ENTRY_OVERHEAD_BYTES, REASSEMBLY_MESSAGE_OVERHEAD_BYTES,
    Reassembler,
};
use crate::proto::send_order::SendOrderSlots;

/// Largest number of message body bytes transmitted to one peer and not yet acknowledged. At
/// least one largest message, so every message can go; at most half the reassembly budget, so a
/// correct sender never makes its peer drop a partial message it still needs.
pub const IN_FLIGHT_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Delay before the first retransmission of an unacknowledged message.
pub const RETRY_DELAY_INITIAL: Duration = Duration::from_secs(1);

/// Longest delay between retransmissions: the backoff doubles up to it and stays there.
pub const RETRY_DELAY_MAX: Duration = Duration::from_secs(60);

/// Largest buffer one [`PeerSession::poll_transmit`] returns: frames are batched into one write
/// (a write per frame costs throughput), up to this size. One largest frame always fits.
pub const TRANSMIT_BYTES_MAX: usize = 1024 * 1024;

/// Most unacknowledged messages one session holds; `send` refuses more with
/// [`Error::SendQueueFull`] (the engine keeps them in its transmission queue and offers them
/// again after acknowledgements).
pub const SEND_QUEUE_MESSAGES_MAX: usize = 65_536;

/// Most Acks (one per conversation direction, coalesced) and Error frames waiting for
/// transmission. Past it new ones are dropped: both are best-effort, since an unacknowledged
/// message is retransmitted and the receiver acknowledges (or fails) it again.
pub const PENDING_CONTROL_FRAMES_MAX: usize = 65_536;

/// Most bytes of Error frames waiting for transmission (their encoded size). Counting frames
/// alone bounds nothing: a peer that stops reading and sends tiny messages to a service it may
/// not reach is answered with an Error of up to `DESCRIPTION_BYTES_MAX` each. Past it new ones
/// are dropped, as past [`PENDING_CONTROL_FRAMES_MAX`].
pub const PENDING_ERROR_BYTES_MAX: usize = 1024 * 1024;

const _: () = assert!(IN_FLIGHT_BYTES_MAX >= MESSAGE_BODY_BYTES_MAX);
const _: () = assert!(
    IN_FLIGHT_BYTES_MAX
        + (IN_FLIGHT_BYTES_MAX / FRAGMENT_BODY_BYTES_MAX + 1)
            * (REASSEMBLY_ENTRY_OVERHEAD_BYTES + REASSEMBLY_MESSAGE_OVERHEAD_BYTES)
        <= REASSEMBLY_BYTES_MAX
);
const _: () = assert!(TRANSMIT_BYTES_MAX >= FRAME_BYTES_MAX);

/// A message the engine hands over for transmission (a transmission-queue row).
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// The engine's key for the row; [`Event::Acknowledged`] names it.
    pub id: u64,
    pub header: MessageHeader,
    /// Borrowed from the log where the message is stored (no copy per transmission).
    pub body: RecordBytes,
}

/// A whole message received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    pub header: MessageHeader,
    pub body: Vec<u8>,
    /// The sending node's broker instance, from its Hello.
    pub source_broker_instance: [u8; 16],
}

/// What the session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's Hello arrived and its version matches.
    Connected { peer_broker_instance: [u8; 16] },
    /// A whole message arrived. The engine enqueues it (or drops it as a duplicate or gap) and,
    /// once that is durable, calls [`PeerSession::acknowledge`].
    Received(IncomingMessage),
    /// The peer durably holds the message the engine sent as `id`: delete its row.
    Acknowledged {
        id: u64,
        far_broker_instance: [u8; 16],
    },
    /// The peer's broker reports an error on a conversation.
    RemoteError {
        conversation_id: [u8; 16],
        from_initiator: bool,
        code: i32,
        description: String,
    },
    /// The peer is shutting down: it will send no more messages, and this session sends it none
    /// either until the next connection.
    PeerGoingAway,
}

/// A conversation direction: (conversation id, from initiator).
type Direction = ([u8; 16], bool);

/// The state of one connection to one peer. See the module documentation.
#[derive(Debug)]
pub struct PeerSession {
    broker_instance: [u8; 16],
    decoder: FrameDecoder,
    /// The peer's broker instance, once its Hello arrived.
    peer: Option<[u8; 16]>,
    reassembler: Reassembler,
    hello_sent: bool,
    /// The names of the last Message frame written with its names in the batch being built: a
    /// Message with the same leaves them out (`FLAG_NAMES_AS_BEFORE`).
    last_sent_names: Option<[Arc<str>; 4]>,
    go_away: GoAway,
    peer_going_away: bool,
    /// Unacknowledged messages by send order.
    messages: SendOrderSlots<Pending>,
    /// Unacknowledged messages by conversation direction: (sequence, send order), ascending by
    /// sequence. An Ack removes a prefix.
    by_conversation: IdMap<Direction, VecDeque<(u64, u64)>>,
    /// No message at or after this send order has been completely transmitted on this
    /// connection: the next new message to transmit is the first one from here.
    first_unsent: u64,
    /// Messages due for retransmission (their timers fired), by send order; every one is before
    /// `first_unsent`, so they go first.
    retransmit: BTreeSet<u64>,
    /// Retransmission deadlines: one queue per backoff step. All entries of a step have the
    /// same delay, so each queue is in deadline order. Entries are removed lazily: one is live
    /// while its message still has that `retry_at`; the fronts are kept live (`prune_timers`).
    timers: [VecDeque<(Instant, u64)>; BACKOFF_STEPS],
    next_order: u64,
    in_flight_bytes: usize,
    /// Acks to send, coalesced per conversation direction, in the order first asked for.
    acks: IdMap<Direction, u64>,
    ack_order: VecDeque<Direction>,
    errors: VecDeque<ErrorFrame>,
    /// Encoded bytes of `errors` (see [`PENDING_ERROR_BYTES_MAX`]).
    error_bytes: usize,
    events: VecDeque<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GoAway {
    No,
    Queued,
    Sent,
}

#[derive(Debug)]
struct Pending {
    id: u64,
    /// (conversation id, from initiator) and sequence: its entry in `by_conversation`.
    conversation: Direction,
    sequence: u64,
    /// The Message frame's header fields (checked by `send`), encoded with each fragment.
    header: MessageHeader,
    body: RecordBytes,
    /// Next body byte to transmit; 0 when not being transmitted.
    next_offset: usize,
    /// Counted in `in_flight_bytes`: (partly) transmitted on this connection.
    in_flight: bool,
    /// Retransmissions so far on this connection: the backoff exponent.
    retries: u32,
    retry_at: Option<Instant>,
}

impl PeerSession {
    /// A session for a new connection; `broker_instance` is this node's id.
    pub fn new(broker_instance: [u8; 16]) -> PeerSession {
        PeerSession {
            broker_instance,
            decoder: FrameDecoder::new(),
            peer: None,
            reassembler: Reassembler::new(),
            hello_sent: false,
            last_sent_names: None,
            go_away: GoAway::No,
            peer_going_away: false,
            messages: SendOrderSlots::default(),
            by_conversation: IdMap::default(),
            first_unsent: 0,
            retransmit: BTreeSet::new(),
            timers: Default::default(),
            next_order: 0,
            in_flight_bytes: 0,
            acks: IdMap::default(),
            ack_order: VecDeque::new(),
            errors: VecDeque::new(),
            error_bytes: 0,
            events: VecDeque::new(),
        }
    }

    /// Queues a message for transmission after every message given before it. Fails, leaving
    /// the session as it was, if a name or the body is over its limit, the same (conversation,
    /// direction, sequence) is already queued, or the queue is full.
    pub fn send(&mut self, message: OutgoingMessage) -> Result<()> {
        frame::check_message_header(&message.header, message.body.len())?;
        let conversation = (
            message.header.conversation_id,
            message.header.from_initiator,
        );
        let sequence = message.header.sequence;
        let place = match self.by_conversation.get(&conversation) {
            // Usually after the last: a conversation's messages are given in sequence order.
            Some(seqs) if seqs.back().is_none_or(|&(last, _)| last < sequence) => Err(seqs.len()),
            Some(seqs) => seqs.binary_search_by_key(&sequence, |&(seq, _)| seq),
            None => Err(0),
        };
        let Err(place) = place else {
            return Err(Error::AlreadyQueued {
                conversation_id: conversation.0,
                from_initiator: conversation.1,
                sequence,
            });
        };
        if self.messages.len() >= SEND_QUEUE_MESSAGES_MAX {
            return Err(Error::SendQueueFull {
                max: SEND_QUEUE_MESSAGES_MAX,
            });
        }
        let order = self.next_order;
        self.next_order += 1;
        // Usually at the back: a conversation's messages are given in sequence order.
        self.by_conversation
            .entry(conversation)
            .or_default()
            .insert(place, (sequence, order));
        self.messages.push(
            order,
            Pending {
                id: message.id,
                conversation,
                sequence,
                header: message.header,
                body: message.body,
                next_offset: 0,
                in_flight: false,
                retries: 0,
                retry_at: None,
            },
        );
        Ok(())
    }

    /// Takes back messages given to `send` that the engine no longer wants sent (it dropped
    /// them unacknowledged: their dialog ended with an error or cleanup, or its lifetime
    /// passed): they are never transmitted again and never reported acknowledged. Unknown ids
    /// (acknowledged meanwhile, or never sent) are ignored. Returns how many were withdrawn.
    /// A message withdrawn in the middle of its fragments leaves a partial message at the
    /// peer, which its reassembly budget drops in time (nothing of it was acknowledged).
    pub fn withdraw(&mut self, ids: &[u64]) -> usize {
        if ids.is_empty() || self.messages.is_empty() {
            return 0;
        }
        let ids: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let orders: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, pending)| ids.contains(&pending.id))
            .map(|(order, _)| order)
            .collect();
        for &order in &orders {
            let Some(pending) = self.messages.remove(order) else {
                continue;
            };
            self.retransmit.remove(&order);
            if pending.in_flight {
                self.in_flight_bytes -= pending.body.len();
            }
            let key = pending.conversation;
            if let Some(seqs) = self.by_conversation.get_mut(&key) {
                if let Ok(at) = seqs.binary_search_by_key(&pending.sequence, |&(seq, _)| seq) {
                    seqs.remove(at);
                }
                if seqs.is_empty() {
                    self.by_conversation.remove(&key);
                }
            }
        }
        self.prune_timers();
        orders.len()
    }

    /// Queues a cumulative Ack: every message of this conversation direction up to `sequence`
    /// is durably received here. Call only after the commit that holds them is durable. Acks of
    /// one conversation direction coalesce to the highest sequence.
    pub fn acknowledge(&mut self, conversation_id: [u8; 16], from_initiator: bool, sequence: u64) {
        self.reassembler
            .discard_through(conversation_id, from_initiator, sequence);
        let key = (conversation_id, from_initiator);
        if let Some(queued) = self.acks.get_mut(&key) {
            *queued = (*queued).max(sequence);
        } else if self.acks.len() < PENDING_CONTROL_FRAMES_MAX {
            self.acks.insert(key, sequence);
            self.ack_order.push_back(key);
        } else {
            tracing::warn!(
                conversation = %uuid::Uuid::from_bytes(conversation_id),
                "too many acks pending: dropping one (the peer will retransmit)"
            );
        }
    }

    /// Queues a broker-generated Error frame about a conversation (`from_initiator`: this
    /// frame's direction). Fails if the code is not negative or the description too long.
    pub fn send_error(
        &mut self,
        conversation_id: [u8; 16],
        from_initiator: bool,
        code: i32,
        description: impl Into<String>,
    ) -> Result<()> {
        let description = description.into();
        frame::check_error(code, &description)?;
        let bytes = error_frame_bytes(&description);
        if self.errors.len() >= PENDING_CONTROL_FRAMES_MAX
            || self.error_bytes + bytes > PENDING_ERROR_BYTES_MAX
        {
            tracing::warn!("too many error frames pending: dropping one");
            return Ok(());
        }
        self.error_bytes += bytes;
        self.errors.push_back(ErrorFrame {
            conversation_id,
            from_initiator,
            code,
            description,
        });
        Ok(())
    }

    /// Starts a clean shutdown: a GoAway is sent, and no message after it on this connection.
    pub fn close(&mut self) {
        if self.go_away == GoAway::No {
            self.go_away = GoAway::Queued;
        }
    }

    /// Feeds bytes received from the peer, in whatever chunks they came. An error is a protocol
    /// violation: close the connection and [`reset`](PeerSession::reset).
    pub fn handle_bytes(&mut self, now: Instant, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            match self.decoder.decode(&mut bytes)? {
                Some(frame) => self.handle(now, frame)?,
                None => break,
            }
        }
        Ok(())
    }

    /// Handles one frame from the peer. `now` is the arrival time; this version keeps no
    /// receive-side timers, but takes it so that drivers need not change when it does.
    pub fn handle(&mut self, now: Instant, frame: Frame) -> Result<()> {
        let _ = now;
        let Some(peer) = self.peer else {
            return match frame {
                Frame::Hello(hello) => self.handle_hello(hello),
                other => Err(Error::HelloExpected {
                    found: other.kind_name(),
                }),
            };
        };
        match frame {
            Frame::Hello(_) => return Err(Error::DuplicateHello),
            Frame::Message(fragment) => {
                if let Some((header, body)) = self.reassembler.push(fragment)? {
                    self.events.push_back(Event::Received(IncomingMessage {
                        header,
                        body,
                        source_broker_instance: peer,
                    }));
                }
            }
            Frame::Ack(ack) if ack.broker_instance != peer => {
                return Err(Error::AckBrokerMismatch {
                    ack: ack.broker_instance,
                    hello: peer,
                });
            }
            Frame::Ack(ack) => self.handle_ack(ack),
            Frame::Error(e) => self.events.push_back(Event::RemoteError {
                conversation_id: e.conversation_id,
                from_initiator: e.from_initiator,
                code: e.code,
                description: e.description,
            }),
            Frame::GoAway => {
                if !self.peer_going_away {
                    self.peer_going_away = true;
                    self.events.push_back(Event::PeerGoingAway);
                }
            }
        }
        Ok(())
    }

    /// Whether frames that input can queue wait for [`poll_transmit`](PeerSession::poll_transmit):
    /// the Hello, Acks, Error frames, the GoAway. (Messages wait too after `send`, whose caller
    /// wakes the writer, and after an acknowledgement opened the window, which the driver sees
    /// as an [`Event::Acknowledged`].) A driver that has only handed input over needs to wake
    /// its writer only then: most input is messages, whose acknowledgements come later.
    pub fn has_control_frames(&self) -> bool {
        !self.hello_sent
            || !self.ack_order.is_empty()
            || !self.errors.is_empty()
            || self.go_away == GoAway::Queued
    }

    /// The bytes to write to the peer now, if any: the Hello first on a new connection, then
    /// Acks, Error frames, a GoAway, and message fragments in send order, batched up to
    /// [`TRANSMIT_BYTES_MAX`]. Retransmission timers of messages completed here start at `now`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        // Names are left out only after a Message of the same batch: each batch decodes on its
        // own, whatever happened to the ones before it.
        self.last_sent_names = None;
        if !self.hello_sent {
            self.hello_sent = true;
            encode_control(
                &mut out,
                &Frame::Hello(Hello {
                    protocol_version: PROTOCOL_VERSION,
                    broker_instance: self.broker_instance,
                }),
            );
        }
        while let Some(&key) = self.ack_order.front() {
            let Some(&sequence) = self.acks.get(&key) else {
                self.ack_order.pop_front();
                continue;
            };
            let ack = Frame::Ack(Ack {
                conversation_id: key.0,
                from_initiator: key.1,
                sequence,
                broker_instance: self.broker_instance,
            });
            if !fits(&out, ACK_FRAME_BYTES) {
                return Some(out);
            }
            encode_control(&mut out, &ack);
            self.acks.remove(&key);
            self.ack_order.pop_front();
        }
        while let Some(error) = self.errors.front() {
            let frame = Frame::Error(error.clone());
            if !fits(&out, ERROR_FRAME_BYTES_BOUND) {
                return Some(out);
            }
            encode_control(&mut out, &frame);
            if let Some(sent) = self.errors.pop_front() {
                self.error_bytes -= error_frame_bytes(&sent.description);
            }
        }
        if self.go_away == GoAway::Queued {
            if !fits(&out, frame::FRAME_HEADER_BYTES) {
                return Some(out);
            }
            self.go_away = GoAway::Sent;
            encode_control(&mut out, &Frame::GoAway);
        }
        if self.go_away == GoAway::No && !self.peer_going_away && self.has_messages_to_transmit() {
            // One allocation of the largest batch, trimmed to what was used: growing by
            // doubling would copy the batch about once more on its way to the wire.
            out.reserve(TRANSMIT_BYTES_MAX - out.len());
            self.transmit_messages(now, &mut out);
            out.shrink_to_fit();
        }
        (!out.is_empty()).then_some(out)
    }

    /// When [`handle_timeout`](PeerSession::handle_timeout) should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.earliest_timer().map(|(_, at)| at)
    }

    /// Makes every message whose retransmission time has come due for transmission again; the
    /// next [`poll_transmit`](PeerSession::poll_transmit) sends them, in send order.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((step, at)) = self.earliest_timer() {
            if at > now {
                break;
            }
            let (_, order) = self.timers[step]
                .pop_front()
                .expect("the earliest timer is a queue's front");
            if let Some(pending) = self
                .messages
                .get_mut(order)
                .filter(|pending| pending.retry_at == Some(at))
            {
                pending.retry_at = None;
                pending.retries = pending.retries.saturating_add(1);
                tracing::debug!(
                    id = pending.id,
                    retries = pending.retries,
                    "message unacknowledged: retransmitting"
                );
                self.retransmit.insert(order);
            }
            self.prune_timers();
        }
    }

    /// The next event for the driver, if any. Drain after every `handle*` and `handle_timeout`.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The connection was lost: every unacknowledged message becomes unsent (to be sent first,
    /// in send order, on the next connection, with the backoff started again), partial messages
    /// and the handshake are dropped. Pending Acks and Error frames are kept for the next
    /// connection.
    pub fn reset(&mut self) {
        self.decoder = FrameDecoder::new();
        self.last_sent_names = None;
        self.peer = None;
        self.reassembler.clear();
        self.hello_sent = false;
        self.go_away = GoAway::No;
        self.peer_going_away = false;
        self.timers = Default::default();
        self.retransmit.clear();
        self.first_unsent = self.messages.first_order().unwrap_or(self.next_order);
        self.in_flight_bytes = 0;
        for pending in self.messages.values_mut() {
            pending.next_offset = 0;
            pending.in_flight = false;
            pending.retries = 0;
            pending.retry_at = None;
        }
    }

    /// This node's broker instance.
    pub fn broker_instance(&self) -> [u8; 16] {
        self.broker_instance
    }

    /// The peer's broker instance, once its Hello arrived on this connection.
    pub fn peer_broker_instance(&self) -> Option<[u8; 16]> {
        self.peer
    }

    /// Body bytes transmitted on this connection and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Messages given to `send` and not yet acknowledged.
    pub fn unacknowledged_messages(&self) -> usize {
        self.messages.len()
    }

    /// The reassembly state of messages arriving from the peer.
    pub fn reassembler(&self) -> &Reassembler {
        &self.reassembler
    }

    fn handle_hello(&mut self, hello: Hello) -> Result<()> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                found: hello.protocol_version,
                supported: PROTOCOL_VERSION,
            });
        }
        self.peer = Some(hello.broker_instance);
        self.events.push_back(Event::Connected {
            peer_broker_instance: hello.broker_instance,
        });
        Ok(())
    }

    /// Removes every message the Ack covers; an Ack that covers nothing (a repeat) is ignored.
    fn handle_ack(&mut self, ack: Ack) {
        let key = (ack.conversation_id, ack.from_initiator);
        let Some(seqs) = self.by_conversation.get_mut(&key) else {
            return;
        };
        let covered = seqs.partition_point(|&(seq, _)| seq <= ack.sequence);
        if covered == 0 {
            return;
        }
        let covered: Vec<u64> = seqs.drain(..covered).map(|(_, order)| order).collect();
        if seqs.is_empty() {
            self.by_conversation.remove(&key);
        }
        for order in covered {
            let Some(pending) = self.messages.remove(order) else {
                continue;
            };
            if pending.retries > 0 {
                self.retransmit.remove(&order);
            }
            if pending.in_flight {
                self.in_flight_bytes -= pending.body.len();
            }
            self.events.push_back(Event::Acknowledged {
                id: pending.id,
                far_broker_instance: ack.broker_instance,
            });
        }
        self.prune_timers();
    }

    /// The earliest retransmission deadline and its backoff step, if any.
    fn earliest_timer(&self) -> Option<(usize, Instant)> {
        self.timers
            .iter()
            .enumerate()
            .filter_map(|(step, queue)| queue.front().map(|&(at, _)| (step, at)))
            .min_by_key(|&(_, at)| at)
    }

    /// Drops timer entries whose message was acknowledged, withdrawn or rescheduled: from each
    /// queue's front (so that the fronts are live and `poll_timeout` exact), and everywhere in
    /// a queue that holds more than twice as many entries as there are messages (so that the
    /// queues stay within a bound of the send queue's size).
    fn prune_timers(&mut self) {
        let messages = &self.messages;
        let live = |&(at, order): &(Instant, u64)| {
            messages
                .get(order)
                .is_some_and(|pending| pending.retry_at == Some(at))
        };
        for queue in &mut self.timers {
            while queue.front().is_some_and(|entry| !live(entry)) {
                queue.pop_front();
            }
            if queue.len() > 2 * messages.len() + TIMER_QUEUE_SLACK_ENTRIES {
                queue.retain(live);
            }
        }
    }

    /// Whether a retransmission is due or a message was never completely transmitted (the
    /// in-flight bound may still hold it back).
    fn has_messages_to_transmit(&self) -> bool {
        !self.retransmit.is_empty() || self.messages.first_from(self.first_unsent).is_some()
    }

    /// Appends message fragments in send order while the batch and the in-flight window allow.
    fn transmit_messages(&mut self, now: Instant, out: &mut Vec<u8>) {
        loop {
            // Due retransmissions are all before `first_unsent`: in send order, they go first.
            let retransmission = self.retransmit.first().copied();
            let (order, pending) = match retransmission {
                Some(order) => {
                    let pending = self
                        .messages
                        .get_mut(order)
                        .expect("every order due for retransmission names a message");
                    (order, pending)
                }
                None => match self.messages.first_from_mut(self.first_unsent) {
                    Some((order, pending)) => {
                        // Past the slots of messages acknowledged or withdrawn before they
                        // went, so that the next look does not step over them again.
                        self.first_unsent = order;
                        (order, pending)
                    }
                    None => return,
                },
            };
            let body_bytes = pending.body.len();
            if !pending.in_flight {
                // Messages become in flight in send order, so every retransmission is ahead of
                // this one: stopping here delays nothing that could go.
                if self.in_flight_bytes > 0
                    && self.in_flight_bytes + body_bytes > IN_FLIGHT_BYTES_MAX
                {
                    return;
                }
                pending.in_flight = true;
                self.in_flight_bytes += body_bytes;
            }
            loop {
                let fragment_bytes =
                    (body_bytes - pending.next_offset).min(FRAGMENT_BODY_BYTES_MAX);
                let names_as_before = self
                    .last_sent_names
                    .as_ref()
                    .is_some_and(|last| same_names(last, &pending.header));
                if !fits(
                    out,
                    frame::message_frame_bytes(&pending.header, fragment_bytes, names_as_before),
                ) {
                    return;
                }
                let offset = pending.next_offset;
                frame::encode_message_fragment(
                    out,
                    &pending.header,
                    body_bytes as u32,
                    offset as u32,
                    &pending.body[offset..offset + fragment_bytes],
                    names_as_before,
                )
                .expect("send checked the names and body length; fragments stay within limits");
                if !names_as_before {
                    self.last_sent_names = Some(message_names(&pending.header));
                }
                pending.next_offset += fragment_bytes;
                if pending.next_offset >= body_bytes {
                    break;
                }
            }
            pending.next_offset = 0;
            let step = (pending.retries as usize).min(BACKOFF_STEPS - 1);
            let queue = &mut self.timers[step];
            // A queue stays in deadline order even if `now` went backwards (it never does
            // with a monotonic clock): the deadline is then no earlier than the last one's.
            let at = (now + retry_delay(pending.retries))
                .max(queue.back().map_or(now, |&(last, _)| last));
            pending.retry_at = Some(at);
            queue.push_back((at, order));
            if retransmission.is_some() {
                self.retransmit.remove(&order);
            } else {
                self.first_unsent = order + 1;
            }
        }
    }
}

/// Distinct retransmission delays (1, 2, 4, …, 32 s, then [`RETRY_DELAY_MAX`] for every later
/// one): a timer queue each.
const BACKOFF_STEPS: usize = 7;

/// A timer queue is cleaned through (not only at its front) once it holds more than twice the
/// unacknowledged messages plus this many entries.
const TIMER_QUEUE_SLACK_ENTRIES: usize = 64;

/// The delay before retransmission number `retries + 1`.
pub fn retry_delay(retries: u32) -> Duration {
    let factor = 1u32.checked_shl(retries).unwrap_or(u32::MAX);
    RETRY_DELAY_INITIAL
        .saturating_mul(factor)
        .min(RETRY_DELAY_MAX)
}

const ACK_FRAME_BYTES: usize = frame::FRAME_HEADER_BYTES + 16 + 1 + 8 + 16;
/// Encoded bytes of an Error frame with `description`.
fn error_frame_bytes(description: &str) -> usize {
    ERROR_FRAME_BYTES_BOUND - frame::DESCRIPTION_BYTES_MAX + description.len()
}

const ERROR_FRAME_BYTES_BOUND: usize =
    frame::FRAME_HEADER_BYTES + 16 + 1 + 4 + 2 + frame::DESCRIPTION_BYTES_MAX;

/// Whether a frame of `bytes` may join the batch: it stays within [`TRANSMIT_BYTES_MAX`], or is
/// the batch's first frame (every frame is within [`FRAME_BYTES_MAX`], which fits).
/// A Message's four names, in wire order.
fn message_names(header: &MessageHeader) -> [Arc<str>; 4] {
    [
        header.source_service.clone(),
        header.target_service.clone(),
        header.contract.clone(),
        header.message_type.clone(),
    ]
}

/// Whether `header` has the names `last`.
fn same_names(last: &[Arc<str>; 4], header: &MessageHeader) -> bool {
    let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || **a == **b;
    same(&last[0], &header.source_service)
        && same(&last[1], &header.target_service)
        && same(&last[2], &header.contract)
        && same(&last[3], &header.message_type)
}

fn fits(out: &[u8], bytes: usize) -> bool {
    out.is_empty() || out.len() + bytes <= TRANSMIT_BYTES_MAX
}

/// Encodes a frame built by the session itself, whose fields were checked when queued.
fn encode_control(out: &mut Vec<u8>, frame: &Frame) {
    frame
        .encode(out)
        .expect("control frames are checked when queued and far below the frame limit");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_one_second_and_stays_at_sixty() {
        let secs: Vec<u64> = (0..10).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(retry_delay(31), RETRY_DELAY_MAX);
        assert_eq!(retry_delay(32), RETRY_DELAY_MAX);
        // Every step from BACKOFF_STEPS - 1 on has the same delay: one timer queue serves them.
        assert!(retry_delay(BACKOFF_STEPS as u32 - 2) < RETRY_DELAY_MAX);
        assert_eq!(retry_delay(BACKOFF_STEPS as u32 - 1), RETRY_DELAY_MAX);
    }

    fn message(id: u64, conversation: u8, sequence: u64) -> OutgoingMessage {
        OutgoingMessage {
            id,
            header: MessageHeader {
                conversation_id: [conversation; 16],
                from_initiator: true,
                sequence,
                source_service: "//s/From".into(),
                target_service: "//s/To".into(),
                contract: "//s/Contract".into(),
                message_type: "//s/Type".into(),
                target_broker_instance: None,
                lifetime_deadline_secs: 0,
            },
            body: vec![7u8; 10].into(),
        }
    }

    fn ack(session: &mut PeerSession, conversation: u8, sequence: u64) {
        session.handle_ack(Ack {
            conversation_id: [conversation; 16],
            from_initiator: true,
            sequence,
            broker_instance: [9; 16],
        });
    }

    #[test]
    fn only_control_frames_ask_for_the_writer_after_input() {
        let now = Instant::now();
        let (mut sender, mut receiver) = (PeerSession::new([1; 16]), PeerSession::new([2; 16]));
        assert!(receiver.has_control_frames(), "the Hello waits");
        let hello = receiver.poll_transmit(now).expect("the Hello");
        assert!(!receiver.has_control_frames());
        sender.handle_bytes(now, &hello).expect("a Hello");
        sender.send(message(0, 1, 0)).expect("queued");
        let bytes = sender
            .poll_transmit(now)
            .expect("the Hello and the message");
        receiver
            .handle_bytes(now, &bytes)
            .expect("a Hello and a message");
        let mut received = 0;
        while let Some(event) = receiver.poll_event() {
            received += matches!(event, Event::Received(_)) as usize;
        }
        assert_eq!(received, 1);
        assert!(
            !receiver.has_control_frames(),
            "a message asks for nothing until it is acknowledged"
        );
        receiver.acknowledge([1; 16], true, 0);
        assert!(receiver.has_control_frames(), "the Ack waits");
        let ack = receiver.poll_transmit(now).expect("the Ack");
        assert!(!receiver.has_control_frames());
        sender.handle_bytes(now, &ack).expect("an Ack");
        assert!(
            std::iter::from_fn(|| sender.poll_event())
                .any(|e| matches!(e, Event::Acknowledged { id: 0, .. }))
        );
    }

    #[test]
    fn timer_queues_stay_bounded_behind_an_old_unacknowledged_message() {
        let mut session = PeerSession::new([1; 16]);
        let now = Instant::now();
        // The oldest timer's message stays unacknowledged, so acknowledged ones behind it
        // cannot leave the queue from its front.
        session.send(message(0, 1, 1)).expect("queued");
        let mut id = 1;
        for round in 0..50u64 {
            for n in 1..=100 {
                session
                    .send(message(id, 2, round * 100 + n))
                    .expect("queued");
                id += 1;
            }
            while session.poll_transmit(now).is_some() {}
            ack(&mut session, 2, round * 100 + 100);
            let entries: usize = session.timers.iter().map(VecDeque::len).sum();
            assert!(
                entries <= 2 * session.messages.len() + TIMER_QUEUE_SLACK_ENTRIES,
                "{entries} timer entries for {} messages",
                session.messages.len()
            );
        }
        assert_eq!(session.unacknowledged_messages(), 1);
        assert_eq!(session.poll_timeout(), Some(now + RETRY_DELAY_INITIAL));
        ack(&mut session, 1, 1);
        assert_eq!(session.poll_timeout(), None);
        assert!(session.timers.iter().all(VecDeque::is_empty));
    }

    #[test]
    fn a_timer_of_an_acknowledged_message_never_fires() {
        let mut session = PeerSession::new([1; 16]);
        let now = Instant::now();
        session.send(message(1, 1, 1)).expect("queued");
        session.send(message(2, 2, 1)).expect("queued");
        while session.poll_transmit(now).is_some() {}
        ack(&mut session, 1, 1);
        while session.poll_event().is_some() {}
        // Only message 2's timer is left; at its deadline only it becomes due again.
        assert_eq!(session.poll_timeout(), Some(now + RETRY_DELAY_INITIAL));
        session.handle_timeout(now + RETRY_DELAY_INITIAL);
        assert_eq!(session.retransmit.iter().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(session.poll_timeout(), None);
        // Retransmitted, its next timer is on the next step of the backoff.
        let later = now + RETRY_DELAY_INITIAL;
        assert!(session.poll_transmit(later).is_some());
        assert_eq!(session.poll_timeout(), Some(later + retry_delay(1)));
    }

    #[test]
    fn a_batch_takes_a_frame_only_within_the_bound_unless_it_is_empty() {
        assert!(fits(&[], FRAME_BYTES_MAX));
        let half = vec![0; TRANSMIT_BYTES_MAX / 2];
        assert!(fits(&half, TRANSMIT_BYTES_MAX / 2));
        assert!(!fits(&half, TRANSMIT_BYTES_MAX / 2 + 1));
    }

    #[test]
    fn a_batch_holds_no_more_memory_than_its_bytes() {
        // The batch is reserved at TRANSMIT_BYTES_MAX and handed to the transport, which keeps
        // it until the peer has it: a small batch must not keep the whole reservation.
        let mut session = PeerSession::new([1; 16]);
        let now = Instant::now();
        session.send(message(1, 1, 1)).expect("queued");
        let batch = session
            .poll_transmit(now)
            .expect("the Hello and one message");
        assert!(batch.len() < 200, "{} bytes", batch.len());
        assert_eq!(batch.capacity(), batch.len());
        // A full batch stops at the bound.
        for n in 0..2000u64 {
            let mut m = message(100 + n, 2, n + 1);
            m.body = vec![7u8; 1024].into();
            session.send(m).expect("queued");
        }
        let batch = session.poll_transmit(now).expect("messages");
        assert!(batch.len() <= TRANSMIT_BYTES_MAX);
        assert!(batch.len() > TRANSMIT_BYTES_MAX - FRAME_BYTES_MAX);
        assert_eq!(batch.capacity(), batch.len());
    }
}
