//! What the integration tests share: whether a test that needs privileges may run ([`root_for`],
//! [`bpf_allowed`]), the tracer under test ([`tracer`]), the test peers ([`peer`]), ports
//! chosen by the kernel and read back from the JSON ([`net`]).
//!
//! A test that needs root (to load BPF programs, to create network namespaces) is marked
//! `#[ignore]`: a plain `cargo test` reports it ignored, never passed. `cargo xtask test` runs
//! the suite with `--include-ignored` as root (or under sudo, or in CI); a test that was asked to
//! run and cannot (not root, no gcc) fails, so CI (CI=true, root) proves the kernel side works.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod net;
pub mod peer;
pub mod tracer;

pub use net::{free_port, free_port_v6, free_ports, owner_pid, port_of};
pub use peer::{Connection, Listening, Peer};
pub use tracer::{Stopped, Tracer};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

/// A test that was asked to run cannot, because `why`: it fails (it must not pass without
/// doing its job).
pub fn skip(why: &str) {
    panic!(
        "{why}: this test needs it (it is #[ignore]d by default; run it as root with \
         --include-ignored, or leave it out)"
    );
}

/// Whether the test may run: it needs root for `what` (e.g. "load BPF programs"). True as
/// root; otherwise the test fails (see [`skip`]).
pub fn root_for(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip(&format!("the test does not run as root, needed to {what}"));
    }
    root
}

/// A test that loads BPF programs may run (see [`root_for`]).
pub fn bpf_allowed() -> bool {
    root_for("load BPF programs")
}
