//! Who executes a call (or a share of one) in a view, and handing the
//! shell the jobs that are this replica's (see the module docs of
//! [`super`]).

use super::wire::Pending;
use super::*;

impl Rrpc {
    /// The member that executes `p` (or its share `rank`) in this view.
    pub(super) fn executor(&self, p: &Pending, rank: u32, members: &[Member]) -> Option<NodeId> {
        if members.is_empty() {
            return None;
        }
        let n = members.len() as u64;
        let i = match p.mode? {
            Mode::Active => return None,
            Mode::PrimaryBackup => 0,
            Mode::LoadBalanced => {
                return p.executor.filter(|e| members.iter().any(|m| m.node == *e))
            }
            Mode::Parallel => u64::from(rank) % n,
        };
        members.get(usize::try_from(i).ok()?).map(|m| m.node)
    }

    /// Assigns load-balanced call `i`, if it has no outcome and no member
    /// of the view as its executor, to the member with the fewest such
    /// calls (ties: from a hash of the call id on, so that they spread).
    /// Every replica assigns the same way: the counts come from the
    /// stream, and views take effect at the same positions.
    pub(super) fn assign(&mut self, i: usize) {
        let Some(p) = self.queue.get(i) else {
            return;
        };
        let unassigned = p.mode == Some(Mode::LoadBalanced)
            && p.outcome.is_none()
            && !p
                .executor
                .is_some_and(|e| self.members.iter().any(|m| m.node == e));
        if !unassigned || self.members.is_empty() {
            return;
        }
        let n = self.members.len();
        let from = usize::try_from(spread(p.id) % n as u64).unwrap_or(0);
        let load = |m: &NodeId| self.load.get(m).copied().unwrap_or(0);
        let Some(&chosen) = (0..n)
            .map(|k| &self.members[(from + k) % n].node)
            .min_by_key(|m| load(m))
        else {
            return;
        };
        let old = self.queue[i].executor.replace(chosen);
        if let Some(n) = old.and_then(|e| self.load.get_mut(&e)) {
            *n = n.saturating_sub(1);
        }
        *self.load.entry(chosen).or_default() += 1;
    }

    /// How many shares parallel call `p` is split into: as the first share
    /// ordered says, or before one is, as this replica's view says.
    pub(super) fn shares_of(&self, p: &Pending) -> u32 {
        p.of.unwrap_or_else(|| u32::try_from(self.members.len().max(1)).unwrap_or(SHARES_MAX))
    }

    /// Hands out the jobs of queued call `i` that are this replica's now.
    pub(super) fn dispatch(&mut self, i: usize) {
        if !self.primary {
            return;
        }
        let Some(p) = self.queue.get(i) else {
            return;
        };
        if p.replies != Replies::Own {
            return;
        }
        let missing: Vec<u32> = match p.mode {
            None | Some(Mode::Active) => return,
            // Once every earlier call is applied: its state is exact.
            Some(Mode::PrimaryBackup) if i > 0 => return,
            Some(Mode::PrimaryBackup | Mode::LoadBalanced) if p.outcome.is_some() => return,
            Some(Mode::PrimaryBackup | Mode::LoadBalanced) => vec![0],
            Some(Mode::Parallel) => (0..self.shares_of(p))
                .filter(|r| !p.shares.contains_key(r))
                .collect(),
        };
        let of = self.shares_of(p);
        for rank in missing {
            if self.executor(p, rank, &self.members) != Some(self.me)
                || !self.running.insert((p.id, rank))
            {
                continue;
            }
            let share = (p.mode == Some(Mode::Parallel)).then_some(Share { rank, of });
            self.jobs.push_back(p.job(share));
        }
    }

    pub(super) fn dispatch_all(&mut self) {
        for i in 0..self.queue.len() {
            self.dispatch(i);
        }
    }

    /// Counts what a view change moved to another executor.
    pub(super) fn count_reassigned(&mut self, old: &[Member]) {
        let mut moved: Vec<Arc<str>> = Vec::new();
        for p in &self.queue {
            let ranks: Vec<u32> = match p.mode {
                Some(Mode::PrimaryBackup | Mode::LoadBalanced) if p.outcome.is_none() => vec![0],
                Some(Mode::Parallel) => (0..self.shares_of(p))
                    .filter(|r| !p.shares.contains_key(r))
                    .collect(),
                _ => continue,
            };
            for rank in ranks {
                if self.executor(p, rank, old) != self.executor(p, rank, &self.members) {
                    moved.push(p.method.clone());
                }
            }
        }
        for method in moved {
            self.stat(&method).reassigned += 1;
        }
    }
}

/// Spreads call ids evenly over the members (where load-balanced
/// assignment starts looking, so that ties spread).
fn spread(id: CallId) -> u64 {
    let mut z = id.publisher.0 ^ id.pub_seq.0.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
