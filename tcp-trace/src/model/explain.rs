//! A run of the model, step by step, with the rule behind each step (`tcp-trace model --explain`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Model;
use super::input::Input;
use super::outcome::Step;
use super::params::ModelParams;
use super::state::State;

/// The model run on `inputs` from `start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub(crate) params: ModelParams,
    pub(crate) start: State,
    pub(crate) steps: Vec<Step>,
    pub(crate) end: State,
}

/// Runs the model from `start` over `inputs`.
pub fn explain(params: ModelParams, start: State, inputs: &[Input]) -> Explanation {
    let mut model = Model::with_state(params, start.clone());
    let steps = model.run(inputs);
    Explanation {
        params,
        start,
        steps,
        end: model.state().clone(),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model: {}", self.params)?;
        writeln!(f, "start: {}", self.start)?;
        for (index, step) in self.steps.iter().enumerate() {
            let o = &step.outcome;
            writeln!(f, "{:>2}. {step}", index + 1)?;
            if !o.state_changes.is_empty() {
                let changes: Vec<String> = o.state_changes.iter().map(|c| c.to_string()).collect();
                writeln!(f, "      tcp_set_state: {}", changes.join(", "))?;
            }
            if let Some(call) = o.time_wait {
                writeln!(f, "      {call}")?;
            }
            if let Some(timer) = o.timer {
                writeln!(f, "      timer: {timer}")?;
            }
            if let Some(reason) = o.rst_reason {
                writeln!(f, "      RST reason: {reason}")?;
            }
            if let Some(status) = o.tw_status {
                writeln!(f, "      tcp_tw_status: {status}")?;
            }
            if !o.counters.is_empty() {
                let counters: Vec<String> = o.counters.iter().map(|c| c.to_string()).collect();
                writeln!(f, "      TcpExt: {}", counters.join(", "))?;
            }
            if let Some(errno) = o.error {
                writeln!(f, "      error: {errno}")?;
            }
            if o.blocks_caller {
                writeln!(f, "      close() blocks (SO_LINGER)")?;
            }
            writeln!(f, "      rule: {}", o.rule)?;
        }
        write!(f, "end: {}", self.end)
    }
}
