//! Step one of the engine: each policy object converted as istiod converts it for Istio's
//! ztunnel (istio/istio `pilot/pkg/serviceregistry/ambient/authorization.go`:
//! `convertAuthorizationPolicy`, `handleRule`, `convertPeerAuthentication`,
//! `convertedSelectorPeerAuthentications`), plus what Istio's admission webhook would refuse
//! (`pkg/config/validation`): such an object fails closed here. The same conversion gives each
//! object its status ([`status_of`]), so what the status says is what the engine enforces.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::compiled::{Compiled, Effect, Group, Kind, LabelPair, Match, PolicyRef};
use super::matchers::{self, StrMatch};
use super::objects::{
    Action, AuthorizationPolicy, MtlsMode, PeerAuthentication, PolicyObject, Rule, Selector,
};
use super::validate::{selector_error, validate};

/// The status condition type to write on both kinds (Istio's, for AuthorizationPolicy).
pub const CONDITION_TYPE: &str = "ZtunnelAccepted";

/// The annotation that makes a policy dry-run in Istio.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The L4 `when` keys istiod translates for ztunnel.
const L4_WHEN_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// A policy object's status for Kubernetes: deterministic (same object, same status).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicyStatus {
    /// The condition's status: true when the daemon enforces the policy (possibly narrowed,
    /// see `message`); false when it fails closed or is ignored (AUDIT, CUSTOM, dry-run,
    /// targetRef).
    pub accepted: bool,
    /// The policy could not be read in full and is enforced fail-closed.
    pub fail_closed: bool,
    /// CamelCase: `Accepted`, `UnsupportedValue` (Istio's: HTTP attributes dropped, or an
    /// action or dry-run the daemon does not enforce), `Invalid` (fails closed),
    /// `TargetRefIgnored` (a waypoint policy; Istio writes no ztunnel condition for it).
    pub reason: &'static str,
    /// What was dropped or narrowed and why, or why it fails closed or is ignored; empty
    /// when the policy is enforced as written.
    pub message: String,
}

impl PolicyStatus {
    fn accepted() -> PolicyStatus {
        PolicyStatus {
            accepted: true,
            fail_closed: false,
            reason: "Accepted",
            message: String::new(),
        }
    }
}

/// The status of one object, from the same conversion the engine runs.
pub fn status_of(obj: &PolicyObject) -> PolicyStatus {
    match obj {
        PolicyObject::Authorization(a) => authorization(a).1,
        PolicyObject::PeerAuthentication(p) => peer_status(p),
    }
}

/// An authorization policy after conversion.
pub(super) enum Converted {
    /// Sent to the matcher.
    Enforced(Compiled),
    /// Not enforced at all (AUDIT, CUSTOM, dry-run, targetRef, a selector selecting nothing),
    /// with the labels of the workloads it would have selected (`None`: none).
    Ignored(Option<Vec<LabelPair>>),
}

pub(super) fn policy_ref(m: &super::objects::ObjectMeta) -> PolicyRef {
    PolicyRef {
        namespace: m.namespace.as_str().into(),
        name: m.name.as_str().into(),
        istio: m.istio,
    }
}

fn sorted_labels(sel: &Selector) -> Vec<LabelPair> {
    let mut v: Vec<LabelPair> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
        .collect();
    v.sort();
    v
}

/// What a selector reaches: `None` no workload (a selector without `matchLabels`);
/// `Some(empty)` every workload in scope; else those with these labels.
fn authz_scope(sel: Option<&Selector>) -> Option<Vec<LabelPair>> {
    match sel {
        None => Some(Vec::new()),
        Some(s) if s.match_labels.is_none() => None,
        Some(s) => Some(sorted_labels(s)),
    }
}

fn to_matches(v: &[String]) -> Vec<StrMatch> {
    v.iter().map(|s| StrMatch::parse(s)).collect()
}

fn to_ips(v: &[String]) -> Vec<ipnet::IpNet> {
    v.iter().filter_map(|s| matchers::ip_block(s)).collect()
}

fn to_ports(v: &[String]) -> Vec<u16> {
    v.iter().filter_map(|s| matchers::port(s)).collect()
}

fn to_sas(v: &[String], ns: &str) -> Vec<(Box<str>, Box<str>)> {
    v.iter()
        .map(|s| match s.split_once('/') {
            Some((n, a)) => (n.into(), a.into()),
            None => (ns.into(), s.as_str().into()),
        })
        .collect()
}

/// One rule as istiod's `handleRule` converts it: its clauses (`None`: dropped), and the HTTP
/// attributes it names.
fn rule_clauses(effect: Effect, r: &Rule, ns: &str) -> (Option<Vec<Vec<Match>>>, BTreeSet<String>) {
    let mut http = BTreeSet::new();
    let mut clauses = Vec::new();
    if !r.to.is_empty() {
        let mut to = Vec::new();
        for t in &r.to {
            let o = &t.operation;
            for (name, v) in o.http_fields() {
                if !v.is_empty() {
                    http.insert(name.to_owned());
                }
            }
            to.push(Match {
                destination_ports: to_ports(&o.ports),
                not_destination_ports: to_ports(&o.not_ports),
                ..Default::default()
            });
        }
        clauses.push(to);
    }
    if !r.from.is_empty() {
        let mut from = Vec::new();
        for f in &r.from {
            let s = &f.source;
            for (name, v) in [
                ("remoteIpBlocks", &s.remote_ip_blocks),
                ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ("requestPrincipals", &s.request_principals),
                ("notRequestPrincipals", &s.not_request_principals),
            ] {
                if !v.is_empty() {
                    http.insert(name.to_owned());
                }
            }
            from.push(Match {
                source_ips: to_ips(&s.ip_blocks),
                not_source_ips: to_ips(&s.not_ip_blocks),
                namespaces: to_matches(&s.namespaces),
                not_namespaces: to_matches(&s.not_namespaces),
                service_accounts: to_sas(&s.service_accounts, ns),
                not_service_accounts: to_sas(&s.not_service_accounts, ns),
                principals: to_matches(&s.principals),
                not_principals: to_matches(&s.not_principals),
                ..Default::default()
            });
        }
        clauses.push(from);
    }
    for w in &r.when {
        if !L4_WHEN_KEYS.contains(&w.key.as_str()) {
            http.insert(w.key.clone());
        }
        let mut m = Match::default();
        match w.key.as_str() {
            "source.namespace" => {
                m.namespaces = to_matches(&w.values);
                m.not_namespaces = to_matches(&w.not_values);
            }
            "source.principal" => {
                m.principals = to_matches(&w.values);
                m.not_principals = to_matches(&w.not_values);
            }
            "source.ip" => {
                m.source_ips = to_ips(&w.values);
                m.not_source_ips = to_ips(&w.not_values);
            }
            "destination.port" => {
                m.destination_ports = to_ports(&w.values);
                m.not_destination_ports = to_ports(&w.not_values);
            }
            "destination.ip" => {
                m.destination_ips = to_ips(&w.values);
                m.not_destination_ips = to_ips(&w.not_values);
            }
            _ => {}
        }
        clauses.push(vec![m]);
    }
    if effect == Effect::Allow && !http.is_empty() {
        return (None, http);
    }
    (Some(clauses), http)
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// The fail-closed form of a policy that cannot be enforced as written: an ALLOW that
/// matches nothing; a DENY that matches every connection.
fn fail_closed(
    p: &AuthorizationPolicy,
    reason: String,
    selector_ok: bool,
) -> (Converted, PolicyStatus) {
    let effect = match p.spec.action {
        Action::Allow => Effect::Allow,
        Action::Deny => Effect::Deny,
        Action::Audit | Action::Custom => {
            let status = PolicyStatus {
                accepted: false,
                fail_closed: false,
                reason: "Invalid",
                message: format!(
                    "{reason}; the node daemon does not enforce the {:?} action anyway, so the policy is ignored",
                    p.spec.action
                ),
            };
            return (
                Converted::Ignored(authz_scope(p.spec.selector.as_ref())),
                status,
            );
        }
    };
    let selector = if selector_ok {
        authz_scope(p.spec.selector.as_ref())
    } else {
        Some(Vec::new())
    };
    let what = match effect {
        Effect::Allow => "an ALLOW that matches no connection",
        Effect::Deny => "a DENY of every connection",
    };
    let scope = match &selector {
        None => "its selector selects no workload".to_owned(),
        Some(s) if s.is_empty() => {
            "to every workload of its namespace (of the mesh, in the root namespace)".to_owned()
        }
        Some(_) => "to the workloads its selector selects".to_owned(),
    };
    let message = format!("{reason}; the policy fails closed: {what}, {scope}");
    let status = PolicyStatus {
        accepted: false,
        fail_closed: true,
        reason: "Invalid",
        message: message.clone(),
    };
    let Some(selector) = selector else {
        return (Converted::Ignored(None), status);
    };
    let groups = match effect {
        Effect::Allow => Vec::new(),
        Effect::Deny => vec![Group {
            rule: 0,
            clauses: Vec::new(),
        }],
    };
    let c = Compiled {
        name: policy_ref(&p.metadata),
        kind: Kind::AuthorizationPolicy,
        effect,
        selector,
        groups,
        notes: Arc::from(vec![message]),
    };
    (Converted::Enforced(c), status)
}

/// Go's `strconv.ParseBool`, for the dry-run annotation.
fn go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// istiod's `convertAuthorizationPolicy`, and the status it gives.
pub(super) fn authorization(p: &AuthorizationPolicy) -> (Converted, PolicyStatus) {
    let spec = &p.spec;
    let dry_run = p
        .metadata
        .annotations
        .get(DRY_RUN_ANNOTATION)
        .and_then(|v| go_bool(v))
        .unwrap_or(false);
    // A dry-run policy, or a waypoint's (bound by reference, with no selector beside it), is
    // never enforced here, whatever its rules say: it is ignored before they are read or
    // checked, so that a value it gets wrong fails nothing closed.
    let waypoint = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    let never_enforced = dry_run || (waypoint && spec.selector.is_none());
    if !never_enforced {
        let unreadable = p.invalid.clone().map_or_else(|| validate(spec), Err);
        if let Err(reason) = unreadable {
            // An unreadable spec keeps its selector if that could be read.
            let selector_ok = selector_error(spec.selector.as_ref()).is_none();
            return fail_closed(p, reason, selector_ok);
        }
    }
    let scope = authz_scope(spec.selector.as_ref());
    if dry_run {
        return (
            Converted::Ignored(scope),
            PolicyStatus {
                accepted: false,
                fail_closed: false,
                reason: "UnsupportedValue",
                message: format!(
                    "{DRY_RUN_ANNOTATION} is set: dry-run policies are not enforced by the node daemon; the policy is ignored"
                ),
            },
        );
    }
    if waypoint {
        return (
            // A waypoint's policy selects no workload.
            Converted::Ignored(None),
            PolicyStatus {
                accepted: false,
                fail_closed: false,
                reason: "TargetRefIgnored",
                message: "targetRef/targetRefs bind a policy to a waypoint proxy, never to the node daemon: the policy is ignored here".into(),
            },
        );
    }
    let effect = match spec.action {
        Action::Allow => Effect::Allow,
        Action::Deny => Effect::Deny,
        other => {
            let name = if other == Action::Audit {
                "AUDIT"
            } else {
                "CUSTOM"
            };
            return (
                Converted::Ignored(scope),
                PolicyStatus {
                    accepted: false,
                    fail_closed: false,
                    reason: "UnsupportedValue",
                    message: format!(
                        "the node daemon does not enforce the {name} action: the policy is ignored"
                    ),
                },
            );
        }
    };
    if effect == Effect::Deny && spec.rules.is_empty() {
        // Istio's webhook refuses it; one that got past (no webhook) denies nothing in
        // Istio's ztunnel, and nothing here.
        return (
            Converted::Ignored(scope),
            PolicyStatus {
                accepted: false,
                fail_closed: false,
                reason: "Invalid",
                message: "a DENY without rules matches no connection (Istio's admission webhook refuses it): the policy denies nothing and is ignored; `rules: [{}]` denies every connection".into(),
            },
        );
    }
    let mut groups = Vec::new();
    let mut notes = Vec::new();
    let mut http_all = BTreeSet::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let (clauses, http) = rule_clauses(effect, r, &p.metadata.namespace);
        if r.from
            .iter()
            .any(|f| !f.source.trust_domains.is_empty() || !f.source.not_trust_domains.is_empty())
        {
            notes.push(format!(
                "rule {i}: trustDomains and notTrustDomains are not checked (Istio's ambient mode ignores them)"
            ));
        }
        match clauses {
            None => notes.push(format!(
                "rule {i}: HTTP attributes ({}) cannot be checked at L4, so this ALLOW rule is dropped: it allows nothing",
                join(&http)
            )),
            Some(clauses) => {
                let g = Group { rule: i, clauses };
                if !http.is_empty() {
                    notes.push(if g.effective() {
                        format!(
                            "rule {i}: HTTP attributes ({}) are not checked: this DENY rule is enforced on its L4 fields alone, denying more than written",
                            join(&http)
                        )
                    } else {
                        format!(
                            "rule {i}: HTTP attributes ({}) are not checked: what is left of this DENY rule matches no connection, so it denies nothing",
                            join(&http)
                        )
                    });
                }
                groups.push(g);
            }
        }
        http_all.extend(http);
    }
    let selector = authz_scope(spec.selector.as_ref());
    if selector.is_none() {
        notes.push(
            "the selector has no matchLabels: it selects no workload, so the policy applies to none (as in Istio's ambient mode)".into(),
        );
    }
    let status = PolicyStatus {
        accepted: true,
        fail_closed: false,
        // Istio's reasons: UnsupportedValue when HTTP attributes were found, else Accepted
        // (the message still says what else the conversion ignored).
        reason: if http_all.is_empty() {
            "Accepted"
        } else {
            "UnsupportedValue"
        },
        message: notes.join("; "),
    };
    let Some(selector) = selector else {
        return (Converted::Ignored(None), status);
    };
    let c = Compiled {
        name: policy_ref(&p.metadata),
        kind: Kind::AuthorizationPolicy,
        effect,
        selector,
        groups,
        notes: Arc::from(notes),
    };
    (Converted::Enforced(c), status)
}

/// A match for a peer without identity (istiod: `notPrincipals: [presence]`).
fn plaintext() -> Match {
    Match {
        not_principals: vec![StrMatch::Presence],
        ..Default::default()
    }
}

/// Why a peer authentication is not one Istio accepts (`ValidatePeerAuthentication`).
fn peer_error(p: &PeerAuthentication) -> Option<String> {
    if let Some(r) = &p.invalid {
        return Some(r.clone());
    }
    let spec = &p.spec;
    let labelled = spec
        .selector
        .as_ref()
        .is_some_and(|s| s.match_labels.as_ref().is_some_and(|m| !m.is_empty()));
    if let Some(ports) = &spec.port_level_mtls {
        if !labelled {
            return Some(
                "a mesh- or namespace-level PeerAuthentication cannot have portLevelMtls".into(),
            );
        }
        if ports.is_empty() {
            return Some("portLevelMtls, if set, needs at least one port".into());
        }
        if let Some(bad) = ports
            .keys()
            .find(|k| matchers::port(&k.0).is_none_or(|p| p == 0))
        {
            return Some(format!(
                "portLevelMtls: {:?} is not a port from 1 to 65535",
                bad.0
            ));
        }
    }
    selector_error(spec.selector.as_ref())
}

/// A peer authentication that cannot be read in full: a DENY of every peer without identity
/// where its selector reaches (the whole namespace if the selector is unreadable).
pub(super) fn peer_fail_closed(p: &PeerAuthentication) -> Option<Compiled> {
    let reason = peer_error(p)?;
    // `spec.selector` holds the selector if it could be read.
    let selector = match &p.spec.selector {
        Some(s) if selector_error(Some(s)).is_none() => sorted_labels(s),
        _ => Vec::new(),
    };
    Some(Compiled {
        name: policy_ref(&p.metadata),
        kind: Kind::PeerAuthentication,
        effect: Effect::Deny,
        selector,
        groups: vec![Group {
            rule: 0,
            clauses: vec![vec![plaintext()]],
        }],
        notes: Arc::from(vec![format!(
            "{reason}; the policy fails closed: STRICT on every port"
        )]),
    })
}

fn peer_status(p: &PeerAuthentication) -> PolicyStatus {
    if let Some(reason) = peer_error(p) {
        return PolicyStatus {
            accepted: false,
            fail_closed: true,
            reason: "Invalid",
            message: format!(
                "{reason}; the policy fails closed: plaintext is refused on every port of the workloads it reaches"
            ),
        };
    }
    let labelled = p
        .spec
        .selector
        .as_ref()
        .is_some_and(|s| s.match_labels.as_ref().is_some_and(|m| !m.is_empty()));
    if labelled && super::roots::root_namespaces().contains(&p.metadata.namespace.as_str()) {
        return PolicyStatus {
            message: "a PeerAuthentication with a selector in the root namespace applies to no workload (as in Istio's ambient mode)".into(),
            ..PolicyStatus::accepted()
        };
    }
    PolicyStatus::accepted()
}

/// A readable peer authentication, ready for `convertedSelectorPeerAuthentications`.
#[derive(Debug)]
pub(super) struct PeerEntry {
    /// Its place among the readable peer authentications, oldest first.
    pub rank: usize,
    /// Istio's static STRICT policy, named after this object (for decisions and explain).
    pub strict: Compiled,
    /// `None`: no selector; `Some(labels)`: a selector (without labels: namespace-level).
    pub selector: Option<Vec<LabelPair>>,
    pub mode: MtlsMode,
    pub port_level: Option<Vec<(u16, MtlsMode)>>,
    /// istiod's `convertPeerAuthentication` of this object (port-level exceptions).
    pub converted: Option<Compiled>,
}

impl PeerEntry {
    pub fn selects(&self, labels: &crate::labels::Labels) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|s| s.iter().all(|(k, v)| labels.get(k).is_some_and(|l| l == v)))
    }

    /// Whether it selects by labels (else it is namespace- or mesh-level).
    pub fn has_labels(&self) -> bool {
        self.selector.as_ref().is_some_and(|s| !s.is_empty())
    }
}

pub(super) fn peer_entry(
    p: &PeerAuthentication,
    rank: usize,
    in_root: bool,
    ns_pol: Option<&PeerAuthentication>,
    root_pol: Option<&PeerAuthentication>,
) -> PeerEntry {
    let name = policy_ref(&p.metadata);
    let port_level = p.spec.port_level_mtls.as_ref().map(|m| {
        let mut v: Vec<(u16, MtlsMode)> = m
            .iter()
            .filter_map(|(k, v)| matchers::port(&k.0).map(|port| (port, v.mode)))
            .collect();
        v.sort_by_key(|(port, _)| *port);
        v
    });
    let converted = convert_peer(
        p,
        in_root,
        port_level.as_deref().unwrap_or(&[]),
        ns_pol.map(|p| p.spec.mtls.mode),
        root_pol.map(|p| p.spec.mtls.mode),
    );
    PeerEntry {
        rank,
        strict: Compiled {
            name,
            kind: Kind::PeerAuthentication,
            effect: Effect::Deny,
            selector: Vec::new(),
            groups: vec![Group {
                rule: 0,
                clauses: vec![vec![plaintext()]],
            }],
            notes: Arc::from(Vec::new()),
        },
        selector: p.spec.selector.as_ref().map(sorted_labels),
        mode: p.spec.mtls.mode,
        port_level,
        converted,
    }
}

/// istiod's `convertPeerAuthentication`: a workload-level policy with port-level modes as a
/// DENY of plaintext where its effective mode is STRICT (`ns`/`root`: the modes of the
/// oldest namespace- and mesh-level policies without a selector; `in_root`: `p` is in a root
/// namespace).
fn convert_peer(
    p: &PeerAuthentication,
    in_root: bool,
    ports: &[(u16, MtlsMode)],
    ns: Option<MtlsMode>,
    root_mode: Option<MtlsMode>,
) -> Option<Compiled> {
    if in_root || p.spec.selector.is_none() || ports.is_empty() {
        return None;
    }
    let mode = p.spec.mtls.mode;
    let strict = |m: Option<MtlsMode>| m == Some(MtlsMode::Strict);
    let unset = |m: Option<MtlsMode>| m.is_none_or(|m| m == MtlsMode::Unset);
    let mut rules: Vec<Vec<Match>> = Vec::new();
    let mut groups = Vec::new();
    if mode == MtlsMode::Strict {
        rules.push(vec![plaintext()]);
    }
    let mut found_non_strict = false;
    for &(port, port_mode) in ports {
        match port_mode {
            MtlsMode::Strict => {
                // Go's precedence: a || (b && c) || d.
                if mode == MtlsMode::Strict
                    || (mode == MtlsMode::Unset && strict(ns))
                    || (unset(ns) && strict(root_mode))
                {
                    continue;
                }
                groups.push(Group {
                    rule: 0,
                    clauses: vec![vec![Match {
                        destination_ports: vec![port],
                        ..plaintext()
                    }]],
                });
            }
            MtlsMode::Permissive | MtlsMode::Disable => {
                if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
                    continue;
                }
                if mode == MtlsMode::Unset
                    && ((ns.is_some() && !strict(ns))
                        || (ns.is_none() && root_mode.is_some() && !strict(root_mode))
                        || (ns.is_none() && root_mode.is_none()))
                {
                    continue;
                }
                found_non_strict = true;
                rules.push(vec![Match {
                    not_destination_ports: vec![port],
                    ..Default::default()
                }]);
            }
            MtlsMode::Unset => continue,
        }
    }
    if mode == MtlsMode::Strict && !found_non_strict {
        return None;
    }
    if rules.is_empty() && groups.is_empty() {
        return None;
    }
    let merge = (strict(root_mode) && (unset(ns) || strict(ns))) || strict(ns);
    if merge && found_non_strict {
        rules.push(vec![plaintext()]);
    }
    if !rules.is_empty() {
        groups.push(Group {
            rule: 0,
            clauses: rules,
        });
    }
    Some(Compiled {
        name: policy_ref(&p.metadata),
        kind: Kind::PeerAuthentication,
        effect: Effect::Deny,
        selector: Vec::new(),
        groups,
        notes: Arc::from(Vec::new()),
    })
}

/// istiod's `convertedSelectorPeerAuthentications` for one workload, given the oldest mesh-,
/// namespace- and workload-level policies reaching it: the policy that makes it STRICT as a
/// whole (if it is), and the converted port-level policy it references (if any).
pub(super) fn effective_peer<'a>(
    mesh: Option<&'a PeerEntry>,
    namespace: Option<&'a PeerEntry>,
    workload: Option<&'a PeerEntry>,
) -> (Option<&'a PeerEntry>, Option<&'a Compiled>) {
    let mut strict: Option<&PeerEntry> = None;
    if let Some(m) = mesh {
        if m.mode == MtlsMode::Strict {
            strict = Some(m);
        }
    }
    if let Some(n) = namespace {
        if n.mode != MtlsMode::Unset {
            strict = (n.mode == MtlsMode::Strict).then_some(n);
        }
    }
    let Some(w) = workload else {
        return (strict, None);
    };
    match w.mode {
        MtlsMode::Strict => strict = Some(w),
        MtlsMode::Permissive | MtlsMode::Disable => strict = None,
        MtlsMode::Unset => {}
    }
    let mut port_ref = false;
    if let Some(ports) = &w.port_level {
        let any = |f: &dyn Fn(MtlsMode) -> bool| ports.iter().any(|(_, m)| f(*m));
        match w.mode {
            MtlsMode::Strict => {
                if any(&|m| matches!(m, MtlsMode::Permissive | MtlsMode::Disable)) {
                    port_ref = true;
                    strict = None;
                }
            }
            MtlsMode::Permissive | MtlsMode::Disable => {
                port_ref = any(&|m| m == MtlsMode::Strict);
            }
            MtlsMode::Unset => {
                if strict.is_some() {
                    // Only PERMISSIVE ports, as istiod checks (not DISABLE).
                    if any(&|m| m == MtlsMode::Permissive) {
                        port_ref = true;
                        strict = None;
                    }
                } else {
                    strict = None;
                    port_ref = any(&|m| m == MtlsMode::Strict);
                }
            }
        }
    }
    (strict, if port_ref { w.converted.as_ref() } else { None })
}
