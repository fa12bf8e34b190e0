//! Checkpoints: the state as of one LSN (catalog, endpoints, groups, queued messages with the
//! log locations of their bodies — never the bodies), so that recovery replays only the log
//! after it, and so that log segments older than it, holding no live body, can be released.
//!
//! File `<dir>/CHECKPOINT`, replaced atomically: written to `CHECKPOINT.tmp`, synced, renamed,
//! directory synced. Layout (little-endian):
//! `magic "HRLDCKPT" | version u32 (`VERSION`) | lsn u64 | body_len u64 | body | crc32 u32` where the
//! CRC covers everything before it. The body: the catalog as a commit-record payload of create
//! ops (`record` codec), then `next_queuing_order u64`, the endpoints, and the groups with their
//! queued messages. Decoding checks every length and tag and never panics.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use herald_wal::{Lsn, Position, RecordBytes, Wal};

use crate::catalog::DEFAULT;
use crate::codec::{Reader, put_str, put_u64, put_u128};
use crate::error::{Error, Result};
use crate::ids::{BrokerInstanceId, ConversationGroupId, ConversationHandle, ConversationId};
use crate::record::put_key;
use crate::record::{self, Op};
use crate::state::{
    BodyLocation, DeadlineKind, Endpoint, EndpointState, Group, MessageKey, MessageStatus,
    QueuedMessage, RetainedMessage, State, Transmission, apply_catalog_op,
};

pub const CHECKPOINT_FILE: &str = "CHECKPOINT";
const CHECKPOINT_TMP_FILE: &str = "CHECKPOINT.tmp";
const MAGIC: &[u8; 8] = b"HRLDCKPT";
const VERSION: u32 = 5;
/// Versions this build reads: 4 differs only in never marking a dialog established (tag 2 of
/// an endpoint's far broker): its target sides are taken as established, its initiators not.
const VERSIONS_READ: std::ops::RangeInclusive<u32> = 4..=VERSION;

/// What a checkpoint captured, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub lsn: Lsn,
    pub bytes: u64,
    /// First LSN of the oldest log segment still holding a queued message's body.
    pub oldest_body_segment: Option<Lsn>,
}

/// Serializes `state` (which must be exactly the log through `state.applied_through`).
pub fn encode(state: &State) -> (Vec<u8>, Option<Lsn>) {
    let mut body = Vec::new();
    let catalog_ops = catalog_ops(state);
    let catalog = record::encode(&catalog_ops);
    put_u64(&mut body, catalog.len() as u64);
    body.extend_from_slice(&catalog);
    put_u64(&mut body, state.next_queuing_order);
    put_u64(&mut body, state.endpoints.len() as u64);
    for e in state.endpoints.values() {
        put_u128(&mut body, e.handle.0);
        put_u128(&mut body, e.conversation_id.0);
        body.push(e.is_initiator as u8);
        put_str(&mut body, &e.service);
        put_str(&mut body, &e.far_service);
        put_str(&mut body, &e.contract);
        put_u128(&mut body, e.group.0);
        body.push(state_code(e.state));
        put_u64(&mut body, e.send_sequence);
        put_u64(&mut body, e.receive_sequence);
        match e.far_handle {
            None => body.push(0),
            Some(h) => {
                body.push(1);
                put_u128(&mut body, h.0);
            }
        }
        // 0: no far broker known; 1: known, dialog not established; 2: known and established
        // (version 5; version 4 wrote only 0 and 1).
        match e.far_broker_instance {
            None => body.push(0),
            Some(id) => {
                body.push(1 + e.established as u8);
                put_u128(&mut body, id.0);
            }
        }
        put_u64(&mut body, e.arrived_sequence);
        put_u64(&mut body, e.expires_at_ms.unwrap_or(0));
        put_u64(&mut body, e.dialog_timer_ms.unwrap_or(0));
        body.push(e.priority);
    }
    let mut oldest: Option<Lsn> = None;
    put_u64(&mut body, state.groups.len() as u64);
    for (id, group) in &state.groups {
        put_u128(&mut body, id.0);
        put_str(&mut body, &group.queue);
        put_u64(&mut body, group.conversations.len() as u64);
        for (handle, queued) in &group.conversations {
            // Messages taken by a RECEIVE that has not committed are still queued as far as the
            // log is concerned: they come back if that transaction rolls back or dies.
            let taken = state
                .taken
                .get(handle)
                .into_iter()
                .flat_map(|t| t.iter())
                .filter(|(_, (g, _))| g == id)
                .map(|(key, (_, m))| (*key, m));
            let mut messages: Vec<(MessageKey, &QueuedMessage)> =
                queued.iter().chain(taken).collect();
            messages.sort_unstable_by_key(|(key, _)| *key);
            // Retained messages last, each with its status and sequence after its key.
            let retained = queued.retained().iter().map(|r| {
                (
                    MessageKey::Retained {
                        queuing_order: r.message.queuing_order,
                    },
                    &r.message,
                )
            });
            messages.extend(retained);
            let mut retained_extras = queued.retained().iter();
            put_u128(&mut body, handle.0);
            put_u64(&mut body, messages.len() as u64);
            for (key, m) in messages {
                let location = m.location();
                put_key(&mut body, key);
                if let MessageKey::Retained { .. } = key
                    && let Some(r) = retained_extras.next()
                {
                    body.push(r.status as u8);
                    put_u64(&mut body, r.sequence);
                }
                put_str(&mut body, state.message_type_name(m.message_type));
                put_u64(&mut body, m.queuing_order);
                put_u64(&mut body, location.record.segment.0);
                body.extend_from_slice(&location.record.offset.to_le_bytes());
                body.extend_from_slice(&location.start.to_le_bytes());
                body.extend_from_slice(&location.len.to_le_bytes());
                let segment = location.record.segment;
                oldest = Some(oldest.map_or(segment, |o| o.min(segment)));
            }
        }
    }
    put_u64(&mut body, state.transmission.len() as u64);
    for (id, t) in &state.transmission {
        let location = t.message.location();
        put_u64(&mut body, *id);
        put_u128(&mut body, t.handle.0);
        put_u64(&mut body, t.sequence);
        put_str(&mut body, state.message_type_name(t.message.message_type));
        put_location(&mut body, location);
        let segment = location.record.segment;
        oldest = Some(oldest.map_or(segment, |o| o.min(segment)));
    }
    let closed: Vec<_> = state
        .closed
        .iter()
        .filter(|(_, until)| **until > state.now_ms)
        .collect();
    put_u64(&mut body, closed.len() as u64);
    for ((conversation, is_initiator), until) in closed {
        put_u128(&mut body, conversation.0);
        body.push(*is_initiator as u8);
        put_u64(&mut body, *until);
    }
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    put_u64(&mut out, state.applied_through.0);
    put_u64(&mut out, body.len() as u64);
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    (out, oldest)
}

fn read_location(r: &mut Reader<'_>) -> std::result::Result<BodyLocation, String> {
    Ok(BodyLocation {
        record: Position {
            segment: Lsn(r.u64()?),
            offset: r.u32()?,
        },
        start: r.u32()?,
        len: r.u32()?,
    })
}

fn put_location(out: &mut Vec<u8>, location: BodyLocation) {
    put_u64(out, location.record.segment.0);
    out.extend_from_slice(&location.record.offset.to_le_bytes());
    out.extend_from_slice(&location.start.to_le_bytes());
    out.extend_from_slice(&location.len.to_le_bytes());
}

/// Queued bodies (taken ones included) per log segment: segment first LSN → (count, bytes).
pub fn live_bodies_by_segment(state: &State) -> std::collections::BTreeMap<Lsn, (u64, u64)> {
    let mut live = std::collections::BTreeMap::new();
    for message in all_messages(state) {
        let entry = live
            .entry(message.location().record.segment)
            .or_insert((0u64, 0u64));
        entry.0 += 1;
        entry.1 += message.body.len() as u64;
    }
    live
}

/// Relocate ops copying every queued body (taken ones included) that lives in `segment`.
pub fn relocations_from_segment(state: &State, segment: Lsn) -> Vec<Op> {
    let queued = state.groups.values().flat_map(|g| {
        g.conversations.iter().flat_map(|(handle, messages)| {
            messages
                .iter_with_retained()
                .map(move |(key, m)| (*handle, key, m))
        })
    });
    let taken = state
        .taken
        .iter()
        .flat_map(|(handle, t)| t.iter().map(move |(key, (_, m))| (*handle, *key, m)));
    let outbound = state
        .transmission
        .iter()
        .map(|(id, t)| (t.handle, MessageKey::Outbound { id: *id }, &t.message));
    queued
        .chain(taken)
        .chain(outbound)
        .filter(|(_, _, m)| m.location().record.segment == segment)
        .map(|(handle, key, m)| Op::Relocate {
            handle,
            key,
            body: m.body.to_vec(),
            body_range: 0..0,
        })
        .collect()
}

fn all_messages(state: &State) -> impl Iterator<Item = &QueuedMessage> {
    let queued = state.groups.values().flat_map(|g| {
        g.conversations.values().flat_map(|m| {
            m.iter()
                .map(|(_, m)| m)
                .chain(m.retained().iter().map(|r| &r.message))
        })
    });
    let taken = state
        .taken
        .values()
        .flat_map(|t| t.values().map(|(_, m)| m));
    let outbound = state.transmission.values().map(|t| &t.message);
    queued.chain(taken).chain(outbound)
}

/// The catalog as create ops, in an order that replays (types, contracts, queues, services).
fn catalog_ops(state: &State) -> Vec<Op> {
    let c = &state.catalog;
    let mut ops = Vec::new();
    for t in c.message_types.values().filter(|t| t.name != DEFAULT) {
        ops.push(Op::CreateMessageType {
            name: t.name.clone(),
            validation: t.validation,
        });
    }
    for k in c.contracts.values().filter(|k| k.name != DEFAULT) {
        ops.push(Op::CreateContract {
            name: k.name.clone(),
            messages: k.messages.iter().map(|(t, s)| (t.clone(), *s)).collect(),
        });
    }
    for q in c.queues.values() {
        ops.push(Op::CreateQueue {
            name: q.name.clone(),
            options: q.options,
        });
    }
    for s in c.services.values() {
        ops.push(Op::CreateService {
            name: s.name.clone(),
            queue: s.queue.clone(),
            contracts: s.contracts.iter().cloned().collect(),
        });
    }
    for p in c.priorities.values() {
        ops.push(Op::CreateBrokerPriority(p.clone()));
    }
    for r in c.routes.values() {
        ops.push(Op::CreateRoute(r.clone()));
    }
    ops
}

/// Writes `bytes` as the checkpoint of `dir`, atomically and durably.
pub fn write(dir: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &str, e| Error::Io {
        context: format!("{what} checkpoint in {}", dir.display()),
        source: e,
    };
    let tmp = dir.join(CHECKPOINT_TMP_FILE);
    let mut file = File::create(&tmp).map_err(|e| io("creating", e))?;
    file.write_all(bytes).map_err(|e| io("writing", e))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE)).map_err(|e| io("renaming", e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the directory after", e))
}

/// A decoded checkpoint, bodies not yet attached.
#[derive(Debug)]
pub struct Image {
    pub lsn: Lsn,
    catalog_ops: Vec<Op>,
    next_queuing_order: u64,
    endpoints: Vec<Endpoint>,
    groups: Vec<(ConversationGroupId, String, Vec<ConversationMessages>)>,
    /// The transmission queue: (id, sending endpoint, sequence, message type, body location).
    transmission: Vec<(u64, ConversationHandle, u64, String, BodyLocation)>,
    closed: Vec<((ConversationId, bool), u64)>,
}

type ConversationMessages = (ConversationHandle, Vec<StoredMessage>);

#[derive(Debug)]
struct StoredMessage {
    key: MessageKey,
    /// For a retained message: its status and sequence.
    retained: Option<(MessageStatus, u64)>,
    message_type: String,
    queuing_order: u64,
    location: BodyLocation,
}

/// Reads the checkpoint of `dir`, if there is one.
pub fn read(dir: &Path) -> Result<Option<Image>> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Io {
                context: format!("reading {}", path.display()),
                source: e,
            });
        }
    };
    decode(&bytes)
        .map(Some)
        .map_err(|reason| Error::Corruption(format!("{}: {reason}", path.display())))
}

/// Decodes a checkpoint file's bytes.
pub fn decode(bytes: &[u8]) -> std::result::Result<Image, String> {
    if bytes.len() < 8 + 4 + 8 + 8 + 4 {
        return Err(format!("{} bytes, too short for a checkpoint", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("wrong magic (not a Herald checkpoint)".into());
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(content) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader::new(content, 8);
    let version = r.u32()?;
    if !VERSIONS_READ.contains(&version) {
        return Err(format!(
            "version {version}; this build reads {} to {}",
            VERSIONS_READ.start(),
            VERSIONS_READ.end()
        ));
    }
    let lsn = Lsn(r.u64()?);
    let body_len = r.u64()?;
    if body_len != r.remaining() as u64 {
        return Err("body length disagrees with the file size".into());
    }
    let catalog_len = r.len()?;
    let catalog_ops = record::decode(r.take(catalog_len)?).map_err(|e| format!("catalog: {e}"))?;
    let next_queuing_order = r.u64()?;
    let endpoint_count = r.count(16)?;
    let mut endpoints = Vec::with_capacity(endpoint_count);
    for _ in 0..endpoint_count {
        let handle = ConversationHandle(r.u128()?);
        let conversation_id = ConversationId(r.u128()?);
        let is_initiator = r.flag()?;
        let service = r.string()?.into();
        let far_service = r.string()?.into();
        let contract = r.string()?.into();
        let group = ConversationGroupId(r.u128()?);
        let state = endpoint_state(r.u8()?)?;
        let send_sequence = r.u64()?;
        let receive_sequence = r.u64()?;
        let far_handle = if r.flag()? {
            Some(ConversationHandle(r.u128()?))
        } else {
            None
        };
        let (far_broker_instance, established) = match r.u8()? {
            0 => (None, false),
            // Version 4 did not say; a target side (made by its initiator's first message) is
            // established by its nature, an initiator as if never acknowledged (it routes as
            // that version did).
            1 => (
                Some(BrokerInstanceId(r.u128()?)),
                version == 4 && !is_initiator,
            ),
            2 if version >= 5 => (Some(BrokerInstanceId(r.u128()?)), true),
            other => return Err(format!("bad far broker tag {other} (version {version})")),
        };
        endpoints.push(Endpoint {
            handle,
            conversation_id,
            is_initiator,
            service,
            far_service,
            contract,
            group,
            state,
            send_sequence,
            receive_sequence,
            far_handle,
            far_broker_instance,
            established,
            arrived_sequence: r.u64()?,
            expires_at_ms: Some(r.u64()?).filter(|ms| *ms != 0),
            dialog_timer_ms: Some(r.u64()?).filter(|ms| *ms != 0),
            priority: r.u8()?,
        });
    }
    let group_count = r.count(16)?;
    let mut groups = Vec::with_capacity(group_count);
    for _ in 0..group_count {
        let id = ConversationGroupId(r.u128()?);
        let queue = r.string()?;
        let conversation_count = r.count(16)?;
        let mut conversations = Vec::with_capacity(conversation_count);
        for _ in 0..conversation_count {
            let handle = ConversationHandle(r.u128()?);
            let message_count = r.count(32)?;
            let mut messages = Vec::with_capacity(message_count);
            for _ in 0..message_count {
                let key = r.key().map_err(|e| e.0)?;
                let retained = match key {
                    MessageKey::Retained { .. } => {
                        let status = match r.u8()? {
                            0 => MessageStatus::Received,
                            3 => MessageStatus::SentCopy,
                            other => return Err(format!("unknown retained status {other}")),
                        };
                        Some((status, r.u64()?))
                    }
                    _ => None,
                };
                messages.push(StoredMessage {
                    key,
                    retained,
                    message_type: r.string()?,
                    queuing_order: r.u64()?,
                    location: BodyLocation {
                        record: Position {
                            segment: Lsn(r.u64()?),
                            offset: r.u32()?,
                        },
                        start: r.u32()?,
                        len: r.u32()?,
                    },
                });
            }
            conversations.push((handle, messages));
        }
        groups.push((id, queue, conversations));
    }
    // Each row takes at least: id, handle, sequence, a type name's length, a body location.
    let transmission_count = r.count(8 + 16 + 8 + 2 + 20)?;
    let mut transmission = Vec::with_capacity(transmission_count);
    for _ in 0..transmission_count {
        transmission.push((
            r.u64()?,
            ConversationHandle(r.u128()?),
            r.u64()?,
            r.string()?,
            read_location(&mut r)?,
        ));
    }
    let closed_count = r.count(16 + 1 + 8)?;
    let mut closed = Vec::with_capacity(closed_count);
    for _ in 0..closed_count {
        closed.push(((ConversationId(r.u128()?), r.flag()?), r.u64()?));
    }
    if r.remaining() != 0 {
        return Err(format!("{} trailing bytes", r.remaining()));
    }
    Ok(Image {
        lsn,
        catalog_ops,
        next_queuing_order,
        endpoints,
        groups,
        transmission,
        closed,
    })
}

impl Image {
    /// Builds the state, reading each queued message's body from the log (each commit record
    /// once, its checksum checked).
    pub fn into_state(self, wal: &Wal) -> Result<State> {
        let mut state = State::default();
        for op in &self.catalog_ops {
            match apply_catalog_op(&mut state.catalog, op) {
                Some(result) => result?,
                None => {
                    return Err(Error::Corruption(
                        "checkpoint catalog holds a non-catalog op".into(),
                    ));
                }
            }
        }
        state.next_queuing_order = self.next_queuing_order;
        state.applied_through = self.lsn;
        for endpoint in self.endpoints {
            let handle = endpoint.handle;
            for (deadline, kind) in [
                (endpoint.expires_at_ms, DeadlineKind::Lifetime),
                (endpoint.dialog_timer_ms, DeadlineKind::DialogTimer),
            ] {
                if let Some(deadline) = deadline {
                    state.deadlines.insert((deadline, handle, kind));
                }
            }
            state
                .by_conversation
                .insert((endpoint.conversation_id, endpoint.is_initiator), handle);
            state.endpoints.insert(handle, endpoint);
        }
        let mut records: HashMap<Position, RecordBytes> = HashMap::new();
        // Each commit record is read (and its checksum checked) once, however many bodies it
        // holds.
        let mut body_at = |location: BodyLocation| -> Result<RecordBytes> {
            let payload = match records.get(&location.record) {
                Some(payload) => payload.clone(),
                None => {
                    let payload = wal.read(location.record)?.payload;
                    records.insert(location.record, payload.clone());
                    payload
                }
            };
            let start = location.start as usize;
            let end = start + location.len as usize;
            if end > payload.len() {
                return Err(Error::Corruption(format!(
                    "checkpoint body {start}..{end} outside record {}",
                    location.record
                )));
            }
            Ok(payload.slice(start..end))
        };
        for (id, queue, conversations) in self.groups {
            let mut group = Group::new(queue);
            for (handle, messages) in conversations {
                let queued = group.conversations.entry(handle).or_default();
                if let Some(endpoint) = state.endpoints.get(&handle) {
                    queued.priority = endpoint.priority;
                }
                for m in messages {
                    let body = body_at(m.location)?;
                    let message_type = state.message_type_id(&m.message_type);
                    let message =
                        QueuedMessage::new(body, m.location, message_type, m.queuing_order);
                    if let Some((status, sequence)) = m.retained {
                        queued.retain(RetainedMessage {
                            status,
                            sequence,
                            message,
                        });
                        continue;
                    }
                    queued.insert(m.key, message).map_err(|e| {
                        Error::Corruption(format!("checkpoint queue {handle}: {e}"))
                    })?;
                }
            }
            state.groups.insert(id, group);
            state.refresh_ready(id);
        }
        for (id, handle, sequence, message_type, location) in self.transmission {
            let body = body_at(location)?;
            let message_type = state.message_type_id(&message_type);
            state.transmission.insert(
                id,
                Transmission {
                    handle,
                    sequence,
                    message: QueuedMessage::new(body, location, message_type, id),
                },
            );
        }
        let mut order: Vec<(u64, (ConversationId, bool))> = self
            .closed
            .iter()
            .map(|(key, until)| (*until, *key))
            .collect();
        order.sort_unstable();
        state.closed_order = order.into();
        state.closed = self.closed.into_iter().collect();
        Ok(state)
    }
}

fn state_code(s: EndpointState) -> u8 {
    match s {
        EndpointState::StartedOutbound => 0,
        EndpointState::StartedInbound => 1,
        EndpointState::Conversing => 2,
        EndpointState::DisconnectedInbound => 3,
        EndpointState::DisconnectedOutbound => 4,
        EndpointState::Error => 5,
        EndpointState::Closed => 6,
    }
}

fn endpoint_state(code: u8) -> std::result::Result<EndpointState, String> {
    Ok(match code {
        0 => EndpointState::StartedOutbound,
        1 => EndpointState::StartedInbound,
        2 => EndpointState::Conversing,
        3 => EndpointState::DisconnectedInbound,
        4 => EndpointState::DisconnectedOutbound,
        5 => EndpointState::Error,
        6 => EndpointState::Closed,
        other => return Err(format!("unknown endpoint state {other}")),
    })
}

/// Fuzzing entry point: decoding arbitrary bytes never panics.
#[doc(hidden)]
pub fn fuzz_decode(data: &[u8]) {
    let _ = decode(data);
}
