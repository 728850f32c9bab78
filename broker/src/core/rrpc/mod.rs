//! RRPC, replicated RPC: the layer above TOTAL that runs a replicated
//! [`Service`] at every core server of the group (docs/DESIGN.md,
//! "Replicated RPC").
//!
//! A call is a publish on `$canopy.call.METHOD`; TOTAL orders it like any
//! other, so its id is its caller's `(publisher, pub_seq)` and a retry
//! after a failover or an adoption is the same call. Every replica reads
//! the stable stream in order:
//! - a **call** joins the queue of calls not yet applied (a call already
//!   applied, which a table that forgot its caller let through again, is
//!   dropped);
//! - an **outcome** (a record on `$canopy.rrpc` that a replica ordered:
//!   the effect of a call it executed, or one share of a parallel call) is
//!   kept with its call; the first outcome of a call (of a share) counts,
//!   later ones are dropped, the same way at every replica.
//!
//! A call is applied at the position of the stream where its effect
//! becomes known, the same position at every replica: an active call's at
//! its own (every replica executes it there, deterministically); a
//! primary-backup or load-balanced call's at its outcome's; a parallel
//! call's at its last share's (the merge of the shares). So one slow
//! executor holds up no other call, and the order of applying is one total
//! order all replicas share. Applying gives the reply, which is kept in the reply table
//! (part of the group's state: a caller adopted by another server finds it
//! there) and handed up, so that the server the caller is attached to
//! sends it.
//!
//! Who executes is decided by each replica from the members the stream
//! says: the coordinator of every view orders a **view record** (the
//! view's id and members, on [`VIEW_TOPIC`]) as it begins, and a replica
//! takes the members of the newest record delivered (an older view's
//! record ordered late changes nothing). So every replica changes members
//! at the same position, even one that never installed a view (cut off
//! between accepting it and its commit, it is delivered the view's
//! messages by the next view's flush), and a view in which nothing was
//! ordered changes nothing anywhere. The executor is the primary (the
//! first member) for primary-backup, once every earlier call is applied;
//! for load-balanced, the member with the fewest load-balanced calls
//! without an outcome when the call is delivered (an assignment kept in
//! the replicated state, made alike everywhere: the counts come from the
//! stream); the member `rank % size` for each share of a parallel call.
//! A new record reassigns what has no outcome yet (load-balanced: only
//! what a departed member held); an executor that loses its turn may
//! still order its outcome, and the first one ordered wins, so a call is
//! applied once and its effect never comes from two executions. Before a
//! stream's first record nothing is executed and no vote is decided (an
//! active call applied before it takes that record's members as voters).
//!
//! # Driving it
//! The group hands it the stable stream ([`Rrpc::deliver`]), the views it
//! installs ([`Rrpc::view`]: a new stream, and the record to order if it
//! coordinates the view), primary or not ([`Rrpc::set_primary`]), and snapshots
//! to take and install ([`Rrpc::snapshot`], [`Rrpc::restore`]). The shell
//! runs the [`Job`]s of [`Rrpc::poll_job`] off the server's loop and
//! reports with [`Rrpc::executed`]; outcomes to order come from
//! [`Rrpc::take_submissions`], replies from [`Rrpc::poll_reply`].
//!
//! # Invariants
//! - Every replica that delivered the same stream prefix has the same
//!   queue, reply table and service state (apply is deterministic).
//! - A call is applied at most once per replica: it leaves the queue when
//!   applied, and a caller's later call id is applied only after earlier
//!   ones (TOTAL keeps a publisher's order).
//! - Bounded: replies by `replies_max` (oldest first); the queue by what
//!   the stream delivered and no outcome completed yet (the node refuses
//!   calls past [`RrpcConfig::queue_max`]).

mod assign;
mod outcomes;
mod service;
mod wire;

pub use service::{digest_of, share, Call, CallId, Method, Mode, Service, Share, Shared};

use crate::core::mbrship::{Member, NodeId, View, ViewId};
use crate::core::stream::{Msg, Ordered};
use crate::core::total::wire::Submitted;
use bytes::Bytes;
use canopy_client::protocol::{
    CallErrorCode, CallFailure, PubSeq, PublisherId, Replies, Seq, Vote,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use wire::{Outcome, Pending, State, ViewRecord, Voting};

/// The most shares a parallel call is split into (a record that says more
/// is not a replica's).
const SHARES_MAX: u32 = 1024;

/// The topic replicas order their outcomes on.
pub const OUTCOME_TOPIC: &str = "$canopy.rrpc";

/// The topic each view's coordinator orders the view's members on.
pub const VIEW_TOPIC: &str = "$canopy.rrpc.view";

/// The publisher id member `node` in incarnation `incarnation` orders its
/// outcomes under (not the id it attaches clients under: the two number
/// their messages apart).
pub fn outcome_publisher(node: NodeId, incarnation: u64) -> PublisherId {
    let mut z = (u64::from(node.0) << 48) ^ incarnation ^ 0x5252_5043_0000_0000;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    PublisherId(z ^ (z >> 31))
}

/// The method a call topic names, if it is one.
pub fn call_method(topic: &str) -> Option<&str> {
    Replies::parse(topic).map(|(method, _)| method)
}

/// A call's reply, or why it failed.
pub type Answer = Result<Bytes, CallFailure>;

/// RRPC's settings.
#[derive(Clone, Debug)]
pub struct RrpcConfig {
    /// The publisher id this server orders its outcomes under (its own;
    /// a new one per incarnation).
    pub publisher: PublisherId,
    /// Replies kept for callers that ask again, at most.
    pub replies_max: usize,
    /// Calls delivered and not yet applied beyond which the server takes
    /// no new calls (they are pushed back, and retried by their callers).
    pub queue_max: usize,
}

impl RrpcConfig {
    /// Defaults for a server whose outcomes are ordered as `publisher`.
    pub fn new(publisher: PublisherId) -> Self {
        RrpcConfig {
            publisher,
            replies_max: 100_000,
            queue_max: 10_000,
        }
    }
}

/// Work for the shell: execute a call (or a share of one) with
/// [`Job::run`], off the server's loop, then hand the result to
/// [`Rrpc::executed`].
#[derive(Clone, Debug)]
pub struct Job {
    /// The call.
    pub id: CallId,
    /// Its method.
    pub method: Arc<str>,
    /// Its argument.
    pub payload: Bytes,
    /// The share, for a parallel call.
    pub share: Option<Share>,
}

impl Job {
    /// Executes the call on `service` (a handler that panics fails the
    /// call, it does not take the server down).
    pub fn run(&self, service: &Shared) -> Result<Bytes, String> {
        let call = Call {
            id: self.id,
            method: &self.method,
            payload: &self.payload,
            share: self.share,
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| service.execute(&call)))
            .unwrap_or_else(|_| Err("the handler panicked".into()))
    }
}

/// A reply for the server the caller is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The call.
    pub id: CallId,
    /// Its method.
    pub method: Arc<str>,
    /// The reply, or why it failed.
    pub answer: Answer,
}

/// What the reply table knows of a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Applied; here is its reply.
    Replied(Answer),
    /// Ordered, not applied yet: its reply comes as a [`Reply`].
    Pending,
    /// Not ordered as far as this replica knows.
    Unknown,
}

/// Counters per method, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MethodStats {
    /// Its mode.
    pub mode: Option<Mode>,
    /// Calls applied (each once per replica).
    pub applied: u64,
    /// Of them, failed (unknown method or handler error).
    pub failed: u64,
    /// Calls (or shares) executed here.
    pub executed: u64,
    /// Calls (or shares) whose executor changed at a view change before
    /// their outcome was ordered.
    pub reassigned: u64,
}

/// RRPC's deliberate bugs, for tests proving the simulator's checkers
/// (`core::group::GroupBugs` sets them).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RrpcBugs {
    /// A call already applied or queued is queued (and applied) again.
    pub no_dedup: bool,
    /// A snapshot leaves out the calls not applied yet.
    pub drop_queue_in_snapshot: bool,
}

/// The replicated-RPC layer of one core server. See the module docs.
pub struct Rrpc {
    pub(crate) bugs: RrpcBugs,
    /// `None`: the core runs no service; every call fails with `NoService`.
    service: Option<Shared>,
    /// The service's methods and modes.
    modes: BTreeMap<String, Mode>,
    /// A fresh service's snapshot: the state a new stream starts from.
    initial: Bytes,
    config: RrpcConfig,
    me: NodeId,
    /// The members of the newest view record delivered, in the view's
    /// order (empty before a stream's first)...
    members: Vec<Member>,
    /// ...and that view.
    view: Option<ViewId>,
    /// The last seq delivered.
    delivered: Seq,
    /// A running hash of every call applied and its reply (replicated
    /// state, carried by snapshots): a cheap fingerprint of the sequence
    /// of applies, for comparing replicas often.
    history: u64,
    primary: bool,
    /// Delivered calls not applied yet, in stream order.
    queue: VecDeque<Pending>,
    /// Replies of applied calls, kept for callers that ask again...
    replies: HashMap<CallId, Answer>,
    /// ...oldest first.
    replies_order: VecDeque<CallId>,
    /// Per caller, its highest call applied: a call at or below it is
    /// applied or still queued (a caller's calls are delivered in its
    /// order, though applied where their effects become known). Forgotten
    /// with the caller's last reply held...
    done: HashMap<PublisherId, PubSeq>,
    /// ...counted here (derived from `replies`).
    held: HashMap<PublisherId, usize>,
    /// Jobs handed out and not reported yet (call, share rank).
    running: BTreeSet<(CallId, u32)>,
    /// Per member, the load-balanced calls assigned to it with no outcome
    /// yet (counted from the queue).
    load: BTreeMap<NodeId, usize>,
    /// Calls applied that wait for their replicas' votes.
    voting: BTreeMap<CallId, Voting>,
    /// The last pub_seq of this server's own outcomes.
    own_pub_seq: PubSeq,
    stream: u64,
    jobs: VecDeque<Job>,
    submissions: Vec<Submitted>,
    out: VecDeque<Reply>,
    stats: BTreeMap<String, MethodStats>,
}

impl Rrpc {
    /// The layer for server `me`, running `service` (or none).
    pub fn new(me: NodeId, service: Option<Shared>, config: RrpcConfig) -> Self {
        let (modes, initial) = match &service {
            Some(s) => {
                let modes = s.methods().into_iter().map(|m| (m.name, m.mode)).collect();
                (modes, s.snapshot())
            }
            None => (BTreeMap::new(), Bytes::new()),
        };
        Rrpc {
            bugs: RrpcBugs::default(),
            service,
            modes,
            initial,
            config,
            me,
            members: Vec::new(),
            view: None,
            delivered: Seq(0),
            history: 0,
            primary: false,
            queue: VecDeque::new(),
            replies: HashMap::new(),
            replies_order: VecDeque::new(),
            done: HashMap::new(),
            held: HashMap::new(),
            running: BTreeSet::new(),
            load: BTreeMap::new(),
            voting: BTreeMap::new(),
            own_pub_seq: PubSeq(0),
            stream: 0,
            jobs: VecDeque::new(),
            submissions: Vec::new(),
            out: VecDeque::new(),
            stats: BTreeMap::new(),
        }
    }

    /// The service, if the core runs one.
    pub fn service(&self) -> Option<&Shared> {
        self.service.as_ref()
    }

    /// The service's methods and their modes.
    pub fn methods(&self) -> &BTreeMap<String, Mode> {
        &self.modes
    }

    /// Counters per method (methods called but unknown included).
    pub fn stats(&self) -> &BTreeMap<String, MethodStats> {
        &self.stats
    }

    /// A fingerprint of the replicated state, cheap to take: every call
    /// applied, in order, with its reply, and how many wait. Equal at
    /// replicas that delivered the same stream prefix ([`Rrpc::digest`]
    /// compares the whole state).
    pub fn fingerprint(&self) -> u64 {
        self.history ^ (self.queue.len() as u64).rotate_left(48)
    }

    /// Calls delivered and not applied yet.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether the server should take no new calls now.
    pub fn is_full(&self) -> bool {
        self.queue.len() >= self.config.queue_max
    }

    /// A digest of the replicated state: the service's state, the queue
    /// and the reply table. Equal at replicas that delivered the same
    /// stream prefix.
    pub fn digest(&self) -> u64 {
        digest_of(&self.snapshot())
    }

    /// This server installed `view` after seq `at` (the last seq of the
    /// view before). Its members take effect where the view's record is
    /// delivered, the same position at every replica: the coordinator
    /// orders the record now (a core that runs no service has no use for
    /// members, and orders none).
    pub fn view(&mut self, view: &View, at: Seq) {
        if view.stream != self.stream {
            self.set_stream(view.stream);
            self.delivered = at;
        }
        if view.id.coordinator == self.me && self.service.is_some() {
            let record = ViewRecord {
                id: view.id,
                members: view.members.clone(),
            };
            self.submit(VIEW_TOPIC, wire::encode(&record));
        }
    }

    /// A view record delivered: the newest view's members take effect
    /// here, and what has no outcome yet is reassigned by them.
    fn on_view_record(&mut self, m: &Ordered) {
        let record: ViewRecord = match wire::decode(&m.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(publisher = %m.publisher, seq = %m.seq, error = %e, "a view record that does not decode; ignored");
                return;
            }
        };
        let by_coordinator = record.members.iter().any(|c| {
            c.node == record.id.coordinator
                && outcome_publisher(c.node, c.incarnation.0) == m.publisher
        });
        if !by_coordinator {
            tracing::warn!(publisher = %m.publisher, seq = %m.seq, view = %record.id, "a view record not ordered by its view's coordinator; ignored");
            return;
        }
        if self.view.is_some_and(|v| record.id <= v) {
            // An older view's record, ordered after a newer one's.
            return;
        }
        self.view = Some(record.id);
        let old = std::mem::replace(&mut self.members, record.members);
        match old.is_empty() {
            true => self.name_voters(),
            false => self.count_reassigned(&old),
        }
        for i in 0..self.queue.len() {
            self.assign(i);
        }
        self.count_votes_all();
        self.dispatch_all();
    }

    /// The publisher id this server orders its outcomes and votes under
    /// from now on: a server that starts over as a new incarnation (a
    /// rejoin) takes a new one, so that its votes count as the new
    /// incarnation's.
    pub fn set_publisher(&mut self, publisher: PublisherId) {
        if publisher != self.config.publisher {
            self.config.publisher = publisher;
            self.own_pub_seq = PubSeq(0);
        }
    }

    /// The publisher id this server orders its outcomes and votes under.
    pub fn publisher(&self) -> PublisherId {
        self.config.publisher
    }

    /// In a primary view (executes and orders) or not.
    pub fn set_primary(&mut self, primary: bool) {
        self.primary = primary;
        self.dispatch_all();
    }

    /// Stable messages, in stream order.
    pub fn deliver(&mut self, msgs: &[Ordered]) {
        for m in msgs {
            self.delivered = m.seq;
            if let Some((method, replies)) = Replies::parse(&m.topic) {
                self.on_call(m, method, replies);
            } else if &*m.topic == OUTCOME_TOPIC {
                self.on_outcome(m);
            } else if &*m.topic == VIEW_TOPIC {
                self.on_view_record(m);
            }
            // What this message made known is applied at its position.
            self.advance();
        }
    }

    /// A job's result.
    pub fn executed(&mut self, job: &Job, result: Result<Bytes, String>) {
        let rank = job.share.map_or(0, |s| s.rank);
        self.running.remove(&(job.id, rank));
        let Some(p) = self.queue.iter().find(|p| p.id == job.id) else {
            return;
        };
        let wanted = match job.share {
            Some(s) => p.of.is_none_or(|of| of == s.of) && !p.shares.contains_key(&s.rank),
            None => p.outcome.is_none(),
        };
        if !wanted {
            return;
        }
        self.stat(&job.method).executed += 1;
        let outcome = Outcome {
            id: job.id,
            share: job.share,
            result,
        };
        self.submit(OUTCOME_TOPIC, wire::encode(&outcome));
    }

    /// Orders a record on `topic` under this server's own publisher id.
    fn submit(&mut self, topic: &str, record: Bytes) {
        let pub_seq = PubSeq(self.own_pub_seq.0 + 1);
        let after = std::mem::replace(&mut self.own_pub_seq, pub_seq);
        let msg = Msg(self.config.publisher, pub_seq, topic.into(), record);
        self.submissions.push(Submitted(after, msg));
    }

    /// The next job for the shell.
    pub fn poll_job(&mut self) -> Option<Job> {
        self.jobs.pop_front()
    }

    /// Outcomes to order, in order.
    pub fn take_submissions(&mut self) -> Vec<Submitted> {
        std::mem::take(&mut self.submissions)
    }

    /// The next reply, in the order calls were applied.
    pub fn poll_reply(&mut self) -> Option<Reply> {
        self.out.pop_front()
    }

    /// What this replica knows of call `id`.
    pub fn lookup(&self, id: CallId) -> Lookup {
        if let Some(a) = self.replies.get(&id) {
            return Lookup::Replied(a.clone());
        }
        if self.queue.iter().any(|p| p.id == id) || self.voting.contains_key(&id) {
            return Lookup::Pending;
        }
        if self
            .done
            .get(&id.publisher)
            .is_some_and(|&d| id.pub_seq <= d)
        {
            return Lookup::Replied(Err(forgotten(id)));
        }
        Lookup::Unknown
    }

    /// The replicated state, for a snapshot (at the delivered position).
    pub fn snapshot(&self) -> Bytes {
        let mut replies: Vec<_> = self
            .replies_order
            .iter()
            .filter_map(|id| Some((*id, self.replies.get(id)?.clone())))
            .collect();
        replies.dedup_by_key(|(id, _)| *id);
        let mut done: Vec<_> = self.done.iter().map(|(p, s)| (*p, *s)).collect();
        done.sort_unstable();
        wire::encode(&State {
            service: self
                .service
                .as_ref()
                .map(|s| s.snapshot())
                .unwrap_or_default(),
            queue: match self.bugs.drop_queue_in_snapshot {
                true => Vec::new(),
                false => self.queue.iter().cloned().collect(),
            },
            replies,
            done,
            history: self.history,
            members: self.members.clone(),
            view: self.view,
            voting: self.voting.values().cloned().collect(),
        })
    }

    /// Replaces the replicated state with a snapshot's (`None`: the state a
    /// new stream starts from), at seq `head` of stream `stream`.
    ///
    /// # Errors
    /// When the snapshot does not decode or the service refuses it; the
    /// state is then left as it was.
    pub fn restore(&mut self, state: Option<&[u8]>, stream: u64, head: Seq) -> Result<(), String> {
        let state = match state {
            Some(bytes) => wire::decode::<State>(bytes)?,
            None => State {
                service: self.initial.clone(),
                ..State::default()
            },
        };
        // The bound a live share is held to (`outcomes.rs`): executors
        // are chosen for each of a call's shares.
        if let Some(p) = state
            .queue
            .iter()
            .find(|p| p.of.is_some_and(|of| of == 0 || of > SHARES_MAX))
        {
            return Err(format!(
                "call {:?} has {:?} shares (1 to {SHARES_MAX})",
                p.id, p.of
            ));
        }
        if let Some(service) = &self.service {
            service.restore(&state.service)?;
        }
        if stream != self.stream {
            self.set_stream(stream);
        }
        self.queue = state.queue.into();
        self.members = state.members;
        self.view = state.view;
        self.replies_order = state.replies.iter().map(|(id, _)| *id).collect();
        self.replies = state.replies.into_iter().collect();
        self.done = state.done.into_iter().collect();
        self.held.clear();
        for id in self.replies.keys() {
            *self.held.entry(id.publisher).or_default() += 1;
        }
        self.history = state.history;
        self.voting = state.voting.into_iter().map(|v| (v.id, v)).collect();
        self.vote_restored();
        self.running.clear();
        self.jobs.clear();
        self.load.clear();
        for p in &self.queue {
            if let Some(e) = p.executor.filter(|_| p.outcome.is_none()) {
                *self.load.entry(e).or_default() += 1;
            }
        }
        self.delivered = head;
        self.advance();
        self.dispatch_all();
        Ok(())
    }

    /// After a snapshot: calls waiting for votes that count this replica
    /// as a voter, without its vote ordered (it took the call's effect
    /// from the snapshot, or its vote was lost with a view change), get
    /// its vote now: the reply applying gave, which is its state's (an
    /// active call's reply is the same at every replica). Otherwise they
    /// would wait for it for good. A vote of its already on its way counts
    /// first; this one is then dropped.
    fn vote_restored(&mut self) {
        let me = self.config.publisher;
        let owed: Vec<Outcome> = self
            .voting
            .values()
            .filter(|v| v.voters.iter().any(|(_, p)| *p == me) && !v.votes.contains_key(&me))
            .filter_map(|v| {
                Some(Outcome {
                    id: v.id,
                    share: None,
                    result: v.answer.clone()?.map_err(|e| e.message),
                })
            })
            .collect();
        for own in owed {
            self.submit(OUTCOME_TOPIC, wire::encode(&own));
        }
    }

    /// Another stream: nothing of this server's outcomes is known there.
    fn set_stream(&mut self, stream: u64) {
        self.stream = stream;
        self.members.clear();
        self.view = None;
        self.own_pub_seq = PubSeq(0);
        self.submissions.clear();
    }

    fn on_call(&mut self, m: &Ordered, method: &str, replies: Replies) {
        let id = CallId {
            publisher: m.publisher,
            pub_seq: m.pub_seq,
        };
        // Ordered again (a table that forgot its caller let a retry
        // through): never applied twice. Still waiting for its effect, it
        // is answered when applied; applied, it is answered again, as the
        // caller that retried waits. (Calls may be applied out of their
        // caller's order, so a call below the last applied may be queued.)
        let waiting = self.queue.iter().any(|p| p.id == id) || self.voting.contains_key(&id);
        if waiting && !self.bugs.no_dedup {
            return;
        }
        let applied = self
            .done
            .get(&id.publisher)
            .is_some_and(|&d| id.pub_seq <= d);
        if applied && !self.bugs.no_dedup {
            let answer = self
                .replies
                .get(&id)
                .cloned()
                .unwrap_or_else(|| Err(forgotten(id)));
            self.out.push_back(Reply {
                id,
                method: method.into(),
                answer,
            });
            return;
        }
        let mode = self.modes.get(method).copied();
        self.queue.push_back(Pending {
            id,
            method: method.into(),
            payload: m.payload.clone(),
            mode,
            replies,
            of: None,
            outcome: None,
            executor: None,
            shares: BTreeMap::new(),
        });
        let i = self.queue.len() - 1;
        self.assign(i);
        self.dispatch(i);
    }

    fn stat(&mut self, method: &str) -> &mut MethodStats {
        if !self.stats.contains_key(method) {
            let mode = self.modes.get(method).copied();
            self.stats.insert(
                method.to_owned(),
                MethodStats {
                    mode,
                    ..MethodStats::default()
                },
            );
        }
        self.stats.entry(method.to_owned()).or_default()
    }
}

/// A handler's error as the caller is told it.
fn handler(message: String) -> CallFailure {
    CallFailure {
        code: CallErrorCode::Handler,
        message,
    }
}

fn no_service() -> CallFailure {
    CallFailure {
        code: CallErrorCode::NoService,
        message: "the core runs no replicated service".into(),
    }
}

/// The failure for a call whose reply is no longer held.
pub fn forgotten(id: CallId) -> CallFailure {
    CallFailure {
        code: CallErrorCode::Forgotten,
        message: format!("call {id} was executed; its reply is no longer held"),
    }
}

#[cfg(test)]
mod tests;
