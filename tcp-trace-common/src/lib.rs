//! The ABI between tcp-trace's eBPF programs and its userspace: one fixed-size [`Event`] per hook
//! hit, the [`Config`] the loader fills in from the running kernel's BTF, and the small keys and
//! values of the shared maps. `no_std`, `#[repr(C)]`, no padding left implicit.
#![no_std]

pub const COMM_LEN: usize = 16;

pub mod hooks;
pub use hooks::{AnyHook, AuxHook, Hook, HookKind, HookSet};

/// `Event::hook` numbers, for the eBPF programs; they come from the registry ([`Hook`]).
pub mod hook {
    use super::Hook;
    pub const TCP_CLOSE: u8 = Hook::TcpClose.abi();
    pub const TCP_FIN: u8 = Hook::TcpFin.abi();
    pub const TCP_SEND_FIN: u8 = Hook::TcpSendFin.abi();
    pub const TCP_SEND_ACTIVE_RESET: u8 = Hook::TcpSendActiveReset.abi();
    pub const TCP_TIME_WAIT: u8 = Hook::TcpTimeWait.abi();
    pub const TW_STATE_PROCESS: u8 = Hook::TcpTimewaitStateProcess.abi();
    pub const TW_STATE_PROCESS_RET: u8 = Hook::TcpTimewaitStateProcessReturn.abi();
    pub const INET_SOCK_SET_STATE: u8 = Hook::InetSockSetState.abi();
    pub const TCP_SEND_RESET: u8 = Hook::TcpSendReset.abi();
    pub const TCP_RECEIVE_RESET: u8 = Hook::TcpReceiveReset.abi();
    pub const TCP_DESTROY_SOCK: u8 = Hook::TcpDestroySock.abi();
}

/// Bits of [`Event::flags`].
pub mod flag {
    /// SO_LINGER is on (`SOCK_LINGER` in sk_flags).
    pub const LINGER: u16 = 1 << 0;
    /// `reason` holds a kernel `enum sk_rst_reason` value.
    pub const HAS_REASON: u16 = 1 << 1;
    /// `SOCK_DONE`: a FIN was received.
    pub const SOCK_DONE: u16 = 1 << 2;
    /// `SOCK_DEAD`: the socket is orphaned (no file refers to it any more).
    pub const ORPHAN: u16 = 1 << 3;
    /// Addresses and ports were read from the packet (reply reset with no socket), not a socket.
    pub const TUPLE_FROM_SKB: u16 = 1 << 4;
    /// `owner_tgid`/`owner_comm` were learned earlier in process context, not guessed.
    pub const OWNER_KNOWN: u16 = 1 << 5;
    /// The socket is a TIME_WAIT minisocket (skc_state == TCP_TIME_WAIT).
    pub const TW_SOCK: u16 = 1 << 6;
    /// `ret` holds a return value (tcp_timewait_state_process return).
    pub const HAS_RET: u16 = 1 << 7;
    /// `tcp_close` details (timeout, linger, unread/unsent/unacked) are filled in.
    pub const HAS_CLOSE_DETAILS: u16 = 1 << 8;
    /// The owner is provisional: a child's listener's owner until the accepting process shows
    /// itself, or a holder that closed its descriptor while another still holds the socket.
    pub const OWNER_PROVISIONAL: u16 = 1 << 9;
    /// The current task is inside close() of this very socket (found by descriptor at
    /// sys_enter_close): it is the closer.
    pub const IN_CLOSE: u16 = 1 << 10;
    /// The provisional owner shares the socket (or the child's listener) with other
    /// processes: another may yet own it, so `--pid` lets the event through to userspace.
    pub const OWNER_SHARED: u16 = 1 << 11;
}

/// Bits of [`Owner::flags`].
pub mod owner_flag {
    /// See [`super::flag::OWNER_PROVISIONAL`].
    pub const PROVISIONAL: u32 = 1 << 0;
    /// See [`super::flag::OWNER_SHARED`]: on a listener, more than one process accept()ed on it.
    pub const SHARED: u32 = 1 << 1;
}

/// One hook hit. Field use by hook:
/// - all: `ts_ns`, `cpu`, `tgid`/`tid`/`comm` (current task), `owner_*`, `netns`, `sk`, the tuple
///   (`family`, `saddr`/`sport` = local end, `daddr`/`dport` = remote end) and `old_state` (the
///   socket's state when the hook ran).
/// - `INET_SOCK_SET_STATE`: `old_state` -> `new_state`.
/// - `TCP_CLOSE`: `timeout` (jiffies), `linger_jiffies`, `unread`, `unsent`, `unacked`, flags.
/// - `TCP_SEND_ACTIVE_RESET`, `TCP_SEND_RESET`: `reason` if `HAS_REASON`; `skb` (0 = active reset).
/// - `TCP_TIME_WAIT`: `new_state` = the requested TW substate, `timeout` = timeo (jiffies).
/// - `TW_STATE_PROCESS`: `old_state` = TW substate, `tcp_flags`, `seq`, `ack_seq`, `seg_len`,
///   `rcv_nxt` = tw_rcv_nxt; `TW_STATE_PROCESS_RET`: `ret` = tcp_tw_status, `new_state` = substate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub sk: u64,
    pub skb: u64,
    pub timeout: i64,
    pub linger_jiffies: i64,
    pub cpu: u32,
    pub tgid: u32,
    pub tid: u32,
    pub owner_tgid: u32,
    pub netns: u32,
    pub reason: u32,
    pub unread: u32,
    pub unsent: u32,
    pub unacked: u32,
    pub seq: u32,
    pub ack_seq: u32,
    pub seg_len: u32,
    pub rcv_nxt: u32,
    pub ret: i32,
    pub flags: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub hook: u8,
    pub old_state: u8,
    pub new_state: u8,
    pub tcp_flags: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    pub owner_comm: [u8; COMM_LEN],
    /// 1 + the id in `USER_STACKS` of the user call stack of the close() the current task is
    /// in (only with stack capture on); 0 = none.
    pub user_stack: u32,
    pub _reserved: u32,
    /// The return address on top of the user stack when close() entered the kernel: the
    /// caller of libc's close(), which a frame-pointer walk skips (libc keeps no frame).
    pub close_ret: u64,
    /// The cgroup (v2) id of the owner, learned with it (`OWNER_KNOWN`); 0 = not known. Added in
    /// recording format 2 (events of format 1 are 192 bytes, without it).
    pub owner_cgroup: u64,
}

pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();
// 5*8 + 14*4 + 4*2 + 4 + 4*16 + 2*4 = 180, + 4 padding + 8 = 192, + 8 = 200; keep it explicit.
const _: () = assert!(EVENT_SIZE == 200);
/// Events as recording format 1 stored them: [`Event`] without `owner_cgroup`.
pub const EVENT_SIZE_V1: usize = 192;

impl Event {
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            sk: 0,
            skb: 0,
            timeout: 0,
            linger_jiffies: 0,
            cpu: 0,
            tgid: 0,
            tid: 0,
            owner_tgid: 0,
            netns: 0,
            reason: 0,
            unread: 0,
            unsent: 0,
            unacked: 0,
            seq: 0,
            ack_seq: 0,
            seg_len: 0,
            rcv_nxt: 0,
            ret: 0,
            flags: 0,
            sport: 0,
            dport: 0,
            family: 0,
            hook: 0,
            old_state: 0,
            new_state: 0,
            tcp_flags: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; COMM_LEN],
            owner_comm: [0; COMM_LEN],
            user_stack: 0,
            _reserved: 0,
            close_ret: 0,
            owner_cgroup: 0,
        }
    }
}

/// What userspace learned from the running kernel's BTF, handed to the programs as a read-only
/// global before load (so the verifier sees constants). Offsets are byte offsets from the start of
/// the named struct. A zero `*_present` means the kernel lacks that field or argument.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    // struct sock_common (at offset 0 of sock, inet_timewait_sock and request_sock)
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    /// struct net -> ns.inum
    pub net_ns_inum: u32,
    // struct sock
    pub sk_flags: u32,
    pub sk_lingertime: u32,
    pub sk_protocol: u32,
    // struct tcp_sock
    pub tp_rcv_nxt: u32,
    pub tp_copied_seq: u32,
    pub tp_write_seq: u32,
    pub tp_snd_nxt: u32,
    pub tp_snd_una: u32,
    // inet_timewait_sock / tcp_timewait_sock
    pub tw_substate: u32,
    pub tw_rcv_nxt: u32,
    // struct sk_buff
    pub skb_len: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    /// Bit numbers in sk_flags (enum sock_flags).
    pub sock_flag_dead: u32,
    pub sock_flag_done: u32,
    pub sock_flag_linger: u32,
    /// Position + 1 of tcp_send_active_reset's `enum sk_rst_reason` argument; 0 = none (before
    /// 6.10). Usually 3, but compilers may drop the unused gfp_t argument (Debian 6.12: 2).
    pub active_reset_reason_arg: u32,
    /// The tcp_send_reset tracepoint has a third `reason` argument (6.10+).
    pub send_reset_has_reason: u32,
    /// Drop events whose owner is known and is not in `PIDS` (and current is not either).
    pub filter_pids: u32,
    /// Drop events whose local and remote ports are both not in `PORTS`.
    pub filter_ports: u32,
    /// struct inet_sock -> inet_sport: the local port survives unhashing (skc_num is zeroed
    /// when a closing socket releases its port).
    pub inet_sport: u32,
    /// Record the user call stack at close() (syscalls:sys_enter_close) and attach it to the
    /// events that close() causes.
    pub capture_stacks: u32,
    /// struct pt_regs -> sp (the user stack pointer at syscall entry).
    pub pt_regs_sp: u32,
    /// struct pt_regs -> di (a syscall's first argument, for the raw sys_enter fallback).
    pub pt_regs_di: u32,
    /// Drop events whose owner is known and whose owner's cgroup id is not in `CGROUPS`.
    pub filter_cgroups: u32,
    /// Drop events whose network namespace (inode) is known and not in `NETNS`.
    pub filter_netns: u32,
    /// Descriptor -> socket, for the syscall tracepoints that learn owners (accept, close):
    /// task_struct.files, files_struct.fdt, fdtable.fd and .max_fds, file.private_data,
    /// file.f_inode, inode.i_mode, socket.sk. `fd_to_sock` is 0 when BTF lacks one of them.
    pub fd_to_sock: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    pub file_private_data: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub socket_sk: u32,
    /// The file's reference count (file.f_count, or file.f_ref from 6.13), read as a u64.
    pub file_refs: u32,
    /// The count's value when one reference is left: 1 for an atomic_long_t f_count, 0 for a
    /// file_ref_t (it stores count - 1). `file_refs_known` is 0 when BTF has neither.
    pub file_refs_one: u32,
    pub file_refs_known: u32,
    /// sk_buff.dev and net_device.nd_net: the namespace of a reply built from a segment alone
    /// (no socket), from the device it arrived on. `skb_netns_known` is 0 when BTF lacks one.
    pub skb_dev: u32,
    pub dev_nd_net: u32,
    pub skb_netns_known: u32,
}

/// Value of the `OWNERS` map (key: socket pointer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    /// bpf_get_current_cgroup_id() where the owner was learned: its cgroup v2 id (the inode
    /// number of its directory under /sys/fs/cgroup).
    pub cgroup: u64,
    /// [`owner_flag`] bits.
    pub flags: u32,
    pub _pad: u32,
}

/// Value of the `LISTENERS` map: the listening socket on (netns, port). With SO_REUSEPORT
/// several sockets listen on one port; a child cannot tell which one it came from (no
/// tracepoint names it), so it gets no provisional owner then.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Listener {
    pub sk: u64,
    /// Sockets listening there (more than one: ambiguous).
    pub count: u32,
    pub _pad: u32,
}

/// Value of the `CLOSING` map: where a thread inside close() called it from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseSite {
    /// The TCP socket this close() releases (from its descriptor).
    pub sk: u64,
    /// 1 + the id in `USER_STACKS`; 0 = the walk failed or stacks are not captured.
    pub stack: u32,
    pub _pad: u32,
    /// The word on top of the user stack at syscall entry (see `Event::close_ret`).
    pub ret: u64,
    /// When close() returned (CLOCK_MONOTONIC ns); 0 while it runs. Before Linux 6.8 the last
    /// fput() of close(2) ran as task work on the way back to user space, after the syscall's
    /// exit tracepoint: the socket is torn down just after this.
    pub exit_ns: u64,
}

/// Key of the `LISTENERS` map: (netns, local port). Children created in softirq provisionally
/// inherit the listening socket's owner until the accepting process shows itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u32,
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Kernel TCP state numbers (include/net/tcp_states.h): stable kernel ABI.
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

/// A rule of the `validate` segment dropper (a tc classifier on a veth): drop the next
/// `remaining` TCP segments leaving the interface that match. Test traffic only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropRule {
    /// Segments still to drop; 0 = rule inactive.
    pub remaining: u32,
    /// Only segments from this TCP source port (0 = any).
    pub sport: u16,
    /// Only segments to this TCP destination port (0 = any).
    pub dport: u16,
    /// TCP flag bits that must all be set.
    pub flags_set: u8,
    /// TCP flag bits that must all be clear.
    pub flags_clear: u8,
    /// 0 = any payload, 1 = only empty segments, 2 = only segments with data.
    pub payload: u8,
    pub _pad: u8,
    /// Segments dropped by this rule so far.
    pub dropped: u32,
}

pub const DROP_RULES_MAX: u32 = 4;

pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Map sizes.
pub const RING_BYTES: u32 = 4 << 20;
pub const OWNERS_MAX: u32 = 65536;
pub const LISTENERS_MAX: u32 = 4096;
pub const FILTER_MAX: u32 = 64;
/// `--cgroup`: the cgroups named and their descendants.
pub const CGROUP_FILTER_MAX: u32 = 4096;
pub const USER_STACKS_MAX: u32 = 4096;
pub const CLOSING_MAX: u32 = 16384;
/// How long after close() returns its deferred fput() may still be tearing the socket down (see
/// `CloseSite::exit_ns`). The task work runs before the thread gets back to user space, so no
/// other syscall of that thread can come in between; the bound only guards against stale
/// entries (a socket reusing the address ends the entry at once, see `on_set_state`), and must
/// allow for slow machines: under emulation on a loaded host 20 ms was seen to be too short
/// between sys_exit_close and the RST that close() sent.
pub const CLOSE_TASK_WORK_NS: u64 = 500_000_000;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), every bit pattern valid.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::ListenKey {}
    unsafe impl aya::Pod for super::DropRule {}
    unsafe impl aya::Pod for super::CloseSite {}
    unsafe impl aya::Pod for super::Listener {}
}
