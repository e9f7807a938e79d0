//! Applications the tests run inside the hosts: a bulk transfer in both directions with
//! SHA-256 digests, a half-close exchange, and a server that holds connections open.
//! All are plain tokio TCP: they know nothing of the mesh.

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Deterministic pseudo-random bytes (xorshift64), so both ends can predict a stream.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

/// The SHA-256 of `len` bytes of `Pattern::new(seed)`.
pub fn pattern_digest(seed: u64, len: usize) -> Vec<u8> {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n;
    }
    h.finalize().to_vec()
}

/// Writes `len` pattern bytes then shuts down the write side, while reading everything the
/// peer sends until EOF. Returns (digest of what was read, bytes read).
pub async fn exchange(
    stream: TcpStream,
    seed: u64,
    len: usize,
) -> std::io::Result<(Vec<u8>, usize)> {
    let (mut rd, mut wr) = stream.into_split();
    let writer = async move {
        let mut p = Pattern::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len());
            p.fill(&mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            left -= n;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(wr)
    };
    let reader = async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n;
        }
        Ok::<_, std::io::Error>((h.finalize().to_vec(), total))
    };
    let (w, r) = tokio::try_join!(writer, reader)?;
    drop(w);
    Ok(r)
}

/// Accepts one connection and runs [`exchange`] on it; also returns the peer address.
pub async fn exchange_server(
    listener: TcpListener,
    seed: u64,
    len: usize,
) -> std::io::Result<(Vec<u8>, usize, SocketAddr)> {
    let (s, peer) = listener.accept().await?;
    let (d, n) = exchange(s, seed, len).await?;
    Ok((d, n, peer))
}

/// Accepts connections forever, holding each open until the peer closes it.
pub async fn hold_server(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let _ = s.write_all(&buf[..n]).await;
            }
        });
    }
}

/// Binds a listener on all addresses of the current namespace.
pub async fn listen(port: u16) -> TcpListener {
    TcpListener::bind(("0.0.0.0", port))
        .await
        .expect("bind test app")
}

/// Accepts one connection on `l`, reads it to its end, echoes what it read and half-closes;
/// returns what it read.
pub async fn echo_once(l: TcpListener) -> std::io::Result<Vec<u8>> {
    echo_one(&l).await
}

/// Accepts one connection on `l` and echoes it as bytes arrive, until it ends.
pub async fn echo_interactive(l: TcpListener) {
    let (s, _) = l.accept().await.expect("accept");
    let (mut r, mut w) = s.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

/// Like [`echo_once`], on a listener the caller keeps.
pub async fn echo_one(l: &TcpListener) -> std::io::Result<Vec<u8>> {
    let (mut s, _) = l.accept().await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    s.write_all(&got).await?;
    s.shutdown().await?;
    Ok(got)
}

/// Connects to `ip:port`, sends `msg`, half-closes, and reads the answer to its end.
pub async fn send_and_read(ip: &str, port: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect((ip, port)).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    Ok(back)
}

/// Answers every connection on `l` with the peer's address, until the task is dropped (bound
/// on `[::]` by [`crate::netns::Netns::serve_dual`], it takes both address families).
pub async fn whoami_server(l: TcpListener) {
    loop {
        let Ok((mut s, peer)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b).await;
            let _ = s
                .write_all(peer.ip().to_canonical().to_string().as_bytes())
                .await;
        });
    }
}

/// Connects to `ip:port`, sends `msg` and reads the answer to its end (3 s for each): with
/// [`whoami_server`], the address the application saw. No answer is an error.
pub async fn whoami(ip: &str, port: u16, msg: &str) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    use std::time::Duration;
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect((ip, port)))
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "connect timed out"))??;
    s.write_all(msg.as_bytes()).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out))
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "read timed out"))??;
    if out.is_empty() {
        return Err(Error::new(ErrorKind::UnexpectedEof, "no answer"));
    }
    Ok(out)
}

/// Opens `n` connections to `ip:port` at once, proves each end to end with a one-byte round
/// trip (the server echoes, as [`hold_server`] does), and returns them open.
pub async fn open_held(ip: &str, port: u16, n: usize) -> std::io::Result<Vec<TcpStream>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let ip = ip.to_owned();
        set.spawn(async move {
            let mut s = TcpStream::connect((ip.as_str(), port)).await?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(s)
        });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        conns.push(r.expect("join")?);
    }
    Ok(conns)
}
