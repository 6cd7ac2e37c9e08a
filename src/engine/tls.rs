//! TLS client configurations (rustls with the ring provider) for STARTTLS and implicit TLS.
//!
//! Two configurations are built once, at start: one that verifies the server's certificate
//! chain and name against the Mozilla roots (`webpki-roots`) plus an optional CA file, and one
//! that encrypts without verifying, for opportunistic TLS to MX hosts where, as in Postfix's
//! "may" level, an unverifiable certificate is still better than plaintext. Which one a
//! connection uses is the dispatcher's policy (see `Config::tls_verify`), or, per destination,
//! a [`TlsPolicy`] from an override: [`DestinationTls`] is what a destination's sessions do,
//! decided once when the destination is made. No I/O happens here after start-up.

use super::shaping::LimitOverride;
use crate::error::{Error, Result};
use crate::route::mta_sts::StsHost;
use crate::route::Target;
use crate::smtp::{SessionConfig, StartTls};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A destination's TLS level, as Postfix's `smtp_tls_policy_maps` levels (what each checks is
/// in the README's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// Plaintext: STARTTLS is not used even when offered.
    None,
    /// STARTTLS when offered, certificate not checked; plaintext when not offered or when the
    /// handshake fails.
    Opportunistic,
    /// STARTTLS must succeed; the certificate is not checked (encryption only).
    Required,
    /// STARTTLS must succeed with a certificate that chains to a trusted CA and names the MX
    /// host (or relay host) connected to.
    Verify,
    /// As `Verify`, but the certificate must name the recipient domain (RFC 7817-style
    /// "secure" matching; only for an exact `@domain` override).
    Secure,
    /// The recipient domain's MTA-STS policy is `enforce` (RFC 8461): as `Verify`. Never
    /// configured, only found.
    MtaSts,
    /// The recipient domain's MTA-STS policy is `testing` and names this MX host: delivered
    /// under the configured level. Never configured, only found.
    MtaStsTesting,
    /// The recipient domain's MTA-STS policy is `testing` and does not name this MX host:
    /// delivered under the configured level, where `enforce` would have refused it.
    MtaStsTestingMismatch,
}

impl TlsPolicy {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "none" => TlsPolicy::None,
            "opportunistic" | "may" => TlsPolicy::Opportunistic,
            "required" | "encrypt" => TlsPolicy::Required,
            "verify" => TlsPolicy::Verify,
            "secure" => TlsPolicy::Secure,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::Verify => "verify",
            TlsPolicy::Secure => "secure",
            TlsPolicy::MtaSts => "mta-sts",
            TlsPolicy::MtaStsTesting => "mta-sts-testing",
            TlsPolicy::MtaStsTestingMismatch => "mta-sts-testing-mx-mismatch",
        }
    }
}

/// What the sessions of one destination do about TLS.
#[derive(Debug, Clone)]
pub struct DestinationTls {
    /// The session settings with this destination's STARTTLS policy.
    pub session: Arc<SessionConfig>,
    /// Whether the certificate is verified (chain and name).
    pub verify: bool,
    /// The name sent as SNI and checked against the certificate.
    pub name: String,
    /// Extra trust anchors of an override (index in `TlsConfigs::with_ca`).
    pub ca: Option<usize>,
    /// The level in force, named in events.
    pub policy: TlsPolicy,
}

impl DestinationTls {
    /// The TLS of destination `target` (for the recipients of domain override `group`):
    /// the last host override with a `tls_policy`, `tls_ca_file` or credentials, then the
    /// group's, else the dispatcher's settings. Credentials turn verification on unless
    /// `tls_verify` is false: they go only over verified TLS.
    pub fn decide(
        config: &super::Config,
        session: &Arc<SessionConfig>,
        target: &Target,
        group: Option<usize>,
        configs: &TlsConfigs,
    ) -> DestinationTls {
        let overrides = &config.limit_overrides;
        let mut policy = None;
        let mut ca_file = None;
        let mut secure_name = None;
        let mut route_credentials = None;
        let host_overrides = overrides
            .iter()
            .filter(|o| !o.recipient_domain && o.matches(&target.host));
        for o in host_overrides.chain(group.and_then(|g| overrides.get(g))) {
            if let Some(p) = o.tls_policy {
                policy = Some(p);
                if o.recipient_domain {
                    secure_name = Some(o.pattern.clone());
                }
            }
            if o.tls_ca_file.is_some() {
                ca_file = o.tls_ca_file.as_deref();
            }
            if o.credentials.is_some() {
                route_credentials = o.credentials.as_ref();
            }
        }
        let credentials = route_credentials.is_some() || config.session.credentials.is_some();
        let by_credentials = credentials && config.tls_verify != Some(false);
        let (starttls, verify, policy) = match policy {
            None => {
                let starttls = config.session.starttls;
                let verify = config.tls_verify.unwrap_or(
                    target.implicit_tls || starttls == StartTls::Required || credentials,
                );
                let policy = match (starttls, verify) {
                    (StartTls::Disabled, _) => TlsPolicy::None,
                    (StartTls::Opportunistic, _) => TlsPolicy::Opportunistic,
                    (StartTls::Required, false) => TlsPolicy::Required,
                    (StartTls::Required, true) => TlsPolicy::Verify,
                };
                (starttls, verify, policy)
            }
            Some(p @ TlsPolicy::None) => {
                (StartTls::Disabled, target.implicit_tls && by_credentials, p)
            }
            Some(
                p @ (TlsPolicy::Opportunistic
                | TlsPolicy::MtaStsTesting
                | TlsPolicy::MtaStsTestingMismatch),
            ) => (StartTls::Opportunistic, by_credentials, p),
            Some(p @ TlsPolicy::Required) => (StartTls::Required, by_credentials, p),
            Some(p @ (TlsPolicy::Verify | TlsPolicy::Secure | TlsPolicy::MtaSts)) => {
                (StartTls::Required, true, p)
            }
        };
        let name = match (policy, secure_name) {
            (TlsPolicy::Secure, Some(domain)) => domain,
            _ => target.host.clone(),
        };
        let session = if starttls == session.starttls && route_credentials.is_none() {
            Arc::clone(session)
        } else {
            Arc::new(SessionConfig {
                starttls,
                credentials: route_credentials.or(session.credentials.as_ref()).cloned(),
                ..(**session).clone()
            })
        };
        DestinationTls {
            session,
            verify,
            name,
            ca: ca_file.and_then(|f| configs.with_ca.iter().position(|(p, _)| p == f)),
            policy,
        }
    }
}

impl DestinationTls {
    /// The TLS of MX host `host` under its recipient domain's MTA-STS verdict (RFC 8461
    /// section 5): `enforce` requires STARTTLS with a certificate verified for the MX host
    /// name, whatever level was configured (an override's CA file and credentials stay);
    /// `testing` changes nothing but the name of the policy that events report.
    pub fn under_mta_sts(self, sts: StsHost, host: &str) -> DestinationTls {
        match sts {
            StsHost::Enforce => {
                let session = if self.session.starttls == StartTls::Required {
                    self.session
                } else {
                    Arc::new(SessionConfig {
                        starttls: StartTls::Required,
                        ..(*self.session).clone()
                    })
                };
                DestinationTls {
                    session,
                    verify: true,
                    name: host.to_string(),
                    ca: self.ca,
                    policy: TlsPolicy::MtaSts,
                }
            }
            StsHost::Testing { allowed } => DestinationTls {
                policy: if allowed {
                    TlsPolicy::MtaStsTesting
                } else {
                    TlsPolicy::MtaStsTestingMismatch
                },
                ..self
            },
        }
    }
}

/// Checks the TLS keys of the overrides: `secure` needs an exact recipient domain to check
/// the certificate against.
pub fn check_overrides(overrides: &[LimitOverride]) -> Result<()> {
    for o in overrides {
        if o.tls_policy == Some(TlsPolicy::Secure)
            && (!o.recipient_domain || o.pattern.starts_with('.'))
        {
            return Err(Error::InvalidConfig {
                key: "limit_override",
                problem: "tls_policy=secure checks the certificate against the recipient domain: \
                          it needs an exact @domain override",
            });
        }
    }
    Ok(())
}

/// The client configurations.
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    pub verifying: Arc<ClientConfig>,
    pub encrypt_only: Arc<ClientConfig>,
    /// Verifying, with an override's CA file as well, by file.
    pub with_ca: Vec<(PathBuf, Arc<ClientConfig>)>,
    /// The verifier of `verifying`, to check after the fact a certificate that a session did
    /// not verify (what MTA-STS `testing` reports).
    pub verifier: Arc<WebPkiServerVerifier>,
}

/// Reads the CA certificates of a PEM file into `roots`; `key` names the setting.
fn add_ca_file(roots: &mut RootCertStore, path: &Path, key: &'static str) -> Result<()> {
    let invalid = |problem| Error::InvalidConfig { key, problem };
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
    Ok(())
}

impl TlsConfigs {
    /// Builds them; `ca_file` (PEM) adds trust anchors to the Mozilla roots, and each of
    /// `override_ca_files` to those for the destinations of its override.
    pub fn new(ca_file: Option<&Path>, override_ca_files: &[&Path]) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            add_ca_file(&mut roots, path, "tls_ca_file")?;
        }
        let builder = || {
            ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|_| Error::InvalidConfig {
                    key: "tls",
                    problem: "the crypto provider supports no TLS version",
                })
        };
        let mut with_ca = Vec::new();
        for &path in override_ca_files {
            if with_ca.iter().any(|(p, _)| p == path) {
                continue;
            }
            let mut roots = roots.clone();
            add_ca_file(&mut roots, path, "limit_override tls_ca_file")?;
            let config = builder()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            with_ca.push((path.to_path_buf(), Arc::new(config)));
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots.clone()),
            Arc::clone(&provider),
        )
        .build()
        .map_err(|_| Error::InvalidConfig {
            key: "tls_ca_file",
            problem: "no usable trust anchor",
        })?;
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
            with_ca,
            verifier,
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
