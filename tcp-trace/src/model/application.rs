//! The application's calls: close() (__tcp_close with its adjudge_to_death tail), tcp_disconnect(),
//! inet_csk_listen_stop(), shutdown() (inet_shutdown + tcp_shutdown), read() and write().
//!
//! The caller (the dispatcher in mod.rs) has already refused calls on orphans: once close() ran,
//! the application has no descriptor left.

use super::effects::Ctx;
use super::input::{CloseCall, Linger, Shutdown};
use super::outcome::{Errno, KernelFunction, Outcome, RstReason, TcpExtCounter, Wire};
use super::params::{ModelParams, TCP_TIMEWAIT_LEN_MS};
use super::state::{ReceiveQueue, Sock, TcpState, TwSubstate};

/// __tcp_close(sk, timeout): its checks in the kernel's order (teardown doc, "close()" 1-10).
pub(crate) fn tcp_close(sock: &Sock, call: CloseCall, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpClose);

    // 1. sk_shutdown = SHUTDOWN_MASK: nothing more will be read or written.
    cx.sk.rcv_shutdown = true;

    // 2. A listener goes to CLOSE and takes its un-accepted children with it.
    if cx.sk.state == Listen {
        cx.set_state(Close);
        cx.rule("__tcp_close(): LISTEN -> CLOSE");
        inet_csk_listen_stop(&mut cx, call.listener_children);
        return adjudge_to_death(cx, call.oom);
    }

    // 3. Drain the receive queue, noting whether the application left data unread.
    let queue = call.receive_queue.unwrap_or(sock.receive_queue);
    let unread = data_was_unread(queue, p.kernel.close_unread_fix);
    cx.sk.receive_queue = ReceiveQueue::Empty;

    if cx.sk.state == Close {
        // 4. An RST (or tcp_done) got here first: nothing to tell the peer.
        cx.rule(
            "__tcp_close(): already CLOSE (a RST or tcp_done() got there first): straight to destruction, \
             no RST even with unread data",
        );
    } else if call.repair {
        // 5. CRIU's repair mode: the connection is being checkpointed, not torn down.
        cx.rule("__tcp_close(): TCP_REPAIR mode -> tcp_disconnect(), no RST");
        tcp_disconnect(&mut cx, true);
    } else if unread {
        // 6. RFC 2525 2.17: unread data is lost, so tell the peer with a RST, not a FIN.
        cx.count(TcpExtCounter::TcpAbortOnClose);
        cx.set_state(Close);
        cx.active_reset(RstReason::TcpAbortOnClose);
        cx.rule(match queue {
            ReceiveQueue::OnlyReadData => {
                "__tcp_close(): receive queue not empty; before the 6.18 fix every queued \
                 payload byte counts as unread (even behind copied_seq) -> CLOSE + RST, \
                 TCPAbortOnClose"
            }
            _ => "__tcp_close(): data was unread -> CLOSE + RST, TCPAbortOnClose (any state)",
        });
    } else if call.linger == Linger::Zero {
        // 7. SO_LINGER with a zero time asks for an abortive close. (Checked after unread data.)
        cx.rule("__tcp_close(): SO_LINGER with l_linger 0 -> tcp_disconnect(), TCPAbortOnData");
        tcp_disconnect(&mut cx, false);
        cx.count(TcpExtCounter::TcpAbortOnData);
    } else {
        if queue == ReceiveQueue::OnlyReadData {
            cx.rule(
                "__tcp_close(): queued skbs hold only payload behind copied_seq, which the \
                 6.18 fix does not count as unread",
            );
        }
        // 8. The orderly close.
        if tcp_close_state(&mut cx) {
            tcp_send_fin(&mut cx);
        }
    }

    // 9. sk_stream_wait_close(): only SO_LINGER with a positive time blocks, and only while our
    // FIN is outstanding. The model takes the linger time as run out, so adjudge_to_death sees
    // the state close() left (an ACK arriving meanwhile would be a separate `ack-of-fin` on a
    // socket not yet orphaned).
    if call.linger == Linger::Positive && matches!(cx.sk.state, FinWait1 | Closing | LastAck) {
        cx.blocks_caller();
        cx.rule("sk_stream_wait_close(): close() blocks up to the linger time for the FIN's ACK");
    }

    adjudge_to_death(cx, call.oom)
}

/// Step 3 of __tcp_close(): whether draining the receive queue threw away data.
fn data_was_unread(queue: ReceiveQueue, close_unread_fix: bool) -> bool {
    match queue {
        ReceiveQueue::Empty => false,
        ReceiveQueue::Unread => true,
        // Pre-fix: the sum over dequeued skbs of (end_seq - seq - FIN), read or not.
        // Fixed (6.18): only an skb whose end_seq (minus FIN) is after copied_seq counts.
        ReceiveQueue::OnlyReadData => !close_unread_fix,
    }
}

/// tcp_close_state(): the new_state[] table (the same in 6.1 and 6.18). Returns whether the
/// caller must send a FIN (TCP_ACTION_FIN).
fn tcp_close_state(cx: &mut Ctx) -> bool {
    use TcpState::*;
    let from = cx.sk.state;
    let (to, send_fin, why) = match from {
        Established | SynRecv => (FinWait1, true, "our FIN starts the active close"),
        CloseWait => (LastAck, true, "the peer closed first; our FIN completes it"),
        SynSent => (Close, false, "no connection yet: nothing to send"),
        FinWait1 | FinWait2 | Closing | LastAck => (
            from,
            false,
            "unchanged: our FIN was already sent by shutdown()",
        ),
        Close | Listen | TimeWait | NewSynRecv => (Close, false, "nothing to close"),
    };
    cx.set_state(to);
    cx.rule(format!(
        "tcp_close_state(): new_state[{from}] = {to}{} ({why})",
        if send_fin { " + FIN" } else { "" }
    ));
    send_fin
}

/// tcp_send_fin() only queues the FIN; whether it is on the wire now depends on what is ahead.
fn tcp_send_fin(cx: &mut Ctx) {
    if cx.sk.unsent {
        cx.send(Wire::FinQueued);
        cx.rule(
            "tcp_send_fin(): FIN set on the unsent tail skb; it leaves with the last data \
             segment",
        );
    } else {
        cx.send(Wire::FinSent);
        cx.rule("tcp_send_fin(): new FIN skb, pushed at once (TCP_NAGLE_OFF)");
    }
}

/// adjudge_to_death: the tail of __tcp_close() once the application has let go.
fn adjudge_to_death(mut cx: Ctx, oom: bool) -> Outcome {
    use TcpState::*;
    // sock_orphan(): SOCK_DEAD. From here on nothing can read sk_err.
    cx.sk.orphan = true;

    if cx.sk.state == FinWait2 {
        if cx.p.tcp_linger2_secs < 0 {
            // TCP_LINGER2 < 0: do not wait for the peer's FIN at all.
            cx.set_state(Close);
            cx.active_reset(RstReason::TcpAbortOnLinger);
            cx.count(TcpExtCounter::TcpAbortOnLinger);
            cx.rule(
                "adjudge_to_death: FIN_WAIT2 with TCP_LINGER2 < 0 -> CLOSE + RST, TCPAbortOnLinger",
            );
        } else {
            let tmo = cx.p.fin_time_ms();
            if tmo > TCP_TIMEWAIT_LEN_MS {
                // A FIN_WAIT2 minisocket lives at most TCP_TIMEWAIT_LEN, so the full socket waits
                // out the excess on its keepalive timer first.
                cx.arm_fin_wait2_keepalive(tmo - TCP_TIMEWAIT_LEN_MS);
                cx.rule(format!(
                    "adjudge_to_death: FIN_WAIT2, tcp_fin_time {tmo} ms > 60 s -> stays a full \
                     orphan FIN_WAIT2 on the keepalive timer ({} ms)",
                    tmo - TCP_TIMEWAIT_LEN_MS
                ));
            } else {
                cx.tcp_time_wait(TwSubstate::FinWait2, tmo);
                cx.rule(format!(
                    "adjudge_to_death: FIN_WAIT2, tcp_fin_time {tmo} ms <= 60 s -> \
                     tcp_time_wait(FIN_WAIT2, {tmo} ms)"
                ));
                return cx.finish();
            }
        }
    }

    if cx.sk.state != Close && oom {
        // tcp_check_oom(): too many orphans or too little memory to keep this one.
        cx.set_state(Close);
        cx.active_reset(RstReason::TcpAbortOnMemory);
        cx.count(TcpExtCounter::TcpAbortOnMemory);
        cx.rule("adjudge_to_death: tcp_check_oom() -> CLOSE + RST, TCPAbortOnMemory");
    }

    if cx.sk.state == Close {
        cx.destroy();
        cx.rule("adjudge_to_death: CLOSE -> inet_csk_destroy_sock()");
    } else {
        cx.rule(format!(
            "adjudge_to_death: the orphan stays in {} for its timers",
            cx.sk.state
        ));
    }
    cx.finish()
}

/// tcp_need_reset(): the states in which an abort must tell the peer.
fn tcp_need_reset(state: TcpState) -> bool {
    use TcpState::*;
    matches!(
        state,
        Established | CloseWait | FinWait1 | FinWait2 | SynRecv
    )
}

/// tcp_disconnect(): the ABORT of RFC 793. `repair`: TCP_REPAIR mode, which never resets.
fn tcp_disconnect(cx: &mut Ctx, repair: bool) {
    use TcpState::*;
    let old = cx.sk.state;
    cx.decided_by(KernelFunction::TcpDisconnect);
    cx.set_state(Close);
    if old == Listen {
        inet_csk_listen_stop(cx, false);
    } else if repair {
        cx.error(Errno::Econnaborted);
        cx.rule("tcp_disconnect(): repair mode, no RST (sk_err = ECONNABORTED)");
    } else if tcp_need_reset(old) {
        cx.active_reset(RstReason::TcpState);
        cx.error(Errno::Econnreset);
        cx.rule(format!("tcp_disconnect(): tcp_need_reset({old}) -> RST"));
    } else if cx.sk.unsent && matches!(old, Closing | LastAck) {
        // snd_nxt != write_seq: our FIN (and data before it) never left, so the peer must
        // learn of the abort some other way.
        cx.active_reset(RstReason::TcpDisconnectWithData);
        cx.error(Errno::Econnreset);
        cx.rule(format!(
            "tcp_disconnect(): {old} with snd_nxt != write_seq (FIN not yet sent) -> RST"
        ));
    } else if old == SynSent {
        cx.error(Errno::Econnreset);
        cx.rule("tcp_disconnect(): SYN_SENT -> sk_err = ECONNRESET, nothing sent");
    } else {
        cx.rule(format!("tcp_disconnect(): nothing to send from {old}"));
    }
    // Both queues are purged and sk_shutdown cleared: the socket could connect() again.
    cx.sk.unsent = false;
    cx.sk.receive_queue = ReceiveQueue::Empty;
    cx.sk.rcv_shutdown = false;
}

/// inet_csk_listen_stop(): every un-accepted child goes through inet_child_forget():
/// tcp_disconnect() (RST from an ESTABLISHED or CLOSE_WAIT child), sock_orphan(), destroy.
fn inet_csk_listen_stop(cx: &mut Ctx, children: bool) {
    cx.decided_by(KernelFunction::InetCskListenStop);
    if children {
        // tcp_disconnect() of an ESTABLISHED/CLOSE_WAIT child takes its tcp_need_reset() branch.
        cx.children_reset(RstReason::TcpState);
        cx.rule(
            "inet_csk_listen_stop(): each un-accepted child: tcp_disconnect() (RST if \
             ESTABLISHED or CLOSE_WAIT), orphaned, destroyed; no TcpExt counter (that is \
             __tcp_close()'s)",
        );
    } else {
        cx.rule("inet_csk_listen_stop(): accept queue empty, nobody to reset");
    }
}

/// connect(AF_UNSPEC): __inet_stream_connect() calls tcp_disconnect() whatever the state; the
/// application keeps the socket (SS_UNCONNECTED), in CLOSE, free to connect() again. Nothing is
/// counted: the TcpExt abort counters are __tcp_close()'s.
pub(crate) fn inet_disconnect(sock: &Sock, p: &ModelParams) -> Outcome {
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpDisconnect);
    if sock.state == TcpState::Close {
        cx.rule("connect(AF_UNSPEC): already CLOSE, tcp_disconnect() has nothing to undo");
    } else {
        cx.rule("connect(AF_UNSPEC) -> tcp_disconnect()");
        tcp_disconnect(&mut cx, false);
    }
    cx.finish()
}

/// inet_shutdown() and, for the send direction, tcp_shutdown().
pub(crate) fn inet_shutdown(sock: &Sock, how: Shutdown, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::InetShutdown);
    match sock.state {
        Close => {
            cx.sk.rcv_shutdown |= how.receive();
            cx.error(Errno::Enotconn);
            cx.rule("inet_shutdown(): CLOSE -> -ENOTCONN (sk_shutdown is still updated)");
        }
        Listen if how.receive() => {
            cx.rule("inet_shutdown(): LISTEN with SHUT_RD -> tcp_disconnect()");
            tcp_disconnect(&mut cx, false);
        }
        Listen => cx.rule("inet_shutdown(): LISTEN with SHUT_WR only: nothing to do"),
        SynSent => {
            cx.rule("inet_shutdown(): SYN_SENT -> tcp_disconnect()");
            tcp_disconnect(&mut cx, false);
        }
        Established | SynRecv | FinWait1 | FinWait2 | CloseWait | LastAck | Closing | TimeWait
        | NewSynRecv => {
            cx.sk.rcv_shutdown |= how.receive();
            if how.send() {
                tcp_shutdown(&mut cx);
            } else {
                cx.rule(
                    "inet_shutdown(): SHUT_RD only sets RCV_SHUTDOWN, no packet (later data is \
                     still queued in ESTABLISHED but aborts FIN_WAIT1/2)",
                );
            }
        }
    }
    cx.finish()
}

/// tcp_shutdown(sk, how) with SEND_SHUTDOWN: the same new_state[] table as close().
fn tcp_shutdown(cx: &mut Ctx) {
    use TcpState::*;
    cx.decided_by(KernelFunction::TcpShutdown);
    if matches!(cx.sk.state, Established | SynSent | SynRecv | CloseWait) {
        if tcp_close_state(cx) {
            tcp_send_fin(cx);
        }
    } else {
        cx.rule(format!(
            "tcp_shutdown(): {}: our FIN is already out, nothing to do",
            cx.sk.state
        ));
    }
}

/// tcp_recvmsg(): the application reads everything it can.
pub(crate) fn tcp_recvmsg(sock: &Sock, p: &ModelParams) -> Outcome {
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpRecvmsg);
    match sock.receive_queue {
        ReceiveQueue::Unread => {
            cx.sk.receive_queue = ReceiveQueue::Empty;
            cx.rule("tcp_recvmsg(): copied_seq catches up with rcv_nxt; nothing left unread");
        }
        ReceiveQueue::Empty | ReceiveQueue::OnlyReadData => {
            cx.rule("tcp_recvmsg(): nothing unread to consume");
        }
    }
    cx.finish()
}

/// tcp_sendmsg(): the application writes bytes that the peer's window holds back.
pub(crate) fn tcp_sendmsg(sock: &Sock, p: &ModelParams) -> Outcome {
    use TcpState::*;
    let mut cx = Ctx::new(sock, p, KernelFunction::TcpSendmsg);
    match sock.state {
        Established | CloseWait | SynRecv => {
            cx.sk.unsent = true;
            cx.rule(
                "tcp_sendmsg(): bytes wait in the write queue (peer window closed); a FIN queued \
                 now would ride behind them",
            );
        }
        SynSent => {
            return Outcome::not_applicable(
                &super::state::State::Socket(sock.clone()),
                "write() blocks in sk_stream_wait_connect() until the handshake completes",
            );
        }
        FinWait1 | FinWait2 | Closing | LastAck | Close | Listen | TimeWait | NewSynRecv => {
            cx.error(Errno::Epipe);
            cx.rule(format!(
                "tcp_sendmsg(): {}: SEND_SHUTDOWN set or not connected -> -EPIPE (a pending \
                 sk_err is returned instead)",
                sock.state
            ));
        }
    }
    cx.finish()
}
