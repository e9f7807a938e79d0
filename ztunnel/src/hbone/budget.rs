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
//! dropped). A stream may always hold [`FLOOR`] bytes. Beyond that, a take that would bring
//! the node over its limit is refused ([`OverBudget`]): the copy loop then resets that stream
//! (`buffer_budget`), which frees what it held. So the stream that keeps receiving for an
//! application that does not read is the one given up, never a stream that holds little; and
//! what the node holds stays under the limit plus [`FLOOR`] per stream. The decision is the
//! pure [`admits`].
//!
//! What a stream's transport holds before the copy loop takes it (bounded by its window) is
//! not counted: the loop takes each chunk as it arrives, whether or not the application is
//! reading ([`super::copy`]), up to a window's worth ([`QUEUE_MAX`]).

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

/// Whether a stream holding `mine` may take `n` more bytes while the node holds `node`.
pub fn admits(node: usize, mine: usize, n: usize, limit: usize) -> bool {
    mine + n <= FLOOR || node + n <= limit
}

/// The node's budget; one per daemon, shared by every copy loop. What the node holds is kept
/// in one gauge, which the daemon exports as is (`ztunnel_buffered_bytes`).
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    held: Gauge,
}

impl BufferBudget {
    /// A budget of `limit` bytes, counted in `held` (a fresh gauge when not exported).
    pub fn new(limit: usize, held: Gauge) -> Self {
        BufferBudget { limit, held }
    }

    /// A budget that never refuses (tools and benches that measure something else).
    pub fn unlimited() -> Self {
        Self::new(usize::MAX, Gauge::default())
    }

    /// Bytes held on the node now.
    pub fn held(&self) -> usize {
        self.held.get() as usize
    }

    /// What one stream holds, counted in the budget until dropped.
    pub fn holding(&self) -> Holding<'_> {
        Holding {
            budget: self,
            mine: 0,
        }
    }
}

/// What one stream holds of the budget.
#[derive(Debug)]
pub struct Holding<'a> {
    budget: &'a BufferBudget,
    mine: usize,
}

impl Holding<'_> {
    /// Counts `n` more bytes held by this stream, unless the budget refuses them.
    pub fn take(&mut self, n: usize) -> Result<(), OverBudget> {
        let b = self.budget;
        if !admits(b.held(), self.mine, n, b.limit) {
            return Err(OverBudget {
                limit: b.limit,
                held: self.mine,
            });
        }
        b.held.inc_by(n as i64);
        self.mine += n;
        Ok(())
    }

    /// `n` bytes were written on: no longer held.
    pub fn give(&mut self, n: usize) {
        let n = n.min(self.mine);
        self.budget.held.dec_by(n as i64);
        self.mine -= n;
    }

    /// Bytes this stream holds.
    pub fn mine(&self) -> usize {
        self.mine
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.budget.held.dec_by(self.mine as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_table() {
        const K: usize = 1024;
        let limit = 1024 * K;
        // (node, mine, n, admitted)
        let cases = [
            (0, 0, 16 * K, true),
            (limit, 0, FLOOR, true),     // the floor, even over the limit
            (limit, FLOOR - 1, 1, true), // up to the floor exactly
            (limit, FLOOR, 1, false),    // beyond the floor, over the limit
            (limit - 16 * K, FLOOR, 16 * K, true), // reaches the limit exactly
            (limit - 16 * K, FLOOR, 16 * K + 1, false),
            (0, 4 * limit, 1, true), // a stream may hold much while the node is under
        ];
        for (node, mine, n, want) in cases {
            assert_eq!(admits(node, mine, n, limit), want, "{node} {mine} {n}");
        }
    }

    #[test]
    fn a_stream_over_the_floor_is_refused_once_the_node_is_full_and_gives_back_on_drop() {
        let gauge = Gauge::default();
        let budget = BufferBudget::new(4 * FLOOR, gauge.clone());
        let mut big = budget.holding();
        big.take(3 * FLOOR).unwrap();
        let mut small = budget.holding();
        small.take(FLOOR).unwrap();
        assert_eq!(budget.held(), 4 * FLOOR);
        let over = big.take(1).unwrap_err();
        assert_eq!(over.held, 3 * FLOOR);
        // Another stream still gets its floor.
        let mut third = budget.holding();
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
        drop(small);
        assert_eq!((budget.held(), gauge.get()), (0, 0));
    }
}
