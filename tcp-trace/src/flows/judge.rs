//! A flow's events against the model: infer the input behind each observed step, step the model,
//! and check that what it predicts for the attached hooks is what the kernel showed.
//!
//! The events of one step are matched as a set against the next few unconsumed events (the hooks
//! of one kernel action can land in any order, and a minisocket's events may interleave with the
//! application's CLOSE socket). Where an event has several possible causes the search tries them
//! in order and backtracks, so a later event can settle an earlier ambiguity (close() vs
//! shutdown() shows only when the ACK of the FIN arrives). Failed (position, model state) pairs
//! are remembered, so the search stays polynomial; a budget caps it anyway.

use std::collections::HashSet;

use crate::decode::{Hook, KReason, TraceEvent};
use crate::model::{
    Input, Model, ModelParams, RstReason, Sock, State, Step, TcpState, TimeWaitSock, TwSubstate,
};

use super::infer::{Cand, candidates};
use super::obs::{Mark, Obs, ObsEv, Pred, PredItem, Visibility, predict, state_label, summarize};
use super::{FlowEnd, StepReport, Verdict};

/// Candidate trials per flow before giving up.
const BUDGET: usize = 20_000;
/// Unconsumed events beyond a step's predicted count that its matches may reach over.
const WINDOW_SLACK: usize = 2;
/// The events of one step (one syscall, softirq or timer) lie this close to its first: a later
/// event is another step's, however well it would fit.
const STEP_SPAN_NS: u64 = 100_000_000;
/// An orphan's retransmission timer (tcp_out_of_resources) fires an RTO after the segment it
/// guards, at least TCP_RTO_MIN (200 ms) unless tuned: a reset sooner after the previous step is
/// that step's own (close() under tcp_check_oom sends FIN then RST in one call).
const RTO_TIMER_MIN_GAP_NS: u64 = 100_000_000;

/// What judging needs besides the events.
pub(crate) struct JudgeCtx<'a> {
    pub(crate) params: &'a ModelParams,
    pub(crate) vis: Visibility,
    pub(crate) hz: Option<u64>,
}

/// The judge's findings for one flow.
#[derive(Clone, Debug)]
pub(crate) struct Judgement {
    pub(crate) inputs: Vec<String>,
    pub(crate) steps: Vec<StepReport>,
    pub(crate) verdict: Verdict,
    pub(crate) observed: String,
    pub(crate) expected: String,
    pub(crate) notes: Vec<String>,
    /// Some event beyond connection setup was seen.
    pub(crate) teardown: bool,
}

/// Connection setup, which the model does not cover: the flow's teardown starts where it ends.
pub(crate) fn is_setup_transition(from: TcpState, to: TcpState) -> bool {
    use TcpState::*;
    matches!(
        (from, to),
        (Close, SynSent)
            | (SynSent, Established)
            | (SynSent, SynRecv)
            | (Listen, SynRecv)
            | (SynRecv, Established)
            | (Close, Listen)
    )
}

/// Which unconsumed events are left: all from `first` on, except those in `extra`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Pos {
    first: usize,
    extra: Vec<usize>,
}

impl Pos {
    fn unconsumed(&self, len: usize) -> impl Iterator<Item = usize> + '_ {
        (self.first..len).filter(|i| !self.extra.contains(i))
    }

    fn consume(&self, taken: impl IntoIterator<Item = usize>) -> Pos {
        let mut extra = self.extra.clone();
        extra.extend(taken);
        extra.sort_unstable();
        extra.dedup();
        let mut first = self.first;
        while let Some(at) = extra.iter().position(|&i| i == first) {
            extra.remove(at);
            first += 1;
        }
        Pos { first, extra }
    }
}

/// One model step on the chosen path.
#[derive(Clone, Debug)]
struct PathStep {
    step: Step,
    /// The events it accounts for, with what each matched.
    matched: Vec<(usize, Pred)>,
    checked: Vec<String>,
    unchecked: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum FailKind {
    /// No candidate input applies here.
    Unexplained,
    /// A candidate applies but predicts other events.
    Mismatch,
}

#[derive(Clone, Debug)]
struct Failure {
    depth: usize,
    penalty: usize,
    kind: FailKind,
    step: usize,
    at_ns: u64,
    input: String,
    expected: String,
    observed: String,
    rule: String,
    state: State,
    /// The path up to here plus the failing candidate, for the report.
    inputs: Vec<String>,
    steps: Vec<StepReport>,
    marks: Vec<Mark>,
}

impl Failure {
    fn better_than(&self, other: &Failure) -> bool {
        (self.depth, std::cmp::Reverse(self.penalty), self.kind)
            > (other.depth, std::cmp::Reverse(other.penalty), other.kind)
    }
}

struct Search<'a> {
    obs: &'a [ObsEv],
    cx: &'a JudgeCtx<'a>,
    failed: HashSet<(Pos, State)>,
    best: Option<Failure>,
    budget: usize,
    exhausted: bool,
}

fn names(inputs: &[Input]) -> String {
    inputs
        .iter()
        .map(|i| i.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn step_report(step: &Step, at_ns: Option<u64>) -> StepReport {
    StepReport {
        input: step.input.name().to_string(),
        from: step.from.to_string(),
        to: step.outcome.next.to_string(),
        at_ns,
        decided_by: step.outcome.decided_by.map(|f| f.kernel_name().to_string()),
    }
}

fn rule_of(step: &Step) -> String {
    match step.outcome.decided_by {
        Some(function) => format!("{} [{function}]", step.outcome.rule),
        None => step.outcome.rule.clone(),
    }
}

/// A step's matched predictions in the order the kernel showed them.
fn path_marks(path: &[PathStep], vis: &Visibility) -> Vec<Mark> {
    let mut marks = Vec::new();
    for ps in path {
        let mut matched = ps.matched.clone();
        matched.sort_by_key(|(i, _)| *i);
        marks.extend(matched.iter().filter_map(|(_, pred)| pred.mark(vis)));
    }
    marks
}

impl<'a> Search<'a> {
    fn offer(&mut self, failure: Failure) {
        if self.best.as_ref().is_none_or(|b| failure.better_than(b)) {
            self.best = Some(failure);
        }
    }

    /// Matches `preds` against the unconsumed events near `pos`: every required prediction must
    /// find its own event. Returns (prediction index, event index, note) per match, or the index
    /// of the first required prediction nothing matched.
    fn match_window(
        &self,
        pos: &Pos,
        preds: &[(usize, PredItem)],
        blocking: bool,
    ) -> Result<Vec<(usize, usize, super::obs::MatchNote)>, usize> {
        let start = self.obs[pos.first].ts;
        let window: Vec<usize> = pos
            .unconsumed(self.obs.len())
            .take(preds.len() + WINDOW_SLACK)
            .filter(|&i| blocking || self.obs[i].ts.saturating_sub(start) <= STEP_SPAN_NS)
            .collect();
        let mut used = vec![false; window.len()];
        let mut out = Vec::new();
        for required in [true, false] {
            for (pi, (_, item)) in preds.iter().enumerate() {
                if item.required != required {
                    continue;
                }
                let found = window.iter().enumerate().find_map(|(wi, &oi)| {
                    if used[wi] {
                        return None;
                    }
                    item.pred
                        .matches(&self.obs[oi], self.cx.hz)
                        .map(|note| (wi, oi, note))
                });
                match found {
                    Some((wi, oi, note)) => {
                        used[wi] = true;
                        out.push((pi, oi, note));
                    }
                    None if required => return Err(pi),
                    None => {}
                }
            }
        }
        Ok(out)
    }

    /// The events a failing step had in front of it, rendered like its prediction.
    fn observed_window(&self, pos: &Pos, count: usize, state: &State) -> String {
        let marks: Vec<Mark> = pos
            .unconsumed(self.obs.len())
            .take(count.max(1))
            .filter_map(|i| self.obs[i].mark(&self.cx.vis))
            .collect();
        summarize(Some(&state_label(state)), &marks, true)
    }

    fn run(&mut self, pos: Pos, state: State, path: &mut Vec<PathStep>, penalty: usize) -> bool {
        let Some(first) = pos.unconsumed(self.obs.len()).next() else {
            return true;
        };
        if self.failed.contains(&(pos.clone(), state.clone())) {
            return false;
        }
        let trigger = &self.obs[first];
        let cands = candidates(trigger, &state, self.cx.params, &self.cx.vis);
        let mut mismatch: Option<Failure> = None;
        let mut tried: Vec<String> = Vec::new();
        let since_previous = path
            .last()
            .and_then(|p| p.matched.iter().map(|m| self.obs[m.0].ts).max())
            .map(|prev| trigger.ts.saturating_sub(prev));
        for (ci, cand) in cands.iter().enumerate() {
            if self.budget == 0 {
                self.exhausted = true;
                return false;
            }
            self.budget -= 1;
            if cand.inputs.first() == Some(&Input::OrphanOutOfResources)
                && since_previous.is_some_and(|gap| gap < RTO_TIMER_MIN_GAP_NS)
            {
                tried.push(format!(
                    "{}: no retransmission timer fires {} ms after the previous step",
                    names(&cand.inputs),
                    since_previous.unwrap_or_default() / 1_000_000
                ));
                continue;
            }
            let cand_penalty = penalty + usize::from(ci > 0 || cand.fallback);
            match self.try_candidate(&pos, &state, cand) {
                Attempt::NotApplicable(why) => {
                    tried.push(format!("{}: {why}", names(&cand.inputs)))
                }
                Attempt::Mismatch {
                    steps,
                    preds,
                    unmatched,
                } => {
                    let expected_marks: Vec<Mark> = preds
                        .iter()
                        .filter_map(|(_, item)| item.pred.mark(&self.cx.vis))
                        .collect();
                    let required = preds.iter().filter(|(_, p)| p.required).count();
                    let mut expected = summarize(Some(&state_label(&state)), &expected_marks, true);
                    if let Some(pi) = unmatched {
                        expected.push_str(&format!(" (missing: {})", preds[pi].1.pred.describe()));
                    }
                    tried.push(format!("{}: expected {expected}", names(&cand.inputs)));
                    if mismatch.is_none() {
                        let mut inputs: Vec<String> = path
                            .iter()
                            .map(|p| p.step.input.name().to_string())
                            .collect();
                        inputs.extend(cand.inputs.iter().map(|i| i.name().to_string()));
                        let mut reports: Vec<StepReport> = path
                            .iter()
                            .map(|p| {
                                step_report(
                                    &p.step,
                                    p.matched.iter().map(|m| self.obs[m.0].ts).min(),
                                )
                            })
                            .collect();
                        reports.extend(steps.iter().map(|s| step_report(s, Some(trigger.ts))));
                        let mut marks = path_marks(path, &self.cx.vis);
                        marks.extend(expected_marks);
                        let last = steps.last().expect("a candidate has an input");
                        mismatch = Some(Failure {
                            depth: first,
                            penalty: cand_penalty,
                            kind: FailKind::Mismatch,
                            step: path.len() + steps.len(),
                            at_ns: trigger.ts,
                            input: names(&cand.inputs),
                            expected,
                            observed: self.observed_window(&pos, required + 1, &state),
                            rule: rule_of(last),
                            state: state.clone(),
                            inputs,
                            steps: reports,
                            marks,
                        });
                    }
                }
                Attempt::Fits {
                    next_pos,
                    next_state,
                    added,
                } => {
                    path.extend(added);
                    let pushed = path.len();
                    if self.run(next_pos, next_state, path, cand_penalty) {
                        return true;
                    }
                    if self.exhausted {
                        return false;
                    }
                    let added_len = cand.inputs.len();
                    path.truncate(pushed - added_len);
                }
            }
        }
        let failure = mismatch.unwrap_or_else(|| {
            let mut inputs: Vec<String> = path
                .iter()
                .map(|p| p.step.input.name().to_string())
                .collect();
            inputs.push("?".into());
            Failure {
                depth: first,
                penalty,
                kind: FailKind::Unexplained,
                step: path.len() + 1,
                at_ns: trigger.ts,
                input: "none fits".into(),
                expected: if tried.is_empty() {
                    format!("no model input produces this in {state}")
                } else {
                    format!(
                        "no model input produces this in {state} (tried {})",
                        tried.join("; ")
                    )
                },
                observed: self.observed_window(&pos, 1, &state),
                rule: path.last().map(|p| rule_of(&p.step)).unwrap_or_default(),
                state: state.clone(),
                inputs,
                steps: path
                    .iter()
                    .map(|p| step_report(&p.step, p.matched.iter().map(|m| self.obs[m.0].ts).min()))
                    .collect(),
                marks: path_marks(path, &self.cx.vis),
            }
        });
        self.offer(failure);
        self.failed.insert((pos, state));
        false
    }

    fn try_candidate(&self, pos: &Pos, state: &State, cand: &Cand) -> Attempt {
        let mut model = Model::with_state(*self.cx.params, state.clone());
        let steps: Vec<Step> = cand.inputs.iter().map(|&i| model.step(i)).collect();
        if let Some(bad) = steps.iter().find(|s| !s.outcome.applicable) {
            return Attempt::NotApplicable(bad.outcome.rule.clone());
        }
        let mut predictions: Vec<_> = steps.iter().map(|s| predict(s, &self.cx.vis)).collect();
        for prediction in &mut predictions {
            if cand.silent_close {
                prediction
                    .items
                    .retain(|item| !matches!(item.pred, Pred::CloseCall { .. }));
            }
            // The candidate's own note says better why close() was not seen.
            if cand
                .note
                .as_deref()
                .is_some_and(|n| n.contains("tcp_close"))
            {
                prediction
                    .unseen
                    .retain(|u| !u.starts_with("close() not visible"));
            }
        }
        let preds: Vec<(usize, PredItem)> = predictions
            .iter()
            .enumerate()
            .flat_map(|(k, p)| p.items.iter().cloned().map(move |item| (k, item)))
            .collect();
        // close() with a positive SO_LINGER blocks between its state change and its end.
        let blocking = steps.iter().any(|s| s.outcome.blocks_caller);
        let assignment = match self.match_window(pos, &preds, blocking) {
            Ok(a) if a.iter().any(|(_, oi, _)| *oi == pos.first) => a,
            Ok(_) => {
                return Attempt::Mismatch {
                    steps,
                    preds,
                    unmatched: None,
                };
            }
            Err(pi) => {
                return Attempt::Mismatch {
                    steps,
                    preds,
                    unmatched: Some(pi),
                };
            }
        };
        let next_pos = pos.consume(assignment.iter().map(|(_, oi, _)| *oi));
        let mut added: Vec<PathStep> = steps
            .iter()
            .zip(&predictions)
            .map(|(step, prediction)| PathStep {
                step: step.clone(),
                matched: Vec::new(),
                checked: Vec::new(),
                unchecked: prediction.unseen.clone(),
            })
            .collect();
        for (pi, oi, note) in assignment {
            let (k, item) = &preds[pi];
            let ps = &mut added[*k];
            ps.matched.push((oi, item.pred.clone()));
            ps.checked
                .push(format!("{}: {}", ps.step.input.name(), note.checked));
            if let Some(u) = note.unchecked {
                ps.unchecked.push(u);
            }
        }
        for (k, item) in &preds {
            let ps = &mut added[*k];
            if !item.required && !ps.matched.iter().any(|(_, p)| *p == item.pred) {
                let text = format!(
                    "{}: {} not seen (the kernel may have inlined it)",
                    ps.step.input.name(),
                    item.pred.describe()
                );
                ps.unchecked.push(text);
            }
        }
        if let Some(note) = &cand.note
            && let Some(last) = added.last_mut()
        {
            last.unchecked
                .push(format!("{}: {note}", last.step.input.name()));
        }
        Attempt::Fits {
            next_pos,
            next_state: model.state().clone(),
            added,
        }
    }
}

enum Attempt {
    NotApplicable(String),
    Mismatch {
        steps: Vec<Step>,
        preds: Vec<(usize, PredItem)>,
        unmatched: Option<usize>,
    },
    Fits {
        next_pos: Pos,
        next_state: State,
        added: Vec<PathStep>,
    },
}

/// Where the model may start for a flow whose teardown begins with `first` (no setup seen).
fn start_states(first: &ObsEv) -> Vec<State> {
    use TcpState::*;
    let tw_states = |sub: TwSubstate| {
        vec![
            State::time_wait(sub),
            State::TimeWait(TimeWaitSock {
                substate: sub,
                app_holds_closed_socket: true,
            }),
        ]
    };
    // Mid-teardown sockets are usually orphans already (close() ran); a later application
    // call (e.g. the close() that destroys it) shows when not.
    let socket_states = |state: TcpState| -> Vec<State> {
        match state {
            FinWait1 | FinWait2 | Closing | LastAck => vec![
                State::Socket(Sock::new(state).orphaned()),
                State::socket(state),
            ],
            TimeWait | NewSynRecv => Vec::new(),
            _ => vec![State::socket(state)],
        }
    };
    match &first.obs {
        Obs::TwSegment { .. } | Obs::TwReturn { .. } => {
            first.tw_substate.map(tw_states).unwrap_or_else(|| {
                [
                    tw_states(TwSubstate::TimeWait),
                    tw_states(TwSubstate::FinWait2),
                ]
                .concat()
            })
        }
        Obs::SetState { from, .. } => socket_states(*from),
        Obs::SendReset {
            active: false,
            reason,
        } if first.state.is_none() => match reason {
            Some(KReason::Known(RstReason::TcpTimewaitSocket)) => tw_states(TwSubstate::FinWait2),
            Some(_) => vec![State::Freed],
            None => [vec![State::Freed], tw_states(TwSubstate::FinWait2)].concat(),
        },
        Obs::Destroy => vec![State::socket(Close)],
        _ => first.state.map(socket_states).unwrap_or_default(),
    }
}

fn dedup(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|item| seen.insert(item.clone()))
        .collect()
}

/// Judges one flow's events (any order; they are sorted by time here).
pub(crate) fn judge(events: &[TraceEvent], cx: &JudgeCtx, end: FlowEnd) -> Judgement {
    let mut sorted: Vec<&TraceEvent> = events.iter().collect();
    sorted.sort_by_key(|ev| ev.ts_ns);
    let mut notes = Vec::new();
    let mut known = Vec::new();
    for ev in sorted {
        let o = ObsEv::from_event(ev);
        if let Obs::Unknown(what) = &o.obs {
            notes.push(format!("ignored an event the judge cannot read: {what}"));
        } else if matches!(o.obs, Obs::SetState { from, to } if from == to) {
            // tcp_set_state() to the state the socket is in (close() after shutdown():
            // new_state[FIN_WAIT2] = FIN_WAIT2): the tracepoint fires in inet_sk_state_store()
            // all the same, but nothing changed.
        } else {
            known.push(o);
        }
    }
    // Connection setup: the model starts where it ends.
    let mut setup_end = None;
    let mut skip = 0;
    for o in &known {
        match o.obs {
            Obs::SetState { from, to } if is_setup_transition(from, to) => {
                setup_end = Some(to);
                skip += 1;
            }
            _ => break,
        }
    }
    let obs: Vec<ObsEv> = known.split_off(skip);
    let observed_marks: Vec<Mark> = obs.iter().filter_map(|o| o.mark(&cx.vis)).collect();

    let teardown = !obs.is_empty();
    let nothing = |reason: String, notes: Vec<String>, start: Option<String>| Judgement {
        inputs: Vec::new(),
        steps: Vec::new(),
        verdict: Verdict::Incomplete {
            missing: Vec::new(),
            reason,
        },
        observed: summarize(start.as_deref(), &observed_marks, false),
        expected: summarize(start.as_deref(), &[], false),
        notes,
        teardown,
    };
    let Some(first) = obs.first() else {
        let state = setup_end.map_or("no state seen".to_string(), |s| s.to_string());
        return nothing(
            format!("no teardown observed (connection last seen in {state})"),
            notes,
            setup_end.map(|s| s.kernel_name().to_string()),
        );
    };
    let starts = match setup_end {
        Some(state) => vec![State::socket(state)],
        None => {
            let starts = start_states(first);
            if let Some(start) = starts.first() {
                notes.push(format!(
                    "began before tracing (or its setup was not seen): the model starts in the \
                     observed state {}",
                    state_label(start)
                ));
            }
            starts
        }
    };
    if starts.is_empty() {
        return nothing(
            "cannot tell which state the flow was in when its first event came".into(),
            notes,
            None,
        );
    }

    let mut search = Search {
        obs: &obs,
        cx,
        failed: HashSet::new(),
        best: None,
        budget: BUDGET,
        exhausted: false,
    };
    for start in &starts {
        let mut path = Vec::new();
        if search.run(
            Pos {
                first: 0,
                extra: Vec::new(),
            },
            start.clone(),
            &mut path,
            0,
        ) {
            return success(path, start, &obs, observed_marks, cx, end, notes);
        }
        if search.exhausted {
            break;
        }
    }
    let label = state_label(&starts[0]);
    let observed = summarize(Some(&label), &observed_marks, false);
    if search.exhausted {
        return Judgement {
            inputs: Vec::new(),
            steps: Vec::new(),
            verdict: Verdict::Incomplete {
                missing: Vec::new(),
                reason: "too many possible explanations to search".into(),
            },
            observed,
            expected: summarize(Some(&label), &[], false),
            notes,
            teardown,
        };
    }
    // Teardowns the model does not cover: say so rather than call the kernel wrong.
    let keepalive = obs.iter().any(|o| match &o.obs {
        Obs::SendReset { reason, .. } | Obs::ActiveResetFn { reason } => {
            *reason == Some(KReason::Known(RstReason::TcpKeepaliveTimeout))
        }
        _ => false,
    });
    if keepalive {
        return Judgement {
            inputs: Vec::new(),
            steps: Vec::new(),
            verdict: Verdict::Incomplete {
                missing: Vec::new(),
                reason: "reset by an SO_KEEPALIVE timeout, which the model does not cover".into(),
            },
            observed,
            expected: summarize(Some(&label), &[], false),
            notes,
            teardown,
        };
    }
    let failure = search.best.expect("a failed search records why");
    let missing_functions: Vec<String> = cx
        .vis
        .missing()
        .into_iter()
        .filter(|name| !name.contains(':') || name.ends_with(":return"))
        .map(str::to_string)
        .collect();
    let verdict = if failure.kind == FailKind::Unexplained && !missing_functions.is_empty() {
        Verdict::Incomplete {
            missing: missing_functions,
            reason: format!(
                "no model input explains {} in {} with the hooks attached (an unseen call may \
                 have caused it)",
                failure.observed, failure.state
            ),
        }
    } else {
        Verdict::Diverges {
            step: failure.step,
            at_ns: failure.at_ns,
            input: failure.input.clone(),
            expected: failure.expected.clone(),
            observed: failure.observed.clone(),
            rule: failure.rule.clone(),
        }
    };
    Judgement {
        inputs: failure.inputs,
        steps: failure.steps,
        verdict,
        observed,
        expected: summarize(Some(&label), &failure.marks, false),
        notes,
        teardown,
    }
}

fn success(
    mut path: Vec<PathStep>,
    start: &State,
    obs: &[ObsEv],
    observed_marks: Vec<Mark>,
    cx: &JudgeCtx,
    end: FlowEnd,
    mut notes: Vec<String>,
) -> Judgement {
    let label = state_label(start);
    let state = path
        .last()
        .map_or_else(|| start.clone(), |p| p.step.outcome.next.clone());
    // The minisocket's death is silent: what ended the flow says what became of it.
    if let State::TimeWait(tw) = &state {
        match end {
            FlowEnd::TimeWaitExpired => {
                let step = Model::with_state(*cx.params, state.clone()).step(Input::TwExpire);
                notes.push(format!(
                    "TW({}) presumed expired: no event for its lifetime (its death is silent)",
                    tw.substate
                ));
                path.push(PathStep {
                    step,
                    matched: Vec::new(),
                    checked: Vec::new(),
                    unchecked: vec![
                        "tw-expire: inferred from silence (a minisocket dies without an event)"
                            .into(),
                    ],
                });
            }
            FlowEnd::TraceEnded => notes.push(format!(
                "TW({}) still alive at the end of the trace (fate unseen)",
                tw.substate
            )),
            FlowEnd::TimeWaitUnseen => notes.push(format!(
                "TW({}) presumed alive when reported (its fate is not visible with these hooks)",
                tw.substate
            )),
            FlowEnd::Reused => notes.push(format!(
                "TW({}) ended by a new connection on the same 4-tuple",
                tw.substate
            )),
            _ => {}
        }
        if !cx.vis.has(Hook::TcpTimewaitStateProcess)
            && !cx.vis.has(Hook::TcpTimewaitStateProcessReturn)
        {
            path.last_mut()
                .expect("in TIME_WAIT after a step")
                .unchecked
                .push(
                    "segments at the TIME_WAIT minisocket not visible: tcp_timewait_state_process \
                 not attached"
                        .into(),
                );
        }
    } else if matches!(state, State::Socket(ref sock) if sock.state != TcpState::Close)
        && matches!(
            end,
            FlowEnd::TraceEnded | FlowEnd::IdleEvicted | FlowEnd::CapacityEvicted
        )
    {
        notes.push(format!(
            "teardown unfinished: the model is in {state} at the end"
        ));
    }
    let expected_marks = path_marks(&path, &cx.vis);
    let inputs: Vec<String> = path
        .iter()
        .map(|p| p.step.input.name().to_string())
        .collect();
    let steps: Vec<StepReport> = path
        .iter()
        .map(|p| step_report(&p.step, p.matched.iter().map(|m| obs[m.0].ts).min()))
        .collect();
    let checked = dedup(path.iter().flat_map(|p| p.checked.iter().cloned()));
    let unchecked = dedup(path.iter().flat_map(|p| p.unchecked.iter().cloned()));
    let verdict = if path.is_empty() {
        Verdict::Incomplete {
            missing: Vec::new(),
            reason: "no teardown step observed".into(),
        }
    } else {
        Verdict::Conforms { checked, unchecked }
    };
    Judgement {
        inputs,
        steps,
        verdict,
        observed: summarize(Some(&label), &observed_marks, false),
        expected: summarize(Some(&label), &expected_marks, false),
        notes,
        teardown: true,
    }
}
