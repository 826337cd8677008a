//! The tracer under conditions a production host produces: SIGTERM instead of Ctrl-C, two
//! tracers at once, a traced process that exits mid-trace, IPv6 and IPv4-mapped IPv6 flows.
//!
//! These need root (BPF): #[ignore]d unless run with --include-ignored, and then they fail if
//! they cannot run.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use common::bpf_allowed;
use serde_json::Value;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

fn free_port(v6: bool) -> u16 {
    let addr = if v6 { "[::1]:0" } else { "127.0.0.1:0" };
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A tracer with `--json`, started and attached.
struct Tracer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Tracer {
    fn start(args: &[&str]) -> Tracer {
        let mut child = Command::new(BIN)
            .args(["--json", "--duration", "60s"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("no start line");
        assert!(first.contains("\"type\":\"start\""), "{first}");
        Tracer { child, lines: rx }
    }

    /// Stops it with `signal`; returns (exit code, every JSON line after the start line).
    fn stop(mut self, signal: i32) -> (Option<i32>, Vec<Value>) {
        thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let status = self.child.wait().unwrap();
        let mut out = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            out.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
        }
        (status.code(), out)
    }
}

/// One connection through the hidden test peers; returns the server's pid.
fn connection(listen: &str, to: &str, teardown: &str) -> u32 {
    let mut server = Command::new(BIN)
        .args(["peer", "serve", "--listen", listen, "--teardown", teardown])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("listening"), "{line}");
    let client = Command::new(BIN)
        .args(["peer", "connect", "--to", to])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(client.success());
    let pid = server.id();
    assert!(server.wait().unwrap().success());
    pid
}

fn events(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["type"] == "event").collect()
}

fn summary(lines: &[Value]) -> &Value {
    lines
        .iter()
        .find(|l| l["type"] == "summary")
        .expect("a summary at exit")
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn sigterm_detaches_and_prints_the_summary() {
    if !bpf_allowed() {
        return;
    }
    let port = free_port(false);
    let tracer = Tracer::start(&["--port", &port.to_string()]);
    connection(
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{port}"),
        "clean",
    );
    let (code, lines) = tracer.stop(libc::SIGTERM);
    assert_eq!(code, Some(0));
    let s = summary(&lines);
    assert_eq!(s["events"].as_u64().unwrap() as usize, events(&lines).len());
    assert!(!events(&lines).is_empty());
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn two_tracers_at_once_both_see_everything() {
    if !bpf_allowed() {
        return;
    }
    let port = free_port(false);
    let a = Tracer::start(&["--port", &port.to_string()]);
    let b = Tracer::start(&["--port", &port.to_string(), "--view", "events"]);
    connection(
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{port}"),
        "unread",
    );
    let (ca, la) = a.stop(libc::SIGINT);
    let (cb, lb) = b.stop(libc::SIGINT);
    assert_eq!((ca, cb), (Some(0), Some(0)));
    // Each tracer's programs read the clock themselves: compare what happened, not when.
    let key = |e: &&Value| {
        format!(
            "{} {} {} {} {}",
            e["hook"], e["local"], e["remote"], e["state"], e["new_state"]
        )
    };
    let mut ea: Vec<String> = events(&la).iter().map(key).collect();
    let mut eb: Vec<String> = events(&lb).iter().map(key).collect();
    ea.sort();
    eb.sort();
    assert!(!ea.is_empty());
    assert_eq!(ea, eb, "the two tracers saw different events");
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn a_traced_process_that_exits_mid_trace_is_fine() {
    if !bpf_allowed() {
        return;
    }
    let port = free_port(false);
    // The server exists when the tracer starts, and exits while it runs.
    let mut server = Command::new(BIN)
        .args(["peer", "serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--teardown", "clean"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid = server.id().to_string();
    let tracer = Tracer::start(&["--pid", &pid]);
    let client = Command::new(BIN)
        .args(["peer", "connect", "--to", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(client.success());
    assert!(server.wait().unwrap().success());
    thread::sleep(Duration::from_millis(500));
    let (code, lines) = tracer.stop(libc::SIGINT);
    assert_eq!(code, Some(0));
    let evs = events(&lines);
    assert!(!evs.is_empty(), "nothing traced for the exited process");
    for e in evs {
        assert_eq!(e["owner"]["pid"].to_string(), pid, "{e}");
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn ipv6_and_ipv4_mapped_flows_are_traced_and_judged() {
    if !bpf_allowed() {
        return;
    }
    // IPv6 on both ends.
    let port = free_port(true);
    let tracer = Tracer::start(&["--port", &port.to_string()]);
    connection(&format!("[::1]:{port}"), &format!("[::1]:{port}"), "clean");
    // A dual-stack listener accepting an IPv4 client: its socket is AF_INET6 with
    // IPv4-mapped addresses.
    let port4 = free_port(false);
    let tracer4 = Tracer::start(&["--port", &port4.to_string()]);
    connection(
        &format!("[::]:{port4}"),
        &format!("127.0.0.1:{port4}"),
        "clean",
    );

    let (code, lines) = tracer.stop(libc::SIGINT);
    assert_eq!(code, Some(0));
    let evs = events(&lines);
    assert!(evs.iter().any(|e| e["family"] == "ipv6"
        && e["local"] == format!("[::1]:{port}")
        && e["new_state"] == "FIN_WAIT1"));
    let flows: Vec<&Value> = lines.iter().filter(|l| l["type"] == "flow").collect();
    assert!(flows.len() >= 2, "{lines:#?}");
    // Clean closes: every flow conforms (an "incomplete" one would hide a missed event).
    for f in &flows {
        assert_eq!(f["verdict"]["verdict"], "conforms", "{f}");
    }

    let (code, lines) = tracer4.stop(libc::SIGINT);
    assert_eq!(code, Some(0));
    let mapped = format!("[::ffff:127.0.0.1]:{port4}");
    let all = events(&lines);
    let server_side: Vec<&&Value> = all.iter().filter(|e| e["local"] == mapped).collect();
    assert!(
        server_side.iter().any(|e| e["family"] == "ipv6"),
        "no event for the mapped server socket: {lines:#?}"
    );
    let flows: Vec<&Value> = lines.iter().filter(|l| l["type"] == "flow").collect();
    let server_flow = flows
        .iter()
        .find(|f| f["key"]["local"] == mapped)
        .unwrap_or_else(|| panic!("no flow for {mapped}: {flows:#?}"));
    assert!(
        server_flow["peer_key"].is_object(),
        "the mapped server flow is not linked to its IPv4 client: {server_flow}"
    );
    assert_eq!(
        server_flow["verdict"]["verdict"], "conforms",
        "{server_flow}"
    );
}
