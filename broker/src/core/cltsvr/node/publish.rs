//! The publish path: a publish's checks, deduplication, ordering (alone)
//! or submission to the group below, acknowledgements, refusals, and the
//! node's publisher table.

use super::*;
use crate::core::rrpc::CallId;

impl Node {
    pub(super) fn on_publish(&mut self, session: SessionId, publish: Publish) {
        let topic = match self.checked_topic(publish.topic_bytes()) {
            Ok(t) => t,
            Err(why) => return self.close_with_error(session, ErrorCode::InvalidTopic, why),
        };
        let relay = self
            .sessions
            .get(&session)
            .and_then(|s| s.hello.as_ref())
            .is_some_and(|h| h.role == Role::Relay);
        if let Some(limits) = self.limits_of(session) {
            if !limits.may_publish(&topic) {
                // The SDK refuses it before it takes a pub_seq: this
                // client went around it.
                let msg = format!("user `{}` may not publish or call `{}`", limits.user, topic);
                return self.close_with_error(session, ErrorCode::PermissionDenied, msg);
            }
        }
        // Relays carry their clients' membership events; anyone may call.
        // No one else publishes the broker's own topics: an RRPC outcome
        // or view record from a session would be taken as a replica's.
        if is_system(&topic) && !Self::is_call(&topic) && !(relay && &*topic == MEMBERS_TOPIC) {
            let msg = format!("`{topic}`: topics starting with `$` are the broker's own");
            return self.close_with_error(session, ErrorCode::InvalidTopic, msg);
        }
        let Publish {
            pub_seq, payload, ..
        } = &publish;
        let (pub_seq, payload) = (*pub_seq, payload.clone());
        let Some((publisher, forwarded)) = self.acting_for(session, publish.publisher, "publish")
        else {
            return;
        };
        if forwarded {
            let Some(s) = self.sessions.get_mut(&session) else {
                return;
            };
            // What follows a refused publish waits for the publisher's retry
            // of it, unless that publish was ordered since (the publisher
            // went another way: adopted by another relay, and back); then
            // its retry never comes.
            let ordered = |first: PubSeq| {
                self.publishers
                    .get(publisher)
                    .is_some_and(|p| p.delivered >= first)
            };
            match s.refused.get(&publisher) {
                Some(&first) if pub_seq > first && !ordered(first) => return,
                Some(_) => {
                    s.refused.remove(&publisher);
                }
                None => {}
            }
        }
        let state = self.publishers.get(publisher).copied();
        if self.grouped {
            return self.submit(session, publisher, forwarded, state, topic, publish);
        }
        let ack = match self.publishers.next(publisher, pub_seq) {
            Next::Retry(p) if !self.bugs.order_retries => {
                // A retry of something already ordered: acknowledge, do not
                // order again (guarantee 2).
                self.stats.duplicates += 1;
                let ack = PubAck {
                    pub_seq: p.delivered,
                    seq: p.seq,
                    publisher: None,
                };
                if Self::is_call(&topic) {
                    self.no_service(CallId { publisher, pub_seq });
                }
                if forwarded {
                    return self.ack_forwarded(session, publisher, ack);
                }
                ack
            }
            Next::Skips(known) => {
                let msg = format!(
                    "publisher {publisher} sent pub_seq {} after {}: publisher sequence numbers must not skip",
                    pub_seq.0, known.0
                );
                if forwarded {
                    // Only that publisher is refused; the relay stays.
                    return self.refuse_forwarded(
                        session,
                        publisher,
                        Some(pub_seq),
                        ErrorCode::PubSeqGap,
                        msg,
                    );
                }
                return self.close_with_error(session, ErrorCode::PubSeqGap, msg);
            }
            _ => {
                self.head = self.head.next();
                self.stats.published += 1;
                self.stats.bytes_in += payload.len() as u64;
                self.remember_publisher(publisher, pub_seq, self.head);
                let call = Self::is_call(&topic);
                self.push_ordered(Ordered {
                    seq: self.head,
                    topic,
                    publisher,
                    pub_seq,
                    payload,
                    hash: 0,
                });
                if call {
                    self.no_service(CallId { publisher, pub_seq });
                }
                PubAck {
                    pub_seq,
                    seq: self.head,
                    publisher: None,
                }
            }
        };
        // A relay learns that its forwards are ordered from the stream.
        if !forwarded {
            self.owe_ack(session, ack);
        }
    }

    /// Whom a frame of `session` (a publish, an `Ask`) is for: the
    /// session's own publisher, or the one a relay `named`; and whether it
    /// is forwarded. `None` when the session has no Hello yet, or names
    /// another publisher without being a relay (then it is closed).
    pub(super) fn acting_for(
        &mut self,
        session: SessionId,
        named: Option<PublisherId>,
        what: &str,
    ) -> Option<(PublisherId, bool)> {
        let hello = self.sessions.get(&session)?.hello.as_ref()?;
        let own = hello.publisher;
        match named {
            None => Some((own, false)),
            Some(p) if hello.role == Role::Relay => Some((p, p != own)),
            Some(p) => {
                let msg = format!(
                    "a {what} for publisher {p}: only a relay may act for another publisher"
                );
                self.close_with_error(session, ErrorCode::ForwardNotAllowed, msg);
                None
            }
        }
    }

    /// In a group: hands a publish to the group unless it is a retry.
    pub(super) fn submit(
        &mut self,
        session: SessionId,
        publisher: PublisherId,
        forwarded: bool,
        state: Option<PubState>,
        topic: Arc<str>,
        publish: Publish,
    ) {
        let ordered = state.map_or(PubSeq(0), |p| p.delivered);
        let vouched = self.publishers.vouched(publisher).unwrap_or_default();
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let pub_seq = publish.pub_seq;
        if !forwarded {
            // After its first publish on a connection, a client's new
            // pub_seqs follow what it sent and what is known here: a skip
            // now is the client's, not a lag elsewhere.
            let previous = s.last_pub_seq.map(|p| p.max(pub_seq));
            let sent = std::mem::replace(&mut s.last_pub_seq, previous.or(Some(pub_seq)));
            let known = ordered.max(s.submitted);
            if let Some(sent) = sent.filter(|p| pub_seq.0 > (*p).max(known).0.saturating_add(1)) {
                let msg = format!(
                    "pub_seq {} after {}: publisher sequence numbers must not skip",
                    pub_seq.0,
                    sent.max(known).0
                );
                return self.close_with_error(session, ErrorCode::PubSeqGap, msg);
            }
        }
        let call = Self::is_call(&topic);
        if pub_seq <= ordered && !self.bugs.order_retries {
            // Ordered and delivered already: acknowledge again (guarantee 2);
            // a call's reply is asked of the layer below.
            if call {
                let msg = Msg(publisher, pub_seq, topic, publish.payload.clone());
                self.call_arrived(session, forwarded, &msg, true);
            }
            self.stats.duplicates += 1;
            let seq = state.map_or(Seq(0), |p| p.seq);
            let ack = PubAck {
                pub_seq: ordered,
                seq,
                publisher: None,
            };
            if forwarded {
                return self.ack_forwarded(session, publisher, ack);
            }
            return self.owe_ack(session, ack);
        }
        if forwarded && s.forwarded.len() >= self.config.publishers_max {
            // Forgetting what is in flight only costs resubmissions, which
            // the sequencer deduplicates.
            s.forwarded.clear();
        }
        let submitted = match forwarded {
            true => s.forwarded.entry(publisher).or_default(),
            false => &mut s.submitted,
        };
        let known = ordered.max(*submitted);
        let after = match pub_seq <= known {
            // A relay's retry goes up again: this node may never see the
            // first one come back (it was ordered before this node's
            // stream began, say), and the tier above answers a duplicate
            // with an acknowledgement for the relay.
            true if forwarded => PubSeq(pub_seq.0 - 1),
            true => {
                // In flight in the group: acknowledged when it comes back,
                // and a call replied when it is applied.
                self.stats.duplicates += 1;
                if call {
                    let msg = Msg(publisher, pub_seq, topic, publish.payload);
                    self.call_arrived(session, forwarded, &msg, false);
                }
                return;
            }
            // Whether `pub_seq` skips is judged by the caller against what
            // the group holds: this node may not have delivered yet what
            // another server acknowledged (see `Submission::after`). An
            // entry made after the table forgot publishers vouches for
            // nothing.
            false => vouched.max(*submitted),
        };
        *submitted = pub_seq.max(*submitted);
        self.stats.bytes_in += publish.payload.len() as u64;
        let sub = Submission {
            session,
            after,
            forwarded,
            retry: pub_seq <= known,
            msg: Msg(publisher, pub_seq, topic, publish.payload),
        };
        if call && !self.call_arrived(session, forwarded, &sub.msg, false) {
            let msg = "too many calls waiting for replies here; retry".to_owned();
            return self.reject(self.now, &sub, ErrorCode::Overloaded, msg);
        }
        self.submissions.push(sub);
    }

    /// Tells relay `session` at once that `publisher`'s retry was ordered
    /// before: it will not see the retry in the stream.
    pub(super) fn ack_forwarded(
        &mut self,
        session: SessionId,
        publisher: PublisherId,
        ack: PubAck,
    ) {
        if let Some(s) = self.sessions.get_mut(&session) {
            if s.acked_forwards.len() >= self.config.publishers_max {
                s.acked_forwards.clear();
            }
            let told = s.acked_forwards.entry(publisher).or_default();
            *told = (*told).max(ack.pub_seq);
        }
        let ack = PubAck {
            publisher: Some(publisher),
            ..ack
        };
        self.control(session, kind::PUB_ACK, &ack);
    }

    /// In a relay: the tier above acknowledged `publisher`'s publishes up
    /// to `ack.pub_seq` (retries it had ordered before). The publisher's
    /// session here is told; if the publisher is further down, the relays
    /// that forwarded for it are told in turn.
    pub fn ack_publisher(&mut self, now: Duration, publisher: PublisherId, ack: PubAck) {
        self.now = now;
        if let Some(&session) = self.publisher_sessions.get(&publisher) {
            self.owe_ack(
                session,
                PubAck {
                    publisher: None,
                    ..ack
                },
            );
            self.fan_out();
            return;
        }
        for session in self.forwarders_of(publisher) {
            self.ack_forwarded(session, publisher, ack);
        }
    }

    /// The relay sessions that forwarded publishes of `publisher`, in
    /// session order.
    pub(super) fn forwarders_of(&self, publisher: PublisherId) -> Vec<SessionId> {
        let mut v: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.forwarded.contains_key(&publisher))
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable();
        v
    }

    /// In a group: the publishes accepted since the last call, in order,
    /// for the group to order.
    pub fn take_submissions(&mut self) -> Vec<Submission> {
        std::mem::take(&mut self.submissions)
    }

    /// Gives back taken submissions that must wait (no room below yet):
    /// they are taken again first, in their order.
    pub fn defer_submissions(&mut self, mut waiting: Vec<Submission>) {
        waiting.append(&mut self.submissions);
        self.submissions = waiting;
    }

    /// In a core server: refuses `sub`, the first publish of a connection,
    /// whose pub_seq skips past `known`, the last of its publisher's that
    /// this server's group knows of. Every server of the current primary
    /// view knows at least what any server acknowledged to the publisher
    /// (the flush carries it over), so this server is behind the primary
    /// component (excluded from it without knowing yet): the client is told
    /// `not_primary` and moves on, and the server finds out itself within a
    /// failure timeout. (A client that really skips is refused wherever it
    /// goes; within one connection a skip is refused as `pub_seq_gap`.)
    pub fn reject_behind(&mut self, now: Duration, sub: &Submission, known: PubSeq) {
        let msg = format!(
            "this server knows publisher {} only through pub_seq {}, before {}: it is behind the primary component; reconnect elsewhere",
            sub.msg.0, known.0, sub.msg.1 .0
        );
        self.reject(now, sub, ErrorCode::NotPrimary, msg);
    }

    /// Refuses `sub` because the group cannot take more publishes now; its
    /// client retries what was not acknowledged.
    pub fn reject_overloaded(&mut self, now: Duration, sub: &Submission) {
        let msg = "too many publishes waiting to be ordered; retry".to_owned();
        self.reject(now, sub, ErrorCode::Overloaded, msg);
    }

    /// Refuses a submission: a publisher's own session is closed with the
    /// error. A relay's session stays open: the relay is told which
    /// publisher the error concerns, and that publisher's later publishes
    /// are judged afresh.
    pub(super) fn reject(
        &mut self,
        now: Duration,
        sub: &Submission,
        code: ErrorCode,
        message: String,
    ) {
        self.now = now;
        let publisher = sub.msg.0;
        if !sub.forwarded {
            return self.close_with_error(sub.session, code, message);
        }
        // A refused retry leaves no hole: the first one is ordered or on
        // its way, and what follows waits for nothing. (Waiting for the
        // retry's retry waited for good when the relay below had been
        // acknowledged past it by its own stream, and this node's table had
        // forgotten the publisher.)
        let hole = (!sub.retry).then_some(sub.msg.1);
        self.refuse_forwarded(sub.session, publisher, hole, code, message);
    }

    /// Tells relay `session` that a publish of `publisher` is refused; the
    /// relay's session stays open. A refused publish that leaves a `hole`
    /// (a new pub_seq) holds back what follows it on the way.
    pub(super) fn refuse_forwarded(
        &mut self,
        session: SessionId,
        publisher: PublisherId,
        hole: Option<PubSeq>,
        code: ErrorCode,
        message: String,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.forwarded.remove(&publisher);
        // Nor does a publish the relay was told is ordered: its publisher
        // resends from past it.
        let told = s.acked_forwards.get(&publisher).copied();
        if let Some(pub_seq) = hole.filter(|&p| told.is_none_or(|t| t < p)) {
            let first = s.refused.entry(publisher).or_insert(pub_seq);
            *first = (*first).min(pub_seq);
        }
        let frame = ErrorFrame {
            code,
            message,
            publisher: Some(publisher),
            pattern: None,
        };
        self.control(session, kind::ERROR, &frame);
    }

    /// In a relay: the tier above refused `publisher`'s forwarded publishes
    /// with `code`; the publisher's session here is closed with it (its
    /// client retries what was not acknowledged), or the relays below that
    /// forwarded for it are told.
    pub fn reject_publisher(
        &mut self,
        now: Duration,
        publisher: PublisherId,
        code: ErrorCode,
        message: String,
    ) {
        self.now = now;
        if let Some(&session) = self.publisher_sessions.get(&publisher) {
            // Its client did not skip: a relay forwards in order, and judged
            // this session's own sequence (`published`). The tier above
            // refused it because of where its earlier publishes went (an
            // earlier connection's, still on the way): it retries.
            let message = format!("refused by the tier above ({code:?}: {message}); retry");
            return self.close_with_error(session, ErrorCode::Overloaded, message);
        }
        // Further down: each relay that forwarded for it is told, and
        // forgets what it had in flight for it, so that retries pass.
        for session in self.forwarders_of(publisher) {
            if let Some(s) = self.sessions.get_mut(&session) {
                s.forwarded.remove(&publisher);
            }
            let frame = ErrorFrame {
                code,
                message: message.clone(),
                publisher: Some(publisher),
                pattern: None,
            };
            self.control(session, kind::ERROR, &frame);
        }
    }

    /// Notes that `session` is owed `ack`; it goes out after the current
    /// batch is fanned out. Acknowledgements are cumulative, so the highest
    /// owed is kept: an old retry ordered again after newer publishes (the
    /// table forgot its publisher) acknowledges no less than they did.
    pub(super) fn owe_ack(&mut self, session: SessionId, ack: PubAck) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        match &mut s.ack_due {
            Some(due) if due.pub_seq > ack.pub_seq => {}
            Some(due) => *due = ack,
            None => {
                s.ack_due = Some(ack);
                self.acks_due.push(session);
            }
        }
    }

    /// Notes that `publisher`'s `pub_seq` was delivered at `seq`. At the
    /// table's bound the publishers quiet longest are forgotten; one that
    /// comes back with retries of old pub_seqs gets them ordered again: the
    /// price of the bound.
    pub(super) fn remember_publisher(&mut self, publisher: PublisherId, pub_seq: PubSeq, seq: Seq) {
        let e = self.publishers.entry(publisher, seq);
        // An old retry ordered again does not take the entry back.
        e.held = e.held.max(pub_seq);
        e.delivered = e.delivered.max(pub_seq);
        e.seq = seq;
    }

    /// Test builds: the publishers the table forgot since the last call,
    /// with the last pub_seq each had then (their old retries may be
    /// ordered again: the simulator's checker excuses those).
    #[cfg(test)]
    pub(crate) fn take_forgotten(&mut self) -> HashMap<PublisherId, PubSeq> {
        self.publishers.take_forgotten()
    }
}
