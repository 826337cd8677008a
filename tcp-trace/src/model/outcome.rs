//! What one step decides: the next state and everything observable on the way (packets, reset
//! reasons, TIME_WAIT status, counters, errors, tcp_time_wait() calls, timers).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::input::Input;
use super::state::{State, TcpState, TwSubstate};

/// A packet the step puts on the wire (or queues for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Wire {
    /// tcp_send_fin() built a new FIN skb and pushed it at once (TCP_NAGLE_OFF): nothing was
    /// queued ahead of it.
    FinSent,
    /// tcp_send_fin() set FIN on the unsent tail skb: it leaves with the last data segment,
    /// whenever the peer's window lets that go.
    FinQueued,
    /// An ACK sent now (tcp_send_ack, a dup-ACK, or a TIME_WAIT ACK).
    AckImmediate,
    /// An ACK scheduled (inet_csk_schedule_ack): may be delayed or piggybacked.
    AckDelayed,
    /// RFC 5961 challenge ACK (tcp_send_challenge_ack; rate-limited).
    ChallengeAck,
    /// tcp_send_active_reset(): a RST built from the socket.
    RstActive,
    /// tcp_v4_send_reset(): a RST in reply to the incoming segment.
    RstReply,
    /// inet_csk_listen_stop(): a RST from every un-accepted child that tcp_disconnect() resets.
    RstToChildren,
}

impl Wire {
    #[cfg(test)]
    pub(crate) fn is_fin(self) -> bool {
        matches!(self, Wire::FinSent | Wire::FinQueued)
    }

    #[cfg(test)]
    pub(crate) fn is_rst(self) -> bool {
        matches!(self, Wire::RstActive | Wire::RstReply | Wire::RstToChildren)
    }
}

impl fmt::Display for Wire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wire::FinSent => "FIN",
            Wire::FinQueued => "FIN queued behind data",
            Wire::AckImmediate => "ACK",
            Wire::AckDelayed => "ACK (delayed)",
            Wire::ChallengeAck => "challenge ACK",
            Wire::RstActive => "RST (active)",
            Wire::RstReply => "RST (reply)",
            Wire::RstToChildren => "RST from each child",
        })
    }
}

/// `enum sk_rst_reason`, by kernel name (values shift between releases: decode by name). The
/// names of 6.10 to 6.18 and the reply-reset reasons mirrored from `enum skb_drop_reason`; a
/// kernel's name missing here decodes as `KReason::Unknown` with its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RstReason {
    #[serde(rename = "NOT_SPECIFIED")]
    NotSpecified,
    #[serde(rename = "NO_SOCKET")]
    NoSocket,
    #[serde(rename = "TCP_INVALID_ACK_SEQUENCE")]
    TcpInvalidAckSequence,
    #[serde(rename = "TCP_RFC7323_PAWS")]
    TcpRfc7323Paws,
    #[serde(rename = "TCP_RFC7323_TW_PAWS")]
    TcpRfc7323TwPaws,
    #[serde(rename = "TCP_TOO_OLD_ACK")]
    TcpTooOldAck,
    #[serde(rename = "TCP_ACK_UNSENT_DATA")]
    TcpAckUnsentData,
    #[serde(rename = "TCP_FLAGS")]
    TcpFlags,
    #[serde(rename = "TCP_OLD_ACK")]
    TcpOldAck,
    #[serde(rename = "TCP_ABORT_ON_DATA")]
    TcpAbortOnData,
    #[serde(rename = "TCP_TIMEWAIT_SOCKET")]
    TcpTimewaitSocket,
    #[serde(rename = "INVALID_SYN")]
    InvalidSyn,
    #[serde(rename = "TCP_INVALID_SYN")]
    TcpInvalidSyn,
    #[serde(rename = "TCP_INVALID_SEQUENCE")]
    TcpInvalidSequence,
    #[serde(rename = "TCP_ABORT_ON_CLOSE")]
    TcpAbortOnClose,
    #[serde(rename = "TCP_ABORT_ON_LINGER")]
    TcpAbortOnLinger,
    #[serde(rename = "TCP_ABORT_ON_MEMORY")]
    TcpAbortOnMemory,
    #[serde(rename = "TCP_STATE")]
    TcpState,
    #[serde(rename = "TCP_KEEPALIVE_TIMEOUT")]
    TcpKeepaliveTimeout,
    #[serde(rename = "TCP_DISCONNECT_WITH_DATA")]
    TcpDisconnectWithData,
    #[serde(rename = "MPTCP_RST_EUNSPEC")]
    MptcpRstEunspec,
    #[serde(rename = "MPTCP_RST_EMPTCP")]
    MptcpRstEmptcp,
    #[serde(rename = "MPTCP_RST_ERESOURCE")]
    MptcpRstEresource,
    #[serde(rename = "MPTCP_RST_EPROHIBIT")]
    MptcpRstEprohibit,
    #[serde(rename = "MPTCP_RST_EWQ2BIG")]
    MptcpRstEwq2big,
    #[serde(rename = "MPTCP_RST_EBADPERF")]
    MptcpRstEbadperf,
    #[serde(rename = "MPTCP_RST_EMIDDLEBOX")]
    MptcpRstEmiddlebox,
    #[serde(rename = "ERROR")]
    Error,
}

impl RstReason {
    pub(crate) const ALL: [RstReason; 28] = [
        RstReason::NotSpecified,
        RstReason::NoSocket,
        RstReason::TcpInvalidAckSequence,
        RstReason::TcpRfc7323Paws,
        RstReason::TcpRfc7323TwPaws,
        RstReason::TcpTooOldAck,
        RstReason::TcpAckUnsentData,
        RstReason::TcpFlags,
        RstReason::TcpOldAck,
        RstReason::TcpAbortOnData,
        RstReason::TcpTimewaitSocket,
        RstReason::InvalidSyn,
        RstReason::TcpInvalidSyn,
        RstReason::TcpInvalidSequence,
        RstReason::TcpAbortOnClose,
        RstReason::TcpAbortOnLinger,
        RstReason::TcpAbortOnMemory,
        RstReason::TcpState,
        RstReason::TcpKeepaliveTimeout,
        RstReason::TcpDisconnectWithData,
        RstReason::MptcpRstEunspec,
        RstReason::MptcpRstEmptcp,
        RstReason::MptcpRstEresource,
        RstReason::MptcpRstEprohibit,
        RstReason::MptcpRstEwq2big,
        RstReason::MptcpRstEbadperf,
        RstReason::MptcpRstEmiddlebox,
        RstReason::Error,
    ];

    /// The name without the `SK_RST_REASON_` prefix, as the tcp:tcp_send_reset tracepoint
    /// prints it.
    pub fn kernel_name(self) -> &'static str {
        match self {
            RstReason::NotSpecified => "NOT_SPECIFIED",
            RstReason::NoSocket => "NO_SOCKET",
            RstReason::TcpInvalidAckSequence => "TCP_INVALID_ACK_SEQUENCE",
            RstReason::TcpRfc7323Paws => "TCP_RFC7323_PAWS",
            RstReason::TcpRfc7323TwPaws => "TCP_RFC7323_TW_PAWS",
            RstReason::TcpTooOldAck => "TCP_TOO_OLD_ACK",
            RstReason::TcpAckUnsentData => "TCP_ACK_UNSENT_DATA",
            RstReason::TcpFlags => "TCP_FLAGS",
            RstReason::TcpOldAck => "TCP_OLD_ACK",
            RstReason::TcpAbortOnData => "TCP_ABORT_ON_DATA",
            RstReason::TcpTimewaitSocket => "TCP_TIMEWAIT_SOCKET",
            RstReason::InvalidSyn => "INVALID_SYN",
            RstReason::TcpInvalidSyn => "TCP_INVALID_SYN",
            RstReason::TcpInvalidSequence => "TCP_INVALID_SEQUENCE",
            RstReason::TcpAbortOnClose => "TCP_ABORT_ON_CLOSE",
            RstReason::TcpAbortOnLinger => "TCP_ABORT_ON_LINGER",
            RstReason::TcpAbortOnMemory => "TCP_ABORT_ON_MEMORY",
            RstReason::TcpState => "TCP_STATE",
            RstReason::TcpKeepaliveTimeout => "TCP_KEEPALIVE_TIMEOUT",
            RstReason::TcpDisconnectWithData => "TCP_DISCONNECT_WITH_DATA",
            RstReason::MptcpRstEunspec => "MPTCP_RST_EUNSPEC",
            RstReason::MptcpRstEmptcp => "MPTCP_RST_EMPTCP",
            RstReason::MptcpRstEresource => "MPTCP_RST_ERESOURCE",
            RstReason::MptcpRstEprohibit => "MPTCP_RST_EPROHIBIT",
            RstReason::MptcpRstEwq2big => "MPTCP_RST_EWQ2BIG",
            RstReason::MptcpRstEbadperf => "MPTCP_RST_EBADPERF",
            RstReason::MptcpRstEmiddlebox => "MPTCP_RST_EMIDDLEBOX",
            RstReason::Error => "ERROR",
        }
    }

    /// The reason of a kernel name (without the `SK_RST_REASON_` prefix).
    pub(crate) fn from_kernel_name(name: &str) -> Option<RstReason> {
        RstReason::ALL.into_iter().find(|r| r.kernel_name() == name)
    }
}

impl fmt::Display for RstReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_name())
    }
}

/// `enum tcp_tw_status`, what tcp_timewait_state_process() returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(crate) enum TwStatus {
    Success,
    Rst,
    Ack,
    Syn,
    /// 6.15+ only.
    AckOow,
}

impl TwStatus {
    pub(crate) const ALL: [TwStatus; 5] = [
        TwStatus::Success,
        TwStatus::Rst,
        TwStatus::Ack,
        TwStatus::Syn,
        TwStatus::AckOow,
    ];

    /// The status of a kernel name (without the `TCP_TW_` prefix).
    pub(crate) fn from_kernel_name(name: &str) -> Option<TwStatus> {
        TwStatus::ALL.into_iter().find(|s| s.kernel_name() == name)
    }

    /// The name without the `TCP_TW_` prefix.
    pub(crate) fn kernel_name(self) -> &'static str {
        match self {
            TwStatus::Success => "SUCCESS",
            TwStatus::Rst => "RST",
            TwStatus::Ack => "ACK",
            TwStatus::Syn => "SYN",
            TwStatus::AckOow => "ACK_OOW",
        }
    }
}

impl fmt::Display for TwStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_name())
    }
}

/// A TcpExt counter (`nstat` name) the step bumps: an independent cross-check of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum TcpExtCounter {
    #[serde(rename = "TCPAbortOnClose")]
    TcpAbortOnClose,
    #[serde(rename = "TCPAbortOnData")]
    TcpAbortOnData,
    #[serde(rename = "TCPAbortOnLinger")]
    TcpAbortOnLinger,
    #[serde(rename = "TCPAbortOnMemory")]
    TcpAbortOnMemory,
    #[serde(rename = "TCPAbortOnTimeout")]
    TcpAbortOnTimeout,
    #[serde(rename = "TCPChallengeACK")]
    TcpChallengeAck,
    #[serde(rename = "DelayedACKLost")]
    DelayedAckLost,
}

impl TcpExtCounter {
    pub(crate) fn nstat_name(self) -> &'static str {
        match self {
            TcpExtCounter::TcpAbortOnClose => "TCPAbortOnClose",
            TcpExtCounter::TcpAbortOnData => "TCPAbortOnData",
            TcpExtCounter::TcpAbortOnLinger => "TCPAbortOnLinger",
            TcpExtCounter::TcpAbortOnMemory => "TCPAbortOnMemory",
            TcpExtCounter::TcpAbortOnTimeout => "TCPAbortOnTimeout",
            TcpExtCounter::TcpChallengeAck => "TCPChallengeACK",
            TcpExtCounter::DelayedAckLost => "DelayedACKLost",
        }
    }
}

impl fmt::Display for TcpExtCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.nstat_name())
    }
}

/// The error the kernel records for the application: `sk_err` (seen by its next call), or the
/// call's own return value for shutdown()/write(). Orphans record it with nobody to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum Errno {
    Econnreset,
    Econnrefused,
    Econnaborted,
    Epipe,
    Etimedout,
    Enotconn,
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Errno::Econnreset => "ECONNRESET",
            Errno::Econnrefused => "ECONNREFUSED",
            Errno::Econnaborted => "ECONNABORTED",
            Errno::Epipe => "EPIPE",
            Errno::Etimedout => "ETIMEDOUT",
            Errno::Enotconn => "ENOTCONN",
        })
    }
}

/// One tcp_set_state() call: what sock:inet_sock_set_state shows for the full socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct StateChange {
    pub(crate) from: TcpState,
    pub(crate) to: TcpState,
}

impl fmt::Display for StateChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)
    }
}

/// A tcp_time_wait(sk, state, timeo) call: the full socket is traded for a minisocket (and then
/// goes to CLOSE through tcp_done()).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct TimeWaitCall {
    /// The `state` argument, which becomes tw_substate.
    pub(crate) substate: TwSubstate,
    /// The `timeo` argument, ms.
    pub(crate) timeo_ms: u64,
    /// What the minisocket's timer is armed to: timeo floored at 3.5 RTO, or TCP_TIMEWAIT_LEN
    /// for substate TIME_WAIT.
    pub(crate) timer_ms: u64,
}

impl fmt::Display for TimeWaitCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tcp_time_wait({}, {} ms) -> timer {} ms",
            self.substate, self.timeo_ms, self.timer_ms
        )
    }
}

/// A timer the step arms or re-arms (besides the one tcp_time_wait() arms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "timer", rename_all = "snake_case")]
pub(crate) enum TimerArmed {
    /// inet_csk_reset_keepalive_timer(): the keepalive timer doubles as the orphan FIN_WAIT2
    /// timer of a full socket.
    FinWait2Keepalive { ms: u64 },
    /// inet_twsk_reschedule(): the minisocket's timer re-armed.
    TimeWait { ms: u64 },
}

impl fmt::Display for TimerArmed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimerArmed::FinWait2Keepalive { ms } => write!(f, "FIN_WAIT2 keepalive timer {ms} ms"),
            TimerArmed::TimeWait { ms } => write!(f, "TIME_WAIT timer re-armed {ms} ms"),
        }
    }
}

/// The kernel function whose rule decided a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum KernelFunction {
    #[serde(rename = "__tcp_close")]
    TcpClose,
    #[serde(rename = "tcp_disconnect")]
    TcpDisconnect,
    #[serde(rename = "inet_csk_listen_stop")]
    InetCskListenStop,
    #[serde(rename = "inet_shutdown")]
    InetShutdown,
    #[serde(rename = "tcp_shutdown")]
    TcpShutdown,
    #[serde(rename = "tcp_recvmsg")]
    TcpRecvmsg,
    #[serde(rename = "tcp_sendmsg")]
    TcpSendmsg,
    #[serde(rename = "tcp_ack")]
    TcpAck,
    #[serde(rename = "tcp_fin")]
    TcpFin,
    #[serde(rename = "tcp_data_queue")]
    TcpDataQueue,
    #[serde(rename = "tcp_rcv_state_process")]
    TcpRcvStateProcess,
    #[serde(rename = "tcp_validate_incoming")]
    TcpValidateIncoming,
    #[serde(rename = "tcp_rcv_synsent_state_process")]
    TcpRcvSynsentStateProcess,
    #[serde(rename = "tcp_v4_rcv")]
    TcpV4Rcv,
    #[serde(rename = "tcp_timewait_state_process")]
    TcpTimewaitStateProcess,
    #[serde(rename = "tcp_keepalive_timer")]
    TcpKeepaliveTimer,
    #[serde(rename = "tcp_write_timeout")]
    TcpWriteTimeout,
    #[serde(rename = "tcp_out_of_resources")]
    TcpOutOfResources,
    #[serde(rename = "tw_timer_handler")]
    TwTimerHandler,
    #[serde(rename = "tcp_v4_syn_recv_sock")]
    TcpV4SynRecvSock,
}

impl KernelFunction {
    pub(crate) fn kernel_name(self) -> &'static str {
        match self {
            KernelFunction::TcpClose => "__tcp_close",
            KernelFunction::TcpDisconnect => "tcp_disconnect",
            KernelFunction::InetCskListenStop => "inet_csk_listen_stop",
            KernelFunction::InetShutdown => "inet_shutdown",
            KernelFunction::TcpShutdown => "tcp_shutdown",
            KernelFunction::TcpRecvmsg => "tcp_recvmsg",
            KernelFunction::TcpSendmsg => "tcp_sendmsg",
            KernelFunction::TcpAck => "tcp_ack",
            KernelFunction::TcpFin => "tcp_fin",
            KernelFunction::TcpDataQueue => "tcp_data_queue",
            KernelFunction::TcpRcvStateProcess => "tcp_rcv_state_process",
            KernelFunction::TcpValidateIncoming => "tcp_validate_incoming",
            KernelFunction::TcpRcvSynsentStateProcess => "tcp_rcv_synsent_state_process",
            KernelFunction::TcpV4Rcv => "tcp_v4_rcv",
            KernelFunction::TcpV4SynRecvSock => "tcp_v4_syn_recv_sock",
            KernelFunction::TcpTimewaitStateProcess => "tcp_timewait_state_process",
            KernelFunction::TcpKeepaliveTimer => "tcp_keepalive_timer",
            KernelFunction::TcpWriteTimeout => "tcp_write_timeout",
            KernelFunction::TcpOutOfResources => "tcp_out_of_resources",
            KernelFunction::TwTimerHandler => "tw_timer_handler",
        }
    }
}

impl fmt::Display for KernelFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kernel_name())
    }
}

/// The decision for one input in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// The state after the step.
    pub(crate) next: State,
    /// False when the input cannot happen in this state (then nothing changes and `rule` says
    /// why).
    pub(crate) applicable: bool,
    /// The full socket's tcp_set_state() calls, in order.
    pub(crate) state_changes: Vec<StateChange>,
    /// Packets, in order. Empty: nothing goes on the wire.
    pub(crate) wire: Vec<Wire>,
    /// The RST's `sk_rst_reason`; `None` when no RST or the kernel has no reasons.
    pub(crate) rst_reason: Option<RstReason>,
    /// tcp_timewait_state_process()'s return, for segments that reach a minisocket.
    pub(crate) tw_status: Option<TwStatus>,
    /// TcpExt counters bumped.
    pub(crate) counters: Vec<TcpExtCounter>,
    pub(crate) error: Option<Errno>,
    pub(crate) time_wait: Option<TimeWaitCall>,
    pub(crate) timer: Option<TimerArmed>,
    /// close() blocks in sk_stream_wait_close() (SO_LINGER with a positive time).
    pub(crate) blocks_caller: bool,
    pub(crate) decided_by: Option<KernelFunction>,
    /// The rule, in words, citing the kernel code.
    pub(crate) rule: String,
}

impl Outcome {
    /// An outcome in which the step does something (or deliberately nothing).
    pub(crate) fn new(next: State, decided_by: KernelFunction, rule: impl Into<String>) -> Outcome {
        Outcome {
            next,
            applicable: true,
            state_changes: Vec::new(),
            wire: Vec::new(),
            rst_reason: None,
            tw_status: None,
            counters: Vec::new(),
            error: None,
            time_wait: None,
            timer: None,
            blocks_caller: false,
            decided_by: Some(decided_by),
            rule: rule.into(),
        }
    }

    /// The input cannot occur here: the state stays as it is.
    pub(crate) fn not_applicable(here: &State, why: impl Into<String>) -> Outcome {
        Outcome {
            applicable: false,
            decided_by: None,
            rule: format!("not applicable: {}", why.into()),
            ..Outcome::new(here.clone(), KernelFunction::TcpClose, "")
        }
    }

    /// This outcome followed by `later`, for one segment that two rules handle in turn (a FIN
    /// that also ACKs our FIN: tcp_rcv_state_process() takes the ACK, then tcp_fin() the FIN).
    pub(crate) fn then(mut self, later: Outcome) -> Outcome {
        self.state_changes.extend(later.state_changes);
        self.wire.extend(later.wire);
        self.counters.extend(later.counters);
        // A timer armed by the first half dies with the full socket if the second half trades
        // it for a minisocket.
        self.timer = if later.time_wait.is_some() {
            later.timer
        } else {
            later.timer.or(self.timer)
        };
        Outcome {
            next: later.next,
            applicable: self.applicable && later.applicable,
            rst_reason: later.rst_reason.or(self.rst_reason),
            tw_status: later.tw_status.or(self.tw_status),
            error: later.error.or(self.error),
            time_wait: later.time_wait.or(self.time_wait),
            blocks_caller: self.blocks_caller || later.blocks_caller,
            decided_by: later.decided_by.or(self.decided_by),
            rule: format!("{}; then {}", self.rule, later.rule),
            ..self
        }
    }
}

/// One step of a model run: the input, where it started, and the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub(crate) input: Input,
    pub(crate) from: State,
    #[serde(flatten)]
    pub(crate) outcome: Outcome,
}

impl Step {
    /// The state after the step.
    #[cfg(test)]
    pub(crate) fn to(&self) -> &State {
        &self.outcome.next
    }

    /// A FIN was sent or queued.
    #[cfg(test)]
    pub(crate) fn sends_fin(&self) -> bool {
        self.outcome.wire.iter().any(|w| w.is_fin())
    }

    /// A RST was sent (by the socket, in reply, or by a listener's children).
    #[cfg(test)]
    pub(crate) fn sends_rst(&self) -> bool {
        self.outcome.wire.iter().any(|w| w.is_rst())
    }

    /// tcp_time_wait() was called.
    #[cfg(test)]
    pub(crate) fn time_wait_called(&self) -> bool {
        self.outcome.time_wait.is_some()
    }
}

/// One line: `close: ESTABLISHED -> FIN_WAIT1+orphan [FIN] (__tcp_close)`.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} -> {}", self.input, self.from, self.outcome.next)?;
        if !self.outcome.applicable {
            return f.write_str(" (not applicable)");
        }
        if !self.outcome.wire.is_empty() {
            let wire: Vec<String> = self.outcome.wire.iter().map(Wire::to_string).collect();
            write!(f, " [{}]", wire.join(", "))?;
        }
        if let Some(function) = self.outcome.decided_by {
            write!(f, " ({function})")?;
        }
        Ok(())
    }
}
