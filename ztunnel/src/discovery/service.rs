//! A Service as the model keeps it: its VIPs and ports, the target port of each endpoint (most
//! take the port's `targetPort`; [`PortOverride`]s name those that do not, or that lack a named
//! port), the endpoints that are no workload's, and which endpoints its connections prefer
//! ([`Distribution`], ranked as istiod scopes them). Its endpoints themselves are kept by the
//! model's state.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::telemetry::Locality;
use crate::labels::Labels;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

/// An endpoint whose target port for one service port is not the service's: its
/// EndpointSlice gives another (a selectorless service's own slice, a rollout that changes a
/// named port's number), or none: `target_port` 0 says that the endpoint has no port of the
/// `targetPort`'s name (the endpoint-slice controller leaves the port out of such a pod's
/// slice), so it is no endpoint of that port, as kube-proxy and Istio treat it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortOverride {
    pub ip: IpAddr,
    pub port: u16,
    pub target_port: u16,
}

/// Which endpoints a service's connections prefer (`trafficDistribution`): the closest to the
/// source, as Istio ranks them (the same region, then zone, then node), spilling over to the
/// next closest only when there are none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Distribution {
    /// Any endpoint.
    #[default]
    Any,
    /// `PreferSameZone` (or `PreferClose`).
    PreferSameZone,
    /// `PreferSameNode`.
    PreferSameNode,
}

impl Distribution {
    /// The value of a Service's `spec.trafficDistribution` (or Istio's
    /// `networking.istio.io/traffic-distribution` annotation); unknown values are `Any`.
    pub fn parse(s: &str) -> Distribution {
        match s.to_ascii_lowercase().as_str() {
            "preferclose" | "prefersamezone" => Distribution::PreferSameZone,
            "prefersamenode" => Distribution::PreferSameNode,
            _ => Distribution::Any,
        }
    }

    /// How close an endpoint on `node` at `locality` is to a source on `src_node` at
    /// `src_locality`: how many of the scopes match in a row, as istiod sets them (region and
    /// zone for `PreferSameZone`; region, zone, Istio's subzone and node for
    /// `PreferSameNode`).
    pub fn rank(self, src_node: &str, src: &Locality, node: &str, at: &Locality) -> usize {
        let scopes = [
            src.region == at.region,
            src.zone == at.zone,
            src.subzone == at.subzone,
            src_node == node,
        ];
        let considered = match self {
            Distribution::Any => 0,
            Distribution::PreferSameZone => 2,
            Distribution::PreferSameNode => 4,
        };
        scopes[..considered].iter().take_while(|m| **m).count()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Service {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub vips: Vec<IpAddr>,
    /// Each port and the target port of its endpoints (but those of `port_overrides`).
    pub ports: Vec<ServicePort>,
    /// Sorted; empty but for the cases [`PortOverride`] names.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub port_overrides: Vec<PortOverride>,
    /// `internalTrafficPolicy: Local`: a source reaches only the endpoints on its own node
    /// (none: refused), as kube-proxy and Istio do.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub node_local: bool,
    /// Which endpoints its connections prefer.
    #[serde(skip_serializing_if = "is_any")]
    pub distribution: Distribution,
    pub selector: Labels,
    /// Ready endpoints that are no workload's address (an API server, the addresses of a
    /// selectorless service's own EndpointSlices, host-network pods at their node's address):
    /// outside the mesh, reached as plain TCP, as Istio reaches them.
    pub not_pods: Vec<IpAddr>,
    /// Its `istio.io/use-waypoint` label (`none` for a gateway's own Service, see
    /// [`super::waypoint`]).
    pub use_waypoint: Option<Arc<str>>,
    /// Its `istio.io/use-waypoint-namespace` label.
    pub use_waypoint_namespace: Option<Arc<str>>,
}

fn is_any(d: &Distribution) -> bool {
    *d == Distribution::Any
}

impl Service {
    /// The target port for `port` of most endpoints, if the service has the port.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port)
    }

    /// The target port for `port` of the endpoint at `ip`, if the service has the port there.
    pub fn target_port_at(&self, port: u16, ip: IpAddr) -> Option<u16> {
        let t = self.target_port(port)?;
        match self.override_at(port, ip) {
            Some(0) => None,
            o => Some(o.unwrap_or(t)),
        }
    }

    fn override_at(&self, port: u16, ip: IpAddr) -> Option<u16> {
        let i = self
            .port_overrides
            .binary_search_by(|o| (o.ip, o.port).cmp(&(ip, port)))
            .ok()?;
        Some(self.port_overrides[i].target_port)
    }

    /// Whether `target` is the target port of one of the service's ports at `ip`.
    pub fn targets_at(&self, ip: IpAddr, target: u16) -> bool {
        self.ports
            .iter()
            .any(|p| self.override_at(p.port, ip).unwrap_or(p.target_port) == target)
    }
}
