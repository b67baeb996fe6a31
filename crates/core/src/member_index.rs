//! [`MemberIndex`]: a service writer's id → position map over its member
//! list, holding positions only.
//!
//! ## Why not `HashMap<InstanceId, usize>`
//!
//! That map keeps a copy of every id (a 16-byte `Arc<str>` pointer) and an
//! 8-byte position: 24 bytes a bucket, 33 bytes per instance at 100,000
//! (131,072 buckets for 100,000 ids at ≤ 7/8 load, plus a control byte each).
//! The ids are already in the member list, so the table keeps the `u32`
//! position alone — 5 bytes a bucket, about 6.5 per instance — and a lookup
//! compares the id it is given with the id of the member at the candidate
//! position. That reads a member per probe (a cache miss at 100,000), which
//! only the writer pays: registrations, removals, drains and `Service::member`
//! lookups, never a pick.
//!
//! ## Rule
//!
//! Every call takes the member list the positions refer to, and the index
//! must agree with it at every call: an id is inserted after its member is
//! pushed, removed before its member is, and a member moved by a
//! swap-remove is re-pointed with [`MemberIndex::moved`] (found by its old
//! position, not its id). Hashes come from std's `RandomState` (SipHash
//! with a per-process key), as `HashMap`'s do, because ids arrive from
//! outside (config, admin API, etcd).
//!
//! A position is a `u32`: a member is a few hundred bytes, so 2³² of them
//! cannot be allocated.

use std::fmt;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use crate::members::Members;

/// Id → position in a [`Members`] list; see the module doc.
#[derive(Default)]
pub(crate) struct MemberIndex {
    table: HashTable<u32>,
    hasher: RandomState,
}

impl fmt::Debug for MemberIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberIndex")
            .field("len", &self.table.len())
            .finish()
    }
}

/// The id of the member at `pos`, if there is one.
fn id_at(members: &Members, pos: u32) -> Option<&str> {
    let pos = usize::try_from(pos).ok()?;
    Some(members.get(pos)?.instance().id().as_str())
}

impl MemberIndex {
    fn hash(hasher: &RandomState, id: &str) -> u64 {
        hasher.hash_one(id)
    }

    /// The position of `id` in `members`.
    pub(crate) fn get(&self, members: &Members, id: &str) -> Option<usize> {
        let hash = Self::hash(&self.hasher, id);
        let pos = *self
            .table
            .find(hash, |&pos| id_at(members, pos) == Some(id))?;
        usize::try_from(pos).ok()
    }

    /// Records that `id`, not in the index, is at `pos` of `members` (its
    /// member already pushed there).
    pub(crate) fn insert(&mut self, members: &Members, id: &str, pos: usize) {
        let Ok(pos) = u32::try_from(pos) else {
            return; // unreachable: see the module doc
        };
        let Self { table, hasher } = self;
        let hash = Self::hash(hasher, id);
        table.insert_unique(hash, pos, |&p| {
            Self::hash(hasher, id_at(members, p).unwrap_or_default())
        });
    }

    /// Forgets `id` (its member still in `members`); its position, if it
    /// was there.
    pub(crate) fn remove(&mut self, members: &Members, id: &str) -> Option<usize> {
        let hash = Self::hash(&self.hasher, id);
        let entry = self
            .table
            .find_entry(hash, |&pos| id_at(members, pos) == Some(id))
            .ok()?;
        let (pos, _) = entry.remove();
        usize::try_from(pos).ok()
    }

    /// Re-points `id`, which a swap-remove moved from position `from` to
    /// `to`.
    pub(crate) fn moved(&mut self, id: &str, from: usize, to: usize) {
        let (Ok(from), Ok(to)) = (u32::try_from(from), u32::try_from(to)) else {
            return;
        };
        let hash = Self::hash(&self.hasher, id);
        if let Some(pos) = self.table.find_mut(hash, |&pos| pos == from) {
            *pos = to;
        }
    }

    /// Number of ids.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::Timestamp;
    use crate::instance::{InstanceLive, Member, ServiceInstance, Weight};

    fn member(id: &str) -> Arc<Member> {
        let inst = ServiceInstance::try_new(id, "h", 1).unwrap();
        Arc::new(Member::new(
            inst,
            Arc::new(InstanceLive::new(
                &Default::default(),
                Timestamp::default(),
                false,
                Weight::DEFAULT,
            )),
        ))
    }

    /// The index follows pushes and swap-removes as a `HashMap` would.
    #[test]
    fn positions_follow_pushes_and_swap_removes() {
        let mut members = Members::default();
        let mut index = MemberIndex::default();
        let mut model: std::collections::HashMap<String, usize> = Default::default();
        let mut ids: Vec<String> = Vec::new();
        let mut rng = fastrand::Rng::with_seed(11);
        for step in 0..5_000 {
            if ids.is_empty() || rng.u8(..) < 160 {
                let id = format!("m{step}");
                let pos = members.push(member(&id));
                index.insert(&members, &id, pos);
                model.insert(id.clone(), pos);
                ids.push(id);
            } else {
                let id = ids.swap_remove(rng.usize(..ids.len()));
                let pos = index.remove(&members, &id).unwrap();
                assert_eq!(Some(pos), model.remove(&id));
                members.swap_remove(pos).unwrap();
                if let Some(moved) = members.get(pos) {
                    let moved = moved.instance().id().as_str().to_owned();
                    index.moved(&moved, members.len(), pos);
                    model.insert(moved, pos);
                }
            }
            assert_eq!(index.len(), model.len());
        }
        for (id, &pos) in &model {
            assert_eq!(index.get(&members, id), Some(pos), "{id}");
            assert_eq!(members.get(pos).unwrap().instance().id().as_str(), id);
        }
        assert_eq!(index.get(&members, "m-none"), None);
        assert_eq!(index.remove(&members, "m-none"), None);
    }
}
