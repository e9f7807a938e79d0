//! The engine against full builds: random sequences of store changes, applied in batches,
//! must give after each batch the state (and the skipped objects) a full build of the same
//! store gives, and a one-pod change must not rebuild.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::super::objects::{
    pod_key, Interner, NamespaceEntry, NodeEntry, PodEntry, PortEntry, ServiceEntry, SliceEntry,
    Target,
};
use super::*;
use crate::discovery::{Distribution, Labels, Locality, Protocol, DATAPLANE_MODE_LABEL};

const NODE: &str = "n1";
const TD: &str = "cluster.local";
/// Pod IPs in use: few enough that pods collide often (with `collide`), or 200.
const IPS: usize = 30;

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn pod_ip(i: usize) -> IpAddr {
    format!("10.0.0.{}", i + 1).parse().unwrap()
}

fn vip(i: usize) -> IpAddr {
    format!("10.96.0.{}", i + 1).parse().unwrap()
}

fn key(ns: &str, name: &str) -> Key {
    (ns.to_owned(), name.to_owned())
}

struct World {
    rng: Rng,
    /// Pods claim one of few IPs, and sometimes a uid another has.
    collide: bool,
    int: Interner,
    store: Store,
    changes: Changes,
}

impl World {
    fn new(seed: u64, collide: bool) -> World {
        let mut w = World {
            rng: Rng(seed),
            collide,
            int: Interner::default(),
            store: Store {
                node: NODE.to_owned(),
                ..Store::default()
            },
            changes: Changes::default(),
        };
        for (ns, ambient) in [("a", true), ("b", false)] {
            let labels: BTreeMap<String, String> = match ambient {
                true => [(DATAPLANE_MODE_LABEL.to_owned(), "ambient".to_owned())].into(),
                false => BTreeMap::new(),
            };
            let labels = w.int.labels(&labels);
            let e = NamespaceEntry {
                labels,
                distribution: ambient.then_some(Distribution::PreferSameZone),
            };
            w.store.namespaces.insert(key("", ns), e);
        }
        // Node addresses among the pods' (endpoints of host-network pods, or of pods that
        // took one of them).
        for (n, zone, ip) in [("n1", "z1", 2), ("n2", "z2", IPS - 1)] {
            let l = w.int.locality(Locality {
                region: "r".into(),
                zone: zone.into(),
                subzone: "".into(),
            });
            w.store.nodes.insert(
                key("", n),
                NodeEntry {
                    locality: l,
                    ips: Box::new([pod_ip(ip)]),
                },
            );
        }
        w
    }

    fn ns(&mut self) -> &'static str {
        ["a", "b"][self.rng.below(2)]
    }

    fn pod(&mut self) {
        let ns = self.ns();
        let name = format!("p{}", self.rng.below(10));
        let node = ["n1", "n2", "n3"][self.rng.below(3)];
        let local = node == NODE;
        if let Some(a) = self.store.pods.remove(&key(ns, &name)) {
            self.changes.pod(true, key(ns, &name), Some(a));
        }
        if let Some(b) = self.store.remote_pods.remove(&key(ns, &name)) {
            self.changes.pod(false, key(ns, &name), Some(b));
        }
        if self.rng.chance(25) {
            return; // deleted
        }
        let r = &mut self.rng;
        let pool = if self.collide { IPS } else { 200 };
        let mut ips: Vec<IpAddr> = match r.below(10) {
            0 if local => vec![],
            1 => vec![pod_ip(r.below(pool)), pod_ip(r.below(pool))],
            _ => vec![pod_ip(r.below(pool))],
        };
        if self.collide && r.chance(3) {
            ips = vec![vip(r.below(4))];
        }
        let sa = match r.below(20) {
            0 => "Bad/SA",
            1..=9 => "web",
            _ => "db",
        };
        let mut labels: BTreeMap<String, String> =
            [("app".to_owned(), ["web", "db"][r.below(2)].to_owned())].into();
        if r.chance(20) {
            labels.insert(DATAPLANE_MODE_LABEL.to_owned(), "none".to_owned());
        }
        let uid = match (local, r.below(15)) {
            (false, _) => String::new(),
            (true, 0) if self.collide => "uid-twice".to_owned(),
            (true, _) => format!("uid-{ns}-{name}"),
        };
        let version = format!("v{}", r.below(3));
        let telemetry = self
            .int
            .telemetry(&name, "wl", &[("version".to_owned(), version)].into());
        let labels = match local {
            true => self.int.labels(&labels),
            false => labels
                .iter()
                .filter(|(k, _)| k.as_str() == DATAPLANE_MODE_LABEL)
                .map(|(k, v)| (self.int.get(k), self.int.get(v)))
                .collect(),
        };
        let e = PodEntry {
            uid: uid.as_str().into(),
            name: name.as_str().into(),
            namespace: self.int.get(ns),
            service_account: self.int.get(sa),
            node: self.int.get(node),
            ips: ips.into_boxed_slice(),
            labels,
            other_mesh: None,
            telemetry,
            terminating: r.chance(25),
        };
        let m = match local {
            true => &mut self.store.pods,
            false => &mut self.store.remote_pods,
        };
        let old = m.insert(key(ns, &name), e);
        self.changes.pod(local, key(ns, &name), old);
    }

    fn service(&mut self) {
        let ns = self.ns();
        let name = format!("s{}", self.rng.below(5));
        let k = key(ns, &name);
        if self.rng.chance(20) {
            if let Some(old) = self.store.services.remove(&k) {
                self.changes.service(k, Some(old));
            }
            return;
        }
        let r = &mut self.rng;
        let mut vips = vec![match r.below(8) {
            0 => pod_ip(r.below(if self.collide { IPS } else { 200 })),
            _ => vip(r.below(6)),
        }];
        if r.chance(10) {
            vips.push(vip(r.below(6)));
        }
        let target = match r.below(3) {
            0 => Target::Name("http".into()),
            1 => Target::Number(0),
            _ => Target::Number(8080),
        };
        let e = ServiceEntry {
            name: name.as_str().into(),
            namespace: self.int.get(ns),
            vips,
            ports: vec![PortEntry {
                name: Some("http".into()),
                port: 80,
                target,
            }],
            selector: Default::default(),
            node_local: self.rng.chance(20),
            distribution: match self.rng.below(4) {
                0 => Some(Distribution::PreferSameNode),
                1 => Some(Distribution::Any),
                _ => None,
            },
            use_waypoint: self.rng.chance(20).then(|| "wp".into()),
            use_waypoint_namespace: None,
        };
        let old = self.store.services.insert(k.clone(), e);
        self.changes.service(k, old);
    }

    fn slice(&mut self) {
        let ns = self.ns();
        let k = key(ns, &format!("sl{}", self.rng.below(8)));
        if self.rng.chance(20) {
            if let Some(old) = self.store.slices.remove(&k) {
                self.changes.slice(k, Some(old));
            }
            return;
        }
        let r = &mut self.rng;
        let pool = if self.collide { IPS } else { 40 };
        let ready: Vec<_> = (0..r.below(5)).map(|_| pod_ip(r.below(pool))).collect();
        // Some endpoints name no pod: the pod at the address (if any) keeps it a workload's.
        let not_pods: Vec<IpAddr> = ready.iter().filter(|_| r.chance(30)).copied().collect();
        // The others name a pod, often not the one at the address now.
        let pods = ready
            .iter()
            .map(|ip| match not_pods.contains(ip) {
                true => 0,
                false => pod_key(["a", "b"][r.below(2)], &format!("p{}", r.below(10))),
            })
            .collect();
        let ports = match r.chance(70) {
            true => vec![("http".to_owned(), 8000 + r.below(3) as u16)],
            false => vec![],
        };
        let e = SliceEntry {
            service: format!("s{}", r.below(5)),
            ports,
            ready,
            pods,
        };
        let old = self.store.slices.insert(k.clone(), e);
        self.changes.slice(k, old);
    }

    fn step(&mut self) {
        match self.rng.below(if self.collide { 20 } else { 100 }) {
            0 => {
                // A namespace's labels and traffic distribution: a full rebuild.
                let e = self.store.namespaces.get_mut(&key("", "b")).unwrap();
                *e = match e.labels.is_empty() {
                    true => NamespaceEntry {
                        labels: Labels::of(&[(DATAPLANE_MODE_LABEL, "ambient")]),
                        distribution: Some(Distribution::PreferSameNode),
                    },
                    false => NamespaceEntry::default(),
                };
                self.changes.full = true;
            }
            n if n % 20 <= 10 => self.pod(),
            n if n % 20 <= 15 => self.slice(),
            _ => self.service(),
        }
    }
}

/// Everything a reader can see of a state, in a form to compare.
fn seen(s: &State) -> serde_json::Value {
    let mut workloads: Vec<serde_json::Value> = s
        .workloads()
        .iter()
        .map(|w| serde_json::to_value(w).unwrap())
        .collect();
    workloads.sort_by_key(|w| w.to_string());
    let mut services: Vec<serde_json::Value> = s
        .services()
        .iter()
        .map(|sv| serde_json::to_value(sv).unwrap())
        .collect();
    services.sort_by_key(|w| w.to_string());
    let name = |w: &Arc<Workload>| format!("{}/{}@{}", w.namespace, w.name, w.node);
    let ips: Vec<IpAddr> = (0..200).map(pod_ip).chain((0..6).map(vip)).collect();
    let by_ip: Vec<_> = ips
        .iter()
        .map(|ip| {
            let svc = s
                .service_by_vip(*ip)
                .map(|v| format!("{}/{}", v.namespace, v.name));
            let eps: Vec<String> = s.endpoints_of_vip(*ip).map(name).collect();
            (s.workload_by_ip(*ip).map(name), svc, eps, s.contested(*ip))
        })
        .collect();
    let mut uids: Vec<String> = vec!["uid-twice".into()];
    for ns in ["a", "b"] {
        uids.extend((0..10).map(|i| format!("uid-{ns}-p{i}")));
    }
    let by_uid: Vec<_> = uids
        .iter()
        .map(|u| {
            let w = s.workload_by_uid(u);
            let of: Vec<String> = w
                .into_iter()
                .flat_map(|w| s.services_of(w))
                .map(|v| format!("{}/{}", v.namespace, v.name))
                .collect();
            (w.map(name), of)
        })
        .collect();
    let hosts: Vec<_> = ["a", "b"]
        .iter()
        .flat_map(|ns| (0..5).map(move |i| format!("s{i}.{ns}.svc.cluster.local")))
        .map(|h| {
            s.service_by_hostname(&h, "cluster.local")
                .map(|v| v.vips.clone())
        })
        .collect();
    let pending: Vec<String> = s.pending().iter().map(name).collect();
    let by_name: Vec<_> = ["a", "b"]
        .iter()
        .flat_map(|ns| (0..10).map(move |i| (ns, format!("p{i}"))))
        .map(|(ns, n)| s.workload_by_name(ns, &n).map(name))
        .collect();
    let mut dump = s.dump();
    dump["workloads"] = workloads.into();
    dump["services"] = services.into();
    serde_json::json!({
        "dump": dump,
        "counts": [s.workloads().len(), s.services().len()],
        "byIp": by_ip,
        "byUid": by_uid,
        "hosts": hosts,
        "pending": pending,
        "byName": by_name,
        "enrolled": s.enrolled_namespaces(),
    })
}

fn check(seed: u64, collide: bool, limit: usize, steps: usize) -> (u64, usize) {
    let mut w = World::new(seed, collide);
    let mut engine = Engine::new(TD, NODE, Rules::default()).with_patch_limit(limit);
    let (first, _) = engine.update(&w.store, Changes::default());
    first.unwrap();
    let mut batches = 0;
    let mut step = 0;
    while step < steps {
        for _ in 0..1 + w.rng.below(3) {
            w.step();
            step += 1;
        }
        batches += 1;
        let changes = std::mem::take(&mut w.changes);
        let (got, _) = engine.update(&w.store, changes);
        let (want, mut skipped) = translate::build(TD, Rules::default(), &w.store);
        skipped.sort();
        let at = format!("seed {seed} limit {limit} step {step}");
        match (got, want) {
            (Ok(got), Ok(want)) => {
                assert_eq!(seen(&got), seen(&want), "{at}");
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{at}"),
            (got, want) => panic!("{at}: {:?} vs {:?}", got.map(|_| ()), want.map(|_| ())),
        }
        assert_eq!(engine.skipped(), skipped, "{at}");
    }
    (engine.full_builds(), batches)
}

/// With pods often claiming one IP or uid, services one VIP or a pod's IP: many full builds.
#[test]
fn incremental_updates_give_what_a_full_build_gives() {
    for seed in 1..=40u64 {
        for limit in [0, 16, 1 << 20] {
            check(seed * 7919, true, limit, 300);
        }
    }
}

/// With pods seldom colliding, few full builds (a namespace's change, a shared IP).
#[test]
fn incremental_updates_without_collisions() {
    let mut full = 0;
    let mut batches = 0;
    for seed in 1..=20u64 {
        for limit in [0, 16, 1 << 20] {
            let (f, b) = check(seed * 104_729, false, limit, 300);
            full += f;
            batches += b;
        }
    }
    assert!(
        full * 5 < batches as u64,
        "{full} full builds for {batches} batches"
    );
}

#[test]
fn a_pod_change_does_not_rebuild() {
    let mut w = World::new(42, false);
    for _ in 0..200 {
        w.pod();
        w.service();
        w.slice();
    }
    w.changes = Changes::default();
    let mut engine = Engine::new(TD, NODE, Rules::default());
    engine.update(&w.store, Changes::default()).0.unwrap();
    let (k, e) = w
        .store
        .remote_pods
        .iter()
        .find(|(_, e)| {
            let claims = |ip: &IpAddr| {
                let pods = w.store.pods.values().chain(w.store.remote_pods.values());
                pods.flat_map(|p| p.ips.iter()).filter(|i| *i == ip).count()
            };
            e.service_account.as_ref() != "Bad/SA" && e.ips.len() == 1 && claims(&e.ips[0]) == 1
        })
        .map(|(k, e)| (k.clone(), e.clone()))
        .expect("a remote pod");
    let mut changed = e.clone();
    changed.labels = Labels::of(&[(DATAPLANE_MODE_LABEL, "none")]);
    let old = w.store.remote_pods.insert(k.clone(), changed);
    let mut changes = Changes::default();
    changes.pod(false, k, old);
    let before = engine.full_builds();
    let s = engine.update(&w.store, changes).0.unwrap();
    let (want, _) = translate::build(TD, Rules::default(), &w.store);
    assert_eq!(seen(&s), seen(&want.unwrap()));
    assert_eq!(engine.full_builds(), before);
    let wl = s.workload_by_ip(e.ips[0]).unwrap();
    assert_eq!(wl.protocol, Protocol::Tcp);
}

/// A watch event that changes nothing the model keeps still replaces the store's entry (a
/// new one, equal in value): the pod's later deletion takes its workload out all the same.
#[test]
fn a_pod_deleted_after_an_event_that_changed_nothing_leaves() {
    let mut w = World::new(7, false);
    for _ in 0..50 {
        w.pod();
    }
    w.changes = Changes::default();
    let mut engine = Engine::new(TD, NODE, Rules::default());
    engine.update(&w.store, Changes::default()).0.unwrap();
    for local in [true, false] {
        let pods = match local {
            true => &w.store.pods,
            false => &w.store.remote_pods,
        };
        let (k, e) = pods
            .iter()
            .find(|(_, e)| e.service_account.as_ref() != "Bad/SA" && e.ips.len() == 1)
            .map(|(k, e)| (k.clone(), e.clone()))
            .expect("a pod");
        let ip = e.ips[0];
        assert!(engine
            .update(&w.store, Changes::default())
            .0
            .unwrap()
            .workload_by_ip(ip)
            .is_some());
        // The same pod, rebuilt from an event (a status change the model does not keep).
        let mut again = e.clone();
        again.name = e.name.to_string().into();
        again.namespace = e.namespace.to_string().into();
        let slot = match local {
            true => &mut w.store.pods,
            false => &mut w.store.remote_pods,
        };
        let old = slot.insert(k.clone(), again);
        let mut changes = Changes::default();
        changes.pod(local, k.clone(), old);
        engine.update(&w.store, changes).0.unwrap();
        // Deleted.
        let slot = match local {
            true => &mut w.store.pods,
            false => &mut w.store.remote_pods,
        };
        let old = slot.remove(&k);
        let mut changes = Changes::default();
        changes.pod(local, k.clone(), old);
        let s = engine.update(&w.store, changes).0.unwrap();
        let (want, _) = translate::build(TD, Rules::default(), &w.store);
        assert_eq!(seen(&s), seen(&want.unwrap()), "local {local}");
        assert!(
            s.workload_by_ip(ip).is_none(),
            "local {local}: the deleted pod left"
        );
    }
}
