//! Broker events (Service Broker's "Broker:Queue Disabled", activation and conversation
//! events): a subscription API, each event also logged with `tracing`.
//!
//! Subscribers get a bounded channel: a subscriber that does not keep up loses events (counted
//! in `Subscription::dropped`) rather than holding up commits or growing without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use parking_lot::Mutex;

use crate::ids::ConversationHandle;

/// Events a subscriber may hold unread before newer ones are dropped.
pub const EVENT_QUEUE_CAPACITY_EVENTS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Poison-message protection turned the queue off: five transactions in a row that
    /// received from it rolled back.
    QueueDisabled { queue: String },
    /// Activation started a reader on the queue.
    ActivationStarted { queue: String, reader: u64 },
    /// An activated reader stopped (its queue stayed empty, was disabled, or the broker
    /// closed).
    ActivationStopped { queue: String, reader: u64 },
    /// A conversation endpoint went to ERROR: its far side ended it WITH ERROR (a positive
    /// code) or the broker did (negative, e.g. −8489 when the lifetime expired).
    DialogError {
        handle: ConversationHandle,
        code: i32,
    },
}

/// A subscriber's end: events in the order they happened.
#[derive(Debug)]
pub struct Subscription {
    receiver: Receiver<Event>,
    dropped: Arc<AtomicU64>,
}

impl Subscription {
    /// The next event, waiting at most `timeout`.
    pub fn next_timeout(&self, timeout: Duration) -> Option<Event> {
        self.receiver.recv_timeout(timeout).ok()
    }

    /// The next event if one is waiting.
    pub fn try_next(&self) -> Option<Event> {
        self.receiver.try_recv().ok()
    }

    /// Events this subscriber lost because it held `EVENT_QUEUE_CAPACITY_EVENTS` unread.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub(crate) struct EventHub {
    subscribers: Mutex<Vec<(SyncSender<Event>, Arc<AtomicU64>)>>,
}

impl EventHub {
    pub fn subscribe(&self) -> Subscription {
        let (sender, receiver) = sync_channel(EVENT_QUEUE_CAPACITY_EVENTS);
        let dropped = Arc::new(AtomicU64::new(0));
        self.subscribers.lock().push((sender, dropped.clone()));
        Subscription { receiver, dropped }
    }

    /// Logs `event` and hands it to every subscriber (never waiting for one).
    pub fn publish(&self, event: Event) {
        match &event {
            Event::QueueDisabled { queue } => {
                tracing::warn!(%queue, "queue disabled by poison-message protection")
            }
            Event::ActivationStarted { queue, reader } => {
                tracing::debug!(%queue, reader, "activated reader started")
            }
            Event::ActivationStopped { queue, reader } => {
                tracing::debug!(%queue, reader, "activated reader stopped")
            }
            Event::DialogError { handle, code } => {
                tracing::info!(%handle, code, "conversation error")
            }
        }
        let mut subscribers = self.subscribers.lock();
        subscribers.retain(|(sender, dropped)| match sender.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_subscriber_loses_events_past_its_capacity_and_a_gone_one_is_forgotten() {
        let hub = EventHub::default();
        let slow = hub.subscribe();
        let gone = hub.subscribe();
        drop(gone);
        for i in 0..EVENT_QUEUE_CAPACITY_EVENTS as u64 + 3 {
            hub.publish(Event::ActivationStarted {
                queue: "Q".into(),
                reader: i,
            });
        }
        assert_eq!(hub.subscribers.lock().len(), 1);
        assert_eq!(slow.dropped(), 3);
        assert_eq!(
            slow.try_next(),
            Some(Event::ActivationStarted {
                queue: "Q".into(),
                reader: 0
            })
        );
    }
}
