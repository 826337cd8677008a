//! The comfy-table summaries.

use std::collections::{BTreeMap, BTreeSet};

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tcp_trace_common::AnyHook;

use crate::{attach::HookStatus, decode::Hook};

/// The end-of-run summary (text mode): per hook, how it was attached and how many events came;
/// then the flows' verdicts and the resets' causes, counted.
pub(crate) fn summary(
    hooks: &[HookStatus],
    counts: &BTreeMap<Hook, u64>,
    verdicts: &BTreeMap<&'static str, u64>,
    by_cause: &BTreeMap<String, u64>,
) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(["hook", "attached as", "events"]);
    for h in hooks {
        let count = match h.id() {
            Some(AnyHook::Event(k)) => counts.get(&k),
            _ => None,
        }
        .copied()
        .unwrap_or(0);
        let how = h
            .mechanism
            .map(|m| m.to_string())
            .unwrap_or_else(|| "not attached".into());
        table.add_row([h.hook.clone(), how, count.to_string()]);
    }
    let verdicts: BTreeSet<String> = verdicts.iter().map(|(v, n)| format!("{n} {v}")).collect();
    let mut out = table.to_string();
    if !verdicts.is_empty() {
        out.push_str(&format!(
            "\nflows: {}",
            verdicts.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    if !by_cause.is_empty() {
        let causes: Vec<String> = by_cause.iter().map(|(c, n)| format!("{n} {c}")).collect();
        out.push_str(&format!(
            "\nresets: {} (`tcp-trace resets` adds the summary and the counter check)",
            causes.join(", ")
        ));
    }
    out
}
