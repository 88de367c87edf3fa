//! The metadata cache: who an IP address is (pod, Service, node), kept small.
//!
//! The sources (`source`: API watches or a metadata file) turn API objects into the compact
//! records of `objects` and apply them to [`MetaCache`], which answers the drain's and the
//! API's questions: "who is 10.244.1.7?", "which Service is 10.96.0.10:80/tcp?". Only the
//! fields flowtrace uses are kept, strings that repeat (namespaces, nodes, workloads) are
//! shared, and each pod's answer is built once when the pod changes, so a lookup is a hash
//! probe and an `Arc` clone.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use super::{
    kind::Kind,
    objects::{
        EndpointSliceRecord, NodeRecord, OwnerRecord, PodRecord, ServicePortRecord, ServiceRecord,
    },
};
use crate::{
    model::{Endpoint, EndpointKind, IpFilter, ServiceRef, Workload},
    util::FastHash,
};

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a Service port is reached: the cluster IP's port, or a NodePort on a node address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PortKey {
    protocol: u8,
    port: u16,
}

/// Shares repeated strings (namespaces, node and workload names) between records.
#[derive(Debug, Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(a.clone());
        a
    }

    /// Drops strings no record uses any more.
    fn purge(&mut self) {
        self.0.retain(|a| Arc::strong_count(a) > 1);
    }
}

#[derive(Debug)]
struct PodEntry {
    ips: Vec<IpAddr>,
    host_network: bool,
    /// Owner as the pod states it; the workload is derived from it and the owners' owners.
    owner: Option<OwnerRecord>,
    labels_hash: Option<Arc<str>>,
    node: Option<Arc<str>>,
    /// The answer for this pod's addresses, rebuilt when the pod or its owners change.
    endpoint: Arc<Endpoint>,
}

#[derive(Debug)]
struct ServiceEntry {
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePortRecord>,
    endpoint: Arc<Endpoint>,
}

#[derive(Debug)]
struct NodeEntry {
    addresses: Vec<IpAddr>,
    pod_cidrs: Vec<IpFilter>,
    endpoint: Arc<Endpoint>,
    network: Arc<Endpoint>,
}

#[derive(Debug)]
struct SliceEntry {
    service: Arc<str>,
    addresses: Vec<IpAddr>,
}

/// The metadata flowtrace keeps, with indexes by address (looked up for every flow a drain
/// brings: `FastHash` tables).
#[derive(Debug, Default)]
pub struct MetaCache {
    strings: Interner,
    pods: HashMap<ObjKey, PodEntry, FastHash>,
    services: HashMap<ObjKey, ServiceEntry, FastHash>,
    nodes: HashMap<Arc<str>, NodeEntry, FastHash>,
    slices: HashMap<ObjKey, SliceEntry, FastHash>,
    /// ReplicaSet -> its Deployment; Job -> its CronJob (only owned ones are kept).
    replicaset_owner: HashMap<ObjKey, Arc<str>, FastHash>,
    job_owner: HashMap<ObjKey, Arc<str>, FastHash>,
    /// Address -> the pod that holds it now (the newest claim wins: an address reused by
    /// a new pod is named after it from the moment the API says so).
    pod_by_ip: HashMap<IpAddr, ObjKey, FastHash>,
    service_by_ip: HashMap<IpAddr, ObjKey, FastHash>,
    node_by_ip: HashMap<IpAddr, Arc<str>, FastHash>,
    /// NodePort -> Service.
    service_by_node_port: HashMap<PortKey, ObjKey, FastHash>,
    /// Endpoint address -> Services it backs (from EndpointSlices).
    services_by_endpoint: HashMap<IpAddr, Vec<ObjKey>, FastHash>,
    /// Objects skipped because a required field was missing, by kind.
    skipped: BTreeMap<Kind, u64>,
}

impl MetaCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts an object that could not be used (the source logs which and why).
    pub fn count_skip(&mut self, kind: Kind) {
        *self.skipped.entry(kind).or_default() += 1;
    }

    pub fn skipped(&self) -> &BTreeMap<Kind, u64> {
        &self.skipped
    }

    /// Objects held, by kind.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        BTreeMap::from([
            (Kind::Pods, self.pods.len()),
            (Kind::Services, self.services.len()),
            (Kind::EndpointSlices, self.slices.len()),
            (Kind::Nodes, self.nodes.len()),
            (Kind::ReplicaSets, self.replicaset_owner.len()),
            (Kind::Jobs, self.job_owner.len()),
        ])
    }

    fn key(&mut self, namespace: &str, name: &str) -> ObjKey {
        ObjKey {
            namespace: self.strings.get(namespace),
            name: Arc::from(name),
        }
    }

    // ---- pods ----

    pub fn apply_pod(&mut self, p: PodRecord) {
        let key = self.key(&p.namespace, &p.name);
        self.remove_pod_ips(&key);
        let node = p.node.as_deref().map(|n| self.strings.get(n));
        let mut entry = PodEntry {
            ips: p.ips,
            host_network: p.host_network,
            owner: p.owner,
            labels_hash: p.pod_template_hash.map(Arc::from),
            node,
            endpoint: Arc::new(Endpoint {
                kind: EndpointKind::Pod,
                namespace: None,
                name: String::new(),
                workload: None,
                node: None,
            }),
        };
        entry.endpoint = Arc::new(self.pod_endpoint(&key, &entry));
        // Finished pods (Succeeded/Failed) have given their address back; a hostNetwork pod's
        // address is its node's.
        if !entry.host_network && !p.finished {
            for ip in &entry.ips {
                self.pod_by_ip.insert(*ip, key.clone());
            }
        } else {
            entry.ips.clear();
        }
        self.pods.insert(key, entry);
    }

    pub fn delete_pod(&mut self, namespace: &str, name: &str) {
        let key = self.key(namespace, name);
        self.remove_pod_ips(&key);
        self.pods.remove(&key);
    }

    /// Unindexes a pod's addresses, unless another pod has claimed them since.
    fn remove_pod_ips(&mut self, key: &ObjKey) {
        if let Some(old) = self.pods.get(key) {
            for ip in &old.ips {
                if self.pod_by_ip.get(ip) == Some(key) {
                    self.pod_by_ip.remove(ip);
                }
            }
        }
    }

    fn workload_of(
        &self,
        key: &ObjKey,
        owner: Option<&OwnerRecord>,
        hash: Option<&str>,
    ) -> Workload {
        let Some(o) = owner else {
            return Workload {
                kind: "Pod".into(),
                name: key.name.to_string(),
            };
        };
        let owner_key = ObjKey {
            namespace: key.namespace.clone(),
            name: Arc::from(o.name.as_str()),
        };
        match o.kind.as_str() {
            "ReplicaSet" => {
                if let Some(d) = self.replicaset_owner.get(&owner_key) {
                    return Workload {
                        kind: "Deployment".into(),
                        name: d.to_string(),
                    };
                }
                // Without the ReplicaSet (a metadata file has none): a Deployment names its
                // ReplicaSets `<deployment>-<pod-template-hash>`.
                if let Some(d) = hash.and_then(|h| o.name.strip_suffix(&format!("-{h}"))) {
                    return Workload {
                        kind: "Deployment".into(),
                        name: d.to_string(),
                    };
                }
                Workload {
                    kind: "ReplicaSet".into(),
                    name: o.name.clone(),
                }
            }
            "Job" => match self.job_owner.get(&owner_key) {
                Some(c) => Workload {
                    kind: "CronJob".into(),
                    name: c.to_string(),
                },
                None => Workload {
                    kind: "Job".into(),
                    name: o.name.clone(),
                },
            },
            other => Workload {
                kind: other.to_string(),
                name: o.name.clone(),
            },
        }
    }

    fn pod_endpoint(&self, key: &ObjKey, e: &PodEntry) -> Endpoint {
        Endpoint {
            kind: EndpointKind::Pod,
            namespace: Some(key.namespace.to_string()),
            name: key.name.to_string(),
            workload: Some(self.workload_of(key, e.owner.as_ref(), e.labels_hash.as_deref())),
            node: e.node.as_deref().map(str::to_string),
        }
    }

    /// Rebuilds the answers of the pods in `namespace` owned by `owner` (after an owner
    /// changed).
    fn refresh_pods_owned_by(&mut self, namespace: &str, kind: &str, owner: &str) {
        let keys: Vec<ObjKey> = self
            .pods
            .iter()
            .filter(|(k, e)| {
                &*k.namespace == namespace
                    && e.owner
                        .as_ref()
                        .is_some_and(|o| o.kind == kind && o.name == owner)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            if let Some(e) = self.pods.get(&k) {
                let ep = Arc::new(self.pod_endpoint(&k, e));
                if let Some(e) = self.pods.get_mut(&k) {
                    e.endpoint = ep;
                }
            }
        }
    }

    // ---- owners ----

    /// A ReplicaSet or Job and the controller that owns it (None: not owned by a
    /// Deployment/CronJob).
    pub fn apply_owner(&mut self, kind: Kind, namespace: &str, name: &str, owner: Option<&str>) {
        let key = self.key(namespace, name);
        let map = match kind {
            Kind::ReplicaSets => &mut self.replicaset_owner,
            Kind::Jobs => &mut self.job_owner,
            _ => return,
        };
        let changed = match owner {
            Some(o) => {
                let o: Arc<str> = Arc::from(o);
                map.insert(key, o.clone()).as_deref() != Some(&*o)
            }
            None => map.remove(&key).is_some(),
        };
        if changed {
            let pod_owner_kind = if kind == Kind::ReplicaSets {
                "ReplicaSet"
            } else {
                "Job"
            };
            self.refresh_pods_owned_by(namespace, pod_owner_kind, name);
        }
    }

    pub fn delete_owner(&mut self, kind: Kind, namespace: &str, name: &str) {
        self.apply_owner(kind, namespace, name, None);
    }

    // ---- services ----

    pub fn apply_service(&mut self, s: ServiceRecord) {
        let key = self.key(&s.namespace, &s.name);
        self.delete_service_key(&key);
        for ip in &s.cluster_ips {
            self.service_by_ip.insert(*ip, key.clone());
        }
        for p in &s.ports {
            if let Some(np) = p.node_port {
                self.service_by_node_port.insert(
                    PortKey {
                        protocol: p.protocol,
                        port: np,
                    },
                    key.clone(),
                );
            }
        }
        let endpoint = Arc::new(Endpoint {
            kind: EndpointKind::Service,
            namespace: Some(key.namespace.to_string()),
            name: key.name.to_string(),
            workload: None,
            node: None,
        });
        self.services.insert(
            key,
            ServiceEntry {
                cluster_ips: s.cluster_ips,
                ports: s.ports,
                endpoint,
            },
        );
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = self.key(namespace, name);
        self.delete_service_key(&key);
    }

    fn delete_service_key(&mut self, key: &ObjKey) {
        if let Some(old) = self.services.remove(key) {
            for ip in &old.cluster_ips {
                if self.service_by_ip.get(ip) == Some(key) {
                    self.service_by_ip.remove(ip);
                }
            }
            for p in &old.ports {
                if let Some(np) = p.node_port {
                    let pk = PortKey {
                        protocol: p.protocol,
                        port: np,
                    };
                    if self.service_by_node_port.get(&pk) == Some(key) {
                        self.service_by_node_port.remove(&pk);
                    }
                }
            }
        }
    }

    // ---- endpoint slices ----

    pub fn apply_slice(&mut self, s: EndpointSliceRecord) {
        let key = self.key(&s.namespace, &s.name);
        self.delete_slice_key(&key);
        let svc = ObjKey {
            namespace: key.namespace.clone(),
            name: Arc::from(s.service.as_str()),
        };
        for ip in &s.addresses {
            let list = self.services_by_endpoint.entry(*ip).or_default();
            if !list.contains(&svc) {
                list.push(svc.clone());
            }
        }
        self.slices.insert(
            key,
            SliceEntry {
                service: svc.name,
                addresses: s.addresses,
            },
        );
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let key = self.key(namespace, name);
        self.delete_slice_key(&key);
    }

    fn delete_slice_key(&mut self, key: &ObjKey) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        let svc = ObjKey {
            namespace: key.namespace.clone(),
            name: old.service.clone(),
        };
        // Another slice of the same Service may list the same address.
        let still: HashSet<IpAddr> = self
            .slices
            .iter()
            .filter(|(k, e)| k.namespace == key.namespace && e.service == old.service)
            .flat_map(|(_, e)| e.addresses.iter().copied())
            .collect();
        for ip in &old.addresses {
            if still.contains(ip) {
                continue;
            }
            if let Some(list) = self.services_by_endpoint.get_mut(ip) {
                list.retain(|s| *s != svc);
                if list.is_empty() {
                    self.services_by_endpoint.remove(ip);
                }
            }
        }
    }

    // ---- nodes ----

    pub fn apply_node(&mut self, n: NodeRecord) {
        let name = self.strings.get(&n.name);
        self.delete_node(&n.name);
        for ip in &n.addresses {
            self.node_by_ip.insert(*ip, name.clone());
        }
        let endpoint = Arc::new(Endpoint {
            kind: EndpointKind::Node,
            namespace: None,
            name: n.name.clone(),
            workload: None,
            node: Some(n.name.clone()),
        });
        let network = Arc::new(Endpoint {
            kind: EndpointKind::PodNetwork,
            namespace: None,
            name: n.name.clone(),
            workload: None,
            node: Some(n.name.clone()),
        });
        self.nodes.insert(
            name,
            NodeEntry {
                addresses: n.addresses,
                pod_cidrs: n.pod_cidrs,
                endpoint,
                network,
            },
        );
    }

    pub fn delete_node(&mut self, name: &str) {
        if let Some(old) = self.nodes.remove(name) {
            for ip in &old.addresses {
                if self.node_by_ip.get(ip).map(|n| &**n) == Some(name) {
                    self.node_by_ip.remove(ip);
                }
            }
        }
    }

    // ---- relists ----

    /// Names of the objects of one kind, to find those a relist no longer has.
    pub fn keys(&self, kind: Kind) -> Vec<(String, String)> {
        let ns = |k: &ObjKey| (k.namespace.to_string(), k.name.to_string());
        match kind {
            Kind::Pods => self.pods.keys().map(ns).collect(),
            Kind::Services => self.services.keys().map(ns).collect(),
            Kind::EndpointSlices => self.slices.keys().map(ns).collect(),
            Kind::Nodes => self
                .nodes
                .keys()
                .map(|n| (String::new(), n.to_string()))
                .collect(),
            Kind::ReplicaSets => self.replicaset_owner.keys().map(ns).collect(),
            Kind::Jobs => self.job_owner.keys().map(ns).collect(),
        }
    }

    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) {
        match kind {
            Kind::Pods => self.delete_pod(namespace, name),
            Kind::Services => self.delete_service(namespace, name),
            Kind::EndpointSlices => self.delete_slice(namespace, name),
            Kind::Nodes => self.delete_node(name),
            Kind::ReplicaSets | Kind::Jobs => self.delete_owner(kind, namespace, name),
        }
    }

    /// After a relist: frees strings nothing uses any more.
    pub fn compact(&mut self) {
        self.strings.purge();
    }

    // ---- lookups ----

    /// Who holds this address: a pod, a Service's cluster IP, a node (hostNetwork pods
    /// resolve to their node), or an address in a node's pod CIDR.
    pub fn resolve(&self, ip: &IpAddr) -> Option<Arc<Endpoint>> {
        if let Some(k) = self.pod_by_ip.get(ip) {
            if let Some(p) = self.pods.get(k) {
                return Some(p.endpoint.clone());
            }
        }
        if let Some(k) = self.service_by_ip.get(ip) {
            if let Some(s) = self.services.get(k) {
                return Some(s.endpoint.clone());
            }
        }
        if let Some(n) = self.node_by_ip.get(ip) {
            if let Some(n) = self.nodes.get(n) {
                return Some(n.endpoint.clone());
            }
        }
        self.nodes
            .values()
            .find(|n| n.pod_cidrs.iter().any(|c| c.matches(ip)))
            .map(|n| n.network.clone())
    }

    /// Whether `service_at` can name a Service at `ip` on some port: a cluster IP, or a
    /// node's address (NodePorts).
    pub fn serves_at(&self, ip: &IpAddr) -> bool {
        self.service_by_ip.contains_key(ip) || self.node_by_ip.contains_key(ip)
    }

    /// The Service reached at `ip:port/protocol`: a cluster IP's port or a NodePort on
    /// a node address.
    pub fn service_at(&self, ip: &IpAddr, port: u16, protocol: u8) -> Option<ServiceRef> {
        if let Some(k) = self.service_by_ip.get(ip) {
            let s = self.services.get(k)?;
            let p = s
                .ports
                .iter()
                .find(|p| p.port == port && p.protocol == protocol)?;
            return Some(service_ref(k, p));
        }
        if self.node_by_ip.contains_key(ip) {
            let k = self.service_by_node_port.get(&PortKey { protocol, port })?;
            let s = self.services.get(k)?;
            let p = s
                .ports
                .iter()
                .find(|p| p.node_port == Some(port) && p.protocol == protocol)?;
            return Some(service_ref(k, p));
        }
        None
    }

    /// Services whose EndpointSlices list this address.
    pub fn services_backed_by(&self, ip: &IpAddr) -> Vec<String> {
        self.services_by_endpoint
            .get(ip)
            .map(|l| l.iter().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }

    pub fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.pods.keys().any(|k| {
            // No allocation: compare the two halves.
            &*k.namespace == namespace && &*k.name == name
        })
    }

    pub fn has_service(&self, namespace: &str, name: &str) -> bool {
        self.services
            .keys()
            .any(|k| &*k.namespace == namespace && &*k.name == name)
    }

    /// Whether any pod or Service lives in the namespace.
    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.pods.keys().any(|k| &*k.namespace == namespace)
            || self.services.keys().any(|k| &*k.namespace == namespace)
    }

    /// Whether a pod runs for the workload `namespace/name` (any kind).
    pub fn has_workload(&self, namespace: &str, name: &str) -> bool {
        self.pods.iter().any(|(k, e)| {
            &*k.namespace == namespace
                && e.endpoint.workload.as_ref().is_some_and(|w| w.name == name)
        })
    }
}

fn service_ref(k: &ObjKey, p: &ServicePortRecord) -> ServiceRef {
    ServiceRef {
        namespace: k.namespace.to_string(),
        name: k.name.to_string(),
        port_name: p.name.clone(),
    }
}
