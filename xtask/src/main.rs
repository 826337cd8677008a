//! tcp-trace's task runner: `cargo xtask <task>`. Set-up, builds, VM kernels and benchmarks live here so
//! that the README's two commands work on a fresh machine.

mod bench;
mod dist;
mod fuzz;
mod golden;
mod helpers;
mod setup;
mod tasks;
mod vm;
mod vmtest;

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
    /// Install what the test suite needs besides the build (Debian's prometheus, cargo-deb,
    /// kubernetes-validate).
    SetupTests,
    /// Build what a fleet installs into target/dist: a static binary, man pages, completions,
    /// the systemd unit, the Kubernetes DaemonSet manifest, and a .deb holding them.
    Dist,
    /// Set up, build, and run tcp-trace (default: `tcp-trace validate`); under sudo if not root.
    Run {
        /// Arguments for tcp-trace instead of `validate`, e.g. `-- doctor`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up and run the whole test suite: fmt, clippy, unit tests, live kernel tests, VM matrix.
    Test {
        /// Leave out the VM kernel matrix (quick local iteration).
        #[arg(long)]
        skip_vm: bool,
    },
    /// The kernel matrix: Debian kernels 5.10 ... 7.x under qemu, each booted once for the kprobe,
    /// fentry and tracepoint backends, and this machine's kernel, each running
    /// `tcp-trace validate --json`; prints kernel x backend x scenario -> verdict (Markdown, also
    /// in target/vm-matrix.md) and keeps every scenario's recording in target/vm-recordings/.
    VmTest {
        /// `all` or one catalogue kernel (see `vm-run --list`).
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only these scenarios (repeatable).
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// Leave out this machine's own kernel.
        #[arg(long)]
        skip_host: bool,
        /// Guests booted at once (each takes 2 vCPUs of emulation).
        #[arg(long, default_value_t = vmtest::DEFAULT_JOBS)]
        jobs: usize,
    },
    /// Fuzz the recording reader and the replay pipeline (cargo-fuzz, libFuzzer) for a bounded
    /// time.
    Fuzz {
        /// How long to fuzz, seconds, split between the targets.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Refresh the golden recordings `cargo test` replays (tcp-trace/tests/data/golden) from the
    /// latest `vm-test` run's recordings, each with the verdicts live validate gave its flows.
    Golden {
        /// Where the recordings are, as <kernel>/<backend>/<scenario>.tt (default:
        /// target/vm-recordings).
        #[arg(long)]
        from: Option<std::path::PathBuf>,
    },
    /// Boot a Debian kernel under qemu with a static tcp-trace inside and run a command there.
    VmRun(vm::VmRunArgs),
    /// What tracing costs: a loopback connection churn with no tracer, tcp-trace and bpftrace
    /// side by side, and offline replay throughput and memory (docs/benchmarks.md).
    Bench(bench::BenchArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::SetupTests => setup::tests(),
        Command::Dist => dist::run().map(|_| ()),
        Command::Run { args } => tasks::run(args),
        Command::Test { skip_vm } => tasks::test(skip_vm),
        Command::VmRun(args) => vm::run(args),
        Command::Fuzz { seconds } => fuzz::run(seconds),
        Command::Golden { from } => golden::run(from),
        Command::Bench(args) => bench::run(args),
        Command::VmTest {
            kernel,
            scenarios,
            skip_host,
            jobs,
        } => vmtest::run(&kernel, scenarios, skip_host, jobs),
    }
}
