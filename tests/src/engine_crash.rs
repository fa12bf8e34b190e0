//! What the engine crash test and its writer process share: the catalog, the message bodies, and
//! the lines the writer prints about its transactions.
//!
//! A body's length and every byte are a function of its kind and [`BodyId`] alone, and both are
//! in its first 9 bytes: whoever receives a message can check it by its content, whether or not
//! the writer lived to acknowledge sending it.
//!
//! The writer prints two lines per transaction, each one `write` of a whole line: a `pending`
//! line just before `commit` is called and a `commit` line after it returned, both naming every
//! change the transaction makes ([`TxOp`]). A `commit` line is a promise that the transaction is
//! durable. A `pending` line without its `commit` is a transaction that may or may not have
//! committed when the writer was killed; naming its changes lets the test check that it
//! committed entirely or not at all. Each writer thread waits for one commit to return before it
//! starts the next transaction, so a thread has at most one such transaction per round.

use std::fmt;

use herald_engine::{
    ConversationHandle, DialogOptions, Options, QueueOptions, SentBy, Transaction, Validation,
};

use crate::crash_record::{RecordId, mix, pattern_word};

/// Segment size of the crash broker's log: small, so that rounds cross segment boundaries.
pub const CRASH_SEGMENT_BYTES: u64 = 1024 * 1024;
/// Log growth between checkpoints: small, so that kills also land in checkpoints, segment
/// releases and compactions, and recovery starts from a checkpoint.
pub const CRASH_CHECKPOINT_INTERVAL_BYTES: u64 = 256 * 1024;

pub const REQUEST_TYPE: &str = "//crash/Request";
pub const REPLY_TYPE: &str = "//crash/Reply";
pub const CONTRACT: &str = "//crash/Contract";
/// Receives the replies; its service begins the dialogs.
pub const INITIATOR_QUEUE: &str = "crash_initiator_queue";
/// Receives the requests.
pub const TARGET_QUEUE: &str = "crash_target_queue";
pub const INITIATOR_SERVICE: &str = "//crash/Initiator";
pub const TARGET_SERVICE: &str = "//crash/Target";
/// The life-cycle dialogs (END CONVERSATION, timers) run between these two services, on their
/// own queues, which nobody receives from: what the broker puts there (EndDialog, Error,
/// DialogTimer) stays for the test to count.
pub const LIFE_INITIATOR_QUEUE: &str = "crash_life_initiator_queue";
pub const LIFE_TARGET_QUEUE: &str = "crash_life_target_queue";
pub const LIFE_INITIATOR_SERVICE: &str = "//crash/LifeInitiator";
pub const LIFE_TARGET_SERVICE: &str = "//crash/LifeTarget";
/// A queue with poison-message protection on, holding one message that a writer thread receives
/// and rolls back until the queue is disabled, then enables again.
pub const POISON_QUEUE: &str = "crash_poison_queue";
pub const POISON_SERVICE: &str = "//crash/Poison";
/// The body of the requests sent on life-cycle dialogs.
pub const LIFE_BODY: &[u8] = b"life";
/// Requests a life-cycle dialog carries at most (sent when it begins).
pub const LIFE_REQUESTS_MAX: u64 = 2;
/// Conversation timers the writer sets time out after this long (on the system clock).
pub const LIFE_TIMER_MS: std::ops::RangeInclusive<u64> = 10..=200;

/// The description END CONVERSATION WITH ERROR sends with `code`.
pub fn error_description(code: i32) -> String {
    format!("crash error {code}")
}

/// Options the writer and the test both open the crash broker with (durability `Sync`).
pub fn crash_broker_options() -> Options {
    Options {
        segment_bytes: CRASH_SEGMENT_BYTES,
        checkpoint_interval_bytes: CRASH_CHECKPOINT_INTERVAL_BYTES,
        ..Options::default()
    }
}

/// Creates the crash test's catalog in `tx`: two message types, a contract, two queues and two
/// services.
pub fn create_catalog(tx: &mut Transaction<'_>) -> herald_engine::Result<()> {
    tx.create_message_type(REQUEST_TYPE, Validation::None)?;
    tx.create_message_type(REPLY_TYPE, Validation::None)?;
    tx.create_contract(
        CONTRACT,
        &[
            (REQUEST_TYPE, SentBy::Initiator),
            (REPLY_TYPE, SentBy::Target),
        ],
    )?;
    // The writers roll back receives on purpose: poison-message protection would turn the
    // queues off mid-round.
    let queue = QueueOptions {
        poison_message_handling: false,
        ..QueueOptions::default()
    };
    tx.create_queue(INITIATOR_QUEUE, queue)?;
    tx.create_queue(TARGET_QUEUE, queue)?;
    tx.create_service(INITIATOR_SERVICE, INITIATOR_QUEUE, &[])?;
    tx.create_service(TARGET_SERVICE, TARGET_QUEUE, &[CONTRACT])?;
    tx.create_queue(LIFE_INITIATOR_QUEUE, queue)?;
    tx.create_queue(LIFE_TARGET_QUEUE, queue)?;
    tx.create_service(LIFE_INITIATOR_SERVICE, LIFE_INITIATOR_QUEUE, &[])?;
    tx.create_service(LIFE_TARGET_SERVICE, LIFE_TARGET_QUEUE, &[CONTRACT])?;
    tx.create_queue(POISON_QUEUE, QueueOptions::default())?;
    tx.create_service(POISON_SERVICE, POISON_QUEUE, &[CONTRACT])?;
    let poison = tx.begin_dialog(
        LIFE_INITIATOR_SERVICE,
        POISON_SERVICE,
        CONTRACT,
        DialogOptions::default(),
    )?;
    tx.send(poison, REQUEST_TYPE, b"poison")
}

/// Who sent a body: the round (one writer process per round), the writer thread, and the
/// thread's message number (0, 1, 2, … over the round). Unique over the whole test.
pub type BodyId = RecordId;

/// Requests go from initiator to target, replies back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BodyKind {
    Request,
    Reply,
}

impl BodyKind {
    pub fn message_type(self) -> &'static str {
        match self {
            BodyKind::Request => REQUEST_TYPE,
            BodyKind::Reply => REPLY_TYPE,
        }
    }

    fn code(self) -> u8 {
        match self {
            BodyKind::Request => 1,
            BodyKind::Reply => 2,
        }
    }
}

/// Bytes before the pattern: the id (8) and the kind (1).
pub const BODY_HEADER_BYTES: usize = 9;
/// Largest body (a few are this big, so that some records are several pages long).
pub const BODY_BYTES_MAX: usize = 16 * 1024;

/// Body length: mostly small, a quarter up to 2 KiB, a few up to 16 KiB.
pub fn body_len(kind: BodyKind, id: BodyId) -> usize {
    let h = mix(id.to_bits() ^ LEN_SALT ^ u64::from(kind.code()));
    let pick = (h >> 32) as usize;
    BODY_HEADER_BYTES
        + match h % 100 {
            0..70 => pick % 201,
            70..95 => pick % 2049,
            _ => pick % (BODY_BYTES_MAX - BODY_HEADER_BYTES + 1),
        }
}

/// The whole body of message `id`.
pub fn message_body(kind: BodyKind, id: BodyId) -> Vec<u8> {
    let len = body_len(kind, id);
    let mut out = Vec::with_capacity(len + 8);
    out.extend_from_slice(&id.to_bits().to_le_bytes());
    out.push(kind.code());
    let seed = pattern_seed(kind, id);
    let mut word = 0u64;
    while out.len() < len {
        out.extend_from_slice(&pattern_word(seed, word).to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

/// Checks a received body by its content alone and returns its kind and id: the length and
/// every byte must be what its first 9 bytes say.
pub fn verify_body(body: &[u8]) -> Result<(BodyKind, BodyId), String> {
    let Some((id_bytes, rest)) = body.split_first_chunk::<8>() else {
        return Err(format!("body of {} bytes has no id", body.len()));
    };
    let id = RecordId::from_bits(u64::from_le_bytes(*id_bytes));
    let kind = match rest.first() {
        Some(1) => BodyKind::Request,
        Some(2) => BodyKind::Reply,
        Some(other) => return Err(format!("body {id}: unknown kind {other}")),
        None => return Err(format!("body {id}: no kind byte")),
    };
    if body.len() != body_len(kind, id) {
        return Err(format!(
            "body {id}: {} bytes, its id says {}",
            body.len(),
            body_len(kind, id)
        ));
    }
    let seed = pattern_seed(kind, id);
    for (word, chunk) in body[BODY_HEADER_BYTES..].chunks(8).enumerate() {
        let expected = pattern_word(seed, word as u64).to_le_bytes();
        if chunk != &expected[..chunk.len()] {
            let at = BODY_HEADER_BYTES + word * 8;
            return Err(format!(
                "body {id}: bytes {at}..{} differ from its pattern",
                at + chunk.len()
            ));
        }
    }
    Ok((kind, id))
}

/// Whether a line announces a transaction or acknowledges its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Printed just before `commit` is called.
    Pending,
    /// Printed after `commit` returned: the transaction is durable.
    Commit,
}

/// One change a transaction makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxOp {
    /// The crash catalog was created.
    Catalog,
    /// A dialog was begun; `handle` is the initiator's.
    Begin { handle: ConversationHandle },
    /// Message `body` was sent from endpoint `handle` with `sequence`.
    Send {
        handle: ConversationHandle,
        sequence: u64,
        body: BodyId,
    },
    /// Message `body` was received by endpoint `handle` with `sequence`.
    Receive {
        handle: ConversationHandle,
        sequence: u64,
        body: BodyId,
    },
    /// A life-cycle dialog was begun; `handle` is the initiator's, which sent `requests`
    /// requests with body [`LIFE_BODY`] on it, in the same transaction.
    LifeBegin {
        handle: ConversationHandle,
        requests: u64,
    },
    /// Life-cycle initiator `handle` was ended, plainly or WITH ERROR = `error`.
    End {
        handle: ConversationHandle,
        error: Option<i32>,
    },
    /// The target `handle` of life-cycle dialog `initiator` was ended (plainly), after the
    /// initiator: both endpoints are removed.
    EndTarget {
        handle: ConversationHandle,
        initiator: ConversationHandle,
    },
    /// A conversation timer was set on life-cycle initiator `handle`; its deadline (ms since
    /// the UNIX epoch) is in `lo_ms..=hi_ms` (the system clock read before and after the call,
    /// plus the timeout).
    Timer {
        handle: ConversationHandle,
        lo_ms: u64,
        hi_ms: u64,
    },
    /// The fifth rollback in a row of a receive from the poison queue: it disabled the queue.
    Disable,
    /// ALTER QUEUE enabled the poison queue again.
    Enable,
}

/// A `pending` or `commit` line: `<phase> <round> <thread> <tx> <op>…`, where an op is `catalog`,
/// `begin=<handle>`, `send=<handle>/<sequence>/<body>` or `recv=<handle>/<sequence>/<body>`, a
/// handle is 32 hex digits and a body `<round>.<thread>.<seq>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxLine {
    pub phase: Phase,
    pub round: u32,
    pub thread: u8,
    /// The thread's transaction number: 0, 1, 2, … in the order they commit.
    pub tx: u64,
    pub ops: Vec<TxOp>,
}

impl fmt::Display for TxOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = |id: &BodyId| format!("{}.{}.{}", id.round, id.thread, id.seq);
        match self {
            TxOp::Catalog => write!(f, "catalog"),
            TxOp::Begin { handle } => write!(f, "begin={:032x}", handle.0),
            TxOp::Send {
                handle,
                sequence,
                body: id,
            } => write!(f, "send={:032x}/{sequence}/{}", handle.0, body(id)),
            TxOp::Receive {
                handle,
                sequence,
                body: id,
            } => write!(f, "recv={:032x}/{sequence}/{}", handle.0, body(id)),
            TxOp::LifeBegin { handle, requests } => {
                write!(f, "life={:032x}/{requests}", handle.0)
            }
            TxOp::End {
                handle,
                error: None,
            } => write!(f, "end={:032x}/plain", handle.0),
            TxOp::End {
                handle,
                error: Some(code),
            } => write!(f, "end={:032x}/error{code}", handle.0),
            TxOp::EndTarget { handle, initiator } => {
                write!(f, "endtarget={:032x}/{:032x}", handle.0, initiator.0)
            }
            TxOp::Timer {
                handle,
                lo_ms,
                hi_ms,
            } => write!(f, "timer={:032x}/{lo_ms}/{hi_ms}", handle.0),
            TxOp::Disable => write!(f, "disable"),
            TxOp::Enable => write!(f, "enable"),
        }
    }
}

impl TxLine {
    /// The line, newline included, so that it goes out in one write.
    pub fn to_line(&self) -> String {
        let mut line = format!(
            "{} {} {} {}",
            match self.phase {
                Phase::Pending => "pending",
                Phase::Commit => "commit",
            },
            self.round,
            self.thread,
            self.tx
        );
        for op in &self.ops {
            line.push(' ');
            line.push_str(&op.to_string());
        }
        line.push('\n');
        line
    }

    /// Parses one complete line (without its newline).
    pub fn parse(line: &str) -> Result<TxLine, String> {
        let bad = |what: &str| format!("line {line:?}: bad {what}");
        let mut fields = line.split(' ');
        let phase = match fields.next() {
            Some("pending") => Phase::Pending,
            Some("commit") => Phase::Commit,
            _ => return Err(bad("phase")),
        };
        let mut number = |what: &str| -> Result<u64, String> {
            fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad(what))
        };
        let round = u32::try_from(number("round")?).map_err(|_| bad("round"))?;
        let thread = u8::try_from(number("thread")?).map_err(|_| bad("thread"))?;
        let tx = number("tx")?;
        let ops = fields
            .map(|op| parse_op(op).ok_or_else(|| bad(&format!("op {op:?}"))))
            .collect::<Result<Vec<TxOp>, String>>()?;
        if ops.is_empty() {
            return Err(bad("ops (none)"));
        }
        Ok(TxLine {
            phase,
            round,
            thread,
            tx,
            ops,
        })
    }
}

/// Splits a writer's output into its complete lines; a last line without its newline (the
/// writer died in the middle of printing it) is dropped, since nothing in it can be trusted.
pub fn parse_lines(output: &[u8]) -> Result<Vec<TxLine>, String> {
    let text = std::str::from_utf8(output).map_err(|e| format!("writer output: {e}"))?;
    let mut lines: Vec<&str> = text.split('\n').collect();
    lines.pop(); // after the last newline: empty, or a half-printed line
    lines.into_iter().map(TxLine::parse).collect()
}

fn parse_op(op: &str) -> Option<TxOp> {
    match op {
        "catalog" => return Some(TxOp::Catalog),
        "disable" => return Some(TxOp::Disable),
        "enable" => return Some(TxOp::Enable),
        _ => {}
    }
    let (name, value) = op.split_once('=')?;
    if name == "begin" {
        return Some(TxOp::Begin {
            handle: parse_handle(value)?,
        });
    }
    if name == "life" {
        let (handle, requests) = value.split_once('/')?;
        return Some(TxOp::LifeBegin {
            handle: parse_handle(handle)?,
            requests: requests.parse().ok()?,
        });
    }
    let mut parts = value.split('/');
    let handle = parse_handle(parts.next()?)?;
    match name {
        "end" => {
            let how = parts.next()?;
            let error = match how {
                "plain" => None,
                _ => Some(how.strip_prefix("error")?.parse().ok()?),
            };
            return parts
                .next()
                .is_none()
                .then_some(TxOp::End { handle, error });
        }
        "endtarget" => {
            let initiator = parse_handle(parts.next()?)?;
            return parts
                .next()
                .is_none()
                .then_some(TxOp::EndTarget { handle, initiator });
        }
        "timer" => {
            let lo_ms = parts.next()?.parse().ok()?;
            let hi_ms = parts.next()?.parse().ok()?;
            return parts.next().is_none().then_some(TxOp::Timer {
                handle,
                lo_ms,
                hi_ms,
            });
        }
        _ => {}
    }
    let sequence = parts.next()?.parse().ok()?;
    let body = parse_body_id(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    match name {
        "send" => Some(TxOp::Send {
            handle,
            sequence,
            body,
        }),
        "recv" => Some(TxOp::Receive {
            handle,
            sequence,
            body,
        }),
        _ => None,
    }
}

fn parse_handle(hex: &str) -> Option<ConversationHandle> {
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(hex, 16).ok().map(ConversationHandle)
}

fn parse_body_id(text: &str) -> Option<BodyId> {
    let mut parts = text.split('.');
    let id = RecordId {
        round: parts.next()?.parse().ok()?,
        thread: parts.next()?.parse().ok()?,
        seq: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some(id)
}

const LEN_SALT: u64 = 0x656e_6769_6e65_0001;
const PATTERN_SALT: u64 = 0x656e_6769_6e65_0002;

fn pattern_seed(kind: BodyKind, id: BodyId) -> u64 {
    mix(id.to_bits() ^ PATTERN_SALT ^ (u64::from(kind.code()) << 56))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_verify_and_damage_is_caught() {
        for seq in 0..500 {
            for kind in [BodyKind::Request, BodyKind::Reply] {
                let id = RecordId {
                    round: 11,
                    thread: (seq % 5) as u8,
                    seq,
                };
                let body = message_body(kind, id);
                assert!((BODY_HEADER_BYTES..=BODY_BYTES_MAX).contains(&body.len()));
                assert_eq!(verify_body(&body), Ok((kind, id)));
                let mut bad = body.clone();
                let at = seq as usize % bad.len();
                bad[at] ^= 0x04;
                assert!(verify_body(&bad).is_err(), "flip at {at} of {id}");
                assert!(verify_body(&body[..body.len() - 1]).is_err());
            }
        }
    }

    #[test]
    fn lines_round_trip_and_half_lines_are_dropped() {
        let body = RecordId {
            round: 3,
            thread: 1,
            seq: 9,
        };
        let line = TxLine {
            phase: Phase::Commit,
            round: 3,
            thread: 1,
            tx: 4,
            ops: vec![
                TxOp::Catalog,
                TxOp::Begin {
                    handle: ConversationHandle(u128::MAX - 5),
                },
                TxOp::Send {
                    handle: ConversationHandle(1),
                    sequence: 0,
                    body,
                },
                TxOp::Receive {
                    handle: ConversationHandle(1 << 100),
                    sequence: 17,
                    body,
                },
                TxOp::LifeBegin {
                    handle: ConversationHandle(7),
                    requests: 2,
                },
                TxOp::End {
                    handle: ConversationHandle(8),
                    error: None,
                },
                TxOp::End {
                    handle: ConversationHandle(9),
                    error: Some(42),
                },
                TxOp::EndTarget {
                    handle: ConversationHandle(10),
                    initiator: ConversationHandle(11),
                },
                TxOp::Timer {
                    handle: ConversationHandle(12),
                    lo_ms: 1_700_000_000_010,
                    hi_ms: 1_700_000_000_013,
                },
                TxOp::Disable,
                TxOp::Enable,
            ],
        };
        let mut output = line.to_line().into_bytes();
        output.extend_from_slice(b"pending 3 1 5 sen");
        assert_eq!(parse_lines(&output), Ok(vec![line]));
        assert!(
            parse_lines(b"commit 3 1 4\n").is_err(),
            "a line without ops is an error"
        );
        assert!(parse_lines(b"commit 3 1 4 send=12/0/1.2.3\n").is_err());
    }
}
