//! Copying bytes between a TCP socket and an HBONE stream, both ways at once:
//! [`copy_tunnel`], on whichever transport a [`TunnelStream`] holds (an HTTP/2 `CONNECT`
//! stream, or a QUIC stream of [`super::quic`]), each with its own loop below.
//!
//! Contract: a TCP end-of-stream ends the stream (HTTP/2 END_STREAM, QUIC FIN) and the
//! stream's end becomes a TCP write shutdown, so half-close crosses the tunnel in both
//! directions. Memory is bounded: reads from TCP wait for the stream's send capacity before
//! reading more, and stream window is released only once the bytes are written to TCP. What
//! arrives from the stream while the TCP side is slow is taken at once (up to a window) and
//! counted in the node's buffered-bytes budget until written ([`super::budget`]); a stream the
//! budget refuses is reset. No read buffer is held while the socket has nothing to read (an
//! idle connection costs no buffer); when it becomes readable a buffer is taken whose size
//! grows while reads keep filling it (bulk flows, up to 256 KiB) and shrinks when they do not;
//! each chunk is handed to the stream as `Bytes` without copying. An error or reset in either
//! direction aborts both (the stream is reset, the socket closed).
//!
//! What the client writes before its stream is open goes out right behind the `CONNECT`
//! ([`super::early`]); the copy loop carries what follows.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::Either;
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::budget::{BufferBudget, OverBudget, QUEUE_MAX};
use super::queue::{Queue, CHUNKS_PER_WRITE};
use super::quic;

const INITIAL_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// Live byte counts of one proxied connection, readable while it runs.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Bytes read from the TCP side and sent into the tunnel.
    pub sent: AtomicU64,
    /// Bytes received from the tunnel and written to the TCP side.
    pub received: AtomicU64,
}

impl ByteCounters {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("tcp: {0}")]
    Tcp(#[from] io::Error),
    #[error("tunnel stream: {0}")]
    Stream(#[from] h2::Error),
    #[error("tunnel stream closed by the peer")]
    StreamClosed,
    #[error("tunnel stream (QUIC): {0}")]
    Quic(String),
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
}

/// The two halves of an open tunnel stream, on either transport.
pub enum TunnelStream {
    H2 {
        send: SendStream<Bytes>,
        recv: RecvStream,
    },
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
}

/// Copies `tcp` ⇄ `stream` until both directions have ended, on the stream's transport; what
/// waits for the TCP side is counted in `budget`.
///
/// Not an `async fn`: the future is the transport's own copy, without a copy of `stream` kept
/// beside it for the connection's whole life (see `crate::task`); QUIC's is boxed, its state
/// being twice HTTP/2's, so that a connection on HTTP/2 carries no room for it.
pub fn copy_tunnel<'a>(
    tcp_read: OwnedReadHalf,
    tcp_write: OwnedWriteHalf,
    stream: TunnelStream,
    counters: &'a ByteCounters,
    budget: &'a BufferBudget,
) -> impl Future<Output = Result<(), CopyError>> + Send + 'a {
    match stream {
        TunnelStream::H2 { send, recv } => {
            Either::Left(copy_h2(tcp_read, tcp_write, send, recv, counters, budget))
        }
        TunnelStream::Quic { send, recv } => Either::Right(Box::pin(copy_quic(
            tcp_read, tcp_write, send, recv, counters, budget,
        ))),
    }
}

/// The next read size: doubled after a read that filled the buffer (a bulk flow, up to
/// [`MAX_BUF`]), halved after one that used less than a quarter of it.
fn next_want(want: usize, n: usize) -> usize {
    if n >= want && want < MAX_BUF {
        want * 2
    } else if n < want / 4 && want > INITIAL_BUF {
        want / 2
    } else {
        want
    }
}

/// Copies `tcp` ⇄ (`send`, `recv`) of an HTTP/2 tunnel stream until both directions have ended.
async fn copy_h2(
    tcp_read: OwnedReadHalf,
    tcp_write: OwnedWriteHalf,
    send: SendStream<Bytes>,
    recv: RecvStream,
    counters: &ByteCounters,
    budget: &BufferBudget,
) -> Result<(), CopyError> {
    tokio::try_join!(
        h2_tcp_to_stream(tcp_read, send, &counters.sent),
        h2_stream_to_tcp(recv, tcp_write, &counters.received, budget),
    )?;
    Ok(())
}

/// What a copy loop reads from its TCP side: chunks sized to the flow ([`next_want`]), read
/// by [`read_chunk`], each counted in `counter` as it is read.
struct TcpChunks<'a> {
    rd: OwnedReadHalf,
    buf: BytesMut,
    want: usize,
    counter: &'a AtomicU64,
}

impl<'a> TcpChunks<'a> {
    fn new(rd: OwnedReadHalf, counter: &'a AtomicU64) -> Self {
        TcpChunks {
            rd,
            buf: BytesMut::new(),
            want: INITIAL_BUF,
            counter,
        }
    }

    /// The next chunk read; `None` at the TCP side's end-of-stream.
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        let TcpChunks {
            rd,
            buf,
            want,
            counter,
        } = self;
        let asked = *want;
        let n = poll_fn(|cx| read_chunk(rd, cx, buf, asked)).await?;
        if n == 0 {
            return Ok(None);
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        *want = next_want(asked, n);
        Ok(Some(buf.split().freeze()))
    }
}

async fn h2_tcp_to_stream(
    rd: OwnedReadHalf,
    mut send: SendStream<Bytes>,
    counter: &AtomicU64,
) -> Result<(), CopyError> {
    let mut tcp = TcpChunks::new(rd, counter);
    while let Some(mut chunk) = tcp.next().await? {
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(r) => r?,
                None => return Err(CopyError::StreamClosed),
            };
            if granted == 0 {
                continue;
            }
            let piece = chunk.split_to(granted.min(chunk.len()));
            send.send_data(piece, false)?;
        }
    }
    send.send_data(Bytes::new(), true)?;
    Ok(())
}

/// Reads what `rd` has into `buf`, taking a buffer of `want` bytes only once the socket is
/// readable (reusing the previous chunk's allocation when h2 has already written it), and
/// dropping it whenever the read has to wait: an idle connection holds no buffer. Reading
/// through `AsyncRead` lets tokio note a short read as "drained", so the next read waits for
/// the socket instead of costing a `recv` that fails with `EAGAIN`. Both polls below spend
/// the task's cooperative budget, so a busy flow yields rather than spins.
fn read_chunk(
    rd: &mut OwnedReadHalf,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    if let Poll::Ready(r) = rd.as_ref().poll_read_ready(cx) {
        r?;
        buf.reserve(want);
        if let Poll::Ready(r) = tokio_util::io::poll_read_buf(Pin::new(rd), cx, buf) {
            return Poll::Ready(r);
        }
    }
    *buf = BytesMut::new();
    Poll::Pending
}

async fn h2_stream_to_tcp(
    mut recv: RecvStream,
    mut wr: OwnedWriteHalf,
    counter: &AtomicU64,
    budget: &BufferBudget,
) -> Result<(), CopyError> {
    let mut queue = Queue::new(budget);
    let mut ended = false;
    loop {
        let step = if queue.is_empty() {
            if ended {
                break;
            }
            Step::Data(recv.data().await)
        } else {
            // Write, and meanwhile take what arrives (up to a window), so that what waits for
            // a slow application is counted in the budget.
            let take = !ended && queue.len() < QUEUE_MAX;
            tokio::select! {
                biased;
                w = queue.write_some(&mut wr) => Step::Wrote(w),
                d = recv.data(), if take => Step::Data(d),
            }
        };
        match step {
            Step::Wrote(w) => {
                let n = w?;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                recv.flow_control().release_capacity(n)?;
            }
            Step::Data(Some(chunk)) => queue.push(chunk?)?,
            Step::Data(None) => ended = true,
        }
    }
    wr.shutdown().await?;
    Ok(())
}

/// Copies `tcp` ⇄ (`send`, `recv`) of a QUIC tunnel stream until both directions have ended;
/// on an error both directions are reset (a dropped quinn stream would otherwise end cleanly).
async fn copy_quic(
    tcp_read: OwnedReadHalf,
    tcp_write: OwnedWriteHalf,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    counters: &ByteCounters,
    budget: &BufferBudget,
) -> Result<(), CopyError> {
    let r = tokio::try_join!(
        quic_tcp_to_stream(tcp_read, &mut send, &counters.sent),
        quic_stream_to_tcp(&mut recv, tcp_write, &counters.received, budget),
    );
    if r.is_err() {
        let _ = send.reset(quic::RESET);
        let _ = recv.stop(quic::RESET);
    }
    r.map(|_| ())
}

async fn quic_tcp_to_stream(
    rd: OwnedReadHalf,
    send: &mut quinn::SendStream,
    counter: &AtomicU64,
) -> Result<(), CopyError> {
    let mut tcp = TcpChunks::new(rd, counter);
    while let Some(chunk) = tcp.next().await? {
        send.write_chunk(chunk)
            .await
            .map_err(|e| CopyError::Quic(e.to_string()))?;
    }
    send.finish().map_err(|_| CopyError::StreamClosed)?;
    Ok(())
}

async fn quic_stream_to_tcp(
    recv: &mut quinn::RecvStream,
    mut wr: OwnedWriteHalf,
    counter: &AtomicU64,
    budget: &BufferBudget,
) -> Result<(), CopyError> {
    let mut queue = Queue::new(budget);
    let mut chunks: [Bytes; CHUNKS_PER_WRITE] = Default::default();
    let mut ended = false;
    loop {
        let step = if queue.is_empty() {
            if ended {
                break;
            }
            Step::Data(recv.read_chunks(&mut chunks).await)
        } else {
            // As on HTTP/2: take what arrives while writing, up to a window, counted. A read
            // here gives the peer credit, so no more than a window is taken.
            let take = !ended && queue.len() < QUEUE_MAX;
            tokio::select! {
                biased;
                w = queue.write_some(&mut wr) => Step::Wrote(w),
                d = recv.read_chunks(&mut chunks), if take => Step::Data(d),
            }
        };
        match step {
            Step::Wrote(w) => {
                counter.fetch_add(w? as u64, Ordering::Relaxed);
            }
            Step::Data(d) => match d.map_err(|e| CopyError::Quic(e.to_string()))? {
                Some(n) => {
                    for chunk in &mut chunks[..n] {
                        queue.push(std::mem::take(chunk))?;
                    }
                }
                None => ended = true,
            },
        }
    }
    wr.shutdown().await?;
    Ok(())
}

/// What one turn of a copy loop towards TCP did.
enum Step<W, D> {
    Wrote(W),
    Data(D),
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::INITIAL_BUF;
    use crate::hbone::tests::pair;

    #[tokio::test]
    async fn read_chunk_holds_no_buffer_while_waiting() {
        use std::future::poll_fn;
        use std::task::Poll;

        use bytes::BytesMut;

        let (mut c, s) = pair().await;
        let (mut rd, _wr) = s.into_split();
        let mut buf = BytesMut::with_capacity(INITIAL_BUF);
        // Nothing to read: the poll waits, and the buffer is given up.
        let waited = poll_fn(|cx| Poll::Ready(super::read_chunk(&mut rd, cx, &mut buf, 64))).await;
        assert!(waited.is_pending());
        assert_eq!(buf.capacity(), 0, "an idle connection holds no buffer");

        c.write_all(b"hello").await.unwrap();
        let n = poll_fn(|cx| super::read_chunk(&mut rd, cx, &mut buf, 64))
            .await
            .unwrap();
        assert_eq!((n, &buf[..]), (5, &b"hello"[..]));
        assert!(buf.capacity() >= 64, "a buffer of the size asked for");

        drop(c);
        buf.clear();
        let n = poll_fn(|cx| super::read_chunk(&mut rd, cx, &mut buf, 64))
            .await
            .unwrap();
        assert_eq!(n, 0, "EOF");
    }
}
