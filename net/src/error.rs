//! The one error type of `herald-net`.
//!
//! Every error from decoding or from a [`PeerSession`](crate::proto::PeerSession) fed peer bytes
//! is a protocol violation by the peer (or a corrupted stream): the caller closes the connection
//! and calls `reset`; nothing is retried on the same stream, because a byte stream that failed to
//! decode once has lost its framing. Errors from `send`, `send_error` and encoding are the local
//! caller's mistakes (a name too long, a body too large) and leave the session as it was.

use std::path::PathBuf;

use uuid::Uuid;

/// Result of every fallible `herald-net` operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the wire protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame's declared size is beyond [`FRAME_BYTES_MAX`](crate::proto::FRAME_BYTES_MAX).
    #[error("frame of {bytes} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { bytes: usize, max: usize },

    /// A whole-frame decode was given fewer bytes than the frame needs.
    #[error("frame truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },

    /// A frame's kind byte names no frame kind of this protocol version.
    #[error("unknown frame kind {kind}")]
    UnknownFrameKind { kind: u8 },

    /// A frame's payload does not parse: a field runs past the end, bytes are left over, or a
    /// flag byte holds undefined bits.
    #[error("malformed {frame} frame: {reason}")]
    Malformed { frame: &'static str, reason: String },

    /// A service, contract or message-type name is longer than
    /// [`NAME_BYTES_MAX`](crate::proto::NAME_BYTES_MAX).
    #[error("{field} name of {bytes} bytes exceeds the maximum of {max} bytes")]
    NameTooLong {
        field: &'static str,
        bytes: usize,
        max: usize,
    },

    /// A name or description on the wire is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },

    /// An Error frame's description is longer than
    /// [`DESCRIPTION_BYTES_MAX`](crate::proto::DESCRIPTION_BYTES_MAX).
    #[error("error description of {bytes} bytes exceeds the maximum of {max} bytes")]
    DescriptionTooLong { bytes: usize, max: usize },

    /// A broker-generated error code must be negative (Service Broker's `-(error number)`).
    #[error("error code {code} is not negative")]
    ErrorCodeNotNegative { code: i32 },

    /// A message body is larger than
    /// [`MESSAGE_BODY_BYTES_MAX`](crate::proto::MESSAGE_BODY_BYTES_MAX).
    #[error("message body of {bytes} bytes exceeds the maximum of {max} bytes")]
    BodyTooLarge { bytes: usize, max: usize },

    /// One fragment is larger than
    /// [`FRAGMENT_BODY_BYTES_MAX`](crate::proto::FRAGMENT_BODY_BYTES_MAX).
    #[error("fragment of {bytes} bytes exceeds the maximum of {max} bytes")]
    FragmentTooLarge { bytes: usize, max: usize },

    /// A fragment lies outside its message body, or is empty in a non-empty body.
    #[error(
        "fragment at offset {offset} of {bytes} bytes does not fit a body of {body_bytes} bytes"
    )]
    FragmentOutOfRange {
        offset: u32,
        bytes: usize,
        body_bytes: u32,
    },

    /// A Hello frame does not start with the protocol's magic: the peer speaks something else.
    #[error("hello carries magic {found:02x?}, not Herald's")]
    BadMagic { found: [u8; 4] },

    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {found}; this build speaks version {supported}")]
    VersionMismatch { found: u16, supported: u16 },

    /// The first frame of a stream was not a Hello.
    #[error("expected a hello as the first frame, got a {found} frame")]
    HelloExpected { found: &'static str },

    /// A second Hello arrived on a stream that already had one.
    #[error("second hello on one stream")]
    DuplicateHello,

    /// An Ack names a broker instance other than the one the peer's Hello gave: taken, it
    /// would pin the dialog to a broker that does not hold it.
    #[error("an ack names broker instance {}, but the peer's hello said {}", Uuid::from_bytes(*ack), Uuid::from_bytes(*hello))]
    AckBrokerMismatch { ack: [u8; 16], hello: [u8; 16] },

    /// Two fragments of one message disagree on the message's header, or overlap without being
    /// the same fragment.
    #[error(
        "fragments of message {sequence} of conversation {} ({}) disagree: {reason}",
        Uuid::from_bytes(*conversation_id),
        direction(*from_initiator)
    )]
    InconsistentFragment {
        conversation_id: [u8; 16],
        from_initiator: bool,
        sequence: u64,
        reason: String,
    },

    /// A stream decoder that already failed was fed again; its framing is lost.
    #[error("frame decoder already failed; close the stream")]
    DecoderFailed,

    /// `send` was given a message whose (conversation, direction, sequence) is already queued.
    #[error(
        "message {sequence} of conversation {} ({}) is already queued",
        Uuid::from_bytes(*conversation_id),
        direction(*from_initiator)
    )]
    AlreadyQueued {
        conversation_id: [u8; 16],
        from_initiator: bool,
        sequence: u64,
    },

    /// The session already holds [`SEND_QUEUE_MESSAGES_MAX`](crate::proto::SEND_QUEUE_MESSAGES_MAX)
    /// unacknowledged messages; the caller keeps the message and offers it again later.
    #[error("send queue holds {max} messages already")]
    SendQueueFull { max: usize },

    /// A local I/O call failed (identity files, binding the UDP socket). Kept as kind and text
    /// so that the error stays `Clone` and comparable.
    #[error("{context}: {message}")]
    Io {
        context: String,
        kind: std::io::ErrorKind,
        message: String,
    },

    /// A node identity file exists but does not hold what it should: not parseable, or a key
    /// that does not belong to the certificate. The node refuses to start rather than make a
    /// new identity its peers do not trust.
    #[error("identity file {}: {reason}", path.display())]
    CorruptIdentity { path: PathBuf, reason: String },

    /// Generating a certificate, or building the TLS or QUIC configuration, failed.
    #[error("{context}: {reason}")]
    Tls {
        context: &'static str,
        reason: String,
    },

    /// The trust configuration cannot be used: a fingerprint that is not 64 hex digits, a CA
    /// certificate that does not parse, or nothing trusted at all.
    #[error("trust configuration: {reason}")]
    InvalidTrust { reason: String },

    /// The transport has no session with this peer (an inbound peer that never connected).
    #[error("no session with peer {peer}")]
    UnknownPeer { peer: String },

    /// The transport already holds [`PEERS_MAX`](crate::quic::PEERS_MAX) peer sessions.
    #[error("{max} peer sessions exist already")]
    TooManyPeers { max: usize },

    /// The transport already holds
    /// [`ACCEPTED_SESSIONS_PER_CERTIFICATE_MAX`](crate::quic::ACCEPTED_SESSIONS_PER_CERTIFICATE_MAX)
    /// sessions accepted from this certificate.
    #[error("{max} sessions accepted from the peer with certificate {fingerprint} exist already")]
    TooManySessionsOfPeer { fingerprint: String, max: usize },

    /// The transport was shut down.
    #[error("transport is shut down")]
    ShutDown,

    /// The node's broker refused or failed an operation.
    #[error("broker: {0}")]
    Engine(EngineError),

    /// A length-prefixed field of a client frame (a script, a message body, a value, an error
    /// message) is longer than its limit.
    #[error("{field} of {bytes} bytes exceeds the maximum of {max} bytes")]
    FieldTooLong {
        field: &'static str,
        bytes: usize,
        max: usize,
    },

    /// The node ran a client's request and it failed there: a statement or syntax error (with
    /// its line and column), or an engine error, keeping its kind.
    #[error("{0}")]
    Remote(crate::client::RemoteError),

    /// The node refused the client: its certificate is not trusted, the node has
    /// [`CLIENT_SESSIONS_MAX`](crate::client::CLIENT_SESSIONS_MAX) sessions already, it speaks
    /// another protocol version, or it is shutting down.
    #[error("refused by the node: {reason}")]
    Refused { reason: String },

    /// No node answered the client's handshake at `addr` in time: none is running there, or
    /// the network drops the packets.
    #[error(
        "no answer from a node at {addr} within {waited:?}: is one running and listening there?"
    )]
    Unreachable {
        addr: std::net::SocketAddr,
        waited: std::time::Duration,
    },

    /// The node's host answered a datagram to the address with ICMP "port unreachable": no
    /// process listens there (a node not started, or on another port).
    #[error(
        "nothing listens at {addr}: its host refused a datagram to that UDP port (is the node \
         running, and on that port?)"
    )]
    NothingListening { addr: std::net::SocketAddr },

    /// The client's connection to the node is gone (its open transaction was rolled back by the
    /// node); the client cannot be used any more.
    #[error("connection to the node lost: {reason}")]
    ConnectionLost { reason: String },

    /// The other side of a client connection broke the client protocol (the reason says how);
    /// the connection is closed.
    #[error("client protocol violation: {reason}")]
    ProtocolViolation { reason: String },
}

/// An engine error inside this crate's (cloneable, comparable) `Error`.
#[derive(Debug, Clone)]
pub struct EngineError(pub std::sync::Arc<herald_engine::Error>);

impl PartialEq for EngineError {
    fn eq(&self, other: &EngineError) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for EngineError {}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl From<herald_engine::Error> for Error {
    fn from(error: herald_engine::Error) -> Error {
        Error::Engine(EngineError(std::sync::Arc::new(error)))
    }
}

impl Error {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>, error: &std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            kind: error.kind(),
            message: error.to_string(),
        }
    }
}

fn direction(from_initiator: bool) -> &'static str {
    if from_initiator {
        "from initiator"
    } else {
        "from target"
    }
}
