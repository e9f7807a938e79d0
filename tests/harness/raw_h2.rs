//! A hand-written HTTP/2 client for the one request no HTTP/2 library will send: a `CONNECT`
//! carrying `:scheme` and `:path`, which RFC 9113 §8.5 calls malformed. It speaks just enough
//! of the protocol (preface, SETTINGS, one HEADERS frame with literal HPACK fields) to send
//! it over a real TLS connection and read what the server does with stream 1.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the server did with the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// RST_STREAM with this error code.
    Reset(u32),
    /// A response HEADERS frame; the first byte of its header block.
    Headers(Vec<u8>),
    /// GOAWAY with this error code.
    GoAway(u32),
}

fn literal(name: &str, value: &str, out: &mut Vec<u8>) {
    // Literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends one request with the given header fields on stream 1 and reports the outcome.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    fields: &[(&str, &str)],
) -> std::io::Result<Outcome> {
    let mut block = Vec::new();
    for (n, v) in fields {
        literal(n, v, &mut block);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    io.write_all(&out).await?;
    loop {
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await?;
        match (kind, stream) {
            (0x4, 0) if flags & 0x1 == 0 => io.write_all(&frame(0x4, 0x1, 0, &[])).await?, // ACK
            (0x3, 1) => {
                return Ok(Outcome::Reset(u32::from_be_bytes(
                    payload[..4].try_into().unwrap(),
                )))
            }
            (0x1, 1) => return Ok(Outcome::Headers(payload)),
            (0x7, _) => {
                return Ok(Outcome::GoAway(u32::from_be_bytes(
                    payload[4..8].try_into().unwrap(),
                )))
            }
            _ => {}
        }
    }
}
