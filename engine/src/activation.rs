//! Internal activation (Service Broker's activated stored procedures, as Rust closures): a
//! queue monitor starts reader threads that receive and run a handler, one transaction per
//! batch — committed when the handler returns `Ok`, rolled back on `Err` (or a panic).
//!
//! When a reader starts (Service Broker's "is activation necessary?"): a message is ready
//! and no reader runs; or messages are ready, no reader is waiting in RECEIVE (all are busy
//! in the handler: they are not keeping up), and fewer than `max_readers` run. Group locking
//! bounds this by itself: a backlog on one conversation group starts at most one extra
//! reader, which then waits (counts as waiting), so no more start. A reader exits when its
//! WAITFOR receive has found nothing for `idle_timeout`, when the queue is disabled or
//! dropped, or when activation stops.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::broker::BrokerCore;
use crate::clock;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::transaction::{Message, Receive, Transaction};

/// What an activation handler may fail with: the batch's transaction rolls back.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The work of an activated reader: called with each received batch (one conversation group)
/// and the transaction that received it, which commits if the handler returns `Ok`.
pub type Handler =
    Arc<dyn Fn(&mut Transaction<'_>, &[Message]) -> Result<(), HandlerError> + Send + Sync>;

/// Most readers one queue may run (Service Broker's MAX_QUEUE_READERS is a smallint).
pub const ACTIVATION_READERS_MAX: usize = 32_767;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationOptions {
    /// Readers running at most (1..=`ACTIVATION_READERS_MAX`).
    pub max_readers: usize,
    /// Messages a reader receives per batch at most (RECEIVE TOP).
    pub batch_messages: usize,
    /// A reader whose WAITFOR receive finds nothing for this long exits (Service Broker's
    /// advice for activated procedures: about half a second).
    pub idle_timeout: Duration,
}

impl ActivationOptions {
    pub fn new(max_readers: usize) -> ActivationOptions {
        ActivationOptions {
            max_readers,
            batch_messages: 100,
            idle_timeout: Duration::from_millis(500),
        }
    }
}

/// An activated reader, as `Broker::activated_readers` reports it
/// (`sys.dm_broker_activated_tasks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivatedReader {
    pub queue: String,
    pub reader: u64,
    /// When it started, on the broker's clock (milliseconds since the UNIX epoch).
    pub started_at_ms: u64,
    /// Batches its handler committed, and the messages in them.
    pub batches_committed: u64,
    pub messages_committed: u64,
    /// Batches rolled back (handler error or panic, or a failed commit).
    pub batches_rolled_back: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Activations {
    by_queue: Mutex<HashMap<String, Arc<QueueActivation>>>,
    next_reader: std::sync::atomic::AtomicU64,
}

struct QueueActivation {
    queue: String,
    options: ActivationOptions,
    handler: Handler,
    state: Mutex<ActivationState>,
}

impl std::fmt::Debug for QueueActivation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueActivation")
            .field("queue", &self.queue)
            .field("options", &self.options)
            .finish()
    }
}

#[derive(Debug, Default)]
struct ActivationState {
    stopping: bool,
    readers: HashMap<u64, ActivatedReader>,
    /// Readers inside their WAITFOR receive now.
    waiting: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Activations {
    /// Stops every activation and waits for its threads (the broker is closing).
    pub fn stop_all(&self) {
        let all: Vec<Arc<QueueActivation>> = self.by_queue.lock().drain().map(|(_, a)| a).collect();
        for activation in all {
            activation.stop_and_join();
        }
    }
}

impl QueueActivation {
    fn stopping(&self) -> bool {
        self.state.lock().stopping
    }

    fn stop_and_join(&self) {
        self.state.lock().stopping = true;
        // Readers and the monitor notice at their next wake-up; `BrokerCore` woke them.
        loop {
            let threads = std::mem::take(&mut self.state.lock().threads);
            if threads.is_empty() {
                return;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

impl BrokerCore {
    /// Activates `queue`: from now on, readers run `handler` on its messages as described in
    /// the module documentation, until `deactivate` or the broker closes.
    pub fn activate(
        self: &Arc<Self>,
        queue: &str,
        options: ActivationOptions,
        handler: Handler,
    ) -> Result<()> {
        if !(1..=ACTIVATION_READERS_MAX).contains(&options.max_readers)
            || options.batch_messages == 0
        {
            return Err(Error::InvalidActivation(format!(
                "max_readers must be 1..={ACTIVATION_READERS_MAX} and batch_messages above 0, \
                 not {} and {}",
                options.max_readers, options.batch_messages
            )));
        }
        self.state.lock().catalog.queue(queue)?;
        let activation = Arc::new(QueueActivation {
            queue: queue.to_owned(),
            options,
            handler,
            state: Mutex::new(ActivationState::default()),
        });
        {
            let mut by_queue = self.activations.by_queue.lock();
            if by_queue.contains_key(queue) {
                return Err(Error::InvalidActivation(format!(
                    "queue {queue:?} is already activated"
                )));
            }
            by_queue.insert(queue.to_owned(), activation.clone());
        }
        let core = self.clone();
        let monitor_activation = activation.clone();
        let monitor = std::thread::Builder::new()
            .name(format!("herald-activation-{queue}"))
            .spawn(move || core.run_monitor(&monitor_activation))
            .map_err(|e| Error::Io {
                context: "starting an activation monitor".into(),
                source: e,
            })?;
        activation.state.lock().threads.push(monitor);
        Ok(())
    }

    /// Stops activation of `queue`: no reader starts any more; running readers finish their
    /// batch and exit. Returns once they have.
    pub fn deactivate(&self, queue: &str) -> Result<()> {
        let activation = self
            .activations
            .by_queue
            .lock()
            .remove(queue)
            .ok_or_else(|| Error::InvalidActivation(format!("queue {queue:?} is not activated")))?;
        activation.state.lock().stopping = true;
        self.signals.wake_all();
        activation.stop_and_join();
        Ok(())
    }

    /// The activated readers running now (`sys.dm_broker_activated_tasks`).
    pub fn activated_readers(&self) -> Vec<ActivatedReader> {
        let activations: Vec<Arc<QueueActivation>> =
            self.activations.by_queue.lock().values().cloned().collect();
        let mut readers: Vec<ActivatedReader> = activations
            .iter()
            .flat_map(|a| a.state.lock().readers.values().cloned().collect::<Vec<_>>())
            .collect();
        readers.sort_by_key(|r| r.reader);
        readers
    }

    /// The queue monitor: re-evaluates whenever the queue's signal moves.
    fn run_monitor(self: &Arc<Self>, activation: &Arc<QueueActivation>) {
        let waiter = self.signals.wait_on(&activation.queue);
        loop {
            let seen = waiter.signal.generation();
            if activation.stopping() || self.is_closing() {
                return;
            }
            if self.activation_needed(activation) {
                self.start_reader(activation);
                // Look again at once: the new reader may not be enough.
                continue;
            }
            waiter.signal.wait_past(seen, u64::MAX, self.clock());
        }
    }

    fn activation_needed(&self, activation: &QueueActivation) -> bool {
        let ready = {
            let state = self.state.lock();
            let enabled = state
                .catalog
                .queues
                .get(&activation.queue)
                .is_some_and(|q| q.options.enabled);
            enabled && state.ready_groups(&activation.queue).next().is_some()
        };
        let state = activation.state.lock();
        ready
            && !state.stopping
            && (state.readers.is_empty()
                || (state.waiting == 0 && state.readers.len() < activation.options.max_readers))
    }

    fn start_reader(self: &Arc<Self>, activation: &Arc<QueueActivation>) {
        let reader = self
            .activations
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let info = ActivatedReader {
            queue: activation.queue.clone(),
            reader,
            started_at_ms: self.clock().now_ms(),
            batches_committed: 0,
            messages_committed: 0,
            batches_rolled_back: 0,
        };
        let mut state = activation.state.lock();
        state.readers.insert(reader, info);
        // Counted as waiting from the start, so the monitor does not start another before this
        // one has even looked at the queue.
        state.waiting += 1;
        let core = self.clone();
        let reader_activation = activation.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("herald-reader-{}-{reader}", activation.queue))
            .spawn(move || core.run_reader(&reader_activation, reader));
        match spawned {
            Ok(thread) => {
                state.threads.push(thread);
                drop(state);
                self.events.publish(Event::ActivationStarted {
                    queue: activation.queue.clone(),
                    reader,
                });
            }
            Err(e) => {
                state.readers.remove(&reader);
                state.waiting -= 1;
                tracing::error!(queue = %activation.queue, error = %e, "could not start a reader");
            }
        }
    }

    fn run_reader(&self, activation: &QueueActivation, reader: u64) {
        /// Unregisters the reader however it ends (a panicking handler included).
        struct Exit<'a> {
            core: &'a BrokerCore,
            activation: &'a QueueActivation,
            reader: u64,
            waiting: bool,
        }
        impl Drop for Exit<'_> {
            fn drop(&mut self) {
                let mut state = self.activation.state.lock();
                state.readers.remove(&self.reader);
                if self.waiting {
                    state.waiting -= 1;
                }
                drop(state);
                self.core.events.publish(Event::ActivationStopped {
                    queue: self.activation.queue.clone(),
                    reader: self.reader,
                });
                // The monitor looks again: messages may be left that need a reader.
                self.core.signals.notify(&self.activation.queue);
            }
        }
        let mut exit = Exit {
            core: self,
            activation,
            reader,
            waiting: true,
        };
        let options = activation.options;
        loop {
            let mut tx = self.begin();
            if !exit.waiting {
                activation.state.lock().waiting += 1;
                exit.waiting = true;
            }
            let deadline = clock::deadline_after(self.clock(), options.idle_timeout);
            let received = tx.receive_until(
                &activation.queue,
                Receive::top(options.batch_messages),
                deadline,
                &|| activation.stopping(),
            );
            activation.state.lock().waiting -= 1;
            exit.waiting = false;
            let batch = match received {
                Ok(batch) if batch.is_empty() => return,
                Ok(batch) => {
                    // This reader is busy now: the monitor decides whether another is needed.
                    self.signals.notify(&activation.queue);
                    batch
                }
                Err(e) => {
                    tracing::info!(queue = %activation.queue, error = %e, "activated reader stops");
                    return;
                }
            };
            let outcome = (activation.handler)(&mut tx, &batch);
            let committed = match outcome {
                Ok(()) => match tx.commit() {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(queue = %activation.queue, error = %e, "activated batch failed to commit");
                        false
                    }
                },
                Err(e) => {
                    tracing::info!(queue = %activation.queue, error = %e, "activation handler failed; batch rolled back");
                    drop(tx);
                    false
                }
            };
            let mut state = activation.state.lock();
            if let Some(info) = state.readers.get_mut(&reader) {
                if committed {
                    info.batches_committed += 1;
                    info.messages_committed += batch.len() as u64;
                } else {
                    info.batches_rolled_back += 1;
                }
            }
            if state.stopping {
                return;
            }
        }
    }
}
