//! Herald's embedded engine: Service Broker's model as a Rust library, persisted on
//! `herald-wal`. Open a data directory, define message types, contracts, queues and services,
//! begin dialogs, SEND and RECEIVE inside transactions. A commit is one log record and, by
//! default, durable when it returns; RECEIVE locks the conversation group until the transaction
//! ends, so one reader at a time processes a conversation's messages, in order, exactly once.
//!
//! ```no_run
//! use herald_engine::{Broker, DialogOptions, Options, QueueOptions, Receive, SentBy, Validation};
//! let broker = Broker::open("./herald-data", Options::default())?;
//! let mut tx = broker.begin();
//! tx.create_message_type("//shop/Order", Validation::None)?;
//! tx.create_contract("//shop/OrderContract", &[("//shop/Order", SentBy::Initiator)])?;
//! tx.create_queue("OrderQueue", QueueOptions::default())?;
//! tx.create_queue("ClientQueue", QueueOptions::default())?;
//! tx.create_service("//shop/OrderService", "OrderQueue", &["//shop/OrderContract"])?;
//! tx.create_service("//shop/ClientService", "ClientQueue", &[])?;
//! tx.commit()?;
//!
//! let mut tx = broker.begin();
//! let h = tx.begin_dialog("//shop/ClientService", "//shop/OrderService",
//!                         "//shop/OrderContract", DialogOptions::default())?;
//! tx.send(h, "//shop/Order", b"order 1")?;
//! tx.commit()?;
//!
//! let mut tx = broker.begin();
//! let batch = tx.receive("OrderQueue", Receive::top(100))?;
//! assert_eq!(batch[0].body(), b"order 1");
//! tx.commit()?;
//! # Ok::<(), herald_engine::Error>(())
//! ```
//!
//! What is built so far and what is not: see `engine/DESIGN.md`.
#![deny(unsafe_code)]

pub mod activation;
mod broker;
pub mod catalog;
pub mod checkpoint;
pub mod clock;
mod codec;
mod error;
pub mod events;
mod ids;
pub mod invariants;
mod lock_table;
pub mod record;
pub mod remote;
mod signal;
pub mod sql;
mod state;
pub mod system;
mod timers;
mod transaction;

pub use activation::{ActivatedReader, ActivationOptions, HandlerError};
pub use broker::{
    BROKER_ID_FILE_NAME, Broker, BrokerCore, ConversationGroupInfo, LOCK_FILE_NAME, Options,
    OutboundListener, POISON_ROLLBACKS_MAX, QueueInfo, RouteChanges, TransmissionQueueRow,
};
pub use catalog::{
    BrokerPriority, QueueOptions, Route, RouteAddress, RouteChoice, SentBy, Validation,
};
pub use checkpoint::CheckpointInfo;
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result};
pub use events::{Event, Subscription};
pub use herald_wal::{Durability, Error as StorageError, MemStorage, RecordBytes, Storage};
pub use ids::{
    BrokerInstanceId, ConversationGroupId, ConversationHandle, ConversationId, IdMap, IdSet,
};
pub use state::{
    CLOSED_CONVERSATION_LINGER_MS, Endpoint as ConversationEndpoint, EndpointState, MessageKey,
    MessageStatus, UrgentLane,
};
pub use transaction::{
    DialogOptions, MESSAGE_BODY_BYTES_MAX, Message, Receive, ReceiveFuture, Transaction,
};
