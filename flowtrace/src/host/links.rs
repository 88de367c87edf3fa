//! Which interfaces to trace, and following them as they come and go (rtnetlink).
//!
//! Traced by default: every pod's host-side interface and every VXLAN or Geneve device
//! (flannel.1, vxlan.calico, cilium_vxlan, genev_sys_6081, ...), as `roles` decides them from
//! the links, addresses and routes (never from names). `--include-iface` adds interfaces by
//! name (e.g. the node's uplink, to see the encapsulated packets) and `--exclude-iface`
//! removes them.

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage},
    tc::TcHandle,
    RouteNetlinkMessage,
};
use netlink_sys::{AsyncSocket, SocketAddr};
use tokio::sync::mpsc;

pub use super::roles::LinkRole;
use super::roles::{self, AddrFact, LinkShape, RouteFact};
use crate::{
    error::{Error, Result},
    util::glob_match,
};

/// What the agent needs to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// rtnetlink `IFLA_INFO_KIND` ("veth", "vxlan", "geneve", ...), if any.
    pub kind: Option<String>,
    /// The id, in this namespace, of the network namespace the link's peer lives in
    /// (`IFLA_LINK_NETNSID`); `None` when the peer is here or the link has none.
    pub peer_netnsid: Option<i32>,
    /// Frames start with an Ethernet header (ARPHRD_ETHER). flowtrace parses from an Ethernet
    /// header, so L3 devices (wireguard, ipip, netkit in L3 mode) are never traced.
    pub ethernet: bool,
    /// The bridge (or other controller) the link is a port of (`IFLA_MASTER`).
    pub master: Option<u32>,
    /// What the link is, from the node's links, addresses and routes ([`roles`]).
    pub role: LinkRole,
    /// The evidence for `role`, for `/v1/interfaces` and the logs.
    pub why: String,
}

impl Link {
    pub fn role(&self) -> LinkRole {
        self.role
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link exists (from the initial dump or a RTM_NEWLINK, which also fires on changes).
    Present(Link),
    /// A link was deleted (RTM_DELLINK).
    Removed { ifindex: u32 },
    /// The initial dump is complete: every link that existed at start has been reported.
    Synced,
    /// A periodic full dump: links missing from it are gone even if no event said so.
    Resync(Vec<Link>),
}

/// The tracing policy: defaults plus name globs (`*` matches any run of characters).
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl Selector {
    pub fn selects(&self, link: &Link) -> bool {
        if !link.ethernet {
            return false;
        }
        if self.exclude.iter().any(|p| glob_match(p, &link.name)) {
            return false;
        }
        if self.include.iter().any(|p| glob_match(p, &link.name)) {
            return true;
        }
        matches!(link.role(), LinkRole::PodVeth | LinkRole::Overlay)
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::Geneve => "geneve".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Other(s) => s.clone(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Extracts the fields we need from an rtnetlink link message.
pub fn link_from_message(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut kind = None;
    let mut peer_netnsid = None;
    let mut master = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkNetNsId(id) => peer_netnsid = Some(*id),
            LinkAttribute::Controller(m) => master = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let NlLinkInfo::Kind(k) = i {
                        kind = Some(kind_name(k));
                    }
                }
            }
            _ => {}
        }
    }
    Some(Link {
        ifindex: msg.header.index,
        name: name?,
        kind,
        peer_netnsid,
        ethernet: msg.header.link_layer_type == netlink_packet_route::link::LinkLayerType::Ether,
        master,
        role: LinkRole::Other,
        why: String::new(),
    })
}

/// Sets every link's role from the namespace's addresses and routes.
pub fn assign_roles(links: &mut [Link], addrs: &[AddrFact], routes: &[RouteFact]) {
    let verdicts = {
        let shapes: Vec<LinkShape<'_>> = links
            .iter()
            .map(|l| LinkShape {
                ifindex: l.ifindex,
                name: &l.name,
                kind: l.kind.as_deref(),
                peer_elsewhere: l.peer_netnsid.is_some(),
                master: l.master,
            })
            .collect();
        roles::classify(&shapes, addrs, routes)
    };
    for l in links {
        let v = verdicts.get(&l.ifindex).cloned().unwrap_or_default();
        l.role = v.role;
        l.why = v.why;
    }
}

/// Streams the current links, then every change, into `tx` until the receiver is gone.
///
/// A link's role depends on its addresses and routes as much as on the link itself (a CNI
/// adds a pod's /32 route after the veth is up), so every link, address and route event
/// leads to a fresh view of all three, taken once the burst of events is over
/// ([`SETTLE`]); links whose view changed are reported again, vanished ones as removed.
pub async fn watch(tx: mpsc::Sender<LinkEvent>) -> Result<()> {
    use rtnetlink::constants::{
        RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK,
    };
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().map_err(|source| Error::Netlink {
            what: "opening a route socket",
            source,
        })?;
    let groups = RTMGRP_LINK
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV6_ROUTE;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .map_err(|source| Error::Netlink {
            what: "subscribing to link, address and route events",
            source,
        })?;
    tokio::spawn(conn);

    // Subscribe first, dump second: a change in between is seen twice, never zero times.
    let mut known: std::collections::HashMap<u32, Link> = std::collections::HashMap::new();
    for link in view(&handle).await? {
        known.insert(link.ifindex, link.clone());
        if tx.send(LinkEvent::Present(link)).await.is_err() {
            return Ok(());
        }
    }
    if tx.send(LinkEvent::Synced).await.is_err() {
        return Ok(());
    }
    // Events can be lost (a full socket buffer during a burst of pod churn): a periodic dump
    // repairs whatever was missed.
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    resync.tick().await;
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let settle = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = messages.next() => match msg {
                Some((msg, _)) => {
                    if let NetlinkPayload::InnerMessage(m) = msg.payload {
                        if changes_roles(&m) && due.is_none() {
                            due = Some(tokio::time::Instant::now() + SETTLE);
                        }
                    }
                }
                None => {
                    return Err(Error::Netlink {
                        what: "following link events",
                        source: std::io::Error::other("the netlink event stream ended"),
                    })
                }
            },
            _ = settle => {
                due = None;
                let links = view(&handle).await?;
                let mut events = Vec::new();
                for link in &links {
                    if known.get(&link.ifindex) != Some(link) {
                        events.push(LinkEvent::Present(link.clone()));
                    }
                }
                let gone: Vec<u32> = known
                    .keys()
                    .filter(|i| !links.iter().any(|l| l.ifindex == **i))
                    .copied()
                    .collect();
                events.extend(gone.into_iter().map(|ifindex| LinkEvent::Removed { ifindex }));
                known = links.into_iter().map(|l| (l.ifindex, l)).collect();
                for event in events {
                    if tx.send(event).await.is_err() {
                        return Ok(());
                    }
                }
            }
            _ = resync.tick() => {
                let links = view(&handle).await?;
                known = links.iter().map(|l| (l.ifindex, l.clone())).collect();
                if tx.send(LinkEvent::Resync(links)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Whether an event can change a link's role.
fn changes_roles(m: &RouteNetlinkMessage) -> bool {
    matches!(
        m,
        RouteNetlinkMessage::NewLink(_)
            | RouteNetlinkMessage::DelLink(_)
            | RouteNetlinkMessage::NewAddress(_)
            | RouteNetlinkMessage::DelAddress(_)
            | RouteNetlinkMessage::NewRoute(_)
            | RouteNetlinkMessage::DelRoute(_)
    )
}

/// How often the link list is dumped again to repair missed events.
pub const RESYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// How long after a link, address or route event the view is taken again: a CNI's set-up of
/// one pod (veth, namespace move, addresses, routes) is a burst of events within a few
/// milliseconds, read in one view.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// Every link of the namespace with its role (dumps of links, addresses and routes).
async fn view(handle: &rtnetlink::Handle) -> Result<Vec<Link>> {
    let mut links = dump(handle).await?;
    let addrs = dump_addresses(handle).await?;
    let routes = dump_routes(handle).await?;
    assign_roles(&mut links, &addrs, &routes);
    Ok(links)
}

fn netlink_error(what: &'static str, e: rtnetlink::Error) -> Error {
    Error::Netlink {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

async fn dump(handle: &rtnetlink::Handle) -> Result<Vec<Link>> {
    let mut out = Vec::new();
    let mut dump = handle.link().get().execute();
    while let Some(item) = dump.next().await {
        let msg = item.map_err(|e| netlink_error("dumping links", e))?;
        out.extend(link_from_message(&msg));
    }
    Ok(out)
}

async fn dump_addresses(handle: &rtnetlink::Handle) -> Result<Vec<AddrFact>> {
    use netlink_packet_route::address::{AddressAttribute, AddressScope};
    let mut out = Vec::new();
    let mut dump = handle.address().get().execute();
    while let Some(item) = dump.next().await {
        let msg = item.map_err(|e| netlink_error("dumping addresses", e))?;
        if matches!(msg.header.scope, AddressScope::Link | AddressScope::Host) {
            continue;
        }
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on a
        // point-to-point link); IPv6 has only IFA_ADDRESS.
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(addr) = local.or(address) {
            out.push(AddrFact {
                ifindex: msg.header.index,
                addr,
                prefix_len: msg.header.prefix_len,
            });
        }
    }
    Ok(out)
}

async fn dump_routes(handle: &rtnetlink::Handle) -> Result<Vec<RouteFact>> {
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteType, RouteVia};
    use rtnetlink::RouteMessageBuilder;
    fn ip(a: &RouteAddress) -> Option<std::net::IpAddr> {
        match a {
            RouteAddress::Inet(v4) => Some((*v4).into()),
            RouteAddress::Inet6(v6) => Some((*v6).into()),
            _ => None,
        }
    }
    fn gateway(attrs: &[RouteAttribute]) -> Option<std::net::IpAddr> {
        attrs.iter().find_map(|a| match a {
            RouteAttribute::Gateway(g) => ip(g),
            RouteAttribute::Via(RouteVia::Inet(v4)) => Some((*v4).into()),
            RouteAttribute::Via(RouteVia::Inet6(v6)) => Some((*v6).into()),
            _ => None,
        })
    }
    let mut out = Vec::new();
    let requests = [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ];
    for request in requests {
        let mut dump = handle.route().get(request).execute();
        while let Some(item) = dump.next().await {
            let msg = item.map_err(|e| netlink_error("dumping routes", e))?;
            if msg.header.kind != RouteType::Unicast {
                continue;
            }
            let dst = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => ip(d),
                _ => None,
            });
            let prefix_len = msg.header.destination_prefix_length;
            let oif = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if let Some(ifindex) = oif {
                out.push(RouteFact {
                    ifindex,
                    dst,
                    prefix_len,
                    gateway: gateway(&msg.attributes),
                });
            }
            for attr in &msg.attributes {
                if let RouteAttribute::MultiPath(hops) = attr {
                    for hop in hops {
                        out.push(RouteFact {
                            ifindex: hop.interface_index,
                            dst,
                            prefix_len,
                            gateway: gateway(&hop.attributes),
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Removes the clsact qdisc of `ifindex` (clsact mode, only where flowtrace added it).
pub async fn delete_clsact(ifindex: u32) -> Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Netlink {
        what: "opening a route socket",
        source,
    })?;
    tokio::spawn(conn);
    let mut req = handle.qdisc().del(ifindex as i32);
    req.message_mut().header.parent = TcHandle {
        major: 0xffff,
        minor: 0xfff1,
    };
    req.message_mut().header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    req.execute().await.map_err(|e| Error::Netlink {
        what: "deleting the clsact qdisc",
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link whose role is what a pod veth, an overlay or anything else would get.
    fn link(name: &str, kind: &str, pod: bool) -> Link {
        let role = match kind {
            "vxlan" | "geneve" => LinkRole::Overlay,
            "veth" if pod => LinkRole::PodVeth,
            _ => LinkRole::Other,
        };
        Link {
            ifindex: 1,
            name: name.into(),
            kind: Some(kind.into()),
            peer_netnsid: pod.then_some(0),
            ethernet: true,
            master: None,
            role,
            why: String::new(),
        }
    }

    #[test]
    fn default_policy_traces_pod_veths_and_overlays_only() {
        let s = Selector::default();
        assert!(s.selects(&link("veth1a2b3c4d", "veth", true)));
        assert!(s.selects(&link("cali12345", "veth", true)));
        assert!(
            !s.selects(&link("vethlocal", "veth", false)),
            "both ends here: not a pod veth"
        );
        assert!(s.selects(&link("flannel.1", "vxlan", false)));
        assert!(s.selects(&link("genev_sys_6081", "geneve", false)));
        assert!(!s.selects(&link("cni0", "bridge", false)));
        assert!(!s.selects(&Link {
            role: LinkRole::Uplink,
            ..link("br0", "bridge", false)
        }));
        let wg = Link {
            ethernet: false,
            ..link("wg0", "wireguard", false)
        };
        assert!(
            !Selector {
                include: vec!["wg*".into()],
                exclude: vec![]
            }
            .selects(&wg),
            "L3 devices have no Ethernet header"
        );
        assert!(!s.selects(&Link {
            role: LinkRole::Uplink,
            ..link("eth0", "veth", true)
        }));
    }

    #[test]
    fn include_and_exclude_globs() {
        let s = Selector {
            include: vec!["eth*".into()],
            exclude: vec!["veth9*".into(), "flannel.1".into()],
        };
        assert!(s.selects(&Link {
            role: LinkRole::Uplink,
            ..link("eth0", "veth", true)
        }));
        assert!(!s.selects(&link("veth9abc", "veth", true)));
        assert!(s.selects(&link("veth1abc", "veth", true)));
        assert!(!s.selects(&link("flannel.1", "vxlan", false)));
    }

    #[test]
    fn glob() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("*.1", "flannel.1"));
        assert!(!glob_match("a*c", "abd"));
        assert!(glob_match("x", "x"));
        assert!(!glob_match("x", "xy"));
    }
}
