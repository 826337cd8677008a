//! `tcp-trace validate`: the model against the running kernel. Built-in scenarios make real
//! connections between private network namespaces, the tracer watches, every flow is judged by
//! the model, and a table says, per scenario, what the model expects and what the kernel did.

pub mod lab;
pub mod netns;
pub mod rawtcp;
pub mod scenarios;

use std::time::Duration;

use anyhow::{Context, Result};

use crate::{
    attach::{self, AttachOptions, Backend},
    decode, live,
    owners::Owners,
};
use lab::{Collector, Dropper, Lab};
use scenarios::{Ctx, SCENARIOS, Scenario};

pub struct ValidateOptions {
    pub scenarios: Vec<String>,
    pub json: bool,
    pub backend: Backend,
}

pub fn run(opts: ValidateOptions) -> Result<u8> {
    let chosen: Vec<&Scenario> = if opts.scenarios.is_empty() {
        SCENARIOS.iter().collect()
    } else {
        opts.scenarios
            .iter()
            .map(|n| scenarios::find(n))
            .collect::<Result<_>>()?
    };
    let prep = live::prepare(&[])?;
    let mut attached = attach::attach(
        &prep.facts,
        &AttachOptions {
            backend: opts.backend,
            pids: vec![],
            ports: vec![],
            kernel_log: false,
        },
    )?;
    live::report_hooks(&attached.hooks, opts.backend, &prep.release);
    let collector = Collector::start(&mut attached.ebpf)?;
    let mut dropper = Dropper::load(&mut attached.ebpf)?;
    for s in chosen {
        let lab = Lab::new().with_context(|| format!("{}: building the namespaces", s.name))?;
        for (side, key, value) in s.sysctls {
            lab.ns(*side).sysctl(key, value)?;
        }
        dropper.attach(&mut attached.ebpf, &lab)?;
        dropper.clear()?;
        let mut ctx = Ctx {
            lab: &lab,
            dropper: &mut dropper,
            notes: Default::default(),
        };
        let started = live::now_ns(libc::CLOCK_MONOTONIC);
        let result = (s.run)(&mut ctx);
        std::thread::sleep(Duration::from_millis(300));
        let notes = ctx.notes;
        let events = collector.events_in(&lab.netns(), started);
        let mut owners = Owners::default();
        println!("== {} ({:?}) notes={:?}", s.name, result.err(), notes);
        for e in &events {
            let mut t = decode::decode(e, &prep.facts);
            owners.attribute(&mut t);
            println!("{}", live::human_line(&t, t.ts_ns));
        }
    }
    collector.stop();
    Ok(0)
}
