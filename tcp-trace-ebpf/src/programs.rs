use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_task_btf, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs, generated as raw,
    },
    macros::{
        btf_tracepoint, classifier, fentry, fexit, kprobe, kretprobe, map, raw_tracepoint,
        tracepoint,
    },
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext,
        RetProbeContext, TcContext, TracePointContext, tracing::StackIdContext,
    },
};
use aya_log_ebpf::debug;
use tcp_trace_common::{
    AF_INET, AF_INET6, CGROUP_FILTER_MAX, CLOSE_TASK_WORK_NS, CLOSING_MAX, COMM_LEN, CloseSite,
    Config, DROP_RULES_MAX, DropRule, Event, FILTER_MAX, IPPROTO_TCP, LISTENERS_MAX, ListenKey,
    Listener, OWNERS_MAX, Owner, RING_BYTES, USER_STACKS_MAX, flag, hook, owner_flag, state,
};

#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_family: 0,
    skc_state: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    net_ns_inum: 0,
    sk_flags: 0,
    sk_lingertime: 0,
    sk_protocol: 0,
    tp_rcv_nxt: 0,
    tp_copied_seq: 0,
    tp_write_seq: 0,
    tp_snd_nxt: 0,
    tp_snd_una: 0,
    tw_substate: 0,
    tw_rcv_nxt: 0,
    skb_len: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    sock_flag_dead: 0,
    sock_flag_done: 0,
    sock_flag_linger: 0,
    active_reset_reason_arg: 0,
    send_reset_has_reason: 0,
    filter_pids: 0,
    filter_ports: 0,
    inet_sport: 0,
    capture_stacks: 0,
    pt_regs_sp: 0,
    pt_regs_di: 0,
    filter_cgroups: 0,
    filter_netns: 0,
    fd_to_sock: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_fd: 0,
    fdt_max_fds: 0,
    file_private_data: 0,
    file_inode: 0,
    inode_mode: 0,
    socket_sk: 0,
    file_refs: 0,
    file_refs_one: 0,
    file_refs_known: 0,
    skb_dev: 0,
    dev_nd_net: 0,
    skb_netns_known: 0,
};

/// Reads one `CONFIG` field. Volatile, so the compiler cannot fold the all-zero initial value.
macro_rules! conf {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&raw const CONFIG.$field) }
    };
}

/// Non-zero: every program returns at entry (`tcp-trace record --empty-programs`, the bench's
/// floor row: the cost of the hooks themselves). Read-only and frozen like `CONFIG`, so the
/// verifier sees a constant and prunes one side: the body, or the early return.
#[unsafe(no_mangle)]
static FLOOR: u8 = 0;

/// Returns 0 from the program at once when `FLOOR` is set.
macro_rules! floor {
    () => {
        if unsafe { core::ptr::read_volatile(&raw const FLOOR) } != 0 {
            return 0;
        }
    };
}

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);
/// Events that did not fit in `EVENTS`, per CPU.
#[map]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Socket pointer -> the process that owns it, learned in process context.
#[map]
static OWNERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(OWNERS_MAX, 0);
/// (netns, port) -> the socket listening there; children created in softirq provisionally
/// inherit its owner.
#[map]
static LISTENERS: LruHashMap<ListenKey, Listener> = LruHashMap::with_max_entries(LISTENERS_MAX, 0);
/// `--pid` set (tgids).
#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(FILTER_MAX, 0);
/// `--port` set.
#[map]
static PORTS: HashMap<u32, u8> = HashMap::with_max_entries(FILTER_MAX, 0);
/// `--cgroup` set (cgroup v2 ids).
#[map]
static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(CGROUP_FILTER_MAX, 0);
/// `--netns` set (namespace inodes).
#[map]
static NETNS: HashMap<u32, u8> = HashMap::with_max_entries(FILTER_MAX, 0);
/// tcp_timewait_state_process argument, for the kretprobe (which cannot read arguments).
#[map]
static TW_ARG: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// User call stacks of close() calls (with stack capture on).
#[map]
static USER_STACKS: StackTrace = StackTrace::with_max_entries(USER_STACKS_MAX, 0);
/// Thread id -> the TCP socket it is closing (and, with stacks, where it called close()), while
/// that thread is inside close() of a TCP socket's descriptor.
#[map]
static CLOSING: LruHashMap<u32, CloseSite> = LruHashMap::with_max_entries(CLOSING_MAX, 0);

/// Reads a `T` at `base + off` in kernel memory; zero if the read faults.
#[inline(always)]
fn rd<T: Default>(base: u64, off: u32) -> T {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.unwrap_or_default()
}

/// The current task's name, written straight into `dst` (aya's `bpf_get_current_comm` goes
/// through a zeroed stack copy, which compiles to a call to a byte-at-a-time BPF `memset`).
#[inline(always)]
fn current_comm(dst: &mut [u8; COMM_LEN]) {
    unsafe { raw::bpf_get_current_comm(dst.as_mut_ptr().cast(), COMM_LEN as u32) };
}

/// A 16-byte name copied as four words (both ends are 4-aligned: in `Owner` and in `Event`); a
/// plain array copy compiles to a call to a byte-at-a-time BPF `memmove`.
#[inline(always)]
fn copy_comm(dst: &mut [u8; COMM_LEN], src: &[u8; COMM_LEN]) {
    let (d, s) = (dst.as_mut_ptr() as *mut u32, src.as_ptr() as *const u32);
    for i in 0..COMM_LEN / 4 {
        unsafe { core::ptr::write_volatile(d.add(i), *s.add(i)) };
    }
}

#[inline(always)]
fn current_owner() -> Owner {
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut owner = core::mem::MaybeUninit::<Owner>::uninit();
    let o = owner.as_mut_ptr();
    // The helper writes all of comm (the name, zero-padded; zeroes on failure): no zeroing first,
    // which would compile to a `memset` call.
    unsafe {
        (*o).tgid = (pid_tgid >> 32) as u32;
        (*o).tid = pid_tgid as u32;
        (*o).cgroup = bpf_get_current_cgroup_id();
        (*o).flags = 0;
        (*o)._pad = 0;
        raw::bpf_get_current_comm((&raw mut (*o).comm).cast(), COMM_LEN as u32);
        owner.assume_init()
    }
}

/// Owners compared word by word (a derived `==` on the comm array may become a `bcmp` call).
#[inline(always)]
fn same_owner(a: &Owner, b: &Owner) -> bool {
    const WORDS: usize = core::mem::size_of::<Owner>() / 4;
    let (a, b) = (
        a as *const Owner as *const u32,
        b as *const Owner as *const u32,
    );
    let mut i = 0;
    while i < WORDS {
        if unsafe { *a.add(i) != *b.add(i) } {
            return false;
        }
        i += 1;
    }
    true
}

/// Records `owner` as `sk`'s owner, unless it is already: a lookup costs less than an LRU update.
#[inline(always)]
fn set_owner(sk: u64, owner: &Owner) {
    if let Some(known) = unsafe { OWNERS.get(&sk) }
        && same_owner(known, owner)
    {
        return;
    }
    let _ = OWNERS.insert(&sk, owner, 0);
}

/// Remembers the current task as `sk`'s owner. Call only where the owner is certainly current.
#[inline(always)]
fn learn_owner(sk: u64) {
    set_owner(sk, &current_owner());
}

/// How much of the head of `struct sock_common` is read at once: family, ports, addresses, state
/// and the netns pointer lie within it on the kernels seen (6.1-6.18: up to byte 88). A field the
/// running kernel's BTF puts beyond it is read on its own.
const SKC_HEAD: usize = 96;

#[repr(C, align(8))]
struct SkcHead([u8; SKC_HEAD]);

impl SkcHead {
    /// The `T` at `off` (a BTF offset, a constant to the verifier): from the copy when it lies
    /// within it and is aligned, else read from `sk`.
    #[inline(always)]
    fn get<T: Copy + Default>(&self, sk: u64, off: u32) -> T {
        let at = off as usize;
        if at + core::mem::size_of::<T>() <= SKC_HEAD && at % core::mem::align_of::<T>() == 0 {
            unsafe { *(self.0.as_ptr().add(at) as *const T) }
        } else {
            rd(sk, off)
        }
    }
}

/// A socket's identity, from one read of the head of its `struct sock_common` (plus one for the
/// netns inode number). All zero if `sk` cannot be read.
struct SockId {
    saddr: [u32; 4],
    daddr: [u32; 4],
    netns: u32,
    family: u16,
    /// skc_num: the local port, host order (0 once a closing socket released it).
    num: u16,
    /// skc_dport, network order.
    dport_be: u16,
    state: u8,
}

#[inline(always)]
fn sock_id(sk: u64) -> SockId {
    let mut head = core::mem::MaybeUninit::<SkcHead>::uninit();
    // On failure the helper zeroes the copy.
    let _ = unsafe {
        raw::bpf_probe_read_kernel(
            head.as_mut_ptr().cast(),
            SKC_HEAD as u32,
            sk as *const core::ffi::c_void,
        )
    };
    let head = unsafe { head.assume_init_ref() };
    let family = head.get::<u16>(sk, conf!(skc_family));
    let (saddr, daddr) = if family == AF_INET6 {
        (
            head.get::<[u32; 4]>(sk, conf!(skc_v6_rcv_saddr)),
            head.get::<[u32; 4]>(sk, conf!(skc_v6_daddr)),
        )
    } else {
        (
            [head.get::<u32>(sk, conf!(skc_rcv_saddr)), 0, 0, 0],
            [head.get::<u32>(sk, conf!(skc_daddr)), 0, 0, 0],
        )
    };
    let net = head.get::<u64>(sk, conf!(skc_net));
    SockId {
        saddr,
        daddr,
        netns: if net == 0 {
            0
        } else {
            rd(net, conf!(net_ns_inum))
        },
        family,
        num: head.get::<u16>(sk, conf!(skc_num)),
        dport_be: head.get::<u16>(sk, conf!(skc_dport)),
        state: head.get::<u8>(sk, conf!(skc_state)),
    }
}

#[inline(always)]
fn addr_bytes(words: [u32; 4]) -> [u8; 16] {
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// Fills a (zeroed) event's common header and the socket's identity. `sk` may be a full socket,
/// a TIME_WAIT minisocket or a request socket: all start with `struct sock_common`.
#[inline(always)]
fn fill_sock(ev: &mut Event, hook: u8, sk: u64) {
    fill_sock_id(ev, hook, sk, &sock_id(sk));
}

/// `fill_sock` with the socket's identity already read.
#[inline(always)]
fn fill_sock_id(ev: &mut Event, hook: u8, sk: u64, id: &SockId) {
    ev.hook = hook;
    ev.sk = sk;
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.cpu = unsafe { bpf_get_smp_processor_id() };
    let pid_tgid = bpf_get_current_pid_tgid();
    ev.tgid = (pid_tgid >> 32) as u32;
    ev.tid = pid_tgid as u32;
    current_comm(&mut ev.comm);

    ev.family = id.family;
    ev.sport = id.num;
    ev.dport = u16::from_be(id.dport_be);
    ev.saddr = addr_bytes(id.saddr);
    ev.daddr = addr_bytes(id.daddr);
    ev.netns = id.netns;
    ev.old_state = id.state;
    if ev.old_state == state::TIME_WAIT {
        ev.flags |= flag::TW_SOCK;
    } else if ev.sport == 0 && ev.old_state != state::NEW_SYN_RECV && sk != 0 {
        // A full socket that released its port on the way to CLOSE.
        ev.sport = u16::from_be(rd::<u16>(sk, conf!(inet_sport)));
    }
    if let Some(owner) = unsafe { OWNERS.get(&sk) } {
        ev.owner_tgid = owner.tgid;
        ev.owner_cgroup = owner.cgroup;
        copy_comm(&mut ev.owner_comm, &owner.comm);
        ev.flags |= flag::OWNER_KNOWN;
        if owner.flags & owner_flag::PROVISIONAL != 0 {
            ev.flags |= flag::OWNER_PROVISIONAL;
        }
        if owner.flags & owner_flag::SHARED != 0 {
            ev.flags |= flag::OWNER_SHARED;
        }
    }
    // Is the task on the CPU closing this very socket? The last close() made it the owner (see
    // `sys_enter_close`), so only events of its own sockets are looked up. The close() of one
    // socket also runs softirq work for others (on loopback, its peer's), which the socket
    // check keeps apart.
    if ev.owner_tgid == ev.tgid
        && ev.flags & flag::OWNER_KNOWN != 0
        && let Some(site) = unsafe { CLOSING.get(&on_stack(&ev.tid)) }
        && site.sk == sk
        && (site.exit_ns == 0 || ev.ts_ns.wrapping_sub(site.exit_ns) < CLOSE_TASK_WORK_NS)
    {
        ev.flags |= flag::IN_CLOSE;
        ev.user_stack = site.stack;
        ev.close_ret = site.ret;
    }
}

/// An event for a packet with no socket (a reply reset): the tuple comes from the incoming
/// segment's headers, seen from our side (local = its destination).
#[inline(always)]
fn fill_skb(ev: &mut Event, hook: u8, skb: u64) {
    fill_sock(ev, hook, 0);
    ev.family = 0;
    ev.old_state = 0;
    ev.flags = flag::TUPLE_FROM_SKB;
    let head: u64 = rd(skb, conf!(skb_head));
    let nh: u16 = rd(skb, conf!(skb_network_header));
    let th: u16 = rd(skb, conf!(skb_transport_header));
    let ip = head + nh as u64;
    let tcp = head + th as u64;
    let version = rd::<u8>(ip, 0) >> 4;
    if version == 6 {
        ev.family = AF_INET6;
        ev.daddr = rd(ip, 8);
        ev.saddr = rd(ip, 24);
    } else if version == 4 {
        ev.family = tcp_trace_common::AF_INET;
        let s: [u8; 4] = rd(ip, 16);
        let d: [u8; 4] = rd(ip, 12);
        ev.saddr[..4].copy_from_slice(&s);
        ev.daddr[..4].copy_from_slice(&d);
    }
    ev.dport = u16::from_be(rd::<u16>(tcp, 0));
    ev.sport = u16::from_be(rd::<u16>(tcp, 2));
    // The namespace the segment arrived in (tcp_v4_rcv() takes it from the device too).
    if conf!(skb_netns_known) != 0 {
        let dev: u64 = rd(skb, conf!(skb_dev));
        if dev != 0 {
            let net: u64 = rd(dev, conf!(dev_nd_net));
            if net != 0 {
                ev.netns = rd(net, conf!(net_ns_inum));
            }
        }
    }
}

/// A copy of a field of an event being built, for use as a map key: before 6.x (seen on 6.1) the
/// verifier takes no map key in ring-buffer memory, and a plain copy may be optimised away.
#[inline(always)]
fn on_stack(field: &u32) -> u32 {
    unsafe { core::ptr::read_volatile(field) }
}

/// In-kernel filtering (`--pid`, `--port`): drop what the user did not ask for before it costs a
/// ring-buffer slot. A socket whose owner is not known yet passes; userspace decides later.
#[inline(always)]
fn wanted(ev: &Event) -> bool {
    if conf!(filter_ports) != 0
        && unsafe { PORTS.get(&(ev.sport as u32)) }.is_none()
        && unsafe { PORTS.get(&(ev.dport as u32)) }.is_none()
    {
        return false;
    }
    // A provisional owner that shares the socket may yet hand it to a traced process (a child
    // of a listener several processes accept() on, a descriptor passed on): such events pass,
    // and userspace decides. A child of a listener only its owner accepts on does not.
    let shared = flag::OWNER_PROVISIONAL | flag::OWNER_SHARED;
    if conf!(filter_pids) != 0
        && ev.flags & flag::OWNER_KNOWN != 0
        && ev.flags & shared != shared
        && unsafe { PIDS.get(&on_stack(&ev.owner_tgid)) }.is_none()
    {
        return false;
    }
    // A reply built from a segment alone has no namespace (0): userspace decides.
    if conf!(filter_netns) != 0
        && ev.netns != 0
        && unsafe { NETNS.get(&on_stack(&ev.netns)) }.is_none()
    {
        return false;
    }
    if conf!(filter_cgroups) != 0
        && ev.flags & flag::OWNER_KNOWN != 0
        && unsafe { CGROUPS.get(&on_stack64(&ev.owner_cgroup)) }.is_none()
    {
        return false;
    }
    true
}

/// [`on_stack`] for a u64 field.
#[inline(always)]
fn on_stack64(field: &u64) -> u64 {
    unsafe { core::ptr::read_volatile(field) }
}

/// Userspace is woken when the pending data crosses this much; below it, and above it until the
/// reader has caught up, its 50 ms drain tick collects the events. A wakeup per event would cost
/// more than the event (an irq_work self-IPI, a VM exit under KVM).
const WAKEUP_BYTES: u64 = 64 * 1024;
/// What one event takes in the ring: the 8-byte record header, the event, rounded up to 8.
const RECORD_BYTES: u64 = (8 + core::mem::size_of::<Event>() as u64 + 7) & !7;
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Zeroes an event in place with word stores: `*ev = Event::zeroed()` compiles to a call to a
/// byte-at-a-time BPF `memset`. Volatile, so that LLVM cannot turn the stores back into one.
#[inline(always)]
fn zero(ev: *mut Event) {
    const WORDS: usize = core::mem::size_of::<Event>() / 8;
    let w = ev as *mut u64;
    for i in 0..WORDS {
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
    }
}

/// Builds one event and sends it. Without `--pid`/`--port`/`--cgroup`/`--netns` every event is
/// wanted, so it is built in place in its ring-buffer slot (zeroed first) and submitted; when the
/// ring is full it is counted in `DROPPED` without being built. With a filter it is built on
/// the stack and copied into the ring only if wanted: a reserved slot that is then discarded still
/// holds ring space until the reader passes it, so unwanted traffic would crowd out the wanted.
/// A macro, not a function taking a closure: the closures would become BPF subprograms shared by
/// the programs; and the paths stay apart, since before 6.4 the verifier does not know that a
/// reserved (non-NULL) slot pointer tested again is not NULL, and reports it unreleased.
macro_rules! emit {
    (|$ev:ident| $body:block) => {
        if conf!(filter_ports) != 0
            || conf!(filter_pids) != 0
            || conf!(filter_cgroups) != 0
            || conf!(filter_netns) != 0
        {
            emit_aside!(|$ev| $body);
        } else {
            match EVENTS.reserve::<Event>(0) {
                Some(mut entry) => {
                    let p = entry.as_mut_ptr();
                    zero(p);
                    let $ev = unsafe { &mut *p };
                    $body
                    entry.submit(wakeup_flag(0));
                }
                None => count_dropped(),
            }
        }
    };
}

/// [`emit!`]'s filtered path: the event built on the stack, copied into the ring if wanted,
/// counted in `DROPPED` if the ring is full. On the stack, not in a per-CPU map slot: a program
/// that interrupts this one on its CPU (softirq inside process context) would overwrite a
/// half-built event there. (A map slot per nesting level failed the 5.10 verifier, "R8
/// !read_ok".)
macro_rules! emit_aside {
    (|$ev:ident| $body:block) => {
        let mut event = core::mem::MaybeUninit::<Event>::uninit();
        let p = event.as_mut_ptr();
        zero(p);
        let $ev = unsafe { &mut *p };
        $body
        if wanted($ev) && EVENTS.output::<Event>($ev, wakeup_flag(RECORD_BYTES)).is_err() {
            count_dropped();
        }
    };
}

#[inline(always)]
fn count_dropped() {
    if let Some(n) = DROPPED.get_ptr_mut(0) {
        unsafe { *n += 1 };
    }
}

/// Wake the reader once per crossing of the mark, not for every event above it: once woken, it
/// drains everything pending. `extra`: what this event adds if it is not reserved yet.
#[inline(always)]
fn wakeup_flag(extra: u64) -> u64 {
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA) + extra;
    if pending >= WAKEUP_BYTES && pending < WAKEUP_BYTES + RECORD_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

// ---- hook bodies, shared by both attach forms ------------------------------------------------

#[inline(always)]
fn on_tcp_close(ctx: &impl EbpfContext, sk: u64, timeout: i64) {
    // close() runs in the owner's context: this is the most reliable place to learn the owner.
    learn_owner(sk);
    emit!(|ev| {
        fill_sock(ev, hook::TCP_CLOSE, sk);
        ev.timeout = timeout;
        fill_queue_details(ev, sk);
        // No pointers in log lines: the verifier refuses arithmetic on a typed (fentry) pointer.
        debug!(ctx, "tcp_close unread={} unsent={}", ev.unread, ev.unsent);
    });
}

/// The socket's queues and SO_LINGER as close() leaves them: unread (rcv_nxt - copied_seq, less
/// a received FIN), unsent and unacked bytes, linger. close() drains the receive queue but does
/// not move copied_seq, so this still holds when its RST goes out.
#[inline(always)]
fn fill_queue_details(ev: &mut Event, sk: u64) {
    let rcv_nxt: u32 = rd(sk, conf!(tp_rcv_nxt));
    let copied_seq: u32 = rd(sk, conf!(tp_copied_seq));
    let write_seq: u32 = rd(sk, conf!(tp_write_seq));
    let snd_nxt: u32 = rd(sk, conf!(tp_snd_nxt));
    let snd_una: u32 = rd(sk, conf!(tp_snd_una));
    let sk_flags: u64 = rd(sk, conf!(sk_flags));
    let done = (sk_flags >> conf!(sock_flag_done)) & 1 != 0;
    if done {
        ev.flags |= flag::SOCK_DONE;
    }
    if (sk_flags >> conf!(sock_flag_linger)) & 1 != 0 {
        ev.flags |= flag::LINGER;
    }
    if (sk_flags >> conf!(sock_flag_dead)) & 1 != 0 {
        ev.flags |= flag::ORPHAN;
    }
    ev.flags |= flag::HAS_CLOSE_DETAILS;
    // Same measure as tcp_epollin_ready(): a received FIN occupies one sequence number.
    let pending_fin = (done && rcv_nxt != copied_seq) as u32;
    ev.unread = rcv_nxt.wrapping_sub(copied_seq).wrapping_sub(pending_fin);
    ev.unsent = write_seq.wrapping_sub(snd_nxt);
    ev.unacked = snd_nxt.wrapping_sub(snd_una);
    ev.linger_jiffies = rd(sk, conf!(sk_lingertime));
    ev.rcv_nxt = rcv_nxt;
}

#[inline(always)]
fn on_plain(hook: u8, sk: u64) {
    emit!(|ev| {
        fill_sock(ev, hook, sk);
    });
}

#[inline(always)]
fn on_send_fin(sk: u64) {
    // tcp_send_fin() is only called from close() and shutdown(): process context.
    learn_owner(sk);
    on_plain(hook::TCP_SEND_FIN, sk);
}

#[inline(always)]
fn on_active_reset(sk: u64, reason: Option<u32>) {
    emit!(|ev| {
        fill_sock(ev, hook::TCP_SEND_ACTIVE_RESET, sk);
        fill_queue_details(ev, sk);
        if let Some(r) = reason {
            ev.reason = r;
            ev.flags |= flag::HAS_REASON;
        }
    });
}

#[inline(always)]
fn on_time_wait(sk: u64, tw_state: i32, timeo: i32) {
    emit!(|ev| {
        fill_sock(ev, hook::TCP_TIME_WAIT, sk);
        ev.new_state = tw_state as u8;
        ev.timeout = timeo as i64;
    });
}

#[inline(always)]
fn on_tw_process(tw: u64, skb: u64, th: u64) {
    if let Some(slot) = TW_ARG.get_ptr_mut(0) {
        unsafe { *slot = tw };
    }
    emit!(|ev| {
        fill_sock(ev, hook::TW_STATE_PROCESS, tw);
        ev.skb = skb;
        ev.old_state = rd(tw, conf!(tw_substate));
        ev.rcv_nxt = rd(tw, conf!(tw_rcv_nxt));
        ev.seq = u32::from_be(rd(th, 4));
        ev.ack_seq = u32::from_be(rd(th, 8));
        let doff = (rd::<u8>(th, 12) >> 4) as u32 * 4;
        ev.tcp_flags = rd(th, 13);
        let len: u32 = rd(skb, conf!(skb_len));
        ev.seg_len = len.saturating_sub(doff);
    });
}

#[inline(always)]
fn on_tw_process_ret(tw: u64, status: i32) {
    emit!(|ev| {
        fill_sock(ev, hook::TW_STATE_PROCESS_RET, tw);
        ev.ret = status;
        ev.flags |= flag::HAS_RET;
        ev.new_state = rd(tw, conf!(tw_substate));
    });
}

#[inline(always)]
fn on_set_state(sk: u64, old: u32, new: u32) {
    if rd::<u16>(sk, conf!(sk_protocol)) != IPPROTO_TCP {
        return;
    }
    let new = new as u8;
    let id = sock_id(sk);
    let key = ListenKey {
        netns: id.netns,
        port: id.num as u32,
    };
    match new {
        // connect(), listen(), close()/shutdown() (tcp_close_state): process context.
        state::SYN_SENT | state::FIN_WAIT1 | state::LAST_ACK => learn_owner(sk),
        state::LISTEN => {
            learn_owner(sk);
            listening(&key, sk);
        }
        // A child socket, created in softirq: provisionally its listener's, until accept().
        state::SYN_RECV => child_of_listener(&key, sk),
        _ => {}
    }
    // A socket starting a life (connect, listen, a listener's child) where a closed one was (the
    // allocator hands a freed socket's memory out again): that close is over, however recent.
    if matches!(new, state::SYN_SENT | state::LISTEN | state::SYN_RECV) {
        let tid = bpf_get_current_pid_tgid() as u32;
        if let Some(site) = unsafe { CLOSING.get(&tid) }
            && site.sk == sk
        {
            let _ = CLOSING.remove(&tid);
        }
    }
    // A listener closing (LISTEN -> CLOSE). A child is cloned from its listener and so goes
    // LISTEN -> SYN_RECV itself: that is no listener leaving.
    if old as u8 == state::LISTEN && new == state::CLOSE {
        not_listening(&key, sk);
    }
    emit!(|ev| {
        fill_sock_id(ev, hook::INET_SOCK_SET_STATE, sk, &id);
        ev.old_state = old as u8;
        ev.new_state = new;
    });
}

/// `sk` listens on `key`. A second socket on the same port (SO_REUSEPORT) makes the port
/// ambiguous: its children get no provisional owner.
#[inline(always)]
fn listening(key: &ListenKey, sk: u64) {
    let mut entry = Listener {
        sk,
        count: 1,
        _pad: 0,
    };
    if let Some(known) = unsafe { LISTENERS.get(key) }
        && known.sk != sk
    {
        entry.count = known.count.saturating_add(1);
    }
    let _ = LISTENERS.insert(key, &entry, 0);
}

#[inline(always)]
fn not_listening(key: &ListenKey, sk: u64) {
    let Some(known) = LISTENERS.get_ptr_mut(key) else {
        return;
    };
    let known = unsafe { &mut *known };
    if known.count <= 1 {
        let _ = LISTENERS.remove(key);
    } else {
        // Which of the others still listens is not known: none is named.
        known.count -= 1;
        if known.sk == sk || known.count > 1 {
            known.sk = 0;
        }
    }
}

#[inline(always)]
fn child_of_listener(key: &ListenKey, child: u64) {
    let Some(listener) = (unsafe { LISTENERS.get(key) }) else {
        return;
    };
    if listener.count != 1 || listener.sk == 0 {
        return;
    }
    let listener_sk = listener.sk;
    if let Some(owner) = unsafe { OWNERS.get(&listener_sk) } {
        let mut owner = *owner;
        // SHARED is kept from the listener.
        owner.flags = (owner.flags & owner_flag::SHARED) | owner_flag::PROVISIONAL;
        let _ = OWNERS.insert(&child, &owner, 0);
    }
}

#[inline(always)]
fn on_send_reset(sk: u64, skb: u64, reason: Option<u32>) {
    // Both pointers may be NULL (tp_btf types them "maybe null"): the verifier wants the check
    // before any arithmetic on them (nor may they be or-ed together to test both at once).
    if sk != 0 {
        emit!(|ev| {
            fill_sock(ev, hook::TCP_SEND_RESET, sk);
            // An active reset (no incoming segment) from a full socket: close(),
            // tcp_disconnect() or a timer. Its queues tell why.
            if skb == 0 && ev.flags & flag::TW_SOCK == 0 {
                fill_queue_details(ev, sk);
            }
            reset_details(ev, skb, reason);
        });
    } else if skb != 0 {
        emit!(|ev| {
            fill_skb(ev, hook::TCP_SEND_RESET, skb);
            reset_details(ev, skb, reason);
        });
    }
}

#[inline(always)]
fn reset_details(ev: &mut Event, skb: u64, reason: Option<u32>) {
    ev.skb = skb;
    if let Some(r) = reason {
        ev.reason = r;
        ev.flags |= flag::HAS_REASON;
    }
}

#[inline(always)]
fn on_destroy(sk: u64) {
    on_plain(hook::TCP_DESTROY_SOCK, sk);
    let _ = OWNERS.remove(&sk);
}

// ---- kprobe / kretprobe ----------------------------------------------------------------------

#[inline(always)]
fn parg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

#[kprobe]
pub fn kprobe_tcp_close(ctx: ProbeContext) -> u32 {
    floor!();
    on_tcp_close(&ctx, parg(&ctx, 0), parg(&ctx, 1) as i64);
    0
}

#[kprobe]
pub fn kprobe_tcp_fin(ctx: ProbeContext) -> u32 {
    floor!();
    on_plain(hook::TCP_FIN, parg(&ctx, 0));
    0
}

#[kprobe]
pub fn kprobe_tcp_send_fin(ctx: ProbeContext) -> u32 {
    floor!();
    on_send_fin(parg(&ctx, 0));
    0
}

/// tcp_send_active_reset's reason, wherever BTF says the argument is. Each arm reads a constant
/// position, and the verifier only sees the arm the (constant) config selects.
#[inline(always)]
fn active_reset_reason(arg: impl Fn(usize) -> u64) -> Option<u32> {
    match conf!(active_reset_reason_arg) {
        2 => Some(arg(1) as u32),
        3 => Some(arg(2) as u32),
        4 => Some(arg(3) as u32),
        _ => None,
    }
}

#[kprobe]
pub fn kprobe_tcp_send_active_reset(ctx: ProbeContext) -> u32 {
    floor!();
    // Registers are read at constant offsets first: the verifier refuses a context access at an
    // offset chosen at run time, which a match over `parg(n)` can compile into.
    let regs = [parg(&ctx, 1), parg(&ctx, 2), parg(&ctx, 3)];
    let reason = active_reset_reason(|n| match n {
        1 => regs[0],
        2 => regs[1],
        _ => regs[2],
    });
    on_active_reset(parg(&ctx, 0), reason);
    0
}

#[kprobe]
pub fn kprobe_tcp_time_wait(ctx: ProbeContext) -> u32 {
    floor!();
    on_time_wait(parg(&ctx, 0), parg(&ctx, 1) as i32, parg(&ctx, 2) as i32);
    0
}

#[kprobe]
pub fn kprobe_tcp_timewait_state_process(ctx: ProbeContext) -> u32 {
    floor!();
    on_tw_process(parg(&ctx, 0), parg(&ctx, 1), parg(&ctx, 2));
    0
}

#[kretprobe]
pub fn kretprobe_tcp_timewait_state_process(ctx: RetProbeContext) -> u32 {
    floor!();
    let tw = TW_ARG.get(0).copied().unwrap_or(0);
    on_tw_process_ret(tw, ctx.ret::<i64>() as i32);
    0
}

// ---- fentry / fexit --------------------------------------------------------------------------

#[fentry(function = "tcp_close")]
pub fn fentry_tcp_close(ctx: FEntryContext) -> u32 {
    floor!();
    on_tcp_close(&ctx, ctx.arg::<u64>(0), ctx.arg::<i64>(1));
    0
}

#[fentry(function = "tcp_fin")]
pub fn fentry_tcp_fin(ctx: FEntryContext) -> u32 {
    floor!();
    on_plain(hook::TCP_FIN, ctx.arg::<u64>(0));
    0
}

#[fentry(function = "tcp_send_fin")]
pub fn fentry_tcp_send_fin(ctx: FEntryContext) -> u32 {
    floor!();
    on_send_fin(ctx.arg::<u64>(0));
    0
}

/// Context slot `N` of a tracing (fentry/fexit) program: a load at a constant offset from the
/// unmodified context pointer, as the verifier requires.
#[inline(always)]
fn ctx_slot<const N: usize>(ctx: &impl EbpfContext) -> u64 {
    unsafe { *(ctx.as_ptr() as *const u64).add(N) }
}

// One fentry program per position of tcp_send_active_reset's reason (none; 2nd, 3rd or 4th
// argument, from BTF), chosen by the loader: a slot chosen at run time from the config compiles
// into a load from a computed context address, which the verifier refuses.
#[fentry(function = "tcp_send_active_reset")]
pub fn fentry_tcp_send_active_reset(ctx: FEntryContext) -> u32 {
    floor!();
    on_active_reset(ctx.arg::<u64>(0), None);
    0
}

#[fentry(function = "tcp_send_active_reset")]
pub fn fentry_tcp_send_active_reset_r2(ctx: FEntryContext) -> u32 {
    floor!();
    on_active_reset(ctx.arg::<u64>(0), Some(ctx_slot::<1>(&ctx) as u32));
    0
}

#[fentry(function = "tcp_send_active_reset")]
pub fn fentry_tcp_send_active_reset_r3(ctx: FEntryContext) -> u32 {
    floor!();
    on_active_reset(ctx.arg::<u64>(0), Some(ctx_slot::<2>(&ctx) as u32));
    0
}

#[fentry(function = "tcp_send_active_reset")]
pub fn fentry_tcp_send_active_reset_r4(ctx: FEntryContext) -> u32 {
    floor!();
    on_active_reset(ctx.arg::<u64>(0), Some(ctx_slot::<3>(&ctx) as u32));
    0
}

#[fentry(function = "tcp_time_wait")]
pub fn fentry_tcp_time_wait(ctx: FEntryContext) -> u32 {
    floor!();
    on_time_wait(ctx.arg::<u64>(0), ctx.arg::<i32>(1), ctx.arg::<i32>(2));
    0
}

#[fentry(function = "tcp_timewait_state_process")]
pub fn fentry_tcp_timewait_state_process(ctx: FEntryContext) -> u32 {
    floor!();
    on_tw_process(ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2));
    0
}

// One fexit program per argument count of tcp_timewait_state_process (3 before 6.10, 4, 5 on
// 6.18), chosen by the loader: the return value sits in the context right after the arguments.
// Read there, not with bpf_get_func_ret(), which kernels before 5.17 (5.10) lack.
#[fexit(function = "tcp_timewait_state_process")]
pub fn fexit_tcp_timewait_state_process(ctx: FExitContext) -> u32 {
    floor!();
    on_tw_process_ret(ctx.arg::<u64>(0), ctx_slot::<3>(&ctx) as i32);
    0
}

#[fexit(function = "tcp_timewait_state_process")]
pub fn fexit_tcp_timewait_state_process4(ctx: FExitContext) -> u32 {
    floor!();
    on_tw_process_ret(ctx.arg::<u64>(0), ctx_slot::<4>(&ctx) as i32);
    0
}

#[fexit(function = "tcp_timewait_state_process")]
pub fn fexit_tcp_timewait_state_process5(ctx: FExitContext) -> u32 {
    floor!();
    on_tw_process_ret(ctx.arg::<u64>(0), ctx_slot::<5>(&ctx) as i32);
    0
}

// ---- tracepoints: tp_btf and raw_tp read their arguments the same way (an array of u64) -------

#[inline(always)]
fn tp_arg(ctx: &impl EbpfContext, n: usize) -> u64 {
    unsafe { *(ctx.as_ptr() as *const u64).add(n) }
}

macro_rules! tracepoint_pair {
    ($btf:ident, $raw:ident, $tp:literal, $body:path) => {
        #[btf_tracepoint(function = $tp)]
        pub fn $btf(ctx: BtfTracePointContext) -> u32 {
            floor!();
            $body(&ctx);
            0
        }

        #[raw_tracepoint(tracepoint = $tp)]
        pub fn $raw(ctx: RawTracePointContext) -> u32 {
            floor!();
            $body(&ctx);
            0
        }
    };
}

#[inline(always)]
fn tp_set_state(ctx: &impl EbpfContext) {
    on_set_state(tp_arg(ctx, 0), tp_arg(ctx, 1) as u32, tp_arg(ctx, 2) as u32);
}

#[inline(always)]
fn tp_send_reset(ctx: &impl EbpfContext) {
    let reason = if conf!(send_reset_has_reason) != 0 {
        Some(tp_arg(ctx, 2) as u32)
    } else {
        None
    };
    on_send_reset(tp_arg(ctx, 0), tp_arg(ctx, 1), reason);
}

#[inline(always)]
fn tp_receive_reset(ctx: &impl EbpfContext) {
    on_plain(hook::TCP_RECEIVE_RESET, tp_arg(ctx, 0));
}

#[inline(always)]
fn tp_destroy_sock(ctx: &impl EbpfContext) {
    on_destroy(tp_arg(ctx, 0));
}

tracepoint_pair!(
    tp_btf_inet_sock_set_state,
    raw_tp_inet_sock_set_state,
    "inet_sock_set_state",
    tp_set_state
);
tracepoint_pair!(
    tp_btf_tcp_send_reset,
    raw_tp_tcp_send_reset,
    "tcp_send_reset",
    tp_send_reset
);
tracepoint_pair!(
    tp_btf_tcp_receive_reset,
    raw_tp_tcp_receive_reset,
    "tcp_receive_reset",
    tp_receive_reset
);
tracepoint_pair!(
    tp_btf_tcp_destroy_sock,
    raw_tp_tcp_destroy_sock,
    "tcp_destroy_sock",
    tp_destroy_sock
);

// ---- owners from descriptors: accept() and close() (syscall tracepoints, every kernel) ----

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// The TCP socket behind the current task's descriptor `fd`, and its `struct file`; None for
/// any other kind of file (or if BTF lacked an offset). The descriptor table is read without
/// its lock, as tracing tools do: a racing close() of the same fd yields a stale or no answer.
#[inline(always)]
fn tcp_sock_of_fd(fd: u64) -> Option<(u64, u64)> {
    if conf!(fd_to_sock) == 0 {
        return None;
    }
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = rd(task, conf!(task_files));
    if files == 0 {
        return None;
    }
    let fdt: u64 = rd(files, conf!(files_fdt));
    if fdt == 0 || fd >= rd::<u32>(fdt, conf!(fdt_max_fds)) as u64 {
        return None;
    }
    let table: u64 = rd(fdt, conf!(fdt_fd));
    let file: u64 = rd(table + fd * 8, 0);
    if file == 0 {
        return None;
    }
    let inode: u64 = rd(file, conf!(file_inode));
    if rd::<u16>(inode, conf!(inode_mode)) & S_IFMT != S_IFSOCK {
        return None;
    }
    let socket: u64 = rd(file, conf!(file_private_data));
    let sk: u64 = rd(socket, conf!(socket_sk));
    if sk == 0 || rd::<u16>(sk, conf!(sk_protocol)) != IPPROTO_TCP {
        return None;
    }
    let family: u16 = rd(sk, conf!(skc_family));
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    Some((sk, file))
}

/// Whether this descriptor holds the file's last reference, i.e. whether this close() will
/// release the socket. Forked children, dup()ed descriptors and descriptors in flight over
/// SCM_RIGHTS hold references of their own. None: BTF did not say how files count them.
#[inline(always)]
fn last_reference(file: u64) -> Option<bool> {
    if conf!(file_refs_known) == 0 {
        return None;
    }
    Some(rd::<u64>(file, conf!(file_refs)) == conf!(file_refs_one) as u64)
}

/// syscalls:sys_enter_close. The thread closing a TCP socket's last descriptor is the process
/// that held it in user space: it becomes the owner, and the events this close() causes are
/// marked as the closer's (`IN_CLOSE`), with its call stack when stacks are captured. A holder
/// that closes its descriptor while another still holds the socket (a parent after fork, the
/// sender after SCM_RIGHTS) leaves it with a provisional owner until the next holder shows.
#[tracepoint(category = "syscalls", name = "sys_enter_close")]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    floor!();
    // struct trace_event_raw_sys_enter: common header (8), __syscall_nr (4, padded), args[6].
    let fd = unsafe { ctx.read_at::<u64>(16) }.unwrap_or(u64::MAX);
    let Some((sk, file)) = tcp_sock_of_fd(fd) else {
        return 0;
    };
    // The user registers as the syscall entered (bpf_task_pt_regs: 5.15+), for the call site;
    // without stacks the (constant) branch is pruned, so older kernels load this program too.
    let regs = if conf!(capture_stacks) != 0 {
        unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 }
    } else {
        0
    };
    on_close_enter(&ctx, sk, file, regs);
    0
}

/// x86_64's close(2) number.
const NR_CLOSE: u64 = 3;

/// raw_syscalls:sys_enter as a raw tracepoint (`regs`, `id`): the close() entry where
/// `sys_enter_close` does not load (the helpers it needs for stacks: before 5.15). It runs for
/// every syscall on the host, so the loader uses it only where the other one does not load.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn raw_tp_sys_enter_close(ctx: RawTracePointContext) -> u32 {
    floor!();
    if tp_arg(&ctx, 1) != NR_CLOSE {
        return 0;
    }
    let regs = tp_arg(&ctx, 0);
    let fd: u64 = rd(regs, conf!(pt_regs_di));
    let Some((sk, file)) = tcp_sock_of_fd(fd) else {
        return 0;
    };
    on_close_enter(&ctx, sk, file, regs);
    0
}

/// close() of `sk`'s descriptor (`file`) is starting in this thread; `regs`: the user registers
/// at syscall entry (0 if unknown).
#[inline(always)]
fn on_close_enter(ctx: &impl StackIdContext, sk: u64, file: u64, regs: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    match last_reference(file) {
        Some(false) => {
            if let Some(owner) = OWNERS.get_ptr_mut(&sk) {
                let owner = unsafe { &mut *owner };
                if owner.tgid == (pid_tgid >> 32) as u32 {
                    owner.flags |= owner_flag::PROVISIONAL | owner_flag::SHARED;
                }
            }
            return;
        }
        // Unknown: the socket may live on elsewhere, but the closer is the best guess.
        Some(true) | None => learn_owner(sk),
    }
    let mut site = CloseSite {
        sk,
        stack: 0,
        _pad: 0,
        ret: 0,
        exit_ns: 0,
    };
    if conf!(capture_stacks) != 0 {
        site.stack = ctx
            .get_stackid(&USER_STACKS, BPF_F_USER_STACK)
            .map_or(0, |id| id as u32 + 1);
        // The caller of libc's close(): on top of the user stack when the syscall entered.
        let sp: u64 = if regs != 0 {
            rd(regs, conf!(pt_regs_sp))
        } else {
            0
        };
        site.ret = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    }
    let _ = CLOSING.insert(&tid, &site, 0);
}

const BPF_F_USER_STACK: u64 = 1 << 8;

#[tracepoint(category = "syscalls", name = "sys_exit_close")]
pub fn sys_exit_close(_ctx: TracePointContext) -> u32 {
    floor!();
    // Not removed: before 6.8 the socket's teardown (the last fput) runs just after this, on the
    // way back to user space. Events within CLOSE_TASK_WORK_NS still belong to this close().
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(site) = CLOSING.get_ptr_mut(&tid) {
        unsafe { (*site).exit_ns = bpf_ktime_get_ns() };
    }
    0
}

/// accept()/accept4() entry: the caller holds the listening socket (a pre-fork worker that
/// inherited it from the process that called listen(), maybe long gone). Children that arrive
/// before the next accept are provisionally this process's.
#[inline(always)]
fn on_accept_enter(ctx: &TracePointContext) {
    let fd = unsafe { ctx.read_at::<u64>(16) }.unwrap_or(u64::MAX);
    let Some((listener, _)) = tcp_sock_of_fd(fd) else {
        return;
    };
    let mut owner = current_owner();
    if let Some(known) = unsafe { OWNERS.get(&listener) }
        && (known.tgid != owner.tgid || known.flags & owner_flag::SHARED != 0)
    {
        // A second process accept()s on it (pre-fork workers): its children may be anyone's.
        owner.flags = owner_flag::SHARED;
    }
    set_owner(listener, &owner);
}

/// accept()/accept4() return: the new descriptor's socket is the caller's.
#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) {
    // struct trace_event_raw_sys_exit: common header (8), __syscall_nr (4, padded), ret.
    let fd = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1);
    if fd < 0 {
        return;
    }
    if let Some((sk, _)) = tcp_sock_of_fd(fd as u64) {
        learn_owner(sk);
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_accept4")]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    floor!();
    on_accept_enter(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    floor!();
    on_accept_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_accept")]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    floor!();
    on_accept_enter(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    floor!();
    on_accept_exit(&ctx);
    0
}

/// inet_csk_accept() returns the child it took off the listener's queue, in the accepting
/// task: io_uring and in-kernel accepts included, which the syscall tracepoints miss.
/// The return value is the context slot after the arguments (not bpf_get_func_ret(), which
/// kernels before 5.17 lack): inet_csk_accept(sk, arg) from 6.10, (sk, flags, err, kern) before;
/// the loader picks the program from BTF.
#[fexit(function = "inet_csk_accept")]
pub fn fexit_inet_csk_accept(ctx: FExitContext) -> u32 {
    floor!();
    let child = ctx_slot::<2>(&ctx);
    if child != 0 {
        learn_owner(child);
    }
    0
}

#[fexit(function = "inet_csk_accept")]
pub fn fexit_inet_csk_accept4(ctx: FExitContext) -> u32 {
    floor!();
    let child = ctx_slot::<4>(&ctx);
    if child != 0 {
        learn_owner(child);
    }
    0
}

#[kretprobe]
pub fn kretprobe_inet_csk_accept(ctx: RetProbeContext) -> u32 {
    floor!();
    let child = ctx.ret::<u64>();
    if child != 0 {
        learn_owner(child);
    }
    0
}

// ---- validate's segment dropper (tc egress on a test veth) -----------------------------------

#[map]
static DROP_RULES: Array<DropRule> = Array::with_max_entries(DROP_RULES_MAX, 0);

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

/// Drops chosen TCP segments (IPv4 over Ethernet) so that `validate` can lose a FIN or an ACK
/// on purpose. Everything else passes untouched.
#[classifier]
pub fn drop_segments(ctx: TcContext) -> i32 {
    const ETH_LEN: usize = 14;
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return TC_ACT_OK;
    };
    if u16::from_be(ethertype) != 0x0800 {
        return TC_ACT_OK;
    }
    let Ok(vihl) = ctx.load::<u8>(ETH_LEN) else {
        return TC_ACT_OK;
    };
    let Ok(proto) = ctx.load::<u8>(ETH_LEN + 9) else {
        return TC_ACT_OK;
    };
    if proto != IPPROTO_TCP as u8 {
        return TC_ACT_OK;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let Ok(total) = ctx.load::<u16>(ETH_LEN + 2) else {
        return TC_ACT_OK;
    };
    let tcp = ETH_LEN + (ihl & 0x3c);
    let (Ok(sport), Ok(dport), Ok(doff), Ok(flags)) = (
        ctx.load::<u16>(tcp),
        ctx.load::<u16>(tcp + 2),
        ctx.load::<u8>(tcp + 12),
        ctx.load::<u8>(tcp + 13),
    ) else {
        return TC_ACT_OK;
    };
    let (sport, dport) = (u16::from_be(sport), u16::from_be(dport));
    let payload = (u16::from_be(total) as u32)
        .saturating_sub(ihl as u32)
        .saturating_sub(((doff >> 4) as u32) * 4);
    for i in 0..DROP_RULES_MAX {
        let Some(rule) = DROP_RULES.get_ptr_mut(i) else {
            continue;
        };
        let rule = unsafe { &mut *rule };
        if rule.remaining == 0
            || (rule.sport != 0 && rule.sport != sport)
            || (rule.dport != 0 && rule.dport != dport)
            || flags & rule.flags_set != rule.flags_set
            || flags & rule.flags_clear != 0
            || (rule.payload == 1 && payload != 0)
            || (rule.payload == 2 && payload == 0)
        {
            continue;
        }
        rule.remaining -= 1;
        rule.dropped += 1;
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
