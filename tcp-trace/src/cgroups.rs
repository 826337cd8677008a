//! Which container (or systemd unit) owns a socket. The eBPF side keeps, with each owner, the
//! cgroup v2 id of the task it learned the owner from (bpf_get_current_cgroup_id()); here that id
//! is resolved to the cgroup's path (the id is the inode number of the cgroup's directory in the
//! cgroup2 filesystem), and the path to a container id (docker, containerd, cri-o, podman
//! naming) or a systemd unit. Paths are relative to the cgroup2 root, as in /proc/PID/cgroup.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// A container, as its runtime names it in the cgroup tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Container {
    /// `docker`, `containerd`, `cri-o`, `podman`, or `kubernetes` (a kubepods cgroup whose
    /// runtime the path does not say).
    pub(crate) runtime: &'static str,
    /// The full container id (64 hex digits).
    pub(crate) id: String,
}

/// The identity behind one cgroup id. Serialized as `cgroup` in `--json` lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Identity {
    /// The cgroup v2 id (as the kernel gave it).
    pub(crate) id: u64,
    /// Its path below the cgroup2 root (`/system.slice/nginx.service`); null when it could not
    /// be resolved (the cgroup is gone, or this is a replay on another machine).
    pub(crate) path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) container: Option<Container>,
    /// The innermost systemd unit (`nginx.service`, `docker-<id>.scope`, `session-3.scope`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) unit: Option<String>,
}

impl Identity {
    pub(crate) fn from_path(id: u64, path: &str) -> Identity {
        let (container, unit) = parse_path(path);
        Identity {
            id,
            path: Some(path.to_string()),
            container,
            unit,
        }
    }

    /// The short form for text output and the metrics' `container` label: `docker:0123456789ab`
    /// (runtime and the id's first 12 digits, as `docker ps` shows it), else the systemd unit,
    /// else None.
    pub(crate) fn label(&self) -> Option<String> {
        match (&self.container, &self.unit) {
            (Some(c), _) => Some(format!("{}:{}", c.runtime, &c.id[..12.min(c.id.len())])),
            (None, Some(u)) => Some(u.clone()),
            _ => None,
        }
    }

    /// Whether this cgroup is `dir` (a path below the root) or inside it.
    pub(crate) fn within(&self, dir: &str) -> bool {
        self.path.as_deref().is_some_and(|p| {
            dir == "/"
                || p == dir
                || (p.starts_with(dir) && p.as_bytes().get(dir.len()) == Some(&b'/'))
        })
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container and systemd unit a cgroup path names, innermost first.
pub(crate) fn parse_path(path: &str) -> (Option<Container>, Option<String>) {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut container = None;
    for (i, part) in parts.iter().enumerate().rev() {
        let scoped = part.strip_suffix(".scope").unwrap_or(part);
        // systemd cgroup driver: <runtime prefix>-<id>.scope. The conmon scopes of cri-o and
        // podman hold the monitor, not the container.
        let by_prefix = [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("libpod-", "podman"),
        ]
        .iter()
        .find_map(|(prefix, runtime)| {
            scoped
                .strip_prefix(prefix)
                .filter(|id| is_container_id(id))
                .map(|id| (*runtime, id))
        });
        // cgroupfs driver: /docker/<id>, /kubepods/<qos>/pod<uid>/<id>, /libpod_parent/libpod-<id>.
        let bare = is_container_id(part).then(|| {
            let runtime = parts[..i]
                .iter()
                .find_map(|p| match *p {
                    "docker" => Some("docker"),
                    p if p.starts_with("libpod") => Some("podman"),
                    p if p.starts_with("crio") => Some("cri-o"),
                    p if p.contains("containerd") => Some("containerd"),
                    p if p.starts_with("kubepods") => Some("kubernetes"),
                    _ => None,
                })
                .unwrap_or("unknown");
            (runtime, *part)
        });
        if let Some((runtime, id)) = by_prefix.or(bare) {
            container = Some(Container {
                runtime,
                id: id.to_string(),
            });
            break;
        }
    }
    let unit = parts
        .iter()
        .rev()
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
        .map(|p| p.to_string());
    (container, unit)
}

/// Where the cgroup2 filesystem is mounted: /sys/fs/cgroup on unified hosts, often
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
        })
        // The shortest path: a container runtime may mount more below it.
        .min_by_key(|p| p.as_os_str().len())
        .context(
            "no cgroup2 filesystem is mounted: mount it (`mount -t cgroup2 none /sys/fs/cgroup`) \
             for container identity and --cgroup",
        )
}

/// Resolves cgroup ids to identities, from a scan of the cgroup2 tree (rescanned, at most once a
/// second, when an unknown id comes).
pub(crate) struct Cgroups {
    root: Option<PathBuf>,
    known: HashMap<u64, Arc<Identity>>,
    last_scan: Option<Instant>,
}

/// How many resolved ids are kept: far more cgroups than a host has; past it the cache starts
/// over from a fresh scan.
const MAX_KNOWN: usize = 200_000;
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Cgroup trees are shallow (systemd, kubepods: under 10 levels).
const MAX_DEPTH: usize = 32;

impl Cgroups {
    /// A resolver for this host's cgroup tree (or one that resolves nothing when there is no
    /// cgroup2 filesystem: ids are still reported).
    pub(crate) fn host() -> Cgroups {
        Cgroups {
            root: cgroup2_root().ok(),
            known: HashMap::new(),
            last_scan: None,
        }
    }

    /// A resolver that resolves nothing (replay on another machine): ids only.
    pub(crate) fn none() -> Cgroups {
        Cgroups {
            root: None,
            known: HashMap::new(),
            last_scan: None,
        }
    }

    /// The identity of cgroup `id` (None for 0: not known).
    pub(crate) fn resolve(&mut self, id: u64) -> Option<Arc<Identity>> {
        if id == 0 {
            return None;
        }
        if let Some(known) = self.known.get(&id) {
            return Some(known.clone());
        }
        let unknown = Arc::new(Identity {
            id,
            path: None,
            container: None,
            unit: None,
        });
        if self.root.is_some() && self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
            self.rescan();
            if let Some(known) = self.known.get(&id) {
                return Some(known.clone());
            }
            // The owner was in it when the event was made, and a scan since does not find it:
            // it is gone (ids are never reused), so stop looking.
            self.known.insert(id, unknown.clone());
        }
        Some(unknown)
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        if self.known.len() > MAX_KNOWN {
            self.known.clear();
        }
        // Cgroups that went away keep their entries: events of their sockets may still come.
        for (id, path) in scan(&root) {
            self.known
                .entry(id)
                .or_insert_with(|| Arc::new(Identity::from_path(id, &path)));
        }
    }
}

/// Every cgroup below `root`: (id, path below the root).
pub(crate) fn scan(root: &Path) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::from("/"), 0usize)];
    while let Some((dir, path, depth)) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        out.push((meta.ino(), path.clone()));
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let name = e.file_name().to_string_lossy().into_owned();
                let child = if path == "/" {
                    format!("/{name}")
                } else {
                    format!("{path}/{name}")
                };
                stack.push((e.path(), child, depth + 1));
            }
        }
    }
    out
}

/// A `--cgroup` argument: a directory of the cgroup2 filesystem (`/sys/fs/cgroup/system.slice`)
/// or a path below its root as /proc/PID/cgroup shows it (`/system.slice/nginx.service`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CgroupFilter {
    /// The path below the cgroup2 root.
    pub(crate) path: String,
    /// Its directory.
    pub(crate) dir: PathBuf,
}

impl CgroupFilter {
    pub(crate) fn parse(arg: &Path, root: &Path) -> Result<CgroupFilter> {
        let dir = if arg.starts_with(root) {
            arg.to_path_buf()
        } else {
            root.join(arg.strip_prefix("/").unwrap_or(arg))
        };
        let dir = dir.canonicalize().ok().filter(|d| d.is_dir());
        let Some(dir) = dir.filter(|d| d.starts_with(root)) else {
            bail!(
                "--cgroup {}: no such cgroup. Give a directory of the cgroup2 tree (under {}) or \
                 a path as /proc/PID/cgroup shows it (e.g. /system.slice/nginx.service)",
                arg.display(),
                root.display()
            );
        };
        let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
        let path = format!("/{}", rel.to_string_lossy());
        Ok(CgroupFilter { path, dir })
    }

    /// The ids of this cgroup and every cgroup below it now.
    pub(crate) fn ids(&self) -> Vec<u64> {
        scan(&self.dir).into_iter().map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1c2b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";

    fn container(path: &str) -> Option<(&'static str, String)> {
        parse_path(path).0.map(|c| (c.runtime, c.id))
    }

    #[test]
    fn container_runtimes_by_their_cgroup_names() {
        let cases = [
            (format!("/system.slice/docker-{ID}.scope"), "docker"),
            (format!("/docker/{ID}"), "docker"),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/\
                     cri-containerd-{ID}.scope"
                ),
                "containerd",
            ),
            (
                format!("/kubepods.slice/kubepods-pod99.slice/crio-{ID}.scope"),
                "cri-o",
            ),
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                "podman",
            ),
            (format!("/libpod_parent/libpod-{ID}"), "podman"),
            (format!("/kubepods/burstable/pod1234/{ID}"), "kubernetes"),
        ];
        for (path, runtime) in cases {
            assert_eq!(container(&path), Some((runtime, ID.to_string())), "{path}");
        }
        // The monitor's scope is not the container.
        assert_eq!(
            container(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            None
        );
        assert_eq!(container("/system.slice/nginx.service"), None);
        assert_eq!(container("/docker/notanid"), None);
    }

    #[test]
    fn units_and_labels() {
        let i = Identity::from_path(7, "/system.slice/nginx.service");
        assert_eq!(i.unit.as_deref(), Some("nginx.service"));
        assert_eq!(i.label().as_deref(), Some("nginx.service"));
        let i = Identity::from_path(8, &format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(i.label().as_deref(), Some("docker:3f4e1c2b9a8d"));
        let i = Identity::from_path(9, "/user.slice/user-0.slice/session-3.scope");
        assert_eq!(i.unit.as_deref(), Some("session-3.scope"));
        assert_eq!(Identity::from_path(1, "/").label(), None);
    }

    #[test]
    fn within_matches_whole_components() {
        let i = Identity::from_path(7, "/system.slice/nginx.service");
        assert!(i.within("/system.slice"));
        assert!(i.within("/system.slice/nginx.service"));
        assert!(i.within("/"));
        assert!(!i.within("/system.sl"));
        assert!(!i.within("/system.slice/nginx.service2"));
    }

    #[test]
    fn a_missing_cgroup_is_a_clear_error() {
        let root = std::env::temp_dir();
        let e = CgroupFilter::parse(Path::new("/no/such/cgroup-xyz"), &root).unwrap_err();
        assert!(
            format!("{e}").contains("--cgroup /no/such/cgroup-xyz: no such cgroup"),
            "{e}"
        );
    }
}
