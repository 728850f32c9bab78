//! RRPC's records: the outcomes replicas order, and the replicated state a
//! snapshot carries (CBOR).

use super::service::{Call, CallId, Mode, Share};
use super::{Answer, Job};
use crate::core::mbrship::{Member, NodeId, ViewId};
use bytes::Bytes;
use canopy_client::protocol::{PublisherId, Replies};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a replica orders after executing a call (or a share of one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Outcome {
    /// The call.
    pub id: CallId,
    /// The share, for a parallel call: its rank, and how many shares its
    /// executor split the call into (the first share ordered decides).
    pub share: Option<Share>,
    /// The effect, or the handler's error.
    pub result: Result<Bytes, String>,
}

/// A view's members, ordered by its coordinator as the view begins: who
/// executes from this position of the stream on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct ViewRecord {
    pub id: ViewId,
    /// In the view's order.
    pub members: Vec<Member>,
}

/// A call delivered and not applied yet, with what is known of its effect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Pending {
    pub id: CallId,
    pub method: Arc<str>,
    pub payload: Bytes,
    /// `None`: the service has no such method.
    pub mode: Option<Mode>,
    /// The replies its caller waits for.
    #[serde(default)]
    pub replies: Replies,
    /// How many shares a parallel call has: set by the first share
    /// ordered (each executor splits by the view it has, and replicas that
    /// caught up by a snapshot may not know the view a call was ordered
    /// in, so it cannot come from the view).
    pub of: Option<u32>,
    /// The first outcome ordered (primary-backup, load-balanced).
    pub outcome: Option<Result<Bytes, String>>,
    /// Load-balanced: the member assigned to execute it (replicated
    /// state: every replica assigns the same way at the same position).
    #[serde(default)]
    pub executor: Option<NodeId>,
    /// The first share ordered per rank (parallel).
    pub shares: BTreeMap<u32, Result<Bytes, String>>,
}

impl Pending {
    /// Whether its effect is known, so that it can be applied.
    pub fn ready(&self) -> bool {
        if self.replies != Replies::Own {
            // Active, or failed at once.
            return true;
        }
        match self.mode {
            None | Some(Mode::Active) => true,
            Some(Mode::PrimaryBackup | Mode::LoadBalanced) => self.outcome.is_some(),
            Some(Mode::Parallel) => self.of.is_some_and(|of| self.shares.len() >= of as usize),
        }
    }

    /// The call as the service sees it.
    pub fn call(&self, share: Option<Share>) -> Call<'_> {
        Call {
            id: self.id,
            method: &self.method,
            payload: &self.payload,
            share,
        }
    }

    /// A job that executes it (or a share).
    pub fn job(&self, share: Option<Share>) -> Job {
        Job {
            id: self.id,
            method: self.method.clone(),
            payload: self.payload.clone(),
            share,
        }
    }
}

/// The replicated state at a position of the stream.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct State {
    /// The service's own snapshot.
    pub service: Bytes,
    /// Calls delivered and not applied yet.
    pub queue: Vec<Pending>,
    /// Replies kept, oldest first.
    pub replies: Vec<(CallId, Answer)>,
    /// Per caller, the last call applied.
    pub done: Vec<(
        canopy_client::protocol::PublisherId,
        canopy_client::protocol::PubSeq,
    )>,
    /// The running hash of applies (`Rrpc::fingerprint`).
    #[serde(default)]
    pub history: u64,
    /// The members of the newest view record at this position (who
    /// executes: load-balanced assignments made after it depend on it)...
    #[serde(default)]
    pub members: Vec<Member>,
    /// ...and its view.
    #[serde(default)]
    pub view: Option<ViewId>,
    /// Calls applied that wait for their replicas' votes.
    #[serde(default)]
    pub voting: Vec<Voting>,
}

/// An active call applied whose caller waits for every replica's own
/// reply, or a majority's: the votes ordered so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Voting {
    pub id: CallId,
    pub method: Arc<str>,
    pub replies: Replies,
    /// The members of the view it was applied in, with the publisher id
    /// each orders its vote under (a member that restarts since has
    /// another, and is not waited for: it did not apply the call).
    pub voters: Vec<(NodeId, PublisherId)>,
    /// The first vote ordered of each voter, by its publisher id.
    pub votes: BTreeMap<PublisherId, Answer>,
    /// The reply applying it gave (the same at every replica: an active
    /// call is executed deterministically by each), for when every voter
    /// left before its vote was ordered.
    #[serde(default)]
    pub answer: Option<Answer>,
}

/// CBOR of a record.
pub(super) fn encode<T: Serialize>(v: &T) -> Bytes {
    let mut buf = Vec::new();
    ciborium::into_writer(v, &mut buf).expect("invariant: writing CBOR to a Vec cannot fail");
    buf.into()
}

/// A record from CBOR.
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}
