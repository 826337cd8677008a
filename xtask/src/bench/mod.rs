//! `cargo xtask bench`: what tcp-trace costs, side by side with no tracer and with bpftrace.
//!
//! 1. Live: a single-threaded loopback churn ([`churn`]; clean and rst-unread variants) under each
//!    [`Tracer`], `--runs` times, interleaved (run 1 of every combination, then run 2, ...) so
//!    that drift spreads evenly; and the same churn on two threads pinned to the two CPUs (ring
//!    contention) under the bare, tcp-trace, record and floor rows. Per combination:
//!    connections/s (median and min-max), the ratio to the bare median and, for tcp-trace's
//!    rows, to the floor's (the same hooks with empty programs), the churn threads' CPU per
//!    connection (which includes the eBPF programs: they run in its syscalls), the tracer's CPU
//!    time and peak RSS, events/s and events lost. Then one churn run per variant is recorded
//!    with `tcp-trace record -o FILE` for the replay rows.
//! 2. Offline: synthetic recordings ([`synth`]) replayed on one core: events/s on 1M events per
//!    output view, `--runs` times; peak RSS on 1M flows, once; the real recordings of the churn,
//!    per output view, `--runs` times.
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
    churn::{Churn, ChurnResult, Until, Variant, run_parallel},
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
    // The real recordings of the churn, made by the live part, replayed by the offline part.
    let real_dir = Scratch::new("real")?;
    let mut real = None;
    if !args.skip_live {
        let (ok, recorded) = live(&args, &bins, &tracers, &variants, &real_dir.0)?;
        live_ok = ok;
        real = Some(recorded);
    }
    let mut replay_ok = true;
    if !args.skip_replay {
        replay_ok = replay(&args, &bins, real.as_deref())?;
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

/// A churn variant on one thread or on two (one per CPU: two producers into the ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Workload {
    variant: Variant,
    threads: u8,
}

impl Workload {
    fn name(self) -> String {
        match self.threads {
            1 => self.variant.name().to_string(),
            n => format!("{} x{n}", self.variant.name()),
        }
    }

    /// The tracers this workload runs under: all for one thread; for two, the rows that show
    /// ring contention (bare, the full tool, the eBPF side alone, the floor).
    fn tracers(self, all: &[Tracer]) -> Vec<Tracer> {
        const TWO: [Tracer; 4] = [
            Tracer::None,
            Tracer::TcpTrace,
            Tracer::TcpTraceRecord,
            Tracer::TcpTraceFloor,
        ];
        all.iter()
            .copied()
            .filter(|t| self.threads == 1 || TWO.contains(t))
            .collect()
    }
}

/// The workloads: every variant on one thread, then every variant on two.
fn workloads(variants: &[Variant]) -> Vec<Workload> {
    [1, 2]
        .into_iter()
        .flat_map(|threads| {
            variants
                .iter()
                .map(move |&variant| Workload { variant, threads })
        })
        .collect()
}

/// A row's rate against the bare run's and, for tcp-trace's own rows, against the floor's
/// (the same hooks, programs empty): what tcp-trace costs beyond what attaching costs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Ratios {
    vs_bare: Option<f64>,
    vs_floor: Option<f64>,
}

fn ratios(tracer: Tracer, rate: Option<f64>, bare: Option<f64>, floor: Option<f64>) -> Ratios {
    let over = |d: Option<f64>| match (rate, d) {
        (Some(r), Some(d)) if d > 0.0 => Some(r / d),
        _ => None,
    };
    Ratios {
        vs_bare: over(bare),
        vs_floor: if tracer.is_tcp_trace() {
            over(floor)
        } else {
            None
        },
    }
}

/// `0.826 (-17.4%)`.
fn show_ratio(r: f64) -> String {
    format!("{:.3} ({:+.1}%)", r, (r - 1.0) * 100.0)
}

/// A real recording of the churn (`tcp-trace record -o FILE`), for the replay rows.
pub(crate) struct RealRecording {
    variant: Variant,
    path: PathBuf,
    events: u64,
    lost: u64,
    seconds: f64,
}

/// The live part; returns whether tcp-trace met its targets, and one real recording per variant
/// (made in `dir`).
fn live(
    args: &BenchArgs,
    bins: &Binaries,
    tracers: &[Tracer],
    variants: &[Variant],
    dir: &std::path::Path,
) -> Result<(bool, Vec<RealRecording>)> {
    let churn = Churn::new()?;
    // The two-thread churn: each thread its own listeners (other addresses than `churn`'s).
    let pair = [Churn::on(1)?, Churn::on(2)?];
    let scratch = Scratch::tmpfs("live")?;
    let seconds = Duration::from_secs_f64(args.seconds);
    say(format!(
        "live: {} run(s) x {:.1} s of churn per workload and tracer; warming up (20,000 \
         connections per variant and thread)",
        args.runs, args.seconds
    ));
    for &v in variants {
        churn.run(v, Until::Connections(20_000))?;
        run_parallel(&pair, v, Until::Connections(20_000))?;
    }
    let loads = workloads(variants);
    let run_churn = |w: Workload, until: Until| match w.threads {
        1 => churn.run(w.variant, until),
        _ => run_parallel(&pair, w.variant, until),
    };
    let mut results: BTreeMap<(usize, Tracer), Vec<LiveRun>> = BTreeMap::new();
    for run in 1..=args.runs {
        for (wi, &w) in loads.iter().enumerate() {
            for t in w.tracers(tracers) {
                let running = tracer::start(t, bins, &scratch.0)?;
                if running.is_some() {
                    // Let the tracer settle (its start-up work is not the churn's cost).
                    std::thread::sleep(Duration::from_millis(300));
                }
                let churned = run_churn(w, Until::Elapsed(seconds));
                let stats = match running {
                    Some(r) => tracer::stop(r)?,
                    None => TracerStats::default(),
                };
                let churned = churned?;
                let mut line = format!(
                    "run {run}/{}: {:<13} {:<19} {:>7} conn/s",
                    args.runs,
                    w.name(),
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
                results.entry((wi, t)).or_default().push(LiveRun {
                    churn: churned,
                    tracer: stats,
                });
            }
        }
    }

    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header([
        "workload",
        "tracer",
        "conn/s median (min-max)",
        "vs bare",
        "vs floor",
        "churn CPU/conn",
        "tracer CPU s/run",
        "tracer CPU/event",
        "events/s",
        "lost (all runs)",
        "tracer peak RSS",
    ]);
    let mut ok = true;
    let mut notes = Vec::new();
    for (wi, &w) in loads.iter().enumerate() {
        let median_rate = |t: Tracer| {
            results
                .get(&(wi, t))
                .and_then(|runs| {
                    Spread::of(&runs.iter().map(|r| r.churn.rate()).collect::<Vec<_>>())
                })
                .map(|s| s.median)
        };
        let bare = median_rate(Tracer::None);
        let floor = median_rate(Tracer::TcpTraceFloor);
        let median_cpu = |t: Tracer| {
            results.get(&(wi, t)).and_then(|runs| {
                Spread::of(
                    &runs
                        .iter()
                        .map(|r| r.churn.cpu_seconds / r.churn.connections.max(1) as f64 * 1e6)
                        .collect::<Vec<_>>(),
                )
            })
        };
        for t in w.tracers(tracers) {
            let Some(runs) = results.get(&(wi, t)) else {
                continue;
            };
            let of = |f: &dyn Fn(&LiveRun) -> Option<f64>| {
                Spread::of(&runs.iter().filter_map(f).collect::<Vec<_>>())
            };
            let rate = of(&|r| Some(r.churn.rate()));
            let per_conn = median_cpu(t);
            let ratio = ratios(t, rate.map(|s| s.median), bare, floor);
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
                w.name(),
                t.label().to_string(),
                rate.map(|s| s.show(thousands)).unwrap_or_default(),
                ratio.vs_bare.map(show_ratio).unwrap_or_default(),
                ratio.vs_floor.map(show_ratio).unwrap_or_else(|| "-".into()),
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
            if t == Tracer::TcpTraceFloor
                && let (Some(f), Some(b)) = (median_cpu(t), median_cpu(Tracer::None))
            {
                notes.push(format!(
                    "{}: the floor (hooks with empty programs) costs {:.1} us of churn CPU per \
                     connection over bare ({:.1} -> {:.1} us)",
                    w.name(),
                    f.median - b.median,
                    b.median,
                    f.median
                ));
            }
            if t == Tracer::TcpTrace && w.threads == 1 {
                if let Some(r) = ratio.vs_bare
                    && 1.0 - r > TARGET_SLOWDOWN
                {
                    ok = false;
                    notes.push(format!(
                        "{}: tcp-trace slows the churn by {:.1}% (target: at most {:.0}%)",
                        w.name(),
                        (1.0 - r) * 100.0,
                        TARGET_SLOWDOWN * 100.0
                    ));
                }
                if lost.unwrap_or(0) > 0 {
                    ok = false;
                    notes.push(format!(
                        "{}: tcp-trace lost {} events (target: 0)",
                        w.name(),
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
                    w.name()
                ));
            }
        }
    }
    for c in 2..=10 {
        if let Some(col) = table.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }

    // One real recording per variant, for the replay rows (not timed: the record rows above
    // measure what recording costs).
    let mut recorded = Vec::new();
    for &variant in variants {
        let path = dir.join(format!("real-{}.tt", variant.name()));
        let running = tracer::start_recording(bins, &path)?;
        std::thread::sleep(Duration::from_millis(300));
        let churned = churn.run(variant, Until::Elapsed(seconds));
        let stats = tracer::stop(running)?;
        let churned = churned?;
        let events = stats.events.unwrap_or(0);
        say(format!(
            "live: recorded {} of the {} churn ({} connections, {} events, {} lost) to {}",
            format_args!("{:.1} s", churned.seconds),
            variant.name(),
            thousands(churned.connections as f64),
            thousands(events as f64),
            stats.lost.unwrap_or(0),
            path.display()
        ));
        recorded.push(RealRecording {
            variant,
            path,
            events,
            lost: stats.lost.unwrap_or(0),
            seconds: churned.seconds,
        });
    }

    println!(
        "\nLoopback churn, one thread (x2: two threads, one per CPU, each its own listeners), \
         client+server in each, {} runs x {:.1} s (medians; min-max in parentheses):",
        args.runs, args.seconds
    );
    println!("{table}");
    for t in tracers.iter().filter(|t| **t != Tracer::None) {
        println!("  {:<19} {}", t.label(), t.command_line());
    }
    for n in &notes {
        println!("  {n}");
    }
    Ok((ok, recorded))
}

/// The offline part; returns whether replay met its targets.
fn replay(args: &BenchArgs, bins: &Binaries, real: Option<&[RealRecording]>) -> Result<bool> {
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
        shape.events,
        &MODES,
        args.runs,
        &[0],
    )?) {
        let rate = add_row(
            &mut table,
            &synthetic_label(shape),
            shape.events,
            mode,
            &runs,
        );
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
    let runs = timed_runs(
        &bins.tcp_trace,
        &path,
        shape.events,
        &[offline::FLOWS],
        1,
        &[0],
    )?;
    add_row(
        &mut table,
        &synthetic_label(shape),
        shape.events,
        &offline::FLOWS,
        &runs[0],
    );
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

    // The real recordings of the churn, beside the synthetic ones: the same replay, on what the
    // kernel actually reported.
    match real {
        None => notes.push(
            "real recordings of the churn: not replayed (--skip-live: the live part makes them)"
                .into(),
        ),
        Some(recs) => {
            for rec in recs.iter().filter(|r| r.events > 0) {
                // Lost events (3) or a divergent flow (6) still make a replay to time.
                let runs = timed_runs(
                    &bins.tcp_trace,
                    &rec.path,
                    rec.events,
                    &MODES,
                    args.runs,
                    &[0, 3, 6],
                )?;
                for (mode, runs) in MODES.iter().zip(runs) {
                    let label = real_label(rec);
                    add_row(&mut table, &label, rec.events, mode, &runs);
                    if let Some(r) = runs.iter().find(|r| r.status != 0) {
                        notes.push(format!(
                            "{label}, {}: replay exited {} (3: events lost, 6: a flow diverged)",
                            mode.label, r.status
                        ));
                    }
                }
            }
        }
    }

    println!(
        "\nOffline replay of synthetic recordings (connections alternating clean and rst-unread, \
         11 events and 2 flows each) and of real recordings of the churn (`tcp-trace record -o \
         FILE`, one run per variant), {}output to /dev/null:",
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

/// `runs` replays of `path` (of `events` events) per mode, interleaved; results per mode. An exit
/// status outside `accept` fails.
fn timed_runs(
    bin: &std::path::Path,
    path: &std::path::Path,
    events: u64,
    modes: &[offline::Mode],
    runs: usize,
    accept: &[i32],
) -> Result<Vec<Vec<ReplayRun>>> {
    let mut results = vec![Vec::new(); modes.len()];
    for run in 1..=runs {
        for (mi, mode) in modes.iter().enumerate() {
            let r = offline::replay_once(bin, path, *mode, accept)?;
            say(format!(
                "replay run {run}/{runs}: {} events, {:<22} {:>7.2} s, {} events/s, peak RSS \
                 {:.1} MiB",
                thousands(events as f64),
                mode.label,
                r.wall_seconds,
                thousands(events as f64 / r.wall_seconds),
                r.max_rss_kib as f64 / 1024.0
            ));
            results[mi].push(r);
        }
    }
    Ok(results)
}

fn synthetic_label(shape: Shape) -> String {
    format!(
        "{} events / {} flows",
        thousands(shape.events as f64),
        thousands(shape.flows as f64)
    )
}

fn real_label(rec: &RealRecording) -> String {
    format!(
        "real {} churn, {:.1} s: {} events{}",
        rec.variant.name(),
        rec.seconds,
        thousands(rec.events as f64),
        if rec.lost > 0 {
            format!(" ({} lost)", rec.lost)
        } else {
            String::new()
        }
    )
}

/// One row of the replay table (`events` events in the recording); returns the median events/s.
fn add_row(
    table: &mut Table,
    label: &str,
    events: u64,
    mode: &offline::Mode,
    runs: &[ReplayRun],
) -> f64 {
    let of = |f: &dyn Fn(&ReplayRun) -> f64| Spread::of(&runs.iter().map(f).collect::<Vec<_>>());
    let rate = of(&|r| events as f64 / r.wall_seconds);
    let wall = of(&|r| r.wall_seconds);
    let cpu = of(&|r| r.cpu_seconds);
    let rss = runs.iter().map(|r| r.max_rss_kib).max().unwrap_or(0);
    table.add_row(vec![
        label.to_string(),
        mode.label.to_string(),
        runs.len().to_string(),
        rate.map(|s| s.show(thousands)).unwrap_or_default(),
        wall.map(|s| format!("{:.2}", s.median)).unwrap_or_default(),
        cpu.map(|s| format!("{:.2}", s.median)).unwrap_or_default(),
        format!("{:.1} MiB", rss as f64 / 1024.0),
    ]);
    rate.map(|s| s.median).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_trace_rows_are_reported_against_bare_and_floor() {
        let r = ratios(
            Tracer::TcpTrace,
            Some(16_000.0),
            Some(20_000.0),
            Some(19_000.0),
        );
        assert_eq!(r.vs_bare, Some(0.8));
        assert!((r.vs_floor.unwrap() - 16.0 / 19.0).abs() < 1e-12);
        // The floor and the other tracers: against bare only.
        for t in [Tracer::TcpTraceFloor, Tracer::Bpftrace, Tracer::None] {
            let r = ratios(t, Some(19_000.0), Some(20_000.0), Some(19_000.0));
            assert_eq!(r.vs_bare, Some(0.95), "{t:?}");
            assert_eq!(r.vs_floor, None, "{t:?}");
        }
        // Missing or empty denominators give no ratio, not a division by zero.
        let r = ratios(Tracer::TcpTraceRecord, Some(1.0), None, Some(0.0));
        assert_eq!((r.vs_bare, r.vs_floor), (None, None));
        assert_eq!(
            ratios(Tracer::TcpTrace, None, Some(1.0), Some(1.0)).vs_bare,
            None
        );
        assert_eq!(show_ratio(0.826), "0.826 (-17.4%)");
        assert_eq!(show_ratio(1.0), "1.000 (+0.0%)");
    }

    #[test]
    fn two_thread_workloads_run_the_contention_rows_only() {
        let loads = workloads(&[Variant::Clean, Variant::RstUnread]);
        let names: Vec<_> = loads.iter().map(|w| w.name()).collect();
        assert_eq!(names, ["clean", "rst-unread", "clean x2", "rst-unread x2"]);
        assert_eq!(loads[0].tracers(&Tracer::DEFAULT), Tracer::DEFAULT.to_vec());
        assert_eq!(
            loads[2].tracers(&Tracer::DEFAULT),
            vec![
                Tracer::None,
                Tracer::TcpTrace,
                Tracer::TcpTraceRecord,
                Tracer::TcpTraceFloor
            ]
        );
        // A --tracer selection narrows both.
        let some = [Tracer::None, Tracer::Bpftrace];
        assert_eq!(loads[3].tracers(&some), vec![Tracer::None]);
    }
}
