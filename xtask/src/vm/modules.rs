//! Kernel modules for the guest: finding them in an extracted `lib/modules/<release>` tree,
//! resolving their dependencies (from `modules.dep` when the tree has one, else from each module's
//! `.modinfo`, since Debian's packages leave `modules.dep` to depmod at install time) and
//! decompressing them on the host so busybox `insmod` can load them.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::host::run_checked;

/// Modules loaded in the guest unless the job says otherwise (their dependencies come along).
/// veth for validate's namespace pairs; sch_ingress (clsact) and cls_bpf for its tc segment
/// dropper on kernels that attach tc programs through a qdisc (before tcx, 6.6); nf_tables for
/// firewall-based tests.
pub const DEFAULT_MODULES: &[&str] = &[
    "veth",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nft_reject_inet",
    "nft_ct",
];

/// Module names use `_`; file names may use `-`. Strips a `.ko[.xz|.gz|.zst]` suffix and any
/// directory.
pub fn normalize(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or(name);
    let base = [".ko.xz", ".ko.gz", ".ko.zst", ".ko"]
        .iter()
        .find_map(|s| base.strip_suffix(s))
        .unwrap_or(base);
    base.replace('-', "_")
}

/// What to load, in order, and what could not be.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModulePlan {
    /// Modules to insmod, dependencies first.
    pub load_order: Vec<String>,
    /// Requested (or needed) modules that this kernel has built in: nothing to load.
    pub builtin: Vec<String>,
    /// Requested modules that cannot be loaded, with the reason.
    pub missing: Vec<(String, String)>,
}

/// A module's direct dependencies.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModDeps {
    /// Must be loaded first (they export symbols the module uses).
    pub hard: Vec<String>,
    /// Should be loaded first when available: module names or aliases such as `crc32c`, which
    /// are tried as `<name>_generic` (the portable crypto implementation) and then `<name>`.
    pub soft_pre: Vec<String>,
}

impl ModDeps {
    pub fn hard(hard: Vec<String>) -> Self {
        Self {
            hard,
            soft_pre: Vec::new(),
        }
    }
}

/// Orders `requested` and their dependencies so that each module comes after what it needs.
/// `deps_of(name)` gives a module's direct dependencies, or `None` when the kernel does not ship
/// it; `is_builtin(name)` says whether it is compiled in. A requested module that is missing, or
/// that needs a missing one, lands in `missing` instead of failing the whole plan; soft
/// dependencies that are missing are skipped.
pub fn resolve(
    requested: &[String],
    mut deps_of: impl FnMut(&str) -> Result<Option<ModDeps>>,
    is_builtin: impl Fn(&str) -> bool,
) -> Result<ModulePlan> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Visiting,
        Done,
        Missing,
    }
    struct Walk<'a, F> {
        deps_of: F,
        is_builtin: &'a dyn Fn(&str) -> bool,
        state: HashMap<String, State>,
        plan: ModulePlan,
    }
    impl<F: FnMut(&str) -> Result<Option<ModDeps>>> Walk<'_, F> {
        /// Ok(Err(reason)) when `name` cannot be loaded.
        fn visit(&mut self, name: &str) -> Result<std::result::Result<(), String>> {
            match self.state.get(name) {
                Some(State::Done) => return Ok(Ok(())),
                Some(State::Missing) => return Ok(Err(format!("{name} is not available"))),
                Some(State::Visiting) => bail!("module dependency cycle through {name}"),
                None => {}
            }
            if (self.is_builtin)(name) {
                self.state.insert(name.to_owned(), State::Done);
                self.plan.builtin.push(name.to_owned());
                return Ok(Ok(()));
            }
            let Some(deps) = (self.deps_of)(name)? else {
                self.state.insert(name.to_owned(), State::Missing);
                return Ok(Err(format!("this kernel has no module {name}")));
            };
            self.state.insert(name.to_owned(), State::Visiting);
            for dep in deps.hard {
                if let Err(why) = self.visit(&dep)? {
                    self.state.insert(name.to_owned(), State::Missing);
                    return Ok(Err(format!("{name} needs {dep}: {why}")));
                }
            }
            for soft in deps.soft_pre {
                self.visit_soft(&soft)?;
            }
            self.state.insert(name.to_owned(), State::Done);
            self.plan.load_order.push(name.to_owned());
            Ok(Ok(()))
        }

        /// Loads the first available implementation of the soft dependency `alias`, if any.
        fn visit_soft(&mut self, alias: &str) -> Result<()> {
            for candidate in [format!("{alias}_generic"), alias.to_owned()] {
                match self.state.get(&candidate) {
                    Some(State::Done | State::Visiting) => return Ok(()),
                    Some(State::Missing) => continue,
                    None => {}
                }
                if (self.is_builtin)(&candidate) || (self.deps_of)(&candidate)?.is_some() {
                    // A soft dependency that cannot load is not the module's problem.
                    let _ = self.visit(&candidate)?;
                    return Ok(());
                }
            }
            Ok(())
        }
    }
    let mut walk = Walk {
        deps_of: &mut deps_of,
        is_builtin: &is_builtin,
        state: HashMap::new(),
        plan: ModulePlan::default(),
    };
    for name in requested {
        let name = normalize(name);
        if let Err(why) = walk.visit(&name)? {
            walk.plan.missing.push((name, why));
        }
    }
    Ok(walk.plan)
}

/// Parses `modules.dep` (`path: dep-path dep-path...`) into module name -> direct dependencies.
pub fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, deps)| {
            (
                normalize(m.trim()),
                deps.split_whitespace().map(normalize).collect(),
            )
        })
        .collect()
}

/// Names listed in `modules.builtin` (one path per line).
pub fn parse_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(normalize)
        .collect()
}

/// The modules of one extracted kernel, plus a cache of host-decompressed `.ko` files.
pub struct ModuleTree {
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
    dep_file: Option<HashMap<String, Vec<String>>>,
    ko_cache: PathBuf,
}

impl ModuleTree {
    /// Indexes `modules_dir` (a `lib/modules/<release>` directory); decompressed modules are
    /// kept in `ko_cache`.
    pub fn open(modules_dir: &Path, ko_cache: &Path) -> Result<Self> {
        let mut files = HashMap::new();
        let mut stack = vec![modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            let entries =
                fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
            for e in entries {
                let path = e?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.to_string_lossy().contains(".ko") {
                    files.insert(normalize(&path.to_string_lossy()), path);
                }
            }
        }
        let read = |n: &str| fs::read_to_string(modules_dir.join(n)).ok();
        Ok(Self {
            files,
            builtin: read("modules.builtin")
                .map(|t| parse_builtin(&t))
                .unwrap_or_default(),
            dep_file: read("modules.dep").map(|t| parse_modules_dep(&t)),
            ko_cache: ko_cache.to_owned(),
        })
    }

    /// The load plan for `requested` on this kernel.
    pub fn plan(&self, requested: &[String]) -> Result<ModulePlan> {
        resolve(
            requested,
            |name| self.deps_of(name),
            |name| self.builtin.contains(name),
        )
    }

    fn deps_of(&self, name: &str) -> Result<Option<ModDeps>> {
        if let Some(deps) = &self.dep_file {
            return Ok(deps.get(name).cloned().map(ModDeps::hard));
        }
        if !self.files.contains_key(name) {
            return Ok(None);
        }
        let ko = fs::read(self.decompressed(name)?)?;
        super::elf::module_deps(&ko)
            .with_context(|| format!("reading the .modinfo of {name}"))
            .map(Some)
    }

    /// The uncompressed `.ko` of module `name`, decompressing it into the cache the first time.
    pub fn decompressed(&self, name: &str) -> Result<PathBuf> {
        let src = self
            .files
            .get(name)
            .with_context(|| format!("no module {name} in this kernel"))?;
        let dest = self.ko_cache.join(format!("{name}.ko"));
        if dest.exists() {
            return Ok(dest);
        }
        fs::create_dir_all(&self.ko_cache)
            .with_context(|| format!("creating {}", self.ko_cache.display()))?;
        let src_s = src.to_string_lossy();
        let bytes = if src_s.ends_with(".ko") {
            fs::read(src)?
        } else if src_s.ends_with(".ko.xz") {
            run_checked(Command::new("xz").arg("-dc").arg(src))
                .context("decompressing a module needs `xz` (Debian package xz-utils)")?
                .stdout
        } else if src_s.ends_with(".ko.zst") {
            run_checked(Command::new("zstd").arg("-dcq").arg(src))
                .context("decompressing a module needs `zstd` (Debian package zstd)")?
                .stdout
        } else if src_s.ends_with(".ko.gz") {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(fs::File::open(src)?).read_to_end(&mut out)?;
            out
        } else {
            bail!("unknown module compression: {}", src.display());
        };
        let tmp = self
            .ko_cache
            .join(format!(".{name}.ko.{}", std::process::id()));
        fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &dest).with_context(|| format!("writing {}", dest.display()))?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const DEP: &str = "\
kernel/net/netfilter/nf_tables.ko.xz: kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nfnetlink.ko.xz:
kernel/lib/libcrc32c.ko.xz:
kernel/net/netfilter/nft_ct.ko.xz: kernel/net/netfilter/nf_conntrack.ko.xz kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nfnetlink.ko.xz kernel/lib/libcrc32c.ko.xz
kernel/net/netfilter/nf_conntrack.ko.xz: kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz kernel/lib/libcrc32c.ko.xz kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko.xz
kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz:
kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko.xz:
kernel/drivers/net/veth.ko.xz:
kernel/net/netfilter/nft-broken.ko.xz: kernel/net/netfilter/gone.ko.xz
";

    fn plan(requested: &[&str], builtin: &[&str]) -> ModulePlan {
        let deps = parse_modules_dep(DEP);
        let builtin: HashSet<String> = names(builtin).into_iter().collect();
        resolve(
            &names(requested),
            |n| Ok(deps.get(n).cloned().map(ModDeps::hard)),
            |n| builtin.contains(n),
        )
        .unwrap()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let p = plan(&["veth", "nf_tables", "nft_ct"], &[]);
        assert_eq!(
            p.load_order,
            names(&[
                "veth",
                "nfnetlink",
                "libcrc32c",
                "nf_tables",
                "nf_defrag_ipv6",
                "nf_defrag_ipv4",
                "nf_conntrack",
                "nft_ct"
            ])
        );
        assert!(p.missing.is_empty() && p.builtin.is_empty());
        for (i, m) in p.load_order.iter().enumerate() {
            for d in &parse_modules_dep(DEP)[m] {
                let j = p.load_order.iter().position(|x| x == d).unwrap();
                assert!(j < i, "{d} must load before {m}");
            }
        }
    }

    #[test]
    fn missing_and_builtin_are_reported_not_fatal() {
        let p = plan(
            &["nft_reject_inet", "veth", "nft-broken", "libcrc32c"],
            &["veth"],
        );
        assert_eq!(p.load_order, names(&["libcrc32c"]));
        assert_eq!(p.builtin, names(&["veth"]));
        let missing: Vec<&str> = p.missing.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(missing, ["nft_reject_inet", "nft_broken"]);
        assert!(p.missing[1].1.contains("gone"), "{:?}", p.missing);
    }

    #[test]
    fn soft_dependencies_prefer_generic_and_are_optional() {
        let table: HashMap<&str, ModDeps> = HashMap::from([
            (
                "libcrc32c",
                ModDeps {
                    hard: vec![],
                    soft_pre: names(&["crc32c"]),
                },
            ),
            ("crc32c_generic", ModDeps::default()),
            ("crc32c_intel", ModDeps::default()),
            (
                "needs_ghost",
                ModDeps {
                    hard: vec![],
                    soft_pre: names(&["ghost"]),
                },
            ),
        ]);
        let p = resolve(
            &names(&["libcrc32c", "needs_ghost"]),
            |n| Ok(table.get(n).cloned()),
            |_| false,
        )
        .unwrap();
        assert_eq!(
            p.load_order,
            names(&["crc32c_generic", "libcrc32c", "needs_ghost"])
        );
        assert!(p.missing.is_empty(), "{:?}", p.missing);
        // Built in: nothing to load.
        let p = resolve(
            &names(&["libcrc32c"]),
            |n| Ok(table.get(n).cloned()),
            |n| n == "crc32c_generic",
        )
        .unwrap();
        assert_eq!(p.load_order, names(&["libcrc32c"]));
        assert_eq!(p.builtin, names(&["crc32c_generic"]));
    }

    #[test]
    fn cycles_are_errors() {
        let deps = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n");
        assert!(
            resolve(
                &names(&["a"]),
                |n| Ok(deps.get(n).cloned().map(ModDeps::hard)),
                |_| false
            )
            .is_err()
        );
    }

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize("kernel/net/foo-bar.ko.xz"), "foo_bar");
        assert_eq!(normalize("veth.ko"), "veth");
        assert_eq!(normalize("nf_tables"), "nf_tables");
        assert!(parse_builtin("kernel/net/ipv4/tcp_cubic.ko\n\n").contains("tcp_cubic"));
    }
}
