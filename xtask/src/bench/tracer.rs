//! The tracers the churn runs under: started as root, waited for until attached, stopped with
//! SIGINT; their CPU time from wait4(), their peak RSS from /proc (VmHWM), their event and loss
//! counts from what they print at exit.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::helpers;

/// The bpftrace script the issue compares against: one printf per state change.
pub const BPFTRACE_SCRIPT: &str = r#"tracepoint:sock:inet_sock_set_state { printf("%d %d %d\n", pid, args->oldstate, args->newstate); }"#;

const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// A tracer that falls behind drains what it buffered before it exits; that can take a while.
const EXIT_TIMEOUT: Duration = Duration::from_secs(300);
/// How much of the end of a tracer's stdout is kept (its summary is the last line).
const TAIL_BYTES: u64 = 1 << 20;

/// What traces the churn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Tracer {
    /// No tracer: the bare rate.
    None,
    /// `tcp-trace` as typed at a terminal: all hooks, every event, each flow's timeline and
    /// verdict (the default `--view both`), text, stdout to /dev/null.
    TcpTrace,
    /// `tcp-trace --json`: the same, as JSON lines, stdout to a file on tmpfs (read afterwards
    /// for the summary line).
    TcpTraceJson,
    /// `tcp-trace record -o /dev/null`: the eBPF side and the ring buffer only (no decoding,
    /// flows or model): separates the in-kernel cost from the userspace pipeline's.
    TcpTraceRecord,
    /// `tcp-trace record --empty-programs -o /dev/null`: the same programs on the same hooks,
    /// each returning at entry: the floor, what the attachments cost with nothing in them.
    TcpTraceFloor,
    /// Debian's bpftrace with [`BPFTRACE_SCRIPT`], stdout to a file on tmpfs (its lines counted
    /// afterwards).
    Bpftrace,
}

impl Tracer {
    pub const DEFAULT: [Tracer; 6] = [
        Tracer::None,
        Tracer::TcpTrace,
        Tracer::TcpTraceJson,
        Tracer::TcpTraceRecord,
        Tracer::TcpTraceFloor,
        Tracer::Bpftrace,
    ];

    /// Whether this is one of tcp-trace's own rows, reported against the floor too.
    pub fn is_tcp_trace(self) -> bool {
        matches!(
            self,
            Tracer::TcpTrace | Tracer::TcpTraceJson | Tracer::TcpTraceRecord
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            Tracer::None => "none",
            Tracer::TcpTrace => "tcp-trace",
            Tracer::TcpTraceJson => "tcp-trace --json",
            Tracer::TcpTraceRecord => "tcp-trace record",
            Tracer::TcpTraceFloor => "floor (empty progs)",
            Tracer::Bpftrace => "bpftrace printf",
        }
    }

    /// The command line, for the report.
    pub fn command_line(self) -> String {
        match self {
            Tracer::None => "-".into(),
            Tracer::TcpTrace => "tcp-trace > /dev/null".into(),
            Tracer::TcpTraceJson => "tcp-trace --json > FILE (tmpfs)".into(),
            Tracer::TcpTraceRecord => "tcp-trace record -o /dev/null".into(),
            Tracer::TcpTraceFloor => "tcp-trace record --empty-programs -o /dev/null".into(),
            Tracer::Bpftrace => format!("bpftrace -e '{BPFTRACE_SCRIPT}' > FILE (tmpfs)"),
        }
    }

    fn ready_marker(self) -> &'static str {
        match self {
            Tracer::Bpftrace => "Attaching ",
            Tracer::TcpTraceRecord | Tracer::TcpTraceFloor => "tcp-trace: recording to",
            _ => "tcp-trace: tracing",
        }
    }
}

/// The binaries the tracers run.
pub struct Binaries {
    pub tcp_trace: PathBuf,
    pub bpftrace: Option<PathBuf>,
}

/// What one tracer run cost and saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TracerStats {
    /// User + system CPU time of the tracer process (and its children), seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size (VmHWM), KiB.
    pub max_rss_kib: u64,
    pub events: Option<u64>,
    pub lost: Option<u64>,
    /// Flow verdicts, for tcp-trace with `--json` (label -> count).
    pub verdicts: Vec<(String, u64)>,
}

/// A started, attached tracer.
pub struct Running {
    tracer: Tracer,
    child: Child,
    /// Where its stdout goes (None: /dev/null).
    output: Option<PathBuf>,
    stderr: JoinHandle<Vec<u8>>,
}

/// Starts `tracer` and returns once it is attached (None for [`Tracer::None`]). Its stdout goes
/// to a file in `scratch` (a tmpfs directory) when the bench needs to read it afterwards.
pub fn start(tracer: Tracer, bins: &Binaries, scratch: &Path) -> Result<Option<Running>> {
    let cmd = match tracer {
        Tracer::None => return Ok(None),
        Tracer::TcpTrace => helpers::as_root(&bins.tcp_trace)?,
        Tracer::TcpTraceJson => {
            let mut c = helpers::as_root(&bins.tcp_trace)?;
            c.arg("--json");
            c
        }
        Tracer::TcpTraceRecord => {
            let mut c = helpers::as_root(&bins.tcp_trace)?;
            c.args(["record", "-o", "/dev/null"]);
            c
        }
        Tracer::TcpTraceFloor => {
            let mut c = helpers::as_root(&bins.tcp_trace)?;
            c.args(["record", "--empty-programs", "-o", "/dev/null"]);
            c
        }
        Tracer::Bpftrace => {
            let bin = bins
                .bpftrace
                .as_ref()
                .context("bpftrace is not installed")?;
            let mut c = helpers::as_root(bin)?;
            c.args(["-e", BPFTRACE_SCRIPT]);
            c
        }
    };
    let output = matches!(tracer, Tracer::TcpTraceJson | Tracer::Bpftrace)
        .then(|| scratch.join("tracer-stdout"));
    launch(tracer, cmd, output).map(Some)
}

/// Starts `tcp-trace record -o FILE` (a real recording of the churn, for the replay rows) and
/// returns once it is attached; [`stop`] it as a [`Tracer::TcpTraceRecord`].
pub fn start_recording(bins: &Binaries, file: &Path) -> Result<Running> {
    let mut cmd = helpers::as_root(&bins.tcp_trace)?;
    cmd.args(["record", "-o"]).arg(file);
    launch(Tracer::TcpTraceRecord, cmd, None)
}

/// Spawns `cmd` (stdout to `output`, or /dev/null) and waits until it says it is attached.
fn launch(tracer: Tracer, mut cmd: Command, output: Option<PathBuf>) -> Result<Running> {
    let stdout = match &output {
        Some(path) => {
            Stdio::from(File::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        None => Stdio::null(),
    };
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let marker = tracer.ready_marker();
    let stderr: ChildStderr = child.stderr.take().context("tracer stderr")?;
    let stderr = std::thread::spawn(move || collect(stderr, marker, ready_tx));
    let mut running = Running {
        tracer,
        child,
        output,
        stderr,
    };
    // tcp-trace says it is tracing on stderr; bpftrace says "Attaching 1 probe..." on stdout.
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    let failure = loop {
        match ready_rx.recv_timeout(Duration::from_millis(20)) {
            Ok(()) => return Ok(running),
            // stderr closed without the marker: tcp-trace exited (bpftrace's marker is on
            // stdout, checked below).
            Err(mpsc::RecvTimeoutError::Disconnected) if tracer != Tracer::Bpftrace => {
                break "it exited";
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(path) = &running.output
            && std::fs::read(path).is_ok_and(|b| contains(&b, marker.as_bytes()))
        {
            return Ok(running);
        }
        if let Ok(Some(_)) = running.child.try_wait() {
            break "it exited";
        }
        if Instant::now() > deadline {
            break "timed out";
        }
    };
    let _ = running.child.kill();
    let _ = running.child.wait();
    let err = running.stderr.join().unwrap_or_default();
    bail!(
        "{} did not attach ({failure}): {}",
        tracer.label(),
        String::from_utf8_lossy(&err).trim()
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads `stream` to its end; signals `ready` at the first line holding `marker`.
fn collect<R: Read>(stream: R, marker: &str, ready: mpsc::Sender<()>) -> Vec<u8> {
    let mut r = BufReader::new(stream);
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut ready = Some(ready);
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return out,
            Ok(_) => {}
        }
        out.extend_from_slice(&line);
        if ready.is_some() && contains(&line, marker.as_bytes()) {
            let _ = ready.take().map(|tx| tx.send(()));
        }
    }
}

/// bpftrace's output after "Attaching 1 probe...": one line per event, but for `Lost N events`
/// notices (its perf buffer overflowed) and the blank lines it prints at exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineCount {
    pub events: u64,
    pub lost: u64,
}

impl LineCount {
    pub fn line(&mut self, line: &[u8]) {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with(b"Attaching ") {
            return;
        }
        if let Some(n) = line
            .strip_prefix(b"Lost ")
            .and_then(|r| r.strip_suffix(b" events"))
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<u64>().ok())
        {
            self.lost += n;
            return;
        }
        self.events += 1;
    }

    /// Counts every line of `r`.
    pub fn read(r: impl Read) -> std::io::Result<LineCount> {
        let mut r = BufReader::with_capacity(1 << 20, r);
        let mut c = LineCount::default();
        let mut line = Vec::new();
        while r.read_until(b'\n', &mut line)? > 0 {
            c.line(&line);
            line.clear();
        }
        Ok(c)
    }
}

/// The last `n` bytes of a file.
fn tail_of(path: &Path, n: u64) -> Result<Vec<u8>> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(n)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Stops the tracer with SIGINT and collects what it cost and saw.
pub fn stop(mut running: Running) -> Result<TracerStats> {
    let pid = running.child.id() as libc::pid_t;
    // The peak so far (VmHWM only grows); wait_with_rusage samples it to the end.
    let hwm = tree_hwm_kib(pid);
    // SAFETY: kill has no memory preconditions; pid is our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let usage = wait_with_rusage(&mut running.child, EXIT_TIMEOUT)?;
    let err = running.stderr.join().unwrap_or_default();
    let err_text = String::from_utf8_lossy(&err);
    let mut stats = TracerStats {
        cpu_seconds: usage.cpu_seconds,
        max_rss_kib: usage.max_rss_kib.max(hwm),
        ..Default::default()
    };
    let output = running.output.take();
    let result = (|| -> Result<()> {
        match running.tracer {
            Tracer::None => {}
            Tracer::TcpTraceJson => {
                let path = output.as_deref().context("no output file")?;
                let summary = json_summary(&tail_of(path, TAIL_BYTES)?).with_context(|| {
                    format!(
                        "tcp-trace --json printed no summary (exit {}): {}",
                        usage.status,
                        err_text.trim()
                    )
                })?;
                stats.events = Some(summary.events);
                stats.lost = Some(summary.lost);
                stats.verdicts = summary.verdicts;
            }
            Tracer::TcpTrace | Tracer::TcpTraceRecord | Tracer::TcpTraceFloor => {
                let (events, lost) = text_summary(&err_text).with_context(|| {
                    format!(
                        "{} printed no summary (exit {}): {}",
                        running.tracer.label(),
                        usage.status,
                        err_text.trim()
                    )
                })?;
                stats.events = Some(events);
                stats.lost = Some(lost);
            }
            Tracer::Bpftrace => {
                if usage.status != 0 {
                    bail!("bpftrace exited {}: {}", usage.status, err_text.trim());
                }
                let path = output.as_deref().context("no output file")?;
                let out = LineCount::read(File::open(path)?)?;
                let on_stderr = LineCount::read(err.as_slice())?;
                stats.events = Some(out.events);
                stats.lost = Some(out.lost + on_stderr.lost);
            }
        }
        Ok(())
    })();
    if let Some(path) = output {
        let _ = std::fs::remove_file(path);
    }
    result.map(|()| stats)
}

/// tcp-trace's `{"type":"summary",...}` line.
#[derive(Debug, PartialEq)]
pub struct JsonSummary {
    pub events: u64,
    pub lost: u64,
    pub verdicts: Vec<(String, u64)>,
}

/// The last `{"type":"summary"...}` line of tcp-trace's `--json` output.
pub fn json_summary(output: &[u8]) -> Option<JsonSummary> {
    let text = String::from_utf8_lossy(output);
    text.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        if v.get("type")?.as_str()? != "summary" {
            return None;
        }
        let verdicts = v
            .get("verdicts")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Some(JsonSummary {
            events: v.get("events")?.as_u64()?,
            lost: v.get("lost")?.as_u64()?,
            verdicts,
        })
    })
}

/// Events and lost events from tcp-trace's last stderr line: `tcp-trace: N events in 5.0s, L
/// lost` (live) or `tcp-trace: N events recorded in 5.0s, L lost` (record).
pub fn text_summary(stderr: &str) -> Option<(u64, u64)> {
    stderr.lines().rev().find_map(|line| {
        let rest = line.trim().strip_prefix("tcp-trace: ")?;
        let (events, rest) = rest.split_once(" events ")?;
        let rest = rest.strip_prefix("recorded ").unwrap_or(rest);
        let rest = rest.strip_prefix("in ")?;
        let (_, rest) = rest.split_once("s, ")?;
        let lost = rest.split_whitespace().next()?;
        if !rest[lost.len()..].trim_start().starts_with("lost") {
            return None;
        }
        Some((events.parse().ok()?, lost.parse().ok()?))
    })
}

/// A reaped child's resource use.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub cpu_seconds: f64,
    /// The largest VmHWM seen in the child and its descendants while waiting, KiB. (Not
    /// ru_maxrss: a child spawned with vfork+exec starts with its parent's peak.)
    pub max_rss_kib: u64,
    /// Exit status, or 128 + signal.
    pub status: i32,
}

/// Waits for `child` (polling every 10 ms, sampling its peak RSS; at most `timeout`, then
/// SIGKILL) and returns its CPU time from wait4().
pub fn wait_with_rusage(child: &mut Child, timeout: Duration) -> Result<Usage> {
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + timeout;
    let mut killed = false;
    let mut hwm = 0;
    loop {
        hwm = hwm.max(tree_hwm_kib(pid));
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 writes it and status.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to status and ru; pid is our unreaped child.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            let status = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            return Ok(Usage {
                cpu_seconds: tv(ru.ru_utime) + tv(ru.ru_stime),
                max_rss_kib: hwm,
                status,
            });
        }
        if r < 0 {
            bail!("wait4({pid}): {}", std::io::Error::last_os_error());
        }
        if Instant::now() > deadline && !killed {
            let _ = child.kill();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The largest VmHWM (peak RSS, KiB) of `pid` and its descendants (e.g. sudo's child).
pub fn tree_hwm_kib(pid: libc::pid_t) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| vm_hwm_kib(&s))
        .unwrap_or(0);
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .map(tree_hwm_kib)
        .fold(own, u64::max)
}

/// `VmHWM:` of a /proc/PID/status text, KiB.
pub fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// bpftrace's path, installing Debian's package when it is missing (idempotent, says so).
pub fn ensure_bpftrace() -> Result<PathBuf> {
    if let Some(p) = helpers::which("bpftrace") {
        eprintln!("[xtask] bpftrace: {} (installed)", p.display());
        return Ok(p);
    }
    eprintln!(
        "[xtask] bpftrace is missing: installing Debian's package (apt-get install -y bpftrace)"
    );
    let apt = Path::new("/usr/bin/apt-get");
    if !apt.exists() {
        bail!("bpftrace is not installed and there is no apt-get to install it with");
    }
    let mut update = helpers::as_root(apt)?;
    update.args(["update", "-q"]);
    helpers::status(&mut update)?;
    let mut install = helpers::as_root(apt)?;
    install
        .args(["install", "-y", "-q", "bpftrace"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    helpers::status(&mut install)?;
    helpers::which("bpftrace")
        .or_else(|| Some(PathBuf::from("/usr/bin/bpftrace")).filter(|p| p.exists()))
        .context("apt-get installed bpftrace but it is not on PATH")
}

/// The version line of a program (`--version`), for the report.
pub fn version_of(program: &Path) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_trace_json_summary() {
        let out = br#"{"type":"start","kernel":"6.18.44"}
{"type":"event","hook":"inet_sock_set_state"}
{"by_hook":{"inet_sock_set_state":64},"decode_errors":0,"divergent_flows":[],"events":90,"lost":3,"type":"summary","verdicts":{"conforms":20,"incomplete":2},"seconds":5.1}
"#;
        let s = json_summary(out).unwrap();
        assert_eq!(s.events, 90);
        assert_eq!(s.lost, 3);
        assert_eq!(
            s.verdicts,
            vec![("conforms".to_string(), 20), ("incomplete".to_string(), 2)]
        );
        assert_eq!(json_summary(b"{\"type\":\"event\"}\n"), None);
        assert_eq!(json_summary(b""), None);
        // A tail that starts mid-line is fine: the summary is the last line.
        assert_eq!(json_summary(&out[20..]).unwrap().events, 90);
    }

    #[test]
    fn parses_tcp_trace_text_summaries() {
        let live = "tcp-trace: tracing; Ctrl-C to stop\n\
                    tcp-trace: warning: 5 events lost since the last warning; 5 lost (4 ring \
                    buffer full, 1 skipped as programs nested)\n\
                    ┌──────┐\n\
                    tcp-trace: 725000 events in 5.3s, 5 lost (4 ring buffer full, 1 skipped as \
                    programs nested)\n";
        assert_eq!(text_summary(live), Some((725_000, 5)));
        let malformed = "tcp-trace: 12 events in 0.5s, 0 lost, 2 malformed records\n";
        assert_eq!(text_summary(malformed), Some((12, 0)));
        let record = "tcp-trace: recording to /dev/null; Ctrl-C to stop\n\
                      tcp-trace: 90 events recorded in 3.5s, 0 lost\n";
        assert_eq!(text_summary(record), Some((90, 0)));
        assert_eq!(text_summary("tcp-trace: tracing; Ctrl-C to stop\n"), None);
        assert_eq!(text_summary("tcp-trace: x events in 1s, 0 lost"), None);
    }

    #[test]
    fn counts_bpftrace_lines_and_lost_notices() {
        let mut c = LineCount::default();
        for l in [
            "1 2 3",
            "Lost 17 events",
            "4 5 6",
            "",
            "Lost 3 events",
            "  ",
            "7 8 9\r",
        ] {
            c.line(l.as_bytes());
        }
        assert_eq!(
            c,
            LineCount {
                events: 3,
                lost: 20
            }
        );
        let mut c = LineCount::default();
        c.line(b"Lost many events");
        assert_eq!(c, LineCount { events: 1, lost: 0 });
        let out = b"Attaching 1 probe...\n1 7 2\n1 2 1\nLost 4 events\n1 1 4\n\n\n";
        assert_eq!(
            LineCount::read(&out[..]).unwrap(),
            LineCount { events: 3, lost: 4 }
        );
    }

    #[test]
    fn collect_signals_ready_at_the_marker() {
        let text = b"noise\ntcp-trace: tracing; Ctrl-C to stop\nmore\n";
        let (tx, rx) = mpsc::channel();
        let all = collect(&text[..], "tcp-trace: tracing", tx);
        assert!(rx.try_recv().is_ok());
        assert_eq!(all, text.to_vec());
        let (tx, rx) = mpsc::channel();
        collect(&b"error: no BTF\n"[..], "tcp-trace: tracing", tx);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn reads_vm_hwm() {
        let status =
            "Name:\ttcp-trace\nVmPeak:\t  300000 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(vm_hwm_kib(status), Some(12345));
        assert_eq!(vm_hwm_kib("Name:\tzombie\n"), None);
        // This process has a peak RSS.
        assert!(tree_hwm_kib(std::process::id() as libc::pid_t) > 0);
    }

    #[test]
    fn tracer_labels_and_markers() {
        assert_eq!(Tracer::Bpftrace.ready_marker(), "Attaching ");
        assert!(
            Tracer::Bpftrace
                .command_line()
                .contains("inet_sock_set_state")
        );
        assert_eq!(Tracer::DEFAULT[0], Tracer::None);
    }
}
