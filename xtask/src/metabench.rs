//! `cargo xtask bench-metadata`: memory of the agent's Kubernetes metadata cache for a cluster
//! of N pods, and the cost of naming an address, against a baseline measured in the same run:
//! the same pods kept as whole k8s-openapi objects (what a kube-rs reflector store holds).
//!
//! Memory is the heap the process holds, counted by a wrapping global allocator (exact, not
//! sampled). The synthetic cluster is shaped like a real one: 100 pods per node, Deployments
//! of 10 pods each (a ReplicaSet each), one Service with one EndpointSlice per Deployment, and
//! pod objects carrying what the API returns for a running pod (labels, annotations, a
//! container with resources and env, status conditions and container statuses).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use anyhow::{Context, Result};
use flowtrace::k8s::{objects, Kind, MetaCache};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{json, Value};

/// Counts live heap bytes.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
        PEAK.fetch_max(now, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Live heap bytes now.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most live heap bytes since the last [`reset_peak`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak from the live bytes now.
pub fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

const PODS_PER_NODE: usize = 100;
pub const PODS_PER_DEPLOYMENT: usize = 10;

/// The address of synthetic pod `i`.
pub fn pod_ip(i: usize) -> Ipv4Addr {
    let node = i / PODS_PER_NODE;
    Ipv4Addr::new(
        10,
        (64 + node / 256) as u8,
        (node % 256) as u8,
        (10 + i % PODS_PER_NODE) as u8,
    )
}

fn pod_json(i: usize) -> Value {
    let d = i / PODS_PER_DEPLOYMENT;
    let node = format!("worker-{:04}", i / PODS_PER_NODE);
    let ns = format!("team-{}", d % 20);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "namespace": ns, "name": format!("svc{d}-7d9f8c6b5-{i:05x}"),
            "uid": format!("5c1e0d2a-0000-4000-8000-{i:012}"), "resourceVersion": format!("{}", 100000 + i),
            "creationTimestamp": "2026-11-01T10:00:00Z",
            "labels": {"app": format!("svc{d}"), "pod-template-hash": "7d9f8c6b5", "team": format!("team-{}", d % 20)},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-01T09:59:00Z", "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("svc{d}-7d9f8c6b5"),
                                 "uid": format!("rs-{d}"), "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "nodeName": node, "serviceAccountName": "default", "restartPolicy": "Always",
            "containers": [{"name": "app", "image": format!("registry.example.com/team/svc{d}:1.4.2"),
                "ports": [{"containerPort": 8080, "protocol": "TCP", "name": "http"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 10}}]
        },
        "status": {
            "phase": "Running", "hostIP": format!("192.168.{}.{}", (i / PODS_PER_NODE) / 256, (i / PODS_PER_NODE) % 256),
            "podIP": pod_ip(i).to_string(), "podIPs": [{"ip": pod_ip(i).to_string()}],
            "startTime": "2026-11-01T10:00:01Z", "qosClass": "Burstable",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-11-01T10:00:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-01T10:00:09Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-01T10:00:09Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-01T10:00:00Z"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "started": true,
                "image": format!("registry.example.com/team/svc{d}:1.4.2"), "imageID": format!("registry.example.com/team/svc{d}@sha256:{:064x}", d),
                "containerID": format!("containerd://{:064x}", i), "state": {"running": {"startedAt": "2026-11-01T10:00:05Z"}}}]
        }
    })
}

/// The cluster IP of synthetic Deployment `d`'s Service.
pub fn service_ip(d: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (d / 250) as u8, (1 + d % 250) as u8)
}

fn service_json(d: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": format!("team-{}", d % 20), "name": format!("svc{d}")},
        "spec": {"type": "ClusterIP", "clusterIP": service_ip(d).to_string(),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn slice_json(d: usize) -> Value {
    let eps: Vec<Value> = (d * PODS_PER_DEPLOYMENT..(d + 1) * PODS_PER_DEPLOYMENT)
        .map(|i| json!({"addresses": [pod_ip(i).to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"namespace": format!("team-{}", d % 20), "name": format!("svc{d}-abcde"),
                     "labels": {"kubernetes.io/service-name": format!("svc{d}")}},
        "endpoints": eps, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn node_json(n: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("worker-{n:04}")},
        "spec": {"podCIDR": format!("10.{}.{}.0/24", 64 + n / 256, n % 256)},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.{}.{}", n / 256, n % 256)}]}})
}

struct Figures {
    pods: usize,
    cache_bytes: usize,
    objects_bytes: usize,
    hit_ns: f64,
    miss_ns: f64,
}

/// The metadata cache of the synthetic cluster of `pods` pods (see the module's header),
/// filled as the watches fill it: each object parsed, reduced and dropped in turn.
pub fn synthetic_cache(pods: usize) -> Result<MetaCache> {
    let deployments = pods / PODS_PER_DEPLOYMENT;
    let nodes = pods.div_ceil(PODS_PER_NODE);
    let mut cache = MetaCache::new();
    for n in 0..nodes {
        let o: Node = serde_json::from_value(node_json(n))?;
        cache.apply_node(objects::node(&o)?);
    }
    for d in 0..deployments {
        let (ns, name) = (format!("team-{}", d % 20), format!("svc{d}-7d9f8c6b5"));
        cache.apply_owner(Kind::ReplicaSets, &ns, &name, Some(&format!("svc{d}")));
        let s: Service = serde_json::from_value(service_json(d))?;
        cache.apply_service(objects::service(&s)?);
        let e: EndpointSlice = serde_json::from_value(slice_json(d))?;
        cache.apply_slice(objects::endpoint_slice(&e)?);
    }
    for i in 0..pods {
        let p: Pod = serde_json::from_value(pod_json(i))?;
        cache.apply_pod(objects::pod(&p)?);
    }
    Ok(cache)
}

fn measure(pods: usize, lookups: usize) -> Result<Figures> {
    // The cache: objects are parsed, reduced and dropped one at a time, as the watches do.
    let before = live();
    let cache = synthetic_cache(pods)?;
    let cache_bytes = live().saturating_sub(before);

    // Baseline: the pods as whole objects (a reflector store of Pods alone).
    let before = live();
    let mut store: Vec<Pod> = Vec::with_capacity(pods);
    for i in 0..pods {
        store.push(serde_json::from_value(pod_json(i))?);
    }
    let objects_bytes = live().saturating_sub(before);
    drop(store);

    // Lookups: pod addresses in a scattered order (hits), and addresses outside every pod
    // CIDR (misses, the worst case: every node's CIDR is checked).
    let ips: Vec<IpAddr> = (0..lookups)
        .map(|k| IpAddr::V4(pod_ip((k.wrapping_mul(7919)) % pods)))
        .collect();
    let t = Instant::now();
    let mut named = 0usize;
    for ip in &ips {
        if black_box(cache.resolve(black_box(ip))).is_some() {
            named += 1;
        }
    }
    let hit_ns = t.elapsed().as_nanos() as f64 / lookups as f64;
    anyhow::ensure!(
        named == lookups,
        "only {named} of {lookups} pod addresses were named"
    );
    let outside: Vec<IpAddr> = (0..lookups / 10)
        .map(|k| {
            IpAddr::V4(Ipv4Addr::new(
                172,
                16,
                (k / 256 % 256) as u8,
                (k % 256) as u8,
            ))
        })
        .collect();
    let t = Instant::now();
    for ip in &outside {
        black_box(cache.resolve(black_box(ip)));
    }
    let miss_ns = t.elapsed().as_nanos() as f64 / outside.len().max(1) as f64;
    let counts = cache.counts();
    anyhow::ensure!(counts[&Kind::Pods] == pods, "cache holds {:?}", counts);
    Ok(Figures {
        pods,
        cache_bytes,
        objects_bytes,
        hit_ns,
        miss_ns,
    })
}

pub fn run(pod_counts: &[usize], lookups: usize) -> Result<()> {
    if cfg!(debug_assertions) {
        // Memory is the same in any build; lookup times of a debug build are 5-10x slower.
        eprintln!(
            "xtask: debug build: lookup times are not the agent's; for them run \
             `cargo run --release -p xtask -- bench-metadata`"
        );
    }
    println!("metadata cache: {PODS_PER_NODE} pods/node, {PODS_PER_DEPLOYMENT} pods/Deployment, one Service + EndpointSlice per Deployment");
    println!(
        "{:>8} {:>12} {:>10} {:>16} {:>8} {:>14} {:>15}",
        "pods", "cache MiB", "B/pod", "whole Pods MiB", "ratio", "lookup hit ns", "lookup miss ns"
    );
    for &n in pod_counts {
        let f = measure(n, lookups).with_context(|| format!("measuring {n} pods"))?;
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        println!(
            "{:>8} {:>12.2} {:>10.0} {:>16.2} {:>8.3} {:>14.0} {:>15.0}",
            f.pods,
            mib(f.cache_bytes),
            f.cache_bytes as f64 / f.pods as f64,
            mib(f.objects_bytes),
            f.cache_bytes as f64 / f.objects_bytes as f64,
            f.hit_ns,
            f.miss_ns
        );
    }
    println!("cache MiB: everything the agent keeps (pods, Services, EndpointSlices, nodes, owners); whole Pods MiB: the pods alone as k8s-openapi objects; ratio = cache / whole Pods");
    Ok(())
}
