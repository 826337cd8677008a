//! tcp-trace's task runner: `cargo xtask <task>`. Set-up, builds, VM kernels and benchmarks live here so
//! that the README's two commands work on a fresh machine.

mod setup;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "tcp-trace build, set-up, VM and bench tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the eBPF build needs (rust-src, bpf-linker); idempotent and cached.
    Setup,
    /// Boot a Debian kernel under qemu with a static tcp-trace inside and run a command there.
    VmRun(vm::VmRunArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::VmRun(args) => vm::run(args),
    }
}
