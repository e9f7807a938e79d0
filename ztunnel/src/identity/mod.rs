//! Workload identity: SPIFFE IDs ([`Identity`]), workload certificates ([`WorkloadCert`]) with
//! keys generated on the node, their issuance and renewal ([`CertManager`] over a
//! [`CertSigner`]), the mutual-TLS configurations that carry them ([`tls`]), and the
//! revocation lists they check peers against ([`crl`]).

mod cert;
pub mod crl;
mod leaf;
mod manager;
mod spiffe;
pub mod tls;

use std::future::Future;
use std::pin::Pin;

pub use cert::{generate_csr, parse_pem_certs, root_store, KeyAndCsr, WorkloadCert};
pub use leaf::{leaf_identities, leaf_identity_in};
pub use manager::CertManager;
pub use spiffe::{Identity, ParseError};
pub use tls::peer_identity;

use ztunnel_proto::ca::{SignRequest, SignResponse};

/// Errors about certificates and their TLS use.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("identity: {0}")]
    Identity(#[from] ParseError),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("the trust bundle has no root")]
    NoRoots,
    #[error("key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("signing: {0}")]
    Sign(#[from] SignError),
}

impl From<rustls::Error> for Error {
    fn from(e: rustls::Error) -> Self {
        Error::Tls(e.to_string())
    }
}

/// Why a signer did not sign.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignError {
    #[error("refused by the CA ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("CA unreachable: {0}")]
    Transport(String),
    #[error("{0}")]
    Invalid(String),
}

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that signs workload CSRs: the in-process CA or a remote `ztunnel ca`.
pub trait CertSigner: Send + Sync + 'static {
    fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<SignResponse, SignError>>;
}
