//! Drops and retransmissions, from two raw tracepoints (`BPF_RAW_TRACEPOINT_OPEN`: no
//! tracefs, no capability beyond CAP_BPF + CAP_PERFMON).
//!
//! `skb:kfree_skb` fires for every packet the kernel frees with a drop reason; the program
//! reads the dropped skb's network header (it may sit at any layer, so it starts from
//! `head + network_header`, not from where TC would), the device it died at and that
//! device's network namespace, and adds the packet to `DROPS_*` under (tuple, place,
//! reason, code address). `tcp:tcp_retransmit_skb` adds the segments of each retransmitted
//! skb under the socket's tuple. Nothing here runs for a packet that is not dropped or
//! retransmitted, so the TC path pays nothing for it.
//!
//! The struct offsets come from `DROP_LAYOUT`, which user space fills from the running
//! kernel's BTF before it attaches these programs.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use flowtrace_common::{
    drops::{DropKey, DropLayout, DropStats, KIND_DROP, KIND_RETRANSMIT, LOST_REASON_SLOTS},
    Counter, PacketId, TraceEvent, Tuple, CONTROL_ACTIVE_BUFFER, CONTROL_TRACING, DIR_DROPPED,
    DIR_RETRANSMITTED,
};

use crate::maps::{CONTROL, COUNTERS, DROPS_0, DROPS_1, DROPS_LOST, DROP_LAYOUT, TRACE_EVENTS};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_SCTP: u8 = 132;
const PROTO_ICMPV6: u8 = 58;
/// `skb->network_header` when no layer set it (`(typeof(network_header))~0U`).
const NO_HEADER: u16 = 0xffff;

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn flowtrace_kfree_skb(ctx: RawTracePointContext) -> i32 {
    on_kfree_skb(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn flowtrace_tcp_retransmit(ctx: RawTracePointContext) -> i32 {
    on_retransmit(&ctx);
    0
}

/// A kernel value at `base + off`, or `None` where the read faults (a NULL or freed
/// pointer: the helper returns an error instead of crashing).
#[inline(always)]
fn read<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T).ok() }
}

/// Adds `n` to a per-CPU counter atomically: these programs can be interrupted on their CPU
/// by a softirq that runs the other one (or a TC program touching the same slot).
#[inline(always)]
fn count_atomic(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a valid map value pointer.
        unsafe { atomic_add(slot, n) };
    }
}

/// One BPF atomic add (`lock *(u64 *)(dst) += n`). The BPF target has no compare-and-swap,
/// so core's `AtomicU64::fetch_add` is not offered; the intrinsic lowers to the XADD
/// instruction every BPF kernel has. The old value is discarded, which XADD requires.
///
/// # Safety
/// `dst` must point to a live, aligned `u64` (a map value).
#[inline(always)]
unsafe fn atomic_add(dst: *mut u64, n: u64) {
    // SAFETY: the caller's contract.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, n) };
}

#[inline(always)]
fn layout() -> Option<&'static DropLayout> {
    let l = DROP_LAYOUT.get(0)?;
    if l.ready == 0 {
        None
    } else {
        Some(l)
    }
}

#[inline(always)]
fn control_word() -> u32 {
    CONTROL.get(CONTROL_ACTIVE_BUFFER).copied().unwrap_or(0)
}

/// The network namespace inode and ifindex of a `struct net_device *`.
#[inline(always)]
fn device_place(l: &DropLayout, dev: u64) -> (u32, u32) {
    let ifindex = read::<i32>(dev, l.dev_ifindex).unwrap_or(0) as u32;
    let net = read::<u64>(dev, l.dev_net).unwrap_or(0);
    let netns = read::<u32>(net, l.net_inum).unwrap_or(0);
    (netns, ifindex)
}

fn on_kfree_skb(ctx: &RawTracePointContext) {
    let Some(l) = layout() else {
        return;
    };
    let reason = ctx.arg::<u64>(2) as u32;
    if reason == l.not_dropped || reason == l.consumed {
        return;
    }
    count_atomic(Counter::DropEventsSeen, 1);
    let skb: u64 = ctx.arg(0);
    let dev = read::<u64>(skb, l.skb_dev).unwrap_or(0);
    let (mut netns, mut ifindex) = device_place(l, dev);
    if netns == 0 {
        // No device (a locally sent packet dropped before one was set), or `dev` reused for
        // something else (UDP's dev_scratch, the rb-tree node of TCP's out-of-order queue):
        // the socket's namespace, no device.
        let sk = read::<u64>(skb, l.skb_sk).unwrap_or(0);
        let net = read::<u64>(sk, l.sk_net).unwrap_or(0);
        netns = read::<u32>(net, l.net_inum).unwrap_or(0);
        ifindex = 0;
    }
    let mut key = DropKey {
        tuple: Tuple {
            src_addr: [0; 4],
            dst_addr: [0; 4],
            src_port: 0,
            dst_port: 0,
            ip_version: 0,
            protocol: 0,
            _pad: 0,
        },
        netns,
        ifindex,
        reason,
        kind: KIND_DROP,
        _pad0: 0,
        _pad1: 0,
        location: ctx.arg(1),
    };
    let head = read::<u64>(skb, l.skb_head).unwrap_or(0);
    let nh = read::<u16>(skb, l.skb_network_header).unwrap_or(NO_HEADER);
    let proto = u16::from_be(read::<u16>(skb, l.skb_protocol).unwrap_or(0));
    let mut l3_bytes = None;
    if head != 0 && nh != NO_HEADER {
        let ip = head + u64::from(nh);
        l3_bytes = match proto {
            ETH_P_IP => ipv4_tuple(ip, &mut key.tuple),
            ETH_P_IPV6 => ipv6_tuple(ip, &mut key.tuple),
            _ => None,
        };
    }
    // Layer-3 bytes, as the hops count them (skb->len depends on the layer it died at:
    // payload only in a socket's queue); skb->len when the IP header cannot be read.
    let bytes = match l3_bytes {
        Some(b) => b,
        None => read::<u32>(skb, l.skb_len).unwrap_or(0),
    };
    record(&key, 1, u64::from(bytes), DIR_DROPPED);
}

fn on_retransmit(ctx: &RawTracePointContext) {
    let Some(l) = layout() else {
        return;
    };
    count_atomic(Counter::DropEventsSeen, 1);
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let mut key = DropKey {
        tuple: Tuple {
            src_addr: [0; 4],
            dst_addr: [0; 4],
            src_port: read::<u16>(sk, l.sk_num).unwrap_or(0),
            dst_port: u16::from_be(read::<u16>(sk, l.sk_dport).unwrap_or(0)),
            ip_version: 4,
            protocol: PROTO_TCP,
            _pad: 0,
        },
        netns: 0,
        ifindex: 0,
        reason: 0,
        kind: KIND_RETRANSMIT,
        _pad0: 0,
        _pad1: 0,
        location: 0,
    };
    let family = read::<u16>(sk, l.sk_family).unwrap_or(0);
    if family == AF_INET {
        key.tuple.src_addr[0] = read::<u32>(sk, l.sk_rcv_saddr).unwrap_or(0);
        key.tuple.dst_addr[0] = read::<u32>(sk, l.sk_daddr).unwrap_or(0);
    } else if family == AF_INET6 {
        let src = read::<[u32; 4]>(sk, l.sk_v6_rcv_saddr).unwrap_or([0; 4]);
        let dst = read::<[u32; 4]>(sk, l.sk_v6_daddr).unwrap_or([0; 4]);
        // A dual-stack socket talking IPv4 holds v4-mapped addresses (::ffff:a.b.c.d);
        // its packets, and so its flows, are IPv4.
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        if src[0] == 0 && src[1] == 0 && src[2] == mapped {
            key.tuple.src_addr[0] = src[3];
            key.tuple.dst_addr[0] = dst[3];
        } else {
            key.tuple.src_addr = src;
            key.tuple.dst_addr = dst;
            key.tuple.ip_version = 6;
        }
    } else {
        key.tuple.ip_version = 0;
    }
    let net = read::<u64>(sk, l.sk_net).unwrap_or(0);
    key.netns = read::<u32>(net, l.net_inum).unwrap_or(0);
    // tcp_skb_pcount: the segments this skb carries, which is what tcpi_total_retrans adds.
    let segs = read::<u16>(skb, l.skb_cb + l.tcp_cb_gso_segs).unwrap_or(1);
    let segs = if segs == 0 { 1 } else { u64::from(segs) };
    let bytes = read::<u32>(skb, l.skb_len).unwrap_or(0);
    record(&key, segs, u64::from(bytes), DIR_RETRANSMITTED);
}

/// The addresses, protocol and ports of an IPv4 header at kernel address `ip`; returns
/// the packet's total length.
#[inline(always)]
fn ipv4_tuple(ip: u64, t: &mut Tuple) -> Option<u32> {
    let h = read::<[u8; 20]>(ip, 0)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let total = Some(u32::from(u16::from_be_bytes([h[2], h[3]])));
    t.ip_version = 4;
    t.protocol = h[9];
    t.src_addr[0] = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
    t.dst_addr[0] = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
    // Only the first fragment has ports.
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return total;
    }
    let l4 = ip + u64::from(h[0] & 0x0f) * 4;
    ports(l4, t, PROTO_ICMP);
    total
}

/// The same for an IPv6 header, past up to four extension headers.
#[inline(always)]
fn ipv6_tuple(ip: u64, t: &mut Tuple) -> Option<u32> {
    let h = read::<[u32; 10]>(ip, 0)?;
    let first = h[0].to_ne_bytes();
    if first[0] >> 4 != 6 {
        return None;
    }
    let second = h[1].to_ne_bytes();
    let total = Some(u32::from(u16::from_be_bytes([second[0], second[1]])) + 40);
    t.ip_version = 6;
    t.src_addr = [h[2], h[3], h[4], h[5]];
    t.dst_addr = [h[6], h[7], h[8], h[9]];
    let mut next = second[2];
    let mut at = ip + 40;
    let mut i = 0;
    while i < 4 {
        match next {
            // Hop-by-hop, routing, destination options: (next, length in 8-byte units - 1).
            0 | 43 | 60 => {
                let Some(e) = read::<[u8; 2]>(at, 0) else {
                    t.protocol = next;
                    return total;
                };
                next = e[0];
                at += (u64::from(e[1]) + 1) * 8;
            }
            // Fragment: only the first has ports.
            44 => {
                let Some(e) = read::<[u8; 4]>(at, 0) else {
                    t.protocol = next;
                    return total;
                };
                next = e[0];
                at += 8;
                if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                    t.protocol = next;
                    return total;
                }
            }
            _ => break,
        }
        i += 1;
    }
    t.protocol = next;
    ports(at, t, PROTO_ICMPV6);
    total
}

/// Ports as the flows keep them: TCP/UDP/SCTP ports; for ICMP the echo identifier and
/// `type << 8 | code`, with the identifier only for echo request and reply.
#[inline(always)]
fn ports(l4: u64, t: &mut Tuple, icmp: u8) {
    if t.protocol == PROTO_TCP || t.protocol == PROTO_UDP || t.protocol == PROTO_SCTP {
        if let Some(p) = read::<[u8; 4]>(l4, 0) {
            t.src_port = u16::from_be_bytes([p[0], p[1]]);
            t.dst_port = u16::from_be_bytes([p[2], p[3]]);
        }
    } else if t.protocol == icmp {
        if let Some(p) = read::<[u8; 6]>(l4, 0) {
            let echo = if icmp == PROTO_ICMP {
                p[0] == 0 || p[0] == 8
            } else {
                p[0] == 128 || p[0] == 129
            };
            t.dst_port = u16::from_be_bytes([p[0], p[1]]);
            if echo {
                t.src_port = u16::from_be_bytes([p[4], p[5]]);
            }
        }
    }
}

/// Adds one event to the active drop buffer, or counts it lost, and traces it when a
/// tracer is attached.
#[inline(always)]
fn record(key: &DropKey, packets: u64, bytes: u64, direction: u8) {
    let control = control_word();
    let map = if control & 1 == 0 { &DROPS_0 } else { &DROPS_1 };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let value = match map.get_ptr_mut(key) {
        Some(v) => Some(v),
        None => {
            let fresh = DropStats {
                packets: 0,
                bytes: 0,
                last_ns: now,
            };
            // NOEXIST: another CPU may have inserted it since the lookup; then use theirs.
            let _ = map.insert(key, &fresh, u64::from(BPF_NOEXIST));
            map.get_ptr_mut(key)
        }
    };
    match value {
        Some(v) => {
            // SAFETY: a valid map value pointer; the adds are BPF atomic instructions, the
            // timestamp a plain store (the latest writer wins, which is what it means).
            unsafe {
                atomic_add(&raw mut (*v).packets, packets);
                atomic_add(&raw mut (*v).bytes, bytes);
                (*v).last_ns = now;
            }
        }
        None => {
            count_atomic(Counter::DropMapFull, packets);
            if key.kind == KIND_DROP {
                let slot = if key.reason < LOST_REASON_SLOTS {
                    key.reason
                } else {
                    LOST_REASON_SLOTS - 1
                };
                if let Some(v) = DROPS_LOST.get_ptr_mut(slot) {
                    // SAFETY: a valid map value pointer.
                    unsafe { atomic_add(v, packets) };
                }
            }
        }
    }
    if control & CONTROL_TRACING != 0 {
        trace(key, now, bytes, direction);
    }
}

/// One live event for the tracers. Built on the stack, not in the TC programs' per-CPU
/// scratch slot: a softirq running a TC program can interrupt this one on its CPU.
#[inline(always)]
fn trace(key: &DropKey, now: u64, bytes: u64, direction: u8) {
    let e = TraceEvent {
        ts_ns: now,
        // Drops are not joined across hooks, so the packet id carries the namespace the
        // agent needs to tell its node's drops from others'.
        id: PacketId {
            ident: key.netns,
            len_proto: 0,
            l4_a: 0,
            l4_b: 0,
        },
        tuple: key.tuple,
        ifindex: key.ifindex,
        direction,
        tcp_flags: 0,
        _pad: 0,
        bytes: bytes.min(u64::from(u32::MAX)) as u32,
        reason: key.reason,
    };
    if TRACE_EVENTS.output::<TraceEvent>(&e, 0).is_err() {
        count_atomic(Counter::TraceRingFull, 1);
    }
}
