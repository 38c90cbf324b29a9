//! TLS to PostgreSQL, as libpq reads `sslmode` and `sslrootcert` from the URL:
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | absent, `disable` | no | - |
//! | `prefer` | if the server offers it | no |
//! | `require` | yes | no; with `sslrootcert`, its chain (as `verify-ca`) |
//! | `verify-ca` | yes | its chain, against `sslrootcert` or the system's roots |
//! | `verify-full` | yes | its chain and that it names the host |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the system's roots (the
//! default of the verifying modes). The connector is rustls with the aws-lc-rs provider the
//! server already builds for HTTPS (tokio-postgres-rustls), so no OpenSSL is linked.
//! tokio-postgres itself knows only `disable`, `prefer` and `require`: both keys are taken
//! out of the URL here and the driver is given the mode to negotiate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;

/// What the URL asks of TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text (no `sslmode`, or `disable`).
    Off,
    /// Encrypted when the server offers it, certificate not checked (`prefer`).
    Prefer,
    /// Encrypted, certificate not checked (`require` without `sslrootcert`).
    Unverified,
    /// Encrypted, the chain checked against `roots`, the host name not (`verify-ca`, or
    /// `require` with `sslrootcert`).
    VerifyChain(Roots),
    /// Encrypted, the chain and the host name checked (`verify-full`).
    VerifyFull(Roots),
}

/// Where the CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    System,
    File(std::path::PathBuf),
}

impl TlsMode {
    /// Reads `sslmode` and `sslrootcert` (already taken out of the URL; `None` when absent).
    pub fn from_params(mode: Option<&str>, root_cert: Option<&str>) -> Result<TlsMode, String> {
        let roots = || match root_cert {
            None | Some("system") => Roots::System,
            Some(path) => Roots::File(path.into()),
        };
        Ok(match mode {
            None | Some("disable") => TlsMode::Off,
            Some("prefer") => TlsMode::Prefer,
            Some("require") if root_cert.is_some() => TlsMode::VerifyChain(roots()),
            Some("require") => TlsMode::Unverified,
            Some("verify-ca") => TlsMode::VerifyChain(roots()),
            Some("verify-full") => TlsMode::VerifyFull(roots()),
            Some(other) => {
                return Err(format!(
                    "sslmode={other} is not supported: give disable, prefer, require, \
                     verify-ca or verify-full"
                ))
            }
        })
    }

    /// The mode tokio-postgres negotiates.
    pub fn ssl_mode(&self) -> SslMode {
        match self {
            TlsMode::Off => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    /// The rustls connector, `None` for plain text.
    pub fn connector(&self) -> anyhow::Result<Option<tokio_postgres_rustls::MakeRustlsConnect>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self {
            TlsMode::Off => return Ok(None),
            TlsMode::Prefer | TlsMode::Unverified => Arc::new(Unchecked(provider.clone())),
            TlsMode::VerifyChain(roots) => Arc::new(ChainOnly(webpki(roots, &provider)?)),
            TlsMode::VerifyFull(roots) => webpki(roots, &provider)?,
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
    }
}

fn webpki(
    roots: &Roots,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Arc<WebPkiServerVerifier>> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                anyhow::bail!(
                    "no CA certificate found on this system to check the database's \
                     certificate: give sslrootcert=<PEM file>"
                );
            }
        }
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("sslrootcert {}: {e}", path.display()))?;
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("sslrootcert {}: {e}", path.display()))?;
            }
            if store.is_empty() {
                anyhow::bail!("sslrootcert {} holds no certificate", path.display());
            }
        }
    }
    Ok(WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone()).build()?)
}

/// `verify-ca`: the chain is checked, a certificate for another name is accepted.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` and `prefer` as libpq has them: encrypted, any certificate accepted (the
/// handshake's signatures are still checked, so the key is the certificate's).
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_read_as_libpq_reads_them() {
        let file = || Roots::File("/etc/ca.pem".into());
        let read = |mode, root| TlsMode::from_params(mode, root).unwrap();
        assert_eq!(read(None, None), TlsMode::Off);
        assert_eq!(read(Some("disable"), None), TlsMode::Off);
        assert_eq!(read(Some("prefer"), None), TlsMode::Prefer);
        assert_eq!(read(Some("require"), None), TlsMode::Unverified);
        assert_eq!(
            read(Some("require"), Some("/etc/ca.pem")),
            TlsMode::VerifyChain(file())
        );
        assert_eq!(
            read(Some("verify-ca"), None),
            TlsMode::VerifyChain(Roots::System)
        );
        assert_eq!(
            read(Some("verify-full"), Some("/etc/ca.pem")),
            TlsMode::VerifyFull(file())
        );
        assert_eq!(
            read(Some("verify-full"), Some("system")),
            TlsMode::VerifyFull(Roots::System)
        );
        let why = TlsMode::from_params(Some("allow"), None).unwrap_err();
        assert!(why.contains("sslmode=allow is not supported"), "{why}");
        assert_eq!(read(Some("verify-full"), None).ssl_mode(), SslMode::Require);
        assert_eq!(read(Some("prefer"), None).ssl_mode(), SslMode::Prefer);
        assert_eq!(read(None, None).ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn a_root_file_that_is_missing_or_holds_no_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let mode = TlsMode::VerifyFull(Roots::File(missing.clone()));
        let why = mode.connector().err().unwrap().to_string();
        assert!(
            why.contains(&format!("sslrootcert {}", missing.display())),
            "{why}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let why = TlsMode::VerifyChain(Roots::File(empty.clone()))
            .connector()
            .err()
            .unwrap()
            .to_string();
        assert!(why.contains("holds no certificate"), "{why}");
        assert!(TlsMode::Unverified.connector().unwrap().is_some());
        assert!(TlsMode::Off.connector().unwrap().is_none());
    }
}
