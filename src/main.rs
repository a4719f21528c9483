//! The `flotilla` binary: parses arguments, initialises tracing, validates
//! config, and calls a component's `run` — or one of the tools for people
//! (`send`, `receive`, `bench`).

#![forbid(unsafe_code)]

mod bench;
mod tools;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
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
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on this machine (for now: one router).
    Up(RouterArgs),
    /// Run an AMQP 1.0 router.
    Router(RouterArgs),
    /// Send messages to an address.
    Send(tools::SendArgs),
    /// Receive messages from an address and print them.
    Receive(tools::ReceiveArgs),
    /// Measure throughput and latency against any AMQP 1.0 endpoint.
    Bench(bench::BenchArgs),
}

#[derive(Args, Clone)]
struct RouterArgs {
    /// AMQP listener, HOST:PORT (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:5672")]
    amqp: SocketAddr,
    /// AMQPS (TLS-only) listener, HOST:PORT.
    #[arg(long)]
    amqps: Option<SocketAddr>,
    /// PEM certificate chain for TLS.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Resources (AddressSpace, Address, MessagingUser) to apply at start.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Container id announced in Open.
    #[arg(long, default_value = "flotilla-router")]
    container_id: String,
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    #[arg(long, default_value_t = 1000)]
    max_links_per_connection: usize,
    /// Largest message in bytes (0 = unlimited).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    max_message_size: u64,
    /// Credit a sender gets while a receiver exists.
    #[arg(long, default_value_t = 1000)]
    link_capacity: u32,
    /// Close connections silent for this many seconds (0 = never).
    #[arg(long, default_value_t = 16)]
    idle_timeout: u64,
}

impl RouterArgs {
    fn into_config(self) -> Result<RouterConfig, String> {
        let tenancy = match &self.config {
            Some(p) => Tenancy::load(p).map_err(|e| format!("--config: {e}"))?,
            None => Tenancy::zero_config(),
        };
        if self.link_capacity == 0 {
            return Err("--link-capacity must be at least 1".into());
        }
        Ok(RouterConfig {
            amqp: self.amqp,
            amqps: self.amqps,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            container_id: self.container_id,
            max_connections: self.max_connections,
            max_links_per_connection: self.max_links_per_connection,
            max_message_size: self.max_message_size,
            link_capacity: self.link_capacity,
            idle_timeout: (self.idle_timeout > 0).then(|| Duration::from_secs(self.idle_timeout)),
            tenancy,
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

async fn run_router(args: RouterArgs, up: bool) -> ExitCode {
    let cfg = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flotilla: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let shutdown = shutdown_on_signal();
    let router = match flotilla_router::Router::bind(cfg, shutdown).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flotilla: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if up {
        let amqp = router.local_addrs[0].1;
        eprintln!(
            "flotilla is up. Try, in two more terminals:\n  flotilla receive greetings --url amqp://{amqp}\n  flotilla send greetings --body hello --url amqp://{amqp}\nPress Ctrl-C to stop."
        );
    }
    router.serve().await;
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    flotilla_core::telemetry::init(cli.log_json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Up(a) => run_router(a, true).await,
            Command::Router(a) => run_router(a, false).await,
            Command::Send(a) => tools::send(a).await,
            Command::Receive(a) => tools::receive(a).await,
            Command::Bench(a) => bench::run(a).await,
        }
    })
}
