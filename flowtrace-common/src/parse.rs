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
pub trait Packet {
    /// The `N` bytes at `offset`, or `None` when they are not all inside the frame.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Packet for [u8] {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let bytes = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
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
    /// Network byte order; IPv4 in the first 4 bytes.
    pub src_addr: [u8; 16],
    /// Network byte order; IPv4 in the first 4 bytes.
    pub dst_addr: [u8; 16],
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
}

impl PacketInfo {
    /// Packets and layer-3 bytes this frame stands for on the wire.
    ///
    /// A GSO/GRO aggregate of `n` segments is counted as `n` packets; its bytes are the
    /// aggregate's layer-3 bytes plus the IP and transport headers each further segment
    /// repeats. A plain packet counts its IP total length, which ignores Ethernet padding.
    #[inline(always)]
    pub fn wire_counts(&self, meta: SkbMeta) -> (u64, u64) {
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

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Parses a frame that starts with an Ethernet header.
#[inline(always)]
pub fn parse_frame<P: Packet + ?Sized>(pkt: &P, meta: SkbMeta) -> Result<PacketInfo, ParseError> {
    let eth: [u8; ETH_HLEN] = pkt.read(0).ok_or(ParseError::TruncatedEthernet)?;
    let mut ethertype = be16([eth[12], eth[13]]);
    let mut off = ETH_HLEN;
    let mut tags = 0;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tags == MAX_VLAN_TAGS {
            return Err(ParseError::TooManyVlanTags);
        }
        // A tag is TCI (2 bytes) then the next EtherType (2 bytes).
        let tag: [u8; 4] = pkt.read(off).ok_or(ParseError::TruncatedEthernet)?;
        ethertype = be16([tag[2], tag[3]]);
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
    let h: [u8; 20] = pkt.read(l3).ok_or(ParseError::TruncatedIp)?;
    if h[0] >> 4 != 4 {
        return Err(ParseError::BadIpHeader);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(ParseError::BadIpHeader);
    }
    let total_len = be16([h[2], h[3]]) as u32;
    let gso = meta.gso_segs > 1;
    // GSO aggregates may carry 0 or a stale total length (BIG TCP); only check plain packets.
    if !gso {
        if (total_len as usize) < ihl {
            return Err(ParseError::BadIpHeader);
        }
        if total_len > meta.len.saturating_sub(l3 as u32) {
            return Err(ParseError::TruncatedIp);
        }
    }
    // The options must be inside the frame: read the last header byte.
    let _: [u8; 1] = pkt.read(l3 + ihl - 1).ok_or(ParseError::TruncatedIp)?;
    let frag = be16([h[6], h[7]]);
    // More-fragments flag or a non-zero offset: a fragment (the DF bit 0x4000 is fine).
    if frag & 0x3fff != 0 {
        return Err(ParseError::Fragment);
    }
    let mut info = PacketInfo {
        ip_version: 4,
        protocol: h[9],
        l3_offset: l3 as u32,
        l3_header_len: ihl as u32,
        l3_len: total_len,
        ..PacketInfo::default()
    };
    info.src_addr[..4].copy_from_slice(&h[12..16]);
    info.dst_addr[..4].copy_from_slice(&h[16..20]);
    parse_l4(pkt, l3 + ihl, &mut info)?;
    Ok(info)
}

#[inline(always)]
fn parse_ipv6<P: Packet + ?Sized>(
    pkt: &P,
    l3: usize,
    meta: SkbMeta,
) -> Result<PacketInfo, ParseError> {
    let h: [u8; 40] = pkt.read(l3).ok_or(ParseError::TruncatedIp)?;
    if h[0] >> 4 != 6 {
        return Err(ParseError::BadIpHeader);
    }
    let payload_len = be16([h[4], h[5]]) as u32;
    if meta.gso_segs <= 1 && payload_len + 40 > meta.len.saturating_sub(l3 as u32) {
        return Err(ParseError::TruncatedIp);
    }
    let mut next = h[6];
    let mut off = l3 + 40;
    let mut walked = 0;
    loop {
        let ext_len = match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6, experimental:
            // all share the (next header, length in 8-byte units - 1) layout.
            0 | 43 | 60 | 135 | 139 | 140 | 253 | 254 => {
                let e: [u8; 2] = pkt.read(off).ok_or(ParseError::Ipv6ExtensionChain)?;
                next = e[0];
                (e[1] as usize + 1) * 8
            }
            // Authentication header: length in 4-byte units - 2.
            51 => {
                let e: [u8; 2] = pkt.read(off).ok_or(ParseError::Ipv6ExtensionChain)?;
                next = e[0];
                (e[1] as usize + 2) * 4
            }
            44 => {
                let e: [u8; 8] = pkt.read(off).ok_or(ParseError::Ipv6ExtensionChain)?;
                let frag = be16([e[2], e[3]]);
                // Offset (upper 13 bits) or the M flag (bit 0): a real fragment. An atomic
                // fragment (both zero) carries the whole packet and is parsed through.
                if frag & 0xfff9 != 0 {
                    return Err(ParseError::Fragment);
                }
                next = e[0];
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
    let mut info = PacketInfo {
        ip_version: 6,
        protocol: next,
        l3_offset: l3 as u32,
        l3_header_len: (off - l3) as u32,
        l3_len: payload_len + 40,
        ..PacketInfo::default()
    };
    info.src_addr.copy_from_slice(&h[8..24]);
    info.dst_addr.copy_from_slice(&h[24..40]);
    parse_l4(pkt, off, &mut info)?;
    Ok(info)
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
) -> Result<(), ParseError> {
    if l4 > MAX_HEADER_OFFSET {
        return Err(ParseError::TruncatedL4);
    }
    match info.protocol {
        IPPROTO_TCP => {
            let t: [u8; 20] = pkt.read(l4).ok_or(ParseError::TruncatedL4)?;
            let data_offset = ((t[12] >> 4) as u32) * 4;
            if data_offset < 20 {
                return Err(ParseError::TruncatedL4);
            }
            info.src_port = be16([t[0], t[1]]);
            info.dst_port = be16([t[2], t[3]]);
            info.tcp_flags = t[13];
            info.l4_header_len = data_offset;
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let u: [u8; 8] = pkt.read(l4).ok_or(ParseError::TruncatedL4)?;
            info.src_port = be16([u[0], u[1]]);
            info.dst_port = be16([u[2], u[3]]);
            info.l4_header_len = if info.protocol == IPPROTO_UDP { 8 } else { 12 };
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let c: [u8; 8] = pkt.read(l4).ok_or(ParseError::TruncatedL4)?;
            let (ty, code) = (c[0], c[1]);
            let echo = if info.protocol == IPPROTO_ICMP {
                ty == 0 || ty == 8
            } else {
                ty == 128 || ty == 129
            };
            info.src_port = if echo { be16([c[4], c[5]]) } else { 0 };
            info.dst_port = ((ty as u16) << 8) | code as u16;
            info.l4_header_len = 8;
        }
        // Other protocols (GRE, ESP, OSPF, ...) are flows without ports.
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests;
