//! The Istio-compatible setting (`ZTUNNEL_ISTIO_COMPAT=true`, as `deploy/istio-compat` sets
//! it) on the in-pod bed with its daemons on the real API server, with Istio's own
//! `security.istio.io` CRDs installed as Istio publishes them (`tools/istio/crds.sh`) and the
//! overlay's RBAC. Needs root, `ip`, `nft`, `containernetworking-plugins`, Go and the control
//! plane that `scripts/prereqs.sh` builds.
//!
//! - `istios_objects_and_labels_are_enforced`: a `security.istio.io/v1` AuthorizationPolicy
//!   in an enrolled namespace refuses the tunnel streams it denies (the source's daemon is
//!   answered 401, the application sees nothing, the destination's access log names
//!   `istio:<ns>/<name>`) and lets the rest through; a `security.istio.io/v1` STRICT
//!   PeerAuthentication in Istio's root namespace (`istio-system`) refuses a plaintext pod
//!   mesh-wide until it is deleted; a namespace labelled `istio.io/dataplane-mode=ambient`
//!   has its running pod enrolled, and that pod's own `istio.io/dataplane-mode=none` label
//!   releases it; with the Gateway API's CRDs installed, a pod of a namespace whose waypoint
//!   (a Gateway) is not ready yet, or takes workloads' traffic, is refused when addressed
//!   directly, and reached when the waypoint takes Services' only; an address outside the
//!   mesh that an Istio WorkloadEntry of that namespace declares is refused until the entry
//!   opts out, and one in a ServiceEntry's range once the waypoint takes Services' traffic
//!   too; the overlay's Istio grants are all used and nothing was forbidden.
//! - `istio_compat_refuses_to_start_without_each_grant`: a daemon that may not list the
//!   kinds of one of the groups the overlay grants (Istio's policies, its ServiceEntries and
//!   WorkloadEntries, the Gateway API's), where they are served, refuses to start.

use std::time::Duration;

use serde_json::json;
use ztunnel_e2e::apps;
use ztunnel_e2e::controlplane::{self, SYSTEM_NAMESPACE};
use ztunnel_e2e::daemon::{access_lines, metric};
use ztunnel_e2e::kubebed::{has_table, spec, wait_for, whoami, Pause};
use ztunnel_e2e::testbed::TestBed;

#[test]
fn istios_objects_and_labels_are_enforced() {
    let cp = controlplane::shared()
        .install_base()
        .install_istio_crds()
        .install_gateway_api_crds();
    cp.apply_kustomization(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/istio-compat"),
    )
    .expect("deploy/istio-compat applied");
    let bed = TestBed::builder()
        .pods(vec![
            spec("client", "demo", 0, "10.20.1.10"),
            spec("server", "demo", 1, "10.20.2.10"),
            spec("legacy", "plain", 0, "10.20.1.11"),
        ])
        .daemon_env(&[("ZTUNNEL_ISTIO_COMPAT", "true")])
        .kube(json!({}))
        .try_start()
        .expect("the bed on the real API server");
    let demo = bed.api_namespace("demo");
    let plain = bed.api_namespace("plain");
    for port in [8080, 9090] {
        bed.pod("server").ns.serve_dual(port, apps::whoami_server);
    }
    bed.pod("legacy").ns.serve_dual(8080, apps::whoami_server);
    wait_for("the server app", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_ok()
    });

    // Istio's AuthorizationPolicy, enforced as ours would be, named as Istio's.
    let accepted = |bed: &TestBed| {
        access_lines(&bed.log(1))
            .iter()
            .filter(|l| l["direction"] == "inbound" && l["dst_port"] == 9090)
            .count()
    };
    cp.apply(
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-9090", "namespace": demo},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                 "rules": [{"to": [{"operation": {"ports": ["9090"]}}]}]}}),
    )
    .expect("an Istio AuthorizationPolicy");
    let refused = |bed: &TestBed| {
        metric(
            &bed.metrics(0),
            "ztunnel_refusals_total",
            &[("reason", "outbound_denied_by_destination")],
        )
    };
    wait_for("Istio's DENY to be enforced", || {
        whoami(&bed, "client", "10.20.2.10", 9090).is_err()
    });
    assert!(refused(&bed) >= 1.0, "the source's daemon was answered 401");
    let before = accepted(&bed);
    assert!(whoami(&bed, "client", "10.20.2.10", 9090).is_err());
    assert_eq!(
        whoami(&bed, "client", "10.20.2.10", 8080).unwrap(),
        "10.20.1.10",
        "what the policy does not cover still passes"
    );
    let name = format!("istio:{demo}/no-9090");
    wait_for("the access log naming Istio's policy", || {
        access_lines(&bed.log(1))
            .iter()
            .any(|l| l["decision"] == "deny" && l["policy"] == name.as_str())
    });
    assert_eq!(
        accepted(&bed),
        before,
        "the denied connection was never accepted"
    );

    // Istio's root namespace: a STRICT PeerAuthentication there is mesh-wide.
    cp.create_namespace("istio-system", json!({}))
        .expect("istio-system");
    assert_eq!(
        whoami(&bed, "legacy", "10.20.2.10", 8080).unwrap(),
        "10.20.1.11",
        "plaintext is let in before"
    );
    cp.apply(
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}}}),
    )
    .expect("an Istio PeerAuthentication");
    wait_for("mesh-wide STRICT from Istio's root namespace", || {
        whoami(&bed, "legacy", "10.20.2.10", 8080).is_err()
    });
    assert_eq!(
        whoami(&bed, "client", "10.20.2.10", 8080).unwrap(),
        "10.20.1.10",
        "mutual TLS still passes"
    );
    cp.delete(
        "security.istio.io/v1",
        "PeerAuthentication",
        Some("istio-system"),
        "default",
    )
    .expect("delete");
    wait_for("plaintext let in again", || {
        whoami(&bed, "legacy", "10.20.2.10", 8080).is_ok()
    });

    // Istio's namespace label enrolls the running pod; its own `none` label releases it.
    let _pause = Pause::of(&bed, "legacy");
    assert!(!has_table(&bed.pod("legacy").ns));
    bed.label_namespace("plain", json!({"istio.io/dataplane-mode": "ambient"}))
        .unwrap();
    wait_for("legacy enrolled by Istio's namespace label", || {
        has_table(&bed.pod("legacy").ns)
    });
    let legacy_id = format!("spiffe://cluster.local/ns/{plain}/sa/legacy");
    wait_for("the client's daemon to see legacy in the mesh", || {
        whoami(&bed, "client", "10.20.1.11", 8080).is_ok()
    });
    wait_for("a tunnel into legacy in the access log", || {
        access_lines(&bed.log(0)).iter().any(|l| {
            l["message"] == "connection closed"
                && l["direction"] == "inbound"
                && l["dst_identity"] == legacy_id.as_str()
        })
    });
    cp.kubectl(&[
        "label",
        "pod",
        "-n",
        &plain,
        "legacy",
        "istio.io/dataplane-mode=none",
    ])
    .expect("label the pod");
    wait_for("legacy released by its own label", || {
        !has_table(&bed.pod("legacy").ns)
    });

    // A namespace's waypoint, declared by a Gateway: once ready and taking workloads'
    // traffic, a pod of the namespace addressed directly is refused (Istio would send the
    // connection through the waypoint); taking Services' traffic only, it is reached again.
    cp.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": "istio-waypoint"},
        "spec": {"controllerName": "istio.io/mesh-controller"}}),
    )
    .expect("a GatewayClass");
    let gateway = |waypoint_for: &str| {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": demo,
                         "labels": {"istio.io/waypoint-for": waypoint_for}},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
    };
    cp.apply(gateway("workload")).expect("a Gateway");
    cp.kubectl(&[
        "label",
        "namespace",
        &demo,
        "istio.io/use-waypoint=waypoint",
    ])
    .expect("label the namespace");
    let no_route = |bed: &TestBed| {
        metric(
            &bed.metrics(0),
            "ztunnel_refusals_total",
            &[("reason", "outbound_no_route")],
        )
    };
    wait_for("a waypoint not ready yet to be taken as one", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_err()
    });
    cp.apply_status(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": demo},
        "status": {"addresses": [{"type": "IPAddress", "value": "10.96.200.1"}]}}),
    )
    .expect("the Gateway ready");
    cp.apply(gateway("service"))
        .expect("the Gateway for Services");
    wait_for(
        "a pod reached directly past a waypoint for Services",
        || whoami(&bed, "client", "10.20.2.10", 8080).is_ok(),
    );
    let waypoint = format!("{demo}/waypoint");
    let named = |bed: &TestBed| bed.log(0).matches(waypoint.as_str()).count();
    let (before, logged) = (no_route(&bed), named(&bed));
    cp.apply(gateway("workload"))
        .expect("the Gateway for workloads");
    // Refused, counted as outbound_no_route, and the log names the waypoint.
    wait_for("a pod behind its namespace's waypoint refused", || {
        whoami(&bed, "client", "10.20.2.10", 8080).is_err()
            && no_route(&bed) > before
            && named(&bed) > logged
    });

    // Istio's WorkloadEntry and ServiceEntry. An address no pod or Service has (a second one
    // on `legacy`) is reached directly until a WorkloadEntry of the namespace declares it (its
    // waypoint takes workloads' traffic), and again once the entry opts out; a ServiceEntry's
    // range that holds it is refused once the waypoint takes Services' traffic too.
    let vm = "10.20.1.50";
    bed.pod("legacy")
        .ns
        .ip(&["addr", "add", &format!("{vm}/24"), "dev", "eth0"])
        .expect("a second address");
    wait_for("an address outside the mesh reached", || {
        whoami(&bed, "client", vm, 8080).is_ok()
    });
    let workload_entry = |labels: serde_json::Value| {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "vm", "namespace": demo, "labels": labels},
            "spec": {"address": vm, "serviceAccount": "vm"}})
    };
    cp.apply(workload_entry(json!({})))
        .expect("a WorkloadEntry");
    let entry = format!("WorkloadEntry {demo}/vm");
    wait_for(
        "a WorkloadEntry behind its namespace's waypoint refused",
        || whoami(&bed, "client", vm, 8080).is_err() && bed.log(0).contains(&entry),
    );
    cp.apply(workload_entry(json!({"istio.io/use-waypoint": "none"})))
        .expect("the WorkloadEntry opted out");
    wait_for("an opted-out WorkloadEntry reached", || {
        whoami(&bed, "client", vm, 8080).is_ok()
    });
    cp.kubectl(&[
        "delete",
        "workloadentries.networking.istio.io",
        "-n",
        &demo,
        "vm",
    ])
    .expect("the WorkloadEntry deleted");
    cp.apply(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "vms", "namespace": demo},
        "spec": {"hosts": ["vms.example"], "addresses": ["10.20.1.48/29"],
                 "ports": [{"number": 8080, "name": "tcp", "protocol": "TCP"}],
                 "resolution": "NONE"}}),
    )
    .expect("a ServiceEntry");
    cp.apply(gateway("all")).expect("the Gateway for all");
    let entry = format!("ServiceEntry {demo}/vms (10.20.1.48/29)");
    wait_for(
        "a ServiceEntry's range behind its namespace's waypoint refused",
        || whoami(&bed, "client", vm, 8080).is_err() && bed.log(0).contains(&entry),
    );

    // The overlay's RBAC: Istio's kinds listed and watched, nothing forbidden (the API server
    // writes its audit log a moment after each request: read until it shows them).
    let problems = || -> Vec<String> {
        cp.rbac_problems_in("istio-compat", SYSTEM_NAMESPACE, "ztunnel")
            .expect("audit log")
            .into_iter()
            .filter(|p| {
                p.contains("security.istio.io")
                    || p.contains("networking.istio.io")
                    || p.contains("gateway.networking.k8s.io")
                    || p.contains("forbidden")
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !problems().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let problems = problems();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Where Istio's CRDs and the Gateway API are served, a daemon under `--istio-compat` that
/// may not list the kinds of one of the groups it reads refuses to start, naming what it could
/// not list, rather than run without knowing Istio's policies, entries or waypoints.
#[test]
fn istio_compat_refuses_to_start_without_each_grant() {
    let cp = controlplane::shared()
        .install_base()
        .install_istio_crds()
        .install_gateway_api_crds();
    let dir = tempfile::tempdir().unwrap();
    for (group, resources) in controlplane::ISTIO_GRANTS {
        let kc = cp
            .istio_kubeconfig_without(dir.path(), "grants-n1", group)
            .unwrap();
        let error = match cp.istio_discovery(&kc, "grants-n1") {
            Err(e) => e,
            Ok(_) => panic!("the watchers started without reading {group}"),
        };
        let named = format!("--istio-compat: cannot list {group}/v1 {}", resources[0]);
        assert!(
            error.contains(&named) && error.contains("forbidden"),
            "{group}: {error}"
        );
    }
}
