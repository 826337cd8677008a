//! The kernel's own count of aborts: the TcpExt counters of /proc/net/netstat, read per network
//! namespace at the start and at the end of a run, against what the trace diagnosed in between.
//!
//! Parsing and arithmetic are pure ([`parse_netstat`], [`tcp_ext`], [`deltas`], [`check`]);
//! [`WatchedNetns`] does the I/O: it keeps a descriptor of each namespace (so the namespace
//! outlives the process it was found through) and reads its counters from a short-lived thread
//! that setns()'s into it and reads /proc/thread-self/net/netstat.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use super::ResetDiagnosis;

/// The TcpExt counters of teardown aborts, in the order the tables show them.
pub(crate) const ABORT_COUNTERS: [&str; 5] = [
    "TCPAbortOnClose",
    "TCPAbortOnData",
    "TCPAbortOnLinger",
    "TCPAbortOnMemory",
    "TCPAbortOnTimeout",
];

/// /proc/net/netstat: pairs of lines, `Prefix: name name ...` then `Prefix: value value ...`.
/// Returns prefix (`TcpExt`, `IpExt`, ...) -> name -> value.
pub(crate) fn parse_netstat(text: &str) -> Result<BTreeMap<String, BTreeMap<String, u64>>> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    while let Some(names) = lines.next() {
        let (prefix, names) = names
            .split_once(':')
            .ok_or_else(|| anyhow!("netstat: a line without `Prefix:`: {names:?}"))?;
        let values = lines
            .next()
            .ok_or_else(|| anyhow!("netstat: {prefix} has names but no values"))?;
        let (vprefix, values) = values
            .split_once(':')
            .ok_or_else(|| anyhow!("netstat: a line without `Prefix:`: {values:?}"))?;
        if vprefix != prefix {
            bail!("netstat: {prefix} names followed by {vprefix} values");
        }
        let names: Vec<&str> = names.split_whitespace().collect();
        let values: Vec<&str> = values.split_whitespace().collect();
        if names.len() != values.len() {
            bail!(
                "netstat: {prefix} has {} names but {} values",
                names.len(),
                values.len()
            );
        }
        let mut map = BTreeMap::new();
        for (n, v) in names.iter().zip(&values) {
            let v: u64 = v
                .parse()
                .map_err(|_| anyhow!("netstat: {prefix} {n} = {v:?} is not a number"))?;
            map.insert(n.to_string(), v);
        }
        out.insert(prefix.to_string(), map);
    }
    Ok(out)
}

/// The TcpExt counters of a /proc/net/netstat text.
pub(crate) fn tcp_ext(text: &str) -> Result<BTreeMap<String, u64>> {
    parse_netstat(text)?
        .remove("TcpExt")
        .ok_or_else(|| anyhow!("netstat has no TcpExt lines"))
}

/// How much each abort counter grew from `before` to `after`. A counter that is missing or went
/// backwards (a different namespace, or a reset) is an error.
pub(crate) fn deltas(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> Result<BTreeMap<&'static str, u64>> {
    ABORT_COUNTERS
        .iter()
        .map(|&name| {
            let (b, a) = match (before.get(name), after.get(name)) {
                (Some(b), Some(a)) => (*b, *a),
                _ => bail!("TcpExt {name} is missing from /proc/net/netstat"),
            };
            let d = a
                .checked_sub(b)
                .ok_or_else(|| anyhow!("TcpExt {name} went backwards ({b} -> {a})"))?;
            Ok((name, d))
        })
        .collect()
}

/// What the diagnoses of one namespace should have added to the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Tally {
    /// Certain or derived diagnoses: each bumped its counter.
    pub(crate) exact: BTreeMap<&'static str, u64>,
    /// Guesses: each may have bumped one of its counters (or none).
    pub(crate) possible: BTreeMap<&'static str, u64>,
    /// Guesses with at least one counter: each bumps at most one, so the sum over all counters
    /// lies in [sum of exact, sum of exact + guesses].
    pub(crate) guesses: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, d: &ResetDiagnosis) {
        let (exact, possible) = d.tally_counters();
        if let Some(c) = exact {
            *self.exact.entry(c).or_default() += 1;
        }
        for c in &possible {
            *self.possible.entry(c).or_default() += 1;
        }
        if !possible.is_empty() {
            self.guesses += 1;
        }
    }

    /// Whether any diagnosis here involves a counter.
    pub(crate) fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.possible.is_empty()
    }
}

/// The outcome of comparing one counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum CheckVerdict {
    /// The kernel counted exactly what tcp-trace diagnosed.
    Ok,
    /// Within the range the guesses allow.
    OkWithinGuesses,
    /// At one end of that range, which settles the guesses: none of them bumped the counter
    /// (the kernel's count is what was certain), or all of them did.
    OkGuessesSettled,
    /// More in the kernel than traced, and the trace was filtered (--pid/--port): the rest is
    /// traffic outside the filter.
    OkOutsideFilter,
    /// tcp-trace claims more than the kernel counted, or (unfiltered) fewer.
    Mismatch,
}

impl CheckVerdict {
    pub(crate) fn label(self) -> &'static str {
        match self {
            CheckVerdict::Ok => "ok",
            CheckVerdict::OkWithinGuesses => "ok (within guesses)",
            CheckVerdict::OkGuessesSettled => "ok (guesses settled)",
            CheckVerdict::OkOutsideFilter => "ok (rest outside the filter)",
            CheckVerdict::Mismatch => "MISMATCH",
        }
    }
}

/// One row of the counter check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct CounterRow {
    /// A TcpExt counter, or `all` (their sum).
    pub(crate) counter: String,
    pub(crate) kernel_delta: u64,
    /// What tcp-trace diagnosed for certain (certain + derived).
    pub(crate) traced: u64,
    /// ... plus what its guesses may add.
    pub(crate) traced_max: u64,
    pub(crate) verdict: CheckVerdict,
    pub(crate) detail: String,
}

fn row(counter: &str, delta: u64, min: u64, max: u64, filtered: bool) -> CounterRow {
    let (verdict, detail) = if delta < min {
        (
            CheckVerdict::Mismatch,
            format!(
                "tcp-trace claims {} more than the kernel counted",
                min - delta
            ),
        )
    } else if delta > max {
        if filtered {
            (
                CheckVerdict::OkOutsideFilter,
                format!("{} by traffic outside the --pid/--port filter", delta - max),
            )
        } else {
            (
                CheckVerdict::Mismatch,
                format!(
                    "the kernel counted {} that tcp-trace did not see",
                    delta - max
                ),
            )
        }
    } else if min == max {
        (CheckVerdict::Ok, String::new())
    } else if delta == min {
        (
            CheckVerdict::OkGuessesSettled,
            format!(
                "the kernel's {delta} settles {} guessed: none of them counted here",
                max - min
            ),
        )
    } else if delta == max {
        (
            CheckVerdict::OkGuessesSettled,
            format!(
                "the kernel's {delta} settles {} guessed: all of them counted here",
                max - min
            ),
        )
    } else {
        (
            CheckVerdict::OkWithinGuesses,
            format!("{} guessed: between {min} and {max}", max - min),
        )
    };
    CounterRow {
        counter: counter.to_string(),
        kernel_delta: delta,
        traced: min,
        traced_max: max,
        verdict,
        detail,
    }
}

/// Compares the kernel's deltas with the tally: one row per abort counter and one for their sum.
/// `filtered`: the trace saw only part of the namespace's traffic (--pid/--port), so the kernel
/// may count more, never less.
pub(crate) fn check(
    deltas: &BTreeMap<&'static str, u64>,
    tally: &Tally,
    filtered: bool,
) -> Vec<CounterRow> {
    let mut rows: Vec<CounterRow> = ABORT_COUNTERS
        .iter()
        .map(|&c| {
            let min = tally.exact.get(c).copied().unwrap_or(0);
            let max = min + tally.possible.get(c).copied().unwrap_or(0);
            row(c, deltas.get(c).copied().unwrap_or(0), min, max, filtered)
        })
        .collect();
    let total_delta = deltas.values().sum();
    let total_min: u64 = tally.exact.values().sum();
    rows.push(row(
        "all",
        total_delta,
        total_min,
        total_min + tally.guesses,
        filtered,
    ));
    rows
}

/// The check of one namespace.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct NetnsCheck {
    pub(crate) netns: u32,
    /// How the namespace was found: `tcp-trace's own`, `pid 1234 (nginx)`, a path.
    pub(crate) label: String,
    pub(crate) filtered: bool,
    pub(crate) rows: Vec<CounterRow>,
    /// Why the counters could not be compared (unreadable at start or end).
    pub(crate) error: Option<String>,
}

impl NetnsCheck {
    pub(crate) fn mismatch(&self) -> bool {
        self.error.is_some()
            || self
                .rows
                .iter()
                .any(|r| r.verdict == CheckVerdict::Mismatch)
    }
}

/// A network namespace whose counters are read, kept open by descriptor.
pub(crate) struct WatchedNetns {
    pub(crate) inode: u32,
    pub(crate) label: String,
    fd: OwnedFd,
}

impl WatchedNetns {
    /// Opens a namespace file (`/proc/PID/ns/net`, `/run/netns/NAME`, ...).
    pub(crate) fn open(path: &Path, label: String) -> Result<WatchedNetns> {
        let file = File::open(path)
            .with_context(|| format!("cannot open network namespace {}", path.display()))?;
        let inode = file.metadata()?.ino() as u32;
        Ok(WatchedNetns {
            inode,
            label,
            fd: OwnedFd::from(file),
        })
    }

    /// The namespace's TcpExt counters, read from a thread inside it.
    pub(crate) fn read(&self) -> Result<BTreeMap<String, u64>> {
        let fd = self.fd.as_raw_fd();
        let text = std::thread::scope(|s| {
            s.spawn(|| -> Result<String> {
                // SAFETY: setns on a namespace descriptor we own; affects only this thread.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                std::fs::read_to_string("/proc/thread-self/net/netstat")
                    .context("read /proc/thread-self/net/netstat")
            })
            .join()
            .map_err(|_| anyhow!("netstat reader thread panicked"))?
        })
        .with_context(|| format!("netns {} ({})", self.inode, self.label))?;
        tcp_ext(&text)
    }
}

/// The namespaces to check: tcp-trace's own, each `--pid`'s, each `--netns` path; one entry per
/// namespace.
pub(crate) fn watch(pids: &[u32], paths: &[PathBuf]) -> Result<Vec<WatchedNetns>> {
    let mut out: Vec<WatchedNetns> = Vec::new();
    let mut add = |w: WatchedNetns| match out.iter_mut().find(|o| o.inode == w.inode) {
        Some(o) => o.label.push_str(&format!(", {}", w.label)),
        None => out.push(w),
    };
    add(WatchedNetns::open(
        Path::new("/proc/thread-self/ns/net"),
        "tcp-trace's own".into(),
    )?);
    for pid in pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        add(WatchedNetns::open(
            Path::new(&format!("/proc/{pid}/ns/net")),
            format!("pid {pid} ({})", comm.trim()),
        )?);
    }
    for p in paths {
        add(WatchedNetns::open(p, p.display().to_string())?);
    }
    Ok(out)
}

/// The counters of the watched namespaces at the start and at the end of a run.
pub(crate) struct CounterRun {
    watched: Vec<WatchedNetns>,
    start: Vec<Result<BTreeMap<String, u64>, String>>,
    end: Vec<Result<BTreeMap<String, u64>, String>>,
    /// CLOCK_MONOTONIC ns just after the start readings and just before the end readings: the
    /// interval whose resets are tallied.
    pub(crate) start_ns: u64,
    pub(crate) end_ns: Option<u64>,
}

impl CounterRun {
    /// Opens the namespaces (see [`watch`]) and takes the first reading. `now` reads
    /// CLOCK_MONOTONIC.
    pub(crate) fn start(
        pids: &[u32],
        paths: &[PathBuf],
        now: impl Fn() -> u64,
    ) -> Result<CounterRun> {
        let watched = watch(pids, paths)?;
        let start = watched
            .iter()
            .map(|w| w.read().map_err(|e| format!("{e:#}")))
            .collect();
        Ok(CounterRun {
            watched,
            start,
            end: Vec::new(),
            start_ns: now(),
            end_ns: None,
        })
    }

    /// The second reading; `now` is taken first, so a reset traced after it is not tallied.
    pub(crate) fn finish(&mut self, now: impl Fn() -> u64) {
        self.end_ns = Some(now());
        self.end = self
            .watched
            .iter()
            .map(|w| w.read().map_err(|e| format!("{e:#}")))
            .collect();
    }

    /// The check of every watched namespace, and the namespaces whose resets involve a counter
    /// but whose counters were not read (namespace -> such resets).
    pub(crate) fn checks(
        &self,
        tally: &BTreeMap<u32, Tally>,
        filtered: bool,
    ) -> (Vec<NetnsCheck>, BTreeMap<u32, u64>) {
        let empty = Tally::default();
        let checks = self
            .watched
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let t = tally.get(&w.inode).unwrap_or(&empty);
                let result = match (self.start.get(i), self.end.get(i)) {
                    (Some(Ok(b)), Some(Ok(a))) => deltas(b, a).map_err(|e| format!("{e:#}")),
                    (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e.clone()),
                    _ => Err("the counters were not read at the end of the run".to_string()),
                };
                let (rows, error) = match result {
                    Ok(d) => (check(&d, t, filtered), None),
                    Err(e) => (Vec::new(), Some(e)),
                };
                NetnsCheck {
                    netns: w.inode,
                    label: w.label.clone(),
                    filtered,
                    rows,
                    error,
                }
            })
            .collect();
        let unchecked = tally
            .iter()
            .filter(|(n, t)| !t.is_empty() && !self.watched.iter().any(|w| w.inode == **n))
            .map(|(n, t)| (*n, t.exact.values().sum::<u64>() + t.guesses))
            .collect();
        (checks, unchecked)
    }
}
