//! The end-to-end tests, one module per area, in one test binary: each `tests/*.rs` file is
//! its own crate that links the whole workspace, so eleven of them cost a minute of CI's
//! compile and linking, and ran one after another (a long test's binary left the second core
//! idle). Here the harness runs every area's tests side by side.
//!
//!     cargo test --release --test integration quantize::    # one area
//!
//! The GPU tests stay in `tests/gpu.rs`: CI builds that binary alone with `--features cuda`.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod c_abi;
mod chat;
mod cli;
mod eval;
mod interop;
mod kv_cache;
mod quantize;
mod reference;
mod signals;
mod speculate;
