//! Frames: the unit of the node-to-node byte stream, their limits, and a streaming decoder.
//!
//! A frame is `payload_len u32 | kind u8 | payload`, little-endian, laid out byte by byte in
//! `net/PROTOCOL.md`. Invariants this module keeps:
//!
//! 1. Every limit is checked on both sides: [`Frame::encode`] refuses what [`Frame::decode`] would
//!    refuse, so a Herald node never sends a frame its peer must reject.
//! 2. Decoding never panics and never allocates more than the frame's declared size, which is
//!    checked against [`FRAME_BYTES_MAX`] before a byte of payload is buffered.
//! 3. The encoding is canonical: for the current version, bytes that decode encode back to the
//!    same bytes (flag bits that mean nothing must be zero, an absent broker instance is zeros),
//!    so the fuzzer can check a decode/encode round trip — but for a Message that left out the
//!    names of the Message before it on the stream (`FLAG_NAMES_AS_BEFORE`, which only a
//!    [`FrameDecoder`] can decode): a [`Frame`] does not record that choice, the session makes
//!    it, and [`Frame::encode`] writes the names.
//!
//! There is no checksum: the stream runs inside QUIC, whose TLS 1.3 AEAD already rejects any
//! altered or truncated packet, so a second integrity check would only cost time.

use std::collections::HashSet;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::payload::{FrameBuffer, Reader};

/// The protocol version this build speaks; a peer's Hello must carry the same. Version 2 added
/// Messages that leave out the names of the Message before them.
pub const PROTOCOL_VERSION: u16 = 2;

/// First bytes of every Hello, so that a stream from something that is not a Herald node is
/// refused on its first frame instead of being parsed as one.
pub const HELLO_MAGIC: [u8; 4] = *b"HRLD";

/// Bytes before a frame's payload: `payload_len u32 | kind u8`.
pub const FRAME_HEADER_BYTES: usize = 5;

/// Largest frame, header included. Bounds what one frame may make a receiver buffer; a Message
/// frame with the largest fragment and four longest names is ~257 KiB, far below it.
pub const FRAME_BYTES_MAX: usize = 1024 * 1024;

/// Largest fragment of a message body in one Message frame. Large messages are split so that
/// small messages of other conversations are not stuck behind one long write.
pub const FRAGMENT_BODY_BYTES_MAX: usize = 256 * 1024;

/// Longest service, contract or message-type name, in UTF-8 bytes (Service Broker's service
/// names are `nvarchar(256)`; the engine's own catalog limit, 128, is tighter).
pub const NAME_BYTES_MAX: usize = 256;

/// Longest description of an Error frame, in UTF-8 bytes (Service Broker's `nvarchar(3000)`).
pub const DESCRIPTION_BYTES_MAX: usize = 3000;

/// Largest message body. Duplicates `herald_engine::MESSAGE_BODY_BYTES_MAX` (8 MiB) so that
/// `herald-net`'s protocol does not depend on the engine; the two must stay equal, and the engine
/// refuses a SEND above it, so no transmission-queue row can exceed what the wire carries.
pub const MESSAGE_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Payload bytes of a Message frame before the names: conversation id, flags, sequence,
/// lifetime deadline, target broker instance.
const MESSAGE_FIXED_BYTES: usize = 16 + 1 + 8 + 8 + 16;
/// Largest Message frame: header, fixed fields, four longest names, body length, fragment
/// offset, largest fragment.
const MESSAGE_FRAME_BYTES_MAX: usize = FRAME_HEADER_BYTES
    + MESSAGE_FIXED_BYTES
    + 4 * (2 + NAME_BYTES_MAX)
    + 4
    + 4
    + FRAGMENT_BODY_BYTES_MAX;
const ERROR_FRAME_BYTES_MAX: usize = FRAME_HEADER_BYTES + 16 + 1 + 4 + 2 + DESCRIPTION_BYTES_MAX;
const HELLO_PAYLOAD_BYTES: usize = 4 + 2 + 16;
const ACK_PAYLOAD_BYTES: usize = 16 + 1 + 8 + 16;

// Every valid frame fits the frame limit, and the wire's length fields can hold every limit.
const _: () = assert!(MESSAGE_FRAME_BYTES_MAX <= FRAME_BYTES_MAX);
const _: () = assert!(ERROR_FRAME_BYTES_MAX <= FRAME_BYTES_MAX);
const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(MESSAGE_BODY_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(NAME_BYTES_MAX <= u16::MAX as usize);
const _: () = assert!(DESCRIPTION_BYTES_MAX <= u16::MAX as usize);

const KIND_HELLO: u8 = 1;
const KIND_MESSAGE: u8 = 2;
const KIND_ACK: u8 = 3;
const KIND_ERROR: u8 = 4;
const KIND_GO_AWAY: u8 = 5;

const FLAG_FROM_INITIATOR: u8 = 1;
const FLAG_HAS_TARGET_BROKER: u8 = 2;
/// A Message whose four names are those of the previous Message on the stream: they are left
/// out (~60 bytes of a 1 KiB message's ~1.15 KiB on the wire).
const FLAG_NAMES_AS_BEFORE: u8 = 4;

/// One frame of the node-to-node stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame in each direction of a stream.
    Hello(Hello),
    /// One fragment of a sequenced dialog message.
    Message(MessageFragment),
    /// Cumulative acknowledgement of durably received messages of one conversation direction.
    Ack(Ack),
    /// An unsequenced, broker-generated error about one conversation.
    Error(ErrorFrame),
    /// The sender is shutting down cleanly: it sends no further messages on this connection.
    GoAway,
}

/// The first frame each side sends on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    /// The sending node's broker instance id (UUID bytes).
    pub broker_instance: [u8; 16],
}

/// What every fragment of a message carries, so that a target can create its conversation
/// endpoint from whichever fragment arrives first (Service Broker does the same).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageHeader {
    /// The conversation id shared by both endpoints (UUID bytes).
    pub conversation_id: [u8; 16],
    /// Direction: `true` when the message travels from the initiator to the target.
    pub from_initiator: bool,
    /// Sequence number assigned by the sending endpoint; per conversation direction.
    pub sequence: u64,
    /// Names are shared (a sender's listing and a receiver's decoder reuse one allocation for
    /// the many messages that carry the same name).
    pub source_service: Arc<str>,
    pub target_service: Arc<str>,
    pub contract: Arc<str>,
    pub message_type: Arc<str>,
    /// The target's broker instance once the dialog is pinned to it; `None` before the first Ack.
    pub target_broker_instance: Option<[u8; 16]>,
    /// The dialog's lifetime deadline in seconds since the UNIX epoch; 0 means none.
    pub lifetime_deadline_secs: u64,
}

/// One fragment of a message: the header, the whole body's length, and `fragment` at
/// `fragment_offset` of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageFragment {
    pub header: MessageHeader,
    /// Length of the whole body, at most [`MESSAGE_BODY_BYTES_MAX`].
    pub body_bytes: u32,
    pub fragment_offset: u32,
    /// At most [`FRAGMENT_BODY_BYTES_MAX`] bytes; empty only when the body is empty.
    pub fragment: Vec<u8>,
}

/// "Every message of this conversation direction with a sequence up to `sequence` is durably
/// received by `broker_instance`."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub conversation_id: [u8; 16],
    /// Direction of the messages acknowledged (not of the Ack itself).
    pub from_initiator: bool,
    pub sequence: u64,
    /// The acknowledging node's broker instance: the sender pins the dialog to it.
    pub broker_instance: [u8; 16],
}

/// A broker-generated error (Service Broker's negative codes, e.g. -8490 "service not found").
/// Unsequenced and best-effort: if it is lost, the original message is retried and the error
/// generated again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub conversation_id: [u8; 16],
    /// Direction of this frame: `true` when it travels from the initiator's side to the target's.
    pub from_initiator: bool,
    /// Negative.
    pub code: i32,
    /// At most [`DESCRIPTION_BYTES_MAX`] bytes.
    pub description: String,
}

impl Frame {
    /// The frame kind's name, for errors and logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Message(_) => "message",
            Frame::Ack(_) => "ack",
            Frame::Error(_) => "error",
            Frame::GoAway => "go-away",
        }
    }

    /// Appends the frame to `out`, after checking every limit the decoder checks. On error `out`
    /// is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        match self {
            Frame::Hello(hello) => {
                let start = begin(out, KIND_HELLO);
                out.extend_from_slice(&HELLO_MAGIC);
                out.extend_from_slice(&hello.protocol_version.to_le_bytes());
                out.extend_from_slice(&hello.broker_instance);
                finish(out, start)
            }
            Frame::Message(m) => {
                check_message_header(&m.header, m.body_bytes as usize)?;
                encode_message_fragment(
                    out,
                    &m.header,
                    m.body_bytes,
                    m.fragment_offset,
                    &m.fragment,
                    false,
                )
            }
            Frame::Ack(ack) => {
                let start = begin(out, KIND_ACK);
                out.extend_from_slice(&ack.conversation_id);
                out.push(direction_flag(ack.from_initiator));
                out.extend_from_slice(&ack.sequence.to_le_bytes());
                out.extend_from_slice(&ack.broker_instance);
                finish(out, start)
            }
            Frame::Error(e) => {
                check_error(e.code, &e.description)?;
                let start = begin(out, KIND_ERROR);
                out.extend_from_slice(&e.conversation_id);
                out.push(direction_flag(e.from_initiator));
                out.extend_from_slice(&e.code.to_le_bytes());
                put_str(out, &e.description);
                finish(out, start)
            }
            Frame::GoAway => {
                let start = begin(out, KIND_GO_AWAY);
                finish(out, start)
            }
        }
    }

    /// The frame encoded into a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes the one frame at the start of `bytes`; returns it and how many bytes it took.
    /// Fewer bytes than the frame needs is [`Error::Truncated`]; streams use [`FrameDecoder`].
    pub fn decode(bytes: &[u8]) -> Result<(Frame, usize)> {
        if bytes.len() < FRAME_HEADER_BYTES {
            return Err(Error::Truncated {
                needed: FRAME_HEADER_BYTES,
                available: bytes.len(),
            });
        }
        let total = frame_bytes(bytes)?;
        if bytes.len() < total {
            return Err(Error::Truncated {
                needed: total,
                available: bytes.len(),
            });
        }
        Ok((parse(&bytes[..total], &mut NameCache::default())?, total))
    }
}

/// Cuts a byte stream that arrives in arbitrary chunks (as a QUIC stream delivers it) into
/// frames: the shared `payload::FrameBuffer` framing with this protocol's header check (sizes
/// against [`FRAME_BYTES_MAX`]) and parser. A frame's declared size is reserved once its header
/// is checked. After an error every later call returns [`Error::DecoderFailed`].
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: FrameBuffer,
    names: NameCache,
}

/// Most distinct names a [`NameCache`] holds (at most [`NAME_BYTES_MAX`] bytes each, so at most
/// 256 KiB per connection); past it the cache starts over.
pub const NAME_CACHE_ENTRIES_MAX: usize = 1024;

/// The names (services, contracts, message types) decoded recently on one connection: the many
/// messages that carry the same names share one allocation per name instead of four per message.
#[derive(Debug, Default)]
struct NameCache {
    names: HashSet<Arc<str>>,
    /// The name returned last, per field of a Message (source service, target service,
    /// contract, message type), so the names of the last Message that carried them: what a
    /// Message flagged "names as before" has. Consecutive messages mostly repeat them, and a
    /// comparison is cheaper than hashing the name.
    last: [Option<Arc<str>>; 4],
}

impl NameCache {
    /// The names of the last Message decoded with its names on this stream. (A Message that
    /// failed halfway through its names fails the decoder: none is decoded after it.)
    fn last_message(&self) -> Option<[Arc<str>; 4]> {
        let [a, b, c, d] = &self.last;
        Some([a.clone()?, b.clone()?, c.clone()?, d.clone()?])
    }

    /// [`NameCache::get`] for field `field` (0–3) of a Message.
    fn get_field(&mut self, field: usize, name: &str) -> Arc<str> {
        if let Some(last) = &self.last[field]
            && **last == *name
        {
            return last.clone();
        }
        let found = self.get(name);
        self.last[field] = Some(found.clone());
        found
    }

    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(known) = self.names.get(name) {
            return known.clone();
        }
        if self.names.len() >= NAME_CACHE_ENTRIES_MAX {
            self.names.clear();
        }
        let name: Arc<str> = Arc::from(name);
        self.names.insert(name.clone());
        name
    }
}

impl Default for FrameDecoder {
    fn default() -> FrameDecoder {
        FrameDecoder {
            buffer: FrameBuffer::reserving(),
            names: NameCache::default(),
        }
    }
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Takes bytes from the front of `input`, never past the end of the next frame, and returns
    /// that frame once it is whole; `Ok(None)` means `input` is used up and the frame is not yet
    /// complete. Call again while `input` is not empty.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>> {
        let names = &mut self.names;
        self.buffer
            .next(input, FRAME_HEADER_BYTES, frame_bytes, |frame| {
                parse(frame, names)
            })
    }

    /// Bytes of an incomplete frame held from earlier calls.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.buffered_bytes()
    }
}

/// Checks a Message's names and body length against the limits the decoder enforces: once per
/// message, so that encoding each of its fragments (see [`encode_message_fragment`]) cannot
/// fail on them.
pub(crate) fn check_message_header(header: &MessageHeader, body_bytes: usize) -> Result<()> {
    for (field, name) in message_names(header) {
        check_name(field, name.len())?;
    }
    if body_bytes > MESSAGE_BODY_BYTES_MAX {
        return Err(Error::BodyTooLarge {
            bytes: body_bytes,
            max: MESSAGE_BODY_BYTES_MAX,
        });
    }
    Ok(())
}

/// A Message's names, in their order on the wire.
fn message_names(header: &MessageHeader) -> [(&'static str, &str); 4] {
    [
        ("source service", &header.source_service),
        ("target service", &header.target_service),
        ("contract", &header.contract),
        ("message type", &header.message_type),
    ]
}

/// Appends one Message frame of `header` (checked by [`check_message_header`] for a body of
/// `body_bytes`), then the fragment. The header's fields are encoded for each fragment: a
/// session keeps no encoded copy per unacknowledged message. With `names_as_before`, the names
/// are left out: the caller vouches that the previous Message frame on the stream had the same.
pub(crate) fn encode_message_fragment(
    out: &mut Vec<u8>,
    header: &MessageHeader,
    body_bytes: u32,
    fragment_offset: u32,
    fragment: &[u8],
    names_as_before: bool,
) -> Result<()> {
    check_fragment(body_bytes, fragment_offset, fragment.len())?;
    let names = message_names(header);
    for (field, name) in names {
        check_name(field, name.len())?;
    }
    let start = begin(out, KIND_MESSAGE);
    out.reserve(message_frame_bytes(header, fragment.len(), names_as_before) - FRAME_HEADER_BYTES);
    out.extend_from_slice(&header.conversation_id);
    let mut flags = direction_flag(header.from_initiator);
    if header.target_broker_instance.is_some() {
        flags |= FLAG_HAS_TARGET_BROKER;
    }
    if names_as_before {
        flags |= FLAG_NAMES_AS_BEFORE;
    }
    out.push(flags);
    out.extend_from_slice(&header.sequence.to_le_bytes());
    out.extend_from_slice(&header.lifetime_deadline_secs.to_le_bytes());
    out.extend_from_slice(&header.target_broker_instance.unwrap_or([0; 16]));
    if !names_as_before {
        for (_, name) in names {
            put_str(out, name);
        }
    }
    out.extend_from_slice(&body_bytes.to_le_bytes());
    out.extend_from_slice(&fragment_offset.to_le_bytes());
    out.extend_from_slice(fragment);
    finish(out, start)
}

/// Bytes a Message frame of this header and fragment length takes, its names left out or not.
pub(crate) fn message_frame_bytes(
    header: &MessageHeader,
    fragment_bytes: usize,
    names_as_before: bool,
) -> usize {
    let names_bytes: usize = if names_as_before {
        0
    } else {
        message_names(header)
            .iter()
            .map(|(_, name)| 2 + name.len())
            .sum()
    };
    FRAME_HEADER_BYTES + MESSAGE_FIXED_BYTES + names_bytes + 4 + 4 + fragment_bytes
}

pub(crate) fn check_error(code: i32, description: &str) -> Result<()> {
    if code >= 0 {
        return Err(Error::ErrorCodeNotNegative { code });
    }
    if description.len() > DESCRIPTION_BYTES_MAX {
        return Err(Error::DescriptionTooLong {
            bytes: description.len(),
            max: DESCRIPTION_BYTES_MAX,
        });
    }
    Ok(())
}

fn check_name(field: &'static str, bytes: usize) -> Result<()> {
    if bytes > NAME_BYTES_MAX {
        return Err(Error::NameTooLong {
            field,
            bytes,
            max: NAME_BYTES_MAX,
        });
    }
    Ok(())
}

/// A fragment is at most [`FRAGMENT_BODY_BYTES_MAX`], lies inside its body, and is empty only
/// as the single fragment of an empty body (so a message cannot be padded with empty frames).
fn check_fragment(body_bytes: u32, offset: u32, bytes: usize) -> Result<()> {
    if body_bytes as usize > MESSAGE_BODY_BYTES_MAX {
        return Err(Error::BodyTooLarge {
            bytes: body_bytes as usize,
            max: MESSAGE_BODY_BYTES_MAX,
        });
    }
    if bytes > FRAGMENT_BODY_BYTES_MAX {
        return Err(Error::FragmentTooLarge {
            bytes,
            max: FRAGMENT_BODY_BYTES_MAX,
        });
    }
    let fits = (offset as usize)
        .checked_add(bytes)
        .is_some_and(|end| end <= body_bytes as usize);
    let empty_ok = bytes > 0 || (body_bytes == 0 && offset == 0);
    if !fits || !empty_ok {
        return Err(Error::FragmentOutOfRange {
            offset,
            bytes,
            body_bytes,
        });
    }
    Ok(())
}

fn direction_flag(from_initiator: bool) -> u8 {
    if from_initiator {
        FLAG_FROM_INITIATOR
    } else {
        0
    }
}

/// Starts a frame: a length placeholder and the kind. Returns where the frame starts.
fn begin(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    start
}

/// Fills in the length of the frame started at `start`, or takes the frame back out if it is
/// too large (which the callers' own checks make impossible, but the limit is kept here too).
fn finish(out: &mut Vec<u8>, start: usize) -> Result<()> {
    let total = out.len() - start;
    if total > FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(Error::FrameTooLarge {
            bytes: total,
            max: FRAME_BYTES_MAX,
        });
    }
    let payload = (total - FRAME_HEADER_BYTES) as u32;
    out[start..start + 4].copy_from_slice(&payload.to_le_bytes());
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The whole size of the frame whose header starts `bytes` (at least [`FRAME_HEADER_BYTES`]
/// long), after checking the size and the kind, so that nothing is buffered for a frame that
/// will be refused.
fn frame_bytes(bytes: &[u8]) -> Result<usize> {
    let payload = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let total = payload.saturating_add(FRAME_HEADER_BYTES);
    if total > FRAME_BYTES_MAX {
        return Err(Error::FrameTooLarge {
            bytes: total,
            max: FRAME_BYTES_MAX,
        });
    }
    let kind = bytes[4];
    if !(KIND_HELLO..=KIND_GO_AWAY).contains(&kind) {
        return Err(Error::UnknownFrameKind { kind });
    }
    Ok(total)
}

/// Parses one whole frame, `bytes` being exactly the frame.
fn parse(bytes: &[u8], names: &mut NameCache) -> Result<Frame> {
    let kind = bytes[4];
    let payload = &bytes[FRAME_HEADER_BYTES..];
    match kind {
        KIND_HELLO => parse_hello(payload),
        KIND_MESSAGE => parse_message(payload, names),
        KIND_ACK => {
            let mut r = Reader::at_least(payload, "ack", ACK_PAYLOAD_BYTES)?;
            let ack = Ack {
                conversation_id: r.array()?,
                from_initiator: r.direction()?,
                sequence: r.u64()?,
                broker_instance: r.array()?,
            };
            r.end()?;
            Ok(Frame::Ack(ack))
        }
        KIND_ERROR => {
            let mut r = Reader::at_least(payload, "error", 16 + 1 + 4 + 2)?;
            let conversation_id = r.array()?;
            let from_initiator = r.direction()?;
            let code = i32::from_le_bytes(r.array()?);
            let description = r.string("description", DESCRIPTION_BYTES_MAX)?;
            r.end()?;
            check_error(code, &description)?;
            Ok(Frame::Error(ErrorFrame {
                conversation_id,
                from_initiator,
                code,
                description,
            }))
        }
        KIND_GO_AWAY => {
            Reader::at_least(payload, "go-away", 0)?.end()?;
            Ok(Frame::GoAway)
        }
        other => Err(Error::UnknownFrameKind { kind: other }),
    }
}

/// A Hello's first 22 bytes (magic, version, broker instance) are the same in every protocol
/// version, so that two versions can always tell each other apart; what a later version appends
/// is ignored here, because the session refuses that version anyway.
fn parse_hello(payload: &[u8]) -> Result<Frame> {
    let mut r = Reader::at_least(payload, "hello", HELLO_PAYLOAD_BYTES)?;
    let magic: [u8; 4] = r.array()?;
    if magic != HELLO_MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    let protocol_version = u16::from_le_bytes(r.array()?);
    let broker_instance = r.array()?;
    if protocol_version == PROTOCOL_VERSION {
        r.end()?;
    }
    Ok(Frame::Hello(Hello {
        protocol_version,
        broker_instance,
    }))
}

fn parse_message(payload: &[u8], names: &mut NameCache) -> Result<Frame> {
    let mut r = Reader::at_least(payload, "message", MESSAGE_FIXED_BYTES + 4 + 4)?;
    let conversation_id = r.array()?;
    let flags = r.u8()?;
    if flags & !(FLAG_FROM_INITIATOR | FLAG_HAS_TARGET_BROKER | FLAG_NAMES_AS_BEFORE) != 0 {
        return Err(r.malformed(format!("undefined flag bits in {flags:#04x}")));
    }
    let sequence = r.u64()?;
    let lifetime_deadline_secs = r.u64()?;
    let target_broker: [u8; 16] = r.array()?;
    let target_broker_instance = if flags & FLAG_HAS_TARGET_BROKER != 0 {
        Some(target_broker)
    } else if target_broker != [0; 16] {
        return Err(r.malformed("absent target broker instance is not zeros".into()));
    } else {
        None
    };
    let [source_service, target_service, contract, message_type] =
        if flags & FLAG_NAMES_AS_BEFORE != 0 {
            names.last_message().ok_or_else(|| {
                r.malformed("names as before, but no Message came before on this stream".into())
            })?
        } else {
            let source_service = names.get_field(0, r.str("source service", NAME_BYTES_MAX)?);
            let target_service = names.get_field(1, r.str("target service", NAME_BYTES_MAX)?);
            let contract = names.get_field(2, r.str("contract", NAME_BYTES_MAX)?);
            let message_type = names.get_field(3, r.str("message type", NAME_BYTES_MAX)?);
            [source_service, target_service, contract, message_type]
        };
    let body_bytes = r.u32()?;
    let fragment_offset = r.u32()?;
    let fragment = r.rest();
    check_fragment(body_bytes, fragment_offset, fragment.len())?;
    Ok(Frame::Message(MessageFragment {
        header: MessageHeader {
            conversation_id,
            from_initiator: flags & FLAG_FROM_INITIATOR != 0,
            sequence,
            source_service,
            target_service,
            contract,
            message_type,
            target_broker_instance,
            lifetime_deadline_secs,
        },
        body_bytes,
        fragment_offset,
        fragment: fragment.to_vec(),
    }))
}

/// The node protocol's own fields.
impl Reader<'_> {
    /// A flags byte that may only say the direction.
    fn direction(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            FLAG_FROM_INITIATOR => Ok(true),
            other => Err(self.malformed(format!("undefined flag bits in {other:#04x}"))),
        }
    }

    /// `len u16 | UTF-8 bytes`, at most `max` bytes; the length is checked before the bytes are
    /// looked at.
    fn string(&mut self, field: &'static str, max: usize) -> Result<String> {
        self.str(field, max).map(str::to_owned)
    }

    /// [`string`](Reader::string), borrowed from the payload.
    fn str(&mut self, field: &'static str, max: usize) -> Result<&str> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(if field == "description" {
                Error::DescriptionTooLong { bytes: len, max }
            } else {
                Error::NameTooLong {
                    field,
                    bytes: len,
                    max,
                }
            });
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| Error::NotUtf8 { field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_cache_shares_names_and_starts_over_past_its_bound() {
        let mut cache = NameCache::default();
        let first = cache.get("//s/Name");
        assert!(Arc::ptr_eq(&first, &cache.get("//s/Name")));
        for n in 1..NAME_CACHE_ENTRIES_MAX {
            cache.get(&format!("//s/{n}"));
        }
        assert_eq!(cache.names.len(), NAME_CACHE_ENTRIES_MAX);
        // One more distinct name: the cache starts over with it alone.
        let over = cache.get("//s/one more");
        assert_eq!(cache.names.len(), 1);
        assert!(Arc::ptr_eq(&over, &cache.get("//s/one more")));
        let again = cache.get("//s/Name");
        assert!(!Arc::ptr_eq(&first, &again), "forgotten, so allocated anew");
        assert_eq!(first, again);
    }

    #[test]
    fn a_decoder_shares_the_names_of_the_messages_it_decodes() {
        let frame = Frame::Message(MessageFragment {
            header: longest_header(),
            body_bytes: 1,
            fragment_offset: 0,
            fragment: vec![7],
        });
        let bytes = frame.to_bytes().expect("encodes");
        let mut decoder = FrameDecoder::new();
        let mut decode = || match decoder.decode(&mut &bytes[..]) {
            Ok(Some(Frame::Message(m))) => m.header,
            other => panic!("expected a message, got {other:?}"),
        };
        let (one, two) = (decode(), decode());
        assert!(Arc::ptr_eq(&one.source_service, &two.source_service));
        assert!(Arc::ptr_eq(&one.message_type, &two.message_type));
        assert_eq!(
            Frame::Message(MessageFragment {
                header: two,
                body_bytes: 1,
                fragment_offset: 0,
                fragment: vec![7]
            }),
            frame
        );
    }

    fn longest_header() -> MessageHeader {
        let name: Arc<str> = "n".repeat(NAME_BYTES_MAX).into();
        MessageHeader {
            conversation_id: [1; 16],
            from_initiator: true,
            sequence: u64::MAX,
            source_service: name.clone(),
            target_service: name.clone(),
            contract: name.clone(),
            message_type: name,
            target_broker_instance: Some([2; 16]),
            lifetime_deadline_secs: u64::MAX,
        }
    }

    #[test]
    fn a_name_cache_shares_one_allocation_per_name_across_fields_and_messages() {
        let mut names = NameCache::default();
        let first = names.get_field(0, "//a");
        assert!(
            Arc::ptr_eq(&first, &names.get_field(0, "//a")),
            "the field's last"
        );
        assert!(
            Arc::ptr_eq(&first, &names.get_field(1, "//a")),
            "from the set"
        );
        let other = names.get_field(0, "//b");
        assert_eq!(&*other, "//b");
        assert!(Arc::ptr_eq(&first, &names.get_field(0, "//a")));
        assert_eq!(names.names.len(), 2);
    }

    /// Encodes Messages of `header` with a body of `body`, the names left out or not.
    fn message_bytes(header: &MessageHeader, body: &[u8], names_as_before: bool) -> Vec<u8> {
        let mut out = Vec::new();
        encode_message_fragment(
            &mut out,
            header,
            body.len() as u32,
            0,
            body,
            names_as_before,
        )
        .expect("encodes");
        assert_eq!(
            out.len(),
            message_frame_bytes(header, body.len(), names_as_before)
        );
        out
    }

    #[test]
    fn a_message_may_leave_out_the_names_of_the_message_before_it() {
        let header = longest_header();
        let mut other = longest_header();
        other.message_type = "//other".into();
        let mut stream = message_bytes(&header, b"one", false);
        let short = message_bytes(&header, b"two", true);
        assert_eq!(
            stream.len() - short.len(),
            4 * (2 + NAME_BYTES_MAX),
            "the names are left out"
        );
        stream.extend_from_slice(&short);
        stream.extend_from_slice(&message_bytes(&other, b"three", false));
        stream.extend_from_slice(&message_bytes(&other, b"four", true));
        let mut decoder = FrameDecoder::new();
        let mut input = &stream[..];
        let mut got = Vec::new();
        while let Some(frame) = decoder.decode(&mut input).expect("decodes") {
            let Frame::Message(m) = frame else {
                panic!("only messages were sent")
            };
            got.push((m.header.message_type, m.fragment));
        }
        let expected: Vec<(Arc<str>, Vec<u8>)> = vec![
            (header.message_type.clone(), b"one".to_vec()),
            (header.message_type.clone(), b"two".to_vec()),
            ("//other".into(), b"three".to_vec()),
            ("//other".into(), b"four".to_vec()),
        ];
        assert_eq!(got, expected);

        // Alone, or first on a stream, it has nothing to take the names from.
        assert!(matches!(
            Frame::decode(&short),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            FrameDecoder::new().decode(&mut &short[..]),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn the_largest_frames_are_the_sizes_the_limits_assume() {
        let header = longest_header();
        check_message_header(&header, MESSAGE_BODY_BYTES_MAX).expect("the longest header is valid");
        let mut out = Vec::new();
        let fragment = vec![0; FRAGMENT_BODY_BYTES_MAX];
        encode_message_fragment(
            &mut out,
            &header,
            MESSAGE_BODY_BYTES_MAX as u32,
            0,
            &fragment,
            false,
        )
        .expect("the largest fragment encodes");
        assert_eq!(out.len(), MESSAGE_FRAME_BYTES_MAX);
        assert_eq!(
            message_frame_bytes(&header, FRAGMENT_BODY_BYTES_MAX, false),
            out.len()
        );
        let error = Frame::Error(ErrorFrame {
            conversation_id: [1; 16],
            from_initiator: true,
            code: i32::MIN,
            description: "d".repeat(DESCRIPTION_BYTES_MAX),
        });
        assert_eq!(
            error.to_bytes().expect("encodes").len(),
            ERROR_FRAME_BYTES_MAX
        );
    }

    #[test]
    fn a_frame_over_the_limit_is_taken_back_out() {
        let mut out = vec![9];
        let start = begin(&mut out, KIND_GO_AWAY);
        out.resize(start + FRAME_BYTES_MAX, 0);
        finish(&mut out, start).expect("exactly the limit is a frame");
        let mut out = vec![9];
        let start = begin(&mut out, KIND_GO_AWAY);
        out.resize(start + FRAME_BYTES_MAX + 1, 0);
        assert_eq!(
            finish(&mut out, start),
            Err(Error::FrameTooLarge {
                bytes: FRAME_BYTES_MAX + 1,
                max: FRAME_BYTES_MAX
            })
        );
        assert_eq!(out, [9]);
    }

    #[test]
    fn a_large_frame_does_not_leave_a_large_idle_buffer() {
        let frame = Frame::Message(MessageFragment {
            header: longest_header(),
            body_bytes: FRAGMENT_BODY_BYTES_MAX as u32,
            fragment_offset: 0,
            fragment: vec![3; FRAGMENT_BODY_BYTES_MAX],
        });
        let bytes = frame.to_bytes().expect("encodes");
        let mut decoder = FrameDecoder::new();
        for chunk in bytes.chunks(1000) {
            let mut chunk = chunk;
            if let Some(decoded) = decoder.decode(&mut chunk).expect("decodes") {
                assert_eq!(decoded, frame);
            }
        }
        assert!(decoder.buffer.capacity() <= crate::payload::DECODER_IDLE_CAPACITY_BYTES_MAX);
    }
}
