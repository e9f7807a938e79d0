//! The tunnel transport of a test bed's daemons, and [`for_each_transport!`](crate::for_each_transport), which writes a
//! test once for both.

use crate::mesh::{Mesh, NodeOptions, B_IP};

/// The tunnel transport between the daemons: HTTP/2 over TLS on TCP 15008, or QUIC on UDP
/// 15008 (the accepting daemon listens on QUIC too, the dialling one dials QUIC first). A test
/// of behaviour both transports must show is written once and run for each
/// ([`crate::for_each_transport`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Http2,
    Quic,
}

impl Transport {
    /// The options of the node-mode bed's `a`, the dialling daemon.
    pub fn client(self) -> NodeOptions {
        match self {
            Transport::Http2 => NodeOptions::default(),
            Transport::Quic => NodeOptions {
                extra_args: vec!["--quic-destinations".into(), B_IP.into()],
                ..Default::default()
            },
        }
    }

    /// The options of the node-mode bed's `b`, the accepting daemon.
    pub fn server(self) -> NodeOptions {
        match self {
            Transport::Http2 => NodeOptions::default(),
            Transport::Quic => NodeOptions {
                extra_args: vec!["--quic-listen".into(), "true".into()],
                ..Default::default()
            },
        }
    }

    /// The default two-node mesh tunnelling on this transport.
    pub fn pair(self) -> Mesh {
        Mesh::builder().a(self.client()).b(self.server()).start()
    }

    /// The environment of every daemon of an in-pod bed ([`crate::testbed::Builder`]): each
    /// listens on QUIC and dials every pod (the pod networks, `fd20::/16` too when
    /// `dual_stack`) on QUIC first.
    pub fn pod_env(self, dual_stack: bool) -> Vec<(String, String)> {
        match self {
            Transport::Http2 => Vec::new(),
            Transport::Quic => {
                let destinations = if dual_stack {
                    "10.20.0.0/16,fd20::/16"
                } else {
                    "10.20.0.0/16"
                };
                vec![
                    ("ZTUNNEL_QUIC_LISTEN".into(), "true".into()),
                    ("ZTUNNEL_QUIC_DESTINATIONS".into(), destinations.into()),
                ]
            }
        }
    }

    /// The counter of the tunnel connections a daemon accepted on this transport.
    pub fn accepted_metric(self) -> &'static str {
        match self {
            Transport::Http2 => "ztunnel_hbone_connections_accepted_total",
            Transport::Quic => "ztunnel_quic_connections_accepted_total",
        }
    }

    /// The other transport.
    pub fn other(self) -> Transport {
        match self {
            Transport::Http2 => Transport::Quic,
            Transport::Quic => Transport::Http2,
        }
    }

    /// The transport as the pool listing (`/config_dump`) names it.
    pub fn pool_name(self) -> &'static str {
        match self {
            Transport::Http2 => "h2",
            Transport::Quic => "quic",
        }
    }

    /// What the accepting daemon logs when a tunnel's TLS handshake fails.
    pub fn handshake_failed_log(self) -> &'static str {
        match self {
            Transport::Http2 => "tunnel TLS handshake failed",
            Transport::Quic => "QUIC tunnel handshake failed",
        }
    }
}

/// Writes a test once for both transports: `fn name(t: Transport) { … }` becomes module `name`
/// with the tests `http2` and `quic`, each running the body with its [`Transport`]. Attributes
/// (the doc comment) go to the module; the body sees the enclosing module's names.
#[macro_export]
macro_rules! for_each_transport {
    ($($(#[$meta:meta])* fn $name:ident($t:ident: Transport) $body:block)*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($t: $crate::transport::Transport) $body

            #[test]
            fn http2() {
                body($crate::transport::Transport::Http2)
            }

            #[test]
            fn quic() {
                body($crate::transport::Transport::Quic)
            }
        }
    )*};
}
