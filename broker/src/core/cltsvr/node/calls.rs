//! Calls of the core's replicated service as a node sees them
//! (docs/DESIGN.md, "Replicated RPC"): a call is a publish on
//! `$canopy.call.METHOD`, ordered like any other; this file keeps which
//! session waits for which call's reply, routes replies to it (or to the
//! caller's session, or the relays that forward its calls), and collects
//! the calls whose reply must be asked of the layer below: a retry of a
//! call already ordered (a caller that reconnected, adopted, or a relay
//! asking again for its clients).

use super::*;
use crate::core::rrpc::{Answer, CallId};
use canopy_client::protocol::{CallErrorCode, CallFailure, ReplyHead};

/// A call from one of this node's sessions whose reply has not come.
#[derive(Debug)]
struct Waiting {
    session: SessionId,
    /// Whether the session is a relay forwarding the call for its caller.
    forwarded: bool,
    since: Duration,
    msg: Msg,
}

/// What the node keeps of calls.
#[derive(Debug, Default)]
pub(super) struct Calls {
    waiting: BTreeMap<CallId, Waiting>,
    /// Calls ordered before whose replies the layer below must give.
    asked: Vec<Msg>,
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
        if !self.calls.waiting.contains_key(&id)
            && self.calls.waiting.len() >= self.config.calls_max
        {
            return false;
        }
        self.calls.waiting.insert(
            id,
            Waiting {
                session,
                forwarded,
                since: self.now,
                msg: msg.clone(),
            },
        );
        if ordered {
            self.calls.asked.push(msg.clone());
        }
        true
    }

    /// Calls ordered before whose replies the layer below must give (a
    /// core server looks them up in the reply table; a relay asks the tier
    /// above again).
    pub fn take_asked_calls(&mut self) -> Vec<Msg> {
        std::mem::take(&mut self.calls.asked)
    }

    /// In a relay with a new connection to the tier above: every call
    /// still awaited is asked again (the old connection may have lost its
    /// reply).
    pub(super) fn ask_again(&mut self) {
        let all: Vec<Msg> = self.calls.waiting.values().map(|w| w.msg.clone()).collect();
        self.calls.asked.extend(all);
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
                let method = call_method(&w.msg.2).unwrap_or_default();
                self.calls
                    .latencies
                    .push((method.into(), now.saturating_sub(w.since)));
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
