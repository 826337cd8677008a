//! The streaming side: fed every event (after owner attribution and filtering), it keeps a short
//! history per connection, holds each reset (and each possible silent abort) for a settle
//! window, then classifies it with [`classify`] and tallies it.
//!
//! Memory is bounded: at most `max_connections` histories of `max_events_per_connection` events
//! (the least recently touched go first), 4096 children reset by their listener's close, and
//! listeners between their close and their destruction; pending events leave after the settle
//! window.

use std::collections::{BTreeMap, VecDeque};

use foldhash::{HashMap, HashMapExt};
use std::net::SocketAddr;

use crate::decode::{Hook, SockPtr, TraceEvent};
use crate::model::{KernelGeneration, TcpState as S};

use super::classify::{FlowContext, HookSet, classify};
use super::counters::Tally;
use super::summary::Summary;
use super::{Direction, ResetDiagnosis};

/// Settings of a [`ResetTracker`].
#[derive(Clone, Debug)]
pub(crate) struct TrackerConfig {
    pub(crate) kernel: KernelGeneration,
    pub(crate) hooks: HookSet,
    /// A reset is classified once the clock passes its time plus this (the events that decide
    /// it follow within microseconds; this also absorbs cross-CPU reordering).
    pub(crate) settle_ns: u64,
    pub(crate) max_connections: usize,
    pub(crate) max_events_per_connection: usize,
}

impl TrackerConfig {
    /// Defaults: 50 ms settle window, 16384 connections of 24 events.
    pub(crate) fn new(kernel: KernelGeneration, hooks: HookSet) -> TrackerConfig {
        TrackerConfig {
            kernel,
            hooks,
            settle_ns: 50_000_000,
            max_connections: 16_384,
            max_events_per_connection: 24,
        }
    }
}

type Tuple = (SocketAddr, SocketAddr);
type ConnKey = (u32, Tuple);

struct Conn {
    events: Vec<TraceEvent>,
    touched: u64,
}

/// Resets classified as they settle; tallies per network namespace and per process x cause x
/// peer.
pub(crate) struct ResetTracker {
    cfg: TrackerConfig,
    conns: HashMap<ConnKey, Conn>,
    /// The namespaces each 4-tuple was seen in, for events built from a segment (netns 0).
    netns_of_tuple: HashMap<Tuple, Vec<u32>>,
    /// The connection of each socket, for its events without a 4-tuple (tcp_disconnect()
    /// clears the destination port before the socket is destroyed).
    sk_conn: HashMap<SockPtr, ConnKey>,
    sk_order: VecDeque<SockPtr>,
    lru: VecDeque<(ConnKey, u64)>,
    clock: u64,
    /// Listeners between LISTEN -> CLOSE and their destruction (inet_csk_listen_stop() runs in
    /// between), by socket.
    closing_listeners: HashMap<SockPtr, TraceEvent>,
    /// Children that went to CLOSE inside their listener's close(): socket -> the listener's
    /// LISTEN -> CLOSE.
    listener_children: HashMap<SockPtr, TraceEvent>,
    listener_children_order: VecDeque<SockPtr>,
    pending: Vec<TraceEvent>,
    /// Intervals (CLOCK_MONOTONIC ns) in which the kernel dropped events: from the previous
    /// loss check to the one that saw the counter grow.
    losses: Vec<(u64, u64)>,
    last_loss_check: u64,
    window: (u64, Option<u64>),
    tally: BTreeMap<u32, Tally>,
    summary: Summary,
    by_cause: BTreeMap<String, u64>,
    diagnosed: u64,
}

fn tuple(ev: &TraceEvent) -> Option<Tuple> {
    match (ev.local, ev.remote) {
        (Some(l), Some(r)) if r.port() != 0 => Some((l, r)),
        _ => None,
    }
}

fn same_event(a: &TraceEvent, b: &TraceEvent) -> bool {
    a.ts_ns == b.ts_ns && a.hook == b.hook && a.sk == b.sk && a.tid == b.tid && a.cpu == b.cpu
}

/// Whether the tracker must decide something about `ev` once it settles.
fn candidate(ev: &TraceEvent) -> bool {
    match ev.hook {
        Hook::TcpSendReset | Hook::TcpSendActiveReset | Hook::TcpReceiveReset => true,
        Hook::TcpTimewaitStateProcess => ev.segment.as_ref().is_some_and(|s| s.flags.contains('R')),
        Hook::InetSockSetState => {
            ev.tcp_new_state() == Some(S::Close)
                && matches!(
                    ev.tcp_state(),
                    Some(S::Established | S::CloseWait | S::SynSent | S::FinWait1 | S::Closing)
                )
        }
        Hook::TcpClose => ev
            .close
            .as_ref()
            .is_some_and(|c| c.linger && c.linger_jiffies == 0),
        _ => false,
    }
}

impl ResetTracker {
    pub(crate) fn new(cfg: TrackerConfig) -> ResetTracker {
        ResetTracker {
            cfg,
            conns: HashMap::new(),
            netns_of_tuple: HashMap::new(),
            sk_conn: HashMap::new(),
            sk_order: VecDeque::new(),
            lru: VecDeque::new(),
            clock: 0,
            closing_listeners: HashMap::new(),
            listener_children: HashMap::new(),
            listener_children_order: VecDeque::new(),
            pending: Vec::new(),
            losses: Vec::new(),
            last_loss_check: 0,
            window: (0, None),
            tally: BTreeMap::new(),
            summary: Summary::default(),
            by_cause: BTreeMap::new(),
            diagnosed: 0,
        }
    }

    /// Only resets in `[start, end]` (CLOCK_MONOTONIC ns) are tallied for the counter check: the
    /// interval between the two readings of the counters.
    pub(crate) fn set_count_window(&mut self, start: u64, end: Option<u64>) {
        self.window = (start, end);
    }

    /// Per network namespace, what the tallied resets should have added to the TcpExt counters.
    pub(crate) fn tally(&self) -> &BTreeMap<u32, Tally> {
        &self.tally
    }

    /// Process x cause x peer.
    pub(crate) fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Diagnoses per `direction/cause`, e.g. `sent/close-unread`.
    pub(crate) fn by_cause(&self) -> &BTreeMap<String, u64> {
        &self.by_cause
    }

    /// Connection histories kept.
    pub(crate) fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The namespace of a 4-tuple when the event does not know it (a segment with no socket):
    /// the one namespace the tuple (or its mirror) was seen in, else 0.
    fn resolve_netns(&self, ev: &TraceEvent, t: Tuple) -> u32 {
        if ev.netns != 0 {
            return ev.netns;
        }
        let one = |t: &Tuple| match self.netns_of_tuple.get(t).map(Vec::as_slice) {
            Some([n]) => Some(*n),
            _ => None,
        };
        one(&t).or_else(|| one(&(t.1, t.0))).unwrap_or(0)
    }

    /// The connection `ev` belongs to: by 4-tuple, else by socket (until it is destroyed: the
    /// kernel reuses the memory) when the local port agrees.
    fn key_of(&self, ev: &TraceEvent) -> Option<ConnKey> {
        match tuple(ev) {
            Some(t) => Some((self.resolve_netns(ev, t), t)),
            None => self
                .sk_conn
                .get(&ev.sk)
                .filter(|(_, (local, _))| ev.local.map(|a| a.port()) == Some(local.port()))
                .copied(),
        }
    }

    /// One event, in arrival order.
    pub(crate) fn observe(&mut self, ev: &TraceEvent) {
        self.cfg.hooks.insert(ev.hook);
        self.follow_listener_close(ev);
        if let Some(key) = self.key_of(ev) {
            let (netns, t) = key;
            if netns != 0 {
                let list = self.netns_of_tuple.entry(t).or_default();
                if !list.contains(&netns) {
                    list.push(netns);
                }
            }
            if tuple(ev).is_some()
                && !ev.sk.is_null()
                && self.sk_conn.insert(ev.sk, key) != Some(key)
            {
                self.sk_order.push_back(ev.sk);
                if self.sk_order.len() > 2 * self.cfg.max_connections
                    && let Some(old) = self.sk_order.pop_front()
                {
                    self.sk_conn.remove(&old);
                }
            }
            self.clock += 1;
            let clock = self.clock;
            let max = self.cfg.max_events_per_connection;
            let conn = self.conns.entry(key).or_insert_with(|| Conn {
                events: Vec::with_capacity(8),
                touched: clock,
            });
            // A new incarnation of the 4-tuple (connect() from CLOSE, a child of a listener)
            // starts a fresh history.
            if ev.hook == Hook::InetSockSetState
                && matches!(ev.tcp_state(), Some(S::Close | S::Listen))
                && ev.tcp_new_state() != Some(S::Close)
            {
                conn.events.clear();
            }
            conn.events.push(ev.clone());
            if conn.events.len() > max {
                let excess = conn.events.len() - max;
                conn.events.drain(..excess);
            }
            conn.touched = clock;
            self.lru.push_back((key, clock));
            self.evict();
        }
        if ev.hook == Hook::TcpDestroySock {
            self.sk_conn.remove(&ev.sk);
        }
        if candidate(ev) {
            self.pending.push(ev.clone());
        }
    }

    /// close() of a listener: LISTEN -> CLOSE, then inet_csk_listen_stop() disconnects each
    /// un-accepted child (-> CLOSE, RST), then the listener is destroyed; all in the closing
    /// task. A child that goes to CLOSE in between, in that task, was reset by it.
    fn follow_listener_close(&mut self, ev: &TraceEvent) {
        let settle = self.cfg.settle_ns;
        match ev.hook {
            Hook::InetSockSetState
                if ev.tcp_state() == Some(S::Listen) && ev.tcp_new_state() == Some(S::Close) =>
            {
                // A listener whose destruction went unseen must not claim later children.
                self.closing_listeners
                    .retain(|_, l| ev.ts_ns.saturating_sub(l.ts_ns) <= settle);
                self.closing_listeners.insert(ev.sk, ev.clone());
            }
            Hook::TcpDestroySock => {
                self.closing_listeners.remove(&ev.sk);
            }
            Hook::InetSockSetState
                if ev.tcp_new_state() == Some(S::Close)
                    && matches!(
                        ev.tcp_state(),
                        Some(S::Established | S::CloseWait | S::SynRecv)
                    ) =>
            {
                let port = ev.local.map(|a| a.port());
                let listener = self.closing_listeners.values().find(|l| {
                    l.tid == ev.tid
                        && l.netns == ev.netns
                        && l.local.map(|a| a.port()) == port
                        && ev.ts_ns.saturating_sub(l.ts_ns) <= settle
                });
                if let Some(l) = listener {
                    let l = l.clone();
                    self.listener_children.insert(ev.sk, l);
                    self.listener_children_order.push_back(ev.sk);
                    if self.listener_children_order.len() > 4096
                        && let Some(old) = self.listener_children_order.pop_front()
                    {
                        self.listener_children.remove(&old);
                    }
                }
            }
            _ => {}
        }
    }

    fn evict(&mut self) {
        while self.conns.len() > self.cfg.max_connections
            || self.lru.len() > 4 * self.cfg.max_connections.max(1)
        {
            let Some((key, stamp)) = self.lru.pop_front() else {
                break;
            };
            if self.conns.get(&key).is_some_and(|c| c.touched == stamp) {
                self.conns.remove(&key);
                if let Some(list) = self.netns_of_tuple.get_mut(&key.1) {
                    list.retain(|n| *n != key.0);
                    if list.is_empty() {
                        self.netns_of_tuple.remove(&key.1);
                    }
                }
            }
        }
    }

    /// Classifies the resets that settled by `now_ns` (CLOCK_MONOTONIC), oldest first.
    pub(crate) fn advance(&mut self, now_ns: u64) -> Vec<ResetDiagnosis> {
        let settle = self.cfg.settle_ns;
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|e| e.ts_ns.saturating_add(settle) <= now_ns);
        self.pending = keep;
        self.settle(due)
    }

    /// Classifies everything still pending (end of the trace).
    pub(crate) fn flush(&mut self) -> Vec<ResetDiagnosis> {
        let all = std::mem::take(&mut self.pending);
        self.settle(all)
    }

    fn settle(&mut self, mut due: Vec<TraceEvent>) -> Vec<ResetDiagnosis> {
        due.sort_by_key(|e| e.ts_ns);
        let out: Vec<_> = due.iter().filter_map(|ev| self.diagnose(ev)).collect();
        for d in &out {
            self.record(d);
        }
        out
    }

    fn record(&mut self, d: &ResetDiagnosis) {
        self.diagnosed += 1;
        *self
            .by_cause
            .entry(format!("{}/{}", d.direction, d.cause))
            .or_default() += 1;
        self.summary.add(d);
        let (start, end) = self.window;
        if d.ts_ns >= start && end.is_none_or(|e| d.ts_ns <= e) {
            self.tally.entry(d.netns).or_default().add(d);
        }
    }

    /// The history of `ev`'s connection split around `ev`: (before, after).
    fn split<'a>(
        &'a self,
        key: Option<&ConnKey>,
        ev: &TraceEvent,
    ) -> (&'a [TraceEvent], &'a [TraceEvent]) {
        let Some(conn) = key.and_then(|k| self.conns.get(k)) else {
            return (&[], &[]);
        };
        let events = conn.events.as_slice();
        match events.iter().position(|e| same_event(e, ev)) {
            Some(i) => (&events[..i], &events[i + 1..]),
            // Pushed out of the history by later events: everything known is context.
            None => (events, &[]),
        }
    }

    fn context<'a>(
        &'a self,
        ev: &TraceEvent,
        before: &'a [TraceEvent],
        after: &'a [TraceEvent],
        peer_sent: Option<&'a ResetDiagnosis>,
    ) -> FlowContext<'a> {
        let settle = self.cfg.settle_ns;
        let close = before
            .iter()
            .rev()
            .find(|e| e.hook == Hook::TcpClose && e.sk == ev.sk);
        let listener_closed = self.listener_children.get(&ev.sk);
        FlowContext {
            before,
            after,
            close,
            kernel: self.cfg.kernel,
            hooks: self.cfg.hooks,
            listener_closed,
            peer_sent,
            near_ns: settle,
            events_lost: {
                let from = before.first().map_or(ev.ts_ns, |e| e.ts_ns);
                let to = ev.ts_ns.saturating_add(settle);
                self.losses.iter().any(|&(a, b)| a <= to && from <= b)
            },
        }
    }

    /// The last hook went live at `ts_ns`: what happened before may lack the later hooks'
    /// events, as if they had been lost (a missing RST is then no evidence of a silent abort).
    pub(crate) fn note_attached(&mut self, ts_ns: u64) {
        self.losses.push((0, ts_ns));
    }

    /// The kernel's lost-event counter grew by the time `ts_ns` (CLOCK_MONOTONIC).
    pub(crate) fn note_lost(&mut self, ts_ns: u64, grew: bool) {
        if grew {
            self.losses.push((self.last_loss_check, ts_ns));
            if self.losses.len() > 1024 {
                self.losses.remove(0);
            }
        }
        self.last_loss_check = ts_ns;
    }

    fn diagnose(&self, ev: &TraceEvent) -> Option<ResetDiagnosis> {
        let key = self.key_of(ev);
        let (before, after) = self.split(key.as_ref(), ev);
        let peer = if matches!(
            ev.hook,
            Hook::TcpReceiveReset | Hook::TcpTimewaitStateProcess
        ) {
            key.and_then(|k| self.peer_sent(k, ev))
        } else {
            None
        };
        let cx = self.context(ev, before, after, peer.as_ref());
        let mut d = classify(ev, &cx)?;
        if d.netns == 0
            && let Some((netns, _)) = key
        {
            d.netns = netns;
        }
        Some(d)
    }

    /// For a received RST: the RST the other end sent, when that end is traced on this host,
    /// classified in its own context.
    fn peer_sent(
        &self,
        (netns, (local, remote)): ConnKey,
        ev: &TraceEvent,
    ) -> Option<ResetDiagnosis> {
        let mirror = (remote, local);
        let mut keys = vec![(netns, mirror), (0, mirror)];
        if let Some(list) = self.netns_of_tuple.get(&mirror) {
            keys.extend(list.iter().map(|n| (*n, mirror)));
        }
        let settle = self.cfg.settle_ns;
        keys.iter().find_map(|k| {
            let conn = self.conns.get(k)?;
            let sent =
                conn.events.iter().rev().find(|e| {
                    e.hook == Hook::TcpSendReset && e.ts_ns.abs_diff(ev.ts_ns) <= settle
                })?;
            let (before, after) = self.split(Some(k), sent);
            let cx = self.context(sent, before, after, None);
            classify(sent, &cx).filter(|d| d.direction == Direction::Sent)
        })
    }
}
