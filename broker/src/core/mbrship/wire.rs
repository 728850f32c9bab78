//! MBRSHIP's messages. On the wire they are variants of the group's one
//! message type (`core::total::wire::PeerMsg`, the same names); MBRSHIP
//! hands them to the layer above to send ([`super::Above::send`]).

use super::{Member, NodeId, View, ViewId};
use crate::core::stream::{Msg, Snapshot};
use canopy_client::protocol::Seq;
use serde::{Deserialize, Serialize};

/// What a server tells every other configured server each heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender.
    pub from: Member,
    /// Whether it is joining (in no view).
    pub joining: bool,
    /// The view whose state it holds (`None`: no state).
    pub view: Option<ViewId>,
    /// The epoch of the proposal it promised last (its view's, if none
    /// since).
    pub epoch: u64,
    /// The last seq it holds in its view.
    pub have: Seq,
    /// From a coordinator: the last seq stable in its view.
    pub stable: Seq,
    /// The servers it has heard from within a failure timeout. A server
    /// counts another alive only if it is heard *and* hears back, so a
    /// server whose inbound links are cut is left out of views rather than
    /// stalling every flush it is proposed into.
    pub hears: Vec<NodeId>,
}

/// Proposer to the members of a proposed view: stop ordering and report
/// what you hold (phase one of a view change, the flush).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReq {
    /// The proposal; it becomes the new view's id.
    pub proposal: ViewId,
    /// The proposed members.
    pub members: Vec<Member>,
}

/// Answer to `FlushReq`: the sender promised the proposal and reports the
/// messages it holds that may not be stable everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushOk {
    /// The proposal answered.
    pub proposal: ViewId,
    /// The sender.
    pub from: Member,
    /// The view whose state the sender holds (kept across a rejoin).
    pub view: Option<ViewId>,
    /// The last view it accepted, from its hard state: the same as `view`
    /// for a server that holds state, newer for a restarted server that
    /// remembers the view but lost its messages, `None` for a server that
    /// is not a voter.
    pub accepted: Option<View>,
    /// The last view it installed, from its hard state.
    pub installed: ViewId,
    /// The last seq it delivered.
    pub delivered: Seq,
    /// What it holds after `delivered`, in order.
    pub msgs: Vec<Msg>,
}

impl FlushOk {
    /// The last seq it holds.
    pub fn held(&self) -> Seq {
        Seq(self.delivered.0.saturating_add(self.msgs.len() as u64))
    }
}

/// Proposer to members: take `view`'s history, everything through
/// `through`, to be delivered in the old view once the view commits.
/// `msgs` are the messages after the receiver's held seq that it lacks. A
/// member marked `lagging` holds no usable state: a `Snapshot` of the
/// proposer's delivered state follows, and `msgs` continue it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    /// The new view.
    pub view: View,
    /// The last seq of the old view.
    pub through: Seq,
    /// The seq of `msgs[0]`.
    pub first: Seq,
    /// Messages the receiver lacks.
    pub msgs: Vec<Msg>,
    /// Whether the receiver gets a snapshot next.
    pub lagging: bool,
}

/// Member to proposer: "I hold the new view's history" (phase two).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptOk {
    /// The view accepted.
    pub view: ViewId,
}

/// Coordinator to a lagging member, right after `NewView` (on the wire, a
/// `Snapshot`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTransfer {
    /// The view it belongs to.
    pub view: ViewId,
    /// The state.
    pub state: Snapshot,
}

/// Coordinator to members: everything through `through` is stable. The
/// first `Stable` of an accepted view commits it (MBRSHIP); the later ones
/// carry stability in the working view (TOTAL).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stable {
    /// The view.
    pub view: ViewId,
    /// The stable seq.
    pub through: Seq,
}

/// A message MBRSHIP sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MbrMsg {
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`FlushReq`].
    FlushReq(FlushReq),
    /// See [`FlushOk`].
    FlushOk(FlushOk),
    /// See [`NewView`].
    NewView(NewView),
    /// See [`AcceptOk`].
    AcceptOk(AcceptOk),
    /// See [`StateTransfer`].
    Snapshot(StateTransfer),
    /// The commit: see [`Stable`].
    Stable(Stable),
}
