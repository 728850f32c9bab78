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
//! Bounds: each outgoing queue holds `LINK_QUEUE_MAX` frames. A peer that
//! does not read that much is treated as a broken link: the queue is
//! replaced and the connection dropped, and the protocol recovers.

use super::Inbound;
use crate::core::group::{wire, NodeId, PeerMsg};
use bytes::Bytes;
use canopy_client::io::write_frames;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
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
/// of them cannot decode. 2: the sequencer's `Retried`.
const LINK_VERSION: u32 = 2;

/// Numbers incoming connections in the order they were accepted.
static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The node task's handles on its outgoing links.
pub(super) struct Links {
    me: NodeId,
    secret: Option<Arc<str>>,
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
        secret: Option<Arc<str>>,
    ) -> Self {
        let mut links = Links {
            me,
            secret,
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
            self.secret.clone(),
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
    secret: Option<Arc<str>>,
) {
    let mut delay = RECONNECT_MIN;
    loop {
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            c = TcpStream::connect(&addr) => c,
        };
        let mut stream = match connected {
            Ok(s) => s,
            Err(e) => {
                tracing::trace!(node = %peer, %addr, error = %e, "cannot reach peer");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let admitted = match &secret {
            None => {
                let hello = LinkHello {
                    version: LINK_VERSION,
                    node: me,
                    nonce: None,
                };
                stream.write_all(&frame(&hello)).await.is_ok()
            }
            Some(secret) => tokio::select! {
                _ = cancel.cancelled() => return,
                ok = prove(&mut stream, me, peer, secret) => ok,
            },
        };
        if !admitted {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RECONNECT_MAX);
            continue;
        }
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

/// The caller's side of the admission handshake (module docs): true once
/// both ends proved they know the secret.
async fn prove(stream: &mut TcpStream, me: NodeId, peer: NodeId, secret: &str) -> bool {
    let mine = nonce();
    let hello = LinkHello {
        version: LINK_VERSION,
        node: me,
        nonce: Some(mine.clone()),
    };
    if stream.write_all(&frame(&hello)).await.is_err() {
        return false;
    }
    let (read, mut write) = stream.split();
    let mut framed = FramedRead::new(read, handshake_codec());
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
    write.write_all(&frame(&answer)).await.is_ok()
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
    secret: Option<Arc<str>>,
    refused: Arc<AtomicU64>,
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
        let (inbox, secret, refused) = (inbox.clone(), secret.clone(), refused.clone());
        tokio::spawn(async move {
            if !read_link(stream, addr, conn, inbox, secret).await {
                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
}

/// Reads one incoming link: its hello (and with a secret, the proof),
/// then messages until it ends or sends something undecodable (then only
/// this link is dropped). False when it was dropped before admission.
async fn read_link(
    stream: TcpStream,
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
        if write.write_all(&frame(&challenge)).await.is_err() {
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
                Ok(content) => match wire::decode(&content) {
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
