//! The server's side of one tunnel request, on either transport: it is answered once, with a
//! refusal (a status, no body, the stream closed) or with `200`, after which its stream is
//! the tunnel ([`TunnelStream`], copied by [`super::copy_tunnel`]). The inbound proxy
//! decides and copies without knowing which transport carried the request.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};

use super::quic;
use super::server::ServerConn;
use super::TunnelStream;

/// A received tunnel request's pending answer.
pub enum Answer {
    /// An HTTP/2 `CONNECT` stream: its response handle, its request body, and its
    /// connection.
    H2 {
        respond: h2::server::SendResponse<Bytes>,
        body: h2::RecvStream,
        conn: Arc<ServerConn>,
    },
    /// A QUIC stream whose request header has been read, and its connection.
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        conn: Arc<quic::ServerConn>,
    },
}

/// Why a `200` could not be sent: the peer reset or closed the stream first.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("answering the stream: {0}")]
    H2(#[from] h2::Error),
    #[error("answering the stream (QUIC): {0}")]
    Quic(#[from] quinn::WriteError),
}

impl Answer {
    /// Refuses the request with `status`.
    pub async fn refuse(self, status: StatusCode) {
        match self {
            Answer::H2 { respond, .. } => super::server::refuse(respond, status),
            Answer::Quic {
                mut send, mut recv, ..
            } => {
                let _ = quic::respond(&mut send, &mut recv, status).await;
            }
        }
    }

    /// Admits the request with `ok` (a `200`; its headers go out on HTTP/2, where the
    /// response has headers) and returns the stream that is now the tunnel.
    pub async fn accept(self, ok: Response<()>) -> Result<TunnelStream, AnswerError> {
        match self {
            Answer::H2 {
                mut respond,
                body,
                conn,
            } => {
                let send = respond.send_response(ok, false)?;
                conn.admit();
                Ok(TunnelStream::H2 {
                    send,
                    recv: body,
                    outflow: Some(conn.outflow.clone()),
                })
            }
            Answer::Quic {
                mut send,
                mut recv,
                conn,
            } => {
                quic::respond(&mut send, &mut recv, StatusCode::OK).await?;
                let window = Some(conn.admit());
                Ok(TunnelStream::Quic { send, recv, window })
            }
        }
    }
}
