//! The coordinator's own certificate authority: created on first start, kept in the data
//! dir, used to sign the server certificate and the clients' enrollment requests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crosslm_sdk::transport::tls::{self, ALPN, SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};

use crate::{Error, Result};

/// Validity of client certificates, in whole years after this one.
const CLIENT_CERT_YEARS: i32 = 2;

/// CA + server identity of one coordinator.
pub struct Pki {
    ca_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    server_der: Vec<u8>,
    server_key_der: Vec<u8>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })
}

fn write_secret(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| Error::File {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(())
}

fn pki_err(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Pki(format!("{what}: {e}"))
}

impl Pki {
    /// Loads the CA from `dir/pki/`, creating it (and the server certificate) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let pki_dir = dir.join("pki");
        std::fs::create_dir_all(&pki_dir).map_err(|source| Error::File {
            path: pki_dir.clone(),
            source,
        })?;
        let p = |n: &str| -> PathBuf { pki_dir.join(n) };
        if !p("ca.pem").exists() {
            tracing::info!(dir = %pki_dir.display(), "creating the coordinator CA");
            let key = KeyPair::generate().map_err(pki_err("CA key"))?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("CA"))?;
            params
                .distinguished_name
                .push(DnType::CommonName, "crosslm coordinator CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = rcgen::date_time_ymd(2024, 1, 1);
            params.not_after = rcgen::date_time_ymd(2124, 1, 1);
            let cert = params.self_signed(&key).map_err(pki_err("CA"))?;
            write_secret(&p("ca.key"), &key.serialize_pem())?;
            std::fs::write(p("ca.pem"), cert.pem()).map_err(|source| Error::File {
                path: p("ca.pem"),
                source,
            })?;
            // A new CA invalidates any old server certificate.
            let _ = std::fs::remove_file(p("server.pem"));
        }
        let ca_key = KeyPair::from_pem(&read(&p("ca.key"))?)
            .map_err(|e| Error::Pki(format!("{}: {e}", p("ca.key").display())))?;
        let ca_pem = read(&p("ca.pem"))?;
        let ca_der = pem_to_der(&ca_pem, &p("ca.pem"))?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca_der.clone()), ca_key)
            .map_err(|e| Error::Pki(format!("{}: {e}", p("ca.pem").display())))?;

        if !p("server.pem").exists() {
            let key = KeyPair::generate().map_err(pki_err("server key"))?;
            let mut params =
                CertificateParams::new(vec![SERVER_NAME.to_string(), "localhost".to_string()])
                    .map_err(pki_err("server"))?;
            params
                .distinguished_name
                .push(DnType::CommonName, SERVER_NAME);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.not_before = rcgen::date_time_ymd(2024, 1, 1);
            params.not_after = rcgen::date_time_ymd(2124, 1, 1);
            let cert = params.signed_by(&key, &issuer).map_err(pki_err("server"))?;
            write_secret(&p("server.key"), &key.serialize_pem())?;
            std::fs::write(p("server.pem"), cert.pem()).map_err(|source| Error::File {
                path: p("server.pem"),
                source,
            })?;
        }
        let server_der = pem_to_der(&read(&p("server.pem"))?, &p("server.pem"))?;
        let server_key = KeyPair::from_pem(&read(&p("server.key"))?)
            .map_err(|e| Error::Pki(format!("{}: {e}", p("server.key").display())))?;
        Ok(Self {
            ca_der,
            issuer,
            server_der,
            server_key_der: server_key.serialize_der(),
        })
    }

    /// DER of the CA certificate.
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// SHA-256 fingerprint of the CA certificate (what enrollment tokens pin).
    pub fn ca_fingerprint(&self) -> String {
        tls::fingerprint(&self.ca_der)
    }

    /// Signs a client's CSR, with the coordinator-chosen `client_id` as its name.
    /// Whatever names or extensions the CSR asked for are ignored.
    pub fn sign_client(&self, csr_der: &[u8], client_id: &str) -> Result<Vec<u8>> {
        let mut csr = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr_der.to_vec()),
        )
        .map_err(|e| Error::Pki(format!("invalid certificate signing request: {e}")))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("client"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, client_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(this_year() + CLIENT_CERT_YEARS, 1, 1);
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(pki_err("signing client certificate"))?;
        Ok(cert.der().to_vec())
    }

    /// QUIC server configuration: our certificate chain, and a client verifier that
    /// accepts certificates of our CA and also lets certificate-less clients in, so they can
    /// enroll; the session layer refuses them anything else.
    pub fn server_config(&self, idle_timeout: std::time::Duration) -> Result<quinn::ServerConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .map_err(|e| Error::Pki(e.to_string()))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            tls::provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Pki(format!("client verifier: {e}")))?;
        let chain = vec![
            CertificateDer::from(self.server_der.clone()),
            CertificateDer::from(self.ca_der.clone()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()));
        let mut tls_cfg = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Pki(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| Error::Pki(format!("server certificate: {e}")))?;
        tls_cfg.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls_cfg)
            .map_err(|e| Error::Pki(format!("QUIC TLS: {e}")))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        let mut transport = tls::transport_config(idle_timeout);
        // A session is one bidirectional stream the client opens; a peer gets no room for
        // more (a stream it opens and never writes on is closed by the hello timeout).
        transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
        transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        cfg.transport_config(Arc::new(transport));
        Ok(cfg)
    }
}

/// The current calendar year (approximate at year boundaries, which is fine for validity).
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn pem_to_der(pem: &str, path: &Path) -> Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| Error::Pki(format!("{}: not a PEM certificate ({e})", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_across_loads_and_signs_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path()).unwrap();
        let b = Pki::load_or_create(dir.path()).unwrap();
        assert_eq!(a.ca_fingerprint(), b.ca_fingerprint());
        let (_key, csr) = tls::new_key_and_csr("phone").unwrap();
        let cert = b.sign_client(&csr, "client-1").unwrap();
        assert!(!cert.is_empty());
        assert!(b.sign_client(b"not a csr", "x").is_err());
        b.server_config(std::time::Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn corrupt_ca_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        Pki::load_or_create(dir.path()).unwrap();
        std::fs::write(dir.path().join("pki/ca.key"), "garbage").unwrap();
        let err = Pki::load_or_create(dir.path()).err().unwrap().to_string();
        assert!(err.contains("ca.key"), "{err}");
    }
}
