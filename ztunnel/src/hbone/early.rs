//! What a client writes before its tunnel stream is open, sent right behind the `CONNECT`.
//!
//! A client that speaks first (HTTP, most TLS) writes its first bytes a few microseconds after
//! `connect` returns, while the daemon is accepting it and asking the peer for a stream. Were
//! those bytes read only once the peer has answered `200`, every such connection would wait
//! one more tunnel round trip: across nodes, one network round trip per new connection.
//! [`Early`] instead takes what the client has written when the stream is requested
//! ([`Early::read`], without waiting) and, while the answer is in flight, what it writes next
//! ([`Early::next`]); the opener ([`super::client::open_stream_with`],
//! [`super::quic::open_stream`]) sends each piece on the stream as it comes.
//!
//! Contract:
//! - At most [`EARLY_LIMIT`] bytes are taken this way; after that the client waits for the
//!   answer, as it waits for the copy loop's flow control later.
//! - Every piece is kept until the stream is open ([`Early::release`]), so that a stream the
//!   peer refused unread (a pooled connection going away) can be retried on a new one with
//!   the same bytes; a connection does not hold them afterwards.
//! - End of stream is left in the socket for the copy loop to meet (a read after it reads it
//!   again); a socket error (a client that reset) is kept for the caller
//!   ([`Early::take_error`]), which then resets instead of copying.
//! - The peer holds these bytes and forwards them only if it answers `200`: they reach the
//!   application no earlier than before, only sooner, and only through a peer whose identity
//!   the TLS handshake checked.

use std::io;

use bytes::Bytes;
use tokio::net::TcpStream;

/// How many bytes are taken before the stream is open (well within the stream's initial
/// flow-control window, so they are all sent at once).
pub const EARLY_LIMIT: usize = 64 * 1024;

/// The size of one read.
const READ: usize = 16 * 1024;

/// The client's bytes taken before its stream is open; see the module documentation.
#[derive(Debug, Default)]
pub struct Early<'a> {
    tcp: Option<&'a TcpStream>,
    chunks: Vec<Bytes>,
    len: usize,
    /// End of stream, an error, or nothing more wanted: [`Early::next`] waits for ever.
    done: bool,
    error: Option<io::Error>,
}

impl<'a> Early<'a> {
    /// Takes what `tcp` (a just-accepted client) has already written, without waiting. A
    /// socket error (a client that reset at once) is returned, so that the caller resets
    /// rather than opening a stream.
    pub fn read(tcp: &'a TcpStream) -> io::Result<Early<'a>> {
        let mut early = Early {
            tcp: Some(tcp),
            ..Early::default()
        };
        // A plain non-blocking `recv`: tokio's `try_read` would not even try before the
        // reactor has reported the new socket readable.
        match recv(tcp, READ) {
            Ok(Some(b)) => early.push(b),
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(early)
    }

    /// Bytes already in hand and nothing more to read: a caller without a client socket.
    pub fn of(first: Option<Bytes>) -> Early<'static> {
        let mut early = Early {
            done: true,
            ..Early::default()
        };
        if let Some(b) = first {
            early.push(b);
        }
        early
    }

    /// Everything taken so far, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// How many bytes were taken.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next bytes the client writes, kept as well (see [`Early::chunks`]). Never returns
    /// after end of stream, a socket error or [`EARLY_LIMIT`] bytes, nor after
    /// [`Early::stop`]: callers race it with the peer's answer. Cancel-safe.
    pub async fn next(&mut self) -> Bytes {
        loop {
            let tcp = match self.tcp {
                Some(tcp) if !self.done && self.len < EARLY_LIMIT => tcp,
                _ => return std::future::pending().await,
            };
            if let Err(e) = tcp.readable().await {
                self.fail(e);
                continue;
            }
            let want = READ.min(EARLY_LIMIT - self.len);
            match tcp.try_io(tokio::io::Interest::READABLE, || recv(tcp, want)) {
                Ok(Some(b)) => {
                    self.push(b.clone());
                    return b;
                }
                Ok(None) => self.done = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => self.fail(e),
            }
        }
    }

    /// The stream is open: the bytes are its own now, so the copies kept for a retry are given
    /// up ([`Early::len`] still counts them); nothing more is taken.
    pub fn release(&mut self) {
        self.chunks = Vec::new();
        self.done = true;
    }

    /// Takes nothing more (the stream can no longer carry it).
    pub fn stop(&mut self) {
        self.done = true;
    }

    /// The socket error met while reading, if any: the client is gone.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    fn push(&mut self, b: Bytes) {
        self.len += b.len();
        self.chunks.push(b);
    }

    fn fail(&mut self, e: io::Error) {
        self.done = true;
        self.error = Some(e);
    }
}

/// One non-blocking read of at most `max` bytes into a stack buffer, copied out at its exact
/// size: nothing is allocated when there is nothing to read, and a short request does not
/// keep a large buffer alive. `Ok(None)` at end of stream.
fn recv(tcp: &TcpStream, max: usize) -> io::Result<Option<Bytes>> {
    use std::io::Read;
    let mut buf = [0u8; READ];
    let max = max.min(READ);
    match (&*socket2::SockRef::from(tcp)).read(&mut buf[..max])? {
        0 => Ok(None),
        n => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    use super::{Early, EARLY_LIMIT, READ};
    use crate::hbone::tests::pair;

    /// Waits until `s` has something to read (data, EOF or an error) without consuming it.
    async fn settle(s: &TcpStream) {
        tokio::time::timeout(Duration::from_secs(5), s.readable())
            .await
            .expect("readable in time")
            .expect("readable");
    }

    /// Whether `next` yields within a short while.
    async fn yields(early: &mut Early<'_>) -> Option<bytes::Bytes> {
        tokio::time::timeout(Duration::from_millis(200), early.next())
            .await
            .ok()
    }

    fn joined(early: &Early<'_>) -> Vec<u8> {
        early.chunks().concat()
    }

    #[tokio::test]
    async fn read_takes_what_the_client_already_wrote() {
        let (mut c, s) = pair().await;
        assert!(Early::read(&s).unwrap().is_empty(), "nothing written yet");
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        settle(&s).await;
        let early = Early::read(&s).unwrap();
        assert_eq!(joined(&early), b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(early.len(), 18);
        assert!(Early::read(&s).unwrap().is_empty(), "taken once");
    }

    #[tokio::test]
    async fn next_takes_what_the_client_writes_later_and_keeps_it() {
        let (mut c, s) = pair().await;
        let mut early = Early::read(&s).unwrap();
        assert!(yields(&mut early).await.is_none(), "nothing written yet");
        c.write_all(b"hello").await.unwrap();
        assert_eq!(&yields(&mut early).await.expect("bytes")[..], b"hello");
        c.write_all(b" world").await.unwrap();
        assert_eq!(&yields(&mut early).await.expect("bytes")[..], b" world");
        assert_eq!(joined(&early), b"hello world", "kept for a retry");
        early.release();
        assert!(
            early.chunks().is_empty(),
            "not held once the stream is open"
        );
        assert_eq!(early.len(), 11, "still counted");
    }

    #[tokio::test]
    async fn at_most_the_limit_is_taken() {
        let (mut c, s) = pair().await;
        c.write_all(&vec![1u8; 3 * EARLY_LIMIT]).await.unwrap();
        settle(&s).await;
        let mut early = Early::read(&s).unwrap();
        assert_eq!(early.len(), READ, "one read at once");
        while yields(&mut early).await.is_some() {}
        assert_eq!(early.len(), EARLY_LIMIT);
        assert!(early.take_error().is_none());
    }

    #[tokio::test]
    async fn end_of_stream_is_left_to_the_copy_loop() {
        let (mut c, s) = pair().await;
        let mut early = Early::read(&s).unwrap();
        c.write_all(b"bye").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(&yields(&mut early).await.expect("bytes")[..], b"bye");
        assert!(yields(&mut early).await.is_none(), "EOF is not data");
        assert!(early.take_error().is_none());
        let mut buf = [0u8; 8];
        assert_eq!(
            s.try_read(&mut buf).unwrap(),
            0,
            "the copy loop meets EOF again"
        );
    }

    #[tokio::test]
    async fn a_reset_is_an_error_at_once_and_kept_later() {
        let reset = |c: TcpStream| {
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(c);
        };
        let (c, s) = pair().await;
        reset(c);
        settle(&s).await;
        let e = Early::read(&s).expect_err("a reset is an error");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);

        let (c, s) = pair().await;
        let mut early = Early::read(&s).unwrap();
        reset(c);
        assert!(yields(&mut early).await.is_none());
        let e = early.take_error().expect("kept");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn stop_and_of_take_nothing_more() {
        let (mut c, s) = pair().await;
        let mut early = Early::read(&s).unwrap();
        early.stop();
        c.write_all(b"late").await.unwrap();
        assert!(yields(&mut early).await.is_none());

        let mut early = Early::of(Some(bytes::Bytes::from_static(b"hi")));
        assert_eq!(joined(&early), b"hi");
        assert!(yields(&mut early).await.is_none());
    }
}
