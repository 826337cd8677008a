//! `cargo xtask golden`: refreshes the golden recordings that `cargo test` replays
//! (tcp-trace/tests/golden.rs) from the latest VM matrix run. Each small
//! `target/vm-recordings/<kernel>/<backend>/<scenario>.tt` whose header carries what live
//! validate judged of its flows (`live_flows`, written by `validate --record-dir`) is copied to
//! `tcp-trace/tests/data/golden/<kernel>/<backend>/`, with those verdicts as `<scenario>.json`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::helpers;

/// Recordings larger than this are left out (the golden set stays small in the repository).
const MAX_RECORDING_BYTES: u64 = 48 << 10;
/// The whole golden set at most.
const MAX_TOTAL_BYTES: u64 = 2 << 20;

fn say(msg: impl AsRef<str>) {
    eprintln!("[golden] {}", msg.as_ref());
}

/// The JSON header of a recording (docs/record-format.md): magic, version, length, JSON.
fn header(bytes: &[u8]) -> Result<Value> {
    if bytes.len() < 16 || &bytes[..8] != b"TCPTRACE" {
        bail!("not a tcp-trace recording");
    }
    let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    let json = bytes
        .get(16..16 + len)
        .context("the header is longer than the file")?;
    serde_json::from_slice(json).context("the header is not JSON")
}

/// Every `<kernel>/<backend>/<scenario>.tt` under `from`, sorted.
fn recordings(from: &Path) -> Result<Vec<(String, String, PathBuf)>> {
    let mut out = Vec::new();
    for kernel in std::fs::read_dir(from).with_context(|| format!("{}", from.display()))? {
        let kernel = kernel?.path();
        for backend in std::fs::read_dir(&kernel)?.flatten() {
            for file in std::fs::read_dir(backend.path())?.flatten() {
                let path = file.path();
                if path.extension().is_some_and(|x| x == "tt") {
                    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
                    out.push((name(&kernel), name(&backend.path()), path));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn run(from: Option<PathBuf>) -> Result<()> {
    let root = helpers::workspace_root();
    let from = from.unwrap_or_else(|| root.join("target/vm-recordings"));
    let dest = root.join("tcp-trace/tests/data/golden");
    let found = recordings(&from)?;
    if found.is_empty() {
        bail!(
            "no recordings in {}: run `cargo xtask vm-test` first (or name a directory of \
             <kernel>/<backend>/<scenario>.tt with --from)",
            from.display()
        );
    }
    let mut total: u64 = 0;
    let (mut kept, mut too_big, mut unjudged, mut lossy) = (0, 0, 0, 0);
    let mut cleared = std::collections::BTreeSet::new();
    for (kernel, backend, path) in &found {
        let bytes = std::fs::read(path)?;
        let scenario = path.file_stem().unwrap().to_string_lossy().into_owned();
        let h = header(&bytes).with_context(|| path.display().to_string())?;
        let flows = h["live_flows"].as_array().cloned().unwrap_or_default();
        if flows.is_empty() {
            unjudged += 1;
            continue;
        }
        // The end-of-trace record's lost total (the file's last 8 bytes): validate judges a
        // run that lost events differently from replay (it holds every flow to the end).
        // The end record is tag 'Z', length 16 (u16 LE), then events and lost (u64 LE each); a
        // recording without it was cut short and is left out like a lossy one.
        let end = bytes.len().checked_sub(19).map(|at| &bytes[at..]);
        let lost_total = match end {
            Some(end) if end[0] == b'Z' && end[1..3] == 16u16.to_le_bytes() => {
                u64::from_le_bytes(end[11..19].try_into().expect("8 bytes"))
            }
            _ => u64::MAX,
        };
        if lost_total > 0 {
            lossy += 1;
            continue;
        }
        if bytes.len() as u64 > MAX_RECORDING_BYTES || total + bytes.len() as u64 > MAX_TOTAL_BYTES
        {
            too_big += 1;
            continue;
        }
        let dir = dest.join(kernel).join(backend);
        // What this run refreshes replaces what was there, recording by recording directory.
        if cleared.insert(dir.clone()) {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
        }
        std::fs::write(dir.join(format!("{scenario}.tt")), &bytes)?;
        let expected = json!({
            "kernel": h["kernel_release"],
            "backend": backend,
            "scenario": scenario,
            "flows": flows,
        });
        std::fs::write(
            dir.join(format!("{scenario}.json")),
            serde_json::to_string_pretty(&expected)? + "\n",
        )?;
        total += bytes.len() as u64;
        kept += 1;
    }
    say(format!(
        "{kept} recordings ({total} bytes) in {}; left out: {too_big} too large, {lossy} that \
         lost events or were cut short, {unjudged} without live verdicts (recorded by an older tcp-trace)",
        dest.display()
    ));
    if kept == 0 {
        bail!("no recording was kept");
    }
    Ok(())
}
