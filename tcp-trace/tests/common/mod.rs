//! What the integration tests share: whether a test that needs privileges may run.
//!
//! A test that needs root (to load BPF programs, to create network namespaces) is marked
//! `#[ignore]`: a plain `cargo test` reports it ignored, never passed. `cargo xtask test` runs
//! the suite with `--include-ignored` as root (or under sudo, or in CI); a test that was asked to
//! run and cannot (not root, no gcc) fails, so CI (CI=true, root) proves the kernel side works.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

/// Whether the tests run in CI (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

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

/// A port nothing listens on now, chosen by the kernel from the ephemeral range (tests and
/// benchmarks running at the same time cannot collide on it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
