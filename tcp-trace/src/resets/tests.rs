//! Classification on hand-built event streams (as 6.1, 6.12 and 6.18 kernels emit them, with and
//! without the function hooks), the streaming tracker, the counter arithmetic, and agreement of
//! each cause's counter with the model.

use std::collections::BTreeMap;

use super::counters::{self, CheckVerdict, Tally};
use super::*;
use crate::decode::{
    self, CloseDetails, Comm, Hook, KReason, KState, OwnerSource, Segment, SockPtr, TraceEvent,
};
use crate::model::{self, Input, KernelGeneration, Model, ModelParams, TcpExtCounter, Wire};
use tcp_trace_common::HookSet;

const NS: u32 = 4026531840;

fn k(minor: u32) -> KernelGeneration {
    KernelGeneration::from_version(6, minor, 0)
}

/// Events of one socket (server 127.0.0.1:8080 <- client 127.0.0.2:40000), owned by pid 7.
struct Stream {
    ts: u64,
    sk: SockPtr,
    local: u16,
    remote: u16,
    tid: u32,
    owner: u32,
    events: Vec<TraceEvent>,
}

impl Stream {
    fn new() -> Stream {
        Stream {
            ts: 1_000_000_000,
            sk: "0xffff888000001000".into(),
            local: 8080,
            remote: 40000,
            tid: 7,
            owner: 7,
            events: Vec::new(),
        }
    }

    fn ev(&mut self, hook: Hook, state: Option<&str>) -> &mut TraceEvent {
        let raw = decode::tests::v4_event(tcp_trace_common::hook::TCP_CLOSE, 1, 2);
        let mut e = decode::decode(&raw, &decode::tests::facts()).unwrap();
        self.ts += 10_000;
        e.ts_ns = self.ts;
        e.hook = hook;
        e.state = state.map(KState::from);
        e.new_state = None;
        e.close = None;
        e.pid = self.tid;
        e.tid = self.tid;
        e.comm = Comm::from(format!("task{}", self.tid).as_str());
        e.owner = Some(decode::Owner {
            pid: self.owner,
            comm: "server".into(),
            source: OwnerSource::Kernel,
            cgroup_id: 0,
        });
        e.netns = NS;
        e.sk = self.sk;
        e.local = Some(format!("127.0.0.1:{}", self.local).parse().unwrap());
        e.remote = Some(format!("127.0.0.2:{}", self.remote).parse().unwrap());
        self.events.push(e);
        self.events.last_mut().unwrap()
    }

    fn state(&mut self, from: &str, to: &str) -> &mut Self {
        self.ev(Hook::InetSockSetState, Some(from)).new_state = Some(to.into());
        self
    }

    fn close(&mut self, state: &str, unread: u32, linger0: bool) -> &mut Self {
        self.ev(Hook::TcpClose, Some(state)).close = Some(CloseDetails {
            timeout_jiffies: 0,
            linger: linger0,
            linger_jiffies: 0,
            unread,
            unsent: 0,
            unacked: 0,
            fin_received: false,
            orphan: false,
        });
        self
    }

    fn active_rst(&mut self, state: &str, reason: Option<&str>) -> &mut Self {
        let e = self.ev(Hook::TcpSendReset, Some(state));
        e.rst_active = Some(true);
        e.rst_reason = reason.map(KReason::from);
        self
    }

    fn reply_rst(&mut self, state: Option<&str>, reason: Option<&str>) -> &mut Self {
        let e = self.ev(Hook::TcpSendReset, state);
        e.rst_active = Some(false);
        e.rst_reason = reason.map(KReason::from);
        self
    }

    fn rcv_rst(&mut self, state: &str) -> &mut Self {
        self.ev(Hook::TcpReceiveReset, Some(state));
        self
    }

    fn destroy(&mut self) -> &mut Self {
        self.ev(Hook::TcpDestroySock, Some("CLOSE"));
        self
    }

    /// A softirq event: another task on the CPU.
    fn softirq(&mut self) -> &mut Self {
        let e = self.events.last_mut().unwrap();
        e.pid = 999;
        e.tid = 999;
        e.comm = "other".into();
        self
    }
}

fn tracker(kernel: KernelGeneration, hooks: &[&str]) -> ResetTracker {
    ResetTracker::new(TrackerConfig::new(kernel, hook_set(hooks)))
}

/// The registry's hooks of these names.
fn hook_set(names: &[&str]) -> HookSet {
    names
        .iter()
        .map(|n| Hook::from_name(n).unwrap_or_else(|| panic!("no hook {n}")))
        .collect()
}

const TRACEPOINTS: &[&str] = &[
    "sock:inet_sock_set_state",
    "tcp:tcp_send_reset",
    "tcp:tcp_receive_reset",
    "tcp:tcp_destroy_sock",
];

fn all_hooks() -> Vec<&'static str> {
    let mut h = TRACEPOINTS.to_vec();
    h.extend(["tcp_close", "tcp_send_active_reset", "tcp_time_wait"]);
    h
}

fn diagnose(
    kernel: KernelGeneration,
    hooks: &[&str],
    events: &[TraceEvent],
) -> Vec<ResetDiagnosis> {
    let mut t = tracker(kernel, hooks);
    for e in events {
        t.observe(e);
    }
    t.flush()
}

fn one(kernel: KernelGeneration, hooks: &[&str], events: &[TraceEvent]) -> ResetDiagnosis {
    let mut d = diagnose(kernel, hooks, events);
    assert_eq!(d.len(), 1, "{d:#?}");
    d.remove(0)
}

// ---- close() ---------------------------------------------------------------------------------

#[test]
fn unread_close_with_the_kernel_reason_is_certain() {
    let mut s = Stream::new();
    s.state("SYN_RECV", "ESTABLISHED").softirq();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_CLOSE"))
        .destroy();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(d.cause, ResetCause::CloseUnread);
    assert_eq!(d.confidence, Confidence::Certain);
    assert_eq!(d.direction, Direction::Sent);
    assert_eq!(d.counter, Some("TCPAbortOnClose"));
    assert_eq!(d.owner.as_ref().unwrap().pid, 7);
    assert_eq!(d.closer.as_ref().unwrap().tid, 7);
    assert_eq!(d.unread_bytes, None);
    assert_eq!(
        d.unread_wait_max_ns,
        Some(20_000),
        "ESTABLISHED 2 events earlier"
    );
    assert_eq!(d.kernel_reason.as_deref(), Some("TCP_ABORT_ON_CLOSE"));
    assert!(d.evidence.contains("tcp_close hook"), "{}", d.evidence);
    assert!(d.advice().unwrap().contains("shutdown(SHUT_WR)"));
}

#[test]
fn unread_close_on_6_1_is_derived_from_the_close_details() {
    let mut s = Stream::new();
    s.close("ESTABLISHED", 14, false)
        .state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", None)
        .destroy();
    let d = one(k(1), &all_hooks(), &s.events);
    assert_eq!(
        (d.cause, d.confidence, d.unread_bytes),
        (ResetCause::CloseUnread, Confidence::Derived, Some(14))
    );
    assert_eq!(d.counter, Some("TCPAbortOnClose"));
    assert!(d.advice().unwrap().contains("14 unread bytes"));
}

#[test]
fn tracepoints_only_without_reasons_cannot_tell_unread_from_linger_zero() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", None)
        .destroy();
    let d = one(k(1), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence),
        (ResetCause::CloseAbort, Confidence::Guess)
    );
    assert_eq!(d.counter, None);
    assert_eq!(d.possible_counters, ["TCPAbortOnClose", "TCPAbortOnData"]);
    let mut t = Tally::default();
    t.add(&d);
    assert_eq!(t.guesses, 1);
    assert!(t.exact.is_empty());
}

#[test]
fn linger_zero_on_tracepoints_is_derived_from_tcp_state_and_the_destruction() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_STATE"))
        .destroy();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence),
        (ResetCause::LingerZero, Confidence::Derived)
    );
    assert_eq!(d.counter, Some("TCPAbortOnData"));
    assert_eq!(d.closer.as_ref().unwrap().pid, 7);

    // The same reset on a socket that lives on: connect(AF_UNSPEC), no counter.
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_STATE"));
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(d.cause, ResetCause::Disconnect);
    assert_eq!(d.counter, None);
}

#[test]
fn linger_zero_with_close_details_is_certain_and_says_whether_it_looks_intended() {
    let mut s = Stream::new();
    s.close("ESTABLISHED", 0, true)
        .state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_STATE"))
        .destroy();
    let d = one(k(12), &all_hooks(), &s.events);
    assert_eq!(
        (d.cause, d.confidence),
        (ResetCause::LingerZero, Confidence::Certain)
    );
    assert_eq!((d.unsent_bytes, d.unacked_bytes), (Some(0), Some(0)));
    assert!(
        d.advice().unwrap().contains("looks intended"),
        "{:?}",
        d.advice()
    );

    let mut s = Stream::new();
    s.close("ESTABLISHED", 0, true);
    s.events[0].close.as_mut().unwrap().unsent = 500;
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_STATE"))
        .destroy();
    let d = one(k(12), &all_hooks(), &s.events);
    assert!(
        d.advice().unwrap().contains("500 bytes were unsent"),
        "{:?}",
        d.advice()
    );
}

#[test]
fn linger_zero_from_syn_sent_is_a_silent_abort_that_still_counts() {
    let mut s = Stream::new();
    s.close("SYN_SENT", 0, true)
        .state("SYN_SENT", "CLOSE")
        .destroy();
    let d = one(k(12), &all_hooks(), &s.events);
    assert_eq!(
        (d.cause, d.direction, d.counter),
        (
            ResetCause::LingerZero,
            Direction::Silent,
            Some("TCPAbortOnData")
        )
    );
}

#[test]
fn an_active_reset_seen_twice_is_diagnosed_once() {
    let mut s = Stream::new();
    s.close("ESTABLISHED", 3, false)
        .state("ESTABLISHED", "CLOSE");
    s.ev(Hook::TcpSendActiveReset, Some("CLOSE")).rst_active = Some(true);
    s.active_rst("CLOSE", None).destroy();
    let d = one(k(1), &all_hooks(), &s.events);
    assert_eq!(d.cause, ResetCause::CloseUnread);
    // Without the tracepoint, the function's event is the one diagnosed.
    let without: Vec<_> = s
        .events
        .iter()
        .filter(|e| e.hook != Hook::TcpSendReset)
        .cloned()
        .collect();
    let hooks = [
        "tcp_close",
        "tcp_send_active_reset",
        "sock:inet_sock_set_state",
    ];
    assert_eq!(one(k(1), &hooks, &without).cause, ResetCause::CloseUnread);
}

#[test]
fn a_listener_closing_resets_its_unaccepted_children_not_later_ones() {
    // The child is reset inside the listener's close(): between its LISTEN -> CLOSE and its
    // destruction, in the same task.
    let mut listener = Stream::new();
    listener.sk = "0xffff888000002000".into();
    listener.remote = 0;
    listener.state("LISTEN", "CLOSE");
    let mut child = Stream::new();
    child.ts = listener.ts;
    child
        .state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_STATE"))
        .destroy();
    let mut events = listener.events.clone();
    events.extend(child.events.clone());
    listener.ts = child.ts;
    listener.destroy();
    events.push(listener.events.last().unwrap().clone());
    let d = one(k(18), TRACEPOINTS, &events);
    assert_eq!((d.cause, d.counter), (ResetCause::ListenerClosed, None));

    // A listener closed (and destroyed) before an accepted socket's linger-0 close.
    let mut events = listener.events.clone();
    let mut later = Stream::new();
    later.ts = listener.ts;
    later
        .state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_STATE"))
        .destroy();
    events.extend(later.events);
    assert_eq!(
        one(k(18), TRACEPOINTS, &events).cause,
        ResetCause::LingerZero
    );
}

#[test]
fn tcp_state_before_close_is_tcp_abort() {
    let mut s = Stream::new();
    s.tid = 4242;
    s.active_rst("ESTABLISHED", Some("TCP_STATE"));
    s.state("ESTABLISHED", "CLOSE");
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(d.cause, ResetCause::Killed);
    assert_eq!(d.closer.as_ref().unwrap().pid, 4242);
}

// ---- orphans ----------------------------------------------------------------------------------

#[test]
fn data_after_close_is_one_sent_reset_not_a_received_one() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "FIN_WAIT1");
    s.state("FIN_WAIT1", "FIN_WAIT2").softirq();
    s.rcv_rst("FIN_WAIT2").softirq();
    s.state("FIN_WAIT2", "CLOSE").softirq();
    s.destroy().softirq();
    s.reply_rst(Some("CLOSE"), Some("TCP_ABORT_ON_DATA"))
        .softirq();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence, d.direction),
        (
            ResetCause::DataAfterClose,
            Confidence::Certain,
            Direction::Sent
        )
    );
    assert_eq!(d.counter, Some("TCPAbortOnData"));
    assert_eq!(d.owner.as_ref().unwrap().pid, 7);
    assert!(d.evidence.contains("close() was"), "{}", d.evidence);

    // 6.1: no reason, still the tcp_reset() + reply pair.
    for e in &mut s.events {
        e.rst_reason = None;
    }
    let d = one(k(1), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence),
        (ResetCause::DataAfterClose, Confidence::Derived)
    );
}

#[test]
fn a_real_reset_in_fin_wait2_is_received() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "FIN_WAIT1");
    s.state("FIN_WAIT1", "FIN_WAIT2").softirq();
    s.rcv_rst("FIN_WAIT2").softirq();
    s.state("FIN_WAIT2", "CLOSE").softirq();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.direction, d.confidence),
        (
            ResetCause::PeerReset,
            Direction::Received,
            Confidence::Derived
        )
    );
}

#[test]
fn negative_linger2_at_close_and_on_the_ack_of_fin() {
    let mut s = Stream::new();
    s.state("FIN_WAIT2", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_LINGER"))
        .destroy();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence, d.counter),
        (
            ResetCause::OrphanLinger2,
            Confidence::Certain,
            Some("TCPAbortOnLinger")
        )
    );

    let mut s = Stream::new();
    s.state("ESTABLISHED", "FIN_WAIT1");
    s.state("FIN_WAIT1", "FIN_WAIT2").softirq();
    s.state("FIN_WAIT2", "CLOSE").softirq();
    s.destroy().softirq();
    s.reply_rst(Some("CLOSE"), Some("TCP_ABORT_ON_DATA"))
        .softirq();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.counter),
        (ResetCause::OrphanLinger2, Some("TCPAbortOnData"))
    );
}

#[test]
fn memory_pressure_with_and_without_a_reason() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "FIN_WAIT1")
        .state("FIN_WAIT1", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_MEMORY"))
        .destroy();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence, d.counter),
        (
            ResetCause::MemoryPressure,
            Confidence::Certain,
            Some("TCPAbortOnMemory")
        )
    );
    for e in &mut s.events {
        e.rst_reason = None;
    }
    let d = one(k(1), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence, d.counter),
        (
            ResetCause::MemoryPressure,
            Confidence::Derived,
            Some("TCPAbortOnMemory")
        )
    );
}

// ---- timers ------------------------------------------------------------------------------------

#[test]
fn keepalive_timeout_resets_and_counts_a_timeout() {
    let mut s = Stream::new();
    s.active_rst("ESTABLISHED", Some("TCP_KEEPALIVE_TIMEOUT"))
        .softirq();
    s.state("ESTABLISHED", "CLOSE").softirq();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence, d.counter),
        (
            ResetCause::KeepaliveTimeout,
            Confidence::Certain,
            Some("TCPAbortOnTimeout")
        )
    );
    assert_eq!(d.closer, None);
}

#[test]
fn a_timeout_is_silent_and_only_where_nothing_else_explains_close() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE").softirq();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.direction, d.confidence, d.counter),
        (
            ResetCause::Timeout,
            Direction::Silent,
            Confidence::Derived,
            Some("TCPAbortOnTimeout")
        )
    );
    // A received RST explains it.
    let mut s = Stream::new();
    s.rcv_rst("ESTABLISHED").state("ESTABLISHED", "CLOSE");
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(d.cause, ResetCause::PeerReset);
    // Normal endings are not aborts; FIN_WAIT1 -> CLOSE is one only when tcp_time_wait is seen
    // to be missing.
    let mut s = Stream::new();
    s.state("LAST_ACK", "CLOSE").state("FIN_WAIT2", "CLOSE");
    s.sk = "0xffff888000003000".into();
    s.state("FIN_WAIT1", "CLOSE");
    assert!(diagnose(k(18), TRACEPOINTS, &s.events).is_empty());
    let d = one(k(18), &all_hooks(), &s.events);
    assert_eq!(
        (d.cause, d.direction),
        (ResetCause::Timeout, Direction::Silent)
    );
}

#[test]
fn no_silent_timeout_is_claimed_where_events_were_lost() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE").softirq();
    let at = s.events[0].ts_ns;
    let mut t = tracker(k(18), TRACEPOINTS);
    t.note_lost(at.saturating_sub(1_000_000), false);
    t.note_lost(at + 1_000_000, true); // the RST that explains it may be among the lost
    for e in &s.events {
        t.observe(e);
    }
    assert!(t.flush().is_empty());
    // A loss long before the connection says nothing about it.
    let mut t = tracker(k(18), TRACEPOINTS);
    t.note_lost(1, true);
    t.note_lost(2, false);
    for e in &s.events {
        t.observe(e);
    }
    assert_eq!(t.flush().len(), 1);
}

// ---- replies and received ------------------------------------------------------------------

#[test]
fn replies_for_no_socket_and_time_wait_bump_nothing() {
    let mut s = Stream::new();
    s.reply_rst(None, Some("NO_SOCKET"));
    s.events[0].netns = 0;
    s.events[0].owner = None;
    s.events[0].sk = "0x0".into();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence, d.counter),
        (ResetCause::NoSocket, Confidence::Certain, None)
    );
    assert!(
        d.evidence.contains("nothing listens on port 8080"),
        "{}",
        d.evidence
    );

    let mut s = Stream::new();
    s.state("ESTABLISHED", "FIN_WAIT1");
    s.state("FIN_WAIT1", "FIN_WAIT2").softirq();
    s.state("FIN_WAIT2", "CLOSE").softirq();
    s.destroy().softirq();
    s.sk = "0xffff888000009000".into(); // the minisocket
    s.reply_rst(Some("TIME_WAIT"), None).softirq();
    s.events.last_mut().unwrap().owner = None;
    let d = one(k(1), TRACEPOINTS, &s.events);
    assert_eq!(
        (d.cause, d.confidence, d.counter),
        (ResetCause::TimeWait, Confidence::Derived, None)
    );
    assert_eq!(
        d.owner.as_ref().map(|o| (o.pid, o.source)),
        Some((7, OwnerSource::Inferred))
    );
    assert!(d.evidence.contains("data after close()"), "{}", d.evidence);
}

#[test]
fn a_no_socket_reply_finds_its_namespace_and_the_refused_client_its_cause() {
    // The client (its own socket, mirrored tuple) connects to a closed port.
    let mut client = Stream::new();
    client.sk = "0xffff888000004000".into();
    client.local = 40000;
    client.remote = 8080;
    client.owner = 9;
    client.tid = 9;
    let mut server = Stream::new();
    server.ts = client.ts;
    server.reply_rst(None, Some("NO_SOCKET")).softirq();
    {
        let r = server.events.last_mut().unwrap();
        r.netns = 0;
        r.owner = None;
        r.sk = "0x0".into();
        r.local = Some("127.0.0.2:8080".parse().unwrap());
        r.remote = Some("127.0.0.1:40000".parse().unwrap());
    }
    client.ts = server.ts;
    client.rcv_rst("SYN_SENT").state("SYN_SENT", "CLOSE");
    let mut events = server.events.clone();
    events.extend(client.events.clone());
    let d = diagnose(k(18), TRACEPOINTS, &events);
    assert_eq!(d.len(), 2, "{d:#?}");
    let reply = d.iter().find(|d| d.direction == Direction::Sent).unwrap();
    assert_eq!((reply.cause, reply.netns), (ResetCause::NoSocket, NS));
    let refused = d
        .iter()
        .find(|d| d.direction == Direction::Received)
        .unwrap();
    assert_eq!(refused.cause, ResetCause::PeerReset);
    assert_eq!(refused.owner.as_ref().unwrap().pid, 9);
    assert_eq!(refused.peer_cause, Some(ResetCause::NoSocket));
    assert!(
        refused.evidence.contains("ECONNREFUSED"),
        "{}",
        refused.evidence
    );
}

#[test]
fn a_received_reset_names_the_sender_on_this_host_whatever_the_order() {
    // Loopback: the receiver's softirq runs inside the sender's transmit, before the sender's
    // tracepoint.
    let mut server = Stream::new();
    server.state("ESTABLISHED", "CLOSE");
    let mut client = Stream::new();
    client.sk = "0xffff888000005000".into();
    client.local = 40000;
    client.remote = 8080;
    client.owner = 9;
    client.ts = server.ts;
    client.rcv_rst("ESTABLISHED").softirq();
    client.state("ESTABLISHED", "CLOSE").softirq();
    server.ts = client.ts;
    server
        .active_rst("CLOSE", Some("TCP_ABORT_ON_CLOSE"))
        .destroy();
    for e in &mut client.events {
        e.local = Some("127.0.0.2:40000".parse().unwrap());
        e.remote = Some("127.0.0.1:8080".parse().unwrap());
    }
    let mut events = vec![server.events[0].clone()];
    events.extend(client.events.clone());
    events.extend(server.events[1..].iter().cloned());
    let d = diagnose(k(18), TRACEPOINTS, &events);
    let received = d
        .iter()
        .find(|d| d.direction == Direction::Received)
        .unwrap();
    assert_eq!(received.peer_cause, Some(ResetCause::CloseUnread));
    assert_eq!(received.owner.as_ref().unwrap().pid, 9);
    assert!(
        received.evidence.contains("7/server sent it"),
        "{}",
        received.evidence
    );
}

// ---- the tracker -------------------------------------------------------------------------------

#[test]
fn resets_wait_for_their_settle_window_and_only_the_window_is_tallied() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_CLOSE"))
        .destroy();
    let rst_ts = s.events[1].ts_ns;
    let mut t = tracker(k(18), TRACEPOINTS);
    t.set_count_window(rst_ts + 1, None);
    for e in &s.events {
        t.observe(e);
    }
    assert!(
        t.advance(rst_ts + 1_000).is_empty(),
        "before the settle window"
    );
    let out = t.advance(rst_ts + 50_000_000);
    assert_eq!(out.len(), 1);
    assert!(t.flush().is_empty());
    assert!(t.tally().is_empty(), "outside the counting window");
    assert_eq!(t.by_cause()["sent/close-unread"], 1);
    assert_eq!(t.summary().rows()[0].count, 1);

    let mut t = tracker(k(18), TRACEPOINTS);
    t.set_count_window(rst_ts, Some(rst_ts));
    for e in &s.events {
        t.observe(e);
    }
    t.flush();
    assert_eq!(t.tally()[&NS].exact["TCPAbortOnClose"], 1);
}

#[test]
fn connection_histories_are_bounded() {
    let mut cfg = TrackerConfig::new(k(18), hook_set(TRACEPOINTS));
    cfg.max_connections = 8;
    cfg.max_events_per_connection = 4;
    let mut t = ResetTracker::new(cfg);
    for port in 0..100u16 {
        let mut s = Stream::new();
        s.remote = 1000 + port;
        s.sk = SockPtr(port as u64);
        for _ in 0..10 {
            s.state("ESTABLISHED", "FIN_WAIT1");
        }
        for e in &s.events {
            t.observe(e);
        }
        assert!(t.connections() <= 8);
    }
    // The classification of a late reset still works with what is left.
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_CLOSE"));
    for e in &s.events {
        t.observe(e);
    }
    let out = t.flush();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].cause, ResetCause::CloseUnread);
}

#[test]
fn the_summary_groups_by_process_cause_and_peer() {
    let mut t = tracker(k(18), TRACEPOINTS);
    for i in 0..3u16 {
        let mut s = Stream::new();
        s.ts += u64::from(i) * 1_000_000;
        s.remote = 40000 + i;
        s.sk = SockPtr(i as u64);
        s.state("ESTABLISHED", "CLOSE")
            .active_rst("CLOSE", Some("TCP_ABORT_ON_CLOSE"))
            .destroy();
        for e in &s.events {
            t.observe(e);
        }
    }
    t.flush();
    let rows = t.summary().rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].count, 3);
    assert!(rows[0].last_ns > rows[0].first_ns);
    let text = t.summary().render(|x| x);
    assert!(
        text.contains("close-unread") && text.contains("7/server"),
        "{text}"
    );
    let v = t.summary().json(|x| x);
    assert_eq!(v["rows"][0]["count"], 3);
}

// ---- counters ----------------------------------------------------------------------------------

const NETSTAT: &str = "TcpExt: SyncookiesSent TCPAbortOnData TCPAbortOnClose TCPAbortOnMemory TCPAbortOnTimeout TCPAbortOnLinger TCPAbortFailed
TcpExt: 0 12 7 0 3 1 0
IpExt: InNoRoutes InOctets
IpExt: 0 123456789012
MPTcpExt: MPCapableSYNRX
MPTcpExt: 0
";

#[test]
fn netstat_parses_into_prefixes_and_counters() {
    let all = counters::parse_netstat(NETSTAT).unwrap();
    assert_eq!(all["IpExt"]["InOctets"], 123456789012);
    let t = counters::tcp_ext(NETSTAT).unwrap();
    assert_eq!(t["TCPAbortOnData"], 12);
    assert_eq!(t["TCPAbortOnLinger"], 1);
    for bad in [
        "TcpExt: A B\nTcpExt: 1\n",
        "TcpExt: A\nIpExt: 1\n",
        "TcpExt: A\nTcpExt: x\n",
        "TcpExt: A\n",
        "no colon here\n",
    ] {
        assert!(counters::parse_netstat(bad).is_err(), "{bad:?}");
    }
    assert!(counters::tcp_ext("IpExt: A\nIpExt: 1\n").is_err());
}

#[test]
fn deltas_need_every_counter_and_never_go_backwards() {
    let before = counters::tcp_ext(NETSTAT).unwrap();
    let mut after = before.clone();
    *after.get_mut("TCPAbortOnClose").unwrap() += 2;
    let d = counters::deltas(&before, &after).unwrap();
    assert_eq!(d["TCPAbortOnClose"], 2);
    assert_eq!(d["TCPAbortOnData"], 0);
    *after.get_mut("TCPAbortOnData").unwrap() -= 1;
    let err = counters::deltas(&before, &after).unwrap_err();
    assert!(err.to_string().contains("went backwards"), "{err}");
    let mut missing = before.clone();
    missing.remove("TCPAbortOnMemory");
    let err = counters::deltas(&before, &missing).unwrap_err();
    assert!(err.to_string().contains("TCPAbortOnMemory"), "{err}");
}

fn delta(pairs: &[(&'static str, u64)]) -> BTreeMap<&'static str, u64> {
    counters::ABORT_COUNTERS
        .iter()
        .map(|c| (*c, pairs.iter().find(|(n, _)| n == c).map_or(0, |p| p.1)))
        .collect()
}

fn verdicts(rows: &[counters::CounterRow]) -> BTreeMap<String, CheckVerdict> {
    rows.iter()
        .map(|r| (r.counter.clone(), r.verdict))
        .collect()
}

#[test]
fn the_check_never_lets_the_trace_claim_more_or_less_than_the_kernel() {
    let mut t = Tally::default();
    t.exact.insert("TCPAbortOnClose", 1);
    // Exact.
    let rows = counters::check(&delta(&[("TCPAbortOnClose", 1)]), &t, false);
    assert!(
        rows.iter().all(|r| r.verdict == CheckVerdict::Ok),
        "{rows:#?}"
    );
    // The kernel counted more: a mismatch unfiltered, other traffic when filtered.
    let v = verdicts(&counters::check(
        &delta(&[("TCPAbortOnClose", 2)]),
        &t,
        false,
    ));
    assert_eq!(v["TCPAbortOnClose"], CheckVerdict::Mismatch);
    let v = verdicts(&counters::check(
        &delta(&[("TCPAbortOnClose", 2)]),
        &t,
        true,
    ));
    assert_eq!(v["TCPAbortOnClose"], CheckVerdict::OkOutsideFilter);
    // The trace claims more: a mismatch, filtered or not.
    for filtered in [false, true] {
        let v = verdicts(&counters::check(&delta(&[]), &t, filtered));
        assert_eq!(v["TCPAbortOnClose"], CheckVerdict::Mismatch);
        assert_eq!(v["all"], CheckVerdict::Mismatch);
    }
}

#[test]
fn guesses_give_a_range_and_the_sum_catches_double_counting() {
    let mut t = Tally::default();
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", None)
        .destroy();
    let d = one(k(1), TRACEPOINTS, &s.events);
    t.add(&d);
    // The kernel's counts settle the guess: it was TCPAbortOnData, not TCPAbortOnClose.
    let rows = counters::check(&delta(&[("TCPAbortOnData", 1)]), &t, false);
    let v = verdicts(&rows);
    assert_eq!(v["TCPAbortOnData"], CheckVerdict::OkGuessesSettled);
    assert_eq!(v["TCPAbortOnClose"], CheckVerdict::OkGuessesSettled);
    assert_eq!(v["all"], CheckVerdict::OkGuessesSettled);
    let detail = |c: &str| rows.iter().find(|r| r.counter == c).unwrap().detail.clone();
    assert!(
        detail("TCPAbortOnData").contains("all of them"),
        "{rows:#?}"
    );
    assert!(
        detail("TCPAbortOnClose").contains("none of them"),
        "{rows:#?}"
    );
    // One guess cannot explain one of each.
    let v = verdicts(&counters::check(
        &delta(&[("TCPAbortOnData", 1), ("TCPAbortOnClose", 1)]),
        &t,
        false,
    ));
    assert_eq!(v["TCPAbortOnData"], CheckVerdict::OkGuessesSettled);
    assert_eq!(v["all"], CheckVerdict::Mismatch);
    // Two guesses and one count: a range the counter cannot settle.
    t.add(&d);
    let v = verdicts(&counters::check(
        &delta(&[("TCPAbortOnData", 1), ("TCPAbortOnClose", 0)]),
        &t,
        false,
    ));
    assert_eq!(v["TCPAbortOnData"], CheckVerdict::OkWithinGuesses);
    assert_eq!(v["all"], CheckVerdict::OkWithinGuesses);
}

// ---- agreement with the model ------------------------------------------------------------------

/// The abort counter the model bumps, and the RST it sends, if any.
type ModelSays = (Option<&'static str>, Option<Wire>);

/// The counter (and whether an RST goes out) the model predicts for the last of `inputs`.
fn model_says(params: ModelParams, start: model::State, inputs: &[Input]) -> ModelSays {
    let mut m = Model::with_state(params, start);
    let last = m.run(inputs).pop().unwrap();
    assert!(last.outcome.applicable, "{}", last.outcome.rule);
    let counters: Vec<_> = last
        .outcome
        .counters
        .iter()
        .filter(|c| counters::ABORT_COUNTERS.contains(&c.nstat_name()))
        .collect();
    assert!(counters.len() <= 1);
    (
        counters.first().map(|c| c.nstat_name()),
        last.outcome.wire.iter().copied().find(|w| w.is_rst()),
    )
}

#[test]
fn each_cause_bumps_the_counter_the_model_says() {
    let p = ModelParams::for_kernel(6, 18, 0);
    let est = model::State::established;
    let linger2 = ModelParams {
        tcp_linger2_secs: -1,
        ..p
    };
    let long_fin = ModelParams {
        tcp_fin_timeout_secs: 120,
        ..p
    };
    // (cause, what the model predicts for that teardown, the event stream a kernel emits)
    let mut unread = Stream::new();
    unread
        .state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_CLOSE"))
        .destroy();
    let mut linger0 = Stream::new();
    linger0
        .state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_STATE"))
        .destroy();
    let mut l2 = Stream::new();
    l2.state("FIN_WAIT2", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_LINGER"))
        .destroy();
    let mut l2_fw1 = Stream::new();
    l2_fw1.state("ESTABLISHED", "FIN_WAIT1");
    l2_fw1.state("FIN_WAIT1", "FIN_WAIT2").softirq();
    l2_fw1.state("FIN_WAIT2", "CLOSE").softirq();
    l2_fw1
        .reply_rst(Some("CLOSE"), Some("TCP_ABORT_ON_DATA"))
        .softirq();
    let mut oom = Stream::new();
    oom.state("ESTABLISHED", "FIN_WAIT1")
        .state("FIN_WAIT1", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_MEMORY"))
        .destroy();
    let mut data = Stream::new();
    data.state("ESTABLISHED", "FIN_WAIT1");
    data.state("FIN_WAIT1", "FIN_WAIT2").softirq();
    data.rcv_rst("FIN_WAIT2").softirq();
    data.state("FIN_WAIT2", "CLOSE").softirq();
    data.reply_rst(Some("CLOSE"), Some("TCP_ABORT_ON_DATA"))
        .softirq();
    let mut tw = Stream::new();
    tw.reply_rst(Some("TIME_WAIT"), Some("TCP_TIMEWAIT_SOCKET"))
        .softirq();
    let mut no_sock = Stream::new();
    no_sock.reply_rst(None, Some("NO_SOCKET")).softirq();
    let mut retries = Stream::new();
    retries.state("ESTABLISHED", "FIN_WAIT1");
    retries.state("FIN_WAIT1", "CLOSE").softirq();

    use Input::*;
    let cases: Vec<(ResetCause, ModelSays, &Stream, Vec<&str>)> = vec![
        (
            ResetCause::CloseUnread,
            model_says(p, est(), &[CloseUnread]),
            &unread,
            TRACEPOINTS.to_vec(),
        ),
        (
            ResetCause::LingerZero,
            model_says(p, est(), &[CloseLinger0]),
            &linger0,
            TRACEPOINTS.to_vec(),
        ),
        (
            ResetCause::OrphanLinger2,
            model_says(linger2, est(), &[ShutdownWr, AckOfFin, Close]),
            &l2,
            TRACEPOINTS.to_vec(),
        ),
        (
            ResetCause::OrphanLinger2,
            model_says(linger2, est(), &[Close, AckOfFin]),
            &l2_fw1,
            TRACEPOINTS.to_vec(),
        ),
        (
            ResetCause::MemoryPressure,
            model_says(p, est(), &[MemoryPressure]),
            &oom,
            TRACEPOINTS.to_vec(),
        ),
        (
            ResetCause::DataAfterClose,
            model_says(long_fin, est(), &[Close, AckOfFin, DataAfterClose]),
            &data,
            TRACEPOINTS.to_vec(),
        ),
        (
            ResetCause::TimeWait,
            model_says(p, est(), &[Close, AckOfFin, TwData]),
            &tw,
            TRACEPOINTS.to_vec(),
        ),
        (
            ResetCause::NoSocket,
            model_says(p, model::State::Freed, &[Fin]),
            &no_sock,
            TRACEPOINTS.to_vec(),
        ),
        (
            ResetCause::Timeout,
            model_says(p, est(), &[Close, OrphanRetriesExhausted]),
            &retries,
            all_hooks(),
        ),
    ];
    for (cause, (counter, rst), stream, hooks) in cases {
        let d = one(k(18), &hooks, &stream.events);
        assert_eq!(d.cause, cause, "{d:#?}");
        assert_eq!(d.counter, counter, "{cause}: the model counts {counter:?}");
        let expected_direction = if rst.is_some() {
            Direction::Sent
        } else {
            Direction::Silent
        };
        assert_eq!(
            d.direction, expected_direction,
            "{cause}: model's wire {rst:?}"
        );
    }
    // The model's reset reasons are the kernel's: the names the rules match on.
    assert_eq!(
        model::RstReason::TcpAbortOnClose.kernel_name(),
        "TCP_ABORT_ON_CLOSE"
    );
    assert_eq!(
        TcpExtCounter::TcpAbortOnLinger.nstat_name(),
        "TCPAbortOnLinger"
    );
}

// ---- the pipeline --------------------------------------------------------------------------------

#[test]
fn the_pipeline_prints_resets_inline_or_alone() {
    use crate::pipeline::{Pipeline, model_params};
    use crate::report::{ReportOptions, ResetsView, View};
    use tcp_trace_common::{flag, hook};
    let raws: Vec<_> = [
        (hook::INET_SOCK_SET_STATE, 1u8, 7u8),
        (hook::TCP_SEND_RESET, 7, 0),
        (hook::TCP_DESTROY_SOCK, 7, 0),
    ]
    .iter()
    .enumerate()
    .map(|(i, (h, old, new))| {
        let mut e = decode::tests::v4_event(*h, 8080, 40000);
        e.ts_ns = 1_000_000_000 + i as u64 * 1000;
        e.old_state = *old;
        e.new_state = *new;
        e.flags |= flag::OWNER_KNOWN;
        e.owner_tgid = 7;
        if *h == hook::TCP_SEND_RESET {
            e.flags |= flag::HAS_REASON;
            e.reason = 9;
        }
        e
    })
    .collect();
    for (view, only) in [(View::Both, false), (View::Both, true)] {
        let mut p = Pipeline::new(
            decode::tests::facts(),
            &[],
            model_params("6.18.0", &BTreeMap::new()),
            None,
            ReportOptions {
                json: true,
                view,
                pids: vec![],
                realtime_minus_mono_ns: 0,
                scope: Default::default(),
            },
            Vec::new(),
        );
        if only {
            p.set_resets_view(ResetsView::Only);
        }
        for r in &raws {
            p.event(r).unwrap();
        }
        let summary = p.finish().unwrap();
        let text = String::from_utf8(p.out().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let resets: Vec<_> = lines.iter().filter(|l| l["type"] == "reset").collect();
        assert_eq!(resets.len(), 1, "{text}");
        assert_eq!(resets[0]["cause"], "close-unread");
        assert_eq!(resets[0]["owner"]["pid"], 7);
        assert!(resets[0]["advice"].is_string());
        let others = lines.iter().filter(|l| l["type"] != "reset").count();
        assert_eq!(others == 0, only, "{text}");
        assert_eq!(summary["resets"]["sent/close-unread"], 1);
        assert_eq!(p.resets().tally()[&0].exact["TCPAbortOnClose"], 1);
    }
}

#[test]
fn text_lines_name_time_owner_flow_direction_cause_and_confidence() {
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_CLOSE"))
        .destroy();
    let d = one(k(18), TRACEPOINTS, &s.events);
    let line = reset_line(&d, 3_723_000_004_000);
    assert!(line.starts_with("01:02:03.000004  7/server"), "{line}");
    assert!(line.contains("127.0.0.1:8080 > 127.0.0.2:40000"), "{line}");
    assert!(
        line.contains(" sent ") && line.contains("close-unread (certain) kernel reason"),
        "{line}"
    );
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["cause"], "close-unread");
    assert_eq!(json["confidence"], "certain");
    assert_eq!(json["direction"], "sent");
    assert_eq!(json["counter"], "TCPAbortOnClose");
    assert_eq!(json["closer"]["pid"], 7);
}

#[test]
fn segments_carry_rst_flags_to_the_minisocket() {
    let mut s = Stream::new();
    s.sk = "0xffff888000008000".into();
    s.ev(Hook::TcpTimewaitStateProcess, Some("TIME_WAIT"))
        .segment = Some(Segment {
        flags: "R".into(),
        seq: 1,
        ack: 0,
        len: 0,
        tw_rcv_nxt: 1,
    });
    let d = one(k(12), &all_hooks(), &s.events);
    assert_eq!(
        (d.cause, d.direction),
        (ResetCause::PeerReset, Direction::Received)
    );
}

#[test]
fn a_socket_reused_after_its_destruction_does_not_join_the_old_connection() {
    // The kernel reuses a destroyed socket's memory at once, here for a listener (no 4-tuple).
    let mut s = Stream::new();
    s.state("FIN_WAIT2", "CLOSE")
        .active_rst("CLOSE", Some("TCP_ABORT_ON_LINGER"))
        .destroy();
    s.local = 9999;
    s.remote = 0;
    s.state("CLOSE", "LISTEN")
        .state("LISTEN", "CLOSE")
        .destroy();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(d.cause, ResetCause::OrphanLinger2);
    assert_eq!(
        d.closer.as_ref().map(|c| c.tid),
        Some(7),
        "the close() context was lost"
    );
}

#[test]
fn a_destroy_without_destination_port_still_belongs_to_its_connection() {
    // tcp_disconnect() clears the destination port before the socket is destroyed.
    let mut s = Stream::new();
    s.state("ESTABLISHED", "CLOSE")
        .active_rst("CLOSE", Some("TCP_STATE"));
    s.remote = 0;
    s.destroy();
    let d = one(k(18), TRACEPOINTS, &s.events);
    assert_eq!(d.cause, ResetCause::LingerZero, "{d:#?}");
}

#[test]
fn a_disconnect_is_told_even_though_its_reset_carries_queue_details() {
    // The eBPF side fills an active RST's queue details from the socket whatever sent it, so
    // they are no sign of a close(): only the tcp_close event (or in_close) is.
    let queues = CloseDetails {
        timeout_jiffies: 0,
        linger: false,
        linger_jiffies: 0,
        unread: 0,
        unsent: 0,
        unacked: 0,
        fin_received: false,
        orphan: false,
    };
    for (kernel, reason) in [(k(18), Some("TCP_STATE")), (k(1), None)] {
        for hooks in [TRACEPOINTS.to_vec(), all_hooks()] {
            let mut s = Stream::new();
            s.state("ESTABLISHED", "CLOSE").active_rst("CLOSE", reason);
            s.events.last_mut().unwrap().close = Some(queues);
            let d = one(kernel, &hooks, &s.events);
            assert_eq!(
                d.cause,
                ResetCause::Disconnect,
                "{reason:?} {hooks:?}: {d:#?}"
            );
            assert_eq!(d.counter, None);
            // Destroyed at once, it was a close() after all (SO_LINGER 0 or unread data).
            let mut s = Stream::new();
            s.state("ESTABLISHED", "CLOSE").active_rst("CLOSE", reason);
            s.events.last_mut().unwrap().close = Some(queues);
            s.destroy();
            let d = one(kernel, &hooks, &s.events);
            assert_ne!(
                d.cause,
                ResetCause::Disconnect,
                "{reason:?} {hooks:?}: {d:#?}"
            );
        }
    }
}
