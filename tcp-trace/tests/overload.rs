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
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use common::{Peer, Tracer, bpf_allowed, free_port, free_ports, port_of};
use serde_json::Value;

mod common;

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

/// Whether the tracer printed, within `patience`, both ends' socket destruction for the
/// connection from `client_port` to `server_port`: then all of it came through.
fn printed_connection(tracer: &Tracer, patience: Duration, server: u16, client: u16) -> bool {
    tracer.printed_sockets(patience, &[(client, server), (server, client)])
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
            tracer.wait_for_sockets(&[(client, port), (port, client)]);
            thread::sleep(PAUSE);
            client
        })
        .collect()
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
        n >= BURST_MIN && tracer.printed_type("lost")
    });

    // The rate falls. A marker connection printed whole shows the tracer has drained the burst
    // and read the lost counter after it (each drain is followed by a reading). The first
    // markers may still meet a full buffer: then another, after a pause.
    let markers = (0..MARKERS).position(|_| {
        thread::sleep(PAUSE);
        let marker = connection(port, false);
        printed_connection(&tracer, MARKER_PATIENCE, port, marker)
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
    let out = tracer.stop();
    if let Ok(path) = std::env::var("OVERLOAD_DUMP") {
        let text: Vec<String> = out.lines.iter().map(|l| l.to_string()).collect();
        std::fs::write(path, text.join("\n")).unwrap();
    }

    // Counted and reported.
    let summary = out.summary();
    let lost = summary["lost"].as_u64().unwrap();
    assert!(lost > 0, "{burst} connections, nothing lost: {summary}");
    assert_eq!(out.code, Some(3), "exit status with events lost: {summary}");
    let reported = out.of_type("lost");
    assert!(!reported.is_empty());
    assert_eq!(reported.last().unwrap()["total"], lost, "{summary}");
    assert_eq!(summary["decode_errors"], 0, "{summary}");
    assert_eq!(
        summary["events"].as_u64().unwrap() as usize,
        out.events_printed()
    );

    // Verdicts: loss makes flows incomplete, never divergent, and a flow judged `conforms`
    // was seen from its set-up on (one whose start was lost must not pass as whole).
    let flows = out.flows();
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
    for r in out.of_type("reset") {
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
    let [traced, other] = free_ports();
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
    let out = tracer.stop();

    let summary = out.summary();
    assert_eq!(
        summary["lost"], 0,
        "the filtered churn took ring space: {summary}"
    );
    assert_eq!(out.code, Some(0), "{summary}");
    let events = out.events();
    for e in &events {
        assert!(
            port_of(&e["local"]) == Some(traced) || port_of(&e["remote"]) == Some(traced),
            "an event of another port passed the filter: {e}"
        );
    }
    let flows = out.flows();
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
    let mut peer = Peer::spawn(&["serve", "--listen", &listen, "--teardown", "clean"]);
    assert_eq!(peer.port("listening"), port);
    let peer_pid = peer.pid();
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
    let client_port = client.local_addr().unwrap().port();
    client.write_all(tcp_trace::peer::REQUEST).unwrap();
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply);
    drop(client);
    peer.wait();
    // --pid keeps the marker out: the traced server's sockets, its listener and its end of the
    // connection, are the last it prints.
    let out = tracer.stop_after_sockets(&[(port, client_port), (port, 0)]);

    let summary = out.summary();
    assert_eq!(
        summary["lost"], 0,
        "the filtered churn took ring space: {summary}"
    );
    assert_eq!(out.code, Some(0), "{summary}");
    let events = out.events();
    assert!(!events.is_empty(), "nothing traced for the peer");
    for e in &events {
        assert_eq!(e["owner"]["pid"], peer_pid, "another process's event: {e}");
        assert_ne!(port_of(&e["local"]), Some(other), "{e}");
        assert_ne!(port_of(&e["remote"]), Some(other), "{e}");
    }
}
