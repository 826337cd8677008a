//! The live tracer: check the system, attach, read the ring buffer on a thread of its own
//! ([`crate::reader`]), attribute and print events on this one, and on Ctrl-C / SIGTERM /
//! --duration detach and print the summary.

use std::{io::Write, time::Duration};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use serde_json::json;
use tcp_trace_common::AnyHook;
use tokio::signal::unix::SignalKind;

use crate::{
    attach::{self, AttachOptions, Attached, Backend, HookStatus},
    cgroups::{CgroupFilter, Cgroups},
    clock, decode, exit,
    kernel::netns_sysctls::NetnsSysctls,
    kernel::{self, btf::KernelBtf, btf::KernelFacts},
    pipeline::{self, Pipeline},
    reader::{self, Batch, Cmd, Lost, Msg},
    record::{Filters, NetnsSettings, RecordHeader, RecordWriter},
    report::{self, ReportOptions, ResetsView, View, metrics::Metrics, output::Output},
    resets::counters::CounterRun,
};

pub struct LiveOptions {
    /// Capture the user call stack of close() calls (see `attach::AttachOptions::stacks`).
    pub stacks: bool,
    /// Write the raw events to this recording instead of printing them.
    pub record: Option<std::path::PathBuf>,
    pub view: View,
    pub backend: Backend,
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub json: bool,
    pub duration: Option<Duration>,
    pub kernel_log: bool,
    /// Size of the kernel's ring buffer for events, in bytes (`--buffer-size`).
    pub buffer_size: u32,
    /// `tcp-trace resets`: only the reset diagnoses, then the summary and the counter check.
    pub resets: Option<ResetsOptions>,
    /// `--metrics ADDR`: serve OpenMetrics at http://ADDR/metrics while tracing.
    pub metrics: Option<String>,
    /// `--quiet`: no per-event output (metrics and warnings only).
    pub quiet: bool,
    /// `--output FILE`: the stream goes to FILE (appended; reopened on SIGHUP), not stdout.
    pub output: Option<std::path::PathBuf>,
    /// `--cgroup PATH`: only sockets whose owner is in this cgroup or below it.
    pub cgroups: Vec<std::path::PathBuf>,
    /// `--netns PATH`: only sockets in this network namespace.
    pub netns: Vec<std::path::PathBuf>,
    /// `record --empty-programs` (hidden): programs that return at entry, for the bench's floor.
    pub empty_programs: bool,
}

/// The `--cgroup` and `--netns` arguments, resolved: errors name the argument and the fix.
fn resolve_scope(
    cgroups: &[std::path::PathBuf],
    netns: &[std::path::PathBuf],
) -> Result<(Vec<CgroupFilter>, Vec<u32>)> {
    let filters = if cgroups.is_empty() {
        Vec::new()
    } else {
        let root = crate::cgroups::cgroup2_root()?;
        cgroups
            .iter()
            .map(|c| CgroupFilter::parse(c, &root))
            .collect::<Result<_>>()?
    };
    let inodes = netns
        .iter()
        .map(|p| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p)
                .map(|m| m.ino() as u32)
                .with_context(|| {
                    format!(
                        "--netns {}: cannot open it (give /proc/PID/ns/net or /run/netns/NAME)",
                        p.display()
                    )
                })
        })
        .collect::<Result<_>>()?;
    Ok((filters, inodes))
}

/// What `tcp-trace resets` adds to the live trace.
#[derive(Clone, Debug, Default)]
pub struct ResetsOptions {
    /// Network namespaces whose TcpExt counters to check, besides tcp-trace's own and each
    /// `--pid`'s (`/proc/PID/ns/net`, `/run/netns/NAME`).
    pub netns: Vec<std::path::PathBuf>,
}

/// Everything that must hold before anything is loaded; errors name the problem and the fix.
pub(crate) struct Prepared {
    pub(crate) facts: KernelFacts,
    pub(crate) release: String,
}

pub(crate) fn prepare(pids: &[u32]) -> Result<Prepared> {
    kernel::Privileges::current().require()?;
    for pid in pids {
        kernel::check_pid(*pid)?;
    }
    let btf = KernelBtf::from_bytes(&kernel::read_vmlinux_btf()?)?;
    let facts = KernelFacts::from_btf(&btf).context(
        "this kernel's BTF lacks a field or type tcp-trace reads; please report it with \
         `uname -r`",
    )?;
    // Mounted if it is not (the tracepoints need it); what was done is doctor's to say.
    kernel::ensure_tracefs()?;
    Ok(Prepared {
        facts,
        release: kernel::kernel_release(),
    })
}

/// Prints the attach report: which hooks work and, by name, which do not and why.
pub(crate) fn report_hooks(hooks: &[HookStatus], backend: Backend, release: &str) {
    let attached: Vec<_> = hooks.iter().filter(|h| h.attached()).collect();
    eprintln!(
        "tcp-trace: kernel {release}, backend {backend}: {}/{} hooks attached",
        attached.len(),
        hooks.len()
    );
    // Hooks that failed for the same reasons are listed together.
    let mut by_reason: Vec<(String, Vec<&str>)> = Vec::new();
    for h in hooks.iter().filter(|h| !h.attached()) {
        let why = h.why_not();
        match by_reason.iter_mut().find(|(w, _)| *w == why) {
            Some((_, names)) => names.push(&h.hook),
            None => by_reason.push((why, vec![&h.hook])),
        }
    }
    for (why, names) in &by_reason {
        eprintln!("  not attached: {}\n    because {why}", names.join(", "));
    }
    let missing: Vec<_> = hooks
        .iter()
        .filter(|h| !h.attached())
        .filter_map(HookStatus::id)
        .collect();
    if !missing.is_empty() {
        eprintln!("  {}", blind_spots(&missing));
    }
}

/// What the user cannot see without the given hooks (each blind spot once, in registry order).
pub(crate) fn blind_spots(missing: &[AnyHook]) -> String {
    let mut lost: Vec<&str> = Vec::new();
    for hook in missing {
        let text = hook.blind_spot();
        if !lost.contains(&text) {
            lost.push(text);
        }
    }
    if lost.is_empty() {
        return String::new();
    }
    format!("cannot see: {}", lost.join("; "))
}

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        eprintln!("[kernel {}] {}", record.level(), record.args());
    }
    fn flush(&self) {}
}

/// Runs the live trace (or, with `record`, writes the raw events to a file). Returns the
/// process exit status.
pub async fn run(opts: LiveOptions) -> Result<u8> {
    let prep = prepare(&opts.pids)?;
    let (cgroup_filters, netns) = resolve_scope(&opts.cgroups, &opts.netns)?;
    let cgroup_ids =
        |filters: &[CgroupFilter]| -> Vec<u64> { filters.iter().flat_map(|f| f.ids()).collect() };
    // Bound before anything is loaded: an address in use fails the start, not the scrape.
    let metrics_listener = match &opts.metrics {
        Some(addr) => Some(report::metrics::bind(addr).await?),
        None => None,
    };
    let out = match (&opts.output, opts.quiet) {
        (_, true) => Output::Quiet,
        (Some(path), false) => Output::file(path)?,
        (None, false) => Output::stdout(),
    };
    let Attached { mut ebpf, hooks } = attach::attach(
        &prep.facts,
        &AttachOptions {
            stacks: opts.stacks,
            backend: opts.backend,
            pids: opts.pids.clone(),
            ports: opts.ports.clone(),
            cgroups: cgroup_ids(&cgroup_filters),
            netns: netns.clone(),
            kernel_log: opts.kernel_log,
            buffer_size: opts.buffer_size,
            empty_programs: opts.empty_programs,
        },
    )?;
    // The hooks went live one after another, up to now.
    let attached_ns = clock::now_ns(libc::CLOCK_MONOTONIC);
    report_hooks(&hooks, opts.backend, &prep.release);
    if !hooks.iter().any(|h| h.attached()) {
        bail!("no hook could be attached; `tcp-trace doctor` shows why for each");
    }
    let sysctls = pipeline::host_sysctls();
    let version = kernel::kernel_version();
    // The kernel's counters, read once the hooks are attached: every abort they count from
    // here on is one the trace can see.
    let mut counters = match &opts.resets {
        Some(r) => Some(CounterRun::start(&opts.pids, &r.netns, || {
            clock::now_ns(libc::CLOCK_MONOTONIC)
        })?),
        None => None,
    };
    let mut sink = match &opts.record {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut header = RecordHeader::new(
                prep.release.clone(),
                opts.backend,
                hooks.clone(),
                prep.facts.clone(),
                Filters {
                    pids: opts.pids.clone(),
                    ports: opts.ports.clone(),
                },
            );
            header.sysctls = sysctls.clone();
            header.attached_ns = Some(attached_ns);
            header
                .sysctls
                .insert(KERNEL_VERSION_KEY.into(), version.clone());
            if let Some(hz) = kernel::config_hz() {
                header.sysctls.insert("kernel.hz".into(), hz.to_string());
            }
            // Each network namespace alive now, with its own sysctls, for replay to judge its
            // flows with (namespaces created later are judged with the host's).
            let mut per_netns = NetnsSysctls::new(pipeline::MODEL_SYSCTLS);
            for (inode, sysctls) in per_netns.all_current() {
                header.netns.insert(
                    inode,
                    NetnsSettings {
                        sysctls,
                        ..Default::default()
                    },
                );
            }
            Sink::Record(RecordWriter::new(file, &header)?, None)
        }
        None => {
            let mut pipeline = Pipeline::new(
                prep.facts.clone(),
                &hooks,
                pipeline::model_params(&version, &sysctls).with_detected(prep.facts.detected()),
                kernel::config_hz(),
                ReportOptions {
                    json: opts.json,
                    view: opts.view,
                    pids: opts.pids.clone(),
                    realtime_minus_mono_ns: clock::realtime_minus_monotonic_ns(),
                    scope: report::Scope {
                        cgroups: cgroup_filters.iter().map(|f| f.path.clone()).collect(),
                        netns: netns.clone(),
                    },
                },
                out,
            );
            pipeline.attached_at(attached_ns);
            pipeline.cgroups = Cgroups::host();
            pipeline.netns_sysctls = Some(NetnsSysctls::new(pipeline::MODEL_SYSCTLS));
            if let Some(run) = &counters {
                pipeline.set_resets_view(ResetsView::Only);
                pipeline.resets_mut().set_count_window(run.start_ns, None);
            }
            if opts.json {
                let start = json!({
                    "type": "start",
                    "kernel": prep.release,
                    "version": version,
                    "backend": opts.backend,
                    "hooks": hooks,
                });
                writeln!(pipeline.out(), "{start}")?;
                pipeline.out().flush()?;
            }
            if opts.stacks {
                let map = ebpf
                    .take_map("USER_STACKS")
                    .context("map USER_STACKS missing")?;
                pipeline.stacks = Some(crate::stacks::StackResolver::new(
                    aya::maps::StackTraceMap::try_from(map)?,
                ));
            }
            Sink::Print(Box::new(pipeline))
        }
    };
    let mut logger = if opts.kernel_log {
        Some(aya_log::EbpfLogger::init_with_logger(&mut ebpf, StderrLog).context("aya-log init")?)
    } else {
        None
    };
    let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS missing")?)?;
    let metrics = metrics_listener.map(|listener| {
        let m = std::sync::Arc::new(Metrics::new(report::metrics::DEFAULT_OWNER_CAP));
        for h in &hooks {
            if let Some(kind) = decode::Hook::from_name(&h.hook) {
                m.set_hook_attached(report::metrics::hook_name(kind), h.attached());
            }
        }
        if let Ok(addr) = listener.local_addr() {
            eprintln!("tcp-trace: metrics at http://{addr}/metrics");
        }
        tokio::spawn(report::metrics::serve(listener, m.clone()));
        m
    });
    let ring_fill = metrics
        .as_ref()
        .and_then(|_| crate::progstats::RingFill::new(&ring, opts.buffer_size));
    sink.set_metrics(metrics.clone());
    let dropped: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(ebpf.take_map("DROPPED").context("map DROPPED missing")?)?;
    // Only attached programs are loaded (a failed attach unloads): theirs are the recursion
    // misses to read.
    let programs = ebpf
        .programs()
        .filter_map(|(_, p)| p.fd().ok()?.try_clone().ok())
        .collect();
    let mut reader = reader::spawn(ring, dropped, programs)?;
    match &opts.record {
        Some(p) => eprintln!("tcp-trace: recording to {}; Ctrl-C to stop", p.display()),
        None => eprintln!("tcp-trace: tracing; Ctrl-C to stop"),
    }

    // The lost counter as last read, and when: read by the reader on every tick, warned about
    // once a second at most.
    let mut lost_check = LostCheck {
        ts_ns: clock::now_ns(libc::CLOCK_MONOTONIC),
        total: 0,
    };
    let mut lost_warned = 0u64;
    let mut last_lost = Lost::default();
    let mut lost_tick = tokio::time::interval(Duration::from_secs(1));
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sighup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let started = std::time::Instant::now();
    // What the reader sends, handled in its order: records, then each lost reading and the tick
    // that releases ended flows (so each flow is judged knowing whether events were lost during
    // its life, and each reset diagnosed knowing it too).
    let mut handle = |msg: Msg, sink: &mut Sink, last_lost: &mut Lost| -> Result<()> {
        match msg {
            Msg::Batch(batch) => sink.drain(&batch)?,
            Msg::Tick { ts_ns, lost } => {
                *last_lost = lost;
                sink.check_lost(&mut lost_check, lost.total(), ts_ns)?;
                sink.tick(ts_ns)?;
                if let Some(l) = logger.as_mut() {
                    l.flush();
                }
            }
            Msg::Flushed => {}
        }
        Ok(())
    };

    let mut reader_ended = false;
    loop {
        tokio::select! {
            msg = reader.msgs.recv() => match msg {
                Some(msg) => handle(msg, &mut sink, &mut last_lost)?,
                // The reader failed: its error is taken below.
                None => {
                    reader_ended = true;
                    break;
                }
            },
            _ = lost_tick.tick() => {
                // Cgroups made below a filtered one since the last tick (a new container of
                // a pod): the kernel keeps their sockets from now on.
                if !cgroup_filters.is_empty() {
                    attach::add_cgroup_ids(&mut ebpf, &cgroup_ids(&cgroup_filters))?;
                }
                if let Some(m) = &metrics {
                    m.set_lost_total("ring_full", last_lost.ring_full);
                    m.set_lost_total("recursion", last_lost.recursion);
                    if let Some(fill) = &ring_fill {
                        m.set_ring_fill(fill.ratio());
                    }
                    if let Sink::Print(p) = &sink {
                        m.set_flows_in_flight(p.held().flows);
                    }
                }
                let total = last_lost.total();
                if total > lost_warned {
                    eprintln!(
                        "tcp-trace: warning: {} events lost since the last warning; {last_lost}",
                        total - lost_warned
                    );
                    lost_warned = total;
                }
            }
            _ = sighup.recv() => sink.reopen()?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
    }
    // Take what is still buffered, then detach (dropping the Ebpf detaches every program).
    if !reader_ended {
        if let Some(run) = counters.as_mut() {
            // Everything committed before the counters are read is in first.
            let _ = reader.cmds.send(Cmd::Flush);
            while let Some(msg) = reader.msgs.recv().await {
                let flushed = matches!(msg, Msg::Flushed);
                handle(msg, &mut sink, &mut last_lost)?;
                if flushed {
                    break;
                }
            }
            run.finish(|| clock::now_ns(libc::CLOCK_MONOTONIC));
            if let Sink::Print(p) = &mut sink {
                p.resets_mut().set_count_window(run.start_ns, run.end_ns);
            }
        }
        // The rest, resets committed while the counters were read included, and a last reading
        // of every lost counter.
        let _ = reader.cmds.send(Cmd::Stop);
        while let Some(msg) = reader.msgs.recv().await {
            handle(msg, &mut sink, &mut last_lost)?;
        }
    }
    reader
        .thread
        .join()
        .map_err(|_| anyhow::anyhow!("the ring-buffer reader panicked"))??;
    if reader_ended {
        bail!("the ring-buffer reader stopped");
    }
    let lost = lost_check.total;
    drop(ring_fill);
    drop(ebpf);
    let seconds = started.elapsed().as_secs_f64();
    let mut mismatch_status = 0;

    match sink {
        Sink::Record(writer, _) => {
            let n = writer.events_written();
            writer.finish()?;
            eprintln!("tcp-trace: {n} events recorded in {seconds:.1}s, {last_lost}");
        }
        Sink::Print(mut pipeline) => {
            let mut summary = pipeline.finish()?;
            summary["seconds"] = seconds.into();
            summary["lost_by_cause"] = serde_json::json!({
                "ring_full": last_lost.ring_full,
                "nested": last_lost.recursion,
            });
            if let Some(run) = &counters {
                let filtered = !opts.pids.is_empty()
                    || !opts.ports.is_empty()
                    || !opts.cgroups.is_empty()
                    || !opts.netns.is_empty();
                let mismatch = report_resets(&mut pipeline, run, filtered, opts.json, lost)?;
                summary["counter_mismatch"] = mismatch.into();
                if mismatch && lost == 0 {
                    mismatch_status = exit::COUNTER_MISMATCH;
                }
            }
            if opts.json {
                writeln!(pipeline.out(), "{summary}")?;
                pipeline.out().flush()?;
            } else {
                if counters.is_none() && !opts.quiet {
                    eprintln!("{}", pipeline.summary_table(&hooks));
                }
                eprintln!(
                    "tcp-trace: {} events in {seconds:.1}s, {last_lost}{}",
                    pipeline.events,
                    if pipeline.malformed > 0 {
                        format!(", {} malformed records", pipeline.malformed)
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    Ok(if lost > 0 {
        exit::EVENTS_LOST
    } else {
        mismatch_status
    })
}

/// `tcp-trace resets` at exit: the process x cause x peer table and the counter check of each
/// watched namespace (text to stdout, or JSON lines). Returns whether any check failed.
fn report_resets<W: Write>(
    pipeline: &mut Pipeline<W>,
    run: &CounterRun,
    filtered: bool,
    json: bool,
    lost: u64,
) -> Result<bool> {
    let (checks, unchecked) = run.checks(pipeline.resets().tally(), filtered);
    let mismatch = checks.iter().any(|c| c.mismatch());
    let p = &*pipeline;
    let wall = |mono: u64| p.wall_ns(mono);
    if json {
        let summary = p.resets().summary().json(wall);
        writeln!(pipeline.out(), "{summary}")?;
        for c in &checks {
            let mut v = serde_json::to_value(c)?;
            v["type"] = "counter_check".into();
            v["ok"] = (!c.mismatch()).into();
            writeln!(pipeline.out(), "{v}")?;
        }
        if !unchecked.is_empty() {
            let v = json!({"type": "counter_check_skipped", "netns": unchecked});
            writeln!(pipeline.out(), "{v}")?;
        }
    } else {
        let text = p.resets().summary().render(wall);
        writeln!(pipeline.out(), "\n{text}\n")?;
        let checks_text = crate::resets::summary::render_checks(&checks, &unchecked);
        writeln!(pipeline.out(), "{checks_text}")?;
        if mismatch {
            writeln!(
                pipeline.out(),
                "tcp-trace: the kernel's counters disagree with the trace{}",
                if lost > 0 {
                    " (events were lost, which explains a shortfall)"
                } else {
                    ""
                }
            )?;
        }
    }
    pipeline.out().flush()?;
    Ok(mismatch)
}

/// The header key under which recordings keep the kernel version the model should use.
pub(crate) const KERNEL_VERSION_KEY: &str = "kernel.version";

/// Where the events go: printed (and joined into flows), or written to a recording.
enum Sink {
    Print(Box<Pipeline<Output>>),
    /// With `--metrics`, a recording still counts events by hook.
    Record(RecordWriter<std::fs::File>, Option<std::sync::Arc<Metrics>>),
}

impl Sink {
    fn drain(&mut self, batch: &Batch) -> Result<()> {
        for item in batch.records() {
            match (decode::parse_raw(item), &mut *self) {
                (Ok(raw), Sink::Print(p)) => p.event(&raw)?,
                (Ok(raw), Sink::Record(w, m)) => {
                    w.event(&raw)?;
                    if let (Some(m), Some(hook)) = (m, decode::Hook::from_abi(raw.hook)) {
                        m.event(hook);
                    }
                }
                (Err(_), Sink::Print(p)) => p.malformed += 1,
                (Err(_), Sink::Record(..)) => {}
            }
        }
        Ok(())
    }

    fn set_metrics(&mut self, metrics: Option<std::sync::Arc<Metrics>>) {
        match self {
            Sink::Print(p) => p.metrics = metrics,
            Sink::Record(_, m) => *m = metrics,
        }
    }

    /// SIGHUP: the output file was rotated.
    fn reopen(&mut self) -> Result<()> {
        match self {
            Sink::Print(p) => p.out().reopen(),
            Sink::Record(..) => Ok(()),
        }
    }

    fn tick(&mut self, now: u64) -> Result<()> {
        match self {
            Sink::Print(p) => p.tick(now),
            Sink::Record(w, _) => w.flush(),
        }
    }

    /// Reports a reading of the kernel's lost counter (`total`, at `now`). The pipeline hears every
    /// reading, so that a loss is placed between the last reading without it and this one. A
    /// recording gets that earlier reading and this one when the counter grew: replay then
    /// places the loss in the same interval.
    fn check_lost(&mut self, last: &mut LostCheck, total: u64, now: u64) -> Result<()> {
        match self {
            Sink::Print(p) => p.lost(now, total)?,
            Sink::Record(w, _) if total > last.total => {
                w.lost(last.ts_ns, last.total)?;
                w.lost(now, total)?;
            }
            Sink::Record(..) => {}
        }
        *last = LostCheck { ts_ns: now, total };
        Ok(())
    }
}

/// A reading of the kernel's lost-event counter (CLOCK_MONOTONIC).
struct LostCheck {
    ts_ns: u64,
    total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcp_trace_common::Hook;

    #[test]
    fn blind_spots_name_what_is_missing() {
        let s = blind_spots(&[
            AnyHook::Event(Hook::TcpClose),
            AnyHook::Event(Hook::TcpTimeWait),
        ]);
        assert!(s.contains("unread"), "{s}");
        assert!(s.contains("TIME_WAIT"), "{s}");
        let fins = blind_spots(&[
            AnyHook::Event(Hook::TcpFin),
            AnyHook::Event(Hook::TcpSendFin),
        ]);
        assert_eq!(fins.matches("FIN").count(), 1, "said once: {fins}");
        let stacks = blind_spots(&[AnyHook::Aux(tcp_trace_common::AuxHook::SysEnterClose)]);
        assert!(stacks.contains("call stacks"), "{stacks}");
        assert_eq!(blind_spots(&[]), "");
    }
}
