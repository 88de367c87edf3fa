//! The one namer: who the ends of a flow are, which Service it went through and which NAT
//! step it belongs to. `/v1/flows`, `/v1/trace` and `/metrics` all name flows here, so no
//! two views can attribute the same packet differently.
//!
//! A packet of a Service connection has several tuples on its way: `client -> VIP` before
//! kube-proxy's DNAT, `client -> backend` after it; the reply `backend -> client` before the
//! un-DNAT, `VIP -> client` after it. The namer puts a tuple in its *chain* (the tuples of
//! the same direction of the connection, in the order the packet has them), from the NAT
//! table, and from the other direction's translation when only that one is known. Then:
//!
//! - the Service is the one at a destination in the chain (a request), else at a source
//!   (a reply), by cluster IP or NodePort;
//! - the peers are the pods behind a Service address: where the tuple's destination is a
//!   Service address, the destination of the chain's last tuple that is none (the backend
//!   the packet was sent to); where its source is, the source of the chain's first tuple
//!   that is none (the backend the reply came from);
//! - the NAT step is the translation whose original tuple starts the chain.

use std::{cell::RefCell, collections::HashMap, net::IpAddr, sync::Arc};

use crate::{
    host::links::{Link, LinkRole},
    k8s::MetaCache,
    model::{
        protocol_name, tcp_flags_string,
        wire::{NatStep, TraceHop, TracePacket},
        Endpoint, FlowTuple, ServiceRef, Translation,
    },
    state::{nat::NatTable, trace::TracedPacket},
    util::FastHash,
};

/// Names flows from the metadata, the NAT table and the interfaces, as of one moment.
/// Borrowing them is the caller's business: the agent holds its tables' lock while naming.
pub struct Namer<'a> {
    meta: &'a MetaCache,
    nat: &'a NatTable,
    links: &'a HashMap<u32, Link>,
    /// Each address looked up once while the metadata is borrowed (it cannot change under
    /// a namer): a drain names hundreds of thousands of flows between a few thousand
    /// addresses, and one lookup here replaces the metadata's several.
    addresses: RefCell<HashMap<IpAddr, Address, FastHash>>,
}

/// What a namer knows of an address.
struct Address {
    /// Who holds it.
    endpoint: Option<Arc<Endpoint>>,
    /// Whether a Service may be reached at it (`MetaCache::serves_at`): when not, no port
    /// of it is asked for one.
    serves: bool,
}

/// A tuple named: its ends as addressed, the peers behind Service addresses, the Service
/// and the NAT step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attribution {
    pub src: Option<Arc<Endpoint>>,
    pub dst: Option<Arc<Endpoint>>,
    /// Set only where the source is a Service address (see the module documentation).
    pub src_peer: Option<Arc<Endpoint>>,
    /// Set only where the destination is a Service address.
    pub dst_peer: Option<Arc<Endpoint>>,
    pub service: Option<ServiceRef>,
    /// The original tuple of the translation this tuple is the original or translated side of.
    pub nat_original: Option<FlowTuple>,
}

impl Attribution {
    /// Who really sent: the peer behind a Service address, else the source itself.
    pub fn src_end(&self) -> Option<&Endpoint> {
        self.src_peer.as_deref().or(self.src.as_deref())
    }

    /// Who really received: the peer behind a Service address, else the destination itself.
    pub fn dst_end(&self) -> Option<&Endpoint> {
        self.dst_peer.as_deref().or(self.dst.as_deref())
    }
}

/// The hop label of an interface: `pod` for a pod's host side (`host::roles`), `overlay` for VXLAN and Geneve devices, else the interface's name
/// (`cni0`, `eth0`: a handful per node, so the label stays bounded).
pub fn hop_class(link: Option<&Link>) -> String {
    match link {
        None => "unknown".into(),
        Some(l) => match l.role() {
            LinkRole::PodVeth => "pod".into(),
            LinkRole::Overlay => "overlay".into(),
            LinkRole::Uplink | LinkRole::Other => l.name.clone(),
        },
    }
}

/// A tuple's translation chain, before the rewrite then after (one tuple when none is
/// known). Inline, not a `Vec`: every flow of every drain is named through one.
struct Chain {
    tuples: [FlowTuple; 2],
    len: usize,
}

impl Chain {
    fn one(t: FlowTuple) -> Self {
        Self {
            tuples: [t, t],
            len: 1,
        }
    }

    fn two(before: FlowTuple, after: FlowTuple) -> Self {
        Self {
            tuples: [before, after],
            len: 2,
        }
    }
}

/// What the ends and the Service `Namer::flow` gives a tuple depend on (see
/// `Namer::naming_form`): its chain with every port zeroed at an address no Service may be
/// reached at, and which of the chain's tuples it is.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NamingForm {
    tuples: [FlowTuple; 2],
    len: u8,
    /// The tuple's place in `tuples`.
    at: u8,
}

impl std::ops::Deref for Chain {
    type Target = [FlowTuple];
    fn deref(&self) -> &[FlowTuple] {
        &self.tuples[..self.len]
    }
}

impl<'a> Namer<'a> {
    pub fn new(meta: &'a MetaCache, nat: &'a NatTable, links: &'a HashMap<u32, Link>) -> Self {
        Self {
            meta,
            nat,
            links,
            addresses: RefCell::default(),
        }
    }

    /// The interface's name (`ifN` for one never seen).
    pub fn interface(&self, ifindex: u32) -> String {
        self.links
            .get(&ifindex)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| format!("if{ifindex}"))
    }

    /// The interface's class for metric labels (see [`hop_class`]).
    pub fn hop_class(&self, ifindex: u32) -> String {
        hop_class(self.links.get(&ifindex))
    }

    /// What is known of an address, looked up once per namer.
    fn address<R>(&self, ip: &IpAddr, read: impl FnOnce(&Address) -> R) -> R {
        let mut addresses = self.addresses.borrow_mut();
        let a = addresses.entry(*ip).or_insert_with(|| Address {
            endpoint: self.meta.resolve(ip),
            serves: self.meta.serves_at(ip),
        });
        read(a)
    }

    /// Who holds an address.
    pub fn endpoint(&self, ip: &IpAddr) -> Option<Arc<Endpoint>> {
        self.address(ip, |a| a.endpoint.clone())
    }

    /// The Service reached at `ip:port/protocol` (`MetaCache::service_at`).
    fn service_at(&self, ip: &IpAddr, port: u16, protocol: u8) -> Option<ServiceRef> {
        if self.address(ip, |a| a.serves) {
            self.meta.service_at(ip, port, protocol)
        } else {
            None
        }
    }

    /// The metadata the namer reads (for filters that look names up).
    pub fn meta(&self) -> &MetaCache {
        self.meta
    }

    /// A flow's tuple as drained at one hook, named.
    pub fn flow(&self, t: &FlowTuple) -> Attribution {
        let chain = self.chain(t);
        self.attribute(t, &chain)
    }

    /// `t`'s naming form: tuples with equal forms get the same ends, peers and Service from
    /// `flow` (not the same NAT step), so a drain's entries can be summed by form and each
    /// form named once (`name_form`). A port is only ever asked at an address a Service may be
    /// reached at (`MetaCache::serves_at`), so every other port is zeroed: a form stands for
    /// all the client ports of one client, Service and backend (not at a node's address, where
    /// any port may be a NodePort: a hostNetwork client's or a node-SNATed connection's port
    /// is kept, one form per connection).
    pub fn naming_form(&self, t: &FlowTuple) -> NamingForm {
        let chain = self.chain(t);
        let at = u8::from(chain.len == 2 && chain.tuples[1] == *t);
        let mut tuples = chain.tuples;
        for x in &mut tuples[..chain.len] {
            if !self.address(&x.src, |a| a.serves) {
                x.src_port = 0;
            }
            if !self.address(&x.dst, |a| a.serves) {
                x.dst_port = 0;
            }
        }
        // A one-tuple chain holds its tuple twice (`Chain::one`): both copies alike, or
        // equal forms would differ.
        tuples[1] = tuples[chain.len - 1];
        NamingForm {
            tuples,
            len: chain.len as u8,
            at,
        }
    }

    /// The ends, peers and Service of every tuple whose naming form is `form`; no NAT step
    /// (`nat_original` is `None`: it is not a property of the form).
    pub fn name_form(&self, form: &NamingForm) -> Attribution {
        let chain = &form.tuples[..usize::from(form.len)];
        let t = chain[usize::from(form.at)];
        Attribution {
            nat_original: None,
            ..self.attribute(&t, chain)
        }
    }

    /// Whether a Service may be reached at either end of `t` (`MetaCache::serves_at`).
    /// When not, and no translation touches `t` (`translated`), `flow(t)` names the ends as
    /// addressed and nothing else (no peer, no Service, no NAT step): every such tuple
    /// between the same two addresses is named alike, whatever its ports.
    pub fn serves_either(&self, t: &FlowTuple) -> bool {
        self.address(&t.src, |a| a.serves) || self.address(&t.dst, |a| a.serves)
    }

    /// Whether a translation the NAT table holds has `t` or its reply as one of its sides
    /// (`chain(t)` then has two tuples).
    pub fn translated(&self, t: &FlowTuple) -> bool {
        self.nat.touches(t)
    }

    /// A packet seen with `tuples` at successive hooks of this node (a traced packet; its
    /// own hooks show the rewrites even before the NAT table has them), named at its first.
    pub fn packet(&self, tuples: &[FlowTuple]) -> Attribution {
        let (Some(first), Some(last)) = (tuples.first(), tuples.last()) else {
            return Attribution::default();
        };
        let before = self.chain(first);
        let after = self.chain(last);
        let mut chain: Vec<FlowTuple> =
            before.iter().take_while(|t| *t != first).copied().collect();
        for t in tuples
            .iter()
            .chain(after.iter().skip_while(|t| *t != last).skip(1))
        {
            if !chain.contains(t) {
                chain.push(*t);
            }
        }
        self.attribute(first, &chain)
    }

    /// A traced packet named: hook by hook with the time between hooks and the NAT step
    /// where its tuple changed. `mono_to_unix_ns` converts the kernel's timestamps.
    pub fn trace_packet(
        &self,
        p: &TracedPacket,
        node: &str,
        mono_to_unix_ns: i128,
    ) -> Option<TracePacket> {
        let first = p.hops.first()?;
        let unix = |mono: u64| (mono as i128 + mono_to_unix_ns).max(0) as u64;
        let tuples = p.tuples();
        let a = self.packet(&tuples);
        let mut hops = Vec::with_capacity(p.hops.len());
        let mut prev: Option<&crate::state::trace::Sighting> = None;
        for h in &p.hops {
            let nat = prev.filter(|b| b.tuple != h.tuple).map(|b| {
                let (src, dst) = (
                    b.tuple.src != h.tuple.src || b.tuple.src_port != h.tuple.src_port,
                    b.tuple.dst != h.tuple.dst || b.tuple.dst_port != h.tuple.dst_port,
                );
                NatStep {
                    rewrote: match (src, dst) {
                        (true, true) => "src+dst",
                        (true, false) => "src",
                        _ => "dst",
                    }
                    .into(),
                    before: b.tuple.into(),
                    after: h.tuple.into(),
                    after_endpoint: if dst {
                        self.meta.resolve(&h.tuple.dst).map(|e| (*e).clone())
                    } else {
                        self.meta.resolve(&h.tuple.src).map(|e| (*e).clone())
                    },
                }
            });
            hops.push(TraceHop {
                interface: self.interface(h.ifindex),
                ifindex: h.ifindex,
                direction: h.direction,
                ts_unix_ns: unix(h.ts_ns),
                since_previous_ns: prev.map_or(0, |b| h.ts_ns.saturating_sub(b.ts_ns)),
                nat,
            });
            prev = Some(h);
        }
        let owned = |e: Option<Arc<Endpoint>>| e.map(|e| (*e).clone());
        Some(TracePacket {
            node: node.to_string(),
            ts_unix_ns: unix(first.ts_ns),
            protocol: protocol_name(first.tuple.protocol),
            protocol_number: first.tuple.protocol,
            tcp_flags: tcp_flags_string(first.tcp_flags),
            bytes: first.bytes,
            tuple: first.tuple.into(),
            src_endpoint: owned(a.src),
            dst_endpoint: owned(a.dst),
            service: a.service,
            src_peer: owned(a.src_peer),
            dst_peer: owned(a.dst_peer),
            node_time_ns: p
                .hops
                .last()
                .map_or(0, |l| l.ts_ns.saturating_sub(first.ts_ns)),
            hops,
        })
    }

    /// The translation whose original tuple is `original`, with its Service named.
    pub fn translation(&self, original: &FlowTuple) -> Option<Translation> {
        let mut t = self.nat.get(original, &|i| self.interface(i))?;
        self.name_translation(&mut t);
        Some(t)
    }

    /// Every translation, named, ordered by original tuple.
    pub fn translations(&self) -> Vec<Translation> {
        let mut out = self.nat.snapshot(&|i| self.interface(i));
        for t in &mut out {
            self.name_translation(t);
        }
        out
    }

    /// The Service a translation is for: the original destination of a DNAT (client to
    /// VIP), or the translated source of the reply's un-DNAT (VIP back to the client).
    fn name_translation(&self, t: &mut Translation) {
        let (o, x) = (&t.original, &t.translated);
        t.service = self
            .meta
            .service_at(&o.dst, o.dst_port, o.protocol)
            .or_else(|| self.meta.service_at(&x.src, x.src_port, x.protocol));
    }

    /// The tuples of `t`'s direction of the connection, in the order the packet has them
    /// (at most: before the rewrite, after it).
    fn chain(&self, t: &FlowTuple) -> Chain {
        if let Some(o) = self.nat.original_of(t) {
            return Chain::two(o, *t);
        }
        if let Some(x) = self.nat.translated_of(t) {
            return Chain::two(*t, x);
        }
        // Only the other direction's translation is known (e.g. the reply's rewrite was
        // not recorded): this direction's chain is that one's, reversed.
        let r = t.reversed();
        if let Some(o) = self.nat.original_of(&r) {
            return Chain::two(r.reversed(), o.reversed());
        }
        if let Some(x) = self.nat.translated_of(&r) {
            return Chain::two(x.reversed(), *t);
        }
        Chain::one(*t)
    }

    fn attribute(&self, t: &FlowTuple, chain: &[FlowTuple]) -> Attribution {
        // `t`'s own ends are looked up once (it is in its chain); the chain's other tuples'
        // as asked.
        let (src, src_serves) = self.address(&t.src, |a| (a.endpoint.clone(), a.serves));
        let (dst, dst_serves) = self.address(&t.dst, |a| (a.endpoint.clone(), a.serves));
        let t_svc_src = src_serves
            .then(|| self.meta.service_at(&t.src, t.src_port, t.protocol))
            .flatten();
        let t_svc_dst = dst_serves
            .then(|| self.meta.service_at(&t.dst, t.dst_port, t.protocol))
            .flatten();
        let svc_dst = |x: &FlowTuple| {
            if x == t {
                t_svc_dst.clone()
            } else {
                self.service_at(&x.dst, x.dst_port, x.protocol)
            }
        };
        let svc_src = |x: &FlowTuple| {
            if x == t {
                t_svc_src.clone()
            } else {
                self.service_at(&x.src, x.src_port, x.protocol)
            }
        };
        let service = chain
            .iter()
            .find_map(svc_dst)
            .or_else(|| chain.iter().find_map(svc_src));
        let src_peer = if t_svc_src.is_some() {
            chain
                .iter()
                .find(|x| svc_src(x).is_none())
                .and_then(|x| self.endpoint(&x.src))
        } else {
            None
        };
        let dst_peer = if t_svc_dst.is_some() {
            chain
                .iter()
                .rev()
                .find(|x| svc_dst(x).is_none())
                .and_then(|x| self.endpoint(&x.dst))
        } else {
            None
        };
        Attribution {
            src,
            dst,
            src_peer,
            dst_peer,
            service,
            nat_original: chain.first().filter(|o| self.nat.has_original(o)).copied(),
        }
    }
}

#[cfg(test)]
mod tests;
