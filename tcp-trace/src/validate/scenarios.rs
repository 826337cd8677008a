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
    netns::Netns,
    rawtcp::{RawTcp, Seen, flag_names},
};
use crate::flows::FlowReport;

/// What the kernel sent back to a hand-made segment (see [`Probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Reply {
    Rst,
    Ack,
    Nothing,
}

impl Reply {
    pub(crate) fn of(seen: &[Seen]) -> Reply {
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
/// should come back after each. The scenario records the replies to the last inputs
/// (`RunNotes::replies`); earlier ones (timers) are not answered on the wire.
pub(crate) struct Probe {
    /// A model state name, e.g. `TW:TIME_WAIT`.
    pub(crate) start: &'static str,
    pub(crate) inputs: &'static [&'static str],
}

/// Another flow of the scenario that must go through given inputs (besides the focus flow).
#[derive(Debug, Clone)]
pub(crate) struct AlsoFlow {
    pub(crate) side: Side,
    /// The client's ephemeral port of that connection.
    pub(crate) client_port: u16,
    pub(crate) script: &'static [&'static str],
}

/// What the model must know about a namespace's sockets that its sysctls do not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelSetting {
    /// The sockets set TCP_LINGER2 to this many seconds.
    Linger2(i32),
    /// No listener owns the port when a SYN reaches the minisocket.
    NoListener,
}

/// Checks on the judged focus flow: (what, passed).
pub(crate) type FlowChecks = fn(&FlowReport, &RunNotes) -> Vec<(String, bool)>;

/// What a scenario run leaves for the judge.
#[derive(Default, Debug)]
pub(crate) struct RunNotes {
    /// What came back to the probe's segments: one reply per input, for the last
    /// `replies.len()` inputs of the probe (the earlier ones are timers or unanswered by design).
    pub(crate) replies: Vec<Reply>,
    /// The client's ephemeral port (identifies both flows).
    pub(crate) client_port: u16,
    /// What was seen on the wire or done to it, for the "kernel did" column.
    pub(crate) wire: Vec<String>,
    /// Scenario-specific checks: (what, passed).
    pub(crate) checks: Vec<(String, bool)>,
    /// Other flows with inputs of their own to check.
    pub(crate) also: Vec<AlsoFlow>,
    /// Moments the scenario noted, CLOCK_MONOTONIC ns (the events' clock).
    pub(crate) marks: Vec<(&'static str, u64)>,
}

pub(crate) struct Ctx<'a> {
    pub(crate) lab: &'a Lab,
    pub(crate) dropper: &'a mut Dropper,
    pub(crate) notes: RunNotes,
}

impl Ctx<'_> {
    fn drop_next(&mut self, rule: DropRule) -> Result<()> {
        self.dropper.set(0, rule)
    }

    fn dropped(&self) -> Result<u32> {
        Ok(self.dropper.get(0)?.dropped)
    }
}

pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) about: &'static str,
    /// Whose flow the scenario is about.
    pub(crate) focus: Side,
    /// The focus flow is the listening socket rather than a connection.
    pub(crate) focus_listener: bool,
    /// Model inputs the focus flow must show, in this order (other inputs may come between).
    /// A `@tw` suffix marks an input at a TIME_WAIT minisocket: visible only with the
    /// tcp_timewait_state_process hook; `@close` one only the tcp_close hook tells apart.
    pub(crate) script: &'static [&'static str],
    /// The wire-level check, if any.
    pub(crate) probe: Option<Probe>,
    /// Sysctls set in one namespace before the traffic.
    pub(crate) sysctls: &'static [(Side, &'static str, &'static str)],
    /// Socket options the scenario sets, which the model of that side's flows must know.
    pub(crate) model: &'static [(Side, ModelSetting)],
    /// Host-wide sysctls the scenario changes for a moment (and restores): it runs only where
    /// validate owns the machine (`--owns-machine`), else it is reported as not run.
    pub(crate) host_sysctls: &'static [&'static str],
    /// Checks on the judged focus flow itself (e.g. when a step came).
    pub(crate) flow_checks: Option<FlowChecks>,
    pub(crate) run: fn(&mut Ctx) -> Result<()>,
}

/// An exact RST at the minisocket, then a bare ACK: answered with RST only if the minisocket died.
const TW_RST_PROBE: Probe = Probe {
    start: "TW:TIME_WAIT",
    inputs: &["tw-rst", "tw-ack"],
};

pub(crate) const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "clean-active-close",
        about: "client closes first; server answers with its own FIN",
        focus: Side::Client,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw"],
        sysctls: &[],
        probe: None,
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: half_close,
    },
    Scenario {
        name: "shutdown-rdwr-then-close",
        about: "client shutdown(SHUT_RDWR), its FIN ACKed (FIN_WAIT2), then close(): the kernel sets FIN_WAIT2 again and hands over to a FIN_WAIT2 minisocket",
        focus: Side::Client,
        focus_listener: false,
        // No hook tells SHUT_RDWR from SHUT_WR (both send the FIN, neither is traced). Without
        // tcp_close the close() leaves only FIN_WAIT2 -> FIN_WAIT2, which the judge does not
        // take as evidence yet (branch `restate` does), so there the first FIN may be either.
        script: &[
            "shutdown-rdwr|shutdown-wr@close",
            "ack-of-fin",
            "close@close",
            "tw-fin@tw",
        ],
        sysctls: &[],
        probe: None,
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: shutdown_rdwr_then_close,
    },
    Scenario {
        name: "connect-abandoned",
        about: "client close() while still SYN_SENT (the server's SYN-ACKs lost): CLOSE without RST, not a connect() timeout",
        focus: Side::Client,
        focus_listener: false,
        script: &["close"],
        sysctls: &[],
        probe: None,
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: connect_abandoned,
    },
    Scenario {
        name: "close-unread",
        about: "server closes with the request unread: RST instead of FIN",
        focus: Side::Server,
        focus_listener: false,
        script: &["close-unread"],
        sysctls: &[],
        probe: None,
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: listener_close,
    },
    Scenario {
        name: "listener-close-tfo-child",
        about: "a TCP Fast Open child, its data in the SYN and the client's ACK lost, still SYN_RECV in the accept queue when the listener closes: RST from SYN_RECV",
        focus: Side::Server,
        focus_listener: false,
        script: &["close-linger0"],
        // Server: TFO on, no cookie needed (0x203); client: TFO on, no cookie (0x5).
        sysctls: &[
            (Side::Server, "net.ipv4.tcp_fastopen", "515"),
            (Side::Client, "net.ipv4.tcp_fastopen", "5"),
        ],
        probe: None,
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: listener_close_tfo_child,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
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
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: tw_fin_retransmit,
    },
    Scenario {
        name: "orphan-retries-exhausted",
        about: "every ACK of the server's FIN is lost, tcp_orphan_retries=1: CLOSE without RST, the late FIN finds no socket",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "orphan-retries-exhausted"],
        sysctls: &[(Side::Server, "net.ipv4.tcp_orphan_retries", "1")],
        probe: Some(Probe {
            start: "freed",
            inputs: &["fin"],
        }),
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: orphan_retries_exhausted,
    },
    Scenario {
        name: "fin-without-ack",
        about: "in FIN_WAIT1 a FIN without the ACK flag is discarded; the real FIN+ACK then completes the close",
        focus: Side::Client,
        focus_listener: false,
        // Without tcp_fin the FIN+ACK shows as FIN_WAIT1 -> FIN_WAIT2 -> CLOSE: ack-of-fin, fin.
        script: &["shutdown-wr", "fin-ack|fin"],
        sysctls: &[],
        probe: Some(Probe {
            start: "fin-wait1",
            inputs: &["fin-without-ack"],
        }),
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: fin_without_ack,
    },
    Scenario {
        name: "fin-timeout-over-60s",
        about: "orphan FIN_WAIT2 with tcp_fin_timeout=61: keepalive timer for 1 s, then tcp_time_wait(FIN_WAIT2, 1 s)",
        focus: Side::Server,
        focus_listener: false,
        // Without tcp_time_wait, FIN_WAIT2 -> CLOSE could be the peer's FIN as far as the
        // events go; the timing check (before the peer's FIN was sent) settles it.
        script: &["close", "ack-of-fin", "fin-wait2-timeout|fin"],
        sysctls: &[(Side::Server, "net.ipv4.tcp_fin_timeout", "61")],
        probe: Some(Probe {
            start: "tw-fin-wait2",
            inputs: &["tw-expire", "fin"],
        }),
        model: &[],
        host_sysctls: &[],
        flow_checks: Some(fin_timeout_over_60s_timing),
        run: fin_timeout_over_60s,
    },
    Scenario {
        name: "linger2-negative",
        about: "TCP_LINGER2 -1: close() in FIN_WAIT2 resets at once; an orphan FIN_WAIT1 resets when its FIN is ACKed",
        focus: Side::Server,
        focus_listener: false,
        script: &["shutdown-wr", "ack-of-fin", "close"],
        sysctls: &[],
        probe: None,
        model: &[(Side::Server, ModelSetting::Linger2(-1))],
        host_sysctls: &[],
        flow_checks: None,
        run: linger2_negative,
    },
    Scenario {
        name: "close-memory-pressure",
        about: "tcp_max_orphans=0 (host-wide) with an orphan about: close() sends FIN then RST; the orphan's timer resets it",
        focus: Side::Server,
        focus_listener: false,
        script: &["memory-pressure"],
        sysctls: &[],
        probe: None,
        model: &[],
        host_sysctls: &["net.ipv4.tcp_max_orphans"],
        flow_checks: None,
        run: close_memory_pressure,
    },
    Scenario {
        name: "tw-syn-no-listener",
        about: "a SYN TIME_WAIT would accept, but no listener owns the port: answered with an ACK, the minisocket lives on",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw", "tw-syn@tw"],
        sysctls: &[],
        probe: Some(Probe {
            start: "tw-time-wait",
            inputs: &["tw-syn", "tw-ack"],
        }),
        model: &[(Side::Server, ModelSetting::NoListener)],
        host_sysctls: &[],
        flow_checks: None,
        run: tw_syn_no_listener,
    },
    Scenario {
        name: "tw-syn-old",
        about: "a SYN at TIME_WAIT with seq before rcv_nxt (listener present): not a new incarnation, answered with an ACK; the minisocket lives on",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw", "tw-syn-old@tw"],
        sysctls: &[],
        probe: Some(Probe {
            start: "tw-time-wait",
            inputs: &["tw-syn-old", "tw-ack"],
        }),
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: tw_syn_old,
    },
    Scenario {
        name: "disconnect-reconnect",
        about: "client connect(AF_UNSPEC) on a live connection (tcp_disconnect: RST, the socket kept in CLOSE), then connect() again on the same socket and an orderly close",
        focus: Side::Client,
        focus_listener: false,
        script: &["disconnect"],
        sysctls: &[],
        probe: None,
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: disconnect_reconnect,
    },
    Scenario {
        name: "tw-old-duplicate",
        about: "an old duplicate segment at TIME_WAIT is ACKed, an old RST dropped silently; the minisocket lives on",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "ack-of-fin", "tw-fin@tw", "tw-old-duplicate@tw"],
        sysctls: &[],
        probe: Some(Probe {
            start: "tw-time-wait",
            inputs: &["tw-old-duplicate", "rst-out-of-window", "tw-ack"],
        }),
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: tw_old_duplicate,
    },
    Scenario {
        name: "orphan-fin-wait1-data",
        about: "the server closes; the client's ACK of its FIN is lost and the client writes: that data ACKs the FIN, and the orphan FIN_WAIT1 answers with RST (TCPAbortOnData, no tcp_reset)",
        focus: Side::Server,
        focus_listener: false,
        script: &["close", "data-acking-fin"],
        sysctls: &[],
        probe: None,
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: orphan_fin_wait1_data,
    },
    Scenario {
        name: "data-out-of-window",
        about: "the server closes and the client's ACK of its FIN is lost; data beyond the orphan FIN_WAIT1's receive window gets a duplicate ACK, not the RST that in-window data gets (TCPAbortOnData stays 0), and the close completes",
        focus: Side::Server,
        focus_listener: false,
        // The dropped segment changes nothing a hook shows; the probe and the checks see it.
        script: &["close", "ack-of-fin|fin-ack"],
        sysctls: &[],
        probe: Some(Probe {
            start: "fin-wait1+orphan",
            inputs: &["data-out-of-window"],
        }),
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: data_out_of_window,
    },
    Scenario {
        name: "listener-stray-ack",
        about: "a segment with ACK and no connection to match reaches the listener: it answers with RST (reason TCP_FLAGS) and goes on listening",
        focus: Side::Server,
        focus_listener: true,
        script: &["data-after-close", "close"],
        sysctls: &[],
        probe: Some(Probe {
            start: "listen",
            inputs: &["data-after-close"],
        }),
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: listener_stray_ack,
    },
    Scenario {
        name: "user-timeout",
        about: "TCP_USER_TIMEOUT 500 ms and every ACK from the server lost: the client gives up (tcp_write_err): ETIMEDOUT, CLOSE without RST, TCPAbortOnTimeout",
        focus: Side::Client,
        focus_listener: false,
        script: &["connection-timeout", "close"],
        sysctls: &[],
        probe: None,
        model: &[],
        host_sysctls: &[],
        flow_checks: None,
        run: user_timeout,
    },
];

pub(crate) const REQUEST: &[u8] = b"GET /teardown\n";
pub(crate) const RESPONSE: &[u8] = b"200 bye\n";
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

/// The client connects, sends REQUEST and reads RESPONSE, then waits for the ACKs to settle;
/// its port identifies the scenario's flows.
fn request_and_response(ctx: &mut Ctx) -> Result<(TcpStream, u16)> {
    let mut c = connect_from(ctx.lab, None)?;
    let port = local_port(&c);
    ctx.notes.client_port = port;
    c.write_all(REQUEST)?;
    read_exact_len(&mut c, RESPONSE.len())?;
    sleep(SETTLE);
    Ok((c, port))
}

/// A server that answers one request and closes the connection when told to (the listener
/// goes with it).
fn serve_then_close(lab: &Lab) -> Result<(mpsc::Sender<()>, std::thread::JoinHandle<Result<()>>)> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(lab, move |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        s.write_all(RESPONSE)?;
        go_rx.recv_timeout(Duration::from_secs(5))?;
        drop(s);
        Ok(())
    })?;
    Ok((go_tx, server))
}

/// The next `remaining` bare ACKs (no data, FIN, SYN or RST) from TCP port `sport` to `dport`
/// (0: any).
fn bare_acks(remaining: u32, sport: u16, dport: u16) -> DropRule {
    DropRule {
        remaining,
        sport,
        dport,
        flags_set: tcp_flag::ACK,
        flags_clear: tcp_flag::FIN | tcp_flag::SYN | tcp_flag::RST,
        payload: 1,
        ..Default::default()
    }
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
    let (c, port) = request_and_response(ctx)?;
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

fn shutdown_rdwr_then_close(ctx: &mut Ctx) -> Result<()> {
    let (go_tx, server) = serve_then_close(ctx.lab)?;
    let (c, _) = request_and_response(ctx)?;
    c.shutdown(Shutdown::Both)?;
    let fin_wait2 = wait_state(&c, TCP_FIN_WAIT2, Duration::from_secs(2))?;
    ctx.notes.checks.push((
        "after SHUT_RDWR the client's FIN was ACKed (FIN_WAIT2) before close()".into(),
        fin_wait2 == TCP_FIN_WAIT2,
    ));
    drop(c);
    sleep(SETTLE);
    go_tx.send(())?;
    join(server)
}

fn connect_abandoned(ctx: &mut Ctx) -> Result<()> {
    const TCP_SYN_SENT: u8 = 2;
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |_l| {
        go_rx.recv_timeout(Duration::from_secs(5))?;
        Ok(())
    })?;
    let to = ctx.lab.server_addr();
    // Bound first, so that the server's SYN-ACKs to this port can be dropped.
    let c = bound_client(ctx.lab, libc::SOCK_STREAM | libc::SOCK_NONBLOCK)?;
    ctx.notes.client_port = local_port(&c);
    ctx.drop_next(DropRule {
        remaining: 1000,
        sport: SERVER_PORT,
        dport: ctx.notes.client_port,
        flags_set: tcp_flag::SYN | tcp_flag::ACK,
        ..Default::default()
    })?;
    let sin = sockaddr(to);
    // SAFETY: a valid sockaddr_in on an fd the stream owns; non-blocking, so EINPROGRESS.
    let rc = unsafe { libc::connect(c.as_raw_fd(), (&sin as *const libc::sockaddr_in).cast(), 16) };
    let err = std::io::Error::last_os_error();
    if rc == 0 || err.raw_os_error() != Some(libc::EINPROGRESS) {
        bail!("non-blocking connect {to}: expected EINPROGRESS, got {err}");
    }
    // Well inside the first SYN retransmission timeout (1 s): no timeout can be the cause.
    sleep(Duration::from_millis(200));
    let state = tcp_state(&c)?;
    drop(c);
    sleep(SETTLE);
    let dropped = ctx.dropped()?;
    ctx.dropper.clear()?;
    go_tx.send(())?;
    join(server)?;
    ctx.notes
        .wire
        .push(format!("{dropped} SYN-ACK(s) dropped before close()"));
    ctx.notes.checks.push((
        "the client was still SYN_SENT when it closed (its SYN-ACKs dropped)".into(),
        state == TCP_SYN_SENT && dropped >= 1,
    ));
    Ok(())
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

fn listener_close_tfo_child(ctx: &mut Ctx) -> Result<()> {
    const TCP_FASTOPEN: i32 = 23;
    let (tfo_tx, tfo_rx) = mpsc::channel::<Result<()>>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |l| {
        let _ = tfo_tx.send(setsockopt_int(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_FASTOPEN,
            16,
        ));
        go_rx.recv_timeout(Duration::from_secs(5))?;
        drop(l); // never accepted
        Ok(())
    })?;
    tfo_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("the server did not set TCP_FASTOPEN"))?
        .context("TCP_FASTOPEN on the listener")?;
    let to = ctx.lab.server_addr();
    // Bound first, so that the ACK of the SYN-ACK can be dropped by port before the SYN leaves.
    let c = bound_client(ctx.lab, libc::SOCK_STREAM)?;
    ctx.notes.client_port = local_port(&c);
    ctx.drop_next(bare_acks(1000, ctx.notes.client_port, 0))?;
    let sin = sockaddr(to);
    // SAFETY: sendto() on an fd the stream owns, with a valid buffer and address.
    let sent = unsafe {
        libc::sendto(
            c.as_raw_fd(),
            REQUEST.as_ptr().cast(),
            REQUEST.len(),
            libc::MSG_FASTOPEN,
            (&sin as *const libc::sockaddr_in).cast(),
            16,
        )
    };
    if sent < 0 {
        bail!("sendto(MSG_FASTOPEN): {}", std::io::Error::last_os_error());
    }
    sleep(Duration::from_millis(100));
    go_tx.send(())?;
    join(server)?;
    let mut c = c;
    client_reads_until_reset(ctx, &mut c);
    ctx.dropper.clear()?;
    check_counter(ctx, "TCPFastOpenPassive", 1)?;
    ctx.notes.also.push(AlsoFlow {
        side: Side::Client,
        client_port: ctx.notes.client_port,
        script: &["rst-exact"],
    });
    Ok(())
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
    // Watch what arrives while the client reads: the FIN must ride on the last data segment
    // (tcp_send_fin() sets it on the unsent tail skb, and tso_fragment() keeps it on the last
    // piece), never on a segment of its own.
    let raw = ctx.lab.client.run(|| RawTcp::open_with_buffer(8 << 20))?;
    let from = ctx.lab.server_addr();
    let watcher = std::thread::spawn(move || {
        raw.collect_until(from, Duration::from_secs(10), |s| s.has(tcp_flag::FIN))
    });
    let got = read_to_eof(&mut c)?;
    let seen = watcher
        .join()
        .map_err(|_| anyhow!("the segment watcher panicked"))?;
    ctx.notes.wire.push(format!(
        "server queued {sent} bytes then closed; client read {got} bytes then EOF"
    ));
    ctx.notes.checks.push((
        "every byte arrived before the FIN (no RST)".into(),
        got == sent,
    ));
    let fins: Vec<&Seen> = seen.iter().filter(|s| s.has(tcp_flag::FIN)).collect();
    ctx.notes.wire.push(match fins.first() {
        Some(f) => format!(
            "the FIN came on a segment with {} data bytes [{}]",
            f.len,
            flag_names(f.flags)
        ),
        None => "no FIN seen on the wire".into(),
    });
    ctx.notes.checks.push((
        "the FIN rode on the last data segment (no FIN-only segment)".into(),
        !fins.is_empty()
            && fins.iter().all(|f| f.len > 0)
            && !seen.iter().any(|s| s.has(tcp_flag::RST)),
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
    note_reply(ctx, "after the client's late data, server sent", &seen);
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
    note_reply(ctx, "after the client's late FIN, server sent", &seen);
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
    let (c, port) = request_and_response(ctx)?;
    // The server's next empty ACK toward the client is the ACK of its FIN.
    ctx.drop_next(bare_acks(1, 0, port))?;
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

/// What came back on the wire, as a note and as the probe's reply.
fn note_reply(ctx: &mut Ctx, what: &str, seen: &[Seen]) {
    note_seen(ctx, what, seen);
    ctx.notes.replies.push(Reply::of(seen));
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
    note_reply(ctx, "after RST then a probe ACK, server sent", &seen);
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
    note_reply(ctx, "after a retransmitted FIN, server sent", &seen);
    ctx.notes.checks.push((
        "TIME_WAIT re-ACKed the FIN".into(),
        seen.iter().any(|s| {
            s.has(tcp_flag::ACK) && !s.has(tcp_flag::RST) && s.ack == write_seq.wrapping_add(1)
        }),
    ));
    Ok(())
}

/// The kernel's TCP states as TCP_INFO reports them (include/net/tcp_states.h).
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE: u8 = 7;

/// tcpi_state of TCP_INFO: the full socket's state.
fn tcp_state(s: &TcpStream) -> Result<u8> {
    let mut info = [0u8; 256];
    let mut len = info.len() as u32;
    // SAFETY: a buffer of `len` bytes; the kernel writes at most that much.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("TCP_INFO: {}", std::io::Error::last_os_error());
    }
    Ok(info[0])
}

/// Waits until `s` is in `state` (TCP_INFO), at most `limit`; returns the last state seen.
fn wait_state(s: &TcpStream, state: u8, limit: Duration) -> Result<u8> {
    let deadline = Instant::now() + limit;
    loop {
        let now = tcp_state(s)?;
        if now == state || Instant::now() >= deadline {
            return Ok(now);
        }
        sleep(Duration::from_millis(5));
    }
}

fn set_linger2(s: &TcpStream, secs: i32) -> Result<()> {
    setsockopt_int(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_LINGER2, secs).context("TCP_LINGER2")
}

/// One TcpExt counter of a namespace (/proc/net/netstat as seen from inside it): the
/// kernel's own account, an independent check of what the trace claims.
fn tcpext(ns: &Netns, name: &str) -> Result<u64> {
    let text = ns.run(|| {
        std::fs::read_to_string("/proc/thread-self/net/netstat").context("read /proc/net/netstat")
    })?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next(), lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no TcpExt lines in /proc/net/netstat");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .ok_or_else(|| anyhow!("/proc/net/netstat has no TcpExt counter {name}"))?
        .1
        .parse()
        .with_context(|| format!("TcpExt {name}"))
}

/// Notes a server TcpExt counter and checks it reached `at_least`.
fn check_counter(ctx: &mut Ctx, name: &str, at_least: u64) -> Result<()> {
    let n = tcpext(&ctx.lab.server, name)?;
    ctx.notes.wire.push(format!("server TcpExt {name} = {n}"));
    ctx.notes.checks.push((
        format!("the server counted {name} (>= {at_least})"),
        n >= at_least,
    ));
    Ok(())
}

/// A host-wide sysctl changed for one scenario: the old value goes back when this is dropped
/// (also when the scenario fails). Only scenarios that declare it in `host_sysctls` use it, and
/// those run only where validate owns the machine. (A SIGKILL in between would leave it set.)
pub(crate) struct HostSysctl {
    path: String,
    old: String,
}

impl HostSysctl {
    /// Reads the current value; `file` is opened for writing now, in this (the host's)
    /// namespace, so another thread may write through it later.
    fn open(key: &str) -> Result<(HostSysctl, std::fs::File)> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let old = std::fs::read_to_string(&path)
            .with_context(|| format!("read {path}"))?
            .trim()
            .to_string();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("open {path} for writing"))?;
        Ok((HostSysctl { path, old }, file))
    }
}

impl Drop for HostSysctl {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!(
                "tcp-trace: validate: could not restore {} to {}: {e}",
                self.path, self.old
            );
        }
    }
}

/// The server closes; every ACK the client sends afterwards is lost, so the orphan retransmits
/// its FIN until tcp_write_timeout() gives up. retransmits_timed_out() counts time, not
/// retransmissions: with tcp_orphan_retries = N it gives up once (2^(N+1) - 1) x TCP_RTO_MIN
/// have passed since the first transmission, which is N retransmissions at the minimal RTO (one
/// more when the timer's jiffy rounding lands just short).
fn orphan_retries_exhausted(ctx: &mut Ctx) -> Result<()> {
    let (go_tx, server) = serve_then_close(ctx.lab)?;
    let (c, port) = request_and_response(ctx)?;
    ctx.drop_next(bare_acks(1000, port, 0))?;
    let server_addr = ctx.lab.server_addr();
    let raw = ctx.lab.client.run(RawTcp::open)?;
    go_tx.send(())?;
    // The listener goes with the server thread, so nothing on the port answers later but the
    // kernel's no-socket reset.
    join(server)?;
    let retries: u64 = ctx
        .lab
        .server
        .read_sysctl("net.ipv4.tcp_orphan_retries")?
        .parse()?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut aborted = 0;
    while Instant::now() < deadline && aborted == 0 {
        seen.extend(raw.collect_from(server_addr, Duration::from_millis(100)));
        aborted = tcpext(&ctx.lab.server, "TCPAbortOnTimeout")?;
    }
    let fins = seen.iter().filter(|s| s.has(tcp_flag::FIN)).count() as u64;
    let dropped = ctx.dropped()?;
    ctx.notes.wire.push(format!(
        "server sent its FIN {fins}x, the client's {dropped} ACKs were dropped"
    ));
    // retransmits_timed_out() measures from retrans_stamp, the first retransmission, so the
    // orphan gives up at the RTO after N + 1 retransmissions; a tail loss probe may add one.
    ctx.notes.checks.push((
        format!(
            "the FIN was retransmitted tcp_orphan_retries + 1 = {} times on the RTO (plus at \
             most one tail loss probe)",
            retries + 1
        ),
        (retries + 2..=retries + 3).contains(&fins),
    ));
    check_counter(ctx, "TCPAbortOnTimeout", 1)?;
    ctx.dropper.clear()?;
    drop(c);
    let seen = raw.collect_from(server_addr, Duration::from_millis(300));
    note_reply(ctx, "after the client's late FIN, server sent", &seen);
    ctx.notes.checks.push((
        "the late FIN found no socket: RST".into(),
        seen.iter().any(|s| s.has(tcp_flag::RST)),
    ));
    Ok(())
}

/// A keep-alive race: the server closes an idle connection just as the client sends its next
/// request. Losing the client's bare ACK of the FIN makes it certain that the request is what
/// ACKs the FIN.
fn orphan_fin_wait1_data(ctx: &mut Ctx) -> Result<()> {
    let (mut c, raw) = orphan_fin_wait1(ctx)?;
    let server_addr = ctx.lab.server_addr();
    // The client sends its next request, which carries the ACK of the server's FIN.
    c.write_all(REQUEST)?;
    let seen = raw.collect_until(server_addr, Duration::from_secs(3), |s| {
        s.has(tcp_flag::RST)
    });
    let dropped = ctx.dropped()?;
    ctx.notes.wire.push(format!(
        "the client's bare ACKs dropped: {dropped} (else its ACK of the FIN was delayed onto \
         the data); then it sent data"
    ));
    note_seen(ctx, "server sent", &seen);
    ctx.notes.checks.push((
        "the server answered the data with RST".into(),
        seen.iter().any(|s| s.has(tcp_flag::RST)),
    ));
    check_counter(ctx, "TCPAbortOnData", 1)?;
    ctx.dropper.clear()?;
    drop(c);
    Ok(())
}

/// One request and response, then the server closes while the client's bare ACKs are dropped:
/// its orphan stays in FIN_WAIT1, and the client has read the FIN (EOF). Returns the client's
/// socket and a raw socket on its side.
fn orphan_fin_wait1(ctx: &mut Ctx) -> Result<(TcpStream, RawTcp)> {
    let (go_tx, server) = serve_then_close(ctx.lab)?;
    let (mut c, port) = request_and_response(ctx)?;
    ctx.drop_next(bare_acks(1000, port, 0))?;
    let raw = ctx.lab.client.run(RawTcp::open)?;
    go_tx.send(())?;
    join(server)?;
    let eof = read_to_eof(&mut c)?;
    ctx.notes
        .checks
        .push(("the client read the server's FIN (EOF)".into(), eof == 0));
    Ok((c, raw))
}

/// The server closes while the client's ACKs are dropped (its orphan stays in FIN_WAIT1, the FIN
/// retransmitted); a raw segment from the client's address carries data 1 GiB past the client's
/// next byte, beyond any receive window. tcp_validate_incoming() drops it with a duplicate ACK
/// before the orphan's RCV_SHUTDOWN check could reset. Then the ACKs pass again and the next
/// FIN retransmission completes the close.
fn data_out_of_window(ctx: &mut Ctx) -> Result<()> {
    let (c, raw) = orphan_fin_wait1(ctx)?;
    let client_seq = send_queue_seq(&c)?;
    let (from, to) = (client_addr(ctx), ctx.lab.server_addr());
    raw.send_data(
        from,
        to,
        client_seq.wrapping_add(1 << 30),
        0,
        tcp_flag::ACK | tcp_flag::PSH,
        b"out of window\n",
    )?;
    // The orphan's FIN retransmissions are not answers; a duplicate ACK acks the client's next
    // byte, and carries no FIN.
    let answers: Vec<Seen> = raw
        .collect_from(to, Duration::from_millis(300))
        .into_iter()
        .filter(|s| s.has(tcp_flag::RST) || (!s.has(tcp_flag::FIN) && s.ack == client_seq))
        .collect();
    note_reply(
        ctx,
        "after data beyond its window, the orphan FIN_WAIT1 sent",
        &answers,
    );
    ctx.notes.checks.push((
        "the orphan answered with a duplicate ACK, not a RST".into(),
        !answers.is_empty() && answers.iter().all(|s| !s.has(tcp_flag::RST)),
    ));
    let aborts = tcpext(&ctx.lab.server, "TCPAbortOnData")?;
    ctx.notes
        .wire
        .push(format!("server TcpExt TCPAbortOnData = {aborts}"));
    ctx.notes.checks.push((
        "the server did not abort on the data (TCPAbortOnData = 0)".into(),
        aborts == 0,
    ));
    let dropped = ctx.dropped()?;
    ctx.notes
        .wire
        .push(format!("the client's bare ACKs dropped: {dropped}"));
    ctx.dropper.clear()?;
    // The next FIN retransmission is ACKed (FIN_WAIT2); the client's FIN then ends it.
    let fin = raw.collect_until(to, Duration::from_secs(3), |s| s.has(tcp_flag::FIN));
    ctx.notes.checks.push((
        "the server retransmitted its FIN, which was then ACKed".into(),
        fin.iter().any(|s| s.has(tcp_flag::FIN)),
    ));
    sleep(SETTLE);
    drop(c);
    sleep(SETTLE);
    Ok(())
}

/// The client port the stray ACK of listener_stray_ack claims to come from (no socket uses it).
const STRAY_PORT: u16 = 40999;

/// A hand-made ACK from a port with no connection reaches the server's listener (as a peer's
/// segment does after its connection's socket is gone): tcp_rcv_state_process()'s LISTEN case
/// answers any ACK with a reply RST. Then a real connection shows the listener still works.
fn listener_stray_ack(ctx: &mut Ctx) -> Result<()> {
    let (go_tx, server) = serve_then_close(ctx.lab)?;
    ctx.notes.client_port = STRAY_PORT;
    let (from, to) = (
        SocketAddrV4::new(ctx.lab.client_ip, STRAY_PORT),
        ctx.lab.server_addr(),
    );
    let raw = ctx.lab.client.run(RawTcp::open)?;
    raw.send(from, to, 0x1000_0000, 0x2000_0000, tcp_flag::ACK)?;
    let seen: Vec<Seen> = raw
        .collect_from(to, Duration::from_millis(300))
        .into_iter()
        .filter(|s| s.dst == from)
        .collect();
    note_reply(ctx, "the listener answered the stray ACK with", &seen);
    ctx.notes.checks.push((
        "the listener answered with a RST whose seq is the segment's ack (RFC 793)".into(),
        seen.iter()
            .any(|s| s.has(tcp_flag::RST) && s.seq == 0x2000_0000),
    ));
    let mut c = connect_from(ctx.lab, None)?;
    c.write_all(REQUEST)?;
    read_exact_len(&mut c, RESPONSE.len())?;
    go_tx.send(())?;
    join(server)?;
    let eof = read_to_eof(&mut c)?;
    ctx.notes.checks.push((
        "the listener then served a real connection to its end".into(),
        eof == 0,
    ));
    drop(c);
    sleep(SETTLE);
    Ok(())
}

/// The client's TCP_USER_TIMEOUT in user_timeout.
const USER_TIMEOUT_MS: i32 = 500;

/// The client sets TCP_USER_TIMEOUT and sends a request whose every ACK is lost; it
/// retransmits until the timeout, then tcp_write_err() closes it without a word to the peer.
/// The server's later FIN finds no socket.
fn user_timeout(ctx: &mut Ctx) -> Result<()> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        go_rx.recv_timeout(Duration::from_secs(20))?;
        drop(s);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    let port = local_port(&c);
    ctx.notes.client_port = port;
    setsockopt_int(
        c.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        USER_TIMEOUT_MS,
    )?;
    sleep(SETTLE);
    ctx.drop_next(bare_acks(1000, SERVER_PORT, port))?;
    let client_addr = SocketAddrV4::new(ctx.lab.client_ip, port);
    let raw = ctx.lab.server.run(RawTcp::open)?;
    let sent = Instant::now();
    c.write_all(REQUEST)?;
    let mut seen = Vec::new();
    let deadline = sent + Duration::from_secs(15);
    let mut aborted = 0;
    while Instant::now() < deadline && aborted == 0 {
        seen.extend(raw.collect_from(client_addr, Duration::from_millis(100)));
        aborted = tcpext(&ctx.lab.client, "TCPAbortOnTimeout")?;
    }
    let gave_up_after = sent.elapsed();
    // Whatever the client sent as it gave up (a RST would be wrong) has arrived by now.
    seen.extend(raw.collect_from(client_addr, Duration::from_millis(300)));
    let sends = seen.iter().filter(|s| s.len > 0).count();
    let dropped = ctx.dropped()?;
    ctx.notes.wire.push(format!(
        "client sent its request {sends}x, the server's {dropped} ACKs were dropped; gave up \
         after {} ms",
        gave_up_after.as_millis()
    ));
    ctx.notes
        .wire
        .push(format!("client TcpExt TCPAbortOnTimeout = {aborted}"));
    ctx.notes.checks.push((
        "the request was retransmitted (its ACKs lost)".into(),
        sends >= 2,
    ));
    ctx.notes
        .checks
        .push(("the client counted TCPAbortOnTimeout".into(), aborted >= 1));
    // A lower bound only: the kernel cannot give up sooner; how much later depends on the RTO.
    ctx.notes.checks.push((
        format!("the client gave up no sooner than TCP_USER_TIMEOUT ({USER_TIMEOUT_MS} ms)"),
        gave_up_after >= Duration::from_millis(USER_TIMEOUT_MS as u64),
    ));
    ctx.notes.checks.push((
        "the client sent no RST when it gave up".into(),
        !seen.iter().any(|s| s.has(tcp_flag::RST)),
    ));
    let mut byte = [0u8; 1];
    let errno = c.read(&mut byte).err().and_then(|e| e.raw_os_error());
    ctx.notes.checks.push((
        format!(
            "the client's next read() failed with ETIMEDOUT (got {})",
            match errno {
                Some(e) => std::io::Error::from_raw_os_error(e).to_string(),
                None => "no error".into(),
            }
        ),
        errno == Some(libc::ETIMEDOUT),
    ));
    ctx.dropper.clear()?;
    drop(c);
    go_tx.send(())?;
    join(server)?;
    Ok(())
}

/// The client half-closes; the server's bare ACKs are lost, so the client stays in FIN_WAIT1.
/// A hand-made FIN without the ACK flag at the client's rcv_nxt must change nothing; the
/// server's real FIN (which ACKs the client's) then ends it in TIME_WAIT.
fn fin_without_ack(ctx: &mut Ctx) -> Result<()> {
    let (seq_tx, seq_rx) = mpsc::channel::<u32>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |l| {
        let (mut s, _) = l.accept()?;
        read_exact_len(&mut s, REQUEST.len())?;
        s.write_all(RESPONSE)?;
        seq_tx.send(send_queue_seq(&s)?)?;
        go_rx.recv_timeout(Duration::from_secs(5))?;
        drop(s);
        sleep(SETTLE);
        Ok(())
    })?;
    let mut c = connect_from(ctx.lab, None)?;
    let port = local_port(&c);
    ctx.notes.client_port = port;
    c.write_all(REQUEST)?;
    read_exact_len(&mut c, RESPONSE.len())?;
    let server_seq = seq_rx.recv_timeout(Duration::from_secs(5))?;
    sleep(SETTLE);
    // Only a segment with FIN may carry the ACK of the client's FIN from now on.
    ctx.drop_next(bare_acks(1000, 0, port))?;
    c.shutdown(Shutdown::Write)?;
    let before = wait_state(&c, TCP_FIN_WAIT1, Duration::from_millis(500))?;
    let (from, to) = (ctx.lab.server_addr(), client_addr(ctx));
    let raw = ctx.lab.server.run(RawTcp::open)?;
    raw.send(from, to, server_seq, 0, tcp_flag::FIN)?;
    let seen = raw.collect_from(to, Duration::from_millis(300));
    let after = tcp_state(&c)?;
    // The client's own FIN retransmissions carry ack = server_seq; an answer to our FIN
    // would ACK server_seq + 1.
    let answers: Vec<Seen> = seen
        .iter()
        .filter(|s| s.has(tcp_flag::RST) || s.ack == server_seq.wrapping_add(1))
        .copied()
        .collect();
    note_reply(
        ctx,
        "after a FIN without ACK, the client answered",
        &answers,
    );
    ctx.notes.checks.push((
        "the client stayed in FIN_WAIT1 (the FIN without ACK was discarded)".into(),
        before == TCP_FIN_WAIT1 && after == TCP_FIN_WAIT1,
    ));
    go_tx.send(())?;
    join(server)?;
    let end = wait_state(&c, TCP_CLOSE, Duration::from_secs(1))?;
    ctx.notes.checks.push((
        "the server's FIN+ACK then completed the close (the full socket handed over to \
         TIME_WAIT: CLOSE)"
            .into(),
        end == TCP_CLOSE,
    ));
    drop(c);
    sleep(SETTLE);
    Ok(())
}

/// tcp_fin_timeout = 61 on the server: its orphan FIN_WAIT2 first waits tcp_fin_time - 60 s = 1 s
/// on the keepalive timer as a full socket, then becomes a FIN_WAIT2 minisocket for the same 1 s.
fn fin_timeout_over_60s(ctx: &mut Ctx) -> Result<()> {
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
    let fin_time: u64 = ctx
        .lab
        .server
        .read_sysctl("net.ipv4.tcp_fin_timeout")?
        .parse()?;
    let excess = Duration::from_secs(fin_time.saturating_sub(60));
    // Keepalive timer, then the minisocket's own timer, then some slack.
    sleep(excess * 2 + Duration::from_millis(800));
    let raw = ctx.lab.client.run(RawTcp::open)?;
    let server_addr = ctx.lab.server_addr();
    ctx.notes
        .marks
        .push(("peer FIN", crate::clock::now_ns(libc::CLOCK_MONOTONIC)));
    drop(c);
    let seen = raw.collect_from(server_addr, Duration::from_millis(300));
    note_reply(ctx, "after the client's late FIN, server sent", &seen);
    ctx.notes.checks.push((
        "both timers ran out within seconds: the late FIN found no socket (RST)".into(),
        seen.iter().any(|s| s.has(tcp_flag::RST)),
    ));
    Ok(())
}

/// When tcp_time_wait(FIN_WAIT2) came: tcp_fin_time - 60 s (1 s) after FIN_WAIT2, neither at
/// once (the <= 60 s path) nor after the full minute, and before the peer sent its FIN.
fn fin_timeout_over_60s_timing(f: &FlowReport, notes: &RunNotes) -> Vec<(String, bool)> {
    let at = |inputs: &[&str]| {
        f.steps
            .iter()
            .find(|s| inputs.contains(&s.input.as_str()))
            .and_then(|s| s.at_ns)
    };
    let peer_fin = notes
        .marks
        .iter()
        .find(|(what, _)| *what == "peer FIN")
        .map(|(_, ns)| *ns);
    let check = match (
        at(&["ack-of-fin"]),
        at(&["fin-wait2-timeout", "fin"]),
        peer_fin,
    ) {
        (Some(fin_wait2), Some(minisocket), Some(peer_fin)) => {
            let ms = minisocket.saturating_sub(fin_wait2) / 1_000_000;
            let before_peer = peer_fin.saturating_sub(minisocket) / 1_000_000;
            (
                format!(
                    "FIN_WAIT2 -> CLOSE (tcp_time_wait(FIN_WAIT2)) came {ms} ms after FIN_WAIT2 \
                     (the keepalive timer: tcp_fin_time - 60 s = 1000 ms; want 900 ms .. 30 s), \
                     {before_peer} ms before the peer's FIN"
                ),
                (900..30_000).contains(&ms) && peer_fin > minisocket,
            )
        }
        (a, b, c) => (
            format!(
                "the FIN_WAIT2 minisocket's timing: FIN_WAIT2 at {a:?}, FIN_WAIT2 -> CLOSE at \
                 {b:?}, the peer's FIN at {c:?} (all needed)"
            ),
            false,
        ),
    };
    vec![check]
}

/// TCP_LINGER2 = -1 on two server sockets: the first half-closes, reaches FIN_WAIT2 (held by the
/// application, so no timer) and is then closed: adjudge_to_death resets it (active RST,
/// TCP_ABORT_ON_LINGER). The second is closed while ESTABLISHED: the orphan's FIN_WAIT1 sees the
/// ACK of its FIN and tcp_rcv_state_process() calls tcp_done() and answers with a RST
/// (TCPAbortOnData).
fn linger2_negative(ctx: &mut Ctx) -> Result<()> {
    let (states_tx, states_rx) = mpsc::channel::<u8>();
    let server = serve(ctx.lab, move |l| {
        let (mut s1, _) = l.accept()?;
        read_exact_len(&mut s1, REQUEST.len())?;
        s1.shutdown(Shutdown::Write)?;
        states_tx.send(wait_state(&s1, TCP_FIN_WAIT2, Duration::from_secs(2))?)?;
        set_linger2(&s1, -1)?;
        drop(s1);
        let (mut s2, _) = l.accept()?;
        read_exact_len(&mut s2, REQUEST.len())?;
        set_linger2(&s2, -1)?;
        drop(s2);
        sleep(SETTLE);
        Ok(())
    })?;
    let mut c1 = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&c1);
    c1.write_all(REQUEST)?;
    let fin_wait2 = states_rx.recv_timeout(Duration::from_secs(5))?;
    ctx.notes.checks.push((
        "the first server socket reached FIN_WAIT2 before close()".into(),
        fin_wait2 == TCP_FIN_WAIT2,
    ));
    let end1 = wait_state(&c1, TCP_CLOSE, Duration::from_secs(2))?;
    let mut c2 = connect_from(ctx.lab, None)?;
    let port2 = local_port(&c2);
    c2.write_all(REQUEST)?;
    join(server)?;
    let end2 = wait_state(&c2, TCP_CLOSE, Duration::from_secs(2))?;
    ctx.notes.checks.push((
        "close() in FIN_WAIT2 reset the first client at once".into(),
        end1 == TCP_CLOSE,
    ));
    ctx.notes.checks.push((
        "the orphan's FIN_WAIT1 -> FIN_WAIT2 reset the second client".into(),
        end2 == TCP_CLOSE,
    ));
    check_counter(ctx, "TCPAbortOnLinger", 1)?;
    check_counter(ctx, "TCPAbortOnData", 1)?;
    ctx.notes.also.push(AlsoFlow {
        side: Side::Server,
        client_port: port2,
        script: &["close", "ack-of-fin"],
    });
    drop((c1, c2));
    Ok(())
}

/// tcp_check_oom() with net.ipv4.tcp_max_orphans = 0 (host-wide, restored afterwards). Orphans
/// are counted from a cache tcp_orphan_update() refreshes every 100 ms, so an orphan must exist
/// before: connection A's server socket is closed with every ACK of its FIN lost. Then, within
/// microseconds in one thread, tcp_max_orphans = 0 and close() of connection B: its FIN goes out,
/// then tcp_check_oom() resets it (TCP_ABORT_ON_MEMORY). At A's next retransmission timeout
/// tcp_out_of_resources() resets A too.
fn close_memory_pressure(ctx: &mut Ctx) -> Result<()> {
    let (guard, mut max_orphans) = HostSysctl::open("net.ipv4.tcp_max_orphans")?;
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let server = serve(ctx.lab, move |l| {
        let (mut a, _) = l.accept()?;
        read_exact_len(&mut a, REQUEST.len())?;
        let (mut b, _) = l.accept()?;
        read_exact_len(&mut b, REQUEST.len())?;
        ready_tx.send(())?;
        go_rx.recv_timeout(Duration::from_secs(5))?;
        drop(a);
        // Past the orphan cache's refresh, before A's second retransmission (~600 ms). The
        // cache's timer is deferrable: on an idle CPU (a quiet guest) it waits for the next
        // wake-up, so every CPU is kept busy meanwhile or the cache may still say 0 orphans.
        keep_cpus_awake(Duration::from_millis(350));
        max_orphans.write_all(b"0").context("tcp_max_orphans = 0")?;
        drop(b);
        Ok(())
    })?;
    let mut ca = connect_from(ctx.lab, None)?;
    let port_a = local_port(&ca);
    ca.write_all(REQUEST)?;
    let mut cb = connect_from(ctx.lab, None)?;
    ctx.notes.client_port = local_port(&cb);
    cb.write_all(REQUEST)?;
    ready_rx.recv_timeout(Duration::from_secs(5))?;
    ctx.drop_next(bare_acks(1000, port_a, 0))?;
    go_tx.send(())?;
    let joined = join(server);
    let end_b = wait_state(&cb, TCP_CLOSE, Duration::from_secs(2));
    let end_a = wait_state(&ca, TCP_CLOSE, Duration::from_secs(3));
    let old = guard.old.clone();
    drop(guard);
    ctx.notes.wire.push(format!(
        "tcp_max_orphans was 0 for about a second, restored to {old}"
    ));
    joined?;
    ctx.dropper.clear()?;
    ctx.notes.checks.push((
        "close() under tcp_check_oom() reset the client (FIN, then RST)".into(),
        end_b? == TCP_CLOSE,
    ));
    ctx.notes.checks.push((
        "the orphan's retransmission timer (tcp_out_of_resources) reset the other client".into(),
        end_a? == TCP_CLOSE,
    ));
    check_counter(ctx, "TCPAbortOnMemory", 2)?;
    ctx.notes.also.push(AlsoFlow {
        side: Side::Server,
        client_port: port_a,
        script: &["close", "orphan-out-of-resources"],
    });
    drop((ca, cb));
    Ok(())
}

/// Spins one thread on each CPU this process may use for `d`, so that every CPU's tick runs:
/// deferrable kernel timers (tcp_orphan_update's 100 ms refresh) fire only on a CPU that is
/// awake.
fn keep_cpus_awake(d: Duration) {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let cpus: Vec<usize> =
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0 {
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect()
        } else {
            Vec::new()
        };
    let until = Instant::now() + d;
    std::thread::scope(|s| {
        for cpu in cpus {
            s.spawn(move || {
                // SAFETY: as above; pins only this spinning thread.
                unsafe {
                    let mut one: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut one);
                    libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one);
                }
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            });
        }
    });
    // Without the affinity mask (never seen), at least the time passes.
    if Instant::now() < until {
        sleep(until - Instant::now());
    }
}

/// The client's kernel answers the minisocket's ACKs with a bare RST (it has no socket for the
/// A client socket bound to an ephemeral port of the client address, not yet connected (so
/// drop rules can name its port before its SYN leaves). `ty`: the socket type and flags.
fn bound_client(lab: &Lab, ty: i32) -> Result<TcpStream> {
    let from = SocketAddrV4::new(lab.client_ip, 0);
    lab.client.run(move || {
        // SAFETY: plain socket calls; the fd is owned by the TcpStream.
        unsafe {
            let fd = libc::socket(libc::AF_INET, ty, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
            let sin = sockaddr(from);
            if libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), 16) != 0 {
                bail!("bind {from}: {}", std::io::Error::last_os_error());
            }
            Ok(stream)
        }
    })
}

/// A minisocket's answer to a SYN it does not take: an ACK of rcv_nxt, no SYN-ACK.
fn acked_not_syn_acked(seen: &[Seen], rcv_nxt: u32) -> bool {
    !seen.iter().any(|s| s.has(tcp_flag::SYN))
        && seen
            .iter()
            .any(|s| s.has(tcp_flag::ACK) && !s.has(tcp_flag::RST) && s.ack == rcv_nxt)
}

/// A bare ACK at rcv_nxt: a live minisocket takes it silently, a dead one's port answers RST.
fn bare_ack_finds_minisocket(
    ctx: &mut Ctx,
    raw: &RawTcp,
    from: SocketAddrV4,
    to: SocketAddrV4,
    rcv_nxt: u32,
) -> Result<()> {
    raw.send(from, to, rcv_nxt, 1, tcp_flag::ACK)?;
    let seen = raw.collect_from(to, Duration::from_millis(300));
    note_reply(ctx, "then after a bare ACK, server sent", &seen);
    ctx.notes.checks.push((
        "the minisocket lives on (the bare ACK is not answered with RST)".into(),
        !seen.iter().any(|s| s.has(tcp_flag::RST)),
    ));
    Ok(())
}

/// 4-tuple any more), and that RST sits exactly at rcv_nxt: it would kill TIME_WAIT. Drop it.
fn drop_client_resets(ctx: &mut Ctx) -> Result<()> {
    ctx.drop_next(DropRule {
        remaining: 1000,
        sport: ctx.notes.client_port,
        flags_set: tcp_flag::RST,
        flags_clear: tcp_flag::ACK,
        ..Default::default()
    })
}

fn tw_syn_no_listener(ctx: &mut Ctx) -> Result<()> {
    let (write_seq, server) = server_time_wait(ctx, false)?;
    // The server thread's listener is gone with it: nobody owns the port.
    join(server)?;
    drop_client_resets(ctx)?;
    let (from, to) = (client_addr(ctx), ctx.lab.server_addr());
    let rcv_nxt = write_seq.wrapping_add(1);
    let raw = ctx.lab.client.run(RawTcp::open)?;
    // A SYN after rcv_nxt: tcp_timewait_state_process() says TCP_TW_SYN.
    raw.send(from, to, write_seq.wrapping_add(100_000), 0, tcp_flag::SYN)?;
    let seen = raw.collect_from(to, Duration::from_millis(300));
    note_reply(ctx, "after a SYN into TIME_WAIT, server sent", &seen);
    ctx.notes.checks.push((
        "no listener: no SYN-ACK, the SYN was answered with an ACK of rcv_nxt".into(),
        acked_not_syn_acked(&seen, rcv_nxt),
    ));
    bare_ack_finds_minisocket(ctx, &raw, from, to, rcv_nxt)?;
    Ok(())
}

fn tw_syn_old(ctx: &mut Ctx) -> Result<()> {
    // The listener stays: a SYN TIME_WAIT accepted would be handed to it (SYN-ACK).
    let (write_seq, server) = server_time_wait(ctx, true)?;
    drop_client_resets(ctx)?;
    let (from, to) = (client_addr(ctx), ctx.lab.server_addr());
    let rcv_nxt = write_seq.wrapping_add(1);
    let raw = ctx.lab.client.run(RawTcp::open)?;
    // Before rcv_nxt, no timestamp option: RFC 1122's new-incarnation test fails.
    raw.send(from, to, write_seq.wrapping_sub(100_000), 0, tcp_flag::SYN)?;
    let seen = raw.collect_from(to, Duration::from_millis(300));
    note_reply(
        ctx,
        "after a SYN before rcv_nxt into TIME_WAIT, server sent",
        &seen,
    );
    ctx.notes.checks.push((
        "no SYN-ACK: the old SYN was answered with an ACK of rcv_nxt".into(),
        acked_not_syn_acked(&seen, rcv_nxt),
    ));
    bare_ack_finds_minisocket(ctx, &raw, from, to, rcv_nxt)?;
    join(server)?;
    Ok(())
}

/// connect() with AF_UNSPEC on a connected socket: __inet_stream_connect() calls
/// tcp_disconnect().
fn connect_af_unspec(s: &TcpStream) -> Result<()> {
    // SAFETY: a zeroed sockaddr with only the family set, on an fd the stream owns.
    let rc = unsafe {
        let mut sa: libc::sockaddr = std::mem::zeroed();
        sa.sa_family = libc::AF_UNSPEC as u16;
        libc::connect(
            s.as_raw_fd(),
            &sa,
            std::mem::size_of::<libc::sockaddr>() as u32,
        )
    };
    if rc != 0 {
        bail!("connect(AF_UNSPEC): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn connect_again(s: &TcpStream, to: SocketAddrV4) -> Result<()> {
    let sin = sockaddr(to);
    // SAFETY: a valid sockaddr_in on an fd the stream owns.
    let rc = unsafe { libc::connect(s.as_raw_fd(), (&sin as *const libc::sockaddr_in).cast(), 16) };
    if rc != 0 {
        bail!("connect {to} again: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn disconnect_reconnect(ctx: &mut Ctx) -> Result<()> {
    let server = serve(ctx.lab, move |l| {
        let (mut a, _) = l.accept()?;
        read_exact_len(&mut a, REQUEST.len())?;
        a.write_all(RESPONSE)?;
        // The client's tcp_disconnect() resets this one.
        let mut buf = [0u8; 1];
        let reset =
            matches!(a.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
        drop(a);
        let (mut b, _) = l.accept()?;
        read_exact_len(&mut b, REQUEST.len())?;
        read_to_eof(&mut b)?;
        drop(b);
        Ok(reset)
    })?;
    let (c, first_port) = request_and_response(ctx)?;
    connect_af_unspec(&c)?;
    sleep(SETTLE);
    let disconnected = tcp_state(&c)? == TCP_CLOSE;
    connect_again(&c, ctx.lab.server_addr())?;
    let second_port = local_port(&c);
    let mut c = c;
    c.write_all(REQUEST)?;
    sleep(SETTLE);
    drop(c);
    let reset = join(server)?;
    ctx.notes.wire.push(format!(
        "client port {first_port}, then {second_port} after connect() again on the same socket"
    ));
    ctx.notes.checks.push((
        "connect(AF_UNSPEC) left the client socket in CLOSE".into(),
        disconnected,
    ));
    ctx.notes.checks.push((
        "the server read ECONNRESET (tcp_disconnect() sent a RST)".into(),
        reset,
    ));
    ctx.notes.also.push(AlsoFlow {
        side: Side::Server,
        client_port: first_port,
        script: &["rst-exact"],
    });
    ctx.notes.also.push(AlsoFlow {
        side: Side::Client,
        client_port: second_port,
        script: &["close"],
    });
    Ok(())
}

fn tw_old_duplicate(ctx: &mut Ctx) -> Result<()> {
    let (write_seq, server) = server_time_wait(ctx, false)?;
    join(server)?;
    drop_client_resets(ctx)?;
    let (from, to) = (client_addr(ctx), ctx.lab.server_addr());
    let rcv_nxt = write_seq.wrapping_add(1);
    let raw = ctx.lab.client.run(RawTcp::open)?;
    // The client's request again: data that ends before rcv_nxt.
    let old_seq = write_seq.wrapping_sub(REQUEST.len() as u32);
    raw.send_data(from, to, old_seq, 1, tcp_flag::ACK | tcp_flag::PSH, REQUEST)?;
    let seen = raw.collect_from(to, Duration::from_millis(300));
    note_reply(ctx, "after an old duplicate, server sent", &seen);
    ctx.notes.checks.push((
        "the old duplicate was answered with an ACK of rcv_nxt".into(),
        seen.iter()
            .any(|s| s.has(tcp_flag::ACK) && !s.has(tcp_flag::RST) && s.ack == rcv_nxt),
    ));
    // An old RST, far before rcv_nxt: dropped without a word.
    raw.send(
        from,
        to,
        write_seq.wrapping_sub(100_000),
        1,
        tcp_flag::RST | tcp_flag::ACK,
    )?;
    let seen = raw.collect_from(to, Duration::from_millis(300));
    note_reply(ctx, "after an old RST, server sent", &seen);
    bare_ack_finds_minisocket(ctx, &raw, from, to, rcv_nxt)?;
    Ok(())
}

pub(crate) fn find(name: &str) -> Result<&'static Scenario> {
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

pub(crate) fn focus_port(s: &Scenario, notes: &RunNotes) -> (u16, Option<u16>) {
    match (s.focus, s.focus_listener) {
        (Side::Server, true) => (SERVER_PORT, None),
        (Side::Server, false) => (SERVER_PORT, Some(notes.client_port)),
        (Side::Client, _) => (notes.client_port, Some(SERVER_PORT)),
    }
}
