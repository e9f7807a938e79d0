//! The ztunnel node daemon as a library: identity and certificates, the CA, discovery, HBONE
//! tunnels and their pool, the proxies, and the admin and metrics servers. The binary in
//! `main.rs` only parses the command line, sets up logging and calls [`app::start`].

pub mod admin;
pub mod alloc;
pub mod app;
pub mod ca;
pub mod capture;
pub mod config;
pub mod ctl;
pub mod discovery;
pub mod explain;
pub mod gate;
pub mod hbone;
pub mod identity;
pub mod labels;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod refusal;
pub mod removed;
pub mod residency;
pub mod task;
pub mod throttle;
pub mod yaml;
