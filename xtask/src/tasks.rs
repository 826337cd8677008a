//! The README's two commands: `cargo xtask run` (the main job) and `cargo xtask test` (the whole
//! suite). Both set up what they need first.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::helpers::{as_root, is_root, status, which, workspace_root};
use crate::setup;

fn say(msg: impl AsRef<str>) {
    eprintln!("[xtask] {}", msg.as_ref());
}

/// Builds tcp-trace (and with it the eBPF object) in release mode; returns the binary's path.
pub fn build_release() -> Result<PathBuf> {
    setup::run()?;
    say("building tcp-trace (release; the eBPF object is built by tcp-trace/build.rs)");
    status(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "--package",
        "tcp-trace",
    ]))?;
    Ok(workspace_root().join("target/release/tcp-trace"))
}

/// The main job: validate the reference model against this machine's kernel.
pub fn run(args: Vec<String>) -> Result<()> {
    let bin = build_release()?;
    let args = if args.is_empty() {
        vec!["validate".to_string()]
    } else {
        args
    };
    say(format!("running: tcp-trace {}", args.join(" ")));
    let status = as_root(&bin)?.args(&args).status()?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// The whole suite: formatting, lints, unit and kernel tests, a minute of fuzzing; then the VM
/// kernel matrix.
pub fn test(skip_vm: bool) -> Result<()> {
    setup::run()?;
    setup::tests()?;
    let root = workspace_root();
    say("cargo fmt --check");
    status(
        Command::new("cargo")
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]),
    )
    .context("formatting differs: run `cargo fmt --all`")?;
    say("cargo clippy -D warnings");
    status(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    say("cargo xtask dist (the package that tests/package.rs installs)");
    let dist = crate::dist::run()?;
    say("cargo test (unit tests, then live tests on this kernel: they need root)");
    let mut cmd = Command::new("cargo");
    // The default members: everything but the eBPF crate, which only builds for the BPF target.
    cmd.current_dir(&root)
        .arg("test")
        .env("TCP_TRACE_DEB", &dist.deb)
        .env("TCP_TRACE_K8S_VALIDATE", setup::ensure_k8s_validator()?);
    let sudo = !is_root() && which("sudo").is_some();
    if sudo {
        // Build as this user, run the test binaries as root.
        cmd.env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER",
            "sudo --preserve-env=CI,TCP_TRACE_DEB,TCP_TRACE_K8S_VALIDATE",
        );
    }
    // The kernel tests are #[ignore]d unless asked for: as root (or under sudo) they run; in CI
    // they run whatever the user, and fail if they cannot.
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if is_root() || sudo || in_ci {
        cmd.args(["--", "--include-ignored"]);
    } else {
        say("not root and no sudo: the kernel tests are reported as ignored");
    }
    status(&mut cmd)?;
    crate::fuzz::run(60)?;
    if skip_vm {
        say("--skip-vm: not running the VM kernel matrix");
        return Ok(());
    }
    crate::vmtest::run("all", Vec::new(), false, crate::vmtest::DEFAULT_JOBS)
}
