//! `flotilla send` and `flotilla receive`: move messages by hand, against
//! any AMQP 1.0 endpoint.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use flotilla_amqp::client::{redact, Client, ClientError, ClientOptions};
use flotilla_amqp::connection::Event;
use flotilla_amqp::message::{self, MessageParts};
use flotilla_amqp::types::messaging::{Accepted, DeliveryState};

/// Where to connect, shared by the tools.
#[derive(Args, Clone, Debug)]
pub struct ConnArgs {
    /// amqp[s]://[user[:password]@]host[:port]
    #[arg(long, default_value = "amqp://127.0.0.1:5672", env = "FLOTILLA_URL")]
    pub url: String,
    /// Address space (Open hostname); default: the url's host.
    #[arg(long, env = "FLOTILLA_SPACE")]
    pub space: Option<String>,
    /// Authenticate with SCRAM-SHA-256 instead of PLAIN.
    #[arg(long, env = "FLOTILLA_SCRAM")]
    pub scram: bool,
    /// CA certificate (PEM) that signed the server's certificate (amqps).
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl ConnArgs {
    pub fn options(&self) -> Result<ClientOptions, ClientError> {
        let mut o = ClientOptions::from_url(&self.url)?;
        o.vhost = self.space.clone();
        o.scram = self.scram;
        o.tls_ca = self.tls_ca.clone();
        Ok(o)
    }
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Target address; empty string = anonymous relay (uses --to).
    pub address: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// How many messages.
    #[arg(long, short = 'c', default_value_t = 1, env = "FLOTILLA_SEND_COUNT")]
    pub count: u64,
    /// Message body (text); `{n}` is replaced by the message number.
    #[arg(
        long,
        short = 'b',
        default_value = "message {n}",
        env = "FLOTILLA_SEND_BODY"
    )]
    pub body: String,
    /// Send pre-settled (at-most-once) instead of waiting for outcomes.
    #[arg(long, env = "FLOTILLA_SEND_PRESETTLED")]
    pub presettled: bool,
    /// `to` property (for anonymous relay).
    #[arg(long, env = "FLOTILLA_SEND_TO")]
    pub to: Option<String>,
    /// Target capability, repeatable: `queue` or `topic` asks for a
    /// broker-held address where undeclared addresses are allowed.
    #[arg(long, env = "FLOTILLA_SEND_CAPABILITY")]
    pub capability: Vec<String>,
    /// Give up after this many seconds without progress.
    #[arg(long, default_value_t = 30, env = "FLOTILLA_SEND_TIMEOUT")]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Source address.
    pub address: String,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Stop after this many messages (0 = run until interrupted).
    #[arg(long, short = 'c', default_value_t = 0, env = "FLOTILLA_RECEIVE_COUNT")]
    pub count: u64,
    /// Credit window.
    #[arg(long, default_value_t = 100, env = "FLOTILLA_RECEIVE_CREDIT")]
    pub credit: u32,
    /// Source capability, repeatable: `queue` or `topic` asks for a
    /// broker-held address where undeclared addresses are allowed.
    #[arg(long, env = "FLOTILLA_RECEIVE_CAPABILITY")]
    pub capability: Vec<String>,
    /// Give up after this many seconds without a message (0 = never).
    #[arg(long, default_value_t = 0, env = "FLOTILLA_RECEIVE_TIMEOUT")]
    pub timeout: u64,
}

fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    eprintln!("flotilla: {what}: {e}");
    ExitCode::FAILURE
}

pub async fn send(a: SendArgs) -> ExitCode {
    match send_inner(&a).await {
        Ok((accepted, other)) => {
            eprintln!(
                "sent {} message(s) to {:?}: {accepted} accepted, {other} not accepted",
                a.count, a.address
            );
            if other > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(&format!("send to {}", redact(&a.conn.url)), e),
    }
}

async fn send_inner(a: &SendArgs) -> Result<(u64, u64), ClientError> {
    let mut c = Client::connect(&a.conn.options()?).await?;
    let target = (!a.address.is_empty()).then_some(a.address.as_str());
    let link = c
        .open_sender_with(target, a.presettled, &a.capability)
        .await?;
    let (mut sent, mut accepted, mut other) = (0u64, 0u64, 0u64);
    let timeout = Duration::from_secs(a.timeout);
    while accepted + other < a.count {
        while sent < a.count && c.conn.link(link).is_some_and(|l| l.credit > 0) {
            let body = a.body.replace("{n}", &(sent + 1).to_string());
            let id = format!("{}", sent + 1);
            let m = message::encode_message(&MessageParts {
                message_id: Some(&id),
                to: a.to.as_deref(),
                body: body.as_bytes(),
                text: true,
                ..Default::default()
            });
            c.conn.send(link, &m, a.presettled, sent);
            sent += 1;
            if a.presettled {
                accepted += 1;
            }
        }
        if accepted + other >= a.count {
            break;
        }
        let ev = tokio::time::timeout(timeout, c.next_event())
            .await
            .map_err(|_| ClientError::Timeout("credit or outcomes (no receiver?)"))??;
        match ev {
            Event::Outcome { state, .. } => match state {
                Some(DeliveryState::Accepted(_)) => accepted += 1,
                s => {
                    eprintln!("message not accepted: {s:?}");
                    other += 1;
                }
            },
            Event::Detach { error, .. } => return Err(ClientError::Refused(error)),
            Event::Close { error } => return Err(ClientError::Closed(error)),
            _ => {}
        }
    }
    c.flush().await?;
    c.close().await;
    Ok((accepted, other))
}

pub async fn receive(a: ReceiveArgs) -> ExitCode {
    match receive_inner(&a).await {
        Ok(n) => {
            eprintln!("received {n} message(s) from {:?}", a.address);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("receive from {}", redact(&a.conn.url)), e),
    }
}

async fn receive_inner(a: &ReceiveArgs) -> Result<u64, ClientError> {
    let mut c = Client::connect(&a.conn.options()?).await?;
    let credit = if a.count > 0 {
        a.credit.min(a.count as u32).max(1)
    } else {
        a.credit.max(1)
    };
    let (link, _) = c
        .open_receiver_with(Some(&a.address), credit, &a.capability)
        .await?;
    let mut n = 0u64;
    let timeout = if a.timeout > 0 {
        Duration::from_secs(a.timeout)
    } else {
        Duration::from_secs(u64::MAX / 4)
    };
    while a.count == 0 || n < a.count {
        let ev = tokio::time::timeout(timeout, c.next_event())
            .await
            .map_err(|_| ClientError::Timeout("a message"))??;
        match ev {
            Event::Delivery { delivery, .. } => {
                n += 1;
                let body = message::body_bytes(&delivery.payload)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|| format!("<{} bytes>", delivery.payload.len()));
                out!("{body}");
                if !delivery.settled {
                    c.conn
                        .settle(delivery.id, DeliveryState::Accepted(Accepted {}));
                }
                let left = if a.count == 0 { u64::MAX } else { a.count - n };
                if c.conn.link(link).is_some_and(|l| l.credit <= credit / 2)
                    && left > u64::from(c.conn.link(link).map_or(0, |l| l.credit))
                {
                    c.conn.flow(
                        link,
                        credit.min(left.min(u64::from(u32::MAX)) as u32),
                        false,
                    );
                }
            }
            Event::Detach { error, .. } => return Err(ClientError::Refused(error)),
            Event::Close { error } => return Err(ClientError::Closed(error)),
            _ => {}
        }
    }
    c.flush().await?;
    c.close().await;
    Ok(n)
}

#[derive(Args, Debug)]
pub struct StatArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Print the JSON document as it came.
    #[arg(long, env = "FLOTILLA_STAT_JSON")]
    pub json: bool,
    /// Also show this broker's queues (URL of the broker's own listener,
    /// e.g. amqp://127.0.0.1:5673 under `flotilla up`).
    #[arg(long, env = "FLOTILLA_STAT_BROKER")]
    pub broker: Option<String>,
    /// Log in with the mesh secret (as an operator's tool: a component) and
    /// see every address space; else a client sees its own space only.
    #[arg(long, env = "FLOTILLA_MESH_SECRET_FILE")]
    pub mesh_secret_file: Option<PathBuf>,
    /// Ask an MQTT gateway instead (mqtt://[user[:password]@]host[:port]):
    /// its sessions, subscriptions, in-flight and dropped counts.
    #[arg(long, env = "FLOTILLA_STAT_MQTT")]
    pub mqtt: Option<String>,
    /// Ask the last-will service instead, through the router at --url
    /// (needs --mesh-secret-file): wills held, registered, cancelled and
    /// fired per space, and live wills per gateway connection.
    #[arg(long, requires = "mesh_secret_file", env = "FLOTILLA_STAT_LWT")]
    pub lwt: bool,
}

/// `flotilla stat`: asks a router or a broker for its `$stat` document.
pub async fn stat(a: StatArgs) -> ExitCode {
    let code = stat_one(&a, &a.conn.url).await;
    match &a.broker {
        Some(b) => {
            out!();
            stat_one(&a, b).await
        }
        None => code,
    }
}

async fn stat_one(a: &StatArgs, url: &str) -> ExitCode {
    let mut conn = a.conn.clone();
    conn.url = url.to_string();
    let mesh = match a
        .mesh_secret_file
        .as_deref()
        .map(flotilla_core::auth::MeshSecret::load)
        .transpose()
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!("flotilla stat: {e}");
            return ExitCode::from(64);
        }
    };
    let doc = async {
        let mut opts = conn.options()?;
        if let Some(m) = &mesh {
            opts.user = Some(flotilla_core::auth::MeshSecret::username("flotilla-stat"));
            opts.password = Some(m.secret().to_string());
            opts.scram = true;
        }
        let mut c = Client::connect(&opts).await?;
        c.open_receiver(Some(if a.lwt { "$lwt" } else { "$stat" }), 1)
            .await?;
        let body = loop {
            match tokio::time::timeout(Duration::from_secs(10), c.next_event())
                .await
                .map_err(|_| ClientError::Timeout("the router's state"))??
            {
                Event::Delivery { delivery, .. } => {
                    break message::body_bytes(&delivery.payload).unwrap_or_default()
                }
                Event::Detach { error, .. } => return Err(ClientError::Refused(error)),
                Event::Close { error } => return Err(ClientError::Closed(error)),
                _ => {}
            }
        };
        c.close().await;
        Ok::<_, ClientError>(body)
    }
    .await;
    let body = match doc {
        Ok(b) => b,
        Err(e) => return fail(&format!("stat {}", redact(url)), e),
    };
    if a.json {
        out!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return fail("stat", e),
    };
    if v["kind"] == "broker" {
        print_broker_stat(&v);
    } else if v["component"] == "lwt" {
        print_lwt_stat(&v);
    } else {
        print_stat(&v);
    }
    ExitCode::SUCCESS
}

fn print_lwt_stat(v: &serde_json::Value) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    out!("last-will service  {} wills held", n(&v["wills"]));
    out!(
        "{:<20} {:>8} {:>10} {:>9} {:>11} {:>9} {:>12} {:>8}",
        "SPACE",
        "HELD",
        "REGISTERED",
        "CANCELLED",
        "FIRED-LOST",
        "FIRED-GW",
        "FIRED-ASKED",
        "DROPPED"
    );
    for (space, c) in v["spaces"].as_object().into_iter().flatten() {
        out!(
            "{:<20} {:>8} {:>10} {:>9} {:>11} {:>9} {:>12} {:>8}",
            space,
            n(&c["held"]),
            n(&c["registered"]),
            n(&c["cancelled"]),
            n(&c["fired"]["connectionLost"]),
            n(&c["fired"]["gatewayLost"]),
            n(&c["fired"]["asked"]),
            n(&c["droppedOrphans"])
        );
    }
    let gateways = v["gateways"].as_object();
    if gateways.is_some_and(|g| !g.is_empty()) {
        out!("live wills by gateway connection:");
        for (g, k) in gateways.into_iter().flatten() {
            out!("  {g}  {}", n(k));
        }
    }
}

fn print_broker_stat(v: &serde_json::Value) {
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    let m = &v["memory"];
    out!(
        "broker {}  bodies in memory {} of {} bytes, {} paged out, {} read back",
        s(&v["id"]),
        s(&m["held"]),
        s(&m["limit"]),
        s(&m["pagedOut"]),
        s(&m["pagedIn"])
    );
    out!(
        "  {:<12} {:<32} {:>8} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8}",
        "space",
        "queue",
        "depth",
        "unsettled",
        "consumers",
        "in/s",
        "out/s",
        "expired",
        "dead"
    );
    for q in v["queues"].as_array().into_iter().flatten() {
        let name = match q["subscription"].as_object() {
            Some(sub) => format!("{} (on {})", s(&q["address"]), s(&sub["topic"])),
            None => s(&q["address"]),
        };
        out!(
            "  {:<12} {:<32} {:>8} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8}",
            s(&q["space"]),
            name,
            s(&q["depth"]),
            s(&q["unsettled"]),
            s(&q["consumers"]),
            s(&q["inRate"]),
            s(&q["outRate"]),
            s(&q["expired"]),
            s(&q["deadLettered"])
        );
    }
}

fn print_stat(v: &serde_json::Value) {
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    out!("router {}  connections {}", s(&v["id"]), v["connections"]);
    if let Some(m) = v["mesh"].as_object() {
        out!("\nRouters in the mesh");
        out!("  {:<24} {:<24} {:>5}", "router", "next hop", "cost");
        for r in m["routes"].as_array().into_iter().flatten() {
            out!("  {:<24} {:<24} {:>5}", s(&r[0]), s(&r[1]), r[2]);
        }
        let n = strings(&m["neighbors"]);
        out!(
            "  neighbours: {}",
            if n.is_empty() {
                "none".to_string()
            } else {
                n.join(", ")
            }
        );
    }
    let brokers: Vec<String> = v["brokers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| format!("{} (at {})", s(&b[0]), s(&b[1])))
        .collect();
    if !brokers.is_empty() {
        out!("brokers: {}", brokers.join(", "));
    }
    out!("\nLinks");
    out!(
        "  {:>10} {:<4} {:<32} {:>9}",
        "connection",
        "dir",
        "address",
        "unsettled"
    );
    for l in v["links"].as_array().into_iter().flatten() {
        let unsettled = l["unsettled"]
            .as_u64()
            .map_or("-".to_string(), |n| n.to_string());
        out!(
            "  {:>10} {:<4} {:<32} {:>9}",
            l["connection"],
            s(&l["dir"]),
            s(&l["address"]),
            unsettled
        );
    }
    out!("\nAddresses");
    out!(
        "  {:<32} {:<9} {:>6} {:<16} {:>7} {:>7} {:>10} {:>8}",
        "address",
        "type",
        "local",
        "remote via",
        "senders",
        "waiting",
        "delivered",
        "dropped"
    );
    for a in v["addresses"].as_array().into_iter().flatten() {
        let via = strings(&a["remote_via"]);
        out!(
            "  {:<32} {:<9} {:>6} {:<16} {:>7} {:>7} {:>10} {:>8}",
            s(&a["address"]),
            s(&a["type"]),
            a["local_receivers"],
            if via.is_empty() {
                "-".to_string()
            } else {
                via.join(",")
            },
            a["senders"],
            a["waiting"],
            a["delivered"],
            a["dropped"]
        );
    }
}

/// A JSON array's items as text.
fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| x.to_string())
        })
        .collect()
}
