//! Shared pieces of the benchmarks.
#![deny(unsafe_code)]
