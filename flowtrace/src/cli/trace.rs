//! `flowtrace trace`: follows the agent's `/v1/trace` stream and prints each packet hook by
//! hook (or passes its JSON lines through with `--json`).

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    time::{Duration, Instant},
};

use super::{call, drop_place, human_ns, named_endpoint, tuple_text};
use crate::{
    error::{Error, Result},
    model::{
        protocol_name,
        wire::{RelayTraceLine, TraceDrop, TraceLine, TracePacket},
    },
    query::filter::FlowFilter,
};

/// Waits until the agent at `base` answers `/readyz` with 200 (the interfaces present at
/// its start are attached, names synced if it has a source), for at most `limit`.
pub fn wait_ready(base: &str, limit: Duration) -> Result<()> {
    let url = format!("{}/readyz", base.trim_end_matches('/'));
    let deadline = Instant::now() + limit;
    loop {
        let last = match ureq::get(&url).timeout(Duration::from_secs(2)).call() {
            Ok(_) => return Ok(()),
            Err(ureq::Error::Status(code, r)) => {
                format!("{code}: {}", r.into_string().unwrap_or_default().trim())
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(Error::AgentUnreachable {
                url,
                detail: format!("not ready after {} s (last answer {last})", limit.as_secs()),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// When to stop following.
#[derive(Clone, Copy, Debug, Default)]
pub struct Until {
    /// After this many packets.
    pub count: Option<u64>,
    /// After this long.
    pub duration: Option<Duration>,
}

/// An agent that stops writing for this long is taken for gone (it writes an empty line
/// every 2 s when idle).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Follows the trace stream of the agent at `base` until `until` is met or the agent ends
/// it, writing each packet to `out`. Returns the number of packets printed.
pub fn follow(
    base: &str,
    relay: bool,
    filter: &FlowFilter,
    json: bool,
    until: Until,
    out: &mut dyn Write,
) -> Result<u64> {
    let query = filter.to_query();
    let url = format!(
        "{}/v1/trace{}{query}",
        base.trim_end_matches('/'),
        if query.is_empty() { "" } else { "?" }
    );
    let client = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(READ_TIMEOUT)
        .build();
    let resp = call(&url, client.get(&url))?;
    let started = Instant::now();
    let write_err = |e: std::io::Error| Error::Output {
        detail: format!("writing the trace: {e}"),
    };
    let mut printed = 0u64;
    let mut reader = BufReader::new(resp.into_reader());
    let mut line = String::new();
    loop {
        if until.count.is_some_and(|c| printed >= c)
            || until.duration.is_some_and(|d| started.elapsed() >= d)
        {
            return Ok(printed);
        }
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut
            {
                Error::AgentUnreachable {
                    url: url.clone(),
                    detail: format!("no data for {} s", READ_TIMEOUT.as_secs()),
                }
            } else {
                Error::AgentResponse {
                    url: url.clone(),
                    detail: format!("reading the trace stream: {e}"),
                }
            }
        })?;
        if n == 0 {
            // The agent ended the stream (it is shutting down).
            return Ok(printed);
        }
        let text = line.trim();
        if text.is_empty() {
            continue; // keep-alive
        }
        let parsed: TraceLine = if relay {
            match serde_json::from_str::<RelayTraceLine>(text) {
                Ok(RelayTraceLine::Packet(p)) => TraceLine::Packet(p),
                Ok(RelayTraceLine::Drop(d)) => TraceLine::Drop(d),
                Ok(RelayTraceLine::Retransmit(d)) => TraceLine::Retransmit(d),
                Ok(other) => {
                    if json {
                        writeln!(out, "{text}").map_err(write_err)?;
                    } else {
                        writeln!(out, "{}", relay_note(&other)).map_err(write_err)?;
                    }
                    out.flush().map_err(write_err)?;
                    continue;
                }
                Err(e) => {
                    return Err(Error::AgentResponse {
                        url: url.clone(),
                        detail: format!("a trace line is not the relay's: {e}: {text}"),
                    })
                }
            }
        } else {
            serde_json::from_str(text).map_err(|e| Error::AgentResponse {
                url: url.clone(),
                detail: format!("a trace line is not flowtrace's: {e}: {text}"),
            })?
        };
        match parsed {
            TraceLine::Start { node, sample } => {
                if !json {
                    writeln!(
                        out,
                        "# tracing on {node}: every TCP SYN and one packet in {sample}, hook by hook (Ctrl-C stops)"
                    )
                    .map_err(write_err)?;
                }
            }
            TraceLine::Packet(p) => {
                if json {
                    writeln!(out, "{text}").map_err(write_err)?;
                } else {
                    out.write_all(render(&p).as_bytes()).map_err(write_err)?;
                }
                printed += 1;
            }
            TraceLine::Drop(d) | TraceLine::Retransmit(d) => {
                if json {
                    writeln!(out, "{text}").map_err(write_err)?;
                } else {
                    out.write_all(render_drop(&d).as_bytes())
                        .map_err(write_err)?;
                }
                printed += 1;
            }
            TraceLine::Lost { packets } => {
                if json {
                    writeln!(out, "{text}").map_err(write_err)?;
                } else {
                    writeln!(
                        out,
                        "# {packets} packets skipped: this terminal read more slowly than they came (narrow the filter)"
                    )
                    .map_err(write_err)?;
                }
            }
        }
        out.flush().map_err(write_err)?;
    }
}

/// The relay's news of nodes, as a comment line.
fn relay_note(l: &RelayTraceLine) -> String {
    match l {
        RelayTraceLine::Start { agents } => format!(
            "# tracing over {agents} node(s) through the relay: every TCP SYN and the sampled packets, hook by hook (Ctrl-C stops)"
        ),
        RelayTraceLine::Joined { node, sample, .. } => {
            format!("# {node}: tracing (one packet in {sample}, and every SYN)")
        }
        RelayTraceLine::Missing(m) => format!(
            "# {}: missing from the trace: {} (retrying)",
            m.node.as_deref().unwrap_or(&m.agent),
            m.error
        ),
        RelayTraceLine::Lost { node, packets } => format!(
            "# {node}: {packets} packets skipped: this stream read more slowly than they came (narrow the filter)"
        ),
        RelayTraceLine::Packet(p) => render(p),
        RelayTraceLine::Drop(d) | RelayTraceLine::Retransmit(d) => render_drop(d),
    }
}

/// One drop or retransmission, as one line:
/// `12:00:01.000001 node2 DROP NETFILTER_DROP udp 10.1.1.2:4000 -> 10.1.2.2:9000 at flannel.1`.
fn render_drop(d: &TraceDrop) -> String {
    let what = match &d.reason {
        Some(r) => format!("DROP {r}"),
        None => "RETRANSMIT".to_string(),
    };
    let tuple = d.tuple.as_ref().map_or_else(
        || "(headers unreadable)".to_string(),
        |t| format!("{} {}", protocol_name(t.protocol), tuple_text(t)),
    );
    let at = drop_place(d.pod_veth.as_deref(), &d.device);
    format!("{} {} {what} {tuple}{at}\n", clock(d.ts_unix_ns), d.node)
}

/// `HH:MM:SS.uuuuuu` (UTC) of a Unix time in nanoseconds.
fn clock(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1_000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{micros:06}",
        day / 3600,
        day / 60 % 60,
        day % 60
    )
}

/// A packet as text: a header line, then one line per hook with the time since the
/// previous hook and the NAT step before it.
pub fn render(p: &TracePacket) -> String {
    let t = &p.tuple;
    let mut s = format!(
        "{} {} {} {} -> {}",
        clock(p.ts_unix_ns),
        p.node,
        p.protocol,
        named_endpoint(p.src_endpoint.as_ref(), &t.src, t.src_port, t.protocol),
        named_endpoint(p.dst_endpoint.as_ref(), &t.dst, t.dst_port, t.protocol),
    );
    if let Some(svc) = &p.service {
        let _ = write!(s, " (svc {}/{})", svc.namespace, svc.name);
    }
    if !p.tcp_flags.is_empty() {
        let _ = write!(s, " [{}]", p.tcp_flags);
    }
    let _ = writeln!(
        s,
        " {} B, {} hook{} in {}",
        p.bytes,
        p.hops.len(),
        if p.hops.len() == 1 { "" } else { "s" },
        human_ns(p.node_time_ns as i64)
    );
    for h in &p.hops {
        if let Some(n) = &h.nat {
            let (b, a) = (&n.before, &n.after);
            let (from, to) = match n.rewrote.as_str() {
                "src" => (
                    super::endpoint(&b.src, b.src_port, b.protocol),
                    super::endpoint(&a.src, a.src_port, a.protocol),
                ),
                _ => (
                    super::endpoint(&b.dst, b.dst_port, b.protocol),
                    super::endpoint(&a.dst, a.dst_port, a.protocol),
                ),
            };
            let _ = write!(s, "    NAT {}: {from} -> {to}", n.rewrote);
            if let Some(e) = &n.after_endpoint {
                match &e.namespace {
                    Some(ns) => {
                        let _ = write!(s, " ({ns}/{})", e.name);
                    }
                    None => {
                        let _ = write!(s, " ({})", e.name);
                    }
                }
            }
            s.push('\n');
        }
        let direction = h.direction.as_str();
        let _ = writeln!(
            s,
            "    {:<16} {:<8} +{}",
            h.interface,
            direction,
            human_ns(h.since_previous_ns as i64)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_utc_time_of_day() {
        // 2026-11-22T04:39:10.799852716Z
        assert_eq!(clock(1_795_322_350_799_852_716), "04:39:10.799852");
    }

    #[test]
    fn renders_hooks_deltas_and_the_nat_step() {
        let line = r#"{"kind":"packet","node":"node1","ts_unix_ns":1795322350799852716,"protocol":"tcp","protocol_number":6,"tcp_flags":"S","bytes":60,
            "tuple":{"protocol":6,"src":"10.244.1.5","src_port":40000,"dst":"10.96.0.10","dst_port":80},
            "hops":[{"interface":"vethc","ifindex":3,"direction":"ingress","ts_unix_ns":1795322350799852716,"since_previous_ns":0},
                    {"interface":"flannel.1","ifindex":5,"direction":"egress","ts_unix_ns":1795322350799864716,"since_previous_ns":12000,
                     "nat":{"rewrote":"dst","before":{"protocol":6,"src":"10.244.1.5","src_port":40000,"dst":"10.96.0.10","dst_port":80},
                            "after":{"protocol":6,"src":"10.244.1.5","src_port":40000,"dst":"10.244.2.9","dst_port":8080}}}],
            "node_time_ns":12000}"#
            .replace('\n', "");
        let TraceLine::Packet(p) = serde_json::from_str::<TraceLine>(&line).unwrap() else {
            panic!("not a packet");
        };
        let text = render(&p);
        assert!(text.starts_with("04:39:10.799852 node1 tcp 10.244.1.5:40000 -> 10.96.0.10:80 [S] 60 B, 2 hooks in 12.0 µs\n"), "{text}");
        assert!(text.contains("    NAT dst: 10.96.0.10:80 -> 10.244.2.9:8080\n    flannel.1        egress   +12.0 µs\n"), "{text}");
    }
}
