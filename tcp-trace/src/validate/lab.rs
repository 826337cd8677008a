//! The test bench `validate` runs scenarios on: the tracer with a collector thread draining its
//! ring buffer, and per scenario a client and a server namespace joined by a veth pair, with the
//! tc segment dropper on both ends.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        SchedClassifier, TcAttachType,
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use tcp_trace_common::{DropRule, Event};

use super::netns::{Netns, veth_pair};
use crate::decode;

/// Drains the ring buffer on a thread of its own into memory.
pub(crate) struct Collector {
    events: Arc<Mutex<Vec<Event>>>,
    /// Records that did not decode (wrong size, unknown hook): counted as lost, not dropped
    /// unseen.
    malformed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    dropped: PerCpuArray<MapData, u64>,
}

impl Collector {
    pub(crate) fn start(ebpf: &mut Ebpf) -> Result<Collector> {
        let mut ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS")?)?;
        let dropped = PerCpuArray::try_from(ebpf.take_map("DROPPED").context("map DROPPED")?)?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let malformed = Arc::new(AtomicU64::new(0));
        let (ev, st, bad) = (events.clone(), stop.clone(), malformed.clone());
        let thread = thread::spawn(move || {
            loop {
                let done = st.load(Ordering::Relaxed);
                let mut batch = Vec::new();
                while let Some(item) = ring.next() {
                    match decode::parse_raw(&item) {
                        Ok(e) => batch.push(e),
                        Err(_) => {
                            bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if !batch.is_empty() {
                    ev.lock().expect("collector lock").extend(batch);
                }
                if done {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        Ok(Collector {
            events,
            malformed,
            stop,
            thread: Some(thread),
            dropped,
        })
    }

    /// Events from any of `netns` since `since_ns` (CLOCK_MONOTONIC), in timestamp order. The
    /// time bound matters: a freed namespace's inode number is soon reused.
    pub(crate) fn events_in(&self, netns: &[u32], since_ns: u64) -> Vec<Event> {
        let mut out: Vec<Event> = self
            .events
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|e| e.ts_ns >= since_ns)
            .filter(|e| netns.contains(&e.netns) || (e.netns == 0 && e.sk == 0))
            .copied()
            .collect();
        out.sort_by_key(|e| e.ts_ns);
        out
    }

    /// (hook, netns) of every event of socket `sk` since `since_ns`, whatever its namespace: set
    /// against the scenario's namespaces, it tells whether a missing event came with another
    /// one (a diagnostic for an event missing from a scenario).
    pub(crate) fn netns_of_socket(&self, sk: u64, since_ns: u64) -> Vec<(u8, u32)> {
        self.events
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|e| e.ts_ns >= since_ns && e.sk == sk)
            .map(|e| (e.hook, e.netns))
            .collect()
    }

    /// Events the ring buffer dropped, and records that did not decode.
    pub(crate) fn lost(&self) -> u64 {
        self.dropped
            .get(&0, 0)
            .map(|v| v.iter().sum::<u64>())
            .unwrap_or_default()
            + self.malformed.load(Ordering::Relaxed)
    }

    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Which end of a scenario's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Side {
    Client,
    Server,
}

pub(crate) const CLIENT_IF: &str = "ttc0";
pub(crate) const SERVER_IF: &str = "tts0";
pub(crate) const SERVER_PORT: u16 = 8080;

/// A client and a server namespace joined by a veth pair.
pub(crate) struct Lab {
    pub(crate) client: Netns,
    pub(crate) server: Netns,
    pub(crate) client_ip: Ipv4Addr,
    pub(crate) server_ip: Ipv4Addr,
}

impl Lab {
    pub(crate) fn new() -> Result<Lab> {
        let client = Netns::new()?;
        let server = Netns::new()?;
        let (client_ip, server_ip) = (Ipv4Addr::new(10, 231, 0, 1), Ipv4Addr::new(10, 231, 0, 2));
        veth_pair(
            &client,
            &server,
            (CLIENT_IF, client_ip),
            (SERVER_IF, server_ip),
        )?;
        Ok(Lab {
            client,
            server,
            client_ip,
            server_ip,
        })
    }

    pub(crate) fn ns(&self, side: Side) -> &Netns {
        match side {
            Side::Client => &self.client,
            Side::Server => &self.server,
        }
    }

    pub(crate) fn server_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.server_ip, SERVER_PORT)
    }

    pub(crate) fn netns(&self) -> [u32; 2] {
        [self.client.inode, self.server.inode]
    }
}

static NEXT_PRIORITY: AtomicU16 = AtomicU16::new(1);

/// The tc dropper: one program, attached on egress of each lab's veth ends; rules in a map.
pub(crate) struct Dropper {
    rules: Array<MapData, DropRule>,
}

impl Dropper {
    pub(crate) fn load(ebpf: &mut Ebpf) -> Result<Dropper> {
        let prog: &mut SchedClassifier = ebpf
            .program_mut("drop_segments")
            .context("program drop_segments missing")?
            .try_into()?;
        prog.load().context("loading the tc segment dropper")?;
        let rules = Array::try_from(ebpf.take_map("DROP_RULES").context("map DROP_RULES")?)?;
        Ok(Dropper { rules })
    }

    /// Attaches the dropper on egress of both veth ends of `lab`.
    pub(crate) fn attach(&self, ebpf: &mut Ebpf, lab: &Lab) -> Result<()> {
        for (ns, iface) in [(&lab.client, CLIENT_IF), (&lab.server, SERVER_IF)] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut("drop_segments")
                .context("program drop_segments missing")?
                .try_into()?;
            ns.run(move || {
                // Older kernels attach through a clsact qdisc (newer ones use tcx links); it may
                // exist already.
                let qdisc = tc::qdisc_add_clsact(iface);
                // Through netlink (before tcx), aya tells attachments apart by (ifindex,
                // priority, handle), and every lab's veth has the same ifindex in its own
                // namespace: give each attachment a priority of its own.
                let tcx = crate::kernel::parse_release(&crate::kernel::kernel_release())
                    .is_some_and(|v| v >= (6, 6, 0));
                let result = if tcx {
                    prog.attach(iface, TcAttachType::Egress)
                } else {
                    let priority = NEXT_PRIORITY.fetch_add(1, Ordering::Relaxed);
                    prog.attach_with_options(
                        iface,
                        TcAttachType::Egress,
                        TcAttachOptions::Netlink(NlOptions {
                            priority,
                            ..Default::default()
                        }),
                    )
                };
                result.map_err(|e| {
                    let qdisc = match qdisc {
                        Err(q) => format!("; adding the clsact qdisc failed too: {q}"),
                        Ok(()) => String::new(),
                    };
                    anyhow!(
                        "attach the segment dropper to {iface}: {e}{qdisc} (kernels without \
                         tcx need sch_ingress and cls_bpf: `modprobe sch_ingress cls_bpf`)"
                    )
                })?;
                Ok(())
            })?;
        }
        Ok(())
    }

    pub(crate) fn set(&mut self, slot: u32, rule: DropRule) -> Result<()> {
        self.rules.set(slot, rule, 0).context("set a drop rule")
    }

    pub(crate) fn get(&self, slot: u32) -> Result<DropRule> {
        self.rules.get(&slot, 0).context("read a drop rule")
    }

    pub(crate) fn clear(&mut self) -> Result<()> {
        for slot in 0..tcp_trace_common::DROP_RULES_MAX {
            self.set(slot, DropRule::default())?;
        }
        Ok(())
    }
}
