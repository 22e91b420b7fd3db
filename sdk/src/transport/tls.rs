//! TLS for the client side: the enrolled identity on disk, and rustls configurations for
//! enrollment (coordinator CA pinned by the token) and for mutual-TLS sessions.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

use crate::error::SessionError;
use crate::{Error, Result};

/// The name every coordinator certificate carries and every client asks for. The PKI is
/// private to one deployment, so a fixed name works whatever address the coordinator has.
pub const SERVER_NAME: &str = "crosslm-coordinator";

/// ALPN protocol id of crosslm over QUIC.
pub const ALPN: &[u8] = b"crosslm/1";

/// The crypto provider used everywhere (ring builds cleanly with no C toolchain quirks).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER blob, lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A one-time enrollment token: a secret plus the fingerprint of the coordinator's CA, so a
/// client can authenticate the coordinator before it has any certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollToken {
    /// The secret (hex).
    pub secret: String,
    /// SHA-256 of the coordinator CA certificate (hex).
    pub ca_fingerprint: String,
}

impl EnrollToken {
    /// Parses `xlm1.<secret>.<ca-fingerprint>`.
    pub fn parse(s: &str) -> Result<Self> {
        let mut parts = s.trim().split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("xlm1"), Some(secret), Some(fp), None)
                if secret.len() >= 16
                    && fp.len() == 64
                    && secret.chars().chain(fp.chars()).all(|c| c.is_ascii_hexdigit()) =>
            {
                Ok(Self { secret: secret.to_ascii_lowercase(), ca_fingerprint: fp.to_ascii_lowercase() })
            }
            _ => Err(Error::Enroll(
                "malformed token: expected xlm1.<secret>.<ca-fingerprint> as printed by the coordinator"
                    .into(),
            )),
        }
    }
}

impl std::fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "xlm1.{}.{}", self.secret, self.ca_fingerprint)
    }
}

/// What a client keeps after enrollment: its certificate and key, and the coordinator CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    /// The id the coordinator assigned.
    pub client_id: String,
    /// DER of the client certificate.
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER of the client's private key (never leaves the device).
    pub key_der: Vec<u8>,
    /// DER of the coordinator's CA certificate.
    pub ca_der: Vec<u8>,
}

impl Identity {
    const FILE: &'static str = "identity.json";

    /// Path of the identity file in a data dir.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(Self::FILE)
    }

    /// Loads the identity from `data_dir`.
    pub fn load(data_dir: &Path) -> Result<Self> {
        let path = Self::path(data_dir);
        let bytes = std::fs::read(&path).map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::Enroll(format!(
                "{}: corrupt identity file ({e}); enroll again",
                path.display()
            ))
        })
    }

    /// Saves the identity into `data_dir` (owner-only permissions on Unix).
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::File {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = Self::path(data_dir);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Enroll(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(|source| Error::File {
            path: tmp.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600));
        }
        std::fs::rename(&tmp, &path).map_err(|source| Error::File { path, source })?;
        Ok(())
    }
}

fn tls13_client_builder()
-> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Session(SessionError::Tls(e.to_string())))
}

fn quic_client(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Session(SessionError::Tls(format!("QUIC: {e}"))))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config(DEFAULT_IDLE_TIMEOUT)));
    Ok(cfg)
}

/// Default QUIC idle timeout: how long a silent peer (a killed client) takes to be noticed.
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// QUIC transport settings shared by both ends: keep-alives so an idle client in a long
/// round is not dropped, and an idle timeout so a vanished peer is noticed. The effective
/// idle timeout is the smaller of the two peers'.
pub fn transport_config(idle_timeout: std::time::Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    // Bulk sample batches: a larger window than the default keeps loopback and LAN links full.
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    t
}

/// Client config for a mutual-TLS session with an enrolled identity.
pub fn session_config(id: &Identity) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(id.ca_der.clone()))
        .map_err(|e| Error::Enroll(format!("bad CA certificate in identity: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_der.clone()));
    let tls = tls13_client_builder()?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![CertificateDer::from(id.cert_der.clone())], key)
        .map_err(|e| Error::Enroll(format!("bad client certificate or key: {e}")))?;
    quic_client(tls)
}

/// Client config for enrollment: no client certificate; the server must present a chain
/// ending in the CA whose fingerprint the token carries.
pub fn enroll_config(token: &EnrollToken) -> Result<quinn::ClientConfig> {
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: token.ca_fingerprint.clone(),
        provider: provider(),
    });
    let tls = tls13_client_builder()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    quic_client(tls)
}

/// Client config without any certificate that trusts a given CA: what an unenrolled or
/// misconfigured client presents. Used by tools and tests.
pub fn anonymous_config(ca_der: &[u8]) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| Error::Session(SessionError::Tls(format!("bad CA certificate: {e}"))))?;
    let tls = tls13_client_builder()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    quic_client(tls)
}

/// Trusts a server chain whose root is the CA with a pinned SHA-256, then verifies the
/// server certificate against that CA like any web PKI chain.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c.as_ref()) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "coordinator CA does not match the token's fingerprint".to_string(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A fresh key pair and a CSR for it: the key stays on the device, the CSR goes to the
/// coordinator.
pub fn new_key_and_csr(name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let key =
        rcgen::KeyPair::generate().map_err(|e| Error::Enroll(format!("key generation: {e}")))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| Error::Enroll(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Error::Enroll(format!("CSR: {e}")))?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_roundtrip_and_rejects_garbage() {
        let t = EnrollToken {
            secret: "ab".repeat(16),
            ca_fingerprint: "cd".repeat(32),
        };
        assert_eq!(EnrollToken::parse(&t.to_string()).unwrap(), t);
        for bad in [
            "",
            "xlm1",
            "xlm2.abababababababababab.cd",
            "xlm1.zz.cd",
            &format!("xlm1.{}.{}", "ab".repeat(16), "cd".repeat(31)),
        ] {
            assert!(EnrollToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn corrupt_identity_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Identity::path(dir.path()), b"{not json").unwrap();
        let err = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt identity"), "{err}");
    }

    #[test]
    fn csr_is_generated() {
        let (key, csr) = new_key_and_csr("phone-1").unwrap();
        assert!(!key.is_empty() && !csr.is_empty());
    }
}
