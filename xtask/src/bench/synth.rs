//! Synthetic recordings for the replay benchmark: the churn's connections as this machine's
//! kernel reports them with tracepoints only, written in the recording format of
//! `docs/record-format.md` (magic, version, JSON header, tagged records, trailer).
//!
//! The sequences copy a real `tcp-trace record` of the churn on Linux 6.18 (four tracepoints):
//!
//! - clean (6 events per socket): client `CLOSE -> SYN_SENT` (local port still 0), `SYN_SENT ->
//!   ESTABLISHED`; server `LISTEN -> SYN_RECV`, `SYN_RECV -> ESTABLISHED`; client
//!   `ESTABLISHED -> FIN_WAIT1`; server `ESTABLISHED -> CLOSE_WAIT`, `CLOSE_WAIT -> LAST_ACK`;
//!   client `FIN_WAIT1 -> FIN_WAIT2`, `FIN_WAIT2 -> CLOSE` (into TIME_WAIT), destroy; server
//!   `LAST_ACK -> CLOSE`, destroy.
//! - rst-unread (5 events per socket): the same opening; server `ESTABLISHED -> CLOSE`; client
//!   `tcp_receive_reset`, `ESTABLISHED -> CLOSE`; server `tcp_send_reset` (active,
//!   `TCP_ABORT_ON_CLOSE`), destroy; client destroy.
//!
//! Connections alternate clean and rst-unread: 11 events and 2 flows per connection on average
//! (5.5 events per flow). Like the churn, the client goes round 4 listeners (127.0.0.1..=4) and
//! even ephemeral ports, so a 4-tuple comes back every 56,464 connections (4 s at 14k/s, as with
//! `tcp_tw_reuse`), and socket addresses come from a small pool, as the slab reuses them.
//! Connections start every 70 us (the bare churn's rate); timestamps only increase.

use std::{io::Write, mem::offset_of};

use anyhow::{Context, Result, bail};
use tcp_trace_common::{AF_INET, EVENT_SIZE, Event, Hook, flag, state};

const MAGIC: &[u8; 8] = b"TCPTRACE";
/// docs/record-format.md: format 2 has 200-byte events (with `owner_cgroup`).
const FORMAT_VERSION: u32 = 2;
const TAG_EVENT: u8 = b'E';
const TAG_END: u8 = b'Z';

/// Connections start this far apart (ns): about the bare churn's rate.
pub const CONNECTION_GAP_NS: u64 = 70_000;
/// The first event's CLOCK_MONOTONIC time.
const START_NS: u64 = 1_000_000_000_000;
const NETNS: u32 = 4_026_531_833;
const PID: u32 = 4242;
const COMM: &[u8] = b"xtask-churn";
const FIRST_PORT: u32 = 32768;
/// Even ports of the default ephemeral range 32768..=60999.
const EVEN_PORTS: u64 = 14_116;
const LISTENERS: u64 = 4;
const LISTEN_PORT: u16 = 40_000;
/// Socket addresses cycle through this many slab slots.
const SK_POOL: u64 = 64;
const SK_BASE: u64 = 0xffff_8881_0200_0000;

/// The shape of a synthetic recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub connections: u64,
    pub events: u64,
    /// Sockets torn down (each one a flow in tcp-trace's report).
    pub flows: u64,
}

impl Shape {
    /// The recording of `connections` connections, alternating clean and rst-unread.
    pub fn of(connections: u64) -> Shape {
        let clean = connections.div_ceil(2);
        let rst = connections / 2;
        Shape {
            connections,
            events: clean * 12 + rst * 10,
            flows: 2 * connections,
        }
    }

    /// The fewest connections whose recording holds at least `events` events.
    pub fn with_events(events: u64) -> Shape {
        let mut c = events / 11;
        while Shape::of(c).events < events {
            c += 1;
        }
        Shape::of(c)
    }

    /// The fewest connections whose recording holds at least `flows` flows.
    pub fn with_flows(flows: u64) -> Shape {
        Shape::of(flows.div_ceil(2))
    }
}

/// Writes the recording of `shape.connections` connections to `out`, behind `header_json` (a
/// recording header, e.g. taken from a real recording of this machine: it carries the kernel
/// facts replay decodes with). `abort_on_close` is the kernel's `SK_RST_REASON_TCP_ABORT_ON_CLOSE`
/// value (None: the kernel has no reset reasons). Returns the number of events written.
pub fn write_recording<W: Write>(
    out: W,
    header_json: &[u8],
    shape: Shape,
    abort_on_close: Option<u32>,
) -> Result<u64> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let len = u32::try_from(header_json.len()).context("header too large")?;
    out.write_all(MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(header_json)?;
    let mut written = 0u64;
    let mut rec = [0u8; 3 + EVENT_SIZE];
    rec[0] = TAG_EVENT;
    rec[1..3].copy_from_slice(&(EVENT_SIZE as u16).to_le_bytes());
    let mut evs = Vec::with_capacity(12);
    for i in 0..shape.connections {
        evs.clear();
        connection(i, abort_on_close, &mut evs);
        for ev in &evs {
            encode(ev, &mut rec[3..]);
            out.write_all(&rec)?;
            written += 1;
        }
    }
    if written != shape.events {
        bail!("wrote {written} events, expected {}", shape.events);
    }
    out.write_all(&[TAG_END])?;
    out.write_all(&16u16.to_le_bytes())?;
    out.write_all(&written.to_le_bytes())?;
    out.write_all(&0u64.to_le_bytes())?;
    out.flush().context("writing the synthetic recording")?;
    Ok(written)
}

/// The events of connection `i`, in time order.
pub fn connection(i: u64, abort_on_close: Option<u32>, out: &mut Vec<Event>) {
    let t0 = START_NS + i * CONNECTION_GAP_NS;
    let listener = (i % LISTENERS) as u8;
    let server_ip = [127, 0, 0, listener + 1];
    let client_ip = [127, 0, 0, 1];
    let server_port = LISTEN_PORT + u16::from(listener);
    let client_port = (FIRST_PORT as u64 + 2 * ((i / LISTENERS) % EVEN_PORTS)) as u16;
    let client_sk = SK_BASE + ((2 * i) % SK_POOL) * 0x8c0;
    let server_sk = SK_BASE + ((2 * i + 1) % SK_POOL) * 0x8c0;
    let base = |sk: u64, local: ([u8; 4], u16), remote: ([u8; 4], u16)| {
        let mut e = Event::zeroed();
        e.sk = sk;
        e.cpu = (i % 2) as u32;
        e.tgid = PID;
        e.tid = PID;
        e.owner_tgid = PID;
        e.netns = NETNS;
        e.flags = flag::OWNER_KNOWN;
        e.family = AF_INET;
        e.saddr[..4].copy_from_slice(&local.0);
        e.sport = local.1;
        e.daddr[..4].copy_from_slice(&remote.0);
        e.dport = remote.1;
        e.comm[..COMM.len()].copy_from_slice(COMM);
        e.owner_comm[..COMM.len()].copy_from_slice(COMM);
        e
    };
    let client = base(
        client_sk,
        (client_ip, client_port),
        (server_ip, server_port),
    );
    let server = base(
        server_sk,
        (server_ip, server_port),
        (client_ip, client_port),
    );
    let set_state = |from: &Event, dt: u64, old: u8, new: u8| {
        let mut e = *from;
        e.ts_ns = t0 + dt;
        e.hook = Hook::InetSockSetState.abi();
        e.old_state = old;
        e.new_state = new;
        e
    };
    let other = |from: &Event, dt: u64, h: Hook, st: u8| {
        let mut e = *from;
        e.ts_ns = t0 + dt;
        e.hook = h.abi();
        e.old_state = st;
        e
    };
    // Before the handshake the client's local port is not chosen yet.
    let mut unbound = client;
    unbound.sport = 0;
    out.push(set_state(&unbound, 0, state::CLOSE, state::SYN_SENT));
    out.push(set_state(
        &client,
        1_800,
        state::SYN_SENT,
        state::ESTABLISHED,
    ));
    out.push(set_state(&server, 1_900, state::LISTEN, state::SYN_RECV));
    out.push(set_state(
        &server,
        1_950,
        state::SYN_RECV,
        state::ESTABLISHED,
    ));
    if i.is_multiple_of(2) {
        out.push(set_state(
            &client,
            2_850,
            state::ESTABLISHED,
            state::FIN_WAIT1,
        ));
        out.push(set_state(
            &server,
            2_900,
            state::ESTABLISHED,
            state::CLOSE_WAIT,
        ));
        out.push(set_state(
            &server,
            3_000,
            state::CLOSE_WAIT,
            state::LAST_ACK,
        ));
        out.push(set_state(
            &client,
            3_050,
            state::FIN_WAIT1,
            state::FIN_WAIT2,
        ));
        out.push(set_state(&client, 3_100, state::FIN_WAIT2, state::CLOSE));
        out.push(other(&client, 3_130, Hook::TcpDestroySock, state::CLOSE));
        out.push(set_state(&server, 3_200, state::LAST_ACK, state::CLOSE));
        out.push(other(&server, 3_210, Hook::TcpDestroySock, state::CLOSE));
    } else {
        out.push(set_state(&server, 3_000, state::ESTABLISHED, state::CLOSE));
        out.push(other(
            &client,
            3_040,
            Hook::TcpReceiveReset,
            state::ESTABLISHED,
        ));
        out.push(set_state(&client, 3_060, state::ESTABLISHED, state::CLOSE));
        let mut rst = other(&server, 3_090, Hook::TcpSendReset, state::CLOSE);
        if let Some(reason) = abort_on_close {
            rst.flags |= flag::HAS_REASON;
            rst.reason = reason;
        }
        out.push(rst);
        out.push(other(&server, 3_130, Hook::TcpDestroySock, state::CLOSE));
        out.push(other(&client, 3_360, Hook::TcpDestroySock, state::CLOSE));
    }
}

/// `ev` in the recording's event layout: `tcp_trace_common::Event`'s fields, little-endian, at
/// their `#[repr(C)]` offsets (so a field added to the ABI moves nothing here), padding zero.
pub fn encode(ev: &Event, out: &mut [u8]) {
    let out = &mut out[..EVENT_SIZE];
    out.fill(0);
    let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
    macro_rules! fields {
        ($($f:ident),* $(,)?) => {
            $( put(offset_of!(Event, $f), &ev.$f.to_le_bytes()); )*
        };
    }
    fields!(
        ts_ns,
        sk,
        skb,
        timeout,
        linger_jiffies,
        cpu,
        tgid,
        tid,
        owner_tgid,
        netns,
        reason,
        unread,
        unsent,
        unacked,
        seq,
        ack_seq,
        seg_len,
        rcv_nxt,
        ret,
        flags,
        sport,
        dport,
        family,
        hook,
        old_state,
        new_state,
        tcp_flags,
        user_stack,
        _reserved,
        close_ret,
    );
    put(offset_of!(Event, saddr), &ev.saddr);
    put(offset_of!(Event, daddr), &ev.daddr);
    put(offset_of!(Event, comm), &ev.comm);
    put(offset_of!(Event, owner_comm), &ev.owner_comm);
}

/// The JSON header of a recording (`bytes` holds at least its first 16 + header-length bytes).
pub fn header_of(bytes: &[u8]) -> Result<&[u8]> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        bail!("not a tcp-trace recording");
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into()?);
    if version != FORMAT_VERSION {
        bail!("recording format {version}, this bench writes {FORMAT_VERSION}");
    }
    let len = u32::from_le_bytes(bytes[12..16].try_into()?) as usize;
    bytes
        .get(16..16 + len)
        .context("recording cut short inside its header")
}

/// The value of `SK_RST_REASON_TCP_ABORT_ON_CLOSE` in a recording header's kernel facts.
pub fn abort_on_close_reason(header_json: &[u8]) -> Result<Option<u32>> {
    let v: serde_json::Value = serde_json::from_slice(header_json).context("recording header")?;
    let event_size = v.get("event_size").and_then(|s| s.as_u64());
    if event_size != Some(EVENT_SIZE as u64) {
        bail!("recording header has event_size {event_size:?}, this bench writes {EVENT_SIZE}");
    }
    Ok(v.pointer("/facts/rst_reasons")
        .and_then(|m| m.as_object())
        .and_then(|m| {
            m.iter()
                .find(|(_, name)| name.as_str() == Some("TCP_ABORT_ON_CLOSE"))
                .and_then(|(k, _)| k.parse().ok())
        }))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use tcp_trace::{
        attach::{Backend, HookStatus, Mechanism},
        kernel::btf::KernelFacts,
        pipeline::{Pipeline, model_params},
        record::{Filters, Record, RecordHeader, read_all},
        report::{ReportOptions, View},
    };

    use super::*;

    /// A header like this machine's: the four tracepoints attached, no function hooks.
    fn header() -> Vec<u8> {
        let hooks = Hook::ALL
            .into_iter()
            .map(|h| HookStatus {
                hook: h.name().to_string(),
                mechanism: (!h.is_function()).then_some(Mechanism::TpBtf),
                failures: vec![],
                skipped: None,
            })
            .collect();
        let facts = KernelFacts::new(
            Default::default(),
            BTreeMap::from([
                (0, "NOT_SPECIFIED".to_string()),
                (11, "TCP_ABORT_ON_CLOSE".to_string()),
            ]),
            BTreeMap::new(),
            BTreeMap::new(),
            BTreeMap::new(),
        );
        let mut h = RecordHeader::new(
            "6.18.44-test".into(),
            Backend::Auto,
            hooks,
            facts,
            Filters::default(),
        );
        h.sysctls.insert("kernel.version".into(), "6.18.44".into());
        serde_json::to_vec(&h).unwrap()
    }

    #[test]
    fn shapes() {
        assert_eq!(
            Shape::of(2),
            Shape {
                connections: 2,
                events: 22,
                flows: 4
            }
        );
        assert_eq!(Shape::of(3).events, 34);
        let s = Shape::with_flows(1_000_000);
        assert_eq!((s.connections, s.events), (500_000, 5_500_000));
        let s = Shape::with_events(1_000_000);
        assert!(s.events >= 1_000_000 && Shape::of(s.connections - 1).events < 1_000_000);
        assert_eq!(Shape::with_events(22), Shape::of(2));
        assert_eq!(Shape::with_flows(1_000_000).flows, 1_000_000);
        assert_eq!(Shape::with_flows(3).flows, 4);
    }

    #[test]
    fn encoding_matches_the_abi() {
        let mut evs = Vec::new();
        connection(1, Some(11), &mut evs);
        for ev in &evs {
            let mut buf = [0xAAu8; EVENT_SIZE];
            encode(ev, &mut buf);
            // tcp-trace's own decoding of the bytes.
            let back = tcp_trace::decode::parse_raw(&buf).unwrap();
            assert_eq!(&back, ev);
            // Every byte is written (padding zeroed), whatever the buffer held.
            let mut other = [0x55u8; EVENT_SIZE];
            encode(ev, &mut other);
            assert_eq!(buf, other);
        }
    }

    #[test]
    fn connections_look_like_the_kernels() {
        let mut clean = Vec::new();
        connection(0, Some(11), &mut clean);
        let mut rst = Vec::new();
        connection(1, Some(11), &mut rst);
        assert_eq!((clean.len(), rst.len()), (12, 10));
        for evs in [&clean, &rst] {
            assert!(evs.windows(2).all(|w| w[0].ts_ns < w[1].ts_ns));
            // Two sockets, each ending with its destruction.
            let sks: HashSet<u64> = evs.iter().map(|e| e.sk).collect();
            assert_eq!(sks.len(), 2);
            for sk in sks {
                let last = evs.iter().rfind(|e| e.sk == sk).unwrap();
                assert_eq!(last.hook, Hook::TcpDestroySock.abi());
            }
        }
        let resets: Vec<_> = rst
            .iter()
            .filter(|e| e.hook == Hook::TcpSendReset.abi())
            .collect();
        assert_eq!(resets.len(), 1);
        assert_eq!((resets[0].reason, resets[0].skb), (11, 0));
        assert_ne!(resets[0].flags & flag::HAS_REASON, 0);
        // Later connections start later; 4-tuples come back only after a full round of ports.
        let mut next = Vec::new();
        connection(2, None, &mut next);
        assert!(next[0].ts_ns > clean.last().unwrap().ts_ns);
        let tuple = |e: &Event| (e.saddr, e.sport, e.daddr, e.dport);
        let mut seen = HashMap::new();
        let round = LISTENERS * EVEN_PORTS;
        for i in 0..round + 1 {
            let mut evs = Vec::new();
            connection(i, None, &mut evs);
            if let Some(prev) = seen.insert(tuple(&evs[1]), i) {
                assert_eq!((prev, i), (0, round));
            }
        }
        assert_eq!(seen.len() as u64, round);
    }

    /// The generated file reads back with tcp-trace's own reader, and tcp-trace's pipeline
    /// judges every flow as it judges the real churn's: all conform.
    #[test]
    fn recording_replays_and_every_flow_conforms() {
        let header = header();
        let shape = Shape::of(200);
        let mut bytes = Vec::new();
        let n = write_recording(
            &mut bytes,
            &header,
            shape,
            abort_on_close_reason(&header).unwrap(),
        )
        .unwrap();
        assert_eq!(n, shape.events);
        assert_eq!(header_of(&bytes).unwrap(), header.as_slice());
        let (h, records) = read_all(&bytes).unwrap();
        assert_eq!(records.len() as u64, shape.events + 1);
        assert_eq!(
            records.last(),
            Some(&Record::End {
                events: shape.events,
                lost: 0
            })
        );
        let mut pipeline = Pipeline::new(
            h.facts.clone(),
            &h.hooks,
            model_params("6.18.44", &h.sysctls),
            None,
            ReportOptions {
                json: true,
                view: View::Flows,
                pids: vec![],
                realtime_minus_mono_ns: h.realtime_minus_monotonic_ns,
                scope: Default::default(),
            },
            Vec::new(),
        );
        for r in &records {
            if let Record::Event(ev) = r {
                pipeline.event(ev).unwrap();
            }
        }
        let summary = pipeline.finish().unwrap();
        assert_eq!(summary["events"], shape.events);
        assert_eq!(summary["lost"], 0);
        assert_eq!(
            summary["verdicts"],
            serde_json::json!({"conforms": shape.flows}),
            "{summary}"
        );
        let out = String::from_utf8(pipeline.out().clone()).unwrap();
        assert!(out.contains("TCP_ABORT_ON_CLOSE"), "{out}");
    }

    #[test]
    fn reads_the_reset_reason_from_a_header() {
        assert_eq!(abort_on_close_reason(&header()).unwrap(), Some(11));
        let bad = br#"{"event_size": 100}"#;
        assert!(abort_on_close_reason(bad).is_err());
        assert!(header_of(b"TCPTRACX").is_err());
    }
}
