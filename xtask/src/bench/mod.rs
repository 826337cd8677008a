//! `cargo xtask bench`: what tcp-trace costs, side by side with no tracer and with bpftrace.
//!
//! 1. Live: a single-threaded loopback churn ([`churn`]; clean and rst-unread variants) under each
//!    [`Tracer`], `--runs` times, interleaved (run 1 of every combination, then run 2, ...) so
//!    that drift spreads evenly. Per combination: connections/s (median and min-max), the ratio
//!    to the bare median, the churn thread's CPU per connection (which includes the eBPF
//!    programs: they run in its syscalls), the tracer's CPU time and peak RSS, events/s and
//!    events lost.
//! 2. Offline: synthetic recordings ([`synth`]) replayed on one core: events/s on 1M events per
//!    output view, `--runs` times; peak RSS on 1M flows, once.
//!
//! Missed targets are reported, not failed on: the numbers are the product.
//!
//! Results and method: docs/benchmarks.md.

mod churn;
mod offline;
mod stats;
mod synth;
mod tracer;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};

use self::{
    churn::{Churn, ChurnResult, Until, Variant},
    offline::{MODES, ReplayRun, Scratch},
    stats::{Spread, thousands},
    synth::Shape,
    tracer::{Binaries, Tracer, TracerStats},
};
use crate::{helpers, tasks};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Repetitions of every measurement (medians and min-max are over these).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds of churn per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// A smoke test: 2 runs of 2 s; replays of 100k events and 100k flows instead of 1M.
    #[arg(long)]
    quick: bool,
    /// Only these tracers (repeatable; default: all).
    #[arg(long = "tracer", value_enum)]
    tracers: Vec<Tracer>,
    /// Only these churn variants (repeatable; default: both).
    #[arg(long = "variant", value_enum)]
    variants: Vec<Variant>,
    /// Events in the recording whose replay throughput is measured (`--runs` times per mode).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Flows in the recording whose replay's peak RSS is measured (once).
    #[arg(long, default_value_t = 1_000_000)]
    flows: u64,
    /// Leave out the live churn.
    #[arg(long)]
    skip_live: bool,
    /// Leave out the offline replay.
    #[arg(long)]
    skip_replay: bool,
    /// Write the replay recordings into DIR and keep them there (to replay or profile by hand).
    #[arg(long, value_name = "DIR")]
    keep_recordings: Option<PathBuf>,
    /// Measure this tcp-trace binary instead of building the workspace's (e.g. another commit's).
    #[arg(long, value_name = "PATH")]
    tcp_trace: Option<PathBuf>,
}

fn say(msg: impl AsRef<str>) {
    eprintln!("[xtask] {}", msg.as_ref());
}

/// The targets of issue 6.
const TARGET_SLOWDOWN: f64 = 0.10;
const TARGET_REPLAY_EVENTS_PER_S: f64 = 1e6;
const TARGET_RSS_KIB: u64 = 100 * 1024;

pub fn run(mut args: BenchArgs) -> Result<()> {
    if args.quick {
        args.runs = args.runs.min(2);
        args.seconds = args.seconds.min(2.0);
        args.events = args.events.min(100_000);
        args.flows = args.flows.min(100_000);
    }
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    let tracers: Vec<Tracer> = if args.tracers.is_empty() {
        Tracer::DEFAULT.to_vec()
    } else {
        let mut t = args.tracers.clone();
        if !t.contains(&Tracer::None) {
            // Every ratio is to the bare run.
            t.insert(0, Tracer::None);
        }
        t.sort();
        t.dedup();
        t
    };
    let variants: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| args.variants.is_empty() || args.variants.contains(v))
        .collect();

    let built = match args.tcp_trace.clone() {
        Some(p) => {
            say(format!("measuring {} (not building)", p.display()));
            p
        }
        None => tasks::build_release()?,
    };
    // Measure a copy: the workspace's target directory is shared, and a rebuild in the middle of
    // the bench would otherwise change the binary between runs.
    let bin_dir = Scratch::new("bin")?;
    let tcp_trace = bin_dir.0.join("tcp-trace");
    std::fs::copy(&built, &tcp_trace)
        .with_context(|| format!("copying {} to {}", built.display(), tcp_trace.display()))?;
    let bpftrace = if !args.skip_live && tracers.contains(&Tracer::Bpftrace) {
        Some(tracer::ensure_bpftrace()?)
    } else {
        None
    };
    let bins = Binaries {
        tcp_trace,
        bpftrace,
    };
    print_machine(&bins);

    let mut live_ok = true;
    if !args.skip_live {
        live_ok = live(&args, &bins, &tracers, &variants)?;
    }
    let mut replay_ok = true;
    if !args.skip_replay {
        replay_ok = replay(&args, &bins)?;
    }
    if !(live_ok && replay_ok) {
        say("some targets were missed: docs/benchmarks.md explains the gaps");
    }
    Ok(())
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The machine, as the doc reports it.
fn print_machine(bins: &Binaries) {
    let cpuinfo = read_trim("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = read_trim("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_gib = read_trim("/proc/meminfo")
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    say(format!(
        "machine: {model}, {cores} cores, {mem_gib:.0} GiB, Linux {kernel}; \
         net.ipv4.tcp_tw_reuse = {}, tcp_max_tw_buckets = {}",
        read_trim("/proc/sys/net/ipv4/tcp_tw_reuse").unwrap_or_else(|| "?".into()),
        read_trim("/proc/sys/net/ipv4/tcp_max_tw_buckets").unwrap_or_else(|| "?".into()),
    ));
    let version = |p: &std::path::Path| tracer::version_of(p).unwrap_or_else(|| "?".into());
    let commit = std::process::Command::new("git")
        .current_dir(helpers::workspace_root())
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into());
    say(format!(
        "tcp-trace: {} ({}, workspace at {commit}); bpftrace: {}",
        bins.tcp_trace.display(),
        version(&bins.tcp_trace),
        bins.bpftrace
            .as_deref()
            .map(version)
            .unwrap_or_else(|| "not used".into())
    ));
}

/// One live measurement.
struct LiveRun {
    churn: ChurnResult,
    tracer: TracerStats,
}

/// The live part; returns whether tcp-trace met its targets.
fn live(
    args: &BenchArgs,
    bins: &Binaries,
    tracers: &[Tracer],
    variants: &[Variant],
) -> Result<bool> {
    let churn = Churn::new()?;
    let scratch = Scratch::tmpfs("live")?;
    let seconds = Duration::from_secs_f64(args.seconds);
    say(format!(
        "live: {} run(s) x {:.1} s of churn per variant and tracer; warming up (20,000 \
         connections per variant)",
        args.runs, args.seconds
    ));
    for &v in variants {
        churn.run(v, Until::Connections(20_000))?;
    }
    let mut results: BTreeMap<(usize, usize), Vec<LiveRun>> = BTreeMap::new();
    for run in 1..=args.runs {
        for (vi, &variant) in variants.iter().enumerate() {
            for (ti, &t) in tracers.iter().enumerate() {
                let running = tracer::start(t, bins, &scratch.0)?;
                if running.is_some() {
                    // Let the tracer settle (its start-up work is not the churn's cost).
                    std::thread::sleep(Duration::from_millis(300));
                }
                let churned = churn.run(variant, Until::Elapsed(seconds));
                let stats = match running {
                    Some(r) => tracer::stop(r)?,
                    None => TracerStats::default(),
                };
                let churned = churned?;
                let mut line = format!(
                    "run {run}/{}: {:<10} {:<18} {:>7} conn/s",
                    args.runs,
                    variant.name(),
                    t.label(),
                    thousands(churned.rate()),
                );
                if let (Some(ev), Some(lost)) = (stats.events, stats.lost) {
                    line += &format!(
                        ", {} events/s, {lost} lost, tracer CPU {:.2} s",
                        thousands(ev as f64 / churned.seconds),
                        stats.cpu_seconds
                    );
                }
                say(line);
                results.entry((vi, ti)).or_default().push(LiveRun {
                    churn: churned,
                    tracer: stats,
                });
            }
        }
    }

    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header([
        "variant",
        "tracer",
        "conn/s median (min-max)",
        "vs bare",
        "churn CPU/conn",
        "tracer CPU s/run",
        "tracer CPU/event",
        "events/s",
        "lost (all runs)",
        "tracer peak RSS",
    ]);
    let mut ok = true;
    let mut notes = Vec::new();
    for (vi, &variant) in variants.iter().enumerate() {
        let bare = results
            .get(&(vi, 0))
            .and_then(|runs| Spread::of(&runs.iter().map(|r| r.churn.rate()).collect::<Vec<_>>()));
        for (ti, &t) in tracers.iter().enumerate() {
            let Some(runs) = results.get(&(vi, ti)) else {
                continue;
            };
            let of = |f: &dyn Fn(&LiveRun) -> Option<f64>| {
                Spread::of(&runs.iter().filter_map(f).collect::<Vec<_>>())
            };
            let rate = of(&|r| Some(r.churn.rate()));
            let per_conn =
                of(&|r| Some(r.churn.cpu_seconds / r.churn.connections.max(1) as f64 * 1e6));
            let ratio = match (rate, bare) {
                (Some(r), Some(b)) if b.median > 0.0 => Some(r.median / b.median),
                _ => None,
            };
            let events = of(&|r| r.tracer.events.map(|e| e as f64 / r.churn.seconds));
            let lost: Option<u64> = runs.iter().map(|r| r.tracer.lost).sum();
            let cpu = of(&|r| Some(r.tracer.cpu_seconds));
            let cpu_per_event = of(&|r| {
                r.tracer
                    .events
                    .filter(|&e| e > 0)
                    .map(|e| r.tracer.cpu_seconds / e as f64 * 1e6)
            });
            let rss = of(&|r| Some(r.tracer.max_rss_kib as f64 / 1024.0));
            let is_tracer = t != Tracer::None;
            table.add_row(vec![
                variant.name().to_string(),
                t.label().to_string(),
                rate.map(|s| s.show(thousands)).unwrap_or_default(),
                ratio
                    .map(|r| format!("{:.3} ({:+.1}%)", r, (r - 1.0) * 100.0))
                    .unwrap_or_default(),
                per_conn
                    .map(|s| format!("{:.1} us", s.median))
                    .unwrap_or_default(),
                if is_tracer {
                    cpu.map(|s| s.show(|x| format!("{x:.2}")))
                        .unwrap_or_default()
                } else {
                    "-".into()
                },
                cpu_per_event
                    .map(|s| format!("{:.2} us", s.median))
                    .unwrap_or_else(|| "-".into()),
                events
                    .map(|s| s.show(thousands))
                    .unwrap_or_else(|| "-".into()),
                lost.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                if is_tracer {
                    rss.map(|s| format!("{:.0} MiB", s.max)).unwrap_or_default()
                } else {
                    "-".into()
                },
            ]);
            if t == Tracer::TcpTrace {
                if let Some(r) = ratio
                    && 1.0 - r > TARGET_SLOWDOWN
                {
                    ok = false;
                    notes.push(format!(
                        "{}: tcp-trace slows the churn by {:.1}% (target: at most {:.0}%)",
                        variant.name(),
                        (1.0 - r) * 100.0,
                        TARGET_SLOWDOWN * 100.0
                    ));
                }
                if lost.unwrap_or(0) > 0 {
                    ok = false;
                    notes.push(format!(
                        "{}: tcp-trace lost {} events (target: 0)",
                        variant.name(),
                        lost.unwrap_or(0)
                    ));
                }
            }
            if t == Tracer::TcpTraceJson {
                let mut verdicts: BTreeMap<&str, u64> = BTreeMap::new();
                for r in runs {
                    for (k, n) in &r.tracer.verdicts {
                        *verdicts.entry(k.as_str()).or_default() += n;
                    }
                }
                notes.push(format!(
                    "{}: tcp-trace --json flow verdicts over all runs: {verdicts:?}",
                    variant.name()
                ));
            }
        }
    }
    for c in 2..=9 {
        if let Some(col) = table.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    println!(
        "\nLoopback churn, single-threaded client+server, {} runs x {:.1} s (medians; min-max in \
         parentheses):",
        args.runs, args.seconds
    );
    println!("{table}");
    for t in tracers.iter().filter(|t| **t != Tracer::None) {
        println!("  {:<18} {}", t.label(), t.command_line());
    }
    for n in &notes {
        println!("  {n}");
    }
    Ok(ok)
}

/// The offline part; returns whether replay met its targets.
fn replay(args: &BenchArgs, bins: &Binaries) -> Result<bool> {
    let scratch = match &args.keep_recordings {
        Some(dir) => Scratch::kept(dir)?,
        None => Scratch::new("replay")?,
    };
    say("replay: recording this machine's header (tcp-trace record, 300 ms)");
    let header = offline::record_header(bins, &scratch.0)?;

    let small = Shape::of(2_000);
    let small_path = scratch.0.join("check.tt");
    offline::write(&small_path, &header, small)?;
    let verdicts = offline::check(&bins.tcp_trace, &small_path, small)?;
    say(format!(
        "replay: synthetic recording checked: {} events, {} flows, verdicts {verdicts:?}",
        small.events, small.flows
    ));
    let pinned = helpers::which("taskset").is_some();
    let mut ok = true;
    let mut notes = Vec::new();
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header([
        "recording",
        "tcp-trace replay",
        "runs",
        "events/s median (min-max)",
        "wall s",
        "CPU s",
        "peak RSS",
    ]);

    // Throughput: the 1M-event recording, every mode, --runs times.
    let shape = Shape::with_events(args.events);
    let path = scratch.0.join("events.tt");
    write_announced(&path, &header, shape)?;
    for (mode, runs) in MODES.iter().zip(timed_runs(
        &bins.tcp_trace,
        &path,
        shape,
        &MODES,
        args.runs,
    )?) {
        let rate = add_row(&mut table, shape, mode, &runs);
        if rate < TARGET_REPLAY_EVENTS_PER_S {
            ok = false;
            notes.push(format!(
                "{}: {} events/s, {:.1}% of the 1M events/s target",
                mode.label,
                thousands(rate),
                rate / TARGET_REPLAY_EVENTS_PER_S * 100.0
            ));
        }
    }
    scratch.done_with(&path);

    // Memory: the 1M-flow recording, once (the peak is deterministic).
    let shape = Shape::with_flows(args.flows);
    let path = scratch.0.join("flows.tt");
    write_announced(&path, &header, shape)?;
    let runs = timed_runs(&bins.tcp_trace, &path, shape, &[offline::FLOWS], 1)?;
    add_row(&mut table, shape, &offline::FLOWS, &runs[0]);
    let rss = runs[0].iter().map(|r| r.max_rss_kib).max().unwrap_or(0);
    if rss > TARGET_RSS_KIB {
        ok = false;
        notes.push(format!(
            "peak RSS after {} flows: {:.0} MiB, over the 100 MiB target",
            thousands(shape.flows as f64),
            rss as f64 / 1024.0
        ));
    }
    scratch.done_with(&path);

    println!(
        "\nOffline replay of synthetic recordings (connections alternating clean and rst-unread, \
         11 events and 2 flows each), {}output to /dev/null:",
        if pinned {
            "pinned to CPU 0 (taskset), "
        } else {
            ""
        },
    );
    println!("{table}");
    for n in &notes {
        println!("  {n}");
    }
    Ok(ok)
}

fn write_announced(path: &std::path::Path, header: &[u8], shape: Shape) -> Result<()> {
    say(format!(
        "replay: writing {} connections = {} flows = {} events ({:.2} GB) to {}",
        thousands(shape.connections as f64),
        thousands(shape.flows as f64),
        thousands(shape.events as f64),
        (shape.events * (3 + tcp_trace_common::EVENT_SIZE as u64)) as f64 / 1e9,
        path.display()
    ));
    offline::write(path, header, shape)?;
    // Read it once so that every timed run reads from the page cache.
    std::io::copy(
        &mut std::fs::File::open(path).context("reading the recording back")?,
        &mut std::io::sink(),
    )?;
    Ok(())
}

/// `runs` replays of `path` per mode, interleaved; results per mode.
fn timed_runs(
    bin: &std::path::Path,
    path: &std::path::Path,
    shape: Shape,
    modes: &[offline::Mode],
    runs: usize,
) -> Result<Vec<Vec<ReplayRun>>> {
    let mut results = vec![Vec::new(); modes.len()];
    for run in 1..=runs {
        for (mi, mode) in modes.iter().enumerate() {
            let r = offline::replay_once(bin, path, *mode)?;
            say(format!(
                "replay run {run}/{runs}: {} events, {:<22} {:>7.2} s, {} events/s, peak RSS \
                 {:.1} MiB",
                thousands(shape.events as f64),
                mode.label,
                r.wall_seconds,
                thousands(shape.events as f64 / r.wall_seconds),
                r.max_rss_kib as f64 / 1024.0
            ));
            results[mi].push(r);
        }
    }
    Ok(results)
}

/// One row of the replay table; returns the median events/s.
fn add_row(table: &mut Table, shape: Shape, mode: &offline::Mode, runs: &[ReplayRun]) -> f64 {
    let of = |f: &dyn Fn(&ReplayRun) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let rate = of(&|r| shape.events as f64 / r.wall_seconds);
    let wall = of(&|r| r.wall_seconds);
    let cpu = of(&|r| r.cpu_seconds);
    let rss = runs.iter().map(|r| r.max_rss_kib).max().unwrap_or(0);
    table.add_row(vec![
        format!(
            "{} events / {} flows",
            thousands(shape.events as f64),
            thousands(shape.flows as f64)
        ),
        mode.label.to_string(),
        runs.len().to_string(),
        rate.map(|s| s.show(thousands)).unwrap_or_default(),
        wall.map(|s| format!("{:.2}", s.median)).unwrap_or_default(),
        cpu.map(|s| format!("{:.2}", s.median)).unwrap_or_default(),
        format!("{:.1} MiB", rss as f64 / 1024.0),
    ]);
    rate.map(|s| s.median).unwrap_or(0.0)
}
