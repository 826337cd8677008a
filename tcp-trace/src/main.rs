use std::{process::ExitCode, time::Duration};

use anyhow::{Result, anyhow};
use clap::{Parser, Subcommand};
use tcp_trace::{
    attach::Backend,
    doctor,
    live::{self, LiveOptions, ResetsOptions},
    peer,
    replay::{self, ReplayOptions},
    report::View,
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
///   tcp-trace resets --pid 1234     why connections are reset, then a summary
///   tcp-trace doctor                what this kernel lets tcp-trace see, hook by hook
///
/// Needs root (or CAP_BPF + CAP_PERFMON) and a kernel with BTF (/sys/kernel/btf/vmlinux).
/// Exit status: 0 ok; 1 error; 2 bad usage; 3 the trace ran but the kernel dropped events;
/// 4 (replay) the recording was cut short; 5 (resets) the kernel's TcpExt abort counters
/// disagree with the trace; 6 (replay, validate) a flow diverges from the model.
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
    /// Capture the user call stack of every close() (symbolized to function and file:line where
    /// debug info exists) and show it with the events close() causes. Costs a stack walk per
    /// close() on the host; frame pointers are needed in the traced program.
    #[arg(long, global = true)]
    stacks: bool,
    /// Size of the kernel's ring buffer for events, in bytes (suffixes K, M, G): a power of two
    /// and a multiple of the page size. Larger rides out longer bursts before events are lost
    /// (exit status 3); the memory is the kernel's, taken for as long as the trace runs.
    #[arg(long, value_name = "BYTES", default_value = "4M", value_parser = parse_buffer_size, global = true)]
    buffer_size: u32,
    /// What to print: every event, each flow's timeline and verdict when it ends, or both.
    #[arg(long, value_enum, default_value_t = View::Both, global = true)]
    view: View,
    /// Serve OpenMetrics (Prometheus) at http://ADDR/metrics while tracing, e.g. 127.0.0.1:9464
    /// or [::]:9464. Works with every output mode and with --quiet.
    #[arg(long, value_name = "ADDR", global = true)]
    metrics: Option<String>,
    /// No per-event output: metrics (--metrics) and warnings only. For running as a daemon.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    /// Write the stream (text or --json lines) to FILE instead of stdout, appending; on SIGHUP
    /// the file is reopened (logrotate's convention). For `record`: the recording to write
    /// (format: docs/record-format.md).
    #[arg(short = 'o', long = "output", value_name = "FILE", global = true)]
    output: Option<std::path::PathBuf>,
    /// Only sockets whose owner is in this cgroup (v2) or below it (repeatable): a directory
    /// under /sys/fs/cgroup, or a path as /proc/PID/cgroup shows it
    /// (/system.slice/docker-<id>.scope). Applied in the kernel.
    #[arg(long = "cgroup", value_name = "PATH", global = true)]
    cgroups: Vec<std::path::PathBuf>,
    /// Only sockets in this network namespace (repeatable): /proc/PID/ns/net, /run/netns/NAME.
    /// Applied in the kernel. With `resets`, that namespace's counters are checked too.
    #[arg(long = "netns", value_name = "PATH", global = true)]
    netns: Vec<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Show the kernel, BTF, lockdown, privileges, and for every hook which attach mechanism
    /// works here or why none does.
    Doctor,
    /// Record the raw events (with the kernel facts needed to read them) to a file (-o FILE),
    /// to replay later anywhere, without root. Same filters as the live trace.
    Record {
        /// Load and attach the programs as usual, but make each return at entry: records
        /// nothing; the irreducible cost of the hooks, for `cargo xtask bench`'s floor row.
        #[arg(long, hide = true)]
        empty_programs: bool,
    },
    /// Why connections are reset: one line per RST sent or received (and per silent timeout
    /// abort) with its cause, how sure that is and the evidence; at exit (Ctrl-C or
    /// --duration) a table by process x cause x peer, and a check of the kernel's TcpExt abort
    /// counters (TCPAbortOnClose/OnData/OnLinger/OnMemory/OnTimeout) over the same interval in
    /// tcp-trace's own network namespace, each --pid's and each --netns. Same filters as the
    /// live trace. Exit status 5 if the counters disagree with the trace (3 if events were lost).
    ///
    /// Examples:
    ///   tcp-trace resets --pid 1234 --duration 1m
    ///   tcp-trace resets --port 443 --json
    ///   tcp-trace resets --netns /run/netns/blue
    #[command(verbatim_doc_comment)]
    Resets,
    /// Rebuild the events, flow timelines and verdicts of a recording, offline (no root).
    /// Exit status 6 if a flow diverges from the model, 4 if the recording was cut short.
    Replay {
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// Print the reference model: its transition table, or (--explain) a run of inputs step by
    /// step with the kernel rule behind each decision. No root needed.
    ///
    /// Examples:
    ///   tcp-trace model --kernel 6.1
    ///   tcp-trace model --explain close,ack-of-fin,fin,tw-expire
    ///   tcp-trace model --from close-wait --explain close,ack-of-fin
    #[command(verbatim_doc_comment)]
    Model(ModelArgs),
    /// Check the reference model against this kernel: built-in scenarios make real connections
    /// in private network namespaces, each flow is traced and judged, and a table shows what the
    /// model expects and what the kernel did. Exit status 6 if a scenario fails.
    Validate {
        /// Run only this scenario (repeatable); `--scenario list` names them.
        #[arg(long = "scenario", value_name = "NAME")]
        scenarios: Vec<String>,
        /// This run owns the machine (a VM guest, a CI machine): scenarios that change host-wide
        /// sysctls for a moment (close-memory-pressure: net.ipv4.tcp_max_orphans) may run; they
        /// restore them afterwards. Without it they are reported as not run.
        #[arg(long)]
        owns_machine: bool,
        /// Also write each scenario's events to DIR/<scenario>.tt (the `record` format, for
        /// `tcp-trace replay`).
        #[arg(long, value_name = "DIR")]
        record_dir: Option<std::path::PathBuf>,
    },
    /// Test traffic with a known teardown, one end per process (used by the test suite).
    #[command(hide = true, subcommand)]
    Peer(peer::PeerCommand),
    /// Write the man pages and shell completions (bash, zsh, fish) into DIR (`cargo xtask dist`).
    #[command(hide = true)]
    Assets {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

/// Man pages (tcp-trace.1 and one per subcommand, tcp-trace-resets.1, ...) and completions, from
/// the same clap definition as --help.
fn write_assets(out: &std::path::Path) -> Result<u8> {
    use clap::CommandFactory;
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "tcp-trace", &completions)?;
    }
    Ok(0)
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Kernel version whose behaviour to model (default: the running kernel).
    #[arg(long, value_name = "VERSION")]
    kernel: Option<String>,
    /// Comma-separated inputs to run step by step (`--explain help` lists them).
    #[arg(long, value_name = "INPUTS")]
    explain: Option<String>,
    /// Starting state for --explain (`--from help` lists them).
    #[arg(long, value_name = "STATE", default_value = "established")]
    from: String,
    /// net.ipv4.tcp_fin_timeout, seconds.
    #[arg(long, default_value_t = 60)]
    fin_timeout: u32,
    /// net.ipv4.tcp_rfc1337.
    #[arg(long)]
    rfc1337: bool,
    /// TCP_LINGER2 of the socket, seconds (< 0: reset an orphan FIN_WAIT2 at once).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    linger2: i32,
    /// net.ipv4.tcp_orphan_retries.
    #[arg(long, default_value_t = 0)]
    orphan_retries: u32,
}

fn run_model(args: ModelArgs, json: bool) -> Result<u8> {
    use tcp_trace::model::{self, Input, KernelGeneration, KernelVersion, ModelParams, State};
    let release = args
        .kernel
        .unwrap_or_else(tcp_trace::kernel::kernel_release);
    let version: KernelVersion = release
        .parse()
        .map_err(|e| anyhow!("--kernel {release}: {e}"))?;
    let params = ModelParams {
        tcp_fin_timeout_secs: args.fin_timeout,
        tcp_rfc1337: args.rfc1337,
        tcp_linger2_secs: args.linger2,
        tcp_orphan_retries: args.orphan_retries,
        ..ModelParams::for_generation(KernelGeneration::for_release(version))
    };
    match args.explain {
        Some(list) if list == "help" => {
            println!("{}", Input::help_text());
        }
        Some(list) => {
            if args.from == "help" {
                println!("{}", State::help_text());
                return Ok(0);
            }
            let start: State = args.from.parse().map_err(|e| anyhow!("--from: {e}"))?;
            let inputs = model::parse_inputs(&list).map_err(|e| anyhow!("--explain: {e}"))?;
            let explanation = model::explain(params, start, &inputs);
            if json {
                println!("{}", serde_json::to_string(&explanation)?);
            } else {
                println!("{explanation}");
            }
        }
        None => {
            let rows = model::transition_table(params);
            if json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                println!("Reference model for kernel {version}:");
                println!("{}", model::render_table(&rows));
            }
        }
    }
    Ok(0)
}

fn parse_buffer_size(s: &str) -> Result<u32, String> {
    tcp_trace::attach::parse_buffer_size(s, tcp_trace::attach::page_size())
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
    Duration::try_from_secs_f64(secs)
        .map_err(|_| anyhow!("`{s}` is too long a duration: at most about 584 billion years"))
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`tcp-trace ... | head`), like other command-line tools.
    // SAFETY: setting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Doctor) => doctor::run(cli.trace.json),
        Some(Command::Peer(cmd)) => peer::run(cmd),
        Some(Command::Assets { out }) => write_assets(&out),
        Some(Command::Model(args)) => run_model(args, cli.trace.json),
        Some(Command::Record { empty_programs }) => match cli.trace.output.clone() {
            Some(output) => run_live(cli.trace, Some(output), None, empty_programs),
            None => {
                eprintln!("tcp-trace: error: `record` needs the file to write: -o FILE");
                return ExitCode::from(2);
            }
        },
        Some(Command::Resets) => {
            let netns = cli.trace.netns.clone();
            run_live(cli.trace, None, Some(ResetsOptions { netns }), false)
        }
        Some(Command::Replay { file }) => replay::run(
            &file,
            ReplayOptions {
                json: cli.trace.json,
                view: cli.trace.view,
                pids: cli.trace.pids,
            },
        ),
        Some(Command::Validate {
            scenarios,
            owns_machine,
            record_dir,
        }) => tcp_trace::validate::run(tcp_trace::validate::ValidateOptions {
            scenarios,
            json: cli.trace.json,
            backend: cli.trace.backend,
            owns_machine,
            record_dir,
        }),
        None => run_live(cli.trace, None, None, false),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tcp-trace: error: {e:#}");
            ExitCode::from(tcp_trace::exit::ERROR)
        }
    }
}

fn run_live(
    args: TraceArgs,
    record: Option<std::path::PathBuf>,
    resets: Option<ResetsOptions>,
    empty_programs: bool,
) -> Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(live::run(LiveOptions {
        stacks: args.stacks,
        record: record.clone(),
        view: args.view,
        backend: args.backend,
        pids: args.pids,
        ports: args.ports,
        json: args.json,
        duration: args.duration,
        kernel_log: args.kernel_log,
        buffer_size: args.buffer_size,
        resets,
        metrics: args.metrics,
        quiet: args.quiet,
        // For `record`, --output is the recording.
        output: if record.is_some() { None } else { args.output },
        cgroups: args.cgroups,
        netns: args.netns,
        empty_programs,
    }))
}
