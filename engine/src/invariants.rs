//! The engine's invariants (`../shared/DESIGN.md`, "Engine"), checked from outside any
//! operation: tests and fuzz targets call `check` after every step, and `check_idle` whenever
//! no transaction is open. Both only read; neither may run while another thread is inside an
//! operation (they take the lock table and the state one after the other, not atomically, and
//! expect every logged record to be applied).
//!
//! What the broker's state lets us check:
//! - **The catalog is closed under its references**: every contract's message types exist and
//!   one of them may be sent by the initiator; every service's queue and contracts exist; the
//!   built-in `DEFAULT` type and contract are there.
//! - **Endpoints, groups and queues agree**: every endpoint's group exists, lists the endpoint,
//!   and is on the queue of the endpoint's service; every group's queue exists and every
//!   conversation a group lists is an endpoint of that group; both local endpoints of a
//!   conversation point at each other, share its id and contract, and one is the initiator.
//! - **Sequence numbers are gap-free and strictly increasing**: for each endpoint, the messages
//!   taken by open RECEIVEs followed by the queued ones are keyed by their own sequence, run
//!   without a gap from the endpoint's receive sequence to the far side's send sequence, and
//!   arrived in sequence order.
//! - **A received-but-uncommitted message is invisible to other receivers**: a RECEIVE moves
//!   what it takes out of the queue into `State::taken`, always a prefix of the conversation;
//!   a conversation with taken messages is in a group some transaction holds (the lock table
//!   keeps one owner per group by construction), so no other receiver can reach them. With no
//!   transaction open, nothing is taken and nothing is locked.
//! - **The ready index matches the queues**: per queue, exactly the groups with queued messages,
//!   by the arrival of their oldest one (RECEIVE without a target walks it).
//! - **Every live body is in the log**: each queued or taken message's body location names a
//!   record the log still holds (not released), applied already, whose bytes at that place are
//!   the body — what checkpoints and recovery rely on. Queuing orders are unique and below the
//!   next one to hand out.
//! - **Every queued message is one its conversation allows**: its type is in the contract,
//!   sendable by the far side, and its body passes the type's validation.
//! - **The state is the log's prefix**: every logged record is applied, and no apply failed.
//!
//! Not checkable here: which transaction owns a lock on a group that no committed dialog has
//! created yet (the broker keeps no registry of open transactions).

use std::collections::{BTreeMap, HashMap};

use herald_wal::{Lsn, Position};

use crate::broker::Broker;
use crate::catalog::{DEFAULT, Validation};
use crate::ids::{ConversationGroupId, ConversationHandle, ConversationId};
use crate::lock_table::TxId;
use crate::state::{EndpointState, MessageKey, QueuedMessage, State, UrgentLane};
use crate::system;

/// Violations reported at most, so a broken state does not produce a wall of text.
const VIOLATIONS_REPORTED_MAX: usize = 20;

/// Checks the invariants that hold between any two operations, open transactions included.
/// The error lists the violations found.
pub fn check(broker: &Broker) -> Result<(), String> {
    run(broker, false)
}

/// Checks `check`'s invariants and, because no transaction is open, also that no lock is held
/// and no message is taken.
pub fn check_idle(broker: &Broker) -> Result<(), String> {
    run(broker, true)
}

fn run(broker: &Broker, idle: bool) -> Result<(), String> {
    // Snapshots taken one after the other: the lock table's mutex is never held with the state's.
    let group_locks: HashMap<ConversationGroupId, TxId> =
        broker.locks.owners().into_iter().collect();
    let (catalog_readers, catalog_writer) = broker.catalog_lock.holders();
    // The checkpoint thread commits too (compaction's relocations): hold it off, so that no
    // commit is half done while the state is compared with the log.
    let _no_checkpoint = broker.checkpointing.lock();
    let state = broker.state.lock();
    let mut checker = Checker {
        violations: Vec::new(),
    };
    checker.locks(&group_locks, &catalog_readers, catalog_writer, idle);
    checker.applied(broker, &state);
    checker.catalog(&state);
    checker.groups(&state);
    checker.endpoints(&state, &group_locks, idle);
    checker.ready_index(&state);
    checker.transmission(&state);
    checker.bodies(broker, &state);
    drop(state);
    if checker.violations.is_empty() {
        return Ok(());
    }
    let total = checker.violations.len();
    let mut report = checker.violations;
    report.truncate(VIOLATIONS_REPORTED_MAX);
    if total > VIOLATIONS_REPORTED_MAX {
        report.push(format!("… and {} more", total - VIOLATIONS_REPORTED_MAX));
    }
    Err(format!(
        "{total} invariant violation(s):\n  {}",
        report.join("\n  ")
    ))
}

/// Every message of the state, queued or taken by an open RECEIVE, with its conversation.
fn all_messages(
    state: &State,
) -> impl Iterator<Item = (ConversationHandle, MessageKey, &QueuedMessage)> {
    let queued = state.groups.values().flat_map(|g| {
        g.conversations.iter().flat_map(|(handle, queued)| {
            queued
                .iter_with_retained()
                .map(move |(key, m)| (*handle, key, m))
        })
    });
    let taken = state
        .taken
        .iter()
        .flat_map(|(handle, taken)| taken.iter().map(move |(seq, (_, m))| (*handle, *seq, m)));
    let outbound = state
        .transmission
        .iter()
        .map(|(id, t)| (t.handle, MessageKey::Outbound { id: *id }, &t.message));
    queued.chain(taken).chain(outbound)
}

struct Checker {
    violations: Vec<String>,
}

impl Checker {
    fn fail(&mut self, violation: String) {
        self.violations.push(violation);
    }

    fn locks(
        &mut self,
        group_locks: &HashMap<ConversationGroupId, TxId>,
        catalog_readers: &[TxId],
        catalog_writer: Option<TxId>,
        idle: bool,
    ) {
        if let Some(writer) = catalog_writer
            && let Some(reader) = catalog_readers.iter().find(|r| **r != writer)
        {
            self.fail(format!(
                "catalog held exclusive by transaction {writer} and shared by transaction {reader}"
            ));
        }
        if !idle {
            return;
        }
        let mut locked: Vec<_> = group_locks.iter().collect();
        locked.sort();
        for (group, tx) in locked {
            self.fail(format!(
                "no transaction is open, yet group {group} is locked by transaction {tx}"
            ));
        }
        if !catalog_readers.is_empty() || catalog_writer.is_some() {
            self.fail(format!(
                "no transaction is open, yet the catalog is held (shared by {catalog_readers:?}, \
                 exclusive by {catalog_writer:?})"
            ));
        }
    }

    fn catalog(&mut self, state: &State) {
        let catalog = &state.catalog;
        match catalog.message_types.get(DEFAULT) {
            Some(t) if t.validation == Validation::None => {}
            other => self.fail(format!("built-in message type DEFAULT is {other:?}")),
        }
        if !catalog.contracts.contains_key(DEFAULT) {
            self.fail("built-in contract DEFAULT is missing".into());
        }
        for (name, message_type) in &catalog.message_types {
            if *name != message_type.name {
                self.fail(format!(
                    "message type {:?} is filed under {name:?}",
                    message_type.name
                ));
            }
        }
        for (name, contract) in &catalog.contracts {
            if *name != contract.name {
                self.fail(format!(
                    "contract {:?} is filed under {name:?}",
                    contract.name
                ));
            }
            for message_type in contract.messages.keys() {
                if !catalog.message_types.contains_key(message_type) {
                    self.fail(format!(
                        "contract {name:?} lists message type {message_type:?}, which does not exist"
                    ));
                }
            }
            if !contract.messages.values().any(|s| s.allows(true)) {
                self.fail(format!(
                    "contract {name:?} has no message type the initiator may send"
                ));
            }
        }
        for (name, queue) in &catalog.queues {
            if *name != queue.name {
                self.fail(format!("queue {:?} is filed under {name:?}", queue.name));
            }
        }
        for (name, service) in &catalog.services {
            if *name != service.name {
                self.fail(format!(
                    "service {:?} is filed under {name:?}",
                    service.name
                ));
            }
            if !catalog.queues.contains_key(&service.queue) {
                self.fail(format!(
                    "service {name:?} is on queue {:?}, which does not exist",
                    service.queue
                ));
            }
            for contract in &service.contracts {
                if !catalog.contracts.contains_key(contract) {
                    self.fail(format!(
                        "service {name:?} accepts contract {contract:?}, which does not exist"
                    ));
                }
            }
        }
    }

    fn groups(&mut self, state: &State) {
        for (id, group) in &state.groups {
            if !state.catalog.queues.contains_key(&group.queue) {
                self.fail(format!(
                    "group {id} is on queue {:?}, which does not exist",
                    group.queue
                ));
            }
            for handle in group.conversations.keys() {
                match state.endpoints.get(handle) {
                    None => self.fail(format!(
                        "group {id} lists conversation {handle}, which does not exist"
                    )),
                    Some(endpoint) if endpoint.group != *id => self.fail(format!(
                        "group {id} lists conversation {handle}, which belongs to group {}",
                        endpoint.group
                    )),
                    Some(_) => {}
                }
            }
        }
    }

    fn applied(&mut self, broker: &Broker, state: &State) {
        if let Some(reason) = &state.broken {
            self.fail(format!("the state is broken: {reason}"));
        }
        let logged_through = Lsn(broker.wal.next_lsn().0 - 1);
        if state.applied_through != logged_through {
            self.fail(format!(
                "the log holds records through LSN {logged_through}, the state is applied \
                 through {}",
                state.applied_through
            ));
        }
    }

    fn endpoints(
        &mut self,
        state: &State,
        group_locks: &HashMap<ConversationGroupId, TxId>,
        idle: bool,
    ) {
        let catalog = &state.catalog;
        let mut sides: HashMap<ConversationId, usize> = HashMap::new();
        for handle in state.taken.keys() {
            if !state.endpoints.contains_key(handle) {
                self.fail(format!(
                    "messages of conversation {handle}, which does not exist, are taken"
                ));
            }
        }
        for (handle, endpoint) in &state.endpoints {
            let side = if endpoint.is_initiator {
                "initiator"
            } else {
                "target"
            };
            if *handle != endpoint.handle {
                self.fail(format!(
                    "endpoint {} is filed under {handle}",
                    endpoint.handle
                ));
            }
            *sides.entry(endpoint.conversation_id).or_default() += 1;
            if !(1..=10).contains(&endpoint.priority) {
                self.fail(format!(
                    "conversation {handle} has priority {}, outside 1..=10",
                    endpoint.priority
                ));
            }
            if endpoint.state == EndpointState::StartedOutbound
                && (!endpoint.is_initiator || endpoint.send_sequence != 0)
            {
                self.fail(format!(
                    "conversation {handle} ({side}) is SO after sending {} messages",
                    endpoint.send_sequence
                ));
            }
            let contract = catalog.contracts.get(&*endpoint.contract);
            if contract.is_none() {
                self.fail(format!(
                    "conversation {handle} is on contract {:?}, which does not exist",
                    endpoint.contract
                ));
            }
            let service_queue = match catalog.services.get(&*endpoint.service) {
                Some(service) => Some(service.queue.as_str()),
                None => {
                    self.fail(format!(
                        "conversation {handle} belongs to service {:?}, which does not exist",
                        endpoint.service
                    ));
                    None
                }
            };
            let Some(group) = state.groups.get(&endpoint.group) else {
                self.fail(format!(
                    "conversation {handle} is in group {}, which does not exist",
                    endpoint.group
                ));
                continue;
            };
            if let Some(queue) = service_queue
                && group.queue != queue
            {
                self.fail(format!(
                    "conversation {handle} of service {:?} (queue {queue:?}) is in group {} on \
                     queue {:?}",
                    endpoint.service, endpoint.group, group.queue
                ));
            }
            let Some(queued) = group.conversations.get(handle) else {
                self.fail(format!(
                    "group {} does not list its conversation {handle}",
                    endpoint.group
                ));
                continue;
            };

            // Taken messages (a prefix), then queued ones: keyed by their own sequence,
            // contiguous, in arrival order, each one its contract allows.
            let empty = BTreeMap::new();
            let taken = state.taken.get(handle).unwrap_or(&empty);
            for (sequence, (taken_from, _)) in taken {
                if *taken_from != endpoint.group {
                    self.fail(format!(
                        "conversation {handle}: message {sequence} was taken from group \
                         {taken_from}, the conversation is in group {}",
                        endpoint.group
                    ));
                }
            }
            let last_taken_sequence = taken.keys().rev().find_map(|key| match key {
                MessageKey::Sequence(sequence) => Some(*sequence),
                MessageKey::Urgent { .. }
                | MessageKey::Retained { .. }
                | MessageKey::Outbound { .. } => None,
            });
            if let (Some(last_taken), Some(first_queued)) =
                (last_taken_sequence, queued.sequences().next())
                && last_taken >= first_queued
            {
                self.fail(format!(
                    "conversation {handle}: message {last_taken} is taken while message \
                     {first_queued} is still queued"
                ));
            }
            if !taken.is_empty() {
                if idle {
                    self.fail(format!(
                        "conversation {handle}: {} message(s) are taken, yet no transaction is \
                         open",
                        taken.len()
                    ));
                } else if !group_locks.contains_key(&endpoint.group) {
                    self.fail(format!(
                        "conversation {handle}: {} message(s) are taken by a RECEIVE, yet group {} \
                         is not locked",
                        taken.len(),
                        endpoint.group
                    ));
                }
            }
            if endpoint.state.is_ended() && !queued.is_empty() {
                self.fail(format!(
                    "conversation {handle} ended, yet {} message(s) wait for it",
                    queued.len()
                ));
            }
            let pending = taken
                .iter()
                .map(|(key, (_, message))| (*key, message))
                .chain(queued.iter());
            let mut previous: Option<(u64, u64)> = None;
            let mut first = None;
            let mut last = None;
            for (key, message) in pending {
                let type_name = state.message_type_name(message.message_type);
                let sequence = match key {
                    MessageKey::Urgent {
                        lane,
                        queuing_order,
                    } => {
                        let expected = match lane {
                            UrgentLane::DialogTimer => system::DIALOG_TIMER,
                            UrgentLane::Error => system::ERROR,
                        };
                        if **type_name != *expected || queuing_order != message.queuing_order {
                            self.fail(format!(
                                "conversation {handle}: urgent message {key} has type \
                                 {type_name:?} and queuing order {}",
                                message.queuing_order
                            ));
                        }
                        continue;
                    }
                    MessageKey::Sequence(sequence) => sequence,
                    MessageKey::Retained { .. } | MessageKey::Outbound { .. } => {
                        self.fail(format!(
                            "conversation {handle}: message {key} waits to be received"
                        ));
                        continue;
                    }
                };
                first.get_or_insert(sequence);
                last = Some(sequence);
                if let Some((before, before_order)) = previous {
                    if sequence != before + 1 {
                        self.fail(format!(
                            "conversation {handle}: messages {before} and {sequence} wait with \
                             nothing between them"
                        ));
                    }
                    if message.queuing_order <= before_order {
                        self.fail(format!(
                            "conversation {handle}: message {sequence} arrived (order {}) before \
                             message {before} (order {before_order})",
                            message.queuing_order
                        ));
                    }
                }
                previous = Some((sequence, message.queuing_order));
                if **type_name == *system::END_DIALOG {
                    if !message.body.is_empty() {
                        self.fail(format!(
                            "conversation {handle}: EndDialog {sequence} has a body"
                        ));
                    }
                    continue;
                }
                if system::is_system_message_type(type_name) {
                    self.fail(format!(
                        "conversation {handle}: system message {type_name:?} is sequenced ({sequence})"
                    ));
                    continue;
                }
                let sent_by_far = contract
                    .and_then(|c| c.messages.get(&**type_name))
                    .is_some_and(|sent_by| sent_by.allows(!endpoint.is_initiator));
                if contract.is_some() && !sent_by_far {
                    self.fail(format!(
                        "conversation {handle}: message {sequence} of type {:?} may not come \
                         from the far side on contract {:?}",
                        type_name, endpoint.contract
                    ));
                }
                match catalog.message_types.get(&**type_name) {
                    None => self.fail(format!(
                        "conversation {handle}: message {sequence} has type {type_name:?}, which \
                         does not exist"
                    )),
                    Some(t) => {
                        if let Err(e) = t.validation.check(&t.name, &message.body) {
                            self.fail(format!("conversation {handle}: message {sequence}: {e}"));
                        }
                    }
                }
            }
            if let Some(first) = first
                && first < endpoint.receive_sequence
            {
                self.fail(format!(
                    "conversation {handle}: message {first} still waits, yet the endpoint's next \
                     receive sequence is {}",
                    endpoint.receive_sequence
                ));
            }
            if let Some(deadline) = endpoint.dialog_timer_ms
                && !state.deadlines.contains(&(
                    deadline,
                    *handle,
                    crate::state::DeadlineKind::DialogTimer,
                ))
            {
                self.fail(format!(
                    "conversation {handle}: its timer at {deadline} is not scheduled"
                ));
            }
            if let Some(deadline) = endpoint.expires_at_ms
                && !state.deadlines.contains(&(
                    deadline,
                    *handle,
                    crate::state::DeadlineKind::Lifetime,
                ))
            {
                self.fail(format!(
                    "conversation {handle}: its lifetime ending at {deadline} is not scheduled"
                ));
            }

            let Some(far_handle) = endpoint.far_handle else {
                continue;
            };
            // The far side may be gone: ended WITH CLEANUP, which tells this side nothing.
            let Some(far) = state.endpoints.get(&far_handle) else {
                continue;
            };
            if far.far_handle != Some(*handle)
                || far.conversation_id != endpoint.conversation_id
                || far.is_initiator == endpoint.is_initiator
                || far.contract != endpoint.contract
                || far.service != endpoint.far_service
                || far.far_service != endpoint.service
            {
                self.fail(format!(
                    "conversation {handle} ({side}, id {}, contract {:?}, {:?} → {:?}) and its far \
                     side {far_handle} (initiator {}, id {}, contract {:?}, {:?} → {:?}, far side \
                     {:?}) do not match",
                    endpoint.conversation_id,
                    endpoint.contract,
                    endpoint.service,
                    endpoint.far_service,
                    far.is_initiator,
                    far.conversation_id,
                    far.contract,
                    far.service,
                    far.far_service,
                    far.far_handle
                ));
            }
            // Everything the far side sent and this side has not received waits, taken or
            // queued: from the receive sequence up to the far side's send sequence (unless this
            // side ended or failed, when later messages are discarded).
            if !endpoint.state.accepts_messages() {
                continue;
            }
            let sent = far.send_sequence;
            let received = endpoint.receive_sequence;
            if sent < received {
                self.fail(format!(
                    "conversation {handle} expects to receive message {received} next, but its \
                     far side sent only {sent}"
                ));
            } else if sent > received && (first != Some(received) || last != Some(sent - 1)) {
                self.fail(format!(
                    "conversation {handle}: messages {received}..{sent} were sent and not \
                     received, but {:?}..={:?} wait (taken or queued)",
                    first, last
                ));
            } else if sent == received && first.is_some() {
                self.fail(format!(
                    "conversation {handle}: everything sent ({sent}) was received, yet \
                     {first:?}..={last:?} wait"
                ));
            }
        }
        for (conversation, count) in sides {
            if count > 2 {
                self.fail(format!(
                    "conversation id {conversation} has {count} local endpoints"
                ));
            }
        }
    }

    /// The transmission queue holds messages of endpoints whose far side is on another broker,
    /// each conversation's in sequence order, below its next send sequence.
    fn transmission(&mut self, state: &State) {
        let mut last: HashMap<ConversationHandle, u64> = HashMap::new();
        for (id, t) in &state.transmission {
            match state.endpoints.get(&t.handle) {
                None => self.fail(format!(
                    "transmission {id} is from conversation {}, which does not exist",
                    t.handle
                )),
                Some(e) if e.far_handle.is_some() => self.fail(format!(
                    "transmission {id} is from conversation {}, whose far side is local",
                    t.handle
                )),
                Some(e) if t.sequence >= e.send_sequence => self.fail(format!(
                    "transmission {id} has sequence {}, yet {} sent only {}",
                    t.sequence, t.handle, e.send_sequence
                )),
                Some(_) => {}
            }
            if let Some(before) = last.insert(t.handle, t.sequence)
                && before >= t.sequence
            {
                self.fail(format!(
                    "conversation {}: transmission of {} queued after {before}",
                    t.handle, t.sequence
                ));
            }
        }
        for ((conversation, is_initiator), handle) in &state.by_conversation {
            match state.endpoints.get(handle) {
                Some(e)
                    if e.conversation_id == *conversation && e.is_initiator == *is_initiator => {}
                _ => self.fail(format!(
                    "conversation index: ({conversation}, {is_initiator}) names {handle}, which \
                     is not that endpoint"
                )),
            }
        }
        if state.by_conversation.len() != state.endpoints.len() {
            self.fail(format!(
                "conversation index holds {} endpoints, the state {}",
                state.by_conversation.len(),
                state.endpoints.len()
            ));
        }
    }

    fn ready_index(&mut self, state: &State) {
        let mut queues: Vec<&str> = state.catalog.queues.keys().map(String::as_str).collect();
        queues.extend(state.groups.values().map(|g| g.queue.as_str()));
        queues.sort_unstable();
        queues.dedup();
        for queue in queues {
            let indexed: Vec<ConversationGroupId> = state.ready_groups(queue).collect();
            // Highest priority first (of the group's conversations that have messages), then
            // oldest first, recomputed from the groups themselves.
            let mut ready: Vec<_> = state
                .groups
                .iter()
                .filter(|(_, g)| g.queue == queue)
                .filter_map(|(id, g)| g.ready_key().map(|key| (key, *id)))
                .collect();
            ready.sort_unstable();
            let ready: Vec<ConversationGroupId> = ready.into_iter().map(|(_, id)| id).collect();
            if indexed != ready {
                self.fail(format!(
                    "queue {queue:?}: the ready index lists groups {indexed:?}, the groups with \
                     messages, by priority then oldest first, are {ready:?}"
                ));
            }
        }
    }

    fn bodies(&mut self, broker: &Broker, state: &State) {
        let mut orders: HashMap<u64, (ConversationHandle, MessageKey)> = HashMap::new();
        let mut by_record: BTreeMap<
            Position,
            Vec<(ConversationHandle, MessageKey, &QueuedMessage)>,
        > = BTreeMap::new();
        for (handle, sequence, message) in all_messages(state) {
            if let Some((other, other_sequence)) =
                orders.insert(message.queuing_order, (handle, sequence))
            {
                self.fail(format!(
                    "messages {other}#{other_sequence} and {handle}#{sequence} share queuing \
                     order {}",
                    message.queuing_order
                ));
            }
            if message.queuing_order >= state.next_queuing_order {
                self.fail(format!(
                    "message {handle}#{sequence} has queuing order {}, yet the next to hand out \
                     is {}",
                    message.queuing_order, state.next_queuing_order
                ));
            }
            by_record
                .entry(message.location().record)
                .or_default()
                .push((handle, sequence, message));
        }
        for (position, messages) in by_record {
            let record = match broker.wal.read(position) {
                Ok(record) => record,
                Err(e) => {
                    let (handle, sequence, _) = messages[0];
                    self.fail(format!(
                        "the body of {handle}#{sequence} (and {} other message(s)) lives in \
                         record {position}, which the log cannot read: {e}",
                        messages.len() - 1
                    ));
                    continue;
                }
            };
            if record.lsn > state.applied_through {
                self.fail(format!(
                    "bodies live in record {} at {position}, beyond the applied LSN {}",
                    record.lsn, state.applied_through
                ));
            }
            for (handle, sequence, message) in messages {
                let location = message.location();
                let start = location.start as usize;
                let logged = record.payload.get(start..start + location.len as usize);
                if logged != Some(&message.body[..]) {
                    self.fail(format!(
                        "the body of {handle}#{sequence} differs from the bytes at its location \
                         {}+{}..{}",
                        position, location.start, location.len
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Broker, DialogOptions, Durability, Options, QueueOptions, Receive, SentBy};

    fn broker(dir: &std::path::Path) -> Broker {
        let broker = Broker::open(
            dir,
            Options {
                durability: Durability::None,
                lock_timeout: Duration::from_millis(10),
                segment_bytes: 64 * 1024,
                ..Options::default()
            },
        )
        .unwrap();
        let mut tx = broker.begin();
        tx.create_message_type("//t/Ask", Validation::Json).unwrap();
        tx.create_contract("//t/Talk", &[("//t/Ask", SentBy::Any)])
            .unwrap();
        tx.create_queue("Q", QueueOptions::default()).unwrap();
        tx.create_service("//t/S", "Q", &["//t/Talk"]).unwrap();
        tx.commit().unwrap();
        broker
    }

    /// Begins a dialog of `//t/S` with itself and sends `n` messages on it.
    fn dialog_with(broker: &Broker, n: u64) {
        let mut tx = broker.begin();
        let h = tx
            .begin_dialog("//t/S", "//t/S", "//t/Talk", DialogOptions::default())
            .unwrap();
        for i in 0..n {
            tx.send(h, "//t/Ask", format!("{i}").as_bytes()).unwrap();
        }
        tx.commit().unwrap();
    }

    #[test]
    fn a_sound_state_passes_with_and_without_open_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(dir.path());
        dialog_with(&broker, 3);
        check_idle(&broker).unwrap();
        let mut tx = broker.begin();
        assert_eq!(tx.receive("Q", Receive::top(2)).unwrap().len(), 2);
        check(&broker).unwrap();
        let idle = check_idle(&broker).unwrap_err();
        assert!(idle.contains("is locked by transaction"), "{idle}");
        assert!(
            idle.contains("are taken, yet no transaction is open"),
            "{idle}"
        );
        tx.commit().unwrap();
        check_idle(&broker).unwrap();
    }

    #[test]
    fn a_lost_message_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(dir.path());
        dialog_with(&broker, 3);
        {
            let mut state = broker.state.lock();
            let queued = state
                .groups
                .values_mut()
                .flat_map(|g| g.conversations.values_mut())
                .find(|q| !q.is_empty())
                .unwrap();
            // A gap inside one conversation's queue cannot be built: the queue is dense by
            // construction. Losing all of its messages can.
            queued.clear();
        }
        let error = check(&broker).unwrap_err();
        assert!(error.contains("were sent and not received"), "{error}");
        assert!(error.contains("the ready index lists groups"), "{error}");
    }

    #[test]
    fn mismatched_far_sides_and_missing_groups_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(dir.path());
        dialog_with(&broker, 1);
        {
            let mut state = broker.state.lock();
            let endpoint = state.endpoints.values_mut().next().unwrap();
            endpoint.is_initiator = !endpoint.is_initiator;
        }
        let error = check(&broker).unwrap_err();
        assert!(error.contains("do not match"), "{error}");
        {
            let mut state = broker.state.lock();
            let group = state.endpoints.values().next().unwrap().group;
            state.groups.remove(&group);
        }
        let error = check(&broker).unwrap_err();
        assert!(error.contains("which does not exist"), "{error}");
    }

    #[test]
    fn a_body_that_differs_from_its_log_location_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(dir.path());
        dialog_with(&broker, 2);
        {
            let mut state = broker.state.lock();
            let message = state
                .groups
                .values_mut()
                .flat_map(|g| g.conversations.values_mut())
                .flat_map(|q| q.values_mut())
                .next()
                .unwrap();
            message.shift_body_start_for_test();
        }
        let error = check(&broker).unwrap_err();
        assert!(
            error.contains("differs from the bytes at its location"),
            "{error}"
        );
    }

    #[test]
    fn a_taken_message_outside_a_locked_group_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(dir.path());
        dialog_with(&broker, 2);
        {
            let mut state = broker.state.lock();
            let (group, handle) = state
                .groups
                .iter()
                .find_map(|(id, g)| {
                    g.conversations
                        .iter()
                        .find(|(_, q)| !q.is_empty())
                        .map(|(h, _)| (*id, *h))
                })
                .unwrap();
            // Taken without the group's lock: what a RECEIVE must never do.
            state.take_first(group, handle).unwrap();
        }
        let error = check(&broker).unwrap_err();
        assert!(error.contains("is not locked"), "{error}");
    }

    #[test]
    fn a_catalog_with_dangling_references_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let broker = broker(dir.path());
        broker.state.lock().catalog.message_types.remove("//t/Ask");
        let error = check(&broker).unwrap_err();
        assert!(
            error.contains("lists message type \"//t/Ask\", which does not exist"),
            "{error}"
        );
    }
}
