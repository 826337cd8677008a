//! `cargo xtask setup`: everything the eBPF build needs, installed once and cached.
//!
//! Rust eBPF needs a nightly toolchain (for `-Z build-std=core`) with its `rust-src` component, and
//! `bpf-linker` built against that nightly's own LLVM (no prebuilt binary can be downloaded here).
//! Each step checks first and prints what it does, so running it again is cheap and quiet.

use std::{
    collections::BTreeMap,
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
    crate::helpers::status(Command::new("rustup").args([
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
    crate::helpers::status(
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

/// The Debian suites the VM matrix takes kernels from, besides the machine's own: bullseye (5.10),
/// trixie (6.12), trixie-backports and sid (6.18, 7.x). They live in an apt configuration of the
/// project's own under the cache, so the machine's sources and lists are never touched.
const EXTRA_SUITES: &[&str] = &["bullseye", "trixie", "trixie-backports", "sid"];
const EXTRA_SECURITY_SUITES: &[&str] = &["bullseye-security", "trixie-security"];
/// Lists older than this are refreshed before a kernel is looked up.
const KERNEL_LISTS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// apt, pointed at the project's own sources file and lists: `<cache>/apt/{sources.list,
/// sources.list.d/,lists/,cache/}`.
#[derive(Debug, Clone)]
pub struct KernelApt {
    dir: PathBuf,
}

impl KernelApt {
    fn sources(&self) -> PathBuf {
        self.dir.join("sources.list")
    }

    fn lists(&self) -> PathBuf {
        self.dir.join("lists")
    }

    /// `program` (apt-get or apt-cache) reading only our sources and lists.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
        cmd.arg("-o")
            .arg(opt("Dir::Etc::SourceList", &self.sources()))
            .arg("-o")
            .arg(opt(
                "Dir::Etc::SourceParts",
                &self.dir.join("sources.list.d"),
            ))
            .arg("-o")
            .arg(opt("Dir::State::Lists", &self.lists()))
            .arg("-o")
            .arg(opt("Dir::Cache", &self.dir.join("cache")))
            .args(["-o", "Acquire::Languages=none"]);
        if crate::helpers::is_root() {
            // The lists live under root's home, which apt's `_apt` download user cannot write.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// `apt-get update` of our lists only.
    pub fn update(&self) -> Result<()> {
        say(format!(
            "refreshing the kernel package lists of {} (apt-get update, our lists only)",
            self.sources().display()
        ));
        let mut cmd = self.command("apt-get");
        cmd.args(["update", "-qq"]);
        output(&mut cmd).context(
            "apt-get update of the kernel suites failed; check that the Debian mirror is reachable",
        )?;
        std::fs::write(self.dir.join("updated"), "")?;
        Ok(())
    }

    fn lists_age(&self) -> Option<std::time::Duration> {
        let has_packages = std::fs::read_dir(self.lists())
            .ok()?
            .filter_map(|e| e.ok())
            // Stored as `..._Packages` or compressed (`_Packages.lz4` where apt is set to).
            .any(|e| e.file_name().to_string_lossy().contains("_Packages"));
        if !has_packages {
            return None;
        }
        std::fs::metadata(self.dir.join("updated"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
    }
}

/// A Debian stanza of the machine's apt sources: where the archive is and its keyring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianSource {
    pub uri: String,
    pub suites: Vec<String>,
    pub signed_by: Option<String>,
}

/// The `Types: deb` stanzas of a deb822 `.sources` file and the `deb` lines of a one-line
/// `.list` file (`Enabled: no` stanzas and comments left out).
pub fn parse_apt_sources(text: &str) -> Vec<DebianSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        for line in stanza.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix("deb ") {
                // One-line format: deb [options] uri suite component...
                let (options, rest) = match rest.trim_start().strip_prefix('[') {
                    Some(r) => r.split_once(']').unwrap_or((r, "")),
                    None => ("", rest),
                };
                let signed_by = options
                    .split_whitespace()
                    .find_map(|o| o.strip_prefix("signed-by="))
                    .map(str::to_string);
                let mut words = rest.split_whitespace();
                if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
                    out.push(DebianSource {
                        uri: uri.trim_end_matches('/').to_string(),
                        suites: vec![suite.to_string()],
                        signed_by,
                    });
                }
            } else if let Some((k, v)) = line.split_once(':')
                && !k.contains(' ')
            {
                fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let enabled = fields.get("enabled").is_none_or(|v| v != "no");
        let deb = fields
            .get("types")
            .is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        if let (true, true, Some(uris), Some(suites)) =
            (enabled, deb, fields.get("uris"), fields.get("suites"))
        {
            for uri in uris.split_whitespace() {
                out.push(DebianSource {
                    uri: uri.trim_end_matches('/').to_string(),
                    suites: suites.split_whitespace().map(str::to_string).collect(),
                    signed_by: fields.get("signed-by").cloned(),
                });
            }
        }
    }
    out
}

/// Our sources file: the machine's own Debian suites (found by its codename, as it lists them)
/// plus [`EXTRA_SUITES`] from the same archive and [`EXTRA_SECURITY_SUITES`] from its security
/// archive, each with the machine's keyring for that archive.
pub fn kernel_sources_list(machine: &[DebianSource], codename: &str) -> Result<String> {
    let security = format!("{codename}-security");
    let archive = machine
        .iter()
        .find(|s| s.suites.iter().any(|x| x == codename))
        .with_context(|| {
            format!(
                "the machine's apt sources list no Debian archive for {codename}: the VM kernels \
                 come from Debian's archive; add it to /etc/apt/sources.list.d or fetch kernels by hand \
                 into the cache"
            )
        })?;
    let secure = machine.iter().find(|s| s.suites.contains(&security));
    let line = |src: &DebianSource, suite: &str| match &src.signed_by {
        Some(k) => format!("deb [signed-by={k}] {} {suite} main\n", src.uri),
        None => format!("deb {} {suite} main\n", src.uri),
    };
    let mut out = String::from(
        "# Written by `cargo xtask setup` (xtask/src/setup.rs): the Debian suites the VM kernel \
         matrix takes kernels from.\n",
    );
    let mut seen = Vec::new();
    for src in machine
        .iter()
        .filter(|s| s.uri == archive.uri || secure.is_some_and(|x| x.uri == s.uri))
    {
        for suite in &src.suites {
            if !seen.contains(suite) {
                out.push_str(&line(src, suite));
                seen.push(suite.clone());
            }
        }
    }
    for suite in EXTRA_SUITES {
        out.push_str(&line(archive, suite));
    }
    if let Some(secure) = secure {
        for suite in EXTRA_SECURITY_SUITES {
            out.push_str(&line(secure, suite));
        }
    }
    Ok(out)
}

fn machine_apt_sources() -> Vec<DebianSource> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "sources" || e == "list"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| parse_apt_sources(&t))
        .collect()
}

fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME: not a Debian release?")
}

/// The project's apt configuration for kernels, written (when it changed) and its lists
/// refreshed (when missing, older than a day, or the sources changed). Once per process; if the
/// refresh fails but older lists exist, those are used with a warning.
pub fn kernel_apt() -> Result<KernelApt> {
    static READY: std::sync::Mutex<Option<KernelApt>> = std::sync::Mutex::new(None);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = ready.as_ref() {
        return Ok(k.clone());
    }
    let apt = KernelApt {
        dir: cache_dir().join("apt"),
    };
    for d in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.dir.join(d))
            .with_context(|| format!("creating {}", apt.dir.join(d).display()))?;
    }
    let wanted = kernel_sources_list(&machine_apt_sources(), &os_codename()?)?;
    let current = std::fs::read_to_string(apt.sources()).unwrap_or_default();
    let changed = current != wanted;
    if changed {
        say(format!(
            "writing {} (suites: the machine's own, {}, {})",
            apt.sources().display(),
            EXTRA_SUITES.join(", "),
            EXTRA_SECURITY_SUITES.join(", ")
        ));
        std::fs::write(apt.sources(), &wanted)?;
    }
    match apt.lists_age() {
        Some(age) if !changed && age < KERNEL_LISTS_MAX_AGE => say(format!(
            "kernel package lists: present ({} h old)",
            age.as_secs() / 3600
        )),
        age => {
            if let Err(e) = apt.update() {
                if age.is_none() {
                    return Err(e);
                }
                say(format!("warning: {e:#}; using the older lists"));
            }
        }
    }
    *ready = Some(apt.clone());
    Ok(apt)
}

/// What the test suite needs beyond the build: Debian's `prometheus` (the metrics test scrapes
/// tcp-trace with it) and `nginx-light` (the owner tests). Each step checks first, says what it does, and is skipped when present.
pub fn tests() -> Result<()> {
    ensure_apt("prometheus", Path::new("/usr/bin/prometheus"))?;
    // The owner tests run Debian's nginx (a master and pre-fork workers), with curl.
    ensure_apt("nginx-light", Path::new("/usr/sbin/nginx"))?;
    ensure_apt("curl", Path::new("/usr/bin/curl"))?;
    ensure_cargo_deb()?;
    ensure_k8s_validator()?;
    Ok(())
}

const CARGO_DEB_VERSION: &str = "3.8.0";
const K8S_VALIDATE_VERSION: &str = "1.37.0";

/// cargo-deb, for `cargo xtask dist` (built once into ~/.cargo/bin).
pub fn ensure_cargo_deb() -> Result<()> {
    let have = output(Command::new("cargo").args(["deb", "--version"]));
    if have.as_deref().is_ok_and(|v| v.contains(CARGO_DEB_VERSION)) {
        say(format!("cargo-deb {CARGO_DEB_VERSION}: present"));
        return Ok(());
    }
    say(format!(
        "cargo-deb {CARGO_DEB_VERSION}: installing (cargo install --locked; a few minutes, once)"
    ));
    crate::helpers::status(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
        "--locked",
    ]))
}

/// The Kubernetes schema validator the package test checks the DaemonSet manifest with
/// (kubernetes-validate, from PyPI: it carries the schemas, so it works offline), in a venv of
/// its own under the cache. Returns its path.
pub fn ensure_k8s_validator() -> Result<PathBuf> {
    let venv = cache_dir().join("venv-k8s");
    let bin = venv.join("bin/kubernetes-validate");
    let pip = venv.join("bin/pip");
    let have = output(Command::new(&pip).args(["show", "kubernetes-validate"]));
    if have
        .as_deref()
        .is_ok_and(|v| v.contains(&format!("Version: {K8S_VALIDATE_VERSION}")))
        && bin.exists()
    {
        say(format!(
            "kubernetes-validate {K8S_VALIDATE_VERSION}: present"
        ));
        return Ok(bin);
    }
    say(format!(
        "kubernetes-validate {K8S_VALIDATE_VERSION}: installing from PyPI into {}",
        venv.display()
    ));
    crate::helpers::status(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("python3 -m venv failed: install Debian's python3-venv")?;
    crate::helpers::status(Command::new(&pip).args([
        "install",
        "--quiet",
        &format!("kubernetes-validate=={K8S_VALIDATE_VERSION}"),
    ]))?;
    Ok(bin)
}

/// Installs Debian package `package` unless `probe` exists. apt-get needs root: without it the
/// step says what to run.
pub fn ensure_apt(package: &str, probe: &Path) -> Result<()> {
    if probe.exists() {
        say(format!("{package} (Debian): present"));
        return Ok(());
    }
    if !crate::helpers::is_root() {
        bail!(
            "the test suite needs Debian's {package} package: run `sudo apt-get install -y \
             {package}`, or run `cargo xtask test` as root"
        );
    }
    say(format!(
        "{package} (Debian): installing with apt-get (for the test suite)"
    ));
    // Debian starts the services it installs (nginx on :80): policy-rc.d exit 101 tells
    // invoke-rc.d not to, with or without systemd; the tests run their own servers.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists()
        && std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask setup-tests: no service starts\nexit 101\n",
        )
        .is_ok()
        && {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755)).is_ok()
        };
    let install = |cmd: &mut Command| {
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "--no-install-recommends",
            package,
        ]);
        crate::helpers::status(cmd)
    };
    let mut installed = install(&mut Command::new("apt-get"));
    if installed.is_err() {
        say("apt-get install failed: updating the package lists and trying again");
        installed = crate::helpers::status(Command::new("apt-get").args(["update", "-q"]))
            .and_then(|()| install(&mut Command::new("apt-get")));
    }
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    installed?;
    // Where a service did start anyway (a policy-rc.d of the machine's own said yes).
    let _ = Command::new("systemctl")
        .args(["disable", "--now", &format!("{package}.service")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MACHINE: &str = "\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://other.example/node
Suites: nodistro
Components: main
Enabled: no
";

    #[test]
    fn sources_are_parsed_in_both_formats() {
        let s = parse_apt_sources(MACHINE);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(s[1].uri, "http://mirror.example/debian-security");
        let one = parse_apt_sources(
            "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bullseye main\n",
        );
        assert_eq!(
            one,
            [DebianSource {
                uri: "http://m.example/debian".into(),
                suites: vec!["bullseye".into()],
                signed_by: Some("/k.gpg".into()),
            }]
        );
    }

    #[test]
    fn our_sources_add_the_kernel_suites_to_the_machines() {
        let list = kernel_sources_list(&parse_apt_sources(MACHINE), "bookworm").unwrap();
        let lines: Vec<&str> = list.lines().filter(|l| l.starts_with("deb ")).collect();
        let k = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
        assert_eq!(
            lines,
            [
                format!("deb {k} http://mirror.example/debian bookworm main"),
                format!("deb {k} http://mirror.example/debian bookworm-updates main"),
                format!("deb {k} http://mirror.example/debian-security bookworm-security main"),
                format!("deb {k} http://mirror.example/debian bullseye main"),
                format!("deb {k} http://mirror.example/debian trixie main"),
                format!("deb {k} http://mirror.example/debian trixie-backports main"),
                format!("deb {k} http://mirror.example/debian sid main"),
                format!("deb {k} http://mirror.example/debian-security bullseye-security main"),
                format!("deb {k} http://mirror.example/debian-security trixie-security main"),
            ]
        );
        assert!(kernel_sources_list(&parse_apt_sources(MACHINE), "trixie").is_err());
    }
}
