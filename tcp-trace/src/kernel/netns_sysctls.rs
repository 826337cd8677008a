//! The model's sysctls as each network namespace has them: read by a thread that setns()es into
//! the namespace (its /proc/sys/net is that namespace's), found through a process living there,
//! and cached per namespace, so that the live tracer judges each flow with its own namespace's
//! settings.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    time::{Duration, Instant},
};

/// Dotted sysctl name to value.
pub(crate) type Sysctls = BTreeMap<String, String>;

/// Per namespace inode, its sysctls (None: no process found there, or unreadable).
pub(crate) struct NetnsSysctls {
    keys: &'static [&'static str],
    own_netns: Option<u32>,
    /// By inode: when it was read, and what.
    cache: HashMap<u32, (Instant, Sysctls)>,
}

/// Namespaces kept at most; beyond it the one read longest ago makes room.
const MAX_NAMESPACES: usize = 4096;
/// A namespace's values are read again after this long: namespaces die unseen (no hook tells),
/// and the kernel hands a dead one's inode number to the next, whose sysctls may differ.
const REFRESH: Duration = Duration::from_secs(60);

fn netns_inode(path: &std::path::Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.ino() as u32)
}

/// `/proc/PID/ns/net` of a process (or one of its threads) in namespace `inode`, trying `hint`
/// first, then every process.
fn find_netns_file(inode: u32, hint: Option<u32>) -> Option<PathBuf> {
    let in_ns = |p: &PathBuf| netns_inode(p) == Some(inode);
    if let Some(pid) = hint {
        let own = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if in_ns(&own) {
            return Some(own);
        }
        // A thread of it may have entered the namespace on its own. (A hint that has exited,
        // or pid 0 from a softirq, falls through to the scan.)
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = task.path().join("ns/net");
            if in_ns(&path) {
                return Some(path);
            }
        }
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .map(|e| e.path().join("ns/net"))
        .find(in_ns)
}

/// Reads `keys` inside the namespace of `ns_file`, on a thread of its own.
fn read_inside(ns_file: PathBuf, keys: &'static [&'static str]) -> Option<Sysctls> {
    let ns = File::open(ns_file).ok()?;
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace fd; it changes only this short-lived thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        let read = |k: &str| {
            let path = format!("/proc/sys/{}", k.replace('.', "/"));
            std::fs::read_to_string(path)
                .ok()
                .map(|v| (k.to_string(), v.trim().to_string()))
        };
        Some(keys.iter().filter_map(|k| read(k)).collect())
    })
    .join()
    .ok()
    .flatten()
}

impl NetnsSysctls {
    /// Reads `keys` (dotted sysctl names) per namespace.
    pub(crate) fn new(keys: &'static [&'static str]) -> NetnsSysctls {
        NetnsSysctls {
            keys,
            own_netns: netns_inode(std::path::Path::new("/proc/self/ns/net")),
            cache: HashMap::new(),
        }
    }

    /// Namespace `inode`'s sysctls, when it is not tcp-trace's own and could be read; `hint`: a
    /// process that may live there (the socket's owner). Read once per namespace and again
    /// after [`REFRESH`]; if no process lives there by then, the values read before stand.
    pub(crate) fn get(&mut self, inode: u32, hint: Option<u32>) -> Option<&Sysctls> {
        if inode == 0 || Some(inode) == self.own_netns {
            return None;
        }
        let now = Instant::now();
        let fresh = self
            .cache
            .get(&inode)
            .is_some_and(|(at, _)| now.duration_since(*at) < REFRESH);
        if !fresh {
            // No process there now (it may show up later): nothing cached, asked again later.
            match find_netns_file(inode, hint).and_then(|f| read_inside(f, self.keys)) {
                Some(read) => {
                    if !self.cache.contains_key(&inode) && self.cache.len() >= MAX_NAMESPACES {
                        let oldest = self.cache.iter().min_by_key(|(_, (at, _))| *at);
                        if let Some(&oldest) = oldest.map(|(k, _)| k) {
                            self.cache.remove(&oldest);
                        }
                    }
                    self.cache.insert(inode, (now, read));
                }
                None => {
                    if let Some((at, _)) = self.cache.get_mut(&inode) {
                        *at = now;
                    }
                }
            }
        }
        self.cache.get(&inode).map(|(_, s)| s)
    }

    /// Every namespace a process lives in now, other than tcp-trace's own, with its sysctls.
    pub(crate) fn all_current(&mut self) -> BTreeMap<u32, Sysctls> {
        let inodes: std::collections::BTreeSet<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|e| netns_inode(&e.path().join("ns/net")))
            .collect();
        inodes
            .into_iter()
            .filter_map(|i| self.get(i, None).cloned().map(|s| (i, s)))
            .collect()
    }
}
