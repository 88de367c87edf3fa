//! The client commands: `flowtrace flows` (the local agent's flow table), `flowtrace path`
//! (hops and latency between two ends, joined over one or more agents),
//! `flowtrace trace` (live packets, hook by hook; in `cli::trace`) and `flowtrace map` (the
//! application's map; in `cli::map`).

use std::{error::Error as _, fmt::Write as _};

pub mod map;
pub mod trace;

use crate::{
    error::{Error, Result},
    model::{
        is_icmp,
        wire::{FlowsResponse, MissingNode, RelayFlowsResponse},
        Direction, FlowRecord,
    },
    query::filter::FlowFilter,
};

/// Fetches `/v1/flows` from the agent at `base` (e.g. `http://127.0.0.1:9650`); the agent
/// applies `filter` (it alone can tell whether a named object exists).
pub fn fetch_flows(base: &str, filter: &FlowFilter) -> Result<FlowsResponse> {
    let query = filter.to_query();
    if query.is_empty() {
        get_json(base, "/v1/flows")
    } else {
        get_json(base, &format!("/v1/flows?{query}"))
    }
}

/// GETs `path` from the agent at `base` and decodes its JSON body.
pub fn get_json<T: serde::de::DeserializeOwned>(base: &str, path: &str) -> Result<T> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let resp = call(
        &url,
        ureq::get(&url).timeout(std::time::Duration::from_secs(10)),
    )?;
    resp.into_json::<T>().map_err(|e| Error::AgentResponse {
        url,
        detail: e.to_string(),
    })
}

/// Sends the request; the agent's own errors (JSON `{"error": ...}`) and transport
/// failures become errors naming the URL.
fn call(url: &str, req: ureq::Request) -> Result<ureq::Response> {
    let url = url.to_string();
    match req.call() {
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            // The agent's own errors are JSON {"error": "..."}; show just the message.
            let body = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or(body);
            Err(Error::AgentError {
                url,
                status: code,
                body,
            })
        }
        Err(ureq::Error::Transport(t)) => {
            let mut detail = t
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| t.kind().to_string());
            if let Some(src) = t.source() {
                detail = format!("{detail}: {src}");
            }
            Err(Error::AgentUnreachable { url, detail })
        }
        Ok(r) => Ok(r),
    }
}

/// `ns/pod:port` (or `svc:ns/name`, `node:name`) when the address is named, the address
/// otherwise.
fn named_endpoint(
    name: Option<&crate::model::Endpoint>,
    addr: &std::net::IpAddr,
    port: u16,
    protocol: u8,
) -> String {
    use crate::model::EndpointKind;
    let Some(e) = name else {
        return endpoint(addr, port, protocol);
    };
    let who = match (e.kind, &e.namespace) {
        (EndpointKind::Pod, Some(ns)) => format!("{ns}/{}", e.name),
        (EndpointKind::Service, Some(ns)) => format!("svc:{ns}/{}", e.name),
        (EndpointKind::Node, _) => format!("node:{}", e.name),
        _ => return endpoint(addr, port, protocol),
    };
    if is_icmp(protocol) {
        who
    } else {
        format!("{who}:{port}")
    }
}

fn endpoint(addr: &std::net::IpAddr, port: u16, protocol: u8) -> String {
    let host = match addr {
        std::net::IpAddr::V6(a) => format!("[{a}]"),
        std::net::IpAddr::V4(a) => a.to_string(),
    };
    if is_icmp(protocol) {
        host
    } else {
        format!("{host}:{port}")
    }
}

fn hops_column(f: &FlowRecord) -> String {
    f.hops
        .iter()
        .map(|h| {
            let dir = if h.direction == Direction::Ingress {
                "in"
            } else {
                "out"
            };
            format!("{}/{}", h.interface, dir)
        })
        .collect::<Vec<_>>()
        .join(" > ")
}

/// Renders flows as a human-readable table.
/// The NAT step of a flow: `=> endpoint` (what this flow became) on the original side,
/// `<= endpoint` (what it was) on the translated side; the state unless confirmed.
fn nat_column(f: &FlowRecord) -> String {
    let Some(t) = &f.nat else {
        return "-".into();
    };
    let is_original = t.original.src == f.src
        && t.original.dst == f.dst
        && t.original.src_port == f.src_port
        && t.original.dst_port == f.dst_port;
    let (arrow, other) = if is_original {
        ("=>", &t.translated)
    } else {
        ("<=", &t.original)
    };
    let svc = t
        .service
        .as_ref()
        .map(|s| format!("svc:{s} "))
        .unwrap_or_default();
    let p = f.protocol_number;
    let changed = match t.rewrote.as_str() {
        "src" => endpoint(&other.src, other.src_port, p),
        "src+dst" => format!(
            "{} > {}",
            endpoint(&other.src, other.src_port, p),
            endpoint(&other.dst, other.dst_port, p)
        ),
        _ => endpoint(&other.dst, other.dst_port, p),
    };
    let state = serde_json::to_value(t.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    if state == "confirmed" {
        format!("{svc}{arrow} {changed}")
    } else {
        format!("{svc}{arrow} {changed} ({state})")
    }
}

pub fn render_table(node: &str, flows: &[FlowRecord]) -> String {
    let flows: Vec<(&str, &FlowRecord)> = flows.iter().map(|f| (node, f)).collect();
    table(
        &format!("node {node}: {} flow(s)", flows.len()),
        &flows,
        false,
    )
}

/// The flows table under `title`, with a NODE column first when `with_node`.
fn table(title: &str, flows: &[(&str, &FlowRecord)], with_node: bool) -> String {
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|(node, f)| {
            let proto = if is_icmp(f.protocol_number) {
                format!("{} {}/{}", f.protocol, f.dst_port >> 8, f.dst_port & 0xff)
            } else {
                f.protocol.clone()
            };
            let mut row = if with_node {
                vec![node.to_string()]
            } else {
                Vec::new()
            };
            row.extend([
                proto,
                named_endpoint(
                    f.src_endpoint.as_ref(),
                    &f.src,
                    f.src_port,
                    f.protocol_number,
                ),
                named_endpoint(
                    f.dst_endpoint.as_ref(),
                    &f.dst,
                    f.dst_port,
                    f.protocol_number,
                ),
                f.packets.to_string(),
                f.bytes.to_string(),
                drops_column(f),
                nat_column(f),
                hops_column(f),
            ]);
            row
        })
        .collect();
    let mut headers: Vec<&str> = if with_node { vec!["NODE"] } else { Vec::new() };
    headers.extend([
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "PACKETS",
        "BYTES",
        "DROPS",
        "NAT",
        "HOPS (first seen first)",
    ]);
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        l
    };
    let _ = writeln!(out, "{}", line(&headers));
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    out
}

/// What died of a flow and why, and its retransmissions: `3 NETFILTER_DROP@flannel.1`,
/// `5 SOCKET_RCVBUFF@pod(veth1a2b)`, `7 retx`; `-` for none.
fn drops_column(f: &FlowRecord) -> String {
    let mut parts: Vec<String> = f
        .drops
        .iter()
        .map(|d| {
            let at = match (&d.pod_veth, d.device.as_str()) {
                (Some(v), _) => format!("@pod({v})"),
                (None, "") => String::new(),
                (None, dev) => format!("@{dev}"),
            };
            format!("{} {}{at}", d.packets, d.reason)
        })
        .collect();
    if f.retransmits > 0 {
        parts.push(format!("{} retx", f.retransmits));
    }
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(", ")
    }
}

/// `flowtrace flows --relay`: every node's flows with a NODE column, and a warning line per
/// node missing from the answer (on `warn`, stderr for the binary).
pub fn relay_flows(
    relay: &str,
    filter: &FlowFilter,
    json: bool,
    warn: &mut dyn std::io::Write,
) -> Result<String> {
    let query = filter.to_query();
    let path = if query.is_empty() {
        "/v1/flows".to_string()
    } else {
        format!("/v1/flows?{query}")
    };
    let resp: RelayFlowsResponse = get_json(relay, &path)?;
    warn_missing(&resp.missing, warn);
    if resp.truncated {
        let _ = writeln!(
            warn,
            "warning: more flows matched than one answer holds; these are the largest (narrow the filter)"
        );
    }
    if json {
        return serde_json::to_string_pretty(&resp)
            .map(|s| s + "\n")
            .map_err(|e| Error::Output {
                detail: e.to_string(),
            });
    }
    let nodes: Vec<&str> = resp.nodes.iter().map(|n| n.node.as_str()).collect();
    let flows: Vec<(&str, &FlowRecord)> = resp
        .flows
        .iter()
        .map(|f| (f.node.as_str(), &f.flow))
        .collect();
    Ok(table(
        &format!(
            "{} node(s) ({}): {} flow(s)",
            nodes.len(),
            nodes.join(", "),
            flows.len()
        ),
        &flows,
        true,
    ))
}

/// One warning line per node missing from a relay answer.
pub fn warn_missing(missing: &[MissingNode], warn: &mut dyn std::io::Write) {
    for m in missing {
        let _ = writeln!(
            warn,
            "warning: node {} is missing from this answer: {}",
            m.node.as_deref().unwrap_or(&m.agent),
            m.error
        );
    }
}

/// Runs `flowtrace flows`.
pub fn flows(agent: &str, filter: &FlowFilter, json: bool) -> Result<String> {
    let resp = fetch_flows(agent, filter)?;
    if json {
        serde_json::to_string_pretty(&resp)
            .map(|s| s + "\n")
            .map_err(|e| Error::Output {
                detail: e.to_string(),
            })
    } else {
        Ok(render_table(&resp.node, &resp.flows))
    }
}

/// `flowtrace path`: the paths from `src` to `dst` over the agents at `agents` (the node
/// of each is asked for its flows, latency and interfaces; two agents are needed to see
/// both ends of a cross-node path and the round trip between the nodes).
pub fn path(
    agents: &[String],
    src: &crate::query::path::PathEnd,
    dst: &crate::query::path::PathEnd,
    window: std::time::Duration,
    json: bool,
) -> Result<String> {
    let mut views = Vec::new();
    for a in agents {
        // One request, one drain per agent (flows, latency and tunnels together).
        views.push(crate::query::path::NodeView::from_pathdata(get_json(
            a,
            &format!("/v1/pathdata?window_s={}", window.as_secs()),
        )?));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let paths = crate::query::path::paths(&views, src, dst, window.as_nanos() as u64, now);
    if json {
        return serde_json::to_string_pretty(&paths)
            .map(|s| s + "\n")
            .map_err(|e| Error::Output {
                detail: e.to_string(),
            });
    }
    if paths.is_empty() {
        let nodes: Vec<&str> = views.iter().map(|v| v.node.as_str()).collect();
        return Ok(format!(
            "no connection from {src} to {dst} seen by {} in the last {} s\n",
            nodes.join(", "),
            window.as_secs()
        ));
    }
    Ok(paths.iter().map(render_path).collect())
}

/// `flowtrace path --relay`: the relay joins every node's view; missing nodes are warned
/// about on `warn`.
pub fn relay_path(
    relay: &str,
    src: &crate::query::path::PathEnd,
    dst: &crate::query::path::PathEnd,
    window: std::time::Duration,
    json: bool,
    warn: &mut dyn std::io::Write,
) -> Result<String> {
    use crate::query::filter::percent_encode;
    let answer: crate::query::path::PathAnswer = get_json(
        relay,
        &format!(
            "/v1/path?src={}&dst={}&window_s={}",
            percent_encode(&src.to_string()),
            percent_encode(&dst.to_string()),
            window.as_secs()
        ),
    )?;
    warn_missing(&answer.missing, warn);
    if json {
        return serde_json::to_string_pretty(&answer.paths)
            .map(|s| s + "\n")
            .map_err(|e| Error::Output {
                detail: e.to_string(),
            });
    }
    if answer.paths.is_empty() {
        return Ok(format!(
            "no connection from {src} to {dst} seen by {} in the last {} s\n",
            answer.nodes.join(", "),
            window.as_secs()
        ));
    }
    Ok(answer.paths.iter().map(render_path).collect())
}

/// A duration in ns as people read it.
pub fn human_ns(ns: i64) -> String {
    let a = ns.unsigned_abs() as f64;
    let sign = if ns < 0 { "-" } else { "" };
    if a < 1e3 {
        format!("{sign}{a} ns")
    } else if a < 1e6 {
        format!("{sign}{:.1} µs", a / 1e3)
    } else if a < 1e9 {
        format!("{sign}{:.2} ms", a / 1e6)
    } else {
        format!("{sign}{:.2} s", a / 1e9)
    }
}

fn summary_text(s: &crate::query::path::LatencySummary) -> String {
    format!(
        "mean {} p50 {} p90 {} p99 {} ({} samples)",
        human_ns(s.mean_ns as i64),
        human_ns(s.p50_ns as i64),
        human_ns(s.p90_ns as i64),
        human_ns(s.p99_ns as i64),
        s.samples
    )
}

fn end_text(e: Option<&crate::model::Endpoint>, t: &crate::model::TupleView, src: bool) -> String {
    let (ip, port) = if src {
        (t.src, t.src_port)
    } else {
        (t.dst, t.dst_port)
    };
    named_endpoint(e, &ip, port, t.protocol)
}

/// Where packets died, as the text views say it: ` inside the pod behind VETH`, ` at DEV`,
/// or nothing without a device.
fn drop_place(pod_veth: Option<&str>, device: &str) -> String {
    match (pod_veth, device) {
        (Some(v), _) => format!(" inside the pod behind {v}"),
        (None, "") => String::new(),
        (None, dev) => format!(" at {dev}"),
    }
}

fn tuple_text(t: &crate::model::TupleView) -> String {
    format!(
        "{} -> {}",
        endpoint(&t.src, t.src_port, t.protocol),
        endpoint(&t.dst, t.dst_port, t.protocol)
    )
}

fn render_leg(out: &mut String, name: &str, leg: &crate::query::path::Leg) {
    use crate::query::path::Step;
    let _ = writeln!(out, "  {name} {}", tuple_text(&leg.tuple));
    for s in &leg.steps {
        match s {
            Step::Hop {
                node,
                interface,
                direction,
                packets,
                bytes,
                from_previous,
                handshake_rtt,
                response_rtt,
                ..
            } => {
                let _ = writeln!(
                    out,
                    "    {node:<10} {interface} {}  {packets} packets {bytes} bytes",
                    direction.as_str()
                );
                if let Some(l) = from_previous {
                    let _ = writeln!(out, "{:15}from previous hop: {}", "", summary_text(l));
                }
                if let Some(l) = handshake_rtt {
                    let _ = writeln!(out, "{:15}handshake round trip: {}", "", summary_text(l));
                }
                if let Some(l) = response_rtt {
                    let _ = writeln!(out, "{:15}response round trip: {}", "", summary_text(l));
                }
            }
            Step::Nat {
                node, to, rewrote, ..
            } => {
                let _ = writeln!(out, "    {node:<10} NAT ({rewrote}) -> {}", tuple_text(to));
            }
            Step::Drop {
                node,
                reason,
                device,
                pod_veth,
                packets,
                ..
            } => {
                let at = drop_place(pod_veth.as_deref(), device);
                let _ = writeln!(
                    out,
                    "    {node:<10} DROPPED {packets} packets: {reason}{at}"
                );
            }
        }
    }
}

fn render_path(p: &crate::query::path::PathRecord) -> String {
    let mut out = String::new();
    let via = p
        .service
        .as_ref()
        .map(|s| format!(" via svc {s}"))
        .unwrap_or_default();
    let last = p
        .request
        .steps
        .iter()
        .rev()
        .find_map(|s| match s {
            crate::query::path::Step::Hop { tuple, .. } => Some(*tuple),
            crate::query::path::Step::Nat { .. } | crate::query::path::Step::Drop { .. } => None,
        })
        .unwrap_or(p.request.tuple);
    let _ = writeln!(
        out,
        "{} -> {}{via}, {}: {} connection{}",
        end_text(p.src_endpoint.as_ref(), &p.request.tuple, true),
        end_text(p.dst_endpoint.as_ref(), &last, false),
        p.protocol,
        p.connections,
        if p.connections == 1 { "" } else { "s" }
    );
    render_leg(&mut out, "request", &p.request);
    if let Some(r) = &p.reply {
        render_leg(&mut out, "reply", r);
    }
    for s in &p.segments {
        let mut parts = Vec::new();
        if let Some(h) = s.handshake_rtt_ns {
            parts.push(format!("handshake {}", human_ns(h)));
        }
        if let Some(r) = s.response_rtt_ns {
            parts.push(format!("response {}", human_ns(r)));
        }
        if !parts.is_empty() {
            let _ = writeln!(
                out,
                "  segment {} -> {}{}: round trip {}",
                s.from,
                s.to,
                if s.in_node { "" } else { " (between nodes)" },
                parts.join(", ")
            );
        }
    }
    if p.network_time_ns.is_some() || p.server_time_ns.is_some() {
        let _ = writeln!(
            out,
            "  time: network {}, server {}",
            p.network_time_ns
                .map(human_ns)
                .unwrap_or_else(|| "unknown".into()),
            p.server_time_ns
                .map(|s| human_ns(s as i64))
                .unwrap_or_else(|| "unknown".into())
        );
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HopRecord;

    #[test]
    fn table_has_one_row_per_flow_with_hops_in_order() {
        let hop = |iface: &str, d| HopRecord {
            interface: iface.into(),
            ifindex: 1,
            direction: d,
            packets: 3,
            bytes: 300,
            payload_bytes: 0,
            first_seen_unix_ns: 0,
            last_seen_unix_ns: 0,
            tcp_flags: String::new(),
            dropped_after: 0,
        };
        let f = FlowRecord {
            protocol: "udp".into(),
            protocol_number: 17,
            ip_version: 6,
            src: "fd00::1".parse().unwrap(),
            dst: "fd00::2".parse().unwrap(),
            src_port: 1000,
            dst_port: 53,
            packets: 3,
            bytes: 300,
            payload_bytes: 0,
            hops: vec![
                hop("veth1", Direction::Ingress),
                hop("flannel.1", Direction::Egress),
            ],
            src_endpoint: None,
            dst_endpoint: None,
            service: None,
            nat: None,
            src_peer: None,
            dst_peer: None,
            drops: Vec::new(),
            dropped: 0,
            retransmits: 0,
        };
        let t = render_table("node1", &[f]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[2].contains("[fd00::1]:1000"));
        assert!(
            lines[2].ends_with("veth1/in > flannel.1/out"),
            "{}",
            lines[2]
        );
    }
}
