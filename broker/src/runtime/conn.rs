//! Connection tasks: accept, read and decode, write and coalesce.

use super::outbound::{Budget, Outbound, Queued};
use super::{Inbound, Refusals, SessionIo};
use crate::auth::Accounts;
use crate::config::ServerConfig;
use crate::core::SessionId;
use bytes::Bytes;
use canopy_client::io::write_frames as write_all;
use canopy_client::protocol::{self, ClientFrame, ErrorCode};
use canopy_client::tls::{ReadHalf, Stream, WriteHalf};
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

/// Frames a reader decodes before it hands them to the node in one message.
const READ_BATCH_MAX: usize = 256;
/// Frames a writer takes from its queue per turn.
const WRITE_BATCH_MAX: usize = 64;

/// The node's last word to a writer.
pub(super) struct CloseOrder {
    /// Sent last, if given.
    pub frame: Option<Bytes>,
    /// Whether frames already queued go out first.
    pub drain: bool,
}

/// Connections held per client address, when limited: a [`Slot`] per
/// connection, given back when its reader ends.
#[derive(Clone, Default)]
struct PerAddress(Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>);

/// One connection's place in its address's count.
struct Slot(PerAddress, IpAddr);

impl PerAddress {
    fn take(&self, ip: IpAddr, max: usize) -> Option<Slot> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = (self.0)
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

/// Refuses a connection before the node hears of it: the error, then the
/// close (a peer that does not read gets a moment, no more).
async fn refuse(mut stream: Stream, code: ErrorCode, message: String) {
    let frame = protocol::encode_error(code, &message);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        stream.write_all(&frame).await?;
        stream.flush().await
    })
    .await;
}

/// With `[tls]`, the handshake (within the handshake timeout); failures
/// are counted and logged, and end the connection.
async fn secure(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    config: &ServerConfig,
    refusals: &Refusals,
) -> Option<Stream> {
    let Some(tls) = &config.tls else {
        return Some(Stream::Plain(stream));
    };
    match crate::tls::accept(&tls.clients, stream, config.node.handshake_timeout).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            refusals.tls_handshakes.fetch_add(1, Relaxed);
            None
        }
    }
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    inbox: flume::Sender<Inbound>,
    config: ServerConfig,
    refusals: Arc<Refusals>,
    budget: Arc<Budget>,
) {
    let config = Arc::new(config);
    let mut next = 1u64;
    let per_address = PerAddress::default();
    // TLS handshakes in progress hold a permit: at most as many as the
    // connections the node takes (a handshake costs memory and CPU before
    // anyone is known).
    let handshakes = Arc::new(tokio::sync::Semaphore::new(config.node.sessions_max));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and similar: wait a little, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let slot = match config.connections_per_address_max {
            None => None,
            Some(max) => match per_address.take(peer.ip(), max) {
                Some(slot) => Some(slot),
                None => {
                    tracing::info!(%peer, max, "connection refused: its address holds its maximum");
                    // Over TLS, dropped without a handshake: a refusal
                    // must cost less than a connection.
                    if config.tls.is_none() {
                        let msg =
                            format!("{} holds its maximum of {max} connections here", peer.ip());
                        tokio::spawn(refuse(
                            Stream::Plain(stream),
                            ErrorCode::TooManyFromAddress,
                            msg,
                        ));
                    }
                    continue;
                }
            },
        };
        let permit = match config.tls.is_some() {
            false => None,
            true => match handshakes.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    tracing::warn!(%peer, "connection dropped: too many TLS handshakes in progress");
                    refusals.tls_handshakes.fetch_add(1, Relaxed);
                    continue;
                }
            },
        };
        let session = SessionId(next);
        next += 1;
        tracing::debug!(%session, %peer, "accepted");
        let (inbox, config, refusals) = (inbox.clone(), config.clone(), refusals.clone());
        let budget = budget.clone();
        tokio::spawn(async move {
            let Some(stream) = secure(stream, peer, &config, &refusals).await else {
                return;
            };
            drop(permit);
            serve(stream, peer, session, inbox, &config, budget).await;
            // The connection's place in its address's count goes with it.
            drop(slot);
        });
    }
}

/// Runs one connection: tells the node of it, then reads it until it
/// ends (its writer runs beside).
async fn serve(
    stream: Stream,
    peer: std::net::SocketAddr,
    session: SessionId,
    inbox: flume::Sender<Inbound>,
    config: &ServerConfig,
    budget: Arc<Budget>,
) {
    let certificate = crate::tls::peer_names(&stream);
    let (read, write) = stream.into_split();
    let (queue_tx, queue_rx) = Outbound::new(budget, config.queue_frames_max);
    let (close_tx, close_rx) = oneshot::channel();
    let cancel = CancellationToken::new();
    let io = SessionIo {
        queue: queue_tx,
        close: close_tx,
        reader: cancel.clone(),
        peer,
    };
    // Open goes into the inbox before the reader can send anything, so
    // the node always hears of a session before its frames.
    if inbox.send_async(Inbound::Open(session, io)).await.is_err() {
        return;
    }
    tokio::spawn(write_loop(write, queue_rx, close_rx));
    let accounts = config.accounts.clone().map(|a| (a, certificate));
    read_loop(
        read,
        session,
        inbox,
        cancel,
        config.node.frame_len_max,
        accounts,
    )
    .await;
}

/// Reads a session's frames for the node. With `accounts`, the first
/// `Hello`'s credentials (or, without any, the names of the client's
/// certificate) are checked before it goes on.
async fn read_loop(
    read: ReadHalf,
    session: SessionId,
    inbox: flume::Sender<Inbound>,
    cancel: CancellationToken,
    frame_len_max: usize,
    mut accounts: Option<(Arc<Accounts>, Vec<String>)>,
) {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(frame_len_max)
        .new_codec();
    let mut framed = FramedRead::new(read, codec);
    // The user's publish rate, once it is known (`auth`).
    let mut bucket: Option<Arc<std::sync::Mutex<crate::auth::Bucket>>> = None;
    // Room for as many frames as the last batch had (a busy publisher's
    // batches are hundreds of frames: grown one push at a time, each
    // batch was reallocated several times).
    let mut room = 1;
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            next = framed.next() => next,
        };
        let mut batch = Vec::with_capacity(room);
        let mut next = first;
        // Past the user's rate: read no more until it allows.
        let mut pause = None;
        let end = loop {
            match next {
                Some(Ok(content)) => match protocol::decode_client(content.freeze()) {
                    Ok(ClientFrame::Hello(mut hello)) if accounts.is_some() => {
                        // Checked here, off the node's loop (a password
                        // takes tens of milliseconds), once per connection;
                        // the credentials go no further.
                        let credentials = hello.auth.take();
                        let Some((accounts, certificate)) = accounts.take() else {
                            break None;
                        };
                        let checker = accounts.clone();
                        let check = tokio::task::spawn_blocking(move || {
                            checker.check(credentials.as_ref(), &certificate)
                        });
                        match check.await {
                            Ok(Ok(permissions)) => {
                                tracing::debug!(%session, user = %permissions.user, "authenticated");
                                bucket = accounts.rate_of(&permissions.user);
                                let who = Inbound::Authenticated(session, permissions);
                                if inbox.send_async(who).await.is_err() {
                                    return;
                                }
                                batch.push(ClientFrame::Hello(hello));
                            }
                            Ok(Err(why)) => {
                                tracing::info!(%session, name = %hello.name, why, "credentials refused");
                                break Some(Inbound::Bad(session, ErrorCode::AuthFailed, why));
                            }
                            Err(_) => break Some(Inbound::Closed(session)),
                        }
                    }
                    Ok(frame @ ClientFrame::Publish(_)) if bucket.is_some() => {
                        batch.push(frame);
                        let wait = bucket.as_ref().and_then(|b| {
                            b.lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .take(std::time::Instant::now())
                        });
                        if wait.is_some() {
                            pause = wait;
                            break None;
                        }
                    }
                    Ok(frame) => batch.push(frame),
                    Err(e) => break Some(Inbound::Bad(session, e.code(), e.to_string())),
                },
                Some(Err(e)) => break Some(read_error(session, frame_len_max, e)),
                None => break Some(Inbound::Closed(session)),
            }
            if batch.len() >= READ_BATCH_MAX {
                break None;
            }
            // Take whatever else is already buffered, without waiting.
            match framed.next().now_or_never() {
                Some(n) => next = n,
                None => break None,
            }
        };
        room = batch.len().max(1);
        if !batch.is_empty()
            && inbox
                .send_async(Inbound::Frames(session, batch))
                .await
                .is_err()
        {
            return;
        }
        if let Some(end) = end {
            let _ = inbox.send_async(end).await;
            return;
        }
        if let Some(wait) = pause {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn read_error(session: SessionId, frame_len_max: usize, e: std::io::Error) -> Inbound {
    let too_long = e
        .get_ref()
        .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>());
    if too_long {
        let msg = format!("frame longer than the {frame_len_max}-byte limit");
        Inbound::Bad(session, ErrorCode::FrameTooLarge, msg)
    } else {
        tracing::debug!(%session, error = %e, "read failed");
        Inbound::Closed(session)
    }
}

/// How long a closing writer keeps trying to get its last frames out to a
/// peer that does not read, before it drops the connection.
const CLOSE_WRITE_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Drains the session's queue into the socket until the node closes the
/// session (a [`CloseOrder`]) or the queue's sender is dropped.
///
/// A close order is watched even in the middle of a write, so a peer that
/// stopped reading cannot pin the socket and its queue: the write in
/// progress gets [`CLOSE_WRITE_TIME_MAX`] to finish (a frame cut in half
/// would corrupt the stream for the final error frame), then the final
/// frames get the same, and then the connection is dropped regardless.
async fn write_loop(
    mut write: WriteHalf,
    queue: flume::Receiver<Queued>,
    mut close: oneshot::Receiver<CloseOrder>,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(WRITE_BATCH_MAX);
    let mut close_live = true;
    let order = loop {
        tokio::select! {
            biased;
            order = &mut close, if close_live => match order {
                Ok(order) => break order,
                // The node dropped the session without an order: the peer
                // is gone; finish what is queued.
                Err(_) => close_live = false,
            },
            frame = queue.recv_async() => {
                let Ok(frame) = frame else {
                    // The node sends its close order before it drops the
                    // queue, but both can land between this select's polls
                    // of `close` and `queue`: look for the order once more.
                    if let Ok(order) = close.try_recv() {
                        break order;
                    }
                    let _ = tokio::time::timeout(CLOSE_WRITE_TIME_MAX, write.shutdown()).await;
                    return;
                };
                batch.push(frame);
                batch.extend(queue.try_iter().take(WRITE_BATCH_MAX - 1));
                let written = write_all(&mut write, &mut batch);
                tokio::pin!(written);
                let mut interrupted: Option<(CloseOrder, tokio::time::Instant)> = None;
                let result = loop {
                    let give_up = interrupted.as_ref().map(|(_, t)| *t);
                    tokio::select! {
                        biased;
                        r = &mut written => break Some(r),
                        order = &mut close, if close_live && interrupted.is_none() => match order {
                            Ok(order) => {
                                let t = tokio::time::Instant::now() + CLOSE_WRITE_TIME_MAX;
                                interrupted = Some((order, t));
                            }
                            Err(_) => close_live = false,
                        },
                        _ = sleep_until_some(give_up) => break None,
                    }
                };
                match (result, interrupted) {
                    (Some(Ok(())), None) => {}
                    (Some(Ok(())), Some((order, _))) => break order,
                    // A failed write or a peer that would not read: drop it.
                    (Some(Err(_)), _) | (None, _) => return,
                }
            }
        }
    };
    let mut queued: Vec<Queued> = Vec::new();
    if order.drain {
        queued.extend(queue.drain());
    }
    let mut last: Vec<Bytes> = order.frame.into_iter().collect();
    let _ = tokio::time::timeout(CLOSE_WRITE_TIME_MAX, async {
        write_all(&mut write, &mut queued).await?;
        write_all(&mut write, &mut last).await
    })
    .await;
    let _ = tokio::time::timeout(CLOSE_WRITE_TIME_MAX, write.shutdown()).await;
}

async fn sleep_until_some(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
