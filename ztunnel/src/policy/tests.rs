//! Table-driven tests of the engine: every field and its `not` form, wildcards, DENY
//! precedence, selector vs namespace vs mesh-wide scope, empty rules, several ALLOWs,
//! plaintext peers, and peer-authentication modes.

use std::sync::Arc;

use super::objects::{MtlsMode, PolicyObject};
use super::*;
use crate::labels::Labels;

fn policies(yaml: &str) -> PolicyIndex {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_str_with_options(yaml, crate::yaml::options()).unwrap();
    let (mut authz, mut pa) = (Vec::new(), Vec::new());
    for d in docs {
        match PolicyObject::from_value(d).unwrap() {
            PolicyObject::Authorization(a) => authz.push(a),
            PolicyObject::PeerAuthentication(p) => pa.push(p),
        }
    }
    PolicyIndex::build(&authz, &pa, &[ROOT_NAMESPACE])
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (Arc::from(*k), Arc::from(*v)))
        .collect::<Labels>()
}

/// A connection: source principal (None = plaintext), source IP, destination namespace,
/// destination labels, destination port.
struct C {
    principal: Option<&'static str>,
    ip: &'static str,
    ns: &'static str,
    labels: Labels,
    port: u16,
}

fn c(
    principal: Option<&'static str>,
    ip: &'static str,
    ns: &'static str,
    app: &str,
    port: u16,
) -> C {
    C {
        principal,
        ip,
        ns,
        labels: labels(&[("app", app)]),
        port,
    }
}

fn decide(idx: &PolicyIndex, c: &C) -> Decision {
    let src_ns = c.principal.map(|p| p.split('/').nth(2).unwrap());
    idx.evaluate(&Conn {
        src_principal: c.principal,
        src_namespace: src_ns,
        src_ip: c.ip.parse().unwrap(),
        dst_ip: "10.9.9.9".parse().unwrap(),
        dst_namespace: c.ns,
        dst_labels: &c.labels,
        dst_port: c.port,
    })
}

const FOO: Option<&str> = Some("cluster.local/ns/foo/sa/client");
const BAR: Option<&str> = Some("cluster.local/ns/bar/sa/client");
const PLAIN: Option<&str> = None;

/// (policies, connection, allowed, deciding policy name or "", reason)
type Case = (&'static str, C, bool, &'static str, Reason);

fn run(cases: Vec<Case>) {
    for (i, (yaml, conn, allowed, by, reason)) in cases.into_iter().enumerate() {
        let d = decide(&policies(yaml), &conn);
        assert_eq!(d.allowed, allowed, "case {i}: {d:?}");
        assert_eq!(d.reason, reason, "case {i}: {d:?}");
        let name = d
            .policy
            .as_ref()
            .map(|p| p.name.to_string())
            .unwrap_or_default();
        assert_eq!(name, by, "case {i}: {d:?}");
    }
}

fn allow(ns: &str, spec: &str) -> String {
    format!("- {{apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {{name: a, namespace: {ns}}}, spec: {{action: ALLOW, {spec}}}}}\n")
}

fn deny(ns: &str, spec: &str) -> String {
    format!("- {{apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {{name: d, namespace: {ns}}}, spec: {{action: DENY, {spec}}}}}\n")
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[test]
fn every_field_and_its_not_form() {
    use Reason::*;
    let principals = leak(allow(
        "web",
        "rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/client]}}]}]",
    ));
    let not_principals = leak(allow(
        "web",
        "rules: [{from: [{source: {notPrincipals: [cluster.local/ns/foo/sa/client]}}]}]",
    ));
    let namespaces = leak(allow(
        "web",
        "rules: [{from: [{source: {namespaces: [foo]}}]}]",
    ));
    let not_namespaces = leak(allow(
        "web",
        "rules: [{from: [{source: {notNamespaces: [foo]}}]}]",
    ));
    let ip_blocks = leak(allow(
        "web",
        "rules: [{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]",
    ));
    let not_ip_blocks = leak(allow(
        "web",
        "rules: [{from: [{source: {notIpBlocks: [10.1.0.0/16]}}]}]",
    ));
    let ports = leak(allow(
        "web",
        "rules: [{to: [{operation: {ports: ['8080']}}]}]",
    ));
    let not_ports = leak(allow(
        "web",
        "rules: [{to: [{operation: {notPorts: ['8080']}}]}]",
    ));
    run(vec![
        (
            principals,
            c(FOO, "10.1.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            principals,
            c(BAR, "10.1.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            principals,
            c(PLAIN, "10.1.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            not_principals,
            c(FOO, "10.1.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            not_principals,
            c(BAR, "10.1.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        // A plaintext peer has no principal, so it is not one of those excluded: Istio's
        // ztunnel (src/rbac.rs) matches `notPrincipals` for it, in ALLOW as in DENY.
        (
            not_principals,
            c(PLAIN, "10.1.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            namespaces,
            c(FOO, "10.1.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            namespaces,
            c(BAR, "10.1.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            not_namespaces,
            c(FOO, "10.1.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            not_namespaces,
            c(BAR, "10.1.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            ip_blocks,
            c(BAR, "10.1.9.9", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            ip_blocks,
            c(BAR, "10.2.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            ip_blocks,
            c(PLAIN, "10.1.9.9", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            not_ip_blocks,
            c(BAR, "10.1.9.9", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            not_ip_blocks,
            c(BAR, "10.2.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            ports,
            c(BAR, "10.2.0.1", "web", "web", 8080),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            ports,
            c(BAR, "10.2.0.1", "web", "web", 9090),
            false,
            "",
            NoAllowMatched,
        ),
        (
            not_ports,
            c(BAR, "10.2.0.1", "web", "web", 8080),
            false,
            "",
            NoAllowMatched,
        ),
        (
            not_ports,
            c(BAR, "10.2.0.1", "web", "web", 9090),
            true,
            "a",
            AllowedByPolicy,
        ),
    ]);
}

#[test]
fn wildcards_deny_precedence_and_plaintext_fail_closed() {
    use Reason::*;
    let wildcard = leak(allow(
        "web",
        "rules: [{from: [{source: {principals: ['cluster.local/ns/foo/sa/*']}}]}]",
    ));
    let any = leak(allow(
        "web",
        "rules: [{from: [{source: {principals: ['*']}}]}]",
    ));
    let both = leak(format!(
        "{}{}",
        allow("web", "rules: [{}]"),
        deny("web", "rules: [{from: [{source: {namespaces: [foo]}}]}]")
    ));
    let deny_not = leak(deny(
        "web",
        "rules: [{from: [{source: {notPrincipals: ['cluster.local/ns/foo/*']}}]}]",
    ));
    let and = leak(allow("web", "rules: [{from: [{source: {namespaces: [foo], ipBlocks: [10.1.0.0/16]}}], to: [{operation: {ports: ['80']}}]}]"));
    run(vec![
        (
            wildcard,
            c(FOO, "10.0.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            wildcard,
            c(BAR, "10.0.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            any,
            c(BAR, "10.0.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            any,
            c(PLAIN, "10.0.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            both,
            c(FOO, "10.0.0.1", "web", "web", 80),
            false,
            "d",
            DeniedByPolicy,
        ),
        (
            both,
            c(BAR, "10.0.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            deny_not,
            c(FOO, "10.0.0.1", "web", "web", 80),
            true,
            "",
            NoPolicy,
        ),
        (
            deny_not,
            c(BAR, "10.0.0.1", "web", "web", 80),
            false,
            "d",
            DeniedByPolicy,
        ),
        (
            deny_not,
            c(PLAIN, "10.0.0.1", "web", "web", 80),
            false,
            "d",
            DeniedByPolicy,
        ),
        (
            and,
            c(FOO, "10.1.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            and,
            c(FOO, "10.2.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            and,
            c(FOO, "10.1.0.1", "web", "web", 81),
            false,
            "",
            NoAllowMatched,
        ),
    ]);
}

#[test]
fn scopes_empty_rules_and_several_allows() {
    use Reason::*;
    let selector = leak(allow(
        "web",
        "selector: {matchLabels: {app: api}}, rules: [{from: [{source: {namespaces: [foo]}}]}]",
    ));
    let mesh_wide = leak(deny(
        "ztunnel-system",
        "rules: [{from: [{source: {namespaces: [bar]}}]}]",
    ));
    let mesh_selector = leak(deny(
        "ztunnel-system",
        "selector: {matchLabels: {app: api}}, rules: [{}]",
    ));
    let other_ns = leak(deny("other", "rules: [{}]"));
    let allow_nothing = leak(allow("web", "rules: []"));
    let deny_nothing = leak(deny("web", "rules: []"));
    let two_allows = leak(format!(
        "{}{}",
        allow("web", "rules: [{from: [{source: {namespaces: [foo]}}]}]"),
        "- {apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {name: a2, namespace: web}, spec: {rules: [{to: [{operation: {ports: ['9090']}}]}, {from: [{source: {namespaces: [bar]}}]}]}}\n"
    ));
    run(vec![
        (
            selector,
            c(BAR, "10.0.0.1", "web", "api", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            selector,
            c(BAR, "10.0.0.1", "web", "web", 80),
            true,
            "",
            NoPolicy,
        ), // not selected
        (
            selector,
            c(FOO, "10.0.0.1", "web", "api", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            mesh_wide,
            c(BAR, "10.0.0.1", "web", "web", 80),
            false,
            "d",
            DeniedByPolicy,
        ),
        (
            mesh_wide,
            c(BAR, "10.0.0.1", "anything", "x", 80),
            false,
            "d",
            DeniedByPolicy,
        ),
        (
            mesh_wide,
            c(FOO, "10.0.0.1", "web", "web", 80),
            true,
            "",
            NoPolicy,
        ),
        (
            mesh_selector,
            c(FOO, "10.0.0.1", "web", "api", 80),
            false,
            "d",
            DeniedByPolicy,
        ),
        (
            mesh_selector,
            c(FOO, "10.0.0.1", "web", "web", 80),
            true,
            "",
            NoPolicy,
        ),
        (
            other_ns,
            c(FOO, "10.0.0.1", "web", "web", 80),
            true,
            "",
            NoPolicy,
        ),
        (
            allow_nothing,
            c(FOO, "10.0.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
        (
            deny_nothing,
            c(FOO, "10.0.0.1", "web", "web", 80),
            true,
            "",
            NoPolicy,
        ),
        (
            two_allows,
            c(FOO, "10.0.0.1", "web", "web", 80),
            true,
            "a",
            AllowedByPolicy,
        ),
        (
            two_allows,
            c(BAR, "10.0.0.1", "web", "web", 80),
            true,
            "a2",
            AllowedByPolicy,
        ),
        (
            two_allows,
            c(BAR, "10.0.0.1", "web", "web", 9090),
            true,
            "a2",
            AllowedByPolicy,
        ),
        (
            two_allows,
            c(PLAIN, "10.0.0.1", "web", "web", 80),
            false,
            "",
            NoAllowMatched,
        ),
    ]);
    // The rule index names which rule decided.
    let d = decide(&policies(two_allows), &c(BAR, "10.0.0.1", "web", "web", 80));
    assert_eq!(d.rule, Some(1));
}

/// A value that does not parse no longer refuses the policy: it fails closed (README,
/// "Policy"; Istio's webhook would refuse such an object, so no Istio decision exists).
#[test]
fn bad_fields_fail_closed_not_widened() {
    let bad = [
        (
            allow("web", "rules: [{to: [{operation: {ports: [http]}}]}]"),
            "port",
        ),
        (
            allow(
                "web",
                "rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]",
            ),
            "ipBlocks",
        ),
        (
            deny("web", "rules: [{to: [{operation: {ports: ['99999']}}]}]"),
            "port",
        ),
    ];
    for (yaml, want) in bad {
        let idx = policies(&yaml);
        let d = decide(&idx, &c(FOO, "10.1.0.1", "web", "web", 80));
        assert!(!d.allowed, "{yaml}: {d:?}");
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_str_with_options(&yaml, crate::yaml::options()).unwrap();
        let s = status_of(&PolicyObject::from_value(docs[0].clone()).unwrap());
        assert!(s.fail_closed && !s.accepted, "{s:?}");
        assert!(s.message.contains(want), "{s:?}");
    }
}

#[test]
fn peer_authentication_modes() {
    let pa = |ns: &str, name: &str, sel: &str, mode: &str| {
        format!("- {{apiVersion: security.ztunnel.dev/v1, kind: PeerAuthentication, metadata: {{name: {name}, namespace: {ns}}}, spec: {{{sel} mtls: {{mode: {mode}}}}}}}\n")
    };
    let idx = policies(&format!(
        "{}{}{}",
        pa("ztunnel-system", "mesh", "", "STRICT"),
        pa("web", "ns", "", "PERMISSIVE"),
        pa(
            "web",
            "api",
            "selector: {matchLabels: {app: api}},",
            "STRICT"
        ),
    ));
    assert_eq!(
        idx.mtls_mode("web", &labels(&[("app", "api")]), 80),
        MtlsMode::Strict
    );
    assert_eq!(
        idx.mtls_mode("web", &labels(&[("app", "web")]), 80),
        MtlsMode::Permissive
    );
    assert_eq!(idx.mtls_mode("other", &labels(&[]), 80), MtlsMode::Strict);
    assert_eq!(
        policies("[]").mtls_mode("x", &labels(&[]), 80),
        MtlsMode::Permissive
    );
}

/// Two root namespaces (ours and Istio's, under the Istio-compatible setting): a policy in
/// either is mesh-wide; the mesh-level PeerAuthentication is the oldest of both roots'; a
/// policy in a root namespace still applies to that namespace's own workloads once.
#[test]
fn two_root_namespaces() {
    let build = |yaml: &str, istio_named: &[&str]| {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_str_with_options(yaml, crate::yaml::options()).unwrap();
        let (mut authz, mut pa) = (Vec::new(), Vec::new());
        for d in docs {
            match PolicyObject::from_value(d).unwrap() {
                PolicyObject::Authorization(mut a) => {
                    a.metadata.istio = istio_named.contains(&a.metadata.name.as_str());
                    authz.push(a)
                }
                PolicyObject::PeerAuthentication(mut p) => {
                    p.metadata.istio = istio_named.contains(&p.metadata.name.as_str());
                    pa.push(p)
                }
            }
        }
        PolicyIndex::build(&authz, &pa, &[ROOT_NAMESPACE, "istio-system"])
    };
    let deny_foo = |ns: &str, name: &str| {
        format!("- {{apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {{name: {name}, namespace: {ns}}}, spec: {{action: DENY, rules: [{{from: [{{source: {{namespaces: [foo]}}}}]}}]}}}}\n")
    };
    // Istio's root: mesh-wide, and named as Istio's.
    let idx = build(&deny_foo("istio-system", "deny"), &["deny"]);
    let d = decide(&idx, &c(FOO, "10.0.0.1", "web", "web", 80));
    assert!(!d.allowed);
    assert_eq!(d.policy.unwrap().to_string(), "istio:istio-system/deny");
    assert!(decide(&idx, &c(BAR, "10.0.0.1", "web", "web", 80)).allowed);
    // Ours stays mesh-wide beside it; each applies once to its own namespace's workloads.
    let idx = build(
        &format!(
            "{}{}",
            deny_foo(ROOT_NAMESPACE, "ours"),
            deny_foo("istio-system", "theirs")
        ),
        &["theirs"],
    );
    for ns in ["web", ROOT_NAMESPACE, "istio-system"] {
        let (d, seen) = idx.evaluate_traced(&Conn {
            src_principal: FOO,
            src_namespace: Some("foo"),
            src_ip: "10.0.0.1".parse().unwrap(),
            dst_ip: "10.9.9.9".parse().unwrap(),
            dst_namespace: ns,
            dst_labels: &labels(&[("app", "web")]),
            dst_port: 80,
        });
        assert!(!d.allowed, "{ns}");
        assert_eq!(seen.len(), 2, "{ns}: each policy once: {seen:?}");
    }
    // Mesh-level PeerAuthentication: the oldest without a selector in either root.
    let pa = |ns: &str, name: &str, t: &str, mode: &str| {
        format!("- {{apiVersion: security.ztunnel.dev/v1, kind: PeerAuthentication, metadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{t}'}}, spec: {{mtls: {{mode: {mode}}}}}}}\n")
    };
    let t0 = "2024-01-01T00:00:00Z";
    let t1 = "2024-02-01T00:00:00Z";
    for (ours_t, theirs_t, plaintext_allowed) in [(t0, t1, true), (t1, t0, false)] {
        let idx = build(
            &format!(
                "{}{}",
                pa(ROOT_NAMESPACE, "ours", ours_t, "PERMISSIVE"),
                pa("istio-system", "theirs", theirs_t, "STRICT")
            ),
            &["theirs"],
        );
        let d = decide(&idx, &c(PLAIN, "10.0.0.1", "web", "web", 80));
        assert_eq!(d.allowed, plaintext_allowed, "ours at {ours_t}: {d:?}");
        assert_eq!(
            idx.mtls_mode("web", &labels(&[]), 80) == MtlsMode::Strict,
            !plaintext_allowed
        );
    }
    assert_eq!(
        idx_roots(&build("[]", &[])),
        [ROOT_NAMESPACE, "istio-system"]
    );
    // Each kind's root is its own: one of Istio's in ours, or one of ours in Istio's, applies
    // to its own namespace only, as it would in its own mesh.
    let allow_all = |ns: &str, name: &str| {
        format!("- {{apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {{name: {name}, namespace: {ns}}}, spec: {{rules: [{{}}]}}}}\n")
    };
    let only_foo = "- {apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {name: only-foo, namespace: web}, spec: {rules: [{from: [{source: {namespaces: [foo]}}]}]}}\n";
    for (ns, istio) in [(ROOT_NAMESPACE, true), ("istio-system", false)] {
        let named = if istio { &["all"][..] } else { &[] };
        let idx = build(&format!("{only_foo}{}", allow_all(ns, "all")), named);
        let d = decide(&idx, &c(BAR, "10.0.0.1", "web", "web", 80));
        assert!(
            !d.allowed,
            "an allow-all in {ns} (istio: {istio}) opened web: {d:?}"
        );
        let d = decide(&idx, &c(BAR, "10.0.0.1", ns, "web", 80));
        assert!(d.allowed, "it applies in {ns} itself: {d:?}");
    }
    // Istio's older PERMISSIVE in our root is that namespace's, not the mesh's: Istio's STRICT
    // in its root is the mesh's.
    let idx = build(
        &format!(
            "{}{}",
            pa(ROOT_NAMESPACE, "old", t0, "PERMISSIVE"),
            pa("istio-system", "mesh", t1, "STRICT")
        ),
        &["old", "mesh"],
    );
    assert!(!decide(&idx, &c(PLAIN, "10.0.0.1", "web", "web", 80)).allowed);
    assert_eq!(
        idx.mtls_mode(ROOT_NAMESPACE, &labels(&[]), 80),
        MtlsMode::Permissive
    );
}

fn idx_roots(idx: &PolicyIndex) -> Vec<&str> {
    idx.root_namespaces().iter().map(|r| &**r).collect()
}
