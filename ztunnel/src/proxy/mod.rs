//! The proxies: outbound capture (15001), inbound tunnel (15008) and inbound plaintext (15006).
//!
//! Each listener accepts connections and hands each one to its handler in its own task. A
//! listener serves the workloads of this node: the source of an outbound connection is the
//! local workload that owns the peer address; the destination of an inbound one is the local
//! workload that owns the local address. Decisions (the outbound [`plan`], the CONNECT
//! validation in [`crate::hbone::server`]) are pure functions; the handlers do the I/O.
//! On drain, listeners stop accepting and tunnel connections send GOAWAY; established
//! connections run on until they end or the daemon's grace period is over.

pub mod conns;
mod inbound;
mod inbound_plain;
mod outbound;
pub mod plan;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::discovery::{Discovery, State, Workload};
use crate::hbone::pool::Pool;
use crate::identity::{CertManager, Identity};
use crate::metrics::Metrics;
use crate::net::ConnectOptions;
use conns::ConnTable;

/// Everything the proxies share.
pub struct ProxyInputs {
    pub node: String,
    pub trust_domain: String,
    pub discovery: Discovery,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<ConnTable>,
    /// How the daemon connects to peers and applications (mark, timeout).
    pub connect: ConnectOptions,
    /// Streams the inbound tunnel server accepts per connection.
    pub max_streams: u32,
    /// Becomes `true` when the daemon drains.
    pub draining: watch::Receiver<bool>,
    round_robin: AtomicUsize,
}

impl ProxyInputs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        trust_domain: String,
        discovery: Discovery,
        certs: Arc<CertManager>,
        pool: Pool,
        metrics: Arc<Metrics>,
        connect: ConnectOptions,
        max_streams: u32,
        draining: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(ProxyInputs {
            node,
            trust_domain,
            discovery,
            certs,
            pool,
            metrics,
            connections: Arc::default(),
            connect,
            max_streams,
            draining,
            round_robin: AtomicUsize::new(0),
        })
    }

    /// The local workload (on this node) that owns `addr`.
    fn local_workload(&self, state: &State, addr: SocketAddr) -> Option<Arc<Workload>> {
        state
            .workload_by_ip(addr.ip().to_canonical())
            .filter(|w| &*w.node == self.node.as_str())
            .cloned()
    }

    fn identity_of(&self, w: &Workload) -> Identity {
        w.identity(&self.trust_domain)
    }

    /// Round-robin choice among `n` endpoints.
    fn pick(&self, n: usize) -> usize {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % n.max(1)
    }

    /// Resolves when the daemon starts draining.
    async fn drained(&self) {
        let mut rx = self.draining.clone();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// The three listeners of a proxy instance.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound: TcpListener,
    pub inbound_plaintext: TcpListener,
}

/// Runs the accept loops until the daemon drains.
pub async fn serve(pi: Arc<ProxyInputs>, l: Listeners) {
    tokio::join!(
        accept_loop(pi.clone(), l.outbound, "outbound", outbound::handle),
        accept_loop(pi.clone(), l.inbound, "inbound", inbound::handle),
        accept_loop(
            pi.clone(),
            l.inbound_plaintext,
            "inbound_plaintext",
            inbound_plain::handle
        ),
    );
}

/// Runs only the inbound tunnel listener (benchmarks, and nodes that only receive).
pub async fn serve_inbound(pi: Arc<ProxyInputs>, listener: TcpListener) {
    accept_loop(pi, listener, "inbound", inbound::handle).await
}

async fn accept_loop<F, Fut>(
    pi: Arc<ProxyInputs>,
    listener: TcpListener,
    name: &'static str,
    handle: F,
) where
    F: Fn(Arc<ProxyInputs>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(handle(pi.clone(), tcp, peer));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = pi.drained() => {
                tracing::info!(listener = name, "stopped accepting (draining)");
                return;
            }
        }
    }
}

/// Closes `tcp` with a reset, so the application sees a refusal rather than a clean end.
fn reset(tcp: TcpStream) {
    let _ = SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}
