//! The `ztunnel-cni` plugin and its node installer as a library, so that their parsers and
//! their pure behaviour can be called directly (the fuzz targets do): the `CNI_*` environment
//! and network configuration ([`conf`]), one invocation ([`plugin::run`]) against a [`daemon`]
//! and a pod's [`netns`], ADD's [`result`], the error objects ([`error`]), the daemon's snapshot of enrolled
//! namespaces ([`snapshot`]) and the installer ([`install`]). The binary in `main.rs` only
//! gathers the process's environment and stdin, calls [`plugin::run`] and prints the outcome.

pub mod conf;
pub mod daemon;
pub mod error;
pub mod install;
pub mod netns;
pub mod plugin;
pub mod result;
pub mod snapshot;
