//! Discovery: one in-memory model of workloads, services and policies ([`State`]), shared by
//! every reader through a [`Discovery`] handle, and filled by a source — here the local YAML
//! file ([`watch_file`]); the Kubernetes source fills the same model.

pub mod crd;
pub mod enrollment;
mod file;
mod interner;
mod ips;
pub mod istio_entries;
pub mod kube;
mod model;
mod overlay;
mod service;
pub mod telemetry;
pub mod waypoint;

use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

pub use crate::policy::objects as policy;
pub use file::{parse, parse_for_node, watch_file};
pub use kube::watch_kubernetes;
/// The cluster's DNS domain unless configured otherwise (`--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

pub use model::{
    Distribution, Interner, Labels, Locality, Namespace, PortOverride, Protocol, Service,
    ServicePort, Services, State, Telemetry, Workload, Workloads, DATAPLANE_MODE_LABEL,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {error}")]
    File { path: PathBuf, error: Box<Error> },
    #[error("malformed mesh file: {0}")]
    Parse(String),
    #[error("invalid mesh: {0}")]
    Invalid(String),
    #[error("kubernetes: {0}")]
    Kube(String),
}

/// What a source counts, exported as `ztunnel_discovery_*` ([`Discovery::register`]).
#[derive(Debug, Default)]
struct Stats {
    reloads_ok: Counter,
    reloads_failed: Counter,
    objects_refused: Counter,
    watch_failures: Family<WatchKind, Counter>,
}

/// The collection a Kubernetes watch follows (`kind="Pod"`, …), as its warnings name it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchKind {
    kind: &'static str,
}

/// A reader's handle on the current state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Discovery {
    rx: tokio::sync::watch::Receiver<Arc<State>>,
    stats: Arc<Stats>,
}

impl Discovery {
    /// A handle on a state that never changes (tests, benchmarks).
    pub fn fixed(state: State) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(state));
        // The sender lives as long as the process: `changed()` then waits forever.
        std::mem::forget(tx);
        Discovery {
            rx,
            stats: Arc::default(),
        }
    }

    /// The current state.
    pub fn current(&self) -> Arc<State> {
        self.rx.borrow().clone()
    }

    /// Waits for the next state; an error means the source is gone.
    pub async fn changed(&mut self) -> Result<(), tokio::sync::watch::error::RecvError> {
        self.rx.changed().await
    }

    pub fn reloads_ok(&self) -> u64 {
        self.stats.reloads_ok.get()
    }

    pub fn reloads_failed(&self) -> u64 {
        self.stats.reloads_failed.get()
    }

    /// Objects a source refused or skipped (Kubernetes: each time one arrives bad).
    pub fn objects_refused(&self) -> u64 {
        self.stats.objects_refused.get()
    }

    /// Failed attempts of the Kubernetes watch of `kind` (its `what`, e.g. `Pod`) to list or
    /// watch, each retried with backoff while the last state is kept.
    pub fn watch_failures(&self, kind: &'static str) -> u64 {
        self.stats
            .watch_failures
            .get_or_create(&WatchKind { kind })
            .get()
    }

    /// Exports what the source counts in `registry` (which prefixes nothing): model updates
    /// applied and refused, objects skipped, failed Kubernetes watches.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let zt = registry.sub_registry_with_prefix("ztunnel");
        zt.register(
            "discovery_updates",
            "Discovery updates applied (a file reloaded, a batch of Kubernetes events)",
            self.stats.reloads_ok.clone(),
        );
        zt.register(
            "discovery_update_failures",
            "Discovery updates refused, the last good state kept (a file that does not parse, a model that does not build)",
            self.stats.reloads_failed.clone(),
        );
        zt.register(
            "discovery_objects_refused",
            "Kubernetes objects skipped (an earlier good version, if any, kept)",
            self.stats.objects_refused.clone(),
        );
        zt.register(
            "discovery_watch_failures",
            "Kubernetes list or watch attempts that failed, by kind; each is retried with backoff while the last state is kept",
            self.stats.watch_failures.clone(),
        );
    }
}
