//! The image in real container runtimes: the image `cargo xtask image` builds
//! ([`flowtrace_tests::image::build`], into a private store) run by podman (with runc) and by
//! a private containerd (`ctr`), each with exactly what deploy/daemonset.yaml asks of the
//! runtime, read from the manifest: the node's network namespace (hostNetwork), capabilities
//! drop ALL + the add list, a read-only root filesystem, no_new_privs
//! (allowPrivilegeEscalation: false), uid 0, the seccomp profile, the FLOWTRACE_* environment
//! and the volume mounts (the pods' network namespaces read-only, slave propagation). The
//! container joins an emulated node's namespace, as a hostNetwork pod shares the node's.
//!
//! Asserted for each runtime and profile, as measured on this machine (deploy/README.md,
//! "Container runtimes and seccomp"): podman under RuntimeDefault refuses the agent's first
//! map (its default profile allows bpf(2) only with CAP_SYS_ADMIN) and the agent's error
//! says a seccomp filter is the likely cause; podman with deploy/seccomp/flowtrace.json, and
//! containerd with its default profile or with that file, load, attach, count a known UDP
//! flow exactly (ftgen's count, the agent's /v1/flows over the node's loopback) and leave
//! nothing attached after `podman stop` / `ctr task kill`.
//!
//! What is not the manifest's: the ConfigMap volume is an empty directory (an optional
//! ConfigMap not created), the TLS Secret is a `flowtrace certs` run's agent certificate under
//! the Secret's key names, and NODE_NAME (a fieldRef) is the emulated node's name. Needs root,
//! podman, runc, buildah and containerd (`bash scripts/setup.sh`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use flowtrace::{
    kernel::seccomp::FILTER_HINT,
    model::{wire::InterfacesResponse, Direction},
};
use flowtrace_tests::{
    check_nothing_left, find, flowtrace_bin, flowtrace_program_ids, http_get,
    image::{self, BuildOptions, Storage, TempDir},
    netns::ChildGuard,
    require_root, udp_all_received, Certs, Cluster, ClusterOptions, Node, Pod,
};
use serde_json::Value;

const UDP_COUNT: u64 = 150;
const UDP_PAYLOAD: u64 = 64;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every capability the kernel knows (linux/capability.h), as runtimes spell them: ctr has
/// no "drop ALL", so it drops each one the DaemonSet does not add.
const ALL_CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Fails, saying what to install, unless every tool is on PATH: a missing runtime is a
/// failure, never a silent skip.
fn require_tools(tools: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .collect();
    assert!(
        missing.is_empty(),
        "the runtime tests need {missing:?} on PATH: install Debian's podman, runc, buildah and \
         containerd (`bash scripts/setup.sh` does, or `apt-get install podman runc buildah containerd`)"
    );
}

/// Runs `cmd`, returning its output whatever the exit status.
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// Runs `cmd` and fails the test unless it exits 0; returns its trimmed standard output.
fn checked(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The seccomp profile to run under.
#[derive(Clone, Debug, PartialEq)]
enum Seccomp {
    /// The runtime's own default profile.
    RuntimeDefault,
    /// A profile file (`type: Localhost`; the kubelet's root is deploy/seccomp/ here).
    Localhost(PathBuf),
}

/// A bind mount.
#[derive(Debug)]
struct Mount {
    src: PathBuf,
    dst: String,
    read_only: bool,
    /// mountPropagation HostToContainer: `rslave`.
    slave: bool,
}

/// What deploy/daemonset.yaml asks of the runtime for the agent's container on `node`.
#[derive(Debug)]
struct RunSpec {
    netns: String,
    /// Capability names without `CAP_`, as the manifest's `add` list.
    caps: Vec<String>,
    read_only: bool,
    no_new_privs: bool,
    uid: i64,
    seccomp: Seccomp,
    env: Vec<(String, String)>,
    mounts: Vec<Mount>,
    /// The container's args (its command is the image's ENTRYPOINT).
    args: Vec<String>,
}

/// The files the manifest's volumes hold: an empty ConfigMap directory (with the mount point
/// of the nested Secret volume, which the kubelet makes) and the agent's Secret.
struct Volumes {
    dir: TempDir,
    _certs: Certs,
}

impl Volumes {
    fn new() -> Volumes {
        let dir = TempDir::new("flowtrace-runtime-volumes").unwrap();
        let certs = Certs::generate("runtime").unwrap();
        std::fs::create_dir_all(dir.path().join("config/tls")).unwrap();
        let tls = dir.path().join("secret");
        std::fs::create_dir_all(&tls).unwrap();
        // The Secret's keys (`flowtrace certs` writes secrets.yaml with these names).
        for (from, to) in [
            ("agent.crt", "tls.crt"),
            ("agent.key", "tls.key"),
            ("ca.crt", "ca.crt"),
        ] {
            std::fs::copy(certs.dir.join(from), tls.join(to)).unwrap();
        }
        Volumes { dir, _certs: certs }
    }
}

/// Reads the manifest into a [`RunSpec`] for `node`. Anything in it this test does not know
/// how to give a runtime fails the test, so the manifest cannot outgrow what is tested.
fn run_spec(node: &Node, volumes: &Volumes) -> RunSpec {
    let (pod, c) = crate::manifest::daemonset_agent();
    assert_eq!(
        pod.host_network,
        Some(true),
        "the test joins the node's namespace for hostNetwork"
    );
    let sc = c
        .security_context
        .clone()
        .expect("the agent's securityContext");
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_string()][..]),
        "drop ALL expected"
    );
    let caps: Vec<String> = caps.add.unwrap_or_default();
    let profile = sc
        .seccomp_profile
        .clone()
        .or_else(|| {
            pod.security_context
                .as_ref()
                .and_then(|p| p.seccomp_profile.clone())
        })
        .expect("a seccompProfile");
    let seccomp = match profile.type_.as_str() {
        "RuntimeDefault" => Seccomp::RuntimeDefault,
        "Localhost" => Seccomp::Localhost(
            repo()
                .join("deploy/seccomp")
                .join(profile.localhost_profile.expect("localhostProfile")),
        ),
        other => panic!("seccompProfile {other}: add it to this test"),
    };
    let env = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let value = match (e.value, e.value_from) {
                (Some(v), None) => v,
                (None, Some(from)) => {
                    let field = from.field_ref.map(|f| f.field_path);
                    assert_eq!(
                        field.as_deref(),
                        Some("spec.nodeName"),
                        "env {}: add its source",
                        e.name
                    );
                    node.name.clone()
                }
                other => panic!("env {}: {other:?}: add it to this test", e.name),
            };
            (e.name, value)
        })
        .collect();
    let vols = pod.volumes.clone().unwrap_or_default();
    let mounts = c
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let v = vols
                .iter()
                .find(|v| v.name == m.name)
                .expect("the mount's volume");
            let src = if let Some(h) = &v.host_path {
                PathBuf::from(&h.path)
            } else if v.config_map.is_some() {
                volumes.dir.path().join("config")
            } else if v.secret.is_some() {
                volumes.dir.path().join("secret")
            } else {
                panic!("volume {}: add its kind to this test", v.name)
            };
            let slave = match m.mount_propagation.as_deref() {
                None | Some("None") => false,
                Some("HostToContainer") => true,
                Some(other) => panic!("mountPropagation {other}: add it to this test"),
            };
            Mount {
                src,
                dst: m.mount_path,
                read_only: m.read_only == Some(true),
                slave,
            }
        })
        .collect();
    RunSpec {
        netns: node.netns.clone(),
        caps,
        read_only: sc.read_only_root_filesystem == Some(true),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        uid: sc.run_as_user.expect("runAsUser"),
        seccomp,
        env,
        mounts,
        args: c.args.clone().unwrap_or_default(),
    }
}

/// The shipped profile, for `seccompProfile: {type: Localhost, localhostProfile: flowtrace.json}`.
fn shipped_profile() -> Seccomp {
    Seccomp::Localhost(repo().join("deploy/seccomp/flowtrace.json"))
}

/// podman (runc) on a private store, with a test-owned containers.conf (CONTAINERS_CONF):
/// no default ulimits (podman's exceed this sandbox's hard limits), runc, cgroupfs, file logs.
struct Podman {
    dir: TempDir,
    storage: Storage,
}

impl Podman {
    fn new() -> Podman {
        let dir = TempDir::new("flowtrace-runtime-podman").unwrap();
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = []\nlog_driver = \"k8s-file\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        let storage = Storage::under(dir.path());
        Podman { dir, storage }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .args(self.storage.args())
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"));
        cmd
    }

    /// `podman run -d` of `image` as `spec` says.
    fn run(&self, image: &str, name: &str, spec: &RunSpec) -> PodmanContainer<'_> {
        let mut cmd = self.cmd();
        cmd.args([
            "run",
            "-d",
            "--pull",
            "never",
            "--name",
            name,
            "--runtime",
            "runc",
        ])
        .arg(format!("--network=ns:/var/run/netns/{}", spec.netns))
        .args(["--cap-drop", "all"]);
        for c in &spec.caps {
            cmd.args(["--cap-add", c]);
        }
        if spec.read_only {
            // Kubernetes adds no tmpfs to a read-only root; podman would on /tmp, /run, /var/tmp.
            cmd.args(["--read-only", "--read-only-tmpfs=false"]);
        }
        if spec.no_new_privs {
            cmd.args(["--security-opt", "no-new-privileges"]);
        }
        cmd.args(["--user", &spec.uid.to_string()]);
        if let Seccomp::Localhost(p) = &spec.seccomp {
            cmd.arg("--security-opt")
                .arg(format!("seccomp={}", p.display()));
        }
        for (k, v) in &spec.env {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        for m in &spec.mounts {
            let mut opts = vec![if m.read_only { "ro" } else { "rw" }];
            if m.slave {
                opts.push("rslave");
            }
            cmd.args([
                "--volume",
                &format!("{}:{}:{}", m.src.display(), m.dst, opts.join(",")),
            ]);
        }
        cmd.arg(image).args(&spec.args);
        checked(&mut cmd);
        PodmanContainer {
            podman: self,
            name: name.to_string(),
        }
    }
}

/// A podman container, removed (killed first) on drop.
struct PodmanContainer<'a> {
    podman: &'a Podman,
    name: String,
}

impl PodmanContainer<'_> {
    fn inspect(&self, format: &str) -> String {
        checked(
            self.podman
                .cmd()
                .args(["inspect", "--format", format, &self.name]),
        )
    }

    fn running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    fn pid(&self) -> u32 {
        self.inspect("{{.State.Pid}}").parse().unwrap()
    }

    fn logs(&self) -> String {
        let out = output(self.podman.cmd().args(["logs", &self.name]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The OCI spec podman handed runc (its resolved seccomp profile among it).
    fn oci_spec(&self) -> Value {
        let id = self.inspect("{{.Id}}");
        let path = self
            .podman
            .storage
            .root
            .join("vfs-containers")
            .join(id)
            .join("userdata/config.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }
}

impl Drop for PodmanContainer<'_> {
    fn drop(&mut self) {
        let _ = output(
            self.podman
                .cmd()
                .args(["rm", "--force", "--time", "0", &self.name]),
        );
    }
}

/// A containerd of the test's own (--root, --state, socket, a config without the CRI plugin)
/// under a temporary directory, in a namespace of its own; on drop every task is killed and
/// deleted, then containerd is stopped and its directory removed.
struct Containerd {
    dir: TempDir,
    namespace: String,
    daemon: Option<ChildGuard>,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = TempDir::new("flowtrace-runtime-containerd").unwrap();
        let d = dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting containerd (Debian package containerd)");
        let mut cd = Containerd {
            namespace: format!("flowtrace-test-{}", std::process::id()),
            dir,
            daemon: Some(ChildGuard::new(child, "private containerd")),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !output(cd.ctr().arg("version")).status.success() {
            let exited = cd.daemon.as_mut().is_some_and(ChildGuard::has_exited);
            assert!(
                !exited && Instant::now() < deadline,
                "the private containerd did not come up: {}",
                std::fs::read_to_string(cd.dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cd
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .args(["--namespace", &self.namespace]);
        cmd
    }

    /// `ctr run -d` of `image` as `spec` says; the agent's output goes to `log`.
    fn run(&self, image: &str, id: &str, spec: &RunSpec, log: &Path) -> CtrTask<'_> {
        let mut cmd = self.ctr();
        cmd.args(["run", "-d", "--snapshotter", "native"])
            .arg(format!("--log-uri=file://{}", log.display()))
            .arg(format!("--with-ns=network:/var/run/netns/{}", spec.netns));
        // ctr's default set, minus everything not added; NoNewPrivileges is ctr's default
        // (--allow-new-privs would turn it off).
        for c in ALL_CAPS
            .iter()
            .filter(|c| !spec.caps.iter().any(|a| a == *c))
        {
            cmd.arg(format!("--cap-drop=CAP_{c}"));
        }
        for c in &spec.caps {
            cmd.arg(format!("--cap-add=CAP_{c}"));
        }
        assert!(
            spec.no_new_privs,
            "ctr runs with no_new_privs; the manifest must ask for it"
        );
        if spec.read_only {
            cmd.arg("--read-only");
        }
        // ctr has no --user: the image's USER is the uid.
        assert_eq!(
            spec.uid.to_string(),
            image::USER,
            "runAsUser must be the image's USER here"
        );
        cmd.arg("--seccomp");
        if let Seccomp::Localhost(p) = &spec.seccomp {
            cmd.arg("--seccomp-profile").arg(p);
        }
        for (k, v) in &spec.env {
            cmd.arg(format!("--env={k}={v}"));
        }
        for m in &spec.mounts {
            let mut opts = vec!["rbind", if m.read_only { "ro" } else { "rw" }];
            if m.slave {
                opts.push("rslave");
            }
            cmd.arg(format!(
                "--mount=type=bind,src={},dst={},options={}",
                m.src.display(),
                m.dst,
                opts.join(":")
            ));
        }
        // ctr replaces the whole command line; Kubernetes' `args` replace only CMD.
        cmd.arg(image)
            .arg(id)
            .args(image::ENTRYPOINT)
            .args(&spec.args);
        checked(&mut cmd);
        CtrTask {
            cd: self,
            id: id.to_string(),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let listed = output(self.ctr().args(["task", "ls", "--quiet"]));
        for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
            let _ = output(self.ctr().args(["task", "kill", "--signal", "SIGKILL", id]));
            let _ = output(self.ctr().args(["task", "delete", "--force", id]));
            let _ = output(self.ctr().args(["container", "rm", id]));
        }
        if let Some(mut d) = self.daemon.take() {
            if let Some(pid) = d.id() {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !d.has_exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // The shims' runc keeps its state under /run/containerd/runc/<namespace>; the tasks
        // are gone, the directory is empty.
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.namespace));
    }
}

/// A ctr task and its container, killed and removed on drop.
struct CtrTask<'a> {
    cd: &'a Containerd,
    id: String,
}

impl CtrTask<'_> {
    /// (pid, status) from `ctr task ls`, None once the task is gone.
    fn state(&self) -> Option<(u32, String)> {
        let out = checked(self.cd.ctr().args(["task", "ls"]));
        out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&self.id.as_str()))
                .then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
        })
    }

    fn running(&self) -> bool {
        self.state().is_some_and(|(_, s)| s == "RUNNING")
    }
}

impl Drop for CtrTask<'_> {
    fn drop(&mut self) {
        let _ = output(
            self.cd
                .ctr()
                .args(["task", "kill", "--signal", "SIGKILL", &self.id]),
        );
        let _ = output(self.cd.ctr().args(["task", "delete", "--force", &self.id]));
        let _ = output(self.cd.ctr().args(["container", "rm", &self.id]));
    }
}

/// How a container's agent came out of its start.
enum Started {
    Ready,
    Exited,
}

/// Waits until the agent in `node` answers /readyz, or its container stops running.
fn wait_started(node: &Node, running: impl Fn() -> bool) -> Started {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = http_get(&node.netns, "/readyz") {
            return Started::Ready;
        }
        if !running() {
            return Started::Exited;
        }
        assert!(
            Instant::now() < deadline,
            "the containerised agent neither became ready nor exited in 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The capability mask of `names` (linux/capability.h bit numbers).
fn cap_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| {
            1u64 << match n.as_str() {
                "NET_ADMIN" => 12,
                "SYS_ADMIN" => 21,
                "PERFMON" => 38,
                "BPF" => 39,
                other => panic!("add the bit number of CAP_{other} (linux/capability.h)"),
            }
        })
        .sum()
}

/// The kernel's view of the containerised agent: exactly the added capabilities, no_new_privs,
/// a seccomp filter, uid 0 and a read-only root.
fn check_confinement(pid: u32, spec: &RunSpec) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let mask = cap_mask(&spec.caps);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            u64::from_str_radix(&field(set), 16).unwrap(),
            mask,
            "{set}: {status}"
        );
    }
    assert_eq!(
        u64::from_str_radix(&field("CapAmb"), 16).unwrap(),
        0,
        "{status}"
    );
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    assert_eq!(field("Seccomp"), "2", "a seccomp filter: {status}");
    let uid = field("Uid");
    assert_eq!(
        uid.split_whitespace().next(),
        Some(spec.uid.to_string().as_str()),
        "{status}"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("a root mount");
    assert!(
        root.split_whitespace()
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "root not read-only: {root}"
    );
    let netns = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/var/run/netns"));
    let netns = netns.expect("/var/run/netns is mounted in the container");
    assert!(
        netns
            .split_whitespace()
            .nth(5)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{netns}"
    );
    assert!(
        netns.contains("master:"),
        "/var/run/netns must receive the host's mounts (slave): {netns}"
    );
}

/// The agent in `node` counts the UDP flow from `from` (a pod of `node`) to `to` exactly at
/// `from`'s host veth, and its drop and retransmission programs are attached. Returns the
/// IDs of the programs it loaded.
fn check_counts(
    node: &Node,
    from: &Pod,
    to: &Pod,
    port: u16,
    before: &[u64],
    log: &dyn Fn() -> String,
) -> Vec<u64> {
    let (status, body) = http_get(&node.netns, "/v1/interfaces").unwrap();
    assert_eq!(status, 200, "{body}");
    let ifaces: InterfacesResponse = serde_json::from_str(&body).unwrap();
    let names: BTreeSet<&str> = ifaces.programs.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "flowtrace_egress",
            "flowtrace_ingress",
            "flowtrace_kfree_skb",
            "flowtrace_slow",
            "flowtrace_tcp_retransmit"
        ]
        .into(),
        "the TC programs, their slow path and the raw tracepoint programs loaded in the container\n{}",
        log()
    );
    udp_all_received(from, to, port, UDP_COUNT, UDP_PAYLOAD).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(&node.netns, "/v1/flows").unwrap();
        assert_eq!(status, 200, "{body}");
        let flows: flowtrace::model::wire::FlowsResponse = serde_json::from_str(&body).unwrap();
        let hop = find(
            &flows.flows,
            17,
            from.ipv4.into(),
            to.ipv4.into(),
            None,
            port,
        )
        .and_then(|f| {
            f.hops
                .into_iter()
                .find(|h| h.interface == from.host_veth && h.direction == Direction::Ingress)
        });
        if let Some(h) = &hop {
            if h.packets == UDP_COUNT {
                assert_eq!(h.bytes, UDP_COUNT * (20 + 8 + UDP_PAYLOAD), "{h:?}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the containerised agent did not count the flow at {}: {hop:?}\n{}",
            from.host_veth,
            log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let mine: Vec<u64> = flowtrace_program_ids()
        .unwrap()
        .into_iter()
        .filter(|i| !before.contains(i))
        .collect();
    for p in &ifaces.programs {
        assert!(
            mine.contains(&(p.id as u64)),
            "program {p:?} is not among those loaded since the start: {mine:?}"
        );
    }
    mine
}

/// Nothing of flowtrace newer than `before` is loaded (a refused start left nothing either).
fn check_none_loaded_since(before: &[u64]) {
    if let Err(left) = flowtrace_tests::host::wait_programs_gone(before, Duration::from_secs(3)) {
        panic!("programs {left:?} still loaded after a refused start");
    }
}

/// The rules of an OCI seccomp profile as (syscall, action, errnoRet, args) tuples.
fn rules(profile: &Value) -> BTreeSet<(String, String, Option<u64>, String)> {
    let mut out = BTreeSet::new();
    for r in profile["syscalls"].as_array().expect("syscalls") {
        let args = r
            .get("args")
            .filter(|a| a.as_array().is_some_and(|a| !a.is_empty()));
        for n in r["names"].as_array().expect("names") {
            out.insert((
                n.as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
                r.get("errnoRet").and_then(Value::as_u64),
                args.map(Value::to_string).unwrap_or_default(),
            ));
        }
    }
    out
}

/// deploy/seccomp/flowtrace.json is podman's RuntimeDefault as podman resolved it for the
/// DaemonSet's capabilities (`resolved`, from the OCI spec it gave runc), with bpf(2) moved
/// from the refused rules to an unconditional allow: nothing else added or taken away.
fn check_shipped_is_default_plus_bpf(resolved: &Value) {
    let path = repo().join("deploy/seccomp/flowtrace.json");
    let shipped: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for k in ["defaultAction", "defaultErrnoRet", "architectures"] {
        assert_eq!(
            shipped.get(k),
            resolved.get(k),
            "deploy/seccomp/flowtrace.json: {k} differs from podman's default"
        );
    }
    let mut want = rules(resolved);
    let refused_bpf: Vec<_> = want.iter().filter(|r| r.0 == "bpf").cloned().collect();
    assert_eq!(
        refused_bpf.len(),
        1,
        "podman's default for these capabilities: {refused_bpf:?}"
    );
    assert_ne!(
        refused_bpf[0].1, "SCMP_ACT_ALLOW",
        "podman's default now allows bpf: RuntimeDefault may do"
    );
    want.remove(&refused_bpf[0]);
    want.insert(("bpf".into(), "SCMP_ACT_ALLOW".into(), None, String::new()));
    let got = rules(&shipped);
    assert_eq!(
        got.difference(&want).collect::<Vec<_>>(),
        Vec::<&(String, String, Option<u64>, String)>::new(),
        "deploy/seccomp/flowtrace.json has rules podman's default + bpf has not (regenerate it from {})",
        "the `linux.seccomp` of a RuntimeDefault container's config.json"
    );
    assert_eq!(
        want.difference(&got).collect::<Vec<_>>(),
        Vec::<&(String, String, Option<u64>, String)>::new(),
        "deploy/seccomp/flowtrace.json lacks rules of podman's default + bpf"
    );
}

/// The test's image in `storage` (and as an OCI archive at `archive`).
fn build_image(storage: &Storage, archive: Option<PathBuf>) -> String {
    let tag = format!("localhost/flowtrace-test:{}", std::process::id());
    let built = image::build(&BuildOptions {
        binary: flowtrace_bin().unwrap(),
        tag: tag.clone(),
        storage: Some(storage.clone()),
        archive,
    })
    .unwrap();
    assert!(
        built.files.iter().any(|f| f == image::BINARY_PATH),
        "{built:?}"
    );
    eprintln!(
        "runtime: image {} {} bytes: {:?}",
        built.tag, built.size_bytes, built.files
    );
    tag
}

#[test]
fn podman_refuses_the_agent_under_runtime_default_and_runs_it_with_the_shipped_profile() {
    require_root().unwrap();
    require_tools(&["podman", "runc", "buildah", "objcopy"]);
    let cluster = Cluster::up(&ClusterOptions::default()).unwrap();
    let node = cluster.node(1).unwrap();
    let (a1, c2) = (
        cluster.pod(1, "pod-a").unwrap(),
        cluster.pod(2, "pod-c").unwrap(),
    );
    let volumes = Volumes::new();
    let podman = Podman::new();
    let image = build_image(&podman.storage, None);
    let spec = run_spec(node, &volumes);
    assert_eq!(
        spec.seccomp,
        Seccomp::RuntimeDefault,
        "the DaemonSet's default profile"
    );

    // RuntimeDefault: the default profile refuses bpf(2) without CAP_SYS_ADMIN; the agent
    // says the filter may be why and where the profile is.
    let before = flowtrace_program_ids().unwrap();
    let name = format!("flowtrace-test-{}-default", std::process::id());
    let c = podman.run(&image, &name, &spec);
    let outcome = wait_started(node, || c.running());
    let log = c.logs();
    assert!(
        matches!(outcome, Started::Exited),
        "podman + RuntimeDefault: the agent started:\n{log}"
    );
    assert_ne!(c.inspect("{{.State.ExitCode}}"), "0", "{log}");
    for want in [
        "failed to create map",
        "Operation not permitted",
        FILTER_HINT,
    ] {
        assert!(
            log.contains(want),
            "podman + RuntimeDefault: the agent did not say {want:?}:\n{log}"
        );
    }
    eprintln!(
        "runtime: podman + RuntimeDefault: {}",
        log.lines()
            .filter(|l| l.contains("error"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    check_none_loaded_since(&before);
    let resolved = c.oci_spec()["linux"]["seccomp"].clone();
    drop(c);
    check_shipped_is_default_plus_bpf(&resolved);

    // deploy/seccomp/flowtrace.json (Localhost): loads, attaches, counts, detaches on stop.
    let spec = RunSpec {
        seccomp: shipped_profile(),
        ..spec
    };
    let before = flowtrace_program_ids().unwrap();
    let name = format!("flowtrace-test-{}-shipped", std::process::id());
    let c = podman.run(&image, &name, &spec);
    let outcome = wait_started(node, || c.running());
    assert!(
        matches!(outcome, Started::Ready),
        "podman + flowtrace.json: the agent did not start:\n{}",
        c.logs()
    );
    check_confinement(c.pid(), &spec);
    let mine = check_counts(node, a1, c2, 7461, &before, &|| c.logs());
    checked(podman.cmd().args(["stop", "--time", "20", &name]));
    assert_eq!(
        c.inspect("{{.State.ExitCode}}"),
        "0",
        "a clean exit on SIGTERM:\n{}",
        c.logs()
    );
    assert!(
        c.logs().contains("detached from every interface"),
        "{}",
        c.logs()
    );
    check_nothing_left(node, &mine).unwrap();
    drop(c);
    cluster.down().unwrap();
}

#[test]
fn containerd_runs_the_agent_under_its_default_profile_and_the_shipped_one() {
    require_root().unwrap();
    require_tools(&["containerd", "ctr", "runc", "buildah", "podman", "objcopy"]);
    let cluster = Cluster::up(&ClusterOptions::default()).unwrap();
    let node = cluster.node(1).unwrap();
    let (a1, c2) = (
        cluster.pod(1, "pod-a").unwrap(),
        cluster.pod(2, "pod-c").unwrap(),
    );
    let volumes = Volumes::new();
    let cd = Containerd::start();
    let build_dir = TempDir::new("flowtrace-runtime-image").unwrap();
    let archive = build_dir.path().join("flowtrace.oci.tar");
    let image = build_image(&Storage::under(build_dir.path()), Some(archive.clone()));
    checked(
        cd.ctr()
            .args(["image", "import", "--snapshotter", "native"])
            .arg(&archive),
    );
    let spec = run_spec(node, &volumes);
    assert_eq!(
        spec.seccomp,
        Seccomp::RuntimeDefault,
        "the DaemonSet's default profile"
    );

    // containerd's default profile (what the CRI plugin uses for RuntimeDefault) allows
    // bpf(2) to a container holding CAP_BPF; and the shipped profile works there too.
    for (case, spec, port) in [
        ("default", &spec, 7462u16),
        (
            "shipped",
            &RunSpec {
                seccomp: shipped_profile(),
                ..run_spec(node, &volumes)
            },
            7463,
        ),
    ] {
        let before = flowtrace_program_ids().unwrap();
        let id = format!("flowtrace-test-{}-{case}", std::process::id());
        let log_path = volumes.dir.path().join(format!("{case}.log"));
        let task = cd.run(&image, &id, spec, &log_path);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let outcome = wait_started(node, || task.running());
        assert!(
            matches!(outcome, Started::Ready),
            "containerd + {case}: the agent did not start:\n{}",
            log()
        );
        let (pid, _) = task.state().expect("the task");
        check_confinement(pid, spec);
        let mine = check_counts(node, a1, c2, port, &before, &log);
        // SIGTERM (ctr's default signal), as the kubelet stops a container.
        checked(cd.ctr().args(["task", "kill", &id]));
        let deadline = Instant::now() + Duration::from_secs(20);
        while task.running() {
            assert!(
                Instant::now() < deadline,
                "containerd + {case}: still running 20 s after SIGTERM\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(log().contains("detached from every interface"), "{}", log());
        check_nothing_left(node, &mine).unwrap();
        drop(task);
    }
    drop(cd);
    cluster.down().unwrap();
}
