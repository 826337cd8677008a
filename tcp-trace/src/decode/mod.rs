//! Raw ring-buffer records -> typed events. Checks sizes and hook numbers (a record that does not
//! fit the ABI is an error, not a guess) and decodes kernel enums by the names BTF gave them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
pub(crate) use tcp_trace_common::Hook;
use tcp_trace_common::{AF_INET, AF_INET6, EVENT_SIZE, Event, flag};

use crate::kernel::btf::KernelFacts;
use crate::model::{RstReason, TcpState, TwStatus};

mod values;

pub(crate) use crate::kernel::enums::{KReason, KTwStatus};
pub(crate) use values::{Comm, Family, KState, SockPtr, TcpFlags};

/// Reinterprets one ring-buffer record as an [`Event`].
pub fn parse_raw(bytes: &[u8]) -> Result<Event> {
    if bytes.len() != EVENT_SIZE {
        bail!(
            "event record is {} bytes, expected {EVENT_SIZE}: the eBPF object and this binary \
             disagree on the ABI",
            bytes.len()
        );
    }
    // SAFETY: Event is repr(C) plain data, every bit pattern is valid, and the length matches.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    hook_of(&ev)?;
    Ok(ev)
}

/// The bytes of an [`Event`], as the kernel wrote them (for recording).
pub fn event_bytes(ev: &Event) -> &[u8] {
    // SAFETY: Event is repr(C) with explicit layout; reading its bytes is always valid.
    unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), EVENT_SIZE) }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Owner {
    pub(crate) pid: u32,
    pub(crate) comm: Comm,
    /// `kernel`: learned in process context by the eBPF side; `inferred`: deduced in userspace
    /// (from the flow, e.g. a TIME_WAIT minisocket inherits its full socket's owner);
    /// `provisional`: not yet confirmed (a child's listener's owner before accept(), or a
    /// holder that closed its descriptor while another process still holds the socket).
    pub(crate) source: OwnerSource,
    /// The owner's cgroup v2 id, learned with it in the kernel; 0 = not known (an owner
    /// inferred from the task on the CPU, a recording of format 1).
    pub(crate) cgroup_id: u64,
}

impl Owner {
    /// Whether the owner is confirmed (learned where the holder was certainly current, or
    /// inherited from such an owner).
    pub(crate) fn is_definite(&self) -> bool {
        self.source != OwnerSource::Provisional
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OwnerSource {
    Kernel,
    Inferred,
    Provisional,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct CloseDetails {
    /// tcp_close's timeout argument, jiffies (the SO_LINGER time when lingering).
    pub(crate) timeout_jiffies: i64,
    pub(crate) linger: bool,
    pub(crate) linger_jiffies: i64,
    /// Received bytes the application never read (rcv_nxt - copied_seq, less a pending FIN).
    pub(crate) unread: u32,
    /// Bytes written but not yet sent (write_seq - snd_nxt).
    pub(crate) unsent: u32,
    /// Bytes sent but not yet acknowledged (snd_nxt - snd_una).
    pub(crate) unacked: u32,
    /// A FIN had been received (SOCK_DONE).
    pub(crate) fin_received: bool,
    pub(crate) orphan: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct Segment {
    pub(crate) flags: TcpFlags,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) len: u32,
    /// The minisocket's rcv_nxt when the segment arrived.
    pub(crate) tw_rcv_nxt: u32,
}

/// One decoded event: the stable JSON schema of `--json` lines with `"type": "event"`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct TraceEvent {
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub(crate) ts_ns: u64,
    pub(crate) cpu: u32,
    pub(crate) hook: Hook,
    /// The task on the CPU when the hook ran (in softirq: whatever it interrupted).
    pub(crate) pid: u32,
    pub(crate) tid: u32,
    pub(crate) comm: Comm,
    /// The process that owns the socket, when known.
    pub(crate) owner: Option<Owner>,
    pub(crate) netns: u32,
    /// Kernel address of the socket (the TIME_WAIT minisocket for TW hooks), as hex.
    pub(crate) sk: SockPtr,
    pub(crate) family: Option<Family>,
    pub(crate) local: Option<SocketAddr>,
    pub(crate) remote: Option<SocketAddr>,
    /// The socket's state when the hook ran (TW substate for TW hooks).
    pub(crate) state: Option<KState>,
    /// inet_sock_set_state: the new state; tcp_time_wait: the requested TW substate;
    /// tcp_timewait_state_process return: the substate afterwards.
    pub(crate) new_state: Option<KState>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) close: Option<CloseDetails>,
    /// RST reason by kernel name (SK_RST_REASON_ prefix dropped), where the kernel has one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) rst_reason: Option<KReason>,
    /// tcp_send_reset: true for an active reset (no incoming segment), false for a reply.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) rst_active: Option<bool>,
    /// tcp_time_wait: timeo in jiffies.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) timeo_jiffies: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) segment: Option<Segment>,
    /// tcp_timewait_state_process return: enum tcp_tw_status by name.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) tw_status: Option<KTwStatus>,
    /// The task on the CPU was inside close() of this socket's last descriptor: it is the
    /// closer (whoever the owner of record was).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub(crate) in_close: bool,
    /// The user call stack of the close() that caused this event (with `--stacks`), innermost
    /// frame first.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) user_stack: Option<Vec<crate::stacks::Frame>>,
}

fn hook_of(ev: &Event) -> Result<Hook> {
    Hook::from_abi(ev.hook)
        .ok_or_else(|| anyhow::anyhow!("event record has unknown hook number {}", ev.hook))
}

impl TraceEvent {
    /// The socket's state when the hook ran, when it is a TCP state.
    pub(crate) fn tcp_state(&self) -> Option<TcpState> {
        self.state?.tcp()
    }

    /// The state after the event (see [`TraceEvent::new_state`]), when it is a TCP state.
    pub(crate) fn tcp_new_state(&self) -> Option<TcpState> {
        self.new_state?.tcp()
    }

    /// The kernel's RST reason, when the model knows it by name.
    pub(crate) fn reason(&self) -> Option<RstReason> {
        self.rst_reason?.known()
    }

    /// The tcp_tw_status, when the model knows it by name.
    pub(crate) fn tw_verdict(&self) -> Option<TwStatus> {
        self.tw_status?.known()
    }
}

fn addr(family: u16, raw: &[u8; 16], port: u16) -> Option<SocketAddr> {
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(*raw)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Decodes `ev` with the enum names in `facts`. `owner` is the owner after userspace
/// attribution (see `flows::owners`), which may know more than the kernel did.
pub(crate) fn decode(ev: &Event, facts: &KernelFacts) -> Result<TraceEvent> {
    let hook = hook_of(ev)?;
    let family = match ev.family {
        AF_INET => Some(Family::Ipv4),
        AF_INET6 => Some(Family::Ipv6),
        _ => None,
    };
    let owner = (ev.flags & flag::OWNER_KNOWN != 0).then(|| Owner {
        pid: ev.owner_tgid,
        comm: Comm::from_kernel(&ev.owner_comm),
        source: if ev.flags & flag::OWNER_PROVISIONAL != 0 {
            OwnerSource::Provisional
        } else {
            OwnerSource::Kernel
        },
        cgroup_id: ev.owner_cgroup,
    });
    let has_state = ev.flags & flag::TUPLE_FROM_SKB == 0;
    let new_state = matches!(
        hook,
        Hook::InetSockSetState | Hook::TcpTimeWait | Hook::TcpTimewaitStateProcessReturn
    )
    .then_some(KState(ev.new_state));
    let mut out = TraceEvent {
        ts_ns: ev.ts_ns,
        cpu: ev.cpu,
        hook,
        pid: ev.tgid,
        tid: ev.tid,
        comm: Comm::from_kernel(&ev.comm),
        owner,
        netns: ev.netns,
        sk: SockPtr(ev.sk),
        family,
        local: addr(ev.family, &ev.saddr, ev.sport),
        remote: addr(ev.family, &ev.daddr, ev.dport),
        state: has_state.then_some(KState(ev.old_state)),
        new_state,
        close: None,
        rst_reason: None,
        rst_active: None,
        timeo_jiffies: None,
        segment: None,
        tw_status: None,
        in_close: ev.flags & flag::IN_CLOSE != 0,
        user_stack: None,
    };
    if ev.flags & flag::HAS_REASON != 0 {
        out.rst_reason = Some(facts.rst_reason(ev.reason));
    }
    // tcp_close, and active resets from a full socket, carry the socket's queues and linger.
    if ev.flags & flag::HAS_CLOSE_DETAILS != 0 {
        out.close = Some(CloseDetails {
            timeout_jiffies: ev.timeout,
            linger: ev.flags & flag::LINGER != 0,
            linger_jiffies: ev.linger_jiffies,
            unread: ev.unread,
            unsent: ev.unsent,
            unacked: ev.unacked,
            fin_received: ev.flags & flag::SOCK_DONE != 0,
            orphan: ev.flags & flag::ORPHAN != 0,
        });
    }
    match hook {
        Hook::TcpSendReset => out.rst_active = Some(ev.skb == 0),
        Hook::TcpSendActiveReset => out.rst_active = Some(true),
        Hook::TcpTimeWait => out.timeo_jiffies = Some(ev.timeout),
        Hook::TcpTimewaitStateProcess => {
            out.segment = Some(Segment {
                flags: TcpFlags(ev.tcp_flags),
                seq: ev.seq,
                ack: ev.ack_seq,
                len: ev.seg_len,
                tw_rcv_nxt: ev.rcv_nxt,
            })
        }
        Hook::TcpTimewaitStateProcessReturn if ev.flags & flag::HAS_RET != 0 => {
            out.tw_status = Some(facts.tw_status(ev.ret))
        }
        _ => {}
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernel::btf::{KernelBtf, testing::fake_kernel};
    use tcp_trace_common::hook;

    pub(crate) fn facts() -> KernelFacts {
        KernelFacts::from_btf(&KernelBtf::from_bytes(&fake_kernel(true)).unwrap()).unwrap()
    }

    pub(crate) fn v4_event(hook: u8, sport: u16, dport: u16) -> Event {
        let mut ev = Event::zeroed();
        ev.hook = hook;
        ev.family = AF_INET;
        ev.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        ev.sport = sport;
        ev.dport = dport;
        ev.sk = 0xffff_8880_1234_5678;
        ev.comm[..4].copy_from_slice(b"curl");
        ev
    }

    #[test]
    fn raw_records_round_trip_and_bad_sizes_are_errors() {
        let ev = v4_event(hook::TCP_CLOSE, 40000, 80);
        let bytes = event_bytes(&ev).to_vec();
        assert_eq!(parse_raw(&bytes).unwrap(), ev);
        let err = parse_raw(&bytes[..100]).unwrap_err().to_string();
        assert!(err.contains("100 bytes"), "{err}");
        let mut bad = ev;
        bad.hook = 200;
        assert!(parse_raw(event_bytes(&bad)).is_err());
        assert!(
            decode(&bad, &facts()).is_err(),
            "an unknown hook is no hook in particular"
        );
    }

    #[test]
    fn close_with_unread_data_decodes() {
        let mut ev = v4_event(hook::TCP_CLOSE, 5000, 40000);
        ev.old_state = 1;
        ev.flags = flag::HAS_CLOSE_DETAILS | flag::OWNER_KNOWN | flag::LINGER;
        ev.unread = 42;
        ev.owner_tgid = 77;
        ev.owner_comm[..3].copy_from_slice(b"srv");
        let t = decode(&ev, &facts()).unwrap();
        assert_eq!(t.hook, Hook::TcpClose);
        assert_eq!(t.local.unwrap().to_string(), "127.0.0.1:5000");
        assert_eq!(t.remote.unwrap().to_string(), "127.0.0.2:40000");
        assert_eq!(t.tcp_state(), Some(TcpState::Established));
        let c = t.close.unwrap();
        assert_eq!((c.unread, c.linger), (42, true));
        assert_eq!(t.owner.unwrap().pid, 77);
        assert_eq!(t.comm, "curl");
    }

    #[test]
    fn reset_reason_and_tw_status_decode_by_name() {
        let f = facts();
        let mut ev = v4_event(hook::TCP_SEND_RESET, 1, 2);
        ev.flags = flag::HAS_REASON;
        ev.reason = 9;
        let t = decode(&ev, &f).unwrap();
        assert_eq!(t.reason(), Some(RstReason::TcpAbortOnClose));
        assert_eq!(t.rst_active, Some(true));

        let mut ev = v4_event(hook::TW_STATE_PROCESS_RET, 1, 2);
        ev.flags = flag::HAS_RET;
        ev.ret = 3;
        ev.new_state = 6;
        let t = decode(&ev, &f).unwrap();
        assert_eq!(t.tw_verdict(), Some(TwStatus::Syn));
        assert_eq!(t.tcp_new_state(), Some(TcpState::TimeWait));
        ev.ret = 42;
        let t = decode(&ev, &f).unwrap();
        assert_eq!(t.tw_status, Some(KTwStatus::Unknown(42)));
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["tw_status"], "status#42");
    }

    #[test]
    fn ipv6_and_segment_flags() {
        let mut ev = v4_event(hook::TW_STATE_PROCESS, 80, 1234);
        ev.family = AF_INET6;
        ev.saddr = Ipv6Addr::LOCALHOST.octets();
        ev.daddr = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        ev.tcp_flags = 0x11;
        ev.seg_len = 0;
        let t = decode(&ev, &facts()).unwrap();
        assert_eq!(t.local.unwrap().to_string(), "[::1]:80");
        assert_eq!(t.remote.unwrap().to_string(), "[::ffff:10.0.0.1]:1234");
        assert_eq!(t.segment.unwrap().flags, "F.");
    }

    #[test]
    fn json_lines_are_stable() {
        let ev = v4_event(hook::INET_SOCK_SET_STATE, 1, 2);
        let t = decode(&ev, &facts()).unwrap();
        let v: serde_json::Value = serde_json::to_value(&t).unwrap();
        assert_eq!(v["sk"], "0xffff888012345678");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["comm"], "curl");
        for key in [
            "ts_ns", "hook", "pid", "comm", "owner", "local", "remote", "state", "sk",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["hook"], "inet_sock_set_state");
    }
}
