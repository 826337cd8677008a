//! Who owns a socket, as userspace can tell from the stream. The eBPF side records owners it saw
//! in process context; this fills the gaps it cannot: a TIME_WAIT minisocket (a different kernel
//! object) inherits the owner of the full socket that became it, found by (netns, 4-tuple); an
//! active reset sent from close() names the closer even where no close hook is attached.

use std::collections::VecDeque;
use std::net::SocketAddr;

use foldhash::{HashMap, HashMapExt};

use crate::decode::{Hook, Owner, OwnerSource, SockPtr, TraceEvent};
use crate::model::{RstReason, TcpState};

type TupleKey = (u32, SocketAddr, SocketAddr);

/// Reset reasons that the kernel only gives in the closing task's context (__tcp_close,
/// tcp_disconnect).
const CLOSE_CONTEXT_REASONS: [RstReason; 2] =
    [RstReason::TcpAbortOnClose, RstReason::TcpAbortOnLinger];

/// Bounded maps from socket to owner; the oldest entries go first.
pub(crate) struct Owners {
    /// Each entry with the stamp of the `remember` that wrote it.
    by_sk: HashMap<SockPtr, (Owner, u64)>,
    by_tuple: HashMap<TupleKey, (Owner, u64)>,
    /// What was remembered, oldest first; an entry whose stamp no longer matches its map's is
    /// stale (overwritten or removed) and is dropped when the queue is compacted.
    order: VecDeque<(Remembered, u64)>,
    stamp: u64,
    capacity: usize,
}

#[derive(Clone, Copy)]
enum Remembered {
    Sk(SockPtr),
    Tuple(TupleKey),
}

impl Default for Owners {
    fn default() -> Self {
        Self::with_capacity(200_000)
    }
}

impl Owners {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            by_sk: HashMap::new(),
            by_tuple: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
            capacity,
        }
    }

    fn remember(&mut self, sk: Option<SockPtr>, tuple: Option<TupleKey>, owner: &Owner) {
        self.stamp += 1;
        let stamp = self.stamp;
        if let Some(sk) = sk {
            self.by_sk.insert(sk, (*owner, stamp));
            self.order.push_back((Remembered::Sk(sk), stamp));
        }
        if let Some(t) = tuple {
            self.by_tuple.insert(t, (*owner, stamp));
            self.order.push_back((Remembered::Tuple(t), stamp));
        }
        while self.len() > self.capacity {
            let Some((what, stamp)) = self.order.pop_front() else {
                break;
            };
            self.forget_if(what, stamp);
        }
        // Destroyed sockets leave stale entries behind: keep the queue proportional to what
        // is remembered, not to every socket ever seen.
        if self.order.len() > 2 * self.len() + 1024 {
            let (by_sk, by_tuple) = (&self.by_sk, &self.by_tuple);
            self.order.retain(|&(what, stamp)| match what {
                Remembered::Sk(sk) => by_sk.get(&sk).is_some_and(|e| e.1 == stamp),
                Remembered::Tuple(t) => by_tuple.get(&t).is_some_and(|e| e.1 == stamp),
            });
        }
    }

    fn forget_if(&mut self, what: Remembered, stamp: u64) {
        match what {
            Remembered::Sk(sk) => {
                if self.by_sk.get(&sk).is_some_and(|e| e.1 == stamp) {
                    self.by_sk.remove(&sk);
                }
            }
            Remembered::Tuple(t) => {
                if self.by_tuple.get(&t).is_some_and(|e| e.1 == stamp) {
                    self.by_tuple.remove(&t);
                }
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_sk.len() + self.by_tuple.len()
    }

    /// Fills `ev.owner` where the kernel did not know it, and learns from `ev`.
    pub(crate) fn attribute(&mut self, ev: &mut TraceEvent) {
        let tuple = match (ev.local, ev.remote) {
            (Some(l), Some(r)) => Some((ev.netns, l, r)),
            _ => None,
        };
        let is_tw = matches!(
            ev.hook,
            Hook::TcpTimewaitStateProcess | Hook::TcpTimewaitStateProcessReturn
        ) || ev.tcp_state() == Some(TcpState::TimeWait);

        if ev.owner.is_none() {
            let closing_reset = matches!(ev.hook, Hook::TcpSendReset | Hook::TcpSendActiveReset)
                && ev.rst_active == Some(true)
                && ev
                    .reason()
                    .is_some_and(|r| CLOSE_CONTEXT_REASONS.contains(&r));
            ev.owner = if closing_reset || ev.in_close {
                Some(Owner {
                    pid: ev.pid,
                    comm: ev.comm,
                    source: OwnerSource::Inferred,
                    cgroup_id: 0,
                })
            } else if is_tw {
                tuple.and_then(|t| self.by_tuple.get(&t)).map(|e| e.0)
            } else {
                self.by_sk.get(&ev.sk).map(|e| e.0)
            }
            .map(|mut o| {
                if o.source == OwnerSource::Kernel {
                    o.source = OwnerSource::Inferred;
                }
                o
            });
        }

        let Some(owner) = ev.owner else {
            return;
        };
        match ev.hook {
            // The full socket is about to become a minisocket with the same tuple.
            Hook::TcpTimeWait => self.remember(Some(ev.sk), tuple, &owner),
            Hook::TcpDestroySock => {
                self.by_sk.remove(&ev.sk);
            }
            _ if is_tw => {}
            _ => {
                if self.by_sk.get(&ev.sk).map(|e| e.0) != Some(owner) {
                    self.remember(Some(ev.sk), None, &owner)
                }
            }
        }
    }
}

/// `--pid`: which events to keep, decided by owner. An event whose owner is provisional or
/// unknown may yet turn out to be a traced process's (a listener's child before accept(), a
/// socket passed on after fork or over SCM_RIGHTS): it is held, per socket, until an event of
/// that socket names a definite owner (the held events then go with that decision), or the
/// socket is destroyed (its provisional owner decides), or the gate is full (the socket held
/// longest is decided first, by its provisional owner). Nothing a traced process owns is lost
/// that way, and nothing another owns is shown.
///
/// A socket's address is reused once it is freed, and its end may never come: the kernel drops
/// the rest of a held socket's events when they name a definite owner that is not traced. So
/// held events of another connection than the one an event of the same address belongs to are
/// decided against before that event is taken.
pub(crate) struct PidGate {
    pids: Vec<u32>,
    /// Held events per socket, with the stamp of when the socket started waiting.
    held: HashMap<SockPtr, (u64, Vec<TraceEvent>)>,
    /// Waiting sockets, oldest first; an entry whose stamp no longer matches is stale.
    order: VecDeque<(SockPtr, u64)>,
    stamp: u64,
    held_events: usize,
    capacity: usize,
    /// Events decided against (owned by another process, or never owned by a known one).
    pub(crate) dropped: u64,
    /// Events that waited for their owner.
    pub(crate) waited: u64,
}

impl PidGate {
    pub(crate) fn new(pids: Vec<u32>) -> Self {
        Self::with_capacity(pids, 100_000)
    }

    pub(crate) fn with_capacity(pids: Vec<u32>, capacity: usize) -> Self {
        Self {
            pids,
            held: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
            held_events: 0,
            capacity,
            dropped: 0,
            waited: 0,
        }
    }

    /// Events held now.
    pub(crate) fn held_events(&self) -> usize {
        self.held_events
    }

    fn wants(&self, owner: Option<&Owner>) -> bool {
        owner.is_some_and(|o| self.pids.contains(&o.pid))
    }

    /// Takes one attributed event; appends to `out` the events now decided for (in order).
    pub(crate) fn admit(&mut self, ev: TraceEvent, out: &mut Vec<TraceEvent>) {
        if self
            .held
            .get(&ev.sk)
            .and_then(|(_, list)| list.first())
            .is_some_and(|first| other_connection(first, &ev))
        {
            // The old connection's end was not seen (lost): decide it by its provisional owner,
            // as a flush does, so that a traced process's events are not thrown away.
            let keep = self.last_owner_wanted(ev.sk);
            self.release(ev.sk, keep, None, out);
        }
        let definite = ev.owner.filter(Owner::is_definite);
        if definite.is_some() || ev.sk.0 == 0 {
            // A definite owner decides for the socket's held events too. A reply without a
            // socket has no owner to wait for.
            let keep = self.wants(definite.as_ref());
            self.release(ev.sk, keep, definite, out);
            self.decide(ev, keep, out);
            return;
        }
        let sk = ev.sk;
        let ends = ev.hook == Hook::TcpDestroySock;
        let provisional = ev.owner;
        match self.held.get_mut(&sk) {
            Some((_, list)) => list.push(ev),
            None => {
                self.stamp += 1;
                self.held.insert(sk, (self.stamp, vec![ev]));
                self.order.push_back((sk, self.stamp));
            }
        }
        self.held_events += 1;
        self.waited += 1;
        if ends {
            let keep = self.wants(provisional.as_ref());
            self.release(sk, keep, None, out);
        }
        while self.held_events > self.capacity {
            let Some((oldest, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.held.get(&oldest).is_some_and(|e| e.0 == stamp) {
                let keep = self.last_owner_wanted(oldest);
                self.release(oldest, keep, None, out);
            }
        }
        if self.order.len() > 2 * self.held.len() + 1024 {
            let held = &self.held;
            self.order
                .retain(|(sk, stamp)| held.get(sk).is_some_and(|e| e.0 == *stamp));
        }
    }

    fn last_owner_wanted(&self, sk: SockPtr) -> bool {
        let owner = self
            .held
            .get(&sk)
            .and_then(|(_, l)| l.iter().rev().find_map(|e| e.owner));
        self.wants(owner.as_ref())
    }

    fn decide(&mut self, ev: TraceEvent, keep: bool, out: &mut Vec<TraceEvent>) {
        if keep {
            out.push(ev);
        } else {
            self.dropped += 1;
        }
    }

    /// Decides for `sk`'s held events. `owner`: the definite owner that settled it, which the
    /// held events (unknown or provisional until now) are attributed to.
    fn release(
        &mut self,
        sk: SockPtr,
        keep: bool,
        owner: Option<Owner>,
        out: &mut Vec<TraceEvent>,
    ) {
        let Some((_, list)) = self.held.remove(&sk) else {
            return;
        };
        self.held_events -= list.len();
        for mut ev in list {
            if let Some(mut o) = owner {
                o.source = OwnerSource::Inferred;
                ev.owner = Some(o);
            }
            self.decide(ev, keep, out);
        }
    }

    /// End of trace: every held socket is decided by its provisional owner, oldest first.
    /// (Only sockets whose last events the kernel did not drop are left: see [`PidGate`].)
    pub(crate) fn flush(&mut self, out: &mut Vec<TraceEvent>) {
        while let Some((sk, stamp)) = self.order.pop_front() {
            if self.held.get(&sk).is_some_and(|e| e.0 == stamp) {
                let keep = self.last_owner_wanted(sk);
                self.release(sk, keep, None, out);
            }
        }
    }
}

/// Whether two events of one socket address belong to different connections: another network
/// namespace or peer, or another local address once both are bound (a connect()ing socket's
/// first event may come before its local port is chosen).
fn other_connection(a: &TraceEvent, b: &TraceEvent) -> bool {
    let bound = |l: Option<SocketAddr>| l.filter(|l| l.port() != 0);
    a.netns != b.netns
        || (a.remote.is_some() && b.remote.is_some() && a.remote != b.remote)
        || matches!((bound(a.local), bound(b.local)), (Some(x), Some(y)) if x != y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode, tests as d};
    use tcp_trace_common::{flag, hook};

    fn owned(h: u8, owner: u32) -> TraceEvent {
        let mut ev = d::v4_event(h, 40000, 80);
        if owner != 0 {
            ev.flags |= flag::OWNER_KNOWN;
            ev.owner_tgid = owner;
        }
        decode(&ev, &d::facts()).unwrap()
    }

    #[test]
    fn later_softirq_events_get_the_learned_owner() {
        let mut o = Owners::default();
        let mut first = owned(hook::INET_SOCK_SET_STATE, 10);
        o.attribute(&mut first);
        let mut later = owned(hook::TCP_RECEIVE_RESET, 0);
        later.pid = 999; // the interrupted task
        o.attribute(&mut later);
        let owner = later.owner.unwrap();
        assert_eq!((owner.pid, owner.source), (10, OwnerSource::Inferred));
    }

    #[test]
    fn time_wait_minisocket_inherits_by_tuple() {
        let mut o = Owners::default();
        let mut tw_call = owned(hook::TCP_TIME_WAIT, 10);
        o.attribute(&mut tw_call);
        let mut seg = owned(hook::TW_STATE_PROCESS, 0);
        seg.sk = "0xdead".into(); // a different object
        o.attribute(&mut seg);
        assert_eq!(seg.owner.unwrap().pid, 10);
    }

    #[test]
    fn close_reset_names_the_closer() {
        let mut o = Owners::default();
        let mut ev = d::v4_event(hook::TCP_SEND_RESET, 1, 2);
        ev.flags = flag::HAS_REASON;
        ev.reason = 9; // TCP_ABORT_ON_CLOSE in the fake kernel
        ev.tgid = 55;
        let mut t = decode(&ev, &d::facts()).unwrap();
        o.attribute(&mut t);
        assert_eq!(t.owner.unwrap().pid, 55);
    }

    fn provisional(h: u8, owner: u32) -> TraceEvent {
        let mut ev = d::v4_event(h, 40000, 80);
        ev.flags |= flag::OWNER_KNOWN | flag::OWNER_PROVISIONAL;
        ev.owner_tgid = owner;
        decode(&ev, &d::facts()).unwrap()
    }

    fn admitted(gate: &mut PidGate, evs: Vec<TraceEvent>) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        for ev in evs {
            gate.admit(ev, &mut out);
        }
        out
    }

    #[test]
    fn pid_gate_holds_until_a_definite_owner_decides() {
        // A listener's child (provisionally 10's) accepted by 20: --pid 20 keeps it all, with
        // the handshake attributed to 20; --pid 10 shows none of it.
        let events = || {
            vec![
                provisional(hook::INET_SOCK_SET_STATE, 10),
                owned(hook::TCP_RECEIVE_RESET, 0),
                owned(hook::INET_SOCK_SET_STATE, 20),
                owned(hook::TCP_DESTROY_SOCK, 20),
            ]
        };
        let mut gate = PidGate::new(vec![20]);
        let kept = admitted(&mut gate, events());
        assert_eq!(kept.len(), 4);
        assert!(kept.iter().all(|e| e.owner.is_some_and(|o| o.pid == 20)));
        assert_eq!(kept[0].owner.unwrap().source, OwnerSource::Inferred);
        let mut gate = PidGate::new(vec![10]);
        assert!(admitted(&mut gate, events()).is_empty());
        assert_eq!((gate.dropped, gate.held_events()), (4, 0));
    }

    #[test]
    fn pid_gate_decides_by_the_provisional_owner_at_the_end_or_when_full() {
        let mut gate = PidGate::new(vec![10]);
        let out = admitted(
            &mut gate,
            vec![
                provisional(hook::INET_SOCK_SET_STATE, 10),
                provisional(hook::TCP_DESTROY_SOCK, 10),
            ],
        );
        assert_eq!(out.len(), 2);
        let mut gate = PidGate::with_capacity(vec![10], 3);
        let mut out = Vec::new();
        for i in 0..5u64 {
            let mut ev = d::v4_event(hook::INET_SOCK_SET_STATE, 1, 2);
            ev.sk = 0x1000 + i;
            ev.flags |= flag::OWNER_KNOWN | flag::OWNER_PROVISIONAL;
            ev.owner_tgid = 10;
            gate.admit(decode(&ev, &d::facts()).unwrap(), &mut out);
        }
        assert_eq!((out.len(), gate.held_events()), (2, 3));
        gate.flush(&mut out);
        assert_eq!((out.len(), gate.held_events()), (5, 0));
        // An event nobody ever owns is not shown.
        let mut gate = PidGate::new(vec![10]);
        let mut out = Vec::new();
        gate.admit(owned(hook::INET_SOCK_SET_STATE, 0), &mut out);
        gate.flush(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn pid_gate_does_not_give_a_reused_addresss_held_events_to_the_next_connection() {
        // A child of 10's listener, accepted by 30 (the kernel drops the rest of it for --pid
        // 20: its end never comes); then the same address is a child 20 accepts.
        let mut next = owned(hook::INET_SOCK_SET_STATE, 20);
        next.remote = Some("127.0.0.2:50001".parse().unwrap());
        let mut gate = PidGate::new(vec![20]);
        let out = admitted(
            &mut gate,
            vec![provisional(hook::INET_SOCK_SET_STATE, 10), next.clone()],
        );
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].remote, next.remote);
        assert_eq!((gate.dropped, gate.held_events()), (1, 0));
        // One connection whose local port is learned after its first event is still one.
        let mut unbound = provisional(hook::INET_SOCK_SET_STATE, 10);
        unbound.local = Some("127.0.0.1:0".parse().unwrap());
        let mut gate = PidGate::new(vec![20]);
        let out = admitted(
            &mut gate,
            vec![unbound, owned(hook::INET_SOCK_SET_STATE, 20)],
        );
        assert_eq!(out.len(), 2, "{out:?}");
    }

    #[test]
    fn destroy_forgets_and_capacity_bounds() {
        let mut o = Owners::with_capacity(4);
        for i in 0..10u16 {
            let mut ev = d::v4_event(hook::INET_SOCK_SET_STATE, i, 80);
            ev.sk = i as u64 + 1;
            ev.flags |= flag::OWNER_KNOWN;
            ev.owner_tgid = 1;
            o.attribute(&mut decode(&ev, &d::facts()).unwrap());
        }
        assert!(o.len() <= 4);
        let mut d1 = owned(hook::INET_SOCK_SET_STATE, 3);
        o.attribute(&mut d1);
        let mut gone = owned(hook::TCP_DESTROY_SOCK, 3);
        o.attribute(&mut gone);
        let mut after = owned(hook::TCP_RECEIVE_RESET, 0);
        o.attribute(&mut after);
        assert!(after.owner.is_none());
    }
}
