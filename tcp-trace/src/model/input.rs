//! What can happen to a connection: the application's calls, the peer's segments, and timers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::state::{ReceiveQueue, TwSubstate, normalize};

/// One event. Names (FromStr/Display/serde) are kebab-case: `close-linger0`, `tw-syn`...
///
/// Segment inputs (`fin`, `rst-exact`, ...) name what the peer sends; the model routes them to
/// the full socket or, once there is one, to the TIME_WAIT minisocket. The `tw-*` inputs name a
/// segment as the minisocket sees it and apply only there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Input {
    // The application.
    Close,
    CloseUnread,
    CloseReadQueued,
    CloseLinger0,
    CloseLinger,
    CloseRepair,
    MemoryPressure,
    ListenerCloseWithChildren,
    Disconnect,
    ShutdownRd,
    ShutdownWr,
    ShutdownRdwr,
    Read,
    Write,
    // The peer's segments.
    Fin,
    FinAck,
    AckOfFin,
    AckOfData,
    RstExact,
    RstInWindow,
    RstOutOfWindow,
    DataAfterClose,
    FinWithoutAck,
    DataAckingFin,
    DataOutOfWindow,
    ChildLostRace,
    // Segments as a TIME_WAIT minisocket sees them.
    TwSyn,
    TwSynOld,
    TwAck,
    TwFinRetransmit,
    TwRst,
    TwData,
    TwFin,
    TwOldDuplicate,
    // Timers.
    FinWait2Timeout,
    TwExpire,
    OrphanRetriesExhausted,
    OrphanOutOfResources,
    ConnectionTimeout,
}

/// Who causes an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum InputSource {
    Application,
    Peer,
    PeerToTimeWait,
    Timer,
}

impl fmt::Display for InputSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputSource::Application => "application",
            InputSource::Peer => "peer segment",
            InputSource::PeerToTimeWait => "peer segment at a TIME_WAIT minisocket",
            InputSource::Timer => "timer",
        })
    }
}

/// An input's name, aliases and one-line help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct InputInfo {
    pub(crate) input: Input,
    pub(crate) name: &'static str,
    pub(crate) aliases: &'static [&'static str],
    pub(crate) source: InputSource,
    pub(crate) help: &'static str,
}

const fn info(
    input: Input,
    name: &'static str,
    aliases: &'static [&'static str],
    source: InputSource,
    help: &'static str,
) -> InputInfo {
    InputInfo {
        input,
        name,
        aliases,
        source,
        help,
    }
}

/// Every input, in declaration order (`INPUTS[i].input as usize == i`).
pub(crate) const INPUTS: &[InputInfo] = {
    use Input::*;
    use InputSource::*;
    &[
        info(Close, "close", &[], Application, "close(), no SO_LINGER"),
        info(
            CloseUnread,
            "close-unread",
            &[],
            Application,
            "close() with unread bytes in the receive queue",
        ),
        info(
            CloseReadQueued,
            "close-read-queued",
            &[],
            Application,
            "close() while the receive queue holds only already-read skbs (resets before the 6.18 fix)",
        ),
        info(
            CloseLinger0,
            "close-linger0",
            &[],
            Application,
            "close() with SO_LINGER on and l_linger = 0 (abortive close)",
        ),
        info(
            CloseLinger,
            "close-linger",
            &[],
            Application,
            "close() with SO_LINGER on and a positive l_linger (may block)",
        ),
        info(
            CloseRepair,
            "close-repair",
            &[],
            Application,
            "close() of a socket in TCP_REPAIR mode",
        ),
        info(
            MemoryPressure,
            "memory-pressure",
            &["close-oom"],
            Application,
            "close() while tcp_check_oom() sees too many orphans or memory pressure",
        ),
        info(
            ListenerCloseWithChildren,
            "listener-close-with-children",
            &[],
            Application,
            "close() of a listener with un-accepted children in its accept queue",
        ),
        info(
            Disconnect,
            "disconnect",
            &["connect-af-unspec"],
            Application,
            "connect() with AF_UNSPEC: tcp_disconnect() on a socket the application keeps (it stays in CLOSE and may connect() again)",
        ),
        info(
            ShutdownRd,
            "shutdown-rd",
            &[],
            Application,
            "shutdown(SHUT_RD)",
        ),
        info(
            ShutdownWr,
            "shutdown-wr",
            &[],
            Application,
            "shutdown(SHUT_WR)",
        ),
        info(
            ShutdownRdwr,
            "shutdown-rdwr",
            &[],
            Application,
            "shutdown(SHUT_RDWR)",
        ),
        info(
            Read,
            "read",
            &[],
            Application,
            "the application reads everything queued",
        ),
        info(
            Write,
            "write",
            &[],
            Application,
            "the application writes bytes the peer's window holds back (they stay unsent)",
        ),
        info(
            Fin,
            "fin",
            &[],
            Peer,
            "the peer's FIN, in order (a retransmission if its FIN already arrived)",
        ),
        info(
            FinAck,
            "fin-ack",
            &[],
            Peer,
            "the peer's FIN in a segment that also ACKs our FIN",
        ),
        info(
            AckOfFin,
            "ack-of-fin",
            &["ack"],
            Peer,
            "the peer ACKs our FIN",
        ),
        info(
            AckOfData,
            "ack-of-data",
            &[],
            Peer,
            "the peer ACKs our data and opens its window: unsent bytes (and a FIN behind them) go out",
        ),
        info(
            RstExact,
            "rst-exact",
            &["rst"],
            Peer,
            "RST with seq exactly rcv_nxt",
        ),
        info(
            RstInWindow,
            "rst-in-window",
            &[],
            Peer,
            "RST inside the receive window but not at rcv_nxt",
        ),
        info(
            RstOutOfWindow,
            "rst-out-of-window",
            &[],
            Peer,
            "RST outside the receive window",
        ),
        info(
            DataAfterClose,
            "data-after-close",
            &["data"],
            Peer,
            "new in-window data beyond rcv_nxt (after close(): the orphan RCV_SHUTDOWN abort)",
        ),
        info(
            FinWithoutAck,
            "fin-without-ack",
            &["fin-no-ack"],
            Peer,
            "a segment with FIN but without the ACK flag (dropped before anything else looks at it)",
        ),
        info(
            DataAckingFin,
            "data-acking-fin",
            &["data-with-ack-of-fin"],
            Peer,
            "new data in the segment that ACKs our FIN (the peer wrote before it read our FIN: an orphan FIN_WAIT1 resets)",
        ),
        info(
            DataOutOfWindow,
            "data-out-of-window",
            &["oow-data"],
            Peer,
            "data beyond rcv_nxt + the receive window: a duplicate ACK, and dropped (even by an orphan, which resets on in-window data)",
        ),
        info(
            ChildLostRace,
            "child-lost-race",
            &["twin-child"],
            Peer,
            "a listener's new child loses the race to take its request (the handshake completed on two CPUs at once, e.g. a retransmitted ACK): tcp_v4_syn_recv_sock() destroys it, nothing sent",
        ),
        info(
            TwSyn,
            "tw-syn",
            &[],
            PeerToTimeWait,
            "SYN (no ACK) with seq after rcv_nxt: a new incarnation",
        ),
        info(
            TwSynOld,
            "tw-syn-old",
            &["tw-syn-unacceptable"],
            PeerToTimeWait,
            "SYN (no ACK) with seq at or before rcv_nxt and no newer timestamp: not a new incarnation, answered with a rate-limited ACK",
        ),
        info(TwAck, "tw-ack", &[], PeerToTimeWait, "bare ACK at rcv_nxt"),
        info(
            TwFinRetransmit,
            "tw-fin-retransmit",
            &[],
            PeerToTimeWait,
            "retransmitted FIN (seq = rcv_nxt - 1)",
        ),
        info(
            TwRst,
            "tw-rst",
            &[],
            PeerToTimeWait,
            "RST with seq exactly rcv_nxt",
        ),
        info(
            TwData,
            "tw-data",
            &[],
            PeerToTimeWait,
            "new data at rcv_nxt",
        ),
        info(
            TwFin,
            "tw-fin",
            &[],
            PeerToTimeWait,
            "FIN at rcv_nxt (in substate FIN_WAIT2: the peer's first FIN)",
        ),
        info(
            TwOldDuplicate,
            "tw-old-duplicate",
            &[],
            PeerToTimeWait,
            "an old duplicate: an ACK segment whose data ends at or before rcv_nxt (seq before rcv_nxt, outside the window)",
        ),
        info(
            FinWait2Timeout,
            "fin-wait2-timeout",
            &[],
            Timer,
            "FIN_WAIT2 timer of an orphan (the keepalive timer of a full socket, or a FIN_WAIT2 minisocket's timer)",
        ),
        info(
            TwExpire,
            "tw-expire",
            &[],
            Timer,
            "a TIME_WAIT minisocket's timer expires",
        ),
        info(
            OrphanRetriesExhausted,
            "orphan-retries-exhausted",
            &["retries-exhausted"],
            Timer,
            "an orphan's retransmissions (or zero-window probes) run out (tcp_orphan_retries)",
        ),
        info(
            OrphanOutOfResources,
            "orphan-out-of-resources",
            &["timer-oom"],
            Timer,
            "an orphan's retransmission (or zero-window probe) timer finds too many orphans or TCP memory pressure (tcp_check_oom)",
        ),
        info(
            ConnectionTimeout,
            "connection-timeout",
            &[
                "user-timeout",
                "retries2-exhausted",
                "syn-retries-exhausted",
                "keepalive-timeout",
            ],
            Timer,
            "a socket the application holds times out: retransmissions (tcp_retries2, tcp_syn_retries), TCP_USER_TIMEOUT, keepalive or zero-window probes run out",
        ),
    ]
};

impl Input {
    /// Every input, in declaration order.
    pub(crate) fn all() -> impl Iterator<Item = Input> {
        INPUTS.iter().map(|info| info.input)
    }

    /// Name, aliases and help.
    pub(crate) fn info(self) -> &'static InputInfo {
        &INPUTS[self as usize]
    }

    /// The canonical kebab-case name.
    pub(crate) fn name(self) -> &'static str {
        self.info().name
    }

    /// One line per input, `name  help`, grouped by source: for `--help` and error messages.
    pub fn help_text() -> String {
        let width = INPUTS.iter().map(|i| i.name.len()).max().unwrap_or(0);
        let mut text = String::new();
        let mut source = None;
        for info in INPUTS {
            if source != Some(info.source) {
                source = Some(info.source);
                text.push_str(&format!("{}:\n", info.source));
            }
            text.push_str(&format!("  {:width$}  {}", info.name, info.help));
            if !info.aliases.is_empty() {
                text.push_str(&format!(" (alias: {})", info.aliases.join(", ")));
            }
            text.push('\n');
        }
        text
    }

    /// How the model acts on this input.
    pub(crate) fn action(self) -> Action {
        use Input::*;
        let close = |f: fn(&mut CloseCall)| {
            let mut call = CloseCall::PLAIN;
            f(&mut call);
            Action::Close(call)
        };
        match self {
            Close => Action::Close(CloseCall::PLAIN),
            CloseUnread => close(|c| c.receive_queue = Some(ReceiveQueue::Unread)),
            CloseReadQueued => close(|c| c.receive_queue = Some(ReceiveQueue::OnlyReadData)),
            CloseLinger0 => close(|c| c.linger = Linger::Zero),
            CloseLinger => close(|c| c.linger = Linger::Positive),
            CloseRepair => close(|c| c.repair = true),
            MemoryPressure => close(|c| c.oom = true),
            ListenerCloseWithChildren => close(|c| c.listener_children = true),
            Disconnect => Action::Disconnect,
            ShutdownRd => Action::Shutdown(Shutdown::Rd),
            ShutdownWr => Action::Shutdown(Shutdown::Wr),
            ShutdownRdwr => Action::Shutdown(Shutdown::RdWr),
            Read => Action::Read,
            Write => Action::Write,
            Fin => Action::Segment(Segment::Fin),
            FinAck => Action::Segment(Segment::FinAck),
            AckOfFin => Action::Segment(Segment::AckOfFin),
            AckOfData => Action::Segment(Segment::AckOfData),
            RstExact => Action::Segment(Segment::Rst(RstSeq::Exact)),
            RstInWindow => Action::Segment(Segment::Rst(RstSeq::InWindow)),
            RstOutOfWindow => Action::Segment(Segment::Rst(RstSeq::OutOfWindow)),
            DataAfterClose => Action::Segment(Segment::Data),
            FinWithoutAck => Action::Segment(Segment::FinNoAck),
            DataAckingFin => Action::Segment(Segment::DataAckingFin),
            DataOutOfWindow => Action::Segment(Segment::DataOutOfWindow),
            ChildLostRace => Action::ChildLostRace,
            TwSyn => Action::TimeWaitSegment(TwSegment::Syn),
            TwSynOld => Action::TimeWaitSegment(TwSegment::OldSyn),
            TwAck => Action::TimeWaitSegment(TwSegment::BareAck),
            TwFinRetransmit => Action::TimeWaitSegment(TwSegment::OldFin),
            TwRst => Action::TimeWaitSegment(TwSegment::Rst(RstSeq::Exact)),
            TwData => Action::TimeWaitSegment(TwSegment::NewData),
            TwFin => Action::TimeWaitSegment(TwSegment::NewFin),
            TwOldDuplicate => Action::TimeWaitSegment(TwSegment::OldDuplicate),
            FinWait2Timeout => Action::FinWait2Timeout,
            TwExpire => Action::TwExpire,
            OrphanRetriesExhausted => Action::OrphanRetriesExhausted,
            OrphanOutOfResources => Action::OrphanOutOfResources,
            ConnectionTimeout => Action::ConnectionTimeout,
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Accepts the canonical names and aliases, case-insensitively, `_` for `-`.
impl FromStr for Input {
    type Err = ParseInputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = normalize(s);
        INPUTS
            .iter()
            .find(|info| info.name == wanted || info.aliases.contains(&wanted.as_str()))
            .map(|info| info.input)
            .ok_or_else(|| ParseInputError {
                given: s.to_string(),
                valid: INPUTS.iter().map(|info| info.name).collect(),
            })
    }
}

/// An input name that did not parse; Display lists the valid names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseInputError {
    pub(crate) given: String,
    pub(crate) valid: Vec<&'static str>,
}

impl fmt::Display for ParseInputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown input `{}`; valid inputs: {}",
            self.given,
            self.valid.join(", ")
        )
    }
}

impl std::error::Error for ParseInputError {}

/// Parses a comma- (or space-) separated list such as `close,ack-of-fin,fin,tw-expire`.
pub fn parse_inputs(list: &str) -> Result<Vec<Input>, ParseInputError> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|name| !name.is_empty())
        .map(str::parse)
        .collect()
}

/// The SO_LINGER setting close() sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Linger {
    Off,
    /// SO_LINGER on, l_linger = 0.
    Zero,
    /// SO_LINGER on, l_linger > 0.
    Positive,
}

/// How close() was called, and what __tcp_close() finds besides the socket's own flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloseCall {
    pub(crate) linger: Linger,
    /// What the receive queue holds at close(), when the input says so; else the socket's own.
    pub(crate) receive_queue: Option<ReceiveQueue>,
    pub(crate) repair: bool,
    /// tcp_check_oom() reports pressure at adjudge_to_death.
    pub(crate) oom: bool,
    /// The listener's accept queue holds un-accepted children.
    pub(crate) listener_children: bool,
}

impl CloseCall {
    pub(crate) const PLAIN: CloseCall = CloseCall {
        linger: Linger::Off,
        receive_queue: None,
        repair: false,
        oom: false,
        listener_children: false,
    };
}

/// Which directions shutdown() closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shutdown {
    Rd,
    Wr,
    RdWr,
}

impl Shutdown {
    pub(crate) fn receive(self) -> bool {
        matches!(self, Shutdown::Rd | Shutdown::RdWr)
    }

    pub(crate) fn send(self) -> bool {
        matches!(self, Shutdown::Wr | Shutdown::RdWr)
    }
}

/// Where a RST's sequence number falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RstSeq {
    /// seq == rcv_nxt.
    Exact,
    /// Inside [rcv_nxt, rcv_nxt + rcv_wnd) but not rcv_nxt.
    InWindow,
    OutOfWindow,
}

/// A peer segment, as the full socket's input path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Segment {
    Fin,
    FinAck,
    AckOfFin,
    AckOfData,
    Data,
    Rst(RstSeq),
    /// FIN set, ACK clear (and no SYN/RST), at rcv_nxt.
    FinNoAck,
    /// New data beyond rcv_nxt in the segment that ACKs our FIN.
    DataAckingFin,
    /// Data (ACK set) starting beyond rcv_nxt + the receive window.
    DataOutOfWindow,
}

impl Segment {
    pub(crate) fn is_rst(self) -> bool {
        matches!(self, Segment::Rst(_))
    }

    /// The same segment at a TIME_WAIT minisocket. The peer's FIN is its first one in substate
    /// FIN_WAIT2 and a retransmission in TIME_WAIT (the FIN that got us there came first); ACKs
    /// of our FIN or data are bare ACKs by then.
    pub(crate) fn at_time_wait(self, substate: TwSubstate) -> TwSegment {
        match (self, substate) {
            (Segment::Fin | Segment::FinAck, TwSubstate::FinWait2) => TwSegment::NewFin,
            (Segment::Fin | Segment::FinAck, TwSubstate::TimeWait) => TwSegment::OldFin,
            (Segment::AckOfFin | Segment::AckOfData, _) => TwSegment::BareAck,
            (Segment::Data | Segment::DataAckingFin, _) => TwSegment::NewData,
            (Segment::Rst(seq), _) => TwSegment::Rst(seq),
            (Segment::FinNoAck, _) => TwSegment::FinNoAck,
            (Segment::DataOutOfWindow, _) => TwSegment::OutOfWindow,
        }
    }
}

/// A peer segment, as tcp_timewait_state_process() sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TwSegment {
    /// SYN without ACK/RST, seq after rcv_nxt.
    Syn,
    /// SYN without ACK/RST, seq at or before rcv_nxt (and no newer timestamp): RFC 1122's test
    /// for a new incarnation fails.
    OldSyn,
    /// Zero-length ACK at rcv_nxt.
    BareAck,
    /// A FIN ending at rcv_nxt (seq = rcv_nxt - 1): a retransmission of one already received.
    OldFin,
    /// A FIN at rcv_nxt (end_seq = rcv_nxt + 1).
    NewFin,
    /// Payload at rcv_nxt.
    NewData,
    /// An ACK segment ending at or before rcv_nxt: an old duplicate, outside the window.
    OldDuplicate,
    /// An ACK segment starting beyond rcv_nxt + the window: outside it the other way.
    OutOfWindow,
    /// A FIN without the ACK flag at rcv_nxt.
    FinNoAck,
    Rst(RstSeq),
}

impl TwSegment {
    pub(crate) fn is_rst(self) -> bool {
        matches!(self, TwSegment::Rst(_))
    }
}

/// What an input asks the model to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Close(CloseCall),
    Disconnect,
    Shutdown(Shutdown),
    Read,
    Write,
    Segment(Segment),
    TimeWaitSegment(TwSegment),
    ChildLostRace,
    FinWait2Timeout,
    TwExpire,
    OrphanRetriesExhausted,
    OrphanOutOfResources,
    ConnectionTimeout,
}
