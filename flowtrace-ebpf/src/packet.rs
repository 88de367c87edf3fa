//! Direct packet access for the shared parser: `Packet` over `data`/`data_end`.

use aya_ebpf::programs::TcContext;
use flowtrace_common::parse::{Packet, SkbMeta, MAX_HEADER_OFFSET};

/// The linear part of the skb, read with direct packet access (no helper call per field).
pub struct DirectPacket {
    data: usize,
    data_end: usize,
}

impl DirectPacket {
    #[inline(always)]
    pub fn new(ctx: &TcContext) -> Self {
        Self { data: ctx.data(), data_end: ctx.data_end() }
    }
}

impl Packet for DirectPacket {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // Bounding the offset lets the verifier prove `data + offset` stays in range.
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let start = self.data + offset;
        if start + N > self.data_end {
            return None;
        }
        // SAFETY: [start, start + N) was just checked to be inside the packet.
        Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
    }
}

/// `skb->len` and `skb->gso_segs`.
#[inline(always)]
pub fn skb_meta(ctx: &TcContext) -> SkbMeta {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe {
        let skb = ctx.skb.skb;
        SkbMeta { len: (*skb).len, gso_segs: (*skb).gso_segs }
    }
}
