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
            ev.owner = if closing_reset {
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
                if o.source == OwnerSource::Kernel && ev.owner.is_none() {
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
