//! The enrolled pods of this node, and the enrollment operations behind the CNI plugin's
//! requests.
//!
//! [`Pods`] applies the enrollment decision ([`decide`]): it owns, per attachment,
//! the pod's netns handle and the task serving its listeners, and answers each
//! [`Request`]. Operations are serialized (one at a time) and blocking (they run `nft` and
//! `ip`); the server calls [`Pods::handle`] from a blocking thread. The reconciler
//! ([`super::reconcile`]) enrolls running pods it found itself ([`Pods::enroll_found`], under
//! a `ztunnel-reconciled-<uid>` attachment that a CNI DEL for the pod also releases) and
//! releases through the same path as DEL. Outcomes are published as the pod's annotation
//! ([`super::annotate`]).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::watch;
use ztunnel_proto::enroll::{Attachment, ErrorKind, PodAdd, PodRef, Reply, Request};

use super::annotate::{Annotator, Status};
use super::decide::{decide, Decision};
use super::rules::{self, RulesError};
use super::store::{PodRecord, Store};
use crate::discovery::Workload;
use crate::net::netns::Netns;
use crate::proxy::{self, Listeners, ProxyInputs, Scope};
use crate::refusal::Reason;

/// How long a release waits for the pod's connections to close before it removes the rules
/// that carry them.
pub const RELEASE_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

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

/// The container id recorded for a pod the reconciler enrolled (the runtime's id is not
/// known): `ztunnel-reconciled-<pod uid>`, interface `eth0`. A later CNI DEL for the pod
/// matches it by pod (uid, else namespace/name) or by netns, and CNI GC leaves it alone.
pub const RECONCILED_PREFIX: &str = "ztunnel-reconciled-";

/// The attachment of a pod enrolled by the reconciler.
pub fn reconciled_attachment(uid: &str) -> Attachment {
    Attachment {
        container_id: format!("{RECONCILED_PREFIX}{uid}"),
        ifname: "eth0".into(),
    }
}

/// Whether `a` was enrolled by the reconciler rather than by CNI ADD.
pub fn is_reconciled(a: &Attachment) -> bool {
    a.container_id.starts_with(RECONCILED_PREFIX)
}

/// Whether two references name the same pod (by uid when both have one).
fn same_pod(a: &PodRef, b: &PodRef) -> bool {
    if !a.uid.is_empty() && !b.uid.is_empty() {
        return a.uid == b.uid;
    }
    !a.name.is_empty() && a.namespace == b.namespace && a.name == b.name
}

/// An enrolled pod, as the reconciler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    pub attachment: Attachment,
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
}

/// The pods this daemon serves.
pub struct Pods {
    pi: Arc<ProxyInputs>,
    store: Store,
    ready: watch::Receiver<bool>,
    rt: tokio::runtime::Handle,
    enrolled: Mutex<HashMap<Attachment, Enrolled>>,
    /// Serializes enrollments and releases (CNI and reconciler).
    op: Mutex<()>,
    annotator: OnceLock<Arc<dyn Annotator>>,
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
            op: Mutex::default(),
            annotator: OnceLock::new(),
        })
    }

    /// Publishes enrollment status through `a` from now on (set once).
    pub fn set_annotator(&self, a: Arc<dyn Annotator>) {
        let _ = self.annotator.set(a);
    }

    /// Queues `pod`'s status for its annotation (never blocks).
    pub fn annotate(&self, pod: &PodRef, status: Status) {
        if let Some(a) = self.annotator.get() {
            a.annotate(pod, status);
        }
    }

    /// Queues whether the CA refuses `pod`'s certificate, for its annotation (never blocks).
    pub fn certificate(&self, pod: &PodRef, refused: Option<String>) {
        if let Some(a) = self.annotator.get() {
            a.certificate(pod, refused);
        }
    }

    fn op(&self) -> MutexGuard<'_, ()> {
        self.op.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every enrolled pod.
    pub fn list(&self) -> Vec<EnrolledPod> {
        self.enrolled
            .lock()
            .expect("pods lock")
            .iter()
            .map(|(a, e)| EnrolledPod {
                attachment: a.clone(),
                pod: e.record.pod.clone(),
                ips: e.record.ips.clone(),
            })
            .collect()
    }

    /// Enrolls `w` in the netns found at `path` (by the reconciler), which must still be the
    /// namespace `id`; a no-op (false) if the pod is enrolled already. Blocking.
    pub fn enroll_found(
        &self,
        w: &Workload,
        path: &Path,
        id: (u64, u64),
    ) -> Result<bool, EnrollError> {
        let _op = self.op();
        let pod = PodRef {
            namespace: w.namespace.to_string(),
            name: w.name.to_string(),
            uid: w.uid.to_string(),
        };
        // Enrolled meanwhile (by CNI ADD, perhaps under another name or by address only).
        if self
            .list()
            .iter()
            .any(|e| same_pod(&e.pod, &pod) || e.ips.iter().any(|ip| w.ips.contains(ip)))
        {
            return Ok(false);
        }
        let netns_err = |source| EnrollError::Netns {
            path: path.display().to_string(),
            source,
        };
        let netns = Netns::open(path).map_err(netns_err)?;
        if netns.id() != id {
            return Err(netns_err(std::io::Error::other(
                "the process left; the path now names another namespace",
            )));
        }
        let record = PodRecord {
            attachment: reconciled_attachment(&w.uid),
            netns: path.to_owned(),
            pod,
            ips: w.ips.to_vec(),
        };
        self.enroll_in(record, w, Arc::new(netns))?;
        Ok(true)
    }

    /// Releases the pod enrolled under `a` (for the reconciler); whether it was enrolled.
    pub fn release_attachment(&self, a: &Attachment) -> bool {
        let _op = self.op();
        self.release(a)
    }

    /// The reconciler-enrolled attachments of the pod `pod` or in the netns at `netns`.
    fn reconciled_of(&self, pod: Option<&PodRef>, netns: &str) -> Vec<Attachment> {
        let id = (!netns.is_empty())
            .then(|| std::fs::metadata(netns).ok())
            .flatten()
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
        self.enrolled
            .lock()
            .expect("pods lock")
            .iter()
            .filter(|(a, e)| {
                is_reconciled(a)
                    && (pod.is_some_and(|p| same_pod(p, &e.record.pod))
                        || id.is_some_and(|id| e.netns.id() == id))
            })
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Counts a refused enrollment request.
    pub fn refused(&self, reason: Reason) {
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
            Request::Add(add) => {
                let _op = self.op();
                self.add(add)
            }
            Request::Del(del) => {
                let _op = self.op();
                let mut released = self.release(&del.attachment);
                for a in self.reconciled_of(del.pod.as_ref(), &del.netns) {
                    released |= self.release(&a);
                }
                if let (true, Some(pod)) = (released, &del.pod) {
                    self.annotate(pod, Status::Released);
                }
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
                let _op = self.op();
                let valid: HashSet<Attachment> = valid.into_iter().collect();
                // The runtime does not know the reconciler's attachments: the reconciler
                // and DEL release those.
                let stale: Vec<Attachment> = self
                    .enrolled
                    .lock()
                    .expect("pods lock")
                    .keys()
                    .filter(|a| !valid.contains(a) && !is_reconciled(a))
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
            Decision::OtherMesh(reason) => {
                crate::refused!(self.pi.metrics, Reason::EnrollmentOtherMesh, pod = %format!("{}/{}", add.pod.namespace, add.pod.name), %reason, "not enrolled: refused");
                return Reply::NotEnrolled { reason };
            }
            Decision::TryAgain(reason) => {
                crate::refused!(self.pi.metrics, Reason::EnrollmentTryAgain, pod = %format!("{}/{}", add.pod.namespace, add.pod.name), %reason, "cannot enroll yet");
                self.annotate(&add.pod, Status::Failed(reason.clone()));
                return error(ErrorKind::TryAgain, reason);
            }
        };
        drop(state);
        // The reconciler may have enrolled this pod already (found by its IP): CNI takes
        // over. Same netns: the rules stay and are replaced atomically below; another netns
        // (a new sandbox): the old one is released in full.
        let new_id = std::fs::metadata(&add.netns).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        for a in self.reconciled_of(Some(&add.pod), "") {
            let old = self.enrolled.lock().expect("pods lock").remove(&a);
            if let Some(old) = old {
                if Some(old.netns.id()) != new_id {
                    self.enrolled
                        .lock()
                        .expect("pods lock")
                        .insert(a.clone(), old);
                    self.release(&a);
                } else {
                    old.serving.abort();
                    let _ = self.store.remove(&a);
                }
            }
        }
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
            Ok(()) => {
                self.annotate(&add.pod, Status::Enrolled);
                Reply::Enrolled
            }
            Err(e) => {
                crate::refused!(self.pi.metrics, Reason::EnrollmentFailed, pod = %format!("{}/{}", add.pod.namespace, add.pod.name), error = %e, "enrollment failed");
                self.annotate(&add.pod, Status::Failed(e.to_string()));
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
        self.enroll_in(record, w, netns)
    }

    fn enroll_in(
        &self,
        record: PodRecord,
        w: &Workload,
        netns: Arc<Netns>,
    ) -> Result<(), EnrollError> {
        // A pod with an IPv6 address gets the IPv6 policy route and a second set of listeners
        // on `[::]` (IPv6 only), beside the IPv4 ones.
        let ipv6 = record.ips.iter().any(IpAddr::is_ipv6);
        rules::install(&netns, ipv6)?;
        let (listeners, listeners6) = {
            let _rt = self.rt.enter();
            let bind = |ip| {
                Listeners::bind(Some(&netns), ip, self.pi.quic_listen).map_err(EnrollError::Listen)
            };
            let v6 = if ipv6 {
                Some(bind(IpAddr::V6(Ipv6Addr::UNSPECIFIED))?)
            } else {
                None
            };
            (bind(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?, v6)
        };
        // Held from before the record is written until the pod is in the table, so that a
        // CHECK (or anything else that reads the table) never sees the record of a pod that
        // the table does not hold yet.
        let mut enrolled = self.enrolled.lock().expect("pods lock");
        self.store.save(&record).map_err(EnrollError::Store)?;
        if let Err(e) = rules::node_probe_set(&record.ips, true) {
            tracing::warn!(error = %e, "cannot add the pod to the node's probe set; kubelet probes may be captured");
        }
        let scope = Scope::Pod {
            uid: w.uid.clone(),
            netns: netns.clone(),
        };
        let pi = self.pi.clone();
        let serving = self.rt.spawn(async move {
            let v4 = proxy::serve(pi.clone(), scope.clone(), listeners);
            match listeners6 {
                Some(l) => drop(tokio::join!(v4, proxy::serve(pi, scope, l))),
                None => v4.await,
            }
        });
        tracing::info!(pod = %format!("{}/{}", w.namespace, w.name), identity = %w.identity(&self.pi.trust_domain),
            netns = %record.netns.display(), ips = ?record.ips, "enrolled");
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

    /// Stops the pod's listeners, closes its connections, removes its rules and record.
    /// Idempotent; whether the pod was enrolled.
    ///
    /// No connection of the pod survives its rules. An outbound one was redirected by the
    /// pod's NAT chain, and with the last NAT chain gone from the netns the kernel no longer
    /// translates the flow: the application's next segment goes to the real destination, which
    /// answers with a reset, and the daemon's side is left open. An inbound one was connected
    /// to the application from the client's address, and without the policy route the
    /// application's replies leave the pod instead of reaching the daemon: both ends stall.
    /// So each is told to close while the rules still carry it ([`ConnTable::close_pod`]),
    /// and the rules go once they have (or after [`RELEASE_DRAIN`]). New connections go plain
    /// at once.
    ///
    /// [`ConnTable::close_pod`]: crate::proxy::conns::ConnTable::close_pod
    fn release(&self, a: &Attachment) -> bool {
        let removed = {
            let mut enrolled = self.enrolled.lock().expect("pods lock");
            let e = enrolled.remove(a);
            self.pi.metrics.enrolled_pods.set(enrolled.len() as i64);
            e
        };
        let Some(e) = removed else {
            let _ = self.store.remove(a);
            return false;
        };
        e.serving.abort();
        let ips: Vec<IpAddr> = e.record.ips.iter().map(|ip| ip.to_canonical()).collect();
        let closing = self.pi.connections.close_pod(&ips);
        let deadline = tokio::time::Instant::now() + RELEASE_DRAIN;
        let left = self
            .rt
            .block_on(self.pi.connections.until_pod_closed(&ips, deadline));
        if closing > 0 {
            tracing::info!(
                closing,
                left,
                "closed the pod's connections before removing its rules"
            );
        }
        let tunnels = self.pi.pool.evict_netns(&e.netns);
        tracing::debug!(
            tunnels,
            "closed the tunnel connections leaving from the pod"
        );
        if let Err(err) = rules::remove(&e.netns) {
            tracing::debug!(error = %err, "cannot remove the pod's rules (netns gone?)");
        }
        let _ = rules::node_probe_set(&e.record.ips, false);
        if let Err(err) = self.store.remove(a) {
            tracing::warn!(error = %err, "cannot remove the pod's record");
        }
        tracing::info!(pod = %format!("{}/{}", e.record.pod.namespace, e.record.pod.name), "released");
        true
    }

    fn check(&self, add: PodAdd) -> Reply {
        // A pod the reconciler enrolled is checked under its own attachment.
        let key = self
            .reconciled_of(Some(&add.pod), &add.netns)
            .into_iter()
            .next()
            .unwrap_or_else(|| add.attachment.clone());
        let guard = self.enrolled.lock().expect("pods lock");
        match guard.get(&add.attachment).or_else(|| guard.get(&key)) {
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
            // A reconciler record names `<proc>/<pid>/ns/net`: the pid may have been reused
            // since, by any process. Serve it again only if that namespace still holds the
            // pod's IP and the process is still the pod's (its cgroup names the pod's UID);
            // otherwise forget the record without touching that namespace (the reconciler
            // finds the pod again).
            if is_reconciled(&r.attachment)
                && !(holds_ips(&r.netns, &r.ips)
                    && super::find::pod_uid_of_netns_path(&r.netns).as_deref()
                        == Some(r.pod.uid.as_str()))
            {
                tracing::info!(pod = %format!("{}/{}", r.pod.namespace, r.pod.name), netns = %r.netns.display(),
                    "reconciler record no longer names the pod's netns; forgotten");
                let _ = self.store.remove(&r.attachment);
                continue;
            }
            let state = self.pi.discovery.current();
            let decision = decide(&state, &self.pi.node, &r.pod, &r.ips);
            drop(state);
            let result = match decision {
                Decision::Enroll(w) => self.enroll(r.clone(), &w).map_err(|e| e.to_string()),
                Decision::NotEnrolled(reason)
                | Decision::TryAgain(reason)
                | Decision::OtherMesh(reason) => Err(reason),
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

/// Whether the namespace at `path` has one of `ips` on an interface.
fn holds_ips(path: &Path, ips: &[IpAddr]) -> bool {
    Netns::open(path)
        .and_then(|ns| ns.run(super::find::local_addresses))
        .is_ok_and(|r| r.is_ok_and(|have| have.iter().any(|ip| ips.contains(ip))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uid: &str) -> PodRef {
        PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn a_record_names_the_pods_netns_only_if_it_holds_the_pods_ip() {
        let here = Path::new("/proc/self/ns/net");
        let mine = super::super::find::local_addresses().unwrap();
        if let Some(ip) = mine.first() {
            assert!(holds_ips(here, &[*ip]));
        }
        assert!(!holds_ips(here, &["203.0.113.77".parse().unwrap()]));
        assert!(!holds_ips(Path::new("/proc/0/ns/net"), &mine));
    }

    #[test]
    fn same_pod_by_uid_else_by_name() {
        let cases = [
            (pod("a", "x", "u1"), pod("a", "x", "u1"), true),
            (pod("a", "x", "u1"), pod("a", "x", "u2"), false), // recreated under the same name
            (pod("a", "x", "u1"), pod("b", "y", "u1"), true),
            (pod("a", "x", ""), pod("a", "x", "u1"), true),
            (pod("a", "x", ""), pod("b", "x", ""), false),
            (pod("", "", ""), pod("", "", ""), false),
        ];
        for (a, b, want) in cases {
            assert_eq!(same_pod(&a, &b), want, "{a:?} {b:?}");
            assert!(is_reconciled(&reconciled_attachment(&a.uid)));
        }
    }
}
