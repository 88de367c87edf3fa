//! Packet parsing shared by the kernel programs and host unit tests.
//!
//! The parser is generic over [`Packet`], a bounds-checked byte reader. In the kernel it is
//! implemented with direct packet access (`data`/`data_end`), on the host with a byte slice,
//! so the exact code that runs in the kernel is the code the unit tests exercise.
//! Every function is `#[inline(always)]`: the BPF verifier must see each bounds check next to
//! the access it guards.

/// Largest offset the parser will read at. Bounds every variable offset for the verifier
/// and is far beyond any sane header stack (Ethernet + 2 VLAN tags + IPv6 + 6 extension
/// headers of at most 2 KiB would not fit, which is why the walk counts such chains as lost).
pub const MAX_HEADER_OFFSET: usize = 512;

/// VLAN tags skipped before giving up (802.1Q and 802.1ad, i.e. QinQ).
pub const MAX_VLAN_TAGS: usize = 2;

/// IPv6 extension headers walked before giving up.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// A bounds-checked view of a frame starting at its Ethernet header.
///
/// Reads are typed and small on purpose: in the kernel each one is a single load after a
/// bounds check, where copying whole headers would cost a load and a store per byte.
pub trait Packet {
    /// The byte at `offset`.
    fn u8_at(&self, offset: usize) -> Option<u8>;
    /// The big-endian `u16` at `offset`, in host order.
    fn be16_at(&self, offset: usize) -> Option<u16>;
    /// The 4 bytes at `offset` as a native-endian word (network byte order kept in memory).
    fn word_at(&self, offset: usize) -> Option<u32>;
    /// Whether the frame's first `len` bytes can all be read with the `*_within` reads, one
    /// check for all of them (in the kernel: they are in the skb's linear part).
    fn holds(&self, len: usize) -> bool;
    /// The byte at `offset`, read with no check of its own.
    ///
    /// # Safety
    /// `holds(len)` returned true on this same packet value, with `len` a constant of at least
    /// `offset + 2` (in the kernel a 1-byte check is rewritten into one the verifier derives no
    /// range from, see `DirectPacket`), and nothing that may move the packet ran since (in the
    /// kernel the load is otherwise out of the range the verifier proved, which it refuses).
    unsafe fn u8_within(&self, offset: usize) -> u8;
    /// The big-endian `u16` at `offset`, in host order, read with no check of its own.
    ///
    /// # Safety
    /// As `u8_within`, for `len >= offset + 2`.
    unsafe fn be16_within(&self, offset: usize) -> u16;
    /// The native-endian word at `offset`, read with no check of its own.
    ///
    /// # Safety
    /// As `u8_within`, for `len >= offset + 4`.
    unsafe fn word_within(&self, offset: usize) -> u32;
}

impl Packet for [u8] {
    #[inline(always)]
    fn u8_at(&self, offset: usize) -> Option<u8> {
        self.get(offset).copied()
    }
    #[inline(always)]
    fn be16_at(&self, offset: usize) -> Option<u16> {
        let b = self.get(offset..offset.checked_add(2)?)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn word_at(&self, offset: usize) -> Option<u32> {
        let b = self.get(offset..offset.checked_add(4)?)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
    #[inline(always)]
    fn holds(&self, len: usize) -> bool {
        self.len() >= len
    }
    // A slice checks every read anyway; out of range reads 0 (never, after `holds`).
    #[inline(always)]
    unsafe fn u8_within(&self, offset: usize) -> u8 {
        self.u8_at(offset).unwrap_or(0)
    }
    #[inline(always)]
    unsafe fn be16_within(&self, offset: usize) -> u16 {
        self.be16_at(offset).unwrap_or(0)
    }
    #[inline(always)]
    unsafe fn word_within(&self, offset: usize) -> u32 {
        self.word_at(offset).unwrap_or(0)
    }
}

/// What the skb says about the frame beyond its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkbMeta {
    /// `skb->len`: bytes from the Ethernet header to the end of the (possibly GSO) packet.
    pub len: u32,
    /// `skb->gso_segs`: wire segments a GSO/GRO aggregate stands for; 0 or 1 otherwise.
    pub gso_segs: u32,
}

/// Why a frame did not become a flow update. Maps one-to-one onto `crate::Counter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    NonIp,
    TruncatedEthernet,
    TooManyVlanTags,
    TruncatedIp,
    BadIpHeader,
    Fragment,
    Ipv6ExtensionChain,
    TruncatedL4,
}

impl ParseError {
    pub const fn counter(self) -> crate::Counter {
        match self {
            ParseError::NonIp => crate::Counter::NonIp,
            ParseError::TruncatedEthernet => crate::Counter::TruncatedEthernet,
            ParseError::TooManyVlanTags => crate::Counter::TooManyVlanTags,
            ParseError::TruncatedIp => crate::Counter::TruncatedIp,
            ParseError::BadIpHeader => crate::Counter::BadIpHeader,
            ParseError::Fragment => crate::Counter::Fragment,
            ParseError::Ipv6ExtensionChain => crate::Counter::Ipv6ExtensionChain,
            ParseError::TruncatedL4 => crate::Counter::TruncatedL4,
        }
    }
}

/// The flow-relevant facts of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketInfo {
    pub ip_version: u8,
    pub protocol: u8,
    /// See `crate::Addr`.
    pub src_addr: crate::Addr,
    /// See `crate::Addr`.
    pub dst_addr: crate::Addr,
    /// Host byte order (see `FlowKey` for ICMP).
    pub src_port: u16,
    /// Host byte order (see `FlowKey` for ICMP).
    pub dst_port: u16,
    /// TCP flags byte; 0 for non-TCP.
    pub tcp_flags: u8,
    /// Offset of the IP header from the start of the frame.
    pub l3_offset: u32,
    /// IP header length including IPv4 options or IPv6 extension headers.
    pub l3_header_len: u32,
    /// Transport header length (TCP data offset, 8 for UDP, 0 when unknown).
    pub l4_header_len: u32,
    /// Layer-3 length of this packet according to its IP header (total length).
    pub l3_len: u32,
    /// What identifies this packet across hooks (see [`packet_id`]).
    pub id: crate::PacketId,
}

impl PacketInfo {
    /// Packets and layer-3 bytes this frame stands for on the wire.
    ///
    /// A GSO/GRO aggregate of `n` segments is counted as `n` packets; its bytes are the
    /// aggregate's layer-3 bytes plus the IP and transport headers each further segment
    /// repeats. A plain packet counts its IP total length, which ignores Ethernet padding.
    #[inline(always)]
    pub fn wire_counts(&self, meta: SkbMeta) -> (u64, u64) {
        let (packets, bytes, _) = self.wire_counts_with_payload(meta);
        (packets, bytes)
    }

    /// [`PacketInfo::wire_counts`] and the payload bytes among them: every segment repeats
    /// the IP and transport headers, and what is left is the applications' data.
    #[inline(always)]
    pub fn wire_counts_with_payload(&self, meta: SkbMeta) -> (u64, u64, u64) {
        let (packets, bytes) = self.wire_counts_only(meta);
        let headers = packets * (self.l3_header_len + self.l4_header_len) as u64;
        (packets, bytes, bytes.saturating_sub(headers))
    }

    #[inline(always)]
    fn wire_counts_only(&self, meta: SkbMeta) -> (u64, u64) {
        if meta.gso_segs > 1 {
            let aggregate = meta.len.saturating_sub(self.l3_offset) as u64;
            let per_segment_headers = (self.l3_header_len + self.l4_header_len) as u64;
            let segs = meta.gso_segs as u64;
            (segs, aggregate + (segs - 1) * per_segment_headers)
        } else {
            (1, self.l3_len as u64)
        }
    }
}

/// Parses a frame that starts with an Ethernet header.
///
/// Nearly every frame a node carries is the common one `parse_common` reads with one bounds
/// check; the others are read field by field, each read checked (`parse_any`).
#[inline(always)]
pub fn parse_frame<P: Packet + ?Sized>(pkt: &P, meta: SkbMeta) -> Result<PacketInfo, ParseError> {
    match parse_common(pkt, meta) {
        Some(info) => Ok(info),
        None => parse_any(pkt, meta),
    }
}

/// Bytes `parse_common` reads: Ethernet, a 20-byte IPv4 header and 20 transport bytes (TCP's
/// fixed header, which also holds the packet id's words; UDP's header and the 8 payload bytes
/// the id takes fit in it).
pub const COMMON_FRAME_BYTES: usize = ETH_HLEN + 20 + 20;

/// The common frame, parsed behind one bounds check: Ethernet without VLAN tags, IPv4
/// without options, not a fragment, TCP, or UDP that is not a GSO aggregate (which may be a
/// tunnel's), with its first `COMMON_FRAME_BYTES` where `holds` reaches them. For such a frame
/// it gives what `parse_any` gives, packet id included (tested); for any other, `None`, and
/// `parse_any` decides. In the kernel this is the path of nearly every packet: a dozen loads
/// where the checked reads were a dozen checks, each with its out-of-line fallback, and
/// fewer instructions are fewer cold cache lines under real traffic.
#[inline(always)]
fn parse_common<P: Packet + ?Sized>(pkt: &P, meta: SkbMeta) -> Option<PacketInfo> {
    const L3: usize = ETH_HLEN;
    const L4: usize = L3 + 20;
    if !pkt.holds(COMMON_FRAME_BYTES) {
        return None;
    }
    // SAFETY (every `*_within` read below): inside the COMMON_FRAME_BYTES `holds` confirmed.
    if unsafe { pkt.be16_within(12) } != ETH_P_IP || unsafe { pkt.u8_within(L3) } != 0x45 {
        return None;
    }
    let total_len = unsafe { pkt.be16_within(L3 + 2) } as u32;
    let gso = meta.gso_segs > 1;
    // GSO aggregates may carry 0 or a stale total length (see `parse_ipv4`).
    if !gso && (total_len < 20 || total_len > meta.len.saturating_sub(L3 as u32)) {
        return None;
    }
    if unsafe { pkt.be16_within(L3 + 6) } & 0x3fff != 0 {
        return None;
    }
    let protocol = unsafe { pkt.u8_within(L3 + 9) };
    let (l4_header_len, tcp_flags, l4_a, l4_b) = match protocol {
        IPPROTO_TCP => {
            let data_offset = ((unsafe { pkt.u8_within(L4 + 12) } >> 4) as u32) * 4;
            if data_offset < 20 {
                return None;
            }
            let flags = unsafe { pkt.u8_within(L4 + 13) };
            let (seq, ack) = unsafe { (pkt.word_within(L4 + 4), pkt.word_within(L4 + 8)) };
            (data_offset, flags, seq, ack)
        }
        IPPROTO_UDP if !gso => {
            let (a, b) = unsafe { (pkt.word_within(L4 + 8), pkt.word_within(L4 + 12)) };
            (8, 0, a, b)
        }
        _ => return None,
    };
    let (src, dst) = unsafe { (pkt.word_within(L3 + 12), pkt.word_within(L3 + 16)) };
    let (src_port, dst_port) = unsafe { (pkt.be16_within(L4), pkt.be16_within(L4 + 2)) };
    Some(PacketInfo {
        ip_version: 4,
        protocol,
        src_addr: [src, 0, 0, 0],
        dst_addr: [dst, 0, 0, 0],
        src_port,
        dst_port,
        tcp_flags,
        l3_offset: L3 as u32,
        l3_header_len: 20,
        l4_header_len,
        l3_len: total_len,
        id: crate::PacketId {
            ident: unsafe { pkt.be16_within(L3 + 4) } as u32,
            len_proto: (total_len << 8) | protocol as u32,
            l4_a,
            l4_b,
        },
    })
}

/// Parses any frame that starts with an Ethernet header, every read checked, its packet id
/// included.
#[inline(always)]
fn parse_any<P: Packet + ?Sized>(pkt: &P, meta: SkbMeta) -> Result<PacketInfo, ParseError> {
    let mut info = parse_headers(pkt, meta)?;
    info.id = packet_id(pkt, &info);
    Ok(info)
}

/// `parse_any`'s headers; `id` is left unfilled (`parse_any` fills it in).
#[inline(always)]
fn parse_headers<P: Packet + ?Sized>(pkt: &P, meta: SkbMeta) -> Result<PacketInfo, ParseError> {
    let mut ethertype = pkt.be16_at(12).ok_or(ParseError::TruncatedEthernet)?;
    let mut off = ETH_HLEN;
    let mut tags = 0;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tags == MAX_VLAN_TAGS {
            return Err(ParseError::TooManyVlanTags);
        }
        // A tag is TCI (2 bytes) then the next EtherType (2 bytes).
        ethertype = pkt.be16_at(off + 2).ok_or(ParseError::TruncatedEthernet)?;
        off += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(pkt, off, meta),
        ETH_P_IPV6 => parse_ipv6(pkt, off, meta),
        _ => Err(ParseError::NonIp),
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet + ?Sized>(
    pkt: &P,
    l3: usize,
    meta: SkbMeta,
) -> Result<PacketInfo, ParseError> {
    // The last word of the fixed header first: one check proves all 20 bytes are there.
    let dst = pkt.word_at(l3 + 16).ok_or(ParseError::TruncatedIp)?;
    let vihl = pkt.u8_at(l3).ok_or(ParseError::TruncatedIp)?;
    if vihl >> 4 != 4 {
        return Err(ParseError::BadIpHeader);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(ParseError::BadIpHeader);
    }
    let total_len = pkt.be16_at(l3 + 2).ok_or(ParseError::TruncatedIp)? as u32;
    // GSO aggregates may carry 0 or a stale total length (BIG TCP); only check plain packets.
    if meta.gso_segs <= 1 {
        if (total_len as usize) < ihl {
            return Err(ParseError::BadIpHeader);
        }
        if total_len > meta.len.saturating_sub(l3 as u32) {
            return Err(ParseError::TruncatedIp);
        }
    }
    // The options must be inside the frame: read the header's last two bytes. (Presence
    // checks read 2 bytes ending at the last byte: in the kernel a 1-byte read is checked as
    // a 2-byte window and would take the slow path when the header ends the packet.)
    pkt.be16_at(l3 + ihl - 2).ok_or(ParseError::TruncatedIp)?;
    let frag = pkt.be16_at(l3 + 6).ok_or(ParseError::TruncatedIp)?;
    // More-fragments flag or a non-zero offset: a fragment (the DF bit 0x4000 is fine).
    if frag & 0x3fff != 0 {
        return Err(ParseError::Fragment);
    }
    let mut info = PacketInfo {
        ip_version: 4,
        protocol: pkt.u8_at(l3 + 9).ok_or(ParseError::TruncatedIp)?,
        src_addr: [
            pkt.word_at(l3 + 12).ok_or(ParseError::TruncatedIp)?,
            0,
            0,
            0,
        ],
        dst_addr: [dst, 0, 0, 0],
        l3_offset: l3 as u32,
        l3_header_len: ihl as u32,
        l3_len: total_len,
        // Spelled out rather than `..Default::default()`, which can lower to a memset loop.
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        l4_header_len: 0,
        id: unfilled_id(total_len),
    };
    parse_l4(pkt, l3 + ihl, &mut info, meta.gso_segs > 1)?;
    Ok(info)
}

#[inline(always)]
fn parse_ipv6<P: Packet + ?Sized>(
    pkt: &P,
    l3: usize,
    meta: SkbMeta,
) -> Result<PacketInfo, ParseError> {
    let last = pkt.word_at(l3 + 36).ok_or(ParseError::TruncatedIp)?;
    if pkt.u8_at(l3).ok_or(ParseError::TruncatedIp)? >> 4 != 6 {
        return Err(ParseError::BadIpHeader);
    }
    let payload_len = pkt.be16_at(l3 + 4).ok_or(ParseError::TruncatedIp)? as u32;
    if meta.gso_segs <= 1 && payload_len + 40 > meta.len.saturating_sub(l3 as u32) {
        return Err(ParseError::TruncatedIp);
    }
    let mut next = pkt.u8_at(l3 + 6).ok_or(ParseError::TruncatedIp)?;
    let mut off = l3 + 40;
    let mut walked = 0;
    loop {
        let ext_len = match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6, experimental:
            // all share the (next header, length in 8-byte units - 1) layout.
            0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => {
                let len = pkt.u8_at(off + 1).ok_or(ParseError::Ipv6ExtensionChain)?;
                next = pkt.u8_at(off).ok_or(ParseError::Ipv6ExtensionChain)?;
                (len as usize + 1) * 8
            }
            // Authentication header: length in 4-byte units - 2.
            51 => {
                let len = pkt.u8_at(off + 1).ok_or(ParseError::Ipv6ExtensionChain)?;
                next = pkt.u8_at(off).ok_or(ParseError::Ipv6ExtensionChain)?;
                (len as usize + 2) * 4
            }
            44 => {
                // The whole 8-byte header must be there.
                pkt.be16_at(off + 6).ok_or(ParseError::Ipv6ExtensionChain)?;
                let frag = pkt.be16_at(off + 2).ok_or(ParseError::Ipv6ExtensionChain)?;
                // Offset (upper 13 bits) or the M flag (bit 0): a real fragment. An atomic
                // fragment (both zero) carries the whole packet and is parsed through.
                if frag & 0xfff9 != 0 {
                    return Err(ParseError::Fragment);
                }
                next = pkt.u8_at(off).ok_or(ParseError::Ipv6ExtensionChain)?;
                8
            }
            _ => break,
        };
        off += ext_len;
        walked += 1;
        if walked == MAX_IPV6_EXT_HEADERS || off > MAX_HEADER_OFFSET {
            // Still inside an extension chain we will not walk further.
            if is_ipv6_extension(next) || off > MAX_HEADER_OFFSET {
                return Err(ParseError::Ipv6ExtensionChain);
            }
            break;
        }
    }
    let w = |at: usize| pkt.word_at(l3 + at).ok_or(ParseError::TruncatedIp);
    let mut info = PacketInfo {
        ip_version: 6,
        protocol: next,
        src_addr: [w(8)?, w(12)?, w(16)?, w(20)?],
        dst_addr: [w(24)?, w(28)?, w(32)?, last],
        l3_offset: l3 as u32,
        l3_header_len: (off - l3) as u32,
        l3_len: payload_len + 40,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        l4_header_len: 0,
        id: unfilled_id(payload_len + 40),
    };
    parse_l4(pkt, off, &mut info, meta.gso_segs > 1)?;
    Ok(info)
}

/// The id `parse_headers` leaves for `parse_any` to fill in. Not a constant zero: LLVM zeroes
/// 16 bytes with a memset call, which the kernel programs must not contain.
#[inline(always)]
fn unfilled_id(l3_len: u32) -> crate::PacketId {
    crate::PacketId {
        ident: 0,
        len_proto: l3_len << 8,
        l4_a: 0,
        l4_b: 0,
    }
}

#[inline(always)]
const fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

#[inline(always)]
fn parse_l4<P: Packet + ?Sized>(
    pkt: &P,
    l4: usize,
    info: &mut PacketInfo,
    gso: bool,
) -> Result<(), ParseError> {
    if l4 > MAX_HEADER_OFFSET {
        return Err(ParseError::TruncatedL4);
    }
    match info.protocol {
        IPPROTO_TCP => {
            // Bytes 12 (data offset) and 13 (flags) end the part we need; 18-19 end the header.
            pkt.be16_at(l4 + 18).ok_or(ParseError::TruncatedL4)?;
            let data_offset =
                ((pkt.u8_at(l4 + 12).ok_or(ParseError::TruncatedL4)? >> 4) as u32) * 4;
            if data_offset < 20 {
                return Err(ParseError::TruncatedL4);
            }
            info.src_port = pkt.be16_at(l4).ok_or(ParseError::TruncatedL4)?;
            info.dst_port = pkt.be16_at(l4 + 2).ok_or(ParseError::TruncatedL4)?;
            info.tcp_flags = pkt.u8_at(l4 + 13).ok_or(ParseError::TruncatedL4)?;
            info.l4_header_len = data_offset;
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            pkt.be16_at(l4 + 6).ok_or(ParseError::TruncatedL4)?;
            info.src_port = pkt.be16_at(l4).ok_or(ParseError::TruncatedL4)?;
            info.dst_port = pkt.be16_at(l4 + 2).ok_or(ParseError::TruncatedL4)?;
            info.l4_header_len = if info.protocol == IPPROTO_UDP { 8 } else { 12 };
            // A UDP-tunnel GSO aggregate (VXLAN/Geneve on the node's uplink) repeats the tunnel
            // header and the inner headers in every segment, not just the outer UDP header.
            if gso && info.protocol == IPPROTO_UDP {
                info.l4_header_len += tunnel_headers_len(pkt, l4 + 8, info.dst_port);
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            pkt.be16_at(l4 + 6).ok_or(ParseError::TruncatedL4)?;
            let type_code = pkt.be16_at(l4).ok_or(ParseError::TruncatedL4)?;
            let ty = (type_code >> 8) as u8;
            let echo = if info.protocol == IPPROTO_ICMP {
                ty == 0 || ty == 8
            } else {
                ty == 128 || ty == 129
            };
            info.src_port = if echo {
                pkt.be16_at(l4 + 4).ok_or(ParseError::TruncatedL4)?
            } else {
                0
            };
            info.dst_port = type_code;
            info.l4_header_len = 8;
        }
        // Other protocols (GRE, ESP, OSPF, ...) are flows without ports.
        _ => {}
    }
    Ok(())
}

/// The NAT-invariant identity of a parsed TCP, UDP or SCTP packet (see `crate::PacketId`;
/// the kernel programs sight no other protocol, so other packets get only the IP part). Reads a few words
/// past the headers `parse_headers` checked; a word that is not in the frame counts as 0.
#[inline(always)]
pub fn packet_id<P: Packet + ?Sized>(pkt: &P, info: &PacketInfo) -> crate::PacketId {
    let l3 = info.l3_offset as usize;
    let l4 = (info.l3_offset + info.l3_header_len) as usize;
    if l3 > MAX_HEADER_OFFSET || l4 > MAX_HEADER_OFFSET {
        // Length and protocol only (not an all-zero value: LLVM zeroes 16 bytes with a
        // memset call, which the kernel programs must not contain).
        return crate::PacketId {
            ident: 0,
            len_proto: (info.l3_len << 8) | info.protocol as u32,
            l4_a: 0,
            l4_b: 0,
        };
    }
    let ident = if info.ip_version == 4 {
        pkt.be16_at(l3 + 4).unwrap_or(0) as u32
    } else {
        let hi = pkt.be16_at(l3).unwrap_or(0) as u32;
        let lo = pkt.be16_at(l3 + 2).unwrap_or(0) as u32;
        ((hi << 16) | lo) & 0x000f_ffff
    };
    let word = |off: usize| pkt.word_at(off).unwrap_or(0);
    let (l4_a, l4_b) = match info.protocol {
        IPPROTO_TCP => (word(l4 + 4), word(l4 + 8)),
        IPPROTO_UDP => (word(l4 + 8), word(l4 + 12)),
        IPPROTO_SCTP => (word(l4 + 4), 0),
        _ => (0, 0),
    };
    crate::PacketId {
        ident,
        len_proto: (info.l3_len << 8) | info.protocol as u32,
        l4_a,
        l4_b,
    }
}

/// UDP ports of the tunnels whose GSO aggregates flowtrace sizes exactly.
pub const VXLAN_PORTS: [u16; 2] = [4789, 8472];
pub const GENEVE_PORT: u16 = 6081;

/// Bytes from the end of the outer UDP header to the inner payload (tunnel header, inner
/// Ethernet, inner IP, inner TCP/UDP), for a VXLAN or Geneve packet; 0 otherwise. (A plain
/// integer, not an `Option`: in the kernel this is a BPF function, which returns a scalar.)
/// Out of line (its own BPF function in the kernel): only GSO tunnel aggregates need it, and
/// keeping it out of the common path keeps that path's code small.
#[inline(never)]
fn tunnel_headers_len<P: Packet + ?Sized>(pkt: &P, tun: usize, dst_port: u16) -> u32 {
    tunnel_headers(pkt, tun, dst_port).unwrap_or(0)
}

#[inline(always)]
fn tunnel_headers<P: Packet + ?Sized>(pkt: &P, tun: usize, dst_port: u16) -> Option<u32> {
    let tunnel = if dst_port == VXLAN_PORTS[0] || dst_port == VXLAN_PORTS[1] {
        8
    } else if dst_port == GENEVE_PORT {
        // Geneve: 8 fixed bytes plus options, their length in 4-byte words in byte 0.
        8 + ((pkt.u8_at(tun)? & 0x3f) as usize) * 4
    } else {
        return None;
    };
    let inner_eth = tun + tunnel;
    let inner_l3 = inner_eth + ETH_HLEN;
    if inner_l3 > MAX_HEADER_OFFSET {
        return None;
    }
    let (l3_len, proto) = match pkt.be16_at(inner_eth + 12)? {
        ETH_P_IP => (
            ((pkt.u8_at(inner_l3)? & 0x0f) as usize) * 4,
            pkt.u8_at(inner_l3 + 9)?,
        ),
        ETH_P_IPV6 => (40, pkt.u8_at(inner_l3 + 6)?),
        _ => return None,
    };
    let inner_l4 = inner_l3 + l3_len;
    let l4_len = match proto {
        IPPROTO_TCP => ((pkt.u8_at(inner_l4 + 12)? >> 4) as usize) * 4,
        IPPROTO_UDP => 8,
        _ => 0,
    };
    Some((tunnel + ETH_HLEN + l3_len + l4_len) as u32)
}

#[cfg(test)]
mod tests;
