//! The one error type of `herald-engine`. Each variant names the object concerned, so a caller
//! can act on it (create the missing queue, end the conversation, retry after a lock timeout).

use crate::ids::{ConversationGroupId, ConversationHandle};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("message type {0:?} does not exist")]
    UnknownMessageType(String),
    #[error("contract {0:?} does not exist")]
    UnknownContract(String),
    #[error("queue {0:?} does not exist")]
    UnknownQueue(String),
    #[error("service {0:?} does not exist")]
    UnknownService(String),
    #[error("conversation {0} does not exist")]
    UnknownConversation(ConversationHandle),
    #[error("conversation group {group} does not exist in queue {queue:?}")]
    UnknownConversationGroup {
        group: ConversationGroupId,
        queue: String,
    },
    #[error("broker priority {0:?} does not exist")]
    UnknownPriority(String),
    #[error("broker priority {name:?} has level {level}; levels are 1 to 10")]
    InvalidPriority { name: String, level: u8 },
    #[error(
        "END CONVERSATION WITH ERROR needs a code above 0 (negative codes are the broker's), not {0}"
    )]
    InvalidErrorCode(i32),
    #[error("error description of {chars} characters exceeds the maximum of {max}")]
    DescriptionTooLong { chars: usize, max: usize },
    #[error("route {0:?} does not exist")]
    UnknownRoute(String),
    #[error("route address {address:?} is invalid: {reason}")]
    InvalidRoute { address: String, reason: String },
    #[error("activation: {0}")]
    InvalidActivation(String),
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} {name:?} is in use: {reason}")]
    InUse {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("contract {contract:?} is invalid: {reason}")]
    InvalidContract { contract: String, reason: String },
    #[error(
        "message type {message_type:?} may not be sent by the {side} on contract {contract:?} \
         (conversation {handle})"
    )]
    ContractViolation {
        handle: ConversationHandle,
        contract: String,
        message_type: String,
        side: &'static str,
    },
    #[error("body of a {message_type:?} message fails {validation} validation: {reason}")]
    ValidationFailed {
        message_type: String,
        validation: &'static str,
        reason: String,
    },
    #[error("message body of {len} bytes exceeds the maximum of {max} bytes")]
    BodyTooLarge { len: usize, max: usize },
    #[error("conversation {handle} is {state}: {operation} is not allowed")]
    ConversationClosed {
        handle: ConversationHandle,
        state: &'static str,
        operation: &'static str,
    },
    #[error("service {service:?} does not accept contract {contract:?} as a target")]
    ContractNotAccepted { service: String, contract: String },
    #[error("conversation {handle} is on queue {actual:?}, not {queue:?}")]
    WrongQueue {
        handle: ConversationHandle,
        queue: String,
        actual: String,
    },
    #[error(
        "conversation group {group} belongs to queue {actual:?}; service {service:?} is on {queue:?}"
    )]
    GroupOnOtherQueue {
        group: ConversationGroupId,
        service: String,
        queue: String,
        actual: String,
    },
    #[error("queue {0:?} is disabled (STATUS = OFF)")]
    QueueDisabled(String),
    #[error("timed out after {waited_ms} ms waiting for the lock on conversation group {group}")]
    LockTimeout {
        group: ConversationGroupId,
        waited_ms: u64,
    },
    #[error("timed out after {waited_ms} ms waiting for the catalog lock")]
    CatalogLockTimeout { waited_ms: u64 },
    #[error("SEND needs at least one conversation")]
    NoConversation,
    #[error("the same conversation {0} is named twice in one SEND")]
    DuplicateHandle(ConversationHandle),
    #[error("transaction is too large: {len} bytes exceeds the commit record maximum of {max}")]
    TransactionTooLarge { len: usize, max: usize },
    #[error("data directory {} is in use by another broker", dir.display())]
    Locked { dir: std::path::PathBuf },
    #[error("storage is corrupt: {0}")]
    Corruption(String),
    #[error("storage: {0}")]
    Storage(#[from] herald_wal::Error),
    /// A T-SQL script that does not parse (`sql::parse`): 1-based line and column (in
    /// characters) of the offending token, and what was expected and found there.
    #[error("syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: u32,
        column: u32,
        message: String,
    },
    /// A statement of a T-SQL script that parsed but failed to run (`sql::Session`): the
    /// 1-based line and column where the top-level statement holding it starts, the failing
    /// statement's kind (`SEND`, or the statement inside an IF or BEGIN … END), and why.
    #[error("line {line}, column {column}: {statement}: {source}")]
    Statement {
        line: u32,
        column: u32,
        statement: &'static str,
        source: Box<Error>,
    },
    /// A T-SQL statement the executor cannot carry out: an undeclared variable, a conversion
    /// that fails, a COMMIT with no transaction.
    #[error("{0}")]
    Sql(String),
    /// A T-SQL feature that parses but that Herald does not run (activation procedures,
    /// mirror addresses, table variables).
    #[error("{0} is not supported by Herald")]
    Unsupported(String),
    /// A T-SQL session limit (`sql::RESULT_ROWS_MAX` and friends).
    #[error("{what} of {len} exceeds the maximum of {max}")]
    Limit {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// A WAITFOR (RECEIVE or GET CONVERSATION GROUP) ended early because its transaction's
    /// interrupt flag was set (`Transaction::interrupt_waits_on`): the session it served is
    /// ending (its client went away, or the node is shutting down).
    #[error("the wait was interrupted: the session is ending")]
    Interrupted,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
