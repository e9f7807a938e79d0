//! What an HTTP/2 tunnel connection holds to send to a peer that reads slowly: the bytes its
//! streams have handed to h2 and h2 has not yet written to the connection, counted in the
//! node's buffered-bytes budget ([`super::budget`]) for the connection's source.
//!
//! h2 buffers up to its send-buffer size per stream, in every stream of a connection, for as
//! long as the connection is not writable; the peer grants its own flow-control windows, so
//! they are no bound. Without a count of its own, an authenticated peer that opens streams to
//! an application that writes, and then reads nothing, has the daemon hold a send buffer per
//! stream on every connection its caps allow.
//!
//! Contract:
//! - A stream asks `Outflow::reserve` before it hands bytes to h2, and is granted what the
//!   budget admits: the connection may always hold [`FLOOR`] (within its source's share),
//!   more while the node is under its limit. A stream whose connection holds bytes waits
//!   until it has written some (a peer that reads nothing is closed by the connection's
//!   keep-alive); one whose connection holds nothing and is still refused (its source's
//!   share is spent) is refused ([`OverBudget`]) and reset, as a receiving stream is.
//! - [`Metered`], the connection's transport under h2, reads the frames h2 writes and gives
//!   back each `DATA` payload of a stream as it is written.
//! - A stream reset gives back what it had not written, which h2 discards: dropped before it
//!   ended its side, or named by a `RST_STREAM` either way (h2's, or the peer's, which
//!   [`Metered`] reads too). An ended one keeps it until its last frame is written.
//! - When the connection ends ([`Metered`] dropped), everything is given back and waiting
//!   streams are refused.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::budget::{BufferBudget, Held, OverBudget, FLOOR};

/// A tunnel connection's unsent bytes; see the module documentation.
#[derive(Debug)]
pub struct Outflow {
    state: Mutex<State>,
    written: tokio::sync::Notify,
}

#[derive(Debug)]
struct State {
    held: Held<Arc<BufferBudget>>,
    /// Bytes handed to h2 and not yet written, by stream id.
    streams: HashMap<u32, usize>,
    closed: bool,
}

/// Why a stream may not hand h2 more bytes.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the tunnel connection has ended")]
    Closed,
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
}

impl Outflow {
    /// The unsent bytes of a connection from `source`, counted in `budget`.
    pub fn new(budget: Arc<BufferBudget>, source: std::net::IpAddr) -> Arc<Outflow> {
        Arc::new(Outflow {
            state: Mutex::new(State {
                held: Held::new(budget, source),
                streams: HashMap::new(),
                closed: false,
            }),
            written: tokio::sync::Notify::new(),
        })
    }

    /// Waits until stream `id` may hand h2 up to `want` bytes (`want > 0`); returns how many.
    pub(super) async fn reserve(&self, id: u32, want: usize) -> Result<usize, Refused> {
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            // Registered before the check, so that a write after it is not missed.
            written.as_mut().enable();
            if let Some(n) = self.try_reserve(id, want)? {
                return Ok(n);
            }
            written.await;
        }
    }

    /// [`Self::reserve`] without waiting: `None` when the stream must wait for a write.
    pub(super) fn try_reserve(&self, id: u32, want: usize) -> Result<Option<usize>, Refused> {
        let mut s = self.state.lock();
        if s.closed {
            return Err(Refused::Closed);
        }
        let room = FLOOR.saturating_sub(s.held.mine());
        let granted = match s.held.take(want) {
            Ok(()) => Ok(want),
            Err(over) if room == 0 => Err(over),
            Err(over) => s
                .held
                .take(want.min(room))
                .map(|()| want.min(room))
                .map_err(|_| over),
        };
        match granted {
            Ok(n) => {
                *s.streams.entry(id).or_default() += n;
                Ok(Some(n))
            }
            Err(over) if s.held.mine() == 0 => Err(over.into()),
            Err(_) => Ok(None),
        }
    }

    /// `n` bytes of stream `id`'s `DATA` were written; `end` when they end its last frame.
    fn written(&self, id: u32, n: usize, end: bool) {
        let mut s = self.state.lock();
        let Some(left) = s.streams.get_mut(&id) else {
            return;
        };
        let n = n.min(*left);
        *left -= n;
        if end {
            let rest = s.streams.remove(&id).unwrap_or(0);
            s.held.give(n + rest);
        } else {
            s.held.give(n);
        }
        drop(s);
        self.written.notify_waiters();
    }

    /// Stream `id` was reset: h2 discards what it had not written.
    pub(super) fn abandon(&self, id: u32) {
        let mut s = self.state.lock();
        if let Some(left) = s.streams.remove(&id) {
            s.held.give(left);
            drop(s);
            self.written.notify_waiters();
        }
    }

    fn close(&self) {
        let mut s = self.state.lock();
        s.closed = true;
        s.streams.clear();
        let all = s.held.mine();
        s.held.give(all);
        drop(s);
        self.written.notify_waiters();
    }

    /// Bytes handed to h2 and not yet written.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.state.lock().held.mine()
    }
}

/// A tunnel connection's transport under the h2 server: passes everything through, and gives
/// each `DATA` payload back to the connection's [`Outflow`] as h2 writes it.
pub struct Metered<T> {
    io: T,
    outflow: Arc<Outflow>,
    /// What h2 writes.
    sent: Frames,
    /// What the peer sends, after its connection preface.
    received: Frames,
}

impl<T> Metered<T> {
    /// `io` as the transport of a server connection (h2 writes frames from its first byte).
    pub fn new(io: T, outflow: Arc<Outflow>) -> Self {
        Metered {
            io,
            outflow,
            sent: Frames::default(),
            received: Frames::after(PREFACE_LEN),
        }
    }

    /// Reads what h2 wrote (`sent`) or what the peer sent: each `DATA` payload written is
    /// given back, each stream reset either way abandoned.
    fn count(&mut self, mut bytes: &[u8], sent: bool) {
        let frames = if sent {
            &mut self.sent
        } else {
            &mut self.received
        };
        let outflow = &self.outflow;
        while !bytes.is_empty() {
            let used = frames.feed(bytes, |e| match e {
                Frame::Data { id, n, end } if sent => outflow.written(id, n, end),
                Frame::Data { .. } => {}
                Frame::Reset(id) => outflow.abandon(id),
            });
            bytes = &bytes[used..];
        }
    }
}

impl<T> Drop for Metered<T> {
    fn drop(&mut self) {
        self.outflow.close();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.count(&buf.filled()[before..], false);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.count(&buf[..n], true);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = r {
            for b in bufs {
                let k = n.min(b.len());
                self.count(&b[..k], true);
                n -= k;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The length of the client's connection preface, which precedes its frames.
const PREFACE_LEN: usize = 24;

/// What a reader of an HTTP/2 frame stream reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// `n` payload bytes of a `DATA` frame of stream `id`; `end` with the last byte of one
    /// carrying END_STREAM.
    Data { id: u32, n: usize, end: bool },
    /// A `RST_STREAM` of stream `id`.
    Reset(u32),
}

/// Where a reader of an HTTP/2 frame stream is: in bytes to skip, in a frame's 9-byte header
/// (`have < 9`), or in its payload.
#[derive(Debug, Default)]
struct Frames {
    /// Bytes still to skip before the first frame (a connection preface).
    skip: usize,
    header: [u8; 9],
    /// Header bytes read so far; 9 while in the payload.
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// The current frame's stream, when it is `DATA`, and whether it ends the stream.
    data: Option<(u32, bool)>,
}

impl Frames {
    /// A reader whose frames start after `skip` bytes.
    fn after(skip: usize) -> Self {
        Frames {
            skip,
            ..Frames::default()
        }
    }

    /// Reads the start of `bytes` (skipped bytes, a header's, or a payload's) and returns how
    /// many it read (at least one), telling `on` what it found.
    fn feed(&mut self, bytes: &[u8], mut on: impl FnMut(Frame)) -> usize {
        if self.skip > 0 {
            let n = self.skip.min(bytes.len());
            self.skip -= n;
            return n;
        }
        if self.have < 9 {
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            if self.have == 9 {
                let h = &self.header;
                self.left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                // Type 0 is DATA (its flag 0x1 is END_STREAM), type 3 RST_STREAM.
                self.data = (h[3] == 0).then_some((id, h[4] & 0x1 != 0));
                if h[3] == 3 {
                    on(Frame::Reset(id));
                }
                if self.left == 0 {
                    if let Some((id, true)) = self.data {
                        on(Frame::Data {
                            id,
                            n: 0,
                            end: true,
                        });
                    }
                    self.have = 0;
                }
            }
            return n;
        }
        let n = self.left.min(bytes.len());
        self.left -= n;
        if let Some((id, end)) = self.data {
            let end = end && self.left == 0;
            on(Frame::Data { id, n, end });
        }
        if self.left == 0 {
            self.have = 0;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use std::time::Duration;

    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn frame(kind: u8, flags: u8, id: u32, len: usize) -> Vec<u8> {
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&id.to_be_bytes());
        f.extend(std::iter::repeat_n(0xaa, len));
        f
    }

    /// Each `DATA` payload is counted for its stream, and only `DATA`, however the writes cut
    /// the frames (and after a preface, for what the peer sends); END_STREAM is told once, with
    /// the frame's last byte, and a `RST_STREAM` once.
    #[test]
    fn data_payloads_are_counted_per_stream_across_any_cut() {
        let wire: Vec<u8> = [
            frame(4, 0, 0, 6),      // SETTINGS
            frame(0, 0, 1, 5),      // DATA
            frame(1, 4, 5, 4),      // HEADERS
            frame(0, 1, 3, 3),      // DATA, END_STREAM
            frame(0, 1, 1, 0),      // an empty DATA ending stream 1
            frame(0, 0, 7, 70_000), // a DATA larger than a write
            frame(6, 0, 0, 8),      // PING
            frame(3, 0, 9, 4),      // RST_STREAM
        ]
        .concat();
        // Per stream: DATA bytes, END_STREAMs, resets.
        let want: BTreeMap<u32, (usize, usize, usize)> = [
            (1, (5, 1, 0)),
            (3, (3, 1, 0)),
            (7, (70_000, 0, 0)),
            (9, (0, 0, 1)),
        ]
        .into();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(preface.len(), PREFACE_LEN);
        for (skip, input) in [
            (0, wire.clone()),
            (PREFACE_LEN, [&preface[..], &wire].concat()),
        ] {
            for cut in [1, 2, 8, 9, 10, 17, 4096, input.len()] {
                let mut frames = Frames::after(skip);
                let mut got: BTreeMap<u32, (usize, usize, usize)> = BTreeMap::new();
                for write in input.chunks(cut) {
                    let mut rest = write;
                    while !rest.is_empty() {
                        let used = frames.feed(rest, |f| match f {
                            Frame::Data { id, n, end } => {
                                let e = got.entry(id).or_default();
                                e.0 += n;
                                e.1 += usize::from(end);
                            }
                            Frame::Reset(id) => got.entry(id).or_default().2 += 1,
                        });
                        rest = &rest[used..];
                    }
                }
                assert_eq!(got, want, "writes of {cut} bytes after {skip}");
            }
        }
    }

    #[tokio::test]
    async fn a_connection_gets_its_floor_waits_beyond_it_and_gets_all_back() {
        let budget = Arc::new(BufferBudget::new(2 * FLOOR, Default::default()));
        let out = Outflow::new(budget.clone(), A);
        // Over the limit at once: the floor only.
        assert_eq!(out.reserve(1, 3 * FLOOR).await.unwrap(), FLOOR);
        assert_eq!(out.reserve(1, FLOOR).await.unwrap(), FLOOR);
        assert_eq!(budget.held(), 2 * FLOOR);
        // Full, and holding: it waits for its own writes.
        let waiting = {
            let out = out.clone();
            tokio::spawn(async move { out.reserve(3, 10).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "granted on a full node");
        out.written(1, 100, false);
        let granted = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(granted.unwrap().unwrap().unwrap(), 10);
        assert_eq!(out.held(), 2 * FLOOR - 100 + 10);
        // A reset stream gives back what h2 will not write; an ended one its last frame's.
        out.abandon(1);
        assert_eq!(out.held(), 10);
        out.written(3, 4, true);
        assert_eq!((out.held(), budget.held()), (0, 0));
        // An ended connection refuses its waiting streams and gives everything back.
        out.reserve(5, 2 * FLOOR).await.unwrap();
        let other = Outflow::new(budget.clone(), IpAddr::from([10, 0, 0, 2]));
        other.reserve(9, FLOOR).await.unwrap();
        let waiting = {
            let out = out.clone();
            tokio::spawn(async move { out.reserve(5, 1).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        out.close();
        let refused = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(refused.unwrap().unwrap(), Err(Refused::Closed)));
        assert_eq!(budget.held(), FLOOR, "only the other connection's");
    }

    /// A stream the peer resets (read on the connection's transport) gives back what it held:
    /// h2 discards it, even after the stream had ended its side. The transport's end gives
    /// back the rest.
    #[tokio::test]
    async fn a_stream_the_peer_resets_gives_back_what_it_held() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let budget = Arc::new(BufferBudget::new(FLOOR, Default::default()));
        let out = Outflow::new(budget.clone(), A);
        out.reserve(1, 1000).await.unwrap();
        out.reserve(3, 10).await.unwrap();
        let (near, mut far) = tokio::io::duplex(4096);
        let mut metered = Metered::new(near, out.clone());
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let sent = [&preface[..], &frame(4, 0, 0, 0), &frame(3, 0, 1, 4)].concat();
        far.write_all(&sent).await.unwrap();
        let mut got = vec![0u8; sent.len()];
        metered.read_exact(&mut got).await.unwrap();
        assert_eq!(
            out.held(),
            10,
            "stream 1's bytes are given back, stream 3's kept"
        );
        drop(metered);
        assert_eq!((out.held(), budget.held()), (0, 0));
    }

    /// A connection holding nothing, whose source's share is spent on a full node, is refused
    /// rather than left to wait for writes that will never come.
    #[tokio::test]
    async fn a_connection_holding_nothing_past_its_sources_share_is_refused() {
        let budget = Arc::new(BufferBudget::new(FLOOR, Default::default()));
        let first = Outflow::new(budget.clone(), A);
        assert_eq!(first.reserve(1, FLOOR).await.unwrap(), FLOOR);
        let second = Outflow::new(budget.clone(), A);
        assert!(matches!(
            second.reserve(1, 1).await,
            Err(Refused::OverBudget(_))
        ));
    }
}
