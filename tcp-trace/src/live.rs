//! The live tracer: check the system, attach, stream the ring buffer with tokio, attribute and
//! print events, and on Ctrl-C / SIGTERM / --duration detach and print the summary.

use std::{io::Write, time::Duration};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use serde_json::json;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    attach::{self, AttachOptions, Attached, Backend, HookStatus},
    decode::{self, Hook, TraceEvent},
    kernel::{self, btf::KernelBtf, btf::KernelFacts},
    record::{Filters, RecordHeader, RecordWriter},
    report::{self, Pipeline, ReportOptions, ResetsView, View},
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
}

/// What `tcp-trace resets` adds to the live trace.
#[derive(Clone, Debug, Default)]
pub struct ResetsOptions {
    /// Network namespaces whose TcpExt counters to check, besides tcp-trace's own and each
    /// `--pid`'s (`/proc/PID/ns/net`, `/run/netns/NAME`).
    pub netns: Vec<std::path::PathBuf>,
}

/// Exit status when the trace ran but the kernel dropped events (the ring buffer was full).
pub const EXIT_EVENTS_LOST: u8 = 3;

/// Exit status of `tcp-trace resets` when the kernel's TcpExt abort counters disagree with what
/// was traced (and no events were lost, which would explain it: then 3).
pub const EXIT_COUNTER_MISMATCH: u8 = 5;

/// Everything that must hold before anything is loaded; errors name the problem and the fix.
pub struct Prepared {
    pub facts: KernelFacts,
    pub release: String,
    pub tracefs: String,
}

pub fn prepare(pids: &[u32]) -> Result<Prepared> {
    kernel::Privileges::current().require()?;
    for pid in pids {
        kernel::check_pid(*pid)?;
    }
    let btf = KernelBtf::from_bytes(&kernel::read_vmlinux_btf()?)?;
    let facts = KernelFacts::from_btf(&btf).context(
        "this kernel's BTF lacks a field or type tcp-trace reads; please report it with \
         `uname -r`",
    )?;
    let tracefs = kernel::ensure_tracefs()?;
    Ok(Prepared {
        facts,
        release: kernel::kernel_release(),
        tracefs,
    })
}

pub fn now_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `HH:MM:SS.micros` (UTC).
pub fn time_of_day(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        micros
    )
}

/// One human line per event.
pub fn human_line(ev: &TraceEvent, unix_ns: u64) -> String {
    // `~`: a provisional owner (see the README's "Owners"); the flow's report names the final one.
    let who = match &ev.owner {
        Some(o) if !o.is_definite() => format!("~{}/{}", o.pid, o.comm),
        Some(o) => format!("{}/{}", o.pid, o.comm),
        None => format!("?({}/{})", ev.pid, ev.comm),
    };
    let flow = match (ev.local, ev.remote) {
        (Some(l), Some(r)) => format!("{l} > {r}"),
        _ => "-".into(),
    };
    let mut detail = String::new();
    match ev.hook {
        Hook::InetSockSetState => {
            detail = format!(
                "{} -> {}",
                ev.state.as_deref().unwrap_or("?"),
                ev.new_state.as_deref().unwrap_or("?")
            )
        }
        Hook::TcpTimeWait => {
            detail = format!(
                "{} -> TW({}) timeo={}j",
                ev.state.as_deref().unwrap_or("?"),
                ev.new_state.as_deref().unwrap_or("?"),
                ev.timeo_jiffies.unwrap_or(0)
            )
        }
        Hook::TcpTimewaitStateProcess => {
            if let Some(s) = &ev.segment {
                detail = format!(
                    "TW({}) <- [{}] seq={} len={} rcv_nxt={}",
                    ev.state.as_deref().unwrap_or("?"),
                    s.flags,
                    s.seq,
                    s.len,
                    s.tw_rcv_nxt
                );
            }
        }
        Hook::TcpTimewaitStateProcessReturn => {
            detail = format!(
                "TW({}) => {}",
                ev.new_state.as_deref().unwrap_or("?"),
                ev.tw_status.unwrap_or("?")
            )
        }
        _ => {
            if let Some(s) = &ev.state {
                detail = s.to_string();
            }
        }
    }
    if let Some(c) = &ev.close {
        detail.push_str(&format!(
            " unread={} unsent={} unacked={} linger={}",
            c.unread,
            c.unsent,
            c.unacked,
            if c.linger {
                format!("on({}j)", c.linger_jiffies)
            } else {
                "off".into()
            }
        ));
    }
    if let Some(r) = &ev.rst_reason {
        detail.push_str(&format!(" reason={r}"));
    }
    if ev.rst_active == Some(false) {
        detail.push_str(" (reply)");
    }
    if let Some(frame) = ev
        .user_stack
        .as_ref()
        .and_then(|s| s.iter().find(|f| !crate::stacks::is_runtime_frame(f)))
    {
        detail.push_str(&format!(" close() at {}", frame.describe()));
    }
    let on_cpu = match &ev.owner {
        Some(o) if o.pid != ev.pid => format!(" [on cpu: {}/{}]", ev.pid, ev.comm),
        _ => String::new(),
    };
    format!(
        "{}  {:<22} {:<47} {:<10} {}{}",
        time_of_day(unix_ns),
        who,
        flow,
        ev.hook.short(),
        detail.trim_start(),
        on_cpu
    )
}

/// Prints the attach report: which hooks work and, by name, which do not and why.
pub fn report_hooks(hooks: &[HookStatus], backend: Backend, release: &str) {
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
        .map(|h| h.hook.as_str())
        .collect();
    if !missing.is_empty() {
        eprintln!("  {}", blind_spots(&missing));
    }
}

/// What the user cannot see without the given hooks.
pub fn blind_spots(missing: &[&str]) -> String {
    let mut lost = Vec::new();
    if missing.contains(&"tcp_close") {
        lost.push("close() details (unread/unsent bytes, SO_LINGER)");
    }
    if missing.contains(&"tcp_time_wait") {
        lost.push("entry into TIME_WAIT (the full socket shows only -> CLOSE)");
    }
    if missing.contains(&"tcp_timewait_state_process") {
        lost.push("segments reaching TIME_WAIT minisockets and their verdicts");
    }
    if missing.contains(&"tcp_fin") || missing.contains(&"tcp_send_fin") {
        lost.push("FIN received/queued moments (state changes still show them)");
    }
    if missing.contains(&"tcp_send_active_reset") {
        lost.push("active resets outside tcp:tcp_send_reset");
    }
    if missing
        .iter()
        .any(|m| m.starts_with("syscalls:sys_") && m.contains("close"))
    {
        lost.push(
            "which task close()d a socket (owners and closers come from socket events only; \
             a socket passed on after fork or SCM_RIGHTS keeps its first owner)",
        );
    }
    if missing
        .iter()
        .any(|m| m.starts_with("syscalls:sys_") && m.contains("accept"))
    {
        lost.push("accept() (children keep their listener's owner until close())");
    } else if missing.contains(&"inet_csk_accept:return") {
        lost.push("accepts outside accept()/accept4() (io_uring): such children keep their listener's owner until close()");
    }
    if missing
        .iter()
        .any(|m| m.contains(':') && !m.ends_with(":return") && !m.starts_with("syscalls:"))
    {
        lost.push("some tracepoint events (see above)");
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

fn lost_total(dropped: &PerCpuArray<MapData, u64>) -> u64 {
    dropped
        .get(&0, 0)
        .map(|v| v.iter().sum())
        .unwrap_or_default()
}

/// Runs the live trace (or, with `record`, writes the raw events to a file). Returns the
/// process exit status.
pub async fn run(opts: LiveOptions) -> Result<u8> {
    let prep = prepare(&opts.pids)?;
    let Attached { mut ebpf, hooks } = attach::attach(
        &prep.facts,
        &AttachOptions {
            stacks: opts.stacks,
            backend: opts.backend,
            pids: opts.pids.clone(),
            ports: opts.ports.clone(),
            kernel_log: opts.kernel_log,
            buffer_size: opts.buffer_size,
        },
    )?;
    report_hooks(&hooks, opts.backend, &prep.release);
    if !hooks.iter().any(|h| h.attached()) {
        bail!("no hook could be attached; `tcp-trace doctor` shows why for each");
    }
    let sysctls = report::host_sysctls();
    let version = kernel::kernel_version();
    // The kernel's counters, read once the hooks are attached: every abort they count from
    // here on is one the trace can see.
    let mut counters = match &opts.resets {
        Some(r) => Some(CounterRun::start(&opts.pids, &r.netns, || {
            now_ns(libc::CLOCK_MONOTONIC)
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
            header
                .sysctls
                .insert(KERNEL_VERSION_KEY.into(), version.clone());
            if let Some(hz) = kernel::config_hz() {
                header.sysctls.insert("kernel.hz".into(), hz.to_string());
            }
            Sink::Record(RecordWriter::new(file, &header)?)
        }
        None => {
            let mut pipeline = Pipeline::new(
                prep.facts.clone(),
                &hooks,
                report::model_params(&version, &sysctls),
                kernel::config_hz(),
                ReportOptions {
                    json: opts.json,
                    view: opts.view,
                    pids: opts.pids.clone(),
                    realtime_minus_mono_ns: crate::record::realtime_minus_monotonic_ns(),
                },
                std::io::BufWriter::new(std::io::stdout().lock()),
            );
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
    let dropped: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(ebpf.take_map("DROPPED").context("map DROPPED missing")?)?;
    // SAFETY: the ring buffer owns its fd and outlives the registration (both live until the
    // end of this function, and the AsyncFd is dropped first).
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e.into_parts().1))?;
    match &opts.record {
        Some(p) => eprintln!("tcp-trace: recording to {}; Ctrl-C to stop", p.display()),
        None => eprintln!("tcp-trace: tracing; Ctrl-C to stop"),
    }

    // The lost counter as last read, and when: read on every drain tick, warned about once a
    // second at most.
    let mut lost_check = LostCheck {
        ts_ns: now_ns(libc::CLOCK_MONOTONIC),
        total: 0,
    };
    let mut lost_warned = 0u64;
    // The programs wake us only when a lot is pending; a short tick drains the rest.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(50));
    let mut lost_tick = tokio::time::interval(Duration::from_secs(1));
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let started = std::time::Instant::now();

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                sink.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                sink.drain(ring.get_mut())?;
                // The lost counter is read before ended flows are released (100 ms after their
                // end, every 50 ms here), so each flow is judged knowing whether events were
                // lost during its life, and each reset diagnosed knowing it too.
                sink.check_lost(&mut lost_check, lost_total(&dropped))?;
                sink.tick(now_ns(libc::CLOCK_MONOTONIC))?;
                if let Some(l) = logger.as_mut() { l.flush(); }
            }
            _ = lost_tick.tick() => {
                let total = lost_check.total;
                if total > lost_warned {
                    eprintln!(
                        "tcp-trace: warning: {} events lost (ring buffer full), {total} in all",
                        total - lost_warned
                    );
                    lost_warned = total;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
    }
    // Take what is still buffered, then detach (dropping the Ebpf detaches every program).
    sink.drain(ring.get_mut())?;
    if let Some(run) = counters.as_mut() {
        run.finish(|| now_ns(libc::CLOCK_MONOTONIC));
        if let Sink::Print(p) = &mut sink {
            p.resets_mut().set_count_window(run.start_ns, run.end_ns);
        }
        // Resets committed to the ring while the counters were read.
        sink.drain(ring.get_mut())?;
    }
    sink.check_lost(&mut lost_check, lost_total(&dropped))?;
    let lost = lost_check.total;
    drop(ring);
    drop(ebpf);
    let seconds = started.elapsed().as_secs_f64();
    let mut mismatch_status = 0;

    match sink {
        Sink::Record(writer) => {
            let n = writer.events_written();
            writer.finish()?;
            eprintln!("tcp-trace: {n} events recorded in {seconds:.1}s, {lost} lost");
        }
        Sink::Print(mut pipeline) => {
            let mut summary = pipeline.finish()?;
            summary["seconds"] = seconds.into();
            if let Some(run) = &counters {
                let filtered = !opts.pids.is_empty() || !opts.ports.is_empty();
                let mismatch = report_resets(&mut pipeline, run, filtered, opts.json, lost)?;
                summary["counter_mismatch"] = mismatch.into();
                if mismatch && lost == 0 {
                    mismatch_status = EXIT_COUNTER_MISMATCH;
                }
            }
            if opts.json {
                writeln!(pipeline.out(), "{summary}")?;
                pipeline.out().flush()?;
            } else {
                if counters.is_none() {
                    eprintln!("{}", pipeline.summary_table(&hooks));
                }
                eprintln!(
                    "tcp-trace: {} events in {seconds:.1}s, {lost} lost{}",
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
        EXIT_EVENTS_LOST
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
pub const KERNEL_VERSION_KEY: &str = "kernel.version";

/// Where the events go: printed (and joined into flows), or written to a recording.
enum Sink<'a> {
    Print(Box<Pipeline<std::io::BufWriter<std::io::StdoutLock<'a>>>>),
    Record(RecordWriter<std::fs::File>),
}

impl Sink<'_> {
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<()> {
        while let Some(item) = ring.next() {
            match (decode::parse_raw(&item), &mut *self) {
                (Ok(raw), Sink::Print(p)) => p.event(&raw)?,
                (Ok(raw), Sink::Record(w)) => w.event(&raw)?,
                (Err(_), Sink::Print(p)) => p.malformed += 1,
                (Err(_), Sink::Record(_)) => {}
            }
        }
        Ok(())
    }

    fn tick(&mut self, now: u64) -> Result<()> {
        match self {
            Sink::Print(p) => p.tick(now),
            Sink::Record(w) => w.flush(),
        }
    }

    /// Reports a reading of the kernel's lost counter (`total`, now). The pipeline hears every
    /// reading, so that a loss is placed between the last reading without it and this one. A
    /// recording gets that earlier reading and this one when the counter grew: replay then
    /// places the loss in the same interval.
    fn check_lost(&mut self, last: &mut LostCheck, total: u64) -> Result<()> {
        let now = now_ns(libc::CLOCK_MONOTONIC);
        match self {
            Sink::Print(p) => p.lost(now, total)?,
            Sink::Record(w) if total > last.total => {
                w.lost(last.ts_ns, last.total)?;
                w.lost(now, total)?;
            }
            Sink::Record(_) => {}
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

    #[test]
    fn every_hook_name_maps_to_its_event_kind() {
        for def in attach::HOOKS {
            assert!(
                crate::flows::hook_by_name(def.name).is_some(),
                "{}",
                def.name
            );
        }
    }

    #[test]
    fn time_of_day_formats() {
        assert_eq!(time_of_day(3_723_000_004_000), "01:02:03.000004");
    }

    #[test]
    fn blind_spots_name_what_is_missing() {
        let s = blind_spots(&["tcp_close", "tcp_time_wait"]);
        assert!(s.contains("unread"), "{s}");
        assert!(s.contains("TIME_WAIT"), "{s}");
        assert_eq!(blind_spots(&[]), "");
    }
}
