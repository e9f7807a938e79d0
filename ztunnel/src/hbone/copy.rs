//! Copying bytes between a TCP socket and an HBONE stream, both ways at once.
//!
//! Contract: a TCP end-of-stream becomes the stream's END_STREAM and the stream's END_STREAM
//! becomes a TCP write shutdown, so half-close crosses the tunnel in both directions. Memory
//! is bounded: reads from TCP wait for HTTP/2 send capacity before reading more, and stream
//! window is released only once the bytes are written to TCP. No read buffer is held while
//! the socket has nothing to read (an idle connection costs no buffer); when it becomes
//! readable a buffer is taken whose size grows while reads keep filling it (bulk flows, up to
//! 256 KiB) and shrinks when they do not; each chunk is handed to h2 as `Bytes` without copying.
//! An error or reset in either direction aborts both (the stream is reset, the socket closed).
//!
//! Before a stream is opened, [`read_early`] takes what a just-accepted client has already
//! written (at most 16 KiB, without waiting), so that it goes out right behind the `CONNECT`
//! instead of one tunnel round trip later; the copy loop then carries what follows.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub(super) const INITIAL_BUF: usize = 16 * 1024;
pub(super) const MAX_BUF: usize = 256 * 1024;

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

/// Copies `tcp` ⇄ `stream` until both directions have ended, on the stream's transport.
pub async fn copy_tunnel(
    tcp_read: OwnedReadHalf,
    tcp_write: OwnedWriteHalf,
    stream: TunnelStream,
    counters: &ByteCounters,
) -> Result<(), CopyError> {
    match stream {
        TunnelStream::H2 { send, recv } => {
            copy_bidirectional(tcp_read, tcp_write, send, recv, counters).await
        }
        TunnelStream::Quic { send, recv } => {
            super::quic::copy_bidirectional(tcp_read, tcp_write, send, recv, counters).await
        }
    }
}

/// The next read size: doubled after a read that filled the buffer (a bulk flow, up to
/// [`MAX_BUF`]), halved after one that used less than a quarter of it.
pub(super) fn next_want(want: usize, n: usize) -> usize {
    if n >= want && want < MAX_BUF {
        want * 2
    } else if n < want / 4 && want > INITIAL_BUF {
        want / 2
    } else {
        want
    }
}

/// The bytes a just-accepted client has already written (up to 16 KiB), read without waiting,
/// to be sent right behind the tunnel's `CONNECT` ([`super::pool::Pool::open`]): a client
/// that speaks first then does not wait one more tunnel round trip. `Ok(None)` when nothing
/// is waiting, and at EOF (which the copy loop meets again); a socket error (a client that
/// reset at once) is returned, so the caller resets rather than opening a stream.
pub fn read_early(tcp: &tokio::net::TcpStream) -> std::io::Result<Option<Bytes>> {
    use std::io::Read;
    // A plain non-blocking `recv`: tokio's `try_read` would not even try before the reactor
    // has reported the new socket readable.
    let sock = socket2::SockRef::from(tcp);
    let mut buf = BytesMut::zeroed(INITIAL_BUF);
    match (&*sock).read(&mut buf) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(buf.split_to(n).freeze())),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Copies `tcp` ⇄ (`send`, `recv`) until both directions have ended.
pub async fn copy_bidirectional(
    tcp_read: OwnedReadHalf,
    tcp_write: OwnedWriteHalf,
    send: SendStream<Bytes>,
    recv: RecvStream,
    counters: &ByteCounters,
) -> Result<(), CopyError> {
    tokio::try_join!(
        tcp_to_stream(tcp_read, send, &counters.sent),
        stream_to_tcp(recv, tcp_write, &counters.received),
    )?;
    Ok(())
}

async fn tcp_to_stream(
    mut rd: OwnedReadHalf,
    mut send: SendStream<Bytes>,
    counter: &AtomicU64,
) -> Result<(), CopyError> {
    let mut buf = BytesMut::new();
    let mut want = INITIAL_BUF;
    loop {
        let n = poll_fn(|cx| read_chunk(&mut rd, cx, &mut buf, want)).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        want = next_want(want, n);
        let mut chunk = buf.split().freeze();
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
}

/// Reads what `rd` has into `buf`, taking a buffer of `want` bytes only once the socket is
/// readable (reusing the previous chunk's allocation when h2 has already written it), and
/// dropping it whenever the read has to wait: an idle connection holds no buffer. Reading
/// through `AsyncRead` lets tokio note a short read as "drained", so the next read waits for
/// the socket instead of costing a `recv` that fails with `EAGAIN`. Both polls below spend
/// the task's cooperative budget, so a busy flow yields rather than spins.
pub(super) fn read_chunk(
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

async fn stream_to_tcp(
    mut recv: RecvStream,
    mut wr: OwnedWriteHalf,
    counter: &AtomicU64,
) -> Result<(), CopyError> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let n = chunk.len();
        wr.write_all(&chunk).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        recv.flow_control().release_capacity(n)?;
    }
    wr.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::{read_early, INITIAL_BUF};

    /// A connected pair on loopback: (client, accepted).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Waits until `s` has something to read (data, EOF or an error) without consuming it.
    async fn settle(s: &TcpStream) {
        tokio::time::timeout(Duration::from_secs(5), s.readable())
            .await
            .expect("readable in time")
            .expect("readable");
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

    #[tokio::test]
    async fn read_early_takes_what_the_client_already_wrote() {
        let (mut c, s) = pair().await;
        assert!(read_early(&s).unwrap().is_none(), "nothing written yet");
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        settle(&s).await;
        let first = read_early(&s).unwrap().expect("bytes");
        assert_eq!(&first[..], b"GET / HTTP/1.1\r\n\r\n");
        assert!(read_early(&s).unwrap().is_none(), "taken once");
    }

    #[tokio::test]
    async fn read_early_takes_at_most_the_initial_buffer() {
        let (mut c, s) = pair().await;
        c.write_all(&vec![1u8; 3 * INITIAL_BUF]).await.unwrap();
        settle(&s).await;
        let first = read_early(&s).unwrap().expect("bytes");
        assert_eq!(first.len(), INITIAL_BUF);
    }

    #[tokio::test]
    async fn read_early_leaves_eof_to_the_copy_loop_and_returns_a_reset() {
        let (c, s) = pair().await;
        drop(c);
        settle(&s).await;
        assert!(read_early(&s).unwrap().is_none(), "EOF is not data");

        let (c, s) = pair().await;
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        settle(&s).await;
        let e = read_early(&s).expect_err("a reset is an error");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
