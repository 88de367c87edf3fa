//! The peer arm of `cargo xtask bench`: another project's prebuilt TC object (NetObserv's
//! eBPF agent, `pkg/ebpf/bpf_x86_bpfel.o`, by default its programs `tcx_ingress_flow_parse` /
//! `tcx_egress_flow_parse` with the global `sampling` set to 1), loaded with aya and attached
//! with TCX to the same hooks as flowtrace, so the comparison can be rerun by anyone who has
//! the object. The object is read at run time from a path the user gives; nothing of it is
//! part of this repository.
//!
//! `xtask hold-peer` runs in a node's namespace (`ip netns exec`, as `hold-baselines` does):
//!
//! - The object's maps are BTF-defined and ask to be pinned by name (libbpf's
//!   `LIBBPF_PIN_BY_NAME`); aya then creates them under a bpffs directory, or reuses what is
//!   pinned there. The helper gives itself a private mount namespace and mounts a bpffs of its
//!   own there, so its maps are its own (never another node's holder's, never anything in the
//!   machine's /sys/fs/bpf) and the pins vanish with the process.
//! - Globals (`.rodata`) other than those given keep the object's values; map sizes are the
//!   object's unless `--max-entries` says otherwise.
//! - The programs' TCX links belong to this process's file descriptors: they go when it exits,
//!   however it ends.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use aya::programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType};
use aya::EbpfLoader;
use object::{Object, ObjectSection, ObjectSymbol};

/// The line the helper prints once everything is attached.
pub const READY: &str = "peer ready";

/// `xtask hold-peer`'s arguments (also what `cargo xtask bench` passes it).
#[derive(clap::Args, Clone, Debug)]
pub struct HoldPeerArgs {
    /// The prebuilt eBPF object (ELF).
    #[arg(long)]
    pub object: PathBuf,
    /// Interfaces to attach to (comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub iface: Vec<String>,
    /// The program attached to every interface's TCX ingress.
    #[arg(long)]
    pub ingress: String,
    /// The program attached to every interface's TCX egress.
    #[arg(long)]
    pub egress: String,
    /// Globals to set, NAME=VALUE (an unsigned integer, written in the symbol's own size,
    /// little-endian), comma separated.
    #[arg(long = "global", value_delimiter = ',')]
    pub globals: Vec<String>,
    /// Map sizes to set, NAME=ENTRIES, comma separated.
    #[arg(long = "max-entries", value_delimiter = ',')]
    pub max_entries: Vec<String>,
}

impl HoldPeerArgs {
    /// The arguments of `xtask hold-peer` that reproduce `self`.
    pub fn to_argv(&self) -> Result<Vec<String>> {
        let object = self
            .object
            .to_str()
            .with_context(|| format!("{} is not a UTF-8 path", self.object.display()))?;
        let mut argv = vec![
            "hold-peer".to_string(),
            "--object".into(),
            object.into(),
            "--iface".into(),
            self.iface.join(","),
            "--ingress".into(),
            self.ingress.clone(),
            "--egress".into(),
            self.egress.clone(),
        ];
        if !self.globals.is_empty() {
            argv.extend(["--global".into(), self.globals.join(",")]);
        }
        if !self.max_entries.is_empty() {
            argv.extend(["--max-entries".into(), self.max_entries.join(",")]);
        }
        Ok(argv)
    }
}

/// Splits `NAME=NUMBER`.
fn name_value(what: &str, s: &str) -> Result<(String, u64)> {
    let (name, value) = s
        .split_once('=')
        .with_context(|| format!("{what} {s:?} is not NAME=NUMBER"))?;
    let value = value
        .trim()
        .parse::<u64>()
        .with_context(|| format!("{what} {s:?}: {value:?} is not an unsigned integer"))?;
    Ok((name.trim().to_string(), value))
}

/// What the object says about itself: the size of every data symbol (for globals) and the
/// names of its functions in program sections (for the error messages).
struct ObjectFacts {
    symbol_sizes: std::collections::HashMap<String, u64>,
    programs: Vec<String>,
}

fn object_facts(data: &[u8], path: &Path) -> Result<ObjectFacts> {
    let file = object::File::parse(data)
        .with_context(|| format!("{} is not an ELF object", path.display()))?;
    let mut symbol_sizes = std::collections::HashMap::new();
    let mut programs = Vec::new();
    for sym in file.symbols() {
        let Ok(name) = sym.name() else { continue };
        if name.is_empty() {
            continue;
        }
        let section = sym
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
            .and_then(|s| s.name().ok().map(String::from))
            .unwrap_or_default();
        match sym.kind() {
            object::SymbolKind::Text if sym.is_global() && section != ".text" => {
                programs.push(format!("{name} ({section})"));
            }
            object::SymbolKind::Data => {
                symbol_sizes.insert(name.to_string(), sym.size());
            }
            _ => {}
        }
    }
    programs.sort();
    Ok(ObjectFacts {
        symbol_sizes,
        programs,
    })
}

/// Gives this process a mount namespace of its own (private propagation, so nothing mounted
/// here is seen elsewhere) with a fresh bpffs on `dir`, for the object's pinned maps.
fn private_bpffs(dir: &Path) -> Result<()> {
    // SAFETY: plain system calls with valid, NUL-terminated arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            bail!(
                "unshare(CLONE_NEWNS) for a private bpffs failed: {} (needs root / CAP_SYS_ADMIN)",
                std::io::Error::last_os_error()
            );
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            bail!(
                "making the helper's mounts private failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .context("the pin directory's path contains a NUL byte")?;
    // SAFETY: as above.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting a bpffs on {} failed: {} (is CONFIG_BPF_SYSCALL set?)",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `xtask hold-peer`: loads the object, attaches its two programs with TCX (appended to each
/// hook's chain), prints the ready line, then holds everything until stdin closes.
pub fn hold(args: &HoldPeerArgs) -> Result<()> {
    let started = Instant::now();
    let data = std::fs::read(&args.object)
        .with_context(|| format!("reading the peer object {}", args.object.display()))?;
    let facts = object_facts(&data, &args.object)?;
    let known = || facts.programs.join(", ");
    for name in [&args.ingress, &args.egress] {
        if !facts
            .programs
            .iter()
            .any(|p| p.split(' ').next() == Some(name.as_str()))
        {
            bail!(
                "{} has no program {name:?}; its programs: {}",
                args.object.display(),
                known()
            );
        }
    }
    let mut globals: Vec<(String, Vec<u8>)> = Vec::new();
    for g in &args.globals {
        let (name, value) = name_value("--global", g)?;
        let size = *facts.symbol_sizes.get(&name).with_context(|| {
            format!(
                "{} has no global {name:?} (see `llvm-objdump -t` for its .rodata/.data symbols)",
                args.object.display()
            )
        })?;
        let bytes = value.to_le_bytes();
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size == 0 || size > bytes.len() || (size < 8 && value >> (8 * size) != 0) {
            bail!("--global {g}: the value does not fit {name}'s {size} bytes");
        }
        globals.push((name, bytes[..size].to_vec()));
    }
    let mut sizes = Vec::new();
    for m in &args.max_entries {
        let (name, n) = name_value("--max-entries", m)?;
        let n = u32::try_from(n).with_context(|| format!("--max-entries {m}: too large"))?;
        sizes.push((name, n));
    }

    // /sys/fs/bpf of this process's own view: sysfs always has that mount point, and the
    // bpffs mounted on it in a private mount namespace hides nothing from anyone else.
    let pin_dir = PathBuf::from("/sys/fs/bpf");
    private_bpffs(&pin_dir)?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&pin_dir);
    for (name, bytes) in &globals {
        loader.override_global(name.as_str(), bytes.as_slice(), true);
    }
    for (name, n) in &sizes {
        loader.map_max_entries(name.as_str(), *n);
    }
    let loaded = loader.load(&data);
    let mut ebpf = loaded.with_context(|| {
        format!(
            "aya could not load the maps of {} (map creation, BTF or relocations; see the cause)",
            args.object.display()
        )
    })?;
    let maps_s = started.elapsed().as_secs_f64();
    for (name, attach_type, dir) in [
        (&args.ingress, TcAttachType::Ingress, "ingress"),
        (&args.egress, TcAttachType::Egress, "egress"),
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("aya found no program {name} in the object"))?
            .try_into()
            .with_context(|| format!("{name} is not a TC classifier (section classifier/...)"))?;
        prog.load()
            .with_context(|| format!("the verifier rejected the peer's {name}"))?;
        for iface in &args.iface {
            prog.attach_with_options(
                iface,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| {
                format!("attaching {name} to {iface} {dir} with TCX (kernel >= 6.6, the interface must exist)")
            })?;
        }
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{READY}: {} + {} on {}; maps created in {maps_s:.1} s, attached after {:.1} s",
        args.ingress,
        args.egress,
        args.iface.join(","),
        started.elapsed().as_secs_f64()
    )
    .and_then(|()| stdout.flush())
    .context("telling the parent the peer's programs are attached")?;
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading stdin while holding the peer's programs"),
        }
    }
    // The bpffs, and every pin on it, goes with this process's mount namespace.
    drop(ebpf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_value_pairs_are_checked() {
        assert_eq!(
            name_value("--global", "sampling=1").unwrap(),
            ("sampling".to_string(), 1)
        );
        assert!(name_value("--global", "sampling").is_err());
        assert!(name_value("--global", "sampling=-1").is_err());
    }

    #[test]
    fn the_helper_gets_back_what_it_was_given() {
        let args = HoldPeerArgs {
            object: PathBuf::from("/tmp/peer.o"),
            iface: vec!["veth0".into(), "flannel.1".into()],
            ingress: "in".into(),
            egress: "out".into(),
            globals: vec!["sampling=1".into()],
            max_entries: vec![],
        };
        assert_eq!(
            args.to_argv().unwrap().join(" "),
            "hold-peer --object /tmp/peer.o --iface veth0,flannel.1 --ingress in --egress out --global sampling=1"
        );
    }
}
