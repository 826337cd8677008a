//! A working copy of the full socket plus the outcome being recorded, so that the rules read
//! like the kernel code they mirror: `cx.set_state(Close); cx.active_reset(...)`.

use super::outcome::{
    Errno, KernelFunction, Outcome, RstReason, StateChange, TcpExtCounter, TimeWaitCall,
    TimerArmed, Wire,
};
use super::params::{ModelParams, TCP_TIMEWAIT_LEN_MS};
use super::state::{Sock, State, TcpState, TimeWaitSock, TwSubstate};

/// What becomes of the full socket at the end of the step.
enum Fate {
    /// It lives on (in `sk`).
    Live,
    /// inet_csk_destroy_sock(): freed.
    Destroyed,
    /// tcp_time_wait() traded it for a minisocket (the full socket is CLOSE, and destroyed if
    /// orphaned).
    TimeWait(TwSubstate),
}

pub(crate) struct Ctx<'p> {
    pub(crate) sk: Sock,
    pub(crate) p: &'p ModelParams,
    out: Outcome,
    fate: Fate,
    rules: Vec<String>,
}

impl<'p> Ctx<'p> {
    pub(super) fn new(sk: &Sock, p: &'p ModelParams, decided_by: KernelFunction) -> Ctx<'p> {
        Ctx {
            sk: sk.clone(),
            p,
            out: Outcome::new(State::Freed, decided_by, ""),
            fate: Fate::Live,
            rules: Vec::new(),
        }
    }

    /// Adds a clause to the rule text.
    pub(super) fn rule(&mut self, text: impl Into<String>) {
        self.rules.push(text.into());
    }

    /// Names the kernel function whose rule decided the step.
    pub(super) fn decided_by(&mut self, function: KernelFunction) {
        self.out.decided_by = Some(function);
    }

    /// tcp_set_state(): recorded as sock:inet_sock_set_state would show it.
    pub(super) fn set_state(&mut self, to: TcpState) {
        if self.sk.state != to {
            self.out.state_changes.push(StateChange {
                from: self.sk.state,
                to,
            });
            self.sk.state = to;
        }
    }

    pub(super) fn send(&mut self, wire: Wire) {
        self.out.wire.push(wire);
    }

    /// tcp_send_active_reset(sk, ..., reason).
    pub(super) fn active_reset(&mut self, reason: RstReason) {
        self.send(Wire::RstActive);
        self.out.rst_reason = self.p.kernel.active_reset_reason(reason);
    }

    /// tcp_v4_send_reset(sk, skb, reason): the caller's reply to a segment.
    pub(super) fn reply_reset(&mut self, reason: RstReason) {
        self.send(Wire::RstReply);
        self.out.rst_reason = self.p.kernel.reply_reset_reason(reason);
    }

    /// The children's resets of inet_csk_listen_stop(), via tcp_disconnect().
    pub(super) fn children_reset(&mut self, reason: RstReason) {
        self.send(Wire::RstToChildren);
        self.out.rst_reason = self.p.kernel.active_reset_reason(reason);
    }

    pub(super) fn count(&mut self, counter: TcpExtCounter) {
        self.out.counters.push(counter);
    }

    pub(super) fn error(&mut self, errno: Errno) {
        self.out.error = Some(errno);
    }

    pub(super) fn arm_fin_wait2_keepalive(&mut self, ms: u64) {
        self.out.timer = Some(TimerArmed::FinWait2Keepalive { ms });
    }

    pub(super) fn blocks_caller(&mut self) {
        self.out.blocks_caller = true;
    }

    /// tcp_done(): CLOSE, sk_shutdown = SHUTDOWN_MASK, timers cleared; an orphan is destroyed,
    /// a socket the application holds stays (in CLOSE) until its close().
    pub(super) fn tcp_done(&mut self) {
        self.set_state(TcpState::Close);
        self.sk.rcv_shutdown = true;
        self.sk.unsent = false;
        if self.sk.orphan {
            self.fate = Fate::Destroyed;
        }
    }

    /// inet_csk_destroy_sock().
    pub(super) fn destroy(&mut self) {
        self.fate = Fate::Destroyed;
    }

    /// tcp_time_wait(sk, substate, timeo): allocate the minisocket, arm its timer (timeo floored
    /// at 3.5 RTO; always TCP_TIMEWAIT_LEN for TIME_WAIT), then tcp_done() the full socket.
    pub(super) fn tcp_time_wait(&mut self, substate: TwSubstate, timeo_ms: u64) {
        let timer_ms = match substate {
            TwSubstate::TimeWait => TCP_TIMEWAIT_LEN_MS,
            TwSubstate::FinWait2 => timeo_ms.max(self.p.rto_floor_ms()),
        };
        self.out.time_wait = Some(TimeWaitCall {
            substate,
            timeo_ms,
            timer_ms,
        });
        self.out.timer = None;
        self.tcp_done();
        self.fate = Fate::TimeWait(substate);
    }

    pub(super) fn finish(self) -> Outcome {
        let next = match self.fate {
            Fate::Live => State::Socket(self.sk),
            Fate::Destroyed => State::Freed,
            Fate::TimeWait(substate) => State::TimeWait(TimeWaitSock {
                substate,
                app_holds_closed_socket: !self.sk.orphan,
            }),
        };
        Outcome {
            next,
            rule: self.rules.join("; "),
            ..self.out
        }
    }
}
