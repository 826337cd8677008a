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

use crate::{setup, tasks, vm};

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
    tasks::status(
        Command::new("cargo")
            .current_dir(tasks::workspace_root())
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
    Ok(tasks::workspace_root().join("target/x86_64-unknown-linux-gnu/release/tcp-trace"))
}

/// The guest script: doctor, then validate per backend; each run's JSON lines are preceded by a
/// marker line so the host can tell them apart.
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
             /bin/tcp-trace validate --json --backend {backend}{only} >> \"$R\"\n\
             echo \"{{\\\"type\\\":\\\"exit\\\",\\\"status\\\":$?}}\" >> \"$R\"\n"
        ));
    }
    s
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
                if !passed {
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
    let mut cmd = tasks::as_root(bin)?;
    cmd.args(["validate", "--json"]);
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
    let tools = vm::ensure_host_tools()?;
    let mut columns = Vec::new();
    let mut failures = Vec::new();
    for spec in vm::kernels_for(kernels)? {
        let kernel = vm::prepare_kernel(spec)?;
        let mut job = vm::GuestJob::script(guest_script(&scenarios)).with_binary(&bin);
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
            tasks::workspace_root().join("target/x86_64-unknown-linux-gnu/release/tcp-trace");
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
    fn the_guest_script_marks_every_run() {
        let s = guest_script(&["close-unread".into()]);
        assert!(s.contains("\"run\":\"doctor\""));
        assert!(s.contains("--backend kprobe --scenario close-unread"));
        assert!(s.contains("--backend fentry --scenario close-unread"));
    }
}
