//! `flowtrace map`: the application's map as a table, JSON or Graphviz, over agents (joined
//! here) or through the relay (joined there).

use std::fmt::Write as _;

use crate::{
    cli::{get_json, human_ns, warn_missing},
    error::{Error, Result},
    query::{
        map::{map, Edge, MapAnswer, MapFilter, Vertex, VertexKind},
        path::NodeView,
    },
};

/// How to print the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapFormat {
    Text,
    Json,
    Dot,
}

/// The map over the agents at `agents` (one `/v1/pathdata` each, joined here).
pub fn fetch_from_agents(
    agents: &[String],
    filter: &MapFilter,
    window: std::time::Duration,
) -> Result<MapAnswer> {
    let mut views = Vec::new();
    for a in agents {
        views.push(NodeView::from_pathdata(get_json(
            a,
            &format!("/v1/pathdata?window_s={}", window.as_secs()),
        )?));
    }
    Ok(map(
        &views,
        filter,
        window.as_nanos() as u64,
        crate::util::unix_now_ns(),
    ))
}

/// The map the relay at `relay` joined over every node; missing nodes are warned about.
pub fn fetch_from_relay(
    relay: &str,
    filter: &MapFilter,
    window: std::time::Duration,
    warn: &mut dyn std::io::Write,
) -> Result<MapAnswer> {
    let mut query = format!("window_s={}", window.as_secs());
    let f = filter.to_query();
    if !f.is_empty() {
        query = format!("{query}&{f}");
    }
    let answer: MapAnswer = get_json(relay, &format!("/v1/map?{query}"))?;
    warn_missing(&answer.missing, warn);
    Ok(answer)
}

/// The map printed as asked.
pub fn render(m: &MapAnswer, format: MapFormat) -> Result<String> {
    match format {
        MapFormat::Json => serde_json::to_string_pretty(m)
            .map(|s| s + "\n")
            .map_err(|e| Error::Output {
                detail: e.to_string(),
            }),
        MapFormat::Text => Ok(text(m)),
        MapFormat::Dot => Ok(dot(m)),
    }
}

/// How a vertex is written in the table: `NS/NAME` for a workload, `svc/NS/NAME`,
/// `pod/NS/NAME`, `node/NAME` or the address.
fn short(id: &str) -> &str {
    id.strip_prefix("workload/")
        .or_else(|| id.strip_prefix("ip/"))
        .unwrap_or(id)
}

/// Bytes as people read them (decimal units, as rates are quoted).
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[0])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn opt_ns(v: Option<i64>) -> String {
    v.map(human_ns).unwrap_or_else(|| "-".into())
}

/// The edge's round trip as a reader wants it first: the handshake's median at the client.
fn handshake_p50(e: &Edge) -> Option<i64> {
    e.handshake_rtt.as_ref().map(|h| h.p50_ns as i64)
}

fn text(m: &MapAnswer) -> String {
    let mut out = String::new();
    let workloads = m
        .vertices
        .iter()
        .filter(|v| v.kind != VertexKind::Service)
        .count();
    let services = m.vertices.len() - workloads;
    let window = if m.window_s == 0 {
        "everything the agents hold".to_string()
    } else {
        format!("last {} s", m.window_s)
    };
    let _ = writeln!(
        out,
        "map: {workloads} workloads and addresses, {services} Services, {} edges; nodes {}; {window}",
        m.edges.len(),
        m.nodes.join(", ")
    );
    if m.edges.is_empty() {
        out.push_str("no connection seen\n");
        return out;
    }
    let header = [
        "FROM",
        "TO",
        "SERVICE",
        "PORT",
        "CONNS",
        "REQUEST",
        "REPLY",
        "RATE",
        "HANDSHAKE",
        "NETWORK",
        "SERVER",
        "NODES",
    ];
    let rows: Vec<[String; 12]> = m
        .edges
        .iter()
        .map(|e| {
            [
                short(&e.from).to_string(),
                short(&e.to).to_string(),
                e.service
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(|| "-".into()),
                format!("{}/{}", e.protocol, e.port),
                e.connections.to_string(),
                human_bytes(e.request_payload_bytes as f64),
                human_bytes(e.reply_payload_bytes as f64),
                format!("{}/s", human_bytes(e.bytes_per_s)),
                opt_ns(handshake_p50(e)),
                opt_ns(e.network_time_ns),
                opt_ns(e.server_time.as_ref().map(|s| s.mean_ns as i64)),
                e.nodes.join(">"),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&cells);
    }
    out.push_str(
        "(REQUEST, REPLY: the applications' bytes, without IP and transport headers; RATE: \
         layer-3 bytes both ways per second while active; HANDSHAKE: median SYN to SYN-ACK at \
         the client; NETWORK and SERVER: the mean answer time split at the server's last hop; \
         `flowtrace path FROM TO` shows an edge hop by hop)\n",
    );
    out
}

/// A string as a Graphviz quoted ID.
fn quoted(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// The colour of an edge by its handshake round trip: green under 1 ms, orange under 10 ms,
/// red beyond, grey unmeasured (UDP, or latency sampling off).
fn latency_colour(e: &Edge) -> &'static str {
    match handshake_p50(e) {
        None => "gray50",
        Some(ns) if ns < 1_000_000 => "forestgreen",
        Some(ns) if ns < 10_000_000 => "darkorange",
        Some(_) => "red3",
    }
}

fn vertex_dot(out: &mut String, v: &Vertex, indent: &str) {
    let (shape, what) = match v.kind {
        VertexKind::Workload => ("box", v.workload_kind.clone().unwrap_or_default()),
        VertexKind::Pod => ("box", "Pod".into()),
        VertexKind::Service => ("ellipse", "Service".into()),
        VertexKind::Node => ("box3d", "node".into()),
        VertexKind::External => ("plaintext", String::new()),
    };
    let label = if what.is_empty() {
        v.name.clone()
    } else {
        format!("{}\n{what}", v.name)
    };
    let _ = writeln!(
        out,
        "{indent}{} [label={}, shape={shape}];",
        quoted(&v.id),
        quoted(&label)
    );
}

fn dot(m: &MapAnswer) -> String {
    let mut out = String::from(
        "digraph flowtrace {\n  rankdir=LR;\n  node [style=rounded, fontname=\"sans-serif\"];\n  \
         edge [fontname=\"sans-serif\", fontsize=10];\n",
    );
    let mut by_ns: std::collections::BTreeMap<&str, Vec<&Vertex>> = Default::default();
    for v in &m.vertices {
        by_ns
            .entry(v.namespace.as_deref().unwrap_or(""))
            .or_default()
            .push(v);
    }
    for (i, (ns, vs)) in by_ns.iter().enumerate() {
        if ns.is_empty() {
            for v in vs {
                vertex_dot(&mut out, v, "  ");
            }
            continue;
        }
        let _ = writeln!(
            out,
            "  subgraph cluster_{i} {{\n    label={};\n    style=dashed;",
            quoted(ns)
        );
        for v in vs {
            vertex_dot(&mut out, v, "    ");
        }
        out.push_str("  }\n");
    }
    let max_rate = m
        .edges
        .iter()
        .map(|e| e.bytes_per_s)
        .fold(1.0_f64, f64::max);
    for e in &m.edges {
        // 1 to 6 points, by the log of the rate relative to the busiest edge.
        let width = 1.0 + 5.0 * ((1.0 + e.bytes_per_s).ln() / (1.0 + max_rate).ln());
        let label = format!(
            "{}/{} {} conns\n{}/s{}",
            e.protocol,
            e.port,
            e.connections,
            human_bytes(e.bytes_per_s),
            handshake_p50(e)
                .map(|ns| format!(", rtt {}", human_ns(ns)))
                .unwrap_or_default()
        );
        let colour = latency_colour(e);
        match &e.service {
            Some(s) => {
                let svc = format!("svc/{}/{}", s.namespace, s.name);
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={}, penwidth={width:.1}, color={colour}];",
                    quoted(&e.from),
                    quoted(&svc),
                    quoted(&label)
                );
                let _ = writeln!(
                    out,
                    "  {} -> {} [penwidth={width:.1}, color={colour}, style=dashed];",
                    quoted(&svc),
                    quoted(&e.to)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {} -> {} [label={}, penwidth={width:.1}, color={colour}];",
                    quoted(&e.from),
                    quoted(&e.to),
                    quoted(&label)
                );
            }
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::map::VertexKind;

    fn answer() -> MapAnswer {
        let v = |id: &str, kind, ns: Option<&str>, name: &str| Vertex {
            id: id.into(),
            kind,
            namespace: ns.map(Into::into),
            name: name.into(),
            workload_kind: (kind == VertexKind::Workload).then(|| "Deployment".into()),
            nodes: Vec::new(),
        };
        let e: Edge = serde_json::from_value(serde_json::json!({
            "id": "workload/shop/front-end -> svc/shop/cata\"logue -> workload/shop/catalogue tcp/8080",
            "from": "workload/shop/front-end",
            "to": "workload/shop/catalogue",
            "service": {"namespace": "shop", "name": "cata\"logue"},
            "protocol": "tcp", "port": 8080, "connections": 12, "tuples": 12,
            "request_packets": 40, "request_bytes": 12_345, "request_payload_bytes": 10_000,
            "reply_packets": 30, "reply_bytes": 2_500_000, "reply_payload_bytes": 2_400_000, "bytes_per_s": 41_000.0, "packets_per_s": 7.0,
            "first_seen_unix_ns": 0, "last_seen_unix_ns": 0,
            "handshake_rtt": {"samples": 12, "mean_ns": 300_000, "min_ns": 1, "max_ns": 2,
                              "p50_ns": 262_144, "p90_ns": 524_288, "p99_ns": 524_288},
            "network_time_ns": 410_000,
            "nodes": ["node1", "node2"], "hops": [], "paths": []
        }))
        .unwrap();
        MapAnswer {
            nodes: vec!["node1".into(), "node2".into()],
            missing: Vec::new(),
            window_s: 60,
            generated_unix_ns: 0,
            vertices: vec![
                v(
                    "workload/shop/front-end",
                    VertexKind::Workload,
                    Some("shop"),
                    "front-end",
                ),
                v(
                    "workload/shop/catalogue",
                    VertexKind::Workload,
                    Some("shop"),
                    "catalogue",
                ),
                v(
                    "svc/shop/cata\"logue",
                    VertexKind::Service,
                    Some("shop"),
                    "cata\"logue",
                ),
                v("ip/192.0.2.1", VertexKind::External, None, "192.0.2.1"),
            ],
            edges: vec![e],
        }
    }

    #[test]
    fn the_table_has_one_row_per_edge_with_its_figures() {
        let t = text(&answer());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("3 workloads and addresses, 1 Services, 1 edges"));
        assert!(lines[1].starts_with("FROM"));
        let row = lines[2];
        for cell in [
            "shop/front-end",
            "shop/catalogue",
            "tcp/8080",
            "12",
            "10.0 kB",
            "2.4 MB",
            "41.0 kB/s",
            "262.1 µs",
            "410.0 µs",
            "node1>node2",
        ] {
            assert!(row.contains(cell), "{cell:?} not in {row:?}");
        }
    }

    #[test]
    fn the_dot_graph_quotes_names_and_goes_through_the_service() {
        let d = dot(&answer());
        assert!(d.starts_with("digraph flowtrace {"), "{d}");
        assert!(d.trim_end().ends_with('}'));
        assert!(d.contains("subgraph cluster_"));
        assert!(d.contains(r#""svc/shop/cata\"logue""#), "{d}");
        assert!(d.contains(r#""workload/shop/front-end" -> "svc/shop/cata\"logue""#));
        assert!(d.contains(r#""svc/shop/cata\"logue" -> "workload/shop/catalogue""#));
        assert!(d.contains("color=forestgreen"));
        // Balanced quotes on every line: nothing unescaped broke out of a string.
        for l in d.lines() {
            let unescaped = l.replace("\\\"", "").matches('"').count();
            assert_eq!(unescaped % 2, 0, "{l}");
        }
    }

    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(human_bytes(999.0), "999 B");
        assert_eq!(human_bytes(1_500.0), "1.5 kB");
        assert_eq!(human_bytes(2_500_000.0), "2.5 MB");
    }
}
