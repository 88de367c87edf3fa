//! The reference programs of the benchmark (`bench_noop`, `bench_counter` from
//! `flowtrace_tests::baselines::OBJECT`), attached with TCX to the hooks flowtrace uses, and
//! the helper process that holds them (also used for the peer object, `crate::peer`).
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

/// A running helper (`hold-baselines`, `hold-peer`) in one node's namespace, holding programs
/// attached. Killed on drop, which detaches them.
pub struct Holder {
    guard: Option<ChildGuard>,
    stdin: Option<ChildStdin>,
    pid: u32,
    netns: String,
    /// The helper's ready line (what it attached, how long it took).
    pub ready_line: String,
}

/// A helper started but not yet known to be attached: [`Launched::wait_ready`] waits for its
/// ready line. Several can be launched first and waited for together (a slow peer object then
/// loads in every node at once).
pub struct Launched {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
    pid: u32,
    netns: String,
    what: String,
    ready: &'static str,
    line: mpsc::Receiver<std::io::Result<String>>,
}

impl Holder {
    /// Starts `hold-baselines` with the named reference programs on `ifaces` without waiting.
    pub fn launch_programs(netns: &str, ifaces: &[String], programs: &[&str]) -> Result<Launched> {
        if ifaces.is_empty() {
            bail!("no interfaces to attach the baselines to in {netns}");
        }
        let argv = [
            "hold-baselines".to_string(),
            "--iface".into(),
            ifaces.join(","),
            "--program".into(),
            programs.join(","),
        ];
        Holder::launch(netns, &argv, READY)
    }

    /// Starts `xtask <argv...>` in `netns` (a helper that prints a line starting with `ready`
    /// once attached, then holds until its stdin closes) without waiting for it.
    pub fn launch(netns: &str, argv: &[String], ready: &'static str) -> Result<Launched> {
        let exe = std::env::current_exe().context("finding the running xtask binary")?;
        let what = format!("ip netns exec {netns} {} {}", exe.display(), argv.join(" "));
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&exe)
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{what}`"))?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let guard = ChildGuard::new(child, what.clone());
        let stdout = stdout.context("the helper's stdout was not captured")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let res = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(res);
        });
        Ok(Launched {
            guard,
            stdin,
            pid,
            netns: netns.to_string(),
            what,
            ready,
            line: rx,
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
            .with_context(|| format!("the helper in {} did not exit cleanly", self.netns))
    }
}

impl Launched {
    /// Waits up to `timeout` for the helper's ready line; on anything else it is killed and
    /// the error carries what it printed.
    pub fn wait_ready(self, timeout: Duration) -> Result<Holder> {
        let Launched {
            mut guard,
            stdin,
            pid,
            netns,
            what,
            ready,
            line,
        } = self;
        match line.recv_timeout(timeout) {
            Ok(Ok(line)) if line.starts_with(ready) => Ok(Holder {
                guard: Some(guard),
                stdin,
                pid,
                netns,
                ready_line: line.trim().to_string(),
            }),
            other => {
                let detail = match other {
                    Ok(Ok(line)) => format!("it printed {line:?} instead of the ready line"),
                    Ok(Err(e)) => format!("reading its output: {e}"),
                    Err(_) => format!("no ready line within {timeout:?}"),
                };
                drop(stdin);
                let _ = guard.child_mut().map(std::process::Child::kill);
                let err = guard.wait_output(Duration::from_secs(5)).err();
                let stderr = err.map(|e| e.to_string()).unwrap_or_default();
                Err(anyhow!(
                    "`{what}` failed to attach its programs: {detail}\n{stderr}"
                ))
            }
        }
    }
}
