//! Wake-ups for WAITFOR: each queue someone waits on has a signal whose generation moves
//! whenever something that might let a RECEIVE succeed happens there — a message committed
//! into it, messages returned by a rollback, a group with messages unlocked, the queue
//! altered or dropped. A waiter reads the generation *before* it tries to receive, so a change
//! between its empty attempt and its sleep is never missed; it sleeps on a condition variable
//! (threads) or leaves a `Waker` (futures). No polling.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;

use parking_lot::{Condvar, Mutex};

use crate::clock::{self, Clock};

#[derive(Debug, Default)]
pub(crate) struct QueueSignals {
    by_queue: Mutex<HashMap<String, Arc<QueueSignal>>>,
    /// Waiters on any queue now: when none, commits skip signalling altogether.
    waiting: AtomicUsize,
}

#[derive(Debug, Default)]
pub(crate) struct QueueSignal {
    generation: Mutex<u64>,
    changed: Condvar,
    /// Async waiters' wakers by registration (`register`), until the next change wakes them
    /// or their future lets go (`unregister`).
    wakers: Mutex<Vec<(u64, Waker)>>,
}

/// A registered waiter on one queue; unregisters when dropped.
#[derive(Debug)]
pub(crate) struct Waiter<'s> {
    pub signal: Arc<QueueSignal>,
    signals: &'s QueueSignals,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.signals.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl QueueSignals {
    /// Registers a waiter on `queue`.
    pub fn wait_on(&self, queue: &str) -> Waiter<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let signal = self
            .by_queue
            .lock()
            .entry(queue.to_owned())
            .or_default()
            .clone();
        Waiter {
            signal,
            signals: self,
        }
    }

    /// Whether anyone waits on any queue.
    pub fn anyone_waiting(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Moves `queue`'s generation and wakes its waiters.
    pub fn notify(&self, queue: &str) {
        let signal = self.by_queue.lock().get(queue).cloned();
        if let Some(signal) = signal {
            signal.notify();
        }
    }

    /// Wakes every waiter on every queue to look again (the clock moved, activation stops, or
    /// the broker is closing): a spurious wake-up costs a waiter one more try.
    pub fn wake_all(&self) {
        let signals: Vec<Arc<QueueSignal>> = self.by_queue.lock().values().cloned().collect();
        for signal in signals {
            signal.notify();
        }
    }
}

impl QueueSignal {
    pub fn generation(&self) -> u64 {
        *self.generation.lock()
    }

    fn notify(&self) {
        *self.generation.lock() += 1;
        self.changed.notify_all();
        // Woken after the lock is let go: a wake may drop the last hold on a task, and with it
        // a waiting future, whose drop takes this lock (`unregister`).
        let wakers: Vec<(u64, Waker)> = std::mem::take(&mut *self.wakers.lock());
        for (_, waker) in wakers {
            waker.wake();
        }
    }

    /// Sleeps until the generation moves past `seen` or `deadline_ms` passes on `clock`;
    /// returns whether it moved.
    pub fn wait_past(&self, seen: u64, deadline_ms: u64, clock: &dyn Clock) -> bool {
        let mut generation = self.generation.lock();
        loop {
            if *generation != seen {
                return true;
            }
            if clock::wait_until(clock, &self.changed, &mut generation, deadline_ms) {
                return *generation != seen;
            }
        }
    }

    /// Leaves `waker` to be woken when the generation moves past `seen`, as registration `id`
    /// (one per future: a later call replaces its waker); returns false (and leaves nothing) if
    /// the generation has moved already.
    pub fn register(&self, seen: u64, waker: &Waker, id: u64) -> bool {
        let generation = self.generation.lock();
        if *generation != seen {
            return false;
        }
        let mut wakers = self.wakers.lock();
        match wakers.iter_mut().find(|(registered, _)| *registered == id) {
            Some((_, registered)) if registered.will_wake(waker) => {}
            Some((_, registered)) => *registered = waker.clone(),
            None => wakers.push((id, waker.clone())),
        }
        true
    }

    /// Takes back registration `id` (its future is gone): otherwise its waker — and the task
    /// behind it — stayed until the queue's next change, which may never come (commits do not
    /// signal a queue nobody waits on).
    pub fn unregister(&self, id: u64) {
        self.wakers
            .lock()
            .retain(|(registered, _)| *registered != id);
    }
}

/// A registration number for [`QueueSignal::register`], unique in the process.
pub(crate) fn next_registration() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
