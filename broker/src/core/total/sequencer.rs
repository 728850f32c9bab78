//! The sequencer and own submissions: numbered `Submit`s, ordering with
//! deduplication by the publisher table and its bound, `Retried`, and
//! resubmission after a view change, a broken link or no progress.

use super::*;
use crate::core::mbrship::ViewId;

impl Total {
    /// Publishes from this server's clients, to be ordered.
    ///
    /// They are kept until delivered and sent again after a view change or
    /// a broken link, so a publish is lost only if this server fails (and
    /// then its publisher, unacknowledged, retries elsewhere). Call only when
    /// `Group::unordered_room` allows them; beyond the bound the server must
    /// push back on its publishers.
    pub(crate) fn submit(&mut self, mbr: &Membership, msgs: Vec<Submitted>) {
        let start = self.unordered.len();
        let first = self.submit_next;
        self.submit_next += msgs.len() as u64;
        self.unordered.extend(msgs);
        if mbr.is_primary() {
            // (Otherwise sent when a view is installed.)
            let fresh: Vec<Submitted> = self.unordered.range(start..).cloned().collect();
            self.forward(mbr, first, fresh);
        }
    }

    /// The number of the oldest own submission not yet delivered.
    fn submit_front(&self) -> u64 {
        self.submit_next - self.unordered.len() as u64
    }

    /// Sends submissions numbered from `first` to the coordinator, or
    /// orders them if it is us.
    fn forward(&mut self, mbr: &Membership, mut first: u64, msgs: Vec<Submitted>) {
        let Some(view) = mbr.view_id() else {
            return;
        };
        let front = self.submit_front();
        if view.coordinator == mbr.config().me {
            // Our own, under the same rule as a member's: after some met
            // the log's bound, later ones wait for the resubmission.
            let me = mbr.config().me;
            return self.take_submissions(mbr, me, front, first, msgs);
        }
        for chunk in frames(&msgs, |s: &Submitted| msg_cost(&s.1)) {
            let msg = PeerMsg::Submit {
                view,
                front,
                first,
                msgs: chunk.to_vec(),
            };
            first += chunk.len() as u64;
            self.send(view.coordinator, &msg);
        }
    }

    /// Sends every undelivered own submission again, to the current
    /// coordinator; the sequencer drops what it already ordered.
    pub(crate) fn resubmit(&mut self, mbr: &Membership) {
        let msgs: Vec<Submitted> = self.unordered.iter().cloned().collect();
        if msgs.is_empty() {
            return;
        }
        self.stats.resubmitted += msgs.len() as u64;
        self.forward(mbr, self.submit_front(), msgs);
    }

    /// The stream changed under own submissions (a new stream began, or a
    /// snapshot of another stream was taken): they were made against the
    /// old stream's publisher tables and are dropped. Their publishers are
    /// told the stream reset and send what is unacknowledged again, as
    /// first contacts; the node starts its own pub_seqs again.
    pub(super) fn drop_old_stream_submissions(&mut self) {
        self.unordered.clear();
    }

    /// Called every heartbeat: when the oldest own submission has waited a
    /// whole failure timeout without being delivered, everything not yet
    /// delivered is sent again (a frame may have been lost with a link, or
    /// dropped by a sequencer at its bound, while other traffic flows).
    pub(super) fn check_progress(&mut self, mbr: &Membership, now: Duration) {
        let front = self.unordered.front().map(|Submitted(_, m)| (m.0, m.1));
        let (since, seen) = self.resubmit_check;
        if front.is_none() || front != seen {
            self.resubmit_check = (now, front);
            return;
        }
        if mbr.is_primary() && now.saturating_sub(since) >= mbr.config().failure_timeout {
            self.resubmit_check = (now, front);
            self.resubmit(mbr);
        }
    }

    pub(crate) fn on_submit(
        &mut self,
        mbr: &Membership,
        from: NodeId,
        view: ViewId,
        front: u64,
        first: u64,
        msgs: Vec<Submitted>,
    ) {
        if !mbr.is_coordinator() || mbr.view_id() != Some(view) {
            // A stale submission: its sender resubmits after the view change.
            tracing::trace!(node = %from, view = %view, "submission outside its view dropped");
            return;
        }
        self.take_submissions(mbr, from, front, first, msgs);
    }

    /// Sequencer: orders `msgs`, numbered from `first`, from member `from`
    /// whose oldest undelivered submission is `front`.
    ///
    /// Everything before `front` is ordered; everything from there up to
    /// what was taken came here. Past that, a `Submit` was lost with a link
    /// (or met the log's bound): ordering this one would let a publish
    /// overtake a lost predecessor, which a publisher table that forgot its
    /// publisher could not tell. The sender resubmits from its front.
    fn take_submissions(
        &mut self,
        mbr: &Membership,
        from: NodeId,
        front: u64,
        first: u64,
        msgs: Vec<Submitted>,
    ) {
        let seen = self.submit_seen.get(&from).copied().unwrap_or(0).max(front);
        if first > seen && !self.bugs.order_past_lost_submit {
            tracing::debug!(node = %from, first, seen, "submissions after a lost one dropped");
            return;
        }
        let (taken, retried) = self.order(mbr, msgs);
        self.submit_seen
            .insert(from, seen.max(first.saturating_add(taken as u64)));
        if from == mbr.config().me {
            return;
        }
        // The member may have forgotten these publishers: it would wait for
        // the retries' delivery for good.
        let Some(view) = mbr.view_id() else {
            return;
        };
        for publisher in retried {
            if let Some(p) = self.publishers.get(publisher) {
                let msg = PeerMsg::Retried {
                    view,
                    publisher,
                    pub_seq: p.held,
                    seq: p.seq,
                };
                self.send(from, &msg);
            }
        }
    }

    /// Member: the sequencer dropped a submission of `publisher` made here
    /// as a retry, and holds it through `pub_seq` at `seq`. If this server
    /// delivered `seq` in the same view and its table knows less of the
    /// publisher, the table learns it, the own submissions it covers are
    /// done, and the publisher is acknowledged. (A `seq` not yet delivered
    /// here is learned from its delivery.)
    pub(crate) fn on_retried(
        &mut self,
        mbr: &Membership,
        view: ViewId,
        publisher: PublisherId,
        pub_seq: PubSeq,
        seq: Seq,
    ) {
        if mbr.view_id() != Some(view) || seq > self.delivered {
            return;
        }
        if self
            .publishers
            .get(publisher)
            .is_some_and(|p| p.delivered >= pub_seq)
        {
            return;
        }
        let e = self.publishers.entry(publisher, seq);
        e.held = e.held.max(pub_seq);
        e.delivered = pub_seq;
        e.seq = e.seq.max(seq);
        self.forget_delivered_submissions();
        self.events.push_back(Event::Retried {
            publisher,
            pub_seq,
            seq,
        });
    }

    /// Sequencer: assigns seqs to `msgs` and sends the order to members.
    /// Returns how many of `msgs` it took (ordered, or dropped as retries
    /// or to wait for a predecessor; the rest met the log's bound), and the
    /// publishers of those dropped as retries.
    fn order(&mut self, mbr: &Membership, msgs: Vec<Submitted>) -> (usize, Vec<PublisherId>) {
        let mut retried = Vec::new();
        let Some(view) = mbr.view_id() else {
            return (0, retried);
        };
        let first = self.held().next();
        let mut ordered = 0;
        let mut taken = 0;
        for Submitted(after, m) in msgs {
            if self.log.len() >= self.config.log_len_max
                || self.log_bytes >= self.config.log_bytes_max
            {
                // At the bound: the submitters send it again later.
                break;
            }
            taken += 1;
            match self.publishers.next(m.0, m.1) {
                _ if self.bugs.no_dedup => {}
                Next::Retry(_) => {
                    self.stats.duplicates += 1;
                    if !retried.contains(&m.0) {
                        retried.push(m.0);
                    }
                    continue;
                }
                // A later pub_seq whose predecessor has not arrived (it was
                // lost with a link and is being resubmitted): wait for it,
                // so that the publisher's order holds (guarantee 3).
                Next::Skips(_) => continue,
                // Nor order a publisher's later publish on first sight
                // (an incarnation's first follows nothing).
                Next::Unknown
                    if after > PubSeq(0)
                        && !self.publishers.evicted_any()
                        && !m.1.begins_incarnation() =>
                {
                    continue
                }
                Next::Unknown | Next::Follows => {}
            }
            let seq = self.held().next();
            self.hold(m.ordered(seq));
            ordered += 1;
        }
        if ordered == 0 {
            return (taken, retried);
        }
        self.stats.ordered += ordered as u64;
        let held = self.held();
        self.acks.insert(mbr.config().me, held);
        if mbr.others().next().is_some() {
            // Encoded from the log's tail, which holds them now. (A server
            // alone in its view has no one to tell.)
            let tail: Vec<&Ordered> = self.log.range(self.log.len() - ordered..).collect();
            let frames = self.orders(view, first, &tail);
            for frame in frames {
                self.send_frame_members(mbr, frame);
            }
        }
        self.advance_stable(mbr);
        (taken, retried)
    }

    /// Appends an ordered message to the log and the publisher table.
    pub(super) fn hold(&mut self, m: Ordered) {
        let e = self.publishers.entry(m.publisher, m.seq);
        e.held = e.held.max(m.pub_seq);
        e.seq = m.seq;
        self.append(m);
    }

    /// Appends ordered messages to the log and the publisher table, which
    /// is updated once per run of one publisher: as `hold` one at a time
    /// would (a run's later messages do not change other publishers' state,
    /// so the table forgets the same publishers).
    pub(super) fn hold_all(&mut self, msgs: impl IntoIterator<Item = Ordered>) {
        let from = self.log.len();
        for m in msgs {
            self.append(m);
        }
        let mut run: Option<(PublisherId, PubSeq, Seq)> = None;
        for m in self.log.range(from..) {
            match &mut run {
                Some((publisher, top, last)) if *publisher == m.publisher => {
                    *top = (*top).max(m.pub_seq);
                    *last = m.seq;
                }
                _ => {
                    if let Some(done) = run.replace((m.publisher, m.pub_seq, m.seq)) {
                        note_held(&mut self.publishers, done);
                    }
                }
            }
        }
        if let Some(done) = run {
            note_held(&mut self.publishers, done);
        }
    }

    /// Appends an ordered message to the log, and to the `Held` event.
    fn append(&mut self, m: Ordered) {
        debug_assert_eq!(m.seq, self.held().next());
        self.log_bytes += m.cost();
        match self.events.back_mut() {
            Some(Event::Held(held)) => held.push(m.clone()),
            _ => self.events.push_back(Event::Held(vec![m.clone()])),
        }
        self.log.push_back(m);
    }
}

/// A run of `publisher`'s messages was held: `top` its highest pub_seq,
/// `last` the seq of its last message.
fn note_held(table: &mut PublisherTable, (publisher, top, last): (PublisherId, PubSeq, Seq)) {
    let e = table.entry(publisher, last);
    e.held = e.held.max(top);
    e.seq = last;
}
