//! What enrolling a pod does to the node: the [`Dataplane`] of the daemon.
//!
//! [`Node`] installs and removes the pod's rules ([`super::rules`]), binds the pod's
//! listeners in its netns and serves them on the daemon's runtime with the pod's identity
//! ([`crate::proxy::Scope::Pod`]), and on release closes the pod's connections and tunnels,
//! waiting for the connections' departures by notification ([`ConnTable::until_pod_closed`])
//! for at most [`RELEASE_DRAIN`]. Its methods block; the registry's thread calls them.
//!
//! [`ConnTable::until_pod_closed`]: crate::proxy::conns::ConnTable::until_pod_closed

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;

use super::registry::{Dataplane, EnrollError};
use super::rules::{self, RulesError};
use super::store::PodRecord;
use crate::discovery::Workload;
use crate::net::netns::Netns;
use crate::proxy::{self, Listeners, PodScope, ProxyInputs, Scope};

/// How long a release waits for the pod's connections to close before it removes the rules
/// that carry them.
pub const RELEASE_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The daemon's dataplane: real rules, listeners and connections.
pub struct Node {
    pub pi: Arc<ProxyInputs>,
    /// The daemon's runtime: the listeners are bound and served there.
    pub rt: tokio::runtime::Handle,
}

impl Dataplane for Node {
    type Netns = Arc<Netns>;
    /// The IPv4 listeners, and the IPv6 ones of a pod with an IPv6 address.
    type Bound = (Listeners, Option<Listeners>);
    type Serving = tokio::task::JoinHandle<()>;

    fn open(&self, path: &Path) -> std::io::Result<Arc<Netns>> {
        Netns::open(path).map(Arc::new)
    }

    fn id(&self, ns: &Arc<Netns>) -> (u64, u64) {
        ns.id()
    }

    /// A pod with an IPv6 address gets the IPv6 policy route and a second set of listeners
    /// on `[::]` (IPv6 only), beside the IPv4 ones.
    fn prepare(&self, ns: &Arc<Netns>, ipv6: bool) -> Result<Self::Bound, EnrollError> {
        rules::install(ns, ipv6)?;
        let _rt = self.rt.enter();
        let bind =
            |ip| Listeners::bind(Some(ns), ip, self.pi.quic_listen).map_err(EnrollError::Listen);
        let v6 = if ipv6 {
            Some(bind(IpAddr::V6(Ipv6Addr::UNSPECIFIED))?)
        } else {
            None
        };
        Ok((bind(IpAddr::V4(Ipv4Addr::UNSPECIFIED))?, v6))
    }

    fn serve(&self, ns: &Arc<Netns>, w: &Workload, bound: Self::Bound) -> Self::Serving {
        let scope = Scope::Pod(Arc::new(PodScope {
            uid: w.uid.clone(),
            netns: ns.clone(),
            // A pod without an address (none is enrolled) would share the unspecified one.
            addr: w
                .ips
                .first()
                .map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |a| a.to_canonical()),
        }));
        let pi = self.pi.clone();
        let (listeners, listeners6) = bound;
        self.rt.spawn(async move {
            let v4 = proxy::serve(pi.clone(), scope.clone(), listeners);
            match listeners6 {
                Some(l) => drop(tokio::join!(v4, proxy::serve(pi, scope, l))),
                None => v4.await,
            }
        })
    }

    fn stop(&self, serving: &Self::Serving) {
        serving.abort();
    }

    fn is_serving(&self, serving: &Self::Serving) -> bool {
        !serving.is_finished()
    }

    /// Tells the pod's connections to close ([`ConnTable::close_pod`]) and waits for their
    /// departures until [`RELEASE_DRAIN`] has passed; then closes the tunnel connections
    /// leaving from the pod.
    ///
    /// [`ConnTable::close_pod`]: crate::proxy::conns::ConnTable::close_pod
    fn close_connections(&self, ns: &Arc<Netns>, ips: &[IpAddr]) {
        let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.to_canonical()).collect();
        let closing = self.pi.connections.close_pod(&ips);
        let deadline = tokio::time::Instant::now() + RELEASE_DRAIN;
        let left = self
            .rt
            .block_on(self.pi.connections.until_pod_closed(&ips, deadline));
        if closing > 0 {
            tracing::info!(
                closing,
                left,
                "closed the pod's connections before removing its rules"
            );
        }
        let tunnels = self.pi.pool.evict_netns(ns);
        tracing::debug!(
            tunnels,
            "closed the tunnel connections leaving from the pod"
        );
    }

    fn remove_rules(&self, ns: &Arc<Netns>) -> Result<(), RulesError> {
        rules::remove(ns)
    }

    fn check_rules(&self, ns: &Arc<Netns>) -> Result<(), RulesError> {
        rules::check(ns)
    }

    fn probe_set(&self, ips: &[IpAddr], add: bool) -> Result<(), RulesError> {
        rules::node_probe_set(ips, add)
    }

    /// The namespace still holds one of the pod's IPs and its process is still the pod's
    /// (its cgroup names the pod's UID).
    fn still_the_pods(&self, r: &PodRecord) -> bool {
        holds_ips(&r.netns, &r.ips)
            && super::find::pod_uid_of_netns_path(&r.netns).as_deref() == Some(r.pod.uid.as_str())
    }
}

/// Whether the namespace at `path` has one of `ips` on an interface.
fn holds_ips(path: &Path, ips: &[IpAddr]) -> bool {
    Netns::open(path)
        .and_then(|ns| ns.run(super::find::local_addresses))
        .is_ok_and(|r| r.is_ok_and(|have| have.iter().any(|ip| ips.contains(ip))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_the_pods_netns_only_if_it_holds_the_pods_ip() {
        let here = Path::new("/proc/self/ns/net");
        let mine = super::super::find::local_addresses().unwrap();
        if let Some(ip) = mine.first() {
            assert!(holds_ips(here, &[*ip]));
        }
        assert!(!holds_ips(here, &["203.0.113.77".parse().unwrap()]));
        assert!(!holds_ips(Path::new("/proc/0/ns/net"), &mine));
    }
}
