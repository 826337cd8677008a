//! Golden recordings: real kernels' events for each validate scenario (this machine's
//! tracepoints and the VM matrix's kernels x backends), kept in tests/data/golden/<kernel>/
//! <backend>/<scenario>.tt beside what live `validate` judged of each flow (<scenario>.json).
//! Each is replayed through the pipeline `tcp-trace replay` uses, without root, and must be
//! judged exactly as live: same flows, verdicts, inputs and checked/unchecked step counts.
//! Refreshed by `cargo xtask golden`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tcp_trace::{
    record::{JudgedFlow, RecordReader},
    replay::{ReplayOptions, replay},
    report::View,
};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

/// Every `<kernel>/<backend>/<scenario>.tt`, sorted.
fn recordings() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![golden_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "tt") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The flows a replay of `path` judged, sorted.
fn replayed_flows(path: &Path) -> Vec<JudgedFlow> {
    let file = std::fs::File::open(path).unwrap();
    let (header, reader) = RecordReader::open(file).unwrap();
    let mut out = Vec::new();
    let replayed = replay(
        &header,
        reader,
        ReplayOptions {
            json: true,
            view: View::Flows,
            pids: vec![],
        },
        &mut out,
        &path.display().to_string(),
    )
    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    assert!(
        replayed.cut_short.is_none(),
        "{}: cut short",
        path.display()
    );
    let mut flows: Vec<JudgedFlow> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "flow")
        .map(|v| JudgedFlow::from_flow_json(&v).expect("a flow line with key and verdict"))
        .collect();
    flows.sort();
    flows
}

/// What live validate judged, from `<scenario>.json`.
fn live_flows(path: &Path) -> Vec<JudgedFlow> {
    let json = path.with_extension("json");
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("{}: {e} (refresh with cargo xtask golden)", json.display()));
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut flows: Vec<JudgedFlow> = serde_json::from_value(v["flows"].clone()).unwrap();
    flows.sort();
    flows
}

#[test]
fn golden_recordings_replay_as_live_judged_them() {
    let all = recordings();
    // The host's tracepoint run at least, and VM kernels: a missing directory is a failure, not
    // a vacuous pass.
    assert!(
        all.len() >= 20,
        "only {} golden recordings in {}",
        all.len(),
        golden_dir().display()
    );
    // Every kernel of the VM matrix with a function-hook backend (kprobe), so that the hooks
    // tracepoints cannot show are replayed too.
    for kernel in ["5.10", "6.1", "6.12", "6.18", "7.x"] {
        let dir = golden_dir().join(kernel).join("kprobe");
        assert!(
            all.iter().any(|p| p.starts_with(&dir)),
            "no golden recordings in {} (refresh them with `cargo xtask golden` after a matrix run)",
            dir.display()
        );
    }
    let mut mismatches = Vec::new();
    let mut flows = 0;
    for path in &all {
        let live = live_flows(path);
        assert!(!live.is_empty(), "{}: no live flows", path.display());
        // The expected file is the recording's own record of the live verdicts.
        let (header, _) = RecordReader::open(std::fs::File::open(path).unwrap()).unwrap();
        let mut embedded = header.live_flows.clone();
        embedded.sort();
        assert_eq!(embedded, live, "{}: expected file is stale", path.display());
        let replayed = replayed_flows(path);
        flows += live.len();
        if replayed != live {
            mismatches.push(format!(
                "{}:\n  live:     {live:?}\n  replayed: {replayed:?}",
                path.strip_prefix(golden_dir()).unwrap_or(path).display()
            ));
        }
    }
    eprintln!("{} recordings, {flows} flows replayed", all.len());
    assert!(
        mismatches.is_empty(),
        "{} of {} recordings judged differently from live:\n{}",
        mismatches.len(),
        all.len(),
        mismatches.join("\n")
    );
}
