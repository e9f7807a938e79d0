//! The end-to-end test harness: network namespaces as hosts ([`netns`]), real `ztunnel`
//! processes inside them ([`daemon`]), the two-node test bed ([`mesh`]) and the applications
//! the tests run on it ([`apps`]). See `tests/README.md` for the tiers of tests.

pub mod apiserver;
pub mod apps;
pub mod certs;
pub mod cgroup;
pub mod cni;
pub mod controlplane;
pub mod daemon;
pub mod kubebed;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod objects;
pub mod procfs;
pub mod raw_h2;
pub mod testbed;
pub mod transport;
pub mod watchdog;
