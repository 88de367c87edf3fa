//! The smallest shape a pod's traffic has: one "node" network namespace holding the host side
//! of a veth pair whose other end is `eth0` of one "pod" namespace, wired as a point-to-point
//! CNI does (kindnet, the ptp plugin): the host veth carries the pod's gateway as a /32 and a
//! /32 route to the pod. flowtrace classifies that veth as a pod's by itself (a route to
//! exactly one address, no next hop), so the agent needs no interface flags.
//!
//! Traffic between the pod and the node itself (e.g. an iperf3 client in the pod and its
//! server in the node) crosses exactly two hooks: the host veth's ingress (pod -> node) and its
//! egress (node -> pod). Nothing else in either namespace sends a frame unasked (the cluster's
//! quiet sysctls).
//!
//! Namespace names carry a per-run prefix (`ft<pid>x<n>-node`, `-pod`), so leftovers of a
//! killed run are swept like the cluster's ([`crate::sweep_stale`]). Dropping it deletes both.

use std::net::Ipv4Addr;

use crate::cluster::quiet;
use crate::netns;
use crate::{Error, Result};

/// The pod's address.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 10);
/// The node's address on the host veth (the pod's gateway).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

/// A node namespace and a pod namespace joined by one veth pair.
#[derive(Debug)]
pub struct VethPair {
    /// Prefix of both namespaces (`ft<pid>x<n>`).
    pub prefix: String,
    /// The node's namespace, holding `host_veth`.
    pub node_netns: String,
    /// The pod's namespace, holding `eth0`.
    pub pod_netns: String,
    /// The host-side veth's name (the hooks a tracer attaches to).
    pub host_veth: String,
    created: Vec<String>,
}

impl VethPair {
    /// Builds both namespaces and the veth pair; on error, deletes what it made.
    pub fn up() -> Result<Self> {
        if let Err(e) = netns::sweep_stale() {
            eprintln!("flowtrace-tests: sweeping stale namespaces failed (continuing): {e}");
        }
        let prefix = netns::new_prefix();
        let mut pair = VethPair {
            node_netns: format!("{prefix}-node"),
            pod_netns: format!("{prefix}-pod"),
            host_veth: crate::cluster::host_veth_name(&prefix, "pod"),
            prefix,
            created: Vec::new(),
        };
        // On error `pair` is dropped here, which deletes the namespaces made so far.
        pair.build()?;
        Ok(pair)
    }

    fn build(&mut self) -> Result<()> {
        let (node, pod, veth) = (
            self.node_netns.clone(),
            self.pod_netns.clone(),
            self.host_veth.clone(),
        );
        for ns in [&node, &pod] {
            netns::add_netns(ns)?;
            self.created.push(ns.clone());
            quiet(ns)?;
            ip(ns, "link set lo up")?;
        }
        netns::exec(
            &node,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        ip(
            &node,
            &format!("link add {veth} type veth peer name eth0 netns {pod}"),
        )?;
        ip(&node, &format!("addr add {NODE_IP}/32 dev {veth}"))?;
        ip(&node, &format!("link set {veth} up"))?;
        ip(&node, &format!("route add {POD_IP}/32 dev {veth}"))?;
        ip(&pod, &format!("addr add {POD_IP}/32 dev eth0"))?;
        ip(&pod, "link set eth0 up")?;
        ip(&pod, &format!("route add {NODE_IP} dev eth0 scope link"))?;
        ip(&pod, &format!("route add default via {NODE_IP} dev eth0"))?;
        // The first packet's neighbour resolution is not part of any measurement.
        netns::exec(&pod, &["ping", "-c", "1", "-W", "2", &NODE_IP.to_string()]).map_err(|e| {
            Error::Invalid(format!(
                "the pod cannot reach its node over the new veth pair {veth}: {e}"
            ))
        })?;
        Ok(())
    }

    /// Deletes both namespaces (and with them the veth pair), reporting what could not be.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        while let Some(ns) = self.created.pop() {
            if let Err(e) = netns::del_netns(&ns) {
                problems.push(format!("{ns}: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown(problems))
        }
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("flowtrace-tests: veth pair {} teardown: {e}", self.prefix);
        }
    }
}

/// `ip -n <netns> <args>` (split on whitespace).
fn ip(netns_name: &str, args: &str) -> Result<()> {
    let mut argv = vec!["ip", "-n", netns_name];
    argv.extend(args.split_whitespace());
    netns::run(&argv).map(drop)
}
