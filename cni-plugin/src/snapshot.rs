//! The daemon's enrollment snapshot (`enrolledNamespacesFile`,
//! [`ztunnel_proto::enroll::Snapshot`], which the daemon rewrites whenever discovery changes),
//! consulted only when the daemon cannot be reached on ADD or CHECK. The decision fails
//! closed: a pod passes through unenrolled only when the snapshot is readable and positively
//! says that no pod of its namespace is enrolled. A bare JSON array of namespace names (the
//! snapshot of daemons that knew no other rule) is read as those namespaces alone.

use std::path::Path;

use ztunnel_proto::enroll::Snapshot as Written;

/// What to do with a request whose daemon is unreachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The pod is not enrolled: hand `prevResult` on. The string says why.
    PassThrough(String),
    /// The pod may be enrolled: refuse with "try again later". The string says why.
    FailClosed(String),
}

/// The snapshot, or why it is unusable.
pub type Snapshot = Result<Written, String>;

/// Reads the snapshot: `Err` when it is missing, unreadable, or neither a snapshot object nor
/// an array of names.
pub fn read(path: &Path) -> Snapshot {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Either {
        Snapshot(Written),
        Names(Vec<String>),
    }
    match serde_json::from_slice(&bytes) {
        Ok(Either::Snapshot(s)) => Ok(s),
        Ok(Either::Names(namespaces)) => Ok(Written {
            namespaces,
            pod_labels_enroll: false,
        }),
        Err(e) => Err(format!("parsing {}: {e}", path.display())),
    }
}

/// Decides from the snapshot and the pod's namespace (`K8S_POD_NAMESPACE`).
pub fn decide(snapshot: Snapshot, namespace: Option<&str>) -> Fallback {
    let Some(ns) = namespace else {
        return Fallback::FailClosed(
            "the pod's namespace is unknown (no K8S_POD_NAMESPACE)".into(),
        );
    };
    match snapshot {
        Err(e) => Fallback::FailClosed(format!("no usable enrollment snapshot: {e}")),
        Ok(s) if s.namespaces.iter().any(|n| n == ns) => {
            Fallback::FailClosed(format!("namespace {ns:?} is enrolled"))
        }
        Ok(s) if s.pod_labels_enroll => Fallback::FailClosed(
            "the daemon's rules let a pod's own labels enroll it, and its labels are unknown here"
                .into(),
        ),
        Ok(_) => Fallback::PassThrough(format!(
            "namespace {ns:?} is not in the enrollment snapshot"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_fail_closed_unless_positively_unlisted() {
        let list = |pod_labels_enroll| {
            Ok(Written {
                namespaces: vec!["mesh".to_string(), "other".to_string()],
                pod_labels_enroll,
            })
        };
        let cases: [(Snapshot, Option<&str>, bool); 7] = [
            (list(false), Some("plain"), true),
            (list(false), Some("mesh"), false),
            (list(false), None, false),
            (list(true), Some("plain"), false),
            (list(true), Some("mesh"), false),
            (Err("missing".into()), Some("plain"), false),
            (Ok(Written::default()), Some("plain"), true),
        ];
        for (snap, ns, passes) in cases {
            let what = format!("{snap:?} {ns:?}");
            let got = decide(snap, ns);
            assert_eq!(
                matches!(got, Fallback::PassThrough(_)),
                passes,
                "{what}: {got:?}"
            );
        }
    }

    #[test]
    fn reads_a_snapshot_or_an_array_of_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ns.json");
        assert!(read(&p).is_err());
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        std::fs::write(&p, r#"["a","b"]"#).unwrap();
        assert_eq!(
            read(&p).unwrap(),
            Written {
                namespaces: names(&["a", "b"]),
                pod_labels_enroll: false
            }
        );
        std::fs::write(&p, r#"{"namespaces":["a"],"podLabelsEnroll":true}"#).unwrap();
        assert_eq!(
            read(&p).unwrap(),
            Written {
                namespaces: names(&["a"]),
                pod_labels_enroll: true
            }
        );
        for unusable in [
            r#"{"a":1}"#,
            "[\"a\"",
            r#"{"namespaces":["a"],"podLabelsEnroll":false,"newRule":true}"#,
            r#"{"namespaces":["a"]}"#,
        ] {
            std::fs::write(&p, unusable).unwrap();
            assert!(read(&p).is_err(), "{unusable}");
        }
    }
}
