//! The console's store on Kubernetes (`--store kubernetes`): address
//! spaces, addresses and users are the custom resources of the console's
//! namespace, and the broker registry is ConfigMaps there. Reads come from
//! a cache that watches of those kinds keep; writes go to the API server,
//! with its `resourceVersion` for optimistic concurrency; the console's
//! own watch stream (what routers and brokers follow) is fed from the
//! Kubernetes watches.
//!
//! Objects keep the API server's `resourceVersion`. The watch stream's
//! position is the console's own sequence, which starts from the clock at
//! each start (so a position from an earlier run is too old: `Gone`, and
//! the follower lists again): changes of four kinds come on four watches,
//! and the stream puts them in one order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::store::{Change, Expect, StoreError};

/// Changes the stream keeps for followers that resume.
const KEEP: usize = 100_000;
/// The label of the ConfigMaps that hold registered brokers.
pub const BROKER_LABEL: &str = "flotilla.dev/kind";

/// The kinds the store keeps, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    AddressSpace,
    Address,
    MessagingUser,
    Broker,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::AddressSpace,
        Kind::Address,
        Kind::MessagingUser,
        Kind::Broker,
    ];

    fn of_key(key: &str) -> Option<Kind> {
        match key.split('/').next()? {
            "AddressSpace" => Some(Kind::AddressSpace),
            "Address" => Some(Kind::Address),
            "MessagingUser" => Some(Kind::MessagingUser),
            "Broker" => Some(Kind::Broker),
            _ => None,
        }
    }

    fn resource(self) -> ApiResource {
        let (g, kind, plural) = match self {
            Kind::AddressSpace => ("flotilla.dev", "AddressSpace", "addressspaces"),
            Kind::Address => ("flotilla.dev", "Address", "addresses"),
            Kind::MessagingUser => ("flotilla.dev", "MessagingUser", "messagingusers"),
            Kind::Broker => ("", "ConfigMap", "configmaps"),
        };
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, "v1", kind), plural)
    }

    fn key_prefix(self) -> &'static str {
        match self {
            Kind::AddressSpace => "AddressSpace/",
            Kind::Address => "Address/",
            Kind::MessagingUser => "MessagingUser/",
            Kind::Broker => "Broker/",
        }
    }
}

/// The name of the object that holds `key` (`Address/SPACE/NAME` is
/// `SPACE.NAME`: names are unique per namespace, not per space).
pub fn object_name(key: &str) -> Option<String> {
    let mut parts = key.splitn(3, '/');
    let kind = parts.next()?;
    match kind {
        "AddressSpace" => parts.next().map(str::to_string),
        "Address" | "MessagingUser" => {
            let space = parts.next()?;
            let name = parts.next()?;
            Some(format!("{space}.{name}"))
        }
        "Broker" => {
            let id = parts.next()?;
            let ok = !id.is_empty()
                && id.len() <= 200
                && id.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && id.starts_with(|c: char| c.is_ascii_alphanumeric())
                && id.ends_with(|c: char| c.is_ascii_alphanumeric());
            if ok {
                Some(format!("broker.{id}"))
            } else {
                use sha2::Digest as _;
                let d = sha2::Sha256::digest(id.as_bytes());
                Some(format!(
                    "broker.x{}",
                    d.iter()
                        .take(10)
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                ))
            }
        }
        _ => None,
    }
}

/// The key and the console's object for an object of the API server
/// (`None`: not one the store keeps).
pub fn from_object(kind: Kind, o: &Value) -> Option<(String, Value)> {
    let meta = &o["metadata"];
    let name = meta["name"].as_str()?;
    let mut m = json!({"name": name});
    for k in ["resourceVersion", "creationTimestamp"] {
        if let Some(v) = meta[k].as_str() {
            m[k] = v.into();
        }
    }
    if kind == Kind::Broker {
        let mut b: Value = serde_json::from_str(o["data"]["object"].as_str()?).ok()?;
        let id = b["metadata"]["name"].as_str()?.to_string();
        b["metadata"]["resourceVersion"] = m["resourceVersion"].clone();
        return Some((format!("Broker/{id}"), b));
    }
    if let Some(l) = meta["labels"].as_object().filter(|l| !l.is_empty()) {
        m["labels"] = Value::Object(l.clone());
    }
    let kind_name = o["kind"].as_str().unwrap_or(match kind {
        Kind::AddressSpace => "AddressSpace",
        Kind::Address => "Address",
        _ => "MessagingUser",
    });
    let (key, rest) = match kind {
        Kind::AddressSpace => (format!("AddressSpace/{name}"), name.to_string()),
        _ => {
            let space = o["spec"]["addressSpace"].as_str().unwrap_or("default");
            let rest = name
                .strip_prefix(&format!("{space}."))
                .unwrap_or(name)
                .to_string();
            (format!("{kind_name}/{space}/{rest}"), rest)
        }
    };
    m["name"] = rest.into();
    let mut out = json!({
        "apiVersion": flotilla_core::resources::API_VERSION,
        "kind": kind_name,
        "metadata": m,
        "spec": o["spec"].clone(),
    });
    if !o["status"].is_null() {
        out["status"] = o["status"].clone();
    }
    Some((key, out))
}

/// The API server's object for the console's `object` at `key`.
fn to_object(key: &str, object: &Value, ns: &str) -> Option<(Kind, String, Value)> {
    let kind = Kind::of_key(key)?;
    let name = object_name(key)?;
    let mut meta = json!({"name": name, "namespace": ns});
    if kind == Kind::Broker {
        meta["labels"] = json!({BROKER_LABEL: "Broker"});
        let mut b = object.clone();
        if let Some(m) = b["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        return Some((
            kind,
            name,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                   "data": {"object": b.to_string()}}),
        ));
    }
    if let Some(l) = object["metadata"]["labels"].as_object() {
        meta["labels"] = Value::Object(l.clone());
    }
    Some((
        kind,
        name,
        json!({
            "apiVersion": flotilla_core::resources::API_VERSION,
            "kind": object["kind"],
            "metadata": meta,
            "spec": object["spec"],
        }),
    ))
}

/// What the watches built: the objects, and the stream of their changes.
#[derive(Debug)]
pub struct State {
    pub objects: BTreeMap<String, Value>,
    /// The API server's resource version of each object as last streamed.
    streamed: HashMap<String, String>,
    /// The stream's position (its last change).
    pub seq: u64,
    log: VecDeque<Arc<Change>>,
    /// The stream has every change after this position.
    complete_since: u64,
    /// Objects of a kind listed again (a watch restarted), until the list
    /// is complete.
    relisting: HashMap<Kind, BTreeMap<String, Value>>,
    /// Kinds whose first list is in.
    pub synced: std::collections::HashSet<Kind>,
}

impl State {
    /// An empty store whose stream starts at `start`.
    pub fn new(start: u64) -> State {
        State {
            objects: BTreeMap::new(),
            streamed: HashMap::new(),
            seq: start,
            log: VecDeque::new(),
            complete_since: start,
            relisting: HashMap::new(),
            synced: Default::default(),
        }
    }

    /// One event of a kind's watch; returns the changes to send followers.
    pub fn event(&mut self, kind: Kind, e: watcher::Event<DynamicObject>) -> Vec<Arc<Change>> {
        let value = |o: &DynamicObject| serde_json::to_value(o).unwrap_or(Value::Null);
        match e {
            watcher::Event::Apply(o) => self.upsert(kind, &value(&o)).into_iter().collect(),
            watcher::Event::Delete(o) => match from_object(kind, &value(&o)) {
                Some((key, obj)) => self.remove(&key, obj).into_iter().collect(),
                None => Vec::new(),
            },
            watcher::Event::Init => {
                self.relisting.insert(kind, BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                if let Some((key, obj)) = from_object(kind, &value(&o)) {
                    self.relisting.entry(kind).or_default().insert(key, obj);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.remove(&kind).unwrap_or_default();
                let gone: Vec<(String, Value)> = self
                    .objects
                    .range(kind.key_prefix().to_string()..)
                    .take_while(|(k, _)| k.starts_with(kind.key_prefix()))
                    .filter(|(k, _)| !listed.contains_key(*k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut out = Vec::new();
                for (key, obj) in gone {
                    out.extend(self.remove(&key, obj));
                }
                for (key, obj) in listed {
                    out.extend(self.put_object(key, obj));
                }
                self.synced.insert(kind);
                out
            }
        }
    }

    fn upsert(&mut self, kind: Kind, o: &Value) -> Option<Arc<Change>> {
        let (key, obj) = from_object(kind, o)?;
        self.put_object(key, obj)
    }

    /// Stores `obj` at `key`; a change unless that version was streamed.
    pub fn put_object(&mut self, key: String, obj: Value) -> Option<Arc<Change>> {
        let rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let kind = if self.streamed.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if self.streamed.get(&key) == Some(&rv) {
            return None;
        }
        self.objects.insert(key.clone(), obj.clone());
        self.streamed.insert(key, rv);
        Some(self.record(kind, obj))
    }

    fn remove(&mut self, key: &str, obj: Value) -> Option<Arc<Change>> {
        self.objects.remove(key);
        self.streamed.remove(key)?;
        Some(self.record("DELETED", obj))
    }

    fn record(&mut self, kind: &'static str, object: Value) -> Arc<Change> {
        self.seq += 1;
        let c = Arc::new(Change {
            rv: self.seq,
            kind,
            object,
        });
        self.log.push_back(c.clone());
        while self.log.len() > KEEP {
            if let Some(old) = self.log.pop_front() {
                self.complete_since = old.rv;
            }
        }
        c
    }

    /// The changes after stream position `rv`.
    ///
    /// # Errors
    /// `Gone` when the stream no longer reaches back there (or `rv` is
    /// from another run).
    pub fn changes_since(&self, rv: u64) -> Result<(u64, Vec<Change>), StoreError> {
        if rv < self.complete_since || rv > self.seq {
            return Err(StoreError::Gone(rv));
        }
        let out = self
            .log
            .iter()
            .filter(|c| c.rv > rv)
            .map(|c| (**c).clone())
            .collect();
        Ok((self.seq, out))
    }
}

/// Whether the resource's status speaks of its current generation (the
/// console wrote it, or answered it).
fn status_answers(o: &DynamicObject) -> bool {
    match o.metadata.generation {
        Some(g) => o.data["status"]["observedGeneration"].as_i64() == Some(g),
        None => o.data["status"]["conditions"].is_array(),
    }
}

/// The store on Kubernetes.
pub struct KubeStore {
    client: Client,
    namespace: String,
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.namespace)
            .finish()
    }
}

fn kube_err(e: kube::Error) -> StoreError {
    StoreError::Db(format!("Kubernetes API: {e}"))
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

impl KubeStore {
    /// Starts watching the namespace's resources and returns once every
    /// kind is listed.
    ///
    /// # Errors
    /// The API server does not answer, or refuses the watches (RBAC).
    pub async fn start(
        client: Client,
        namespace: String,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<KubeStore>, StoreError> {
        let store = KubeStore::new(client.clone(), namespace.clone());
        let mut streams = Vec::new();
        for kind in Kind::ALL {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &namespace, &kind.resource());
            let cfg = match kind {
                Kind::Broker => {
                    watcher::Config::default().labels(&format!("{BROKER_LABEL}=Broker"))
                }
                _ => watcher::Config::default(),
            };
            streams.push(watcher(api, cfg).map(move |e| (kind, e)).boxed());
        }
        let mut events = futures_util::stream::select_all(streams);
        let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
        let s = store.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = events.next() => n,
                };
                let Some((kind, e)) = next else { return };
                match e {
                    Ok(e) => s.apply_event(kind, e),
                    Err(e) => warn!(kind = ?kind, error = %e, "watch failed; it starts again"),
                }
                let all = s.lock().synced.len() == Kind::ALL.len();
                if all && !*synced_tx.borrow() {
                    let _ = synced_tx.send(true);
                }
            }
        });
        let waited = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while !*synced.borrow() {
                if synced.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if waited.is_err() || !*synced.borrow() {
            return Err(StoreError::Db(format!(
                "cannot list the flotilla.dev resources and broker ConfigMaps of namespace {namespace} (are the CRDs installed, and may this service account read them?)"
            )));
        }
        info!(namespace = %namespace, objects = store.lock().objects.len(), "store: following the Kubernetes API");
        Ok(store)
    }

    /// A store on `namespace` that follows nothing yet (see
    /// [`KubeStore::start`]; tests feed it watch events).
    pub fn new(client: Client, namespace: String) -> Arc<KubeStore> {
        // The stream's positions start from the clock's seconds: a
        // follower's position from an earlier run is below them (Gone).
        let start = (flotilla_core::time::now_ms() / 1000).max(1);
        Arc::new(KubeStore {
            client,
            namespace,
            state: Mutex::new(State::new(start << 20)),
            changes: broadcast::channel(4096).0,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one watch event; users whose password is still in their
    /// spec (applied with kubectl) are stored with SCRAM keys instead.
    pub fn apply_event(self: &Arc<Self>, kind: Kind, e: watcher::Event<DynamicObject>) {
        let plain = |o: &DynamicObject| {
            kind == Kind::MessagingUser && o.data["spec"]["password"].as_str().is_some()
        };
        match &e {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o) if plain(o) => {
                let (s, o) = (self.clone(), o.clone());
                tokio::spawn(async move { s.hash_password(o).await });
                return;
            }
            _ => {}
        }
        let unanswered = match &e {
            watcher::Event::Apply(o) | watcher::Event::InitApply(o)
                if kind != Kind::Broker && !status_answers(o) =>
            {
                Some(o.clone())
            }
            _ => None,
        };
        let changes = self.lock().event(kind, e);
        for c in changes {
            let _ = self.changes.send(c);
        }
        if let Some(o) = unanswered {
            let s = self.clone();
            tokio::spawn(async move { s.answer(kind, o).await });
        }
    }

    /// Gives a resource someone applied (not through the REST API, which
    /// writes the status itself) its status: Ready, or why not.
    async fn answer(&self, kind: Kind, o: DynamicObject) {
        let Some(name) = o.metadata.name.clone() else {
            return;
        };
        let spec = &o.data["spec"];
        let space = spec["addressSpace"].as_str().unwrap_or("default");
        let accepted = "routers and brokers that follow the console apply it";
        let (ok, reason, message) = if kind == Kind::AddressSpace {
            match flotilla_core::resources::Quotas::of(spec["plan"].as_str(), None) {
                Ok(_) => (true, "Accepted", accepted.to_string()),
                Err(e) => (false, "NoSuchPlan", e.to_string()),
            }
        } else if space != flotilla_core::config::DEFAULT_SPACE
            && self.get(&format!("AddressSpace/{space}")).is_none()
        {
            (
                false,
                "NoSuchSpace",
                format!("address space {space:?} does not exist (yet)"),
            )
        } else {
            (true, "Accepted", accepted.to_string())
        };
        let mut ready = flotilla_core::resources::Condition::ready(ok, reason, message);
        ready.observed_generation = o.metadata.generation;
        ready.last_transition_time = Some(flotilla_core::time::now_rfc3339());
        let status = json!({
            "phase": if ok { "Active" } else { "Pending" },
            "conditions": [ready],
            "observedGeneration": o.metadata.generation,
        });
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &kind.resource());
        if let Err(e) = api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            warn!(kind = ?kind, name = %name, error = %e, "cannot write the status");
        }
    }

    /// Replaces a user's plain password with its SCRAM-SHA-256 keys, so
    /// no password stays in the API server.
    async fn hash_password(&self, o: DynamicObject) {
        let Some(name) = o.metadata.name.clone() else {
            return;
        };
        let mut v = serde_json::to_value(&o).unwrap_or(Value::Null);
        let Some(password) = v["spec"]["password"].as_str().map(str::to_string) else {
            return;
        };
        let keys = flotilla_core::auth::ScramCredentials::derive(&password).to_keys();
        if let Some(spec) = v["spec"].as_object_mut() {
            spec.remove("password");
            spec.insert(
                "scramSha256".into(),
                serde_json::to_value(keys).unwrap_or(Value::Null),
            );
        }
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.namespace,
            &Kind::MessagingUser.resource(),
        );
        let Ok(obj) = serde_json::from_value::<DynamicObject>(v) else {
            return;
        };
        match api.replace(&name, &PostParams::default(), &obj).await {
            Ok(_) => info!(user = %name, "stored the user's password as SCRAM keys"),
            Err(e) => {
                warn!(user = %name, error = %e, "cannot store the user's password as SCRAM keys")
            }
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        self.lock().objects.get(key).cloned()
    }

    pub fn list_where(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&Value) -> bool,
    ) -> (u64, Vec<(String, Value)>) {
        let g = self.lock();
        let start = after.unwrap_or(prefix).to_string();
        let items = g
            .objects
            .range(start..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| after != Some(k.as_str()))
            .filter(|(_, v)| keep(v))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (g.seq, items)
    }

    /// The position of the last change streamed.
    pub fn resource_version(&self) -> u64 {
        self.lock().seq
    }

    pub fn count(&self, prefix: &str) -> usize {
        self.lock()
            .objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .count()
    }

    pub fn changes_since(&self, rv: u64) -> Result<(u64, Vec<Change>), StoreError> {
        self.lock().changes_since(rv)
    }

    /// Writes `object` at `key` (from a blocking thread: it waits for the
    /// API server).
    pub fn put(&self, key: &str, object: Value, expect: Expect) -> Result<Value, StoreError> {
        self.runtime.block_on(self.put_async(key, object, expect))
    }

    async fn put_async(
        &self,
        key: &str,
        object: Value,
        expect: Expect,
    ) -> Result<Value, StoreError> {
        let (kind, name, body) = to_object(key, &object, &self.namespace)
            .ok_or_else(|| StoreError::Db(format!("{key}: not a kind this store keeps")))?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.namespace, &kind.resource());
        let body: DynamicObject =
            serde_json::from_value(body).map_err(|e| StoreError::Db(e.to_string()))?;
        let pp = PostParams::default();
        let written = match expect {
            Expect::Absent => match api.create(&pp, &body).await {
                Ok(o) => o,
                Err(e) if code(&e) == Some(409) => return Err(StoreError::Exists(key.to_string())),
                Err(e) => return Err(kube_err(e)),
            },
            Expect::Any(Some(rv)) => {
                let mut b = body.clone();
                b.metadata.resource_version = Some(rv.to_string());
                match api.replace(&name, &pp, &b).await {
                    Ok(o) => o,
                    Err(e) if code(&e) == Some(404) => {
                        return Err(StoreError::NotFound(key.to_string()))
                    }
                    Err(e) if code(&e) == Some(409) => {
                        return Err(StoreError::Conflict {
                            key: key.to_string(),
                            current: self
                                .get(key)
                                .and_then(|o| {
                                    o["metadata"]["resourceVersion"]
                                        .as_str()
                                        .map(str::to_string)
                                })
                                .unwrap_or_default(),
                            given: rv.to_string(),
                        })
                    }
                    Err(e) => return Err(kube_err(e)),
                }
            }
            Expect::Any(None) => {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let attempt = match api.get_opt(&name).await.map_err(kube_err)? {
                        None => api.create(&pp, &body).await,
                        Some(cur) => {
                            let mut b = body.clone();
                            b.metadata.resource_version = cur.metadata.resource_version;
                            api.replace(&name, &pp, &b).await
                        }
                    };
                    match attempt {
                        Ok(o) => break o,
                        Err(e) if code(&e) == Some(409) && tries < 5 => continue,
                        Err(e) => return Err(kube_err(e)),
                    }
                }
            }
        };
        let generation = written.metadata.generation;
        let mut written =
            serde_json::to_value(&written).map_err(|e| StoreError::Db(e.to_string()))?;
        if kind != Kind::Broker && !object["status"].is_null() {
            let mut status = object["status"].clone();
            status["observedGeneration"] = generation.into();
            let o = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await
                .map_err(kube_err)?;
            written = serde_json::to_value(&o).map_err(|e| StoreError::Db(e.to_string()))?;
        }
        let (k, obj) = from_object(kind, &written).ok_or_else(|| {
            StoreError::Db(format!("{key}: the API server answered an odd object"))
        })?;
        // Reads see the write at once; followers hear of it from the watch.
        self.lock().objects.insert(k, obj.clone());
        Ok(obj)
    }

    /// Deletes `keys` (the first is the one asked for; the others go with
    /// it); returns the first.
    pub fn delete(&self, keys: &[String]) -> Result<Value, StoreError> {
        self.runtime.block_on(async {
            let mut first = None;
            for (i, key) in keys.iter().enumerate().rev() {
                let (kind, name) = match (Kind::of_key(key), object_name(key)) {
                    (Some(k), Some(n)) => (k, n),
                    _ => continue,
                };
                let before = self.get(key);
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &self.namespace, &kind.resource());
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(e) if code(&e) == Some(404) => {
                        if i == 0 {
                            return Err(StoreError::NotFound(key.clone()));
                        }
                        continue;
                    }
                    Err(e) => return Err(kube_err(e)),
                }
                self.lock().objects.remove(key);
                if i == 0 {
                    first = before;
                }
            }
            first.ok_or_else(|| StoreError::NotFound(keys[0].clone()))
        })
    }
}
