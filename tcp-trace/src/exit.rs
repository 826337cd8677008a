//! Exit statuses: one per outcome, so that scripts and CI can tell them apart. Listed in
//! `tcp-trace --help` and the README; tests/cli.rs checks each.

/// The run did what was asked and found nothing wrong.
pub const OK: u8 = 0;
/// An error: the message names the problem and the fix.
pub const ERROR: u8 = 1;
/// Bad usage: a flag or argument clap refused (clap's own status).
pub const USAGE: u8 = 2;
/// The trace ran but the kernel dropped events (its ring buffer was full).
pub const EVENTS_LOST: u8 = 3;
/// `replay`: the recording was cut short; it was replayed up to the cut.
pub const CUT_SHORT: u8 = 4;
/// `resets`: the kernel's TcpExt abort counters disagree with what was traced (and no events
/// were lost, which would explain it: then [`EVENTS_LOST`]).
pub const COUNTER_MISMATCH: u8 = 5;
/// `replay`: a flow diverges from the reference model; `validate`: a scenario failed (the
/// model and this kernel disagree).
pub const DIVERGED: u8 = 6;
