//! L4 identity policy, as Istio's ambient mode decides it: each policy object (`objects`, the
//! Kubernetes shape that discovery reads) converted as
//! istiod converts it (`convert`) into the form the matcher reads (`compiled`), then matched
//! as Istio's ztunnel matches (`engine`); a policy in a root namespace (`roots`) applies
//! mesh-wide. Decisions are pure functions ([`PolicyIndex::evaluate`]); the proxies enforce
//! them. Each object's status for Kubernetes comes from the same conversion ([`status_of`]).

mod compiled;
mod convert;
mod engine;
pub mod from_istio;
mod matchers;
pub mod objects;
mod roots;
mod validate;

pub use compiled::{Conn, Decision, Effect, Kind, PolicyRef, Reason};
pub use convert::{status_of, PolicyStatus, CONDITION_TYPE, DRY_RUN_ANNOTATION};
pub use engine::{Considered, Ignored, PolicyIndex};
pub(crate) use matchers::ip_block;
pub use roots::{root_namespaces, set_root_namespaces, ROOT_NAMESPACE};

#[cfg(test)]
mod istio_tests;
#[cfg(test)]
mod tests;
