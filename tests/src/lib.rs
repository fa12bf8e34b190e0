//! Helpers shared by Herald's real-process tests.
#![deny(unsafe_code)]

/// README.md's `rust` blocks, compiled and run as doctests (the other blocks are tested by
/// `bin/tests/readme.rs`).
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod crash_record;
pub mod engine_crash;
pub mod kill;
pub mod node_crash;
