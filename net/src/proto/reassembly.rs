//! Reassembly of fragmented messages on the receiving side, within a fixed memory budget.
//!
//! Invariants:
//!
//! 1. The fragments held for one message never overlap; a fragment that repeats an earlier one
//!    exactly (same offset, same length) is a duplicate and ignored, any other overlap is an
//!    [`Error::InconsistentFragment`], as is a header that differs from the first fragment's.
//! 2. A message is delivered once its fragments cover the whole body: since they do not overlap
//!    and lie inside the body, covering it means their lengths sum to the body length.
//! 3. [`Reassembler::buffered_bytes`] (fragment bytes plus a bookkeeping charge per message and
//!    per fragment, at least what they take of the heap) never exceeds [`REASSEMBLY_BYTES_MAX`]. When a fragment would pass it, the
//!    oldest partial messages are dropped. Dropping is safe: nothing was acknowledged, so the
//!    sender retransmits the whole message. A correct peer keeps at most
//!    [`IN_FLIGHT_BYTES_MAX`](crate::proto::IN_FLIGHT_BYTES_MAX) of message bytes in flight, so
//!    only stale partials (a retransmission cut short by the Ack of its first copy) are ever
//!    dropped.
//! 4. A message in one fragment is delivered without being copied or buffered.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use crate::error::{Error, Result};
use crate::proto::frame::{MessageFragment, MessageHeader};

/// Largest number of bytes buffered for incomplete messages per peer, bookkeeping included.
/// Twice [`IN_FLIGHT_BYTES_MAX`](crate::proto::IN_FLIGHT_BYTES_MAX): room for everything a
/// correct peer can have in flight, its bookkeeping, and stale partials awaiting eviction.
pub const REASSEMBLY_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Bytes charged against [`REASSEMBLY_BYTES_MAX`] for each fragment held besides its bytes (its
/// allocation and its slot in the message's map), so that a flood of one-byte fragments is
/// bounded by the budget too, not only by its payload.
pub const REASSEMBLY_ENTRY_OVERHEAD_BYTES: usize = 128;

/// Bytes charged for each partial message besides its fragments and names: its entries in two
/// maps and its own map of fragments. Measured with a counting allocator, a partial message of
/// one one-byte fragment held about 730 bytes of heap; it was charged 257 (128 + 128 + 1), so the
/// budget bounded only about a third of what it claimed.
pub const REASSEMBLY_MESSAGE_OVERHEAD_BYTES: usize = 768;

/// A complete message: its header and whole body.
pub type Reassembled = (MessageHeader, Vec<u8>);

/// Partial messages of one peer, keyed by conversation, direction and sequence.
#[derive(Debug, Default)]
pub struct Reassembler {
    /// Ordered by key, so that the partials of one conversation direction are one range.
    partials: BTreeMap<Key, Partial>,
    /// Partial messages by first arrival, oldest first: the eviction order.
    arrivals: BTreeMap<u64, Key>,
    next_arrival: u64,
    buffered_bytes: usize,
    evicted_messages: u64,
}

type Key = ([u8; 16], bool, u64);

#[derive(Debug)]
struct Partial {
    header: MessageHeader,
    body_bytes: u32,
    /// Fragments by offset; never overlapping.
    fragments: BTreeMap<u32, Vec<u8>>,
    received_bytes: usize,
    charged_bytes: usize,
    arrival: u64,
}

impl Reassembler {
    pub fn new() -> Reassembler {
        Reassembler::default()
    }

    /// Takes one fragment; returns the message when this fragment completes it.
    pub fn push(&mut self, fragment: MessageFragment) -> Result<Option<Reassembled>> {
        let MessageFragment {
            header,
            body_bytes,
            fragment_offset: offset,
            fragment: bytes,
        } = fragment;
        let key = (
            header.conversation_id,
            header.from_initiator,
            header.sequence,
        );
        let whole = offset == 0 && bytes.len() == body_bytes as usize;
        if whole && !self.partials.contains_key(&key) {
            return Ok(Some((header, bytes)));
        }
        let inconsistent = |reason: String| Error::InconsistentFragment {
            conversation_id: key.0,
            from_initiator: key.1,
            sequence: key.2,
            reason,
        };
        let mut cost = bytes.len() + REASSEMBLY_ENTRY_OVERHEAD_BYTES;
        match self.partials.get(&key) {
            Some(partial) => {
                if partial.header != header || partial.body_bytes != body_bytes {
                    return Err(inconsistent(format!(
                        "fragment at offset {offset} has another header or body length"
                    )));
                }
                let end = offset as usize + bytes.len();
                if let Some((&at, held)) = partial.fragments.range(..=offset).next_back() {
                    if at == offset && held.len() == bytes.len() {
                        return Ok(None); // a duplicate fragment
                    }
                    if at as usize + held.len() > offset as usize {
                        return Err(inconsistent(format!(
                            "fragment {offset}..{end} overlaps fragment at offset {at}"
                        )));
                    }
                }
                if let Some((&at, _)) = partial.fragments.range(offset.saturating_add(1)..).next()
                    && (at as usize) < end
                {
                    return Err(inconsistent(format!(
                        "fragment {offset}..{end} overlaps fragment at offset {at}"
                    )));
                }
            }
            None => cost += header_charge(&header),
        }
        self.make_room(cost, &key);
        if self.buffered_bytes + cost > REASSEMBLY_BYTES_MAX {
            // Only this message is left and it does not fit: impossible for a message within
            // MESSAGE_BODY_BYTES_MAX, but a bound is kept, not assumed.
            self.remove(&key);
            self.evicted_messages += 1;
            return Ok(None);
        }
        let partial = match self.partials.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let arrival = self.next_arrival;
                self.next_arrival += 1;
                self.arrivals.insert(arrival, key);
                entry.insert(Partial {
                    header,
                    body_bytes,
                    fragments: BTreeMap::new(),
                    received_bytes: 0,
                    charged_bytes: 0,
                    arrival,
                })
            }
        };
        partial.received_bytes += bytes.len();
        partial.charged_bytes += cost;
        partial.fragments.insert(offset, bytes);
        self.buffered_bytes += cost;
        if partial.received_bytes < partial.body_bytes as usize {
            return Ok(None);
        }
        let partial = self.remove(&key).expect("the partial was just updated");
        let mut body = Vec::with_capacity(partial.body_bytes as usize);
        for fragment in partial.fragments.into_values() {
            body.extend_from_slice(&fragment);
        }
        Ok(Some((partial.header, body)))
    }

    /// Drops the partial messages of one conversation direction up to `sequence`: the receiver
    /// has them durably, so any fragments still arriving for them are stale retransmissions.
    pub fn discard_through(
        &mut self,
        conversation_id: [u8; 16],
        from_initiator: bool,
        sequence: u64,
    ) {
        let stale: Vec<Key> = self
            .partials
            .range(
                (conversation_id, from_initiator, 0)..=(conversation_id, from_initiator, sequence),
            )
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            self.remove(&key);
        }
    }

    /// Drops everything (the connection was lost).
    pub fn clear(&mut self) {
        self.partials.clear();
        self.arrivals.clear();
        self.buffered_bytes = 0;
    }

    /// Bytes charged against [`REASSEMBLY_BYTES_MAX`] now.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Messages with some but not all fragments held.
    pub fn partial_messages(&self) -> usize {
        self.partials.len()
    }

    /// Partial messages dropped to stay within [`REASSEMBLY_BYTES_MAX`] since this reassembler
    /// was made.
    pub fn evicted_messages(&self) -> u64 {
        self.evicted_messages
    }

    /// Evicts the oldest partial messages other than `keep` until `cost` more bytes fit.
    fn make_room(&mut self, cost: usize, keep: &Key) {
        while self.buffered_bytes + cost > REASSEMBLY_BYTES_MAX {
            let Some(victim) = self.arrivals.values().find(|key| *key != keep).copied() else {
                return;
            };
            if let Some(partial) = self.remove(&victim) {
                tracing::warn!(
                    conversation = %uuid::Uuid::from_bytes(victim.0),
                    from_initiator = victim.1,
                    sequence = victim.2,
                    bytes = partial.received_bytes,
                    "reassembly budget full: dropping the oldest partial message"
                );
            }
            self.evicted_messages += 1;
        }
    }

    fn remove(&mut self, key: &Key) -> Option<Partial> {
        let partial = self.partials.remove(key)?;
        self.arrivals.remove(&partial.arrival);
        self.buffered_bytes -= partial.charged_bytes;
        Some(partial)
    }
}

/// What a partial message's header costs: its names and a fixed overhead.
fn header_charge(header: &MessageHeader) -> usize {
    REASSEMBLY_MESSAGE_OVERHEAD_BYTES
        + header.source_service.len()
        + header.target_service.len()
        + header.contract.len()
        + header.message_type.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_half(conversation: u8, sequence: u64) -> MessageFragment {
        MessageFragment {
            header: MessageHeader {
                conversation_id: [conversation; 16],
                from_initiator: true,
                sequence,
                source_service: "s".into(),
                target_service: "t".into(),
                contract: "c".into(),
                message_type: "m".into(),
                target_broker_instance: None,
                lifetime_deadline_secs: 0,
            },
            body_bytes: 10,
            fragment_offset: 0,
            fragment: vec![1; 5],
        }
    }

    #[test]
    fn an_acknowledgement_drops_the_partials_it_covers_and_nothing_else() {
        let mut r = Reassembler::new();
        for sequence in 1..=3 {
            r.push(first_half(1, sequence)).expect("ok");
        }
        r.push(first_half(2, 1)).expect("ok");
        let one = 5 + REASSEMBLY_ENTRY_OVERHEAD_BYTES + REASSEMBLY_MESSAGE_OVERHEAD_BYTES + 4;
        assert_eq!(r.buffered_bytes(), 4 * one);
        r.discard_through([1; 16], true, 2);
        assert_eq!((r.partial_messages(), r.buffered_bytes()), (2, 2 * one));
        r.discard_through([1; 16], false, 9);
        assert_eq!(r.partial_messages(), 2);
        r.clear();
        assert_eq!((r.partial_messages(), r.buffered_bytes()), (0, 0));
        assert!(r.arrivals.is_empty());
    }
}
