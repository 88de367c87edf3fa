//! Flow filters shared by the CLI and the API (`?ip=&port=&proto=&iface=`).
//!
//! Values are parsed strictly: anything that is not exactly an IP, a CIDR, a port,
//! a protocol name/number or an interface name is rejected with the reason.

use std::{net::IpAddr, str::FromStr};

use crate::{
    error::{Error, Result},
    flows::{is_icmp, FlowRecord},
    k8s::{Endpoint, EndpointKind},
    links::glob_match,
};

/// An address or a network (`10.244.1.0/24`, `fd00::/8`); matches source or destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpFilter {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpFilter {
    pub fn matches(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let shift = 32 - u32::from(self.prefix_len);
                let mask = if shift == 32 { 0 } else { u32::MAX << shift };
                u32::from(net) & mask == u32::from(*ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let shift = 128 - u32::from(self.prefix_len);
                let mask = if shift == 128 { 0 } else { u128::MAX << shift };
                u128::from(net) & mask == u128::from(*ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpFilter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let err = |reason: &str| Error::Filter {
            flag: "--ip",
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            err("expected an IPv4/IPv6 address or CIDR such as 10.244.1.7 or 10.244.0.0/16")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(err(&format!(
                        "prefix length must be a number from 0 to {max}"
                    )))
                }
            },
        };
        Ok(Self { addr, prefix_len })
    }
}

/// A transport protocol by name or IANA number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtoFilter(pub u8);

impl FromStr for ProtoFilter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let n = match s.to_ascii_lowercase().as_str() {
            "tcp" => 6,
            "udp" => 17,
            "icmp" => 1,
            "icmpv6" | "icmp6" => 58,
            "sctp" => 132,
            other => other.parse::<u8>().map_err(|_| Error::Filter {
                flag: "--proto",
                value: s.to_string(),
                reason: "expected tcp, udp, icmp, icmpv6, sctp or a protocol number 0-255".into(),
            })?,
        };
        Ok(Self(n))
    }
}

/// Parses a port for `--port`.
pub fn parse_port(s: &str) -> Result<u16> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::Filter {
            flag: "--port",
            value: s.into(),
            reason: "expected a port number from 1 to 65535".into(),
        }),
    }
}

/// Checks an interface name or glob for `--iface`.
pub fn parse_iface(s: &str) -> Result<String> {
    let err = |reason: &str| Error::Filter {
        flag: "--iface",
        value: s.into(),
        reason: reason.into(),
    };
    if s.is_empty() || s.len() > 15 {
        return Err(err(
            "interface names are 1 to 15 characters (a `*` glob is allowed)",
        ));
    }
    if s.chars().any(|c| c == '/' || c.is_whitespace() || c == ':') {
        return Err(err("interface names cannot contain '/', ':' or whitespace"));
    }
    Ok(s.to_string())
}

/// A namespaced object named `namespace/name` (`--pod`, `--workload`, `--service`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Kubernetes names: lowercase letters, digits, '-' and '.', at most 253 characters.
fn valid_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// Parses `namespace/name` for the object filters.
pub fn parse_object(flag: &'static str, s: &str) -> Result<ObjectName> {
    let err = |reason: &str| Error::Filter {
        flag,
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let Some((ns, name)) = s.split_once('/') else {
        return Err(err("expected NAMESPACE/NAME, such as default/frontend"));
    };
    if !valid_k8s_name(ns) || !valid_k8s_name(name) {
        return Err(err(
            "namespace and name are Kubernetes names: lowercase letters, digits, '-' and '.'",
        ));
    }
    Ok(ObjectName {
        namespace: ns.to_string(),
        name: name.to_string(),
    })
}

/// Checks a namespace for `--namespace`.
pub fn parse_namespace(s: &str) -> Result<String> {
    if valid_k8s_name(s) && !s.contains('.') {
        Ok(s.to_string())
    } else {
        Err(Error::Filter {
            flag: "--namespace",
            value: s.to_string(),
            reason: "namespaces are lowercase letters, digits and '-'".into(),
        })
    }
}

/// All filters: a flow must match every given kind, and any value within a kind.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    pub ips: Vec<IpFilter>,
    pub ports: Vec<u16>,
    pub protos: Vec<ProtoFilter>,
    pub ifaces: Vec<String>,
    /// Flows from or to these pods.
    pub pods: Vec<ObjectName>,
    /// Flows from or to pods or Services of these namespaces.
    pub namespaces: Vec<String>,
    /// Flows from or to pods of these workloads.
    pub workloads: Vec<ObjectName>,
    /// Flows to (or answering for) these Services, before and after the translation.
    pub services: Vec<ObjectName>,
}

impl FlowFilter {
    pub fn matches(&self, f: &FlowRecord) -> bool {
        (self.ips.is_empty()
            || self
                .ips
                .iter()
                .any(|i| i.matches(&f.src) || i.matches(&f.dst)))
            && (self.ports.is_empty()
                || (!is_icmp(f.protocol_number)
                    && self
                        .ports
                        .iter()
                        .any(|p| *p == f.src_port || *p == f.dst_port)))
            && (self.protos.is_empty() || self.protos.iter().any(|p| p.0 == f.protocol_number))
            && (self.ifaces.is_empty()
                || f.hops
                    .iter()
                    .any(|h| self.ifaces.iter().any(|i| glob_match(i, &h.interface))))
            && self.matches_names(f)
    }

    /// Whether any name filter is given (they need the agent's metadata).
    pub fn has_names(&self) -> bool {
        !(self.pods.is_empty()
            && self.namespaces.is_empty()
            && self.workloads.is_empty()
            && self.services.is_empty())
    }

    fn matches_names(&self, f: &FlowRecord) -> bool {
        let ends = || {
            [f.src_endpoint.as_ref(), f.dst_endpoint.as_ref()]
                .into_iter()
                .flatten()
        };
        let is_pod = |e: &Endpoint| e.kind == EndpointKind::Pod;
        (self.pods.is_empty()
            || ends().any(|e| {
                is_pod(e)
                    && self.pods.iter().any(|p| {
                        e.namespace.as_deref() == Some(p.namespace.as_str()) && e.name == p.name
                    })
            }))
            && (self.namespaces.is_empty()
                || ends().any(|e| {
                    e.namespace
                        .as_ref()
                        .is_some_and(|ns| self.namespaces.contains(ns))
                }))
            && (self.workloads.is_empty()
                || ends().any(|e| {
                    is_pod(e)
                        && self.workloads.iter().any(|w| {
                            e.namespace.as_deref() == Some(w.namespace.as_str())
                                && e.workload.as_ref().is_some_and(|x| x.name == w.name)
                        })
                }))
            && (self.services.is_empty()
                || f.service.as_ref().is_some_and(|s| {
                    self.services
                        .iter()
                        .any(|w| s.namespace == w.namespace && s.name == w.name)
                }))
    }

    /// The filter as `/v1/flows` query parameters.
    pub fn to_query(&self) -> String {
        let mut q: Vec<String> = Vec::new();
        let mut add = |k: &str, v: String| q.push(format!("{k}={}", percent_encode(&v)));
        for i in &self.ips {
            add("ip", format!("{}/{}", i.addr, i.prefix_len));
        }
        for p in &self.ports {
            add("port", p.to_string());
        }
        for p in &self.protos {
            add("proto", p.0.to_string());
        }
        for i in &self.ifaces {
            add("iface", i.clone());
        }
        for p in &self.pods {
            add("pod", p.to_string());
        }
        for n in &self.namespaces {
            add("namespace", n.clone());
        }
        for w in &self.workloads {
            add("workload", w.to_string());
        }
        for s in &self.services {
            add("service", s.to_string());
        }
        q.join("&")
    }
}

/// Escapes what is not unreserved in a query value.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::{Direction, HopRecord};

    fn flow(src: &str, dst: &str, proto: u8, sport: u16, dport: u16, iface: &str) -> FlowRecord {
        FlowRecord {
            protocol: crate::flows::protocol_name(proto),
            protocol_number: proto,
            ip_version: 4,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: sport,
            dst_port: dport,
            packets: 1,
            bytes: 1,
            hops: vec![HopRecord {
                interface: iface.into(),
                ifindex: 3,
                direction: Direction::Ingress,
                packets: 1,
                bytes: 1,
                first_seen_unix_ns: 0,
                last_seen_unix_ns: 0,
                tcp_flags: String::new(),
            }],
            src_endpoint: None,
            dst_endpoint: None,
            service: None,
            nat: None,
        }
    }

    #[test]
    fn parses_and_rejects_with_reasons() {
        assert_eq!("10.244.1.7".parse::<IpFilter>().unwrap().prefix_len, 32);
        assert_eq!("fd00::/8".parse::<IpFilter>().unwrap().prefix_len, 8);
        let e = "10.244.1.300".parse::<IpFilter>().unwrap_err().to_string();
        assert!(
            e.contains("--ip `10.244.1.300`") && e.contains("CIDR"),
            "{e}"
        );
        assert!("10.0.0.0/33"
            .parse::<IpFilter>()
            .unwrap_err()
            .to_string()
            .contains("0 to 32"));
        assert!("tcp".parse::<ProtoFilter>().is_ok());
        assert_eq!("47".parse::<ProtoFilter>().unwrap().0, 47);
        assert!("tpc"
            .parse::<ProtoFilter>()
            .unwrap_err()
            .to_string()
            .contains("expected tcp, udp"));
        assert!(parse_port("0").is_err());
        assert!(parse_port("65536")
            .unwrap_err()
            .to_string()
            .contains("1 to 65535"));
        assert!(parse_iface("a/b").is_err());
        assert!(parse_iface("averyveryverylongname").is_err());
    }

    #[test]
    fn matching() {
        let f = flow("10.244.1.10", "10.244.2.11", 17, 40000, 53, "veth1234");
        let mut flt = FlowFilter {
            ips: vec!["10.244.2.0/24".parse().unwrap()],
            ..Default::default()
        };
        assert!(flt.matches(&f));
        flt.ports = vec![53];
        assert!(flt.matches(&f));
        flt.protos = vec!["tcp".parse().unwrap()];
        assert!(!flt.matches(&f));
        flt.protos = vec!["udp".parse().unwrap(), "tcp".parse().unwrap()];
        assert!(flt.matches(&f));
        flt.ifaces = vec!["flannel.1".into()];
        assert!(!flt.matches(&f));
        flt.ifaces = vec!["veth*".into()];
        assert!(flt.matches(&f));
        let v6 = FlowFilter {
            ips: vec!["fd00::/8".parse().unwrap()],
            ..Default::default()
        };
        assert!(!v6.matches(&f));
        let icmp = flow("10.0.0.1", "10.0.0.2", 1, 7, 0x0800, "x");
        assert!(!FlowFilter {
            ports: vec![7],
            ..Default::default()
        }
        .matches(&icmp));
    }
}
