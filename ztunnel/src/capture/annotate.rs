//! The pod annotation that tells users whether the daemon serves a pod:
//! `ztunnel.dev/enrollment: enrolled` or `failed: <reason>`, removed when the pod is released.
//! An enrolled pod whose identity the CA refuses a certificate shows it:
//! `enrolled; certificate refused: <reason>` (its connections are refused meanwhile), back to
//! `enrolled` once the certificate is issued.
//!
//! Enrollment never waits on the API server: [`Annotator::annotate`] only queues the pod's
//! latest status, and [`KubeAnnotator`]'s worker task applies it with a JSON merge patch on
//! the Pod. A failed patch is logged, counted (`ztunnel_annotation_failures_total`) and
//! retried with backoff; a newer status for the same pod replaces an unapplied older one; a
//! pod that no longer exists (404) is forgotten. The file-source daemon (no API server) uses
//! [`NoAnnotator`].

use std::collections::{HashMap, HashSet};
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
}

/// The JSON merge patch that sets the annotation to `value`, or removes it (`None`).
pub fn patch(value: Option<String>) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {ANNOTATION: value}}})
}

/// The annotation's value for a pod in `status` whose certificate is refused for
/// `refused`, when it is; `None` removes it.
pub fn value(status: &Status, refused: Option<&str>) -> Option<String> {
    match (status, refused) {
        (Status::Enrolled, Some(why)) => Some(format!("enrolled; certificate refused: {why}")),
        (s, _) => s.value(),
    }
}

/// Publishes pods' enrollment status; must never block.
pub trait Annotator: Send + Sync {
    fn annotate(&self, pod: &PodRef, status: Status);
    /// Whether the CA refuses the enrolled pod's certificate (`Some(why)`) or no longer does.
    fn certificate(&self, pod: &PodRef, refused: Option<String>);
}

/// For a daemon without an API server.
pub struct NoAnnotator;

impl Annotator for NoAnnotator {
    fn annotate(&self, _: &PodRef, _: Status) {}
    fn certificate(&self, _: &PodRef, _: Option<String>) {}
}

/// What the worker is told about a pod.
#[derive(Debug)]
enum Update {
    Status(Status),
    Certificate(Option<String>),
}

/// Patches Pods through the API server, from a worker task.
pub struct KubeAnnotator {
    tx: mpsc::UnboundedSender<(PodRef, Update)>,
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

impl KubeAnnotator {
    fn send(&self, pod: &PodRef, update: Update) {
        if pod.namespace.is_empty() || pod.name.is_empty() {
            return;
        }
        let _ = self.tx.send((pod.clone(), update));
    }
}

impl Annotator for KubeAnnotator {
    fn annotate(&self, pod: &PodRef, status: Status) {
        self.send(pod, Update::Status(status));
    }
    fn certificate(&self, pod: &PodRef, refused: Option<String>) {
        self.send(pod, Update::Certificate(refused));
    }
}

/// What the worker knows a pod should show: its status (a pod only heard of through its
/// certificate is enrolled: only enrolled pods get one) and its certificate refusal.
#[derive(Debug)]
struct Desired {
    status: Status,
    refused: Option<String>,
}

impl Desired {
    fn apply(&mut self, update: Update) {
        match update {
            Update::Status(s) => self.status = s,
            Update::Certificate(r) => self.refused = r,
        }
    }

    fn value(&self) -> Option<String> {
        value(&self.status, self.refused.as_deref())
    }
}

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Takes in an update of `pod`: what it should show, and that it is to be written.
fn receive(
    desired: &mut HashMap<Key, Desired>,
    pending: &mut HashSet<Key>,
    pod: PodRef,
    update: Update,
) {
    let key = (pod.namespace, pod.name);
    desired
        .entry(key.clone())
        .or_insert(Desired {
            status: Status::Enrolled,
            refused: None,
        })
        .apply(update);
    pending.insert(key);
}

async fn worker(
    client: kube::Client,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<(PodRef, Update)>,
) {
    // What each pod should show, what its annotation is known to be, and which pods still
    // have to be written.
    let mut desired: HashMap<Key, Desired> = HashMap::new();
    let mut applied: HashMap<Key, Option<String>> = HashMap::new();
    let mut pending: HashSet<Key> = HashSet::new();
    let mut backoff = RETRY_MIN;
    loop {
        if pending.is_empty() {
            let Some((pod, update)) = rx.recv().await else {
                return;
            };
            receive(&mut desired, &mut pending, pod, update);
        }
        while let Ok((pod, update)) = rx.try_recv() {
            receive(&mut desired, &mut pending, pod, update);
        }
        let mut failed = false;
        for key in std::mem::take(&mut pending) {
            let Some(want) = desired.get(&key) else {
                continue;
            };
            let released = want.status == Status::Released;
            let value = want.value();
            if applied.get(&key) == Some(&value) {
                continue;
            }
            let body = patch(value.clone());
            // The patched pod comes back in the answer; decode only the few fields a `LeanPod` has.
            let api: Api<LeanPod> = Api::namespaced(client.clone(), &key.0);
            match api
                .patch(&key.1, &PatchParams::default(), &Patch::Merge(body))
                .await
            {
                Ok(_) => {
                    tracing::debug!(pod = %format!("{}/{}", key.0, key.1), ?value, "annotated");
                    if released {
                        applied.remove(&key);
                        desired.remove(&key);
                    } else {
                        applied.insert(key, value);
                    }
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {
                    applied.remove(&key);
                    desired.remove(&key);
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", key.0, key.1), error = %e, "cannot annotate the pod; will retry");
                    metrics.annotation_failures.inc();
                    failed = true;
                    pending.insert(key);
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
    fn a_refused_certificate_shows_on_an_enrolled_pod_only() {
        let why = Some("no active pod");
        assert_eq!(
            value(&Status::Enrolled, why).as_deref(),
            Some("enrolled; certificate refused: no active pod")
        );
        assert_eq!(value(&Status::Enrolled, None).as_deref(), Some("enrolled"));
        assert_eq!(
            value(&Status::Failed("no netns".into()), why).as_deref(),
            Some("failed: no netns")
        );
        assert_eq!(value(&Status::Released, why), None);
    }

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
                patch(s.value()),
                serde_json::json!({"metadata": {"annotations": {ANNOTATION: want}}}),
                "{s:?}"
            );
        }
    }
}
