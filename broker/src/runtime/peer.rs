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
/// A link's first frame must arrive within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The first frame on a link: who is calling.
#[derive(Debug, Serialize, Deserialize)]
struct LinkHello {
    /// Link protocol version.
    version: u32,
    /// The caller.
    node: NodeId,
}

/// The peer protocol's version: servers of another version refuse each
/// other's links at the hello, rather than drop them later on a message one
/// of them cannot decode. 2: the sequencer's `Retried`.
const LINK_VERSION: u32 = 2;

/// Numbers incoming connections in the order they were accepted.
static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The node task's handles on its outgoing links.
pub(super) struct Links {
    me: NodeId,
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
    ) -> Self {
        let mut links = Links {
            me,
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
        let hello = hello_frame(me);
        if stream.write_all(&hello).await.is_err() {
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

fn hello_frame(me: NodeId) -> Vec<u8> {
    let mut buf = vec![0; 4];
    let hello = LinkHello {
        version: LINK_VERSION,
        node: me,
    };
    ciborium::into_writer(&hello, &mut buf).expect("invariant: encoding into a Vec cannot fail");
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf
}

/// Accepts links from other core servers.
pub(super) async fn accept_loop(listener: TcpListener, inbox: flume::Sender<Inbound>) {
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
        tokio::spawn(read_link(stream, addr, conn, inbox.clone()));
    }
}

/// Reads one incoming link: its hello, then messages until it ends or
/// sends something undecodable (then only this link is dropped).
async fn read_link(
    stream: TcpStream,
    addr: std::net::SocketAddr,
    conn: u64,
    inbox: flume::Sender<Inbound>,
) {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(PEER_FRAME_LEN_MAX)
        .new_codec();
    let mut framed = FramedRead::new(stream, codec);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(f))) => ciborium::from_reader::<LinkHello, _>(&f[..]),
        _ => {
            tracing::debug!(%addr, "link closed before its hello");
            return;
        }
    };
    let peer = match hello {
        Ok(h) if h.version == LINK_VERSION => h.node,
        Ok(h) => {
            tracing::warn!(%addr, version = h.version, "link speaks another version; dropped");
            return;
        }
        Err(e) => {
            tracing::warn!(%addr, error = %e, "link hello not valid; dropped");
            return;
        }
    };
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
            return;
        }
        if end {
            break;
        }
    }
    let _ = inbox.send_async(Inbound::IncomingDown(peer, conn)).await;
}
