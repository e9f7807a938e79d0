//! In-pod capture: enrolled pods, their rules and listeners, the enrollment server that the
//! CNI plugin talks to, and the records that let a restarted daemon recover every pod.
//!
//! The flow: the plugin sends ADD ([`ztunnel_proto::enroll`]) to the [`server`], which hands
//! it to [`pods::Pods`]; that queues it for the [`registry`], the single owner of the enrolled
//! pods, whose thread applies one operation at a time. [`decide::decide`] (pure) says whether
//! the pod is enrolled; if so the registry has the [`dataplane`] install the rules in the pod's
//! netns ([`rules`]), bind the pod's three listeners there (`SO_REUSEPORT`) and serve them
//! with the pod's identity ([`crate::proxy::Scope::Pod`]), writes the pod's record ([`store`]),
//! and only then answers. On DEL it undoes all of it. While no daemon runs, the rules stay: an
//! enrolled pod's connections are redirected to ports nobody listens on and are refused,
//! never sent in plaintext. Besides CNI, the reconciler ([`reconcile`]) enrolls and releases
//! running pods as namespace and pod labels change, finding each pod's netns by its IP
//! ([`find`]); the pod's annotation shows the outcome ([`annotate`]).

pub mod annotate;
pub mod dataplane;
pub mod decide;
pub mod find;
pub mod pods;
pub mod reconcile;
pub mod registry;
pub mod rules;
pub mod server;
pub mod store;

#[cfg(test)]
mod registry_tests;
