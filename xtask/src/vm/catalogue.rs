//! The kernel catalogue and the pure logic that picks a Debian package for a catalogue entry:
//! glob matching on package names, parsing `apt-cache policy` output and comparing Debian versions.

use std::cmp::Ordering;

use anyhow::{Result, bail};

/// One kernel the VM runner can boot: a family of Debian `linux-image-*` packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSpec {
    /// Short name used on the command line (`--kernel 6.12`).
    pub name: &'static str,
    /// Debian package name patterns; `*` matches any run of characters without `-`, so the
    /// `-cloud-` and `-rt-` flavours of a version do not match. The newest package matching any
    /// of them is taken (some suites ship a kernel only as the signed `linux-image-*-amd64`,
    /// whose .deb holds the same vmlinuz as the `-unsigned` one).
    pub package_globs: &'static [&'static str],
    /// Package used when apt offers nothing matching the globs (or its download fails).
    pub pinned_fallback: &'static str,
}

impl KernelSpec {
    /// Whether `package` belongs to this entry.
    pub fn matches(&self, package: &str) -> bool {
        self.package_globs.iter().any(|g| glob_matches(g, package))
    }
}

/// Every kernel `vm-run --kernel all` and the VM tests boot, oldest first. Adding a kernel is one
/// line. The suites they come from (bullseye, bookworm, trixie, trixie-backports, sid) are in the
/// project's own apt sources (`cargo xtask setup`).
pub const KERNELS: &[KernelSpec] = &[
    // Debian 11 (bullseye), the 5.10 longterm: what Amazon Linux 2 and older fleets run.
    KernelSpec {
        name: "5.10",
        package_globs: &["linux-image-5.10.0-*-amd64-unsigned"],
        pinned_fallback: "linux-image-5.10.0-46-amd64-unsigned",
    },
    KernelSpec {
        name: "6.1",
        package_globs: &["linux-image-6.1.0-*-amd64-unsigned"],
        pinned_fallback: "linux-image-6.1.0-47-amd64-unsigned",
    },
    KernelSpec {
        name: "6.12",
        package_globs: &["linux-image-6.12*-amd64-unsigned"],
        pinned_fallback: "linux-image-6.12.117+deb12-amd64-unsigned",
    },
    // This machine's own series, but a Debian build with kprobes and fentry allowed.
    KernelSpec {
        name: "6.18",
        package_globs: &[
            "linux-image-6.18*-amd64-unsigned",
            "linux-image-6.18*-amd64",
        ],
        pinned_fallback: "linux-image-6.18.15+deb13-amd64",
    },
    // The newest Debian kernel (trixie-backports or sid), whatever 7.x apt offers today.
    KernelSpec {
        name: "7.x",
        package_globs: &["linux-image-7.*-amd64-unsigned", "linux-image-7.*-amd64"],
        pinned_fallback: "linux-image-7.3.4+deb13-amd64",
    },
];

/// The catalogue entry called `name`.
pub fn kernel_spec(name: &str) -> Result<&'static KernelSpec> {
    match KERNELS.iter().find(|k| k.name == name) {
        Some(k) => Ok(k),
        None => bail!(
            "unknown kernel {name:?}; the catalogue has {} (or use `all`); add a line to KERNELS in \
             xtask/src/vm/catalogue.rs for another one",
            catalogue_names()
        ),
    }
}

/// The catalogue entries selected by `name`: one entry, or all of them for `all`.
pub fn kernels_for(name: &str) -> Result<Vec<&'static KernelSpec>> {
    if name == "all" {
        Ok(KERNELS.iter().collect())
    } else {
        Ok(vec![kernel_spec(name)?])
    }
}

fn catalogue_names() -> String {
    KERNELS
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `name` matches `glob`, where `*` matches any run (possibly empty) of characters other
/// than `-` and every other character matches itself.
pub fn glob_matches(glob: &str, name: &str) -> bool {
    fn go(g: &[u8], n: &[u8]) -> bool {
        match g.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => {
                // Try every split point up to the first '-' in the name.
                let mut i = 0;
                loop {
                    if go(rest, &n[i..]) {
                        return true;
                    }
                    if i == n.len() || n[i] == b'-' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(glob.as_bytes(), name.as_bytes())
}

/// An anchored POSIX extended regex (as `apt-cache search` takes) matching a superset of `glob`.
pub fn glob_to_regex(glob: &str) -> String {
    let mut re = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => re.push_str("[^-]*"),
            '.' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' | '\\' => {
                re.push('\\');
                re.push(c);
            }
            c => re.push(c),
        }
    }
    re.push('$');
    re
}

/// Package names from `apt-cache search --names-only` output (`name - description` lines) that
/// belong to `spec`.
pub fn parse_search(output: &str, spec: &KernelSpec) -> Vec<String> {
    let mut names: Vec<String> = output
        .lines()
        .filter_map(|l| l.split(" - ").next())
        .map(str::trim)
        .filter(|n| spec.matches(n))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// `(package, candidate version)` pairs from `apt-cache policy PKG...` output; packages whose
/// candidate is `(none)` (listed but not installable) are left out.
pub fn parse_policy(output: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in output.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            current = Some(line.trim_end_matches(':').to_owned());
        } else if let Some(v) = line.trim().strip_prefix("Candidate:") {
            let v = v.trim();
            if let Some(pkg) = current.take()
                && v != "(none)"
                && !v.is_empty()
            {
                out.push((pkg, v.to_owned()));
            }
        }
    }
    out
}

/// The package with the highest Debian version among `candidates` (ties: the greater name).
pub fn choose_newest(candidates: &[(String, String)]) -> Option<&(String, String)> {
    candidates
        .iter()
        .max_by(|a, b| deb_version_cmp(&a.1, &b.1).then_with(|| a.0.cmp(&b.0)))
}

/// Compares two Debian version strings the way `dpkg --compare-versions` does.
pub fn deb_version_cmp(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua, ub))
        .then_with(|| verrevcmp(ra, rb))
}

/// dpkg's `verrevcmp`: alternating non-digit runs (compared with `~` before everything, letters
/// before other characters) and digit runs (compared numerically).
fn verrevcmp(a: &str, b: &str) -> Ordering {
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(c) => i32::from(c) + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (ca, cb) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ca != cb {
                return ca.cmp(&cb);
            }
            i += 1;
            j += 1;
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEARCH: &str = "\
linux-image-6.1.0-47-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-47-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-56-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-56-rt-amd64-unsigned - Linux 6.1 for 64-bit PCs, PREEMPT_RT
linux-image-6.1.0-9-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.12.115+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12-amd64-dbg - Debugging symbols for Linux amd64 configuration (meta-package)
linux-image-6.12.117+deb12-amd64-dbg - Debug symbols
";

    const POLICY: &str = "\
linux-image-6.1.0-47-amd64-unsigned:
  Installed: (none)
  Candidate: 6.1.170-1
  Version table:
     6.1.170-1 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-image-6.1.0-56-amd64-unsigned:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
     6.1.192-2 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
linux-image-6.1.0-9-amd64-unsigned:
  Installed: (none)
  Candidate: (none)
  Version table:
";

    #[test]
    fn glob_excludes_flavours() {
        let g61 = kernel_spec("6.1").unwrap().package_globs[0];
        let g612 = kernel_spec("6.12").unwrap().package_globs[0];
        assert!(glob_matches(g61, "linux-image-6.1.0-47-amd64-unsigned"));
        assert!(!glob_matches(
            g61,
            "linux-image-6.1.0-47-cloud-amd64-unsigned"
        ));
        assert!(!glob_matches(
            g61,
            "linux-image-6.12.117+deb12-amd64-unsigned"
        ));
        assert!(glob_matches(
            g612,
            "linux-image-6.12.117+deb12-amd64-unsigned"
        ));
        assert!(!glob_matches(
            g612,
            "linux-image-6.12.117+deb12-rt-amd64-unsigned"
        ));
        assert!(!glob_matches(g612, "linux-image-6.12-amd64-dbg"));
        assert!(glob_matches("a*", "a"));
        assert!(!glob_matches("a*b", "a-b"));
    }

    #[test]
    fn search_then_policy_picks_newest_installable() {
        let names = parse_search(SEARCH, kernel_spec("6.1").unwrap());
        assert_eq!(
            names,
            [
                "linux-image-6.1.0-47-amd64-unsigned",
                "linux-image-6.1.0-56-amd64-unsigned",
                "linux-image-6.1.0-9-amd64-unsigned"
            ]
        );
        let cands = parse_policy(POLICY);
        assert_eq!(cands.len(), 2, "(none) candidates are dropped: {cands:?}");
        let newest = choose_newest(&cands).unwrap();
        assert_eq!(newest.0, "linux-image-6.1.0-56-amd64-unsigned");
        assert_eq!(newest.1, "6.1.192-2");

        let names = parse_search(SEARCH, kernel_spec("6.12").unwrap());
        assert_eq!(
            names,
            [
                "linux-image-6.12.115+deb12-amd64-unsigned",
                "linux-image-6.12.117+deb12-amd64-unsigned"
            ]
        );
        assert!(choose_newest(&[]).is_none());
    }

    #[test]
    fn debian_versions_compare_like_dpkg() {
        use Ordering::*;
        let cases = [
            ("6.1.192-2", "6.1.170-1", Greater),
            ("6.12.117-1~deb12u1", "6.12.115-2~deb12u1", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0-0", Equal),
            ("1:0.9", "2.0", Greater),
            ("1.0a", "1.0+", Less),
            ("1.10", "1.9", Greater),
            ("1.001", "1.1", Equal),
            ("6.1.170-1", "6.1.170-1", Equal),
        ];
        for (a, b, want) in cases {
            assert_eq!(deb_version_cmp(a, b), want, "{a} vs {b}");
            assert_eq!(deb_version_cmp(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn agrees_with_dpkg_when_installed() {
        let pairs = [
            ("6.1.192-2", "6.1.170-1"),
            ("6.12.117-1~deb12u1", "6.12.117-1"),
            ("1.2.3a~b", "1.2.3a"),
            ("2:1.0", "1:9.9"),
            ("1.0+dfsg-1", "1.0-1"),
        ];
        for (a, b) in pairs {
            let dpkg = |op: &str| {
                std::process::Command::new("dpkg")
                    .args(["--compare-versions", a, op, b])
                    .status()
                    .ok()
                    .map(|s| s.success())
            };
            let Some(gt) = dpkg("gt") else { return };
            let lt = dpkg("lt").unwrap_or(false);
            let want = if gt {
                Ordering::Greater
            } else if lt {
                Ordering::Less
            } else {
                Ordering::Equal
            };
            assert_eq!(deb_version_cmp(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn regex_escapes_and_anchors() {
        assert_eq!(
            glob_to_regex("linux-image-6.12*-amd64"),
            r"^linux-image-6\.12[^-]*-amd64$"
        );
        assert_eq!(glob_to_regex("a+b"), r"^a\+b$");
    }

    #[test]
    fn catalogue_lookup() {
        assert_eq!(kernel_spec("6.12").unwrap().name, "6.12");
        assert!(kernel_spec("5.4").is_err());
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        assert_eq!(names, ["5.10", "6.1", "6.12", "6.18", "7.x"]);
        assert_eq!(kernels_for("all").unwrap().len(), KERNELS.len());
        for k in KERNELS {
            assert!(k.matches(k.pinned_fallback), "{k:?}");
        }
        let newest = kernel_spec("7.x").unwrap();
        assert!(newest.matches("linux-image-7.2.3-amd64"));
        assert!(newest.matches("linux-image-7.3.4+deb13-amd64-unsigned"));
        assert!(!newest.matches("linux-image-7.3.4+deb13-cloud-amd64"));
        assert!(!newest.matches("linux-image-7.3.4+deb13-amd64-dbg"));
        let old = kernel_spec("5.10").unwrap();
        assert!(old.matches("linux-image-5.10.0-46-amd64-unsigned"));
        assert!(!old.matches("linux-image-5.10.0-35-rt-amd64-unsigned"));
    }
}
