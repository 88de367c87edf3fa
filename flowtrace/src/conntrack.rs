//! Reading the kernel's connection-tracking table over ctnetlink (NETLINK_NETFILTER).
//!
//! This is the authoritative record of what NAT did: every tracked connection has an
//! original tuple (as the first packet arrived) and a reply tuple (as replies must look after
//! NAT). A connection was translated when the reply tuple is not the original one reversed.
//! The agent compares this with the rewrites its kernel programs saw (`crate::nat`).

use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple},
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::error::{Error, Result};
use crate::flows::FlowTuple;

/// One tracked connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// The connection as its first packet looked before NAT.
    pub orig: FlowTuple,
    /// How replies look when they arrive, before they are un-NATed.
    pub reply: FlowTuple,
}

impl CtEntry {
    /// Whether NAT changed this connection.
    pub fn translated(&self) -> bool {
        self.reply != self.orig.reversed()
    }

    /// The rewrites this connection implies, as (tuple before, tuple after): the original
    /// direction turns `orig` into the reply tuple reversed; the reply direction turns
    /// `reply` back into `orig` reversed.
    pub fn rewrites(&self) -> [(FlowTuple, FlowTuple); 2] {
        [
            (self.orig, self.reply.reversed()),
            (self.reply, self.orig.reversed()),
        ]
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Netlink { what, source }
}

/// Dumps the conntrack table of the caller's network namespace (IPv4 and IPv6). Only TCP,
/// UDP and SCTP connections are returned: ICMP's identifiers are not ports, and other
/// protocols have no ports for NAT to rewrite. Blocking: call from a blocking task.
pub fn dump() -> Result<Vec<CtEntry>> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io("opening a ctnetlink socket"))?;
    socket
        .bind_auto()
        .map_err(io("binding the ctnetlink socket"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(io("connecting the ctnetlink socket"))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            // AF_UNSPEC dumps every family.
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    );
    request.finalize();
    let mut buf = vec![0u8; request.buffer_len()];
    request.serialize(&mut buf);
    socket
        .send(&buf, 0)
        .map_err(io("sending the conntrack dump request"))?;

    let mut entries = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        rx.clear();
        let n = socket
            .recv(&mut rx, 0)
            .map_err(io("reading the conntrack dump"))?;
        let mut offset = 0;
        while offset < n {
            let msg =
                NetlinkMessage::<NetfilterMessage>::deserialize(&rx[offset..n]).map_err(|e| {
                    Error::Netlink {
                        what: "decoding a conntrack message",
                        source: std::io::Error::other(e.to_string()),
                    }
                })?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(entries),
                NetlinkPayload::Error(e) => {
                    return Err(Error::Netlink {
                        what: "dumping the conntrack table (needs CAP_NET_ADMIN)",
                        source: e.to_io(),
                    })
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                    ..
                }) => {
                    if let Some(e) = entry(&attrs) {
                        entries.push(e);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// The connection described by one conntrack message, if it has ports.
fn entry(attrs: &[ConntrackAttribute]) -> Option<CtEntry> {
    let mut orig = None;
    let mut reply = None;
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple(t),
            _ => {}
        }
    }
    Some(CtEntry {
        orig: orig?,
        reply: reply?,
    })
}

fn tuple(parts: &[Tuple]) -> Option<FlowTuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for part in parts {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(n) => proto = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(port) => sport = Some(*port),
                        ProtoTuple::DestinationPort(port) => dport = Some(*port),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let protocol = proto?;
    if !matches!(protocol, 6 | 17 | 132) {
        return None;
    }
    let (src, dst): (IpAddr, IpAddr) = (src?, dst?);
    Some(FlowTuple {
        protocol,
        src,
        dst,
        src_port: sport?,
        dst_port: dport?,
    })
}
