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
    // Without the filter every event comes, and the mirror still keeps only the translated
    // connections: it is skipped where it could hide one, and its failure is not fatal.
    // - It reads attribute headers as little-endian.
    // - IPVS (kube-proxy's ipvs mode) rewrites a connection's reply tuple without setting a
    //   NAT status bit, so its translations would not pass. A node whose IPVS table appears
    //   after the agent started still has them from the periodic dumps.
    if !cfg!(target_endian = "little") {
        tracing::info!(
            "conntrack events unfiltered: the NAT-only filter needs a little-endian host"
        );
    } else if ipvs_in_use() {
        tracing::info!("conntrack events unfiltered: IPVS is loaded in this namespace (/proc/self/net/ip_vs), and its translations carry no NAT status bit");
    } else if let Err(e) = attach_nat_only_filter(&socket) {
        tracing::warn!(error = %e, "conntrack events unfiltered: every new connection on the node costs a wakeup");
    }
    Ok(EventSocket {
        socket,
        buf: vec![0u8; 1 << 16],
    })
}

/// Keeps only the events of connections netfilter's NAT changed on the event socket, in the
/// kernel: the mirror holds nothing else, and without it every new tuple on the node (a flood
/// of them, a port scan) costs the agent a wakeup, a datagram and its decoding twice (NEW
/// and DESTROY), which was half of the agent's CPU in a flood of fresh UDP tuples.
fn attach_nat_only_filter(socket: &Socket) -> Result<()> {
    use std::os::fd::AsRawFd;
    let program = nat_only_filter();
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::from_ref(&prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io(
            "attaching the NAT-only filter to the conntrack event socket",
        )(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether IPVS is loaded in this network namespace (its table is listed in /proc).
fn ipvs_in_use() -> bool {
    std::path::Path::new("/proc/self/net/ip_vs").exists()
}

/// The status bits of a connection NAT changed (IPS_SRC_NAT | IPS_DST_NAT,
/// include/uapi/linux/netfilter/nf_conntrack_common.h): netfilter's NAT sets them when the
/// translation changes the tuple, which is `CtEntry::translated` for iptables and nftables
/// NAT. IPVS changes the reply tuple without them (`ipvs_in_use`).
const IPS_NAT_MASK: u32 = 0x30;
/// CTA_STATUS (include/uapi/linux/netfilter/nfnetlink_conntrack.h).
const CTA_STATUS: u32 = 3;
/// Attributes the filter looks through for CTA_STATUS. ctnetlink writes the two tuples, the
/// zone (only outside the default zone), the id, then the status: the fourth or fifth.
const FILTER_STEPS: usize = 8;

/// A classic BPF socket filter (the kind netlink sockets run on each multicast datagram)
/// that passes a conntrack event whose CTA_STATUS has a NAT bit and refuses one without.
/// It walks the message's attributes from the first (after the 16-byte netlink header and
/// the 4-byte nfgenmsg), at most `FILTER_STEPS` of them; a message it cannot read to the
/// status (short, malformed, status further on) is passed whole, and user space decides as
/// before. Attribute headers are in host order (little-endian here: x86, arm64), the status
/// in network order, which is how classic BPF loads words.
fn nat_only_filter() -> Vec<libc::sock_filter> {
    // Classic BPF opcodes (include/uapi/linux/filter.h, bpf_common.h).
    const LD_W_LEN: u16 = 0x80; // A = packet length
    const LD_B_IND: u16 = 0x50; // A = byte at X + k
    const LD_W_IND: u16 = 0x40; // A = big-endian word at X + k
    const LDX_MEM: u16 = 0x61; // X = M[k]
    const ST: u16 = 0x02; // M[k] = A
    const STX: u16 = 0x03; // M[k] = X
    const ALU_ADD_K: u16 = 0x04;
    const ALU_SUB_K: u16 = 0x14;
    const ALU_AND_K: u16 = 0x54;
    const ALU_LSH_K: u16 = 0x64;
    const ALU_OR_X: u16 = 0x4c;
    const ALU_ADD_X: u16 = 0x0c;
    const TAX: u16 = 0x07;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const JGE_X: u16 = 0x3d;
    const JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    const LDX_IMM: u16 = 0x01; // X = k

    /// Where a jump goes: the next instruction, the step's attribute skip, or an end.
    #[derive(Clone, Copy)]
    enum To {
        Next,
        Skip,
        Accept,
        Reject,
    }
    struct Insn {
        code: u16,
        k: u32,
        jt: To,
        jf: To,
    }
    let op = |code, k| Insn {
        code,
        k,
        jt: To::Next,
        jf: To::Next,
    };
    let jump = |code, k, jt, jf| Insn { code, k, jt, jf };

    let mut steps: Vec<Vec<Insn>> = Vec::new();
    for _ in 0..FILTER_STEPS {
        let mut step = vec![
            // Room for this attribute's header and a status word? Else give up: pass.
            op(LD_W_LEN, 0),
            op(ALU_SUB_K, 8),
            jump(JGE_X, 0, To::Next, To::Accept),
            // Its type (low byte, then the high byte less the nested/byte-order flags).
            op(LD_B_IND, 2),
            jump(JEQ_K, CTA_STATUS, To::Next, To::Skip),
            op(LD_B_IND, 3),
            op(ALU_AND_K, 0x3f),
            jump(JEQ_K, 0, To::Next, To::Skip),
            // CTA_STATUS: a NAT bit passes the event, none refuses it.
            op(LD_W_IND, 4),
            jump(JSET_K, IPS_NAT_MASK, To::Accept, To::Reject),
        ];
        step.extend([
            // X += align4(nla_len), the length a little-endian u16 at X.
            op(STX, 1),
            op(LD_B_IND, 0),
            op(ST, 0),
            op(LD_B_IND, 1),
            op(ALU_LSH_K, 8),
            op(LDX_MEM, 0),
            op(ALU_OR_X, 0),
            op(ALU_ADD_K, 3),
            op(ALU_AND_K, !3),
            // A zero length would not move: malformed, pass it to user space.
            jump(JGE_K, 4, To::Next, To::Accept),
            op(LDX_MEM, 1),
            op(ALU_ADD_X, 0),
            op(TAX, 0),
        ]);
        steps.push(step);
    }
    // Resolve the jumps: `Skip` is the step's first skip instruction (STX), the ends follow
    // the last step.
    let mut flat: Vec<(Insn, usize)> = Vec::new();
    for (i, step) in steps.into_iter().enumerate() {
        for insn in step {
            flat.push((insn, i));
        }
    }
    let total = flat.len() + 1; // the initial LDX
    let accept = total;
    let reject = total + 1;
    let skip_of: Vec<usize> = (0..FILTER_STEPS)
        .map(|step| {
            1 + flat
                .iter()
                .position(|(insn, s)| *s == step && insn.code == STX)
                .unwrap_or(0)
        })
        .collect();
    let mut out = vec![libc::sock_filter {
        code: LDX_IMM,
        jt: 0,
        jf: 0,
        k: 20,
    }];
    for (at, (insn, step)) in flat.iter().enumerate() {
        let here = at + 1;
        let target = |to: To| -> u8 {
            let t = match to {
                To::Next => here + 1,
                To::Skip => skip_of[*step],
                To::Accept => accept,
                To::Reject => reject,
            };
            // Forward only and within a byte: the program is ~190 instructions.
            (t - here - 1) as u8
        };
        out.push(libc::sock_filter {
            code: insn.code,
            jt: target(insn.jt),
            jf: target(insn.jf),
            k: insn.k,
        });
    }
    // After the last step (no status found): pass, user space decides.
    debug_assert_eq!(out.len(), accept);
    out.push(libc::sock_filter {
        code: RET_K,
        jt: 0,
        jf: 0,
        k: u32::MAX,
    });
    out.push(libc::sock_filter {
        code: RET_K,
        jt: 0,
        jf: 0,
        k: 0,
    });
    out
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

    /// Runs a classic BPF program the way the kernel does for the opcodes `nat_only_filter`
    /// uses: a load past the end refuses the packet (returns 0).
    fn run_filter(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut m, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        let byte = |at: u32| pkt.get(at as usize).map(|b| u32::from(*b));
        loop {
            let i = prog[pc];
            pc += 1;
            let k = i.k;
            let jump = |cond: bool| if cond { i.jt as usize } else { i.jf as usize };
            match i.code {
                0x80 => a = pkt.len() as u32,
                0x50 => match byte(x + k) {
                    Some(v) => a = v,
                    None => return 0,
                },
                0x40 => {
                    let at = (x + k) as usize;
                    match pkt.get(at..at + 4) {
                        Some(w) => a = u32::from_be_bytes([w[0], w[1], w[2], w[3]]),
                        None => return 0,
                    }
                }
                0x61 => x = m[k as usize],
                0x01 => x = k,
                0x02 => m[k as usize] = a,
                0x03 => m[k as usize] = x,
                0x04 => a = a.wrapping_add(k),
                0x14 => a = a.wrapping_sub(k),
                0x54 => a &= k,
                0x64 => a <<= k,
                0x4c => a |= x,
                0x0c => a = a.wrapping_add(x),
                0x07 => x = a,
                0x15 => pc += jump(a == k),
                0x35 => pc += jump(a >= k),
                0x3d => pc += jump(a >= x),
                0x45 => pc += jump(a & k != 0),
                0x06 => return k,
                other => panic!("opcode {other:#x} not in the filter"),
            }
        }
    }

    /// A netlink attribute: little-endian length and type, the value, padding to 4.
    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(value);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    /// A conntrack event as ctnetlink writes it: netlink header, nfgenmsg, the two nested
    /// tuples (their flag bit set), the zone if any, the id, then the status.
    fn event(status: u32, zone: bool) -> Vec<u8> {
        const NESTED: u16 = 0x8000;
        let ip = attr(
            1 | NESTED,
            &[attr(1, &[10, 244, 1, 10]), attr(2, &[10, 96, 0, 10])].concat(),
        );
        let proto = attr(
            2 | NESTED,
            &[
                attr(1, &[17]),
                attr(2, &40000u16.to_be_bytes()),
                attr(3, &53u16.to_be_bytes()),
            ]
            .concat(),
        );
        let tuple = [ip, proto].concat();
        let mut body = vec![2u8, 0, 0, 0];
        body.extend(attr(1 | NESTED, &tuple));
        body.extend(attr(2 | NESTED, &tuple));
        if zone {
            body.extend(attr(18, &7u16.to_be_bytes()));
        }
        body.extend(attr(12, &99u32.to_be_bytes()));
        body.extend(attr(CTA_STATUS as u16, &status.to_be_bytes()));
        body.extend(attr(7, &30u32.to_be_bytes()));
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + body.len()) as u32).to_le_bytes());
        msg.extend_from_slice(&[0u8; 12]);
        msg.extend(body);
        msg
    }

    #[test]
    fn the_event_filter_passes_translated_connections_only() {
        let prog = nat_only_filter();
        assert!(
            prog.len() < 256,
            "jumps are one byte: {} instructions",
            prog.len()
        );
        // IPS_CONFIRMED | IPS_SEEN_REPLY (0x8 | 0x2), with and without a NAT bit.
        for zone in [false, true] {
            assert_eq!(
                run_filter(&prog, &event(0x0a, zone)),
                0,
                "no NAT, zone {zone}"
            );
            for nat in [0x10, 0x20, 0x30] {
                assert_eq!(
                    run_filter(&prog, &event(0x0a | nat, zone)),
                    u32::MAX,
                    "NAT bits {nat:#x}, zone {zone}"
                );
            }
        }
        // What it cannot read to a status is passed whole (user space decides).
        let mut cut = event(0x0a, false);
        cut.truncate(60);
        assert_eq!(run_filter(&prog, &cut), u32::MAX, "a message cut short");
        let mut zero = event(0x0a, false);
        zero[20] = 0;
        zero[21] = 0;
        assert_eq!(
            run_filter(&prog, &zero),
            u32::MAX,
            "a zero-length attribute"
        );
        let no_status: Vec<u8> = event(0x0a, false)[..20]
            .iter()
            .copied()
            .chain((0..10).flat_map(|_| attr(12, &[0, 0, 0, 1])))
            .collect();
        assert_eq!(
            run_filter(&prog, &no_status),
            u32::MAX,
            "no status within the steps"
        );
    }
}
