//! Loading the eBPF object and attaching one program per hook, with the mechanism the backend
//! and the kernel allow. A hook that cannot be attached is recorded with the reason for every
//! mechanism tried; the tracer keeps going with the rest.

use std::{fmt, path::Path};

use anyhow::{Context, Result};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::HashMap as BpfHashMap,
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, RawTracePoint, TracePoint},
};
use serde::Serialize;
use tcp_trace_common::Config;

use crate::kernel::btf::KernelFacts;

/// The eBPF object, built from tcp-trace-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp-trace"));

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// A kernel function; `ret` = hook its return.
    Function {
        ret: bool,
    },
    Tracepoint,
    /// A `syscalls:` tracepoint (perf event), one program.
    Syscall,
}

/// One hook: a kernel function or tracepoint, and the programs that can serve it, best first.
pub struct HookDef {
    /// What users see: `tcp_close`, `tcp_timewait_state_process:return`, `sock:inet_sock_set_state`.
    pub name: &'static str,
    /// The kernel symbol or tracepoint name the program attaches to.
    pub target: &'static str,
    kind: Target,
    /// (mechanism, program name in the object); function hooks list the trampoline form first.
    programs: [(Mechanism, &'static str); 2],
}

pub const HOOKS: &[HookDef] = &[
    func("tcp_close", "fentry_tcp_close", "kprobe_tcp_close"),
    func("tcp_fin", "fentry_tcp_fin", "kprobe_tcp_fin"),
    func("tcp_send_fin", "fentry_tcp_send_fin", "kprobe_tcp_send_fin"),
    func(
        "tcp_send_active_reset",
        "fentry_tcp_send_active_reset",
        "kprobe_tcp_send_active_reset",
    ),
    func(
        "tcp_time_wait",
        "fentry_tcp_time_wait",
        "kprobe_tcp_time_wait",
    ),
    func(
        "tcp_timewait_state_process",
        "fentry_tcp_timewait_state_process",
        "kprobe_tcp_timewait_state_process",
    ),
    HookDef {
        name: "tcp_timewait_state_process:return",
        target: "tcp_timewait_state_process",
        kind: Target::Function { ret: true },
        programs: [
            (Mechanism::Fexit, "fexit_tcp_timewait_state_process"),
            (Mechanism::Kretprobe, "kretprobe_tcp_timewait_state_process"),
        ],
    },
    tp("sock:inet_sock_set_state", "inet_sock_set_state"),
    tp("tcp:tcp_send_reset", "tcp_send_reset"),
    tp("tcp:tcp_receive_reset", "tcp_receive_reset"),
    tp("tcp:tcp_destroy_sock", "tcp_destroy_sock"),
];

/// Hooks that send no events: they tell the eBPF side who holds each socket in user space
/// (see the README's "Owners"). inet_csk_accept's return names the child an accept() took,
/// io_uring's included; the syscall tracepoints do the same on every kernel, and close()'s
/// finds the socket a descriptor releases (the closer) and whether others still hold it.
pub const OWNER_HOOKS: &[HookDef] = &[
    HookDef {
        name: "inet_csk_accept:return",
        target: "inet_csk_accept",
        kind: Target::Function { ret: true },
        programs: [
            (Mechanism::Fexit, "fexit_inet_csk_accept"),
            (Mechanism::Kretprobe, "kretprobe_inet_csk_accept"),
        ],
    },
    syscall("syscalls:sys_enter_accept4", "sys_enter_accept4"),
    syscall("syscalls:sys_exit_accept4", "sys_exit_accept4"),
    syscall("syscalls:sys_enter_accept", "sys_enter_accept"),
    syscall("syscalls:sys_exit_accept", "sys_exit_accept"),
    syscall("syscalls:sys_enter_close", "sys_enter_close"),
    syscall("syscalls:sys_exit_close", "sys_exit_close"),
];

/// A classic syscall tracepoint served by one program (no second mechanism exists for it).
const fn syscall(name: &'static str, program: &'static str) -> HookDef {
    HookDef {
        name,
        target: name,
        kind: Target::Syscall,
        programs: [
            (Mechanism::Tracepoint, program),
            (Mechanism::Tracepoint, program),
        ],
    }
}

impl HookDef {
    pub fn is_function(&self) -> bool {
        matches!(self.kind, Target::Function { .. })
    }

    pub fn is_syscall(&self) -> bool {
        matches!(self.kind, Target::Syscall)
    }
}

const fn func(name: &'static str, fentry: &'static str, kprobe: &'static str) -> HookDef {
    HookDef {
        name,
        target: name,
        kind: Target::Function { ret: false },
        programs: [(Mechanism::Fentry, fentry), (Mechanism::Kprobe, kprobe)],
    }
}

const fn tp(name: &'static str, target: &'static str) -> HookDef {
    HookDef {
        name,
        target,
        kind: Target::Tracepoint,
        programs: [
            (Mechanism::TpBtf, concat_tp_btf(target)),
            (Mechanism::RawTp, concat_raw_tp(target)),
        ],
    }
}

// Program names follow the tracepoint: tp_btf_<tp> and raw_tp_<tp> (see tcp-trace-ebpf).
const fn concat_tp_btf(target: &'static str) -> &'static str {
    match target.as_bytes() {
        b"inet_sock_set_state" => "tp_btf_inet_sock_set_state",
        b"tcp_send_reset" => "tp_btf_tcp_send_reset",
        b"tcp_receive_reset" => "tp_btf_tcp_receive_reset",
        _ => "tp_btf_tcp_destroy_sock",
    }
}

const fn concat_raw_tp(target: &'static str) -> &'static str {
    match target.as_bytes() {
        b"inet_sock_set_state" => "raw_tp_inet_sock_set_state",
        b"tcp_send_reset" => "raw_tp_tcp_send_reset",
        b"tcp_receive_reset" => "raw_tp_tcp_receive_reset",
        _ => "raw_tp_tcp_destroy_sock",
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
    pub fn attached(&self) -> bool {
        self.mechanism.is_some()
    }

    /// One line: why this hook is not attached.
    pub fn why_not(&self) -> String {
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

pub struct AttachOptions {
    /// Record the user call stack of close() calls (two more tracepoints; a stack walk per
    /// close() on the host) and attach it to the events close() causes.
    pub stacks: bool,
    pub backend: Backend,
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub kernel_log: bool,
    /// Size of the EVENTS ring buffer in bytes (`--buffer-size`): a power of two and a multiple
    /// of the page size (see [`parse_buffer_size`]).
    pub buffer_size: u32,
}

/// The EVENTS ring buffer's size when `--buffer-size` is not given.
pub const DEFAULT_BUFFER_SIZE: u32 = tcp_trace_common::RING_BYTES;

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
pub struct Attached {
    pub ebpf: Ebpf,
    pub hooks: Vec<HookStatus>,
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
    match mechanism {
        Mechanism::Fentry | Mechanism::Fexit if text.contains("os error 1)") => {
            return "refused by the kernel (EPERM: its security policy forbids BPF trampolines)"
                .into();
        }
        Mechanism::Fentry | Mechanism::Fexit if text.contains("os error 524") => {
            return "BPF trampolines not supported by this kernel (ENOTSUPP)".into();
        }
        Mechanism::Kprobe | Mechanism::Kretprobe if !kprobes_available() => {
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

pub fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
        || Path::new("/sys/kernel/tracing/kprobe_events").exists()
        || Path::new("/sys/kernel/debug/tracing/kprobe_events").exists()
}

fn try_attach(
    ebpf: &mut Ebpf,
    btf: &Btf,
    def: &HookDef,
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
                p.load(def.target, btf)?;
                p.attach()?;
            }
            Mechanism::Fexit => {
                let p: &mut FExit = prog.try_into()?;
                p.load(def.target, btf)?;
                p.attach()?;
            }
            Mechanism::Kprobe | Mechanism::Kretprobe => {
                let p: &mut KProbe = prog.try_into()?;
                p.load()?;
                p.attach(def.target, 0)?;
            }
            Mechanism::TpBtf => {
                let p: &mut BtfTracePoint = prog.try_into()?;
                p.load(def.target, btf)?;
                p.attach()?;
            }
            Mechanism::RawTp => {
                let p: &mut RawTracePoint = prog.try_into()?;
                p.load()?;
                p.attach(def.target)?;
            }
            Mechanism::Tracepoint => {
                let p: &mut TracePoint = prog.try_into()?;
                p.load()?;
                let (category, name) = def.target.split_once(':').unwrap_or(("tcp", def.target));
                p.attach(category, name)?;
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

/// Detaches and unloads one program (a no-op when it is not loaded).
fn unload(ebpf: &mut Ebpf, program: &str) {
    use aya::programs::Program;
    let _ = match ebpf.program_mut(program) {
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        Some(Program::BtfTracePoint(p)) => p.unload(),
        Some(Program::RawTracePoint(p)) => p.unload(),
        _ => Ok(()),
    };
}

fn mechanisms_for(
    def: &HookDef,
    backend: Backend,
) -> Result<Vec<(Mechanism, &'static str)>, String> {
    match (def.kind, backend) {
        (Target::Tracepoint, _) => Ok(def.programs.to_vec()),
        (Target::Syscall, _) => Ok(vec![def.programs[0]]),
        (Target::Function { .. }, Backend::Auto) => Ok(def.programs.to_vec()),
        (Target::Function { .. }, Backend::Fentry) => Ok(vec![def.programs[0]]),
        (Target::Function { .. }, Backend::Kprobe) => Ok(vec![def.programs[1]]),
        (Target::Function { .. }, Backend::Tracepoint) => {
            Err("not requested (--backend tracepoint)".into())
        }
    }
}

/// Loads the object with `facts` baked in as constants and attaches every hook it can.
pub fn attach(facts: &KernelFacts, opts: &AttachOptions) -> Result<Attached> {
    let btf = Btf::from_sys_fs().context(
        "cannot load the kernel's BTF (/sys/kernel/btf/vmlinux): a kernel with \
         CONFIG_DEBUG_INFO_BTF=y is required",
    )?;
    let config = Config {
        filter_pids: (!opts.pids.is_empty()) as u32,
        filter_ports: (!opts.ports.is_empty()) as u32,
        capture_stacks: opts.stacks as u32,
        ..facts.config
    };
    // aya-log's level global: 0 turns the programs' log statements into dead code.
    let log_level: u8 = if opts.kernel_log { 0xff } else { 0 };
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global("CONFIG", &config, true)
        .override_global("AYA_LOG_LEVEL", &log_level, false)
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

    let mut hooks = Vec::new();
    for def in HOOKS.iter().chain(OWNER_HOOKS) {
        let mut status = HookStatus {
            hook: def.name.to_string(),
            mechanism: None,
            failures: Vec::new(),
            skipped: None,
        };
        match mechanisms_for(def, opts.backend) {
            Err(why) => status.skipped = Some(why),
            Ok(list) => {
                for (mechanism, program) in list {
                    match try_attach(&mut ebpf, &btf, def, mechanism, program) {
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
    Ok(Attached { ebpf, hooks })
}

/// A hook and, for each of its mechanisms, whether it attached (or why not).
pub type HookProbe = (&'static HookDef, Vec<(Mechanism, Result<(), String>)>);

/// Tries every mechanism of every hook on its own (attach, then detach), for `doctor`.
pub fn probe_all(facts: &KernelFacts) -> Result<Vec<HookProbe>> {
    let btf = Btf::from_sys_fs().context("cannot load the kernel's BTF")?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global("CONFIG", &facts.config, true)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps) failed")?;
    let mut out = Vec::new();
    for def in HOOKS.iter().chain(OWNER_HOOKS) {
        let mut results = Vec::new();
        let programs = match def.kind {
            Target::Syscall => &def.programs[..1],
            _ => &def.programs[..],
        };
        for &(mechanism, program) in programs {
            let r = try_attach(&mut ebpf, &btf, def, mechanism, program);
            if r.is_ok() {
                unload(&mut ebpf, program);
            }
            results.push((mechanism, r));
        }
        out.push((def, results));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_names_programs_that_exist_in_the_object() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the built object parses");
        for def in HOOKS.iter().chain(OWNER_HOOKS) {
            for (_, program) in def.programs {
                assert!(obj.programs.contains_key(program), "{program} missing");
            }
        }
    }

    #[test]
    fn backends_choose_mechanisms() {
        let close = &HOOKS[0];
        let set_state = HOOKS
            .iter()
            .find(|h| h.name == "sock:inet_sock_set_state")
            .unwrap();
        let names =
            |b| mechanisms_for(close, b).map(|v| v.into_iter().map(|(m, _)| m).collect::<Vec<_>>());
        assert_eq!(
            names(Backend::Auto).unwrap(),
            [Mechanism::Fentry, Mechanism::Kprobe]
        );
        assert_eq!(names(Backend::Fentry).unwrap(), [Mechanism::Fentry]);
        assert_eq!(names(Backend::Kprobe).unwrap(), [Mechanism::Kprobe]);
        assert!(names(Backend::Tracepoint).is_err());
        for b in [
            Backend::Auto,
            Backend::Fentry,
            Backend::Kprobe,
            Backend::Tracepoint,
        ] {
            let m: Vec<_> = mechanisms_for(set_state, b)
                .unwrap()
                .into_iter()
                .map(|(m, _)| m)
                .collect();
            assert_eq!(m, [Mechanism::TpBtf, Mechanism::RawTp]);
        }
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
