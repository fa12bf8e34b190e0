//! Helpers shared by Herald's real-process tests.
#![deny(unsafe_code)]

pub mod crash_record;
pub mod engine_crash;
pub mod kill;
pub mod node_crash;
