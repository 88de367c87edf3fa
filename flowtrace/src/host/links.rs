//! Which interfaces to trace, and following them as they come and go (rtnetlink).
//!
//! Traced by default: every veth whose peer lives in another network namespace (the
//! host side of a pod's interface, whatever the CNI names it) and every VXLAN or Geneve
//! device (flannel.1, vxlan.calico, cilium_vxlan, genev_sys_6081, ...). `--include-iface`
//! adds interfaces by name (e.g. the node's uplink, to see the encapsulated packets) and
//! `--exclude-iface` removes them.

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    link::{InfoKind, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage},
    tc::TcHandle,
    RouteNetlinkMessage,
};
use netlink_sys::{AsyncSocket, SocketAddr};
use tokio::sync::mpsc;

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
}

/// What a link is to flowtrace: what it traces by default, and how metrics name a hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkRole {
    /// A veth whose peer lives in another network namespace: a pod's host side.
    PodVeth,
    /// A VXLAN or Geneve device.
    Overlay,
    /// Anything else (bridges, NICs, veths with both ends here).
    Other,
}

impl Link {
    pub fn role(&self) -> LinkRole {
        match self.kind.as_deref() {
            Some("vxlan") | Some("geneve") => LinkRole::Overlay,
            Some("veth") if self.peer_netnsid.is_some() => LinkRole::PodVeth,
            _ => LinkRole::Other,
        }
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
        link.role() != LinkRole::Other
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
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkNetNsId(id) => peer_netnsid = Some(*id),
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
    })
}

/// Streams the current links, then every change, into `tx` until the receiver is gone.
pub async fn watch(tx: mpsc::Sender<LinkEvent>) -> Result<()> {
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().map_err(|source| Error::Netlink {
            what: "opening a route socket",
            source,
        })?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))
        .map_err(|source| Error::Netlink {
            what: "subscribing to link events",
            source,
        })?;
    tokio::spawn(conn);

    // Subscribe first, dump second: a link created in between shows up twice, never zero times.
    let links = dump(&handle).await?;
    for link in links {
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
    loop {
        let event = tokio::select! {
            msg = messages.next() => match msg {
                Some((msg, _)) => match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                        link_from_message(&m).map(LinkEvent::Present)
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                        Some(LinkEvent::Removed { ifindex: m.header.index })
                    }
                    _ => None,
                },
                None => {
                    return Err(Error::Netlink {
                        what: "following link events",
                        source: std::io::Error::other("the netlink event stream ended"),
                    })
                }
            },
            _ = resync.tick() => Some(LinkEvent::Resync(dump(&handle).await?)),
        };
        if let Some(event) = event {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// How often the link list is dumped again to repair missed events.
pub const RESYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

async fn dump(handle: &rtnetlink::Handle) -> Result<Vec<Link>> {
    let mut out = Vec::new();
    let mut dump = handle.link().get().execute();
    while let Some(item) = dump.next().await {
        let msg = item.map_err(|e| Error::Netlink {
            what: "dumping links",
            source: std::io::Error::other(e.to_string()),
        })?;
        out.extend(link_from_message(&msg));
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

    fn link(name: &str, kind: &str, other_ns: bool) -> Link {
        Link {
            ifindex: 1,
            name: name.into(),
            kind: Some(kind.into()),
            peer_netnsid: other_ns.then_some(0),
            ethernet: true,
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
            ifindex: 2,
            name: "eth0".into(),
            kind: None,
            peer_netnsid: None,
            ethernet: true,
        }));
    }

    #[test]
    fn include_and_exclude_globs() {
        let s = Selector {
            include: vec!["eth*".into()],
            exclude: vec!["veth9*".into(), "flannel.1".into()],
        };
        assert!(s.selects(&Link {
            ifindex: 2,
            name: "eth0".into(),
            kind: None,
            peer_netnsid: None,
            ethernet: true,
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
