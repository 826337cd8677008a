//! Every flag fed extreme and malformed values: tcp-trace must answer with bad usage (2) or an
//! error that names the problem (1), never a panic. No root needed: the commands are ones that
//! fail before touching the kernel (`replay` of a missing file) or need none (`model`).

use std::process::{Command, Output};

use tcp_trace::exit;

const BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");
const MISSING: &str = "/nonexistent/tcp-trace-cli-test.tt";

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// The run ended with one of `codes`, and did not panic.
fn no_panic(args: &[&str], codes: &[u8]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "tcp-trace {args:?} panicked:\n{stderr}"
    );
    let code = out.status.code().expect("exited, not killed by a signal");
    assert!(
        codes.iter().any(|&c| i32::from(c) == code),
        "tcp-trace {args:?} exited {code}, wanted one of {codes:?}:\n{stderr}"
    );
    stderr
}

const EXTREMES: &[&str] = &[
    "",
    "0",
    "-1",
    "-0",
    "+5",
    "1e309",
    "NaN",
    "inf",
    "18446744073709551616",
    "99999999999999999999999999999999",
    "4294967296",
    "65536",
    "0x10",
    "1.5",
    "..",
    " ",
    "\u{1F600}",
    "99999999999999999999h",
    "99999999999999999999ms",
    "1e3s",
    "5 minutes",
    "99999999999999999999G",
    "4294967296K",
    "3M",
    "1Q",
];

#[test]
fn a_huge_duration_is_a_clear_usage_error() {
    let stderr = no_panic(
        &["--duration", "99999999999999999999h", "replay", MISSING],
        &[exit::USAGE],
    );
    assert!(stderr.contains("too long a duration"), "{stderr}");
    let stderr = no_panic(&["--duration", "5x", "replay", MISSING], &[exit::USAGE]);
    assert!(stderr.contains("unknown unit"), "{stderr}");
    // In range: parsing passes and the missing file is the error.
    let stderr = no_panic(&["--duration", "250ms", "replay", MISSING], &[exit::ERROR]);
    assert!(stderr.contains("cannot open"), "{stderr}");
}

#[test]
fn bad_ports_pids_and_sizes_are_usage_errors() {
    for args in [
        ["--port", "65536"],
        ["--port", "-1"],
        ["--pid", "4294967296"],
        ["--pid", "abc"],
        ["--buffer-size", "3M"],
        ["--buffer-size", "99999999999999999999G"],
        ["--buffer-size", "4G"],
    ] {
        let arg = format!("{}={}", args[0], args[1]);
        let stderr = no_panic(&[&arg, "replay", MISSING], &[exit::USAGE]);
        assert!(stderr.contains(args[0]), "names the flag: {stderr}");
    }
}

#[test]
fn model_flags_refuse_extremes_without_panicking() {
    for flag in [
        "--kernel",
        "--explain",
        "--from",
        "--fin-timeout",
        "--linger2",
        "--orphan-retries",
    ] {
        for value in EXTREMES {
            let arg = format!("{flag}={value}");
            no_panic(&["model", &arg], &[exit::OK, exit::USAGE, exit::ERROR]);
        }
    }
    // The largest values the flags take, through a whole explained run.
    no_panic(
        &[
            "model",
            "--fin-timeout=4294967295",
            "--linger2=-2147483648",
            "--orphan-retries=4294967295",
            "--kernel=4294967295.4294967295.4294967295",
            "--explain=close,ack-of-fin,fin,tw-expire",
        ],
        &[exit::OK, exit::ERROR],
    );
    no_panic(
        &[
            "model",
            "--linger2=2147483647",
            "--explain=close,ack-of-fin",
        ],
        &[exit::OK],
    );
}

#[test]
fn subcommand_arguments_refuse_extremes_without_panicking() {
    for value in EXTREMES {
        no_panic(&["replay", value], &[exit::USAGE, exit::ERROR]);
        no_panic(
            &["validate", "--scenario", value, "--duration", "1ms"],
            &[exit::USAGE, exit::ERROR],
        );
    }
}

#[test]
fn help_lists_every_exit_status() {
    let out = run(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for (code, what) in [
        (exit::ERROR, "error"),
        (exit::USAGE, "bad usage"),
        (exit::EVENTS_LOST, "dropped events"),
        (exit::CUT_SHORT, "cut short"),
        (exit::COUNTER_MISMATCH, "counters"),
        (exit::DIVERGED, "diverges"),
    ] {
        assert!(
            help.contains(&format!("{code} ")) && help.contains(what),
            "--help says what exit status {code} means ({what}):\n{help}"
        );
    }
}

/// The `--flags` that `tcp-trace ARGS --help` lists, each with whether it takes a value.
fn flags_in_help(args: &[&str]) -> Vec<(String, bool)> {
    let out = run(&[args, &["--help"]].concat());
    assert!(out.status.success(), "tcp-trace {args:?} --help");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-q, ")
                .or(l.strip_prefix("-o, "))
                .unwrap_or(l);
            let rest = l.strip_prefix("--")?;
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let takes_value = rest[name.len()..].starts_with(" <");
            (!name.is_empty() && name != "help" && name != "version")
                .then(|| (format!("--{name}"), takes_value))
        })
        .collect()
}

/// The subcommands `tcp-trace ARGS --help` lists.
fn subcommands_in_help(args: &[&str]) -> Vec<String> {
    let out = run(&[args, &["--help"]].concat());
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every flag of every subcommand, as `--help` lists them (hidden `peer` too), fed the extremes
/// where it cannot touch the kernel or the disk: bad usage or a clear error, never a panic. A
/// flag added later is covered without editing this test.
#[test]
fn every_flag_in_help_refuses_extremes_without_panicking() {
    let global = flags_in_help(&[]);
    let is_global = |f: &str| global.iter().any(|(g, _)| g == f);
    let bad_bools = ["", "5", "maybe", "\u{1F600}"];
    // Where each subcommand's own flags can run without tracing: the args before, those after.
    type Context = (
        &'static [&'static str],
        &'static [&'static str],
        &'static [u8],
    );
    let contexts: &[Context] = &[
        (&["replay", MISSING], &[], &[exit::USAGE, exit::ERROR]),
        (&["model"], &[], &[exit::OK, exit::USAGE, exit::ERROR]),
        // An unknown scenario is refused before anything runs.
        (
            &["validate", "--scenario", "no-such-scenario"],
            &[],
            &[exit::USAGE, exit::ERROR],
        ),
        (
            &[
                "peer",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--teardown",
                "clean",
            ],
            &[],
            &[exit::USAGE],
        ),
        (
            &["peer", "connect", "--to", "127.0.0.1:1"],
            &[],
            &[exit::USAGE],
        ),
    ];
    let mut commands: Vec<Vec<String>> = subcommands_in_help(&[])
        .into_iter()
        .map(|c| vec![c])
        .collect();
    assert!(
        commands.len() >= 6,
        "the subcommands in --help: {commands:?}"
    );
    // Hidden, but commands all the same (`assets` writes files where --out says: left out).
    for peer in subcommands_in_help(&["peer"]) {
        commands.push(vec!["peer".into(), peer]);
    }
    let mut fed = Vec::new();
    for path in &commands {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        let command = path.join(" ");
        let own: Vec<(String, bool)> = flags_in_help(&path)
            .into_iter()
            .filter(|(f, _)| !is_global(f))
            .collect();
        let context = contexts
            .iter()
            .find(|(before, _, _)| before.starts_with(&path));
        let Some((before, after, codes)) = context else {
            // doctor, record, resets trace when they run: their flags must be the global ones,
            // which the replay context covers.
            assert!(own.is_empty(), "{command} has flags of its own: {own:?}");
            continue;
        };
        for (flag, takes_value) in &own {
            fed.push(format!("{command} {flag}"));
            let values: Vec<&str> = if *takes_value {
                EXTREMES.to_vec()
            } else {
                bad_bools.to_vec()
            };
            for value in values {
                // A flag given twice is refused or the last wins: give it once, replacing the
                // context's own value.
                let mut args: Vec<String> = Vec::new();
                let mut i = 0;
                while i < before.len() {
                    if before[i] == flag {
                        i += 2;
                        continue;
                    }
                    args.push(before[i].to_string());
                    i += 1;
                }
                if !takes_value && value.is_empty() {
                    continue; // `--flag=` of a switch is its plain form
                }
                args.push(format!("{flag}={value}"));
                args.extend(after.iter().map(|a| a.to_string()));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                no_panic(&args, codes);
            }
        }
    }
    // model's 6, validate's 3, peer's 2 + 2 at the least: the help was read.
    assert!(fed.len() >= 13, "the flags fed: {fed:?}");
    // The global flags, on a replay of a missing file.
    for (flag, takes_value) in &global {
        let values: Vec<&str> = if *takes_value {
            EXTREMES.to_vec()
        } else {
            bad_bools[1..].to_vec()
        };
        for value in values {
            let arg = format!("{flag}={value}");
            no_panic(&[&arg, "replay", MISSING], &[exit::USAGE, exit::ERROR]);
        }
    }
}
