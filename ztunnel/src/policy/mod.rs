//! L4 identity policy, as Istio's ambient mode decides it: each policy object converted as
//! istiod converts it (`convert`), then matched as Istio's ztunnel matches (`engine`).
//! Decisions are pure functions ([`PolicyIndex::evaluate`]); the proxies enforce them. Each
//! object's status for Kubernetes comes from the same conversion ([`status_of`]).

mod convert;
mod engine;
pub mod explain;
pub mod from_istio;
mod matchers;

pub use convert::{status_of, PolicyStatus, CONDITION_TYPE, DRY_RUN_ANNOTATION};
pub use engine::{
    root_namespaces, set_root_namespaces, Conn, Considered, Decision, Effect, Ignored, Kind,
    PolicyIndex, PolicyRef, Reason, ROOT_NAMESPACE,
};

#[cfg(test)]
mod istio_tests;
#[cfg(test)]
mod tests;
