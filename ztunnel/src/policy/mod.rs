//! L4 identity policy: the authorization engine and peer-authentication modes, compiled from
//! discovery's policy objects. Decisions are pure functions ([`PolicyIndex::evaluate`]); the
//! proxies enforce them.

mod engine;
pub mod explain;
mod matchers;

pub use engine::{CompileError, Conn, Decision, PolicyIndex, PolicyRef, Reason, ROOT_NAMESPACE};

#[cfg(test)]
mod tests;
