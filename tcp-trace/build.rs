//! Builds the eBPF object from tcp-trace-ebpf (for bpfel-unknown-none, with the pinned nightly and
//! bpf-linker that `cargo xtask setup` installs) and leaves it in OUT_DIR for include_bytes!.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=TCP_TRACE_NIGHTLY");
    let nightly = std::env::var("TCP_TRACE_NIGHTLY").unwrap_or_else(|_| "nightly".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("tcp-trace-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [Package {
            name: "tcp-trace-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(&nightly),
    )
    .context(
        "building the eBPF programs failed. Run `cargo xtask setup` first (it installs rust-src \
         and bpf-linker for the nightly toolchain)",
    )
}
