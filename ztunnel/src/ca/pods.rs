//! The CA's compact view of the cluster's pods: for each pod (by uid) only its node, namespace,
//! service account and whether it is active (not finished: Pending or Running) — never whole
//! pods (they are decoded as [`crate::discovery::kube::objects::LeanPod`], which skips the
//! rest) — plus a count
//! of active pods per (node, namespace, service account), so "may this node have that
//! identity?" is one lookup.
//!
//! [`spawn_watcher`] keeps an index current from a `kube-runtime` watcher over every pod
//! (re-list on `410 Gone`, backoff on errors). A re-list is buffered and swapped in whole at
//! its end, so a reader never sees a half-listed cluster and pods deleted while the watch was
//! down disappear.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;

use crate::discovery::kube::objects::LeanPod;

/// What the CA keeps of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// `spec.nodeName`; empty while unscheduled.
    pub node: String,
    pub namespace: String,
    pub service_account: String,
    /// Scheduled and not finished: `status.phase` is not `Succeeded` or `Failed` (a Pending
    /// pod counts: its init containers and first connections need certificates).
    pub active: bool,
}

/// Pods by uid, and active pods counted per (node, namespace, service account).
#[derive(Debug, Default)]
pub struct PodIndex {
    by_uid: HashMap<String, PodEntry>,
    /// Key `node/namespace/service-account`: none of the three may contain `/`.
    active: HashMap<String, u32>,
}

fn key(node: &str, namespace: &str, service_account: &str) -> String {
    format!("{node}/{namespace}/{service_account}")
}

impl PodIndex {
    /// Adds or replaces the pod `uid`.
    pub fn apply(&mut self, uid: String, entry: PodEntry) {
        let add = entry.active && !entry.node.is_empty();
        if add {
            *self
                .active
                .entry(key(&entry.node, &entry.namespace, &entry.service_account))
                .or_default() += 1;
        }
        if let Some(old) = self.by_uid.insert(uid, entry) {
            self.uncount(&old);
        }
    }

    /// Removes the pod `uid` (unknown uids are ignored).
    pub fn delete(&mut self, uid: &str) {
        if let Some(old) = self.by_uid.remove(uid) {
            self.uncount(&old);
        }
    }

    fn uncount(&mut self, old: &PodEntry) {
        if !old.active || old.node.is_empty() {
            return;
        }
        let k = key(&old.node, &old.namespace, &old.service_account);
        if let Some(n) = self.active.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.active.remove(&k);
            }
        }
    }

    pub fn get(&self, uid: &str) -> Option<&PodEntry> {
        self.by_uid.get(uid)
    }

    /// Whether an active (Pending or Running) pod with `namespace/service_account` is on `node`.
    pub fn active_on(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        !node.is_empty()
            && self
                .active
                .contains_key(&key(node, namespace, service_account))
    }

    pub fn len(&self) -> usize {
        self.by_uid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uid.is_empty()
    }
}

/// The uid and compact entry of a pod; `None` for a pod without uid, namespace or
/// ServiceAccount. The API server gives every pod a ServiceAccount (`default` unless it names
/// one) except a mirror pod, the API's copy of a kubelet's static pod, which may name none and
/// which a node's own credential can create in any namespace: such a pod lends its node no
/// identity, as in istiod's node authorizer.
pub fn entry_of(pod: &LeanPod) -> Option<(String, PodEntry)> {
    let uid = pod.metadata.uid.clone()?;
    let namespace = pod.metadata.namespace.clone()?;
    let service_account = pod
        .spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())?;
    let entry = PodEntry {
        node: pod.spec.node_name.clone().unwrap_or_default(),
        namespace,
        service_account,
        // Pending included: init containers and a pod's first connections need certificates
        // before the kubelet reports Running. Finished pods need none.
        active: !matches!(pod.status.phase.as_deref(), Some("Succeeded" | "Failed")),
    };
    Some((uid, entry))
}

/// Keeps `index` current from a watch over every pod of the cluster; `synced` becomes true
/// after the first complete list. Runs until the task is dropped.
pub fn spawn_watcher(
    api: Api<LeanPod>,
    index: Arc<RwLock<PodIndex>>,
    synced: watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // `resourceVersion=0` and no page size: the API server answers the list of every pod
        // from its watch cache, in one response, not as paged reads of etcd.
        let mut cfg = watcher::Config::default().any_semantic();
        cfg.page_size = None;
        let stream = watcher::watcher(api, cfg).default_backoff();
        futures::pin_mut!(stream);
        let mut buffer: Option<PodIndex> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => buffer = Some(PodIndex::default()),
                Ok(Event::InitApply(pod)) => {
                    if let (Some(b), Some((uid, e))) = (buffer.as_mut(), entry_of(&pod)) {
                        b.apply(uid, e);
                    }
                }
                Ok(Event::InitDone) => {
                    let fresh = buffer.take().unwrap_or_default();
                    tracing::info!(pods = fresh.len(), "CA: pod index listed");
                    *index.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                    synced.send_replace(true);
                }
                Ok(Event::Apply(pod)) => {
                    if let Some((uid, e)) = entry_of(&pod) {
                        index
                            .write()
                            .unwrap_or_else(|e| e.into_inner())
                            .apply(uid, e);
                    }
                }
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        index.write().unwrap_or_else(|e| e.into_inner()).delete(uid);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "CA: pod watch failed; retrying"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(node: &str, ns: &str, sa: &str, active: bool) -> PodEntry {
        PodEntry {
            node: node.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            active,
        }
    }

    #[test]
    fn counts_follow_applies_updates_and_deletes() {
        let mut ix = PodIndex::default();
        ix.apply("u1".into(), e("n1", "demo", "web", false));
        assert!(
            !ix.active_on("n1", "demo", "web"),
            "pending pods do not count"
        );
        ix.apply("u1".into(), e("n1", "demo", "web", true));
        ix.apply("u2".into(), e("n1", "demo", "web", true));
        assert!(ix.active_on("n1", "demo", "web"));
        assert!(!ix.active_on("n2", "demo", "web"));
        assert!(!ix.active_on("n1", "demo", "db"));
        ix.delete("u1");
        assert!(ix.active_on("n1", "demo", "web"), "u2 still runs");
        // u2 finishes: no longer active.
        ix.apply("u2".into(), e("n1", "demo", "web", false));
        assert!(!ix.active_on("n1", "demo", "web"));
        ix.delete("u2");
        ix.delete("never-seen");
        assert!(ix.is_empty());
        assert!(ix.active.is_empty());
        // Unscheduled pods never count, even for an empty node name.
        ix.apply("u3".into(), e("", "demo", "web", true));
        assert!(!ix.active_on("", "demo", "web"));
    }

    #[test]
    fn entry_of_a_pod() {
        let pod: LeanPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "demo", "uid": "u1"},
            "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": []},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        assert_eq!(
            entry_of(&pod),
            Some(("u1".into(), e("n1", "demo", "web", true)))
        );
        let bare: LeanPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "demo", "uid": "u2"},
            "spec": {"containers": []}
        }))
        .unwrap();
        assert_eq!(
            entry_of(&bare),
            None,
            "a mirror pod names no ServiceAccount"
        );
        let unnamed: LeanPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "demo", "uid": "u2"},
            "spec": {"nodeName": "n1", "serviceAccountName": "", "containers": []}
        }))
        .unwrap();
        assert_eq!(entry_of(&unnamed), None);
        for (phase, active) in [
            ("Pending", true),
            ("Running", true),
            ("Unknown", true),
            ("Succeeded", false),
            ("Failed", false),
        ] {
            let pod: LeanPod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "demo", "uid": "u3"},
                "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": []},
                "status": {"phase": phase}
            }))
            .unwrap();
            assert_eq!(entry_of(&pod).unwrap().1.active, active, "{phase}");
        }
    }
}
