//! What a copy loop holds for its TCP side: the chunks taken from a tunnel stream and not yet
//! written, counted in the node's budget ([`super::budget`]).
//!
//! Contract: [`Queue::push`] counts a chunk in the budget (or refuses it, and the loop resets
//! the stream); [`Queue::write_some`] writes what it can of the front chunks in one gathered
//! `writev` and gives the written bytes back. `write_some` is cancel-safe: nothing is taken
//! from the queue until the write has completed, so a loop may race it against taking the
//! next chunk (that is how the loop sees, and counts, what arrives for an application that
//! does not read).

use std::collections::VecDeque;
use std::io;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

use super::budget::{Holding, OverBudget};

/// Chunks written in one `writev` at most.
pub(super) const CHUNKS_PER_WRITE: usize = 32;

/// The chunks waiting for the TCP side, and their place in the budget.
#[derive(Debug)]
pub(super) struct Queue<'a> {
    chunks: VecDeque<Bytes>,
    holding: Holding<'a>,
}

impl<'a> Queue<'a> {
    pub(super) fn new(holding: Holding<'a>) -> Self {
        Queue {
            chunks: VecDeque::new(),
            holding,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Bytes waiting.
    pub(super) fn len(&self) -> usize {
        self.holding.mine()
    }

    /// Queues a chunk, counted in the budget; refused when the budget is spent.
    pub(super) fn push(&mut self, chunk: Bytes) -> Result<(), OverBudget> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.holding.take(chunk.len())?;
        self.chunks.push_back(chunk);
        Ok(())
    }

    /// Writes the front chunks to `wr` in one gathered write; returns how many bytes went.
    /// Cancel-safe.
    pub(super) async fn write_some(&mut self, wr: &mut OwnedWriteHalf) -> io::Result<usize> {
        let mut n = {
            let mut slices = [io::IoSlice::new(&[]); CHUNKS_PER_WRITE];
            let mut count = 0;
            for (slice, chunk) in slices.iter_mut().zip(&self.chunks) {
                *slice = io::IoSlice::new(chunk);
                count += 1;
            }
            wr.write_vectored(&slices[..count]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let written = n;
        while let Some(front) = self.chunks.front_mut() {
            if n < front.len() {
                front.advance(n);
                break;
            }
            n -= front.len();
            self.chunks.pop_front();
        }
        self.holding.give(written);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::hbone::budget::BufferBudget;
    use crate::hbone::tests::pair;

    #[tokio::test]
    async fn gathered_writes_deliver_every_chunk_in_order_across_partial_writes() {
        let (c, mut s) = pair().await;
        let (_rd, mut wr) = c.into_split();
        // Chunks of distinct sizes and contents, 8 MiB and more in all: far beyond the socket
        // buffers, so the gathered writes are partial and end inside chunks.
        let chunks: Vec<Bytes> = (0..CHUNKS_PER_WRITE + 8)
            .map(|i| Bytes::from(vec![i as u8; 256 * 1024 + i * 997]))
            .collect();
        let want: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let budget = BufferBudget::unlimited();
        let mut q = Queue::new(budget.holding([127, 0, 0, 1].into()));
        for c in &chunks {
            q.push(c.clone()).unwrap();
        }
        assert_eq!(budget.held(), want.len());
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; want.len()];
            s.read_exact(&mut got).await.unwrap();
            assert!(got == want, "every byte, in order");
        });
        let mut sent = 0;
        while !q.is_empty() {
            sent += q.write_some(&mut wr).await.unwrap();
            assert_eq!(q.len(), budget.held(), "the written bytes are given back");
        }
        reader.await.unwrap();
        assert_eq!(
            (sent, budget.held()),
            (chunks.iter().map(Bytes::len).sum(), 0)
        );
    }

    #[test]
    fn a_chunk_over_the_budget_is_refused_and_not_queued() {
        let budget = BufferBudget::new(super::super::budget::FLOOR, Default::default());
        let mut q = Queue::new(budget.holding([127, 0, 0, 1].into()));
        q.push(Bytes::from(vec![0; super::super::budget::FLOOR]))
            .unwrap();
        assert!(q.push(Bytes::from_static(b"x")).is_err());
        assert_eq!(q.len(), super::super::budget::FLOOR);
        drop(q);
        assert_eq!(budget.held(), 0);
    }
}
