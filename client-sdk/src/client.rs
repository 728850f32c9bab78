//! The async client: one driver task per [`Client`] owns the connection.
//!
//! The driver connects to the first reachable server of the list, performs
//! the handshake, and then multiplexes commands from the [`Client`] handle,
//! frames from the server, and a keep-alive timer. A separate writer task
//! coalesces outgoing frames into vectored writes, so that a driver busy
//! reading deliveries never waits on its own writes.
//!
//! On any connection failure (or a retryable server error such as
//! `slow_consumer`) the driver reconnects to the next address, resumes its
//! subscriptions from the last sequence number it handed to the application,
//! and resends every publish that was not acknowledged; the server drops the
//! retries it already ordered, by `(publisher, pub_seq)`.
//!
//! Per-message work on the receive path is small: a whole `Deliver` frame is
//! decoded once, its payloads are slices of the received buffer, and the
//! batch travels to the [`Subscription`] in one channel send.

use crate::error::Error;
use crate::protocol::{
    self, ClientFrame, DeliverHead, ErrorCode, Hello, Message, PingHead, PubAck, PubSeq,
    PublisherId, Resume, Seq, ServerFrame, SlowPolicy, SubscribeHead, Welcome,
};
use crate::topic::{Pattern, Topic};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// How a [`Client`] connects and behaves.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Server addresses (`host:port`). The first connection tries them in
    /// this order, so the first reachable one is the client's home. Once
    /// connected, the client takes the list its server tells it (the
    /// server's tier), and after losing a server it reconnects to its
    /// adopter first ([`protocol::adopter_order`]).
    pub servers: Vec<String>,
    /// A name for the server's logs and dashboard.
    pub name: String,
    /// The publisher id; random when `None`. A fixed id lets the server
    /// deduplicate retries across reconnects under any name; a restarted
    /// program with the same id continues after the highest publisher
    /// sequence number the server has ordered for it.
    pub publisher: Option<PublisherId>,
    /// Publishes in flight (sent, not acknowledged) at most.
    pub window: usize,
    /// What the server does when this client does not keep up.
    pub slow: SlowPolicy,
    /// Give up when no server could be reached for this long.
    pub reconnect_for: Duration,
    /// Time allowed for one connection attempt and handshake.
    pub connect_timeout: Duration,
    /// Ping period; a connection silent for three periods is dropped.
    pub ping_interval: Duration,
    /// What the client is told of the tree's membership: `servers` (the
    /// default) keeps its failover list current; `full` adds
    /// [`Event::View`]s; `none` is the cheapest.
    pub reports: protocol::Reports,
    /// Weak delivery (docs/DESIGN.md guarantee 6): messages arrive as soon as
    /// they are ordered, before they are stable, for lower latency. When a
    /// server failure takes back messages already delivered, every
    /// subscription is told with [`Event::Diverged`], and the agreed stream
    /// follows. Cannot be combined with `full` reports. Off by default.
    pub weak: bool,
    /// Delivery batches buffered per subscription. When the application
    /// lets a subscription fill up, the client drops its connection and
    /// resumes from the last message it handed over, so that the driver
    /// never waits on the application (acknowledgements keep flowing).
    pub subscription_batches_max: usize,
}

impl ClientOptions {
    /// Options with defaults for the given servers.
    pub fn new<I, S>(servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientOptions {
            servers: servers.into_iter().map(Into::into).collect(),
            name: "canopy-client".into(),
            publisher: None,
            window: 1024,
            slow: SlowPolicy::Disconnect,
            reconnect_for: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            subscription_batches_max: 256,
            reports: protocol::Reports::Servers,
            weak: false,
        }
    }
}

/// What a [`Subscription`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The next matching message, in the one total order.
    Message(Message),
    /// Matching messages in `from..=to` may have been missed (retention no
    /// longer held them, or this client conflates and fell behind).
    Gap {
        /// First possibly missed sequence number.
        from: Seq,
        /// Last possibly missed sequence number.
        to: Seq,
    },
    /// The server no longer has the stream this client was reading (every
    /// server restarted): sequence numbers start again and anything in
    /// between may have been missed.
    StreamReset,
    /// With `full` reports: the tree's membership changed after the
    /// message at `view.seq`. Every subscription of every `full` client is
    /// told the same views at the same positions of the stream.
    View(Arc<View>),
    /// Weak delivery only: the messages delivered at `from` and later were
    /// not (all) the agreed stream. A server failed before they were
    /// stable and the survivors ordered otherwise; the agreed stream from
    /// `from` on follows this event. Never sent to a strong client.
    Diverged {
        /// The first seq whose delivery may have been wrong.
        from: Seq,
        /// Where the difference was seen.
        seen: Seq,
    },
}

/// The tree's membership at a position of the stream (`full` reports).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// The position: after the message with this seq.
    pub seq: Seq,
    /// The core's servers.
    pub core: Vec<protocol::ServerEntry>,
    /// Every client of the tree (relays included), by id.
    pub clients: std::collections::BTreeMap<PublisherId, protocol::MemberEntry>,
}

impl View {
    /// Applies a report from the server.
    fn apply(&mut self, head: protocol::MembersHead) {
        if head.complete {
            *self = View::default();
        }
        self.seq = head.seq;
        if let Some(core) = head.core {
            self.core = core;
        }
        for id in head.left {
            self.clients.remove(&id);
        }
        for e in head.joined {
            self.clients.insert(e.id, e);
        }
    }
}

enum Command {
    Publish {
        topic: Topic,
        payload: Bytes,
        ack: oneshot::Sender<Result<PubSeq, Error>>,
    },
    Subscribe {
        pattern: Pattern,
        id: u64,
        events: flume::Sender<Vec<Event>>,
        done: oneshot::Sender<Result<(), Error>>,
    },
    Unsubscribe {
        id: u64,
    },
    Flush {
        done: oneshot::Sender<Result<(), Error>>,
    },
}

/// A handle on a Canopy connection. Cheap to clone; the connection lives
/// while any handle or [`Subscription`] does.
#[derive(Clone)]
pub struct Client {
    commands: flume::Sender<Command>,
    window: Arc<Semaphore>,
    next_sub: Arc<std::sync::atomic::AtomicU64>,
    payload_max: usize,
    publisher: PublisherId,
}

impl Client {
    /// Connects to the first reachable server of `options.servers`.
    ///
    /// # Errors
    /// [`Error::Unreachable`] when no server answered the handshake within
    /// `reconnect_for`; [`Error::Rejected`] when a server refused it.
    pub async fn connect(options: ClientOptions) -> Result<Client, Error> {
        if options.servers.is_empty() {
            return Err(Error::Unreachable {
                servers: String::new(),
                last: "the server list is empty".into(),
            });
        }
        let publisher = options
            .publisher
            .unwrap_or_else(|| PublisherId(rand::random()));
        let window = Arc::new(Semaphore::new(options.window.max(1)));
        let (commands, commands_rx) = flume::unbounded();
        let mut driver = Driver {
            publisher,
            window: window.clone(),
            commands: commands_rx,
            unacked: VecDeque::new(),
            next_pub_seq: 1,
            flushes: Vec::new(),
            subs: Vec::new(),
            pending_subs: VecDeque::new(),
            position: None,
            check: None,
            agreed: None,
            batch: Vec::new(),
            servers: options.servers.clone(),
            lost: None,
            view: Arc::default(),
            connections: 0,
            options,
        };
        let (conn, welcome) = driver.connect().await?;
        let payload_max = (welcome.frame_len_max as usize).saturating_sub(512);
        tokio::spawn(driver.run(conn, welcome));
        Ok(Client {
            commands,
            window,
            next_sub: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            payload_max,
            publisher,
        })
    }

    /// This client's publisher id.
    pub fn publisher(&self) -> PublisherId {
        self.publisher
    }

    /// Publishes and waits for the acknowledgement: the message is ordered
    /// and will be delivered to every matching subscriber. Returns the
    /// message's publisher sequence number.
    ///
    /// # Errors
    /// An invalid topic, an oversized payload, a rejection, or a closed client.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<PubSeq, Error> {
        self.send(topic, payload).await?.await
    }

    /// Queues a publish once the window has room, without waiting for the
    /// acknowledgement: await the returned [`PendingAck`] for that, or drop
    /// it and call [`Client::flush`] later. Publishes from one client are
    /// ordered as they were sent.
    ///
    /// # Errors
    /// As [`Client::publish`].
    pub async fn send(&self, topic: &str, payload: impl Into<Bytes>) -> Result<PendingAck, Error> {
        let topic = Topic::new(topic)?;
        let payload = payload.into();
        if payload.len() > self.payload_max {
            return Err(Error::PayloadTooLarge {
                len: payload.len(),
                max: self.payload_max,
            });
        }
        let permit = self.window.acquire().await.map_err(|_| Error::Closed)?;
        // The driver returns the permit when the publish is acknowledged.
        permit.forget();
        let (ack, rx) = oneshot::channel();
        self.commands
            .send(Command::Publish {
                topic,
                payload,
                ack,
            })
            .map_err(|_| Error::Closed)?;
        Ok(PendingAck(rx))
    }

    /// Waits until every publish sent before this call is acknowledged.
    ///
    /// # Errors
    /// When the client failed or was closed.
    pub async fn flush(&self) -> Result<(), Error> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush { done })
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Subscribes to `pattern` and waits until the server confirms; the
    /// stream then yields every matching message ordered after that point.
    ///
    /// # Errors
    /// An invalid pattern, a rejection, or a closed client.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, Error> {
        let pattern = Pattern::new(pattern)?;
        let id = self
            .next_sub
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Unbounded as a channel, bounded by the driver: it hands over a
        // delivery batch only while fewer than `subscription_batches_max`
        // wait, and only rare notices (gaps, resets) go past that bound.
        let (events, rx) = flume::unbounded();
        let (done, done_rx) = oneshot::channel();
        self.commands
            .send(Command::Subscribe {
                pattern,
                id,
                events,
                done,
            })
            .map_err(|_| Error::Closed)?;
        done_rx.await.map_err(|_| Error::Closed)??;
        Ok(Subscription {
            id,
            events: rx.into_stream(),
            current: Vec::new().into_iter(),
            commands: self.commands.clone(),
        })
    }
}

/// The acknowledgement of one publish; resolves to its publisher sequence number.
pub struct PendingAck(oneshot::Receiver<Result<PubSeq, Error>>);

impl Future for PendingAck {
    type Output = Result<PubSeq, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

/// A stream of [`Event`]s for one pattern. Dropping it unsubscribes.
pub struct Subscription {
    id: u64,
    events: flume::r#async::RecvStream<'static, Vec<Event>>,
    current: std::vec::IntoIter<Event>,
    commands: flume::Sender<Command>,
}

impl Stream for Subscription {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            if let Some(e) = self.current.next() {
                return Poll::Ready(Some(e));
            }
            match self.events.poll_next_unpin(cx) {
                Poll::Ready(Some(batch)) => self.current = batch.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Unsubscribe { id: self.id });
    }
}

struct Unacked {
    pub_seq: PubSeq,
    topic: Topic,
    payload: Bytes,
    ack: Option<oneshot::Sender<Result<PubSeq, Error>>>,
}

struct Sub {
    id: u64,
    pattern: Pattern,
    events: flume::Sender<Vec<Event>>,
}

/// One live connection: frames in, a queue to the writer task out.
struct Conn {
    frames: FramedRead<tokio::net::tcp::OwnedReadHalf, LengthDelimitedCodec>,
    out: flume::Sender<Bytes>,
    server: String,
}

/// Why a connection ended.
enum Ended {
    /// Reconnect and resume.
    Lost(String),
    /// Stop: the error is final.
    Fatal(Error),
    /// Every handle is gone.
    Done,
}

struct Driver {
    options: ClientOptions,
    publisher: PublisherId,
    window: Arc<Semaphore>,
    commands: flume::Receiver<Command>,
    unacked: VecDeque<Unacked>,
    next_pub_seq: u64,
    flushes: Vec<(PubSeq, oneshot::Sender<Result<(), Error>>)>,
    subs: Vec<Sub>,
    /// Subscribe answers awaited, by pattern, in request order.
    pending_subs: VecDeque<(String, oneshot::Sender<Result<(), Error>>)>,
    /// Where the application stands: stream and last seq handed over.
    position: Option<(u64, Seq)>,
    /// The running hash at the last delivery frame taken, checked by the
    /// server on resume.
    check: Option<protocol::StreamCheck>,
    /// Weak delivery: through this seq, what was delivered is agreed.
    agreed: Option<Seq>,
    /// Scratch space for decoding deliveries.
    batch: Vec<Message>,
    /// The servers to try: the configured list until a server tells its
    /// tier's.
    servers: Vec<String>,
    /// The server the last connection was lost with, tried last.
    lost: Option<String>,
    /// The membership (`full` reports).
    view: Arc<View>,
    /// Connections attempted so far ([`Hello::connection`]).
    connections: u64,
}

impl Driver {
    /// Connects to the servers in turn until one completes the handshake or
    /// `reconnect_for` runs out.
    async fn connect(&mut self) -> Result<(Conn, Welcome), Error> {
        let give_up = Instant::now() + self.options.reconnect_for;
        let mut backoff = Duration::from_millis(20);
        let mut last = String::from("no attempt made");
        loop {
            for addr in self.attempt_order() {
                let attempt =
                    tokio::time::timeout(self.options.connect_timeout, self.handshake(&addr)).await;
                match attempt {
                    Ok(Ok(ok)) => return Ok(ok),
                    Ok(Err(Ended::Fatal(e))) => return Err(e),
                    Ok(Err(Ended::Lost(why))) => last = format!("{addr}: {why}"),
                    Ok(Err(Ended::Done)) => return Err(Error::Closed),
                    Err(_) => {
                        last = format!(
                            "{addr}: no handshake within {:?}",
                            self.options.connect_timeout
                        )
                    }
                }
                tracing::debug!(server = %addr, error = %last, "connect failed");
            }
            if Instant::now() >= give_up {
                return Err(Error::Unreachable {
                    servers: self.servers.join(", "),
                    last,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// The order of one round of connection attempts: the configured order
    /// for the first connection; after a loss, the adoption order among the
    /// servers the tier lists, with the lost server last (docs/DESIGN.md,
    /// "Adoption").
    fn attempt_order(&self) -> Vec<String> {
        match &self.lost {
            None => self.servers.clone(),
            Some(lost) => protocol::failover_order(self.publisher.0, &self.servers, lost),
        }
    }

    async fn handshake(&mut self, addr: &str) -> Result<(Conn, Welcome), Ended> {
        self.connections += 1;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| Ended::Lost(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(protocol::FRAME_LEN_MAX_LIMIT + protocol::FRAME_HEAD_ALLOWANCE)
            .new_codec();
        let mut frames = FramedRead::new(read, codec);
        let (out, out_rx) = flume::unbounded();
        tokio::spawn(write_loop(write, out_rx));
        let hello = Hello {
            version: protocol::PROTOCOL_VERSION,
            name: self.options.name.clone(),
            publisher: self.publisher,
            subscriptions: self.subscribed_patterns(),
            resume: self.position.map(|(stream, after)| Resume {
                stream,
                after,
                check: self.check,
                agreed: self.agreed,
            }),
            slow: self.options.slow,
            role: protocol::Role::Client,
            reports: self.options.reports,
            connection: self.connections,
            weak: self.options.weak,
        };
        let _ = out.send(protocol::encode_client(&ClientFrame::Hello(hello)));
        let welcome = match next_frame(&mut frames).await? {
            ServerFrame::Welcome(w) => w,
            ServerFrame::Error(e) => return Err(server_error(e.code, e.message)),
            other => {
                return Err(Ended::Fatal(Error::Protocol(format!(
                    "expected Welcome, got {other:?}"
                ))))
            }
        };
        if welcome.version != protocol::PROTOCOL_VERSION {
            return Err(Ended::Fatal(Error::Protocol(format!(
                "server speaks protocol version {}",
                welcome.version
            ))));
        }
        tracing::debug!(server = addr, head = %welcome.head, session = welcome.session, "connected");
        Ok((
            Conn {
                frames,
                out,
                server: addr.to_owned(),
            },
            welcome,
        ))
    }

    /// Distinct patterns of the live subscriptions.
    fn subscribed_patterns(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .subs
            .iter()
            .map(|s| s.pattern.as_str().to_owned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Brings a fresh connection up to date: position, acknowledgements
    /// the server already has, retries of the rest.
    fn on_welcome(&mut self, conn: &Conn, welcome: &Welcome) {
        if protocol::usable_servers(&welcome.servers) {
            self.servers.clone_from(&welcome.servers);
        }
        let fresh = match self.position {
            Some((stream, _)) if stream != welcome.stream => {
                tracing::warn!(server = %conn.server, "server has a different stream; sequence numbers restart");
                self.notify(Event::StreamReset);
                true
            }
            Some(_) => false,
            None => true,
        };
        if fresh {
            self.position = Some((welcome.stream, welcome.head));
            // The Welcome's position is stable (a weak client is then sent
            // what is held after it); its hash is the first resume check.
            self.check = Some(protocol::StreamCheck {
                seq: welcome.head,
                hash: welcome.hash,
            });
            self.agreed = self.options.weak.then_some(welcome.head);
        }
        self.acknowledge(welcome.pub_acked);
        // A fixed publisher id may have published before this process
        // started: continue after what the server has, or the server would
        // take new messages for retries of old ones.
        self.next_pub_seq = self.next_pub_seq.max(welcome.pub_acked.0 + 1);
        for u in &self.unacked {
            let _ = conn.out.send(encode_publish(u));
        }
        // Subscriptions were sent in the Hello and are now in effect.
        for (_, done) in self.pending_subs.drain(..) {
            let _ = done.send(Ok(()));
        }
    }

    async fn run(mut self, mut conn: Conn, welcome: Welcome) {
        self.on_welcome(&conn, &welcome);
        loop {
            let ended = self.serve(&mut conn).await;
            let why = match ended {
                Ended::Done => return,
                Ended::Fatal(e) => return self.fail(e),
                Ended::Lost(why) => why,
            };
            tracing::info!(server = %conn.server, reason = %why, "connection lost; reconnecting");
            self.lost = Some(conn.server.clone());
            match self.connect().await {
                Ok((c, w)) => {
                    conn = c;
                    self.on_welcome(&conn, &w);
                }
                Err(e) => return self.fail(e),
            }
        }
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, conn: &mut Conn) -> Ended {
        let period = self.options.ping_interval.max(Duration::from_millis(100));
        let mut ping = tokio::time::interval(period);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        let mut nonce = 0u64;
        loop {
            tokio::select! {
                cmd = self.commands.recv_async() => {
                    let Ok(cmd) = cmd else { return Ended::Done };
                    self.command(conn, cmd);
                }
                frame = next_frame(&mut conn.frames) => {
                    heard = Instant::now();
                    let frame = match frame {
                        Ok(f) => f,
                        Err(ended) => return ended,
                    };
                    if let Err(ended) = self.frame(conn, frame) {
                        return ended;
                    }
                }
                _ = ping.tick() => {
                    if heard.elapsed() > period * 3 {
                        return Ended::Lost("server silent for three ping periods".into());
                    }
                    nonce += 1;
                    let _ = conn.out.send(protocol::encode_client(&ClientFrame::Ping(PingHead { nonce })));
                }
            }
        }
    }

    fn command(&mut self, conn: &Conn, cmd: Command) {
        match cmd {
            Command::Publish {
                topic,
                payload,
                ack,
            } => {
                let u = Unacked {
                    pub_seq: PubSeq(self.next_pub_seq),
                    topic,
                    payload,
                    ack: Some(ack),
                };
                self.next_pub_seq += 1;
                let _ = conn.out.send(encode_publish(&u));
                self.unacked.push_back(u);
            }
            Command::Flush { done } => match self.unacked.back() {
                None => {
                    let _ = done.send(Ok(()));
                }
                Some(u) => self.flushes.push((u.pub_seq, done)),
            },
            Command::Subscribe {
                pattern,
                id,
                events,
                done,
            } => {
                let known = self.subs.iter().any(|s| s.pattern == pattern);
                let text = pattern.as_str().to_owned();
                self.subs.push(Sub {
                    id,
                    pattern,
                    events,
                });
                if known {
                    let _ = done.send(Ok(()));
                } else {
                    let head = SubscribeHead {
                        pattern: text.clone(),
                    };
                    let _ = conn
                        .out
                        .send(protocol::encode_client(&ClientFrame::Subscribe(head)));
                    self.pending_subs.push_back((text, done));
                }
            }
            Command::Unsubscribe { id } => {
                let Some(i) = self.subs.iter().position(|s| s.id == id) else {
                    return;
                };
                let sub = self.subs.swap_remove(i);
                if !self.subs.iter().any(|s| s.pattern == sub.pattern) {
                    let head = SubscribeHead {
                        pattern: sub.pattern.as_str().to_owned(),
                    };
                    let _ = conn
                        .out
                        .send(protocol::encode_client(&ClientFrame::Unsubscribe(head)));
                }
            }
        }
    }

    fn frame(&mut self, conn: &Conn, frame: ServerFrame) -> Result<(), Ended> {
        match frame {
            ServerFrame::Deliver(head, body) => self.deliver(&head, &body)?,
            ServerFrame::PubAck(PubAck { pub_seq, .. }) => self.acknowledge(pub_seq),
            ServerFrame::Subscribed(s) => {
                // The server sent everything up to `head` before this answer.
                self.answered(s.head, s.hash);
                if let Some(i) = self.pending_subs.iter().position(|(p, _)| *p == s.pattern) {
                    if let Some((_, done)) = self.pending_subs.remove(i) {
                        let _ = done.send(Ok(()));
                    }
                }
            }
            ServerFrame::Unsubscribed(s) => self.answered(s.head, s.hash),
            ServerFrame::Pong(_) => {}
            ServerFrame::Watermark(w) => {
                // A watermark is a stable position (weak clients are told
                // of any difference before it).
                if self.options.weak {
                    self.agreed = self.agreed.max(Some(w.seq));
                }
                self.advance(w.seq)
            }
            ServerFrame::Diverged(d) => {
                tracing::warn!(server = %conn.server, from = %d.from, seen = %d.seen, "delivered messages were not the agreed stream; the agreed stream follows");
                let back = Seq(d.from.0.saturating_sub(1));
                if let Some((_, at)) = &mut self.position {
                    *at = (*at).min(back);
                }
                self.check = None;
                self.agreed = Some(back);
                self.notify(Event::Diverged {
                    from: d.from,
                    seen: d.seen,
                });
            }
            ServerFrame::Gap(g) => {
                self.advance(g.to);
                self.notify(Event::Gap {
                    from: g.from,
                    to: g.to,
                });
            }
            ServerFrame::Ping(p) => {
                let _ = conn
                    .out
                    .send(protocol::encode_client(&ClientFrame::Pong(p)));
            }
            ServerFrame::Error(e) => return Err(server_error(e.code, e.message)),
            ServerFrame::Welcome(_) => {
                return Err(Ended::Fatal(Error::Protocol("second Welcome".into())));
            }
            // Neither moves the resume position: a conflating client may
            // have a gap notice still to come for messages before it.
            ServerFrame::Members(m) => {
                Arc::make_mut(&mut self.view).apply(m);
                self.notify(Event::View(self.view.clone()));
            }
            ServerFrame::Servers(s) => {
                if protocol::usable_servers(&s.servers) {
                    self.servers = s.servers;
                }
            }
        }
        Ok(())
    }

    fn advance(&mut self, seq: Seq) {
        if let Some((_, at)) = &mut self.position {
            *at = (*at).max(seq);
        }
    }

    /// Hands a delivery batch to the matching subscriptions.
    ///
    /// Either every matching subscription takes its part and the position
    /// advances, or none does and the connection is dropped, to resume from
    /// the unchanged position once reconnected: the driver never waits on
    /// the application, and nothing is handed over twice.
    fn deliver(&mut self, head: &DeliverHead, body: &Bytes) -> Result<(), Ended> {
        self.batch.clear();
        protocol::messages(head, body, &mut self.batch)
            .map_err(|e| Ended::Fatal(Error::Protocol(e.to_string())))?;
        // A resumed stream may overlap what was already handed over.
        let at = self.position.map_or(Seq(0), |(_, s)| s);
        let skip = self.batch.iter().take_while(|m| m.seq <= at).count();
        let Some(last) = self.batch.last().map(|m| m.seq) else {
            return Ok(());
        };
        // Taken only with the batch (below), so that a resume checks what
        // the application was handed.
        let check = head
            .hash
            .map(|hash| protocol::StreamCheck { seq: last, hash })
            .filter(|c| self.check.is_none_or(|old| c.seq >= old.seq));
        let cap = self.options.subscription_batches_max.max(1);
        self.subs.retain(|s| !s.events.is_disconnected());
        let msgs = &self.batch[skip..];
        if let [sub] = &self.subs[..] {
            // The common case, one subscription that wants the whole batch:
            // move the messages instead of cloning them.
            if msgs.iter().all(|m| sub.pattern.matches(m.topic())) {
                if sub.events.len() >= cap {
                    return Err(Ended::Lost(
                        "the subscription's buffer is full (the application is not keeping up); resuming later".into(),
                    ));
                }
                let part: Vec<Event> = self.batch.drain(skip..).map(Event::Message).collect();
                let _ = sub.events.send(part);
                self.took(last, check, head.stable);
                return Ok(());
            }
        }
        let mut parts = Vec::with_capacity(self.subs.len());
        for (i, sub) in self.subs.iter().enumerate() {
            let part: Vec<Event> = msgs
                .iter()
                .filter(|m| sub.pattern.matches(m.topic()))
                .cloned()
                .map(Event::Message)
                .collect();
            if part.is_empty() {
                continue;
            }
            if sub.events.len() >= cap {
                return Err(Ended::Lost(
                    "a subscription's buffer is full (the application is not keeping up); resuming later".into(),
                ));
            }
            parts.push((i, part));
        }
        for (i, part) in parts {
            let _ = self.subs[i].events.send(part);
        }
        self.took(last, check, head.stable);
        Ok(())
    }

    /// A subscription answer moved the position to `head`: the resume
    /// check follows it.
    fn answered(&mut self, head: Seq, hash: Option<u64>) {
        self.advance(head);
        if let Some(hash) = hash.filter(|_| self.check.is_none_or(|c| c.seq <= head)) {
            self.check = Some(protocol::StreamCheck { seq: head, hash });
        }
    }

    /// A delivery frame through `last` was handed over.
    fn took(&mut self, last: Seq, check: Option<protocol::StreamCheck>, stable: Option<Seq>) {
        self.advance(last);
        if check.is_some() {
            self.check = check;
        }
        if stable.is_some() {
            self.agreed = self.agreed.max(stable);
        }
    }

    /// Tells every subscription of a rare event (a gap, a reset); these go
    /// past the batch bound so they are never lost.
    fn notify(&self, event: Event) {
        for sub in &self.subs {
            let _ = sub.events.send(vec![event.clone()]);
        }
    }

    /// Everything up to `through` is acknowledged.
    fn acknowledge(&mut self, through: PubSeq) {
        let mut released = 0;
        while self.unacked.front().is_some_and(|u| u.pub_seq <= through) {
            if let Some(mut u) = self.unacked.pop_front() {
                if let Some(ack) = u.ack.take() {
                    let _ = ack.send(Ok(u.pub_seq));
                }
                released += 1;
            }
        }
        self.window.add_permits(released);
        // A flush is done when nothing at or before its target is unacknowledged.
        let oldest = self.unacked.front().map(|u| u.pub_seq);
        let mut i = 0;
        while i < self.flushes.len() {
            if oldest.is_none_or(|o| o > self.flushes[i].0) {
                let (_, done) = self.flushes.swap_remove(i);
                let _ = done.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }

    fn fail(mut self, e: Error) {
        tracing::warn!(error = %e, "client stopped");
        for mut u in self.unacked.drain(..) {
            if let Some(ack) = u.ack.take() {
                let _ = ack.send(Err(e.clone()));
            }
        }
        for (_, done) in self.flushes.drain(..) {
            let _ = done.send(Err(e.clone()));
        }
        for (_, done) in self.pending_subs.drain(..) {
            let _ = done.send(Err(e.clone()));
        }
        self.window.close();
    }
}

fn encode_publish(u: &Unacked) -> Bytes {
    protocol::encode_publish(u.topic.as_str(), u.pub_seq, &u.payload)
}

fn server_error(code: ErrorCode, message: String) -> Ended {
    if code.is_retryable() {
        Ended::Lost(format!("{code:?}: {message}"))
    } else {
        Ended::Fatal(Error::Rejected { code, message })
    }
}

async fn next_frame(
    frames: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, LengthDelimitedCodec>,
) -> Result<ServerFrame, Ended> {
    match frames.next().await {
        Some(Ok(content)) => protocol::decode_server(content.freeze())
            .map_err(|e| Ended::Fatal(Error::Protocol(e.to_string()))),
        Some(Err(e)) => Err(Ended::Lost(e.to_string())),
        None => Err(Ended::Lost("server closed the connection".into())),
    }
}

async fn write_loop(mut write: tokio::net::tcp::OwnedWriteHalf, out: flume::Receiver<Bytes>) {
    let mut batch = Vec::with_capacity(64);
    while let Ok(frame) = out.recv_async().await {
        batch.push(frame);
        batch.extend(out.try_iter().take(255));
        if crate::io::write_frames(&mut write, &mut batch)
            .await
            .is_err()
        {
            return;
        }
    }
}
