//! Small helpers every task uses (paths, running commands, root): a leaf module, so that the
//! tasks can use each other without import cycles.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

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
