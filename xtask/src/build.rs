//! Building the release binaries the demo and the benchmark run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Paths of the freshly built release binaries.
pub struct Binaries {
    pub flowtrace: PathBuf,
    pub ftgen: PathBuf,
    /// `bench-relay`'s simulated agents.
    pub ftagents: PathBuf,
    /// The SockShop scenario's stand-ins (the demo's second part).
    pub ftshop: PathBuf,
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent; run it from the flowtrace workspace")
}

/// `cargo build --release <args>` in the workspace; returns the target directory (honouring
/// CARGO_TARGET_DIR).
pub fn cargo_release_build(args: &[&str]) -> Result<PathBuf> {
    let root = workspace_root()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("xtask: cargo build --release {}", args.join(" "));
    let mut command = Command::new(&cargo);
    // `cargo xtask` is `cargo run`, which gives xtask the package variables of xtask itself
    // (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...). Some build scripts track them (ring's tracks
    // CARGO_MANIFEST_DIR), so a build that inherits them rebuilds half the tree that a plain
    // `cargo build --release` had built, and the next plain build rebuilds it back.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            command.env_remove(key);
        }
    }
    let status = command
        .current_dir(&root)
        .arg("build")
        .arg("--release")
        .args(args)
        .status()
        .with_context(|| format!("starting {cargo:?} build (is cargo on PATH?)"))?;
    if !status.success() {
        bail!(
            "cargo build --release {} failed ({status}); see cargo's messages above \
             (missing eBPF toolchain? run `bash scripts/setup.sh`)",
            args.join(" ")
        );
    }
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target")))
}

/// `cargo build --release -p flowtrace -p flowtrace-tests --bins`, then points the test bed's
/// agent harness and ftgen helpers at the release binaries (FLOWTRACE_BIN, FTGEN_BIN), so they
/// do not pick a stale (or missing) debug build beside the xtask binary.
pub fn release_binaries() -> Result<Binaries> {
    let target = cargo_release_build(&["-p", "flowtrace", "-p", "flowtrace-tests", "--bins"])?;
    let bins = Binaries {
        flowtrace: target.join("release").join("flowtrace"),
        ftgen: target.join("release").join("ftgen"),
        ftagents: target.join("release").join("ftagents"),
        ftshop: target.join("release").join("ftshop"),
    };
    for p in [&bins.flowtrace, &bins.ftgen, &bins.ftagents, &bins.ftshop] {
        if !p.is_file() {
            bail!("cargo reported success but {} does not exist; is CARGO_TARGET_DIR set differently?", p.display());
        }
    }
    // Single-threaded at this point; the agent harness and the ftgen helpers of the test bed
    // read them when starting agents and traffic.
    std::env::set_var("FLOWTRACE_BIN", &bins.flowtrace);
    std::env::set_var("FTGEN_BIN", &bins.ftgen);
    std::env::set_var("FTSHOP_BIN", &bins.ftshop);
    Ok(bins)
}

/// A path as a `&str` for command lines.
pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| {
        format!(
            "path {} is not UTF-8; move the workspace to a UTF-8 path",
            p.display()
        )
    })
}
