//! The root namespaces: a policy in one of them applies to the whole mesh.

use std::sync::OnceLock;

/// The default root namespace: policies here apply to the whole mesh.
pub const ROOT_NAMESPACE: &str = "ztunnel-system";

static CONFIGURED_ROOTS: OnceLock<Vec<String>> = OnceLock::new();

/// Sets the process's root namespaces (`--root-namespace`, then Istio's under the
/// Istio-compatible setting), once, before discovery starts; later calls are ignored.
/// Returns whether this call set them.
pub fn set_root_namespaces(roots: &[&str]) -> bool {
    let mut v: Vec<String> = Vec::with_capacity(roots.len());
    for r in roots {
        if !v.iter().any(|x| x == r) {
            v.push((*r).to_owned());
        }
    }
    !v.is_empty() && CONFIGURED_ROOTS.set(v).is_ok()
}

/// The process's root namespaces: the configured ones, else [`ROOT_NAMESPACE`]. Discovery
/// ([`crate::discovery::State::build`]) builds the policy index with them.
pub fn root_namespaces() -> Vec<&'static str> {
    match CONFIGURED_ROOTS.get() {
        Some(v) => v.iter().map(String::as_str).collect(),
        None => vec![ROOT_NAMESPACE],
    }
}
