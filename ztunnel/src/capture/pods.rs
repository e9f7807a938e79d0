//! The enrolled pods of this node, and the enrollment operations behind the CNI plugin's
//! requests.
//!
//! [`decide`] is the pure enrollment decision. [`Pods`] applies it: it owns, per attachment,
//! the pod's netns handle and the task serving its listeners, and answers each
//! [`Request`]. Operations are serialized (one at a time) and blocking (they run `nft` and
//! `ip`); the server calls [`Pods::handle`] from a blocking thread.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use ztunnel_proto::enroll::{Attachment, ErrorKind, PodAdd, PodRef, Reply, Request};

use super::netns::Netns;
use super::rules::{self, RulesError};
use super::store::{PodRecord, Store};
use crate::discovery::{State, Workload};
use crate::proxy::{self, Listeners, ProxyInputs, Scope};

/// The enrollment decision for a pod.
#[derive(Debug, PartialEq)]
pub enum Decision {
    Enroll(Arc<Workload>),
    /// Not in the mesh, with the reason.
    NotEnrolled(String),
    /// Should be in the mesh but cannot be served yet (discovery has not caught up).
    TryAgain(String),
}

/// Decides whether the pod joins the mesh on `node`: its namespace is labelled `ambient`, it
/// did not opt out, and discovery knows it on this node.
pub fn decide(state: &State, node: &str, pod: &PodRef, ips: &[IpAddr]) -> Decision {
    let known = (!pod.uid.is_empty())
        .then(|| state.workload_by_uid(&pod.uid))
        .flatten()
        .or_else(|| state.workload_by_name(&pod.namespace, &pod.name))
        .or_else(|| ips.iter().find_map(|ip| state.workload_by_ip(*ip)));
    let Some(w) = known else {
        if pod.namespace.is_empty() {
            return Decision::NotEnrolled("not a Kubernetes pod (no K8S_POD_NAMESPACE)".into());
        }
        if !state.namespace_enrolled(&pod.namespace) {
            return Decision::NotEnrolled(format!("namespace {} is not enrolled", pod.namespace));
        }
        return Decision::TryAgain(format!(
            "pod {}/{} is not known to discovery yet",
            pod.namespace, pod.name
        ));
    };
    if !state.namespace_enrolled(&w.namespace) {
        return Decision::NotEnrolled(format!("namespace {} is not enrolled", w.namespace));
    }
    if !state.enrolled(w) {
        return Decision::NotEnrolled("the pod opted out (ztunnel.dev/dataplane-mode=none)".into());
    }
    if &*w.node != node {
        return Decision::TryAgain(format!(
            "discovery places pod {}/{} on node {}, not {node}",
            w.namespace, w.name, w.node
        ));
    }
    Decision::Enroll(w.clone())
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot open the pod's netns {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error("capture rules: {0}")]
    Rules(#[from] RulesError),
    #[error("cannot listen in the pod's netns: {0}")]
    Listen(std::io::Error),
    #[error("cannot record the pod: {0}")]
    Store(std::io::Error),
}

struct Enrolled {
    record: PodRecord,
    netns: Arc<Netns>,
    serving: tokio::task::JoinHandle<()>,
}

/// The pods this daemon serves.
pub struct Pods {
    pi: Arc<ProxyInputs>,
    store: Store,
    ready: watch::Receiver<bool>,
    rt: tokio::runtime::Handle,
    enrolled: Mutex<HashMap<Attachment, Enrolled>>,
}

fn error(kind: ErrorKind, message: impl ToString) -> Reply {
    Reply::Error {
        kind,
        message: message.to_string(),
    }
}

impl Pods {
    /// Must be called inside the daemon's runtime.
    pub fn new(pi: Arc<ProxyInputs>, store: Store, ready: watch::Receiver<bool>) -> Arc<Pods> {
        Arc::new(Pods {
            pi,
            store,
            ready,
            rt: tokio::runtime::Handle::current(),
            enrolled: Mutex::default(),
        })
    }

    /// Counts a refused enrollment request.
    pub fn refused(&self, reason: &'static str) {
        self.pi.metrics.refused(reason);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How many pods are enrolled.
    pub fn len(&self) -> usize {
        self.enrolled.lock().expect("pods lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answers one request of the CNI plugin (blocking).
    pub fn handle(&self, req: Request) -> Reply {
        match req {
            Request::Add(add) => self.add(add),
            Request::Del(del) => {
                self.release(&del.attachment);
                Reply::Ok
            }
            Request::Check(add) => self.check(add),
            Request::Status => {
                if *self.ready.borrow() {
                    Reply::Ok
                } else {
                    error(
                        ErrorKind::NotAvailable,
                        "the daemon is not ready (certificates or discovery)",
                    )
                }
            }
            Request::Gc { valid } => {
                let valid: HashSet<Attachment> = valid.into_iter().collect();
                let stale: Vec<Attachment> = self
                    .enrolled
                    .lock()
                    .expect("pods lock")
                    .keys()
                    .filter(|a| !valid.contains(a))
                    .cloned()
                    .collect();
                for a in &stale {
                    self.release(a);
                }
                tracing::info!(released = stale.len(), "garbage collection");
                Reply::Ok
            }
        }
    }

    fn add(&self, add: PodAdd) -> Reply {
        let state = self.pi.discovery.current();
        let w = match decide(&state, &self.pi.node, &add.pod, &add.ips) {
            Decision::Enroll(w) => w,
            Decision::NotEnrolled(reason) => {
                tracing::info!(pod = %format!("{}/{}", add.pod.namespace, add.pod.name), %reason, "not enrolled");
                return Reply::NotEnrolled { reason };
            }
            Decision::TryAgain(reason) => {
                tracing::warn!(pod = %format!("{}/{}", add.pod.namespace, add.pod.name), %reason, "cannot enroll yet");
                self.pi.metrics.refused("enrollment_try_again");
                return error(ErrorKind::TryAgain, reason);
            }
        };
        drop(state);
        let record = PodRecord {
            attachment: add.attachment.clone(),
            netns: add.netns.clone().into(),
            pod: add.pod.clone(),
            ips: add.ips.clone(),
        };
        // A repeated ADD for the same attachment replaces the old listeners; the rules stay
        // in place throughout (they are replaced atomically), so the pod is never uncaptured.
        if let Some(old) = self
            .enrolled
            .lock()
            .expect("pods lock")
            .remove(&add.attachment)
        {
            old.serving.abort();
        }
        match self.enroll(record, &w) {
            Ok(()) => Reply::Enrolled,
            Err(e) => {
                tracing::warn!(pod = %format!("{}/{}", add.pod.namespace, add.pod.name), error = %e, "enrollment failed");
                self.pi.metrics.refused("enrollment_failed");
                error(ErrorKind::TryAgain, e)
            }
        }
    }

    /// Installs the rules, starts the listeners, records the pod.
    fn enroll(&self, record: PodRecord, w: &Workload) -> Result<(), EnrollError> {
        let netns = Arc::new(
            Netns::open(&record.netns).map_err(|source| EnrollError::Netns {
                path: record.netns.display().to_string(),
                source,
            })?,
        );
        rules::install(&netns)?;
        let listeners = {
            let _rt = self.rt.enter();
            Listeners::bind(Some(&netns), IpAddr::V4(Ipv4Addr::UNSPECIFIED))
                .map_err(EnrollError::Listen)?
        };
        self.store.save(&record).map_err(EnrollError::Store)?;
        if let Err(e) = rules::node_probe_set(&record.ips, true) {
            tracing::warn!(error = %e, "cannot add the pod to the node's probe set; kubelet probes may be captured");
        }
        let scope = Scope::Pod {
            uid: w.uid.clone(),
            netns: netns.clone(),
        };
        let serving = self
            .rt
            .spawn(proxy::serve(self.pi.clone(), scope, listeners));
        tracing::info!(pod = %format!("{}/{}", w.namespace, w.name), identity = %w.identity(&self.pi.trust_domain),
            netns = %record.netns.display(), ips = ?record.ips, "enrolled");
        let mut enrolled = self.enrolled.lock().expect("pods lock");
        enrolled.insert(
            record.attachment.clone(),
            Enrolled {
                record,
                netns,
                serving,
            },
        );
        self.pi.metrics.enrolled_pods.set(enrolled.len() as i64);
        Ok(())
    }

    /// Stops the pod's listeners, removes its rules and record. Idempotent.
    fn release(&self, a: &Attachment) {
        let removed = {
            let mut enrolled = self.enrolled.lock().expect("pods lock");
            let e = enrolled.remove(a);
            self.pi.metrics.enrolled_pods.set(enrolled.len() as i64);
            e
        };
        let Some(e) = removed else {
            let _ = self.store.remove(a);
            return;
        };
        e.serving.abort();
        if let Err(err) = rules::remove(&e.netns) {
            tracing::debug!(error = %err, "cannot remove the pod's rules (netns gone?)");
        }
        let _ = rules::node_probe_set(&e.record.ips, false);
        if let Err(err) = self.store.remove(a) {
            tracing::warn!(error = %err, "cannot remove the pod's record");
        }
        tracing::info!(pod = %format!("{}/{}", e.record.pod.namespace, e.record.pod.name), "released");
    }

    fn check(&self, add: PodAdd) -> Reply {
        let guard = self.enrolled.lock().expect("pods lock");
        match guard.get(&add.attachment) {
            Some(e) => {
                if e.serving.is_finished() {
                    return error(
                        ErrorKind::CheckFailed,
                        "the pod's listeners are not running",
                    );
                }
                match rules::check(&e.netns) {
                    Ok(()) => Reply::Ok,
                    Err(err) => error(ErrorKind::CheckFailed, err),
                }
            }
            None => {
                drop(guard);
                let state = self.pi.discovery.current();
                match decide(&state, &self.pi.node, &add.pod, &add.ips) {
                    Decision::NotEnrolled(_) => Reply::Ok,
                    _ => error(
                        ErrorKind::CheckFailed,
                        "the pod should be enrolled but is not",
                    ),
                }
            }
        }
    }

    /// Serves again every pod recorded on the node whose netns still exists; forgets the
    /// others. Returns how many were recovered.
    pub fn recover(&self) -> usize {
        let records = match self.store.load_all() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pod records");
                return 0;
            }
        };
        let mut n = 0;
        for r in records {
            let state = self.pi.discovery.current();
            let decision = decide(&state, &self.pi.node, &r.pod, &r.ips);
            drop(state);
            let result = match decision {
                Decision::Enroll(w) => self.enroll(r.clone(), &w).map_err(|e| e.to_string()),
                Decision::NotEnrolled(reason) | Decision::TryAgain(reason) => Err(reason),
            };
            match result {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", r.pod.namespace, r.pod.name), error = %e, "not recovered; released");
                    if let Ok(ns) = Netns::open(&r.netns) {
                        let _ = rules::remove(&ns);
                    }
                    let _ = self.store.remove(&r.attachment);
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = "
trustDomain: cluster.local
namespaces:
  - {name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}
  - {name: plain}
workloads:
  - {uid: u1, name: web-0, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.1]}
  - {uid: u2, name: web-1, namespace: demo, serviceAccount: web, node: n2, ips: [10.0.0.2]}
  - {uid: u3, name: out, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.3], labels: {ztunnel.dev/dataplane-mode: none}}
  - {uid: u4, name: old, namespace: plain, serviceAccount: default, node: n1, ips: [10.0.0.4]}
";

    fn pod(ns: &str, name: &str, uid: &str) -> PodRef {
        PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn decisions() {
        let s = crate::discovery::parse(MESH, "cluster.local").unwrap();
        let ip = |s: &str| vec![s.parse::<IpAddr>().unwrap()];
        let cases: Vec<(PodRef, Vec<IpAddr>, &str)> = vec![
            (pod("demo", "web-0", "u1"), ip("10.0.0.1"), "enroll"),
            (pod("demo", "web-0", ""), ip("10.0.0.1"), "enroll"), // by name
            (pod("", "", ""), ip("10.0.0.1"), "enroll"),          // by address
            (pod("demo", "web-1", "u2"), ip("10.0.0.2"), "try"),  // other node
            (pod("demo", "new", "u9"), ip("10.0.0.9"), "try"),    // discovery lags
            (pod("demo", "out", "u3"), ip("10.0.0.3"), "not"),    // opted out
            (pod("plain", "old", "u4"), ip("10.0.0.4"), "not"),   // namespace not enrolled
            (pod("plain", "new", "u8"), ip("10.0.0.8"), "not"),   // unknown, plain namespace
            (pod("", "", ""), ip("10.9.9.9"), "not"),             // not a Kubernetes pod
        ];
        for (p, ips, want) in cases {
            let got = match decide(&s, "n1", &p, &ips) {
                Decision::Enroll(w) => {
                    assert_eq!(&*w.uid, "u1");
                    "enroll"
                }
                Decision::NotEnrolled(_) => "not",
                Decision::TryAgain(_) => "try",
            };
            assert_eq!(got, want, "{p:?} {ips:?}");
        }
    }
}
