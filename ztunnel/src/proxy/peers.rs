//! What authenticated tunnel peers may hold on this node: connections and streams, per source
//! address and per peer identity.
//!
//! A peer that policy allows is trusted to reach its destinations, not to take the node's
//! descriptors, tasks and memory. Each inbound tunnel connection (either transport), once its
//! handshakes have said who the peer is, takes a [`PeerConn`]; each stream on it then a
//! [`PeerStream`]. Both count against the peer's source address (IPv4-mapped IPv6 counts as
//! IPv4) and its identity until dropped. Over a cap, the connection is closed before it carries
//! any stream (`inbound_peer_connection_limit`) and the stream is answered `429` before policy
//! or the application sees it (`inbound_peer_stream_limit`); both are counted and logged
//! (throttled). The caps are on what is held now, not on a rate: a peer whose connections end
//! gets its places back. What streams hold in memory is bounded node-wide by the buffered-bytes
//! budget ([`crate::hbone::budget`]). The decision is the pure [`Count::over`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::identity::Identity;
use crate::refusal::Reason;

/// The caps; [`Default`] is the daemon's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLimits {
    pub connections_per_address: usize,
    pub connections_per_identity: usize,
    pub streams_per_address: usize,
    pub streams_per_identity: usize,
}

impl Default for PeerLimits {
    /// A pod's pool keeps one connection per destination pod for each 100 streams: 256
    /// connections and 16 384 streams from one address carry a client far busier than most,
    /// and an identity (every pod of a workload) gets four times as much.
    fn default() -> Self {
        PeerLimits {
            connections_per_address: 256,
            connections_per_identity: 1024,
            streams_per_address: 16_384,
            streams_per_identity: 65_536,
        }
    }
}

/// Which cap a newcomer would exceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Over {
    #[error("its source address holds {0} tunnel connections, the most allowed")]
    ConnectionsPerAddress(usize),
    #[error("its identity holds {0} tunnel connections, the most allowed")]
    ConnectionsPerIdentity(usize),
    #[error("its source address holds {0} tunnel streams, the most allowed")]
    StreamsPerAddress(usize),
    #[error("its identity holds {0} tunnel streams, the most allowed")]
    StreamsPerIdentity(usize),
}

impl Over {
    /// The refusal's metric label.
    pub fn reason(self) -> Reason {
        match self {
            Over::ConnectionsPerAddress(_) | Over::ConnectionsPerIdentity(_) => {
                Reason::InboundPeerConnectionLimit
            }
            Over::StreamsPerAddress(_) | Over::StreamsPerIdentity(_) => {
                Reason::InboundPeerStreamLimit
            }
        }
    }
}

/// What one address or identity holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub connections: usize,
    pub streams: usize,
}

/// A connection or a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Connection,
    Stream,
}

impl Count {
    /// Whether one more of `kind`, from an address holding `addr` and an identity holding
    /// `id`, exceeds `limits`; the first cap exceeded.
    pub fn over(addr: Count, id: Count, kind: Kind, limits: &PeerLimits) -> Option<Over> {
        match kind {
            Kind::Connection if addr.connections >= limits.connections_per_address => {
                Some(Over::ConnectionsPerAddress(addr.connections))
            }
            Kind::Connection if id.connections >= limits.connections_per_identity => {
                Some(Over::ConnectionsPerIdentity(id.connections))
            }
            Kind::Stream if addr.streams >= limits.streams_per_address => {
                Some(Over::StreamsPerAddress(addr.streams))
            }
            Kind::Stream if id.streams >= limits.streams_per_identity => {
                Some(Over::StreamsPerIdentity(id.streams))
            }
            _ => None,
        }
    }

    fn get(&mut self, kind: Kind) -> &mut usize {
        match kind {
            Kind::Connection => &mut self.connections,
            Kind::Stream => &mut self.streams,
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    by_addr: HashMap<IpAddr, Count>,
    by_identity: HashMap<Identity, Count>,
}

/// The node's table of what authenticated peers hold.
#[derive(Debug)]
pub struct Peers {
    limits: PeerLimits,
    held: Mutex<Held>,
}

/// One peer (address and identity) in the table.
#[derive(Debug)]
struct Key {
    peers: Arc<Peers>,
    addr: IpAddr,
    identity: Identity,
}

/// A connection's place; given back on drop.
#[derive(Debug)]
pub struct PeerConn(Arc<Key>);

/// A stream's place; given back on drop.
#[derive(Debug)]
pub struct PeerStream(Arc<Key>);

impl Peers {
    pub fn new(limits: PeerLimits) -> Arc<Self> {
        Arc::new(Peers {
            limits,
            held: Mutex::default(),
        })
    }

    /// A connection from `addr` authenticated as `identity`, if its caps allow it.
    pub fn connect(self: &Arc<Self>, addr: IpAddr, identity: &Identity) -> Result<PeerConn, Over> {
        let key = Arc::new(Key {
            peers: self.clone(),
            addr: addr.to_canonical(),
            identity: identity.clone(),
        });
        self.take(&key, Kind::Connection)?;
        Ok(PeerConn(key))
    }

    /// What `addr` and `identity` hold now.
    pub fn held(&self, addr: IpAddr, identity: &Identity) -> (Count, Count) {
        let held = self.held.lock();
        (
            held.by_addr
                .get(&addr.to_canonical())
                .copied()
                .unwrap_or_default(),
            held.by_identity.get(identity).copied().unwrap_or_default(),
        )
    }

    fn take(&self, key: &Key, kind: Kind) -> Result<(), Over> {
        let mut held = self.held.lock();
        let addr = held.by_addr.get(&key.addr).copied().unwrap_or_default();
        let id = held
            .by_identity
            .get(&key.identity)
            .copied()
            .unwrap_or_default();
        if let Some(over) = Count::over(addr, id, kind, &self.limits) {
            return Err(over);
        }
        *held.by_addr.entry(key.addr).or_default().get(kind) += 1;
        *held
            .by_identity
            .entry(key.identity.clone())
            .or_default()
            .get(kind) += 1;
        Ok(())
    }

    fn give(&self, key: &Key, kind: Kind) {
        let mut held = self.held.lock();
        if let Some(c) = held.by_addr.get_mut(&key.addr) {
            *c.get(kind) -= 1;
            if *c == Count::default() {
                held.by_addr.remove(&key.addr);
            }
        }
        if let Some(c) = held.by_identity.get_mut(&key.identity) {
            *c.get(kind) -= 1;
            if *c == Count::default() {
                held.by_identity.remove(&key.identity);
            }
        }
    }
}

impl PeerConn {
    /// A stream on this connection, if the peer's caps allow it.
    pub fn stream(&self) -> Result<PeerStream, Over> {
        self.0.peers.take(&self.0, Kind::Stream)?;
        Ok(PeerStream(self.0.clone()))
    }
}

impl Drop for PeerConn {
    fn drop(&mut self) {
        self.0.peers.give(&self.0, Kind::Connection);
    }
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        self.0.peers.give(&self.0, Kind::Stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "ns", sa).unwrap()
    }

    #[test]
    fn over_table() {
        let l = PeerLimits {
            connections_per_address: 2,
            connections_per_identity: 3,
            streams_per_address: 4,
            streams_per_identity: 5,
        };
        let c = |connections, streams| Count {
            connections,
            streams,
        };
        use Kind::*;
        let cases = [
            (c(1, 0), c(1, 0), Connection, None),
            (
                c(2, 0),
                c(2, 0),
                Connection,
                Some(Over::ConnectionsPerAddress(2)),
            ),
            (
                c(1, 0),
                c(3, 0),
                Connection,
                Some(Over::ConnectionsPerIdentity(3)),
            ),
            (c(1, 9), c(1, 9), Connection, None),
            (c(9, 3), c(9, 3), Stream, None),
            (c(0, 4), c(0, 4), Stream, Some(Over::StreamsPerAddress(4))),
            (c(0, 1), c(0, 5), Stream, Some(Over::StreamsPerIdentity(5))),
        ];
        for (addr, ident, kind, want) in cases {
            assert_eq!(
                Count::over(addr, ident, kind, &l),
                want,
                "{addr:?} {ident:?} {kind:?}"
            );
        }
    }

    #[test]
    fn places_are_held_per_address_and_identity_and_given_back_on_drop() {
        let peers = Peers::new(PeerLimits {
            connections_per_address: 2,
            connections_per_identity: 3,
            streams_per_address: 2,
            streams_per_identity: 3,
        });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let c1 = peers.connect(a, &id("x")).unwrap();
        let c2 = peers.connect(mapped, &id("x")).unwrap();
        assert_eq!(
            peers.connect(a, &id("y")).unwrap_err(),
            Over::ConnectionsPerAddress(2),
            "a mapped address is its IPv4 address"
        );
        let c3 = peers.connect(b, &id("x")).unwrap();
        assert_eq!(
            peers.connect(b, &id("x")).unwrap_err(),
            Over::ConnectionsPerIdentity(3)
        );
        let other = peers
            .connect(b, &id("y"))
            .expect("another identity has its own places");

        let s1 = c1.stream().unwrap();
        let s2 = c2.stream().unwrap();
        assert_eq!(c1.stream().unwrap_err(), Over::StreamsPerAddress(2));
        let s3 = c3.stream().unwrap();
        assert_eq!(c3.stream().unwrap_err(), Over::StreamsPerIdentity(3));
        let _s4 = other.stream().unwrap();
        assert_eq!(
            peers.held(a, &id("x")),
            (
                Count {
                    connections: 2,
                    streams: 2
                },
                Count {
                    connections: 3,
                    streams: 3
                }
            )
        );
        drop((s1, s2, s3));
        let _again = c1.stream().expect("streams given back");
        drop(c2);
        let _c4 = peers.connect(a, &id("x")).expect("a connection given back");
        drop((c1, c3, _again, _c4));
        assert_eq!(
            peers.held(a, &id("x")),
            (Count::default(), Count::default())
        );
        assert_eq!(peers.held.lock().by_addr.len(), 1, "only b's is left");
    }
}
