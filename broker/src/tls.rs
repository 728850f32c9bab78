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
//!
//! A core certificate is one the CA made for a *server* named the core's
//! name: the peer's certificate must verify as a server's certificate for
//! that DNS name (its `serverAuth` use and its subject alternative name),
//! whichever side of the link showed it. A client certificate of the same
//! CA, whatever its common name, cannot pass for one.

use canopy_client::tls::{load_certs, load_key, load_roots, provider, Identity, TlsConnector};
use canopy_client::tls::{Stream, TlsError};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName};
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
    /// Checks that a certificate is the CA's for a server named
    /// `core_name` (with a CA).
    pub core_check: Option<CoreCheck>,
}

/// Whether a certificate is a core server's: the CA's, for a server, named
/// the core's name.
#[derive(Clone, Debug)]
pub struct CoreCheck {
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl CoreCheck {
    /// Whether the other end of `stream` showed a core server's
    /// certificate.
    pub fn passes(&self, stream: &Stream) -> bool {
        let Some((leaf, chain)) = stream.peer_certificates().and_then(<[_]>::split_first) else {
            return false;
        };
        let now = rustls::pki_types::UnixTime::now();
        self.verifier
            .verify_server_cert(leaf, chain, &self.name, &[], now)
            .is_ok()
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("links", &self.links.is_some())
            .field("core_check", &self.core_check)
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
        let core_name = self.core_name.clone().unwrap_or_else(|| CORE_NAME.into());
        let core_check = match &roots {
            None => None,
            Some(roots) => Some(CoreCheck {
                verifier: rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.clone(),
                    provider(),
                )
                .build()?,
                name: match ServerName::try_from(core_name.clone()) {
                    Ok(name @ ServerName::DnsName(_)) => name,
                    _ => {
                        return Err(TlsError::File {
                            path: self.cert.clone(),
                            why: format!("core_name `{core_name}` is not a DNS name"),
                        })
                    }
                },
            }),
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
            core_check,
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
/// tree in `dir`: `ca.pem`, `core.pem` (a server's, named [`CORE_NAME`]),
/// `relay.pem` ([`RELAY_NAME`]), and `USER.pem` for each of `users` (a
/// client certificate named after the user, for client use only), each
/// with its `-key.pem`. Server certificates are also valid for
/// `localhost`, `127.0.0.1` and `::1`. Files already there are kept; a
/// new certificate is signed by the CA there.
///
/// Not for production: the CA's key lies beside the certificates.
///
/// # Errors
/// A file that cannot be written or read back, or a user name that is not
/// letters, digits, `.`, `_` and `-`, or that would be another file's
/// (`ca`, `core`, `relay`, a name ending in `-key`) or a server's.
pub fn make_dev_certs(dir: &Path, users: &[String]) -> anyhow::Result<DevCerts> {
    use anyhow::Context;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    for user in users {
        let plain = !user.is_empty()
            && !user.starts_with('.')
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        let taken = ["ca", "core", "relay", CORE_NAME, RELAY_NAME].contains(&user.as_str())
            || user.ends_with("-key");
        anyhow::ensure!(
            plain && !taken,
            "`{user}` cannot name a client certificate here: letters, digits, `.`, `_` and `-`, and not ca, core, relay, {CORE_NAME}, {RELAY_NAME} or a name ending in -key"
        );
    }
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
    /// One certificate to make.
    struct Leaf {
        file: String,
        common_name: String,
        sans: Vec<String>,
        server: bool,
    }
    let server = |file: &str, name: &str| Leaf {
        file: file.into(),
        common_name: name.into(),
        sans: vec![
            name.into(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ],
        server: true,
    };
    let mut leaves = vec![server("core", CORE_NAME), server("relay", RELAY_NAME)];
    leaves.extend(users.iter().map(|user| Leaf {
        file: user.clone(),
        common_name: user.clone(),
        sans: Vec::new(),
        server: false,
    }));
    for Leaf {
        file,
        common_name,
        sans,
        server,
    } in leaves
    {
        let (pem, key_pem) = (format!("{file}.pem"), format!("{file}-key.pem"));
        if dir.join(&pem).exists() && dir.join(&key_pem).exists() {
            continue;
        }
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
        assert_eq!(
            names(&read("core.pem")),
            [CORE_NAME, CORE_NAME, "localhost"]
        );
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
    fn user_names_that_would_be_another_file_or_a_server_are_refused() {
        let d = dir("reserved");
        for bad in [
            "ca", "core", "relay", "ca-key", "x-key", CORE_NAME, RELAY_NAME, "../x", "a/b", ".x",
            "",
        ] {
            let err = make_dev_certs(&d, &[bad.into()]).expect_err(bad);
            assert!(err.to_string().contains("cannot name"), "{bad}: {err}");
        }
        assert!(!d.exists(), "nothing written");
        make_dev_certs(&d, &["plant-a.reader_1".into()]).expect("a plain name");
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
