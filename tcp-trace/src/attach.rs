//! Loading the eBPF object and attaching one program per hook, with the mechanism the backend
//! and the kernel allow. A hook that cannot be attached is recorded with the reason for every
//! mechanism tried; the tracer keeps going with the rest.

use std::{fmt, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::HashMap as BpfHashMap,
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, RawTracePoint, TracePoint},
};
use serde::Serialize;
use tcp_trace_common::{AnyHook, AuxHook, Config, Hook, HookKind};

use crate::kernel::btf::KernelFacts;

/// The eBPF object, built from tcp-trace-ebpf by build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp-trace"));

/// Which attach mechanisms function hooks may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Per hook: fentry/fexit, else kprobe/kretprobe, else go without that hook.
    Auto,
    /// fentry/fexit only (BPF trampolines: cheapest; needs BTF and a kernel that allows them).
    Fentry,
    /// kprobe/kretprobe only (needs CONFIG_KPROBES).
    Kprobe,
    /// No function hooks: the four tracepoints only.
    Tracepoint,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Backend::Auto => "auto",
            Backend::Fentry => "fentry",
            Backend::Kprobe => "kprobe",
            Backend::Tracepoint => "tracepoint",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    Fentry,
    Fexit,
    Kprobe,
    Kretprobe,
    TpBtf,
    RawTp,
    /// A classic (perf event) tracepoint.
    Tracepoint,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Mechanism::Fentry => "fentry",
            Mechanism::Fexit => "fexit",
            Mechanism::Kprobe => "kprobe",
            Mechanism::Kretprobe => "kretprobe",
            Mechanism::TpBtf => "tp_btf",
            Mechanism::RawTp => "raw_tp",
            Mechanism::Tracepoint => "tracepoint",
        };
        f.write_str(s)
    }
}

/// The outcome for one hook.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct HookStatus {
    pub hook: String,
    /// The mechanism in use, or None when the hook is not attached.
    pub mechanism: Option<Mechanism>,
    /// Why each mechanism tried before (or instead of) the one in use failed.
    pub failures: Vec<(Mechanism, String)>,
    /// Set when the hook was not tried at all (e.g. `--backend tracepoint`).
    pub skipped: Option<String>,
}

impl HookStatus {
    /// The registry's hook of this name; None for a name no hook has (an error in a recording).
    pub(crate) fn id(&self) -> Option<AnyHook> {
        AnyHook::from_name(&self.hook)
    }

    pub(crate) fn attached(&self) -> bool {
        self.mechanism.is_some()
    }

    /// One line: why this hook is not attached.
    pub(crate) fn why_not(&self) -> String {
        if let Some(s) = &self.skipped {
            return s.clone();
        }
        self.failures
            .iter()
            .map(|(m, r)| format!("{m}: {r}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

pub(crate) struct AttachOptions {
    /// Record the user call stack of close() calls (two more tracepoints; a stack walk per
    /// close() on the host) and attach it to the events close() causes.
    pub(crate) stacks: bool,
    pub(crate) backend: Backend,
    pub(crate) pids: Vec<u32>,
    pub(crate) ports: Vec<u16>,
    /// `--cgroup`: cgroup v2 ids of the owners to keep (the cgroups named and those below).
    pub(crate) cgroups: Vec<u64>,
    /// `--netns`: network namespace inodes to keep.
    pub(crate) netns: Vec<u32>,
    pub(crate) kernel_log: bool,
    /// Size of the EVENTS ring buffer in bytes (`--buffer-size`): a power of two and a multiple
    /// of the page size (see [`parse_buffer_size`]).
    pub(crate) buffer_size: u32,
    /// Every program returns at entry (`FLOOR`): the hooks' own cost, for the bench's floor row.
    pub(crate) empty_programs: bool,
}

/// The EVENTS ring buffer's size when `--buffer-size` is not given.
pub(crate) const DEFAULT_BUFFER_SIZE: u32 = tcp_trace_common::RING_BYTES;

/// The memory page size (the ring buffer's size must be a multiple of it).
pub fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u32 } else { 4096 }
}

/// Parses `--buffer-size`: bytes, or with a binary suffix (`64K`, `4M`, `1G`; `KiB`/`MiB`/`GiB`
/// and lower case too). The kernel wants a ring buffer whose size is a power of two and a
/// multiple of the page size (`page`); anything else is refused with the nearest sizes that work.
pub fn parse_buffer_size(s: &str, page: u32) -> Result<u32, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| {
        format!("`{s}` is not a size: use bytes or a suffix K, M or G (e.g. 64K, 4M)")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size suffix `{other}` in `{s}`: use K, M or G (e.g. 64K, 4M)"
            ));
        }
    };
    let bytes = n.saturating_mul(mult);
    let max = 1u64 << 31;
    let show = |b: u64| {
        if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            format!("{}M", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            format!("{}K", b >> 10)
        } else {
            b.to_string()
        }
    };
    if bytes > max {
        return Err(format!(
            "{s} is too large for a ring buffer: at most {}",
            show(max)
        ));
    }
    let page = u64::from(page.max(1));
    if bytes < page || !bytes.is_power_of_two() || !bytes.is_multiple_of(page) {
        let lower = if bytes < page {
            None
        } else {
            Some(1u64 << (63 - bytes.leading_zeros()))
        };
        let upper = bytes.max(page).next_power_of_two().min(max);
        let fix = match lower {
            Some(l) if l != upper => format!("use {} or {}", show(l), show(upper)),
            _ => format!("use {}", show(upper)),
        };
        return Err(format!(
            "{s} ({bytes} bytes) cannot size the kernel's ring buffer: it must be a power of two \
             and a multiple of the page size ({page} bytes); {fix}"
        ));
    }
    Ok(bytes as u32)
}

/// The loaded object with its attached programs. Dropping it detaches everything.
pub(crate) struct Attached {
    pub(crate) ebpf: Ebpf,
    pub(crate) hooks: Vec<HookStatus>,
}

/// Shortens aya's errors to what a user can act on, with the likely cause.
fn explain(err: &ProgramError, mechanism: Mechanism) -> String {
    let text = match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if std::env::var_os("TCP_TRACE_VERIFIER_LOG").is_some() {
                eprintln!("{log}");
            }
            // The verifier's complaint is the last line before its statistics.
            let last = log
                .lines()
                .rev()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .find(|l| {
                    !(l.starts_with("processed ")
                        || l.starts_with("verification time")
                        || l.starts_with("stack depth"))
                })
                .map(|l| format!(" (verifier: {l}; TCP_TRACE_VERIFIER_LOG=1 prints it all)"))
                .unwrap_or_default();
            format!("load failed: {io_error}{last}")
        }
        other => {
            let mut s = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(e) = source {
                s.push_str(": ");
                s.push_str(&e.to_string());
                source = e.source();
            }
            s
        }
    };
    // Known causes get a short, actionable sentence instead of the raw error.
    match (mechanism, os_error(err)) {
        (Mechanism::Fentry | Mechanism::Fexit, Some(libc::EPERM)) => {
            return "refused by the kernel (EPERM: its security policy forbids BPF trampolines)"
                .into();
        }
        // ENOTSUPP (524) is kernel-internal and has no libc name.
        (Mechanism::Fentry | Mechanism::Fexit, Some(524)) => {
            return "BPF trampolines not supported by this kernel (ENOTSUPP)".into();
        }
        (Mechanism::Kprobe | Mechanism::Kretprobe, _) if !kprobes_available() => {
            return "this kernel has no kprobes (CONFIG_KPROBES is off)".into();
        }
        _ => {}
    }
    let mut text = text;
    if text.len() > 400 {
        text.truncate(400);
        text.push('…');
    }
    text
}

/// The errno under an aya error, from the first `io::Error` in its chain of sources.
fn os_error(err: &ProgramError) -> Option<i32> {
    if let ProgramError::LoadError { io_error, .. } = err {
        return io_error.raw_os_error();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        source = e.source();
    }
    None
}

pub(crate) fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
        || Path::new("/sys/kernel/tracing/kprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/kprobe_events").exists()
}

fn try_attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    hook: Hook,
    mechanism: Mechanism,
    program: &str,
) -> Result<(), String> {
    let system = match hook.kind() {
        HookKind::Tracepoint { system } => Some(system),
        HookKind::Function { .. } => None,
    };
    attach_program(ebpf, btf, hook.target(), system, mechanism, program)
}

/// Loads and attaches `program` to `target` (a kernel function, or a tracepoint of `system`).
fn attach_program(
    ebpf: &mut Ebpf,
    btf: &Btf,
    target: &str,
    system: Option<&str>,
    mechanism: Mechanism,
    program: &str,
) -> Result<(), String> {
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the eBPF object"))?;
    let result: Result<(), ProgramError> = (|| {
        match mechanism {
            Mechanism::Fentry => {
                let p: &mut FEntry = prog.try_into()?;
                p.load(target, btf)?;
                p.attach()?;
            }
            Mechanism::Fexit => {
                let p: &mut FExit = prog.try_into()?;
                p.load(target, btf)?;
                p.attach()?;
            }
            Mechanism::Kprobe | Mechanism::Kretprobe => {
                let p: &mut KProbe = prog.try_into()?;
                p.load()?;
                p.attach(target, 0)?;
            }
            Mechanism::TpBtf => {
                let p: &mut BtfTracePoint = prog.try_into()?;
                p.load(target, btf)?;
                p.attach()?;
            }
            Mechanism::RawTp => {
                let p: &mut RawTracePoint = prog.try_into()?;
                p.load()?;
                p.attach(target)?;
            }
            Mechanism::Tracepoint => {
                let p: &mut TracePoint = prog.try_into()?;
                p.load()?;
                p.attach(system.ok_or(ProgramError::NotLoaded)?, target)?;
            }
        }
        Ok(())
    })();
    result.map_err(|e| {
        // Free a program that loaded but did not attach, so it does not linger in the kernel.
        unload(ebpf, program);
        explain(&e, mechanism)
    })
}

/// The program that serves `def` with `mechanism` on this kernel: where the signature decides
/// which context slot holds a value, one program per signature (from BTF).
fn program_for(
    hook: Hook,
    mechanism: Mechanism,
    program: &'static str,
    facts: &KernelFacts,
) -> &'static str {
    match (hook, mechanism) {
        (Hook::TcpSendActiveReset, Mechanism::Fentry) => {
            match facts.config.active_reset_reason_arg {
                2 => "fentry_tcp_send_active_reset_r2",
                3 => "fentry_tcp_send_active_reset_r3",
                4 => "fentry_tcp_send_active_reset_r4",
                _ => program,
            }
        }
        (Hook::TcpTimewaitStateProcessReturn, Mechanism::Fexit) => {
            match facts
                .functions
                .get("tcp_timewait_state_process")
                .map(Vec::len)
            {
                Some(4) => "fexit_tcp_timewait_state_process4",
                Some(5) => "fexit_tcp_timewait_state_process5",
                _ => program,
            }
        }
        _ => program,
    }
}

/// Detaches and unloads one program (a no-op when it is not loaded).
fn unload(ebpf: &mut Ebpf, program: &str) {
    use aya::programs::Program;
    let _ = match ebpf.program_mut(program) {
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        Some(Program::BtfTracePoint(p)) => p.unload(),
        Some(Program::RawTracePoint(p)) => p.unload(),
        Some(Program::TracePoint(p)) => p.unload(),
        _ => Ok(()),
    };
}

/// The mechanisms, with their program, a hook may use under `backend`, best first.
fn mechanisms_for(hook: Hook, backend: Backend) -> Result<Vec<(Mechanism, &'static str)>, String> {
    let [best, fallback] = hook.programs();
    let (first, second) = match hook.kind() {
        HookKind::Tracepoint { .. } => {
            return Ok(vec![(Mechanism::TpBtf, best), (Mechanism::RawTp, fallback)]);
        }
        HookKind::Function { ret: false } => (Mechanism::Fentry, Mechanism::Kprobe),
        HookKind::Function { ret: true } => (Mechanism::Fexit, Mechanism::Kretprobe),
    };
    match backend {
        Backend::Auto => Ok(vec![(first, best), (second, fallback)]),
        Backend::Fentry => Ok(vec![(first, best)]),
        Backend::Kprobe => Ok(vec![(second, fallback)]),
        Backend::Tracepoint => Err("not requested (--backend tracepoint)".into()),
    }
}

/// Every mechanism a hook has, whatever the backend (for `doctor`).
fn all_mechanisms(hook: Hook) -> Vec<(Mechanism, &'static str)> {
    mechanisms_for(hook, Backend::Auto).unwrap_or_default()
}

/// Adds cgroup ids to the kernel's `--cgroup` set (cgroups created below a filtered one after
/// the start are added as they appear). At most `CGROUP_FILTER_MAX`: beyond it the kernel set
/// is left as it is and userspace filters alone.
pub(crate) fn add_cgroup_ids(ebpf: &mut Ebpf, ids: &[u64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut set: BpfHashMap<_, u64, u8> =
        BpfHashMap::try_from(ebpf.map_mut("CGROUPS").context("map CGROUPS missing")?)?;
    for id in ids {
        if set.get(id, 0).is_err() && set.insert(id, 1, 0).is_err() {
            bail!(
                "more than {} cgroups below --cgroup: name fewer or narrower ones",
                tcp_trace_common::CGROUP_FILTER_MAX
            );
        }
    }
    Ok(())
}

/// Loads the object with `facts` baked in as constants and attaches every hook it can.
pub(crate) fn attach(facts: &KernelFacts, opts: &AttachOptions) -> Result<Attached> {
    let btf = Btf::from_sys_fs().context(
        "cannot load the kernel's BTF (/sys/kernel/btf/vmlinux): a kernel with \
         CONFIG_DEBUG_INFO_BTF=y is required",
    )?;
    let config = Config {
        filter_pids: (!opts.pids.is_empty()) as u32,
        filter_ports: (!opts.ports.is_empty()) as u32,
        filter_cgroups: (!opts.cgroups.is_empty()) as u32,
        filter_netns: (!opts.netns.is_empty()) as u32,
        capture_stacks: opts.stacks as u32,
        ..facts.config
    };
    // aya-log's level global: 0 turns the programs' log statements into dead code.
    let log_level: u8 = if opts.kernel_log { 0xff } else { 0 };
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global("CONFIG", &config, true)
        .override_global("AYA_LOG_LEVEL", &log_level, false)
        .override_global("FLOOR", &u8::from(opts.empty_programs), true)
        .map_max_entries("EVENTS", opts.buffer_size)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps) failed")?;

    if !opts.pids.is_empty() {
        let mut pids: BpfHashMap<_, u32, u8> =
            BpfHashMap::try_from(ebpf.map_mut("PIDS").context("map PIDS missing")?)?;
        for pid in &opts.pids {
            pids.insert(pid, 1, 0).context("filling the --pid map")?;
        }
    }
    if !opts.ports.is_empty() {
        let mut ports: BpfHashMap<_, u32, u8> =
            BpfHashMap::try_from(ebpf.map_mut("PORTS").context("map PORTS missing")?)?;
        for port in &opts.ports {
            ports
                .insert(*port as u32, 1, 0)
                .context("filling the --port map")?;
        }
    }

    if !opts.netns.is_empty() {
        let mut netns: BpfHashMap<_, u32, u8> =
            BpfHashMap::try_from(ebpf.map_mut("NETNS").context("map NETNS missing")?)?;
        for ns in &opts.netns {
            netns.insert(ns, 1, 0).context("filling the --netns map")?;
        }
    }
    add_cgroup_ids(&mut ebpf, &opts.cgroups)?;

    let mut hooks = Vec::new();
    for hook in Hook::ALL {
        let mut status = HookStatus {
            hook: hook.name().to_string(),
            mechanism: None,
            failures: Vec::new(),
            skipped: None,
        };
        match mechanisms_for(hook, opts.backend) {
            Err(why) => status.skipped = Some(why),
            Ok(list) => {
                for (mechanism, program) in list {
                    let program = program_for(hook, mechanism, program, facts);
                    match try_attach(&mut ebpf, &btf, hook, mechanism, program) {
                        Ok(()) => {
                            status.mechanism = Some(mechanism);
                            break;
                        }
                        Err(reason) => status.failures.push((mechanism, reason)),
                    }
                }
            }
        }
        hooks.push(status);
    }
    // Owner hooks (and the close() site for --stacks): always.
    for aux in AuxHook::ALL {
        hooks.push(attach_aux(&mut ebpf, &btf, aux, opts.backend, facts));
    }
    Ok(Attached { ebpf, hooks })
}

/// The mechanisms, with their program, an owner hook may use under `backend`, best first: the
/// syscall tracepoints always (owners are learned whatever the backend), sys_enter_close with a
/// raw tracepoint on sys_enter behind it (before 5.15 tracepoint programs cannot reach the user
/// registers close() needs for `--stacks`), inet_csk_accept's return as the backend allows for
/// function hooks.
fn aux_mechanisms(
    aux: AuxHook,
    backend: Backend,
    facts: &KernelFacts,
) -> Result<Vec<(Mechanism, &'static str)>, String> {
    let mut list = Vec::new();
    if aux.tracepoint().is_some() {
        list.push((Mechanism::Tracepoint, aux.program()));
        if let Some(raw) = aux.fallback() {
            list.push((Mechanism::RawTp, raw));
        }
        return Ok(list);
    }
    let kretprobe = aux.fallback().unwrap_or(aux.program());
    // The fexit program for this signature (the return value follows the arguments).
    let fexit = match aux
        .function()
        .and_then(|f| facts.functions.get(f))
        .map(Vec::len)
    {
        Some(4) => "fexit_inet_csk_accept4",
        _ => aux.program(),
    };
    match backend {
        Backend::Auto => Ok(vec![
            (Mechanism::Fexit, fexit),
            (Mechanism::Kretprobe, kretprobe),
        ]),
        Backend::Fentry => Ok(vec![(Mechanism::Fexit, fexit)]),
        Backend::Kprobe => Ok(vec![(Mechanism::Kretprobe, kretprobe)]),
        Backend::Tracepoint => Err("not requested (--backend tracepoint)".into()),
    }
}

/// Loads and attaches an owner hook's `program` with `mechanism`.
fn try_attach_aux(
    ebpf: &mut Ebpf,
    btf: &Btf,
    aux: AuxHook,
    mechanism: Mechanism,
    program: &str,
) -> Result<(), String> {
    match (mechanism, aux.tracepoint()) {
        (Mechanism::Tracepoint, Some((category, name))) => {
            let result: Result<(), ProgramError> = (|| {
                let p: &mut TracePoint = ebpf
                    .program_mut(program)
                    .ok_or(ProgramError::NotLoaded)?
                    .try_into()?;
                p.load()?;
                p.attach(category, name)?;
                Ok(())
            })();
            result.map_err(|e| explain(&e, mechanism))
        }
        (Mechanism::RawTp, Some(_)) => {
            let result: Result<(), ProgramError> = (|| {
                let p: &mut RawTracePoint = ebpf
                    .program_mut(program)
                    .ok_or(ProgramError::NotLoaded)?
                    .try_into()?;
                p.load()?;
                p.attach("sys_enter")?;
                Ok(())
            })();
            result.map_err(|e| {
                unload(ebpf, program);
                explain(&e, mechanism)
            })
        }
        _ => match aux.function() {
            Some(function) => attach_program(ebpf, btf, function, None, mechanism, program),
            None => Err(format!(
                "{mechanism:?} needs a kernel function, and {aux:?} has none"
            )),
        },
    }
}

/// Attaches an owner hook with the first mechanism that works.
fn attach_aux(
    ebpf: &mut Ebpf,
    btf: &Btf,
    aux: AuxHook,
    backend: Backend,
    facts: &KernelFacts,
) -> HookStatus {
    let mut status = HookStatus {
        hook: aux.name().to_string(),
        mechanism: None,
        failures: Vec::new(),
        skipped: None,
    };
    match aux_mechanisms(aux, backend, facts) {
        Err(why) => status.skipped = Some(why),
        Ok(list) => {
            for (mechanism, program) in list {
                match try_attach_aux(ebpf, btf, aux, mechanism, program) {
                    Ok(()) => {
                        status.mechanism = Some(mechanism);
                        break;
                    }
                    Err(e) => status.failures.push((mechanism, e)),
                }
            }
        }
    }
    status
}

/// A hook and, for each of its mechanisms, whether it attached (or why not).
pub(crate) type HookProbe = (AnyHook, Vec<(Mechanism, Result<(), String>)>);

/// Tries every mechanism of every hook (event hooks, then owner hooks) on its own (attach, then
/// detach), for `doctor`.
pub(crate) fn probe_all(facts: &KernelFacts) -> Result<Vec<HookProbe>> {
    let btf = Btf::from_sys_fs().context("cannot load the kernel's BTF")?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global("CONFIG", &facts.config, true)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps) failed")?;
    let mut out = Vec::new();
    for hook in Hook::ALL {
        let mut results = Vec::new();
        for (mechanism, program) in all_mechanisms(hook) {
            let program = program_for(hook, mechanism, program, facts);
            let r = try_attach(&mut ebpf, &btf, hook, mechanism, program);
            if r.is_ok() {
                unload(&mut ebpf, program);
            }
            results.push((mechanism, r));
        }
        out.push((AnyHook::Event(hook), results));
    }
    for aux in AuxHook::ALL {
        let mut results = Vec::new();
        for (mechanism, program) in aux_mechanisms(aux, Backend::Auto, facts).unwrap_or_default() {
            let r = try_attach_aux(&mut ebpf, &btf, aux, mechanism, program);
            if r.is_ok() {
                unload(&mut ebpf, program);
            }
            results.push((mechanism, r));
        }
        out.push((AnyHook::Aux(aux), results));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_names_programs_that_exist_in_the_object() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the built object parses");
        for hook in Hook::ALL {
            for (_, program) in all_mechanisms(hook) {
                assert!(obj.programs.contains_key(program), "{program} missing");
            }
        }
        for aux in AuxHook::ALL {
            assert!(obj.programs.contains_key(aux.program()), "{aux:?}");
            if let Some(fallback) = aux.fallback() {
                assert!(obj.programs.contains_key(fallback), "{fallback} missing");
            }
        }
        // The per-signature variants the loader picks from BTF.
        for program in [
            "fentry_tcp_send_active_reset_r2",
            "fentry_tcp_send_active_reset_r3",
            "fentry_tcp_send_active_reset_r4",
            "fexit_tcp_timewait_state_process4",
            "fexit_tcp_timewait_state_process5",
            "fexit_inet_csk_accept4",
        ] {
            assert!(obj.programs.contains_key(program), "{program} missing");
        }
    }

    #[test]
    fn backends_choose_mechanisms() {
        let names =
            |h, b| mechanisms_for(h, b).map(|v| v.into_iter().map(|(m, _)| m).collect::<Vec<_>>());
        let close = Hook::TcpClose;
        assert_eq!(
            names(close, Backend::Auto).unwrap(),
            [Mechanism::Fentry, Mechanism::Kprobe]
        );
        assert_eq!(names(close, Backend::Fentry).unwrap(), [Mechanism::Fentry]);
        assert_eq!(names(close, Backend::Kprobe).unwrap(), [Mechanism::Kprobe]);
        assert!(names(close, Backend::Tracepoint).is_err());
        assert_eq!(
            names(Hook::TcpTimewaitStateProcessReturn, Backend::Auto).unwrap(),
            [Mechanism::Fexit, Mechanism::Kretprobe]
        );
        for b in [
            Backend::Auto,
            Backend::Fentry,
            Backend::Kprobe,
            Backend::Tracepoint,
        ] {
            assert_eq!(
                names(Hook::InetSockSetState, b).unwrap(),
                [Mechanism::TpBtf, Mechanism::RawTp]
            );
        }
    }

    #[test]
    fn errno_is_read_from_the_error_not_its_text() {
        let e = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_raw_tracepoint_open",
            io_error: std::io::Error::from_raw_os_error(libc::EPERM),
        });
        assert_eq!(os_error(&e), Some(libc::EPERM));
        assert!(explain(&e, Mechanism::Fentry).contains("EPERM"));
        let e = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: std::io::Error::from_raw_os_error(524),
        });
        assert!(explain(&e, Mechanism::Fexit).contains("ENOTSUPP"));
    }

    #[test]
    fn buffer_sizes_parse_with_suffixes() {
        assert_eq!(parse_buffer_size("4M", 4096), Ok(4 << 20));
        assert_eq!(parse_buffer_size("64K", 4096), Ok(64 << 10));
        assert_eq!(parse_buffer_size("64kib", 4096), Ok(64 << 10));
        assert_eq!(parse_buffer_size("8192", 4096), Ok(8192));
        assert_eq!(parse_buffer_size("1G", 4096), Ok(1 << 30));
        assert_eq!(DEFAULT_BUFFER_SIZE, 4 << 20);
    }

    #[test]
    fn bad_buffer_sizes_name_the_problem_and_the_fix() {
        let e = parse_buffer_size("3M", 4096).unwrap_err();
        assert!(e.contains("power of two"), "{e}");
        assert!(e.contains("use 2M or 4M"), "{e}");
        let e = parse_buffer_size("1K", 4096).unwrap_err();
        assert!(e.contains("page size (4096 bytes)"), "{e}");
        assert!(e.contains("use 4K"), "{e}");
        let e = parse_buffer_size("4K", 16384).unwrap_err();
        assert!(e.contains("use 16K"), "{e}");
        let e = parse_buffer_size("4Q", 4096).unwrap_err();
        assert!(e.contains("suffix"), "{e}");
        let e = parse_buffer_size("lots", 4096).unwrap_err();
        assert!(e.contains("not a size"), "{e}");
        let e = parse_buffer_size("4G", 4096).unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }
}
