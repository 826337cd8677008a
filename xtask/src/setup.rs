//! `cargo xtask setup`: everything the eBPF build needs, installed once and cached.
//!
//! Rust eBPF needs a nightly toolchain (for `-Z build-std=core`) with its `rust-src` component, and
//! `bpf-linker` built against that nightly's own LLVM (no prebuilt binary can be downloaded here).
//! Each step checks first and prints what it does, so running it again is cheap and quiet.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The nightly the eBPF crate is built with. Machines of this kind carry nightly-2026-05-19 (LLVM 22)
/// as `nightly`; `TCP_TRACE_NIGHTLY` overrides the name.
pub const DEFAULT_NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn nightly() -> String {
    env::var("TCP_TRACE_NIGHTLY").unwrap_or_else(|_| DEFAULT_NIGHTLY.to_string())
}

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("TCP_TRACE_CACHE") {
        return PathBuf::from(dir);
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cache"));
    base.join("tcp-trace")
}

fn home() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[setup] {}", msg.as_ref());
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run() -> Result<()> {
    let nightly = nightly();
    let sysroot = nightly_sysroot(&nightly)?;
    ensure_rust_src(&nightly, &sysroot)?;
    ensure_bpf_linker(&nightly, &sysroot)?;
    say("ready: eBPF programs build with `cargo build` (tcp-trace/build.rs)");
    Ok(())
}

fn nightly_sysroot(nightly: &str) -> Result<PathBuf> {
    let version = output(Command::new("rustc").arg(format!("+{nightly}")).arg("-vV")).with_context(
        || {
            format!(
                "the {nightly} toolchain is missing: install it with `rustup toolchain install {nightly}` \
                 (or set TCP_TRACE_NIGHTLY to an installed nightly)"
            )
        },
    )?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    let release = version
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .unwrap_or("unknown");
    if !release.contains("nightly") {
        bail!("toolchain `{nightly}` is {release}, not a nightly: -Z build-std needs one");
    }
    say(format!("toolchain {nightly}: rustc {release}, LLVM {llvm}"));
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{nightly}"))
            .args(["--print", "sysroot"]),
    )?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn ensure_rust_src(nightly: &str, sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        say(format!("rust-src for {nightly}: present"));
        return Ok(());
    }
    say(format!(
        "rust-src for {nightly}: installing (rustup component add)"
    ));
    crate::tasks::status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        nightly,
    ]))
}

/// bpf-linker links against libLLVM.so found through `LLVM_PREFIX/lib`; its RUNPATH keeps pointing at
/// that directory, so it lives in our cache rather than a temporary directory.
fn ensure_bpf_linker(nightly: &str, sysroot: &Path) -> Result<()> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"));
    let linker = cargo_home.join("bin/bpf-linker");
    let llvm_prefix = cache_dir().join("llvm");
    let libllvm = find_libllvm(sysroot)?;
    let link = llvm_prefix.join("lib/libLLVM.so");
    let link_ok = std::fs::read_link(&link).is_ok_and(|t| t == libllvm);
    if !link_ok {
        say(format!(
            "linking {} -> {}",
            link.display(),
            libllvm.display()
        ));
        std::fs::create_dir_all(llvm_prefix.join("lib"))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("could not create {}", link.display()))?;
    }
    if linker.exists() {
        // Run it the way rustc will: with the toolchain's lib dir on the library path.
        let version = output(
            Command::new("rustup")
                .args(["run", nightly])
                .arg(&linker)
                .arg("--version"),
        );
        match version {
            Ok(v) if v.contains(BPF_LINKER_VERSION) && link_ok => {
                say(format!("bpf-linker {BPF_LINKER_VERSION}: present"));
                return Ok(());
            }
            Ok(v) => say(format!(
                "bpf-linker: found `{}`, want {BPF_LINKER_VERSION} against {}: rebuilding",
                v.trim(),
                libllvm.display()
            )),
            Err(e) => say(format!(
                "bpf-linker: present but does not run ({e:#}): rebuilding"
            )),
        }
    }
    let llvm_major = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .unwrap_or("22")
        .to_string();
    say(format!(
        "bpf-linker {BPF_LINKER_VERSION}: building from crates.io against LLVM {llvm_major} (about a minute)"
    ));
    crate::tasks::status(
        Command::new("cargo")
            .arg(format!("+{nightly}"))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .args(["--locked", "--force"])
            .env("LLVM_PREFIX", &llvm_prefix),
    )
    .context("building bpf-linker failed; see the cargo output above")
}

fn find_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let entries =
        std::fs::read_dir(&lib).with_context(|| format!("cannot read {}", lib.display()))?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: this nightly does not ship LLVM as a shared library",
                lib.display()
            )
        })
}

/// The real servers the test suite runs (Debian's packages): nginx-light (a master and pre-fork
/// workers) for the owner tests, curl as their client. Installed once; the package's own
/// service is kept from starting (a policy-rc.d for the duration of the install), since the
/// tests start their own instances on loopback.
pub fn test_servers() -> Result<()> {
    let mut missing = Vec::new();
    if !Path::new("/usr/sbin/nginx").exists() {
        missing.push("nginx-light");
    }
    if !crate::vm::host::have_command("curl") {
        missing.push("curl");
    }
    if missing.is_empty() {
        say("test servers: nginx and curl are installed");
        return Ok(());
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists() && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok();
    if ours {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755));
    }
    let result = crate::vm::host::apt_install(&missing);
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    result.context("installing the test servers (the owner tests run Debian's nginx)")
}
