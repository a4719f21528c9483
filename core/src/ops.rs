//! A component's operations listener (`--http`): `/metrics` (Prometheus
//! text), `/healthz` (the process answers: liveness) and `/readyz` (the
//! component really serves: readiness). Kubernetes probes and Prometheus
//! scrape it; it serves nothing else and takes no input but the path.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::metrics::{Exposition, Kind};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A connection's whole life (a probe or a scrape takes milliseconds).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// What a component needs before it serves: named checks, each ready or
/// not with the reason. `/readyz` answers 200 when every check is ready,
/// else 503 with the reasons.
pub struct Readiness {
    checks: Mutex<BTreeMap<&'static str, Option<String>>>,
    /// Checks asked each time: `None` ready, else why not.
    live: Mutex<Vec<(&'static str, LiveCheck)>>,
}

type LiveCheck = Box<dyn Fn() -> Option<String> + Send + Sync>;

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.ready())
            .finish()
    }
}

impl Readiness {
    /// Every check starts not ready, with its reason.
    pub fn new(checks: &[(&'static str, &str)]) -> Arc<Readiness> {
        Arc::new(Readiness {
            checks: Mutex::new(
                checks
                    .iter()
                    .map(|(k, why)| (*k, Some((*why).to_string())))
                    .collect(),
            ),
            live: Mutex::default(),
        })
    }

    /// Adds a check asked at each probe: `f` answers `None` when ready,
    /// else why not.
    pub fn live(
        &self,
        check: &'static str,
        f: impl Fn() -> Option<String> + Send + Sync + 'static,
    ) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((check, Box::new(f)));
    }

    /// Marks `check` ready (`None`) or not ready with the reason.
    pub fn set(&self, check: &'static str, not_ready: Option<String>) {
        self.lock().insert(check, not_ready);
    }

    /// Marks `check` ready.
    pub fn ok(&self, check: &'static str) {
        self.set(check, None);
    }

    /// `Ok` when every check is ready, else the reasons, one per line.
    pub fn ready(&self) -> Result<(), String> {
        let mut why: Vec<String> = self
            .lock()
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|w| format!("{k}: {w}")))
            .collect();
        for (k, f) in self.live.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(w) = f() {
                why.push(format!("{k}: {w}"));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("\n"))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Option<String>>> {
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes the component's report (the JSON it sends the console), for
/// `/metrics`.
pub type ReportFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Value> + Send>> + Send + Sync>;

/// The component an operations listener serves.
#[derive(Clone)]
pub struct Ops {
    /// `router`, `broker`, `gateway`, `lwt`, `operator`.
    pub component: &'static str,
    pub id: String,
    pub readiness: Arc<Readiness>,
    /// `None`: process metrics and readiness only.
    pub report: Option<ReportFn>,
    /// What a `/metrics` with a report must present as `Authorization:
    /// Bearer` (the admin token): the report names every tenant's
    /// addresses. Without one it is served on a loopback listener only.
    pub token: Option<String>,
}

impl Ops {
    /// The `/metrics` text: the report's series, the process's, and
    /// readiness.
    pub async fn metrics(&self) -> String {
        let mut e = Exposition::default();
        if let Some(f) = &self.report {
            let r = f().await;
            e.report(self.component, &self.id, &r);
        }
        e.process();
        let labels = [("component", self.component), ("id", self.id.as_str())];
        e.sample(
            "flotilla_ready",
            Kind::Gauge,
            "1 when the component serves (its /readyz answers 200).",
            &labels,
            u8::from(self.readiness.ready().is_ok()),
        );
        e.sample(
            "flotilla_build_info",
            Kind::Gauge,
            "The running Flotilla version.",
            &[
                ("component", self.component),
                ("version", env!("CARGO_PKG_VERSION")),
            ],
            1,
        );
        e.render()
    }
}

/// Binds the operations listener.
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until
/// `shutdown`.
pub async fn serve(listener: TcpListener, ops: Ops, shutdown: CancellationToken) {
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    if let Ok(a) = listener.local_addr() {
        info!(proto = "http", addr = %a, component = ops.component, "listening");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ops = ops.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let ops = ops.clone();
                async move { Ok::<_, Infallible>(answer(&ops, &req, loopback).await) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

/// Whether `req` may read the report's series: with the token when there
/// is one, else only on a loopback listener.
fn may_read_report<B>(
    ops: &Ops,
    req: &Request<B>,
    loopback: bool,
) -> Result<(), Response<Full<Bytes>>> {
    if ops.report.is_none() {
        return Ok(());
    }
    let Some(token) = &ops.token else {
        return if loopback {
            Ok(())
        } else {
            Err(text(
                StatusCode::FORBIDDEN,
                "/metrics names every tenant's addresses: off loopback it needs the admin token (FLOTILLA_ADMIN_TOKEN), which this component has not been given\n".into(),
            ))
        };
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if crate::auth::ct_eq(t.trim().as_bytes(), token.as_bytes()) => Ok(()),
        _ => {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "/metrics needs the admin token: Authorization: Bearer TOKEN\n".into(),
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            Err(r)
        }
    }
}

async fn answer<B>(ops: &Ops, req: &Request<B>, loopback: bool) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match ops.readiness.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready\n{why}\n"),
            ),
        },
        "/metrics" => {
            if let Err(refused) = may_read_report(ops, req, loopback) {
                return refused;
            }
            let mut r = text(StatusCode::OK, ops.metrics().await);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Binds `addr` (when given) and serves the component's operations
/// listener on `tracker` until `shutdown`; returns the bound address.
///
/// # Errors
/// The address cannot be bound.
pub async fn start(
    addr: Option<SocketAddr>,
    ops: Ops,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> std::io::Result<Option<SocketAddr>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let l = bind(addr).await?;
    let local = l.local_addr()?;
    tracker.spawn(serve(l, ops, shutdown));
    Ok(Some(local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_check_is() {
        let r = Readiness::new(&[("mesh", "no neighbour yet"), ("listeners", "not bound")]);
        assert_eq!(
            r.ready().unwrap_err(),
            "listeners: not bound\nmesh: no neighbour yet"
        );
        r.ok("listeners");
        assert_eq!(r.ready().unwrap_err(), "mesh: no neighbour yet");
        r.ok("mesh");
        assert!(r.ready().is_ok());
        r.set("mesh", Some("shutting down".into()));
        assert!(r.ready().is_err());
    }
}
