//! Live tracing against the running kernel: real loopback connections with known teardowns, the
//! server and the client in different processes, traced by the real binary with `--json`.
//!
//! These need root (BPF): they are #[ignore]d unless run with --include-ignored (as
//! `cargo xtask test` does as root or in CI), and then fail if they cannot run.

use std::process::Command;

use common::{BIN, Connection, Listening, Stopped, Tracer, bpf_allowed, free_port, port_of};
use serde_json::Value;

mod common;

/// Starts `tcp-trace --json --port PORT EXTRA` and checks its start line: the tracepoints are
/// attached.
fn start_tracer(port: u16, extra: &[&str]) -> Tracer {
    let port = port.to_string();
    let tracer = Tracer::start(&[&["--port", port.as_str()][..], extra].concat());
    let hooks = tracer.start["hooks"].as_array().unwrap();
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
    tracer
}

/// The events a stopped tracer printed (the marker's left out), once it is checked: it exited
/// successfully, lost nothing, and printed as many events as its summary counts.
fn events_of(out: &Stopped) -> Vec<Value> {
    assert_eq!(out.code, Some(0), "tcp-trace's exit status");
    let summary = out.summary();
    assert_eq!(summary["lost"], 0, "events were lost: {summary}");
    assert_eq!(
        summary["events"].as_u64().unwrap() as usize,
        out.events_printed()
    );
    out.events().into_iter().cloned().collect()
}

/// What [`run_pair`] saw: the events, the server's and client's pids and ports, and the hooks
/// attached.
type Pair = (Vec<Value>, u32, u32, u16, u16, Vec<String>);

/// Runs one server (that ends the connection as `teardown` says) and one client, each in its own
/// process, under the tracer, stopped after its marker.
fn run_pair(teardown: &str) -> Pair {
    let port = free_port();
    let tracer = start_tracer(port, &[]);
    let attached = tracer.attached();
    let c = Connection::on_loopback(port, teardown);
    let events = events_of(&tracer.stop());
    (
        events,
        c.server_pid,
        c.client_pid,
        port,
        c.client_port,
        attached,
    )
}

/// Events of one end: its local port.
fn side(events: &[Value], port: u16) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| port_of(&e["local"]) == Some(port))
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
    let (events, spid, cpid, port, cport, attached) = run_pair("clean");
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
    let (events, spid, cpid, port, cport, attached) = run_pair("unread");
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
    let (events, spid, _cpid, port, cport, attached) = run_pair("linger0");
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
    // close() with SO_LINGER {on, 0} disconnects: tcp_disconnect() resets an ESTABLISHED
    // socket for its state.
    assert_eq!(
        rst["rst_reason"],
        expected_active_reason(tcp_trace::model::RstReason::TcpState),
        "this kernel's reason for a linger-0 close(): {rst}"
    );
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
    // A client, traced with --pid of the server: only server-owned sockets may appear.
    let server = Listening::serve("127.0.0.1:0", "clean");
    let port = server.port;
    let listen = format!("127.0.0.1:{port}");
    let spid = server.pid().to_string();
    let tracer = start_tracer(port, &["--pid", &spid]);
    let c = server.connect(&listen);
    // --pid keeps the marker out: the server's end and its listener are the last it prints.
    let events = events_of(&tracer.stop_after_sockets(&c.server_sockets()));
    assert!(!events.is_empty(), "nothing traced for the server");
    for e in &events {
        assert_eq!(e["owner"]["pid"].to_string(), spid, "{e}");
        assert_eq!(
            port_of(&e["local"]),
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
