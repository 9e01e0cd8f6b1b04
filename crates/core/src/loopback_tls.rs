//! Loopback HTTPS for tests and the benchmark (feature `loopback-tls`, never in the shipped
//! binaries): a throwaway CA, a certificate for `localhost` and 127.0.0.1 signed by it, and a
//! listener that lets `axum::serve` speak TLS with ALPN `h2` and `http/1.1`. Workers trust the CA
//! through `HOOKFLEET_CA_CERTIFICATES`; nothing else does.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A CA made for one process, and the server side of a loopback certificate it signed.
#[derive(Clone)]
pub struct LoopbackTls {
    /// The CA certificate, PEM: what a worker's `HOOKFLEET_CA_CERTIFICATES` file holds.
    pub ca_pem: String,
    /// The same certificate, DER: what `ClientOptions::extra_root_certificates` takes.
    pub ca_der: CertificateDer<'static>,
    acceptor: TlsAcceptor,
}

/// Why a throwaway PKI could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoopbackTlsError {
    #[error("cannot make the loopback certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot configure loopback TLS: {0}")]
    Tls(#[from] rustls::Error),
}

impl LoopbackTls {
    pub fn generate() -> Result<Self, LoopbackTlsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "hookfleet loopback test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate()?;
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { ca_pem: ca.pem(), ca_der: ca.der().clone(), acceptor: TlsAcceptor::from(Arc::new(server)) })
    }

    /// The server side: completes handshakes with the loopback certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Writes the CA certificate to `dir/loopback-ca.pem` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> io::Result<PathBuf> {
        let path = dir.join("loopback-ca.pem");
        std::fs::write(&path, &self.ca_pem)?;
        Ok(path)
    }

    /// A listener on an ephemeral loopback port for `axum::serve`.
    pub async fn bind(&self) -> io::Result<TlsListener> {
        let tcp = TcpListener::bind("127.0.0.1:0").await?;
        Ok(TlsListener { tcp, acceptor: self.acceptor.clone() })
    }
}

/// Accepts TCP connections and completes their TLS handshake; a failed handshake (a client that
/// does not trust the CA) is dropped and the next connection accepted.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, peer)) = self.tcp.accept().await else {
                // Out of descriptors or similar: give it a moment rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            // As receivers do: HTTP/2 writes small frames, which Nagle's algorithm would hold
            // back for the peer's delayed ACK.
            let _ = stream.set_nodelay(true);
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
