//! Shared pieces of Herald's benchmarks: what a run was asked for ([`settings`]), where they
//! write ([`scratch`]), how they time a loop ([`measure`]), the raw I/O each one is compared with
//! ([`floors`]), and the summary they print ([`report`]).
//!
//! Every throughput figure is printed next to its floor, measured in the same run on the same
//! disk: `commit/s = 41.0k (0.92 × fdatasync floor 44.6k/s)`. A figure without its floor says
//! nothing about the code, only about the machine.
#![deny(unsafe_code)]

pub mod floors;
pub mod measure;
pub mod quic_floor;
pub mod report;
pub mod scratch;
pub mod settings;
