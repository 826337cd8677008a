//! Which model inputs an observed event can be the first sign of, best guess first.
//!
//! An event rarely names its cause: ESTABLISHED -> FIN_WAIT1 is close() or shutdown(SHUT_WR),
//! FIN_WAIT2 -> CLOSE is the peer's FIN or the orphan's FIN_WAIT2 path, and without the
//! tcp_close hook an application's close() of an already half-closed socket shows nothing at all.
//! So each trigger yields a short list of candidate input sequences (a sequence may start with
//! inputs that leave no trace, such as that unseen close()); the judge keeps the first whose
//! predicted events match what follows.

use crate::decode::{CloseDetails, Hook, KTwStatus, Segment};
use crate::model::{Input, ModelParams, State, TcpState, TwStatus, TwSubstate};

use super::obs::{Obs, ObsEv, Visibility};

/// One way to explain a trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cand {
    pub(crate) inputs: Vec<Input>,
    /// Not the first choice: a path through it ranks lower when nothing fits.
    pub(crate) fallback: bool,
    /// What the events could not tell apart, when this candidate is used.
    pub(crate) note: Option<String>,
    /// The close-type input was not the application's close(), so no tcp_close event goes
    /// with it (a listener's close() disconnecting an un-accepted child).
    pub(crate) silent_close: bool,
}

#[derive(Default)]
struct Cands {
    list: Vec<Cand>,
}

impl Cands {
    fn push(&mut self, inputs: &[Input], note: Option<&str>) {
        if self.list.iter().any(|c| c.inputs == inputs) {
            return;
        }
        let fallback = !self.list.is_empty();
        self.list.push(Cand {
            inputs: inputs.to_vec(),
            fallback,
            note: note.map(str::to_string),
            silent_close: false,
        });
    }

    /// `inputs` standing for a tcp_disconnect() that no close() of this socket caused.
    fn push_silent(&mut self, inputs: &[Input], note: &str) {
        let fallback = !self.list.is_empty();
        self.list.push(Cand {
            inputs: inputs.to_vec(),
            fallback,
            note: Some(note.to_string()),
            silent_close: true,
        });
    }
}

const CLOSE_OR_SHUTDOWN: &str =
    "close() or shutdown(SHUT_WR): not distinguishable without the tcp_close hook";
const UNSEEN_CLOSE: &str =
    "an earlier close() of the half-closed socket left no event (tcp_close not attached)";
const TIMED_OUT: &str = "the timeout itself leaves no event (retransmissions and probes are not \
     traced): inferred from CLOSE with no RST and no close(); the TCPAbortOnTimeout counter \
     (`tcp-trace resets`) confirms it";
const NO_CLOSE_DETAILS: &str = "tcp_close details (unread, SO_LINGER) not captured";
const LISTENER_CHILD: &str = "an un-accepted child reset by its listener's close() \
     (inet_csk_listen_stop() -> tcp_disconnect(), like close() with SO_LINGER 0)";

const TWIN_CHILD: &str = "a child that lost its handshake to a twin on another CPU (the \
     kernel destroys it at once; seen under qemu when a SYN or ACK is retransmitted)";
const DISCONNECT: &str = "connect(AF_UNSPEC) (tcp_disconnect() without close()): told from an \
     abortive close() by the socket outliving it";

/// Candidates for `trigger` when the model is in `state`.
pub(crate) fn candidates(
    trigger: &ObsEv,
    state: &State,
    params: &ModelParams,
    vis: &Visibility,
) -> Vec<Cand> {
    use Input::*;
    let mut c = Cands::default();
    let sock = match state {
        State::Socket(sock) => Some(sock),
        _ => None,
    };
    // The application holds the socket and could call close() without an event showing it.
    let app_may_close = !vis.has(Hook::TcpClose) && sock.is_some_and(|s| !s.orphan);
    // ... and such a close() would leave no event at all (the FIN is already out).
    let hidden_close = app_may_close
        && sock.is_some_and(|s| {
            matches!(
                s.state,
                TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing | TcpState::LastAck
            )
        });
    let unseen = Some(UNSEEN_CLOSE);

    match &trigger.obs {
        Obs::CloseCall { details } => close_call(&mut c, state, details.as_ref(), params),
        Obs::SetState { from, to } => set_state(
            &mut c,
            state,
            *from,
            *to,
            params,
            app_may_close,
            hidden_close,
        ),
        Obs::SendFin => {
            if app_may_close {
                c.push(&[Close], Some(CLOSE_OR_SHUTDOWN));
            }
            c.push(&[ShutdownWr], None);
        }
        Obs::FinRcvd => {
            c.push(&[Fin], None);
            c.push(&[FinAck], None);
            if hidden_close {
                c.push(&[Close, Fin], unseen);
                c.push(&[Close, FinAck], unseen);
            }
        }
        Obs::ReceiveReset => {
            c.push(&[RstExact], None);
            c.push(&[DataAfterClose], None);
            if hidden_close {
                c.push(&[Close, RstExact], unseen);
                c.push(&[Close, DataAfterClose], unseen);
            }
        }
        Obs::ActiveResetFn { .. } | Obs::SendReset { active: true, .. } => {
            c.push(&[FinWait2Timeout], None);
            if sock.is_some_and(|s| {
                s.orphan
                    && matches!(
                        s.state,
                        TcpState::FinWait1 | TcpState::Closing | TcpState::LastAck
                    )
            }) {
                c.push(&[OrphanOutOfResources], None);
            }
            if app_may_close {
                aborts(&mut c, params);
            }
            if hidden_close {
                c.push(&[Close, FinWait2Timeout], unseen);
            }
        }
        Obs::SendReset { active: false, .. } => match state {
            State::Socket(_) => {
                c.push(&[DataAfterClose], None);
                c.push(&[AckOfFin], None);
                if hidden_close {
                    c.push(&[Close, DataAfterClose], unseen);
                    c.push(&[Close, AckOfFin], unseen);
                }
            }
            State::TimeWait(_) => {
                c.push(&[TwData], None);
                c.push(&[TwSyn], None);
            }
            State::Freed => c.push(
                &[DataAfterClose],
                Some("a segment for a connection already gone (which segment is not visible)"),
            ),
        },
        Obs::TimeWaitCall { substate, .. } => {
            // Which call reached tcp_time_wait() depends on where the socket is.
            let to_fin_wait2 = *substate == Some(TwSubstate::FinWait2);
            let order: Vec<&[Input]> = match sock.map(|s| s.state) {
                Some(TcpState::Closing) => vec![&[AckOfFin], &[FinAck]],
                Some(TcpState::FinWait1) if to_fin_wait2 => vec![&[AckOfFin], &[FinAck]],
                Some(TcpState::FinWait1) => vec![&[FinAck], &[AckOfFin], &[Fin]],
                Some(TcpState::FinWait2) if to_fin_wait2 => vec![&[FinWait2Timeout]],
                Some(TcpState::FinWait2) => vec![&[Fin], &[FinAck], &[FinWait2Timeout]],
                _ => vec![&[Fin], &[FinAck], &[AckOfFin], &[FinWait2Timeout]],
            };
            for inputs in order {
                c.push(inputs, None);
            }
            if app_may_close {
                c.push(&[Close], Some(CLOSE_OR_SHUTDOWN));
            }
            if hidden_close {
                c.push(&[Close, Fin], unseen);
                c.push(&[Close, AckOfFin], unseen);
                c.push(&[Close, FinWait2Timeout], unseen);
            }
        }
        Obs::TwSegment { segment } => match segment {
            Some(segment) => {
                for input in classify_tw_segment(segment) {
                    c.push(&[input], None);
                }
            }
            None => tw_any(&mut c, "the segment's flags and sequence were not captured"),
        },
        Obs::TwReturn { status, .. } => {
            let note = Some(
                "the segment itself not visible (tcp_timewait_state_process entry not seen): \
                 input inferred from tcp_tw_status",
            );
            let inputs: &[Input] = match status.and_then(KTwStatus::known) {
                Some(TwStatus::Syn) => &[TwSyn],
                Some(TwStatus::Rst) => &[TwData, TwSyn],
                Some(TwStatus::Ack | TwStatus::AckOow) => {
                    &[TwFin, TwFinRetransmit, TwData, TwSyn, TwSynOld]
                }
                Some(TwStatus::Success) => &[TwAck, TwRst, RstInWindow, TwFinRetransmit, TwData],
                None => TW_SEGMENT_INPUTS,
            };
            for input in inputs {
                c.push(&[*input], note);
            }
        }
        Obs::Destroy => {
            let app_holds_close = match state {
                State::Socket(sock) => sock.state == TcpState::Close && !sock.orphan,
                State::TimeWait(tw) => tw.app_holds_closed_socket,
                State::Freed => false,
            };
            if app_holds_close || app_may_close {
                c.push(&[Close], None);
            }
        }
        Obs::Unknown(_) => {}
    }
    c.list
}

/// close() as the tcp_close hook saw it.
fn close_call(c: &mut Cands, state: &State, details: Option<&CloseDetails>, p: &ModelParams) {
    use Input::*;
    let sock = match state {
        State::Socket(sock) => sock,
        State::TimeWait(tw) if tw.app_holds_closed_socket => {
            c.push(&[Close], None);
            return;
        }
        _ => return,
    };
    if sock.state == TcpState::Close {
        c.push(&[Close], None);
        return;
    }
    if sock.state == TcpState::Listen {
        c.push(&[Close], None);
        c.push(&[ListenerCloseWithChildren], None);
        return;
    }
    let Some(d) = details else {
        for input in [
            Close,
            CloseUnread,
            CloseLinger0,
            CloseLinger,
            MemoryPressure,
        ] {
            c.push(&[input], Some(NO_CLOSE_DETAILS));
        }
        return;
    };
    // Bytes written but not sent: the FIN queues behind them (an unseen write()).
    let can_write = matches!(
        sock.state,
        TcpState::Established | TcpState::CloseWait | TcpState::SynRecv
    );
    let with_unsent = |input: Input| -> Vec<Input> {
        if d.unsent > 0 && can_write {
            vec![Write, input]
        } else {
            vec![input]
        }
    };
    if d.unread > 0 {
        // Received bytes cannot disappear while the application is inside close().
        c.push(&[CloseUnread], None);
        return;
    }
    let primary = match (d.linger, d.linger_jiffies) {
        (true, 0) => CloseLinger0,
        (true, _) => CloseLinger,
        (false, _) => Close,
    };
    c.push(&with_unsent(primary), None);
    if d.unsent > 0 && can_write {
        c.push(&[primary], None);
    }
    if !p.kernel.close_unread_fix && primary != CloseLinger0 {
        c.push(
            &[CloseReadQueued],
            Some("the receive queue still held already-read skbs, which kernels before the 6.18 fix count as unread"),
        );
    }
    c.push(
        &[CloseUnread],
        Some("unread was 0 at tcp_close entry: data arrived before close() took the socket lock"),
    );
    c.push(&with_unsent(MemoryPressure), None);
}

/// A state change seen first.
fn set_state(
    c: &mut Cands,
    state: &State,
    from: TcpState,
    to: TcpState,
    p: &ModelParams,
    app_may_close: bool,
    hidden_close: bool,
) {
    use Input::*;
    use TcpState::{
        CloseWait, Closing, Established, FinWait1, FinWait2, LastAck, Listen, SynRecv, SynSent,
    };
    const CLOSED: TcpState = TcpState::Close;
    let sock = match state {
        State::Socket(sock) => Some(sock),
        _ => None,
    };
    let orphan = sock.is_some_and(|s| s.orphan);
    let unsent = sock.is_some_and(|s| s.unsent);
    let unseen = Some(UNSEEN_CLOSE);
    match (from, to) {
        (Established | SynRecv, FinWait1) | (CloseWait, LastAck) => {
            if app_may_close {
                c.push(&[Close], Some(CLOSE_OR_SHUTDOWN));
                c.push(&[ShutdownWr], Some(CLOSE_OR_SHUTDOWN));
                // close() sent its FIN, then tcp_check_oom() reset the orphan at once.
                c.push(
                    &[MemoryPressure],
                    Some("close() not visible (tcp_close not attached): its FIN then a RST"),
                );
            } else {
                c.push(&[ShutdownWr], None);
            }
        }
        (Established | SynRecv, CloseWait) => {
            c.push(&[Fin], None);
            c.push(&[FinAck], None);
        }
        (FinWait1, FinWait2) => {
            if unsent {
                c.push(&[AckOfData, AckOfFin], None);
            }
            c.push(&[AckOfFin], None);
            c.push(&[FinAck], None);
            if orphan {
                c.push(&[DataAckingFin], None);
            }
            if hidden_close {
                c.push(&[Close, AckOfFin], unseen);
                c.push(&[Close, FinAck], unseen);
            }
        }
        (FinWait1, Closing) => {
            c.push(&[Fin], None);
            if hidden_close {
                c.push(&[Close, Fin], unseen);
            }
        }
        (FinWait2, CLOSED) => {
            c.push(&[Fin], None);
            c.push(&[FinAck], None);
            c.push(&[FinWait2Timeout], None);
            if app_may_close {
                c.push(&[Close], Some(CLOSE_OR_SHUTDOWN));
            }
            if hidden_close {
                c.push(&[Close, Fin], unseen);
                c.push(&[Close, FinWait2Timeout], unseen);
            }
        }
        (Closing | LastAck, CLOSED) => {
            c.push(&[AckOfFin], None);
            c.push(&[FinAck], None);
            if orphan {
                c.push(&[OrphanRetriesExhausted], None);
                c.push(&[OrphanOutOfResources], None);
            }
            if hidden_close {
                c.push(&[Close, AckOfFin], unseen);
                c.push(&[Close, OrphanRetriesExhausted], unseen);
            }
        }
        (FinWait1, CLOSED) => {
            if orphan {
                c.push(&[OrphanRetriesExhausted], None);
                c.push(&[OrphanOutOfResources], None);
            }
            if hidden_close {
                c.push(&[Close, OrphanRetriesExhausted], unseen);
            }
        }
        (SynSent, CLOSED) => {
            if app_may_close {
                c.push(&[Close], Some(CLOSE_OR_SHUTDOWN));
            }
            c.push(&[ConnectionTimeout], Some(TIMED_OUT));
            c.push(
                &[ShutdownWr],
                Some("connect() ended without a connection: the model knows only close()/shutdown() here"),
            );
        }
        (Listen, CLOSED) => {
            if app_may_close {
                c.push(&[Close], None);
                c.push(&[ListenerCloseWithChildren], None);
            }
            c.push(&[ShutdownRd], None);
        }
        _ => {}
    }
    if to == CLOSED && from != Listen && app_may_close {
        aborts(c, p);
    }
    // A socket the application holds timed out (tcp_write_err()): CLOSE with no RST, from any
    // state with something to retransmit or probe. (An orphan's give-up is above.)
    if to == CLOSED
        && matches!(
            from,
            Established | SynRecv | CloseWait | FinWait1 | FinWait2 | Closing | LastAck
        )
        && sock.is_some_and(|s| !s.orphan)
    {
        c.push(&[ConnectionTimeout], Some(TIMED_OUT));
    }
    // (A TCP Fast Open child sits in the accept queue while still SYN_RECV.)
    if to == CLOSED
        && matches!(from, Established | CloseWait | SynRecv)
        && !app_may_close
        && sock.is_some_and(|s| !s.orphan)
    {
        c.push_silent(&[CloseLinger0], LISTENER_CHILD);
    }
    if from == SynRecv && to == CLOSED && sock.is_some_and(|s| !s.orphan) {
        c.push(&[ChildLostRace], Some(TWIN_CHILD));
    }
    // connect(AF_UNSPEC): tcp_disconnect() with no close(), so the socket is not destroyed
    // after it (the application keeps it, and may connect() again).
    if to == CLOSED && from != Listen && sock.is_some_and(|s| !s.orphan) {
        c.push(&[Disconnect], Some(DISCONNECT));
    }
}

/// An abortive close() the tcp_close hook did not see: told apart only by the RST's reason.
fn aborts(c: &mut Cands, p: &ModelParams) {
    use Input::*;
    let note = if p.kernel.active_reset_reasons {
        "close() not visible (tcp_close not attached): unread data, SO_LINGER 0 (or a \
         listener's close() resetting an un-accepted child) and memory pressure told apart by \
         the RST reason"
    } else {
        "close() not visible (tcp_close not attached): unread data, SO_LINGER 0 (or a \
         listener's close() resetting an un-accepted child) and memory pressure not \
         distinguishable on this kernel (its active resets name no reason)"
    };
    c.push(&[CloseUnread], Some(note));
    c.push(&[CloseLinger0], Some(note));
    if !p.kernel.close_unread_fix {
        c.push(&[CloseReadQueued], Some(note));
    }
    c.push(&[MemoryPressure], Some(note));
}

/// Every segment input at a minisocket.
const TW_SEGMENT_INPUTS: &[Input] = &[
    Input::TwAck,
    Input::TwFin,
    Input::TwFinRetransmit,
    Input::TwRst,
    Input::TwData,
    Input::TwSyn,
    Input::TwSynOld,
];

/// Every segment input at a minisocket, for a segment nobody saw.
fn tw_any(c: &mut Cands, note: &str) {
    for input in TW_SEGMENT_INPUTS {
        c.push(&[*input], Some(note));
    }
}

/// The segment at a minisocket, by its flags and where its sequence falls against tw_rcv_nxt.
pub(crate) fn classify_tw_segment(seg: &Segment) -> Vec<Input> {
    use Input::*;
    let has = |flag: char| seg.flags.contains(flag);
    let at = seg.seq == seg.tw_rcv_nxt;
    if has('R') {
        return if at {
            vec![TwRst]
        } else {
            vec![RstInWindow, RstOutOfWindow]
        };
    }
    if has('S') {
        // A new incarnation needs seq after rcv_nxt, or a newer timestamp (not captured).
        let after = (seg.seq.wrapping_sub(seg.tw_rcv_nxt) as i32) > 0;
        return if has('.') {
            vec![TwFinRetransmit, TwSyn]
        } else if after {
            vec![TwSyn]
        } else {
            vec![TwSynOld, TwSyn]
        };
    }
    if has('F') && !has('.') {
        return vec![FinWithoutAck];
    }
    if has('F') {
        let end = seg.seq.wrapping_add(seg.len).wrapping_add(1);
        return if end == seg.tw_rcv_nxt {
            vec![TwFinRetransmit]
        } else if at && seg.len == 0 {
            vec![TwFin]
        } else if at {
            vec![TwData]
        } else {
            vec![TwFinRetransmit, TwData]
        };
    }
    if seg.len > 0 {
        return if at {
            vec![TwData]
        } else {
            vec![TwOldDuplicate, TwFinRetransmit]
        };
    }
    if at {
        vec![TwAck]
    } else {
        vec![TwAck, TwFinRetransmit, TwOldDuplicate]
    }
}
