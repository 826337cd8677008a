//! Overload on the running kernel: a loopback churn far beyond what a deliberately tiny ring
//! buffer (`--buffer-size 8K`, about 44 events) can hold between two drains, then a slow trickle.
//! The losses must be counted and reported, the flows they touched judged `incomplete (events
//! lost)` and never `diverges`, and the flows after the burst judged normally again. And the
//! in-kernel filters (`--port`, `--pid`) must keep a churn they exclude out of the ring buffer
//! entirely: no event of it, no loss.
//!
//! The churn is synchronized on the tracer's output (the burst runs until the tracer reports a
//! loss; each slow connection waits for its events to be printed), not on timing. These need root
//! (BPF): #[ignore]d unless run with --include-ignored, and then they fail if they cannot run.
//! `OVERLOAD_DUMP=FILE` keeps the overload tracer's output for a look after a failure.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::bpf_allowed;
use serde_json::Value;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

/// One or two pages: about 44 events of 184 bytes.
const TINY_BUFFER: &str = "8K";
/// The burst runs at least this many connections, and until the tracer reports a loss.
const BURST_MIN: usize = 2000;
/// A burst this long without a loss reported is a failure (the buffer holds about 44 events).
const BURST_MAX: usize = 200_000;
/// The slow connections after the burst, one at a time.
const SLOW: usize = 6;
/// Longer than the tracer's 50 ms drain tick and its 50 ms reorder window together.
const PAUSE: Duration = Duration::from_millis(250);
/// Connections tried after the burst until one comes through whole, and how long each may take.
const MARKERS: usize = 40;
const MARKER_PATIENCE: Duration = Duration::from_secs(3);
/// How long to wait for something the tracer must print before calling it a hang.
const HANG: Duration = Duration::from_secs(120);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn port_of(addr: &Value) -> Option<u16> {
    addr.as_str()?.rsplit(':').next()?.parse().ok()
}

/// `tcp-trace --json` with its output collected by a thread, so the test can wait on it.
struct Tracer {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    lost_reported: Arc<AtomicBool>,
    reader: thread::JoinHandle<()>,
}

impl Tracer {
    fn start(args: &[&str]) -> Tracer {
        let mut child = Command::new(BIN)
            .args(["--json", "--duration", "10m"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tcp-trace");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let lost_reported = Arc::new(AtomicBool::new(false));
        let reader = {
            let lines = lines.clone();
            let lost = lost_reported.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let v: Value =
                        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                    if v["type"] == "lost" {
                        lost.store(true, Ordering::SeqCst);
                    }
                    lines.lock().unwrap().push(v);
                }
            })
        };
        let tracer = Tracer {
            child,
            lines,
            lost_reported,
            reader,
        };
        tracer.wait_for("the start line", |v| v["type"] == "start");
        tracer
    }

    /// Whether the tracer printed a line that `want` accepts within `patience`.
    fn printed(&self, patience: Duration, want: impl Fn(&Value) -> bool) -> bool {
        let started = Instant::now();
        let mut seen = 0;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if lines[seen..].iter().any(&want) {
                    return true;
                }
                seen = lines.len();
            }
            if started.elapsed() > patience {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the tracer printed a line that `want` accepts.
    fn wait_for(&self, what: &str, want: impl Fn(&Value) -> bool) {
        if !self.printed(HANG, want) {
            let lines = self.lines.lock().unwrap();
            let head: Vec<String> = lines.iter().take(40).map(|l| l.to_string()).collect();
            panic!(
                "tcp-trace did not print {what} (hung?); it printed {} lines, first:\n{}",
                lines.len(),
                head.join("\n")
            );
        }
    }

    /// Whether the tracer printed, within `patience`, both ends' socket destruction for the
    /// connection from `client_port` to `server_port`: then all of it came through.
    fn printed_connection(&self, patience: Duration, server_port: u16, client_port: u16) -> bool {
        [(client_port, server_port), (server_port, client_port)]
            .into_iter()
            .all(|(local, remote)| {
                self.printed(patience, |v| {
                    v["type"] == "event"
                        && v["hook"] == "tcp_destroy_sock"
                        && port_of(&v["local"]) == Some(local)
                        && port_of(&v["remote"]) == Some(remote)
                })
            })
    }

    /// Waits until the tracer printed all of the connection from `client_port` (see
    /// [`Tracer::printed_connection`]).
    fn wait_for_connection(&self, server_port: u16, client_port: u16) {
        assert!(
            self.printed_connection(HANG, server_port, client_port),
            "tcp-trace did not print the end of {client_port} > {server_port} (hung, or its \
             events were lost)"
        );
    }

    /// Stops it with SIGINT (Ctrl-C); returns its exit code and every line it printed.
    fn stop(mut self) -> (Option<i32>, Vec<Value>) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        self.reader.join().expect("reading the tracer's output");
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        (status.code(), lines)
    }
}

/// A loopback server for the churn. Per connection it waits for the request's first byte:
/// `C` reads the request, answers and closes (FINs both ways); `R` closes with the request
/// unread (the kernel answers with RST, TCP_ABORT_ON_CLOSE).
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Server {
    fn start(port: u16) -> Server {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the churn's port");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let mut first = [0u8; 1];
                    if !matches!(conn.peek(&mut first), Ok(1)) {
                        continue;
                    }
                    if first[0] == b'C' {
                        let mut req = Vec::new();
                        let mut buf = [0u8; 64];
                        while !req.ends_with(b"\n") {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => req.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = conn.write_all(b"bye\n");
                    }
                    drop(conn);
                }
            })
        };
        Server { port, stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept() up.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.thread.join().expect("the churn's server");
    }
}

/// One connection, clean or reset (see [`Server`]); returns the client's port.
fn connection(port: u16, reset: bool) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let local = s.local_addr().unwrap().port();
    s.write_all(if reset {
        b"R request\n"
    } else {
        b"C request\n"
    })
    .expect("send the request");
    // Read to EOF (clean) or until the reset.
    let mut buf = [0u8; 64];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    local
}

/// Connections as fast as two clients go, alternating clean and reset, until `done` says
/// (it is given the count so far). Returns the count.
fn churn(port: u16, done: impl Fn(usize) -> bool + Sync) -> usize {
    let count = AtomicUsize::new(0);
    thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while !done(count.load(Ordering::SeqCst)) {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    connection(port, n % 2 == 1);
                }
            });
        }
    });
    count.load(Ordering::SeqCst)
}

/// Slow connections on `port`, one at a time: each waits until the tracer printed all of it,
/// then pauses longer than the drain tick. Returns the client ports.
fn trickle(tracer: &Tracer, port: u16, n: usize) -> Vec<u16> {
    (0..n)
        .map(|i| {
            let client = connection(port, i % 2 == 1);
            tracer.wait_for_connection(port, client);
            thread::sleep(PAUSE);
            client
        })
        .collect()
}

fn of_type<'a>(lines: &'a [Value], t: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["type"] == t).collect()
}

fn summary(lines: &[Value]) -> &Value {
    lines
        .iter()
        .find(|l| l["type"] == "summary")
        .expect("a summary line at exit")
}

/// The flows of the connection from `client`: both ends (server side and client side).
fn flows_of<'a>(flows: &[&'a Value], server: u16, client: u16) -> Vec<&'a Value> {
    flows
        .iter()
        .copied()
        .filter(|f| {
            let (l, r) = (port_of(&f["key"]["local"]), port_of(&f["key"]["remote"]));
            (l, r) == (Some(client), Some(server)) || (l, r) == (Some(server), Some(client))
        })
        .collect()
}

/// How a socket's life starts, as timelines show it: a flow judged whole must begin so (the
/// tracer is older than every connection of the test).
const LIFE_STARTS: [&str; 3] = ["CLOSE -> SYN_SENT", "LISTEN -> SYN_RECV", "CLOSE -> LISTEN"];

fn first_detail(flow: &Value) -> &str {
    flow["timeline"][0]["detail"].as_str().unwrap_or("")
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn overload_is_counted_flagged_and_recovered_from() {
    if !bpf_allowed() {
        return;
    }
    let port = free_port();
    let tracer = Tracer::start(&["--port", &port.to_string(), "--buffer-size", TINY_BUFFER]);
    // The listener comes after the tracer: its flow is seen from its start too.
    let server = Server::start(port);

    // The burst: until the tracer has reported a loss (and at least BURST_MIN connections).
    let burst = churn(port, |n| {
        assert!(
            n < BURST_MAX,
            "{n} connections and no loss reported with a {TINY_BUFFER} buffer"
        );
        n >= BURST_MIN && tracer.lost_reported.load(Ordering::SeqCst)
    });

    // The rate falls. A marker connection printed whole shows the tracer has drained the burst
    // and read the lost counter after it (each drain is followed by a reading). The first
    // markers may still meet a full buffer: then another, after a pause.
    let markers = (0..MARKERS).position(|_| {
        thread::sleep(PAUSE);
        let marker = connection(port, false);
        tracer.printed_connection(MARKER_PATIENCE, port, marker)
    });
    let Some(markers) = markers else {
        panic!("{MARKERS} connections after the burst, none came through whole");
    };
    eprintln!(
        "overload: {burst} connections in the burst, the tracer caught up at marker {}",
        markers + 1
    );
    thread::sleep(PAUSE);
    let slow = trickle(&tracer, port, SLOW);
    server.stop();
    let (code, lines) = tracer.stop();
    if let Ok(path) = std::env::var("OVERLOAD_DUMP") {
        let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        std::fs::write(path, text.join("\n")).unwrap();
    }

    // Counted and reported.
    let summary = summary(&lines);
    let lost = summary["lost"].as_u64().unwrap();
    assert!(lost > 0, "{burst} connections, nothing lost: {summary}");
    assert_eq!(code, Some(3), "exit status with events lost: {summary}");
    let reported = of_type(&lines, "lost");
    assert!(!reported.is_empty());
    assert_eq!(reported.last().unwrap()["total"], lost, "{summary}");
    assert_eq!(summary["decode_errors"], 0, "{summary}");
    assert_eq!(
        summary["events"].as_u64().unwrap() as usize,
        of_type(&lines, "event").len()
    );

    // Verdicts: loss makes flows incomplete, never divergent, and a flow judged `conforms`
    // was seen from its set-up on (one whose start was lost must not pass as whole).
    let flows = of_type(&lines, "flow");
    assert!(!flows.is_empty());
    let mut incomplete = 0;
    for f in &flows {
        let v = &f["verdict"];
        match v["verdict"].as_str() {
            Some("conforms") => {
                assert!(
                    LIFE_STARTS.contains(&first_detail(f)),
                    "a flow not seen from its set-up conforms despite the losses: {f}"
                );
            }
            Some("incomplete") => {
                incomplete += 1;
                let reason = v["reason"].as_str().unwrap_or("");
                assert!(
                    reason.contains("events lost"),
                    "incomplete for another reason than the loss: {f}"
                );
            }
            _ => panic!("a verdict under loss that is neither conforms nor incomplete: {f}"),
        }
    }
    assert!(incomplete > 0, "no flow was flagged: {summary}");
    assert_eq!(
        summary["divergent_flows"],
        serde_json::json!([]),
        "{summary}"
    );
    assert!(summary["verdicts"].get("diverges").is_none(), "{summary}");
    // A loss is no evidence of a timeout: nothing on loopback timed out.
    for r in of_type(&lines, "reset") {
        assert_ne!(
            r["direction"], "silent",
            "a reset diagnosis invented from a loss: {r}"
        );
    }

    // Recovery: both ends of every slow connection are judged normally.
    for client in slow {
        let both = flows_of(&flows, port, client);
        assert_eq!(both.len(), 2, "flows of {client}: {both:?}");
        for f in both {
            assert_eq!(
                f["verdict"]["verdict"], "conforms",
                "a slow connection after the burst: {f}"
            );
        }
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn port_filter_drops_other_ports_in_the_kernel() {
    if !bpf_allowed() {
        return;
    }
    let (traced, other) = (free_port(), free_port());
    let tracer = Tracer::start(&["--port", &traced.to_string(), "--buffer-size", TINY_BUFFER]);
    let traced_server = Server::start(traced);
    let other_server = Server::start(other);

    // A churn on the other port, the size of a burst that overflows this buffer when traced,
    // with slow connections on the traced port meanwhile.
    let stop = AtomicBool::new(false);
    let slow = thread::scope(|scope| {
        scope.spawn(|| churn(other, |n| n >= BURST_MIN && stop.load(Ordering::SeqCst)));
        let slow = trickle(&tracer, traced, SLOW);
        stop.store(true, Ordering::SeqCst);
        slow
    });
    traced_server.stop();
    other_server.stop();
    let (code, lines) = tracer.stop();

    let summary = summary(&lines);
    assert_eq!(
        summary["lost"], 0,
        "the filtered churn took ring space: {summary}"
    );
    assert_eq!(code, Some(0), "{summary}");
    let events = of_type(&lines, "event");
    for e in &events {
        assert!(
            port_of(&e["local"]) == Some(traced) || port_of(&e["remote"]) == Some(traced),
            "an event of another port passed the filter: {e}"
        );
    }
    let flows = of_type(&lines, "flow");
    for client in slow {
        let both = flows_of(&flows, traced, client);
        assert_eq!(both.len(), 2, "flows of {client}: {both:?}");
        for f in both {
            assert_eq!(f["verdict"]["verdict"], "conforms", "{f}");
        }
    }
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn pid_filter_drops_other_processes_in_the_kernel() {
    if !bpf_allowed() {
        return;
    }
    // The traced process: a peer server in its own process, one clean connection to it.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut peer = Command::new(BIN)
        .args(["peer", "serve", "--listen", &listen, "--teardown", "clean"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn peer");
    let mut out = BufReader::new(peer.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("listening {port}"));
    let peer_pid = peer.id();
    // The churn's port is traced too, so that only --pid can keep it out. (Only these ports:
    // sockets whose owner the kernel does not know pass --pid, e.g. the children of a listener
    // older than the tracer, such as other tests' servers.)
    let other = free_port();
    let tracer = Tracer::start(&[
        "--pid",
        &peer_pid.to_string(),
        "--port",
        &port.to_string(),
        "--port",
        &other.to_string(),
        "--buffer-size",
        TINY_BUFFER,
    ]);

    // This process's churn (the kernel learns its sockets' owner at connect() and listen(),
    // after the tracer started), then the traced connection.
    let other_server = Server::start(other);
    churn(other, |n| n >= BURST_MIN);
    other_server.stop();
    let mut client = TcpStream::connect(&listen).expect("connect to the peer");
    client.write_all(b"GET /teardown\n").unwrap();
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply);
    drop(client);
    assert!(peer.wait().unwrap().success());
    tracer.wait_for("the traced server's socket destruction", |v| {
        v["type"] == "event"
            && v["hook"] == "tcp_destroy_sock"
            && port_of(&v["local"]) == Some(port)
    });
    let (code, lines) = tracer.stop();

    let summary = summary(&lines);
    assert_eq!(
        summary["lost"], 0,
        "the filtered churn took ring space: {summary}"
    );
    assert_eq!(code, Some(0), "{summary}");
    let events = of_type(&lines, "event");
    assert!(!events.is_empty(), "nothing traced for the peer");
    for e in &events {
        assert_eq!(e["owner"]["pid"], peer_pid, "another process's event: {e}");
        assert_ne!(port_of(&e["local"]), Some(other), "{e}");
        assert_ne!(port_of(&e["remote"]), Some(other), "{e}");
    }
}
