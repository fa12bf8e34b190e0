//! The sans-IO node-to-node wire protocol: no sockets, no runtime, no clock. [`crate::quic`]
//! carries its bytes over one long-lived QUIC stream per peer connection and calls it with the
//! time; everything here is a function of its inputs, so it is tested and fuzzed without I/O.
//!
//! - [`frame`]: the frames, their limits, and [`FrameDecoder`] for a byte stream.
//! - [`reassembly`]: putting fragmented messages back together within a memory budget.
//! - [`session`]: [`PeerSession`], the per-peer state machine (handshake, in-flight window,
//!   cumulative acknowledgements, retransmission with backoff).
//!
//! `net/PROTOCOL.md` lays out the frames byte by byte and the delivery protocol.

pub mod frame;
pub mod reassembly;
mod send_order;
pub mod session;

pub use frame::{
    Ack, DESCRIPTION_BYTES_MAX, ErrorFrame, FRAGMENT_BODY_BYTES_MAX, FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES, Frame, FrameDecoder, HELLO_MAGIC, Hello, MESSAGE_BODY_BYTES_MAX,
    MessageFragment, MessageHeader, NAME_BYTES_MAX, PROTOCOL_VERSION,
};
pub use reassembly::{
    REASSEMBLY_BYTES_MAX, REASSEMBLY_ENTRY_OVERHEAD_BYTES, REASSEMBLY_MESSAGE_OVERHEAD_BYTES,
    Reassembler,
};
pub use session::{
    Event, IN_FLIGHT_BYTES_MAX, IncomingMessage, OutgoingMessage, PENDING_CONTROL_FRAMES_MAX,
    PENDING_ERROR_BYTES_MAX, PeerSession, RETRY_DELAY_INITIAL, RETRY_DELAY_MAX,
    SEND_QUEUE_MESSAGES_MAX, TRANSMIT_BYTES_MAX, retry_delay,
};
