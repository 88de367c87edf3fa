//! `cargo xtask microbench`: the CPU cost of each TC program on fixed packets, measured by
//! the kernel itself with BPF_PROG_TEST_RUN (`repeat` runs, average ns per run). No network,
//! no other traffic: the figure moves only when the program's code changes, which makes it the
//! tool for comparing two versions of flowtrace's kernel code. The flow stays in the per-CPU
//! cache after the first run, so this is the bulk-transfer (cache hit) path; the iperf3 run of
//! `cargo xtask bench` measures the real mix.
//!
//! The miss rows then measure what a flood of new tuples costs, piece by piece: each run a
//! packet of a tuple never seen (one run per call, the no-op timed the same way for the
//! call's own cost), into a freshly drained cache (an empty slot) or into one filled with
//! other flows (a slot taken: its counters go to the event ring first). ICMP echo packets
//! never take the slow path (no sighting, no tail call), so the rows differ by one piece
//! each: the fine clock and slot write, the hand-over to the ring, the slow path.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{bail, Context, Result};
use aya::{programs::SchedClassifier, Ebpf};
use flowtrace_tests::baselines;

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn test_run(prog: &SchedClassifier, packet: &[u8], repeat: u32) -> Result<u32> {
    let fd = prog.fd().context("program fd")?;
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr is a valid bpf_attr prefix; the buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc != 0 {
        bail!(
            "BPF_PROG_TEST_RUN failed: {}",
            std::io::Error::last_os_error()
        );
    }
    if out[..packet.len()] != *packet {
        bail!("the program changed the packet");
    }
    Ok(attr.duration)
}

fn load_prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a SchedClassifier> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(prog)
}

fn tcp_v4(payload: usize) -> Vec<u8> {
    tcp_v4_flags(payload, 0x18)
}

fn tcp_v4_flags(payload: usize, flags: u8) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let tot = (20 + 32 + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 244, 1, 10, 10, 244, 2, 11]);
    f.extend_from_slice(&[
        0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 1, 0x80, flags, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    f.resize(f.len() + payload, 0x61);
    f
}

/// An IPv4 frame from `10.(i >> 16).(i >> 8).i` to 10.244.2.11 carrying `l4` (the transport
/// header) then `payload` bytes of `fill`.
fn ipv4_from(i: u32, protocol: u8, l4: &[u8], payload: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let tot = (20 + l4.len() + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&tot.to_be_bytes());
    let a = i.to_be_bytes();
    f.extend_from_slice(&[
        0, 1, 0x40, 0, 64, protocol, 0, 0, 10, a[1], a[2], a[3], 10, 244, 2, 11,
    ]);
    f.extend_from_slice(l4);
    f.resize(f.len() + payload, fill);
    f
}

/// IPv4 UDP, 64 bytes of payload, from `10.(i >> 16).(i >> 8).i` port `1024 + i % 60000`.
fn udp_v4_from(i: u32) -> Vec<u8> {
    let port = ((1024 + i % 60_000) as u16).to_be_bytes();
    ipv4_from(
        i,
        17,
        &[port[0], port[1], 0x1f, 0x90, 0, 72, 0, 0],
        64,
        0x63,
    )
}

/// IPv4 ICMP echo request, 56 bytes of data, from `10.(i >> 16).(i >> 8).i`, identifier `i`.
fn icmp_v4_from(i: u32) -> Vec<u8> {
    let id = (i as u16).to_be_bytes();
    ipv4_from(i, 1, &[8, 0, 0, 0, id[0], id[1], 0, 1], 56, 0x64)
}

fn udp_v6(payload: usize) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[17, 64]);
    f.extend_from_slice(&[
        0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ]);
    f.extend_from_slice(&[
        0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0x11,
    ]);
    f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
    f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(f.len() + payload, 0x62);
    f
}

/// Another build of flowtrace's kernel programs, run in the same rounds as this one's.
struct Before {
    ebpf: Ebpf,
    control: flowtrace::kernel::drain::Drainer,
}

impl Before {
    fn set_latency_sampling(&mut self, rate: u32) -> Result<()> {
        self.control
            .set_latency_sampling(rate, 0)
            .context("setting the other build's latency sampling")
    }
}

pub fn run(
    repeat: u32,
    rounds: usize,
    sweep_mib: usize,
    before_object: Option<&std::path::Path>,
) -> Result<()> {
    let sizes = flowtrace::kernel::attach::buffer_sizes(
        flowtrace_common::DEFAULT_EVENT_RING_BYTES / (1024 * 1024),
    )
    .context("sizing flowtrace's buffers")?;
    let mut ft =
        flowtrace::kernel::attach::load(&sizes, flowtrace_common::drops::DEFAULT_DROP_ENTRIES)
            .context("loading flowtrace")?;
    let mut base = Ebpf::load(baselines::OBJECT).context("loading baselines")?;
    let mut before = match before_object {
        None => None,
        Some(path) => {
            let object = std::fs::read(path)
                .with_context(|| format!("reading the other build's object {}", path.display()))?;
            let mut ebpf = flowtrace::kernel::attach::load_object(
                &object,
                &sizes,
                flowtrace_common::drops::DEFAULT_DROP_ENTRIES,
            )
            .with_context(|| format!("loading the other build's object {}", path.display()))?;
            let control =
                flowtrace::kernel::drain::Drainer::new(&mut ebpf, sizes, std::time::Duration::ZERO)
                    .context("opening the other build's maps")?;
            Some(Before { ebpf, control })
        }
    };
    println!("BPF_PROG_TEST_RUN, {repeat} runs per figure, median of {rounds} rounds (ns per run)");
    print_header(before.is_some());
    // The control map as the agent leaves it; latency sampling is set per row.
    let mut control =
        flowtrace::kernel::drain::Drainer::new(&mut ft, sizes, std::time::Duration::ZERO)
            .context("opening flowtrace's maps")?;
    for (name, pkt, sample) in [
        ("IPv4 TCP 1000 B", tcp_v4(1000), 0),
        ("IPv6 UDP 100 B", udp_v6(100), 0),
        // The agent's default: 1 in 64 sampled for latency; this packet is not one of them.
        ("IPv4 TCP 1000 B, sample 64", tcp_v4(1000), 64),
        ("IPv4 TCP ACK, sample 64", tcp_v4_flags(0, 0x10), 64),
        // Every SYN goes through the sighting (NAT, latency, tracing) path.
        ("IPv4 TCP SYN", tcp_v4_flags(0, 0x02), 0),
        // Every packet sampled for latency (--latency-sample 1): the sighting path too.
        ("IPv4 TCP 1000 B, sample 1", tcp_v4(1000), 1),
    ] {
        control
            .set_latency_sampling(sample, 0)
            .context("setting latency sampling")?;
        if let Some(b) = before.as_mut() {
            b.set_latency_sampling(sample)?;
        }
        let mut figures = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            let timed = time_each(&mut base, &mut ft, before.as_mut(), &pkt, repeat, || ())?;
            for (f, t) in figures.iter_mut().zip(timed) {
                f.extend(t.map(f64::from));
            }
        }
        print_row(name, &mut figures);
    }
    // One CPU for the cold and the miss rows: the flow cache is per CPU.
    pin_to_cpu0()?;
    if sweep_mib > 0 {
        cold_rows(
            &mut ft,
            &mut base,
            &mut control,
            before.as_mut(),
            rounds,
            sweep_mib,
        )?;
    }
    control
        .set_latency_sampling(64, 0)
        .context("setting latency sampling")?;
    miss_rows(&mut ft, &mut base, &mut control, sizes.cache_slots, rounds)
}

/// One figure per program, in turn: the no-op, the counter, flowtrace and the other build
/// when there is one (`None` in its place when not), each `repeat` runs of `pkt`, with
/// `prepare` called before each (a cold row's sweep).
fn time_each(
    base: &mut Ebpf,
    ft: &mut Ebpf,
    before: Option<&mut Before>,
    pkt: &[u8],
    repeat: u32,
    mut prepare: impl FnMut(),
) -> Result<[Option<u32>; 4]> {
    let mut timed = [None; 4];
    prepare();
    timed[0] = Some(test_run(
        load_prog(base, baselines::BENCH_NOOP)?,
        pkt,
        repeat,
    )?);
    prepare();
    timed[1] = Some(test_run(
        load_prog(base, baselines::BENCH_COUNTER)?,
        pkt,
        repeat,
    )?);
    prepare();
    timed[2] = Some(test_run(
        load_prog(ft, flowtrace_common::programs::INGRESS)?,
        pkt,
        repeat,
    )?);
    if let Some(b) = before {
        prepare();
        timed[3] = Some(test_run(
            load_prog(&mut b.ebpf, flowtrace_common::programs::INGRESS)?,
            pkt,
            repeat,
        )?);
    }
    Ok(timed)
}

fn print_header(before: bool) {
    print!(
        "{:<28} {:>10} {:>14} {:>16} {:>10} {:>12}",
        "packet", "bench_noop", "bench_counter", "flowtrace_ingress", "ft net", "counter net"
    );
    if before {
        print!(" {:>11} {:>10}", "before net", "ft/before");
    }
    println!();
}

/// Prints a row's medians: the no-op, the counter, flowtrace, and the other build when it ran
/// (`figures[3]` not empty); each net of the no-op. Returns flowtrace's net figure.
fn print_row(name: &str, figures: &mut [Vec<f64>; 4]) -> f64 {
    let med = |v: &mut Vec<f64>| {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [n, c, f, b] = figures.each_mut().map(med);
    print!(
        "{name:<28} {n:>10.0} {c:>14.0} {f:>16.0} {:>10.0} {:>12.0}",
        f - n,
        c - n
    );
    if !b.is_nan() {
        print!(" {:>11.0} {:>10.3}", b - n, (f - n) / (b - n));
    }
    println!();
    f - n
}

/// Pins this thread to CPU 0: the flow cache is per CPU, and a cold row's sweep must evict
/// the caches of the CPU the program then runs on.
fn pin_to_cpu0() -> Result<()> {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("pinning to CPU 0: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Calls per round of a cold row, each after its own sweep.
const COLD_CALLS: usize = 200;

/// Reads every cache line of `buf`, which evicts from this CPU's caches what the last
/// program run left there (all of L1 and L2 when `buf` is larger than L2).
fn sweep(buf: &mut [u8]) {
    let mut acc = 0u8;
    for line in buf.chunks_mut(64) {
        acc = acc.wrapping_add(line[0]);
        line[0] = acc;
    }
    std::hint::black_box(acc);
}

/// The cold rows: the hot rows' packets (cache hits, one run per call), each call after a
/// sweep of `sweep_mib` MiB, so that the program's instructions and maps come from beyond L2
/// as they do under real traffic, where the kernel's own path runs between two packets of a
/// flow. Every program of a round is timed after the same sweep, one call in turn, so the
/// no-op's figure holds the call's own cold start and the net figure what the program adds.
fn cold_rows(
    ft: &mut Ebpf,
    base: &mut Ebpf,
    control: &mut flowtrace::kernel::drain::Drainer,
    mut before: Option<&mut Before>,
    rounds: usize,
    sweep_mib: usize,
) -> Result<()> {
    let mut buf = vec![1u8; sweep_mib * 1024 * 1024];
    println!(
        "cold: cache hits, one run per call after a {sweep_mib} MiB sweep, {COLD_CALLS} calls \
         per round, median of {rounds} rounds (ns per run)"
    );
    print_header(before.is_some());
    let rows = [
        ("IPv4 TCP 1000 B", tcp_v4(1000), 0),
        ("IPv4 TCP 1000 B, sample 64", tcp_v4(1000), 64),
        ("IPv4 TCP ACK", tcp_v4_flags(0, 0x10), 0),
        ("IPv4 TCP ACK, sample 64", tcp_v4_flags(0, 0x10), 64),
        ("IPv4 UDP 64 B", udp_v4_from(1), 0),
        ("IPv4 UDP 64 B, sample 64", udp_v4_from(1), 64),
        ("IPv4 TCP 1000 B, sample 1", tcp_v4(1000), 1),
    ];
    let mut nets = Vec::new();
    for (name, pkt, sample) in rows {
        control
            .set_latency_sampling(sample, 0)
            .context("setting latency sampling")?;
        // The flow takes its slot first: every timed call is a cache hit.
        test_run(load_prog(ft, flowtrace_common::programs::INGRESS)?, &pkt, 1)?;
        if let Some(b) = before.as_deref_mut() {
            b.set_latency_sampling(sample)?;
            test_run(
                load_prog(&mut b.ebpf, flowtrace_common::programs::INGRESS)?,
                &pkt,
                1,
            )?;
        }
        let mut figures = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            let mut sums = [None::<u64>; 4];
            for _ in 0..COLD_CALLS {
                let timed =
                    time_each(base, ft, before.as_deref_mut(), &pkt, 1, || sweep(&mut buf))?;
                for (sum, t) in sums.iter_mut().zip(timed) {
                    if let Some(t) = t {
                        *sum = Some(sum.unwrap_or(0) + u64::from(t));
                    }
                }
            }
            for (f, sum) in figures.iter_mut().zip(sums) {
                f.extend(sum.map(|s| s as f64 / COLD_CALLS as f64));
            }
        }
        nets.push(print_row(name, &mut figures));
    }
    if let &[tcp, tcp64, ack, ack64, udp, udp64, tcp1] = &nets[..] {
        println!(
            "cold, sampling 1 in 64 over sampling off (the decision every packet pays): TCP data \
             {:.0} ns, ACK {:.0}, UDP {:.0}; a sampled TCP segment's slow path over the \
             decision {:.0}",
            tcp64 - tcp,
            ack64 - ack,
            udp64 - udp,
            tcp1 - tcp64
        );
    }
    Ok(())
}

/// The `i`th packet of a row of new tuples.
type PacketOf = fn(u32) -> Vec<u8>;

/// Batches of new tuples per round of a miss row, each into a freshly drained cache.
const BATCHES_PER_ROUND: usize = 8;

/// Mean ns per run of `prog` over `packets`, one run per call.
fn one_run_each(prog: &SchedClassifier, packets: &[Vec<u8>]) -> Result<f64> {
    let mut total = 0u64;
    for p in packets {
        total += u64::from(test_run(prog, p, 1)?);
    }
    Ok(total as f64 / packets.len().max(1) as f64)
}

/// The miss rows (see the module's documentation), at the agent's default sampling.
/// The caller has pinned this thread to one CPU (the cache is per CPU).
fn miss_rows(
    ft: &mut Ebpf,
    base: &mut Ebpf,
    control: &mut flowtrace::kernel::drain::Drainer,
    cache_slots: u32,
    rounds: usize,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("starting a runtime for the drains")?;
    let ring = control.ring();
    // Few enough new tuples for an empty cache that they seldom meet (1 in 32 of the
    // slots); enough flows before a "taken" row that nearly every slot holds one.
    let batch = (cache_slots / 32).max(64);
    let fill = cache_slots * 8;
    let mut next = 0u32;
    let mut fresh = |n: u32, make: PacketOf| -> Vec<Vec<u8>> {
        let out = (next..next + n).map(make).collect();
        next += n;
        out
    };
    println!(
        "new tuples, one run per call, {} per round, median of {rounds} rounds (sample 64)",
        batch as usize * BATCHES_PER_ROUND
    );
    println!(
        "{:<36} {:>10} {:>16} {:>10} {:>12} {:>12} {:>10}",
        "packet",
        "bench_noop",
        "flowtrace_ingress",
        "ft net",
        "handed over",
        "again (hit)",
        "hit net"
    );
    let rows: [(&str, PacketOf, bool); 4] = [
        ("ICMP new tuple, empty slot", icmp_v4_from, false),
        ("ICMP new tuple, slot taken", icmp_v4_from, true),
        ("UDP new tuple, empty slot", udp_v4_from, false),
        ("UDP new tuple, slot taken", udp_v4_from, true),
    ];
    let (mut medians, mut hits) = (Vec::new(), Vec::new());
    for (name, make, taken) in rows {
        let (mut noop, mut flow, mut again, mut handed) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds * BATCHES_PER_ROUND {
            rt.block_on(control.drain()).context("draining the cache")?;
            ring.blocking_lock().pump();
            if taken {
                one_run_each(
                    load_prog(ft, flowtrace_common::programs::INGRESS)?,
                    &fresh(fill, make),
                )?;
                ring.blocking_lock().pump();
            }
            let packets = fresh(batch, make);
            noop.push(one_run_each(
                load_prog(base, baselines::BENCH_NOOP)?,
                &packets,
            )?);
            flow.push(one_run_each(
                load_prog(ft, flowtrace_common::programs::INGRESS)?,
                &packets,
            )?);
            let records = ring.blocking_lock().pump().records;
            handed.push(records as f64 / f64::from(batch));
            // The same packets again: their flows hold the slots now (cache hits), with the
            // same cold start of a single run as above.
            again.push(one_run_each(
                load_prog(ft, flowtrace_common::programs::INGRESS)?,
                &packets,
            )?);
            ring.blocking_lock().pump();
        }
        // The median of the rounds' means, each over BATCHES_PER_ROUND batches.
        let med = |v: Vec<f64>| {
            if v.is_empty() {
                return 0.0;
            }
            let mut means: Vec<f64> = v
                .chunks(BATCHES_PER_ROUND)
                .map(|c| c.iter().sum::<f64>() / c.len() as f64)
                .collect();
            means.sort_by(f64::total_cmp);
            means[means.len() / 2]
        };
        let (n, f, a, h) = (med(noop), med(flow), med(again), med(handed));
        println!(
            "{name:<36} {n:>10.0} {f:>16.0} {:>10.0} {:>11.0}% {a:>12.0} {:>10.0}",
            f - n,
            h * 100.0,
            a - n
        );
        medians.push(f - n);
        hits.push(a - n);
    }
    // Each row net of its own packets' second pass (the same cold start, a cache hit), so a
    // row warmed by the fill before it is not credited with the warmth.
    if let (&[ie, it, ue, ut], &[ie_hit, it_hit, ue_hit, ut_hit]) = (&medians[..], &hits[..]) {
        let (ie, it, ue, ut) = (ie - ie_hit, it - it_hit, ue - ue_hit, ut - ut_hit);
        println!(
            "over a cache hit: a new ICMP tuple {ie:.0} ns (the miss: fine clock, slot write), \
             the hand-over to the ring {:.0} (ICMP) / {:.0} (UDP), \
             the slow path (packet id, tail call, sighting) {:.0} (empty slot) / {:.0} (taken)",
            it - ie,
            ut - ue,
            ue - ie,
            ut - it,
        );
    }
    Ok(())
}
