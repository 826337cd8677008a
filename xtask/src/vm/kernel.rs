//! Fetching and caching Debian kernels: pick the newest package apt offers for a catalogue entry,
//! download it once, and keep vmlinuz, its config and its module tree under
//! `<cache>/kernels/<package>/`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use super::catalogue::{self, KernelSpec};
use super::host::{self, say};
use super::modules::ModuleTree;

/// Marker written last into a kernel's cache directory: its presence means the entry is whole.
const COMPLETE: &str = ".complete";

/// A kernel ready to boot, out of the cache.
#[derive(Debug, Clone)]
pub struct PreparedKernel {
    /// The catalogue name (`6.12`).
    pub name: String,
    /// The Debian package it came from.
    pub package: String,
    /// That package's Debian version (`6.12.117-1~deb12u1`), as apt reported it.
    pub version: String,
    /// The kernel release (`uname -r` in the guest).
    pub release: String,
    /// `<cache>/kernels/<package>`.
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` as shipped (modules still compressed).
    pub modules_dir: PathBuf,
}

impl PreparedKernel {
    fn load(name: &str, dir: &Path) -> Result<Self> {
        let read = |f: &str| -> Result<String> {
            Ok(fs::read_to_string(dir.join(f))
                .with_context(|| format!("reading {}", dir.join(f).display()))?
                .trim()
                .to_owned())
        };
        let release = read("release")?;
        Ok(Self {
            name: name.to_owned(),
            package: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            version: read("version").unwrap_or_default(),
            modules_dir: dir.join("modules").join(&release),
            vmlinuz: dir.join("vmlinuz"),
            release,
            dir: dir.to_owned(),
        })
    }

    /// The module tree, with decompressed modules cached in `<dir>/ko/`.
    pub fn module_tree(&self) -> Result<ModuleTree> {
        ModuleTree::open(&self.modules_dir, &self.dir.join("ko"))
    }
}

/// Complete cache entries for `spec`, newest package version first.
pub fn cached_kernels(spec: &KernelSpec) -> Result<Vec<PreparedKernel>> {
    let dir = host::kernels_dir()?;
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for e in entries {
        let path = e?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = spec.matches(&name) || name == spec.pinned_fallback;
        if ours && path.join(COMPLETE).exists() {
            found.push(PreparedKernel::load(spec.name, &path)?);
        }
    }
    found.sort_by(|a, b| catalogue::deb_version_cmp(&b.version, &a.version));
    Ok(found)
}

/// The newest installable package apt offers for `spec` with its version, from the project's own
/// apt lists (`cargo xtask setup`: the machine's suites plus bullseye, trixie, trixie-backports
/// and sid), refreshing them once when they have nothing matching. `None` when apt offers nothing.
pub fn newest_available(spec: &KernelSpec) -> Result<Option<(String, String)>> {
    let apt = crate::setup::kernel_apt()?;
    let search = || -> Result<Vec<String>> {
        let mut names = Vec::new();
        for glob in spec.package_globs {
            let out = host::run_checked(apt.command("apt-cache").args([
                "search",
                "--names-only",
                &catalogue::glob_to_regex(glob),
            ]))?;
            names.extend(catalogue::parse_search(
                &String::from_utf8_lossy(&out.stdout),
                spec,
            ));
        }
        names.sort();
        names.dedup();
        Ok(names)
    };
    let mut names = search()?;
    if names.is_empty() && refresh_once(&apt)? {
        names = search()?;
    }
    if names.is_empty() {
        return Ok(None);
    }
    let out = host::run_checked(apt.command("apt-cache").arg("policy").args(&names))?;
    let candidates = catalogue::parse_policy(&String::from_utf8_lossy(&out.stdout));
    Ok(catalogue::choose_newest(&candidates).cloned())
}

/// Refreshes the project's kernel lists at most once per process; whether it ran now.
fn refresh_once(apt: &crate::setup::KernelApt) -> Result<bool> {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(false);
    }
    apt.update()?;
    Ok(true)
}

/// Makes `spec`'s newest kernel available in the cache (downloading and extracting it when it is
/// not there yet) and returns it. Falls back to the pinned package, then to the newest cached one.
/// The answer is remembered for the rest of the process (later calls neither ask apt nor print).
pub fn prepare_kernel(spec: &KernelSpec) -> Result<PreparedKernel> {
    static PREPARED: Mutex<BTreeMap<String, PreparedKernel>> = Mutex::new(BTreeMap::new());
    // Held while preparing, so threads booting the same kernel download it once.
    let mut prepared = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{}\0{}", spec.name, spec.package_globs.join(" "));
    if let Some(k) = prepared.get(&key) {
        return Ok(k.clone());
    }
    let k = prepare_uncached(spec)?;
    prepared.insert(key, k.clone());
    Ok(k)
}

fn prepare_uncached(spec: &KernelSpec) -> Result<PreparedKernel> {
    let root = host::kernels_dir()?;
    let cached = cached_kernels(spec)?;
    let wanted = match newest_available(spec) {
        Ok(Some((pkg, version))) => Some((pkg, version)),
        Ok(None) => {
            say!(
                "kernel {}: apt offers nothing matching {}; trying {}",
                spec.name,
                spec.package_globs.join(" or "),
                spec.pinned_fallback
            );
            None
        }
        Err(e) => {
            if let Some(k) = cached.first() {
                say!(
                    "kernel {}: cannot ask apt ({e:#}); using cached {}",
                    spec.name,
                    k.package
                );
                return Ok(k.clone());
            }
            say!(
                "kernel {}: cannot ask apt for {} ({e:#}); trying {}",
                spec.name,
                spec.package_globs.join(" or "),
                spec.pinned_fallback
            );
            None
        }
    };
    let mut to_try: Vec<(String, String)> = Vec::new();
    if let Some(w) = wanted {
        to_try.push(w);
    }
    if !to_try.iter().any(|(p, _)| p == spec.pinned_fallback) {
        to_try.push((spec.pinned_fallback.to_owned(), String::new()));
    }
    let mut errors = Vec::new();
    for (pkg, version) in &to_try {
        if let Some(k) = cached.iter().find(|k| &k.package == pkg) {
            say!(
                "kernel {}: using cached {} ({})",
                spec.name,
                k.package,
                k.release
            );
            return Ok(k.clone());
        }
        match download_and_extract(spec, pkg, version, &root) {
            Ok(k) => return Ok(k),
            Err(e) => {
                say!("kernel {}: could not fetch {pkg}: {e:#}", spec.name);
                errors.push(format!("{pkg}: {e:#}"));
            }
        }
        // An older cached kernel of the same series beats fetching the pinned one.
        if let Some(k) = cached.first() {
            say!(
                "kernel {}: falling back to cached {} ({})",
                spec.name,
                k.package,
                k.release
            );
            return Ok(k.clone());
        }
    }
    bail!(
        "could not get a kernel for {} ({}):\n  {}\nCheck that the Debian mirror is reachable \
         (apt-get update), or update the catalogue in xtask/src/vm/catalogue.rs",
        spec.name,
        spec.package_globs.join(" or "),
        errors.join("\n  ")
    )
}

fn download_and_extract(
    spec: &KernelSpec,
    pkg: &str,
    version: &str,
    root: &Path,
) -> Result<PreparedKernel> {
    let staging = root.join(format!(".staging-{pkg}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let result = (|| {
        say!(
            "kernel {}: downloading {pkg} {version}(apt-get download)",
            spec.name,
            version = if version.is_empty() {
                String::new()
            } else {
                format!("{version} ")
            }
        );
        let dl = staging.join("download");
        let apt = crate::setup::kernel_apt()?;
        let deb = match host::apt_download(&apt, pkg, &dl) {
            Ok(deb) => deb,
            // The lists may be stale (the mirror dropped that version): refresh once and retry.
            Err(e) => {
                if refresh_once(&apt)? {
                    host::apt_download(&apt, pkg, &dl)?
                } else {
                    return Err(e);
                }
            }
        };
        say!(
            "kernel {}: extracting {}",
            spec.name,
            deb.file_name().unwrap_or_default().to_string_lossy()
        );
        let x = staging.join("x");
        host::run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;
        // Newer Debian kernels (7.x) split the image: linux-image-<abi> only depends on
        // linux-binary-<abi> (vmlinuz) and linux-modules-<abi>. Fetch those into the same tree.
        for part in split_parts(&deb_field(&deb, "Depends").unwrap_or_default()) {
            say!("kernel {}: {pkg} is split: downloading {part}", spec.name);
            let part_deb = host::apt_download(&apt, &part, &dl)?;
            host::run_checked(Command::new("dpkg-deb").arg("-x").arg(&part_deb).arg(&x))?;
        }
        let entry = staging.join("entry");
        fs::create_dir_all(&entry)?;
        let found = find_vmlinuz(&x).with_context(|| {
            format!("{pkg} has neither /boot/vmlinuz-* nor /usr/lib/modules/*/vmlinuz")
        })?;
        let (vmlinuz, release, config) = found;
        fs::rename(&vmlinuz, entry.join("vmlinuz"))?;
        if let Some(config) = config {
            fs::rename(config, entry.join("config"))?;
        }
        let modules = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| x.join(d).join(&release))
            .find(|d| d.is_dir())
            .with_context(|| format!("{pkg} has no lib/modules/{release}"))?;
        fs::create_dir_all(entry.join("modules"))?;
        fs::rename(&modules, entry.join("modules").join(&release))?;
        let version = if version.is_empty() {
            deb_version(&deb).unwrap_or_default()
        } else {
            version.to_owned()
        };
        fs::write(entry.join("release"), format!("{release}\n"))?;
        fs::write(entry.join("version"), format!("{version}\n"))?;
        fs::write(entry.join(COMPLETE), "")?;
        let dest = root.join(pkg);
        if let Err(e) = fs::rename(&entry, &dest) {
            // Another run may have finished the same package first; use its copy.
            if !dest.join(COMPLETE).exists() {
                return Err(e)
                    .with_context(|| format!("moving the kernel into {}", dest.display()));
            }
        }
        let k = PreparedKernel::load(spec.name, &dest)?;
        say!(
            "kernel {}: cached {} ({}) in {}",
            spec.name,
            pkg,
            k.release,
            dest.display()
        );
        Ok(k)
    })();
    let _ = fs::remove_dir_all(&staging);
    result
}

fn deb_version(deb: &Path) -> Result<String> {
    deb_field(deb, "Version")
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = host::run_checked(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The parts of a split kernel package, from its `Depends`: `linux-binary-*` and
/// `linux-modules-*` (none for the older, whole packages).
pub fn split_parts(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .filter(|n| n.starts_with("linux-binary-") || n.starts_with("linux-modules-"))
        .map(str::to_owned)
        .collect()
}

/// vmlinuz, its release and its config in an extracted kernel package: `boot/vmlinuz-<release>`
/// (and `boot/config-<release>`), or `usr/lib/modules/<release>/vmlinuz` (and `config` beside it).
fn find_vmlinuz(x: &Path) -> Option<(PathBuf, String, Option<PathBuf>)> {
    if let Ok(dir) = fs::read_dir(x.join("boot")) {
        let files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        if let Some(v) = files.iter().find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        }) {
            let release = v.file_name()?.to_string_lossy()["vmlinuz-".len()..].to_owned();
            let config = x.join("boot").join(format!("config-{release}"));
            return Some((v.clone(), release, config.is_file().then_some(config)));
        }
    }
    for modules in ["usr/lib/modules", "lib/modules"] {
        let Ok(dir) = fs::read_dir(x.join(modules)) else {
            continue;
        };
        for d in dir.filter_map(|e| e.ok().map(|e| e.path())) {
            let v = d.join("vmlinuz");
            if v.is_file() {
                let config = d.join("config");
                let release = d.file_name()?.to_string_lossy().into_owned();
                return Some((v, release, config.is_file().then_some(config)));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_packages_name_their_parts() {
        let deps = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                    linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), \
                    linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), \
                    linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)";
        assert_eq!(
            split_parts(deps),
            [
                "linux-binary-7.3.4+deb13-amd64",
                "linux-modules-7.3.4+deb13-amd64"
            ]
        );
        assert!(split_parts("kmod, linux-base (>= 4.3~), initramfs-tools").is_empty());
    }

    #[test]
    fn vmlinuz_is_found_in_both_layouts() {
        let root = std::env::temp_dir().join(format!("vmlinuz-layout-{}", std::process::id()));
        let old = root.join("old");
        fs::create_dir_all(old.join("boot")).unwrap();
        fs::write(old.join("boot/vmlinuz-6.1.0-57-amd64"), "k").unwrap();
        fs::write(old.join("boot/config-6.1.0-57-amd64"), "c").unwrap();
        let (v, r, c) = find_vmlinuz(&old).unwrap();
        assert_eq!(r, "6.1.0-57-amd64");
        assert!(v.ends_with("boot/vmlinuz-6.1.0-57-amd64") && c.is_some());
        let new = root.join("new");
        fs::create_dir_all(new.join("usr/lib/modules/7.3.4+deb13-amd64/kernel")).unwrap();
        fs::write(new.join("usr/lib/modules/7.3.4+deb13-amd64/vmlinuz"), "k").unwrap();
        let (_, r, c) = find_vmlinuz(&new).unwrap();
        assert_eq!(r, "7.3.4+deb13-amd64");
        assert!(c.is_none());
        assert!(find_vmlinuz(&root.join("none")).is_none());
        fs::remove_dir_all(&root).unwrap();
    }
}
