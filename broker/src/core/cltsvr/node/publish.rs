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
        if forwarded
            && self
                .sessions
                .get(&session)
                .is_none_or(|s| s.held_back.contains(&publisher))
        {
            // Refused here, not released yet: it may overtake the refused
            // publish, and its publisher sends it again (docs/DESIGN.md,
            // "Relays").
            return;
        }
        if self.releases_owed.contains(&publisher) {
            // The tier above drops this publisher's forwards until this
            // relay's `Released`, which waits for the relays below: what
            // comes meanwhile, from a new session or a relay not told, is
            // refused here, so that it is sent again after.
            let msg = "publisher refused by the tier above; retry".to_owned();
            if forwarded {
                return self.refuse_forwarded(session, publisher, ErrorCode::Overloaded, msg);
            }
            return self.close_with_error(session, ErrorCode::Overloaded, msg);
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
                    return self.refuse_forwarded(session, publisher, ErrorCode::PubSeqGap, msg);
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
            // the sequencer deduplicates; a refusal from above is then
            // passed to this relay whatever it forwarded.
            s.forwarded.clear();
            s.forwarded_forgot = true;
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
    /// publisher the error concerns, and its forwards for that publisher
    /// are dropped until it answers with `Released`.
    pub(super) fn reject(
        &mut self,
        now: Duration,
        sub: &Submission,
        code: ErrorCode,
        message: String,
    ) {
        self.now = now;
        if !sub.forwarded {
            return self.close_with_error(sub.session, code, message);
        }
        self.refuse_forwarded(sub.session, sub.msg.0, code, message);
    }

    /// Tells relay `session` that a publish of `publisher` is refused; the
    /// relay's session stays open, and its forwards for `publisher` are
    /// dropped until its `Released` (docs/DESIGN.md, "Relays"). A relay
    /// already held back for it is not told again: what was refused came
    /// before that `Released`, so its publisher sends it again.
    pub(super) fn refuse_forwarded(
        &mut self,
        session: SessionId,
        publisher: PublisherId,
        code: ErrorCode,
        message: String,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.forwarded.remove(&publisher);
        if s.held_back.contains(&publisher) {
            return;
        }
        if s.held_back.len() >= self.config.publishers_max {
            let msg = format!(
                "{} refusals not answered with Released: a relay answers each",
                s.held_back.len()
            );
            return self.close_with_error(session, ErrorCode::Overloaded, msg);
        }
        s.held_back.insert(publisher);
        let frame = ErrorFrame {
            code,
            message,
            publisher: Some(publisher),
            pattern: None,
        };
        self.control(session, kind::ERROR, &frame);
    }

    /// In a relay: the tier above refused `publisher`'s forwarded publishes
    /// with `code`, and drops the rest of them until this relay answers
    /// with `Released`. The publisher's session here is closed (its client
    /// sends again what was not acknowledged), its publishes not yet taken
    /// up are dropped, and each relay below that may have forwarded for it
    /// is refused in turn; `Released` goes up once they have all answered
    /// (docs/DESIGN.md, "Relays").
    pub fn reject_publisher(
        &mut self,
        now: Duration,
        publisher: PublisherId,
        code: ErrorCode,
        message: String,
    ) {
        self.now = now;
        self.submissions
            .retain(|s| s.msg.0 != publisher || s.session == SessionId::NODE);
        // Its own sessions here (an old one not yet found dead included; a
        // relay below's, for the relay's own membership events: it sends
        // them again on its next connection) and the relays below that may
        // have forwarded for it.
        let (mut own, mut below) = (Vec::new(), Vec::new());
        for (&id, s) in &self.sessions {
            match s.hello.as_ref() {
                Some(h) if h.publisher == publisher => own.push(id),
                Some(h)
                    if h.role == Role::Relay
                        && (s.forwarded_forgot || s.forwarded.contains_key(&publisher)) =>
                {
                    below.push(id)
                }
                _ => {}
            }
        }
        own.sort_unstable();
        below.sort_unstable();
        for session in own {
            // Its client did not skip: a relay forwards in order, and judged
            // this session's own sequence (`published`). The tier above
            // refused it because of where its earlier publishes went (an
            // earlier connection's, still on the way): it retries.
            let message = format!("refused by the tier above ({code:?}: {message}); retry");
            self.close_with_error(session, ErrorCode::Overloaded, message);
        }
        for session in below {
            self.refuse_forwarded(session, publisher, code, message.clone());
        }
        self.releases_owed.insert(publisher);
        self.release_if_due(publisher);
    }

    /// A relay below answered a refusal of `publisher`'s forwards.
    pub(super) fn on_released(&mut self, session: SessionId, publisher: PublisherId) {
        let Some((publisher, _)) = self.acting_for(session, Some(publisher), "Released") else {
            return;
        };
        if let Some(s) = self.sessions.get_mut(&session) {
            s.held_back.remove(&publisher);
        }
        self.release_if_due(publisher);
    }

    /// In a relay: `Released` goes up for `publisher` if one is owed and no
    /// relay below is still held back for it.
    pub(super) fn release_if_due(&mut self, publisher: PublisherId) {
        if self.releases_owed.contains(&publisher)
            && !self
                .sessions
                .values()
                .any(|s| s.held_back.contains(&publisher))
        {
            self.releases_owed.remove(&publisher);
            self.releases.push(publisher);
        }
    }

    /// In a relay: the `Released` frames due to the tier above. They go up
    /// before the submissions taken with them (none of their publishers'
    /// is among those).
    pub fn take_releases(&mut self) -> Vec<PublisherId> {
        std::mem::take(&mut self.releases)
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
