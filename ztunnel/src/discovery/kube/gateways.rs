//! Istio's waypoints as the Gateway API declares them, read under the Istio-compatible
//! setting: `gateway.networking.k8s.io/v1` Gateways and GatewayClasses, watched when the API
//! server serves them (Istio's waypoints need the Gateway API; without it there is none).
//! What makes a Gateway a ready waypoint, and what traffic it takes, is
//! [`crate::discovery::waypoint`]'s; the store keeps only that.
//!
//! Whether the API server serves them is asked of its API discovery at start, and every
//! minute after while it does not: until a Gateway API installed later is read, a waypoint
//! named by a label is not known ready, and what names it is refused.

use std::sync::Arc;
use std::time::Duration;

use kube::api::DynamicObject;
use kube::runtime::watcher;
use kube::{Api, Client};

use super::{may_list, spawn_watcher, v1_resource, Kind, Shared, Watcher};
use crate::discovery::waypoint::{Attach, ISTIO_WAYPOINT_FOR};
use crate::discovery::Error;
use crate::task::first_ended;

/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// The kinds read, with their plurals.
const KINDS: [(&str, &str); 2] = [("Gateway", "gateways"), ("GatewayClass", "gatewayclasses")];

/// A ready Gateway (it has `status.addresses`), as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayEntry {
    /// `spec.gatewayClassName`.
    pub class: Arc<str>,
    /// Its `istio.io/waypoint-for` label.
    pub waypoint_for: Option<Arc<str>>,
    /// Which namespaces each of its listeners lets attach.
    pub attach: Arc<[Attach]>,
}

/// A GatewayClass as the store keeps it: its `istio.io/waypoint-for` label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassEntry {
    pub waypoint_for: Option<Arc<str>>,
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
    let listeners = o.data["spec"]["listeners"].as_array().into_iter().flatten();
    let attach = listeners.map(|l| Attach::parse(&l["allowedRoutes"]["namespaces"]));
    Ok(Some(GatewayEntry {
        class: class.into(),
        waypoint_for: waypoint_for(o),
        attach: attach.collect(),
    }))
}

pub fn class_entry(o: &DynamicObject) -> ClassEntry {
    ClassEntry {
        waypoint_for: waypoint_for(o),
    }
}

/// Whether the API server serves Gateways and GatewayClasses, as its API discovery (which
/// every authenticated client may read) says: `Ok(false)` when the Gateway API is not
/// installed. When it is, the daemon must be allowed to list them: a failure is an error.
pub async fn served(client: &Client) -> Result<bool, Error> {
    let resources = match client
        .list_api_group_resources(&format!("{GROUP}/v1"))
        .await
    {
        Ok(list) => list.resources,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
        Err(e) => {
            return Err(Error::Kube(format!(
                "--istio-compat: cannot read the API discovery of {GROUP}/v1: {e}"
            )))
        }
    };
    let listed = |plural: &str| resources.iter().any(|r| r.name == plural);
    if !KINDS.iter().all(|(_, plural)| listed(plural)) {
        return Ok(false);
    }
    may_list(client, GROUP, &KINDS, "may the daemon list them?").await?;
    Ok(true)
}

/// The watchers of Gateways and GatewayClasses.
pub(super) fn spawn(shared: &Arc<Shared>, client: &Client) -> [Watcher; 2] {
    let gateways = spawn_watcher(
        shared.clone(),
        Api::<DynamicObject>::all_with(client.clone(), &v1_resource(GROUP, "Gateway", "gateways")),
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
        Api::<DynamicObject>::all_with(
            client.clone(),
            &v1_resource(GROUP, "GatewayClass", "gatewayclasses"),
        ),
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

/// How often a daemon whose API server did not serve the Gateway API asks again.
const RECHECK: Duration = Duration::from_secs(60);

/// A task that asks every `RECHECK` whether the Gateway API is served now, then runs the
/// watchers of [`spawn`]; it ends when one of them ends, as a watcher does.
pub(super) fn spawn_when_served(shared: Arc<Shared>, client: Client) -> Watcher {
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(RECHECK).await;
            match served(&client).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tell whether the Gateway API is served, or cannot read it; no waypoint is known ready")
                }
            }
        }
        tracing::info!("the Gateway API is served now: reading Gateways and GatewayClasses");
        let mut watchers = super::AbortOnDrop(spawn(&shared, &client).into());
        let ended = first_ended(&mut watchers.0).await;
        tracing::error!(watcher = %ended, "a Gateway API watch stopped");
    });
    ("Gateway API (awaited)", task)
}
