//! Resource paths of the stand-in API server: kinds to plurals and collection paths, request
//! paths back to (apiVersion, plural, namespace, name), and query strings.

use std::collections::HashMap;

/// Kinds that are not namespaced.
pub const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "Node",
    "PersistentVolume",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "TokenReview",
    "SubjectAccessReview",
    "SelfSubjectAccessReview",
    "CertificateSigningRequest",
    "StorageClass",
    "PriorityClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "APIService",
];

/// The plural resource name of a kind, as the API server's paths use it.
pub fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    // Overrides: kinds whose plural is not the rule's.
    if lower == "endpoints" {
        return lower;
    }
    if let Some(stem) = lower.strip_suffix('y') {
        if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) {
            return format!("{stem}ies");
        }
    }
    if lower.ends_with('s')
        || lower.ends_with('x')
        || lower.ends_with("ch")
        || lower.ends_with("sh")
    {
        return format!("{lower}es");
    }
    format!("{lower}s")
}

pub(super) fn is_cluster_scoped(kind: &str) -> bool {
    CLUSTER_SCOPED.contains(&kind)
}

/// The URL path of a collection (`namespace` None: all namespaces, or a cluster-scoped kind).
pub fn collection_path(api_version: &str, kind: &str, namespace: Option<&str>) -> String {
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    match namespace {
        Some(ns) if !is_cluster_scoped(kind) => {
            format!("{prefix}/namespaces/{ns}/{}", plural(kind))
        }
        _ => format!("{prefix}/{}", plural(kind)),
    }
}

/// A parsed resource path.
pub(super) struct Target {
    pub(super) api_version: String,
    pub(super) plural: String,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
}

pub(super) fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [p] => (None, *p, None),
        ["namespaces", ns, p] => (Some(ns.to_string()), *p, None),
        ["namespaces", ns, p, n] | ["namespaces", ns, p, n, "status"] => {
            (Some(ns.to_string()), *p, Some(n.to_string()))
        }
        [p, n] | [p, n, "status"] => (None, *p, Some(n.to_string())),
        _ => return None,
    };
    Some(Target {
        api_version,
        plural: plural.to_string(),
        namespace,
        name,
    })
}

pub(super) fn query_map(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}
