//! L4 policy decided as Istio's ambient mode decides (istiod's conversion, then ztunnel's
//! matcher), with real traffic on the two-node test bed:
//!
//! - `when` conditions on the L4 keys (`source.namespace`, `destination.port`, `source.ip`
//!   and `source.principal` with `values` and `notValues`, a plaintext peer's empty
//!   identity), and on an HTTP key: the ALLOW rule dropped whole, the DENY rule left with
//!   nothing to match, HTTP fields beside L4 ones in a DENY denying the whole port;
//! - PeerAuthentication DISABLE accepting plaintext as PERMISSIVE does, at namespace level
//!   under a mesh STRICT and at workload level under a mesh or namespace STRICT, mutual TLS
//!   still accepted; `portLevelMtls` exceptions per target port (STRICT with a PERMISSIVE
//!   port, PERMISSIVE with a STRICT one, a workload without a mode under a namespace STRICT,
//!   where a DISABLE port is no exception);
//! - one file holding HTTP fields, `when` conditions, DISABLE and `portLevelMtls` together:
//!   loaded, nothing failing closed, shown by `ztunnel ctl`, deciding as Istio does.

use super::bed::*;
use serde_json::{json, Value};

/// `when` conditions on the L4 keys istiod translates for ztunnel (istiod ambient
/// authorization.go `handleRule`, `l4WhenAttributes`: one clause per condition, ANDed), matched
/// as ztunnel's rbac.rs matches them: `values` must hold, `notValues` must not, and a plaintext
/// peer's principal and namespace are empty.
#[test]
fn when_conditions_on_l4_keys() {
    let b = Bed::start();
    // Tunnel streams from n1 refused by the server's daemon (401), and every denial there.
    let (mut denied_by_destination, mut policy_denied) = (0.0, 0.0);

    // ALLOW: both conditions must hold.
    b.bed
        .apply_policies(json!([authz(
            "allow-demo-8080",
            "ALLOW",
            json!([{"when": [{"key": "source.namespace", "values": ["demo"]},
                             {"key": "destination.port", "values": ["8080"]}]}]),
        )]))
        .unwrap();
    let what = "ALLOW when source.namespace=demo and destination.port=8080";
    b.check("client", "server", 8080, true, what);
    b.check("echo", "server", 8080, true, what);
    b.check("client", "server", 9090, false, what);
    denied_by_destination += 1.0;
    // A plaintext peer has no namespace: `source.namespace` never matches it.
    b.check("legacy-2", "server", 8080, false, what);
    policy_denied += 2.0;
    b.denials(denied_by_destination, policy_denied, what);

    // DENY on a port: that port only, for every peer.
    b.bed
        .apply_policies(json!([authz(
            "deny-9090",
            "DENY",
            json!([{"when": [{"key": "destination.port", "values": ["9090"]}]}]),
        )]))
        .unwrap();
    let what = "DENY when destination.port=9090";
    b.check("client", "server", 9090, false, what);
    denied_by_destination += 1.0;
    b.check("legacy-2", "server", 9090, false, what);
    policy_denied += 2.0;
    b.check("client", "server", 8080, true, what);
    b.check("legacy-2", "server", 8080, true, what);
    b.denials(denied_by_destination, policy_denied, what);

    // DENY every source address but the client's. A tunnel's source address is the client
    // pod's own (the tunnel leaves from its netns), for the engine as for the application.
    b.bed
        .apply_policies(json!([authz(
            "deny-not-client-ip",
            "DENY",
            json!([{"when": [{"key": "source.ip", "notValues": ["10.20.1.10"]}]}]),
        )]))
        .unwrap();
    let what = "DENY when source.ip notValues 10.20.1.10";
    b.check("client", "server", 8080, true, what);
    b.check("echo", "server", 8080, false, what);
    denied_by_destination += 1.0;
    b.check("legacy-1", "server", 8080, false, what);
    b.check("legacy-2", "server", 8080, false, what);
    policy_denied += 3.0;
    b.denials(denied_by_destination, policy_denied, what);

    // ALLOW every principal but echo's. A plaintext peer's empty principal is not echo's, so
    // the condition holds for it (rbac.rs: a negative match passes a peer without identity).
    b.bed
        .apply_policies(json!([authz(
            "allow-not-echo",
            "ALLOW",
            json!([{"when": [{"key": "source.principal",
                              "notValues": ["cluster.local/ns/demo/sa/echo"]}]}]),
        )]))
        .unwrap();
    let what = "ALLOW when source.principal notValues demo/sa/echo";
    b.check("client", "server", 8080, true, what);
    b.check("legacy-2", "server", 8080, true, what);
    b.check("echo", "server", 8080, false, what);
    denied_by_destination += 1.0;
    policy_denied += 1.0;
    b.denials(denied_by_destination, policy_denied, what);

    b.bed.apply_policies(json!([])).unwrap();
    b.check("echo", "server", 9090, true, "no policy");
}

/// A `when` on an HTTP key (here `request.headers[x-user]`), which ztunnel cannot check:
/// istiod ambient authorization.go `handleRule` drops an ALLOW rule naming one whole (the rule
/// allows nothing; the policy still applies); in a DENY rule it emits the condition as an
/// empty match, which ztunnel's rbac.rs skips, so that rule matches nothing, while HTTP
/// fields beside L4 ones are omitted and the L4 rest enforced (`hasEffectiveRules`, "enforced
/// without the HTTP rules").
#[test]
fn a_when_on_an_http_key_drops_an_allow_rule_and_voids_a_deny_rule() {
    let b = Bed::start();
    let (mut denied_by_destination, mut policy_denied) = (0.0, 0.0);

    // Rule 0 would allow 8080 if only its HTTP condition were ignored; it is dropped whole.
    b.bed
        .apply_policies(json!([authz(
            "allow-header",
            "ALLOW",
            json!([
                {"to": [{"operation": {"ports": ["8080"]}}],
                 "when": [{"key": "request.headers[x-user]", "values": ["alice"]}]},
                {"to": [{"operation": {"ports": ["9090"]}}]},
            ]),
        )]))
        .unwrap();
    let what = "ALLOW with an HTTP when key";
    b.check("client", "server", 8080, false, what);
    denied_by_destination += 1.0;
    b.check("legacy-2", "server", 8080, false, what);
    policy_denied += 2.0;
    b.check("client", "server", 9090, true, what);
    b.check("legacy-2", "server", 9090, true, what);
    b.denials(denied_by_destination, policy_denied, what);
    let e = b.explain(1, "demo/client", "demo/server:8080");
    assert_eq!(e["decision"]["allowed"], false, "{e}");
    assert_eq!(e["decision"]["reason"], "no_allow_matched", "{e}");
    let n = notes(&e, "demo", "allow-header");
    assert!(
        n.len() == 1
            && n[0].contains("rule 0")
            && n[0].contains("request.headers[x-user]")
            && n[0].contains("dropped"),
        "{n:?}"
    );

    // Rule 0 (namespace demo AND the HTTP condition) matches nothing; rule 1 (port 9090 and
    // a method) denies the whole port.
    b.bed
        .apply_policies(json!([authz(
            "deny-header",
            "DENY",
            json!([
                {"from": [{"source": {"namespaces": ["demo"]}}],
                 "when": [{"key": "request.headers[x-user]", "values": ["alice"]}]},
                {"to": [{"operation": {"ports": ["9090"], "methods": ["POST"]}}]},
            ]),
        )]))
        .unwrap();
    let what = "DENY with an HTTP when key and an HTTP method";
    b.check("client", "server", 8080, true, what);
    b.check("echo", "server", 8080, true, what);
    b.check("legacy-2", "server", 8080, true, what);
    b.check("client", "server", 9090, false, what);
    denied_by_destination += 1.0;
    b.check("legacy-2", "server", 9090, false, what);
    policy_denied += 2.0;
    b.denials(denied_by_destination, policy_denied, what);
    let e = b.explain(1, "demo/client", "demo/server:9090");
    assert_eq!(e["decision"]["allowed"], false, "{e}");
    assert_eq!(e["decision"]["policy"]["name"], "deny-header", "{e}");
    assert_eq!(e["decision"]["rule"], 1, "{e}");
    let n = notes(&e, "demo", "deny-header");
    assert!(
        n.iter()
            .any(|n| n.contains("rule 0") && n.contains("denies nothing")),
        "{n:?}"
    );
    assert!(
        n.iter()
            .any(|n| n.contains("rule 1") && n.contains("more than written")),
        "{n:?}"
    );
}

/// PeerAuthentication DISABLE: for Istio's ambient mode a workload whose effective mode is
/// DISABLE is not STRICT (istiod ambient authorization.go `convertedSelectorPeerAuthentications`
/// treats PERMISSIVE and DISABLE alike), so ztunnel accepts plaintext there, and mutual TLS as
/// always. A namespace-level policy overrides the mesh's, a workload-level one (selector)
/// overrides both, for the workloads it selects only.
#[test]
fn disable_accepts_plaintext_as_permissive_does() {
    let b = Bed::start();
    // Plaintext refused as STRICT by the server's daemon (n2) and by echo's (n1).
    let (mut strict_n2, mut strict_n1) = (0.0, 0.0);
    let strict = || json!({"mtls": {"mode": "STRICT"}});
    let disable = || json!({"mtls": {"mode": "DISABLE"}});
    let server_disable = || {
        pa(
            "demo",
            "server-disable",
            json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "DISABLE"}}),
        )
    };

    b.bed
        .apply_policies(json!([pa(ROOT, "mesh", strict())]))
        .unwrap();
    let what = "mesh STRICT";
    b.check("legacy-2", "server", 8080, false, what);
    strict_n2 += 1.0;
    b.check("legacy-1", "echo", 8080, false, what);
    strict_n1 += 1.0;
    b.check("client", "server", 8080, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);
    b.refusals(0, "inbound_plaintext_strict", strict_n1, what);

    b.bed
        .apply_policies(json!([
            pa(ROOT, "mesh", strict()),
            pa("demo", "ns-disable", disable())
        ]))
        .unwrap();
    let what = "mesh STRICT, namespace DISABLE";
    b.check("legacy-2", "server", 8080, true, what);
    b.check("legacy-1", "server", 9090, true, what);
    b.check("legacy-1", "echo", 8080, true, what);
    b.check("client", "server", 8080, true, what);
    b.check("echo", "server", 9090, true, what);
    b.check("client", "echo", 8080, true, what);

    b.bed
        .apply_policies(json!([pa(ROOT, "mesh", strict()), server_disable()]))
        .unwrap();
    let what = "mesh STRICT, workload DISABLE for app=server";
    b.check("legacy-2", "server", 8080, true, what);
    b.check("legacy-1", "server", 9090, true, what);
    b.check("client", "server", 8080, true, what);
    b.check("legacy-1", "echo", 8080, false, what);
    strict_n1 += 1.0;

    b.bed
        .apply_policies(json!([pa("demo", "ns-strict", strict()), server_disable()]))
        .unwrap();
    let what = "namespace STRICT, workload DISABLE for app=server";
    b.check("legacy-2", "server", 8080, true, what);
    b.check("legacy-1", "server", 9090, true, what);
    b.check("client", "server", 9090, true, what);
    b.check("legacy-1", "echo", 8080, false, what);
    strict_n1 += 1.0;
    b.check("client", "echo", 8080, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);
    b.refusals(0, "inbound_plaintext_strict", strict_n1, what);
}

/// `portLevelMtls` on a workload-level PeerAuthentication, keyed by the workload's target
/// port (the pod's own port here), as istiod ambient authorization.go converts it:
/// `convertPeerAuthentication` makes a DENY of plaintext where the port's effective mode is
/// STRICT, and `convertedSelectorPeerAuthentications` decides whether the workload refers to
/// it or to the static STRICT policy (under an inherited STRICT, only a PERMISSIVE port is an
/// exception: a DISABLE one is not looked for).
#[test]
fn port_level_mtls_makes_exceptions_per_target_port() {
    let b = Bed::start();
    let (mut strict_n2, mut strict_n1) = (0.0, 0.0);
    let server_ports = |spec: Value| {
        let mut spec = spec;
        spec["selector"] = json!({"matchLabels": {"app": "server"}});
        pa("demo", "server-ports", spec)
    };

    b.bed
        .apply_policies(json!([server_ports(json!({
            "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}}))]))
        .unwrap();
    let what = "STRICT, 9090 PERMISSIVE";
    b.check("legacy-2", "server", 8080, false, what);
    strict_n2 += 1.0;
    b.check("legacy-2", "server", 9090, true, what);
    b.check("legacy-1", "server", 9090, true, what);
    b.check("client", "server", 8080, true, what);
    b.check("client", "server", 9090, true, what);
    // A workload-level policy reaches only the workloads it selects.
    b.check("legacy-1", "echo", 8080, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);

    b.bed
        .apply_policies(json!([server_ports(json!({
            "mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"8080": {"mode": "STRICT"}}}))]))
        .unwrap();
    let what = "PERMISSIVE, 8080 STRICT";
    b.check("legacy-2", "server", 8080, false, what);
    b.check("legacy-1", "server", 8080, false, what);
    strict_n2 += 2.0;
    b.check("legacy-2", "server", 9090, true, what);
    b.check("client", "server", 8080, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);

    // No mode of its own: the namespace's STRICT is merged into the converted policy.
    b.bed
        .apply_policies(json!([
            pa("demo", "ns-strict", json!({"mtls": {"mode": "STRICT"}})),
            server_ports(json!({"portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}})),
        ]))
        .unwrap();
    let what = "namespace STRICT, workload unset with 9090 PERMISSIVE";
    b.check("legacy-2", "server", 9090, true, what);
    b.check("legacy-2", "server", 8080, false, what);
    strict_n2 += 1.0;
    b.check("legacy-1", "echo", 8080, false, what);
    strict_n1 += 1.0;
    b.check("client", "server", 8080, true, what);

    b.bed
        .apply_policies(json!([
            pa("demo", "ns-strict", json!({"mtls": {"mode": "STRICT"}})),
            server_ports(json!({"portLevelMtls": {"9090": {"mode": "DISABLE"}}})),
        ]))
        .unwrap();
    let what = "namespace STRICT, workload unset with 9090 DISABLE";
    b.check("legacy-2", "server", 9090, false, what);
    b.check("legacy-2", "server", 8080, false, what);
    strict_n2 += 2.0;
    b.check("client", "server", 9090, true, what);
    b.refusals(1, "inbound_plaintext_strict", strict_n2, what);
    b.refusals(0, "inbound_plaintext_strict", strict_n1, what);
}

/// One discovery file with an ALLOW holding HTTP fields and `when` conditions, a mesh STRICT,
/// a namespace DISABLE and a workload PERMISSIVE with a STRICT port: every object loads
/// (both daemons ready, none marked unreadable, none failing closed, `ztunnel ctl` lists them
/// with their modes) and traffic is decided as Istio's ambient mode decides (istiod ambient
/// authorization.go: the HTTP rule dropped from the ALLOW, the `when` conditions ANDed,
/// DISABLE overriding the mesh's STRICT, the STRICT port refusing plaintext).
#[test]
fn one_file_with_http_fields_when_disable_and_port_level_mtls() {
    let b = Bed::start();
    let allow = authz(
        "allow-server",
        "ALLOW",
        json!([
            {"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]},
            {"when": [{"key": "source.principal", "values": ["cluster.local/ns/demo/sa/client"]},
                      {"key": "destination.port", "values": ["9090"]}]},
            {"from": [{"source": {"ipBlocks": ["10.20.2.11/32"]}}]},
        ]),
    );
    let policies = json!([
        allow,
        pa(ROOT, "mesh", json!({"mtls": {"mode": "STRICT"}})),
        pa("demo", "ns-disable", json!({"mtls": {"mode": "DISABLE"}})),
        pa(
            "demo",
            "server-ports",
            json!({"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "PERMISSIVE"},
                   "portLevelMtls": {"8080": {"mode": "STRICT"}}})
        ),
    ]);
    b.bed.apply_policies(policies).unwrap();

    // Loaded: ready, every object read in full, listed with its action or mode.
    for (i, node) in b.bed.nodes.iter().enumerate() {
        let (status, body) =
            ztunnel_e2e::daemon::http(&node.ns, "GET", "127.0.0.1:15021", "/healthz/ready")
                .unwrap();
        assert_eq!(status, 200, "daemon {i}: {body}");
        let log = b.bed.log(i);
        assert!(!log.contains("bad discovery file"), "daemon {i}:\n{log}");
    }
    let (_, body) =
        ztunnel_e2e::daemon::http(&b.bed.nodes[1].ns, "GET", "127.0.0.1:15000", "/config_dump")
            .unwrap();
    let dump: Value = serde_json::from_str(&body).unwrap();
    let authz_dump = dump["discovery"]["authorizationPolicies"]
        .as_array()
        .unwrap();
    let peer_dump = dump["discovery"]["peerAuthentications"].as_array().unwrap();
    assert_eq!((authz_dump.len(), peer_dump.len()), (1, 3), "{body}");
    for p in authz_dump.iter().chain(peer_dump) {
        assert!(p.get("invalid").is_none(), "read in part only: {p}");
    }
    assert_eq!(authz_dump[0]["spec"]["rules"].as_array().unwrap().len(), 3);
    let ports = peer_dump
        .iter()
        .find(|p| p["metadata"]["name"] == "server-ports")
        .unwrap();
    assert_eq!(
        ports["spec"]["portLevelMtls"]["8080"]["mode"], "STRICT",
        "{ports}"
    );
    let listed = ctl(&b.bed, 1, &["policies"]);
    for (name, mode) in [
        ("allow-server", "ALLOW"),
        ("mesh", "STRICT"),
        ("ns-disable", "DISABLE"),
        ("server-ports", "PERMISSIVE"),
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().any(|w| w == name) && l.contains(mode)),
            "{name} {mode}:\n{listed}"
        );
    }
    // Nothing fails closed; the ALLOW's notes name only its dropped HTTP rule.
    let e = b.explain(1, "demo/client", "demo/server:8080");
    let n = notes(&e, "demo", "allow-server");
    assert!(
        n.len() == 1 && n[0].contains("rule 0") && n[0].contains("methods"),
        "{n:?}"
    );
    for c in e["considered"].as_array().unwrap() {
        for note in c["dropped"].as_array().into_iter().flatten() {
            assert!(!note.to_string().contains("fails closed"), "{e}");
        }
    }
    assert_eq!(e["decision"]["reason"], "no_allow_matched", "{e}");
    let e = b.explain(1, "plain/legacy-2", "demo/server:8080");
    assert_eq!(
        (&e["mtls_mode"], &e["decision"]["reason"]),
        (&json!("STRICT"), &json!("denied_by_peer_authentication")),
        "{e}"
    );
    assert_eq!(e["decision"]["policy"]["name"], "server-ports", "{e}");
    let e = b.explain(1, "plain/legacy-2", "demo/server:9090");
    assert_eq!(e["mtls_mode"], "PERMISSIVE", "{e}");
    assert_eq!(
        (&e["decision"]["policy"]["name"], &e["decision"]["rule"]),
        (&json!("allow-server"), &json!(2)),
        "{e}"
    );
    let e = b.explain(0, "plain/legacy-1", "demo/echo:8080");
    assert_eq!(
        (&e["mtls_mode"], &e["decision"]["allowed"]),
        (&json!("PERMISSIVE"), &json!(true)),
        "{e}"
    );

    // Decided as Istio does.
    let what = "one file";
    // Rule 0 (GET on 8080) is dropped: 8080 is open to nobody.
    b.check("client", "server", 8080, false, what);
    // Rule 1: the client's principal on 9090 only.
    b.check("client", "server", 9090, true, what);
    b.check("echo", "server", 9090, false, what);
    b.refusals(0, "outbound_denied_by_destination", 2.0, what);
    // Rule 2 lets legacy-2 in on 9090 (PERMISSIVE); on 8080 the STRICT port refuses it
    // before any authorization policy is looked at.
    b.check("legacy-2", "server", 9090, true, what);
    b.check("legacy-2", "server", 8080, false, what);
    b.refusals(1, "inbound_plaintext_strict", 1.0, what);
    // legacy-1 matches no ALLOW rule.
    b.check("legacy-1", "server", 9090, false, what);
    b.refusals(1, "policy_denied", 3.0, what);
    // The namespace's DISABLE overrides the mesh's STRICT for echo.
    b.check("legacy-1", "echo", 8080, true, what);
    b.check("client", "echo", 8080, true, what);
    b.refusals(0, "inbound_plaintext_strict", 0.0, what);
}
