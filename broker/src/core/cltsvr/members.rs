//! The tree's membership as the ordered stream tells it (docs/DESIGN.md,
//! "Adoption" and "Membership reports").
//!
//! Attach and detach are **ordered events**: a server that takes a client
//! publishes an [`MemberEvent`] on the system topic [`MEMBERS_TOPIC`]; it
//! is ordered with every other message, and every node of every tier
//! applies it at the same position of the stream. So all servers agree
//! which server serves which client, with no extra round, and `full`
//! clients are told the same changes at the same positions.
//!
//! Who publishes what:
//! - the server a client attaches to: `Attach` after its handshake, and
//!   `Detach` when its connection ends (a relay publishes these for its
//!   clients through the tier above);
//! - the coordinator of each new core view: `Core`, the view's servers.
//!   Clients of a core server that left the view leave with it, and clients
//!   of a relay that detached leave with the relay; they attach again where
//!   they are adopted.
//!
//! The adopter of an orphan is not assigned by the servers and no
//! survivor redirects (docs/DESIGN.md, "Adoption" and "Where Canopy
//! differs from Horus"). Every client computes it, identically, by rendezvous hashing over its
//! tier's server list ([`canopy_client::protocol::adopter_order`]), so no
//! server needs to be up to tell it; the servers then agree on where it
//! went from its ordered `Attach`. A client's first server is its own
//! choice (its configured order), not the hash's.
//!
//! A client that never comes back after its server died stays listed
//! (nobody can publish its detach); the bound `clients_max` caps that.
//!
//! Invariants: applying the same events in the same order gives the same
//! state everywhere (it depends on nothing else), and the state is bounded:
//! at most `clients_max` clients are remembered (beyond that, attaches are
//! not recorded and reported, which the node's session bound already
//! prevents).

use canopy_client::protocol::{MemberEntry, MembersHead, PublisherId, Seq, ServerEntry};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The system topic of membership events.
pub const MEMBERS_TOPIC: &str = "$canopy.members";

/// The id a core server attaches clients under: fixed by its server id and
/// incarnation, so that the coordinator of a view can name every member.
pub fn core_server_id(node: u32, incarnation: u64) -> PublisherId {
    let mut z = (u64::from(node) << 48) ^ incarnation;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    PublisherId(z ^ (z >> 31))
}

/// The system topics a relay subscribes to, besides `>`.
pub const SYSTEM_PATTERN: &str = "$canopy.>";

/// One membership event, CBOR in the payload of a message on
/// [`MEMBERS_TOPIC`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberEvent {
    /// A client attached to `entry.server` on connection `entry.session`
    /// there (so that a late detach of an older connection does not remove
    /// a newer one).
    Attach(MemberEntry),
    /// The client's connection `session` at `server` ended.
    Detach {
        /// The client.
        client: PublisherId,
        /// Its server.
        server: PublisherId,
        /// The connection that ended.
        session: u64,
    },
    /// The core's servers after a view change.
    Core {
        /// The view's epoch: an older view's event ordered late is ignored.
        epoch: u64,
        /// The view's servers.
        servers: Vec<ServerEntry>,
    },
}

impl MemberEvent {
    /// The event as a message payload.
    pub fn encode(&self) -> bytes::Bytes {
        let mut out = Vec::with_capacity(64);
        ciborium::into_writer(self, &mut out)
            .expect("invariant: membership events always serialize to memory");
        out.into()
    }

    /// Decodes a payload; `None` if it is not an event (the stream is
    /// trusted, so this is logged by the caller and skipped).
    pub fn decode(payload: &[u8]) -> Option<MemberEvent> {
        ciborium::from_reader(payload).ok()
    }
}

/// The membership state.
#[derive(Clone, Debug, Default)]
pub struct Members {
    core: Vec<ServerEntry>,
    /// The epoch of the core view `core` comes from.
    core_epoch: u64,
    clients: BTreeMap<PublisherId, MemberEntry>,
    clients_max: usize,
}

impl Members {
    /// An empty membership remembering at most `clients_max` clients.
    pub fn new(clients_max: usize) -> Self {
        Members {
            clients_max,
            ..Members::default()
        }
    }

    /// Clients known.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is known.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The core's servers.
    pub fn core(&self) -> &[ServerEntry] {
        &self.core
    }

    /// Every client (relays included), by id.
    pub fn clients(&self) -> impl Iterator<Item = &MemberEntry> {
        self.clients.values()
    }

    /// Client `id`'s entry, if it is listed.
    pub fn client(&self, id: PublisherId) -> Option<&MemberEntry> {
        self.clients.get(&id)
    }

    /// Applies `event`, ordered at `seq`, and returns the change it made
    /// (`None` when it changed nothing).
    pub fn apply(&mut self, seq: Seq, event: MemberEvent) -> Option<MembersHead> {
        let mut change = MembersHead {
            seq,
            ..MembersHead::default()
        };
        match event {
            MemberEvent::Attach(entry) => {
                if self.clients.len() >= self.clients_max && !self.clients.contains_key(&entry.id) {
                    return None;
                }
                if self
                    .clients
                    .get(&entry.id)
                    .is_some_and(|c| c.connection > entry.connection || *c == entry)
                {
                    // An older connection's attach ordered late, or one
                    // announced again: the newer one stands.
                    return None;
                }
                // A relay that moved takes nothing with it: its clients stay
                // attached to it.
                change.joined.push(entry.clone());
                self.clients.insert(entry.id, entry);
            }
            MemberEvent::Detach {
                client,
                server,
                session,
            } => {
                let current = self.clients.get(&client)?;
                if current.server != server || current.session != session {
                    // It attached again since: that connection counts.
                    return None;
                }
                self.clients.remove(&client);
                change.left.push(client);
                // A relay's clients are orphans now; they attach again at
                // their adopters.
                self.remove_served_by(&[client], &mut change.left);
            }
            MemberEvent::Core { epoch, servers } => {
                if epoch < self.core_epoch {
                    return None;
                }
                self.core_epoch = epoch;
                let gone: Vec<PublisherId> = self
                    .core
                    .iter()
                    .filter(|s| !servers.iter().any(|n| n.id == s.id))
                    .map(|s| s.id)
                    .collect();
                self.remove_served_by(&gone, &mut change.left);
                if servers != self.core {
                    self.core = servers.clone();
                    change.core = Some(servers);
                }
            }
        }
        let changed = change.core.is_some() || !change.joined.is_empty() || !change.left.is_empty();
        changed.then_some(change)
    }

    fn remove_served_by(&mut self, servers: &[PublisherId], left: &mut Vec<PublisherId>) {
        if servers.is_empty() {
            return;
        }
        let before = left.len();
        self.clients.retain(|id, c| {
            let keep = !servers.contains(&c.server);
            if !keep {
                left.push(*id);
            }
            keep
        });
        left[before..].sort_unstable();
    }

    /// The whole state as a complete report at `seq`.
    pub fn report(&self, seq: Seq) -> MembersHead {
        MembersHead {
            seq,
            complete: true,
            core: Some(self.core.clone()),
            joined: self.clients.values().cloned().collect(),
            left: Vec::new(),
        }
    }

    /// Replaces the state with a complete report's (a relay's first one
    /// from the tier above, or a core server's catch-up snapshot).
    pub fn install(&mut self, report: MembersHead) {
        self.core = report.core.unwrap_or_default();
        self.clients = report
            .joined
            .into_iter()
            .take(self.clients_max)
            .map(|e| (e.id, e))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(id: u64, server: u64, relay: bool, session: u64) -> MemberEvent {
        MemberEvent::Attach(MemberEntry {
            id: PublisherId(id),
            name: format!("c{id}"),
            server: PublisherId(server),
            relay,
            session,
            // The client's connections count up with its sessions here.
            connection: session,
        })
    }

    fn core(ids: &[u64]) -> MemberEvent {
        core_at(1, ids)
    }

    fn core_at(epoch: u64, ids: &[u64]) -> MemberEvent {
        MemberEvent::Core {
            epoch,
            servers: ids
                .iter()
                .map(|&i| ServerEntry {
                    id: PublisherId(i),
                    name: format!("core-{i}"),
                    addr: String::new(),
                })
                .collect(),
        }
    }

    fn ids(m: &Members) -> Vec<u64> {
        m.clients.keys().map(|k| k.0).collect()
    }

    #[test]
    fn a_late_detach_of_an_older_connection_keeps_the_newer_one() {
        let mut m = Members::new(100);
        m.apply(Seq(1), attach(7, 1, false, 10));
        m.apply(Seq(2), attach(7, 1, false, 11));
        let stale = MemberEvent::Detach {
            client: PublisherId(7),
            server: PublisherId(1),
            session: 10,
        };
        assert_eq!(m.apply(Seq(3), stale), None);
        assert_eq!(ids(&m), [7]);
    }

    #[test]
    fn an_older_connection_or_view_ordered_late_changes_nothing() {
        let mut m = Members::new(100);
        m.apply(Seq(1), core_at(5, &[1, 2]));
        m.apply(Seq(2), attach(7, 2, false, 3));
        // The client's earlier connection, at server 1, announced late.
        assert_eq!(m.apply(Seq(3), attach(7, 1, false, 2)), None);
        assert_eq!(m.clients[&PublisherId(7)].server, PublisherId(2));
        // An older view's server list, ordered after a newer one's.
        assert_eq!(m.apply(Seq(4), core_at(4, &[1])), None);
        assert_eq!(m.core().len(), 2);
        // Announced again unchanged: no change to report.
        assert_eq!(m.apply(Seq(5), attach(7, 2, false, 3)), None);
    }

    #[test]
    fn clients_leave_with_their_core_server_and_their_relay() {
        let mut m = Members::new(100);
        m.apply(Seq(1), core(&[1, 2]));
        m.apply(Seq(2), attach(10, 1, false, 1));
        m.apply(Seq(3), attach(20, 2, true, 1)); // a relay on server 2
        m.apply(Seq(4), attach(21, 20, false, 1)); // its client
        let change = m.apply(Seq(5), core(&[2])).expect("a change");
        assert_eq!(change.left, [PublisherId(10)]);
        assert_eq!(ids(&m), [20, 21]);
        let relay_gone = MemberEvent::Detach {
            client: PublisherId(20),
            server: PublisherId(2),
            session: 1,
        };
        let change = m.apply(Seq(6), relay_gone).expect("a change");
        assert_eq!(change.left, [PublisherId(20), PublisherId(21)]);
        assert!(m.is_empty());
    }

    #[test]
    fn the_same_events_give_the_same_reports() {
        let events = [core(&[1]), attach(3, 1, false, 1), attach(2, 1, true, 2)];
        let (mut a, mut b) = (Members::new(10), Members::new(10));
        for (i, e) in events.iter().enumerate() {
            let seq = Seq(i as u64 + 1);
            assert_eq!(a.apply(seq, e.clone()), b.apply(seq, e.clone()));
        }
        assert_eq!(a.report(Seq(3)), b.report(Seq(3)));
        let mut c = Members::new(10);
        c.install(a.report(Seq(3)));
        assert_eq!(
            c.report(Seq(3)),
            a.report(Seq(3)),
            "a report carries the state"
        );
        let decoded = MemberEvent::decode(&events[1].encode());
        assert_eq!(decoded.as_ref(), Some(&events[1]));
    }
}
