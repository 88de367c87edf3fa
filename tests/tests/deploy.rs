//! The Kubernetes deployment under deploy/ (`kubectl apply -k deploy/`), its Grafana dashboard
//! and its example settings file, checked without a cluster and without root: every manifest is
//! read into its Kubernetes type, and the security context, RBAC, wiring and metric names are
//! checked against what deploy/README.md documents and what the agent exports. The tests that
//! check settings run the `flowtrace` binary (`cargo build --release` first), which loads
//! nothing into the kernel for them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use flowtrace::metrics::FAMILIES;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, EnvVar, Namespace, PodSpec, SecretVolumeSource, Service,
            ServiceAccount, Volume,
        },
        networking::v1::{NetworkPolicy, NetworkPolicyPort},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// The capabilities the agent runs with; deploy/README.md lists them on its
/// "Capabilities added:" line.
const CAPABILITIES: [&str; 3] = ["BPF", "NET_ADMIN", "PERFMON"];
/// The only verbs the ClusterRole may grant; README line "RBAC verbs:".
const RBAC_VERBS: [&str; 3] = ["get", "list", "watch"];
/// (API group, resource) the ClusterRole reads; README line "RBAC resources:", written
/// `group/resource` (`resource` alone for the core group).
const RBAC_RESOURCES: [(&str, &str); 6] = [
    ("", "pods"),
    ("", "services"),
    ("", "nodes"),
    ("discovery.k8s.io", "endpointslices"),
    ("apps", "replicasets"),
    ("batch", "jobs"),
];
/// The agents' namespace: every namespaced object but the relay's lives in it, and so do the
/// relay's Role and RoleBinding (they grant the agents' EndpointSlices).
const NAMESPACE: &str = "flowtrace";
/// The relay's own namespace: its Namespace, ServiceAccount, Deployment, Service,
/// NetworkPolicy, Secret, monitors and cert-manager Issuer and Certificate, nothing else (so
/// `pods/portforward` there reaches the relay only, never a hostNetwork agent).
const RELAY_NAMESPACE: &str = "flowtrace-relay";
/// Name of the agent's and the relay's container port for /metrics and the probes.
const METRICS_PORT: &str = "metrics";
/// Name of the agent's container port (and Service port) of the mTLS data API: the relay
/// looks for this name in the EndpointSlices.
const API_PORT: &str = "api";
/// The agents' headless Service, whose EndpointSlices the relay reads (its default
/// --agent-service).
const AGENT_SERVICE: &str = "flowtrace";
/// The agent's TLS Secret (what `flowtrace certs` and deploy/cert-manager/ produce).
const AGENT_SECRET: &str = "flowtrace-agent-tls";
/// Where both the agent and the relay mount their TLS Secret.
const TLS_DIR: &str = "/etc/flowtrace/tls";
/// The keys of the TLS Secrets (`flowtrace certs`, cert-manager's CA issuer).
const TLS_KEYS: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];
/// DNS SAN of the relay's client certificate: the agent's default --tls-client-name.
const RELAY_SAN: &str = "flowtrace-relay";
/// DNS SAN of the agents' certificate: the relay's default --agent-server-name.
const AGENT_SAN: &str = "flowtrace-agent";
/// Name of the relay's Deployment, ServiceAccount, Role, RoleBinding, Service and
/// NetworkPolicy (and of the Deployment in the README's port-forward command).
const RELAY: &str = "flowtrace-relay";
/// The relay's TLS Secret.
const RELAY_SECRET: &str = "flowtrace-relay-tls";
/// (API group, resource) the relay's Role grants; README line "Relay Role resources:".
const RELAY_RESOURCES: [(&str, &str); 1] = [("discovery.k8s.io", "endpointslices")];
/// The verbs of the relay's Role; README line "Relay Role verbs:".
const RELAY_VERBS: [&str; 3] = ["get", "list", "watch"];
const DASHBOARD: &str = "deploy/grafana/flowtrace-dashboard.json";
const CONFIG_EXAMPLE: &str = "deploy/configmap.example.toml";
/// Prometheus rule files (not Kubernetes objects: the manifest checks skip this directory).
const ALERTS_DIR: &str = "deploy/alerts";
/// The alerting rules, the one source of truth for the PrometheusRule's groups.
const RULES: &str = "deploy/alerts/flowtrace-rules.yaml";
/// `promtool test rules` unit tests of RULES.
const RULES_TEST: &str = "deploy/alerts/flowtrace-rules.test.yaml";
/// The Prometheus Operator's copy of RULES: its `spec:` is generated from RULES.
const PROMETHEUS_RULE: &str = "deploy/prometheus-operator/rules/prometheusrule.yaml";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository root")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// `path` relative to the repository root, for messages.
fn rel(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn read(rel_path: &str) -> String {
    let path = repo_root().join(rel_path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel_path}: cannot read: {e}"))
}

/// One YAML document of a file under deploy/.
struct Doc {
    /// The file, absolute.
    path: PathBuf,
    /// 1-based position among the file's (non-empty) documents.
    index: usize,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    fn is_kustomize(&self) -> bool {
        matches!(self.kind(), "Kustomization" | "Component")
    }

    /// Where the document is, for messages: file, position, kind and name.
    fn at(&self) -> String {
        format!(
            "{} document {} ({} {})",
            rel(&self.path),
            self.index,
            self.kind(),
            self.name()
        )
    }
}

/// Every `*.yaml` / `*.yml` under `dir`, recursively, sorted; not those of ALERTS_DIR, which
/// Prometheus reads and no `kubectl apply` does (checked by the alert tests at the end).
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", rel(&d))) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                if path.ends_with(ALERTS_DIR) {
                    continue;
                }
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read_docs(path: &Path) -> Vec<Doc> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: cannot read: {e}", rel(path)));
    let values: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", rel(path)));
    assert!(!values.is_empty(), "{}: no YAML document", rel(path));
    values
        .into_iter()
        .enumerate()
        .map(|(i, value)| {
            let doc = Doc {
                path: path.to_path_buf(),
                index: i + 1,
                value,
            };
            assert!(
                doc.value.is_object(),
                "{}: a document must be a mapping, not {}",
                doc.at(),
                doc.value
            );
            assert!(!doc.kind().is_empty(), "{}: no `kind`", doc.at());
            assert!(
                !doc.api_version().is_empty(),
                "{}: no `apiVersion`",
                doc.at()
            );
            doc
        })
        .collect()
}

/// Every document of every YAML file under deploy/.
fn all_docs() -> Vec<Doc> {
    let files = yaml_files(&deploy_dir());
    assert!(!files.is_empty(), "no YAML file under deploy/");
    files.iter().flat_map(|f| read_docs(f)).collect()
}

/// Reads `doc` into its k8s-openapi type, then writes it back: a field the type does not
/// have (misspelt, misplaced, or empty) is missing from what is written back, and would be
/// dropped or refused by the API server, so it fails the test.
fn typed<T: DeserializeOwned + Serialize>(doc: &Doc) -> T {
    let t: T = serde_json::from_value(doc.value.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", doc.at(), doc.kind()));
    let back = serde_json::to_value(&t).expect("serialising a k8s-openapi object");
    let mut unknown = Vec::new();
    diff_fields(&doc.value, &back, "", &mut unknown);
    assert!(
        unknown.is_empty(),
        "{}: fields that {} does not have, or that read back differently (misspelt, misplaced or empty?): {}",
        doc.at(),
        doc.kind(),
        unknown.join(", ")
    );
    t
}

/// Paths of `orig` that `back` lacks or holds with another value.
fn diff_fields(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(bv) => diff_fields(v, bv, &p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (v, bv)) in o.iter().zip(b).enumerate() {
                diff_fields(v, bv, &format!("{path}[{i}]"), out);
            }
        }
        (o, b) if o == b => {}
        (o, b) => out.push(format!("{path} (written {o}, read back as {b})")),
    }
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// Prometheus Operator monitors have no k8s-openapi type: their shape is checked here.
fn check_monitor(doc: &Doc, endpoints_key: &str) {
    assert_eq!(
        doc.api_version(),
        "monitoring.coreos.com/v1",
        "{}: apiVersion",
        doc.at()
    );
    let spec = &doc.value["spec"];
    let labels = spec
        .pointer("/selector/matchLabels")
        .and_then(Value::as_object);
    assert!(
        labels.is_some_and(|l| !l.is_empty()),
        "{}: spec.selector.matchLabels must select the agents",
        doc.at()
    );
    let endpoints = spec[endpoints_key]
        .as_array()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| panic!("{}: spec.{endpoints_key} must list an endpoint", doc.at()));
    for (i, ep) in endpoints.iter().enumerate() {
        let at = format!("{}: spec.{endpoints_key}[{i}]", doc.at());
        assert_eq!(
            str_at(ep, "/port"),
            Some(METRICS_PORT),
            "{at}.port must be the metrics listener (the data port `api` is mTLS only)"
        );
        assert_eq!(str_at(ep, "/path"), Some("/metrics"), "{at}.path");
        assert!(
            str_at(ep, "/interval").is_some(),
            "{at}.interval is missing"
        );
        for key in ep.as_object().into_iter().flat_map(|o| o.keys()) {
            assert!(
                [
                    "port",
                    "path",
                    "interval",
                    "scrapeTimeout",
                    "relabelings",
                    "metricRelabelings",
                    "honorLabels",
                    "scheme"
                ]
                .contains(&key.as_str()),
                "{at}: field `{key}` is not one this test knows (misspelt?)"
            );
        }
    }
}

/// A PrometheusRule has no k8s-openapi type either: its shape here, its content in
/// `prometheusrule_is_generated_from_the_rules_file`.
fn check_prometheus_rule(doc: &Doc) {
    assert_eq!(
        doc.api_version(),
        "monitoring.coreos.com/v1",
        "{}: apiVersion",
        doc.at()
    );
    assert_eq!(
        doc.value["spec"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["groups".to_owned()]),
        "{}: spec holds `groups` only (those of {RULES})",
        doc.at()
    );
}

const KUSTOMIZE_KEYS: [&str; 12] = [
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "labels",
    "images",
    "patches",
    "configMapGenerator",
    "generatorOptions",
    "namePrefix",
    "nameSuffix",
];

fn check_kustomization_shape(doc: &Doc) {
    let want = match doc.kind() {
        "Kustomization" => "kustomize.config.k8s.io/v1beta1",
        _ => "kustomize.config.k8s.io/v1alpha1",
    };
    assert_eq!(doc.api_version(), want, "{}: apiVersion", doc.at());
    let file_name = doc.path.file_name().and_then(|n| n.to_str());
    assert_eq!(
        file_name,
        Some("kustomization.yaml"),
        "{}: kustomize reads its kustomization from kustomization.yaml only",
        doc.at()
    );
    for key in doc.value.as_object().into_iter().flat_map(|o| o.keys()) {
        assert!(
            KUSTOMIZE_KEYS.contains(&key.as_str()),
            "{}: field `{key}` is not one this test knows (misspelt?)",
            doc.at()
        );
    }
    assert!(
        doc.value.get("namespace").is_none(),
        "{}: no `namespace:` here: kustomize would set it on every object below, moving the relay's objects out of {RELAY_NAMESPACE} (or its Role and RoleBinding out of {NAMESPACE}); every file names its own namespace",
        doc.at()
    );
    for key in ["resources", "components"] {
        if let Some(v) = doc.value.get(key) {
            let list = v
                .as_array()
                .unwrap_or_else(|| panic!("{}: {key} must be a list", doc.at()));
            for item in list {
                assert!(
                    item.is_string(),
                    "{}: {key} entry {item} is not a path",
                    doc.at()
                );
            }
        }
    }
}

/// Kinds that live in a namespace (everything here but these is cluster-scoped).
fn namespaced(kind: &str) -> bool {
    !matches!(
        kind,
        "Namespace" | "ClusterRole" | "ClusterRoleBinding" | "Kustomization" | "Component"
    )
}

/// Whether a document is the relay's (label app.kubernetes.io/component=relay).
fn is_relay_doc(doc: &Doc) -> bool {
    str_at(&doc.value, "/metadata/labels/app.kubernetes.io~1component") == Some("relay")
}

/// The namespace a namespaced document must be in: the relay's objects in the relay's
/// namespace, but for its Role and RoleBinding (the agents' EndpointSlices, in the agents'
/// namespace); everything else in the agents' namespace.
fn expected_namespace(doc: &Doc) -> &'static str {
    if is_relay_doc(doc) && !matches!(doc.kind(), "Role" | "RoleBinding") {
        RELAY_NAMESPACE
    } else {
        NAMESPACE
    }
}

fn namespace_of(doc: &Doc) -> &str {
    str_at(&doc.value, "/metadata/namespace").unwrap_or("")
}

#[test]
fn every_manifest_parses_as_its_kubernetes_type() {
    let docs = all_docs();
    let mut seen = BTreeSet::new();
    for doc in &docs {
        match doc.kind() {
            "Namespace" => {
                typed::<Namespace>(doc);
            }
            "ServiceAccount" => {
                typed::<ServiceAccount>(doc);
            }
            "ClusterRole" => {
                typed::<ClusterRole>(doc);
            }
            "ClusterRoleBinding" => {
                typed::<ClusterRoleBinding>(doc);
            }
            "DaemonSet" => {
                typed::<DaemonSet>(doc);
            }
            "Deployment" => {
                typed::<Deployment>(doc);
            }
            "Role" => {
                typed::<Role>(doc);
            }
            "RoleBinding" => {
                typed::<RoleBinding>(doc);
            }
            "NetworkPolicy" => {
                typed::<NetworkPolicy>(doc);
            }
            "Service" => {
                typed::<Service>(doc);
            }
            "ConfigMap" => {
                typed::<ConfigMap>(doc);
            }
            "ServiceMonitor" => check_monitor(doc, "endpoints"),
            "PodMonitor" => check_monitor(doc, "podMetricsEndpoints"),
            "PrometheusRule" => check_prometheus_rule(doc),
            "Issuer" | "Certificate" => check_cert_manager(doc),
            "ClusterIssuer" => panic!(
                "{}: no ClusterIssuer: it signs Certificates of every namespace (cert-manager approves requests by default), so whoever may create a Certificate anywhere could get a flowtrace-relay certificate and read every node's flows (deploy/README.md, Install)",
                doc.at()
            ),
            "Kustomization" | "Component" => check_kustomization_shape(doc),
            other => panic!(
                "{}: kind `{other}` is not one tests/tests/deploy.rs knows: add its check there",
                doc.at()
            ),
        }
        if namespaced(doc.kind()) {
            assert_eq!(
                namespace_of(doc),
                expected_namespace(doc),
                "{}: metadata.namespace (the relay's objects in {RELAY_NAMESPACE} but its Role and RoleBinding, everything else in {NAMESPACE})",
                doc.at()
            );
        }
        assert!(
            !doc.name().is_empty() || doc.is_kustomize(),
            "{}: no metadata.name",
            doc.at()
        );
        if !doc.is_kustomize() {
            assert!(
                seen.insert((
                    doc.kind().to_owned(),
                    namespace_of(doc).to_owned(),
                    doc.name().to_owned()
                )),
                "{}: a second {} named `{}` in namespace `{}`",
                doc.at(),
                doc.kind(),
                doc.name(),
                namespace_of(doc)
            );
        }
    }
}

/// Files (absolute) a kustomization directory includes, following directories it lists.
fn kustomize_closure(dir: &Path, files: &mut BTreeSet<PathBuf>) {
    let kfile = dir.join("kustomization.yaml");
    assert!(
        kfile.is_file(),
        "{}: listed as a kustomize directory but has no kustomization.yaml",
        rel(dir)
    );
    for doc in read_docs(&kfile) {
        for key in ["resources", "components"] {
            for entry in doc.value[key].as_array().into_iter().flatten() {
                let entry = entry.as_str().unwrap_or_default();
                let path = dir.join(entry);
                assert!(
                    path.exists(),
                    "{}: {key} lists `{entry}`, which does not exist ({})",
                    doc.at(),
                    rel(&path)
                );
                let path = path.canonicalize().expect("canonical path");
                if path.is_dir() {
                    kustomize_closure(&path, files);
                } else {
                    files.insert(path);
                }
            }
        }
    }
}

#[test]
fn kustomizations_list_every_manifest_and_the_base_needs_no_crd() {
    let deploy = deploy_dir().canonicalize().expect("deploy/ exists");
    let mut listed = BTreeSet::new();
    let kustomizations: Vec<PathBuf> = yaml_files(&deploy)
        .into_iter()
        .filter(|f| f.file_name().and_then(|n| n.to_str()) == Some("kustomization.yaml"))
        .collect();
    assert!(
        kustomizations.contains(&deploy.join("kustomization.yaml")),
        "deploy/kustomization.yaml is missing: `kubectl apply -k deploy/` is the install"
    );
    for k in &kustomizations {
        kustomize_closure(k.parent().expect("a file's directory"), &mut listed);
    }
    for f in yaml_files(&deploy) {
        if f.file_name().and_then(|n| n.to_str()) == Some("kustomization.yaml") {
            continue;
        }
        assert!(
            listed.contains(&f.canonicalize().expect("canonical path")),
            "{}: no kustomization.yaml lists it, so no `kubectl apply -k` applies it",
            rel(&f)
        );
    }

    // The base is the whole install and works on a cluster without the Prometheus
    // Operator's or cert-manager's CRDs: every other object is in it, no monitor and no
    // cert-manager object is.
    let mut base = BTreeSet::new();
    kustomize_closure(&deploy, &mut base);
    for doc in all_docs() {
        if doc.is_kustomize() {
            continue;
        }
        let in_base = base.contains(&doc.path.canonicalize().expect("canonical path"));
        if doc.api_version().starts_with("monitoring.coreos.com/") {
            assert!(
                !in_base,
                "{}: needs the Prometheus Operator's CRDs, so it must not be in deploy/kustomization.yaml (use deploy/prometheus-operator/)",
                doc.at()
            );
        } else if doc.api_version().starts_with("cert-manager.io/") {
            assert!(
                !in_base,
                "{}: needs cert-manager's CRDs, so it must not be in deploy/kustomization.yaml (use deploy/cert-manager/)",
                doc.at()
            );
        } else {
            assert!(
                in_base,
                "{}: not reachable from deploy/kustomization.yaml, so `kubectl apply -k deploy/` does not install it",
                doc.at()
            );
        }
    }
}

/// The document of `kind` named `name`, read into its type.
fn named<T: DeserializeOwned + Serialize>(docs: &[Doc], kind: &str, name: &str) -> (String, T) {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == kind && d.name() == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/ must hold exactly one {kind} named `{name}`, found {}",
        found.len()
    );
    (found[0].at(), typed(found[0]))
}

/// The single document of `kind`, read into its type.
fn one<T: DeserializeOwned + Serialize>(docs: &[Doc], kind: &str) -> (String, T) {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.kind() == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/ must hold exactly one {kind}, found {}: {}",
        found.len(),
        found.iter().map(|d| d.at()).collect::<Vec<_>>().join(", ")
    );
    (found[0].at(), typed(found[0]))
}

fn pod_spec<'a>(at: &str, ds: &'a DaemonSet) -> &'a PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("{at}: no spec.template.spec"))
}

fn the_agent<'a>(at: &str, pod: &'a PodSpec) -> &'a Container {
    assert_eq!(
        pod.containers.len(),
        1,
        "{at}: one container (the agent) expected, found {}",
        pod.containers.len()
    );
    &pod.containers[0]
}

/// A line of deploy/README.md that starts the list `label` (e.g. "Capabilities added:"):
/// the `backticked` items after the label.
fn readme_list(label: &str) -> Vec<String> {
    let text = read("deploy/README.md");
    let line = text
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("deploy/README.md has no line with `{label}` listing the set"));
    let rest = &line[line.find(label).expect("found above") + label.len()..];
    rest.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Normalises a capability name: Kubernetes accepts `BPF` and `CAP_BPF` alike.
fn cap_name(c: &str) -> String {
    c.trim_start_matches("CAP_").to_ascii_uppercase()
}

#[test]
fn daemonset_runs_unprivileged_with_exactly_the_documented_capabilities() {
    let want: BTreeSet<String> = CAPABILITIES.iter().map(|c| cap_name(c)).collect();
    let documented: BTreeSet<String> = readme_list("Capabilities added:")
        .iter()
        .map(|c| cap_name(c))
        .collect();
    assert_eq!(
        documented, want,
        "deploy/README.md's `Capabilities added:` line lists another set than the one tested here"
    );

    let docs = all_docs();
    let (at, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let pod = pod_spec(&at, &ds);
    assert_eq!(
        pod.host_network,
        Some(true),
        "{at}: spec.template.spec.hostNetwork must be true (the agent traces the node's interfaces)"
    );
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("ClusterFirstWithHostNet"),
        "{at}: spec.template.spec.dnsPolicy (hostNetwork pods need ClusterFirstWithHostNet for cluster DNS)"
    );
    assert_ne!(pod.host_pid, Some(true), "{at}: hostPID is not needed");
    assert_ne!(pod.host_ipc, Some(true), "{at}: hostIPC is not needed");

    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    for effect in ["NoSchedule", "NoExecute"] {
        assert!(
            tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.as_deref().is_none_or(|e| e == effect)),
            "{at}: spec.template.spec.tolerations must tolerate every {effect} taint (operator: Exists, no key), or some nodes run no agent"
        );
    }

    // One host path only: the directory of pod network namespaces, read-only, to place drops
    // inside pods. The agent pins nothing in bpffs and reads no tracefs (the least-privilege
    // test runs it with neither mounted).
    for v in pod.volumes.as_deref().unwrap_or_default() {
        if let Some(hp) = &v.host_path {
            assert!(
                v.name == "netns" && hp.path == "/var/run/netns",
                "{at}: volume `{}` mounts host path {}; the agent needs none but /var/run/netns (deploy/README.md, Security)",
                v.name,
                hp.path
            );
            for c in &pod.containers {
                for m in c.volume_mounts.as_deref().unwrap_or_default() {
                    if m.name == v.name {
                        assert_eq!(
                            m.read_only,
                            Some(true),
                            "{at}: container `{}` must mount {} read-only",
                            c.name,
                            hp.path
                        );
                    }
                }
            }
        }
    }

    let pod_seccomp = pod
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .map(|p| p.type_.clone());
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.as_deref().unwrap_or_default());
    for c in containers {
        let at = format!("{at}: container `{}`", c.name);
        let sc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: no securityContext"));
        assert_ne!(
            sc.privileged,
            Some(true),
            "{at}: privileged must not be true"
        );
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{at}: securityContext.allowPrivilegeEscalation must be false"
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{at}: securityContext.readOnlyRootFilesystem must be true"
        );
        let caps = sc
            .capabilities
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: securityContext.capabilities is missing"));
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_owned()][..]),
            "{at}: securityContext.capabilities.drop must be exactly [\"ALL\"]"
        );
        let add: Vec<String> = caps
            .add
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|c| cap_name(c))
            .collect();
        let add_set: BTreeSet<String> = add.iter().cloned().collect();
        assert_eq!(
            add.len(),
            add_set.len(),
            "{at}: securityContext.capabilities.add repeats a capability: {add:?}"
        );
        assert_eq!(
            add_set, want,
            "{at}: securityContext.capabilities.add must be exactly the documented set (deploy/README.md)"
        );
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.clone())
            .or(pod_seccomp.clone());
        assert!(
            matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")),
            "{at}: seccompProfile must be RuntimeDefault (or Localhost), found {seccomp:?}"
        );
    }
}

/// The container port `port` designates (by name or number).
fn resolve_port(at: &str, c: &Container, port: &IntOrString) -> i32 {
    let ports = c.ports.as_deref().unwrap_or_default();
    let found = match port {
        IntOrString::String(name) => ports.iter().find(|p| p.name.as_deref() == Some(name)),
        IntOrString::Int(n) => ports.iter().find(|p| p.container_port == *n),
    };
    found
        .unwrap_or_else(|| panic!("{at}: port {port:?} is not one of the container's ports"))
        .container_port
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
    c.env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == name)
}

/// The number of the container port named `name`.
fn named_port(at: &str, c: &Container, name: &str) -> i32 {
    c.ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{at}: no container port named `{name}`"))
        .container_port
}

/// The address:port that env `var` of `c` holds (it must be set).
fn env_addr(at: &str, c: &Container, var: &str) -> SocketAddr {
    let v = env_value(c, var)
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("{at}: env {var} is missing"));
    v.parse()
        .unwrap_or_else(|e| panic!("{at}: env {var} `{v}` is not an address:port: {e}"))
}

/// The Secret volume whose read-only mount holds the file env `var` names (under TLS_DIR).
fn secret_behind<'a>(
    at: &str,
    c: &Container,
    volumes: &'a [Volume],
    var: &str,
) -> &'a SecretVolumeSource {
    let file = env_value(c, var)
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("{at}: env {var} is missing"));
    let dir = Path::new(file)
        .parent()
        .unwrap_or_else(|| panic!("{at}: env {var} `{file}` is not a file path"));
    assert_eq!(
        dir,
        Path::new(TLS_DIR),
        "{at}: env {var} `{file}` must be a file of {TLS_DIR}, where the TLS Secret is mounted"
    );
    // The deepest mount holding the file is the one that serves it.
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|m| dir.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("{at}: nothing is mounted where env {var} points ({file})"));
    assert_eq!(
        Path::new(&mount.mount_path),
        dir,
        "{at}: env {var} `{file}` is not in the TLS mount but in the mount of `{}` at {}",
        mount.name,
        mount.mount_path
    );
    assert_eq!(
        mount.read_only,
        Some(true),
        "{at}: the mount at {} must be readOnly",
        mount.mount_path
    );
    assert!(
        mount.sub_path.is_none() && mount.sub_path_expr.is_none(),
        "{at}: the mount at {} must not use subPath: a subPath mount never sees a rotated Secret",
        mount.mount_path
    );
    let volume = volumes
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{at}: volume `{}` does not exist", mount.name));
    let secret = volume.secret.as_ref().unwrap_or_else(|| {
        panic!(
            "{at}: volume `{}` (env {var}) must be a Secret volume",
            volume.name
        )
    });
    if let Some(items) = &secret.items {
        let key = Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            items.iter().any(|i| i.path == key),
            "{at}: Secret volume `{}` lists items but none at {key}",
            volume.name
        );
    }
    let key = Path::new(file)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    assert!(
        TLS_KEYS.contains(&key),
        "{at}: env {var} `{file}`: {key} is not a key of a kubernetes.io/tls Secret with a CA ({TLS_KEYS:?})"
    );
    secret
}

#[test]
fn daemonset_probes_ports_env_and_resources_fit_together() {
    let docs = all_docs();
    let (at, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let pod = pod_spec(&at, &ds);
    let agent = the_agent(&at, pod);
    let at = format!("{at}: container `{}`", agent.name);

    assert_eq!(
        agent.args.as_deref(),
        Some(&["agent".to_owned()][..]),
        "{at}: args must be [\"agent\"]"
    );
    let metrics = named_port(&at, agent, METRICS_PORT);
    let api = named_port(&at, agent, API_PORT);

    for (probe, kind, path) in [
        (&agent.liveness_probe, "livenessProbe", "/healthz"),
        (&agent.readiness_probe, "readinessProbe", "/readyz"),
        (&agent.startup_probe, "startupProbe", "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{at}: {kind} must be an httpGet probe"));
        assert_eq!(get.path.as_deref(), Some(path), "{at}: {kind}.httpGet.path");
        assert_eq!(
            resolve_port(&format!("{at}: {kind}.httpGet.port"), agent, &get.port),
            metrics,
            "{at}: {kind}.httpGet.port must be the metrics listener's port `{METRICS_PORT}` (the kubelet has no client certificate for `{API_PORT}`)"
        );
        assert_ne!(
            get.scheme.as_deref(),
            Some("HTTPS"),
            "{at}: {kind}: the metrics listener is plain HTTP"
        );
    }

    // The whole API stays on loopback (the agent refuses anything else for --listen).
    if let Some(listen) = env_value(agent, "FLOWTRACE_LISTEN") {
        let v = listen.value.as_deref().unwrap_or_else(|| {
            panic!("{at}: env FLOWTRACE_LISTEN must be a plain value (or absent)")
        });
        let addr: SocketAddr = v.parse().unwrap_or_else(|e| {
            panic!("{at}: env FLOWTRACE_LISTEN `{v}` is not an address:port: {e}")
        });
        assert!(
            addr.ip().is_loopback(),
            "{at}: env FLOWTRACE_LISTEN `{v}` must be a loopback address (the unauthenticated API; the agent refuses to start otherwise)"
        );
    }
    for p in agent.ports.as_deref().unwrap_or_default() {
        assert!(
            p.container_port == metrics || p.container_port == api,
            "{at}: container port {} ({:?}) is neither `{METRICS_PORT}` nor `{API_PORT}`; the loopback API is not a port to publish",
            p.container_port,
            p.name
        );
    }
    for (var, port, name) in [
        ("FLOWTRACE_METRICS_LISTEN", metrics, METRICS_PORT),
        ("FLOWTRACE_API_LISTEN", api, API_PORT),
    ] {
        let addr = env_addr(&at, agent, var);
        assert!(
            addr.ip().is_unspecified(),
            "{at}: env {var} must bind every node address (0.0.0.0), not {}",
            addr.ip()
        );
        assert_eq!(
            i32::from(addr.port()),
            port,
            "{at}: env {var}'s port must be the container port `{name}`"
        );
    }

    // The data API needs its certificate, key and client CA, all from the agent's Secret.
    let pod_volumes = pod.volumes.as_deref().unwrap_or_default();
    for var in [
        "FLOWTRACE_TLS_CERT",
        "FLOWTRACE_TLS_KEY",
        "FLOWTRACE_TLS_CLIENT_CA",
    ] {
        let secret = secret_behind(&at, agent, pod_volumes, var);
        assert_eq!(
            secret.secret_name.as_deref(),
            Some(AGENT_SECRET),
            "{at}: env {var} must point into Secret {AGENT_SECRET}"
        );
        assert_eq!(
            secret.optional,
            Some(false),
            "{at}: Secret volume {AGENT_SECRET} must say `optional: false`: the agent refuses to start without these files (deploy/daemonset.yaml says why)"
        );
    }
    if let Some(names) = env_value(agent, "FLOWTRACE_TLS_CLIENT_NAME") {
        assert_eq!(
            names.value.as_deref(),
            Some(RELAY_SAN),
            "{at}: env FLOWTRACE_TLS_CLIENT_NAME must allow the relay's certificate name"
        );
    }

    let node = env_value(agent, "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|f| f.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        node,
        Some("spec.nodeName"),
        "{at}: env NODE_NAME must come from the downward API field spec.nodeName"
    );

    // The settings file lives in the optional ConfigMap volume.
    let config = env_value(agent, "FLOWTRACE_CONFIG")
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("{at}: env FLOWTRACE_CONFIG is missing"));
    let config_dir = Path::new(config)
        .parent()
        .expect("a file path has a parent");
    let mount = agent
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| Path::new(&m.mount_path) == config_dir)
        .unwrap_or_else(|| {
            panic!(
                "{at}: nothing is mounted at {}, where FLOWTRACE_CONFIG points",
                config_dir.display()
            )
        });
    let volume = pod
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| {
            panic!(
                "{at}: volume `{}` of the mount at {} does not exist",
                mount.name, mount.mount_path
            )
        });
    let cm = volume.config_map.as_ref().unwrap_or_else(|| {
        panic!(
            "{at}: volume `{}` (settings file) must be a ConfigMap",
            volume.name
        )
    });
    assert_eq!(
        cm.optional,
        Some(true),
        "{at}: ConfigMap volume `{}` must be optional: the install works without a settings file",
        volume.name
    );

    let res = agent
        .resources
        .as_ref()
        .unwrap_or_else(|| panic!("{at}: no resources"));
    let requests = res.requests.clone().unwrap_or_default();
    let limits = res.limits.clone().unwrap_or_default();
    for r in ["cpu", "memory"] {
        assert!(
            requests.contains_key(r),
            "{at}: resources.requests.{r} is missing"
        );
    }
    assert!(
        limits.contains_key("memory"),
        "{at}: resources.limits.memory is missing"
    );
    assert!(
        !limits.contains_key("cpu"),
        "{at}: resources.limits.cpu is set, but a throttled agent drains late and loses flows (deploy/README.md, Resources)"
    );

    let annotations = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    let metrics_s = metrics.to_string();
    for (key, want) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", metrics_s.as_str()),
        ("prometheus.io/path", "/metrics"),
    ] {
        assert_eq!(
            annotations.get(key).map(String::as_str),
            Some(want),
            "{at}: pod template annotation {key}"
        );
    }
}

fn relay_pod<'a>(at: &str, d: &'a Deployment) -> &'a PodSpec {
    d.spec
        .template
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("{at}: no spec.template.spec"))
}

fn the_relay<'a>(at: &str, d: &'a Deployment) -> &'a Container {
    let pod = relay_pod(at, d);
    assert_eq!(
        pod.containers.len(),
        1,
        "{at}: one container (the relay) expected, found {}",
        pod.containers.len()
    );
    &pod.containers[0]
}

fn relay_pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

#[test]
fn relay_runs_non_root_without_capabilities() {
    let docs = all_docs();
    let (at, d) = named::<Deployment>(&docs, "Deployment", RELAY);
    assert_eq!(
        d.spec.replicas,
        Some(1),
        "{at}: spec.replicas must be 1 (a second relay doubles every agent's load)"
    );
    let pod = relay_pod(&at, &d);
    assert_ne!(
        pod.host_network,
        Some(true),
        "{at}: the relay needs no host network"
    );
    assert_ne!(pod.host_pid, Some(true), "{at}: hostPID is not needed");
    assert_ne!(pod.host_ipc, Some(true), "{at}: hostIPC is not needed");
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(RELAY),
        "{at}: serviceAccountName must be the relay's own account (not the agents')"
    );
    assert_eq!(
        pod.automount_service_account_token,
        Some(true),
        "{at}: automountServiceAccountToken must be true: the relay lists and watches EndpointSlices"
    );
    for v in pod.volumes.as_deref().unwrap_or_default() {
        assert!(
            v.host_path.is_none(),
            "{at}: volume `{}` is a host path; the relay needs none",
            v.name
        );
    }
    let psc = pod
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{at}: no spec.template.spec.securityContext"));
    let pod_uid = psc.run_as_user;
    assert!(
        pod_uid.is_some_and(|u| u > 0),
        "{at}: securityContext.runAsUser must be a fixed non-zero uid (the image's user is root), found {pod_uid:?}"
    );
    assert!(
        psc.run_as_group.is_some_and(|g| g > 0),
        "{at}: securityContext.runAsGroup must be a fixed non-zero gid"
    );
    let pod_non_root = psc.run_as_non_root;
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|p| p.type_.clone());
    let containers = pod
        .containers
        .iter()
        .chain(pod.init_containers.as_deref().unwrap_or_default());
    for c in containers {
        let at = format!("{at}: container `{}`", c.name);
        let sc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: no securityContext"));
        assert_ne!(
            sc.privileged,
            Some(true),
            "{at}: privileged must not be true"
        );
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{at}: allowPrivilegeEscalation must be false"
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{at}: readOnlyRootFilesystem must be true"
        );
        assert_eq!(
            sc.run_as_non_root.or(pod_non_root),
            Some(true),
            "{at}: runAsNonRoot must be true"
        );
        let uid = sc.run_as_user.or(pod_uid);
        assert!(
            uid.is_some_and(|u| u > 0),
            "{at}: runs as uid {uid:?}; it must be a fixed non-zero uid"
        );
        let caps = sc
            .capabilities
            .as_ref()
            .unwrap_or_else(|| panic!("{at}: securityContext.capabilities is missing"));
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_owned()][..]),
            "{at}: capabilities.drop must be exactly [\"ALL\"]"
        );
        assert!(
            caps.add.as_deref().unwrap_or_default().is_empty(),
            "{at}: capabilities.add must be empty, found {:?}",
            caps.add
        );
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.clone())
            .or(pod_seccomp.clone());
        assert_eq!(
            seccomp.as_deref(),
            Some("RuntimeDefault"),
            "{at}: seccompProfile must be RuntimeDefault"
        );
    }
}

#[test]
fn relay_probes_ports_env_and_tls_fit_together() {
    let docs = all_docs();
    let (at, d) = named::<Deployment>(&docs, "Deployment", RELAY);
    let pod = relay_pod(&at, &d);
    let relay = the_relay(&at, &d);
    let at = format!("{at}: container `{}`", relay.name);
    assert_eq!(
        relay.args.as_deref(),
        Some(&["relay".to_owned()][..]),
        "{at}: args must be [\"relay\"]"
    );
    let metrics = named_port(&at, relay, METRICS_PORT);
    for (probe, kind, path) in [
        (&relay.liveness_probe, "livenessProbe", "/healthz"),
        (&relay.readiness_probe, "readinessProbe", "/readyz"),
        (&relay.startup_probe, "startupProbe", "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{at}: {kind} must be an httpGet probe"));
        assert_eq!(get.path.as_deref(), Some(path), "{at}: {kind}.httpGet.path");
        assert_eq!(
            resolve_port(&format!("{at}: {kind}.httpGet.port"), relay, &get.port),
            metrics,
            "{at}: {kind}.httpGet.port must be `{METRICS_PORT}` (the relay API is on loopback)"
        );
    }
    let m = env_addr(&at, relay, "FLOWTRACE_METRICS_LISTEN");
    assert!(
        m.ip().is_unspecified(),
        "{at}: env FLOWTRACE_METRICS_LISTEN must bind the pod's addresses (0.0.0.0), not {}",
        m.ip()
    );
    assert_eq!(
        i32::from(m.port()),
        metrics,
        "{at}: env FLOWTRACE_METRICS_LISTEN's port must be the container port `{METRICS_PORT}`"
    );
    // The relay API: loopback only (port-forward), never a container port.
    let api = env_addr(&at, relay, "FLOWTRACE_RELAY_LISTEN");
    assert!(
        api.ip().is_loopback(),
        "{at}: env FLOWTRACE_RELAY_LISTEN `{api}` must be loopback: the relay API has no authentication, port-forward's RBAC is its access control"
    );
    for p in relay.ports.as_deref().unwrap_or_default() {
        assert_ne!(
            p.container_port,
            i32::from(api.port()),
            "{at}: the relay API's port must not be a container port"
        );
    }
    assert!(
        env_value(relay, "FLOWTRACE_RELAY_AGENTS").is_none(),
        "{at}: env FLOWTRACE_RELAY_AGENTS turns discovery off; the Deployment discovers the agents"
    );
    // Discovery looks in the agents' namespace for the agents' Service, not in the relay's own
    // namespace: the variables, when set, must say so (unset, the defaults are these).
    let (dat, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let (sat, svc) = named::<Service>(&docs, "Service", AGENT_SERVICE);
    let agents_ns = ds.metadata.namespace.clone().unwrap_or_default();
    assert_eq!(
        svc.metadata.namespace.as_deref(),
        Some(agents_ns.as_str()),
        "{sat}: the agents' Service must be in the DaemonSet's namespace ({dat})"
    );
    for (var, want, default) in [
        ("FLOWTRACE_RELAY_NAMESPACE", agents_ns.as_str(), NAMESPACE),
        (
            "FLOWTRACE_RELAY_AGENT_SERVICE",
            AGENT_SERVICE,
            AGENT_SERVICE,
        ),
    ] {
        let value = env_value(relay, var)
            .map(|e| e.value.as_deref().unwrap_or_default())
            .unwrap_or(default);
        assert_eq!(
            value,
            want,
            "{at}: env {var} (default {default}) must name the agents' {} `{want}`",
            if var.ends_with("NAMESPACE") {
                "namespace"
            } else {
                "headless Service"
            }
        );
    }
    let annotations = d
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    let metrics_s = metrics.to_string();
    for (key, want) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", metrics_s.as_str()),
        ("prometheus.io/path", "/metrics"),
    ] {
        assert_eq!(
            annotations.get(key).map(String::as_str),
            Some(want),
            "{at}: pod template annotation {key}"
        );
    }

    let volumes = pod.volumes.as_deref().unwrap_or_default();
    for var in [
        "FLOWTRACE_TLS_CERT",
        "FLOWTRACE_TLS_KEY",
        "FLOWTRACE_TLS_CA",
    ] {
        let secret = secret_behind(&at, relay, volumes, var);
        assert_eq!(
            secret.secret_name.as_deref(),
            Some(RELAY_SECRET),
            "{at}: env {var} must point into Secret {RELAY_SECRET}"
        );
        assert_ne!(
            secret.optional,
            Some(true),
            "{at}: Secret volume {RELAY_SECRET} must not be optional: the relay reaches no agent without it"
        );
        // A non-root relay reads tls.key only through the group (fsGroup) or the world bits,
        // and the world bits must stay clear for a private key.
        let mode = secret.default_mode.unwrap_or(0o644);
        let fs_group = pod.security_context.as_ref().and_then(|s| s.fs_group);
        assert!(
            mode & 0o040 != 0 && fs_group.is_some(),
            "{at}: Secret volume {RELAY_SECRET} mode {mode:o}, fsGroup {fs_group:?}: the non-root relay cannot read its key (set fsGroup and a group-readable mode)"
        );
        assert_eq!(
            mode & 0o007,
            0,
            "{at}: Secret volume {RELAY_SECRET} mode {mode:o}: the private key must not be world-readable"
        );
    }
    let res = relay
        .resources
        .as_ref()
        .unwrap_or_else(|| panic!("{at}: no resources"));
    let requests = res.requests.clone().unwrap_or_default();
    let limits = res.limits.clone().unwrap_or_default();
    for r in ["cpu", "memory"] {
        assert!(
            requests.contains_key(r),
            "{at}: resources.requests.{r} is missing"
        );
    }
    let limit = limits
        .get("memory")
        .unwrap_or_else(|| panic!("{at}: resources.limits.memory is missing"));
    let mib = limit
        .0
        .strip_suffix("Mi")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| {
            panic!(
                "{at}: resources.limits.memory `{}`: write it in Mi",
                limit.0
            )
        });
    assert!(
        mib >= 200,
        "{at}: resources.limits.memory {mib}Mi is below the issue's goal of 200 MiB RSS at 100 nodes"
    );

    // deploy/README.md gives the exact commands: they must name this Deployment and port.
    let readme = read("deploy/README.md");
    for cmd in [
        format!(
            "kubectl -n {RELAY_NAMESPACE} port-forward deploy/{RELAY} {0}:{0}",
            api.port()
        ),
        format!("flowtrace flows --relay http://127.0.0.1:{}", api.port()),
        format!("FLOWTRACE_RELAY=http://127.0.0.1:{}", api.port()),
    ] {
        assert!(
            readme.contains(&cmd),
            "deploy/README.md must give `{cmd}` (the relay's Deployment and FLOWTRACE_RELAY_LISTEN's port)"
        );
    }
    assert_eq!(
        d.metadata.namespace.as_deref(),
        Some(RELAY_NAMESPACE),
        "{at}: the relay's Deployment must be in {RELAY_NAMESPACE}"
    );
    assert!(
        !readme.contains(&format!("-n {NAMESPACE} port-forward deploy/{RELAY}")),
        "deploy/README.md still port-forwards to the relay in namespace {NAMESPACE}; it is in {RELAY_NAMESPACE}"
    );
}

/// The (group, resource) pairs and the verbs `rules` grant, checking there is no wildcard,
/// no resourceNames (they break list and watch) and no non-resource URL.
fn grants(at: &str, rules: &[PolicyRule]) -> (BTreeSet<(String, String)>, BTreeSet<String>) {
    assert!(!rules.is_empty(), "{at}: no rules");
    let mut pairs = BTreeSet::new();
    let mut verbs = BTreeSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{at}: rules[{i}]");
        assert!(
            rule.non_resource_urls.is_none(),
            "{at}: nonResourceURLs are not needed"
        );
        assert!(
            rule.resource_names.is_none(),
            "{at}: resourceNames would break list and watch"
        );
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        for (field, values) in [
            ("verbs", &rule.verbs[..]),
            ("apiGroups", groups),
            ("resources", resources),
        ] {
            assert!(
                !values.iter().any(|v| v.contains('*')),
                "{at}.{field} has a wildcard: {values:?}"
            );
        }
        assert!(
            !groups.is_empty() && !resources.is_empty(),
            "{at}: apiGroups and resources must be listed"
        );
        verbs.extend(rule.verbs.iter().cloned());
        for g in groups {
            for r in resources {
                pairs.insert((g.clone(), r.clone()));
            }
        }
    }
    (pairs, verbs)
}

#[test]
fn relay_role_reads_only_endpointslices_in_the_agents_namespace() {
    let want_resources: BTreeSet<(String, String)> = RELAY_RESOURCES
        .iter()
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    let want_verbs: BTreeSet<String> = RELAY_VERBS.iter().map(|v| v.to_string()).collect();
    let doc_resources: BTreeSet<(String, String)> = readme_list("Relay Role resources:")
        .iter()
        .map(|s| group_resource(s))
        .collect();
    assert_eq!(
        doc_resources, want_resources,
        "deploy/README.md's `Relay Role resources:` line lists another set than the one tested here"
    );
    let doc_verbs: BTreeSet<String> = readme_list("Relay Role verbs:").into_iter().collect();
    assert_eq!(
        doc_verbs, want_verbs,
        "deploy/README.md's `Relay Role verbs:` line lists another set than the one tested here"
    );

    let docs = all_docs();
    let (dat, d) = named::<Deployment>(&docs, "Deployment", RELAY);
    let sa = relay_pod(&dat, &d)
        .service_account_name
        .clone()
        .unwrap_or_else(|| panic!("{dat}: no serviceAccountName"));
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    assert_eq!(
        ns, RELAY_NAMESPACE,
        "{dat}: the relay runs in its own namespace {RELAY_NAMESPACE}"
    );
    let (sat, account) = named::<ServiceAccount>(&docs, "ServiceAccount", &sa);
    assert_eq!(
        account.metadata.namespace.as_deref(),
        Some(ns.as_str()),
        "{sat}: the relay's ServiceAccount must be in the Deployment's namespace {ns}"
    );

    // Every binding naming the relay's account: exactly one RoleBinding, nothing cluster-wide.
    let is_relay = |s: &Subject| {
        s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(ns.as_str())
    };
    for doc in docs.iter().filter(|d| d.kind() == "ClusterRoleBinding") {
        let b: ClusterRoleBinding = typed(doc);
        assert!(
            !b.subjects.as_deref().unwrap_or_default().iter().any(is_relay),
            "{}: binds the relay's account {ns}/{sa} cluster-wide; it may read the agents' EndpointSlices in {NAMESPACE} only",
            doc.at()
        );
    }
    // Nothing cluster-wide is the relay's at all (no ClusterRole for it to be bound to later).
    let cluster_wide: Vec<String> = docs
        .iter()
        .filter(|d| matches!(d.kind(), "ClusterRole" | "ClusterRoleBinding") && is_relay_doc(d))
        .map(Doc::at)
        .collect();
    assert!(
        cluster_wide.is_empty(),
        "{cluster_wide:?}: the relay has nothing cluster-wide, only a Role in {NAMESPACE}"
    );
    let bindings: Vec<(String, RoleBinding)> = docs
        .iter()
        .filter(|d| d.kind() == "RoleBinding")
        .map(|d| (d.at(), typed::<RoleBinding>(d)))
        .filter(|(_, b)| {
            b.subjects
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(is_relay)
        })
        .collect();
    assert_eq!(
        bindings.len(),
        1,
        "exactly one RoleBinding must bind the relay's account {ns}/{sa}, found {}",
        bindings.len()
    );
    let (bat, binding) = &bindings[0];
    assert_eq!(
        binding.metadata.namespace.as_deref(),
        Some(NAMESPACE),
        "{bat}: the binding must be in namespace {NAMESPACE}, where the agents' EndpointSlices are (not in the relay's {ns})"
    );
    assert_eq!(
        binding.subjects.as_deref().unwrap_or_default().len(),
        1,
        "{bat}: only the relay's account is bound"
    );
    assert_eq!(
        (
            binding.role_ref.api_group.as_deref().unwrap_or_default(),
            binding.role_ref.kind.as_str()
        ),
        ("rbac.authorization.k8s.io", "Role"),
        "{bat}: roleRef must be a Role of this namespace, not a ClusterRole"
    );
    let (rat, role) = named::<Role>(&docs, "Role", &binding.role_ref.name);
    assert_eq!(
        role.metadata.namespace.as_deref(),
        Some(NAMESPACE),
        "{rat}: the Role must be in namespace {NAMESPACE}"
    );
    let (granted, verbs) = grants(&rat, role.rules.as_deref().unwrap_or_default());
    assert_eq!(
        granted, want_resources,
        "{rat}: the relay must read exactly {RELAY_RESOURCES:?}"
    );
    assert_eq!(
        verbs, want_verbs,
        "{rat}: the relay's verbs must be exactly {RELAY_VERBS:?}"
    );
    // The EndpointSlices it reads are those of the agents' Service, in the same namespace.
    let (sat, svc) = named::<Service>(&docs, "Service", AGENT_SERVICE);
    assert_eq!(
        svc.metadata.namespace.as_deref(),
        role.metadata.namespace.as_deref(),
        "{sat}: the agents' Service must be in the relay Role's namespace"
    );
}

/// `yaml` fenced blocks of deploy/README.md, each read as its documents.
fn readme_yaml_blocks() -> Vec<(usize, Vec<Value>)> {
    let text = read("deploy/README.md");
    let mut out = Vec::new();
    let mut rest = text.as_str();
    let mut offset = 0;
    while let Some(start) = rest.find("```yaml\n") {
        let body = &rest[start + 8..];
        let end = body
            .find("```")
            .expect("deploy/README.md: an unclosed ```yaml block");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&body[..end]).unwrap_or_else(|e| {
            panic!(
                "deploy/README.md: the yaml block at byte {} is not valid YAML: {e}",
                offset + start
            )
        });
        out.push((offset + start, docs));
        let consumed = start + 8 + end + 3;
        offset += consumed;
        rest = &rest[consumed..];
    }
    out
}

#[test]
fn relay_lives_alone_in_its_own_namespace() {
    let docs = all_docs();
    let (nat, ns) = named::<Namespace>(&docs, "Namespace", RELAY_NAMESPACE);
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted"),
        "{nat}: Pod Security Admission must enforce `restricted`: the relay meets it, and nothing privileged belongs next to it"
    );
    let (dat, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    assert_ne!(
        ds.metadata.namespace.as_deref(),
        Some(RELAY_NAMESPACE),
        "{dat}: the agents must not be in the relay's namespace: port-forward there would reach every node's loopback"
    );
    // Whoever may port-forward in the relay's namespace reaches the relay and nothing else:
    // the only pods there are the relay Deployment's, on the pod network.
    for doc in docs.iter().filter(|d| namespace_of(d) == RELAY_NAMESPACE) {
        assert!(
            is_relay_doc(doc),
            "{}: namespace {RELAY_NAMESPACE} holds only the relay's objects",
            doc.at()
        );
        assert!(
            !matches!(
                doc.kind(),
                "DaemonSet" | "StatefulSet" | "Job" | "CronJob" | "Pod" | "ReplicaSet"
            ),
            "{}: the relay's namespace holds no workload but the relay's Deployment",
            doc.at()
        );
        if doc.kind() == "Deployment" {
            assert_eq!(
                doc.name(),
                RELAY,
                "{}: only the relay's Deployment",
                doc.at()
            );
            assert!(
                doc.value
                    .pointer("/spec/template/spec/hostNetwork")
                    .and_then(Value::as_bool)
                    != Some(true),
                "{}: a hostNetwork pod in {RELAY_NAMESPACE} would make its pods/portforward node access",
                doc.at()
            );
        }
    }

    // The README's sample Role for the relay's users grants port-forward in the relay's
    // namespace, and no README sample grants it in the agents'.
    let mut samples = 0;
    for (at, block) in readme_yaml_blocks() {
        for v in block.iter().filter(|v| str_at(v, "/kind") == Some("Role")) {
            let portforward = v["rules"].as_array().into_iter().flatten().any(|r| {
                strings(&r["resources"]).contains("pods/portforward")
                    && strings(&r["verbs"]).contains("create")
            });
            if !portforward {
                continue;
            }
            samples += 1;
            assert_eq!(
                str_at(v, "/metadata/namespace"),
                Some(RELAY_NAMESPACE),
                "deploy/README.md (yaml block at byte {at}): a Role granting pods/portforward must be in {RELAY_NAMESPACE}; in {NAMESPACE} it reaches every node's loopback"
            );
        }
    }
    assert!(
        samples > 0,
        "deploy/README.md must give a sample Role for the relay's users (create pods/portforward in {RELAY_NAMESPACE})"
    );
}

/// `kubectl kustomize DIR` (no cluster needed): the objects kustomize makes of `dir`.
fn kustomize_build(dir: &Path) -> Vec<Value> {
    let kubectl =
        std::env::var_os("KUBECTL").map_or_else(|| PathBuf::from("kubectl"), PathBuf::from);
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} kustomize {}: {e} (install kubectl, or set KUBECTL to it)",
                kubectl.display(),
                rel(dir)
            )
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        rel(dir),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("kubectl kustomize {}: output is not YAML: {e}", rel(dir)))
}

fn object_key(v: &Value) -> (String, String, String) {
    (
        str_at(v, "/kind").unwrap_or_default().to_owned(),
        str_at(v, "/metadata/namespace")
            .unwrap_or_default()
            .to_owned(),
        str_at(v, "/metadata/name").unwrap_or_default().to_owned(),
    )
}

#[test]
fn kustomize_builds_keep_every_objects_namespace() {
    // What `kubectl apply -k` would apply, for every kustomization here: exactly the objects
    // of the files it lists, each in the namespace its file names (a `namespace:` anywhere up
    // the tree would move the relay's objects, or its Role and RoleBinding), and the relay's
    // RoleBinding still naming the ServiceAccount in the relay's namespace.
    let deploy = deploy_dir().canonicalize().expect("deploy/ exists");
    let docs = all_docs();
    for k in yaml_files(&deploy)
        .into_iter()
        .filter(|f| f.file_name().and_then(|n| n.to_str()) == Some("kustomization.yaml"))
    {
        let dir = k.parent().expect("a file's directory").to_path_buf();
        let mut files = BTreeSet::new();
        kustomize_closure(&dir, &mut files);
        let want: BTreeMap<(String, String, String), &Doc> = docs
            .iter()
            .filter(|d| !d.is_kustomize() && files.contains(&d.path.canonicalize().expect("path")))
            .map(|d| (object_key(&d.value), d))
            .collect();
        let built = kustomize_build(&dir);
        let got: BTreeSet<(String, String, String)> = built.iter().map(object_key).collect();
        assert_eq!(
            got,
            want.keys().cloned().collect::<BTreeSet<_>>(),
            "kubectl kustomize {}: (kind, namespace, name) of the objects built differ from those of its files",
            rel(&dir)
        );
        for v in &built {
            if let Some(src) = want.get(&object_key(v)) {
                assert_eq!(
                    v.get("subjects"),
                    src.value.get("subjects"),
                    "kubectl kustomize {}: {}: subjects changed by kustomize",
                    rel(&dir),
                    src.at()
                );
            }
        }
    }
    // The base: the agents in NAMESPACE, the relay in RELAY_NAMESPACE but its Role and binding.
    let base = kustomize_build(&deploy);
    let binding = base
        .iter()
        .find(|v| {
            str_at(v, "/kind") == Some("RoleBinding") && str_at(v, "/metadata/name") == Some(RELAY)
        })
        .unwrap_or_else(|| panic!("kubectl kustomize deploy/: no RoleBinding {RELAY}"));
    assert_eq!(
        (
            str_at(binding, "/metadata/namespace"),
            str_at(binding, "/subjects/0/namespace")
        ),
        (Some(NAMESPACE), Some(RELAY_NAMESPACE)),
        "kubectl kustomize deploy/: the relay's RoleBinding must be in {NAMESPACE} and name its ServiceAccount in {RELAY_NAMESPACE}"
    );
    for (kind, ns) in [
        ("Namespace", ""),
        ("ServiceAccount", RELAY_NAMESPACE),
        ("Deployment", RELAY_NAMESPACE),
        ("Service", RELAY_NAMESPACE),
        ("NetworkPolicy", RELAY_NAMESPACE),
        ("Role", NAMESPACE),
    ] {
        let name = if kind == "Namespace" {
            RELAY_NAMESPACE
        } else {
            RELAY
        };
        assert!(
            base.iter()
                .any(|v| object_key(v) == (kind.to_owned(), ns.to_owned(), name.to_owned())),
            "kubectl kustomize deploy/: no {kind} {name} in namespace `{ns}`"
        );
    }
}

#[test]
fn readme_overlay_without_the_relay_builds_without_it() {
    // deploy/README.md's "Without the relay" overlay, built against this deploy/: the relay's
    // objects (its namespace included) and the agents' data API are gone, the rest is kept.
    let text = read("deploy/README.md");
    let at = text
        .find("**Without the relay.**")
        .expect("deploy/README.md: no **Without the relay.** paragraph");
    let block = &text[at..];
    let start = block
        .find("```yaml\n")
        .expect("Without the relay: no yaml block")
        + 8;
    let end = start + block[start..].find("```").expect("an unclosed yaml block");
    let overlay = block[start..end].replace("<path to deploy/>", "deploy");
    let dir = std::env::temp_dir().join(format!(
        "flowtrace-deploy-test-overlay-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    // kustomize wants a relative path to a directory it may load: a link to deploy/.
    std::os::unix::fs::symlink(deploy_dir(), dir.join("deploy")).expect("symlink");
    std::fs::write(dir.join("kustomization.yaml"), overlay).expect("writing the overlay");
    let built = kustomize_build(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let base = kustomize_build(&deploy_dir());
    let got: BTreeSet<_> = built.iter().map(object_key).collect();
    let want: BTreeSet<_> = base
        .iter()
        .filter(|v| str_at(v, "/metadata/labels/app.kubernetes.io~1component") != Some("relay"))
        .map(object_key)
        .collect();
    assert_eq!(
        got, want,
        "deploy/README.md, Without the relay: the overlay must remove exactly the relay's objects"
    );
    let ds = built
        .iter()
        .find(|v| str_at(v, "/kind") == Some("DaemonSet"))
        .expect("the overlay keeps the DaemonSet");
    let text = serde_json::to_string(ds).expect("JSON");
    for gone in [
        "FLOWTRACE_API_LISTEN",
        "FLOWTRACE_TLS_",
        "9652",
        AGENT_SECRET,
    ] {
        assert!(
            !text.contains(gone),
            "deploy/README.md, Without the relay: the DaemonSet still has `{gone}`"
        );
    }
    let svc = built
        .iter()
        .find(|v| {
            object_key(v)
                == (
                    "Service".to_owned(),
                    NAMESPACE.to_owned(),
                    AGENT_SERVICE.to_owned(),
                )
        })
        .expect("the overlay keeps the agents' Service");
    assert!(
        !serde_json::to_string(svc).expect("JSON").contains("9652"),
        "deploy/README.md, Without the relay: the agents' Service still has the data port 9652"
    );
}

/// The (protocol, port) pairs of a NetworkPolicy rule's ports; every port must be a number
/// (a named port is resolved on the far pod, and the agents' is the host).
fn policy_ports(at: &str, ports: &[NetworkPolicyPort]) -> BTreeSet<(String, i32)> {
    assert!(
        !ports.is_empty(),
        "{at}: a rule without ports allows every port"
    );
    ports
        .iter()
        .map(|p| {
            assert!(p.end_port.is_none(), "{at}: no port ranges");
            let n = match &p.port {
                Some(IntOrString::Int(n)) => *n,
                other => panic!("{at}: port {other:?} must be a number"),
            };
            (p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()), n)
        })
        .collect()
}

#[test]
fn relay_network_policy_ports_match_the_containers() {
    let docs = all_docs();
    let (dat, d) = named::<Deployment>(&docs, "Deployment", RELAY);
    let relay = the_relay(&dat, &d);
    let relay_labels = relay_pod_labels(&d);
    let (aat, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let agent = the_agent(&aat, pod_spec(&aat, &ds));
    let agent_api = named_port(&aat, agent, API_PORT);

    let (at, np) = named::<NetworkPolicy>(&docs, "NetworkPolicy", RELAY);
    let spec = np.spec.as_ref().unwrap_or_else(|| panic!("{at}: no spec"));
    let sel = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    assert!(
        selects(&sel, &relay_labels),
        "{at}: spec.podSelector {sel:?} does not select the relay's pods {relay_labels:?}"
    );
    let pod_types: BTreeSet<&str> = spec
        .policy_types
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(
        pod_types,
        BTreeSet::from(["Ingress", "Egress"]),
        "{at}: policyTypes must be Ingress and Egress (without Egress every egress is allowed)"
    );

    let mut ingress = BTreeSet::new();
    for (i, rule) in spec
        .ingress
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        ingress.extend(policy_ports(
            &format!("{at}: ingress[{i}]"),
            rule.ports.as_deref().unwrap_or_default(),
        ));
    }
    let container: BTreeSet<(String, i32)> = relay
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                p.container_port,
            )
        })
        .collect();
    assert_eq!(
        ingress, container,
        "{at}: ingress must allow exactly the relay's container ports (`{METRICS_PORT}`)"
    );

    let mut egress = BTreeSet::new();
    for (i, rule) in spec
        .egress
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        egress.extend(policy_ports(
            &format!("{at}: egress[{i}]"),
            rule.ports.as_deref().unwrap_or_default(),
        ));
    }
    let want: BTreeSet<(String, i32)> = [
        ("TCP", agent_api),
        ("TCP", 443),
        ("TCP", 6443),
        ("UDP", 53),
        ("TCP", 53),
    ]
    .iter()
    .map(|(p, n)| (p.to_string(), *n))
    .collect();
    assert_eq!(
        egress, want,
        "{at}: egress must allow exactly the agents' `{API_PORT}` ({agent_api}), the API server (443, 6443) and DNS (53 UDP and TCP)"
    );
}

/// cert-manager's Issuer and Certificate have no k8s-openapi type: their shape is checked
/// here, with the fields these manifests may use.
fn check_cert_manager(doc: &Doc) {
    assert_eq!(
        doc.api_version(),
        "cert-manager.io/v1",
        "{}: apiVersion",
        doc.at()
    );
    let spec = doc.value["spec"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: no spec", doc.at()));
    let known: &[&str] = match doc.kind() {
        "Issuer" => &["selfSigned", "ca"],
        _ => &[
            "secretName",
            "secretTemplate",
            "isCA",
            "commonName",
            "dnsNames",
            "ipAddresses",
            "usages",
            "duration",
            "renewBefore",
            "privateKey",
            "issuerRef",
            "subject",
        ],
    };
    for key in spec.keys() {
        assert!(
            known.contains(&key.as_str()),
            "{}: spec field `{key}` is not one this test knows (misspelt?)",
            doc.at()
        );
    }
    if doc.kind() == "Issuer" {
        assert_eq!(
            spec.len(),
            1,
            "{}: an Issuer has exactly one of selfSigned and ca",
            doc.at()
        );
        return;
    }
    let issuer = &doc.value["spec"]["issuerRef"];
    assert!(
        str_at(issuer, "/name").is_some(),
        "{}: spec.issuerRef.name is missing",
        doc.at()
    );
    assert_eq!(
        str_at(issuer, "/kind"),
        Some("Issuer"),
        "{}: spec.issuerRef.kind: a namespaced Issuer of deploy/cert-manager/",
        doc.at()
    );
    for key in ["duration", "renewBefore"] {
        let v = str_at(spec_value(doc), &format!("/{key}"))
            .unwrap_or_else(|| panic!("{}: spec.{key} is missing", doc.at()));
        assert!(
            v.ends_with('h') && v[..v.len() - 1].parse::<u32>().is_ok(),
            "{}: spec.{key} `{v}`: write it in hours (e.g. 2160h)",
            doc.at()
        );
    }
    for (key, allowed) in [
        ("algorithm", &["ECDSA", "RSA", "Ed25519"][..]),
        ("encoding", &["PKCS1", "PKCS8"][..]),
        ("rotationPolicy", &["Never", "Always"][..]),
    ] {
        if let Some(v) = doc.value["spec"]["privateKey"].get(key) {
            assert!(
                v.as_str().is_some_and(|v| allowed.contains(&v)),
                "{}: spec.privateKey.{key} {v} is not one of {allowed:?}",
                doc.at()
            );
        }
    }
}

fn spec_value(doc: &Doc) -> &Value {
    &doc.value["spec"]
}

fn hours(doc: &Doc, key: &str) -> u32 {
    str_at(spec_value(doc), &format!("/{key}"))
        .and_then(|v| v.strip_suffix('h'))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}: spec.{key} in hours", doc.at()))
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn cert_manager_certificates_produce_the_mounted_secrets() {
    let docs = all_docs();
    let certs: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Certificate").collect();
    let issuers: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "Issuer").collect();
    // An Issuer signs only Certificates of its own namespace: issuerRef is looked up there.
    let issuer = |ns: &str, name: &str| -> &Doc {
        issuers
            .iter()
            .find(|d| d.name() == name && namespace_of(d) == ns)
            .copied()
            .unwrap_or_else(|| {
                panic!("deploy/cert-manager/: no Issuer named `{name}` in namespace {ns}")
            })
    };
    let writers = |ns: &str, secret: &str| -> Vec<&Doc> {
        certs
            .iter()
            .filter(|d| {
                namespace_of(d) == ns && str_at(spec_value(d), "/secretName") == Some(secret)
            })
            .copied()
            .collect()
    };
    let by_secret = |ns: &str, secret: &str| -> &Doc {
        let found = writers(ns, secret);
        assert_eq!(
            found.len(),
            1,
            "deploy/cert-manager/: exactly one Certificate must write Secret {ns}/{secret}, found {}",
            found.len()
        );
        found[0]
    };

    // The Secrets the DaemonSet and the relay mount, each from one leaf Certificate with
    // exactly the SAN the other side checks and the usage its side of the handshake needs.
    let (dat, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let agent_volumes = pod_spec(&dat, &ds).volumes.clone().unwrap_or_default();
    let (rat, relay) = named::<Deployment>(&docs, "Deployment", RELAY);
    let relay_volumes = relay_pod(&rat, &relay).volumes.clone().unwrap_or_default();
    let agent_ns = ds.metadata.namespace.clone().unwrap_or_default();
    let relay_ns = relay.metadata.namespace.clone().unwrap_or_default();
    // (namespace, issuer name, CA Secret name) of each leaf's CA issuer.
    let mut ca_issuers = BTreeSet::new();
    for (at, ns, volumes, secret, san, usage) in [
        (
            &dat,
            &agent_ns,
            &agent_volumes,
            AGENT_SECRET,
            AGENT_SAN,
            "server auth",
        ),
        (
            &rat,
            &relay_ns,
            &relay_volumes,
            RELAY_SECRET,
            RELAY_SAN,
            "client auth",
        ),
    ] {
        assert!(
            volumes
                .iter()
                .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret)),
            "{at}: mounts no Secret {secret}"
        );
        // The Certificate is in the namespace of the pod that mounts its Secret: cert-manager
        // writes the Secret in the Certificate's namespace.
        let cert = by_secret(ns, secret);
        let at = cert.at();
        assert_eq!(
            strings(&cert.value["spec"]["dnsNames"]),
            BTreeSet::from([san.to_owned()]),
            "{at}: spec.dnsNames must be exactly [{san}]"
        );
        assert!(
            strings(&cert.value["spec"]["usages"]).contains(usage),
            "{at}: spec.usages must include `{usage}`"
        );
        assert_ne!(
            cert.value["spec"]["isCA"].as_bool(),
            Some(true),
            "{at}: a leaf, not a CA"
        );
        assert!(
            hours(cert, "renewBefore") < hours(cert, "duration"),
            "{at}: renewBefore must be shorter than duration"
        );
        let iname = str_at(&cert.value, "/spec/issuerRef/name").unwrap_or_default();
        let iss = issuer(ns, iname);
        let ca_secret = str_at(&iss.value, "/spec/ca/secretName").unwrap_or_else(|| {
            panic!(
                "{}: signs {secret}, so it must be a CA issuer (`ca` with a secretName), for ca.crt in the Secret",
                iss.at()
            )
        });
        ca_issuers.insert((ns.clone(), iname.to_owned(), ca_secret.to_owned()));
    }
    // Each side checks the other against its ca.crt, so both leaves come from one CA: the
    // agents' namespace holds it (a CA Certificate writes its Secret there), the relay's
    // namespace a copy of that Secret under the same name, which no Certificate writes (one
    // would make a second CA, which the agents do not trust).
    let ca_secrets: BTreeSet<&str> = ca_issuers.iter().map(|(_, _, s)| s.as_str()).collect();
    assert_eq!(
        ca_secrets.len(),
        1,
        "deploy/cert-manager/: the agent's and the relay's CA issuers must read one CA Secret name (the relay's namespace holds a copy of the agents'), found {ca_issuers:?}"
    );
    let ca_secret = *ca_secrets.first().expect("one CA Secret");
    assert!(
        writers(&relay_ns, ca_secret).is_empty(),
        "deploy/cert-manager/: a Certificate writes {relay_ns}/{ca_secret}: that would be a second CA, which the agents do not trust; it must be a copy of {agent_ns}/{ca_secret} (deploy/README.md, Install)"
    );
    let readme = read("deploy/README.md");
    let copy = format!("kubectl -n {agent_ns} get secret {ca_secret}");
    assert!(
        readme.contains(&copy) && readme.contains(&format!("namespace: {relay_ns}")),
        "deploy/README.md must give the command that copies the CA Secret into {relay_ns} (`{copy} ...`)"
    );

    // That CA: a CA Certificate from a self-signed issuer, keeping its key on renewal.
    let ca = by_secret(&agent_ns, ca_secret);
    assert_eq!(
        ca.value["spec"]["isCA"].as_bool(),
        Some(true),
        "{}: spec.isCA must be true",
        ca.at()
    );
    assert_eq!(
        str_at(&ca.value, "/spec/privateKey/rotationPolicy"),
        Some("Never"),
        "{}: the CA must keep its key when renewed, or every leaf signed before stops verifying (deploy/README.md, Rotation)",
        ca.at()
    );
    let root = str_at(&ca.value, "/spec/issuerRef/name").unwrap_or_default();
    assert!(
        issuer(&agent_ns, root).value["spec"]["selfSigned"].is_object(),
        "{}: spec.issuerRef must be the self-signed Issuer",
        ca.at()
    );
    for c in &certs {
        assert!(
            hours(ca, "duration") > hours(c, "duration") || c.name() == ca.name(),
            "{}: outlives the CA {}",
            c.at(),
            ca.at()
        );
    }
}

#[test]
fn flowtrace_certs_writes_the_mounted_secrets() {
    // `flowtrace certs` (no cluster, no root), as deploy/README.md runs it (its defaults:
    // --namespace flowtrace, --relay-namespace flowtrace-relay), must write the Secrets the
    // manifests mount, each in the namespace of the pods that mount it, with the keys they read.
    let docs = all_docs();
    let (dat, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let (rat, relay) = named::<Deployment>(&docs, "Deployment", RELAY);
    let want_ns: BTreeMap<&str, String> = BTreeMap::from([
        (
            AGENT_SECRET,
            ds.metadata.namespace.clone().unwrap_or_default(),
        ),
        (
            RELAY_SECRET,
            relay.metadata.namespace.clone().unwrap_or_default(),
        ),
    ]);
    let readme = read("deploy/README.md");
    assert!(
        readme.contains("flowtrace certs --out DIR\n")
            || readme.contains("flowtrace certs --out DIR "),
        "deploy/README.md must give `flowtrace certs --out DIR` (the defaults this test runs)"
    );
    let bin = flowtrace_tests::flowtrace_bin().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!(
        "flowtrace-deploy-test-certs-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(&bin)
        .args(["certs", "--out"])
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("running {} certs: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} certs --out {} failed: {}",
        bin.display(),
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.crt",
        "ca.key",
        "agent.crt",
        "agent.key",
        "relay.crt",
        "relay.key",
    ] {
        assert!(
            dir.join(f).is_file(),
            "flowtrace certs wrote no {f} in {}",
            dir.display()
        );
    }
    let secrets = read_docs(&dir.join("secrets.yaml"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut names = BTreeSet::new();
    for doc in &secrets {
        assert_eq!(doc.kind(), "Secret", "{}: kind", doc.at());
        let secret: k8s_openapi::api::core::v1::Secret = typed(doc);
        assert_eq!(
            secret.type_.as_deref(),
            Some("kubernetes.io/tls"),
            "{}: type",
            doc.at()
        );
        if let Some(ns) = want_ns.get(doc.name()) {
            assert_eq!(
                secret.metadata.namespace.as_deref(),
                Some(ns.as_str()),
                "{}: namespace: the pods that mount it are there ({dat}, {rat})",
                doc.at()
            );
        }
        let keys: BTreeSet<&str> = secret
            .data
            .iter()
            .flat_map(|d| d.keys())
            .chain(secret.string_data.iter().flat_map(|d| d.keys()))
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(TLS_KEYS),
            "{}: keys (the manifests read {TLS_KEYS:?})",
            doc.at()
        );
        names.insert(doc.name().to_owned());
    }
    assert_eq!(
        names,
        BTreeSet::from([AGENT_SECRET.to_owned(), RELAY_SECRET.to_owned()]),
        "flowtrace certs: secrets.yaml must hold the two Secrets the DaemonSet and the relay mount"
    );
}

/// The `group/resource` pairs of a README list (`resource` alone for the core group).
fn group_resource(s: &str) -> (String, String) {
    match s.rsplit_once('/') {
        Some((g, r)) => (g.to_owned(), r.to_owned()),
        None => (String::new(), s.to_owned()),
    }
}

#[test]
fn rbac_is_read_only_and_limited_to_the_documented_resources() {
    let want_verbs: BTreeSet<String> = RBAC_VERBS.iter().map(|v| v.to_string()).collect();
    let want_resources: BTreeSet<(String, String)> = RBAC_RESOURCES
        .iter()
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    let doc_verbs: BTreeSet<String> = readme_list("RBAC verbs:").into_iter().collect();
    assert_eq!(
        doc_verbs, want_verbs,
        "deploy/README.md's `RBAC verbs:` line lists another set than the one tested here"
    );
    let doc_resources: BTreeSet<(String, String)> = readme_list("RBAC resources:")
        .iter()
        .map(|s| group_resource(s))
        .collect();
    assert_eq!(
        doc_resources, want_resources,
        "deploy/README.md's `RBAC resources:` line lists another set than the one tested here"
    );

    let docs = all_docs();
    let (at, role) = one::<ClusterRole>(&docs, "ClusterRole");
    assert!(
        role.aggregation_rule.is_none(),
        "{at}: an aggregationRule would let other roles add rules"
    );
    let rules = role.rules.as_deref().unwrap_or_default();
    assert!(!rules.is_empty(), "{at}: no rules");
    let mut granted = BTreeSet::new();
    let mut verbs_granted = BTreeSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{at}: rules[{i}]");
        assert!(
            rule.non_resource_urls.is_none(),
            "{at}: nonResourceURLs are not needed"
        );
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        for (field, values) in [
            ("verbs", &rule.verbs[..]),
            ("apiGroups", groups),
            ("resources", resources),
            (
                "resourceNames",
                rule.resource_names.as_deref().unwrap_or_default(),
            ),
        ] {
            assert!(
                !values.iter().any(|v| v.contains('*')),
                "{at}.{field} has a wildcard: {values:?}"
            );
        }
        for v in &rule.verbs {
            assert!(
                want_verbs.contains(v),
                "{at}.verbs: `{v}` is not one of {RBAC_VERBS:?}"
            );
            verbs_granted.insert(v.clone());
        }
        assert!(
            !groups.is_empty() && !resources.is_empty(),
            "{at}: apiGroups and resources must be listed"
        );
        for g in groups {
            for r in resources {
                let pair = (g.clone(), r.clone());
                assert!(
                    want_resources.contains(&pair),
                    "{at}: grants {}/{}, which is not in the documented set (deploy/README.md, RBAC)",
                    if g.is_empty() { "core" } else { g },
                    r
                );
                granted.insert(pair);
            }
        }
    }
    assert_eq!(
        granted, want_resources,
        "{at}: the rules grant another set of resources than the documented one"
    );
    assert_eq!(
        verbs_granted, want_verbs,
        "{at}: the rules grant another set of verbs than the documented one"
    );

    let (bat, binding) = one::<ClusterRoleBinding>(&docs, "ClusterRoleBinding");
    let role_name = role.metadata.name.clone().unwrap_or_default();
    assert_eq!(
        (
            binding.role_ref.api_group.as_deref().unwrap_or_default(),
            binding.role_ref.kind.as_str(),
            binding.role_ref.name.as_str()
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            role_name.as_str()
        ),
        "{bat}: roleRef must name the ClusterRole"
    );
    let (dat, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let sa = pod_spec(&dat, &ds)
        .service_account_name
        .clone()
        .unwrap_or_else(|| panic!("{dat}: spec.template.spec.serviceAccountName is missing (the default account has no RBAC)"));
    let ds_ns = ds.metadata.namespace.clone().unwrap_or_default();
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert!(
        subjects.iter().any(|s| s.kind == "ServiceAccount"
            && s.name == sa
            && s.namespace.as_deref() == Some(ds_ns.as_str())),
        "{bat}: subjects must include ServiceAccount {ds_ns}/{sa}, the DaemonSet's account"
    );
    assert_eq!(
        subjects.len(),
        1,
        "{bat}: only the agents' ServiceAccount is bound"
    );
    let (sat, account) = named::<ServiceAccount>(&docs, "ServiceAccount", &sa);
    assert_eq!(
        (
            account.metadata.name.as_deref(),
            account.metadata.namespace.as_deref()
        ),
        (Some(sa.as_str()), Some(ds_ns.as_str())),
        "{sat}: must be the DaemonSet's serviceAccountName in its namespace"
    );
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn json_labels(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn service_and_monitors_select_the_agents() {
    let docs = all_docs();
    let (dat, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let spec = &ds.spec;
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let ds_selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(
        selects(&ds_selector, &pod_labels),
        "{dat}: spec.selector.matchLabels {ds_selector:?} does not select the template's labels {pod_labels:?}"
    );
    for (k, want) in [
        ("app.kubernetes.io/name", "flowtrace"),
        ("app.kubernetes.io/component", "agent"),
    ] {
        assert_eq!(
            pod_labels.get(k).map(String::as_str),
            Some(want),
            "{dat}: pod template label {k}"
        );
    }
    let agent = the_agent(&dat, pod_spec(&dat, &ds));

    let (sat, svc) = named::<Service>(&docs, "Service", AGENT_SERVICE);
    let sspec = svc
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("{sat}: no spec"));
    assert_eq!(
        sspec.cluster_ip.as_deref(),
        Some("None"),
        "{sat}: spec.clusterIP must be None (headless: one endpoint per agent)"
    );
    let svc_selector = sspec.selector.clone().unwrap_or_default();
    assert!(
        selects(&svc_selector, &pod_labels),
        "{sat}: spec.selector {svc_selector:?} does not select the agents' labels {pod_labels:?}"
    );
    let svc_ports = sspec.ports.as_deref().unwrap_or_default();
    for (name, why) in [
        (METRICS_PORT, "the ServiceMonitor scrapes it"),
        (
            API_PORT,
            "the relay finds the agents' data API by this name",
        ),
    ] {
        let port = svc_ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{sat}: no port named `{name}` ({why})"));
        let target = port
            .target_port
            .clone()
            .unwrap_or(IntOrString::Int(port.port));
        let container_port =
            resolve_port(&format!("{sat}: port {name} targetPort"), agent, &target);
        assert_eq!(
            container_port,
            named_port(&dat, agent, name),
            "{sat}: port `{name}` must target the agents' container port `{name}`"
        );
        assert_eq!(
            port.port, container_port,
            "{sat}: port `{name}` should be the agents' own port (host network)"
        );
    }
    assert_eq!(
        sspec.publish_not_ready_addresses,
        Some(true),
        "{sat}: publishNotReadyAddresses must be true: an unready agent is still scraped and asked by the relay"
    );

    // The relay's pods and Service, and which of the two components each selector picks:
    // the agents' Service must not select the relay (the relay would ask itself for flows).
    let (rat, relay) = named::<Deployment>(&docs, "Deployment", RELAY);
    let relay_pod_labels = relay_pod_labels(&relay);
    assert!(
        !selects(&svc_selector, &relay_pod_labels),
        "{sat}: spec.selector {svc_selector:?} also selects the relay's pods ({rat}): the relay would count itself among the agents"
    );
    let relay_c = the_relay(&rat, &relay);
    let (rsat, rsvc) = named::<Service>(&docs, "Service", RELAY);
    let rspec = rsvc
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("{rsat}: no spec"));
    let rsel = rspec.selector.clone().unwrap_or_default();
    assert!(
        selects(&rsel, &relay_pod_labels) && !selects(&rsel, &pod_labels),
        "{rsat}: spec.selector {rsel:?} must select the relay's pods {relay_pod_labels:?} and not the agents'"
    );
    let rport = rspec
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some(METRICS_PORT))
        .unwrap_or_else(|| panic!("{rsat}: no port named `{METRICS_PORT}`"));
    let target = rport
        .target_port
        .clone()
        .unwrap_or(IntOrString::Int(rport.port));
    assert_eq!(
        resolve_port(
            &format!("{rsat}: port metrics targetPort"),
            relay_c,
            &target
        ),
        named_port(&rat, relay_c, METRICS_PORT),
        "{rsat}: port `{METRICS_PORT}` must target the relay's container port `{METRICS_PORT}`"
    );
    assert_eq!(
        rspec.ports.as_deref().unwrap_or_default().len(),
        1,
        "{rsat}: only `{METRICS_PORT}`: the relay API is reached by port-forward, never through a Service"
    );

    let services = [
        ("agent", svc.metadata.labels.clone().unwrap_or_default()),
        ("relay", rsvc.metadata.labels.clone().unwrap_or_default()),
    ];
    let pods = [("agent", pod_labels.clone()), ("relay", relay_pod_labels)];
    for (kind, targets) in [("ServiceMonitor", &services), ("PodMonitor", &pods)] {
        let mut covered = BTreeSet::new();
        for doc in docs.iter().filter(|d| d.kind() == kind) {
            let sel = json_labels(doc.value.pointer("/spec/selector/matchLabels"));
            let picked: Vec<&str> = targets
                .iter()
                .filter(|(_, labels)| selects(&sel, labels))
                .map(|(what, _)| *what)
                .collect();
            assert_eq!(
                picked.len(),
                1,
                "{}: spec.selector.matchLabels {sel:?} must select exactly one of the agents and the relay, selects {picked:?}",
                doc.at()
            );
            covered.insert(picked[0]);
            // Without a namespaceSelector a monitor looks in its own namespace.
            let target_ns = if picked[0] == "agent" {
                svc.metadata.namespace.clone()
            } else {
                rsvc.metadata.namespace.clone()
            }
            .unwrap_or_default();
            let names: Vec<&str> = doc
                .value
                .pointer("/spec/namespaceSelector/matchNames")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_else(|| vec![namespace_of(doc)]);
            assert!(
                names.contains(&target_ns.as_str()),
                "{}: looks in namespaces {names:?}, but the {} is in {target_ns}",
                doc.at(),
                picked[0]
            );
            if kind == "PodMonitor" {
                // Endpoint ports (`metrics`, checked in check_monitor) are container ports.
                let c = if picked[0] == "agent" { agent } else { relay_c };
                named_port(
                    &format!("{}: podMetricsEndpoints port", doc.at()),
                    c,
                    METRICS_PORT,
                );
            }
        }
        assert_eq!(
            covered,
            BTreeSet::from(["agent", "relay"]),
            "deploy/prometheus-operator: the {kind}s must scrape both the agents and the relay"
        );
    }
}

/// `flowtrace <sub> --help`, whitespace collapsed (clap wraps long lines).
fn help_of(sub: &str) -> String {
    let bin = flowtrace_tests::flowtrace_bin().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(&bin)
        .args([sub, "--help"])
        .output()
        .unwrap_or_else(|e| panic!("running {} {sub} --help: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} {sub} --help failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn daemonset_env_names_are_agent_settings() {
    let help = help_of("agent");
    let docs = all_docs();
    let (at, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let agent = the_agent(&at, pod_spec(&at, &ds));
    let unknown: Vec<&str> = agent
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|e| e.name.as_str())
        .filter(|name| !help.contains(&format!("[env: {name}=")))
        .collect();
    assert!(
        unknown.is_empty(),
        "{at}: env {unknown:?}: not variables `flowtrace agent` reads (see `flowtrace agent --help`)"
    );
}

#[test]
fn relay_env_names_are_relay_settings() {
    let help = help_of("relay");
    let docs = all_docs();
    let (at, d) = named::<Deployment>(&docs, "Deployment", RELAY);
    let relay = the_relay(&at, &d);
    let unknown: Vec<&str> = relay
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|e| e.name.as_str())
        .filter(|name| !help.contains(&format!("[env: {name}=")))
        .collect();
    assert!(
        unknown.is_empty(),
        "{at}: env {unknown:?}: not variables `flowtrace relay` reads (see `flowtrace relay --help`)"
    );
}

/// Runs `flowtrace trace` against a closed loopback port with `FLOWTRACE_CONFIG` set to
/// `config`: the settings file is read, checked and turned into flags before anything else,
/// exactly as `flowtrace agent` does (both take the agent's settings), but nothing is loaded
/// into the kernel, so neither root nor a network is needed. Returns (exit code, stderr).
fn trace_with_config(config: &Path) -> (Option<i32>, String) {
    let bin = flowtrace_tests::flowtrace_bin().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(&bin)
        .args([
            "trace",
            "--agent",
            "http://127.0.0.1:9",
            "--count",
            "1",
            "--duration-s",
            "1",
        ])
        .env("FLOWTRACE_CONFIG", config)
        .output()
        .unwrap_or_else(|e| panic!("running {} trace: {e}", bin.display()));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `flowtrace trace` got past its settings: it fails only because no agent listens
/// (exit 1), not on the file (which it names) nor on a value (clap's exit 2).
fn settings_accepted(code: Option<i32>, stderr: &str, config: &Path) -> bool {
    // The settings were taken (the run got as far as reaching the agent, which is not
    // there); a warning about a missing file is no refusal.
    let _ = config;
    code == Some(1)
        && stderr.contains("cannot reach the flowtrace agent")
        && !stderr.contains("error: the config file")
}

#[test]
fn example_settings_file_passes_the_agents_own_checks() {
    // The example as written...
    let example = repo_root().join(CONFIG_EXAMPLE);
    let (code, err) = trace_with_config(&example);
    assert!(
        settings_accepted(code, &err, &example),
        "{CONFIG_EXAMPLE}: the agent refuses it (exit {code:?}): {err}"
    );

    // ...and with every commented-out setting (`# key = value`) in force too.
    let text = read(CONFIG_EXAMPLE);
    let mut table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{CONFIG_EXAMPLE}: not valid TOML: {e}"));
    let mut commented = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let rest = rest.trim_start();
        let Some((key, _)) = rest.split_once(" = ") else {
            continue;
        };
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            continue;
        }
        let one: toml::Table = rest.parse().unwrap_or_else(|e| {
            panic!("{CONFIG_EXAMPLE}: commented-out setting `{rest}` is not valid TOML: {e}")
        });
        commented.push(key.to_owned());
        table.extend(one);
    }
    assert!(
        !commented.is_empty(),
        "{CONFIG_EXAMPLE}: expected commented-out examples (`# key = value`)"
    );
    let all =
        std::env::temp_dir().join(format!("flowtrace-deploy-test-{}.toml", std::process::id()));
    std::fs::write(
        &all,
        toml::to_string(&table).expect("a TOML table serialises"),
    )
    .expect("writing a temporary file");
    let (code, err) = trace_with_config(&all);
    let _ = std::fs::remove_file(&all);
    assert!(
        settings_accepted(code, &err, &all),
        "{CONFIG_EXAMPLE}: with its commented-out settings {commented:?} in force, the agent refuses it (exit {code:?}): {err}"
    );
}

#[test]
fn daemonset_starts_without_its_optional_settings_file() {
    // The DaemonSet always sets FLOWTRACE_CONFIG, but the ConfigMap behind it is optional:
    // on a fresh install the file does not exist, and the agent must run on its defaults
    // rather than crash-loop.
    let docs = all_docs();
    let (at, ds) = one::<DaemonSet>(&docs, "DaemonSet");
    let agent = the_agent(&at, pod_spec(&at, &ds));
    let Some(config) = env_value(agent, "FLOWTRACE_CONFIG").and_then(|e| e.value.as_deref()) else {
        return; // no settings file named: nothing can be missing
    };
    let missing = std::env::temp_dir()
        .join(format!(
            "flowtrace-deploy-test-{}-absent",
            std::process::id()
        ))
        .join(Path::new(config).file_name().expect("a file name"));
    assert!(!missing.exists());
    let (code, err) = trace_with_config(&missing);
    assert!(
        settings_accepted(code, &err, &missing),
        "{at}: env FLOWTRACE_CONFIG={config} names the file of an optional ConfigMap volume, but the agent refuses to start when that file does not exist (exit {code:?}): {err}"
    );
}

/// Whether `name`, as a query writes it, is a series the agent exports: a family of
/// `flowtrace::metrics::FAMILIES`, a histogram's `_bucket`/`_sum`/`_count`, or a counter's
/// `_total` when the family is named without it.
fn exported(name: &str) -> bool {
    FAMILIES.iter().any(|&(family, kind, _)| {
        name == family
            || (kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(family)))
            || (kind == "counter"
                && !family.ends_with("_total")
                && name.strip_suffix("_total") == Some(family))
    })
}

/// Every `flowtrace_[a-z0-9_]+` identifier in `expr`.
fn metric_names(expr: &str) -> Vec<String> {
    const PREFIX: &str = "flowtrace_";
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find(PREFIX) {
        let start = i + off;
        let mut end = start + PREFIX.len();
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        let part_of_longer = start > 0
            && (b[start - 1].is_ascii_alphanumeric() || matches!(b[start - 1], b'_' | b':'));
        if !part_of_longer {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// Every string under a key in `keys`, anywhere in `v`, with its location (panel titles
/// included for messages).
fn strings_under(v: &Value, keys: &[&str], path: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            let here = match o.get("title").and_then(Value::as_str) {
                Some(t) if !path.is_empty() => format!("{path} \"{t}\""),
                _ => path.to_owned(),
            };
            for (k, child) in o {
                let p = format!("{here}.{k}");
                match child {
                    Value::String(s) if keys.contains(&k.as_str()) => out.push((p, s.clone())),
                    _ => strings_under(child, keys, &p, out),
                }
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                strings_under(child, keys, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD}: not valid JSON: {e}"))
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    assert!(
        !FAMILIES.is_empty(),
        "flowtrace::metrics::FAMILIES is empty"
    );
    for (name, kind, help) in FAMILIES {
        assert!(
            matches!(*kind, "counter" | "gauge" | "histogram"),
            "flowtrace::metrics::FAMILIES: {name} has type `{kind}`; this test knows counter, gauge and histogram"
        );
        assert!(
            !help.is_empty(),
            "flowtrace::metrics::FAMILIES: {name} has no help text"
        );
    }
    let dash = dashboard();
    let mut queries = Vec::new();
    strings_under(&dash, &["expr", "query", "definition"], "", &mut queries);
    let mut used = 0;
    for (at, expr) in &queries {
        for name in metric_names(expr) {
            used += 1;
            assert!(
                exported(&name),
                "{DASHBOARD}: {at} uses `{name}`, which the agent does not export (flowtrace::metrics::FAMILIES): {expr}"
            );
        }
    }
    assert!(used > 0, "{DASHBOARD}: no query uses a flowtrace_ metric");
}

/// The application map panel: a node graph whose two instant table queries give Grafana's
/// edges frame (id, source, target) and nodes frame (id), their values as `mainstat`.
/// (tests/tests/cluster/metrics.rs runs both against a real Prometheus.)
#[test]
fn grafana_dashboard_has_a_node_graph_of_workloads_and_services() {
    let dash = dashboard();
    let mut all = Vec::new();
    panels(&dash, "", &mut all);
    let (at, map) = all
        .iter()
        .find(|(_, p)| p["type"] == "nodeGraph")
        .unwrap_or_else(|| panic!("{DASHBOARD}: no nodeGraph panel"));
    let targets = map["targets"].as_array().cloned().unwrap_or_default();
    let target = |id: &str| {
        targets
            .iter()
            .find(|t| t["refId"] == id)
            .unwrap_or_else(|| panic!("{DASHBOARD}: {at} has no `{id}` query"))
    };
    for id in ["edges", "nodes"] {
        let t = target(id);
        assert_eq!(
            (t["format"].as_str(), t["instant"].as_bool()),
            (Some("table"), Some(true)),
            "{DASHBOARD}: {at}: query `{id}` must be an instant table"
        );
    }
    let edges = target("edges")["expr"].as_str().unwrap_or_default();
    for field in [r#""source""#, r#""target""#, r#""id""#] {
        assert!(
            edges.contains(field),
            "{DASHBOARD}: {at}: the edges query must make a {field} label: {edges}"
        );
    }
    let nodes = target("nodes")["expr"].as_str().unwrap_or_default();
    assert!(
        nodes.contains(r#""id""#) && !nodes.contains(r#""source""#),
        "{DASHBOARD}: {at}: the nodes query makes `id` only: {nodes}"
    );
    let renames = &map["transformations"][0]["options"]["renameByName"];
    for v in ["Value #edges", "Value #nodes"] {
        assert_eq!(
            renames[v].as_str(),
            Some("mainstat"),
            "{DASHBOARD}: {at}: {v}"
        );
    }
}

/// Whether a `datasource` field designates the `${datasource}` variable.
fn is_datasource_var(v: &Value) -> bool {
    let uid = match v {
        Value::String(s) => Some(s.as_str()),
        Value::Object(o) => {
            if o.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t != "prometheus")
            {
                return false;
            }
            o.get("uid").and_then(Value::as_str)
        }
        _ => None,
    };
    matches!(uid, Some("${datasource}" | "$datasource"))
}

/// Every panel, rows' nested panels included, with its location.
fn panels(v: &Value, path: &str, out: &mut Vec<(String, Value)>) {
    for (i, p) in v["panels"].as_array().into_iter().flatten().enumerate() {
        let at = format!(
            "{path}panels[{i}] \"{}\"",
            p["title"].as_str().unwrap_or_default()
        );
        out.push((at.clone(), p.clone()));
        panels(p, &format!("{at}."), out);
    }
}

/// `$name`, `${name}` and `${name:format}` variable references in `s`.
fn variables(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let (braced, body) = match rest.strip_prefix('{') {
            Some(b) => (true, b),
            None => (false, rest),
        };
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && (!braced || body[name.len()..].starts_with(['}', ':'])) {
            out.push(name);
        }
    }
    out
}

#[test]
fn grafana_dashboard_panels_use_the_datasource_variable() {
    let dash = dashboard();
    assert_eq!(
        dash["schemaVersion"].as_u64(),
        Some(39),
        "{DASHBOARD}: schemaVersion"
    );
    let vars = dash["templating"]["list"]
        .as_array()
        .unwrap_or_else(|| panic!("{DASHBOARD}: templating.list is missing"));
    let ds_var = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .unwrap_or_else(|| panic!("{DASHBOARD}: no `datasource` template variable"));
    assert_eq!(
        (ds_var["type"].as_str(), ds_var["query"].as_str()),
        (Some("datasource"), Some("prometheus")),
        "{DASHBOARD}: variable `datasource` must be of type datasource, for Prometheus"
    );
    let mut defined: BTreeSet<String> = vars
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    for (i, v) in vars.iter().enumerate() {
        if v["type"] == "query" {
            assert!(
                is_datasource_var(&v["datasource"]),
                "{DASHBOARD}: templating.list[{i}] `{}` must query ${{datasource}}",
                v["name"].as_str().unwrap_or_default()
            );
        }
    }
    // Grafana's own variables.
    defined.extend(
        [
            "__rate_interval",
            "__interval",
            "__range",
            "__all",
            "__interval_ms",
        ]
        .iter()
        .map(|s| s.to_string()),
    );

    let mut all = Vec::new();
    panels(&dash, "", &mut all);
    assert!(!all.is_empty(), "{DASHBOARD}: no panels");
    let mut ids = BTreeSet::new();
    for (at, p) in &all {
        let at = format!("{DASHBOARD}: {at}");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{at}: no numeric id"));
        assert!(ids.insert(id), "{at}: id {id} is used by another panel");
        assert!(p["gridPos"].is_object(), "{at}: no gridPos");
        if p["type"] == "row" {
            continue;
        }
        assert!(
            is_datasource_var(&p["datasource"]),
            "{at}: datasource must be the ${{datasource}} variable, found {}",
            p["datasource"]
        );
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("{at}: no targets"));
        let mut refs = BTreeSet::new();
        for (i, t) in targets.iter().enumerate() {
            let ref_id = t["refId"]
                .as_str()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| panic!("{at}: targets[{i}] has no refId"));
            assert!(
                refs.insert(ref_id),
                "{at}: targets[{i}] repeats refId {ref_id}"
            );
            if let Some(ds) = t.get("datasource") {
                assert!(
                    is_datasource_var(ds),
                    "{at}: targets[{i}].datasource must be the ${{datasource}} variable, found {ds}"
                );
            }
            let expr = t["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| panic!("{at}: targets[{i}] has no expr"));
            for var in variables(expr) {
                assert!(
                    defined.contains(&var),
                    "{at}: targets[{i}] uses ${var}, which is not a template variable: {expr}"
                );
            }
        }
        if let Some(rep) = p["repeat"].as_str() {
            assert!(
                defined.contains(rep),
                "{at}: repeats over undefined variable `{rep}`"
            );
        }
    }
}

/// `promtool ARGS...` from the repository root: (passed, what it printed).
fn promtool(args: &[&str]) -> (bool, String) {
    let bin = std::env::var_os("PROMTOOL").map_or_else(|| PathBuf::from("promtool"), PathBuf::from);
    let out = Command::new(&bin)
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} {}: {e} (Debian package `prometheus`; scripts/setup.sh installs it, or set PROMTOOL)",
                bin.display(),
                args.join(" ")
            )
        });
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn yaml_value(rel_path: &str) -> Value {
    serde_saphyr::from_str(&read(rel_path))
        .unwrap_or_else(|e| panic!("{rel_path}: not valid YAML: {e}"))
}

/// Every alerting rule of a rules document (`groups[].rules[]` with an `alert`), with where it is.
fn alert_rules(groups: &Value, file: &str) -> Vec<(String, Value)> {
    let groups = groups
        .as_array()
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| panic!("{file}: `groups` must be a non-empty list"));
    let mut out = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let rules = g["rules"]
            .as_array()
            .unwrap_or_else(|| panic!("{file}: groups[{i}] has no `rules` list"));
        for (j, r) in rules.iter().enumerate() {
            if r.get("alert").is_some() {
                out.push((format!("{file}: groups[{i}].rules[{j}]"), r.clone()));
            }
        }
    }
    out
}

/// The names of the alerts of RULES, in file order.
fn alert_names() -> Vec<String> {
    alert_rules(&yaml_value(RULES)["groups"], RULES)
        .iter()
        .map(|(at, r)| {
            r["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("{at}: `alert` is not a string"))
                .to_owned()
        })
        .collect()
}

/// (family, type) of every family the relay serves, read from its own registry with one
/// series in each labelled family (an empty family serves nothing).
fn relay_families() -> Vec<(String, String)> {
    let m = flowtrace::relay::metrics::RelayMetrics::new().expect("the relay's registry");
    m.agents.with_label_values(&["static"]).set(0.0);
    m.agent_requests.with_label_values(&["status", "ok"]).inc();
    m.agent_seconds.with_label_values(&["status"]).observe(0.0);
    m.requests.with_label_values(&["/v1/flows", "200"]).inc();
    m.request_seconds
        .with_label_values(&["/v1/flows"])
        .observe(0.0);
    let text = m.text().expect("the relay's /metrics text");
    let families: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_owned(), k.to_owned()))
        .collect();
    assert!(
        families.iter().any(|(n, _)| n == "flowtrace_relay_agents"),
        "the relay's /metrics has no flowtrace_relay_agents: {text}"
    );
    families
}

#[test]
fn alert_rules_pass_promtool_check() {
    let (ok, said) = promtool(&["check", "rules", RULES]);
    assert!(ok, "promtool check rules {RULES} failed:\n{said}");
}

#[test]
fn alert_rules_unit_tests_fire_and_stay_quiet_for_every_alert() {
    // Every alert has a case where it fires and one where it does not, in the unit tests...
    let tests = yaml_value(RULES_TEST);
    let rule_files: Vec<&str> = tests["rule_files"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let rules_name = Path::new(RULES).file_name().and_then(|n| n.to_str());
    assert_eq!(
        rule_files,
        rules_name.into_iter().collect::<Vec<_>>(),
        "{RULES_TEST}: rule_files must be exactly the shipped rules file"
    );
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for (i, case) in tests["tests"]
        .as_array()
        .unwrap_or_else(|| panic!("{RULES_TEST}: no `tests` list"))
        .iter()
        .enumerate()
    {
        for (j, a) in case["alert_rule_test"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let name = a["alertname"]
                .as_str()
                .unwrap_or_else(|| {
                    panic!("{RULES_TEST}: tests[{i}].alert_rule_test[{j}] has no alertname")
                })
                .to_owned();
            match a["exp_alerts"].as_array() {
                Some(e) if !e.is_empty() => firing.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    let names: BTreeSet<String> = alert_names().into_iter().collect();
    for (what, set) in [("fires", &firing), ("stays quiet", &quiet)] {
        let missing: Vec<&String> = names.difference(set).collect();
        assert!(
            missing.is_empty(),
            "{RULES_TEST}: no case where {missing:?} {what}"
        );
        let unknown: Vec<&String> = set.difference(&names).collect();
        assert!(
            unknown.is_empty(),
            "{RULES_TEST}: tests alerts {unknown:?}, which {RULES} does not have"
        );
    }
    // ... and promtool says each case holds.
    let (ok, said) = promtool(&["test", "rules", RULES_TEST]);
    assert!(ok, "promtool test rules {RULES_TEST} failed:\n{said}");
}

#[test]
fn alert_rules_use_exported_metrics_and_carry_severity_and_runbook() {
    let relay = relay_families();
    let relay_exports = |name: &str| {
        relay.iter().any(|(family, kind)| {
            name == family
                || (kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(family.as_str())))
        })
    };
    let doc = yaml_value(RULES);
    assert_eq!(
        doc.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["groups".to_owned()]),
        "{RULES}: a rules file has `groups` only"
    );
    let rules = alert_rules(&doc["groups"], RULES);
    assert!(!rules.is_empty(), "{RULES}: no alerting rule");
    let mut seen = BTreeSet::new();
    for (at, r) in &rules {
        let name = r["alert"].as_str().unwrap_or_default();
        let at = format!("{at} ({name})");
        assert!(
            name.starts_with("Flowtrace") && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "{at}: alert names are FlowtraceCamelCase (the runbook anchor is the name in lower case)"
        );
        assert!(
            seen.insert(name.to_owned()),
            "{at}: a second alert named {name}"
        );
        let expr = r["expr"]
            .as_str()
            .unwrap_or_else(|| panic!("{at}: no expr"));
        let names = metric_names(expr);
        assert!(
            !names.is_empty() || expr.contains("up{"),
            "{at}: uses neither a flowtrace metric nor `up`: {expr}"
        );
        for m in names {
            assert!(
                exported(&m) || relay_exports(&m),
                "{at}: uses `{m}`, which neither the agent (flowtrace::metrics::FAMILIES) nor the relay (flowtrace::relay::metrics) exports: {expr}"
            );
        }
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{at}: labels.severity must be critical, warning or info"
        );
        let ann = &r["annotations"];
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                ann[key].as_str().is_some_and(|s| !s.trim().is_empty()),
                "{at}: no annotations.{key}"
            );
        }
        // Which agent or relay: every alert but the one on a missing job (absent() has no
        // labels to name) names its instance or node.
        if !expr.trim_start().starts_with("absent(") {
            let d = ann["description"].as_str().unwrap_or_default();
            assert!(
                d.contains("{{ $labels.instance }}") || d.contains("{{ $labels.node }}"),
                "{at}: the description must name {{{{ $labels.instance }}}} or {{{{ $labels.node }}}}"
            );
        }
        assert_eq!(
            ann["runbook_url"].as_str(),
            Some(format!("deploy/README.md#{}", name.to_lowercase()).as_str()),
            "{at}: runbook_url must point at the alert's paragraph (### {name}) in deploy/README.md, Alerts"
        );
    }
}

/// PROMETHEUS_RULE as it must be: its own text up to its `spec:` line (comments, metadata),
/// then RULES from its `groups:` line on, indented under `spec:`.
fn rendered_prometheus_rule() -> String {
    let current = read(PROMETHEUS_RULE);
    let head_end = current
        .find("\nspec:\n")
        .map(|i| i + "\nspec:\n".len())
        .unwrap_or_else(|| panic!("{PROMETHEUS_RULE}: no `spec:` line to put the groups under"));
    let rules = read(RULES);
    let body_start = rules
        .find("\ngroups:\n")
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{RULES}: no top-level `groups:` line"));
    let mut out = current[..head_end].to_owned();
    for line in rules[body_start..].lines() {
        if !line.is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn prometheusrule_is_generated_from_the_rules_file() {
    // One source of truth: RULES. FLOWTRACE_WRITE_RULES=1 writes PROMETHEUS_RULE from it.
    let want = rendered_prometheus_rule();
    if std::env::var_os("FLOWTRACE_WRITE_RULES").is_some() {
        let path = repo_root().join(PROMETHEUS_RULE);
        std::fs::write(&path, &want)
            .unwrap_or_else(|e| panic!("{PROMETHEUS_RULE}: cannot write: {e}"));
    }
    assert!(
        read(PROMETHEUS_RULE) == want,
        "{PROMETHEUS_RULE}: its spec is not {RULES}'s groups: edit {RULES} only, then run `FLOWTRACE_WRITE_RULES=1 cargo test --release --test deploy prometheusrule_is_generated`"
    );
    // The same content read as YAML: the operator's groups are the rules file's.
    let docs = read_docs(&repo_root().join(PROMETHEUS_RULE));
    assert_eq!(docs.len(), 1, "{PROMETHEUS_RULE}: one document");
    let groups = &yaml_value(RULES)["groups"];
    assert_eq!(
        &docs[0].value["spec"]["groups"], groups,
        "{PROMETHEUS_RULE}: spec.groups differ from {RULES}'s groups"
    );
    assert_eq!(
        alert_rules(&docs[0].value["spec"]["groups"], PROMETHEUS_RULE).len(),
        alert_names().len()
    );
}

#[test]
fn prometheusrule_renders_in_both_operator_kustomizations() {
    // Whichever way of scraping is applied (ServiceMonitors or PodMonitors), the alerts come
    // with it, as kustomize renders them, in the agents' namespace.
    let groups = yaml_value(RULES)["groups"].clone();
    for dir in ["prometheus-operator", "prometheus-operator/podmonitor"] {
        let built = kustomize_build(&deploy_dir().join(dir));
        let rules: Vec<&Value> = built
            .iter()
            .filter(|v| str_at(v, "/kind") == Some("PrometheusRule"))
            .collect();
        assert_eq!(
            rules.len(),
            1,
            "kubectl kustomize deploy/{dir}: one PrometheusRule, found {}",
            rules.len()
        );
        assert_eq!(
            (
                str_at(rules[0], "/metadata/namespace"),
                str_at(rules[0], "/metadata/name")
            ),
            (Some(NAMESPACE), Some("flowtrace")),
            "kubectl kustomize deploy/{dir}: the PrometheusRule's namespace and name"
        );
        assert_eq!(
            rules[0]["spec"]["groups"], groups,
            "kubectl kustomize deploy/{dir}: the PrometheusRule's groups differ from {RULES}'s"
        );
    }
}

#[test]
fn every_alert_has_a_runbook_in_the_readme() {
    // deploy/README.md's `## Alerts`: one `### <alert>` paragraph per alert (the runbook_url
    // anchors, checked above, are these headings in lower case), none for an alert not shipped.
    let text = read("deploy/README.md");
    let start = text
        .find("\n## Alerts\n")
        .unwrap_or_else(|| panic!("deploy/README.md: no `## Alerts` section"));
    let section = &text[start + 1..];
    let section = section[3..]
        .find("\n## ")
        .map_or(section, |end| &section[..end + 3]);
    let mut headings = Vec::new();
    for line in section.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            headings.push(h.trim().to_owned());
        }
    }
    let names = alert_names();
    for name in &names {
        let at = headings.iter().position(|h| h == name);
        let at = at.unwrap_or_else(|| {
            panic!("deploy/README.md, Alerts: no `### {name}` runbook paragraph")
        });
        let body_start = section
            .find(&format!("\n### {name}\n"))
            .map(|i| i + name.len() + 6)
            .unwrap_or_default();
        let body = &section[body_start..];
        let body = body.find("\n### ").map_or(body, |end| &body[..end]);
        assert!(
            body.split_whitespace().count() >= 30,
            "deploy/README.md, Alerts: `### {name}` (heading {}) must say what it means, what to check and what to change",
            at + 1
        );
    }
    let extra: Vec<&String> = headings.iter().filter(|h| !names.contains(h)).collect();
    assert!(
        extra.is_empty(),
        "deploy/README.md, Alerts: runbooks {extra:?} are for no alert of {RULES}"
    );
}

/// Every container (and init container) of an object with a pod template: (where, image).
fn container_images(v: &Value) -> Vec<(String, String)> {
    let spec = match str_at(v, "/kind") {
        Some("Pod") => v.pointer("/spec"),
        Some("CronJob") => v.pointer("/spec/jobTemplate/spec/template/spec"),
        _ => v.pointer("/spec/template/spec"),
    };
    let mut out = Vec::new();
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for c in spec
            .and_then(|s| s.get(list))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push((
                format!(
                    "{} {}/{} {list} `{}`",
                    str_at(v, "/kind").unwrap_or_default(),
                    str_at(v, "/metadata/namespace").unwrap_or_default(),
                    str_at(v, "/metadata/name").unwrap_or_default(),
                    str_at(c, "/name").unwrap_or_default()
                ),
                str_at(c, "/image").unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

/// The workspace version flowtrace is built with (flowtrace/Cargo.toml inherits it).
fn flowtrace_version() -> String {
    let crate_toml: toml::Table = read("flowtrace/Cargo.toml")
        .parse()
        .expect("flowtrace/Cargo.toml");
    match &crate_toml["package"]["version"] {
        toml::Value::String(v) => v.clone(),
        _ => {
            let root: toml::Table = read("Cargo.toml").parse().expect("Cargo.toml");
            root["workspace"]["package"]["version"]
                .as_str()
                .expect("Cargo.toml: workspace.package.version")
                .to_owned()
        }
    }
}

/// `kubectl kustomize` of a throw-away overlay of deploy/ (reached through a symlink, as
/// kustomize wants a relative path).
fn build_overlay(tag: &str, kustomization: &str) -> Vec<Value> {
    let dir = std::env::temp_dir().join(format!(
        "flowtrace-deploy-test-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    std::os::unix::fs::symlink(deploy_dir(), dir.join("deploy")).expect("symlink");
    std::fs::write(dir.join("kustomization.yaml"), kustomization).expect("writing the overlay");
    let built = kustomize_build(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    built
}

#[test]
fn the_image_is_set_once_in_the_kustomization_for_every_container() {
    // One `images:` entry, in deploy/kustomization.yaml only, naming what the manifests name.
    let docs = all_docs();
    let with_images: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.is_kustomize() && d.value.get("images").is_some())
        .collect();
    assert_eq!(
        with_images.iter().map(|d| rel(&d.path)).collect::<Vec<_>>(),
        ["deploy/kustomization.yaml"],
        "the image must be set in exactly one place: deploy/kustomization.yaml's `images:`"
    );
    let images = with_images[0].value["images"]
        .as_array()
        .expect("deploy/kustomization.yaml: images must be a list");
    assert_eq!(
        images.len(),
        1,
        "deploy/kustomization.yaml: one image entry, found {images:?}"
    );
    let entry = &images[0];
    let name = str_at(entry, "/name").expect("images[0].name");
    let (new_name, new_tag) = (
        str_at(entry, "/newName").expect("images[0].newName"),
        str_at(entry, "/newTag").expect("images[0].newTag (a string: quote a numeric tag)"),
    );
    let version = flowtrace_version();
    let want = format!("{}:{version}", flowtrace_tests::image::REPOSITORY);
    assert_eq!(
        format!("{new_name}:{new_tag}"),
        want,
        "deploy/kustomization.yaml: the image must be what `cargo xtask image` tags (version of flowtrace/Cargo.toml)"
    );
    // The sources name the image by the entry's name alone, so nothing there pins a registry.
    let mut sources = 0;
    for d in docs.iter().filter(|d| !d.is_kustomize()) {
        for (at, image) in container_images(&d.value) {
            sources += 1;
            assert_eq!(
                image,
                name,
                "{}: {at}: name the image `{name}` and let deploy/kustomization.yaml set it",
                rel(&d.path)
            );
        }
    }
    assert!(
        sources >= 2,
        "the agent's and the relay's containers expected"
    );

    // What `kubectl apply -k deploy/` applies: every container runs the kustomization's image.
    let base = kustomize_build(&deploy_dir());
    let rendered: Vec<(String, String)> = base.iter().flat_map(container_images).collect();
    assert_eq!(
        rendered.len(),
        sources,
        "kubectl kustomize deploy/: {rendered:?}"
    );
    for (at, image) in &rendered {
        assert_eq!(image, &want, "kubectl kustomize deploy/: {at}");
    }

    // An overlay retargets all of them with one entry on the name set here (what
    // `kustomize edit set image localhost/flowtrace=...` writes in an overlay).
    let overlay = build_overlay(
        "image",
        &format!(
            "resources:\n  - deploy\nimages:\n  - name: {new_name}\n    newName: registry.example/flowtrace\n    newTag: \"9.9.9\"\n"
        ),
    );
    let rendered: Vec<(String, String)> = overlay.iter().flat_map(container_images).collect();
    assert_eq!(rendered.len(), sources, "the overlay: {rendered:?}");
    for (at, image) in &rendered {
        assert_eq!(
            image, "registry.example/flowtrace:9.9.9",
            "the overlay: {at}"
        );
    }
}

#[test]
fn the_rendered_install_reads_back_as_its_kubernetes_types() {
    // In place of `kubectl apply -k deploy/ --dry-run=client`, which needs an API server even
    // in client mode (it downloads the OpenAPI schema, and with --validate=false still asks
    // for API discovery: "unable to recognize ...: connection refused" here): what kustomize
    // renders, every object read into its k8s-openapi type and written back unchanged.
    let base = kustomize_build(&deploy_dir());
    assert!(
        !base.is_empty(),
        "kubectl kustomize deploy/ rendered nothing"
    );
    let path = deploy_dir().join("kustomization.yaml");
    for (i, value) in base.into_iter().enumerate() {
        let doc = Doc {
            path: path.clone(),
            index: i + 1,
            value,
        };
        match doc.kind() {
            "Namespace" => drop(typed::<Namespace>(&doc)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(&doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(&doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc)),
            "Role" => drop(typed::<Role>(&doc)),
            "RoleBinding" => drop(typed::<RoleBinding>(&doc)),
            "DaemonSet" => drop(typed::<DaemonSet>(&doc)),
            "Deployment" => drop(typed::<Deployment>(&doc)),
            "Service" => drop(typed::<Service>(&doc)),
            "NetworkPolicy" => drop(typed::<NetworkPolicy>(&doc)),
            "ConfigMap" => drop(typed::<ConfigMap>(&doc)),
            other => panic!(
                "kubectl kustomize deploy/: {}: add the type of {other}",
                doc.at()
            ),
        }
    }
}

/// The instructions of the Dockerfile's last stage: (instruction, arguments), continuation
/// lines joined, comments dropped.
fn dockerfile_final_stage() -> Vec<(String, String)> {
    let text = read("deploy/Dockerfile");
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(cont) = t.strip_suffix('\\') {
            current.push_str(cont);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        lines.push(std::mem::take(&mut current));
    }
    let start = lines
        .iter()
        .rposition(|l| l.to_uppercase().starts_with("FROM "))
        .expect("deploy/Dockerfile: no FROM");
    let stage = lines[start..]
        .iter()
        .map(|l| {
            let (i, rest) = l.split_once(' ').unwrap_or((l, ""));
            (i.to_uppercase(), rest.trim().to_owned())
        })
        .collect();
    stage
}

#[test]
fn the_dockerfile_builds_the_same_image_as_cargo_xtask_image() {
    use flowtrace_tests::image;
    let stage = dockerfile_final_stage();
    let get = |instr: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(i, _)| i == instr)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    assert_eq!(
        get("FROM"),
        ["scratch"],
        "deploy/Dockerfile: the image is FROM scratch, like `cargo xtask image`'s"
    );
    let json = |s: &str| -> Vec<String> {
        serde_json::from_str(s)
            .unwrap_or_else(|e| panic!("deploy/Dockerfile: `{s}` is not the JSON (exec) form: {e}"))
    };
    assert_eq!(
        get("ENTRYPOINT")
            .iter()
            .map(|s| json(s))
            .collect::<Vec<_>>(),
        [image::ENTRYPOINT.map(String::from).to_vec()],
        "deploy/Dockerfile: ENTRYPOINT (tests/src/image.rs)"
    );
    assert_eq!(
        get("CMD").iter().map(|s| json(s)).collect::<Vec<_>>(),
        [image::CMD.map(String::from).to_vec()],
        "deploy/Dockerfile: CMD (tests/src/image.rs)"
    );
    assert_eq!(
        get("USER"),
        [image::USER],
        "deploy/Dockerfile: USER (tests/src/image.rs)"
    );
    let exposed: Vec<u16> = get("EXPOSE")
        .iter()
        .flat_map(|a| a.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE port"))
        .collect();
    assert_eq!(
        exposed,
        image::PORTS,
        "deploy/Dockerfile: EXPOSE (tests/src/image.rs)"
    );
    // The layout: one COPY of the builder's root, where the binary sits at the same path, and
    // the libraries at ldd's paths (as tests/src/image.rs stages them).
    assert_eq!(
        get("COPY"),
        ["--from=builder /out/rootfs/ /"],
        "deploy/Dockerfile: the final stage copies the staged root only"
    );
    let text = read("deploy/Dockerfile");
    assert!(
        text.contains(&format!("/out/rootfs{}", image::BINARY_PATH)),
        "deploy/Dockerfile: the binary must be staged at /out/rootfs{}",
        image::BINARY_PATH
    );
    assert!(
        text.contains("ldd /out/rootfs"),
        "deploy/Dockerfile: the libraries come from ldd, as in tests/src/image.rs"
    );
    assert!(
        text.contains("cargo xtask image"),
        "deploy/Dockerfile: say that `cargo xtask image` builds offline"
    );
}

#[test]
fn the_shipped_seccomp_profile_adds_only_bpf_in_the_oci_format() {
    // deploy/seccomp/flowtrace.json: podman's default profile as it applies to the agent's
    // capabilities, plus bpf(2) (tests/tests/cluster/runtime.rs compares it with podman's own
    // and runs the agent under it). The OCI runtime-spec format, which containerd, CRI-O and
    // podman all read: no `includes`/`excludes` (containerd reads the file as the OCI type
    // and would drop those conditions, allowing every conditional rule outright).
    let text = read("deploy/seccomp/flowtrace.json");
    let p: Value = serde_json::from_str(&text).expect("deploy/seccomp/flowtrace.json: JSON");
    let top: BTreeSet<&str> = p
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        top.is_subset(
            &[
                "defaultAction",
                "defaultErrnoRet",
                "architectures",
                "syscalls"
            ]
            .into()
        ),
        "deploy/seccomp/flowtrace.json: fields outside the OCI profile: {top:?}"
    );
    assert_eq!(
        str_at(&p, "/defaultAction"),
        Some("SCMP_ACT_ERRNO"),
        "deny by default"
    );
    let mut allowed = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for rule in p["syscalls"].as_array().expect("syscalls") {
        let keys: BTreeSet<&str> = rule
            .as_object()
            .expect("a rule")
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            keys.is_subset(&["names", "action", "errnoRet", "args"].into()),
            "deploy/seccomp/flowtrace.json: {rule}: only OCI fields (no includes/excludes)"
        );
        let names = strings(&rule["names"]);
        let unconditional = rule
            .get("args")
            .is_none_or(|a| a.as_array().is_some_and(Vec::is_empty));
        match str_at(rule, "/action") {
            Some("SCMP_ACT_ALLOW") if unconditional => allowed.extend(names),
            Some("SCMP_ACT_ALLOW") => {}
            _ => refused.extend(names),
        }
    }
    assert!(allowed.contains("bpf"), "bpf(2) must be allowed outright");
    assert!(!refused.contains("bpf"), "bpf(2) must not also be refused");
    for not_needed in [
        "perf_event_open",
        "init_module",
        "kexec_load",
        "open_by_handle_at",
    ] {
        assert!(
            !allowed.contains(not_needed),
            "{not_needed} is allowed; the agent does not need it (tests/tests/cluster/runtime.rs)"
        );
    }
}

#[test]
fn readme_seccomp_overlay_puts_the_agent_on_the_shipped_profile() {
    // deploy/README.md's "Container runtimes and seccomp" overlay, built against this deploy/:
    // the agent's container (only it) gets the Localhost profile flowtrace.json.
    let text = read("deploy/README.md");
    let at = text
        .find("## Container runtimes and seccomp")
        .expect("deploy/README.md: no `## Container runtimes and seccomp` section");
    let block = &text[at..];
    let start = block
        .find("```yaml\n")
        .expect("the section has no yaml block")
        + 8;
    let end = start + block[start..].find("```").expect("an unclosed yaml block");
    let overlay = block[start..end].replace("<path to deploy/>", "deploy");
    let built = build_overlay("seccomp", &overlay);
    let ds = built
        .iter()
        .find(|v| str_at(v, "/kind") == Some("DaemonSet"))
        .expect("the overlay keeps the DaemonSet");
    let profile = ds
        .pointer("/spec/template/spec/containers/0/securityContext/seccompProfile")
        .expect("the agent's seccompProfile");
    assert_eq!(str_at(profile, "/type"), Some("Localhost"), "{profile}");
    assert_eq!(
        str_at(profile, "/localhostProfile").map(|p| p.rsplit('/').next().unwrap_or(p)),
        Some("flowtrace.json"),
        "{profile}"
    );
    let relay = built
        .iter()
        .find(|v| str_at(v, "/kind") == Some("Deployment"))
        .expect("the relay's Deployment");
    assert_eq!(
        str_at(
            relay,
            "/spec/template/spec/containers/0/securityContext/seccompProfile/type"
        ),
        Some("RuntimeDefault"),
        "the relay makes no bpf() call: it keeps RuntimeDefault"
    );
}
