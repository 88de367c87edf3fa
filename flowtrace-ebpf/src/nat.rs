//! Sightings: the same packet (by `PacketId`) at two hooks of this node. A different tuple
//! at the later hook means something in between rewrote it (NAT), recorded in `NAT_0`/`NAT_1`;
//! for a packet sampled for latency, the time between the hooks is a hop latency sample.

use aya_ebpf::bindings::BPF_NOEXIST;
use flowtrace_common::{
    Counter, FlowKey, FlowStats, NatRecord, PacketId, Sighting, Tuple, CONTROL_ACTIVE_BUFFER,
    CONTROL_TRACING, LAT_HOP, SIGHTING_MAX_AGE_NS,
};

use crate::{
    counters::count,
    latency::add_latency,
    maps::{CONTROL, LAT_SCRATCH, NAT_0, NAT_1, SIGHTINGS},
    trace::trace,
    CTL_BUFFER, CTL_SAMPLED, TCP_SYN,
};

/// Compares this packet with the last one sighted under the same packet id on this CPU: the
/// same packet at another hook of this node with another tuple was rewritten in between
/// (kube-proxy's DNAT, the un-DNAT of replies, SNAT/masquerade), so the rewrite is recorded.
/// A packet sampled for latency (`CTL_SAMPLED`) also adds the time since the earlier hook
/// to that segment's histogram. Then this sighting replaces the slot's. First, a sampled
/// packet or a SYN goes to the tracers if the `CONTROL_TRACING` bit of
/// `CONTROL[CONTROL_ACTIVE_BUFFER]` is set. Out of line: it runs on cache misses, SYNs and
/// sampled packets only.
#[inline(never)]
pub(crate) fn sight(id: &PacketId, key: &FlowKey, now: u64, ctl: u32, packet: &FlowStats) {
    // A tracer sees the sampled packets and every SYN (so each new connection shows whole).
    // Without a tracer this costs one array lookup on the packets that get here.
    if (ctl & CTL_SAMPLED != 0 || packet.tcp_flags & TCP_SYN != 0)
        && CONTROL
            .get(CONTROL_ACTIVE_BUFFER)
            .is_some_and(|w| *w & CONTROL_TRACING != 0)
    {
        trace(id, key, now, packet.tcp_flags, packet.bytes);
    }
    let active = ctl & CTL_BUFFER;
    let Some(s) = SIGHTINGS.get_ptr_mut(id.slot()) else {
        return;
    };
    // Kept small on purpose: this function's stack adds to the caller's (512 bytes in all),
    // so the tuples are compared and copied in place rather than built on the stack.
    // SAFETY: per-CPU slot, only this CPU touches it while this program runs.
    unsafe {
        let earlier = &mut *s;
        if earlier.seen_ns != 0
            && earlier.id.same_as(id)
            && now.wrapping_sub(earlier.seen_ns) <= SIGHTING_MAX_AGE_NS
            && (earlier.ifindex != key.ifindex || earlier.direction != key.direction)
            && earlier.tuple.protocol == key.protocol
            && earlier.tuple.ip_version == key.ip_version
        {
            if !earlier.tuple.same_as_key(key) {
                record_nat(earlier, key, now, active);
            }
            if ctl & CTL_SAMPLED != 0 {
                if let Some(k) = LAT_SCRATCH.get_ptr_mut(0) {
                    (*k).tuple.set_from_key(key);
                    (*k).from_ifindex = earlier.ifindex;
                    (*k).from_direction = earlier.direction;
                    (*k).to_ifindex = key.ifindex;
                    (*k).to_direction = key.direction;
                    (*k).kind = LAT_HOP;
                    (*k)._pad = 0;
                    add_latency(now.wrapping_sub(earlier.seen_ns), active);
                }
            }
        }
        earlier.id = *id;
        earlier.tuple.set_from_key(key);
        earlier.ifindex = key.ifindex;
        earlier.direction = key.direction;
        earlier.seen_ns = now;
    }
}

/// A zeroed NAT record to create entries from (a global, so no 72-byte value is built on
/// the stack: `sight`'s stack adds to the caller's within the 512-byte limit).
static EMPTY_NAT: NatRecord = NatRecord {
    translated: Tuple {
        src_addr: [0; 4],
        dst_addr: [0; 4],
        src_port: 0,
        dst_port: 0,
        ip_version: 0,
        protocol: 0,
        _pad: 0,
    },
    from_ifindex: 0,
    to_ifindex: 0,
    from_direction: 0,
    to_direction: 0,
    _pad0: 0,
    sightings: 0,
    first_seen_ns: 0,
    last_seen_ns: 0,
};

/// Adds one sighting of a rewrite, from `earlier`'s hook and tuple to `key`'s, to the
/// active NAT buffer.
#[inline(always)]
fn record_nat(earlier: &Sighting, key: &FlowKey, now: u64, active: u32) {
    let nat = if active == 0 { &NAT_0 } else { &NAT_1 };
    let original = &earlier.tuple;
    let r = match nat.get_ptr_mut(original) {
        Some(r) => r,
        None => {
            // Fails if the map is full, or if the entry appeared meanwhile (then found below).
            let _ = nat.insert(original, &EMPTY_NAT, BPF_NOEXIST as u64);
            match nat.get_ptr_mut(original) {
                Some(r) => r,
                None => {
                    count(Counter::NatMapFull);
                    return;
                }
            }
        }
    };
    // SAFETY: per-CPU value, only this CPU writes it while this program runs.
    unsafe {
        if (*r).sightings == 0 {
            (*r).first_seen_ns = now;
        }
        (*r).translated.set_from_key(key);
        (*r).from_ifindex = earlier.ifindex;
        (*r).to_ifindex = key.ifindex;
        (*r).from_direction = earlier.direction;
        (*r).to_direction = key.direction;
        (*r).sightings += 1;
        (*r).last_seen_ns = now;
    }
}
