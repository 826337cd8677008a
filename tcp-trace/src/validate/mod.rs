//! `tcp-trace validate`: the model against the running kernel. Built-in scenarios make real
//! connections between private network namespaces, the tracer watches, every flow is judged by
//! the model, and a table says, per scenario, what the model expects and what the kernel did.
//!
//! A scenario passes when every flow it produced conforms to the model (or is incomplete only
//! for lack of hooks), its focus flow went through the inputs the scenario is about, and its own
//! wire-level checks hold. The namespaces are anonymous: they disappear with the process, however
//! it ends.

pub mod lab;
pub mod netns;
pub mod rawtcp;
pub mod scenarios;

use std::time::Duration;

use anyhow::{Context, Result};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde::Serialize;
use serde_json::json;

use crate::{
    attach::{self, AttachOptions, Backend, HookStatus},
    decode,
    flows::{FlowConfig, FlowReport, FlowTable, Verdict, attached_hook_names},
    kernel::{self, btf::KernelFacts},
    live,
    model::{KernelGeneration, KernelVersion, ModelParams},
    owners::Owners,
};
use lab::{Collector, Dropper, Lab, Side};
use scenarios::{Ctx, RunNotes, SCENARIOS, Scenario};

pub struct ValidateOptions {
    pub scenarios: Vec<String>,
    pub json: bool,
    pub backend: Backend,
}

/// One scenario's result: a `--json` line with `"type": "scenario"`.
#[derive(Serialize)]
pub struct ScenarioResult {
    pub scenario: &'static str,
    pub about: &'static str,
    pub focus: Side,
    /// conforms / diverges / incomplete, or `failed` when the scenario itself went wrong.
    pub verdict: String,
    pub passed: bool,
    pub model_expects: String,
    pub kernel_did: String,
    /// Why it failed, or what could not be checked.
    pub detail: String,
    pub inputs: Vec<String>,
    pub checks: Vec<Check>,
    pub wire: Vec<String>,
    pub unchecked: Vec<String>,
    pub flows: Vec<FlowReport>,
}

#[derive(Serialize)]
pub struct Check {
    pub what: String,
    pub passed: bool,
}

/// The model's parameters for a flow in `ns`: this kernel plus that namespace's sysctls.
fn params_for(version: &KernelVersion, lab: &Lab, side: Side) -> Result<ModelParams> {
    let ns = lab.ns(side);
    let int = |key: &str| -> Result<i64> {
        ns.read_sysctl(key)?
            .parse()
            .with_context(|| format!("sysctl {key}"))
    };
    Ok(ModelParams {
        tcp_fin_timeout_secs: int("net.ipv4.tcp_fin_timeout")? as u32,
        tcp_rfc1337: int("net.ipv4.tcp_rfc1337")? != 0,
        tcp_orphan_retries: int("net.ipv4.tcp_orphan_retries")? as u32,
        ..ModelParams::for_generation(KernelGeneration::for_release(*version))
    })
}

/// Judges one scenario from its events.
#[allow(clippy::too_many_arguments)]
fn judge(
    s: &Scenario,
    lab: &Lab,
    notes: RunNotes,
    run_error: Option<anyhow::Error>,
    events: Vec<tcp_trace_common::Event>,
    facts: &KernelFacts,
    hooks: &[HookStatus],
    version: &KernelVersion,
    lost: bool,
) -> Result<ScenarioResult> {
    let mut reports = Vec::new();
    // Each side's flows are judged with that namespace's sysctls.
    for side in [Side::Client, Side::Server] {
        let mut config =
            FlowConfig::new(params_for(version, lab, side)?, attached_hook_names(hooks));
        config.hz = kernel::config_hz();
        let mut table = FlowTable::new(config);
        let mut owners = Owners::default();
        let netns = lab.ns(side).inode;
        for raw in events.iter().filter(|e| e.netns == netns) {
            let mut ev = decode::decode(raw, facts);
            owners.attribute(&mut ev);
            table.push(ev);
        }
        if lost {
            table.note_lost(0, 1);
        }
        reports.extend(table.flush().into_iter().filter(|r| r.teardown));
    }
    let (local, remote) = scenarios::focus_port(s, &notes);
    let focus_ns = lab.ns(s.focus).inode;
    let focus = reports.iter().find(|r| {
        r.key.netns == focus_ns
            && r.key.local.port() == local
            && remote.is_none_or(|p| r.key.remote.port() == p)
            && (remote.is_some() || r.key.remote.port() == 0)
    });

    let mut failures: Vec<String> = Vec::new();
    if let Some(e) = &run_error {
        failures.push(format!("the scenario did not run: {e:#}"));
    }
    for (what, ok) in &notes.checks {
        if !ok {
            failures.push(format!("check failed: {what}"));
        }
    }
    for r in &reports {
        if let Verdict::Diverges { .. } = r.verdict {
            failures.push(format!("{} > {}: {}", r.key.local, r.key.remote, r.verdict));
        }
    }
    let (verdict, model_expects, kernel_did, inputs, unchecked) = match focus {
        None => {
            failures.push("the focus flow was not seen".into());
            (
                "failed".to_string(),
                String::new(),
                String::new(),
                vec![],
                vec![],
            )
        }
        Some(f) => {
            // The scenario's inputs must appear in this order; those at a minisocket only where
            // its hook is attached.
            let tw_visible = hooks
                .iter()
                .any(|h| h.hook == "tcp_timewait_state_process" && h.attached());
            let mut it = f.inputs.iter();
            for want in s.script {
                let (want, at_tw) = match want.strip_suffix("@tw") {
                    Some(w) => (w, true),
                    None => (*want, false),
                };
                if at_tw && !tw_visible {
                    continue;
                }
                if !it.any(|i| i == want) {
                    failures.push(format!(
                        "the focus flow did not go through `{want}` (inputs: {})",
                        f.inputs.join(", ")
                    ));
                    break;
                }
            }
            let unchecked = match &f.verdict {
                Verdict::Conforms { unchecked, .. } => unchecked.clone(),
                Verdict::Incomplete { missing, reason } => {
                    let mut u = vec![reason.clone()];
                    u.extend(missing.iter().map(|m| format!("hook {m} not attached")));
                    u
                }
                Verdict::Diverges { .. } => vec![],
            };
            (
                f.verdict.label().to_string(),
                f.expected_summary().to_string(),
                f.observed_summary().to_string(),
                f.inputs.clone(),
                unchecked,
            )
        }
    };
    // The wire-level probe: what the model says comes back, against what did.
    let mut model_expects = model_expects;
    let mut kernel_did = kernel_did;
    if let Some(probe) = &s.probe {
        let expected = probe_expectation(probe, &params_for(version, lab, s.focus)?)?;
        model_expects.push_str(&format!(
            "; probe {} -> {expected:?}",
            probe.inputs.join(",")
        ));
        match notes.reply {
            Some(got) => {
                kernel_did.push_str(&format!("; probe -> {got:?}"));
                if got != expected {
                    failures.push(format!(
                        "probe {}: the model expects {expected:?} back, the kernel sent {got:?}",
                        probe.inputs.join(",")
                    ));
                }
            }
            None => failures.push("the probe was not sent".into()),
        }
    }
    // Incomplete only for want of hooks is a pass; incomplete for lost events is not.
    if let Some(f) = focus
        && let Verdict::Incomplete { reason, .. } = &f.verdict
        && lost
    {
        failures.push(format!("incomplete: {reason}"));
    }
    let passed = failures.is_empty();
    let detail = if passed {
        unchecked.join("; ")
    } else {
        failures.join("; ")
    };
    Ok(ScenarioResult {
        scenario: s.name,
        about: s.about,
        focus: s.focus,
        verdict: if run_error.is_some() {
            "failed".into()
        } else {
            verdict
        },
        passed,
        model_expects,
        kernel_did,
        detail,
        inputs,
        checks: notes
            .checks
            .into_iter()
            .map(|(what, passed)| Check { what, passed })
            .collect(),
        wire: notes.wire,
        unchecked,
        flows: reports,
    })
}

/// What the model says comes back on the wire after the probe's inputs.
fn probe_expectation(probe: &scenarios::Probe, params: &ModelParams) -> Result<scenarios::Reply> {
    use crate::model::{Model, State, Wire, parse_inputs};
    let start: State = probe
        .start
        .parse()
        .map_err(|e| anyhow::anyhow!("probe start {}: {e}", probe.start))?;
    let inputs =
        parse_inputs(&probe.inputs.join(",")).map_err(|e| anyhow::anyhow!("probe inputs: {e}"))?;
    let steps = Model::with_state(*params, start).run(&inputs);
    let wire = steps
        .last()
        .map(|s| s.outcome.wire.clone())
        .unwrap_or_default();
    Ok(
        if wire
            .iter()
            .any(|w| matches!(w, Wire::RstReply | Wire::RstActive))
        {
            scenarios::Reply::Rst
        } else if wire.iter().any(|w| {
            matches!(
                w,
                Wire::AckImmediate | Wire::ChallengeAck | Wire::AckDelayed
            )
        }) {
            scenarios::Reply::Ack
        } else {
            scenarios::Reply::Nothing
        },
    )
}

pub fn list() -> String {
    let mut out = String::from("scenarios:\n");
    for s in SCENARIOS {
        out.push_str(&format!("  {:<22} {}\n", s.name, s.about));
    }
    out
}

pub fn run(opts: ValidateOptions) -> Result<u8> {
    if opts.scenarios.iter().any(|s| s == "list") {
        print!("{}", list());
        return Ok(0);
    }
    let chosen: Vec<&Scenario> = if opts.scenarios.is_empty() {
        SCENARIOS.iter().collect()
    } else {
        opts.scenarios
            .iter()
            .map(|n| scenarios::find(n))
            .collect::<Result<_>>()?
    };
    let prep = live::prepare(&[])?;
    let version: KernelVersion = kernel::kernel_version()
        .parse()
        .map_err(|e| anyhow::anyhow!("kernel version: {e}"))?;
    let mut attached = attach::attach(
        &prep.facts,
        &AttachOptions {
            stacks: false,
            backend: opts.backend,
            pids: vec![],
            ports: vec![],
            cgroups: vec![],
            netns: vec![],
            kernel_log: false,
            buffer_size: attach::DEFAULT_BUFFER_SIZE,
        },
    )?;
    if !opts.json {
        live::report_hooks(&attached.hooks, opts.backend, &prep.release);
    }
    let collector = Collector::start(&mut attached.ebpf)?;
    let mut dropper = Dropper::load(&mut attached.ebpf)?;
    // An idle lab with the dropper attached for the whole run. Attaching a tc program enables
    // kernel static keys (tcx, or the egress qdisc hook), and the last detach disables them:
    // both patch kernel text while other CPUs run. Holding one attachment keeps the keys on, so
    // the per-scenario attachments and namespace teardowns patch nothing. (Seen under qemu's
    // emulation: an int3 oops in __dev_queue_xmit during that patching.)
    let anchor = Lab::new().context("building the anchor namespaces")?;
    dropper.attach(&mut attached.ebpf, &anchor)?;
    let mut results = Vec::new();
    for s in chosen {
        if !opts.json {
            eprintln!("tcp-trace: validate: {} ...", s.name);
        }
        let lab = Lab::new().with_context(|| format!("{}: building the namespaces", s.name))?;
        for (side, key, value) in s.sysctls {
            lab.ns(*side).sysctl(key, value)?;
        }
        dropper.attach(&mut attached.ebpf, &lab)?;
        dropper.clear()?;
        let lost_before = collector.lost();
        let started = live::now_ns(libc::CLOCK_MONOTONIC);
        let mut ctx = Ctx {
            lab: &lab,
            dropper: &mut dropper,
            notes: Default::default(),
        };
        let run_error = (s.run)(&mut ctx).err();
        let notes = ctx.notes;
        // Let the last segments and the ring buffer drain.
        std::thread::sleep(Duration::from_millis(300));
        let events = collector.events_in(&lab.netns(), started);
        let lost = collector.lost() > lost_before;
        let result = judge(
            s,
            &lab,
            notes,
            run_error,
            events,
            &prep.facts,
            &attached.hooks,
            &version,
            lost,
        )?;
        if opts.json {
            let mut v = serde_json::to_value(&result)?;
            v["type"] = "scenario".into();
            println!("{v}");
        }
        results.push(result);
    }
    let lost = collector.lost();
    collector.stop();
    drop(anchor);
    let failed = results.iter().filter(|r| !r.passed).count();
    if opts.json {
        println!(
            "{}",
            json!({
                "type": "validate",
                "kernel": prep.release,
                "version": version.to_string(),
                "backend": opts.backend,
                "hooks": attached.hooks,
                "scenarios": results.len(),
                "passed": results.len() - failed,
                "failed": failed,
                "lost": lost,
            })
        );
    } else {
        print_table(&results, &version, opts.backend);
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn print_table(results: &[ScenarioResult], version: &KernelVersion, backend: Backend) {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_content_arrangement(ContentArrangement::Dynamic);
    table.set_header(["scenario", "model expects", "kernel did", "verdict"]);
    for r in results {
        let mut kernel_did = r.kernel_did.clone();
        for w in &r.wire {
            kernel_did.push_str(&format!("\n{w}"));
        }
        let verdict = if r.passed {
            r.verdict.clone()
        } else {
            format!("FAILED ({})\n{}", r.verdict, r.detail)
        };
        table.add_row([
            r.scenario.to_string(),
            r.model_expects.clone(),
            kernel_did,
            verdict,
        ]);
    }
    println!("Model vs kernel {version} (backend {backend}):");
    println!("{table}");
    let unchecked: Vec<_> = results
        .iter()
        .filter(|r| r.passed && !r.unchecked.is_empty())
        .collect();
    if !unchecked.is_empty() {
        println!("Not checked with the hooks attached here:");
        for r in unchecked {
            println!("  {}: {}", r.scenario, r.unchecked.join("; "));
        }
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    println!("{} passed, {failed} failed", results.len() - failed);
}
