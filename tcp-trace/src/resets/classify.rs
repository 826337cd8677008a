//! The rules: one reset event plus its flow's context -> a diagnosis. Pure.
//!
//! The order of events the rules rely on (kernel-teardown.md; 6.1 to 6.18):
//! - close() and tcp_disconnect() set CLOSE first, then send the active RST, in the closing task;
//!   the socket is destroyed in the same call.
//! - Timers (keepalive, tcp_out_of_resources) and tcp_abort() send the RST first, while the
//!   socket is still in its old state, then set CLOSE.
//! - tcp_reset() fires tcp:tcp_receive_reset for a received RST *and* for the data-after-close
//!   abort of an orphan in FIN_WAIT1/2, whose reply RST (from the same socket) follows it.
//! - A reply RST with no socket shows no state; one from a TIME_WAIT minisocket shows TIME_WAIT.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::decode::{Hook, Owner, OwnerSource, SockPtr, TraceEvent};
use crate::decode::{KReason, KReason::Known as K, KState};
use crate::model::{
    KernelGeneration, RstReason, RstReason as R, TcpExtCounter, TcpState, TcpState as S,
};
/// Which hooks the trace had (what the absence of an event means depends on it).
pub(crate) use tcp_trace_common::HookSet;

use super::{Confidence, Direction, ResetCause, ResetDiagnosis, Task, human_duration};

/// What [`classify`] knows besides the event.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlowContext<'a> {
    /// The connection's recent events before this one, oldest first: its full socket, its
    /// TIME_WAIT minisocket and replies for its 4-tuple.
    pub(crate) before: &'a [TraceEvent],
    /// The connection's events that came after this one, within the settle window.
    pub(crate) after: &'a [TraceEvent],
    /// The tcp_close event of this socket's close(), when the hook saw it.
    pub(crate) close: Option<&'a TraceEvent>,
    pub(crate) kernel: KernelGeneration,
    pub(crate) hooks: HookSet,
    /// The LISTEN -> CLOSE of the listener on this local port, by the task sending this RST,
    /// just before it (an un-accepted child reset by inet_csk_listen_stop()).
    pub(crate) listener_closed: Option<&'a TraceEvent>,
    /// For a received RST: the sender's diagnosis, when the other end is traced on this host.
    pub(crate) peer_sent: Option<&'a ResetDiagnosis>,
    /// Events this close in time (ns) belong to the same kernel action.
    pub(crate) near_ns: u64,
    /// The kernel dropped events while this connection was alive: an RST may be missing, so
    /// nothing is concluded from the absence of one.
    pub(crate) events_lost: bool,
}

/// Reply-reset reasons (6.10+) for a segment the socket does not accept.
const INVALID_SEGMENT_REASONS: &[RstReason] = &[
    R::TcpInvalidAckSequence,
    R::TcpRfc7323Paws,
    R::TcpRfc7323TwPaws,
    R::TcpTooOldAck,
    R::TcpAckUnsentData,
    R::TcpFlags,
    R::TcpOldAck,
    R::InvalidSyn,
    R::TcpInvalidSyn,
    R::TcpInvalidSequence,
];

/// States in which tcp_reset() may be the data-after-close abort rather than a received RST.
const ABORT_ON_DATA_STATES: [TcpState; 2] = [S::FinWait1, S::FinWait2];

/// Diagnoses `ev` if it is a reset (sent or received) or a silent abort; `None` for any other
/// event, for the second event of one RST (tcp_send_active_reset when the tracepoint is
/// attached), for the tcp_reset() of a data-after-close abort (its reply RST is diagnosed), and
/// for state changes and closes that abort nothing.
pub(crate) fn classify(ev: &TraceEvent, cx: &FlowContext<'_>) -> Option<ResetDiagnosis> {
    match ev.hook {
        Hook::TcpSendReset if ev.rst_active == Some(false) => Some(reply(ev, cx)),
        Hook::TcpSendReset => Some(active(ev, cx)),
        Hook::TcpSendActiveReset if !cx.hooks.has(Hook::TcpSendReset) => Some(active(ev, cx)),
        Hook::TcpReceiveReset => received(ev, cx),
        Hook::TcpTimewaitStateProcess
            if ev.segment.as_ref().is_some_and(|s| s.flags.contains('R')) =>
        {
            let mut d = base(ev, Direction::Received);
            d.set(
                ResetCause::PeerReset,
                Confidence::Certain,
                None,
                "RST at the TIME_WAIT minisocket (it dies unless tcp_rfc1337=1)".into(),
            );
            Some(with_peer(d, cx))
        }
        Hook::InetSockSetState if ev.tcp_new_state() == Some(S::Close) => silent_close(ev, cx),
        Hook::TcpClose => silent_linger_zero(ev, cx),
        _ => None,
    }
}

impl ResetDiagnosis {
    fn set(
        &mut self,
        cause: ResetCause,
        confidence: Confidence,
        counter: Option<TcpExtCounter>,
        evidence: String,
    ) {
        self.cause = cause;
        self.confidence = confidence;
        self.counter = counter.map(TcpExtCounter::nstat_name);
        self.evidence = evidence;
    }

    fn possibly(&mut self, counters: &[TcpExtCounter]) {
        self.possible_counters = counters.iter().map(|c| c.nstat_name()).collect();
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

/// The kernel's reason, unless it gave none or NOT_SPECIFIED (6.10/6.11 active resets).
fn specific_reason(ev: &TraceEvent) -> Option<KReason> {
    ev.rst_reason
        .filter(|r| *r != KReason::Known(R::NotSpecified))
}

fn base(ev: &TraceEvent, direction: Direction) -> ResetDiagnosis {
    ResetDiagnosis {
        ts_ns: ev.ts_ns,
        direction,
        cause: ResetCause::Unknown,
        confidence: Confidence::Guess,
        evidence: String::new(),
        unread_bytes: None,
        unsent_bytes: None,
        unacked_bytes: None,
        unread_wait_max_ns: None,
        owner: ev.owner,
        closer: None,
        local: ev.local.unwrap_or_else(unspecified),
        peer: ev.remote.unwrap_or_else(unspecified),
        netns: ev.netns,
        counter: None,
        possible_counters: Vec::new(),
        kernel_reason: specific_reason(ev).map(|r| r.to_string()),
        sk: ev.sk,
        peer_cause: None,
        close_stack: ev.user_stack.clone().unwrap_or_default(),
        close_site: ev.user_stack.as_ref().and_then(|s| {
            s.iter()
                .find(|f| !crate::stacks::is_runtime_frame(f))
                .map(crate::stacks::Frame::describe)
        }),
    }
}

fn task(ev: &TraceEvent) -> Task {
    Task {
        pid: ev.pid,
        tid: ev.tid,
        comm: ev.comm,
    }
}

fn near(a: &TraceEvent, b: &TraceEvent, cx: &FlowContext<'_>) -> bool {
    a.ts_ns.abs_diff(b.ts_ns) <= cx.near_ns
}

fn is_rst(ev: &TraceEvent) -> bool {
    matches!(
        ev.hook,
        Hook::TcpSendReset | Hook::TcpSendActiveReset | Hook::TcpReceiveReset
    )
}

/// State changes of socket `sk` before the event, newest first.
fn changes_before<'a>(
    cx: &FlowContext<'a>,
    sk: &SockPtr,
) -> impl Iterator<Item = &'a TraceEvent> + 'a {
    let sk = *sk;
    cx.before
        .iter()
        .rev()
        .filter(move |e| e.hook == Hook::InetSockSetState && e.sk == sk)
}

/// The state change just before `ev` on its socket, if it went to CLOSE in the same task: the
/// mark of close()/tcp_disconnect(), which set CLOSE and then send the RST.
fn closed_just_before<'a>(ev: &TraceEvent, cx: &FlowContext<'a>) -> Option<&'a TraceEvent> {
    changes_before(cx, &ev.sk)
        .next()
        .filter(|t| t.tcp_new_state() == Some(S::Close) && t.tid == ev.tid && near(t, ev, cx))
}

/// The state change before `change` on the same socket.
fn change_before<'a>(change: &TraceEvent, cx: &FlowContext<'a>) -> Option<&'a TraceEvent> {
    changes_before(cx, &change.sk)
        .skip_while(|e| !std::ptr::eq(*e, change))
        .nth(1)
}

fn destroyed_after(ev: &TraceEvent, cx: &FlowContext<'_>) -> bool {
    cx.after
        .iter()
        .any(|e| e.hook == Hook::TcpDestroySock && e.sk == ev.sk && near(e, ev, cx))
}

/// When the connection became ESTABLISHED, if the trace saw it.
fn established_at(cx: &FlowContext<'_>) -> Option<u64> {
    cx.before
        .iter()
        .rev()
        .find(|e| e.hook == Hook::InetSockSetState && e.tcp_new_state() == Some(S::Established))
        .map(|e| e.ts_ns)
}

/// The close() that started this connection's end: tcp_close if seen, else the first state
/// change into FIN_WAIT1/LAST_ACK (close() or shutdown()).
fn app_close_at<'a>(cx: &FlowContext<'a>) -> Option<&'a TraceEvent> {
    cx.close.or_else(|| {
        cx.before.iter().rev().find(|e| {
            e.hook == Hook::InetSockSetState
                && matches!(e.tcp_new_state(), Some(S::FinWait1 | S::LastAck))
        })
    })
}

/// The owner of the connection this (socket-less) event belongs to, from its history.
fn owner_from_history(cx: &FlowContext<'_>) -> Option<Owner> {
    cx.before.iter().rev().find_map(|e| e.owner).map(|mut o| {
        if o.is_definite() {
            o.source = OwnerSource::Inferred;
        }
        o
    })
}

/// The socket's state when the hook ran, as text (`?` for none).
fn state(ev: &TraceEvent) -> &'static str {
    ev.state.map_or("?", KState::name)
}

/// The close() details: from the tcp_close hook when it saw this socket's close(), else from
/// the reset itself (active resets from a full socket carry the socket's queues and linger).
fn close_details_of<'b, 'a: 'b>(
    ev: &'b TraceEvent,
    cx: &FlowContext<'a>,
) -> Option<&'b TraceEvent> {
    cx.close
        .filter(|c| c.sk == ev.sk && c.close.is_some())
        .or_else(|| ev.close.is_some().then_some(ev))
}

/// The close() details of this RST's own close() call: the tcp_close event, or the RST's
/// own queue details when the eBPF side saw it inside close(). (An active RST always carries
/// its socket's queues, from tcp_disconnect() and timers too: those say nothing of a close().)
fn close_call_details<'b, 'a: 'b>(
    ev: &'b TraceEvent,
    cx: &FlowContext<'a>,
) -> Option<&'b TraceEvent> {
    cx.close
        .filter(|c| c.sk == ev.sk && c.hook == Hook::TcpClose && c.close.is_some())
        .or_else(|| (ev.in_close && ev.close.is_some()).then_some(ev))
}

fn linger_zero(c: Option<&TraceEvent>) -> bool {
    c.and_then(|c| c.close.as_ref())
        .is_some_and(|c| c.linger && c.linger_jiffies == 0)
}

/// tcp_disconnect() in the task's own call, no close() seen, and the socket outlived it: the
/// application keeps it (connect(AF_UNSPEC)). Needs the destroy hook to say "outlived".
fn disconnected(ev: &TraceEvent, cx: &FlowContext<'_>) -> bool {
    close_call_details(ev, cx).is_none()
        && cx.hooks.has(Hook::TcpDestroySock)
        && !cx.events_lost
        && !destroyed_after(ev, cx)
}

/// The diagnosis of a [`disconnected`] RST; `what` says what showed it (the reason, the state).
fn set_disconnect(d: &mut ResetDiagnosis, ev: &TraceEvent, what: &str) {
    d.closer = None;
    d.set(
        ResetCause::Disconnect,
        Confidence::Derived,
        None,
        format!(
            "{what} -> CLOSE and RST in {}'s own call with no close(), and the socket lived \
             on: tcp_disconnect() (connect(AF_UNSPEC) on a connected socket)",
            task(ev)
        ),
    );
}

fn attach_close_details(d: &mut ResetDiagnosis, close: Option<&TraceEvent>) {
    if let Some(c) = close.and_then(|c| c.close.as_ref()) {
        d.unsent_bytes = Some(c.unsent);
        d.unacked_bytes = Some(c.unacked);
    }
}

// ---- sent, active ---------------------------------------------------------------------------

fn active(ev: &TraceEvent, cx: &FlowContext<'_>) -> ResetDiagnosis {
    let mut d = base(ev, Direction::Sent);
    // With both hooks on one RST, tcp_send_active_reset (fentry/kprobe) may carry the reason
    // the tracepoint lacks.
    let reason = specific_reason(ev).or_else(|| {
        cx.before
            .iter()
            .rev()
            .find(|e| e.hook == Hook::TcpSendActiveReset && e.sk == ev.sk && near(e, ev, cx))
            .and_then(specific_reason)
    });
    d.kernel_reason = reason.map(|r| r.to_string());
    let close = close_details_of(ev, cx);
    let trans = closed_just_before(ev, cx);
    // The RST came from the closing task's own call: it is the closer. Only a seen close()
    // (tcp_close) or the state change it made says so: the queue details an active RST carries
    // itself come from timers too (keepalive), whose task on the CPU closed nothing.
    let tcp_close = cx
        .close
        .filter(|c| c.sk == ev.sk && c.hook == Hook::TcpClose);
    // The eBPF side marks events of the socket whose last descriptor the task on the CPU is
    // closing (found by descriptor, whoever the owner of record was).
    let from_close_call =
        ev.in_close || tcp_close.is_some_and(|c| c.tid == ev.tid) || trans.is_some();
    if from_close_call {
        d.closer = Some(task(tcp_close.filter(|c| c.tid == ev.tid).unwrap_or(ev)));
    }
    match reason {
        Some(K(R::TcpAbortOnClose)) => close_unread(
            &mut d,
            ev,
            cx,
            Confidence::Certain,
            "kernel reason TCP_ABORT_ON_CLOSE",
        ),
        Some(K(R::TcpAbortOnLinger)) => d.set(
            ResetCause::OrphanLinger2,
            Confidence::Certain,
            Some(TcpExtCounter::TcpAbortOnLinger),
            "kernel reason TCP_ABORT_ON_LINGER: close() left the socket in FIN_WAIT2 and \
             TCP_LINGER2 < 0 says not to wait for the peer's FIN"
                .into(),
        ),
        Some(K(R::TcpAbortOnMemory)) => {
            let how = if from_close_call {
                "close(): tcp_check_oom() found too many orphans or tcp_mem pressure"
            } else {
                "an orphan's timer: tcp_out_of_resources() found too many orphans or tcp_mem \
                 pressure"
            };
            d.set(
                ResetCause::MemoryPressure,
                Confidence::Certain,
                Some(TcpExtCounter::TcpAbortOnMemory),
                format!("kernel reason TCP_ABORT_ON_MEMORY in {}: {how}", state(ev)),
            )
        }
        Some(K(R::TcpKeepaliveTimeout)) => d.set(
            ResetCause::KeepaliveTimeout,
            Confidence::Certain,
            Some(TcpExtCounter::TcpAbortOnTimeout),
            format!(
                "kernel reason TCP_KEEPALIVE_TIMEOUT in {}: keepalive probes went unanswered \
                 (or TCP_USER_TIMEOUT passed while probing); the application gets ETIMEDOUT",
                state(ev)
            ),
        ),
        Some(r @ K(R::TcpState | R::TcpDisconnectWithData)) => state_reset(&mut d, ev, cx, r),
        Some(other) => d.set(
            ResetCause::Unknown,
            Confidence::Guess,
            None,
            format!("kernel reason {other}, which tcp-trace has no rule for"),
        ),
        None => derive_active(&mut d, ev, cx),
    }
    if matches!(d.cause, ResetCause::LingerZero | ResetCause::CloseUnread) {
        attach_close_details(&mut d, close);
    }
    d
}

fn close_unread(
    d: &mut ResetDiagnosis,
    ev: &TraceEvent,
    cx: &FlowContext<'_>,
    confidence: Confidence,
    why: &str,
) {
    let close = close_details_of(ev, cx);
    let unread = close.and_then(|c| c.close.as_ref()).map(|c| c.unread);
    d.unread_bytes = unread;
    let age = established_at(cx).map(|t| ev.ts_ns.saturating_sub(t));
    d.unread_wait_max_ns = age;
    let mut evidence = format!(
        "{why}: close() found {} in the receive queue, so the kernel sent RST instead of FIN",
        match unread {
            Some(n) if n > 0 => format!("{n} unread bytes"),
            Some(_) => "data counted as unread".to_string(),
            None => "unread data".to_string(),
        }
    );
    if let Some(age) = age {
        evidence.push_str(&format!(
            "; the oldest unread byte waited at most {} (the connection's age)",
            human_duration(age)
        ));
    }
    if unread.is_none() && !cx.hooks.has(Hook::TcpClose) {
        evidence.push_str(" (the byte count needs the tcp_close hook)");
    }
    d.set(
        ResetCause::CloseUnread,
        confidence,
        Some(TcpExtCounter::TcpAbortOnClose),
        evidence,
    );
}

/// TCP_STATE / TCP_DISCONNECT_WITH_DATA: tcp_disconnect(), tcp_abort(), or an orphan's
/// FIN_WAIT2 timer. The context tells which.
fn state_reset(d: &mut ResetDiagnosis, ev: &TraceEvent, cx: &FlowContext<'_>, reason: KReason) {
    let call = close_call_details(ev, cx);
    let linger0 = linger_zero(call);
    let trans = closed_just_before(ev, cx);
    if let Some(l) = cx.listener_closed {
        d.closer = Some(task(l));
        return d.set(
            ResetCause::ListenerClosed,
            Confidence::Derived,
            None,
            format!(
                "kernel reason {reason}: the listener on port {} was closed by {} with this \
                 connection still in its accept queue (inet_csk_listen_stop() resets each child)",
                d.local.port(),
                task(l)
            ),
        );
    }
    if let Some(t) = trans {
        let from = state(t);
        if linger0 {
            return d.set(
                ResetCause::LingerZero,
                Confidence::Certain,
                Some(TcpExtCounter::TcpAbortOnData),
                format!(
                    "kernel reason {reason} (tcp_disconnect()) from close() with SO_LINGER \
                     {{on, 0}} in {from}"
                ),
            );
        }
        if call.is_some() {
            return d.set(
                ResetCause::Unknown,
                Confidence::Guess,
                None,
                format!(
                    "kernel reason {reason} after {from} -> CLOSE, though tcp_close saw no \
                     SO_LINGER 0: no rule fits"
                ),
            );
        }
        if disconnected(ev, cx) {
            return set_disconnect(d, ev, &format!("kernel reason {reason}: {from}"));
        }
        return d.set(
            ResetCause::LingerZero,
            Confidence::Derived,
            Some(TcpExtCounter::TcpAbortOnData),
            format!(
                "kernel reason {reason} (tcp_disconnect()) right after {from} -> CLOSE in {}'s \
                 own call, and the socket was destroyed at once: close() with SO_LINGER {{on, 0}}{}",
                task(ev),
                if cx.hooks.has(Hook::TcpClose) {
                    ""
                } else {
                    " (the tcp_close hook, not attached, would show it directly)"
                }
            ),
        );
    }
    match ev.tcp_state() {
        Some(S::FinWait2) => d.set(
            ResetCause::FinWait2Timeout,
            Confidence::Derived,
            None,
            format!(
                "kernel reason {reason} while still FIN_WAIT2, not from close(): the orphan's \
                 FIN_WAIT2 timer (tcp_keepalive_timer) ran out without the peer's FIN"
            ),
        ),
        Some(
            S::Established | S::CloseWait | S::FinWait1 | S::SynRecv | S::Closing | S::LastAck,
        ) => {
            d.closer = Some(task(ev));
            d.set(
                ResetCause::Killed,
                Confidence::Derived,
                None,
                format!(
                    "kernel reason {reason} while still {}: tcp_abort() by {} (ss -K, \
                     SOCK_DESTROY or a BPF sock_destroy)",
                    state(ev),
                    task(ev)
                ),
            )
        }
        _ => d.set(
            ResetCause::Unknown,
            Confidence::Guess,
            None,
            format!(
                "kernel reason {reason} in {}, with no close() or disconnect seen",
                state(ev)
            ),
        ),
    }
}

/// No reason from the kernel (before 6.12, NOT_SPECIFIED on 6.10/6.11): from the close()
/// details, else from the sequence of state changes.
fn derive_active(d: &mut ResetDiagnosis, ev: &TraceEvent, cx: &FlowContext<'_>) {
    if let Some(l) = cx.listener_closed {
        d.closer = Some(task(l));
        return d.set(
            ResetCause::ListenerClosed,
            Confidence::Derived,
            None,
            format!(
                "the listener on port {} was closed by {} just before, with this connection \
                 un-accepted (inet_csk_listen_stop() resets each child)",
                d.local.port(),
                task(l)
            ),
        );
    }
    let trans = closed_just_before(ev, cx);
    let from = trans.and_then(TraceEvent::tcp_state);
    if let Some(f) = from.filter(|_| disconnected(ev, cx)) {
        return set_disconnect(d, ev, &f.to_string());
    }
    if let Some(c) = close_details_of(ev, cx) {
        let details = c.close.as_ref().expect("close_details_of checks");
        let close_state = state(c);
        if details.unread > 0 {
            return close_unread(
                d,
                ev,
                cx,
                Confidence::Derived,
                "tcp_close (this kernel gives no reset reason)",
            );
        }
        if details.linger && details.linger_jiffies == 0 {
            return d.set(
                ResetCause::LingerZero,
                Confidence::Derived,
                Some(TcpExtCounter::TcpAbortOnData),
                format!(
                    "tcp_close: SO_LINGER {{on, 0}} in {close_state}, nothing unread: \
                     tcp_disconnect() resets (this kernel gives no reset reason)"
                ),
            );
        }
        match from {
            Some(S::FinWait2) => {
                return d.set(
                    ResetCause::OrphanLinger2,
                    Confidence::Derived,
                    Some(TcpExtCounter::TcpAbortOnLinger),
                    "tcp_close in FIN_WAIT2, no SO_LINGER 0, then FIN_WAIT2 -> CLOSE and RST: \
                     adjudge_to_death with TCP_LINGER2 < 0"
                        .into(),
                );
            }
            Some(f @ (S::FinWait1 | S::Closing | S::LastAck)) => {
                return d.set(
                    ResetCause::MemoryPressure,
                    Confidence::Derived,
                    Some(TcpExtCounter::TcpAbortOnMemory),
                    format!(
                        "tcp_close with nothing unread and no SO_LINGER 0, then {} -> CLOSE and \
                         RST in the same call: adjudge_to_death's tcp_check_oom() (too many \
                         orphans or tcp_mem pressure)",
                        f
                    ),
                );
            }
            Some(S::Established | S::CloseWait | S::SynRecv) => {
                let (confidence, why) = if cx.kernel.close_unread_fix {
                    (
                        Confidence::Guess,
                        "tcp_close measured 0 unread bytes at entry, but data can arrive before \
                         close() takes the socket lock",
                    )
                } else {
                    (
                        Confidence::Derived,
                        "tcp_close measured 0 unread bytes, but before the 6.18 fix close() \
                         counts already-read bytes still queued as unread",
                    )
                };
                close_unread(d, ev, cx, confidence, why);
                return;
            }
            _ => {}
        }
    }
    match from {
        Some(f @ (S::Established | S::CloseWait | S::SynRecv)) => {
            if !destroyed_after(ev, cx) {
                d.closer = None;
                return d.set(
                    ResetCause::Disconnect,
                    Confidence::Guess,
                    None,
                    format!(
                        "{f} -> CLOSE and RST in {}'s own call, but the socket lived on: \
                         tcp_disconnect() without close() (connect(AF_UNSPEC))",
                        task(ev)
                    ),
                );
            }
            d.set(
                ResetCause::CloseAbort,
                Confidence::Guess,
                None,
                format!(
                    "{f} -> CLOSE and RST in {}'s close(): unread data (TCPAbortOnClose) or \
                     SO_LINGER {{on, 0}} (TCPAbortOnData); this kernel gives no reset reason and \
                     the tcp_close hook is not attached",
                    task(ev)
                ),
            );
            d.possibly(&[
                TcpExtCounter::TcpAbortOnClose,
                TcpExtCounter::TcpAbortOnData,
            ]);
        }
        Some(S::FinWait2) => {
            d.set(
                ResetCause::OrphanLinger2,
                Confidence::Guess,
                None,
                format!(
                    "FIN_WAIT2 -> CLOSE and RST in {}'s close(): TCP_LINGER2 < 0 \
                     (TCPAbortOnLinger), or SO_LINGER {{on, 0}} (TCPAbortOnData)",
                    task(ev)
                ),
            );
            d.possibly(&[
                TcpExtCounter::TcpAbortOnLinger,
                TcpExtCounter::TcpAbortOnData,
            ]);
        }
        Some(f @ (S::FinWait1 | S::Closing | S::LastAck)) => {
            // close() that sent its FIN and then reset in the same call: only tcp_check_oom()
            // does that (the model's adjudge_to_death).
            let same_call = trans.and_then(|t| change_before(t, cx)).is_some_and(|p| {
                p.tid == ev.tid
                    && near(p, ev, cx)
                    && matches!(p.tcp_state(), Some(S::Established | S::CloseWait))
            });
            if same_call {
                d.set(
                    ResetCause::MemoryPressure,
                    Confidence::Derived,
                    Some(TcpExtCounter::TcpAbortOnMemory),
                    format!(
                        "close() sent its FIN ({f}) and then CLOSE and RST in the same call: \
                         adjudge_to_death's tcp_check_oom() (too many orphans or tcp_mem pressure)"
                    ),
                );
            } else {
                d.set(
                    ResetCause::MemoryPressure,
                    Confidence::Guess,
                    None,
                    format!(
                        "{f} -> CLOSE and RST in {}'s close(): tcp_check_oom() \
                         (TCPAbortOnMemory), or SO_LINGER {{on, 0}} after shutdown() \
                         (TCPAbortOnData)",
                        task(ev)
                    ),
                );
                d.possibly(&[
                    TcpExtCounter::TcpAbortOnMemory,
                    TcpExtCounter::TcpAbortOnData,
                ]);
            }
        }
        _ => {
            // The RST went out while the socket was still in its old state: a timer or
            // tcp_abort(), not close().
            d.closer = None;
            match ev.tcp_state() {
                Some(S::FinWait2) => d.set(
                    ResetCause::FinWait2Timeout,
                    Confidence::Guess,
                    None,
                    "RST while still FIN_WAIT2, not from close(): the orphan's FIN_WAIT2 timer \
                     (or tcp_abort())"
                        .into(),
                ),
                Some(s @ (S::Established | S::CloseWait)) => d.set(
                    ResetCause::KeepaliveTimeout,
                    Confidence::Guess,
                    Some(TcpExtCounter::TcpAbortOnTimeout),
                    format!(
                        "RST while still {s}, not from close(): the keepalive timer giving up \
                         (TCPAbortOnTimeout), or tcp_abort() (ss -K)"
                    ),
                ),
                Some(s @ (S::FinWait1 | S::Closing | S::LastAck)) => d.set(
                    ResetCause::MemoryPressure,
                    Confidence::Guess,
                    Some(TcpExtCounter::TcpAbortOnMemory),
                    format!(
                        "RST while the orphan was still {s}: its retransmit timer's \
                         tcp_out_of_resources() (too many orphans or tcp_mem pressure), or \
                         tcp_abort()"
                    ),
                ),
                _ => d.set(
                    ResetCause::Unknown,
                    Confidence::Guess,
                    None,
                    format!(
                        "active RST in {}: no reason from the kernel, no rule fits",
                        state(ev)
                    ),
                ),
            }
        }
    }
}

// ---- sent, reply ----------------------------------------------------------------------------

fn reply(ev: &TraceEvent, cx: &FlowContext<'_>) -> ResetDiagnosis {
    let mut d = base(ev, Direction::Sent);
    let reason = specific_reason(ev);
    // tcp_reset() of the same socket just before: the data-after-close abort.
    let aborted = cx.before.iter().rev().find(|e| {
        e.hook == Hook::TcpReceiveReset
            && e.sk == ev.sk
            && near(e, ev, cx)
            && e.tcp_state()
                .is_some_and(|s| ABORT_ON_DATA_STATES.contains(&s))
    });
    match (reason, ev.state.map(|s| s.tcp().ok_or(s))) {
        (Some(K(R::NoSocket)), _) => no_socket(&mut d, cx, Confidence::Certain),
        (Some(K(R::TcpTimewaitSocket)), _) => time_wait(&mut d, cx, Confidence::Certain),
        (Some(K(R::TcpAbortOnData)), _) => {
            if let Some(a) = aborted {
                data_after_close(&mut d, cx, a, Confidence::Certain, "kernel reason TCP_ABORT_ON_DATA")
            } else if let Some(why) = linger2_after_fin_wait1(ev, cx) {
                d.set(
                    ResetCause::OrphanLinger2,
                    Confidence::Derived,
                    Some(TcpExtCounter::TcpAbortOnData),
                    format!("kernel reason TCP_ABORT_ON_DATA; {why}"),
                )
            } else {
                d.set(
                    ResetCause::DataAfterClose,
                    Confidence::Derived,
                    Some(TcpExtCounter::TcpAbortOnData),
                    "kernel reason TCP_ABORT_ON_DATA: a segment reached a socket closed for \
                     reading"
                        .into(),
                )
            }
        }
        (Some(r @ K(known)), _) if INVALID_SEGMENT_REASONS.contains(&known) => d.set(
            ResetCause::InvalidSegment,
            Confidence::Certain,
            None,
            format!(
                "kernel reason {r}: a reply to a segment the socket ({}) does not accept",
                ev.state.map_or("no socket", KState::name)
            ),
        ),
        (Some(r), _) => d.set(
            ResetCause::Unknown,
            Confidence::Guess,
            None,
            format!("reply RST with kernel reason {r}, which tcp-trace has no rule for"),
        ),
        (None, None) => no_socket(&mut d, cx, Confidence::Derived),
        (None, Some(Ok(S::TimeWait))) => time_wait(&mut d, cx, Confidence::Derived),
        (None, Some(_)) if aborted.is_some() => data_after_close(
            &mut d,
            cx,
            aborted.expect("checked"),
            Confidence::Derived,
            "no reset reason on this kernel, but tcp_reset() ran just before on this socket",
        ),
        (None, Some(_)) if linger2_after_fin_wait1(ev, cx).is_some() => {
            let why = linger2_after_fin_wait1(ev, cx).unwrap_or_default();
            d.set(
                ResetCause::OrphanLinger2,
                Confidence::Derived,
                Some(TcpExtCounter::TcpAbortOnData),
                why,
            )
        }
        (None, Some(Ok(s @ (S::Listen | S::SynSent | S::SynRecv | S::NewSynRecv)))) => d.set(
            ResetCause::InvalidSegment,
            Confidence::Guess,
            None,
            format!("a reply from a socket in {s}: a segment it does not accept (no reason on this kernel)"),
        ),
        (None, Some(_)) => d.set(
            ResetCause::Unknown,
            Confidence::Guess,
            None,
            format!(
                "a reply RST from a socket in {}; no reason on this kernel, no rule fits",
                state(ev)
            ),
        ),
    }
    if d.owner.is_none() {
        d.owner = owner_from_history(cx);
    }
    d
}

/// FIN_WAIT1 -> FIN_WAIT2 -> CLOSE just before a reply RST, no tcp_reset(): an orphan with
/// TCP_LINGER2 < 0 got the ACK of its FIN (tcp_rcv_state_process, TCPAbortOnData).
fn linger2_after_fin_wait1(ev: &TraceEvent, cx: &FlowContext<'_>) -> Option<String> {
    let mut changes = changes_before(cx, &ev.sk);
    let last = changes.next()?;
    let prev = changes.next()?;
    (last.tcp_new_state() == Some(S::Close)
        && last.tcp_state() == Some(S::FinWait2)
        && prev.tcp_state() == Some(S::FinWait1)
        && prev.tcp_new_state() == Some(S::FinWait2)
        && near(last, ev, cx))
    .then(|| {
        "the orphan went FIN_WAIT1 -> FIN_WAIT2 -> CLOSE on the ACK of its FIN and answered with \
         RST (tcp_rcv_state_process): TCP_LINGER2 < 0, or the segment that ACKed the FIN \
         carried new data (the peer wrote before it read our FIN, as a keep-alive client \
         sending its next request does); the events do not tell the two apart"
            .to_string()
    })
}

fn data_after_close(
    d: &mut ResetDiagnosis,
    cx: &FlowContext<'_>,
    aborted: &TraceEvent,
    confidence: Confidence,
    why: &str,
) {
    let mut evidence = format!(
        "{why}: data arrived at the socket in {} after close() (or shutdown(SHUT_RD)); the \
         kernel aborted it (tcp_reset) and answered with RST",
        state(aborted)
    );
    if let Some(c) = app_close_at(cx) {
        evidence.push_str(&format!(
            "; close() was {} earlier",
            human_duration(aborted.ts_ns.saturating_sub(c.ts_ns))
        ));
    }
    d.set(
        ResetCause::DataAfterClose,
        confidence,
        Some(TcpExtCounter::TcpAbortOnData),
        evidence,
    );
}

fn no_socket(d: &mut ResetDiagnosis, cx: &FlowContext<'_>, confidence: Confidence) {
    let gone = cx.before.iter().rev().find(|e| {
        e.hook == Hook::TcpDestroySock
            || (e.hook == Hook::InetSockSetState && e.tcp_new_state() == Some(S::Close))
    });
    let evidence = match gone {
        Some(g) => format!(
            "no socket for this 4-tuple: the connection's socket was gone ({} {} earlier); the \
             peer kept sending",
            if g.hook == Hook::TcpDestroySock {
                "destroyed"
            } else {
                "closed"
            },
            human_duration(d.ts_ns.saturating_sub(g.ts_ns))
        ),
        None => format!(
            "no socket for this 4-tuple: nothing listens on port {}, or the connection ended \
             before the trace began",
            d.local.port()
        ),
    };
    d.set(ResetCause::NoSocket, confidence, None, evidence);
}

fn time_wait(d: &mut ResetDiagnosis, cx: &FlowContext<'_>, confidence: Confidence) {
    let segment = cx.before.iter().rev().find(|e| {
        e.hook == Hook::TcpTimewaitStateProcess && e.ts_ns.abs_diff(d.ts_ns) <= cx.near_ns
    });
    let mut evidence = "a TIME_WAIT minisocket answered a segment it does not accept".to_string();
    if let Some(s) = segment {
        evidence = format!(
            "the TIME_WAIT minisocket (substate {}) got [{}]{} and answered RST",
            state(s),
            s.segment
                .as_ref()
                .map(|g| g.flags.to_string())
                .unwrap_or("?".into()),
            s.segment
                .as_ref()
                .filter(|g| g.len > 0)
                .map(|g| format!(" with {} bytes", g.len))
                .unwrap_or_default()
        );
    }
    if let Some(c) = app_close_at(cx) {
        evidence.push_str(&format!(
            "; the application closed the connection {} earlier: data after close()",
            human_duration(d.ts_ns.saturating_sub(c.ts_ns))
        ));
    }
    d.set(ResetCause::TimeWait, confidence, None, evidence);
}

// ---- received -------------------------------------------------------------------------------

fn received(ev: &TraceEvent, cx: &FlowContext<'_>) -> Option<ResetDiagnosis> {
    let s = state(ev);
    let st = ev.tcp_state();
    let maybe_abort = st.is_some_and(|st| ABORT_ON_DATA_STATES.contains(&st));
    if maybe_abort
        && cx.after.iter().any(|e| {
            e.hook == Hook::TcpSendReset
                && e.rst_active == Some(false)
                && e.sk == ev.sk
                && near(e, ev, cx)
        })
    {
        // tcp_reset() of the data-after-close abort: its reply RST carries the diagnosis.
        return None;
    }
    let mut d = base(ev, Direction::Received);
    let what = match st {
        Some(S::SynSent) => "connection refused: RST in answer to our SYN (ECONNREFUSED)",
        Some(S::CloseWait) => {
            "the peer reset after its FIN (the application's next call gets EPIPE or ECONNRESET)"
        }
        Some(S::Established) => "the peer reset the connection (ECONNRESET)",
        Some(S::FinWait1 | S::FinWait2 | S::Closing | S::LastAck) => {
            "the peer reset after this side's close()/shutdown()"
        }
        Some(S::SynRecv) => "the peer reset during the handshake",
        _ => "the peer reset the connection",
    };
    let (confidence, note) = if maybe_abort {
        (
            Confidence::Derived,
            " (no reply RST followed, so not the data-after-close abort)",
        )
    } else {
        (Confidence::Certain, "")
    };
    d.set(
        ResetCause::PeerReset,
        confidence,
        None,
        format!("RST received in {s}: {what}{note}"),
    );
    Some(with_peer(d, cx))
}

fn with_peer(mut d: ResetDiagnosis, cx: &FlowContext<'_>) -> ResetDiagnosis {
    if let Some(p) = cx.peer_sent {
        d.peer_cause = Some(p.cause);
        d.evidence.push_str(&format!(
            "; the sender is on this host: {} sent it ({}, {})",
            p.owner_label(),
            p.cause,
            p.confidence
        ));
    }
    d
}

// ---- silent aborts ---------------------------------------------------------------------------

/// A state change to CLOSE with no RST either way: a timeout (tcp_write_err(), which counts
/// TCPAbortOnTimeout and sends nothing), where the model says nothing else gets there quietly.
fn silent_close(ev: &TraceEvent, cx: &FlowContext<'_>) -> Option<ResetDiagnosis> {
    let from = ev.tcp_state()?;
    let rst_near = cx
        .before
        .iter()
        .chain(cx.after)
        .any(|e| is_rst(e) && e.sk == ev.sk && near(e, ev, cx));
    if rst_near || cx.listener_closed.is_some() || cx.events_lost {
        return None;
    }
    let closed_by_app = cx.close.is_some_and(|c| c.sk == ev.sk);
    let mut d = base(ev, Direction::Silent);
    match from {
        S::Established | S::CloseWait if !closed_by_app => d.set(
            ResetCause::Timeout,
            Confidence::Derived,
            Some(TcpExtCounter::TcpAbortOnTimeout),
            format!(
                "{from} -> CLOSE with no RST either way and no close(): the kernel gave up \
                 (retransmissions, zero-window probes or TCP_USER_TIMEOUT ran out; \
                 tcp_write_err()); the application gets ETIMEDOUT and the peer hears nothing"
            ),
        ),
        S::SynSent if !closed_by_app => d.set(
            ResetCause::Timeout,
            Confidence::Guess,
            Some(TcpExtCounter::TcpAbortOnTimeout),
            format!(
                "SYN_SENT -> CLOSE with no RST: connect() timed out (TCPAbortOnTimeout), or an \
                 ICMP error{}",
                if cx.hooks.has(Hook::TcpClose) {
                    ""
                } else {
                    ", or close() of a connecting socket (tcp_close not attached)"
                }
            ),
        ),
        S::FinWait1 | S::Closing if cx.hooks.has(Hook::TcpTimeWait) => {
            let to_time_wait = cx
                .before
                .iter()
                .any(|e| e.hook == Hook::TcpTimeWait && e.sk == ev.sk && near(e, ev, cx));
            if to_time_wait {
                return None;
            }
            d.set(
                ResetCause::Timeout,
                Confidence::Derived,
                Some(TcpExtCounter::TcpAbortOnTimeout),
                format!(
                    "{from} -> CLOSE without tcp_time_wait() or RST: the orphan's \
                     retransmissions ran out (tcp_orphan_retries); the peer hears nothing"
                ),
            )
        }
        _ => return None,
    }
    Some(d)
}

/// close() with SO_LINGER {on, 0} in a state where tcp_disconnect() sends nothing (SYN_SENT,
/// or CLOSING/LAST_ACK with nothing unsent): still TCPAbortOnData.
fn silent_linger_zero(ev: &TraceEvent, cx: &FlowContext<'_>) -> Option<ResetDiagnosis> {
    let c = ev.close.as_ref()?;
    if !(c.linger && c.linger_jiffies == 0) || c.unread > 0 {
        return None;
    }
    let s = state(ev);
    // CLOSE: __tcp_close skips the linger check. LISTEN: its own path. The others reset.
    if !matches!(ev.tcp_state(), Some(S::SynSent | S::Closing | S::LastAck)) {
        return None;
    }
    if cx
        .after
        .iter()
        .any(|e| is_rst(e) && e.sk == ev.sk && near(e, ev, cx))
    {
        return None;
    }
    let mut d = base(ev, Direction::Silent);
    d.closer = Some(task(ev));
    d.unsent_bytes = Some(c.unsent);
    d.unacked_bytes = Some(c.unacked);
    d.set(
        ResetCause::LingerZero,
        Confidence::Derived,
        Some(TcpExtCounter::TcpAbortOnData),
        format!(
            "close() with SO_LINGER {{on, 0}} in {s}: tcp_disconnect() sends nothing from there, \
             but __tcp_close() still counts TCPAbortOnData"
        ),
    );
    Some(d)
}
