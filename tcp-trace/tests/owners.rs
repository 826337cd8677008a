//! Owners on servers whose sockets change hands, on the running kernel: the owner of a socket is
//! the process that holds it in user space (the one that accepted or connected it, then closed
//! it), the closer and its close() site follow the task that closed it, and `--pid` keeps exactly
//! what a process owns, in the kernel where it can and in userspace where it must wait.
//!
//! The servers are a C peer (tests/data/owners_peer.c, built here with frame pointers) in five
//! patterns: pre-fork workers on one listener, SO_REUSEPORT workers each with their own, fork
//! after accept (the parent closes its copy first), accept in one thread and close in another, a
//! socket passed over SCM_RIGHTS. And Debian's nginx (a master and its workers), started before
//! and after the tracer. Every wait is on the tracer's output (the flows it printed), not on time.
//!
//! Need root (BPF), gcc, and nginx for the nginx tests (`cargo xtask test` installs it): they are
//! #[ignore]d unless run with --include-ignored (as `cargo xtask test` does as root); asked to
//! run without what they need, they fail.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use common::{Tracer, free_port, owner_pid, port_of, tracer::HANG};
use serde_json::Value;

mod common;

const REQUEST: &[u8] = b"GET /owners\n";

/// Waits until `tracer` has printed `n` teardown flows whose local port is `port`.
fn wait_for_server_flows(tracer: &Tracer, port: u16, n: usize) {
    tracer.wait_until_lines(&format!("{n} flows on port {port}"), |lines| {
        server_flows(lines, port).len() >= n
    });
}

/// Stops the tracer (after its marker, or for a `--pid` tracer once it printed the `n` server
/// flows it must show) and returns what it printed; it must exit successfully.
fn stop(tracer: Tracer, port: u16, pid_filtered: Option<usize>) -> Vec<Value> {
    let out = match pid_filtered {
        None => tracer.stop(),
        Some(n) => tracer.stop_once(&format!("{n} flows on port {port}"), |lines| {
            server_flows(lines, port).len() >= n
        }),
    };
    assert_eq!(out.code, Some(0), "tcp-trace failed");
    out.lines
}

/// The teardown flows of connections the server on `port` accepted (not its listener's).
fn server_flows(lines: &[Value], port: u16) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| {
            l["type"] == "flow"
                && port_of(&l["key"]["local"]) == Some(port)
                && port_of(&l["key"]["remote"]).is_some_and(|p| p != 0)
        })
        .cloned()
        .collect()
}

/// tests/data/owners_peer.c, built with frame pointers and debug info.
fn peer_binary() -> Option<PathBuf> {
    // Built once per test process: tests run in parallel, and one must not exec the binary (or
    // symbolize its stacks) while another's gcc rewrites it.
    static BUILT: OnceLock<Option<PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/owners_peer.c");
            // Named so that its comm reads `owners_peer`.
            let dir = std::env::temp_dir().join(format!("tcp-trace-owners-{}", std::process::id()));
            let out = dir.join("owners_peer");
            std::fs::create_dir_all(&dir).ok()?;
            let ok = Command::new("gcc")
                .args(["-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
                .arg(&out)
                .arg(&src)
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(out)
        })
        .clone()
}

/// A running owners_peer: its worker pids, then the (pid, tid) of each closer.
struct Peer {
    child: Child,
    out: BufReader<ChildStdout>,
    /// Its processes stay until this closes (owners_peer.c `hold()`), so that the tracers can
    /// read their memory maps for close() sites however late they get to them.
    hold: Option<ChildStdin>,
    workers: Vec<u32>,
}

impl Peer {
    fn start(bin: &Path, pattern: &str, port: u16, workers: usize, teardown: &str) -> Peer {
        let mut child = Command::new(bin)
            .args([pattern, &port.to_string(), &workers.to_string(), teardown])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn owners_peer");
        let hold = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut peer_workers = Vec::new();
        loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "owners_peer ended");
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["worker", pid] => peer_workers.push(pid.parse().unwrap()),
                ["listening"] => break,
                _ => panic!("owners_peer said {line:?}"),
            }
        }
        Peer {
            child,
            out,
            hold,
            workers: peer_workers,
        }
    }

    /// The next "WHAT PID TID" (`accepted`, `closing`).
    fn next(&mut self, what: &str) -> (u32, u32) {
        let mut line = String::new();
        assert!(
            self.out.read_line(&mut line).unwrap() > 0,
            "owners_peer ended"
        );
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [w, pid, tid] if w == what => (pid.parse().unwrap(), tid.parse().unwrap()),
            _ => panic!("owners_peer said {line:?}, not {what}"),
        }
    }

    /// Lets its processes go, and waits for them.
    fn wait(mut self) {
        drop(self.hold.take());
        assert!(self.child.wait().unwrap().success());
    }
}

/// One client connection: the request, then (passive, once the server has accepted it: `go`)
/// our FIN, then read until EOF or RST.
fn client(port: u16, teardown: &str, go: std::sync::mpsc::Receiver<()>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(REQUEST).unwrap();
    if teardown == "passive" {
        go.recv().unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    }
    s.set_read_timeout(Some(HANG)).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
}

struct Served {
    /// (pid, tid) of the task that closed each connection, in order.
    closers: Vec<(u32, u32)>,
    workers: Vec<u32>,
}

/// What [`run`] saw: the closers, the full tracer's and the `--pid` tracer's output, that pid,
/// the server's port.
type Run = (Served, Vec<Value>, Vec<Value>, u32, u16);

/// Runs `pattern` with `n` connections under a full tracer and a `--pid` tracer for
/// `pid_filter(workers)`; returns both outputs.
fn run(
    pattern: &str,
    workers: usize,
    teardown: &str,
    connections: usize,
    pid_filter: impl Fn(&[u32]) -> u32,
) -> Option<Run> {
    if !common::bpf_allowed() {
        return None;
    }
    let Some(bin) = peer_binary() else {
        common::skip("gcc could not build tests/data/owners_peer.c");
        return None;
    };
    let port = free_port();
    let mut peer = Peer::start(&bin, pattern, port, workers, teardown);
    let filtered_pid = pid_filter(&peer.workers);
    let (port_arg, pid_arg) = (port.to_string(), filtered_pid.to_string());
    let full = Tracer::start(&["--port", &port_arg, "--stacks"]);
    let by_pid = Tracer::start(&["--port", &port_arg, "--stacks", "--pid", &pid_arg]);
    let mut closers = Vec::new();
    let client_teardown: &'static str = if teardown == "passive" {
        "passive"
    } else {
        "unread"
    };
    for _ in 0..connections {
        let (go, wait) = std::sync::mpsc::channel();
        let c = thread::spawn(move || client(port, client_teardown, wait));
        peer.next("accepted");
        let _ = go.send(()); // only the passive client waits for it
        closers.push(peer.next("closing"));
        c.join().unwrap();
    }
    let workers = peer.workers.clone();
    wait_for_server_flows(&full, port, connections);
    let expected_by_pid = server_flows(&full.lines(), port)
        .iter()
        .filter(|f| owner_pid(f) == Some(filtered_pid))
        .count();
    let all = stop(full, port, None);
    let filtered = stop(by_pid, port, Some(expected_by_pid));
    peer.wait();
    Some((
        Served { closers, workers },
        all,
        filtered,
        filtered_pid,
        port,
    ))
}

/// Every server flow is owned by the process that closed it, each reset sent is blamed on that
/// task and on finish() in owners_peer.c, the peer's reset names it, and the `--pid` tracer
/// shows exactly the filtered process's server flows and nothing of anyone else's.
/// `exact_site`: close() is blamed on finish() itself; in a multithreaded process glibc's
/// cancellable close() leaves no return address on top of the stack, so the walk starts at
/// finish()'s caller.
fn check(
    served: &Served,
    all: &[Value],
    filtered: &[Value],
    pid: u32,
    port: u16,
    rst: bool,
    exact_site: bool,
) {
    let flows = server_flows(all, port);
    assert_eq!(flows.len(), served.closers.len(), "{flows:#?}");
    let closer_pids: BTreeSet<u32> = served.closers.iter().map(|c| c.0).collect();
    for f in &flows {
        let owner = owner_pid(f).unwrap_or_else(|| panic!("flow without owner: {f}"));
        assert!(
            closer_pids.contains(&owner),
            "flow owned by {owner}, closers were {closer_pids:?}: {f}"
        );
        assert_eq!(f["owner"]["source"], "kernel", "{f}");
    }
    let owners: BTreeSet<u32> = flows.iter().filter_map(owner_pid).collect();
    assert_eq!(owners, closer_pids, "one flow per closer");
    if rst {
        let sent: Vec<&Value> = all
            .iter()
            .filter(|l| {
                l["type"] == "reset"
                    && l["direction"] == "sent"
                    && port_of(&l["local"]) == Some(port)
            })
            .collect();
        assert_eq!(sent.len(), served.closers.len(), "{sent:#?}");
        for r in &sent {
            assert_eq!(r["cause"], "close-unread", "{r}");
            let (p, t) = (
                r["closer"]["pid"].as_u64().unwrap_or(0) as u32,
                r["closer"]["tid"].as_u64().unwrap_or(0) as u32,
            );
            assert!(
                served.closers.contains(&(p, t)),
                "closer {p}/{t} is not a task that closed: {:?}: {r}",
                served.closers
            );
            assert_eq!(owner_pid(r), Some(p), "owner is the closer: {r}");
            let site = r["close_site"].as_str().unwrap_or_default();
            let blamed = if exact_site {
                site.starts_with("finish (") && site.ends_with("owners_peer.c:17)")
            } else {
                site.contains("/owners_peer.c:")
            };
            assert!(blamed, "close() blamed on {site:?}: {r}");
        }
        let received: Vec<&Value> = all
            .iter()
            .filter(|l| {
                l["type"] == "reset"
                    && l["direction"] == "received"
                    && port_of(&l["peer"]) == Some(port)
            })
            .collect();
        assert_eq!(received.len(), served.closers.len(), "{received:#?}");
        for r in &received {
            let evidence = r["evidence"].as_str().unwrap_or_default();
            assert!(
                closer_pids
                    .iter()
                    .any(|p| evidence.contains(&format!("{p}/owners_peer sent it"))),
                "the received reset names another sender: {r}"
            );
        }
    }
    // --pid: exactly the filtered process's server flows, no event of another owner's.
    let mine: Vec<Value> = server_flows(all, port)
        .into_iter()
        .filter(|f| owner_pid(f) == Some(pid))
        .collect();
    let shown = server_flows(filtered, port);
    assert_eq!(shown.len(), mine.len(), "--pid {pid}: {shown:#?}");
    for f in &shown {
        assert_eq!(owner_pid(f), Some(pid), "--pid {pid} shows {f}");
    }
    for e in filtered.iter().filter(|l| l["type"] == "event") {
        assert_eq!(owner_pid(e), Some(pid), "--pid {pid} shows {e}");
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn prefork_workers_own_what_they_accept() {
    let Some((s, all, by_pid, pid, port)) = run("prefork", 3, "unread", 3, |w| w[1]) else {
        return;
    };
    assert_eq!(s.workers.len(), 3);
    check(&s, &all, &by_pid, pid, port, true, true);
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn prefork_passive_close_is_the_acceptors_before_it_closes() {
    // The client's FIN (sent once the worker has accepted) reaches the worker's socket in
    // softirq, before the worker's close(): that event's owner can only come from accept().
    let Some((s, all, by_pid, pid, port)) = run("prefork", 2, "passive", 2, |w| w[0]) else {
        return;
    };
    check(&s, &all, &by_pid, pid, port, false, true);
    for f in server_flows(&all, port) {
        let owner = owner_pid(&f);
        let fin = all.iter().find(|l| {
            l["type"] == "event"
                && l["hook"] == "inet_sock_set_state"
                && l["new_state"] == "CLOSE_WAIT"
                && l["local"] == f["key"]["local"]
                && l["remote"] == f["key"]["remote"]
        });
        let fin = fin.unwrap_or_else(|| panic!("no CLOSE_WAIT event for {f}"));
        assert_eq!(owner_pid(fin), owner, "the FIN's owner: {fin}");
        assert_eq!(fin["owner"]["source"], "kernel", "{fin}");
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn reuseport_workers_each_own_their_listeners_children() {
    let Some((s, all, by_pid, pid, port)) = run("reuseport", 3, "unread", 3, |w| w[2]) else {
        return;
    };
    check(&s, &all, &by_pid, pid, port, true, true);
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn fork_after_accept_belongs_to_the_child_that_closes() {
    // --pid of the parent, which accepted and closed its copy first: nothing of the server flow
    // is its own.
    let Some((s, all, by_pid, pid, port)) = run("fork-after-accept", 1, "unread", 1, |w| w[0])
    else {
        return;
    };
    assert_ne!(s.closers[0].0, s.workers[0], "the child closes");
    check(&s, &all, &by_pid, pid, port, true, true);
    assert!(server_flows(&by_pid, port).is_empty());
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn accept_in_one_thread_close_in_another() {
    let Some((s, all, by_pid, pid, port)) = run("thread", 1, "unread", 1, |w| w[0]) else {
        return;
    };
    assert_eq!(s.closers[0].0, s.workers[0]);
    assert_ne!(s.closers[0].1, s.closers[0].0, "a second thread closes");
    check(&s, &all, &by_pid, pid, port, true, false);
    assert_eq!(server_flows(&by_pid, port).len(), 1);
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn socket_passed_over_scm_rights_belongs_to_the_receiver() {
    let Some((s, all, by_pid, pid, port)) = run("scm-rights", 1, "unread", 1, |w| w[0]) else {
        return;
    };
    assert_ne!(s.closers[0].0, s.workers[0], "the receiver closes");
    check(&s, &all, &by_pid, pid, port, true, true);
    assert!(server_flows(&by_pid, port).is_empty());
}

// ---- Debian's nginx: a master and its workers --------------------------------------------

const NGINX: &str = "/usr/sbin/nginx";
const REQUESTS: usize = 8;

struct Nginx {
    dir: PathBuf,
    master: u32,
}

impl Nginx {
    fn start(port: u16) -> Nginx {
        let dir = std::env::temp_dir().join(format!("tcp-trace-nginx-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = format!(
            "worker_processes 2;\ndaemon on;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
             fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let status = Command::new(NGINX)
            .args(["-p", dir.to_str().unwrap(), "-c"])
            .arg(dir.join("nginx.conf"))
            .status()
            .expect("run nginx");
        assert!(status.success(), "nginx did not start");
        // The master writes its pid file once it runs (it daemonized: the process that opened
        // the listening socket has exited).
        let start = Instant::now();
        let master = loop {
            if let Ok(s) = std::fs::read_to_string(dir.join("nginx.pid"))
                && let Ok(p) = s.trim().parse::<u32>()
            {
                break p;
            }
            assert!(start.elapsed() < HANG, "nginx wrote no pid file");
            thread::sleep(Duration::from_millis(20));
        };
        let nginx = Nginx { dir, master };
        while nginx.workers().len() < 2 {
            assert!(start.elapsed() < HANG, "nginx started no workers");
            thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    /// The master's children.
    fn workers(&self) -> Vec<u32> {
        let path = format!("/proc/{0}/task/{0}/children", self.master);
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        unsafe { libc::kill(self.master as i32, libc::SIGQUIT) };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn curl(port: u16) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

fn nginx_case(started_before_tracer: bool) {
    if !common::bpf_allowed() {
        return;
    }
    if !Path::new(NGINX).exists() {
        common::skip("nginx is not installed (`cargo xtask test` installs nginx-light)");
        return;
    }
    let port = free_port();
    let early = started_before_tracer.then(|| Nginx::start(port));
    let port_arg = port.to_string();
    let full = Tracer::start(&["--port", &port_arg]);
    let nginx = early.unwrap_or_else(|| Nginx::start(port));
    let workers = nginx.workers();
    let worker_arg = workers[0].to_string();
    let by_pid = Tracer::start(&["--port", &port_arg, "--pid", &worker_arg]);
    for _ in 0..REQUESTS {
        curl(port);
    }
    wait_for_server_flows(&full, port, REQUESTS);
    let expected = server_flows(&full.lines(), port)
        .iter()
        .filter(|f| owner_pid(f) == Some(workers[0]))
        .count();
    let all = stop(full, port, None);
    let filtered = stop(by_pid, port, Some(expected));
    drop(nginx);

    let flows = server_flows(&all, port);
    assert_eq!(flows.len(), REQUESTS, "{flows:#?}");
    for f in &flows {
        let owner = owner_pid(f).unwrap_or(0);
        assert!(
            workers.contains(&owner),
            "server flow owned by {owner}, not a worker of {workers:?}: {f}"
        );
        assert_eq!(f["owner"]["source"], "kernel", "{f}");
    }
    // Every event of a server flow after its handshake names the worker (the client's FIN
    // arrives in softirq: its owner comes from accept()).
    for e in all.iter().filter(|l| {
        l["type"] == "event"
            && port_of(&l["local"]) == Some(port)
            && l["owner"]["source"] != "provisional"
            && l["hook"] != "tcp_destroy_sock"
            && !(l["hook"] == "inet_sock_set_state"
                && matches!(
                    l["new_state"].as_str(),
                    Some("SYN_RECV" | "ESTABLISHED" | "LISTEN")
                ))
    }) {
        let owner = owner_pid(e).unwrap_or(0);
        assert!(
            workers.contains(&owner),
            "event owned by {owner}, not a worker of {workers:?}: {e}"
        );
    }
    let shown = server_flows(&filtered, port);
    assert_eq!(shown.len(), expected, "--pid {}: {shown:#?}", workers[0]);
    for f in &shown {
        assert_eq!(owner_pid(f), Some(workers[0]), "{f}");
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn nginx_started_after_the_tracer() {
    nginx_case(false);
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn nginx_started_before_the_tracer() {
    nginx_case(true);
}
