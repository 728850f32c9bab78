//! The bare fan-out server: the machine's ceiling for the fan-out run.
//!
//! A tokio server that does nothing but copy: a publisher's bytes, cut at
//! frame boundaries, go as one shared buffer to every subscriber's queue,
//! and each subscriber's writer sends its queue with vectored writes. No
//! order across publishers, no acknowledgement, no retention, no
//! membership, no checks. It runs like an in-process Canopy node (its own
//! two runtime threads) and its client is as thin as a client can be, so
//! that what Canopy costs over it is Canopy's own work.
//!
//! Wire: the client's first byte is its role (`S` subscriber, `P`
//! publisher); a subscriber then waits for one byte back (its queue is
//! registered). Messages are a `u32` little-endian length and the payload,
//! both ways.

use anyhow::Context;
use bytes::{Buf, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Chunks a subscriber may have queued before the publisher waits for it.
const QUEUE: usize = 1024;
/// Read buffer size.
const READ: usize = 64 << 10;

type Subscribers = Arc<Mutex<Vec<flume::Sender<Bytes>>>>;

/// A bare fan-out server on its own runtime threads; stops when dropped.
pub struct BareServer {
    /// Its address.
    pub addr: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for BareServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl BareServer {
    /// Starts the server on a free loopback port.
    pub fn start() -> anyhow::Result<BareServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bare-fanout")
            .enable_all()
            .build()?;
        // Bound here, served on the server's runtime (the caller may be
        // inside another runtime, where blocking on this one is refused).
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let subscribers = Subscribers::default();
        runtime.spawn(async move {
            let Ok(listener) = TcpListener::from_std(listener) else {
                return;
            };
            while let Ok((socket, _)) = listener.accept().await {
                let _ = socket.set_nodelay(true);
                tokio::spawn(serve(socket, subscribers.clone()));
            }
        });
        Ok(BareServer {
            addr,
            runtime: Some(runtime),
        })
    }
}

async fn serve(mut socket: TcpStream, subscribers: Subscribers) -> std::io::Result<()> {
    match socket.read_u8().await? {
        b'S' => {
            let (tx, rx) = flume::bounded(QUEUE);
            subscribers.lock().map_err(poisoned)?.push(tx);
            socket.write_u8(1).await?;
            write_queue(socket, rx).await
        }
        b'P' => {
            let mut buf = BytesMut::with_capacity(READ);
            loop {
                if socket.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
                let whole = complete_frames(&buf);
                if whole == 0 {
                    buf.reserve(READ);
                    continue;
                }
                let chunk = buf.split_to(whole).freeze();
                if buf.capacity() < READ / 4 {
                    buf.reserve(READ);
                }
                let targets = subscribers.lock().map_err(poisoned)?.clone();
                for tx in &targets {
                    // A subscriber that left is dropped below.
                    let _ = tx.send_async(chunk.clone()).await;
                }
                if targets.iter().any(|t| t.is_disconnected()) {
                    subscribers
                        .lock()
                        .map_err(poisoned)?
                        .retain(|t| !t.is_disconnected());
                }
            }
        }
        _ => Ok(()),
    }
}

fn poisoned<T>(_: T) -> std::io::Error {
    std::io::Error::other("subscriber table poisoned")
}

/// The length of the whole frames at the start of `buf`.
fn complete_frames(buf: &[u8]) -> usize {
    let mut at = 0;
    while let Some(head) = buf.get(at..at + 4) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if buf.len() - at - 4 < len {
            break;
        }
        at += 4 + len;
    }
    at
}

/// Sends a subscriber's queue: everything waiting goes in vectored writes.
async fn write_queue(mut socket: TcpStream, rx: flume::Receiver<Bytes>) -> std::io::Result<()> {
    let mut pending: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    while let Ok(first) = rx.recv_async().await {
        pending.push_back(first);
        while pending.len() < 64 {
            match rx.try_recv() {
                Ok(b) => pending.push_back(b),
                Err(_) => break,
            }
        }
        while !pending.is_empty() {
            // (No allocation per write: the ceiling must not pay for one.)
            let mut slices = [IoSlice::new(&[]); 64];
            let count = pending.len().min(slices.len());
            for (slot, b) in slices.iter_mut().zip(&pending) {
                *slot = IoSlice::new(b);
            }
            let mut n = socket.write_vectored(&slices[..count]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let Some(front) = pending.front_mut() else {
                    break;
                };
                let take = n.min(front.len());
                front.advance(take);
                n -= take;
                if front.is_empty() {
                    pending.pop_front();
                }
            }
        }
    }
    Ok(())
}

/// A publisher's connection: sends append to a buffer that a writer task
/// sends as it can, as the NATS client does, so that a burst goes out in
/// large writes and a lone message at once.
pub struct BarePublisher {
    shared: Arc<Outgoing>,
    written: tokio::sync::watch::Receiver<u64>,
    writer: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Outgoing {
    /// Bytes not handed to the socket yet, and how many were ever queued.
    buf: Mutex<(BytesMut, u64)>,
    wake: tokio::sync::Notify,
}

impl Drop for BarePublisher {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

impl BarePublisher {
    /// Connects as a publisher.
    pub async fn connect(addr: &str) -> anyhow::Result<BarePublisher> {
        let mut socket = TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        socket.write_u8(b'P').await?;
        let shared = Arc::new(Outgoing::default());
        let (tx, written) = tokio::sync::watch::channel(0u64);
        let out = shared.clone();
        let writer = tokio::spawn(async move {
            let mut total = 0u64;
            loop {
                out.wake.notified().await;
                loop {
                    let chunk = match out.buf.lock() {
                        Ok(mut b) => b.0.split(),
                        Err(_) => return,
                    };
                    if chunk.is_empty() {
                        break;
                    }
                    if socket.write_all(&chunk).await.is_err() {
                        return;
                    }
                    total += chunk.len() as u64;
                    let _ = tx.send(total);
                }
            }
        });
        Ok(BarePublisher {
            shared,
            written,
            writer,
        })
    }

    /// Queues one message for the writer.
    pub async fn send(&self, payload: &[u8]) -> anyhow::Result<()> {
        let len = u32::try_from(payload.len()).context("payload over 4 GiB")?;
        {
            let mut b = self.shared.buf.lock().map_err(|_| poisoned(()))?;
            b.0.extend_from_slice(&len.to_le_bytes());
            b.0.extend_from_slice(payload);
            b.1 += 4 + u64::from(len);
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Waits until everything queued was written to the socket.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let queued = self.shared.buf.lock().map_err(|_| poisoned(()))?.1;
        let mut written = self.written.clone();
        written
            .wait_for(|w| *w >= queued)
            .await
            .context("the bare publisher's writer stopped")?;
        Ok(())
    }
}

/// Connects a subscriber and returns its payloads, each sliced out of the
/// received buffer.
pub async fn subscribe(addr: &str) -> anyhow::Result<BoxStream<'static, Bytes>> {
    let mut socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    socket.write_u8(b'S').await?;
    socket
        .read_u8()
        .await
        .context("the bare server did not register the subscriber")?;
    let state = (socket, BytesMut::with_capacity(READ), 0usize);
    Ok(
        futures::stream::unfold(state, |(mut socket, mut buf, mut whole)| async move {
            loop {
                if whole > 0 {
                    let len = buf.get_u32_le() as usize;
                    whole -= 4 + len;
                    let payload = buf.split_to(len).freeze();
                    return Some((payload, (socket, buf, whole)));
                }
                whole = complete_frames(&buf);
                if whole > 0 {
                    continue;
                }
                if buf.capacity() - buf.len() < READ / 4 {
                    buf.reserve(READ);
                }
                match socket.read_buf(&mut buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                }
            }
        })
        .boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_at_whole_boundaries() {
        let mut b = Vec::new();
        for p in [&b"ab"[..], b"", b"cde"] {
            b.extend_from_slice(&(p.len() as u32).to_le_bytes());
            b.extend_from_slice(p);
        }
        assert_eq!(complete_frames(&b), b.len());
        assert_eq!(complete_frames(&b[..b.len() - 1]), 6 + 4);
        assert_eq!(complete_frames(&b[..3]), 0);
    }

    #[test]
    fn every_subscriber_gets_every_message_in_order() -> anyhow::Result<()> {
        let server = BareServer::start()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut subs = Vec::new();
            for _ in 0..3 {
                subs.push(subscribe(&server.addr).await?);
            }
            let publisher = BarePublisher::connect(&server.addr).await?;
            for i in 0..1000u32 {
                publisher
                    .send(&i.to_le_bytes().repeat(i as usize % 50))
                    .await?;
            }
            publisher.flush().await?;
            for s in &mut subs {
                for i in 0..1000u32 {
                    let p = tokio::time::timeout(std::time::Duration::from_secs(10), s.next())
                        .await?
                        .context("stream ended")?;
                    assert_eq!(p, i.to_le_bytes().repeat(i as usize % 50));
                }
            }
            anyhow::Ok(())
        })
    }
}
