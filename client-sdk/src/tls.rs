//! TLS for Canopy's connections (rustls with the ring provider), and the
//! one stream type the SDK and the broker read and write, plain or not.
//!
//! A client trusts the certificate authorities in one PEM file (a tree's
//! own CA, as `canopy certs` makes) and may show a certificate of its own
//! (a server that maps certificates to users then knows who it is without a
//! token). The server's name is checked against the address dialled: a
//! host name or an IP address, as the certificate lists it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The one crypto provider Canopy uses (chosen here, never process-wide).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing, unreadable or holds nothing of its kind.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the certificates or key (a key that does not match
    /// its certificate, an unsupported algorithm).
    #[error("TLS settings refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Every certificate in a PEM file (a chain, or a set of authorities).
///
/// # Errors
/// [`TlsError::File`] when it cannot be read or holds no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |why: String| TlsError::File {
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no certificate in it".into()));
    }
    Ok(certs)
}

/// The private key in a PEM file.
///
/// # Errors
/// [`TlsError::File`] when it cannot be read or holds no key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// The authorities in a PEM file, as a root store.
///
/// # Errors
/// As [`load_certs`], or [`TlsError::Rustls`] for a certificate that is
/// not one.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A certificate chain and its key, in PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The certificate chain (leaf first).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// How a client connects over TLS: whom it trusts, and what it shows.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConnector { .. }")
    }
}

impl TlsConnector {
    /// Trusts the authorities in `ca` and shows `identity`, if given.
    ///
    /// # Errors
    /// A file that cannot be read or used.
    pub fn from_files(ca: &Path, identity: Option<&Identity>) -> Result<Self, TlsError> {
        let roots = load_roots(ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match identity {
            Some(id) => builder.with_client_auth_cert(load_certs(&id.cert)?, load_key(&id.key)?)?,
            None => builder.with_no_client_auth(),
        };
        Ok(TlsConnector {
            config: Arc::new(config),
        })
    }

    /// Runs the TLS handshake on `tcp` to the server dialled as `addr`
    /// (`host:port`; the certificate must name `host`).
    ///
    /// # Errors
    /// A name that cannot be checked, or a failed handshake (an untrusted
    /// or misnamed certificate among them).
    pub async fn connect(&self, addr: &str, tcp: TcpStream) -> std::io::Result<Stream> {
        let name = server_name(addr)?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector.connect(name, tcp).await?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }
}

/// The host part of `host:port` as a name to check the certificate for.
fn server_name(addr: &str) -> std::io::Result<ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr}: no name to check a certificate for: {e}"),
        )
    })
}

/// Opens a connection to `addr`: plain TCP, or TLS through `tls`.
///
/// # Errors
/// The connect or handshake error.
pub async fn connect(addr: &str, tls: Option<&TlsConnector>) -> std::io::Result<Stream> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some(tls) => tls.connect(addr, tcp).await,
    }
}

/// A connection, plain or TLS (either side's).
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

/// The read half of a [`Stream`].
pub enum ReadHalf {
    /// Plain TCP (no lock between the halves).
    Plain(tokio::net::tcp::OwnedReadHalf),
    /// TLS (one session shared by both halves).
    Tls(tokio::io::ReadHalf<Box<tokio_rustls::TlsStream<TcpStream>>>),
}

/// The write half of a [`Stream`].
pub enum WriteHalf {
    /// Plain TCP.
    Plain(tokio::net::tcp::OwnedWriteHalf),
    /// TLS.
    Tls(tokio::io::WriteHalf<Box<tokio_rustls::TlsStream<TcpStream>>>),
}

impl Stream {
    /// Splits into halves a reader task and a writer task can own.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// The certificate chain the other side showed and the handshake
    /// verified, if any (the leaf first, DER).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => match s.as_ref() {
                tokio_rustls::TlsStream::Client(c) => c.get_ref().1.peer_certificates(),
                tokio_rustls::TlsStream::Server(c) => c.get_ref().1.peer_certificates(),
            },
        }
    }
}

/// Forwards the read poll method of an enum's variants (each `Unpin`).
macro_rules! forward_read {
    ($ty:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

/// Forwards the write poll methods of an enum's variants (each `Unpin`).
macro_rules! forward_write {
    ($ty:ident) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::Plain(s) => s.is_write_vectored(),
                    $ty::Tls(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_flush(cx),
                    $ty::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $ty::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

forward_read!(Stream);
forward_write!(Stream);
forward_read!(ReadHalf);
forward_write!(WriteHalf);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_checked_is_the_host_dialled() {
        assert_eq!(
            server_name("localhost:4400").expect("a name"),
            ServerName::try_from("localhost").expect("valid")
        );
        assert!(matches!(
            server_name("127.0.0.1:4400").expect("an address"),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:4400").expect("an address"),
            ServerName::IpAddress(_)
        ));
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let err = load_certs(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let dir = std::env::temp_dir().join(format!("canopy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a pem\n").expect("writes");
        let err = load_certs(&empty).expect_err("empty");
        assert!(err.to_string().contains("no certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
