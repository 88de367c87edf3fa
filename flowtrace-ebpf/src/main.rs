//! flowtrace's kernel programs: TC classifiers that count packets and bytes per 5-tuple
//! per hop (interface + direction).
//!
//! They only observe. Every path returns `TC_ACT_UNSPEC` (`TCX_NEXT` under TCX), which lets
//! the next program on the hook run and never drops, delays or rewrites a packet.
//!
//! Where things live: `maps` (every map), `counters` (the loss counters), `packet` (header
//! reads), `flows` (the flow cache, its hand-overs to the event ring, and which packets go
//! further), `nat` (sightings across hooks: NAT rewrites, hop latency), `latency` (latency
//! samples, TCP round trips), `trace` (the tracers' ring), `drops` (the raw tracepoint programs on
//! `kfree_skb` and `tcp_retransmit_skb`: drops with their reasons, and retransmissions).
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core offers no atomic read-modify-write;
// `drops` uses the intrinsic that lowers to BPF's atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod counters;
mod drops;
mod flows;
mod latency;
mod maps;
mod nat;
mod packet;
mod slow;
mod trace;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use flowtrace_common::{parse::parse_frame, Counter, DIR_EGRESS, DIR_INGRESS};

use crate::{
    counters::count_n,
    packet::{skb_meta, DirectPacket},
};

/// The SYN and ACK bits of the TCP flags byte.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[classifier]
pub fn flowtrace_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, DIR_INGRESS);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn flowtrace_egress(ctx: TcContext) -> i32 {
    observe(&ctx, DIR_EGRESS);
    TC_ACT_UNSPEC
}

/// The slow path (see `slow`), tail-called by the two hooks; never attached.
#[classifier]
pub fn flowtrace_slow(_ctx: TcContext) -> i32 {
    slow::run();
    TC_ACT_UNSPEC
}

#[inline(always)]
fn observe(ctx: &TcContext, direction: u8) {
    let meta = skb_meta(ctx);
    // Every counter is in wire packets, like the flows: a GSO/GRO aggregate counts as its
    // segments, so packets_seen = flow packets + lost + unparsed + non-IP holds exactly.
    let segments = if meta.gso_segs > 1 {
        meta.gso_segs as u64
    } else {
        1
    };
    count_n(Counter::PacketsSeen, segments);
    let pkt = DirectPacket::new(ctx);
    match parse_frame(&pkt, meta) {
        Ok(info) => flows::record(ctx, &info, meta, direction),
        Err(e) => count_n(e.counter(), segments),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
