//! The daemon, wired together: discovery, the certificate manager and its signer, the pool,
//! the proxies, and the admin, metrics and readiness servers; then drain on SIGTERM.
//!
//! Readiness turns true once discovery has loaded and every local workload has a
//! certificate. Certificates of local workloads are fetched ahead of traffic, again whenever
//! discovery changes, so a new pod's first connection does not wait for signing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::admin::{self, AdminState, Endpoint};
use crate::ca::{CaClient, LocalCa};
use crate::capture::annotate::{Annotator, KubeAnnotator, NoAnnotator};
use crate::capture::{pods::Pods, rules, server as enrollment, store::Store};
use crate::config::{CaSource, CaptureMode, DiscoverySource, RunConfig};
use crate::discovery::{self, Discovery};
use crate::hbone::pool::{Pool, PoolSettings, QuicSettings};
use crate::identity::crl::{CrlError, CrlFile, Revocation};
use crate::identity::{CertManager, CertSigner, Identity, SignError};
use crate::metrics::{IdentityLabels, Metrics};
use crate::net::{self, ConnectOptions};
use crate::proxy::{self, Listeners, ProxyInputs, QuicListener, Scope};
use ztunnel_proto::enroll::PodRef;

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("discovery: {0}")]
    Discovery(#[from] discovery::Error),
    #[error("certificate authority: {0}")]
    Ca(#[from] crate::ca::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {path}: {source}")]
    State {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] crate::identity::Error),
    #[error("revocation lists: {0}")]
    Crl(#[from] CrlError),
    #[error("cannot start the pod registry's thread: {0}")]
    Registry(std::io::Error),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A running daemon; dropping it does not stop it, [`Daemon::drain`] does.
pub struct Daemon {
    pub proxy: Arc<ProxyInputs>,
    /// The enrolled pods (in-pod capture only).
    pub pods: Option<Arc<Pods>>,
    draining: watch::Sender<bool>,
    drain_grace: Duration,
    /// The daemon's long-lived tasks, by name: each runs until the daemon drains.
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

fn signer(cfg: &RunConfig) -> Result<Arc<dyn CertSigner>, StartError> {
    Ok(match &cfg.ca {
        CaSource::Dir(dir) => Arc::new(LocalCa::load_or_create(dir, &cfg.trust_domain)?),
        CaSource::Remote {
            address,
            root_cert,
            server_name,
            token_file,
        } => {
            // The token file is re-read for every request (projected tokens rotate), the root
            // bundle at every dial (the CA's roots rotate).
            Arc::new(CaClient::with_files(
                address.clone(),
                server_name.clone(),
                root_cert.clone(),
                token_file.clone(),
            )?)
        }
    })
}

/// Listens on `addr`; `[::]` on a node without IPv6 falls back to `0.0.0.0`.
fn bind(
    what: &'static str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, StartError> {
    match net::listen(addr) {
        Err(e)
            if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            let v4 = std::net::SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::info!(what, %addr, fallback = %v4, "no IPv6 on this node; listening on IPv4 only");
            net::listen(v4).map_err(|source| StartError::Listen {
                what,
                addr: v4,
                source,
            })
        }
        r => r.map_err(|source| StartError::Listen { what, addr, source }),
    }
}

/// Starts the daemon. `set_log_level` backs the admin `/logging` endpoint.
pub async fn start(
    cfg: &RunConfig,
    set_log_level: crate::admin::SetLogLevel,
) -> Result<Daemon, StartError> {
    // Before any certificate makes a TLS configuration.
    crate::identity::tls::use_key_exchange(cfg.tls_key_exchange)?;
    // Before discovery builds its first policy index.
    let roots = cfg.root_namespaces();
    if !crate::policy::set_root_namespaces(&roots) && crate::policy::root_namespaces() != roots {
        tracing::warn!(
            configured = ?roots,
            in_use = ?crate::policy::root_namespaces(),
            "the root namespaces are set once per process; keeping the first"
        );
    }
    // Enrollment's rules, the same for the process's life (the list is kept for it).
    let rules = discovery::enrollment::Rules {
        istio: cfg.istio_root_namespace.is_some(),
        excluded: Vec::leak(cfg.exclude_namespaces.clone()),
    };
    // The API client, when discovery has one (the pods' enrollment annotation uses it too).
    let mut kube_client = None;
    let (disc, watcher) = match &cfg.discovery {
        DiscoverySource::File(path) => discovery::watch_file(
            path.clone(),
            cfg.trust_domain.clone(),
            Some(cfg.node_name.clone()),
            rules,
            cfg.discovery_poll,
        )?,
        DiscoverySource::Kubernetes { kubeconfig } => {
            let client = discovery::kube::client(kubeconfig.as_deref()).await?;
            kube_client = Some(client.clone());
            discovery::watch_kubernetes(
                client,
                cfg.trust_domain.clone(),
                cfg.node_name.clone(),
                rules,
                std::time::Duration::from_millis(100),
            )
            .await?
        }
    };
    let (crl_file, revocation, crl_lists) = match &cfg.crl_path {
        None => (None, Revocation::default(), 0),
        Some(path) => {
            let (file, crls) = CrlFile::open(path)?;
            let n = crls.len();
            (Some(file), Revocation::new(crls), n)
        }
    };
    let certs = CertManager::new(signer(cfg)?, cfg.cert_lifetime, revocation.clone());

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    disc.register(&mut registry);
    certs.register(&mut registry);
    metrics.crl_lists.set(crl_lists as i64);
    let connect = ConnectOptions {
        mark: Some(crate::hbone::consts::SOCKET_MARK),
        timeout: cfg.connect_timeout,
    };
    let pool = Pool::new(
        PoolSettings {
            max_streams: cfg.pool_max_streams as usize,
            idle_timeout: cfg.pool_idle_timeout,
            spare_idle_timeout: crate::hbone::pool::SPARE_IDLE_TIMEOUT,
            connect,
            quic: QuicSettings {
                destinations: cfg.quic_destinations.clone(),
            },
            sockets: crate::net::sockets::Kernel::shared(),
        },
        metrics.clone(),
    );
    let (draining, draining_rx) = watch::channel(false);
    let pi = ProxyInputs::new(
        cfg.node_name.clone(),
        cfg.trust_domain.clone(),
        &cfg.cluster_id,
        &cfg.cluster_domain,
        disc.clone(),
        certs.clone(),
        pool.clone(),
        metrics,
        connect,
        cfg.pool_max_streams,
        cfg.tunnel,
        cfg.quic_listen,
        draining_rx.clone(),
    );
    let admin_l = bind("admin", cfg.admin_addr)?;
    let metrics_l = bind("metrics", cfg.metrics_addr)?;
    let ready_l = bind("readiness", cfg.readiness_addr)?;

    let (ready_tx, ready_rx) = watch::channel(false);
    let token = crate::admin::write_token(&cfg.state_dir).map_err(|source| StartError::State {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let admin_state = Arc::new(AdminState {
        node: pi.node.clone(),
        discovery: disc.clone(),
        certs: certs.clone(),
        pool,
        connections: pi.connections.clone(),
        registry,
        metrics: pi.metrics.clone(),
        ready: ready_rx,
        set_log_level,
        token,
    });
    let mut tasks = vec![("discovery", watcher)];
    let mut pods = None;
    match cfg.capture {
        CaptureMode::Node => {
            let listeners = Listeners {
                outbound: bind("outbound", cfg.outbound_addr)?,
                inbound: bind("inbound", cfg.inbound_addr)?,
                inbound_plaintext: bind("inbound plaintext", cfg.inbound_plaintext_addr)?,
                quic: if cfg.quic_listen {
                    Some(
                        QuicListener::bind(None, cfg.inbound_addr).map_err(|source| {
                            StartError::Listen {
                                what: "inbound QUIC",
                                addr: cfg.inbound_addr,
                                source,
                            }
                        })?,
                    )
                } else {
                    None
                },
            };
            tasks.push((
                "proxies",
                tokio::spawn(proxy::serve(pi.clone(), Scope::Node, listeners)),
            ));
        }
        CaptureMode::InPod => {
            let state_err = |source| StartError::State {
                path: cfg.state_dir.clone(),
                source,
            };
            let store = Store::open(&cfg.state_dir).map_err(state_err)?;
            if cfg.quic_listen || !cfg.quic_destinations.is_empty() {
                match store.quic_reset_secret() {
                    Ok(secret) => crate::hbone::quic::use_reset_secret(&secret),
                    Err(e) => {
                        tracing::warn!(error = %e, "no QUIC reset secret; peers of a replaced daemon's QUIC connections learn it is gone only at their idle timeout")
                    }
                }
            }
            if let Err(e) = tokio::task::spawn_blocking(rules::install_node)
                .await
                .expect("node rules task")
            {
                tracing::warn!(error = %e, "cannot install the node's probe rules; kubelet probes to enrolled pods will be captured");
            }
            let annotator: Arc<dyn Annotator> = match &kube_client {
                Some(client) => KubeAnnotator::start(client.clone(), pi.metrics.clone()),
                None => Arc::new(NoAnnotator),
            };
            let p = Pods::new(
                pi.clone(),
                store,
                ready_rx_for_pods(&admin_state),
                annotator,
            )
            .map_err(StartError::Registry)?;
            let recovered = p.recover().await;
            tracing::info!(recovered, "enrolled pods recovered from the node's records");
            let sock = enrollment::bind(&p).map_err(state_err)?;
            tasks.push((
                "enrollment socket",
                tokio::spawn(enrollment::serve(sock, p.clone())),
            ));
            tasks.push((
                "enrollment snapshot",
                tokio::spawn(publish_namespaces(
                    disc.clone(),
                    cfg.enrolled_namespaces_file.clone(),
                )),
            ));
            // Enrolls and releases running pods as namespace and pod labels change.
            tasks.push((
                "reconciler",
                tokio::spawn(
                    crate::capture::reconcile::Reconciler::new(
                        p.clone(),
                        disc.clone(),
                        cfg.node_name.clone(),
                        cfg.host_proc.clone(),
                        pi.metrics.clone(),
                    )
                    .run(),
                ),
            ));
            pods = Some(p);
        }
    }
    for (l, e) in [
        (admin_l, Endpoint::Admin),
        (metrics_l, Endpoint::Metrics),
        (ready_l, Endpoint::Readiness),
    ] {
        tasks.push((
            "admin server",
            tokio::spawn(admin::serve(
                l,
                e,
                admin_state.clone(),
                std::future::pending(),
            )),
        ));
    }
    tasks.push((
        "memory trim",
        tokio::spawn(crate::alloc::trim_periodically()),
    ));
    tasks.push((
        "policy re-evaluation",
        tokio::spawn(reevaluate_on_change(disc.clone(), pi.clone())),
    ));
    if let Some(file) = crl_file {
        tasks.push((
            "revocation lists",
            tokio::spawn(reload_crls(file, revocation, pi.clone())),
        ));
    }
    tasks.push((
        "certificate gauges",
        tokio::spawn(report_certificates(certs.clone(), pi.clone())),
    ));
    tasks.push((
        "certificates",
        tokio::spawn(keep_certificates(
            disc,
            certs,
            cfg.node_name.clone(),
            cfg.trust_domain.clone(),
            pi.metrics.clone(),
            ready_tx,
            pods.clone(),
        )),
    ));
    Ok(Daemon {
        proxy: pi,
        pods,
        draining,
        drain_grace: cfg.drain_grace,
        tasks,
    })
}

impl Daemon {
    /// Resolves when one of the daemon's long-lived tasks has ended before the daemon drains
    /// (it panicked, or failed for good), with what ended: the daemon must not run on
    /// without it (a restart recovers every enrolled pod, whose rules stay meanwhile).
    pub async fn until_a_task_ends(&mut self) -> String {
        crate::task::first_ended(&mut self.tasks).await
    }

    /// Stops accepting, lets established connections run for the grace period (or until none
    /// is left), then stops every task.
    pub async fn drain(self) {
        let _ = self.draining.send(true);
        let live = self.proxy.connections.len();
        tracing::info!(live, grace = ?self.drain_grace, "draining");
        let deadline = tokio::time::Instant::now() + self.drain_grace;
        // Wait for every handler, including those accepted a moment before the listeners
        // closed that have not yet registered their connection.
        loop {
            let changed = self.proxy.connections.changed();
            if self.proxy.connections.is_empty() && self.proxy.inflight() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        for (_, t) in &self.tasks {
            t.abort();
        }
        tracing::info!(left = self.proxy.connections.len(), "drained");
    }
}

/// Keeps the certificate gauges current (count, and each one's expiry).
async fn report_certificates(certs: Arc<CertManager>, pi: Arc<ProxyInputs>) {
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        let held = certs.certs();
        pi.metrics.certificates.set(held.len() as i64);
        let mut now = HashSet::new();
        for c in &held {
            let id = c.identity.to_string();
            let expiry = c
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            pi.metrics
                .certificate_expiry
                .get_or_create(&crate::metrics::IdentityLabels {
                    identity: id.clone(),
                })
                .set(expiry);
            now.insert(id);
        }
        for gone in reported.difference(&now) {
            pi.metrics
                .certificate_expiry
                .remove(&crate::metrics::IdentityLabels {
                    identity: gone.clone(),
                });
        }
        reported = now;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// On every discovery change, judges established inbound connections again and closes those
/// the new policies deny.
async fn reevaluate_on_change(mut disc: Discovery, pi: Arc<ProxyInputs>) {
    while disc.changed().await.is_ok() {
        let state = disc.current();
        let closed = pi.connections.reevaluate(&state);
        if closed > 0 {
            tracing::info!(
                closed,
                "policy change: established connections now denied are closed"
            );
        }
    }
}

/// How often the revocation file is read again.
const CRL_POLL: Duration = Duration::from_secs(2);

/// Reads the revocation file every [`CRL_POLL`]; when it changed and parses, puts its lists in
/// force (new handshakes are checked against them, and the tunnel connections they revoke
/// close on their own) and closes the proxied connections whose peer they revoke. A file
/// that cannot be read or parsed is counted and logged, and the lists in force are kept.
async fn reload_crls(mut file: CrlFile, revocation: Revocation, pi: Arc<ProxyInputs>) {
    loop {
        tokio::time::sleep(CRL_POLL).await;
        match file.reread().await {
            Ok(None) => {}
            Ok(Some(crls)) => {
                let lists = crls.len();
                revocation.replace(crls);
                pi.metrics.crl_lists.set(lists as i64);
                let closed = pi.connections.revoke();
                tracing::info!(path = %file.path().display(), lists, closed, "revocation lists reloaded");
            }
            Err(e) => {
                pi.metrics.crl_refused.inc();
                tracing::warn!(error = %e, "revocation file refused; the lists in force are kept");
            }
        }
    }
}

fn ready_rx_for_pods(admin: &AdminState) -> watch::Receiver<bool> {
    admin.ready.clone()
}

/// Keeps the enrollment snapshot, which the CNI plugin reads when the daemon is down, in step
/// with discovery: written (and synced to disk) when it differs from the one last written, not
/// at every change of the cluster. A write that fails (the file is then removed: the plugin
/// fails closed) is tried again every [`SNAPSHOT_RETRY`] until it succeeds.
async fn publish_namespaces(mut disc: Discovery, file: std::path::PathBuf) {
    let mut failing = false;
    let mut written = None;
    loop {
        let snapshot = disc.current().enrollment_snapshot();
        let saved = match written.as_ref() == Some(&snapshot) {
            true => Ok(()),
            false => crate::capture::store::save_snapshot(&file, &snapshot),
        };
        written = saved.is_ok().then_some(snapshot);
        match saved {
            Ok(()) if failing => {
                tracing::info!(file = %file.display(), "enrollment snapshot written again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(file = %file.display(), error = %e, "cannot write the enrollment snapshot; removed, so that the CNI plugin fails every pod it does not exclude while the daemon is down; trying again");
                }
                failing = true;
            }
        }
        let retry = async {
            match failing {
                true => tokio::time::sleep(SNAPSHOT_RETRY).await,
                false => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = disc.changed() => if changed.is_err() { return },
            () = retry => {}
        }
    }
}

/// How often readiness looks at the certificates of this node's workloads when nothing else
/// changes.
const CERTIFICATES_RECHECK: Duration = Duration::from_secs(10);

/// How often a failed write of the enrollment snapshot is tried again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(5);

/// How fetching one workload's certificate went, as readiness sees it.
#[derive(Debug)]
enum Fetched {
    Loaded,
    /// The CA answered and refused: this workload's matter.
    Refused(String),
    /// No answer (the CA unreachable), or one that makes no sense: the node's matter.
    Failed(String),
}

impl Fetched {
    fn of<T>(r: &Result<T, crate::identity::Error>) -> Fetched {
        match r {
            Ok(_) => Fetched::Loaded,
            Err(crate::identity::Error::Sign(e @ SignError::Refused { .. })) => {
                Fetched::Refused(e.to_string())
            }
            Err(e) => Fetched::Failed(e.to_string()),
        }
    }
}

/// Whether the daemon is ready once its workloads' certificates have been asked for: not
/// while the CA cannot be reached; whatever it refused for some workloads.
fn ready_after(outcomes: &[Fetched]) -> bool {
    !outcomes.iter().any(|o| matches!(o, Fetched::Failed(_)))
}

/// Fetches certificates of this node's workloads on every discovery change, forgets those of
/// workloads that left, and reports readiness once the CA has answered for all of them.
///
/// A certificate the CA refuses (it does not yet see the pod on this node, say) is that one
/// identity's problem: logged, counted in `ztunnel_certificate_refusals_total{identity}`,
/// shown on its pods' annotation ([`crate::capture::annotate`]) until it is issued, retried,
/// and its pods' connections are refused meanwhile; it never turns the node's daemon
/// NotReady. Only a CA that cannot be reached (or answers nonsense) does, for every workload.
async fn keep_certificates(
    mut disc: Discovery,
    certs: Arc<CertManager>,
    node: String,
    trust_domain: String,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    pods: Option<Arc<Pods>>,
) {
    // The pods whose annotation shows a refused certificate, and why.
    let mut shown: HashMap<PodRef, String> = HashMap::new();
    // The CA's refusals of each identity counted so far.
    let mut counted: HashMap<Identity, u64> = HashMap::new();
    loop {
        let state = disc.current();
        // Only workloads in the mesh need certificates.
        let wanted: HashSet<Identity> = state
            .local_workloads(&node)
            .filter(|w| state.enrolled(w))
            .map(|w| w.identity(&trust_domain))
            .collect();
        // Those of no workload of this node go, also one a connection asked for as its
        // workload was leaving the node. (In node capture, the proxies serve every local
        // workload, and an enrolled pod is served before discovery has its IP: theirs are
        // kept while they are here.)
        let local: HashSet<Identity> = state
            .local_workloads(&node)
            .chain(state.pending().iter().filter(|w| *w.node == *node))
            .map(|w| w.identity(&trust_domain))
            .collect();
        drop(state);
        for id in certs.identities() {
            if !local.contains(&id) {
                certs.forget(&id);
            }
        }
        counted.retain(|id, _| wanted.contains(id));
        let mut outcomes = Vec::with_capacity(wanted.len());
        let mut refused: HashMap<Identity, String> = HashMap::new();
        for id in &wanted {
            let outcome = Fetched::of(&certs.fetch(id).await);
            match &outcome {
                Fetched::Loaded => {}
                Fetched::Refused(e) => {
                    refused.insert(id.clone(), e.clone());
                    // Counted (and logged) once per refusal by the CA, not once per pass.
                    let now = certs.refusals(id);
                    let before = counted.insert(id.clone(), now).unwrap_or(0);
                    if now > before {
                        tracing::warn!(identity = %id, error = %e, "the CA refused a certificate; this workload's connections are refused until it signs");
                        metrics
                            .certificate_refusals
                            .get_or_create(&IdentityLabels {
                                identity: id.to_string(),
                            })
                            .inc_by(now - before);
                    }
                }
                Fetched::Failed(e) => {
                    tracing::warn!(identity = %id, error = %e, "cannot get a certificate");
                }
            }
            outcomes.push(outcome);
        }
        if let Some(pods) = &pods {
            let state = disc.current();
            let now = refused_pods(&state, &node, &trust_domain, &refused);
            drop(state);
            for (pod, why) in &now {
                if shown.get(pod) != Some(why) {
                    pods.certificate(pod, Some(why.clone()));
                }
            }
            for pod in shown.keys().filter(|p| !now.contains_key(*p)) {
                pods.certificate(pod, None);
            }
            shown = now;
        }
        let _ = ready.send(ready_after(&outcomes));
        // Looked at again when discovery changes; also soon after a failure, and now and then
        // when all are loaded, so that a certificate that expires without renewal (the CA
        // down) turns readiness off.
        let again = match outcomes.iter().all(|o| matches!(o, Fetched::Loaded)) {
            true => CERTIFICATES_RECHECK,
            false => Duration::from_secs(2),
        };
        if let Ok(Err(_)) = tokio::time::timeout(again, disc.changed()).await {
            return;
        }
    }
}

/// The enrolled pods of this node whose identity the CA refuses, with why.
fn refused_pods(
    state: &crate::discovery::State,
    node: &str,
    trust_domain: &str,
    refused: &HashMap<Identity, String>,
) -> HashMap<PodRef, String> {
    if refused.is_empty() {
        return HashMap::new();
    }
    state
        .local_workloads(node)
        .filter(|w| state.enrolled(w))
        .filter_map(|w| {
            let why = refused.get(&w.identity(trust_domain))?;
            let pod = PodRef {
                namespace: w.namespace.to_string(),
                name: w.name.to_string(),
                uid: w.uid.to_string(),
            };
            Some((pod, why.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pods whose annotation shows a refused certificate: this node's enrolled pods of a
    /// refused identity, no other.
    #[test]
    fn a_refused_identity_shows_on_this_nodes_enrolled_pods_of_it() {
        let mesh = "
namespaces:
  - {name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}
  - {name: plain, labels: {}}
workloads:
  - {uid: u1, name: web-1, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.1]}
  - {uid: u2, name: web-2, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.2]}
  - {uid: u3, name: web-3, namespace: demo, serviceAccount: web, node: n2, ips: [10.0.0.3]}
  - {uid: u4, name: db-1, namespace: demo, serviceAccount: db, node: n1, ips: [10.0.0.4]}
  - {uid: u5, name: web-1, namespace: plain, serviceAccount: web, node: n1, ips: [10.0.0.5]}
";
        let state = crate::discovery::parse(mesh, "cluster.local").unwrap();
        let web: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let refused = HashMap::from([(web, "403 no active pod".to_string())]);
        let got = refused_pods(&state, "n1", "cluster.local", &refused);
        let mut names: Vec<(String, String, &str)> = got
            .iter()
            .map(|(p, why)| (p.name.clone(), p.uid.clone(), why.as_str()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("web-1".into(), "u1".into(), "403 no active pod"),
                ("web-2".into(), "u2".into(), "403 no active pod")
            ]
        );
        assert!(refused_pods(&state, "n1", "cluster.local", &HashMap::new()).is_empty());
    }

    /// Only this node's workloads keep certificates: one a connection asked for as its
    /// workload left (or any other) is forgotten, not renewed for ever.
    #[tokio::test]
    async fn certificates_are_kept_for_this_nodes_workloads_only() {
        let mesh = "
namespaces:
  - {name: demo, labels: {ztunnel.dev/dataplane-mode: ambient}}
  - {name: plain}
workloads:
  - {uid: u1, name: web-1, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.1]}
  - {uid: u2, name: old, namespace: plain, serviceAccount: old, node: n1, ips: [10.0.0.2]}
";
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "cluster.local").unwrap();
        let day = Duration::from_secs(86400);
        let certs = CertManager::new(Arc::new(ca), day, Revocation::default());
        let left: Identity = "spiffe://cluster.local/ns/demo/sa/left".parse().unwrap();
        certs.fetch(&left).await.unwrap();
        // A local workload outside the mesh (node capture serves it too) keeps its own.
        let old: Identity = "spiffe://cluster.local/ns/plain/sa/old".parse().unwrap();
        certs.fetch(&old).await.unwrap();
        // So does a pod enrolled before discovery has its IP, served by its uid.
        let fresh: Identity = "spiffe://cluster.local/ns/demo/sa/fresh".parse().unwrap();
        certs.fetch(&fresh).await.unwrap();
        let pending = crate::discovery::Workload {
            uid: "u3".into(),
            name: "fresh-0".into(),
            namespace: "demo".into(),
            service_account: "fresh".into(),
            node: "n1".into(),
            ips: Vec::new().into(),
            labels: Default::default(),
            protocol: crate::discovery::Protocol::Hbone,
            other_mesh: None,
            telemetry: Default::default(),
            locality: Default::default(),
        };
        let state = crate::discovery::parse(mesh, "cluster.local").unwrap();
        let disc = Discovery::fixed(state.with_pending(vec![pending]));
        let (ready, _) = watch::channel(false);
        let metrics = Arc::new(Metrics::default());
        let keeper = tokio::spawn(keep_certificates(
            disc,
            certs.clone(),
            "n1".into(),
            "cluster.local".into(),
            metrics,
            ready,
            None,
        ));
        let web: Identity = "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let kept = async {
            let mut want = vec![old.clone(), web.clone(), fresh.clone()];
            want.sort();
            loop {
                let mut kept = certs.identities();
                kept.sort();
                if kept == want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let within = tokio::time::timeout(Duration::from_secs(10), kept).await;
        keeper.abort();
        within.unwrap_or_else(|_| panic!("kept: {:?}", certs.identities()));
    }

    /// Waits up to 10 s for `f`.
    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The enrollment snapshot is written again when the enrolled namespaces change, not when
    /// anything else does.
    #[tokio::test]
    async fn the_enrollment_snapshot_is_written_only_when_it_changes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mesh = dir.path().join("mesh.yaml");
        let snap = dir.path().join("enrolled.json");
        let yaml = |ns_label: &str, pods: usize| {
            let mut y = format!(
                "namespaces:\n  - {{name: demo, labels: {{ztunnel.dev/dataplane-mode: ambient}}}}\n  - {{name: other, labels: {{{ns_label}}}}}\nworkloads:\n"
            );
            for i in 0..pods {
                y += &format!("  - {{uid: u{i}, name: p{i}, namespace: demo, serviceAccount: web, node: n1, ips: [10.0.0.{}]}}\n", i + 1);
            }
            y
        };
        std::fs::write(&mesh, yaml("", 1)).unwrap();
        let (disc, _watch) = discovery::watch_file(
            mesh.clone(),
            "cluster.local".into(),
            Some("n1".into()),
            Default::default(),
            Duration::from_millis(10),
        )
        .unwrap();
        let publisher = tokio::spawn(publish_namespaces(disc.clone(), snap.clone()));
        until("first snapshot", || snap.exists()).await;
        let inode = std::fs::metadata(&snap).unwrap().ino();
        // A new pod: the namespaces are as they were.
        std::fs::write(&mesh, yaml("", 2)).unwrap();
        until("the new pod seen", || disc.current().workloads().len() == 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(std::fs::metadata(&snap).unwrap().ino(), inode, "rewritten");
        // Another namespace enrolled.
        std::fs::write(&mesh, yaml("ztunnel.dev/dataplane-mode: ambient", 2)).unwrap();
        until("the namespace in the snapshot", || {
            std::fs::read_to_string(&snap)
                .unwrap_or_default()
                .contains("other")
        })
        .await;
        assert_ne!(std::fs::metadata(&snap).unwrap().ino(), inode);
        publisher.abort();
    }

    #[test]
    fn one_refused_identity_leaves_the_daemon_ready_an_unreachable_ca_does_not() {
        let refused = || {
            Fetched::of::<()>(&Err(crate::identity::Error::Sign(SignError::Refused {
                status: 403,
                message: "no active pod".into(),
            })))
        };
        let unreachable = || {
            Fetched::of::<()>(&Err(crate::identity::Error::Sign(SignError::Transport(
                "connection refused".into(),
            ))))
        };
        let loaded = || Fetched::of(&Ok::<(), crate::identity::Error>(()));
        for (outcomes, want) in [
            (vec![], true),
            (vec![loaded()], true),
            (vec![loaded(), refused()], true),
            (vec![refused()], true),
            (vec![loaded(), unreachable()], false),
            (vec![refused(), unreachable()], false),
            (
                vec![Fetched::of::<()>(&Err(crate::identity::Error::NoRoots))],
                false,
            ),
        ] {
            assert_eq!(ready_after(&outcomes), want, "{outcomes:?}");
        }
    }
}
