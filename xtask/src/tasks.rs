//! The README's two commands: `cargo xtask run` (the main job) and `cargo xtask test` (the whole
//! suite). Both set up what they need first.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::setup;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[xtask] {}", msg.as_ref());
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// A command that runs `program` as root: directly when we are root, through sudo otherwise.
pub fn as_root(program: &Path) -> Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    let sudo = which("sudo").context(
        "tcp-trace needs root (CAP_BPF, CAP_PERFMON) and sudo is not installed: run this as root",
    )?;
    say(format!(
        "not root: running {} under sudo",
        program.display()
    ));
    let mut cmd = Command::new(sudo);
    cmd.arg("--preserve-env=RUST_LOG,TCP_TRACE_VERIFIER_LOG")
        .arg(program);
    Ok(cmd)
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
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
    setup::test_servers()?;
    say("cargo test (unit tests, then live tests on this kernel: they need root)");
    let mut cmd = Command::new("cargo");
    // The default members: everything but the eBPF crate, which only builds for the BPF target.
    cmd.current_dir(&root).arg("test");
    if !is_root() && which("sudo").is_some() {
        // Build as this user, run the test binaries as root.
        cmd.env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER",
            "sudo --preserve-env=CI",
        );
    }
    status(&mut cmd)?;
    crate::fuzz::run(60)?;
    if skip_vm {
        say("--skip-vm: not running the VM kernel matrix");
        return Ok(());
    }
    crate::vmtest::run("all", Vec::new(), false)
}
