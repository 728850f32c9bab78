//! [`Link`]: the life of a client's connection to its tier, sans-IO
//! (docs/DESIGN.md, "Client side"): which server to try and when, the
//! handshake's checks, pings and the missed-pings rule.
//!
//! # Rules
//! - **Attempt order.** The first connection tries the configured servers
//!   in order ([`FirstOrder::Configured`], an SDK client's home is the first
//!   reachable one) or spread by adoption order ([`FirstOrder::Spread`], a
//!   relay). After a serving connection is lost, a round tries the tier's
//!   servers in adoption order with the lost one last
//!   ([`protocol::failover_order`]): the adopter is the first tried, at once
//!   (unless the pause above applies).
//! - **Backoff.** Within a round the next server is tried as soon as one
//!   fails; a round that found nobody is followed by a pause that doubles
//!   from 20 ms to 1 s. A server that refuses a connection it served for
//!   less than the longest pause (1 s) counts as a failed attempt too: say,
//!   a core that keeps answering `overloaded` right after each Welcome is
//!   not reconnected to in a tight loop. A broken connection, or a refusal
//!   after serving longer, resets the pause.
//! - **Giving up.** With `reconnect_for`, the link stops ([`LinkEvent::Unreachable`])
//!   when a round ends that long after the link went down; without it (a
//!   relay) it never stops.
//! - **Handshake.** An attempt has `connect_timeout` to connect and again
//!   to be answered; a Welcome of another protocol version, a second
//!   Welcome, or a refusal that retrying will not change
//!   ([`LinkEvent::Refused`]) drops the connection. A retryable refusal
//!   (not primary, shutting down, slow consumer) tries the next server.
//! - **Pings.** A serving link pings every `ping_interval`; one silent for
//!   three periods is dropped.
//! - The tier's server list replaces the configured one as soon as a
//!   server tells it (Welcome, Servers report).
//!
//! Frames that are not the link's business are handed back to the owner
//! ([`Link::handle_frame`]); the Welcome is handed back once checked.

use crate::error::Error;
use crate::protocol::{
    self, ClientFrame, Credentials, Hello, PingHead, PublisherId, Reports, Resume, Role,
    ServerFrame, SlowPolicy,
};
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Duration;

/// The first pause after a round that found nobody.
pub const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// The longest pause between rounds.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How the first connection picks among the configured servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstOrder {
    /// In the configured order: the first reachable one is home.
    Configured,
    /// In adoption order by publisher id, spreading many clients (relays)
    /// over the tier.
    Spread,
}

/// What a link is and how it behaves.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// A name for the server's logs and dashboard.
    pub name: String,
    /// The client's publisher id: it names its sessions and ranks its adopters.
    pub publisher: PublisherId,
    /// Client addresses of the tier, until a server tells its own list.
    pub servers: Vec<String>,
    /// Client or relay.
    pub role: Role,
    /// What the client is told of the membership.
    pub reports: Reports,
    /// What the server does when this client does not keep up.
    pub slow: SlowPolicy,
    /// Weak delivery (docs/DESIGN.md guarantee 6).
    pub weak: bool,
    /// Ping period; three silent periods drop the connection.
    pub ping_interval: Duration,
    /// Time allowed to connect, and again for the handshake.
    pub connect_timeout: Duration,
    /// Give up once no server was reached for this long; `None`: never.
    pub reconnect_for: Option<Duration>,
    /// How the first connection picks its server.
    pub first_order: FirstOrder,
    /// Who the client is, for servers that check.
    pub credentials: Option<Credentials>,
    /// Flow control: the most messages handed to the application and not
    /// taken yet plus those the server may still send ([`ClientCore`]
    /// grants more as the application takes them). `None`: no limit.
    ///
    /// [`ClientCore`]: super::ClientCore
    pub receive_window: Option<u64>,
}

/// What the shell does for the link.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Open a connection to this address (dropping any other); report with
    /// `handle_connected` or `handle_closed`.
    Connect(String),
    /// Send this frame (length prefix included) on the open connection.
    Send(Bytes),
    /// Close the open connection; no `handle_closed` is expected.
    Disconnect,
}

/// What the link tells its owner.
#[derive(Clone, Debug)]
pub enum LinkEvent {
    /// A serving connection ended; the link is trying again.
    Lost {
        /// The server it was connected to.
        server: String,
        /// Why.
        why: String,
    },
    /// A server refused this client in a way retrying will not change, or
    /// broke the protocol. The link dropped the connection and tries again
    /// (a relay waits for its operator); an SDK client stops.
    Refused(Error),
    /// No server was reached within `reconnect_for`: the link stopped.
    Unreachable(Error),
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    /// Nothing open; the next attempt is due at this time.
    Down { retry_at: Duration },
    /// Connecting to, or awaiting the Welcome of, `addr` since `since`.
    Opening { addr: String, since: Duration },
    /// Serving since `since`: the last frame was heard at `heard`.
    Up {
        addr: String,
        since: Duration,
        heard: Duration,
        ping_at: Duration,
    },
    /// Nothing open, and nothing tried until the owner releases it
    /// ([`Link::hold`]).
    Held,
    /// Gave up (`reconnect_for` ran out).
    Stopped,
}

/// A client's connection to its tier. See the module docs.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    /// The tier: configured, then as its servers tell.
    servers: Vec<String>,
    state: State,
    /// Addresses left to try in this round, the next one last.
    round: Vec<String>,
    /// The address the last serving connection was lost with, tried last.
    lost: Option<String>,
    /// The last error a server sent that sent this link elsewhere, since
    /// the last Welcome (say, `NotPrimary` while the core has no primary
    /// view).
    last_error: Option<protocol::ErrorCode>,
    backoff: Duration,
    /// Since when no connection has served (from the start at first).
    down_since: Option<Duration>,
    /// The last failed attempt, for [`LinkEvent::Unreachable`].
    last_failure: String,
    /// Connections that sent a Hello so far ([`Hello::connection`]),
    /// counted from a program's incarnation on.
    connections: u64,
    nonce: u64,
    actions: VecDeque<Action>,
    events: VecDeque<LinkEvent>,
}

impl Link {
    /// A link that makes its first attempt at its first timeout (`now`).
    pub fn new(now: Duration, config: LinkConfig) -> Self {
        Link {
            servers: config.servers.clone(),
            config,
            state: State::Down { retry_at: now },
            round: Vec::new(),
            lost: None,
            last_error: None,
            backoff: BACKOFF_MIN,
            down_since: Some(now),
            last_failure: "no attempt made".into(),
            connections: 0,
            nonce: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The link's settings.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Counts connections from `first` on (a program's incarnation): its
    /// connections then outrank every earlier program's of the same
    /// publisher id in the membership, as a program's later connections
    /// outrank its earlier ones.
    pub fn count_connections_from(&mut self, first: u64) {
        self.connections = self.connections.max(first);
    }

    /// Whether a connection is serving (its Welcome arrived).
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// Whether a connection is open or being opened.
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Opening { .. } | State::Up { .. })
    }

    /// Whether the link gave up.
    pub fn is_stopped(&self) -> bool {
        self.state == State::Stopped
    }

    /// The server of the open connection, if any.
    pub fn server(&self) -> Option<&str> {
        match &self.state {
            State::Opening { addr, .. } | State::Up { addr, .. } => Some(addr),
            _ => None,
        }
    }

    /// Since when no connection has served, if none does now.
    pub fn down_since(&self) -> Option<Duration> {
        self.down_since
    }

    /// The tier's servers as last told.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// The next action for the shell.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event for the owner.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Sends `frame` if a connection is serving; returns whether it did.
    pub fn send(&mut self, frame: Bytes) -> bool {
        if self.is_up() {
            self.actions.push_back(Action::Send(frame));
        }
        self.is_up()
    }

    /// When `handle_timeout` is next due: the named timer of the state the
    /// link is in (the retry, the handshake's deadline, or the earlier of
    /// the next ping and the silence deadline).
    pub fn poll_timeout(&self) -> Option<Duration> {
        match &self.state {
            State::Down { retry_at } => Some(*retry_at),
            State::Opening { since, .. } => Some(*since + self.config.connect_timeout),
            State::Up { heard, ping_at, .. } => Some((*ping_at).min(*heard + self.silence_max())),
            State::Held | State::Stopped => None,
        }
    }

    /// How long a serving connection may be silent.
    pub fn silence_max(&self) -> Duration {
        self.config.ping_interval * 3
    }

    /// Time has reached `now`: connect, ping, or give up on a silent link.
    pub fn handle_timeout(&mut self, now: Duration) {
        let silence_max = self.silence_max();
        match &mut self.state {
            State::Down { retry_at } if now >= *retry_at => self.connect_next(now),
            State::Opening { addr, since } if now >= *since + self.config.connect_timeout => {
                let why = format!(
                    "{addr}: no handshake within {:?}",
                    self.config.connect_timeout
                );
                self.drop_connection(now, &why);
            }
            State::Up { addr, heard, .. } if now >= *heard + silence_max => {
                let why = format!("{addr}: silent for three ping periods");
                self.drop_connection(now, &why);
            }
            State::Up { ping_at, .. } if now >= *ping_at => {
                *ping_at = now + self.config.ping_interval;
                self.nonce += 1;
                let ping = ClientFrame::Ping(PingHead { nonce: self.nonce });
                self.actions
                    .push_back(Action::Send(protocol::encode_client(&ping)));
            }
            _ => {}
        }
    }

    /// Starts the next attempt of this round, or a new round.
    fn connect_next(&mut self, now: Duration) {
        if self.round.is_empty() {
            self.round = self.attempt_order();
            // Popped from the back: reversed, so the first choice goes first.
            self.round.reverse();
        }
        match self.round.pop() {
            Some(addr) => {
                self.actions.push_back(Action::Connect(addr.clone()));
                self.state = State::Opening { addr, since: now };
            }
            None => {
                self.state = State::Down {
                    retry_at: now + BACKOFF_MAX,
                }
            }
        }
    }

    /// The order of one round of attempts (see the module docs).
    fn attempt_order(&self) -> Vec<String> {
        match (&self.lost, self.config.first_order) {
            (None, FirstOrder::Configured) => self.servers.clone(),
            (lost, _) => protocol::failover_order(
                self.config.publisher.0,
                &self.servers,
                lost.as_deref().unwrap_or(""),
            ),
        }
    }

    /// The connection opened: the Hello goes out, with the owner's
    /// subscriptions and resume position.
    pub fn handle_connected(
        &mut self,
        now: Duration,
        subscriptions: Vec<String>,
        resume: Option<Resume>,
        window: Option<u64>,
    ) {
        let State::Opening { since, .. } = &mut self.state else {
            return;
        };
        *since = now;
        self.connections += 1;
        let hello = Hello {
            version: protocol::PROTOCOL_VERSION,
            name: self.config.name.clone(),
            publisher: self.config.publisher,
            subscriptions,
            resume,
            slow: self.config.slow,
            role: self.config.role,
            reports: self.config.reports,
            connection: self.connections,
            weak: self.config.weak,
            auth: self.config.credentials.clone(),
            window,
        };
        let frame = protocol::encode_client(&ClientFrame::Hello(hello));
        self.actions.push_back(Action::Send(frame));
    }

    /// The connection (or the attempt) ended.
    pub fn handle_closed(&mut self, now: Duration) {
        let why = match self.server() {
            Some(addr) => format!("{addr}: connection closed"),
            None => return,
        };
        self.lose(now, &why, false);
    }

    /// Drops the open connection (the shell is told to close it) and tries
    /// again by the rules.
    pub fn drop_connection(&mut self, now: Duration, why: &str) {
        self.drop_as(now, why, false);
    }

    /// Drops the open connection; `refused`: because the server sent the
    /// client away (see the backoff rule in the module docs).
    fn drop_as(&mut self, now: Duration, why: &str, refused: bool) {
        if self.is_open() {
            tracing::debug!(reason = why, "dropping the connection");
            self.actions.push_back(Action::Disconnect);
        }
        self.lose(now, why, refused);
    }

    fn lose(&mut self, now: Duration, why: &str, refused: bool) {
        // Frames for the lost connection are moot: what must be sent again
        // goes on the next one.
        self.actions.retain(|a| !matches!(a, Action::Send(_)));
        match std::mem::replace(&mut self.state, State::Down { retry_at: now }) {
            State::Up { addr, since, .. } => {
                tracing::info!(server = %addr, reason = why, "connection lost; reconnecting");
                self.events.push_back(LinkEvent::Lost {
                    server: addr.clone(),
                    why: why.to_owned(),
                });
                self.lost = Some(addr);
                self.round.clear();
                self.down_since = Some(now);
                if !refused || now >= since + BACKOFF_MAX {
                    // The adopter is tried at once.
                    self.backoff = BACKOFF_MIN;
                } else {
                    self.state = State::Down {
                        retry_at: now + self.backoff,
                    };
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
            State::Opening { .. } => {
                self.last_failure = why.to_owned();
                if self.round.is_empty() {
                    self.round_failed(now);
                }
            }
            // Already down: the pending retry (and its backoff) stands.
            other => self.state = other,
        }
    }

    /// A round found nobody: pause, or give up.
    fn round_failed(&mut self, now: Duration) {
        let give_up = self
            .config
            .reconnect_for
            .zip(self.down_since)
            .is_some_and(|(limit, since)| now >= since + limit);
        if give_up {
            self.state = State::Stopped;
            self.events
                .push_back(LinkEvent::Unreachable(Error::Unreachable {
                    servers: self.servers.join(", "),
                    last: self.last_failure.clone(),
                }));
            return;
        }
        self.state = State::Down {
            retry_at: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Drops the connection because the owner cannot take more now (its
    /// application is behind on a subscription), and tries nothing until
    /// [`Link::release`]: a reader that cannot keep up would otherwise
    /// resume at once, be behind again at once, and make its server replay
    /// to it in a loop. Giving up (`reconnect_for`) does not run meanwhile.
    pub fn hold(&mut self, now: Duration, why: &str) {
        if matches!(self.state, State::Stopped | State::Held) {
            return;
        }
        self.drop_connection(now, why);
        self.state = State::Held;
    }

    /// Ends a [`Link::hold`]: the next round starts now.
    pub fn release(&mut self, now: Duration) {
        if matches!(self.state, State::Held) {
            self.state = State::Down { retry_at: now };
            self.down_since = Some(now);
        }
    }

    /// Whether the link is held ([`Link::hold`]).
    pub fn is_held(&self) -> bool {
        matches!(self.state, State::Held)
    }

    /// Tries again now instead of at the end of the pause, with the pause
    /// back at its shortest: for a shell that knows the network changed
    /// (gRPC's `resetConnectBackoff`).
    pub fn reset_backoff(&mut self, now: Duration) {
        self.backoff = BACKOFF_MIN;
        if let State::Down { retry_at } = &mut self.state {
            *retry_at = (*retry_at).min(now);
        }
    }

    /// Gives up for good (the owner's decision, say on a refusal).
    pub fn stop(&mut self) {
        if self.is_open() {
            self.actions.push_back(Action::Disconnect);
        }
        self.state = State::Stopped;
    }

    /// A frame arrived on the open connection. The link's own frames
    /// (pings, pongs, server lists, refusals of the connection) are handled
    /// here; the rest, the checked Welcome included, go back to the owner.
    pub fn handle_frame(&mut self, now: Duration, frame: ServerFrame) -> Option<ServerFrame> {
        match &mut self.state {
            State::Up { heard, .. } => *heard = now,
            State::Opening { .. } => {}
            State::Down { .. } | State::Held | State::Stopped => return None,
        }
        match frame {
            ServerFrame::Welcome(w) => {
                let State::Opening { addr, .. } = &self.state else {
                    self.refuse(now, Error::Protocol("a second Welcome".into()));
                    return None;
                };
                if w.version != protocol::PROTOCOL_VERSION {
                    let e = Error::Protocol(format!(
                        "server speaks protocol version {}, this client {}",
                        w.version,
                        protocol::PROTOCOL_VERSION
                    ));
                    self.refuse(now, e);
                    return None;
                }
                if w.head == protocol::Seq(u64::MAX) {
                    // No seq follows it: a client or relay would overflow
                    // naming the next one.
                    let e = Error::Protocol("server's head is the last seq there is".into());
                    self.refuse(now, e);
                    return None;
                }
                self.state = State::Up {
                    addr: addr.clone(),
                    since: now,
                    heard: now,
                    ping_at: now + self.config.ping_interval,
                };
                self.down_since = None;
                self.last_error = None;
                if protocol::usable_servers(&w.servers) {
                    self.servers.clone_from(&w.servers);
                }
                Some(ServerFrame::Welcome(w))
            }
            ServerFrame::Ping(p) => {
                let pong = protocol::encode_client(&ClientFrame::Pong(p));
                self.actions.push_back(Action::Send(pong));
                None
            }
            ServerFrame::Pong(_) => None,
            ServerFrame::Servers(s) => {
                if protocol::usable_servers(&s.servers) {
                    self.servers = s.servers;
                }
                None
            }
            // About one subscription only: the connection stays.
            ServerFrame::Error(e) if e.pattern.is_some() && self.is_up() => {
                Some(ServerFrame::Error(e))
            }
            ServerFrame::Error(e) if e.publisher.is_none() => {
                if e.code.is_retryable() {
                    // Not serving now (not primary, shutting down, ...), or
                    // this client fell behind: another server, or a resume.
                    let why = format!("{:?}: {}", e.code, e.message);
                    self.last_error = Some(e.code);
                    self.drop_as(now, &why, true);
                } else {
                    let e = Error::Rejected {
                        code: e.code,
                        message: e.message,
                    };
                    self.refuse(now, e);
                }
                None
            }
            other if !self.is_up() => {
                self.refuse(
                    now,
                    Error::Protocol(format!("{} before the Welcome", frame_name(&other))),
                );
                None
            }
            other => Some(other),
        }
    }

    /// The last error a server sent this link away with since the last
    /// Welcome (`None` while a connection serves).
    pub fn last_error(&self) -> Option<protocol::ErrorCode> {
        self.last_error
    }

    /// The server refused this client or broke the protocol.
    pub fn refuse(&mut self, now: Duration, e: Error) {
        tracing::warn!(server = self.server().unwrap_or(""), error = %e, "refused");
        self.drop_as(now, &e.to_string(), true);
        self.events.push_back(LinkEvent::Refused(e));
    }
}

fn frame_name(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Welcome(_) => "Welcome",
        ServerFrame::Deliver(..) => "a delivery",
        ServerFrame::PubAck(_) => "an acknowledgement",
        ServerFrame::Subscribed(_) => "Subscribed",
        ServerFrame::Unsubscribed(_) => "Unsubscribed",
        ServerFrame::Watermark(_) => "a watermark",
        ServerFrame::Gap(_) => "a gap notice",
        ServerFrame::Diverged(_) => "Diverged",
        ServerFrame::Members(_) => "a membership report",
        ServerFrame::Servers(_) => "a server list",
        ServerFrame::Ping(_) => "Ping",
        ServerFrame::Pong(_) => "Pong",
        ServerFrame::Error(_) => "an error",
        ServerFrame::Reply(..) => "a reply",
    }
}
