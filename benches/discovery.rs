//! Discovery at cluster scale, in-process, with 10 000 and 100 000 remote pods: what a full
//! rebuild of the Kubernetes source's model costs (from the node's store of compact entries),
//! what one pod's update costs (the changed pod applied to the store and the new state
//! published, by the incremental engine, and by a full rebuild as the source did before), and
//! what loading a discovery file of the same size costs. Both meshes have 10 000 services of
//! ten ready endpoints each. One iteration is one rebuild, one update, or one parse.
//!
//! Read the ratio of the 100 000 figure to the 10 000 one: a cost that follows the cluster's
//! size, not the update's, grows about tenfold.

use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ztunnel::discovery::enrollment::Rules;
use ztunnel::discovery::kube::incremental::{Changes, Engine};
use ztunnel::discovery::kube::objects::Key;
use ztunnel::discovery::kube::objects::{
    pod_key, PodEntry, PortEntry, ServiceEntry, SliceEntry, Target,
};
use ztunnel::discovery::kube::translate::{build, Store};
use ztunnel::discovery::{Interner, Labels, DATAPLANE_MODE_LABEL};

const SERVICES: usize = 10_000;

fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8))
}

/// A store of `pods` remote pods in 1 000 namespaces on 5 000 nodes, and the services.
fn store(pods: usize) -> Store {
    let mut int = Interner::default();
    let mut s = Store::default();
    for i in 0..1000 {
        s.namespaces
            .insert((String::new(), format!("ns-{i}")), Default::default());
    }
    for i in 0..pods {
        let ns = format!("ns-{}", i % 1000);
        let name = format!("app-{}-7d4b9c-{i:05}", i % 500);
        let labels: std::collections::BTreeMap<String, String> = [
            ("app".to_string(), format!("app-{}", i % 500)),
            ("version".to_string(), "v1".to_string()),
        ]
        .into();
        let entry = PodEntry {
            uid: int.get(""),
            name: name.as_str().into(),
            namespace: int.get(&ns),
            service_account: int.get(&format!("sa-{}", i % 500)),
            node: int.get(&format!("node-{}", i % 5000)),
            ips: vec![pod_ip(i)].into_boxed_slice(),
            labels: Labels::default(),
            other_mesh: None,
            telemetry: int.telemetry(&name, &name, &labels),
            terminating: false,
        };
        s.remote_pods.insert((ns, name), entry);
    }
    for i in 0..SERVICES {
        let ns = format!("ns-{}", i % 1000);
        let name = format!("svc-{i}");
        s.services.insert(
            (ns.clone(), name.clone()),
            ServiceEntry {
                name: name.as_str().into(),
                namespace: int.get(&ns),
                vips: vec![IpAddr::V4(Ipv4Addr::new(
                    172,
                    16 + (i >> 16) as u8,
                    (i >> 8) as u8,
                    i as u8,
                ))],
                ports: vec![PortEntry {
                    name: None,
                    port: 80,
                    target: Target::Number(8080),
                }],
                selector: Labels::default(),
                node_local: false,
                distribution: Default::default(),
                use_waypoint: None,
                use_waypoint_namespace: None,
            },
        );
        // Ten ready endpoints among the namespace's pods, each naming its pod.
        let eps: Vec<usize> = (0..10)
            .map(|k| i % 1000 + 1000 * (k + 10 * ((i / 1000) % 10)))
            .filter(|&p| p < pods)
            .collect();
        let ready = eps.iter().map(|&p| pod_ip(p)).collect();
        let pod_keys = eps
            .iter()
            .map(|&p| {
                pod_key(
                    &format!("ns-{}", p % 1000),
                    &format!("app-{}-7d4b9c-{p:05}", p % 500),
                )
            })
            .collect();
        s.slices.insert(
            (ns, format!("{name}-abcde")),
            SliceEntry {
                service: name,
                ports: vec![(String::new(), 8080)],
                ready,
                pods: pod_keys,
            },
        );
    }
    s
}

/// The discovery file of `workloads` remote workloads and the services, as
/// `ztunnel-memory discovery` writes it.
fn mesh_file(workloads: usize) -> String {
    use std::fmt::Write;
    let mut y = String::from("namespaces:\n");
    for i in 0..1000 {
        let _ = writeln!(y, "  - {{name: ns-{i}}}");
    }
    y.push_str("workloads:\n");
    for i in 0..workloads {
        let _ = writeln!(
            y,
            "  - {{uid: u{i}, name: app-{}-7d4b9c-{i:05}, namespace: ns-{}, serviceAccount: sa-{}, node: node-{}, ips: [{}], labels: {{app: app-{}, shard: s-{}, version: v1}}}}",
            i % 500, i % 1000, i % 500, i % 5000, pod_ip(i), i % 500, (i / 10_000) % 10
        );
    }
    y.push_str("services:\n");
    for i in 0..SERVICES {
        let _ = writeln!(
            y,
            "  - {{name: svc-{i}, namespace: ns-{}, vips: [172.{}.{}.{}], ports: [{{port: 80, targetPort: 8080}}], selector: {{app: app-{}, shard: s-{}}}}}",
            i % 1000, 16 + ((i >> 16) & 15), (i >> 8) & 255, i & 255, (i % 1000) % 500, (i / 1000) % 10
        );
    }
    y
}

fn kube_rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("discovery_kube_rebuild");
    g.sample_size(10);
    for pods in [10_000, 100_000] {
        let s = store(pods);
        let (state, skipped) = build("cluster.local", Rules::default(), &s);
        let state = state.expect("the store builds");
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(state.workloads().len(), pods);
        g.bench_with_input(BenchmarkId::from_parameter(pods), &s, |b, s| {
            b.iter(|| build("cluster.local", Rules::default(), s))
        });
    }
    g.finish();
}

/// The `i`th remote pod of `s` (cycling), updated: its opt-out label set or cleared (a
/// change of its protocol), applied to the store; returns its key and previous entry.
fn update_pod(s: &mut Store, keys: &[Key], i: usize, int: &mut Interner) -> (Key, PodEntry) {
    let k = &keys[i % keys.len()];
    let mut p = s.remote_pods[k].clone();
    p.labels = match p.labels.is_empty() {
        true => [(int.get(DATAPLANE_MODE_LABEL), int.get("none"))]
            .into_iter()
            .collect(),
        false => Labels::default(),
    };
    let old = s.remote_pods.insert(k.clone(), p).expect("there");
    (k.clone(), old)
}

fn kube_pod_update(c: &mut Criterion) {
    let mut g = c.benchmark_group("discovery_kube_pod_update");
    g.sample_size(10);
    for pods in [10_000, 100_000] {
        let mut s = store(pods);
        let mut int = Interner::default();
        // Pods in a spread order, so that each update changes another pod.
        let mut keys: Vec<Key> = s.remote_pods.keys().cloned().collect();
        let n = keys.len();
        keys = (0..n).map(|i| keys[(i * 7919) % n].clone()).collect();
        let mut engine = Engine::new("cluster.local", "this-node", Rules::default());
        engine
            .update(&s, Changes::default())
            .0
            .expect("the store builds");
        let mut i = 0;
        g.bench_function(BenchmarkId::new("incremental", pods), |b| {
            b.iter(|| {
                let (k, old) = update_pod(&mut s, &keys, i, &mut int);
                i += 1;
                let mut changes = Changes::default();
                changes.pod(false, k, Some(old));
                engine.update(&s, changes).0.expect("builds")
            })
        });
        assert_eq!(engine.full_builds(), 1, "no update rebuilt in full");
        g.bench_function(BenchmarkId::new("full_rebuild", pods), |b| {
            b.iter(|| {
                update_pod(&mut s, &keys, i, &mut int);
                i += 1;
                build("cluster.local", Rules::default(), &s)
                    .0
                    .expect("builds")
            })
        });
    }
    g.finish();
}

fn file_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("discovery_file_parse");
    g.sample_size(10);
    for workloads in [10_000, 100_000] {
        let text = mesh_file(workloads);
        let state = ztunnel::discovery::parse_for_node(&text, "cluster.local", Some("this-node"))
            .expect("the file parses");
        assert_eq!(state.workloads().len(), workloads);
        g.bench_with_input(BenchmarkId::from_parameter(workloads), &text, |b, text| {
            b.iter(|| ztunnel::discovery::parse_for_node(text, "cluster.local", Some("this-node")))
        });
    }
    g.finish();
}

criterion_group!(benches, kube_rebuild, kube_pod_update, file_parse);
criterion_main!(benches);
