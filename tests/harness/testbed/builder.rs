//! [`Builder`]: how to start a [`TestBed`].

use anyhow::Result;
use serde_json::Value;

use super::{default_pods, dual_stack, PodSpec, TestBed};
use crate::transport::Transport;

/// How to start a [`TestBed`] ([`TestBed::builder`]): the pods, the daemons' environment and
/// tunnel transport, and where discovery comes from.
pub struct Builder {
    pods: Vec<PodSpec>,
    known: Vec<PodSpec>,
    daemon_env: Vec<(String, String)>,
    transport: Transport,
    kube: Option<Value>,
}

impl Builder {
    /// The pods created at the start (the default pods unless set).
    pub fn pods(mut self, pods: Vec<PodSpec>) -> Self {
        self.pods = pods;
        self
    }

    /// Pods only in discovery, for tests that create them later.
    pub fn known(mut self, known: Vec<PodSpec>) -> Self {
        self.known = known;
        self
    }

    /// Settings beyond the defaults in every daemon's environment (added to those given
    /// before).
    pub fn daemon_env(mut self, env: &[(&str, &str)]) -> Self {
        self.daemon_env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// The transport of the tunnels between the pods (HTTP/2 unless set; with QUIC, HTTP/2 is
    /// the fallback): see [`Transport::pod_env`].
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// The daemons discover the cluster from the real API server ([`crate::controlplane`],
    /// `deploy/base` installed) instead of the discovery file; namespace `plain` is created
    /// with `plain_labels` (see `kubebed.rs`).
    pub fn kube(mut self, plain_labels: Value) -> Self {
        self.kube = Some(plain_labels);
        self
    }

    /// Starts the bed; panics when it cannot.
    pub fn start(self) -> TestBed {
        self.try_start().expect("test bed")
    }

    /// Starts the bed: nodes, underlay, daemons, then the pods.
    pub fn try_start(self) -> Result<TestBed> {
        let dual = dual_stack(&self.pods) || dual_stack(&self.known);
        let mut env = self.transport.pod_env(dual);
        env.extend(self.daemon_env);
        let kube = self
            .kube
            .map(|labels| (crate::controlplane::shared().install_base(), labels));
        TestBed::build(self.pods, self.known, env, kube)
    }
}

impl TestBed {
    /// A bed of two nodes with their daemons and the default pods, enrolled through the CNI
    /// chain, unless the builder says otherwise.
    pub fn builder() -> Builder {
        Builder {
            pods: default_pods(),
            known: Vec::new(),
            daemon_env: Vec::new(),
            transport: Transport::Http2,
            kube: None,
        }
    }
}
