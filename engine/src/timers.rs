//! The broker's timer thread: fires conversation timers (a DialogTimer message) and dialog
//! lifetimes (ERROR state and an Error message) when they come due on the broker's clock, and
//! wakes async WAITFOR receivers at their deadlines.
//!
//! Deadlines live in the state (`State::deadlines`, rebuilt from the endpoints at recovery),
//! so they survive restarts; firing is an ordinary logged commit, applied in LSN order, whose
//! ops check that the deadline they fire is still the endpoint's (a timer reset or a
//! conversation ended since it came due makes them no-ops). Deadlines that passed while the
//! broker was closed fire when it opens.

use std::collections::BTreeMap;
use std::task::Waker;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::broker::BrokerCore;
use crate::clock;
use crate::record::{self, Op};
use crate::state::DeadlineKind;
use crate::system;

/// Deadlines fired in one commit record at most.
pub const TIMER_FIRE_BATCH_MAX_OPS: usize = 1024;

/// After a failed firing (a full disk, say), the timer thread waits this long before it tries
/// again.
const TIMER_RETRY_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(crate) struct Timers {
    /// Guards the thread's view; `stop` is set when the broker closes.
    control: Mutex<TimerControl>,
    signal: Condvar,
    /// One firing at a time (the timer thread, and a manual clock's `advance`).
    firing: Mutex<()>,
}

#[derive(Debug, Default)]
struct TimerControl {
    stop: bool,
    /// Async receivers to wake at a deadline: (deadline, registration number) → waker.
    wakers: BTreeMap<(u64, u64), Waker>,
    next_registration: u64,
}

impl Timers {
    /// Wakes the timer thread to look at the deadlines again.
    pub fn wake(&self) {
        let _control = self.control.lock();
        self.signal.notify_all();
    }

    pub fn stop(&self) {
        self.control.lock().stop = true;
        self.signal.notify_all();
    }
}

/// A registration of [`BrokerCore::wake_at`], to take back with [`BrokerCore::cancel_wake`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimerKey {
    deadline_ms: u64,
    registration: u64,
}

impl BrokerCore {
    /// Wakes `waker` once `deadline_ms` passes on the broker's clock. Each call is a
    /// registration of its own (two futures of one task may wait for different deadlines):
    /// its owner cancels it when it no longer waits.
    pub(crate) fn wake_at(&self, deadline_ms: u64, waker: &Waker) -> TimerKey {
        let mut control = self.timers.control.lock();
        let registration = control.next_registration;
        control.next_registration += 1;
        control
            .wakers
            .insert((deadline_ms, registration), waker.clone());
        self.timers.signal.notify_all();
        TimerKey {
            deadline_ms,
            registration,
        }
    }

    /// Takes back a [`wake_at`](BrokerCore::wake_at) registration (gone already if it fired).
    pub(crate) fn cancel_wake(&self, key: TimerKey) {
        self.timers
            .control
            .lock()
            .wakers
            .remove(&(key.deadline_ms, key.registration));
    }

    /// Wakers registered with the timer thread now.
    pub fn timer_wakers(&self) -> usize {
        self.timers.control.lock().wakers.len()
    }

    /// The timer thread.
    pub(crate) fn run_timers(&self) {
        let clock = self.clock();
        let mut control = self.timers.control.lock();
        loop {
            if control.stop {
                return;
            }
            let now = clock.now_ms();
            let mut due = Vec::new();
            while let Some(entry) = control.wakers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            if !due.is_empty() {
                // Woken without the lock: a wake may drop a waiting future, whose drop takes
                // it (`cancel_wake`).
                drop(control);
                for waker in due {
                    waker.wake();
                }
                control = self.timers.control.lock();
                continue;
            }
            let next_deadline = self.state.lock().deadlines.first().map(|d| d.0);
            if next_deadline.is_some_and(|d| d <= now) {
                drop(control);
                let fired = self.fire_due_deadlines();
                control = self.timers.control.lock();
                if !fired {
                    let retry = clock::deadline_after(clock, TIMER_RETRY_DELAY);
                    clock::wait_until(clock, &self.timers.signal, &mut control, retry);
                }
                continue;
            }
            let next_waker = control.wakers.keys().next().map(|k| k.0);
            let next = match (next_deadline, next_waker) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(u64::MAX),
            };
            clock::wait_until(clock, &self.timers.signal, &mut control, next);
        }
    }

    /// Fires every deadline due now, in commits of at most `TIMER_FIRE_BATCH_MAX_OPS` ops.
    /// Returns false if a commit failed (the deadlines stay, to be fired later).
    pub(crate) fn fire_due_deadlines(&self) -> bool {
        let _firing = self.timers.firing.lock();
        loop {
            let now = self.clock().now_ms();
            let due: Vec<_> = self
                .state
                .lock()
                .deadlines
                .iter()
                .take_while(|(deadline, _, _)| *deadline <= now)
                .take(TIMER_FIRE_BATCH_MAX_OPS)
                .copied()
                .collect();
            if due.is_empty() {
                return true;
            }
            let ops: Vec<Op> = due
                .iter()
                .map(|(deadline, handle, kind)| match kind {
                    DeadlineKind::DialogTimer => Op::FireTimer {
                        handle: *handle,
                        deadline_ms: *deadline,
                    },
                    DeadlineKind::Lifetime => Op::Expire {
                        handle: *handle,
                        body: system::lifetime_expired_body(),
                        body_range: 0..0,
                    },
                })
                .collect();
            if let Err(e) = self.log_and_apply(&record::encode(&ops)) {
                tracing::warn!(error = %e, "firing conversation timers failed; will retry");
                return false;
            }
            let first_left = self.state.lock().deadlines.first().copied();
            if first_left == due.first().copied() {
                // Applying must remove what it fired; if it did not, stop rather than spin.
                tracing::error!(?first_left, "a fired deadline stayed pending");
                return false;
            }
        }
    }
}
