//! The policy engine's decision time with 10 000 authorization policies in the mesh, of which
//! 1, 10 or 100 apply to the destination workload. Each applying policy is an ALLOW whose rule
//! does not match until the last one, so a decision looks at every applying policy: the
//! worst case for that many. One iteration is one decision.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ztunnel::discovery::policy::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, From, ObjectMeta, Operation, Rule,
    Selector, Source, To,
};
use ztunnel::discovery::Labels;
use ztunnel::policy::{Conn, PolicyIndex};

const MESH: usize = 10_000;

fn policy(ns: &str, name: String, app: &str, principal: &str, port: &str) -> AuthorizationPolicy {
    AuthorizationPolicy {
        metadata: ObjectMeta {
            name,
            namespace: ns.into(),
            ..Default::default()
        },
        spec: AuthorizationPolicySpec {
            selector: Some(Selector::labels([("app".to_string(), app.to_string())])),
            action: Action::Allow,
            rules: vec![Rule {
                from: vec![From {
                    source: Source {
                        principals: vec![principal.into()],
                        ip_blocks: vec!["10.0.0.0/8".into()],
                        ..Default::default()
                    },
                }],
                to: vec![To {
                    operation: Operation {
                        ports: vec![port.into()],
                        ..Default::default()
                    },
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
        invalid: None,
    }
}

/// 10 000 policies: `applying` select `app: web` in namespace `target` (only the last one
/// matches the connection); the rest are spread over 1 000 other namespaces and over other
/// workloads of `target`.
fn mesh(applying: usize) -> PolicyIndex {
    let mut v = Vec::with_capacity(MESH);
    for i in 0..applying {
        let principal = if i + 1 == applying {
            "cluster.local/ns/client/sa/*".to_string()
        } else {
            format!("cluster.local/ns/other-{i}/sa/x")
        };
        v.push(policy(
            "target",
            format!("web-{i}"),
            "web",
            &principal,
            "8080",
        ));
    }
    for i in 0..100 {
        v.push(policy(
            "target",
            format!("api-{i}"),
            &format!("api-{i}"),
            "*",
            "80",
        ));
    }
    let mut i = 0;
    while v.len() < MESH {
        let ns = format!("ns-{}", i % 1000);
        v.push(policy(
            &ns,
            format!("p-{i}"),
            &format!("app-{}", i % 7),
            "*",
            "80",
        ));
        i += 1;
    }
    PolicyIndex::build(&v, &[], &[ztunnel::policy::ROOT_NAMESPACE])
}

fn decisions(c: &mut Criterion) {
    let labels: Labels = [
        (Arc::from("app"), Arc::from("web")),
        (Arc::from("version"), Arc::from("v1")),
        (Arc::from("pod-template-hash"), Arc::from("7d4b9")),
    ]
    .into_iter()
    .collect();
    let mut g = c.benchmark_group("policy_decision_10k_policies");
    for applying in [1, 10, 100] {
        let idx = mesh(applying);
        assert_eq!(idx.len(), MESH);
        let conn = Conn {
            src_principal: Some("cluster.local/ns/client/sa/default"),
            src_namespace: Some("client"),
            src_ip: "10.1.2.3".parse().unwrap(),
            dst_ip: "10.2.0.7".parse().unwrap(),
            dst_namespace: "target",
            dst_labels: &labels,
            dst_port: 8080,
        };
        let d = idx.evaluate(&conn);
        assert!(d.allowed && d.policy.is_some(), "{d:?}");
        g.bench_with_input(BenchmarkId::new("applying", applying), &conn, |b, conn| {
            b.iter(|| std::hint::black_box(idx.evaluate(std::hint::black_box(conn))))
        });
    }
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
