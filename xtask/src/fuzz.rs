//! `cargo xtask fuzz`: libFuzzer (cargo-fuzz) for a bounded time on each target, from the
//! corpus kept in fuzz/corpus/<target>: `record` (the recording reader) and `replay` (the reader
//! and the whole replay pipeline). Part of `cargo xtask test` (60 s in all) so that CI fuzzes too.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{helpers, setup};

/// The fuzz targets (fuzz/fuzz_targets/<name>.rs), with what each covers.
const TARGETS: &[(&str, &str)] = &[
    ("record", "record reader"),
    (
        "replay",
        "replay pipeline (reader, decode, flows, judge, resets, report)",
    ),
];

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

/// Fuzzes every target, `seconds` split evenly between them.
pub fn run(seconds: u64) -> Result<()> {
    setup::run()?;
    let nightly = setup::nightly();
    ensure_cargo_fuzz(&nightly)?;
    let root = helpers::workspace_root();
    let each = (seconds / TARGETS.len() as u64).max(1);
    for (target, what) in TARGETS {
        // A scratch copy of the corpus: libFuzzer adds what it finds, the repo keeps the seeds.
        let work = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work)?;
        for entry in std::fs::read_dir(root.join("fuzz/corpus").join(target))? {
            let path = entry?.path();
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, work.join(name))?;
            }
        }
        // Built on its own first, so that a target that does not compile is reported as that,
        // not as a crash the fuzzer found; `fuzz run` then finds it built.
        say(format!("{what}: building the {target} target"));
        helpers::status(
            Command::new("cargo")
                .current_dir(&root)
                .arg(format!("+{nightly}"))
                .args(["fuzz", "build", "--fuzz-dir", "fuzz", target]),
        )
        .with_context(|| {
            format!("the {target} fuzz target (fuzz/fuzz_targets/{target}.rs) does not build")
        })?;
        say(format!("{what}: {each} s of libFuzzer"));
        helpers::status(
            Command::new("cargo")
                .current_dir(&root)
                .arg(format!("+{nightly}"))
                .args(["fuzz", "run", "--fuzz-dir", "fuzz", target])
                .arg(&work)
                .arg("--")
                .arg(format!("-max_total_time={each}"))
                .arg("-max_len=65536"),
        )
        .with_context(|| {
            format!("the {target} fuzzer found a crash (the input is in fuzz/artifacts/{target})")
        })?;
    }
    Ok(())
}
