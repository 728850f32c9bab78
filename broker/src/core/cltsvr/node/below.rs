//! The stream from the group below: ordered batches, primary or not,
//! snapshots, and the membership events this node publishes (attach,
//! detach, the core list).

use super::*;

impl Node {
    /// In a group: messages the group delivered (stable, contiguous after
    /// the head). They are retained, fanned out, and acknowledge their
    /// publishers' sessions here.
    ///
    /// # Panics
    /// If the seqs do not continue the head: the group broke its contract.
    pub fn handle_ordered(&mut self, now: Duration, batch: Vec<Ordered>) {
        self.now = now;
        // The publisher table and the acknowledgements once per run of one
        // publisher, after its messages.
        let mut run: Option<PublisherRun> = None;
        for mut m in batch {
            assert_eq!(
                m.seq,
                self.head.next(),
                "invariant: the group delivers contiguous seqs"
            );
            self.head = m.seq;
            // Membership events are the broker's bookkeeping, not publishes.
            if &*m.topic != MEMBERS_TOPIC {
                self.stats.published += 1;
            }
            match &mut run {
                Some(r) if r.publisher == m.publisher => r.extend(&m),
                _ => {
                    if let Some(done) = run.replace(PublisherRun::of(&m)) {
                        self.publisher_run(done);
                    }
                }
            }
            // What was held comes back stable: the held copy is already
            // chained and interned (docs/DESIGN.md, "Hot path").
            match self.take_held(&m) {
                Some(held) => self.push_stable(held),
                None => {
                    m.topic = self.intern(&m.topic);
                    self.push_ordered(m);
                }
            }
        }
        if let Some(done) = run {
            self.publisher_run(done);
        }
        self.fan_out();
    }

    /// A run of one publisher's delivered messages: the table keeps the
    /// highest pub_seq and the last seq, as one message at a time would
    /// leave it, and its session is owed the acknowledgement of the highest
    /// pub_seq (an old retry ordered again after it acknowledges less).
    fn publisher_run(&mut self, run: PublisherRun) {
        self.remember_publisher(run.publisher, run.top.pub_seq, run.last);
        if let Some(&session) = self.publisher_sessions.get(&run.publisher) {
            self.owe_ack(session, run.top);
        }
    }

    /// Takes one ordered message for fan-out and retention. A membership
    /// event is applied here, at its position: what precedes it goes out
    /// first, then the reports of its change (docs/DESIGN.md guarantee 4 at the
    /// clients: one change, one position, everywhere).
    pub(super) fn push_ordered(&mut self, mut m: Ordered) {
        m.hash = protocol::chain(self.hash, m.seq, m.publisher, m.pub_seq);
        self.stabilize(&m);
        self.push_stable(m);
    }

    /// Takes one stable message, chained, for fan-out and retention (see
    /// `push_ordered`).
    fn push_stable(&mut self, m: Ordered) {
        self.hash = m.hash;
        if &*m.topic != MEMBERS_TOPIC {
            self.pending.push(m);
            if self.pending.len() >= self.config.batch_len_max {
                self.fan_out();
            }
            return;
        }
        let (seq, event) = (m.seq, MemberEvent::decode(&m.payload));
        self.pending.push(m);
        let Some(event) = event else {
            tracing::warn!(seq = seq.0, "an undecodable membership event skipped");
            return;
        };
        let Some(change) = self.members.apply(seq, event) else {
            return;
        };
        let again = self.live_entries(&change.left);
        self.report_members(seq, change);
        // After the change's reports: a node that orders alone orders
        // these at once.
        for entry in again {
            self.publish_member_event(MemberEvent::Attach(entry));
        }
    }

    /// The entries of this node's live sessions among `left`, which a
    /// membership event just removed: each is announced again. A relay's
    /// detach that its old tier above held and resent can be ordered after
    /// the attach of the relay's newer connection, and take with it the
    /// clients the relay announced again on that connection (the tree
    /// simulator, seed 17146). A program restarted with the same publisher
    /// id that does not begin an incarnation (the SDK's does) counts its
    /// connections from 1 again, so its attach is ignored while its old
    /// connection is listed, and the old one's detach removes it.
    fn live_entries(&self, left: &[PublisherId]) -> Vec<MemberEntry> {
        left.iter()
            .filter_map(|id| {
                let s = self.sessions.get(self.publisher_sessions.get(id)?)?;
                let entry = &s.hello.as_ref()?.entry;
                (!s.closing).then(|| entry.clone())
            })
            .collect()
    }

    /// Tells the sessions that take reports of `change` at `seq`.
    fn report_members(&mut self, seq: Seq, change: MembersHead) {
        let servers_told = change.core.is_some() && !self.reporting_servers.is_empty();
        if self.reporting_full.is_empty() && !servers_told {
            // Nobody is told: the batch goes on (a flush here would split
            // every subscriber's frames at every attach).
            return;
        }
        self.fan_out();
        if !self.reporting_full.is_empty() {
            let frame = protocol::encode(kind::MEMBERS, &change, &[]);
            broadcast(&mut self.outputs, &self.reporting_full, &frame, seq);
        }
        let servers: Vec<String> = change
            .core
            .iter()
            .flatten()
            .map(|s| s.addr.clone())
            .collect();
        // Only with every address known (a server bound to port 0 has none).
        if self.core_tier && protocol::usable_servers(&servers) {
            let frame = protocol::encode(kind::SERVERS, &ServersHead { seq, servers }, &[]);
            broadcast(&mut self.outputs, &self.reporting_servers, &frame, seq);
        }
    }

    /// In a group: whether this server is in the primary view. When it is
    /// not, every client is told `not_primary` and closed, so it moves to a
    /// server that orders (docs/DESIGN.md guarantee 7), and new ones are refused.
    pub fn set_primary(&mut self, now: Duration, primary: bool) {
        self.now = now;
        if self.primary == primary {
            return;
        }
        self.primary = primary;
        if primary {
            self.journal
                .record(now, EventKind::View, "in the primary view".into());
            return;
        }
        self.journal.record(
            now,
            EventKind::View,
            "not in the primary view: clients told to move".into(),
        );
        let mut ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        // In session order, so that one input always gives the same outputs.
        ids.sort_unstable();
        for session in ids {
            let msg = "this server lost the primary component of the core; reconnect elsewhere";
            self.close_with_error(session, ErrorCode::NotPrimary, msg.to_owned());
        }
    }

    /// In a group: the ordered stream this node's seqs belong to.
    pub fn set_stream(&mut self, stream: u64) {
        self.config.stream = stream;
    }

    /// In a group: replaces everything delivered with `state` (a joining or
    /// lagging server catching up from a peer).
    pub fn install_snapshot(&mut self, now: Duration, state: Snapshot) {
        self.now = now;
        self.fan_out();
        if state.stream != self.config.stream {
            // Nothing of this node's publishes is known in another stream:
            // its own pub_seqs begin again (first contact there), and
            // submissions made against the old stream's tables are dropped
            // (their sessions are closed; clients send them again).
            self.own_pub_seq = PubSeq(0);
            self.submissions.clear();
        }
        self.config.stream = state.stream;
        self.head = state.head;
        self.watermark_sent = Seq(0);
        self.publishers.reset(state.evicted);
        for (id, pub_seq, seq) in state.publishers {
            self.remember_publisher(id, pub_seq, seq);
        }
        // Nothing held survives: the sessions were closed.
        self.unstable.clear();
        self.weak_pending.clear();
        let before = Seq(state.head.0.saturating_sub(state.msgs.len() as u64));
        self.retention = Retention::starting_after(
            self.config.retention_count_max,
            self.config.retention_bytes_max,
            before,
            state.hash,
        );
        if let Some(report) = state.members {
            self.members.install(report);
        }
        self.hash = if self.bugs.forget_snapshot_hash {
            0
        } else {
            state.hash
        };
        for (i, m) in state.msgs.into_iter().enumerate() {
            let mut m = m.ordered(Seq(before.0 + 1 + i as u64));
            m.hash = protocol::chain(self.hash, m.seq, m.publisher, m.pub_seq);
            self.hash = m.hash;
            m.topic = self.intern(&m.topic);
            self.retention.push(m);
        }
        self.journal.record(
            now,
            EventKind::View,
            format!("caught up from a peer at seq {}", state.head),
        );
    }

    /// In a group: the delivered state for a joining or lagging server,
    /// with the most recent retained messages, at most `msgs_max` of them
    /// and `bytes_max` bytes (as retention counts them).
    pub fn snapshot(&mut self, msgs_max: usize, bytes_max: usize) -> Snapshot {
        self.fan_out();
        let all: Vec<&Ordered> = self.retention.after(Seq(0)).collect();
        let (mut keep, mut bytes) = (0, 0);
        for m in all.iter().rev() {
            if keep >= msgs_max || bytes + m.cost() > bytes_max {
                break;
            }
            bytes += m.cost();
            keep += 1;
        }
        let msgs: Vec<Msg> = all[all.len() - keep..].iter().map(|m| Msg::of(m)).collect();
        let first = Seq(self.head.0 + 1 - msgs.len() as u64);
        let hash = self
            .hash_at(Seq(first.0 - 1))
            .expect("invariant: the hash before the oldest retained message is kept");
        Snapshot {
            hash,
            stream: self.config.stream,
            head: self.head,
            // Sorted, so the same state always encodes the same.
            publishers: self.publishers.rows(),
            evicted: self.publishers.evicted_any(),
            first,
            msgs,
            members: Some(self.members.report(self.head)),
            // (The group adds its replicated service's state.)
            service: None,
        }
    }

    /// In a relay: the tier above's complete membership report, at this
    /// node's head (its stream reached the report's position).
    pub fn install_members(&mut self, report: MembersHead) {
        self.members.install(report);
    }

    /// Publishes one of this node's membership events: ordered at once
    /// when the node orders alone, handed to the group below otherwise
    /// (a relay's go to the tier above).
    pub(super) fn publish_member_event(&mut self, event: MemberEvent) {
        if self.config.members_max == 0 {
            return;
        }
        let pub_seq = PubSeq(self.own_pub_seq.0 + 1);
        let after = std::mem::replace(&mut self.own_pub_seq, pub_seq);
        let (id, payload) = (self.config.id, event.encode());
        let topic = self.intern(MEMBERS_TOPIC);
        if self.grouped {
            self.submissions.push(Submission {
                session: SessionId::NODE,
                after,
                forwarded: false,
                msg: Msg(id, pub_seq, topic, payload),
            });
            return;
        }
        self.head = self.head.next();
        self.remember_publisher(id, pub_seq, self.head);
        self.push_ordered(Ordered {
            seq: self.head,
            topic,
            publisher: id,
            pub_seq,
            payload,
            hash: 0,
        });
    }

    /// In a relay with a new connection to the tier above: announces every
    /// live client again (see [`UpEvent::Reattach`](super::upstream::UpEvent)).
    pub fn reattach(&mut self) {
        let mut live: Vec<(SessionId, MemberEntry)> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.closing)
            .filter_map(|(id, s)| Some((*id, s.hello.as_ref()?.entry.clone())))
            .collect();
        live.sort_unstable_by_key(|(id, _)| *id);
        for (_, entry) in live {
            self.publish_member_event(MemberEvent::Attach(entry));
        }
        self.ask_again();
    }

    /// A core server coordinating a new view: tells the tree the view's
    /// servers, in the stream (see [`MemberEvent::Core`]).
    pub fn publish_core(&mut self, epoch: u64, servers: Vec<ServerEntry>) {
        if servers != self.members.core() {
            self.publish_member_event(MemberEvent::Core { epoch, servers });
        }
    }

    /// A session ended: its client detaches (an ordered event).
    pub(super) fn session_gone(&mut self, session: SessionId, s: Session) {
        if s.weak {
            self.weak_live -= 1;
            self.stable_marks.remove(&session);
        }
        self.reporting_full.remove(&session);
        self.reporting_servers.remove(&session);
        self.calls_gone(session);
        for &publisher in &s.held_back {
            self.release_if_due(publisher);
        }
        let Some(h) = &s.hello else {
            return;
        };
        if self.publisher_sessions.get(&h.publisher) == Some(&session) {
            self.publisher_sessions.remove(&h.publisher);
        }
        self.publish_member_event(MemberEvent::Detach {
            client: h.publisher,
            server: self.config.id,
            session: session.0,
        });
    }
}

/// Consecutive delivered messages of one publisher.
struct PublisherRun {
    publisher: PublisherId,
    /// The acknowledgement of the highest pub_seq among them (an old
    /// retry ordered again may follow a later one).
    top: PubAck,
    /// The seq of the last one.
    last: Seq,
}

impl PublisherRun {
    fn of(m: &Ordered) -> Self {
        PublisherRun {
            publisher: m.publisher,
            top: Self::ack(m),
            last: m.seq,
        }
    }

    fn extend(&mut self, m: &Ordered) {
        if m.pub_seq >= self.top.pub_seq {
            self.top = Self::ack(m);
        }
        self.last = m.seq;
    }

    fn ack(m: &Ordered) -> PubAck {
        PubAck {
            pub_seq: m.pub_seq,
            seq: m.seq,
            publisher: None,
        }
    }
}
