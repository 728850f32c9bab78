//! The tokio shell around the sans-IO [`Server`] (a [`Node`], and in a
//! core group its [`Group`]; in a relay, its connection to the tier
//! above, `upstream`).
//!
//! It moves bytes and time and decides nothing: an acceptor task accepts
//! client connections; per connection a reader task decodes frames and a
//! writer task drains a bounded outbound queue into the socket; in a core
//! group, `peer` keeps one outgoing link per other core server and reads the
//! links they open; one node task owns the `Server` outright, feeds it
//! inputs (client frames, peer messages, link up/down, time) and executes
//! its outputs in order.
//!
//! Bounds: the node's inbox holds `INBOX_LEN_MAX` batches (client and peer
//! alike), which pushes back on readers (and through TCP on publishers);
//! each session's outbound queue is bounded in frames and bytes, and the
//! node's queued bytes in total ([`outbound`]); a refused frame is reported
//! to the node, which decides between cutting the session off and a gap
//! notice; each peer link queues a bounded number of frames.
//!
//! When HTTP is on, the node task also publishes a dashboard snapshot once
//! per `SNAPSHOT_INTERVAL` through a `watch` channel that the HTTP server
//! (`canopy-dashboard`) reads; dashboards never touch the node itself.
//!
//! A core server keeps its group's hard state in its data directory
//! ([`disk`]): read once at start (a damaged file stops the start), and
//! written by the node task whenever the group hands out a new one, before
//! any peer frame queued after it is sent. A server that cannot write it
//! stops rather than send promises it could forget.

pub mod disk;

mod conn;
mod outbound;
mod peer;

pub use peer::LINK_VERSION;
mod report;
mod upstream;

use crate::config::ServerConfig;
use crate::core::cltsvr::upstream::Action;
use crate::core::group::{Group, Incarnation, NodeId, PeerMsg};
use crate::core::rrpc::{Job, Shared};
use crate::core::{Node, Output, Server, SessionId};
use anyhow::Context;
use bytes::Bytes;
use canopy_client::protocol::{ClientFrame, ErrorCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
/// Methods whose call latency the dashboard keeps apart (callers name
/// methods freely; past this they share one histogram).
const CALL_METHODS_MAX: usize = 64;
/// How often the dashboard snapshot is rebuilt.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(1);

/// What connection tasks tell the node task.
enum Inbound {
    Open(SessionId, SessionIo),
    Frames(SessionId, Vec<ClientFrame>),
    /// The session's credentials proved this user (before its `Hello`).
    Authenticated(SessionId, canopy_client::protocol::Permissions),
    Bad(SessionId, ErrorCode, String),
    Closed(SessionId),
    /// Messages from a core server, read on incoming connection `conn`.
    Peer(NodeId, u64, Vec<PeerMsg>),
    /// Incoming connection `conn` from a core server ended.
    IncomingDown(NodeId, u64),
    /// The outgoing link to a core server is connected.
    LinkUp(NodeId),
    /// A link to or from a core server broke.
    LinkDown(NodeId),
    /// A relay's connection `conn` to the tier above opened.
    UpConnected(u64),
    /// Frames from the tier above on connection `conn`.
    UpFrames(u64, Vec<canopy_client::protocol::ServerFrame>),
    /// A relay's connection `conn` to the tier above ended (or never
    /// opened).
    UpClosed(u64),
    /// A call of the replicated service, executed off the node task.
    Executed(Job, Result<Bytes, String>),
}

/// The node task's handles on one connection.
struct SessionIo {
    queue: outbound::Outbound,
    close: oneshot::Sender<conn::CloseOrder>,
    reader: CancellationToken,
    peer: SocketAddr,
}

/// A running server.
pub struct ServerHandle {
    local_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    http_task: Option<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    /// `None` once [`ServerHandle::stopped`] has seen it end.
    node_task: Option<JoinHandle<anyhow::Result<()>>>,
    accept_task: JoinHandle<()>,
    views: watch::Receiver<Option<InstalledView>>,
}

/// A view this server installed, as the shell reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstalledView {
    /// The view's epoch.
    pub epoch: u64,
    /// Its members' ids.
    pub members: Vec<u32>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the HTTP dashboard and API, when on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Tells every client the server is going away, closes them and waits
    /// for the node task to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.accept_task.abort();
        if let Some(t) = &self.http_task {
            t.abort();
        }
        if let Some(t) = self.node_task {
            let _ = t.await;
        }
    }

    /// Resolves when the server stops on its own, which it does only on a
    /// failure it must not serve through (a core server that cannot write
    /// its hard state); then pending forever. Cancel-safe, for a `select!`
    /// beside the signals that call [`ServerHandle::shutdown`].
    ///
    /// # Errors
    /// The failure that stopped it.
    pub async fn stopped(&mut self) -> anyhow::Result<()> {
        let Some(task) = &mut self.node_task else {
            return std::future::pending().await;
        };
        let ended = task.await;
        self.node_task = None;
        self.accept_task.abort();
        if let Some(t) = &self.http_task {
            t.abort();
        }
        ended.context("the node task panicked")?
    }

    /// The latest view this server installed (core servers only); changes
    /// as views are installed, for tools that time failovers.
    pub fn views(&self) -> watch::Receiver<Option<InstalledView>> {
        self.views.clone()
    }

    /// Waits until the server stops (on shutdown, or on a failure; see
    /// [`ServerHandle::stopped`]).
    ///
    /// # Errors
    /// The failure that stopped it.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        self.stopped().await
    }
}

/// Binds the listener and starts the server; a core server first reads its
/// hard state from its data directory and writes the new one (a higher
/// incarnation) back.
///
/// # Errors
/// When the listen address (or the HTTP address) cannot be bound, or a
/// core server's hard state cannot be read (missing is fine, damaged is
/// not) or written.
pub async fn start(config: ServerConfig) -> anyhow::Result<ServerHandle> {
    let service = match config.core.as_ref().and_then(|c| c.service.as_deref()) {
        Some(name) => Some(
            crate::services::builtin(name)
                .with_context(|| format!("no built-in service named {name:?}"))?,
        ),
        None => None,
    };
    start_with_service(config, service).await
}

/// Starts a server like [`start`], whose core server runs `service` as its
/// replica of the group's replicated service (docs/DESIGN.md, "Replicated
/// RPC"): the way a program of your own serves a [`Service`] of its own.
/// Every core server of a group must run the same service. Ignored by
/// relays and standalone servers.
///
/// [`Service`]: crate::core::rrpc::Service
///
/// # Errors
/// As [`start`].
pub async fn start_with_service(
    config: ServerConfig,
    service: Option<Shared>,
) -> anyhow::Result<ServerHandle> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;
    let refusals = std::sync::Arc::new(Refusals::default());
    let budget = outbound::Budget::new(config.queue_bytes_max, config.queue_bytes_total_max);
    let mut dashboard = None;
    let mut http_addr = None;
    let mut http_task = None;
    if let Some(addr) = &config.http {
        let http = TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen for HTTP on {addr}: choose another address with --http ADDR, or --http off")
        })?;
        http_addr = Some(http.local_addr()?);
        let (tx, rx) = watch::channel(std::sync::Arc::new(canopy_dashboard::Snapshot::default()));
        let mut router = canopy_dashboard::router(rx);
        if let Some(accounts) = config.accounts.clone() {
            let loopback_open = config.http_loopback_open;
            let access: canopy_dashboard::Access = std::sync::Arc::new(move |token, peer| {
                (loopback_open && peer.ip().is_loopback())
                    || token.is_some_and(|t| accounts.opens_http(t))
            });
            router = canopy_dashboard::guard(router, access);
        }
        let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        http_task = Some(tokio::spawn(async move {
            if let Err(e) = axum::serve(http, service).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }));
        dashboard = Some(Dashboard {
            snapshots: tx,
            reporter: report::Reporter::new(
                local_addr.to_string(),
                &config.node.name,
                config.core.is_some(),
                config.relay.is_some(),
                refusals.clone(),
                budget.clone(),
            ),
            latency: canopy_dashboard::Histogram::new(&report::LATENCY_BOUNDS),
            call_latency: std::collections::BTreeMap::new(),
        });
    }
    let (inbox_tx, inbox_rx) = flume::bounded(INBOX_LEN_MAX);
    let executed = inbox_tx.clone();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let started = Instant::now();
    let mut links = None;
    let mut peer_task = None;
    let mut uplink = None;
    let mut data_dir = None;
    let mut executors_n = 1;
    let mut node_config = config.node.clone();
    node_config.id = canopy_client::protocol::PublisherId(rand::random());
    let server = match &config.core {
        None if config.relay.is_some() => {
            let relay = config.relay.as_ref().map(|r| r.upstream.clone());
            tracing::info!(upstream = ?relay, "relay");
            let tls = config.tls.as_ref().and_then(|t| t.links.as_ref());
            uplink = Some(upstream::UpLink::new(
                inbox_tx.clone(),
                tls.map(|(_, connector)| connector.clone()),
            ));
            // The relay's one id: for its connection above, and for the
            // clients it attaches.
            let mut up = crate::core::cltsvr::upstream::UpstreamConfig::new(
                config.node.name.clone(),
                node_config.id,
                relay.unwrap_or_default(),
            );
            up.credentials = config.relay.as_ref().and_then(|r| r.credentials.clone());
            Server::relay(
                Node::new_grouped(Duration::ZERO, node_config),
                crate::core::cltsvr::upstream::Upstream::new(Duration::ZERO, up),
            )
        }
        None => Server::standalone(Node::new(Duration::ZERO, node_config)),
        Some(core) => {
            // Before anything is bound for the core: a server whose hard
            // state is unusable must not take part at all.
            let hard = disk::load(&core.data_dir)?;
            // A fresh incarnation per start: the clock, which only moves on
            // (and the group goes above the one on disk regardless).
            let incarnation = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64);
            let recovered = hard.is_some();
            let mut group = Group::recover(
                Duration::ZERO,
                core.group(Incarnation(incarnation), config.node.stream),
                hard,
            );
            // The new incarnation is on disk before the first frame that
            // names it. (A blocking write in an async fn: once per start.)
            if let Some(hard) = group.poll_hard_state() {
                disk::save(&core.data_dir, &hard).with_context(|| {
                    format!(
                        "cannot write the hard state {}",
                        disk::path(&core.data_dir).display()
                    )
                })?;
            }
            let incarnation = group.me().incarnation.0;
            executors_n = core.executors;
            if let Some(service) = &service {
                group.set_service(service.clone());
                let methods = group.rrpc().methods().len();
                tracing::info!(methods, "replicated service");
            }
            tracing::info!(
                dir = %core.data_dir.display(),
                incarnation,
                recovered,
                "hard state"
            );
            data_dir = Some(core.data_dir.clone());
            let listener = TcpListener::bind(&core.peer_listen)
                .await
                .with_context(|| {
                    format!("cannot listen for core servers on {}", core.peer_listen)
                })?;
            tracing::info!(addr = %core.peer_listen, id = %core.me, peers = core.peers.len(), "core links");
            let admission = peer::Admission {
                secret: core.secret.clone(),
                tls: config.tls.as_ref().and_then(|t| {
                    let (acceptor, connector) = t.links.clone()?;
                    Some(peer::LinkTls {
                        acceptor,
                        connector,
                        core: t.core_check.clone()?,
                    })
                }),
            };
            peer_task = Some(tokio::spawn(peer::accept_loop(
                listener,
                inbox_tx.clone(),
                admission.clone(),
                refusals.clone(),
            )));
            links = Some(peer::Links::start(
                core.me,
                &core.peers,
                inbox_tx.clone(),
                admission,
            ));
            node_config.id = crate::core::cltsvr::members::core_server_id(core.me.0, incarnation);
            Server::grouped(
                Node::new_grouped(Duration::ZERO, node_config),
                group,
                // Addresses clients can use, or none (see `advertised`).
                match config.node.servers.is_empty() {
                    true => HashMap::new(),
                    false => core.clients.iter().cloned().collect(),
                },
            )
        }
    };
    tracing::info!(addr = %local_addr, name = %config.node.name, stream = config.node.stream, "listening");
    if let Some(addr) = http_addr {
        tracing::info!(addr = %addr, "dashboard and API over HTTP");
    }
    let (views_tx, views) = watch::channel(None);
    let node_task = tokio::spawn(async move {
        let shell = Shell {
            started,
            inbox: inbox_rx,
            shutdown: shutdown_rx,
            views: views_tx,
            data_dir,
        };
        let mut io = Links {
            peers: links,
            upstream: uplink,
            jobs: service.map(|s| executors(s, executors_n, executed)),
        };
        let ended = run_node(server, &mut io, shell, dashboard).await;
        if let Some(l) = &io.peers {
            l.stop();
        }
        if let Some(u) = &mut io.upstream {
            u.close();
        }
        if let Some(t) = peer_task {
            t.abort();
        }
        ended
    });
    let accept_task = tokio::spawn(conn::accept_loop(
        listener, inbox_tx, config, refusals, budget,
    ));
    Ok(ServerHandle {
        local_addr,
        http_addr,
        http_task,
        shutdown,
        node_task: Some(node_task),
        accept_task,
        views,
    })
}

/// Connections refused before the node heard of them, counted by the
/// tasks that refuse them.
#[derive(Default)]
pub(crate) struct Refusals {
    /// Links to the peer port dropped before admission (`peer.rs`).
    pub peer_links: std::sync::atomic::AtomicU64,
    /// TLS handshakes that failed or timed out, on either port.
    pub tls_handshakes: std::sync::atomic::AtomicU64,
}

/// The node task's side of the dashboard.
struct Dashboard {
    snapshots: watch::Sender<std::sync::Arc<canopy_dashboard::Snapshot>>,
    reporter: report::Reporter,
    latency: canopy_dashboard::Histogram,
    /// Per method, the time from a call reaching this server to its reply
    /// (at most `CALL_METHODS_MAX` methods; the rest as `(other)`).
    call_latency: std::collections::BTreeMap<String, canopy_dashboard::Histogram>,
}

/// The node task's links below its clients: to other core servers, or a
/// relay's to the tier above.
struct Links {
    peers: Option<peer::Links>,
    upstream: Option<upstream::UpLink>,
    /// A core server's replicated service: where its jobs go.
    jobs: Option<flume::Sender<Job>>,
}

/// The node task's channels, and a core server's data directory.
struct Shell {
    started: Instant,
    inbox: flume::Receiver<Inbound>,
    shutdown: watch::Receiver<bool>,
    views: watch::Sender<Option<InstalledView>>,
    data_dir: Option<PathBuf>,
}

/// Runs the node until shutdown, or until its hard state cannot be written.
///
/// # Errors
/// When the hard state cannot be written: the node stops (its clients are
/// told it is shutting down) rather than send what it could forget.
async fn run_node(
    mut node: Server,
    links: &mut Links,
    shell: Shell,
    mut dashboard: Option<Dashboard>,
) -> anyhow::Result<()> {
    let Shell {
        started,
        inbox,
        mut shutdown,
        views,
        data_dir,
    } = shell;
    let mut ended = Ok(());
    let mut sessions: HashMap<SessionId, SessionIo> = HashMap::new();
    let mut incoming = Incoming::new();
    let mut snapshot_next = Instant::now();
    loop {
        let deadline = node.poll_timeout().map_or_else(
            || Instant::now() + Duration::from_secs(3600),
            |t| started + t,
        );
        let deadline = match &dashboard {
            Some(_) => deadline.min(snapshot_next),
            None => deadline,
        };
        let published = node.node().stats().published;
        // When this turn's inputs arrived: the latency clock starts there.
        let mut turn = None;
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            msg = inbox.recv_async() => {
                let Ok(msg) = msg else { break };
                turn = Some(Instant::now());
                let now = started.elapsed();
                take(&mut node, &mut sessions, &mut incoming, links, now, msg);
                // Take what else is already waiting before draining, so one
                // fan-out batch covers many publishes.
                for msg in inbox.try_iter().take(INBOX_TURN_MAX) {
                    take(&mut node, &mut sessions, &mut incoming, links, now, msg);
                }
                node.end_batch(now);
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
        // Checked after every turn, not only when the timer branch wins:
        // under sustained load the inbox is always ready.
        if Instant::now() >= deadline {
            node.handle_timeout(started.elapsed());
        }
        if let Err(e) = drain(
            &mut node,
            &mut sessions,
            links,
            data_dir.as_deref(),
            started.elapsed(),
        ) {
            // No frame the unwritten state covers has left: stopping now
            // keeps every promise this server made one it remembers.
            let file = data_dir.as_deref().map(disk::path).unwrap_or_default();
            tracing::error!(
                file = %file.display(),
                error = %e,
                "cannot write the hard state; stopping this server"
            );
            ended = Err(anyhow::Error::new(e)
                .context(format!("cannot write the hard state {}", file.display())));
            break;
        }
        let installed = node
            .group()
            .filter(|g| g.is_primary())
            .and_then(|g| g.view());
        if installed.map(|v| v.id.epoch) != views.borrow().as_ref().map(|v| v.epoch) {
            if let Some(v) = installed {
                views.send_replace(Some(InstalledView {
                    epoch: v.id.epoch,
                    members: v.members.iter().map(|m| m.node.0).collect(),
                }));
            }
        }
        // Taken every turn, so that they never pile up in the node.
        let replied = node.take_call_latencies();
        if let Some(d) = &mut dashboard {
            if let Some(turn) = turn.filter(|_| node.node().stats().published != published) {
                d.latency.observe(turn.elapsed().as_secs_f64());
            }
            for (method, took) in replied {
                let known = d.call_latency.len() < CALL_METHODS_MAX
                    || d.call_latency.contains_key(&*method);
                let key = if known { &*method } else { "(other)" };
                d.call_latency
                    .entry(key.to_owned())
                    .or_insert_with(|| canopy_dashboard::Histogram::new(&report::LATENCY_BOUNDS))
                    .observe(took.as_secs_f64());
            }
            if Instant::now() >= snapshot_next {
                snapshot_next = Instant::now() + SNAPSHOT_INTERVAL;
                let snap = d.reporter.snapshot(
                    started.elapsed(),
                    &node,
                    &sessions,
                    &d.latency,
                    &d.call_latency,
                );
                d.snapshots.send_replace(std::sync::Arc::new(snap));
            }
        }
    }
    tracing::info!(sessions = sessions.len(), "shutting down");
    let frame =
        canopy_client::protocol::encode_error(ErrorCode::ShuttingDown, "server shutting down");
    for (_, io) in sessions.drain() {
        io.reader.cancel();
        let _ = io.close.send(conn::CloseOrder {
            frame: Some(frame.clone()),
            drain: true,
        });
    }
    ended
}

/// Starts `n` threads that execute the replicated service's calls, off the
/// node task (a handler may take its time, or sleep): a replica's capacity,
/// which load-balanced calls spread over the replicas. Each result waits
/// for room in the inbox like any other input. The threads end when the
/// returned sender is dropped (the node task ended).
fn executors(service: Shared, n: usize, executed: flume::Sender<Inbound>) -> flume::Sender<Job> {
    // Unbounded here; bounded by RRPC's queue (`RrpcConfig::queue_max`).
    let (tx, rx) = flume::unbounded::<Job>();
    for i in 0..n.max(1) {
        let (rx, service, executed) = (rx.clone(), service.clone(), executed.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("canopy-exec-{i}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let result = job.run(&service);
                    if executed.send(Inbound::Executed(job, result)).is_err() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an executor thread");
        }
    }
    tx
}

/// Per core server, its newest incoming connection. A peer that reset its
/// link may still have frames in flight on the old one: they are older than
/// everything on the new one and are dropped, so each peer's messages stay
/// in the order it sent them.
type Incoming = HashMap<NodeId, u64>;

fn take(
    node: &mut Server,
    sessions: &mut HashMap<SessionId, SessionIo>,
    incoming: &mut Incoming,
    links: &Links,
    now: Duration,
    msg: Inbound,
) {
    let current = |conn| links.upstream.as_ref().is_some_and(|u| u.is_current(conn));
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
        Inbound::Authenticated(id, permissions) => node.authenticated(id, permissions),
        Inbound::Bad(id, code, message) => node.handle_bad_input(now, id, code, message),
        Inbound::Closed(id) => {
            sessions.remove(&id);
            node.handle_closed(now, id);
        }
        Inbound::Peer(from, conn, msgs) => {
            let newest = incoming.entry(from).or_insert(conn);
            if conn < *newest {
                return;
            }
            *newest = conn;
            for msg in msgs {
                node.handle_peer(now, from, msg);
            }
        }
        Inbound::IncomingDown(from, conn) => {
            if incoming.get(&from).is_none_or(|&n| n <= conn) {
                node.handle_link_down(now, from);
            }
        }
        Inbound::LinkUp(peer) => node.handle_link_up(now, peer),
        Inbound::LinkDown(peer) => node.handle_link_down(now, peer),
        Inbound::UpConnected(conn) if current(conn) => node.handle_upstream_connected(now),
        Inbound::UpFrames(conn, frames) if current(conn) => {
            node.handle_upstream_frames(now, frames)
        }
        Inbound::UpClosed(conn) if current(conn) => node.handle_upstream_closed(now),
        // From a connection already replaced.
        Inbound::UpConnected(_) | Inbound::UpFrames(..) | Inbound::UpClosed(_) => {}
        Inbound::Executed(job, result) => node.handle_executed(now, &job, result),
    }
}

/// Executes the server's outputs: peer frames (each after the hard state
/// it follows is on disk), a relay's connection actions, client outputs.
///
/// # Errors
/// When the hard state cannot be written to `data_dir`; the caller must
/// stop the node, as the frames waiting behind it must never be sent.
fn drain(
    node: &mut Server,
    sessions: &mut HashMap<SessionId, SessionIo>,
    links: &mut Links,
    data_dir: Option<&Path>,
    now: Duration,
) -> std::io::Result<()> {
    if let Some(peers) = &mut links.peers {
        loop {
            // Checked before every frame: `handle_link_down` below may
            // change it too. This blocks the node task on a few fsyncs, but
            // only on a view change or a rejoin (never per message), which
            // stalls the core briefly anyway.
            if let Some(hard) = node.poll_hard_state() {
                let dir =
                    data_dir.expect("start gives every core server (peer links) a data directory");
                disk::save(dir, &hard)?;
                tracing::debug!(
                    promised = %hard.promised,
                    incarnation = hard.incarnation.0,
                    "hard state written"
                );
            }
            let Some((peer, frame)) = node.poll_transmit() else {
                break;
            };
            if !peers.send(peer, frame) {
                node.handle_link_down(now, peer);
            }
        }
    }
    if let Some(up) = &mut links.upstream {
        // Acting may produce more actions (a full queue ends the link,
        // and the relay then picks its next server).
        while let Some(action) = node.poll_upstream() {
            match action {
                Action::Connect(addr) => up.connect(addr),
                Action::Send(frame) => {
                    if !up.send(frame) {
                        tracing::warn!("queue to the tier above full; reconnecting");
                        up.close();
                        node.handle_upstream_closed(now);
                    }
                }
                Action::Disconnect => up.close(),
            }
        }
    }
    while let Some(job) = node.poll_job() {
        let Some(jobs) = &links.jobs else {
            break;
        };
        let _ = jobs.send(job);
    }
    let mut offered = outbound::Offered::default();
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
                if let Err(why) = io.queue.offer(frame, sessions.len(), &mut offered) {
                    tracing::debug!(%session, ?why, "outbound queue refused a frame");
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
    Ok(())
}
