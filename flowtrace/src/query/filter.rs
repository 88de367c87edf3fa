//! Flow filters shared by the CLI and the API (`?ip=&port=&proto=&iface=&pod=...`), matched
//! against a [`Subject`]: one tuple as the namer (`crate::enrich`) named it, whichever view
//! (flow table, live trace) it comes from.
//!
//! Values are parsed strictly: anything that is not exactly an IP, a CIDR, a port,
//! a protocol name/number or an interface name is rejected with the reason.

use std::str::FromStr;

pub use crate::model::IpFilter;
use crate::{
    error::{Error, Result},
    model::{is_icmp, Endpoint, EndpointKind, FlowRecord, FlowTuple, ServiceRef},
    util::glob_match,
};

/// What a filter is matched against: one tuple, its names and the interfaces it crossed.
pub struct Subject<'a> {
    pub tuple: FlowTuple,
    pub src: Option<&'a Endpoint>,
    pub dst: Option<&'a Endpoint>,
    pub service: Option<&'a ServiceRef>,
    pub interfaces: &'a [&'a str],
    /// Services whose backends are this tuple's ends (`namespace/name`), for a Service
    /// filter on the backend's node, where the translation happened on the client's node
    /// and only the backend address is seen. Only filled when the filter names Services
    /// and `service` is `None` (see [`FlowFilter::needs_backends`]).
    pub backed_services: &'a [String],
}

impl<'a> Subject<'a> {
    /// A flow record as the API serves it (the CLI's and the relay's view).
    pub fn of_record(f: &'a FlowRecord, interfaces: &'a [&'a str]) -> Self {
        Self {
            tuple: f.tuple(),
            src: f.src_endpoint.as_ref(),
            dst: f.dst_endpoint.as_ref(),
            service: f.service.as_ref(),
            interfaces,
            backed_services: &[],
        }
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
    /// No filter given: everything passes.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
            && self.ports.is_empty()
            && self.protos.is_empty()
            && self.ifaces.is_empty()
            && self.pods.is_empty()
            && self.namespaces.is_empty()
            && self.workloads.is_empty()
            && self.services.is_empty()
    }

    /// Whether a flow record passes (its interfaces are its hops').
    pub fn matches(&self, f: &FlowRecord) -> bool {
        let interfaces: Vec<&str> = f.hops.iter().map(|h| h.interface.as_str()).collect();
        self.matches_subject(&Subject::of_record(f, &interfaces))
    }

    pub fn matches_subject(&self, f: &Subject<'_>) -> bool {
        let t = &f.tuple;
        (self.ips.is_empty()
            || self
                .ips
                .iter()
                .any(|i| i.matches(&t.src) || i.matches(&t.dst)))
            && (self.ports.is_empty()
                || (!is_icmp(t.protocol)
                    && self
                        .ports
                        .iter()
                        .any(|p| *p == t.src_port || *p == t.dst_port)))
            && (self.protos.is_empty() || self.protos.iter().any(|p| p.0 == t.protocol))
            && (self.ifaces.is_empty()
                || f.interfaces
                    .iter()
                    .any(|h| self.ifaces.iter().any(|i| glob_match(i, h))))
            && self.matches_names(f)
    }

    /// Whether any name filter is given (they need the agent's metadata).
    pub fn has_names(&self) -> bool {
        !(self.pods.is_empty()
            && self.namespaces.is_empty()
            && self.workloads.is_empty()
            && self.services.is_empty())
    }

    /// Whether a subject without a Service needs `backed_services` filled in.
    pub fn needs_backends(&self) -> bool {
        !self.services.is_empty()
    }

    fn matches_names(&self, f: &Subject<'_>) -> bool {
        let ends = || [f.src, f.dst].into_iter().flatten();
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
                || match f.service {
                    Some(s) => self
                        .services
                        .iter()
                        .any(|w| s.namespace == w.namespace && s.name == w.name),
                    None => self
                        .services
                        .iter()
                        .any(|w| f.backed_services.contains(&w.to_string())),
                })
    }

    /// Parses `/v1/flows` and `/v1/trace` query parameters: `ip`, `port`, `proto`, `iface`,
    /// `pod`, `namespace`, `workload`, `service`, each repeatable and comma-separated.
    /// Anything else is an error rather than silently unfiltered output.
    pub fn from_query(query: &str) -> Result<FlowFilter> {
        let mut f = FlowFilter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            for v in value.split(',').filter(|v| !v.is_empty()) {
                match key {
                    "ip" => f.ips.push(v.parse()?),
                    "port" => f.ports.push(parse_port(v)?),
                    "proto" => f.protos.push(v.parse()?),
                    "iface" => f.ifaces.push(parse_iface(v)?),
                    "pod" => f.pods.push(parse_object("--pod", v)?),
                    "namespace" => f.namespaces.push(parse_namespace(v)?),
                    "workload" => f.workloads.push(parse_object("--workload", v)?),
                    "service" => f.services.push(parse_object("--service", v)?),
                    other => {
                        return Err(Error::Filter {
                            flag: "query parameter",
                            value: other.to_string(),
                            reason: "unknown; use ip, port, proto, iface, pod, namespace, workload or service".into(),
                        })
                    }
                }
            }
        }
        Ok(f)
    }

    /// The filter as `/v1/flows` query parameters.
    pub fn to_query_with_limit(&self, limit: usize) -> String {
        let q = self.to_query();
        if q.is_empty() {
            format!("limit={limit}")
        } else {
            format!("{q}&limit={limit}")
        }
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
pub fn percent_encode(s: &str) -> String {
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

/// Decodes `%XX` escapes and `+` (filter values are ASCII: addresses, numbers, names, globs).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{protocol_name, Direction, HopRecord};

    fn flow(src: &str, dst: &str, proto: u8, sport: u16, dport: u16, iface: &str) -> FlowRecord {
        FlowRecord {
            protocol: protocol_name(proto),
            protocol_number: proto,
            ip_version: 4,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: sport,
            dst_port: dport,
            packets: 1,
            bytes: 1,
            payload_bytes: 0,
            hops: vec![HopRecord {
                interface: iface.into(),
                ifindex: 3,
                direction: Direction::Ingress,
                packets: 1,
                bytes: 1,
                payload_bytes: 0,
                first_seen_unix_ns: 0,
                last_seen_unix_ns: 0,
                tcp_flags: String::new(),
                dropped_after: 0,
            }],
            src_endpoint: None,
            dst_endpoint: None,
            service: None,
            nat: None,
            src_peer: None,
            dst_peer: None,
            drops: Vec::new(),
            dropped: 0,
            retransmits: 0,
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

    #[test]
    fn query_parameters_repeat_split_and_reject_unknown_keys() {
        let f =
            FlowFilter::from_query("ip=10.0.0.0%2F8&ip=fd00::1&port=53,80&proto=udp&iface=veth*")
                .unwrap();
        assert_eq!(f.ips.len(), 2);
        assert_eq!(f.ips[0].prefix_len, 8);
        assert_eq!(f.ports, vec![53, 80]);
        assert_eq!(f.protos.len(), 1);
        assert_eq!(f.ifaces, vec!["veth*".to_string()]);
        let e = FlowFilter::from_query("protocol=tcp")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown; use ip, port, proto, iface"), "{e}");
        let f =
            FlowFilter::from_query("pod=default%2Fpod-a&namespace=kube-system&service=default/web")
                .unwrap();
        assert_eq!(f.pods[0].to_string(), "default/pod-a");
        assert_eq!(f.namespaces, vec!["kube-system".to_string()]);
        assert_eq!(f.services[0].name, "web");
        assert!(FlowFilter::from_query("pod=pod-a")
            .unwrap_err()
            .to_string()
            .contains("NAMESPACE/NAME"));
        // What the CLI sends is what the API reads.
        assert_eq!(
            FlowFilter::from_query(&f.to_query()).unwrap().to_query(),
            f.to_query()
        );
        assert!(FlowFilter::from_query("port=0").is_err());
        assert!(FlowFilter::from_query("").unwrap().ips.is_empty());
    }
}

/// Flows one answer returns unless the client asks otherwise (`limit=`).
pub const DEFAULT_FLOW_LIMIT: usize = 10_000;
/// Most flows one answer returns (the agent's default table size).
pub const MAX_FLOW_LIMIT: usize = 100_000;

/// A `/v1/flows` request: the filter and how many flows at most (the largest first).
#[derive(Clone, Debug)]
pub struct FlowQuery {
    pub filter: FlowFilter,
    pub limit: usize,
}

impl FlowQuery {
    /// Parses `limit=N` and the filter's parameters.
    pub fn from_query(query: &str) -> Result<FlowQuery> {
        let mut limit = DEFAULT_FLOW_LIMIT;
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("limit", v)) => {
                    limit = match v.parse::<usize>() {
                        Ok(n) if (1..=MAX_FLOW_LIMIT).contains(&n) => n,
                        _ => {
                            return Err(Error::Filter {
                                flag: "limit",
                                value: v.to_string(),
                                reason: format!("not a number of flows from 1 to {MAX_FLOW_LIMIT}"),
                            })
                        }
                    }
                }
                _ => rest.push(pair),
            }
        }
        Ok(FlowQuery {
            filter: FlowFilter::from_query(&rest.join("&"))?,
            limit,
        })
    }
}
