//! Drops and retransmissions: what the tracepoint programs record, and the kernel struct
//! layout user space hands them.
//!
//! The programs read `struct sk_buff`, `struct net_device` and `struct sock` fields whose
//! offsets change between kernel builds. aya-ebpf 0.2 emits no CO-RE relocations, so user
//! space reads the offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`) and
//! writes them into `DROP_LAYOUT` before attaching; until then `ready` is 0 and the
//! programs record nothing.

use crate::Tuple;

/// `DropKey::kind`: a packet the kernel freed with a drop reason (`skb:kfree_skb`).
pub const KIND_DROP: u8 = 0;
/// `DropKey::kind`: a TCP segment retransmitted (`tcp:tcp_retransmit_skb`).
pub const KIND_RETRANSMIT: u8 = 1;

/// `DropLayout::not_dropped`/`consumed` when the kernel has no such reason.
pub const NO_REASON: u32 = u32::MAX;

/// Slots of `DROPS_LOST`, one per drop reason; the last also holds every larger reason
/// (subsystem reasons carry high bits).
pub const LOST_REASON_SLOTS: u32 = 256;

/// Default capacity of each drop buffer, in (tuple, reason, place) entries.
pub const DEFAULT_DROP_ENTRIES: u32 = 4_096;

/// One drop or retransmission aggregate: the packet's tuple where it died (the socket's,
/// local to remote, for a retransmission), where, and why. A packet whose headers cannot be
/// read (not IP, or no network header yet) is kept with a zero tuple, so it still counts
/// under its reason and device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DropKey {
    pub tuple: Tuple,
    /// Inode number of the network namespace of the device it died at (of the socket for a
    /// retransmission); 0 when unknown.
    pub netns: u32,
    /// The device's ifindex in that namespace; 0 when the skb had none.
    pub ifindex: u32,
    /// The kernel's `enum skb_drop_reason` (0 for retransmissions).
    pub reason: u32,
    /// `KIND_DROP` or `KIND_RETRANSMIT`.
    pub kind: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    /// The kernel code address that freed it (`kfree_skb`'s `location`; 0 for retransmissions).
    pub location: u64,
}

/// What was recorded under one `DropKey`. Shared by all CPUs (a hash map, not per-CPU:
/// drops are rare next to packets, and this keeps the memory flat in the CPU count), so the
/// counts are added atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropStats {
    /// Packets (segments for a retransmission).
    pub packets: u64,
    /// Layer-3 bytes of those packets (the IP header's length; `skb->len` where it could
    /// not be read; for a retransmission `skb->len`).
    pub bytes: u64,
    /// Monotonic time of the latest one.
    pub last_ns: u64,
}

/// Byte offsets of the kernel fields the tracepoint programs read, from the running
/// kernel's BTF. Nested fields are summed into one offset from the outer struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropLayout {
    /// 1 once user space wrote the offsets; the programs record nothing while 0.
    pub ready: u32,
    /// The codes of `SKB_NOT_DROPPED_YET` and `SKB_CONSUMED` in this kernel's
    /// `enum skb_drop_reason` (their values moved between versions), or `NO_REASON`: frees
    /// that are not drops. Current kernels send `SKB_CONSUMED` to `consume_skb`; older ones
    /// passed it through `kfree_skb`, so the program checks both.
    pub not_dropped: u32,
    pub consumed: u32,
    /// `struct sk_buff`: `head` (pointer), `network_header` (u16 from head), `len` (u32),
    /// `dev` (pointer), `protocol` (be16), `cb` (48 bytes).
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_len: u32,
    pub skb_dev: u32,
    pub skb_protocol: u32,
    pub skb_cb: u32,
    /// `sk` (pointer): the socket's namespace places a drop whose skb has no device.
    pub skb_sk: u32,
    /// `struct net_device`: `ifindex` (int), `nd_net.net` (pointer).
    pub dev_ifindex: u32,
    pub dev_net: u32,
    /// `struct net`: `ns.inum` (unsigned int).
    pub net_inum: u32,
    /// `struct sock` (through `__sk_common`): family (u16), daddr, rcv_saddr (be32), dport
    /// (be16), num (host u16), v6 daddr and rcv_saddr (16 bytes), net (pointer).
    pub sk_family: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_net: u32,
    /// `struct tcp_skb_cb`'s `tcp_gso_segs` (u16), from the start of `cb`: the segments one
    /// retransmitted skb carries.
    pub tcp_cb_gso_segs: u32,
}

const _: () = assert!(core::mem::size_of::<DropKey>() == 64);
const _: () = assert!(core::mem::size_of::<DropStats>() == 24);
const _: () = assert!(core::mem::size_of::<DropLayout>() == 88);
