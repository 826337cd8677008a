//! Live tracing against the running kernel: real loopback connections with known teardowns, the
//! server and the client in different processes, traced by the real binary with `--json`.
//!
//! These need root (BPF): they are #[ignore]d unless run with --include-ignored (as
//! `cargo xtask test` does as root or in CI), and then fail if they cannot run.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::bpf_allowed;
use serde_json::Value;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

struct Tracer {
    child: Child,
    lines: mpsc::Receiver<String>,
    port: u16,
    /// Started with `--pid`: a marker connection from this process would not be printed.
    pid_filtered: bool,
    /// The hooks its start line says are attached (registry names).
    attached: Vec<String>,
}

impl Tracer {
    /// Starts `tcp-trace --json --port P` and waits until it reports its hooks attached.
    fn start(port: u16, extra: &[&str]) -> Tracer {
        let mut child = Command::new(BIN)
            .args(["--json", "--duration", "60s", "--port", &port.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tcp-trace");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("tcp-trace printed nothing within 60 s");
        let start: Value = serde_json::from_str(&first).expect("first line is JSON");
        assert_eq!(start["type"], "start", "{first}");
        let hooks = start["hooks"].as_array().unwrap();
        for tp in [
            "sock:inet_sock_set_state",
            "tcp:tcp_send_reset",
            "tcp:tcp_receive_reset",
        ] {
            let h = hooks.iter().find(|h| h["hook"] == tp).unwrap();
            assert!(
                !h["mechanism"].is_null(),
                "tracepoint {tp} did not attach: {h}"
            );
        }
        Tracer {
            child,
            lines: rx,
            port,
            pid_filtered: extra.contains(&"--pid"),
            attached: hooks
                .iter()
                .filter(|h| !h["mechanism"].is_null())
                .filter_map(|h| h["hook"].as_str().map(str::to_string))
                .collect(),
        }
    }

    /// Stops the tracer with SIGINT (as Ctrl-C does) once it has printed a marker connection
    /// made after the test's own (so every event before it was read), and returns every event it
    /// printed but the marker's.
    fn stop(mut self) -> (Vec<Value>, Vec<String>) {
        let me = std::process::id();
        // The marker's sockets (its listener too) are this process's.
        let is_marker =
            |v: &Value| v["owner"]["pid"] == me || (v["owner"].is_null() && v["pid"] == me);
        let parse = |line: &str| -> Value {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
        };
        let mut printed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut marker_ends = 0;
        if self.pid_filtered {
            // Only the filtered process's events come: let its last ones reach the ring.
            thread::sleep(Duration::from_millis(300));
            marker_ends = 2;
        } else {
            marker_connection(self.port);
        }
        while marker_ends < 2 {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("tcp-trace printed the marker connection's end within 60 s");
            let v = parse(&line);
            // The accepted socket and the client: the listener may go before them.
            if v["type"] == "event"
                && v["hook"] == "tcp_destroy_sock"
                && is_marker(&v)
                && v["remote"].as_str().is_some_and(|r| !r.ends_with(":0"))
            {
                marker_ends += 1;
            }
            printed.push(v);
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            printed.push(parse(&line));
        }
        let mut all_events = 0;
        let mut events = Vec::new();
        let mut summary = None;
        for v in printed {
            match v["type"].as_str() {
                Some("event") => {
                    all_events += 1;
                    if !is_marker(&v) {
                        events.push(v);
                    }
                }
                Some("summary") => summary = Some(v),
                _ => {}
            }
        }
        assert!(status.success(), "tcp-trace exited with {status}");
        let summary = summary.expect("a summary line at exit");
        assert_eq!(summary["lost"], 0, "events were lost: {summary}");
        assert_eq!(summary["events"].as_u64().unwrap() as usize, all_events);
        (events, self.attached)
    }
}

/// A connection to `port` from this process (its own listener: the test's server is gone),
/// closed by the server first; returns its client port. Its end, printed, shows the tracer has
/// read everything the kernel wrote before it.
fn marker_connection(port: u16) -> u16 {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the marker's listener");
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("the marker");
    let client_port = client.local_addr().unwrap().port();
    let (server, _) = listener.accept().unwrap();
    drop(server);
    let mut buf = [0u8; 1];
    // EOF: the server's FIN arrived; then the client closes too.
    let _ = std::io::Read::read(&mut client, &mut buf);
    drop(client);
    client_port
}

struct Peer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Peer {
    fn spawn(args: &[&str]) -> Peer {
        let mut child = Command::new(BIN)
            .arg("peer")
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn peer");
        let out = BufReader::new(child.stdout.take().unwrap());
        Peer { child, out }
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.read_line(&mut s).unwrap();
        s.trim().to_string()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn finish(mut self) -> String {
        let last = self.line();
        assert!(self.child.wait().unwrap().success());
        last
    }
}

/// Runs one server (that ends the connection as `teardown` says) and one client, each in its own
/// process, under the tracer. Returns (events, server pid, client pid, client port).
/// What [`run_pair`] saw: the events, the server's and client's pids and ports, and the hooks
/// attached.
type Pair = (Vec<Value>, u32, u32, u16, u16, Vec<String>);

fn run_pair(teardown: &str, client_args: &[&str]) -> Pair {
    let port = common::free_port();
    let tracer = Tracer::start(port, &[]);
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut server = Peer::spawn(&[
        "serve",
        "--listen",
        &listen.to_string(),
        "--teardown",
        teardown,
    ]);
    assert_eq!(server.line(), format!("listening {port}"));
    let mut args = vec!["connect", "--to"];
    let to = listen.to_string();
    args.push(&to);
    args.extend_from_slice(client_args);
    let mut client = Peer::spawn(&args);
    let connected = client.line();
    let client_port: u16 = connected
        .strip_prefix("connected ")
        .unwrap()
        .parse()
        .unwrap();
    let (spid, cpid) = (server.pid(), client.pid());
    assert_eq!(server.finish(), "done");
    let client_said = client.finish();
    assert!(client_said.starts_with("done"), "{client_said}");
    let (events, attached) = tracer.stop();
    (events, spid, cpid, port, client_port, attached)
}

fn local_port(e: &Value) -> Option<u16> {
    e["local"].as_str()?.rsplit(':').next()?.parse().ok()
}

/// Events of one end: its local port.
fn side(events: &[Value], port: u16) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| local_port(e) == Some(port))
        .collect()
}

fn transitions(events: &[&Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["hook"] == "inet_sock_set_state")
        .map(|e| {
            format!(
                "{}>{}",
                e["state"].as_str().unwrap(),
                e["new_state"].as_str().unwrap()
            )
        })
        .collect()
}

fn assert_owner(events: &[&Value], pid: u32, what: &str) {
    let owned: Vec<_> = events.iter().filter(|e| !e["owner"].is_null()).collect();
    assert!(!owned.is_empty(), "{what}: no event has an owner");
    for e in owned {
        assert_eq!(e["owner"]["pid"], pid, "{what}: wrong owner in {e}");
    }
}

/// `want` appear in `seen` in this order (others may come between).
fn assert_in_order(seen: &[String], want: &[&str], what: &str) {
    let mut rest = seen.iter();
    for w in want {
        assert!(
            rest.any(|s| s == w),
            "{what} transitions {seen:?} lack {w}, or have it out of order (want {want:?})"
        );
    }
}

/// The RST reason this kernel gives an active reset for `named` (None before 6.10,
/// NOT_SPECIFIED on 6.10/6.11), as the JSON shows it.
fn expected_active_reason(named: tcp_trace::model::RstReason) -> Value {
    use tcp_trace::model::{KernelGeneration, KernelVersion};
    let release = tcp_trace::kernel::kernel_release();
    let version: KernelVersion = release.parse().expect("the kernel's version parses");
    match KernelGeneration::for_release(version).active_reset_reason(named) {
        Some(r) => Value::from(r.kernel_name()),
        None => Value::Null,
    }
}

/// The tracer's start line said `hook` (a registry name: `tcp_close`) is attached.
fn hook_attached(attached: &[String], hook: &str) -> bool {
    attached.iter().any(|h| h == hook)
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn clean_active_close_by_the_server() {
    if !bpf_allowed() {
        return;
    }
    let (events, spid, cpid, port, cport, attached) = run_pair("clean", &[]);
    let server = side(&events, port);
    let server: Vec<_> = server
        .into_iter()
        .filter(|e| e["state"] != "LISTEN" && e["new_state"] != "LISTEN")
        .collect();
    let client = side(&events, cport);
    assert_in_order(
        &transitions(&server),
        &[
            "ESTABLISHED>FIN_WAIT1",
            "FIN_WAIT1>FIN_WAIT2",
            "FIN_WAIT2>CLOSE",
        ],
        "server",
    );
    assert_in_order(
        &transitions(&client),
        &[
            "ESTABLISHED>CLOSE_WAIT",
            "CLOSE_WAIT>LAST_ACK",
            "LAST_ACK>CLOSE",
        ],
        "client",
    );
    assert!(
        !events
            .iter()
            .any(|e| e["hook"] == "tcp_send_reset" || e["hook"] == "tcp_receive_reset"),
        "a clean close sent a reset"
    );
    assert_owner(&server, spid, "server");
    assert_owner(&client, cpid, "client");
    // The server's FIN_WAIT1 -> FIN_WAIT2 runs in softirq (the client's ACK): still the server's.
    let fw2 = server
        .iter()
        .find(|e| e["new_state"] == "FIN_WAIT2")
        .unwrap();
    assert_eq!(fw2["owner"]["pid"], spid, "{fw2}");
    if hook_attached(&attached, "tcp_time_wait") {
        let tw = server
            .iter()
            .find(|e| e["hook"] == "tcp_time_wait")
            .unwrap();
        assert_eq!(tw["new_state"], "TIME_WAIT", "{tw}");
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn close_with_unread_data_sends_rst() {
    if !bpf_allowed() {
        return;
    }
    let (events, spid, cpid, port, cport, attached) = run_pair("unread", &[]);
    let server = side(&events, port);
    let client = side(&events, cport);
    assert!(
        transitions(&server).contains(&"ESTABLISHED>CLOSE".to_string()),
        "{server:?}"
    );
    let rst = server
        .iter()
        .find(|e| e["hook"] == "tcp_send_reset")
        .unwrap_or_else(|| panic!("no tcp_send_reset on the server side: {server:?}"));
    assert_eq!(rst["rst_active"], true, "{rst}");
    assert_eq!(rst["owner"]["pid"], spid, "{rst}");
    assert_eq!(
        rst["rst_reason"],
        expected_active_reason(tcp_trace::model::RstReason::TcpAbortOnClose),
        "this kernel's reason for close() with unread data: {rst}"
    );
    assert!(
        client.iter().any(|e| e["hook"] == "tcp_receive_reset"),
        "client saw no RST"
    );
    assert!(transitions(&client).contains(&"ESTABLISHED>CLOSE".to_string()));
    assert_owner(&client, cpid, "client");
    assert_owner(&server, spid, "server");
    let close = server.iter().find(|e| e["hook"] == "tcp_close");
    if hook_attached(&attached, "tcp_close") {
        let close = close.expect("tcp_close is attached: the server's close() shows");
        let unread = close["close"]["unread"].as_u64().unwrap();
        assert_eq!(unread as usize, tcp_trace::peer::REQUEST.len(), "{close}");
    } else {
        assert!(close.is_none(), "tcp_close is not attached: {close:?}");
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn linger_zero_close_sends_rst() {
    if !bpf_allowed() {
        return;
    }
    let (events, spid, _cpid, port, cport, attached) = run_pair("linger0", &[]);
    let server = side(&events, port);
    let client = side(&events, cport);
    assert!(
        transitions(&server).contains(&"ESTABLISHED>CLOSE".to_string()),
        "{server:?}"
    );
    let rst = server
        .iter()
        .find(|e| e["hook"] == "tcp_send_reset")
        .unwrap_or_else(|| panic!("no RST from the server: {server:?}"));
    assert_eq!(rst["rst_active"], true);
    assert_eq!(rst["owner"]["pid"], spid, "{rst}");
    assert!(client.iter().any(|e| e["hook"] == "tcp_receive_reset"));
    assert!(
        !server.iter().any(|e| e["new_state"] == "FIN_WAIT1"),
        "linger 0 must not send FIN"
    );
    let close = server.iter().find(|e| e["hook"] == "tcp_close");
    if hook_attached(&attached, "tcp_close") {
        let close = close.expect("tcp_close is attached: the server's close() shows");
        assert_eq!(close["close"]["linger"], true, "{close}");
        assert_eq!(close["close"]["unread"], 0, "{close}");
    } else {
        assert!(close.is_none(), "tcp_close is not attached: {close:?}");
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn pid_filter_keeps_only_that_process() {
    if !bpf_allowed() {
        return;
    }
    // Two clients, traced with --pid of the server: only server-owned sockets may appear.
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Peer::spawn(&["serve", "--listen", &listen, "--teardown", "clean"]);
    assert_eq!(server.line(), format!("listening {port}"));
    let spid = server.pid().to_string();
    let tracer = Tracer::start(port, &["--pid", &spid]);
    let mut client = Peer::spawn(&["connect", "--to", &listen]);
    client.line();
    assert_eq!(server.finish(), "done");
    client.finish();
    let (events, _) = tracer.stop();
    assert!(!events.is_empty(), "nothing traced for the server");
    for e in &events {
        assert_eq!(e["owner"]["pid"].to_string(), spid, "{e}");
        assert_eq!(
            local_port(e),
            Some(port),
            "a client-side event leaked through: {e}"
        );
    }
}

#[test]
fn unknown_pid_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["--pid", "4000000000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    if unsafe { libc::geteuid() } == 0 {
        assert!(err.contains("no process has pid 4000000000"), "{err}");
    } else {
        assert!(err.contains("CAP_BPF"), "{err}");
    }
}

#[test]
fn doctor_reports_every_hook() {
    let out = Command::new(BIN)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON");
    assert!(v["system"]["kernel"].is_string());
    if unsafe { libc::geteuid() } != 0 {
        assert!(v["error"].as_str().unwrap().contains("CAP_BPF"));
        return;
    }
    let hooks = v["hooks"].as_array().unwrap();
    // The 11 event hooks; how owners are learned is the `owners` line.
    assert_eq!(hooks.len(), 11, "{v}");
    assert!(
        v["system"]["owners"]
            .as_str()
            .is_some_and(|s| s.contains("by descriptor")),
        "{v}"
    );
    // The owner hooks, each tried: the syscall tracepoints attach on every kernel tcp-trace
    // supports (sys_enter_close perhaps as a raw tracepoint).
    let owner_hooks = v["owner_hooks"].as_array().unwrap();
    assert_eq!(owner_hooks.len(), 7, "{v}");
    for h in owner_hooks {
        if h["hook"].as_str().unwrap().starts_with("syscalls:") {
            assert!(h["auto"].is_string(), "{h}");
        }
    }
    for h in hooks.iter().chain(owner_hooks) {
        let ok = h["auto"].is_string();
        let reasons: Vec<_> = h["mechanisms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["ok"] == false)
            .collect();
        assert!(ok || !reasons.is_empty(), "{h}");
        for m in reasons {
            assert!(
                !m["error"].as_str().unwrap().is_empty(),
                "a failure without a reason: {h}"
            );
        }
    }
    assert!(out.status.success());
}
