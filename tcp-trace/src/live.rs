//! The live tracer: check the system, attach, stream the ring buffer with tokio, attribute and
//! print events, and on Ctrl-C / SIGTERM / --duration detach and print the summary.

use std::{collections::BTreeMap, io::Write, time::Duration};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::json;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    attach::{self, AttachOptions, Attached, Backend, HookStatus},
    decode::{self, Hook, TraceEvent},
    kernel::{self, btf::KernelBtf, btf::KernelFacts},
    owners::Owners,
};

pub struct LiveOptions {
    pub backend: Backend,
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub json: bool,
    pub duration: Option<Duration>,
    pub kernel_log: bool,
}

/// Exit status when the trace ran but the kernel dropped events (the ring buffer was full).
pub const EXIT_EVENTS_LOST: u8 = 3;

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

/// Converts CLOCK_MONOTONIC nanoseconds (the programs' clock) into wall-clock time.
struct Clock {
    realtime_minus_mono: i128,
}

impl Clock {
    fn new() -> Self {
        let mono = now_ns(libc::CLOCK_MONOTONIC) as i128;
        let real = now_ns(libc::CLOCK_REALTIME) as i128;
        Self {
            realtime_minus_mono: real - mono,
        }
    }

    fn unix_ns(&self, mono: u64) -> u64 {
        (mono as i128 + self.realtime_minus_mono).max(0) as u64
    }
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
    let who = match &ev.owner {
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
                ev.tw_status.as_deref().unwrap_or("?")
            )
        }
        _ => {
            if let Some(s) = &ev.state {
                detail = s.clone();
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
        .any(|m| m.contains(':') && !m.ends_with(":return"))
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

/// Runs the live trace. Returns the process exit status.
pub async fn run(opts: LiveOptions) -> Result<u8> {
    let prep = prepare(&opts.pids)?;
    let Attached { mut ebpf, hooks } = attach::attach(
        &prep.facts,
        &AttachOptions {
            backend: opts.backend,
            pids: opts.pids.clone(),
            ports: opts.ports.clone(),
            kernel_log: opts.kernel_log,
        },
    )?;
    report_hooks(&hooks, opts.backend, &prep.release);
    if !hooks.iter().any(|h| h.attached()) {
        bail!("no hook could be attached; `tcp-trace doctor` shows why for each");
    }
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    if opts.json {
        let start = json!({
            "type": "start",
            "kernel": prep.release,
            "backend": opts.backend,
            "hooks": hooks,
        });
        writeln!(stdout, "{start}")?;
        stdout.flush()?;
    }
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
    eprintln!("tcp-trace: tracing; Ctrl-C to stop");

    let clock = Clock::new();
    let mut owners = Owners::default();
    let mut counts: BTreeMap<Hook, u64> = BTreeMap::new();
    let mut decode_errors = 0u64;
    let mut lost_seen = 0u64;
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

    let mut drain = |ring: &mut RingBuf<_>, out: &mut dyn Write| -> Result<()> {
        while let Some(item) = ring.next() {
            let raw = match decode::parse_raw(&item) {
                Ok(raw) => raw,
                Err(_) => {
                    decode_errors += 1;
                    continue;
                }
            };
            let mut ev = decode::decode(&raw, &prep.facts);
            owners.attribute(&mut ev);
            if !opts.pids.is_empty()
                && !ev
                    .owner
                    .as_ref()
                    .is_some_and(|o| opts.pids.contains(&o.pid))
            {
                continue;
            }
            *counts.entry(ev.hook).or_default() += 1;
            let unix_ns = clock.unix_ns(ev.ts_ns);
            if opts.json {
                let mut v = serde_json::to_value(&ev)?;
                v["type"] = "event".into();
                v["unix_ns"] = unix_ns.into();
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "{}", human_line(&ev, unix_ns))?;
            }
        }
        out.flush()?;
        Ok(())
    };

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut stdout)?;
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                drain(ring.get_mut(), &mut stdout)?;
                if let Some(l) = logger.as_mut() { l.flush(); }
            }
            _ = lost_tick.tick() => {
                let total = lost_total(&dropped);
                if total > lost_seen {
                    eprintln!("tcp-trace: warning: {} events lost (ring buffer full), {total} in all", total - lost_seen);
                    if opts.json {
                        writeln!(stdout, "{}", json!({"type": "lost", "new": total - lost_seen, "total": total}))?;
                    }
                    lost_seen = total;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
    }
    // Take what is still buffered, then detach (dropping the Ebpf detaches every program).
    drain(ring.get_mut(), &mut stdout)?;
    let lost = lost_total(&dropped);
    drop(ring);
    drop(ebpf);

    let elapsed = started.elapsed();
    let total: u64 = counts.values().sum();
    if opts.json {
        let summary = json!({
            "type": "summary",
            "seconds": elapsed.as_secs_f64(),
            "events": total,
            "lost": lost,
            "decode_errors": decode_errors,
            "by_hook": counts,
        });
        writeln!(stdout, "{summary}")?;
        stdout.flush()?;
    } else {
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED);
        table.set_header(["hook", "attached as", "events"]);
        for h in &hooks {
            let count = decode_hook_name(&h.hook)
                .and_then(|k| counts.get(&k))
                .copied()
                .unwrap_or(0);
            let how = h
                .mechanism
                .map(|m| m.to_string())
                .unwrap_or_else(|| "not attached".into());
            table.add_row([h.hook.clone(), how, count.to_string()]);
        }
        eprintln!("{table}");
        eprintln!(
            "tcp-trace: {total} events in {:.1}s, {lost} lost{}",
            elapsed.as_secs_f64(),
            if decode_errors > 0 {
                format!(", {decode_errors} malformed records")
            } else {
                String::new()
            }
        );
    }
    Ok(if lost > 0 { EXIT_EVENTS_LOST } else { 0 })
}

/// The decoded hook a hook name (as in [`attach::HOOKS`]) produces.
fn decode_hook_name(name: &str) -> Option<Hook> {
    Some(match name {
        "tcp_close" => Hook::TcpClose,
        "tcp_fin" => Hook::TcpFin,
        "tcp_send_fin" => Hook::TcpSendFin,
        "tcp_send_active_reset" => Hook::TcpSendActiveReset,
        "tcp_time_wait" => Hook::TcpTimeWait,
        "tcp_timewait_state_process" => Hook::TcpTimewaitStateProcess,
        "tcp_timewait_state_process:return" => Hook::TcpTimewaitStateProcessReturn,
        "sock:inet_sock_set_state" => Hook::InetSockSetState,
        "tcp:tcp_send_reset" => Hook::TcpSendReset,
        "tcp:tcp_receive_reset" => Hook::TcpReceiveReset,
        "tcp:tcp_destroy_sock" => Hook::TcpDestroySock,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_name_maps_to_its_event_kind() {
        for def in attach::HOOKS {
            assert!(decode_hook_name(def.name).is_some(), "{}", def.name);
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
