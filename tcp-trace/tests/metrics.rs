//! `--metrics` against a real Prometheus (Debian's `prometheus` package, installed by `cargo
//! xtask setup-tests`): tcp-trace runs as a quiet metrics daemon, Prometheus scrapes it every
//! second on loopback, a close-unread RST and a clean close are made, and Prometheus's HTTP query
//! API must show them in the counters.
//!
//! Needs root (BPF) and the prometheus binary: outside CI it is skipped with a note; in CI
//! (CI=true) either missing is a failure.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Kills a child we started when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// One plain HTTP/1.0 GET on loopback: (status code, body).
fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant PromQL query that yields one sample (0 when it yields none).
fn query(prom: SocketAddr, promql: &str) -> f64 {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", urlencode(promql)))
        .unwrap_or_else(|e| panic!("querying Prometheus for {promql}: {e}"));
    assert_eq!(status, 200, "{promql}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["status"], "success", "{promql}: {body}");
    let result = v["data"]["result"].as_array().unwrap();
    assert!(result.len() <= 1, "{promql} gave several series: {body}");
    result
        .first()
        .map(|r| r["value"][1].as_str().unwrap().parse().unwrap())
        .unwrap_or(0.0)
}

/// Waits until every query has its expected value, or says which did not after `limit`.
fn wait_for(prom: SocketAddr, expect: &[(&str, f64)], limit: Duration) {
    let start = Instant::now();
    loop {
        let got: Vec<f64> = expect.iter().map(|(q, _)| query(prom, q)).collect();
        if got.iter().zip(expect).all(|(g, (_, e))| g == e) {
            return;
        }
        if start.elapsed() > limit {
            let table: Vec<String> = expect
                .iter()
                .zip(&got)
                .map(|((q, e), g)| format!("  {q}: expected {e}, Prometheus has {g}"))
                .collect();
            panic!(
                "Prometheus did not show the expected counters within {limit:?}:\n{}",
                table.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// The prometheus binary: Debian installs it as /usr/bin/prometheus.
fn prometheus_bin() -> Option<PathBuf> {
    ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn start_prometheus(bin: &Path, dir: &Path, target: SocketAddr) -> (Reaped, SocketAddr) {
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: tcp-trace\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("prometheus.log")).unwrap(),
        ))
        .spawn()
        .expect("start prometheus");
    let child = Reaped(child);
    let start = Instant::now();
    while !matches!(http_get(web, "/-/ready"), Ok((200, _))) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Prometheus did not become ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(200));
    }
    (child, web)
}

/// `tcp-trace peer serve` + `peer connect` on `port`, ended as `teardown` says.
fn connection(port: u16, teardown: &str) {
    let listen = format!("127.0.0.1:{port}");
    let mut server = Command::new(BIN)
        .args(["peer", "serve", "--listen", &listen, "--teardown", teardown])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("listening {port}"));
    let client = Command::new(BIN)
        .args(["peer", "connect", "--to", &listen])
        .output()
        .unwrap();
    assert!(client.status.success(), "{client:?}");
    assert!(server.wait().unwrap().success());
}

#[test]
fn prometheus_scrapes_resets_and_flows() {
    if !common::bpf_allowed() {
        return;
    }
    let Some(prom_bin) = prometheus_bin() else {
        common::skip(
            "Debian's prometheus package is not installed (`cargo xtask setup-tests` installs it)",
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("tcp-trace-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let (unread_port, clean_port) = (free_port(), free_port());
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut tracer = Command::new(BIN)
        .args([
            "--quiet",
            "--duration",
            "300s",
            "--metrics",
            &metrics.to_string(),
        ])
        .args([
            "--port",
            &unread_port.to_string(),
            "--port",
            &clean_port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcp-trace");
    let stdout = tracer.stdout.take().unwrap();
    let stderr = BufReader::new(tracer.stderr.take().unwrap());
    let tracer = Reaped(tracer);
    // Ready once it says it traces; stderr keeps being echoed for the test log.
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("  | {line}");
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("tcp-trace did not start tracing within 60 s");
        if line.contains("tracing; Ctrl-C to stop") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60));
    }

    let (_prom, prom) = start_prometheus(&prom_bin, &dir, metrics);
    wait_for(
        prom,
        &[("up{job=\"tcp-trace\"}", 1.0)],
        Duration::from_secs(30),
    );

    connection(unread_port, "unread");
    connection(clean_port, "clean");

    let sent = "sum(tcp_trace_resets_total{direction=\"sent\",cause=\"close-unread\",\
                reason=\"TCP_ABORT_ON_CLOSE\",tcpext=\"TCPAbortOnClose\",process=\"tcp-trace\"})";
    let received = "sum(tcp_trace_resets_total{direction=\"received\",cause=\"peer-reset\"})";
    wait_for(
        prom,
        &[
            (sent, 1.0),
            (received, 1.0),
            // Only those two: the clean close reset nothing.
            ("sum(tcp_trace_resets_total)", 2.0),
            // Both ends of both connections and both listeners ended, each as the model says.
            ("sum(tcp_trace_flows_ended_total)", 6.0),
            (
                "sum(tcp_trace_flows_ended_total{verdict=\"conforms\"})",
                6.0,
            ),
            ("sum(tcp_trace_flows_diverging_total)", 0.0),
            ("sum(tcp_trace_events_lost_total)", 0.0),
            ("tcp_trace_hook_attached{hook=\"inet_sock_set_state\"}", 1.0),
        ],
        Duration::from_secs(30),
    );
    assert!(query(prom, "tcp_trace_events_total{hook=\"tcp_send_reset\"}") >= 1.0);
    assert!(query(prom, "tcp_trace_events_total{hook=\"inet_sock_set_state\"}") >= 8.0);
    assert_eq!(query(prom, "count(tcp_trace_ring_fill_ratio)"), 1.0);
    assert_eq!(query(prom, "count(tcp_trace_flows_in_flight)"), 1.0);

    // --quiet: nothing on stdout.
    drop(tracer);
    let mut printed = String::new();
    BufReader::new(stdout).read_to_string(&mut printed).unwrap();
    assert_eq!(printed, "", "--quiet printed to stdout");
    let _ = std::fs::remove_dir_all(&dir);
}
