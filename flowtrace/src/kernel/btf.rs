//! The running kernel's BTF (`/sys/kernel/btf/vmlinux`), read for the two things the drop
//! programs need: the offsets of the struct fields they read ([`DropLayout`]) and the names
//! of `enum skb_drop_reason`.
//!
//! aya-ebpf 0.2 emits no CO-RE relocations, so the offsets are computed here and handed to
//! the programs through a map. Only the BTF kinds needed to walk structs, typedefs and
//! enums are decoded; every other type is skipped by its size.

use std::collections::HashMap;

use flowtrace_common::drops::{DropLayout, NO_REASON};

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset; `None` for a bitfield (never read by the programs).
    bit_offset: Option<u32>,
}

#[derive(Clone, Debug)]
enum Type {
    /// Struct or union.
    Composite {
        members: Vec<Member>,
    },
    Enum {
        values: Vec<(u32, i64)>,
    },
    /// Typedef, const, volatile, restrict, type tag: the type they wrap.
    Alias(u32),
    Ptr(u32),
    FuncProto {
        params: usize,
    },
    Other,
}

/// A decoded BTF blob: types by id (id 0 is void) and the string table.
pub struct Btf {
    types: Vec<Type>,
    names: Vec<u32>,
    kinds: Vec<u32>,
    strings: Vec<u8>,
    by_name: HashMap<(u32, String), u32>,
}

/// Why the BTF could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Malformed(String),
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| BtfError::Malformed(format!("BTF ends inside a field at byte {at}")))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_kernel() -> Result<Self, BtfError> {
        let data = std::fs::read(VMLINUX_BTF).map_err(|source| BtfError::Read {
            path: VMLINUX_BTF.into(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Decodes a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed(
                "not little-endian BTF (bad magic)".into(),
            ));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(|| BtfError::Malformed(format!("the {what} section is cut short")))
        };
        let tbytes = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();
        let mut types = vec![Type::Other];
        let mut names = vec![0];
        let mut kinds = vec![0];
        let mut at = 0;
        while at < tbytes.len() {
            let name = u32_at(tbytes, at)?;
            let info = u32_at(tbytes, at + 4)?;
            let size_or_type = u32_at(tbytes, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let ty = match kind {
                KIND_INT => {
                    at += 4;
                    Type::Other
                }
                KIND_PTR => Type::Ptr(size_or_type),
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let (n, t, off) = (
                            u32_at(tbytes, at)?,
                            u32_at(tbytes, at + 4)?,
                            u32_at(tbytes, at + 8)?,
                        );
                        at += 12;
                        let bit_offset = if kind_flag {
                            // bitfield_size << 24 | bit offset; a bitfield is not readable
                            // as a whole value.
                            (off >> 24 == 0).then_some(off & 0x00ff_ffff)
                        } else {
                            Some(off)
                        };
                        members.push(Member {
                            name: n,
                            ty: t,
                            bit_offset,
                        });
                    }
                    Type::Composite { members }
                }
                KIND_ENUM => {
                    let mut values = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        values.push((u32_at(tbytes, at)?, i64::from(u32_at(tbytes, at + 4)?)));
                        at += 8;
                    }
                    Type::Enum { values }
                }
                KIND_ENUM64 => {
                    let mut values = Vec::with_capacity(vlen);
                    for _ in 0..vlen {
                        let lo = u64::from(u32_at(tbytes, at + 4)?);
                        let hi = u64::from(u32_at(tbytes, at + 8)?);
                        values.push((u32_at(tbytes, at)?, (hi << 32 | lo) as i64));
                        at += 12;
                    }
                    Type::Enum { values }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                KIND_FUNC_PROTO => {
                    at += 8 * vlen;
                    Type::FuncProto { params: vlen }
                }
                KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_DATASEC => {
                    at += 12 * vlen;
                    Type::Other
                }
                KIND_FWD | KIND_FUNC | KIND_FLOAT => Type::Other,
                other => {
                    return Err(BtfError::Malformed(format!(
                        "BTF kind {other} at type {} is newer than this flowtrace reads: upgrade flowtrace",
                        types.len()
                    )))
                }
            };
            types.push(ty);
            names.push(name);
            kinds.push(kind);
        }
        let mut btf = Self {
            types,
            names,
            kinds,
            strings,
            by_name: HashMap::new(),
        };
        for id in 1..btf.types.len() {
            let name = btf.string(btf.names[id]).to_string();
            if !name.is_empty() {
                // The first of a name wins: vmlinux has one definition per name and kind.
                btf.by_name
                    .entry((btf.kinds[id], name))
                    .or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    fn id(&self, kind: u32, name: &str) -> Option<u32> {
        self.by_name.get(&(kind, name.to_string())).copied()
    }

    fn ty(&self, id: u32) -> &Type {
        self.types.get(id as usize).unwrap_or(&Type::Other)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.ty(id) {
                Type::Alias(t) => id = *t,
                _ => return id,
            }
        }
        id
    }

    /// Bit offset of member `name` in composite `id`, looking inside anonymous struct and
    /// union members as C does; with the member's type.
    fn member(&self, id: u32, name: &str) -> Option<(u32, u32)> {
        let Type::Composite { members } = self.ty(self.resolve(id)) else {
            return None;
        };
        for m in members {
            if self.string(m.name) == name {
                return Some((m.bit_offset?, m.ty));
            }
        }
        for m in members.iter().filter(|m| m.name == 0) {
            if let Some((off, ty)) = self.member(m.ty, name) {
                return Some((m.bit_offset? + off, ty));
            }
        }
        None
    }

    /// Byte offset of `path` (`"a.b.c"`, through nested structs, not pointers) in struct
    /// `strukt`.
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("struct {strukt} member {path}"));
        let mut id = self.id(KIND_STRUCT, strukt).ok_or_else(missing)?;
        let mut bits = 0;
        for part in path.split('.') {
            let (off, ty) = self.member(id, part).ok_or_else(missing)?;
            bits += off;
            id = ty;
        }
        if bits % 8 != 0 {
            return Err(BtfError::Missing(format!(
                "byte-aligned struct {strukt} member {path}"
            )));
        }
        Ok(bits / 8)
    }

    /// The values of `enum name`, as (name, value).
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let id = self
            .id(KIND_ENUM, name)
            .or_else(|| self.id(KIND_ENUM64, name))
            .ok_or_else(|| BtfError::Missing(format!("enum {name}")))?;
        match self.ty(id) {
            Type::Enum { values } => Ok(values
                .iter()
                .map(|(n, v)| (self.string(*n).to_string(), *v))
                .collect()),
            _ => Err(BtfError::Missing(format!("enum {name}"))),
        }
    }

    /// The number of arguments a tracepoint passes to BPF, from its `btf_trace_<name>`
    /// typedef (a pointer to a function whose first parameter is the BPF context).
    pub fn tracepoint_args(&self, tracepoint: &str) -> Result<usize, BtfError> {
        let missing = || BtfError::Missing(format!("tracepoint {tracepoint}"));
        let id = self
            .id(KIND_TYPEDEF, &format!("btf_trace_{tracepoint}"))
            .ok_or_else(missing)?;
        let Type::Ptr(proto) = self.ty(self.resolve(id)) else {
            return Err(missing());
        };
        match self.ty(self.resolve(*proto)) {
            Type::FuncProto { params } => Ok(params.saturating_sub(1)),
            _ => Err(missing()),
        }
    }

    /// The layout the drop programs read, or what this kernel lacks for it.
    pub fn drop_layout(&self) -> Result<DropLayout, BtfError> {
        if self.tracepoint_args("kfree_skb")? < 3 {
            return Err(BtfError::Missing(
                "kfree_skb tracepoint with a drop reason (Linux >= 5.17)".into(),
            ));
        }
        self.tracepoint_args("tcp_retransmit_skb")?;
        let reasons = self.enum_values("skb_drop_reason")?;
        let code = |name: &str| {
            reasons
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| u32::try_from(*v).ok())
                .unwrap_or(NO_REASON)
        };
        let sk = |f: &str| self.offset("sock", &format!("__sk_common.{f}"));
        Ok(DropLayout {
            ready: 1,
            not_dropped: code("SKB_NOT_DROPPED_YET"),
            consumed: code("SKB_CONSUMED"),
            skb_head: self.offset("sk_buff", "head")?,
            skb_network_header: self.offset("sk_buff", "network_header")?,
            skb_len: self.offset("sk_buff", "len")?,
            skb_dev: self.offset("sk_buff", "dev")?,
            skb_protocol: self.offset("sk_buff", "protocol")?,
            skb_cb: self.offset("sk_buff", "cb")?,
            skb_sk: self.offset("sk_buff", "sk")?,
            dev_ifindex: self.offset("net_device", "ifindex")?,
            dev_net: self.offset("net_device", "nd_net.net")?,
            net_inum: self.offset("net", "ns.inum")?,
            sk_family: sk("skc_family")?,
            sk_daddr: sk("skc_daddr")?,
            sk_rcv_saddr: sk("skc_rcv_saddr")?,
            sk_dport: sk("skc_dport")?,
            sk_num: sk("skc_num")?,
            sk_v6_daddr: sk("skc_v6_daddr")?,
            sk_v6_rcv_saddr: sk("skc_v6_rcv_saddr")?,
            sk_net: sk("skc_net.net")?,
            tcp_cb_gso_segs: self.offset("tcp_skb_cb", "tcp_gso_segs")?,
        })
    }

    /// `enum skb_drop_reason` as code -> name without the `SKB_DROP_REASON_` prefix
    /// (`NETFILTER_DROP`), the words the kernel documents them by.
    pub fn drop_reasons(&self) -> Result<HashMap<u32, String>, BtfError> {
        Ok(self
            .enum_values("skb_drop_reason")?
            .into_iter()
            .filter(|(_, v)| (0..=i64::from(u32::MAX)).contains(v))
            .map(|(n, v)| {
                let short = n
                    .strip_prefix("SKB_DROP_REASON_")
                    .or_else(|| n.strip_prefix("SKB_"))
                    .unwrap_or(&n)
                    .to_string();
                (v as u32, short)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `struct inner { int a; int b; }`, `struct outer { int x; union { struct
    /// inner in; }; }`, `typedef struct outer outer_t`, `enum e { E_ONE = 1 }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0x\0in\0outer\0outer_t\0e\0SKB_DROP_REASON_ONE\0";
        let s = |name: &str| -> u32 {
            let needle = format!("\0{name}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .map(|p| p as u32 + 1)
                .expect("name in table")
        };
        let mut t: Vec<u32> = Vec::new();
        // 1: int
        t.extend([s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { a @0, b @32 }
        t.extend([s("inner"), KIND_STRUCT << 24 | 2, 8]);
        t.extend([s("a"), 1, 0, s("b"), 1, 32]);
        // 3: anonymous union { struct inner in; }
        t.extend([0, KIND_UNION << 24 | 1, 8]);
        t.extend([s("in"), 2, 0]);
        // 4: struct outer { int x @0; union @64 }
        t.extend([s("outer"), KIND_STRUCT << 24 | 2, 16]);
        t.extend([s("x"), 1, 0, 0, 3, 64]);
        // 5: typedef outer_t
        t.extend([s("outer_t"), KIND_TYPEDEF << 24, 4]);
        // 6: enum e { ONE = 1 }
        t.extend([s("e"), KIND_ENUM << 24 | 1, 4]);
        t.extend([s("SKB_DROP_REASON_ONE"), 1]);
        let types: Vec<u8> = t.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(w.to_le_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn offsets_go_through_anonymous_members_and_nested_structs() {
        let btf = Btf::parse(&blob()).expect("parses");
        assert_eq!(btf.offset("outer", "x").expect("x"), 0);
        assert_eq!(btf.offset("outer", "in.b").expect("in.b"), 12);
        assert!(matches!(
            btf.offset("outer", "in.c"),
            Err(BtfError::Missing(_))
        ));
        assert!(btf.offset("nosuch", "x").is_err());
        assert_eq!(
            btf.enum_values("e").expect("enum"),
            vec![("SKB_DROP_REASON_ONE".to_string(), 1)]
        );
    }

    #[test]
    fn a_cut_blob_is_an_error_not_a_panic() {
        let b = blob();
        for len in [0, 10, 30, b.len() - 3] {
            assert!(Btf::parse(&b[..len]).is_err(), "cut at {len}");
        }
    }

    /// The running kernel (every test machine has /sys/kernel/btf/vmlinux): the layout is
    /// complete and the reasons the issue names are there by name.
    #[test]
    fn the_running_kernel_gives_a_layout_and_reason_names() {
        let btf = Btf::from_kernel().expect("vmlinux BTF");
        let l = btf.drop_layout().expect("layout");
        assert_eq!(l.ready, 1);
        assert_ne!(l.not_dropped, NO_REASON, "SKB_NOT_DROPPED_YET");
        assert_ne!(l.skb_network_header, 0);
        let reasons = btf.drop_reasons().expect("reasons");
        let names: Vec<&str> = reasons.values().map(String::as_str).collect();
        for want in [
            "NETFILTER_DROP",
            "NO_SOCKET",
            "SOCKET_RCVBUFF",
            "NOT_DROPPED_YET",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
    }
}
