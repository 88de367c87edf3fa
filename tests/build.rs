//! Builds the benchmark's reference programs (flowtrace-ebpf-baselines) with the nightly
//! toolchain for bpfel-unknown-none and leaves the object in OUT_DIR, where
//! `src/baselines.rs` embeds it. They live here, not in the agent: only `cargo xtask bench`,
//! `cargo xtask microbench` and the integration tests load them.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("flowtrace-tests crate has no parent directory"))?;
    let ebpf_dir = workspace.join("flowtrace-ebpf-baselines");
    // Profiles for the kernel crate live in the workspace manifest.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.toml").display()
    );
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "flowtrace-ebpf-baselines",
            root_dir,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::default(),
    )
}
