//! The committed state: catalog, conversation endpoints, conversation groups and the queue
//! indexes. Messages are not copied here: each queued message holds its body as bytes borrowed
//! from the log (`RecordBytes`), which keep their segment mapped until the message is gone.
//!
//! `apply` is the only way the state changes, for a commit as for a replayed record: the two
//! cannot drift apart. It assumes the ops were validated when the transaction made them (or, on
//! replay, when the original transaction did); an op that no longer fits (a dialog naming a
//! service dropped since) is a corrupt log, reported, never a panic.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use herald_wal::{Lsn, Position, RecordBytes};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::ids::{
    BrokerInstanceId, ConversationGroupId, ConversationHandle, ConversationId, IdMap,
};
use crate::record::{End, Op};
use crate::system;

/// Where a conversation endpoint is in its life (Service Broker's `state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    /// SO: initiator, nothing sent yet.
    StartedOutbound,
    /// SI: target created, first message not complete yet (only across nodes).
    StartedInbound,
    /// CO: both sides may send.
    Conversing,
    /// DI: the far side ended the conversation.
    DisconnectedInbound,
    /// DO: this side ended, waiting for the far side's acknowledgement.
    DisconnectedOutbound,
    /// ER: an error ended the conversation.
    Error,
    /// CD: closed.
    Closed,
}

impl EndpointState {
    /// Every state, in Service Broker's order (the life of a conversation).
    pub const ALL: [EndpointState; 7] = [
        EndpointState::StartedOutbound,
        EndpointState::StartedInbound,
        EndpointState::Conversing,
        EndpointState::DisconnectedInbound,
        EndpointState::DisconnectedOutbound,
        EndpointState::Error,
        EndpointState::Closed,
    ];

    /// The state of a two-letter code (`"CO"`), as [`EndpointState::code`] writes it.
    pub fn from_code(code: &str) -> Option<EndpointState> {
        EndpointState::ALL
            .into_iter()
            .find(|state| state.code() == code)
    }

    /// `sys.conversation_endpoints`' `state_desc` (`CONVERSING`).
    pub fn description(self) -> &'static str {
        match self {
            EndpointState::StartedOutbound => "STARTED_OUTBOUND",
            EndpointState::StartedInbound => "STARTED_INBOUND",
            EndpointState::Conversing => "CONVERSING",
            EndpointState::DisconnectedInbound => "DISCONNECTED_INBOUND",
            EndpointState::DisconnectedOutbound => "DISCONNECTED_OUTBOUND",
            EndpointState::Error => "ERROR",
            EndpointState::Closed => "CLOSED",
        }
    }

    /// `sys.conversation_endpoints`' `state` (`CO`).
    pub fn code(self) -> &'static str {
        match self {
            EndpointState::StartedOutbound => "SO",
            EndpointState::StartedInbound => "SI",
            EndpointState::Conversing => "CO",
            EndpointState::DisconnectedInbound => "DI",
            EndpointState::DisconnectedOutbound => "DO",
            EndpointState::Error => "ER",
            EndpointState::Closed => "CD",
        }
    }

    /// Whether the application ended this side (END CONVERSATION): it is kept, closed, until
    /// the far side ends too.
    pub fn is_ended(self) -> bool {
        self == EndpointState::Closed
    }

    /// Whether messages from the far side are still accepted (not after this side ended or
    /// failed).
    pub fn accepts_messages(self) -> bool {
        !matches!(
            self,
            EndpointState::Error | EndpointState::Closed | EndpointState::DisconnectedOutbound
        )
    }

    /// Whether this side may still send.
    pub fn can_send(self) -> bool {
        matches!(
            self,
            EndpointState::StartedOutbound
                | EndpointState::StartedInbound
                | EndpointState::Conversing
        )
    }
}

/// One side of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub handle: ConversationHandle,
    pub conversation_id: ConversationId,
    pub is_initiator: bool,
    /// The local service this side belongs to (its queue receives this side's messages).
    // Shared, not owned: a transaction copies each endpoint it works on (twice for a SEND: loaded,
    // then re-read once its group is locked), and three string copies per endpoint were most
    // of a bulk sender's allocations.
    pub service: Arc<str>,
    pub far_service: Arc<str>,
    pub contract: Arc<str>,
    pub group: ConversationGroupId,
    pub state: EndpointState,
    /// Sequence number the next message sent from this side gets.
    pub send_sequence: u64,
    /// Sequence number of the next message this side will receive.
    pub receive_sequence: u64,
    /// The other side's handle when it lives on this broker; `None` when it lives on another
    /// (messages to it go through the transmission queue).
    pub far_handle: Option<ConversationHandle>,
    /// The broker hosting the far side, once known (named at BEGIN DIALOG, or learned from its
    /// first acknowledgement: the dialog is pinned to it from then on). `None` for local dialogs.
    pub far_broker_instance: Option<BrokerInstanceId>,
    /// Remote dialogs: the far side has taken part — it acknowledged a message of this side, or
    /// its first message created this side. Routes that expired since still serve an
    /// established dialog: Service Broker ignores expired routes for *new* conversations only
    /// (reference §1.5). Implies `far_broker_instance` is known.
    pub established: bool,
    /// Remote dialogs: the sequence number of the next message expected from the far side
    /// (earlier ones are duplicates, later ones wait for the gap to fill).
    pub arrived_sequence: u64,
    /// When the dialog's lifetime ends (milliseconds since the UNIX epoch), until it has.
    pub expires_at_ms: Option<u64>,
    /// When this side's conversation timer fires, if one is set.
    pub dialog_timer_ms: Option<u64>,
    /// 1..=10, from the best matching broker priority when the endpoint was created.
    pub priority: u8,
}

impl Endpoint {
    /// Whether a far broker's Error (`Op::Fail`) still changes this side: it fails one that
    /// takes messages, and lets go of one that ended and waits for the far side; anything else
    /// is past it.
    pub fn takes_far_error(&self) -> bool {
        self.state == EndpointState::DisconnectedOutbound || self.state.accepts_messages()
    }

    /// Where routing stands for this side's messages (see `established`).
    pub fn stage(&self) -> crate::catalog::ConversationStage {
        if self.established {
            crate::catalog::ConversationStage::Established
        } else {
            crate::catalog::ConversationStage::New
        }
    }
}

/// A message waiting in the transmission queue for a far side on another broker, until that
/// broker acknowledges it.
#[derive(Debug, Clone)]
pub struct Transmission {
    /// The sending endpoint.
    pub handle: ConversationHandle,
    pub sequence: u64,
    /// Its body, type and queuing order (the transmission queue's id).
    pub message: QueuedMessage,
}

/// The signal name (not a valid queue name: those cannot start with '#') that moves whenever
/// the transmission queue grows, for the node's sender to wait on.
pub const TRANSMISSION_SIGNAL: &str = "#transmission";

/// How long a remote conversation's id is remembered after its endpoint is removed, so that a
/// late or repeated message for it is acknowledged and dropped instead of starting a new
/// conversation (Service Broker keeps closed target endpoints about 30 minutes).
pub const CLOSED_CONVERSATION_LINGER_MS: u64 = 30 * 60 * 1000;

/// What a pending deadline does when it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeadlineKind {
    /// The conversation timer: a DialogTimer message.
    DialogTimer,
    /// The dialog lifetime: ERROR state and an Error message.
    Lifetime,
}

/// Where a message stands in its conversation's receive order; the derived order is
/// RECEIVE's: urgent system messages (DialogTimer, then Error, each by arrival) before the
/// sequenced ones, which come by sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MessageKey {
    Urgent {
        lane: UrgentLane,
        queuing_order: u64,
    },
    Sequence(u64),
    /// A message kept by RETENTION (received, or a copy of one sent): never received again.
    Retained {
        queuing_order: u64,
    },
    /// A message in the transmission queue (never received here; named for compaction).
    Outbound {
        id: u64,
    },
}

/// A message's `status` column, as Service Broker numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MessageStatus {
    /// 0: received, kept by RETENTION.
    Received = 0,
    /// 1: ready to be received.
    Ready = 1,
    /// 3: a copy of a message this side sent, kept by RETENTION.
    SentCopy = 3,
}

/// The two kinds of message delivered ahead of a conversation's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UrgentLane {
    DialogTimer,
    Error,
}

impl std::fmt::Display for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MessageKey::Sequence(sequence) => write!(f, "{sequence}"),
            MessageKey::Retained { queuing_order } => write!(f, "retained@{queuing_order}"),
            MessageKey::Outbound { id } => write!(f, "outbound@{id}"),
            MessageKey::Urgent {
                lane,
                queuing_order,
            } => write!(f, "{lane:?}@{queuing_order}"),
        }
    }
}

impl MessageKey {
    /// The sequence number RECEIVE reports: urgent system messages are not sequenced and
    /// report 0.
    pub fn sequence(self) -> u64 {
        match self {
            MessageKey::Sequence(sequence) => sequence,
            MessageKey::Urgent { .. }
            | MessageKey::Retained { .. }
            | MessageKey::Outbound { .. } => 0,
        }
    }
}

/// A message waiting in a queue: 56 bytes, one per queued message, so kept compact (its
/// sequence number is its place in its conversation's queue, its type an index).
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub body: RecordBytes,
    /// Offset of the body's commit record in its segment.
    record_offset: u32,
    /// Offset of the body in that record's payload.
    body_start: u32,
    /// The segment holding that record.
    segment: Lsn,
    pub message_type: MessageTypeId,
    /// Order of arrival in its queue.
    pub queuing_order: u64,
}

impl QueuedMessage {
    pub fn new(
        body: RecordBytes,
        location: BodyLocation,
        message_type: MessageTypeId,
        queuing_order: u64,
    ) -> QueuedMessage {
        QueuedMessage {
            body,
            record_offset: location.record.offset,
            body_start: location.start,
            segment: location.record.segment,
            message_type,
            queuing_order,
        }
    }

    /// Damages the recorded location (tests of `invariants::check`).
    #[cfg(test)]
    pub(crate) fn shift_body_start_for_test(&mut self) {
        self.body_start += 1;
    }

    /// Where the body lies in the log, for checkpoints and reclamation.
    pub fn location(&self) -> BodyLocation {
        BodyLocation {
            record: Position {
                segment: self.segment,
                offset: self.record_offset,
            },
            start: self.body_start,
            len: self.body.len() as u32,
        }
    }
}

/// Index of a message type name in `State::message_type_names`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageTypeId(u32);

/// The messages of one conversation waiting in a queue. Sequenced messages are contiguous (a
/// conversation delivers in order, and RECEIVE takes from the front), so they sit in a dense
/// ring: message `first_sequence + i` is at index `i`. The few urgent system messages
/// (DialogTimer, Error) wait apart, in receive order, and come first.
#[derive(Debug, Clone)]
pub struct ConversationQueue {
    first_sequence: u64,
    messages: std::collections::VecDeque<QueuedMessage>,
    urgent: Vec<(MessageKey, QueuedMessage)>,
    /// Messages kept by RETENTION until the conversation ends: (status, sequence, message).
    retained: Vec<RetainedMessage>,
    /// The conversation's priority (its endpoint's), for picking groups.
    pub priority: u8,
}

/// A message kept by RETENTION: received (status 0) or a copy of one sent (status 3), with
/// its sequence number in its direction.
#[derive(Debug, Clone)]
pub struct RetainedMessage {
    pub status: MessageStatus,
    pub sequence: u64,
    pub message: QueuedMessage,
}

impl Default for ConversationQueue {
    fn default() -> ConversationQueue {
        ConversationQueue {
            first_sequence: 0,
            messages: Default::default(),
            urgent: Vec::new(),
            retained: Vec::new(),
            priority: crate::catalog::PRIORITY_LEVEL_DEFAULT,
        }
    }
}

impl ConversationQueue {
    /// Whether no message waits to be received (retained ones never are).
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.urgent.is_empty()
    }

    /// Messages waiting to be received.
    pub fn len(&self) -> usize {
        self.messages.len() + self.urgent.len()
    }

    /// Messages kept by RETENTION, oldest first.
    pub fn retained(&self) -> &[RetainedMessage] {
        &self.retained
    }

    /// Keeps a message by RETENTION.
    pub fn retain(&mut self, retained: RetainedMessage) {
        self.retained.push(retained);
    }

    /// The first message in receive order.
    pub fn first(&self) -> Option<(MessageKey, &QueuedMessage)> {
        match self.urgent.first() {
            Some((key, message)) => Some((*key, message)),
            None => self
                .messages
                .front()
                .map(|m| (MessageKey::Sequence(self.first_sequence), m)),
        }
    }

    pub fn pop_first(&mut self) -> Option<(MessageKey, QueuedMessage)> {
        if !self.urgent.is_empty() {
            return Some(self.urgent.remove(0));
        }
        self.pop_first_sequenced()
            .map(|(sequence, message)| (MessageKey::Sequence(sequence), message))
    }

    pub fn pop_first_sequenced(&mut self) -> Option<(u64, QueuedMessage)> {
        let message = self.messages.pop_front()?;
        let sequence = self.first_sequence;
        self.first_sequence += 1;
        Some((sequence, message))
    }

    /// Removes the urgent message that arrived with `queuing_order`.
    pub fn remove_urgent(&mut self, queuing_order: u64) -> Option<QueuedMessage> {
        let index = self
            .urgent
            .iter()
            .position(|(_, m)| m.queuing_order == queuing_order)?;
        Some(self.urgent.remove(index).1)
    }

    /// Adds a message: an urgent one at its place, a sequenced one at either end of the
    /// sequence (anything else would leave a gap).
    pub fn insert(&mut self, key: MessageKey, message: QueuedMessage) -> Result<(), String> {
        let sequence = match key {
            MessageKey::Retained { .. } | MessageKey::Outbound { .. } => {
                return Err(format!("message {key} inserted as waiting"));
            }
            MessageKey::Urgent { .. } => {
                let at = self.urgent.partition_point(|(k, _)| *k < key);
                self.urgent.insert(at, (key, message));
                return Ok(());
            }
            MessageKey::Sequence(sequence) => sequence,
        };
        if self.messages.is_empty() {
            self.first_sequence = sequence;
            self.messages.push_back(message);
        } else if sequence == self.first_sequence + self.messages.len() as u64 {
            self.messages.push_back(message);
        } else if sequence.checked_add(1) == Some(self.first_sequence) {
            self.messages.push_front(message);
            self.first_sequence = sequence;
        } else {
            return Err(format!(
                "message {sequence} is not next to the queued {}..{}",
                self.first_sequence,
                self.first_sequence + self.messages.len() as u64
            ));
        }
        Ok(())
    }

    pub fn get_mut(&mut self, key: MessageKey) -> Option<&mut QueuedMessage> {
        match key {
            MessageKey::Retained { queuing_order } => self
                .retained
                .iter_mut()
                .find(|r| r.message.queuing_order == queuing_order)
                .map(|r| &mut r.message),
            MessageKey::Outbound { .. } => None,
            MessageKey::Urgent { .. } => self
                .urgent
                .iter_mut()
                .find(|(k, _)| *k == key)
                .map(|(_, m)| m),
            MessageKey::Sequence(sequence) => {
                let index = sequence.checked_sub(self.first_sequence)?;
                self.messages.get_mut(usize::try_from(index).ok()?)
            }
        }
    }

    /// Messages with their keys, in receive order.
    pub fn iter(&self) -> impl Iterator<Item = (MessageKey, &QueuedMessage)> {
        let urgent = self.urgent.iter().map(|(k, m)| (*k, m));
        let sequenced = (self.first_sequence..)
            .zip(self.messages.iter())
            .map(|(sequence, m)| (MessageKey::Sequence(sequence), m));
        urgent.chain(sequenced)
    }

    /// Every message held, waiting ones in receive order, then retained ones.
    pub fn iter_with_retained(&self) -> impl Iterator<Item = (MessageKey, &QueuedMessage)> {
        self.iter().chain(self.retained.iter().map(|r| {
            (
                MessageKey::Retained {
                    queuing_order: r.message.queuing_order,
                },
                &r.message,
            )
        }))
    }

    /// Queuing order of the oldest message waiting.
    pub fn oldest(&self) -> Option<u64> {
        let urgent = self.urgent.iter().map(|(_, m)| m.queuing_order).min();
        let sequenced = self.messages.front().map(|m| m.queuing_order);
        match (urgent, sequenced) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops every message, retained ones included (END CONVERSATION purges this side's
    /// queue).
    pub fn clear(&mut self) {
        self.first_sequence += self.messages.len() as u64;
        self.messages.clear();
        self.urgent.clear();
        self.retained.clear();
    }

    #[cfg(test)]
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut QueuedMessage> {
        self.urgent
            .iter_mut()
            .map(|(_, m)| m)
            .chain(self.messages.iter_mut())
            .chain(self.retained.iter_mut().map(|r| &mut r.message))
    }

    /// The sequence numbers of the queued sequenced messages, oldest first.
    pub fn sequences(&self) -> std::ops::Range<u64> {
        self.first_sequence..self.first_sequence + self.messages.len() as u64
    }
}

/// Where a message body lies in the log: its commit record, and the byte range within that
/// record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLocation {
    pub record: Position,
    pub start: u32,
    pub len: u32,
}

/// Finds a body, by its range in the record being applied.
type BodyAt<'a> = dyn Fn(&std::ops::Range<usize>) -> Result<(RecordBytes, BodyLocation)> + 'a;

/// A committed record waiting for the records before it to be applied.
#[derive(Debug)]
struct PendingRecord {
    ops: Vec<Op>,
    payload: RecordBytes,
    position: Position,
}

/// A local conversation group: which queue it belongs to and the messages of its conversations
/// that wait there, by conversation and sequence.
#[derive(Debug, Default)]
pub struct Group {
    pub queue: String,
    pub conversations: BTreeMap<ConversationHandle, ConversationQueue>,
    /// This group's key in its queue's ready index (`State::ready`), if it has messages.
    ready_key: Option<ReadyKey>,
}

/// Order of groups in a queue's ready index: highest priority first (the highest priority
/// among its conversations with waiting messages), then the one whose oldest message is
/// oldest.
pub(crate) type ReadyKey = (std::cmp::Reverse<u8>, u64);

impl Group {
    pub fn new(queue: String) -> Group {
        Group {
            queue,
            conversations: BTreeMap::new(),
            ready_key: None,
        }
    }

    pub fn has_messages(&self) -> bool {
        self.conversations.values().any(|m| !m.is_empty())
    }

    /// Queuing order of the oldest waiting message, to pick groups first-come first-served.
    pub fn oldest(&self) -> Option<u64> {
        self.conversations
            .values()
            .filter_map(ConversationQueue::oldest)
            .min()
    }

    /// This group's place in its queue's ready index, if it has messages.
    pub(crate) fn ready_key(&self) -> Option<ReadyKey> {
        let priority = self
            .conversations
            .values()
            .filter(|q| !q.is_empty())
            .map(|q| q.priority)
            .max()?;
        Some((std::cmp::Reverse(priority), self.oldest()?))
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub catalog: Catalog,
    pub endpoints: IdMap<ConversationHandle, Endpoint>,
    pub groups: IdMap<ConversationGroupId, Group>,
    pub(crate) next_queuing_order: u64,
    /// Every record up to here is applied, and none after it: the state is exactly the log's
    /// prefix through this LSN (what a checkpoint captures).
    pub(crate) applied_through: Lsn,
    /// Records committed out of LSN order, waiting for their predecessors.
    pending: BTreeMap<Lsn, PendingRecord>,
    /// Messages taken out of their group by a RECEIVE whose transaction has not ended, by
    /// conversation and sequence. Committing the RECEIVE (applying its op) drops them; a
    /// rollback puts them back. A checkpoint counts them as queued.
    pub(crate) taken:
        IdMap<ConversationHandle, BTreeMap<MessageKey, (ConversationGroupId, QueuedMessage)>>,
    /// Per queue, the groups with waiting messages, best first (`ReadyKey`): RECEIVE walks
    /// this instead of every group.
    ready: IdMap<String, BTreeSet<(ReadyKey, ConversationGroupId)>>,
    /// Every pending conversation timer and dialog lifetime, soonest first.
    pub(crate) deadlines: BTreeSet<(u64, ConversationHandle, DeadlineKind)>,
    /// Queues whose messages or status changed since the last `take_touched` (to wake
    /// WAITFOR receivers and activation).
    touched: Vec<String>,
    /// Events raised by applied records, for the broker to publish (not on replay).
    pub(crate) events: Vec<Event>,
    /// Per queue, rollbacks in a row of transactions that received from it (poison-message
    /// detection; in memory only, as in Service Broker).
    pub(crate) poison_rollbacks: HashMap<String, u32>,
    /// The transmission queue, by id (the queuing order it got when its SEND committed):
    /// messages for far sides on other brokers, until acknowledged.
    pub(crate) transmission: BTreeMap<u64, Transmission>,
    /// How many times messages left the transmission queue unacknowledged (their dialog ended
    /// with an error or cleanup, or its lifetime passed): the network's sender compares it to
    /// know when to withdraw what it handed to its transport. In memory only.
    pub(crate) transmissions_dropped: u64,
    /// How many committed ops created or altered a route: the network's sender compares it to
    /// know when messages that had no route (or another one) must be looked at again. In
    /// memory only.
    pub(crate) route_changes: u64,
    /// Endpoints by (conversation id, is initiator): how messages from other brokers find
    /// their conversation.
    pub(crate) by_conversation: IdMap<(ConversationId, bool), ConversationHandle>,
    /// Remote conversations removed recently: (conversation id, is initiator) → until when
    /// (milliseconds since the UNIX epoch) a message for them is a late duplicate.
    pub(crate) closed: BTreeMap<(ConversationId, bool), u64>,
    /// `closed`'s entries in the order they were made, (until, key): pruned from the front as
    /// their time passes (`prune_closed`), so that `closed` holds only the last
    /// `CLOSED_CONVERSATION_LINGER_MS` of them, however long the broker runs.
    pub(crate) closed_order: VecDeque<(u64, (ConversationId, bool))>,
    /// The time records are being applied at (set by the committer; at recovery, the time of
    /// the open). Only tombstone expiries read it: replaying later makes them linger longer,
    /// never shorter.
    pub(crate) now_ms: u64,
    /// Message type names by `MessageTypeId`, and the reverse: one shared name per type
    /// instead of one per queued message.
    message_type_names: Vec<Arc<str>>,
    message_type_ids: IdMap<String, MessageTypeId>,
    /// Set when a logged record could not be applied: the state no longer matches the log, so
    /// no later commit may proceed (they would wait forever for this one).
    pub(crate) broken: Option<String>,
}

fn corrupt(what: String) -> Error {
    Error::Corruption(what)
}

impl State {
    pub fn endpoint(&self, handle: ConversationHandle) -> Result<&Endpoint> {
        self.endpoints
            .get(&handle)
            .ok_or(Error::UnknownConversation(handle))
    }

    /// Applies committed record `lsn` once every record before it is applied, and any records
    /// after it that were waiting for it. Commits finish in any order; applying in LSN order
    /// keeps the state equal to a prefix of the log, which replay and checkpoints rely on.
    /// Returns whether `lsn` is now applied.
    pub fn apply_in_order(
        &mut self,
        lsn: Lsn,
        ops: Vec<Op>,
        payload: RecordBytes,
        position: Position,
    ) -> Result<bool> {
        if lsn <= self.applied_through {
            return Err(corrupt(format!("record {lsn} applied twice")));
        }
        self.pending.insert(
            lsn,
            PendingRecord {
                ops,
                payload,
                position,
            },
        );
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.applied_through.next() {
                break;
            }
            let (next, record) = entry.remove_entry();
            for op in &record.ops {
                if let Err(e) = self.apply(op, &record.payload, record.position) {
                    self.broken = Some(format!("record {next} could not be applied: {e}"));
                    return Err(e);
                }
            }
            self.applied_through = next;
        }
        Ok(self.applied_through >= lsn)
    }

    /// Applies one committed op. `payload` is the commit record the op came from, at
    /// `position` in the log (bodies are borrowed from it).
    pub fn apply(&mut self, op: &Op, payload: &RecordBytes, position: Position) -> Result<()> {
        if let Some(result) = apply_catalog_op(&mut self.catalog, op) {
            if let Op::AlterQueue { name, .. }
            | Op::DropQueue { name }
            | Op::DisableQueue { name } = op
            {
                self.poison_rollbacks.remove(name);
                self.touched.push(name.clone());
            }
            if let Op::CreateRoute(_) | Op::AlterRoute(_) | Op::DropRoute { .. } = op {
                // Messages waiting for a route may have one now; messages sent on a route
                // altered or dropped may have to go elsewhere (a dropped route may leave a
                // wildcard one to match).
                self.route_changes += 1;
                self.touched.push(TRANSMISSION_SIGNAL.to_owned());
            }
            return result;
        }
        let body_at = |range: &std::ops::Range<usize>| -> Result<(RecordBytes, BodyLocation)> {
            if range.end > payload.len() {
                return Err(corrupt(format!("body {range:?} outside its record")));
            }
            Ok((
                payload.slice(range.clone()),
                BodyLocation {
                    record: position,
                    start: range.start as u32,
                    len: range.len() as u32,
                },
            ))
        };
        match op {
            Op::BeginDialog(d) => {
                let from_queue = self.catalog.service(&d.from_service)?.queue.clone();
                let expires_at_ms = (d.expires_at_ms != 0).then_some(d.expires_at_ms);
                let endpoint =
                    |handle, is_initiator, service: &str, far: &str, group, far_handle| Endpoint {
                        handle,
                        conversation_id: d.conversation_id,
                        is_initiator,
                        service: service.into(),
                        far_service: far.into(),
                        contract: d.contract.as_str().into(),
                        group,
                        state: if is_initiator {
                            EndpointState::StartedOutbound
                        } else {
                            EndpointState::Conversing
                        },
                        send_sequence: 0,
                        receive_sequence: 0,
                        far_handle,
                        far_broker_instance: if d.target.is_some() {
                            None
                        } else {
                            d.far_broker_instance
                        },
                        established: false,
                        arrived_sequence: 0,
                        expires_at_ms,
                        dialog_timer_ms: None,
                        priority: self.catalog.priority_for(&d.contract, service, far),
                    };
                let initiator = endpoint(
                    d.handle,
                    true,
                    &d.from_service,
                    &d.to_service,
                    d.group,
                    d.target.map(|(h, _)| h),
                );
                let target = match d.target {
                    Some((target_handle, target_group)) => {
                        let to_queue = self.catalog.service(&d.to_service)?.queue.clone();
                        Some((
                            endpoint(
                                target_handle,
                                false,
                                &d.to_service,
                                &d.from_service,
                                target_group,
                                Some(d.handle),
                            ),
                            to_queue,
                        ))
                    }
                    None => None,
                };
                self.add_endpoint(initiator, from_queue)?;
                if let Some((target, to_queue)) = target {
                    self.add_endpoint(target, to_queue)?;
                }
                Ok(())
            }
            Op::Send {
                handle,
                message_type,
                sequence,
                body_range,
                ..
            } => {
                let sender = self
                    .endpoints
                    .get_mut(handle)
                    .ok_or_else(|| corrupt(format!("send on unknown conversation {handle}")))?;
                if *sequence != sender.send_sequence {
                    return Err(corrupt(format!(
                        "send of sequence {sequence} on {handle}, which expects {}",
                        sender.send_sequence
                    )));
                }
                sender.send_sequence += 1;
                if sender.state == EndpointState::StartedOutbound {
                    sender.state = EndpointState::Conversing;
                }
                // A failure (a far broker's refusal, the lifetime) that committed after this
                // SEND passed its checks dropped what had not been transmitted: this goes too.
                let failed = sender.state == EndpointState::Error;
                let far_handle = sender.far_handle;
                let sender_group = sender.group;
                let (body, location) = body_at(body_range)?;
                if self.retains(sender_group) {
                    let queuing_order = self.next_queuing_order;
                    self.next_queuing_order += 1;
                    let message_type_id = self.message_type_id(message_type);
                    let copy =
                        QueuedMessage::new(body.clone(), location, message_type_id, queuing_order);
                    if let Some(queue) = self
                        .groups
                        .get_mut(&sender_group)
                        .and_then(|g| g.conversations.get_mut(handle))
                    {
                        queue.retain(RetainedMessage {
                            status: MessageStatus::SentCopy,
                            sequence: *sequence,
                            message: copy,
                        });
                    }
                }
                match far_handle {
                    Some(target) => self.deliver(
                        target,
                        MessageKey::Sequence(*sequence),
                        message_type,
                        body,
                        location,
                    ),
                    None if failed => Ok(()),
                    None => {
                        self.transmit(*handle, *sequence, message_type, body, location);
                        Ok(())
                    }
                }
            }
            Op::Receive {
                handle,
                through_sequence,
            } => {
                // Ops naming an endpoint removed by an earlier op (an END in the same record, or
                // the far side's END of a closed conversation, committed meanwhile) do nothing:
                // the conversation is over and its messages are gone with it.
                let Some(endpoint) = self.endpoints.get_mut(handle) else {
                    return Ok(());
                };
                endpoint.receive_sequence = endpoint
                    .receive_sequence
                    .max(through_sequence.saturating_add(1));
                let group = endpoint.group;
                let mut received = Vec::new();
                if let Some(messages) = self
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.conversations.get_mut(handle))
                {
                    // Already taken when the receiving transaction commits; removed here on replay.
                    // Received messages are always the conversation's first sequenced ones.
                    while messages
                        .sequences()
                        .next()
                        .is_some_and(|seq| seq <= *through_sequence)
                    {
                        if let Some((sequence, message)) = messages.pop_first_sequenced() {
                            received.push((MessageKey::Sequence(sequence), message));
                        }
                    }
                }
                received.extend(self.drop_taken(
                    *handle,
                    |key| matches!(key, MessageKey::Sequence(s) if s <= *through_sequence),
                ));
                self.retain_received(*handle, group, received);
                self.refresh_ready(group);
                Ok(())
            }
            Op::ReceiveUrgent {
                handle,
                queuing_order,
            } => {
                let Some(group) = self.endpoints.get(handle).map(|e| e.group) else {
                    return Ok(());
                };
                let mut received = Vec::new();
                if let Some(messages) = self
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.conversations.get_mut(handle))
                    && let Some(message) = messages.remove_urgent(*queuing_order)
                {
                    received.push((MessageKey::Sequence(0), message));
                }
                received.extend(self.drop_taken(*handle, |key| {
                    matches!(key, MessageKey::Urgent { queuing_order: q, .. } if q == *queuing_order)
                }));
                self.retain_received(*handle, group, received);
                self.refresh_ready(group);
                Ok(())
            }
            Op::Relocate {
                handle,
                key,
                body_range,
                ..
            } => {
                let (body, location) = body_at(body_range)?;
                // The message may have been received since the compaction copied it: nothing
                // to do then.
                let group = self.endpoints.get(handle).map(|e| e.group);
                let queued = group
                    .and_then(|g| self.groups.get_mut(&g))
                    .and_then(|g| g.conversations.get_mut(handle))
                    .and_then(|m| m.get_mut(*key));
                let taken = self
                    .taken
                    .get_mut(handle)
                    .and_then(|t| t.get_mut(key))
                    .map(|(_, m)| m);
                let outbound = match key {
                    MessageKey::Outbound { id } => self
                        .transmission
                        .get_mut(id)
                        .filter(|t| t.handle == *handle)
                        .map(|t| &mut t.message),
                    _ => None,
                };
                for message in queued.into_iter().chain(taken).chain(outbound) {
                    if message.body.len() != body.len() {
                        return Err(corrupt(format!(
                            "relocated body of {handle} {key:?} changed length"
                        )));
                    }
                    *message = QueuedMessage::new(
                        body.clone(),
                        location,
                        message.message_type,
                        message.queuing_order,
                    );
                }
                Ok(())
            }
            Op::MoveConversation { handle, group } => {
                let Some(endpoint) = self.endpoints.get_mut(handle) else {
                    return Ok(());
                };
                let from = endpoint.group;
                if from == *group {
                    return Ok(());
                }
                endpoint.group = *group;
                let old = self
                    .groups
                    .get_mut(&from)
                    .ok_or_else(|| corrupt(format!("conversation {handle} in unknown group")))?;
                let queue = old.queue.clone();
                let messages = old.conversations.remove(handle).unwrap_or_default();
                let new = self
                    .groups
                    .entry(*group)
                    .or_insert_with(|| Group::new(queue.clone()));
                if new.queue != queue {
                    return Err(corrupt(format!(
                        "move of {handle} from queue {queue:?} to a group on {:?}",
                        new.queue
                    )));
                }
                new.conversations.insert(*handle, messages);
                self.refresh_ready(from);
                self.forget_group_if_empty(from);
                self.refresh_ready(*group);
                Ok(())
            }
            Op::EndConversation { handle, end } => self.end_conversation(*handle, end, &body_at),
            Op::SetTimer {
                handle,
                deadline_ms,
            } => {
                let Some(endpoint) = self.endpoints.get_mut(handle) else {
                    return Ok(());
                };
                let old = endpoint.dialog_timer_ms.replace(*deadline_ms);
                if let Some(old) = old {
                    self.deadlines
                        .remove(&(old, *handle, DeadlineKind::DialogTimer));
                }
                self.deadlines
                    .insert((*deadline_ms, *handle, DeadlineKind::DialogTimer));
                Ok(())
            }
            Op::FireTimer {
                handle,
                deadline_ms,
            } => {
                // The timer may have been reset, or the conversation ended, since it came due.
                let Some(endpoint) = self.endpoints.get_mut(handle) else {
                    return Ok(());
                };
                if endpoint.dialog_timer_ms != Some(*deadline_ms) {
                    return Ok(());
                }
                endpoint.dialog_timer_ms = None;
                self.deadlines
                    .remove(&(*deadline_ms, *handle, DeadlineKind::DialogTimer));
                let key = MessageKey::Urgent {
                    lane: UrgentLane::DialogTimer,
                    queuing_order: self.next_queuing_order,
                };
                let (body, location) = body_at(&(0..0))?;
                // Delivered whatever the conversation's state (an endpoint in ERROR still gets
                // its own timers); ending the conversation cancels the timer.
                self.deliver_to_endpoint(*handle, key, system::DIALOG_TIMER, body, location)
            }
            Op::Expire {
                handle, body_range, ..
            } => {
                let Some(endpoint) = self.endpoints.get_mut(handle) else {
                    return Ok(());
                };
                let Some(expires_at) = endpoint.expires_at_ms.take() else {
                    return Ok(());
                };
                self.deadlines
                    .remove(&(expires_at, *handle, DeadlineKind::Lifetime));
                if !endpoint.state.accepts_messages() {
                    return Ok(());
                }
                endpoint.state = EndpointState::Error;
                // What never reached the far side will not now: the dialog has failed.
                self.drop_transmissions(*handle);
                self.events.push(Event::DialogError {
                    handle: *handle,
                    code: system::ERROR_LIFETIME_EXPIRED,
                });
                let key = MessageKey::Urgent {
                    lane: UrgentLane::Error,
                    queuing_order: self.next_queuing_order,
                };
                let (body, location) = body_at(body_range)?;
                self.deliver_to_endpoint(*handle, key, system::ERROR, body, location)
            }
            Op::AcceptDialog(d) => {
                if self
                    .by_conversation
                    .contains_key(&(d.conversation_id, false))
                {
                    // Two batches raced to create it: the first one did.
                    return Ok(());
                }
                let queue = self.catalog.service(&d.service)?.queue.clone();
                let endpoint = Endpoint {
                    handle: d.handle,
                    conversation_id: d.conversation_id,
                    is_initiator: false,
                    service: d.service.as_str().into(),
                    far_service: d.far_service.as_str().into(),
                    contract: d.contract.as_str().into(),
                    group: d.group,
                    state: EndpointState::Conversing,
                    send_sequence: 0,
                    receive_sequence: 0,
                    far_handle: None,
                    far_broker_instance: Some(d.far_broker_instance),
                    established: true,
                    arrived_sequence: 0,
                    expires_at_ms: (d.expires_at_ms != 0).then_some(d.expires_at_ms),
                    dialog_timer_ms: None,
                    priority: self
                        .catalog
                        .priority_for(&d.contract, &d.service, &d.far_service),
                };
                self.add_endpoint(endpoint, queue)
            }
            Op::Arrive {
                handle,
                sequence,
                message_type,
                body_range,
                ..
            } => {
                let Some(endpoint) = self.endpoints.get_mut(handle) else {
                    // Removed since (both sides ended): a late duplicate.
                    return Ok(());
                };
                // The next in sequence, or an Error (which does not wait for messages its
                // sender dropped when it ended the dialog); anything else is a duplicate.
                let is_error = message_type == system::ERROR;
                if *sequence < endpoint.arrived_sequence
                    || (*sequence > endpoint.arrived_sequence && !is_error)
                {
                    return Ok(());
                }
                endpoint.arrived_sequence = sequence.saturating_add(1);
                if !endpoint.state.accepts_messages() {
                    // This side ended or failed: what still arrives is dropped (but counted,
                    // so its retransmissions are recognised as duplicates).
                    return Ok(());
                }
                let (body, location) = body_at(body_range)?;
                match message_type.as_str() {
                    system::ERROR => {
                        endpoint.state = EndpointState::Error;
                        let code = system::parse_error_body(&body).map_or(0, |(code, _)| code);
                        self.drop_transmissions(*handle);
                        self.events.push(Event::DialogError {
                            handle: *handle,
                            code,
                        });
                        let key = MessageKey::Urgent {
                            lane: UrgentLane::Error,
                            queuing_order: self.next_queuing_order,
                        };
                        self.deliver_to_endpoint(*handle, key, system::ERROR, body, location)
                    }
                    system::END_DIALOG => {
                        endpoint.state = EndpointState::DisconnectedInbound;
                        self.drop_transmissions(*handle);
                        self.deliver_to_endpoint(
                            *handle,
                            MessageKey::Sequence(*sequence),
                            system::END_DIALOG,
                            body,
                            location,
                        )
                    }
                    _ => self.deliver_to_endpoint(
                        *handle,
                        MessageKey::Sequence(*sequence),
                        message_type,
                        body,
                        location,
                    ),
                }
            }
            Op::Transmitted {
                ids,
                far_broker_instance,
            } => {
                for id in ids {
                    let Some(sent) = self.transmission.remove(id) else {
                        continue;
                    };
                    let sent_type = self.message_type_name(sent.message.message_type);
                    let closing =
                        **sent_type == *system::END_DIALOG || **sent_type == *system::ERROR;
                    let Some(endpoint) = self.endpoints.get_mut(&sent.handle) else {
                        continue;
                    };
                    if far_broker_instance.is_some() && !endpoint.established {
                        let newly_pinned = endpoint.far_broker_instance.is_none();
                        if newly_pinned {
                            endpoint.far_broker_instance = *far_broker_instance;
                        }
                        endpoint.established = true;
                        // Pinned, the dialog may match another route now (one naming that
                        // broker instance), and established, expired routes serve it again:
                        // its messages must be routed again, as after a route change. Only
                        // counted where such routes exist: a re-routing walks everything the
                        // sender handed on.
                        if self.catalog.routes.values().any(|route| {
                            (newly_pinned && route.broker_instance.is_some())
                                || route.expires_at_ms.is_some()
                        }) {
                            self.route_changes += 1;
                        }
                    }
                    if closing && endpoint.state == EndpointState::DisconnectedOutbound {
                        // The far side has this side's end: nothing more to do here.
                        self.remove_endpoint(sent.handle);
                    }
                }
                Ok(())
            }
            Op::Fail {
                handle,
                code,
                body_range,
                ..
            } => {
                let Some(endpoint) = self.endpoints.get_mut(handle) else {
                    return Ok(());
                };
                if !endpoint.takes_far_error() {
                    return Ok(());
                }
                if endpoint.state == EndpointState::DisconnectedOutbound {
                    // This side ended; the far side refuses it: nothing is left to tell anyone.
                    self.remove_endpoint(*handle);
                    return Ok(());
                }
                endpoint.state = EndpointState::Error;
                self.drop_transmissions(*handle);
                self.events.push(Event::DialogError {
                    handle: *handle,
                    code: *code,
                });
                let key = MessageKey::Urgent {
                    lane: UrgentLane::Error,
                    queuing_order: self.next_queuing_order,
                };
                let (body, location) = body_at(body_range)?;
                self.deliver_to_endpoint(*handle, key, system::ERROR, body, location)
            }
            catalog_op => unreachable!("catalog op {catalog_op:?} was applied above"),
        }
    }

    /// Puts a message for endpoint `target` in its queue, if that endpoint still exists and
    /// accepts messages; otherwise the message is discarded, as Service Broker discards what
    /// arrives for a conversation that ended, failed, or was cleaned up.
    fn deliver(
        &mut self,
        target: ConversationHandle,
        key: MessageKey,
        message_type: &str,
        body: RecordBytes,
        location: BodyLocation,
    ) -> Result<()> {
        match self.endpoints.get(&target) {
            Some(endpoint) if endpoint.state.accepts_messages() => {
                self.deliver_to_endpoint(target, key, message_type, body, location)
            }
            _ => Ok(()),
        }
    }

    /// Queues a message for endpoint `target`, whatever its state.
    fn deliver_to_endpoint(
        &mut self,
        target: ConversationHandle,
        key: MessageKey,
        message_type: &str,
        body: RecordBytes,
        location: BodyLocation,
    ) -> Result<()> {
        let target_group = self
            .endpoints
            .get(&target)
            .ok_or_else(|| corrupt(format!("message for unknown endpoint {target}")))?
            .group;
        let queuing_order = self.next_queuing_order;
        self.next_queuing_order += 1;
        let message_type = self.message_type_id(message_type);
        let group = self
            .groups
            .get_mut(&target_group)
            .ok_or_else(|| corrupt(format!("endpoint {target} in unknown group")))?;
        let message = QueuedMessage::new(body, location, message_type, queuing_order);
        group
            .conversations
            .entry(target)
            .or_default()
            .insert(key, message)
            .map_err(|e| corrupt(format!("message for {target}: {e}")))?;
        if self.touched.last() != Some(&group.queue) {
            self.touched.push(group.queue.clone());
        }
        self.refresh_ready(target_group);
        Ok(())
    }

    /// END CONVERSATION on `handle`: purges this side's messages; unless WITH CLEANUP, tells the
    /// far side (EndDialog after everything sent before, or an Error ahead of everything) if it
    /// has not ended or failed itself; closes this side, and removes both sides once both have
    /// ended (WITH CLEANUP removes this side at once).
    fn end_conversation(
        &mut self,
        handle: ConversationHandle,
        end: &End,
        body_at: &BodyAt<'_>,
    ) -> Result<()> {
        let Some(endpoint) = self.endpoints.get_mut(&handle) else {
            // Removed since the ending transaction loaded it: both sides had ended already.
            return Ok(());
        };
        let state_before = endpoint.state;
        endpoint.state = EndpointState::Closed;
        let group = endpoint.group;
        let far_handle = endpoint.far_handle;
        let ended_send_sequence = endpoint.send_sequence;
        if let Some(deadline) = endpoint.dialog_timer_ms.take() {
            self.deadlines
                .remove(&(deadline, handle, DeadlineKind::DialogTimer));
        }
        if let Some(deadline) = endpoint.expires_at_ms.take() {
            self.deadlines
                .remove(&(deadline, handle, DeadlineKind::Lifetime));
        }
        if let Some(queue) = self
            .groups
            .get_mut(&group)
            .and_then(|g| g.conversations.get_mut(&handle))
        {
            queue.clear();
        }
        let _ = self.drop_taken(handle, |_| true);
        self.refresh_ready(group);
        if far_handle.is_none() {
            return self.end_remote_conversation(
                handle,
                end,
                state_before,
                ended_send_sequence,
                body_at,
            );
        }
        let far_state = far_handle
            .and_then(|far| self.endpoints.get(&far))
            .map(|far| far.state);
        match end {
            End::Cleanup => {
                self.remove_endpoint(handle);
                return Ok(());
            }
            End::Plain if far_state.is_some_and(EndpointState::accepts_messages) => {
                let far = far_handle.expect("far state known");
                self.endpoints
                    .get_mut(&handle)
                    .expect("ending endpoint")
                    .send_sequence += 1;
                if let Some(far_endpoint) = self.endpoints.get_mut(&far) {
                    far_endpoint.state = EndpointState::DisconnectedInbound;
                }
                let (body, location) = body_at(&(0..0))?;
                self.deliver_to_endpoint(
                    far,
                    MessageKey::Sequence(ended_send_sequence),
                    system::END_DIALOG,
                    body,
                    location,
                )?;
            }
            End::Error {
                code, body_range, ..
            } if far_state.is_some_and(EndpointState::accepts_messages) => {
                let far = far_handle.expect("far state known");
                if let Some(far_endpoint) = self.endpoints.get_mut(&far) {
                    far_endpoint.state = EndpointState::Error;
                }
                self.events.push(Event::DialogError {
                    handle: far,
                    code: *code,
                });
                let key = MessageKey::Urgent {
                    lane: UrgentLane::Error,
                    queuing_order: self.next_queuing_order,
                };
                let (body, location) = body_at(body_range)?;
                self.deliver_to_endpoint(far, key, system::ERROR, body, location)?;
            }
            End::Plain | End::Error { .. } => {}
        }
        // Both sides ended (or the far side is gone): the conversation is over here.
        let far_gone_or_ended = match far_handle.and_then(|far| self.endpoints.get(&far)) {
            None => true,
            Some(far) => far.state.is_ended(),
        };
        if far_gone_or_ended {
            self.remove_endpoint(handle);
            if let Some(far) = far_handle {
                self.remove_endpoint(far);
            }
        }
        Ok(())
    }

    /// END CONVERSATION on an endpoint whose far side is on another broker: EndDialog (plain)
    /// or Error (WITH ERROR, which also drops this side's messages not transmitted yet) goes
    /// into the transmission queue behind what is there, and this side waits in DO until the
    /// far broker acknowledges it (`Op::Transmitted`); if the far side has ended or failed
    /// already, nothing is sent and the endpoint goes at once. WITH CLEANUP removes it and its
    /// transmissions at once, telling nobody.
    fn end_remote_conversation(
        &mut self,
        handle: ConversationHandle,
        end: &End,
        state_before: EndpointState,
        ended_send_sequence: u64,
        body_at: &BodyAt<'_>,
    ) -> Result<()> {
        let far_still_open = !matches!(
            state_before,
            EndpointState::DisconnectedInbound | EndpointState::Error
        );
        let (message_type, body_range) = match end {
            End::Plain if far_still_open => (system::END_DIALOG, 0..0),
            End::Error { body_range, .. } if far_still_open => {
                self.drop_transmissions(handle);
                (system::ERROR, body_range.clone())
            }
            End::Cleanup | End::Plain | End::Error { .. } => {
                self.drop_transmissions(handle);
                self.remove_endpoint(handle);
                return Ok(());
            }
        };
        let endpoint = self.endpoints.get_mut(&handle).expect("ending endpoint");
        endpoint.state = EndpointState::DisconnectedOutbound;
        endpoint.send_sequence += 1;
        let (body, location) = body_at(&body_range)?;
        self.transmit(handle, ended_send_sequence, message_type, body, location);
        Ok(())
    }

    /// Puts a message from `handle` into the transmission queue.
    fn transmit(
        &mut self,
        handle: ConversationHandle,
        sequence: u64,
        message_type: &str,
        body: RecordBytes,
        location: BodyLocation,
    ) {
        let id = self.next_queuing_order;
        self.next_queuing_order += 1;
        let message_type = self.message_type_id(message_type);
        if self.touched.last().map(String::as_str) != Some(TRANSMISSION_SIGNAL) {
            self.touched.push(TRANSMISSION_SIGNAL.to_owned());
        }
        self.transmission.insert(
            id,
            Transmission {
                handle,
                sequence,
                message: QueuedMessage::new(body, location, message_type, id),
            },
        );
    }

    /// Drops `handle`'s messages from the transmission queue.
    fn drop_transmissions(&mut self, handle: ConversationHandle) {
        let before = self.transmission.len();
        self.transmission.retain(|_, t| t.handle != handle);
        if self.transmission.len() != before {
            self.transmissions_dropped += 1;
            // Wakes the network's sender, which withdraws what it handed to its transport.
            if self.touched.last().map(String::as_str) != Some(TRANSMISSION_SIGNAL) {
                self.touched.push(TRANSMISSION_SIGNAL.to_owned());
            }
        }
    }

    /// Forgets the remote conversations whose linger (`closed`) has passed at `now_ms`. Entries
    /// are made in time order, so the front is the oldest; after the clock went back, the
    /// later ones merely linger longer.
    pub(crate) fn prune_closed(&mut self) {
        while let Some(&(until, key)) = self.closed_order.front() {
            if until > self.now_ms {
                break;
            }
            self.closed_order.pop_front();
            // Unless the same conversation side was closed again since (a later `until`).
            if self.closed.get(&key) == Some(&until) {
                self.closed.remove(&key);
            }
        }
    }

    /// Removes an endpoint with its messages and deadlines, and its group if that was the
    /// group's last conversation.
    fn remove_endpoint(&mut self, handle: ConversationHandle) {
        let Some(endpoint) = self.endpoints.remove(&handle) else {
            return;
        };
        let key = (endpoint.conversation_id, endpoint.is_initiator);
        self.by_conversation.remove(&key);
        if endpoint.far_handle.is_none() {
            self.drop_transmissions(handle);
            let until = self.now_ms.saturating_add(CLOSED_CONVERSATION_LINGER_MS);
            self.closed.insert(key, until);
            self.closed_order.push_back((until, key));
            self.prune_closed();
        }
        if let Some(deadline) = endpoint.dialog_timer_ms {
            self.deadlines
                .remove(&(deadline, handle, DeadlineKind::DialogTimer));
        }
        if let Some(deadline) = endpoint.expires_at_ms {
            self.deadlines
                .remove(&(deadline, handle, DeadlineKind::Lifetime));
        }
        let _ = self.drop_taken(handle, |_| true);
        if let Some(group) = self.groups.get_mut(&endpoint.group) {
            group.conversations.remove(&handle);
        }
        self.refresh_ready(endpoint.group);
        self.forget_group_if_empty(endpoint.group);
    }

    /// A group lives as long as one of its conversations does.
    fn forget_group_if_empty(&mut self, group: ConversationGroupId) {
        if self
            .groups
            .get(&group)
            .is_some_and(|g| g.conversations.is_empty())
        {
            self.groups.remove(&group);
        }
    }

    /// Drops `handle`'s taken messages whose keys match (their RECEIVE committed, or the
    /// conversation ended), returning them.
    fn drop_taken(
        &mut self,
        handle: ConversationHandle,
        matches: impl Fn(MessageKey) -> bool,
    ) -> Vec<(MessageKey, QueuedMessage)> {
        let mut dropped = Vec::new();
        if let Some(taken) = self.taken.get_mut(&handle) {
            let keys: Vec<MessageKey> = taken.keys().copied().filter(|k| matches(*k)).collect();
            for key in keys {
                if let Some((_, message)) = taken.remove(&key) {
                    dropped.push((key, message));
                }
            }
            if taken.is_empty() {
                self.taken.remove(&handle);
            }
        }
        dropped
    }

    /// Whether the queue of `group` keeps messages (RETENTION).
    fn retains(&self, group: ConversationGroupId) -> bool {
        self.groups
            .get(&group)
            .and_then(|g| self.catalog.queues.get(&g.queue))
            .is_some_and(|q| q.options.retention)
    }

    /// Keeps the messages `handle` just received, if its queue has RETENTION on.
    fn retain_received(
        &mut self,
        handle: ConversationHandle,
        group: ConversationGroupId,
        received: Vec<(MessageKey, QueuedMessage)>,
    ) {
        if received.is_empty() || !self.retains(group) {
            return;
        }
        if let Some(queue) = self
            .groups
            .get_mut(&group)
            .and_then(|g| g.conversations.get_mut(&handle))
        {
            for (key, message) in received {
                queue.retain(RetainedMessage {
                    status: MessageStatus::Received,
                    sequence: key.sequence(),
                    message,
                });
            }
        }
    }

    /// The queues whose messages or status changed since the last call.
    pub(crate) fn take_touched(&mut self) -> Vec<String> {
        std::mem::take(&mut self.touched)
    }

    /// Moves the first message of `handle` in `group` to the taken set (a RECEIVE took it).
    pub(crate) fn take_first(
        &mut self,
        group: ConversationGroupId,
        handle: ConversationHandle,
    ) -> Option<(MessageKey, QueuedMessage)> {
        let (key, message) = self
            .groups
            .get_mut(&group)?
            .conversations
            .get_mut(&handle)?
            .pop_first()?;
        self.taken
            .entry(handle)
            .or_default()
            .insert(key, (group, message.clone()));
        self.refresh_ready(group);
        Some((key, message))
    }

    /// The groups of `queue` with waiting messages, best first (highest priority, then oldest
    /// message).
    pub(crate) fn ready_groups(
        &self,
        queue: &str,
    ) -> impl Iterator<Item = ConversationGroupId> + '_ {
        self.ready
            .get(queue)
            .into_iter()
            .flat_map(|ready| ready.iter().map(|(_, group)| *group))
    }

    /// Puts `group` at its right place in its queue's ready index (or takes it out).
    pub(crate) fn refresh_ready(&mut self, group_id: ConversationGroupId) {
        let Some(group) = self.groups.get_mut(&group_id) else {
            return;
        };
        let key = group.ready_key();
        if key == group.ready_key {
            return;
        }
        // Looked up by reference: an `entry` would copy the queue's name for every message taken.
        if !self.ready.contains_key(group.queue.as_str()) {
            self.ready.insert(group.queue.clone(), BTreeSet::new());
        }
        let Some(ready) = self.ready.get_mut(group.queue.as_str()) else {
            return;
        };
        if let Some(old) = group.ready_key {
            ready.remove(&(old, group_id));
        }
        if let Some(new) = key {
            ready.insert((new, group_id));
        }
        group.ready_key = key;
    }

    /// The id of a message type name, assigned on first use.
    pub(crate) fn message_type_id(&mut self, name: &str) -> MessageTypeId {
        if let Some(id) = self.message_type_ids.get(name) {
            return *id;
        }
        let id = MessageTypeId(self.message_type_names.len() as u32);
        self.message_type_names.push(Arc::from(name));
        self.message_type_ids.insert(name.to_owned(), id);
        id
    }

    /// The name of a message type id.
    pub(crate) fn message_type_name(&self, id: MessageTypeId) -> &Arc<str> {
        &self.message_type_names[id.0 as usize]
    }

    /// Puts taken messages of `handle` with the given keys back into their group (their
    /// RECEIVE rolled back).
    pub(crate) fn return_taken(&mut self, handle: ConversationHandle, keys: &[MessageKey]) {
        let Some(taken) = self.taken.get_mut(&handle) else {
            return;
        };
        let mut returned = Vec::new();
        for key in keys {
            if let Some((group, message)) = taken.remove(key) {
                returned.push((*key, group, message));
            }
        }
        if taken.is_empty() {
            self.taken.remove(&handle);
        }
        // Newest first: each goes back at the front of its conversation's queue.
        returned.sort_unstable_by_key(|(sequence, _, _)| std::cmp::Reverse(*sequence));
        for (sequence, group_id, message) in returned {
            if let Some(group) = self.groups.get_mut(&group_id) {
                let put_back = group
                    .conversations
                    .entry(handle)
                    .or_default()
                    .insert(sequence, message);
                debug_assert!(
                    put_back.is_ok(),
                    "taken messages return in order: {put_back:?}"
                );
                if self.touched.last() != Some(&group.queue) {
                    self.touched.push(group.queue.clone());
                }
                self.refresh_ready(group_id);
            }
        }
    }

    pub(crate) fn add_endpoint(&mut self, endpoint: Endpoint, queue: String) -> Result<()> {
        let group = self
            .groups
            .entry(endpoint.group)
            .or_insert_with(|| Group::new(queue.clone()));
        if group.queue != queue {
            return Err(corrupt(format!(
                "group {} is on queue {:?}, endpoint {} on {:?}",
                endpoint.group, group.queue, endpoint.handle, queue
            )));
        }
        group
            .conversations
            .entry(endpoint.handle)
            .or_default()
            .priority = endpoint.priority;
        self.by_conversation.insert(
            (endpoint.conversation_id, endpoint.is_initiator),
            endpoint.handle,
        );
        if let Some(deadline) = endpoint.expires_at_ms {
            self.deadlines
                .insert((deadline, endpoint.handle, DeadlineKind::Lifetime));
        }
        if let Some(deadline) = endpoint.dialog_timer_ms {
            self.deadlines
                .insert((deadline, endpoint.handle, DeadlineKind::DialogTimer));
        }
        if self
            .endpoints
            .insert(endpoint.handle, endpoint.clone())
            .is_some()
        {
            return Err(corrupt(format!(
                "endpoint {} created twice",
                endpoint.handle
            )));
        }
        Ok(())
    }
}

/// Applies `op` to `catalog` if it is a catalog op (`None` otherwise).
pub(crate) fn apply_catalog_op(catalog: &mut Catalog, op: &Op) -> Option<Result<()>> {
    Some(match op {
        Op::CreateMessageType { name, validation } => {
            catalog.create_message_type(name, *validation)
        }
        Op::DropMessageType { name } => catalog.drop_message_type(name),
        Op::CreateContract { name, messages } => {
            let messages: Vec<(&str, _)> = messages.iter().map(|(t, s)| (t.as_str(), *s)).collect();
            catalog.create_contract(name, &messages)
        }
        Op::DropContract { name } => catalog.drop_contract(name),
        Op::CreateQueue { name, options } => catalog.create_queue(name, *options),
        Op::AlterQueue { name, options } => catalog.alter_queue(name, *options),
        Op::DropQueue { name } => catalog.drop_queue(name),
        Op::CreateService {
            name,
            queue,
            contracts,
        } => {
            let contracts: Vec<&str> = contracts.iter().map(String::as_str).collect();
            catalog.create_service(name, queue, &contracts)
        }
        Op::DropService { name } => catalog.drop_service(name),
        Op::CreateBrokerPriority(priority) => catalog.create_priority(priority.clone()),
        Op::DropBrokerPriority { name } => catalog.drop_priority(name),
        Op::CreateRoute(route) => catalog.create_route(route.clone()),
        Op::AlterRoute(route) => catalog.alter_route(route.clone()),
        Op::DropRoute { name } => catalog.drop_route(name),
        // Logged by the broker, not checked against a transaction's catalog: the queue may
        // have been dropped since.
        Op::DisableQueue { name } => {
            if let Some(queue) = catalog.queues.get_mut(name) {
                queue.options.enabled = false;
            }
            Ok(())
        }
        Op::BeginDialog(_)
        | Op::Send { .. }
        | Op::Receive { .. }
        | Op::ReceiveUrgent { .. }
        | Op::Relocate { .. }
        | Op::MoveConversation { .. }
        | Op::EndConversation { .. }
        | Op::SetTimer { .. }
        | Op::FireTimer { .. }
        | Op::Expire { .. }
        | Op::AcceptDialog(_)
        | Op::Arrive { .. }
        | Op::Transmitted { .. }
        | Op::Fail { .. } => {
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::EndpointState;

    #[test]
    fn every_state_code_reads_back_and_codes_and_descriptions_are_distinct() {
        for state in EndpointState::ALL {
            assert_eq!(EndpointState::from_code(state.code()), Some(state));
        }
        let codes: std::collections::HashSet<_> =
            EndpointState::ALL.iter().map(|s| s.code()).collect();
        let descriptions: std::collections::HashSet<_> =
            EndpointState::ALL.iter().map(|s| s.description()).collect();
        assert_eq!((codes.len(), descriptions.len()), (7, 7));
        assert_eq!(EndpointState::from_code("XX"), None);
        assert_eq!(EndpointState::Conversing.description(), "CONVERSING");
    }
}
