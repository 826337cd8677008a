//! The whole model as a table: every (starting state, input) pair and its outcome.

use comfy_table::{ContentArrangement, Table, presets};

use super::Model;
use super::input::Input;
use super::outcome::Step;
use super::params::ModelParams;
use super::state::State;

/// One row of the transition table: the step a fresh model takes from `from` on `input`.
pub type TableRow = Step;

/// Every starting state of [`State::table_states`] crossed with every input.
pub fn transition_table(params: ModelParams) -> Vec<TableRow> {
    State::table_states()
        .into_iter()
        .flat_map(|state| {
            Input::all().map(move |input| Model::with_state(params, state.clone()).step(input))
        })
        .collect()
}

/// The rows as a text table (comfy-table), one line per row; `-` where nothing applies.
pub fn render_table(rows: &[TableRow]) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(vec![
            "state",
            "input",
            "next",
            "tcp_set_state",
            "wire",
            "RST reason",
            "TW status",
            "TcpExt",
            "errno",
            "tcp_time_wait / timer",
            "decided by",
            "rule",
        ]);
    for row in rows {
        let o = &row.outcome;
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "-".to_string()
            } else {
                items.join(", ")
            }
        };
        let opt = |item: Option<String>| item.unwrap_or_else(|| "-".to_string());
        let timers = o
            .time_wait
            .map(|call| call.to_string())
            .into_iter()
            .chain(o.timer.map(|timer| timer.to_string()))
            .chain(o.blocks_caller.then(|| "close() blocks".to_string()))
            .collect();
        let next = if o.applicable {
            o.next.to_string()
        } else {
            "n/a".to_string()
        };
        table.add_row(vec![
            row.from.to_string(),
            row.input.to_string(),
            next,
            list(o.state_changes.iter().map(ToString::to_string).collect()),
            list(o.wire.iter().map(ToString::to_string).collect()),
            opt(o.rst_reason.map(|r| r.to_string())),
            opt(o.tw_status.map(|s| s.to_string())),
            list(o.counters.iter().map(ToString::to_string).collect()),
            opt(o.error.map(|e| e.to_string())),
            list(timers),
            opt(o.decided_by.map(|f| f.to_string())),
            o.rule.clone(),
        ]);
    }
    table.to_string()
}
