//! The commit record: everything one transaction changed, as one log record (message bodies
//! included). Recovery replays these records through the same `apply` code that commit uses, so
//! the live state and the recovered state cannot drift apart.
//!
//! Layout (little-endian): `version u8 = 1 | op_count u32 | op*`, each op a tag byte and its
//! fields. Strings are `len u16 | UTF-8 bytes`, ids are 16 bytes, bodies are `len u32 | bytes`.
//! The decoder trusts nothing: every length is checked against what is left, every tag and enum
//! value against the known ones, and it never panics (fuzzed by `fuzz/fuzz_targets/commit_record.rs`).

use std::ops::Range;

use crate::catalog::{QueueOptions, SentBy, Validation};
use crate::codec::{Reader, put_str};
use crate::ids::{ConversationGroupId, ConversationHandle, ConversationId};
use crate::state::{MessageKey, UrgentLane};

/// WAL record kind of a commit record.
pub const KIND_COMMIT: u8 = 1;
const FORMAT_VERSION: u8 = 1;

/// One change, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    CreateMessageType {
        name: String,
        validation: Validation,
    },
    DropMessageType {
        name: String,
    },
    CreateContract {
        name: String,
        messages: Vec<(String, SentBy)>,
    },
    DropContract {
        name: String,
    },
    CreateQueue {
        name: String,
        options: QueueOptions,
    },
    AlterQueue {
        name: String,
        options: QueueOptions,
    },
    DropQueue {
        name: String,
    },
    CreateService {
        name: String,
        queue: String,
        contracts: Vec<String>,
    },
    DropService {
        name: String,
    },
    /// CREATE BROKER PRIORITY: conversations matching (`None` = ANY) get `level`.
    CreateBrokerPriority(crate::catalog::BrokerPriority),
    DropBrokerPriority {
        name: String,
    },
    /// The first message of a dialog from another broker created its target endpoint here.
    AcceptDialog(RemoteDialogRecord),
    /// A message from the far side (on another broker) of endpoint `handle` arrived: the next
    /// in its sequence (anything else is a duplicate and changes nothing).
    Arrive {
        handle: ConversationHandle,
        sequence: u64,
        message_type: String,
        body: Vec<u8>,
        body_range: Range<usize>,
    },
    /// The far broker acknowledged transmissions `ids` (removed from the transmission queue;
    /// their dialogs are pinned to `far_broker_instance`).
    Transmitted {
        ids: Vec<u64>,
        far_broker_instance: Option<crate::ids::BrokerInstanceId>,
    },
    /// The far broker refused endpoint `handle`'s dialog: ERROR, with this Error body.
    Fail {
        handle: ConversationHandle,
        code: i32,
        body: Vec<u8>,
        body_range: Range<usize>,
    },
    CreateRoute(crate::catalog::Route),
    AlterRoute(crate::catalog::Route),
    DropRoute {
        name: String,
    },
    BeginDialog(DialogRecord),
    /// A message sent on the conversation whose sending endpoint is `handle`.
    Send {
        handle: ConversationHandle,
        message_type: String,
        sequence: u64,
        /// In an op being encoded: the body itself. In a decoded op: empty, see `body_range`.
        body: Vec<u8>,
        /// In a decoded op: where the body lies in the record payload.
        body_range: Range<usize>,
    },
    /// The endpoint `handle` received its messages up to and including `through_sequence`.
    Receive {
        handle: ConversationHandle,
        through_sequence: u64,
    },
    /// MOVE CONVERSATION: endpoint `handle` joins conversation group `group` (created if new),
    /// taking its queued messages along.
    MoveConversation {
        handle: ConversationHandle,
        group: ConversationGroupId,
    },
    /// A RECEIVE took the urgent system message (DialogTimer or Error) that arrived with
    /// `queuing_order` for endpoint `handle`.
    ReceiveUrgent {
        handle: ConversationHandle,
        queuing_order: u64,
    },
    /// END CONVERSATION on endpoint `handle`.
    EndConversation {
        handle: ConversationHandle,
        end: End,
    },
    /// BEGIN CONVERSATION TIMER: endpoint `handle`'s timer fires at `deadline_ms` (replacing
    /// any earlier setting).
    SetTimer {
        handle: ConversationHandle,
        deadline_ms: u64,
    },
    /// The broker fired endpoint `handle`'s timer set for `deadline_ms`: a DialogTimer message
    /// for it (nothing, if the timer was reset or the conversation ended since).
    FireTimer {
        handle: ConversationHandle,
        deadline_ms: u64,
    },
    /// The broker found endpoint `handle`'s dialog lifetime expired: it goes to ERROR with an
    /// Error message (this body) in its queue.
    Expire {
        handle: ConversationHandle,
        body: Vec<u8>,
        body_range: Range<usize>,
    },
    /// Poison-message protection turned queue `name` off (a no-op if it is gone).
    DisableQueue {
        name: String,
    },
    /// Compaction: the body of the message `key` queued for endpoint `handle` now lives
    /// here (a copy of the old one), so the old log segment can be released. No logical change.
    Relocate {
        handle: ConversationHandle,
        key: MessageKey,
        /// As in `Send`: the body when encoding, empty when decoded (see `body_range`).
        body: Vec<u8>,
        body_range: Range<usize>,
    },
}

/// A new dialog: the initiator endpoint and, when the target service is local, the target
/// endpoint too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialogRecord {
    pub handle: ConversationHandle,
    pub conversation_id: ConversationId,
    pub group: ConversationGroupId,
    pub from_service: String,
    pub to_service: String,
    pub contract: String,
    /// When the dialog's lifetime ends, in milliseconds since the UNIX epoch; 0 = never.
    pub expires_at_ms: u64,
    pub target: Option<(ConversationHandle, ConversationGroupId)>,
    /// For a dialog with a far side on another broker: that broker, if BEGIN DIALOG named it.
    pub far_broker_instance: Option<crate::ids::BrokerInstanceId>,
}

/// A target endpoint created by a dialog's first message from another broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDialogRecord {
    pub handle: ConversationHandle,
    pub conversation_id: ConversationId,
    pub group: ConversationGroupId,
    /// The local (target) service.
    pub service: String,
    pub far_service: String,
    pub contract: String,
    pub far_broker_instance: crate::ids::BrokerInstanceId,
    /// 0 = no lifetime.
    pub expires_at_ms: u64,
}

/// How END CONVERSATION ends a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// EndDialog to the far side, after everything sent before.
    Plain,
    /// An Error message (this XML body, code > 0) to the far side.
    Error {
        code: i32,
        body: Vec<u8>,
        body_range: Range<usize>,
    },
    /// WITH CLEANUP: this side is removed, the far side is not told.
    Cleanup,
}

/// Why a commit record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl From<String> for DecodeError {
    fn from(reason: String) -> DecodeError {
        DecodeError(reason)
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad commit record: {}", self.0)
    }
}

pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut builder = RecordBuilder::new();
    for op in ops {
        builder.push(op);
    }
    builder.finish().to_vec()
}

/// A point of a [`RecordBuilder`]'s record (see [`RecordBuilder::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMark {
    bytes: usize,
    ops: u32,
}

/// A commit record encoded as a transaction goes: each op is written when it is made, message
/// bodies straight from the caller's buffer, so commit has nothing left to copy or encode.
#[derive(Debug)]
pub struct RecordBuilder {
    buf: Vec<u8>,
    ops: u32,
}

impl Default for RecordBuilder {
    fn default() -> RecordBuilder {
        RecordBuilder::new()
    }
}

impl RecordBuilder {
    /// Bytes of a record before its first op: the format version and the op count.
    pub const PREFIX_BYTES: usize = 5;

    pub fn new() -> RecordBuilder {
        let mut buf = Vec::with_capacity(256);
        buf.push(FORMAT_VERSION);
        buf.extend_from_slice(&0u32.to_le_bytes());
        debug_assert_eq!(buf.len(), RecordBuilder::PREFIX_BYTES);
        RecordBuilder { buf, ops: 0 }
    }

    pub fn push(&mut self, op: &Op) {
        encode_op(&mut self.buf, op);
        self.ops += 1;
    }

    /// Appends a `Send` op without building one (no copy of the body but into the record).
    pub fn push_send(
        &mut self,
        handle: ConversationHandle,
        message_type: &str,
        sequence: u64,
        body: &[u8],
    ) {
        encode_send(&mut self.buf, handle, message_type, sequence, body);
        self.ops += 1;
    }

    /// Appends an `Arrive` op without building one (no copy of the body but into the record).
    pub fn push_arrive(
        &mut self,
        handle: ConversationHandle,
        sequence: u64,
        message_type: &str,
        body: &[u8],
    ) {
        encode_arrive(&mut self.buf, handle, sequence, message_type, body);
        self.ops += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Makes room for `bytes` more (ops about to be pushed whose size is known), so that
    /// pushing them does not grow the record step by step, copying it each time.
    pub fn reserve(&mut self, bytes: usize) {
        self.buf.reserve(bytes);
    }

    /// Bytes of the record so far (what [`RecordBuilder::finish`] would return).
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Where the record is now, to [`rewind`](RecordBuilder::rewind) to.
    pub fn mark(&self) -> RecordMark {
        RecordMark {
            bytes: self.buf.len(),
            ops: self.ops,
        }
    }

    /// Drops the ops pushed since `mark` was taken.
    pub fn rewind(&mut self, mark: RecordMark) {
        self.buf.truncate(mark.bytes);
        self.ops = mark.ops;
    }

    pub fn op_count(&self) -> u32 {
        self.ops
    }

    /// The encoded record (the op count filled in).
    pub fn finish(&mut self) -> &[u8] {
        self.buf[1..5].copy_from_slice(&self.ops.to_le_bytes());
        &self.buf
    }
}

mod tag {
    pub const CREATE_MESSAGE_TYPE: u8 = 1;
    pub const DROP_MESSAGE_TYPE: u8 = 2;
    pub const CREATE_CONTRACT: u8 = 3;
    pub const DROP_CONTRACT: u8 = 4;
    pub const CREATE_QUEUE: u8 = 5;
    pub const ALTER_QUEUE: u8 = 6;
    pub const DROP_QUEUE: u8 = 7;
    pub const CREATE_SERVICE: u8 = 8;
    pub const DROP_SERVICE: u8 = 9;
    pub const BEGIN_DIALOG: u8 = 10;
    pub const SEND: u8 = 11;
    pub const RECEIVE: u8 = 12;
    pub const RELOCATE: u8 = 13;
    pub const MOVE_CONVERSATION: u8 = 14;
    pub const RECEIVE_URGENT: u8 = 15;
    pub const END_CONVERSATION: u8 = 16;
    pub const SET_TIMER: u8 = 17;
    pub const FIRE_TIMER: u8 = 18;
    pub const EXPIRE: u8 = 19;
    pub const DISABLE_QUEUE: u8 = 20;
    pub const CREATE_BROKER_PRIORITY: u8 = 21;
    pub const DROP_BROKER_PRIORITY: u8 = 22;
    pub const CREATE_ROUTE: u8 = 23;
    pub const ALTER_ROUTE: u8 = 24;
    pub const DROP_ROUTE: u8 = 25;
    pub const ACCEPT_DIALOG: u8 = 26;
    pub const ARRIVE: u8 = 27;
    pub const TRANSMITTED: u8 = 28;
    pub const FAIL: u8 = 29;
}

/// Kinds of `MessageKey` as logged.
mod key_kind {
    pub const SEQUENCE: u8 = 0;
    pub const DIALOG_TIMER: u8 = 1;
    pub const ERROR: u8 = 2;
    pub const RETAINED: u8 = 3;
    pub const OUTBOUND: u8 = 4;
}

/// A message key: `kind u8 | sequence or queuing order u64`.
pub(crate) fn put_key(out: &mut Vec<u8>, key: MessageKey) {
    let (kind, n) = match key {
        MessageKey::Sequence(sequence) => (key_kind::SEQUENCE, sequence),
        MessageKey::Urgent {
            lane: UrgentLane::DialogTimer,
            queuing_order,
        } => (key_kind::DIALOG_TIMER, queuing_order),
        MessageKey::Urgent {
            lane: UrgentLane::Error,
            queuing_order,
        } => (key_kind::ERROR, queuing_order),
        MessageKey::Retained { queuing_order } => (key_kind::RETAINED, queuing_order),
        MessageKey::Outbound { id } => (key_kind::OUTBOUND, id),
    };
    out.push(kind);
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_optional_instance(out: &mut Vec<u8>, id: Option<crate::ids::BrokerInstanceId>) {
    match id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.0.to_le_bytes());
        }
    }
}

fn put_optional_str(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn encode_op(out: &mut Vec<u8>, op: &Op) {
    match op {
        Op::CreateMessageType { name, validation } => {
            out.push(tag::CREATE_MESSAGE_TYPE);
            put_str(out, name);
            out.push(validation_code(*validation));
        }
        Op::DropMessageType { name } => {
            out.push(tag::DROP_MESSAGE_TYPE);
            put_str(out, name);
        }
        Op::CreateContract { name, messages } => {
            out.push(tag::CREATE_CONTRACT);
            put_str(out, name);
            out.extend_from_slice(&(messages.len() as u16).to_le_bytes());
            for (message_type, sent_by) in messages {
                put_str(out, message_type);
                out.push(sent_by_code(*sent_by));
            }
        }
        Op::DropContract { name } => {
            out.push(tag::DROP_CONTRACT);
            put_str(out, name);
        }
        Op::CreateQueue { name, options } | Op::AlterQueue { name, options } => {
            out.push(if matches!(op, Op::CreateQueue { .. }) {
                tag::CREATE_QUEUE
            } else {
                tag::ALTER_QUEUE
            });
            put_str(out, name);
            out.push(queue_flags(*options));
        }
        Op::DropQueue { name } => {
            out.push(tag::DROP_QUEUE);
            put_str(out, name);
        }
        Op::CreateService {
            name,
            queue,
            contracts,
        } => {
            out.push(tag::CREATE_SERVICE);
            put_str(out, name);
            put_str(out, queue);
            out.extend_from_slice(&(contracts.len() as u16).to_le_bytes());
            for contract in contracts {
                put_str(out, contract);
            }
        }
        Op::DropService { name } => {
            out.push(tag::DROP_SERVICE);
            put_str(out, name);
        }
        Op::BeginDialog(d) => {
            out.push(tag::BEGIN_DIALOG);
            out.extend_from_slice(&d.handle.0.to_le_bytes());
            out.extend_from_slice(&d.conversation_id.0.to_le_bytes());
            out.extend_from_slice(&d.group.0.to_le_bytes());
            put_str(out, &d.from_service);
            put_str(out, &d.to_service);
            put_str(out, &d.contract);
            out.extend_from_slice(&d.expires_at_ms.to_le_bytes());
            match d.target {
                None => out.push(0),
                Some((handle, group)) => {
                    out.push(1);
                    out.extend_from_slice(&handle.0.to_le_bytes());
                    out.extend_from_slice(&group.0.to_le_bytes());
                }
            }
            put_optional_instance(out, d.far_broker_instance);
        }
        Op::Send {
            handle,
            message_type,
            sequence,
            body,
            ..
        } => encode_send(out, *handle, message_type, *sequence, body),
        Op::Receive {
            handle,
            through_sequence,
        } => {
            out.push(tag::RECEIVE);
            out.extend_from_slice(&handle.0.to_le_bytes());
            out.extend_from_slice(&through_sequence.to_le_bytes());
        }
        Op::MoveConversation { handle, group } => {
            out.push(tag::MOVE_CONVERSATION);
            out.extend_from_slice(&handle.0.to_le_bytes());
            out.extend_from_slice(&group.0.to_le_bytes());
        }
        Op::Relocate {
            handle, key, body, ..
        } => {
            out.push(tag::RELOCATE);
            out.extend_from_slice(&handle.0.to_le_bytes());
            put_key(out, *key);
            put_body(out, body);
        }
        Op::ReceiveUrgent {
            handle,
            queuing_order,
        } => {
            out.push(tag::RECEIVE_URGENT);
            out.extend_from_slice(&handle.0.to_le_bytes());
            out.extend_from_slice(&queuing_order.to_le_bytes());
        }
        Op::EndConversation { handle, end } => {
            out.push(tag::END_CONVERSATION);
            out.extend_from_slice(&handle.0.to_le_bytes());
            match end {
                End::Plain => out.push(0),
                End::Error { code, body, .. } => {
                    out.push(1);
                    out.extend_from_slice(&code.to_le_bytes());
                    put_body(out, body);
                }
                End::Cleanup => out.push(2),
            }
        }
        Op::SetTimer {
            handle,
            deadline_ms,
        } => {
            out.push(tag::SET_TIMER);
            out.extend_from_slice(&handle.0.to_le_bytes());
            out.extend_from_slice(&deadline_ms.to_le_bytes());
        }
        Op::FireTimer {
            handle,
            deadline_ms,
        } => {
            out.push(tag::FIRE_TIMER);
            out.extend_from_slice(&handle.0.to_le_bytes());
            out.extend_from_slice(&deadline_ms.to_le_bytes());
        }
        Op::Expire { handle, body, .. } => {
            out.push(tag::EXPIRE);
            out.extend_from_slice(&handle.0.to_le_bytes());
            put_body(out, body);
        }
        Op::DisableQueue { name } => {
            out.push(tag::DISABLE_QUEUE);
            put_str(out, name);
        }
        Op::CreateBrokerPriority(p) => {
            out.push(tag::CREATE_BROKER_PRIORITY);
            put_str(out, &p.name);
            put_optional_str(out, &p.contract);
            put_optional_str(out, &p.local_service);
            put_optional_str(out, &p.remote_service);
            out.push(p.level);
        }
        Op::DropBrokerPriority { name } => {
            out.push(tag::DROP_BROKER_PRIORITY);
            put_str(out, name);
        }
        Op::CreateRoute(route) | Op::AlterRoute(route) => {
            out.push(if matches!(op, Op::CreateRoute(_)) {
                tag::CREATE_ROUTE
            } else {
                tag::ALTER_ROUTE
            });
            put_str(out, &route.name);
            put_optional_str(out, &route.service_name);
            put_optional_instance(out, route.broker_instance);
            put_str(out, &route.address.to_string());
            out.extend_from_slice(&route.expires_at_ms.unwrap_or(0).to_le_bytes());
        }
        Op::DropRoute { name } => {
            out.push(tag::DROP_ROUTE);
            put_str(out, name);
        }
        Op::AcceptDialog(d) => {
            out.push(tag::ACCEPT_DIALOG);
            out.extend_from_slice(&d.handle.0.to_le_bytes());
            out.extend_from_slice(&d.conversation_id.0.to_le_bytes());
            out.extend_from_slice(&d.group.0.to_le_bytes());
            put_str(out, &d.service);
            put_str(out, &d.far_service);
            put_str(out, &d.contract);
            out.extend_from_slice(&d.far_broker_instance.0.to_le_bytes());
            out.extend_from_slice(&d.expires_at_ms.to_le_bytes());
        }
        Op::Arrive {
            handle,
            sequence,
            message_type,
            body,
            ..
        } => encode_arrive(out, *handle, *sequence, message_type, body),
        Op::Transmitted {
            ids,
            far_broker_instance,
        } => {
            out.push(tag::TRANSMITTED);
            out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
            put_optional_instance(out, *far_broker_instance);
        }
        Op::Fail {
            handle, code, body, ..
        } => {
            out.push(tag::FAIL);
            out.extend_from_slice(&handle.0.to_le_bytes());
            out.extend_from_slice(&code.to_le_bytes());
            put_body(out, body);
        }
    }
}

/// The one encoding of a `Send` op, for ops built whole and for `RecordBuilder::push_send`.
fn encode_send(
    out: &mut Vec<u8>,
    handle: ConversationHandle,
    message_type: &str,
    sequence: u64,
    body: &[u8],
) {
    out.push(tag::SEND);
    out.extend_from_slice(&handle.0.to_le_bytes());
    put_str(out, message_type);
    out.extend_from_slice(&sequence.to_le_bytes());
    put_body(out, body);
}

/// Bytes an `Arrive` op of this message type and body takes in a record: what
/// [`RecordBuilder::push_arrive`] appends (`encode_arrive` below; a test keeps them together).
pub fn arrive_op_bytes(message_type: &str, body_bytes: usize) -> usize {
    // tag, handle, sequence, message type (u16 length and bytes), body (u32 length and bytes)
    1 + 16 + 8 + 2 + message_type.len() + 4 + body_bytes
}

/// The one encoding of an `Arrive` op, for ops built whole and for
/// `RecordBuilder::push_arrive`.
fn encode_arrive(
    out: &mut Vec<u8>,
    handle: ConversationHandle,
    sequence: u64,
    message_type: &str,
    body: &[u8],
) {
    out.push(tag::ARRIVE);
    out.extend_from_slice(&handle.0.to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    put_str(out, message_type);
    put_body(out, body);
}

/// A message body: `len u32 | bytes`.
fn put_body(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn validation_code(v: Validation) -> u8 {
    match v {
        Validation::None => 0,
        Validation::Empty => 1,
        Validation::Utf8 => 2,
        Validation::Json => 3,
        Validation::WellFormedXml => 4,
    }
}

fn sent_by_code(s: SentBy) -> u8 {
    match s {
        SentBy::Initiator => 0,
        SentBy::Target => 1,
        SentBy::Any => 2,
    }
}

fn queue_flags(o: QueueOptions) -> u8 {
    (o.enabled as u8) | (o.retention as u8) << 1 | (o.poison_message_handling as u8) << 2
}

/// Decodes a commit record payload. Send ops come back with an empty `body` and the body's
/// place in `payload` as `body_range`, so the caller can borrow it from the log instead of
/// copying it.
pub fn decode(payload: &[u8]) -> Result<Vec<Op>, DecodeError> {
    let mut r = Reader::new(payload, 0);
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(DecodeError(format!("unknown version {version}")));
    }
    let count = r.u32()? as usize;
    // Every op takes at least two bytes: a count beyond that is a lie, not an allocation.
    if count > payload.len() / 2 {
        return Err(DecodeError(format!(
            "{count} ops cannot fit {} bytes",
            payload.len()
        )));
    }
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        ops.push(r.op()?);
    }
    if r.at() != payload.len() {
        return Err(DecodeError(format!(
            "{} trailing bytes after the last op",
            payload.len() - r.at()
        )));
    }
    Ok(ops)
}

impl Reader<'_> {
    fn validation(&mut self) -> Result<Validation, DecodeError> {
        Ok(match self.u8()? {
            0 => Validation::None,
            1 => Validation::Empty,
            2 => Validation::Utf8,
            3 => Validation::Json,
            4 => Validation::WellFormedXml,
            other => return Err(DecodeError(format!("unknown validation {other}"))),
        })
    }

    fn sent_by(&mut self) -> Result<SentBy, DecodeError> {
        Ok(match self.u8()? {
            0 => SentBy::Initiator,
            1 => SentBy::Target,
            2 => SentBy::Any,
            other => return Err(DecodeError(format!("unknown sent-by {other}"))),
        })
    }

    /// A body (`len u32 | bytes`): skipped, its place returned.
    fn body(&mut self) -> Result<Range<usize>, DecodeError> {
        let len = self.u32()? as usize;
        let start = self.at();
        self.take(len)?;
        Ok(start..start + len)
    }

    pub(crate) fn key(&mut self) -> Result<MessageKey, DecodeError> {
        let kind = self.u8()?;
        let n = self.u64()?;
        Ok(match kind {
            key_kind::SEQUENCE => MessageKey::Sequence(n),
            key_kind::DIALOG_TIMER => MessageKey::Urgent {
                lane: UrgentLane::DialogTimer,
                queuing_order: n,
            },
            key_kind::ERROR => MessageKey::Urgent {
                lane: UrgentLane::Error,
                queuing_order: n,
            },
            key_kind::RETAINED => MessageKey::Retained { queuing_order: n },
            key_kind::OUTBOUND => MessageKey::Outbound { id: n },
            other => return Err(DecodeError(format!("unknown message key kind {other}"))),
        })
    }

    fn optional_instance(&mut self) -> Result<Option<crate::ids::BrokerInstanceId>, DecodeError> {
        Ok(match self.u8()? {
            0 => None,
            1 => Some(crate::ids::BrokerInstanceId(self.u128()?)),
            other => return Err(DecodeError(format!("bad option flag {other}"))),
        })
    }

    fn optional_string(&mut self) -> Result<Option<String>, DecodeError> {
        Ok(match self.u8()? {
            0 => None,
            1 => Some(self.string()?),
            other => return Err(DecodeError(format!("bad option flag {other}"))),
        })
    }

    fn queue_options(&mut self) -> Result<QueueOptions, DecodeError> {
        let flags = self.u8()?;
        if flags & !0b111 != 0 {
            return Err(DecodeError(format!("unknown queue flags {flags:#x}")));
        }
        Ok(QueueOptions {
            enabled: flags & 1 != 0,
            retention: flags & 2 != 0,
            poison_message_handling: flags & 4 != 0,
        })
    }

    fn op(&mut self) -> Result<Op, DecodeError> {
        Ok(match self.u8()? {
            tag::CREATE_MESSAGE_TYPE => Op::CreateMessageType {
                name: self.string()?,
                validation: self.validation()?,
            },
            tag::DROP_MESSAGE_TYPE => Op::DropMessageType {
                name: self.string()?,
            },
            tag::CREATE_CONTRACT => {
                let name = self.string()?;
                let count = self.u16()?;
                let mut messages = Vec::new();
                for _ in 0..count {
                    messages.push((self.string()?, self.sent_by()?));
                }
                Op::CreateContract { name, messages }
            }
            tag::DROP_CONTRACT => Op::DropContract {
                name: self.string()?,
            },
            tag::CREATE_QUEUE => Op::CreateQueue {
                name: self.string()?,
                options: self.queue_options()?,
            },
            tag::ALTER_QUEUE => Op::AlterQueue {
                name: self.string()?,
                options: self.queue_options()?,
            },
            tag::DROP_QUEUE => Op::DropQueue {
                name: self.string()?,
            },
            tag::CREATE_SERVICE => {
                let name = self.string()?;
                let queue = self.string()?;
                let count = self.u16()?;
                let mut contracts = Vec::new();
                for _ in 0..count {
                    contracts.push(self.string()?);
                }
                Op::CreateService {
                    name,
                    queue,
                    contracts,
                }
            }
            tag::DROP_SERVICE => Op::DropService {
                name: self.string()?,
            },
            tag::BEGIN_DIALOG => Op::BeginDialog(DialogRecord {
                handle: ConversationHandle(self.u128()?),
                conversation_id: ConversationId(self.u128()?),
                group: ConversationGroupId(self.u128()?),
                from_service: self.string()?,
                to_service: self.string()?,
                contract: self.string()?,
                expires_at_ms: self.u64()?,
                target: match self.u8()? {
                    0 => None,
                    1 => Some((
                        ConversationHandle(self.u128()?),
                        ConversationGroupId(self.u128()?),
                    )),
                    other => return Err(DecodeError(format!("bad target flag {other}"))),
                },
                far_broker_instance: self.optional_instance()?,
            }),
            tag::SEND => {
                let handle = ConversationHandle(self.u128()?);
                let message_type = self.string()?;
                let sequence = self.u64()?;
                let len = self.u32()? as usize;
                let start = self.at();
                self.take(len)?;
                Op::Send {
                    handle,
                    message_type,
                    sequence,
                    body: Vec::new(),
                    body_range: start..start + len,
                }
            }
            tag::RECEIVE => Op::Receive {
                handle: ConversationHandle(self.u128()?),
                through_sequence: self.u64()?,
            },
            tag::MOVE_CONVERSATION => Op::MoveConversation {
                handle: ConversationHandle(self.u128()?),
                group: ConversationGroupId(self.u128()?),
            },
            tag::RELOCATE => {
                let handle = ConversationHandle(self.u128()?);
                let key = self.key()?;
                Op::Relocate {
                    handle,
                    key,
                    body: Vec::new(),
                    body_range: self.body()?,
                }
            }
            tag::RECEIVE_URGENT => Op::ReceiveUrgent {
                handle: ConversationHandle(self.u128()?),
                queuing_order: self.u64()?,
            },
            tag::END_CONVERSATION => {
                let handle = ConversationHandle(self.u128()?);
                let end = match self.u8()? {
                    0 => End::Plain,
                    1 => {
                        let code = self.u32()? as i32;
                        End::Error {
                            code,
                            body: Vec::new(),
                            body_range: self.body()?,
                        }
                    }
                    2 => End::Cleanup,
                    other => return Err(DecodeError(format!("unknown end kind {other}"))),
                };
                Op::EndConversation { handle, end }
            }
            tag::SET_TIMER => Op::SetTimer {
                handle: ConversationHandle(self.u128()?),
                deadline_ms: self.u64()?,
            },
            tag::FIRE_TIMER => Op::FireTimer {
                handle: ConversationHandle(self.u128()?),
                deadline_ms: self.u64()?,
            },
            tag::EXPIRE => Op::Expire {
                handle: ConversationHandle(self.u128()?),
                body: Vec::new(),
                body_range: self.body()?,
            },
            tag::DISABLE_QUEUE => Op::DisableQueue {
                name: self.string()?,
            },
            tag::CREATE_BROKER_PRIORITY => {
                Op::CreateBrokerPriority(crate::catalog::BrokerPriority {
                    name: self.string()?,
                    contract: self.optional_string()?,
                    local_service: self.optional_string()?,
                    remote_service: self.optional_string()?,
                    level: self.u8()?,
                })
            }
            tag::DROP_BROKER_PRIORITY => Op::DropBrokerPriority {
                name: self.string()?,
            },
            tag @ (tag::CREATE_ROUTE | tag::ALTER_ROUTE) => {
                let route = crate::catalog::Route {
                    name: self.string()?,
                    service_name: self.optional_string()?,
                    broker_instance: self.optional_instance()?,
                    address: {
                        let text = self.string()?;
                        crate::catalog::RouteAddress::parse(&text)
                            .map_err(|e| DecodeError(e.to_string()))?
                    },
                    expires_at_ms: Some(self.u64()?).filter(|ms| *ms != 0),
                };
                if tag == tag::CREATE_ROUTE {
                    Op::CreateRoute(route)
                } else {
                    Op::AlterRoute(route)
                }
            }
            tag::DROP_ROUTE => Op::DropRoute {
                name: self.string()?,
            },
            tag::ACCEPT_DIALOG => Op::AcceptDialog(RemoteDialogRecord {
                handle: ConversationHandle(self.u128()?),
                conversation_id: ConversationId(self.u128()?),
                group: ConversationGroupId(self.u128()?),
                service: self.string()?,
                far_service: self.string()?,
                contract: self.string()?,
                far_broker_instance: crate::ids::BrokerInstanceId(self.u128()?),
                expires_at_ms: self.u64()?,
            }),
            tag::ARRIVE => Op::Arrive {
                handle: ConversationHandle(self.u128()?),
                sequence: self.u64()?,
                message_type: self.string()?,
                body: Vec::new(),
                body_range: self.body()?,
            },
            tag::TRANSMITTED => {
                let count = self.u32()? as usize;
                // Each id takes eight bytes: a count beyond what is left is a lie.
                if count > self.remaining() / 8 {
                    return Err(DecodeError(format!("{count} transmission ids cannot fit")));
                }
                let mut ids = Vec::with_capacity(count);
                for _ in 0..count {
                    ids.push(self.u64()?);
                }
                Op::Transmitted {
                    ids,
                    far_broker_instance: self.optional_instance()?,
                }
            }
            tag::FAIL => {
                let handle = ConversationHandle(self.u128()?);
                let code = self.u32()? as i32;
                Op::Fail {
                    handle,
                    code,
                    body: Vec::new(),
                    body_range: self.body()?,
                }
            }
            other => return Err(DecodeError(format!("unknown op tag {other}"))),
        })
    }
}

/// Fuzzing entry point: decoding arbitrary bytes never panics, and what decodes re-encodes to
/// the same bytes.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(ops) = decode(data) {
        let ops: Vec<Op> = ops
            .into_iter()
            .map(|op| match op {
                Op::Send {
                    handle,
                    message_type,
                    sequence,
                    body_range,
                    ..
                } => Op::Send {
                    handle,
                    message_type,
                    sequence,
                    body: data[body_range.clone()].to_vec(),
                    body_range,
                },
                Op::Relocate {
                    handle,
                    key,
                    body_range,
                    ..
                } => Op::Relocate {
                    handle,
                    key,
                    body: data[body_range.clone()].to_vec(),
                    body_range,
                },
                Op::Arrive {
                    handle,
                    sequence,
                    message_type,
                    body_range,
                    ..
                } => Op::Arrive {
                    handle,
                    sequence,
                    message_type,
                    body: data[body_range.clone()].to_vec(),
                    body_range,
                },
                Op::Fail {
                    handle,
                    code,
                    body_range,
                    ..
                } => Op::Fail {
                    handle,
                    code,
                    body: data[body_range.clone()].to_vec(),
                    body_range,
                },
                Op::Expire {
                    handle, body_range, ..
                } => Op::Expire {
                    handle,
                    body: data[body_range.clone()].to_vec(),
                    body_range,
                },
                Op::EndConversation {
                    handle,
                    end:
                        End::Error {
                            code, body_range, ..
                        },
                } => Op::EndConversation {
                    handle,
                    end: End::Error {
                        code,
                        body: data[body_range.clone()].to_vec(),
                        body_range,
                    },
                },
                other => other,
            })
            .collect();
        assert_eq!(encode(&ops), data, "decode then encode must round-trip");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrive_op_bytes_is_what_push_arrive_appends() {
        for (message_type, body) in [
            ("", 0usize),
            ("//t/Ask", 1),
            ("x".repeat(128).as_str(), 70_000),
        ] {
            let mut record = RecordBuilder::new();
            let before = record.len_bytes();
            record.push_arrive(ConversationHandle(7), 3, message_type, &vec![1u8; body]);
            assert_eq!(
                record.len_bytes() - before,
                arrive_op_bytes(message_type, body),
                "{message_type:?}, {body} bytes"
            );
        }
        // And a mark rewinds exactly what came after it.
        let mut record = RecordBuilder::new();
        record.push_arrive(ConversationHandle(1), 0, "//t/Ask", b"kept");
        let mark = record.mark();
        let kept = record.finish().to_vec();
        record.push_arrive(ConversationHandle(1), 1, "//t/Ask", b"dropped");
        record.rewind(mark);
        assert_eq!(record.op_count(), 1);
        assert_eq!(record.finish(), &kept[..]);
    }

    #[test]
    fn push_arrive_encodes_the_op_it_stands_for() {
        let op = Op::Arrive {
            handle: ConversationHandle(7),
            sequence: 41,
            message_type: "//t/Ask".into(),
            body: b"arrived body".to_vec(),
            body_range: 0..0,
        };
        let mut whole = RecordBuilder::new();
        whole.push(&op);
        let mut parts = RecordBuilder::new();
        parts.push_arrive(ConversationHandle(7), 41, "//t/Ask", b"arrived body");
        let bytes = parts.finish().to_vec();
        assert_eq!(bytes, whole.finish());
        let decoded = decode(&bytes).unwrap();
        assert!(
            matches!(&decoded[..], [Op::Arrive { sequence: 41, message_type, body_range, .. }]
                if message_type == "//t/Ask" && &bytes[body_range.clone()] == b"arrived body"),
            "{decoded:?}"
        );
    }

    fn sample() -> Vec<Op> {
        vec![
            Op::CreateMessageType {
                name: "//t".into(),
                validation: Validation::Json,
            },
            Op::CreateContract {
                name: "//c".into(),
                messages: vec![("//t".into(), SentBy::Initiator)],
            },
            Op::CreateQueue {
                name: "Q".into(),
                options: QueueOptions::default(),
            },
            Op::CreateService {
                name: "//s".into(),
                queue: "Q".into(),
                contracts: vec!["//c".into()],
            },
            Op::BeginDialog(DialogRecord {
                handle: ConversationHandle(1),
                conversation_id: ConversationId(2),
                group: ConversationGroupId(3),
                from_service: "//s".into(),
                to_service: "//s".into(),
                contract: "//c".into(),
                expires_at_ms: 60_000,
                target: Some((ConversationHandle(4), ConversationGroupId(5))),
                far_broker_instance: None,
            }),
            Op::Send {
                handle: ConversationHandle(1),
                message_type: "//t".into(),
                sequence: 0,
                body: b"{\"a\":1}".to_vec(),
                body_range: 0..0,
            },
            Op::Receive {
                handle: ConversationHandle(4),
                through_sequence: 0,
            },
            Op::SetTimer {
                handle: ConversationHandle(4),
                deadline_ms: 9,
            },
            Op::FireTimer {
                handle: ConversationHandle(4),
                deadline_ms: 9,
            },
            Op::ReceiveUrgent {
                handle: ConversationHandle(4),
                queuing_order: 3,
            },
            Op::Expire {
                handle: ConversationHandle(1),
                body: crate::system::lifetime_expired_body(),
                body_range: 0..0,
            },
            Op::EndConversation {
                handle: ConversationHandle(1),
                end: End::Error {
                    code: 7,
                    body: crate::system::error_body(7, "no"),
                    body_range: 0..0,
                },
            },
            Op::EndConversation {
                handle: ConversationHandle(4),
                end: End::Plain,
            },
            Op::EndConversation {
                handle: ConversationHandle(4),
                end: End::Cleanup,
            },
            Op::Relocate {
                handle: ConversationHandle(4),
                key: MessageKey::Urgent {
                    lane: UrgentLane::Error,
                    queuing_order: 3,
                },
                body: b"x".to_vec(),
                body_range: 0..0,
            },
            Op::DisableQueue { name: "Q".into() },
            Op::CreateBrokerPriority(crate::catalog::BrokerPriority {
                name: "p".into(),
                contract: Some("//c".into()),
                local_service: None,
                remote_service: Some("//far".into()),
                level: 7,
            }),
            Op::DropBrokerPriority { name: "p".into() },
            Op::CreateRoute(crate::catalog::Route {
                name: "r".into(),
                service_name: Some("//far".into()),
                broker_instance: Some(crate::ids::BrokerInstanceId(9)),
                address: crate::catalog::RouteAddress::Quic {
                    host: "node-b".into(),
                    port: 4022,
                },
                expires_at_ms: Some(5),
            }),
            Op::AlterRoute(crate::catalog::Route {
                name: "r".into(),
                service_name: None,
                broker_instance: None,
                address: crate::catalog::RouteAddress::Local,
                expires_at_ms: None,
            }),
            Op::DropRoute { name: "r".into() },
            Op::AcceptDialog(RemoteDialogRecord {
                handle: ConversationHandle(11),
                conversation_id: ConversationId(12),
                group: ConversationGroupId(13),
                service: "//s".into(),
                far_service: "//far".into(),
                contract: "//c".into(),
                far_broker_instance: crate::ids::BrokerInstanceId(14),
                expires_at_ms: 0,
            }),
            Op::Arrive {
                handle: ConversationHandle(11),
                sequence: 0,
                message_type: "//t".into(),
                body: b"from afar".to_vec(),
                body_range: 0..0,
            },
            Op::Transmitted {
                ids: vec![1, 2, 3],
                far_broker_instance: Some(crate::ids::BrokerInstanceId(14)),
            },
            Op::Fail {
                handle: ConversationHandle(1),
                code: -8408,
                body: crate::system::error_body(-8408, "no"),
                body_range: 0..0,
            },
        ]
    }

    #[test]
    fn ops_round_trip_and_bodies_are_located() {
        let bytes = encode(&sample());
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.len(), sample().len());
        match &decoded[5] {
            Op::Send { body_range, .. } => assert_eq!(&bytes[body_range.clone()], b"{\"a\":1}"),
            other => panic!("expected Send, got {other:?}"),
        }
        fuzz_decode(&bytes);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode(&extra).is_err());
    }
}
