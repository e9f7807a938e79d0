//! The L4 authorization engine: (connection facts, policies) → a [`Decision`] naming the policy
//! and rule that made it. Pure: no I/O; the caller enforces.
//!
//! Semantics (Istio's, for the L4 fields): DENY policies first — any matching rule denies; then
//! if any ALLOW policy applies to the destination workload, a connection that no ALLOW rule
//! matches is denied; with no ALLOW policy, it is allowed. A policy applies to a workload when
//! it is in the workload's namespace, or in the root namespace [`ROOT_NAMESPACE`] (mesh-wide),
//! and its selector (if any) matches the workload's labels. A rule matches when any of its
//! `from` sources and any of its `to` operations match (an empty list matches anything); a
//! policy without rules matches nothing (so an ALLOW without rules allows nothing). Within a
//! source every given field must hold. A connection without a peer identity (plaintext) has no
//! principal or namespace: a positive `principals`/`namespaces` never matches it, and a
//! negative one (`notPrincipals`/`notNamespaces`) matches it in a DENY rule and not in an
//! ALLOW rule — either way the policy fails closed.
//!
//! Policies are compiled and indexed when discovery changes ([`PolicyIndex::build`]): by
//! namespace, then by one label of the selector, so a decision looks only at policies that can
//! apply, however many the mesh holds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use super::matchers::{self, StrMatch};
use crate::discovery::policy::{Action, AuthorizationPolicy, MtlsMode, PeerAuthentication};
use crate::discovery::Labels;

/// Policies here apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "ztunnel-system";

/// What the engine knows about a connection.
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    /// The peer's SPIFFE ID without `spiffe://` (`td/ns/x/sa/y`); `None` for plaintext.
    pub src_principal: Option<&'a str>,
    /// The peer identity's namespace; `None` for plaintext.
    pub src_namespace: Option<&'a str>,
    pub src_ip: IpAddr,
    pub dst_namespace: &'a str,
    pub dst_labels: &'a Labels,
    pub dst_port: u16,
}

/// A policy's name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PolicyRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why the engine decided as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A DENY policy's rule matched.
    DeniedByPolicy,
    /// ALLOW policies apply and none of their rules matched.
    NoAllowMatched,
    /// An ALLOW policy's rule matched.
    AllowedByPolicy,
    /// No ALLOW policy applies.
    NoPolicy,
}

/// The decision, with the policy and rule (index in `rules`) that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    pub policy: Option<PolicyRef>,
    pub rule: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("AuthorizationPolicy {policy}: {reason}")]
pub struct CompileError {
    pub policy: String,
    pub reason: String,
}

#[derive(Debug, Default)]
struct Source {
    principals: Vec<StrMatch>,
    not_principals: Vec<StrMatch>,
    namespaces: Vec<StrMatch>,
    not_namespaces: Vec<StrMatch>,
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
}

#[derive(Debug, Default)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
}

/// One `key: value` of a selector.
type LabelPair = (Arc<str>, Arc<str>);

/// Policies selecting on one label key, by the label's value.
type ByValue = HashMap<Arc<str>, Vec<Arc<Compiled>>>;

#[derive(Debug)]
struct Compiled {
    name: PolicyRef,
    action: Action,
    selector: Vec<LabelPair>,
    rules: Vec<Rule>,
}

/// A field that a plaintext connection lacks, in a rule of `action`: positive fields never
/// match it; negative ones match it only in DENY rules (fail closed both ways).
fn identity_field(
    v: Option<&str>,
    positive: &[StrMatch],
    negative: &[StrMatch],
    action: Action,
) -> bool {
    match v {
        Some(v) => {
            (positive.is_empty() || matchers::any(positive, v))
                && (negative.is_empty() || !matchers::any(negative, v))
        }
        None => positive.is_empty() && (negative.is_empty() || action == Action::Deny),
    }
}

impl Source {
    fn matches(&self, c: &Conn<'_>, action: Action) -> bool {
        identity_field(
            c.src_principal,
            &self.principals,
            &self.not_principals,
            action,
        ) && identity_field(
            c.src_namespace,
            &self.namespaces,
            &self.not_namespaces,
            action,
        ) && (self.ip_blocks.is_empty() || matchers::in_blocks(&self.ip_blocks, c.src_ip))
            && (self.not_ip_blocks.is_empty()
                || !matchers::in_blocks(&self.not_ip_blocks, c.src_ip))
    }
}

impl Operation {
    fn matches(&self, c: &Conn<'_>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&c.dst_port))
            && (self.not_ports.is_empty() || !self.not_ports.contains(&c.dst_port))
    }
}

impl Compiled {
    fn compile(p: &AuthorizationPolicy) -> Result<Compiled, CompileError> {
        let name = PolicyRef {
            namespace: p.metadata.namespace.as_str().into(),
            name: p.metadata.name.as_str().into(),
        };
        let err = |reason: String| CompileError {
            policy: name.to_string(),
            reason,
        };
        let strs = |v: &[String], f: fn(&str) -> StrMatch| v.iter().map(|s| f(s)).collect();
        let blocks = |v: &[String]| -> Result<Vec<IpNet>, CompileError> {
            v.iter()
                .map(|s| matchers::ip_block(s).map_err(err))
                .collect()
        };
        let ports = |v: &[String]| -> Result<Vec<u16>, CompileError> {
            v.iter().map(|s| matchers::port(s).map_err(err)).collect()
        };
        let mut rules = Vec::new();
        for r in &p.spec.rules {
            let mut from = Vec::new();
            for f in &r.from {
                let s = &f.source;
                from.push(Source {
                    principals: strs(&s.principals, matchers::principal),
                    not_principals: strs(&s.not_principals, matchers::principal),
                    namespaces: strs(&s.namespaces, StrMatch::parse),
                    not_namespaces: strs(&s.not_namespaces, StrMatch::parse),
                    ip_blocks: blocks(&s.ip_blocks)?,
                    not_ip_blocks: blocks(&s.not_ip_blocks)?,
                });
            }
            let mut to = Vec::new();
            for t in &r.to {
                to.push(Operation {
                    ports: ports(&t.operation.ports)?,
                    not_ports: ports(&t.operation.not_ports)?,
                });
            }
            rules.push(Rule { from, to });
        }
        let mut selector: Vec<LabelPair> = p
            .spec
            .selector
            .iter()
            .flat_map(|s| s.match_labels.iter())
            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
            .collect();
        selector.sort();
        Ok(Compiled {
            name,
            action: p.spec.action,
            selector,
            rules,
        })
    }

    fn selects(&self, labels: &Labels) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    /// The index of the first rule that matches `c`.
    fn matching_rule(&self, c: &Conn<'_>) -> Option<usize> {
        self.rules.iter().position(|r| {
            (r.from.is_empty() || r.from.iter().any(|s| s.matches(c, self.action)))
                && (r.to.is_empty() || r.to.iter().any(|o| o.matches(c)))
        })
    }
}

#[derive(Debug, Default)]
struct Scope {
    /// Policies without a selector: the whole namespace (or mesh, in the root namespace).
    wide: Vec<Arc<Compiled>>,
    /// Policies with a selector, under the selector's first label.
    by_label: HashMap<Arc<str>, ByValue>,
}

impl Scope {
    fn applicable<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = &'a Compiled> + 'a {
        let selected = labels.iter().flat_map(move |(k, v)| {
            self.by_label
                .get(&**k)
                .and_then(|by_value| by_value.get(&**v))
                .into_iter()
                .flatten()
                .filter(move |p| p.selects(labels))
        });
        self.wide.iter().chain(selected).map(|p| &**p)
    }
}

/// Every authorization policy of the mesh, compiled and indexed, and the peer
/// authentication modes.
#[derive(Debug, Default)]
pub struct PolicyIndex {
    scopes: HashMap<Arc<str>, Scope>,
    peer_authn: Vec<PeerAuthentication>,
    count: usize,
}

impl PolicyIndex {
    /// Compiles and indexes; a policy that cannot be compiled is an error naming it.
    pub fn build(
        authz: &[AuthorizationPolicy],
        peer_authn: &[PeerAuthentication],
    ) -> Result<PolicyIndex, CompileError> {
        let mut idx = PolicyIndex {
            peer_authn: peer_authn.to_vec(),
            count: authz.len(),
            ..Default::default()
        };
        for p in authz {
            let c = Arc::new(Compiled::compile(p)?);
            let scope = idx.scopes.entry(c.name.namespace.clone()).or_default();
            match c.selector.first() {
                None => scope.wide.push(c),
                Some((k, v)) => scope
                    .by_label
                    .entry(k.clone())
                    .or_default()
                    .entry(v.clone())
                    .or_default()
                    .push(c),
            }
        }
        Ok(idx)
    }

    /// How many authorization policies the mesh holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn applicable<'a>(&'a self, c: &'a Conn<'a>) -> impl Iterator<Item = &'a Compiled> + 'a {
        let own = self.scopes.get(c.dst_namespace);
        let root = (c.dst_namespace != ROOT_NAMESPACE)
            .then(|| self.scopes.get(ROOT_NAMESPACE))
            .flatten();
        own.into_iter()
            .chain(root)
            .flat_map(move |s| s.applicable(c.dst_labels))
    }

    /// The decision for `c`, in one pass over the applicable policies: any DENY match decides
    /// at once; otherwise the first ALLOW match (if any ALLOW applies).
    pub fn evaluate(&self, c: &Conn<'_>) -> Decision {
        let mut any_allow = false;
        let mut allowed_by: Option<(&Compiled, usize)> = None;
        for p in self.applicable(c) {
            match p.action {
                Action::Deny => {
                    if let Some(i) = p.matching_rule(c) {
                        return Decision {
                            allowed: false,
                            reason: Reason::DeniedByPolicy,
                            policy: Some(p.name.clone()),
                            rule: Some(i),
                        };
                    }
                }
                Action::Allow => {
                    any_allow = true;
                    if allowed_by.is_none() {
                        allowed_by = p.matching_rule(c).map(|i| (p, i));
                    }
                }
            }
        }
        match allowed_by {
            Some((p, i)) => Decision {
                allowed: true,
                reason: Reason::AllowedByPolicy,
                policy: Some(p.name.clone()),
                rule: Some(i),
            },
            None => Decision {
                allowed: !any_allow,
                reason: if any_allow {
                    Reason::NoAllowMatched
                } else {
                    Reason::NoPolicy
                },
                policy: None,
                rule: None,
            },
        }
    }

    /// The mutual-TLS mode for a workload: a selector-scoped PeerAuthentication in its
    /// namespace, else the namespace's, else the root namespace's; PERMISSIVE when none says.
    pub fn mtls_mode(&self, namespace: &str, labels: &Labels) -> MtlsMode {
        let selects = |p: &PeerAuthentication| match &p.spec.selector {
            None => false,
            Some(s) => {
                !s.match_labels.is_empty()
                    && s.match_labels
                        .iter()
                        .all(|(k, v)| labels.get(k.as_str()).is_some_and(|l| &**l == v))
            }
        };
        let wide = |p: &PeerAuthentication| {
            p.spec
                .selector
                .as_ref()
                .is_none_or(|s| s.match_labels.is_empty())
        };
        let set = |m: MtlsMode| (m != MtlsMode::Unset).then_some(m);
        let find = |ns: &str, pick: &dyn Fn(&PeerAuthentication) -> bool| {
            self.peer_authn
                .iter()
                .filter(|p| p.metadata.namespace == ns && pick(p))
                .find_map(|p| set(p.spec.mtls.mode))
        };
        find(namespace, &selects)
            .or_else(|| find(namespace, &wide))
            .or_else(|| find(ROOT_NAMESPACE, &wide))
            .unwrap_or(MtlsMode::Permissive)
    }
}
