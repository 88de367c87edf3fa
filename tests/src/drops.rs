//! Ground truth for packet drops and retransmissions, read from the kernel rather than from
//! flowtrace: iptables rules that drop what a test sends and count it themselves, the
//! kernel's own numbering of drop reasons (its BTF, through `bpftool`), the network stack's
//! SNMP counters of a namespace (`/proc/net/snmp`, `/proc/net/netstat`), and lookups in the
//! agents' JSON as the API writes it (the drop fields are read from the raw JSON, not through
//! a Rust type that could silently drop them).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::IpAddr,
    process::Command,
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use crate::{agent::API_PORT, netns, Error, Result};

/// An iptables rule `-j DROP` inserted first in a chain of a namespace's `filter` table,
/// recognised by a comment only it carries; deleted when dropped, whatever the test did.
#[derive(Debug)]
pub struct DropRule {
    netns: String,
    chain: String,
    /// The match part of the rule (without the comment and target), as inserted.
    spec: Vec<String>,
    comment: String,
}

impl DropRule {
    /// Inserts `-I <chain> 1 <spec> -m comment --comment <comment> -j DROP` in `netns`.
    /// `comment` must be unique to the caller (e.g. carry the cluster's prefix): the packet
    /// counter is read from the line that shows it.
    pub fn insert(netns_name: &str, chain: &str, spec: &[&str], comment: &str) -> Result<Self> {
        if comment.is_empty() || comment.contains(char::is_whitespace) {
            return Err(Error::Invalid(format!(
                "DropRule comment {comment:?} must be one word, unique to the test"
            )));
        }
        let rule = DropRule {
            netns: netns_name.to_string(),
            chain: chain.to_string(),
            spec: spec.iter().map(|s| s.to_string()).collect(),
            comment: comment.to_string(),
        };
        netns::exec(netns_name, &rule.argv("-I"))?;
        Ok(rule)
    }

    /// `iptables -w <op> <chain> [1] <spec> -m comment --comment C -j DROP`.
    fn argv(&self, op: &str) -> Vec<String> {
        let mut argv: Vec<String> = ["iptables", "-w", op, &self.chain]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if op == "-I" {
            argv.push("1".into());
        }
        argv.extend(self.spec.iter().cloned());
        argv.extend(
            ["-m", "comment", "--comment", &self.comment, "-j", "DROP"]
                .iter()
                .map(|s| s.to_string()),
        );
        argv
    }

    /// The packets the rule has dropped, by its own counter (`iptables -L -v -x`).
    pub fn packets(&self) -> Result<u64> {
        let argv = ["iptables", "-w", "-L", &self.chain, "-v", "-x", "-n"];
        let out = netns::exec(&self.netns, &argv)?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        parse_rule_packets(&text, &self.comment).ok_or_else(|| Error::Parse {
            cmd: format!("ip netns exec {} {}", self.netns, argv.join(" ")),
            detail: format!("no rule with comment {:?} in:\n{text}", self.comment),
        })
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        if let Err(e) = netns::exec(&self.netns, &self.argv("-D")) {
            eprintln!(
                "flowtrace-tests: could not delete the DROP rule {:?} in {} (it goes with the \
                 namespace): {e}",
                self.comment, self.netns
            );
        }
    }
}

/// The packet counter (first column) of the `iptables -L -v -x -n` line showing
/// `/* comment */`.
fn parse_rule_packets(listing: &str, comment: &str) -> Option<u64> {
    let tag = format!("/* {comment} */");
    listing
        .lines()
        .find(|l| l.contains(&tag))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
}

/// The kernel's `enum skb_drop_reason`, name (without the `SKB_DROP_REASON_` prefix) to
/// value, read from its BTF (`bpftool btf dump file /sys/kernel/btf/vmlinux`): what the
/// `reason_code` of a drop must be on this kernel.
pub fn drop_reason_codes() -> Result<BTreeMap<String, u32>> {
    let argv = ["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"];
    let cmd = argv.join(" ");
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|source| Error::Spawn {
            cmd: format!("{cmd} (install bpftool with `bash scripts/setup.sh`)"),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let codes = parse_drop_reasons(&String::from_utf8_lossy(&out.stdout));
    if codes.is_empty() {
        return Err(Error::Parse {
            cmd,
            detail: "no ENUM 'skb_drop_reason' in the kernel's BTF".into(),
        });
    }
    Ok(codes)
}

/// The value of drop reason `name` (e.g. `NETFILTER_DROP`) on this kernel.
pub fn drop_reason_code(name: &str) -> Result<u32> {
    drop_reason_codes()?.get(name).copied().ok_or_else(|| {
        Error::Invalid(format!(
            "this kernel's enum skb_drop_reason has no SKB_DROP_REASON_{name}"
        ))
    })
}

/// The members of `ENUM 'skb_drop_reason'` in `bpftool btf dump` raw output: a header line
/// `[id] ENUM 'skb_drop_reason' ... vlen=N` followed by N lines `\t'NAME' val=V`.
fn parse_drop_reasons(dump: &str) -> BTreeMap<String, u32> {
    let mut lines = dump.lines();
    let mut codes = BTreeMap::new();
    if lines
        .by_ref()
        .any(|l| l.contains("ENUM 'skb_drop_reason' "))
    {
        for l in lines.take_while(|l| l.starts_with('\t')) {
            let mut parts = l.trim().split(" val=");
            let (Some(name), Some(val)) = (parts.next(), parts.next()) else {
                continue;
            };
            let name = name.trim_matches('\'');
            let (Some(name), Ok(val)) = (name.strip_prefix("SKB_DROP_REASON_"), val.parse()) else {
                continue;
            };
            codes.insert(name.to_string(), val);
        }
    }
    codes
}

/// Counter `field` of group `group` (e.g. `Udp` / `NoPorts`, `IpExt` / `InNoRoutes`) of the
/// network stack in namespace `netns_name`, from `/proc/net/snmp` and `/proc/net/netstat`
/// (read inside it: /proc/net is the reader's namespace).
pub fn net_counter(netns_name: &str, group: &str, field: &str) -> Result<u64> {
    let argv = ["cat", "/proc/net/snmp", "/proc/net/netstat"];
    let out = netns::exec(netns_name, &argv)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_net_counter(&text, group, field).ok_or_else(|| Error::Parse {
        cmd: format!("ip netns exec {netns_name} {}", argv.join(" ")),
        detail: format!("no counter {group}: {field}"),
    })
}

/// In the SNMP tables each group is two lines, `Group: names...` then `Group: values...`.
fn parse_net_counter(text: &str, group: &str, field: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (rows.next(), rows.next()) {
        let at = names.split_whitespace().position(|n| n == field);
        if let Some(at) = at {
            return values.split_whitespace().nth(at)?.parse().ok();
        }
    }
    None
}

/// A 5-tuple as the API writes it (`protocol_number`, `src`, `src_port`, `dst`, `dst_port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonTuple {
    pub protocol: u8,
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

impl JsonTuple {
    /// Whether `v` (a flow, a drop or retransmission entry) carries this tuple at its top
    /// level, or in `tuple` (a trace line), with the protocol as `protocol_number` or
    /// `protocol`.
    pub fn matches(&self, v: &Value) -> bool {
        let t = v.get("tuple").unwrap_or(v);
        let num = |k: &str| t.get(k).and_then(Value::as_u64);
        let ip = |k: &str| {
            t.get(k)
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<IpAddr>().ok())
        };
        let proto = num("protocol_number").or_else(|| num("protocol"));
        proto == Some(u64::from(self.protocol))
            && ip("src") == Some(self.src)
            && ip("dst") == Some(self.dst)
            && num("src_port") == Some(u64::from(self.src_port))
            && num("dst_port") == Some(u64::from(self.dst_port))
    }
}

impl std::fmt::Display for JsonTuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "proto {} {}:{} -> {}:{}",
            self.protocol, self.src, self.src_port, self.dst, self.dst_port
        )
    }
}

/// `v[key]` as u64, 0 when absent (the API leaves zero counters out).
pub fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// The lines of a streaming route (`/v1/trace?...`) of the agent in `netns_name`, each as it
/// arrives. The connection is opened inside the namespace and read on a thread of its own,
/// which ends when the agent closes the stream, after 30 s without a line, or once the
/// receiver is dropped (the agent sends a keep-alive line every 2 s, so that is noticed).
pub fn stream_lines(netns_name: &str, path: &str) -> Result<mpsc::Receiver<String>> {
    let url = format!("http://127.0.0.1:{API_PORT}{path}");
    let u = url.clone();
    let response = crate::in_netns(netns_name, move || {
        ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            // Keep-alive lines come every 2 s: silence this long is a wedged agent.
            .timeout_read(Duration::from_secs(30))
            .build()
            .get(&u)
            .call()
            .map_err(|e| e.to_string())
    })?
    .map_err(|e| Error::Invalid(format!("GET {url} in {netns_name}: {e}")))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(response.into_reader())
            .lines()
            .map_while(std::result::Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // the workspace lint targets production code
mod tests {
    use super::*;

    #[test]
    fn the_rule_counter_is_read_from_the_line_with_the_comment() {
        let listing = "Chain FORWARD (policy ACCEPT 0 packets, 0 bytes)
    pkts      bytes target     prot opt in     out     source               destination
       5      460 DROP       17   --  *      *       0.0.0.0/0            0.0.0.0/0            udp dpt:47001 /* ft1x0-drop */
      12     1000 ACCEPT     0    --  *      *       0.0.0.0/0            0.0.0.0/0            /* other */
";
        assert_eq!(parse_rule_packets(listing, "ft1x0-drop"), Some(5));
        assert_eq!(parse_rule_packets(listing, "other"), Some(12));
        assert_eq!(parse_rule_packets(listing, "ft1x0"), None);
    }

    #[test]
    fn drop_reasons_are_read_from_the_btf_enum() {
        let dump = "[12210] ENUM 'other' encoding=UNSIGNED size=4 vlen=1
\t'SKB_DROP_REASON_NOT_THIS' val=7
[12211] ENUM 'skb_drop_reason' encoding=UNSIGNED size=4 vlen=4
\t'SKB_NOT_DROPPED_YET' val=0
\t'SKB_DROP_REASON_NO_SOCKET' val=3
\t'SKB_DROP_REASON_NETFILTER_DROP' val=12
\t'SKB_DROP_REASON_IP_INNOROUTES' val=88
[12212] STRUCT 'x' size=4 vlen=1
\t'SKB_DROP_REASON_NOPE' val=1
";
        let codes = parse_drop_reasons(dump);
        assert_eq!(codes.len(), 3, "{codes:?}");
        assert_eq!(codes["NETFILTER_DROP"], 12);
        assert_eq!(codes["NO_SOCKET"], 3);
        assert_eq!(codes["IP_INNOROUTES"], 88);
    }

    #[test]
    fn snmp_counters_are_found_by_group_and_name() {
        let text = "Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 10
Udp: InDatagrams NoPorts InErrors RcvbufErrors
Udp: 4 50 7 7
TcpExt: SyncookiesSent
TcpExt: 0
IpExt: InNoRoutes InTruncatedPkts
IpExt: 25 0
";
        assert_eq!(parse_net_counter(text, "Udp", "NoPorts"), Some(50));
        assert_eq!(parse_net_counter(text, "Udp", "RcvbufErrors"), Some(7));
        assert_eq!(parse_net_counter(text, "IpExt", "InNoRoutes"), Some(25));
        assert_eq!(parse_net_counter(text, "Ip", "InReceives"), Some(10));
        assert_eq!(parse_net_counter(text, "Udp", "Nope"), None);
    }

    #[test]
    fn tuples_match_flows_and_trace_lines() {
        let t = JsonTuple {
            protocol: 17,
            src: "10.244.1.10".parse().unwrap(),
            src_port: 4000,
            dst: "10.244.2.11".parse().unwrap(),
            dst_port: 47101,
        };
        let flow: Value = serde_json::from_str(
            r#"{"protocol":"udp","protocol_number":17,"src":"10.244.1.10","src_port":4000,
                "dst":"10.244.2.11","dst_port":47101}"#,
        )
        .unwrap();
        let line: Value = serde_json::from_str(
            r#"{"kind":"drop","tuple":{"protocol":17,"src":"10.244.1.10","src_port":4000,
                "dst":"10.244.2.11","dst_port":47101}}"#,
        )
        .unwrap();
        assert!(t.matches(&flow));
        assert!(t.matches(&line));
        assert!(!JsonTuple { dst_port: 1, ..t }.matches(&flow));
        assert_eq!(count(&flow, "src_port"), 4000);
        assert_eq!(count(&flow, "dropped"), 0);
    }
}
