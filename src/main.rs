//! The `flotilla` binary: parses arguments, initialises tracing, validates
//! config, and calls a component's `run` — or one of the tools for people
//! (`send`, `receive`, `bench`).

#![forbid(unsafe_code)]

/// Prints a line to stdout like `println!`, but a closed pipe (`flotilla
/// stat | head`) ends the program quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod bench;
mod mqtt;
mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use flotilla_core::config::Tenancy;
use flotilla_router::RouterConfig;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad command line or config (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Messaging-as-a-service: AMQP 1.0 router mesh, brokers, MQTT gateway"
)]
struct Cli {
    /// Log as JSON lines (for Kubernetes).
    #[arg(long, global = true, env = "FLOTILLA_LOG_JSON")]
    log_json: bool,
    /// Runtime worker threads (default: one per core).
    #[arg(long, global = true, env = "FLOTILLA_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on this machine: router(s), a broker, the MQTT
    /// gateway, the last-will service and the console.
    Up(UpArgs),
    /// Run an AMQP 1.0 router.
    Router(RouterCmd),
    /// Run a broker: durable queues and topics on the broker's own journal.
    Broker(BrokerArgs),
    /// Run the control plane: the REST API and the watch routers follow.
    Console(ConsoleServeArgs),
    /// Run the MQTT gateway: MQTT 3.1.1 and 5.0 clients on the mesh.
    MqttGateway(GatewayArgs),
    /// Run the last-will service: MQTT and AMQP clients' wills, kept on
    /// disk, published when a client's connection (or its gateway) is lost.
    Lwt(LwtArgs),
    /// Send messages to an address.
    Send(tools::SendArgs),
    /// Receive messages from an address and print them.
    Receive(tools::ReceiveArgs),
    /// Measure throughput and latency against any AMQP 1.0 endpoint.
    Bench(bench::BenchArgs),
    /// Show a router's view: mesh routes, connections, addresses.
    Stat(tools::StatArgs),
}

/// Following the control plane.
#[derive(Args, Clone, Default)]
struct ConsoleArgs {
    /// Follow this console (http://HOST:PORT) for address spaces,
    /// addresses and users; they replace --config as they change.
    #[arg(long, env = "FLOTILLA_CONSOLE")]
    console: Option<String>,
    /// File with the console's admin token (else the environment variable
    /// FLOTILLA_ADMIN_TOKEN).
    #[arg(long, env = "FLOTILLA_CONSOLE_TOKEN_FILE")]
    console_token_file: Option<PathBuf>,
}

impl ConsoleArgs {
    fn link(&self) -> Result<Option<flotilla_core::watch::ConsoleLink>, String> {
        let Some(url) = &self.console else {
            return Ok(None);
        };
        let token = match &self.console_token_file {
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| format!("--console-token-file {}: {e}", f.display()))?
                .trim()
                .to_string(),
            None => admin_token_from_env().ok_or_else(|| {
                "--console needs the admin token: --console-token-file or FLOTILLA_ADMIN_TOKEN"
                    .to_string()
            })?,
        };
        if !url.starts_with("http://") {
            return Err(format!("--console {url:?}: expected http://HOST:PORT"));
        }
        Ok(Some(flotilla_core::watch::ConsoleLink {
            url: url.clone(),
            token,
        }))
    }
}

/// The admin token from the environment (FLOTILLA_ADMIN_TOKEN; the older
/// FLOTILLA_CONSOLE_TOKEN too).
fn admin_token_from_env() -> Option<String> {
    ["FLOTILLA_ADMIN_TOKEN", "FLOTILLA_CONSOLE_TOKEN"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The mesh secret from `--mesh-secret-file`.
fn mesh_secret(
    path: Option<&std::path::Path>,
) -> Result<Option<flotilla_core::auth::MeshSecret>, String> {
    path.map(|p| flotilla_core::auth::MeshSecret::load(p).map_err(|e| e.to_string()))
        .transpose()
}

/// Limits on who connects, shared by the router's and the broker's
/// listeners.
#[derive(Args, Clone)]
struct LimitArgs {
    /// Established connections at most.
    #[arg(long, env = "FLOTILLA_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Handshakes (TLS, SASL) in progress at once.
    #[arg(long, env = "FLOTILLA_MAX_HANDSHAKES", default_value_t = 500)]
    max_handshakes: usize,
    /// Seconds a handshake may take.
    #[arg(long, env = "FLOTILLA_HANDSHAKE_TIMEOUT", default_value_t = 5)]
    handshake_timeout: u64,
    /// New connections per second from one source address (bursts of
    /// twice as many; 0 = no limit).
    #[arg(long, env = "FLOTILLA_MAX_CONNECTION_RATE", default_value_t = 500)]
    max_connection_rate: u32,
}

impl LimitArgs {
    fn admission(&self) -> flotilla_amqp::admission::AdmissionConfig {
        flotilla_amqp::admission::AdmissionConfig {
            max_connections: self.max_connections,
            max_handshakes: self.max_handshakes.max(1),
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
            rate_per_source: self.max_connection_rate,
        }
    }
}

#[derive(Args, Clone)]
struct RouterArgs {
    /// AMQP listener, HOST:PORT (port 0 = any free port).
    #[arg(long, env = "FLOTILLA_AMQP", default_value = "127.0.0.1:5672")]
    amqp: SocketAddr,
    /// AMQPS (TLS-only) listener, HOST:PORT.
    #[arg(long, env = "FLOTILLA_AMQPS")]
    amqps: Option<SocketAddr>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "FLOTILLA_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "FLOTILLA_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Resources (AddressSpace, Address, MessagingUser) to apply at start.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Router id (container id announced in Open); must be unique in a mesh.
    #[arg(
        long = "router-id",
        alias = "container-id",
        env = "FLOTILLA_ROUTER_ID",
        default_value = "flotilla-router"
    )]
    container_id: String,
    /// Listener for other routers (joins the mesh), HOST:PORT. Off
    /// loopback it needs --mesh-secret-file or --tls-ca.
    #[arg(long, env = "FLOTILLA_INTER_ROUTER")]
    inter_router: Option<SocketAddr>,
    /// A router to connect to, HOST:PORT (repeatable); a DNS name is
    /// resolved again every few seconds and every address it has is a peer.
    #[arg(long = "peer", env = "FLOTILLA_PEER", value_delimiter = ',')]
    peers: Vec<String>,
    /// The mesh CA (PEM): routers must present a certificate it signed
    /// (mutual TLS, with --tls-cert/--tls-key), and so may components.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// File holding the mesh secret every router and component shares:
    /// routers and brokers authenticate with it (SCRAM-SHA-256).
    #[arg(long, env = "FLOTILLA_MESH_SECRET_FILE")]
    mesh_secret_file: Option<PathBuf>,
    /// Refuse every client that does not connect over TLS.
    #[arg(long, env = "FLOTILLA_REQUIRE_TLS")]
    require_tls: bool,
    /// Retire a broker away for this many seconds: its queues and topics
    /// are placed on the other brokers (0 = only when the console retires it).
    #[arg(long, env = "FLOTILLA_RETIRE_BROKERS_AFTER", default_value_t = 0)]
    retire_brokers_after: u64,
    /// `interior` joins the mesh; `edge` keeps one uplink to an interior
    /// router (the first --peer that answers, then the next) and does not
    /// join link state.
    #[arg(long, env = "FLOTILLA_MODE", value_enum, default_value = "interior")]
    mode: Mode,
    #[command(flatten)]
    limits: LimitArgs,
    #[arg(
        long,
        env = "FLOTILLA_MAX_LINKS_PER_CONNECTION",
        default_value_t = 1000
    )]
    max_links_per_connection: usize,
    /// Largest frame accepted, in bytes (announced in Open; at least 512).
    #[arg(long, env = "FLOTILLA_MAX_FRAME_SIZE", default_value_t = 65536)]
    max_frame_size: u32,
    /// Highest session channel a peer may use.
    #[arg(long, env = "FLOTILLA_CHANNEL_MAX", default_value_t = 255)]
    channel_max: u16,
    /// Largest message in bytes (0 = unlimited).
    #[arg(long, env = "FLOTILLA_MAX_MESSAGE_SIZE", default_value_t = 16 * 1024 * 1024)]
    max_message_size: u64,
    /// Credit a sender gets while a receiver exists; twice this many
    /// unsettled deliveries may be in flight to one receiver, and per
    /// address towards each neighbour router.
    #[arg(long, env = "FLOTILLA_LINK_CAPACITY", default_value_t = 250)]
    link_capacity: u32,
    /// Close connections silent for this many seconds (0 = never).
    #[arg(long, env = "FLOTILLA_IDLE_TIMEOUT", default_value_t = 16)]
    idle_timeout: u64,
    /// Seconds a router asked to stop (SIGTERM) waits for its unsettled
    /// deliveries to settle before it closes its connections; keep it
    /// under Kubernetes' terminationGracePeriodSeconds.
    #[arg(long, env = "FLOTILLA_DRAIN_TIMEOUT", default_value_t = 20)]
    drain_timeout: u64,
}

/// `flotilla router`: the router's arguments, and those only a router
/// running on its own takes.
#[derive(Args, Clone)]
struct RouterCmd {
    #[command(flatten)]
    router: RouterArgs,
    /// Operations listener (/metrics, /healthz, /readyz), HOST:PORT.
    #[arg(long, env = "FLOTILLA_HTTP")]
    http: Option<SocketAddr>,
    /// When this router stops, its clients are closed with
    /// amqp:connection:redirect to HOST:PORT (another router, or the
    /// service in front of them); without it, amqp:connection:forced.
    #[arg(long, env = "FLOTILLA_REDIRECT")]
    redirect: Option<String>,
}

impl RouterArgs {
    fn into_config(self) -> Result<RouterConfig, String> {
        let tenancy = load_tenancy(self.config.as_deref())?;
        if self.link_capacity == 0 {
            return Err("--link-capacity must be at least 1".into());
        }
        Ok(RouterConfig {
            amqp: self.amqp,
            amqps: self.amqps,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            container_id: self.container_id,
            inter_router: self.inter_router,
            peers: self.peers,
            tls_ca: self.tls_ca,
            edge: self.mode == Mode::Edge,
            max_connections: self.limits.max_connections,
            max_handshakes: self.limits.max_handshakes.max(1),
            handshake_timeout: Duration::from_secs(self.limits.handshake_timeout.max(1)),
            max_connection_rate: self.limits.max_connection_rate,
            max_links_per_connection: self.max_links_per_connection,
            max_frame_size: self.max_frame_size.max(512),
            channel_max: self.channel_max,
            max_message_size: self.max_message_size,
            link_capacity: self.link_capacity,
            idle_timeout: (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout)),
            tenancy,
            console: self.console.link()?,
            mesh_secret: mesh_secret(self.mesh_secret_file.as_deref())?,
            require_tls: self.require_tls,
            retire_brokers_after: (self.retire_brokers_after > 0)
                .then(|| Duration::from_secs(self.retire_brokers_after)),
            drain_timeout: Duration::from_secs(self.drain_timeout),
            ..RouterConfig::default()
        })
    }
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("signal received");
        t.cancel();
    });
    token
}

#[derive(Args, Clone)]
struct BrokerArgs {
    /// AMQP listener, HOST:PORT (port 0 = any free port).
    #[arg(long, env = "FLOTILLA_AMQP", default_value = "127.0.0.1:5673")]
    amqp: SocketAddr,
    /// Where the journal lives.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "data/broker")]
    data_dir: PathBuf,
    /// Broker id (container id announced in Open): placement and routing
    /// name brokers by it.
    #[arg(
        long,
        alias = "broker-id",
        env = "FLOTILLA_CONTAINER_ID",
        default_value = "flotilla-broker"
    )]
    container_id: String,
    /// Deliveries without being consumed (failed, or held by a consumer
    /// that went away) after which a message moves to the dead-letter queue.
    #[arg(long, env = "FLOTILLA_MAX_DELIVERIES", default_value_t = 10)]
    max_deliveries: u32,
    /// The dead-letter queue (in each address space).
    #[arg(long, env = "FLOTILLA_DEAD_LETTER_QUEUE", default_value = "DLQ")]
    dead_letter_queue: String,
    /// Where expired messages go (in each address space); unset: dropped.
    #[arg(long, env = "FLOTILLA_EXPIRY_QUEUE")]
    expiry_queue: Option<String>,
    /// Address spaces, addresses and users (YAML, as for routers).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// A router to connect to as a route container, HOST:PORT: the mesh
    /// then routes links for queue, topic and subscription addresses here.
    /// Needs the component credential: --mesh-secret-file, or --tls-ca
    /// with --tls-cert/--tls-key.
    #[arg(long, env = "FLOTILLA_ROUTER")]
    router: Option<String>,
    /// MiB of message bodies held in memory; past this, bodies stay in
    /// the journal and are read back when delivered (paging).
    #[arg(long, env = "FLOTILLA_MAX_MEMORY_MIB", default_value_t = 1024)]
    max_memory_mib: usize,
    #[command(flatten)]
    creds: ComponentCreds,
    /// Refuse clients of the broker's own listener that do not use TLS.
    #[arg(long, env = "FLOTILLA_REQUIRE_TLS")]
    require_tls: bool,
    #[command(flatten)]
    limits: LimitArgs,
    /// Operations listener (/metrics, /healthz, /readyz), HOST:PORT.
    #[arg(long, env = "FLOTILLA_HTTP")]
    http: Option<SocketAddr>,
}

impl RouterArgs {
    /// The router's TLS files and mesh secret, for the components `flotilla
    /// up` runs beside it.
    fn component_creds(&self) -> ComponentCreds {
        ComponentCreds {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_ca: self.tls_ca.clone(),
            mesh_secret_file: self.mesh_secret_file.clone(),
        }
    }
}

impl BrokerArgs {
    fn into_config(self) -> Result<flotilla_broker::BrokerConfig, String> {
        let tenancy = load_tenancy(self.config.as_deref())?;
        Ok(flotilla_broker::BrokerConfig {
            amqp: self.amqp,
            data_dir: self.data_dir,
            container_id: self.container_id,
            dead_letter: flotilla_broker::queues::DeadLetter {
                max_deliveries: self.max_deliveries.max(1),
                queue: self.dead_letter_queue,
                expiry_queue: self.expiry_queue,
            },
            tenancy,
            router: self.router,
            max_memory: self.max_memory_mib.saturating_mul(1 << 20),
            tls: self.creds.tls(),
            mesh_secret: self.creds.mesh_secret()?,
            tls_ca: self.creds.tls_ca,
            require_tls: self.require_tls,
            admission: self.limits.admission(),
            console: self.console.link()?,
            http: self.http,
        })
    }
}

async fn run_broker(a: BrokerArgs) -> ExitCode {
    let cfg = match a.into_config() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    match flotilla_broker::run(cfg, shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => usage(e),
    }
}

/// The MQTT gateway's listeners and limits.
#[derive(Args, Clone)]
struct MqttArgs {
    /// MQTT listener, HOST:PORT.
    #[arg(long, env = "FLOTILLA_MQTT", default_value = "127.0.0.1:1883")]
    mqtt: SocketAddr,
    /// MQTTS (TLS) listener, HOST:PORT (needs --tls-cert/--tls-key).
    #[arg(long, env = "FLOTILLA_MQTTS")]
    mqtts: Option<SocketAddr>,
    /// MQTT over WebSocket (subprotocol `mqtt`), HOST:PORT.
    #[arg(long, env = "FLOTILLA_MQTT_WS")]
    mqtt_ws: Option<SocketAddr>,
    /// Largest MQTT packet taken, in bytes (announced to 5.0 clients).
    #[arg(long, env = "FLOTILLA_MQTT_MAX_PACKET_SIZE", default_value_t = 1 << 20)]
    max_packet_size: usize,
    /// QoS 1 and 2 publications a client may have unacknowledged.
    #[arg(long, env = "FLOTILLA_MQTT_RECEIVE_MAXIMUM", default_value_t = 1024)]
    receive_maximum: u16,
    /// Longest keep-alive (seconds) a 5.0 client gets; longer ones, and
    /// none, are lowered to it (Server Keep Alive).
    #[arg(long, env = "FLOTILLA_MQTT_MAX_KEEP_ALIVE", default_value_t = 65535)]
    max_keep_alive: u16,
    /// Bytes waiting for a slow client past which its QoS 0 messages are
    /// dropped (and counted).
    #[arg(long, env = "FLOTILLA_MQTT_QOS0_BUFFER", default_value_t = 256 * 1024)]
    qos0_buffer: usize,
    /// AMQP connections to the router the gateway's clients share.
    #[arg(long, env = "FLOTILLA_MQTT_UPSTREAMS", default_value_t = 2)]
    upstreams: usize,
    /// Subscriptions one MQTT session may hold; more are refused (SUBACK
    /// 0x97, 0x80 in 3.1.1).
    #[arg(long, env = "FLOTILLA_MQTT_MAX_SUBSCRIPTIONS", default_value_t = 1000)]
    max_subscriptions: usize,
}

#[derive(Args, Clone)]
struct GatewayArgs {
    /// The router the gateway speaks AMQP to, HOST:PORT.
    #[arg(long, env = "FLOTILLA_ROUTER", default_value = "127.0.0.1:5672")]
    router: String,
    #[command(flatten)]
    mqtt: MqttArgs,
    /// Address spaces, addresses and users (YAML, as for routers).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Gateway id (its container id towards the router).
    #[arg(
        long = "gateway-id",
        alias = "container-id",
        env = "FLOTILLA_GATEWAY_ID",
        default_value = "flotilla-mqtt-gateway"
    )]
    container_id: String,
    #[command(flatten)]
    creds: ComponentCreds,
    /// Refuse clients that do not connect over TLS.
    #[arg(long, env = "FLOTILLA_REQUIRE_TLS")]
    require_tls: bool,
    #[command(flatten)]
    limits: LimitArgs,
    /// Operations listener (/metrics, /healthz, /readyz), HOST:PORT.
    #[arg(long, env = "FLOTILLA_HTTP")]
    http: Option<SocketAddr>,
}

impl GatewayArgs {
    fn into_config(self) -> Result<flotilla_mqtt_gateway::GatewayConfig, String> {
        let tenancy = load_tenancy(self.config.as_deref())?;
        let m = &self.mqtt;
        Ok(flotilla_mqtt_gateway::GatewayConfig {
            mqtt: Some(m.mqtt),
            mqtts: m.mqtts,
            mqtt_ws: m.mqtt_ws,
            router: self.router,
            container_id: self.container_id,
            tenancy,
            console: self.console.link()?,
            tls: self.creds.tls(),
            mesh_secret: self.creds.mesh_secret()?,
            tls_ca: self.creds.tls_ca,
            require_tls: self.require_tls,
            admission: self.limits.admission(),
            limits: flotilla_mqtt_gateway::Limits {
                max_packet: m.max_packet_size.max(64),
                receive_max: m.receive_maximum.max(1),
                max_keep_alive: m.max_keep_alive.max(1),
                qos0_buffer: m.qos0_buffer,
                max_subscriptions: m.max_subscriptions,
                ..Default::default()
            },
            upstreams: m.upstreams.max(1),
            http: self.http,
        })
    }
}

async fn run_gateway(a: GatewayArgs) -> ExitCode {
    let cfg = match a.into_config() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    match flotilla_mqtt_gateway::run(cfg, shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => usage(e),
    }
}

/// A component's TLS files and mesh credential (the broker, the MQTT
/// gateway and the last-will service take the same).
#[derive(Args, Clone)]
struct ComponentCreds {
    /// TLS certificate (PEM, with --tls-key): the component's own
    /// listeners (the broker's AMQP, the gateway's --mqtts) take TLS with
    /// it, and with --tls-ca it proves the component to its router.
    #[arg(long, env = "FLOTILLA_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The mesh CA (PEM): the router's certificate must be signed by it.
    #[arg(long, alias = "router-ca", env = "FLOTILLA_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// File holding the mesh secret: the component proves to its router
    /// that it is one with it.
    #[arg(long, env = "FLOTILLA_MESH_SECRET_FILE")]
    mesh_secret_file: Option<PathBuf>,
}

impl ComponentCreds {
    fn tls(&self) -> Option<(PathBuf, PathBuf)> {
        self.tls_cert.clone().zip(self.tls_key.clone())
    }

    fn mesh_secret(&self) -> Result<Option<flotilla_core::auth::MeshSecret>, String> {
        mesh_secret(self.mesh_secret_file.as_deref())
    }
}

#[derive(Args, Clone)]
struct LwtArgs {
    /// The router the service joins (as the route container of every
    /// `$lwt` link in the mesh), HOST:PORT.
    #[arg(long, env = "FLOTILLA_ROUTER", default_value = "127.0.0.1:5672")]
    router: String,
    /// Where the wills are kept.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "data/lwt")]
    data_dir: PathBuf,
    /// Address spaces, addresses and users (YAML, as for routers).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    console: ConsoleArgs,
    /// The service's id (its login towards the router, ID@$mesh).
    #[arg(
        long = "lwt-id",
        env = "FLOTILLA_LWT_ID",
        default_value = "flotilla-lwt"
    )]
    id: String,
    /// Seconds a will whose link broke (the path through the mesh, not
    /// its client's connection) may be claimed again by its gateway
    /// before it is published (or, an AMQP client's, dropped).
    #[arg(long, env = "FLOTILLA_LWT_GRACE", default_value_t = 10)]
    grace: u64,
    #[command(flatten)]
    creds: ComponentCreds,
    /// Operations listener (/metrics, /healthz, /readyz), HOST:PORT.
    #[arg(long, env = "FLOTILLA_HTTP")]
    http: Option<SocketAddr>,
}

impl LwtArgs {
    fn into_config(self) -> Result<flotilla_lwt_service::LwtConfig, String> {
        Ok(flotilla_lwt_service::LwtConfig {
            router: self.router,
            data_dir: self.data_dir,
            id: self.id,
            tenancy: load_tenancy(self.config.as_deref())?,
            console: self.console.link()?,
            tls: self.creds.tls(),
            mesh_secret: self.creds.mesh_secret()?,
            tls_ca: self.creds.tls_ca,
            grace: Duration::from_secs(self.grace.max(1)),
            http: self.http,
        })
    }
}

async fn run_lwt(a: LwtArgs) -> ExitCode {
    let cfg = match a.into_config() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    match flotilla_lwt_service::run(cfg, shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => usage(e),
    }
}

#[derive(Args, Clone)]
struct ConsoleServeArgs {
    /// HTTP listener (REST API, web console, watch, metrics), HOST:PORT.
    #[arg(
        long,
        alias = "listen",
        env = "FLOTILLA_HTTP",
        default_value = "127.0.0.1:8080"
    )]
    http: SocketAddr,
    /// Where the store and the admin token live.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "data/console")]
    data_dir: PathBuf,
    /// Retire a broker that has not reported for this many seconds: the
    /// routers place its queues and topics on the other brokers (0 = only
    /// through the API, DELETE /api/v1/brokers/ID).
    #[arg(long, env = "FLOTILLA_RETIRE_BROKERS_AFTER", default_value_t = 0)]
    retire_brokers_after: u64,
}

impl ConsoleServeArgs {
    fn config(&self) -> flotilla_console::ConsoleConfig {
        flotilla_console::ConsoleConfig {
            listen: self.http,
            data_dir: self.data_dir.clone(),
            admin_token: admin_token_from_env(),
            retire_brokers_after: (self.retire_brokers_after > 0)
                .then(|| Duration::from_secs(self.retire_brokers_after)),
        }
    }
}

/// How to use the console's admin token, for people.
fn token_hint(c: &flotilla_console::Console) -> String {
    match &c.token_file {
        Some(f) => format!(
            "admin token in {file}:\n  curl -H \"Authorization: Bearer $(cat {file})\" http://{addr}/api/v1/addressspaces",
            file = f.display(),
            addr = c.local_addr
        ),
        None => format!(
            "admin token from FLOTILLA_ADMIN_TOKEN:\n  curl -H \"Authorization: Bearer $FLOTILLA_ADMIN_TOKEN\" http://{}/api/v1/addressspaces",
            c.local_addr
        ),
    }
}

async fn run_console(a: ConsoleServeArgs) -> ExitCode {
    match flotilla_console::Console::bind(a.config()).await {
        Ok(c) => {
            eprintln!("console on http://{} ; {}", c.local_addr, token_hint(&c));
            c.serve(shutdown_on_signal()).await;
            ExitCode::SUCCESS
        }
        Err(e) => usage(e),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Interior,
    Edge,
}

#[derive(Args, Clone)]
struct UpArgs {
    #[command(flatten)]
    router: RouterArgs,
    /// How many routers to run, as a full mesh; router i listens for
    /// clients on the --amqp port + i and for routers on 55672 + i.
    #[arg(long, env = "FLOTILLA_ROUTERS", default_value_t = 1)]
    routers: u16,
    /// The broker's AMQP listener (clients may also reach its queues
    /// through any router).
    #[arg(long, env = "FLOTILLA_BROKER_AMQP", default_value = "127.0.0.1:5673")]
    broker_amqp: SocketAddr,
    /// The root of everything kept on disk: the broker's journal in
    /// DIR/broker, the console's store and admin token in DIR/console, the
    /// mesh secret in DIR/mesh-secret.
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Run routers only.
    #[arg(long, env = "FLOTILLA_NO_BROKER")]
    no_broker: bool,
    /// The console's HTTP listener (REST API, web console, watch, metrics).
    #[arg(
        long,
        alias = "console-listen",
        env = "FLOTILLA_HTTP",
        default_value = "127.0.0.1:8080"
    )]
    http: SocketAddr,
    /// Run no console (routers and broker take --config only).
    #[arg(long, env = "FLOTILLA_NO_CONSOLE")]
    no_console: bool,
    #[command(flatten)]
    mqtt: MqttArgs,
    /// Run no MQTT gateway.
    #[arg(long, env = "FLOTILLA_NO_MQTT")]
    no_mqtt: bool,
    /// How many MQTT gateway replicas to run: replica i listens on the
    /// --mqtt port + i (and --mqtts / --mqtt-ws + i) and speaks to router
    /// i modulo --routers; a session moves between them.
    #[arg(long, env = "FLOTILLA_GATEWAYS", default_value_t = 1)]
    gateways: u16,
    /// Run no last-will service (gateways then keep their clients' wills
    /// themselves, in memory).
    #[arg(long, env = "FLOTILLA_NO_LWT")]
    no_lwt: bool,
}

/// The tenancy of `--config`, or zero-config without one.
fn load_tenancy(config: Option<&std::path::Path>) -> Result<Tenancy, String> {
    match config {
        Some(p) => Tenancy::load(p).map_err(|e| format!("--config: {e}")),
        None => Ok(Tenancy::zero_config()),
    }
}

fn usage(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("flotilla: {e}");
    ExitCode::from(EX_USAGE)
}

async fn run_router(args: RouterCmd) -> ExitCode {
    let mut cfg = match args.router.into_config() {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    cfg.http = args.http;
    cfg.redirect = args.redirect;
    match flotilla_router::Router::bind(cfg, shutdown_on_signal()).await {
        Ok(r) => r.serve().await,
        Err(e) => return usage(e),
    }
    ExitCode::SUCCESS
}

/// `flotilla up`: N routers in one process, each with its own ports, every
/// one connected to every other, as separate machines would be; a broker
/// behind router 0; a console they all follow. Components talk over their
/// public protocols, authenticated with a mesh secret made in the data
/// directory on first start.
async fn run_up(mut args: UpArgs) -> ExitCode {
    let n = args.routers.max(1);
    let shutdown = shutdown_on_signal();
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    if let Err(e) = flotilla_core::auth::private_dir(&args.data_dir) {
        return usage(format!("--data-dir {}: {e}", args.data_dir.display()));
    }
    if args.router.mesh_secret_file.is_none() {
        let path = args.data_dir.join("mesh-secret");
        if let Err(e) = flotilla_core::auth::MeshSecret::load_or_create(&path) {
            return usage(e);
        }
        args.router.mesh_secret_file = Some(path);
    }
    let mut console_note = String::new();
    if !args.no_console && args.router.console.console.is_none() {
        // Our own console; routers and the broker follow it.
        let cfg = ConsoleServeArgs {
            http: args.http,
            data_dir: args.data_dir.join("console"),
            retire_brokers_after: 0,
        }
        .config();
        let c = match flotilla_console::Console::bind(cfg).await {
            Ok(c) => c,
            Err(e) => return usage(e),
        };
        // A config file seeds the console, the source of truth.
        if let Some(path) = &args.router.config {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => return usage(format!("--config {}: {e}", path.display())),
            };
            match c.apply_yaml(&text).await {
                Ok(n) => tracing::info!(resources = n, "config applied to the console"),
                Err(e) => return usage(format!("--config: {e}")),
            }
        }
        console_note = format!("\nConsole on http://{}; {}", c.local_addr, token_hint(&c));
        args.router.console = ConsoleArgs {
            console: Some(format!("http://{}", c.local_addr)),
            console_token_file: c.token_file.clone(),
        };
        tasks.push(tokio::spawn(c.serve(shutdown.clone())));
    }
    let base = args.router.amqp;
    let ir_base: SocketAddr = args
        .router
        .inter_router
        .unwrap_or_else(|| SocketAddr::new(base.ip(), 55672));
    let offset = |a: SocketAddr, i: u16| {
        SocketAddr::new(a.ip(), if a.port() == 0 { 0 } else { a.port() + i })
    };
    let mut routers = Vec::new();
    for i in 0..n {
        let mut a = args.router.clone();
        a.amqp = offset(base, i);
        if n > 1 {
            a.inter_router = Some(offset(ir_base, i));
            a.container_id = format!("router-{i}");
            // Full mesh: each router connects to the ones started before it.
            a.peers
                .extend(routers.iter().filter_map(|r: &flotilla_router::Router| {
                    r.local_addrs
                        .iter()
                        .find(|(p, _)| *p == "inter-router")
                        .map(|(_, addr)| addr.to_string())
                }));
        }
        let cfg = match a.into_config() {
            Ok(c) => c,
            Err(e) => return usage(e),
        };
        match flotilla_router::Router::bind(cfg, shutdown.clone()).await {
            Ok(r) => routers.push(r),
            Err(e) => return usage(e),
        }
    }
    let urls: Vec<String> = routers
        .iter()
        .map(|r| format!("amqp://{}", r.local_addrs[0].1))
        .collect();
    let broker_dir = args.data_dir.join("broker");
    if !args.no_broker {
        // The broker joins router 0 as a route container, as it would in
        // a cluster, proving it is a component with the mesh secret; it
        // has its own listener too.
        let b = BrokerArgs {
            amqp: args.broker_amqp,
            data_dir: broker_dir.clone(),
            container_id: "broker-0".into(),
            max_deliveries: 10,
            dead_letter_queue: "DLQ".into(),
            expiry_queue: None,
            config: args.router.config.clone(),
            console: args.router.console.clone(),
            router: Some(routers[0].local_addrs[0].1.to_string()),
            max_memory_mib: 1024,
            creds: args.router.component_creds(),
            require_tls: args.router.require_tls,
            limits: args.router.limits.clone(),
            http: None,
        };
        let cfg = match b.into_config() {
            Ok(c) => c,
            Err(e) => return usage(e),
        };
        let run = flotilla_broker::run(cfg, shutdown.clone());
        tasks.push(spawn_part("broker", run, &shutdown, &failed));
    }
    let lwt_dir = args.data_dir.join("lwt");
    if !args.no_lwt {
        // The last-will service joins router 0 as the route container of
        // every `$lwt` link, as it would in a cluster.
        let l = LwtArgs {
            router: routers[0].local_addrs[0].1.to_string(),
            data_dir: lwt_dir.clone(),
            config: args.router.config.clone(),
            console: args.router.console.clone(),
            id: "lwt-0".into(),
            grace: 10,
            creds: args.router.component_creds(),
            http: None,
        };
        let cfg = match l.into_config() {
            Ok(c) => c,
            Err(e) => return usage(e),
        };
        let run = flotilla_lwt_service::run(cfg, shutdown.clone());
        tasks.push(spawn_part("last-will service", run, &shutdown, &failed));
    }
    let mut mqtt_note = String::new();
    if !args.no_mqtt {
        let replicas = args.gateways.max(1);
        for g in 0..replicas {
            // Each replica speaks AMQP to a router (the last one, then
            // around the mesh), proving it is a component with the mesh
            // secret, as it would in a cluster.
            let router = &routers[(routers.len() - 1 + usize::from(g)) % routers.len()];
            let mut mqtt = args.mqtt.clone();
            mqtt.mqtt = offset(args.mqtt.mqtt, g);
            mqtt.mqtts = args.mqtt.mqtts.map(|a| offset(a, g));
            mqtt.mqtt_ws = args.mqtt.mqtt_ws.map(|a| offset(a, g));
            let gw = GatewayArgs {
                router: router.local_addrs[0].1.to_string(),
                mqtt,
                config: args.router.config.clone(),
                console: args.router.console.clone(),
                container_id: format!("mqtt-gateway-{g}"),
                creds: args.router.component_creds(),
                require_tls: args.router.require_tls,
                limits: args.router.limits.clone(),
                http: None,
            };
            let cfg = match gw.into_config() {
                Ok(c) => c,
                Err(e) => return usage(e),
            };
            let run = flotilla_mqtt_gateway::run(cfg, shutdown.clone());
            tasks.push(spawn_part("MQTT gateway", run, &shutdown, &failed));
        }
        let (h, p) = (args.mqtt.mqtt.ip(), args.mqtt.mqtt.port());
        mqtt_note = format!(
            "\nMQTT on {}{}: mosquitto_sub -h {h} -p {p} -t 'sensors/#' -q 1 -v\n  mosquitto_pub -h {h} -p {p} -t sensors/t1 -m 21.5 -q 1",
            args.mqtt.mqtt,
            if replicas > 1 { format!(" (and the next {} ports: {replicas} gateways)", replicas - 1) } else { String::new() },
        );
    }
    eprintln!(
        "flotilla is up{}{}{}. Try, in two more terminals:\n  flotilla receive greetings --url {}\n  flotilla send greetings --body hello --url {}\nQueues (stored by the broker) are addresses of type queue, or any address a client attaches to with the capability \"queue\".{}{}\nPress Ctrl-C to stop.",
        if n > 1 { format!(" with {n} routers ({})", urls.join(", ")) } else { String::new() },
        if args.no_broker { String::new() } else { format!(", broker on {} (journal in {})", args.broker_amqp, broker_dir.display()) },
        if args.no_lwt { String::new() } else { format!(", last-will service (wills in {})", lwt_dir.display()) },
        urls[0],
        urls[urls.len() - 1],
        mqtt_note,
        console_note,
    );
    tasks.extend(routers.into_iter().map(|r| tokio::spawn(r.serve())));
    for t in tasks {
        let _ = t.await;
    }
    if failed.load(std::sync::atomic::Ordering::Relaxed) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    flotilla_core::telemetry::init(cli.log_json);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads.filter(|n| *n > 0) {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Up(a) => run_up(a).await,
            Command::Router(a) => run_router(a).await,
            Command::Broker(a) => run_broker(a).await,
            Command::Console(a) => run_console(a).await,
            Command::MqttGateway(a) => run_gateway(a).await,
            Command::Lwt(a) => run_lwt(a).await,
            Command::Send(a) => tools::send(a).await,
            Command::Receive(a) => tools::receive(a).await,
            Command::Bench(a) => match a.mqtt.clone() {
                Some(url) => mqtt::bench(a, &url).await,
                None => bench::run(a).await,
            },
            Command::Stat(a) => match a.mqtt.clone() {
                Some(url) => mqtt::stat(&url, a.mesh_secret_file.as_deref(), a.json).await,
                None => tools::stat(a).await,
            },
        }
    })
}

/// Runs one part of `flotilla up`. One part down is the whole system down:
/// it says so, marks the run failed and stops the rest.
fn spawn_part<E: std::fmt::Display>(
    what: &'static str,
    run: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    stop: &tokio_util::sync::CancellationToken,
    failed: &Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (stop, failed) = (stop.clone(), failed.clone());
    tokio::spawn(async move {
        if let Err(e) = run.await {
            tracing::error!(error = %e, "{what} stopped; stopping everything");
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
            stop.cancel();
        }
    })
}
