//! The human rendering of a flow: a header, one line per event with its time relative to the
//! flow's first, the inferred inputs, the model's and the kernel's path, and the verdict.

use std::fmt::Write as _;

use crate::decode::{Hook, KState, TraceEvent};
use crate::model::TcpState;

use super::{FlowReport, SocketObject, TimelineEntry, Verdict};

/// Events shown per flow; the rest are summarised in one line.
const MAX_LINES: usize = 40;
/// Unchecked items listed under a conforming verdict.
const MAX_UNCHECKED: usize = 8;

/// Which kernel object produced `ev`.
pub(crate) fn object_of(ev: &TraceEvent) -> SocketObject {
    match ev.hook {
        Hook::TcpTimewaitStateProcess | Hook::TcpTimewaitStateProcessReturn => {
            SocketObject::TimeWait
        }
        Hook::TcpSendReset if ev.rst_active == Some(false) => match ev.state {
            None => SocketObject::Packet,
            Some(s) if s.tcp() == Some(TcpState::TimeWait) => SocketObject::TimeWait,
            Some(_) => SocketObject::Socket,
        },
        _ => SocketObject::Socket,
    }
}

/// What one event says, e.g. `ESTABLISHED -> FIN_WAIT1`.
pub(crate) fn describe(ev: &TraceEvent) -> String {
    let state = ev.state.map_or("?", KState::name);
    let new_state = ev.new_state.map_or("?", KState::name);
    match ev.hook {
        Hook::InetSockSetState => format!("{state} -> {new_state}"),
        Hook::TcpClose => match &ev.close {
            Some(c) => {
                let mut s = format!("{state} unread={} unsent={}", c.unread, c.unsent);
                if c.linger {
                    let _ = write!(s, " linger={}j", c.linger_jiffies);
                }
                if c.fin_received {
                    s.push_str(" fin-received");
                }
                s
            }
            None => state.to_string(),
        },
        Hook::TcpSendReset | Hook::TcpSendActiveReset => {
            let kind = match ev.rst_active {
                Some(false) => "reply",
                _ => "active",
            };
            let mut s = kind.to_string();
            if ev.state.is_some() {
                let _ = write!(s, " in {state}");
            }
            if let Some(reason) = &ev.rst_reason {
                let _ = write!(s, " reason={reason}");
            }
            s
        }
        Hook::TcpTimeWait => {
            let mut s = format!("{state} -> TW({new_state})");
            if let Some(j) = ev.timeo_jiffies {
                let _ = write!(s, " timeo={j}j");
            }
            s
        }
        Hook::TcpTimewaitStateProcess => match &ev.segment {
            Some(seg) => format!(
                "TW({state}) {} seq={} ack={} len={} rcv_nxt={}",
                if seg.flags.is_empty() {
                    "-".to_string()
                } else {
                    seg.flags.to_string()
                },
                seg.seq,
                seg.ack,
                seg.len,
                seg.tw_rcv_nxt
            ),
            None => format!("TW({state})"),
        },
        Hook::TcpTimewaitStateProcessReturn => match ev.tw_status {
            Some(status) => format!("{status} -> TW({new_state})"),
            None => format!("? -> TW({new_state})"),
        },
        Hook::TcpFin | Hook::TcpSendFin | Hook::TcpReceiveReset | Hook::TcpDestroySock => {
            state.to_string()
        }
    }
}

/// The compact timeline entry of `ev`.
pub(crate) fn entry(ev: &TraceEvent) -> TimelineEntry {
    TimelineEntry {
        ts_ns: ev.ts_ns,
        hook: ev.hook,
        object: object_of(ev),
        sk: ev.sk,
        pid: ev.pid,
        comm: ev.comm,
        detail: describe(ev),
    }
}

/// `+0.000123s`
pub(crate) fn relative(ns: u64) -> String {
    format!(
        "+{}.{:06}s",
        ns / 1_000_000_000,
        (ns % 1_000_000_000) / 1000
    )
}

impl FlowReport {
    /// A few lines: header, events, inputs, model vs kernel, verdict, notes.
    pub(crate) fn render_timeline(&self) -> String {
        let mut out = String::new();
        let _ = write!(out, "{}", self.key);
        match &self.owner {
            Some(o) => {
                let _ = write!(out, "  owner {}/{}", o.pid, o.comm);
            }
            None => out.push_str("  owner ?"),
        }
        if let Some(peer) = &self.peer_key {
            let _ = write!(out, "  peer {} > {}", peer.local, peer.remote);
            if peer.netns != self.key.netns {
                let _ = write!(out, " (netns {})", peer.netns);
            }
        }
        let _ = writeln!(out, "  [{}]", self.end);
        for e in self.timeline.iter().take(MAX_LINES) {
            let object = match e.object {
                SocketObject::Socket => "",
                SocketObject::TimeWait => "tw ",
                SocketObject::Packet => "pkt ",
            };
            let _ = writeln!(
                out,
                "  {:>11}  {:<10} {object}{}",
                relative(e.ts_ns.saturating_sub(self.first_ns)),
                e.hook.short(),
                e.detail
            );
        }
        let hidden = self.timeline.len().saturating_sub(MAX_LINES) as u64 + self.events_dropped;
        if hidden > 0 {
            let _ = writeln!(out, "  … {hidden} more events");
        }
        if !self.inputs.is_empty() {
            let _ = writeln!(out, "  inputs:  {}", self.inputs.join(", "));
        }
        let _ = writeln!(out, "  model:   {}", self.expected);
        let _ = writeln!(out, "  kernel:  {}", self.observed);
        let _ = writeln!(out, "  verdict: {}", self.verdict);
        match &self.verdict {
            Verdict::Conforms { unchecked, .. } => {
                for item in unchecked.iter().take(MAX_UNCHECKED) {
                    let _ = writeln!(out, "    unchecked: {item}");
                }
                if unchecked.len() > MAX_UNCHECKED {
                    let _ = writeln!(
                        out,
                        "    … {} more unchecked",
                        unchecked.len() - MAX_UNCHECKED
                    );
                }
            }
            Verdict::Diverges { at_ns, rule, .. } => {
                let _ = writeln!(
                    out,
                    "    at {}; rule: {rule}",
                    relative(at_ns.saturating_sub(self.first_ns))
                );
            }
            Verdict::Incomplete { .. } => {}
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }
}
