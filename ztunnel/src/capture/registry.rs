//! The enrolled pods of this node, with a single owner.
//!
//! [`Registry`] holds, per attachment, the pod's record, its open netns and what serves its
//! listeners. One thread owns it (`Registry::run`, started by [`super::pods::Pods`]) and
//! applies the operations sent to it (`Op`) one at a time, each to completion: CNI ADD, DEL,
//! CHECK and GC, the reconciler's enrollments and releases, the listing the reconciler plans
//! from, restart recovery. So two operations never interleave (a CNI DEL racing an ADD or the
//! reconciler on the same pod waits for it), nothing else reads or writes the map, and there is
//! no lock. The operations block (`nft`, `ip`, netns switches, the release drain), on that
//! thread, never on the runtime's workers.
//!
//! What an operation does to the node (rules, listeners, connections) goes through a
//! [`Dataplane`] ([`super::dataplane::Node`] in the daemon); the registry does the bookkeeping:
//! the map, the pods' records ([`Store`]), the `ztunnel_enrolled_pods` gauge, the replies to
//! the plugin, the refusals counted, the annotations ([`super::annotate`]).
//!
//! A pod the reconciler enrolled is held under `ztunnel-reconciled-<uid>`/`eth0`
//! ([`reconciled_attachment`]): a CNI DEL for the pod (matched by pod, else by netns) releases
//! it too, a CNI ADD for the pod takes it over, and CNI GC leaves it alone.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use tokio::sync::oneshot;
use ztunnel_proto::enroll::{Attachment, ErrorKind, PodAdd, PodDel, PodRef, Reply};

use super::annotate::{Annotator, Status};
use super::decide::{decide, Decision};
use super::rules::RulesError;
use super::store::{PodRecord, Store};
use crate::discovery::{Discovery, Workload};
use crate::metrics::Metrics;
use crate::refusal::Reason;

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
    /// The operation panicked, or the registry's thread is gone.
    #[error("the pod registry failed")]
    Registry,
}

/// What enrolling and releasing a pod do to the node, besides the registry's bookkeeping.
/// Every method may block.
pub trait Dataplane: Send + 'static {
    /// An open pod network namespace.
    type Netns: Send;
    /// The pod's listeners, bound and not served yet.
    type Bound;
    /// What serves a pod's listeners.
    type Serving: Send;

    /// Opens the network namespace at `path`.
    fn open(&self, path: &Path) -> std::io::Result<Self::Netns>;
    /// The namespace's (device, inode), as `stat` of its path gives them.
    fn id(&self, ns: &Self::Netns) -> (u64, u64);
    /// Installs the pod's rules (replacing any there, atomically) and binds its listeners,
    /// IPv6 ones too when `ipv6`.
    fn prepare(&self, ns: &Self::Netns, ipv6: bool) -> Result<Self::Bound, EnrollError>;
    /// Serves `bound` as the workload `w`.
    fn serve(&self, ns: &Self::Netns, w: &Workload, bound: Self::Bound) -> Self::Serving;
    /// Stops serving; the rules stay.
    fn stop(&self, serving: &Self::Serving);
    /// Whether the listeners are still served.
    fn is_serving(&self, serving: &Self::Serving) -> bool;
    /// Tells the pod's connections (those of `ips`) to close and waits for them, up to a
    /// deadline; closes the tunnels leaving from the pod.
    fn close_connections(&self, ns: &Self::Netns, ips: &[IpAddr]);
    fn remove_rules(&self, ns: &Self::Netns) -> Result<(), RulesError>;
    fn check_rules(&self, ns: &Self::Netns) -> Result<(), RulesError>;
    /// Adds the pod's addresses to the node's probe set, or removes them.
    fn probe_set(&self, ips: &[IpAddr], add: bool) -> Result<(), RulesError>;
    /// Whether the netns a reconciler record names is still the pod's.
    fn still_the_pods(&self, r: &PodRecord) -> bool;
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
pub(super) fn same_pod(a: &PodRef, b: &PodRef) -> bool {
    if !a.uid.is_empty() && !b.uid.is_empty() {
        return a.uid == b.uid;
    }
    !a.name.is_empty() && a.namespace == b.namespace && a.name == b.name
}

/// The (device, inode) of the file at `path`, if there is one.
fn netns_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn error(kind: ErrorKind, message: impl ToString) -> Reply {
    Reply::Error {
        kind,
        message: message.to_string(),
    }
}

/// An enrolled pod, as the reconciler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    pub attachment: Attachment,
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
}

/// An operation on the registry, with the channel its outcome is sent on.
pub(super) enum Op {
    Add(PodAdd, oneshot::Sender<Reply>),
    Del(PodDel, oneshot::Sender<Reply>),
    Check(PodAdd, oneshot::Sender<Reply>),
    Gc(Vec<Attachment>, oneshot::Sender<Reply>),
    EnrollFound {
        w: Arc<Workload>,
        path: PathBuf,
        id: (u64, u64),
        reply: oneshot::Sender<Result<bool, EnrollError>>,
    },
    Release(Attachment, oneshot::Sender<bool>),
    List(oneshot::Sender<Vec<EnrolledPod>>),
    Recover(oneshot::Sender<usize>),
}

/// What the registry decides with and reports to.
pub struct Context {
    pub discovery: Discovery,
    pub node: String,
    pub trust_domain: String,
    pub metrics: Arc<Metrics>,
    pub store: Store,
    pub annotator: Arc<dyn Annotator>,
}

struct Enrolled<D: Dataplane> {
    record: PodRecord,
    netns: D::Netns,
    serving: D::Serving,
}

/// The pods this daemon serves (see the module's documentation).
pub struct Registry<D: Dataplane> {
    dp: D,
    cx: Context,
    enrolled: HashMap<Attachment, Enrolled<D>>,
}

impl<D: Dataplane> Registry<D> {
    pub fn new(dp: D, cx: Context) -> Self {
        Registry {
            dp,
            cx,
            enrolled: HashMap::new(),
        }
    }

    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// Applies the operations received on `ops`, one at a time and each to completion, until
    /// every sender is gone.
    pub(super) fn run(mut self, ops: mpsc::Receiver<Op>) {
        while let Ok(op) = ops.recv() {
            // A panic fails its own operation (the caller sees its reply channel closed), not
            // the ones after it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply(op)));
        }
    }

    /// Applies one operation. A caller that stopped waiting for the outcome does not undo it.
    fn apply(&mut self, op: Op) {
        match op {
            Op::Add(add, reply) => drop(reply.send(self.add(add))),
            Op::Del(del, reply) => drop(reply.send(self.del(del))),
            Op::Check(add, reply) => drop(reply.send(self.check(add))),
            Op::Gc(valid, reply) => drop(reply.send(self.gc(valid))),
            Op::EnrollFound { w, path, id, reply } => {
                drop(reply.send(self.enroll_found(&w, &path, id)))
            }
            Op::Release(a, reply) => drop(reply.send(self.release(&a))),
            Op::List(reply) => drop(reply.send(self.list())),
            Op::Recover(reply) => drop(reply.send(self.recover())),
        }
    }

    fn annotate(&self, pod: &PodRef, status: Status) {
        self.cx.annotator.annotate(pod, status);
    }

    fn count_enrolled(&self) {
        self.cx
            .metrics
            .enrolled_pods
            .set(self.enrolled.len() as i64);
    }

    /// Every enrolled pod.
    pub fn list(&self) -> Vec<EnrolledPod> {
        self.enrolled
            .iter()
            .map(|(a, e)| EnrolledPod {
                attachment: a.clone(),
                pod: e.record.pod.clone(),
                ips: e.record.ips.clone(),
            })
            .collect()
    }

    /// The reconciler-enrolled attachments of the pod `pod` or in the netns at `netns`.
    fn reconciled_of(&self, pod: Option<&PodRef>, netns: &str) -> Vec<Attachment> {
        let id = (!netns.is_empty())
            .then(|| netns_id(Path::new(netns)))
            .flatten();
        self.enrolled
            .iter()
            .filter(|(a, e)| {
                is_reconciled(a)
                    && (pod.is_some_and(|p| same_pod(p, &e.record.pod))
                        || id.is_some_and(|id| self.dp.id(&e.netns) == id))
            })
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// CNI ADD: enrolls the pod if [`decide`] says so.
    pub fn add(&mut self, add: PodAdd) -> Reply {
        let state = self.cx.discovery.current();
        let w = match decide(&state, &self.cx.node, &add.pod, &add.ips) {
            Decision::Enroll(w) => w,
            Decision::NotEnrolled(reason) => {
                tracing::info!(pod = %format!("{}/{}", add.pod.namespace, add.pod.name), %reason, "not enrolled");
                return Reply::NotEnrolled { reason };
            }
            Decision::OtherMesh(reason) => {
                crate::refused!(self.cx.metrics, Reason::EnrollmentOtherMesh, pod = %format!("{}/{}", add.pod.namespace, add.pod.name), %reason, "not enrolled: refused");
                return Reply::NotEnrolled { reason };
            }
            Decision::TryAgain(reason) => {
                crate::refused!(self.cx.metrics, Reason::EnrollmentTryAgain, pod = %format!("{}/{}", add.pod.namespace, add.pod.name), %reason, "cannot enroll yet");
                self.annotate(&add.pod, Status::Failed(reason.clone()));
                return error(ErrorKind::TryAgain, reason);
            }
        };
        drop(state);
        // The reconciler may have enrolled this pod already (found by its IP): CNI takes
        // over. Same netns: the rules stay and are replaced atomically below; another netns
        // (a new sandbox): the old one is released in full.
        let new_id = netns_id(Path::new(&add.netns));
        for a in self.reconciled_of(Some(&add.pod), "") {
            let same_netns = self
                .enrolled
                .get(&a)
                .is_some_and(|old| Some(self.dp.id(&old.netns)) == new_id);
            if same_netns {
                self.stop(&a);
                let _ = self.cx.store.remove(&a);
            } else {
                self.release(&a);
            }
        }
        // A repeated ADD for the same attachment replaces the old listeners; the rules stay
        // in place throughout (they are replaced atomically), so the pod is never uncaptured.
        self.stop(&add.attachment);
        let record = PodRecord {
            attachment: add.attachment.clone(),
            netns: add.netns.clone().into(),
            pod: add.pod.clone(),
            ips: add.ips.clone(),
        };
        match self.enroll(record, &w) {
            Ok(()) => {
                self.annotate(&add.pod, Status::Enrolled);
                Reply::Enrolled
            }
            Err(e) => {
                crate::refused!(self.cx.metrics, Reason::EnrollmentFailed, pod = %format!("{}/{}", add.pod.namespace, add.pod.name), error = %e, "enrollment failed");
                self.annotate(&add.pod, Status::Failed(e.to_string()));
                error(ErrorKind::TryAgain, e)
            }
        }
    }

    /// CNI DEL: releases the attachment and the reconciler's attachments of the same pod.
    /// Always succeeds (DEL is idempotent).
    pub fn del(&mut self, del: PodDel) -> Reply {
        let mut released = self.release(&del.attachment);
        for a in self.reconciled_of(del.pod.as_ref(), &del.netns) {
            released |= self.release(&a);
        }
        if let (true, Some(pod)) = (released, &del.pod) {
            self.annotate(pod, Status::Released);
        }
        Reply::Ok
    }

    /// CNI GC: releases the attachments the runtime no longer knows.
    pub fn gc(&mut self, valid: Vec<Attachment>) -> Reply {
        let valid: HashSet<Attachment> = valid.into_iter().collect();
        // The runtime does not know the reconciler's attachments: the reconciler and DEL
        // release those.
        let stale: Vec<Attachment> = self
            .enrolled
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

    /// CNI CHECK: the pod is served and its rules are intact, or it is not in the mesh.
    pub fn check(&self, add: PodAdd) -> Reply {
        // A pod the reconciler enrolled is checked under its own attachment.
        let key = self
            .reconciled_of(Some(&add.pod), &add.netns)
            .into_iter()
            .next()
            .unwrap_or_else(|| add.attachment.clone());
        match self
            .enrolled
            .get(&add.attachment)
            .or_else(|| self.enrolled.get(&key))
        {
            Some(e) => {
                if !self.dp.is_serving(&e.serving) {
                    return error(
                        ErrorKind::CheckFailed,
                        "the pod's listeners are not running",
                    );
                }
                match self.dp.check_rules(&e.netns) {
                    Ok(()) => Reply::Ok,
                    Err(err) => error(ErrorKind::CheckFailed, err),
                }
            }
            None => {
                let state = self.cx.discovery.current();
                match decide(&state, &self.cx.node, &add.pod, &add.ips) {
                    Decision::NotEnrolled(_) => Reply::Ok,
                    _ => error(
                        ErrorKind::CheckFailed,
                        "the pod should be enrolled but is not",
                    ),
                }
            }
        }
    }

    /// Enrolls `w` in the netns found at `path` (by the reconciler), which must still be the
    /// namespace `id`; a no-op (false) if the pod is enrolled already.
    pub fn enroll_found(
        &mut self,
        w: &Workload,
        path: &Path,
        id: (u64, u64),
    ) -> Result<bool, EnrollError> {
        let pod = PodRef {
            namespace: w.namespace.to_string(),
            name: w.name.to_string(),
            uid: w.uid.to_string(),
        };
        // Enrolled meanwhile (by CNI ADD, perhaps under another name or by address only).
        if self.enrolled.values().any(|e| {
            same_pod(&e.record.pod, &pod) || e.record.ips.iter().any(|ip| w.ips.contains(ip))
        }) {
            return Ok(false);
        }
        let netns_err = |source| EnrollError::Netns {
            path: path.display().to_string(),
            source,
        };
        let netns = self.dp.open(path).map_err(netns_err)?;
        if self.dp.id(&netns) != id {
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
        self.enroll_in(record, w, netns)?;
        Ok(true)
    }

    /// Opens the record's netns and enrolls the pod there.
    fn enroll(&mut self, record: PodRecord, w: &Workload) -> Result<(), EnrollError> {
        let netns = self
            .dp
            .open(&record.netns)
            .map_err(|source| EnrollError::Netns {
                path: record.netns.display().to_string(),
                source,
            })?;
        self.enroll_in(record, w, netns)
    }

    /// Installs the rules, binds the listeners, records the pod, serves it. The record is
    /// written before the pod is served and held, so a restarted daemon finds every pod
    /// that was enrolled.
    fn enroll_in(
        &mut self,
        record: PodRecord,
        w: &Workload,
        netns: D::Netns,
    ) -> Result<(), EnrollError> {
        let ipv6 = record.ips.iter().any(IpAddr::is_ipv6);
        let bound = self.dp.prepare(&netns, ipv6)?;
        self.cx.store.save(&record).map_err(EnrollError::Store)?;
        if let Err(e) = self.dp.probe_set(&record.ips, true) {
            tracing::warn!(error = %e, "cannot add the pod to the node's probe set; kubelet probes may be captured");
        }
        let serving = self.dp.serve(&netns, w, bound);
        tracing::info!(pod = %format!("{}/{}", w.namespace, w.name), identity = %w.identity(&self.cx.trust_domain),
            netns = %record.netns.display(), ips = ?record.ips, "enrolled");
        self.enrolled.insert(
            record.attachment.clone(),
            Enrolled {
                record,
                netns,
                serving,
            },
        );
        self.count_enrolled();
        Ok(())
    }

    /// Stops serving the pod under `a` and forgets it, leaving its rules and record.
    fn stop(&mut self, a: &Attachment) {
        if let Some(old) = self.enrolled.remove(a) {
            self.dp.stop(&old.serving);
            self.count_enrolled();
        }
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
    /// So each is told to close while the rules still carry it
    /// ([`Dataplane::close_connections`]), and the rules go once they have (or after a
    /// deadline). New connections go plain at once.
    pub fn release(&mut self, a: &Attachment) -> bool {
        let Some(e) = self.enrolled.remove(a) else {
            let _ = self.cx.store.remove(a);
            return false;
        };
        self.count_enrolled();
        self.dp.stop(&e.serving);
        self.dp.close_connections(&e.netns, &e.record.ips);
        if let Err(err) = self.dp.remove_rules(&e.netns) {
            tracing::debug!(error = %err, "cannot remove the pod's rules (netns gone?)");
        }
        let _ = self.dp.probe_set(&e.record.ips, false);
        if let Err(err) = self.cx.store.remove(a) {
            tracing::warn!(error = %err, "cannot remove the pod's record");
        }
        tracing::info!(pod = %format!("{}/{}", e.record.pod.namespace, e.record.pod.name), "released");
        true
    }

    /// Serves again every pod recorded on the node whose netns still exists; forgets the
    /// others. A pod that is no longer enrolled (discovery says so) is released. One that
    /// should be but cannot be served now (discovery lags, its rules or listeners or record
    /// fail) keeps its rules and record: its connections are refused, never let through, until
    /// the reconciler or its CNI plugin enrolls it again (counted as `enrollment_failed`).
    /// Returns how many were recovered.
    pub fn recover(&mut self) -> usize {
        let records = match self.cx.store.load_all() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pod records");
                return 0;
            }
        };
        let mut n = 0;
        for r in records {
            // A reconciler record names `<proc>/<pid>/ns/net`: the pid may have been reused
            // since, by any process. Serve it again only if that namespace is still the pod's
            // (`Dataplane::still_the_pods`); otherwise forget the record without touching
            // that namespace (the reconciler finds the pod again).
            if is_reconciled(&r.attachment) && !self.dp.still_the_pods(&r) {
                tracing::info!(pod = %format!("{}/{}", r.pod.namespace, r.pod.name), netns = %r.netns.display(),
                    "reconciler record no longer names the pod's netns; forgotten");
                let _ = self.cx.store.remove(&r.attachment);
                continue;
            }
            let state = self.cx.discovery.current();
            let decision = decide(&state, &self.cx.node, &r.pod, &r.ips);
            drop(state);
            let pod = format!("{}/{}", r.pod.namespace, r.pod.name);
            let failed = match decision {
                Decision::Enroll(w) => match self.enroll(r.clone(), &w) {
                    Ok(()) => {
                        n += 1;
                        continue;
                    }
                    Err(e) => Some(e.to_string()),
                },
                Decision::TryAgain(reason) => Some(reason),
                Decision::NotEnrolled(_) | Decision::OtherMesh(_) => None,
            };
            let Ok(ns) = self.dp.open(&r.netns) else {
                tracing::info!(%pod, netns = %r.netns.display(), "pod's netns gone; record forgotten");
                let _ = self.cx.store.remove(&r.attachment);
                continue;
            };
            match failed {
                Some(error) => {
                    crate::refused!(self.cx.metrics, Reason::EnrollmentFailed, %pod, %error,
                        "not recovered; its rules are kept (its connections refused) until it is enrolled again");
                }
                None => {
                    tracing::info!(%pod, "no longer enrolled; released");
                    let _ = self.dp.remove_rules(&ns);
                    let _ = self.cx.store.remove(&r.attachment);
                }
            }
        }
        n
    }
}
