//! Events as observations, the model's steps as predictions in the same terms, how the two
//! match, and the one-line summaries both render to.

use tcp_trace_common::HookSet;

use crate::decode::{CloseDetails, Hook, KReason, KState, KTwStatus, Segment, TraceEvent};
use crate::model::{
    Input, KernelFunction, RstReason, State, Step, TcpState, TwStatus, TwSubstate, Wire,
};

/// Which hooks are attached, i.e. which kinds of event a flow can show at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Visibility {
    hooks: HookSet,
    /// tcp:tcp_send_reset fires for reply resets sent for a TIME_WAIT minisocket or for no
    /// socket. Before 6.10 tcp_v4_send_reset() traced only replies from full sockets
    /// (`if (sk && sk_fullsock(sk))`); "tcp: make trace_tcp_send_reset() available in all reply
    /// cases" changed that together with the reset reasons.
    pub(crate) reply_reset_without_full_socket: bool,
}

impl Visibility {
    pub(crate) fn from_hooks(hooks: HookSet) -> Visibility {
        Visibility {
            hooks,
            reply_reset_without_full_socket: false,
        }
    }

    pub(crate) fn add(&mut self, hook: Hook) {
        self.hooks.insert(hook);
    }

    pub(crate) fn has(&self, hook: Hook) -> bool {
        self.hooks.has(hook)
    }

    /// Names of the hooks not attached.
    pub(crate) fn missing(&self) -> Vec<&'static str> {
        self.hooks.missing().map(Hook::name).collect()
    }
}

/// A TCP state by its kernel number.
pub(crate) fn tcp_state(state: Option<KState>) -> Option<TcpState> {
    TcpState::from_kernel(state?.0)
}

/// A minisocket substate by its kernel name.
pub(crate) fn tw_substate(state: Option<KState>) -> Option<TwSubstate> {
    match tcp_state(state)? {
        TcpState::FinWait2 => Some(TwSubstate::FinWait2),
        TcpState::TimeWait => Some(TwSubstate::TimeWait),
        _ => None,
    }
}

/// What one event shows.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Obs {
    CloseCall {
        details: Option<CloseDetails>,
    },
    SetState {
        from: TcpState,
        to: TcpState,
    },
    SendFin,
    FinRcvd,
    ActiveResetFn {
        reason: Option<KReason>,
    },
    SendReset {
        active: bool,
        reason: Option<KReason>,
    },
    ReceiveReset,
    TimeWaitCall {
        substate: Option<TwSubstate>,
        timeo_jiffies: Option<i64>,
    },
    TwSegment {
        segment: Option<Segment>,
    },
    TwReturn {
        status: Option<KTwStatus>,
        after: Option<TwSubstate>,
    },
    Destroy,
    /// An event this module cannot read (e.g. a state name it does not know).
    Unknown(String),
}

/// An observation with the event's time and the socket state the hook saw.
#[derive(Clone, Debug)]
pub(crate) struct ObsEv {
    pub(crate) ts: u64,
    pub(crate) obs: Obs,
    /// The full socket's state when the hook ran.
    pub(crate) state: Option<TcpState>,
    /// TW hooks: the minisocket's substate when the hook ran.
    pub(crate) tw_substate: Option<TwSubstate>,
}

impl ObsEv {
    pub(super) fn from_event(ev: &TraceEvent) -> ObsEv {
        let state = tcp_state(ev.state);
        let obs = match ev.hook {
            Hook::TcpClose => Obs::CloseCall { details: ev.close },
            Hook::TcpFin => Obs::FinRcvd,
            Hook::TcpSendFin => Obs::SendFin,
            Hook::TcpSendActiveReset => Obs::ActiveResetFn {
                reason: ev.rst_reason,
            },
            Hook::TcpTimeWait => Obs::TimeWaitCall {
                substate: tw_substate(ev.new_state),
                timeo_jiffies: ev.timeo_jiffies,
            },
            Hook::TcpTimewaitStateProcess => Obs::TwSegment {
                segment: ev.segment,
            },
            Hook::TcpTimewaitStateProcessReturn => Obs::TwReturn {
                status: ev.tw_status,
                after: tw_substate(ev.new_state),
            },
            Hook::InetSockSetState => match (state, tcp_state(ev.new_state)) {
                (Some(from), Some(to)) => Obs::SetState { from, to },
                _ => Obs::Unknown(format!(
                    "state change {} -> {}",
                    ev.state.map_or("?", KState::name),
                    ev.new_state.map_or("?", KState::name)
                )),
            },
            Hook::TcpSendReset => Obs::SendReset {
                active: ev.rst_active.unwrap_or(false),
                reason: ev.rst_reason,
            },
            Hook::TcpReceiveReset => Obs::ReceiveReset,
            Hook::TcpDestroySock => Obs::Destroy,
        };
        let tw_hook = matches!(
            ev.hook,
            Hook::TcpTimewaitStateProcess | Hook::TcpTimewaitStateProcessReturn
        );
        ObsEv {
            ts: ev.ts_ns,
            obs,
            state: if tw_hook { None } else { state },
            tw_substate: if tw_hook { tw_substate(ev.state) } else { None },
        }
    }

    /// What the summary line shows for it.
    pub(super) fn mark(&self, vis: &Visibility) -> Option<Mark> {
        match &self.obs {
            Obs::SetState { from, to } => Some(Mark::State {
                from: *from,
                to: *to,
            }),
            Obs::SendFin => Some(Mark::Fin),
            // With both reset hooks attached an active reset shows twice; the tracepoint wins.
            Obs::ActiveResetFn { reason } if !vis.has(Hook::TcpSendReset) => Some(Mark::Rst {
                reply: false,
                reason: *reason,
            }),
            Obs::SendReset { active, reason } => Some(Mark::Rst {
                reply: !active,
                reason: *reason,
            }),
            Obs::ReceiveReset => Some(Mark::RstIn),
            Obs::TimeWaitCall {
                substate: Some(sub),
                ..
            } => Some(Mark::TwCall(*sub)),
            Obs::TwReturn { status, after } => Some(Mark::TwReturn {
                status: *status,
                after: *after,
            }),
            Obs::Destroy => Some(Mark::Destroy),
            _ => None,
        }
    }
}

/// One thing the model says a hook will show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pred {
    CloseCall {
        state: TcpState,
    },
    SetState {
        from: TcpState,
        to: TcpState,
    },
    SendFin,
    FinRcvd,
    ActiveResetFn {
        reason: Option<RstReason>,
    },
    SendReset {
        active: bool,
        reason: Option<RstReason>,
    },
    ReceiveReset {
        state: TcpState,
    },
    TimeWaitCall {
        substate: TwSubstate,
        timeo_ms: u64,
    },
    TwSegment {
        substate: TwSubstate,
    },
    TwReturn {
        status: TwStatus,
        after: TwSubstate,
        /// The kernel returns SUCCESS instead when its rate limit bites (the model assumes it
        /// never does).
        rate_limited: bool,
    },
    Destroy,
}

/// A prediction and whether the flow must show it (optional: the hook may miss it, e.g. an
/// inlined tcp_fin).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PredItem {
    pub(crate) pred: Pred,
    pub(crate) required: bool,
}

/// What a step would show through the attached hooks, and what it does that they cannot show.
#[derive(Clone, Debug, Default)]
pub(crate) struct Prediction {
    pub(crate) items: Vec<PredItem>,
    pub(crate) unseen: Vec<String>,
}

/// A successful match: what it verified, and what it could not.
#[derive(Clone, Debug, Default)]
pub(crate) struct MatchNote {
    pub(crate) checked: String,
    pub(crate) unchecked: Option<String>,
}

fn reason_name(reason: Option<RstReason>) -> String {
    reason.map_or_else(String::new, |r| format!(" {r}"))
}

impl Pred {
    pub(super) fn describe(&self) -> String {
        match self {
            Pred::CloseCall { state } => format!("tcp_close in {state}"),
            Pred::SetState { from, to } => format!("{from} → {to}"),
            Pred::SendFin => "FIN queued (tcp_send_fin)".into(),
            Pred::FinRcvd => "peer's FIN processed (tcp_fin)".into(),
            Pred::ActiveResetFn { reason } => {
                format!("tcp_send_active_reset{}", reason_name(*reason))
            }
            Pred::SendReset { active, reason } => format!(
                "{} RST{}",
                if *active { "active" } else { "reply" },
                reason_name(*reason)
            ),
            Pred::ReceiveReset { state } => format!("RST received in {state}"),
            Pred::TimeWaitCall { substate, timeo_ms } => {
                format!("tcp_time_wait({substate}, {timeo_ms} ms)")
            }
            Pred::TwSegment { substate } => format!("segment at TW({substate})"),
            Pred::TwReturn { status, after, .. } => {
                format!("tcp_tw_status {status}, substate {after}")
            }
            Pred::Destroy => "socket destroyed".into(),
        }
    }

    /// Whether `o` shows this prediction, and with what caveat.
    pub(super) fn matches(&self, o: &ObsEv, hz: Option<u64>) -> Option<MatchNote> {
        let ok = |checked: String| {
            Some(MatchNote {
                checked,
                unchecked: None,
            })
        };
        match (self, &o.obs) {
            (Pred::CloseCall { state }, Obs::CloseCall { .. }) => state_agrees(*state, o.state)
                .then(|| MatchNote {
                    checked: self.describe(),
                    unchecked: None,
                }),
            (Pred::SetState { from, to }, Obs::SetState { from: f, to: t }) => {
                (from == f && to == t).then(|| MatchNote {
                    checked: self.describe(),
                    unchecked: None,
                })
            }
            (Pred::SendFin, Obs::SendFin) | (Pred::FinRcvd, Obs::FinRcvd) => ok(self.describe()),
            (Pred::ActiveResetFn { reason }, Obs::ActiveResetFn { reason: seen }) => {
                reason_agrees(*reason, *seen, self.describe())
            }
            (
                Pred::SendReset { active, reason },
                Obs::SendReset {
                    active: seen_active,
                    reason: seen,
                },
            ) if active == seen_active => reason_agrees(*reason, *seen, self.describe()),
            (Pred::ReceiveReset { state }, Obs::ReceiveReset) => state_agrees(*state, o.state)
                .then(|| MatchNote {
                    checked: self.describe(),
                    unchecked: None,
                }),
            (
                Pred::TimeWaitCall { substate, timeo_ms },
                Obs::TimeWaitCall {
                    substate: seen,
                    timeo_jiffies,
                },
            ) => {
                if seen.is_some_and(|s| s != *substate) {
                    return None;
                }
                let mut note = MatchNote {
                    checked: format!("tcp_time_wait({substate})"),
                    unchecked: None,
                };
                match (hz, timeo_jiffies) {
                    (Some(hz), Some(jiffies)) => {
                        let expected =
                            i64::try_from(timeo_ms.saturating_mul(hz) / 1000).unwrap_or(i64::MAX);
                        if (jiffies - expected).abs() > 1 {
                            return None;
                        }
                        note.checked =
                            format!("tcp_time_wait({substate}, timeo {expected} jiffies)");
                    }
                    (None, Some(_)) => {
                        note.unchecked =
                            Some("tcp_time_wait timeo not compared: HZ unknown".into());
                    }
                    (_, None) => {
                        note.unchecked = Some("tcp_time_wait timeo not captured".into());
                    }
                }
                if seen.is_none() {
                    note.unchecked = Some("tcp_time_wait substate not captured".into());
                }
                Some(note)
            }
            (Pred::TwSegment { substate }, Obs::TwSegment { .. }) => {
                if o.tw_substate.is_some_and(|s| s != *substate) {
                    return None;
                }
                ok(self.describe())
            }
            (
                Pred::TwReturn {
                    status,
                    after,
                    rate_limited,
                },
                Obs::TwReturn {
                    status: seen,
                    after: seen_after,
                },
            ) => {
                if seen_after.is_some_and(|s| s != *after) {
                    return None;
                }
                match seen {
                    Some(KTwStatus::Known(s)) if s == status => ok(self.describe()),
                    Some(KTwStatus::Known(TwStatus::Success)) if *rate_limited => Some(MatchNote {
                        checked: format!("substate {after}"),
                        unchecked: Some(format!(
                            "tcp_tw_status SUCCESS where the model says {status}: the kernel's \
                             rate limit held the ACK back (not modelled)"
                        )),
                    }),
                    Some(_) => None,
                    None => Some(MatchNote {
                        checked: format!("substate {after}"),
                        unchecked: Some("tcp_tw_status not captured".into()),
                    }),
                }
            }
            (Pred::Destroy, Obs::Destroy) => ok(self.describe()),
            _ => None,
        }
    }

    /// What the summary line shows for it.
    pub(super) fn mark(&self, vis: &Visibility) -> Option<Mark> {
        match self {
            Pred::SetState { from, to } => Some(Mark::State {
                from: *from,
                to: *to,
            }),
            Pred::SendFin => Some(Mark::Fin),
            Pred::ActiveResetFn { reason } if !vis.has(Hook::TcpSendReset) => Some(Mark::Rst {
                reply: false,
                reason: reason.map(KReason::Known),
            }),
            Pred::SendReset { active, reason } => Some(Mark::Rst {
                reply: !active,
                reason: reason.map(KReason::Known),
            }),
            Pred::ReceiveReset { .. } => Some(Mark::RstIn),
            Pred::TimeWaitCall { substate, .. } => Some(Mark::TwCall(*substate)),
            Pred::TwReturn { status, after, .. } => Some(Mark::TwReturn {
                status: Some(KTwStatus::Known(*status)),
                after: Some(*after),
            }),
            Pred::Destroy => Some(Mark::Destroy),
            _ => None,
        }
    }
}

fn state_agrees(expected: TcpState, seen: Option<TcpState>) -> bool {
    seen.is_none_or(|s| s == expected)
}

fn reason_agrees(
    expected: Option<RstReason>,
    seen: Option<KReason>,
    checked: String,
) -> Option<MatchNote> {
    match (expected, seen) {
        (Some(expected), Some(KReason::Known(seen))) if expected == seen => Some(MatchNote {
            checked,
            unchecked: None,
        }),
        (Some(_), Some(_)) => None,
        (Some(_), None) => Some(MatchNote {
            checked,
            unchecked: Some("RST reason not captured by the hook".into()),
        }),
        (None, _) => Some(MatchNote {
            checked,
            unchecked: Some("RST reason: this kernel names none (before 6.10)".into()),
        }),
    }
}

/// The close() family, as the tcp_close hook sees it.
pub(crate) fn is_close_input(input: Input) -> bool {
    matches!(
        input,
        Input::Close
            | Input::CloseUnread
            | Input::CloseReadQueued
            | Input::CloseLinger0
            | Input::CloseLinger
            | Input::CloseRepair
            | Input::MemoryPressure
            | Input::ListenerCloseWithChildren
    )
}

fn is_shutdown_input(input: Input) -> bool {
    matches!(
        input,
        Input::ShutdownRd | Input::ShutdownWr | Input::ShutdownRdwr
    )
}

/// A full socket exists: the connection's own, or the CLOSE one the application still holds
/// next to a minisocket.
pub(crate) fn holds_full_socket(state: &State) -> bool {
    match state {
        State::Socket(_) => true,
        State::TimeWait(tw) => tw.app_holds_closed_socket,
        State::Freed => false,
    }
}

fn req(pred: Pred) -> PredItem {
    PredItem {
        pred,
        required: true,
    }
}

/// What `step` shows through the hooks in `vis`, and what it does unseen.
pub(crate) fn predict(step: &Step, vis: &Visibility) -> Prediction {
    let o = &step.outcome;
    let input = step.input;
    let mut out = Prediction::default();
    if !o.applicable {
        return out;
    }
    let app_close = is_close_input(input);
    let app_call = app_close || is_shutdown_input(input);
    let from_state = step.from.tcp_state();

    if app_close {
        let state = match &step.from {
            State::Socket(sock) => Some(sock.state),
            State::TimeWait(tw) if tw.app_holds_closed_socket => Some(TcpState::Close),
            _ => None,
        };
        if let Some(state) = state {
            if vis.has(Hook::TcpClose) {
                out.items.push(req(Pred::CloseCall { state }));
            } else {
                out.unseen.push(
                    "close() not visible (tcp_close not attached): close vs shutdown, unread \
                     bytes and SO_LINGER inferred from what followed"
                        .into(),
                );
            }
        }
    }
    if let State::TimeWait(tw) = &step.from
        && o.tw_status.is_some()
    {
        if vis.has(Hook::TcpTimewaitStateProcess) {
            out.items.push(req(Pred::TwSegment {
                substate: tw.substate,
            }));
        } else {
            out.unseen.push(
                "segments at the TIME_WAIT minisocket not visible: tcp_timewait_state_process \
                 not attached"
                    .into(),
            );
        }
    }
    if matches!(input, Input::Fin | Input::FinAck)
        && matches!(step.from, State::Socket(_))
        && o.decided_by == Some(KernelFunction::TcpFin)
        && vis.has(Hook::TcpFin)
    {
        out.items.push(PredItem {
            pred: Pred::FinRcvd,
            required: false,
        });
    }
    let reset_received = matches!(step.from, State::Socket(_))
        && match input {
            Input::RstExact => o.state_changes.iter().any(|c| c.to == TcpState::Close),
            Input::DataAfterClose => {
                o.wire.contains(&Wire::RstReply) && !o.state_changes.is_empty()
            }
            _ => false,
        };
    if reset_received && let Some(state) = from_state {
        if vis.has(Hook::TcpReceiveReset) {
            out.items.push(req(Pred::ReceiveReset { state }));
        } else {
            out.unseen
                .push("received RST not visible: tcp:tcp_receive_reset not attached".into());
        }
    }
    if let Some(call) = o.time_wait {
        if vis.has(Hook::TcpTimeWait) {
            out.items.push(req(Pred::TimeWaitCall {
                substate: call.substate,
                timeo_ms: call.timeo_ms,
            }));
        } else {
            out.unseen.push(format!(
                "entry into TIME_WAIT (tcp_time_wait({}, {} ms)) not visible: tcp_time_wait not \
                 attached",
                call.substate, call.timeo_ms
            ));
        }
    }
    for change in &o.state_changes {
        if vis.has(Hook::InetSockSetState) {
            out.items.push(req(Pred::SetState {
                from: change.from,
                to: change.to,
            }));
        } else {
            out.unseen.push(format!(
                "{change} not visible: sock:inet_sock_set_state not attached"
            ));
        }
    }
    for wire in &o.wire {
        match wire {
            // Only close()/shutdown() call tcp_send_fin(); a FIN that leaves later behind data
            // (ack-of-data) is a transmission, not a call.
            Wire::FinSent | Wire::FinQueued if app_call => {
                if vis.has(Hook::TcpSendFin) {
                    out.items.push(req(Pred::SendFin));
                } else {
                    out.unseen
                        .push("FIN not visible: tcp_send_fin not attached".into());
                }
            }
            Wire::RstActive => {
                let reason = o.rst_reason;
                if vis.has(Hook::TcpSendActiveReset) {
                    out.items.push(req(Pred::ActiveResetFn { reason }));
                }
                if vis.has(Hook::TcpSendReset) {
                    out.items.push(req(Pred::SendReset {
                        active: true,
                        reason,
                    }));
                }
                if !vis.has(Hook::TcpSendActiveReset) && !vis.has(Hook::TcpSendReset) {
                    out.unseen
                        .push("RST not visible: no reset hook attached".into());
                }
            }
            Wire::RstReply
                if vis.has(Hook::TcpSendReset)
                    && !vis.reply_reset_without_full_socket
                    && !matches!(step.from, State::Socket(_)) =>
            {
                out.unseen.push(
                    "reply RST not visible: before 6.10 tcp:tcp_send_reset is not traced for a \
                     TIME_WAIT minisocket or a missing socket"
                        .into(),
                );
            }
            Wire::RstReply => {
                if vis.has(Hook::TcpSendReset) {
                    out.items.push(req(Pred::SendReset {
                        active: false,
                        reason: o.rst_reason,
                    }));
                } else {
                    out.unseen
                        .push("reply RST not visible: tcp:tcp_send_reset not attached".into());
                }
            }
            _ => {}
        }
    }
    if let Some(status) = o.tw_status {
        let after = o
            .next
            .tw_substate()
            .or(step.from.tw_substate())
            .unwrap_or(TwSubstate::TimeWait);
        if vis.has(Hook::TcpTimewaitStateProcessReturn) {
            out.items.push(req(Pred::TwReturn {
                status,
                after,
                rate_limited: matches!(status, TwStatus::Ack | TwStatus::AckOow)
                    && o.rule.contains("rate-limited"),
            }));
        } else {
            out.unseen.push(format!(
                "tcp_tw_status ({status}) not visible: tcp_timewait_state_process:return not \
                 attached"
            ));
        }
    }
    if holds_full_socket(&step.from) && !holds_full_socket(&o.next) {
        if vis.has(Hook::TcpDestroySock) {
            out.items.push(req(Pred::Destroy));
        } else {
            out.unseen
                .push("socket destruction not visible: tcp:tcp_destroy_sock not attached".into());
        }
    }
    out
}

/// One element of a summary line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mark {
    State {
        from: TcpState,
        to: TcpState,
    },
    TwCall(TwSubstate),
    TwReturn {
        status: Option<KTwStatus>,
        after: Option<TwSubstate>,
    },
    Fin,
    Rst {
        reply: bool,
        reason: Option<KReason>,
    },
    RstIn,
    Destroy,
}

/// The label of a model state in summaries: `FIN_WAIT1`, `TW(TIME_WAIT)`, `gone`.
pub(crate) fn state_label(state: &State) -> String {
    match state {
        State::Socket(sock) => sock.state.kernel_name().to_string(),
        State::TimeWait(tw) => format!("TW({})", tw.substate),
        State::Freed => "gone".to_string(),
    }
}

/// `FIN_WAIT1 → FIN_WAIT2 → TW(TIME_WAIT); FIN, tw:ACK`: the states the connection went through
/// (a full socket's CLOSE that tcp_time_wait() caused shows as the minisocket it became), then
/// what it sent. `verbose` also lists received RSTs and destruction (for one step's detail).
pub(crate) fn summarize(start: Option<&str>, marks: &[Mark], verbose: bool) -> String {
    let mut path: Vec<String> = start.map(str::to_string).into_iter().collect();
    let mut tw_now: Option<TwSubstate> = start.and_then(|s| match s {
        "TW(TIME_WAIT)" => Some(TwSubstate::TimeWait),
        "TW(FIN_WAIT2)" => Some(TwSubstate::FinWait2),
        _ => None,
    });
    let mut pending_tw: Option<TwSubstate> = None;
    let mut packets: Vec<String> = Vec::new();
    for mark in marks {
        match mark {
            Mark::State { from, to } => {
                if path.last().map(String::as_str) != Some(from.kernel_name()) {
                    path.push(from.kernel_name().to_string());
                }
                match pending_tw.take() {
                    Some(sub) if *to == TcpState::Close => {
                        path.push(format!("TW({sub})"));
                        tw_now = Some(sub);
                    }
                    other => {
                        pending_tw = other;
                        path.push(to.kernel_name().to_string());
                    }
                }
            }
            Mark::TwCall(sub) => pending_tw = Some(*sub),
            Mark::TwReturn { status, after } => {
                if let Some(status) = status {
                    packets.push(format!("tw:{status}"));
                }
                if let Some(after) = after
                    && tw_now != Some(*after)
                {
                    path.push(format!("TW({after})"));
                    tw_now = Some(*after);
                }
            }
            Mark::Fin => packets.push("FIN".into()),
            Mark::Rst { reply, reason } => packets.push(format!(
                "RST{}{}",
                if *reply { " reply" } else { "" },
                reason
                    .as_ref()
                    .map_or_else(String::new, |r| format!("({r})"))
            )),
            Mark::RstIn if verbose => packets.push("RST received".into()),
            Mark::Destroy if verbose => packets.push("destroyed".into()),
            Mark::RstIn | Mark::Destroy => {}
        }
    }
    if let Some(sub) = pending_tw {
        path.push(format!("TW({sub})"));
    }
    let mut line = path.join(" → ");
    if !packets.is_empty() {
        if !line.is_empty() {
            line.push_str("; ");
        }
        line.push_str(&packets.join(", "));
    }
    if line.is_empty() {
        line.push_str("(nothing)");
    }
    line
}
