//! `cargo xtask image`: the OCI image built here, without a registry, from the release binary
//! (`flowtrace_tests::image::build`, the code the real-runtime test runs too).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use flowtrace_tests::image::{self, BuildOptions};

#[derive(Args)]
pub struct ImageArgs {
    /// Also save the image as an OCI archive at PATH (for `ctr image import PATH` or
    /// `podman load -i PATH`).
    #[arg(long, value_name = "PATH")]
    archive: Option<PathBuf>,
    /// Image name (default: localhost/flowtrace:<version of flowtrace/Cargo.toml>).
    #[arg(long)]
    tag: Option<String>,
}

pub fn run(args: &ImageArgs) -> Result<()> {
    let binary = release_binary()?;
    let tag = match &args.tag {
        Some(t) => t.clone(),
        None => image::default_tag(&binary)?,
    };
    // A relative archive path is the caller's, not cargo's working directory.
    let archive = match &args.archive {
        Some(p) if p.is_relative() => Some(
            std::env::current_dir()
                .context("reading the current directory for --archive")?
                .join(p),
        ),
        other => other.clone(),
    };
    eprintln!(
        "xtask: building {tag} from {} with buildah",
        binary.display()
    );
    let built = image::build(&BuildOptions {
        binary,
        tag,
        storage: None,
        archive,
    })?;
    println!(
        "{} ({}): {:.1} MB ({} bytes), files: {}",
        built.tag,
        built.id,
        built.size_bytes as f64 / 1e6,
        built.size_bytes,
        built.files.join(" ")
    );
    if let Some(a) = &built.archive {
        let len = std::fs::metadata(a)
            .with_context(|| format!("reading the archive {}", a.display()))?
            .len();
        println!(
            "OCI archive: {} ({:.1} MB); import with `ctr image import {}` or `podman load -i {}`",
            a.display(),
            len as f64 / 1e6,
            a.display(),
            a.display()
        );
    }
    Ok(())
}

/// `cargo build --release -p flowtrace` (a no-op when fresh, so the image never ships a
/// binary older than the sources), then `target/release/flowtrace`.
fn release_binary() -> Result<PathBuf> {
    let target = crate::build::cargo_release_build(&["-p", "flowtrace", "--bin", "flowtrace"])?;
    let bin = target.join("release").join("flowtrace");
    if !bin.is_file() {
        bail!(
            "cargo reported success but {} does not exist; is CARGO_TARGET_DIR set differently?",
            bin.display()
        );
    }
    Ok(bin)
}
