//! Drops joined to the flows and named: what `/v1/flows`, `/v1/drops`, `/v1/trace` and the
//! metrics say about where packets died and why.

use std::collections::HashMap;

use crate::{
    enrich::Namer,
    host::netns::NsPlace,
    model::{
        drop_reason_name,
        wire::{DropNetns, DropRecord, HopRef, TraceDrop},
        FlowRecord, FlowTuple, TupleView,
    },
    state::{
        drops::{DropCount, DropSite, DropTable},
        trace::TracedDrop,
    },
};

/// What naming a drop needs besides the namer.
pub(super) struct DropNames<'a> {
    pub namer: &'a Namer<'a>,
    /// `enum skb_drop_reason` of the running kernel, by code.
    pub reasons: &'a HashMap<u32, String>,
    /// Monotonic to Unix time.
    pub offset: i128,
}

impl DropNames<'_> {
    /// The kernel's name of a reason (`NETFILTER_DROP`), or `REASON_<code>` for one this
    /// kernel's BTF did not list.
    pub fn reason(&self, code: u32) -> String {
        drop_reason_name(self.reasons, code)
    }

    /// A kernel (monotonic) time as Unix time.
    pub fn unix(&self, mono: u64) -> u64 {
        (i128::from(mono) + self.offset).max(0) as u64
    }

    /// The device and namespace of a site, as the API says them.
    fn place(&self, netns: NsPlace, ifindex: u32) -> (String, DropNetns, Option<String>) {
        match netns {
            NsPlace::Node if ifindex == 0 => (String::new(), DropNetns::Node, None),
            NsPlace::Node => (self.namer.interface(ifindex), DropNetns::Node, None),
            NsPlace::Pod { veth } => (
                String::new(),
                DropNetns::Pod,
                Some(self.namer.interface(veth)),
            ),
        }
    }

    fn record(&self, site: &DropSite, c: &DropCount, after: Option<HopRef>) -> DropRecord {
        let (device, netns, pod_veth) = self.place(site.netns, site.ifindex);
        DropRecord {
            reason: self.reason(site.reason),
            reason_code: site.reason,
            packets: c.packets,
            bytes: c.bytes,
            device,
            ifindex: site.ifindex,
            netns,
            pod_veth,
            after,
            location: (site.location != 0).then(|| format!("{:#x}", site.location)),
            last_seen_unix_ns: self.unix(c.last_seen_ns),
        }
    }

    /// A live drop from the trace ring, named; `None` when it died in a namespace that is
    /// not this node's.
    pub fn trace(&self, d: &TracedDrop, node: &str, place: Option<NsPlace>) -> Option<TraceDrop> {
        let place = place?;
        let (device, netns, pod_veth) = self.place(place, d.ifindex);
        let service = d.tuple.and_then(|t| self.namer.flow(&t).service);
        Some(TraceDrop {
            node: node.to_string(),
            ts_unix_ns: self.unix(d.ts_ns),
            reason: (!d.retransmit).then(|| self.reason(d.reason)),
            reason_code: d.reason,
            tuple: d.tuple.map(TupleView::from),
            device: if d.retransmit { String::new() } else { device },
            netns,
            pod_veth,
            bytes: d.bytes,
            src_endpoint: d
                .tuple
                .and_then(|t| self.namer.endpoint(&t.src))
                .map(|e| (*e).clone()),
            dst_endpoint: d
                .tuple
                .and_then(|t| self.namer.endpoint(&t.dst))
                .map(|e| (*e).clone()),
            service,
        })
    }
}

/// Puts the flow's drops and retransmissions on it. A drop is placed after the flow's last
/// hop on this node (hops are in the order they first saw the flow, so that is the
/// furthest the packets got before the place they died), which then counts them as
/// `dropped_after`.
pub(super) fn join(f: &mut FlowRecord, table: &DropTable, n: &DropNames<'_>) {
    let Some(d) = table.get(&f.tuple()) else {
        return;
    };
    f.retransmits = d.retransmits.packets;
    let after = f.hops.last().map(|h| HopRef {
        interface: h.interface.clone(),
        direction: h.direction,
    });
    let mut sites: Vec<(&DropSite, &DropCount)> = d.sites.iter().collect();
    sites.sort_by_key(|(_, c)| std::cmp::Reverse(c.packets));
    f.drops = sites
        .into_iter()
        .map(|(s, c)| n.record(s, c, after.clone()))
        .collect();
    f.dropped = d.dropped();
    if let Some(last) = f.hops.last_mut() {
        last.dropped_after = f.dropped;
    }
}

/// A flow record for a tuple no hook saw (its packets died before reaching one, or it is a
/// retransmitting socket's), so the drops have a flow to hang on.
pub(super) fn bare_record(t: &FlowTuple, namer: &Namer<'_>) -> FlowRecord {
    FlowRecord::new(
        t,
        Vec::new(),
        namer.endpoint(&t.src).map(|e| (*e).clone()),
        namer.endpoint(&t.dst).map(|e| (*e).clone()),
    )
}
