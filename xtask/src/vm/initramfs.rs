//! The guest's initramfs: a newc cpio writer, a small file tree with parent directories filled
//! in, and the `/init` script that mounts the kernel file systems, loads modules, runs the job and
//! reports its exit status on the second serial port.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// Writes a cpio archive in the "newc" format (`cpio -H newc`), which the kernel unpacks as an
/// initramfs. Entries must come parents first; inode numbers are assigned in order, mtimes are 0.
pub struct CpioWriter<W: Write> {
    out: W,
    pos: u64,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            pos: 0,
            next_ino: 1,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.pos % 4) as usize) % 4;
        self.write(&[0u8; 3][..pad])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: file too large for cpio"),
            )
        })?;
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            maj = 0,
            min = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0,
        );
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad4()?;
        self.write(data)?;
        self.pad4()
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }
}

/// Contents of a regular file in the tree.
#[derive(Debug, Clone)]
pub enum Data {
    Bytes(Vec<u8>),
    Host(PathBuf),
}

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File { perm: u32, data: Data },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// A file tree to pack as an initramfs. Paths are absolute guest paths; parents are created.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

fn rel(path: &str) -> Result<String> {
    ensure!(
        path.starts_with('/'),
        "guest path {path:?} must be absolute"
    );
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    ensure!(
        !parts.contains(&".."),
        "guest path {path:?} must not contain .."
    );
    ensure!(!parts.is_empty(), "guest path {path:?} names the root");
    Ok(parts.join("/"))
}

impl Tree {
    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let rel = rel(path)?;
        let mut prefix = String::new();
        let mut parts = rel.split('/').peekable();
        while let Some(p) = parts.next() {
            if parts.peek().is_none() {
                break;
            }
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(p);
            match self.nodes.get(&prefix) {
                None => {
                    self.nodes.insert(prefix.clone(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(_) => bail!("cannot add {path}: /{prefix} is not a directory"),
            }
        }
        if matches!(self.nodes.get(&rel), Some(Node::Dir)) && !matches!(node, Node::Dir) {
            bail!("cannot add {path}: it is already a directory");
        }
        self.nodes.insert(rel, node);
        Ok(())
    }

    pub fn dir(&mut self, path: &str) -> Result<()> {
        self.insert(path, Node::Dir)
    }

    pub fn file(&mut self, path: &str, perm: u32, data: Data) -> Result<()> {
        self.insert(path, Node::File { perm, data })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(path, Node::Symlink(target.to_owned()))
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> Result<()> {
        self.insert(path, Node::CharDev { major, minor })
    }

    /// Writes the tree as a newc cpio archive (parents sort before their children).
    pub fn write_cpio<W: Write>(&self, out: W) -> Result<W> {
        let mut w = CpioWriter::new(out);
        for (name, node) in &self.nodes {
            match node {
                Node::Dir => w.dir(name, 0o755)?,
                Node::File {
                    perm,
                    data: Data::Bytes(b),
                } => w.file(name, *perm, b)?,
                Node::File {
                    perm,
                    data: Data::Host(p),
                } => {
                    let b = fs::read(p)
                        .with_context(|| format!("reading {} for /{name}", p.display()))?;
                    w.file(name, *perm, &b)?;
                }
                Node::Symlink(t) => w.symlink(name, t)?,
                Node::CharDev { major, minor } => w.char_dev(name, 0o600, *major, *minor)?,
            }
        }
        Ok(w.finish()?)
    }

    /// Writes the tree as a gzip-compressed newc cpio archive at `path`; returns its size.
    pub fn write_gz(&self, path: &Path) -> Result<u64> {
        let f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let gz = flate2::write::GzEncoder::new(io::BufWriter::new(f), flate2::Compression::fast());
        let gz = self.write_cpio(gz)?;
        gz.finish()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        Ok(fs::metadata(path)?.len())
    }
}

/// Where the guest finds things.
pub const GUEST_MODULE_DIR: &str = "/lib/modules/vm";
pub const GUEST_JOB: &str = "/etc/vm/job.sh";
pub const GUEST_RESULT: &str = "/run/vm-result";

/// The `/init` script. `modules` are loaded in order from [`GUEST_MODULE_DIR`]; `env` is exported
/// to the job.
pub fn init_script(modules: &[String], env: &[(String, String)]) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# tcp-trace VM init, generated by xtask/src/vm/initramfs.rs.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
say() { echo "[vm-init] $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || say "warning: devtmpfs not mounted"
exec </dev/null >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tracefs tracefs /sys/kernel/tracing || say "warning: tracefs not mounted"
mount -t debugfs debugfs /sys/kernel/debug || say "warning: debugfs not mounted"
mount -t bpf bpf /sys/fs/bpf || say "warning: bpffs not mounted"
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /run/netns
"#,
    );
    for m in modules {
        s.push_str(&format!(
            "insmod {GUEST_MODULE_DIR}/{m}.ko || say \"warning: insmod {m} failed\"\n"
        ));
    }
    for (k, v) in env {
        s.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    s.push_str(&format!(
        r#"ip link set lo up || say "warning: could not bring up lo"
hostname tcp-trace-vm
stty -F /dev/ttyS1 raw -echo || say "warning: could not set /dev/ttyS1 raw"
export VM_RESULT={GUEST_RESULT}
: > "$VM_RESULT"
say "kernel $(uname -r) up after $(cut -d' ' -f1 /proc/uptime)s; running the job"
cd /root
sh {GUEST_JOB}
rc=$?
say "job exited with status $rc after $(cut -d' ' -f1 /proc/uptime)s"
{{
  cat "$VM_RESULT"
  if [ -s "$VM_RESULT" ] && [ -n "$(tail -c 1 "$VM_RESULT")" ]; then echo; fi
  echo "{{\"vm_exit\": $rc}}"
}} > /dev/ttyS1
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"#
    ));
    s
}

/// Single-quotes `s` for sh.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The base of every guest: directories, device nodes for before devtmpfs is mounted, busybox
/// with one symlink per applet (`applets` from the host's `busybox --list-full`), and `/init`.
pub fn base_tree(busybox: &Path, applets: &str, init: String) -> Result<Tree> {
    let mut t = Tree::default();
    for d in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/var",
        "/mnt",
    ] {
        t.dir(d)?;
    }
    t.symlink("/var/run", "/run")?;
    t.char_dev("/dev/console", 5, 1)?;
    t.char_dev("/dev/null", 1, 3)?;
    t.char_dev("/dev/ttyS0", 4, 64)?;
    t.char_dev("/dev/ttyS1", 4, 65)?;
    t.file("/bin/busybox", 0o755, Data::Host(busybox.to_owned()))?;
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/{}", applet.trim_start_matches('/'));
        if path != "/bin/busybox" {
            t.symlink(&path, "/bin/busybox")?;
        }
    }
    t.symlink("/bin/sh", "/bin/busybox")?;
    t.file("/init", 0o755, Data::Bytes(init.into_bytes()))?;
    t.file(
        "/etc/hostname",
        0o644,
        Data::Bytes(b"tcp-trace-vm\n".to_vec()),
    )?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Entry {
        name: String,
        mode: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// A reader for what [`CpioWriter`] writes, to check the round trip.
    fn read_cpio(mut b: &[u8]) -> Vec<Entry> {
        let total = b.len();
        let mut out = Vec::new();
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        loop {
            assert_eq!(&b[..6], b"070701");
            let f = |i: usize| hex(&b[6 + 8 * i..6 + 8 * (i + 1)]);
            let (mode, size, rmaj, rmin, namesize) =
                (f(1), f(6) as usize, f(9), f(10), f(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(b[110 + namesize - 1], 0);
            let consumed = |b: &[u8]| total - b.len();
            let mut off = 110 + namesize;
            off += (4 - (consumed(b) + off) % 4) % 4;
            let data = b[off..off + size].to_vec();
            off += size;
            off += (4 - (consumed(b) + off) % 4) % 4;
            b = &b[off..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push(Entry {
                name,
                mode,
                rdev: (rmaj, rmin),
                data,
            });
        }
    }

    #[test]
    fn cpio_round_trip() {
        let mut t = Tree::default();
        t.file("/bin/tcp-trace", 0o755, Data::Bytes(b"\x7fELF...".to_vec()))
            .unwrap();
        t.file("/etc/vm/job.sh", 0o644, Data::Bytes(b"echo hi\n".to_vec()))
            .unwrap();
        t.symlink("/bin/sh", "/bin/busybox").unwrap();
        t.char_dev("/dev/console", 5, 1).unwrap();
        t.file("/odd", 0o600, Data::Bytes(vec![1, 2, 3, 4, 5]))
            .unwrap();
        let archive = t.write_cpio(Vec::new()).unwrap();
        assert_eq!(archive.len() % 4, 0);
        let entries = read_cpio(&archive);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "bin/tcp-trace",
                "dev",
                "dev/console",
                "etc",
                "etc/vm",
                "etc/vm/job.sh",
                "odd"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("bin").mode, S_IFDIR | 0o755);
        assert_eq!(get("bin/sh").mode, S_IFLNK | 0o777);
        assert_eq!(get("bin/sh").data, b"/bin/busybox");
        assert_eq!(get("bin/tcp-trace").mode, S_IFREG | 0o755);
        assert_eq!(get("bin/tcp-trace").data, b"\x7fELF...");
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("odd").data, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn cpio_matches_the_cpio_tool_when_installed() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            return;
        }
        let mut t = Tree::default();
        t.file("/a/b.txt", 0o644, Data::Bytes(b"hello".to_vec()))
            .unwrap();
        let archive = t.write_cpio(Vec::new()).unwrap();
        let dir = std::env::temp_dir().join(format!("vm-cpio-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(fs::read(dir.join("a/b.txt")).unwrap(), b"hello");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tree_rejects_bad_paths() {
        let mut t = Tree::default();
        assert!(t.file("relative", 0o644, Data::Bytes(vec![])).is_err());
        assert!(t.file("/a/../b", 0o644, Data::Bytes(vec![])).is_err());
        t.file("/f", 0o644, Data::Bytes(vec![])).unwrap();
        assert!(t.file("/f/g", 0o644, Data::Bytes(vec![])).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("uname"), "uname");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn init_loads_modules_in_order_and_reports_exit() {
        let s = init_script(
            &["nfnetlink".into(), "nf_tables".into()],
            &[("VM_KERNEL".into(), "6.12".into())],
        );
        let a = s.find("nfnetlink.ko").unwrap();
        let b = s.find("nf_tables.ko").unwrap();
        assert!(a < b);
        assert!(s.contains(r#"echo "{\"vm_exit\": $rc}""#), "{s}");
        assert!(s.contains("export VM_KERNEL=6.12"));
        assert!(s.trim_end().ends_with("echo o > /proc/sysrq-trigger"));
    }
}
