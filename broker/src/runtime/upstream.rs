//! A relay's connection to the tier above: connect, read and decode, write.
//!
//! The [`Upstream`](crate::core::cltsvr::upstream::Upstream) state machine decides
//! where to connect and what to send; this only moves bytes. Each
//! connection has a number, and the node task ignores what an older one
//! reports, so a connection replaced mid-read cannot feed stale frames.

use super::Inbound;
use bytes::Bytes;
use canopy_client::io::write_frames;
use canopy_client::protocol;
use canopy_client::tls::TlsConnector;
use futures::{FutureExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// Frames queued for the tier above; a full queue drops the connection
/// (the relay reconnects and resends what was not ordered).
const QUEUE_FRAMES_MAX: usize = 131_072;
/// Frames a reader decodes before it hands them to the node in one message.
const READ_BATCH_MAX: usize = 256;
/// Frames the writer takes from its queue per turn.
const WRITE_BATCH_MAX: usize = 64;

/// The relay's one connection to the tier above.
pub(super) struct UpLink {
    inbox: flume::Sender<Inbound>,
    /// The current connection's number.
    conn: u64,
    out: Option<flume::Sender<Bytes>>,
    task: Option<JoinHandle<()>>,
    /// TLS to the tier above (`[tls]`), or plain TCP.
    tls: Option<TlsConnector>,
}

impl UpLink {
    pub(super) fn new(inbox: flume::Sender<Inbound>, tls: Option<TlsConnector>) -> Self {
        UpLink {
            inbox,
            conn: 0,
            out: None,
            task: None,
            tls,
        }
    }

    /// Whether `conn` is the current connection.
    pub(super) fn is_current(&self, conn: u64) -> bool {
        conn == self.conn && self.task.is_some()
    }

    /// Drops any connection and opens one to `addr`.
    pub(super) fn connect(&mut self, addr: String) {
        self.close();
        self.conn += 1;
        let (out, out_rx) = flume::bounded(QUEUE_FRAMES_MAX);
        self.out = Some(out);
        self.task = Some(tokio::spawn(run(
            self.conn,
            addr,
            self.inbox.clone(),
            out_rx,
            self.tls.clone(),
        )));
    }

    /// Queues `frame`; false when the queue is full. With no connection
    /// open the frame is dropped: the relay already knows it is down.
    pub(super) fn send(&mut self, frame: Bytes) -> bool {
        self.out.as_ref().is_none_or(|o| o.try_send(frame).is_ok())
    }

    /// Drops the connection.
    pub(super) fn close(&mut self) {
        self.out = None;
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn run(
    conn: u64,
    addr: String,
    inbox: flume::Sender<Inbound>,
    out: flume::Receiver<Bytes>,
    tls: Option<TlsConnector>,
) {
    let stream = match canopy_client::tls::connect(&addr, tls.as_ref()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(server = %addr, error = %e, "cannot connect to the tier above");
            let _ = inbox.send_async(Inbound::UpClosed(conn)).await;
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    if inbox.send_async(Inbound::UpConnected(conn)).await.is_err() {
        return;
    }
    // Aborted with this task (a closed connection's queue must not go on
    // writing to the old socket).
    let _writer = AbortOnDrop(tokio::spawn(async move {
        let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
        while let Ok(frame) = out.recv_async().await {
            batch.push(frame);
            batch.extend(out.try_iter().take(WRITE_BATCH_MAX - 1));
            if write_frames(&mut write, &mut batch).await.is_err() {
                return;
            }
        }
    }));
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(protocol::FRAME_LEN_MAX_LIMIT + protocol::FRAME_HEAD_ALLOWANCE)
        .new_codec();
    let mut framed = FramedRead::new(read, codec);
    loop {
        let mut batch = Vec::new();
        let mut next = framed.next().await;
        let ended = loop {
            match next {
                Some(Ok(content)) => match protocol::decode_server(content.freeze()) {
                    Ok(frame) => batch.push(frame),
                    Err(e) => {
                        tracing::warn!(server = %addr, error = %e, "undecodable frame from the tier above");
                        break true;
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(server = %addr, error = %e, "read from the tier above failed");
                    break true;
                }
                None => break true,
            }
            if batch.len() >= READ_BATCH_MAX {
                break false;
            }
            match framed.next().now_or_never() {
                Some(n) => next = n,
                None => break false,
            }
        };
        if !batch.is_empty()
            && inbox
                .send_async(Inbound::UpFrames(conn, batch))
                .await
                .is_err()
        {
            break;
        }
        if ended {
            let _ = inbox.send_async(Inbound::UpClosed(conn)).await;
            break;
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
