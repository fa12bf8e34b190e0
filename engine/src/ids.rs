//! Identifiers of conversations: handles (one per endpoint), conversation ids (shared by both
//! endpoints) and conversation group ids (local to one side). All are random 128-bit values
//! (UUID v4), printed as UUIDs, as Service Broker's are.

use std::fmt;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u128);

        impl $name {
            /// A new random id.
            pub fn random() -> $name {
                $name(uuid::Uuid::new_v4().as_u128())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", uuid::Uuid::from_u128(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), uuid::Uuid::from_u128(self.0))
            }
        }
    };
}

uuid_id!(
    /// One side of a conversation (a conversation endpoint), as SEND and RECEIVE name it.
    ConversationHandle
);
uuid_id!(
    /// The conversation itself, shared by its two endpoints.
    ConversationId
);
uuid_id!(
    /// A local group of conversations: the unit of locking, and the natural key of application
    /// state.
    ConversationGroupId
);

uuid_id!(
    /// A broker (one data directory): Service Broker's `service_broker_guid`, which routes can
    /// name and which a dialog is pinned to after the far side's first acknowledgement.
    BrokerInstanceId
);

impl BrokerInstanceId {
    /// Parses the UUID text form.
    pub fn parse(text: &str) -> Option<BrokerInstanceId> {
        uuid::Uuid::parse_str(text.trim())
            .ok()
            .map(|u| BrokerInstanceId(u.as_u128()))
    }
}

/// Hash maps and sets keyed by ids — random 128-bit values (or application-chosen group ids),
/// the broker's own sequential 64-bit ones (transmission ids), a peer's address — and by
/// catalog names, on the per-message paths, where SipHash costs more than the rest of a
/// lookup. The hasher folds each 64-bit word into its state with a folded multiply (the 128-bit
/// product's halves xored) by a per-process random key, as foldhash does: every word passes
/// through a multiply by the secret key before the next is mixed in, so keys that collide
/// cannot be computed without it (a peer chooses conversation ids). Not a cryptographic hash:
/// it makes collisions unpredictable, not impossible to find by probing timings.
pub type IdMap<K, V> = std::collections::HashMap<K, V, IdHasherBuilder>;
pub type IdSet<K> = std::collections::HashSet<K, IdHasherBuilder>;

/// Builds [`IdHasher`]s with this process's key.
#[derive(Debug, Clone, Copy)]
pub struct IdHasherBuilder {
    key: u64,
}

impl Default for IdHasherBuilder {
    fn default() -> IdHasherBuilder {
        static KEY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let key = *KEY.get_or_init(|| (uuid::Uuid::new_v4().as_u128() as u64) | 1);
        IdHasherBuilder { key }
    }
}

impl std::hash::BuildHasher for IdHasherBuilder {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            state: self.key.rotate_left(32),
            key: self.key,
        }
    }
}

/// Xored into the key for [`IdHasher::finish`]'s multiply (the fractional part of the golden
/// ratio: any fixed pattern with mixed bits would do).
const FINISH_KEY_MASK: u64 = 0x9e37_79b9_7f4a_7c15;

/// See [`IdMap`].
#[derive(Debug, Clone, Copy)]
pub struct IdHasher {
    state: u64,
    key: u64,
}

impl IdHasher {
    /// Mixes one word in: the folded multiply of (state ^ word) by the key.
    #[inline]
    fn mix(&mut self, word: u64) {
        let product = u128::from(self.state ^ word) * u128::from(self.key);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl std::hash::Hasher for IdHasher {
    /// One more folded multiply, by a second key: after the last word the state's low bits
    /// (hashbrown's bucket) and top seven (its tag) are still poorly mixed for sequential ids
    /// (with some keys, 4096 sequential ids filled a sixth of the buckets random ones would).
    #[inline]
    fn finish(&self) -> u64 {
        // Odd, so never zero (the key itself could equal the mask).
        let product = u128::from(self.state) * u128::from((self.key ^ FINISH_KEY_MASK) | 1);
        (product as u64) ^ ((product >> 64) as u64)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.mix(u64::from_le_bytes(
                word.try_into().expect("chunks of 8 bytes"),
            ));
        }
        let rest = words.remainder();
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        self.mix(u64::from_le_bytes(last));
        // The length goes in too: bytes that differ only by trailing zeros differ here.
        self.mix(bytes.len() as u64);
    }

    #[inline]
    fn write_u8(&mut self, value: u8) {
        self.mix(u64::from(value));
    }

    #[inline]
    fn write_u16(&mut self, value: u16) {
        self.mix(u64::from(value));
    }

    #[inline]
    fn write_u32(&mut self, value: u32) {
        self.mix(u64::from(value));
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    #[inline]
    fn write_u128(&mut self, value: u128) {
        self.mix(value as u64);
        self.mix((value >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.mix(value as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hasher};

    fn hash_u128(key: u64, value: u128) -> u64 {
        let mut h = IdHasherBuilder { key }.build_hasher();
        h.write_u128(value);
        h.finish()
    }

    #[test]
    fn equal_values_hash_equal_and_neighbours_apart() {
        let builder = IdHasherBuilder::default();
        assert_eq!(builder.hash_one(42u64), builder.hash_one(42u64));
        assert_eq!(
            builder.hash_one("//svc"),
            builder.hash_one(String::from("//svc"))
        );
        let sequential: std::collections::HashSet<u64> =
            (0..10_000u64).map(|id| builder.hash_one(id)).collect();
        assert_eq!(sequential.len(), 10_000);
        // The low bits pick buckets, the top seven hashbrown's tags: both must vary.
        let low: std::collections::HashSet<u64> = (0..4096u64)
            .map(|id| builder.hash_one(id) & 0xfff)
            .collect();
        let top: std::collections::HashSet<u64> =
            (0..4096u64).map(|id| builder.hash_one(id) >> 57).collect();
        // Random values fill ~2590 of 4096 (a few tens either way); the bound leaves room.
        assert!(
            low.len() > 2300,
            "{} distinct low 12 bits of 4096",
            low.len()
        );
        assert_eq!(top.len(), 128);
    }

    #[test]
    fn bytes_that_differ_only_in_length_hash_apart() {
        let builder = IdHasherBuilder::default();
        let hash = |bytes: &[u8]| {
            let mut h = builder.build_hasher();
            h.write(bytes);
            h.finish()
        };
        assert_ne!(hash(b"a"), hash(b"a\0"));
        assert_ne!(hash(b""), hash(b"\0"));
        assert_ne!(hash(b"12345678"), hash(b"12345678\0"));
    }

    #[test]
    fn ids_colliding_under_one_key_do_not_under_another() {
        // Under the old xor-and-rotate hasher, any two ids with equal halves xored collided
        // whatever the key; here the key decides, so a peer cannot pick colliding ids.
        let (high_a, low_a) = (0x0123_4567_89ab_cdef_u64, 0x1111_u64);
        let (high_b, low_b) = (high_a ^ low_a, 0);
        assert_eq!(high_a ^ low_a, high_b ^ low_b);
        let a = (u128::from(high_a) << 64) | u128::from(low_a);
        let b = (u128::from(high_b) << 64) | u128::from(low_b);
        let keys = [
            0x9e37_79b9_7f4a_7c15_u64,
            0xc2b2_ae3d_27d4_eb4f,
            0x1656_67b1_9e37_79f9,
        ];
        let colliding = keys
            .iter()
            .filter(|key| hash_u128(**key, a) == hash_u128(**key, b))
            .count();
        assert_eq!(colliding, 0);
    }
}
