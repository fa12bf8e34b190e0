//! Herald's network layer: node-to-node delivery over QUIC (quinn) and the client protocol, with a
//! sans-IO codec in `net::proto`.
//!
//! Nothing is built here yet: the network is the subject of its own issue. This crate exists so the
//! workspace has its final shape; it exports nothing that could be mistaken for a working network.
#![deny(unsafe_code)]
