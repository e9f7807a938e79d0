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

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

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
    rd: OwnedReadHalf,
    mut send: SendStream<Bytes>,
    counter: &AtomicU64,
) -> Result<(), CopyError> {
    let mut buf = BytesMut::new();
    let mut want = INITIAL_BUF;
    loop {
        // Reuses the previous chunk's allocation when h2 has already written it.
        buf.reserve(want);
        let n = match rd.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing to read: hold no buffer while waiting (idle connections cost none).
                buf = BytesMut::new();
                rd.readable().await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if n >= want && want < MAX_BUF {
            want *= 2;
        } else if n < want / 4 && want > INITIAL_BUF {
            want /= 2;
        }
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
