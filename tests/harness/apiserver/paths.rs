//! Resource paths of the stand-in API server: kinds to plurals, request paths back to
//! (apiVersion, plural, namespace), and query strings.

use std::collections::HashMap;

/// The plural resource name of a kind, as the API server's paths use it (for the kinds the
/// daemon watches).
pub(super) fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if let Some(stem) = lower.strip_suffix('y') {
        if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) {
            return format!("{stem}ies");
        }
    }
    format!("{lower}s")
}

/// Whether `kind` is not namespaced (of the kinds the daemon watches, only `Namespace`).
pub(super) fn is_cluster_scoped(kind: &str) -> bool {
    matches!(kind, "Namespace" | "Node")
}

/// A parsed collection path.
pub(super) struct Target {
    pub(super) api_version: String,
    pub(super) plural: String,
    pub(super) namespace: Option<String>,
}

/// `/api/v1/[namespaces/{ns}/]{plural}` or `/apis/{group}/{version}/[namespaces/{ns}/]{plural}`;
/// `None` for anything else (an object's path: the stand-in only lists and watches).
pub(super) fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural) = match rest {
        [p] => (None, *p),
        ["namespaces", ns, p] => (Some(ns.to_string()), *p),
        _ => return None,
    };
    Some(Target {
        api_version,
        plural: plural.to_string(),
        namespace,
    })
}

pub(super) fn query_map(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}
