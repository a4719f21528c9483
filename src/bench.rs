//! `flotilla bench`: a load generator for any AMQP 1.0 endpoint. N senders
//! and M receivers on their own connections; fixed body size; pre-settled
//! or unsettled; for a duration or a count; optionally at a fixed rate.
//! Each message carries its send time, so receivers measure latency into an
//! HDR histogram. `--listen` makes the receiving side a server the senders
//! connect to directly: the peer-to-peer ceiling with no router between.
//! `--senders 0` only receives: it drains what a queue already holds and
//! reports the rate from the first message to the last.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Args;
use flotilla_amqp::client::{Client, ClientError};
use flotilla_amqp::connection::{AttachReply, Connection, ConnectionConfig, Event};
use flotilla_amqp::message::{self, MessageParts};
use flotilla_amqp::transport::{self, AcceptConfig};
use flotilla_amqp::types::definitions::Role;
use flotilla_amqp::types::messaging::{Accepted, DeliveryState, Released};
use hdrhistogram::Histogram;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::tools::ConnArgs;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Address to send to and receive from.
    #[arg(long, default_value = "bench", env = "FLOTILLA_BENCH_ADDRESS")]
    pub address: String,
    /// 0: only receive (drain what the address already holds) until
    /// --count messages arrived; the rate is taken from the first to the last.
    #[arg(long, default_value_t = 1, env = "FLOTILLA_BENCH_SENDERS")]
    pub senders: usize,
    #[arg(long, default_value_t = 1, env = "FLOTILLA_BENCH_RECEIVERS")]
    pub receivers: usize,
    /// Body size in bytes (at least 8: the send time).
    #[arg(long, default_value_t = 100, env = "FLOTILLA_BENCH_SIZE")]
    pub size: usize,
    /// Send pre-settled (at-most-once).
    #[arg(long, env = "FLOTILLA_BENCH_PRESETTLED")]
    pub presettled: bool,
    /// Mark messages durable (header durable=true): brokers such as
    /// RabbitMQ persist only durable messages.
    #[arg(long, env = "FLOTILLA_BENCH_DURABLE")]
    pub durable: bool,
    /// Seconds to run for [default: 10; with --count, a bound only when given].
    #[arg(long, env = "FLOTILLA_BENCH_DURATION")]
    pub duration: Option<f64>,
    /// Total messages to send (with --senders 0: to receive).
    #[arg(long, env = "FLOTILLA_BENCH_COUNT")]
    pub count: Option<u64>,
    /// Total messages per second across senders (default: as fast as credit allows).
    #[arg(long, env = "FLOTILLA_BENCH_RATE")]
    pub rate: Option<u64>,
    /// Receivers' credit window.
    #[arg(long, default_value_t = 1000, env = "FLOTILLA_BENCH_CREDIT")]
    pub credit: u32,
    /// Be the receiving peer: listen here and point the senders at it.
    #[arg(long, env = "FLOTILLA_BENCH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the receivers connect, when not to --url (e.g. another router
    /// of a mesh).
    #[arg(long, env = "FLOTILLA_BENCH_RECEIVER_URL")]
    pub receiver_url: Option<String>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long, env = "FLOTILLA_BENCH_JSON")]
    pub json: bool,
    /// Measure an MQTT server instead (mqtt://[user[:password]@]host[:port]):
    /// --senders publishers and --receivers subscribers on topic --address,
    /// with rumqttc.
    #[arg(long, env = "FLOTILLA_BENCH_MQTT")]
    pub mqtt: Option<String>,
    /// MQTT QoS of publications and subscriptions (with --mqtt).
    #[arg(long, default_value_t = 0, env = "FLOTILLA_BENCH_QOS")]
    pub qos: u8,
    /// With --mqtt: the subscribers' persistent sessions are offline while
    /// the publishers send; then they reconnect and drain what was kept.
    #[arg(long, env = "FLOTILLA_BENCH_OFFLINE")]
    pub offline: bool,
    /// With --mqtt: only open this many idle connections and hold them for
    /// --duration seconds (to measure what an idle connection costs).
    #[arg(long, env = "FLOTILLA_BENCH_IDLE")]
    pub idle: Option<usize>,
}

/// With --count and no --duration, receivers-only mode gives up after this
/// long without a message (the address holds fewer than --count).
const IDLE_LIMIT: Duration = Duration::from_secs(10);

impl BenchArgs {
    /// Only receivers: measure draining what the address already holds.
    fn receivers_only(&self) -> bool {
        self.senders == 0
    }

    fn receiver_options(&self) -> Result<flotilla_amqp::client::ClientOptions, ClientError> {
        let mut conn = self.conn.clone();
        if let Some(u) = &self.receiver_url {
            conn.url = u.clone();
        }
        conn.options()
    }
}

struct Stats {
    sent: AtomicU64,
    accepted: AtomicU64,
    not_accepted: AtomicU64,
    received: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
    /// Send → outcome at the sender (unsettled): how long acceptance takes.
    accept: Mutex<Option<Histogram<u64>>>,
    /// Receive times (ns since `base`) of the first and last counted
    /// delivery, across receivers; `first_rx` is u64::MAX until one arrives.
    first_rx: AtomicU64,
    last_rx: AtomicU64,
    /// Senders that have ended.
    senders_done: AtomicUsize,
    /// Tells the main loop a sender ended or the receivers reached --count.
    done: Notify,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            not_accepted: AtomicU64::new(0),
            received: AtomicU64::new(0),
            latency: Mutex::new(None),
            accept: Mutex::new(None),
            first_rx: AtomicU64::new(u64::MAX),
            last_rx: AtomicU64::new(0),
            senders_done: AtomicUsize::new(0),
            done: Notify::new(),
        }
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits; the bounds are constants.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

impl Stats {
    fn merge(&self, h: &Histogram<u64>) {
        let mut g = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(all) => {
                let _ = all.add(h);
            }
            None => *g = Some(h.clone()),
        }
    }

    /// Counts one delivery unless `limit` were already counted; the one
    /// that reaches the limit wakes the main loop.
    fn count_received(&self, limit: u64) -> bool {
        let r = self
            .received
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                (r < limit).then_some(r + 1)
            });
        if r.ok().map(|before| before + 1) == Some(limit) {
            self.done.notify_one();
        }
        r.is_ok()
    }

    /// Seconds from the first counted delivery to the last (0 if fewer than two).
    fn receive_span(&self) -> f64 {
        let (first, last) = (
            self.first_rx.load(Ordering::Relaxed),
            self.last_rx.load(Ordering::Relaxed),
        );
        if first == u64::MAX || last <= first {
            0.0
        } else {
            (last - first) as f64 / 1e9
        }
    }
}

/// Records one delivery's latency from the send time in its body.
fn record(h: &mut Histogram<u64>, payload: &[u8]) {
    use flotilla_broker::selector::{Fields as _, MessageFields, Value};
    // A C Proton `cload` sender stamps the application property `t`
    // (microseconds of the realtime clock): the listening peer times its
    // messages too, for a peer-to-peer figure with that client.
    if payload.len() < 256 {
        if let Value::Long(t) = MessageFields::from_message(payload).field("t") {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64);
            let _ = h.record((now.saturating_sub(t).max(0) as u64 * 1000).max(1));
            return;
        }
    }
    if let Some(b) = message::body_bytes(payload) {
        if b.len() >= 8 {
            let sent = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
            let _ = h.record(now_ns().saturating_sub(sent).max(1));
        }
    }
}

pub async fn run(mut a: BenchArgs) -> ExitCode {
    if a.size < 8 {
        eprintln!("flotilla bench: --size must be at least 8");
        return ExitCode::from(64);
    }
    if a.duration.is_some_and(|d| !(d.is_finite() && d >= 0.0)) {
        eprintln!("flotilla bench: --duration must be a number of seconds, 0 or more");
        return ExitCode::from(64);
    }
    if a.receivers_only() && a.receivers == 0 && a.listen.is_none() {
        eprintln!("flotilla bench: --senders 0 needs --receivers of at least 1, or --listen (another client sends)");
        return ExitCode::from(64);
    }
    base();
    let stats = Arc::new(Stats::default());
    let stop_receivers = CancellationToken::new();
    let mut receivers = Vec::new();
    if let Some(addr) = a.listen {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("flotilla bench: cannot listen on {addr}: {e}");
                return ExitCode::from(64);
            }
        };
        let bound = listener.local_addr().unwrap_or(addr);
        eprintln!("listening on {bound} (peer-to-peer: senders connect here)");
        a.conn.url = format!("amqp://{bound}");
        receivers.push(tokio::spawn(listen(
            listener,
            a.clone(),
            stats.clone(),
            stop_receivers.clone(),
        )));
    } else {
        for _ in 0..a.receivers {
            let (a, s, stop) = (a.clone(), stats.clone(), stop_receivers.clone());
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            receivers.push(tokio::spawn(
                async move { receiver(a, s, stop, ready_tx).await },
            ));
            match ready_rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    eprintln!("flotilla bench: receiver: {e}");
                    return ExitCode::FAILURE;
                }
                Err(_) => return ExitCode::FAILURE,
            }
        }
    }
    let start = Instant::now();
    let stop_senders = CancellationToken::new();
    let remaining = Arc::new(AtomicU64::new(a.count.unwrap_or(u64::MAX)));
    let mut senders = Vec::new();
    for _ in 0..a.senders {
        let (a, s, stop, rem) = (
            a.clone(),
            stats.clone(),
            stop_senders.clone(),
            remaining.clone(),
        );
        senders.push(tokio::spawn(async move {
            let r = sender(a, s.clone(), stop, rem).await;
            s.senders_done.fetch_add(1, Ordering::Relaxed);
            s.done.notify_one();
            r
        }));
    }
    // Progress once a second; stop after the duration (a bound with --count
    // only when given), when the senders are done or, receiving only, at
    // --count or after IDLE_LIMIT without a message.
    let deadline = (a.count.is_none() || a.duration.is_some())
        .then(|| start + Duration::from_secs_f64(a.duration.unwrap_or(10.0)));
    let mut last = (0u64, 0u64);
    let mut last_progress = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        let now = Instant::now();
        let done = if a.receivers_only() {
            let r = stats.received.load(Ordering::Relaxed);
            a.count.is_some_and(|c| r >= c)
                || receivers.iter().all(|r| r.is_finished())
                || (deadline.is_none() && now.duration_since(last_progress) >= IDLE_LIMIT)
        } else {
            stats.senders_done.load(Ordering::Relaxed) == senders.len()
        };
        if done || deadline.is_some_and(|d| now >= d) {
            break;
        }
        // Wake at once when a sender ends or the count is reached: a
        // --count run is timed to its end, not to the next tick.
        let until = deadline.unwrap_or(now + Duration::from_secs(3600));
        tokio::select! {
            _ = tick.tick() => {}
            _ = stats.done.notified() => continue,
            _ = tokio::time::sleep_until(until.into()) => continue,
        }
        let (s, r) = (
            stats.sent.load(Ordering::Relaxed),
            stats.received.load(Ordering::Relaxed),
        );
        eprintln!(
            "{:>5.1}s  sent {:>9} msg/s  received {:>9} msg/s",
            start.elapsed().as_secs_f64(),
            s - last.0,
            r - last.1
        );
        if r > last.1 {
            last_progress = Instant::now();
        }
        last = (s, r);
    }
    stop_senders.cancel();
    let mut failed = false;
    for s in senders {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("flotilla bench: sender: {e}");
                failed = true;
            }
            Err(e) => {
                eprintln!("flotilla bench: sender task: {e}");
                failed = true;
            }
        }
    }
    let send_time = start.elapsed();
    // Let receivers take what is in flight (bounded).
    let sent = stats.sent.load(Ordering::Relaxed);
    let drain_until = Instant::now() + Duration::from_secs(10);
    let receiving = a.receivers > 0 || a.listen.is_some();
    while receiving && stats.received.load(Ordering::Relaxed) < sent && Instant::now() < drain_until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    stop_receivers.cancel();
    for r in receivers {
        let _ = r.await;
    }
    report(&a, &stats, send_time, elapsed);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn report(a: &BenchArgs, stats: &Stats, send_time: Duration, elapsed: Duration) {
    let sent = stats.sent.load(Ordering::Relaxed);
    let accepted = stats.accepted.load(Ordering::Relaxed);
    let received = stats.received.load(Ordering::Relaxed);
    let not_accepted = stats.not_accepted.load(Ordering::Relaxed);
    // Receiving only, there is no latency to report (the messages carry
    // the time they were sent, before this run) and nothing was sent: the
    // quantiles are null in JSON and n/a in text — except listening for
    // another client's sender, whose messages carry their send time.
    let timed = !a.receivers_only() || a.listen.is_some();
    let take = |m: &Mutex<Option<Histogram<u64>>>| {
        timed.then(|| {
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(new_hist)
        })
    };
    let h = take(&stats.latency);
    let acc = take(&stats.accept);
    let q_us = |h: &Option<Histogram<u64>>, q: f64| {
        h.as_ref().map(|h| {
            if q >= 1.0 {
                h.max() as f64 / 1000.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            }
        })
    };
    let json_us = |v: Option<f64>| v.map_or_else(|| "null".to_string(), |v| format!("{v:.1}"));
    // Receiving only, the run is timed from the first delivery to the last.
    let seconds = if a.receivers_only() {
        stats.receive_span()
    } else {
        send_time.as_secs_f64()
    };
    let send_rate = if a.receivers_only() {
        0.0
    } else {
        sent as f64 / send_time.as_secs_f64()
    };
    let recv_rate = if a.receivers_only() {
        if seconds > 0.0 {
            received as f64 / seconds
        } else {
            0.0
        }
    } else {
        received as f64
            / elapsed
                .as_secs_f64()
                .min(send_time.as_secs_f64().max(1e-9))
                .max(1e-9)
    };
    let mode = if a.presettled {
        "pre-settled"
    } else {
        "unsettled"
    };
    let durable = a.durable;
    if a.json {
        out!(
            "{{\"senders\":{},\"receivers\":{},\"size\":{},\"mode\":\"{mode}\",\"durable\":{durable},\"seconds\":{seconds:.3},\"sent\":{sent},\"accepted\":{accepted},\"not_accepted\":{not_accepted},\"received\":{received},\"send_rate\":{send_rate:.0},\"receive_rate\":{recv_rate:.0},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"accept_p50_us\":{},\"accept_p99_us\":{}}}",
            a.senders,
            a.receivers,
            a.size,
            json_us(q_us(&h, 0.5)),
            json_us(q_us(&h, 0.99)),
            json_us(q_us(&h, 0.999)),
            json_us(q_us(&h, 1.0)),
            json_us(q_us(&acc, 0.5)),
            json_us(q_us(&acc, 0.99)),
        );
        return;
    }
    if a.receivers_only() {
        out!(
            "flotilla bench: 0 senders, {} receiver(s), {seconds:.1} s from the first message to the last",
            a.receivers
        );
    } else {
        out!(
            "flotilla bench: {} sender(s), {} receiver(s), {} B bodies, {mode}{}, {seconds:.1} s",
            a.senders,
            a.receivers,
            a.size,
            if durable { ", durable" } else { "" },
        );
    }
    if !a.receivers_only() {
        out!("  sent     {sent:>10}  ({send_rate:.0} msg/s)");
        if !a.presettled {
            let (p50, p99) = (
                q_us(&acc, 0.5).unwrap_or_default(),
                q_us(&acc, 0.99).unwrap_or_default(),
            );
            out!("  accepted {accepted:>10}  (not accepted: {not_accepted}; send → outcome p50 {p50:.1} µs, p99 {p99:.1} µs)");
        }
    }
    out!("  received {received:>10}  ({recv_rate:.0} msg/s)");
    match &h {
        Some(_) => out!(
            "  latency  p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  max {:.1} µs",
            q_us(&h, 0.5).unwrap_or_default(),
            q_us(&h, 0.99).unwrap_or_default(),
            q_us(&h, 0.999).unwrap_or_default(),
            q_us(&h, 1.0).unwrap_or_default(),
        ),
        None => out!(
            "  latency  n/a (receivers only: the messages were stamped when they were sent, before this run)"
        ),
    }
}

async fn sender(
    a: BenchArgs,
    stats: Arc<Stats>,
    stop: CancellationToken,
    remaining: Arc<AtomicU64>,
) -> Result<(), ClientError> {
    let mut c = Client::connect(&a.conn.options()?).await?;
    let link = c.open_sender(Some(&a.address), a.presettled).await?;
    let body = vec![0u8; a.size];
    let template = message::encode_message(&MessageParts {
        durable: a.durable,
        body: &body,
        ..Default::default()
    });
    let at = template.len() - a.size;
    let mut buf = template.to_vec();
    let interval = a
        .rate
        .map(|r| Duration::from_secs_f64(a.senders as f64 / r.max(1) as f64));
    let mut next_send = Instant::now();
    let (mut sent, mut settled) = (0u64, 0u64);
    let mut accept_hist = new_hist();
    let mut finished = false;
    loop {
        if stop.is_cancelled() {
            finished = true;
        }
        if !finished {
            while c.conn.link(link).is_some_and(|l| l.credit > 0) {
                if let Some(iv) = interval {
                    if Instant::now() < next_send {
                        break;
                    }
                    next_send += iv;
                }
                if remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
                    .is_err()
                {
                    finished = true;
                    break;
                }
                buf[at..at + 8].copy_from_slice(&now_ns().to_be_bytes());
                // The token carries the send time, for the accept latency.
                c.conn.send(link, &buf, a.presettled, now_ns());
                sent += 1;
                stats.sent.fetch_add(1, Ordering::Relaxed);
                if a.presettled {
                    settled += 1;
                }
                if sent % 64 == 0 {
                    break;
                }
            }
        }
        if finished && settled >= sent {
            break;
        }
        c.flush().await?;
        let ev = if !finished && c.conn.link(link).is_some_and(|l| l.credit > 0) {
            match interval {
                Some(_) => {
                    tokio::select! {
                        ev = c.next_event() => Some(ev?),
                        _ = tokio::time::sleep_until(next_send.into()) => None,
                        _ = stop.cancelled() => None,
                    }
                }
                None => c.try_event(),
            }
        } else if finished {
            match tokio::time::timeout(Duration::from_secs(10), c.next_event()).await {
                Ok(ev) => Some(ev?),
                Err(_) => break,
            }
        } else {
            tokio::select! {
                ev = c.next_event() => Some(ev?),
                _ = stop.cancelled() => None,
            }
        };
        let Some(ev) = ev else { continue };
        let mut handle = |ev: Event| -> Result<(), ClientError> {
            match ev {
                Event::Outcome { state, token, .. } => {
                    settled += 1;
                    let _ = accept_hist.record(now_ns().saturating_sub(token).max(1));
                    match state {
                        Some(DeliveryState::Accepted(_)) => {
                            stats.accepted.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => stats.not_accepted.fetch_add(1, Ordering::Relaxed),
                    };
                }
                Event::Detach { error, .. } => return Err(ClientError::Refused(error)),
                Event::Close { error } => return Err(ClientError::Closed(error)),
                _ => {}
            }
            Ok(())
        };
        handle(ev)?;
        while let Some(ev) = c.try_event() {
            handle(ev)?;
        }
    }
    {
        let mut g = stats.accept.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(all) => {
                let _ = all.add(&accept_hist);
            }
            None => *g = Some(accept_hist),
        }
    }
    c.close().await;
    Ok(())
}

async fn receiver(
    a: BenchArgs,
    stats: Arc<Stats>,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<Result<(), ClientError>>,
) {
    let setup = async {
        let mut c = Client::connect(&a.receiver_options()?).await?;
        let (link, _) = c.open_receiver(Some(&a.address), a.credit).await?;
        c.flush().await?;
        Ok::<_, ClientError>((c, link))
    };
    let (mut c, link) = match setup.await {
        Ok(x) => {
            let _ = ready.send(Ok(()));
            x
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut h = new_hist();
    // Receiving only, take exactly --count across receivers; the time of
    // each counted delivery bounds the measured span.
    let (limit, timed) = match (a.receivers_only(), a.count) {
        (true, Some(n)) => (n, true),
        (true, None) => (u64::MAX, true),
        (false, _) => (u64::MAX, false),
    };
    let (mut first, mut last) = (u64::MAX, 0u64);
    let mut full = false;
    loop {
        let ev = tokio::select! {
            ev = c.next_event() => ev,
            _ = stop.cancelled() => break,
        };
        match ev {
            Ok(Event::Delivery { delivery, .. }) => {
                let counted = stats.count_received(limit);
                if !counted {
                    // Past --count: stop asking and give it back to the
                    // queue (the Flow goes out first, so it is not resent).
                    if !full {
                        full = true;
                        c.conn.flow(link, 0, false);
                    }
                    if !delivery.settled {
                        c.conn
                            .settle(delivery.id, DeliveryState::Released(Released {}));
                    }
                    continue;
                }
                if timed {
                    let t = now_ns();
                    first = first.min(t);
                    last = t;
                } else {
                    record(&mut h, &delivery.payload);
                }
                if !delivery.settled {
                    c.conn
                        .settle(delivery.id, DeliveryState::Accepted(Accepted {}));
                }
                if !full && c.conn.link(link).is_some_and(|l| l.credit <= a.credit / 2) {
                    c.conn.flow(link, a.credit, false);
                }
            }
            Ok(Event::Detach { error, .. }) => {
                eprintln!("flotilla bench: receiver detached: {error:?}");
                break;
            }
            Ok(Event::Close { .. }) | Err(_) => break,
            Ok(_) => {}
        }
    }
    stats.merge(&h);
    if first != u64::MAX {
        stats.first_rx.fetch_min(first, Ordering::Relaxed);
        stats.last_rx.fetch_max(last, Ordering::Relaxed);
    }
    c.close().await;
}

async fn listen(
    l: tokio::net::TcpListener,
    a: BenchArgs,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut tasks = Vec::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stop.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let (a, stats, stop) = (a.clone(), stats.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(est) = transport::accept(
                tcp,
                peer,
                &AcceptConfig::default(),
                &transport::AllowAnonymous,
            )
            .await
            else {
                return;
            };
            let h = serve_peer(est.io, est.read_buf, &a, &stats, stop).await;
            stats.merge(&h);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// The listening peer: accepts every sender, grants credit, accepts and
/// times every delivery.
struct Peer<'a> {
    conn: Connection,
    a: &'a BenchArgs,
    stats: &'a Stats,
    h: Histogram<u64>,
    stop: CancellationToken,
    closing: bool,
}

impl flotilla_amqp::driver::Handler for Peer<'_> {
    type Signal = ();

    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn signal(&mut self) -> impl std::future::Future<Output = Option<()>> + Send {
        let stop = self.stop.clone();
        async move {
            stop.cancelled().await;
            Some(())
        }
    }

    fn on_signal(&mut self, _: ()) {
        self.closing = true;
        self.conn.close(None);
    }

    fn on_event(&mut self, ev: Event) {
        let conn = &mut self.conn;
        match ev {
            Event::Open(_) => conn.open(),
            Event::Attach {
                link,
                attach,
                reply: false,
            } => {
                conn.accept_attach(link, AttachReply::mirroring(&attach));
                if attach.role == Role::Sender {
                    conn.flow(link, self.a.credit, false);
                }
            }
            Event::Delivery { link, delivery } => {
                record(&mut self.h, &delivery.payload);
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                if !delivery.settled {
                    conn.settle(delivery.id, DeliveryState::Accepted(Accepted {}));
                }
                if conn
                    .link(link)
                    .is_some_and(|l| l.credit <= self.a.credit / 2)
                {
                    conn.flow(link, self.a.credit, false);
                }
            }
            Event::Close { .. } => self.closing = true,
            _ => {}
        }
    }

    fn closing(&self) -> bool {
        self.closing
    }
}

async fn serve_peer(
    io: transport::BoxIo,
    buf: BytesMut,
    a: &BenchArgs,
    stats: &Stats,
    stop: CancellationToken,
) -> Histogram<u64> {
    let conn = Connection::new(ConnectionConfig {
        container_id: "flotilla-bench-peer".into(),
        ..Default::default()
    });
    let mut peer = Peer {
        conn,
        a,
        stats,
        h: new_hist(),
        stop,
        closing: false,
    };
    flotilla_amqp::driver::Driver::new(io, buf, Default::default())
        .run(&mut peer)
        .await;
    peer.h
}
