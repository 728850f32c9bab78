//! TLS on a server's links (docs/DESIGN.md, "Security"), and a
//! development certificate authority for a local tree (`canopy certs`).
//!
//! A server with `[tls]` speaks TLS on every link it has: its client port
//! (where a client may show a certificate, which the accounts file can map
//! to a user), its core peer links (mutual TLS: both ends show a
//! certificate of the cluster's CA that carries the core's name, so a
//! process without one is refused before it can send a protocol message),
//! and a relay's link to the tier above (it checks the server against the
//! CA and shows its own certificate).

use canopy_client::tls::{load_certs, load_key, load_roots, provider, Identity, TlsConnector};
use canopy_client::tls::{Stream, TlsError};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// The name a core server's certificate carries by default (`canopy
/// certs` makes such certificates).
pub const CORE_NAME: &str = "canopy-core";
/// The name of a relay's certificate that `canopy certs` makes.
pub const RELAY_NAME: &str = "canopy-relay";

/// Whether clients show a certificate on the client port.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientCerts {
    /// Not asked for.
    Off,
    /// Checked against the CA when shown (the default with `ca`).
    #[default]
    Optional,
    /// Required: a client without one of the CA's is refused.
    Required,
}

/// `[tls]` in a server's config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// This server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The tree's certificate authority (PEM): clients' certificates, core
    /// peers and the tier above are checked against it. Required for a
    /// core server or a relay.
    pub ca: Option<PathBuf>,
    /// Client certificates on the client port (with `ca`; `optional` by
    /// default).
    pub client_certs: Option<ClientCerts>,
    /// The name core servers' certificates carry (`canopy-core` by
    /// default): a peer link shows one or is refused.
    pub core_name: Option<String>,
}

/// A server's TLS, built once at start.
#[derive(Clone)]
pub struct ServerTls {
    /// The client port's.
    pub clients: TlsAcceptor,
    /// With a CA: the peer port's (a certificate of the CA required) and
    /// the dialling side's (trusts the CA, shows this server's
    /// certificate), for core links and a relay's link above.
    pub links: Option<(TlsAcceptor, TlsConnector)>,
    /// The name a core peer's certificate must carry.
    pub core_name: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("links", &self.links.is_some())
            .field("core_name", &self.core_name)
            .finish_non_exhaustive()
    }
}

impl FileTls {
    /// Reads the files and builds the server's TLS.
    ///
    /// # Errors
    /// A file that cannot be read or used, or client certificates asked
    /// for without a CA to check them.
    pub fn build(&self) -> Result<ServerTls, TlsError> {
        let certs = load_certs(&self.cert)?;
        let key = load_key(&self.key)?;
        let roots = self
            .ca
            .as_deref()
            .map(load_roots)
            .transpose()?
            .map(Arc::new);
        let policy = match (&roots, self.client_certs) {
            (None, None | Some(ClientCerts::Off)) => ClientCerts::Off,
            (None, Some(_)) => {
                return Err(TlsError::File {
                    path: self.cert.clone(),
                    why: "client_certs needs `ca`, the authority to check them against".into(),
                })
            }
            (Some(_), policy) => policy.unwrap_or_default(),
        };
        let verifier = |required: bool| -> Result<_, TlsError> {
            let Some(roots) = &roots else {
                return Ok(rustls::server::WebPkiClientVerifier::no_client_auth());
            };
            let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider(),
            );
            Ok(match required {
                true => builder.build()?,
                false => builder.allow_unauthenticated().build()?,
            })
        };
        let server = |verifier| -> Result<TlsAcceptor, TlsError> {
            let config = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs.clone(), key.clone_key())?;
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        let clients = match policy {
            ClientCerts::Off => server(rustls::server::WebPkiClientVerifier::no_client_auth())?,
            ClientCerts::Optional => server(verifier(false)?)?,
            ClientCerts::Required => server(verifier(true)?)?,
        };
        let links = match &self.ca {
            None => None,
            Some(ca) => {
                let identity = Identity {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                };
                Some((
                    server(verifier(true)?)?,
                    TlsConnector::from_files(ca, Some(&identity))?,
                ))
            }
        };
        Ok(ServerTls {
            clients,
            links,
            core_name: self.core_name.clone().unwrap_or_else(|| CORE_NAME.into()),
        })
    }
}

/// Runs the server's side of a TLS handshake within `timeout`.
///
/// # Errors
/// A failed handshake (an untrusted certificate, plain bytes), or
/// `TimedOut`.
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> std::io::Result<Stream> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls.into()))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The names a verified certificate carries: its subject's common names,
/// then its DNS names. Empty when it cannot be parsed (it was verified, so
/// that does not happen).
pub fn names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

/// The names of the certificate `stream`'s other side showed, if any.
pub fn peer_names(stream: &Stream) -> Vec<String> {
    stream
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(names)
        .unwrap_or_default()
}

/// What `canopy certs` wrote.
#[derive(Debug)]
pub struct DevCerts {
    /// Files written, in order (files already there are kept).
    pub written: Vec<PathBuf>,
}

/// Makes (or completes) a development CA and certificates for a local
/// tree in `dir`: `ca.pem`, `core.pem` (name [`CORE_NAME`]), `relay.pem`
/// ([`RELAY_NAME`]), and `USER.pem` for each of `users` (a client
/// certificate named after the user), each with its `-key.pem`. Server
/// certificates are valid for `localhost`, `127.0.0.1` and `::1`. Files
/// already there are kept; a new certificate is signed by the CA there.
///
/// Not for production: the CA's key lies beside the certificates.
///
/// # Errors
/// A file that cannot be written or read back, or a name that cannot be
/// a certificate's.
pub fn make_dev_certs(dir: &Path, users: &[String]) -> anyhow::Result<DevCerts> {
    use anyhow::Context;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    let (ca_pem, ca_key_pem) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let (ca, ca_key) = if ca_pem.exists() && ca_key_pem.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let key = KeyPair::from_pem(&read(&ca_key_pem)?).context("the CA's key")?;
        let params =
            CertificateParams::from_ca_cert_pem(&read(&ca_pem)?).context("the CA's certificate")?;
        // The same name and key: what it signs verifies under the file's.
        (params.self_signed(&key)?, key)
    } else {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Canopy development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        write("ca.pem", &cert.pem())?;
        write("ca-key.pem", &key.serialize_pem())?;
        (cert, key)
    };
    let hosts = || vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    let mut leaves: Vec<(String, Vec<String>, bool)> = vec![
        ("core".into(), hosts(), true),
        ("relay".into(), hosts(), true),
    ];
    let names = [CORE_NAME, RELAY_NAME];
    for user in users {
        leaves.push((user.clone(), Vec::new(), false));
    }
    for (i, (file, sans, server)) in leaves.into_iter().enumerate() {
        let (pem, key_pem) = (format!("{file}.pem"), format!("{file}-key.pem"));
        if dir.join(&pem).exists() && dir.join(&key_pem).exists() {
            continue;
        }
        let common_name = names.get(i).map_or(file.as_str(), |n| n);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)
            .with_context(|| format!("`{file}` cannot name a certificate"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = match server {
            true => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            false => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        write(&pem, &cert.pem())?;
        write(&key_pem, &key.serialize_pem())?;
    }
    Ok(DevCerts { written })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("canopy-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn dev_certs_carry_their_names_and_a_second_run_keeps_the_ca() {
        let d = dir("names");
        let first = make_dev_certs(&d, &["reader".into()]).expect("makes");
        assert_eq!(first.written.len(), 8, "{:?}", first.written);
        let read = |f: &str| load_certs(&d.join(f)).expect("reads")[0].clone();
        assert_eq!(names(&read("core.pem")), [CORE_NAME, "localhost"]);
        assert_eq!(names(&read("relay.pem"))[0], RELAY_NAME);
        assert_eq!(names(&read("reader.pem")), ["reader"]);
        let ca = std::fs::read(d.join("ca.pem")).expect("reads");
        // A user added later is signed by the same CA: the server built
        // from the first run's files accepts it.
        let second = make_dev_certs(&d, &["reader".into(), "writer".into()]).expect("makes");
        assert_eq!(
            second.written,
            [d.join("writer.pem"), d.join("writer-key.pem")]
        );
        assert_eq!(std::fs::read(d.join("ca.pem")).expect("reads"), ca);
        let roots = load_roots(&d.join("ca.pem")).expect("roots");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .expect("verifier");
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_client_cert(&read("writer.pem"), &[], now)
            .expect("the later certificate verifies under the first CA");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn client_certificates_need_a_ca() {
        let d = dir("noca");
        make_dev_certs(&d, &[]).expect("makes");
        let mut file = FileTls {
            cert: d.join("core.pem"),
            key: d.join("core-key.pem"),
            ca: None,
            client_certs: Some(ClientCerts::Required),
            core_name: None,
        };
        let err = file.build().expect_err("no CA");
        assert!(err.to_string().contains("needs `ca`"), "{err}");
        file.client_certs = None;
        let tls = file.build().expect("a leaf server without a CA");
        assert!(tls.links.is_none());
        file.key = d.join("relay-key.pem");
        assert!(file.build().is_err(), "a key that is not the certificate's");
        let _ = std::fs::remove_dir_all(&d);
    }
}
