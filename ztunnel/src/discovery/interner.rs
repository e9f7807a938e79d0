//! The model's shared values: equal strings, telemetry records and localities held once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::telemetry::{Locality, Telemetry};
use crate::labels::Labels;

/// Shares one allocation among equal strings (namespaces, service accounts, nodes, label keys
/// and values repeat across thousands of workloads) and among equal [`Telemetry`] (replicas).
#[derive(Default, Debug)]
pub struct Interner {
    strs: HashSet<Arc<str>>,
    telemetry: HashSet<Arc<Telemetry>>,
    localities: HashSet<Arc<Locality>>,
}

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.strs.get(s) {
            return a.clone();
        }
        let a: Arc<str> = s.into();
        self.strs.insert(a.clone());
        a
    }

    pub fn labels(&mut self, m: &BTreeMap<String, String>) -> Labels {
        m.iter().map(|(k, v)| (self.get(k), self.get(v))).collect()
    }

    /// The telemetry of pod `pod_name` of workload `workload_name` with these labels. A name
    /// that its fallback gives is left empty (the workload name when it is the pod's, the
    /// canonical service when it is the workload's), so that the replicas of a workload share
    /// one, and a pod that is its own workload keeps its name once.
    pub fn telemetry(
        &mut self,
        pod_name: &str,
        workload_name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Arc<Telemetry> {
        let (name, revision) = super::telemetry::canonical(labels, workload_name);
        let t = Telemetry {
            workload_name: self.get(if workload_name == pod_name {
                ""
            } else {
                workload_name
            }),
            canonical_name: self.get(if name == workload_name { "" } else { name }),
            canonical_revision: self.get(revision),
        };
        if let Some(a) = self.telemetry.get(&t) {
            return a.clone();
        }
        let a = Arc::new(t);
        self.telemetry.insert(a.clone());
        a
    }

    /// The locality `l`, shared.
    pub fn locality(&mut self, l: Locality) -> Arc<Locality> {
        let l = Locality {
            region: self.get(&l.region),
            zone: self.get(&l.zone),
            subzone: self.get(&l.subzone),
        };
        if let Some(a) = self.localities.get(&l) {
            return a.clone();
        }
        let a = Arc::new(l);
        self.localities.insert(a.clone());
        a
    }

    /// Forgets what nothing else holds any more.
    pub fn prune(&mut self) {
        self.telemetry.retain(|a| Arc::strong_count(a) > 1);
        self.localities.retain(|a| Arc::strong_count(a) > 1);
        self.strs.retain(|a| Arc::strong_count(a) > 1);
    }
}
