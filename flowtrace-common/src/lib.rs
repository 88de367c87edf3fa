//! Types shared by flowtrace's kernel programs and its user-space agent.
//!
//! Every type that crosses the kernel/user boundary is `#[repr(C)]`, `Copy`, has explicit
//! padding, and carries a compile-time size assertion, so the two sides can never disagree
//! silently about a layout.
#![no_std]

pub mod drops;
pub mod maps;
pub mod parse;

/// The names of the kernel programs (their function names in `flowtrace-ebpf`, which is
/// what `Ebpf::program_mut` and the clsact filters know them by).
pub mod programs {
    /// The classifier on each traced interface's TC ingress hook.
    pub const INGRESS: &str = "flowtrace_ingress";
    /// The classifier on each traced interface's TC egress hook.
    pub const EGRESS: &str = "flowtrace_egress";
    /// The TC classifiers, attached per interface.
    pub const ALL: [&str; 2] = [INGRESS, EGRESS];
    /// The classifier both tail-call for the packets that go further than their flow's
    /// counters (sightings, round trips, tracers); never attached itself.
    pub const SLOW: &str = "flowtrace_slow";
    /// The raw tracepoint program on `skb:kfree_skb` (packets freed with a drop reason).
    pub const KFREE_SKB: &str = "flowtrace_kfree_skb";
    /// The raw tracepoint program on `tcp:tcp_retransmit_skb`.
    pub const TCP_RETRANSMIT: &str = "flowtrace_tcp_retransmit";
    /// The tracepoint programs with the tracepoint each is attached to, once per agent.
    pub const TRACEPOINTS: [(&str, &str); 2] = [
        (KFREE_SKB, "kfree_skb"),
        (TCP_RETRANSMIT, "tcp_retransmit_skb"),
    ];
}

/// Hook direction: TC ingress of the device (packets the device received; on a pod's
/// host-side veth these are the packets the pod sent).
pub const DIR_INGRESS: u8 = 0;
/// Hook direction: TC egress of the device (packets the device transmits; on a pod's
/// host-side veth these are the packets delivered to the pod).
pub const DIR_EGRESS: u8 = 1;

/// The hook direction of a `direction` byte the programs wrote (`DIR_INGRESS`,
/// `DIR_EGRESS`), decoded once for every user-side reader.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookDirection {
    Ingress = DIR_INGRESS,
    Egress = DIR_EGRESS,
}

impl HookDirection {
    /// The direction of a kernel `direction` byte; `None` for a value the programs never
    /// write.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            DIR_INGRESS => Some(Self::Ingress),
            DIR_EGRESS => Some(Self::Egress),
            _ => None,
        }
    }

    /// The byte the programs write for this direction.
    pub const fn as_raw(self) -> u8 {
        self as u8
    }

    pub const fn is_ingress(self) -> bool {
        matches!(self, Self::Ingress)
    }

    /// `ingress` or `egress`, as the API and the metrics spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// Number of flow-map buffers. The kernel writes into the active one while user space
/// drains the other, so a drain never races a writer (see `CONTROL_ACTIVE_BUFFER`).
pub const FLOW_BUFFERS: u32 = 2;

/// Index in the `CONTROL` array map of the buffer the kernel currently writes to (0 or 1).
pub const CONTROL_ACTIVE_BUFFER: u32 = 0;
/// Number of `u32` slots in the `CONTROL` array map.
pub const CONTROL_SLOTS: u32 = 4;

/// Bit of the `CONTROL_ACTIVE_BUFFER` word (which the programs read for every packet anyway):
/// a tracer is attached, so sampled packets are also written to the trace ring buffer. With
/// no tracer the bit is clear and tracing costs one bit test per sampled packet.
pub const CONTROL_TRACING: u32 = 2;

/// Size of the trace ring buffer, in bytes (a power of two, a multiple of the page size).
pub const TRACE_RING_BYTES: u32 = 256 * 1024;

/// One sampled packet at one hook, written to the trace ring buffer while a tracer is
/// attached. The packet id lets user space join the hooks of the same packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    pub ts_ns: u64,
    pub id: PacketId,
    pub tuple: Tuple,
    pub ifindex: u32,
    pub direction: u8,
    pub tcp_flags: u8,
    pub _pad: u16,
    /// Bytes at layer 3 (the whole aggregate for GSO/GRO packets).
    pub bytes: u32,
    /// `DIR_DROPPED` events: the kernel's `enum skb_drop_reason`; 0 for every other event.
    pub reason: u32,
}

/// `TraceEvent::direction` of a packet the kernel freed with a drop reason (written by the
/// `kfree_skb` program; `ifindex` is the device it was freed at, `id` is zero).
pub const DIR_DROPPED: u8 = 2;
/// `TraceEvent::direction` of a TCP segment the kernel retransmitted (`ifindex` 0).
pub const DIR_RETRANSMITTED: u8 = 3;

/// `CONTROL` slot for latency sampling, a word made by `latency_control`. Its rate: 0 = off
/// (the programs then do nothing for latency); N, a power of two, = one packet in N. The
/// choice hashes the packet id, which NAT does not change, so a sampled packet is sampled at
/// every hook it crosses. Its per-flow window (`sample_window`): of those, a flow takes at
/// most one per window of 2^shift ns at each hook (on each CPU); 0 = no such cap.
pub const CONTROL_LATENCY_SAMPLE: u32 = 1;

/// Bits of the `CONTROL_LATENCY_SAMPLE` word that hold the rate; the per-flow window's shift
/// is in the bits above.
pub const LATENCY_RATE_BITS: u32 = 24;

/// Largest per-flow window shift (2^40 ns, about 18 minutes).
pub const LATENCY_WINDOW_SHIFT_MAX: u32 = 40;

/// The agent's default per-flow window, in milliseconds (`--latency-per-flow-ms`): 2^24 ns,
/// 16.8 ms, so a flow gives each hook at most about 60 samples a second.
pub const DEFAULT_LATENCY_PER_FLOW_MS: u32 = 16;

/// The `CONTROL_LATENCY_SAMPLE` word for one packet in `rate` (0 = off, a power of two below
/// 2^24) and at most one sampled packet per flow, hook and CPU in each window of
/// 2^`window_shift` ns (0 = every sampled packet).
pub const fn latency_control(rate: u32, window_shift: u32) -> u32 {
    (rate & ((1 << LATENCY_RATE_BITS) - 1)) | (window_shift << LATENCY_RATE_BITS)
}

/// The rate of a `CONTROL_LATENCY_SAMPLE` word.
#[inline(always)]
pub const fn latency_rate(word: u32) -> u32 {
    word & ((1 << LATENCY_RATE_BITS) - 1)
}

/// The per-flow window's shift of a `CONTROL_LATENCY_SAMPLE` word (0: no cap).
#[inline(always)]
pub const fn latency_window_shift(word: u32) -> u32 {
    word >> LATENCY_RATE_BITS
}

/// The shift of the smallest power-of-two window of nanoseconds that holds `ms` milliseconds
/// (0 for 0: no cap). 16 ms gives 24 (16.8 ms).
pub const fn window_shift_for_ms(ms: u32) -> u32 {
    if ms == 0 {
        return 0;
    }
    let ns = ms as u64 * 1_000_000;
    let shift = 64 - (ns - 1).leading_zeros();
    if shift > LATENCY_WINDOW_SHIFT_MAX {
        LATENCY_WINDOW_SHIFT_MAX
    } else {
        shift
    }
}

/// Which per-flow sampling window `now_ns` falls in, as kept in `FlowStats::last_sample`:
/// never 0 (0 there means no sample taken in the slot yet). Windows are numbered modulo
/// 2^15; a slot lives two drains, far less than 2^15 windows.
#[inline(always)]
pub const fn sample_window(now_ns: u64, shift: u32) -> u16 {
    (((now_ns >> (shift & 63)) as u16) & 0x7fff) | 0x8000
}

/// Capacity of the table of TCP segments waiting for their acknowledgement (LRU).
pub const RTT_PENDING_ENTRIES: u32 = 16_384;

/// Slots of the hint array in front of that table: a non-zero slot says a segment may be
/// waiting under a (direction, interface) that hashes there, so only then does an answering
/// segment pay for the hash lookup (see `FlowKey::rtt_hint_slot`).
pub const RTT_HINT_SLOTS: u32 = 16_384;

/// Latency kinds (`LatencyKey::kind`).
/// Time from one hook to the next for the same packet on this node (one way).
pub const LAT_HOP: u8 = 0;
/// At one interface: a SYN to the SYN-ACK answering it (round trip beyond this interface).
pub const LAT_HANDSHAKE: u8 = 1;
/// At one interface: a data segment to the first data segment acknowledging it (round trip
/// beyond this interface, including the peer application's time to answer).
pub const LAT_RESPONSE: u8 = 2;

/// The kind of a latency entry (`LatencyKey::kind`, `RttPending::kind`), decoded once for
/// every user-side reader.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LatencyKind {
    /// `LAT_HOP`: one packet from one hook to the next on this node.
    Hop = LAT_HOP,
    /// `LAT_HANDSHAKE`: a SYN to its SYN-ACK at one interface.
    Handshake = LAT_HANDSHAKE,
    /// `LAT_RESPONSE`: a data segment to the first data segment acknowledging it.
    Response = LAT_RESPONSE,
}

impl LatencyKind {
    /// The kind of a kernel `kind` byte; `None` for a value the programs never write.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            LAT_HOP => Some(Self::Hop),
            LAT_HANDSHAKE => Some(Self::Handshake),
            LAT_RESPONSE => Some(Self::Response),
            _ => None,
        }
    }

    /// The byte the programs write for this kind.
    pub const fn as_raw(self) -> u8 {
        self as u8
    }

    /// A round trip at one interface (handshake or response), not a hop.
    pub const fn is_round_trip(self) -> bool {
        !matches!(self, Self::Hop)
    }

    /// `hop`, `handshake` or `response`, as the API and the metrics spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hop => "hop",
            Self::Handshake => "handshake",
            Self::Response => "response",
        }
    }
}

/// log2 buckets of a latency histogram: bucket `i` holds [2^i, 2^(i+1)) ns, the last one
/// everything from 2^31 ns (2.1 s) up.
pub const LATENCY_BUCKETS: usize = 32;

/// Slots of the per-CPU sighting table (a power of two), see `Sighting`.
pub const SIGHTING_SLOTS: u32 = 256;

/// Two sightings of one packet id further apart than this are not the same packet. The
/// hooks of one node see a packet microseconds apart on one CPU.
pub const SIGHTING_MAX_AGE_NS: u64 = 2_000_000;

/// An IP address as the kernel side keeps it: the 16 address bytes in network order, held
/// as four native-endian words so that copying and comparing keys is word-sized work. An
/// IPv4 address is word 0; words 1-3 are zero.
pub type Addr = [u32; 4];

/// The 16 network-order bytes of an `Addr`.
pub fn addr_bytes(a: &Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = a[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// The `Addr` of 16 network-order bytes (an IPv4 address in the first 4, the rest zero).
pub fn addr_from_bytes(b: &[u8; 16]) -> Addr {
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// One flow as seen at one hook: the 5-tuple plus the hop (interface and direction).
///
/// Addresses are `Addr`s (network-order bytes; IPv4 in the first word, the rest zero).
/// Ports are in host byte order. For ICMP and ICMPv6,
/// `src_port` is the echo identifier (echo request/reply only, else 0) and `dst_port` is
/// `type << 8 | code`, so that requests and replies of one ping form two flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    /// Host byte order.
    pub src_port: u16,
    /// Host byte order.
    pub dst_port: u16,
    /// Interface index of the hook, in the network namespace the agent runs in.
    pub ifindex: u32,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// 4 or 6.
    pub ip_version: u8,
    /// IANA protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, 132 SCTP, ...).
    pub protocol: u8,
    pub _pad: u8,
}

/// Non-zero when the first `M` words of `a` and `b` differ: XORs folded with OR, spelled out
/// as a fixed-count loop LLVM unrolls. A derived `==` or an array compare lowers to a
/// byte-by-byte `memcmp` loop in BPF, which costs more than the rest of the hot path.
#[inline(always)]
pub fn words_differ<const M: usize, const N: usize, const K: usize>(
    a: &[u32; N],
    b: &[u32; K],
) -> u32 {
    let mut d = 0;
    let mut i = 0;
    while i < M && i < N && i < K {
        d |= a[i] ^ b[i];
        i += 1;
    }
    d
}

/// A 5-tuple without the hop: what a NAT rewrite changes. Same conventions as `FlowKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Tuple {
    pub src_addr: Addr,
    pub dst_addr: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub ip_version: u8,
    pub protocol: u8,
    pub _pad: u16,
}

impl Tuple {
    /// The tuple of the reply direction (source and destination swapped).
    pub fn reversed(&self) -> Tuple {
        Tuple {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            ..*self
        }
    }

    /// Word-wise equality (see `FlowKey::same_as`).
    #[inline(always)]
    pub fn same_as(&self, other: &Tuple) -> bool {
        words_differ::<10, 10, 10>(&self.words(), &other.words()) == 0
    }

    /// Whether this is `key`'s tuple, compared in place (no copy of either).
    #[inline(always)]
    pub fn same_as_key(&self, key: &FlowKey) -> bool {
        // Words 0-8: addresses and ports, same layout in both. Then version and protocol.
        words_differ::<9, 10, 11>(&self.words(), &key.words()) == 0
            && self.ip_version == key.ip_version
            && self.protocol == key.protocol
    }

    /// Whether `key`'s tuple, seen for the same packet id at a later hook, looks like a NAT
    /// rewrite of this one: some side changed, and each side that changed (source: address
    /// and port; destination: address and port) changed its address. DNAT rewrites the
    /// destination's address (and maybe port), SNAT and masquerade the source's, the reply's
    /// un-DNAT its source; kube-proxy never rewrites a port alone. Ports changed with both
    /// addresses kept are what two different packets with equal ids look like (a flood of
    /// identical datagrams from fresh source ports), so they are no rewrite.
    ///
    /// Branch-free (bit arithmetic, one comparison at the end): every branch in the sighting
    /// path multiplies the states the verifier walks.
    #[inline(always)]
    pub fn plausible_rewrite_to(&self, key: &FlowKey) -> bool {
        /// 1 if `x` is not zero, else 0.
        #[inline(always)]
        fn nz(x: u32) -> u32 {
            (x | x.wrapping_neg()) >> 31
        }
        let (a, b) = (self.words(), key.words());
        let src_addr = nz((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]));
        let dst_addr = nz((a[4] ^ b[4]) | (a[5] ^ b[5]) | (a[6] ^ b[6]) | (a[7] ^ b[7]));
        let src_port = nz(u32::from(self.src_port ^ key.src_port));
        let dst_port = nz(u32::from(self.dst_port ^ key.dst_port));
        (src_addr | dst_addr) & (src_addr | (src_port ^ 1)) & (dst_addr | (dst_port ^ 1)) != 0
    }

    /// Overwrites this tuple with `key`'s, field by field.
    #[inline(always)]
    pub fn set_from_key(&mut self, key: &FlowKey) {
        self.src_addr = key.src_addr;
        self.dst_addr = key.dst_addr;
        self.src_port = key.src_port;
        self.dst_port = key.dst_port;
        self.ip_version = key.ip_version;
        self.protocol = key.protocol;
        self._pad = 0;
    }

    /// Sets this tuple to `key`'s, reversed (the other direction of the flow).
    #[inline(always)]
    pub fn set_reversed_from_key(&mut self, key: &FlowKey) {
        self.src_addr = key.dst_addr;
        self.dst_addr = key.src_addr;
        self.src_port = key.dst_port;
        self.dst_port = key.src_port;
        self.ip_version = key.ip_version;
        self.protocol = key.protocol;
        self._pad = 0;
    }

    #[inline(always)]
    pub fn words(&self) -> [u32; 10] {
        // SAFETY: Tuple is repr(C), 40 bytes, 4-aligned, no padding holes (explicit _pad).
        unsafe { core::mem::transmute::<Tuple, [u32; 10]>(*self) }
    }
}

/// What identifies one packet across the hooks of a node, built only from fields NAT does
/// not rewrite: the IPv4 identification (IPv6: flow label), the IP length and protocol, and
/// two transport words (TCP: sequence and acknowledgement numbers; UDP: the first 8 payload
/// bytes; SCTP: verification tag).
/// Addresses, ports and checksums are left out because NAT changes them.
///
/// Two packets of one flow can share an id (e.g. UDP datagrams with equal payload starts and
/// no IPv4 id); they then stand for the same translation, so that does no harm. Packets of
/// different flows with equal ids at different hooks within `SIGHTING_MAX_AGE_NS` would
/// pair wrongly; the agent's conntrack cross-check counts such a record as a disagreement.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketId {
    pub ident: u32,
    pub len_proto: u32,
    pub l4_a: u32,
    pub l4_b: u32,
}

impl PacketId {
    #[inline(always)]
    pub fn same_as(&self, o: &PacketId) -> bool {
        ((self.ident ^ o.ident)
            | (self.len_proto ^ o.len_proto)
            | (self.l4_a ^ o.l4_a)
            | (self.l4_b ^ o.l4_b))
            == 0
    }

    /// Whether this packet is sampled at `rate` (a power of two; 0 = never). Uses other bits
    /// of the hash than `slot`, so sampled packets spread over the sighting table.
    #[inline(always)]
    pub fn sampled(&self, rate: u32) -> bool {
        if rate == 0 {
            return false;
        }
        let folded = self.ident ^ self.len_proto.rotate_left(7) ^ self.l4_a ^ self.l4_b;
        let mixed = (folded ^ (folded >> 16)).wrapping_mul(0x7FEB_352D);
        (mixed ^ (mixed >> 15)) & (rate - 1) == 0
    }

    /// Slot of this id in the sighting table.
    #[inline(always)]
    pub fn slot(&self) -> u32 {
        let folded = self.ident ^ self.len_proto ^ self.l4_a ^ self.l4_b.rotate_left(16);
        let mixed = (folded ^ (folded >> 15)).wrapping_mul(0x85EB_CA6B);
        mixed >> (32 - SIGHTING_SLOTS.trailing_zeros())
    }
}

/// The last packet seen in one slot of the per-CPU sighting table: which packet, at which
/// hook, with which tuple, when. When the same packet id shows up at a later hook of the
/// node with a different tuple, something between the hooks (conntrack NAT) rewrote it.
///
/// Sightings are taken only when a packet misses the flow cache, i.e. on the first packet of
/// a flow at a hook in each drain period: rewrites are learned once per flow per period,
/// never at per-packet cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Sighting {
    pub id: PacketId,
    pub tuple: Tuple,
    pub ifindex: u32,
    pub direction: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    pub seen_ns: u64,
}

/// A rewrite the kernel programs saw, keyed by the tuple before it (`Tuple` of the earlier
/// hook): the tuple after it and the two hooks around it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatRecord {
    pub translated: Tuple,
    pub from_ifindex: u32,
    pub to_ifindex: u32,
    pub from_direction: u8,
    pub to_direction: u8,
    pub _pad0: u16,
    /// How many packets showed this rewrite (at most one per flow per drain period and CPU).
    pub sightings: u32,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
}

/// Counters for one flow at one hook, per CPU.
///
/// `packets` counts packets as they are on the wire: a GSO/GRO aggregate counts as
/// the number of segments it stands for. `bytes` counts layer-3 bytes (IP header and
/// everything after it, no Ethernet header, no VLAN tag) per wire packet, so the same
/// packet has the same size at a veth and at the overlay device, whose frames carry a
/// different outer encapsulation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowStats {
    pub packets: u64,
    /// Layer-3 bytes (IP header onwards) on the wire.
    pub bytes: u64,
    /// The applications' bytes: what follows the IP and transport headers (for a protocol
    /// whose header the parser does not read, what follows the IP header).
    pub payload_bytes: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the first packet, nanoseconds.
    pub first_seen_ns: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet, nanoseconds.
    pub last_seen_ns: u64,
    /// Union of the TCP flags byte (FIN 0x01 .. CWR 0x80) of every packet; 0 for non-TCP.
    pub tcp_flags: u8,
    // Padding as a scalar: a byte-array field would be zeroed with a memset loop in BPF.
    pub _pad0: u8,
    /// The kernel's own: the `sample_window` in which this slot last let a packet be sampled
    /// for latency (0: none yet), so that a flow takes at most one sampled packet per window
    /// at a hook. Not a counter: user space neither reads nor merges it.
    pub last_sample: u16,
    /// The kernel's own: the acknowledgement field (as on the wire) of the last TCP segment
    /// with payload counted in this slot, so that a hook asks whether a segment answers a
    /// round trip only when the peer sent something since (`flows::record`). Not a counter:
    /// user space neither reads nor merges it.
    pub last_ack: u32,
}

impl FlowStats {
    /// Folds another CPU's (or another drain's) counters into this one.
    pub fn merge(&mut self, other: &FlowStats) {
        if other.packets == 0 {
            return;
        }
        if self.packets == 0 || other.first_seen_ns < self.first_seen_ns {
            self.first_seen_ns = other.first_seen_ns;
        }
        if other.last_seen_ns > self.last_seen_ns {
            self.last_seen_ns = other.last_seen_ns;
        }
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.payload_bytes += other.payload_bytes;
        self.tcp_flags |= other.tcp_flags;
    }
}

/// One entry of the per-CPU, direct-mapped flow cache: the only place a packet's counts go.
///
/// A packet whose flow (key, including the hop) occupies its slot on this CPU is counted in
/// the slot: an array access, no hash map, no helper call. A packet of another flow hands
/// the slot's counters to user space through the event ring (the slot itself is the
/// record: `kind` is `EVENT_FLOW`) and takes the slot. The cache is split in two halves
/// like the other buffers: user space reads and clears the half that is not active.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CacheSlot {
    /// `EVENT_FLOW` when the slot holds counters, 0 when it is empty.
    pub kind: u32,
    pub key: FlowKey,
    pub stats: FlowStats,
}

/// What a hook hands its slow path (`programs::SLOW`, tail-called) in a per-CPU scratch
/// slot: the packet's flow key and id, what to do, and the TCP facts a round trip needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SlowInput {
    pub key: FlowKey,
    /// `SLOW_*` bits.
    pub ctl: u32,
    pub id: PacketId,
    /// Layer-3 bytes (for the tracers).
    pub bytes: u64,
    pub tcp_flags: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    /// TCP payload bytes of this segment.
    pub payload: u32,
}

/// `SlowInput::ctl` bits: compare the packet across hooks (`nat::sight`); it is sampled for
/// latency; a TCP segment with latency on, which may start or answer a round trip at this
/// interface (`latency::rtt_wanted`, `latency::rtt`).
pub const SLOW_SIGHT: u32 = 1;
pub const SLOW_SAMPLED: u32 = 2;
pub const SLOW_RTT: u32 = 4;
/// With `SLOW_RTT`: the segment acknowledges something its flow's last data segment at this
/// hook did not (on this CPU), so it may answer a segment waiting there. A segment whose
/// acknowledgement did not move answers nothing the first one with it did not.
pub const SLOW_FRESH: u32 = 8;

/// What `RTT_HINT` holds for a segment waiting since `sent_ns`: its time in units of 2^20 ns
/// (1.05 ms), never 0 (0 is an empty slot); wraps after 52 days.
#[inline(always)]
pub fn rtt_hint_value(sent_ns: u64) -> u32 {
    ((sent_ns >> 20) as u32) | 1
}

/// Whether a hint written with `rtt_hint_value` names a segment that began waiting less than
/// `RTT_PENDING_MAX_AGE_NS` before `now_ns`: one a newer segment of its direction may not
/// replace yet, so a sampled segment need not look in `RTT_PENDING` at all.
#[inline(always)]
pub fn rtt_hint_young(hint: u32, now_ns: u64) -> bool {
    hint != 0 && rtt_hint_value(now_ns).wrapping_sub(hint) < (RTT_PENDING_MAX_AGE_NS >> 20) as u32
}

/// How long a data segment waits for its answer before a newer one of its direction may take
/// its place: response times longer than a second are not measured.
pub const RTT_PENDING_MAX_AGE_NS: u64 = 1_000_000_000;

/// `kind` of the records in the event ring (`maps::EVENTS`): a flow's counters handed over
/// from the cache (`CacheSlot`), a NAT rewrite seen (`NatEvent`), a latency sample
/// (`LatencyEvent`).
pub const EVENT_FLOW: u32 = 1;
pub const EVENT_NAT: u32 = 2;
pub const EVENT_LATENCY: u32 = 3;

/// A rewrite seen between two hooks of this node: the same packet (by `PacketId`) with
/// `original`'s tuple at the earlier hook and `translated` at the later one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatEvent {
    /// `EVENT_NAT`.
    pub kind: u32,
    pub from_ifindex: u32,
    pub original: Tuple,
    pub translated: Tuple,
    pub to_ifindex: u32,
    pub from_direction: u8,
    pub to_direction: u8,
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` at the later hook.
    pub seen_ns: u64,
}

/// One latency sample (see `LatencyKey` for what it measures).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LatencyEvent {
    /// `EVENT_LATENCY`.
    pub kind: u32,
    pub key: LatencyKey,
    pub ns: u64,
}

/// Default size of the event ring, in bytes (a power of two, a multiple of the page size):
/// at 96 bytes per flow record (plus the ring's 8-byte header), 4 MiB hold about 40 000
/// hand-overs, 0.2 s of a flood of 200 000 new (tuple, hop) pairs per second.
pub const DEFAULT_EVENT_RING_BYTES: u32 = 4 * 1024 * 1024;

/// Bytes of per-CPU flow cache the agent spends at most, over all CPUs, when it sizes the
/// cache from the number of possible CPUs (see `cache_slots_for`).
pub const CACHE_BUDGET_BYTES: u64 = 8 * 1024 * 1024;
/// Fewest and most slots per cache half.
pub const MIN_CACHE_SLOTS: u32 = 128;
pub const MAX_CACHE_SLOTS: u32 = 4096;

/// Slots per cache half for `cpus` possible CPUs: the largest power of two that keeps both
/// halves on every CPU within `CACHE_BUDGET_BYTES`, within [`MIN_CACHE_SLOTS`,
/// `MAX_CACHE_SLOTS`]. Memory stays flat in the CPU count; each CPU gets fewer slots.
pub fn cache_slots_for(cpus: u32) -> u32 {
    let per_slot = (FLOW_BUFFERS as u64) * core::mem::size_of::<CacheSlot>() as u64;
    let fit = CACHE_BUDGET_BYTES / (per_slot * cpus.max(1) as u64);
    let mut slots = MIN_CACHE_SLOTS;
    while slots < MAX_CACHE_SLOTS && (slots as u64) * 2 <= fit {
        slots *= 2;
    }
    slots
}

impl CacheSlot {
    /// Index of `key`'s slot within one half of the cache, for a half of `1 << (32 - shift)`
    /// slots.
    #[inline(always)]
    pub fn index(key: &FlowKey, shift: u32) -> u32 {
        // Each part weighted its own way before one multiplicative hash whose high bits pick
        // the slot. A plain XOR of the words made the hops of one flow collide: (interface 4,
        // ingress) and (interface 5, egress) differ by the same bit in two words, which cancels,
        // so a flow crossing two such hooks evicted itself on every packet.
        let w = key.words();
        let src = w[0] ^ w[1] ^ w[2] ^ w[3];
        let dst = (w[4] ^ w[5] ^ w[6] ^ w[7]).rotate_left(13);
        let hop = w[9].wrapping_mul(0x85EB_CA6B) ^ w[10].wrapping_mul(0xC2B2_AE35);
        let folded = src ^ dst ^ w[8].rotate_left(7) ^ hop;
        let mixed = (folded ^ (folded >> 16)).wrapping_mul(0x9E37_79B1);
        mixed >> (shift & 31)
    }
}

impl FlowKey {
    /// The 5-tuple of this key, without the hop.
    #[inline(always)]
    pub fn tuple(&self) -> Tuple {
        Tuple {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            src_port: self.src_port,
            dst_port: self.dst_port,
            ip_version: self.ip_version,
            protocol: self.protocol,
            _pad: 0,
        }
    }

    /// Word-wise equality (see `words_differ`).
    #[inline(always)]
    pub fn same_as(&self, other: &FlowKey) -> bool {
        words_differ::<11, 11, 11>(&self.words(), &other.words()) == 0
    }

    /// Slot in the RTT hint array of segments waiting with this key's tuple at this
    /// interface (`reply` false), or with the reversed tuple (`reply` true: where the answer
    /// to this packet waits). Both directions of a key land in the same slot as the other
    /// direction's key with `reply` flipped, so a question marks the slot its answer reads.
    #[inline(always)]
    pub fn rtt_hint_slot(&self, reply: bool) -> u32 {
        let (a, b, pa, pb) = if reply {
            (&self.dst_addr, &self.src_addr, self.dst_port, self.src_port)
        } else {
            (&self.src_addr, &self.dst_addr, self.src_port, self.dst_port)
        };
        let fa = a[0] ^ a[1] ^ a[2] ^ a[3];
        let fb = b[0] ^ b[1] ^ b[2] ^ b[3];
        let folded = fa ^ fb.rotate_left(11) ^ (pa as u32 | (pb as u32) << 16) ^ self.ifindex;
        // murmur3's 32-bit finaliser: the ports differ in few low bits from flow to flow.
        let mut h = (folded ^ (folded >> 16)).wrapping_mul(0x85EB_CA6B);
        h = (h ^ (h >> 13)).wrapping_mul(0xC2B2_AE35);
        (h ^ (h >> 16)) & (RTT_HINT_SLOTS - 1)
    }

    /// The key as 11 native-endian words, for cheap hashing and comparison.
    #[inline(always)]
    pub fn words(&self) -> [u32; 11] {
        // SAFETY: FlowKey is repr(C), 44 bytes, 4-aligned, no padding holes (explicit _pad).
        unsafe { core::mem::transmute::<FlowKey, [u32; 11]>(*self) }
    }
}

/// What a latency entry measures: a segment between two hooks of one packet (`LAT_HOP`), or
/// a round trip seen at one interface (`LAT_HANDSHAKE`, `LAT_RESPONSE`; `to_*` is that
/// interface, `from_*` zero). `tuple` is the flow as seen at the later hook (for a round
/// trip: the direction of the SYN or of the request).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LatencyKey {
    pub tuple: Tuple,
    pub from_ifindex: u32,
    pub to_ifindex: u32,
    pub from_direction: u8,
    pub to_direction: u8,
    pub kind: u8,
    pub _pad: u8,
}

/// A latency histogram, per CPU: count, sum, min, max and log2 buckets, in nanoseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyHist {
    pub count: u32,
    pub _pad: u32,
    pub sum_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    pub buckets: [u32; LATENCY_BUCKETS],
}

impl LatencyHist {
    /// No samples (a const, so the kernel programs can keep one in a global).
    pub const EMPTY: LatencyHist = LatencyHist {
        count: 0,
        _pad: 0,
        sum_ns: 0,
        min_ns: 0,
        max_ns: 0,
        buckets: [0; LATENCY_BUCKETS],
    };
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// The bucket of a latency in nanoseconds (see `LATENCY_BUCKETS`).
#[inline(always)]
pub fn latency_bucket(ns: u64) -> usize {
    let bits = 64 - ns.leading_zeros() as usize;
    let b = if bits == 0 { 0 } else { bits - 1 };
    if b >= LATENCY_BUCKETS {
        LATENCY_BUCKETS - 1
    } else {
        b
    }
}

impl LatencyHist {
    /// Adds one sample.
    #[inline(always)]
    pub fn add(&mut self, ns: u64) {
        if self.count == 0 || ns < self.min_ns {
            self.min_ns = ns;
        }
        if ns > self.max_ns {
            self.max_ns = ns;
        }
        self.count += 1;
        self.sum_ns += ns;
        let b = latency_bucket(ns);
        if let Some(slot) = self.buckets.get_mut(b) {
            *slot += 1;
        }
    }

    /// Adds another histogram (another CPU's, another drain's).
    pub fn merge(&mut self, o: &LatencyHist) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 || o.min_ns < self.min_ns {
            self.min_ns = o.min_ns;
        }
        self.max_ns = self.max_ns.max(o.max_ns);
        self.count += o.count;
        self.sum_ns += o.sum_ns;
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += *b;
        }
    }
}

/// A TCP segment waiting at one interface for the segment that acknowledges it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RttKey {
    /// The waiting segment's tuple at this interface.
    pub tuple: Tuple,
    pub ifindex: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RttPending {
    /// The acknowledgement number that covers the segment (host byte order).
    pub expected_ack: u32,
    /// `LAT_HANDSHAKE` or `LAT_RESPONSE`.
    pub kind: u8,
    // Scalar padding: a byte array here made LLVM zero it with a memset call.
    pub _pad0: u8,
    pub _pad1: u16,
    pub sent_ns: u64,
}

/// Per-CPU counters of everything the kernel programs saw but could not turn into a
/// flow update. Each way data can be lost has its own slot, so loss is always visible.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet that entered a flowtrace hook.
    PacketsSeen = 0,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): not a loss, just not a flow.
    NonIp = 1,
    /// Frame shorter than its Ethernet header (or VLAN tags).
    TruncatedEthernet = 2,
    /// Frame shorter than its IPv4/IPv6 header.
    TruncatedIp = 3,
    /// IPv4 header with IHL < 5, a version that does not match the EtherType, or a
    /// total length shorter than the header / longer than the frame.
    BadIpHeader = 4,
    /// IPv4 or IPv6 fragment: ports are not in every fragment, so it is not a flow.
    Fragment = 5,
    /// IPv6 extension-header chain longer than flowtrace walks, or truncated inside it.
    Ipv6ExtensionChain = 6,
    /// Frame shorter than the TCP/UDP/ICMP/SCTP header its IP header announces.
    TruncatedL4 = 7,
    /// Packets whose counts were lost because the event ring was full when their flow's
    /// cache slot was handed over (user space reads too slowly; raise `--event-ring-mib`).
    FlowMapFull = 8,
    /// The control map could not be read (should never happen; counted to be sure).
    ControlMissing = 9,
    /// VLAN stack deeper than flowtrace skips.
    TooManyVlanTags = 10,
    /// Not a loss: header reads that fell outside the skb's linear part and needed a helper
    /// call (paged skbs, e.g. some GRO aggregates). Shows where the slow path is taken.
    SlowHeaderReads = 11,
    /// NAT rewrites the kernel saw but could not hand over because the event ring was full.
    NatMapFull = 12,
    /// Latency samples lost because the event ring was full.
    LatencyMapFull = 13,
    /// Trace events lost because the trace ring buffer was full (the tracer reads too
    /// slowly); only counted while a tracer is attached.
    TraceRingFull = 14,
    /// Drops and retransmissions the kernel saw but could not record because the drop
    /// buffer was full (raise `--drop-entries` or drain more often).
    DropMapFull = 15,
    /// Events the tracepoint programs saw: one per dropped packet, one per retransmitted skb
    /// (which may carry several segments; `DropMapFull` counts segments).
    DropEventsSeen = 16,
    /// Not a loss: pairs of sightings of one packet id at two hooks whose tuples differ but
    /// not the way a rewrite changes them (`Tuple::plausible_rewrite_to`): two different
    /// packets with equal ids, so neither a NAT rewrite nor a hop latency sample.
    NatNotRewrite = 17,
}

/// Number of `Counter` slots.
pub const COUNTER_SLOTS: u32 = 18;

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; COUNTER_SLOTS as usize] = [
        Counter::PacketsSeen,
        Counter::NonIp,
        Counter::TruncatedEthernet,
        Counter::TruncatedIp,
        Counter::BadIpHeader,
        Counter::Fragment,
        Counter::Ipv6ExtensionChain,
        Counter::TruncatedL4,
        Counter::FlowMapFull,
        Counter::ControlMissing,
        Counter::TooManyVlanTags,
        Counter::SlowHeaderReads,
        Counter::NatMapFull,
        Counter::LatencyMapFull,
        Counter::TraceRingFull,
        Counter::DropMapFull,
        Counter::DropEventsSeen,
        Counter::NatNotRewrite,
    ];

    /// Stable snake_case name used in the API and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PacketsSeen => "packets_seen",
            Counter::NonIp => "non_ip",
            Counter::TruncatedEthernet => "truncated_ethernet",
            Counter::TruncatedIp => "truncated_ip",
            Counter::BadIpHeader => "bad_ip_header",
            Counter::Fragment => "fragment",
            Counter::Ipv6ExtensionChain => "ipv6_extension_chain",
            Counter::TruncatedL4 => "truncated_l4",
            Counter::FlowMapFull => "flow_map_full",
            Counter::ControlMissing => "control_missing",
            Counter::TooManyVlanTags => "too_many_vlan_tags",
            Counter::SlowHeaderReads => "slow_header_reads",
            Counter::NatMapFull => "nat_map_full",
            Counter::LatencyMapFull => "latency_map_full",
            Counter::TraceRingFull => "trace_ring_full",
            Counter::DropMapFull => "drop_map_full",
            Counter::DropEventsSeen => "drop_events_seen",
            Counter::NatNotRewrite => "nat_not_rewrite",
        }
    }

    /// Whether packets counted here are "unparsed" (malformed or not flow-shaped), as
    /// opposed to lost updates (`FlowMapFull`) or plain information (`PacketsSeen`, `NonIp`).
    pub const fn is_unparsed(self) -> bool {
        matches!(
            self,
            Counter::TruncatedEthernet
                | Counter::TruncatedIp
                | Counter::BadIpHeader
                | Counter::Fragment
                | Counter::Ipv6ExtensionChain
                | Counter::TruncatedL4
                | Counter::TooManyVlanTags
        )
    }
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 44);
const _: () = assert!(core::mem::align_of::<FlowKey>() == 4);
const _: () = assert!(core::mem::size_of::<FlowStats>() == 48);
const _: () = assert!(Counter::ALL.len() == COUNTER_SLOTS as usize);
const _: () = assert!(core::mem::size_of::<TraceEvent>() == 80);
const _: () = assert!(core::mem::size_of::<CacheSlot>() == 96);
const _: () = assert!(core::mem::size_of::<NatEvent>() == 104);
const _: () = assert!(core::mem::size_of::<SlowInput>() == 80);
const _: () = assert!(core::mem::size_of::<LatencyEvent>() == 64);
const _: () = assert!(MIN_CACHE_SLOTS.is_power_of_two() && MAX_CACHE_SLOTS.is_power_of_two());
const _: () = assert!(SIGHTING_SLOTS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<Tuple>() == 40);
const _: () = assert!(core::mem::size_of::<PacketId>() == 16);
const _: () = assert!(core::mem::size_of::<Sighting>() == 72);
const _: () = assert!(core::mem::size_of::<NatRecord>() == 72);
const _: () = assert!(core::mem::size_of::<LatencyKey>() == 52);
const _: () = assert!(core::mem::size_of::<LatencyHist>() == 160);
const _: () = assert!(core::mem::size_of::<RttKey>() == 48);
const _: () = assert!(core::mem::size_of::<RttPending>() == 16);

#[cfg(feature = "user")]
mod user {
    // SAFETY: both types are repr(C), Copy, contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::CacheSlot {}
    unsafe impl aya::Pod for super::Tuple {}
    unsafe impl aya::Pod for super::NatRecord {}
    unsafe impl aya::Pod for super::Sighting {}
    unsafe impl aya::Pod for super::LatencyKey {}
    unsafe impl aya::Pod for super::LatencyHist {}
    unsafe impl aya::Pod for super::RttKey {}
    unsafe impl aya::Pod for super::RttPending {}
    unsafe impl aya::Pod for super::drops::DropKey {}
    unsafe impl aya::Pod for super::drops::DropStats {}
    unsafe impl aya::Pod for super::drops::DropLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_is_young_for_the_pending_segments_max_age_only() {
        let sent = 7_000_000_000_123;
        let hint = rtt_hint_value(sent);
        assert_ne!(hint, 0, "0 is an empty slot");
        assert!(rtt_hint_young(hint, sent));
        assert!(rtt_hint_young(
            hint,
            sent + RTT_PENDING_MAX_AGE_NS - 2_000_000
        ));
        assert!(!rtt_hint_young(
            hint,
            sent + RTT_PENDING_MAX_AGE_NS + 2_000_000
        ));
        assert!(
            !rtt_hint_young(0, sent),
            "an empty slot names nothing waiting"
        );
        // Across the 32-bit wrap of the hint's clock (52 days).
        let wrap = (1u64 << 52) - 300_000_000;
        let h = rtt_hint_value(wrap);
        assert!(rtt_hint_young(h, wrap + 600_000_000));
        assert!(!rtt_hint_young(h, wrap + 1_200_000_000));
    }

    #[test]
    fn the_latency_word_carries_the_rate_and_the_per_flow_window() {
        for (rate, shift) in [
            (0, 0),
            (1, 0),
            (64, 24),
            (1 << 20, LATENCY_WINDOW_SHIFT_MAX),
        ] {
            let w = latency_control(rate, shift);
            assert_eq!((latency_rate(w), latency_window_shift(w)), (rate, shift));
        }
        // A word without a window (what a build before the window wrote) is the rate alone.
        assert_eq!(latency_control(64, 0), 64);
        assert_eq!(window_shift_for_ms(0), 0, "0: no cap");
        // The smallest power of two of nanoseconds that holds the milliseconds.
        assert_eq!(window_shift_for_ms(1), 20);
        assert_eq!(window_shift_for_ms(DEFAULT_LATENCY_PER_FLOW_MS), 24);
        assert_eq!(window_shift_for_ms(17), 25);
        assert_eq!(window_shift_for_ms(600_000), 40);
        assert_eq!(window_shift_for_ms(u32::MAX), LATENCY_WINDOW_SHIFT_MAX);
    }

    #[test]
    fn sample_windows_are_never_empty_and_change_at_each_edge() {
        let shift = 24;
        let edge = 1_000u64 << shift;
        assert_ne!(sample_window(0, shift), 0, "0 means no sample taken");
        assert_eq!(
            sample_window(edge, shift),
            sample_window(edge + (1 << shift) - 1, shift)
        );
        assert_ne!(sample_window(edge - 1, shift), sample_window(edge, shift));
        // Numbered modulo 2^15, never 0, also where the count wraps.
        let wrap = (1u64 << (shift + 15)) - 1;
        assert_ne!(sample_window(wrap, shift), sample_window(wrap + 1, shift));
        assert_ne!(sample_window(wrap + 1, shift), 0);
    }

    fn v4(a: [u8; 4]) -> Addr {
        [u32::from_ne_bytes(a), 0, 0, 0]
    }

    fn tuple(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Tuple {
        Tuple {
            src_addr: v4(src),
            dst_addr: v4(dst),
            src_port: sport,
            dst_port: dport,
            ip_version: 4,
            protocol: 17,
            _pad: 0,
        }
    }

    fn key_of(t: Tuple) -> FlowKey {
        FlowKey {
            src_addr: t.src_addr,
            dst_addr: t.dst_addr,
            src_port: t.src_port,
            dst_port: t.dst_port,
            ip_version: t.ip_version,
            protocol: t.protocol,
            ..FlowKey::default()
        }
    }

    #[test]
    fn a_rewrite_changes_an_address_on_every_side_it_changes() {
        let pod = [10, 244, 1, 10];
        let (vip, backend, node) = ([10, 96, 0, 10], [10, 244, 2, 10], [192, 168, 50, 1]);
        let before = tuple(pod, 40000, vip, 80);
        let plausible = |after: Tuple| before.plausible_rewrite_to(&key_of(after));
        // kube-proxy's DNAT: the destination's address and port.
        assert!(plausible(tuple(pod, 40000, backend, 8080)));
        // DNAT to the same port, and DNAT plus masquerade (hairpin, external traffic).
        assert!(plausible(tuple(pod, 40000, backend, 80)));
        assert!(plausible(tuple(node, 61000, backend, 8080)));
        // The reply's un-DNAT: the source's address and port.
        let reply = tuple(backend, 8080, pod, 40000);
        assert!(reply.plausible_rewrite_to(&key_of(tuple(vip, 80, pod, 40000))));
        // SNAT keeping the port.
        assert!(plausible(tuple(node, 40000, vip, 80)));
        // Ports alone: another packet with the same id, not a rewrite.
        assert!(!plausible(tuple(pod, 40001, vip, 80)));
        assert!(!plausible(tuple(pod, 40000, vip, 81)));
        assert!(!plausible(tuple(pod, 40001, vip, 81)));
        // A new destination address, but the source port changed without its address.
        assert!(!plausible(tuple(pod, 40001, backend, 8080)));
        assert!(!plausible(before));
    }

    #[test]
    fn the_cache_stays_within_its_budget_at_any_cpu_count() {
        let slot = core::mem::size_of::<CacheSlot>() as u64 * FLOW_BUFFERS as u64;
        for cpus in [1u32, 2, 16, 64, 256, 1024] {
            let slots = cache_slots_for(cpus);
            assert!(slots.is_power_of_two());
            assert!((MIN_CACHE_SLOTS..=MAX_CACHE_SLOTS).contains(&slots));
            if slots > MIN_CACHE_SLOTS {
                assert!(
                    slots as u64 * slot * cpus as u64 <= CACHE_BUDGET_BYTES,
                    "{cpus} CPUs"
                );
            }
        }
        assert_eq!(cache_slots_for(2), MAX_CACHE_SLOTS);
        assert_eq!(cache_slots_for(256), MIN_CACHE_SLOTS);
    }

    #[test]
    fn hook_direction_decodes_what_the_kernel_writes() {
        assert_eq!(
            HookDirection::from_raw(DIR_INGRESS),
            Some(HookDirection::Ingress)
        );
        assert_eq!(
            HookDirection::from_raw(DIR_EGRESS),
            Some(HookDirection::Egress)
        );
        assert!(HookDirection::Ingress.is_ingress());
        assert!(!HookDirection::Egress.is_ingress());
        for d in [HookDirection::Ingress, HookDirection::Egress] {
            assert_eq!(HookDirection::from_raw(d.as_raw()), Some(d));
        }
        for raw in 2..=u8::MAX {
            assert_eq!(HookDirection::from_raw(raw), None, "{raw}");
        }
        assert_eq!(HookDirection::Ingress.name(), "ingress");
        assert_eq!(HookDirection::Egress.name(), "egress");
    }

    #[test]
    fn latency_kind_decodes_what_the_kernel_writes() {
        assert_eq!(LatencyKind::from_raw(LAT_HOP), Some(LatencyKind::Hop));
        assert_eq!(
            LatencyKind::from_raw(LAT_HANDSHAKE),
            Some(LatencyKind::Handshake)
        );
        assert_eq!(
            LatencyKind::from_raw(LAT_RESPONSE),
            Some(LatencyKind::Response)
        );
        for k in [
            LatencyKind::Hop,
            LatencyKind::Handshake,
            LatencyKind::Response,
        ] {
            assert_eq!(LatencyKind::from_raw(k.as_raw()), Some(k));
        }
        for raw in 3..=u8::MAX {
            assert_eq!(LatencyKind::from_raw(raw), None, "{raw}");
        }
        assert!(!LatencyKind::Hop.is_round_trip());
        assert!(LatencyKind::Handshake.is_round_trip());
        assert!(LatencyKind::Response.is_round_trip());
        let names = [
            LatencyKind::Hop,
            LatencyKind::Handshake,
            LatencyKind::Response,
        ]
        .map(LatencyKind::name);
        assert_eq!(names, ["hop", "handshake", "response"]);
    }
}
