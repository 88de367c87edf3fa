//! `cargo xtask microbench`: the CPU cost of each TC program on fixed packets, measured by
//! the kernel itself with BPF_PROG_TEST_RUN (`repeat` runs, average ns per run). No network,
//! no other traffic: the figure moves only when the program's code changes, which makes it the
//! tool for comparing two versions of flowtrace's kernel code. The flow stays in the per-CPU
//! cache after the first run, so this is the bulk-transfer (cache hit) path; the iperf3 run of
//! `cargo xtask bench` measures the real mix.

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

pub fn run(repeat: u32, rounds: usize) -> Result<()> {
    let sizes = flowtrace::kernel::attach::buffer_sizes(
        flowtrace_common::DEFAULT_EVENT_RING_BYTES / (1024 * 1024),
    )
    .context("sizing flowtrace's buffers")?;
    let mut ft =
        flowtrace::kernel::attach::load(&sizes, flowtrace_common::drops::DEFAULT_DROP_ENTRIES)
            .context("loading flowtrace")?;
    let mut base = Ebpf::load(baselines::OBJECT).context("loading baselines")?;
    println!("BPF_PROG_TEST_RUN, {repeat} runs per figure, median of {rounds} rounds (ns per run)");
    println!(
        "{:<28} {:>10} {:>14} {:>16} {:>10}",
        "packet", "bench_noop", "bench_counter", "flowtrace_ingress", "ft net"
    );
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
            .set_latency_sampling(sample)
            .context("setting latency sampling")?;
        let mut figures = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            figures[0].push(test_run(
                load_prog(&mut base, baselines::BENCH_NOOP)?,
                &pkt,
                repeat,
            )?);
            figures[1].push(test_run(
                load_prog(&mut base, baselines::BENCH_COUNTER)?,
                &pkt,
                repeat,
            )?);
            figures[2].push(test_run(
                load_prog(&mut ft, flowtrace_common::programs::INGRESS)?,
                &pkt,
                repeat,
            )?);
        }
        let med = |v: &mut Vec<u32>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let (n, c, f) = (
            med(&mut figures[0]),
            med(&mut figures[1]),
            med(&mut figures[2]),
        );
        println!(
            "{name:<28} {n:>10} {c:>14} {f:>16} {:>10}",
            f as i64 - n as i64
        );
    }
    Ok(())
}
