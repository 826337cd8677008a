//! Per-namespace model parameters, live: connections in two network namespaces with different
//! tcp_fin_timeout (7 s and 13 s, both unlike the host's) are traced by one tracer, and each
//! server flow, closed first and so left in TIME_WAIT(FIN_WAIT2) for tcp_fin_time(), must be
//! judged with its own namespace's value. The same trace recorded and replayed must judge the
//! same way (the recording carries each namespace's sysctls).
//!
//! Needs root (BPF, namespaces).

use std::{
    io::{BufRead, BufReader, Read},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcp_trace::validate::netns::Netns;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

/// The tracer, started and ready (its `start` line seen, or for a recording its notice).
fn start_tracer(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["--json", "--view", "flows", "--backend", "tracepoint"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcp-trace");
    let out = BufReader::new(child.stdout.take().unwrap());
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = tx2.send(format!("stderr: {l}"));
        }
    });
    // Ready once it says it is tracing or recording.
    let mut seen = Vec::new();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("tcp-trace not ready within 60 s: {seen:?}"));
        let ready = l.contains("Ctrl-C to stop");
        seen.push(l);
        if ready {
            break;
        }
    }
    (child, rx)
}

fn stop_tracer(mut child: Child, rx: mpsc::Receiver<String>) -> Vec<Value> {
    thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait().unwrap();
    let mut out = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        if let Ok(v) = serde_json::from_str::<Value>(&l) {
            out.push(v);
        }
    }
    out
}

/// In `ns`: a connection on `port` that the server closes first; the client reads the FIN and
/// closes a moment later, after the server's end went into TIME_WAIT(FIN_WAIT2).
fn server_closes_first(ns: &Netns, port: u16) {
    ns.run(move || {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let mut client = TcpStream::connect(("127.0.0.1", port))?;
        let (server, _) = listener.accept()?;
        drop(server);
        let mut buf = [0u8; 16];
        let _ = client.read(&mut buf)?;
        thread::sleep(Duration::from_millis(300));
        drop(client);
        drop(listener);
        Ok(())
    })
    .unwrap();
}

/// The TIME_WAIT(FIN_WAIT2) lifetime the model gave the server flow of `port` in `netns`.
fn server_fin_wait2_ms(flows: &[Value], netns: u32, port: u16) -> String {
    let flow = flows
        .iter()
        .find(|f| {
            f["type"] == "flow"
                && f["key"]["netns"] == netns
                && f["key"]["local"]
                    .as_str()
                    .is_some_and(|l| l.ends_with(&format!(":{port}")))
                && !f["key"]["remote"].as_str().unwrap_or("").ends_with(":0")
        })
        .unwrap_or_else(|| panic!("no server flow of port {port} in netns {netns}: {flows:?}"));
    let text = flow.to_string();
    let at = text
        .find("tcp_time_wait(FIN_WAIT2, ")
        .unwrap_or_else(|| panic!("no TIME_WAIT(FIN_WAIT2) entry in {flow}"));
    let rest = &text[at + "tcp_time_wait(FIN_WAIT2, ".len()..];
    rest[..rest.find(' ').unwrap()].to_string()
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn flows_are_judged_with_their_own_namespace_sysctls() {
    if !common::bpf_allowed() {
        return;
    }
    let (a, b) = (Netns::new().unwrap(), Netns::new().unwrap());
    a.sysctl("net.ipv4.tcp_fin_timeout", "7").unwrap();
    b.sysctl("net.ipv4.tcp_fin_timeout", "13").unwrap();
    // Processes that live in the namespaces, through which the tracer finds them.
    let mut holders: Vec<Child> = [&a, &b]
        .iter()
        .map(|ns| {
            ns.run(|| Ok(Command::new("sleep").arg("120").spawn()?))
                .unwrap()
        })
        .collect();
    let port = common::free_port();
    let rec = std::env::temp_dir().join(format!("tcp-trace-netns-{}.tt", std::process::id()));
    let port_arg = port.to_string();
    let live = start_tracer(&["--port", &port_arg]);
    let recording = start_tracer(&["record", "-o", rec.to_str().unwrap(), "--port", &port_arg]);
    server_closes_first(&a, port);
    server_closes_first(&b, port);
    let flows = stop_tracer(live.0, live.1);
    stop_tracer(recording.0, recording.1);
    for h in &mut holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    assert_eq!(server_fin_wait2_ms(&flows, a.inode, port), "7000");
    assert_eq!(server_fin_wait2_ms(&flows, b.inode, port), "13000");

    let out = Command::new(BIN)
        .args(["replay", "--json", "--view", "flows"])
        .arg(&rec)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&rec);
    let replayed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(server_fin_wait2_ms(&replayed, a.inode, port), "7000");
    assert_eq!(server_fin_wait2_ms(&replayed, b.inode, port), "13000");
}
