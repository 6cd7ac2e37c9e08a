//! TLS client configurations (rustls with the ring provider) for STARTTLS and implicit TLS.
//!
//! Two configurations are built once, at start: one that verifies the server's certificate
//! chain and name against the Mozilla roots (`webpki-roots`) plus an optional CA file, and one
//! that encrypts without verifying, for opportunistic TLS to MX hosts where, as in Postfix's
//! "may" level, an unverifiable certificate is still better than plaintext. Which one a
//! connection uses is the dispatcher's policy (see `Config::tls_verify`). No I/O happens here
//! after start-up.

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// The two client configurations.
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    pub verifying: Arc<ClientConfig>,
    pub encrypt_only: Arc<ClientConfig>,
}

impl TlsConfigs {
    /// Builds both; `ca_file` (PEM) adds trust anchors to the Mozilla roots.
    pub fn new(ca_file: Option<&Path>) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let invalid = |problem| Error::InvalidConfig {
                key: "tls_ca_file",
                problem,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|_| invalid("cannot read the file as PEM"))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| invalid("the file holds an invalid PEM certificate"))?;
            if certs.is_empty() {
                return Err(invalid("the file holds no certificate"));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|_| invalid("a certificate in the file is not a valid CA"))?;
            }
        }
        let builder = || {
            ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|_| Error::InvalidConfig {
                    key: "tls",
                    problem: "the crypto provider supports no TLS version",
                })
        };
        let verifying = builder()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let encrypt_only = builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly {
                provider: Arc::clone(&provider),
            }))
            .with_no_client_auth();
        Ok(TlsConfigs {
            verifying: Arc::new(verifying),
            encrypt_only: Arc::new(encrypt_only),
        })
    }
}

/// A failed TLS layer in words: what a person reading the outcome needs to know, and whether
/// it was the server's certificate that failed the check (as opposed to the handshake itself,
/// which RFC 7435 lets opportunistic TLS answer with plaintext).
pub fn describe_failure(error: &rustls::Error) -> (String, bool) {
    use rustls::CertificateError as C;
    let certificate = |text: String| (text, true);
    match error {
        rustls::Error::InvalidCertificate(e) => certificate(match e {
            C::UnknownIssuer => {
                "the certificate was issued by an unknown certificate authority (not in the \
                 Mozilla roots nor in tls_ca_file)"
                    .into()
            }
            C::BadEncoding => "the certificate is malformed".into(),
            C::BadSignature => "the certificate's signature does not verify".into(),
            C::Expired | C::ExpiredContext { .. } => format!("certificate expired ({e})"),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("certificate not valid yet ({e})")
            }
            C::Revoked => "the certificate was revoked".into(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the certificate is not for TLS servers".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => e.to_string(),
            C::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
                Some(webpki::Error::CaUsedAsEndEntity) => {
                    "the server's certificate is a CA certificate, not a server certificate".into()
                }
                Some(webpki::Error::EndEntityUsedAsCa) => {
                    "a server certificate was used to sign the chain".into()
                }
                Some(webpki::Error::UnsupportedSignatureAlgorithmContext(_))
                | Some(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => {
                    "the certificate is signed with an algorithm that is not supported".into()
                }
                Some(webpki::Error::PathLenConstraintViolated)
                | Some(webpki::Error::MaximumPathDepthExceeded) => {
                    "the certificate chain is too long for its constraints".into()
                }
                Some(webpki::Error::NameConstraintViolation) => {
                    "the certificate violates its issuer's name constraints".into()
                }
                Some(webpki::Error::UnknownIssuer) => {
                    "the certificate was issued by an unknown certificate authority".into()
                }
                Some(other) => format!("the certificate was refused ({other})"),
                None => format!("the certificate was refused ({other})"),
            },
            other => format!("the certificate was refused ({other})"),
        }),
        rustls::Error::NoCertificatesPresented => {
            certificate("the server presented no certificate".into())
        }
        other => (other.to_string(), false),
    }
}

/// The name sent as SNI and checked against the certificate: a host name or an IP address.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}

/// Accepts any certificate but still checks that the server holds its key (the handshake
/// signatures), so the session is at least encrypted to whoever answered.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
