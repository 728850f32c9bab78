//! How a call's effect becomes known and is applied: outcomes and shares
//! kept with their calls (the first one counts), calls applied in queue
//! order once their effect is known, active calls' votes counted, and the
//! reply table (see the module docs of [`super`]).

use super::wire::{self, Outcome, Pending};
use super::*;

impl Rrpc {
    pub(super) fn on_outcome(&mut self, m: &Ordered) {
        let outcome: Outcome = match wire::decode(&m.payload) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(publisher = %m.publisher, seq = %m.seq, error = %e, "an outcome record that does not decode; ignored");
                return;
            }
        };
        let Some(i) = self.queue.iter().position(|p| p.id == outcome.id) else {
            return self.on_vote(m.publisher, outcome);
        };
        let p = &mut self.queue[i];
        match (p.mode, outcome.share) {
            (Some(Mode::Parallel), Some(s)) if s.rank < s.of && s.of <= SHARES_MAX => {
                if p.of.is_none() {
                    // The first share decides how many there are; this
                    // replica executes its ranks of those.
                    p.of = Some(s.of);
                    p.shares.insert(s.rank, outcome.result);
                    self.dispatch(i);
                } else if p.of == Some(s.of) {
                    p.shares.entry(s.rank).or_insert(outcome.result);
                }
            }
            (Some(Mode::PrimaryBackup | Mode::LoadBalanced), None) => {
                if p.outcome.is_none() {
                    p.outcome = Some(outcome.result);
                    if let Some(e) = p.executor {
                        if let Some(n) = self.load.get_mut(&e) {
                            *n = n.saturating_sub(1);
                        }
                    }
                }
            }
            _ => {
                tracing::warn!(call = %outcome.id, "an outcome that does not fit its call's mode; ignored")
            }
        }
    }

    /// Applies the calls whose effects are known (at most the one the
    /// message just delivered completed, or a new active call), in queue
    /// order: a call is applied at the position of the stream where its
    /// effect became known, so one slow executor holds up no other call.
    pub(super) fn advance(&mut self) {
        while let Some(i) = self.queue.iter().position(Pending::ready) {
            let Some(p) = self.queue.remove(i) else {
                break;
            };
            let answer = self.effect(&p).and_then(|effect| {
                let service = self.service.as_ref().ok_or_else(no_service)?;
                service.apply(&p.call(None), &effect).map_err(handler)
            });
            let stat = self.stat(&p.method);
            stat.mode = p.mode;
            stat.applied += 1;
            // (An active call is executed here, by every replica.)
            stat.executed += u64::from(p.mode == Some(Mode::Active));
            stat.failed += u64::from(answer.is_err());
            let reply = match &answer {
                Ok(b) => digest_of(b),
                Err(e) => digest_of(e.message.as_bytes()) ^ 1,
            };
            self.history = digest_of(
                &[self.history, p.id.publisher.0, p.id.pub_seq.0, reply]
                    .map(u64::to_le_bytes)
                    .concat(),
            );
            if p.replies != Replies::Own && p.mode == Some(Mode::Active) {
                self.vote(p, answer);
            } else {
                self.remember(p.id, answer.clone());
                self.out.push_back(Reply {
                    id: p.id,
                    method: p.method,
                    answer,
                });
            }
            // The next call may be the primary's to execute now.
            self.dispatch(0);
        }
    }

    /// Active call `p`, just applied here with `answer`, waits for its
    /// replicas' votes: this replica orders its own (its reply), and the
    /// reply is given once the votes are in ([`Rrpc::count_votes`]).
    pub(super) fn vote(&mut self, p: Pending, answer: Answer) {
        self.applied(p.id);
        let own = Outcome {
            id: p.id,
            share: None,
            result: answer.clone().map_err(|e| e.message),
        };
        self.submit(OUTCOME_TOPIC, wire::encode(&own));
        let voters = self.voters();
        self.voting.insert(
            p.id,
            Voting {
                id: p.id,
                method: p.method,
                replies: p.replies,
                voters,
                votes: BTreeMap::new(),
                answer: Some(answer),
            },
        );
    }

    /// The members as voters: each with the publisher id it orders its
    /// votes under. Empty before a stream's first view record.
    pub(super) fn voters(&self) -> Vec<(NodeId, PublisherId)> {
        self.members
            .iter()
            .map(|m| (m.node, outcome_publisher(m.node, m.incarnation.0)))
            .collect()
    }

    /// The stream's first view record: the calls applied before it learn
    /// their voters (its members), and keep the votes of those that came
    /// already.
    pub(super) fn name_voters(&mut self) {
        let voters = self.voters();
        for v in self.voting.values_mut().filter(|v| v.voters.is_empty()) {
            v.voters = voters.clone();
            v.votes.retain(|p, _| voters.iter().any(|(_, q)| q == p));
        }
    }

    /// A vote ordered by `from` (an outcome of a call no longer queued).
    /// Before the stream's first view record any vote is kept, the voters
    /// not being known yet ([`Rrpc::name_voters`]).
    pub(super) fn on_vote(&mut self, from: PublisherId, outcome: Outcome) {
        let Some(v) = self.voting.get_mut(&outcome.id) else {
            return;
        };
        let stranger = !v.voters.is_empty() && !v.voters.iter().any(|(_, p)| *p == from);
        if outcome.share.is_some() || stranger {
            return;
        }
        v.votes
            .entry(from)
            .or_insert_with(|| outcome.result.map_err(handler));
        self.count_votes(outcome.id);
    }

    /// Gives call `id`'s reply if its votes decide it: every replica's
    /// once every voter still in the view voted; a majority's once one
    /// reply has more than half the votes of the voters that voted or are
    /// still in the view (a replica that failed has no say; a replica
    /// that replied otherwise is outvoted), and no majority once every
    /// voter still in the view voted without one. When every voter left
    /// before a vote of its was ordered (every replica restarted, say),
    /// the replicas of the view answer for them with the reply applying
    /// gave: each holds the state the call left, and an active call's
    /// reply is the same at every replica.
    pub(super) fn count_votes(&mut self, id: CallId) {
        let Some(v) = self.voting.get(&id) else {
            return;
        };
        if self.members.is_empty() {
            // No view record yet on this stream: who votes is not known.
            return;
        }
        let live: BTreeSet<PublisherId> = self.voters().into_iter().map(|(_, p)| p).collect();
        let awaited = v
            .voters
            .iter()
            .any(|(_, p)| live.contains(p) && !v.votes.contains_key(p));
        let counted = v
            .voters
            .iter()
            .filter(|(_, p)| live.contains(p) || v.votes.contains_key(p))
            .count();
        let answer = match v.replies {
            Replies::Own => None,
            Replies::All => (!awaited).then(|| {
                let votes: Vec<Vote> = match (counted, &v.answer) {
                    (0, Some(answer)) => self
                        .members
                        .iter()
                        .map(|m| Vote {
                            server: m.node.0,
                            reply: answer.clone(),
                        })
                        .collect(),
                    _ => v
                        .voters
                        .iter()
                        .filter_map(|(node, p)| {
                            Some(Vote {
                                server: node.0,
                                reply: v.votes.get(p)?.clone(),
                            })
                        })
                        .collect(),
                };
                Ok(wire::encode(&votes))
            }),
            Replies::Majority => {
                let mut counts: Vec<(&Answer, usize)> = Vec::new();
                for a in v.votes.values() {
                    match counts.iter_mut().find(|(b, _)| *b == a) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((a, 1)),
                    }
                }
                match counts.iter().find(|(_, n)| *n > counted / 2) {
                    Some((a, _)) => Some((*a).clone()),
                    // Every voter left unheard: see above.
                    None if counted == 0 && v.answer.is_some() => v.answer.clone(),
                    None if !awaited => Some(Err(CallFailure {
                        code: CallErrorCode::NoMajority,
                        message: format!(
                            "no reply was given by more than {} of the {counted} replicas that replied",
                            counted / 2
                        ),
                    })),
                    None => None,
                }
            }
        };
        let Some(answer) = answer else {
            return;
        };
        let Some(v) = self.voting.remove(&id) else {
            return;
        };
        self.remember(id, answer.clone());
        self.out.push_back(Reply {
            id,
            method: v.method,
            answer,
        });
    }

    /// Every call waiting for votes, after a view change (a voter that
    /// left is not waited for).
    pub(super) fn count_votes_all(&mut self) {
        let ids: Vec<CallId> = self.voting.keys().copied().collect();
        for id in ids {
            self.count_votes(id);
        }
    }

    /// The effect of a call whose effect is known ([`Pending::ready`]).
    pub(super) fn effect(&self, p: &Pending) -> Answer {
        let service = self.service.as_ref().ok_or_else(no_service)?;
        match p.mode {
            None => Err(CallFailure {
                code: CallErrorCode::UnknownMethod,
                message: format!("the service has no method `{}`", p.method),
            }),
            Some(mode) if mode != Mode::Active && p.replies != Replies::Own => Err(CallFailure {
                code: CallErrorCode::NotActive,
                message: format!(
                    "`{}` is {mode}: only active methods run at every replica, so only they have every replica's reply",
                    p.method
                ),
            }),
            // Every replica executes it here, in the one order.
            Some(Mode::Active) => p.job(None).run(service).map_err(handler),
            Some(Mode::PrimaryBackup | Mode::LoadBalanced) => match &p.outcome {
                Some(r) => r.clone().map_err(handler),
                None => Err(handler("no outcome".into())),
            },
            Some(Mode::Parallel) => {
                let shares: Result<Vec<Bytes>, String> = p.shares.values().cloned().collect();
                shares
                    .and_then(|shares| {
                        let call = p.call(None);
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            service.merge(&call, &shares)
                        }))
                        .unwrap_or_else(|_| Err("the merge panicked".into()))
                    })
                    .map_err(handler)
            }
        }
    }

    /// Call `id` is applied: its caller's calls up to it are applied or
    /// still queued.
    pub(super) fn applied(&mut self, id: CallId) {
        let d = self.done.entry(id.publisher).or_default();
        *d = (*d).max(id.pub_seq);
    }

    /// Keeps a reply, forgetting the oldest past the bound.
    /// (A caller's last call applied is forgotten with its last reply,
    /// not with the reply of that call: calls are applied out of their
    /// callers' order, and the table may still hold a later-applied
    /// earlier call's reply.)
    pub(super) fn remember(&mut self, id: CallId, answer: Answer) {
        if self.replies.insert(id, answer).is_none() {
            *self.held.entry(id.publisher).or_default() += 1;
        }
        self.replies_order.push_back(id);
        self.applied(id);
        while self.replies_order.len() > self.config.replies_max {
            let Some(old) = self.replies_order.pop_front() else {
                break;
            };
            if self.replies.remove(&old).is_none() {
                continue;
            }
            let Some(n) = self.held.get_mut(&old.publisher) else {
                continue;
            };
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(&old.publisher);
                self.done.remove(&old.publisher);
            }
        }
    }
}
