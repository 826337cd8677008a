//! `--output FILE` and logrotate: the JSON stream goes to the file; after the file is renamed
//! and tcp-trace gets SIGHUP, what follows goes to a new file at the same path, and nothing is
//! lost or duplicated across the two. Needs root (BPF): #[ignore]d unless run with
//! --include-ignored, and then it fails if it cannot run.

use std::{
    thread,
    time::{Duration, Instant},
};

use common::{Connection, Tracer, free_ports, port_of, tracer::Stdout};
use serde_json::Value;

mod common;

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// How many flows in `v` have `port` at either end.
fn flows_on(v: &[Value], port: u16) -> usize {
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
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn output_file_is_reopened_on_sighup() {
    if !common::bpf_allowed() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tcp-trace-output-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.json");
    let rotated = dir.join("trace.json.1");
    let [a, b] = free_ports();
    let (a_arg, b_arg) = (a.to_string(), b.to_string());
    let path_arg = path.to_str().expect("a UTF-8 temporary path");
    let tracer = Tracer::spawn(
        &[
            "--json", "--view", "flows", "--port", &a_arg, "--port", &b_arg, "--output", path_arg,
        ],
        Stdout::Nothing,
        None,
    );

    Connection::on_loopback(a, "clean");
    wait_flow(&path, a);
    // What logrotate does: rename, then SIGHUP.
    std::fs::rename(&path, &rotated).unwrap();
    tracer.signal(libc::SIGHUP);
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGHUP made no new file"
        );
        thread::sleep(Duration::from_millis(50));
    }
    Connection::on_loopback(b, "clean");
    wait_flow(&path, b);
    // Its output is in the file, awaited there: stopped without a marker.
    let out = tracer.stop_now(libc::SIGINT);
    assert_eq!(out.code, Some(0), "tcp-trace's exit status");
    assert_eq!(
        out.stdout,
        Vec::<String>::new(),
        "--output still printed to stdout"
    );

    let (old, new) = (lines(&rotated), lines(&path));
    assert_eq!(old[0]["type"], "start", "{old:?}");
    assert_eq!((flows_on(&old, a), flows_on(&old, b)), (3, 0), "{old:?}");
    assert_eq!((flows_on(&new, a), flows_on(&new, b)), (0, 3), "{new:?}");
    // The run's summary lands in the file in use at the end.
    assert_eq!(new.last().unwrap()["type"], "summary", "{new:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
