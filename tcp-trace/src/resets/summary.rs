//! The tables `tcp-trace resets` prints at exit: resets by process x cause x peer, and the
//! counter check per network namespace.

use std::collections::BTreeMap;
use std::net::IpAddr;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
use serde_json::json;

use super::counters::NetnsCheck;
use super::{Direction, ResetCause, ResetDiagnosis};
use crate::clock::time_of_day;

/// Rows kept at most; further (process, cause, peer) combinations are only counted.
const MAX_ROWS: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    process: String,
    cause: ResetCause,
    direction: Direction,
    peer: IpAddr,
}

/// One process x cause x peer.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct SummaryRow {
    /// `pid/comm` of the socket's owner, or `?`.
    pub(crate) process: String,
    pub(crate) pid: Option<u32>,
    pub(crate) cause: ResetCause,
    pub(crate) direction: Direction,
    /// The remote address (ports vary per connection).
    pub(crate) peer: IpAddr,
    pub(crate) count: u64,
    pub(crate) first_ns: u64,
    pub(crate) last_ns: u64,
    /// The first diagnosis's advice, if its cause has any.
    pub(crate) advice: Option<String>,
}

/// Resets by process x cause x peer.
#[derive(Clone, Debug, Default)]
pub(crate) struct Summary {
    rows: BTreeMap<Key, SummaryRow>,
    /// Diagnoses whose row did not fit under the cap.
    pub(crate) dropped: u64,
}

impl Summary {
    pub(crate) fn add(&mut self, d: &ResetDiagnosis) {
        let key = Key {
            process: d.owner_label(),
            cause: d.cause,
            direction: d.direction,
            peer: d.peer.ip(),
        };
        if let Some(row) = self.rows.get_mut(&key) {
            row.count += 1;
            row.first_ns = row.first_ns.min(d.ts_ns);
            row.last_ns = row.last_ns.max(d.ts_ns);
            return;
        }
        if self.rows.len() >= MAX_ROWS {
            self.dropped += 1;
            return;
        }
        self.rows.insert(
            key.clone(),
            SummaryRow {
                process: key.process,
                pid: d.owner.as_ref().map(|o| o.pid),
                cause: d.cause,
                direction: d.direction,
                peer: key.peer,
                count: 1,
                first_ns: d.ts_ns,
                last_ns: d.ts_ns,
                advice: d.advice(),
            },
        );
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.dropped == 0
    }

    /// Most frequent first.
    pub(crate) fn rows(&self) -> Vec<&SummaryRow> {
        let mut rows: Vec<_> = self.rows.values().collect();
        rows.sort_by(|a, b| b.count.cmp(&a.count).then(a.first_ns.cmp(&b.first_ns)));
        rows
    }

    /// The table, with `wall` turning CLOCK_MONOTONIC into wall-clock ns; then the advice for
    /// each process and cause that has some.
    pub(crate) fn render(&self, wall: impl Fn(u64) -> u64) -> String {
        if self.is_empty() {
            return "resets: none".to_string();
        }
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED);
        table.set_header([
            "process",
            "cause",
            "direction",
            "peer",
            "count",
            "first seen",
            "last seen",
        ]);
        for r in self.rows() {
            table.add_row([
                r.process.clone(),
                r.cause.to_string(),
                r.direction.to_string(),
                r.peer.to_string(),
                r.count.to_string(),
                time_of_day(wall(r.first_ns)),
                time_of_day(wall(r.last_ns)),
            ]);
        }
        let mut out = table.to_string();
        if self.dropped > 0 {
            out.push_str(&format!(
                "\n({} more resets in combinations beyond the first {MAX_ROWS})",
                self.dropped
            ));
        }
        let mut advised = Vec::new();
        for r in self.rows() {
            if let Some(a) = &r.advice
                && !advised.contains(&(&r.process, r.cause))
            {
                advised.push((&r.process, r.cause));
                out.push_str(&format!("\n{} {}: {a}", r.process, r.cause));
            }
        }
        out
    }

    /// `{"type":"reset_summary","rows":[...],"dropped":N}`.
    pub(crate) fn json(&self, wall: impl Fn(u64) -> u64) -> serde_json::Value {
        let rows: Vec<_> = self
            .rows()
            .into_iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["first_unix_ns"] = wall(r.first_ns).into();
                v["last_unix_ns"] = wall(r.last_ns).into();
                v
            })
            .collect();
        json!({"type": "reset_summary", "rows": rows, "dropped": self.dropped})
    }
}

/// The counter check tables, one per namespace, and the namespaces with resets whose counters
/// were not read (`unchecked`: namespace -> diagnoses that involve a counter).
pub(crate) fn render_checks(checks: &[NetnsCheck], unchecked: &BTreeMap<u32, u64>) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "TcpExt counters, netns {} ({}){}:\n",
            c.netns,
            c.label,
            if c.filtered {
                ", trace filtered by --pid/--port: the kernel may count more"
            } else {
                ""
            }
        ));
        if let Some(e) = &c.error {
            out.push_str(&format!("  MISMATCH: cannot compare: {e}\n"));
            continue;
        }
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED);
        table.set_header(["counter", "kernel delta", "tcp-trace count", "verdict"]);
        for r in &c.rows {
            let count = if r.traced == r.traced_max {
                r.traced.to_string()
            } else {
                format!("{}..{}", r.traced, r.traced_max)
            };
            let verdict = if r.detail.is_empty() {
                r.verdict.label().to_string()
            } else {
                format!("{}: {}", r.verdict.label(), r.detail)
            };
            table.add_row([
                r.counter.clone(),
                r.kernel_delta.to_string(),
                count,
                verdict,
            ]);
        }
        out.push_str(&table.to_string());
        out.push('\n');
    }
    for (netns, n) in unchecked {
        out.push_str(&format!(
            "netns {netns}: {n} aborts traced, counters not read (add --netns \
             /proc/<pid>/ns/net of a process in it)\n"
        ));
    }
    out.trim_end().to_string()
}
