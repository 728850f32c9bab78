//! What a replicated service is to Canopy: the [`Service`] trait a replica
//! program implements, the modes its methods declare, and the call types
//! it is handed (docs/DESIGN.md, "Replicated RPC").

use bytes::Bytes;
use canopy_client::protocol::{PubSeq, PublisherId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// How the replicas of a group run a method's calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every replica executes every call, in the group's order, on the
    /// server's own loop: the handler must be deterministic (and quick).
    Active,
    /// The view's first replica executes (off the loop; the handler may be
    /// non-deterministic) once every earlier call is applied, and orders
    /// the effect; every replica applies it.
    PrimaryBackup,
    /// One replica, picked by a rule over the view, executes (off the
    /// loop, on the state as that replica has applied it) and orders the
    /// effect; every replica applies it.
    LoadBalanced,
    /// Every replica computes its share by rank (off the loop), the shares
    /// are ordered, and every replica merges them into the effect.
    Parallel,
}

impl Mode {
    /// Every mode, in the order they are documented.
    pub const ALL: [Mode; 4] = [
        Mode::Active,
        Mode::PrimaryBackup,
        Mode::LoadBalanced,
        Mode::Parallel,
    ];

    /// The mode's name in configs, metrics and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Active => "active",
            Mode::PrimaryBackup => "primary-backup",
            Mode::LoadBalanced => "load-balanced",
            Mode::Parallel => "parallel",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A method of a service and the mode its calls run in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Method {
    /// Its name: one or more topic tokens (`put`, `book.add`).
    pub name: String,
    /// How its calls run.
    pub mode: Mode,
}

impl Method {
    /// A method named `name` running in `mode`.
    pub fn new(name: &str, mode: Mode) -> Self {
        Method {
            name: name.to_owned(),
            mode,
        }
    }
}

/// A call's identity: its caller's publisher id and the pub_seq the call
/// was published under. Retries keep it, so it names one call for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CallId {
    /// The caller.
    pub publisher: PublisherId,
    /// The caller's sequence number for it.
    pub pub_seq: PubSeq,
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.publisher, self.pub_seq.0)
    }
}

/// A parallel call's share: rank `rank` of `of`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Share {
    /// Which share, from 0.
    pub rank: u32,
    /// How many shares the call has (the view's size when it was ordered).
    pub of: u32,
}

/// One call as a service sees it.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// Its identity.
    pub id: CallId,
    /// The method called.
    pub method: &'a str,
    /// The caller's argument.
    pub payload: &'a [u8],
    /// For [`Service::execute`] in parallel mode: the share to compute.
    pub share: Option<Share>,
}

/// A replicated service: user code that every core server of a group runs
/// (docs/DESIGN.md, "Replicated RPC").
///
/// A call is split in two. [`Service::execute`] does the work: where the
/// method's [`Mode`] says (every replica, the primary, one replica, or one
/// share per replica) and, except in active mode, off the server's loop and
/// possibly on a state that has not applied every earlier call yet. It
/// returns the call's **effect**. [`Service::apply`] then applies the
/// effect at every replica, in one order they all share, and returns the
/// reply; it must be deterministic, so every replica's state and reply are
/// those of one sequential execution. Put what depends on the state in
/// `apply` (a `put` that answers the old value) and what is slow or not
/// deterministic in `execute` (a price lookup, a random id).
///
/// Every method takes `&self`: executors run `execute` on their threads
/// while the server's loop applies other calls' effects, so the service
/// guards its state itself (a `Mutex` or `RwLock` around it) and holds a
/// lock only as long as it reads or changes the state, never across slow
/// work: a lock held while a handler waits would stop the server's loop.
pub trait Service: Send + Sync + 'static {
    /// The methods and their modes. Read once, when the server starts;
    /// every replica of a group must answer the same.
    fn methods(&self) -> Vec<Method>;

    /// Does a call's work and returns its effect (or the handler's error,
    /// which the caller is given). In parallel mode `call.share` says which
    /// share; the shares are merged by [`Service::merge`].
    ///
    /// # Errors
    /// The handler's error, told to the caller.
    fn execute(&self, call: &Call<'_>) -> Result<Bytes, String>;

    /// Parallel mode: the call's effect from its shares, in rank order.
    /// Deterministic. By default the shares are concatenated.
    ///
    /// # Errors
    /// The handler's error, told to the caller.
    fn merge(&self, call: &Call<'_>, shares: &[Bytes]) -> Result<Bytes, String> {
        let _ = call;
        Ok(shares.concat().into())
    }

    /// Applies a call's effect to the state and returns the reply.
    /// Deterministic: every replica applies the same effects in the same
    /// order (a call's effect may be applied after later calls' effects:
    /// the order is where each became known in the stream).
    ///
    /// # Errors
    /// The handler's error, told to the caller (the state must be as if
    /// the call had not been applied).
    fn apply(&self, call: &Call<'_>, effect: &[u8]) -> Result<Bytes, String>;

    /// The whole state, for a replica that joins (docs/DESIGN.md,
    /// "Replicated RPC": state transfer rides the flush's snapshot).
    fn snapshot(&self) -> Bytes;

    /// Replaces the whole state with a snapshot's.
    ///
    /// # Errors
    /// When the snapshot does not decode; the server then keeps its state
    /// and says so.
    fn restore(&self, snapshot: &[u8]) -> Result<(), String>;

    /// A short digest of the state, for operators and tests comparing
    /// replicas. By default a hash of the snapshot.
    fn digest(&self) -> u64 {
        digest_of(&self.snapshot())
    }
}

/// A 64-bit FNV-1a hash of `bytes`: the same on every replica and build.
pub fn digest_of(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A service as the server and the threads that execute calls share it.
pub type Shared = Arc<dyn Service>;

/// Shares `service`.
pub fn share(service: impl Service) -> Shared {
    Arc::new(service)
}
