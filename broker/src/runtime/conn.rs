//! Connection tasks: accept, read and decode, write and coalesce.

use super::{Inbound, SessionIo};
use crate::config::ServerConfig;
use crate::core::SessionId;
use bytes::Bytes;
use canopy_client::io::write_frames as write_all;
use canopy_client::protocol::{self, ErrorCode};
use futures::{FutureExt, StreamExt};
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

pub(super) async fn accept_loop(
    listener: TcpListener,
    inbox: flume::Sender<Inbound>,
    config: ServerConfig,
) {
    let mut next = 1u64;
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
        let session = SessionId(next);
        next += 1;
        tracing::debug!(%session, %peer, "accepted");
        let (read, write) = stream.into_split();
        let (queue_tx, queue_rx) = flume::bounded(config.queue_frames_max);
        let (close_tx, close_rx) = oneshot::channel();
        let cancel = CancellationToken::new();
        let io = SessionIo {
            queue: queue_tx,
            close: close_tx,
            reader: cancel.clone(),
        };
        // Open goes into the inbox before the reader can send anything, so
        // the node always hears of a session before its frames.
        if inbox.send_async(Inbound::Open(session, io)).await.is_err() {
            return;
        }
        tokio::spawn(write_loop(write, queue_rx, close_rx));
        tokio::spawn(read_loop(
            read,
            session,
            inbox.clone(),
            cancel,
            config.node.frame_len_max,
        ));
    }
}

async fn read_loop(
    read: tokio::net::tcp::OwnedReadHalf,
    session: SessionId,
    inbox: flume::Sender<Inbound>,
    cancel: CancellationToken,
    frame_len_max: usize,
) {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(frame_len_max)
        .new_codec();
    let mut framed = FramedRead::new(read, codec);
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            next = framed.next() => next,
        };
        let mut batch = Vec::new();
        let mut next = first;
        let end = loop {
            match next {
                Some(Ok(content)) => match protocol::decode_client(content.freeze()) {
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

async fn write_loop(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    queue: flume::Receiver<Bytes>,
    mut close: oneshot::Receiver<CloseOrder>,
) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH_MAX);
    let mut close_live = true;
    loop {
        tokio::select! {
            biased;
            order = &mut close, if close_live => {
                let Ok(order) = order else {
                    // The node dropped the session without an order: the
                    // peer is gone; finish what is queued.
                    close_live = false;
                    continue;
                };
                if order.drain {
                    batch.extend(queue.drain());
                }
                batch.extend(order.frame);
                let _ = write_all(&mut write, &mut batch).await;
                let _ = write.shutdown().await;
                return;
            }
            frame = queue.recv_async() => {
                let Ok(frame) = frame else {
                    let _ = write.shutdown().await;
                    return;
                };
                batch.push(frame);
                batch.extend(queue.try_iter().take(WRITE_BATCH_MAX - 1));
                if write_all(&mut write, &mut batch).await.is_err() {
                    return;
                }
            }
        }
    }
}
