//! What the model remembers about one connection: the full socket's TCP state and flags, the
//! TIME_WAIT minisocket that tcp_time_wait() may leave behind, or nothing at all once freed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `sk->sk_state` of a full socket, with the kernel's numeric values (include/net/tcp_states.h).
///
/// TIME_WAIT and NEW_SYN_RECV are listed because the kernel's enum has them, but a full socket is
/// never in either: TIME_WAIT lives in an `inet_timewait_sock` (see [`TimeWaitSock`]) and
/// NEW_SYN_RECV in a request socket. (TCP_BOUND_INACTIVE = 13, added in 6.5 for bound but
/// unconnected sockets, is outside teardown and deliberately absent.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(crate) enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
}

impl TcpState {
    /// Every state, in kernel order (1..=12).
    pub(crate) const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    /// The state for a kernel value (`TCP_ESTABLISHED` = 1 ... `TCP_NEW_SYN_RECV` = 12).
    pub(crate) fn from_kernel(value: u8) -> Option<TcpState> {
        match value {
            1..=12 => Some(TcpState::ALL[usize::from(value) - 1]),
            _ => None,
        }
    }

    /// The kernel's numeric value of this state.
    #[cfg(test)]
    pub(crate) fn as_kernel(self) -> u8 {
        match self {
            TcpState::Established => 1,
            TcpState::SynSent => 2,
            TcpState::SynRecv => 3,
            TcpState::FinWait1 => 4,
            TcpState::FinWait2 => 5,
            TcpState::TimeWait => 6,
            TcpState::Close => 7,
            TcpState::CloseWait => 8,
            TcpState::LastAck => 9,
            TcpState::Listen => 10,
            TcpState::Closing => 11,
            TcpState::NewSynRecv => 12,
        }
    }

    /// The kernel's name, as the sock:inet_sock_set_state tracepoint prints it without `TCP_`.
    pub(crate) fn kernel_name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// The states in which a segment is judged by sequence number against rcv_nxt
    /// (tcp_validate_incoming); SYN_SENT and LISTEN have their own input paths.
    pub(crate) fn is_synchronized(self) -> bool {
        matches!(
            self,
            TcpState::Established
                | TcpState::SynRecv
                | TcpState::FinWait1
                | TcpState::FinWait2
                | TcpState::CloseWait
                | TcpState::Closing
                | TcpState::LastAck
        )
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_name())
    }
}

/// Parses a kernel state name, case-insensitively, with `_` or `-`: "FIN_WAIT1", "fin-wait1".
impl FromStr for TcpState {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = normalize(s);
        TcpState::ALL
            .into_iter()
            .find(|state| normalize(state.kernel_name()) == wanted)
            .ok_or_else(|| ParseStateError {
                given: s.to_string(),
                valid: TcpState::ALL
                    .iter()
                    .map(|state| state.kernel_name().to_string())
                    .collect(),
                flags: Vec::new(),
            })
    }
}

/// `tw->tw_substate` of a TIME_WAIT minisocket: the TCP state it stands in for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(crate) enum TwSubstate {
    /// An orphaned FIN_WAIT2 whose full socket was traded for a minisocket
    /// (tcp_time_wait(sk, TCP_FIN_WAIT2, tmo)); the peer has not sent its FIN yet.
    FinWait2,
    /// Real TIME_WAIT: both FINs are exchanged and acknowledged.
    TimeWait,
}

impl TwSubstate {
    /// The kernel value stored in `tw_substate` (TCP_FIN_WAIT2 = 5, TCP_TIME_WAIT = 6).
    #[cfg(test)]
    pub(crate) fn as_kernel(self) -> u8 {
        self.as_tcp_state().as_kernel()
    }

    /// The TCP state this substate stands in for.
    pub(crate) fn as_tcp_state(self) -> TcpState {
        match self {
            TwSubstate::FinWait2 => TcpState::FinWait2,
            TwSubstate::TimeWait => TcpState::TimeWait,
        }
    }
}

impl fmt::Display for TwSubstate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_tcp_state().kernel_name())
    }
}

/// What the receive queue holds, measured the way __tcp_close() cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReceiveQueue {
    /// Nothing queued.
    Empty,
    /// Bytes after copied_seq: the application has not read them.
    Unread,
    /// Skbs are still queued but copied_seq is already past their payload. Kernels before the
    /// 6.18 fix count them as unread at close() (and reset); fixed kernels do not.
    OnlyReadData,
}

/// A full socket (`struct tcp_sock`): its state plus the flags that change teardown decisions.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sock {
    pub(crate) state: TcpState,
    /// SOCK_DEAD: close() ran sock_orphan(); no application holds the socket any more.
    pub(crate) orphan: bool,
    /// RCV_SHUTDOWN in sk_shutdown (shutdown(SHUT_RD), close(), or the peer's FIN).
    pub(crate) rcv_shutdown: bool,
    pub(crate) receive_queue: ReceiveQueue,
    /// snd_nxt != write_seq: written bytes wait in the write queue (peer window closed). A FIN
    /// queued now rides behind them instead of going out at once.
    pub(crate) unsent: bool,
}

impl Sock {
    /// A socket held by the application with empty queues.
    pub(crate) fn new(state: TcpState) -> Sock {
        Sock {
            state,
            orphan: false,
            rcv_shutdown: false,
            receive_queue: ReceiveQueue::Empty,
            unsent: false,
        }
    }

    /// The same socket after close() orphaned it (sock_orphan; sk_shutdown = SHUTDOWN_MASK).
    pub(crate) fn orphaned(mut self) -> Sock {
        self.orphan = true;
        self.rcv_shutdown = true;
        self
    }

    /// The full socket the application still holds after tcp_done() moved it to CLOSE.
    pub(crate) fn closed_by_tcp_done() -> Sock {
        Sock {
            rcv_shutdown: true,
            ..Sock::new(TcpState::Close)
        }
    }
}

/// An `inet_timewait_sock` left by tcp_time_wait(); its pointer differs from the full socket's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimeWaitSock {
    pub(crate) substate: TwSubstate,
    /// tcp_time_wait() ran tcp_done() on a socket the application had not closed (e.g. after
    /// shutdown(SHUT_WR)): the application still holds that full socket, now in CLOSE, and its
    /// close() will destroy it while the minisocket lives on.
    pub(crate) app_holds_closed_socket: bool,
}

/// Where the connection lives: a full socket, a TIME_WAIT minisocket, or nowhere.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum State {
    Socket(Sock),
    TimeWait(TimeWaitSock),
    /// Destroyed (inet_csk_destroy_sock) or, for a minisocket, killed; nothing is left.
    Freed,
}

impl State {
    /// A full socket in `state`, held by the application, queues empty.
    pub(crate) fn socket(state: TcpState) -> State {
        State::Socket(Sock::new(state))
    }

    /// The ESTABLISHED socket every teardown starts from.
    #[cfg(test)]
    pub(crate) fn established() -> State {
        State::socket(TcpState::Established)
    }

    /// A TIME_WAIT minisocket whose full socket is already gone.
    pub(crate) fn time_wait(substate: TwSubstate) -> State {
        State::TimeWait(TimeWaitSock {
            substate,
            app_holds_closed_socket: false,
        })
    }

    /// The full socket's TCP state, if there is a full socket.
    pub(crate) fn tcp_state(&self) -> Option<TcpState> {
        match self {
            State::Socket(sock) => Some(sock.state),
            State::TimeWait(_) | State::Freed => None,
        }
    }

    /// The TIME_WAIT minisocket's substate, if there is one.
    pub(crate) fn tw_substate(&self) -> Option<TwSubstate> {
        match self {
            State::TimeWait(tw) => Some(tw.substate),
            State::Socket(_) | State::Freed => None,
        }
    }

    /// Teardown is over: nothing left, or only a CLOSE socket the application still holds.
    #[cfg(test)]
    pub(crate) fn is_finished(&self) -> bool {
        match self {
            State::Freed => true,
            State::Socket(sock) => sock.state == TcpState::Close,
            State::TimeWait(_) => false,
        }
    }

    /// The starting states the transition table enumerates: every state a full socket can be in
    /// during teardown (with the flag combinations that change decisions), both minisocket
    /// substates, and freed. TIME_WAIT and NEW_SYN_RECV never belong to a full socket and are
    /// left out here (the model still answers for them: every input is "not applicable").
    pub(crate) fn table_states() -> Vec<State> {
        use TcpState::*;
        let held = [
            Established,
            SynSent,
            SynRecv,
            FinWait1,
            FinWait2,
            Close,
            CloseWait,
            LastAck,
            Listen,
            Closing,
        ];
        let mut states: Vec<State> = held.into_iter().map(State::socket).collect();
        states.insert(
            1,
            State::Socket(Sock {
                receive_queue: ReceiveQueue::Unread,
                ..Sock::new(Established)
            }),
        );
        for state in [FinWait1, FinWait2, Closing, LastAck] {
            states.push(State::Socket(Sock::new(state).orphaned()));
        }
        states.push(State::Socket(Sock {
            unsent: true,
            ..Sock::new(FinWait1).orphaned()
        }));
        states.push(State::time_wait(TwSubstate::FinWait2));
        states.push(State::time_wait(TwSubstate::TimeWait));
        states.push(State::TimeWait(TimeWaitSock {
            substate: TwSubstate::TimeWait,
            app_holds_closed_socket: true,
        }));
        states.push(State::Freed);
        states
    }
}

/// Compact and parseable: `FIN_WAIT1+orphan+unsent`, `TW:TIME_WAIT+app-socket`, `FREED`.
impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Socket(sock) => {
                write!(f, "{}", sock.state)?;
                if sock.orphan {
                    f.write_str("+orphan")?;
                } else if sock.rcv_shutdown {
                    f.write_str("+rcv-shutdown")?;
                }
                match sock.receive_queue {
                    ReceiveQueue::Empty => {}
                    ReceiveQueue::Unread => f.write_str("+unread")?,
                    ReceiveQueue::OnlyReadData => f.write_str("+read-queued")?,
                }
                if sock.unsent {
                    f.write_str("+unsent")?;
                }
                Ok(())
            }
            State::TimeWait(tw) => {
                write!(f, "TW:{}", tw.substate)?;
                if tw.app_holds_closed_socket {
                    f.write_str("+app-socket")?;
                }
                Ok(())
            }
            State::Freed => f.write_str("FREED"),
        }
    }
}

/// Starting-state names accepted by `State::from_str`, with one-line help.
pub(crate) const STATE_NAMES: &[(&str, &str)] = &[
    (
        "established",
        "ESTABLISHED full socket held by the application",
    ),
    ("syn-sent", "SYN_SENT: connect() in progress"),
    (
        "syn-recv",
        "SYN_RECV full socket (Fast Open child or simultaneous open)",
    ),
    ("fin-wait1", "FIN_WAIT1: our FIN sent, not yet ACKed"),
    (
        "fin-wait2",
        "FIN_WAIT2: our FIN ACKed, waiting for the peer's",
    ),
    (
        "close",
        "CLOSE: e.g. after a RST; the application still holds it",
    ),
    (
        "close-wait",
        "CLOSE_WAIT: the peer's FIN arrived, ours not sent",
    ),
    ("last-ack", "LAST_ACK: both FINs sent, ours not yet ACKed"),
    ("listen", "LISTEN: a listener"),
    (
        "closing",
        "CLOSING: simultaneous close, our FIN not yet ACKed",
    ),
    (
        "tw-fin-wait2",
        "TIME_WAIT minisocket in substate FIN_WAIT2 (alias: tw:fin_wait2)",
    ),
    (
        "tw-time-wait",
        "TIME_WAIT minisocket in substate TIME_WAIT (alias: time-wait)",
    ),
    ("freed", "nothing left (alias: destroyed)"),
];

impl State {
    /// One line per starting-state name and per flag: for `--help` and error messages.
    pub fn help_text() -> String {
        let width = STATE_NAMES
            .iter()
            .chain(STATE_FLAGS)
            .map(|(name, _)| name.len() + 1)
            .max()
            .unwrap_or(0);
        let mut text = String::from("states:\n");
        for (name, help) in STATE_NAMES {
            text.push_str(&format!("  {name:width$}  {help}\n"));
        }
        text.push_str("flags (append to a state, e.g. fin-wait1+orphan):\n");
        for (name, help) in STATE_FLAGS {
            text.push_str(&format!("  {:width$}  {help}\n", format!("+{name}")));
        }
        text
    }
}

/// Flags that may follow a starting-state name, `+`-separated.
pub(crate) const STATE_FLAGS: &[(&str, &str)] = &[
    (
        "orphan",
        "close() already ran: SOCK_DEAD (implies rcv-shutdown)",
    ),
    ("rcv-shutdown", "RCV_SHUTDOWN set (shutdown(SHUT_RD))"),
    ("unread", "the receive queue holds bytes not yet read"),
    (
        "read-queued",
        "the receive queue holds only already-read skbs",
    ),
    (
        "unsent",
        "written bytes wait unsent; a FIN would queue behind",
    ),
    (
        "app-socket",
        "(TIME_WAIT minisocket only) the application still holds its CLOSE socket",
    ),
];

/// Parses `name[+flag...]`, e.g. `fin-wait1+orphan`, `FIN_WAIT2`, `tw:time_wait+app-socket`.
impl FromStr for State {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = || ParseStateError {
            given: s.to_string(),
            valid: STATE_NAMES
                .iter()
                .map(|(name, _)| name.to_string())
                .collect(),
            flags: STATE_FLAGS
                .iter()
                .map(|(name, _)| name.to_string())
                .collect(),
        };
        let normalized = normalize(s);
        let mut parts = normalized.split('+');
        let base = parts.next().unwrap_or_default();
        let mut state = match base {
            "established" => State::socket(TcpState::Established),
            "syn-sent" => State::socket(TcpState::SynSent),
            "syn-recv" => State::socket(TcpState::SynRecv),
            "fin-wait1" => State::socket(TcpState::FinWait1),
            "fin-wait2" => State::socket(TcpState::FinWait2),
            "close" | "closed" => State::socket(TcpState::Close),
            "close-wait" => State::socket(TcpState::CloseWait),
            "last-ack" => State::socket(TcpState::LastAck),
            "listen" => State::socket(TcpState::Listen),
            "closing" => State::socket(TcpState::Closing),
            "tw-fin-wait2" => State::time_wait(TwSubstate::FinWait2),
            "tw-time-wait" | "time-wait" => State::time_wait(TwSubstate::TimeWait),
            "freed" | "destroyed" => State::Freed,
            _ => return Err(error()),
        };
        for flag in parts {
            match (&mut state, flag) {
                (State::Socket(sock), "orphan") => {
                    sock.orphan = true;
                    sock.rcv_shutdown = true;
                }
                (State::Socket(sock), "rcv-shutdown") => sock.rcv_shutdown = true,
                (State::Socket(sock), "unread") => sock.receive_queue = ReceiveQueue::Unread,
                (State::Socket(sock), "read-queued") => {
                    sock.receive_queue = ReceiveQueue::OnlyReadData
                }
                (State::Socket(sock), "unsent") => sock.unsent = true,
                (State::TimeWait(tw), "app-socket") => tw.app_holds_closed_socket = true,
                _ => return Err(error()),
            }
        }
        Ok(state)
    }
}

/// A state name that did not parse; Display lists the valid names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseStateError {
    pub(crate) given: String,
    pub(crate) valid: Vec<String>,
    pub(crate) flags: Vec<String>,
}

impl fmt::Display for ParseStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown state `{}`; valid states: {}",
            self.given,
            self.valid.join(", ")
        )?;
        if !self.flags.is_empty() {
            write!(f, "; optional +flags: {}", self.flags.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseStateError {}

/// Lowercase, with `_` and `:` read as `-`, so kernel names and CLI names compare equal.
pub(crate) fn normalize(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace(['_', ':'], "-")
}
