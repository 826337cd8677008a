//! Timers of a full socket: for an orphan, tcp_keepalive_timer() as the FIN_WAIT2 timer,
//! tcp_write_timeout() when retransmissions run out, and tcp_out_of_resources() when the
//! retransmission timer finds too many orphans or too little memory; for a socket the
//! application holds, tcp_write_err() when it times out. (The minisocket's timer is in
//! timewait.rs.)

use super::effects::Ctx;
use super::outcome::{Errno, KernelFunction, Outcome, RstReason, TcpExtCounter};
use super::params::{ModelParams, TCP_TIMEWAIT_LEN_MS};
use super::state::{Sock, State, TcpState, TwSubstate};

/// tcp_keepalive_timer() on an orphan FIN_WAIT2 full socket (armed by adjudge_to_death or by the
/// FIN_WAIT1 ACK rule when tcp_fin_time exceeds 60 s).
pub(crate) fn tcp_keepalive_timer(sock: &Sock, p: &ModelParams) -> Outcome {
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpKeepaliveTimer);
    match (sock.state, sock.orphan) {
        (TcpState::FinWait2, true) => {
            // The remaining wait, now short enough for a minisocket.
            let remaining = p.fin_time_ms().saturating_sub(TCP_TIMEWAIT_LEN_MS);
            if p.tcp_linger2_secs >= 0 && remaining > 0 {
                cx.tcp_time_wait(TwSubstate::FinWait2, remaining);
                cx.rule(format!(
                    "tcp_keepalive_timer(): orphan FIN_WAIT2, tcp_fin_time - 60 s = {remaining} ms \
                     -> tcp_time_wait(FIN_WAIT2, {remaining} ms)"
                ));
            } else {
                cx.active_reset(RstReason::TcpState);
                cx.tcp_done();
                cx.rule(
                    "tcp_keepalive_timer(): orphan FIN_WAIT2 with no time left (or TCP_LINGER2 < \
                     0) -> RST, tcp_done(), destroyed",
                );
            }
        }
        (TcpState::FinWait2, false) => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                "a FIN_WAIT2 socket the application holds has no FIN_WAIT2 timer (it waits \
                 forever; only SO_KEEPALIVE probes, not modelled)",
            );
        }
        (state, _) => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!("no FIN_WAIT2 timer runs in {state}"),
            );
        }
    }
    cx.finish()
}

/// tcp_write_timeout() (or tcp_probe_timer() while zero-window probing) gives up on an orphan
/// whose FIN is not ACKed.
pub(crate) fn tcp_write_timeout(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpWriteTimeout);
    match sock.state {
        FinWait1 | Closing | LastAck if sock.orphan => {
            cx.error(Errno::Etimedout);
            cx.count(TcpExtCounter::TcpAbortOnTimeout);
            cx.tcp_done();
            cx.rule(format!(
                "tcp_write_timeout(): orphan {} out of retries (tcp_orphan_retries = {}: {} \
                 while the peer seems alive) -> tcp_write_err(): ETIMEDOUT, TCPAbortOnTimeout, \
                 tcp_done(), destroyed; no RST",
                sock.state,
                p.tcp_orphan_retries,
                p.orphan_retries(true)
            ));
        }
        FinWait1 | Closing | LastAck => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                "the socket is not orphaned: tcp_retries2 governs its retransmissions (see \
                 connection-timeout)",
            );
        }
        Established | SynSent | SynRecv | FinWait2 | CloseWait | Listen | Close | TimeWait
        | NewSynRecv => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!(
                    "no FIN of ours awaits an ACK in {}{}",
                    sock.state,
                    if sock.state == FinWait2 {
                        " (see fin-wait2-timeout)"
                    } else {
                        ""
                    }
                ),
            );
        }
    }
    cx.finish()
}

/// tcp_out_of_resources(sk, do_reset), which tcp_write_timeout() (and tcp_probe_timer()) call for
/// an orphan before counting retries: tcp_check_oom(sk, shift) -- more orphans than
/// tcp_max_orphans (the count cached every 100 ms, shifted left when the peer has been silent
/// for 2 * TCP_RTO_MAX or an ICMP error arrived) or tcp_mem's hard limit exceeded with more than
/// SOCK_MIN_SNDBUF queued -- kills the orphan: RST (TCP_ABORT_ON_MEMORY) if it sent something
/// within TCP_TIMEWAIT_LEN, its window is closed or its peer seems alive, then tcp_done() and
/// TCPAbortOnMemory. The model takes the RST as sent (an orphan retransmitting its FIN sent it
/// less than a minute ago).
pub(crate) fn tcp_out_of_resources(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpOutOfResources);
    match sock.state {
        FinWait1 | Closing | LastAck if sock.orphan => {
            cx.active_reset(RstReason::TcpAbortOnMemory);
            cx.tcp_done();
            cx.count(TcpExtCounter::TcpAbortOnMemory);
            cx.rule(format!(
                "tcp_out_of_resources(): orphan {} on its retransmission timer, \
                 tcp_check_oom() -> RST (TCP_ABORT_ON_MEMORY), tcp_done(), TCPAbortOnMemory; \
                 destroyed",
                sock.state
            ));
        }
        FinWait1 | Closing | LastAck => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                "tcp_write_timeout() calls tcp_out_of_resources() only for an orphan (SOCK_DEAD)",
            );
        }
        Established | SynSent | SynRecv | FinWait2 | CloseWait | Listen | Close | TimeWait
        | NewSynRecv => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!(
                    "no orphan retransmission timer runs in {}{}",
                    sock.state,
                    if sock.orphan {
                        ""
                    } else {
                        " (the socket is not orphaned)"
                    }
                ),
            );
        }
    }
    cx.finish()
}

/// tcp_write_err(), for a socket the application still holds: its retransmissions
/// (tcp_retries2; tcp_syn_retries in SYN_SENT, tcp_synack_retries for a Fast Open child), its
/// TCP_USER_TIMEOUT, its keepalive probes (tcp_keepalive_timer()) or its zero-window probes
/// (tcp_probe_timer()) have run out. sk_err = ETIMEDOUT (the application's next call returns
/// it; an ICMP error seen meanwhile, sk_err_soft, is reported instead, e.g. EHOSTUNREACH: the
/// model names the usual case), the write queue is purged, tcp_done(): CLOSE, and the socket stays until close(). No
/// RST: the peer is presumed unreachable. An orphan takes the tcp_orphan_retries path instead.
pub(crate) fn tcp_write_err(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpWriteTimeout);
    match sock.state {
        _ if sock.orphan => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                "an orphan gives up after tcp_orphan_retries (see orphan-retries-exhausted)",
            );
        }
        Established | SynSent | SynRecv | CloseWait | FinWait1 | FinWait2 | Closing | LastAck => {
            let what = if sock.state == SynSent {
                "connect() out of SYN retries (tcp_syn_retries) or TCP_USER_TIMEOUT"
            } else {
                "retransmissions (tcp_retries2), TCP_USER_TIMEOUT, keepalive or zero-window \
                 probes ran out"
            };
            cx.error(Errno::Etimedout);
            cx.count(TcpExtCounter::TcpAbortOnTimeout);
            cx.tcp_done();
            cx.rule(format!(
                "tcp_write_err() in {}: {what} -> ETIMEDOUT, TCPAbortOnTimeout, tcp_done(): \
                 CLOSE, held by the application until close(); no RST",
                sock.state
            ));
        }
        Listen | Close | TimeWait | NewSynRecv => {
            return Outcome::not_applicable(
                &State::Socket(sock.clone()),
                format!("nothing of a connection times out in {}", sock.state),
            );
        }
    }
    cx.finish()
}
