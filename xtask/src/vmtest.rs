//! `cargo xtask vm-test`: the kernel matrix. Every catalogue kernel boots under qemu with a static
//! tcp-trace inside, which runs `doctor` and then `validate --json` with the kprobe and the fentry
//! backend; this machine's own kernel runs `validate --json` with what it allows (tracepoints).
//! The JSON comes back over the VM's result channel, is parsed (never grepped), and a matrix of
//! kernel x backend x scenario -> verdict is printed. Any divergence, any hook that should attach
//! and does not, or a VM that fails to boot fails the run, with the guest's console shown.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{helpers, setup, vm};

/// The backends each VM kernel must support, and the mechanisms that proves.
const VM_BACKENDS: &[(&str, &[&str])] = &[
    ("kprobe", &["kprobe", "kretprobe"]),
    ("fentry", &["fentry", "fexit"]),
];

fn say(msg: impl AsRef<str>) {
    eprintln!("[vm-test] {}", msg.as_ref());
}

/// One column of the matrix: a kernel with a backend.
struct Column {
    kernel: String,
    backend: String,
    /// scenario -> (verdict label, passed)
    verdicts: BTreeMap<String, (String, bool)>,
    problems: Vec<String>,
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
echo '{"type":"run","run":"resets"}' >> "$R"
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

/// The guest script: doctor, then validate per backend, then the reset check; each run's JSON
/// lines are preceded by a marker line so the host can tell them apart.
fn guest_script(scenarios: &[String]) -> String {
    let mut s = String::from("set -u\nR=\"$VM_RESULT\"\n");
    s.push_str("echo '{\"type\":\"run\",\"run\":\"doctor\"}' >> \"$R\"\n");
    s.push_str("/bin/tcp-trace doctor --json >> \"$R\" || true\n");
    let only: String = scenarios
        .iter()
        .map(|n| format!(" --scenario {n}"))
        .collect();
    for (backend, _) in VM_BACKENDS {
        s.push_str(&format!(
            "echo '{{\"type\":\"run\",\"run\":\"{backend}\"}}' >> \"$R\"\n\
             /bin/tcp-trace validate --json --owns-machine --backend {backend}{only} >> \"$R\"\n\
             echo \"{{\\\"type\\\":\\\"exit\\\",\\\"status\\\":$?}}\" >> \"$R\"\n"
        ));
    }
    s.push_str(RESETS_SCRIPT);
    s
}

/// The C peer of the reset check, built static (the initramfs has no libc) with frame pointers
/// and debug info.
fn build_c_peer() -> Result<PathBuf> {
    let root = helpers::workspace_root();
    let out = root.join("target/close-unread-peer");
    helpers::status(
        Command::new("gcc")
            .args(["-static", "-O0", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&out)
            .arg(root.join("tcp-trace/tests/data/close_unread_peer.c")),
    )
    .context("building the reset check's C peer (needs gcc and the static libc, libc6-dev)")?;
    Ok(out)
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

/// Splits the result channel into runs: marker line -> the JSON lines after it.
fn split_runs(result: &str) -> Result<BTreeMap<String, Vec<Value>>> {
    let mut runs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut current = None;
    for (n, line) in result.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("result line {}: not JSON: {line}", n + 1))?;
        if v["type"] == "run" {
            let name = v["run"].as_str().unwrap_or("?").to_string();
            runs.entry(name.clone()).or_default();
            current = Some(name);
        } else if let Some(run) = &current {
            runs.get_mut(run).expect("run exists").push(v);
        }
    }
    Ok(runs)
}

/// Reads one `validate --json` run into a column. Tracepoints must always attach; function hooks
/// must attach with one of `want_mechanisms`, or may be missing when it is None (a kernel that
/// allows no function hooks, like this machine's).
fn column(
    kernel: &str,
    backend: &str,
    lines: &[Value],
    want_mechanisms: Option<&[&str]>,
) -> Column {
    let mut col = Column {
        kernel: kernel.to_string(),
        backend: backend.to_string(),
        verdicts: BTreeMap::new(),
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
                col.verdicts.insert(name, (verdict, passed));
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
        let ok = match (mechanism, want_mechanisms) {
            (None, None) => is_function,
            (None, Some(_)) => false,
            (Some(m), Some(want)) if is_function => want.contains(&m),
            (Some(_), _) => true,
        };
        if !ok {
            col.problems.push(format!(
                "hook {name} should attach with {} here but {}",
                match (is_function, want_mechanisms) {
                    (true, Some(want)) => want.join("/"),
                    _ => "tp_btf/raw_tp".to_string(),
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
    let mut cmd = helpers::as_root(bin)?;
    cmd.args(["validate", "--json"]);
    // A CI machine is a fresh VM the test suite owns; a developer's machine is shared.
    if std::env::var_os("CI").is_some() {
        cmd.arg("--owns-machine");
    }
    for s in scenarios {
        cmd.args(["--scenario", s]);
    }
    let out = cmd.output().context("running validate on this machine")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        lines.push(
            serde_json::from_str::<Value>(line)
                .with_context(|| format!("validate output line {}: not JSON: {line}", n + 1))?,
        );
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    // This machine may allow any mix of mechanisms (here: tracepoints only).
    let mut col = column(&release, "auto", &lines, None);
    if !out.status.success() && col.problems.is_empty() {
        col.problems.push(format!(
            "validate exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(col)
}

pub fn run(kernels: &str, scenarios: Vec<String>, skip_host: bool) -> Result<()> {
    let started = Instant::now();
    let bin = build_static()?;
    let c_peer = build_c_peer()?;
    let tools = vm::ensure_host_tools()?;
    let mut columns = Vec::new();
    let mut failures = Vec::new();
    for spec in vm::kernels_for(kernels)? {
        let kernel = vm::prepare_kernel(spec)?;
        let mut job = vm::GuestJob::script(guest_script(&scenarios))
            .with_binary(&bin)
            .with_file(vm::GuestFile::host(&c_peer, "/bin/close-unread-peer"));
        job.timeout = Duration::from_secs(420);
        say(format!(
            "kernel {}: doctor, validate (kprobe), validate (fentry)",
            spec.name
        ));
        let outcome = match vm::boot_prepared(&tools, &kernel, &job) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("kernel {}: {e:#}", spec.name));
                continue;
            }
        };
        let runs = match split_runs(&outcome.result) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!(
                    "kernel {}: {e:#}\n{}",
                    spec.name,
                    outcome.console_tail(40)
                ));
                continue;
            }
        };
        let label = format!("{} ({})", spec.name, outcome.release);
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
        for (backend, mechanisms) in VM_BACKENDS {
            let lines = runs.get(*backend).cloned().unwrap_or_default();
            let col = column(&label, backend, &lines, Some(mechanisms));
            any_problem |= !col.problems.is_empty();
            columns.push(col);
        }
        let resets = runs.get("resets").cloned().unwrap_or_default();
        let stack_expected = !KNOWN_NO_STACK.contains(&spec.name);
        let reset_problems = check_resets(&resets, stack_expected);
        if reset_problems.is_empty() {
            say(format!(
                "kernel {}: resets: close-unread, 14 bytes, owner and counters right; close() site: {}",
                spec.name,
                if stack_expected {
                    "finish() at close_unread_peer.c:12"
                } else {
                    "not recorded (known gap)"
                }
            ));
        } else {
            any_problem = true;
            for p in reset_problems {
                failures.push(format!("kernel {}: {p}", spec.name));
            }
        }
        if any_problem {
            failures.push(format!(
                "kernel {}: guest console (last 60 lines):\n{}",
                spec.name,
                outcome.console_tail(60)
            ));
        }
    }
    if !skip_host {
        let host_bin =
            helpers::workspace_root().join("target/x86_64-unknown-linux-gnu/release/tcp-trace");
        columns.push(host_column(&host_bin, &scenarios)?);
    }
    print_matrix(&columns);
    for c in &columns {
        for p in &c.problems {
            failures.push(format!("{} {}: {p}", c.kernel, c.backend));
        }
    }
    say(format!(
        "matrix done in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        bail!("kernel matrix: {} problem(s)", failures.len());
    }
    Ok(())
}

fn print_matrix(columns: &[Column]) {
    let mut scenarios: Vec<&String> = columns.iter().flat_map(|c| c.verdicts.keys()).collect();
    scenarios.sort();
    scenarios.dedup();
    let mut header = vec!["scenario".to_string()];
    header.extend(
        columns
            .iter()
            .map(|c| format!("{} {}", c.kernel, c.backend)),
    );
    let widths: Vec<usize> = header.iter().map(|h| h.len().max(12)).collect();
    let row = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    println!("{}", row(&header));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    let (mut passed, mut total) = (0, 0);
    for s in scenarios {
        let mut cells = vec![s.clone()];
        for c in columns {
            let cell = match c.verdicts.get(s) {
                Some((v, ok)) => {
                    total += 1;
                    passed += *ok as usize;
                    if *ok { v.clone() } else { format!("FAIL {v}") }
                }
                None => "-".into(),
            };
            cells.push(cell);
        }
        println!("{}", row(&cells));
    }
    println!("{passed} passed, {} failed", total - passed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_split_by_marker_lines() {
        let text = "{\"type\":\"run\",\"run\":\"doctor\"}\n{\"type\":\"doctor\"}\n\
                    {\"type\":\"run\",\"run\":\"kprobe\"}\n{\"type\":\"scenario\",\"scenario\":\"a\",\"verdict\":\"conforms\",\"passed\":true}\n";
        let runs = split_runs(text).unwrap();
        assert_eq!(runs["doctor"].len(), 1);
        assert_eq!(runs["kprobe"][0]["scenario"], "a");
        assert!(split_runs("not json").is_err());
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
        let col = column("6.1", "kprobe", &lines, Some(&["kprobe", "kretprobe"]));
        assert_eq!(col.problems.len(), 2, "{:?}", col.problems);
        assert!(col.problems[0].starts_with("b: diverges"));
        assert!(col.problems[1].contains("tcp_fin"));
        let none = column("6.1", "kprobe", &[], Some(&["kprobe"]));
        assert!(none.problems[0].contains("no summary"));
        // Without a mechanism requirement, missing function hooks are fine, tracepoints are not.
        let host = column("6.18", "auto", &lines, None);
        assert_eq!(host.problems.len(), 1, "{:?}", host.problems);
        let tp: Vec<Value> =
            [r#"{"type":"validate","hooks":[{"hook":"tcp:tcp_send_reset","mechanism":null}]}"#]
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        assert_eq!(column("6.18", "auto", &tp, None).problems.len(), 1);
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
        assert!(s.contains("\"run\":\"doctor\""));
        assert!(s.contains("--backend kprobe --scenario close-unread"));
        assert!(s.contains("--backend fentry --scenario close-unread"));
    }
}
