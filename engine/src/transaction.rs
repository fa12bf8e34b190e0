//! Transactions: every change to a broker happens inside one, and becomes visible and durable
//! at once, as one commit record.
//!
//! A transaction validates each operation when it is made, against the committed state plus its
//! own earlier operations, and encodes it into its commit record right away (`RecordBuilder`:
//! message bodies are copied once, into the record). A failed operation changes nothing (its
//! checks all run before anything is recorded). Catalog changes are made on a private copy of
//! the catalog, under the exclusive catalog lock. RECEIVE moves messages out of the queue index
//! into `State::taken` at once (their group is locked by this transaction, so no one else could
//! see them anyway); a rollback puts them back in order, a commit drops them. At commit the
//! record is logged and applied to the state, in LSN order, by the same code that replays the log
//! at recovery; the locks are released last, so the next owner of a group sees the committed
//! state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_wal::RecordBytes;

use crate::broker::BrokerCore;
use crate::catalog::{Catalog, QueueOptions, SentBy, Validation};
use crate::clock;
use crate::error::{Error, Result};
use crate::ids::{ConversationGroupId, ConversationHandle, ConversationId, IdMap, IdSet};
use crate::lock_table::{CatalogMode, TxId};
use crate::record::{DialogRecord, End, Op, RecordBuilder};
use crate::state::{Endpoint, EndpointState, MessageKey, MessageStatus};
use crate::system;

/// Largest message body, in bytes.
pub const MESSAGE_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Options of `begin_dialog`.
#[derive(Debug, Clone, Default)]
pub struct DialogOptions {
    /// Join the conversation group of this conversation (which must exist).
    pub related_conversation: Option<ConversationHandle>,
    /// Join this conversation group, creating it with this id if it does not exist.
    pub related_conversation_group: Option<ConversationGroupId>,
    /// How long the dialog may live: when it passes, both sides get an Error message
    /// (code −8489) and can no longer send; each must still end the conversation. `None`:
    /// forever (Service Broker's default of 2^31−1 seconds, in effect).
    pub lifetime: Option<Duration>,
    /// The broker the target service lives on (BEGIN DIALOG … TO SERVICE 'name', 'broker
    /// guid'): routing looks for it, and the dialog is pinned to it.
    pub target_broker_instance: Option<crate::ids::BrokerInstanceId>,
}

/// What a RECEIVE takes: at most `top` messages of one conversation group, optionally only of
/// one conversation or one group, optionally waiting for them (WAITFOR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receive {
    pub top: usize,
    pub conversation: Option<ConversationHandle>,
    pub group: Option<ConversationGroupId>,
    /// WAITFOR: how long to wait for messages when none is ready (`Duration::MAX`: forever).
    pub wait: Option<Duration>,
}

impl Receive {
    /// At most `n` messages, from the best unlocked group.
    pub fn top(n: usize) -> Receive {
        Receive {
            top: n,
            conversation: None,
            group: None,
            wait: None,
        }
    }

    /// WAITFOR: when nothing is ready, wait up to `timeout` for a message to commit into the
    /// queue (for a group this transaction can lock); an empty batch means the time passed.
    pub fn wait(self, timeout: Duration) -> Receive {
        Receive {
            wait: Some(timeout),
            ..self
        }
    }

    /// Only messages of conversation `handle` (waits for its group's lock).
    pub fn conversation(self, handle: ConversationHandle) -> Receive {
        Receive {
            conversation: Some(handle),
            ..self
        }
    }

    /// Only messages of group `group` (waits for its lock).
    pub fn group(self, group: ConversationGroupId) -> Receive {
        Receive {
            group: Some(group),
            ..self
        }
    }
}

/// A received message. Its body is borrowed from the log.
#[derive(Debug, Clone)]
pub struct Message {
    pub conversation_handle: ConversationHandle,
    pub conversation_group: ConversationGroupId,
    pub message_type: Arc<str>,
    /// Per conversation and direction: 0, 1, 2, … (0 for the unsequenced system messages
    /// DialogTimer and Error, which come ahead of the sequence).
    pub sequence: u64,
    /// Order of arrival in the queue.
    pub queuing_order: u64,
    /// Service Broker's `status`: `Ready` for everything RECEIVE returns; `Broker::peek`
    /// also shows messages kept by RETENTION.
    pub status: MessageStatus,
    body: RecordBytes,
}

impl Message {
    pub(crate) fn new(
        conversation_handle: ConversationHandle,
        conversation_group: ConversationGroupId,
        message_type: Arc<str>,
        sequence: u64,
        queuing_order: u64,
        status: MessageStatus,
        body: RecordBytes,
    ) -> Message {
        Message {
            conversation_handle,
            conversation_group,
            message_type,
            sequence,
            queuing_order,
            status,
            body,
        }
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as bytes that keep the log segment alive (no copy).
    pub fn body_bytes(&self) -> &RecordBytes {
        &self.body
    }
}

/// A SEND permission already checked: `message_type` may be sent by this side on `contract`.
#[derive(Debug)]
struct SendRule {
    contract: Arc<str>,
    message_type: String,
    is_initiator: bool,
    validation: Validation,
}

/// A unit of work on a broker. Dropping it without `commit` rolls it back.
pub struct Transaction<'b> {
    broker: &'b BrokerCore,
    id: TxId,
    /// The commit record, encoded as operations are made.
    record: RecordBuilder,
    /// Private copy of the catalog once this transaction changed it.
    catalog: Option<Catalog>,
    catalog_mode: Option<CatalogMode>,
    /// Endpoints created by this transaction, and this transaction's view of endpoints it sent
    /// on (their next send sequence).
    endpoints: IdMap<ConversationHandle, Endpoint>,
    /// Groups created by this transaction: id → queue.
    new_groups: IdMap<ConversationGroupId, String>,
    locked_groups: IdSet<ConversationGroupId>,
    /// Messages this transaction's RECEIVEs took (they wait in `State::taken`), to put back on
    /// rollback.
    taken: Vec<(ConversationHandle, MessageKey)>,
    /// Queues this transaction received messages from (poison-message counting).
    received_from: Vec<String>,
    /// Conversations this transaction moved to another group (MOVE CONVERSATION): their
    /// messages stay in their old groups until the commit, and RECEIVE looks for them there.
    moved: Vec<ConversationHandle>,
    /// Endpoints this transaction created (not committed, so not in the state yet).
    created: IdSet<ConversationHandle>,
    /// Contract checks already made by this transaction's SENDs.
    send_rules: Vec<SendRule>,
    /// When set, WAITFOR waits of this transaction end with `Error::Interrupted` (see
    /// `interrupt_waits_on`).
    interrupt: Option<Arc<AtomicBool>>,
    finished: bool,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("id", &self.id)
            .field("ops", &self.record.op_count())
            .finish()
    }
}

impl<'b> Transaction<'b> {
    pub(crate) fn new(broker: &'b BrokerCore, id: TxId) -> Transaction<'b> {
        Transaction {
            broker,
            id,
            record: RecordBuilder::new(),
            catalog: None,
            catalog_mode: None,
            endpoints: IdMap::default(),
            new_groups: IdMap::default(),
            locked_groups: IdSet::default(),
            taken: Vec::new(),
            received_from: Vec::new(),
            moved: Vec::new(),
            created: IdSet::default(),
            send_rules: Vec::new(),
            interrupt: None,
            finished: false,
        }
    }

    /// Makes this transaction's WAITFOR waits (`receive` with `Receive::wait`,
    /// `get_conversation_group_wait`) end with [`Error::Interrupted`] once `flag` is set and the
    /// waiters are woken ([`BrokerCore::wake_waiters`]): how a server ends a session's wait
    /// when its client goes away or the node shuts down. A wait that already has messages
    /// returns them.
    pub fn interrupt_waits_on(&mut self, flag: Arc<AtomicBool>) {
        self.interrupt = Some(flag);
    }

    fn interrupted(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }

    fn lock_timeout(&self) -> Duration {
        self.broker.options.lock_timeout
    }

    fn lock_catalog(&mut self, mode: CatalogMode) -> Result<()> {
        if self.catalog_mode == Some(CatalogMode::Exclusive) || self.catalog_mode == Some(mode) {
            return Ok(());
        }
        self.broker.catalog_lock.acquire(
            self.id,
            mode,
            self.lock_timeout(),
            self.broker.clock(),
        )?;
        self.catalog_mode = Some(mode);
        Ok(())
    }

    /// Runs `f` on this transaction's view of the catalog.
    pub(crate) fn read_catalog<R>(&mut self, f: impl FnOnce(&Catalog) -> Result<R>) -> Result<R> {
        self.lock_catalog(CatalogMode::Shared)?;
        match &self.catalog {
            Some(catalog) => f(catalog),
            None => f(&self.broker.state.lock().catalog),
        }
    }

    /// Runs a catalog change on the private copy and records `op` if it succeeds.
    fn change_catalog(
        &mut self,
        op: Op,
        change: impl FnOnce(&mut Catalog) -> Result<()>,
    ) -> Result<()> {
        self.lock_catalog(CatalogMode::Exclusive)?;
        let mut catalog = match self.catalog.take() {
            Some(catalog) => catalog,
            None => self.broker.state.lock().catalog.clone(),
        };
        let result = change(&mut catalog);
        self.catalog = Some(catalog);
        result?;
        self.record.push(&op);
        Ok(())
    }

    pub fn create_message_type(&mut self, name: &str, validation: Validation) -> Result<()> {
        let op = Op::CreateMessageType {
            name: name.into(),
            validation,
        };
        self.change_catalog(op, |c| c.create_message_type(name, validation))
    }

    pub fn drop_message_type(&mut self, name: &str) -> Result<()> {
        let op = Op::DropMessageType { name: name.into() };
        self.change_catalog(op, |c| c.drop_message_type(name))
    }

    pub fn create_contract(&mut self, name: &str, messages: &[(&str, SentBy)]) -> Result<()> {
        let op = Op::CreateContract {
            name: name.into(),
            messages: messages
                .iter()
                .map(|(t, s)| ((*t).to_owned(), *s))
                .collect(),
        };
        self.change_catalog(op, |c| c.create_contract(name, messages))
    }

    pub fn drop_contract(&mut self, name: &str) -> Result<()> {
        let op = Op::DropContract { name: name.into() };
        self.change_catalog(op, |c| c.drop_contract(name))
    }

    pub fn create_queue(&mut self, name: &str, options: QueueOptions) -> Result<()> {
        let op = Op::CreateQueue {
            name: name.into(),
            options,
        };
        self.change_catalog(op, |c| c.create_queue(name, options))
    }

    pub fn alter_queue(&mut self, name: &str, options: QueueOptions) -> Result<()> {
        let op = Op::AlterQueue {
            name: name.into(),
            options,
        };
        self.change_catalog(op, |c| c.alter_queue(name, options))
    }

    /// Drops a queue; refused while a service is on it or conversations still use it.
    pub fn drop_queue(&mut self, name: &str) -> Result<()> {
        let in_use = self
            .broker
            .state
            .lock()
            .groups
            .values()
            .any(|g| g.queue == name)
            || self.new_groups.values().any(|q| q == name);
        if in_use {
            return Err(Error::InUse {
                kind: "queue",
                name: name.into(),
                reason: "conversations still use it".into(),
            });
        }
        let op = Op::DropQueue { name: name.into() };
        self.change_catalog(op, |c| c.drop_queue(name))
    }

    pub fn create_service(&mut self, name: &str, queue: &str, contracts: &[&str]) -> Result<()> {
        let op = Op::CreateService {
            name: name.into(),
            queue: queue.into(),
            contracts: contracts.iter().map(|c| (*c).to_owned()).collect(),
        };
        self.change_catalog(op, |c| c.create_service(name, queue, contracts))
    }

    /// Drops a service; refused while conversations still use it (ending them is the life-cycle
    /// issue's END CONVERSATION).
    pub fn drop_service(&mut self, name: &str) -> Result<()> {
        // The catalog's exclusive lock first: a transaction beginning a dialog from or to the
        // service holds the catalog shared until it ends, so once this lock is held its
        // conversation is committed (and counted below) or gone. Checked before, a dialog
        // begun meanwhile was left belonging to a service that no longer exists.
        self.lock_catalog(CatalogMode::Exclusive)?;
        let in_use = self
            .broker
            .state
            .lock()
            .endpoints
            .values()
            .any(|e| *e.service == *name)
            || self.endpoints.values().any(|e| *e.service == *name);
        if in_use {
            return Err(Error::InUse {
                kind: "service",
                name: name.into(),
                reason: "conversations still use it".into(),
            });
        }
        let op = Op::DropService { name: name.into() };
        self.change_catalog(op, |c| c.drop_service(name))
    }

    /// CREATE BROKER PRIORITY: conversations created from now on whose contract, local service
    /// and remote service match (`None` = ANY) get `priority.level`; the best match wins.
    pub fn create_broker_priority(
        &mut self,
        priority: crate::catalog::BrokerPriority,
    ) -> Result<()> {
        let op = Op::CreateBrokerPriority(priority.clone());
        self.change_catalog(op, |c| c.create_priority(priority))
    }

    /// Records an op built by the broker itself (messages arriving from other brokers).
    pub(crate) fn push_op(&mut self, op: &Op) {
        self.record.push(op);
    }

    /// The commit record so far: its size, and a mark to drop ops pushed after it.
    pub(crate) fn record(&mut self) -> &mut RecordBuilder {
        &mut self.record
    }

    /// `push_op` of an `Op::Arrive`, without building it (no copy of the body).
    pub(crate) fn push_arrive(
        &mut self,
        handle: ConversationHandle,
        sequence: u64,
        message_type: &str,
        body: &[u8],
    ) {
        self.record
            .push_arrive(handle, sequence, message_type, body);
    }

    /// CREATE ROUTE.
    pub fn create_route(&mut self, route: crate::catalog::Route) -> Result<()> {
        let op = Op::CreateRoute(route.clone());
        self.change_catalog(op, |c| c.create_route(route))
    }

    /// ALTER ROUTE: replaces the route's settings.
    pub fn alter_route(&mut self, route: crate::catalog::Route) -> Result<()> {
        let op = Op::AlterRoute(route.clone());
        self.change_catalog(op, |c| c.alter_route(route))
    }

    /// DROP ROUTE.
    pub fn drop_route(&mut self, name: &str) -> Result<()> {
        let op = Op::DropRoute { name: name.into() };
        self.change_catalog(op, |c| c.drop_route(name))
    }

    /// DROP BROKER PRIORITY (existing conversations keep their priority).
    pub fn drop_broker_priority(&mut self, name: &str) -> Result<()> {
        let op = Op::DropBrokerPriority { name: name.into() };
        self.change_catalog(op, |c| c.drop_priority(name))
    }

    /// Begins a dialog from local service `from` to service `to` on `contract`, returning the
    /// initiator's conversation handle. The target endpoint is created too (the target service
    /// must be on this broker until the network exists). Locks the new conversation's group.
    pub fn begin_dialog(
        &mut self,
        from: &str,
        to: &str,
        contract: &str,
        options: DialogOptions,
    ) -> Result<ConversationHandle> {
        let this_broker = self.broker.broker_instance();
        let now = self.broker.clock().now_ms();
        let (from_queue, to_queue) = self.read_catalog(|catalog| {
            let from_service = catalog.service(from)?;
            catalog.contract(contract)?;
            let route = catalog.route(
                to,
                options.target_broker_instance,
                this_broker,
                now,
                crate::catalog::ConversationStage::New,
            );
            if route != crate::catalog::RouteChoice::Local {
                // The far side is on another broker (or has no route yet: its messages wait in
                // the transmission queue, which is not an error).
                return Ok((from_service.queue.clone(), None));
            }
            let to_service = catalog.service(to)?;
            if !to_service.contracts.contains(contract) {
                return Err(Error::ContractNotAccepted {
                    service: to.to_owned(),
                    contract: contract.to_owned(),
                });
            }
            Ok((from_service.queue.clone(), Some(to_service.queue.clone())))
        })?;
        let group = match (
            options.related_conversation,
            options.related_conversation_group,
        ) {
            (Some(related), _) => {
                self.load_endpoint(related)?;
                self.endpoints[&related].group
            }
            (None, Some(group)) => group,
            (None, None) => ConversationGroupId::random(),
        };
        if let Some(queue) = self.group_queue(group)
            && queue != from_queue
        {
            return Err(Error::GroupOnOtherQueue {
                group,
                service: from.into(),
                queue: from_queue,
                actual: queue,
            });
        }
        // Checks first, lock last: a refused BEGIN DIALOG leaves no lock behind. (A MOVE can only
        // change a conversation's group within its queue, so the check above still holds for a
        // related conversation's group; a group named by id is checked again under its lock.)
        let group = match options.related_conversation {
            Some(related) => self.lock_endpoint_group(related)?,
            None => {
                self.lock_group_on_queue(group, &from_queue, from)?;
                group
            }
        };
        self.new_groups.entry(group).or_insert(from_queue.clone());
        let handle = ConversationHandle::random();
        let conversation_id = ConversationId::random();
        let target = to_queue.map(|to_queue| {
            let target_group = ConversationGroupId::random();
            self.new_groups.insert(target_group, to_queue);
            (ConversationHandle::random(), target_group)
        });
        let expires_at_ms = options.lifetime.map_or(0, |lifetime| {
            clock::deadline_after(self.broker.clock(), lifetime).max(1)
        });
        let (initiator_priority, target_priority) = self.read_catalog(|c| {
            Ok((
                c.priority_for(contract, from, to),
                c.priority_for(contract, to, from),
            ))
        })?;
        let endpoint =
            |handle, is_initiator, service: &str, far: &str, group, far_handle| Endpoint {
                handle,
                conversation_id,
                is_initiator,
                service: service.into(),
                far_service: far.into(),
                contract: contract.into(),
                group,
                state: if is_initiator {
                    EndpointState::StartedOutbound
                } else {
                    EndpointState::Conversing
                },
                send_sequence: 0,
                receive_sequence: 0,
                far_handle,
                far_broker_instance: if far_handle.is_none() {
                    options.target_broker_instance
                } else {
                    None
                },
                established: false,
                arrived_sequence: 0,
                expires_at_ms: (expires_at_ms != 0).then_some(expires_at_ms),
                dialog_timer_ms: None,
                priority: if is_initiator {
                    initiator_priority
                } else {
                    target_priority
                },
            };
        self.endpoints.insert(
            handle,
            endpoint(handle, true, from, to, group, target.map(|(h, _)| h)),
        );
        self.created.insert(handle);
        if let Some((target_handle, target_group)) = target {
            self.endpoints.insert(
                target_handle,
                endpoint(target_handle, false, to, from, target_group, Some(handle)),
            );
            self.created.insert(target_handle);
        }
        self.record.push(&Op::BeginDialog(DialogRecord {
            handle,
            conversation_id,
            group,
            from_service: from.into(),
            to_service: to.into(),
            contract: contract.into(),
            expires_at_ms,
            target,
            far_broker_instance: options.target_broker_instance,
        }));
        Ok(handle)
    }

    /// Sends one message on conversation `handle`.
    pub fn send(
        &mut self,
        handle: ConversationHandle,
        message_type: &str,
        body: &[u8],
    ) -> Result<()> {
        self.send_many(&[handle], message_type, body)
    }

    /// Sends one message on each of `handles`, atomically: if any conversation refuses it,
    /// nothing is sent on any.
    pub fn send_many(
        &mut self,
        handles: &[ConversationHandle],
        message_type: &str,
        body: &[u8],
    ) -> Result<()> {
        if body.len() > MESSAGE_BODY_BYTES_MAX {
            return Err(Error::BodyTooLarge {
                len: body.len(),
                max: MESSAGE_BODY_BYTES_MAX,
            });
        }
        if handles.is_empty() {
            return Err(Error::NoConversation);
        }
        let mut seen = IdSet::default();
        for handle in handles {
            if !seen.insert(*handle) {
                return Err(Error::DuplicateHandle(*handle));
            }
            self.load_endpoint(*handle)?;
        }
        let validation = self.send_rule(handles, message_type)?;
        validation.check(message_type, body)?;
        for handle in handles {
            self.lock_endpoint_group(*handle)?;
        }
        // Taking a lock re-reads endpoints other transactions may have changed meanwhile (ended
        // them, or removed them): check again, with nothing recorded yet.
        for handle in handles {
            let endpoint = self.loaded_endpoint(*handle)?;
            if !endpoint.state.can_send() {
                return Err(Error::ConversationClosed {
                    handle: *handle,
                    state: endpoint.state.code(),
                    operation: "SEND",
                });
            }
        }
        for handle in handles {
            let endpoint = self.endpoints.get_mut(handle).expect("checked above");
            self.record
                .push_send(*handle, message_type, endpoint.send_sequence, body);
            endpoint.send_sequence += 1;
            if endpoint.state == EndpointState::StartedOutbound {
                endpoint.state = EndpointState::Conversing;
            }
        }
        Ok(())
    }

    /// GET CONVERSATION GROUP: locks the group of `queue` that RECEIVE without a target would
    /// take next (the unlocked one with the oldest waiting message), without receiving; `None`
    /// when no unlocked group has messages. The lock is held until this transaction ends.
    pub fn get_conversation_group(&mut self, queue: &str) -> Result<Option<ConversationGroupId>> {
        let enabled = self.read_catalog(|c| Ok(c.queue(queue)?.options.enabled))?;
        if !enabled {
            return Err(Error::QueueDisabled(queue.into()));
        }
        Ok(self.lock_best_group(queue))
    }

    /// WAITFOR (GET CONVERSATION GROUP): as `get_conversation_group`, waiting up to `timeout`
    /// for a group to become available; `None` when the time passed. Waits as `receive` does.
    pub fn get_conversation_group_wait(
        &mut self,
        queue: &str,
        timeout: Duration,
    ) -> Result<Option<ConversationGroupId>> {
        let held_catalog = self.catalog_mode.is_some();
        let waiter = self.broker.signals.wait_on(queue);
        let deadline = clock::deadline_after(self.broker.clock(), timeout);
        loop {
            let seen = waiter.signal.generation();
            let group = self.get_conversation_group(queue)?;
            if group.is_some() || self.broker.is_closing() {
                return Ok(group);
            }
            if self.interrupted() {
                return Err(Error::Interrupted);
            }
            if !held_catalog {
                self.release_catalog_lock();
            }
            if !waiter.signal.wait_past(seen, deadline, self.broker.clock()) {
                return Ok(None);
            }
        }
    }

    /// MOVE CONVERSATION: moves conversation `handle` (this side of it) into group `to` on the
    /// same queue, creating the group if it does not exist; its waiting messages move with it.
    /// Locks both groups until this transaction ends.
    pub fn move_conversation(
        &mut self,
        handle: ConversationHandle,
        to: ConversationGroupId,
    ) -> Result<()> {
        self.load_endpoint(handle)?;
        let queue = self
            .group_queue(self.endpoints[&handle].group)
            .ok_or(Error::UnknownConversation(handle))?;
        if let Some(actual) = self.group_queue(to)
            && actual != queue
        {
            return Err(Error::GroupOnOtherQueue {
                group: to,
                service: self.endpoints[&handle].service.to_string(),
                queue,
                actual,
            });
        }
        // Checks first, locks last: a refused MOVE leaves no lock behind.
        let (from, newly) = self.lock_endpoint_group_newly(handle)?;
        let service = self.endpoints[&handle].service.to_string();
        if let Err(e) = self.lock_group_on_queue(to, &queue, &service) {
            if newly {
                self.release_group(from);
            }
            return Err(e);
        }
        self.new_groups.entry(to).or_insert(queue);
        if let Some(endpoint) = self.endpoints.get_mut(&handle) {
            endpoint.group = to;
        }
        self.moved.push(handle);
        self.record
            .push(&Op::MoveConversation { handle, group: to });
        Ok(())
    }

    /// Receives up to `what.top` messages of one conversation group from `queue`, locking the
    /// group until this transaction ends. An empty batch means nothing was ready (or, with
    /// `Receive::wait`, nothing came in time).
    ///
    /// While it waits, a WAITFOR receive that began this transaction's use of the catalog
    /// lets go of the catalog lock, so ALTER QUEUE and DROP QUEUE can proceed; either makes the
    /// wait fail at once (`QueueDisabled`, `UnknownQueue`). A transaction that already read
    /// the catalog keeps it (its earlier checks rely on it), and a catalog change waits for it.
    pub fn receive(&mut self, queue: &str, what: Receive) -> Result<Vec<Message>> {
        let Some(timeout) = what.wait else {
            return self.receive_once(queue, what);
        };
        let deadline = clock::deadline_after(self.broker.clock(), timeout);
        let interrupt = self.interrupt.clone();
        let interrupted = || {
            interrupt
                .as_ref()
                .is_some_and(|flag| flag.load(Ordering::SeqCst))
        };
        let batch = self.receive_until(queue, what, deadline, &interrupted)?;
        if batch.is_empty() && interrupted() {
            return Err(Error::Interrupted);
        }
        Ok(batch)
    }

    /// A WAITFOR receive until `deadline_ms`, ending early (empty) when `stop` says so or the
    /// broker closes.
    pub(crate) fn receive_until(
        &mut self,
        queue: &str,
        what: Receive,
        deadline_ms: u64,
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<Message>> {
        let held_catalog = self.catalog_mode.is_some();
        let waiter = self.broker.signals.wait_on(queue);
        loop {
            let seen = waiter.signal.generation();
            let batch = self.receive_once(queue, what)?;
            if !batch.is_empty() || self.broker.is_closing() || stop() {
                return Ok(batch);
            }
            if !held_catalog {
                self.release_catalog_lock();
            }
            if !waiter
                .signal
                .wait_past(seen, deadline_ms, self.broker.clock())
            {
                return Ok(batch);
            }
        }
    }

    /// The same as `receive`, as a future for async callers (no runtime needed: it is woken by
    /// the commit that brings messages, or by the broker's timer thread at the deadline).
    pub fn receive_async<'t>(&'t mut self, queue: &'t str, what: Receive) -> ReceiveFuture<'t, 'b> {
        let held_catalog = self.catalog_mode.is_some();
        ReceiveFuture {
            tx: self,
            queue,
            what,
            held_catalog,
            deadline_ms: None,
            waiter: None,
            timer: None,
            registration: crate::signal::next_registration(),
        }
    }

    fn release_catalog_lock(&mut self) {
        if self.catalog.is_none() && self.catalog_mode == Some(CatalogMode::Shared) {
            self.broker.catalog_lock.release(self.id);
            self.catalog_mode = None;
        }
    }

    fn receive_once(&mut self, queue: &str, what: Receive) -> Result<Vec<Message>> {
        let enabled = self.read_catalog(|c| Ok(c.queue(queue)?.options.enabled))?;
        if !enabled {
            return Err(Error::QueueDisabled(queue.into()));
        }
        let group = match (what.conversation, what.group) {
            (Some(handle), _) => {
                self.load_endpoint(handle)?;
                let group = self.endpoints[&handle].group;
                let actual = self.group_queue(group).unwrap_or_default();
                if actual != queue {
                    return Err(Error::WrongQueue {
                        handle,
                        queue: queue.into(),
                        actual,
                    });
                }
                let group = self.lock_endpoint_group(handle)?;
                // Moved by this transaction (MOVE CONVERSATION), its messages are still where
                // the committed state has them until the commit: in the group it came from,
                // which this transaction holds too.
                let held_in = self
                    .broker
                    .state
                    .lock()
                    .endpoints
                    .get(&handle)
                    .map_or(group, |e| e.group);
                if self.locked_groups.contains(&held_in) {
                    held_in
                } else {
                    group
                }
            }
            (None, Some(group)) => {
                if self.group_queue(group).as_deref() != Some(queue) {
                    return Err(Error::UnknownConversationGroup {
                        group,
                        queue: queue.into(),
                    });
                }
                self.lock_group(group)?;
                group
            }
            (None, None) => match self.lock_best_group(queue) {
                Some(group) => group,
                None => return Ok(Vec::new()),
            },
        };
        let mut batch = self.take_messages(group, what);
        if what.conversation.is_none() && !self.moved.is_empty() {
            // Conversations this transaction moved into the group (MOVE CONVERSATION): their
            // messages stay in the groups they came from until the commit, which this
            // transaction holds too.
            let moved_in: Vec<(ConversationHandle, ConversationGroupId)> = {
                let state = self.broker.state.lock();
                self.moved
                    .iter()
                    .filter(|handle| self.endpoints.get(handle).is_some_and(|e| e.group == group))
                    .filter_map(|handle| Some((*handle, state.endpoints.get(handle)?.group)))
                    .filter(|(_, held_in)| *held_in != group)
                    .filter(|(_, held_in)| self.locked_groups.contains(held_in))
                    .collect()
            };
            for (handle, held_in) in moved_in {
                if batch.len() >= what.top {
                    break;
                }
                let rest = Receive {
                    top: what.top - batch.len(),
                    conversation: Some(handle),
                    ..what
                };
                batch.extend(self.take_messages(held_in, rest));
            }
        }
        if !batch.is_empty() && !self.received_from.iter().any(|q| q == queue) {
            self.received_from.push(queue.to_owned());
        }
        Ok(batch)
    }

    /// END CONVERSATION: ends this side of the conversation. Its messages still queued here are
    /// discarded; the far side gets an EndDialog message after everything this side sent
    /// before (unless it has ended or failed already). Both sides must end: the conversation
    /// is removed when the second one does. Locks the conversation's group.
    pub fn end_conversation(&mut self, handle: ConversationHandle) -> Result<()> {
        self.end(handle, End::Plain)
    }

    /// END CONVERSATION WITH ERROR: ends this side and sends the far side an Error message
    /// (code > 0, description at most `ERROR_DESCRIPTION_CHARS_MAX` characters) that it receives
    /// ahead of its other messages; it can no longer send.
    pub fn end_conversation_with_error(
        &mut self,
        handle: ConversationHandle,
        code: i32,
        description: &str,
    ) -> Result<()> {
        if code <= 0 {
            return Err(Error::InvalidErrorCode(code));
        }
        let chars = description.chars().count();
        if chars > system::ERROR_DESCRIPTION_CHARS_MAX {
            return Err(Error::DescriptionTooLong {
                chars,
                max: system::ERROR_DESCRIPTION_CHARS_MAX,
            });
        }
        self.end(
            handle,
            End::Error {
                code,
                body: system::error_body(code, description),
                body_range: 0..0,
            },
        )
    }

    /// END CONVERSATION WITH CLEANUP: removes this side and its messages at once, telling the
    /// far side nothing (an administrator's tool for conversations whose far side is gone).
    pub fn end_conversation_with_cleanup(&mut self, handle: ConversationHandle) -> Result<()> {
        self.end(handle, End::Cleanup)
    }

    fn end(&mut self, handle: ConversationHandle, end: End) -> Result<()> {
        self.load_endpoint(handle)?;
        self.lock_endpoint_group(handle)?;
        let endpoint = self.endpoints.get_mut(&handle).expect("loaded above");
        // This side ended already (closed, or waiting for the far side's acknowledgement of
        // its END): a second END would send the far side another END, or an Error past it.
        // Only WITH CLEANUP may still remove it.
        let ended_here =
            endpoint.state.is_ended() || endpoint.state == EndpointState::DisconnectedOutbound;
        if ended_here && end != End::Cleanup {
            return Err(Error::ConversationClosed {
                handle,
                state: endpoint.state.code(),
                operation: "END CONVERSATION",
            });
        }
        endpoint.state = EndpointState::Closed;
        self.record.push(&Op::EndConversation { handle, end });
        Ok(())
    }

    /// BEGIN CONVERSATION TIMER: a DialogTimer message arrives in this side's queue once
    /// `timeout` has passed (on the broker's clock), replacing any timer set before. Survives
    /// restarts; ending the conversation cancels it. Locks the conversation's group.
    pub fn begin_conversation_timer(
        &mut self,
        handle: ConversationHandle,
        timeout: Duration,
    ) -> Result<()> {
        self.load_endpoint(handle)?;
        self.lock_endpoint_group(handle)?;
        let endpoint = &self.endpoints[&handle];
        if endpoint.state.is_ended() {
            return Err(Error::ConversationClosed {
                handle,
                state: endpoint.state.code(),
                operation: "BEGIN CONVERSATION TIMER",
            });
        }
        let deadline_ms = clock::deadline_after(self.broker.clock(), timeout);
        self.record.push(&Op::SetTimer {
            handle,
            deadline_ms,
        });
        Ok(())
    }

    /// Picks and locks the unlocked group of `queue` (or one this transaction holds) whose
    /// oldest ready message is oldest.
    fn lock_best_group(&mut self, queue: &str) -> Option<ConversationGroupId> {
        let state = self.broker.state.lock();
        // Under the state lock, so the index cannot change while it is walked; try_lock never
        // waits, so holding the state lock here cannot deadlock.
        let group = state
            .ready_groups(queue)
            // A group this transaction holds may have nothing left for it: the conversations
            // with messages it ended (they go at commit). Taken, the RECEIVE came back empty
            // though another group had messages — and a WAITFOR waited for ever.
            .filter(|group| {
                !self.locked_groups.contains(group)
                    || state.groups.get(group).is_some_and(|g| {
                        g.conversations.iter().any(|(handle, messages)| {
                            messages.oldest().is_some()
                                && self
                                    .endpoints
                                    .get(handle)
                                    .is_none_or(|e| !e.state.is_ended())
                        })
                    })
            })
            .find(|group| self.broker.locks.try_lock(*group, self.id))?;
        drop(state);
        if self.locked_groups.insert(group) {
            self.refresh_endpoints(group);
        }
        Some(group)
    }

    /// Takes the messages of locked `group`: conversations by priority, then oldest first;
    /// within a conversation by sequence; at most `what.top`.
    fn take_messages(&mut self, group_id: ConversationGroupId, what: Receive) -> Vec<Message> {
        let mut state = self.broker.state.lock();
        let Some(group) = state.groups.get(&group_id) else {
            return Vec::new();
        };
        let mut order: Vec<(std::cmp::Reverse<u8>, u64, ConversationHandle)> = group
            .conversations
            .iter()
            .filter(|(handle, _)| what.conversation.is_none_or(|h| h == **handle))
            // A conversation this transaction ended has no messages left for it.
            .filter(|(handle, _)| {
                self.endpoints
                    .get(handle)
                    .is_none_or(|e| !e.state.is_ended())
            })
            .filter_map(|(handle, messages)| {
                Some((
                    std::cmp::Reverse(messages.priority),
                    messages.oldest()?,
                    *handle,
                ))
            })
            .collect();
        order.sort_unstable();
        let mut batch = Vec::new();
        for (_, _, handle) in order {
            let mut through = None;
            while batch.len() < what.top {
                let Some((key, message)) = state.take_first(group_id, handle) else {
                    break;
                };
                match key {
                    MessageKey::Sequence(sequence) => through = Some(sequence),
                    MessageKey::Urgent { queuing_order, .. } => {
                        self.record.push(&Op::ReceiveUrgent {
                            handle,
                            queuing_order,
                        });
                    }
                    // Retained and outbound messages never wait to be received.
                    MessageKey::Retained { .. } | MessageKey::Outbound { .. } => {}
                }
                self.taken.push((handle, key));
                batch.push(Message {
                    conversation_handle: handle,
                    // As this transaction sees it (a MOVE of its own moves the messages at
                    // commit).
                    conversation_group: self.endpoints.get(&handle).map_or(group_id, |e| e.group),
                    message_type: state.message_type_name(message.message_type).clone(),
                    sequence: key.sequence(),
                    queuing_order: message.queuing_order,
                    status: MessageStatus::Ready,
                    body: message.body,
                });
            }
            if let Some(through_sequence) = through {
                self.record.push(&Op::Receive {
                    handle,
                    through_sequence,
                });
            }
            if batch.len() >= what.top {
                break;
            }
        }
        batch
    }

    /// Brings endpoint `handle` into this transaction's view (once), so later operations on it
    /// need neither the state lock nor a copy.
    fn load_endpoint(&mut self, handle: ConversationHandle) -> Result<()> {
        if !self.endpoints.contains_key(&handle) {
            let endpoint = self.broker.state.lock().endpoint(handle)?.clone();
            self.endpoints.insert(handle, endpoint);
        }
        Ok(())
    }

    /// Checks that every endpoint in `handles` (loaded) may send `message_type`, and returns the
    /// type's validation. The answer for a (contract, type, side) is cached: this transaction
    /// holds the catalog shared, so the catalog cannot change under it.
    fn send_rule(
        &mut self,
        handles: &[ConversationHandle],
        message_type: &str,
    ) -> Result<Validation> {
        let mut validation = None;
        for handle in handles {
            let endpoint = &self.endpoints[handle];
            if !endpoint.state.can_send() {
                return Err(Error::ConversationClosed {
                    handle: *handle,
                    state: endpoint.state.code(),
                    operation: "SEND",
                });
            }
            let cached = self.send_rules.iter().find(|rule| {
                rule.is_initiator == endpoint.is_initiator
                    && *rule.contract == *endpoint.contract
                    && rule.message_type == message_type
            });
            if let Some(rule) = cached {
                validation = Some(rule.validation);
                continue;
            }
            let (contract, is_initiator) = (endpoint.contract.clone(), endpoint.is_initiator);
            let found = self.read_catalog(|catalog| {
                let validation = catalog.message_type(message_type)?.validation;
                let allowed = catalog
                    .contract(&contract)?
                    .messages
                    .get(message_type)
                    .is_some_and(|sent_by| sent_by.allows(is_initiator));
                if !allowed {
                    return Err(Error::ContractViolation {
                        handle: *handle,
                        contract: contract.to_string(),
                        message_type: message_type.into(),
                        side: if is_initiator { "initiator" } else { "target" },
                    });
                }
                Ok(validation)
            })?;
            self.send_rules.push(SendRule {
                contract,
                message_type: message_type.into(),
                is_initiator,
                validation: found,
            });
            validation = Some(found);
        }
        validation.ok_or_else(|| Error::UnknownMessageType(message_type.into()))
    }

    /// The queue a group belongs to, if the group exists (committed or created here).
    fn group_queue(&self, group: ConversationGroupId) -> Option<String> {
        if let Some(queue) = self.new_groups.get(&group) {
            return Some(queue.clone());
        }
        self.broker
            .state
            .lock()
            .groups
            .get(&group)
            .map(|g| g.queue.clone())
    }

    /// Locks `group` for a conversation of `service` on `queue`, and checks again, under the
    /// lock, that the group is on that queue: a group that did not exist when this transaction
    /// checked may have been created on another queue since, by a transaction that held the
    /// lock then. (Unchecked, this commit's record was logged and then failed to apply: the
    /// broker refused every later commit, and every open replayed the same failure.) Refused,
    /// a lock this call took is let go.
    fn lock_group_on_queue(
        &mut self,
        group: ConversationGroupId,
        queue: &str,
        service: &str,
    ) -> Result<()> {
        let newly = self.lock_group(group)?;
        match self.group_queue(group) {
            Some(actual) if actual != queue => {
                if newly {
                    self.release_group(group);
                }
                Err(Error::GroupOnOtherQueue {
                    group,
                    service: service.into(),
                    queue: queue.into(),
                    actual,
                })
            }
            _ => Ok(()),
        }
    }

    /// Lets go of one group this transaction locked and has not changed anything in (a
    /// statement refused after taking it).
    fn release_group(&mut self, group: ConversationGroupId) {
        self.locked_groups.remove(&group);
        let one: crate::IdSet<ConversationGroupId> = [group].into_iter().collect();
        self.broker.locks.release(self.id, &one);
        self.broker.signal_unlocked_groups(&one);
    }

    /// Locks the group of loaded endpoint `handle` and returns it. A MOVE committed by another
    /// transaction may change the group until its lock is held (taking it re-reads the endpoint),
    /// so this retries until the group it locked is the endpoint's group.
    fn lock_endpoint_group(&mut self, handle: ConversationHandle) -> Result<ConversationGroupId> {
        self.lock_endpoint_group_newly(handle)
            .map(|(group, _)| group)
    }

    /// [`lock_endpoint_group`](Transaction::lock_endpoint_group), and whether this call took
    /// the lock (it was not held already).
    fn lock_endpoint_group_newly(
        &mut self,
        handle: ConversationHandle,
    ) -> Result<(ConversationGroupId, bool)> {
        loop {
            let group = self.loaded_endpoint(handle)?.group;
            let newly = self.lock_group(group)?;
            if self.loaded_endpoint(handle)?.group == group {
                return Ok((group, newly));
            }
        }
    }

    /// Endpoint `handle` as this transaction sees it; gone if both sides ended (or it was
    /// cleaned up) since it was loaded.
    fn loaded_endpoint(&self, handle: ConversationHandle) -> Result<&Endpoint> {
        self.endpoints
            .get(&handle)
            .ok_or(Error::UnknownConversation(handle))
    }

    /// Locks `group` until this transaction ends; returns whether this call took the lock (it
    /// was not held already).
    fn lock_group(&mut self, group: ConversationGroupId) -> Result<bool> {
        self.broker
            .locks
            .lock(group, self.id, self.lock_timeout(), self.broker.clock())?;
        let newly = self.locked_groups.insert(group);
        if newly {
            self.refresh_endpoints(group);
        }
        Ok(newly)
    }

    /// Re-reads the committed endpoints of `group` that this transaction loaded before it held
    /// the group: until then other transactions could send and receive on them, so the copy may
    /// be stale (a SEND from it would reuse a sequence number); from now on only this
    /// transaction can change them.
    fn refresh_endpoints(&mut self, group: ConversationGroupId) {
        let loaded: Vec<ConversationHandle> = self
            .endpoints
            .values()
            .filter(|e| e.group == group)
            .map(|e| e.handle)
            .collect();
        if loaded.is_empty() {
            return;
        }
        let state = self.broker.state.lock();
        for handle in loaded {
            // Endpoints this transaction created are not committed: nothing to re-read.
            if self.created.contains(&handle) {
                continue;
            }
            match state.endpoints.get(&handle) {
                Some(committed) => {
                    self.endpoints.insert(handle, committed.clone());
                }
                None => {
                    self.endpoints.remove(&handle);
                }
            }
        }
    }

    /// Makes everything this transaction did durable (under the default durability) and visible,
    /// as one log record, then releases its locks. On error nothing was applied and the
    /// transaction is rolled back.
    pub fn commit(self) -> Result<()> {
        self.finish_commit(crate::broker::Wait::Durability)
    }

    /// `commit`, returning once the record is written to the OS and applied, without waiting
    /// for it to be durable (see `BrokerCore::accept_arrivals_written`).
    pub(crate) fn commit_written(self) -> Result<()> {
        self.finish_commit(crate::broker::Wait::Written)
    }

    fn finish_commit(mut self, wait: crate::broker::Wait) -> Result<()> {
        let result = self.write_and_apply(wait);
        if result.is_err() {
            self.put_back_taken();
        }
        self.release_locks();
        self.finished = true;
        let (logged_bytes, outbound) = result?;
        self.broker.after_commit(logged_bytes);
        if !self.received_from.is_empty() {
            self.broker.receive_committed(&self.received_from);
        }
        // With the locks released: the listener may take a while (it hands the new messages to
        // the network on this thread).
        if outbound {
            self.broker.outbound_committed();
        }
        Ok(())
    }

    /// Logs the ops as one record and applies it; returns the record's size and whether the
    /// outbound listener is to be told (see `BrokerCore::log_and_apply_deferred`).
    fn write_and_apply(&mut self, wait: crate::broker::Wait) -> Result<(u64, bool)> {
        if self.record.is_empty() {
            return Ok((0, false));
        }
        let applied = self
            .broker
            .log_and_apply_deferred(self.record.finish(), wait)?;
        self.taken.clear();
        Ok(applied)
    }

    /// Undoes everything: received messages go back to their queues in their original order,
    /// locks are released. Dropping a transaction does the same.
    pub fn rollback(mut self) {
        self.abort();
    }

    fn abort(&mut self) {
        if self.finished {
            return;
        }
        self.put_back_taken();
        self.release_locks();
        self.finished = true;
        if !self.received_from.is_empty() {
            self.broker.receive_rolled_back(&self.received_from);
        }
    }

    fn put_back_taken(&mut self) {
        if self.taken.is_empty() {
            return;
        }
        let mut by_conversation: IdMap<ConversationHandle, Vec<MessageKey>> = IdMap::default();
        for (handle, key) in self.taken.drain(..) {
            by_conversation.entry(handle).or_default().push(key);
        }
        let mut state = self.broker.state.lock();
        for (handle, keys) in by_conversation {
            state.return_taken(handle, &keys);
        }
        let touched = state.take_touched();
        drop(state);
        self.broker.signal_queues(touched);
    }

    fn release_locks(&mut self) {
        self.broker.locks.release(self.id, &self.locked_groups);
        self.broker.signal_unlocked_groups(&self.locked_groups);
        self.locked_groups.clear();
        if self.catalog_mode.take().is_some() {
            self.broker.catalog_lock.release(self.id);
        }
    }
}

/// `Transaction::receive_async`: resolves to the batch (empty once the wait's deadline has
/// passed), or the error that ended the wait.
#[derive(Debug)]
pub struct ReceiveFuture<'t, 'b> {
    tx: &'t mut Transaction<'b>,
    queue: &'t str,
    what: Receive,
    held_catalog: bool,
    deadline_ms: Option<u64>,
    /// Registered on the first poll and kept until the future is dropped: while it exists,
    /// commits into the queue signal it (commits skip signalling when nobody waits).
    waiter: Option<crate::signal::Waiter<'b>>,
    /// This future's registration with the timer thread, while it waits: taken back at each
    /// poll and when it is dropped (left behind, each kept its task's waker alive for good).
    timer: Option<crate::timers::TimerKey>,
    /// This future's registration with its queue's signal (taken back when it is dropped).
    registration: u64,
}

impl Drop for ReceiveFuture<'_, '_> {
    fn drop(&mut self) {
        if let Some(key) = self.timer.take() {
            self.tx.broker.cancel_wake(key);
        }
        if let Some(waiter) = &self.waiter {
            waiter.signal.unregister(self.registration);
        }
    }
}

impl std::future::Future for ReceiveFuture<'_, '_> {
    type Output = Result<Vec<Message>>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.get_mut();
        let broker = this.tx.broker;
        if let Some(key) = this.timer.take() {
            broker.cancel_wake(key);
        }
        let signal = this
            .waiter
            .get_or_insert_with(|| broker.signals.wait_on(this.queue))
            .signal
            .clone();
        loop {
            let seen = signal.generation();
            let batch = match this.tx.receive_once(this.queue, this.what) {
                Ok(batch) => batch,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let Some(timeout) = this.what.wait else {
                return Poll::Ready(Ok(batch));
            };
            if !batch.is_empty() || broker.is_closing() {
                return Poll::Ready(Ok(batch));
            }
            let deadline = *this
                .deadline_ms
                .get_or_insert_with(|| clock::deadline_after(broker.clock(), timeout));
            if broker.clock().now_ms() >= deadline {
                return Poll::Ready(Ok(batch));
            }
            if !this.held_catalog {
                this.tx.release_catalog_lock();
            }
            if signal.register(seen, cx.waker(), this.registration) {
                this.timer = Some(broker.wake_at(deadline, cx.waker()));
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        self.abort();
    }
}
