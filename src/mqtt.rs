//! MQTT tools on rumqttc (a client not written here): `flotilla stat --mqtt`
//! reads a gateway's sessions; `flotilla bench --mqtt` measures publishers
//! and subscribers through any MQTT server (Flotilla's gateway, mosquitto,
//! RabbitMQ, rumqttd) the same way.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::bench::BenchArgs;

/// Where an MQTT tool connects: `mqtt://[user[:password]@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl MqttUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| (!url.contains("://")).then_some(url))
            .ok_or_else(|| {
                format!("{url:?}: an MQTT URL is mqtt://[user[:password]@]host[:port]")
            })?;
        let (cred, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, rest),
        };
        let (user, password) = match cred {
            Some(c) => match c.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(c.to_string()), None),
            },
            None => (None, None),
        };
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            ),
            _ => (hostport.to_string(), 1883),
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(MqttUrl {
            host,
            port,
            user,
            password,
        })
    }

    fn options(&self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_max_packet_size(16 << 20, 16 << 20);
        if let Some(u) = &self.user {
            o.set_credentials(u, self.password.as_deref().unwrap_or(""));
        }
        o
    }
}

/// A client and its event loop, with Nagle's algorithm off (rumqttc
/// leaves it on, which holds small QoS 0 publications for tens of
/// milliseconds whatever the server).
fn new_client(o: MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    let (c, mut ev) = AsyncClient::new(o, cap);
    let mut n = NetworkOptions::new();
    n.set_tcp_nodelay(true);
    ev.set_network_options(n);
    (c, ev)
}

/// `flotilla stat --mqtt URL`: the gateway's sessions (of the login's
/// space; with the mesh secret, of every space).
pub async fn stat(url: &str, mesh_secret: Option<&std::path::Path>, json: bool) -> ExitCode {
    let mut u = match MqttUrl::parse(url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("flotilla stat: {e}");
            return ExitCode::from(64);
        }
    };
    if let Some(path) = mesh_secret {
        match flotilla_core::auth::MeshSecret::load(path) {
            Ok(m) => {
                u.user = Some(flotilla_core::auth::MeshSecret::username("flotilla-stat"));
                u.password = Some(m.secret().to_string());
            }
            Err(e) => {
                eprintln!("flotilla stat: {e}");
                return ExitCode::from(64);
            }
        }
    }
    let id = format!("flotilla-stat-{:08x}", rand::random::<u32>());
    let (client, mut events) = AsyncClient::new(u.options(&id), 10);
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client
                        .subscribe(flotilla_mqtt_gateway::STAT_TOPIC, QoS::AtMostOnce)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    if s.return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        return Err("the gateway refused: stat needs the view permission".into());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => return Ok(p.payload),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    let _ = client.try_disconnect();
    let body: Bytes = match got {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            eprintln!("flotilla stat: {}:{}: {e}", u.host, u.port);
            return ExitCode::from(69);
        }
        Err(_) => {
            eprintln!(
                "flotilla stat: {}:{}: no answer within 10 s",
                u.host, u.port
            );
            return ExitCode::from(69);
        }
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let t = &v["totals"];
    println!(
        "MQTT gateway: {} connected; since start {} connections, {} refused, {} protocol errors; {} received, {} sent, {} dropped (QoS 0, slow clients)",
        v["sessions"].as_array().map_or(0, Vec::len),
        t["connections"],
        t["refusedConnections"],
        t["protocolErrors"],
        t["received"],
        t["sent"],
        t["dropped"],
    );
    println!(
        "{:<12} {:<28} {:<10} {:<9} {:>9} {:>9} {:>8} {:>8}  subscriptions",
        "space", "client id", "protocol", "session", "received", "sent", "inflight", "dropped"
    );
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    for s in v["sessions"].as_array().into_iter().flatten() {
        let subs: Vec<String> = s["subscriptions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| format!("{} (QoS {})", f["filter"].as_str().unwrap_or(""), f["qos"]))
            .collect();
        println!(
            "{:<12} {:<28} {:<10} {:<9} {:>9} {:>9} {:>8} {:>8}  {}",
            s["space"].as_str().unwrap_or(""),
            s["clientId"].as_str().unwrap_or(""),
            s["protocol"].as_str().unwrap_or(""),
            if s["persistent"] == true {
                "kept"
            } else {
                "clean"
            },
            n(&s["received"]),
            n(&s["sent"]),
            n(&s["inflight"]),
            n(&s["dropped"]),
            subs.join(", ")
        );
    }
    ExitCode::SUCCESS
}

// ---- bench ----

/// The first bytes of every payload: send time (ns since `base`),
/// publisher, sequence number.
const HEADER: usize = 24;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    acked: AtomicU64,
    received: AtomicU64,
    out_of_order: AtomicU64,
    duplicates: AtomicU64,
    first_rx: AtomicU64,
    last_rx: AtomicU64,
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Runs one client's event loop until `stop`; calls `on` for each event.
async fn drive(
    mut ev: EventLoop,
    stop: CancellationToken,
    mut on: impl FnMut(Event) + Send,
) -> Result<(), String> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = ev.poll() => match r {
                Ok(e) => on(e),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

struct Sub {
    client: AsyncClient,
    task: tokio::task::JoinHandle<Result<(), String>>,
    stop: CancellationToken,
}

/// A subscriber: connected and subscribed when this returns.
async fn subscriber(
    url: &MqttUrl,
    id: String,
    a: &BenchArgs,
    counts: Arc<Counts>,
    hist: Arc<Mutex<Histogram<u64>>>,
    clean: bool,
) -> Result<Sub, String> {
    let mut o = url.options(&id);
    o.set_clean_session(clean);
    o.set_inflight(1000);
    let (client, ev) = new_client(o, 1000);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let mut ready_tx = Some(ready_tx);
    let stop = CancellationToken::new();
    let publishers = a.senders.max(1);
    let mut last: Vec<Option<u64>> = vec![None; publishers];
    let (topic, qos) = (a.address.clone(), qos_of(a.qos));
    let c2 = client.clone();
    let task = tokio::spawn(drive(ev, stop.clone(), move |e| match e {
        Event::Incoming(Packet::ConnAck(_)) => {
            let _ = c2.try_subscribe(topic.clone(), qos);
        }
        Event::Incoming(Packet::SubAck(s)) => {
            if let Some(tx) = ready_tx.take() {
                let ok = s
                    .return_codes
                    .iter()
                    .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure));
                let _ = tx.send(if ok {
                    Ok(())
                } else {
                    Err("subscription refused".into())
                });
            }
        }
        Event::Incoming(Packet::Publish(p)) => {
            let now = now_ns();
            let b = &p.payload;
            if b.len() < HEADER {
                return;
            }
            let sent = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
            let publisher = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()) as usize;
            let seq = u64::from_be_bytes(b[16..24].try_into().unwrap_or_default());
            if let Some(l) = last.get_mut(publisher) {
                match *l {
                    Some(prev) if seq == prev => {
                        counts.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(prev) if seq < prev => {
                        counts.out_of_order.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => *l = Some(seq),
                }
            }
            counts.received.fetch_add(1, Ordering::Relaxed);
            let _ = counts.first_rx.compare_exchange(
                u64::MAX,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            counts.last_rx.fetch_max(now, Ordering::Relaxed);
            if let Ok(mut h) = hist.lock() {
                let _ = h.record(now.saturating_sub(sent) / 1000);
            }
        }
        _ => {}
    }));
    match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
        Ok(Ok(Ok(()))) => Ok(Sub { client, task, stop }),
        Ok(Ok(Err(e))) => Err(e),
        _ => {
            stop.cancel();
            match task.await {
                Ok(Err(e)) => Err(e),
                _ => Err("no SUBACK within 10 s".into()),
            }
        }
    }
}

/// One publisher: sends `count` messages (or until `stop`) at `rate`/s.
async fn publisher(
    url: MqttUrl,
    index: usize,
    a: BenchArgs,
    count: Option<u64>,
    rate: Option<f64>,
    counts: Arc<Counts>,
    stop: CancellationToken,
) -> Result<(), String> {
    let mut o = url.options(&format!(
        "flotilla-bench-pub-{index}-{:04x}",
        rand::random::<u16>()
    ));
    o.set_inflight(1000);
    let (client, ev) = new_client(o, 1000);
    let done = CancellationToken::new();
    let c = counts.clone();
    let driver = tokio::spawn(drive(ev, done.clone(), move |e| match e {
        Event::Outgoing(Outgoing::Publish(_)) => {
            c.sent.fetch_add(1, Ordering::Relaxed);
        }
        Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_)) => {
            c.acked.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }));
    let qos = qos_of(a.qos);
    let mut payload = vec![0u8; a.size.max(HEADER)];
    payload[8..16].copy_from_slice(&(index as u64).to_be_bytes());
    let started = Instant::now();
    let mut seq = 0u64;
    while count.is_none_or(|n| seq < n) && !stop.is_cancelled() {
        if let Some(r) = rate {
            let due = started + Duration::from_secs_f64(seq as f64 / r);
            let now = Instant::now();
            if due > now {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(due - now) => {}
                }
            }
        }
        payload[0..8].copy_from_slice(&now_ns().to_be_bytes());
        payload[16..24].copy_from_slice(&seq.to_be_bytes());
        let send = client.publish(a.address.clone(), qos, false, payload.clone());
        tokio::select! {
            r = send => r.map_err(|e| e.to_string())?,
            _ = stop.cancelled() => break,
        }
        seq += 1;
    }
    // Let what was handed over go out and be acknowledged.
    let target = seq;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !driver.is_finished() {
        let mine = if a.qos == 0 {
            counts.sent.load(Ordering::Relaxed)
        } else {
            counts.acked.load(Ordering::Relaxed)
        };
        if mine >= target * a.senders as u64 || stop.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    done.cancel();
    match driver.await {
        Ok(Err(e)) if !e.contains("closed") => Err(e),
        _ => Ok(()),
    }
}

/// `flotilla bench --mqtt URL`.
pub async fn bench(a: BenchArgs, url: &str) -> ExitCode {
    let u = match MqttUrl::parse(url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("flotilla bench: {e}");
            return ExitCode::from(64);
        }
    };
    if a.size < HEADER {
        eprintln!("flotilla bench: with --mqtt, --size must be at least {HEADER}");
        return ExitCode::from(64);
    }
    if a.qos > 2 {
        eprintln!("flotilla bench: --qos is 0, 1 or 2");
        return ExitCode::from(64);
    }
    base();
    if let Some(n) = a.idle {
        return idle(&u, n, a.duration).await;
    }
    let counts = Arc::new(Counts {
        first_rx: AtomicU64::new(u64::MAX),
        ..Default::default()
    });
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
    ));
    let sub_url = match &a.receiver_url {
        Some(r) => match MqttUrl::parse(r) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("flotilla bench: {e}");
                return ExitCode::from(64);
            }
        },
        None => u.clone(),
    };
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    // --offline: the subscribers' persistent sessions take the messages
    // while they are away; then they come back and drain them.
    let mut subs = Vec::new();
    for i in 0..a.receivers {
        let id = format!("flotilla-bench-sub-{i}-{tag}");
        match subscriber(&sub_url, id, &a, counts.clone(), hist.clone(), !a.offline).await {
            Ok(s) => subs.push(s),
            Err(e) => {
                eprintln!("flotilla bench: subscriber {i}: {e}");
                return ExitCode::from(69);
            }
        }
    }
    if a.offline {
        for s in subs.drain(..) {
            let _ = s.client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), s.task).await;
        }
    }
    let stop = CancellationToken::new();
    let duration = match (a.duration, a.count) {
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let per_pub = a.count.map(|c| c.div_ceil(a.senders.max(1) as u64));
    let rate = a.rate.map(|r| r as f64 / a.senders.max(1) as f64);
    eprintln!(
        "{} publisher(s) -> {} subscriber(s) on {:?}, QoS {}, {} B{}",
        a.senders,
        a.receivers,
        a.address,
        a.qos,
        a.size,
        if a.offline {
            ", subscribers offline until all is sent"
        } else {
            ""
        }
    );
    let t0 = Instant::now();
    let mut pubs = Vec::new();
    for i in 0..a.senders {
        pubs.push(tokio::spawn(publisher(
            u.clone(),
            i,
            a.clone(),
            per_pub,
            rate,
            counts.clone(),
            stop.clone(),
        )));
    }
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Some(d) = duration {
                tokio::time::sleep(d).await;
                stop.cancel();
            }
        })
    };
    for p in pubs {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("flotilla bench: publisher: {e}"),
            Err(e) => eprintln!("flotilla bench: publisher: {e}"),
        }
    }
    timer.abort();
    let send_secs = t0.elapsed().as_secs_f64();
    let sent = counts.sent.load(Ordering::Relaxed);
    let acked = counts.acked.load(Ordering::Relaxed);
    let t_drain = Instant::now();
    if a.offline {
        for i in 0..a.receivers {
            let id = format!("flotilla-bench-sub-{i}-{tag}");
            match subscriber(&sub_url, id, &a, counts.clone(), hist.clone(), false).await {
                Ok(s) => subs.push(s),
                Err(e) => eprintln!("flotilla bench: subscriber {i} again: {e}"),
            }
        }
    }
    // Wait for the subscribers: all that was accepted (QoS 1 and 2), or
    // until nothing more arrives for two seconds (QoS 0).
    let expect = if a.qos == 0 { sent } else { acked } * a.receivers as u64;
    let mut last = counts.received.load(Ordering::Relaxed);
    let mut quiet = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = counts.received.load(Ordering::Relaxed);
        if now >= expect {
            break;
        }
        if now != last {
            last = now;
            quiet = Instant::now();
        } else if quiet.elapsed() > Duration::from_secs(if a.qos == 0 { 2 } else { 10 }) {
            break;
        }
    }
    for s in subs {
        let _ = s.client.disconnect().await;
        s.stop.cancel();
        let _ = s.task.await;
    }
    let received = counts.received.load(Ordering::Relaxed);
    let (first, lastrx) = (
        counts.first_rx.load(Ordering::Relaxed),
        counts.last_rx.load(Ordering::Relaxed),
    );
    let rx_secs = if lastrx > first && first != u64::MAX {
        (lastrx - first) as f64 / 1e9
    } else {
        0.0
    };
    let h = hist.lock().map(|h| h.clone()).ok();
    let pct = |q: f64| h.as_ref().map_or(0, |h| h.value_at_quantile(q));
    let summary = serde_json::json!({
        "url": format!("mqtt://{}:{}", u.host, u.port),
        "publishers": a.senders,
        "subscribers": a.receivers,
        "qos": a.qos,
        "size": a.size,
        "sent": sent,
        "acknowledged": acked,
        "sendRate": (sent as f64 / send_secs.max(1e-9)).round(),
        "delivered": received,
        "deliveredRate": if rx_secs > 0.0 { (received as f64 / rx_secs).round() } else { 0.0 },
        "lost": expect.saturating_sub(received),
        "outOfOrder": counts.out_of_order.load(Ordering::Relaxed),
        "duplicates": counts.duplicates.load(Ordering::Relaxed),
        "drainSeconds": if a.offline { t_drain.elapsed().as_secs_f64() } else { 0.0 },
        "latencyUs": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": h.as_ref().map_or(0, |h| h.max())},
    });
    if a.json {
        println!("{summary}");
    } else {
        println!(
            "sent {sent} ({} msg/s), acknowledged {acked}; delivered {received} ({} msg/s), lost {}, out of order {}, duplicates {}",
            summary["sendRate"], summary["deliveredRate"], summary["lost"], summary["outOfOrder"], summary["duplicates"]
        );
        println!(
            "latency µs: p50 {} p90 {} p99 {} max {}",
            pct(0.5),
            pct(0.9),
            pct(0.99),
            summary["latencyUs"]["max"]
        );
    }
    ExitCode::SUCCESS
}

/// `--idle N`: holds N connected, idle clients (for measuring what an
/// idle connection costs the server) for --duration seconds.
async fn idle(u: &MqttUrl, n: usize, duration: Option<f64>) -> ExitCode {
    let stop = CancellationToken::new();
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let mut o = u.options(&format!("flotilla-idle-{i}"));
        o.set_keep_alive(Duration::from_secs(600));
        let (client, ev) = new_client(o, 1);
        let c = connected.clone();
        tasks.push((
            client,
            tokio::spawn(drive(ev, stop.clone(), move |e| {
                if let Event::Incoming(Packet::ConnAck(_)) = e {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            })),
        ));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (connected.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} idle connections open",
        connected.load(Ordering::Relaxed)
    );
    tokio::time::sleep(Duration::from_secs_f64(duration.unwrap_or(10.0))).await;
    stop.cancel();
    for (_, t) in tasks {
        let _ = t.await;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = MqttUrl::parse("mqtt://dev@iot:pw@127.0.0.1:1884").unwrap();
        assert_eq!(u.user.as_deref(), Some("dev@iot"));
        assert_eq!(u.password.as_deref(), Some("pw"));
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1884));
        let u = MqttUrl::parse("localhost").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.user), ("localhost", 1883, None));
        assert!(MqttUrl::parse("amqp://x").is_err());
    }
}
