//! kube-proxy (iptables mode) emulation: the `nat` table chains kube-proxy writes for a Service,
//! with the same chain names, structure and marks, so flowtrace sees the same DNAT/SNAT steps and
//! conntrack entries as on a real node.
//!
//! The rules are rendered as an `iptables-restore --noflush` script and loaded in one go into each
//! node namespace (as kube-proxy itself does).

use std::net::Ipv4Addr;

use crate::{netns, Result};

/// kube-proxy's masquerade mark bit (`--masquerade-bit=14`).
pub const MASQ_MARK: &str = "0x4000";

/// L4 protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Lower-case name as iptables spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (`http`, `dns`), part of kube-proxy's chain hash input and comments.
    pub name: String,
    /// L4 protocol.
    pub protocol: Protocol,
    /// Port on the ClusterIP.
    pub port: u16,
    /// Port on the endpoint pods.
    pub target_port: u16,
    /// NodePort, if the Service is exposed as one on this port.
    pub node_port: Option<u16>,
}

/// One backend pod of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod name (`pod-b`).
    pub pod: String,
    /// Node name (`node1`).
    pub node: String,
    /// Pod IPv4 address.
    pub ip: Ipv4Addr,
}

/// What the Kubernetes API would say about the Service (`spec` + EndpointSlice), so tests can
/// assert that flowtrace resolved the names right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// Kubernetes namespace of the Service.
    pub namespace: String,
    /// Virtual IP (`spec.clusterIP`).
    pub cluster_ip: Ipv4Addr,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Ready endpoints, in the order kube-proxy's probability rules visit them.
    pub endpoints: Vec<Endpoint>,
}

impl ServiceSpec {
    /// The test bed's demo Service: `default/svc-demo`, ClusterIP 10.96.0.10, 80/TCP (NodePort
    /// 30080) and 53/UDP, both to targetPort 8080 on `endpoints`.
    pub fn demo(endpoints: Vec<Endpoint>) -> Self {
        Self {
            name: "svc-demo".into(),
            namespace: "default".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: 8080,
                    node_port: Some(30080),
                },
                ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    target_port: 8080,
                    node_port: None,
                },
            ],
            endpoints,
        }
    }

    /// `namespace/name:port` — kube-proxy's ServicePortName, used in comments and hashes.
    pub fn port_name(&self, port: &ServicePort) -> String {
        format!("{}/{}:{}", self.namespace, self.name, port.name)
    }

    /// `KUBE-SVC-<hash>` for one port.
    pub fn svc_chain(&self, port: &ServicePort) -> String {
        format!(
            "KUBE-SVC-{}",
            chain_hash(&format!(
                "{}{}",
                self.port_name(port),
                port.protocol.as_str()
            ))
        )
    }

    /// `KUBE-SEP-<hash>` for one port and endpoint.
    pub fn sep_chain(&self, port: &ServicePort, ep: &Endpoint) -> String {
        format!(
            "KUBE-SEP-{}",
            chain_hash(&format!(
                "{}{}{}:{}",
                self.port_name(port),
                port.protocol.as_str(),
                ep.ip,
                port.target_port
            ))
        )
    }

    /// The `iptables-restore --noflush` script kube-proxy's iptables mode would produce for this
    /// Service (the `nat` table only; the filter table is left alone because flowtrace only needs
    /// the translations).
    pub fn iptables_restore_script(&self) -> String {
        nat_script(std::slice::from_ref(self))
    }

    /// This Service's chains and rules (every port, every endpoint), without the chains all
    /// Services share.
    fn rules(&self, chains: &mut Vec<String>, lines: &mut Vec<String>) {
        for p in &self.ports {
            chains.push(self.svc_chain(p));
            chains.extend(self.endpoints.iter().map(|e| self.sep_chain(p, e)));
        }
        let vip = self.cluster_ip;
        for p in &self.ports {
            let (proto, port, pn, svc) = (
                p.protocol.as_str(),
                p.port,
                self.port_name(p),
                self.svc_chain(p),
            );
            lines.push(format!(
                r#"-A KUBE-SERVICES -d {vip}/32 -p {proto} -m comment --comment "{pn} cluster IP" -m {proto} --dport {port} -j {svc}"#
            ));
            if let Some(np) = p.node_port {
                for target in ["KUBE-MARK-MASQ", svc.as_str()] {
                    lines.push(format!(
                        r#"-A KUBE-NODEPORTS -p {proto} -m comment --comment "{pn}" -m {proto} --dport {np} -j {target}"#
                    ));
                }
            }
            // Traffic to the ClusterIP from outside the pod CIDR (e.g. from a node itself) is
            // masqueraded so replies come back through this node.
            lines.push(format!(
                r#"-A {svc} ! -s {POD_CIDR} -d {vip}/32 -p {proto} -m comment --comment "{pn} cluster IP" -m {proto} --dport {port} -j KUBE-MARK-MASQ"#
            ));
            let n = self.endpoints.len();
            for (i, ep) in self.endpoints.iter().enumerate() {
                let sep = self.sep_chain(p, ep);
                let target = format!("{}:{}", ep.ip, p.target_port);
                let remaining = n - i;
                lines.push(if remaining > 1 {
                    // kube-proxy picks endpoint i with probability 1/(n-i) among those left, which
                    // gives every endpoint the same overall share.
                    format!(
                        r#"-A {svc} -m comment --comment "{pn} -> {target}" -m statistic --mode random --probability {:.11} -j {sep}"#,
                        1.0 / remaining as f64
                    )
                } else {
                    format!(r#"-A {svc} -m comment --comment "{pn} -> {target}" -j {sep}"#)
                });
                // Hairpin: a pod reaching itself through the VIP must be SNATed, or its reply
                // would go straight back to it and bypass conntrack's un-DNAT.
                lines.push(format!(
                    r#"-A {sep} -s {}/32 -m comment --comment "{pn}" -j KUBE-MARK-MASQ"#,
                    ep.ip
                ));
                lines.push(format!(
                    r#"-A {sep} -p {proto} -m comment --comment "{pn}" -m {proto} -j DNAT --to-destination {target}"#
                ));
            }
        }
    }

    /// Loads [`Self::iptables_restore_script`] into the `nat` table of `netns`.
    pub fn install(&self, netns_name: &str) -> Result<()> {
        netns::exec_with_stdin(
            netns_name,
            &["iptables-restore", "--noflush"],
            &self.iptables_restore_script(),
        )
        .map(drop)
    }
}

/// The `nat` table kube-proxy's iptables mode writes for `services`: the shared chains and
/// jumps once, then each Service's rules, the NodePort catch-all last.
pub fn nat_script(services: &[ServiceSpec]) -> String {
    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-NODEPORTS".to_string(),
        "KUBE-POSTROUTING".to_string(),
        "KUBE-MARK-MASQ".to_string(),
    ];
    let mut rules = Vec::new();
    for s in services {
        s.rules(&mut chains, &mut rules);
    }
    let mut lines = vec!["*nat".to_string()];
    lines.extend(chains.iter().map(|c| format!(":{c} - [0:0]")));
    lines.extend([
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.to_string(),
        r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.to_string(),
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#
            .to_string(),
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
        // The xor clears the bit so a packet re-entering the stack (e.g. after VXLAN encap) is
        // not masqueraded twice.
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"),
        r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE"#
            .to_string(),
    ]);
    lines.extend(rules);
    // Must stay last: NodePorts match any local destination address.
    lines.push(
        r#"-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"#
            .to_string(),
    );
    lines.push("COMMIT".to_string());
    let mut script = lines.join("\n");
    script.push('\n');
    script
}

/// Replaces the `nat` table of `netns` with kube-proxy's rules for `services` (as kube-proxy
/// does on each sync: the whole table, so Services installed before do not linger).
pub fn install_all(services: &[ServiceSpec], netns_name: &str) -> Result<()> {
    netns::exec_with_stdin(netns_name, &["iptables-restore"], &nat_script(services)).map(drop)
}

/// The cluster's pod CIDR (all nodes' /24s), as kube-proxy's `--cluster-cidr`.
pub const POD_CIDR: &str = "10.244.0.0/16";

/// A stable 16-character upper-case chain suffix, like kube-proxy's (which base32-encodes a
/// SHA-256). We use two FNV-1a-64 hashes instead: only stability and the shape matter here.
pub fn chain_hash(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        input.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    // 16 base32 digits need 80 bits: take 64 from one hash and 16 from a second, differently seeded.
    let mut bits = u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 16
        | u128::from(fnv(0x1234_5678_9abc_def1) & 0xffff);
    let mut out = [0u8; 16];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(bits & 31) as usize];
        bits >>= 5;
    }
    out.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec::demo(vec![
            Endpoint {
                pod: "pod-b".into(),
                node: "node1".into(),
                ip: Ipv4Addr::new(10, 244, 1, 11),
            },
            Endpoint {
                pod: "pod-b".into(),
                node: "node2".into(),
                ip: Ipv4Addr::new(10, 244, 2, 11),
            },
        ])
    }

    #[test]
    fn hash_is_stable_and_shaped_like_kube_proxy() {
        let h = chain_hash("default/svc-demo:httptcp");
        assert_eq!(h, chain_hash("default/svc-demo:httptcp"));
        assert_eq!(h.len(), 16);
        assert!(h
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()));
        assert_ne!(h, chain_hash("default/svc-demo:dnsudp"));
    }

    #[test]
    fn script_has_kube_proxy_structure() {
        let s = spec();
        let script = s.iptables_restore_script();
        let http = &s.ports[0];
        let svc = s.svc_chain(http);
        let sep_a = s.sep_chain(http, &s.endpoints[0]);
        let sep_b = s.sep_chain(http, &s.endpoints[1]);
        assert!(script.contains(&format!("--probability 0.50000000000 -j {sep_a}")));
        assert!(script.contains(&format!("-j {sep_b}\n")));
        assert!(script.contains(&format!("-A {sep_a} -s 10.244.1.11/32")));
        assert!(script.contains("-j DNAT --to-destination 10.244.2.11:8080"));
        assert!(script.contains(&format!("--dport 30080 -j {svc}")));
        assert!(script.trim_end().ends_with("COMMIT"));
        // The nodeport catch-all must be the last KUBE-SERVICES rule.
        let last_services = script.lines().rfind(|l| l.starts_with("-A KUBE-SERVICES"));
        assert!(last_services.is_some_and(|l| l.contains("KUBE-NODEPORTS")));
    }
}
