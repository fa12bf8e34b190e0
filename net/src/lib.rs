//! Herald's network layer: node-to-node delivery over QUIC (quinn) and, later, the client
//! protocol.
//!
//! - [`proto`]: the sans-IO node-to-node wire protocol: frames with hard size limits and a
//!   streaming decoder, fragmentation and bounded reassembly of large messages, and
//!   [`proto::PeerSession`], the per-peer state machine (handshake, in-flight window,
//!   cumulative acknowledgements after durable commit, retransmission with exponential backoff),
//!   driven by `handle_bytes` / `poll_transmit` / `poll_timeout` with time passed in.
//! - [`identity`]: the node's broker instance id and certificate, generated on first start and
//!   kept in a directory ([`identity::NodeIdentity::load_or_create`]); certificate
//!   [`identity::Fingerprint`]s; [`identity::Trust`] (pinned fingerprints and/or CAs).
//! - [`quic`]: the transport: [`quic::Transport`] drives one `PeerSession` per peer over a
//!   long-lived quinn connection with mutual TLS 1.3 (rustls on ring), dials on demand,
//!   reconnects with backoff, and hands the caller [`quic::TransportEvent`]s through a bounded
//!   channel. The engine's transmission queue hands messages in with
//!   [`quic::Transport::send`] and acknowledges received ones with
//!   [`quic::Transport::acknowledge`] once durable.
//!
//! - [`node`]: [`Node`], a broker and its transport joined: the broker's transmission queue goes
//!   out by its routes, arrivals are committed in batches and acknowledged once durable,
//!   acknowledgements and far brokers' errors come back into the broker.
//!
//! `PROTOCOL.md` in this crate documents the wire format byte by byte and the transport (ALPN,
//! TLS, streams, reconnection).
//!
//! - [`client`]: the client protocol (`herald-client/1`, on the node's endpoint beside
//!   `herald/1`): [`Client`], a blocking Rust client that runs T-SQL scripts and the engine's
//!   transaction operations in a session on a node, and the node's side of it.
#![deny(unsafe_code)]

pub mod client;
mod error;
pub mod identity;
pub mod node;
mod payload;
pub mod proto;
pub mod quic;

pub use client::{Client, ClientTransaction};
pub use error::{Error, Result};
pub use node::{Node, NodeConfig};

/// Entry points for fuzzing and corpus replay (`fuzz/`); not part of the stable API.
#[doc(hidden)]
pub mod fuzzing;
