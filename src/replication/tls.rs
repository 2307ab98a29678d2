//! TLS for PostgreSQL connections, with libpq's `sslmode` semantics on rustls.
//!
//! One stack for both connections: the replication client here and the SQL
//! connections of [`crate::sql`] build their rustls configuration with
//! [`client_config`] and bind SCRAM to the server certificate with
//! [`tls_server_end_point`].
//!
//! | sslmode | TLS | server certificate checked |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (default) | if the server offers it | no (yes against `sslrootcert` if one is given) |
//! | `require` | always | no (against `sslrootcert` if one is given, as libpq does) |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert`, and the host name |
//!
//! Without verification TLS still encrypts, and SCRAM-SHA-256-PLUS (channel
//! binding) still detects a man in the middle when the server offers it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

/// libpq's `sslmode` (without `allow`, which only makes sense for servers that
/// require TLS of some clients only; use `prefer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// A connection without TLS is an error in this mode.
    pub fn requires_tls(self) -> bool {
        self >= SslMode::Require
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// libpq's `channel_binding`: whether SCRAM binds to the TLS channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBindingMode {
    /// Never use SCRAM-SHA-256-PLUS.
    Disable,
    /// Use it when the connection is TLS and the server offers it.
    #[default]
    Prefer,
    /// Fail unless the server authenticates with SCRAM-SHA-256-PLUS.
    Require,
}

/// Where trusted CA certificates come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file with one or more CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trust store.
    System,
}

/// How a PostgreSQL connection uses TLS: the libpq `ssl*` parameters of the URL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsOptions {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    /// `sslcert`: client certificate chain (PEM), for `cert` authentication.
    pub client_cert: Option<PathBuf>,
    /// `sslkey`: its private key (PEM, unencrypted).
    pub client_key: Option<PathBuf>,
    /// The name the certificate must carry under `verify-full`, also sent as SNI:
    /// `host` of the URL (even when `hostaddr` says where to connect).
    pub server_name: String,
    /// `sslnegotiation=direct` (PostgreSQL 17+): TLS right away, without SSLRequest.
    pub direct: bool,
    pub channel_binding: ChannelBindingMode,
}

impl TlsOptions {
    /// Whether the server certificate's chain is checked: `verify-ca`,
    /// `verify-full`, and `require`/`prefer` given a root certificate (libpq).
    pub fn verifies_chain(&self) -> bool {
        match self.mode {
            SslMode::Disable => false,
            SslMode::Prefer | SslMode::Require => self.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        }
    }

    /// Whether the host name is checked against the certificate.
    pub fn verifies_name(&self) -> bool {
        self.mode == SslMode::VerifyFull
    }
}

/// Why TLS could not be set up or the server's certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

/// ALPN protocol name PostgreSQL 17 requires for direct TLS (libpq always sends it).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The rustls configuration for `opts`: trust anchors, verifier, client certificate.
/// Files are read on every call, so rotated certificates are picked up at the next
/// connection.
pub fn client_config(opts: &TlsOptions) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = if opts.verifies_chain() {
        let roots = root_store(opts.root_cert.as_ref(), opts.mode)?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError(format!("cannot use the CA certificates: {e}")))?;
        Arc::new(Verifier {
            webpki: Some(webpki),
            check_name: opts.verifies_name(),
            provider: provider.clone(),
        })
    } else {
        Arc::new(Verifier {
            webpki: None,
            check_name: false,
            provider: provider.clone(),
        })
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config =
        match (&opts.client_cert, &opts.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = read_key(key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError(format!("sslcert/sslkey cannot be used together: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(TlsError(
                "sslcert is set but sslkey is not; set both (the client certificate and its key)"
                    .into(),
            )),
            (None, Some(_)) => return Err(TlsError(
                "sslkey is set but sslcert is not; set both (the client certificate and its key)"
                    .into(),
            )),
        };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

/// The name rustls checks and sends as SNI. Without a name check an unusual host
/// (say, with an underscore) must not stop the handshake, so a placeholder stands in.
pub fn server_name(opts: &TlsOptions) -> Result<ServerName<'static>, TlsError> {
    match ServerName::try_from(opts.server_name.clone()) {
        Ok(name) => Ok(name),
        Err(_) if !opts.verifies_name() => Ok(ServerName::try_from("localhost")
            .expect("localhost is a valid DNS name")
            .to_owned()),
        Err(_) => Err(TlsError(format!(
            "host {:?} is not a DNS name or IP address, so sslmode=verify-full cannot check \
             the server certificate against it",
            opts.server_name
        ))),
    }
}

/// A handshake failure as one sentence with its likely fix.
pub fn describe_handshake_error(e: &rustls::Error, opts: &TlsOptions) -> String {
    use rustls::Error as E;
    let what = match e {
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server certificate is not valid for host {:?}; sslmode=verify-full checks the \
             host name: connect by a name the certificate lists, or use sslmode=verify-ca",
            opts.server_name
        ),
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server certificate is not signed by a CA in sslrootcert; point sslrootcert at \
             the CA that issued it"
                .to_string()
        }
        E::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the server certificate has expired; renew it on the server".to_string(),
        E::InvalidCertificate(other) => format!("the server certificate was refused ({other:?})"),
        E::AlertReceived(alert) => format!(
            "the server refused the handshake ({alert:?}); if it checks client certificates, \
             set sslcert and sslkey to a certificate its ssl_ca_file trusts"
        ),
        other => other.to_string(),
    };
    format!("TLS handshake with PostgreSQL failed: {what}")
}

fn root_store(root: Option<&RootCert>, mode: SslMode) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match root {
        None => {
            return Err(TlsError(format!(
                "sslmode={mode} needs the CA certificate that signed the server's: add \
                 sslrootcert=/path/to/ca.pem (or sslrootcert=system) to postgres.url"
            )))
        }
        Some(RootCert::File(path)) => {
            for cert in read_certs(path, "sslrootcert")? {
                store.add(cert).map_err(|e| {
                    TlsError(format!(
                        "sslrootcert {}: a certificate cannot be used as a CA: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        Some(RootCert::System) => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError(
                    "sslrootcert=system: no CA certificates found in the system trust store \
                     (install ca-certificates, or point sslrootcert at a file)"
                        .into(),
                ));
            }
        }
    }
    Ok(store)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsError(format!(
                "cannot read {what} {}: {}",
                path.display(),
                pem_error(&e)
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        TlsError(format!(
            "cannot read sslkey {}: {} (an unencrypted PEM key is needed: PKCS#8, PKCS#1 or SEC1)",
            path.display(),
            pem_error(&e)
        ))
    })
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the right kind".into(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// Checks the chain (and the name) when asked to, and always the handshake
/// signatures, so the server proves it holds the certificate's key: that is what
/// makes channel binding worth something without a CA.
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // webpki checks the chain before the name: a name error means the chain
            // is good, which is all verify-ca asks.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `tls-server-end-point` channel binding data (RFC 5929): the hash of the server
/// certificate with the hash function of its signature algorithm, SHA-256 for MD5
/// and SHA-1. `None` for algorithms without one (RSA-PSS, Ed25519), for which
/// PostgreSQL cannot bind either.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (tag, cert, _) = der_element(cert_der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _tbs, rest) = der_element(cert)?;
    let (tag, algorithm, _) = der_element(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_element(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    enum H {
        S224,
        S256,
        S384,
        S512,
    }
    let hash = match oid {
        [rsa @ .., last] if rsa == RSA => match last {
            4 | 5 | 11 => H::S256, // md5, sha1 (→ SHA-256 by RFC 5929), sha256
            12 => H::S384,
            13 => H::S512,
            14 => H::S224,
            _ => return None, // 10: RSASSA-PSS, hash in the parameters
        },
        o if o == ECDSA_SHA1 => H::S256,
        [ec @ .., last] if ec == ECDSA_SHA2 => match last {
            1 => H::S224,
            2 => H::S256,
            3 => H::S384,
            4 => H::S512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match hash {
        H::S224 => sha2::Sha224::digest(cert_der).to_vec(),
        H::S256 => sha2::Sha256::digest(cert_der).to_vec(),
        H::S384 => sha2::Sha384::digest(cert_der).to_vec(),
        H::S512 => sha2::Sha512::digest(cert_der).to_vec(),
    })
}

/// One DER element: (tag, contents, the bytes after it). Definite lengths only.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths() {
        assert_eq!(
            der_element(&[0x30, 0x01, 0xaa, 0xbb]),
            Some((0x30, &[0xaa][..], &[0xbb][..]))
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend([7u8; 0x80]);
        assert_eq!(der_element(&long).map(|(_, c, _)| c.len()), Some(0x80));
        assert_eq!(der_element(&[0x30, 0x05, 0x00]), None);
        assert_eq!(der_element(&[0x30, 0x80]), None);
        assert_eq!(der_element(&[]), None);
    }

    /// A certificate reduced to the fields the hash choice looks at.
    fn fake_cert(oid: &[u8]) -> Vec<u8> {
        let tbs = [0x30, 0x00];
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend(oid);
        let mut alg_seq = vec![0x30, alg.len() as u8];
        alg_seq.extend(alg);
        let mut body = tbs.to_vec();
        body.extend(alg_seq);
        body.extend([0x03, 0x01, 0x00]);
        let mut cert = vec![0x30, body.len() as u8];
        cert.extend(body);
        cert
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let rsa = |n: u8| fake_cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, n]);
        let ec = |n: u8| fake_cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, n]);
        let len = |c: Vec<u8>| tls_server_end_point(&c).map(|h| h.len());
        assert_eq!(len(rsa(11)), Some(32));
        assert_eq!(len(rsa(5)), Some(32), "SHA-1 is replaced by SHA-256");
        assert_eq!(len(rsa(12)), Some(48));
        assert_eq!(len(rsa(13)), Some(64));
        assert_eq!(len(rsa(10)), None, "RSA-PSS");
        assert_eq!(len(ec(2)), Some(32));
        assert_eq!(len(ec(3)), Some(48));
        assert_eq!(
            len(fake_cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01])),
            Some(32)
        );
        assert_eq!(len(fake_cert(&[0x2b, 0x65, 0x70])), None, "Ed25519");
        let c = rsa(11);
        assert_eq!(
            tls_server_end_point(&c).unwrap(),
            sha2::Sha256::digest(&c).to_vec()
        );
        assert_eq!(tls_server_end_point(b"garbage"), None);
    }

    #[test]
    fn modes() {
        assert_eq!(SslMode::parse("verify-full"), Some(SslMode::VerifyFull));
        assert_eq!(SslMode::parse("allow"), None);
        assert!(SslMode::VerifyCa.requires_tls() && !SslMode::Prefer.requires_tls());
        let mut o = TlsOptions::default();
        assert!(!o.verifies_chain());
        o.root_cert = Some(RootCert::System);
        assert!(o.verifies_chain() && !o.verifies_name());
        o.mode = SslMode::VerifyFull;
        assert!(o.verifies_name());
    }

    #[test]
    fn config_errors_name_the_parameter() {
        let o = TlsOptions {
            mode: SslMode::VerifyFull,
            ..Default::default()
        };
        assert!(client_config(&o).unwrap_err().0.contains("sslrootcert="));
        let o = TlsOptions {
            mode: SslMode::VerifyCa,
            root_cert: Some(RootCert::File("/nonexistent/ca.pem".into())),
            ..Default::default()
        };
        let e = client_config(&o).unwrap_err().0;
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
        let o = TlsOptions {
            client_cert: Some("/x.pem".into()),
            ..Default::default()
        };
        assert!(client_config(&o).unwrap_err().0.contains("sslkey is not"));
        assert!(client_config(&TlsOptions::default()).is_ok());
    }
}
