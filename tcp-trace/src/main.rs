use std::{process::ExitCode, time::Duration};

use anyhow::{Result, anyhow};
use clap::{Parser, Subcommand};
use tcp_trace::{
    attach::Backend,
    doctor,
    live::{self, LiveOptions},
    peer,
};

/// Watch the Linux kernel tear TCP connections down, live.
///
/// Without a subcommand, tcp-trace attaches to the kernel's TCP teardown path (tcp_close, tcp_fin,
/// tcp_send_fin, tcp_send_active_reset, tcp_time_wait, tcp_timewait_state_process and the
/// sock/tcp tracepoints) and prints one line per event: time (UTC), the process that owns the
/// socket, the flow (local > remote), what happened.
///
/// Examples:
///   tcp-trace                       every TCP teardown on this host
///   tcp-trace --pid 1234            only sockets owned by process 1234 (repeatable)
///   tcp-trace --port 443 --json     one JSON object per line, for scripts
///   tcp-trace doctor                what this kernel lets tcp-trace see, hook by hook
///
/// Needs root (or CAP_BPF + CAP_PERFMON) and a kernel with BTF (/sys/kernel/btf/vmlinux).
/// Exit status: 0 ok; 1 error; 2 bad usage; 3 the trace ran but the kernel dropped events.
#[derive(Parser)]
#[command(name = "tcp-trace", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    trace: TraceArgs,
}

#[derive(clap::Args, Clone)]
struct TraceArgs {
    /// Only sockets owned by this process (repeatable). The server side of a loopback connection
    /// is attributed to the server even though its packets are processed on the client's CPU time.
    #[arg(long = "pid", value_name = "PID", global = true)]
    pids: Vec<u32>,
    /// Only flows with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT", global = true)]
    ports: Vec<u16>,
    /// One JSON object per line (schema in the README), instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Stop after this long (e.g. 30s, 5m, 250ms) and print the summary.
    #[arg(long, value_parser = parse_duration, global = true)]
    duration: Option<Duration>,
    /// How to attach to kernel functions: auto = fentry, else kprobe, else without that hook.
    #[arg(long, value_enum, default_value_t = Backend::Auto, global = true)]
    backend: Backend,
    /// Print the eBPF programs' own log lines (aya-log) on stderr.
    #[arg(long, global = true)]
    kernel_log: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Show the kernel, BTF, lockdown, privileges, and for every hook which attach mechanism
    /// works here or why none does.
    Doctor,
    /// Test traffic with a known teardown, one end per process (used by the test suite).
    #[command(hide = true, subcommand)]
    Peer(peer::PeerCommand),
}

fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("`{s}` is not a duration: use e.g. 30s, 5m, 250ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(anyhow!("unknown unit `{unit}` in `{s}`: use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Doctor) => doctor::run(cli.trace.json),
        Some(Command::Peer(cmd)) => peer::run(cmd),
        None => run_live(cli.trace),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tcp-trace: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run_live(args: TraceArgs) -> Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(live::run(LiveOptions {
        backend: args.backend,
        pids: args.pids,
        ports: args.ports,
        json: args.json,
        duration: args.duration,
        kernel_log: args.kernel_log,
    }))
}
