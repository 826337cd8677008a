//! `cargo xtask vm-test`: the kernel matrix. Every catalogue kernel (5.10 ... the newest 7.x)
//! boots once under qemu with a static tcp-trace inside, which runs `doctor`, then
//! `validate --json` with each backend in turn (kprobe, fentry, and tracepoints only: what a
//! locked-down host allows), recording every scenario's events, then the reset check, then the
//! owner check with each backend (servers whose sockets change hands, `owners.rs`). This
//! machine's own kernel runs `validate --json` with what it allows (tracepoints). The JSON comes
//! back over the VM's result channel, is parsed (never grepped), and the matrix of kernel x
//! backend x scenario -> verdict (with the steps each verdict checked) and the hooks attached
//! per kernel and backend, with each kernel's reset and owner checks (`owners.rs`), are printed
//! as Markdown (also written to `target/vm-matrix.md`). The
//! recordings land in `target/vm-recordings/<kernel>/<backend>/<scenario>.tt`. Any divergence,
//! any hook that should attach and does not, or a VM that fails to boot fails the run, with the
//! guest's console shown.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{helpers, setup, vm};

mod owners;

/// The backends each VM kernel runs, in one boot, and the mechanisms function hooks must attach
/// with (none for `tracepoint`: there every function hook must be left out, and said so).
const VM_BACKENDS: &[(&str, &[&str])] = &[
    ("kprobe", &["kprobe", "kretprobe"]),
    ("fentry", &["fentry", "fexit"]),
    ("tracepoint", &[]),
];

/// Where the matrix leaves what it produced, under the workspace's target directory.
const RECORDINGS_DIR: &str = "target/vm-recordings";
const MATRIX_MD: &str = "target/vm-matrix.md";
/// Guests `cargo xtask test` boots at once: two on this 2-vCPU machine kind, measured
/// 2026-12-02: the five kernels in 567 s against 808 s one at a time, all 360 verdicts alike.
pub const DEFAULT_JOBS: usize = 2;

fn say(msg: impl AsRef<str>) {
    eprintln!("[vm-test] {}", msg.as_ref());
}

/// One verdict of the matrix.
#[derive(Debug, Clone, PartialEq)]
struct Cell {
    verdict: String,
    passed: bool,
    /// Model steps the scenario's flows checked against the kernel's events.
    steps: usize,
}

/// One column of the matrix: a kernel with a backend.
struct Column {
    /// Catalogue name (`6.12`), or `host`.
    kernel: String,
    release: String,
    backend: String,
    /// scenario -> verdict
    verdicts: BTreeMap<String, Cell>,
    /// Hooks attached / hooks there are, and the mechanisms used.
    hooks_attached: usize,
    hooks_total: usize,
    mechanisms: Vec<String>,
    /// How long the validate run took (guest uptime, TCG).
    seconds: Option<f64>,
    problems: Vec<String>,
}

/// One kernel's boot: its columns' common facts.
struct KernelRun {
    kernel: String,
    boot_seconds: f64,
    resets: String,
    /// The owner check, per backend.
    owners: String,
}

/// Builds tcp-trace statically (the VM initramfs has no libc).
pub fn build_static() -> Result<PathBuf> {
    setup::run()?;
    say("building a static tcp-trace (x86_64-unknown-linux-gnu, crt-static)");
    helpers::status(
        Command::new("cargo")
            .current_dir(helpers::workspace_root())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--package",
                "tcp-trace",
            ]),
    )?;
    Ok(helpers::workspace_root().join("target/x86_64-unknown-linux-gnu/release/tcp-trace"))
}

/// The guest's part of the reset check: `tcp-trace resets --stacks` while the C peer closes a
/// connection with 14 unread bytes from `finish()` (close_unread_peer.c:12).
/// Kernels on which no close() stack is expected (none today: before 6.8 the socket is torn
/// down by close()'s deferred fput, after the syscall exit, which CloseSite::exit_ns covers).
const KNOWN_NO_STACK: &[&str] = &[];

const RESETS_SCRIPT: &str = r#"
/bin/tcp-trace resets --json --stacks --port 7300 --duration 60s > /tmp/resets.json 2> /tmp/resets.err &
T=$!
i=0; while ! grep -q tracing /tmp/resets.err 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
/bin/close-unread-peer 7300 > /tmp/peer.out &
P=$!
i=0; while ! grep -q listening /tmp/peer.out 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
/bin/tcp-trace peer connect --to 127.0.0.1:7300 > /dev/null
wait $P
sleep 1
kill -INT $T; wait $T
printf '{"type":"peer_pid","pid":%s}\n' "$P" >> "$R"
cat /tmp/resets.json >> "$R"
"#;

/// The guest script: doctor, then validate per backend (recording each scenario), then the
/// reset check, then the owner check per backend. Each run's JSON lines are preceded by a marker line (with the guest's uptime)
/// so the host can tell them apart; the recordings follow as gzip+base64 lines.
fn guest_script(scenarios: &[String]) -> String {
    let mut s = String::from("set -u\nR=\"$VM_RESULT\"\n");
    s.push_str(
        "mark() { printf '{\"type\":\"run\",\"run\":\"%s\",\"uptime\":%s}\\n' \"$1\" \"$(cut -d' ' -f1 /proc/uptime)\" >> \"$R\"; }\n",
    );
    s.push_str("mark doctor\n/bin/tcp-trace doctor --json >> \"$R\" || true\n");
    let only: String = scenarios
        .iter()
        .map(|n| format!(" --scenario {n}"))
        .collect();
    for (backend, _) in VM_BACKENDS {
        s.push_str(&format!(
            "mark {backend}\n\
             /bin/tcp-trace validate --json --owns-machine --backend {backend} --record-dir /tmp/rec/{backend}{only} >> \"$R\"\n\
             echo \"{{\\\"type\\\":\\\"exit\\\",\\\"status\\\":$?}}\" >> \"$R\"\n"
        ));
    }
    s.push_str("mark resets\n");
    s.push_str(RESETS_SCRIPT);
    s.push_str(owners::FUNCTIONS);
    for (backend, _) in VM_BACKENDS {
        s.push_str(&format!("mark owners-{backend}\n"));
        s.push_str(&owners::run_script(backend));
    }
    s.push_str(
        r#"mark recordings
for f in /tmp/rec/*/*.tt; do
  [ -f "$f" ] || continue
  b=$(basename "$(dirname "$f")"); n=$(basename "$f" .tt)
  printf '{"type":"recording","backend":"%s","scenario":"%s","gz_b64":"' "$b" "$n" >> "$R"
  gzip -c "$f" | base64 | tr -d '\n' >> "$R"
  echo '"}' >> "$R"
done
mark end
"#,
    );
    s
}

/// The C peers of the reset and owner checks (tcp-trace/tests/data/NAME.c), built static (the
/// initramfs has no libc) with frame pointers and debug info, to `target/NAME`.
fn build_c_peer(name: &str) -> Result<PathBuf> {
    let root = helpers::workspace_root();
    let out = root.join("target").join(name);
    helpers::status(
        Command::new("gcc")
            .args([
                "-static",
                "-O0",
                "-g",
                "-fno-omit-frame-pointer",
                "-pthread",
                "-o",
            ])
            .arg(&out)
            .arg(root.join(format!("tcp-trace/tests/data/{name}.c"))),
    )
    .with_context(|| {
        format!("building the C peer {name}.c (needs gcc and the static libc, libc6-dev)")
    })?;
    Ok(out)
}

/// The C peers the guest runs, and this machine's nginx with what it needs.
struct CPeers {
    close_unread: PathBuf,
    owners: PathBuf,
    nginx: Vec<vm::GuestFile>,
}

/// Checks the guest's reset run: the close-unread RST blamed on the peer process, with its 14
/// unread bytes and `finish` at close_unread_peer.c:12, and the kernel's counters agreeing.
/// `stack_expected` is false where the kernel is known to record no close() stack (see
/// KNOWN_NO_STACK); the rest is checked everywhere.
fn check_resets(lines: &[Value], stack_expected: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let pid = lines
        .iter()
        .find(|l| l["type"] == "peer_pid")
        .and_then(|l| l["pid"].as_u64());
    let Some(reset) = lines
        .iter()
        .find(|l| l["type"] == "reset" && l["direction"] == "sent")
    else {
        return vec!["resets: no RST sent was reported".into()];
    };
    let expect = |ok: bool, what: &str, problems: &mut Vec<String>| {
        if !ok {
            problems.push(format!("resets: {what}: {reset}"));
        }
    };
    expect(
        reset["cause"] == "close-unread",
        "cause is not close-unread",
        &mut problems,
    );
    expect(
        reset["unread_bytes"] == 14,
        "unread bytes are not 14",
        &mut problems,
    );
    expect(
        pid.is_some() && reset["owner"]["pid"].as_u64() == pid,
        "not attributed to the peer process",
        &mut problems,
    );
    let site = reset["close_site"].as_str().unwrap_or_default();
    if stack_expected || !site.is_empty() {
        expect(
            site.starts_with("finish (") && site.ends_with("close_unread_peer.c:12)"),
            "close() not blamed on finish() at close_unread_peer.c:12",
            &mut problems,
        );
    }
    let checks: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "counter_check")
        .collect();
    if checks.is_empty() {
        problems.push("resets: no counter check".into());
    }
    for c in checks {
        if c["ok"] != true {
            problems.push(format!("resets: counters disagree: {c}"));
        }
    }
    problems
}

/// The result channel of one boot: each run's JSON lines (after its marker), the guest uptime
/// at each marker, and the recordings.
#[derive(Default)]
struct GuestResult {
    runs: BTreeMap<String, Vec<Value>>,
    /// run -> seconds from its marker to the next one.
    seconds: BTreeMap<String, f64>,
    /// (backend, scenario, gzip-compressed recording)
    recordings: Vec<(String, String, Vec<u8>)>,
}

/// Splits the result channel into runs: marker line -> the JSON lines after it.
fn split_runs(result: &str) -> Result<GuestResult> {
    let mut out = GuestResult::default();
    let mut current: Option<(String, f64)> = None;
    for (n, line) in result.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("result line {}: not JSON: {:.200}", n + 1, line))?;
        if v["type"] == "run" {
            let name = v["run"].as_str().unwrap_or("?").to_string();
            let at = v["uptime"].as_f64().unwrap_or(0.0);
            if let Some((prev, since)) = current.take() {
                out.seconds.insert(prev, at - since);
            }
            out.runs.entry(name.clone()).or_default();
            current = Some((name, at));
        } else if v["type"] == "recording" {
            let field = |k: &str| v[k].as_str().unwrap_or("?").to_string();
            let gz = base64_decode(v["gz_b64"].as_str().unwrap_or_default())
                .with_context(|| format!("recording {}/{}", field("backend"), field("scenario")))?;
            out.recordings
                .push((field("backend"), field("scenario"), gz));
        } else if let Some((run, _)) = &current {
            out.runs.get_mut(run).expect("run exists").push(v);
        }
    }
    Ok(out)
}

/// Standard base64 (what busybox `base64` writes), padding optional.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for (i, c) in text.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b'\n' | b'\r' => continue,
            _ => bail!("not base64: byte {c:#04x} at {i}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// Writes a boot's recordings to `<dir>/<backend>/<scenario>.tt`; how many.
fn save_recordings(dir: &Path, recordings: &[(String, String, Vec<u8>)]) -> Result<usize> {
    use std::io::Read;
    let _ = std::fs::remove_dir_all(dir);
    for (backend, scenario, gz) in recordings {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .with_context(|| format!("recording {backend}/{scenario}: not gzip"))?;
        let sub = dir.join(backend);
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("{scenario}.tt")), raw)?;
    }
    Ok(recordings.len())
}

/// Reads one `validate --json` run into a column. Tracepoints must always attach; function hooks
/// must attach with one of `want_mechanisms` (and must not attach at all when it is empty: the
/// tracepoint backend), or may be missing when it is None (a kernel that allows no function
/// hooks, like this machine's).
fn column(
    kernel: &str,
    release: &str,
    backend: &str,
    lines: &[Value],
    want_mechanisms: Option<&[&str]>,
) -> Column {
    let mut col = Column {
        kernel: kernel.to_string(),
        release: release.to_string(),
        backend: backend.to_string(),
        verdicts: BTreeMap::new(),
        hooks_attached: 0,
        hooks_total: 0,
        mechanisms: Vec::new(),
        seconds: None,
        problems: Vec::new(),
    };
    let mut summary = None;
    for v in lines {
        match v["type"].as_str() {
            Some("scenario") => {
                let name = v["scenario"].as_str().unwrap_or("?").to_string();
                let verdict = v["verdict"].as_str().unwrap_or("?").to_string();
                let passed = v["passed"].as_bool().unwrap_or(false);
                // Not run (it needs to own the machine): shown in the matrix, not a failure.
                if !passed && verdict != "not-run" {
                    col.problems.push(format!(
                        "{name}: {verdict}: {}",
                        v["detail"].as_str().unwrap_or("")
                    ));
                }
                let steps = v["flows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|f| f["verdict"]["checked"].as_array().map_or(0, |c| c.len()))
                    .sum();
                col.verdicts.insert(
                    name,
                    Cell {
                        verdict,
                        passed,
                        steps,
                    },
                );
            }
            Some("validate") => summary = Some(v.clone()),
            Some("exit") if v["status"] != 0 && v["status"] != 1 => col
                .problems
                .push(format!("tcp-trace validate exited with {}", v["status"])),
            _ => {}
        }
    }
    let Some(summary) = summary else {
        col.problems
            .push("validate printed no summary line (crashed or was killed)".into());
        return col;
    };
    for hook in summary["hooks"].as_array().into_iter().flatten() {
        let name = hook["hook"].as_str().unwrap_or("?");
        let mechanism = hook["mechanism"].as_str();
        let is_function = !name.contains(':') || name.ends_with(":return");
        col.hooks_total += 1;
        if let Some(m) = mechanism {
            col.hooks_attached += 1;
            if !col.mechanisms.iter().any(|x| x == m) {
                col.mechanisms.push(m.to_string());
            }
        }
        let ok = match (mechanism, want_mechanisms) {
            (None, None) => is_function,
            // Left out on purpose (tracepoint backend), and said why.
            (None, Some(want)) => want.is_empty() && is_function && hook["skipped"].is_string(),
            (Some(m), Some(want)) if is_function => want.contains(&m),
            (Some(_), _) => true,
        };
        if !ok {
            col.problems.push(format!(
                "hook {name} should {} here but {}",
                match (is_function, want_mechanisms) {
                    (true, Some([])) => "be left out (tracepoints only)".to_string(),
                    (true, Some(want)) => format!("attach with {}", want.join("/")),
                    _ => "attach with tp_btf/raw_tp".to_string(),
                },
                match mechanism {
                    Some(m) => format!("used {m}"),
                    None => format!("did not: {}", hook["failures"]),
                }
            ));
        }
    }
    col
}

fn host_column(bin: &Path, scenarios: &[String]) -> Result<Column> {
    say("this machine's kernel: tcp-trace validate --json (backend auto)");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let rec = helpers::workspace_root()
        .join(RECORDINGS_DIR)
        .join("host")
        .join("auto");
    let _ = std::fs::remove_dir_all(&rec);
    let mut cmd = helpers::as_root(bin)?;
    cmd.args(["validate", "--json", "--record-dir"]).arg(&rec);
    // A CI machine is a fresh VM the test suite owns; a developer's machine is shared.
    if std::env::var_os("CI").is_some() {
        cmd.arg("--owns-machine");
    }
    for s in scenarios {
        cmd.args(["--scenario", s]);
    }
    let started = Instant::now();
    let out = cmd.output().context("running validate on this machine")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        lines.push(
            serde_json::from_str::<Value>(line)
                .with_context(|| format!("validate output line {}: not JSON: {line}", n + 1))?,
        );
    }
    // This machine may allow any mix of mechanisms (here: tracepoints only).
    let mut col = column("host", &release, "auto", &lines, None);
    col.seconds = Some(started.elapsed().as_secs_f64());
    if !out.status.success() && col.problems.is_empty() {
        col.problems.push(format!(
            "validate exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(col)
}

/// Boots one kernel and runs the guest script; its columns, its run facts and its failures.
fn run_kernel(
    tools: &vm::HostTools,
    spec: &vm::KernelSpec,
    bin: &Path,
    c_peers: &CPeers,
    scenarios: &[String],
) -> (Vec<Column>, Option<KernelRun>, Vec<String>) {
    let mut failures = Vec::new();
    let kernel = match vm::prepare_kernel(spec) {
        Ok(k) => k,
        Err(e) => return (vec![], None, vec![format!("kernel {}: {e:#}", spec.name)]),
    };
    let mut job = vm::GuestJob::script(guest_script(scenarios))
        .with_binary(bin)
        .with_file(vm::GuestFile::host(
            &c_peers.close_unread,
            "/bin/close-unread-peer",
        ))
        .with_file(vm::GuestFile::host(&c_peers.owners, owners::GUEST_PEER));
    job.files.extend(c_peers.nginx.iter().cloned());
    job.timeout = Duration::from_secs(1200);
    say(format!(
        "kernel {} ({}): doctor, validate with {}, resets, owners",
        spec.name,
        kernel.release,
        VM_BACKENDS
            .iter()
            .map(|(b, _)| *b)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let outcome = match vm::boot_prepared(tools, &kernel, &job) {
        Ok(o) => o,
        Err(e) => return (vec![], None, vec![format!("kernel {}: {e:#}", spec.name)]),
    };
    let result = match split_runs(&outcome.result) {
        Ok(r) => r,
        Err(e) => {
            return (
                vec![],
                None,
                vec![format!(
                    "kernel {}: {e:#}\n{}",
                    spec.name,
                    outcome.console_tail(40)
                )],
            );
        }
    };
    let runs = &result.runs;
    let rec_dir = helpers::workspace_root()
        .join(RECORDINGS_DIR)
        .join(spec.name);
    match save_recordings(&rec_dir, &result.recordings) {
        Ok(n) => say(format!(
            "kernel {}: {n} recordings in {}",
            spec.name,
            rec_dir.display()
        )),
        Err(e) => failures.push(format!("kernel {}: saving recordings: {e:#}", spec.name)),
    }
    let mut any_problem = false;
    // doctor: on these kernels every hook has a mechanism.
    let doctor = runs
        .get("doctor")
        .and_then(|d| d.first())
        .cloned()
        .unwrap_or_default();
    let usable = doctor["usable_hooks"].as_u64().unwrap_or(0);
    let total = doctor["hooks"].as_array().map_or(0, |h| h.len()) as u64;
    if total == 0 || usable != total {
        any_problem = true;
        failures.push(format!(
            "kernel {}: doctor finds {usable} of {total} hooks usable: {}",
            spec.name, doctor["hooks"]
        ));
    }
    let mut columns = Vec::new();
    for (backend, mechanisms) in VM_BACKENDS {
        let lines = runs.get(*backend).cloned().unwrap_or_default();
        let mut col = column(
            spec.name,
            &outcome.release,
            backend,
            &lines,
            Some(mechanisms),
        );
        col.seconds = result.seconds.get(*backend).copied();
        any_problem |= !col.problems.is_empty();
        columns.push(col);
    }
    let resets = runs.get("resets").cloned().unwrap_or_default();
    let stack_expected = !KNOWN_NO_STACK.contains(&spec.name);
    let reset_problems = check_resets(&resets, stack_expected);
    // How close() was hooked for --stacks (a raw tracepoint where the tracepoint cannot load).
    let close_entry = resets
        .iter()
        .find(|l| l["type"] == "start")
        .and_then(|l| l["hooks"].as_array())
        .and_then(|h| h.iter().find(|h| h["hook"] == "syscalls:sys_enter_close"))
        .map(|h| {
            let m = h["mechanism"].as_str().unwrap_or("not attached");
            match h["failures"].as_array().and_then(|f| f.first()) {
                Some(f) => format!("{m}, after {}: {}", f[0], f[1]),
                None => m.to_string(),
            }
        })
        .unwrap_or_else(|| "?".into());
    let resets_summary = if reset_problems.is_empty() {
        format!(
            "close-unread, 14 bytes, owner and counters right; close() at {} (close() entry: {close_entry})",
            if stack_expected {
                "finish() close_unread_peer.c:12"
            } else {
                "(not recorded: known gap)"
            }
        )
    } else {
        any_problem = true;
        for p in &reset_problems {
            failures.push(format!("kernel {}: {p}", spec.name));
        }
        format!("FAILED ({} problems)", reset_problems.len())
    };
    say(format!("kernel {}: resets: {resets_summary}", spec.name));
    let mut owner_cells = Vec::new();
    for (backend, _) in VM_BACKENDS {
        let run = format!("owners-{backend}");
        let lines = runs.get(&run).map_or(&[][..], |l| &l[..]);
        let mut parts = Vec::new();
        for (what, o) in [
            ("peers", owners::check(lines)),
            ("nginx", owners::check_nginx(lines)),
        ] {
            if o.problems.is_empty() {
                parts.push(format!("{what} {}/{}", o.server_flows, o.filtered_flows));
            } else {
                any_problem = true;
                for p in &o.problems {
                    failures.push(format!("kernel {}: owners {backend}: {p}", spec.name));
                }
                parts.push(format!("{what} **FAILED** ({} problems)", o.problems.len()));
            }
        }
        let secs = result
            .seconds
            .get(&run)
            .map_or(String::new(), |s| format!(", {s:.0} s"));
        owner_cells.push(format!("{backend}: {}{secs}", parts.join(", ")));
    }
    let owners_summary = format!(
        "{} (server flows, each owned by its closer or an nginx worker / flows shown by --pid, exactly its own)",
        owner_cells.join("; ")
    );
    say(format!("kernel {}: owners: {owners_summary}", spec.name));
    if any_problem {
        failures.push(format!(
            "kernel {}: guest console (last 60 lines):\n{}",
            spec.name,
            outcome.console_tail(60)
        ));
    }
    let run = KernelRun {
        kernel: spec.name.to_string(),
        boot_seconds: outcome.elapsed.as_secs_f64(),
        resets: resets_summary,
        owners: owners_summary,
    };
    (columns, Some(run), failures)
}

pub fn run(kernels: &str, scenarios: Vec<String>, skip_host: bool, jobs: usize) -> Result<()> {
    let started = Instant::now();
    let bin = build_static()?;
    setup::ensure_apt("nginx-light", Path::new(owners::NGINX))?;
    let c_peers = CPeers {
        close_unread: build_c_peer("close_unread_peer")?,
        owners: build_c_peer("owners_peer")?,
        nginx: owners::nginx_files()?,
    };
    let tools = vm::ensure_host_tools()?;
    let specs = vm::kernels_for(kernels)?;
    // Download every kernel first, one at a time (apt), then boot.
    for spec in &specs {
        if let Err(e) = vm::prepare_kernel(spec) {
            say(format!("kernel {}: {e:#}", spec.name));
        }
    }
    let jobs = jobs.clamp(1, specs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(spec) = specs.get(i) else { break };
                    let r = run_kernel(&tools, spec, &bin, &c_peers, &scenarios);
                    results.lock().expect("results").push((i, r));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|(i, _)| *i);
    let mut columns = Vec::new();
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for (_, (cols, run, fails)) in results {
        columns.extend(cols);
        runs.extend(run);
        failures.extend(fails);
    }
    if !skip_host {
        let host_bin =
            helpers::workspace_root().join("target/x86_64-unknown-linux-gnu/release/tcp-trace");
        columns.push(host_column(&host_bin, &scenarios)?);
    }
    for c in &columns {
        for p in &c.problems {
            failures.push(format!("{} ({}) {}: {p}", c.kernel, c.release, c.backend));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let md = matrix_markdown(&columns, &runs, elapsed, jobs);
    println!("{md}");
    let md_path = helpers::workspace_root().join(MATRIX_MD);
    if let Err(e) = std::fs::write(&md_path, &md) {
        say(format!("could not write {}: {e}", md_path.display()));
    } else {
        say(format!("matrix written to {}", md_path.display()));
    }
    say(format!("matrix done in {elapsed:.0} s"));
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        bail!("kernel matrix: {} problem(s)", failures.len());
    }
    Ok(())
}

/// `conforms 12` (or `FAIL diverges 3`) for one backend's cell.
fn cell_text(c: &Cell) -> String {
    if c.passed {
        format!("{} {}", c.verdict, c.steps)
    } else {
        format!("**FAIL** {} {}", c.verdict, c.steps)
    }
}

/// One kernel's cell for a scenario: its backends' verdicts; `conforms 7/7/3` when they agree
/// (steps checked per backend, in `VM_BACKENDS` order).
fn kernel_cell(cells: &[Option<&Cell>]) -> String {
    let present: Vec<&Cell> = cells.iter().flatten().copied().collect();
    if present.is_empty() {
        return "-".into();
    }
    let first = present[0];
    let agree = present.len() == cells.len()
        && present
            .iter()
            .all(|c| c.passed && c.verdict == first.verdict);
    if agree {
        let steps: Vec<String> = present.iter().map(|c| c.steps.to_string()).collect();
        format!("{} {}", first.verdict, steps.join("/"))
    } else {
        cells
            .iter()
            .map(|c| c.map_or("-".to_string(), cell_text))
            .collect::<Vec<_>>()
            .join(" / ")
    }
}

/// The matrix as Markdown: hooks per kernel and backend, then scenario x kernel with each
/// backend's verdict and steps checked.
fn matrix_markdown(columns: &[Column], runs: &[KernelRun], elapsed: f64, jobs: usize) -> String {
    let mut md = String::new();
    let backends: Vec<&str> = VM_BACKENDS.iter().map(|(b, _)| *b).collect();
    md.push_str(&format!(
        "Hooks attached (of each backend's run; mechanisms used):\n\n| kernel | release | {} | boot |\n|---|---|{}---|\n",
        backends.join(" | "),
        "---|".repeat(backends.len())
    ));
    let mut kernels: Vec<(String, String)> = Vec::new();
    for c in columns {
        if !kernels.iter().any(|(k, _)| *k == c.kernel) {
            kernels.push((c.kernel.clone(), c.release.clone()));
        }
    }
    let hooks = |c: &Column| {
        format!(
            "{}/{} ({}){}",
            c.hooks_attached,
            c.hooks_total,
            c.mechanisms.join(", "),
            c.seconds.map_or(String::new(), |s| format!(", {s:.0} s"))
        )
    };
    for (k, release) in &kernels {
        let cols: Vec<&Column> = columns.iter().filter(|c| c.kernel == *k).collect();
        let cells: Vec<String> = if k == "host" {
            let c = cols[0];
            let mut v = vec![String::from("-"); backends.len()];
            if let Some(i) = backends.iter().position(|b| *b == "tracepoint") {
                v[i] = format!("{} (backend auto)", hooks(c));
            }
            v
        } else {
            backends
                .iter()
                .map(|b| {
                    cols.iter()
                        .find(|c| c.backend == *b)
                        .map_or("-".to_string(), |c| hooks(c))
                })
                .collect()
        };
        let boot = runs
            .iter()
            .find(|r| r.kernel == *k)
            .map_or("this machine".to_string(), |r| {
                format!("{:.0} s", r.boot_seconds)
            });
        md.push_str(&format!(
            "| {k} | {release} | {} | {boot} |\n",
            cells.join(" | ")
        ));
    }
    let mut scenarios: Vec<&String> = columns.iter().flat_map(|c| c.verdicts.keys()).collect();
    scenarios.sort();
    scenarios.dedup();
    md.push_str(&format!(
        "\nVerdicts (steps checked per backend: {}; this machine: backend auto):\n\n| scenario | {} |\n|---|{}\n",
        backends.join("/"),
        kernels
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(kernels.len())
    ));
    let (mut passed, mut total) = (0, 0);
    for s in scenarios {
        let mut row = vec![s.clone()];
        for (k, _) in &kernels {
            let cols: Vec<&Column> = columns.iter().filter(|c| c.kernel == *k).collect();
            let cells: Vec<Option<&Cell>> = cols.iter().map(|c| c.verdicts.get(s)).collect();
            for c in cells.iter().flatten() {
                total += 1;
                passed += usize::from(c.passed);
            }
            row.push(kernel_cell(&cells));
        }
        md.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    md.push('\n');
    for r in runs {
        md.push_str(&format!("- {} resets: {}\n", r.kernel, r.resets));
    }
    for r in runs {
        md.push_str(&format!("- {} owners: {}\n", r.kernel, r.owners));
    }
    md.push_str(&format!(
        "\nmatrix: {passed} passed, {} failed; {elapsed:.0} s ({} guest(s) at a time)\n",
        total - passed,
        jobs
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_split_by_marker_lines() {
        let text = "{\"type\":\"run\",\"run\":\"doctor\",\"uptime\":1.5}\n{\"type\":\"doctor\"}\n\
                    {\"type\":\"run\",\"run\":\"kprobe\",\"uptime\":3.0}\n{\"type\":\"scenario\",\"scenario\":\"a\",\"verdict\":\"conforms\",\"passed\":true}\n\
                    {\"type\":\"recording\",\"backend\":\"kprobe\",\"scenario\":\"a\",\"gz_b64\":\"aGVsbG8=\"}\n\
                    {\"type\":\"run\",\"run\":\"end\",\"uptime\":10.0}\n";
        let r = split_runs(text).unwrap();
        assert_eq!(r.runs["doctor"].len(), 1);
        assert_eq!(r.runs["kprobe"][0]["scenario"], "a");
        assert_eq!(r.seconds["doctor"], 1.5);
        assert_eq!(r.seconds["kprobe"], 7.0);
        assert_eq!(
            r.recordings,
            [("kprobe".to_string(), "a".to_string(), b"hello".to_vec())]
        );
        assert!(split_runs("not json").is_err());
    }

    #[test]
    fn base64_decodes_what_busybox_writes() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert_eq!(base64_decode("/+8A").unwrap(), [0xff, 0xef, 0x00]);
        assert!(base64_decode("a b").is_err());
    }

    #[test]
    fn missing_hooks_and_failed_scenarios_are_problems() {
        let lines: Vec<Value> = [
            r#"{"type":"scenario","scenario":"a","verdict":"conforms","passed":true}"#,
            r#"{"type":"scenario","scenario":"b","verdict":"diverges","passed":false,"detail":"x"}"#,
            r#"{"type":"validate","hooks":[{"hook":"tcp_close","mechanism":"kprobe"},{"hook":"tcp_fin","mechanism":null,"failures":[]},{"hook":"sock:inet_sock_set_state","mechanism":"tp_btf"}]}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        let col = column("6.1", "r", "kprobe", &lines, Some(&["kprobe", "kretprobe"]));
        assert_eq!(col.problems.len(), 2, "{:?}", col.problems);
        assert!(col.problems[0].starts_with("b: diverges"));
        assert!(col.problems[1].contains("tcp_fin"));
        let none = column("6.1", "r", "kprobe", &[], Some(&["kprobe"]));
        assert!(none.problems[0].contains("no summary"));
        // Without a mechanism requirement, missing function hooks are fine, tracepoints are not.
        let host = column("host", "6.18", "auto", &lines, None);
        assert_eq!(host.problems.len(), 1, "{:?}", host.problems);
        let tp: Vec<Value> =
            [r#"{"type":"validate","hooks":[{"hook":"tcp:tcp_send_reset","mechanism":null}]}"#]
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        assert_eq!(column("host", "6.18", "auto", &tp, None).problems.len(), 1);
        // The tracepoint backend: function hooks left out (and said so), tracepoints attached.
        let tp_only: Vec<Value> = [
            r#"{"type":"scenario","scenario":"a","verdict":"conforms","passed":true,"flows":[{"verdict":{"verdict":"conforms","checked":["x","y"]}},{"verdict":{"verdict":"conforms","checked":["z"]}}]}"#,
            r#"{"type":"validate","hooks":[{"hook":"tcp_close","mechanism":null,"skipped":"not requested"},{"hook":"sock:inet_sock_set_state","mechanism":"tp_btf"}]}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        let col = column("5.10", "r", "tracepoint", &tp_only, Some(&[]));
        assert!(col.problems.is_empty(), "{:?}", col.problems);
        assert_eq!(col.verdicts["a"].steps, 3);
        assert_eq!((col.hooks_attached, col.hooks_total), (1, 2));
        let col = column("5.10", "r", "tracepoint", &lines, Some(&[]));
        assert!(
            col.problems
                .iter()
                .any(|p| p.contains("tcp_close should be left out")),
            "{:?}",
            col.problems
        );
    }

    #[test]
    fn the_reset_check_wants_cause_bytes_owner_line_and_counters() {
        let good: Vec<Value> = [
            r#"{"type":"peer_pid","pid":42}"#,
            r#"{"type":"reset","direction":"sent","cause":"close-unread","unread_bytes":14,"owner":{"pid":42},"close_site":"finish (/x/close_unread_peer.c:12)"}"#,
            r#"{"type":"counter_check","ok":true}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        assert!(
            check_resets(&good, true).is_empty(),
            "{:?}",
            check_resets(&good, true)
        );
        let mut bad = good.clone();
        bad[1]["close_site"] = "main (/x/close_unread_peer.c:32)".into();
        bad[2]["ok"] = false.into();
        assert_eq!(check_resets(&bad, true).len(), 2);
        assert_eq!(check_resets(&[], true).len(), 1);
        let mut no_stack = good.clone();
        no_stack[1]["close_site"] = Value::Null;
        assert!(check_resets(&no_stack, false).is_empty());
        assert_eq!(check_resets(&no_stack, true).len(), 1);
    }

    #[test]
    fn the_guest_script_marks_every_run() {
        let s = guest_script(&["close-unread".into()]);
        assert!(s.contains("mark doctor"));
        assert!(
            s.contains("--backend kprobe --record-dir /tmp/rec/kprobe --scenario close-unread")
        );
        assert!(
            s.contains("--backend fentry --record-dir /tmp/rec/fentry --scenario close-unread")
        );
        assert!(s.contains("--backend tracepoint --record-dir /tmp/rec/tracepoint"));
        assert!(s.contains("mark resets"));
        for b in ["kprobe", "fentry", "tracepoint"] {
            let at = s
                .find(&format!("mark owners-{b}\n"))
                .expect("owner run marked");
            assert!(s[at..].contains(&format!("--backend {b} --stacks")));
        }
        assert!(s.find("mark owners-kprobe") < s.find("mark recordings"));
    }
}
