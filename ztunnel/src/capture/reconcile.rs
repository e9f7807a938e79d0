//! Enrollment driven by the cluster state: when a namespace gains or loses
//! `ztunnel.dev/dataplane-mode=ambient`, or a pod drops or adds its `=none` opt-out, the
//! running pods of this node are enrolled or released without any CNI call.
//!
//! [`plan`] (pure) compares discovery's [`State`] with the enrolled pods and says what to do;
//! [`Reconciler::run`] applies it on every discovery change and every [`RESYNC`] (which
//! retries failures). A pod to enroll is found by its IP ([`super::find`]) and enrolled
//! through [`Pods::enroll_found`], which records it like a CNI enrollment (attachment
//! `ztunnel-reconciled-<uid>`/`eth0`), so restart recovery serves it again and a later CNI
//! DEL for the pod releases it. Releases go through the same path as CNI DEL.
//!
//! Release needs positive evidence, never absence:
//! - the pod is known and its namespace is known without the label, or the pod opted out →
//!   released;
//! - the pod is unknown to discovery, or discovery places it on another node, or its
//!   namespace is unknown → kept. That may be discovery lag (a watch re-listing, a pod
//!   enrolled at ADD a moment before its event arrives), and releasing would send a running
//!   pod's traffic in plaintext. A deleted pod is released by its CNI DEL; one whose DEL was
//!   lost while the daemon was down is released by restart recovery.
//!
//! Host-network pods are never enrolled (their IP is the node's own address). Every enroll
//! and release is counted (`ztunnel_reconciler_actions_total{action,reason}`) and the pod's
//! annotation updated ([`super::annotate`]); every completed pass is counted
//! (`ztunnel_reconciler_passes_total`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ztunnel_proto::enroll::PodRef;

use super::annotate::Status;
use super::find::{self, FindError};
use super::pods::Pods;
use super::registry::EnrolledPod;
use crate::discovery::enrollment::NotEnrolled;
use crate::discovery::{Discovery, State, Workload};
use crate::metrics::{Metrics, ReconcileLabels};
use crate::net::netns::Netns;

/// How often the reconciler runs without a discovery change (retries failed enrollments).
pub const RESYNC: Duration = Duration::from_secs(10);

/// Why an enrolled pod is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    NamespaceNotAmbient,
    OptedOut,
    /// Its namespace is excluded from the mesh (`--exclude-namespaces`).
    Excluded,
    /// Another mesh (Istio) handles the pod now.
    OtherMesh,
}

impl ReleaseReason {
    pub fn label(self) -> &'static str {
        match self {
            ReleaseReason::NamespaceNotAmbient => "namespace_not_ambient",
            ReleaseReason::OptedOut => "opted_out",
            ReleaseReason::Excluded => "namespace_excluded",
            ReleaseReason::OtherMesh => "other_mesh",
        }
    }
}

/// What to do on this node.
#[derive(Debug, Default)]
pub struct Plan {
    /// Local workloads that should be enrolled and are not.
    pub enroll: Vec<Arc<Workload>>,
    /// Enrolled pods that should not be.
    pub release: Vec<(EnrolledPod, ReleaseReason)>,
    /// Enrolled pods that discovery does not place on this node (kept).
    pub unknown: Vec<EnrolledPod>,
}

/// The plan for `node`, given what is `enrolled` there.
pub fn plan(state: &State, node: &str, enrolled: &[EnrolledPod]) -> Plan {
    let mut out = Plan::default();
    let mut covered: HashSet<&str> = HashSet::new();
    for e in enrolled {
        let release = |why| Some((e.clone(), why));
        let ns_known_unlabelled =
            |ns: &str| state.namespace(ns).is_some() && !state.namespace_enrolled(ns);
        let verdict = match super::decide::workload_of(state, &e.pod, &e.ips) {
            None if ns_known_unlabelled(&e.pod.namespace) => {
                release(ReleaseReason::NamespaceNotAmbient)
            }
            None => None,
            Some(w) => {
                covered.insert(&w.uid);
                if &*w.node != node {
                    None
                } else {
                    match state.enrollment_of(w) {
                        Ok(()) => continue,
                        Err(NotEnrolled::NotAsked) if state.namespace(&w.namespace).is_some() => {
                            release(ReleaseReason::NamespaceNotAmbient)
                        }
                        Err(NotEnrolled::NotAsked) => None,
                        Err(NotEnrolled::OptedOut(_)) => release(ReleaseReason::OptedOut),
                        Err(NotEnrolled::Other(_)) => release(ReleaseReason::OtherMesh),
                        Err(NotEnrolled::Excluded) => release(ReleaseReason::Excluded),
                    }
                }
            }
        };
        match verdict {
            Some(r) => out.release.push(r),
            None => out.unknown.push(e.clone()),
        }
    }
    out.enroll = state
        .local_workloads(node)
        .filter(|w| !w.uid.is_empty() && state.enrolled(w) && !covered.contains(&*w.uid))
        .cloned()
        .collect();
    out
}

/// Applies [`plan`] on every discovery change.
pub struct Reconciler {
    pub pods: Arc<Pods>,
    pub discovery: Discovery,
    pub node: String,
    pub host_proc: PathBuf,
    pub metrics: Arc<Metrics>,
    /// The last failure reported per pod uid (logged and counted when it changes).
    failures: HashMap<Arc<str>, String>,
}

impl Reconciler {
    pub fn new(
        pods: Arc<Pods>,
        discovery: Discovery,
        node: String,
        host_proc: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Reconciler {
        Reconciler {
            pods,
            discovery,
            node,
            host_proc,
            metrics,
            failures: HashMap::new(),
        }
    }

    /// Reconciles now, then on every discovery change and every [`RESYNC`], until the
    /// discovery source is gone.
    pub async fn run(mut self) {
        // One receiver for the whole run, so that each change is seen once.
        let mut disc = self.discovery.clone();
        loop {
            self = match tokio::task::spawn_blocking(move || {
                self.pass();
                self
            })
            .await
            {
                Ok(r) => r,
                // Its task's end stops the daemon, which is restarted.
                Err(e) if e.is_panic() => {
                    tracing::error!("a reconciler pass panicked; the reconciler stops");
                    return;
                }
                // The runtime is shutting down.
                Err(_) => return,
            };
            if let Ok(Err(_)) = tokio::time::timeout(RESYNC, disc.changed()).await {
                return;
            }
        }
    }

    fn count(&self, action: &'static str, reason: &'static str) {
        self.metrics
            .reconciler
            .get_or_create(&ReconcileLabels { action, reason })
            .inc();
    }

    /// One pass (blocking: scans `/proc`, runs `nft`), counted once it is complete
    /// (`ztunnel_reconciler_passes_total`): what a pass would do has been done by then.
    pub fn pass(&mut self) {
        self.apply();
        self.metrics.reconciler_passes.inc();
    }

    fn apply(&mut self) {
        let state = self.discovery.current();
        let p = plan(&state, &self.node, &self.pods.list());
        drop(state);
        for (e, why) in &p.release {
            if self.pods.release_attachment(&e.attachment) {
                tracing::info!(pod = %format!("{}/{}", e.pod.namespace, e.pod.name), reason = why.label(), "released by the reconciler");
                self.count("release", why.label());
                self.pods.annotate(&e.pod, Status::Released);
            }
        }
        for e in &p.unknown {
            tracing::debug!(pod = %format!("{}/{}", e.pod.namespace, e.pod.name),
                "enrolled pod not placed on this node by discovery; kept until CNI DEL");
        }
        let live: HashSet<&str> = p.enroll.iter().map(|w| &*w.uid).collect();
        self.failures.retain(|uid, _| live.contains(&**uid));
        if p.enroll.is_empty() {
            return;
        }
        let host = Netns::host();
        let seen = find::scan(&self.host_proc, host);
        let host_ips = host.run(find::local_addresses);
        let (seen, host_ips) = match (seen, host_ips) {
            (Ok(s), Ok(Ok(h))) => (s, h),
            (Err(e), _) | (_, Err(e)) | (_, Ok(Err(e))) => {
                tracing::warn!(host_proc = %self.host_proc.display(), error = %e, "cannot scan for pods' network namespaces");
                self.count("enroll_failed", "scan_failed");
                return;
            }
        };
        for w in &p.enroll {
            let pod = PodRef {
                namespace: w.namespace.to_string(),
                name: w.name.to_string(),
                uid: w.uid.to_string(),
            };
            let result = match find::choose(&w.ips, &w.uid, &host_ips, &seen) {
                Ok(s) => self
                    .pods
                    .enroll_found(w, &s.path, s.id)
                    .map_err(|e| ("enroll_error", e.to_string())),
                Err(FindError::HostNetwork(_)) => {
                    tracing::debug!(pod = %format!("{}/{}", w.namespace, w.name), "host-network pod: never enrolled");
                    continue;
                }
                Err(e @ FindError::Ambiguous { .. }) => Err(("netns_ambiguous", e.to_string())),
                Err(e @ FindError::NotFound(_)) => Err(("netns_not_found", e.to_string())),
                Err(e @ FindError::NoIp) => Err(("netns_not_found", e.to_string())),
                Err(e @ FindError::UidMismatch { .. }) => {
                    Err(("netns_uid_mismatch", e.to_string()))
                }
            };
            match result {
                Ok(enrolled) => {
                    self.failures.remove(&w.uid);
                    if enrolled {
                        tracing::info!(pod = %format!("{}/{}", w.namespace, w.name), "enrolled by the reconciler");
                        self.count("enroll", "running_pod");
                        self.pods.annotate(&pod, Status::Enrolled);
                    }
                }
                Err((reason, message)) => {
                    if self.failures.get(&w.uid) != Some(&message) {
                        tracing::warn!(pod = %format!("{}/{}", w.namespace, w.name), error = %message, "reconciler cannot enroll the pod; will retry");
                        self.count("enroll_failed", reason);
                        self.pods.annotate(&pod, Status::Failed(message.clone()));
                        self.failures.insert(w.uid.clone(), message);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::registry::reconciled_attachment;
    use ztunnel_proto::enroll::Attachment;

    const MESH: &str = "
trustDomain: cluster.local
namespaces:
  - {name: amb, labels: {ztunnel.dev/dataplane-mode: ambient}}
  - {name: plain}
workloads:
  - {uid: a1, name: a1, namespace: amb, serviceAccount: sa, node: n1, ips: [10.0.0.1]}
  - {uid: a2, name: a2, namespace: amb, serviceAccount: sa, node: n1, ips: [10.0.0.2]}
  - {uid: a3, name: a3, namespace: amb, serviceAccount: sa, node: n2, ips: [10.0.0.3]}
  - {uid: out, name: out, namespace: amb, serviceAccount: sa, node: n1, ips: [10.0.0.4], labels: {ztunnel.dev/dataplane-mode: none}}
  - {uid: p1, name: p1, namespace: plain, serviceAccount: sa, node: n1, ips: [10.0.0.5]}
  - {uid: g1, name: g1, namespace: ghost, serviceAccount: sa, node: n1, ips: [10.0.0.6]}
  - {uid: s1, name: s1, namespace: amb, serviceAccount: sa, node: n1, ips: [10.0.0.7], annotations: {sidecar.istio.io/status: '{}'}}
  - {uid: i1, name: i1, namespace: amb, serviceAccount: sa, node: n1, ips: [10.0.0.8], annotations: {ambient.istio.io/redirection: enabled}}
";

    fn cni(ns: &str, name: &str, uid: &str, ip: &str) -> EnrolledPod {
        EnrolledPod {
            attachment: Attachment {
                container_id: format!("c-{name}"),
                ifname: "eth0".into(),
            },
            pod: PodRef {
                namespace: ns.into(),
                name: name.into(),
                uid: uid.into(),
            },
            ips: vec![ip.parse().unwrap()],
        }
    }

    fn reconciled(ns: &str, name: &str, uid: &str, ip: &str) -> EnrolledPod {
        EnrolledPod {
            attachment: reconciled_attachment(uid),
            ..cni(ns, name, uid, ip)
        }
    }

    /// (enrolled now, expected enroll uids, expected releases (name, reason), expected unknown names)
    type Case = (
        Vec<EnrolledPod>,
        Vec<&'static str>,
        Vec<(&'static str, ReleaseReason)>,
        Vec<&'static str>,
    );

    #[test]
    fn plans() {
        use ReleaseReason::*;
        let s = crate::discovery::parse(MESH, "cluster.local").unwrap();
        let cases: Vec<Case> = vec![
            // Nothing enrolled: the ambient, not opted-out local pods get enrolled (not a3,
            // on n2; not `out`; not p1 in plain; not g1 in an unknown namespace).
            (vec![], vec!["a1", "a2"], vec![], vec![]),
            // Enrolled by CNI or by the reconciler: nothing to do.
            (
                vec![
                    cni("amb", "a1", "a1", "10.0.0.1"),
                    reconciled("amb", "a2", "a2", "10.0.0.2"),
                ],
                vec![],
                vec![],
                vec![],
            ),
            // Matched by name when the record has no uid, by IP when it has neither.
            (
                vec![
                    cni("amb", "a1", "", "10.0.0.1"),
                    cni("", "", "", "10.0.0.2"),
                ],
                vec![],
                vec![],
                vec![],
            ),
            // Opted out, or namespace without the label: released.
            (
                vec![
                    cni("amb", "out", "out", "10.0.0.4"),
                    reconciled("plain", "p1", "p1", "10.0.0.5"),
                ],
                vec!["a1", "a2"],
                vec![("out", OptedOut), ("p1", NamespaceNotAmbient)],
                vec![],
            ),
            // Istio handles it now (a sidecar injected, Istio's ambient mode): released, two
            // proxies on one pod's traffic would break both; never enrolled anew.
            (
                vec![
                    cni("amb", "s1", "s1", "10.0.0.7"),
                    reconciled("amb", "i1", "i1", "10.0.0.8"),
                ],
                vec!["a1", "a2"],
                vec![("s1", OtherMesh), ("i1", OtherMesh)],
                vec![],
            ),
            // Unknown pod in a known unlabelled namespace: released.
            (
                vec![cni("plain", "gone", "x", "10.9.9.9")],
                vec!["a1", "a2"],
                vec![("gone", NamespaceNotAmbient)],
                vec![],
            ),
            // Unknown pod in an ambient namespace (discovery lag), a pod discovery places on
            // another node, a pod of an unknown namespace: kept.
            (
                vec![
                    cni("amb", "new", "n", "10.9.9.8"),
                    cni("amb", "a3", "a3", "10.0.0.3"),
                    cni("ghost", "g1", "g1", "10.0.0.6"),
                    cni("nowhere", "z", "z", "10.9.9.7"),
                ],
                vec!["a1", "a2"],
                vec![],
                vec!["new", "a3", "g1", "z"],
            ),
        ];
        for (i, (enrolled, want_enroll, want_release, want_unknown)) in
            cases.into_iter().enumerate()
        {
            let p = plan(&s, "n1", &enrolled);
            let mut got: Vec<&str> = p.enroll.iter().map(|w| &*w.uid).collect();
            got.sort();
            assert_eq!(got, want_enroll, "case {i}: enroll");
            let got: Vec<(&str, ReleaseReason)> = p
                .release
                .iter()
                .map(|(e, r)| (e.pod.name.as_str(), *r))
                .collect();
            assert_eq!(got, want_release, "case {i}: release");
            let got: Vec<&str> = p.unknown.iter().map(|e| e.pod.name.as_str()).collect();
            assert_eq!(got, want_unknown, "case {i}: unknown");
        }
        // The ambient namespace excluded (`--exclude-namespaces`): its enrolled pods are
        // released, none is enrolled.
        let excluded = s.with_enrollment(crate::discovery::enrollment::Rules {
            excluded: Vec::leak(vec!["amb".to_owned()]),
            ..Default::default()
        });
        let p = plan(&excluded, "n1", &[cni("amb", "a1", "a1", "10.0.0.1")]);
        assert!(p.enroll.is_empty(), "{:?}", p.enroll);
        let got: Vec<(&str, ReleaseReason)> = p
            .release
            .iter()
            .map(|(e, r)| (e.pod.name.as_str(), *r))
            .collect();
        assert_eq!(got, [("a1", Excluded)]);
    }
}
