//! What the machine's kernel says, read with its own tools rather than through flowtrace: the
//! loaded BPF programs (`bpftool`), the TC filters and qdiscs (`tc`), and whether we are root.
//! Tests use these as ground truth for what an agent attached and left behind; `cargo xtask`
//! uses the same listing for its per-program cost figures.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Error, Node, Result};

/// Fails with [`Error::NotRoot`] unless the effective user is root (network namespaces, eBPF
/// programs and sysctls all need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

/// One program as `bpftool -j prog show` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgRecord {
    /// Kernel program ID (not reused soon after the program is freed).
    pub id: u32,
    /// Program name as the kernel keeps it (truncated to 15 bytes).
    pub name: String,
    /// Program type as bpftool spells it (`sched_cls`, `raw_tracepoint`, ...).
    pub kind: String,
    /// The kernel's tag of the program's instructions (hex): the same code has the same tag.
    pub tag: String,
    /// Total run time, nanoseconds; 0 unless `kernel.bpf_stats_enabled` was on while it ran
    /// (bpftool omits the field then).
    pub run_time_ns: u64,
    /// Runs counted while `kernel.bpf_stats_enabled` was on.
    pub run_cnt: u64,
}

/// Every loaded BPF program on the machine (`bpftool -j prog show`).
pub fn bpftool_progs() -> Result<Vec<ProgRecord>> {
    let cmd = "bpftool -j prog show";
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .map_err(|source| Error::Spawn {
            cmd: format!("{cmd} (install bpftool with `bash scripts/setup.sh`)"),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: cmd.into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    parse_progs(&out.stdout).map_err(|detail| Error::Parse {
        cmd: cmd.into(),
        detail,
    })
}

fn parse_progs(json: &[u8]) -> std::result::Result<Vec<ProgRecord>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
    let arr = v.as_array().ok_or("not a JSON array")?;
    arr.iter()
        .map(|p| {
            let id = p
                .get("id")
                .and_then(serde_json::Value::as_u64)
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| format!("a program without a numeric id: {p}"))?;
            let num = |k: &str| p.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            Ok(ProgRecord {
                id,
                name: p
                    .get("name")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                kind: p
                    .get("type")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                tag: p
                    .get("tag")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                run_time_ns: num("run_time_ns"),
                run_cnt: num("run_cnt"),
            })
        })
        .collect()
}

/// IDs of loaded kernel programs that belong to flowtrace (named `flowtrace_*`). Program IDs
/// are not reused soon, so comparing sets taken before and after an agent's run isolates that
/// agent's programs even when another flowtrace runs elsewhere on the machine.
pub fn flowtrace_program_ids() -> Result<Vec<u64>> {
    Ok(bpftool_progs()?
        .into_iter()
        .filter(|p| p.name.starts_with("flowtrace_"))
        .map(|p| u64::from(p.id))
        .collect())
}

/// Waits until no flowtrace program but those in `before` is loaded (the kernel frees a
/// program after an RCU grace period); the ones still loaded after `timeout` otherwise.
pub fn wait_programs_gone(
    before: &[u64],
    timeout: std::time::Duration,
) -> std::result::Result<(), Vec<u64>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left: Vec<u64> = flowtrace_program_ids()
            .map_err(|_| Vec::new())?
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(left);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every device in a node that flowtrace traces by default: the pods' host veths and
/// `flannel.1` (not the node's `eth0`, which stands for its NIC).
pub fn traced_devices(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = node.pods.iter().map(|p| p.host_veth.clone()).collect();
    v.push("flannel.1".into());
    v
}

/// What `tc <what...>` prints inside `node`'s namespace (e.g. `filter show dev eth0 ingress`).
pub fn tc_show(node: &Node, what: &[&str]) -> Result<String> {
    let mut args = vec!["tc"];
    args.extend_from_slice(what);
    Ok(String::from_utf8_lossy(&node.exec(&args)?.stdout).to_string())
}

/// Checks that nothing of flowtrace is attached in `node` (no flowtrace TC filter, no clsact
/// qdisc on a traced device, no BPF link holding one of `ids`) and that programs `ids` are
/// unloaded. Fails with [`Error::Check`] naming what is left.
pub fn check_nothing_left(node: &Node, ids: &[u64]) -> Result<()> {
    check_unloaded(ids)?;
    for dev in traced_devices(node) {
        for dir in ["ingress", "egress"] {
            let f = tc_show(node, &["filter", "show", "dev", &dev, dir])?;
            if f.contains("flowtrace") {
                return Err(Error::Check(format!(
                    "{dev} {dir} still has a flowtrace filter: {f}"
                )));
            }
        }
        let q = tc_show(node, &["qdisc", "show", "dev", &dev])?;
        if q.contains("clsact") {
            return Err(Error::Check(format!("{dev} still has a clsact qdisc: {q}")));
        }
    }
    let links = node.exec(&["bpftool", "-j", "link", "show"])?;
    let links: serde_json::Value =
        serde_json::from_slice(&links.stdout).unwrap_or(serde_json::Value::Null);
    for l in links.as_array().into_iter().flatten() {
        let prog = l
            .get("prog_id")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if ids.contains(&prog) {
            return Err(Error::Check(format!(
                "a bpf link still holds flowtrace program {prog}: {l}"
            )));
        }
    }
    Ok(())
}

/// Checks that programs `ids` are no longer loaded. The kernel frees a program after an RCU
/// grace period once its last filter or link is gone, so this allows it 3 s for that.
pub fn check_unloaded(ids: &[u64]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let loaded = flowtrace_program_ids()?;
        let still: Vec<_> = ids.iter().filter(|i| loaded.contains(i)).collect();
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Check(format!(
                "flowtrace programs {still:?} are still loaded"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftool_listing_is_read_with_and_without_stats() {
        let json = br#"[{"id":7,"type":"sched_cls","name":"flowtrace_ingres","tag":"60e480ab6500433c","run_time_ns":900,"run_cnt":3},
                        {"id":9,"type":"tracepoint","name":"other"}]"#;
        let progs = parse_progs(json).unwrap();
        assert_eq!(
            progs,
            vec![
                ProgRecord {
                    id: 7,
                    name: "flowtrace_ingres".into(),
                    kind: "sched_cls".into(),
                    tag: "60e480ab6500433c".into(),
                    run_time_ns: 900,
                    run_cnt: 3
                },
                ProgRecord {
                    id: 9,
                    name: "other".into(),
                    kind: "tracepoint".into(),
                    tag: String::new(),
                    run_time_ns: 0,
                    run_cnt: 0
                },
            ]
        );
        assert!(parse_progs(br#"[{"name":"no id"}]"#).is_err());
        assert!(parse_progs(b"{}").is_err());
    }
}
