//! The hook registry: every kernel hook tcp-trace attaches to, once. Its number in events (part
//! of the recorded-trace format, docs/record-format.md: append, never renumber), the name users
//! see, the kernel symbol or tracepoint, the programs that can serve it, and what it shows.
//! attach, doctor, decode, the flows' visibility, the reset rules, live's blind-spot text and
//! the bench synthesizer all read it from here.

/// A hook whose programs emit [`crate::Event`]s; the discriminant is `Event::hook`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Hook {
    TcpClose = 1,
    TcpFin = 2,
    TcpSendFin = 3,
    TcpSendActiveReset = 4,
    TcpTimeWait = 5,
    /// `tcp_timewait_state_process` entry: the segment arriving at a TIME_WAIT minisocket.
    TcpTimewaitStateProcess = 6,
    /// `tcp_timewait_state_process` return: the `enum tcp_tw_status` it decided.
    TcpTimewaitStateProcessReturn = 7,
    InetSockSetState = 8,
    TcpSendReset = 9,
    TcpReceiveReset = 10,
    TcpDestroySock = 11,
}

/// How a hook reaches the kernel: which families of attach mechanism can serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// A kernel function: fentry (or fexit for its return) first, else kprobe (kretprobe).
    Function { ret: bool },
    /// A tracepoint of `system`: tp_btf first, else raw_tp.
    Tracepoint { system: &'static str },
}

impl Hook {
    /// Every hook, in ABI order.
    pub const ALL: [Hook; 11] = [
        Hook::TcpClose,
        Hook::TcpFin,
        Hook::TcpSendFin,
        Hook::TcpSendActiveReset,
        Hook::TcpTimeWait,
        Hook::TcpTimewaitStateProcess,
        Hook::TcpTimewaitStateProcessReturn,
        Hook::InetSockSetState,
        Hook::TcpSendReset,
        Hook::TcpReceiveReset,
        Hook::TcpDestroySock,
    ];

    /// The hook of an `Event::hook` number; None for a number no hook has.
    pub const fn from_abi(n: u8) -> Option<Hook> {
        Some(match n {
            1 => Hook::TcpClose,
            2 => Hook::TcpFin,
            3 => Hook::TcpSendFin,
            4 => Hook::TcpSendActiveReset,
            5 => Hook::TcpTimeWait,
            6 => Hook::TcpTimewaitStateProcess,
            7 => Hook::TcpTimewaitStateProcessReturn,
            8 => Hook::InetSockSetState,
            9 => Hook::TcpSendReset,
            10 => Hook::TcpReceiveReset,
            11 => Hook::TcpDestroySock,
            _ => return None,
        })
    }

    /// The number in `Event::hook`.
    pub const fn abi(self) -> u8 {
        self as u8
    }

    /// What users see (attach reports, doctor, recordings' hook lists): `tcp_close`,
    /// `tcp_timewait_state_process:return`, `sock:inet_sock_set_state`.
    pub const fn name(self) -> &'static str {
        match self {
            Hook::TcpClose => "tcp_close",
            Hook::TcpFin => "tcp_fin",
            Hook::TcpSendFin => "tcp_send_fin",
            Hook::TcpSendActiveReset => "tcp_send_active_reset",
            Hook::TcpTimeWait => "tcp_time_wait",
            Hook::TcpTimewaitStateProcess => "tcp_timewait_state_process",
            Hook::TcpTimewaitStateProcessReturn => "tcp_timewait_state_process:return",
            Hook::InetSockSetState => "sock:inet_sock_set_state",
            Hook::TcpSendReset => "tcp:tcp_send_reset",
            Hook::TcpReceiveReset => "tcp:tcp_receive_reset",
            Hook::TcpDestroySock => "tcp:tcp_destroy_sock",
        }
    }

    /// The kernel symbol or tracepoint (without its system) the programs attach to.
    pub const fn target(self) -> &'static str {
        match self {
            Hook::TcpClose => "tcp_close",
            Hook::TcpFin => "tcp_fin",
            Hook::TcpSendFin => "tcp_send_fin",
            Hook::TcpSendActiveReset => "tcp_send_active_reset",
            Hook::TcpTimeWait => "tcp_time_wait",
            Hook::TcpTimewaitStateProcess | Hook::TcpTimewaitStateProcessReturn => {
                "tcp_timewait_state_process"
            }
            Hook::InetSockSetState => "inet_sock_set_state",
            Hook::TcpSendReset => "tcp_send_reset",
            Hook::TcpReceiveReset => "tcp_receive_reset",
            Hook::TcpDestroySock => "tcp_destroy_sock",
        }
    }

    pub const fn kind(self) -> HookKind {
        match self {
            Hook::TcpClose
            | Hook::TcpFin
            | Hook::TcpSendFin
            | Hook::TcpSendActiveReset
            | Hook::TcpTimeWait
            | Hook::TcpTimewaitStateProcess => HookKind::Function { ret: false },
            Hook::TcpTimewaitStateProcessReturn => HookKind::Function { ret: true },
            Hook::InetSockSetState => HookKind::Tracepoint { system: "sock" },
            Hook::TcpSendReset | Hook::TcpReceiveReset | Hook::TcpDestroySock => {
                HookKind::Tracepoint { system: "tcp" }
            }
        }
    }

    pub const fn is_function(self) -> bool {
        matches!(self.kind(), HookKind::Function { .. })
    }

    /// The programs in the eBPF object that serve this hook, best first: (fentry or fexit,
    /// kprobe or kretprobe) for a function, (tp_btf, raw_tp) for a tracepoint.
    pub const fn programs(self) -> [&'static str; 2] {
        match self {
            Hook::TcpClose => ["fentry_tcp_close", "kprobe_tcp_close"],
            Hook::TcpFin => ["fentry_tcp_fin", "kprobe_tcp_fin"],
            Hook::TcpSendFin => ["fentry_tcp_send_fin", "kprobe_tcp_send_fin"],
            Hook::TcpSendActiveReset => [
                "fentry_tcp_send_active_reset",
                "kprobe_tcp_send_active_reset",
            ],
            Hook::TcpTimeWait => ["fentry_tcp_time_wait", "kprobe_tcp_time_wait"],
            Hook::TcpTimewaitStateProcess => [
                "fentry_tcp_timewait_state_process",
                "kprobe_tcp_timewait_state_process",
            ],
            Hook::TcpTimewaitStateProcessReturn => [
                "fexit_tcp_timewait_state_process",
                "kretprobe_tcp_timewait_state_process",
            ],
            Hook::InetSockSetState => ["tp_btf_inet_sock_set_state", "raw_tp_inet_sock_set_state"],
            Hook::TcpSendReset => ["tp_btf_tcp_send_reset", "raw_tp_tcp_send_reset"],
            Hook::TcpReceiveReset => ["tp_btf_tcp_receive_reset", "raw_tp_tcp_receive_reset"],
            Hook::TcpDestroySock => ["tp_btf_tcp_destroy_sock", "raw_tp_tcp_destroy_sock"],
        }
    }

    /// Short name for the human event lines.
    pub const fn short(self) -> &'static str {
        match self {
            Hook::TcpClose => "close",
            Hook::TcpFin => "fin-rcvd",
            Hook::TcpSendFin => "send-fin",
            Hook::TcpSendActiveReset => "active-rst",
            Hook::TcpTimeWait => "time-wait",
            Hook::TcpTimewaitStateProcess => "tw-segment",
            Hook::TcpTimewaitStateProcessReturn => "tw-verdict",
            Hook::InetSockSetState => "state",
            Hook::TcpSendReset => "send-rst",
            Hook::TcpReceiveReset => "rcv-rst",
            Hook::TcpDestroySock => "destroy",
        }
    }

    /// What a trace cannot show without this hook (hooks that share a sentence name the same
    /// text, which is said once).
    pub const fn blind_spot(self) -> &'static str {
        match self {
            Hook::TcpClose => "close() details (unread/unsent bytes, SO_LINGER)",
            Hook::TcpFin | Hook::TcpSendFin => {
                "FIN received/queued moments (state changes still show them)"
            }
            Hook::TcpSendActiveReset => "active resets outside tcp:tcp_send_reset",
            Hook::TcpTimeWait => "entry into TIME_WAIT (the full socket shows only -> CLOSE)",
            Hook::TcpTimewaitStateProcess | Hook::TcpTimewaitStateProcessReturn => {
                "segments reaching TIME_WAIT minisockets and their verdicts"
            }
            Hook::InetSockSetState
            | Hook::TcpSendReset
            | Hook::TcpReceiveReset
            | Hook::TcpDestroySock => "some tracepoint events (see above)",
        }
    }

    /// The hook of a user-facing [`Hook::name`]; a tracepoint may be named without its system
    /// (`tcp_send_reset`).
    pub fn from_name(name: &str) -> Option<Hook> {
        let name = name.trim();
        Hook::ALL.into_iter().find(|h| {
            let full = h.name();
            full == name
                || match h.kind() {
                    HookKind::Tracepoint { system } => {
                        full.len() == system.len() + 1 + name.len() && full.ends_with(name)
                    }
                    HookKind::Function { .. } => false,
                }
        })
    }
}

/// Programs that feed the maps but emit no events of their own: who holds each socket in user
/// space (accept(), close(): see the README's "Owners") and, with `--stacks`, where close() was
/// called. Always attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuxHook {
    SysEnterClose,
    SysExitClose,
    SysEnterAccept4,
    SysExitAccept4,
    SysEnterAccept,
    SysExitAccept,
    /// inet_csk_accept's return (fexit/kretprobe): accepts the syscalls miss (io_uring).
    InetCskAcceptReturn,
}

impl AuxHook {
    pub const ALL: [AuxHook; 7] = [
        AuxHook::SysEnterClose,
        AuxHook::SysExitClose,
        AuxHook::SysEnterAccept4,
        AuxHook::SysExitAccept4,
        AuxHook::SysEnterAccept,
        AuxHook::SysExitAccept,
        AuxHook::InetCskAcceptReturn,
    ];

    /// What users see: `syscalls:sys_enter_close`.
    pub const fn name(self) -> &'static str {
        match self {
            AuxHook::SysEnterClose => "syscalls:sys_enter_close",
            AuxHook::SysExitClose => "syscalls:sys_exit_close",
            AuxHook::SysEnterAccept4 => "syscalls:sys_enter_accept4",
            AuxHook::SysExitAccept4 => "syscalls:sys_exit_accept4",
            AuxHook::SysEnterAccept => "syscalls:sys_enter_accept",
            AuxHook::SysExitAccept => "syscalls:sys_exit_accept",
            AuxHook::InetCskAcceptReturn => "inet_csk_accept:return",
        }
    }

    /// (system, tracepoint) of the classic tracepoint it attaches to; None for the function hook.
    pub const fn tracepoint(self) -> Option<(&'static str, &'static str)> {
        match self {
            AuxHook::SysEnterClose => Some(("syscalls", "sys_enter_close")),
            AuxHook::SysExitClose => Some(("syscalls", "sys_exit_close")),
            AuxHook::SysEnterAccept4 => Some(("syscalls", "sys_enter_accept4")),
            AuxHook::SysExitAccept4 => Some(("syscalls", "sys_exit_accept4")),
            AuxHook::SysEnterAccept => Some(("syscalls", "sys_enter_accept")),
            AuxHook::SysExitAccept => Some(("syscalls", "sys_exit_accept")),
            AuxHook::InetCskAcceptReturn => None,
        }
    }

    /// The program in the eBPF object (the function hook: its fexit form).
    pub const fn program(self) -> &'static str {
        match self.tracepoint() {
            Some((_, name)) => name,
            None => "fexit_inet_csk_accept",
        }
    }

    /// The kernel function a function hook is on.
    pub const fn function(self) -> Option<&'static str> {
        match self {
            AuxHook::InetCskAcceptReturn => Some("inet_csk_accept"),
            _ => None,
        }
    }

    /// The program tried when [`AuxHook::program`] cannot attach: the function hook's kretprobe
    /// form; for sys_enter_close, a raw tracepoint on sys_enter (where the syscall tracepoint
    /// cannot load, as on 5.10 with BTF-typed tracepoint contexts).
    pub const fn fallback(self) -> Option<&'static str> {
        match self {
            AuxHook::InetCskAcceptReturn => Some("kretprobe_inet_csk_accept"),
            AuxHook::SysEnterClose => Some("raw_tp_sys_enter_close"),
            _ => None,
        }
    }

    pub const fn blind_spot(self) -> &'static str {
        match self {
            AuxHook::SysEnterClose | AuxHook::SysExitClose => {
                "which task close()d a socket, and close() call stacks (owners and closers come \
                 from socket events only; a socket passed on after fork or SCM_RIGHTS keeps its \
                 first owner)"
            }
            AuxHook::InetCskAcceptReturn => {
                "accepts outside accept()/accept4() (io_uring): such children keep their \
                 listener's owner until close()"
            }
            _ => "accept() (children keep their listener's owner until close())",
        }
    }

    pub fn from_name(name: &str) -> Option<AuxHook> {
        AuxHook::ALL.into_iter().find(|h| h.name() == name.trim())
    }
}

/// Any hook the attach report may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnyHook {
    Event(Hook),
    Aux(AuxHook),
}

impl AnyHook {
    pub fn from_name(name: &str) -> Option<AnyHook> {
        Hook::from_name(name)
            .map(AnyHook::Event)
            .or_else(|| AuxHook::from_name(name).map(AnyHook::Aux))
    }

    pub const fn name(self) -> &'static str {
        match self {
            AnyHook::Event(h) => h.name(),
            AnyHook::Aux(h) => h.name(),
        }
    }

    pub const fn blind_spot(self) -> &'static str {
        match self {
            AnyHook::Event(h) => h.blind_spot(),
            AnyHook::Aux(h) => h.blind_spot(),
        }
    }
}

/// A set of [`Hook`]s (which a trace had attached), one bit per ABI number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HookSet(u32);

impl HookSet {
    pub const fn empty() -> HookSet {
        HookSet(0)
    }

    pub fn all() -> HookSet {
        Hook::ALL.into_iter().collect()
    }

    /// The four tracepoints only (`--backend tracepoint`, or a kernel without function hooks).
    pub fn tracepoints_only() -> HookSet {
        Hook::ALL.into_iter().filter(|h| !h.is_function()).collect()
    }

    pub const fn has(self, hook: Hook) -> bool {
        self.0 & (1 << hook as u32) != 0
    }

    pub fn insert(&mut self, hook: Hook) {
        self.0 |= 1 << hook as u32;
    }

    /// The hooks in the set, in ABI order.
    pub fn iter(self) -> impl Iterator<Item = Hook> {
        Hook::ALL.into_iter().filter(move |h| self.has(*h))
    }

    /// The hooks not in the set, in ABI order.
    pub fn missing(self) -> impl Iterator<Item = Hook> {
        Hook::ALL.into_iter().filter(move |h| !self.has(*h))
    }
}

impl FromIterator<Hook> for HookSet {
    fn from_iter<I: IntoIterator<Item = Hook>>(iter: I) -> HookSet {
        let mut s = HookSet::empty();
        for h in iter {
            s.insert(h);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_stay_put() {
        for (i, h) in Hook::ALL.into_iter().enumerate() {
            assert_eq!(
                h.abi() as usize,
                i + 1,
                "{h:?}: the recording format fixes it"
            );
            assert_eq!(Hook::from_abi(h.abi()), Some(h));
        }
        assert_eq!(Hook::from_abi(0), None);
        assert_eq!(Hook::from_abi(12), None);
    }

    #[test]
    fn names_round_trip_with_or_without_the_system() {
        for h in Hook::ALL {
            assert_eq!(Hook::from_name(h.name()), Some(h));
            assert_eq!(AnyHook::from_name(h.name()), Some(AnyHook::Event(h)));
        }
        assert_eq!(Hook::from_name("tcp_send_reset"), Some(Hook::TcpSendReset));
        assert_eq!(
            Hook::from_name("inet_sock_set_state"),
            Some(Hook::InetSockSetState)
        );
        assert_eq!(Hook::from_name("bogus"), None);
        assert_eq!(Hook::from_name("close"), None);
        for h in AuxHook::ALL {
            assert_eq!(AnyHook::from_name(h.name()), Some(AnyHook::Aux(h)));
        }
    }

    #[test]
    fn sets() {
        assert_eq!(HookSet::all().iter().count(), 11);
        assert_eq!(HookSet::tracepoints_only().iter().count(), 4);
        assert_eq!(HookSet::tracepoints_only().missing().count(), 7);
        assert!(HookSet::tracepoints_only().has(Hook::TcpSendReset));
        assert!(!HookSet::tracepoints_only().has(Hook::TcpClose));
    }
}
