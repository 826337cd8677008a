//! Container identity and the `--cgroup` / `--netns` filters, live: a server in a cgroup of its
//! own and in a network namespace of its own (as a container is), its client in that namespace
//! but the test's cgroup, and a second server in the same cgroup in the host's namespace. One
//! tracer filters on the cgroup, another on the namespace; each must see exactly its part, and
//! the events, flows and resets must carry the cgroup's path.
//!
//! Needs root (BPF, namespaces, cgroups): outside CI skipped with a note, in CI a failure.

use std::{
    ffi::CString,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcp_trace::validate::netns::Netns;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

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

struct Tracer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Tracer {
    fn start(args: &[&str]) -> Tracer {
        let mut child = Command::new(BIN)
            .args(["--json", "--duration", "120s"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn tcp-trace");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("tcp-trace printed nothing within 60 s");
        assert!(first.contains("\"type\":\"start\""), "{first}");
        Tracer { child, lines: rx }
    }

    fn stop(mut self) -> Vec<Value> {
        thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        assert!(self.child.wait().unwrap().success());
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            out.push(serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")));
        }
        out
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server (closing with the request unread: RST) in `cgroup`, and its client in the caller's
/// cgroup, both in `ns` (or the host's namespace). Returns (server pid, client pid).
fn connection(ns: Option<&Netns>, cgroup: &TestCgroup, port: u16) -> (u32, u32) {
    let spawn = |args: Vec<String>, in_cg: bool| -> Child {
        let mut cmd = Command::new(BIN);
        cmd.arg("peer").args(&args).stdout(Stdio::piped());
        if in_cg {
            in_cgroup(&mut cmd, &cgroup.dir.join("cgroup.procs"));
        }
        match ns {
            Some(ns) => ns.run(move || Ok(cmd.spawn()?)).unwrap(),
            None => cmd.spawn().unwrap(),
        }
    };
    let listen = format!("127.0.0.1:{port}");
    let mut server = spawn(
        vec![
            "serve".into(),
            "--listen".into(),
            listen.clone(),
            "--teardown".into(),
            "unread".into(),
        ],
        true,
    );
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("listening {port}"));
    let client = spawn(vec!["connect".into(), "--to".into(), listen], false);
    let cpid = client.id();
    assert!(client.wait_with_output().unwrap().status.success());
    let spid = server.id();
    assert!(server.wait().unwrap().success());
    (spid, cpid)
}

fn owner_pid(v: &Value) -> Option<u64> {
    v["owner"]["pid"].as_u64()
}

#[test]
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
    let (p1, p2) = (free_port(), free_port());
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
    let (server_ns, client_ns) = connection(Some(&ns), &cgroup, p1);
    // In the host's namespace: server in the cgroup, client not.
    let (server_host, client_host) = connection(None, &cgroup, p2);
    let seen_cg = by_cgroup.stop();
    let seen_ns = by_netns.stop();
    let _ = holder.kill();
    let _ = holder.wait();

    // --cgroup: only sockets owned by the two servers, each event and flow naming the cgroup.
    let events: Vec<&Value> = seen_cg.iter().filter(|v| v["type"] == "event").collect();
    let owners: std::collections::BTreeSet<u64> =
        events.iter().filter_map(|v| owner_pid(v)).collect();
    assert!(owners.contains(&(server_ns as u64)), "{owners:?}");
    assert!(owners.contains(&(server_host as u64)), "{owners:?}");
    for v in seen_cg
        .iter()
        .filter(|v| matches!(v["type"].as_str(), Some("event" | "flow" | "reset")))
    {
        let owner = owner_pid(v);
        assert!(
            owner != Some(client_ns as u64) && owner != Some(client_host as u64),
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
    let owners: std::collections::BTreeSet<u64> =
        events.iter().filter_map(|v| owner_pid(v)).collect();
    assert!(owners.contains(&(server_ns as u64)), "{owners:?}");
    assert!(owners.contains(&(client_ns as u64)), "{owners:?}");
    assert!(!owners.contains(&(server_host as u64)), "{owners:?}");
    assert!(!owners.contains(&(client_host as u64)), "{owners:?}");
    for v in &events {
        assert_eq!(v["netns"], ns.inode, "{v}");
    }
    // The client is in the test's own cgroup: its events carry that one, not the server's.
    let client_ev = events
        .iter()
        .find(|v| owner_pid(v) == Some(client_ns as u64))
        .unwrap();
    assert_ne!(
        client_ev["cgroup"]["path"],
        cgroup.path.as_str(),
        "{client_ev}"
    );
}
