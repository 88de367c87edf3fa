//! What the tests read from deploy/daemonset.yaml: the agent's pod spec and container, as
//! shipped (the tests check the manifest's settings rather than restating them).

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, PodSpec},
};

/// The agent's pod spec and its container (the one running `flowtrace agent`).
pub fn daemonset_agent() -> (PodSpec, Container) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let ds: DaemonSet = serde_saphyr::from_str(&text).unwrap();
    let pod = ds.spec.template.spec.unwrap();
    let agent = pod
        .containers
        .iter()
        .find(|c| {
            c.args
                .as_deref()
                .unwrap_or_default()
                .first()
                .map(String::as_str)
                == Some("agent")
        })
        .expect("deploy/daemonset.yaml: a container running `flowtrace agent`")
        .clone();
    (pod, agent)
}
