//! The pod annotation that tells users whether the daemon serves a pod:
//! `ztunnel.dev/enrollment: enrolled` or `failed: <reason>`, removed when the pod is released.
//!
//! Enrollment never waits on the API server: [`Annotator::annotate`] only queues the pod's
//! latest status, and [`KubeAnnotator`]'s worker task applies it with a JSON merge patch on
//! the Pod. A failed patch is logged, counted (`ztunnel_annotation_failures_total`) and
//! retried with backoff; a newer status for the same pod replaces an unapplied older one; a
//! pod that no longer exists (404) is forgotten. The file-source daemon (no API server) uses
//! [`NoAnnotator`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use tokio::sync::mpsc;
use ztunnel_proto::enroll::PodRef;

use crate::discovery::kube::objects::LeanPod;
use crate::metrics::Metrics;

/// The annotation's key.
pub const ANNOTATION: &str = "ztunnel.dev/enrollment";

/// A pod's enrollment status, as the annotation shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Enrolled,
    Failed(String),
    /// The annotation is removed.
    Released,
}

impl Status {
    /// The annotation's value; `None` removes it.
    pub fn value(&self) -> Option<String> {
        match self {
            Status::Enrolled => Some("enrolled".into()),
            Status::Failed(reason) => Some(format!("failed: {reason}")),
            Status::Released => None,
        }
    }

    /// The JSON merge patch that sets (or removes) the annotation.
    pub fn patch(&self) -> serde_json::Value {
        serde_json::json!({"metadata": {"annotations": {ANNOTATION: self.value()}}})
    }
}

/// Publishes pods' enrollment status; must never block.
pub trait Annotator: Send + Sync {
    fn annotate(&self, pod: &PodRef, status: Status);
}

/// For a daemon without an API server.
pub struct NoAnnotator;

impl Annotator for NoAnnotator {
    fn annotate(&self, _: &PodRef, _: Status) {}
}

/// Patches Pods through the API server, from a worker task.
pub struct KubeAnnotator {
    tx: mpsc::UnboundedSender<(PodRef, Status)>,
}

type Key = (String, String);

impl KubeAnnotator {
    /// Starts the worker on the current runtime.
    pub fn start(client: kube::Client, metrics: Arc<Metrics>) -> Arc<KubeAnnotator> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(worker(client, metrics, rx));
        Arc::new(KubeAnnotator { tx })
    }
}

impl Annotator for KubeAnnotator {
    fn annotate(&self, pod: &PodRef, status: Status) {
        if pod.namespace.is_empty() || pod.name.is_empty() {
            return;
        }
        let _ = self.tx.send((pod.clone(), status));
    }
}

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

async fn worker(
    client: kube::Client,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<(PodRef, Status)>,
) {
    // What each pod's annotation is known to be, and what is still to be written.
    let mut applied: HashMap<Key, Status> = HashMap::new();
    let mut pending: HashMap<Key, Status> = HashMap::new();
    let mut backoff = RETRY_MIN;
    loop {
        if pending.is_empty() {
            let Some((pod, status)) = rx.recv().await else {
                return;
            };
            pending.insert((pod.namespace, pod.name), status);
        }
        while let Ok((pod, status)) = rx.try_recv() {
            pending.insert((pod.namespace, pod.name), status);
        }
        let mut failed = false;
        for (key, status) in std::mem::take(&mut pending) {
            if applied.get(&key) == Some(&status) {
                continue;
            }
            // The patched pod comes back in the answer; decode only the few fields a `LeanPod` has.
            let api: Api<LeanPod> = Api::namespaced(client.clone(), &key.0);
            match api
                .patch(
                    &key.1,
                    &PatchParams::default(),
                    &Patch::Merge(status.patch()),
                )
                .await
            {
                Ok(_) => {
                    tracing::debug!(pod = %format!("{}/{}", key.0, key.1), value = ?status.value(), "annotated");
                    if status == Status::Released {
                        applied.remove(&key);
                    } else {
                        applied.insert(key, status);
                    }
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {
                    applied.remove(&key);
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", key.0, key.1), error = %e, "cannot annotate the pod; will retry");
                    metrics.annotation_failures.inc();
                    failed = true;
                    // A newer status queued meanwhile wins over this one.
                    pending.entry(key).or_insert(status);
                }
            }
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        } else {
            backoff = RETRY_MIN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches() {
        let cases = [
            (Status::Enrolled, serde_json::json!("enrolled")),
            (
                Status::Failed("no netns".into()),
                serde_json::json!("failed: no netns"),
            ),
            (Status::Released, serde_json::Value::Null),
        ];
        for (s, want) in cases {
            assert_eq!(
                s.patch(),
                serde_json::json!({"metadata": {"annotations": {ANNOTATION: want}}}),
                "{s:?}"
            );
        }
    }
}
