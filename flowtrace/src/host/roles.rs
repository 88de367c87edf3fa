//! What each interface of the node is: a pod's host side, the overlay, the node's uplink, or
//! something else. Decided from what the CNI and the node's set-up leave in the kernel (the
//! link's kind and peer, its bridge, its addresses and the routes through it), never from a
//! name.
//!
//! - **Overlay**: a VXLAN or Geneve device.
//! - **Uplink**: an interface the node reaches other machines through: it carries the default
//!   route or a route via a next hop (to another node's pod range, as host-gw, kindnet or BGP
//!   routing install), or (not a bridge) an address with a subnet (`192.168.50.1/24`). In kind,
//!   k3d and minikube-with-docker nodes the uplink `eth0` is itself a veth whose peer is in
//!   another namespace; it is never a pod.
//! - **Pod**: a veth whose peer is in another namespace and which the CNI wired to a pod: a port
//!   of a bridge that is not the uplink (flannel, the bridge plugin: `cni0`), or the device of a
//!   route to exactly one address with no next hop (Calico's `cali*`, Cilium's `lxc*` with
//!   endpoint routes, kindnet/ptp: `10.244.0.5/32 dev veth...`). A ptp host veth carries the
//!   pod gateway as a /32 address of its own: a single address is not a subnet, so it is no
//!   uplink.
//! - **Other**: everything else (the pod bridge, NICs without routes or addresses, a veth to another namespace that
//!   no route or bridge ties to a pod, such as a CNI that routes pods with eBPF only: trace
//!   those with `--include-iface`).
//!
//! The facts are re-read whenever a link, an address or a route changes, so a veth that
//! becomes a pod (its route added after it came up) is traced then, and one that stops being
//! one is detached.

use std::{collections::HashMap, fmt, net::IpAddr};

/// What a link is to flowtrace: what it traces by default, and how metrics name a hop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkRole {
    /// A pod's host-side interface.
    PodVeth,
    /// A VXLAN or Geneve device.
    Overlay,
    /// The node's way to other machines (default route, routes via next hops, a subnet
    /// address).
    Uplink,
    /// Anything else (bridges, NICs without routes, unrouted veths).
    #[default]
    Other,
}

impl LinkRole {
    /// The name used in `/v1/interfaces`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkRole::PodVeth => "pod",
            LinkRole::Overlay => "overlay",
            LinkRole::Uplink => "uplink",
            LinkRole::Other => "other",
        }
    }
}

/// An address on a link (RTM_GETADDR), beyond link and host scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrFact {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A unicast route out of a link (RTM_GETROUTE; one per next hop of a multipath route).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteFact {
    pub ifindex: u32,
    pub dst: Option<IpAddr>,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
}

/// What classification needs to know of one link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkShape<'a> {
    pub ifindex: u32,
    pub name: &'a str,
    pub kind: Option<&'a str>,
    pub peer_elsewhere: bool,
    pub master: Option<u32>,
}

/// A role and the evidence for it, in words an operator can check with `ip addr` and
/// `ip route`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub role: LinkRole,
    pub why: String,
}

fn full_len(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// Why a link is an uplink, if it is one. A bridge's subnet address is no evidence: the pod
/// bridge carries the pods' gateway (`cni0` 10.244.1.1/24); only routes make a bridge the
/// uplink.
fn uplink_evidence(
    ifindex: u32,
    bridge: bool,
    addrs: &[AddrFact],
    routes: &[RouteFact],
) -> Option<String> {
    if let Some(r) = routes
        .iter()
        .find(|r| r.ifindex == ifindex && r.prefix_len == 0)
    {
        return Some(match r.gateway {
            Some(g) => format!("carries the default route (via {g})"),
            None => "carries the default route".into(),
        });
    }
    if let Some(r) = routes
        .iter()
        .find(|r| r.ifindex == ifindex && r.gateway.is_some())
    {
        let dst = r
            .dst
            .map(|d| format!("{d}/{}", r.prefix_len))
            .unwrap_or_default();
        let via = r.gateway.map(|g| g.to_string()).unwrap_or_default();
        return Some(format!("routes {dst} via {via}"));
    }
    if bridge {
        return None;
    }
    addrs
        .iter()
        .find(|a| a.ifindex == ifindex && a.prefix_len < full_len(&a.addr))
        .map(|a| format!("carries {}/{}", a.addr, a.prefix_len))
}

/// Classifies every link in `links` from the node's addresses and routes.
pub fn classify(
    links: &[LinkShape<'_>],
    addrs: &[AddrFact],
    routes: &[RouteFact],
) -> HashMap<u32, Verdict> {
    let by_index: HashMap<u32, &LinkShape<'_>> = links.iter().map(|l| (l.ifindex, l)).collect();
    let mut out = HashMap::with_capacity(links.len());
    for l in links {
        let verdict = |role, why: String| Verdict { role, why };
        let v = if matches!(l.kind, Some("vxlan") | Some("geneve")) {
            verdict(
                LinkRole::Overlay,
                format!("{} device", l.kind.unwrap_or("overlay")),
            )
        } else if let Some(why) =
            uplink_evidence(l.ifindex, l.kind == Some("bridge"), addrs, routes)
        {
            verdict(LinkRole::Uplink, why)
        } else if l.kind == Some("veth") && l.peer_elsewhere {
            pod_evidence(l, &by_index, addrs, routes)
        } else {
            verdict(LinkRole::Other, String::new())
        };
        out.insert(l.ifindex, v);
    }
    out
}

fn pod_evidence(
    l: &LinkShape<'_>,
    by_index: &HashMap<u32, &LinkShape<'_>>,
    addrs: &[AddrFact],
    routes: &[RouteFact],
) -> Verdict {
    if let Some(bridge) = l
        .master
        .and_then(|m| by_index.get(&m))
        .filter(|b| b.kind == Some("bridge"))
    {
        // A bridge that routes to other machines is the node's uplink bridge (a VM host's
        // br0): its ports are links to other machines or guests, not pods.
        return match uplink_evidence(bridge.ifindex, true, addrs, routes) {
            None => Verdict {
                role: LinkRole::PodVeth,
                why: format!("peer in another namespace, port of bridge {}", bridge.name),
            },
            Some(why) => Verdict {
                role: LinkRole::Other,
                why: format!(
                    "peer in another namespace, port of bridge {}, which is the uplink ({why})",
                    bridge.name
                ),
            },
        };
    }
    if let Some(r) = routes.iter().find(|r| {
        r.ifindex == l.ifindex
            && r.gateway.is_none()
            && r.dst.is_some_and(|d| r.prefix_len == full_len(&d))
    }) {
        let dst = r.dst.map(|d| d.to_string()).unwrap_or_default();
        return Verdict {
            role: LinkRole::PodVeth,
            why: format!("peer in another namespace, route to {dst}/{}", r.prefix_len),
        };
    }
    Verdict {
        role: LinkRole::Other,
        why: "peer in another namespace, but no bridge and no route to a single address \
              ties it to a pod (--include-iface traces it anyway)"
            .into(),
    }
}

impl fmt::Display for LinkRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape<'a>(
        ifindex: u32,
        name: &'a str,
        kind: &'a str,
        peer_elsewhere: bool,
        master: Option<u32>,
    ) -> LinkShape<'a> {
        LinkShape {
            ifindex,
            name,
            kind: Some(kind),
            peer_elsewhere,
            master,
        }
    }

    fn addr(ifindex: u32, a: &str, prefix_len: u8) -> AddrFact {
        AddrFact {
            ifindex,
            addr: a.parse().expect("address"),
            prefix_len,
        }
    }

    fn route(ifindex: u32, dst: Option<&str>, prefix_len: u8, gw: Option<&str>) -> RouteFact {
        RouteFact {
            ifindex,
            dst: dst.map(|d| d.parse().expect("dst")),
            prefix_len,
            gateway: gw.map(|g| g.parse().expect("gateway")),
        }
    }

    fn role(v: &HashMap<u32, Verdict>, ifindex: u32) -> LinkRole {
        v.get(&ifindex).map(|v| v.role).unwrap_or_default()
    }

    #[test]
    fn flannel_node_whose_uplink_is_a_veth() {
        // kind-style: eth0 is a veth into another namespace, with the node's address.
        let links = [
            shape(2, "eth0", "veth", true, None),
            shape(3, "cni0", "bridge", false, None),
            shape(4, "flannel.1", "vxlan", false, None),
            shape(5, "veth1234", "veth", true, Some(3)),
        ];
        let addrs = [addr(2, "192.168.50.1", 24), addr(3, "10.244.1.1", 24)];
        let routes = [
            route(2, Some("192.168.50.0"), 24, None),
            route(3, Some("10.244.1.0"), 24, None),
            route(4, Some("10.244.2.0"), 24, Some("10.244.2.0")),
        ];
        let v = classify(&links, &addrs, &routes);
        assert_eq!(role(&v, 2), LinkRole::Uplink, "{:?}", v[&2]);
        assert_eq!(role(&v, 3), LinkRole::Other);
        assert_eq!(role(&v, 4), LinkRole::Overlay);
        assert_eq!(role(&v, 5), LinkRole::PodVeth, "{:?}", v[&5]);
        assert!(v[&5].why.contains("cni0"), "{:?}", v[&5]);
        assert!(v[&2].why.contains("192.168.50.1/24"), "{:?}", v[&2]);
    }

    #[test]
    fn routed_pods_with_and_without_a_gateway_address() {
        let links = [
            shape(2, "eth0", "veth", true, None),
            // Calico: no address, a /32 route.
            shape(6, "cali0a1b2c3d", "veth", true, None),
            // ptp/kindnet: the gateway as a /32 address on the host side, and a /32 route.
            shape(7, "veth9f8e7d6c", "veth", true, None),
            // IPv6 only, a /128 route.
            shape(8, "lxc00ff", "veth", true, None),
        ];
        let addrs = [addr(2, "172.18.0.2", 16), addr(7, "10.244.0.1", 32)];
        let routes = [
            route(2, None, 0, Some("172.18.0.1")),
            route(2, Some("10.244.1.0"), 24, Some("172.18.0.3")),
            route(6, Some("10.244.0.12"), 32, None),
            route(7, Some("10.244.0.5"), 32, None),
            route(8, Some("fd00:10:244::7"), 128, None),
        ];
        let v = classify(&links, &addrs, &routes);
        assert_eq!(role(&v, 2), LinkRole::Uplink);
        assert!(v[&2].why.contains("default route"), "{:?}", v[&2]);
        for i in [6, 7, 8] {
            assert_eq!(role(&v, i), LinkRole::PodVeth, "{:?}", v[&i]);
        }
    }

    #[test]
    fn unrouted_veths_and_uplink_bridges_are_not_pods() {
        let links = [
            // No bridge, no route: nothing says a pod is there.
            shape(2, "vethlonely", "veth", true, None),
            // Both ends here.
            shape(3, "vethlocal", "veth", false, None),
            // A port of the bridge that holds the node's default route.
            shape(4, "br0", "bridge", false, None),
            shape(5, "vethguest", "veth", true, Some(4)),
            // A route to a single address through a next hop is not a pod's.
            shape(6, "vethtunnel", "veth", true, None),
        ];
        let routes = [
            route(4, None, 0, Some("192.168.1.1")),
            route(6, Some("10.9.9.9"), 32, Some("10.9.9.1")),
        ];
        let v = classify(&links, &[], &routes);
        assert_eq!(role(&v, 2), LinkRole::Other);
        assert!(v[&2].why.contains("--include-iface"), "{:?}", v[&2]);
        assert_eq!(role(&v, 3), LinkRole::Other);
        assert_eq!(role(&v, 4), LinkRole::Uplink);
        assert_eq!(role(&v, 5), LinkRole::Other);
        assert!(v[&5].why.contains("uplink"), "{:?}", v[&5]);
        assert_eq!(role(&v, 6), LinkRole::Uplink);
    }

    #[test]
    fn an_overlay_stays_an_overlay_whatever_it_routes() {
        let links = [shape(4, "vxlan.calico", "vxlan", false, None)];
        let addrs = [addr(4, "10.244.0.0", 32)];
        let routes = [route(4, Some("10.244.1.0"), 24, Some("10.244.1.0"))];
        let v = classify(&links, &addrs, &routes);
        assert_eq!(role(&v, 4), LinkRole::Overlay);
    }
}
