use super::*;
use crate::model::wire::{FlowsResponse, RelayFlowsResponse};
use crate::testutil::flow_record;

fn answer(node: &str, bytes: &[u64], truncated: bool) -> merge::RawFlows {
    let flows: Vec<_> = bytes.iter().map(|b| flow_record(*b)).collect();
    let json = serde_json::to_string(&FlowsResponse {
        node: node.into(),
        flows,
        matched: bytes.len() + usize::from(truncated),
        truncated,
    })
    .expect("encode");
    serde_json::from_str(&json).expect("raw decode")
}

fn merged(
    answers: Vec<merge::RawFlows>,
    missing: Vec<MissingNode>,
    limit: usize,
) -> RelayFlowsResponse {
    let mut m = merge::TopFlows::new(limit);
    for a in answers {
        let url = format!("https://{}:9652", a.node);
        m.add(url, a, Duration::from_millis(3));
    }
    let body = m.into_json(missing);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn merged_flows_say_their_node_and_keep_the_largest_up_to_the_limit() {
    let missing = vec![MissingNode {
        agent: "https://n3:9652".into(),
        node: Some("n3".into()),
        error: "no answer within the agent timeout".into(),
    }];
    let r = merged(
        vec![
            answer("n2", &[5, 500], false),
            answer("n1", &[50, 1], false),
        ],
        missing.clone(),
        3,
    );
    let got: Vec<(&str, u64)> = r
        .flows
        .iter()
        .map(|f| (f.node.as_str(), f.flow.bytes))
        .collect();
    assert_eq!(got, [("n2", 500), ("n1", 50), ("n2", 5)]);
    // The agent's record passes through whole.
    assert_eq!(r.flows[0].flow, flow_record(500));
    assert!(r.truncated, "4 flows, limit 3");
    assert_eq!(r.missing, missing);
    let nodes: Vec<&str> = r.nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(nodes, ["n1", "n2"]);

    let r = merged(vec![answer("n1", &[1], true)], vec![], 10);
    assert!(
        r.truncated,
        "a node that truncated its own answer makes the whole truncated"
    );
    let r = merged(vec![answer("n1", &[1, 2], false)], vec![], 10);
    assert!(!r.truncated);
    assert_eq!(r.flows.len(), 2);
    let r = merged(vec![], vec![], 10);
    assert!(r.flows.is_empty() && r.nodes.is_empty());
}

#[test]
fn an_endpointslice_gives_one_agent_per_address_at_the_api_port() {
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "flowtrace-abc", "namespace": "flowtrace",
                     "labels": {"kubernetes.io/service-name": "flowtrace"}},
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9651}, {"name": "api", "port": 9652}],
        "endpoints": [
            {"addresses": ["10.0.0.2"], "nodeName": "node2", "conditions": {"ready": false}},
            {"addresses": ["10.0.0.1"], "nodeName": "node1"}
        ]
    }))
    .expect("slice");
    let got = agents::agents_of(&slice, "api");
    let urls: Vec<(&str, Option<&str>)> = got
        .iter()
        .map(|a| (a.url.as_str(), a.node.as_deref()))
        .collect();
    assert_eq!(
        urls,
        [
            ("https://10.0.0.1:9652", Some("node1")),
            ("https://10.0.0.2:9652", Some("node2")),
        ]
    );
    assert!(agents::agents_of(&slice, "nope").is_empty());
}

use k8s_openapi::api::discovery::v1::EndpointSlice;
