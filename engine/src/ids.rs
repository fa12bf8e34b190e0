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

/// Hash maps and sets keyed by ids: random 128-bit values (or application-chosen group ids),
/// or the broker's own sequential 64-bit ones (transmission ids), so SipHash's cost buys
/// little: the hasher folds the id with a multiply by a per-process random odd key, which keeps
/// a chosen-id collision attack from being precomputed. The node's maps of transmissions in
/// flight use them too (a few per message, on the bulk path).
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
            state: 0,
            key: self.key,
        }
    }
}

/// See [`IdMap`].
#[derive(Debug, Clone, Copy)]
pub struct IdHasher {
    state: u64,
    key: u64,
}

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let x = self.state.wrapping_mul(self.key);
        x ^ (x >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.state = (self.state ^ *byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.state = (self.state ^ value).rotate_left(23);
    }

    fn write_u128(&mut self, value: u128) {
        self.write_u64(value as u64 ^ (value >> 64) as u64);
    }
}
