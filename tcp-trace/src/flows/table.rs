//! The flow table: a reorder buffer in front, flows keyed by (netns, local, remote) and by socket
//! pointer, peer links, lifetimes (socket destroyed, minisocket killed or presumed expired, key
//! reused, idle, capacity), and the report each flow becomes when it ends.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use foldhash::{HashMap, HashMapExt};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::Serialize;

use crate::decode::{Hook, KReason, Owner, OwnerSource, SockPtr, TraceEvent};
use crate::model::{Model, RstReason, State, TCP_TIMEWAIT_LEN_MS, TcpState, TwStatus, TwSubstate};

use super::infer::classify_tw_segment;
use super::judge::{JudgeCtx, is_setup_transition, judge};
use super::obs::{Visibility, tcp_state, tw_substate};
use super::timeline::{entry, object_of};
use super::{FlowConfig, FlowEnd, FlowKey, FlowReport, SocketObject, Verdict};

const NS_PER_MS: u64 = 1_000_000;
const TIMEWAIT_LEN_NS: u64 = TCP_TIMEWAIT_LEN_MS * NS_PER_MS;
/// A RST this close to a FIN_WAIT2/CLOSING -> CLOSE belongs to it (no minisocket then).
const RST_NEAR_NS: u64 = 5 * NS_PER_MS;
/// Note on flows whose minisocket no attached hook can follow.
const TW_UNSEEN_NOTE: &str = "the TIME_WAIT minisocket is invisible without tcp_time_wait or \
     tcp_timewait_state_process: the flow is reported shortly after its full socket closed, and \
     later events of the 4-tuple start a new flow";
fn idle_note(idle_ns: u64) -> String {
    format!(
        "evicted after {} s without an event",
        idle_ns / 1_000_000_000
    )
}

/// Loss intervals remembered (older ones are merged).
const MAX_LOSS_INTERVALS: usize = 64;

/// Counters of what the table did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct FlowStats {
    pub(crate) events: u64,
    /// Events with neither a 4-tuple nor a socket pointer: no flow to put them in.
    pub(crate) unattributed: u64,
    /// Events older than what the table had already processed (beyond the reorder window).
    pub(crate) late_events: u64,
    pub(crate) flows_started: u64,
    pub(crate) flows_reported: u64,
    pub(crate) evicted_idle: u64,
    pub(crate) evicted_capacity: u64,
    /// Events processed before their reorder window passed because the buffer was full.
    pub(crate) released_early: u64,
}

/// Events waiting to be processed in time order: a heap of small keys (time, arrival) over a
/// slab of events, so that reordering moves 24-byte keys rather than whole events.
#[derive(Default)]
struct ReorderBuffer {
    heap: BinaryHeap<Reverse<(u64, u64, u32)>>,
    slots: Vec<Option<TraceEvent>>,
    free: Vec<u32>,
    seq: u64,
}

impl ReorderBuffer {
    fn push(&mut self, ev: TraceEvent) {
        let ts = ev.ts_ns;
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(ev);
                i
            }
            None => {
                self.slots.push(Some(ev));
                (self.slots.len() - 1) as u32
            }
        };
        self.seq += 1;
        self.heap.push(Reverse((ts, self.seq, slot)));
    }

    /// The time of the oldest event.
    fn oldest(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((ts, _, _))| *ts)
    }

    fn pop(&mut self) -> Option<TraceEvent> {
        let Reverse((_, _, slot)) = self.heap.pop()?;
        self.free.push(slot);
        self.slots[slot as usize].take()
    }

    fn len(&self) -> usize {
        self.heap.len()
    }
}

/// A TIME_WAIT minisocket known (tcp_time_wait, TW hooks) or presumed (FIN_WAIT2/CLOSING ->
/// CLOSE with no reset near it) to exist.
#[derive(Clone, Debug)]
struct TwTrack {
    start: u64,
    deadline: u64,
    substate: Option<TwSubstate>,
    presumed: bool,
    /// No attached hook can see the minisocket: the flow is reported when `deadline` (shortly
    /// after the full socket closed) passes, with the minisocket presumed still alive.
    unseen: bool,
    /// The last segment's entry says it dies; the return hook confirms.
    pending_kill: bool,
}

struct Flow {
    id: u64,
    key: FlowKey,
    /// The key has both ports (a listener's: its local end); otherwise the flow is followed by
    /// its socket pointer until an event shows the tuple.
    key_complete: bool,
    peer: Option<(u64, FlowKey)>,
    events: Vec<TraceEvent>,
    dropped: u64,
    first_ts: u64,
    last_ts: u64,
    full_sk: Option<SockPtr>,
    sockets: Vec<SockPtr>,
    full_gone: bool,
    tw: Option<TwTrack>,
    tw_killed: bool,
    tw_expired: bool,
    teardown_seen: bool,
    last_rst: Option<u64>,
    ended: Option<(u64, FlowEnd)>,
    lost: bool,
    /// The first event processed was the connection's set-up (a state change into SYN_SENT,
    /// SYN_RECV, ...): nothing of it came before.
    seen_from_start: bool,
    /// The state the flow's full socket last entered, to tell a change the trace missed.
    last_state: Option<(SockPtr, TcpState)>,
    /// A state change that did not chain to the one before: an event is missing.
    gap: Option<String>,
    notes: Vec<String>,
    /// When `expire` looks at this flow next (its entry in `FlowTable::deadlines`); `u64::MAX`:
    /// not scheduled.
    next_check: u64,
}

impl Flow {
    fn recent_rst(&self, ts: u64) -> bool {
        self.last_rst.is_some_and(|t| ts.abs_diff(t) <= RST_NEAR_NS)
    }
}

/// Flows, built from events; see the module docs.
pub(crate) struct FlowTable {
    cfg: FlowConfig,
    vis: Visibility,
    heap: ReorderBuffer,
    /// Events at or before this have been processed.
    watermark: u64,
    max_ts: u64,
    flows: HashMap<u64, Flow>,
    /// (time, flow id): when each flow may end by timing out (grace after its end, TIME_WAIT
    /// deadline, idleness), so that aging costs O(flows due), not a walk over the table.
    /// Entries whose time is not the flow's `next_check` are stale and skipped.
    deadlines: BinaryHeap<Reverse<(u64, u64)>>,
    by_key: HashMap<FlowKey, u64>,
    by_sk: HashMap<SockPtr, u64>,
    /// (local, remote) -> flows, across netns: for peer links.
    by_addr: HashMap<(SocketAddr, SocketAddr), Vec<u64>>,
    /// Flow ids in creation order (stale ids skipped): the capacity cap evicts from the front.
    order: VecDeque<u64>,
    next_id: u64,
    ready: Vec<FlowReport>,
    lost_total: u64,
    lost_checked_ns: u64,
    lost_intervals: VecDeque<(u64, u64)>,
    /// When the last hook was attached (CLOCK_MONOTONIC): a flow alive before then may miss
    /// the events of hooks attached after it began.
    attached_ns: Option<u64>,
    stats: FlowStats,
}

fn is_null_sk(sk: &SockPtr) -> bool {
    sk.is_null()
}

/// A v4-mapped IPv6 address as plain IPv4: a dual-stack listener's child and a v4 client see
/// the same connection with different address families.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn addr_key(local: SocketAddr, remote: SocketAddr) -> (SocketAddr, SocketAddr) {
    (canonical(local), canonical(remote))
}

fn unspecified() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

/// The flow's owner: the process that last held the socket in user space, as the kernel learned
/// it in process context (an accept()ing worker, the last close()); else one userspace
/// inferred; else a provisional one (a listener's owner before accept); else the task that
/// called close(). Earlier events with a provisional owner are the final owner's too.
fn owner_of(events: &[TraceEvent]) -> Option<Owner> {
    let last = |want: &dyn Fn(&Owner) -> bool| {
        events
            .iter()
            .rev()
            .filter_map(|e| e.owner.as_ref())
            .find(|o| want(o))
            .copied()
    };
    last(&|o| o.source == OwnerSource::Kernel)
        .or_else(|| last(&|o| o.is_definite()))
        .or_else(|| last(&|_| true))
        .or_else(|| {
            events
                .iter()
                .find(|e| e.hook == Hook::TcpClose)
                .map(|e| Owner {
                    pid: e.pid,
                    comm: e.comm,
                    source: OwnerSource::Inferred,
                    cgroup_id: 0,
                })
        })
}

impl FlowTable {
    /// From now on, flows in `netns` are judged with `params` (that namespace's own settings),
    /// or with the defaults (None). At most 4096 namespaces keep settings of their own.
    pub(crate) fn set_netns_params(
        &mut self,
        netns: u32,
        params: Option<crate::model::ModelParams>,
    ) {
        let map = &mut self.cfg.netns_params;
        match params {
            Some(p) => {
                if !map.contains_key(&netns) && map.len() >= 4096 {
                    map.pop_first();
                }
                map.insert(netns, p);
            }
            None => {
                map.remove(&netns);
            }
        }
    }

    pub(crate) fn new(config: FlowConfig) -> FlowTable {
        let mut vis = Visibility::from_hooks(config.attached_hooks);
        vis.reply_reset_without_full_socket = config.params.kernel.passive_reset_reasons;
        FlowTable {
            cfg: config,
            vis,
            heap: ReorderBuffer::default(),
            watermark: 0,
            max_ts: 0,
            flows: HashMap::new(),
            deadlines: BinaryHeap::new(),
            by_key: HashMap::new(),
            by_sk: HashMap::new(),
            by_addr: HashMap::new(),
            order: VecDeque::new(),
            next_id: 1,
            ready: Vec::new(),
            lost_total: 0,
            lost_checked_ns: 0,
            lost_intervals: VecDeque::new(),
            attached_ns: None,
            stats: FlowStats::default(),
        }
    }

    /// Late, early-released and evicted events (counted; only the tests read them yet).
    #[cfg(test)]
    pub(crate) fn stats(&self) -> FlowStats {
        self.stats
    }

    /// Flows in the table (open, or ended and waiting out their grace period).
    pub(crate) fn live_flows(&self) -> usize {
        self.flows.len()
    }

    /// Events waiting in the reorder buffer.
    pub(crate) fn buffered_events(&self) -> usize {
        self.heap.len()
    }

    /// Queues one event; [`FlowTable::advance`] or [`FlowTable::flush`] processes it.
    pub(crate) fn push(&mut self, ev: TraceEvent) {
        if ev.ts_ns < self.watermark {
            self.stats.late_events += 1;
        }
        self.max_ts = self.max_ts.max(ev.ts_ns);
        self.heap.push(ev);
        while self.heap.len() > self.cfg.max_buffered_events.max(1) {
            if let Some(ev) = self.heap.pop() {
                self.stats.released_early += 1;
                self.watermark = self.watermark.max(ev.ts_ns);
                self.ingest(ev);
            }
        }
    }

    /// The caller read the kernel's lost-event counter (`total`) at `ts_ns`. If it grew, every
    /// flow alive since the previous reading may have lost events: their verdict becomes
    /// `Incomplete (events lost)`.
    /// The hooks were attached one after the other, the last at `ts_ns`: a flow that began
    /// before then is judged knowing that events of the later hooks may be missing.
    pub(crate) fn note_attached(&mut self, ts_ns: u64) {
        self.attached_ns = Some(ts_ns);
    }

    pub(crate) fn note_lost(&mut self, ts_ns: u64, total: u64) {
        if total > self.lost_total {
            let from = self.lost_checked_ns.min(ts_ns);
            self.lost_intervals.push_back((from, ts_ns));
            while self.lost_intervals.len() > MAX_LOSS_INTERVALS {
                if let Some((start, _)) = self.lost_intervals.pop_front()
                    && let Some(next) = self.lost_intervals.front_mut()
                {
                    next.0 = next.0.min(start);
                }
            }
            let window = self.cfg.reorder_window_ns;
            for flow in self.flows.values_mut() {
                if flow.ended.is_none() || flow.last_ts.saturating_add(window) >= from {
                    flow.lost = true;
                }
            }
            self.lost_total = total;
        }
        self.lost_checked_ns = self.lost_checked_ns.max(ts_ns);
    }

    /// Processes the events older than `now_ns - reorder_window_ns`, ages flows against that
    /// time, and returns the flows that ended.
    pub(crate) fn advance(&mut self, now_ns: u64) -> Vec<FlowReport> {
        let mark = now_ns.saturating_sub(self.cfg.reorder_window_ns);
        while self.heap.oldest().is_some_and(|ts| ts <= mark) {
            if let Some(ev) = self.heap.pop() {
                self.ingest(ev);
            }
        }
        self.watermark = self.watermark.max(mark);
        self.expire(mark);
        self.compact_order();
        std::mem::take(&mut self.ready)
    }

    /// End of trace: processes everything buffered and reports every flow, ended or not.
    pub(crate) fn flush(&mut self) -> Vec<FlowReport> {
        while let Some(ev) = self.heap.pop() {
            self.ingest(ev);
        }
        self.watermark = self.watermark.max(self.max_ts);
        self.expire(self.max_ts);
        let mut ids: Vec<(u64, u64)> = self.flows.values().map(|f| (f.first_ts, f.id)).collect();
        ids.sort_unstable();
        for (_, id) in ids {
            self.finish(id, FlowEnd::TraceEnded, None);
        }
        self.order.clear();
        std::mem::take(&mut self.ready)
    }

    fn ingest(&mut self, ev: TraceEvent) {
        use TcpState::*;
        self.stats.events += 1;
        self.vis.add(ev.hook);
        let object = object_of(&ev);
        let key = match (ev.local, ev.remote) {
            (Some(local), Some(remote)) => Some(FlowKey {
                netns: ev.netns,
                local,
                remote,
            }),
            _ => None,
        };
        let from = tcp_state(ev.state);
        let to = (ev.hook == Hook::InetSockSetState)
            .then(|| tcp_state(ev.new_state))
            .flatten();
        // A key identifies a connection once both ends are known. Listeners (remote 0, and
        // several may share a port with SO_REUSEPORT), a SYN_SENT socket before its port is
        // bound and a listener's child before its addresses are copied are followed by their
        // socket pointer instead.
        // CLOSE -> SYN_SENT fires in tcp_v4_connect() before inet_hash_connect() binds the
        // port: a socket connecting again after connect(AF_UNSPEC) still shows its old one.
        let connecting = from == Some(Close) && to == Some(SynSent);
        let complete = !connecting
            && key.is_some_and(|k| {
                k.local.port() != 0 && k.remote.port() != 0 && !k.remote.ip().is_unspecified()
            });
        let sk = (object == SocketObject::Socket)
            .then_some(ev.sk)
            .filter(|s| !is_null_sk(s));
        if key.is_none() && sk.is_none() {
            self.stats.unattributed += 1;
            return;
        }
        let starts_connection = matches!(
            (from, to),
            (Some(Close | Listen), Some(SynSent | SynRecv | Listen))
        );

        // The socket's own flow first (its tuple may not be known yet), then the key's.
        let mut target = None;
        if let Some(sk) = &sk
            && let Some(&id) = self.by_sk.get(sk)
        {
            let f = &self.flows[&id];
            let same_key = !complete || !f.key_complete || key == Some(f.key);
            // A socket's life starts in CLOSE (or as a listener's child): anything already seen
            // under its pointer was an earlier socket's, whose end was not seen (events lost).
            let pointer_reused =
                starts_connection && (f.teardown_seen || f.ended.is_some() || !f.events.is_empty());
            // The application kept it through tcp_disconnect() and connects it again: the old
            // connection ends here, in CLOSE.
            let reconnects = pointer_reused
                && connecting
                && f.ended.is_none()
                && !f.full_gone
                && f.last_state == Some((*sk, Close));
            if same_key && !pointer_reused {
                target = Some(id);
            } else {
                self.by_sk.remove(sk);
                if reconnects {
                    self.finish(id, FlowEnd::Reused, Some("the socket connected again"));
                }
            }
        }
        if target.is_none()
            && complete
            && let Some(k) = key
        {
            target = self.by_key.get(&k).copied();
        }
        // A reply the kernel built for no socket (reason NO_SOCKET), past the deadline of the
        // flow's minisocket: its timer ran out (no hook shows that, and the table's slack has
        // not yet presumed it), so the flow ended there and the reply is of its own.
        if let Some(id) = target
            && ev.hook == Hook::TcpSendReset
            && ev.rst_active == Some(false)
            && ev.rst_reason == Some(KReason::Known(RstReason::NoSocket))
            && let Some(f) = self.flows.get_mut(&id)
            && f.full_gone
            && f.ended.is_none()
            && let Some(deadline) =
                f.tw.as_ref()
                    .filter(|tw| !tw.unseen && tw.deadline <= ev.ts_ns)
                    .map(|tw| tw.deadline)
        {
            f.tw = None;
            f.tw_expired = true;
            f.ended = Some((deadline, FlowEnd::TimeWaitExpired));
            target = None;
        }
        if let Some(id) = target {
            let f = &self.flows[&id];
            let other_socket =
                sk.is_some() && f.full_sk != sk && (f.full_sk.is_some() || f.full_gone);
            let new_connection = starts_connection
                && (f.teardown_seen || f.full_gone || f.tw.is_some() || f.ended.is_some());
            // Under churn a client reuses its port as soon as its own socket is gone, while
            // this end is still inside close() on another CPU: the new connection takes the
            // key and the old socket, still followed by its pointer, keeps its flow until its
            // own end shows.
            let still_closing = other_socket
                && f.ended.is_none()
                && !f.full_gone
                && f.teardown_seen
                && f.full_sk
                    .is_some_and(|own| self.by_sk.get(&own) == Some(&id));
            if still_closing {
                if let Some(f) = self.flows.get_mut(&id) {
                    f.notes.push(
                        "a new connection took this 4-tuple while this socket was still closing"
                            .into(),
                    );
                    let old_key = f.key;
                    self.by_key.remove(&old_key);
                }
                target = None;
            } else if other_socket || new_connection {
                let note = if f.ended.is_none() && !f.full_gone {
                    "another socket took this 4-tuple before this one's end was seen"
                } else if f.tw.is_some() {
                    "a new connection took the 4-tuple while the minisocket was alive"
                } else {
                    "a new connection took the 4-tuple"
                };
                self.finish(id, FlowEnd::Reused, Some(note));
                target = None;
            }
        }
        let id = match target {
            Some(id) => id,
            None => self.start_flow(&ev, object, key, complete),
        };
        if complete
            && let Some(k) = key
            && !self.flows[&id].key_complete
        {
            self.rekey(id, k);
        }
        if let Some(sk) = &sk
            && let Some(f) = self.flows.get_mut(&id)
            && f.full_sk.as_ref().is_none_or(|own| own == sk)
        {
            f.full_sk = Some(*sk);
            if ev.hook == Hook::TcpDestroySock || f.full_gone {
                self.by_sk.remove(sk);
            } else {
                self.by_sk.insert(*sk, id);
            }
        }
        self.track(id, ev, object, from, to);
        self.schedule(id);
    }

    /// The time from which `expire` has something to do with `f`.
    fn due(&self, f: &Flow) -> u64 {
        if let Some((t, _)) = f.ended {
            t.saturating_add(self.cfg.end_grace_ns)
        } else if let Some(tw) = &f.tw {
            if tw.unseen && !f.full_gone {
                // Reported once the socket is destroyed (that event reschedules it).
                f.last_ts.saturating_add(self.cfg.idle_evict_ns)
            } else if tw.unseen {
                tw.deadline.saturating_add(self.cfg.end_grace_ns)
            } else {
                tw.deadline.saturating_add(self.cfg.tw_slack_ns)
            }
        } else {
            f.last_ts.saturating_add(self.cfg.idle_evict_ns)
        }
    }

    /// Makes sure `expire` looks at flow `id` by its due time. A later due time (the flow saw
    /// another event) needs no new entry: the old one is found early and re-queued then.
    fn schedule(&mut self, id: u64) {
        let Some(f) = self.flows.get(&id) else {
            return;
        };
        let due = self.due(f);
        if due < f.next_check {
            if let Some(f) = self.flows.get_mut(&id) {
                f.next_check = due;
            }
            self.deadlines.push(Reverse((due, id)));
        }
    }

    fn start_flow(
        &mut self,
        ev: &TraceEvent,
        object: SocketObject,
        key: Option<FlowKey>,
        complete: bool,
    ) -> u64 {
        self.make_room();
        let id = self.next_id;
        self.next_id += 1;
        let key = key.unwrap_or(FlowKey {
            netns: ev.netns,
            local: unspecified(),
            remote: unspecified(),
        });
        let flow = Flow {
            id,
            key,
            key_complete: false,
            peer: None,
            events: Vec::with_capacity(8),
            dropped: 0,
            first_ts: ev.ts_ns,
            last_ts: ev.ts_ns,
            full_sk: None,
            sockets: Vec::new(),
            // First seen from its minisocket or as a bare packet: no full socket we know of.
            full_gone: object != SocketObject::Socket,
            tw: None,
            tw_killed: false,
            tw_expired: false,
            teardown_seen: false,
            last_rst: None,
            ended: None,
            lost: false,
            seen_from_start: false,
            last_state: None,
            gap: None,
            notes: Vec::new(),
            next_check: u64::MAX,
        };
        self.flows.insert(id, flow);
        self.order.push_back(id);
        self.stats.flows_started += 1;
        if complete {
            self.rekey(id, key);
        }
        id
    }

    /// Gives a flow its (now known) key: the key's previous flow ends, the peer is linked.
    fn rekey(&mut self, id: u64, key: FlowKey) {
        if let Some(&other) = self.by_key.get(&key)
            && other != id
        {
            self.finish(
                other,
                FlowEnd::Reused,
                Some("a new connection took the 4-tuple"),
            );
        }
        if let Some(f) = self.flows.get_mut(&id) {
            f.key = key;
            f.key_complete = true;
        }
        self.by_key.insert(key, id);
        self.by_addr
            .entry(addr_key(key.local, key.remote))
            .or_default()
            .push(id);
        self.link_peer(id);
    }

    /// Links `id` with the flow of the connection's other end: the mirrored tuple, in the same
    /// netns or, failing that, in exactly one other.
    fn link_peer(&mut self, id: u64) {
        let Some(f) = self.flows.get(&id) else { return };
        let key = f.key;
        if f.peer.is_some()
            || !f.key_complete
            || key.remote.port() == 0
            || key.local.port() == 0
            || canonical(key.local) == canonical(key.remote)
        {
            return;
        }
        let candidates: Vec<u64> = self
            .by_addr
            .get(&addr_key(key.remote, key.local))
            .into_iter()
            .flatten()
            .copied()
            .filter(|c| *c != id && self.flows.get(c).is_some_and(|o| o.peer.is_none()))
            .collect();
        let pick = |list: &[u64]| -> Option<u64> {
            let same_ns: Vec<u64> = list
                .iter()
                .copied()
                .filter(|c| self.flows[c].key.netns == key.netns)
                .collect();
            match (same_ns.len(), list.len()) {
                (1, _) => Some(same_ns[0]),
                (0, 1) => Some(list[0]),
                _ => None,
            }
        };
        let live: Vec<u64> = candidates
            .iter()
            .copied()
            .filter(|c| self.flows[c].ended.is_none())
            .collect();
        let chosen = if live.is_empty() {
            pick(&candidates)
        } else {
            pick(&live)
        };
        match chosen {
            Some(peer) => {
                let peer_key = self.flows[&peer].key;
                if let Some(f) = self.flows.get_mut(&id) {
                    f.peer = Some((peer, peer_key));
                }
                if let Some(p) = self.flows.get_mut(&peer) {
                    p.peer = Some((id, key));
                }
            }
            None if candidates.len() > 1 => {
                if let Some(f) = self.flows.get_mut(&id) {
                    f.notes.push(format!(
                        "{} flows mirror this one's 4-tuple: peer not linked",
                        candidates.len()
                    ));
                }
            }
            None => {}
        }
    }

    /// Evicts the oldest flows while the table is at its cap.
    fn make_room(&mut self) {
        let cap = self.cfg.max_flows.max(1);
        while self.flows.len() >= cap {
            let Some(id) = self.order.pop_front() else {
                break;
            };
            if self.flows.contains_key(&id) {
                self.stats.evicted_capacity += 1;
                let note = format!("evicted: the table was full ({cap} flows)");
                self.finish(id, FlowEnd::CapacityEvicted, Some(&note));
            }
        }
    }

    fn compact_order(&mut self) {
        if self.order.len() > 2 * self.flows.len() + 1024 {
            let flows = &self.flows;
            self.order.retain(|id| flows.contains_key(id));
        }
    }

    /// Updates a flow's lifetime with one event and stores the event.
    fn track(
        &mut self,
        id: u64,
        ev: TraceEvent,
        object: SocketObject,
        from: Option<TcpState>,
        to: Option<TcpState>,
    ) {
        use TcpState::*;
        let Some(netns) = self.flows.get(&id).map(|f| f.key.netns) else {
            return;
        };
        let params = self.cfg.params_in(netns);
        let hz = self.cfg.hz;
        let vis = self.vis;
        let max_events = self.cfg.max_events_per_flow;
        let Some(f) = self.flows.get_mut(&id) else {
            return;
        };
        let ts = ev.ts_ns;
        f.first_ts = f.first_ts.min(ts);
        f.last_ts = f.last_ts.max(ts);
        if !is_null_sk(&ev.sk) && !f.sockets.contains(&ev.sk) {
            f.sockets.push(ev.sk);
        }
        if ev.hook == Hook::InetSockSetState && object == SocketObject::Socket {
            let last = f.last_state.filter(|(sk, _)| *sk == ev.sk).map(|(_, s)| s);
            if f.gap.is_none() {
                f.gap = super::chain_gap(last, &ev);
            }
            if let Some(to) = to {
                f.last_state = Some((ev.sk, to));
            }
        }
        let setup = matches!((from, to), (Some(a), Some(b)) if is_setup_transition(a, b));
        if f.events.is_empty() && f.dropped == 0 {
            f.seen_from_start = setup;
        }
        if !setup {
            f.teardown_seen = true;
        }
        let new_tw =
            |start: u64, life: u64, substate: Option<TwSubstate>, presumed: bool| TwTrack {
                start,
                deadline: start.saturating_add(life),
                substate,
                presumed,
                unseen: false,
                pending_kill: false,
            };
        match ev.hook {
            Hook::InetSockSetState if to == Some(Close) => {
                // tcp_time_wait() ends the full socket with tcp_done(): FIN_WAIT2/CLOSING ->
                // CLOSE with no reset near it means a minisocket lives on (invisible without the
                // tcp_time_wait hook).
                if matches!(from, Some(FinWait2 | Closing)) && f.tw.is_none() && !f.recent_rst(ts) {
                    // Without a minisocket hook nothing of its life can be seen: waiting out
                    // TIME_WAIT (60 s) would only hold the flow, and its memory, for a minute.
                    // It is reported like any ended flow, after the end grace.
                    let unseen = !(vis.has(Hook::TcpTimeWait)
                        || vis.has(Hook::TcpTimewaitStateProcess)
                        || vis.has(Hook::TcpTimewaitStateProcessReturn));
                    let life = if unseen { 0 } else { TIMEWAIT_LEN_NS };
                    f.tw = Some(TwTrack {
                        unseen,
                        ..new_tw(ts, life, None, true)
                    });
                }
                if !vis.has(Hook::TcpDestroySock) {
                    f.full_gone = true;
                }
            }
            Hook::TcpTimeWait => {
                let substate = tw_substate(ev.new_state);
                let life_ms = match substate {
                    Some(TwSubstate::FinWait2) => {
                        let timeo_ms = match (ev.timeo_jiffies, hz) {
                            (Some(j), Some(hz)) if hz > 0 => {
                                u64::try_from(j).unwrap_or(0).saturating_mul(1000) / hz
                            }
                            // Without HZ, the kernel's rule: past TCP_TIMEWAIT_LEN the keepalive
                            // timer waited the excess first, and the minisocket gets what is left.
                            _ => match params.fin_time_ms() {
                                ft if ft > TCP_TIMEWAIT_LEN_MS => ft - TCP_TIMEWAIT_LEN_MS,
                                ft => ft,
                            },
                        };
                        timeo_ms.max(params.rto_floor_ms()).min(TCP_TIMEWAIT_LEN_MS)
                    }
                    _ => TCP_TIMEWAIT_LEN_MS,
                };
                f.tw = Some(new_tw(ts, life_ms * NS_PER_MS, substate, false));
            }
            Hook::TcpTimewaitStateProcess => {
                let seen = tw_substate(ev.state);
                let tw =
                    f.tw.get_or_insert_with(|| new_tw(ts, TIMEWAIT_LEN_NS, seen, false));
                tw.presumed = false;
                if seen.is_some() {
                    tw.substate = seen;
                }
                // What the model makes of the segment: the minisocket killed, re-armed, or left.
                if let Some(seg) = &ev.segment
                    && let Some(&input) = classify_tw_segment(seg).first()
                {
                    let now = State::time_wait(tw.substate.unwrap_or(TwSubstate::TimeWait));
                    let step = Model::with_state(params, now).step(input);
                    match &step.outcome.next {
                        State::TimeWait(next) => {
                            tw.substate = Some(next.substate);
                            if step.outcome.timer.is_some() {
                                tw.deadline = ts.saturating_add(TIMEWAIT_LEN_NS);
                            }
                        }
                        _ => tw.pending_kill = true,
                    }
                }
                if !vis.has(Hook::TcpTimewaitStateProcessReturn) && tw.pending_kill {
                    f.tw = None;
                    f.tw_killed = true;
                }
            }
            Hook::TcpTimewaitStateProcessReturn => {
                let seen = tw_substate(ev.state);
                let tw =
                    f.tw.get_or_insert_with(|| new_tw(ts, TIMEWAIT_LEN_NS, seen, false));
                tw.presumed = false;
                if let Some(after) = tw_substate(ev.new_state) {
                    tw.substate = Some(after);
                }
                let kill = match ev.tw_verdict() {
                    Some(TwStatus::Rst) => true,
                    Some(TwStatus::Syn) => params.listener_on_port,
                    Some(TwStatus::Success) => tw.pending_kill,
                    Some(TwStatus::Ack | TwStatus::AckOow) | None => false,
                };
                tw.pending_kill = false;
                if kill {
                    f.tw = None;
                    f.tw_killed = true;
                }
            }
            // The minisocket's reply to a segment it does not accept: do_time_wait kills it.
            Hook::TcpSendReset
                if ev.rst_active == Some(false)
                    && (object == SocketObject::TimeWait
                        || ev.reason() == Some(RstReason::TcpTimewaitSocket))
                    && f.tw.is_some() =>
            {
                f.tw = None;
                f.tw_killed = true;
            }
            Hook::TcpSendReset | Hook::TcpSendActiveReset | Hook::TcpReceiveReset
                if object == SocketObject::Socket =>
            {
                f.last_rst = Some(ts);
                // A reset right after FIN_WAIT2 -> CLOSE (TCP_LINGER2 < 0) means no minisocket.
                if f.tw
                    .as_ref()
                    .is_some_and(|tw| tw.presumed && ts.abs_diff(tw.start) <= RST_NEAR_NS)
                {
                    f.tw = None;
                }
            }
            Hook::TcpDestroySock if f.full_sk.is_none() || f.full_sk == Some(ev.sk) => {
                f.full_gone = true;
            }
            _ => {}
        }
        if f.events.len() < max_events {
            f.events.push(ev);
        } else {
            f.dropped += 1;
        }
        if f.ended.is_none() && f.full_gone && f.tw.is_none() {
            let end = if f.tw_killed {
                FlowEnd::TimeWaitKilled
            } else {
                FlowEnd::Destroyed
            };
            f.ended = Some((ts, end));
        }
    }

    /// Reports ended flows past their grace period, presumes silent minisockets expired, and
    /// evicts idle flows.
    fn expire(&mut self, now: u64) {
        let idle = self.cfg.idle_evict_ns;
        let mut done: Vec<(u64, FlowEnd, Option<String>)> = Vec::new();
        let mut later = Vec::new();
        while let Some(&Reverse((t, id))) = self.deadlines.peek() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            let Some(f) = self.flows.get_mut(&id) else {
                continue;
            };
            if f.next_check != t {
                continue;
            }
            f.next_check = u64::MAX;
            if let Some((t, end)) = f.ended {
                if t.saturating_add(self.cfg.end_grace_ns) <= now {
                    done.push((id, end, None));
                } else {
                    later.push(id);
                }
                continue;
            }
            if let Some(tw) = &f.tw {
                if tw.unseen {
                    if f.full_gone && tw.deadline.saturating_add(self.cfg.end_grace_ns) <= now {
                        f.ended = Some((tw.deadline, FlowEnd::TimeWaitUnseen));
                        f.notes.push(TW_UNSEEN_NOTE.to_string());
                        done.push((id, FlowEnd::TimeWaitUnseen, None));
                        continue;
                    }
                    if !f.full_gone && f.last_ts.saturating_add(idle) <= now {
                        done.push((id, FlowEnd::IdleEvicted, Some(idle_note(idle))));
                        continue;
                    }
                } else if tw.deadline.saturating_add(self.cfg.tw_slack_ns) <= now {
                    let deadline = tw.deadline;
                    f.tw = None;
                    f.tw_expired = true;
                    if f.full_gone {
                        f.ended = Some((deadline, FlowEnd::TimeWaitExpired));
                        done.push((id, FlowEnd::TimeWaitExpired, None));
                        continue;
                    }
                }
                later.push(id);
                continue;
            }
            if f.last_ts.saturating_add(idle) <= now {
                done.push((id, FlowEnd::IdleEvicted, Some(idle_note(idle))));
            } else {
                later.push(id);
            }
        }
        for id in later {
            self.schedule(id);
        }
        done.sort_unstable_by_key(|(id, _, _)| *id);
        for (id, end, note) in done {
            if end == FlowEnd::IdleEvicted {
                self.stats.evicted_idle += 1;
            }
            self.finish(id, end, note.as_deref());
        }
    }

    fn lost_overlaps(&self, first: u64, last: u64) -> bool {
        let w = self.cfg.reorder_window_ns;
        self.lost_intervals
            .iter()
            .any(|&(a, b)| a <= last.saturating_add(w) && b.saturating_add(w) >= first)
    }

    /// Removes a flow from the table and queues its report.
    fn finish(&mut self, id: u64, end: FlowEnd, note: Option<&str>) {
        let Some(mut flow) = self.flows.remove(&id) else {
            return;
        };
        let end = match flow.ended {
            Some((_, end)) => end,
            None => {
                if let Some(note) = note {
                    flow.notes.push(note.to_string());
                }
                end
            }
        };
        if self.by_key.get(&flow.key) == Some(&id) {
            self.by_key.remove(&flow.key);
        }
        for sk in &flow.sockets {
            if self.by_sk.get(sk) == Some(&id) {
                self.by_sk.remove(sk);
            }
        }
        let addr = addr_key(flow.key.local, flow.key.remote);
        if let Some(list) = self.by_addr.get_mut(&addr) {
            list.retain(|x| *x != id);
            if list.is_empty() {
                self.by_addr.remove(&addr);
            }
        }
        let report = self.report(flow, end);
        self.stats.flows_reported += 1;
        self.ready.push(report);
    }

    fn report(&self, flow: Flow, end: FlowEnd) -> FlowReport {
        let params = self.cfg.params_in(flow.key.netns);
        let cx = JudgeCtx {
            params: &params,
            vis: self.vis,
            hz: self.cfg.hz,
        };
        let judged_end = if flow.tw_expired && end != FlowEnd::TimeWaitKilled {
            FlowEnd::TimeWaitExpired
        } else {
            end
        };
        let judgement = judge(&flow.events, &cx, judged_end);
        let mut notes = flow.notes;
        notes.extend(judgement.notes);
        // A flow first seen mid-life may have lost its earlier events to any loss before it was
        // first seen, however long before (a connection opened during an overflow, closed later).
        let lost = flow.lost
            || self.lost_overlaps(flow.first_ts, flow.last_ts)
            || (!flow.seen_from_start
                && self
                    .lost_intervals
                    .front()
                    .is_some_and(|&(from, _)| from <= flow.first_ts));
        let verdict = if lost {
            Verdict::Incomplete {
                missing: Vec::new(),
                reason: format!(
                    "events lost (the kernel's buffer overflowed) during this flow's life; \
                     from what arrived: {}",
                    judgement.verdict
                ),
            }
        } else if flow.dropped > 0 {
            Verdict::Incomplete {
                missing: Vec::new(),
                reason: format!(
                    "{} events beyond the per-flow cap were not kept; from the first {}: {}",
                    flow.dropped,
                    flow.events.len(),
                    judgement.verdict
                ),
            }
        } else if let Some(gap) = flow
            .gap
            .as_ref()
            .filter(|_| !matches!(judgement.verdict, Verdict::Conforms { .. }))
        {
            Verdict::Incomplete {
                missing: Vec::new(),
                reason: format!(
                    "an event is missing from the trace ({gap}; no loss was counted); from \
                     what arrived: {}",
                    judgement.verdict
                ),
            }
        } else if judgement.verdict.diverges()
            && self.attached_ns.is_some_and(|t| flow.first_ts < t)
        {
            Verdict::Incomplete {
                missing: Vec::new(),
                reason: format!(
                    "began while tcp-trace was attaching its hooks, so events of the hooks \
                     attached later may be missing; from what arrived: {}",
                    judgement.verdict
                ),
            }
        } else {
            judgement.verdict
        };
        let mut events = flow.events;
        events.sort_by_key(|e| e.ts_ns);
        FlowReport {
            id: flow.id,
            key: flow.key,
            peer_key: flow.peer.map(|(_, key)| key),
            peer_id: flow.peer.map(|(id, _)| id),
            owner: owner_of(&events),
            sockets: flow.sockets,
            first_ns: flow.first_ts,
            last_ns: flow.last_ts,
            end,
            timeline: events.iter().map(entry).collect(),
            events_dropped: flow.dropped,
            teardown: judgement.teardown,
            inputs: judgement.inputs,
            steps: judgement.steps,
            verdict,
            observed: judgement.observed,
            expected: judgement.expected,
            notes,
        }
    }
}
