//! Which pods are in the mesh, from their namespace's labels and their own labels and
//! annotations (pure).
//!
//! - Ours: a namespace labelled `ztunnel.dev/dataplane-mode=ambient` enrolls its pods; a pod
//!   labelled `ztunnel.dev/dataplane-mode=none` opts out.
//! - Istio's, under the Istio-compatible setting ([`Rules::istio`]), as Istio's CNI agent
//!   decides (istio/istio `cni/pkg/util` `PodRedirectionEnabled`): the label
//!   `istio.io/dataplane-mode=ambient` on the namespace *or on the pod* enrolls the pod; the
//!   same label on the pod with any other value (`none`) opts it out.
//! - An opt-out, by either label, wins over any enrollment.
//! - Never, whatever the setting: a pod that Istio already handles, with a sidecar (the
//!   injector's `sidecar.istio.io/status` annotation) or with Istio's ambient redirection (the
//!   `ambient.istio.io/redirection` annotation Istio's CNI agent writes). Two proxies on one
//!   pod's traffic would break both; the pod is protected by Istio.
//! - Host-network pods never enroll; discovery does not keep them as workloads.

use serde::Serialize;

use crate::labels::Labels;

/// The label that enrolls a namespace (`ambient`) and opts a pod out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "ztunnel.dev/dataplane-mode";
/// Istio's label of the same meaning, read under the Istio-compatible setting.
pub const ISTIO_DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Written by Istio's sidecar injector on every pod it injected.
pub const ISTIO_SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Written by Istio's CNI agent on a pod it redirected to Istio's ztunnel.
pub const ISTIO_REDIRECTION: &str = "ambient.istio.io/redirection";

/// The enrollment rules in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Istio's labels count too.
    pub istio: bool,
    /// Namespaces whose pods are never enrolled, whatever their labels (the daemon's
    /// `--exclude-namespaces`, the CNI plugin's `excludeNamespaces`).
    pub excluded: &'static [String],
}

/// Another mesh that handles a pod already.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OtherMesh {
    IstioSidecar,
    /// Redirected to Istio's ztunnel (`ambient.istio.io/redirection: enabled`).
    IstioAmbient,
    /// Being redirected by Istio's CNI agent, not yet handed to its ztunnel (the annotation
    /// with another value, `pending`): Istio reaches it in plaintext.
    IstioAmbientPending,
}

impl OtherMesh {
    /// What a pod's annotations say: `annotation(key)` is the value of annotation `key`.
    pub fn of<'a>(annotation: impl Fn(&str) -> Option<&'a str>) -> Option<OtherMesh> {
        if annotation(ISTIO_SIDECAR_STATUS).is_some() {
            return Some(OtherMesh::IstioSidecar);
        }
        annotation(ISTIO_REDIRECTION).map(|v| match v {
            "enabled" => OtherMesh::IstioAmbient,
            _ => OtherMesh::IstioAmbientPending,
        })
    }

    /// Whether `key` is one of the annotations [`OtherMesh::of`] reads.
    pub fn reads(key: &str) -> bool {
        key == ISTIO_SIDECAR_STATUS || key == ISTIO_REDIRECTION
    }
}

/// Why a pod is not enrolled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotEnrolled {
    /// Neither its namespace nor (with Istio's labels) the pod asks for the mesh.
    NotAsked,
    /// The pod opted out with this label.
    OptedOut(&'static str),
    /// Another mesh handles it.
    Other(OtherMesh),
    /// Its namespace is one the daemons never enroll ([`Rules::excluded`]).
    Excluded,
}

impl std::fmt::Display for NotEnrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotEnrolled::NotAsked => write!(f, "neither its namespace nor the pod is enrolled"),
            NotEnrolled::OptedOut(label) => write!(f, "the pod opted out ({label})"),
            NotEnrolled::Excluded => write!(
                f,
                "its namespace is excluded from the mesh (--exclude-namespaces)"
            ),
            NotEnrolled::Other(OtherMesh::IstioSidecar) => write!(
                f,
                "Istio handles the pod already: it has a sidecar ({ISTIO_SIDECAR_STATUS})"
            ),
            NotEnrolled::Other(OtherMesh::IstioAmbient | OtherMesh::IstioAmbientPending) => write!(
                f,
                "Istio handles the pod already: Istio's ambient mode redirected it ({ISTIO_REDIRECTION})"
            ),
        }
    }
}

fn is(labels: &Labels, key: &str, value: &str) -> bool {
    labels.get(key).is_some_and(|v| &**v == value)
}

impl Rules {
    /// The pod labels discovery must keep of a pod on another node (whose other labels it
    /// drops): those [`Rules::pod`] reads, and under the Istio-compatible setting the pod's
    /// waypoint ([`crate::discovery::State::workload_waypoint`]).
    pub fn keeps(&self, key: &str) -> bool {
        key == DATAPLANE_MODE_LABEL
            || (self.istio
                && (key == ISTIO_DATAPLANE_MODE_LABEL || super::waypoint::decides_waypoint(key)))
    }

    /// Whether namespace `name` is one whose pods are never enrolled.
    pub fn excludes(&self, name: &str) -> bool {
        self.excluded.iter().any(|e| e == name)
    }

    /// Whether namespace `name`, with these labels, enrolls its pods.
    pub fn namespace(&self, name: &str, labels: &Labels) -> bool {
        !self.excludes(name)
            && (is(labels, DATAPLANE_MODE_LABEL, "ambient")
                || (self.istio && is(labels, ISTIO_DATAPLANE_MODE_LABEL, "ambient")))
    }

    /// Whether a pod is enrolled: `namespace` is its namespace, `ns` that namespace's
    /// labels (`None`: unknown namespace), `pod` its labels, `other` what its annotations say.
    pub fn pod(
        &self,
        namespace: &str,
        ns: Option<&Labels>,
        pod: &Labels,
        other: Option<OtherMesh>,
    ) -> Result<(), NotEnrolled> {
        if self.excludes(namespace) {
            return Err(NotEnrolled::Excluded);
        }
        let asked = ns.is_some_and(|l| self.namespace(namespace, l))
            || (self.istio && is(pod, ISTIO_DATAPLANE_MODE_LABEL, "ambient"));
        if !asked {
            return Err(NotEnrolled::NotAsked);
        }
        if is(pod, DATAPLANE_MODE_LABEL, "none") {
            return Err(NotEnrolled::OptedOut("ztunnel.dev/dataplane-mode=none"));
        }
        if self.istio
            && pod
                .get(ISTIO_DATAPLANE_MODE_LABEL)
                .is_some_and(|v| &**v != "ambient")
        {
            return Err(NotEnrolled::OptedOut("istio.io/dataplane-mode"));
        }
        match other {
            Some(o) => Err(NotEnrolled::Other(o)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::of(pairs)
    }

    const OURS: (&str, &str) = (DATAPLANE_MODE_LABEL, "ambient");
    const OURS_NONE: (&str, &str) = (DATAPLANE_MODE_LABEL, "none");
    const ISTIO: (&str, &str) = (ISTIO_DATAPLANE_MODE_LABEL, "ambient");
    const ISTIO_NONE: (&str, &str) = (ISTIO_DATAPLANE_MODE_LABEL, "none");

    #[test]
    fn enrollment_table() {
        use NotEnrolled::*;
        let off = Rules {
            istio: false,
            ..Default::default()
        };
        let on = Rules {
            istio: true,
            ..Default::default()
        };
        let sidecar = Some(OtherMesh::IstioSidecar);
        let ambient = Some(OtherMesh::IstioAmbient);
        // (rules, namespace labels, pod labels, other mesh, want); Istio's cases follow
        // istio/istio cni/pkg/util PodRedirectionEnabled.
        #[allow(clippy::type_complexity)]
        let table: &[(
            Rules,
            &[(&str, &str)],
            &[(&str, &str)],
            Option<OtherMesh>,
            Result<(), NotEnrolled>,
        )] = &[
            (off, &[OURS], &[], None, Ok(())),
            (off, &[], &[], None, Err(NotAsked)),
            (
                off,
                &[OURS],
                &[OURS_NONE],
                None,
                Err(OptedOut("ztunnel.dev/dataplane-mode=none")),
            ),
            // Our label on a pod does not enroll it; only the namespace's does.
            (off, &[], &[OURS], None, Err(NotAsked)),
            // Istio's labels mean nothing without the setting.
            (off, &[ISTIO], &[], None, Err(NotAsked)),
            (off, &[], &[ISTIO], None, Err(NotAsked)),
            (off, &[OURS], &[ISTIO_NONE], None, Ok(())),
            // With it: Istio's namespace label, or Istio's pod label alone.
            (on, &[ISTIO], &[], None, Ok(())),
            (on, &[], &[ISTIO], None, Ok(())),
            (on, &[OURS], &[], None, Ok(())),
            (
                on,
                &[ISTIO],
                &[ISTIO_NONE],
                None,
                Err(OptedOut("istio.io/dataplane-mode")),
            ),
            // Any other value of Istio's pod label opts out (only `ambient` matches).
            (
                on,
                &[ISTIO],
                &[(ISTIO_DATAPLANE_MODE_LABEL, "sidecar")],
                None,
                Err(OptedOut("istio.io/dataplane-mode")),
            ),
            // Either opt-out wins over either enrollment.
            (
                on,
                &[OURS],
                &[ISTIO_NONE],
                None,
                Err(OptedOut("istio.io/dataplane-mode")),
            ),
            (
                on,
                &[ISTIO],
                &[OURS_NONE],
                None,
                Err(OptedOut("ztunnel.dev/dataplane-mode=none")),
            ),
            (
                on,
                &[],
                &[ISTIO, OURS_NONE],
                None,
                Err(OptedOut("ztunnel.dev/dataplane-mode=none")),
            ),
            // A pod Istio handles is never ours, with or without the setting.
            (
                off,
                &[OURS],
                &[],
                sidecar,
                Err(Other(OtherMesh::IstioSidecar)),
            ),
            (
                on,
                &[ISTIO],
                &[],
                sidecar,
                Err(Other(OtherMesh::IstioSidecar)),
            ),
            (
                off,
                &[OURS],
                &[],
                ambient,
                Err(Other(OtherMesh::IstioAmbient)),
            ),
            (
                on,
                &[],
                &[ISTIO],
                ambient,
                Err(Other(OtherMesh::IstioAmbient)),
            ),
            // A pod that asks for nothing says so, whatever handles it.
            (on, &[], &[], sidecar, Err(NotAsked)),
        ];
        for (i, (rules, ns, pod, other, want)) in table.iter().enumerate() {
            let got = rules.pod("app", Some(&labels(ns)), &labels(pod), *other);
            assert_eq!(
                &got, want,
                "case {i}: {rules:?} ns {ns:?} pod {pod:?} {other:?}"
            );
        }
        assert_eq!(
            on.pod("app", None, &labels(&[ISTIO]), None),
            Ok(()),
            "pod label, namespace unknown"
        );
        assert_eq!(off.pod("app", None, &labels(&[]), None), Err(NotAsked));
    }

    /// An excluded namespace enrolls nothing, whatever its labels or its pods' say.
    #[test]
    fn excluded_namespaces_enroll_nothing() {
        let excluded: &'static [String] = Vec::leak(vec!["kube-system".to_owned()]);
        for istio in [false, true] {
            let rules = Rules { istio, excluded };
            let cases = [
                (
                    "kube-system",
                    &[OURS][..],
                    &[][..],
                    Err(NotEnrolled::Excluded),
                ),
                (
                    "kube-system",
                    &[ISTIO][..],
                    &[ISTIO][..],
                    Err(NotEnrolled::Excluded),
                ),
                ("app", &[OURS][..], &[][..], Ok(())),
            ];
            for (ns, ns_labels, pod, want) in cases {
                let got = rules.pod(ns, Some(&labels(ns_labels)), &labels(pod), None);
                assert_eq!(got, want, "{ns} istio={istio}");
                assert_eq!(rules.namespace(ns, &labels(&[OURS])), want.is_ok(), "{ns}");
            }
            let none = Rules {
                istio,
                excluded: &[],
            };
            assert!(none.namespace("kube-system", &labels(&[OURS])));
        }
        assert!(NotEnrolled::Excluded
            .to_string()
            .contains("--exclude-namespaces"));
    }

    #[test]
    fn annotations_that_name_another_mesh() {
        let of = |pairs: &[(&'static str, &'static str)]| {
            let pairs = pairs.to_vec();
            OtherMesh::of(move |k| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v))
        };
        assert_eq!(of(&[]), None);
        assert_eq!(of(&[("other", "x")]), None);
        assert_eq!(
            of(&[(ISTIO_SIDECAR_STATUS, "{}")]),
            Some(OtherMesh::IstioSidecar)
        );
        assert_eq!(
            of(&[(ISTIO_REDIRECTION, "enabled")]),
            Some(OtherMesh::IstioAmbient)
        );
        assert_eq!(
            of(&[(ISTIO_REDIRECTION, "pending")]),
            Some(OtherMesh::IstioAmbientPending)
        );
        assert!(OtherMesh::reads(ISTIO_REDIRECTION) && !OtherMesh::reads("app"));
        let on = Rules {
            istio: true,
            ..Default::default()
        };
        assert!(on.keeps(ISTIO_DATAPLANE_MODE_LABEL) && on.keeps(DATAPLANE_MODE_LABEL));
        assert!(!Rules::default().keeps(ISTIO_DATAPLANE_MODE_LABEL));
        assert!(!on.keeps("app"));
        let gateway = crate::discovery::waypoint::GATEWAY_NAME;
        assert!(on.keeps(gateway) && !Rules::default().keeps(gateway));
    }
}
