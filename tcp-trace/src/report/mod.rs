//! Presentation, the last stage of the data path: what a decoded event, a reset diagnosis, a
//! flow and a run's summary look like as text ([`text`]), as `--json` lines ([`json`]) and as
//! tables ([`tables`]). Nothing here decides anything: the pipeline calls it.

pub(crate) mod json;
pub(crate) mod metrics;
pub(crate) mod output;
pub(crate) mod tables;
pub(crate) mod text;

/// What to print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum View {
    /// One line per kernel event, and each flow's timeline and verdict when it ends.
    Both,
    /// One line per kernel event only.
    Events,
    /// Only each flow's timeline and verdict, when it ends.
    Flows,
}

/// How reset diagnoses (see [`resets`]) are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResetsView {
    /// A line (or `{"type":"reset"}` object) per diagnosis among the events, except with
    /// `--view flows`.
    Inline,
    /// Only the diagnoses (`tcp-trace resets`): no event lines, no flow timelines.
    Only,
}

pub struct ReportOptions {
    pub json: bool,
    pub view: View,
    pub pids: Vec<u32>,
    /// Turns CLOCK_MONOTONIC event times into wall-clock time.
    pub realtime_minus_mono_ns: i64,
    /// `--cgroup`, `--netns`.
    pub scope: Scope,
}

/// Which owners' cgroups and which network namespaces to show (empty: all). The kernel applies
/// them too, where it knows enough; this decides the rest.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Cgroup paths below the cgroup2 root: an owner in one of them or below it.
    pub(crate) cgroups: Vec<String>,
    /// Network namespace inodes.
    pub(crate) netns: Vec<u32>,
}
