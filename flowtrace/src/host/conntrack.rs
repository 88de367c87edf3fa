//! Reading the kernel's connection-tracking table over ctnetlink (NETLINK_NETFILTER).
//!
//! This is the authoritative record of what NAT did: every tracked connection has an
//! original tuple (as the first packet arrived) and a reply tuple (as replies must look after
//! NAT). A connection was translated when the reply tuple is not the original one reversed.
//! The agent compares this with the rewrites its kernel programs saw (`crate::state::nat`).
//!
//! Two ways in: a full dump ([`dump`]), and the NEW/DESTROY event groups ([`subscribe`],
//! [`EventSocket::recv`]). The agent keeps a [`CtMirror`] of the translated connections from
//! the events, so a connection that lived and died between two drains is still known, and
//! dumps only to resynchronise (at start, periodically, after an event overflow).

use std::{collections::HashMap, net::IpAddr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::{
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple},
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::error::{Error, Result};
use crate::model::{wire::CtStats, FlowTuple};

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
        let mut done = false;
        parse(&rx[..n], &mut |m| match m {
            Parsed::Done => done = true,
            Parsed::New(e) => entries.push(e),
            Parsed::Destroy(_) => {}
        })?;
        if done {
            return Ok(entries);
        }
    }
}

enum Parsed {
    New(CtEntry),
    Destroy(CtEntry),
    Done,
}

/// Decodes the netlink messages of one datagram.
fn parse(buf: &[u8], out: &mut dyn FnMut(Parsed)) -> Result<()> {
    let mut offset = 0;
    while offset < buf.len() {
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[offset..]).map_err(|e| {
            Error::Netlink {
                what: "decoding a conntrack message",
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::Done(_) => out(Parsed::Done),
            NetlinkPayload::Error(e) => {
                return Err(Error::Netlink {
                    what: "reading conntrack (needs CAP_NET_ADMIN)",
                    source: e.to_io(),
                })
            }
            NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(m),
                ..
            }) => match m {
                ConntrackMessage::New(attrs) => {
                    if let Some(e) = entry(&attrs) {
                        out(Parsed::New(e));
                    }
                }
                ConntrackMessage::Delete(attrs) => {
                    if let Some(e) = entry(&attrs) {
                        out(Parsed::Destroy(e));
                    }
                }
                _ => {}
            },
            _ => {}
        }
        if len == 0 {
            break;
        }
        offset += len;
    }
    Ok(())
}

/// NFNLGRP_CONNTRACK_NEW and NFNLGRP_CONNTRACK_DESTROY (include/uapi/linux/netfilter/nfnetlink.h).
const GROUP_NEW: u32 = 1;
const GROUP_DESTROY: u32 = 3;

/// A conntrack event as the mirror takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtEvent {
    New(CtEntry),
    Destroy(CtEntry),
    /// The kernel dropped events (the socket buffer was full): resynchronise with a dump.
    Overflow,
}

/// A socket subscribed to conntrack's NEW and DESTROY events.
pub struct EventSocket {
    socket: Socket,
    buf: Vec<u8>,
}

/// Subscribes to conntrack NEW and DESTROY events of the caller's network namespace.
pub fn subscribe() -> Result<EventSocket> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io("opening a ctnetlink socket"))?;
    socket
        .bind_auto()
        .map_err(io("binding the ctnetlink event socket"))?;
    for g in [GROUP_NEW, GROUP_DESTROY] {
        socket
            .add_membership(g)
            .map_err(io("joining conntrack's event groups (needs CAP_NET_ADMIN)"))?;
    }
    // Bursts of short connections arrive faster than one thread drains them at times;
    // a larger buffer makes overflows (and the resync they force) rarer.
    let _ = socket.set_rx_buf_sz(4 << 20);
    Ok(EventSocket {
        socket,
        buf: vec![0u8; 1 << 16],
    })
}

impl EventSocket {
    /// Waits for the next datagram and appends its events. Blocking.
    pub fn recv(&mut self, out: &mut Vec<CtEvent>) -> Result<()> {
        self.buf.clear();
        match self.socket.recv(&mut self.buf, 0) {
            Ok(n) => parse(&self.buf[..n], &mut |m| match m {
                Parsed::New(e) => out.push(CtEvent::New(e)),
                Parsed::Destroy(e) => out.push(CtEvent::Destroy(e)),
                Parsed::Done => {}
            }),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                out.push(CtEvent::Overflow);
                Ok(())
            }
            Err(e) => Err(io("reading conntrack events")(e)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Held {
    ct: CtEntry,
    destroyed_ns: Option<u64>,
}

/// The translated connections, from events and dumps. A destroyed connection is kept for
/// `keep_ns`, so rewrites of a connection that ended before the next drain are still checked.
#[derive(Debug)]
pub struct CtMirror {
    held: HashMap<FlowTuple, Held>,
    keep_ns: u64,
    stats: CtStats,
    resync_needed: bool,
}

impl CtMirror {
    pub fn new(keep_ns: u64) -> Self {
        Self {
            held: HashMap::new(),
            keep_ns,
            stats: CtStats::default(),
            resync_needed: true,
        }
    }

    pub fn set_subscribed(&mut self, on: bool) {
        self.stats.subscribed = on;
    }

    pub fn stats(&self) -> CtStats {
        CtStats {
            translated_connections: self.held.len(),
            ..self.stats
        }
    }

    /// A dump is due: never done, events lost, or no event subscription.
    pub fn needs_resync(&self) -> bool {
        self.resync_needed || !self.stats.subscribed
    }

    pub fn event(&mut self, ev: CtEvent, now_ns: u64) {
        self.stats.events += 1;
        match ev {
            CtEvent::New(ct) if ct.translated() => {
                self.held.insert(
                    ct.orig,
                    Held {
                        ct,
                        destroyed_ns: None,
                    },
                );
            }
            CtEvent::Destroy(ct) => {
                if let Some(h) = self.held.get_mut(&ct.orig) {
                    h.destroyed_ns = Some(now_ns);
                } else if ct.translated() {
                    // Created before the subscription or lost in an overflow: still a
                    // translation that happened.
                    self.held.insert(
                        ct.orig,
                        Held {
                            ct,
                            destroyed_ns: Some(now_ns),
                        },
                    );
                }
            }
            CtEvent::New(_) => {}
            CtEvent::Overflow => {
                self.stats.events -= 1;
                self.stats.overflows += 1;
                self.resync_needed = true;
            }
        }
    }

    /// Replaces the live set with a dump; connections the dump no longer has are destroyed.
    pub fn resync(&mut self, dump: &[CtEntry], now_ns: u64) {
        self.stats.dumps += 1;
        self.resync_needed = false;
        let mut live: HashMap<FlowTuple, CtEntry> = dump
            .iter()
            .filter(|c| c.translated())
            .map(|c| (c.orig, *c))
            .collect();
        for (orig, h) in self.held.iter_mut() {
            match live.remove(orig) {
                Some(ct) => {
                    h.ct = ct;
                    h.destroyed_ns = None;
                }
                None if h.destroyed_ns.is_none() => h.destroyed_ns = Some(now_ns),
                None => {}
            }
        }
        for (orig, ct) in live {
            self.held.insert(
                orig,
                Held {
                    ct,
                    destroyed_ns: None,
                },
            );
        }
    }

    /// Every connection held, live or recently destroyed.
    pub fn entries(&self) -> Vec<CtEntry> {
        self.held.values().map(|h| h.ct).collect()
    }

    /// Forgets connections destroyed longer than the keep time ago.
    pub fn expire(&mut self, now_ns: u64) {
        let keep = self.keep_ns;
        self.held.retain(|_, h| {
            h.destroyed_ns
                .is_none_or(|d| now_ns.saturating_sub(d) <= keep)
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tcp as t;

    fn svc(port: u16) -> CtEntry {
        CtEntry {
            orig: t("10.244.1.10", port, "10.96.0.10", 80),
            reply: t("10.244.2.11", 8080, "10.244.1.10", port),
        }
    }

    #[test]
    fn the_mirror_keeps_short_connections_and_resyncs() {
        let mut m = CtMirror::new(100);
        m.set_subscribed(true);
        assert!(m.needs_resync(), "a first dump is due");
        m.resync(&[svc(1)], 0);
        assert!(!m.needs_resync());
        // Lived and died between two drains: still held.
        m.event(CtEvent::New(svc(2)), 10);
        m.event(CtEvent::Destroy(svc(2)), 20);
        // Untranslated connections are not kept.
        let plain = CtEntry {
            orig: t("10.244.1.10", 3, "10.244.2.11", 8080),
            reply: t("10.244.2.11", 8080, "10.244.1.10", 3),
        };
        m.event(CtEvent::New(plain), 20);
        let mut held: Vec<u16> = m.entries().iter().map(|c| c.orig.src_port).collect();
        held.sort();
        assert_eq!(held, vec![1, 2]);
        // Kept for the keep time after destruction, then forgotten.
        m.expire(120);
        assert_eq!(m.entries().len(), 2);
        m.expire(121);
        assert_eq!(m.entries().len(), 1);
        // An overflow asks for a dump; the dump marks what it lacks destroyed.
        m.event(CtEvent::Overflow, 130);
        assert!(m.needs_resync());
        m.resync(&[], 140);
        m.expire(241);
        assert!(m.entries().is_empty());
        let s = m.stats();
        assert_eq!((s.events, s.overflows, s.dumps), (3, 1, 2));
    }
}
