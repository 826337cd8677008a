//! `cargo xtask fuzz`: libFuzzer (cargo-fuzz) on the recording reader, for a bounded time, from
//! the corpus kept in fuzz/corpus. Part of `cargo xtask test` (60 s) so that CI fuzzes too.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{helpers, setup};

fn say(msg: impl AsRef<str>) {
    eprintln!("[fuzz] {}", msg.as_ref());
}

/// Installs cargo-fuzz for the nightly once (it builds from crates.io in about a minute).
fn ensure_cargo_fuzz(nightly: &str) -> Result<()> {
    let present = Command::new("cargo")
        .arg(format!("+{nightly}"))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        say("cargo-fuzz: present");
        return Ok(());
    }
    say("cargo-fuzz: installing from crates.io (about a minute)");
    helpers::status(Command::new("cargo").arg(format!("+{nightly}")).args([
        "install",
        "cargo-fuzz",
        "--locked",
    ]))
    .context("installing cargo-fuzz")
}

pub fn run(seconds: u64) -> Result<()> {
    setup::run()?;
    let nightly = setup::nightly();
    ensure_cargo_fuzz(&nightly)?;
    let root = helpers::workspace_root();
    // A scratch copy of the corpus: libFuzzer adds what it finds, the repo keeps the seeds.
    let work = root.join("target/fuzz-corpus/record");
    std::fs::create_dir_all(&work)?;
    for entry in std::fs::read_dir(root.join("fuzz/corpus/record"))? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, work.join(name))?;
        }
    }
    say(format!("record reader: {seconds} s of libFuzzer"));
    helpers::status(
        Command::new("cargo")
            .current_dir(&root)
            .arg(format!("+{nightly}"))
            .args(["fuzz", "run", "--fuzz-dir", "fuzz", "record"])
            .arg(&work)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=65536"),
    )
    .context("the fuzzer found a crash (the input is in fuzz/artifacts/record)")
}
