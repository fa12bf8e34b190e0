//! Time, as the engine sees it. Every deadline — lock waits, WAITFOR timeouts, conversation
//! timers, dialog lifetimes — is read from the broker's `Clock`, so tests run on a
//! `ManualClock` (virtual time, moved by `advance`) without sleeping, and a timer that should
//! fire after an hour fires when the test says an hour has passed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, MutexGuard};

/// A source of time: milliseconds since the UNIX epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> u64;

    /// The manual clock behind this one, if time moves only when told to.
    fn as_manual(&self) -> Option<&ManualClock> {
        None
    }
}

/// Wall-clock time (`SystemTime`), the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

type Listener = dyn Fn() + Send + Sync;

/// Virtual time for tests: it stands still until `advance` moves it. Each broker opened on it
/// is told synchronously when it moves, so by the time `advance` returns, every timer and
/// lifetime that came due has fired (its messages committed) and every waiter whose deadline
/// passed has been woken.
#[derive(Debug)]
pub struct ManualClock {
    now_ms: AtomicU64,
    listeners: Mutex<Vec<ListenerSlot>>,
}

struct ListenerSlot(Weak<Listener>);

impl std::fmt::Debug for ListenerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ListenerSlot")
    }
}

impl ManualClock {
    /// A clock that reads `start_ms` until advanced.
    pub fn new(start_ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now_ms: AtomicU64::new(start_ms),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// Moves time forward by `by`, then lets every broker on this clock fire what came due.
    pub fn advance(&self, by: Duration) {
        self.now_ms
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
        let listeners: Vec<Arc<Listener>> = {
            let mut slots = self.listeners.lock();
            slots.retain(|slot| slot.0.strong_count() > 0);
            slots.iter().filter_map(|slot| slot.0.upgrade()).collect()
        };
        for listener in listeners {
            listener();
        }
    }

    /// Calls `listener` after every `advance` for as long as it is alive elsewhere.
    pub(crate) fn subscribe(&self, listener: &Arc<Listener>) {
        self.listeners
            .lock()
            .push(ListenerSlot(Arc::downgrade(listener)));
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    fn as_manual(&self) -> Option<&ManualClock> {
        Some(self)
    }
}

/// How long a waiter on a manual clock sleeps, in real time, before it looks at the clock
/// again. `advance` also wakes waiters directly; this only bounds the cost of a wake-up lost
/// between a waiter's check and its sleep. The deadline itself is judged in virtual time only.
const VIRTUAL_RECHECK_INTERVAL: Duration = Duration::from_millis(5);

/// The deadline `timeout` from now on `clock`, saturating (a timeout of `Duration::MAX` waits
/// forever).
pub(crate) fn deadline_after(clock: &dyn Clock, timeout: Duration) -> u64 {
    clock
        .now_ms()
        .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
}

/// Sleeps on `condvar` until it is notified or `deadline_ms` on `clock` comes; returns whether
/// the deadline has passed. Callers loop, re-checking their condition.
pub(crate) fn wait_until<T>(
    clock: &dyn Clock,
    condvar: &Condvar,
    guard: &mut MutexGuard<'_, T>,
    deadline_ms: u64,
) -> bool {
    let now = clock.now_ms();
    if now >= deadline_ms {
        return true;
    }
    let sleep = if clock.as_manual().is_some() {
        VIRTUAL_RECHECK_INTERVAL
    } else {
        Duration::from_millis(deadline_ms - now)
    };
    condvar.wait_for(guard, sleep);
    clock.now_ms() >= deadline_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_tells_its_listeners() {
        let clock = ManualClock::new(1_000);
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let listener: Arc<Listener> = Arc::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        clock.subscribe(&listener);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(clock.now_ms(), 3_000);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        drop(listener);
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a dropped listener is not called"
        );
    }

    #[test]
    fn a_wait_on_a_manual_clock_ends_when_virtual_time_passes_the_deadline() {
        let clock = ManualClock::new(0);
        let lock = Mutex::new(());
        let condvar = Condvar::new();
        let mut guard = lock.lock();
        assert!(!wait_until(&*clock, &condvar, &mut guard, 10));
        clock.advance(Duration::from_millis(10));
        assert!(wait_until(&*clock, &condvar, &mut guard, 10));
        assert_eq!(deadline_after(&*clock, Duration::MAX), u64::MAX);
    }
}
