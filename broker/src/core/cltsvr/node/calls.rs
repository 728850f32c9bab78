//! Calls of the core's replicated service as a node sees them
//! (docs/DESIGN.md, "Replicated RPC"): a call is a publish on
//! `$canopy.call.METHOD`, ordered like any other; this file keeps which
//! session waits for which call's reply, routes replies to it (or to the
//! caller's session, or the relays that forward its calls), and collects
//! the calls whose reply must be asked of the layer below: a retry of a
//! call already ordered, or an `Ask` for one (a caller that reconnected,
//! or was adopted, or a relay asking again for its clients).

use super::*;
use crate::core::rrpc::{Answer, CallId};
use canopy_client::protocol::{AskHead, CallErrorCode, CallFailure, ReplyHead};

/// A call from one of this node's sessions whose reply has not come.
#[derive(Debug)]
struct Waiting {
    session: SessionId,
    /// Whether the session is a relay forwarding the call for its caller.
    forwarded: bool,
    since: Duration,
    /// The method, when the call itself came here (not only an `Ask`).
    method: Option<Arc<str>>,
}

/// What the node keeps of calls.
#[derive(Debug, Default)]
pub(super) struct Calls {
    waiting: BTreeMap<CallId, Waiting>,
    /// Calls ordered before whose replies the layer below must give.
    asked: Vec<CallId>,
    /// Replies sent since the last `take_call_latencies`: method, and time
    /// from the call's arrival here.
    latencies: Vec<(Arc<str>, Duration)>,
}

impl Node {
    /// Whether `topic` is a call's.
    pub(super) fn is_call(topic: &str) -> bool {
        call_method(topic).is_some()
    }

    /// A call from `session` (new, or a retry: `ordered` says whether it is
    /// known ordered): its reply is awaited here. False when the node
    /// waits for as many calls as it may (the call is pushed back).
    pub(super) fn call_arrived(
        &mut self,
        session: SessionId,
        forwarded: bool,
        msg: &Msg,
        ordered: bool,
    ) -> bool {
        let id = CallId {
            publisher: msg.0,
            pub_seq: msg.1,
        };
        tracing::debug!(call = %id, %session, ordered, "call");
        let method = call_method(&msg.2).map(Arc::from);
        self.await_call(session, forwarded, id, method, ordered)
    }

    /// Session `session` waits for call `id`'s reply; `ask` says whether
    /// the layer below must be asked for it. False at the bound.
    fn await_call(
        &mut self,
        session: SessionId,
        forwarded: bool,
        id: CallId,
        method: Option<Arc<str>>,
        ask: bool,
    ) -> bool {
        if !self.calls.waiting.contains_key(&id)
            && self.calls.waiting.len() >= self.config.calls_max
        {
            return false;
        }
        let since = self.now;
        self.calls.waiting.insert(
            id,
            Waiting {
                session,
                forwarded,
                since,
                method,
            },
        );
        if ask {
            self.calls.asked.push(id);
        }
        true
    }

    /// A client (or a relay, for one of its callers) asks again for the
    /// reply to a call acknowledged before.
    pub(super) fn on_ask(&mut self, session: SessionId, head: AskHead) {
        let Some((publisher, forwarded)) = self.acting_for(session, head.publisher, "call's Ask")
        else {
            return;
        };
        let id = CallId {
            publisher,
            pub_seq: head.pub_seq,
        };
        tracing::debug!(call = %id, %session, "asked again");
        if !self.grouped {
            return self.no_service(id);
        }
        if !self.await_call(session, forwarded, id, None, true) {
            let msg = "too many calls waiting for replies here; retry".to_owned();
            self.close_with_error(session, ErrorCode::Overloaded, msg);
        }
    }

    /// Calls ordered before whose replies the layer below must give (a
    /// core server looks them up in the reply table; a relay asks the tier
    /// above again).
    pub fn take_asked_calls(&mut self) -> Vec<CallId> {
        std::mem::take(&mut self.calls.asked)
    }

    /// Every call still awaited is asked of the layer below again: in a
    /// relay with a new connection to the tier above (the old one may have
    /// lost its reply), in a core server that took over a snapshot (calls
    /// it covers were applied elsewhere).
    pub fn ask_again(&mut self) {
        let all: Vec<CallId> = self.calls.waiting.keys().copied().collect();
        self.calls.asked.extend(all);
    }

    /// `publisher`'s calls through `through` still awaited are asked of
    /// the layer below again (the group says it ordered them before).
    pub fn ask_again_of(&mut self, publisher: PublisherId, through: PubSeq) {
        let from = CallId {
            publisher,
            pub_seq: PubSeq(0),
        };
        let to = CallId {
            publisher,
            pub_seq: through,
        };
        let ids: Vec<CallId> = self
            .calls
            .waiting
            .range(from..=to)
            .map(|(id, _)| *id)
            .collect();
        self.calls.asked.extend(ids);
    }

    /// Calls awaited here.
    pub fn calls_waiting(&self) -> usize {
        self.calls.waiting.len()
    }

    /// Replies sent since the last call, with their method and how long
    /// after the call arrived here.
    pub fn take_call_latencies(&mut self) -> Vec<(Arc<str>, Duration)> {
        std::mem::take(&mut self.calls.latencies)
    }

    /// The reply to call `id`: sent to the session that waits for it, or
    /// else to the caller's own session here or the relays forwarding its
    /// calls (in active mode every replica has the reply; only the one the
    /// caller is attached to has somewhere to send it).
    pub fn reply(&mut self, now: Duration, id: CallId, answer: Answer) {
        self.now = now;
        let waiting = self.calls.waiting.remove(&id);
        let targets: Vec<(SessionId, bool)> = match &waiting {
            Some(w) => {
                if let Some(method) = &w.method {
                    let took = now.saturating_sub(w.since);
                    self.calls.latencies.push((method.clone(), took));
                }
                vec![(w.session, w.forwarded)]
            }
            None => match self.publisher_sessions.get(&id.publisher) {
                Some(&session) => vec![(session, false)],
                None => self
                    .forwarders_of(id.publisher)
                    .into_iter()
                    .map(|s| (s, true))
                    .collect(),
            },
        };
        tracing::debug!(call = %id, to = ?targets, ok = answer.is_ok(), "reply");
        for (session, forwarded) in targets {
            let (error, body) = match &answer {
                Ok(body) => (None, body.clone()),
                Err(e) => (Some(e.clone()), Bytes::new()),
            };
            let head = ReplyHead {
                pub_seq: id.pub_seq,
                publisher: forwarded.then_some(id.publisher),
                error,
            };
            self.outputs.push_back(Output::Transmit {
                session,
                frame: protocol::encode(kind::REPLY, &head, &body),
                kind: TransmitKind::Control,
                seqs: (self.head, self.head),
            });
        }
    }

    /// A session ended: the calls it waited for are its client's to ask
    /// again, wherever it goes.
    pub(super) fn calls_gone(&mut self, session: SessionId) {
        self.calls.waiting.retain(|_, w| w.session != session);
    }

    /// A node that orders alone has no replicated service: every call it
    /// orders fails with `NoService`.
    pub(super) fn no_service(&mut self, id: CallId) {
        let failure = CallFailure {
            code: CallErrorCode::NoService,
            message: "this server is not in a core group: it runs no replicated service".into(),
        };
        self.reply(self.now, id, Err(failure));
    }
}
