//! `tcp-trace resets` against the running kernel: every reset cause this machine can produce,
//! made on purpose, classified, attributed to the right process, and checked against the
//! kernel's own TcpExt counters.
//!
//! Each test runs in a private network namespace: the tracer is started inside it (so its "own"
//! namespace, whose counters it checks, is the private one) and so is all the traffic. Other tests
//! running in parallel reset connections too, but in other namespaces: the counter check here is
//! exact. BPF tracing is host-wide, so the assertions keep to the resets of this namespace.
//!
//! These need root (BPF, namespaces): #[ignore]d unless run with --include-ignored, and then
//! they fail if they cannot run.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{BIN, Connection, Stopped, Tracer, free_port, free_ports};
use serde_json::Value;
use tcp_trace::validate::netns::Netns;

mod common;

/// The tests that trace take turns: run side by side, the counter check of one of them saw its
/// kernel counters unmoved now and then (1 run in 4 here, never when run alone; the cause is not
/// understood yet), so they do not overlap.
static TRACING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    TRACING.lock().unwrap_or_else(|e| e.into_inner())
}

fn root_allowed() -> bool {
    common::root_for("load BPF programs and create network namespaces")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `tcp-trace resets --json --port P...` (unfiltered without ports) running inside `ns`: its
/// own namespace, whose counters it checks, is that one.
fn start_tracer(ns: &Netns, ports: &[u16]) -> Tracer {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut args = vec!["resets"];
    for p in &ports {
        args.extend(["--port", p.as_str()]);
    }
    Tracer::start_in(ns, &args)
}

/// What the tracer printed.
struct Output {
    /// `{"type":"reset"}` objects of the namespace under test.
    resets: Vec<Value>,
    summary: Value,
    /// The counter check of the namespace under test.
    check: Value,
    reset_summary: Value,
    code: Option<i32>,
}

/// Stops the tracer after its marker (a refused connection outside `ns`, on a port of its own)
/// and sorts what it printed.
fn stop(tracer: Tracer, ns: &Netns) -> Output {
    let out: Stopped = tracer.stop();
    let summary = out.summary().clone();
    assert_eq!(summary["lost"], 0, "events were lost: {summary}");
    let in_ns = |t: &str| -> Vec<Value> {
        out.of_type(t)
            .into_iter()
            .filter(|v| v["netns"] == ns.inode)
            .cloned()
            .collect()
    };
    let mut checks = in_ns("counter_check");
    assert_eq!(
        checks.len(),
        1,
        "one counter check of the tracer's own namespace: {checks:#?}"
    );
    Output {
        resets: in_ns("reset"),
        summary,
        check: checks.remove(0),
        reset_summary: out.one("reset_summary").clone(),
        code: out.code,
    }
}

impl Output {
    /// The resets whose local port is `port`.
    fn at(&self, port: u16) -> Vec<&Value> {
        self.resets
            .iter()
            .filter(|r| {
                r["local"]
                    .as_str()
                    .is_some_and(|l| l.ends_with(&format!(":{port}")))
            })
            .collect()
    }

    /// The one reset at local port `port` in `direction`.
    fn one(&self, port: u16, direction: &str) -> &Value {
        let found: Vec<_> = self
            .at(port)
            .into_iter()
            .filter(|r| r["direction"] == direction)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {direction} reset at :{port}: {:#?}",
            self.resets
        );
        found[0]
    }

    /// The resets whose remote port is `port` (the client ends of a server on `port`).
    fn towards(&self, port: u16) -> Vec<&Value> {
        self.resets
            .iter()
            .filter(|r| {
                r["peer"]
                    .as_str()
                    .is_some_and(|l| l.ends_with(&format!(":{port}")))
            })
            .collect()
    }

    /// Asserts the counter check: each `(counter, expected kernel delta)` matches tcp-trace's
    /// count exactly, every other abort counter stayed at 0, and every row is `ok`.
    fn assert_counters(&self, expected: &[(&str, u64)]) {
        let rows = self.check["rows"].as_array().expect("counter rows");
        for row in rows {
            let name = row["counter"].as_str().unwrap();
            let want = if name == "all" {
                expected.iter().map(|e| e.1).sum()
            } else {
                expected.iter().find(|e| e.0 == name).map_or(0, |e| e.1)
            };
            assert_eq!(row["kernel_delta"], want, "kernel's {name}: {}", self.check);
            assert_eq!(row["traced"], want, "tcp-trace's {name}: {}", self.check);
            assert_eq!(row["traced_max"], want, "{name}: {}", self.check);
            assert_eq!(row["verdict"], "ok", "{name}: {}", self.check);
        }
        assert_eq!(self.check["ok"], true, "{}", self.check);
        assert_eq!(self.summary["counter_mismatch"], false);
        assert_eq!(self.code, Some(0), "exit status");
    }
}

fn assert_reset(r: &Value, cause: &str, confidence: &str, owner: u32, counter: Option<&str>) {
    assert_eq!(r["cause"], cause, "{r}");
    assert_eq!(r["confidence"], confidence, "{r}");
    assert_eq!(r["owner"]["pid"], owner, "owner: {r}");
    match counter {
        Some(c) => assert_eq!(r["counter"], c, "{r}"),
        None => assert!(r["counter"].is_null(), "{r}"),
    }
}

/// A server (teardown `teardown`) and a client, each its own process, in the namespace.
/// Returns (server pid, client pid).
fn peer_pair(ns: &Netns, port: u16, teardown: &str) -> (u32, u32) {
    let listen = addr(port).to_string();
    let c = Connection::run_with(&listen, &listen, teardown, |mut cmd, _| {
        ns.run(move || Ok(cmd.spawn()?))
            .expect("spawn a peer in the namespace")
    });
    (c.server_pid, c.client_pid)
}

fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) {
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}, {value}): {}",
        std::io::Error::last_os_error()
    );
}

/// The socket's TCP state (tcp_info.tcpi_state).
fn tcp_state(s: &TcpStream) -> u8 {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    info[0]
}

const FIN_WAIT2: u8 = 5;
const CLOSE: u8 = 7;

/// Waits (at most `limit`) until `done` holds; the outcome is asserted by the caller.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    done()
}

/// The state of the namespace's socket (full or minisocket) with this local and remote port,
/// from /proc/net/tcp.
fn proc_state(ns: &Netns, local: u16, remote: u16) -> Option<u8> {
    let text = ns
        .run(|| Ok(std::fs::read_to_string("/proc/thread-self/net/tcp")?))
        .unwrap();
    let port_of = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (port_of(f.get(1)?) == Some(local) && port_of(f.get(2)?) == Some(remote))
            .then(|| u8::from_str_radix(f.get(3)?, 16).ok())
            .flatten()
    })
}

/// A listener and a connected pair in the namespace: (listener, client, accepted).
fn connect(ns: &Netns, port: u16) -> (TcpListener, TcpStream, TcpStream) {
    let listener = ns.run(move || Ok(TcpListener::bind(addr(port))?)).unwrap();
    let client = ns.run(move || Ok(TcpStream::connect(addr(port))?)).unwrap();
    let (server, _) = listener.accept().unwrap();
    (listener, client, server)
}

const REQUEST: &[u8] = b"GET /reset\n";

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn close_with_unread_data_and_linger_zero_by_separate_processes() {
    let _turn = one_at_a_time();
    if !root_allowed() {
        return;
    }
    let ns = Netns::new().unwrap();
    let [unread, linger0] = free_ports();
    let tracer = start_tracer(&ns, &[unread, linger0]);
    let (unread_server, unread_client) = peer_pair(&ns, unread, "unread");
    let (linger_server, linger_client) = peer_pair(&ns, linger0, "linger0");
    let out = stop(tracer, &ns);

    // This kernel names the reason: certain. The byte count needs tcp_close (not attachable
    // here), the age bound does not.
    let sent = out.one(unread, "sent");
    assert_reset(
        sent,
        "close-unread",
        "certain",
        unread_server,
        Some("TCPAbortOnClose"),
    );
    assert_eq!(sent["closer"]["pid"], unread_server, "{sent}");
    assert_eq!(sent["kernel_reason"], "TCP_ABORT_ON_CLOSE");
    assert!(sent["unread_wait_max_ns"].as_u64().is_some(), "{sent}");
    assert!(
        sent["advice"].as_str().unwrap().contains("SHUT_WR"),
        "{sent}"
    );
    let got: Vec<_> = out.towards(unread);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_reset(got[0], "peer-reset", "certain", unread_client, None);
    assert_eq!(got[0]["direction"], "received");
    assert_eq!(got[0]["peer_cause"], "close-unread", "{}", got[0]);

    let sent = out.one(linger0, "sent");
    assert!(
        sent["confidence"] == "certain" || sent["confidence"] == "derived",
        "{sent}"
    );
    assert_reset(
        sent,
        "linger-zero",
        sent["confidence"].as_str().unwrap(),
        linger_server,
        Some("TCPAbortOnData"),
    );
    assert_eq!(sent["closer"]["pid"], linger_server, "{sent}");
    let got = out.towards(linger0);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_reset(got[0], "peer-reset", "certain", linger_client, None);
    assert_eq!(got[0]["peer_cause"], "linger-zero");

    assert_eq!(out.resets.len(), 4, "{:#?}", out.resets);
    out.assert_counters(&[("TCPAbortOnClose", 1), ("TCPAbortOnData", 1)]);
    // The exit table: process x cause x peer.
    let rows = out.reset_summary["rows"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["pid"] == unread_server && r["cause"] == "close-unread")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(row["count"], 1);
    assert_eq!(row["peer"], "127.0.0.1");
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn orphans_time_wait_and_no_socket_replies() {
    let _turn = one_at_a_time();
    if !root_allowed() {
        return;
    }
    let ns = Netns::new().unwrap();
    let me = std::process::id();
    let [data, linger2, tw, closed] = free_ports();
    let tracer = start_tracer(&ns, &[data, linger2, tw, closed]);

    // Data after close: the orphan waits in FIN_WAIT2 as a full socket (TCP_LINGER2 > 60 s),
    // and the peer sends more: TCPAbortOnData and a reply RST.
    let (_l1, mut c1, mut s1) = connect(&ns, data);
    setsockopt_int(&s1, libc::IPPROTO_TCP, libc::TCP_LINGER2, 120);
    c1.write_all(REQUEST).unwrap();
    s1.read_exact(&mut [0u8; REQUEST.len()]).unwrap();
    let s1_port = c1.local_addr().unwrap().port();
    drop(s1);
    assert_eq!(c1.read(&mut [0u8; 16]).unwrap(), 0, "the FIN");
    assert!(
        wait_until(Duration::from_secs(5), || proc_state(&ns, data, s1_port)
            == Some(FIN_WAIT2)),
        "the orphan did not reach FIN_WAIT2"
    );
    c1.write_all(b"more").unwrap();
    assert!(wait_until(Duration::from_secs(5), || tcp_state(&c1) == CLOSE));

    // TCP_LINGER2 < 0: close() in FIN_WAIT2 resets at once, TCPAbortOnLinger.
    let (_l2, mut c2, mut s2) = connect(&ns, linger2);
    c2.write_all(REQUEST).unwrap();
    s2.read_exact(&mut [0u8; REQUEST.len()]).unwrap();
    setsockopt_int(&s2, libc::IPPROTO_TCP, libc::TCP_LINGER2, -1);
    s2.shutdown(Shutdown::Write).unwrap();
    assert_eq!(c2.read(&mut [0u8; 16]).unwrap(), 0, "the FIN");
    assert!(
        wait_until(Duration::from_secs(5), || tcp_state(&s2) == FIN_WAIT2),
        "shutdown(SHUT_WR) did not reach FIN_WAIT2"
    );
    drop(s2);
    assert!(wait_until(Duration::from_secs(5), || tcp_state(&c2) == CLOSE));

    // Data to a FIN_WAIT2 minisocket (default 60 s fin timeout): its reply bumps nothing.
    let (_l3, mut c3, mut s3) = connect(&ns, tw);
    c3.write_all(REQUEST).unwrap();
    s3.read_exact(&mut [0u8; REQUEST.len()]).unwrap();
    let c3_port = c3.local_addr().unwrap().port();
    drop(s3);
    assert_eq!(c3.read(&mut [0u8; 16]).unwrap(), 0, "the FIN");
    // The minisocket shows its substate, FIN_WAIT2, once the FIN's ACK made it.
    assert!(
        wait_until(Duration::from_secs(5), || proc_state(&ns, tw, c3_port)
            == Some(FIN_WAIT2)),
        "no FIN_WAIT2 minisocket"
    );
    c3.write_all(b"more").unwrap();
    assert!(wait_until(Duration::from_secs(5), || tcp_state(&c3) == CLOSE));

    // Nothing listens: the SYN gets a reply RST from no socket.
    let refused = ns
        .run(move || Ok(TcpStream::connect(addr(closed)).is_err()))
        .unwrap();
    assert!(refused, "connect to a closed port succeeded");

    let out = stop(tracer, &ns);

    let sent = out.one(data, "sent");
    assert_reset(
        sent,
        "data-after-close",
        "certain",
        me,
        Some("TCPAbortOnData"),
    );
    assert_eq!(sent["kernel_reason"], "TCP_ABORT_ON_DATA");
    assert!(
        out.at(data).iter().all(|r| r["direction"] != "received"),
        "tcp_reset() of the abort is not a received RST: {:#?}",
        out.at(data)
    );
    let got = out.towards(data);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_reset(got[0], "peer-reset", "certain", me, None);
    assert_eq!(got[0]["peer_cause"], "data-after-close");

    let sent = out.one(linger2, "sent");
    assert_reset(
        sent,
        "orphan-linger2",
        "certain",
        me,
        Some("TCPAbortOnLinger"),
    );
    assert_eq!(sent["closer"]["pid"], me, "{sent}");
    assert_eq!(out.towards(linger2)[0]["peer_cause"], "orphan-linger2");

    let sent = out.one(tw, "sent");
    assert_reset(sent, "time-wait", "certain", me, None);
    assert_eq!(out.towards(tw)[0]["peer_cause"], "time-wait");

    let sent = out.one(closed, "sent");
    assert_eq!(sent["cause"], "no-socket", "{sent}");
    assert_eq!(sent["confidence"], "certain", "{sent}");
    assert!(sent["counter"].is_null(), "{sent}");
    let got = out.towards(closed);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_reset(got[0], "peer-reset", "certain", me, None);
    assert!(
        got[0]["evidence"]
            .as_str()
            .unwrap()
            .contains("ECONNREFUSED"),
        "{}",
        got[0]
    );
    assert_eq!(got[0]["peer_cause"], "no-socket");

    assert_eq!(out.resets.len(), 8, "{:#?}", out.resets);
    out.assert_counters(&[("TCPAbortOnData", 1), ("TCPAbortOnLinger", 1)]);
}

/// Sets the namespace's loopback down (from a thread inside it): nothing answers any more.
fn loopback_down(ns: &Netns) {
    ns.run(|| {
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0);
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        unsafe {
            assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0);
            ifr.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short);
            assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0);
            libc::close(fd);
        }
        Ok(())
    })
    .unwrap();
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn timeouts_are_counted_without_inventing_a_reset() {
    let _turn = one_at_a_time();
    if !root_allowed() {
        return;
    }
    let ns = Netns::new().unwrap();
    let me = std::process::id();
    let [window, keepalive] = free_ports();
    let tracer = start_tracer(&ns, &[window, keepalive]);

    // The receiver never reads: zero window; TCP_USER_TIMEOUT ends the zero-window probing with
    // tcp_write_err(): ETIMEDOUT, TCPAbortOnTimeout, and no RST.
    let listener = ns
        .run(move || Ok(TcpListener::bind(addr(window))?))
        .unwrap();
    setsockopt_int(&listener, libc::SOL_SOCKET, libc::SO_RCVBUF, 4096);
    let mut sender = ns
        .run(move || Ok(TcpStream::connect(addr(window))?))
        .unwrap();
    let (_receiver, _) = listener.accept().unwrap();
    setsockopt_int(&sender, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 1000);
    sender.set_nonblocking(true).unwrap();
    let chunk = vec![0u8; 65536];
    while sender.write(&chunk).is_ok() {}
    assert!(
        wait_until(Duration::from_secs(30), || tcp_state(&sender) == CLOSE),
        "the zero-window sender did not time out"
    );
    let sender_port = sender.local_addr().unwrap().port();

    // Keepalive with nobody answering (loopback down): RST with TCP_KEEPALIVE_TIMEOUT and
    // TCPAbortOnTimeout.
    let (_l, idle, _s) = connect(&ns, keepalive);
    setsockopt_int(&idle, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    for opt in [libc::TCP_KEEPIDLE, libc::TCP_KEEPINTVL, libc::TCP_KEEPCNT] {
        setsockopt_int(&idle, libc::IPPROTO_TCP, opt, 1);
    }
    let idle_port = idle.local_addr().unwrap().port();
    loopback_down(&ns);
    assert!(
        wait_until(Duration::from_secs(30), || tcp_state(&idle) == CLOSE),
        "keepalive did not time out"
    );

    let out = stop(tracer, &ns);
    let silent = out.one(sender_port, "silent");
    assert_reset(silent, "timeout", "derived", me, Some("TCPAbortOnTimeout"));
    assert!(
        out.at(sender_port)
            .iter()
            .all(|r| r["direction"] == "silent"),
        "a timeout sends no RST: {:#?}",
        out.at(sender_port)
    );
    let sent = out.one(idle_port, "sent");
    assert_reset(
        sent,
        "keepalive-timeout",
        "certain",
        me,
        Some("TCPAbortOnTimeout"),
    );
    assert!(sent["closer"].is_null(), "{sent}");
    assert_eq!(out.resets.len(), 2, "{:#?}", out.resets);
    out.assert_counters(&[("TCPAbortOnTimeout", 2)]);
}

#[test]
fn resets_help_names_the_exit_status() {
    let out = Command::new(BIN)
        .args(["resets", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Exit status 5"), "{help}");
    assert!(help.contains("--netns"), "{help}");
}

#[test]
#[ignore = "needs root (BPF): run with --include-ignored as root, as `cargo xtask test` does"]
fn an_abort_the_hooks_cannot_see_is_a_counter_mismatch() {
    let _turn = one_at_a_time();
    if !root_allowed() {
        return;
    }
    let ns = Netns::new().unwrap();
    let full = free_port();
    // Unfiltered: the namespace is private, so the check is exact (a filtered trace may see less
    // than the kernel counts).
    let tracer = start_tracer(&ns, &[]);
    let close_hook = tracer.attached().iter().any(|h| h == "tcp_close");

    // A listener with a full accept queue drops SYNs: a second client stays in SYN_SENT. Its
    // close() with SO_LINGER {on, 0} sends nothing but counts TCPAbortOnData.
    let listener = ns.run(move || Ok(TcpListener::bind(addr(full))?)).unwrap();
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let _queued = ns.run(move || Ok(TcpStream::connect(addr(full))?)).unwrap();
    let syn_sent = ns
        .run(move || {
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
            assert!(fd >= 0);
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: full.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                },
                sin_zero: [0; 8],
            };
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
                let rc = libc::connect(
                    fd,
                    (&sin as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                assert_eq!(rc, -1);
                assert_eq!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EINPROGRESS)
                );
            }
            Ok(fd)
        })
        .unwrap();
    thread::sleep(Duration::from_millis(50));
    assert_eq!(unsafe { libc::close(syn_sent) }, 0);

    let out = stop(tracer, &ns);
    let data = out.check["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["counter"] == "TCPAbortOnData")
        .unwrap();
    assert_eq!(data["kernel_delta"], 1, "{}", out.check);
    if close_hook {
        // tcp_close shows the linger-0 close: a silent abort, counted exactly.
        assert_eq!(data["verdict"], "ok", "{}", out.check);
        assert_eq!(out.code, Some(0));
    } else {
        // Only a SYN_SENT -> CLOSE is visible (a guessed connect timeout): the kernel counted
        // an abort tcp-trace did not see, and says so.
        assert_eq!(data["traced"], 0, "{}", out.check);
        assert_eq!(data["verdict"], "mismatch", "{}", out.check);
        assert_eq!(out.check["ok"], false);
        assert_eq!(out.summary["counter_mismatch"], true);
        assert_eq!(out.code, Some(5), "exit status on a mismatch");
        let guess: Vec<_> = out
            .resets
            .iter()
            .filter(|r| r["direction"] == "silent")
            .collect();
        assert_eq!(guess.len(), 1, "{:#?}", out.resets);
        assert_eq!(guess[0]["confidence"], "guess", "{}", guess[0]);
    }
}
