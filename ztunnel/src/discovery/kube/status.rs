//! Policy status: each `AuthorizationPolicy` and `PeerAuthentication` gets one condition
//! ([`CONDITION_TYPE`]) saying whether the daemons enforce it as written, narrowed (what was
//! dropped and why), fail-closed (why it could not be read), or not at all (AUDIT, CUSTOM,
//! `targetRef`), so `kubectl get -o yaml` shows what the mesh does with it.
//!
//! Every daemon computes the same condition from the same object ([`status_of`] is pure and
//! deterministic). A daemon writes it only when the object's current condition differs in
//! `status`, `reason`, `message` or `observedGeneration`, after a random delay of up to
//! [`MAX_DELAY`], and only if the condition it last saw still differs then: the first daemon to
//! write makes the others' writes unnecessary, so a cluster of many nodes sends a few writes
//! per change, not one per node. Writes are server-side applies of the status subresource
//! with field manager [`FIELD_MANAGER`]; a failed write is logged and retried on the next
//! change of the object (or the watch's next re-list). A deleted object's pending write
//! fails with `404`, which is logged at debug level only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use parking_lot::Mutex;
use serde_json::{json, Value};

pub use crate::policy::{status_of, PolicyStatus, CONDITION_TYPE};

/// The field manager of the daemons' status writes.
pub const FIELD_MANAGER: &str = "ztunnel";
/// The longest a daemon waits before writing a status, so that another daemon's write can
/// make its own unnecessary.
pub const MAX_DELAY: Duration = Duration::from_secs(3);

/// One object's wanted condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub status: PolicyStatus,
}

/// The condition as it is written, without its transition time.
pub fn condition(w: &Wanted) -> Value {
    let mut c = json!({
        "type": CONDITION_TYPE,
        "status": if w.status.accepted { "True" } else { "False" },
        "reason": w.status.reason,
        "message": w.status.message,
    });
    if let Some(g) = w.generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

/// Whether `object`'s current status already carries `w`'s condition (transition time aside).
pub fn up_to_date(object: &Value, w: &Wanted) -> bool {
    let want = condition(w);
    object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            ["type", "status", "reason", "message", "observedGeneration"]
                .iter()
                .all(|k| c.get(*k).unwrap_or(&Value::Null) == want.get(*k).unwrap_or(&Value::Null))
        })
}

type Key = (&'static str, String, String);

/// The status writer: the watchers report each policy object's wanted condition and whether
/// it is already there; the writer applies the missing ones.
#[derive(Clone)]
pub struct StatusWriter {
    /// Objects whose condition is not (yet) the wanted one, as last reported.
    pending: Arc<Mutex<HashMap<Key, Wanted>>>,
    wake: Arc<tokio::sync::Notify>,
}

impl StatusWriter {
    /// Starts the writer on `client`; its task runs until it is aborted.
    pub fn start(client: Client) -> (StatusWriter, tokio::task::JoinHandle<()>) {
        let w = StatusWriter {
            pending: Arc::default(),
            wake: Arc::default(),
        };
        let task = tokio::spawn(w.clone().run(client));
        (w, task)
    }

    /// Reports what `object` (as the API server sent it) should say.
    pub fn observe(&self, object: &Value, wanted: Wanted) {
        let key = (wanted.kind, wanted.namespace.clone(), wanted.name.clone());
        let fresh = up_to_date(object, &wanted);
        let mut pending = self.pending.lock();
        if fresh {
            pending.remove(&key);
        } else {
            pending.insert(key, wanted);
            drop(pending);
            self.wake.notify_one();
        }
    }

    async fn run(self, client: Client) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(jitter()).await;
            // What is still pending after the delay: another daemon's write, seen by the
            // watch meanwhile, has removed what it made unnecessary.
            let due: Vec<Wanted> = self.pending.lock().drain().map(|(_, w)| w).collect();
            for w in due {
                if let Err(e) = write(&client, &w).await {
                    if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                        tracing::debug!(kind = w.kind, namespace = %w.namespace, name = %w.name, "policy gone before its status was written");
                        continue;
                    }
                    tracing::warn!(kind = w.kind, namespace = %w.namespace, name = %w.name, error = %e, "cannot write the policy's status; retried on its next change");
                } else {
                    tracing::info!(kind = w.kind, namespace = %w.namespace, name = %w.name, reason = w.status.reason, message = %w.status.message, "policy status written");
                }
            }
        }
    }
}

/// Up to [`MAX_DELAY`], from the clock's low bits (no two daemons start in step).
fn jitter() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    MAX_DELAY.mul_f64(f64::from(nanos % 1000) / 1000.0)
}

async fn write(client: &Client, w: &Wanted) -> Result<(), kube::Error> {
    let plural = match w.kind {
        "AuthorizationPolicy" => "authorizationpolicies",
        _ => "peerauthentications",
    };
    let ar = ApiResource {
        group: "security.ztunnel.dev".into(),
        version: "v1".into(),
        api_version: crate::discovery::policy::API_VERSION.into(),
        kind: w.kind.into(),
        plural: plural.into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &w.namespace, &ar);
    let mut c = condition(w);
    c["lastTransitionTime"] = json!(now_rfc3339());
    let body = json!({
        "apiVersion": crate::discovery::policy::API_VERSION,
        "kind": w.kind,
        "metadata": {"name": w.name, "namespace": w.namespace},
        "status": {"conditions": [c]},
    });
    api.patch_status(
        &w.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(|_| ())
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(accepted: bool, reason: &'static str, message: &str) -> Wanted {
        Wanted {
            kind: "AuthorizationPolicy",
            namespace: "demo".into(),
            name: "p".into(),
            generation: Some(3),
            status: PolicyStatus {
                accepted,
                fail_closed: !accepted,
                reason,
                message: message.into(),
            },
        }
    }

    #[test]
    fn up_to_date_compares_everything_but_the_transition_time() {
        let w = wanted(true, "UnsupportedValue", "methods dropped");
        let mut c = condition(&w);
        c["lastTransitionTime"] = json!("2026-01-01T00:00:00Z");
        let object = json!({"status": {"conditions": [{"type": "Other", "status": "True"}, c]}});
        assert!(up_to_date(&object, &w));
        for other in [
            wanted(false, "UnsupportedValue", "methods dropped"),
            wanted(true, "Accepted", "methods dropped"),
            wanted(true, "UnsupportedValue", "paths dropped"),
            Wanted {
                generation: Some(4),
                ..w.clone()
            },
        ] {
            assert!(!up_to_date(&object, &other), "{other:?}");
        }
        assert!(!up_to_date(&json!({}), &w));
        assert!(!up_to_date(&json!({"status": {}}), &w));
    }

    #[test]
    fn jitter_stays_within_the_bound() {
        for _ in 0..100 {
            assert!(jitter() <= MAX_DELAY);
        }
    }
}
