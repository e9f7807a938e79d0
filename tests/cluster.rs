//! `deploy/` on the real Kubernetes control plane (`harness::controlplane`): what the API
//! server itself enforces on our objects.
//!
//! - `deploy_base_is_accepted_and_policies_keep_every_field`: `deploy/base` applies
//!   server-side; an `AuthorizationPolicy` with HTTP fields created without strict field
//!   validation (the API server's default for clients that do not ask, and for GitOps tools
//!   that turn validation off) comes back with every field: nothing pruned, so the daemon sees
//!   what the user wrote.
//! - `the_api_server_refuses_what_its_schema_can_tell_is_wrong`: ports that are not numbers
//!   of 0–65535, blocks that are not addresses or CIDRs, a selector beside a `targetRef`, an
//!   unknown action or mode, port-level mTLS without a selector: each refused by the API
//!   server itself (schema patterns and CEL rules), with the reason; the valid forms accepted.
//! - `the_admission_policy_keeps_the_daemon_to_its_annotation_on_its_node`: with a token bound
//!   to a daemon pod on node A (as the DaemonSet's projected token is), the daemon's
//!   ServiceAccount may write the enrollment annotation of a pod on A, and nothing else: a pod
//!   on node B, a label, another annotation or the image are refused by the
//!   `ValidatingAdmissionPolicy`.
//! - `ztunnel_removed_reads_its_own_daemonset_with_the_installers_credentials`: the check the
//!   CNI installer runs when stopped reads the DaemonSet with the installer's own token
//!   (present), counts a `403` as removed, and an unreachable API server as unknown.

use std::time::Duration;

use serde_json::{json, Value};
use ztunnel_e2e::controlplane::{self, ControlPlane, KubePod};

const ANNOTATION: &str = "ztunnel.dev/enrollment";

/// A client for the API server with `token`, on the cp host.
fn client_with_token(cp: &ControlPlane, token: &str) -> kube::Client {
    let kc = controlplane::kubeconfig(&cp.dir.join("ca.crt"), &cp.url(), json!({"token": token}));
    cp.ns.block_on(async move {
        let kc: kube::config::Kubeconfig = serde_saphyr::from_str(&kc).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    })
}

#[test]
fn deploy_base_is_accepted_and_policies_keep_every_field() {
    let cp = controlplane::shared().install_base();
    for (kind, name) in [
        ("crd", "authorizationpolicies.security.ztunnel.dev"),
        ("crd", "peerauthentications.security.ztunnel.dev"),
        ("validatingadmissionpolicy", "ztunnel-daemon-pod-writes"),
        ("clusterrole", "ztunnel"),
        ("clusterrole", "ztunnel-ca"),
    ] {
        cp.kubectl(&["get", kind, name])
            .unwrap_or_else(|e| panic!("{kind} {name} is missing after applying deploy/base: {e}"));
    }
    let ns = cp.namespace("prune");
    cp.create_namespace(&ns, json!({})).unwrap();
    let spec = json!({
        "selector": {"matchLabels": {"app": "web"}},
        "action": "ALLOW",
        "rules": [{
            "from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"],
                                 "requestPrincipals": ["issuer/subject"]}}],
            "to": [{"operation": {"methods": ["GET"], "paths": ["/admin"], "ports": ["8080"]}}],
            "when": [{"key": "request.headers[x-token]", "values": ["t"]}],
        }],
    });
    let policy = json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "http-fields", "namespace": ns}, "spec": spec});
    // A plain create, as a client that does not ask for strict field validation sends it.
    let created: Value = cp.run(|client| {
        let ns = ns.clone();
        async move {
            let ar = kube::discovery::ApiResource::from_gvk_with_plural(
                &kube::core::GroupVersionKind::gvk(
                    "security.ztunnel.dev",
                    "v1",
                    "AuthorizationPolicy",
                ),
                "authorizationpolicies",
            );
            let api: kube::Api<kube::api::DynamicObject> =
                kube::Api::namespaced_with(client, &ns, &ar);
            let obj: kube::api::DynamicObject = serde_json::from_value(policy).unwrap();
            let got = api.create(&Default::default(), &obj).await.unwrap();
            serde_json::to_value(got).unwrap()
        }
    });
    assert_eq!(
        created["spec"], spec,
        "the API server pruned fields of the policy"
    );
    let stored = cp
        .get(
            "security.ztunnel.dev/v1",
            "AuthorizationPolicy",
            Some(&ns),
            "http-fields",
        )
        .unwrap();
    assert_eq!(stored["spec"], spec);
}

#[test]
fn the_api_server_refuses_what_its_schema_can_tell_is_wrong() {
    let cp = controlplane::shared().install_base();
    let ns = cp.namespace("schema");
    cp.create_namespace(&ns, json!({})).unwrap();
    let ap = |name: &str, spec: Value| {
        json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": ns}, "spec": spec})
    };
    let pa = |name: &str, spec: Value| {
        json!({"apiVersion": "security.ztunnel.dev/v1", "kind": "PeerAuthentication",
               "metadata": {"name": name, "namespace": ns}, "spec": spec})
    };
    let port_rule = |port: &str| json!({"rules": [{"to": [{"operation": {"ports": [port]}}]}]});
    let block_rule =
        |block: &str| json!({"rules": [{"from": [{"source": {"ipBlocks": [block]}}]}]});
    let refused = [
        (ap("named-port", port_rule("http")), "ports"),
        (ap("big-port", port_rule("65536")), "ports"),
        (ap("negative-port", port_rule("-1")), "ports"),
        (ap("bad-prefix", block_rule("10.0.0.0/33")), "ipBlocks"),
        (ap("not-an-ip", block_rule("10.0.0.256")), "ipBlocks"),
        (
            ap("zone-in-prefix", block_rule("fe80::1%eth0/64")),
            "ipBlocks",
        ),
        (ap("bad-action", json!({"action": "PERMIT"})), "action"),
        (
            ap(
                "accounts-beside-namespaces",
                json!({"rules": [{"from": [{"source": {"namespaces": ["a"], "serviceAccounts": []}}]}]}),
            ),
            "cannot be set with principals or namespaces",
        ),
        (
            ap(
                "accounts-beside-principals",
                json!({"rules": [{"from": [{"source": {"notPrincipals": ["td/ns/a/sa/b"], "notServiceAccounts": ["a/b"]}}]}]}),
            ),
            "cannot be set with principals or namespaces",
        ),
        (
            ap(
                "both-targets",
                json!({"selector": {"matchLabels": {"app": "a"}},
                       "targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "g"}}),
            ),
            "only one of targetRefs or selector",
        ),
        (
            pa("bad-mode", json!({"mtls": {"mode": "SOMETIMES"}})),
            "mode",
        ),
        (
            pa(
                "port-level-without-selector",
                json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
            ),
            "port level mTLS",
        ),
    ];
    for (object, why) in refused {
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let e = cp.apply(object).expect_err(&format!("{name} was accepted"));
        let e = format!("{e:#}");
        assert!(e.contains(why), "{name}: refused for another reason: {e}");
    }
    cp.apply(json!([
        ap("ok-port", port_rule("8080")),
        ap("ok-block", block_rule("10.0.0.0/8")),
        ap("ok-block6", block_rule("fd00::/8")),
        // An address with a zone, as Istio takes it (the zone is dropped).
        ap("ok-zone", block_rule("fe80::1%eth0")),
        ap(
            "ok-accounts",
            json!({"rules": [{"from": [{"source": {"serviceAccounts": ["a/b"], "notIpBlocks": ["10.0.0.1"]}}]}]}),
        ),
        pa("ok-mode", json!({"mtls": {"mode": "DISABLE"}})),
    ]))
    .expect("the valid forms");
}

#[test]
fn the_admission_policy_keeps_the_daemon_to_its_annotation_on_its_node() {
    let cp = controlplane::shared().install_base();
    let ns = cp.namespace("vap");
    cp.create_namespace(&ns, json!({})).unwrap();
    let (node_a, node_b) = (format!("{ns}-a"), format!("{ns}-b"));
    cp.run_pod(&KubePod::running(
        &ns,
        "on-a",
        "web",
        &node_a,
        &["10.99.1.1"],
    ))
    .unwrap();
    cp.run_pod(&KubePod::running(
        &ns,
        "on-b",
        "web",
        &node_b,
        &["10.99.1.2"],
    ))
    .unwrap();
    let daemon_pod = format!("ztunnel-{node_a}");
    let token = cp
        .system_pod_token("ztunnel", &daemon_pod, &node_a, &[controlplane::ISSUER])
        .unwrap();
    let daemon = client_with_token(cp, &token);
    let patch = |pod: &str, body: Value| -> Result<(), String> {
        let (daemon, ns, pod) = (daemon.clone(), ns.clone(), pod.to_string());
        cp.ns.block_on(async move {
            let api: kube::Api<k8s_openapi::api::core::v1::Pod> =
                kube::Api::namespaced(daemon, &ns);
            api.patch(
                &pod,
                &Default::default(),
                &kube::api::Patch::Strategic(&body),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    };
    let annotate = |value: &str| json!({"metadata": {"annotations": {ANNOTATION: value}}});

    patch("on-a", annotate("enrolled")).expect("the annotation on the daemon's own node");
    patch(
        "on-a",
        json!({"metadata": {"annotations": {ANNOTATION: null}}}),
    )
    .expect("removing it");
    let refused: Vec<(&str, Value, &str)> = vec![
        ("on-b", annotate("enrolled"), "only pods on its own node"),
        (
            "on-a",
            json!({"metadata": {"labels": {"app": "evil"}}}),
            "only the ztunnel.dev/enrollment annotation",
        ),
        (
            "on-a",
            json!({"metadata": {"annotations": {"other": "x"}}}),
            "only the ztunnel.dev/enrollment annotation",
        ),
        (
            "on-a",
            json!({"spec": {"containers": [{"name": "app", "image": "registry.invalid/evil"}]}}),
            "only the ztunnel.dev/enrollment annotation",
        ),
    ];
    // The API server loads admission policies within a second or so of their creation
    // (deploy/base may have just been applied): wait for the first refusal.
    controlplane::wait_until(
        "the admission policy in force",
        Duration::from_secs(10),
        || patch("on-b", annotate("probe")).is_err(),
    )
    .unwrap();
    for (pod, body, why) in refused {
        let e = patch(pod, body.clone()).expect_err(&format!("{pod}: {body} was let through"));
        assert!(
            e.contains(why),
            "{pod}: {body}: refused for another reason: {e}"
        );
    }
    let on_a = cp.get("v1", "Pod", Some(&ns), "on-a").unwrap();
    assert_eq!(on_a["metadata"]["labels"]["app"], "on-a");
    assert_eq!(
        on_a["spec"]["containers"][0]["image"],
        "registry.invalid/app"
    );
    // The policy binds the daemon only: the admin still may.
    cp.kubectl(&["label", "pod", "-n", &ns, "on-b", "tier=x"])
        .expect("the admin labels a pod");
}

/// `ztunnel removed`, as the CNI installer runs it when stopped, with the credentials the
/// installer container has (the daemon's ServiceAccount, a token bound to its pod):
/// `deploy/base`'s Role lets it read its own DaemonSet, which is there (exit 1); a DaemonSet
/// it may not read counts as removed (`403`, exit 0), as when the installation's RBAC is
/// deleted; an API server it cannot reach tells nothing (exit 2).
#[test]
fn ztunnel_removed_reads_its_own_daemonset_with_the_installers_credentials() {
    let cp = controlplane::shared().install_base();
    let node = cp.namespace("removed-node");
    let token = cp
        .system_pod_token(
            "ztunnel",
            &format!("ztunnel-{node}"),
            &node,
            &[controlplane::ISSUER],
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = cp
        .token_kubeconfig(dir.path(), "installer", &token)
        .unwrap();
    let unreachable = dir.path().join("unreachable");
    std::fs::write(
        &unreachable,
        controlplane::kubeconfig(
            &cp.dir.join("ca.crt"),
            "https://127.0.0.1:1",
            json!({"token": token}),
        ),
    )
    .unwrap();
    let removed = |daemonset: &str, kubeconfig: &std::path::Path| {
        ztunnel_e2e::daemon::ztunnel_removed(&cp.ns, daemonset, kubeconfig)
    };
    let (code, said) = removed("ztunnel-system/ztunnel", &kc);
    assert_eq!(code, Some(1), "its own DaemonSet is there: {said}");
    let (code, said) = removed("kube-system/kube-proxy", &kc);
    assert_eq!(code, Some(0), "not readable counts as removed: {said}");
    assert!(said.contains("403"), "{said}");
    let (code, said) = removed("ztunnel-system/ztunnel", &unreachable);
    assert_eq!(code, Some(2), "nothing to conclude: {said}");
}
