//! `cargo xtask dist`: what a fleet installs. A static tcp-trace, its man pages and shell
//! completions (generated from its clap definitions by `tcp-trace assets`), the systemd unit
//! (the metrics daemon), the Kubernetes DaemonSet manifest and its Containerfile, and a .deb
//! (cargo-deb) holding them, all in target/dist/.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{setup, vmtest};

fn say(msg: impl AsRef<str>) {
    eprintln!("[dist] {}", msg.as_ref());
}

/// What `dist` made: the .deb (its files lie beside it).
pub struct Dist {
    pub deb: PathBuf,
}

pub fn run() -> Result<Dist> {
    let bin = vmtest::build_static()?;
    let release = bin
        .parent()
        .context("binary has a directory")?
        .to_path_buf();
    let assets = release.join("dist");
    let _ = std::fs::remove_dir_all(&assets);
    say(format!("man pages and completions -> {}", assets.display()));
    crate::helpers::status(Command::new(&bin).arg("assets").arg("--out").arg(&assets))?;
    setup::ensure_cargo_deb()?;
    let root = crate::helpers::workspace_root();
    let dir = root.join("target/dist");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    say("building the .deb (cargo deb --no-build)");
    crate::helpers::status(
        Command::new("cargo")
            .current_dir(&root)
            .args([
                "deb",
                "--package",
                "tcp-trace",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--no-build",
                "--output",
            ])
            .arg(&dir),
    )?;
    let deb = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("cargo deb wrote no .deb")?;
    // The loose files too, for installs without dpkg and for building the image.
    std::fs::copy(&bin, dir.join("tcp-trace"))?;
    let src = root.join("tcp-trace/dist");
    for f in [
        "tcp-trace.service",
        "tcp-trace.default",
        "daemonset.yaml",
        "Containerfile",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).with_context(|| format!("copying {f}"))?;
    }
    for sub in ["man", "completions"] {
        std::fs::create_dir_all(dir.join(sub))?;
        for e in std::fs::read_dir(assets.join(sub))? {
            let e = e?;
            std::fs::copy(e.path(), dir.join(sub).join(e.file_name()))?;
        }
    }
    say(format!(
        "done: {} (and the files it holds, in {})",
        deb.display(),
        dir.display()
    ));
    Ok(Dist { deb })
}
