//! Links between core servers.
//!
//! Each server dials every other configured server and sends on that
//! outgoing link only; it receives on the links the others dialled. So a
//! link carries one direction, FIFO while it lasts. A link task connects,
//! says who it is (`LinkHello`), reports `LinkUp`, and writes what the node
//! task queues for that peer; when the connection fails it reports
//! `LinkDown` and reconnects with backoff. Frames written into the broken
//! connection are lost; frames queued meanwhile go out on the next one. The
//! protocol never relies on more than that (see `core::total::wire`).
//! Readers decode frames into [`PeerMsg`]s off the node task.
//!
//! Admission: with the core's secret configured, a link carries nothing
//! until both ends proved they know it (docs/DESIGN.md, "Security"): the
//! caller's hello carries a nonce; the server it calls answers with its
//! own nonce and an HMAC of both (proving itself first, so a caller never
//! talks to an impostor); the caller answers with an HMAC of both the
//! other way. The secret never crosses the link, and a recorded exchange
//! is useless with fresh nonces. A process that cannot answer is dropped
//! before one protocol message is read from it.
//!
//! With `[tls]`, every link is mutual TLS first: each end shows a
//! certificate the tree's CA made for a server named the core's name
//! (`[tls] core_name`; `crate::tls::CoreCheck`), or the link is dropped
//! before its hello; the secret, if also set, is then proved inside it.
//!
//! Bounds: each outgoing queue holds `LINK_QUEUE_MAX` frames. A peer that
//! does not read that much is treated as a broken link: the queue is
//! replaced and the connection dropped, and the protocol recovers.

use super::Inbound;
use crate::core::group::{wire, NodeId, PeerMsg};
use bytes::Bytes;
use canopy_client::io::write_frames;
use canopy_client::tls::{Stream, TlsConnector};
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// Frames queued per outgoing link.
const LINK_QUEUE_MAX: usize = 65_536;
/// The largest frame on a link. Ordering frames carry at most 8 MiB (or
/// one message, up to the 64 MiB client frame limit); a flush carries the
/// unstable log (at most 64 MiB and one message), and a snapshot at most
/// 64 MiB of retained messages.
const PEER_FRAME_LEN_MAX: usize = 256 << 20;
/// Frames written per turn.
const WRITE_BATCH_MAX: usize = 64;
/// Frames a reader hands over in one message.
const READ_BATCH_MAX: usize = 256;
/// First and longest waits between connection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(20);
const RECONNECT_MAX: Duration = Duration::from_millis(500);
/// A link's first frame must arrive within this (and each frame of the
/// admission handshake).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest frame before a link is admitted.
const HANDSHAKE_FRAME_MAX: usize = 1024;

/// The first frame on a link: who is calling.
#[derive(Debug, Serialize, Deserialize)]
struct LinkHello {
    /// Link protocol version.
    version: u32,
    /// The caller.
    node: NodeId,
    /// With a secret: the caller's challenge to the server it calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<Bytes>,
}

/// With a secret, from the server called: its own challenge, and its
/// answer to the caller's.
#[derive(Debug, Serialize, Deserialize)]
struct LinkChallenge {
    nonce: Bytes,
    proof: Bytes,
}

/// With a secret, from the caller: its answer to the server's challenge.
#[derive(Debug, Serialize, Deserialize)]
struct LinkAnswer {
    proof: Bytes,
}

/// The proof of knowing `secret`, for one side of one link's handshake
/// (both nonces, in that side's order, and the caller).
fn mac(
    secret: &str,
    side: &str,
    first: &[u8],
    second: &[u8],
    caller: NodeId,
) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("invariant: HMAC takes a key of any length");
    for part in [side.as_bytes(), first, second, &caller.0.to_be_bytes()] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac
}

fn proof(secret: &str, side: &str, first: &[u8], second: &[u8], caller: NodeId) -> Bytes {
    use hmac::Mac;
    let tag = mac(secret, side, first, second, caller).finalize();
    Bytes::copy_from_slice(&tag.into_bytes())
}

/// Whether `got` is the proof expected (compared in constant time).
fn proves(secret: &str, side: &str, nonces: (&[u8], &[u8]), caller: NodeId, got: &[u8]) -> bool {
    use hmac::Mac;
    mac(secret, side, nonces.0, nonces.1, caller)
        .verify_slice(got)
        .is_ok()
}

fn nonce() -> Bytes {
    use rand::RngCore;
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    Bytes::copy_from_slice(&n)
}

const CALLED: &str = "canopy link: the server called";
const CALLER: &str = "canopy link: the caller";

/// The peer protocol's version: servers of another version refuse each
/// other's links at the hello, rather than drop them later on a message one
/// of them cannot decode. 2: the sequencer's `Retried`; 3: binary `Order`
/// and `Submit` (`core::total::wire`).
pub const LINK_VERSION: u32 = 3;

/// Numbers incoming connections in the order they were accepted.
static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The node task's handles on its outgoing links.
pub(super) struct Links {
    me: NodeId,
    admission: Admission,
    links: HashMap<NodeId, Link>,
    inbox: flume::Sender<Inbound>,
}

struct Link {
    addr: String,
    queue: flume::Sender<Bytes>,
    cancel: CancellationToken,
}

impl Links {
    /// Starts a link task for every peer.
    pub(super) fn start(
        me: NodeId,
        peers: &[(NodeId, String)],
        inbox: flume::Sender<Inbound>,
        admission: Admission,
    ) -> Self {
        let mut links = Links {
            me,
            admission,
            links: HashMap::new(),
            inbox,
        };
        for (peer, addr) in peers {
            links.spawn(*peer, addr.clone());
        }
        links
    }

    fn spawn(&mut self, peer: NodeId, addr: String) {
        let (tx, rx) = flume::bounded(LINK_QUEUE_MAX);
        let cancel = CancellationToken::new();
        tokio::spawn(link_task(
            self.me,
            peer,
            addr.clone(),
            rx,
            cancel.clone(),
            self.inbox.clone(),
            self.admission.clone(),
        ));
        self.links.insert(
            peer,
            Link {
                addr,
                queue: tx,
                cancel,
            },
        );
    }

    /// Queues `frame` for `peer`. Returns false when the link was reset
    /// because its queue was full (the caller reports the link down).
    pub(super) fn send(&mut self, peer: NodeId, frame: Bytes) -> bool {
        let Some(link) = self.links.get(&peer) else {
            return true;
        };
        match link.queue.try_send(frame) {
            Ok(()) => true,
            Err(flume::TrySendError::Disconnected(_)) => true,
            Err(flume::TrySendError::Full(_)) => {
                tracing::warn!(node = %peer, "link queue full; resetting the link");
                link.cancel.cancel();
                let addr = link.addr.clone();
                self.spawn(peer, addr);
                false
            }
        }
    }

    /// Stops every link task.
    pub(super) fn stop(&self) {
        for link in self.links.values() {
            link.cancel.cancel();
        }
    }
}

async fn link_task(
    me: NodeId,
    peer: NodeId,
    addr: String,
    queue: flume::Receiver<Bytes>,
    cancel: CancellationToken,
    inbox: flume::Sender<Inbound>,
    admission: Admission,
) {
    let mut delay = RECONNECT_MIN;
    loop {
        let dialled = tokio::select! {
            _ = cancel.cancelled() => return,
            s = dial(&addr, me, peer, &admission) => s,
        };
        let Some(mut stream) = dialled else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RECONNECT_MAX);
            continue;
        };
        delay = RECONNECT_MIN;
        tracing::debug!(node = %peer, %addr, "link up");
        if inbox.send_async(Inbound::LinkUp(peer)).await.is_err() {
            return;
        }
        let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
        let failed = loop {
            let frame = tokio::select! {
                _ = cancel.cancelled() => return,
                f = queue.recv_async() => f,
            };
            let Ok(frame) = frame else { return };
            batch.push(frame);
            batch.extend(queue.try_iter().take(WRITE_BATCH_MAX - 1));
            let written = tokio::select! {
                _ = cancel.cancelled() => return,
                r = write_frames(&mut stream, &mut batch) => r,
            };
            if let Err(e) = written {
                break e;
            }
        };
        batch.clear();
        tracing::debug!(node = %peer, error = %failed, "link down");
        if inbox.send_async(Inbound::LinkDown(peer)).await.is_err() {
            return;
        }
    }
}

/// How links are admitted (module docs): by mutual TLS, the core's
/// secret, both, or neither.
#[derive(Clone, Default)]
pub(super) struct Admission {
    /// The core's secret, proved both ways.
    pub secret: Option<Arc<str>>,
    /// Mutual TLS.
    pub tls: Option<LinkTls>,
}

/// Mutual TLS on core links.
#[derive(Clone)]
pub(super) struct LinkTls {
    /// The peer port's (a certificate of the CA required).
    pub acceptor: TlsAcceptor,
    /// The dialling side's (trusts the CA, shows this server's).
    pub connector: TlsConnector,
    /// Whether a certificate is a core server's (both ends check).
    pub core: crate::tls::CoreCheck,
}

impl LinkTls {
    /// Whether the other end of `stream` showed a core server's
    /// certificate.
    fn is_core(&self, stream: &Stream) -> bool {
        self.core.passes(stream)
    }
}

/// Connects to `peer` at `addr` and runs the caller's side of admission;
/// the link, ready for protocol messages, or `None` to try again later.
async fn dial(addr: &str, me: NodeId, peer: NodeId, admission: &Admission) -> Option<Stream> {
    let tcp = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            tracing::trace!(node = %peer, %addr, error = %e, "cannot reach peer");
            return None;
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut stream = match &admission.tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let shaken = tokio::time::timeout(HELLO_TIMEOUT, tls.connector.connect(addr, tcp));
            match shaken.await {
                Ok(Ok(s)) if tls.is_core(&s) => s,
                Ok(Ok(_)) => {
                    tracing::warn!(node = %peer, %addr, "the server called shows no core server's certificate; not talking to it");
                    return None;
                }
                Ok(Err(e)) => {
                    tracing::warn!(node = %peer, %addr, error = %e, "TLS to peer failed");
                    return None;
                }
                Err(_) => return None,
            }
        }
    };
    let admitted = match &admission.secret {
        None => {
            let hello = LinkHello {
                version: LINK_VERSION,
                node: me,
                nonce: None,
            };
            send(&mut stream, &hello).await
        }
        Some(secret) => prove(&mut stream, me, peer, secret).await,
    };
    admitted.then_some(stream)
}

/// The caller's side of the admission handshake (module docs): true once
/// both ends proved they know the secret.
async fn prove(stream: &mut Stream, me: NodeId, peer: NodeId, secret: &str) -> bool {
    let mine = nonce();
    let hello = LinkHello {
        version: LINK_VERSION,
        node: me,
        nonce: Some(mine.clone()),
    };
    if !send(stream, &hello).await {
        return false;
    }
    let mut framed = FramedRead::new(&mut *stream, handshake_codec());
    let Some(c) = next_record::<LinkChallenge, _>(&mut framed).await else {
        tracing::warn!(node = %peer, "the server called sent no challenge: is the core's secret set on both?");
        return false;
    };
    if !proves(secret, CALLED, (&mine, &c.nonce), me, &c.proof) {
        tracing::warn!(node = %peer, "the server called does not know the core's secret; not talking to it");
        return false;
    }
    let answer = LinkAnswer {
        proof: proof(secret, CALLER, &c.nonce, &mine, me),
    };
    send(stream, &answer).await
}

/// Writes a handshake record and flushes it (TLS holds what it sealed).
async fn send<W, T>(w: &mut W, record: &T) -> bool
where
    W: tokio::io::AsyncWrite + Unpin,
    T: Serialize,
{
    w.write_all(&frame(record)).await.is_ok() && w.flush().await.is_ok()
}

/// Frames of the handshake are small: a peer not yet admitted cannot make
/// this server hold more.
fn handshake_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(HANDSHAKE_FRAME_MAX)
        .new_codec()
}

/// The next frame as a `T`, within [`HELLO_TIMEOUT`].
async fn next_record<T, R>(framed: &mut FramedRead<R, LengthDelimitedCodec>) -> Option<T>
where
    T: serde::de::DeserializeOwned,
    R: tokio::io::AsyncRead + Unpin,
{
    match tokio::time::timeout(HELLO_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(f))) => ciborium::from_reader(&f[..]).ok(),
        _ => None,
    }
}

/// A handshake record, length-prefixed.
fn frame<T: Serialize>(record: &T) -> Vec<u8> {
    let mut buf = vec![0; 4];
    ciborium::into_writer(record, &mut buf).expect("invariant: encoding into a Vec cannot fail");
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf
}

/// Accepts links from other core servers.
pub(super) async fn accept_loop(
    listener: TcpListener,
    inbox: flume::Sender<Inbound>,
    admission: Admission,
    refusals: Arc<super::Refusals>,
) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (inbox, admission, refusals) = (inbox.clone(), admission.clone(), refusals.clone());
        tokio::spawn(async move {
            let stream = match &admission.tls {
                None => Stream::Plain(stream),
                Some(tls) => match crate::tls::accept(&tls.acceptor, stream, HELLO_TIMEOUT).await {
                    Ok(s) if tls.is_core(&s) => s,
                    Ok(_) => {
                        tracing::warn!(%addr, "a link with a certificate that is not a core server's; dropped");
                        refusals.peer_links.fetch_add(1, Relaxed);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "TLS handshake on the peer port failed");
                        refusals.tls_handshakes.fetch_add(1, Relaxed);
                        refusals.peer_links.fetch_add(1, Relaxed);
                        return;
                    }
                },
            };
            if !read_link(stream, addr, conn, inbox, admission.secret).await {
                refusals.peer_links.fetch_add(1, Relaxed);
            }
        });
    }
}

/// Reads one incoming link: its hello (and with a secret, the proof),
/// then messages until it ends or sends something undecodable (then only
/// this link is dropped). False when it was dropped before admission.
async fn read_link(
    stream: Stream,
    addr: std::net::SocketAddr,
    conn: u64,
    inbox: flume::Sender<Inbound>,
    secret: Option<Arc<str>>,
) -> bool {
    let (read, mut write) = stream.into_split();
    let mut framed = FramedRead::new(read, handshake_codec());
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(f))) => ciborium::from_reader::<LinkHello, _>(&f[..]),
        _ => {
            tracing::debug!(%addr, "link closed before its hello");
            return false;
        }
    };
    let hello = match hello {
        Ok(h) if h.version == LINK_VERSION => h,
        Ok(h) => {
            tracing::warn!(%addr, version = h.version, "link speaks another version; dropped");
            return false;
        }
        Err(e) => {
            tracing::warn!(%addr, error = %e, "link hello not valid; dropped");
            return false;
        }
    };
    let peer = hello.node;
    if let Some(secret) = &secret {
        let Some(theirs) = hello.nonce else {
            tracing::warn!(%addr, node = %peer, "a link that does not offer to prove the core's secret; dropped");
            return false;
        };
        let mine = nonce();
        let challenge = LinkChallenge {
            nonce: mine.clone(),
            proof: proof(secret, CALLED, &theirs, &mine, peer),
        };
        if !send(&mut write, &challenge).await {
            return false;
        }
        let answer = next_record::<LinkAnswer, _>(&mut framed).await;
        if !answer.is_some_and(|a| proves(secret, CALLER, (&mine, &theirs), peer, &a.proof)) {
            tracing::warn!(%addr, node = %peer, "a link that did not prove the core's secret; dropped");
            return false;
        }
    }
    // Admitted: full-sized frames from here on.
    framed
        .decoder_mut()
        .set_max_frame_length(PEER_FRAME_LEN_MAX);
    loop {
        let Some(mut next) = framed.next().await else {
            break;
        };
        let mut batch: Vec<PeerMsg> = Vec::new();
        let end = loop {
            match next {
                Ok(content) => match wire::decode(content.freeze()) {
                    Ok(msg) => batch.push(msg),
                    Err(e) => {
                        tracing::warn!(node = %peer, error = %e, "undecodable frame; link dropped");
                        break true;
                    }
                },
                Err(e) => {
                    tracing::debug!(node = %peer, error = %e, "link read failed");
                    break true;
                }
            }
            if batch.len() >= READ_BATCH_MAX {
                break false;
            }
            match framed.next().now_or_never() {
                Some(Some(n)) => next = n,
                Some(None) => break true,
                None => break false,
            }
        };
        if !batch.is_empty()
            && inbox
                .send_async(Inbound::Peer(peer, conn, batch))
                .await
                .is_err()
        {
            return true;
        }
        if end {
            break;
        }
    }
    let _ = inbox.send_async(Inbound::IncomingDown(peer, conn)).await;
    true
}
