//! The handle on this node's enrolled pods that the enrollment server, the reconciler and
//! the daemon hold.
//!
//! [`Pods`] sends each operation to the [`Registry`]'s thread, which owns the pods and applies
//! operations one at a time, and waits for the outcome on a oneshot channel: asynchronously
//! for the CNI plugin's requests ([`Pods::handle`]) and recovery, blocking for the
//! reconciler's pass (itself on a blocking thread). An operation is queued when the call is
//! made, so the order of calls is the order of application. STATUS and the annotations never
//! wait for the registry: readiness is a watch, and the annotator only queues.

use std::future::Future;
use std::path::Path;
use std::sync::{mpsc, Arc};

use tokio::sync::{oneshot, watch};
use ztunnel_proto::enroll::{ErrorKind, PodRef, Reply, Request};

use super::annotate::{Annotator, Status};
use super::dataplane::Node;
use super::registry::{Context, Dataplane, EnrollError, EnrolledPod, Op, Registry};
use super::store::Store;
use crate::discovery::Workload;
use crate::metrics::Metrics;
use crate::proxy::ProxyInputs;
use crate::refusal::Reason;

/// The pods this daemon serves.
pub struct Pods {
    ops: mpsc::Sender<Op>,
    ready: watch::Receiver<bool>,
    store: Store,
    metrics: Arc<Metrics>,
    annotator: Arc<dyn Annotator>,
}

/// The reply to a CNI request whose operation failed inside the registry.
fn registry_failed() -> Reply {
    Reply::Error {
        kind: ErrorKind::TryAgain,
        message: format!("enrollment failed: {}", EnrollError::Registry),
    }
}

impl Pods {
    /// Starts the registry of the daemon's real dataplane on its own thread; must be called
    /// inside the daemon's runtime. The pods' status is published through `annotator`.
    pub fn new(
        pi: Arc<ProxyInputs>,
        store: Store,
        ready: watch::Receiver<bool>,
        annotator: Arc<dyn Annotator>,
    ) -> std::io::Result<Arc<Pods>> {
        let cx = Context {
            discovery: pi.discovery.clone(),
            node: pi.node.clone(),
            trust_domain: pi.trust_domain.clone(),
            metrics: pi.metrics.clone(),
            store,
            annotator,
        };
        let node = Node {
            pi,
            rt: tokio::runtime::Handle::current(),
        };
        Pods::start(Registry::new(node, cx), ready).map(Arc::new)
    }

    /// Starts `registry` on its own thread, which ends once the handle is dropped.
    pub fn start<D: Dataplane>(
        registry: Registry<D>,
        ready: watch::Receiver<bool>,
    ) -> std::io::Result<Pods> {
        let store = registry.context().store.clone();
        let metrics = registry.context().metrics.clone();
        let annotator = registry.context().annotator.clone();
        let (ops, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ztunnel-pods".into())
            .spawn(move || registry.run(rx))?;
        Ok(Pods {
            ops,
            ready,
            store,
            metrics,
            annotator,
        })
    }

    /// Queues an operation; the receiver gets its outcome (or is closed if it failed).
    fn send<T>(&self, op: impl FnOnce(oneshot::Sender<T>) -> Op) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        // A send fails only if the registry's thread is gone: the receiver is closed then.
        let _ = self.ops.send(op(tx));
        rx
    }

    /// Answers one request of the CNI plugin. The operation is queued at the call, before
    /// the returned future is polled.
    pub fn handle(&self, req: Request) -> impl Future<Output = Reply> + Send + 'static {
        let queued = match req {
            Request::Status => Err(if *self.ready.borrow() {
                Reply::Ok
            } else {
                Reply::Error {
                    kind: ErrorKind::NotAvailable,
                    message: "the daemon is not ready (certificates or discovery)".into(),
                }
            }),
            Request::Add(add) => Ok(self.send(|tx| Op::Add(add, tx))),
            Request::Del(del) => Ok(self.send(|tx| Op::Del(del, tx))),
            Request::Check(add) => Ok(self.send(|tx| Op::Check(add, tx))),
            Request::Gc { valid } => Ok(self.send(|tx| Op::Gc(valid, tx))),
        };
        async move {
            match queued {
                Ok(rx) => rx.await.unwrap_or_else(|_| registry_failed()),
                Err(reply) => reply,
            }
        }
    }

    /// Serves again every pod recorded on the node whose netns still exists; forgets the
    /// others. Returns how many were recovered.
    pub async fn recover(&self) -> usize {
        self.send(Op::Recover).await.unwrap_or(0)
    }

    /// Every enrolled pod. Blocking.
    pub fn list(&self) -> Vec<EnrolledPod> {
        self.send(Op::List).blocking_recv().unwrap_or_default()
    }

    /// Enrolls `w` in the netns found at `path` (by the reconciler), which must still be the
    /// namespace `id`; a no-op (false) if the pod is enrolled already. Blocking.
    pub fn enroll_found(
        &self,
        w: &Arc<Workload>,
        path: &Path,
        id: (u64, u64),
    ) -> Result<bool, EnrollError> {
        let (w, path) = (w.clone(), path.to_owned());
        self.send(|reply| Op::EnrollFound { w, path, id, reply })
            .blocking_recv()
            .unwrap_or(Err(EnrollError::Registry))
    }

    /// Releases the pod enrolled under `a` (for the reconciler); whether it was enrolled.
    /// Blocking.
    pub fn release_attachment(&self, a: &ztunnel_proto::enroll::Attachment) -> bool {
        self.send(|tx| Op::Release(a.clone(), tx))
            .blocking_recv()
            .unwrap_or(false)
    }

    /// Queues `pod`'s status for its annotation (never blocks).
    pub fn annotate(&self, pod: &PodRef, status: Status) {
        self.annotator.annotate(pod, status);
    }

    /// Queues whether the CA refuses `pod`'s certificate, for its annotation (never blocks).
    pub fn certificate(&self, pod: &PodRef, refused: Option<String>) {
        self.annotator.certificate(pod, refused);
    }

    /// Counts a refused enrollment request.
    pub fn refused(&self, reason: Reason) {
        self.metrics.refused(reason);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}
