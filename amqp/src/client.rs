//! A small AMQP 1.0 client on the engine, for `flotilla send`, `receive`
//! and `bench`: one connection, one session, links driven by the caller.
//! It speaks to any AMQP 1.0 peer (Flotilla, Qpid Dispatch, RabbitMQ).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp_types::definitions::{
    Error as AmqpErrorBody, ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::{Source, Target};
use tokio::net::TcpStream;

use crate::connection::{Connection, ConnectionConfig, Event, LinkId, ProtocolError};
use crate::driver::{Driver, DriverConfig, Handler};
use crate::frame::FrameError;
use crate::transport::{self, ClientSasl, ConnectConfig, HandshakeError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad url {0:?}: expected amqp[s]://[user[:password]@]host[:port]")]
    Url(String),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connection closed by peer{}", .0.as_ref().map(|e| format!(": {}", describe(e))).unwrap_or_default())]
    Closed(Option<AmqpErrorBody>),
    #[error("link refused: {}", .0.as_ref().map(describe).unwrap_or_else(|| "no reason given".into()))]
    Refused(Option<AmqpErrorBody>),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// `condition: description` of an AMQP error, for people.
pub fn describe(e: &AmqpErrorBody) -> String {
    let cond = serde_amqp::to_vec(&e.condition)
        .ok()
        .and_then(|b| crate::message::body_bytes(&[&[0x00, 0x53, 0x77][..], &b].concat()))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|| format!("{:?}", e.condition));
    match &e.description {
        Some(d) => format!("{cond}: {d}"),
        None => cond,
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Open.hostname (the address space); defaults to the host.
    pub vhost: Option<String>,
    /// Use SCRAM-SHA-256 instead of PLAIN when a user is given.
    pub scram: bool,
    pub tls_ca: Option<std::path::PathBuf>,
    /// With `amqps`: upgrade with the AMQP TLS header instead of starting
    /// with TLS.
    pub tls_header: bool,
    pub container_id: String,
    pub max_frame_size: u32,
}

impl ClientOptions {
    /// Parses `amqp[s]://[user[:password]@]host[:port]`.
    ///
    /// # Errors
    /// The url is not of that form.
    pub fn from_url(url: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::Url(redact(url));
        let (tls, rest) = if let Some(r) = url.strip_prefix("amqps://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("amqp://") {
            (false, r)
        } else {
            (false, url)
        };
        let rest = rest.split('/').next().unwrap_or_default();
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (Some(pct_decode(u)), Some(pct_decode(p))),
                None => (Some(pct_decode(u)), None),
            },
            None => (None, None),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse().map_err(|_| bad())?,
            ),
            _ if !hostport.is_empty() => (hostport.to_string(), if tls { 5671 } else { 5672 }),
            _ => return Err(bad()),
        };
        Ok(ClientOptions {
            host,
            port,
            tls,
            user,
            password,
            vhost: None,
            scram: false,
            tls_ca: None,
            tls_header: false,
            container_id: format!("flotilla-client-{}", std::process::id()),
            max_frame_size: 65536,
        })
    }
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A url with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((u, _)) => format!("{}{u}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The engine's events for the caller to take, and the protocol error
/// that ended the connection.
#[derive(Default)]
struct Inbox {
    events: VecDeque<Event>,
    error: Option<AmqpErrorBody>,
}

/// The client's handler on the driver, for one call.
struct Turn<'a> {
    conn: &'a mut Connection,
    inbox: &'a mut Inbox,
}

impl Handler for Turn<'_> {
    type Signal = ();

    fn connection(&mut self) -> &mut Connection {
        self.conn
    }

    fn signal(&mut self) -> impl std::future::Future<Output = Option<()>> + Send {
        // Nothing but the socket wakes a client up.
        std::future::pending()
    }

    fn on_signal(&mut self, _: ()) {}

    fn on_event(&mut self, event: Event) {
        self.inbox.events.push_back(event);
    }

    fn on_protocol_error(&mut self, error: AmqpErrorBody) {
        self.inbox.error = Some(error.clone());
        self.conn.close(Some(error));
    }

    fn closing(&self) -> bool {
        self.inbox.error.is_some()
    }
}

/// One client connection with one session.
pub struct Client {
    driver: Driver,
    pub conn: Connection,
    inbox: Inbox,
    channel: u16,
    next_name: u32,
}

impl Client {
    /// Connects, authenticates, opens the connection and begins a session.
    ///
    /// # Errors
    /// Connection, TLS, SASL or protocol failures.
    pub async fn connect(o: &ClientOptions) -> Result<Client, ClientError> {
        let tcp = TcpStream::connect((o.host.as_str(), o.port)).await?;
        tcp.set_nodelay(true)?;
        let sasl = match (&o.user, &o.password) {
            (Some(u), Some(p)) if o.scram => ClientSasl::Scram {
                user: u.clone(),
                password: p.clone(),
            },
            (Some(u), Some(p)) => ClientSasl::Plain {
                user: u.clone(),
                password: p.clone(),
            },
            _ => ClientSasl::Anonymous,
        };
        let tls = if o.tls {
            let ca = o.tls_ca.as_ref().ok_or_else(|| {
                ClientError::Tls(
                    "amqps needs --tls-ca (the CA that signed the server's certificate)".into(),
                )
            })?;
            let cfg = crate::tls::client_config(ca).map_err(|e| ClientError::Tls(e.to_string()))?;
            let name = rustls_pki_types::ServerName::try_from(o.host.clone())
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            Some((cfg, name))
        } else {
            None
        };
        let vhost = o.vhost.clone().unwrap_or_else(|| o.host.clone());
        let cc = ConnectConfig {
            tls,
            sasl,
            hostname: Some(vhost.clone()),
            tls_header: o.tls_header,
        };
        let (io, buf) = transport::connect(tcp, &cc).await?;
        let cfg = ConnectionConfig {
            container_id: o.container_id.clone(),
            max_frame_size: o.max_frame_size,
            hostname: Some(vhost),
            idle_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        let mut conn = Connection::new(cfg);
        conn.open();
        let channel = conn
            .begin()
            .ok_or(ClientError::Timeout("a session channel"))?;
        let mut c = Client {
            driver: Driver::new(io, buf, DriverConfig::default()),
            conn,
            inbox: Inbox::default(),
            channel,
            next_name: 0,
        };
        // Wait for the peer's Open and the answer to our Begin.
        while !c.conn.session_answered(c.channel) {
            if let Event::Close { error } = c.next_event().await? {
                return Err(ClientError::Closed(error));
            }
        }
        Ok(c)
    }

    fn link_name(&mut self, kind: &str) -> String {
        self.next_name += 1;
        format!(
            "{}-{kind}-{}",
            self.conn.config().container_id,
            self.next_name
        )
    }

    /// Attaches a sending link to `address` (`None`: anonymous relay) and
    /// waits for the answer.
    ///
    /// # Errors
    /// The peer refused the link or closed the connection.
    pub async fn open_sender(
        &mut self,
        address: Option<&str>,
        settled: bool,
    ) -> Result<LinkId, ClientError> {
        self.open_sender_with(address, settled, &[]).await
    }

    /// [`Client::open_sender`] with terminus capabilities (e.g. `queue`).
    pub async fn open_sender_with(
        &mut self,
        address: Option<&str>,
        settled: bool,
        capabilities: &[String],
    ) -> Result<LinkId, ClientError> {
        let name = self.link_name("sender");
        let target = Target {
            address: address.map(str::to_string),
            capabilities: capability_array(capabilities),
            ..Default::default()
        };
        let snd = if settled {
            SenderSettleMode::Settled
        } else {
            SenderSettleMode::Unsettled
        };
        let link = self.conn.attach(
            self.channel,
            &name,
            Role::Sender,
            Some(Source::default()),
            Some(target),
            snd,
            ReceiverSettleMode::First,
        );
        self.await_attach(link).await?;
        Ok(link)
    }

    /// Attaches a receiving link from `address` (or a dynamic node when
    /// `address` is `None`), grants `credit`, and returns the address the
    /// peer gave the source.
    ///
    /// # Errors
    /// The peer refused the link or closed the connection.
    pub async fn open_receiver(
        &mut self,
        address: Option<&str>,
        credit: u32,
    ) -> Result<(LinkId, Option<String>), ClientError> {
        self.open_receiver_with(address, credit, &[]).await
    }

    /// [`Client::open_receiver`] with source capabilities (e.g. `queue`,
    /// `topic`).
    pub async fn open_receiver_with(
        &mut self,
        address: Option<&str>,
        credit: u32,
        capabilities: &[String],
    ) -> Result<(LinkId, Option<String>), ClientError> {
        let name = self.link_name("receiver");
        let source = Source {
            address: address.map(str::to_string),
            dynamic: address.is_none(),
            capabilities: capability_array(capabilities),
            ..Default::default()
        };
        let link = self.conn.attach(
            self.channel,
            &name,
            Role::Receiver,
            Some(source),
            Some(Target::default()),
            SenderSettleMode::Mixed,
            ReceiverSettleMode::First,
        );
        let attach = self.await_attach(link).await?;
        let addr = attach.source.and_then(|s| s.address);
        if credit > 0 {
            self.conn.flow(link, credit, false);
        }
        Ok((link, addr))
    }

    async fn await_attach(
        &mut self,
        link: LinkId,
    ) -> Result<Box<fe2o3_amqp_types::performatives::Attach>, ClientError> {
        let mut held = Vec::new();
        let result = loop {
            match self.next_event().await {
                Ok(Event::Attach {
                    link: l,
                    attach,
                    reply: true,
                }) if l == link => {
                    let refused = match attach.role {
                        Role::Receiver => attach.target.is_none(),
                        Role::Sender => attach.source.is_none(),
                    };
                    if !refused {
                        break Ok(attach);
                    }
                }
                Ok(Event::Detach { link: l, error, .. }) if l == link => {
                    break Err(ClientError::Refused(error))
                }
                Ok(Event::Close { error }) => break Err(ClientError::Closed(error)),
                Ok(other) => held.push(other),
                Err(e) => break Err(e),
            }
        };
        for e in held.into_iter().rev() {
            self.inbox.events.push_front(e);
        }
        result
    }

    /// Writes what the engine has produced.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.driver.flush(&mut self.conn).await?;
        Ok(())
    }

    /// Events already decoded, without waiting.
    pub fn try_event(&mut self) -> Option<Event> {
        self.inbox.events.pop_front()
    }

    /// The next event: writes what is pending, then reads until something
    /// happens.
    ///
    /// # Errors
    /// I/O or protocol errors; a Close is returned as an event.
    ///
    /// # Cancel safety
    /// Not cancel safe while a turn is writing: run it to completion (or
    /// drop the client).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(e) = self.inbox.events.pop_front() {
                return Ok(e);
            }
            if let Some(e) = self.inbox.error.take() {
                return Err(ClientError::Protocol(ProtocolError(e)));
            }
            // Frames read but not yet decoded (a turn decodes a bounded
            // number).
            let mut turn = Turn {
                conn: &mut self.conn,
                inbox: &mut self.inbox,
            };
            self.driver.process_input(&mut turn);
            if !self.inbox.events.is_empty() {
                continue;
            }
            let mut turn = Turn {
                conn: &mut self.conn,
                inbox: &mut self.inbox,
            };
            match self.driver.turn(&mut turn).await? {
                true => {}
                false => {
                    if let Some(e) = self.inbox.events.pop_front() {
                        return Ok(e);
                    }
                    return Err(ClientError::Closed(None));
                }
            }
        }
    }

    /// Closes the connection politely and waits (briefly) for the answer.
    pub async fn close(mut self) {
        self.conn.close(None);
        let _ = self.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(e) = self.next_event().await {
                if matches!(e, Event::Close { .. }) {
                    break;
                }
            }
        })
        .await;
    }

    pub fn channel(&self) -> u16 {
        self.channel
    }
}

/// Options for TLS on the client side made from a CA file.
pub fn tls_options(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    crate::tls::client_config(ca).map_err(|e| ClientError::Tls(e.to_string()))
}

fn capability_array(
    caps: &[String],
) -> Option<fe2o3_amqp_types::primitives::Array<fe2o3_amqp_types::primitives::Symbol>> {
    (!caps.is_empty()).then(|| {
        fe2o3_amqp_types::primitives::Array(
            caps.iter()
                .map(|c| fe2o3_amqp_types::primitives::Symbol::from(c.as_str()))
                .collect(),
        )
    })
}
