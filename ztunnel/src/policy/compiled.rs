//! A policy as the matcher sees it ([`Compiled`]: its effect, selector and rules, each rule a
//! [`Group`] of [`Match`]es), what it is matched against ([`Conn`]) and what matching decides
//! ([`Decision`]). The conversion ([`super::convert`]) builds these; the engine
//! ([`super::engine`]) indexes and evaluates them.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use super::matchers::{self, StrMatch};
use crate::labels::Labels;

/// What the engine knows about a connection.
#[derive(Clone, Copy, Debug)]
pub struct Conn<'a> {
    /// The peer's SPIFFE ID without `spiffe://` (`td/ns/x/sa/y`); `None` for plaintext.
    pub src_principal: Option<&'a str>,
    /// The peer identity's namespace; `None` for plaintext.
    pub src_namespace: Option<&'a str>,
    pub src_ip: IpAddr,
    /// The destination address (the workload's IP the connection is for).
    pub dst_ip: IpAddr,
    pub dst_namespace: &'a str,
    pub dst_labels: &'a Labels,
    pub dst_port: u16,
}

impl Conn<'_> {
    /// The peer identity's namespace and service account, from its principal.
    pub(super) fn namespace_and_sa(&self) -> Option<(&str, &str)> {
        let mut parts = self.src_principal?.split('/');
        let (_td, ns_key, ns, sa_key, sa) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        (ns_key == "ns" && sa_key == "sa" && parts.next().is_none()).then_some((ns, sa))
    }
}

/// A policy's name: `namespace/name`, written `istio:namespace/name` for Istio's own objects
/// (`security.istio.io`, read under the Istio-compatible setting), which may share a name
/// with one of ours.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PolicyRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub istio: bool,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.istio { "istio:" } else { "" };
        write!(f, "{group}{}/{}", self.namespace, self.name)
    }
}

/// Why the engine decided as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A DENY AuthorizationPolicy's rule matched.
    DeniedByPolicy,
    /// A peer without identity (plaintext) where a PeerAuthentication requires mutual TLS.
    DeniedByPeerAuthentication,
    /// ALLOW policies apply and none of their rules matched.
    NoAllowMatched,
    /// An ALLOW policy's rule matched.
    AllowedByPolicy,
    /// No ALLOW policy applies.
    NoPolicy,
}

/// The decision, with the policy and rule (index in its `rules`) that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    pub policy: Option<PolicyRef>,
    pub rule: Option<usize>,
}

/// Which kind of object a compiled policy comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Kind {
    AuthorizationPolicy,
    PeerAuthentication,
}

/// ALLOW or DENY: the only actions that reach the matcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Effect {
    Allow,
    Deny,
}

/// One converted match: every non-empty field must hold (within a field, any value).
#[derive(Debug, Default, Clone)]
pub(super) struct Match {
    pub namespaces: Vec<StrMatch>,
    pub not_namespaces: Vec<StrMatch>,
    /// (namespace, service account).
    pub service_accounts: Vec<(Box<str>, Box<str>)>,
    pub not_service_accounts: Vec<(Box<str>, Box<str>)>,
    pub principals: Vec<StrMatch>,
    pub not_principals: Vec<StrMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// Positive values: any must match (if any are given); negative: none may.
fn both<T>(pos: &[T], neg: &[T], f: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&f)) && (neg.is_empty() || !neg.iter().any(&f))
}

impl Match {
    /// A match that nothing was kept in: ztunnel skips it (it matches nothing).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }

    /// A peer without identity has principal and namespace `""`: no principal pattern
    /// matches it (a principal must be a `spiffe://` ID), a namespace pattern only if it
    /// matches the empty string, and no service account; so every `not` form matches it.
    pub(super) fn matches(&self, c: &Conn<'_>) -> bool {
        let ns = c.src_namespace.unwrap_or("");
        both(&self.destination_ips, &self.not_destination_ips, |b| {
            matchers::in_blocks(std::slice::from_ref(b), c.dst_ip)
        }) && both(&self.source_ips, &self.not_source_ips, |b| {
            matchers::in_blocks(std::slice::from_ref(b), c.src_ip)
        }) && both(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == c.dst_port
        }) && both(&self.service_accounts, &self.not_service_accounts, |m| {
            c.namespace_and_sa()
                .is_some_and(|(n, s)| n == &*m.0 && s == &*m.1)
        }) && both(&self.principals, &self.not_principals, |m| {
            c.src_principal.is_some_and(|p| m.matches(p))
        }) && both(&self.namespaces, &self.not_namespaces, |m| m.matches(ns))
    }
}

/// A converted rule: every clause must match; a clause matches when any of its non-empty
/// matches does (a clause without matches always does).
#[derive(Debug, Clone)]
pub(super) struct Group {
    /// The index of the rule in the object's `rules` it comes from.
    pub rule: usize,
    pub clauses: Vec<Vec<Match>>,
}

impl Group {
    pub(super) fn matches(&self, c: &Conn<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.is_empty() || clause.iter().any(|m| !m.is_empty() && m.matches(c)))
    }

    /// Whether some connection could match (no clause is left with only empty matches).
    pub fn effective(&self) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.is_empty() || clause.iter().any(|m| !m.is_empty()))
    }
}

/// A policy as the matcher sees it.
#[derive(Debug)]
pub struct Compiled {
    pub(super) name: PolicyRef,
    pub(super) kind: Kind,
    pub(super) effect: Effect,
    /// Label pairs, sorted; empty: every workload in scope.
    pub(super) selector: Vec<LabelPair>,
    pub(super) groups: Vec<Group>,
    /// What the conversion dropped or narrowed, and why.
    pub(super) notes: Arc<[String]>,
}

/// One `key: value` of a selector.
pub(super) type LabelPair = (Arc<str>, Arc<str>);

impl Compiled {
    pub(super) fn selects(&self, labels: &Labels) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    /// The rule (index in the object's `rules`) of the first group that matches `c`.
    pub(super) fn matching_rule(&self, c: &Conn<'_>) -> Option<usize> {
        self.groups.iter().find(|g| g.matches(c)).map(|g| g.rule)
    }
}
