//! The header of an HBONE stream carried over QUIC (UDP 15008), version 1.
//!
//! Each proxied TCP connection is one bidirectional QUIC stream. The stream opens with a
//! request header carrying what an HTTP/2 `CONNECT` carries; the server answers with a
//! response header carrying the status a `CONNECT` would get (`200`, `400`, `401`, `503`).
//! After a `200` the stream carries the connection's bytes; a QUIC FIN is a TCP half-close,
//! both ways. After any other status the server finishes its side and the client must not
//! send more. ALPN is [`ALPN`]; TLS and identity checks are those of the HTTP/2 tunnel.
//!
//! ```text
//! request:  version u8 (= 1) | length u16 BE (of the fields, ≤ MAX_FIELDS_LEN)
//!           | fields: { key u8 | length u16 BE | value }*
//!   keys:   1 authority "ip:port" / "[ip6]:port" (required), 2 forwarded (`for="ip:port"`),
//!           3 baggage, 4 traceparent; each at most once; values are visible ASCII or space
//! response: version u8 (= 1) | status u16 BE
//! ```
//!
//! Decoding fails closed: an unknown version, an over-long header, an unknown or repeated
//! key, a missing authority, a truncated field or a value outside visible ASCII is an error
//! (answered `400` by a server).
//!
//! A stream ended early is reset (and stopped) with an application error code:
//! [`STREAM_RESET`] when its copy failed or was cut short, [`STREAM_REFUSED`] when the server
//! did not process it because it drains. A refused stream's request may be sent again on
//! another connection, and the client opens no more streams on the refusing one (as after an
//! HTTP/2 `GOAWAY`).

/// ALPN protocol of the QUIC transport.
pub const ALPN: &[u8] = b"hbone-quic/1";
/// The only version this code speaks.
pub const VERSION: u8 = 1;
/// Upper bound of a request header's fields (a server refuses longer ones).
pub const MAX_FIELDS_LEN: usize = 8 * 1024;
/// Length of the fixed prefix of a request header (version and length).
pub const PREFIX_LEN: usize = 3;
/// Length of a response header.
pub const RESPONSE_LEN: usize = 3;
/// Application error code of a stream reset because its copy failed or was cut short.
pub const STREAM_RESET: u32 = 1;
/// Application error code of a stream the server did not process (it drains): it may be sent
/// again on another connection.
pub const STREAM_REFUSED: u32 = 2;

const KEY_AUTHORITY: u8 = 1;
const KEY_FORWARDED: u8 = 2;
const KEY_BAGGAGE: u8 = 3;
const KEY_TRACEPARENT: u8 = 4;

/// What a stream's request header carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    pub authority: String,
    pub forwarded: Option<String>,
    pub baggage: Option<String>,
    pub traceparent: Option<String>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("unsupported stream header version {0}")]
    Version(u8),
    #[error("stream header of {0} bytes is over the limit of {MAX_FIELDS_LEN}")]
    TooLong(usize),
    #[error("stream header truncated")]
    Truncated,
    #[error("unknown stream header field {0}")]
    UnknownKey(u8),
    #[error("stream header field {0} repeated")]
    Repeated(u8),
    #[error("stream header field {0} is not visible ASCII")]
    BadValue(u8),
    #[error("stream header has no authority")]
    NoAuthority,
}

impl RequestHeader {
    /// Encodes the header, or `TooLong` when its fields exceed [`MAX_FIELDS_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let fields = [
            (KEY_AUTHORITY, Some(self.authority.as_str())),
            (KEY_FORWARDED, self.forwarded.as_deref()),
            (KEY_BAGGAGE, self.baggage.as_deref()),
            (KEY_TRACEPARENT, self.traceparent.as_deref()),
        ];
        let mut body = Vec::with_capacity(64);
        for (key, value) in fields {
            let Some(v) = value else { continue };
            if !v.bytes().all(visible) {
                return Err(HeaderError::BadValue(key));
            }
            let len = u16::try_from(v.len()).map_err(|_| HeaderError::TooLong(v.len()))?;
            body.push(key);
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(v.as_bytes());
        }
        if body.len() > MAX_FIELDS_LEN {
            return Err(HeaderError::TooLong(body.len()));
        }
        let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
        out.push(VERSION);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Reads the fixed prefix: the length of the fields that follow it.
    pub fn fields_len(prefix: [u8; PREFIX_LEN]) -> Result<usize, HeaderError> {
        if prefix[0] != VERSION {
            return Err(HeaderError::Version(prefix[0]));
        }
        let len = u16::from_be_bytes([prefix[1], prefix[2]]) as usize;
        if len > MAX_FIELDS_LEN {
            return Err(HeaderError::TooLong(len));
        }
        Ok(len)
    }

    /// Decodes the fields (the bytes after the prefix, exactly as long as it said).
    pub fn decode_fields(mut b: &[u8]) -> Result<RequestHeader, HeaderError> {
        let mut h = RequestHeader::default();
        let mut authority = None;
        while !b.is_empty() {
            if b.len() < 3 {
                return Err(HeaderError::Truncated);
            }
            let key = b[0];
            let len = u16::from_be_bytes([b[1], b[2]]) as usize;
            let value = b.get(3..3 + len).ok_or(HeaderError::Truncated)?;
            b = &b[3 + len..];
            if !value.iter().copied().all(visible) {
                return Err(HeaderError::BadValue(key));
            }
            // Visible ASCII is UTF-8.
            let value =
                String::from_utf8(value.to_vec()).map_err(|_| HeaderError::BadValue(key))?;
            let slot = match key {
                KEY_AUTHORITY => &mut authority,
                KEY_FORWARDED => &mut h.forwarded,
                KEY_BAGGAGE => &mut h.baggage,
                KEY_TRACEPARENT => &mut h.traceparent,
                other => return Err(HeaderError::UnknownKey(other)),
            };
            if slot.replace(value).is_some() {
                return Err(HeaderError::Repeated(key));
            }
        }
        h.authority = authority.ok_or(HeaderError::NoAuthority)?;
        Ok(h)
    }
}

/// Encodes a response header with `status`.
pub fn encode_response(status: u16) -> [u8; RESPONSE_LEN] {
    let s = status.to_be_bytes();
    [VERSION, s[0], s[1]]
}

/// Decodes a response header: the status.
pub fn decode_response(b: [u8; RESPONSE_LEN]) -> Result<u16, HeaderError> {
    if b[0] != VERSION {
        return Err(HeaderError::Version(b[0]));
    }
    Ok(u16::from_be_bytes([b[1], b[2]]))
}

fn visible(c: u8) -> bool {
    (0x20..0x7f).contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> RequestHeader {
        RequestHeader {
            authority: "[fd00::2]:8080".into(),
            forwarded: Some("for=\"10.0.0.1:3456\"".into()),
            baggage: Some("k8s.namespace.name=a".into()),
            traceparent: None,
        }
    }

    fn decode(b: &[u8]) -> Result<RequestHeader, HeaderError> {
        let len = RequestHeader::fields_len([b[0], b[1], b[2]])?;
        let fields = b.get(PREFIX_LEN..).ok_or(HeaderError::Truncated)?;
        if fields.len() != len {
            return Err(HeaderError::Truncated);
        }
        RequestHeader::decode_fields(fields)
    }

    #[test]
    fn round_trip() {
        let h = full();
        let b = h.encode().unwrap();
        assert_eq!(b[0], VERSION);
        assert_eq!(decode(&b).unwrap(), h);
        let only = RequestHeader {
            authority: "10.0.0.2:80".into(),
            ..Default::default()
        };
        let b = only.encode().unwrap();
        assert_eq!(
            b,
            [
                1, 0, 14, 1, 0, 11, b'1', b'0', b'.', b'0', b'.', b'0', b'.', b'2', b':', b'8',
                b'0'
            ]
        );
        assert_eq!(decode(&b).unwrap(), only);
        assert_eq!(decode_response(encode_response(503)), Ok(503));
        assert_eq!(decode_response([2, 0, 200]), Err(HeaderError::Version(2)));
    }

    #[test]
    fn refusals() {
        let field = |k: u8, v: &[u8]| {
            let mut f = vec![k];
            f.extend_from_slice(&(v.len() as u16).to_be_bytes());
            f.extend_from_slice(v);
            f
        };
        let auth = field(1, b"10.0.0.2:80");
        let cases: Vec<(Vec<u8>, HeaderError)> = vec![
            ([field(2, b"for=x")].concat(), HeaderError::NoAuthority),
            (
                [auth.clone(), auth.clone()].concat(),
                HeaderError::Repeated(1),
            ),
            (
                [auth.clone(), field(9, b"x")].concat(),
                HeaderError::UnknownKey(9),
            ),
            (
                [auth.clone(), field(3, b"a\nb")].concat(),
                HeaderError::BadValue(3),
            ),
            (
                [auth.clone(), field(3, &[0xc3, 0xa9])].concat(),
                HeaderError::BadValue(3),
            ),
            (auth[..auth.len() - 1].to_vec(), HeaderError::Truncated),
            ([auth.clone(), vec![4, 0]].concat(), HeaderError::Truncated),
        ];
        for (fields, want) in cases {
            assert_eq!(
                RequestHeader::decode_fields(&fields),
                Err(want.clone()),
                "{want}"
            );
        }
        assert_eq!(
            RequestHeader::fields_len([0, 0, 1]),
            Err(HeaderError::Version(0))
        );
        assert_eq!(
            RequestHeader::fields_len([1, 0x20, 0x01]),
            Err(HeaderError::TooLong(0x2001))
        );
        let long = RequestHeader {
            authority: "10.0.0.2:80".into(),
            baggage: Some("x".repeat(MAX_FIELDS_LEN)),
            ..Default::default()
        };
        assert!(matches!(long.encode(), Err(HeaderError::TooLong(_))));
        let bad = RequestHeader {
            authority: "10.0.0.2:80\r\n".into(),
            ..Default::default()
        };
        assert_eq!(bad.encode(), Err(HeaderError::BadValue(1)));
    }
}
