//! Fuzzes an enrollment request: the frame body an unauthenticated peer sends after its
//! Hello. The coordinator (`coordinator/src/transport/server.rs`: `enroll_session`,
//! `enroll`; `pki.rs`: `sign_client`) decodes it as a `ClientMsg`, parses an `Enroll`'s
//! token with `EnrollToken::parse`, derives the client id from the CSR's fingerprint and
//! signs the CSR with rcgen. That code lives in the burn-heavy coordinator crate, so this
//! target runs the same SDK and rcgen calls itself (minus the token file and the store).
//! Nothing may panic; an accepted token must be canonical and print/parse to itself.
#![no_main]

use std::sync::OnceLock;

use crosslm_sdk::protocol::ClientMsg;
use crosslm_sdk::protocol::frame::decode;
use crosslm_sdk::transport::EnrollToken;
use crosslm_sdk::transport::tls::fingerprint;
use libfuzzer_sys::fuzz_target;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair,
};
use rustls_pki_types::CertificateSigningRequestDer;

/// A CA like the coordinator's, made once.
fn issuer() -> &'static Issuer<'static, KeyPair> {
    static CA: OnceLock<Issuer<'static, KeyPair>> = OnceLock::new();
    CA.get_or_init(|| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let cert = params.self_signed(&key).unwrap();
        Issuer::from_ca_cert_der(cert.der(), key).unwrap()
    })
}

fuzz_target!(|body: &[u8]| {
    let Ok(ClientMsg::Enroll { token, csr_der }) = decode::<ClientMsg>(body) else {
        return;
    };
    if let Ok(t) = EnrollToken::parse(&token) {
        let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        assert!(t.secret.len() >= 16 && hex(&t.secret), "{t:?}");
        assert!(
            t.ca_fingerprint.len() == 64 && hex(&t.ca_fingerprint),
            "{t:?}"
        );
        assert_eq!(EnrollToken::parse(&t.to_string()).expect("reparse"), t);
    }
    let client_id = format!("client-{}", &fingerprint(&csr_der)[..12]);
    let Ok(mut csr) =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
    else {
        return;
    };
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, client_id);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2028, 1, 1);
    csr.params = params;
    let _ = csr.signed_by(issuer());
});
