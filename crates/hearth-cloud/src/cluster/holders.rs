//! A node's short-lived copy of device directory answers (ADR 0017).
//!
//! A request for a device on another node first needs the holder's name,
//! one database read per command. The answer rarely changes: a device
//! moves only when its link ends. So a node keeps the holders it read for
//! [`TTL`] and asks the holder straight away. A copy that is out of date
//! costs one NATS round trip, never a wrong delivery: the node it names
//! answers "offline" when it does not hold the device (or NATS answers "no
//! responders" when the node is gone), and [`Cluster::request`] then
//! drops the copy, reads the directory and asks the new holder, exactly as
//! it did for a directory entry that went stale between read and ask.
//!
//! Only holders are kept, never "no link": a device that links anywhere
//! is reachable at once.
//!
//! [`Cluster::request`]: super::Cluster::request

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hearth_proto::ids::DeviceId;

use super::NodeId;

/// How long a node trusts a directory answer it read. Bounds how long a
/// node that stopped answering (rather than dying, which NATS reports at
/// once) is asked before the directory is read again.
pub const TTL: Duration = Duration::from_secs(30);
/// Most devices whose holder a node keeps: ~120 bytes each, so at most a
/// few MiB. When full, expired copies go first, then all of them.
pub const MAX_ENTRIES: usize = 32_768;

/// Device → the node the directory named for it, and when it was read.
#[derive(Default)]
pub struct Holders {
    entries: Mutex<HashMap<DeviceId, (NodeId, Instant)>>,
}

impl Holders {
    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, (NodeId, Instant)>> {
        // Single inserts, reads and removes: a panic elsewhere leaves it consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The holder read for `id` less than [`TTL`] before `now`.
    pub fn get(&self, id: &DeviceId, now: Instant) -> Option<NodeId> {
        let mut entries = self.lock();
        match entries.get(id) {
            Some((node, read)) if now.saturating_duration_since(*read) < TTL => Some(node.clone()),
            Some(_) => {
                entries.remove(id);
                None
            }
            None => None,
        }
    }

    /// Records what the directory said of `id` at `now`: a holder is kept,
    /// "no link" forgets any earlier holder.
    pub fn put(&self, id: &DeviceId, holder: Option<&NodeId>, now: Instant) {
        let mut entries = self.lock();
        let Some(node) = holder else {
            entries.remove(id);
            return;
        };
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(id) {
            entries.retain(|_, (_, read)| now.saturating_duration_since(*read) < TTL);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(id.clone(), (node.clone(), now));
    }

    /// Forgets `id`'s holder if it is still `node`: that node did not
    /// deliver to the device, so the directory is to be asked again.
    pub fn forget(&self, id: &DeviceId, node: &NodeId) {
        let mut entries = self.lock();
        if entries.get(id).is_some_and(|(held, _)| held == node) {
            entries.remove(id);
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        name.parse().unwrap()
    }

    #[test]
    fn a_holder_is_kept_for_its_ttl_and_no_link_is_never_kept() {
        let holders = Holders::default();
        let id = DeviceId::random();
        let t0 = Instant::now();
        assert_eq!(holders.get(&id, t0), None);
        holders.put(&id, Some(&node("a")), t0);
        assert_eq!(holders.get(&id, t0 + TTL - Duration::from_millis(1)), Some(node("a")));
        assert_eq!(holders.get(&id, t0 + TTL), None, "an expired copy was used");
        assert_eq!(holders.count(), 0, "an expired copy was kept");
        holders.put(&id, Some(&node("a")), t0);
        holders.put(&id, None, t0);
        assert_eq!(holders.get(&id, t0), None, "\"no link\" left the old holder");
    }

    #[test]
    fn forgetting_a_node_leaves_a_newer_holder() {
        let holders = Holders::default();
        let id = DeviceId::random();
        let t0 = Instant::now();
        holders.put(&id, Some(&node("b")), t0);
        holders.forget(&id, &node("a"));
        assert_eq!(holders.get(&id, t0), Some(node("b")));
        holders.forget(&id, &node("b"));
        assert_eq!(holders.get(&id, t0), None);
    }

    #[test]
    fn a_full_copy_drops_expired_entries_first_and_never_grows_past_its_bound() {
        let holders = Holders::default();
        let t0 = Instant::now();
        let old: Vec<DeviceId> = (0..MAX_ENTRIES / 2).map(|_| DeviceId::random()).collect();
        for id in &old {
            holders.put(id, Some(&node("a")), t0);
        }
        let later = t0 + TTL;
        let fresh: Vec<DeviceId> = (0..MAX_ENTRIES / 2).map(|_| DeviceId::random()).collect();
        for id in &fresh {
            holders.put(id, Some(&node("b")), later);
        }
        assert_eq!(holders.count(), MAX_ENTRIES);
        let one_more = DeviceId::random();
        holders.put(&one_more, Some(&node("c")), later);
        assert_eq!(holders.count(), MAX_ENTRIES / 2 + 1, "the expired half should have gone");
        assert_eq!(holders.get(&fresh[0], later), Some(node("b")));
        // All fresh: the copy starts over rather than growing.
        for _ in 0..MAX_ENTRIES {
            holders.put(&DeviceId::random(), Some(&node("d")), later);
        }
        assert!(holders.count() <= MAX_ENTRIES);
    }
}
