//! Loading flowtrace's kernel programs and attaching them to interfaces.
//!
//! TCX (kernel >= 6.6) is preferred: the attachment is a bpf_link owned by a file
//! descriptor, so the kernel detaches it by itself when the agent exits, even on SIGKILL.
//! On older kernels the classic clsact qdisc + cls_bpf filter is used; those outlive the
//! process, so the agent detaches its filters at exit, removes filters a killed earlier run
//! left (found by program name) at start-up, and removes a clsact qdisc only where it
//! created it.

use std::collections::HashMap;

use aya::{
    maps::{Array, ProgramArray},
    programs::{
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
        LinkOrder, RawTracePoint, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use tracing::{debug, info, warn};

use flowtrace_common::{cache_slots_for, drops::DropLayout, maps, programs, FLOW_BUFFERS};

use super::{btf::Btf, drain::BufferSizes, seccomp};
use crate::{
    error::{Error, Result},
    model::wire::AttachMode,
};

/// The object built from `flowtrace-ebpf` by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flowtrace"));

/// Resolves `Auto` against the running kernel.
pub fn resolve_mode(mode: AttachMode) -> AttachMode {
    match mode {
        AttachMode::Auto => {
            if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
                AttachMode::Tcx
            } else {
                AttachMode::Clsact
            }
        }
        other => other,
    }
}

/// The kernel buffers' sizes for this machine: the flow cache sized from the number of
/// possible CPUs (`cache_slots_for`, so the cache's memory stays flat in the CPU count) and
/// an event ring of `ring_mib` MiB.
pub fn buffer_sizes(ring_mib: u32) -> Result<BufferSizes> {
    let cpus = aya::util::nr_cpus().map_err(|(path, e)| Error::Map {
        map: maps::CACHE,
        detail: format!("reading the possible CPUs from {path}: {e}"),
    })? as u32;
    Ok(BufferSizes {
        cache_slots: cache_slots_for(cpus),
        cpus,
        ring_bytes: ring_mib.saturating_mul(1024 * 1024),
    })
}

/// Loads the embedded object with the given buffer sizes.
pub fn load(sizes: &BufferSizes, drop_entries: u32) -> Result<Ebpf> {
    load_object(EBPF_OBJECT, sizes, drop_entries)
}

/// Loads `object`, a build of flowtrace's kernel programs (the embedded one, or another
/// build's for a benchmark's comparison), with the given buffer sizes.
pub fn load_object(object: &[u8], sizes: &BufferSizes, drop_entries: u32) -> Result<Ebpf> {
    let shift: u32 = 32 - sizes.cache_slots.trailing_zeros();
    let wake: u64 = u64::from(sizes.ring_bytes) / 8;
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(maps::CACHE, FLOW_BUFFERS * sizes.cache_slots);
    loader.map_max_entries(maps::EVENTS, sizes.ring_bytes);
    loader.override_global(maps::CACHE_SHIFT, &shift, true);
    loader.override_global(maps::EVENTS_WAKE_BYTES, &wake, true);
    loader.map_max_entries(maps::DROPS_0, drop_entries);
    loader.map_max_entries(maps::DROPS_1, drop_entries);
    let mut ebpf = loader.load(object).map_err(|source| Error::Load {
        hint: seccomp::refusal_hint(
            seccomp::Mode::current(),
            seccomp::errno_of(&source),
            seccomp::LOAD_HINT,
        ),
        source,
    })?;
    // The slow path first: the hooks tail-call it, so it is in its program array before
    // any hook can run.
    for program in [programs::SLOW].into_iter().chain(programs::ALL) {
        classifier(&mut ebpf, program)?
            .load()
            .map_err(|e| Error::Program {
                program,
                hint: load_hint(&e),
                detail: format!("{e} (verifier log: {e:?})"),
            })?;
    }
    install_slow_path(&mut ebpf)?;
    Ok(ebpf)
}

/// Puts the loaded slow path into the hooks' program array (index 0).
fn install_slow_path(ebpf: &mut Ebpf) -> Result<()> {
    let fd = classifier(ebpf, programs::SLOW)?
        .fd()
        .map_err(|e| Error::Program {
            program: programs::SLOW,
            detail: e.to_string(),
            hint: "The agent binary and its embedded kernel object disagree: rebuild flowtrace",
        })?
        .try_clone()
        .map_err(|e| Error::Map {
            map: maps::SLOW_PATH,
            detail: format!("duplicating the slow path's program fd: {e}"),
        })?;
    let map = ebpf.map_mut(maps::SLOW_PATH).ok_or(Error::Map {
        map: maps::SLOW_PATH,
        detail: "not in object".into(),
    })?;
    let mut array = ProgramArray::try_from(map).map_err(|e| Error::Map {
        map: maps::SLOW_PATH,
        detail: e.to_string(),
    })?;
    array.set(0, &fd, 0).map_err(|e| Error::Map {
        map: maps::SLOW_PATH,
        detail: format!("writing the slow path into its program array: {e}"),
    })
}

/// The drop programs attached: the names of this kernel's drop reasons by code.
pub type DropReasons = HashMap<u32, String>;

/// Hands the drop programs this kernel's struct layout, loads them and attaches them to
/// their raw tracepoints (once per agent; the links go with the agent's file descriptors,
/// so nothing stays attached after it exits, even when killed). On failure flowtrace still
/// counts flows; the error says why drops are not recorded and what to change.
pub fn attach_tracepoints(ebpf: &mut Ebpf) -> std::result::Result<DropReasons, String> {
    let btf = Btf::from_kernel().map_err(|e| {
        format!("{e}: drop reasons need the kernel's BTF (CONFIG_DEBUG_INFO_BTF, /sys/kernel/btf/vmlinux readable by the agent)")
    })?;
    let layout = btf
        .drop_layout()
        .map_err(|e| format!("{e}: this kernel does not have what the drop programs read (kfree_skb with a reason needs Linux >= 5.17)"))?;
    let reasons = btf
        .drop_reasons()
        .map_err(|e| format!("{e}: drop reasons need Linux >= 5.17 with BTF"))?;
    write_layout(ebpf, layout)?;
    if let Err(e) = load_tracepoints(ebpf) {
        // All or nothing: a program attached before the failure would keep recording what
        // the API then says is not recorded.
        for (program, _) in programs::TRACEPOINTS {
            let prog: Option<&mut RawTracePoint> =
                ebpf.program_mut(program).and_then(|p| p.try_into().ok());
            if let Some(p) = prog {
                let _ = p.unload();
            }
        }
        return Err(e);
    }
    info!(
        reasons = reasons.len(),
        "drop and retransmission programs attached"
    );
    Ok(reasons)
}

fn load_tracepoints(ebpf: &mut Ebpf) -> std::result::Result<(), String> {
    for (program, tracepoint) in programs::TRACEPOINTS {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| {
                format!("program `{program}` is not in the embedded object: rebuild flowtrace")
            })?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| format!("program `{program}`: {e}"))?;
        prog.load()
            .map_err(|e| format!("loading `{program}` failed: {e}. {}", tracepoint_hint(&e)))?;
        prog.attach(tracepoint).map_err(|e| {
            format!(
                "attaching `{program}` to the raw tracepoint {tracepoint} failed: {e}. {}",
                tracepoint_hint(&e)
            )
        })?;
    }
    Ok(())
}

fn write_layout(ebpf: &mut Ebpf, layout: DropLayout) -> std::result::Result<(), String> {
    let map = ebpf.map_mut(maps::DROP_LAYOUT).ok_or_else(|| {
        format!(
            "map {} is not in the embedded object: rebuild flowtrace",
            maps::DROP_LAYOUT
        )
    })?;
    let mut array: Array<_, DropLayout> =
        Array::try_from(map).map_err(|e| format!("map {}: {e}", maps::DROP_LAYOUT))?;
    array
        .set(0, layout, 0)
        .map_err(|e| format!("writing map {}: {e}", maps::DROP_LAYOUT))
}

/// What to do when the kernel refuses a tracepoint program.
fn tracepoint_hint(e: &aya::programs::ProgramError) -> &'static str {
    let text = format!("{e:?}");
    if text.contains("PermissionDenied") || text.contains("Operation not permitted") {
        seccomp::refusal_hint(
            seccomp::Mode::current(),
            Some(libc::EPERM),
            "Raw tracepoint programs need CAP_BPF and CAP_PERFMON",
        )
    } else {
        "The kernel needs raw tracepoints (BPF_PROG_TYPE_RAW_TRACEPOINT, Linux >= 4.17) and BTF"
    }
}

/// What to do about a program the kernel refused, told apart by how it refused.
fn load_hint(e: &aya::programs::ProgramError) -> &'static str {
    let aya::programs::ProgramError::LoadError {
        io_error,
        verifier_log,
    } = e
    else {
        return "The agent binary and its embedded kernel object disagree: rebuild flowtrace";
    };
    let log = verifier_log.to_string();
    if io_error.kind() == std::io::ErrorKind::PermissionDenied && log.trim().is_empty() {
        seccomp::refusal_hint(
            seccomp::Mode::current(),
            io_error.raw_os_error(),
            "The kernel refused before verifying: loading a TC program needs CAP_NET_ADMIN as well as CAP_BPF (the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)",
        )
    } else if [
        "!root",
        "pointer -= pointer prohibited",
        "pointer arithmetic",
        "leaks addr",
    ]
    .iter()
    .any(|m| log.contains(m))
    {
        // What the verifier refuses to a loader without CAP_PERFMON (no pointer arithmetic
        // beyond the basics, no pointer leaks), whichever program it meets first.
        "The verifier treats the agent as unprivileged: it needs CAP_PERFMON (with CAP_BPF and CAP_NET_ADMIN)"
    } else {
        "The verifier log above says which instruction was refused; the kernel needs BTF and must be >= 5.15"
    }
}

/// The TC program `program` of the loaded object.
fn classifier<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(program)
        .ok_or(Error::Program {
            program,
            detail: "not in the embedded object".into(),
            hint: "The agent binary and its embedded kernel object disagree: rebuild flowtrace",
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| Error::Program {
            program,
            detail: e.to_string(),
            hint: "The agent binary and its embedded kernel object disagree: rebuild flowtrace",
        })
}

/// One interface flowtrace is attached to.
#[derive(Debug)]
struct Attached {
    name: String,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
    /// clsact mode only: the qdisc did not exist before us, so we remove it again.
    created_qdisc: bool,
}

/// Owns the loaded programs and their attachments.
pub struct Attacher {
    ebpf: Ebpf,
    mode: AttachMode,
    attached: HashMap<u32, Attached>,
}

impl Attacher {
    pub fn new(ebpf: Ebpf, mode: AttachMode) -> Self {
        Self {
            ebpf,
            mode: resolve_mode(mode),
            attached: HashMap::new(),
        }
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Attaches both hooks to `name` (`ifindex`). Idempotent per ifindex.
    pub fn attach(&mut self, ifindex: u32, name: &str) -> Result<()> {
        if self.attached.contains_key(&ifindex) {
            return Ok(());
        }
        let mut created_qdisc = false;
        let mut qdisc_error = None;
        if self.mode == AttachMode::Clsact {
            remove_stale_filters(name);
            // Fails when a clsact qdisc is already there (the kernel words that differently
            // across versions); attaching below tells whether it was a real problem.
            match tc::qdisc_add_clsact(name) {
                Ok(()) => created_qdisc = true,
                Err(e) => qdisc_error = Some(e.to_string()),
            }
        }
        let ingress = match self.attach_one(programs::INGRESS, name, TcAttachType::Ingress) {
            Ok(link) => link,
            Err(Error::Attach {
                program,
                interface,
                direction,
                detail,
            }) if qdisc_error.is_some() => {
                let q = qdisc_error.unwrap_or_default();
                return Err(Error::Attach {
                    program,
                    interface,
                    direction,
                    detail: format!("{detail} (adding the clsact qdisc failed too: {q})"),
                });
            }
            Err(e) => return Err(e),
        };
        let egress = match self.attach_one(programs::EGRESS, name, TcAttachType::Egress) {
            Ok(link) => link,
            Err(e) => {
                let _ = self.detach_one(programs::INGRESS, ingress);
                return Err(e);
            }
        };
        info!(interface = name, ifindex, mode = ?self.mode, "attached");
        self.attached.insert(
            ifindex,
            Attached {
                name: name.to_string(),
                ingress,
                egress,
                created_qdisc,
            },
        );
        Ok(())
    }

    fn program(&mut self, program: &'static str) -> Result<&mut SchedClassifier> {
        classifier(&mut self.ebpf, program)
    }

    fn attach_one(
        &mut self,
        program: &'static str,
        name: &str,
        attach_type: TcAttachType,
    ) -> Result<SchedClassifierLinkId> {
        let mode = self.mode;
        let prog = self.program(program)?;
        let options = match mode {
            // Appended after existing programs: whatever ran before us still runs first,
            // and our TCX_NEXT return lets anything attached later run too.
            AttachMode::Tcx | AttachMode::Auto => TcAttachOptions::TcxOrder(LinkOrder::default()),
            AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
        };
        prog.attach_with_options(name, attach_type, options)
            .map_err(|e| Error::Attach {
                program,
                interface: name.to_string(),
                direction: if attach_type == TcAttachType::Ingress {
                    "ingress"
                } else {
                    "egress"
                },
                detail: e.to_string(),
            })
    }

    fn detach_one(&mut self, program: &'static str, link: SchedClassifierLinkId) -> Result<()> {
        let prog = self.program(program)?;
        prog.detach(link).map_err(|e| Error::Detach {
            program,
            detail: e.to_string(),
        })
    }

    /// Forgets an interface; the kernel has usually detached already because it is gone.
    pub fn forget(&mut self, ifindex: u32) {
        if let Some(a) = self.attached.remove(&ifindex) {
            // Detaching a link whose device vanished fails harmlessly; the fd is closed either way.
            let _ = self.detach_one(programs::INGRESS, a.ingress);
            let _ = self.detach_one(programs::EGRESS, a.egress);
            debug!(interface = %a.name, ifindex, "forgotten");
        }
    }

    /// Detaches both programs from a link that is still there but no longer to be traced;
    /// `Some(created_qdisc)` when it was attached (clsact mode: whether flowtrace added the
    /// qdisc, which the caller then removes), `None` when it was not.
    pub fn detach(&mut self, ifindex: u32) -> Option<bool> {
        let a = self.attached.remove(&ifindex)?;
        for (program, link) in [(programs::INGRESS, a.ingress), (programs::EGRESS, a.egress)] {
            if let Err(e) = self.detach_one(program, link) {
                warn!(interface = %a.name, error = %e, "detaching");
            }
        }
        Some(a.created_qdisc)
    }

    /// The kernel's view of each loaded program, classifiers and tracepoint programs.
    fn program_infos(&self) -> Vec<(&'static str, aya::programs::ProgramInfo)> {
        let tracepoints = programs::TRACEPOINTS.iter().map(|(p, _)| *p);
        programs::ALL
            .iter()
            .copied()
            .chain([programs::SLOW])
            .chain(tracepoints)
            .filter_map(|name| Some((name, self.ebpf.program(name)?.info().ok()?)))
            .collect()
    }

    /// Kernel IDs of the loaded programs, as (program name, id), for `bpftool prog show id N`.
    pub fn program_ids(&mut self) -> Vec<(String, u32)> {
        self.program_infos()
            .into_iter()
            .map(|(name, info)| (name.to_string(), info.id()))
            .collect()
    }

    /// The kernel's run statistics of each loaded program: (name, total run time in ns,
    /// runs). Both stay 0 unless `kernel.bpf_stats_enabled` is 1 (the kernel does not
    /// time programs otherwise).
    pub fn program_stats(&mut self) -> Vec<(String, u64, u64)> {
        self.program_infos()
            .into_iter()
            .map(|(name, info)| {
                (
                    name.to_string(),
                    info.run_time().as_nanos() as u64,
                    info.run_count(),
                )
            })
            .collect()
    }

    /// The interfaces currently attached, as (ifindex, name).
    pub fn interfaces(&self) -> Vec<(u32, String)> {
        let mut v: Vec<_> = self
            .attached
            .iter()
            .map(|(i, a)| (*i, a.name.clone()))
            .collect();
        v.sort();
        v
    }

    /// Detaches everything. Called on SIGINT/SIGTERM; TCX links would also go with the fd.
    /// Returns the interfaces whose clsact qdisc flowtrace added and should now remove.
    pub fn detach_all(&mut self) -> Vec<u32> {
        let mut qdiscs = Vec::new();
        for (ifindex, a) in std::mem::take(&mut self.attached) {
            if let Err(e) = self.detach_one(programs::INGRESS, a.ingress) {
                warn!(interface = %a.name, error = %e, "detaching ingress");
            }
            if let Err(e) = self.detach_one(programs::EGRESS, a.egress) {
                warn!(interface = %a.name, error = %e, "detaching egress");
            }
            if a.created_qdisc {
                qdiscs.push(ifindex);
            }
        }
        info!("detached from every interface");
        qdiscs
    }
}

/// Removes cls_bpf filters left by an earlier flowtrace that was killed (clsact mode only).
fn remove_stale_filters(name: &str) {
    for (program, attach_type) in [
        (programs::INGRESS, TcAttachType::Ingress),
        (programs::EGRESS, TcAttachType::Egress),
    ] {
        match tc::qdisc_detach_program(name, attach_type, program) {
            Ok(()) => info!(
                interface = name,
                program, "removed a filter left by an earlier run"
            ),
            Err(e) => debug!(interface = name, program, error = %e, "no stale filter"),
        }
    }
}

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

    /// The per-packet programs must not call LLVM's memcpy/memset/memcmp: in BPF these are
    /// byte-at-a-time loops, and one of them (a derived key comparison) once cost more than the
    /// whole rest of the hot path under real traffic.
    #[test]
    fn programs_call_no_byte_loops() {
        let obj = object::File::parse(super::EBPF_OBJECT).expect("the embedded object is ELF");
        let mut calls = Vec::new();
        for section in obj
            .sections()
            .filter(|s| s.name().is_ok_and(|n| n == "classifier"))
        {
            for (_, reloc) in section.relocations() {
                if let RelocationTarget::Symbol(idx) = reloc.target() {
                    let name = obj
                        .symbol_by_index(idx)
                        .and_then(|s| s.name().map(String::from))
                        .unwrap_or_default();
                    if ["memcpy", "memset", "memcmp", "bcmp", "memmove"].contains(&name.as_str()) {
                        calls.push(name);
                    }
                }
            }
        }
        assert!(calls.is_empty(), "kernel programs call {calls:?}: find the struct copy/compare/zeroing that LLVM lowered to a libcall");
    }
}
