//! Istio's waypoints as the Gateway API declares them, read under the Istio-compatible
//! setting: `gateway.networking.k8s.io/v1` Gateways and GatewayClasses, watched when the API
//! server serves them (Istio's waypoints need the Gateway API; without it there is none).
//! What makes a Gateway a ready waypoint, and what traffic it takes, is
//! [`crate::discovery::waypoint`]'s; the store keeps only that.
//!
//! A Gateway API installed after the daemon started is read at its next start; until then a
//! waypoint named by a label is not known ready, and what names it is refused.

use std::sync::Arc;

use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::runtime::watcher;
use kube::{Api, Client};

use super::{spawn_watcher, Kind, Shared, Watcher};
use crate::discovery::waypoint::ISTIO_WAYPOINT_FOR;
use crate::discovery::Error;

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// A ready Gateway (it has `status.addresses`), as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayEntry {
    /// `spec.gatewayClassName`.
    pub class: Arc<str>,
    /// Its `istio.io/waypoint-for` label.
    pub waypoint_for: Option<Arc<str>>,
}

/// A GatewayClass as the store keeps it: its `istio.io/waypoint-for` label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassEntry {
    pub waypoint_for: Option<Arc<str>>,
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: "v1".into(),
        api_version: format!("{GROUP}/v1"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn waypoint_for(o: &DynamicObject) -> Option<Arc<str>> {
    let labels = o.metadata.labels.as_ref()?;
    labels.get(ISTIO_WAYPOINT_FOR).map(|v| v.as_str().into())
}

/// The entry of a Gateway: `Ok(None)` until it is ready.
pub fn gateway_entry(o: &DynamicObject) -> Result<Option<GatewayEntry>, String> {
    let addresses = &o.data["status"]["addresses"];
    if addresses.as_array().is_none_or(Vec::is_empty) {
        return Ok(None);
    }
    let class = o.data["spec"]["gatewayClassName"]
        .as_str()
        .ok_or("a Gateway without spec.gatewayClassName")?;
    Ok(Some(GatewayEntry {
        class: class.into(),
        waypoint_for: waypoint_for(o),
    }))
}

pub fn class_entry(o: &DynamicObject) -> ClassEntry {
    ClassEntry {
        waypoint_for: waypoint_for(o),
    }
}

/// Whether the API server serves Gateways and GatewayClasses (`Ok(false)`: the Gateway API is
/// not installed). Any other failure, such as not being allowed to list them, is an error.
pub async fn served(client: &Client) -> Result<bool, Error> {
    for (kind, plural) in [("Gateway", "gateways"), ("GatewayClass", "gatewayclasses")] {
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource(kind, plural));
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            Err(e) => {
                return Err(Error::Kube(format!(
                "--istio-compat: cannot list {GROUP}/v1 {plural} (may the daemon list them?): {e}"
            )))
            }
        }
    }
    Ok(true)
}

/// The watchers of Gateways and GatewayClasses.
pub(super) fn spawn(shared: &Arc<Shared>, client: &Client) -> [Watcher; 2] {
    let gateways = spawn_watcher(
        shared.clone(),
        Api::<DynamicObject>::all_with(client.clone(), &resource("Gateway", "gateways")),
        watcher::Config::default(),
        Kind {
            what: "Gateway",
            entry: Box::new(|o, _| gateway_entry(o)),
            slot: |s| &mut s.gateways,
            change: |c, _, _| c.full = true,
        },
    );
    let classes = spawn_watcher(
        shared.clone(),
        Api::<DynamicObject>::all_with(client.clone(), &resource("GatewayClass", "gatewayclasses")),
        watcher::Config::default(),
        Kind {
            what: "GatewayClass",
            entry: Box::new(|o, _| Ok(Some(class_entry(o)))),
            slot: |s| &mut s.gateway_classes,
            change: |c, _, _| c.full = true,
        },
    );
    [gateways, classes]
}
