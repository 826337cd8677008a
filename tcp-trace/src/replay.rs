//! `tcp-trace replay FILE`: a recording, offline and without root: the same decoding, owners,
//! flows, verdicts and output as the live tracer, from the kernel facts the recording carries.

use std::{fs::File, io::Read, io::Write, path::Path};

use anyhow::{Context, Result, bail};

use crate::{
    exit,
    live::KERNEL_VERSION_KEY,
    pipeline::{self, Pipeline},
    record::{Record, RecordError, RecordHeader, RecordReader},
    report::{ReportOptions, View},
};

pub struct ReplayOptions {
    pub json: bool,
    pub view: View,
    pub pids: Vec<u32>,
}

/// What a replay saw, besides what it printed.
pub struct Replayed {
    pub events: u64,
    pub lost: u64,
    pub diverged: bool,
    /// The summary line (`"type": "summary"`).
    pub summary: serde_json::Value,
    /// The summary table (text mode).
    pub table: String,
    /// The recording stops early (cut short or unfinished): what was in it was replayed.
    pub cut_short: Option<RecordError>,
}

/// The kernel version the recording's model parameters are for.
fn recorded_version(header: &RecordHeader) -> String {
    header
        .sysctls
        .get(KERNEL_VERSION_KEY)
        .cloned()
        .unwrap_or_else(|| header.kernel_release.clone())
}

/// Replays `reader`'s records through the pipeline, printing to `out` as `opts` says (the
/// `start` line is the caller's). `source` names the recording in errors. Shared by the CLI, the
/// golden-recording tests and the fuzzer, so that all three judge exactly alike.
pub fn replay<R: Read, W: Write>(
    header: &RecordHeader,
    reader: RecordReader<R>,
    opts: ReplayOptions,
    out: W,
    source: &str,
) -> Result<Replayed> {
    let version = recorded_version(header);
    let hz = header.sysctls.get("kernel.hz").and_then(|v| v.parse().ok());
    let json = opts.json;
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
        out,
    );
    if let Some(ts) = header.attached_ns {
        pipeline.attached_at(ts);
    }
    // Each namespace the recording describes is judged with its own settings.
    for (netns, settings) in &header.netns {
        pipeline.judge_netns_with(
            *netns,
            pipeline::netns_params(&version, &header.facts, settings),
        );
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
                    next_tick = last_ts.saturating_add(pipeline::RELEASE_TICK_NS);
                }
            }
            Ok(Record::Lost { ts_ns, total }) => pipeline.lost(ts_ns, total)?,
            Ok(Record::End { .. }) => {}
            Err(e) if e.is_cut_short() => {
                cut_short = Some(e);
                break;
            }
            Err(e) => bail!("{source}: {e}"),
        }
    }
    let summary = pipeline.finish()?;
    if json {
        writeln!(pipeline.out(), "{summary}")?;
        pipeline.out().flush()?;
    }
    Ok(Replayed {
        events: pipeline.events,
        lost: pipeline.lost,
        diverged: pipeline.diverged(),
        table: pipeline.summary_table(&header.hooks),
        summary,
        cut_short,
    })
}

pub fn run(path: &Path, opts: ReplayOptions) -> Result<u8> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (header, reader) =
        RecordReader::open(file).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let json = opts.json;
    if json {
        let start = serde_json::json!({
            "type": "start",
            "recording": path.display().to_string(),
            "kernel": header.kernel_release,
            "version": recorded_version(&header),
            "backend": header.backend,
            "hooks": header.hooks,
        });
        writeln!(stdout, "{start}")?;
    }
    let source = path.display().to_string();
    let replayed = replay(&header, reader, opts, stdout, &source)?;
    if !json {
        eprintln!("{}", replayed.table);
        eprintln!(
            "tcp-trace: replayed {} events from {} (kernel {}), {} lost while recording",
            replayed.events,
            path.display(),
            header.kernel_release,
            replayed.lost
        );
    }
    if let Some(e) = replayed.cut_short {
        eprintln!("tcp-trace: warning: {}: {e}", path.display());
        return Ok(exit::CUT_SHORT);
    }
    Ok(if replayed.diverged {
        exit::DIVERGED
    } else {
        exit::OK
    })
}
