//! The reference programs of the benchmark (`bench_noop`, `bench_counter` from
//! `flowtrace_tests::baselines::OBJECT`), attached with TCX next to flowtrace's own programs.
//!
//! Attaching happens in a helper process (`xtask hold-baselines`) started with
//! `ip netns exec <node-ns>`, because interface names resolve in the caller's network namespace.
//! TCX links are owned by file descriptors, so they disappear with that process, however it ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType};
use aya::Ebpf;
use flowtrace_tests::{baselines, ChildGuard};

/// The reference programs, in the order they are attached.
pub const PROGRAMS: [&str; 2] = baselines::PROGRAMS;

/// The line the helper prints once everything is attached.
const READY: &str = "baselines ready";

/// `xtask hold-baselines`: loads and attaches the named reference programs to every interface
/// in `ifaces` (ingress and egress, appended to the TCX chain), then waits for stdin to close.
pub fn hold(ifaces: &[String], programs: &[String]) -> Result<()> {
    let mut ebpf = Ebpf::load(baselines::OBJECT)
        .context("loading the baselines eBPF object (needs root / CAP_BPF)")?;
    for name in programs {
        let name = name.as_str();
        if !PROGRAMS.contains(&name) {
            bail!(
                "unknown reference program {name:?}; known: {}",
                PROGRAMS.join(", ")
            );
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| {
                format!("program {name} is not in the baselines object; rebuild xtask")
            })?
            .try_into()
            .with_context(|| {
                format!("program {name} in the baselines object is not a TC classifier")
            })?;
        prog.load()
            .with_context(|| format!("the verifier rejected {name}"))?;
        for iface in ifaces {
            for (dir, attach_type) in [
                ("ingress", TcAttachType::Ingress),
                ("egress", TcAttachType::Egress),
            ] {
                prog.attach_with_options(iface, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .with_context(|| {
                        format!("attaching {name} to {iface} {dir} with TCX (kernel >= 6.6 and the interface must exist)")
                    })?;
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{READY}: {} on {}",
        programs.join(", "),
        ifaces.join(",")
    )
    .and_then(|()| stdout.flush())
    .context("telling the parent the baselines are attached")?;
    // Hold the programs (and with them the TCX links) until the parent closes our stdin or
    // signals us; SIGTERM's default action ends the process, which also drops the links.
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading stdin while holding the baselines"),
        }
    }
    drop(ebpf);
    Ok(())
}

/// A running `hold-baselines` helper in one node's namespace. Killed on drop.
pub struct Holder {
    guard: Option<ChildGuard>,
    stdin: Option<ChildStdin>,
    pid: u32,
    netns: String,
}

impl Holder {
    /// Starts the helper in `netns` with both reference programs on `ifaces` and waits until it
    /// reports them attached.
    pub fn start(netns: &str, ifaces: &[String]) -> Result<Holder> {
        Holder::start_programs(netns, ifaces, &PROGRAMS)
    }

    /// Like `start`, with only the named reference programs.
    pub fn start_programs(netns: &str, ifaces: &[String], programs: &[&str]) -> Result<Holder> {
        if ifaces.is_empty() {
            bail!("no interfaces to attach the baselines to in {netns}");
        }
        let exe = std::env::current_exe().context("finding the running xtask binary")?;
        let iface_arg = ifaces.join(",");
        let what = format!(
            "ip netns exec {netns} {} hold-baselines --iface {iface_arg} --program {}",
            exe.display(),
            programs.join(",")
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&exe)
            .args(["hold-baselines", "--iface", &iface_arg, "--program"])
            .arg(programs.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{what}`"))?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let mut guard = ChildGuard::new(child, what.clone());
        let stdout = stdout.context("the helper's stdout was not captured")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let res = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(res);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(line)) if line.starts_with(READY) => {}
            other => {
                let detail = match other {
                    Ok(Ok(line)) => format!("it printed {line:?} instead of the ready line"),
                    Ok(Err(e)) => format!("reading its output: {e}"),
                    Err(_) => "no ready line within 30 s".to_string(),
                };
                drop(stdin);
                let _ = guard.child_mut().map(std::process::Child::kill);
                let err = guard.wait_output(Duration::from_secs(5)).err();
                let stderr = err.map(|e| e.to_string()).unwrap_or_default();
                return Err(anyhow!(
                    "`{what}` failed to attach the baselines: {detail}\n{stderr}"
                ));
            }
        }
        Ok(Holder {
            guard: Some(guard),
            stdin,
            pid,
            netns: netns.to_string(),
        })
    }

    /// The helper's pid (it holds the programs' file descriptors).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Closes the helper's stdin and waits for it to exit, which detaches the programs.
    pub fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        let guard = self
            .guard
            .take()
            .context("baseline helper already stopped")?;
        guard
            .wait_output(Duration::from_secs(10))
            .map(drop)
            .with_context(|| format!("the baseline helper in {} did not exit cleanly", self.netns))
    }
}
