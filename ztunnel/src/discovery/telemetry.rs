//! What Istio's telemetry says of a workload beyond its pod: the workload the pod belongs to,
//! named after its controller as istiod names it, and its canonical service and revision read
//! from the pod's labels as istiod reads them. These are the values of the `*_workload`,
//! `*_canonical_service`, `*_canonical_revision`, `*_app` and `*_version` labels of the
//! `istio_tcp_*` metrics, which Kiali and Istio's dashboards group by.
//!
//! Workload name (istio/istio `pkg/kube` `GetWorkloadMetaFromPod`):
//! - the label `service.istio.io/workload-name`, when the pod has it;
//! - else, for a pod whose name was generated and that has a controller: a ReplicaSet whose name
//!   ends in `-<pod-template-hash>` is a Deployment's (or, with `rollouts-pod-template-hash`, an
//!   Argo Rollout's): the name without that suffix; a ReplicationController with the label
//!   `deploymentconfig` is that DeploymentConfig; a Job named `<name>-<8 to 10 digits>` is
//!   CronJob `<name>`'s; any other controller (StatefulSet, DaemonSet, Job, …) by its own name;
//! - else the pod's own name.
//!
//! Locality: the region and zone of the workload's node, from the node's labels
//! `topology.kubernetes.io/region` and `topology.kubernetes.io/zone`, as istiod reads them.
//!
//! Canonical service: the first of the labels `service.istio.io/canonical-name`,
//! `app.kubernetes.io/name`, `app`; else the workload name. Canonical revision: the first of
//! `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`; else
//! `latest`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

/// The label that names a pod's workload outright.
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";
const NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
const REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// A workload's telemetry names; the replicas of one workload share one. Read them through
/// [`crate::discovery::Workload`]'s accessors: an empty name is its fallback's (the pod's
/// name for the workload, the workload's for the canonical service, `latest` for the
/// revision).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Telemetry {
    #[serde(skip_serializing_if = "str::is_empty")]
    pub workload_name: Arc<str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub canonical_name: Arc<str>,
    pub canonical_revision: Arc<str>,
}

/// Where a workload runs: its node's region, zone and Istio subzone (empty when not known).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Locality {
    pub region: Arc<str>,
    pub zone: Arc<str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub subzone: Arc<str>,
}

/// The node label that names its region.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The node label that names its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The node label that names its subzone, as istiod reads it.
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

impl Locality {
    /// The locality of a node with these labels.
    pub fn of_node(labels: &BTreeMap<String, String>) -> Locality {
        let get = |k: &str| Arc::from(labels.get(k).map_or("", String::as_str));
        Locality {
            region: get(REGION_LABEL),
            zone: get(ZONE_LABEL),
            subzone: get(SUBZONE_LABEL),
        }
    }

    /// A locality written as Istio writes one, `<region>/<zone>[/<subzone>]`.
    pub fn parse(s: &str) -> Locality {
        let mut parts = s.split('/');
        Locality {
            region: parts.next().unwrap_or("").into(),
            zone: parts.next().unwrap_or("").into(),
            subzone: parts.next().unwrap_or("").into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

/// A pod's controlling owner reference: (kind, name).
pub type Controller<'a> = (&'a str, &'a str);

/// The workload name of a pod (see the module's rules).
pub fn workload_name<'a>(
    pod_name: &'a str,
    generate_name: Option<&str>,
    controller: Option<Controller<'a>>,
    labels: &'a BTreeMap<String, String>,
) -> &'a str {
    if let Some(n) = labels.get(WORKLOAD_NAME_LABEL) {
        return n;
    }
    let (Some((kind, name)), true) = (controller, generate_name.is_some_and(|g| !g.is_empty()))
    else {
        return pod_name;
    };
    let hash_suffix = |label: &str| {
        labels
            .get(label)
            .filter(|h| !h.is_empty())
            .and_then(|h| name.strip_suffix(h.as_str()))
            .map(|n| n.strip_suffix('-').unwrap_or(n))
    };
    match kind {
        "ReplicaSet" => hash_suffix("pod-template-hash")
            .or_else(|| hash_suffix("rollouts-pod-template-hash"))
            .unwrap_or(name),
        "ReplicationController" => labels
            .get("deploymentconfig")
            .filter(|d| !d.is_empty())
            .map_or(name, String::as_str),
        "Job" => cron_job_of(name).unwrap_or(name),
        _ => name,
    }
}

/// `<name>` of a Job named `<name>-<8 to 10 digits>` (what a CronJob names its Jobs).
fn cron_job_of(job: &str) -> Option<&str> {
    let (name, digits) = job.rsplit_once('-')?;
    let ok = !name.is_empty()
        && (8..=10).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit());
    ok.then_some(name)
}

/// The canonical service and revision of a workload with these labels.
pub fn canonical<'a>(
    labels: &'a BTreeMap<String, String>,
    workload_name: &'a str,
) -> (&'a str, &'a str) {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).map(String::as_str);
    (
        first(&NAME_LABELS).unwrap_or(workload_name),
        first(&REVISION_LABELS).unwrap_or("latest"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn workload_names_follow_istiod() {
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Option<Controller<'a>>,
            &'a [(&'a str, &'a str)],
            &'a str,
        );
        let cases: &[Case<'_>] = &[
            (
                "web-7d4b9c-x2x",
                Some("web-7d4b9c-"),
                Some(("ReplicaSet", "web-7d4b9c")),
                &[("pod-template-hash", "7d4b9c")],
                "web",
            ),
            (
                "web-7d4b9c-x2x",
                Some("web-7d4b9c-"),
                Some(("ReplicaSet", "web-7d4b9c")),
                &[],
                "web-7d4b9c",
            ),
            (
                "web-7d4b9c-x2x",
                Some("web-7d4b9c-"),
                Some(("ReplicaSet", "web-7d4b9c")),
                &[("pod-template-hash", "other")],
                "web-7d4b9c",
            ),
            (
                "ro-5f-x",
                Some("ro-5f-"),
                Some(("ReplicaSet", "ro-5f")),
                &[("rollouts-pod-template-hash", "5f")],
                "ro",
            ),
            ("db-0", Some("db-"), Some(("StatefulSet", "db")), &[], "db"),
            (
                "agent-abcde",
                Some("agent-"),
                Some(("DaemonSet", "agent")),
                &[],
                "agent",
            ),
            (
                "backup-28391040-q",
                Some("backup-28391040-"),
                Some(("Job", "backup-28391040")),
                &[],
                "backup",
            ),
            ("once-x", Some("once-"), Some(("Job", "once")), &[], "once"),
            (
                "j-1234567-x",
                Some("j-1234567-"),
                Some(("Job", "j-1234567")),
                &[],
                "j-1234567",
            ),
            (
                "j-12345678901-x",
                Some("j-12345678901-"),
                Some(("Job", "j-12345678901")),
                &[],
                "j-12345678901",
            ),
            (
                "dc-1-x",
                Some("dc-1-"),
                Some(("ReplicationController", "dc-1")),
                &[("deploymentconfig", "dc")],
                "dc",
            ),
            (
                "rc-x",
                Some("rc-"),
                Some(("ReplicationController", "rc")),
                &[],
                "rc",
            ),
            // No generated name: the controller is not looked at.
            ("static", None, Some(("StatefulSet", "db")), &[], "static"),
            ("bare", Some("bare-"), None, &[], "bare"),
            // The label overrides everything.
            (
                "web-7d4b9c-x2x",
                Some("web-7d4b9c-"),
                Some(("ReplicaSet", "web-7d4b9c")),
                &[
                    ("pod-template-hash", "7d4b9c"),
                    (WORKLOAD_NAME_LABEL, "named"),
                ],
                "named",
            ),
        ];
        for (pod, generate, controller, l, want) in cases {
            let l = labels(l);
            assert_eq!(
                workload_name(pod, *generate, *controller, &l),
                *want,
                "{pod} {controller:?}"
            );
        }
    }

    #[test]
    fn localities_come_from_node_labels_or_istios_string() {
        let node = labels(&[
            (REGION_LABEL, "eu-west1"),
            (ZONE_LABEL, "eu-west1-b"),
            ("other", "x"),
        ]);
        let l = Locality::of_node(&node);
        assert_eq!(
            (&*l.region, &*l.zone, &*l.subzone),
            ("eu-west1", "eu-west1-b", "")
        );
        let racked = labels(&[(ZONE_LABEL, "eu-west1-b"), (SUBZONE_LABEL, "rack-3")]);
        let l = Locality::of_node(&racked);
        assert_eq!(
            (&*l.region, &*l.zone, &*l.subzone),
            ("", "eu-west1-b", "rack-3")
        );
        assert!(Locality::of_node(&labels(&[])).is_empty());
        let l = Locality::parse("us-east1/us-east1-c/rack-7");
        assert_eq!(
            (&*l.region, &*l.zone, &*l.subzone),
            ("us-east1", "us-east1-c", "rack-7")
        );
        let l = Locality::parse("us-east1");
        assert_eq!((&*l.region, &*l.zone, &*l.subzone), ("us-east1", "", ""));
    }

    #[test]
    fn canonical_service_and_revision_follow_istiod() {
        type Pairs<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Pairs<'_>, (&str, &str))] = &[
            (&[], ("wl", "latest")),
            (&[("app", "a"), ("version", "v1")], ("a", "v1")),
            (
                &[
                    ("app", "a"),
                    ("app.kubernetes.io/name", "k"),
                    ("version", "v1"),
                    ("app.kubernetes.io/version", "kv"),
                ],
                ("k", "kv"),
            ),
            (
                &[
                    ("app", "a"),
                    ("app.kubernetes.io/name", "k"),
                    ("service.istio.io/canonical-name", "c"),
                    ("service.istio.io/canonical-revision", "cr"),
                    ("version", "v1"),
                ],
                ("c", "cr"),
            ),
        ];
        for (l, want) in cases {
            let l = labels(l);
            assert_eq!(canonical(&l, "wl"), *want, "{l:?}");
        }
    }
}
