//! Container identity and the `--cgroup` / `--netns` filters, live: a server in a cgroup of its
//! own and in a network namespace of its own (as a container is), its client in that namespace
//! but the test's cgroup, and a second server in the same cgroup in the host's namespace. One
//! tracer filters on the cgroup, another on the namespace; each must see exactly its part, and
//! the events, flows and resets must carry the cgroup's path.
//!
//! Needs root (BPF, namespaces, cgroups): #[ignore]d unless run with --include-ignored, and then
//! it fails if it cannot run.

use std::{
    ffi::CString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use common::{Connection, Tracer, free_ports, owner_pid, peer::Side};
use serde_json::Value;
use tcp_trace::validate::netns::Netns;

mod common;

/// A cgroup made for the test, removed at the end.
struct TestCgroup {
    dir: PathBuf,
    /// As /proc/PID/cgroup shows it.
    path: String,
}

impl TestCgroup {
    fn new() -> TestCgroup {
        let root = tcp_trace::cgroups::cgroup2_root().expect("a cgroup2 filesystem");
        let name = format!("tcp-trace-test-{}", std::process::id());
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir).expect("create a cgroup");
        TestCgroup {
            dir,
            path: format!("/{name}"),
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty by now: its processes have exited. Retry briefly while the kernel reaps them.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `cmd`, run in cgroup `procs` (its cgroup.procs file) from before exec.
fn in_cgroup(cmd: &mut Command, procs: &Path) {
    let path = CString::new(procs.to_str().unwrap()).unwrap();
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process.
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A server (closing with the request unread: RST) in `cgroup`, and its client in the caller's
/// cgroup, both in `ns` (or the host's namespace).
fn connection(ns: Option<&Netns>, cgroup: &TestCgroup, port: u16) -> Connection {
    let listen = format!("127.0.0.1:{port}");
    Connection::run_with(&listen, &listen, "unread", |mut cmd, side| {
        if side == Side::Server {
            in_cgroup(&mut cmd, &cgroup.dir.join("cgroup.procs"));
        }
        match ns {
            Some(ns) => ns.run(move || Ok(cmd.spawn()?)).unwrap(),
            None => cmd.spawn().unwrap(),
        }
    })
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn cgroup_and_netns_filters_and_identity() {
    if !common::bpf_allowed() {
        return;
    }
    let cgroup = TestCgroup::new();
    let ns = Netns::new().expect("a network namespace");
    // A process that holds the namespace under a path the tracer can be given.
    let mut holder = ns
        .run(|| Ok(Command::new("sleep").arg("120").spawn()?))
        .unwrap();
    let ns_path = format!("/proc/{}/ns/net", holder.id());
    let [p1, p2] = free_ports();
    let ports = [
        "--port".to_string(),
        p1.to_string(),
        "--port".into(),
        p2.to_string(),
    ];
    let port_args: Vec<&str> = ports.iter().map(String::as_str).collect();

    let by_cgroup = Tracer::start(&[&["--cgroup", &cgroup.path][..], &port_args].concat());
    let by_netns = Tracer::start(&[&["--netns", ns_path.as_str()][..], &port_args].concat());
    // In the namespace: server in the cgroup, client not.
    let in_ns = connection(Some(&ns), &cgroup, p1);
    let (server_ns, client_ns) = (in_ns.server_pid, in_ns.client_pid);
    // In the host's namespace: server in the cgroup, client not.
    let in_host = connection(None, &cgroup, p2);
    let (server_host, client_host) = (in_host.server_pid, in_host.client_pid);
    // Their filters keep a marker of this process out: the last sockets each must show are
    // the host server's (in the cgroup) and the whole connection in the namespace.
    let seen_cg = by_cgroup.stop_after_sockets(&in_host.server_sockets());
    let seen_ns = by_netns.stop_after_sockets(&in_ns.sockets());
    assert_eq!((seen_cg.code, seen_ns.code), (Some(0), Some(0)));
    let (seen_cg, seen_ns) = (seen_cg.lines, seen_ns.lines);
    let _ = holder.kill();
    let _ = holder.wait();

    // --cgroup: only sockets owned by the two servers, each event and flow naming the cgroup.
    let events: Vec<&Value> = seen_cg.iter().filter(|v| v["type"] == "event").collect();
    let owners: std::collections::BTreeSet<u32> =
        events.iter().filter_map(|v| owner_pid(v)).collect();
    assert!(owners.contains(&server_ns), "{owners:?}");
    assert!(owners.contains(&server_host), "{owners:?}");
    for v in seen_cg
        .iter()
        .filter(|v| matches!(v["type"].as_str(), Some("event" | "flow" | "reset")))
    {
        let owner = owner_pid(v);
        assert!(
            owner != Some(client_ns) && owner != Some(client_host),
            "--cgroup let a client's socket through: {v}"
        );
        assert_eq!(v["cgroup"]["path"], cgroup.path.as_str(), "{v}");
        assert!(v["owner"]["cgroup_id"].as_u64().unwrap() > 1, "{v}");
    }
    let resets: Vec<&Value> = seen_cg.iter().filter(|v| v["type"] == "reset").collect();
    assert_eq!(
        resets
            .iter()
            .filter(|r| r["cause"] == "close-unread")
            .count(),
        2,
        "{resets:?}"
    );
    assert!(seen_cg.iter().any(|v| v["type"] == "flow"), "no flow");

    // --netns: both ends of the connection in the namespace, nothing of the host's.
    let events: Vec<&Value> = seen_ns.iter().filter(|v| v["type"] == "event").collect();
    let owners: std::collections::BTreeSet<u32> =
        events.iter().filter_map(|v| owner_pid(v)).collect();
    assert!(owners.contains(&server_ns), "{owners:?}");
    assert!(owners.contains(&client_ns), "{owners:?}");
    assert!(!owners.contains(&server_host), "{owners:?}");
    assert!(!owners.contains(&client_host), "{owners:?}");
    for v in &events {
        assert_eq!(v["netns"], ns.inode, "{v}");
    }
    // The client is in the test's own cgroup: its events carry that one, not the server's.
    let client_ev = events
        .iter()
        .find(|v| owner_pid(v) == Some(client_ns))
        .unwrap();
    assert_ne!(
        client_ev["cgroup"]["path"],
        cgroup.path.as_str(),
        "{client_ev}"
    );
}
