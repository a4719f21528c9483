//! The control plane's store: every resource as JSON, and the log of
//! changes the watch stream replays, in one redb database in the data
//! directory.
//!
//! redb rather than SQLite: it is pure Rust (no C library to build on 2
//! cores), its write transactions are ACID with one fsync per commit, and a
//! key-value map ordered by key is all this needs: `KIND/SPACE/NAME` keys
//! list a space's addresses by prefix, and the change log is keyed by
//! resource version.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde_json::Value;
use tokio::sync::broadcast;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The newest resource version.
const RV: &str = "resource-version";
/// Changes kept for watchers that resume; older ones must list again.
const KEEP_EVENTS: u64 = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{key} was changed (resourceVersion {current}, not {given}): read it again")]
    Conflict {
        key: String,
        current: String,
        given: String,
    },
    #[error("the change log no longer reaches back to resourceVersion {0}: list again")]
    Gone(u64),
    #[error("store: {0}")]
    Db(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

/// One change, as the watch stream sends it.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    pub object: Value,
}

impl Change {
    /// The change as one line of the watch stream.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::json!({"type": self.kind, "object": self.object}).to_string();
        s.push('\n');
        s
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"type": self.kind, "object": self.object}))
            .unwrap_or_default()
    }

    fn decode(rv: u64, b: &[u8]) -> Option<Change> {
        let v: Value = serde_json::from_slice(b).ok()?;
        let kind = match v["type"].as_str()? {
            "ADDED" => "ADDED",
            "MODIFIED" => "MODIFIED",
            _ => "DELETED",
        };
        Some(Change {
            rv,
            kind,
            object: v["object"].clone(),
        })
    }
}

/// What a write expects of the object already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: create.
    Absent,
    /// Anything (create or replace), or exactly this resource version.
    Any(Option<u64>),
}

/// The store the API's handlers share: the embedded one (redb, in the
/// data directory), or on Kubernetes the namespace's custom resources
/// ([`crate::kube_store`]).
#[derive(Clone)]
pub struct Store(Backend);

#[derive(Clone)]
enum Backend {
    Embedded(Embedded),
    Kubernetes(Arc<crate::kube_store::KubeStore>),
}

impl Store {
    /// Opens (or creates) the embedded store at `path`.
    ///
    /// # Errors
    /// The database cannot be opened or is damaged.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store(Backend::Embedded(Embedded::open(path)?)))
    }

    /// The store on Kubernetes.
    pub fn kubernetes(k: Arc<crate::kube_store::KubeStore>) -> Store {
        Store(Backend::Kubernetes(k))
    }

    /// Follows changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        match &self.0 {
            Backend::Embedded(e) => e.subscribe(),
            Backend::Kubernetes(k) => k.subscribe(),
        }
    }

    /// The objects at `keys`, in order (`None` where there is none).
    ///
    /// # Errors
    /// The database failed.
    pub fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Value>>, StoreError> {
        match &self.0 {
            Backend::Embedded(e) => e.get_many(keys),
            Backend::Kubernetes(k) => Ok(keys.iter().map(|key| k.get(key)).collect()),
        }
    }

    /// The store's resource version (that of its last change).
    ///
    /// # Errors
    /// The database failed.
    pub fn resource_version(&self) -> Result<u64, StoreError> {
        match &self.0 {
            Backend::Embedded(e) => e.resource_version(),
            Backend::Kubernetes(k) => Ok(k.resource_version()),
        }
    }

    /// # Errors
    /// The database failed.
    pub fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        match &self.0 {
            Backend::Embedded(e) => e.get(key),
            Backend::Kubernetes(k) => Ok(k.get(key)),
        }
    }

    /// Objects whose keys start with `prefix`, after `after`, at most
    /// `limit`, and the store's resource version.
    ///
    /// # Errors
    /// The database failed.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(u64, Vec<(String, Value)>), StoreError> {
        self.list_where(prefix, after, limit, |_| true)
    }

    /// [`Store::list`] of the objects `keep` keeps.
    ///
    /// # Errors
    /// The database failed.
    pub fn list_where(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<(u64, Vec<(String, Value)>), StoreError> {
        match &self.0 {
            Backend::Embedded(e) => e.list_where(prefix, after, limit, keep),
            Backend::Kubernetes(k) => Ok(k.list_where(prefix, after, limit, keep)),
        }
    }

    /// Writes `object` at `key` as `expect` allows; returns it as stored.
    /// (On Kubernetes it waits for the API server: call it where blocking
    /// is allowed.)
    ///
    /// # Errors
    /// `Exists`, `NotFound`, `Conflict` as `expect` says, or the store failed.
    pub fn put(&self, key: &str, object: Value, expect: Expect) -> Result<Value, StoreError> {
        match &self.0 {
            Backend::Embedded(e) => e.put(key, object, expect),
            Backend::Kubernetes(k) => k.put(key, object, expect),
        }
    }

    /// Deletes `keys[0]` and the others with it; returns the first.
    ///
    /// # Errors
    /// `NotFound` if the first is not there, or the store failed.
    pub fn delete(&self, keys: &[String]) -> Result<Value, StoreError> {
        match &self.0 {
            Backend::Embedded(e) => e.delete(keys),
            Backend::Kubernetes(k) => k.delete(keys),
        }
    }

    /// The changes after resource version `rv`, and the store's.
    ///
    /// # Errors
    /// `Gone` if the log no longer reaches back that far.
    pub fn changes_since(&self, rv: u64) -> Result<(u64, Vec<Change>), StoreError> {
        match &self.0 {
            Backend::Embedded(e) => e.changes_since(rv),
            Backend::Kubernetes(k) => k.changes_since(rv),
        }
    }

    /// Number of objects whose keys start with `prefix`.
    ///
    /// # Errors
    /// The database failed.
    pub fn count(&self, prefix: &str) -> Result<usize, StoreError> {
        match &self.0 {
            Backend::Embedded(e) => e.count(prefix),
            Backend::Kubernetes(k) => Ok(k.count(prefix)),
        }
    }
}

/// The embedded store: objects and the change log in one redb file.
#[derive(Clone)]
struct Embedded {
    db: Arc<Database>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Objects per kind (`Address/`) and per kind and space
    /// (`Address/SPACE/`), kept as they are written: a quota check or a
    /// count costs O(1), not a scan.
    counts: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

/// The count prefixes a key falls under: `KIND/` and `KIND/SPACE/`.
fn count_prefixes(key: &str) -> impl Iterator<Item = &str> {
    key.match_indices('/').take(2).map(move |(i, _)| &key[..=i])
}

impl Embedded {
    /// Opens (or creates) the store at `path`.
    ///
    /// # Errors
    /// The database cannot be opened or is damaged.
    fn open(path: &Path) -> Result<Embedded, StoreError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            tx.open_table(OBJECTS)?;
            tx.open_table(EVENTS)?;
            let mut meta = tx.open_table(META)?;
            if meta.get(RV)?.is_none() {
                meta.insert(RV, 0)?;
            }
        }
        tx.commit()?;
        let mut counts = HashMap::new();
        {
            let tx = db.begin_read()?;
            for item in tx.open_table(OBJECTS)?.iter()? {
                let (k, _) = item?;
                for p in count_prefixes(k.value()) {
                    *counts.entry(p.to_string()).or_insert(0) += 1;
                }
            }
        }
        let (changes, _) = broadcast::channel(4096);
        Ok(Embedded {
            db: Arc::new(db),
            changes,
            counts: Arc::new(std::sync::Mutex::new(counts)),
        })
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Value>>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OBJECTS)?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(match t.get(k.as_str())? {
                Some(g) => Some(serde_json::from_slice(g.value())?),
                None => None,
            });
        }
        Ok(out)
    }

    fn resource_version(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(META)?.get(RV)?.map_or(0, |g| g.value()))
    }

    /// Counts `key` in (`by` 1) or out (`by` -1).
    fn count_key(&self, key: &str, by: isize) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for p in count_prefixes(key) {
            let n = c.entry(p.to_string()).or_insert(0);
            *n = n.saturating_add_signed(by);
        }
    }

    /// Follows changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// The object at `key`.
    ///
    /// # Errors
    /// The database failed.
    pub fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OBJECTS)?;
        let v = t.get(key)?;
        Ok(match v {
            Some(g) => Some(serde_json::from_slice(g.value())?),
            None => None,
        })
    }

    /// The objects whose keys start with `prefix`, in key order, after
    /// `after` (a key, for paging), at most `limit`; and the store's
    /// resource version.
    ///
    /// # Errors
    /// The database failed.
    pub fn list_where(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<(u64, Vec<(String, Value)>), StoreError> {
        let tx = self.db.begin_read()?;
        let rv = tx.open_table(META)?.get(RV)?.map_or(0, |g| g.value());
        let t = tx.open_table(OBJECTS)?;
        let start = after.unwrap_or(prefix);
        let mut out = Vec::new();
        for item in t.range(start..)? {
            let (k, v) = item?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            if after == Some(k) {
                continue;
            }
            if out.len() >= limit {
                break;
            }
            let v: Value = serde_json::from_slice(v.value())?;
            if keep(&v) {
                out.push((k.to_string(), v));
            }
        }
        Ok((rv, out))
    }

    /// Writes `object` at `key` as `expect` allows, stamping its
    /// `metadata.resourceVersion` (and `creationTimestamp` when new).
    /// Returns the object as stored.
    ///
    /// # Errors
    /// `Exists`, `NotFound` (`Any(Some(_))` on a missing object), `Conflict`,
    /// or the database failed.
    pub fn put(&self, key: &str, mut object: Value, expect: Expect) -> Result<Value, StoreError> {
        let tx = self.db.begin_write()?;
        let change;
        {
            let mut objects = tx.open_table(OBJECTS)?;
            let mut meta = tx.open_table(META)?;
            let old: Option<Value> = match objects.get(key)? {
                Some(g) => Some(serde_json::from_slice(g.value())?),
                None => None,
            };
            let current = old
                .as_ref()
                .and_then(|o| o["metadata"]["resourceVersion"].as_str())
                .and_then(|s| s.parse::<u64>().ok());
            match (expect, &old) {
                (Expect::Absent, Some(_)) => return Err(StoreError::Exists(key.to_string())),
                (Expect::Any(Some(_)), None) => return Err(StoreError::NotFound(key.to_string())),
                (Expect::Any(Some(given)), Some(_)) if Some(given) != current => {
                    return Err(StoreError::Conflict {
                        key: key.to_string(),
                        current: current.map(|c| c.to_string()).unwrap_or_default(),
                        given: given.to_string(),
                    })
                }
                _ => {}
            }
            let rv = meta.get(RV)?.map_or(0, |g| g.value()) + 1;
            meta.insert(RV, rv)?;
            let created = old
                .as_ref()
                .and_then(|o| o["metadata"]["creationTimestamp"].as_str())
                .map(str::to_string)
                .unwrap_or_else(flotilla_core::time::now_rfc3339);
            object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            object["metadata"]["creationTimestamp"] = Value::String(created);
            objects.insert(key, serde_json::to_vec(&object)?.as_slice())?;
            change = Change {
                rv,
                kind: if old.is_some() { "MODIFIED" } else { "ADDED" },
                object: object.clone(),
            };
            let mut events = tx.open_table(EVENTS)?;
            events.insert(rv, change.encode().as_slice())?;
            trim(&mut events, rv)?;
        }
        tx.commit()?;
        if change.kind == "ADDED" {
            self.count_key(key, 1);
        }
        let _ = self.changes.send(Arc::new(change));
        Ok(object)
    }

    /// Deletes `keys` (the first must exist; the rest, e.g. what the first
    /// owns, go with it if they do) in one transaction. Returns the first.
    ///
    /// # Errors
    /// `NotFound`, or the database failed.
    pub fn delete(&self, keys: &[String]) -> Result<Value, StoreError> {
        let tx = self.db.begin_write()?;
        let mut changes = Vec::new();
        let mut removed = Vec::new();
        let first;
        {
            let mut objects = tx.open_table(OBJECTS)?;
            let mut meta = tx.open_table(META)?;
            let mut events = tx.open_table(EVENTS)?;
            let mut rv = meta.get(RV)?.map_or(0, |g| g.value());
            let mut found = None;
            // Owned objects first: a watcher never sees an address whose
            // space is already gone.
            for (i, key) in keys.iter().enumerate().rev() {
                let old: Option<Value> = match objects.remove(key.as_str())? {
                    Some(g) => Some(serde_json::from_slice(g.value())?),
                    None => None,
                };
                let Some(mut object) = old else {
                    if i == 0 {
                        return Err(StoreError::NotFound(key.clone()));
                    }
                    continue;
                };
                rv += 1;
                removed.push(key.clone());
                object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                let change = Change {
                    rv,
                    kind: "DELETED",
                    object: object.clone(),
                };
                events.insert(rv, change.encode().as_slice())?;
                if i == 0 {
                    found = Some(object);
                }
                changes.push(change);
            }
            meta.insert(RV, rv)?;
            trim(&mut events, rv)?;
            first = found.ok_or_else(|| StoreError::NotFound(keys[0].clone()))?;
        }
        tx.commit()?;
        for k in removed {
            self.count_key(&k, -1);
        }
        for c in changes {
            let _ = self.changes.send(Arc::new(c));
        }
        Ok(first)
    }

    /// The changes after resource version `rv`, oldest first, and the
    /// store's resource version.
    ///
    /// # Errors
    /// `Gone` if the log no longer reaches back that far.
    pub fn changes_since(&self, rv: u64) -> Result<(u64, Vec<Change>), StoreError> {
        let tx = self.db.begin_read()?;
        let now = tx.open_table(META)?.get(RV)?.map_or(0, |g| g.value());
        let events = tx.open_table(EVENTS)?;
        let oldest = events.first()?.map(|(k, _)| k.value());
        if rv < now && oldest.is_none_or(|o| o > rv + 1) {
            return Err(StoreError::Gone(rv));
        }
        let mut out = Vec::new();
        for item in events.range(rv + 1..)? {
            let (k, v) = item?;
            if let Some(c) = Change::decode(k.value(), v.value()) {
                out.push(c);
            }
        }
        Ok((now, out))
    }

    /// Number of objects stored.
    ///
    /// # Errors
    /// The database failed.
    pub fn count(&self, prefix: &str) -> Result<usize, StoreError> {
        if prefix.ends_with('/') && prefix.matches('/').count() <= 2 {
            let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            return Ok(c.get(prefix).copied().unwrap_or(0));
        }
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OBJECTS)?;
        let mut n = 0;
        for item in t.range(prefix..)? {
            let (k, _) = item?;
            if !k.value().starts_with(prefix) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }
}

/// Drops the oldest changes past [`KEEP_EVENTS`].
fn trim(events: &mut redb::Table<u64, &[u8]>, rv: u64) -> Result<(), StoreError> {
    if events.len()? > KEEP_EVENTS {
        let below = rv.saturating_sub(KEEP_EVENTS);
        events.retain_in(..below, |_, _| false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(tag: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("flotilla-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let s = Store::open(&dir.join("store.redb")).expect("opens");
        (s, dir)
    }

    #[test]
    fn writes_version_conflicts_and_the_change_log() {
        let (s, dir) = store("basic");
        let a = s
            .put("A/x", json!({"metadata": {"name": "x"}}), Expect::Absent)
            .expect("created");
        assert_eq!(a["metadata"]["resourceVersion"], "1");
        assert!(matches!(
            s.put("A/x", json!({"metadata": {}}), Expect::Absent),
            Err(StoreError::Exists(_))
        ));
        assert!(matches!(
            s.put("A/x", json!({"metadata": {}}), Expect::Any(Some(7))),
            Err(StoreError::Conflict { .. })
        ));
        let b = s
            .put(
                "A/x",
                json!({"metadata": {"name": "x"}, "v": 2}),
                Expect::Any(Some(1)),
            )
            .expect("replaced");
        assert_eq!(
            b["metadata"]["creationTimestamp"],
            a["metadata"]["creationTimestamp"]
        );
        s.put("A/y", json!({"metadata": {}}), Expect::Any(None))
            .expect("created");
        s.delete(&["A/x".into(), "A/nothing".into()])
            .expect("deleted");
        let (rv, changes) = s.changes_since(1).expect("log");
        assert_eq!(rv, 4);
        let kinds: Vec<_> = changes.iter().map(|c| (c.rv, c.kind)).collect();
        assert_eq!(kinds, vec![(2, "MODIFIED"), (3, "ADDED"), (4, "DELETED")]);
        let (_, listed) = s.list("A/", None, 10).expect("list");
        assert_eq!(listed.len(), 1);
        drop(s);
        // It all survives a restart.
        let s = Store::open(&dir.join("store.redb")).expect("reopens");
        assert!(s.get("A/y").expect("get").is_some());
        assert_eq!(s.changes_since(0).expect("log").1.len(), 4);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn paging_by_key() {
        let (s, dir) = store("paging");
        for i in 0..25 {
            s.put(
                &format!("B/s/{i:03}"),
                json!({"metadata": {}}),
                Expect::Absent,
            )
            .expect("created");
        }
        s.put("B/t/000", json!({"metadata": {}}), Expect::Absent)
            .expect("created");
        let (_, p1) = s.list("B/s/", None, 10).expect("page 1");
        let (_, p2) = s.list("B/s/", Some(&p1[9].0), 10).expect("page 2");
        let (_, p3) = s.list("B/s/", Some(&p2[9].0), 10).expect("page 3");
        assert_eq!((p1.len(), p2.len(), p3.len()), (10, 10, 5));
        assert_eq!(p2[0].0, "B/s/010");
        assert_eq!(s.count("B/s/").expect("count"), 25);
        let _ = std::fs::remove_dir_all(dir);
    }
}
