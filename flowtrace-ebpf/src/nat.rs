//! Sightings: the same packet (by `PacketId`) at two hooks of this node. A different tuple
//! at the later hook that looks like a rewrite (`Tuple::plausible_rewrite_to`: an address
//! changed on each side that changed) means something in between rewrote it (NAT), handed to
//! user space as a `NatEvent`; a tuple changed any other way is another packet with the same
//! id. For a packet sampled for latency, the time between the hooks is a hop latency sample.

use flowtrace_common::{
    Counter, FlowKey, NatEvent, Sighting, SlowInput, CONTROL_ACTIVE_BUFFER, CONTROL_TRACING,
    EVENT_NAT, LAT_HOP, SIGHTING_MAX_AGE_NS, SLOW_SAMPLED,
};

use crate::{
    counters::count,
    latency::add_latency,
    maps::{events_flags, CONTROL, EVENTS, LAT_SCRATCH, NAT_SCRATCH, SIGHTINGS},
    trace::trace,
    TCP_SYN,
};

/// Compares this packet with the last one sighted under the same packet id on this CPU: the
/// same packet at another hook of this node with another tuple was rewritten in between
/// (kube-proxy's DNAT, the un-DNAT of replies, SNAT/masquerade), so the rewrite is handed
/// over. A packet sampled for latency (`SLOW_SAMPLED`) also gives the time since the earlier
/// hook as a hop sample. Then this sighting replaces the slot's. First, a sampled packet or
/// a SYN goes to the tracers if the `CONTROL_TRACING` bit of `CONTROL[CONTROL_ACTIVE_BUFFER]`
/// is set. Out of line: it runs on cache misses, SYNs and sampled packets only.
#[inline(never)]
pub(crate) fn sight(input: &SlowInput, now: u64) {
    let (id, key, ctl, tcp_flags) = (&input.id, &input.key, input.ctl, input.tcp_flags);
    // A tracer sees the sampled packets and every SYN (so each new connection shows whole).
    // Without a tracer this costs one array lookup on the packets that get here.
    if (ctl & SLOW_SAMPLED != 0 || tcp_flags & TCP_SYN != 0)
        && CONTROL
            .get(CONTROL_ACTIVE_BUFFER)
            .is_some_and(|w| *w & CONTROL_TRACING != 0)
    {
        trace(id, key, now, tcp_flags, input.bytes);
    }
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
            // 0: the same tuple; 1: a rewrite; 2: another packet with the same id.
            let change = if earlier.tuple.same_as_key(key) {
                0
            } else if earlier.tuple.plausible_rewrite_to(key) {
                1
            } else {
                2
            };
            if change == 1 {
                hand_over_nat(earlier, key, now);
            } else if change == 2 {
                count(Counter::NatNotRewrite);
            }
            if change != 2 && ctl & SLOW_SAMPLED != 0 {
                if let Some(e) = LAT_SCRATCH.get_ptr_mut(0) {
                    let k = &mut (*e).key;
                    k.tuple.set_from_key(key);
                    k.from_ifindex = earlier.ifindex;
                    k.from_direction = earlier.direction;
                    k.to_ifindex = key.ifindex;
                    k.to_direction = key.direction;
                    k.kind = LAT_HOP;
                    k._pad = 0;
                    add_latency(now.wrapping_sub(earlier.seen_ns));
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

/// Hands one sighting of a rewrite, from `earlier`'s hook and tuple to `key`'s, to user
/// space (built in this CPU's scratch slot, copied into the event ring).
#[inline(always)]
fn hand_over_nat(earlier: &Sighting, key: &FlowKey, now: u64) {
    let Some(e) = NAT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; every field is written before it is copied.
    unsafe {
        (*e).kind = EVENT_NAT;
        (*e).from_ifindex = earlier.ifindex;
        (*e).original = earlier.tuple;
        (*e).translated.set_from_key(key);
        (*e).to_ifindex = key.ifindex;
        (*e).from_direction = earlier.direction;
        (*e).to_direction = key.direction;
        (*e)._pad = 0;
        (*e).seen_ns = now;
        if EVENTS.output::<NatEvent>(&*e, events_flags()).is_err() {
            count(Counter::NatMapFull);
        }
    }
}
