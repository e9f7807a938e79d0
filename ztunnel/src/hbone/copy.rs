//! Copying bytes between a TCP socket and an HBONE stream, both ways at once, on either
//! transport ([`super::copy_tunnel`]). One loop serves both: a transport is what implements
//! `StreamSend` and `StreamRecv` (HTTP/2's below, QUIC's in [`super::quic`]).
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
//! direction aborts both: the stream is reset, and the socket is reset too (`SO_LINGER` 0, an
//! RST rather than a FIN), so that an application never takes a transfer cut off by its peer or
//! by the tunnel for a complete one.
//!
//! What the client writes before its stream is open goes out right behind the `CONNECT`
//! ([`super::early`]); the copy loop carries what follows.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::budget::{Holding, OverBudget, QUEUE_MAX};
use super::outflow::{self, Outflow};
use super::queue::Queue;

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

impl From<outflow::Refused> for CopyError {
    fn from(e: outflow::Refused) -> Self {
        match e {
            outflow::Refused::Closed => CopyError::StreamClosed,
            outflow::Refused::OverBudget(over) => CopyError::OverBudget(over),
        }
    }
}

/// The sending half of a tunnel stream, as the copy loop sees it.
pub(super) trait StreamSend {
    /// Sends `chunk`, waiting for the stream's flow-control credit as needed.
    async fn send(&mut self, chunk: Bytes) -> Result<(), CopyError>;
    /// Ends this direction of the stream (HTTP/2 END_STREAM, QUIC FIN).
    fn finish(&mut self) -> Result<(), CopyError>;
    /// Resets the stream after a failure in either direction.
    fn reset(&mut self);
    /// Waits until the peer has received all that was sent and the end (or gave up on it), so
    /// that a connection closed once its streams have ended loses nothing. HTTP/2 needs no
    /// wait: its connection writes out what it holds before it closes.
    async fn delivered(&mut self) {}
}

/// The receiving half of a tunnel stream, as the copy loop sees it.
pub(super) trait StreamRecv {
    /// What one read takes from the stream.
    type Arrived;
    /// Waits for what arrives next; `None` once the stream has ended. Cancel-safe.
    async fn arrived(&mut self) -> Result<Option<Self::Arrived>, CopyError>;
    /// Moves what arrived into `queue`.
    fn take(&mut self, arrived: Self::Arrived, queue: &mut Queue<'_>) -> Result<(), OverBudget>;
    /// `n` bytes were written to TCP: the peer may send as many more.
    fn written(&mut self, n: usize) -> Result<(), CopyError>;
    /// Stops reading after a failure in either direction.
    fn stop(&mut self);
}

/// Copies `tcp` ⇄ (`send`, `recv`) until both directions have ended and what was sent has
/// been delivered; on an error both directions are reset (a dropped QUIC stream would
/// otherwise end cleanly).
pub(super) async fn copy<S: StreamSend, R: StreamRecv>(
    mut tcp_read: OwnedReadHalf,
    mut tcp_write: OwnedWriteHalf,
    mut send: S,
    mut recv: R,
    counters: &ByteCounters,
    holding: Holding<'_>,
) -> Result<(), CopyError> {
    let r = tokio::try_join!(
        tcp_to_stream(&mut tcp_read, &mut send, &counters.sent),
        stream_to_tcp(&mut recv, &mut tcp_write, &counters.received, holding),
    );
    if r.is_err() {
        send.reset();
        recv.stop();
        // An RST when the socket closes, and no FIN before it.
        reset_on_close(tcp_write.as_ref());
        tcp_write.forget();
    } else {
        send.delivered().await;
    }
    r.map(|_| ())
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

/// Makes the socket's close an RST: a copy that failed must not end in a FIN.
fn reset_on_close(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

async fn tcp_to_stream(
    rd: &mut OwnedReadHalf,
    send: &mut impl StreamSend,
    counter: &AtomicU64,
) -> Result<(), CopyError> {
    let mut buf = BytesMut::new();
    let mut want = INITIAL_BUF;
    loop {
        let asked = want;
        let n = poll_fn(|cx| read_chunk(rd, cx, &mut buf, asked)).await?;
        if n == 0 {
            return send.finish();
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        want = next_want(asked, n);
        send.send(buf.split().freeze()).await?;
    }
}

/// Reads what `rd` has into `buf`, taking a buffer of `want` bytes only once the socket is
/// readable (reusing the previous chunk's allocation when the stream has already sent it),
/// and dropping it whenever the read has to wait: an idle connection holds no buffer. Reading
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

async fn stream_to_tcp<R: StreamRecv>(
    recv: &mut R,
    wr: &mut OwnedWriteHalf,
    counter: &AtomicU64,
    holding: Holding<'_>,
) -> Result<(), CopyError> {
    let mut queue = Queue::new(holding);
    let mut ended = false;
    loop {
        let step = if queue.is_empty() {
            if ended {
                break;
            }
            Step::Arrived(recv.arrived().await)
        } else {
            // Write, and meanwhile take what arrives (up to a window), so that what waits for
            // a slow application is counted in the budget.
            let take = !ended && queue.len() < QUEUE_MAX;
            tokio::select! {
                biased;
                w = queue.write_some(wr) => Step::Wrote(w),
                more = recv.arrived(), if take => Step::Arrived(more),
            }
        };
        match step {
            Step::Wrote(w) => {
                let n = w?;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                recv.written(n)?;
            }
            Step::Arrived(more) => match more? {
                Some(arrived) => recv.take(arrived, &mut queue)?,
                None => ended = true,
            },
        }
    }
    wr.shutdown().await?;
    Ok(())
}

/// What one turn of the copy loop towards TCP did.
enum Step<A> {
    Wrote(io::Result<usize>),
    Arrived(Result<Option<A>, CopyError>),
}

/// An HTTP/2 stream's sending half, and its connection's unsent bytes when they are counted
/// ([`Outflow`]: on the server's side).
pub(super) struct H2Send {
    send: SendStream<Bytes>,
    outflow: Option<Arc<Outflow>>,
    ended: bool,
}

impl H2Send {
    pub(super) fn new(send: SendStream<Bytes>, outflow: Option<Arc<Outflow>>) -> Self {
        H2Send {
            send,
            outflow,
            ended: false,
        }
    }
}

impl StreamSend for H2Send {
    async fn send(&mut self, mut chunk: Bytes) -> Result<(), CopyError> {
        while !chunk.is_empty() {
            self.send.reserve_capacity(chunk.len());
            let granted = match poll_fn(|cx| self.send.poll_capacity(cx)).await {
                Some(r) => r?,
                None => return Err(CopyError::StreamClosed),
            };
            let mut n = granted.min(chunk.len());
            if let (Some(outflow), true) = (&self.outflow, n > 0) {
                let id = u32::from(self.send.stream_id());
                n = match outflow.try_reserve(id, n)? {
                    Some(n) => n,
                    // Boxed: the wait is rare, and the copy's future lasts as long as the
                    // connection (see `crate::task`).
                    None => Box::pin(outflow.reserve(id, n)).await?,
                };
            }
            if n > 0 {
                self.send.send_data(chunk.split_to(n), false)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), CopyError> {
        self.send.send_data(Bytes::new(), true)?;
        self.ended = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

impl Drop for H2Send {
    fn drop(&mut self) {
        if let (Some(outflow), false) = (&self.outflow, self.ended) {
            outflow.abandon(u32::from(self.send.stream_id()));
        }
    }
}

/// An HTTP/2 stream's receiving half: one `DATA` frame at a time, its window released once
/// its bytes are written.
impl StreamRecv for RecvStream {
    type Arrived = Bytes;

    async fn arrived(&mut self) -> Result<Option<Bytes>, CopyError> {
        Ok(self.data().await.transpose()?)
    }

    fn take(&mut self, chunk: Bytes, queue: &mut Queue<'_>) -> Result<(), OverBudget> {
        queue.push(chunk)
    }

    fn written(&mut self, n: usize) -> Result<(), CopyError> {
        Ok(self.flow_control().release_capacity(n)?)
    }

    fn stop(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{copy, ByteCounters, CopyError, Queue, StreamRecv, StreamSend, INITIAL_BUF};
    use crate::hbone::budget::{BufferBudget, OverBudget, FLOOR};

    const SOURCE: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    use crate::hbone::tests::pair;

    /// What the fake stream saw, shared with the test.
    #[derive(Debug, Default)]
    struct Seen {
        sent: Vec<u8>,
        finished: bool,
        reset: bool,
        stopped: bool,
        released: usize,
    }

    /// A stream whose sending half records what it is given, and whose receiving half hands
    /// out `script` in order, then waits for ever: the faults a real peer cannot produce on
    /// demand (an error at a chosen point) are in the script.
    struct Fake {
        seen: Arc<Mutex<Seen>>,
        script: VecDeque<Result<Option<Bytes>, CopyError>>,
    }

    impl Fake {
        fn new(script: Vec<Result<Option<Bytes>, CopyError>>) -> (Fake, Arc<Mutex<Seen>>) {
            let seen = Arc::default();
            let fake = Fake {
                seen: Arc::clone(&seen),
                script: script.into(),
            };
            (fake, seen)
        }
    }

    impl StreamSend for Arc<Mutex<Seen>> {
        async fn send(&mut self, chunk: Bytes) -> Result<(), CopyError> {
            self.lock().sent.extend_from_slice(&chunk);
            Ok(())
        }
        fn finish(&mut self) -> Result<(), CopyError> {
            self.lock().finished = true;
            Ok(())
        }
        fn reset(&mut self) {
            self.lock().reset = true;
        }
    }

    impl StreamRecv for Fake {
        type Arrived = Bytes;
        async fn arrived(&mut self) -> Result<Option<Bytes>, CopyError> {
            match self.script.pop_front() {
                Some(next) => next,
                None => std::future::pending().await,
            }
        }
        fn take(&mut self, chunk: Bytes, queue: &mut Queue<'_>) -> Result<(), OverBudget> {
            queue.push(chunk)
        }
        fn written(&mut self, n: usize) -> Result<(), CopyError> {
            self.seen.lock().released += n;
            Ok(())
        }
        fn stop(&mut self) {
            self.seen.lock().stopped = true;
        }
    }

    /// Runs the copy loop between the accepted end of a loopback pair and `fake`; returns the
    /// client end and the copy's task.
    async fn run(
        fake: Fake,
        seen: &Arc<Mutex<Seen>>,
        budget: BufferBudget,
    ) -> (
        tokio::net::TcpStream,
        tokio::task::JoinHandle<Result<(), CopyError>>,
    ) {
        let (client, accepted) = pair().await;
        let (rd, wr) = accepted.into_split();
        let send = Arc::clone(seen);
        let task = tokio::spawn(async move {
            let counters = ByteCounters::default();
            copy(rd, wr, send, fake, &counters, budget.holding(SOURCE)).await
        });
        (client, task)
    }

    #[tokio::test]
    async fn both_directions_carry_their_bytes_and_their_end() {
        let script = vec![Ok(Some(Bytes::from_static(b"world"))), Ok(None)];
        let (fake, seen) = Fake::new(script);
        let (mut client, task) = run(fake, &seen, BufferBudget::unlimited()).await;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        task.await.unwrap().expect("a clean end");
        assert_eq!(got, b"world", "the stream's bytes, then its end as EOF");
        let seen = seen.lock();
        assert_eq!(seen.sent, b"hello");
        assert!(seen.finished, "the client's EOF ends the stream");
        assert_eq!(seen.released, 5, "window given back once written");
        assert!(!seen.reset && !seen.stopped);
    }

    #[tokio::test]
    async fn an_error_from_the_stream_resets_both_directions() {
        let script = vec![
            Ok(Some(Bytes::from_static(b"partial"))),
            Err(CopyError::StreamClosed),
        ];
        let (fake, seen) = Fake::new(script);
        let (mut client, task) = run(fake, &seen, BufferBudget::unlimited()).await;
        let err = task.await.unwrap().expect_err("the stream's error");
        assert!(matches!(err, CopyError::StreamClosed), "{err}");
        {
            let seen = seen.lock();
            assert!(
                seen.reset && seen.stopped,
                "both directions reset: {seen:?}"
            );
            assert!(!seen.finished, "an aborted stream is not ended cleanly");
        }
        // The loop let go of the client's socket with an RST: its reads end in an error, not
        // in an EOF the application would take for a complete transfer.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.read_to_end(&mut rest),
        );
        let read = read.await.expect("the client's socket is closed");
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "after {rest:?}"
        );
    }

    #[tokio::test]
    async fn bytes_beyond_the_budget_reset_the_stream() {
        // The client does not read, so what arrives waits in the queue, counted.
        let big = Bytes::from(vec![7u8; FLOOR + 1]);
        let (fake, seen) = Fake::new(vec![Ok(Some(big))]);
        let budget = BufferBudget::new(FLOOR, Default::default());
        let (_client, task) = run(fake, &seen, budget).await;
        let err = task.await.unwrap().expect_err("over the budget");
        assert!(matches!(err, CopyError::OverBudget(_)), "{err}");
        assert!(seen.lock().reset, "the stream is reset");
    }

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
