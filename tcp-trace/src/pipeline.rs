//! The data path after the ring buffer, shared by the live tracer, `replay` and `validate`:
//! raw events are decoded, attributed to their owner, filtered, diagnosed when they are resets
//! and joined into flows, whose timelines and verdicts come out as each flow ends; a summary
//! closes the run. What is printed, and how, is [`crate::report`]'s.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    sync::Arc,
};

use anyhow::Result;
use serde_json::json;
use tcp_trace_common::Event;

use crate::{
    attach::HookStatus,
    cgroups::{Cgroups, Identity},
    decode::{self, Hook, TraceEvent},
    flows::{FlowConfig, FlowReport, FlowTable, attached_hooks},
    kernel::btf::KernelFacts,
    kernel::netns_sysctls::NetnsSysctls,
    model::{KernelGeneration, KernelVersion, ModelParams},
    owners::{Owners, PidGate},
    record::NetnsSettings,
    report::{
        ReportOptions, ResetsView, View,
        json::{JsonLine, json_line},
        tables, text,
    },
    resets::{self, ResetDiagnosis, ResetTracker, TrackerConfig},
};

/// How long a namespace whose sysctls could not be read waits before the next try.
const NETNS_RETRY_NS: u64 = 1_000_000_000;
/// A namespace's sysctls are read again after this long (trace time): it may have changed them,
/// or died and left its inode number to a new one.
const NETNS_REFRESH_NS: u64 = 60_000_000_000;

/// The model's parameters for this host: the kernel version and the tcp sysctls, from
/// `settings` (name -> value, as recorded or read from /proc/sys).
pub fn model_params(version: &str, settings: &BTreeMap<String, String>) -> ModelParams {
    let kernel = version
        .parse::<KernelVersion>()
        .map(KernelGeneration::for_release)
        .unwrap_or_else(|_| KernelGeneration::from_version(6, 12, 0));
    with_sysctls(ModelParams::for_generation(kernel), settings)
}

/// `base` with the sysctls `settings` has (the others as in `base`).
pub fn with_sysctls(base: ModelParams, settings: &BTreeMap<String, String>) -> ModelParams {
    let int = |key: &str, default: i64| {
        settings
            .get(key)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(default)
    };
    ModelParams {
        tcp_fin_timeout_secs: int("net.ipv4.tcp_fin_timeout", base.tcp_fin_timeout_secs.into())
            as u32,
        tcp_rfc1337: int("net.ipv4.tcp_rfc1337", base.tcp_rfc1337.into()) != 0,
        tcp_orphan_retries: int(
            "net.ipv4.tcp_orphan_retries",
            base.tcp_orphan_retries.into(),
        ) as u32,
        ..base
    }
}

/// The model's parameters in a namespace a recording describes: the kernel `version` (with
/// what `facts` detected), that namespace's sysctls and the socket facts the recorder knew.
pub(crate) fn netns_params(
    version: &str,
    facts: &KernelFacts,
    settings: &NetnsSettings,
) -> ModelParams {
    let mut params = model_params(version, &settings.sysctls).with_detected(facts.detected());
    if let Some(secs) = settings.tcp_linger2_secs {
        params.tcp_linger2_secs = secs;
    }
    if let Some(listening) = settings.listener_on_port {
        params.listener_on_port = listening;
    }
    params
}

/// The sysctls the model depends on (see [`model_params`]).
pub const MODEL_SYSCTLS: &[&str] = &[
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_rfc1337",
    "net.ipv4.tcp_orphan_retries",
];

/// The sysctls the model depends on, read from this process's network namespace.
pub fn host_sysctls() -> BTreeMap<String, String> {
    MODEL_SYSCTLS
        .iter()
        .filter_map(|k| {
            let path = format!("/proc/sys/{}", k.replace('.', "/"));
            std::fs::read_to_string(path)
                .ok()
                .map(|v| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Trace time between releases of ended flows: the live tracer's drain tick, which replay and
/// `validate` follow in trace time so that they split and join flows as the tracer does (a
/// segment long after a flow was released starts a new one).
pub const RELEASE_TICK_NS: u64 = 50_000_000;

/// The pipeline without printing or reset diagnoses, for events already in hand (`validate`):
/// decode -> owners -> flows, then every flow that tore down, judged. Ended flows are released
/// every [`RELEASE_TICK_NS`] of trace time, as in replay. `lost`: the kernel dropped events
/// meanwhile, when is not known: every flow is then held to the end and judged with the loss
/// (no verdict may rely on an absence).
pub(crate) fn judge<'a>(
    facts: &KernelFacts,
    config: FlowConfig,
    events: impl IntoIterator<Item = &'a Event>,
    lost: bool,
) -> Result<Vec<FlowReport>> {
    let mut flows = FlowTable::new(config);
    let mut owners = Owners::default();
    let mut reports = Vec::new();
    let (mut last_ts, mut next_tick) = (0, 0);
    for raw in events {
        let mut ev = decode::decode(raw, facts)?;
        owners.attribute(&mut ev);
        last_ts = last_ts.max(ev.ts_ns);
        flows.push(ev);
        if !lost && last_ts >= next_tick {
            reports.extend(flows.advance(last_ts));
            next_tick = last_ts.saturating_add(RELEASE_TICK_NS);
        }
    }
    if lost {
        flows.note_lost(0, 1);
    }
    reports.extend(flows.flush());
    Ok(reports.into_iter().filter(|r| r.teardown).collect())
}

/// ` [container docker:0123456789ab]` for an owner in a container; nothing otherwise (systemd
/// units are in `--json` and the metrics, not on every line).
fn container_note(cgroup: Option<&Identity>) -> String {
    match cgroup.and_then(|c| c.container.as_ref().map(|_| c.label())) {
        Some(Some(label)) => format!(" [container {label}]"),
        _ => String::new(),
    }
}

/// Sizes of the pipeline's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) flows: usize,
    pub(crate) buffered_events: usize,
    pub(crate) reset_histories: usize,
    pub(crate) owners: usize,
}

pub struct Pipeline<W: Write> {
    facts: KernelFacts,
    opts: ReportOptions,
    owners: Owners,
    /// With `--pid`: events wait here until their socket's owner is known.
    gate: Option<PidGate>,
    /// Events the gate let through, to process (kept to reuse the allocation).
    admitted: Vec<TraceEvent>,
    flows: FlowTable,
    out: W,
    counts: BTreeMap<Hook, u64>,
    verdicts: BTreeMap<&'static str, u64>,
    divergent: Vec<String>,
    resets: ResetTracker,
    resets_view: ResetsView,
    pub(crate) events: u64,
    pub(crate) lost: u64,
    pub(crate) malformed: u64,
    /// Symbolizes close() call stacks (live only: the process must still exist).
    pub(crate) stacks: Option<crate::stacks::StackResolver>,
    /// `--metrics`: counted from the same events, flows and resets as the output.
    pub(crate) metrics: Option<Arc<crate::report::metrics::Metrics>>,
    /// Owners' cgroup ids to container identities (resolves nothing in replay).
    pub(crate) cgroups: Cgroups,
    /// Reads each network namespace's sysctls (live only: the namespaces must still exist), so
    /// that its flows are judged with them.
    pub(crate) netns_sysctls: Option<NetnsSysctls>,
    /// The parameters given to [`Pipeline::new`], which a namespace's own sysctls override.
    params: ModelParams,
    /// Namespaces whose parameters are settled.
    /// Namespaces whose sysctls were read, and when (trace time): read again after
    /// [`NETNS_REFRESH_NS`].
    netns_settled: HashMap<u32, u64>,
    /// Namespaces whose sysctls could not be read yet, with when that was tried (trace time).
    netns_unread: HashMap<u32, u64>,
}

impl<W: Write> Pipeline<W> {
    pub fn new(
        facts: KernelFacts,
        hooks: &[HookStatus],
        params: ModelParams,
        hz: Option<u64>,
        opts: ReportOptions,
        out: W,
    ) -> Self {
        let attached = attached_hooks(hooks);
        let resets = ResetTracker::new(TrackerConfig::new(params.kernel, attached));
        let mut config = FlowConfig::new(params, attached);
        config.hz = hz;
        Self {
            gate: (!opts.pids.is_empty()).then(|| PidGate::new(opts.pids.clone())),
            admitted: Vec::new(),
            facts,
            opts,
            owners: Owners::default(),
            flows: FlowTable::new(config),
            out,
            counts: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            divergent: Vec::new(),
            resets,
            resets_view: ResetsView::Inline,
            events: 0,
            lost: 0,
            malformed: 0,
            stacks: None,
            metrics: None,
            cgroups: Cgroups::none(),
            netns_sysctls: None,
            params,
            netns_settled: Default::default(),
            netns_unread: Default::default(),
        }
    }

    /// Judges the flows of namespace `netns` with `params` (its own settings) instead of the
    /// parameters given to [`Pipeline::new`].
    pub fn judge_netns_with(&mut self, netns: u32, params: ModelParams) {
        self.flows.set_netns_params(netns, Some(params));
    }

    /// Shows reset diagnoses as `view` says (default: inline).
    pub(crate) fn set_resets_view(&mut self, view: ResetsView) {
        self.resets_view = view;
    }

    /// The reset diagnoses' tracker: tallies, summary, the counting window.
    pub(crate) fn resets(&self) -> &ResetTracker {
        &self.resets
    }

    pub(crate) fn resets_mut(&mut self) -> &mut ResetTracker {
        &mut self.resets
    }

    /// Wall-clock ns of a CLOCK_MONOTONIC time.
    pub(crate) fn wall_ns(&self, mono: u64) -> u64 {
        self.wall(mono)
    }

    fn wall(&self, mono: u64) -> u64 {
        (mono as i128 + self.opts.realtime_minus_mono_ns as i128).max(0) as u64
    }

    /// `--cgroup`, `--netns` (`--pid` is the gate's: see [`PidGate`]).
    fn wanted(&self, ev: &TraceEvent, cgroup: Option<&Identity>) -> bool {
        let scope = &self.opts.scope;
        (scope.netns.is_empty() || scope.netns.contains(&ev.netns))
            && (scope.cgroups.is_empty()
                || cgroup.is_some_and(|c| scope.cgroups.iter().any(|dir| c.within(dir))))
    }

    /// The owner's identity, from its cgroup id.
    fn identity(&mut self, owner: Option<&crate::decode::Owner>) -> Option<Arc<Identity>> {
        owner.and_then(|o| self.cgroups.resolve(o.cgroup_id))
    }

    /// One raw event, as the kernel wrote it.
    pub fn event(&mut self, raw: &Event) -> Result<()> {
        let Ok(mut ev) = decode::decode(raw, &self.facts) else {
            // parse_raw lets no such record through; count it rather than guess its hook.
            self.malformed += 1;
            return Ok(());
        };
        if let Some(resolver) = self.stacks.as_mut()
            && raw.user_stack != 0
        {
            ev.user_stack = Some(resolver.resolve(raw.tgid, raw.user_stack, raw.close_ret));
        }
        self.owners.attribute(&mut ev);
        let Some(gate) = self.gate.as_mut() else {
            return self.process(ev);
        };
        let mut admitted = std::mem::take(&mut self.admitted);
        gate.admit(ev, &mut admitted);
        let result = admitted.drain(..).try_for_each(|ev| self.process(ev));
        self.admitted = admitted;
        result
    }

    /// One attributed event that the `--pid` filter keeps.
    fn process(&mut self, ev: TraceEvent) -> Result<()> {
        let cgroup = self.identity(ev.owner.as_ref());
        if !self.wanted(&ev, cgroup.as_deref()) {
            return Ok(());
        }
        self.events += 1;
        *self.counts.entry(ev.hook).or_default() += 1;
        if let Some(m) = &self.metrics {
            m.event(ev.hook);
        }
        self.settle_netns(&ev);
        self.resets.observe(&ev);
        if self.resets_view == ResetsView::Only {
            return Ok(());
        }
        if self.opts.view != View::Flows {
            let unix_ns = self.wall(ev.ts_ns);
            if self.opts.json {
                json_line(
                    &mut self.out,
                    &JsonLine {
                        r#type: "event",
                        unix_ns: Some(unix_ns),
                        advice: None,
                        cgroup: cgroup.as_deref(),
                        body: &ev,
                    },
                )?;
            } else {
                writeln!(
                    self.out,
                    "{}{}",
                    text::human_line(&ev, unix_ns),
                    container_note(cgroup.as_deref())
                )?;
            }
        }
        self.flows.push(ev);
        Ok(())
    }

    /// The first event of a namespace: its flows are judged with its own sysctls where they
    /// differ from the defaults (live, with [`Pipeline::netns_sysctls`]).
    fn settle_netns(&mut self, ev: &TraceEvent) {
        let Some(reader) = self.netns_sysctls.as_mut() else {
            return;
        };
        if self
            .netns_settled
            .get(&ev.netns)
            .is_some_and(|&at| ev.ts_ns.saturating_sub(at) < NETNS_REFRESH_NS)
        {
            return;
        }
        // A namespace that could not be read (no process found in it yet) is tried again a
        // second later, not at every event: each try may scan /proc.
        if self
            .netns_unread
            .get(&ev.netns)
            .is_some_and(|&at| ev.ts_ns.saturating_sub(at) < NETNS_RETRY_NS)
        {
            return;
        }
        let owner = ev.owner.as_ref().map(|o| o.pid).unwrap_or(ev.pid);
        let Some(sysctls) = reader.get(ev.netns, Some(owner)) else {
            if self.netns_unread.len() < 4096 {
                self.netns_unread.insert(ev.netns, ev.ts_ns);
            }
            return;
        };
        let params = with_sysctls(self.params, sysctls);
        self.flows
            .set_netns_params(ev.netns, (params != self.params).then_some(params));
        self.netns_unread.remove(&ev.netns);
        // Settled until the refresh; the one settled longest ago makes room for a new one.
        if !self.netns_settled.contains_key(&ev.netns) && self.netns_settled.len() >= 4096 {
            let oldest = self.netns_settled.iter().min_by_key(|(_, at)| **at);
            if let Some(&oldest) = oldest.map(|(k, _)| k) {
                self.netns_settled.remove(&oldest);
            }
        }
        self.netns_settled.insert(ev.netns, ev.ts_ns);
    }

    /// A reading of the kernel's lost-event counter (`total` so far, at `ts_ns`). Every reading
    /// counts, unchanged ones too: a loss is placed after the last reading without it. A `lost`
    /// line is printed only when the counter grew.
    /// The last hook was attached at `ts_ns` (CLOCK_MONOTONIC).
    pub(crate) fn attached_at(&mut self, ts_ns: u64) {
        self.flows.note_attached(ts_ns);
        self.resets.note_attached(ts_ns);
    }

    pub(crate) fn lost(&mut self, ts_ns: u64, total: u64) -> Result<()> {
        let new = total.saturating_sub(self.lost);
        self.lost = total;
        self.flows.note_lost(ts_ns, total);
        self.resets.note_lost(ts_ns, new > 0);
        if self.opts.json && new > 0 {
            writeln!(
                self.out,
                "{}",
                json!({"type": "lost", "ts_ns": ts_ns, "new": new, "total": total})
            )?;
        }
        Ok(())
    }

    /// One settled reset diagnosis.
    fn reset_done(&mut self, d: &ResetDiagnosis) -> Result<()> {
        let cgroup = self.identity(d.owner.as_ref());
        let label = cgroup.as_deref().and_then(Identity::label);
        if let Some(m) = &self.metrics {
            m.reset(d, label.as_deref());
        }
        if self.resets_view == ResetsView::Inline && self.opts.view == View::Flows {
            return Ok(());
        }
        let unix_ns = self.wall(d.ts_ns);
        if self.opts.json {
            let advice = d.advice();
            json_line(
                &mut self.out,
                &JsonLine {
                    r#type: "reset",
                    unix_ns: Some(unix_ns),
                    advice: advice.as_deref(),
                    cgroup: cgroup.as_deref(),
                    body: d,
                },
            )?;
        } else {
            writeln!(
                self.out,
                "{}{}",
                resets::reset_line(d, unix_ns),
                container_note(cgroup.as_deref())
            )?;
        }
        Ok(())
    }

    fn flow_done(&mut self, report: FlowReport) -> Result<()> {
        // Connections merely opened (or still open at the end) are not teardowns.
        if !report.teardown {
            return Ok(());
        }
        *self.verdicts.entry(report.verdict.label()).or_default() += 1;
        let cgroup = self.identity(report.owner.as_ref());
        if let Some(m) = &self.metrics {
            let label = cgroup.as_deref().and_then(Identity::label);
            m.flow(&report, label.as_deref());
        }
        if report.verdict.diverges() {
            self.divergent
                .push(format!("{} > {}", report.key.local, report.key.remote));
        }
        if self.opts.view == View::Events {
            return Ok(());
        }
        if self.opts.json {
            json_line(
                &mut self.out,
                &JsonLine {
                    r#type: "flow",
                    unix_ns: None,
                    advice: None,
                    cgroup: cgroup.as_deref(),
                    body: &report,
                },
            )?;
        } else {
            let text = report.render_timeline();
            let note = container_note(cgroup.as_deref());
            // On the flow's first line, after its owner.
            match text.split_once('\n') {
                Some((first, rest)) if !note.is_empty() => {
                    writeln!(self.out, "{first}{note}\n{rest}")?
                }
                _ => writeln!(self.out, "{text}")?,
            }
        }
        Ok(())
    }

    /// Releases flows that ended before `now_ns` (CLOCK_MONOTONIC, less the reorder window).
    pub(crate) fn tick(&mut self, now_ns: u64) -> Result<()> {
        for r in self.flows.advance(now_ns) {
            self.flow_done(r)?;
        }
        for d in self.resets.advance(now_ns) {
            self.reset_done(&d)?;
        }
        self.out.flush()?;
        Ok(())
    }

    /// Ends the run: every open flow is reported; returns the summary as JSON.
    pub fn finish(&mut self) -> Result<serde_json::Value> {
        if let Some(gate) = self.gate.as_mut() {
            let mut rest = Vec::new();
            gate.flush(&mut rest);
            for ev in rest {
                self.process(ev)?;
            }
        }
        for r in self.flows.flush() {
            self.flow_done(r)?;
        }
        for d in self.resets.flush() {
            self.reset_done(&d)?;
        }
        self.out.flush()?;
        Ok(json!({
            "type": "summary",
            "events": self.events,
            "lost": self.lost,
            "decode_errors": self.malformed,
            "by_hook": self.counts,
            "verdicts": self.verdicts,
            "divergent_flows": self.divergent,
            "resets": self.resets.by_cause(),
        }))
    }

    /// What the pipeline holds in memory now (all bounded; see `many_short_flows_keep_memory_bounded`).
    pub(crate) fn held(&self) -> Held {
        Held {
            flows: self.flows.live_flows(),
            buffered_events: self.flows.buffered_events(),
            reset_histories: self.resets.connections(),
            owners: self.owners.len() + self.gate.as_ref().map_or(0, PidGate::held_events),
        }
    }

    pub fn out(&mut self) -> &mut W {
        &mut self.out
    }

    /// The summary table (text mode): per hook, how it was attached and how many events came.
    pub(crate) fn summary_table(&self, hooks: &[HookStatus]) -> String {
        tables::summary(hooks, &self.counts, &self.verdicts, self.resets.by_cause())
    }

    pub(crate) fn diverged(&self) -> bool {
        !self.divergent.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::tests::{facts, v4_event};
    use tcp_trace_common::{flag, hook};

    fn pipeline(view: View, json: bool) -> Pipeline<Vec<u8>> {
        Pipeline::new(
            facts(),
            &[],
            model_params("6.12.3", &BTreeMap::new()),
            None,
            ReportOptions {
                json,
                view,
                pids: vec![],
                realtime_minus_mono_ns: 0,
                scope: Default::default(),
            },
            Vec::new(),
        )
    }

    fn unread_close_stream() -> Vec<Event> {
        let mut evs = Vec::new();
        let mut ts = 1_000_000_000;
        let mut push = |h: u8, old: u8, new: u8, f: &dyn Fn(&mut Event)| {
            let mut e = v4_event(h, 8080, 40000);
            e.ts_ns = ts;
            ts += 1000;
            e.old_state = old;
            e.new_state = new;
            e.flags |= flag::OWNER_KNOWN;
            e.owner_tgid = 7;
            f(&mut e);
            evs.push(e);
        };
        push(hook::INET_SOCK_SET_STATE, 1, 7, &|_| {});
        push(hook::TCP_SEND_RESET, 7, 0, &|e| {
            e.flags |= flag::HAS_REASON;
            e.reason = 9;
        });
        push(hook::TCP_DESTROY_SOCK, 7, 0, &|_| {});
        evs
    }

    /// Events of `n` loopback connections as this machine's tracepoints report them (clean
    /// close, the client end into TIME_WAIT), one every 70 us from `t0`, socket addresses from a
    /// small pool as the slab reuses them.
    fn churn(first: u64, n: u64, t0: u64) -> Vec<Event> {
        let mut evs = Vec::new();
        for c in first..first + n {
            let mut ts = t0 + (c - first) * 70_000;
            let port = 32768 + (c % 14_000) as u16 * 2;
            let (client_sk, server_sk) = (
                0xffff_8880_0000_0000 + (c % 512) * 4096,
                0xffff_8880_1000_0000 + (c % 512) * 4096,
            );
            let mut push = |sk: u64, local: u16, remote: u16, hook: u8, old: u8, new: u8| {
                let mut e = v4_event(hook, local, remote);
                e.sk = sk;
                e.ts_ns = ts;
                ts += 1_000;
                e.old_state = old;
                e.new_state = new;
                e.flags |= flag::OWNER_KNOWN;
                e.owner_tgid = 7;
                evs.push(e);
            };
            let set = hook::INET_SOCK_SET_STATE;
            push(client_sk, port, 8080, set, 7, 2);
            push(server_sk, 8080, port, set, 10, 3);
            push(server_sk, 8080, port, set, 3, 1);
            push(client_sk, port, 8080, set, 2, 1);
            push(client_sk, port, 8080, set, 1, 4);
            push(server_sk, 8080, port, set, 1, 8);
            push(client_sk, port, 8080, set, 4, 5);
            push(server_sk, 8080, port, set, 8, 9);
            push(client_sk, port, 8080, set, 5, 7);
            push(client_sk, port, 8080, hook::TCP_DESTROY_SOCK, 7, 0);
            push(server_sk, 8080, port, set, 9, 7);
            push(server_sk, 8080, port, hook::TCP_DESTROY_SOCK, 7, 0);
        }
        evs
    }

    #[test]
    fn many_short_flows_keep_memory_bounded() {
        let hooks: Vec<HookStatus> = [
            "sock:inet_sock_set_state",
            "tcp:tcp_send_reset",
            "tcp:tcp_receive_reset",
            "tcp:tcp_destroy_sock",
        ]
        .iter()
        .map(|h| HookStatus {
            hook: h.to_string(),
            mechanism: Some(crate::attach::Mechanism::TpBtf),
            failures: Vec::new(),
            skipped: None,
        })
        .collect();
        let mut p = Pipeline::new(
            facts(),
            &hooks,
            model_params("6.18.0", &BTreeMap::new()),
            None,
            ReportOptions {
                json: true,
                view: View::Flows,
                pids: vec![],
                realtime_minus_mono_ns: 0,
                scope: Default::default(),
            },
            std::io::sink(),
        );
        // 36,000 connections (72,000 flows) in chunks of 6,000, 0.42 s of trace time each.
        let chunk = 6_000;
        let mut sizes = Vec::new();
        for i in 0..6 {
            let t0 = 1_000_000_000 + i * chunk * 70_000;
            for e in churn(i * chunk, chunk, t0) {
                p.event(&e).unwrap();
                if e.ts_ns % 50_000_000 < 1_000 {
                    p.tick(e.ts_ns).unwrap();
                }
            }
            p.tick(t0 + chunk * 70_000).unwrap();
            sizes.push(p.held());
        }
        eprintln!("held after each chunk: {sizes:?}");
        let summary = p.finish().unwrap();
        assert_eq!(summary["verdicts"]["conforms"], 2 * 6 * chunk, "{summary}");
        // What the tables hold levels off after the first chunks instead of growing with the
        // number of flows seen.
        let (early, late) = (sizes[2], sizes[5]);
        assert!(
            late.flows <= early.flows + early.flows / 10 + 100,
            "{sizes:?}"
        );
        assert!(late.reset_histories <= 16_384, "{sizes:?}");
        assert!(
            late.owners <= early.owners + early.owners / 10 + 100,
            "{sizes:?}"
        );
        // About a second of connections (their client ends' minisockets are not followed).
        assert!(late.flows < 20_000, "{sizes:?}");
    }

    #[test]
    fn events_and_flows_come_out_as_json_lines() {
        let mut p = pipeline(View::Both, true);
        for e in unread_close_stream() {
            p.event(&e).unwrap();
        }
        let summary = p.finish().unwrap();
        let text = String::from_utf8(p.out().clone()).unwrap();
        let kinds: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["type"].to_string())
            .collect();
        assert_eq!(kinds.iter().filter(|k| *k == "\"event\"").count(), 3);
        assert_eq!(
            kinds.iter().filter(|k| *k == "\"flow\"").count(),
            1,
            "{text}"
        );
        assert_eq!(summary["events"], 3);
        assert_eq!(summary["verdicts"]["conforms"], 1, "{summary}");
    }

    #[test]
    fn flows_view_prints_timelines_only() {
        let mut p = pipeline(View::Flows, false);
        for e in unread_close_stream() {
            p.event(&e).unwrap();
        }
        p.finish().unwrap();
        let text = String::from_utf8(p.out().clone()).unwrap();
        assert!(text.contains("TCP_ABORT_ON_CLOSE"), "{text}");
        assert!(
            !text.contains("send-rst   CLOSE"),
            "event lines leaked: {text}"
        );
    }

    #[test]
    fn params_follow_settings() {
        let mut s = BTreeMap::new();
        s.insert("net.ipv4.tcp_fin_timeout".to_string(), "7\n".to_string());
        s.insert("net.ipv4.tcp_rfc1337".to_string(), "1".to_string());
        let p = model_params("6.1.170", &s);
        assert_eq!(p.tcp_fin_timeout_secs, 7);
        assert!(p.tcp_rfc1337);
        assert!(!p.kernel.passive_reset_reasons);
    }
}
