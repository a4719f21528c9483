//! Following the control plane (DESIGN.md "Control plane"): a router or
//! broker started with `--console URL` reads the console's watch stream
//! (`GET /api/v1/watch`, NDJSON) and applies each change to its tenancy,
//! handing the result on after every batch of changes. It resumes from the last resource version it saw when the
//! stream breaks, starts over when the console says that version is gone
//! (410), and keeps serving its last known tenancy while the console is
//! away.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Space, Tenancy, DEFAULT_SPACE};
use crate::resources::{Address, AddressSpace, MessagingUser};

/// Where the console is and how to prove we may read it.
#[derive(Clone)]
pub struct ConsoleLink {
    /// `http://HOST:PORT`.
    pub url: String,
    pub token: String,
}

impl std::fmt::Debug for ConsoleLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConsoleLink({}, token <redacted>)", self.url)
    }
}

/// Why one watch ended.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("{0}")]
    Io(String),
    #[error("the console answered {0}")]
    Status(StatusCode),
    #[error("the console no longer has our resource version")]
    Gone,
}

/// What the watch has seen: every object by kind/space/name, and the
/// tenancy they make, kept change by change: an address or user costs
/// O(log n) however many there are; a space's own change rebuilds that
/// space from its objects.
struct Seen {
    rv: u64,
    objects: BTreeMap<String, Value>,
    tenancy: Tenancy,
}

impl Default for Seen {
    fn default() -> Self {
        let mut tenancy = Tenancy::zero_config();
        tenancy.brokers = Some(Default::default());
        Seen {
            rv: 0,
            objects: BTreeMap::new(),
            tenancy,
        }
    }
}

/// `o` as a resource of type `T`, if it is one.
fn typed<T: serde::de::DeserializeOwned>(o: &Value) -> Option<T> {
    serde_json::from_value(o.clone()).ok()
}

impl Seen {
    /// Applies one line; true if the objects changed.
    fn line(&mut self, line: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return false;
        };
        let o = &v["object"];
        if let Some(rv) = o["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
        {
            self.rv = self.rv.max(rv);
        }
        let kind = o["kind"].as_str().unwrap_or("");
        let name = o["metadata"]["name"].as_str().unwrap_or("");
        if kind.is_empty() || name.is_empty() {
            return false;
        }
        let space = o["spec"]["addressSpace"].as_str().unwrap_or("");
        let key = format!("{kind}/{space}/{name}");
        let (old, new) = match v["type"].as_str() {
            Some("ADDED" | "MODIFIED") => (self.objects.insert(key, o.clone()), Some(o)),
            Some("DELETED") => match self.objects.remove(&key) {
                Some(old) => (Some(old), None),
                None => return false,
            },
            _ => return false,
        };
        match kind {
            "Broker" => {
                let brokers = self.tenancy.brokers.get_or_insert_with(Default::default);
                if new.is_some() {
                    brokers.insert(name.to_string());
                } else {
                    brokers.remove(name);
                }
            }
            "AddressSpace" => self.rebuild_space(name),
            "Address" | "MessagingUser" => {
                // Of a space not (yet) seen: left out until it comes.
                let Some(s) = self.tenancy.spaces.get_mut(space) else {
                    return true;
                };
                let result = if kind == "Address" {
                    if let Some(a) = old.as_ref().and_then(typed::<Address>) {
                        s.remove_address(&a);
                    }
                    new.and_then(typed::<Address>).map(|a| s.add_address(&a))
                } else {
                    if let Some(u) = old.as_ref().and_then(typed::<MessagingUser>) {
                        s.remove_user(&u);
                    }
                    new.and_then(typed::<MessagingUser>).map(|u| s.add_user(&u))
                };
                if let Some(Err(e)) = result {
                    warn!(kind, space, name, error = %e, "the console's resource is invalid; left out");
                }
            }
            _ => {}
        }
        true
    }

    /// Builds space `name` again from its objects (its settings changed,
    /// or it came or went): its addresses and users are added to it.
    fn rebuild_space(&mut self, name: &str) {
        let own = self
            .objects
            .get(&format!("AddressSpace//{name}"))
            .and_then(typed::<AddressSpace>);
        let base = match own {
            Some(s) => Space::from_resource(&s)
                .map_err(|e| warn!(space = name, error = %e, "the console's address space is invalid; left out"))
                .ok(),
            None if name == DEFAULT_SPACE => Some(Space::zero_config_default()),
            None => None,
        };
        let Some(mut space) = base else {
            self.tenancy.spaces.remove(name);
            return;
        };
        for kind in ["Address", "MessagingUser"] {
            let prefix = format!("{kind}/{name}/");
            for (_, o) in self
                .objects
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
            {
                let _ = if kind == "Address" {
                    typed::<Address>(o).map(|a| space.add_address(&a))
                } else {
                    typed::<MessagingUser>(o).map(|u| space.add_user(&u))
                };
            }
        }
        self.tenancy.spaces.insert(name.to_string(), space);
    }

    /// The tenancy the objects describe (a copy that shares its maps).
    /// Objects that do not parse, and addresses and users of spaces not
    /// (yet) seen, are left out.
    fn tenancy(&self) -> Tenancy {
        self.tenancy.clone()
    }
}

/// Follows the console until `shutdown`, calling `apply` with the new
/// tenancy after every batch of changes.
pub async fn follow(
    link: ConsoleLink,
    mut apply: impl FnMut(Tenancy) + Send,
    shutdown: CancellationToken,
) {
    let mut seen = Seen::default();
    let mut backoff = Duration::from_millis(100);
    let mut connected_once = false;
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = watch_once(&link, &mut seen, &mut apply, &mut connected_once) => r,
        };
        match r {
            Err(WatchError::Gone) => {
                info!("console: our resource version is gone; reading everything again");
                seen = Seen::default();
                continue;
            }
            Err(e) => {
                debug!(error = %e, "console watch ended; keeping the last configuration");
            }
            Ok(()) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn watch_once(
    link: &ConsoleLink,
    seen: &mut Seen,
    apply: &mut (impl FnMut(Tenancy) + Send),
    connected_once: &mut bool,
) -> Result<(), WatchError> {
    let authority = link
        .url
        .strip_prefix("http://")
        .unwrap_or(&link.url)
        .trim_end_matches('/')
        .to_string();
    let io = |e: &dyn std::fmt::Display| WatchError::Io(e.to_string());
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| io(&e))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| io(&e))?;
    tokio::spawn(conn);
    let req = Request::get(format!("/api/v1/watch?resourceVersion={}", seen.rv))
        .header(HOST, &authority)
        .header(AUTHORIZATION, format!("Bearer {}", link.token))
        .body(Empty::<Bytes>::new())
        .map_err(|e| io(&e))?;
    let mut res = sender.send_request(req).await.map_err(|e| io(&e))?;
    match res.status() {
        StatusCode::OK => {}
        StatusCode::GONE => return Err(WatchError::Gone),
        s => {
            if s == StatusCode::UNAUTHORIZED {
                warn!(console = %link.url, "the console refused our token");
            }
            return Err(WatchError::Status(s));
        }
    }
    if !*connected_once {
        info!(console = %link.url, "following the console");
        *connected_once = true;
    }
    let mut buf: Vec<u8> = Vec::new();
    // The new tenancy is handed on once the stream pauses (or every half
    // second while it does not): each hand-on makes every connection
    // check its client and links again.
    let mut pending_since: Option<std::time::Instant> = None;
    loop {
        let wait = if pending_since.is_some() {
            Duration::from_millis(20)
        } else {
            Duration::from_secs(3600)
        };
        let frame = match tokio::time::timeout(wait, res.body_mut().frame()).await {
            Ok(Some(f)) => f.map_err(|e| io(&e))?,
            Ok(None) => {
                flush(seen, apply, &mut pending_since);
                return Ok(());
            }
            Err(_) => {
                flush(seen, apply, &mut pending_since);
                continue;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if seen.line(&line) && pending_since.is_none() {
                pending_since = Some(std::time::Instant::now());
            }
        }
        if pending_since.is_some_and(|t| t.elapsed() > Duration::from_millis(500)) {
            flush(seen, apply, &mut pending_since);
        }
    }
}

/// Applies what changed, if anything did.
fn flush(
    seen: &Seen,
    apply: &mut (impl FnMut(Tenancy) + Send),
    pending_since: &mut Option<std::time::Instant>,
) {
    if pending_since.take().is_some() {
        debug!(
            objects = seen.objects.len(),
            rv = seen.rv,
            "console changes applied"
        );
        apply(seen.tenancy());
    }
}

/// Sends the console this component's live state (`POST
/// /api/v1/reports`); returns the commands the console has for it (a JSON
/// array: close a connection, purge a queue).
///
/// # Errors
/// The console cannot be reached or refused the report.
pub async fn report(link: &ConsoleLink, body: Vec<u8>) -> Result<Vec<Value>, String> {
    let v = post(link, "/api/v1/reports", body).await?;
    Ok(v["commands"].as_array().cloned().unwrap_or_default())
}

/// Answers a console command that asked for one (`POST /api/v1/answers`
/// with `{"id", "from", "result"}`): a broker's queue browser pages,
/// for example.
///
/// # Errors
/// The console cannot be reached or refused the answer.
pub async fn answer(link: &ConsoleLink, id: u64, from: &str, result: Value) -> Result<(), String> {
    let body = serde_json::to_vec(&serde_json::json!({"id": id, "from": from, "result": result}))
        .map_err(|e| e.to_string())?;
    post(link, "/api/v1/answers", body).await.map(|_| ())
}

/// POSTs JSON to the console with the admin token; its JSON answer.
async fn post(link: &ConsoleLink, path: &str, body: Vec<u8>) -> Result<Value, String> {
    let authority = link
        .url
        .strip_prefix("http://")
        .unwrap_or(&link.url)
        .trim_end_matches('/')
        .to_string();
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(path)
        .header(HOST, &authority)
        .header(AUTHORIZATION, format!("Bearer {}", link.token))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if res.status() != StatusCode::OK {
        return Err(format!("the console answered {}", res.status()));
    }
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// Reports every second until `shutdown`: `state` makes the report,
/// `command` carries out each command the console answers with.
pub async fn report_every_second<F, Fut>(
    link: ConsoleLink,
    mut state: F,
    mut command: impl FnMut(Value) + Send,
    shutdown: CancellationToken,
) where
    F: FnMut() -> Fut + Send,
    Fut: std::future::Future<Output = Value> + Send,
{
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let body = serde_json::to_vec(&state().await).unwrap_or_default();
        // Shutdown does not wait for a console that went first.
        let sent = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(5), report(&link, body)) => r,
        };
        match sent {
            Ok(Ok(commands)) => commands.into_iter().for_each(&mut command),
            Ok(Err(e)) => debug!(error = %e, "cannot report to the console"),
            Err(_) => debug!("reporting to the console timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_build_the_tenancy_and_orphans_are_left_out() {
        let mut s = Seen::default();
        let add = |o: Value| format!("{}\n", serde_json::json!({"type": "ADDED", "object": o}));
        assert!(s.line(
            add(serde_json::json!({
                "apiVersion": "flotilla.dev/v1", "kind": "AddressSpace",
                "metadata": {"name": "t", "resourceVersion": "1"}, "spec": {}
            }))
            .as_bytes()
        ));
        assert!(s.line(
            add(serde_json::json!({
                "apiVersion": "flotilla.dev/v1", "kind": "Address",
                "metadata": {"name": "q", "resourceVersion": "2"},
                "spec": {"addressSpace": "t", "address": "orders", "type": "queue"}
            }))
            .as_bytes()
        ));
        assert!(s.line(
            add(serde_json::json!({
                "apiVersion": "flotilla.dev/v1", "kind": "Address",
                "metadata": {"name": "q", "resourceVersion": "3"},
                "spec": {"addressSpace": "gone", "address": "orders", "type": "queue"}
            }))
            .as_bytes()
        ));
        assert!(!s.line(
            b"{\"type\":\"BOOKMARK\",\"object\":{\"metadata\":{\"resourceVersion\":\"9\"}}}\n"
        ));
        assert!(!s.line(b"not json\n"));
        assert_eq!(s.rv, 9);
        let t = s.tenancy();
        assert_eq!(
            t.spaces["t"].lookup("orders"),
            Some(crate::resources::AddressType::Queue)
        );
        assert!(!t.spaces.contains_key("gone"));
        assert!(s.line(
            format!(
                "{}\n",
                serde_json::json!({"type": "DELETED", "object": {
                    "kind": "Address", "metadata": {"name": "q", "resourceVersion": "10"},
                    "spec": {"addressSpace": "t"}
                }})
            )
            .as_bytes()
        ));
        assert_eq!(s.tenancy().spaces["t"].lookup("orders"), None);
    }

    #[test]
    fn changes_apply_one_by_one_and_a_space_change_keeps_its_addresses() {
        let mut s = Seen::default();
        let ev = |t: &str, o: Value| format!("{}\n", serde_json::json!({"type": t, "object": o}));
        let space = |anonymous: bool| {
            serde_json::json!({
                "apiVersion": "flotilla.dev/v1", "kind": "AddressSpace",
                "metadata": {"name": "t"}, "spec": {"authentication": {"anonymous": anonymous}}
            })
        };
        let address = |a: &str| {
            serde_json::json!({
                "apiVersion": "flotilla.dev/v1", "kind": "Address", "metadata": {"name": "q"},
                "spec": {"addressSpace": "t", "address": a, "type": "queue"}
            })
        };
        // An address before its space waits for it.
        assert!(s.line(ev("ADDED", address("orders")).as_bytes()));
        assert!(!s.tenancy().spaces.contains_key("t"));
        assert!(s.line(ev("ADDED", space(false)).as_bytes()));
        let before = s.tenancy();
        assert_eq!(
            before.spaces["t"].lookup("orders"),
            Some(crate::resources::AddressType::Queue)
        );
        // Its address changes: the old one is gone, the new one there; the
        // snapshot handed on before is untouched.
        assert!(s.line(ev("MODIFIED", address("invoices")).as_bytes()));
        let t = s.tenancy();
        assert_eq!(t.spaces["t"].lookup("orders"), None);
        assert_eq!(
            t.spaces["t"].lookup("invoices"),
            Some(crate::resources::AddressType::Queue)
        );
        assert_eq!(
            before.spaces["t"].lookup("orders"),
            Some(crate::resources::AddressType::Queue)
        );
        // The space's own change keeps what is declared in it.
        assert!(s.line(ev("MODIFIED", space(true)).as_bytes()));
        let t = s.tenancy();
        assert_eq!(t.spaces["t"].anonymous, crate::config::Anonymous::Allow);
        assert_eq!(
            t.spaces["t"].lookup("invoices"),
            Some(crate::resources::AddressType::Queue)
        );
        // Brokers come and go.
        let broker = serde_json::json!({"kind": "Broker", "metadata": {"name": "b1"}});
        assert!(s.line(ev("ADDED", broker.clone()).as_bytes()));
        assert!(s.tenancy().brokers.is_some_and(|b| b.contains("b1")));
        assert!(s.line(ev("DELETED", broker).as_bytes()));
        assert!(s.tenancy().brokers.is_some_and(|b| b.is_empty()));
        // The space goes: so does everything in it.
        assert!(s.line(ev("DELETED", space(true)).as_bytes()));
        assert!(!s.tenancy().spaces.contains_key("t"));
    }
}
