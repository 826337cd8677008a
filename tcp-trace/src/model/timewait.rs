//! The TIME_WAIT minisocket: tcp_timewait_state_process() decides, tcp_v4_rcv()'s do_time_wait
//! acts on its verdict, tw_timer_handler() ends it.

use super::input::{RstSeq, TwSegment};
use super::outcome::{KernelFunction, Outcome, RstReason, TimerArmed, TwStatus, Wire};
use super::params::{ModelParams, TCP_TIMEWAIT_LEN_MS};
use super::state::{Sock, State, TimeWaitSock, TwSubstate};

/// What tcp_timewait_state_process() does to the minisocket itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TwEffect {
    /// Nothing (not even the timer).
    Keep,
    /// inet_twsk_reschedule(tw, TCP_TIMEWAIT_LEN).
    Rearm,
    /// inet_twsk_deschedule_put(): the minisocket dies.
    Kill,
    /// FIN_WAIT2 -> TIME_WAIT, timer re-armed to TCP_TIMEWAIT_LEN.
    EnterTimeWait,
}

/// tcp_timewait_state_process(tw, skb, th [, tw_isn] [, drop_reason]).
fn tcp_timewait_state_process(
    substate: TwSubstate,
    segment: TwSegment,
    p: &ModelParams,
) -> (TwStatus, TwEffect, String) {
    use TwEffect::*;
    use TwSegment::*;
    let oow_ack = p.kernel.tw_oow_ack_status();
    let (status, effect, rule): (TwStatus, TwEffect, String) = match (substate, segment) {
        // Substate FIN_WAIT2 "repeats the checks of tcp_rcv_state_process()", window first.
        (TwSubstate::FinWait2, OldFin | Rst(RstSeq::OutOfWindow)) => (
            oow_ack,
            Keep,
            format!(
                "FIN_WAIT2: outside [rcv_nxt, rcv_nxt + rcv_wnd] (checked before the RST test) \
                 -> rate-limited ACK, {oow_ack}"
            ),
        ),
        (TwSubstate::FinWait2, OldSyn) => (
            oow_ack,
            Keep,
            format!(
                "FIN_WAIT2: a SYN before rcv_nxt is outside [rcv_nxt, rcv_nxt + rcv_wnd] -> \
                 rate-limited ACK, {oow_ack}"
            ),
        ),
        (TwSubstate::FinWait2, OldDuplicate | OutOfWindow) => (
            oow_ack,
            Keep,
            format!(
                "FIN_WAIT2: {}, outside [rcv_nxt, rcv_nxt + rcv_wnd] -> rate-limited ACK, \
                 {oow_ack}",
                if segment == OldDuplicate {
                    "an old duplicate"
                } else {
                    "data beyond the window"
                }
            ),
        ),
        (TwSubstate::FinWait2, FinNoAck) => (
            TwStatus::Success,
            Keep,
            "FIN_WAIT2: no ACK flag -> ignored (TCP_TW_SUCCESS), timer untouched".into(),
        ),
        (TwSubstate::FinWait2, Rst(RstSeq::Exact | RstSeq::InWindow)) => (
            TwStatus::Success,
            Kill,
            "FIN_WAIT2: RST in window -> kill, whatever tcp_rfc1337 says".into(),
        ),
        (TwSubstate::FinWait2, Syn) => (
            TwStatus::Rst,
            Keep,
            "FIN_WAIT2: SYN with seq >= rcv_nxt -> TCP_TW_RST".into(),
        ),
        (TwSubstate::FinWait2, BareAck) => (
            TwStatus::Success,
            Keep,
            "FIN_WAIT2: no new sequence space (zero length) -> ignored, timer untouched".into(),
        ),
        (TwSubstate::FinWait2, NewData) => (
            TwStatus::Rst,
            Keep,
            "FIN_WAIT2: new data after the half-duplex close -> TCP_TW_RST".into(),
        ),
        (TwSubstate::FinWait2, NewFin) => (
            TwStatus::Ack,
            EnterTimeWait,
            "FIN_WAIT2: exactly the FIN (end_seq == rcv_nxt + 1) -> substate TIME_WAIT, timer \
             re-armed to 60 s, ACK"
                .into(),
        ),
        // Real TIME_WAIT.
        (TwSubstate::TimeWait, BareAck) => (
            TwStatus::Success,
            Rearm,
            "TIME_WAIT: bare ACK at rcv_nxt -> timer re-armed to 60 s, no reply".into(),
        ),
        (TwSubstate::TimeWait, Rst(RstSeq::Exact)) if !p.tcp_rfc1337 => (
            TwStatus::Success,
            Kill,
            "TIME_WAIT: RST at rcv_nxt with tcp_rfc1337=0 -> TIME_WAIT assassination: killed"
                .into(),
        ),
        (TwSubstate::TimeWait, Rst(RstSeq::Exact)) => {
            let effect = if p.kernel.rfc1337_rst_rearms_tw_timer {
                Rearm
            } else {
                Keep
            };
            (
                TwStatus::Success,
                effect,
                format!(
                    "TIME_WAIT: RST at rcv_nxt with tcp_rfc1337=1 -> ignored ({})",
                    if effect == Rearm {
                        "this kernel still re-arms the timer"
                    } else {
                        "timer not re-armed on 6.x"
                    }
                ),
            )
        }
        (TwSubstate::TimeWait, Syn) => (
            TwStatus::Syn,
            Keep,
            format!(
                "TIME_WAIT: SYN after rcv_nxt -> new incarnation, ISN = tw_snd_nxt + 65537 \
                 (handed over {})",
                if p.kernel.tw_isn_argument {
                    "through *tw_isn"
                } else {
                    "in TCP_SKB_CB(skb)->tcp_tw_isn"
                }
            ),
        ),
        (TwSubstate::TimeWait, OldSyn) => (
            oow_ack,
            Keep,
            format!(
                "TIME_WAIT: SYN not after rcv_nxt and no newer timestamp -> not a new \
                 incarnation (RFC 1122 4.2.2.13); no ACK flag, so the timer is not re-armed; \
                 ACK rate-limited by tcp_invalid_ratelimit (500 ms), {oow_ack}"
            ),
        ),
        (TwSubstate::TimeWait, OldFin) => (
            oow_ack,
            Rearm,
            format!(
                "TIME_WAIT: retransmitted FIN (seq = rcv_nxt - 1) -> timer re-armed to 60 s, \
                 re-ACK rate-limited by tcp_invalid_ratelimit (500 ms), {oow_ack}"
            ),
        ),
        (TwSubstate::TimeWait, OldDuplicate | OutOfWindow) => (
            oow_ack,
            Rearm,
            format!(
                "TIME_WAIT: {}, ACK set -> timer re-armed to 60 s, ACK rate-limited by \
                 tcp_invalid_ratelimit (500 ms; TCP_TW_SUCCESS and nothing sent when limited), \
                 {oow_ack}",
                if segment == OldDuplicate {
                    "an old duplicate (seq before rcv_nxt)"
                } else {
                    "data beyond the window"
                }
            ),
        ),
        (TwSubstate::TimeWait, FinNoAck) => (
            oow_ack,
            Keep,
            format!(
                "TIME_WAIT: not a bare segment at rcv_nxt, no ACK flag -> timer not re-armed, \
                 rate-limited ACK, {oow_ack}"
            ),
        ),
        (TwSubstate::TimeWait, NewFin | NewData) => (
            oow_ack,
            Rearm,
            format!(
                "TIME_WAIT: not a bare segment at rcv_nxt -> timer re-armed to 60 s, \
                 rate-limited ACK, {oow_ack}"
            ),
        ),
        (TwSubstate::TimeWait, Rst(RstSeq::InWindow | RstSeq::OutOfWindow)) => (
            TwStatus::Success,
            Keep,
            "TIME_WAIT: RST not at rcv_nxt -> dropped".into(),
        ),
    };
    (
        status,
        effect,
        format!("tcp_timewait_state_process(): {rule}"),
    )
}

/// A segment at the minisocket, through tcp_v4_rcv()'s do_time_wait switch.
pub(crate) fn tcp_v4_rcv_time_wait(
    tw: &TimeWaitSock,
    segment: TwSegment,
    p: &ModelParams,
) -> Outcome {
    let (status, effect, mut rule) = tcp_timewait_state_process(tw.substate, segment, p);
    let mut substate = tw.substate;
    let mut killed = false;
    let mut timer = None;
    match effect {
        TwEffect::Keep => {}
        TwEffect::Rearm => {
            timer = Some(TimerArmed::TimeWait {
                ms: TCP_TIMEWAIT_LEN_MS,
            })
        }
        TwEffect::Kill => killed = true,
        TwEffect::EnterTimeWait => {
            substate = TwSubstate::TimeWait;
            timer = Some(TimerArmed::TimeWait {
                ms: TCP_TIMEWAIT_LEN_MS,
            });
        }
    }

    let mut wire = Vec::new();
    let mut rst_reason = None;
    match status {
        TwStatus::Success => {}
        TwStatus::Ack | TwStatus::AckOow => {
            wire.push(Wire::AckImmediate);
            rule.push_str("; tcp_v4_timewait_ack() sends it");
        }
        TwStatus::Rst => {
            wire.push(Wire::RstReply);
            rst_reason = p.kernel.reply_reset_reason(RstReason::TcpTimewaitSocket);
            killed = true;
            rule.push_str("; tcp_v4_send_reset(TCP_TIMEWAIT_SOCKET) and the minisocket is killed");
        }
        TwStatus::Syn if p.listener_on_port => {
            killed = true;
            rule.push_str(
                "; a listener owns the port: the minisocket is killed and the listener takes \
                 the SYN (a new connection)",
            );
        }
        TwStatus::Syn => {
            wire.push(Wire::AckImmediate);
            rule.push_str(
                "; no listener on the port: treated as TCP_TW_ACK, tcp_v4_timewait_ack()",
            );
        }
    }

    let next = if killed {
        state_after_minisocket(tw)
    } else {
        State::TimeWait(TimeWaitSock {
            substate,
            app_holds_closed_socket: tw.app_holds_closed_socket,
        })
    };
    Outcome {
        wire,
        rst_reason,
        tw_status: Some(status),
        timer,
        ..Outcome::new(next, KernelFunction::TcpTimewaitStateProcess, rule)
    }
}

/// The minisocket's timer fires: inet_twsk_kill(), nothing on the wire.
pub(crate) fn tw_timer_handler(tw: &TimeWaitSock) -> Outcome {
    Outcome::new(
        state_after_minisocket(tw),
        KernelFunction::TwTimerHandler,
        format!(
            "tw_timer_handler(): {} minisocket expires -> inet_twsk_kill(), silent{}",
            tw.substate,
            if tw.substate == TwSubstate::FinWait2 {
                " (this is the orphan's FIN_WAIT2 timeout)"
            } else {
                ""
            }
        ),
    )
}

/// What is left once the minisocket dies: the application's CLOSE socket if it still holds one.
fn state_after_minisocket(tw: &TimeWaitSock) -> State {
    if tw.app_holds_closed_socket {
        State::Socket(Sock::closed_by_tcp_done())
    } else {
        State::Freed
    }
}
