//! `ftgen`: traffic generator and sink for flowtrace's integration tests.
//!
//! Run inside a pod with `ip netns exec <pod-ns> ftgen <command> ...`. Every command prints exactly
//! one JSON object on stdout when it is done, so tests assert on structured results rather than
//! scraping text. Sinks accept `--ready-file PATH`: the file is created once the socket is bound,
//! so a test can wait for it before sending instead of sleeping.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "ftgen",
    about = "Traffic generator/sink for flowtrace tests; prints one JSON object"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Receive UDP datagrams until --count arrived or --timeout-ms passed.
    /// Prints {"received","bytes","echoed","peers","rcvbuf","socket_drops"}: `rcvbuf` is the
    /// receive buffer the kernel granted (SO_RCVBUF read back), `socket_drops` the kernel's
    /// own count of datagrams it dropped on this socket (the `drops` column of
    /// /proc/net/udp[6], read just before the socket closes).
    ///
    /// With --hold-until or --hold-ms the sink reads nothing until the hold ends (datagrams
    /// queue, and what does not fit --rcvbuf is dropped by the kernel, reason
    /// SOCKET_RCVBUFF), then reads what is queued (at most --count) without waiting and
    /// stops: `received` is what survived the hold, so drops = sent - received.
    UdpSink {
        /// Address to bind, e.g. `0.0.0.0:8080` or `[::]:8080`.
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Send every datagram back to its sender.
        #[arg(long)]
        echo: bool,
        /// SO_RCVBUF to ask for, in bytes, before the socket is ready (the kernel doubles
        /// it and grants at least its minimum, about 4 KiB: see `rcvbuf` in the result).
        #[arg(long)]
        rcvbuf: Option<usize>,
        /// Do not read until this file exists (checked every 5 ms; fails after --timeout-ms).
        #[arg(long, conflicts_with = "hold_ms")]
        hold_until: Option<PathBuf>,
        /// Do not read for this long after the socket is ready.
        #[arg(long)]
        hold_ms: Option<u64>,
        /// Created once the socket is bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Send --count datagrams of --size payload bytes. Prints {"sent","bytes","local",
    /// "local_ports","echoed"}: `sent` counts the datagrams the kernel accepted (send_to
    /// returned); the first failed send ends the command with an error instead.
    UdpSend {
        /// Destination, e.g. `10.244.2.10:8080` or `[fd00:10:244:2::10]:8080`.
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Pause between datagrams.
        #[arg(long, default_value_t = 0)]
        interval_us: u64,
        /// Local address (IP, or IP:port) to send from.
        #[arg(long, value_parser = parse_bind)]
        bind: Option<SocketAddr>,
        /// After each datagram wait up to --echo-timeout-ms for a reply (sink run with --echo).
        #[arg(long)]
        expect_echo: bool,
        #[arg(long, default_value_t = 1000)]
        echo_timeout_ms: u64,
        /// Spread the datagrams round-robin over this many sockets (distinct source ports,
        /// hence distinct flows), e.g. to exercise many interleaved flows.
        #[arg(long, default_value_t = 1)]
        sockets: usize,
        /// Start each datagram's payload with its number (8 bytes, big-endian; --size at
        /// least 8), so no two look alike to what tells packets apart by their first payload
        /// bytes (flowtrace's packet id). Without it every datagram carries the same bytes.
        #[arg(long)]
        numbered: bool,
    },
    /// Accept --connections TCP connections, read each to EOF, optionally answer.
    /// Prints {"received_bytes","connections","peers","errors"}.
    TcpSink {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: u64,
        /// Overall deadline; the sink reports what it got when it passes.
        #[arg(long, default_value_t = 10000)]
        timeout_ms: u64,
        /// After at least one connection, stop when no new one arrives for this long (useful when
        /// several sinks share an unknown split of the connections, as Service backends do).
        #[arg(long)]
        idle_timeout_ms: Option<u64>,
        /// Bytes written back on each connection after the peer's EOF, before closing.
        #[arg(long, default_value_t = 0)]
        echo_bytes: usize,
        /// Wait this long after the peer's EOF before answering (a slow server).
        #[arg(long, default_value_t = 0)]
        reply_delay_ms: u64,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Open --connections sequential TCP connections, each sending --bytes then shutdown(Write)
    /// and reading to EOF. Prints {"sent_bytes","received_bytes","connections","local_ports",
    /// "retransmitted_bytes","total_retrans","total_retrans_per_connection"}: from each
    /// socket's TCP_INFO, read once the peer's EOF arrived and before the socket closes,
    /// `tcpi_bytes_retrans` summed, and `tcpi_total_retrans` (segments the kernel
    /// retransmitted, loss probes and SYN retransmissions included) summed and per
    /// connection, in the order of `local_ports`.
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        connections: u64,
        /// Connect and per-read timeout.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Pause between connections (traffic that keeps running for a while).
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// Send a raw Ethernet frame (hex, separators ignored) on --iface. Prints {"sent"}.
    RawSend {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        hex: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// Send IPv4 UDP frames that are identical but for their source port on --iface: the
    /// same IPv4 identification (0, DF set), length and payload, source ports cycling through
    /// --ports, at --pps for --duration-ms. Each frame looks like the one before to anything
    /// that tells packets apart by the fields NAT leaves alone. Prints {"sent", "ports"}.
    UdpFlood {
        #[arg(long)]
        iface: String,
        #[arg(long, value_parser = parse_mac)]
        src_mac: [u8; 6],
        #[arg(long, value_parser = parse_mac)]
        dst_mac: [u8; 6],
        #[arg(long)]
        src: std::net::Ipv4Addr,
        /// Source addresses --src, --src + 1, ... (this many), taken in turn once the ports
        /// have all been used: up to --src-count x ports distinct tuples.
        #[arg(long, default_value_t = 1)]
        src_count: u32,
        #[arg(long)]
        dst: std::net::Ipv4Addr,
        #[arg(long)]
        dst_port: u16,
        /// First and last source port, e.g. 20000-59999.
        #[arg(long)]
        ports: String,
        #[arg(long, default_value_t = 20_000)]
        pps: u64,
        #[arg(long, default_value_t = 2_000)]
        duration_ms: u64,
        /// Created once the socket is open, before the first frame.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Capture incoming frames (not our own outgoing ones) on --iface. Prints {"frames":[hex...]}.
    RawCapture {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Only frames with this EtherType (e.g. 0x0800), read from the frame bytes.
        #[arg(long, value_parser = parse_ethertype)]
        ethertype: Option<u16>,
        /// Only frames from this source MAC (aa:bb:cc:dd:ee:ff).
        #[arg(long, value_parser = parse_mac)]
        src_mac: Option<[u8; 6]>,
        /// Only frames to this destination MAC. With --src-mac, a unicast pair: what the kernel
        /// sends unasked (MLD reports, router solicitations) goes to multicast addresses, so
        /// only the frames a test sent itself match.
        #[arg(long, value_parser = parse_mac)]
        dst_mac: Option<[u8; 6]>,
        /// Created once the capture socket is bound.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// A delay line: relay every frame between --a and --b (AF_PACKET; the links need
    /// offloads off), holding frames from a to b for --delay-us and from b to a for
    /// --back-delay-us. Runs until --stop-file exists, then prints per direction
    /// {"frames","mean_hold_ns","max_hold_ns","send_errors","syn_frames","syn_mean_hold_ns"}:
    /// the hold is measured from the frame's arrival to the start of its send, so it includes the relay's
    /// own lateness; the `syn_` figures count only VXLAN frames carrying a TCP SYN (or
    /// SYN-ACK), the frames a handshake round trip is made of.
    ///
    /// With --drop-every N the line also loses frames: of the VXLAN frames (outer IPv4 UDP to
    /// 4789 or 8472) arriving in a direction --drop-direction names, the Nth, 2Nth, ... of
    /// that direction (each direction counts its own) are not relayed. Other frames (ARP) are
    /// never dropped. Each direction also reports {"vxlan_frames","dropped","socket_drops"}:
    /// `frames` counts only what was relayed, `socket_drops` the frames the kernel dropped
    /// before the relay read them because its socket queue was full (bursts of a bulk
    /// transfer), lost on the line as well.
    DelayLine {
        #[arg(long)]
        a: String,
        #[arg(long)]
        b: String,
        #[arg(long, default_value_t = 0)]
        delay_us: u64,
        #[arg(long, default_value_t = 0)]
        back_delay_us: u64,
        /// Drop every Nth VXLAN frame (0: none).
        #[arg(long, default_value_t = 0)]
        drop_every: u64,
        /// Which directions --drop-every applies to.
        #[arg(long, value_enum, default_value_t = DropDirection::Both)]
        drop_direction: DropDirection,
        /// Receive buffer of each direction's socket, in bytes (SO_RCVBUFFORCE, past
        /// net.core.rmem_max), so that bursts queue instead of overflowing it (see
        /// `socket_drops`); default: the kernel's.
        #[arg(long)]
        socket_buffer: Option<usize>,
        #[arg(long)]
        stop_file: PathBuf,
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Print the MAC of --iface: {"mac":"aa:bb:..."}.
    Mac {
        #[arg(long)]
        iface: String,
    },
}

/// The directions of a delay line that `--drop-every` loses frames in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DropDirection {
    Both,
    /// Frames arriving on --a, relayed to --b.
    AToB,
    /// Frames arriving on --b, relayed to --a.
    BToA,
}

fn main() -> Result<()> {
    let result = match Cli::parse().cmd {
        Cmd::UdpSink {
            bind,
            count,
            timeout_ms,
            echo,
            rcvbuf,
            hold_until,
            hold_ms,
            ready_file,
        } => {
            let hold = match (hold_until, hold_ms) {
                (Some(path), _) => Some(Hold::UntilFile(path)),
                (None, Some(t)) => Some(Hold::For(ms(t))),
                (None, None) => None,
            };
            let opts = SinkOptions {
                count,
                timeout: ms(timeout_ms),
                echo,
                rcvbuf,
                hold,
            };
            udp_sink(bind, &opts, ready_file.as_deref())?
        }
        Cmd::UdpSend {
            to,
            count,
            size,
            interval_us,
            bind,
            expect_echo,
            echo_timeout_ms,
            sockets,
            numbered,
        } => udp_send(
            to,
            Datagrams {
                count,
                size,
                interval: Duration::from_micros(interval_us),
                numbered,
            },
            bind,
            expect_echo.then(|| ms(echo_timeout_ms)),
            sockets,
        )?,
        Cmd::TcpSink {
            bind,
            connections,
            timeout_ms,
            idle_timeout_ms,
            echo_bytes,
            reply_delay_ms,
            ready_file,
        } => tcp_sink(
            bind,
            connections,
            ms(timeout_ms),
            idle_timeout_ms.map(ms),
            (echo_bytes, ms(reply_delay_ms)),
            ready_file.as_deref(),
        )?,
        Cmd::TcpSend {
            to,
            bytes,
            connections,
            timeout_ms,
            interval_ms,
        } => tcp_send(to, bytes, connections, ms(timeout_ms), ms(interval_ms))?,
        Cmd::RawSend { iface, hex, count } => raw::send(&iface, &parse_hex(&hex)?, count)?,
        Cmd::UdpFlood {
            iface,
            src_mac,
            dst_mac,
            src,
            src_count,
            dst,
            dst_port,
            ports,
            pps,
            duration_ms,
            ready_file,
        } => {
            let (first, last) = ports
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
                .filter(|(a, b)| a <= b)
                .with_context(|| format!("--ports {ports:?}: want FIRST-LAST, e.g. 20000-59999"))?;
            let flood = raw::Flood {
                src_mac,
                dst_mac,
                src,
                src_count: src_count.max(1),
                dst,
                dst_port,
                ports: (first, last),
            };
            raw::flood(
                &iface,
                &flood,
                pps,
                Duration::from_millis(duration_ms),
                ready_file.as_deref(),
            )?
        }
        Cmd::RawCapture {
            iface,
            count,
            timeout_ms,
            ethertype,
            src_mac,
            dst_mac,
            ready_file,
        } => {
            let filter = raw::Filter {
                ethertype,
                src_mac,
                dst_mac,
            };
            raw::capture(&iface, count, ms(timeout_ms), filter, ready_file.as_deref())?
        }
        Cmd::DelayLine {
            a,
            b,
            delay_us,
            back_delay_us,
            drop_every,
            drop_direction,
            socket_buffer,
            stop_file,
            ready_file,
        } => {
            let every = |on: bool| if on { drop_every } else { 0 };
            raw::delay_line(
                [&a, &b],
                [
                    Duration::from_micros(delay_us),
                    Duration::from_micros(back_delay_us),
                ],
                [
                    every(drop_direction != DropDirection::BToA),
                    every(drop_direction != DropDirection::AToB),
                ],
                socket_buffer,
                &stop_file,
                ready_file.as_deref(),
            )?
        }
        Cmd::Mac { iface } => json!({ "mac": raw::mac(&iface)? }),
    };
    println!("{result}");
    Ok(())
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Accepts `IP` (port 0) or `IP:port` / `[IPv6]:port`.
fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("{s:?} is neither IP nor IP:port (IPv6 with port: [addr]:port)"))
}

fn parse_ethertype(s: &str) -> Result<u16, String> {
    let digits = s.trim_start_matches("0x").trim_start_matches("0X");
    u16::from_str_radix(digits, 16)
        .map_err(|e| format!("ethertype {s:?} is not hex like 0x0800: {e}"))
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes = parse_hex(s).map_err(|e| format!("MAC {s:?}: {e:#}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("MAC {s:?} must have 6 bytes, like 0a:58:0a:f4:01:0a"))
}

/// Hex string to bytes; spaces, colons, dashes and newlines are ignored so frames can be written
/// grouped by header field.
fn parse_hex(s: &str) -> Result<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b" \t\n\r:-_".contains(b)).collect();
    if digits.len() % 2 != 0 {
        bail!(
            "--hex has an odd number of hex digits ({}); give whole bytes",
            digits.len()
        );
    }
    digits
        .chunks(2)
        .map(|pair| {
            let txt = std::str::from_utf8(pair).unwrap_or("??");
            u8::from_str_radix(txt, 16).with_context(|| format!("--hex: {txt:?} is not a hex byte"))
        })
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn touch(path: Option<&Path>) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, b"").with_context(|| format!("creating ready file {}", p.display()))?;
    }
    Ok(())
}

/// Time left until `deadline`, or `None` if it has passed.
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Recognisable payload (byte i = i mod 256), so captures can be matched by eye.
fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| i as u8).collect()
}

/// When a holding sink starts reading.
enum Hold {
    /// Once this file exists.
    UntilFile(PathBuf),
    /// After this long.
    For(Duration),
}

struct SinkOptions {
    count: u64,
    timeout: Duration,
    echo: bool,
    rcvbuf: Option<usize>,
    hold: Option<Hold>,
}

fn udp_sink(bind: SocketAddr, o: &SinkOptions, ready: Option<&Path>) -> Result<serde_json::Value> {
    let sock = UdpSocket::bind(bind).with_context(|| format!("binding UDP {bind}"))?;
    if let Some(bytes) = o.rcvbuf {
        set_rcvbuf(&sock, bytes)?;
    }
    let rcvbuf = get_rcvbuf(&sock)?;
    touch(ready)?;
    let deadline = Instant::now() + o.timeout;
    let (mut received, mut bytes, mut echoed) = (0u64, 0u64, 0u64);
    let mut peers = BTreeSet::new();
    let mut buf = vec![0u8; 65536];
    let mut drain_only = false;
    if let Some(hold) = &o.hold {
        match hold {
            Hold::UntilFile(path) => {
                while !path.exists() {
                    if remaining(deadline).is_none() {
                        bail!(
                            "--hold-until {} did not appear within --timeout-ms {}",
                            path.display(),
                            o.timeout.as_millis()
                        );
                    }
                    std::thread::sleep(ms(5));
                }
            }
            Hold::For(t) => std::thread::sleep(*t),
        }
        // Only what is queued now: nothing more is waited for.
        sock.set_nonblocking(true)
            .context("making the UDP socket non-blocking")?;
        drain_only = true;
    }
    // The read timeout is what remains of --timeout-ms, set again every 50 ms rather than
    // before every datagram (a floods' sink would spend a syscall per datagram on it): a
    // wait may end up to 50 ms past the deadline, never before it.
    let mut timeout_set: Option<Instant> = None;
    while received < o.count {
        if !drain_only {
            let Some(left) = remaining(deadline) else {
                break;
            };
            if timeout_set.is_none_or(|t| t.elapsed() >= ms(50)) {
                sock.set_read_timeout(Some(left))
                    .context("setting UDP read timeout")?;
                timeout_set = Some(Instant::now());
            }
        }
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                received += 1;
                bytes += n as u64;
                peers.insert(from);
                if o.echo {
                    sock.send_to(&buf[..n], from)
                        .with_context(|| format!("echoing to {from}"))?;
                    echoed += 1;
                }
            }
            Err(e) if is_timeout(&e) => break,
            Err(e) => return Err(e).context("receiving UDP"),
        }
    }
    let local = sock.local_addr().context("reading the sink's address")?;
    let socket_drops = udp_socket_drops(&sock, local)?;
    Ok(json!({
        "received": received,
        "bytes": bytes,
        "echoed": echoed,
        "peers": peers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "rcvbuf": rcvbuf,
        "socket_drops": socket_drops,
    }))
}

fn set_rcvbuf(sock: &UdpSocket, bytes: usize) -> Result<()> {
    let val = libc::c_int::try_from(bytes).context("--rcvbuf does not fit a C int")?;
    // SAFETY: a valid socket and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            std::ptr::from_ref(&val).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setsockopt(SO_RCVBUF, {bytes})"));
    }
    Ok(())
}

/// The receive buffer the kernel granted, in bytes (what SO_RCVBUF reads back).
fn get_rcvbuf(sock: &UdpSocket) -> Result<u64> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` is writable for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            std::ptr::addr_of_mut!(val).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_RCVBUF)");
    }
    u64::try_from(val).context("SO_RCVBUF read back negative")
}

/// The kernel's count of datagrams dropped on `sock` (`sk_drops`): the `drops` column of its
/// line in /proc/net/udp (udp6 for an IPv6 socket) of this network namespace, found by the
/// socket's inode.
fn udp_socket_drops(sock: &UdpSocket, local: SocketAddr) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let fd_path = format!("/proc/self/fd/{}", sock.as_raw_fd());
    let inode = std::fs::metadata(&fd_path)
        .with_context(|| format!("stat {fd_path}"))?
        .ino();
    let table = if local.is_ipv4() {
        "/proc/net/udp"
    } else {
        "/proc/net/udp6"
    };
    let text = std::fs::read_to_string(table).with_context(|| format!("reading {table}"))?;
    parse_udp_drops(&text, inode).with_context(|| {
        format!("{table} has no line for the sink's socket (inode {inode}, {local})")
    })
}

/// The `drops` column (the last) of the /proc/net/udp line whose `inode` column (the tenth)
/// is `inode`.
fn parse_udp_drops(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.get(9)?.parse::<u64>().ok()? != inode {
            return None;
        }
        cols.last()?.parse().ok()
    })
}

/// What `udp-send` sends: `count` datagrams of `size` payload bytes, `interval` apart,
/// numbered or all alike.
struct Datagrams {
    count: u64,
    size: usize,
    interval: Duration,
    numbered: bool,
}

fn udp_send(
    to: SocketAddr,
    datagrams: Datagrams,
    bind: Option<SocketAddr>,
    echo_timeout: Option<Duration>,
    sockets: usize,
) -> Result<serde_json::Value> {
    let Datagrams {
        count,
        size,
        interval,
        numbered,
    } = datagrams;
    let local = bind.unwrap_or_else(|| unspecified_like(to));
    if numbered && size < 8 {
        anyhow::bail!(
            "--numbered needs --size of at least 8 (the number takes 8 bytes), not {size}"
        );
    }
    if sockets == 0 || (sockets > 1 && local.port() != 0) {
        anyhow::bail!("--sockets must be at least 1, and several sockets need an ephemeral port (bind an IP only)");
    }
    let socks = (0..sockets)
        .map(|_| UdpSocket::bind(local).with_context(|| format!("binding UDP {local}")))
        .collect::<Result<Vec<_>>>()?;
    let mut data = payload(size);
    let mut buf = vec![0u8; 65536];
    let (mut sent, mut echoed) = (0u64, 0u64);
    for k in 0..count {
        if numbered {
            data[..8].copy_from_slice(&k.to_be_bytes());
        }
        if k > 0 && !interval.is_zero() {
            std::thread::sleep(interval);
        }
        let sock = &socks[(k % sockets as u64) as usize];
        sock.send_to(&data, to)
            .with_context(|| format!("sending datagram {k} to {to}"))?;
        sent += 1;
        if let Some(t) = echo_timeout {
            sock.set_read_timeout(Some(t))
                .context("setting UDP read timeout")?;
            match sock.recv_from(&mut buf) {
                Ok(_) => echoed += 1,
                Err(e) if is_timeout(&e) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("waiting for echo of datagram {k}"))
                }
            }
        }
    }
    let locals = socks
        .iter()
        .map(|s| s.local_addr().context("reading local UDP address"))
        .collect::<Result<Vec<_>>>()?;
    Ok(json!({
        "sent": sent,
        "bytes": sent * size as u64,
        "local": locals[0].to_string(),
        "local_ports": locals.iter().map(|l| l.port()).collect::<Vec<_>>(),
        "echoed": echoed,
    }))
}

fn unspecified_like(to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

fn tcp_sink(
    bind: SocketAddr,
    connections: u64,
    timeout: Duration,
    idle: Option<Duration>,
    (echo_bytes, reply_delay): (usize, Duration),
    ready: Option<&Path>,
) -> Result<serde_json::Value> {
    let listener = TcpListener::bind(bind).with_context(|| format!("binding TCP {bind}"))?;
    // Non-blocking accept lets us honour the deadlines without a second thread.
    listener
        .set_nonblocking(true)
        .context("making the listener non-blocking")?;
    touch(ready)?;
    let deadline = Instant::now() + timeout;
    let (mut accepted, mut received, mut errors) = (0u64, 0u64, 0u64);
    let mut peers = BTreeSet::new();
    let mut last_activity = Instant::now();
    let reply = payload(echo_bytes);
    while accepted < connections {
        if remaining(deadline).is_none() {
            break;
        }
        if let Some(idle) = idle {
            if accepted > 0 && last_activity.elapsed() >= idle {
                break;
            }
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                accepted += 1;
                peers.insert(peer.to_string());
                match serve_tcp(stream, deadline, &reply, reply_delay) {
                    Ok(n) => received += n,
                    Err(e) => {
                        eprintln!("ftgen tcp-sink: connection from {peer}: {e:#}");
                        errors += 1;
                    }
                }
                last_activity = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ms(2)),
            Err(e) => return Err(e).context("accepting TCP connection"),
        }
    }
    Ok(json!({
        "received_bytes": received,
        "connections": accepted,
        "peers": peers,
        "errors": errors,
    }))
}

/// Reads one connection to EOF, waits `delay`, writes `reply`, closes. Returns the bytes read.
fn serve_tcp(
    mut stream: TcpStream,
    deadline: Instant,
    reply: &[u8],
    delay: Duration,
) -> Result<u64> {
    stream
        .set_nonblocking(false)
        .context("making the connection blocking")?;
    let left = remaining(deadline).unwrap_or(ms(1));
    stream
        .set_read_timeout(Some(left))
        .context("setting read timeout")?;
    stream
        .set_write_timeout(Some(left))
        .context("setting write timeout")?;
    let mut sink = Vec::new();
    let n = stream.read_to_end(&mut sink).context("reading to EOF")?;
    std::thread::sleep(delay);
    stream.write_all(reply).context("writing reply")?;
    stream.shutdown(Shutdown::Both).ok();
    Ok(n as u64)
}

fn tcp_send(
    to: SocketAddr,
    bytes: usize,
    connections: u64,
    timeout: Duration,
    interval: Duration,
) -> Result<serde_json::Value> {
    let data = payload(bytes);
    let (mut sent, mut received) = (0u64, 0u64);
    let mut ports = Vec::new();
    let mut retransmitted = 0u64;
    let mut total_retrans: Vec<u32> = Vec::new();
    for k in 0..connections {
        if k > 0 {
            std::thread::sleep(interval);
        }
        let what = || format!("connection {} of {connections} to {to}", k + 1);
        let mut s = TcpStream::connect_timeout(&to, timeout)
            .with_context(|| format!("{}: connect", what()))?;
        ports.push(
            s.local_addr()
                .with_context(|| format!("{}: local address", what()))?
                .port(),
        );
        s.set_read_timeout(Some(timeout))
            .context("setting read timeout")?;
        s.set_write_timeout(Some(timeout))
            .context("setting write timeout")?;
        s.write_all(&data)
            .with_context(|| format!("{}: write", what()))?;
        sent += bytes as u64;
        s.shutdown(Shutdown::Write)
            .with_context(|| format!("{}: shutdown(Write)", what()))?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .with_context(|| format!("{}: reading reply to EOF", what()))?;
        received += back.len() as u64;
        let info = tcp_retransmissions(&s).with_context(|| format!("{}: TCP_INFO", what()))?;
        retransmitted += info.bytes;
        total_retrans.push(info.segments);
    }
    Ok(json!({
        "sent_bytes": sent,
        "received_bytes": received,
        "connections": connections,
        "local_ports": ports,
        "retransmitted_bytes": retransmitted,
        "total_retrans": total_retrans.iter().map(|&n| u64::from(n)).sum::<u64>(),
        "total_retrans_per_connection": total_retrans,
    }))
}

/// What a connected socket's TCP_INFO says it retransmitted.
struct Retransmissions {
    /// `tcpi_bytes_retrans`: payload bytes sent more than once (retransmissions and loss
    /// probes).
    bytes: u64,
    /// `tcpi_total_retrans`: segments retransmitted over the connection's life (a
    /// retransmitted GSO packet counts as its segments).
    segments: u32,
}

/// Reads [`Retransmissions`] by offset from `struct tcp_info` (linux/tcp.h): `tcpi_total_retrans`
/// at byte 100, `tcpi_bytes_retrans` at byte 208 (since Linux 4.19; the libc crate's struct
/// stops before it).
fn tcp_retransmissions(s: &TcpStream) -> Result<Retransmissions> {
    const TOTAL_RETRANS_AT: usize = std::mem::offset_of!(libc::tcp_info, tcpi_total_retrans);
    const BYTES_RETRANS_AT: usize = 208;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(TCP_INFO)");
    }
    let field = |at: usize, size: usize, name: &str| {
        info.get(at..at + size)
            .filter(|_| len as usize >= at + size)
            .with_context(|| format!("TCP_INFO is {len} bytes: this kernel has no {name}"))
    };
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(field(BYTES_RETRANS_AT, 8, "tcpi_bytes_retrans")?);
    let mut segments = [0u8; 4];
    segments.copy_from_slice(field(TOTAL_RETRANS_AT, 4, "tcpi_total_retrans")?);
    Ok(Retransmissions {
        bytes: u64::from_ne_bytes(bytes),
        segments: u32::from_ne_bytes(segments),
    })
}

/// AF_PACKET helpers (raw frames in and out, MAC lookup) on top of libc.
mod raw {
    use super::*;

    /// `sll_pkttype` of frames the host itself sent (linux/if_packet.h); captures skip them.
    const PACKET_OUTGOING: u8 = 4;

    fn ifindex(iface: &str) -> Result<i32> {
        let name = std::ffi::CString::new(iface).context("interface name contains NUL")?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if idx == 0 {
            bail!(
                "no interface {iface:?} in this network namespace (run ftgen via `ip netns exec`)"
            );
        }
        i32::try_from(idx).context("ifindex out of range")
    }

    fn packet_socket(protocol: u16) -> Result<OwnedFd> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol.to_be())) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("creating AF_PACKET socket (needs CAP_NET_RAW)");
        }
        // SAFETY: `fd` is a freshly created descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn sockaddr_ll(ifindex: i32, protocol_be: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = protocol_be;
        sll.sll_ifindex = ifindex;
        sll
    }

    /// Where to send `frame` on `ifindex`: its EtherType (already big-endian, so skb->protocol
    /// matches what a NIC would have produced) and its destination MAC.
    fn frame_dest(ifindex: i32, frame: &[u8]) -> libc::sockaddr_ll {
        let mut sll = sockaddr_ll(ifindex, u16::from_ne_bytes([frame[12], frame[13]]));
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        sll
    }

    /// Sends one frame to `sll` on a packet socket.
    fn send_frame(sock: &OwnedFd, sll: &libc::sockaddr_ll, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: buffer and address pointers/lengths describe valid memory for the call.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Frames `flood` hands the kernel per sendmmsg(2).
    const SEND_BATCH: usize = 64;

    /// Sends `frames` to `sll` on a packet socket with as few sendmmsg(2) calls as the
    /// kernel takes them in (all in one, unless it stops early).
    fn send_frames(sock: &OwnedFd, sll: &libc::sockaddr_ll, frames: &[Vec<u8>]) -> Result<()> {
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr().cast_mut().cast(),
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: msghdr is plain old data; all-zero is a valid value.
                let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                hdr.msg_name = std::ptr::from_ref(sll).cast_mut().cast();
                hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                hdr.msg_iov = iov;
                hdr.msg_iovlen = 1;
                libc::mmsghdr {
                    msg_hdr: hdr,
                    msg_len: 0,
                }
            })
            .collect();
        let mut done = 0;
        while done < msgs.len() {
            let rest = &mut msgs[done..];
            // SAFETY: every header points at a live iovec, frame and address for the call.
            let n = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), rest.as_mut_ptr(), rest.len() as u32, 0)
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error()).context("sendmmsg on a packet socket");
            }
            if n == 0 {
                bail!("sendmmsg on a packet socket sent nothing");
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Receives one frame into `buf`: its length and where it came from.
    fn recv_frame(
        sock: &OwnedFd,
        buf: &mut [u8],
        flags: i32,
    ) -> std::io::Result<(usize, libc::sockaddr_ll)> {
        // SAFETY: zeroed sockaddr_ll is valid; recvfrom fills at most `len` bytes of it.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
                std::ptr::addr_of_mut!(from).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((n as usize, from))
    }

    /// Like `recv_frame`, on a socket with SO_TIMESTAMPNS set: also how long ago the kernel
    /// received the frame (its skb timestamp against the clock now), so a relay that woke
    /// late still knows when the frame arrived.
    fn recv_frame_aged(
        sock: &OwnedFd,
        buf: &mut [u8],
        flags: i32,
    ) -> std::io::Result<(usize, libc::sockaddr_ll, Duration)> {
        // SAFETY: zeroed sockaddr_ll, iovec, msghdr and control buffer are valid values.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: see above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = std::ptr::addr_of_mut!(from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: every pointer in `msg` is valid for the lengths it gives.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut age = Duration::ZERO;
        // SAFETY: the CMSG macros walk the control buffer the kernel filled, within
        // msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    let at = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                    age = now.saturating_sub(at).min(Duration::from_secs(1));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, from, age))
    }

    pub fn send(iface: &str, frame: &[u8], count: u64) -> Result<serde_json::Value> {
        if frame.len() < 14 {
            bail!(
                "frame is {} bytes; an Ethernet frame needs at least the 14-byte header",
                frame.len()
            );
        }
        let idx = ifindex(iface)?;
        // Protocol 0: this socket only sends, it must not queue received frames.
        let sock = packet_socket(0)?;
        let sll = frame_dest(idx, frame);
        for k in 0..count {
            send_frame(&sock, &sll, frame)
                .with_context(|| format!("sending frame {k} on {iface}"))?;
        }
        Ok(json!({ "sent": count }))
    }

    /// What `flood` sends.
    pub struct Flood {
        pub src_mac: [u8; 6],
        pub dst_mac: [u8; 6],
        pub src: std::net::Ipv4Addr,
        pub src_count: u32,
        pub dst: std::net::Ipv4Addr,
        pub dst_port: u16,
        pub ports: (u16, u16),
    }

    /// The IPv4 header checksum (RFC 791) of `header`.
    fn ipv4_checksum(header: &[u8]) -> u16 {
        let mut sum: u32 = header
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Sends `f`'s frames for `duration` at `pps`, one source port after the other.
    pub fn flood(
        iface: &str,
        f: &Flood,
        pps: u64,
        duration: Duration,
        ready: Option<&Path>,
    ) -> Result<serde_json::Value> {
        const PAYLOAD: &[u8; 32] = b"flowtrace identical datagram 32b";
        let mut frame = Vec::with_capacity(14 + 20 + 8 + PAYLOAD.len());
        frame.extend_from_slice(&f.dst_mac);
        frame.extend_from_slice(&f.src_mac);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        let total = (20 + 8 + PAYLOAD.len()) as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        // Identification 0 with DF, as Linux sends small DF datagrams on some paths.
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&f.src.octets());
        ip[16..20].copy_from_slice(&f.dst.octets());
        let c = ipv4_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        frame.extend_from_slice(&ip);
        let udp_at = frame.len();
        frame.extend_from_slice(&[0u8; 8]);
        frame[udp_at + 2..udp_at + 4].copy_from_slice(&f.dst_port.to_be_bytes());
        frame[udp_at + 4..udp_at + 6].copy_from_slice(&(8 + PAYLOAD.len() as u16).to_be_bytes());
        // Checksum 0: none (allowed for UDP over IPv4), so the frames differ in the port only.
        frame.extend_from_slice(PAYLOAD);

        let idx = ifindex(iface)?;
        let sock = packet_socket(0)?;
        let sll = frame_dest(idx, &frame);
        let start = std::time::Instant::now();
        let (first, last) = f.ports;
        let (mut port, mut host, mut sent) = (first, 0u32, 0u64);
        let ip_at = 14;
        // Frame `frame` as sent from source address number `host` and source port `port`.
        let set_tuple = |frame: &mut [u8], host: u32, port: u16| {
            let addr = u32::from(f.src).wrapping_add(host).to_be_bytes();
            frame[ip_at + 12..ip_at + 16].copy_from_slice(&addr);
            frame[ip_at + 10..ip_at + 12].copy_from_slice(&[0, 0]);
            let c = ipv4_checksum(&frame[ip_at..ip_at + 20]);
            frame[ip_at + 10..ip_at + 12].copy_from_slice(&c.to_be_bytes());
            frame[udp_at..udp_at + 2].copy_from_slice(&port.to_be_bytes());
        };
        // Sent in batches of 64 frames, one sendmmsg(2) each: a syscall per frame held the
        // sender near 60 000 frames a second on this VM. The pacing sleeps between batches.
        let mut batch = vec![frame.clone(); SEND_BATCH];
        touch(ready)?;
        while start.elapsed() < duration {
            for frame in batch.iter_mut() {
                set_tuple(frame, host, port);
                if port == last {
                    port = first;
                    host = (host + 1) % f.src_count;
                } else {
                    port += 1;
                }
            }
            send_frames(&sock, &sll, &batch)
                .with_context(|| format!("sending frames {sent}.. on {iface}"))?;
            sent += batch.len() as u64;
            let due = Duration::from_nanos(sent.saturating_mul(1_000_000_000) / pps.max(1));
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        // The walk is fixed (every port of every address in turn), so the distinct values
        // follow from the count.
        let ports = u64::from(last - first) + 1;
        Ok(json!({
            "sent": sent,
            "ports": sent.min(ports),
            "tuples": sent.min(ports * u64::from(f.src_count)),
        }))
    }

    /// Which captured frames to keep (all conditions must hold).
    pub struct Filter {
        pub ethertype: Option<u16>,
        pub src_mac: Option<[u8; 6]>,
        pub dst_mac: Option<[u8; 6]>,
    }

    impl Filter {
        pub fn matches(&self, frame: &[u8]) -> bool {
            if frame.len() < 14 {
                return self.ethertype.is_none()
                    && self.src_mac.is_none()
                    && self.dst_mac.is_none();
            }
            let et_ok = self
                .ethertype
                .is_none_or(|et| u16::from_be_bytes([frame[12], frame[13]]) == et);
            let src_ok = self.src_mac.is_none_or(|m| frame[6..12] == m);
            let dst_ok = self.dst_mac.is_none_or(|m| frame[..6] == m);
            et_ok && src_ok && dst_ok
        }
    }

    pub fn capture(
        iface: &str,
        count: usize,
        timeout: Duration,
        filter: Filter,
        ready: Option<&Path>,
    ) -> Result<serde_json::Value> {
        let (sock, idx) = bound_socket(iface)?;
        touch(ready)?;
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        while frames.len() < count {
            let Some(left) = remaining(deadline) else {
                break;
            };
            let mut pfd = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let wait = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let ready_n = unsafe { libc::poll(&mut pfd, 1, wait) };
            if ready_n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("poll on capture socket");
            }
            if ready_n == 0 {
                continue;
            }
            let (n, from) =
                recv_frame(&sock, &mut buf, 0).context("receiving on capture socket")?;
            let frame = &buf[..n];
            // Frames queued between socket() and bind() may come from other interfaces.
            if from.sll_ifindex != idx || from.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            if !filter.matches(frame) {
                continue;
            }
            frames.push(to_hex(frame));
        }
        Ok(json!({ "frames": frames }))
    }

    /// A bound receiving socket on `iface` (every EtherType).
    fn bound_socket(iface: &str) -> Result<(OwnedFd, i32)> {
        let idx = ifindex(iface)?;
        let sock = packet_socket(libc::ETH_P_ALL as u16)?;
        let sll = sockaddr_ll(idx, (libc::ETH_P_ALL as u16).to_be());
        // SAFETY: `sll` is a valid sockaddr_ll and the length matches it.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                std::ptr::addr_of!(sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("binding AF_PACKET socket to {iface}"));
        }
        Ok((sock, idx))
    }

    /// Relays frames arriving on `from` (socket `sock`, ifindex `idx`) to `to`, each sent
    /// once it has been held `delay`, until `stop`. One thread per direction: the frame
    /// waits in a queue and ppoll(2) sleeps exactly until the next one is due or a frame
    /// arrives. Returns (frames, total hold ns, max hold ns, send errors).
    /// What one direction of the delay line held: all frames, and the handshake's.
    #[derive(Debug, Default)]
    struct Holds {
        frames: u64,
        total: u128,
        max: u128,
        errors: u64,
        syn_frames: u64,
        syn_total: u128,
        /// VXLAN frames that arrived (relayed or dropped).
        vxlan_frames: u64,
        /// VXLAN frames dropped on purpose (`--drop-every`).
        dropped: u64,
        /// Frames the kernel dropped because the relay's socket queue was full (lost on the
        /// line too, without the relay ever seeing them).
        socket_drops: u64,
    }

    /// `SOL_PACKET` option reading (and resetting) a packet socket's `struct tpacket_stats`
    /// (linux/if_packet.h): frames queued and frames dropped for a full queue.
    const PACKET_STATISTICS: libc::c_int = 6;

    /// Sets the receive buffer of `sock` to `bytes`, past `net.core.rmem_max`
    /// (SO_RCVBUFFORCE, CAP_NET_ADMIN).
    fn force_rcvbuf(sock: &OwnedFd, bytes: usize) -> Result<()> {
        let val = libc::c_int::try_from(bytes).context("--socket-buffer does not fit a C int")?;
        // SAFETY: a valid socket and a c_int option value of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::from_ref(&val).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!("setsockopt(SO_RCVBUFFORCE, {bytes}) (needs CAP_NET_ADMIN)")
            });
        }
        Ok(())
    }

    /// Frames the kernel dropped on packet socket `sock` because its queue was full.
    fn packet_socket_drops(sock: &OwnedFd) -> Result<u64> {
        let mut stats = [0u32; 2];
        let mut len = std::mem::size_of_val(&stats) as libc::socklen_t;
        // SAFETY: `stats` is writable for `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_STATISTICS,
                stats.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .context("getsockopt(PACKET_STATISTICS) on the relay socket");
        }
        Ok(u64::from(stats[1]))
    }

    const TCP_SYN: u8 = 0x02;

    /// The TCP flags of the inner packet of a VXLAN frame on the underlay (outer Ethernet,
    /// IPv4, UDP to 4789 or 8472, VXLAN, inner Ethernet, IPv4 or IPv6 without extension
    /// headers, TCP); `None` for any other frame.
    pub fn vxlan_inner_tcp_flags(frame: &[u8]) -> Option<u8> {
        let be16 = |at: usize| Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
        let inner = vxlan_inner(frame)?;
        let (proto, l4) = match be16(inner + 12)? {
            0x0800 => {
                let ip = inner + 14;
                let ihl = usize::from(*frame.get(ip)? & 0x0f) * 4;
                (*frame.get(ip + 9)?, ip + ihl)
            }
            0x86dd => (*frame.get(inner + 14 + 6)?, inner + 14 + 40),
            _ => return None,
        };
        if proto != 6 {
            return None;
        }
        frame.get(l4 + 13).copied()
    }

    /// Where the inner Ethernet frame of a VXLAN frame on the underlay starts (outer Ethernet,
    /// IPv4, UDP to 4789 or 8472, VXLAN header); `None` for any other frame.
    pub fn vxlan_inner(frame: &[u8]) -> Option<usize> {
        let be16 = |at: usize| Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
        if be16(12)? != 0x0800 {
            return None;
        }
        let ihl = usize::from(*frame.get(14)? & 0x0f) * 4;
        if *frame.get(14 + 9)? != 17 || ihl < 20 {
            return None;
        }
        let udp = 14 + ihl;
        if !matches!(be16(udp + 2)?, 4789 | 8472) {
            return None;
        }
        Some(udp + 8 + 8)
    }

    /// One direction of the delay line: frames from `sock` (ifindex `idx`) to `to`, each held
    /// `delay`; every `drop_every`th VXLAN frame (0: none) is dropped instead.
    struct Leg<'a> {
        to: &'a str,
        delay: Duration,
        drop_every: u64,
    }

    fn relay(
        sock: OwnedFd,
        idx: i32,
        dir: &Leg<'_>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Holds> {
        let (to, delay) = (dir.to, dir.delay);
        let out_idx = ifindex(to)?;
        let out = packet_socket(0)?;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and an int option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                std::ptr::addr_of!(on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .context("SO_TIMESTAMPNS on the relay's receive socket");
        }
        let mut held: std::collections::VecDeque<(Instant, Vec<u8>)> =
            std::collections::VecDeque::new();
        let mut h = Holds::default();
        let mut buf = vec![0u8; 65536];
        loop {
            // Send everything due.
            while let Some((at, _)) = held.front() {
                if at.elapsed() < delay {
                    break;
                }
                let Some((at, frame)) = held.pop_front() else {
                    break;
                };
                // The hold ends when the send begins: sending on a veth delivers the frame
                // to the peer's stack inside the same call (the far node's processing, even
                // its answer, can run before it returns), which is the far node's time, not
                // the line's. Measured after the call, the hold overstated the line under
                // load by up to a millisecond (the latency test's old flake).
                let hold = at.elapsed().as_nanos();
                let sent = send_frame(&out, &frame_dest(out_idx, &frame), &frame);
                if sent.is_err() {
                    h.errors += 1;
                    continue;
                }
                h.frames += 1;
                h.total += hold;
                h.max = h.max.max(hold);
                if vxlan_inner_tcp_flags(&frame).is_some_and(|f| f & TCP_SYN != 0) {
                    h.syn_frames += 1;
                    h.syn_total += hold;
                }
            }
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                h.socket_drops = packet_socket_drops(&sock)?;
                return Ok(h);
            }
            // Sleep until the next frame is due (at most 20 ms, to notice `stop`).
            let wait = held
                .front()
                .map(|(at, _)| delay.saturating_sub(at.elapsed()))
                .unwrap_or(Duration::from_millis(20))
                .min(Duration::from_millis(20));
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            let mut pfd = libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd and a valid timespec.
            if unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) } <= 0 {
                continue;
            }
            let received = recv_frame_aged(&sock, &mut buf, libc::MSG_DONTWAIT);
            let (n, from, age) = match received {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e).context("relay receive"),
            };
            // Not an Ethernet frame from the wire (too short, or our own send).
            if n < 14 || from.sll_ifindex != idx || from.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            if vxlan_inner(&buf[..n]).is_some() {
                h.vxlan_frames += 1;
                if dir.drop_every > 0 && h.vxlan_frames % dir.drop_every == 0 {
                    h.dropped += 1;
                    continue;
                }
            }
            // Held from when the kernel received it, not from when this thread got to it.
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            held.push_back((at, buf[..n].to_vec()));
        }
    }

    pub fn delay_line(
        ifaces: [&str; 2],
        delays: [Duration; 2],
        drop_every: [u64; 2],
        socket_buffer: Option<usize>,
        stop_file: &Path,
        ready: Option<&Path>,
    ) -> Result<serde_json::Value> {
        // Sleep to the microsecond, not to the default 50 µs timer slack.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut relays = Vec::new();
        for k in 0..2 {
            let (from, to, delay, every) = (
                ifaces[k],
                ifaces[1 - k].to_string(),
                delays[k],
                drop_every[k],
            );
            let (sock, idx) = bound_socket(from)?;
            if let Some(bytes) = socket_buffer {
                force_rcvbuf(&sock, bytes)
                    .with_context(|| format!("the relay socket on {from}"))?;
            }
            let stop = stop.clone();
            relays.push(std::thread::spawn(move || {
                let dir = Leg {
                    to: &to,
                    delay,
                    drop_every: every,
                };
                relay(sock, idx, &dir, &stop)
            }));
        }
        touch(ready)?;
        while !stop_file.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut out = serde_json::Map::new();
        for (name, t) in ["a_to_b", "b_to_a"].into_iter().zip(relays) {
            let h = t
                .join()
                .map_err(|_| anyhow::anyhow!("relay sender panicked"))??;
            let mean = |total: u128, n: u64| {
                if n == 0 {
                    0
                } else {
                    (total / u128::from(n)) as u64
                }
            };
            out.insert(
                name.to_string(),
                json!({
                    "frames": h.frames,
                    "mean_hold_ns": mean(h.total, h.frames),
                    "max_hold_ns": h.max as u64,
                    "send_errors": h.errors,
                    "syn_frames": h.syn_frames,
                    "syn_mean_hold_ns": mean(h.syn_total, h.syn_frames),
                    "vxlan_frames": h.vxlan_frames,
                    "dropped": h.dropped,
                    "socket_drops": h.socket_drops,
                }),
            );
        }
        Ok(serde_json::Value::Object(out))
    }

    pub fn mac(iface: &str) -> Result<String> {
        if iface.len() >= libc::IFNAMSIZ {
            bail!(
                "interface name {iface:?} is longer than {} bytes",
                libc::IFNAMSIZ - 1
            );
        }
        // SAFETY: plain socket(2); result checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("creating socket for SIOCGIFHWADDR");
        }
        // SAFETY: freshly created descriptor, owned here.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(iface.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: `ifr` is a valid ifreq with a NUL-terminated name (zeroed tail).
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!("SIOCGIFHWADDR on {iface:?} (does it exist in this namespace?)")
            });
        }
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
        let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
        Ok(data[..6]
            .iter()
            .map(|&b| format!("{:02x}", b as u8))
            .collect::<Vec<_>>()
            .join(":"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // the workspace lint targets production code
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_ignores_separators() {
        let b = parse_hex("0a:58 0A-f4\n01").unwrap();
        assert_eq!(b, vec![0x0a, 0x58, 0x0a, 0xf4, 0x01]);
        assert_eq!(to_hex(&b), "0a580af401");
        assert!(parse_hex("abc").is_err());
        assert!(parse_hex("zz").is_err());
    }

    #[test]
    fn bind_accepts_ip_or_socket_addr() {
        assert_eq!(
            parse_bind("10.0.0.1").unwrap(),
            "10.0.0.1:0".parse().unwrap()
        );
        assert_eq!(parse_bind("[::1]:5").unwrap(), "[::1]:5".parse().unwrap());
        assert!(parse_bind("nope").is_err());
        assert_eq!(parse_ethertype("0x86dd").unwrap(), 0x86dd);
        assert_eq!(
            parse_mac("0a:58:0a:f4:01:0a").unwrap(),
            [0x0a, 0x58, 0x0a, 0xf4, 1, 0x0a]
        );
        assert!(parse_mac("0a:58").is_err());
    }

    #[test]
    fn vxlan_frames_give_their_inner_tcp_flags() {
        // Outer Ethernet + IPv4 (IHL 5, UDP) + UDP to 8472 + VXLAN + inner Ethernet + IPv4 +
        // TCP with SYN.
        let mut f = vec![0u8; 14 + 20 + 8 + 8 + 14 + 20 + 20];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 9] = 17;
        f[34 + 2..34 + 4].copy_from_slice(&8472u16.to_be_bytes());
        let inner = 34 + 16;
        f[inner + 12..inner + 14].copy_from_slice(&[0x08, 0x00]);
        f[inner + 14] = 0x45;
        f[inner + 14 + 9] = 6;
        f[inner + 14 + 20 + 13] = 0x12;
        assert_eq!(raw::vxlan_inner_tcp_flags(&f), Some(0x12));
        // Not VXLAN's port, inner UDP, truncated: none.
        let mut g = f.clone();
        g[34 + 2..34 + 4].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(raw::vxlan_inner_tcp_flags(&g), None);
        let mut g = f.clone();
        g[inner + 14 + 9] = 17;
        assert_eq!(raw::vxlan_inner_tcp_flags(&g), None);
        assert_eq!(raw::vxlan_inner_tcp_flags(&f[..f.len() - 10]), None);
    }

    #[test]
    fn udp_drops_are_read_from_the_sockets_line() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  152: 00000000:B79C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2758406 2 00000000518e0e63 17
  153: 00000000:B79D 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2758407 2 00000000518e0e64 0
";
        assert_eq!(parse_udp_drops(table, 2758406), Some(17));
        assert_eq!(parse_udp_drops(table, 2758407), Some(0));
        assert_eq!(parse_udp_drops(table, 1), None);
    }

    #[test]
    fn vxlan_frames_are_recognised_by_their_outer_udp_port() {
        let mut f = vec![0u8; 14 + 20 + 8 + 8 + 14];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 9] = 17;
        f[34 + 2..34 + 4].copy_from_slice(&8472u16.to_be_bytes());
        assert_eq!(raw::vxlan_inner(&f), Some(50));
        f[34 + 2..34 + 4].copy_from_slice(&4789u16.to_be_bytes());
        assert_eq!(raw::vxlan_inner(&f), Some(50));
        f[34 + 2..34 + 4].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(raw::vxlan_inner(&f), None);
        // ARP.
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(raw::vxlan_inner(&f), None);
    }

    #[test]
    fn capture_filter_checks_ethertype_source_and_destination() {
        let mut frame = vec![0u8; 14];
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        let f = |ethertype, src_mac, dst_mac| raw::Filter {
            ethertype,
            src_mac,
            dst_mac,
        };
        assert!(f(None, None, None).matches(&frame));
        assert!(f(
            Some(0x0800),
            Some([2, 0, 0, 0, 0, 1]),
            Some([2, 0, 0, 0, 0, 9])
        )
        .matches(&frame));
        assert!(!f(Some(0x86dd), None, None).matches(&frame));
        assert!(!f(None, Some([2, 0, 0, 0, 0, 2]), None).matches(&frame));
        assert!(!f(None, None, Some([0x33, 0x33, 0, 0, 0, 0x16])).matches(&frame));
        assert!(!f(Some(0x0800), None, None).matches(&frame[..10]));
        assert!(!f(None, None, Some([2, 0, 0, 0, 0, 9])).matches(&frame[..10]));
    }
}
