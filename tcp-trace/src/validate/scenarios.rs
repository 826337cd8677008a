//! The built-in scenarios: real connections between two namespaces, each ending in one known
//! way. A scenario drives the sockets (and, where it must, drops a segment or injects one), and
//! says which flow it is about and which model inputs that flow must go through.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::mpsc,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use tcp_trace_common::{DropRule, tcp_flag};

use super::{
    lab::{Dropper, Lab, SERVER_PORT, Side},
    rawtcp::{RawTcp, Seen, flag_names},
};

/// What the kernel sent back to a hand-made segment (see [`Probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Rst,
    Ack,
    Nothing,
}

impl Reply {
    pub fn of(seen: &[Seen]) -> Reply {
        if seen.iter().any(|s| s.has(tcp_flag::RST)) {
            Reply::Rst
        } else if seen.iter().any(|s| s.has(tcp_flag::ACK)) {
            Reply::Ack
        } else {
            Reply::Nothing
        }
    }
}

/// A wire-level check that works on any kernel: the scenario sends segments at a minisocket (or
/// where one was) and sees what comes back; the model, run over `inputs` from `start`, says what
/// should come back.
pub struct Probe {
    /// A model state name, e.g. `TW:TIME_WAIT`.
    pub start: &'static str,
    pub inputs: &'static [&'static str],
}

/// What a scenario run leaves for the judge.
#[derive(Default, Debug)]
pub struct RunNotes {
    /// What came back to the scenario's probe segment, if it has one.
    pub reply: Option<Reply>,
    /// The client's ephemeral port (identifies both flows).
    pub client_port: u16,
    /// What was seen on the wire or done to it, for the "kernel did" column.
    pub wire: Vec<String>,
    /// Scenario-specific checks: (what, passed).
    pub checks: Vec<(String, bool)>,
}

pub struct Ctx<'a> {
    pub lab: &'a Lab,
    pub dropper: &'a mut Dropper,
    pub notes: RunNotes,
}

impl Ctx<'_> {
    fn drop_next(&mut self, rule: DropRule) -> Result<()> {
        self.dropper.set(0, rule)
    }

    fn dropped(&self) -> Result<u32> {
        Ok(self.dropper.get(0)?.dropped)
    }
}

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// Whose flow the scenario is about.
    pub focus: Side,
    /// The focus flow is the listening socket rather than a connection.
    pub focus_listener: bool,
    /// Model inputs the focus flow must show, in this order (other inputs may come between).
    /// A `@tw` suffix marks an input at a TIME_WAIT minisocket: visible only with the
    /// tcp_timewait_state_process hook.
    pub script: &'static [&'static str],
    /// The wire-level check, if any.
    pub probe: Option<Probe>,
    /// Sysctls set in one namespace before the traffic.
    pub sysctls: &'static [(Side, &'static str, &'static str)],
    pub run: fn(&mut Ctx) -> Result<()>,
}

/// An exact RST at the minisocket, then a bare ACK: answered with RST only if the minisocket died.
const TW_RST_PROBE: Probe = Probe {
    start: "TW:TIME_WAIT",
    inputs: &["tw-rst", "tw-ack"],
};

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "clean-active-close",
        about: "client closes first; server answers with its own FIN",
        focus: Side::Client,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw"],
        sysctls: &[],
        probe: None,
        run: clean_close,
    },
    Scenario {
        name: "passive-close",
        about: "server receives FIN, closes: CLOSE_WAIT -> LAST_ACK",
        focus: Side::Server,
        focus_listener: false,
        script: &["fin", "close", "ack-of-fin"],
        sysctls: &[],
        probe: None,
        run: clean_close,
    },
    Scenario {
        name: "simultaneous-close",
        about: "both close; the client's first FIN is lost so the FINs cross: CLOSING",
        focus: Side::Client,
        focus_listener: false,
        script: &["close", "fin", "ack-of-fin"],
        sysctls: &[],
        probe: None,
        run: simultaneous_close,
    },
    Scenario {
        name: "half-close",
        about: "client shutdown(SHUT_WR), reads the answer to EOF, then closes",
        focus: Side::Client,
        focus_listener: false,
        script: &["shutdown-wr", "ack-of-fin", "fin"],
        sysctls: &[],
        probe: None,
        run: half_close,
    },
    Scenario {
        name: "close-unread",
        about: "server closes with the request unread: RST instead of FIN",
        focus: Side::Server,
        focus_listener: false,
        script: &["close-unread"],
        sysctls: &[],
        probe: None,
        run: close_unread,
    },
    Scenario {
        name: "linger-zero",
        about: "server sets SO_LINGER {1, 0} and closes: RST",
        focus: Side::Server,
        focus_listener: false,
        script: &["close-linger0"],
        sysctls: &[],
        probe: None,
        run: linger_zero,
    },
    Scenario {
        name: "close-unsent",
        about: "server closes with data still queued: the FIN follows the data, no RST",
        focus: Side::Server,
        focus_listener: false,
        script: &["close"],
        sysctls: &[],
        probe: None,
        run: close_unsent,
    },
    Scenario {
        name: "listener-close",
        about: "server closes its listener with an un-accepted child: RST to the child's peer",
        focus: Side::Server,
        focus_listener: false,
        script: &["close-linger0"],
        sysctls: &[],
        probe: None,
        run: listener_close,
    },
    Scenario {
        name: "data-after-close",
        about: "client writes after the server closed: the server side answers RST",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin"],
        sysctls: &[],
        probe: Some(Probe {
            start: "TW:FIN_WAIT2",
            inputs: &["tw-data"],
        }),
        run: data_after_close,
    },
    Scenario {
        name: "fin-wait2-timeout",
        about: "orphan FIN_WAIT2 with tcp_fin_timeout=1: gone before the peer's FIN (RST)",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin"],
        sysctls: &[(Side::Server, "net.ipv4.tcp_fin_timeout", "1")],
        probe: Some(Probe {
            start: "TW:FIN_WAIT2",
            inputs: &["tw-expire", "fin"],
        }),
        run: fin_wait2_timeout,
    },
    Scenario {
        name: "fin-ack-lost",
        about: "the ACK of the client's FIN is lost: the FIN is retransmitted",
        focus: Side::Client,
        focus_listener: false,
        script: &["close", "ack-of-fin"],
        sysctls: &[],
        probe: None,
        run: fin_ack_lost,
    },
    Scenario {
        name: "tw-syn",
        about: "a SYN for the same 4-tuple reaches TIME_WAIT: new incarnation",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw", "tw-syn@tw"],
        sysctls: &[],
        probe: None,
        run: tw_syn,
    },
    Scenario {
        name: "tw-rst-rfc1337-0",
        about: "an exact RST reaches TIME_WAIT with tcp_rfc1337=0: TIME_WAIT dies",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw", "tw-rst@tw"],
        sysctls: &[(Side::Server, "net.ipv4.tcp_rfc1337", "0")],
        probe: Some(TW_RST_PROBE),
        run: tw_rst,
    },
    Scenario {
        name: "tw-rst-rfc1337-1",
        about: "an exact RST reaches TIME_WAIT with tcp_rfc1337=1: ignored",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw", "tw-rst@tw"],
        sysctls: &[(Side::Server, "net.ipv4.tcp_rfc1337", "1")],
        probe: Some(TW_RST_PROBE),
        run: tw_rst,
    },
    Scenario {
        name: "tw-fin-retransmit",
        about: "the peer's FIN arrives again at TIME_WAIT: re-ACKed",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw", "tw-fin-retransmit@tw"],
        sysctls: &[],
        probe: Some(Probe {
            start: "TW:TIME_WAIT",
            inputs: &["tw-fin-retransmit"],
        }),
        run: tw_fin_retransmit,
    },
];

pub const REQUEST: &[u8] = b"GET /teardown\n";
pub const RESPONSE: &[u8] = b"200 bye\n";
/// Long enough for any delayed ACK to leave (the kernel's is at most 200 ms).
const SETTLE: Duration = Duration::from_millis(250);

/// A server thread in the server namespace: binds, then runs `f` on the listener.
fn serve<T: Send + 'static>(
    lab: &Lab,
    f: impl FnOnce(TcpListener) -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let addr = lab.server_addr();
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = lab.server.spawn(move || {
        let listener = reuse_listener(addr)?;
        let _ = ready_tx.send(());
        f(listener)
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("the server did not start listening"))?;
    Ok(handle)
}

fn reuse_listener(addr: SocketAddrV4) -> Result<TcpListener> {
    // SAFETY: plain socket calls on an fd we own through TcpListener afterwards.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let listener = <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd);
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let sin = sockaddr(addr);
        if libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), 16) != 0 {
            bail!("bind {addr}: {}", std::io::Error::last_os_error());
        }
        if libc::listen(fd, 16) != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> Result<()> {
    // SAFETY: a valid int option.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {name}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Connects from the client namespace, optionally from a given local port.
fn connect_from(lab: &Lab, local_port: Option<u16>) -> Result<TcpStream> {
    let (to, from) = (
        lab.server_addr(),
        SocketAddrV4::new(lab.client_ip, local_port.unwrap_or(0)),
    );
    lab.client.run(move || {
        // SAFETY: plain socket calls; the fd is owned by the TcpStream.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
            let sin = sockaddr(from);
            if libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), 16) != 0 {
                bail!("bind {from}: {}", std::io::Error::last_os_error());
            }
            let sin = sockaddr(to);
            if libc::connect(fd, (&sin as *const libc::sockaddr_in).cast(), 16) != 0 {
                bail!("connect {to}: {}", std::io::Error::last_os_error());
            }
            Ok(stream)
        }
    })
}

fn local_port(s: &TcpStream) -> u16 {
    s.local_addr().map(|a| a.port()).unwrap_or(0)
}

fn read_exact_len(s: &mut TcpStream, n: usize) -> Result<()> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).context("read")?;
    Ok(())
}

fn read_to_eof(s: &mut TcpStream) -> Result<usize> {
    let mut all = Vec::new();
    s.read_to_end(&mut all).context("read to EOF")
}

fn join<T>(h: std::thread::JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow!("scenario thread panicked"))?
}

fn set_linger_zero(fd: i32) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid struct linger.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Request, response, then the client closes first and the server follows after EOF.
fn clean_close(ctx: &mut Ctx) -> Result<()> {
    let server = serve(ctx.lab, |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        s.write_all(RESPONSE)?;
        read_to_eof(&mut s)?;
        // Let the ACK of the client's FIN leave on its own before our FIN.
        sleep(SETTLE);
        drop(s);
        sleep(SETTLE);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    c.write_all(REQUEST)?;
    read_exact_len(&mut c, RESPONSE.len())?;
    drop(c);
    join(server)
}

fn simultaneous_close(ctx: &mut Ctx) -> Result<()> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        s.write_all(RESPONSE)?;
        go_rx.recv_timeout(Duration::from_secs(5))?;
        // The client's FIN was dropped: we close while still ESTABLISHED.
        sleep(Duration::from_millis(20));
        drop(s);
        sleep(Duration::from_millis(1500));
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    let port = local_port(&c);
    ctx.notes.client_port = port;
    c.write_all(REQUEST)?;
    read_exact_len(&mut c, RESPONSE.len())?;
    sleep(SETTLE);
    ctx.drop_next(DropRule {
        remaining: 1,
        sport: port,
        flags_set: tcp_flag::FIN,
        ..Default::default()
    })?;
    drop(c);
    go_tx.send(())?;
    join(server)?;
    let dropped = ctx.dropped()?;
    ctx.notes
        .wire
        .push(format!("client's first FIN dropped ({dropped}x)"));
    ctx.notes
        .checks
        .push(("the client's first FIN was dropped".into(), dropped == 1));
    Ok(())
}

fn half_close(ctx: &mut Ctx) -> Result<()> {
    let server = serve(ctx.lab, |l| {
        let (mut s, _) = l.accept()?;
        read_to_eof(&mut s)?;
        sleep(SETTLE);
        s.write_all(RESPONSE)?;
        drop(s);
        sleep(SETTLE);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    c.write_all(REQUEST)?;
    c.shutdown(Shutdown::Write)?;
    let got = read_to_eof(&mut c)?;
    ctx.notes.checks.push((
        "the answer arrived after SHUT_WR".into(),
        got == RESPONSE.len(),
    ));
    sleep(Duration::from_millis(50));
    drop(c);
    join(server)
}

fn client_reads_until_reset(ctx: &mut Ctx, c: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let outcome = loop {
        match c.read(&mut buf) {
            Ok(0) => break "EOF".to_string(),
            Ok(_) => continue,
            Err(e) => break format!("{:?}", e.kind()),
        }
    };
    ctx.notes.wire.push(format!("client read: {outcome}"));
    ctx.notes.checks.push((
        "the client's read fails with ECONNRESET".into(),
        outcome == "ConnectionReset",
    ));
}

fn close_unread(ctx: &mut Ctx) -> Result<()> {
    let server = serve(ctx.lab, |l| {
        let (s, _) = l.accept()?;
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(2);
        while s.peek(&mut buf)? < REQUEST.len() && Instant::now() < deadline {
            sleep(Duration::from_millis(2));
        }
        drop(s);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    c.write_all(REQUEST)?;
    join(server)?;
    client_reads_until_reset(ctx, &mut c);
    Ok(())
}

fn linger_zero(ctx: &mut Ctx) -> Result<()> {
    let server = serve(ctx.lab, |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        set_linger_zero(s.as_raw_fd())?;
        drop(s);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    c.write_all(REQUEST)?;
    join(server)?;
    client_reads_until_reset(ctx, &mut c);
    Ok(())
}

fn close_unsent(ctx: &mut Ctx) -> Result<()> {
    let (sent_tx, sent_rx) = mpsc::channel::<usize>();
    let server = serve(ctx.lab, move |l| {
        let (mut s, _) = l.accept()?;
        s.set_nonblocking(true)?;
        // Fill the send path until the client's (unread) window is full.
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        s.set_nonblocking(false)?;
        drop(s);
        sent_tx.send(sent)?;
        sleep(SETTLE);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    let sent = sent_rx.recv_timeout(Duration::from_secs(10))?;
    let got = read_to_eof(&mut c)?;
    ctx.notes.wire.push(format!(
        "server queued {sent} bytes then closed; client read {got} bytes then EOF"
    ));
    ctx.notes.checks.push((
        "every byte arrived before the FIN (no RST)".into(),
        got == sent,
    ));
    drop(c);
    join(server)
}

fn listener_close(ctx: &mut Ctx) -> Result<()> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |l| {
        go_rx.recv_timeout(Duration::from_secs(5))?;
        drop(l); // never accepted
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    c.write_all(REQUEST)?;
    sleep(Duration::from_millis(100));
    go_tx.send(())?;
    join(server)?;
    client_reads_until_reset(ctx, &mut c);
    Ok(())
}

fn data_after_close(ctx: &mut Ctx) -> Result<()> {
    let server = serve(ctx.lab, |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        s.write_all(RESPONSE)?;
        drop(s);
        sleep(Duration::from_millis(800));
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    c.write_all(REQUEST)?;
    read_to_eof(&mut c)?;
    sleep(SETTLE);
    let raw = ctx.lab.client.run(RawTcp::open)?;
    c.write_all(b"one more thing\n")?;
    let seen = raw.collect_from(ctx.lab.server_addr(), Duration::from_millis(300));
    note_seen(ctx, "after the client's late data, server sent", &seen);
    ctx.notes.reply = Some(Reply::of(&seen));
    ctx.notes.checks.push((
        "the data after close was answered with RST".into(),
        seen.iter().any(|s| s.has(tcp_flag::RST)),
    ));
    drop(c);
    join(server)
}

fn fin_wait2_timeout(ctx: &mut Ctx) -> Result<()> {
    let server = serve(ctx.lab, |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        drop(s);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    c.write_all(REQUEST)?;
    read_to_eof(&mut c)?;
    join(server)?;
    // tcp_fin_timeout=1 on the server: its FIN_WAIT2 is gone after ~1 s. Close well after.
    sleep(Duration::from_millis(1800));
    let raw = ctx.lab.client.run(RawTcp::open)?;
    let server_addr = ctx.lab.server_addr();
    drop(c);
    let seen = raw.collect_from(server_addr, Duration::from_millis(300));
    note_seen(ctx, "after the client's late FIN, server sent", &seen);
    ctx.notes.reply = Some(Reply::of(&seen));
    ctx.notes.checks.push((
        "the late FIN found no socket: RST".into(),
        seen.iter().any(|s| s.has(tcp_flag::RST)),
    ));
    Ok(())
}

fn fin_ack_lost(ctx: &mut Ctx) -> Result<()> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        s.write_all(RESPONSE)?;
        go_rx.recv_timeout(Duration::from_secs(5))?;
        read_to_eof(&mut s)?;
        // Stay in CLOSE_WAIT until the retransmitted FIN has been ACKed.
        sleep(Duration::from_millis(1200));
        drop(s);
        sleep(SETTLE);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    let port = local_port(&c);
    ctx.notes.client_port = port;
    c.write_all(REQUEST)?;
    read_exact_len(&mut c, RESPONSE.len())?;
    sleep(SETTLE);
    // The server's next empty ACK toward the client is the ACK of its FIN.
    ctx.drop_next(DropRule {
        remaining: 1,
        dport: port,
        flags_set: tcp_flag::ACK,
        flags_clear: tcp_flag::FIN | tcp_flag::SYN | tcp_flag::RST,
        payload: 1,
        ..Default::default()
    })?;
    go_tx.send(())?;
    drop(c);
    join(server)?;
    let dropped = ctx.dropped()?;
    ctx.notes
        .wire
        .push(format!("ACK of the client's FIN dropped ({dropped}x)"));
    ctx.notes
        .checks
        .push(("the ACK of the FIN was dropped once".into(), dropped == 1));
    Ok(())
}

/// The server closes first (so TIME_WAIT sits on the server), the client follows. Returns the
/// client's final sequence number (its FIN's), read through TCP_REPAIR while it was established.
fn server_time_wait(
    ctx: &mut Ctx,
    keep_listening: bool,
) -> Result<(u32, std::thread::JoinHandle<Result<()>>)> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        s.write_all(RESPONSE)?;
        go_rx.recv_timeout(Duration::from_secs(5))?;
        drop(s);
        if keep_listening {
            l.set_nonblocking(true)?;
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                match l.accept() {
                    Ok((mut s2, _)) => {
                        s2.set_nonblocking(false)?;
                        read_to_eof(&mut s2)?;
                        break;
                    }
                    Err(_) => sleep(Duration::from_millis(5)),
                }
            }
        }
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c);
    c.write_all(REQUEST)?;
    read_exact_len(&mut c, RESPONSE.len())?;
    let write_seq = send_queue_seq(&c)?;
    go_tx.send(())?;
    read_to_eof(&mut c)?;
    sleep(SETTLE);
    drop(c);
    sleep(SETTLE);
    Ok((write_seq, server))
}

/// The next sequence number the socket will send (TCP_REPAIR + TCP_QUEUE_SEQ).
fn send_queue_seq(s: &TcpStream) -> Result<u32> {
    const TCP_REPAIR: i32 = 19;
    const TCP_REPAIR_QUEUE: i32 = 20;
    const TCP_QUEUE_SEQ: i32 = 21;
    const TCP_SEND_QUEUE: i32 = 2;
    const TCP_REPAIR_OFF_NO_WP: i32 = -1;
    let fd = s.as_raw_fd();
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 1)
        .context("TCP_REPAIR (needs CAP_NET_ADMIN)")?;
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    let mut seq: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as u32;
    // SAFETY: a u32 out-parameter of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_QUEUE_SEQ,
            (&mut seq as *mut u32).cast(),
            &mut len,
        )
    };
    let err = std::io::Error::last_os_error();
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)?;
    if rc != 0 {
        bail!("TCP_QUEUE_SEQ: {err}");
    }
    Ok(seq)
}

fn client_addr(ctx: &Ctx) -> SocketAddrV4 {
    SocketAddrV4::new(ctx.lab.client_ip, ctx.notes.client_port)
}

fn note_seen(ctx: &mut Ctx, what: &str, seen: &[Seen]) {
    let s = if seen.is_empty() {
        "nothing".to_string()
    } else {
        seen.iter()
            .map(|s| format!("[{}]", flag_names(s.flags)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    ctx.notes.wire.push(format!("{what}: {s}"));
}

fn tw_syn(ctx: &mut Ctx) -> Result<()> {
    let (_, server) = server_time_wait(ctx, true)?;
    // Same 4-tuple again: the SYN meets the server's TIME_WAIT minisocket.
    let port = ctx.notes.client_port;
    let mut again = connect_from(ctx.lab, Some(port))?;
    again.write_all(REQUEST)?;
    drop(again);
    join(server)?;
    ctx.notes
        .wire
        .push("a new connection from the same port was accepted".into());
    ctx.notes.checks.push((
        "the SYN into TIME_WAIT opened a new connection".into(),
        true,
    ));
    Ok(())
}

fn tw_rst(ctx: &mut Ctx) -> Result<()> {
    let (write_seq, server) = server_time_wait(ctx, false)?;
    join(server)?;
    let (from, to) = (client_addr(ctx), ctx.lab.server_addr());
    let raw = ctx.lab.client.run(RawTcp::open)?;
    // The client's FIN used write_seq; the minisocket's rcv_nxt is one past it.
    let rcv_nxt = write_seq.wrapping_add(1);
    raw.send(from, to, rcv_nxt, 0, tcp_flag::RST)?;
    sleep(Duration::from_millis(50));
    // Probe: is the minisocket still there? A bare ACK at rcv_nxt gets no answer from
    // TIME_WAIT, and a RST when nothing is left.
    raw.send(from, to, rcv_nxt, 1, tcp_flag::ACK)?;
    let seen = raw.collect_from(to, Duration::from_millis(300));
    note_seen(ctx, "after RST then a probe ACK, server sent", &seen);
    ctx.notes.reply = Some(Reply::of(&seen));
    let rfc1337 = ctx.lab.server.read_sysctl("net.ipv4.tcp_rfc1337")? == "1";
    let reset = seen.iter().any(|s| s.has(tcp_flag::RST));
    ctx.notes.checks.push(if rfc1337 {
        (
            "TIME_WAIT ignored the RST (probe unanswered)".into(),
            !reset,
        )
    } else {
        (
            "TIME_WAIT died of the RST (probe answered with RST)".into(),
            reset,
        )
    });
    Ok(())
}

fn tw_fin_retransmit(ctx: &mut Ctx) -> Result<()> {
    let (write_seq, server) = server_time_wait(ctx, false)?;
    join(server)?;
    let (from, to) = (client_addr(ctx), ctx.lab.server_addr());
    let raw = ctx.lab.client.run(RawTcp::open)?;
    // The FIN again: seq = rcv_nxt - 1.
    raw.send(from, to, write_seq, 1, tcp_flag::FIN | tcp_flag::ACK)?;
    let seen = raw.collect_from(to, Duration::from_millis(300));
    note_seen(ctx, "after a retransmitted FIN, server sent", &seen);
    ctx.notes.reply = Some(Reply::of(&seen));
    ctx.notes.checks.push((
        "TIME_WAIT re-ACKed the FIN".into(),
        seen.iter().any(|s| {
            s.has(tcp_flag::ACK) && !s.has(tcp_flag::RST) && s.ack == write_seq.wrapping_add(1)
        }),
    ));
    Ok(())
}

pub fn find(name: &str) -> Result<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name).ok_or_else(|| {
        anyhow!(
            "no scenario named `{name}`; the scenarios are: {}",
            SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

pub fn focus_port(s: &Scenario, notes: &RunNotes) -> (u16, Option<u16>) {
    match (s.focus, s.focus_listener) {
        (Side::Server, true) => (SERVER_PORT, None),
        (Side::Server, false) => (SERVER_PORT, Some(notes.client_port)),
        (Side::Client, _) => (notes.client_port, Some(SERVER_PORT)),
    }
}
