//! The flowtrace OCI image, built on this machine without a registry: the release binary on
//! `FROM scratch` with exactly the shared libraries it links (and the dynamic loader), each at
//! the path the binary's loader finds it, committed with `buildah` and optionally saved as an
//! OCI archive for `ctr image import` / `podman load`.
//!
//! `cargo xtask image` and the real-runtime test (`tests/tests/cluster/runtime.rs`) both call
//! [`build`], so what the test runs is what the command ships. `deploy/Dockerfile` (for
//! builders with a registry) produces the same layout; the deploy tests compare its
//! ENTRYPOINT, CMD, USER and EXPOSE with the constants here.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::netns::display_cmd;
use crate::{Error, Result};

/// Where the binary lives in the image.
pub const BINARY_PATH: &str = "/usr/local/bin/flowtrace";
/// The image's ENTRYPOINT.
pub const ENTRYPOINT: [&str; 1] = [BINARY_PATH];
/// The image's CMD: the DaemonSet runs the agent; the relay's Deployment overrides it.
pub const CMD: [&str; 1] = ["agent"];
/// The image's USER (numeric: the image has no /etc/passwd).
pub const USER: &str = "0";
/// The image's EXPOSE: agent metrics 9651, agent mTLS data API 9652, relay metrics 9661.
pub const PORTS: [u16; 3] = [9651, 9652, 9661];
/// The repository the image is tagged in (`localhost/flowtrace:<version>`).
pub const REPOSITORY: &str = "localhost/flowtrace";

/// A private containers-storage root (`--root`, `--runroot`, the `vfs` driver: plain
/// directories, no overlay mounts to leak), for tests that must not touch the machine's image
/// store. `None` in [`BuildOptions`] means the default store (`podman images` sees it).
#[derive(Clone, Debug)]
pub struct Storage {
    pub root: PathBuf,
    pub runroot: PathBuf,
}

impl Storage {
    /// A store under `dir` (`dir/storage`, `dir/run`).
    pub fn under(dir: &Path) -> Storage {
        Storage {
            root: dir.join("storage"),
            runroot: dir.join("run"),
        }
    }

    /// The global flags buildah and podman take to use this store.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.display().to_string(),
            "--runroot".into(),
            self.runroot.display().to_string(),
            "--storage-driver".into(),
            "vfs".into(),
        ]
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The release `flowtrace` binary to ship.
    pub binary: PathBuf,
    /// Full image name, e.g. `localhost/flowtrace:0.1.0` ([`default_tag`]).
    pub tag: String,
    /// `None`: the machine's default containers-storage.
    pub storage: Option<Storage>,
    /// Also save the image there as an OCI archive (`buildah push ... oci-archive:PATH`).
    pub archive: Option<PathBuf>,
}

/// What was built.
#[derive(Clone, Debug)]
pub struct Built {
    pub tag: String,
    /// The image ID buildah printed.
    pub id: String,
    /// Size of the image (its one layer, uncompressed), bytes, as `podman image inspect` reports it.
    pub size_bytes: u64,
    /// Every file put into the image, by its path there.
    pub files: Vec<String>,
    pub archive: Option<PathBuf>,
}

/// `localhost/flowtrace:<version>`, the version as `binary --version` prints it (the
/// workspace version of flowtrace/Cargo.toml the binary was built from).
pub fn default_tag(binary: &Path) -> Result<String> {
    let out = output(Command::new(binary).arg("--version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .nth(1)
        .filter(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .ok_or_else(|| Error::Parse {
            cmd: format!("{} --version", binary.display()),
            detail: format!("expected `flowtrace <version>`, got {text:?}"),
        })?;
    Ok(format!("{REPOSITORY}:{version}"))
}

/// The files the dynamic loader maps for `binary`, read from `ldd`'s output (the ELF's
/// DT_NEEDED list resolved the loader's way, plus the loader itself); empty for a static
/// binary. A library `ldd` cannot find is an error.
pub fn needed_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let cmd = format!("ldd {}", binary.display());
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| Error::Spawn {
            cmd: format!("{cmd} (ldd is in Debian's libc-bin)"),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let said = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        // glibc's ldd exits 1 for a static binary and says so.
        if said.contains("not a dynamic executable") || said.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(Error::Command {
            cmd,
            status: out.status.to_string(),
            stderr: said.trim().to_string(),
        });
    }
    parse_ldd(&text).map_err(|detail| Error::Parse { cmd, detail })
}

/// The library paths in `ldd` output: `name => /path (0x...)` and `/path (0x...)` lines; the
/// vDSO (no path) is the kernel's.
fn parse_ldd(text: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!(
                        "library {} not found: install it before building the image",
                        name.trim()
                    ));
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if !path.starts_with("linux-vdso") && !path.starts_with("linux-gate") {
            return Err(format!("a line without a library path: {line:?}"));
        }
    }
    Ok(libs)
}

/// Lays the image's files out under `dir`: the binary, without its debug sections, at
/// [`BINARY_PATH`] and each of `libs` (symlinks followed) at its own path. Returns the paths
/// in the image.
pub fn stage_rootfs(binary: &Path, libs: &[PathBuf], dir: &Path) -> Result<Vec<String>> {
    let io = |what: String| move |source| Error::Io { what, source };
    let bin_dst = dir.join(BINARY_PATH.trim_start_matches('/'));
    let parent = bin_dst.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    // The release profile keeps line tables (debug = 1) for profiling: 160 MB of them. The
    // symbol table stays, so backtraces still name functions.
    output(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&bin_dst),
    )?;
    let mut files = vec![BINARY_PATH.to_string()];
    for lib in libs {
        let rel = lib.strip_prefix("/").map_err(|_| {
            Error::Invalid(format!("library path {} is not absolute", lib.display()))
        })?;
        let dst = dir.join(rel);
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p).map_err(io(format!("creating {}", p.display())))?;
        }
        std::fs::copy(lib, &dst).map_err(io(format!(
            "copying {} to {}",
            lib.display(),
            dst.display()
        )))?;
        files.push(lib.display().to_string());
    }
    Ok(files)
}

/// Builds the image: stages the files in a temporary directory, `buildah from scratch`,
/// `copy`, `config` (ENTRYPOINT, CMD, USER, EXPOSE, version label), `commit`, then reads the
/// size back and, with [`BuildOptions::archive`], pushes it to an OCI archive. The working
/// container and the staging directory are removed on every path.
pub fn build(opts: &BuildOptions) -> Result<Built> {
    let libs = needed_libraries(&opts.binary)?;
    let stage = TempDir::new("flowtrace-image-stage")?;
    let files = stage_rootfs(&opts.binary, &libs, &stage.0)?;
    let storage = opts.storage.as_ref().map(Storage::args).unwrap_or_default();
    let buildah = |args: &[&str]| -> Result<String> {
        let mut cmd = Command::new("buildah");
        cmd.args(&storage).args(args);
        let out = output(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let working = buildah(&["from", "scratch"])?;
    let cleanup = WorkingContainer {
        storage: storage.clone(),
        id: working.clone(),
    };
    let stage_dir = format!("{}/", stage.0.display());
    buildah(&["copy", &working, &stage_dir, "/"])?;
    let json = |v: &[&str]| serde_json::to_string(v).unwrap_or_default();
    let version = opts.tag.rsplit(':').next().unwrap_or_default();
    let mut config: Vec<String> = vec![
        "config".into(),
        "--entrypoint".into(),
        json(&ENTRYPOINT),
        "--cmd".into(),
        json(&CMD),
        "--user".into(),
        USER.into(),
        "--label".into(),
        format!("org.opencontainers.image.version={version}"),
        "--label".into(),
        "org.opencontainers.image.title=flowtrace".into(),
    ];
    for p in PORTS {
        config.extend(["--port".into(), p.to_string()]);
    }
    config.push(working.clone());
    let config: Vec<&str> = config.iter().map(String::as_str).collect();
    buildah(&config)?;
    // `commit --rm` removes the working container; the guard's `buildah rm` then finds none.
    let id = buildah(&["commit", "--quiet", "--rm", &working, &opts.tag])?;
    drop(cleanup);
    // buildah prints sizes rounded for humans; podman's inspect gives bytes.
    let mut inspect = Command::new("podman");
    inspect
        .args(&storage)
        .args(["image", "inspect", "--format", "{{.Size}}", &opts.tag]);
    let size = output(&mut inspect)?;
    let size = String::from_utf8_lossy(&size.stdout);
    let size_bytes = size.trim().parse().map_err(|e| Error::Parse {
        cmd: format!("podman image inspect --format {{{{.Size}}}} {}", opts.tag),
        detail: format!("{size:?} is not a number of bytes: {e}"),
    })?;
    if let Some(archive) = &opts.archive {
        let _ = std::fs::remove_file(archive);
        let dest = format!("oci-archive:{}:{}", archive.display(), opts.tag);
        buildah(&["push", "--quiet", &opts.tag, &dest])?;
    }
    Ok(Built {
        tag: opts.tag.clone(),
        id,
        size_bytes,
        files,
        archive: opts.archive.clone(),
    })
}

/// Runs `cmd`; fails unless it exits 0, with its command line and standard error.
fn output(cmd: &mut Command) -> Result<std::process::Output> {
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let line = display_cmd(&line);
    let out = cmd.output().map_err(|source| Error::Spawn {
        cmd: format!("{line} (buildah, podman and binutils: `bash scripts/setup.sh`)"),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// buildah's working container, removed on drop (a failed build leaves none behind).
struct WorkingContainer {
    storage: Vec<String>,
    id: String,
}

impl Drop for WorkingContainer {
    fn drop(&mut self) {
        let _ = Command::new("buildah")
            .args(&self.storage)
            .args(["rm", &self.id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A fresh directory under the temporary directory, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/<tag>-<pid>x<n>`.
    pub fn new(tag: &str) -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", crate::netns::new_prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f01)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(missing.contains("libfoo.so.1"), "{missing}");
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }
}
