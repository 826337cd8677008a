//! Per-flow timelines and verdicts: events joined into flows, each flow checked against the
//! reference [`model`](crate::model). Pure: no I/O, no BPF.
//!
//! # Flows
//! A flow is one connection as this host sees it, keyed by [`FlowKey`] (netns, local, remote):
//! the full socket and, after tcp_time_wait(), its TIME_WAIT minisocket (a different kernel
//! pointer, joined by the key). The two ends of a loopback or veth connection are two flows,
//! linked through [`FlowReport::peer_key`] (mirrored 4-tuple; another netns is fine when exactly
//! one candidate mirrors it). A socket whose tuple is not known yet (SYN_SENT before its port is
//! bound, a listener's child before its addresses are copied) is followed by its `sk` pointer
//! until its tuple shows; listeners (remote end 0, possibly several per port with SO_REUSEPORT)
//! are followed by their pointer throughout. A new SYN_SENT/SYN_RECV/LISTEN on a key whose flow has ended or torn
//! down, or a different socket pointer on a key, starts a new flow (address and pointer reuse).
//!
//! # Using the table
//! ```text
//! let mut table = FlowTable::new(FlowConfig::new(params, attached_hooks(&hooks)));
//! for event in stream { table.push(event); }          // buffered in a reorder window
//! table.note_lost(now_ns, lost_total);                  // whenever the lost counter is read
//! for report in table.advance(now_ns) { ... }           // releases events older than the window
//! for report in table.flush() { ... }                   // end of trace: everything left
//! ```
//! Events from different CPUs arrive slightly out of order: [`FlowTable::push`] holds them and
//! [`FlowTable::advance`] processes, in timestamp order, those older than
//! `now - reorder_window_ns` (`now` on the events' clock, CLOCK_MONOTONIC). A flow is reported once it ends: its socket destroyed with no
//! minisocket left, its minisocket killed (RST, or a SYN that starts a new connection), its
//! minisocket silent for a TIME_WAIT lifetime (presumed expired), its key taken by a new
//! connection, idle past `idle_evict_ns`, or pushed out by the `max_flows` cap (the oldest go
//! first). [`FlowTable::flush`] reports the rest.
//!
//! # Verdicts
//! Each flow's events are fed through the model ([`FlowReport::inputs`] are the inferred model
//! inputs, [`FlowReport::steps`] the model's steps): [`Verdict::Conforms`] lists what was checked
//! and what the attached hooks could not show; [`Verdict::Diverges`] names the first step where
//! the kernel did something else; [`Verdict::Incomplete`] says why no verdict is possible (events
//! lost, no teardown seen, or an event that only an unseen call could explain). A flow whose
//! first event is already mid-teardown starts the model in the observed state.
//! [`FlowReport::observed_summary`] and [`FlowReport::expected_summary`] render the kernel's and
//! the model's path in one format, e.g. `FIN_WAIT1 → FIN_WAIT2 → TW(TIME_WAIT); FIN`.

mod infer;
mod judge;
mod obs;
mod table;
mod timeline;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::Serialize;

use crate::attach::HookStatus;
use crate::decode::{Hook, Owner, TraceEvent};
use crate::model::ModelParams;
use crate::model::TcpState;
use tcp_trace_common::{AnyHook, HookSet};

pub(crate) use table::FlowTable;

/// A flow: this host's end of one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub(crate) struct FlowKey {
    pub(crate) netns: u32,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} > {} (netns {})", self.local, self.remote, self.netns)
    }
}

/// Settings of a [`FlowTable`].
#[derive(Clone, Debug)]
pub(crate) struct FlowConfig {
    /// The kernel generation and sysctls the model decides with.
    pub(crate) params: ModelParams,
    /// Namespaces whose own settings are known (inode -> params): their flows are judged with
    /// these instead of `params`.
    pub(crate) netns_params: BTreeMap<u32, ModelParams>,
    /// Hooks attached, as `attach::HookStatus::hook` names them (`tcp_close`,
    /// `sock:inet_sock_set_state`, ...). Hooks whose events show up count as attached too.
    pub(crate) attached_hooks: HookSet,
    /// The kernel's HZ, to compare tcp_time_wait's timeo (jiffies) with the model's ms.
    pub(crate) hz: Option<u64>,
    /// Events are processed in timestamp order once older than this.
    pub(crate) reorder_window_ns: u64,
    /// A flow with no event for this long is reported and dropped (with a note).
    pub(crate) idle_evict_ns: u64,
    /// At most this many flows are kept; beyond it the oldest is reported and dropped.
    pub(crate) max_flows: usize,
    /// Events kept per flow; beyond it they only count (and the verdict is incomplete).
    pub(crate) max_events_per_flow: usize,
    /// An ended flow waits this long for stragglers (e.g. a RST answering a late segment).
    pub(crate) end_grace_ns: u64,
    /// Past a minisocket's timer before it is presumed expired.
    pub(crate) tw_slack_ns: u64,
    /// Events held in the reorder buffer at most; beyond it the oldest are processed early.
    pub(crate) max_buffered_events: usize,
}

impl FlowConfig {
    /// Defaults: 50 ms reorder window, 120 s idle eviction, 65536 flows.
    pub(crate) fn new(params: ModelParams, attached_hooks: HookSet) -> FlowConfig {
        FlowConfig {
            params,
            netns_params: BTreeMap::new(),
            attached_hooks,
            hz: None,
            reorder_window_ns: 50_000_000,
            idle_evict_ns: 120_000_000_000,
            max_flows: 65_536,
            max_events_per_flow: 256,
            end_grace_ns: 50_000_000,
            tw_slack_ns: 1_000_000_000,
            max_buffered_events: 1 << 20,
        }
    }
}

impl FlowConfig {
    /// The parameters a flow in `netns` is judged with.
    pub(crate) fn params_in(&self, netns: u32) -> ModelParams {
        self.netns_params
            .get(&netns)
            .copied()
            .unwrap_or(self.params)
    }
}

/// The attached event hooks, for [`FlowConfig::attached_hooks`].
/// Whether a socket's state change `from -> to` chains to the state it last entered, `last`:
/// each change leaves the state the one before entered, unless the trace missed one between.
/// A change that starts a socket's life (connect(), listen(), a listener's child) chains to
/// anything: the allocator hands a destroyed socket's memory out again.
pub(crate) fn chains(last: TcpState, from: TcpState, to: TcpState) -> bool {
    use TcpState::{Close, Listen, SynRecv, SynSent};
    last == from || matches!((from, to), (Close | Listen, SynSent | SynRecv | Listen))
}

/// [`chains`] for a decoded state change: what does not chain, e.g. "socket 0x.. entered
/// FIN_WAIT1, then left FIN_WAIT2".
fn chain_gap(last: Option<TcpState>, ev: &TraceEvent) -> Option<String> {
    let (from, to) = (obs::tcp_state(ev.state)?, obs::tcp_state(ev.new_state)?);
    let last = last?;
    (ev.hook == Hook::InetSockSetState && !chains(last, from, to))
        .then(|| format!("socket {} entered {last}, then left {from}", ev.sk))
}

pub(crate) fn attached_hooks(hooks: &[HookStatus]) -> HookSet {
    hooks
        .iter()
        .filter(|h| h.attached())
        .filter_map(|h| match h.id() {
            Some(AnyHook::Event(hook)) => Some(hook),
            _ => None,
        })
        .collect()
}

/// Why a flow was reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FlowEnd {
    /// The socket was destroyed and no minisocket is left.
    Destroyed,
    /// The TIME_WAIT minisocket was killed (RST, TIME_WAIT assassination, a SYN taken by a
    /// listener).
    TimeWaitKilled,
    /// The minisocket was silent for its lifetime: presumed expired (its death has no event).
    TimeWaitExpired,
    /// Reported with its minisocket presumed alive: no attached hook can follow it (tracepoints
    /// only), so its fate is not waited for.
    TimeWaitUnseen,
    /// A new connection (or another socket) took the key.
    Reused,
    /// No event for `idle_evict_ns`.
    IdleEvicted,
    /// Dropped as the oldest flow when the table was full.
    CapacityEvicted,
    /// Still open when the trace ended.
    TraceEnded,
}

impl fmt::Display for FlowEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlowEnd::Destroyed => "destroyed",
            FlowEnd::TimeWaitKilled => "TIME_WAIT killed",
            FlowEnd::TimeWaitExpired => "TIME_WAIT expired (presumed)",
            FlowEnd::TimeWaitUnseen => "in TIME_WAIT (minisocket not followed)",
            FlowEnd::Reused => "4-tuple reused",
            FlowEnd::IdleEvicted => "evicted (idle)",
            FlowEnd::CapacityEvicted => "evicted (table full)",
            FlowEnd::TraceEnded => "open at end of trace",
        })
    }
}

/// Which kernel object an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SocketObject {
    /// The full socket (`struct tcp_sock`).
    Socket,
    /// The TIME_WAIT minisocket.
    TimeWait,
    /// No socket: a reply RST built from the packet.
    Packet,
}

/// One event of a flow, compactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct TimelineEntry {
    pub(crate) ts_ns: u64,
    pub(crate) hook: Hook,
    pub(crate) object: SocketObject,
    pub(crate) sk: crate::decode::SockPtr,
    /// The task on the CPU (in softirq: whatever it interrupted).
    pub(crate) pid: u32,
    pub(crate) comm: crate::decode::Comm,
    /// e.g. `ESTABLISHED -> FIN_WAIT1`, `active reason=TCP_ABORT_ON_CLOSE`.
    pub(crate) detail: String,
}

/// One model step along the inferred inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct StepReport {
    pub(crate) input: String,
    /// Model states, e.g. `FIN_WAIT1+orphan`, `TW:TIME_WAIT`.
    pub(crate) from: String,
    pub(crate) to: String,
    /// The first event the step accounts for; `None` for a step that left no event (an unseen
    /// close(), a minisocket's silent expiry).
    pub(crate) at_ns: Option<u64>,
    /// The kernel function whose rule decided it.
    pub(crate) decided_by: Option<String>,
}

/// How a flow compares with the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub(crate) enum Verdict {
    /// Every observed step is what the model predicts. `checked`: what the events verified;
    /// `unchecked`: what the model says happened that the attached hooks cannot show, and the
    /// ambiguities the events left.
    Conforms {
        checked: Vec<String>,
        unchecked: Vec<String>,
    },
    /// The first model step (1-based, along the inferred inputs) whose prediction the kernel did
    /// not follow.
    Diverges {
        step: usize,
        at_ns: u64,
        input: String,
        expected: String,
        observed: String,
        /// The model's rule, with the kernel function in brackets.
        rule: String,
    },
    /// No verdict: `missing` hooks whose absence prevented one, and why.
    Incomplete {
        missing: Vec<String>,
        reason: String,
    },
}

impl Verdict {
    #[cfg(test)]
    pub(crate) fn conforms(&self) -> bool {
        matches!(self, Verdict::Conforms { .. })
    }

    pub(crate) fn diverges(&self) -> bool {
        matches!(self, Verdict::Diverges { .. })
    }

    /// `conforms`, `diverges`, `incomplete`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Verdict::Conforms { .. } => "conforms",
            Verdict::Diverges { .. } => "diverges",
            Verdict::Incomplete { .. } => "incomplete",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Conforms { checked, unchecked } => write!(
                f,
                "conforms ({} checked, {} unchecked)",
                checked.len(),
                unchecked.len()
            ),
            Verdict::Diverges {
                step,
                input,
                expected,
                observed,
                ..
            } => write!(
                f,
                "DIVERGES at step {step} ({input}): model expects {expected}; kernel did {observed}"
            ),
            Verdict::Incomplete { missing, reason } => {
                write!(f, "incomplete: {reason}")?;
                if !missing.is_empty() {
                    write!(f, " (missing hooks: {})", missing.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

/// A finished flow: its events, the inputs inferred from them, and the verdict.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FlowReport {
    /// Unique within one table.
    pub(crate) id: u64,
    pub(crate) key: FlowKey,
    /// The other end's flow, when it is on this host too.
    pub(crate) peer_key: Option<FlowKey>,
    pub(crate) peer_id: Option<u64>,
    pub(crate) owner: Option<Owner>,
    /// Kernel pointers of the full socket and of the minisocket.
    pub(crate) sockets: Vec<crate::decode::SockPtr>,
    pub(crate) first_ns: u64,
    pub(crate) last_ns: u64,
    pub(crate) end: FlowEnd,
    pub(crate) timeline: Vec<TimelineEntry>,
    /// Events beyond `max_events_per_flow`, counted but not kept.
    pub(crate) events_dropped: u64,
    /// Something beyond connection setup was seen (false: e.g. an idle ESTABLISHED connection
    /// evicted, or still open at the end of the trace).
    pub(crate) teardown: bool,
    /// Model input names, in order.
    pub(crate) inputs: Vec<String>,
    pub(crate) steps: Vec<StepReport>,
    pub(crate) verdict: Verdict,
    /// The kernel's path, e.g. `ESTABLISHED → FIN_WAIT1 → FIN_WAIT2 → TW(FIN_WAIT2); FIN`.
    pub(crate) observed: String,
    /// The model's path along `inputs`, in the same format.
    pub(crate) expected: String,
    pub(crate) notes: Vec<String>,
}

impl FlowReport {
    /// What the kernel did, in one line (same format as [`FlowReport::expected_summary`]).
    pub(crate) fn observed_summary(&self) -> &str {
        &self.observed
    }

    /// What the model predicted along the inferred inputs, as far as the attached hooks show.
    pub(crate) fn expected_summary(&self) -> &str {
        &self.expected
    }

    /// Whether a step took input `name` from a state that starts with `from` (e.g. `fin` from
    /// `FIN_WAIT1`).
    #[cfg(test)]
    pub(crate) fn has_step(&self, name: &str, from: &str) -> bool {
        self.steps
            .iter()
            .any(|s| s.input == name && s.from.starts_with(from))
    }
}
