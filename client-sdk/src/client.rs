//! The async client: one driver task per [`Client`] owns the connection.
//!
//! The protocol's rules (which server, when, the handshake, resuming,
//! retries, pings) are the sans-IO [`ClientCore`]'s; the driver is its shell:
//! it opens the sockets the core asks for and multiplexes commands from the
//! [`Client`] handle, frames from the server, and the core's timer. A
//! separate writer task coalesces outgoing frames into vectored writes, so
//! that a driver busy reading deliveries never waits on its own writes.
//!
//! On any connection failure (or a retryable server error such as
//! `slow_consumer`) the core reconnects to the next address, resumes its
//! subscriptions from the last sequence number handed to the application,
//! and resends every publish that was not acknowledged; the server drops the
//! retries it already ordered, by `(publisher, pub_seq)`.
//!
//! Per-message work on the receive path is small: a whole `Deliver` frame is
//! decoded once, its payloads are slices of the received buffer, and the
//! batch travels to the [`Subscription`] in one channel send.

use crate::acks::Acks;
use crate::core::{
    Action, ClientCore, Event as CoreEvent, FirstOrder, Joined, LinkConfig, LinkEvent,
};
use crate::error::Error;
use crate::protocol::{self, Message, PubSeq, PublisherId, Replies, Seq, SlowPolicy, Vote};
use crate::topic::{Pattern, Topic};
use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
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
    /// sequence number the server has ordered for it and past its
    /// predecessor's publishes still on their way, at a new incarnation of
    /// its sequence numbers taken from the wall clock (docs/DESIGN.md,
    /// "Identity and resume"). Two programs must not publish under one id
    /// at once.
    pub publisher: Option<PublisherId>,
    /// Publishes in flight (sent, not acknowledged) at most...
    pub window: usize,
    /// ...and their bytes at most (payload and topic, each publish counted
    /// as at least `window_bytes / window`; a single publish larger than
    /// this goes alone). The client keeps what is in flight to send again
    /// after a failover, so this bounds its memory.
    pub window_bytes: usize,
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
    /// How long [`Client::call`] waits for a reply, across reconnects.
    pub call_timeout: Duration,
    /// A safety net behind `receive_window`: delivery batches buffered per
    /// subscription (a server that honours the window never sends this
    /// many). Past it, the client drops its connection (the driver never
    /// waits on the application), and once the application has read half
    /// of what is buffered, reconnects and resumes after the last message
    /// it handed over. Publishes and calls wait meanwhile.
    pub subscription_batches_max: usize,
    /// Flow control (docs/DESIGN.md, "Flow control"): at most this many
    /// messages are handed to subscriptions and not read yet, or on their
    /// way from the server. A subscription the application reads slower
    /// than messages come is sent no more than that; its server keeps its
    /// place in the stream and catches it up from retention as it reads
    /// (if retention no longer holds the place, the subscription is told
    /// of a gap). The connection stays up and publishes go on meanwhile.
    pub receive_window: u64,
    /// Who the client is, for servers that check (a token, or a user and
    /// password); the server answers with what the user may do, and the
    /// client refuses the rest itself ([`Error::Denied`]).
    pub credentials: Option<protocol::Credentials>,
    /// TLS for every connection (the servers' authorities, and a
    /// certificate to show if the client has one); plain TCP when `None`.
    pub tls: Option<crate::tls::TlsConnector>,
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
            window: 16_384,
            window_bytes: 16 << 20,
            slow: SlowPolicy::Disconnect,
            reconnect_for: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(5),
            subscription_batches_max: 1 << 17,
            receive_window: 65_536,
            call_timeout: Duration::from_secs(10),
            reports: protocol::Reports::Servers,
            weak: false,
            credentials: None,
            tls: None,
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
        /// Its slot in [`Acks`].
        ack: usize,
        /// Its share of the window's bytes.
        cost: u32,
    },
    Subscribe {
        pattern: Pattern,
        id: u64,
        events: flume::Sender<Vec<Event>>,
        taken: Arc<std::sync::atomic::AtomicU64>,
        done: oneshot::Sender<Result<(), Error>>,
    },
    Unsubscribe {
        id: u64,
    },
    Flush {
        done: oneshot::Sender<Result<(), Error>>,
    },
    Call {
        method: String,
        replies: Replies,
        payload: Bytes,
        reply: oneshot::Sender<Result<Bytes, Error>>,
        sent: oneshot::Sender<PubSeq>,
    },
    /// A call timed out: stop waiting; answers whether the servers said
    /// they are not primary.
    Forget {
        pub_seq: PubSeq,
        no_primary: oneshot::Sender<bool>,
    },
}

/// A handle on a Canopy connection. Cheap to clone; the connection lives
/// while any handle or [`Subscription`] does.
#[derive(Clone)]
pub struct Client {
    commands: flume::Sender<Command>,
    window: Window,
    acks: Arc<Acks>,
    /// The topic of the last publish, validated once for a run of
    /// publishes to it.
    last_topic: Arc<std::sync::Mutex<Option<Topic>>>,
    next_sub: Arc<std::sync::atomic::AtomicU64>,
    payload_max: usize,
    publisher: PublisherId,
    call_timeout: Duration,
    flow: Arc<Flow>,
}

/// The publish window ([`ClientOptions::window`] and
/// [`ClientOptions::window_bytes`]) as one semaphore of bytes: a publish
/// takes its topic and payload's length, but at least `window_bytes /
/// window` (so at most `window` are in flight) and at most `window_bytes`
/// (so one larger than the window goes, alone). `send` takes its share; the
/// driver gives it back when the publish is acknowledged.
#[derive(Clone)]
struct Window {
    bytes: Arc<Semaphore>,
    /// A publish's share at least...
    least: u32,
    /// ...and at most.
    most: u32,
}

impl Window {
    fn new(options: &ClientOptions) -> Self {
        // (A semaphore holds at most `MAX_PERMITS`, less than u32::MAX on
        // 32-bit targets.)
        let cap = u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        let most = u32::try_from(options.window_bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, cap);
        let msgs = u32::try_from(options.window.max(1)).unwrap_or(u32::MAX);
        Window {
            bytes: Arc::new(Semaphore::new(most as usize)),
            least: most.div_ceil(msgs),
            most,
        }
    }

    /// A publish's share.
    fn cost(&self, topic: &Topic, payload: &Bytes) -> u32 {
        u32::try_from(topic.as_str().len() + payload.len())
            .unwrap_or(u32::MAX)
            .clamp(self.least, self.most)
    }

    /// Waits until the window has room for a share of `cost`, and takes it.
    async fn take(&self, cost: u32) -> Result<(), Error> {
        let permit = self
            .bytes
            .acquire_many(cost)
            .await
            .map_err(|_| Error::Closed)?;
        permit.forget();
        Ok(())
    }

    /// Shares of `bytes` in all are done with.
    fn give_back(&self, bytes: usize) {
        self.bytes.add_permits(bytes);
    }

    /// A `send` waiting for room wakes to `Closed`.
    fn close(&self) {
        self.bytes.close();
    }
}

/// Flow control between the subscriptions and the driver
/// ([`ClientOptions::receive_window`]): a subscription that has taken a
/// quarter of the window since it last did wakes the driver, which grants
/// the server what the subscriptions have room for.
struct Flow {
    wake: tokio::sync::Notify,
    quarter: u64,
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
        let window = Window::new(&options);
        let acks = Arc::new(Acks::default());
        let flow = Arc::new(Flow {
            wake: tokio::sync::Notify::new(),
            quarter: (options.receive_window / 4).max(1),
        });
        let (mut driver, commands) = Driver::new(
            &options,
            publisher,
            window.clone(),
            acks.clone(),
            flow.clone(),
        );
        let frame_len_max = driver.connect().await?;
        let payload_max = (frame_len_max as usize).saturating_sub(512);
        tokio::spawn(driver.run());
        Ok(Client {
            commands,
            window,
            acks,
            last_topic: Arc::default(),
            next_sub: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            payload_max,
            publisher,
            call_timeout: options.call_timeout,
            flow,
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
        let topic = self.topic(topic)?;
        let payload = payload.into();
        if payload.len() > self.payload_max {
            return Err(Error::PayloadTooLarge {
                len: payload.len(),
                max: self.payload_max,
            });
        }
        // The driver gives the window back when the publish is acknowledged.
        let cost = self.window.cost(&topic, &payload);
        self.window.take(cost).await?;
        let ack = self.acks.take()?;
        let pending = PendingAck {
            slot: Some(ack),
            acks: self.acks.clone(),
        };
        self.commands
            .send(Command::Publish {
                topic,
                payload,
                ack,
                cost,
            })
            .map_err(|_| Error::Closed)?;
        Ok(pending)
    }

    /// `topic` validated, or the last one published to when it is the same.
    fn topic(&self, topic: &str) -> Result<Topic, Error> {
        let mut last = self
            .last_topic
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*last {
            Some(t) if t.as_str() == topic => Ok(t.clone()),
            _ => {
                let t = Topic::new(topic)?;
                *last = Some(t.clone());
                Ok(t)
            }
        }
    }

    /// Calls `method` of the core's replicated service and waits for its
    /// reply (docs/DESIGN.md, "Replicated RPC"). The call is ordered like a
    /// publish and named by this client's publisher id and the call's
    /// publisher sequence number: across reconnects and adoptions it is
    /// asked again, never executed twice.
    ///
    /// # Errors
    /// [`Error::Call`] when the group failed the call (unknown method,
    /// handler error, no service); [`Error::NoPrimary`] or
    /// [`Error::CallTimeout`] when no reply came within `call_timeout`; an
    /// invalid method name or an oversized payload; a closed client.
    pub async fn call(&self, method: &str, payload: impl Into<Bytes>) -> Result<Bytes, Error> {
        self.call_with(method, Replies::Own, payload.into()).await
    }

    /// Calls active method `method` and waits for every replica's own
    /// reply: one [`Vote`] per replica that applied the call and stayed in
    /// the view until its reply was ordered, in the view's order. Replies
    /// that differ mean a handler that is not deterministic.
    ///
    /// # Errors
    /// As [`Client::call`]; [`Error::Call`] with `not_active` for a method
    /// that is not active.
    pub async fn call_all(
        &self,
        method: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Vec<Vote>, Error> {
        let body = self.call_with(method, Replies::All, payload.into()).await?;
        ciborium::from_reader(&body[..])
            .map_err(|e| Error::Protocol(format!("the replicas' replies do not decode: {e}")))
    }

    /// Calls active method `method` and returns the reply more than half
    /// the replicas gave.
    ///
    /// # Errors
    /// As [`Client::call`]; [`Error::Call`] with `no_majority` when no
    /// reply had a majority, `not_active` for a method that is not active.
    pub async fn call_majority(
        &self,
        method: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Bytes, Error> {
        self.call_with(method, Replies::Majority, payload.into())
            .await
    }

    async fn call_with(
        &self,
        method: &str,
        replies: Replies,
        payload: Bytes,
    ) -> Result<Bytes, Error> {
        Topic::new(method)?;
        if payload.len() > self.payload_max {
            return Err(Error::PayloadTooLarge {
                len: payload.len(),
                max: self.payload_max,
            });
        }
        let (reply, rx) = oneshot::channel();
        let (sent, sent_rx) = oneshot::channel();
        self.commands
            .send(Command::Call {
                method: method.to_owned(),
                replies,
                payload,
                reply,
                sent,
            })
            .map_err(|_| Error::Closed)?;
        let Ok(pub_seq) = sent_rx.await else {
            // Not sent: why, if the driver said.
            return rx.await.unwrap_or(Err(Error::Closed));
        };
        match tokio::time::timeout(self.call_timeout, rx).await {
            Ok(r) => r.map_err(|_| Error::Closed)?,
            Err(_) => {
                let (no_primary, answer) = oneshot::channel();
                self.commands
                    .send(Command::Forget {
                        pub_seq,
                        no_primary,
                    })
                    .map_err(|_| Error::Closed)?;
                let (method, waited) = (method.to_owned(), self.call_timeout);
                Err(match answer.await.unwrap_or(false) {
                    true => Error::NoPrimary { method, waited },
                    false => Error::CallTimeout { method, waited },
                })
            }
        }
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
        let taken = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (done, done_rx) = oneshot::channel();
        self.commands
            .send(Command::Subscribe {
                pattern,
                id,
                events,
                taken: taken.clone(),
                done,
            })
            .map_err(|_| Error::Closed)?;
        done_rx.await.map_err(|_| Error::Closed)??;
        Ok(Subscription {
            id,
            events: rx.into_stream(),
            current: Vec::new().into_iter(),
            commands: self.commands.clone(),
            taken,
            untold: 0,
            flow: self.flow.clone(),
        })
    }
}

/// The acknowledgement of one publish; resolves to its publisher sequence number.
/// Awaiting it is optional: dropped, it costs nothing more.
pub struct PendingAck {
    /// Its slot in `acks`, until the outcome was read.
    slot: Option<usize>,
    acks: Arc<Acks>,
}

impl Future for PendingAck {
    type Output = Result<PubSeq, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(slot) = self.slot else {
            return Poll::Ready(Err(Error::Closed));
        };
        let outcome = self.acks.poll(slot, cx);
        if outcome.is_ready() {
            self.slot = None;
        }
        outcome
    }
}

impl Drop for PendingAck {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.acks.release(slot);
        }
    }
}

/// A stream of [`Event`]s for one pattern. Dropping it unsubscribes.
pub struct Subscription {
    id: u64,
    events: flume::r#async::RecvStream<'static, Vec<Event>>,
    current: std::vec::IntoIter<Event>,
    commands: flume::Sender<Command>,
    /// Events taken from the driver, counted as batches are.
    taken: Arc<std::sync::atomic::AtomicU64>,
    /// Taken since the driver was last woken.
    untold: u64,
    flow: Arc<Flow>,
}

impl Stream for Subscription {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        loop {
            if let Some(e) = self.current.next() {
                return Poll::Ready(Some(e));
            }
            match self.events.poll_next_unpin(cx) {
                Poll::Ready(Some(batch)) => {
                    self.took(batch.len());
                    self.current = batch.into_iter();
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Subscription {
    /// The next events as they arrived: a delivery frame's messages (and
    /// the notices among them) at once, for consumers that want to handle
    /// many at a time. Events the [`Stream`] side left of a batch come
    /// first. `None` once the client is closed.
    ///
    /// ```no_run
    /// # async fn demo(mut prices: canopy_client::Subscription) {
    /// while let Some(batch) = prices.next_batch().await {
    ///     for event in batch {
    ///         // ...
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn next_batch(&mut self) -> Option<Vec<Event>> {
        let rest: Vec<Event> = std::mem::take(&mut self.current).collect();
        if !rest.is_empty() {
            return Some(rest);
        }
        let batch = self.events.next().await?;
        self.took(batch.len());
        Some(batch)
    }

    /// Counts `n` events taken, and wakes the driver every quarter window
    /// so that it grants the server room for more.
    fn took(&mut self, n: usize) {
        self.taken
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.untold += n as u64;
        if self.untold >= self.flow.quarter {
            self.untold = 0;
            self.flow.wake.notify_one();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Unsubscribe { id: self.id });
    }
}

struct Sub {
    id: u64,
    pattern: Pattern,
    events: flume::Sender<Vec<Event>>,
    /// Events handed over, and (counted by the subscription) taken.
    handed: u64,
    taken: Arc<std::sync::atomic::AtomicU64>,
}

impl Sub {
    /// Hands `events` over, counted.
    fn send(&mut self, events: Vec<Event>) {
        self.handed += events.len() as u64;
        let _ = self.events.send(events);
    }

    /// Events handed over and not taken yet.
    fn outstanding(&self) -> u64 {
        let taken = self.taken.load(std::sync::atomic::Ordering::Relaxed);
        self.handed.saturating_sub(taken)
    }
}

/// One open connection: frames in, a queue to the writer task out.
struct Conn {
    frames: FramedRead<crate::tls::ReadHalf, LengthDelimitedCodec>,
    out: flume::Sender<Bytes>,
}

/// How often a held driver looks whether the application caught up.
const HELD_CHECK: Duration = Duration::from_millis(10);
/// Commands, or frames, taken in one turn at most after the first.
const TURN_MAX: usize = 255;

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<crate::tls::Stream>> + Send>>;

/// Why the driver stops.
enum Stop {
    /// The error is final.
    Failed(Error),
    /// Every handle is gone.
    Done,
}

/// The async shell around the client's protocol core
/// ([`crate::core::ClientCore`]): it opens the sockets the core asks for,
/// feeds it frames, commands and the time, and hands deliveries, answers
/// and acknowledgements to the application.
struct Driver {
    core: ClientCore,
    /// The core's time is measured from here.
    origin: Instant,
    commands: flume::Receiver<Command>,
    window: Window,
    subscription_batches_max: usize,
    /// Publishes not acknowledged, in pub_seq order, with their slots in
    /// `ack_slots` and their shares of the window's bytes.
    acks: VecDeque<(PubSeq, usize, u32)>,
    ack_slots: Arc<Acks>,
    flushes: Vec<(PubSeq, oneshot::Sender<Result<(), Error>>)>,
    /// Replies awaited, by the call's pub_seq.
    calls: std::collections::HashMap<PubSeq, oneshot::Sender<Result<Bytes, Error>>>,
    subs: Vec<Sub>,
    /// Subscribe answers awaited, by pattern, in request order.
    pending_subs: VecDeque<(String, oneshot::Sender<Result<(), Error>>)>,
    conn: Option<Conn>,
    connecting: Option<Connecting>,
    /// TLS for every connection, if any.
    tls: Option<crate::tls::TlsConnector>,
    /// The membership (`full` reports).
    view: Arc<View>,
    /// The first Welcome's frame limit, once it came.
    frame_len_max: Option<u32>,
    /// The core's timer, armed for `timer_at` (kept across turns: a timer
    /// made per turn costs a timer-wheel entry per frame).
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
    flow: Arc<Flow>,
}

impl Driver {
    fn new(
        options: &ClientOptions,
        publisher: PublisherId,
        window: Window,
        ack_slots: Arc<Acks>,
        flow: Arc<Flow>,
    ) -> (Self, flume::Sender<Command>) {
        let config = LinkConfig {
            name: options.name.clone(),
            publisher,
            servers: options.servers.clone(),
            role: protocol::Role::Client,
            reports: options.reports,
            slow: options.slow,
            weak: options.weak,
            ping_interval: options.ping_interval.max(Duration::from_millis(100)),
            connect_timeout: options.connect_timeout,
            reconnect_for: Some(options.reconnect_for),
            first_order: FirstOrder::Configured,
            credentials: options.credentials.clone(),
            receive_window: Some(options.receive_window),
        };
        let (commands, commands_rx) = flume::unbounded();
        let mut core = ClientCore::new(Duration::ZERO, config);
        if options.publisher.is_some() {
            // A fixed id may have been used by programs before this one: its
            // pub_seqs begin past theirs (docs/DESIGN.md, "Identity and
            // resume").
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            core.begin_incarnation(secs);
        }
        let driver = Driver {
            core,
            origin: Instant::now(),
            commands: commands_rx,
            window,
            subscription_batches_max: options.subscription_batches_max.max(1),
            acks: VecDeque::new(),
            ack_slots,
            flushes: Vec::new(),
            calls: std::collections::HashMap::new(),
            subs: Vec::new(),
            pending_subs: VecDeque::new(),
            conn: None,
            connecting: None,
            tls: options.tls.clone(),
            view: Arc::default(),
            frame_len_max: None,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timer_at: None,
            flow,
        };
        (driver, commands)
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Runs until the first Welcome; returns its frame limit.
    async fn connect(&mut self) -> Result<u32, Error> {
        loop {
            if let Some(stop) = self.turn().await {
                return Err(match stop {
                    Stop::Failed(e) => e,
                    Stop::Done => Error::Closed,
                });
            }
            if let Some(len) = self.frame_len_max {
                return Ok(len);
            }
        }
    }

    async fn run(mut self) {
        loop {
            match self.turn().await {
                None => {}
                Some(Stop::Done) => return,
                Some(Stop::Failed(e)) => return self.fail(e),
            }
        }
    }

    /// Waits for one thing to happen (a command, a frame, a connection, the
    /// core's timer), feeds it to the core, and carries out what follows.
    async fn turn(&mut self) -> Option<Stop> {
        // Held while the application catches up on a subscription (see
        // `subscription_batches_max`): resume once it has, or at once if
        // it waits on the connection itself (a publish, a call, a flush:
        // holding would leave it waiting on itself).
        if self.core.link().is_held() && (self.app_waits() || self.caught_up()) {
            let now = self.now();
            self.core.release(now);
            self.carry_out();
        }
        let held = self.core.link().is_held();
        let deadline = self.core.poll_timeout().map(|t| self.origin + t);
        // Re-armed only when the core's deadline comes earlier than the
        // armed one: firing early costs the core a look at its timers.
        if let Some(d) = deadline {
            if self.timer_at.is_none_or(|at| d < at) {
                self.timer.as_mut().reset(d);
                self.timer_at = Some(d);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(HELD_CHECK), if held => {}
            cmd = self.commands.recv_async() => {
                let Ok(cmd) = cmd else { return Some(Stop::Done) };
                self.command(cmd);
                // What else is queued goes in the same turn: one pass of
                // the core's actions for a burst of publishes.
                for _ in 0..TURN_MAX {
                    let Ok(cmd) = self.commands.try_recv() else { break };
                    self.command(cmd);
                }
            }
            opened = wait_for(self.connecting.as_mut()) => {
                self.connecting = None;
                let now = self.now();
                match opened {
                    Ok(stream) => {
                        self.conn = Some(open(stream));
                        self.core.handle_connected(now);
                    }
                    Err(e) => {
                        let why = format!("{}: {e}", self.core.link().server().unwrap_or(""));
                        self.core.drop_connection(now, &why);
                    }
                }
            }
            frame = next_frame(self.conn.as_mut()) => {
                let mut more = matches!(frame, Some(Ok(_)));
                self.frame(frame);
                // And the frames already read, each after what the one
                // before it told the application (deliveries go out as a
                // frame is read, notices as events: keep them in order).
                for _ in 0..TURN_MAX {
                    if !more || self.core.link().is_held() {
                        break;
                    }
                    self.carry_out();
                    if let Some(stop) = self.events() {
                        return Some(stop);
                    }
                    let Some(frame) = self.conn.as_mut().and_then(|c| c.frames.next().now_or_never())
                    else {
                        break;
                    };
                    more = matches!(frame, Some(Ok(_)));
                    self.frame(frame);
                }
            }
            () = self.flow.wake.notified() => {
                // The application took a quarter window on a subscription.
                self.core.set_outstanding(self.outstanding());
            }
            () = self.timer.as_mut(), if self.timer_at.is_some() => {
                self.timer_at = None;
                let now = self.now();
                self.core.handle_timeout(now);
            }
        }
        self.carry_out();
        self.events()
    }

    /// Executes the core's actions.
    fn carry_out(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Connect(addr) => {
                    self.conn = None;
                    let tls = self.tls.clone();
                    self.connecting = Some(Box::pin(async move {
                        crate::tls::connect(&addr, tls.as_ref()).await
                    }));
                }
                Action::Send(frame) => {
                    if let Some(conn) = &self.conn {
                        let _ = conn.out.send(frame);
                    }
                }
                Action::Disconnect => {
                    self.conn = None;
                    self.connecting = None;
                }
            }
        }
    }

    /// Hands the core's events to the application.
    fn events(&mut self) -> Option<Stop> {
        while let Some(event) = self.core.poll_event() {
            match event {
                CoreEvent::Welcomed { welcome, joined } => {
                    self.frame_len_max.get_or_insert(welcome.frame_len_max);
                    if joined == Joined::Reset {
                        self.notify(Event::StreamReset);
                    }
                }
                CoreEvent::Acked(through) => self.acknowledge(through),
                CoreEvent::Replied { pub_seq, answer } => {
                    if let Some(reply) = self.calls.remove(&pub_seq) {
                        let _ = reply.send(answer.map_err(Error::Call));
                    }
                }
                CoreEvent::Denied { pattern, message } => {
                    self.subs.retain(|s| s.pattern.as_str() != pattern);
                    // What it held unread no longer holds the window.
                    self.core.set_outstanding(self.outstanding());
                    while let Some(i) = self.pending_subs.iter().position(|(p, _)| *p == pattern) {
                        if let Some((_, done)) = self.pending_subs.remove(i) {
                            let _ = done.send(Err(Error::Denied(message.clone())));
                        }
                    }
                }
                CoreEvent::Subscribed(pattern) => {
                    while let Some(i) = self.pending_subs.iter().position(|(p, _)| *p == pattern) {
                        if let Some((_, done)) = self.pending_subs.remove(i) {
                            let _ = done.send(Ok(()));
                        }
                    }
                }
                CoreEvent::Gap { from, to } => self.notify(Event::Gap { from, to }),
                CoreEvent::Diverged { from, seen } => self.notify(Event::Diverged { from, seen }),
                CoreEvent::Members(m) => {
                    Arc::make_mut(&mut self.view).apply(m);
                    self.notify(Event::View(self.view.clone()));
                }
                CoreEvent::Link(LinkEvent::Lost { .. }) => {}
                CoreEvent::Link(LinkEvent::Refused(e) | LinkEvent::Unreachable(e)) => {
                    self.core.stop();
                    return Some(Stop::Failed(e));
                }
            }
        }
        None
    }

    fn frame(&mut self, frame: Option<Result<bytes::BytesMut, std::io::Error>>) {
        let now = self.now();
        let content = match frame {
            Some(Ok(content)) => content.freeze(),
            Some(Err(e)) => {
                // A TLS server's alert, read as a frame, is far too long.
                let hint = match self.tls.is_none()
                    && e.get_ref().is_some_and(|inner| {
                        inner.is::<tokio_util::codec::LengthDelimitedCodecError>()
                    }) {
                    true => " (a TLS server? connect with its CA: ClientOptions::tls, canopy --ca)",
                    false => "",
                };
                return self.core.drop_connection(now, &format!("{e}{hint}"));
            }
            None => return self.core.handle_closed(now),
        };
        let frame = match protocol::decode_server(content) {
            Ok(f) => f,
            Err(e) => return self.core.refuse(now, Error::Protocol(e.to_string())),
        };
        if let Some(mut delivery) = self.core.handle_frame(now, frame) {
            if self.hand_over(&mut delivery.messages) {
                self.core.take(delivery.commit);
                self.core.set_outstanding(self.outstanding());
            } else {
                self.core.hold(
                    now,
                    "a subscription's buffer is full (the application is not keeping up); resuming once it has read half",
                );
            }
        }
    }

    /// Why the user may not do `what` `name`, when the server said what
    /// it may do and this is not among it.
    fn denied(
        &self,
        allowed: impl Fn(&protocol::Permissions) -> bool,
        what: &str,
        name: &str,
    ) -> Option<Error> {
        let p = self.core.permissions()?;
        (!allowed(p)).then(|| Error::Denied(format!("user `{}` may not {what} `{name}`", p.user)))
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish {
                topic,
                payload,
                ack,
                cost,
            } => {
                if let Some(why) = self.denied(
                    |p| p.may_publish(topic.as_str()),
                    "publish to",
                    topic.as_str(),
                ) {
                    self.ack_slots.settle(ack, Err(why));
                    // `send` took its share: nothing will acknowledge it.
                    self.window.give_back(cost as usize);
                    return;
                }
                let pub_seq = self.core.publish(topic.as_str(), &payload);
                self.acks.push_back((pub_seq, ack, cost));
            }
            Command::Call {
                method,
                replies,
                payload,
                reply,
                sent,
            } => {
                if let Some(why) = self.denied(|p| p.may_call(&method), "call", &method) {
                    let _ = reply.send(Err(why));
                    return;
                }
                let pub_seq = self.core.call_with(&method, replies, &payload);
                self.calls.insert(pub_seq, reply);
                let _ = sent.send(pub_seq);
            }
            Command::Forget {
                pub_seq,
                no_primary,
            } => {
                self.calls.remove(&pub_seq);
                self.core.forget_call(pub_seq);
                let link = self.core.link();
                let said = link.last_error() == Some(protocol::ErrorCode::NotPrimary);
                let _ = no_primary.send(!link.is_up() && said);
            }
            Command::Flush { done } => match self.acks.back() {
                None => {
                    let _ = done.send(Ok(()));
                }
                Some((pub_seq, ..)) => self.flushes.push((*pub_seq, done)),
            },
            Command::Subscribe {
                pattern,
                id,
                events,
                taken,
                done,
            } => {
                let text = pattern.as_str().to_owned();
                if let Some(why) = self.denied(|p| p.may_subscribe(&pattern), "subscribe to", &text)
                {
                    let _ = done.send(Err(why));
                    return;
                }
                self.subs.push(Sub {
                    id,
                    pattern,
                    events,
                    handed: 0,
                    taken,
                });
                if self.core.subscribe(&text) {
                    self.pending_subs.push_back((text, done));
                } else {
                    let _ = done.send(Ok(()));
                }
            }
            Command::Unsubscribe { id } => {
                let Some(i) = self.subs.iter().position(|s| s.id == id) else {
                    return;
                };
                let sub = self.subs.swap_remove(i);
                if !self.subs.iter().any(|s| s.pattern == sub.pattern) {
                    self.core.unsubscribe(sub.pattern.as_str());
                }
                // What it held unread no longer holds the window.
                self.core.set_outstanding(self.outstanding());
            }
        }
    }

    /// Hands a delivery's messages to the matching subscriptions: either
    /// every matching subscription takes its part, or none does (and the
    /// connection is dropped, to resume from the unchanged position): the
    /// driver never waits on the application, and nothing is handed over
    /// twice.
    /// Whether the application waits on the connection: publishes, calls
    /// or flushes not yet answered.
    fn app_waits(&self) -> bool {
        !self.acks.is_empty() || !self.calls.is_empty() || !self.flushes.is_empty()
    }

    /// Whether every subscription's buffer is down to half (after a
    /// hold: time to resume).
    fn caught_up(&mut self) -> bool {
        self.subs.retain(|s| !s.events.is_disconnected());
        let half = self.subscription_batches_max / 2;
        self.subs.iter().all(|s| s.events.len() <= half)
    }

    fn hand_over(&mut self, msgs: &mut Vec<Message>) -> bool {
        let cap = self.subscription_batches_max;
        self.subs.retain(|s| !s.events.is_disconnected());
        if msgs.is_empty() {
            return true;
        }
        if let [sub] = &mut self.subs[..] {
            // The common case, one subscription that wants the whole batch:
            // move the messages instead of cloning them.
            if msgs.iter().all(|m| sub.pattern.matches(m.topic())) {
                if sub.events.len() >= cap {
                    return false;
                }
                sub.send(msgs.drain(..).map(Event::Message).collect());
                return true;
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
                return false;
            }
            parts.push((i, part));
        }
        for (i, part) in parts {
            self.subs[i].send(part);
        }
        true
    }

    /// Tells every subscription of a rare event (a gap, a reset); these go
    /// past the batch bound so they are never lost.
    fn notify(&mut self, event: Event) {
        for sub in &mut self.subs {
            sub.send(vec![event.clone()]);
        }
    }

    /// Flow control: the most events any subscription was handed and has
    /// not taken (the slowest subscription sets the pace).
    fn outstanding(&self) -> u64 {
        self.subs.iter().map(Sub::outstanding).max().unwrap_or(0)
    }

    /// Everything up to `through` is acknowledged.
    fn acknowledge(&mut self, through: PubSeq) {
        let done = self.acks.partition_point(|(p, ..)| *p <= through);
        let mut bytes = 0;
        self.ack_slots
            .settle_all(self.acks.drain(..done).map(|(pub_seq, slot, cost)| {
                bytes += cost as usize;
                (slot, pub_seq)
            }));
        self.window.give_back(bytes);
        // A flush is done when nothing at or before its target is unacknowledged.
        let oldest = self.acks.front().map(|(p, ..)| *p);
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
        self.acks.clear();
        self.ack_slots.close(&e);
        for (_, done) in self.flushes.drain(..) {
            let _ = done.send(Err(e.clone()));
        }
        for (_, done) in self.pending_subs.drain(..) {
            let _ = done.send(Err(e.clone()));
        }
        for (_, reply) in self.calls.drain() {
            let _ = reply.send(Err(e.clone()));
        }
        self.window.close();
    }
}

impl Drop for Driver {
    /// However the driver ends (failed, every handle gone, its runtime shut
    /// down), no publish waits for it any more.
    fn drop(&mut self) {
        self.ack_slots.close(&Error::Closed);
        // A `send` waiting for room in the window wakes to `Closed`.
        self.window.close();
    }
}

/// Splits a connected socket into a frame reader and a writer task.
fn open(stream: crate::tls::Stream) -> Conn {
    let (read, write) = stream.into_split();
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(protocol::FRAME_LEN_MAX_LIMIT + protocol::FRAME_HEAD_ALLOWANCE)
        .new_codec();
    let (out, out_rx) = flume::unbounded();
    tokio::spawn(write_loop(write, out_rx));
    Conn {
        frames: FramedRead::new(read, codec),
        out,
    }
}

async fn wait_for(connecting: Option<&mut Connecting>) -> std::io::Result<crate::tls::Stream> {
    match connecting {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

async fn next_frame(conn: Option<&mut Conn>) -> Option<Result<bytes::BytesMut, std::io::Error>> {
    match conn {
        Some(c) => c.frames.next().await,
        None => std::future::pending().await,
    }
}

async fn write_loop(mut write: crate::tls::WriteHalf, out: flume::Receiver<Bytes>) {
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
