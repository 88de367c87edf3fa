//! Which flows and traced packets a request's filter selects: the filter (`query::filter`)
//! matched against what the namer (`enrich`) says of them.

use crate::{
    enrich::Namer,
    model::{FlowRecord, FlowTuple, ServiceRef},
    query::filter::{FlowFilter, Subject},
    state::trace::TracedPacket,
};

/// Whether an enriched flow record passes `filter`; a Service filter also matches a flow
/// between the Service's backends' addresses on a node where no translation was seen.
pub fn flow_selected(filter: &FlowFilter, namer: &Namer<'_>, f: &FlowRecord) -> bool {
    let interfaces: Vec<&str> = f.hops.iter().map(|h| h.interface.as_str()).collect();
    let backed = backed_services(filter, namer, f.service.is_some(), &f.tuple());
    let mut s = Subject::of_record(f, &interfaces);
    s.backed_services = &backed;
    filter.matches_subject(&s)
}

/// Whether a traced packet passes `filter` at any of its hooks (the packet is followed
/// across the NAT: a filter on the backend matches the hook that still had the Service
/// address). `service` is the packet's, as the namer attributed it.
pub fn packet_selected(
    filter: &FlowFilter,
    namer: &Namer<'_>,
    p: &TracedPacket,
    service: Option<&ServiceRef>,
) -> bool {
    let interfaces: Vec<String> = p.hops.iter().map(|h| namer.interface(h.ifindex)).collect();
    let interfaces: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    p.tuples().iter().any(|t| {
        let (src, dst) = (namer.endpoint(&t.src), namer.endpoint(&t.dst));
        let backed = backed_services(filter, namer, service.is_some(), t);
        filter.matches_subject(&Subject {
            tuple: *t,
            src: src.as_deref(),
            dst: dst.as_deref(),
            service,
            interfaces: &interfaces,
            backed_services: &backed,
        })
    })
}

fn backed_services(
    filter: &FlowFilter,
    namer: &Namer<'_>,
    has_service: bool,
    t: &FlowTuple,
) -> Vec<String> {
    if has_service || !filter.needs_backends() {
        return Vec::new();
    }
    let meta = namer.meta();
    let mut v = meta.services_backed_by(&t.dst);
    v.extend(meta.services_backed_by(&t.src));
    v
}

#[cfg(test)]
mod tests;
