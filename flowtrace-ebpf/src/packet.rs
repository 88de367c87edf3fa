//! Direct packet access for the shared parser: `Packet` over `data`/`data_end`.

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use flowtrace_common::parse::{Packet, SkbMeta, MAX_HEADER_OFFSET};

/// The packet, read with direct packet access (no helper call per field) from the skb's
/// linear part, and with `bpf_skb_load_bytes` for a header that lies beyond it (paged skbs;
/// counted as `slow_header_reads`). Never `bpf_skb_pull_data`: it may reallocate the packet, and an observer must not.
pub struct DirectPacket<'a> {
    ctx: &'a TcContext,
    data: usize,
    data_end: usize,
}

impl<'a> DirectPacket<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        Self {
            ctx,
            data: ctx.data(),
            data_end: ctx.data_end(),
        }
    }
}

impl DirectPacket<'_> {
    /// A pointer to `N` readable bytes at `offset`, or the bytes copied out with
    /// `bpf_skb_load_bytes` when they lie beyond the linear part.
    ///
    /// The fast path checks `WINDOW >= N` bytes: LLVM rewrites a 1-byte check `start + 1 <=
    /// end` into `start < end`, from which the verifier derives no readable range, so single
    /// bytes are checked as 2-byte windows. A byte that ends the packet then takes the slow path.
    #[inline(always)]
    fn at<T: Copy, const N: usize, const WINDOW: usize>(
        &self,
        offset: usize,
        from_word: fn(u32) -> T,
    ) -> Option<T> {
        // Bounding the offset lets the verifier prove `data + offset` stays in range.
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let start = self.data + offset;
        if start + WINDOW <= self.data_end {
            // SAFETY: [start, start + N) was just checked to be inside the packet. Packet data
            // has no alignment guarantee; the BPF JITs (x86-64, arm64) and the verifier accept
            // unaligned packet loads, which is what lets this be a single load instruction.
            return Some(unsafe { core::ptr::read(start as *const T) });
        }
        // `N` bytes at the start of a little-endian word: the low bytes (x86-64, arm64 BPF).
        let r = slow_read(self.ctx.skb.skb as usize, offset as u32, N as u32);
        if r >> 32 != 0 {
            Some(from_word(r as u32))
        } else {
            None
        }
    }
}

/// The slow path of a header read: up to 4 bytes at `offset` copied out with
/// `bpf_skb_load_bytes` (paged skbs). A separate BPF function, not inlined at every read
/// site, so the fast path stays small: the program's instruction-cache footprint is a large
/// part of its cost under real traffic.
///
/// Returns the word with bit 32 set on success, 0 on failure: a BPF function can only return
/// a scalar in r0, so no `Option` crosses the call.
#[inline(never)]
fn slow_read(skb: usize, offset: u32, len: u32) -> u64 {
    crate::counters::count(flowtrace_common::Counter::SlowHeaderReads);
    let mut buf = [0u8; 4];
    let len = if len >= 4 {
        4
    } else if len >= 2 {
        2
    } else {
        1
    };
    // SAFETY: `buf` has 4 writable bytes and len <= 4; the helper bounds-checks the skb.
    let rc =
        unsafe { bpf_skb_load_bytes(skb as *const _, offset, buf.as_mut_ptr() as *mut _, len) };
    if rc == 0 {
        (1u64 << 32) | u64::from(u32::from_ne_bytes(buf))
    } else {
        0
    }
}

impl Packet for DirectPacket<'_> {
    #[inline(always)]
    fn u8_at(&self, offset: usize) -> Option<u8> {
        self.at::<u8, 1, 2>(offset, |w| w as u8)
    }

    #[inline(always)]
    fn be16_at(&self, offset: usize) -> Option<u16> {
        self.at::<u16, 2, 2>(offset, |w| w as u16).map(u16::from_be)
    }

    #[inline(always)]
    fn word_at(&self, offset: usize) -> Option<u32> {
        self.at::<u32, 4, 4>(offset, |w| w)
    }

    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.data + len <= self.data_end
    }

    #[inline(always)]
    unsafe fn u8_within(&self, offset: usize) -> u8 {
        // SAFETY: the caller's `holds` covered the byte (see `Packet::u8_within`).
        unsafe { core::ptr::read((self.data + offset) as *const u8) }
    }

    #[inline(always)]
    unsafe fn be16_within(&self, offset: usize) -> u16 {
        // SAFETY: as `u8_within`; unaligned packet loads are fine (see `at`).
        u16::from_be(unsafe { core::ptr::read((self.data + offset) as *const u16) })
    }

    #[inline(always)]
    unsafe fn word_within(&self, offset: usize) -> u32 {
        // SAFETY: as `be16_within`.
        unsafe { core::ptr::read((self.data + offset) as *const u32) }
    }
}

/// `skb->len` and `skb->gso_segs`.
#[inline(always)]
pub fn skb_meta(ctx: &TcContext) -> SkbMeta {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe {
        let skb = ctx.skb.skb;
        SkbMeta {
            len: (*skb).len,
            gso_segs: (*skb).gso_segs,
        }
    }
}
