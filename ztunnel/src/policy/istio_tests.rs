//! Istio ambient's decisions, one case per behaviour, each naming its source: istio/istio
//! `pilot/pkg/serviceregistry/ambient/authorization.go` (istiod's conversion, "authz.go"
//! below), `policies.go`, `workloads.go`, `pkg/config/validation/validation.go`; istio/ztunnel
//! `src/rbac.rs` (the matcher) and `src/state.rs` (`assert_rbac`); the istio.io reference
//! pages for AuthorizationPolicy and PeerAuthentication.

use std::sync::Arc;

use super::objects::{MtlsMode, PolicyObject};
use super::*;
use crate::labels::Labels;

const ROOT: &str = "istio-root";

fn objects(yaml: &str) -> Vec<PolicyObject> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_str_with_options(yaml, crate::yaml::options()).unwrap();
    docs.into_iter()
        .map(|d| PolicyObject::from_value(d).unwrap())
        .collect()
}

fn index(yaml: &str) -> PolicyIndex {
    let (mut authz, mut pa) = (Vec::new(), Vec::new());
    for o in objects(yaml) {
        match o {
            PolicyObject::Authorization(a) => authz.push(a),
            PolicyObject::PeerAuthentication(p) => pa.push(p),
        }
    }
    PolicyIndex::build(&authz, &pa, &[ROOT])
}

fn labels(s: &str) -> Labels {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            (Arc::from(k), Arc::from(v))
        })
        .collect()
}

/// A connection: source principal (`None`: plaintext), source IP, destination IP,
/// namespace, labels (`k=v,k=v`), port.
#[derive(Clone, Copy)]
struct C {
    from: Option<&'static str>,
    src: &'static str,
    dst: &'static str,
    ns: &'static str,
    labels: &'static str,
    port: u16,
}

const BASE: C = C {
    from: Some("cluster.local/ns/foo/sa/client"),
    src: "10.1.0.1",
    dst: "10.2.0.2",
    ns: "web",
    labels: "app=web",
    port: 80,
};

impl C {
    fn plain(self) -> C {
        C { from: None, ..self }
    }
    fn from(self, p: &'static str) -> C {
        C {
            from: Some(p),
            ..self
        }
    }
    fn port(self, port: u16) -> C {
        C { port, ..self }
    }
    fn src(self, src: &'static str) -> C {
        C { src, ..self }
    }
    fn dst(self, dst: &'static str) -> C {
        C { dst, ..self }
    }
    fn ns(self, ns: &'static str) -> C {
        C { ns, ..self }
    }
    fn labels(self, labels: &'static str) -> C {
        C { labels, ..self }
    }
}

fn decide(idx: &PolicyIndex, c: C) -> Decision {
    let l = labels(c.labels);
    let src_ns = c.from.map(|p| p.split('/').nth(2).unwrap());
    let conn = Conn {
        src_principal: c.from,
        src_namespace: src_ns,
        src_ip: c.src.parse().unwrap(),
        dst_ip: c.dst.parse().unwrap(),
        dst_namespace: c.ns,
        dst_labels: &l,
        dst_port: c.port,
    };
    let d = idx.evaluate(&conn);
    // One engine, one answer: the traced evaluation (explain's) decides the same.
    assert_eq!(idx.evaluate_traced(&conn).0, d);
    d
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!("- {{apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {{name: {name}, namespace: {ns}}}, spec: {spec}}}\n")
}

fn pa(ns: &str, name: &str, created: &str, spec: &str) -> String {
    format!("- {{apiVersion: security.ztunnel.dev/v1, kind: PeerAuthentication, metadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}, spec: {spec}}}\n")
}

/// [`pa`] converted from an Istio object created at `istio_created`.
fn converted_pa(ns: &str, name: &str, created: &str, istio_created: &str, spec: &str) -> String {
    format!("- {{apiVersion: security.ztunnel.dev/v1, kind: PeerAuthentication, metadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}', annotations: {{ztunnel.dev/istio-creation-timestamp: '{istio_created}'}}}}, spec: {spec}}}\n")
}

/// (source, policies, connection, allowed)
type Case = (&'static str, String, C, bool);

fn run(cases: &[Case]) {
    for (source, yaml, c, want) in cases {
        let d = decide(&index(yaml), *c);
        assert_eq!(d.allowed, *want, "{source}\n{yaml}{d:?}");
    }
}

#[test]
fn http_fields_in_allow_and_deny() {
    let cases: &[Case] = &[
        // authz.go handleRule: an ALLOW rule naming an HTTP attribute is dropped, so an ALLOW
        // whose only rule needs HTTP allows nothing (more restrictive).
        (
            "authz.go handleRule: ALLOW + methods drops the rule",
            ap("web", "a", "{rules: [{to: [{operation: {methods: [GET]}}]}]}"),
            BASE,
            false,
        ),
        // ...the other rules of the same ALLOW still apply.
        (
            "authz.go handleRule: only the rule with HTTP is dropped",
            ap(
                "web",
                "a",
                "{rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [foo]}}]}]}",
            ),
            BASE,
            true,
        ),
        // ...even when the HTTP attribute sits beside L4 fields of the same rule.
        (
            "authz.go handleRule: ALLOW rule with ports and paths is dropped",
            ap("web", "a", "{rules: [{to: [{operation: {ports: ['80'], paths: [/x]}}]}]}"),
            BASE,
            false,
        ),
        (
            "authz.go httpSources: requestPrincipals in ALLOW drops the rule",
            ap("web", "a", "{rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}"),
            BASE,
            false,
        ),
        (
            "authz.go handleRule: ALLOW with an HTTP when key drops the rule",
            ap("web", "a", "{rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}"),
            BASE,
            false,
        ),
        // DENY: the HTTP fields are omitted and the rest enforced: broader.
        (
            "authz.go handleRule: DENY with ports+methods denies the whole port",
            ap("web", "d", "{action: DENY, rules: [{to: [{operation: {ports: ['80'], methods: [POST]}}]}]}"),
            BASE,
            false,
        ),
        (
            "authz.go handleRule: ...not other ports",
            ap("web", "d", "{action: DENY, rules: [{to: [{operation: {ports: ['80'], methods: [POST]}}]}]}"),
            BASE.port(81),
            true,
        ),
        // DENY whose `to` holds only HTTP fields: an empty match, skipped by ztunnel: the
        // rule denies nothing (authz.go hasEffectiveRules; rbac.rs "empty clause").
        (
            "authz.go hasEffectiveRules: DENY with only methods has no effect",
            ap("web", "d", "{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}"),
            BASE,
            true,
        ),
        (
            "authz_test.go: DENY with L4 from and L7-only when is a no-op (AND of an empty clause)",
            ap(
                "web",
                "d",
                "{action: DENY, rules: [{from: [{source: {namespaces: [foo]}}], when: [{key: 'request.headers[x]', values: [y]}]}]}",
            ),
            BASE,
            true,
        ),
        (
            "authz_test.go: DENY with L4 from and L7-only to is a no-op",
            ap(
                "web",
                "d",
                "{action: DENY, rules: [{from: [{source: {namespaces: [foo]}}], to: [{operation: {methods: [GET]}}]}]}",
            ),
            BASE,
            true,
        ),
        (
            "authz_test.go: DENY with an L7-only rule and a separate L4 rule is still enforced",
            ap(
                "web",
                "d",
                "{action: DENY, rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [foo]}}]}]}",
            ),
            BASE,
            false,
        ),
        (
            "authz_test.go: DENY with an empty catch-all rule and an L7-only rule is enforced",
            ap("web", "d", "{action: DENY, rules: [{}, {to: [{operation: {methods: [GET]}}]}]}"),
            BASE,
            false,
        ),
        (
            "authz.go handleRule: DENY from with requestPrincipals and namespaces keeps namespaces",
            ap(
                "web",
                "d",
                "{action: DENY, rules: [{from: [{source: {namespaces: [foo], requestPrincipals: [x]}}]}]}",
            ),
            BASE,
            false,
        ),
        (
            "authz.go handleRule: ...and only those namespaces",
            ap(
                "web",
                "d",
                "{action: DENY, rules: [{from: [{source: {namespaces: [foo], requestPrincipals: [x]}}]}]}",
            ),
            BASE.from("cluster.local/ns/bar/sa/x"),
            true,
        ),
        // ALLOW whose every rule is dropped is still an ALLOW that applies: it denies.
        (
            "state.rs assert_rbac: an ALLOW with no rules left still applies",
            format!(
                "{}{}",
                ap("web", "a", "{rules: [{to: [{operation: {paths: [/]}}]}]}"),
                ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}")
            ),
            BASE,
            false,
        ),
    ];
    run(cases);
}

#[test]
fn when_on_l4_keys() {
    let when = |k: &str, vals: &str| {
        ap(
            "web",
            "a",
            &format!("{{rules: [{{when: [{{key: {k}, {vals}}}]}}]}}"),
        )
    };
    let cases: &[Case] = &[
        ("authz.go l4WhenAttributes: source.ip", when("source.ip", "values: [10.1.0.0/16]"), BASE, true),
        ("authz.go: source.ip miss", when("source.ip", "values: [10.1.0.0/16]"), BASE.src("10.3.0.1"), false),
        ("authz.go: source.ip notValues", when("source.ip", "notValues: [10.1.0.0/16]"), BASE, false),
        ("authz.go: source.namespace", when("source.namespace", "values: [foo]"), BASE, true),
        ("authz.go: source.namespace notValues", when("source.namespace", "notValues: [foo]"), BASE, false),
        ("authz.go: source.namespace notValues, plaintext (ns \"\")", when("source.namespace", "notValues: [foo]"), BASE.plain(), true),
        ("authz.go: source.principal", when("source.principal", "values: ['*/sa/client']"), BASE, true),
        ("authz.go: destination.ip", when("destination.ip", "values: [10.2.0.2]"), BASE, true),
        ("authz.go: destination.ip miss", when("destination.ip", "values: [10.2.0.3]"), BASE, false),
        ("authz.go: destination.ip notValues", when("destination.ip", "notValues: [10.2.0.0/24]"), BASE.dst("10.2.1.1"), true),
        ("authz.go: destination.port", when("destination.port", "values: ['80']"), BASE, true),
        ("authz.go: destination.port notValues", when("destination.port", "notValues: ['80']"), BASE, false),
        ("authz.go: values and notValues together", when("destination.port", "values: ['80', '81'], notValues: ['81']"), BASE.port(81), false),
        // source.serviceAccount is a valid key (validation.go) but not an L4 one for istiod.
        ("authz.go l4WhenAttributes: source.serviceAccount is HTTP for ztunnel", when("source.serviceAccount", "values: [foo/client]"), BASE, false),
        // Several when conditions: all must hold (one clause each).
        (
            "authz.go handleRule: one clause per condition (AND)",
            ap("web", "a", "{rules: [{when: [{key: source.namespace, values: [foo]}, {key: destination.port, values: ['81']}]}]}"),
            BASE,
            false,
        ),
    ];
    run(cases);
}

#[test]
fn sources_and_plaintext_peers() {
    let src = |s: &str| {
        ap(
            "web",
            "a",
            &format!("{{rules: [{{from: [{{source: {{{s}}}}}]}}]}}"),
        )
    };
    let deny = |s: &str| {
        ap(
            "web",
            "d",
            &format!("{{action: DENY, rules: [{{from: [{{source: {{{s}}}}}]}}]}}"),
        )
    };
    let cases: &[Case] = &[
        ("rbac.rs matches_principal: exact", src("principals: [cluster.local/ns/foo/sa/client]"), BASE, true),
        ("rbac.rs matches_principal: a pattern with spiffe:// never matches (exact)", src("principals: ['spiffe://cluster.local/ns/foo/sa/client']"), BASE, false),
        ("rbac.rs matches_principal: a suffix pattern with spiffe:// also needs the prefix", src("principals: ['spiffe://*']"), BASE, false),
        ("authz.go stringToMatch: * is presence", src("principals: ['*']"), BASE, true),
        ("rbac.rs: * (presence) never matches plaintext", src("principals: ['*']"), BASE.plain(), false),
        ("rbac.rs: notPrincipals matches plaintext in ALLOW too", src("notPrincipals: [cluster.local/ns/foo/sa/client]"), BASE.plain(), true),
        ("rbac.rs: notPrincipals: ['*'] is 'plaintext only' in ALLOW", src("notPrincipals: ['*']"), BASE.plain(), true),
        ("rbac.rs: notPrincipals: ['*'] excludes mTLS peers", src("notPrincipals: ['*']"), BASE, false),
        ("rbac.rs: notNamespaces matches plaintext (namespace \"\")", src("notNamespaces: [foo]"), BASE.plain(), true),
        ("rbac.rs: namespaces never match plaintext", src("namespaces: ['*']"), BASE.plain(), false),
        ("rbac.rs: DENY notNamespaces denies plaintext", deny("notNamespaces: [web]"), BASE.plain(), false),
        ("authz.go stringToMatch: prefix", src("namespaces: ['fo*']"), BASE, true),
        ("authz.go stringToMatch: suffix", src("namespaces: ['*oo']"), BASE, true),
        ("authz.go stringToServiceAccountMatch: bare name is in the policy's namespace", src("serviceAccounts: [client]"), BASE, false),
        ("authz.go stringToServiceAccountMatch: bare name, peer in that namespace", src("serviceAccounts: [client]"), BASE.from("cluster.local/ns/web/sa/client"), true),
        ("authz.go stringToServiceAccountMatch: namespace/name", src("serviceAccounts: [foo/client]"), BASE, true),
        ("rbac.rs ServiceAccountMatch: any trust domain", src("serviceAccounts: [foo/client]"), BASE.from("other.td/ns/foo/sa/client"), true),
        ("rbac.rs ServiceAccountMatch: no identity never matches", src("serviceAccounts: [foo/client]"), BASE.plain(), false),
        ("rbac.rs: notServiceAccounts matches plaintext", src("notServiceAccounts: [foo/client]"), BASE.plain(), true),
        ("rbac.rs: notServiceAccounts excludes", src("notServiceAccounts: [foo/client]"), BASE, false),
        ("rbac.rs: ipBlocks apply to plaintext", src("ipBlocks: [10.1.0.0/16]"), BASE.plain(), true),
        ("authz.go stringToIP: host bits of a CIDR are ignored", src("ipBlocks: [10.1.2.3/16]"), BASE.src("10.1.9.9"), true),
        // Istio's ambient conversion does not translate trustDomains: the source is left
        // empty, and an empty match is skipped, so the rule matches nothing.
        ("authz.go handleRule: trustDomains alone make an empty match", src("trustDomains: [cluster.local]"), BASE, false),
        ("authz.go handleRule: trustDomains beside namespaces are ignored", src("namespaces: [foo], notTrustDomains: [cluster.local]"), BASE, true),
        // The several `from` of a rule are ORed; the fields of one source ANDed.
        (
            "rbac.rs: any match of a clause",
            ap("web", "a", "{rules: [{from: [{source: {namespaces: [x]}}, {source: {ipBlocks: [10.1.0.1]}}]}]}"),
            BASE,
            true,
        ),
        (
            "rbac.rs: every field of a match",
            ap("web", "a", "{rules: [{from: [{source: {namespaces: [foo], ipBlocks: [10.9.0.0/16]}}]}]}"),
            BASE,
            false,
        ),
        ("AuthorizationPolicy reference: a rule {} matches everything", ap("web", "a", "{rules: [{}]}"), BASE.plain(), true),
        ("rbac.rs Authorization::matches: no rules match nothing (ALLOW denies all)", ap("web", "a", "{}"), BASE, false),
        ("rbac.rs: DENY without rules denies nothing", ap("web", "d", "{action: DENY}"), BASE, true),
        ("rbac.rs: DENY with empty rules denies nothing", ap("web", "d", "{action: DENY, rules: []}"), BASE, true),
    ];
    run(cases);
}

#[test]
fn actions_scope_and_target_refs() {
    let cases: &[Case] = &[
        ("authz.go convertAuthorizationPolicy: AUDIT is not sent to ztunnel", ap("web", "x", "{action: AUDIT, rules: [{}]}"), BASE, true),
        ("validation.go: a CUSTOM the webhook refuses is not enforced either", ap("web", "x", "{action: CUSTOM, provider: {name: ext}, rules: [{from: [{source: {namespaces: [web]}}]}]}"), BASE, true),
        (
            "authz.go: CUSTOM is not sent to ztunnel (even beside an ALLOW that would not match)",
            format!(
                "{}{}",
                ap("web", "x", "{action: CUSTOM, provider: {name: ext}, rules: [{}]}"),
                ap("web", "a", "{rules: [{from: [{source: {namespaces: [foo]}}]}]}")
            ),
            BASE,
            true,
        ),
        (
            "authz.go: a policy with targetRefs is not for ztunnel",
            ap("web", "x", "{action: DENY, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}], rules: [{}]}"),
            BASE,
            true,
        ),
        (
            "authz.go: a waypoint's policy is not for ztunnel, even one Istio's webhook would refuse",
            ap("web", "x", "{action: DENY, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}], rules: [{to: [{operation: {ports: ['80-90']}}]}]}"),
            BASE,
            true,
        ),
        (
            "authz.go: a dry-run policy is not sent, even one Istio's webhook would refuse",
            "- {apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {name: x, namespace: web, annotations: {istio.io/dry-run: 'true'}}, spec: {rules: [{to: [{operation: {ports: ['80-90']}}]}]}}\n".into(),
            BASE,
            true,
        ),
        (
            "authz.go: ...even one the daemon cannot read",
            ap("web", "x", "{action: DENY, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}], rules: [{from: [{source: {principalz: [x]}}]}]}"),
            BASE,
            true,
        ),
        (
            "validation.go: an unreadable one with a selector beside its targetRefs fails closed where the selector reaches",
            ap("web", "x", "{action: DENY, selector: {matchLabels: {app: web}}, targetRefs: [{kind: Gateway, name: wp}], rules: [{from: [{source: {principalz: [x]}}]}]}"),
            BASE,
            false,
        ),
        (
            "...and one whose selector cannot be read fails closed in its whole namespace",
            ap("web", "x", "{action: DENY, selector: {matchLabels: 3}, targetRefs: [{kind: Gateway, name: wp}], rules: [{}]}"),
            BASE,
            false,
        ),
        (
            "authz.go: targetRef (singular) likewise",
            ap("web", "x", "{action: DENY, targetRef: {kind: Service, name: web}, rules: [{}]}"),
            BASE,
            true,
        ),
        (
            "authz.go: dry-run annotation, support disabled: not sent",
            "- {apiVersion: security.ztunnel.dev/v1, kind: AuthorizationPolicy, metadata: {name: x, namespace: web, annotations: {istio.io/dry-run: 'true'}}, spec: {action: DENY, rules: [{}]}}\n".into(),
            BASE,
            true,
        ),
        ("workloads.go buildWorkloadPolicies: selector matches", ap("web", "d", "{action: DENY, selector: {matchLabels: {app: web}}, rules: [{}]}"), BASE, false),
        ("workloads.go: selector does not match", ap("web", "d", "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{}]}"), BASE, true),
        ("workloads.go: a selector without matchLabels selects nothing", ap("web", "d", "{action: DENY, selector: {}, rules: [{}]}"), BASE, true),
        ("krt FilterSelects: a pod with no labels (nil) is reached by every selector", ap("web", "d", "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{}]}"), BASE.labels(""), false),
        ("krt FilterSelects: ...an ALLOW's too, so the pod is closed but to what it allows", ap("web", "a", "{selector: {matchLabels: {app: api}}, rules: [{from: [{source: {namespaces: [other]}}]}]}"), BASE.labels(""), false),
        ("krt FilterSelects: ...and a root namespace's selector policy", ap(ROOT, "d", "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{}]}"), BASE.labels("").ns("any"), false),
        ("workloads.go: ...but still not a selector without matchLabels", ap("web", "d", "{action: DENY, selector: {}, rules: [{}]}"), BASE.labels(""), true),
        ("workloads.go: ...nor another namespace's", ap("other", "d", "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{}]}"), BASE.labels(""), true),
        ("krt FilterSelects: empty matchLabels select every workload", ap("web", "d", "{action: DENY, selector: {matchLabels: {}}, rules: [{}]}"), BASE, false),
        ("authz.go: no selector in the root namespace is global", ap(ROOT, "d", "{action: DENY, rules: [{}]}"), BASE.ns("any"), false),
        ("workloads.go: root-namespace selector policies apply in every namespace", ap(ROOT, "d", "{action: DENY, selector: {matchLabels: {app: web}}, rules: [{}]}"), BASE.ns("any"), false),
        ("workloads.go: other namespaces' policies do not apply", ap("other", "d", "{action: DENY, rules: [{}]}"), BASE, true),
        (
            "state.rs assert_rbac: DENY wins over a matching ALLOW",
            format!("{}{}", ap("web", "a", "{rules: [{}]}"), ap(ROOT, "d", "{action: DENY, rules: [{from: [{source: {namespaces: [foo]}}]}]}")),
            BASE,
            false,
        ),
    ];
    run(cases);
}

#[test]
fn unreadable_policies_fail_closed() {
    let cases: &[Case] = &[
        ("README: a bad port fails an ALLOW closed", ap("web", "a", "{rules: [{to: [{operation: {ports: ['80-90']}}]}]}"), BASE, false),
        ("README: a wrong type fails a DENY closed (denies all)", ap("web", "d", "{action: DENY, rules: [{from: [{source: {principals: 7}}]}]}"), BASE.from("cluster.local/ns/z/sa/z"), false),
        ("README: a DENY fails closed within its selector only", ap("web", "d", "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{to: [{operation: {ports: [x]}}]}]}"), BASE, true),
        ("README: an unknown field fails a DENY closed within its readable selector", ap("web", "d", "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{from: [{source: {principalz: [x]}}]}]}"), BASE, true),
        ("README: ...and denies what it selects", ap("web", "d", "{action: DENY, selector: {matchLabels: {app: api}}, rules: [{from: [{source: {principalz: [x]}}]}]}"), BASE.labels("app=api"), false),
        ("README: unreadable selector: the whole namespace", ap("web", "d", "{action: DENY, selector: {matchLabels: 3}, rules: [{}]}"), BASE, false),
        ("README: an unknown field fails closed", ap("web", "d", "{action: DENY, rules: [{from: [{source: {principalz: [x]}}]}]}"), BASE, false),
        ("README: an unreadable action fails closed as DENY", ap("web", "d", "{action: REJECT}"), BASE, false),
        ("validation.go: empty values are refused", ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: ['']}}]}]}"), BASE, false),
        ("security.go ValidateIPs: a prefix length with a leading zero is refused, so this ALLOW matches nothing", ap("web", "a", "{rules: [{when: [{key: source.ip, values: ['10.0.0.0/08']}]}]}"), BASE, false),
        ("validation.go: unknown when key is refused", ap("web", "a", "{rules: [{when: [{key: destination.labels, values: [x]}]}]}"), BASE, false),
        ("validation.go: selector and targetRefs together are refused", ap("web", "d", "{action: DENY, selector: {matchLabels: {app: api}}, targetRefs: [{kind: Gateway, name: w}], rules: [{}]}"), BASE.labels("app=api"), false),
        ("validation.go: an empty from.source is refused", ap("web", "d", "{action: DENY, rules: [{from: [{source: {}}]}]}"), BASE, false),
        ("validation.go: a from without a source is refused", ap("web", "d", "{action: DENY, rules: [{from: [{}]}]}"), BASE, false),
        ("validation.go: an empty to.operation is refused", ap("web", "d", "{action: DENY, rules: [{to: [{operation: {}}]}]}"), BASE, false),
        (
            "security.go CheckTrustDomainValues: a '/' in a trust domain is refused, so this ALLOW no longer lets foo in",
            format!(
                "{}{}",
                ap("web", "a", "{rules: [{from: [{source: {principals: [cluster.local/ns/web/sa/frontend]}}]}]}"),
                ap("web", "b", "{rules: [{from: [{source: {namespaces: [foo], trustDomains: ['legacy.td/x']}}]}]}")
            ),
            BASE,
            false,
        ),
        (
            "security.go CheckTrustDomainValues: a readable trust domain leaves the ALLOW as istiod converts it",
            format!(
                "{}{}",
                ap("web", "a", "{rules: [{from: [{source: {principals: [cluster.local/ns/web/sa/frontend]}}]}]}"),
                ap("web", "b", "{rules: [{from: [{source: {namespaces: [foo], notTrustDomains: ['*.legacy.td']}}]}]}")
            ),
            BASE,
            true,
        ),
        ("security.go CheckWildcardValues: a wildcard inside a trust domain is refused", ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [zzz], trustDomains: ['a*b']}}]}]}"), BASE, false),
        ("security.go CheckWildcardValues: two wildcards in source.trustDomain are refused", ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [zzz]}}], when: [{key: source.trustDomain, values: ['*td*']}]}]}"), BASE, false),
        ("security.go CheckWildcardValues: one at the start is not", ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [zzz]}}], when: [{key: source.trustDomain, values: ['*.td']}]}]}"), BASE, true),
        ("security.go CheckValidPathTemplate: a brace outside a template is refused", ap("web", "d", "{action: DENY, rules: [{to: [{operation: {ports: ['81'], paths: ['/api/{id}']}}]}]}"), BASE, false),
        ("security.go CheckValidPathTemplate: {**} must be the last template", ap("web", "d", "{action: DENY, rules: [{to: [{operation: {ports: ['81'], notPaths: ['/{**}/{*}']}}]}]}"), BASE, false),
        ("security.go CheckValidPathTemplate: a segment beside a template must be plain", ap("web", "d", "{action: DENY, rules: [{to: [{operation: {ports: ['81'], paths: ['/a b/{*}']}}]}]}"), BASE, false),
        ("security.go CheckValidPathTemplate: {*} and a last {**} are templates (the DENY is on port 81 only)", ap("web", "d", "{action: DENY, rules: [{to: [{operation: {ports: ['81'], paths: ['/api/{*}/x/{**}']}}]}]}"), BASE, true),
        ("security.go validateMapKey: a header key needs a name in brackets", ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [zzz]}}], when: [{key: 'request.headers[]', values: [x]}]}]}"), BASE, false),
        ("security.go validateMapKey: any prefix before the brackets will do", ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [zzz]}}], when: [{key: 'request.headers.x[y]', values: [x]}]}]}"), BASE, true),
        ("security.go ValidateAttribute: only experimental.envoy.filters. keys are known", ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [zzz]}}], when: [{key: 'experimental.x[y]', values: [x]}]}]}"), BASE, false),
        ("security.go ValidateIPs (netip.ParseAddr): an IPv6 zone is accepted", ap("web", "d", "{action: DENY, rules: [{when: [{key: source.ip, values: ['fe80::1%eth0']}]}]}"), BASE, true),
        ("authz.go stringToIP: ...and dropped", ap("web", "d", "{action: DENY, rules: [{when: [{key: source.ip, values: ['fe80::1%eth0']}]}]}"), BASE.src("fe80::1"), false),
    ];
    run(cases);
}

#[test]
fn peer_authentication() {
    let t0 = "2024-01-01T00:00:00Z";
    let t1 = "2024-02-01T00:00:00Z";
    let strict = "{mtls: {mode: STRICT}}";
    let permissive = "{mtls: {mode: PERMISSIVE}}";
    let cases: &[Case] = &[
        ("PeerAuthentication reference: mesh STRICT refuses plaintext", pa(ROOT, "m", t0, strict), BASE.plain(), false),
        ("...and accepts mTLS", pa(ROOT, "m", t0, strict), BASE, true),
        ("authz.go convertedSelectorPeerAuthentications: namespace overrides mesh", format!("{}{}", pa(ROOT, "m", t0, strict), pa("web", "n", t0, permissive)), BASE.plain(), true),
        ("...namespace UNSET inherits mesh", format!("{}{}", pa(ROOT, "m", t0, strict), pa("web", "n", t0, "{mtls: {mode: UNSET}}")), BASE.plain(), false),
        ("...workload DISABLE overrides namespace STRICT", format!("{}{}", pa("web", "n", t0, strict), pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}")), BASE.plain(), true),
        ("...workload UNSET inherits namespace", format!("{}{}", pa("web", "n", t0, strict), pa("web", "w", t0, "{selector: {matchLabels: {app: web}}}")), BASE.plain(), false),
        ("...oldest namespace-level policy wins (older STRICT)", format!("{}{}", pa("web", "old", t0, strict), pa("web", "new", t1, permissive)), BASE.plain(), false),
        ("...oldest namespace-level policy wins (older PERMISSIVE)", format!("{}{}", pa("web", "old", t1, strict), pa("web", "new", t0, permissive)), BASE.plain(), true),
        ("README (ctl convert): objects created together are ranked by their Istio objects' creation times", format!("{}{}", converted_pa("web", "a", t1, "2023-06-01T00:00:00Z", strict), converted_pa("web", "b", t1, "2023-01-01T00:00:00Z", permissive)), BASE.plain(), true),
        ("...but a newer object is never ranked before an older one by it", format!("{}{}", pa("web", "old", t0, strict), converted_pa("web", "new", t1, "", permissive)), BASE.plain(), false),
        ("...whatever time it names", format!("{}{}", pa("web", "old", t0, strict), converted_pa("web", "new", t1, "2000-01-01T00:00:00Z", permissive)), BASE.plain(), false),
        ("workloads.go fetchPeerAuthentications: a selector does not reach a pod with no labels (SubsetOf, not krt's filter)", pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}"), BASE.plain().labels(""), true),
        ("...nor does an unreadable one's (it fails closed where its selector reaches)", pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICTER}}"), BASE.plain().labels(""), true),
        ("workloads.go fetchPeerAuthentications: root selector policies do not apply elsewhere", pa(ROOT, "s", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}"), BASE.plain(), true),
        ("...other namespaces' policies do not apply", pa("other", "n", t0, strict), BASE.plain(), true),
        // Port-level modes (authz.go convertPeerAuthentication).
        ("convertPeerAuthentication: STRICT workload, PERMISSIVE port is open", pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}"), BASE.plain().port(8080), true),
        ("...other ports stay STRICT", pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}"), BASE.plain(), false),
        ("...PERMISSIVE workload, STRICT port", pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {'8080': {mode: STRICT}}}"), BASE.plain().port(8080), false),
        ("...PERMISSIVE workload, other port open", pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {'8080': {mode: STRICT}}}"), BASE.plain(), true),
        ("...UNSET workload under STRICT namespace, PERMISSIVE port open", format!("{}{}", pa("web", "n", t0, strict), pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}")), BASE.plain().port(8080), true),
        ("...and other ports STRICT (merged)", format!("{}{}", pa("web", "n", t0, strict), pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: PERMISSIVE}}}")), BASE.plain(), false),
        ("...UNSET workload under STRICT namespace: a DISABLE port is not an exception", format!("{}{}", pa("web", "n", t0, strict), pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: DISABLE}}}")), BASE.plain().port(8080), false),
        ("...UNSET workload, no parent: STRICT port", pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: STRICT}}}"), BASE.plain().port(8080), false),
        ("...mTLS is never refused by a port rule", pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: STRICT}}}"), BASE.port(8080), true),
        ("README: an unreadable PeerAuthentication is STRICT", pa("web", "n", t0, "{mtls: {mode: SOMETIMES}}"), BASE.plain(), false),
        ("README: ...within its readable selector", pa("web", "w", t0, "{selector: {matchLabels: {app: api}}, mtls: {mode: SOMETIMES}}"), BASE.plain(), true),
        ("README: ...which it makes STRICT", pa("web", "w", t0, "{selector: {matchLabels: {app: api}}, mtls: {mode: SOMETIMES}}"), BASE.plain().labels("app=api"), false),
        ("validation.go: namespace-level portLevelMtls is refused: fails closed", pa("web", "n", t0, "{mtls: {mode: PERMISSIVE}, portLevelMtls: {80: {mode: PERMISSIVE}}}"), BASE.plain(), false),
    ];
    run(cases);
    // The mode plaintext meets, per port.
    let idx = index(&pa("web", "w", t0, "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}"));
    assert_eq!(
        idx.mtls_mode("web", &labels("app=web"), 8080),
        MtlsMode::Permissive
    );
    assert_eq!(
        idx.mtls_mode("web", &labels("app=web"), 80),
        MtlsMode::Strict
    );
}

#[test]
fn statuses() {
    let one = |y: String| status_of(&objects(&y)[0]);
    // policies.go / model WorkloadAuthorization.GetConditions: fully converted: Accepted.
    let s = one(ap(
        "web",
        "a",
        "{rules: [{from: [{source: {namespaces: [foo]}}]}]}",
    ));
    assert_eq!(
        (s.accepted, s.reason, s.message.as_str()),
        (true, "Accepted", "")
    );
    // authz.go: HTTP attributes: accepted with a warning (UnsupportedValue).
    let s = one(ap(
        "web",
        "a",
        "{rules: [{to: [{operation: {methods: [GET], paths: [/]}}]}]}",
    ));
    assert_eq!((s.accepted, s.reason), (true, "UnsupportedValue"));
    assert!(
        s.message.contains("methods, paths") && s.message.contains("rule 0"),
        "{s:?}"
    );
    let s = one(ap(
        "web",
        "d",
        "{action: DENY, rules: [{to: [{operation: {methods: [GET]}}]}]}",
    ));
    assert!(s.message.contains("denies nothing"), "{s:?}");
    let s = one(ap(
        "web",
        "d",
        "{action: DENY, rules: [{to: [{operation: {methods: [GET], ports: ['80']}}]}]}",
    ));
    assert!(s.message.contains("more than written"), "{s:?}");
    // authz.go: AUDIT/CUSTOM: not bound (status false), UnsupportedValue.
    let s = one(ap("web", "x", "{action: AUDIT, rules: [{}]}"));
    assert_eq!(
        (s.accepted, s.fail_closed, s.reason),
        (false, false, "UnsupportedValue")
    );
    // Istio's webhook refuses a DENY without rules; it denies nothing, and says so.
    for spec in ["{action: DENY}", "{action: DENY, rules: []}"] {
        let s = one(ap("web", "d", spec));
        assert_eq!(
            (s.accepted, s.fail_closed, s.reason),
            (false, false, "Invalid"),
            "{spec}"
        );
        assert!(s.message.contains("denies nothing"), "{s:?}");
    }
    // validation.go: a CUSTOM the webhook refuses is Invalid, and ignored all the same.
    for (spec, why) in [
        ("{action: CUSTOM, provider: {name: ext}}", "without rules"),
        ("{action: CUSTOM, rules: [{}]}", "provider.name"),
        ("{action: CUSTOM, provider: {name: ''}, rules: [{}]}", "provider.name"),
        ("{action: CUSTOM, provider: {name: ext}, rules: [{from: [{source: {principals: [a]}}]}]}", "principals"),
        ("{action: CUSTOM, provider: {name: ext}, rules: [{from: [{source: {notServiceAccounts: [a]}}]}]}", "notServiceAccounts"),
        ("{action: CUSTOM, provider: {name: ext}, rules: [{when: [{key: source.namespace, values: [a]}]}]}", "source.namespace"),
        ("{action: CUSTOM, provider: {name: ext}, rules: [{when: [{key: request.auth.principal, values: [a]}]}]}", "request.auth.principal"),
    ] {
        let s = one(ap("web", "x", spec));
        assert_eq!(
            (s.accepted, s.fail_closed, s.reason),
            (false, false, "Invalid"),
            "{spec}"
        );
        assert!(s.message.contains(why), "{spec}: {s:?}");
    }
    let s = one(ap(
        "web",
        "x",
        "{action: CUSTOM, provider: {name: ext}, rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}], when: [{key: source.ip, values: [10.0.0.1]}]}]}",
    ));
    assert_eq!((s.accepted, s.reason), (false, "UnsupportedValue"), "{s:?}");
    // Fail-closed: not accepted, says why.
    let s = one(ap(
        "web",
        "x",
        "{rules: [{to: [{operation: {ports: [http]}}]}]}",
    ));
    assert_eq!(
        (s.accepted, s.fail_closed, s.reason),
        (false, true, "Invalid")
    );
    assert!(s.message.contains("\"http\""), "{s:?}");
    let s = one(ap("web", "x", "{targetRefs: [{kind: Gateway, name: w}]}"));
    assert_eq!((s.accepted, s.reason), (false, "TargetRefIgnored"));
    // Ignored trust domains: Istio says Accepted; the message says what was ignored.
    let s = one(ap(
        "web",
        "a",
        "{rules: [{from: [{source: {namespaces: [a], trustDomains: [td]}}]}]}",
    ));
    assert_eq!((s.accepted, s.reason), (true, "Accepted"));
    assert!(s.message.contains("trustDomains"), "{s:?}");
    let s = one(pa(
        "web",
        "p",
        "2024-01-01T00:00:00Z",
        "{mtls: {mode: STRICT}}",
    ));
    assert_eq!((s.accepted, s.reason), (true, "Accepted"));
    // Deterministic.
    let y = ap("web", "a", "{rules: [{to: [{operation: {methods: [GET]}}]}, {when: [{key: 'request.headers[a]', values: [b]}]}]}");
    assert_eq!(one(y.clone()), one(y));
}

#[test]
fn explain_names_every_policy_and_what_was_dropped() {
    let idx = index(&format!(
        "{}{}{}",
        ap("web", "a", "{rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [foo]}}]}]}"),
        ap("web", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}]}]}"),
        pa(ROOT, "m", "2024-01-01T00:00:00Z", "{mtls: {mode: STRICT}}"),
    ));
    let l = labels("app=web");
    let conn = Conn {
        src_principal: Some("cluster.local/ns/foo/sa/client"),
        src_namespace: Some("foo"),
        src_ip: "10.1.0.1".parse().unwrap(),
        dst_ip: "10.2.0.2".parse().unwrap(),
        dst_namespace: "web",
        dst_labels: &l,
        dst_port: 80,
    };
    let (d, considered) = idx.evaluate_traced(&conn);
    assert!(d.allowed && d.rule == Some(1), "{d:?}");
    let names: Vec<String> = considered.iter().map(|c| c.policy.to_string()).collect();
    assert_eq!(
        names,
        [format!("{ROOT}/m"), "web/a".into(), "web/d".into()],
        "{considered:?}"
    );
    let a = considered.iter().find(|c| &*c.policy.name == "a").unwrap();
    assert_eq!(a.matched_rule, Some(1));
    assert!(
        a.dropped[0].contains("rule 0") && a.dropped[0].contains("methods"),
        "{a:?}"
    );
}

/// authz.go convertAuthorizationPolicy: AUDIT, CUSTOM and dry-run policies are not sent to
/// ztunnel; explain lists them as ignored where they would have applied.
#[test]
fn ignored_policies_are_listed_for_explain() {
    let idx = index(&format!(
        "{}{}{}",
        ap("web", "audit", "{action: AUDIT, rules: [{}]}"),
        ap("web", "custom-api", "{action: CUSTOM, provider: {name: ext}, selector: {matchLabels: {app: api}}, rules: [{}]}"),
        ap(ROOT, "wp", "{targetRefs: [{kind: Gateway, name: w}]}"),
    ));
    let names: Vec<String> = idx
        .ignored_for("web", &labels("app=web"))
        .iter()
        .map(|i| i.policy.to_string())
        .collect();
    assert_eq!(names, ["web/audit"]);
    assert_eq!(idx.ignored_for("web", &labels("app=api")).len(), 2);
}
