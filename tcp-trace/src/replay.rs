//! `tcp-trace replay FILE`: a recording, offline and without root: the same decoding, owners,
//! flows, verdicts and output as the live tracer, from the kernel facts the recording carries.

use std::{fs::File, io::Write, path::Path};

use anyhow::{Context, Result, bail};

use crate::{
    exit,
    live::KERNEL_VERSION_KEY,
    pipeline::{self, Pipeline},
    record::{Record, RecordReader},
    report::{ReportOptions, View},
};

pub struct ReplayOptions {
    pub json: bool,
    pub view: View,
    pub pids: Vec<u32>,
}

/// Trace time between releases of ended flows (the live tracer's drain tick).
const REPLAY_TICK_NS: u64 = 50_000_000;

pub fn run(path: &Path, opts: ReplayOptions) -> Result<u8> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (header, reader) =
        RecordReader::open(file).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let version = header
        .sysctls
        .get(KERNEL_VERSION_KEY)
        .cloned()
        .unwrap_or_else(|| header.kernel_release.clone());
    let hz = header.sysctls.get("kernel.hz").and_then(|v| v.parse().ok());
    let stdout = std::io::stdout().lock();
    let mut pipeline = Pipeline::new(
        header.facts.clone(),
        &header.hooks,
        pipeline::model_params(&version, &header.sysctls).with_detected(header.facts.detected()),
        hz,
        ReportOptions {
            json: opts.json,
            view: opts.view,
            pids: opts.pids,
            realtime_minus_mono_ns: header.realtime_minus_monotonic_ns,
            scope: Default::default(),
        },
        std::io::BufWriter::new(stdout),
    );
    if opts.json {
        let start = serde_json::json!({
            "type": "start",
            "recording": path.display().to_string(),
            "kernel": header.kernel_release,
            "version": version,
            "backend": header.backend,
            "hooks": header.hooks,
        });
        writeln!(pipeline.out(), "{start}")?;
    }
    let mut cut_short = None;
    let mut last_ts = 0;
    let mut next_tick = 0;
    for record in reader {
        match record {
            Ok(Record::Event(ev)) => {
                last_ts = last_ts.max(ev.ts_ns);
                pipeline.event(&ev)?;
                // Keep memory bounded on long recordings: release ended flows as trace time
                // passes, as often as the live tracer does (every 50 ms), not per event.
                if last_ts >= next_tick {
                    pipeline.tick(last_ts)?;
                    next_tick = last_ts + REPLAY_TICK_NS;
                }
            }
            Ok(Record::Lost { ts_ns, total }) => pipeline.lost(ts_ns, total)?,
            Ok(Record::End { .. }) => {}
            Err(e) if e.is_cut_short() => {
                cut_short = Some(e);
                break;
            }
            Err(e) => bail!("{}: {e}", path.display()),
        }
    }
    let summary = pipeline.finish()?;
    if opts.json {
        writeln!(pipeline.out(), "{summary}")?;
        pipeline.out().flush()?;
    } else {
        eprintln!("{}", pipeline.summary_table(&header.hooks));
        eprintln!(
            "tcp-trace: replayed {} events from {} (kernel {}), {} lost while recording",
            pipeline.events,
            path.display(),
            header.kernel_release,
            pipeline.lost
        );
    }
    if let Some(e) = cut_short {
        eprintln!("tcp-trace: warning: {}: {e}", path.display());
        return Ok(exit::CUT_SHORT);
    }
    Ok(if pipeline.diverged() {
        exit::DIVERGED
    } else {
        exit::OK
    })
}
