//! [`SendOrderSlots`]: a session's unacknowledged messages, by send order.

use std::collections::{BTreeMap, VecDeque};

/// Values keyed by send order, for orders given out consecutively and mostly removed from the
/// front (messages are acknowledged about in the order they were sent): a deque of slots from
/// `first_order`. Insert and remove are O(1), where a `BTreeMap` shifted its entries (a
/// session's are ~120 bytes) inside its nodes on every removal from the front: ~2% of two
/// nodes' CPU in the bulk bench, a kilobyte moved per message.
///
/// Invariants: the front slot, if any, is full (emptied slots at the front are popped). A slot
/// emptied elsewhere (acknowledged out of send order, withdrawn) stays until the front reaches
/// it; so that a value held for long at the front (a message the peer does not acknowledge
/// while it acknowledges later ones) cannot make the deque span an unbounded run of emptied
/// slots behind it, the front value moves to `stragglers` (a plain map) whenever the deque
/// spans more than twice its values plus [`SPAN_SLACK_SLOTS`]. Every straggler's order is
/// below `first_order`; `len` counts the values in the deque.
#[derive(Debug)]
pub(crate) struct SendOrderSlots<T> {
    first_order: u64,
    slots: VecDeque<Option<T>>,
    len: usize,
    stragglers: BTreeMap<u64, T>,
}

/// Emptied slots the deque may hold beyond as many as it holds values.
const SPAN_SLACK_SLOTS: usize = 64;

impl<T> Default for SendOrderSlots<T> {
    fn default() -> SendOrderSlots<T> {
        SendOrderSlots {
            first_order: 0,
            slots: VecDeque::new(),
            len: 0,
            stragglers: BTreeMap::new(),
        }
    }
}

impl<T> SendOrderSlots<T> {
    /// Adds `value` at `order`, which must follow the last order added (or, while nothing is
    /// held in the deque, any order above every one held).
    pub(crate) fn push(&mut self, order: u64, value: T) {
        if self.slots.is_empty() {
            assert!(
                self.stragglers
                    .last_key_value()
                    .is_none_or(|(last, _)| *last < order),
                "send orders increase"
            );
            self.first_order = order;
        }
        assert_eq!(
            order,
            self.first_order + self.slots.len() as u64,
            "send orders are consecutive"
        );
        self.slots.push_back(Some(value));
        self.len += 1;
    }

    fn index(&self, order: u64) -> Option<usize> {
        let index = usize::try_from(order.checked_sub(self.first_order)?).ok()?;
        (index < self.slots.len()).then_some(index)
    }

    pub(crate) fn get(&self, order: u64) -> Option<&T> {
        if order < self.first_order {
            return self.stragglers.get(&order);
        }
        self.slots[self.index(order)?].as_ref()
    }

    pub(crate) fn get_mut(&mut self, order: u64) -> Option<&mut T> {
        if order < self.first_order {
            return self.stragglers.get_mut(&order);
        }
        let index = self.index(order)?;
        self.slots[index].as_mut()
    }

    pub(crate) fn remove(&mut self, order: u64) -> Option<T> {
        if order < self.first_order {
            return self.stragglers.remove(&order);
        }
        let index = self.index(order)?;
        let value = self.slots[index].take()?;
        self.len -= 1;
        self.pop_emptied_front();
        while self.slots.len() > 2 * self.len + SPAN_SLACK_SLOTS {
            if let Some(Some(value)) = self.slots.pop_front() {
                self.stragglers.insert(self.first_order, value);
                self.len -= 1;
            }
            self.first_order += 1;
            self.pop_emptied_front();
        }
        Some(value)
    }

    fn pop_emptied_front(&mut self) {
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.first_order += 1;
        }
    }

    /// The value with the smallest order at or after `order`.
    pub(crate) fn first_from(&self, order: u64) -> Option<(u64, &T)> {
        if let Some((found, value)) = self.stragglers.range(order..).next() {
            return Some((*found, value));
        }
        let start = usize::try_from(order.saturating_sub(self.first_order)).ok()?;
        self.slots
            .range(start.min(self.slots.len())..)
            .enumerate()
            .find_map(|(offset, slot)| {
                let order = self.first_order + (start + offset) as u64;
                slot.as_ref().map(|value| (order, value))
            })
    }

    /// [`SendOrderSlots::first_from`], mutable.
    pub(crate) fn first_from_mut(&mut self, order: u64) -> Option<(u64, &mut T)> {
        let (found, _) = self.first_from(order)?;
        let value = self.get_mut(found)?;
        Some((found, value))
    }

    /// The smallest order held.
    pub(crate) fn first_order(&self) -> Option<u64> {
        match self.stragglers.first_key_value() {
            Some((order, _)) => Some(*order),
            None => (self.len > 0).then_some(self.first_order),
        }
    }

    /// The values held, in send order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        let first = self.first_order;
        let in_deque = self
            .slots
            .iter()
            .enumerate()
            .filter_map(move |(index, slot)| {
                slot.as_ref().map(|value| (first + index as u64, value))
            });
        self.stragglers
            .iter()
            .map(|(order, value)| (*order, value))
            .chain(in_deque)
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.stragglers
            .values_mut()
            .chain(self.slots.iter_mut().flatten())
    }

    pub(crate) fn len(&self) -> usize {
        self.stragglers.len() + self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::SendOrderSlots;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        /// Removes the held order at this position (modulo how many are held), or a random
        /// order when none is held.
        Remove(usize),
        RemoveNewest,
        /// Orders skip ahead (the session's `next_order` moved while this held nothing).
        SkipWhenEmpty(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Push),
            1 => (0usize..8).prop_map(Op::Remove),
            2 => Just(Op::RemoveNewest),
            1 => (0usize..1000).prop_map(Op::Remove),
            1 => any::<u8>().prop_map(Op::SkipWhenEmpty),
        ]
    }

    proptest! {
        /// Against a `BTreeMap`: every query answers the same after any sequence of pushes and
        /// removals, and the deque spans at most twice its values plus the slack.
        #[test]
        fn behaves_like_a_btree_map(
            ops in proptest::collection::vec(op(), 1..600),
            keep_oldest in any::<bool>(),
        ) {
            let mut slots = SendOrderSlots::default();
            let mut model = BTreeMap::new();
            let mut next_order = 0u64;
            for op in ops {
                match op {
                    Op::Push => {
                        slots.push(next_order, next_order * 10);
                        model.insert(next_order, next_order * 10);
                        next_order += 1;
                    }
                    Op::Remove(at) => {
                        // With `keep_oldest`, the first value pushed stays to the end: a
                        // message its peer never acknowledges, behind which orders run on.
                        let skip = usize::from(keep_oldest);
                        let choices = model.len().saturating_sub(skip).max(1);
                        let order = match model.keys().nth(skip + at % choices) {
                            Some(order) => *order,
                            None => at as u64 + 1,
                        };
                        prop_assert_eq!(slots.remove(order), model.remove(&order));
                        // Removing again finds nothing.
                        prop_assert_eq!(slots.remove(order), None);
                    }
                    Op::RemoveNewest => {
                        if model.len() >= 2 {
                            let newest = *model.keys().last().unwrap();
                            prop_assert_eq!(slots.remove(newest), model.remove(&newest));
                        }
                    }
                    Op::SkipWhenEmpty(by) => {
                        if model.is_empty() {
                            next_order += u64::from(by);
                        }
                    }
                }
                prop_assert_eq!(slots.len(), model.len());
                prop_assert_eq!(slots.is_empty(), model.is_empty());
                prop_assert_eq!(slots.first_order(), model.keys().next().copied());
                let held: Vec<(u64, u64)> = slots.iter().map(|(o, v)| (o, *v)).collect();
                let expected: Vec<(u64, u64)> = model.iter().map(|(o, v)| (*o, *v)).collect();
                prop_assert_eq!(held, expected);
                let held_orders: Vec<u64> = model.keys().copied().collect();
                let near_the_end = next_order.saturating_sub(12)..next_order + 2;
                let around_each_held = held_orders
                    .iter()
                    .flat_map(|o| [o.saturating_sub(1), *o, o + 1]);
                for probe in near_the_end.chain(around_each_held) {
                    prop_assert_eq!(slots.get(probe), model.get(&probe));
                    prop_assert_eq!(
                        slots.first_from(probe).map(|(o, v)| (o, *v)),
                        model.range(probe..).next().map(|(o, v)| (*o, *v))
                    );
                }
                prop_assert!(slots.slots.len() <= 2 * slots.len + super::SPAN_SLACK_SLOTS);
                prop_assert!(slots.slots.front().is_none_or(Option::is_some));
            }
            let held: Vec<u64> = model.keys().copied().collect();
            for order in held {
                prop_assert_eq!(slots.remove(order), model.remove(&order));
            }
            prop_assert!(slots.is_empty() && slots.slots.is_empty() && slots.stragglers.is_empty());
        }
    }

    #[test]
    fn a_value_stuck_at_the_front_does_not_hold_a_run_of_emptied_slots() {
        let mut slots = SendOrderSlots::default();
        // Order 0 is never removed; each later one is, once the next is pushed.
        slots.push(0, 0);
        for order in 1..100_000u64 {
            slots.push(order, order);
            if order >= 2 {
                assert_eq!(slots.remove(order - 1), Some(order - 1));
            }
        }
        assert!(
            slots.slots.len() <= 2 + super::SPAN_SLACK_SLOTS,
            "{}",
            slots.slots.len()
        );
        assert_eq!(slots.first_order(), Some(0));
        assert_eq!(slots.get(0), Some(&0));
        assert_eq!(slots.first_from(0), Some((0, &0)));
        assert_eq!(slots.first_from(1), Some((99_999, &99_999)));
        assert_eq!(slots.len(), 2);
        assert_eq!(slots.remove(0), Some(0));
        assert_eq!(slots.iter().collect::<Vec<_>>(), vec![(99_999, &99_999)]);
        slots.push(100_000, 100_000);
        assert_eq!(slots.len(), 2);
    }

    #[test]
    #[should_panic(expected = "send orders are consecutive")]
    fn an_order_that_skips_ahead_while_values_are_held_is_refused() {
        let mut slots = SendOrderSlots::default();
        slots.push(5, "a");
        slots.push(7, "b");
    }
}
