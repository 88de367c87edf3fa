//! Reference programs for `cargo xtask bench` and `cargo xtask microbench` (and a
//! neighbour program in one integration test); never loaded by the agent, and not embedded
//! in it: `tests/build.rs` builds this crate into `flowtrace_tests::baselines::OBJECT`.
//!
//! `bench_noop` measures the floor of a TC program run as bpf_stats sees it.
//! `bench_kfree_noop` and `bench_kfree_count` do the same for a raw tracepoint program on
//! `skb:kfree_skb`: nothing, and the least a drop counter can do (count per reason in a
//! per-CPU array), the yardsticks of flowtrace's cost per recorded drop.
//! `bench_counter` is a minimal IPv4 5-tuple counter written the plain way (per-field
//! `bpf_skb_load_bytes`, lookup then update): the yardstick flowtrace's cost is held to.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map, raw_tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{RawTracePointContext, TcContext},
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct BaselineKey {
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    _pad: [u8; 3],
}

#[map]
static BASELINE_FLOWS: PerCpuHashMap<BaselineKey, u64> = PerCpuHashMap::with_max_entries(16_384, 0);

#[classifier]
pub fn bench_noop(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[classifier]
pub fn bench_counter(ctx: TcContext) -> i32 {
    let _ = try_count(&ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn try_count(ctx: &TcContext) -> Result<(), i64> {
    let ethertype: u16 = ctx.load::<u16>(12)?;
    if u16::from_be(ethertype) != 0x0800 {
        return Ok(());
    }
    let vihl: u8 = ctx.load(14)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let proto: u8 = ctx.load(14 + 9)?;
    let src: u32 = ctx.load(14 + 12)?;
    let dst: u32 = ctx.load(14 + 16)?;
    let l4 = 14 + (ihl & 0x3c);
    let sport: u16 = ctx.load(l4)?;
    let dport: u16 = ctx.load(l4 + 2)?;
    let key = BaselineKey {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    };
    match BASELINE_FLOWS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, only this CPU writes it while this program runs.
        Some(v) => unsafe { *v += 1 },
        None => {
            let _ = BASELINE_FLOWS.insert(&key, &1, BPF_NOEXIST as u64);
        }
    }
    Ok(())
}

/// Drops per `enum skb_drop_reason` (the low 8 bits), per CPU.
#[map]
static BASELINE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(256, 0);

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn bench_kfree_noop(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn bench_kfree_count(ctx: RawTracePointContext) -> i32 {
    let reason = ctx.arg::<u64>(2) as u32;
    // 0 and 1 (not dropped yet, consumed) are not drops.
    if reason > 1 {
        if let Some(v) = BASELINE_DROPS.get_ptr_mut(reason & 0xff) {
            // SAFETY: per-CPU value; a nested run on this CPU is refused by the kernel's
            // recursion guard, so nothing else writes it meanwhile.
            unsafe { *v += 1 };
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
