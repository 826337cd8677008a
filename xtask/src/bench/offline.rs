//! Offline replay: throughput on one core and peak memory, on a synthetic recording
//! ([`super::synth`]) behind the header of a real recording made on this machine.

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    synth::{self, Shape},
    tracer::{self, Binaries},
};
use crate::helpers;

/// One way of replaying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    pub label: &'static str,
    pub args: &'static [&'static str],
}

pub const FLOWS: Mode = Mode {
    label: "--json --view flows",
    args: &["--json", "--view", "flows"],
};
pub const EVENTS: Mode = Mode {
    label: "--json --view events",
    args: &["--json", "--view", "events"],
};
pub const MODES: [Mode; 2] = [FLOWS, EVENTS];

/// One replay, measured.
#[derive(Clone, Copy, Debug)]
pub struct ReplayRun {
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    pub max_rss_kib: u64,
    /// tcp-trace's exit status (one of those the caller accepted).
    pub status: i32,
}

/// The header of a real recording of this machine: `tcp-trace record` for a moment.
pub fn record_header(bins: &Binaries, dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join("header.tt");
    let mut cmd = helpers::as_root(&bins.tcp_trace)?;
    cmd.args(["record", "--duration", "300ms", "-o"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = cmd
        .output()
        .with_context(|| format!("could not run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "tcp-trace record failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut bytes = Vec::new();
    File::open(&path)
        .with_context(|| format!("opening {}", path.display()))?
        .read_to_end(&mut bytes)?;
    let header = synth::header_of(&bytes)?.to_vec();
    // Root made it; it is ours to remove (the directory is).
    let _ = std::fs::remove_file(&path);
    Ok(header)
}

/// Writes a synthetic recording of `shape` to `path`.
pub fn write(path: &Path, header: &[u8], shape: Shape) -> Result<()> {
    let reason = synth::abort_on_close_reason(header)?;
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    synth::write_recording(file, header, shape, reason)?;
    Ok(())
}

/// Replays `file` once with its output captured; checks the summary's event count and that
/// every flow conforms. Returns the verdict counts.
pub fn check(bin: &Path, file: &Path, shape: Shape) -> Result<Vec<(String, u64)>> {
    let out = Command::new(bin)
        .arg("replay")
        .arg(file)
        .args(["--json", "--view", "flows"])
        .stdin(Stdio::null())
        .output()
        .context("running tcp-trace replay")?;
    let summary = tracer::json_summary(&out.stdout).with_context(|| {
        format!(
            "tcp-trace replay printed no summary ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if summary.events != shape.events {
        bail!(
            "replay saw {} events of {} written",
            summary.events,
            shape.events
        );
    }
    if !out.status.success() {
        bail!(
            "tcp-trace replay exited {}: verdicts {:?}",
            out.status,
            summary.verdicts
        );
    }
    Ok(summary.verdicts)
}

/// Replays `file` in `mode`, output to /dev/null, pinned to CPU 0 when taskset exists. An exit
/// status outside `accept` fails (a real recording may hold lost events, 3, or a divergent flow,
/// 6: still a replay to time).
pub fn replay_once(bin: &Path, file: &Path, mode: Mode, accept: &[i32]) -> Result<ReplayRun> {
    let mut cmd = match helpers::which("taskset") {
        Some(taskset) => {
            let mut c = Command::new(taskset);
            c.args(["-c", "0"]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("replay")
        .arg(file)
        .args(mode.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not run {cmd:?}"))?;
    let usage = tracer::wait_with_rusage(&mut child, Duration::from_secs(3600))?;
    let wall_seconds = start.elapsed().as_secs_f64();
    if !accept.contains(&usage.status) {
        bail!("{cmd:?} exited {}", usage.status);
    }
    Ok(ReplayRun {
        wall_seconds,
        cpu_seconds: usage.cpu_seconds,
        max_rss_kib: usage.max_rss_kib,
        status: usage.status,
    })
}

/// A scratch directory, removed on drop unless kept.
pub struct Scratch(pub PathBuf, pub bool);

impl Scratch {
    /// `tcp-trace-bench-PID-TAG` under the temporary directory (the replay recordings: a GB for
    /// 1M flows).
    pub fn new(tag: &str) -> Result<Scratch> {
        Scratch::under(&std::env::temp_dir(), tag)
    }

    /// The same on tmpfs (/dev/shm) when there is one: tracer output there costs a memory copy,
    /// as /dev/null would, without disk writeback competing with the churn.
    pub fn tmpfs(tag: &str) -> Result<Scratch> {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            Scratch::under(shm, tag)
        } else {
            Scratch::new(tag)
        }
    }

    /// `dir` itself, kept afterwards (`--keep-recordings`: to profile a replay by hand).
    pub fn kept(dir: &Path) -> Result<Scratch> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir.to_path_buf(), true))
    }

    fn under(parent: &Path, tag: &str) -> Result<Scratch> {
        let dir = parent.join(format!("tcp-trace-bench-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir, false))
    }

    /// Removes a recording once measured, unless the directory is kept.
    pub fn done_with(&self, file: &Path) {
        if !self.1 {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
