//! From Kubernetes API objects (k8s-openapi types) to the few fields flowtrace keeps.
//!
//! Every conversion either yields a complete record or says which field was missing or
//! malformed, so the source can log and count the object instead of guessing.

use std::net::IpAddr;

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::kind::Kind;
use crate::model::IpFilter;

/// Why an object was skipped.
#[derive(Debug, thiserror::Error)]
#[error("skipping {kind} {object}: {reason}")]
pub struct ObjectError {
    pub kind: &'static str,
    /// `namespace/name`, or what is known of it.
    pub object: String,
    pub reason: String,
}

/// The controller that owns an object (`ownerReferences` entry with `controller: true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRecord {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// Succeeded or Failed: the pod no longer holds its address.
    pub finished: bool,
    pub node: Option<String>,
    pub owner: Option<OwnerRecord>,
    /// The `pod-template-hash` label (names a Deployment's ReplicaSet).
    pub pod_template_hash: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRecord {
    pub name: Option<String>,
    /// IANA protocol number (6, 17, 132).
    pub protocol: u8,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub namespace: String,
    pub name: String,
    /// Empty for headless Services.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSliceRecord {
    pub namespace: String,
    pub name: String,
    /// The Service (label `kubernetes.io/service-name`).
    pub service: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    /// InternalIP and ExternalIP addresses.
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpFilter>,
}

fn ident(
    kind: &'static str,
    m: &ObjectMeta,
    namespaced: bool,
) -> Result<(String, String), ObjectError> {
    let shown = format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or("?"),
        m.name.as_deref().unwrap_or("?")
    );
    let err = |reason: &str| ObjectError {
        kind,
        object: shown.clone(),
        reason: reason.to_string(),
    };
    let name = m
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| err("metadata.name is missing"))?;
    let namespace = if namespaced {
        m.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| err("metadata.namespace is missing"))?
    } else {
        String::new()
    };
    Ok((namespace, name))
}

/// The controlling owner, as `ownerReferences` states it.
pub fn controller(m: &ObjectMeta) -> Option<OwnerRecord> {
    m.owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| OwnerRecord {
            kind: o.kind.clone(),
            name: o.name.clone(),
        })
}

fn parse_ip(kind: &'static str, object: &str, field: &str, s: &str) -> Result<IpAddr, ObjectError> {
    s.parse().map_err(|_| ObjectError {
        kind,
        object: object.to_string(),
        reason: format!("{field} `{s}` is not an IP address"),
    })
}

pub fn pod(p: &core::Pod) -> Result<PodRecord, ObjectError> {
    let (namespace, name) = ident("pod", &p.metadata, true)?;
    let object = format!("{namespace}/{name}");
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let mut ips = Vec::new();
    if let Some(s) = status {
        let listed: Vec<&str> = match &s.pod_ips {
            Some(list) if !list.is_empty() => list.iter().map(|i| i.ip.as_str()).collect(),
            _ => s.pod_ip.as_deref().into_iter().collect(),
        };
        for ip in listed.into_iter().filter(|i| !i.is_empty()) {
            ips.push(parse_ip("pod", &object, "status.podIPs", ip)?);
        }
    }
    let phase = status.and_then(|s| s.phase.as_deref());
    Ok(PodRecord {
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        finished: matches!(phase, Some("Succeeded" | "Failed")),
        node: spec.and_then(|s| s.node_name.clone()),
        owner: controller(&p.metadata),
        pod_template_hash: p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash").cloned()),
        namespace,
        name,
    })
}

pub fn protocol_number(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

pub fn service(s: &core::Service) -> Result<ServiceRecord, ObjectError> {
    let (namespace, name) = ident("service", &s.metadata, true)?;
    let object = format!("{namespace}/{name}");
    let err = |reason: String| ObjectError {
        kind: "service",
        object: object.clone(),
        reason,
    };
    let spec = s
        .spec
        .as_ref()
        .ok_or_else(|| err("spec is missing".into()))?;
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(l) if !l.is_empty() => l.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let mut cluster_ips = Vec::new();
    for ip in listed {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        cluster_ips.push(parse_ip("service", &object, "spec.clusterIPs", ip)?);
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let protocol = protocol_number(p.protocol.as_deref()).ok_or_else(|| {
            err(format!(
                "port {} has protocol `{}`; expected TCP, UDP or SCTP",
                p.port,
                p.protocol.as_deref().unwrap_or_default()
            ))
        })?;
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| err(format!("port {} is not 1-65535", p.port)))?;
        ports.push(ServicePortRecord {
            name: p.name.clone().filter(|n| !n.is_empty()),
            protocol,
            port,
            node_port: p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0),
        });
    }
    Ok(ServiceRecord {
        namespace,
        name,
        cluster_ips,
        ports,
    })
}

pub fn endpoint_slice(s: &discovery::EndpointSlice) -> Result<EndpointSliceRecord, ObjectError> {
    let (namespace, name) = ident("endpointslice", &s.metadata, true)?;
    let object = format!("{namespace}/{name}");
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name").cloned())
        .ok_or_else(|| ObjectError {
            kind: "endpointslice",
            object: object.clone(),
            reason: "label kubernetes.io/service-name is missing".into(),
        })?;
    let mut addresses = Vec::new();
    if s.address_type == "IPv4" || s.address_type == "IPv6" {
        for e in s.endpoints.iter().flatten() {
            for a in &e.addresses {
                addresses.push(parse_ip(
                    "endpointslice",
                    &object,
                    "endpoints[].addresses",
                    a,
                )?);
            }
        }
    }
    Ok(EndpointSliceRecord {
        namespace,
        name,
        service,
        addresses,
    })
}

pub fn node(n: &core::Node) -> Result<NodeRecord, ObjectError> {
    let (_, name) = ident("node", &n.metadata, false)?;
    let mut addresses = Vec::new();
    for a in n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
            addresses.push(parse_ip("node", &name, "status.addresses", &a.address)?);
        }
    }
    let spec = n.spec.as_ref();
    let cidrs: Vec<&str> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(l) if !l.is_empty() => l.iter().map(String::as_str).collect(),
        _ => spec
            .and_then(|s| s.pod_cidr.as_deref())
            .into_iter()
            .collect(),
    };
    let mut pod_cidrs = Vec::new();
    for c in cidrs {
        pod_cidrs.push(c.parse::<IpFilter>().map_err(|_| ObjectError {
            kind: "node",
            object: name.clone(),
            reason: format!("spec.podCIDRs `{c}` is not a CIDR"),
        })?);
    }
    Ok(NodeRecord {
        name,
        addresses,
        pod_cidrs,
    })
}

/// A ReplicaSet's Deployment or a Job's CronJob, from the object's metadata.
pub fn owner(kind: Kind, m: &ObjectMeta) -> Result<(String, String, Option<String>), ObjectError> {
    let (namespace, name) = ident(kind.name(), m, true)?;
    let wanted = match kind {
        Kind::ReplicaSets => "Deployment",
        _ => "CronJob",
    };
    let owner = controller(m).filter(|o| o.kind == wanted).map(|o| o.name);
    Ok((namespace, name, owner))
}
