//! Herald's network layer: node-to-node delivery over QUIC (quinn) and the client protocol.
//!
//! Built so far: [`proto`], the sans-IO node-to-node wire protocol: frames with hard size
//! limits and a streaming decoder, fragmentation and bounded reassembly of large messages, and
//! [`proto::PeerSession`], the per-peer state machine (handshake, in-flight window, cumulative
//! acknowledgements after durable commit, retransmission with exponential backoff), driven by
//! `handle_bytes` / `poll_transmit` / `poll_timeout` with time passed in. `PROTOCOL.md` in this
//! crate documents the wire format byte by byte.
//!
//! Not built yet: `net::quic` (the quinn driver, one connection per peer, mutual TLS), the
//! bridge to the engine's transmission queue, the node, and the client protocol.
#![deny(unsafe_code)]

mod error;
pub mod identity;
pub mod proto;
pub mod quic;

pub use error::{Error, Result};

/// Entry points for fuzzing and corpus replay (`fuzz/`); not part of the stable API.
#[doc(hidden)]
pub mod fuzzing;
