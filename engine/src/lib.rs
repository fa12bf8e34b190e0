//! Herald's embedded engine: Service Broker's model (catalog, dialogs, conversation-group locks,
//! transactional SEND and RECEIVE) persisted on `herald-wal`.
//!
//! Nothing is built here yet: the engine is the subject of its own issue. This crate exists so the
//! workspace has its final shape; it exports nothing that could be mistaken for a working engine.
#![deny(unsafe_code)]
