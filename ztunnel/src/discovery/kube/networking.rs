//! Istio's ServiceEntries and WorkloadEntries (`networking.istio.io/v1`), watched under the
//! Istio-compatible setting beside Istio's policies: the store keeps, of each, the addresses
//! it declares and what names their waypoints ([`crate::discovery::istio_entries`]).

use std::sync::Arc;

use kube::api::DynamicObject;
use kube::runtime::watcher;
use kube::{Api, Client};

use super::{spawn_watcher, v1_resource, Kind, Shared, Watcher};
use crate::discovery::istio_entries::{self, Entry, GROUP};

/// The kinds read, with their plurals.
pub(super) const KINDS: [(&str, &str); 2] = [
    ("ServiceEntry", "serviceentries"),
    ("WorkloadEntry", "workloadentries"),
];

/// The entries of an object of `kind`.
pub(super) fn entries(
    kind: istio_entries::Kind,
    o: &DynamicObject,
) -> Result<Option<Arc<[Entry]>>, String> {
    let mut v = o.data.clone();
    v["metadata"] = serde_json::to_value(&o.metadata).map_err(|e| e.to_string())?;
    Ok(Some(istio_entries::parse(kind, &v)?.into()))
}

/// The watchers of ServiceEntries and WorkloadEntries.
pub(super) fn spawn(shared: &Arc<Shared>, client: &Client) -> [Watcher; 2] {
    let [(se, se_plural), (we, we_plural)] = KINDS;
    let services = spawn_watcher(
        shared.clone(),
        Api::<DynamicObject>::all_with(client.clone(), &v1_resource(GROUP, se, se_plural)),
        watcher::Config::default(),
        Kind {
            what: "ServiceEntry",
            entry: Box::new(|o, _| entries(istio_entries::Kind::ServiceEntry, o)),
            slot: |s| &mut s.service_entries,
            change: |c, _, _| c.full = true,
        },
    );
    let workloads = spawn_watcher(
        shared.clone(),
        Api::<DynamicObject>::all_with(client.clone(), &v1_resource(GROUP, we, we_plural)),
        watcher::Config::default(),
        Kind {
            what: "WorkloadEntry",
            entry: Box::new(|o, _| entries(istio_entries::Kind::WorkloadEntry, o)),
            slot: |s| &mut s.workload_entries,
            change: |c, _, _| c.full = true,
        },
    );
    [services, workloads]
}
