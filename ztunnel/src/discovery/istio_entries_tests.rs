use serde_json::json;

use super::*;

fn net(s: &str) -> IpNet {
    address_or_range(s).unwrap()
}

/// What each kind declares: a ServiceEntry's addresses (allocated ones only without its own)
/// and IP endpoints, a WorkloadEntry's IP address, each with the labels that decide it.
#[test]
fn what_the_objects_declare() {
    let se = json!({
        "metadata": {"namespace": "egress", "name": "ext",
                     "labels": {"istio.io/use-waypoint": "wp", "app": "x"}},
        "spec": {"hosts": ["ext.example"], "addresses": ["192.0.2.7", "10.1.2.3/16"],
                 "endpoints": [
                     {"address": "198.51.100.1", "labels": {"istio.io/use-waypoint": "ep-wp",
                      "gateway.networking.k8s.io/gateway-name": "g"}},
                     {"address": "vm.example"},
                     {"address": "unix:///var/run/app.sock"}]},
        "status": {"addresses": [{"value": "240.240.0.1", "host": "ext.example"}]},
    });
    let got = parse(Kind::ServiceEntry, &se).unwrap();
    let summary: Vec<_> = got
        .iter()
        .map(|e| {
            (
                e.at,
                e.traffic,
                e.use_waypoint.as_deref(),
                e.gateway.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (net("192.0.2.7"), Traffic::Service, Some("wp"), None),
            (net("10.1.0.0/16"), Traffic::Service, Some("wp"), None),
            (
                net("198.51.100.1"),
                Traffic::Workload,
                Some("ep-wp"),
                Some("g")
            ),
        ]
    );
    assert!(got
        .iter()
        .all(|e| &*e.namespace == "egress" && &*e.name == "ext"));

    // Allocated addresses stand in for none of its own.
    let mut allocated = se.clone();
    allocated["spec"]["addresses"] = json!([]);
    let got = parse(Kind::ServiceEntry, &allocated).unwrap();
    assert_eq!(got[0].at, net("240.240.0.1"));
    assert_eq!(got[0].traffic, Traffic::Service);

    // A waypoint's own ServiceEntry has none.
    let mut managed = se.clone();
    managed["metadata"]["labels"]["gateway.istio.io/managed"] = json!("istio.io-mesh-controller");
    let got = parse(Kind::ServiceEntry, &managed).unwrap();
    assert_eq!(got[0].use_waypoint.as_deref(), Some("none"));
    assert_eq!(got[2].use_waypoint.as_deref(), Some("ep-wp"));

    // A zoned IPv6 address is read without its zone, as Istio reads it.
    let mut zoned = se.clone();
    zoned["spec"]["addresses"] = json!(["fe80::1%eth0"]);
    zoned["spec"]["endpoints"] = json!([{"address": "fe80::2%eth0"}]);
    let got = parse(Kind::ServiceEntry, &zoned).unwrap();
    let at: Vec<IpNet> = got.iter().map(|e| e.at).collect();
    assert_eq!(at, [net("fe80::1"), net("fe80::2")]);

    // Istio drops a ServiceEntry with an address it cannot parse, and takes none without a
    // namespace.
    let mut bad = se.clone();
    bad["spec"]["addresses"] = json!(["192.0.2.7", "ext.example"]);
    assert!(parse(Kind::ServiceEntry, &bad)
        .unwrap_err()
        .contains("ext.example"));
    let mut anywhere = se.clone();
    anywhere["metadata"]["namespace"] = json!("");
    assert!(parse(Kind::ServiceEntry, &anywhere).is_err());

    // A WorkloadEntry: its spec's labels, overridden by its own.
    let we = json!({
        "metadata": {"namespace": "vms", "name": "vm-1",
                     "labels": {"istio.io/use-waypoint": "own"}},
        "spec": {"address": "2001:db8::5",
                 "labels": {"istio.io/use-waypoint": "spec", "istio.io/use-waypoint-namespace": "infra"}},
    });
    let got = parse(Kind::WorkloadEntry, &we).unwrap();
    assert_eq!(got.len(), 1);
    let e = &got[0];
    assert_eq!((e.at, e.traffic), (net("2001:db8::5"), Traffic::Workload));
    assert_eq!(e.use_waypoint.as_deref(), Some("own"));
    assert_eq!(e.use_waypoint_namespace.as_deref(), Some("infra"));
    assert_eq!(e.to_string(), "WorkloadEntry vms/vm-1 (2001:db8::5/128)");
    // One addressed by host name declares no address.
    let mut named = we.clone();
    named["spec"]["address"] = json!("vm-1.example");
    assert_eq!(parse(Kind::WorkloadEntry, &named).unwrap(), []);
}

/// Which entries a connection is addressed to: a workload address first, then a Service's
/// exact address (the client's namespace's first), then the ranges that hold it (the client's
/// namespace's first, then the longest); ties are all asked.
#[test]
fn the_entries_an_address_reaches() {
    let e = |ns: &str, name: &str, at: &str, traffic| Entry {
        kind: Kind::ServiceEntry,
        namespace: ns.into(),
        name: name.into(),
        at: net(at),
        traffic,
        use_waypoint: None,
        use_waypoint_namespace: None,
        gateway: None,
    };
    use Traffic::{Service as S, Workload as W};
    let table = Entries::new([
        e("a", "vip-a", "10.0.0.1", S),
        e("b", "vip-b", "10.0.0.1", S),
        e("c", "vip-c", "10.0.0.2", S),
        e("d", "vip-d", "10.0.0.2", S),
        e("a", "wl", "10.0.0.3", W),
        e("b", "vip-3", "10.0.0.3", S),
        e("a", "wide-a", "10.0.0.0/8", S),
        e("b", "narrow-b", "10.1.0.0/16", S),
        e("c", "narrow-c", "10.1.0.0/16", S),
        e("c", "wide6", "2001:db8::/32", S),
        e("e", "everything", "0.0.0.0/0", S),
    ]);
    let names = |ip: &str, client: &str, service: Option<&str>| -> Vec<String> {
        let found = table.addressed(ip.parse().unwrap(), client, service);
        let mut v: Vec<String> = found.iter().map(|e| e.name.to_string()).collect();
        v.sort();
        v
    };
    let cases: &[(&str, &str, Option<&str>, &[&str])] = &[
        // Exact: the client's namespace's, else every one.
        ("10.0.0.1", "a", None, &["vip-a"]),
        ("10.0.0.1", "z", None, &["vip-a", "vip-b"]),
        ("10.0.0.2", "z", None, &["vip-c", "vip-d"]),
        // A workload address wins over a Service's.
        ("10.0.0.3", "b", None, &["wl"]),
        ("10.0.0.3", "b", Some("b"), &["wl"]),
        // An exact address wins over any range, the client namespace's too.
        ("10.0.0.2", "a", None, &["vip-c", "vip-d"]),
        // Beside a Kubernetes Service at the address: the client namespace's ServiceEntries
        // (even when the Service is the client namespace's too: Istio takes either); none when
        // only the Service is; else every one. No range.
        ("10.0.0.1", "a", Some("a"), &["vip-a"]),
        ("10.0.0.1", "z", Some("z"), &[]),
        ("10.0.0.1", "z", Some("y"), &["vip-a", "vip-b"]),
        ("10.9.9.9", "a", Some("k"), &[]),
        // Ranges: the client's namespace's first, then the longest.
        ("10.1.2.3", "a", None, &["wide-a"]),
        ("10.1.2.3", "z", None, &["narrow-b", "narrow-c"]),
        ("10.1.2.3", "b", None, &["narrow-b"]),
        ("10.9.9.9", "z", None, &["wide-a"]),
        ("10.9.9.9", "e", None, &["everything"]),
        ("192.0.2.1", "z", None, &["everything"]),
        ("2001:db8::1", "z", None, &["wide6"]),
        // Nothing declared.
        ("2001:db9::1", "a", None, &[]),
    ];
    for (ip, client, service, want) in cases {
        assert_eq!(
            names(ip, client, *service),
            *want,
            "{ip} from {client} beside {service:?}"
        );
    }
}
