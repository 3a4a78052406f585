//! Builds the eBPF object `overlay-ebpf` (the crate and its one [[bin]]) for the BPF target;
//! the agent embeds it from OUT_DIR.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest).parent().ok_or_else(|| anyhow!("no workspace"))?;
    let ebpf = root.join("overlay-ebpf");
    // aya-build watches the eBPF crate; the shared layouts live in overlay-common.
    println!("cargo:rerun-if-changed={}", root.join("overlay-common").display());
    aya_build::build_ebpf(
        [Package { name: "overlay-ebpf", root_dir: &ebpf.to_string_lossy(), ..Default::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF object (needs nightly with rust-src and bpf-linker 0.10.3: run ./setup)")
}
