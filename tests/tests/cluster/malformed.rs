//! Malformed and non-flow packets: passed on untouched and counted as unparsed, never as flows.
//!
//! pod-a sends crafted frames to pod-c on the same node (through pod-a's veth ingress hook and
//! pod-c's veth egress hook). Ground truth: the bytes captured inside pod-c must equal the bytes
//! sent, and the kernel counters must rise by exactly the frames times the hooks they crossed.
//! The capture keeps only frames from pod-a's MAC to pod-c's, the unicast pair of the crafted
//! frames, so nothing the kernels send by themselves can be taken for one of them.
//!
//! br_netfilter (on in every Kubernetes node) drops IPv4 frames with a bad header before they
//! leave the bridge, which would hide whether flowtrace passed them. The test therefore turns
//! `net.bridge.bridge-nf-call-iptables` off in its own node namespace: then the bridge forwards
//! any frame and only flowtrace could alter or drop it.

use flowtrace_tests::{finish, ftgen, ftgen_bg, Bed};

fn mac_bytes(mac: &str) -> Vec<u8> {
    mac.split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An IPv4 header from 10.244.1.250 to 10.244.1.251 (addresses no pod uses).
fn ipv4(ihl_words: u8, total_len: u16, frag: u16, proto: u8) -> Vec<u8> {
    let mut h = vec![0x40 | ihl_words, 0];
    h.extend_from_slice(&total_len.to_be_bytes());
    h.extend_from_slice(&[0xbe, 0xef]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0, 10, 244, 1, 250, 10, 244, 1, 251]);
    h
}

#[test]
fn malformed_frames_pass_unchanged_and_are_counted_as_unparsed() {
    let bed = Bed::up().unwrap();
    let node = bed.cluster.node(1).unwrap();
    node.sysctl("net.bridge.bridge-nf-call-iptables", "0")
        .unwrap();
    node.sysctl("net.bridge.bridge-nf-call-ip6tables", "0")
        .unwrap();
    let (a, c) = (
        bed.cluster.pod(1, "pod-a").unwrap(),
        bed.cluster.pod(1, "pod-c").unwrap(),
    );
    let mut l2 = mac_bytes(&c.mac);
    l2.extend(mac_bytes(&a.mac));

    let eth = |ethertype: u16, body: Vec<u8>| {
        let mut f = l2.clone();
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend(body);
        f
    };
    // (frame, counter it must land in)
    let mut frames: Vec<(Vec<u8>, &str)> = Vec::new();
    // 1. IPv4 header cut after 12 bytes.
    frames.push((
        eth(0x0800, ipv4(5, 40, 0, 17)[..12].to_vec()),
        "truncated_ip",
    ));
    // 2. IHL of 3 words (12 bytes): impossible.
    let mut body = ipv4(3, 28, 0, 17);
    body.extend_from_slice(&[0u8; 8]);
    frames.push((eth(0x0800, body), "bad_ip_header"));
    // 3. First fragment of a UDP datagram (more-fragments flag set).
    let mut body = ipv4(5, 36, 0x2000, 17);
    body.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    frames.push((eth(0x0800, body), "fragment"));
    // 4. TCP header cut after 10 bytes (the IP total length agrees with the frame).
    let mut body = ipv4(5, 30, 0, 6);
    body.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50, 0, 0, 0, 1, 0, 0]);
    frames.push((eth(0x0800, body), "truncated_l4"));
    // 5. IPv6 with seven destination-options headers: longer than flowtrace walks.
    let mut ext = Vec::new();
    for i in 0..7 {
        ext.extend_from_slice(&[if i == 6 { 17 } else { 60 }, 0, 1, 4, 0, 0, 0, 0]);
    }
    ext.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35, 0, 8, 0, 0]);
    let mut v6 = vec![0x60, 0, 0, 0];
    v6.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    v6.extend_from_slice(&[60, 64]);
    v6.extend_from_slice(&[
        0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xfa,
    ]);
    v6.extend_from_slice(&[
        0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xfb,
    ]);
    v6.extend(ext);
    frames.push((eth(0x86dd, v6), "ipv6_extension_chain"));

    let before = bed.agent(1).stats().unwrap();
    let capture = ftgen_bg(
        c,
        &[
            "raw-capture",
            "--iface",
            "eth0",
            "--count",
            &frames.len().to_string(),
            "--timeout-ms",
            "10000",
            // Only the unicast pair every crafted frame uses: pod-a's own MLD reports and router
            // solicitations (to multicast addresses) are not the test's frames.
            "--src-mac",
            &a.mac,
            "--dst-mac",
            &c.mac,
        ],
    )
    .unwrap();
    for (f, _) in &frames {
        let sent = ftgen(a, &["raw-send", "--iface", "eth0", "--hex", &hex(f)]).unwrap();
        assert_eq!(sent["sent"], 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let got = finish(capture).unwrap();
    let got: Vec<String> = got["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let sent: Vec<String> = frames.iter().map(|(f, _)| hex(f)).collect();
    assert_eq!(got, sent, "frames must arrive byte-identical and in order");

    let after = bed.agent(1).stats().unwrap();
    // Every frame crossed two hooks: pod-a's veth ingress and pod-c's veth egress.
    for (_, counter) in &frames {
        let delta = after.kernel[*counter] - before.kernel[*counter];
        assert_eq!(
            delta, 2,
            "counter {counter}: before {:?} after {:?}",
            before.kernel, after.kernel
        );
    }
    assert_eq!(
        after.unparsed_packets - before.unparsed_packets,
        2 * frames.len() as u64
    );
    let flows = bed.agent(1).flows().unwrap();
    let bogus: Vec<_> = flows
        .iter()
        .filter(|f| f.src.to_string().ends_with(".250") || f.src.to_string().ends_with("::fa"))
        .collect();
    assert!(
        bogus.is_empty(),
        "malformed frames became flows: {bogus:#?}"
    );
}
