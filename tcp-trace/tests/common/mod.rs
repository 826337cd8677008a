//! What the integration tests share: whether a test that needs privileges may run.
//!
//! A test that needs root (to load BPF programs, to create network namespaces) is skipped with a
//! note outside CI when not root; in CI (CI=true) the same situation is a failure, because CI must
//! prove the kernel side works.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

/// Whether the tests run in CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A test cannot run because `why`: in CI that fails the test; elsewhere it says it is skipped.
pub fn skip(why: &str) {
    if in_ci() {
        panic!("CI=true but {why}: this test must run in CI");
    }
    eprintln!("skipped: {why}");
}

/// Whether the test may run as root needs it for `what` (e.g. "load BPF programs"): true as
/// root; otherwise see [`skip`].
pub fn root_for(what: &str) -> bool {
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
