//! The L4 authorization engine: (connection facts, policies) → a [`Decision`] naming the policy
//! and rule that made it. Pure: no I/O; the caller enforces.
//!
//! The engine is Istio's ambient mode in two steps, as Istio runs them: each policy object is
//! first converted as istiod converts it for ztunnel ([`super::convert`]: what is dropped, what
//! is ignored, what fails closed), then connections are matched as Istio's ztunnel matches the
//! converted policies (here: [`Compiled::matching_rule`]). DENY policies first (any match
//! denies, a STRICT PeerAuthentication being one: it denies a peer without identity); then, if
//! any ALLOW policy applies to the destination workload, a connection that none matches is
//! denied; with none, it is allowed.
//!
//! Scope: a policy applies to a workload of its own namespace (any namespace, when the policy
//! is in a root namespace) when it has no selector, or when its selector's labels are all
//! the workload's; an authorization policy with a selector applies to a workload with no
//! labels at all (istiod's `buildWorkloadPolicies` filters by the pod's labels, and its
//! filter lets everything through for a nil label set). The root namespace is ours
//! (`--root-namespace`, [`super::roots`]); under the Istio-compatible setting Istio's objects
//! have their own (`--istio-root-namespace`), as they have in Istio. Each object is mesh-wide
//! only in its own kind's root: one of ours in Istio's root, or one of Istio's in ours,
//! applies to that namespace alone, as it would without the other mesh.
//!
//! Policies are indexed when discovery changes ([`PolicyIndex::build`]): by namespace, then by
//! one label of the selector, so a decision looks only at policies that can apply, however
//! many the mesh holds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use super::compiled::{Compiled, Conn, Decision, Effect, Kind, LabelPair, PolicyRef, Reason};
use super::convert::{self, Converted, PeerEntry};
use super::objects::{AuthorizationPolicy, MtlsMode, PeerAuthentication};
use crate::labels::Labels;

/// Policies selecting on one label key, by the label's value.
type ByValue = HashMap<Arc<str>, Vec<Arc<Compiled>>>;

#[derive(Debug, Default)]
struct Scope {
    /// Policies without labels to select on: the whole namespace (or mesh, in the root).
    wide: Vec<Arc<Compiled>>,
    /// Policies with a selector, under the selector's first label.
    by_label: HashMap<Arc<str>, ByValue>,
}

impl Scope {
    fn insert(&mut self, c: Arc<Compiled>) {
        match c.selector.first() {
            None => self.wide.push(c),
            Some((k, v)) => self
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(c),
        }
    }

    fn applicable<'a>(&'a self, labels: &'a Labels) -> impl Iterator<Item = &'a Compiled> + 'a {
        let selected = labels.iter().flat_map(move |(k, v)| {
            self.by_label
                .get(&**k)
                .and_then(|by_value| by_value.get(&**v))
                .into_iter()
                .flatten()
                .filter(move |p| p.selects(labels))
        });
        // A workload without labels: istiod's selector filter is skipped for a nil label set,
        // so every authorization policy with a selector reaches it.
        let unlabelled = labels.is_empty().then(|| {
            self.by_label
                .values()
                .flat_map(HashMap::values)
                .flatten()
                .filter(|p| p.kind == Kind::AuthorizationPolicy)
        });
        self.wide
            .iter()
            .chain(selected)
            .chain(unlabelled.into_iter().flatten())
            .map(|p| &**p)
    }
}

/// A policy that took part in a decision, for `explain`.
#[derive(Clone, Debug, Serialize)]
pub struct Considered {
    pub kind: Kind,
    pub policy: PolicyRef,
    pub action: Effect,
    /// The rule that matched (index in the object's `rules`), if one did.
    pub matched_rule: Option<usize>,
    /// What the conversion dropped from the policy or narrowed, and why.
    pub dropped: Vec<String>,
}

/// A policy in scope of a workload that the daemon does not enforce (AUDIT, CUSTOM,
/// dry-run, targetRef), for `explain`.
#[derive(Clone, Debug, Serialize)]
pub struct Ignored {
    pub policy: PolicyRef,
    pub reason: String,
}

/// An ignored policy and the labels it selects (empty: every workload in scope).
#[derive(Debug)]
struct IgnoredEntry {
    ignored: Ignored,
    selector: Vec<LabelPair>,
}

/// Receives each policy the engine looked at.
trait Tracer {
    /// Whether to go on after the decision is known (to report every applicable policy).
    const FULL: bool;
    fn saw(&mut self, p: &Compiled, matched: Option<usize>);
}

struct NoTrace;
impl Tracer for NoTrace {
    const FULL: bool = false;
    #[inline]
    fn saw(&mut self, _: &Compiled, _: Option<usize>) {}
}

struct Trace(Vec<Considered>);
impl Tracer for Trace {
    const FULL: bool = true;
    fn saw(&mut self, p: &Compiled, matched: Option<usize>) {
        self.0.push(Considered {
            kind: p.kind,
            policy: p.name.clone(),
            action: p.effect,
            matched_rule: matched,
            dropped: p.notes.to_vec(),
        });
    }
}

/// Peer authentications of one namespace, oldest first (then by name).
#[derive(Debug, Default)]
struct PeerScope {
    entries: Vec<Arc<PeerEntry>>,
}

/// Every authorization policy of the mesh, converted and indexed, and the peer
/// authentications.
#[derive(Debug, Default)]
pub struct PolicyIndex {
    /// The root namespaces, ours first.
    roots: Box<[Arc<str>]>,
    scopes: HashMap<Arc<str>, Scope>,
    peers: HashMap<Arc<str>, PeerScope>,
    ignored: HashMap<Arc<str>, Vec<IgnoredEntry>>,
    count: usize,
}

impl PolicyIndex {
    /// Converts and indexes every policy; never fails: a policy that cannot be read in full
    /// fails closed (see [`crate::policy::status_of`]). `roots` hold mesh-wide policies.
    pub fn build(
        authz: &[AuthorizationPolicy],
        peer_authn: &[PeerAuthentication],
        roots: &[&str],
    ) -> PolicyIndex {
        let mut idx = PolicyIndex {
            roots: roots.iter().map(|r| Arc::from(*r)).collect(),
            count: authz.len(),
            ..Default::default()
        };
        for p in authz {
            match convert::authorization(p) {
                (Converted::Enforced(c), _) => idx.insert(c),
                (Converted::Ignored(Some(selector)), status) => idx
                    .ignored
                    .entry(p.metadata.namespace.as_str().into())
                    .or_default()
                    .push(IgnoredEntry {
                        ignored: Ignored {
                            policy: convert::policy_ref(&p.metadata),
                            reason: status.message,
                        },
                        selector,
                    }),
                (Converted::Ignored(None), _) => {}
            }
        }
        // Peer authentications: the readable ones by namespace, oldest first; the others
        // fail closed as DENY policies refusing plaintext where their selector reaches.
        let mut readable: Vec<&PeerAuthentication> = Vec::new();
        for p in peer_authn {
            match convert::peer_fail_closed(p) {
                Some(c) => idx.insert(c),
                None => readable.push(p),
            }
        }
        readable.sort_by(|a, b| a.metadata.age().cmp(&b.metadata.age()));
        let mesh_wide =
            |p: &PeerAuthentication| idx.root_of(p.metadata.istio) == p.metadata.namespace;
        let oldest_unselected = |scope: &dyn Fn(&PeerAuthentication) -> bool| {
            readable
                .iter()
                .find(|p| scope(p) && p.spec.selector.is_none())
                .copied()
        };
        // Mesh-level: the oldest without a selector in its kind's root namespace.
        let root_pol = oldest_unselected(&mesh_wide);
        let mut entries = Vec::with_capacity(readable.len());
        for (rank, p) in readable.iter().enumerate() {
            let ns = &p.metadata.namespace;
            let ns_pol = oldest_unselected(&|o| &o.metadata.namespace == ns);
            entries.push(convert::peer_entry(p, rank, mesh_wide(p), ns_pol, root_pol));
        }
        for entry in entries {
            idx.peers
                .entry(entry.strict.name.namespace.clone())
                .or_default()
                .entries
                .push(Arc::new(entry));
        }
        idx
    }

    fn insert(&mut self, c: Compiled) {
        let c = Arc::new(c);
        self.scopes
            .entry(c.name.namespace.clone())
            .or_default()
            .insert(c);
    }

    /// The root namespaces this index was built for, ours first.
    pub fn root_namespaces(&self) -> &[Arc<str>] {
        &self.roots
    }

    /// The root namespace of Istio's objects (`istio`) or of ours.
    fn root_of(&self, istio: bool) -> &str {
        let i = usize::from(istio).min(self.roots.len().saturating_sub(1));
        self.roots.get(i).map_or("", |r| r)
    }

    /// Whether the policy applies to the whole mesh: it is in its kind's root namespace.
    fn mesh_wide(&self, p: &PolicyRef) -> bool {
        *p.namespace == *self.root_of(p.istio)
    }

    /// `map`'s entries for the root namespaces other than `ns` (callers keep those that are
    /// mesh-wide there, [`Self::mesh_wide`]).
    fn in_other_roots<'a, V>(
        &'a self,
        map: &'a HashMap<Arc<str>, V>,
        ns: &'a str,
    ) -> impl Iterator<Item = &'a V> + 'a {
        self.roots
            .iter()
            .filter(move |r| &***r != ns)
            .filter_map(move |r| map.get(r))
    }

    /// How many authorization policies the mesh holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn applicable<'a>(&'a self, c: &'a Conn<'a>) -> impl Iterator<Item = &'a Compiled> + 'a {
        let own = self.scopes.get(c.dst_namespace).into_iter();
        let roots = self.in_other_roots(&self.scopes, c.dst_namespace);
        own.flat_map(move |s| s.applicable(c.dst_labels)).chain(
            roots
                .flat_map(move |s| s.applicable(c.dst_labels))
                .filter(move |p| self.mesh_wide(&p.name)),
        )
    }

    /// The decision for `c`: the peer-authentication DENYs, then one pass over the
    /// applicable policies: any DENY match decides at once; otherwise the first ALLOW match
    /// (if any ALLOW applies).
    pub fn evaluate(&self, c: &Conn<'_>) -> Decision {
        self.decide(c, &mut NoTrace)
    }

    /// The policies in scope of a workload that the daemon ignores, and why.
    pub fn ignored_for(&self, namespace: &str, labels: &Labels) -> Vec<Ignored> {
        let own = self.ignored.get(namespace).into_iter().flatten();
        let roots = self.in_other_roots(&self.ignored, namespace).flatten();
        own.chain(roots.filter(|e| self.mesh_wide(&e.ignored.policy)))
            .filter(|e| {
                e.selector
                    .iter()
                    .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
            })
            .map(|e| e.ignored.clone())
            .collect()
    }

    /// [`Self::evaluate`], and every policy that took part (each applicable one, whether it
    /// matched, and what its conversion dropped), by the same code.
    pub fn evaluate_traced(&self, c: &Conn<'_>) -> (Decision, Vec<Considered>) {
        let mut t = Trace(Vec::new());
        let d = self.decide(c, &mut t);
        (d, t.0)
    }

    fn decide<T: Tracer>(&self, c: &Conn<'_>, t: &mut T) -> Decision {
        let mut decided: Option<Decision> = None;
        if !self.peers.is_empty() {
            let (strict_by, port_policy) = self.peer_policies(c.dst_namespace, c.dst_labels);
            if let Some(by) = strict_by {
                // Istio's static STRICT policy: DENY a peer without identity.
                let matched = c.src_principal.is_none().then_some(0);
                t.saw(&by.strict, matched);
                if matched.is_some() {
                    decided = Some(Decision {
                        allowed: false,
                        reason: Reason::DeniedByPeerAuthentication,
                        policy: Some(by.strict.name.clone()),
                        rule: None,
                    });
                    if !T::FULL {
                        return decided.unwrap();
                    }
                }
            }
            if let Some(p) = port_policy {
                let matched = p.matching_rule(c);
                t.saw(p, matched);
                if matched.is_some() && decided.is_none() {
                    decided = Some(Decision {
                        allowed: false,
                        reason: Reason::DeniedByPeerAuthentication,
                        policy: Some(p.name.clone()),
                        rule: None,
                    });
                    if !T::FULL {
                        return decided.unwrap();
                    }
                }
            }
        }
        let mut any_allow = false;
        let mut allowed_by: Option<(&Compiled, usize)> = None;
        for p in self.applicable(c) {
            match p.effect {
                Effect::Deny => {
                    let matched = p.matching_rule(c);
                    t.saw(p, matched);
                    if let Some(i) = matched {
                        if decided.is_none() {
                            decided = Some(Decision {
                                allowed: false,
                                reason: match p.kind {
                                    Kind::AuthorizationPolicy => Reason::DeniedByPolicy,
                                    Kind::PeerAuthentication => Reason::DeniedByPeerAuthentication,
                                },
                                policy: Some(p.name.clone()),
                                rule: (p.kind == Kind::AuthorizationPolicy).then_some(i),
                            });
                        }
                        if !T::FULL {
                            return decided.unwrap();
                        }
                    }
                }
                Effect::Allow => {
                    any_allow = true;
                    if allowed_by.is_none() || T::FULL {
                        let matched = p.matching_rule(c);
                        t.saw(p, matched);
                        if allowed_by.is_none() {
                            allowed_by = matched.map(|i| (p, i));
                        }
                    }
                }
            }
        }
        if let Some(d) = decided {
            return d;
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

    /// For a workload: the peer authentication that makes it STRICT as a whole (Istio's
    /// static strict policy, if it applies), and the converted port-level policy it
    /// references (istiod's `convertedSelectorPeerAuthentications`).
    fn peer_policies<'a>(
        &'a self,
        ns: &'a str,
        labels: &Labels,
    ) -> (Option<&'a PeerEntry>, Option<&'a Compiled>) {
        let own = self
            .peers
            .get(ns)
            .map(|s| s.entries.as_slice())
            .unwrap_or(&[]);
        // The policies that reach the workload: its namespace's without a selector or whose
        // selector's labels it has; the root namespaces' without a selector.
        let reaching = own.iter().filter(|e| e.selects(labels)).chain(
            self.in_other_roots(&self.peers, ns)
                .flat_map(|s| s.entries.iter())
                .filter(|e| e.selector.is_none() && self.mesh_wide(&e.strict.name)),
        );
        let (mut mesh, mut namespace, mut workload) = (None::<&PeerEntry>, None, None);
        for e in reaching {
            let in_root = self.mesh_wide(&e.strict.name);
            let slot = if !e.has_labels() {
                if in_root {
                    &mut mesh
                } else {
                    &mut namespace
                }
            } else if !in_root {
                &mut workload
            } else {
                continue;
            };
            // Each list is oldest first; of two roots' mesh-level policies, the older wins.
            if slot.is_none_or(|s| e.rank < s.rank) {
                *slot = Some(&**e);
            }
        }
        convert::effective_peer(mesh, namespace, workload)
    }

    /// The mutual-TLS mode in force for plaintext to `port` of a workload: `Strict` when a
    /// PeerAuthentication refuses a peer without identity there, else `Permissive`.
    pub fn mtls_mode(&self, namespace: &str, labels: &Labels, port: u16) -> MtlsMode {
        let plain = Conn {
            src_principal: None,
            src_namespace: None,
            src_ip: IpAddr::from([0, 0, 0, 0]),
            dst_ip: IpAddr::from([0, 0, 0, 0]),
            dst_namespace: namespace,
            dst_labels: labels,
            dst_port: port,
        };
        let (strict, port_policy) = self.peer_policies(namespace, labels);
        let scoped_deny = self
            .applicable(&plain)
            .any(|p| p.kind == Kind::PeerAuthentication && p.matching_rule(&plain).is_some());
        if strict.is_some()
            || port_policy.is_some_and(|p| p.matching_rule(&plain).is_some())
            || scoped_deny
        {
            MtlsMode::Strict
        } else {
            MtlsMode::Permissive
        }
    }
}
