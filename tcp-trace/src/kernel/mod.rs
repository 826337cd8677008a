//! Facts about the running system: kernel release, BTF, lockdown, privileges, tracefs. Each check
//! returns what it found and, on failure, the fix to print.

pub mod btf;
pub(crate) mod enums;
pub(crate) mod netns_sysctls;

use std::{fs, path::Path};

use anyhow::{Context, Result, bail};

pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The running kernel's version as a string the model understands. Distribution kernels often
/// keep the patch level out of `uname -r` (Debian: "6.1.0-47-amd64" is really 6.1.170), so
/// /proc/version's "Debian 6.1.170-1" wins where present.
pub(crate) fn kernel_version() -> String {
    let version = fs::read_to_string("/proc/version").unwrap_or_default();
    distro_version(&version).unwrap_or_else(kernel_release)
}

pub(crate) fn distro_version(proc_version: &str) -> Option<String> {
    let words: Vec<&str> = proc_version.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "Debian" && parse_release(w[1]).is_some())
        .map(|w| w[1].split('-').next().unwrap_or(w[1]).to_string())
}

/// (major, minor, patch) of a release string such as "6.12.117+deb12-amd64".
pub(crate) fn parse_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().ok());
    Some((
        nums.next()??,
        nums.next()??,
        nums.next().flatten().unwrap_or(0),
    ))
}

pub(crate) fn read_vmlinux_btf() -> Result<Vec<u8>> {
    fs::read(VMLINUX_BTF).with_context(|| {
        format!(
            "cannot read the kernel's BTF at {VMLINUX_BTF}: tcp-trace needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y (all major distributions since 2020 ship one)"
        )
    })
}

pub(crate) fn lockdown() -> String {
    // "none [integrity] confidentiality": the bracketed word is the mode in force.
    match fs::read_to_string("/sys/kernel/security/lockdown") {
        Ok(s) => s
            .split_whitespace()
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
            .unwrap_or_else(|| s.trim().to_string()),
        Err(_) => "not reported (securityfs not mounted or no lockdown LSM)".into(),
    }
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capabilities of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub(crate) struct Privileges {
    pub(crate) euid: u32,
    pub(crate) cap_bpf: bool,
    pub(crate) cap_perfmon: bool,
    pub(crate) cap_sys_admin: bool,
}

impl Privileges {
    pub(crate) fn current() -> Self {
        let caps = effective_caps();
        let has = |c: u32| caps & (1 << c) != 0;
        Self {
            euid: unsafe { libc::geteuid() },
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
        }
    }

    pub(crate) fn sufficient(&self) -> bool {
        self.cap_sys_admin || (self.cap_bpf && self.cap_perfmon)
    }

    pub(crate) fn describe(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        format!(
            "euid {}, CAP_BPF {}, CAP_PERFMON {}, CAP_SYS_ADMIN {}",
            self.euid,
            yes(self.cap_bpf),
            yes(self.cap_perfmon),
            yes(self.cap_sys_admin)
        )
    }

    pub(crate) fn require(&self) -> Result<()> {
        if self.sufficient() {
            return Ok(());
        }
        bail!(
            "tcp-trace needs CAP_BPF and CAP_PERFMON (or root) to load its eBPF programs; this \
             process has {}.\nfix: run it as root (`sudo tcp-trace ...`), or grant the \
             capabilities: `sudo setcap cap_bpf,cap_perfmon+ep $(command -v tcp-trace)`",
            self.describe()
        )
    }
}

/// Makes sure tracefs is mounted (kprobes and tracepoints attach through it); mounts it when it
/// is not and we may. Returns a note about what was done.
pub(crate) fn ensure_tracefs() -> Result<String> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(format!("mounted at {TRACEFS}"));
    }
    if Path::new("/sys/kernel/debug/tracing/events").is_dir() {
        return Ok("mounted at /sys/kernel/debug/tracing".into());
    }
    let target = std::ffi::CString::new(TRACEFS)?;
    let fstype = std::ffi::CString::new("tracefs")?;
    let source = std::ffi::CString::new("nodev")?;
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed ({err}).\nfix: `mount -t \
             tracefs nodev {TRACEFS}`"
        );
    }
    Ok(format!("was not mounted: mounted it at {TRACEFS}"))
}

/// Fails with a clear message when `pid` names no running process.
pub(crate) fn check_pid(pid: u32) -> Result<()> {
    if Path::new(&format!("/proc/{pid}")).exists() {
        return Ok(());
    }
    bail!(
        "no process has pid {pid} (nothing in /proc/{pid}).\nfix: check the pid, e.g. `pgrep -a \
         <name>`; a process in another pid namespace must be named by its pid as seen from here"
    )
}

/// Kernel timer frequency, for turning jiffies into seconds. From the kernel config when it is
/// readable; None otherwise.
pub(crate) fn config_hz() -> Option<u64> {
    let release = kernel_release();
    let text = fs::read_to_string(format!("/boot/config-{release}")).ok()?;
    parse_config_hz(&text)
}

pub(crate) fn parse_config_hz(config: &str) -> Option<u64> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("6.12.117+deb12-amd64"), Some((6, 12, 117)));
        assert_eq!(parse_release("6.1.0-47-amd64"), Some((6, 1, 0)));
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18, 44)));
        assert_eq!(parse_release("6.9"), Some((6, 9, 0)));
        assert_eq!(parse_release("weird"), None);
    }

    #[test]
    fn debian_versions_come_from_proc_version() {
        let v = "Linux version 6.1.0-47-amd64 (debian-kernel@lists.debian.org) (gcc-12) #1 SMP \
                 PREEMPT_DYNAMIC Debian 6.1.170-1 (2025-10-20)";
        assert_eq!(distro_version(v).as_deref(), Some("6.1.170"));
        assert_eq!(distro_version("Linux version 6.18.44-fc #1 SMP"), None);
    }

    #[test]
    fn hz_from_config() {
        assert_eq!(
            parse_config_hz("# x\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(parse_config_hz("CONFIG_HZ_1000=y\n"), None);
    }

    #[test]
    fn missing_pid_is_explained() {
        let err = check_pid(u32::MAX - 1).unwrap_err().to_string();
        assert!(err.contains("no process has pid"), "{err}");
        assert!(check_pid(std::process::id()).is_ok());
    }
}
