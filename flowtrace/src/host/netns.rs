//! Which network namespaces are this node's: its own, and the pods' behind its veths.
//!
//! The drop programs say which namespace a packet died in by the namespace's inode number
//! (the number `ls -i /proc/self/ns/net` shows). A pod's namespace is found from the node
//! side: the runtime bind-mounts each pod namespace under a directory (`/var/run/netns` for
//! containerd, CRI-O and `ip netns`); for each file there the kernel tells, through
//! RTM_GETNSID, the id this namespace knows it by, which is the `IFLA_LINK_NETNSID` of the
//! pod veth whose peer lives there. Inode and veth are then joined exactly, with no guess
//! from names. Only pod veths count (`host::roles`): the namespace behind a node's uplink
//! veth (kind-style nodes, the two-node emulated cluster) is another machine's, never
//! placed. Opening the files needs only read permission on them (0444), no capability.

use std::{
    collections::HashMap,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    nsid::{NsidAttribute, NsidMessage},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::links::{Link, LinkRole};

/// Where runtimes bind-mount pod network namespaces by default.
pub const DEFAULT_NETNS_DIR: &str = "/var/run/netns";

/// The inode number of the caller's network namespace.
pub fn own_inode() -> std::io::Result<u32> {
    std::fs::metadata("/proc/self/ns/net").map(|m| m.ino() as u32)
}

/// Where a namespace is, seen from this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NsPlace {
    /// The node's own namespace (the agent's).
    Node,
    /// The namespace behind the pod veth with this ifindex.
    Pod { veth: u32 },
}

/// This node's namespaces by inode.
#[derive(Clone, Debug, Default)]
pub struct NsMap {
    places: HashMap<u32, NsPlace>,
    /// Why the pod namespaces could not be listed, from the last scan.
    pub problem: Option<String>,
}

impl NsMap {
    pub fn place(&self, inode: u32) -> Option<NsPlace> {
        self.places.get(&inode).copied()
    }

    pub fn len(&self) -> usize {
        self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }
}

/// Builds the map: the own namespace, then every namespace file in `dir` whose id here is
/// the peer namespace of one of `links`' veths. A file that cannot be opened or asked about
/// is skipped (a pod going away); a missing directory leaves only the node's namespace and
/// says so in `problem`.
pub fn scan(dir: &Path, links: &[Link]) -> NsMap {
    let mut map = NsMap::default();
    match own_inode() {
        Ok(ino) => {
            map.places.insert(ino, NsPlace::Node);
        }
        Err(e) => map.problem = Some(format!("reading /proc/self/ns/net: {e}")),
    }
    let mut socket = match route_socket() {
        Ok(s) => s,
        Err(e) => {
            map.problem = Some(e);
            return map;
        }
    };
    let by_nsid: HashMap<i32, u32> = links
        .iter()
        .filter(|l| l.role == LinkRole::PodVeth)
        .filter_map(|l| Some((l.peer_netnsid?, l.ifindex)))
        .collect();
    if by_nsid.is_empty() {
        return map;
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            map.problem = Some(format!(
                "listing {}: {e}; drops inside pods are counted as unplaced (mount the runtime's netns directory into the agent, see --netns-dir)",
                dir.display()
            ));
            return map;
        }
    };
    for entry in entries.flatten() {
        let Ok(file) = std::fs::File::open(entry.path()) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        let Ok(Some(nsid)) = nsid_of(&mut socket, file.as_raw_fd()) else {
            continue;
        };
        if let Some(veth) = by_nsid.get(&nsid) {
            map.places
                .insert(meta.ino() as u32, NsPlace::Pod { veth: *veth });
        }
    }
    map
}

fn route_socket() -> std::result::Result<Socket, String> {
    let mut socket =
        Socket::new(NETLINK_ROUTE).map_err(|e| format!("opening a route socket: {e}"))?;
    socket
        .bind_auto()
        .map_err(|e| format!("binding a route socket: {e}"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("connecting a route socket: {e}"))?;
    Ok(socket)
}

/// The id this namespace has for the namespace open at `fd` (RTM_GETNSID with NETNSA_FD);
/// `None` when it has none (nothing links the two).
fn nsid_of(socket: &mut Socket, fd: i32) -> std::io::Result<Option<i32>> {
    let mut msg = NsidMessage::default();
    msg.attributes.push(NsidAttribute::Fd(fd as u32));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetNsId(msg)),
    );
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut rx = Vec::with_capacity(4096);
    let n = socket.recv(&mut rx, 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[..n])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
            Ok(m.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            }))
        }
        NetlinkPayload::Error(e) => Err(e.to_io()),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_namespace_is_the_node() {
        let map = scan(Path::new("/nonexistent-netns-dir"), &[]);
        let own = own_inode().expect("own netns");
        assert_eq!(map.place(own), Some(NsPlace::Node));
        assert_eq!(map.len(), 1);
    }
}
