//! Builds the agent's kernel programs (flowtrace-ebpf) with the nightly toolchain for
//! bpfel-unknown-none and leaves the object in OUT_DIR, where the agent embeds it
//! (`include_bytes_aligned!` of `OUT_DIR/flowtrace`). The benchmark's reference programs
//! (flowtrace-ebpf-baselines) are not built here but by tests/build.rs: the agent does not
//! carry them.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("flowtrace crate has no parent directory"))?
        .join("flowtrace-ebpf");
    // aya-build watches the kernel crate; the shared crate it compiles in (the parser, the
    // map types) must trigger a rebuild of the kernel object too.
    let common_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("flowtrace crate has no parent directory"))?
        .join("flowtrace-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    // Profiles for the kernel crate live in the workspace manifest.
    println!(
        "cargo:rerun-if-changed={}",
        common_dir.with_file_name("Cargo.toml").display()
    );
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "flowtrace-ebpf",
            root_dir,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::default(),
    )
}
