//! Mutual TLS where a peer is known by the SHA-256 of its certificate: terminals at the daemon,
//! sites at headquarters. The pin is the whole trust decision, no CA is involved.
//!
//! Owns: the client-certificate check and the TLS 1.3 server configuration built on it.
//! Never: reads a protocol byte of a peer whose certificate is not pinned (the handshake fails).

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// Called with the fingerprint of each certificate refused, so the refusal can be recorded.
pub type OnRefused = Arc<dyn Fn([u8; 32]) + Send + Sync>;

/// Accepts only client certificates whose SHA-256 (of the DER) is pinned.
struct PinnedClients {
    pins: Vec<[u8; 32]>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    on_refused: Option<OnRefused>,
}

impl std::fmt::Debug for PinnedClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedClients")
            .field("pins", &self.pins.len())
            .finish()
    }
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if self.pins.contains(&fp) {
            Ok(ClientCertVerified::assertion())
        } else {
            if let Some(f) = &self.on_refused {
                f(fp);
            }
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// SHA-256 of a certificate's DER: the pin.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// A certificate chain and its key, from PEM files.
fn identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read the key {}: {e}", key.display()))?;
    Ok((chain, key))
}

/// A TLS server configuration for browsers (TLS 1.3 and 1.2, HTTP/1.1), with this certificate
/// chain and key (PEM files), asking no client certificate: the auditors' console.
pub fn browser_server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    let (chain, key) = identity(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the listener's certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A TLS 1.3 server configuration with this certificate chain and key (PEM files) that accepts
/// only the pinned client certificates.
pub fn pinned_server_config(
    cert: &Path,
    key: &Path,
    pins: Vec<[u8; 32]>,
    on_refused: Option<OnRefused>,
) -> Result<rustls::ServerConfig, String> {
    let (chain, key) = identity(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedClients {
        pins,
        algorithms: provider.signature_verification_algorithms,
        on_refused,
    };
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(|e| format!("the listener's certificate and key: {e}"))
}

/// A TLS 1.3 client configuration that trusts the CA certificates in `ca` (PEM) and, with
/// `identity` (certificate chain and key, PEM files), presents that client certificate.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("cannot read the CA certificates {}: {e}", ca.display()))?
    {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let Some((cert, key)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let (chain, key) = self::identity(cert, key)?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the client certificate and key: {e}"))
}
