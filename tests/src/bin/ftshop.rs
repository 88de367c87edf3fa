//! The SockShop stand-ins: one process per pod of the SockShop scenario
//! (`flowtrace_tests::sockshop`), speaking its call graph over real TCP and counting every
//! byte it sends and receives, per peer, as ground truth for the map.
//!
//! - `ftshop http --role ROLE --listen ADDR --peer NAME=IP:PORT...`: a SockShop service
//!   (front-end, catalogue, carts, orders, user, payment, shipping). HTTP/1.1, one request
//!   per connection; each route calls its downstream services, then answers.
//! - `ftshop store --listen ADDR`: a database or the queue (catalogue-db, carts-db, orders-db,
//!   user-db, rabbitmq): a line protocol, `N <padding>\n` asks for N bytes back.
//! - `ftshop consume --peer rabbitmq=IP:PORT --interval-ms N`: queue-master, polling the queue.
//!
//! Every mode runs until `--stop-file` exists, waits for calls in flight, and prints its
//! counts as JSON on stdout: `served` (per client address: connections, bytes received and
//! sent) and `calls` (per peer name: connections, bytes sent and received, errors).
//! Payload bytes only: what the applications wrote and read, which is what flowtrace's
//! payload counts must equal.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// Stop (and print the counts) once this file exists.
    #[arg(long, global = true)]
    stop_file: Option<PathBuf>,
    /// Touched once listening.
    #[arg(long, global = true)]
    ready_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Mode {
    Http {
        #[arg(long)]
        role: String,
        #[arg(long)]
        listen: SocketAddr,
        /// Downstream services, NAME=IP:PORT (their Service addresses).
        #[arg(long = "peer", value_parser = parse_peer)]
        peers: Vec<(String, SocketAddr)>,
    },
    Store {
        #[arg(long)]
        listen: SocketAddr,
    },
    Consume {
        #[arg(long = "peer", value_parser = parse_peer)]
        peers: Vec<(String, SocketAddr)>,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
}

fn parse_peer(s: &str) -> std::result::Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=IP:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{s:?}: bad address ({e})"))?;
    Ok((name.to_string(), addr))
}

/// Counts of one side of some connections.
#[derive(Default, Clone, Copy)]
struct Count {
    connections: u64,
    /// Bytes this process wrote.
    sent: u64,
    /// Bytes this process read.
    received: u64,
    errors: u64,
}

#[derive(Default)]
struct Counts {
    served: BTreeMap<String, Count>,
    calls: BTreeMap<String, Count>,
}

type Shared = Arc<Mutex<Counts>>;

fn lock(c: &Shared) -> std::sync::MutexGuard<'_, Counts> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP exchange with peer `name` at `addr`: the request (with `body` bytes of body),
/// then the whole answer until the server closes. Counted under `name`.
fn call_http(
    counts: &Shared,
    name: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: usize,
) -> Result<usize> {
    let result = (|| -> Result<(usize, usize)> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
            .with_context(|| format!("connecting to {name} at {addr}"))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {name}\r\nContent-Length: {body}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        req.resize(req.len() + body, b'x');
        s.write_all(&req)?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .with_context(|| format!("reading {name}'s answer"))?;
        if !answer.starts_with(b"HTTP/1.1 200") {
            bail!(
                "{name} answered {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(40)])
            );
        }
        Ok((req.len(), answer.len()))
    })();
    count_call(counts, name, result)
}

/// Counts one call to peer `name` (bytes sent and received, or an error); returns the bytes
/// received.
fn count_call(counts: &Shared, name: &str, result: Result<(usize, usize)>) -> Result<usize> {
    let mut c = lock(counts);
    let e = c.calls.entry(name.to_string()).or_default();
    match result {
        Ok((sent, received)) => {
            e.connections += 1;
            e.sent += sent as u64;
            e.received += received as u64;
            Ok(received)
        }
        Err(err) => {
            e.errors += 1;
            Err(err)
        }
    }
}

/// One query to a store: asks for `want` bytes with a query of `query` bytes.
fn call_store(
    counts: &Shared,
    name: &str,
    addr: SocketAddr,
    query: usize,
    want: usize,
) -> Result<()> {
    let result = (|| -> Result<(usize, usize)> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
            .with_context(|| format!("connecting to {name} at {addr}"))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut q = format!("{want} ").into_bytes();
        q.resize(query.max(q.len() + 1) - 1, b'q');
        q.push(b'\n');
        s.write_all(&q)?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .with_context(|| format!("reading {name}'s answer"))?;
        if answer.len() != want {
            bail!("{name} answered {} bytes, not {want}", answer.len());
        }
        Ok((q.len(), answer.len()))
    })();
    count_call(counts, name, result).map(drop)
}

/// What a service does for one route: its downstream calls and the size of its answer.
fn route(
    role: &str,
    method: &str,
    path: &str,
    peers: &BTreeMap<String, SocketAddr>,
    counts: &Shared,
) -> Result<usize> {
    let peer = |n: &str| {
        peers
            .get(n)
            .copied()
            .ok_or_else(|| anyhow!("{role} has no peer {n}"))
    };
    let http = |n: &str, m: &str, p: &str, body: usize| call_http(counts, n, peer(n)?, m, p, body);
    let store = |n: &str, q: usize, want: usize| call_store(counts, n, peer(n)?, q, want);
    Ok(match (role, method) {
        ("front-end", "GET") if path == "/" => {
            http("catalogue", "GET", "/catalogue", 0)?;
            3200
        }
        ("front-end", "GET") if path.starts_with("/catalogue/") => {
            http("catalogue", "GET", path, 0)?;
            1400
        }
        ("front-end", "GET") if path == "/login" => {
            http("user", "GET", "/login", 0)?;
            300
        }
        ("front-end", "POST") if path == "/cart" => {
            http("carts", "POST", "/carts/items", 120)?;
            180
        }
        ("front-end", "POST") if path == "/orders" => {
            http("orders", "POST", "/orders", 260)?;
            520
        }
        ("catalogue", "GET") => {
            store(
                "catalogue-db",
                90,
                if path == "/catalogue" { 1800 } else { 700 },
            )?;
            if path == "/catalogue" {
                2100
            } else {
                800
            }
        }
        ("carts", "POST") => {
            store("carts-db", 160, 40)?;
            90
        }
        ("carts", "GET") => {
            store("carts-db", 70, 500)?;
            620
        }
        ("user", "GET") => {
            store("user-db", 80, 350)?;
            420
        }
        ("orders", "POST") => {
            http("user", "GET", "/customers/1", 0)?;
            http("carts", "GET", "/carts/1", 0)?;
            http("payment", "POST", "/paymentAuth", 140)?;
            http("shipping", "POST", "/shipping", 200)?;
            store("orders-db", 400, 40)?;
            480
        }
        ("payment", "POST") => 110,
        ("shipping", "POST") => {
            store("rabbitmq", 230, 3)?;
            160
        }
        _ => bail!("{role} has no route {method} {path}"),
    })
}

/// Serves one HTTP connection: reads the request and its body, runs the route, answers.
fn serve_http(
    mut s: TcpStream,
    role: &str,
    peers: &BTreeMap<String, SocketAddr>,
    counts: &Shared,
) -> Result<(usize, usize)> {
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut received = 0;
    let mut line = String::new();
    received += reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (method, path) = (
        words.next().unwrap_or("").to_string(),
        words.next().unwrap_or("").to_string(),
    );
    let mut body = 0usize;
    loop {
        let mut h = String::new();
        let n = reader.read_line(&mut h)?;
        received += n;
        if n == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h
            .to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().to_string())
        {
            body = v.parse().context("Content-Length")?;
        }
    }
    let mut b = vec![0u8; body];
    reader.read_exact(&mut b)?;
    received += body;
    let (status, size) = match route(role, &method, &path, peers, counts) {
        Ok(n) => ("200 OK", n),
        Err(e) => {
            eprintln!("ftshop {role}: {method} {path}: {e:#}");
            ("502 Bad Gateway", 0)
        }
    };
    let mut answer =
        format!("HTTP/1.1 {status}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n")
            .into_bytes();
    answer.resize(answer.len() + size, b'a');
    s.write_all(&answer)?;
    Ok((received, answer.len()))
}

/// Serves one store connection: `N ...\n` in, N bytes out.
fn serve_store(mut s: TcpStream) -> Result<(usize, usize)> {
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut q = Vec::new();
    reader.read_until(b'\n', &mut q)?;
    let want: usize = String::from_utf8_lossy(&q)
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| anyhow!("bad query {:?}", String::from_utf8_lossy(&q)))?;
    s.write_all(&vec![b'r'; want])?;
    Ok((q.len(), want))
}

fn counts_json(c: &Counts) -> serde_json::Value {
    let side = |m: &BTreeMap<String, Count>, sent: &str, received: &str| {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!({"connections": v.connections, sent: v.sent, received: v.received,
                           "errors": v.errors}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
    };
    json!({
        "served": side(&c.served, "sent_bytes", "received_bytes"),
        "calls": side(&c.calls, "sent_bytes", "received_bytes"),
    })
}

fn stopped(stop: &Option<PathBuf>) -> bool {
    stop.as_ref().is_some_and(|p| p.exists())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let counts: Shared = Arc::default();
    let busy = Arc::new(AtomicUsize::new(0));
    match cli.mode {
        Mode::Http { listen, .. } | Mode::Store { listen } => {
            let listener =
                TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            let (role, peers) = match &cli.mode {
                Mode::Http { role, peers, .. } => {
                    (Some(role.clone()), peers.iter().cloned().collect())
                }
                _ => (None, BTreeMap::new()),
            };
            let peers: Arc<BTreeMap<String, SocketAddr>> = Arc::new(peers);
            {
                let (counts, busy) = (counts.clone(), busy.clone());
                std::thread::spawn(move || {
                    for conn in listener.incoming() {
                        let Ok(s) = conn else { continue };
                        let from = s
                            .peer_addr()
                            .map(|a| a.ip().to_string())
                            .unwrap_or_default();
                        let (counts, busy, peers, role) =
                            (counts.clone(), busy.clone(), peers.clone(), role.clone());
                        busy.fetch_add(1, Ordering::SeqCst);
                        std::thread::spawn(move || {
                            let r = match &role {
                                Some(role) => serve_http(s, role, &peers, &counts),
                                None => serve_store(s),
                            };
                            let mut c = lock(&counts);
                            let e = c.served.entry(from).or_default();
                            match r {
                                Ok((received, sent)) => {
                                    e.connections += 1;
                                    e.received += received as u64;
                                    e.sent += sent as u64;
                                }
                                Err(err) => {
                                    e.errors += 1;
                                    eprintln!("ftshop: serving: {err:#}");
                                }
                            }
                            drop(c);
                            busy.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                });
            }
            if let Some(r) = &cli.ready_file {
                std::fs::write(r, b"").with_context(|| format!("touching {}", r.display()))?;
            }
            while !stopped(&cli.stop_file) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Mode::Consume { peers, interval_ms } => {
            let (name, addr) = peers
                .first()
                .cloned()
                .ok_or_else(|| anyhow!("consume needs --peer rabbitmq=IP:PORT"))?;
            if let Some(r) = &cli.ready_file {
                std::fs::write(r, b"").with_context(|| format!("touching {}", r.display()))?;
            }
            while !stopped(&cli.stop_file) {
                if let Err(e) = call_store(&counts, &name, addr, 40, 64) {
                    eprintln!("ftshop consume: {e:#}");
                }
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
        }
    }
    // Calls in flight finish (and are counted) before the counts are printed.
    let deadline = Instant::now() + TIMEOUT;
    while busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("{}", counts_json(&lock(&counts)));
    Ok(())
}
