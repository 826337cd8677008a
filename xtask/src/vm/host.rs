//! Host-side set-up: the cache directory, apt (install, update, download) and the tools the VM
//! runner needs (qemu, a static busybox, xz).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

/// Prints one progress line of the VM runner (on stderr, so stdout stays the guest's console).
macro_rules! say {
    ($($arg:tt)*) => { eprintln!("[vm] {}", format_args!($($arg)*)) };
}
pub(crate) use say;

/// Root of the VM cache: `$TCP_TRACE_CACHE`, else `$XDG_CACHE_HOME/tcp-trace`, else
/// `~/.cache/tcp-trace`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("TCP_TRACE_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("tcp-trace"));
    }
    match env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("tcp-trace")),
        None => bail!("cannot place the VM cache: set TCP_TRACE_CACHE (or HOME / XDG_CACHE_HOME)"),
    }
}

/// Where extracted kernels live: `<cache root>/kernels`.
pub fn kernels_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join("kernels"))
}

/// Runs `cmd` to completion capturing its output; a failure to start is an error naming the
/// program, a non-zero exit is returned as is.
pub fn output_of(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run {:?} (is it installed?)", cmd.get_program()))
}

/// Runs `cmd`, failing with its stderr when it exits non-zero.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = output_of(cmd)?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Whether `program` is on PATH.
pub fn have_command(program: &str) -> bool {
    let Some(path) = env::var_os("PATH") else {
        return false;
    };
    env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn is_root() -> bool {
    // Uid line of /proc/self/status: real, effective, saved, fs.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// An `apt-get` command, through `sudo` when we are not root and sudo exists.
fn apt_get() -> Result<Command> {
    let mut cmd = if is_root() {
        Command::new("apt-get")
    } else if have_command("sudo") {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        c
    } else {
        bail!(
            "installing packages needs root: run as root, or install sudo, or install the packages \
             by hand"
        );
    };
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    Ok(cmd)
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);
static APT_LOCK: Mutex<()> = Mutex::new(());

/// Runs `apt-get update` at most once per process. Returns whether it ran now.
pub fn apt_update_once() -> Result<bool> {
    let _guard = APT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if APT_UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(false);
    }
    say!("refreshing package lists (apt-get update)");
    let mut cmd = apt_get()?;
    cmd.args(["update", "-qq"]);
    run_checked(&mut cmd)
        .context("apt-get update failed; check that the Debian mirror is reachable")?;
    Ok(true)
}

/// `apt-get install` of `packages`, retrying once after `apt-get update`.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    say!("installing {} (apt-get)", packages.join(" "));
    let attempt = || -> Result<()> {
        let _guard = APT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut cmd = apt_get()?;
        cmd.args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages);
        run_checked(&mut cmd).map(drop)
    };
    let result = match attempt() {
        Ok(()) => Ok(()),
        // Stale or empty package lists are the usual cause: refresh them once and retry.
        Err(first) => match apt_update_once()? {
            true => attempt(),
            false => Err(first),
        },
    };
    result.with_context(|| format!("could not install {}", packages.join(" ")))
}

/// Downloads `package`'s .deb into `dir` (apt-get download writes into its working directory)
/// with the project's kernel apt configuration, and returns its path.
pub fn apt_download(apt: &crate::setup::KernelApt, package: &str, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = apt.command("apt-get");
    cmd.arg("download").arg("-qq").arg(package).current_dir(dir);
    run_checked(&mut cmd)?;
    let deb = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        });
    deb.with_context(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            dir.display()
        )
    })
}

/// Tools found (or installed) on the host.
#[derive(Debug, Clone)]
pub struct HostTools {
    pub qemu: PathBuf,
    pub busybox: PathBuf,
}

static HOST_TOOLS: Mutex<Option<HostTools>> = Mutex::new(None);

/// Makes sure qemu-system-x86_64, a statically linked busybox and xz are present, installing
/// qemu-system-x86, busybox-static and xz-utils with apt when they are not. Cached per process.
pub fn ensure_host_tools() -> Result<HostTools> {
    let mut cached = HOST_TOOLS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = cached.as_ref() {
        return Ok(t.clone());
    }
    let mut missing = Vec::new();
    if !have_command("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if find_static_busybox().is_none() {
        missing.push("busybox-static");
    }
    if !have_command("xz") {
        missing.push("xz-utils");
    }
    if !have_command("dpkg-deb") || !have_command("apt-get") {
        bail!(
            "the VM runner needs a Debian-like host (apt-get and dpkg-deb) to fetch kernels and \
             tools; neither was found on PATH"
        );
    }
    if missing.is_empty() {
        say!("host tools present: qemu-system-x86_64, static busybox, xz");
    } else {
        apt_install(&missing)?;
    }
    let qemu = find_on_path("qemu-system-x86_64")
        .context("qemu-system-x86_64 is still missing after installing qemu-system-x86")?;
    let busybox = find_static_busybox().context(
        "no statically linked busybox at /bin/busybox or /usr/bin/busybox even after installing \
         busybox-static (the dynamic `busybox` package cannot run in the initramfs)",
    )?;
    let tools = HostTools { qemu, busybox };
    *cached = Some(tools.clone());
    Ok(tools)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn find_static_busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .chain(find_on_path("busybox"))
        .find(|p| is_executable(p) && matches!(super::elf::is_static(p), Ok(true)))
}
