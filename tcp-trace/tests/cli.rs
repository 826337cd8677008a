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
fn global_flags_refuse_extremes_without_panicking() {
    let flags = [
        "--pid",
        "--port",
        "--duration",
        "--backend",
        "--buffer-size",
        "--view",
    ];
    for flag in flags {
        for value in EXTREMES {
            let arg = format!("{flag}={value}");
            no_panic(&[&arg, "replay", MISSING], &[exit::USAGE, exit::ERROR]);
        }
    }
}

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
