//! The translation under the Istio-compatible setting: which of Istio's labels and
//! annotations enroll a pod or keep it out, and the waypoints Services and pods name.

use super::*;

#[test]
fn istios_labels_and_annotations_under_each_rule() {
    use crate::discovery::enrollment::{
        ISTIO_DATAPLANE_MODE_LABEL, ISTIO_REDIRECTION, ISTIO_SIDECAR_STATUS,
    };
    let istio_ns = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "moved", "labels": {ISTIO_DATAPLANE_MODE_LABEL: "ambient"}}});
    let with = |ns: &str, node: &str, ip: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut p = pod(ns, &format!("p{}", &ip[7..]), node, ip);
        f(&mut p);
        p
    };
    let pods = [
        // (pod, protocol without the setting, with it)
        (
            with("moved", NODE, "10.0.0.1", &|_| {}),
            Protocol::Tcp,
            Protocol::Hbone,
        ),
        (
            with("legacy", NODE, "10.0.0.2", &|p| {
                p["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = json!("ambient")
            }),
            Protocol::Tcp,
            Protocol::Hbone,
        ),
        (
            with("demo", NODE, "10.0.0.3", &|p| {
                p["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = json!("none")
            }),
            Protocol::Hbone,
            Protocol::Tcp,
        ),
        (
            with("demo", NODE, "10.0.0.4", &|p| {
                p["metadata"]["annotations"][ISTIO_SIDECAR_STATUS] = json!("{\"containers\":[]}")
            }),
            Protocol::Tcp,
            Protocol::Tcp,
        ),
        // Remote pods keep what enrollment reads: Istio's label and annotations.
        (
            with("legacy", "n2", "10.0.0.5", &|p| {
                p["metadata"]["labels"][ISTIO_DATAPLANE_MODE_LABEL] = json!("ambient")
            }),
            Protocol::Tcp,
            Protocol::Hbone,
        ),
        // Istio's ambient mode has it: never enrolled here, but with the setting
        // reached through a tunnel, as Istio's own ztunnel reaches it.
        (
            with("moved", "n2", "10.0.0.6", &|p| {
                p["metadata"]["annotations"][ISTIO_REDIRECTION] = json!("enabled")
            }),
            Protocol::Tcp,
            Protocol::Hbone,
        ),
        // Being redirected, not yet handed to Istio's ztunnel: plaintext, as Istio sends it.
        (
            with("moved", "n2", "10.0.0.7", &|p| {
                p["metadata"]["annotations"][ISTIO_REDIRECTION] = json!("pending")
            }),
            Protocol::Tcp,
            Protocol::Tcp,
        ),
    ];
    let istios = "10.0.0.6";
    for istio in [false, true] {
        let rules = Rules {
            istio,
            ..Default::default()
        };
        let mut objs = vec![ns("demo", true), ns("legacy", false), istio_ns.clone()];
        objs.extend(pods.iter().map(|p| p.0.clone()));
        let (st, refused) = store_with(&objs, rules);
        assert!(refused.is_empty(), "{refused:?}");
        let (s, skipped) = build("cluster.local", rules, &st);
        assert!(skipped.is_empty(), "{skipped:?}");
        let s = s.unwrap();
        assert_eq!(s.namespace_enrolled("moved"), istio);
        // What the CNI plugin goes by while the daemon is down: under Istio's rules a pod's
        // own label may enroll it in any namespace.
        let snapshot = s.enrollment_snapshot();
        assert_eq!(snapshot.pod_labels_enroll, istio);
        let mut want = vec!["demo"];
        want.extend(istio.then_some("moved"));
        assert_eq!(snapshot.namespaces, want);
        for (p, without, with) in &pods {
            let ip = p["status"]["podIP"].as_str().unwrap();
            let w = s.workload_by_ip(ip.parse().unwrap()).unwrap();
            let want = if istio { *with } else { *without };
            assert_eq!(w.protocol, want, "{ip} istio={istio}");
            let enrolled = want == Protocol::Hbone && ip != istios;
            assert_eq!(s.enrolled(w), enrolled, "{ip} istio={istio}");
        }
    }
    let (st, _) = store_with(
        &[pods[4].0.clone()],
        Rules {
            istio: true,
            ..Default::default()
        },
    );
    let r = st.remote_pods.values().next().unwrap();
    assert_eq!(
        r.labels.len(),
        1,
        "only the enrollment label: {:?}",
        r.labels
    );
    let (st, _) = store_with(
        &[pods[5].0.clone()],
        Rules {
            istio: true,
            ..Default::default()
        },
    );
    let r = st.remote_pods.values().next().unwrap();
    assert_eq!(
        r.other_mesh,
        Some(crate::discovery::enrollment::OtherMesh::IstioAmbient)
    );
}

/// A Service's `istio.io/use-waypoint` and `istio.io/use-waypoint-namespace` labels are
/// kept; under the Istio-compatible setting they (or its namespace's) name the waypoint Istio
/// would send its traffic through. A waypoint's own Service has none.
#[test]
fn a_services_waypoint_label_is_kept() {
    let mut labelled = svc("demo", "w", "10.96.0.2", json!(8080));
    labelled["metadata"]["labels"] =
        json!({"istio.io/use-waypoint": "wp", "istio.io/use-waypoint-namespace": "infra"});
    let mut waypoint = svc("demo", "wp", "10.96.0.3", json!(15008));
    waypoint["metadata"]["labels"] = json!({"istio.io/use-waypoint": "wp",
        "gateway.istio.io/managed": "istio.io-mesh-controller"});
    let objs = vec![
        ns("demo", true),
        svc("demo", "web", "10.96.0.1", json!(8080)),
        labelled,
        waypoint,
    ];
    let (st, refused) = store(&objs);
    assert!(refused.is_empty(), "{refused:?}");
    let rules = Rules {
        istio: true,
        ..Default::default()
    };
    let (s, _) = build("cluster.local", rules, &st);
    let s = s.unwrap();
    let of = |vip: &str| s.waypoint_of(s.service_by_vip(vip.parse().unwrap()).unwrap());
    assert_eq!(of("10.96.0.2").as_deref(), Some("infra/wp"));
    assert_eq!(of("10.96.0.1"), None);
    assert_eq!(of("10.96.0.3"), None, "a waypoint's own Service");
    let (s, _) = build("cluster.local", Rules::default(), &st);
    let s = s.unwrap();
    let svc = s.service_by_vip("10.96.0.2".parse().unwrap()).unwrap();
    assert_eq!(svc.use_waypoint.as_deref(), Some("wp"));
    assert_eq!(
        s.waypoint_of(svc),
        None,
        "without the Istio-compatible setting"
    );
}

/// A pod's own `istio.io/use-waypoint`, `istio.io/use-waypoint-namespace` and
/// `gateway.networking.k8s.io/gateway-name` labels are kept on every node under the
/// Istio-compatible setting (the source's daemon plans with them), and mean nothing without
/// it: a replica of a ready waypoint of its namespace has none.
#[test]
fn a_pods_waypoint_label_is_kept_on_other_nodes_under_istio_compat() {
    let mut remote = pod("demo", "db-0", "n2", "10.0.0.7");
    remote["metadata"]["labels"] = json!({"app": "db", "istio.io/use-waypoint": "wp",
        "istio.io/use-waypoint-namespace": "infra"});
    let mut replica = pod("demo", "wp-0", "n2", "10.0.0.8");
    replica["metadata"]["labels"] = json!({"gateway.networking.k8s.io/gateway-name": "wp"});
    let mut demo = ns("demo", true);
    demo["metadata"]["labels"]["istio.io/use-waypoint"] = json!("wp");
    let gateway = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "demo", "labels": {"istio.io/waypoint-for": "all"}},
        "spec": {"gatewayClassName": "istio-waypoint"},
        "status": {"addresses": [{"type": "IPAddress", "value": "10.96.9.9"}]}});
    let objs = vec![demo, remote, replica, gateway];
    for istio in [false, true] {
        let rules = Rules {
            istio,
            ..Default::default()
        };
        let (st, refused) = store_with(&objs, rules);
        assert!(refused.is_empty(), "{refused:?}");
        let (s, _) = build("cluster.local", rules, &st);
        let s = s.unwrap();
        let w = s.workload_by_ip("10.0.0.7".parse().unwrap()).unwrap();
        let want = istio.then_some("infra/wp");
        assert_eq!(s.workload_waypoint(w).as_deref(), want, "istio={istio}");
        assert!(w.labels.get("app").is_none(), "other labels are dropped");
        let r = s.workload_by_ip("10.0.0.8".parse().unwrap()).unwrap();
        assert_eq!(s.workload_waypoint(r), None, "the waypoint's replica");
        assert_eq!(r.labels.len(), usize::from(istio), "istio={istio}");
    }
}

/// A Gateway is a waypoint once ready (`status.addresses`); it takes what its
/// `istio.io/waypoint-for` label says, else its class's, else Services' traffic. A pod of a
/// namespace whose waypoint takes workloads' traffic goes through it; one whose waypoint is
/// not ready yet is refused too (not known ready); one for Services only leaves it direct.
#[test]
fn gateways_declare_the_waypoints_and_what_they_take() {
    let gw = |ns: &str, name: &str, class: &str, label: Option<&str>, ready: bool| {
        let mut g = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"gatewayClassName": class, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}});
        if let Some(l) = label {
            g["metadata"]["labels"] = json!({"istio.io/waypoint-for": l});
        }
        if ready {
            g["status"] = json!({"addresses": [{"type": "IPAddress", "value": "10.96.9.9"}]});
        }
        g
    };
    let class = |name: &str, label: Option<&str>| {
        let mut c = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
            "metadata": {"name": name}, "spec": {"controllerName": "istio.io/mesh-controller"}});
        if let Some(l) = label {
            c["metadata"]["labels"] = json!({"istio.io/waypoint-for": l});
        }
        c
    };
    let labelled = |name: &str, wp: &str| {
        let mut n = ns(name, true);
        n["metadata"]["labels"]["istio.io/use-waypoint"] = json!(wp);
        n
    };
    let mut objs = vec![
        class("istio-waypoint", None),
        class("all-class", Some("all")),
        gw("a", "wp", "istio-waypoint", None, true),
        gw("b", "wp", "all-class", None, true),
        gw("c", "wp", "all-class", Some("service"), true),
        gw("d", "wp", "istio-waypoint", Some("workload"), false),
        gw("e", "wp", "no-such-class", Some("workload"), true),
        gw("f", "wp", "no-such-class", None, true),
    ];
    let mut ip = 0;
    for n in ["a", "b", "c", "d", "e", "f"] {
        objs.push(labelled(n, "wp"));
        ip += 1;
        objs.push(pod(n, &format!("p{ip}"), NODE, &format!("10.0.1.{ip}")));
    }
    let rules = Rules {
        istio: true,
        ..Default::default()
    };
    let (st, refused) = store_with(&objs, rules);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(st.gateways.len(), 5, "the Gateway not ready is not kept");
    let (s, _) = build("cluster.local", rules, &st);
    let s = s.unwrap();
    let through = |ip: &str| {
        let w = s.workload_by_ip(ip.parse().unwrap()).unwrap();
        s.workload_waypoint(w)
    };
    assert_eq!(through("10.0.1.1"), None, "Services only, by default");
    assert_eq!(
        through("10.0.1.2").as_deref(),
        Some("b/wp"),
        "its class says all"
    );
    assert_eq!(
        through("10.0.1.3"),
        None,
        "its own label wins over its class"
    );
    assert_eq!(through("10.0.1.4").as_deref(), Some("d/wp"), "not ready");
    assert_eq!(
        through("10.0.1.5").as_deref(),
        Some("e/wp"),
        "its own label"
    );
    assert_eq!(
        through("10.0.1.6").as_deref(),
        Some("f/wp"),
        "its class not known: every kind"
    );

    let mut bad = gw("g", "wp", "x", None, true);
    bad["spec"] = json!({});
    let (_, refused) = store_with(&[bad], rules);
    assert_eq!(
        refused.len(),
        1,
        "a ready Gateway without a class is refused"
    );
}

/// Istio's ServiceEntries and WorkloadEntries, as the API server returns them, declare
/// addresses whose waypoints the plan asks about: a ServiceEntry's (its namespace's waypoint,
/// for Services) and a WorkloadEntry's (its own label). One whose address Istio cannot
/// parse is refused.
#[test]
fn service_and_workload_entries_declare_addresses_behind_waypoints() {
    let gw = |ns: &str, waypoint_for: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "wp", "namespace": ns, "labels": {"istio.io/waypoint-for": waypoint_for}},
            "spec": {"gatewayClassName": "istio-waypoint"},
            "status": {"addresses": [{"type": "IPAddress", "value": "10.96.9.9"}]}})
    };
    let mut egress = ns("egress", false);
    egress["metadata"]["labels"] = json!({"istio.io/use-waypoint": "wp"});
    let objs = [
        ns("vms", false),
        egress,
        gw("egress", "service"),
        gw("vms", "workload"),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "ext", "namespace": "egress"},
            "spec": {"hosts": ["ext.example"], "addresses": ["192.0.2.0/24"],
                     "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                     "resolution": "NONE"}}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "vm-1", "namespace": "vms",
                         "labels": {"istio.io/use-waypoint": "wp"}},
            "spec": {"address": "198.51.100.7", "serviceAccount": "vm"}}),
    ];
    let (st, s) = istio_state(&objs);
    let at = |ip: &str| s.entry_waypoint(ip.parse().unwrap(), "client-ns", None);
    assert_eq!(
        at("192.0.2.80"),
        Some((
            "ServiceEntry egress/ext (192.0.2.0/24)".into(),
            "egress/wp".into()
        ))
    );
    assert_eq!(
        at("198.51.100.7"),
        Some((
            "WorkloadEntry vms/vm-1 (198.51.100.7/32)".into(),
            "vms/wp".into()
        ))
    );
    assert_eq!(at("198.51.100.8"), None);
    let (s, _) = build("cluster.local", Rules::default(), &st);
    assert_eq!(
        s.unwrap()
            .entry_waypoint("192.0.2.80".parse().unwrap(), "c", None),
        None,
        "without the setting"
    );

    let bad = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "bad", "namespace": "egress"},
        "spec": {"hosts": ["bad.example"], "addresses": ["not-an-ip"]}});
    let istio = Rules {
        istio: true,
        ..Default::default()
    };
    let (_, refused) = store_with(&[bad], istio);
    assert_eq!(refused.len(), 1, "{refused:?}");
}

/// A Gateway's listeners say which namespaces may use it as their waypoint
/// (`allowedRoutes.namespaces`); a namespace they do not let attach reaches its pods directly,
/// as in Istio.
#[test]
fn a_gateways_listeners_say_who_may_attach() {
    let shared = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "shared", "namespace": "infra", "labels": {"istio.io/waypoint-for": "all"}},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
            {"name": "mesh", "port": 15008, "protocol": "HBONE",
             "allowedRoutes": {"namespaces": {"from": "Selector",
                                              "selector": {"matchLabels": {"team": "a"}}}}}]},
        "status": {"addresses": [{"type": "IPAddress", "value": "10.96.9.9"}]}});
    let team = |name: &str, team: &str| {
        let mut n = ns(name, true);
        n["metadata"]["labels"]["team"] = json!(team);
        n["metadata"]["labels"]["istio.io/use-waypoint"] = json!("shared");
        n["metadata"]["labels"]["istio.io/use-waypoint-namespace"] = json!("infra");
        n
    };
    let objs = [
        shared,
        team("a", "a"),
        team("b", "b"),
        pod("a", "pa", NODE, "10.0.1.1"),
        pod("b", "pb", NODE, "10.0.1.2"),
    ];
    let (_, s) = istio_state(&objs);
    let through = |ip: &str| {
        let w = s.workload_by_ip(ip.parse().unwrap()).unwrap();
        s.workload_waypoint(w)
    };
    assert_eq!(through("10.0.1.1").as_deref(), Some("infra/shared"));
    assert_eq!(through("10.0.1.2"), None, "not let attach");
}

/// The store and state of `objs` under the Istio-compatible setting, none of them refused.
fn istio_state(objs: &[serde_json::Value]) -> (Store, crate::discovery::State) {
    let rules = Rules {
        istio: true,
        ..Default::default()
    };
    let (st, refused) = store_with(objs, rules);
    assert!(refused.is_empty(), "{refused:?}");
    let (s, _) = build("cluster.local", rules, &st);
    (st, s.unwrap())
}
