//! The client protocol's frames (`herald-client/1`), sans-IO: encoding, a streaming decoder, and
//! their limits. `net/PROTOCOL.md` ("Client protocol") lays them out byte by byte.
//!
//! A client connection carries one bidirectional stream. The client writes a [`Request`]; the
//! server answers with one or more [`Response`] frames; only then does the client write the
//! next request. Most requests get one response frame. Two stream theirs, so that no frame has
//! to hold a whole result: `Execute` gets, per statement that ran, a `Statement` frame and the
//! result set's values in `Values` frames (row after row, as many frames as needed), then `Done`
//! or `Error`; a `Receive` gets one `Message` frame per message, then `Done` (or `Error`).
//!
//! Invariants, as in `proto::frame`:
//!
//! 1. Every limit is checked on both sides: [`Request::encode`] and [`Response::encode`] refuse
//!    what the decoder would refuse, so a Herald peer never sends what the other must reject.
//! 2. Decoding never panics, and never buffers more than a frame's declared size, which is
//!    checked against [`CLIENT_FRAME_BYTES_MAX`] (and the kind against the direction's kinds)
//!    before a byte of payload is kept.
//! 3. The encoding is canonical: bytes that decode encode back to the same bytes (option tags
//!    are 0 or 1, flag bits that mean nothing are 0), so the fuzzer checks a round trip.

use herald_engine::sql::{SCRIPT_BYTES_MAX, VALUE_BYTES_MAX, Value};

use crate::error::{Error, Result};
use crate::payload::{FrameBuffer, Reader};

/// The client protocol version this build speaks; both Hellos carry it.
pub const CLIENT_PROTOCOL_VERSION: u16 = 1;

/// First bytes of both Hellos: a stream from something that is not a Herald client (or server)
/// is refused on its first frame.
pub const CLIENT_HELLO_MAGIC: [u8; 4] = *b"HRLC";

/// Bytes before a frame's payload: `payload_len u32 | kind u8`.
pub const CLIENT_FRAME_HEADER_BYTES: usize = 5;

/// Largest frame, header included, in either direction. It holds the largest request (a script
/// of [`CLIENT_SCRIPT_BYTES_MAX`], or a SEND of a largest body) and the largest single response
/// frame: a `Statement` frame's column names come from the script (at most its length, plus
/// two bytes of length each for at most `sql::LIST_ITEMS_MAX` of them), and one value is at
/// most `sql::VALUE_BYTES_MAX`. Results bigger than a frame are streamed over several frames.
pub const CLIENT_FRAME_BYTES_MAX: usize = SCRIPT_BYTES_MAX + 256 * 1024;

/// Longest script of an `Execute` request: the engine's own script limit.
pub const CLIENT_SCRIPT_BYTES_MAX: usize = SCRIPT_BYTES_MAX;

/// Longest name on the wire (service, contract, message type, queue, column, statement kind),
/// in UTF-8 bytes.
pub const CLIENT_NAME_BYTES_MAX: usize = 256;

/// Longest error message in an `Error` response, in UTF-8 bytes (longer ones are cut).
pub const CLIENT_ERROR_MESSAGE_BYTES_MAX: usize = 64 * 1024;

/// Longest text of a status line (a transmission status, a peer's address), in UTF-8 bytes
/// (longer ones are cut).
pub const STATUS_TEXT_BYTES_MAX: usize = 1024;

/// Most rows of each list of a `Status` response (queues, endpoint states, transmission
/// statuses, peers); the rest is left out and `truncated` set. With the names and texts cut to
/// their limits, a largest status fits a frame.
pub const STATUS_ROWS_MAX: usize = 4096;

/// Largest message body in a `Send` request or a `Message` response: the engine's.
pub const CLIENT_BODY_BYTES_MAX: usize = herald_engine::MESSAGE_BODY_BYTES_MAX;

/// Most conversations one `Send` request sends on.
pub const CLIENT_SEND_HANDLES_MAX: usize = 4096;

/// `Values` frames hold at most this many bytes of values, so that a result set goes in frames
/// of a few MiB (a value larger than this goes alone in its frame).
pub const VALUES_FRAME_BYTES_TARGET: usize = 4 * 1024 * 1024;

/// `wait_ms` of a Receive or GetConversationGroup that waits forever (T-SQL's TIMEOUT -1).
pub const WAIT_FOREVER_MS: u64 = u64::MAX;

// The largest request of each kind fits a frame; lengths fit their wire fields.
const _: () =
    assert!(CLIENT_FRAME_HEADER_BYTES + 4 + CLIENT_SCRIPT_BYTES_MAX <= CLIENT_FRAME_BYTES_MAX);
const _: () = assert!(
    CLIENT_FRAME_HEADER_BYTES
        + 2
        + 16 * CLIENT_SEND_HANDLES_MAX
        + 2
        + CLIENT_NAME_BYTES_MAX
        + 4
        + CLIENT_BODY_BYTES_MAX
        <= CLIENT_FRAME_BYTES_MAX
);
const _: () =
    assert!(CLIENT_FRAME_HEADER_BYTES + 4 + 5 + VALUE_BYTES_MAX <= CLIENT_FRAME_BYTES_MAX);
const _: () = assert!(CLIENT_FRAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(CLIENT_NAME_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(STATUS_TEXT_BYTES_MAX <= u16::MAX as usize);
// A largest status: queues (name, 3 flags, 3 counts), states, statuses, peers.
const _: () = assert!(
    CLIENT_FRAME_HEADER_BYTES
        + 1
        + 4 * 4
        + STATUS_ROWS_MAX * (2 + CLIENT_NAME_BYTES_MAX + 3 + 24)
        + STATUS_ROWS_MAX * (2 + CLIENT_NAME_BYTES_MAX + 8)
        + STATUS_ROWS_MAX * (2 + STATUS_TEXT_BYTES_MAX + 8)
        + STATUS_ROWS_MAX * (2 + STATUS_TEXT_BYTES_MAX + 33 + 1 + 8)
        <= CLIENT_FRAME_BYTES_MAX
);

const KIND_HELLO: u8 = 1;
const KIND_EXECUTE: u8 = 2;
const KIND_BEGIN_TRANSACTION: u8 = 3;
const KIND_COMMIT: u8 = 4;
const KIND_ROLLBACK: u8 = 5;
const KIND_BEGIN_DIALOG: u8 = 6;
const KIND_SEND: u8 = 7;
const KIND_RECEIVE: u8 = 8;
const KIND_GET_CONVERSATION_GROUP: u8 = 9;
const KIND_END_CONVERSATION: u8 = 10;
const KIND_BEGIN_CONVERSATION_TIMER: u8 = 11;
const KIND_MOVE_CONVERSATION: u8 = 12;
const KIND_STATUS: u8 = 13;
const KIND_SESSION_STATE: u8 = 14;
const REQUEST_KINDS: std::ops::RangeInclusive<u8> = KIND_HELLO..=KIND_SESSION_STATE;

const KIND_SERVER_HELLO: u8 = 64;
const KIND_OK: u8 = 65;
const KIND_ERROR: u8 = 66;
const KIND_DIALOG: u8 = 67;
const KIND_GROUP: u8 = 68;
const KIND_MESSAGE: u8 = 69;
const KIND_STATEMENT: u8 = 70;
const KIND_VALUES: u8 = 71;
const KIND_DONE: u8 = 72;
const KIND_STATUS_REPORT: u8 = 73;
const KIND_SESSION: u8 = 74;
const RESPONSE_KINDS: std::ops::RangeInclusive<u8> = KIND_SERVER_HELLO..=KIND_SESSION;

/// What a client asks; see the module documentation for the responses each gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The first frame of a stream: `Response::Hello` or a closed connection answers it.
    Hello {
        protocol_version: u16,
    },
    /// Runs a T-SQL script in the session (`sql::Session::execute_script`).
    Execute {
        script: String,
    },
    /// BEGIN TRANSACTION, COMMIT, ROLLBACK: the session's explicit transaction, shared with
    /// its T-SQL (they nest as `@@TRANCOUNT` does).
    BeginTransaction,
    Commit,
    Rollback,
    /// → `Dialog`.
    BeginDialog(BeginDialog),
    /// → `Ok`.
    Send {
        /// One message on each (`Transaction::send_many`): 1 to
        /// [`CLIENT_SEND_HANDLES_MAX`] distinct handles.
        handles: Vec<u128>,
        message_type: String,
        body: Vec<u8>,
    },
    /// → `Message`* then `Done`.
    Receive(ReceiveRequest),
    /// → `Group`.
    GetConversationGroup {
        queue: String,
        wait_ms: Option<u64>,
    },
    /// → `Ok`.
    EndConversation {
        handle: u128,
        how: EndHow,
    },
    /// → `Ok`.
    BeginConversationTimer {
        handle: u128,
        timeout_ms: u64,
    },
    /// → `Ok`.
    MoveConversation {
        handle: u128,
        group: u128,
    },
    /// → `Status`.
    Status,
    /// → `Session`: the session's own state (what a shell shows in its prompt).
    SessionState,
}

/// The fields of `Request::BeginDialog` (`Transaction::begin_dialog`'s).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BeginDialog {
    pub from_service: String,
    pub to_service: String,
    pub contract: String,
    pub related_conversation: Option<u128>,
    pub related_conversation_group: Option<u128>,
    pub lifetime_secs: Option<u64>,
    pub target_broker_instance: Option<u128>,
}

/// The fields of `Request::Receive` (`Transaction::receive`'s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveRequest {
    pub queue: String,
    pub top: u32,
    pub filter: ReceiveFilter,
    /// WAITFOR: milliseconds to wait ([`WAIT_FOREVER_MS`]: forever); `None`: do not wait.
    pub wait_ms: Option<u64>,
}

/// RECEIVE's WHERE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveFilter {
    None,
    Conversation(u128),
    Group(u128),
}

/// How END CONVERSATION ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndHow {
    Plain,
    Error { code: i32, description: String },
    Cleanup,
}

/// What a server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The answer to the client's Hello: the node's version and broker instance.
    Hello {
        protocol_version: u16,
        broker_instance: u128,
    },
    /// The request succeeded and returns nothing.
    Ok,
    /// The request failed (ends a streamed response too).
    Error(RemoteError),
    /// The handle of a dialog begun.
    Dialog { handle: u128 },
    /// GET CONVERSATION GROUP's group (`None`: nothing came in time).
    Group { group: Option<u128> },
    /// One received message.
    Message(ReceivedMessage),
    /// A statement of an `Execute` ran; its result set's values follow in `Values` frames when
    /// `columns` is `Some`, `rows` rows of them.
    Statement {
        statement: String,
        rows_affected: Option<u64>,
        /// `(columns, rows)` of the result set, if the statement returns one.
        result: Option<(Vec<String>, u64)>,
    },
    /// The next values of the current result set, row after row.
    Values(Vec<Value>),
    /// A streamed response is complete.
    Done,
    /// The answer to `Status`.
    Status(StatusReport),
    /// The answer to `SessionState`: the session's `@@TRANCOUNT` (0: no explicit transaction
    /// is open).
    Session { transaction_count: u32 },
}

/// A message returned by a structured RECEIVE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub conversation_handle: u128,
    pub conversation_group: u128,
    pub message_type: String,
    pub sequence: u64,
    pub queuing_order: u64,
    /// Service Broker's `status` code (1: ready).
    pub status: u8,
    pub body: Vec<u8>,
}

/// An error the server reports: its kind, where (for statement and syntax errors) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub kind: RemoteErrorKind,
    /// 1-based line and column of the offending token (syntax) or of the top-level statement
    /// that failed (statement errors).
    pub position: Option<(u32, u32)>,
    /// The kind of the statement that failed (`"SEND"`), for statement errors.
    pub statement: Option<String>,
    /// What went wrong (for a statement error, the cause, without the position).
    pub message: String,
}

/// Which kind of engine error a [`RemoteError`] carries (the engine's `Error` variants,
/// grouped where a client acts alike on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemoteErrorKind {
    /// The script does not parse; nothing ran.
    Syntax = 1,
    /// A named object (message type, contract, queue, service, conversation, group, route,
    /// priority) does not exist.
    NotFound = 2,
    /// An object of that name exists already.
    AlreadyExists = 3,
    /// An object is in use and cannot be dropped.
    InUse = 4,
    /// A name, contract, route, priority or error code is not valid.
    Invalid = 5,
    /// A message breaks its contract or its type's validation.
    ContractViolation = 6,
    /// The conversation is ended or in error, or the service does not accept the contract.
    ConversationClosed = 7,
    /// The queue is disabled (STATUS = OFF).
    QueueDisabled = 8,
    /// A lock wait timed out.
    LockTimeout = 9,
    /// A T-SQL statement could not run (undeclared variable, failed conversion, COMMIT with no
    /// transaction).
    Sql = 10,
    /// A T-SQL feature Herald does not run.
    Unsupported = 11,
    /// A size or count limit.
    Limit = 12,
    /// The wait was interrupted because the session is ending.
    Interrupted = 13,
    /// Storage failed, or something else went wrong on the node.
    Internal = 14,
    /// The request itself was refused (not valid in this state).
    BadRequest = 15,
    /// The node's disk is full: nothing was changed, and the same request can succeed once
    /// space is freed (Service Broker's "transaction log full").
    StorageFull = 16,
}

impl RemoteErrorKind {
    fn from_code(code: u8) -> Option<RemoteErrorKind> {
        use RemoteErrorKind::*;
        Some(match code {
            1 => Syntax,
            2 => NotFound,
            3 => AlreadyExists,
            4 => InUse,
            5 => Invalid,
            6 => ContractViolation,
            7 => ConversationClosed,
            8 => QueueDisabled,
            9 => LockTimeout,
            10 => Sql,
            11 => Unsupported,
            12 => Limit,
            13 => Interrupted,
            14 => Internal,
            15 => BadRequest,
            16 => StorageFull,
            _ => return None,
        })
    }

    /// The kind of an engine error (a statement error has its cause's kind).
    pub fn of(error: &herald_engine::Error) -> RemoteErrorKind {
        use herald_engine::Error as E;
        match error {
            E::Syntax { .. } => RemoteErrorKind::Syntax,
            E::Statement { source, .. } => RemoteErrorKind::of(source),
            E::UnknownMessageType(_)
            | E::UnknownContract(_)
            | E::UnknownQueue(_)
            | E::UnknownService(_)
            | E::UnknownConversation(_)
            | E::UnknownConversationGroup { .. }
            | E::UnknownPriority(_)
            | E::UnknownRoute(_) => RemoteErrorKind::NotFound,
            E::AlreadyExists { .. } => RemoteErrorKind::AlreadyExists,
            E::InUse { .. } => RemoteErrorKind::InUse,
            E::InvalidPriority { .. }
            | E::InvalidErrorCode(_)
            | E::DescriptionTooLong { .. }
            | E::InvalidRoute { .. }
            | E::InvalidActivation(_)
            | E::InvalidName { .. }
            | E::InvalidContract { .. }
            | E::GroupOnOtherQueue { .. }
            | E::WrongQueue { .. }
            | E::NoConversation
            | E::DuplicateHandle(_) => RemoteErrorKind::Invalid,
            E::ContractViolation { .. } | E::ValidationFailed { .. } => {
                RemoteErrorKind::ContractViolation
            }
            E::ConversationClosed { .. } | E::ContractNotAccepted { .. } => {
                RemoteErrorKind::ConversationClosed
            }
            E::QueueDisabled(_) => RemoteErrorKind::QueueDisabled,
            E::LockTimeout { .. } | E::CatalogLockTimeout { .. } => RemoteErrorKind::LockTimeout,
            E::Sql(_) => RemoteErrorKind::Sql,
            E::Unsupported(_) => RemoteErrorKind::Unsupported,
            E::Limit { .. } | E::BodyTooLarge { .. } | E::TransactionTooLarge { .. } => {
                RemoteErrorKind::Limit
            }
            E::Interrupted => RemoteErrorKind::Interrupted,
            E::Storage(herald_engine::StorageError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::StorageFull =>
            {
                RemoteErrorKind::StorageFull
            }
            _ => RemoteErrorKind::Internal,
        }
    }
}

impl RemoteError {
    /// The wire form of an engine error: a syntax error keeps its position and message, a
    /// statement error its position, statement kind and cause.
    pub fn from_engine(error: &herald_engine::Error) -> RemoteError {
        use herald_engine::Error as E;
        let kind = RemoteErrorKind::of(error);
        let (position, statement, message) = match error {
            E::Syntax {
                line,
                column,
                message,
            } => (Some((*line, *column)), None, message.clone()),
            E::Statement {
                line,
                column,
                statement,
                source,
            } => (
                Some((*line, *column)),
                Some((*statement).to_owned()),
                source.to_string(),
            ),
            other => (None, None, other.to_string()),
        };
        RemoteError {
            kind,
            position,
            statement,
            message: cut(message, CLIENT_ERROR_MESSAGE_BYTES_MAX),
        }
    }

    /// An error about the request itself.
    pub fn bad_request(message: impl Into<String>) -> RemoteError {
        RemoteError {
            kind: RemoteErrorKind::BadRequest,
            position: None,
            statement: None,
            message: cut(message.into(), CLIENT_ERROR_MESSAGE_BYTES_MAX),
        }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.position, &self.statement, self.kind) {
            (Some((line, column)), _, RemoteErrorKind::Syntax) => write!(
                f,
                "syntax error at line {line}, column {column}: {}",
                self.message
            ),
            (Some((line, column)), Some(statement), _) => {
                write!(
                    f,
                    "line {line}, column {column}: {statement}: {}",
                    self.message
                )
            }
            _ => f.write_str(&self.message),
        }
    }
}

/// What `herald status` shows: the node's queues, conversations and transmission queue, and
/// its peers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusReport {
    /// This node's broker instance.
    pub broker_instance: u128,
    pub queues: Vec<QueueStatus>,
    /// Conversation endpoints by state code (`CO`, `DI`, …), in Service Broker's state order.
    pub endpoints_by_state: Vec<(String, u64)>,
    /// Transmission-queue messages by status text (empty text: not tried yet).
    pub transmission_by_status: Vec<(String, u64)>,
    pub peers: Vec<PeerStatus>,
    /// A list had more than [`STATUS_ROWS_MAX`] rows, and only those are here.
    pub truncated: bool,
}

impl StatusReport {
    /// The status of `broker` without peers (those are the node's to add, with
    /// [`StatusReport::add_peers`]): queues by name, endpoints by state in Service Broker's
    /// order, the transmission queue by status text; each list cut to [`STATUS_ROWS_MAX`] and
    /// each text to [`STATUS_TEXT_BYTES_MAX`], `truncated` saying whether a list was cut.
    pub fn of_broker(broker: &herald_engine::Broker) -> StatusReport {
        let mut queues: Vec<QueueStatus> = broker
            .queues()
            .into_iter()
            .map(|q| QueueStatus {
                name: q.name,
                enabled: q.options.enabled,
                retention: q.options.retention,
                poison_message_handling: q.options.poison_message_handling,
                messages: q.messages,
                groups_with_messages: q.groups_with_messages,
                retained_messages: q.retained_messages,
            })
            .collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        let endpoints_by_state = broker
            .endpoint_state_counts()
            .into_iter()
            .map(|(state, count)| (state.code().to_owned(), count))
            .collect();
        let mut statuses: std::collections::BTreeMap<String, u64> = Default::default();
        for (text, count) in broker.transmission_status_counts() {
            *statuses
                .entry(cut(text, STATUS_TEXT_BYTES_MAX))
                .or_default() += count;
        }
        let mut report = StatusReport {
            broker_instance: broker.broker_instance().0,
            queues,
            endpoints_by_state,
            transmission_by_status: statuses.into_iter().collect(),
            peers: Vec::new(),
            truncated: false,
        };
        report.truncated |= report.queues.len() > STATUS_ROWS_MAX
            || report.transmission_by_status.len() > STATUS_ROWS_MAX;
        report.queues.truncate(STATUS_ROWS_MAX);
        report.transmission_by_status.truncate(STATUS_ROWS_MAX);
        report
    }

    /// Adds `peers`, sorted by address and cut to [`STATUS_ROWS_MAX`].
    pub fn add_peers(&mut self, mut peers: Vec<PeerStatus>) {
        peers.sort_by(|a, b| a.address.cmp(&b.address));
        self.truncated |= peers.len() > STATUS_ROWS_MAX;
        peers.truncate(STATUS_ROWS_MAX);
        self.peers = peers;
    }
}

/// One queue in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStatus {
    pub name: String,
    /// STATUS = ON.
    pub enabled: bool,
    pub retention: bool,
    pub poison_message_handling: bool,
    /// Messages waiting (or being received by an open transaction).
    pub messages: u64,
    pub groups_with_messages: u64,
    /// Messages kept by RETENTION.
    pub retained_messages: u64,
}

/// One peer node in a [`StatusReport`]: an address routes name or a connection's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// `host:port` (as a route names it) or the connection's address.
    pub address: String,
    /// The certificate it presented, once it connected.
    pub fingerprint: Option<[u8; 32]>,
    pub connected: bool,
    /// Messages sent to it and not acknowledged yet.
    pub unacknowledged_messages: u64,
}

impl Request {
    /// The request kind's name, for errors and logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Execute { .. } => "execute",
            Request::BeginTransaction => "begin-transaction",
            Request::Commit => "commit",
            Request::Rollback => "rollback",
            Request::BeginDialog(_) => "begin-dialog",
            Request::Send { .. } => "send",
            Request::Receive(_) => "receive",
            Request::GetConversationGroup { .. } => "get-conversation-group",
            Request::EndConversation { .. } => "end-conversation",
            Request::BeginConversationTimer { .. } => "begin-conversation-timer",
            Request::MoveConversation { .. } => "move-conversation",
            Request::Status => "status",
            Request::SessionState => "session-state",
        }
    }

    /// Appends the frame to `out` after checking every limit the decoder checks; on error
    /// `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        encode_or_nothing(out, |out| self.encode_inner(out))
    }

    /// The frame encoded into a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    fn encode_inner(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut w = Writer::begin(out, self.kind());
        match self {
            Request::Hello { protocol_version } => {
                w.bytes(&CLIENT_HELLO_MAGIC);
                w.u16(*protocol_version);
            }
            Request::Execute { script } => {
                w.long_str("script", script, CLIENT_SCRIPT_BYTES_MAX)?;
            }
            Request::BeginTransaction
            | Request::Commit
            | Request::Rollback
            | Request::Status
            | Request::SessionState => {}
            Request::BeginDialog(d) => {
                w.name("from service", &d.from_service)?;
                w.name("to service", &d.to_service)?;
                w.name("contract", &d.contract)?;
                w.opt_id(d.related_conversation);
                w.opt_id(d.related_conversation_group);
                w.opt_u64(d.lifetime_secs);
                w.opt_id(d.target_broker_instance);
            }
            Request::Send {
                handles,
                message_type,
                body,
            } => {
                if handles.is_empty() || handles.len() > CLIENT_SEND_HANDLES_MAX {
                    return Err(Error::Malformed {
                        frame: "request",
                        reason: format!(
                            "a send on {} conversations; 1 to {CLIENT_SEND_HANDLES_MAX} are allowed",
                            handles.len()
                        ),
                    });
                }
                w.u16(handles.len() as u16);
                for handle in handles {
                    w.id(*handle);
                }
                w.name("message type", message_type)?;
                w.blob("message body", body, CLIENT_BODY_BYTES_MAX)?;
            }
            Request::Receive(r) => {
                w.name("queue", &r.queue)?;
                w.u32(r.top);
                match r.filter {
                    ReceiveFilter::None => w.u8(0),
                    ReceiveFilter::Conversation(h) => {
                        w.u8(1);
                        w.id(h);
                    }
                    ReceiveFilter::Group(g) => {
                        w.u8(2);
                        w.id(g);
                    }
                }
                w.opt_u64(r.wait_ms);
            }
            Request::GetConversationGroup { queue, wait_ms } => {
                w.name("queue", queue)?;
                w.opt_u64(*wait_ms);
            }
            Request::EndConversation { handle, how } => {
                w.id(*handle);
                match how {
                    EndHow::Plain => w.u8(0),
                    EndHow::Error { code, description } => {
                        w.u8(1);
                        w.i32(*code);
                        w.long_str("description", description, CLIENT_ERROR_MESSAGE_BYTES_MAX)?;
                    }
                    EndHow::Cleanup => w.u8(2),
                }
            }
            Request::BeginConversationTimer { handle, timeout_ms } => {
                w.id(*handle);
                w.u64(*timeout_ms);
            }
            Request::MoveConversation { handle, group } => {
                w.id(*handle);
                w.id(*group);
            }
        }
        w.finish()
    }

    fn kind(&self) -> u8 {
        match self {
            Request::Hello { .. } => KIND_HELLO,
            Request::Execute { .. } => KIND_EXECUTE,
            Request::BeginTransaction => KIND_BEGIN_TRANSACTION,
            Request::Commit => KIND_COMMIT,
            Request::Rollback => KIND_ROLLBACK,
            Request::BeginDialog(_) => KIND_BEGIN_DIALOG,
            Request::Send { .. } => KIND_SEND,
            Request::Receive(_) => KIND_RECEIVE,
            Request::GetConversationGroup { .. } => KIND_GET_CONVERSATION_GROUP,
            Request::EndConversation { .. } => KIND_END_CONVERSATION,
            Request::BeginConversationTimer { .. } => KIND_BEGIN_CONVERSATION_TIMER,
            Request::MoveConversation { .. } => KIND_MOVE_CONVERSATION,
            Request::Status => KIND_STATUS,
            Request::SessionState => KIND_SESSION_STATE,
        }
    }

    /// Parses one whole request frame (`bytes` is exactly the frame).
    fn parse(bytes: &[u8]) -> Result<Request> {
        let kind = bytes[4];
        let mut r = Reader::new(&bytes[CLIENT_FRAME_HEADER_BYTES..], "request");
        let request = match kind {
            KIND_HELLO => {
                let magic: [u8; 4] = r.array()?;
                if magic != CLIENT_HELLO_MAGIC {
                    return Err(Error::BadMagic { found: magic });
                }
                let protocol_version = r.u16()?;
                // Another version's Hello may carry more: it is answered with an Error naming
                // the version this node speaks, not closed as malformed.
                if protocol_version != CLIENT_PROTOCOL_VERSION {
                    r.rest();
                }
                Request::Hello { protocol_version }
            }
            KIND_EXECUTE => Request::Execute {
                script: r.long_str("script", CLIENT_SCRIPT_BYTES_MAX)?,
            },
            KIND_BEGIN_TRANSACTION => Request::BeginTransaction,
            KIND_COMMIT => Request::Commit,
            KIND_ROLLBACK => Request::Rollback,
            KIND_BEGIN_DIALOG => Request::BeginDialog(BeginDialog {
                from_service: r.name("from service")?,
                to_service: r.name("to service")?,
                contract: r.name("contract")?,
                related_conversation: r.opt_id()?,
                related_conversation_group: r.opt_id()?,
                lifetime_secs: r.opt_u64()?,
                target_broker_instance: r.opt_id()?,
            }),
            KIND_SEND => Request::Send {
                handles: {
                    let count = r.u16()? as usize;
                    if count == 0 || count > CLIENT_SEND_HANDLES_MAX {
                        return Err(r.malformed(format!(
                            "a send on {count} conversations; 1 to {CLIENT_SEND_HANDLES_MAX} are allowed"
                        )));
                    }
                    r.check_count(count, 16)?;
                    (0..count).map(|_| r.id()).collect::<Result<Vec<_>>>()?
                },
                message_type: r.name("message type")?,
                body: r.blob("message body", CLIENT_BODY_BYTES_MAX)?,
            },
            KIND_RECEIVE => {
                let queue = r.name("queue")?;
                let top = r.u32()?;
                let filter = match r.u8()? {
                    0 => ReceiveFilter::None,
                    1 => ReceiveFilter::Conversation(r.id()?),
                    2 => ReceiveFilter::Group(r.id()?),
                    other => return Err(r.malformed(format!("receive filter tag {other}"))),
                };
                Request::Receive(ReceiveRequest {
                    queue,
                    top,
                    filter,
                    wait_ms: r.opt_u64()?,
                })
            }
            KIND_GET_CONVERSATION_GROUP => Request::GetConversationGroup {
                queue: r.name("queue")?,
                wait_ms: r.opt_u64()?,
            },
            KIND_END_CONVERSATION => {
                let handle = r.id()?;
                let how = match r.u8()? {
                    0 => EndHow::Plain,
                    1 => EndHow::Error {
                        code: r.i32()?,
                        description: r.long_str("description", CLIENT_ERROR_MESSAGE_BYTES_MAX)?,
                    },
                    2 => EndHow::Cleanup,
                    other => return Err(r.malformed(format!("end conversation tag {other}"))),
                };
                Request::EndConversation { handle, how }
            }
            KIND_BEGIN_CONVERSATION_TIMER => Request::BeginConversationTimer {
                handle: r.id()?,
                timeout_ms: r.u64()?,
            },
            KIND_MOVE_CONVERSATION => Request::MoveConversation {
                handle: r.id()?,
                group: r.id()?,
            },
            KIND_STATUS => Request::Status,
            KIND_SESSION_STATE => Request::SessionState,
            other => return Err(Error::UnknownFrameKind { kind: other }),
        };
        r.end()?;
        Ok(request)
    }
}

impl Response {
    /// The response kind's name, for errors and logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Response::Hello { .. } => "hello",
            Response::Ok => "ok",
            Response::Error(_) => "error",
            Response::Dialog { .. } => "dialog",
            Response::Group { .. } => "group",
            Response::Message(_) => "message",
            Response::Statement { .. } => "statement",
            Response::Values(_) => "values",
            Response::Done => "done",
            Response::Status(_) => "status",
            Response::Session { .. } => "session",
        }
    }

    /// Appends the frame to `out` after checking every limit the decoder checks; on error
    /// `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        encode_or_nothing(out, |out| self.encode_inner(out))
    }

    /// The frame encoded into a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    fn encode_inner(&self, out: &mut Vec<u8>) -> Result<()> {
        let mut w = Writer::begin(out, self.kind());
        match self {
            Response::Hello {
                protocol_version,
                broker_instance,
            } => {
                w.bytes(&CLIENT_HELLO_MAGIC);
                w.u16(*protocol_version);
                w.id(*broker_instance);
            }
            Response::Ok | Response::Done => {}
            Response::Error(e) => {
                w.u8(e.kind as u8);
                match e.position {
                    None => w.u8(0),
                    Some((line, column)) => {
                        w.u8(1);
                        w.u32(line);
                        w.u32(column);
                    }
                }
                match &e.statement {
                    None => w.u8(0),
                    Some(statement) => {
                        w.u8(1);
                        w.name("statement", statement)?;
                    }
                }
                w.long_str("error message", &e.message, CLIENT_ERROR_MESSAGE_BYTES_MAX)?;
            }
            Response::Dialog { handle } => w.id(*handle),
            Response::Group { group } => w.opt_id(*group),
            Response::Message(m) => {
                w.id(m.conversation_handle);
                w.id(m.conversation_group);
                w.name("message type", &m.message_type)?;
                w.u64(m.sequence);
                w.u64(m.queuing_order);
                w.u8(m.status);
                w.blob("message body", &m.body, CLIENT_BODY_BYTES_MAX)?;
            }
            Response::Statement {
                statement,
                rows_affected,
                result,
            } => {
                w.name("statement", statement)?;
                w.opt_u64(*rows_affected);
                match result {
                    None => w.u8(0),
                    Some((columns, rows)) => {
                        w.u8(1);
                        w.u64(*rows);
                        w.u32(u32::try_from(columns.len()).unwrap_or(u32::MAX));
                        for column in columns {
                            w.name("column", column)?;
                        }
                    }
                }
            }
            Response::Values(values) => {
                w.u32(u32::try_from(values.len()).unwrap_or(u32::MAX));
                for value in values {
                    w.value(value)?;
                }
            }
            Response::Session { transaction_count } => w.u32(*transaction_count),
            Response::Status(s) => {
                let rows = [
                    s.queues.len(),
                    s.endpoints_by_state.len(),
                    s.transmission_by_status.len(),
                    s.peers.len(),
                ];
                if let Some(&len) = rows.iter().find(|&&len| len > STATUS_ROWS_MAX) {
                    return Err(Error::Malformed {
                        frame: "status",
                        reason: format!("{len} rows, at most {STATUS_ROWS_MAX}"),
                    });
                }
                w.id(s.broker_instance);
                w.bool(s.truncated);
                w.u32(s.queues.len() as u32);
                for q in &s.queues {
                    w.name("queue", &q.name)?;
                    w.bool(q.enabled);
                    w.bool(q.retention);
                    w.bool(q.poison_message_handling);
                    w.u64(q.messages);
                    w.u64(q.groups_with_messages);
                    w.u64(q.retained_messages);
                }
                w.u32(s.endpoints_by_state.len() as u32);
                for (state, count) in &s.endpoints_by_state {
                    w.name("endpoint state", state)?;
                    w.u64(*count);
                }
                w.u32(s.transmission_by_status.len() as u32);
                for (status, count) in &s.transmission_by_status {
                    w.text("transmission status", status)?;
                    w.u64(*count);
                }
                w.u32(s.peers.len() as u32);
                for p in &s.peers {
                    w.text("peer address", &p.address)?;
                    match p.fingerprint {
                        None => w.u8(0),
                        Some(fingerprint) => {
                            w.u8(1);
                            w.bytes(&fingerprint);
                        }
                    }
                    w.bool(p.connected);
                    w.u64(p.unacknowledged_messages);
                }
            }
        }
        w.finish()
    }

    fn kind(&self) -> u8 {
        match self {
            Response::Hello { .. } => KIND_SERVER_HELLO,
            Response::Ok => KIND_OK,
            Response::Error(_) => KIND_ERROR,
            Response::Dialog { .. } => KIND_DIALOG,
            Response::Group { .. } => KIND_GROUP,
            Response::Message(_) => KIND_MESSAGE,
            Response::Statement { .. } => KIND_STATEMENT,
            Response::Values(_) => KIND_VALUES,
            Response::Done => KIND_DONE,
            Response::Status(_) => KIND_STATUS_REPORT,
            Response::Session { .. } => KIND_SESSION,
        }
    }

    /// Parses one whole response frame (`bytes` is exactly the frame).
    fn parse(bytes: &[u8]) -> Result<Response> {
        let kind = bytes[4];
        let mut r = Reader::new(&bytes[CLIENT_FRAME_HEADER_BYTES..], "response");
        let response = match kind {
            KIND_SERVER_HELLO => {
                let magic: [u8; 4] = r.array()?;
                if magic != CLIENT_HELLO_MAGIC {
                    return Err(Error::BadMagic { found: magic });
                }
                Response::Hello {
                    protocol_version: r.u16()?,
                    broker_instance: r.id()?,
                }
            }
            KIND_OK => Response::Ok,
            KIND_DONE => Response::Done,
            KIND_ERROR => {
                let code = r.u8()?;
                let kind = RemoteErrorKind::from_code(code)
                    .ok_or_else(|| r.malformed(format!("error kind {code}")))?;
                let position = match r.u8()? {
                    0 => None,
                    1 => Some((r.u32()?, r.u32()?)),
                    other => return Err(r.malformed(format!("position tag {other}"))),
                };
                let statement = match r.u8()? {
                    0 => None,
                    1 => Some(r.name("statement")?),
                    other => return Err(r.malformed(format!("statement tag {other}"))),
                };
                Response::Error(RemoteError {
                    kind,
                    position,
                    statement,
                    message: r.long_str("error message", CLIENT_ERROR_MESSAGE_BYTES_MAX)?,
                })
            }
            KIND_DIALOG => Response::Dialog { handle: r.id()? },
            KIND_GROUP => Response::Group { group: r.opt_id()? },
            KIND_MESSAGE => Response::Message(ReceivedMessage {
                conversation_handle: r.id()?,
                conversation_group: r.id()?,
                message_type: r.name("message type")?,
                sequence: r.u64()?,
                queuing_order: r.u64()?,
                status: r.u8()?,
                body: r.blob("message body", CLIENT_BODY_BYTES_MAX)?,
            }),
            KIND_STATEMENT => {
                let statement = r.name("statement")?;
                let rows_affected = r.opt_u64()?;
                let result = match r.u8()? {
                    0 => None,
                    1 => {
                        let rows = r.u64()?;
                        let count = r.u32()? as usize;
                        // Each column takes at least its 2-byte length: a count beyond what is
                        // left cannot be honest, and must not size an allocation.
                        r.check_count(count, 2)?;
                        let mut columns = Vec::with_capacity(count);
                        for _ in 0..count {
                            columns.push(r.name("column")?);
                        }
                        Some((columns, rows))
                    }
                    other => return Err(r.malformed(format!("result tag {other}"))),
                };
                Response::Statement {
                    statement,
                    rows_affected,
                    result,
                }
            }
            KIND_VALUES => {
                let count = r.u32()? as usize;
                r.check_count(count, 1)?;
                let mut values = Vec::with_capacity(count);
                for _ in 0..count {
                    values.push(r.value()?);
                }
                Response::Values(values)
            }
            KIND_STATUS_REPORT => {
                let broker_instance = r.id()?;
                let truncated = r.bool()?;
                let mut report = StatusReport {
                    broker_instance,
                    truncated,
                    ..StatusReport::default()
                };
                let count = r.status_rows()?;
                for _ in 0..count {
                    report.queues.push(QueueStatus {
                        name: r.name("queue")?,
                        enabled: r.bool()?,
                        retention: r.bool()?,
                        poison_message_handling: r.bool()?,
                        messages: r.u64()?,
                        groups_with_messages: r.u64()?,
                        retained_messages: r.u64()?,
                    });
                }
                let count = r.status_rows()?;
                for _ in 0..count {
                    report
                        .endpoints_by_state
                        .push((r.name("endpoint state")?, r.u64()?));
                }
                let count = r.status_rows()?;
                for _ in 0..count {
                    report
                        .transmission_by_status
                        .push((r.text("transmission status")?, r.u64()?));
                }
                let count = r.status_rows()?;
                for _ in 0..count {
                    let address = r.text("peer address")?;
                    let fingerprint = match r.u8()? {
                        0 => None,
                        1 => Some(r.array()?),
                        other => return Err(r.malformed(format!("fingerprint tag {other}"))),
                    };
                    report.peers.push(PeerStatus {
                        address,
                        fingerprint,
                        connected: r.bool()?,
                        unacknowledged_messages: r.u64()?,
                    });
                }
                Response::Status(report)
            }
            KIND_SESSION => Response::Session {
                transaction_count: r.u32()?,
            },
            other => return Err(Error::UnknownFrameKind { kind: other }),
        };
        r.end()?;
        Ok(response)
    }
}

/// Which side a [`ClientFrameDecoder`] decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Requests,
    Responses,
}

/// Cuts a byte stream into frames of one direction, as `proto::FrameDecoder` does for the node
/// protocol: it buffers at most one frame, checks a frame's size and kind from its header
/// before keeping any payload, and grows its buffer only as bytes arrive (a peer that declares
/// a large frame and sends nothing holds nothing). After an error every call returns
/// [`Error::DecoderFailed`].
#[derive(Debug)]
pub struct ClientFrameDecoder {
    direction: Direction,
    /// The framing shared with the node protocol's decoder.
    buffer: FrameBuffer,
}

/// Frames decoded by a [`ClientFrameDecoder`].
pub trait ClientFrame: Sized {
    #[doc(hidden)]
    const DIRECTION_IS_REQUESTS: bool;
    #[doc(hidden)]
    fn parse_frame(bytes: &[u8]) -> Result<Self>;
}

impl ClientFrame for Request {
    const DIRECTION_IS_REQUESTS: bool = true;
    fn parse_frame(bytes: &[u8]) -> Result<Request> {
        Request::parse(bytes)
    }
}

impl ClientFrame for Response {
    const DIRECTION_IS_REQUESTS: bool = false;
    fn parse_frame(bytes: &[u8]) -> Result<Response> {
        Response::parse(bytes)
    }
}

/// Runs `encode` on `out`; if it fails, `out` is left as it was (no partial frame).
fn encode_or_nothing(
    out: &mut Vec<u8>,
    encode: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let start = out.len();
    let result = encode(out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

impl ClientFrameDecoder {
    /// A decoder of the frames a server reads.
    pub fn requests() -> ClientFrameDecoder {
        ClientFrameDecoder::new(Direction::Requests)
    }

    /// A decoder of the frames a client reads.
    pub fn responses() -> ClientFrameDecoder {
        ClientFrameDecoder::new(Direction::Responses)
    }

    fn new(direction: Direction) -> ClientFrameDecoder {
        ClientFrameDecoder {
            direction,
            buffer: FrameBuffer::default(),
        }
    }

    /// Takes bytes from the front of `input`, never past the end of the next frame, and returns
    /// that frame once it is whole; `Ok(None)` means `input` is used up first. `F` must be the
    /// decoder's direction ([`Request`] for [`ClientFrameDecoder::requests`]).
    pub fn decode<F: ClientFrame>(&mut self, input: &mut &[u8]) -> Result<Option<F>> {
        if !self.buffer.failed()
            && F::DIRECTION_IS_REQUESTS != (self.direction == Direction::Requests)
        {
            self.buffer.fail();
            return Err(Error::Malformed {
                frame: "client",
                reason: "decoder used for the other direction".into(),
            });
        }
        let direction = self.direction;
        self.buffer.next(
            input,
            CLIENT_FRAME_HEADER_BYTES,
            |header| frame_bytes(header, direction),
            F::parse_frame,
        )
    }

    /// Bytes of an incomplete frame held from earlier calls.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.buffered_bytes()
    }
}

/// Decodes the one request frame at the start of `bytes`; returns it and its length.
pub fn decode_request(bytes: &[u8]) -> Result<(Request, usize)> {
    decode_whole(bytes, Direction::Requests, Request::parse)
}

/// Decodes the one response frame at the start of `bytes`; returns it and its length.
pub fn decode_response(bytes: &[u8]) -> Result<(Response, usize)> {
    decode_whole(bytes, Direction::Responses, Response::parse)
}

fn decode_whole<F>(
    bytes: &[u8],
    direction: Direction,
    parse: fn(&[u8]) -> Result<F>,
) -> Result<(F, usize)> {
    if bytes.len() < CLIENT_FRAME_HEADER_BYTES {
        return Err(Error::Truncated {
            needed: CLIENT_FRAME_HEADER_BYTES,
            available: bytes.len(),
        });
    }
    let total = frame_bytes(bytes, direction)?;
    if bytes.len() < total {
        return Err(Error::Truncated {
            needed: total,
            available: bytes.len(),
        });
    }
    Ok((parse(&bytes[..total])?, total))
}

/// The size of the frame whose header starts `bytes`, after checking it and the kind.
fn frame_bytes(bytes: &[u8], direction: Direction) -> Result<usize> {
    let payload = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let total = payload.saturating_add(CLIENT_FRAME_HEADER_BYTES);
    if total > CLIENT_FRAME_BYTES_MAX {
        return Err(Error::FrameTooLarge {
            bytes: total,
            max: CLIENT_FRAME_BYTES_MAX,
        });
    }
    let kind = bytes[4];
    let known = match direction {
        Direction::Requests => REQUEST_KINDS.contains(&kind),
        Direction::Responses => RESPONSE_KINDS.contains(&kind),
    };
    if !known {
        return Err(Error::UnknownFrameKind { kind });
    }
    Ok(total)
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub(crate) fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

const VALUE_NULL: u8 = 0;
const VALUE_INT: u8 = 1;
const VALUE_TEXT: u8 = 2;
const VALUE_BINARY: u8 = 3;
const VALUE_GUID: u8 = 4;

/// Bytes a value takes in a `Values` frame.
pub(crate) fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Null => 1,
        Value::Int(_) => 9,
        Value::Text(text) => 5 + text.len(),
        Value::Binary(bytes) => 5 + bytes.len(),
        Value::Guid(_) => 17,
    }
}

/// Writes one frame's payload after its header.
struct Writer<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Writer<'a> {
    fn begin(out: &'a mut Vec<u8>, kind: u8) -> Writer<'a> {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.push(kind);
        Writer { out, start }
    }

    fn finish(self) -> Result<()> {
        let total = self.out.len() - self.start;
        if total > CLIENT_FRAME_BYTES_MAX {
            return Err(Error::FrameTooLarge {
                bytes: total,
                max: CLIENT_FRAME_BYTES_MAX,
            });
        }
        let payload = (total - CLIENT_FRAME_HEADER_BYTES) as u32;
        self.out[self.start..self.start + 4].copy_from_slice(&payload.to_le_bytes());
        Ok(())
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    fn bool(&mut self, v: bool) {
        self.out.push(u8::from(v));
    }

    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.bytes(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn id(&mut self, v: u128) {
        self.bytes(&v.to_be_bytes());
    }

    fn opt_id(&mut self, v: Option<u128>) {
        match v {
            None => self.u8(0),
            Some(id) => {
                self.u8(1);
                self.id(id);
            }
        }
    }

    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(n) => {
                self.u8(1);
                self.u64(n);
            }
        }
    }

    /// `len u16 | UTF-8`, at most [`CLIENT_NAME_BYTES_MAX`].
    fn name(&mut self, field: &'static str, s: &str) -> Result<()> {
        self.short_str(field, s, CLIENT_NAME_BYTES_MAX)
    }

    /// `len u16 | UTF-8`, at most [`STATUS_TEXT_BYTES_MAX`].
    fn text(&mut self, field: &'static str, s: &str) -> Result<()> {
        self.short_str(field, s, STATUS_TEXT_BYTES_MAX)
    }

    fn short_str(&mut self, field: &'static str, s: &str, max: usize) -> Result<()> {
        if s.len() > max {
            return Err(Error::NameTooLong {
                field,
                bytes: s.len(),
                max,
            });
        }
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
        Ok(())
    }

    /// `len u32 | UTF-8`, at most `max`.
    fn long_str(&mut self, field: &'static str, s: &str, max: usize) -> Result<()> {
        self.blob(field, s.as_bytes(), max)
    }

    /// `len u32 | bytes`, at most `max`.
    fn blob(&mut self, field: &'static str, bytes: &[u8], max: usize) -> Result<()> {
        if bytes.len() > max {
            return Err(Error::FieldTooLong {
                field,
                bytes: bytes.len(),
                max,
            });
        }
        self.u32(bytes.len() as u32);
        self.bytes(bytes);
        Ok(())
    }

    fn value(&mut self, value: &Value) -> Result<()> {
        match value {
            Value::Null => self.u8(VALUE_NULL),
            Value::Int(n) => {
                self.u8(VALUE_INT);
                self.bytes(&n.to_le_bytes());
            }
            Value::Text(text) => {
                self.u8(VALUE_TEXT);
                self.long_str("text value", text, VALUE_BYTES_MAX)?;
            }
            Value::Binary(bytes) => {
                self.u8(VALUE_BINARY);
                self.blob("binary value", bytes, VALUE_BYTES_MAX)?;
            }
            Value::Guid(id) => {
                self.u8(VALUE_GUID);
                self.id(*id);
            }
        }
        Ok(())
    }
}

/// The client protocol's own fields.
impl<'a> Reader<'a> {
    fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.malformed(format!("boolean byte {other}"))),
        }
    }

    fn i32(&mut self) -> Result<i32> {
        self.array().map(i32::from_le_bytes)
    }

    fn id(&mut self) -> Result<u128> {
        self.array().map(u128::from_be_bytes)
    }

    fn opt_id(&mut self) -> Result<Option<u128>> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.id().map(Some),
            other => Err(self.malformed(format!("option tag {other}"))),
        }
    }

    fn opt_u64(&mut self) -> Result<Option<u64>> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.u64().map(Some),
            other => Err(self.malformed(format!("option tag {other}"))),
        }
    }

    /// Fails unless `count` items of at least `min_bytes` each can fit in what is left.
    fn check_count(&self, count: usize, min_bytes: usize) -> Result<()> {
        let left = self.left();
        if count.saturating_mul(min_bytes) > left {
            return Err(self.malformed(format!("{count} items cannot fit the {left} bytes left")));
        }
        Ok(())
    }

    fn status_rows(&mut self) -> Result<usize> {
        let count = self.u32()? as usize;
        if count > STATUS_ROWS_MAX {
            return Err(self.malformed(format!("{count} status rows, at most {STATUS_ROWS_MAX}")));
        }
        self.check_count(count, 2)?;
        Ok(count)
    }

    fn name(&mut self, field: &'static str) -> Result<String> {
        self.short_str(field, CLIENT_NAME_BYTES_MAX)
    }

    fn text(&mut self, field: &'static str) -> Result<String> {
        self.short_str(field, STATUS_TEXT_BYTES_MAX)
    }

    fn short_str(&mut self, field: &'static str, max: usize) -> Result<String> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(Error::NameTooLong {
                field,
                bytes: len,
                max,
            });
        }
        utf8(field, self.take(len)?)
    }

    fn long_str(&mut self, field: &'static str, max: usize) -> Result<String> {
        let bytes = self.blob_slice(field, max)?;
        utf8(field, bytes)
    }

    fn blob(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>> {
        self.blob_slice(field, max).map(<[u8]>::to_vec)
    }

    fn blob_slice(&mut self, field: &'static str, max: usize) -> Result<&'a [u8]> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(Error::FieldTooLong {
                field,
                bytes: len,
                max,
            });
        }
        self.take(len)
    }

    fn value(&mut self) -> Result<Value> {
        Ok(match self.u8()? {
            VALUE_NULL => Value::Null,
            VALUE_INT => Value::Int(i64::from_le_bytes(self.array()?)),
            VALUE_TEXT => Value::Text(self.long_str("text value", VALUE_BYTES_MAX)?),
            VALUE_BINARY => Value::Binary(self.blob("binary value", VALUE_BYTES_MAX)?),
            VALUE_GUID => Value::Guid(self.id()?),
            other => return Err(self.malformed(format!("value tag {other}"))),
        })
    }
}

fn utf8(field: &'static str, bytes: &[u8]) -> Result<String> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| Error::NotUtf8 { field })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Hello of another version may carry fields this node does not know: it decodes (to be
    /// answered with an Error naming this node's version), where this version's must be exact.
    #[test]
    fn another_versions_hello_may_carry_more() {
        let with_more = |protocol_version: u16| {
            let mut bytes = Request::Hello { protocol_version }.to_bytes().unwrap();
            bytes.extend_from_slice(&[1, 2, 3]);
            let payload = (bytes.len() - CLIENT_FRAME_HEADER_BYTES) as u32;
            bytes[..4].copy_from_slice(&payload.to_le_bytes());
            bytes
        };
        let newer = CLIENT_PROTOCOL_VERSION + 1;
        assert_eq!(
            decode_request(&with_more(newer)).unwrap().0,
            Request::Hello {
                protocol_version: newer
            }
        );
        assert!(decode_request(&with_more(CLIENT_PROTOCOL_VERSION)).is_err());
    }

    /// `String::truncate` inside a character panics: `cut` backs up to its start instead.
    #[test]
    fn cut_keeps_whole_characters() {
        let text = format!("ab{}", "é".repeat(10)); // 'é' is 2 bytes: 2 + 20 bytes
        assert_eq!(cut(text.clone(), 100), text);
        assert_eq!(cut(text.clone(), 22), text);
        assert_eq!(
            cut(text.clone(), 5),
            "abé",
            "byte 5 is inside the second 'é'"
        );
        assert_eq!(cut(text.clone(), 4), "abé");
        assert_eq!(cut(text.clone(), 1), "a");
        assert_eq!(cut(text, 0), "");
    }

    #[test]
    fn a_largest_script_and_a_largest_body_fit_a_frame() {
        let script = "x".repeat(CLIENT_SCRIPT_BYTES_MAX);
        let bytes = Request::Execute { script }.to_bytes().expect("encodes");
        assert!(bytes.len() <= CLIENT_FRAME_BYTES_MAX);
        let too_long = "x".repeat(CLIENT_SCRIPT_BYTES_MAX + 1);
        assert!(matches!(
            Request::Execute { script: too_long }.to_bytes(),
            Err(Error::FieldTooLong { .. })
        ));
        let send = Request::Send {
            handles: (0..CLIENT_SEND_HANDLES_MAX as u128).collect(),
            message_type: "t".repeat(CLIENT_NAME_BYTES_MAX),
            body: vec![1; CLIENT_BODY_BYTES_MAX],
        };
        let bytes = send.to_bytes().expect("encodes");
        assert_eq!(decode_request(&bytes).expect("decodes").0, send);
    }

    #[test]
    fn a_declared_size_over_the_limit_is_refused_from_the_header() {
        let mut header = ((CLIENT_FRAME_BYTES_MAX - CLIENT_FRAME_HEADER_BYTES + 1) as u32)
            .to_le_bytes()
            .to_vec();
        header.push(KIND_EXECUTE);
        let mut decoder = ClientFrameDecoder::requests();
        assert!(matches!(
            decoder.decode::<Request>(&mut &header[..]),
            Err(Error::FrameTooLarge { .. })
        ));
        assert_eq!(
            decoder.decode::<Request>(&mut &b"x"[..]),
            Err(Error::DecoderFailed)
        );
        // Exactly the limit is only buffered as it arrives.
        let mut header = ((CLIENT_FRAME_BYTES_MAX - CLIENT_FRAME_HEADER_BYTES) as u32)
            .to_le_bytes()
            .to_vec();
        header.push(KIND_EXECUTE);
        let mut decoder = ClientFrameDecoder::requests();
        assert_eq!(decoder.decode::<Request>(&mut &header[..]), Ok(None));
        assert!(decoder.buffer.capacity() < 1024);
    }

    #[test]
    fn a_response_kind_is_not_a_request() {
        let bytes = Response::Ok.to_bytes().expect("encodes");
        assert_eq!(
            decode_request(&bytes),
            Err(Error::UnknownFrameKind { kind: KIND_OK })
        );
    }

    #[test]
    fn a_values_count_beyond_the_payload_is_refused_before_allocating() {
        let mut bytes = Response::Values(vec![Value::Null])
            .to_bytes()
            .expect("encodes");
        bytes[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_response(&bytes),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn names_at_the_limit_pass_and_one_more_fails_both_ways() {
        let at = Request::GetConversationGroup {
            queue: "q".repeat(CLIENT_NAME_BYTES_MAX),
            wait_ms: Some(WAIT_FOREVER_MS),
        };
        let bytes = at.to_bytes().expect("encodes");
        assert_eq!(decode_request(&bytes).expect("decodes"), (at, bytes.len()));
        let over = Request::GetConversationGroup {
            queue: "q".repeat(CLIENT_NAME_BYTES_MAX + 1),
            wait_ms: None,
        };
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            over.encode(&mut out),
            Err(Error::NameTooLong { .. })
        ));
        assert_eq!(
            out,
            [1, 2, 3],
            "a refused frame leaves the buffer as it was"
        );
        // The same frame made by hand is refused by the decoder.
        let mut payload = ((CLIENT_NAME_BYTES_MAX + 1) as u16).to_le_bytes().to_vec();
        payload.extend(std::iter::repeat_n(b'q', CLIENT_NAME_BYTES_MAX + 1));
        payload.push(0);
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.push(KIND_GET_CONVERSATION_GROUP);
        frame.extend(payload);
        assert!(matches!(
            decode_request(&frame),
            Err(Error::NameTooLong { bytes: 257, .. })
        ));
    }

    #[test]
    fn a_send_takes_one_to_the_maximum_of_handles() {
        let send = |count: usize| Request::Send {
            handles: (0..count as u128).collect(),
            message_type: "DEFAULT".into(),
            body: Vec::new(),
        };
        assert!(send(1).to_bytes().is_ok());
        assert!(send(CLIENT_SEND_HANDLES_MAX).to_bytes().is_ok());
        assert!(matches!(send(0).to_bytes(), Err(Error::Malformed { .. })));
        assert!(matches!(
            send(CLIENT_SEND_HANDLES_MAX + 1).to_bytes(),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn a_status_of_the_most_rows_fits_and_one_more_is_refused() {
        let queue = QueueStatus {
            name: "q".repeat(CLIENT_NAME_BYTES_MAX),
            enabled: true,
            retention: true,
            poison_message_handling: true,
            messages: u64::MAX,
            groups_with_messages: u64::MAX,
            retained_messages: u64::MAX,
        };
        let peer = PeerStatus {
            address: "a".repeat(STATUS_TEXT_BYTES_MAX),
            fingerprint: Some([7; 32]),
            connected: true,
            unacknowledged_messages: u64::MAX,
        };
        let mut report = StatusReport {
            broker_instance: u128::MAX,
            queues: vec![queue.clone(); STATUS_ROWS_MAX],
            endpoints_by_state: vec![("s".repeat(CLIENT_NAME_BYTES_MAX), 1); STATUS_ROWS_MAX],
            transmission_by_status: vec![("t".repeat(STATUS_TEXT_BYTES_MAX), 1); STATUS_ROWS_MAX],
            peers: vec![peer; STATUS_ROWS_MAX],
            truncated: true,
        };
        let bytes = Response::Status(report.clone())
            .to_bytes()
            .expect("the largest status fits");
        assert!(bytes.len() <= CLIENT_FRAME_BYTES_MAX);
        assert_eq!(
            decode_response(&bytes).expect("decodes").0,
            Response::Status(report.clone())
        );
        report.queues.push(queue);
        assert!(Response::Status(report).to_bytes().is_err());
    }

    #[test]
    fn non_canonical_tags_are_refused() {
        let bytes = Response::Group { group: None }.to_bytes().expect("encodes");
        let mut bad = bytes.clone();
        bad[5] = 2;
        assert!(matches!(
            decode_response(&bad),
            Err(Error::Malformed { .. })
        ));
        let bytes = Request::Receive(ReceiveRequest {
            queue: "q".into(),
            top: 1,
            filter: ReceiveFilter::None,
            wait_ms: None,
        })
        .to_bytes()
        .expect("encodes");
        let mut bad = bytes.clone();
        let filter_at = CLIENT_FRAME_HEADER_BYTES + 2 + 1 + 4;
        bad[filter_at] = 3;
        assert!(matches!(decode_request(&bad), Err(Error::Malformed { .. })));
        // Left-over bytes are refused too.
        let mut long = Response::Ok.to_bytes().expect("encodes");
        long[0] = 1;
        long.push(0);
        assert!(matches!(
            decode_response(&long),
            Err(Error::Malformed { .. })
        ));
    }
}
