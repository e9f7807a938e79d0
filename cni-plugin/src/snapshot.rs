//! The daemon's snapshot of enrolled namespaces (`enrolledNamespacesFile`, a JSON array of
//! namespace names the daemon rewrites whenever discovery changes), consulted only when the
//! daemon cannot be reached on ADD. The decision fails closed: a pod passes through unenrolled
//! only when the snapshot is readable and positively does not list its namespace.

use std::path::Path;

/// What to do with an ADD whose daemon is unreachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The pod is not enrolled: hand `prevResult` on. The string says why.
    PassThrough(String),
    /// The pod may be enrolled: refuse with "try again later". The string says why.
    FailClosed(String),
}

/// The enrolled namespaces, or why they are unknown.
pub type Snapshot = Result<Vec<String>, String>;

/// Reads the snapshot: `Err` when it is missing, unreadable or not an array of strings.
pub fn read(path: &Path) -> Snapshot {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("parsing {}: {e}", path.display()))
}

/// Decides from the snapshot and the pod's namespace (`K8S_POD_NAMESPACE`).
pub fn decide(snapshot: Snapshot, namespace: Option<&str>) -> Fallback {
    let Some(ns) = namespace else {
        return Fallback::FailClosed(
            "the pod's namespace is unknown (no K8S_POD_NAMESPACE)".into(),
        );
    };
    match snapshot {
        Err(e) => Fallback::FailClosed(format!("no usable enrolled-namespaces snapshot: {e}")),
        Ok(list) if list.iter().any(|n| n == ns) => {
            Fallback::FailClosed(format!("namespace {ns:?} is enrolled"))
        }
        Ok(_) => Fallback::PassThrough(format!(
            "namespace {ns:?} is not in the enrolled-namespaces snapshot"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_fail_closed_unless_positively_unlisted() {
        let list = || Ok(vec!["mesh".to_string(), "other".to_string()]);
        let cases: [(Snapshot, Option<&str>, bool); 5] = [
            (list(), Some("plain"), true),
            (list(), Some("mesh"), false),
            (list(), None, false),
            (Err("missing".into()), Some("plain"), false),
            (Ok(vec![]), Some("plain"), true),
        ];
        for (snap, ns, passes) in cases {
            let got = decide(snap, ns);
            assert_eq!(
                matches!(got, Fallback::PassThrough(_)),
                passes,
                "{ns:?}: {got:?}"
            );
        }
    }

    #[test]
    fn reads_only_an_array_of_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ns.json");
        assert!(read(&p).is_err());
        std::fs::write(&p, r#"["a","b"]"#).unwrap();
        assert_eq!(read(&p).unwrap(), vec!["a", "b"]);
        std::fs::write(&p, r#"{"a":1}"#).unwrap();
        assert!(read(&p).is_err());
        std::fs::write(&p, "[\"a\"").unwrap();
        assert!(read(&p).is_err());
    }
}
