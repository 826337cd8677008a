//! tcp-trace: watch the Linux kernel tear TCP connections down, and check each one against a
//! reference model of the kernel's teardown state machine.
//!
//! The modules follow the data's path: [`kernel`] (facts from BTF and /proc) -> [`attach`] (load
//! and attach the eBPF programs) -> [`decode`] (raw events to typed ones) -> [`owners`] (who owns
//! each socket) -> [`flows`] (per-flow timelines, judged by the [`model`]) -> [`report`] (print);
//! [`live`] drives it from the kernel, [`replay`] from a [`record`]ing; [`validate`] checks the
//! model against this kernel; [`doctor`] reports what this kernel allows.

#![warn(unreachable_pub)]

pub mod attach;
pub mod cgroups;
pub(crate) mod clock;
pub mod decode;
pub mod doctor;
pub mod exit;
pub(crate) mod flows;
pub mod kernel;
pub mod live;
pub mod model;
pub(crate) mod owners;
pub mod peer;
pub mod pipeline;
pub(crate) mod progstats;
pub(crate) mod reader;
pub mod record;
pub mod replay;
pub mod report;
pub(crate) mod resets;
pub(crate) mod stacks;
pub mod validate;
