//! The broker: opens (or creates) a data directory, recovers its state from the newest
//! checkpoint and the log after it, hands out transactions, and checkpoints as the log grows,
//! releasing the log segments nothing needs any more.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use herald_wal::{Durability, Lsn, Wal};
use parking_lot::{Condvar, Mutex};

use crate::checkpoint::{self, CheckpointInfo};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::lock_table::{CatalogLock, LockTable};
use crate::record::{self, KIND_COMMIT};
use crate::state::State;
use crate::transaction::Transaction;

/// A checkpoint waits for the log to grow by this many times the last checkpoint's size: a
/// large backlog's checkpoints then add at most an eighth to the bytes written, and recovery
/// replays at most this many checkpoints' worth of log.
const CHECKPOINT_LOG_GROWTH_FACTOR: u64 = 8;

/// When the log has grown by this many times the checkpoint trigger and the checkpoint thread
/// has still not taken one (starved of CPU, or behind a slow disk), the committing thread takes
/// it itself: the log's size stays bounded by the configuration, not by the scheduler.
const CHECKPOINT_STALL_FACTOR: u64 = 4;

/// Poison-message protection disables a queue after this many rollbacks in a row of
/// transactions that received from it (Service Broker's five).
pub const POISON_ROLLBACKS_MAX: u32 = 5;

/// Compaction re-logs the live bodies of the oldest segment when they fill at most this
/// fraction of it.
const COMPACT_LIVE_FRACTION: u64 = 8;

/// A queue as `Broker::queues` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    pub name: String,
    pub options: crate::QueueOptions,
    /// Messages waiting (or being received by an open transaction).
    pub messages: u64,
    /// Conversation groups with at least one waiting message.
    pub groups_with_messages: u64,
    /// Messages kept by RETENTION (received, or copies of sent ones).
    pub retained_messages: u64,
}

/// A conversation group as `Broker::conversation_groups` reports it (`sys.conversation_groups`
/// plus counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationGroupInfo {
    pub group: crate::ConversationGroupId,
    pub queue: String,
    pub conversations: u64,
    /// Messages waiting (taken by an open RECEIVE included).
    pub messages: u64,
    /// Whether a transaction holds the group's lock now.
    pub locked: bool,
}

/// A message waiting to leave for another broker (`sys.transmission_queue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransmissionQueueRow {
    /// Its place in the queue (the order its SEND committed in).
    pub id: u64,
    pub conversation_handle: crate::ConversationHandle,
    pub to_service: String,
    pub to_broker_instance: Option<crate::BrokerInstanceId>,
    pub from_service: String,
    pub contract: String,
    pub message_type: String,
    pub sequence: u64,
    pub is_end_of_dialog: bool,
    pub is_conversation_error: bool,
    pub body_bytes: u64,
    /// Why it has not gone yet (empty: not attempted yet).
    pub transmission_status: String,
}

/// Name of the engine's lock file in the data directory.
pub const LOCK_FILE_NAME: &str = "LOCK";
/// Name of the file holding the broker instance id, written once when the directory is created.
pub const BROKER_ID_FILE_NAME: &str = "BROKER_ID";

/// How to open a broker.
#[derive(Debug, Clone)]
pub struct Options {
    /// When a commit returns: `Sync` (default) means durable against power loss.
    pub durability: Durability,
    /// How long an operation waits for a conversation group (or the catalog) locked by another
    /// transaction before failing with a lock timeout.
    pub lock_timeout: Duration,
    /// Size of the log's segment files.
    pub segment_bytes: u64,
    /// A checkpoint is taken once the log has grown by this many bytes since the last one (or
    /// by `CHECKPOINT_LOG_GROWTH_FACTOR` times the last checkpoint's size, if larger, so
    /// checkpoints of a large backlog do not dominate the writes).
    pub checkpoint_interval_bytes: u64,
    /// Where time comes from: lock waits, WAITFOR timeouts, conversation timers and dialog
    /// lifetimes all read it. `SystemClock` by default; tests use a `ManualClock`.
    pub clock: Arc<dyn Clock>,
    /// Where the log lives: `None` (the default) is the data directory's `wal/`. Tests give a
    /// [`MemStorage`](herald_wal::MemStorage) to fail the log's I/O under a broker (a full
    /// disk, a failed write) and to take crash images of it; the rest of the broker's files
    /// (lock, instance id, checkpoints) stay in the data directory.
    pub log_storage: Option<Arc<dyn herald_wal::Storage>>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            durability: Durability::Sync,
            lock_timeout: Duration::from_secs(5),
            segment_bytes: herald_wal::format::SEGMENT_BYTES_DEFAULT,
            checkpoint_interval_bytes: herald_wal::format::SEGMENT_BYTES_DEFAULT / 2,
            clock: Arc::new(SystemClock),
            log_storage: None,
        }
    }
}

/// The status of a message whose dialog's far service has no route.
fn no_route_status(far_service: &str) -> String {
    format!("no route to service {far_service:?} yet")
}

/// An open data directory: the catalog, conversations and queues, persisted in one log.
/// Share it by reference between threads; each thread begins its own transactions.
pub struct Broker {
    core: Arc<BrokerCore>,
    /// The checkpoint and timer threads.
    threads: Vec<JoinHandle<()>>,
}

/// What a broker's transactions and its checkpoint thread share.
pub struct BrokerCore {
    pub(crate) wal: Wal,
    pub(crate) state: Mutex<State>,
    /// Signalled whenever records are applied (see `State::apply_in_order`).
    pub(crate) applied: Condvar,
    pub(crate) locks: LockTable,
    pub(crate) catalog_lock: CatalogLock,
    /// Held while arrivals are taken: two callers at once could both begin the same new
    /// dialog, and the second's messages would be reported accepted and lost.
    pub(crate) arrivals: Mutex<()>,
    pub(crate) options: Options,
    next_tx: AtomicU64,
    dir: PathBuf,
    /// Log bytes committed since the last checkpoint.
    log_bytes_since_checkpoint: AtomicU64,
    /// Log growth that calls for the next checkpoint: the interval, or
    /// `CHECKPOINT_LOG_GROWTH_FACTOR` times the last checkpoint's size if larger.
    checkpoint_trigger_bytes: AtomicU64,
    /// Held while a checkpoint is taken; the size of the last one.
    pub(crate) checkpointing: Mutex<u64>,
    /// Wakes the checkpoint thread: (a checkpoint is wanted, the broker is closing).
    checkpoint_wanted: Mutex<(bool, bool)>,
    checkpoint_signal: Condvar,
    /// Wakes for WAITFOR receivers, per queue.
    pub(crate) signals: crate::signal::QueueSignals,
    pub(crate) events: crate::events::EventHub,
    pub(crate) timers: crate::timers::Timers,
    pub(crate) activations: crate::activation::Activations,
    /// Set when the broker closes: waits end, background threads stop.
    closing: std::sync::atomic::AtomicBool,
    /// Keeps this broker subscribed to a manual clock (see `ManualClock::advance`).
    clock_listener: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
    /// Told of commits that changed the transmission queue, instead of `OutboundWaiter`s (see
    /// `set_outbound_listener`).
    pub(crate) outbound_listener: Mutex<Option<OutboundListener>>,
    broker_id: crate::ids::BrokerInstanceId,
    /// `transmission_queue`'s status texts.
    transmission_status: Mutex<TransmissionStatuses>,
    _lock: File,
}

impl std::ops::Deref for Broker {
    type Target = BrokerCore;
    fn deref(&self) -> &BrokerCore {
        &self.core
    }
}

/// What a logged record waits for before it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// What the log's durability says (durable under `Sync`): a commit.
    Durability,
    /// Written to the OS only: for records whose loss to a power failure is harmless.
    Written,
}

/// Called on the committing thread after a commit that changed the transmission queue (see
/// [`BrokerCore::set_outbound_listener`]).
pub type OutboundListener = Arc<dyn Fn(&BrokerCore) + Send + Sync>;

/// Why transmissions have not gone, for `transmission_queue` (network state, not logged).
///
/// Each id names a slot of `texts` rather than holding a shared text (an `Arc`) itself: a text
/// is set for every message of a batch on the node's sender thread and forgotten on its
/// receiver thread (acknowledgement), and an atomic reference count per message, bumped from
/// both threads, cost a cache-line transfer per message. A slot's count is a plain integer
/// under the mutex.
#[derive(Debug, Default)]
struct TransmissionStatuses {
    /// Status text slot by transmission id.
    by_id: crate::ids::IdMap<u64, u32>,
    /// Texts in use, each with how many ids name it; `None` is a free slot (listed in `free`).
    texts: Vec<Option<(Box<str>, u64)>>,
    free: Vec<u32>,
    /// The slot set last.
    last: Option<u32>,
    /// `State::transmissions_dropped` when texts of dropped transmissions were last forgotten.
    pruned_at: u64,
}

impl TransmissionStatuses {
    /// The slot of `text`, taken for `uses` more ids: the slot set last if it still holds the
    /// same text (a status is usually set as it was the time before), else a new one.
    fn slot_for(&mut self, text: &str, uses: u64) -> u32 {
        if let Some(slot) = self.last
            && let Some((held, count)) = &mut self.texts[slot as usize]
            && **held == *text
        {
            *count += uses;
            return slot;
        }
        let entry = Some((Box::from(text), uses));
        let slot = match self.free.pop() {
            Some(slot) => {
                self.texts[slot as usize] = entry;
                slot
            }
            None => {
                self.texts.push(entry);
                (self.texts.len() - 1) as u32
            }
        };
        self.last = Some(slot);
        slot
    }

    /// One id fewer names `slot`; the slot is freed with its last.
    fn release(&mut self, slot: u32) {
        let Some((_, count)) = &mut self.texts[slot as usize] else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.texts[slot as usize] = None;
            self.free.push(slot);
        }
    }

    fn text(&self, id: u64) -> Option<&str> {
        let slot = *self.by_id.get(&id)?;
        self.texts[slot as usize].as_ref().map(|(text, _)| &**text)
    }

    /// Sets `text` for `ids`.
    fn set(&mut self, ids: &[u64], text: &str) {
        if ids.is_empty() {
            return;
        }
        let slot = self.slot_for(text, ids.len() as u64);
        for id in ids {
            if let Some(old) = self.by_id.insert(*id, slot) {
                self.release(old);
            }
        }
    }

    fn forget(&mut self, id: u64) {
        if let Some(slot) = self.by_id.remove(&id) {
            self.release(slot);
        }
    }
}

/// Those of `ids` that are keys of `queue`. A batch's ids are mostly consecutive: then one walk
/// over their range of the queue beats a search of its tree per id.
fn still_queued<V>(queue: &std::collections::BTreeMap<u64, V>, ids: &[u64]) -> Vec<u64> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let (Some(&first), Some(&last)) = (sorted.first(), sorted.last()) else {
        return sorted;
    };
    if last - first > 4 * sorted.len() as u64 {
        sorted.retain(|id| queue.contains_key(id));
        return sorted;
    }
    let mut queued = queue.range(first..=last).map(|(id, _)| *id).peekable();
    sorted.retain(|id| {
        while queued.next_if(|q| q < id).is_some() {}
        queued.peek() == Some(id)
    });
    sorted
}

/// Forgets the texts of transmissions dropped since the last time (a no-op if none were).
fn prune_statuses(state: &crate::state::State, statuses: &mut TransmissionStatuses) {
    if statuses.pruned_at != state.transmissions_dropped {
        statuses.pruned_at = state.transmissions_dropped;
        let gone: Vec<u64> = statuses
            .by_id
            .keys()
            .filter(|id| !state.transmission.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            statuses.forget(id);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("dir", &self.dir).finish()
    }
}

impl std::fmt::Debug for BrokerCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCore")
            .field("dir", &self.dir)
            .finish()
    }
}

impl Broker {
    /// Opens the broker in `dir`, creating it if needed and otherwise recovering exactly the
    /// committed state. Only one broker may have a directory open at a time.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Broker> {
        let dir = dir.as_ref().to_path_buf();
        let io = |what: String, source| Error::Io {
            context: what,
            source,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| io(format!("creating data directory {}", dir.display()), e))?;
        let lock = lock_directory(&dir)?;
        let broker_id = broker_instance_id(&dir)?;
        let image = checkpoint::read(&dir)?;
        let wal_options = herald_wal::Options {
            durability: options.durability,
            segment_bytes: options.segment_bytes,
            replay_from: image.as_ref().map_or(Lsn(0), |i| i.lsn.next()),
            ..herald_wal::Options::default()
        };
        let mut recovery = match &options.log_storage {
            Some(storage) => Wal::recover_storage(storage.clone(), wal_options)?,
            None => Wal::recover(dir.join("wal"), wal_options)?,
        };
        let records = recovery.by_ref().collect::<herald_wal::Result<Vec<_>>>()?;
        let wal = recovery.finish()?;
        let mut state = match image {
            Some(image) => image.into_state(&wal)?,
            None => State::default(),
        };
        // Replay re-applies what happened before: its wake-ups and events are history.
        let _ = state.take_touched();
        // Replayed records apply at the time of the open: tombstones they make linger longer
        // than they would have, never shorter.
        state.now_ms = options.clock.now_ms();
        for record in records {
            if record.kind != KIND_COMMIT {
                return Err(Error::Corruption(format!(
                    "record {} has unknown kind {}",
                    record.lsn, record.kind
                )));
            }
            let ops = record::decode(&record.payload)
                .map_err(|e| Error::Corruption(format!("record {}: {e}", record.lsn)))?;
            state
                .apply_in_order(record.lsn, ops, record.payload, record.position)
                .map_err(|e| Error::Corruption(format!("replaying record {}: {e}", record.lsn)))?;
        }
        let last = Lsn(wal.next_lsn().0 - 1);
        if state.applied_through != last {
            return Err(Error::Corruption(format!(
                "state recovered through LSN {} but the log ends at {last}",
                state.applied_through
            )));
        }
        state.events.clear();
        let _ = state.take_touched();
        let checkpoint_interval_bytes = options.checkpoint_interval_bytes;
        let core = Arc::new(BrokerCore {
            wal,
            state: Mutex::new(state),
            applied: Condvar::new(),
            arrivals: Mutex::new(()),
            locks: LockTable::default(),
            catalog_lock: CatalogLock::default(),
            options,
            next_tx: AtomicU64::new(1),
            dir,
            log_bytes_since_checkpoint: AtomicU64::new(0),
            checkpoint_trigger_bytes: AtomicU64::new(checkpoint_interval_bytes),
            checkpointing: Mutex::new(0),
            checkpoint_wanted: Mutex::new((false, false)),
            checkpoint_signal: Condvar::new(),
            signals: Default::default(),
            events: Default::default(),
            timers: Default::default(),
            activations: Default::default(),
            closing: Default::default(),
            clock_listener: Mutex::new(None),
            outbound_listener: Mutex::new(None),
            broker_id,
            transmission_status: Mutex::new(Default::default()),
            _lock: lock,
        });
        let mut broker = Broker {
            core,
            threads: Vec::new(),
        };
        let spawn = |name: &str, run: fn(&BrokerCore), core: Arc<BrokerCore>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(&core))
                .map_err(|e| Error::Io {
                    context: format!("starting thread {name}"),
                    source: e,
                })
        };
        broker.threads.push(spawn(
            "herald-checkpoint",
            BrokerCore::run_checkpointer,
            broker.core.clone(),
        )?);
        broker.threads.push(spawn(
            "herald-timers",
            BrokerCore::run_timers,
            broker.core.clone(),
        )?);
        if let Some(manual) = broker.core.options.clock.as_manual() {
            // A manual clock moves in steps: fire what each step made due before `advance`
            // returns, and wake waiters to re-check their deadlines.
            let weak = Arc::downgrade(&broker.core);
            let listener: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                if let Some(core) = weak.upgrade() {
                    core.clock_advanced();
                }
            });
            manual.subscribe(&listener);
            *broker.core.clock_listener.lock() = Some(listener);
        }
        // Deadlines that passed while the broker was closed fire now.
        broker.core.fire_due_deadlines();
        Ok(broker)
    }

    /// Begins a transaction. Nothing it does is visible to others before `commit`; dropping it
    /// rolls it back.
    pub fn begin(&self) -> Transaction<'_> {
        self.core.begin()
    }

    /// Writes a checkpoint of the committed state and releases the log segments that hold
    /// nothing the checkpoint or a queued message still needs.
    pub fn checkpoint(&self) -> Result<CheckpointInfo> {
        self.core.checkpoint()
    }

    /// Closes the broker: stops its checkpoint thread, takes a last checkpoint (so the next open
    /// replays little), and syncs and closes the log, reporting what fails. Dropping a broker
    /// does the same minus the checkpoint, without reporting.
    pub fn close(mut self) -> Result<()> {
        self.stop_threads();
        self.core.checkpoint()?;
        let core = Arc::clone(&self.core);
        drop(self);
        match Arc::try_unwrap(core) {
            Ok(core) => core.wal.close().map_err(Error::from),
            // Unreachable: the background threads, the only other holders, have been joined.
            Err(_) => Ok(()),
        }
    }

    /// Stops activation, then the checkpoint and timer threads; ends every WAITFOR.
    fn stop_threads(&mut self) {
        self.core
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.core.signals.wake_all();
        self.core.activations.stop_all();
        *self.core.checkpoint_wanted.lock() = (false, true);
        self.core.checkpoint_signal.notify_all();
        self.core.timers.stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    /// Activates `queue` (see `crate::activation`): up to `options.max_readers` threads run
    /// `handler` on its messages, each batch in its own transaction, committed when the handler
    /// returns `Ok` and rolled back on `Err`.
    pub fn activate<F>(
        &self,
        queue: &str,
        options: crate::ActivationOptions,
        handler: F,
    ) -> Result<()>
    where
        F: Fn(
                &mut Transaction<'_>,
                &[crate::Message],
            ) -> std::result::Result<(), crate::HandlerError>
            + Send
            + Sync
            + 'static,
    {
        self.core.activate(queue, options, Arc::new(handler))
    }

    /// The committed catalog (a copy).
    pub fn catalog(&self) -> crate::catalog::Catalog {
        self.state.lock().catalog.clone()
    }
}

/// Where routing stands (see `BrokerCore::route_changes`): compared, not interpreted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteChanges {
    /// Route changes committed (and dialogs pinned or established) so far.
    committed: u64,
    /// Routes expired by now (an ALTER ROUTE reviving one also counts in `committed`).
    expired: usize,
}

impl BrokerCore {
    /// Begins a transaction (see `Broker::begin`).
    pub fn begin(&self) -> Transaction<'_> {
        Transaction::new(self, self.next_tx.fetch_add(1, Ordering::Relaxed))
    }

    /// Where a new conversation's messages for `service` go now (see `Catalog::route`).
    pub fn route(
        &self,
        service: &str,
        broker_instance: Option<crate::ids::BrokerInstanceId>,
    ) -> crate::catalog::RouteChoice {
        let now = self.clock().now_ms();
        self.state.lock().catalog.route(
            service,
            broker_instance,
            self.broker_id,
            now,
            crate::catalog::ConversationStage::New,
        )
    }

    /// This broker's instance id (Service Broker's `service_broker_guid`).
    pub fn broker_instance(&self) -> crate::ids::BrokerInstanceId {
        self.broker_id
    }

    /// The broker's clock.
    pub fn clock(&self) -> &dyn Clock {
        &*self.options.clock
    }

    /// Whether the broker is closing (waits end early, empty).
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wakes every WAITFOR on every queue to look again: waits whose transaction's interrupt
    /// flag is set end (`Transaction::interrupt_waits_on`); the others wait on.
    pub fn wake_waiters(&self) {
        self.signals.wake_all();
    }

    /// Subscribes to broker events (queue disabled, activation, conversation errors).
    pub fn subscribe(&self) -> crate::events::Subscription {
        self.events.subscribe()
    }

    /// Wakes the waiters of `queues` (something they may receive changed).
    pub(crate) fn signal_queues(&self, queues: Vec<String>) {
        if queues.is_empty() || !self.signals.anyone_waiting() {
            return;
        }
        for queue in queues {
            self.signals.notify(&queue);
        }
    }

    /// A transaction released `groups`: those with messages may now be received by waiters.
    pub(crate) fn signal_unlocked_groups(
        &self,
        groups: &crate::ids::IdSet<crate::ConversationGroupId>,
    ) {
        if groups.is_empty() || !self.signals.anyone_waiting() {
            return;
        }
        let queues: Vec<String> = {
            let state = self.state.lock();
            groups
                .iter()
                .filter_map(|g| state.groups.get(g))
                .filter(|g| g.has_messages())
                .map(|g| g.queue.clone())
                .collect()
        };
        self.signal_queues(queues);
    }

    /// A manual clock moved: fire what came due, wake every waiter to re-check its deadline.
    fn clock_advanced(&self) {
        self.fire_due_deadlines();
        self.timers.wake();
        self.locks.wake_all();
        self.catalog_lock.wake_all();
        self.signals.wake_all();
    }

    /// Poison-message protection: a transaction that received from `queues` rolled back.
    /// The `POISON_ROLLBACKS_MAX`-th rollback in a row disables each such queue that has the
    /// protection on (a logged catalog change), and raises `Event::QueueDisabled`.
    pub(crate) fn receive_rolled_back(&self, queues: &[String]) {
        let to_disable: Vec<String> = {
            let mut state = self.state.lock();
            let mut to_disable = Vec::new();
            for queue in queues {
                let protected = state
                    .catalog
                    .queues
                    .get(queue)
                    .is_some_and(|q| q.options.enabled && q.options.poison_message_handling);
                if !protected {
                    continue;
                }
                let count = state.poison_rollbacks.entry(queue.clone()).or_default();
                *count += 1;
                if *count >= POISON_ROLLBACKS_MAX {
                    to_disable.push(queue.clone());
                }
            }
            to_disable
        };
        for queue in to_disable {
            let op = record::Op::DisableQueue {
                name: queue.clone(),
            };
            match self.log_and_apply(&record::encode(&[op])) {
                Ok(_) => self
                    .events
                    .publish(crate::events::Event::QueueDisabled { queue }),
                Err(e) => tracing::error!(%queue, error = %e, "could not disable a poisoned queue"),
            }
        }
    }

    /// A transaction that received from `queues` committed: their rollback runs end.
    pub(crate) fn receive_committed(&self, queues: &[String]) {
        let mut state = self.state.lock();
        for queue in queues {
            state.poison_rollbacks.remove(queue);
        }
    }

    /// One conversation endpoint, as committed (the `sys.conversation_endpoints` row).
    pub fn conversation_endpoint(
        &self,
        handle: crate::ConversationHandle,
    ) -> Option<crate::ConversationEndpoint> {
        self.state.lock().endpoints.get(&handle).cloned()
    }

    /// The conversation groups, with their conversations and waiting messages.
    pub fn conversation_groups(&self) -> Vec<ConversationGroupInfo> {
        let locked: crate::ids::IdSet<crate::ConversationGroupId> =
            self.locks.owners().into_iter().map(|(g, _)| g).collect();
        let state = self.state.lock();
        let mut groups: Vec<ConversationGroupInfo> = state
            .groups
            .iter()
            .map(|(id, g)| {
                let taken: u64 = g
                    .conversations
                    .keys()
                    .filter_map(|h| state.taken.get(h))
                    .map(|t| t.len() as u64)
                    .sum();
                ConversationGroupInfo {
                    group: *id,
                    queue: g.queue.clone(),
                    conversations: g.conversations.len() as u64,
                    messages: g
                        .conversations
                        .values()
                        .map(|q| q.len() as u64)
                        .sum::<u64>()
                        + taken,
                    locked: locked.contains(id),
                }
            })
            .collect();
        groups.sort_by(|a, b| (&a.queue, a.group.0).cmp(&(&b.queue, b.group.0)));
        groups
    }

    /// The transmission queue (`sys.transmission_queue`): messages waiting to leave for other
    /// brokers, in the order they go, each with why it has not gone yet.
    pub fn transmission_queue(&self) -> Vec<TransmissionQueueRow> {
        let now = self.clock().now_ms();
        // Lock order: state, then the statuses.
        let state = self.state.lock();
        let statuses = self.transmission_status.lock();
        state
            .transmission
            .iter()
            .filter_map(|(id, t)| {
                let endpoint = state.endpoints.get(&t.handle)?;
                let message_type = state.message_type_name(t.message.message_type).to_string();
                let routed = state.catalog.route(
                    &endpoint.far_service,
                    endpoint.far_broker_instance,
                    self.broker_id,
                    now,
                    endpoint.stage(),
                );
                let transmission_status = match routed {
                    crate::catalog::RouteChoice::NoRoute => no_route_status(&endpoint.far_service),
                    _ => statuses.text(*id).unwrap_or_default().to_string(),
                };
                Some(TransmissionQueueRow {
                    id: *id,
                    conversation_handle: t.handle,
                    to_service: endpoint.far_service.to_string(),
                    to_broker_instance: endpoint.far_broker_instance,
                    from_service: endpoint.service.to_string(),
                    contract: endpoint.contract.to_string(),
                    is_end_of_dialog: message_type == crate::system::END_DIALOG,
                    is_conversation_error: message_type == crate::system::ERROR,
                    message_type,
                    sequence: t.sequence,
                    body_bytes: t.message.body.len() as u64,
                    transmission_status,
                })
            })
            .collect()
    }

    /// Drops the status text of transmissions that are gone (acknowledged).
    pub(crate) fn forget_transmission_status(&self, ids: &[u64]) {
        let mut statuses = self.transmission_status.lock();
        if statuses.by_id.is_empty() {
            return;
        }
        for id in ids {
            statuses.forget(*id);
        }
    }

    /// Records why transmissions `ids` have not gone (shown by `transmission_queue`; not
    /// logged: it describes the network's state, not the data's). Ids no longer in the
    /// transmission queue are ignored, and texts of transmissions it dropped since the last
    /// call are forgotten: the texts held never outnumber the queue's messages.
    pub fn set_transmission_status(&self, ids: &[u64], status: &str) {
        let state = self.state.lock();
        let mut statuses = self.transmission_status.lock();
        prune_statuses(&state, &mut statuses);
        statuses.set(&still_queued(&state.transmission, ids), status);
    }

    /// Forgets the status texts of transmissions the queue dropped unacknowledged (done by
    /// every `set_transmission_status` too).
    pub fn prune_transmission_statuses(&self) {
        let state = self.state.lock();
        prune_statuses(&state, &mut self.transmission_status.lock());
    }

    /// Status texts held (at most one per message in the transmission queue).
    pub fn transmission_statuses_held(&self) -> usize {
        self.transmission_status.lock().by_id.len()
    }

    /// Remote conversations ended here that are remembered, for `CLOSED_CONVERSATION_LINGER_MS`,
    /// so that their late messages are dropped as duplicates.
    pub fn closed_conversations_held(&self) -> usize {
        self.state.lock().closed.len()
    }

    /// Messages in the transmission queue (`transmission_queue().len()` without building rows).
    pub fn transmission_queue_len(&self) -> usize {
        self.state.lock().transmission.len()
    }

    /// Grows each time messages leave the transmission queue without being acknowledged (their
    /// dialog ended with an error or cleanup, or its lifetime passed): when it changed, those
    /// handed to the network should be withdrawn (see `transmissions_gone`).
    pub fn transmission_drops(&self) -> u64 {
        self.state.lock().transmissions_dropped
    }

    /// Changes each time a commit creates, alters or drops a route, each time a dialog is
    /// pinned or established while routes it could match differently exist, and each time a
    /// route expires: when it changed, messages of the transmission queue that had no route (or
    /// went elsewhere) should be routed again.
    pub fn route_changes(&self) -> RouteChanges {
        let now = self.clock().now_ms();
        let state = self.state.lock();
        RouteChanges {
            committed: state.route_changes,
            expired: state
                .catalog
                .routes
                .values()
                .filter(|route| route.expires_at_ms.is_some_and(|at| at <= now))
                .count(),
        }
    }

    /// Those of `ids` that are no longer in the transmission queue (acknowledged or dropped).
    pub fn transmissions_gone(&self, ids: &[u64]) -> Vec<u64> {
        let state = self.state.lock();
        ids.iter()
            .copied()
            .filter(|id| !state.transmission.contains_key(id))
            .collect()
    }

    /// All conversation endpoints, as committed.
    /// How many messages of the transmission queue have each status text, as
    /// [`transmission_queue`](Self::transmission_queue) shows them, counted without making its
    /// rows: `herald status` asks this of a queue of any size, under the state lock.
    pub fn transmission_status_counts(&self) -> Vec<(String, u64)> {
        let now = self.clock().now_ms();
        let state = self.state.lock();
        let statuses = self.transmission_status.lock();
        // A dialog's messages share its route: looked up once per dialog.
        let mut routed: crate::IdMap<crate::ConversationHandle, bool> = Default::default();
        let mut no_route: HashMap<&str, u64> = HashMap::new();
        let mut texts: HashMap<&str, u64> = HashMap::new();
        for (id, t) in &state.transmission {
            let Some(endpoint) = state.endpoints.get(&t.handle) else {
                continue;
            };
            let has_route = *routed.entry(t.handle).or_insert_with(|| {
                !matches!(
                    state.catalog.route(
                        &endpoint.far_service,
                        endpoint.far_broker_instance,
                        self.broker_id,
                        now,
                        endpoint.stage(),
                    ),
                    crate::catalog::RouteChoice::NoRoute
                )
            });
            if has_route {
                *texts
                    .entry(statuses.text(*id).unwrap_or_default())
                    .or_default() += 1;
            } else {
                *no_route.entry(&endpoint.far_service).or_default() += 1;
            }
        }
        let mut counts: HashMap<String, u64> = texts
            .into_iter()
            .map(|(text, count)| (text.to_owned(), count))
            .collect();
        for (service, count) in no_route {
            *counts.entry(no_route_status(service)).or_default() += count;
        }
        counts.into_iter().collect()
    }

    /// How many conversation endpoints are in each state (the states with none left out).
    pub fn endpoint_state_counts(&self) -> Vec<(crate::EndpointState, u64)> {
        let mut counts = [0u64; crate::EndpointState::ALL.len()];
        for endpoint in self.state.lock().endpoints.values() {
            let at = crate::EndpointState::ALL
                .iter()
                .position(|state| *state == endpoint.state)
                .expect("ALL lists every state");
            counts[at] += 1;
        }
        crate::EndpointState::ALL
            .into_iter()
            .zip(counts)
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    pub fn conversation_endpoints(&self) -> Vec<crate::ConversationEndpoint> {
        self.state.lock().endpoints.values().cloned().collect()
    }

    /// The queues with their status and depth (`sys.service_queues` plus a count): messages
    /// taken by a RECEIVE that has not committed still count, as they are still queued.
    pub fn queues(&self) -> Vec<QueueInfo> {
        let state = self.state.lock();
        let mut depths: std::collections::HashMap<&str, (u64, u64, u64)> = Default::default();
        for group in state.groups.values() {
            let waiting: u64 = group.conversations.values().map(|q| q.len() as u64).sum();
            let retained: u64 = group
                .conversations
                .values()
                .map(|q| q.retained().len() as u64)
                .sum();
            let entry = depths.entry(group.queue.as_str()).or_default();
            entry.0 += waiting;
            entry.1 += u64::from(waiting > 0);
            entry.2 += retained;
        }
        for (handle, taken) in &state.taken {
            let queue = state
                .endpoints
                .get(handle)
                .and_then(|e| state.groups.get(&e.group))
                .map(|g| g.queue.as_str());
            if let Some(queue) = queue {
                depths.entry(queue).or_default().0 += taken.len() as u64;
            }
        }
        state
            .catalog
            .queues
            .values()
            .map(|q| {
                let (messages, groups_with_messages, retained_messages) =
                    depths.get(q.name.as_str()).copied().unwrap_or_default();
                QueueInfo {
                    name: q.name.clone(),
                    options: q.options,
                    messages,
                    groups_with_messages,
                    retained_messages,
                }
            })
            .collect()
    }

    /// The messages in `queue`, in queuing order, without locking or consuming anything
    /// (SELECT on a queue): those waiting (status `Ready`) and those kept by RETENTION
    /// (`Received`, `SentCopy`). Messages being received by an open transaction are not shown.
    pub fn peek(&self, queue: &str) -> Result<Vec<crate::Message>> {
        let state = self.state.lock();
        state.catalog.queue(queue)?;
        let mut messages = Vec::new();
        for (group, g) in state.groups.iter().filter(|(_, g)| g.queue == queue) {
            for (handle, q) in &g.conversations {
                let row = |sequence, m: &crate::state::QueuedMessage, status| {
                    crate::Message::new(
                        *handle,
                        *group,
                        state.message_type_name(m.message_type).clone(),
                        sequence,
                        m.queuing_order,
                        status,
                        m.body.clone(),
                    )
                };
                for (key, m) in q.iter() {
                    messages.push(row(key.sequence(), m, crate::MessageStatus::Ready));
                }
                for r in q.retained() {
                    messages.push(row(r.sequence, &r.message, r.status));
                }
            }
        }
        messages.sort_unstable_by_key(|m| m.queuing_order);
        Ok(messages)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn checkpoint(&self) -> Result<CheckpointInfo> {
        let mut last_size = self.checkpointing.lock();
        self.take_checkpoint(&mut last_size)
    }

    fn take_checkpoint(&self, last_size: &mut u64) -> Result<CheckpointInfo> {
        self.log_bytes_since_checkpoint.store(0, Ordering::Relaxed);
        let applied = self.state.lock().applied_through;
        // Compaction only lets the log shrink sooner: its failure must not stop the checkpoint
        // (and what a checkpoint releases).
        if let Err(e) = self.compact_oldest_segment(applied) {
            tracing::warn!(error = %e, "could not compact the oldest log segment");
        }
        let (bytes, oldest_body_segment, lsn) = {
            let state = self.state.lock();
            let (bytes, oldest) = checkpoint::encode(&state);
            (bytes, oldest, state.applied_through)
        };
        // The checkpoint must never be ahead of what the log holds durably.
        self.wal.wait_durable(lsn)?;
        checkpoint::write(&self.dir, &bytes)?;
        *last_size = bytes.len() as u64;
        self.checkpoint_trigger_bytes.store(
            self.options
                .checkpoint_interval_bytes
                .max(CHECKPOINT_LOG_GROWTH_FACTOR * *last_size),
            Ordering::Relaxed,
        );
        let keep_from = oldest_body_segment.map_or(lsn.next(), |oldest| oldest.min(lsn.next()));
        let released = self.wal.release_before(keep_from)?;
        tracing::debug!(%lsn, bytes = bytes.len(), released, "checkpoint taken");
        Ok(CheckpointInfo {
            lsn,
            bytes: bytes.len() as u64,
            oldest_body_segment,
        })
    }

    /// Called after every commit (its locks already released) with the size of its record:
    /// once the log has grown by the trigger, wakes the checkpoint thread; commits do not wait
    /// for it unless it has fallen `CHECKPOINT_STALL_FACTOR` triggers behind, when the
    /// committer takes the checkpoint itself.
    pub(crate) fn after_commit(&self, logged_bytes: u64) {
        let grown = self
            .log_bytes_since_checkpoint
            .fetch_add(logged_bytes, Ordering::Relaxed)
            + logged_bytes;
        let trigger = self.checkpoint_trigger_bytes.load(Ordering::Relaxed);
        if grown < trigger {
            return;
        }
        self.checkpoint_wanted.lock().0 = true;
        self.checkpoint_signal.notify_one();
        if grown >= CHECKPOINT_STALL_FACTOR * trigger {
            let mut last_size = self.checkpointing.lock();
            // Another thread may have taken it while this one waited for the lock.
            let still_behind = self.log_bytes_since_checkpoint.load(Ordering::Relaxed)
                >= CHECKPOINT_STALL_FACTOR * self.checkpoint_trigger_bytes.load(Ordering::Relaxed);
            if still_behind && let Err(e) = self.take_checkpoint(&mut last_size) {
                tracing::warn!(error = %e, "checkpoint failed; will retry");
            }
        }
    }

    /// The checkpoint thread: takes a checkpoint when the log has grown by the trigger. A
    /// failure (a full disk, say) is logged; the log keeps everything, and the next wake-up
    /// tries again.
    pub(crate) fn run_checkpointer(&self) {
        loop {
            {
                let mut wanted = self.checkpoint_wanted.lock();
                while !wanted.0 && !wanted.1 {
                    self.checkpoint_signal.wait(&mut wanted);
                }
                if wanted.1 {
                    return;
                }
                wanted.0 = false;
            }
            let mut last_size = self.checkpointing.lock();
            if self.log_bytes_since_checkpoint.load(Ordering::Relaxed)
                < self.checkpoint_trigger_bytes.load(Ordering::Relaxed)
            {
                continue;
            }
            if let Err(e) = self.take_checkpoint(&mut last_size) {
                tracing::warn!(error = %e, "checkpoint failed; will retry");
            }
        }
    }

    /// Logs `ops` as one commit record and applies it (in LSN order with every other commit);
    /// returns the record's size. Used by every transaction's commit and by compaction.
    pub(crate) fn log_and_apply(&self, payload: &[u8]) -> Result<u64> {
        let (logged_bytes, outbound) = self.log_and_apply_deferred(payload, Wait::Durability)?;
        if outbound {
            self.outbound_committed();
        }
        Ok(logged_bytes)
    }

    /// `log_and_apply` of a record whose loss to a power failure is harmless, so that it need
    /// not wait for the log's durability: returns once it is written to the OS (safe from a
    /// crash of this process) and applied. It becomes durable with the next commit that syncs
    /// (every sync covers every record before its own) or the next checkpoint.
    pub(crate) fn log_and_apply_written(&self, payload: &[u8]) -> Result<u64> {
        let (logged_bytes, outbound) = self.log_and_apply_deferred(payload, Wait::Written)?;
        if outbound {
            self.outbound_committed();
        }
        Ok(logged_bytes)
    }

    /// `log_and_apply`, leaving the outbound listener to the caller: returns, besides the
    /// record's size, whether it must call `outbound_committed` (once it holds no locks a
    /// listener could wait for). On an error the listener has already been called.
    pub(crate) fn log_and_apply_deferred(&self, payload: &[u8], wait: Wait) -> Result<(u64, bool)> {
        if let Some(reason) = &self.state.lock().broken {
            return Err(Error::Corruption(reason.clone()));
        }
        let max = self.wal.record_payload_bytes_max() as usize;
        if payload.len() > max {
            return Err(Error::TransactionTooLarge {
                len: payload.len(),
                max,
            });
        }
        let appended = match wait {
            Wait::Durability => self.wal.commit(KIND_COMMIT, payload)?,
            Wait::Written => self.wal.append(KIND_COMMIT, payload)?,
        };
        let logged = self.wal.appended_payload(&appended)?;
        // Decode the copy in hand, not the mapped one: touching every page of the map would
        // fault each in for nothing (receivers read the bodies through the map later).
        let ops = record::decode(payload)
            .map_err(|e| Error::Corruption(format!("own commit record {}: {e}", appended.lsn)))?;
        let mut state = self.state.lock();
        let next_deadline = state.deadlines.first().map(|d| d.0);
        state.now_ms = self.clock().now_ms();
        let applied = state.apply_in_order(appended.lsn, ops, logged, appended.position);
        self.applied.notify_all();
        let mut touched = state.take_touched();
        let events = std::mem::take(&mut state.events);
        let deadlines_moved = state.deadlines.first().map(|d| d.0) != next_deadline;
        let done = state.applied_through >= appended.lsn;
        drop(state);
        let outbound = self.take_outbound_signal(&mut touched);
        // Wake waiters with no lock held, so that what they wake for is not held up by this
        // thread (a woken receiver needs the state lock at once).
        self.signal_queues(touched);
        for event in events {
            self.events.publish(event);
        }
        if deadlines_moved {
            self.timers.wake();
        }
        if let Err(e) = applied {
            if outbound {
                self.outbound_committed();
            }
            return Err(e);
        }
        if done {
            return Ok((payload.len() as u64, outbound));
        }
        // The caller releases its locks only once its record is applied, so the next owner of a
        // group sees it: wait for the records before it, which their committers are applying.
        let mut state = self.state.lock();
        while state.applied_through < appended.lsn {
            if let Some(reason) = &state.broken {
                let reason = reason.clone();
                drop(state);
                if outbound {
                    self.outbound_committed();
                }
                return Err(Error::Corruption(reason));
            }
            self.applied.wait(&mut state);
        }
        Ok((payload.len() as u64, outbound))
    }

    /// With an outbound listener set, takes the transmission queue's signal out of `touched`
    /// (the listener is told instead of the waiters) and says whether it was there.
    fn take_outbound_signal(&self, touched: &mut Vec<String>) -> bool {
        if !touched
            .iter()
            .any(|q| q == crate::state::TRANSMISSION_SIGNAL)
            || self.outbound_listener.lock().is_none()
        {
            return false;
        }
        touched.retain(|q| q != crate::state::TRANSMISSION_SIGNAL);
        true
    }

    /// Tells the outbound listener that a commit changed the transmission queue (or, if it
    /// was removed meanwhile, wakes the `OutboundWaiter`s as commits do without one).
    pub(crate) fn outbound_committed(&self) {
        let listener = self.outbound_listener.lock().clone();
        match listener {
            Some(listener) => listener(self),
            None => self.wake_outbound(),
        }
    }

    /// Compaction: when the oldest log segment still holding queued bodies holds only a few
    /// (at most `1 / COMPACT_LIVE_FRACTION` of a segment) and pins later segments, re-logs those
    /// bodies at the head of the log so that the next checkpoint can release it.
    fn compact_oldest_segment(&self, checkpoint_lsn: Lsn) -> Result<usize> {
        let ops = {
            let state = self.state.lock();
            let live = checkpoint::live_bodies_by_segment(&state);
            let Some((&oldest, &(_, live_bytes))) = live.iter().next() else {
                return Ok(0);
            };
            let segments = self.wal.segments();
            let pins_others = segments
                .iter()
                .any(|s| s.first_lsn > oldest && s.first_lsn <= checkpoint_lsn);
            let segment_bytes = segments
                .iter()
                .find(|s| s.first_lsn == oldest)
                .map_or(self.options.segment_bytes, |s| s.segment_bytes);
            if !pins_others || live_bytes > segment_bytes / COMPACT_LIVE_FRACTION {
                return Ok(0);
            }
            checkpoint::relocations_from_segment(&state, oldest)
        };
        // In as many records as they take: the segment's live bodies are few bytes (checked
        // above), but each relocation costs its op's bytes too, and a segment of many small or
        // empty messages (or retained ones, counted twice) took more than one record — which
        // failed, and with it every checkpoint after, for good (the same segment was chosen
        // each time). A relocation is one message's: records may split them anywhere.
        let record_max = self.wal.record_payload_bytes_max() as usize;
        let mut relocated = 0;
        let mut builder = record::RecordBuilder::new();
        for op in &ops {
            let mark = builder.mark();
            builder.push(op);
            if builder.len_bytes() <= record_max {
                continue;
            }
            builder.rewind(mark);
            if !builder.is_empty() {
                self.log_and_apply(builder.finish())?;
                relocated += builder.op_count() as usize;
            }
            builder = record::RecordBuilder::new();
            builder.push(op);
            if builder.len_bytes() > record_max {
                // Too large to move alone (a body as large as records allow): it stays.
                builder = record::RecordBuilder::new();
            }
        }
        if !builder.is_empty() {
            self.log_and_apply(builder.finish())?;
            relocated += builder.op_count() as usize;
        }
        tracing::debug!(relocated, "compacted the oldest log segment");
        Ok(relocated)
    }

    /// Bytes of log segment files on disk now.
    pub fn log_bytes_on_disk(&self) -> u64 {
        self.wal.segments().iter().map(|s| s.segment_bytes).sum()
    }

    /// Records written to the log since it began (the LSN the next one gets, less one).
    pub fn log_records_written(&self) -> u64 {
        self.wal.next_lsn().0 - 1
    }
}

/// Reads the broker instance id of `dir`, creating it (atomically and durably) the first time.
fn broker_instance_id(dir: &Path) -> Result<crate::ids::BrokerInstanceId> {
    let path = dir.join(BROKER_ID_FILE_NAME);
    let io = |what: &str, source| Error::Io {
        context: format!("{what} {}", path.display()),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => crate::ids::BrokerInstanceId::parse(&text).ok_or_else(|| {
            Error::Corruption(format!(
                "{} does not hold a broker instance id (a UUID): {:?}",
                path.display(),
                text.chars().take(64).collect::<String>()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = crate::ids::BrokerInstanceId::random();
            let tmp = dir.join(format!("{BROKER_ID_FILE_NAME}.tmp"));
            let mut file = File::create(&tmp).map_err(|e| io("creating", e))?;
            std::io::Write::write_all(&mut file, format!("{id}\n").as_bytes())
                .map_err(|e| io("writing", e))?;
            file.sync_all().map_err(|e| io("syncing", e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io("renaming to", e))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("syncing the directory of", e))?;
            Ok(id)
        }
        Err(e) => Err(io("reading", e)),
    }
}

/// Takes the engine's exclusive lock on `dir` (the log has its own, inside `wal/`; this one also
/// covers the checkpoint, which is read before the log is opened).
fn lock_directory(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE_NAME);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::Io {
            context: format!("opening {}", path.display()),
            source: e,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::Io {
            context: format!("locking {}", path.display()),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::TransmissionStatuses;

    fn slots_in_use(statuses: &TransmissionStatuses) -> usize {
        statuses.texts.iter().filter(|t| t.is_some()).count()
    }

    #[test]
    fn a_status_text_is_kept_while_some_id_names_it() {
        let mut statuses = TransmissionStatuses::default();
        statuses.set(&[1, 2, 3], "sent to A");
        statuses.set(&[4, 5], "sent to A");
        assert_eq!(
            slots_in_use(&statuses),
            1,
            "the same text again shares the slot"
        );
        statuses.set(&[2], "A unreachable");
        assert_eq!(statuses.text(2), Some("A unreachable"));
        assert_eq!(statuses.text(1), Some("sent to A"));
        assert_eq!(statuses.text(9), None);
        for id in [1, 3, 4] {
            statuses.forget(id);
        }
        assert_eq!(statuses.text(5), Some("sent to A"), "one id still names it");
        statuses.forget(5);
        assert_eq!(slots_in_use(&statuses), 1, "only 'unreachable' is left");
        statuses.forget(5);
        statuses.forget(2);
        assert_eq!(slots_in_use(&statuses), 0);
        assert!(statuses.by_id.is_empty());
    }

    #[test]
    fn still_queued_keeps_the_ids_in_the_queue_whatever_their_spread() {
        let queue: std::collections::BTreeMap<u64, ()> = [3, 4, 5, 7, 9, 1000]
            .into_iter()
            .map(|id| (id, ()))
            .collect();
        // Dense (one walk), with duplicates and ids outside the queue; then sparse (searches).
        assert_eq!(
            super::still_queued(&queue, &[9, 4, 6, 3, 4, 10, 2]),
            [3, 4, 4, 9]
        );
        assert_eq!(super::still_queued(&queue, &[1000, 1, 5]), [5, 1000]);
        assert!(super::still_queued(&queue, &[]).is_empty());
    }

    #[test]
    fn freed_slots_are_reused_so_texts_stay_bounded_by_the_ids() {
        let mut statuses = TransmissionStatuses::default();
        for round in 0..1000u64 {
            statuses.set(&[round, round], &format!("not sent: error {round}"));
            statuses.forget(round);
        }
        assert!(statuses.texts.len() <= 1, "{} slots", statuses.texts.len());
        statuses.set(&[7, 8], "x");
        statuses.set(&[7], "y");
        statuses.set(&[8], "y");
        assert_eq!(slots_in_use(&statuses), 1, "'x' went with its last id");
        assert_eq!(statuses.text(8), Some("y"));
    }
}
