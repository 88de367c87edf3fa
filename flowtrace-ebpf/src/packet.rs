//! Direct packet access for the shared parser: `Packet` over `data`/`data_end`.

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use flowtrace_common::parse::{Packet, SkbMeta, MAX_HEADER_OFFSET};

/// The packet, read with direct packet access (no helper call per field) from the skb's
/// linear part, and with `bpf_skb_load_bytes` for the rare header that lies beyond it (paged
/// skbs). Never `bpf_skb_pull_data`: it may reallocate the packet, and an observer must not.
pub struct DirectPacket<'a> {
    ctx: &'a TcContext,
    data: usize,
    data_end: usize,
}

impl<'a> DirectPacket<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        Self { ctx, data: ctx.data(), data_end: ctx.data_end() }
    }
}

impl Packet for DirectPacket<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // Bounding the offset lets the verifier prove `data + offset` stays in range.
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let start = self.data + offset;
        if start + N > self.data_end {
            let mut buf = [0u8; N];
            // Fails (and the read is "truncated") only when the bytes are not in the packet.
            // SAFETY: `buf` is N writable bytes on our stack; the helper bounds-checks the skb.
            let rc = unsafe {
                bpf_skb_load_bytes(self.ctx.skb.skb as *const _, offset as u32, buf.as_mut_ptr() as *mut _, N as u32)
            };
            return if rc == 0 { Some(buf) } else { None };
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
