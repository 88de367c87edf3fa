//! Driving `ftgen` inside pods from tests and tools, with structured (JSON) results, and the
//! traffic several tests share, checked against the senders' and receivers' own counts.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde_json::Value;

use crate::{
    netns::{ChildGuard, ReadyFile},
    Cluster, Error, Pod, Result,
};

/// Path of the `ftgen` binary built beside the running test or tool, or `$FTGEN_BIN`.
pub fn ftgen_bin() -> Result<PathBuf> {
    crate::agent::sibling_binary("ftgen", "FTGEN_BIN", "flowtrace-tests")
}

/// The one JSON object an `ftgen` command prints on stdout; `what` names the command in the
/// error.
pub fn ftgen_json(stdout: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(stdout).map_err(|e| {
        Error::Invalid(format!(
            "ftgen {what} printed no JSON ({e}): {}",
            String::from_utf8_lossy(stdout)
        ))
    })
}

/// Runs `ftgen <args>` in `pod` to completion and returns its JSON result.
pub fn ftgen(pod: &Pod, args: &[&str]) -> Result<Value> {
    let bin = ftgen_bin()?;
    let bin = bin.to_string_lossy().to_string();
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(args);
    let out = pod.exec(&argv)?;
    ftgen_json(&out.stdout, args.first().copied().unwrap_or(""))
}

/// Starts `ftgen <args> --ready-file F` in `pod` and returns once its socket is bound.
pub fn ftgen_bg(pod: &Pod, args: &[&str]) -> Result<ChildGuard> {
    ftgen_bg_in(&pod.netns, args)
}

/// Starts `ftgen <args> --ready-file F` in network namespace `netns_name` and returns once
/// it is ready.
pub fn ftgen_bg_in(netns_name: &str, args: &[&str]) -> Result<ChildGuard> {
    let bin = ftgen_bin()?;
    let bin = bin.to_string_lossy().to_string();
    let what = args.first().copied().unwrap_or("ftgen");
    let ready = ReadyFile::new(&format!("{netns_name}-{what}"));
    let mut argv = vec![bin.as_str()];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--ready-file", ready.arg()?]);
    let mut guard = ChildGuard::new(
        crate::netns::spawn(netns_name, &argv)?,
        format!("{} (in {netns_name})", crate::netns::display_cmd(&argv)),
    );
    ready.wait(
        &mut guard,
        &format!("ftgen {args:?} in {netns_name}"),
        Duration::from_secs(10),
    )?;
    Ok(guard)
}

/// Waits for a background ftgen and returns its JSON result.
pub fn finish(guard: ChildGuard) -> Result<Value> {
    let out = guard.wait_output(Duration::from_secs(60))?;
    ftgen_json(&out.stdout, "background")
}

/// Sends `count` UDP datagrams of `payload` bytes from `from` to `to`:`port` (a sink there)
/// and checks, by the sender's and the sink's own counts, that all of them arrived.
pub fn udp_all_received(from: &Pod, to: &Pod, port: u16, count: u64, payload: u64) -> Result<()> {
    let sink = ftgen_bg(
        to,
        &[
            "udp-sink",
            "--bind",
            &format!("0.0.0.0:{port}"),
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "20000",
        ],
    )?;
    let sent = ftgen(
        from,
        &[
            "udp-send",
            "--to",
            &format!("{}:{port}", to.ipv4),
            "--count",
            &count.to_string(),
            "--size",
            &payload.to_string(),
            "--interval-us",
            "200",
        ],
    )?;
    let got = finish(sink)?;
    if sent["sent"] != count {
        return Err(Error::Check(format!(
            "udp-send sent {} of {count}: {sent}",
            sent["sent"]
        )));
    }
    if got["received"] != count {
        return Err(Error::Check(format!(
            "the emulated network lost datagrams: {count} sent, the sink got {got}"
        )));
    }
    Ok(())
}

/// The demo Service's ClusterIP (see [`crate::ServiceSpec::demo`]).
const SERVICE_VIP: &str = "10.96.0.10";

/// Opens `connections` TCP connections from `client` (on node1) to the demo Service
/// 10.96.0.10:80, served by pod-b on both nodes, and returns how many of them `conntrack -L`
/// on node1 lists as DNATed from the Service address to a backend (checked equal to the
/// client's own count).
pub fn service_connections(cluster: &Cluster, client: &Pod, connections: u64) -> Result<f64> {
    let sink_args = [
        "tcp-sink",
        "--bind",
        "0.0.0.0:8080",
        "--connections",
        "100",
        "--timeout-ms",
        "60000",
        "--idle-timeout-ms",
        "3000",
        "--echo-bytes",
        "10",
    ];
    let sinks = [cluster.pod(1, "pod-b")?, cluster.pod(2, "pod-b")?]
        .iter()
        .map(|p| ftgen_bg(p, &sink_args))
        .collect::<Result<Vec<_>>>()?;
    let tcp = ftgen(
        client,
        &[
            "tcp-send",
            "--to",
            &format!("{SERVICE_VIP}:80"),
            "--bytes",
            "100",
            "--connections",
            &connections.to_string(),
        ],
    )?;
    if tcp["connections"] != connections {
        return Err(Error::Check(format!(
            "tcp-send completed {} of {connections} connections: {tcp}",
            tcp["connections"]
        )));
    }
    drop(sinks);
    let service: IpAddr = SERVICE_VIP
        .parse()
        .map_err(|e| Error::Invalid(format!("{SERVICE_VIP}: {e}")))?;
    let dnat = crate::conntrack_list(
        cluster.node(1)?,
        &[
            "-p",
            "tcp",
            "-d",
            SERVICE_VIP,
            "-s",
            &client.ipv4.to_string(),
        ],
    )?
    .iter()
    .filter(|(_, reply)| reply.1 != service)
    .count() as f64;
    if dnat != connections as f64 {
        return Err(Error::Check(format!(
            "conntrack -L disagrees with the client: {dnat} DNATed connections listed, the \
             client made {connections}"
        )));
    }
    Ok(dnat)
}
