//! The wills the service holds and what happens to them, without I/O.
//!
//! A will is registered through a link to `$lwt` (an MQTT gateway's, for
//! many clients, or an AMQP client's own) and is *owned* by that link: by
//! its [`Owner`] (space, container, link name — the same when the link is
//! attached again) and the instance of the attach that last registered it.
//! What ends the link decides the will's fate ([`Ending`]):
//!
//! - the client's connection lost (the router says so): the link's wills
//!   are due after their delay;
//! - an AMQP client's graceful detach or close: its will is deleted;
//! - anything else (the path through the mesh broke, a gateway detached,
//!   the service restarted): the wills are *orphans* for the grace period.
//!   A gateway registers its live clients again when its link is back and
//!   then says `synced`: an orphan it did not claim belongs to a client
//!   lost meanwhile and is due. A gateway's orphans still unclaimed when
//!   the grace ends are due; an AMQP client's are deleted (the client may
//!   be alive: it was told its link broke, and registers again).
//!
//! A registration for a client replaces its will wherever it was
//! registered (a takeover on another gateway), and cancels a will that
//! was due and had not gone yet (the client came back within the delay).
//! A due will is taken out (and deleted on disk) before it is published:
//! at most once.

use std::collections::{BTreeSet, HashMap, HashSet};

use bytes::Bytes;

/// Who may register a will through a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An MQTT gateway: its clients' wills, by client id.
    Gateway,
    /// An AMQP client: its own will, the last message it sent.
    Amqp,
}

/// A link at the service, as stable across attaches as the client makes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub space: String,
    pub container: String,
    pub link_name: String,
}

/// A will's key: its space and its client (an MQTT client id; for an
/// AMQP client, its container and link name).
pub type Key = (String, String);

/// What the service keeps of a will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub kind: Kind,
    /// Names this registration (cancel and fire name it).
    pub reg: String,
    pub owner: Owner,
    /// The attach that last registered it (not kept on disk).
    pub instance: u64,
    /// The user it is published as (its authorization applies).
    pub user: Option<String>,
    /// A token user's claims (JSON): its rules are what the space maps
    /// them to when the will goes.
    pub claims: Option<String>,
    /// Where it goes.
    pub to: String,
    pub qos: u8,
    pub retain: bool,
    /// Seconds between the loss and the publication.
    pub delay: u32,
    /// The message published.
    pub message: Bytes,
    pub state: State,
}

/// Where a will stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Its client is connected.
    Live,
    /// Its link ended without saying how its client fares: the owner may
    /// claim it until `until` (ms); `lost` is when the link ended.
    Orphan { until: u64, lost: u64 },
    /// Published at `at` (ms) unless the client registers again first.
    Due { at: u64 },
}

/// How a link ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client detached, or closed its connection, itself.
    Graceful,
    /// The client's connection ended without its Close.
    Lost,
    /// Something between the client and the service ended it.
    Broken,
}

/// A change the disk must hold before the service acknowledges what
/// caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Key, Box<Will>),
    Delete(Key),
}

/// Counters for `stat` and metrics, per space.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub registered: u64,
    pub cancelled: u64,
    pub fired_lost: u64,
    pub fired_gateway: u64,
    pub fired_asked: u64,
    pub dropped_orphans: u64,
}

/// Every will the service holds, indexed by deadline (for the timer) and
/// by owner (for a link's end), so that neither looks at every will.
#[derive(Debug)]
pub struct Wills {
    map: HashMap<Key, Will>,
    /// (deadline ms, will) for every orphan and due will.
    timers: BTreeSet<(u64, Key)>,
    /// The wills each link registered.
    by_owner: HashMap<Owner, HashSet<Key>>,
    /// How long an orphan may be claimed (ms).
    grace_ms: u64,
    pub counts: HashMap<String, Counts>,
}

/// When a will in state `s` next needs the timer.
fn deadline(s: State) -> Option<u64> {
    match s {
        State::Live => None,
        State::Orphan { until, .. } => Some(until),
        State::Due { at } => Some(at),
    }
}

/// When a will lost at `lost` (ms) with `delay` (s) goes, not before `now`.
fn due_at(lost: u64, delay: u32, now: u64) -> State {
    State::Due {
        at: (lost + u64::from(delay) * 1000).max(now),
    }
}

impl Wills {
    /// What the disk held: every will that was not due becomes an orphan
    /// (the service does not know how its client fared while it was away).
    pub fn recovered(wills: Vec<(Key, Will)>, grace_ms: u64, now: u64) -> Wills {
        let mut all = Wills {
            map: HashMap::new(),
            timers: BTreeSet::new(),
            by_owner: HashMap::new(),
            grace_ms,
            counts: HashMap::new(),
        };
        for (k, mut w) in wills {
            if w.state == State::Live {
                w.state = all.orphan(now);
            }
            all.put(k, w);
        }
        all
    }

    fn orphan(&self, now: u64) -> State {
        State::Orphan {
            until: now + self.grace_ms,
            lost: now,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Will)> {
        self.map.iter()
    }

    fn count(&mut self, space: &str) -> &mut Counts {
        if !self.counts.contains_key(space) {
            self.counts.insert(space.to_string(), Counts::default());
        }
        self.counts.get_mut(space).expect("inserted above")
    }

    /// Adds or replaces a will, keeping the indexes.
    fn put(&mut self, k: Key, w: Will) {
        self.take(&k);
        if let Some(t) = deadline(w.state) {
            self.timers.insert((t, k.clone()));
        }
        self.by_owner
            .entry(w.owner.clone())
            .or_default()
            .insert(k.clone());
        self.map.insert(k, w);
    }

    /// Removes a will, keeping the indexes.
    fn take(&mut self, k: &Key) -> Option<Will> {
        let w = self.map.remove(k)?;
        if let Some(t) = deadline(w.state) {
            self.timers.remove(&(t, k.clone()));
        }
        if let Some(keys) = self.by_owner.get_mut(&w.owner) {
            keys.remove(k);
            if keys.is_empty() {
                self.by_owner.remove(&w.owner);
            }
        }
        Some(w)
    }

    /// Moves a will to `state`, keeping the timer index; returns it.
    fn set_state(&mut self, k: &Key, state: State) -> Option<&Will> {
        let w = self.map.get_mut(k)?;
        if let Some(t) = deadline(w.state) {
            self.timers.remove(&(t, k.clone()));
        }
        w.state = state;
        if let Some(t) = deadline(state) {
            self.timers.insert((t, k.clone()));
        }
        self.map.get(k)
    }

    /// The wills `owner` registered.
    fn owned_by(&self, owner: &Owner) -> Vec<Key> {
        self.by_owner
            .get(owner)
            .map(|keys| keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// A will registered: it replaces the client's will, live or due.
    pub fn register(&mut self, key: Key, will: Will) -> Change {
        self.count(&key.0).registered += 1;
        self.put(key.clone(), will.clone());
        Change::Put(key, Box::new(will))
    }

    /// A graceful disconnect: the will of registration `reg` is deleted.
    pub fn cancel(&mut self, key: &Key, reg: &str) -> Option<Change> {
        if self.map.get(key).is_none_or(|w| w.reg != reg) {
            return None;
        }
        self.take(key);
        self.count(&key.0).cancelled += 1;
        Some(Change::Delete(key.clone()))
    }

    /// The client connected again without a will: a will of an earlier
    /// connection that is not live (due, or orphaned) is not published.
    pub fn reconnected(&mut self, key: &Key) -> Option<Change> {
        if self.map.get(key).is_none_or(|w| w.state == State::Live) {
            return None;
        }
        self.take(key);
        self.count(&key.0).cancelled += 1;
        Some(Change::Delete(key.clone()))
    }

    /// The client's connection was lost (its gateway says so), or it
    /// asked for its will: due after its delay.
    pub fn fire(&mut self, key: &Key, reg: &str, now: u64, asked: bool) -> Option<Change> {
        let w = self.map.get(key).filter(|w| w.reg == reg)?;
        if matches!(w.state, State::Due { .. }) {
            return None;
        }
        let w = self.set_state(key, due_at(now, w.delay, now))?.clone();
        let c = self.count(&key.0);
        if asked {
            c.fired_asked += 1;
        } else {
            c.fired_lost += 1;
        }
        Some(Change::Put(key.clone(), Box::new(w)))
    }

    /// The link `owner` (attach `instance`) ended as `how`.
    pub fn link_ended(
        &mut self,
        owner: &Owner,
        instance: u64,
        how: Ending,
        now: u64,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for k in self.owned_by(owner) {
            let Some(w) = self
                .map
                .get(&k)
                .filter(|w| w.instance == instance && w.state == State::Live)
            else {
                continue;
            };
            match (how, w.kind) {
                (Ending::Graceful, Kind::Amqp) => {
                    self.take(&k);
                    self.count(&k.0).cancelled += 1;
                    changes.push(Change::Delete(k));
                }
                (Ending::Lost, _) => {
                    let state = due_at(now, w.delay, now);
                    if let Some(w) = self.set_state(&k, state) {
                        changes.push(Change::Put(k.clone(), Box::new(w.clone())));
                    }
                    self.count(&k.0).fired_lost += 1;
                }
                _ => {
                    // Kept on disk as it was: after a restart every will
                    // is an orphan anyway.
                    self.set_state(&k, self.orphan(now));
                }
            }
        }
        changes
    }

    /// Every link ended at once (the service's connection to its router).
    pub fn all_links_ended(&mut self, now: u64) {
        let live: Vec<Key> = self
            .map
            .iter()
            .filter(|(_, w)| w.state == State::Live)
            .map(|(k, _)| k.clone())
            .collect();
        for k in live {
            self.set_state(&k, self.orphan(now));
        }
    }

    /// The gateway's link `owner` (attach `instance`) has registered every
    /// live client again: what it held before and did not claim is due.
    pub fn synced(&mut self, owner: &Owner, instance: u64, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        for k in self.owned_by(owner) {
            let Some(w) = self.map.get(&k).filter(|w| {
                w.kind == Kind::Gateway
                    && w.instance != instance
                    && !matches!(w.state, State::Due { .. })
            }) else {
                continue;
            };
            let lost = match w.state {
                State::Orphan { lost, .. } => lost,
                _ => now,
            };
            let state = due_at(lost, w.delay, now);
            if let Some(w) = self.set_state(&k, state) {
                changes.push(Change::Put(k.clone(), Box::new(w.clone())));
            }
            self.count(&k.0).fired_gateway += 1;
        }
        changes
    }

    /// The next time [`Wills::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Time passed: unclaimed orphans are due (a gateway's) or dropped
    /// (an AMQP client's); due wills are taken out, to be published once
    /// their deletion is on disk.
    pub fn tick(&mut self, now: u64) -> (Vec<Change>, Vec<(Key, Will)>) {
        let mut changes = Vec::new();
        let mut out = Vec::new();
        while let Some((t, k)) = self.timers.first().cloned() {
            if t > now {
                break;
            }
            let Some(w) = self.map.get(&k) else {
                self.timers.remove(&(t, k));
                continue;
            };
            match (w.state, w.kind) {
                (State::Orphan { lost, .. }, Kind::Gateway) => {
                    let state = due_at(lost, w.delay, now);
                    self.set_state(&k, state);
                    self.count(&k.0).fired_gateway += 1;
                }
                (State::Orphan { .. }, Kind::Amqp) => {
                    self.take(&k);
                    self.count(&k.0).dropped_orphans += 1;
                    changes.push(Change::Delete(k));
                }
                _ => {
                    if let Some(w) = self.take(&k) {
                        changes.push(Change::Delete(k.clone()));
                        out.push((k, w));
                    }
                }
            }
        }
        (changes, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: u64 = 10_000;

    fn owner(link: &str) -> Owner {
        Owner {
            space: "s".into(),
            container: "gw".into(),
            link_name: link.into(),
        }
    }

    fn will(kind: Kind, reg: &str, link: &str, instance: u64, delay: u32) -> Will {
        Will {
            kind,
            reg: reg.into(),
            owner: owner(link),
            instance,
            user: None,
            claims: None,
            to: "status".into(),
            qos: 1,
            retain: false,
            delay,
            message: Bytes::from_static(b"m"),
            state: State::Live,
        }
    }

    fn key(c: &str) -> Key {
        ("s".into(), c.into())
    }

    fn published(w: &mut Wills, now: u64) -> Vec<String> {
        let mut v: Vec<String> = w.tick(now).1.into_iter().map(|(k, _)| k.1).collect();
        v.sort();
        v
    }

    #[test]
    fn a_lost_connection_publishes_after_the_delay_once() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("c1"), will(Kind::Gateway, "r1", "l", 1, 2));
        assert!(w.fire(&key("c1"), "r1", 1000, false).is_some());
        assert!(published(&mut w, 2999).is_empty(), "the delay holds it");
        assert_eq!(published(&mut w, 3000), ["c1"]);
        assert!(published(&mut w, 9000).is_empty(), "once");
    }

    #[test]
    fn coming_back_within_the_delay_cancels_the_will() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("c1"), will(Kind::Gateway, "r1", "l", 1, 5));
        w.fire(&key("c1"), "r1", 0, false);
        w.register(key("c1"), will(Kind::Gateway, "r2", "other", 7, 5));
        assert!(published(&mut w, 60_000).is_empty());
        assert!(
            w.fire(&key("c1"), "r1", 0, false).is_none(),
            "the old registration names nothing any more"
        );
    }

    #[test]
    fn connecting_again_without_a_will_cancels_one_waiting_its_delay() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("c1"), will(Kind::Gateway, "r1", "l", 1, 5));
        assert!(w.reconnected(&key("c1")).is_none(), "a live will stays");
        w.fire(&key("c1"), "r1", 0, false);
        assert!(w.reconnected(&key("c1")).is_some());
        assert!(published(&mut w, 60_000).is_empty());
    }

    #[test]
    fn a_graceful_disconnect_never_publishes() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("c1"), will(Kind::Gateway, "r1", "l", 1, 0));
        assert!(w.cancel(&key("c1"), "r2").is_none(), "another registration");
        assert!(w.cancel(&key("c1"), "r1").is_some());
        assert!(w.link_ended(&owner("l"), 1, Ending::Lost, 0).is_empty());
        assert!(published(&mut w, 60_000).is_empty());
    }

    #[test]
    fn a_gateway_lost_publishes_every_will_it_held() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("a"), will(Kind::Gateway, "ra", "l", 1, 0));
        w.register(key("b"), will(Kind::Gateway, "rb", "l", 1, 0));
        w.register(key("c"), will(Kind::Gateway, "rc", "other", 1, 0));
        assert_eq!(w.link_ended(&owner("l"), 1, Ending::Lost, 5).len(), 2);
        assert_eq!(published(&mut w, 5), ["a", "b"]);
    }

    #[test]
    fn a_broken_path_fires_only_what_the_gateway_does_not_claim() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("alive"), will(Kind::Gateway, "r1", "l", 1, 0));
        w.register(key("gone"), will(Kind::Gateway, "r2", "l", 1, 0));
        w.link_ended(&owner("l"), 1, Ending::Broken, 100);
        assert!(published(&mut w, 200).is_empty(), "orphans wait");
        // The gateway's link is back (instance 2): it claims its live client.
        w.register(key("alive"), will(Kind::Gateway, "r1", "l", 2, 0));
        w.synced(&owner("l"), 2, 300);
        assert_eq!(published(&mut w, 300), ["gone"]);
        assert!(published(&mut w, 100_000).is_empty());
    }

    #[test]
    fn a_gateway_that_never_comes_back_loses_its_orphans_after_the_grace() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("c"), will(Kind::Gateway, "r", "l", 1, 0));
        w.link_ended(&owner("l"), 1, Ending::Broken, 0);
        assert!(published(&mut w, GRACE - 1).is_empty());
        assert_eq!(published(&mut w, GRACE), ["c"]);
    }

    #[test]
    fn a_late_detach_of_an_old_attach_touches_nothing_registered_since() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("c"), will(Kind::Gateway, "r", "l", 2, 0));
        assert!(w.link_ended(&owner("l"), 1, Ending::Lost, 0).is_empty());
        assert!(published(&mut w, 100_000).is_empty());
    }

    #[test]
    fn an_amqp_will_is_deleted_by_a_graceful_end_and_kept_by_a_loss() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("x"), will(Kind::Amqp, "1", "lx", 1, 0));
        w.register(key("y"), will(Kind::Amqp, "1", "ly", 1, 0));
        w.link_ended(&owner("lx"), 1, Ending::Graceful, 0);
        w.link_ended(&owner("ly"), 1, Ending::Lost, 0);
        assert_eq!(published(&mut w, 0), ["y"]);
    }

    #[test]
    fn an_amqp_will_orphaned_by_a_broken_path_is_dropped_not_published() {
        let mut w = Wills::recovered(Vec::new(), GRACE, 0);
        w.register(key("x"), will(Kind::Amqp, "1", "lx", 1, 0));
        w.link_ended(&owner("lx"), 1, Ending::Broken, 0);
        assert!(published(&mut w, GRACE).is_empty());
        assert!(w.is_empty());
    }

    #[test]
    fn after_a_restart_live_wills_are_orphans_and_due_ones_keep_their_time() {
        let mut live = will(Kind::Gateway, "r", "l", 0, 0);
        live.state = State::Live;
        let mut due = will(Kind::Gateway, "r", "l", 0, 0);
        due.state = State::Due { at: 50_000 };
        let mut w = Wills::recovered(vec![(key("live"), live), (key("due"), due)], GRACE, 1000);
        assert!(published(&mut w, 1000).is_empty());
        assert_eq!(published(&mut w, 1000 + GRACE), ["live"]);
        assert_eq!(published(&mut w, 50_000), ["due"]);
    }
}
