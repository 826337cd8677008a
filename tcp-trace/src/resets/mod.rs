//! Why was the connection reset? Every RST this host sends or receives on a traced flow gets a
//! cause, a confidence and the evidence behind it; timeout aborts, which put no RST on the wire,
//! are counted too. Over a run the causes are tallied against the kernel's own TcpExt counters.
//!
//! - [`classify`]: one reset (plus its flow's recent events, the close() details if seen, the
//!   kernel generation) -> a [`ResetDiagnosis`]. Pure.
//! - [`ResetTracker`]: the streaming side, fed every event by the report pipeline. It keeps a short
//!   history per connection and holds each reset back for a settle window (the events that decide
//!   it can come just after it: the RST of tcp_disconnect() follows its state change, the reply RST
//!   of the data-after-close abort follows the tcp_reset() it is easily mistaken for, and on
//!   loopback the peer's receipt can precede the sender's tracepoint).
//! - [`counters`]: /proc/net/netstat parsing, the TcpExt deltas of each traced network namespace
//!   and the cross-check of those deltas against what was traced.
//! - [`summary`]: the exit tables (process x cause x peer; counter check).
//!
//! # Confidence
//! [`Confidence::Certain`]: the kernel named the reason (`enum sk_rst_reason`, 6.10+ for replies,
//! 6.12+ for active resets) and it maps to one cause, or the event itself is unambiguous (an RST
//! received). [`Confidence::Derived`]: from the close() details (the `tcp_close` hook) or from
//! the model's rules applied to the flow's events. [`Confidence::Guess`]: from the flow's history
//! alone where several causes fit; the alternatives are in the evidence, and the counter check
//! counts a guess as "possibly" bumping its counter.
//!
//! # Causes and counters (kernel-teardown.md, "Counters"; checked against the model in tests)
//! | cause | RST | TcpExt counter |
//! |---|---|---|
//! | close-unread | active (TCP_ABORT_ON_CLOSE) | TCPAbortOnClose |
//! | linger-zero | active (TCP_STATE / TCP_DISCONNECT_WITH_DATA), or none from SYN_SENT/LAST_ACK/CLOSING | TCPAbortOnData |
//! | data-after-close | reply (TCP_ABORT_ON_DATA) | TCPAbortOnData |
//! | orphan-linger2 | active at close() (TCP_ABORT_ON_LINGER) | TCPAbortOnLinger |
//! | orphan-linger2 (FIN_WAIT1 got the ACK of its FIN) | reply (TCP_ABORT_ON_DATA) | TCPAbortOnData |
//! | memory-pressure | active (TCP_ABORT_ON_MEMORY) | TCPAbortOnMemory |
//! | keepalive-timeout | active (TCP_KEEPALIVE_TIMEOUT) | TCPAbortOnTimeout |
//! | timeout | none: the abort is silent | TCPAbortOnTimeout |
//! | fin-wait2-timeout, listener-closed, disconnect, killed | active (TCP_STATE) | none |
//! | no-socket, time-wait, invalid-segment | reply | none |
//! | peer-reset | received | none |

mod classify;
pub(crate) mod counters;
pub(crate) mod summary;
mod tracker;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::clock::time_of_day;
use crate::decode::Owner;

pub(crate) use tracker::{ResetTracker, TrackerConfig};

/// Which way the RST went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Direction {
    /// This host sent it.
    Sent,
    /// This host received it (the peer, or something on the path, reset the connection).
    Received,
    /// No RST at all: the kernel aborted the connection without telling the peer (a timeout).
    /// Listed because it bumps a TcpExt abort counter and fails the application's next call.
    Silent,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
            Direction::Silent => "silent",
        })
    }
}

/// How sure the classification is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Confidence {
    /// The kernel's reset reason (or the event itself) says so.
    Certain,
    /// Derived from the close() details or from the model's rules applied to the flow's events.
    Derived,
    /// From the flow's history only; other causes fit too (the evidence names them).
    Guess,
}

impl fmt::Display for Confidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Confidence::Certain => "certain",
            Confidence::Derived => "derived",
            Confidence::Guess => "guess",
        })
    }
}

/// Why a connection was reset (or silently aborted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ResetCause {
    /// close() with data the application never read: RST instead of FIN (RFC 2525 2.17).
    CloseUnread,
    /// close() with SO_LINGER {on, 0}: an abortive close through tcp_disconnect().
    LingerZero,
    /// close() aborted the connection, by unread data or SO_LINGER 0: this kernel and these
    /// hooks cannot tell which.
    CloseAbort,
    /// Data arrived at a socket already closed (or shut down for reading) in FIN_WAIT1/2.
    DataAfterClose,
    /// An orphan reached FIN_WAIT2 with TCP_LINGER2 < 0: reset instead of waiting for the FIN.
    OrphanLinger2,
    /// An orphan full socket's FIN_WAIT2 timer (the keepalive timer) ran out.
    FinWait2Timeout,
    /// tcp_check_oom() / tcp_out_of_resources(): too many orphans or tcp_mem pressure.
    MemoryPressure,
    /// Keepalive probes unanswered (or TCP_USER_TIMEOUT passed while probing).
    KeepaliveTimeout,
    /// Retransmissions, zero-window probes or TCP_USER_TIMEOUT ran out (tcp_write_err()): no
    /// RST is sent.
    Timeout,
    /// An un-accepted child reset because its listener was closed (inet_csk_listen_stop()).
    ListenerClosed,
    /// tcp_disconnect() outside close(): connect(AF_UNSPEC) on a connected socket.
    Disconnect,
    /// tcp_abort(): the socket was destroyed from outside (`ss -K`, SOCK_DESTROY, BPF).
    Killed,
    /// A reply to a segment for which no socket exists.
    NoSocket,
    /// A reply from a TIME_WAIT minisocket to a segment it does not accept.
    TimeWait,
    /// A reply to a segment the socket does not accept (bad ACK, bad flags, PAWS, ...).
    InvalidSegment,
    /// The peer (or a middlebox) reset the connection.
    PeerReset,
    /// No rule fits.
    Unknown,
}

impl ResetCause {
    /// The kebab-case name (as in JSON).
    pub(crate) fn name(self) -> &'static str {
        match self {
            ResetCause::CloseUnread => "close-unread",
            ResetCause::LingerZero => "linger-zero",
            ResetCause::CloseAbort => "close-abort",
            ResetCause::DataAfterClose => "data-after-close",
            ResetCause::OrphanLinger2 => "orphan-linger2",
            ResetCause::FinWait2Timeout => "fin-wait2-timeout",
            ResetCause::MemoryPressure => "memory-pressure",
            ResetCause::KeepaliveTimeout => "keepalive-timeout",
            ResetCause::Timeout => "timeout",
            ResetCause::ListenerClosed => "listener-closed",
            ResetCause::Disconnect => "disconnect",
            ResetCause::Killed => "killed",
            ResetCause::NoSocket => "no-socket",
            ResetCause::TimeWait => "time-wait",
            ResetCause::InvalidSegment => "invalid-segment",
            ResetCause::PeerReset => "peer-reset",
            ResetCause::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ResetCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A task: the one that called close(), or killed the socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Task {
    pub(crate) pid: u32,
    pub(crate) tid: u32,
    pub(crate) comm: crate::decode::Comm,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pid == self.tid {
            write!(f, "{}/{}", self.pid, self.comm)
        } else {
            write!(f, "{}/{} (thread {})", self.pid, self.comm, self.tid)
        }
    }
}

/// One reset (or silent abort), explained. The JSON of `{"type":"reset", ...}` lines.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct ResetDiagnosis {
    /// CLOCK_MONOTONIC ns of the RST event (of the state change, for a silent abort).
    pub(crate) ts_ns: u64,
    pub(crate) direction: Direction,
    pub(crate) cause: ResetCause,
    pub(crate) confidence: Confidence,
    /// What the classification rests on, in words.
    pub(crate) evidence: String,
    /// Bytes the application never read (from the tcp_close hook), for close-unread.
    pub(crate) unread_bytes: Option<u32>,
    /// Bytes written but not sent, and sent but not acknowledged, at close() (tcp_close hook):
    /// what an abortive close throws away.
    pub(crate) unsent_bytes: Option<u32>,
    pub(crate) unacked_bytes: Option<u32>,
    /// For close-unread: the oldest unread byte waited at most this long (the connection's age
    /// at the reset; the hooks do not time individual segments).
    pub(crate) unread_wait_max_ns: Option<u64>,
    /// The process that owns the socket.
    pub(crate) owner: Option<Owner>,
    /// The task that called close() (or killed the socket), when the reset came from that call.
    pub(crate) closer: Option<Task>,
    pub(crate) local: SocketAddr,
    pub(crate) peer: SocketAddr,
    /// Network namespace inode (for a reply built from a segment alone, the namespace of the
    /// connection it belongs to when the trace knows it, else 0).
    pub(crate) netns: u32,
    /// The TcpExt counter this reset bumps, per the model (none for replies and received RSTs).
    pub(crate) counter: Option<&'static str>,
    /// A guess between causes with different counters: each counter it may have bumped (one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) possible_counters: Vec<&'static str>,
    /// The kernel's `sk_rst_reason`, when it gave a specific one.
    pub(crate) kernel_reason: Option<String>,
    /// Kernel address of the socket the event came from.
    pub(crate) sk: crate::decode::SockPtr,
    /// For a received RST whose sender is traced on this host too: the sender's cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) peer_cause: Option<ResetCause>,
    /// The user call stack of the close() that sent this reset (with `--stacks`), innermost
    /// first; `close_site` is its first frame in the program itself (past libc and std).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub(crate) close_stack: Vec<crate::stacks::Frame>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) close_site: Option<String>,
}

impl ResetDiagnosis {
    /// What the owner of the socket could do about it, for causes the application controls.
    pub(crate) fn advice(&self) -> Option<String> {
        match self.cause {
            ResetCause::CloseUnread | ResetCause::CloseAbort => {
                let what = match self.unread_bytes {
                    Some(n) if n > 0 => format!("{n} unread bytes"),
                    _ => "unread data".to_string(),
                };
                let mut s = format!(
                    "close() with {what} makes the kernel send RST instead of FIN, and the peer \
                     gets ECONNRESET (and may lose the last data it had not read yet). Read what \
                     the peer sent before closing: drain to EAGAIN, or for a graceful end \
                     shutdown(SHUT_WR), read to EOF (with a timeout), then close()."
                );
                if self.cause == ResetCause::CloseAbort {
                    s.push_str(
                        " If the program sets SO_LINGER {on, 0}, the abort is deliberate (see \
                         linger-zero).",
                    );
                }
                Some(s)
            }
            ResetCause::LingerZero => {
                let mut s = "SO_LINGER {on, 0} asks for an abortive close: RST instead of FIN, no \
                             TIME_WAIT, and whatever is still queued is thrown away."
                    .to_string();
                match (self.unsent_bytes, self.unacked_bytes) {
                    (Some(0), Some(0)) => s.push_str(
                        " Nothing was in flight, so it only skipped the FIN handshake and \
                         TIME_WAIT: this looks intended (programs do it to avoid TIME_WAIT or to \
                         drop misbehaving peers).",
                    ),
                    (Some(unsent), Some(unacked)) => s.push_str(&format!(
                        " {unsent} bytes were unsent and {unacked} unacknowledged at close(): \
                         the peer never gets them, which is rarely intended. For a graceful \
                         close remove the SO_LINGER 0 setting (or use a positive linger time)."
                    )),
                    _ => s.push_str(
                        " Deliberate in programs that avoid TIME_WAIT or drop misbehaving peers; \
                         a bug if a graceful close was meant (then remove the SO_LINGER 0 \
                         setting, or use a positive linger time). The tcp_close hook, where it \
                         attaches, shows whether data was still in flight.",
                    ),
                }
                Some(s)
            }
            ResetCause::DataAfterClose => Some(
                "The peer kept sending after this side closed (or shut down reading), so the \
                 kernel aborted. Agree on the end of the exchange: the closing side should \
                 shutdown(SHUT_WR) and read to EOF before close()."
                    .to_string(),
            ),
            ResetCause::OrphanLinger2 => Some(
                "TCP_LINGER2 < 0 makes an orphan in FIN_WAIT2 reset at once rather than wait for \
                 the peer's FIN; set it >= 0 if the peer should see a clean close."
                    .to_string(),
            ),
            _ => None,
        }
    }

    /// `pid/comm` of the owner, or `?`.
    pub(crate) fn owner_label(&self) -> String {
        match &self.owner {
            Some(o) => format!("{}/{}", o.pid, o.comm),
            None => "?".to_string(),
        }
    }

    /// Counters a run's tally should attribute to this diagnosis: `(exact, possible)`. A
    /// certain or derived diagnosis bumps its counter; a guess only possibly does.
    pub(crate) fn tally_counters(&self) -> (Option<&'static str>, Vec<&'static str>) {
        match (self.confidence, self.counter) {
            (Confidence::Guess, Some(c)) => (None, vec![c]),
            (_, Some(c)) => (Some(c), Vec::new()),
            (_, None) => (None, self.possible_counters.clone()),
        }
    }
}

/// One human line: `time  owner  local > remote  sent|received|silent  cause (confidence)
/// evidence`.
pub(crate) fn reset_line(d: &ResetDiagnosis, unix_ns: u64) -> String {
    let site = d
        .close_site
        .as_ref()
        .map(|s| format!("; close() at {s}"))
        .unwrap_or_default();
    format!(
        "{}  {:<22} {:<47} {:<10} {} ({}) {}{site}",
        time_of_day(unix_ns),
        d.owner_label(),
        format!("{} > {}", d.local, d.peer),
        d.direction,
        d.cause,
        d.confidence,
        d.evidence
    )
}

/// A duration for evidence text: `850 us`, `12.3 ms`, `4.20 s`.
pub(crate) fn human_duration(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{} us", ns / 1000)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", ns as f64 / 1e9)
    }
}
