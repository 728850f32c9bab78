//! The tokio shell around the sans-IO [`Node`](crate::core::Node).
//!
//! It moves bytes and time and decides nothing: an acceptor task accepts TCP
//! connections; per connection a reader task decodes frames and a writer task
//! drains a bounded outbound queue into the socket; one node task owns the
//! `Node` outright, feeds it inputs and executes its outputs in order.
//!
//! Bounds: the node's inbox holds `INBOX_LEN_MAX` batches, which pushes back
//! on readers (and through TCP on publishers); each session's outbound queue
//! holds `queue_frames_max` frames, and a full queue is reported to the node,
//! which decides between cutting the session off and a gap notice.

mod conn;

use crate::config::ServerConfig;
use crate::core::{Node, Output, SessionId};
use anyhow::Context;
use bytes::Bytes;
use canopy_client::protocol::{ClientFrame, ErrorCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Batches the node's inbox holds before readers wait.
const INBOX_LEN_MAX: usize = 1024;
/// Inbox batches the node takes in one turn before it drains outputs.
const INBOX_TURN_MAX: usize = 256;

/// What connection tasks tell the node task.
enum Inbound {
    Open(SessionId, SessionIo),
    Frames(SessionId, Vec<ClientFrame>),
    Bad(SessionId, ErrorCode, String),
    Closed(SessionId),
}

/// The node task's handles on one connection.
struct SessionIo {
    queue: flume::Sender<Bytes>,
    close: oneshot::Sender<conn::CloseOrder>,
    reader: CancellationToken,
}

/// A running server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    node_task: JoinHandle<()>,
    accept_task: JoinHandle<()>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Tells every client the server is going away, closes them and waits
    /// for the node task to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.accept_task.abort();
        let _ = self.node_task.await;
    }

    /// Waits until the server stops (it stops only on shutdown).
    pub async fn wait(self) {
        let _ = self.node_task.await;
    }
}

/// Binds the listener and starts the server.
///
/// # Errors
/// When the listen address cannot be bound.
pub async fn start(config: ServerConfig) -> anyhow::Result<ServerHandle> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let (inbox_tx, inbox_rx) = flume::bounded(INBOX_LEN_MAX);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let started = Instant::now();
    let node = Node::new(Duration::ZERO, config.node.clone());
    tracing::info!(addr = %local_addr, name = %config.node.name, stream = config.node.stream, "listening");
    let node_task = tokio::spawn(run_node(node, started, inbox_rx, shutdown_rx));
    let accept_task = tokio::spawn(conn::accept_loop(listener, inbox_tx, config));
    Ok(ServerHandle {
        local_addr,
        shutdown,
        node_task,
        accept_task,
    })
}

async fn run_node(
    mut node: Node,
    started: Instant,
    inbox: flume::Receiver<Inbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sessions: HashMap<SessionId, SessionIo> = HashMap::new();
    loop {
        let deadline = node.poll_timeout().map_or_else(
            || Instant::now() + Duration::from_secs(3600),
            |t| started + t,
        );
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            msg = inbox.recv_async() => {
                let Ok(msg) = msg else { break };
                let now = started.elapsed();
                take(&mut node, &mut sessions, now, msg);
                // Take what else is already waiting before draining, so one
                // fan-out batch covers many publishes.
                for msg in inbox.try_iter().take(INBOX_TURN_MAX) {
                    take(&mut node, &mut sessions, now, msg);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
        // Checked after every turn, not only when the timer branch wins:
        // under sustained load the inbox is always ready.
        if Instant::now() >= deadline {
            node.handle_timeout(started.elapsed());
        }
        drain(&mut node, &mut sessions, started.elapsed());
    }
    tracing::info!(sessions = sessions.len(), "shutting down");
    let frame = canopy_client::protocol::encode(
        canopy_client::protocol::kind::ERROR,
        &canopy_client::protocol::ErrorFrame {
            code: ErrorCode::ShuttingDown,
            message: "server shutting down".into(),
        },
        &[],
    );
    for (_, io) in sessions.drain() {
        io.reader.cancel();
        let _ = io.close.send(conn::CloseOrder {
            frame: Some(frame.clone()),
            drain: true,
        });
    }
}

fn take(
    node: &mut Node,
    sessions: &mut HashMap<SessionId, SessionIo>,
    now: Duration,
    msg: Inbound,
) {
    match msg {
        Inbound::Open(id, io) => {
            sessions.insert(id, io);
            node.handle_open(now, id);
        }
        Inbound::Frames(id, frames) => {
            for f in frames {
                node.handle_frame(now, id, f);
            }
        }
        Inbound::Bad(id, code, message) => node.handle_bad_input(now, id, code, message),
        Inbound::Closed(id) => {
            sessions.remove(&id);
            node.handle_closed(now, id);
        }
    }
}

fn drain(node: &mut Node, sessions: &mut HashMap<SessionId, SessionIo>, now: Duration) {
    while let Some(out) = node.poll_output() {
        match out {
            Output::Transmit {
                session,
                frame,
                kind,
                seqs,
            } => {
                let Some(io) = sessions.get(&session) else {
                    continue;
                };
                if let Err(flume::TrySendError::Full(_)) = io.queue.try_send(frame) {
                    node.handle_queue_full(now, session, kind, seqs);
                }
            }
            Output::Close {
                session,
                frame,
                drain,
            } => {
                if let Some(io) = sessions.remove(&session) {
                    tracing::debug!(%session, drain, "closing session");
                    io.reader.cancel();
                    let _ = io.close.send(conn::CloseOrder { frame, drain });
                }
            }
        }
    }
}
