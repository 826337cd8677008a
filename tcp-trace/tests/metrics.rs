//! `--metrics` against a real Prometheus (Debian's `prometheus` package, installed by `cargo
//! xtask setup-tests`): tcp-trace runs as a quiet metrics daemon, Prometheus scrapes it every
//! second on loopback, a close-unread RST and a clean close are made, and Prometheus's HTTP query
//! API must show them in the counters.
//!
//! Needs root (BPF) and the prometheus binary: #[ignore]d unless run with --include-ignored,
//! and then it fails if either is missing.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{Connection, Tracer, free_port, free_ports, net::http_get, tracer::Stdout};
use serde_json::Value;

mod common;

/// Kills a child we started when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
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

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
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

    let [unread_port, clean_port, metrics_port] = free_ports();
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let (metrics_arg, unread_arg, clean_arg) = (
        metrics.to_string(),
        unread_port.to_string(),
        clean_port.to_string(),
    );
    // Ready once it says it traces (its stderr is echoed for the test log).
    let tracer = Tracer::spawn(
        &[
            "--quiet",
            "--metrics",
            &metrics_arg,
            "--port",
            &unread_arg,
            "--port",
            &clean_arg,
        ],
        Stdout::Nothing,
        None,
    );

    let (_prom, prom) = start_prometheus(&prom_bin, &dir, metrics);
    wait_for(
        prom,
        &[("up{job=\"tcp-trace\"}", 1.0)],
        Duration::from_secs(30),
    );

    Connection::on_loopback(unread_port, "unread");
    Connection::on_loopback(clean_port, "clean");

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

    // --quiet: nothing on stdout. Prometheus showed everything awaited: stop without a marker
    // (there is no output to see it in).
    let out = tracer.stop_now(libc::SIGTERM);
    assert_eq!(out.code, Some(0), "tcp-trace's exit status");
    assert_eq!(
        out.stdout,
        Vec::<String>::new(),
        "--quiet printed to stdout"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
