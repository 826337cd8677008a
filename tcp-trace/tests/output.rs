//! `--output FILE` and logrotate: the JSON stream goes to the file; after the file is renamed
//! and tcp-trace gets SIGHUP, what follows goes to a new file at the same path, and nothing is
//! lost or duplicated across the two. Needs root (BPF).

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn connection(port: u16) {
    let listen = format!("127.0.0.1:{port}");
    let mut server = Command::new(BIN)
        .args(["peer", "serve", "--listen", &listen, "--teardown", "clean"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let client = Command::new(BIN)
        .args(["peer", "connect", "--to", &listen])
        .output()
        .unwrap();
    assert!(client.status.success());
    assert!(server.wait().unwrap().success());
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// How many flows in `v` have `port` at either end.
fn flows_on(v: &[Value], port: u16) -> usize {
    let port_of = |a: &Value| -> Option<u16> { a.as_str()?.rsplit(':').next()?.parse().ok() };
    v.iter()
        .filter(|v| v["type"] == "flow")
        .filter(|v| {
            port_of(&v["key"]["local"]) == Some(port) || port_of(&v["key"]["remote"]) == Some(port)
        })
        .count()
}

/// Waits until `path` has the connection's three flows on `port`: the listener, the server's
/// end, the client's end.
fn wait_flow(path: &std::path::Path, port: u16) {
    let start = Instant::now();
    while flows_on(&lines(path), port) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no flow on port {port} in {} within 30 s",
            path.display()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn output_file_is_reopened_on_sighup() {
    if !common::bpf_allowed() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tcp-trace-output-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.json");
    let rotated = dir.join("trace.json.1");
    let (a, b) = (free_port(), free_port());
    let mut tracer = Command::new(BIN)
        .args(["--json", "--view", "flows", "--duration", "120s"])
        .args(["--port", &a.to_string(), "--port", &b.to_string()])
        .arg("--output")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(tracer.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("tracing; Ctrl-C") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "tcp-trace ended early"
        );
    }
    thread::spawn(move || for _ in err.lines() {});

    connection(a);
    wait_flow(&path, a);
    // What logrotate does: rename, then SIGHUP.
    std::fs::rename(&path, &rotated).unwrap();
    unsafe { libc::kill(tracer.id() as i32, libc::SIGHUP) };
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGHUP made no new file"
        );
        thread::sleep(Duration::from_millis(50));
    }
    connection(b);
    wait_flow(&path, b);
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    assert!(tracer.wait().unwrap().success());
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut tracer.stdout.take().unwrap(), &mut printed).unwrap();
    assert_eq!(printed, "", "--output still printed to stdout");

    let (old, new) = (lines(&rotated), lines(&path));
    assert_eq!(old[0]["type"], "start", "{old:?}");
    assert_eq!((flows_on(&old, a), flows_on(&old, b)), (3, 0), "{old:?}");
    assert_eq!((flows_on(&new, a), flows_on(&new, b)), (0, 3), "{new:?}");
    // The run's summary lands in the file in use at the end.
    assert_eq!(new.last().unwrap()["type"], "summary", "{new:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
