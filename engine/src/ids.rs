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
