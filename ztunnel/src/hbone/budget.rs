//! The node's budget of buffered bytes: what tunnel streams hold, received from a peer but not
//! yet written to an application that reads slowly or not at all.
//!
//! Flow control bounds what one stream may hold (its window), but a peer that policy allows
//! can open many connections and streams, each to an application that does not read, and have
//! the daemon hold a window's worth for each. The budget bounds the sum over the node, on both
//! transports and in both directions (a stream's bytes from the tunnel to its TCP side).
//!
//! Contract: every byte a copy loop takes from a tunnel stream is counted ([`Holding::take`])
//! until it is written to TCP ([`Holding::give`]) or the stream ends (the [`Holding`] is
//! dropped). Each stream is charged to its source: the address of the pod that opened it (the
//! tunnel peer's address inbound, the client pod's outbound). A stream may always hold
//! [`FLOOR`] bytes, as long as the floors of its source's streams (what each holds up to
//! [`FLOOR`]) stay within the source's share ([`source_cap`], a sixteenth of the limit).
//! Beyond that, a take that would bring the node over its limit is refused ([`OverBudget`]):
//! the copy loop then resets that stream (`buffer_budget`), which frees what it held. So the
//! stream that keeps receiving for an application that does not read is the one given up,
//! never a stream that holds little; one pod's many stalled streams hold no more than its
//! share beyond the limit, however many it opens; and what the node holds stays under the
//! limit plus one share per source. The decision is the pure [`admits`].
//!
//! What a stream's transport holds before the copy loop takes it (bounded by its window) is
//! not counted: the loop takes each chunk as it arrives, whether or not the application is
//! reading ([`super::copy`]), up to a window's worth ([`QUEUE_MAX`]).
//!
//! The other way, what h2 holds unsent for a tunnel peer is counted too, per inbound HTTP/2
//! connection ([`super::outflow`], a holder shared by the connection's streams): there a
//! holder over its floor waits for the peer to read rather than being refused. An inbound
//! QUIC connection's send window, which bounds what quinn keeps unacknowledged, is counted
//! whole while the connection carries an admitted stream ([`Window`],
//! [`super::quic::ServerConn`]), a source's windows within its share of the budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;

/// What a stream may always hold, whatever the node holds.
pub const FLOOR: usize = 64 * 1024;

/// The most a copy loop queues for a TCP side that does not take it: one stream window. More
/// waits in the transport, under its flow control.
pub const QUEUE_MAX: usize = super::consts::STREAM_WINDOW as usize;

/// The default limit (`--max-buffered-bytes`).
pub const DEFAULT_LIMIT: usize = 256 * 1024 * 1024;

/// A take refused: the node would hold more than its limit, and the stream more than
/// [`FLOOR`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the node's buffered-bytes budget ({limit} bytes) is spent; this stream holds {held}")]
pub struct OverBudget {
    pub limit: usize,
    pub held: usize,
}

/// What the floors of one source's streams may add up to: a sixteenth of the node's limit,
/// at least one [`FLOOR`].
pub fn source_cap(limit: usize) -> usize {
    (limit / 16).max(FLOOR)
}

/// Whether a stream holding `mine`, whose source's streams hold `floors` under their floors,
/// may take `n` more bytes while the node holds `node`.
pub fn admits(node: usize, mine: usize, floors: usize, n: usize, limit: usize) -> bool {
    node + n <= limit || (mine + n <= FLOOR && floors + n <= source_cap(limit))
}

/// The node's budget; one per daemon, shared by every copy loop. What the node holds is kept
/// in one gauge, which the daemon exports as is (`ztunnel_buffered_bytes`).
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    held: Gauge,
    /// The sources whose streams hold a place; a source leaves the map with its last stream.
    sources: Mutex<HashMap<IpAddr, Arc<Source>>>,
}

/// One source's streams: what they hold under their floors, and the QUIC send windows its
/// connections were granted.
#[derive(Debug)]
struct Source {
    addr: IpAddr,
    floors: AtomicUsize,
    windows: AtomicUsize,
}

impl BufferBudget {
    /// A budget of `limit` bytes, counted in `held` (a fresh gauge when not exported).
    pub fn new(limit: usize, held: Gauge) -> Self {
        BufferBudget {
            limit,
            held,
            sources: Mutex::default(),
        }
    }

    /// A budget that never refuses (tools and benches that measure something else).
    pub fn unlimited() -> Self {
        Self::new(usize::MAX, Gauge::default())
    }

    /// Bytes held on the node now.
    pub fn held(&self) -> usize {
        self.held.get() as usize
    }

    /// What one stream opened by `source` holds, counted in the budget until dropped.
    pub fn holding(&self, source: IpAddr) -> Holding<'_> {
        Held::new(self, source)
    }

    /// The entry of `source`, made if it has none: every holder of a source shares it.
    fn join(&self, source: IpAddr) -> Arc<Source> {
        let addr = source.to_canonical();
        self.sources
            .lock()
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(Source {
                    addr,
                    floors: AtomicUsize::new(0),
                    windows: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// Lets `source` go; the last of its holders takes its entry out. Under the map's lock,
    /// where every holder of a source is made and let go, so that the count cannot change
    /// meanwhile.
    fn leave(&self, source: Arc<Source>) {
        let mut map = self.sources.lock();
        if Arc::strong_count(&source) == 2 {
            map.remove(&source.addr);
        }
    }

    /// Sources whose streams hold a place in the budget now.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.sources.lock().len()
    }
}

/// What one holder (a stream, or a tunnel connection's unsent bytes) holds of the budget,
/// whichever way it reaches the budget: borrowed ([`Holding`]) or shared (`Arc`).
#[derive(Debug)]
pub struct Held<B: Deref<Target = BufferBudget>> {
    budget: B,
    mine: usize,
    /// Its source (`None` only while it is dropped).
    source: Option<Arc<Source>>,
}

/// What one stream holds of the budget.
pub type Holding<'a> = Held<&'a BufferBudget>;

impl<B: Deref<Target = BufferBudget>> Held<B> {
    /// A holder for `source`, holding nothing yet.
    pub fn new(budget: B, source: IpAddr) -> Self {
        let source = budget.join(source);
        Held {
            budget,
            mine: 0,
            source: Some(source),
        }
    }

    /// Counts `n` more bytes held by this stream, unless the budget refuses them.
    pub fn take(&mut self, n: usize) -> Result<(), OverBudget> {
        let b = &*self.budget;
        if !admits(b.held(), self.mine, self.floors(), n, b.limit) {
            return Err(OverBudget {
                limit: b.limit,
                held: self.mine,
            });
        }
        b.held.inc_by(n as i64);
        self.set_mine(self.mine + n);
        Ok(())
    }

    /// `n` bytes were written on: no longer held.
    pub fn give(&mut self, n: usize) {
        let n = n.min(self.mine);
        self.budget.held.dec_by(n as i64);
        self.set_mine(self.mine - n);
    }

    /// What this stream's source's streams hold under their floors.
    fn floors(&self) -> usize {
        self.source
            .as_ref()
            .map_or(0, |s| s.floors.load(Ordering::Relaxed))
    }

    /// Sets what this stream holds, and its part of its source's floors.
    fn set_mine(&mut self, mine: usize) {
        let (was, now) = (self.mine.min(FLOOR), mine.min(FLOOR));
        if let Some(s) = &self.source {
            if now > was {
                s.floors.fetch_add(now - was, Ordering::Relaxed);
            } else if was > now {
                s.floors.fetch_sub(was - now, Ordering::Relaxed);
            }
        }
        self.mine = mine;
    }

    /// Bytes this stream holds.
    pub fn mine(&self) -> usize {
        self.mine
    }
}

impl<B: Deref<Target = BufferBudget>> Drop for Held<B> {
    fn drop(&mut self) {
        self.budget.held.dec_by(self.mine as i64);
        self.set_mine(0);
        if let Some(s) = self.source.take() {
            self.budget.leave(s);
        }
    }
}

/// Whether a QUIC connection's send window may grow by `n` while the node holds `node` and
/// its source's windows `windows`: only within the node's limit and its source's share.
pub fn admits_window(node: usize, windows: usize, n: usize, limit: usize) -> bool {
    node + n <= limit && windows + n <= source_cap(limit)
}

/// What an inbound QUIC connection's send window holds of the budget
/// ([`super::quic::ServerConn`]): the window it was granted, counted whole (quinn does not
/// say how much of it is in use), so a source's windows together stay within its share
/// ([`admits_window`]) whatever they hold.
#[derive(Debug)]
pub struct Window {
    budget: Arc<BufferBudget>,
    source: Option<Arc<Source>>,
    granted: usize,
}

impl Window {
    /// A window of nothing yet, for a connection from `source`.
    pub fn new(budget: Arc<BufferBudget>, source: IpAddr) -> Self {
        let source = Some(budget.join(source));
        Window {
            budget,
            source,
            granted: 0,
        }
    }

    /// Grows the window to `to` if the budget admits it; returns the window granted.
    pub fn grow_to(&mut self, to: usize) -> usize {
        let Some(s) = &self.source else {
            return self.granted;
        };
        let n = to.saturating_sub(self.granted);
        let (node, limit) = (self.budget.held(), self.budget.limit);
        let taken = n > 0
            && s.windows
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    admits_window(node, w, n, limit).then_some(w + n)
                })
                .is_ok();
        if taken {
            self.budget.held.inc_by(n as i64);
            self.granted = to;
        }
        self.granted
    }

    /// Gives the whole window back.
    pub fn release(&mut self) {
        if let Some(s) = &self.source {
            s.windows.fetch_sub(self.granted, Ordering::Relaxed);
            self.budget.held.dec_by(self.granted as i64);
            self.granted = 0;
        }
    }

    pub fn granted(&self) -> usize {
        self.granted
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.release();
        if let Some(s) = self.source.take() {
            self.budget.leave(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn admits_window_table() {
        const M: usize = 1024 * 1024;
        let limit = 256 * M;
        let share = source_cap(limit);
        // (node, the source's windows, n, admitted)
        let cases = [
            (0, 0, 2 * M, true),
            (limit - 2 * M, 0, 2 * M, true), // reaches the limit exactly
            (limit - 2 * M + 1, 0, 2 * M, false), // over the limit
            (0, share - 2 * M, 2 * M, true), // reaches the source's share exactly
            (0, share - 2 * M + 1, 2 * M, false), // over the share, the node far from full
        ];
        for (node, windows, n, want) in cases {
            assert_eq!(
                admits_window(node, windows, n, limit),
                want,
                "{node} {windows} {n}"
            );
        }
    }

    #[test]
    fn windows_stay_within_their_source_share_and_are_given_back() {
        const M: usize = 1024 * 1024;
        let budget = Arc::new(BufferBudget::new(256 * M, Gauge::default()));
        let share = source_cap(256 * M);
        let mut a: Vec<Window> = (0..10).map(|_| Window::new(budget.clone(), A)).collect();
        let granted: Vec<usize> = a.iter_mut().map(|w| w.grow_to(2 * M)).collect();
        assert_eq!(granted.iter().sum::<usize>(), share, "{granted:?}");
        assert_eq!(budget.held(), share);
        // Another source is not held back by the first's share.
        let mut b = Window::new(budget.clone(), B);
        assert_eq!(b.grow_to(2 * M), 2 * M);
        // Given back: released, or dropped with the connection.
        a[0].release();
        assert_eq!(a[9].grow_to(2 * M), 2 * M, "the freed part of the share");
        drop(a);
        drop(b);
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.sources(), 0);
    }

    #[test]
    fn admits_table() {
        const K: usize = 1024;
        let limit = 1024 * K;
        let cap = source_cap(limit);
        assert_eq!(cap, FLOOR, "a sixteenth of 1 MiB");
        assert_eq!(
            source_cap(256 * limit),
            16 * limit,
            "a sixteenth of 256 MiB"
        );
        // (node, mine, source's floors, n, admitted)
        let cases = [
            (0, 0, 0, 16 * K, true),
            (limit, 0, 0, FLOOR, true), // the floor, even over the limit
            (limit, FLOOR - 1, FLOOR - 1, 1, true), // up to the floor exactly
            (limit, FLOOR, FLOOR, 1, false), // beyond the floor, over the limit
            (limit - 16 * K, FLOOR, FLOOR, 16 * K, true), // reaches the limit exactly
            (limit - 16 * K, FLOOR, FLOOR, 16 * K + 1, false),
            (0, 4 * limit, cap, 1, true), // a stream may hold much while the node is under
            (0, 0, 4 * cap, 1, true),     // and so may its source
            // Over the limit, a stream's floor only within its source's share.
            (limit, 0, cap - 1, 1, true),
            (limit, 0, cap, 1, false),
            (limit, 0, cap - 16 * K, 16 * K + 1, false),
        ];
        for (node, mine, floors, n, want) in cases {
            let got = admits(node, mine, floors, n, limit);
            assert_eq!(got, want, "{node} {mine} {floors} {n}");
        }
    }

    #[test]
    fn a_stream_over_the_floor_is_refused_once_the_node_is_full_and_gives_back_on_drop() {
        let gauge = Gauge::default();
        let budget = BufferBudget::new(4 * FLOOR, gauge.clone());
        let mut big = budget.holding(A);
        big.take(3 * FLOOR).unwrap();
        let mut small = budget.holding(B);
        small.take(FLOOR).unwrap();
        assert_eq!(budget.held(), 4 * FLOOR);
        let over = big.take(1).unwrap_err();
        assert_eq!(over.held, 3 * FLOOR);
        // A stream of another source still gets its floor.
        let mut third = budget.holding(IpAddr::from([10, 0, 0, 3]));
        third.take(FLOOR).unwrap();
        assert_eq!(
            third.take(1),
            Err(OverBudget {
                limit: 4 * FLOOR,
                held: FLOOR
            })
        );
        small.give(FLOOR / 2);
        assert_eq!(small.mine(), FLOOR / 2);
        drop(big);
        drop(third);
        assert_eq!(budget.held(), FLOOR / 2);
        assert_eq!(gauge.get(), (FLOOR / 2) as i64);
        assert_eq!(
            budget.sources(),
            1,
            "the sources of dropped streams are gone"
        );
        drop(small);
        assert_eq!((budget.held(), gauge.get(), budget.sources()), (0, 0, 0));
    }

    /// One source opening ever more streams that hold their floors on a full node: it gets
    /// no more than its share, whatever the number of streams, while another source still
    /// gets a floor; what is written on, or dropped, is given back to its source.
    #[test]
    fn the_floors_of_one_source_stop_at_its_share() {
        let limit = 64 * FLOOR;
        let cap = source_cap(limit);
        assert_eq!(cap, 4 * FLOOR);
        let budget = BufferBudget::new(limit, Gauge::default());
        let mut filler = budget.holding(B);
        filler.take(limit).unwrap();
        // The mapped form of A is A.
        let mapped = match A {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(_) => unreachable!(),
        };
        let mut streams: Vec<_> = (0..8)
            .map(|i| budget.holding(if i % 2 == 0 { A } else { mapped }))
            .collect();
        let admitted = streams
            .iter_mut()
            .map(|s| s.take(FLOOR))
            .filter(Result::is_ok)
            .count();
        assert_eq!(admitted, 4, "four floors make A's share");
        assert_eq!(budget.held(), limit + cap);
        // B's first stream holds the limit, one floor of it under its floor: B's next stream
        // still gets its own.
        let mut other = budget.holding(B);
        other.take(FLOOR).unwrap();
        // What one of A's streams writes on makes room for another's.
        streams[0].give(FLOOR / 2);
        assert!(streams[7].take(FLOOR / 2).is_ok());
        assert!(streams[6].take(1).is_err());
        // So does a dropped stream.
        streams.remove(7);
        assert!(streams[6].take(FLOOR / 2).is_ok());
        drop(streams);
        drop((filler, other));
        assert_eq!((budget.held(), budget.sources()), (0, 0));
    }
}
