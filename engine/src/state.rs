//! The committed state: catalog, conversation endpoints, conversation groups and the queue
//! indexes. Messages are not copied here: each queued message holds its body as bytes borrowed
//! from the log (`RecordBytes`), which keep their segment mapped until the message is gone.
//!
//! `apply` is the only way the state changes, for a commit as for a replayed record: the two
//! cannot drift apart. It assumes the ops were validated when the transaction made them (or, on
//! replay, when the original transaction did); an op that no longer fits (a dialog naming a
//! service dropped since) is a corrupt log, reported, never a panic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use herald_wal::{Lsn, Position, RecordBytes};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::ids::{ConversationGroupId, ConversationHandle, ConversationId, IdMap};
use crate::record::Op;

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
    pub service: String,
    pub far_service: String,
    pub contract: String,
    pub group: ConversationGroupId,
    pub state: EndpointState,
    /// Sequence number the next message sent from this side gets.
    pub send_sequence: u64,
    /// Sequence number of the next message this side will receive.
    pub receive_sequence: u64,
    /// The other side's handle when it lives on this broker.
    pub far_handle: Option<ConversationHandle>,
    pub lifetime_secs: u64,
    /// 1..=10; 5 until broker priorities exist.
    pub priority: u8,
}

/// The default conversation priority (Service Broker's).
pub const PRIORITY_DEFAULT: u8 = 5;

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

/// The messages of one conversation waiting in a queue. Sequence numbers are contiguous (a
/// conversation delivers in order, and RECEIVE takes from the front), so the queue is a dense
/// ring: message `first_sequence + i` is at index `i`.
#[derive(Debug, Clone, Default)]
pub struct ConversationQueue {
    first_sequence: u64,
    messages: std::collections::VecDeque<QueuedMessage>,
}

impl ConversationQueue {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// The first message and its sequence number.
    pub fn first(&self) -> Option<(u64, &QueuedMessage)> {
        self.messages.front().map(|m| (self.first_sequence, m))
    }

    pub fn pop_first(&mut self) -> Option<(u64, QueuedMessage)> {
        let message = self.messages.pop_front()?;
        let sequence = self.first_sequence;
        self.first_sequence += 1;
        Some((sequence, message))
    }

    /// Adds message `sequence` at either end; anything else would leave a gap.
    pub fn insert(&mut self, sequence: u64, message: QueuedMessage) -> Result<(), String> {
        if self.messages.is_empty() {
            self.first_sequence = sequence;
            self.messages.push_back(message);
        } else if sequence == self.first_sequence + self.messages.len() as u64 {
            self.messages.push_back(message);
        } else if sequence + 1 == self.first_sequence {
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

    pub fn get_mut(&mut self, sequence: u64) -> Option<&mut QueuedMessage> {
        let index = sequence.checked_sub(self.first_sequence)?;
        self.messages.get_mut(usize::try_from(index).ok()?)
    }

    /// Messages with their sequence numbers, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &QueuedMessage)> {
        (self.first_sequence..).zip(self.messages.iter())
    }

    #[cfg(test)]
    pub(crate) fn clear(&mut self) {
        self.messages.clear();
    }

    #[cfg(test)]
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut QueuedMessage> {
        self.messages.iter_mut()
    }

    /// The sequence numbers of the queued messages, oldest first.
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
    ready_key: Option<u64>,
}

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
    /// Within a conversation messages arrive in sequence order, so each conversation's first
    /// message is its oldest.
    pub fn oldest(&self) -> Option<u64> {
        self.conversations
            .values()
            .filter_map(|m| m.first().map(|(_, q)| q.queuing_order))
            .min()
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
        IdMap<ConversationHandle, BTreeMap<u64, (ConversationGroupId, QueuedMessage)>>,
    /// Per queue, the groups with waiting messages, by the queuing order of their oldest one:
    /// RECEIVE walks this instead of every group.
    ready: HashMap<String, BTreeSet<(u64, ConversationGroupId)>>,
    /// Message type names by `MessageTypeId`, and the reverse: one shared name per type
    /// instead of one per queued message.
    message_type_names: Vec<Arc<str>>,
    message_type_ids: HashMap<String, MessageTypeId>,
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
            return result;
        }
        match op {
            Op::BeginDialog(d) => {
                let from_queue = self.catalog.service(&d.from_service)?.queue.clone();
                self.add_endpoint(
                    Endpoint {
                        handle: d.handle,
                        conversation_id: d.conversation_id,
                        is_initiator: true,
                        service: d.from_service.clone(),
                        far_service: d.to_service.clone(),
                        contract: d.contract.clone(),
                        group: d.group,
                        state: EndpointState::StartedOutbound,
                        send_sequence: 0,
                        receive_sequence: 0,
                        far_handle: d.target.map(|(h, _)| h),
                        lifetime_secs: d.lifetime_secs,
                        priority: PRIORITY_DEFAULT,
                    },
                    from_queue,
                )?;
                if let Some((target_handle, target_group)) = d.target {
                    let to_queue = self.catalog.service(&d.to_service)?.queue.clone();
                    self.add_endpoint(
                        Endpoint {
                            handle: target_handle,
                            conversation_id: d.conversation_id,
                            is_initiator: false,
                            service: d.to_service.clone(),
                            far_service: d.from_service.clone(),
                            contract: d.contract.clone(),
                            group: target_group,
                            state: EndpointState::Conversing,
                            send_sequence: 0,
                            receive_sequence: 0,
                            far_handle: Some(d.handle),
                            lifetime_secs: d.lifetime_secs,
                            priority: PRIORITY_DEFAULT,
                        },
                        to_queue,
                    )?;
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
                let target = sender.far_handle.ok_or_else(|| {
                    corrupt(format!("send on {handle}, whose far side is not local"))
                })?;
                if body_range.end > payload.len() {
                    return Err(corrupt(format!(
                        "send body {body_range:?} outside its record"
                    )));
                }
                let target_group = self
                    .endpoints
                    .get(&target)
                    .ok_or_else(|| corrupt(format!("send to unknown endpoint {target}")))?
                    .group;
                let queuing_order = self.next_queuing_order;
                self.next_queuing_order += 1;
                let message_type = self.message_type_id(message_type);
                let group = self
                    .groups
                    .get_mut(&target_group)
                    .ok_or_else(|| corrupt(format!("endpoint {target} in unknown group")))?;
                let message = QueuedMessage::new(
                    payload.slice(body_range.clone()),
                    BodyLocation {
                        record: position,
                        start: body_range.start as u32,
                        len: body_range.len() as u32,
                    },
                    message_type,
                    queuing_order,
                );
                group
                    .conversations
                    .entry(target)
                    .or_default()
                    .insert(*sequence, message)
                    .map_err(|e| corrupt(format!("send on {handle}: {e}")))?;
                self.refresh_ready(target_group);
                Ok(())
            }
            Op::Receive {
                handle,
                through_sequence,
            } => {
                let endpoint = self
                    .endpoints
                    .get_mut(handle)
                    .ok_or_else(|| corrupt(format!("receive on unknown conversation {handle}")))?;
                endpoint.receive_sequence = endpoint.receive_sequence.max(through_sequence + 1);
                let group = endpoint.group;
                if let Some(messages) = self
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.conversations.get_mut(handle))
                {
                    // Already taken when the receiving transaction commits; removed here on replay.
                    // Received messages are always the conversation's first ones.
                    while messages
                        .first()
                        .is_some_and(|(seq, _)| seq <= *through_sequence)
                    {
                        messages.pop_first();
                    }
                }
                if let Some(taken) = self.taken.get_mut(handle) {
                    while taken
                        .first_key_value()
                        .is_some_and(|(seq, _)| *seq <= *through_sequence)
                    {
                        taken.pop_first();
                    }
                    if taken.is_empty() {
                        self.taken.remove(handle);
                    }
                }
                self.refresh_ready(group);
                Ok(())
            }
            Op::Relocate {
                handle,
                sequence,
                body_range,
                ..
            } => {
                if body_range.end > payload.len() {
                    return Err(corrupt(format!(
                        "relocated body {body_range:?} outside its record"
                    )));
                }
                let location = BodyLocation {
                    record: position,
                    start: body_range.start as u32,
                    len: body_range.len() as u32,
                };
                let body = payload.slice(body_range.clone());
                // The message may have been received since the compaction copied it: nothing
                // to do then.
                let group = self.endpoints.get(handle).map(|e| e.group);
                let queued = group
                    .and_then(|g| self.groups.get_mut(&g))
                    .and_then(|g| g.conversations.get_mut(handle))
                    .and_then(|m| m.get_mut(*sequence));
                let taken = self
                    .taken
                    .get_mut(handle)
                    .and_then(|t| t.get_mut(sequence))
                    .map(|(_, m)| m);
                for message in queued.into_iter().chain(taken) {
                    if message.body.len() != body.len() {
                        return Err(corrupt(format!(
                            "relocated body of {handle} #{sequence} changed length"
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
                let endpoint = self
                    .endpoints
                    .get_mut(handle)
                    .ok_or_else(|| corrupt(format!("move of unknown conversation {handle}")))?;
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
                self.refresh_ready(*group);
                Ok(())
            }
            catalog_op => unreachable!("catalog op {catalog_op:?} was applied above"),
        }
    }

    /// Moves the first message of `handle` in `group` to the taken set (a RECEIVE took it).
    pub(crate) fn take_first(
        &mut self,
        group: ConversationGroupId,
        handle: ConversationHandle,
    ) -> Option<(u64, QueuedMessage)> {
        let (sequence, message) = self
            .groups
            .get_mut(&group)?
            .conversations
            .get_mut(&handle)?
            .pop_first()?;
        self.taken
            .entry(handle)
            .or_default()
            .insert(sequence, (group, message.clone()));
        self.refresh_ready(group);
        Some((sequence, message))
    }

    /// The groups of `queue` with waiting messages, oldest first.
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
        let key = group.oldest();
        if key == group.ready_key {
            return;
        }
        let ready = self.ready.entry(group.queue.clone()).or_default();
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

    /// Puts taken messages of `handle` with the given sequences back into their group (their
    /// RECEIVE rolled back).
    pub(crate) fn return_taken(&mut self, handle: ConversationHandle, sequences: &[u64]) {
        let Some(taken) = self.taken.get_mut(&handle) else {
            return;
        };
        let mut returned = Vec::new();
        for sequence in sequences {
            if let Some((group, message)) = taken.remove(sequence) {
                returned.push((*sequence, group, message));
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
        group.conversations.entry(endpoint.handle).or_default();
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
        Op::BeginDialog(_)
        | Op::Send { .. }
        | Op::Receive { .. }
        | Op::Relocate { .. }
        | Op::MoveConversation { .. } => {
            return None;
        }
    })
}
