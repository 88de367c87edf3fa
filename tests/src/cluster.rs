//! The emulated cluster: nodes, underlay, flannel-style VXLAN overlay, pods, and the kube-proxy
//! Service — built from network namespaces, torn down on drop.
//!
//! Addressing (node `i` is 1-based, pod host number `h` = 10, 11, ... in creation order per node):
//!
//! | what            | IPv4              | IPv6                     | MAC                  |
//! |-----------------|-------------------|--------------------------|----------------------|
//! | node underlay   | 192.168.50.i/24   | —                        | random               |
//! | `cni0` gateway  | 10.244.i.1/24     | fd00:10:244:i::1/64      | 02:c0:00:00:00:ii    |
//! | `flannel.1`     | 10.244.i.0/32     | fd00:10:244:i::/128      | 02:f1:00:00:00:ii    |
//! | pod `eth0`      | 10.244.i.h/24     | fd00:10:244:i::h/64      | 0a:58:0a:f4:ii:hh    |
//!
//! In the IPv6 column `i` and `h` are written with the same digits as in IPv4 (so pod 10.244.1.11 is
//! fd00:10:244:1::11), which keeps packet dumps readable. Pod MACs follow the CNI bridge plugin's
//! `0a:58:<IPv4 in hex>` convention.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Output};
use std::time::Duration;

use crate::kubeproxy::{Endpoint, ServiceSpec};
use crate::netns::{self, ChildGuard};
use crate::{Error, Result};

/// Pod MTU, as flannel's VXLAN backend sets it (1500 underlay minus 50 bytes of VXLAN overhead), so
/// full-size pod packets fit the overlay without fragmentation.
pub const POD_MTU: u32 = 1450;

/// UDP port of flannel's VXLAN backend.
pub const VXLAN_PORT: u16 = 8472;

/// The pod that backs the demo Service on every node that has one.
pub const SERVICE_BACKEND_POD: &str = "pod-b";

/// Settings of every namespace the cluster creates, written before its interfaces exist (devices
/// take the namespace's defaults when they appear), so that no interface sends a frame nobody
/// asked for once the cluster is up: a test that counts or captures frames must see only its
/// own. Without them, on this kernel, a freshly up pod interface sends router solicitations for
/// as long as it is up (4 s, 8 s, 16 s, ... after link-up) and every interface repeats its MLD
/// (and `cni0` its IGMP) reports at a random moment up to a second later (tcpdump in a node
/// namespace shows them all; `testbed_smoke::a_settled_cluster_sends_nothing_unasked` checks).
const QUIET: [&str; 10] = [
    // DAD would keep fresh IPv6 addresses "tentative" (unusable) for a second or two, and
    // sends neighbour solicitations for each.
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    // Addresses and routes are static: no router advertisements to learn, so no router
    // solicitations either (nodes forward, which alone stops theirs).
    "net.ipv6.conf.all.accept_ra=0",
    "net.ipv6.conf.default.accept_ra=0",
    "net.ipv6.conf.all.router_solicitations=0",
    "net.ipv6.conf.default.router_solicitations=0",
    // The reports for the groups an interface joins (the solicited-node groups of its IPv6
    // addresses; a snooping bridge's all-snoopers groups 224.0.0.106 and ff02::6a) go out at
    // link-up and are repeated after a random delay of up to this many milliseconds (defaults:
    // 1 s for MLDv2 and IGMPv3, 10 s for MLDv1 and IGMPv2); at 10 ms they are all sent while
    // the cluster is being built (see SETTLE).
    "net.ipv6.conf.default.mldv1_unsolicited_report_interval=10",
    "net.ipv6.conf.default.mldv2_unsolicited_report_interval=10",
    "net.ipv4.conf.default.igmpv2_unsolicited_report_interval=10",
    "net.ipv4.conf.default.igmpv3_unsolicited_report_interval=10",
];

/// How long [`Cluster::up`] and [`Cluster::add_pod`] wait after the last interface came up:
/// well past the last repeated MLD/IGMP report (two repeats at most 10 ms apart, see QUIET).
const SETTLE: Duration = Duration::from_millis(100);

/// Writes [`QUIET`] in namespace `ns`.
pub(crate) fn quiet(ns: &str) -> Result<()> {
    let mut argv = vec!["sysctl", "-q", "-w"];
    argv.extend_from_slice(&QUIET);
    netns::exec(ns, &argv).map(drop)
}

/// How many nodes and which pods to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Number of nodes (1..=200). Two nodes are wired back to back; any other count shares an
    /// underlay bridge in an extra `<prefix>-underlay` namespace.
    pub nodes: usize,
    /// Pod names created on every node, in order (their host numbers are 10, 11, ...).
    pub pods_per_node: Vec<String>,
    /// Turn checksum/segmentation offloads off on the underlay links, as a user-space AF_PACKET
    /// relay (a delay line between nodes) needs. Off by default: real NICs aggregate (GRO/GSO),
    /// and measurements on an underlay that does not would overstate per-packet work.
    pub underlay_offloads_off: bool,
    /// Wire the nodes' `eth0`s to `ul<i>` veths in an extra `<prefix>-underlay` namespace with
    /// no bridge: nothing crosses until a relay (`ftgen delay-line`) runs there. Implies
    /// offloads off.
    pub underlay_relay: bool,
    /// How pods are wired to their node and nodes to each other. Every shape's `eth0` is a
    /// veth into another namespace with the node's address, as on kind, k3d and
    /// minikube-with-docker nodes.
    pub cni: Cni,
}

/// The node shapes of the CNIs people try a tool on first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cni {
    /// flannel: pod veths are ports of the `cni0` bridge (the pod gateway's address is on
    /// it); nodes reach each other's pods through the `flannel.1` VXLAN device.
    #[default]
    Flannel,
    /// Calico (VXLAN mode), Cilium with endpoint routes: no bridge; each `cali*` veth has no
    /// address, the node routes the pod's /32 and /128 to it, and the pod's gateway is a
    /// link-local address answered by the veth (Calico's 169.254.1.1 with the veth's fixed
    /// MAC); nodes reach each other's pods through `vxlan.calico`.
    Calico,
    /// kind's kindnet (the ptp plugin): no bridge and no overlay; each host veth carries the
    /// pod gateway as a /32 address of its own and a /32 route to its pod; nodes route each
    /// other's pod ranges via their `eth0` addresses.
    Kindnet,
}

impl Cni {
    /// The overlay device the shape has, if any.
    pub fn overlay(self) -> Option<&'static str> {
        match self {
            Cni::Flannel => Some("flannel.1"),
            Cni::Calico => Some("vxlan.calico"),
            Cni::Kindnet => None,
        }
    }
}

/// The MAC Calico gives every host-side veth.
const CALICO_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The pods' IPv4 next hop on routed shapes (Calico's).
const CALICO_GATEWAY_V4: &str = "169.254.1.1";
/// The pods' IPv6 next hop on routed shapes: a link-local address on the host veth.
const ROUTED_GATEWAY_V6: &str = "fe80::1";

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: vec!["pod-a".into(), "pod-b".into(), "pod-c".into()],
            underlay_offloads_off: false,
            underlay_relay: false,
            cni: Cni::Flannel,
        }
    }
}

/// One pod: a network namespace whose `eth0` is a veth into its node's `cni0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Pod name (`pod-a`).
    pub name: String,
    /// Name of the node it runs on (`node1`).
    pub node: String,
    /// The node's namespace (where `host_veth` lives).
    pub node_netns: String,
    /// The pod's own namespace.
    pub netns: String,
    /// `eth0`'s IPv4 address.
    pub ipv4: Ipv4Addr,
    /// `eth0`'s IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Name of the host-side veth in the node namespace (`veth` + 8 hex digits).
    pub host_veth: String,
    /// `eth0`'s MAC address, lower case with colons.
    pub mac: String,
}

impl Pod {
    /// Runs a command in the pod's namespace and waits for it (see [`netns::exec`]).
    pub fn exec<S: AsRef<str>>(&self, args: &[S]) -> Result<Output> {
        netns::exec(&self.netns, args)
    }

    /// Starts a command in the pod's namespace (see [`netns::spawn`]).
    pub fn spawn<S: AsRef<str>>(&self, args: &[S]) -> Result<Child> {
        netns::spawn(&self.netns, args)
    }

    /// Starts a command in the pod's namespace, killed when the guard drops.
    pub fn spawn_guarded<S: AsRef<str>>(&self, args: &[S]) -> Result<ChildGuard> {
        let child = self.spawn(args)?;
        Ok(ChildGuard::new(
            child,
            format!("{} (in {})", netns::display_cmd(args), self.netns),
        ))
    }

    /// ifindex of the host-side veth in the node namespace (where flowtrace attaches TC programs).
    pub fn host_veth_ifindex(&self) -> Result<u32> {
        netns::link_ifindex(&self.node_netns, &self.host_veth)
    }

    /// ifindex of `eth0` inside the pod.
    pub fn ifindex(&self) -> Result<u32> {
        netns::link_ifindex(&self.netns, "eth0")
    }

    /// MAC address of the host-side veth.
    pub fn host_veth_mac(&self) -> Result<String> {
        netns::link_mac(&self.node_netns, &self.host_veth)
    }
}

/// One node: a network namespace with underlay `eth0`, `cni0`, `flannel.1` and kube-proxy rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// 1-based node number.
    pub index: usize,
    /// Node name (`node1`).
    pub name: String,
    /// The node's namespace.
    pub netns: String,
    /// Address of `eth0` on the underlay (192.168.50.i).
    pub underlay_ip: Ipv4Addr,
    /// Pods on this node, in creation order.
    pub pods: Vec<Pod>,
    /// Host number the next pod gets (never reused, so a re-added pod gets a new address).
    next_host: u16,
}

impl Node {
    /// Runs a command in the node's namespace and waits for it.
    pub fn exec<S: AsRef<str>>(&self, args: &[S]) -> Result<Output> {
        netns::exec(&self.netns, args)
    }

    /// Starts a command in the node's namespace.
    pub fn spawn<S: AsRef<str>>(&self, args: &[S]) -> Result<Child> {
        netns::spawn(&self.netns, args)
    }

    /// Starts a command in the node's namespace, killed when the guard drops.
    pub fn spawn_guarded<S: AsRef<str>>(&self, args: &[S]) -> Result<ChildGuard> {
        let child = self.spawn(args)?;
        Ok(ChildGuard::new(
            child,
            format!("{} (in {})", netns::display_cmd(args), self.netns),
        ))
    }

    /// ifindex of interface `dev` in the node namespace (`eth0`, `cni0`, `flannel.1`, a veth).
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        netns::link_ifindex(&self.netns, dev)
    }

    /// Sets sysctl `key` to `value` inside the node namespace, e.g.
    /// `net.bridge.bridge-nf-call-iptables=0` for a test that needs frames br_netfilter would drop.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// The pod named `name` on this node.
    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods.iter().find(|p| p.name == name).ok_or_else(|| {
            let have: Vec<&str> = self.pods.iter().map(|p| p.name.as_str()).collect();
            Error::Invalid(format!("no pod {name:?} on {}; it has {have:?}", self.name))
        })
    }

    /// Pod CIDR gateway on `cni0`.
    pub fn gateway_v4(&self) -> Ipv4Addr {
        gateway_v4(self.index)
    }

    /// IPv6 pod gateway on `cni0`.
    pub fn gateway_v6(&self) -> Ipv6Addr {
        pod_v6(self.index, 1)
    }

    /// `flannel.1`'s IPv4 address (the node's pod /24 network address, as flannel assigns it).
    pub fn vtep_v4(&self) -> Ipv4Addr {
        vtep_v4(self.index)
    }

    /// `flannel.1`'s MAC (fixed, so remote nodes can have static neighbour/FDB entries).
    pub fn vtep_mac(&self) -> String {
        vtep_mac(self.index)
    }
}

/// An emulated Kubernetes cluster. Dropping it deletes every namespace it created; use
/// [`Cluster::down`] to see teardown errors instead of having them logged.
#[derive(Debug)]
pub struct Cluster {
    /// Namespace prefix of this cluster (`ft<pid>x<counter>`).
    pub prefix: String,
    /// Nodes, `nodes[i - 1]` is node `i`.
    pub nodes: Vec<Node>,
    /// The kube-proxy Service installed on every node.
    pub service: ServiceSpec,
    /// How pods and nodes are wired.
    pub cni: Cni,
    /// Every namespace created, in creation order (teardown goes in reverse: pods before nodes).
    created: Vec<String>,
}

impl Cluster {
    /// The extra namespace the underlay runs through (when the options asked for one).
    pub fn underlay_netns(&self) -> String {
        format!("{}-underlay", self.prefix)
    }

    /// Builds the cluster. Sweeps namespaces of dead earlier runs first. On error everything built
    /// so far is torn down again.
    pub fn up(opts: &ClusterOptions) -> Result<Self> {
        validate(opts)?;
        if let Err(e) = netns::sweep_stale() {
            // Not fatal: our names are unique, leftovers only waste memory.
            eprintln!("flowtrace-tests: sweeping stale namespaces failed (continuing): {e}");
        }
        let prefix = netns::new_prefix();
        let mut cluster = Cluster {
            prefix: prefix.clone(),
            nodes: Vec::new(),
            service: ServiceSpec::demo(Vec::new()),
            cni: opts.cni,
            created: Vec::new(),
        };
        for i in 1..=opts.nodes {
            cluster.create_node(i)?;
        }
        cluster.wire_underlay(
            opts.underlay_offloads_off || opts.underlay_relay,
            opts.underlay_relay,
        )?;
        for i in 1..=opts.nodes {
            match opts.cni {
                Cni::Flannel => {
                    cluster.setup_bridge(i)?;
                    cluster.setup_overlay(i, "flannel.1")?;
                }
                Cni::Calico => cluster.setup_overlay(i, "vxlan.calico")?,
                Cni::Kindnet => cluster.setup_node_routes(i)?,
            }
        }
        for i in 1..=opts.nodes {
            for pod in &opts.pods_per_node {
                cluster.add_pod_unsettled(i, pod)?;
            }
        }
        let endpoints = cluster
            .nodes
            .iter()
            .filter_map(|n| n.pod(SERVICE_BACKEND_POD).ok())
            .map(|p| Endpoint {
                pod: p.name.clone(),
                node: p.node.clone(),
                ip: p.ipv4,
            })
            .collect();
        cluster.service = ServiceSpec::demo(endpoints);
        for node in &cluster.nodes {
            cluster.service.install(&node.netns)?;
        }
        std::thread::sleep(SETTLE);
        Ok(cluster)
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> Result<&Node> {
        i.checked_sub(1)
            .and_then(|k| self.nodes.get(k))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no node {i}: nodes are numbered 1..={}",
                    self.nodes.len()
                ))
            })
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut Node> {
        let n = self.nodes.len();
        i.checked_sub(1)
            .and_then(|k| self.nodes.get_mut(k))
            .ok_or_else(|| Error::Invalid(format!("no node {i}: nodes are numbered 1..={n}")))
    }

    /// Pod `name` on node `node` (1-based).
    pub fn pod(&self, node: usize, name: &str) -> Result<&Pod> {
        self.node(node)?.pod(name)
    }

    /// All pods of all nodes.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|n| n.pods.iter())
    }

    /// The pod owning `ip` (IPv4 or IPv6), e.g. to turn an address flowtrace reported into a name.
    pub fn pod_by_ip(&self, ip: std::net::IpAddr) -> Option<&Pod> {
        self.pods().find(|p| ip == p.ipv4 || ip == p.ipv6)
    }

    /// Runs a command in any namespace and waits for it (see [`netns::exec`]).
    pub fn exec<S: AsRef<str>>(&self, netns_name: &str, args: &[S]) -> Result<Output> {
        netns::exec(netns_name, args)
    }

    /// Starts a command in any namespace (see [`netns::spawn`]).
    pub fn spawn<S: AsRef<str>>(&self, netns_name: &str, args: &[S]) -> Result<Child> {
        netns::spawn(netns_name, args)
    }

    /// Names of the namespaces this cluster currently owns, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// Adds pod `name` to node `node` (also used after start-up, e.g. to check that flowtrace
    /// notices a pod created while it runs). It is not added to the Service's endpoints.
    /// Returns once the new interfaces have settled (sent their last unasked MLD report).
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod> {
        let pod = self.add_pod_unsettled(node, name)?;
        std::thread::sleep(SETTLE);
        Ok(pod)
    }

    /// [`Cluster::add_pod`] without the wait: [`Cluster::up`] settles once for all its pods.
    fn add_pod_unsettled(&mut self, node: usize, name: &str) -> Result<Pod> {
        validate_name(name)?;
        let prefix = self.prefix.clone();
        let cni = self.cni;
        let n = self.node_mut(node)?;
        if n.pods.iter().any(|p| p.name == name) {
            return Err(Error::Invalid(format!(
                "pod {name:?} already exists on {}",
                n.name
            )));
        }
        let host = n.next_host;
        if host > 254 {
            return Err(Error::Invalid(format!(
                "{} has no pod addresses left (10..=254 used)",
                n.name
            )));
        }
        let host_veth = match cni {
            Cni::Calico => format!("cali{}", &host_veth_name(&n.name, name)["veth".len()..]),
            Cni::Flannel | Cni::Kindnet => host_veth_name(&n.name, name),
        };
        if n.pods.iter().any(|p| p.host_veth == host_veth) {
            return Err(Error::Invalid(format!(
                "host veth name {host_veth} of pod {name:?} collides with another pod on {}; pick another name",
                n.name
            )));
        }
        let i = n.index;
        let pod = Pod {
            name: name.to_string(),
            node: n.name.clone(),
            node_netns: n.netns.clone(),
            netns: format!("{prefix}-{}-{name}", n.name),
            ipv4: Ipv4Addr::new(10, 244, octet(i)?, octet(usize::from(host))?),
            ipv6: pod_v6(i, host),
            host_veth,
            mac: format!("0a:58:0a:f4:{:02x}:{:02x}", i, host),
        };
        n.next_host += 1;
        self.create_netns(&pod.netns)?;
        if let Err(e) = build_pod(&pod, i, cni) {
            // Do not leave a half-built pod behind in a cluster that lives on.
            if netns::del_netns(&pod.netns).is_ok() {
                self.created.retain(|c| c != &pod.netns);
            }
            return Err(e);
        }
        let n = self.node_mut(node)?;
        n.pods.push(pod.clone());
        Ok(pod)
    }

    /// Deletes pod `name` from node `node` (its namespace and with it both veth ends) and returns
    /// its description.
    pub fn remove_pod(&mut self, node: usize, name: &str) -> Result<Pod> {
        let n = self.node_mut(node)?;
        let pos = n.pods.iter().position(|p| p.name == name).ok_or_else(|| {
            Error::Invalid(format!(
                "cannot remove pod {name:?}: it is not on node{node}"
            ))
        })?;
        let pod = n.pods.remove(pos);
        netns::del_netns(&pod.netns)?;
        self.created.retain(|c| c != &pod.netns);
        Ok(pod)
    }

    /// Tears the cluster down, reporting what could not be deleted.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        // Reverse creation order: pods (created last) go before the nodes holding their veths.
        while let Some(ns) = self.created.pop() {
            if let Err(e) = netns::del_netns(&ns) {
                problems.push(format!("{ns}: {e}"));
            }
        }
        self.nodes.clear();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown(problems))
        }
    }

    fn create_netns(&mut self, name: &str) -> Result<()> {
        netns::add_netns(name)?;
        self.created.push(name.to_string());
        Ok(())
    }

    /// Creates node `i`'s namespace with the sysctls a Kubernetes node has.
    fn create_node(&mut self, i: usize) -> Result<()> {
        let name = format!("node{i}");
        let ns = format!("{}-{name}", self.prefix);
        self.create_netns(&ns)?;
        netns::exec(
            &ns,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                // New namespaces inherit rp_filter from the host; pin it so results do not depend
                // on the machine the tests run on.
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        quiet(&ns)?;
        // Kubernetes requires these: a Service reply from a backend on the same bridge as the
        // client is bridged, not routed, and only br_netfilter lets conntrack un-DNAT it.
        netns::exec(
            &ns,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.bridge.bridge-nf-call-iptables=1",
                "net.bridge.bridge-nf-call-ip6tables=1",
            ],
        )
        .map_err(|e| {
            Error::Invalid(format!(
                "enabling br_netfilter in {ns} failed; load it with `modprobe br_netfilter` (the \
                 sysctls are per namespace since Linux 5.3): {e}"
            ))
        })?;
        ip(&ns, "link set lo up")?;
        self.nodes.push(Node {
            index: i,
            name,
            netns: ns,
            underlay_ip: underlay_ip(i)?,
            pods: Vec::new(),
            next_host: 10,
        });
        Ok(())
    }

    /// Gives every node an `eth0` on 192.168.50.0/24: a direct veth for two nodes, otherwise one
    /// veth per node into a bridge in an extra underlay namespace (with `relay`, into that
    /// namespace without a bridge).
    fn wire_underlay(&mut self, offloads_off: bool, relay: bool) -> Result<()> {
        let nodes: Vec<(String, usize)> = self
            .nodes
            .iter()
            .map(|n| (n.netns.clone(), n.index))
            .collect();
        if let ([(a, _), (b, _)], false) = (nodes.as_slice(), relay) {
            // Temporary names: both ends end up as `eth0`, which cannot coexist in one namespace.
            ip(a, "link add ul-tmp-a type veth peer name ul-tmp-b")?;
            ip(a, &format!("link set ul-tmp-b netns {b}"))?;
            ip(a, "link set ul-tmp-a name eth0")?;
            ip(b, "link set ul-tmp-b name eth0")?;
        } else {
            let ul = format!("{}-underlay", self.prefix);
            self.create_netns(&ul)?;
            quiet(&ul)?;
            ip(&ul, "link set lo up")?;
            if !relay {
                ip(&ul, "link add br0 type bridge")?;
                ip(&ul, "link set br0 up")?;
            }
            for (ns, i) in &nodes {
                ip(
                    &ul,
                    &format!("link add ul{i} type veth peer name eth0 netns {ns}"),
                )?;
                if !relay {
                    ip(&ul, &format!("link set ul{i} master br0"))?;
                }
                if offloads_off {
                    disable_offloads(&ul, &format!("ul{i}"))?;
                }
                ip(&ul, &format!("link set ul{i} up"))?;
            }
        }
        for (ns, i) in &nodes {
            ip(ns, &format!("addr add {}/24 dev eth0", underlay_ip(*i)?))?;
            if offloads_off {
                disable_offloads(ns, "eth0")?;
            }
            ip(ns, "link set eth0 up")?;
        }
        Ok(())
    }

    /// Creates `cni0` on node `i`, with the pod gateway's addresses (flannel, bridge plugin).
    fn setup_bridge(&mut self, i: usize) -> Result<()> {
        let ns = self.node(i)?.netns.clone();
        // A fixed bridge MAC: otherwise the bridge takes the lowest port MAC, which changes when a
        // pod is added and leaves the other pods' neighbour entries for the gateway stale.
        ip(
            &ns,
            &format!("link add cni0 address 02:c0:00:00:00:{i:02x} type bridge"),
        )?;
        ip(&ns, &format!("addr add {}/24 dev cni0", gateway_v4(i)))?;
        ip(&ns, &format!("addr add {}/64 dev cni0 nodad", pod_v6(i, 1)))?;
        ip(&ns, "link set cni0 up")?;
        Ok(())
    }

    /// Creates the VXLAN device `dev` on node `i`, and the static routes/neighbours/FDB entries
    /// flannel's VXLAN backend (and Calico's) installs for every other node.
    fn setup_overlay(&mut self, i: usize, dev: &str) -> Result<()> {
        let ns = self.node(i)?.netns.clone();
        let (mac, local) = (vtep_mac(i), underlay_ip(i)?);
        ip(
            &ns,
            &format!(
                "link add {dev} address {mac} type vxlan id 1 local {local} dev eth0 \
                 dstport {VXLAN_PORT} nolearning"
            ),
        )?;
        ip(&ns, &format!("addr add {}/32 dev {dev}", vtep_v4(i)))?;
        ip(
            &ns,
            &format!("addr add {}/128 dev {dev} nodad", pod_v6(i, 0)),
        )?;
        ip(&ns, &format!("link set {dev} up"))?;

        for j in self.others(i) {
            let (vtep4, vtep6, mac) = (vtep_v4(j), pod_v6(j, 0), vtep_mac(j));
            ip(
                &ns,
                &format!("route add 10.244.{j}.0/24 via {vtep4} dev {dev} onlink"),
            )?;
            ip(
                &ns,
                &format!("neigh add {vtep4} lladdr {mac} dev {dev} nud permanent"),
            )?;
            ip(
                &ns,
                &format!("-6 route add {vtep6}/64 via {vtep6} dev {dev} onlink"),
            )?;
            ip(
                &ns,
                &format!("-6 neigh add {vtep6} lladdr {mac} dev {dev} nud permanent"),
            )?;
            let dst = underlay_ip(j)?.to_string();
            netns::run(&[
                "bridge", "-n", &ns, "fdb", "append", &mac, "dev", dev, "dst", &dst,
            ])?;
        }
        Ok(())
    }

    /// The numbers of every node but `i`.
    fn others(&self, i: usize) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| n.index)
            .filter(|&j| j != i)
            .collect()
    }

    /// kindnet: node `i` routes every other node's pod ranges via that node's `eth0` address
    /// (IPv6 over an IPv6 underlay address, added here).
    fn setup_node_routes(&mut self, i: usize) -> Result<()> {
        let ns = self.node(i)?.netns.clone();
        ip(
            &ns,
            &format!("-6 addr add {}/64 dev eth0 nodad", underlay_v6(i)),
        )?;
        for j in self.others(i) {
            ip(
                &ns,
                &format!("route add 10.244.{j}.0/24 via {} dev eth0", underlay_ip(j)?),
            )?;
            ip(
                &ns,
                &format!(
                    "-6 route add {}/64 via {} dev eth0",
                    pod_v6(j, 0),
                    underlay_v6(j)
                ),
            )?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("flowtrace-tests: cluster {} teardown: {e}", self.prefix);
        }
    }
}

/// Creates pod `pod`'s veth, addresses and routes as `cni` would; its namespace exists already.
fn build_pod(pod: &Pod, node_index: usize, cni: Cni) -> Result<()> {
    let (node_ns, pod_ns, veth) = (
        pod.node_netns.as_str(),
        pod.netns.as_str(),
        pod.host_veth.as_str(),
    );
    // Set before eth0 exists: devices take the namespace's defaults when they appear.
    quiet(pod_ns)?;
    // The peer is created directly inside the pod namespace, so its name `eth0` does not clash with
    // the node's own `eth0`.
    let host_mac = match cni {
        Cni::Calico => format!(" address {CALICO_VETH_MAC}"),
        Cni::Flannel | Cni::Kindnet => String::new(),
    };
    ip(
        node_ns,
        &format!(
            "link add {veth} mtu {POD_MTU}{host_mac} type veth peer name eth0 mtu {POD_MTU} address {} netns {pod_ns}",
            pod.mac
        ),
    )?;
    ip(pod_ns, "link set lo up")?;
    match cni {
        Cni::Flannel => {
            ip(node_ns, &format!("link set {veth} master cni0"))?;
            // Like the CNI bridge plugin with hairpinMode (flannel's default): a pod reaching
            // itself via the Service VIP gets its own packets back out of the same bridge port.
            ip(
                node_ns,
                &format!("link set {veth} type bridge_slave hairpin on"),
            )?;
            ip(node_ns, &format!("link set {veth} up"))?;
            ip(pod_ns, &format!("addr add {}/24 dev eth0", pod.ipv4))?;
            ip(pod_ns, &format!("addr add {}/64 dev eth0 nodad", pod.ipv6))?;
            ip(pod_ns, "link set eth0 up")?;
            ip(
                pod_ns,
                &format!("route add default via {}", gateway_v4(node_index)),
            )?;
            ip(
                pod_ns,
                &format!(
                    "-6 route add default via {} dev eth0",
                    pod_v6(node_index, 1)
                ),
            )?;
        }
        Cni::Calico | Cni::Kindnet => {
            let gateway_v4 = match cni {
                // kindnet's ptp: the pod gateway is an address of the host veth itself.
                Cni::Kindnet => {
                    let gw = gateway_v4(node_index);
                    ip(node_ns, &format!("addr add {gw}/32 dev {veth}"))?;
                    gw.to_string()
                }
                _ => CALICO_GATEWAY_V4.to_string(),
            };
            ip(
                node_ns,
                &format!("-6 addr add {ROUTED_GATEWAY_V6}/64 dev {veth} nodad"),
            )?;
            ip(node_ns, &format!("link set {veth} up"))?;
            ip(node_ns, &format!("route add {}/32 dev {veth}", pod.ipv4))?;
            ip(
                node_ns,
                &format!("-6 route add {}/128 dev {veth}", pod.ipv6),
            )?;
            ip(pod_ns, &format!("addr add {}/32 dev eth0", pod.ipv4))?;
            ip(pod_ns, &format!("addr add {}/128 dev eth0 nodad", pod.ipv6))?;
            ip(pod_ns, "link set eth0 up")?;
            ip(
                pod_ns,
                &format!("route add {gateway_v4} dev eth0 scope link"),
            )?;
            ip(
                pod_ns,
                &format!("route add default via {gateway_v4} dev eth0"),
            )?;
            if cni == Cni::Calico {
                // Calico answers for 169.254.1.1 with proxy ARP from a node that has a default
                // route; this node has none, so the pod learns the veth's MAC up front.
                ip(
                    pod_ns,
                    &format!(
                        "neigh add {gateway_v4} lladdr {CALICO_VETH_MAC} dev eth0 nud permanent"
                    ),
                )?;
            }
            ip(
                pod_ns,
                &format!("-6 route add default via {ROUTED_GATEWAY_V6} dev eth0"),
            )?;
        }
    }
    Ok(())
}

/// `ip -n <netns> <args>`, with `args` written as on a shell command line (split on whitespace;
/// no argument here ever contains a space), which keeps the topology code readable.
fn ip(netns_name: &str, args: &str) -> Result<Output> {
    let mut argv = vec!["ip", "-n", netns_name];
    argv.extend(args.split_whitespace());
    netns::run(&argv)
}

/// Turns off checksum and segmentation offloads on an underlay veth. With them on, the kernel
/// passes partially-checksummed or GSO super-packets, which a user-space AF_PACKET relay (used to
/// add delay between nodes) would forward as broken frames.
fn disable_offloads(netns_name: &str, dev: &str) -> Result<()> {
    netns::exec(
        netns_name,
        &[
            "ethtool", "-K", dev, "tx", "off", "gso", "off", "tso", "off", "gro", "off",
        ],
    )
    .map(drop)
}

fn validate(opts: &ClusterOptions) -> Result<()> {
    if !(1..=200).contains(&opts.nodes) {
        return Err(Error::Invalid(format!(
            "ClusterOptions.nodes is {}; use 1..=200",
            opts.nodes
        )));
    }
    for (k, p) in opts.pods_per_node.iter().enumerate() {
        validate_name(p)?;
        if opts.pods_per_node[..k].contains(p) {
            return Err(Error::Invalid(format!(
                "pod name {p:?} is listed twice in ClusterOptions"
            )));
        }
    }
    Ok(())
}

/// Pod names become part of namespace names: keep them DNS-label-like.
fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "pod name {name:?} is not a DNS label (1-63 chars of a-z, 0-9, '-')"
        )))
    }
}

/// `veth` + 8 hex digits of an FNV-1a hash of `node/pod`: stable, ≤ 15 bytes (IFNAMSIZ), and
/// shaped like the names CNI plugins give host-side veths.
pub fn host_veth_name(node: &str, pod: &str) -> String {
    let h = format!("{node}/{pod}")
        .bytes()
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    format!("veth{h:08x}")
}

fn octet(n: usize) -> Result<u8> {
    u8::try_from(n).map_err(|_| Error::Invalid(format!("{n} does not fit an address octet")))
}

/// Reads the decimal digits of `n` as hex, so IPv6 groups print like the IPv4 octets (11 → 0x11).
fn dec_as_hex(n: usize) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).unwrap_or(0)
}

fn underlay_ip(i: usize) -> Result<Ipv4Addr> {
    Ok(Ipv4Addr::new(192, 168, 50, octet(i)?))
}

/// kindnet shapes: `eth0`'s IPv6 address on the underlay.
fn underlay_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, u16::try_from(i).unwrap_or(0))
}

fn gateway_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, u8::try_from(i).unwrap_or(0), 1)
}

fn vtep_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, u8::try_from(i).unwrap_or(0), 0)
}

fn vtep_mac(i: usize) -> String {
    format!("02:f1:00:00:00:{i:02x}")
}

/// `fd00:10:244:<i>::<host>` (host 0 is the VTEP, 1 the gateway, 10+ pods).
fn pod_v6(i: usize, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x10,
        0x244,
        dec_as_hex(i),
        0,
        0,
        0,
        dec_as_hex(usize::from(host)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_like_their_ipv4_twins() {
        assert_eq!(pod_v6(1, 11).to_string(), "fd00:10:244:1::11");
        assert_eq!(pod_v6(2, 0).to_string(), "fd00:10:244:2::");
        assert_eq!(vtep_mac(2), "02:f1:00:00:00:02");
    }

    #[test]
    fn veth_names_fit_ifnamsiz_and_differ() {
        let a = host_veth_name("node1", "pod-a");
        assert_eq!(a.len(), 12);
        assert!(a.starts_with("veth"));
        assert_ne!(a, host_veth_name("node2", "pod-a"));
        assert_eq!(a, host_veth_name("node1", "pod-a"));
    }

    #[test]
    fn options_are_validated() {
        assert!(validate(&ClusterOptions::default()).is_ok());
        assert!(validate(&ClusterOptions {
            nodes: 0,
            ..Default::default()
        })
        .is_err());
        let dup = ClusterOptions {
            nodes: 2,
            pods_per_node: vec!["a".into(), "a".into()],
            ..Default::default()
        };
        assert!(validate(&dup).is_err());
        assert!(validate_name("Pod_A").is_err());
    }
}
