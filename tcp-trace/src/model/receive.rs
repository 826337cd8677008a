//! The peer's segments at a full socket: tcp_validate_incoming() for RSTs, the closing-state ACK
//! rules of tcp_rcv_state_process(), tcp_fin(), step 7 (segment text) of tcp_rcv_state_process(),
//! and tcp_v4_rcv() when no socket is left.

use super::effects::Ctx;
use super::input::RstSeq;
use super::outcome::{Errno, KernelFunction, Outcome, RstReason, TcpExtCounter, Wire};
use super::params::{ModelParams, TCP_TIMEWAIT_LEN_MS};
use super::state::{ReceiveQueue, Sock, State, TcpState, TwSubstate};

/// A RST, by where its sequence number falls (RFC 5961 as tcp_validate_incoming() applies it).
pub(crate) fn tcp_validate_incoming_rst(sock: &Sock, rst: RstSeq, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpValidateIncoming);
    match (sock.state, rst) {
        (SynSent, RstSeq::Exact) => {
            // (Not in the teardown doc.) SYN_SENT judges a RST by its ACK field; the model reads
            // "exact" as the RST that ACKs our SYN, i.e. a refused connect().
            cx.decided_by(KernelFunction::TcpRcvSynsentStateProcess);
            cx.error(Errno::Econnrefused);
            cx.tcp_done();
            cx.rule(
                "tcp_rcv_synsent_state_process(): RST acking our SYN -> tcp_reset(): \
                 ECONNREFUSED, CLOSE; nothing sent",
            );
        }
        (SynSent, RstSeq::InWindow | RstSeq::OutOfWindow) => {
            cx.decided_by(KernelFunction::TcpRcvSynsentStateProcess);
            cx.rule("tcp_rcv_synsent_state_process(): a RST not acking our SYN is dropped");
        }
        (Listen, _) => {
            cx.decided_by(KernelFunction::TcpRcvStateProcess);
            cx.rule("tcp_rcv_state_process(): LISTEN drops RSTs");
        }
        (state, RstSeq::Exact) if state.is_synchronized() => {
            // tcp_reset(): the error the application sees depends on how far it got.
            let errno = if state == CloseWait {
                Errno::Epipe
            } else {
                Errno::Econnreset
            };
            cx.error(errno);
            cx.tcp_done();
            cx.rule(format!(
                "tcp_validate_incoming(): RST at rcv_nxt -> tcp_reset() (tcp:tcp_receive_reset \
                 fires): CLOSE, sk_err = {errno}, write queue purged, nothing sent{}",
                if sock.orphan {
                    "; orphan destroyed"
                } else {
                    ""
                }
            ));
        }
        (state, RstSeq::InWindow) if state.is_synchronized() => {
            cx.send(Wire::ChallengeAck);
            cx.count(TcpExtCounter::TcpChallengeAck);
            cx.rule(
                "tcp_validate_incoming(): RST in window but not at rcv_nxt -> challenge ACK \
                 (RFC 5961, rate-limited), state unchanged",
            );
        }
        (state, RstSeq::OutOfWindow) if state.is_synchronized() => {
            cx.rule("tcp_validate_incoming(): RST outside the window is dropped silently");
        }
        (state, _) => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!("no RST handling for a full socket in {state}"),
            );
        }
    }
    cx.finish()
}

/// A segment with neither ACK nor RST nor SYN (here: a FIN without ACK). tcp_rcv_state_process()
/// drops it right after its per-state prologue, before tcp_validate_incoming() and before the
/// FIN is looked at (`!th->ack && !th->rst && !th->syn` -> SKB_DROP_REASON_TCP_FLAGS);
/// tcp_rcv_established()'s slow path has the same check for ESTABLISHED, LISTEN ignores it, and
/// tcp_rcv_synsent_state_process() discards it.
pub(crate) fn tcp_rcv_state_process_no_ack(sock: &Sock, p: &ModelParams) -> Outcome {
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpRcvStateProcess);
    match sock.state {
        TcpState::Close | TcpState::TimeWait | TcpState::NewSynRecv => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!("no full socket takes segments in {}", sock.state),
            );
        }
        TcpState::SynSent => {
            cx.decided_by(KernelFunction::TcpRcvSynsentStateProcess);
            cx.rule("tcp_rcv_synsent_state_process(): neither ACK, RST nor SYN -> discarded");
        }
        state => cx.rule(format!(
            "tcp_rcv_state_process(): {state}: no ACK flag (nor RST, SYN) -> discarded before \
             tcp_validate_incoming() and tcp_fin(): no state change, nothing sent"
        )),
    }
    cx.finish()
}

/// Data starting beyond rcv_nxt + the receive window: tcp_validate_incoming()'s tcp_sequence()
/// check fails before the ACK, the FIN or the text is looked at, so the segment is dropped with
/// a duplicate ACK (tcp_send_dupack; rate-limited by tcp_invalid_ratelimit, TCPACKSkippedSeq
/// when it is). An orphan's RCV_SHUTDOWN reset (step 7) never sees it: only in-window data
/// resets an orphan.
pub(crate) fn tcp_validate_incoming_out_of_window(sock: &Sock, p: &ModelParams) -> Outcome {
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpValidateIncoming);
    match sock.state {
        state if state.is_synchronized() => {
            cx.send(Wire::AckImmediate);
            cx.rule(format!(
                "tcp_validate_incoming(): {state}: the segment lies beyond rcv_nxt + rcv_wnd \
                 (tcp_sequence) -> tcp_send_dupack (rate-limited), dropped: no state change{}",
                if sock.orphan {
                    ", and no RST even for an orphan (its reset is for in-window data)"
                } else {
                    ""
                }
            ));
        }
        state => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!("no window to be outside of in {state} (not a synchronized state)"),
            );
        }
    }
    cx.finish()
}

/// The ACK of our FIN: tcp_rcv_state_process()'s FIN_WAIT1, CLOSING and LAST_ACK cases
/// (snd_una == write_seq). `fin_follows`: the same segment carries the peer's FIN, which matters
/// to the orphan FIN_WAIT1 rule.
pub(crate) fn tcp_rcv_state_process_ack_of_fin(
    sock: &Sock,
    p: &ModelParams,
    fin_follows: bool,
) -> Outcome {
    use TcpState::*;
    let here = State::Socket(sock.clone());
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpRcvStateProcess);
    match sock.state {
        FinWait1 | Closing | LastAck if sock.unsent => {
            return Outcome::not_applicable(
                &here,
                "our FIN is still queued behind unsent data, so the peer cannot ACK it yet (see \
                 ack-of-data)",
            );
        }
        FinWait1 => {
            cx.set_state(FinWait2);
            if !sock.orphan {
                // A socket the application holds has no FIN_WAIT2 timer.
                cx.rule(
                    "tcp_rcv_state_process(): FIN_WAIT1, our FIN ACKed -> FIN_WAIT2; not \
                     orphaned: wakes a lingering close(), no timer (waits for the peer's FIN \
                     forever)",
                );
            } else if p.tcp_linger2_secs < 0 {
                cx.tcp_done();
                cx.count(TcpExtCounter::TcpAbortOnData);
                cx.reply_reset(RstReason::TcpAbortOnData);
                cx.rule(
                    "tcp_rcv_state_process(): orphan FIN_WAIT1, our FIN ACKed, TCP_LINGER2 < 0 \
                     -> tcp_done() + reply RST, TCPAbortOnData",
                );
            } else {
                let tmo = p.fin_time_ms();
                if tmo > TCP_TIMEWAIT_LEN_MS {
                    cx.arm_fin_wait2_keepalive(tmo - TCP_TIMEWAIT_LEN_MS);
                    cx.rule(format!(
                        "tcp_rcv_state_process(): orphan FIN_WAIT1 -> FIN_WAIT2, tcp_fin_time \
                         {tmo} ms > 60 s -> keepalive timer {} ms, stays a full socket",
                        tmo - TCP_TIMEWAIT_LEN_MS
                    ));
                } else if fin_follows {
                    // "Bad case": the FIN in this segment still has to be processed by the full
                    // socket, so no minisocket yet.
                    cx.arm_fin_wait2_keepalive(tmo);
                    cx.rule(format!(
                        "tcp_rcv_state_process(): orphan FIN_WAIT1 -> FIN_WAIT2; the segment \
                         carries a FIN, so keepalive timer {tmo} ms instead of tcp_time_wait()"
                    ));
                } else {
                    cx.tcp_time_wait(TwSubstate::FinWait2, tmo);
                    cx.rule(format!(
                        "tcp_rcv_state_process(): orphan FIN_WAIT1 -> FIN_WAIT2 -> \
                         tcp_time_wait(FIN_WAIT2, {tmo} ms)"
                    ));
                }
            }
        }
        Closing => {
            cx.tcp_time_wait(TwSubstate::TimeWait, 0);
            cx.rule(
                "tcp_rcv_state_process(): CLOSING, our FIN ACKed -> tcp_time_wait(TIME_WAIT, 0)",
            );
        }
        LastAck => {
            cx.tcp_done();
            cx.rule(format!(
                "tcp_rcv_state_process(): LAST_ACK, our FIN ACKed -> tcp_done(): CLOSE{}",
                if sock.orphan {
                    ", orphan destroyed"
                } else {
                    "; the application still holds the socket"
                }
            ));
        }
        FinWait2 => {
            cx.rule("tcp_rcv_state_process(): FIN_WAIT2: our FIN is already ACKed, a duplicate ACK changes nothing");
        }
        Established | SynSent | SynRecv | CloseWait | Listen | Close | TimeWait | NewSynRecv => {
            return Outcome::not_applicable(
                &here,
                format!("{}: we have sent no FIN to ACK", sock.state),
            );
        }
    }
    cx.finish()
}

/// tcp_fin(): the peer's FIN, in order.
pub(crate) fn tcp_fin(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpFin);
    match sock.state {
        Established | SynRecv => {
            cx.sk.rcv_shutdown = true;
            cx.set_state(CloseWait);
            cx.send(Wire::AckDelayed);
            cx.rule(format!(
                "tcp_fin(): {} -> CLOSE_WAIT, RCV_SHUTDOWN; ACK scheduled (pingpong mode: may \
                 be delayed)",
                sock.state
            ));
        }
        FinWait1 => {
            cx.sk.rcv_shutdown = true;
            cx.send(Wire::AckImmediate);
            cx.set_state(Closing);
            cx.rule(
                "tcp_fin(): FIN_WAIT1, FIN not acking ours (simultaneous close) -> tcp_send_ack() \
                 + CLOSING",
            );
        }
        FinWait2 => {
            cx.sk.rcv_shutdown = true;
            cx.send(Wire::AckImmediate);
            cx.tcp_time_wait(TwSubstate::TimeWait, 0);
            cx.rule(
                "tcp_fin(): FIN_WAIT2 -> tcp_send_ack() + tcp_time_wait(TIME_WAIT, 0): 60 s \
                 minisocket; the full socket goes to CLOSE",
            );
        }
        CloseWait | Closing | LastAck => {
            // The peer's FIN already arrived, so this one ends at or before rcv_nxt.
            cx.decided_by(KernelFunction::TcpDataQueue);
            cx.send(Wire::AckImmediate);
            cx.count(TcpExtCounter::DelayedAckLost);
            cx.rule(format!(
                "tcp_data_queue(): {}: a retransmitted FIN (end_seq <= rcv_nxt) -> immediate \
                 duplicate ACK with D-SACK, DelayedACKLost; state unchanged",
                sock.state
            ));
        }
        SynSent => {
            cx.decided_by(KernelFunction::TcpRcvSynsentStateProcess);
            cx.rule("tcp_rcv_synsent_state_process(): a FIN without SYN-ACK is dropped");
        }
        Listen | Close | TimeWait | NewSynRecv => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!("tcp_fin() never runs in {}", sock.state),
            );
        }
    }
    cx.finish()
}

/// A FIN that also ACKs our FIN: tcp_rcv_state_process() takes the ACK first (step 5), then the
/// FIN reaches tcp_fin() (step 7) if the socket is still there.
pub(crate) fn tcp_fin_ack(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let our_fin_on_the_wire = matches!(sock.state, FinWait1 | Closing | LastAck) && !sock.unsent;
    if !our_fin_on_the_wire {
        let mut outcome = tcp_fin(sock, p);
        if outcome.applicable {
            outcome.rule = format!(
                "no FIN of ours on the wire to ACK, so only the FIN counts: {}",
                outcome.rule
            );
        }
        return outcome;
    }
    let ack = tcp_rcv_state_process_ack_of_fin(sock, p, true);
    match &ack.next {
        State::Socket(after_ack) if after_ack.state == FinWait2 => {
            let fin = tcp_fin(after_ack, p);
            ack.then(fin)
        }
        // CLOSING went to TIME_WAIT and LAST_ACK to CLOSE on the ACK: the (retransmitted) FIN is
        // consumed with the segment. A TCP_LINGER2 < 0 abort never gets to the FIN either.
        _ => ack,
    }
}

/// Step 7 of tcp_rcv_state_process(): new data beyond rcv_nxt.
pub(crate) fn tcp_rcv_state_process_data(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpRcvStateProcess);
    match sock.state {
        FinWait1 | FinWait2 if sock.rcv_shutdown => {
            // RFC 1122 says reset (RFC 793 said queue); so do BSD and Linux.
            cx.count(TcpExtCounter::TcpAbortOnData);
            cx.error(Errno::Econnreset);
            cx.tcp_done();
            cx.reply_reset(RstReason::TcpAbortOnData);
            cx.rule(format!(
                "tcp_rcv_state_process(): {} with RCV_SHUTDOWN and new data -> TCPAbortOnData, \
                 tcp_reset() (tcp:tcp_receive_reset fires although we reset), reply RST{}",
                sock.state,
                if sock.orphan {
                    "; orphan destroyed"
                } else {
                    ""
                }
            ));
        }
        Established | SynRecv | FinWait1 | FinWait2 => {
            cx.decided_by(KernelFunction::TcpDataQueue);
            cx.sk.receive_queue = ReceiveQueue::Unread;
            cx.send(Wire::AckDelayed);
            cx.rule(format!(
                "tcp_data_queue(): {}: data queued for the application (unread), ACK scheduled",
                sock.state
            ));
        }
        CloseWait | Closing | LastAck => {
            cx.rule(format!(
                "tcp_rcv_state_process(): {}: the peer's FIN came first, data at or beyond \
                 rcv_nxt is dropped",
                sock.state
            ));
        }
        Listen => {
            // The segment's own socket is gone (reset, destroyed) and the lookup found the
            // listener on its port: every segment after the handshake carries ACK.
            cx.reply_reset(RstReason::TcpFlags);
            cx.rule(
                "tcp_rcv_state_process(): LISTEN: a segment with ACK (its connection's socket is \
                 gone; the lookup found the listener) -> reply RST (reason TCP_FLAGS), still \
                 LISTEN",
            );
        }
        SynSent | Close | TimeWait | NewSynRecv => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!("no connection to carry data in {}", sock.state),
            );
        }
    }
    cx.finish()
}

/// A segment that ACKs our FIN and carries new data: the peer wrote before it read our FIN (a
/// keep-alive client sending its next request as the server closes the idle connection). In
/// tcp_rcv_state_process()'s FIN_WAIT1 case an orphan moves to FIN_WAIT2 and then, the
/// segment ending after rcv_nxt ("out of order FIN after close()"), tcp_done(),
/// TCPAbortOnData and a reply RST from tcp_v4_do_rcv(); no tcp_reset(), so no
/// tcp:tcp_receive_reset. (TCP_LINGER2 < 0 gives the same events before the data is looked at.)
pub(crate) fn tcp_rcv_state_process_data_acking_fin(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let here = State::Socket(sock.clone());
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpRcvStateProcess);
    match sock.state {
        FinWait1 if sock.unsent => {
            return Outcome::not_applicable(
                &here,
                "our FIN is still queued behind unsent data, so the peer cannot ACK it yet",
            );
        }
        FinWait1 if sock.orphan => {
            cx.set_state(FinWait2);
            cx.tcp_done();
            cx.count(TcpExtCounter::TcpAbortOnData);
            cx.reply_reset(RstReason::TcpAbortOnData);
            cx.rule(if p.tcp_linger2_secs < 0 {
                "tcp_rcv_state_process(): orphan FIN_WAIT1, our FIN ACKed -> FIN_WAIT2; \
                 TCP_LINGER2 < 0 -> tcp_done() + reply RST, TCPAbortOnData (the data not \
                 looked at)"
            } else {
                "tcp_rcv_state_process(): orphan FIN_WAIT1, our FIN ACKed -> FIN_WAIT2; the \
                 segment ends after rcv_nxt (new data after close()) -> tcp_done() + reply RST, \
                 TCPAbortOnData; no tcp_reset()"
            });
        }
        FinWait1 => {
            return Outcome::not_applicable(
                &here,
                "not orphaned: the ACK moves it to FIN_WAIT2 and the data is queued (ack-of-fin, \
                 then data-after-close)",
            );
        }
        Established | SynSent | SynRecv | FinWait2 | CloseWait | Closing | LastAck | Listen
        | Close | TimeWait | NewSynRecv => {
            return Outcome::not_applicable(
                &here,
                format!(
                    "no FIN of ours awaits its ACK in {}{}",
                    sock.state,
                    if sock.state == FinWait2 {
                        " (see data-after-close)"
                    } else {
                        ""
                    }
                ),
            );
        }
    }
    cx.finish()
}

/// tcp_ack() with unsent data: the peer opens its window, tcp_data_snd_check() sends the tail.
pub(crate) fn tcp_ack_of_data(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpAck);
    match sock.state {
        SynSent | Listen | Close | TimeWait | NewSynRecv => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!("no data of ours to ACK in {}", sock.state),
            );
        }
        FinWait1 | Closing | LastAck if sock.unsent => {
            cx.sk.unsent = false;
            cx.send(Wire::FinSent);
            cx.rule(
                "tcp_ack(): the window opens; tcp_data_snd_check() sends the tail and the FIN \
                 queued on it",
            );
        }
        Established | SynRecv | CloseWait | FinWait1 | FinWait2 | Closing | LastAck => {
            if sock.unsent {
                cx.sk.unsent = false;
                cx.rule("tcp_ack(): the window opens; the unsent data goes out");
            } else {
                cx.rule("tcp_ack(): nothing unsent; the ACK changes no teardown state");
            }
        }
    }
    cx.finish()
}

/// tcp_v4_rcv() when no socket owns the 4-tuple any more (a CLOSE socket is unhashed). (Not in
/// the teardown doc.) The RST belongs to no traced socket; a listener on the port, if any, would
/// answer instead.
/// tcp_v4_syn_recv_sock() with !own_req: another CPU completed the same handshake first and
/// took the request, so this new child goes: inet_csk_prepare_forced_close() + tcp_done(),
/// SYN_RECV -> CLOSE and destroyed, with no close() and nothing on the wire.
pub(crate) fn tcp_v4_syn_recv_sock_lost_race(sock: &Sock, p: &ModelParams) -> Outcome {
    if sock.state != TcpState::SynRecv {
        return Outcome::not_applicable(
            &State::Socket(sock.clone()),
            format!(
                "only a listener's new child (SYN_RECV) can lose that race, not {}",
                sock.state
            ),
        );
    }
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpV4SynRecvSock);
    cx.set_state(TcpState::Close);
    cx.destroy();
    cx.rule(
        "tcp_v4_syn_recv_sock(): !own_req (the request went to a twin child on another CPU) -> \
         inet_csk_prepare_forced_close() + tcp_done(): CLOSE, destroyed, nothing sent",
    );
    cx.finish()
}

pub(crate) fn tcp_v4_rcv_no_socket(here: &State, rst: bool, p: &ModelParams) -> Outcome {
    if rst {
        return Outcome::new(
            here.clone(),
            KernelFunction::TcpV4Rcv,
            "tcp_v4_rcv(): no socket owns the 4-tuple; an unmatched RST is dropped",
        );
    }
    Outcome {
        wire: vec![Wire::RstReply],
        rst_reason: p.kernel.reply_reset_reason(RstReason::NoSocket),
        ..Outcome::new(
            here.clone(),
            KernelFunction::TcpV4Rcv,
            "tcp_v4_rcv(): no socket owns the 4-tuple -> tcp_v4_send_reset() (no_tcp_socket; \
             not in the teardown doc); the RST belongs to no traced socket",
        )
    }
}
