//! The AMQP 1.0 connection engine: one connection's sessions, links, credit
//! and settlement as a state machine with no I/O (AMQP 1.0 §2.4–§2.7).
//!
//! The owner (a router or client connection task) feeds it decoded frames
//! with [`Connection::handle_frame`], reads the [`Event`]s it returns, acts
//! through methods such as [`Connection::accept_attach`],
//! [`Connection::send`], [`Connection::flow`] and [`Connection::settle`],
//! and writes [`Connection::take_output`] to the socket. Everything produced
//! in one wake-up goes out in one write.
//!
//! Link names may repeat across roles on a session: an incoming attach is
//! the answer to one of ours only when the name matches *and* the roles are
//! opposite (AMQP 1.0 §2.6.1), so a sender and a receiver both called `x`
//! are two links.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{
    AmqpError, ConnectionError, Error as AmqpErrorBody, ErrorCondition, Fields, Handle, LinkError,
    ReceiverSettleMode, Role, SenderSettleMode, SessionError,
};
use fe2o3_amqp_types::messaging::{DeliveryState, Source, Target, TargetArchetype};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open, Transfer,
};
use serde_bytes::ByteBuf;

use crate::frame::{self, Frame, Performative, TransferHeader};

/// Our session incoming window, in transfer frames. Flow control is done by
/// link credit; the window is refreshed when half used, and a transfer
/// beyond it ends the session (`amqp:session:window-violation`).
const INCOMING_WINDOW: u32 = 1 << 16;
/// The shortest idle-time-out of a peer's we honour (we heartbeat at half).
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
const OUTGOING_WINDOW: u32 = u32::MAX >> 1;

/// A link, unique for the life of the connection (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u32);

/// Identifies an incoming delivery for [`Connection::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryRef {
    pub channel: u16,
    pub delivery_id: u32,
}

/// Settings for one connection.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub container_id: String,
    /// Largest frame we accept (announced in our Open).
    pub max_frame_size: u32,
    pub channel_max: u16,
    /// Close the connection when nothing arrives for this long; half of it is
    /// announced to the peer as idle-time-out.
    pub idle_timeout: Option<Duration>,
    /// Links (all sessions together) this connection may have.
    pub max_links: usize,
    /// Largest message accepted on an incoming link (0 = no limit).
    pub max_message_size: u64,
    /// The hostname to put in our Open (client side).
    pub hostname: Option<String>,
    pub offered_capabilities: Vec<&'static str>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            container_id: "flotilla".into(),
            max_frame_size: 65536,
            channel_max: 255,
            idle_timeout: Some(Duration::from_secs(16)),
            max_links: 1000,
            max_message_size: 0,
            hostname: None,
            offered_capabilities: Vec::new(),
        }
    }
}

/// A complete incoming message.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryRef,
    pub tag: Bytes,
    pub settled: bool,
    pub message_format: u32,
    pub payload: Bytes,
    /// The transfer's delivery state: a `transactional-state` when the
    /// message is posted under a transaction (AMQP 1.0 §4.4.1).
    pub state: Option<DeliveryState>,
}

/// What the peer did, for the owner to act on.
#[derive(Debug)]
pub enum Event {
    /// The peer's Open. A server answers with [`Connection::open`].
    Open(Box<Open>),
    /// The peer began a session (already answered; `answer: false`), or
    /// answered one we began (`answer: true`).
    Begin { channel: u16, answer: bool },
    /// The peer attached a new link (answer with `accept_attach` or
    /// `refuse_attach`), or answered one of ours (`reply: true`).
    Attach {
        link: LinkId,
        attach: Box<Attach>,
        reply: bool,
    },
    /// Credit or drain changed on one of our sending links, or the peer's
    /// sender told us its delivery count (receiving links).
    Flow { link: LinkId },
    /// A whole message arrived on a receiving link.
    Delivery { link: LinkId, delivery: Delivery },
    /// The peer's outcome for a delivery we sent (`token` is what we gave `send`).
    Outcome {
        link: LinkId,
        token: u64,
        state: Option<DeliveryState>,
        settled: bool,
    },
    /// The peer detached a link (answered already; the link is gone).
    /// `unsettled` lists the tokens of our deliveries it never settled.
    Detach {
        link: LinkId,
        closed: bool,
        error: Option<AmqpErrorBody>,
        unsettled: Vec<u64>,
    },
    /// A transfer under a transaction came on a link we had detached (the
    /// peer had not seen our detach yet) and was dropped: the transaction
    /// it names must not commit as if it never had it.
    Discarded { txn: Bytes },
    /// The peer ended a session (answered; its links were reported detached).
    End { channel: u16 },
    /// The peer closed the connection (answered).
    Close { error: Option<AmqpErrorBody> },
}

/// A protocol violation: close the connection with this error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {}", condition_str(&.0.condition), .0.description.as_deref().unwrap_or(""))]
pub struct ProtocolError(pub AmqpErrorBody);

fn condition_str(c: &ErrorCondition) -> String {
    match c {
        ErrorCondition::AmqpError(e) => format!("{:?}", e),
        ErrorCondition::ConnectionError(e) => format!("{:?}", e),
        ErrorCondition::SessionError(e) => format!("{:?}", e),
        ErrorCondition::LinkError(e) => format!("{:?}", e),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

/// Builds an AMQP error.
pub fn amqp_error(
    condition: impl Into<ErrorCondition>,
    description: impl Into<String>,
) -> AmqpErrorBody {
    AmqpErrorBody::new(condition.into(), Some(description.into()), None)
}

/// Whether `attach` is for a transaction coordinator (its target is a
/// `coordinator`, AMQP 1.0 §4.5.1): a client declaring transactions.
pub fn is_coordinator(attach: &Attach) -> bool {
    matches!(
        attach.target.as_deref(),
        Some(TargetArchetype::Coordinator(_))
    )
}

/// Credit left between a delivery-count and a limit (serial arithmetic,
/// RFC 1982): zero when the count is already past the limit.
fn credit_between(count: u32, limit: u32) -> u32 {
    let c = limit.wrapping_sub(count);
    if c > (1 << 31) {
        0
    } else {
        c
    }
}

fn violation(
    condition: impl Into<ErrorCondition>,
    description: impl Into<String>,
) -> ProtocolError {
    ProtocolError(amqp_error(condition, description))
}

#[derive(Debug)]
struct Session {
    remote_channel: Option<u16>,
    /// Next transfer-id we send.
    next_outgoing_id: u32,
    /// Transfers the peer will still take (from its last Flow/Begin).
    remote_incoming_window: u32,
    /// Next transfer-id we expect.
    next_incoming_id: u32,
    incoming_window: u32,
    next_delivery_id: u32,
    /// remote handle -> link
    remote_handles: HashMap<u32, LinkId>,
    local_handles: Vec<bool>,
    /// Our unsettled outgoing deliveries: delivery-id -> (link, token).
    unsettled: HashMap<u32, (LinkId, u64)>,
    /// Transfers waiting for the peer's session window, with their link.
    blocked: std::collections::VecDeque<(LinkId, Bytes)>,
    /// Dispositions for incoming deliveries, written at the next flush.
    pending_dispositions: Vec<(u32, DeliveryState)>,
    /// Our incoming window is half used: a Flow refreshes it when output
    /// is next taken.
    refresh_due: bool,
    end_sent: bool,
}

#[derive(Debug)]
struct Assembly {
    id: u32,
    tag: Bytes,
    settled: bool,
    format: u32,
    buf: BytesMut,
    state: Option<DeliveryState>,
}

/// What the owner may read about a link.
#[derive(Debug)]
pub struct Link {
    pub channel: u16,
    pub name: String,
    /// Our role on the link.
    pub role: Role,
    pub local_handle: Option<u32>,
    pub remote_handle: Option<u32>,
    pub snd_settle_mode: SenderSettleMode,
    pub rcv_settle_mode: ReceiverSettleMode,
    /// Sending links: the peer's credit for us. Receiving links: the credit
    /// we granted that is not yet used.
    pub credit: u32,
    pub delivery_count: u32,
    /// Sending links: the peer asked us to drain.
    pub drain: bool,
    /// The peer's `available` on receiving links.
    pub available: u32,
    /// Receiving links: the furthest delivery-count we ever allowed (our
    /// count plus credit, serial arithmetic). A peer may still be sending
    /// under a limit we have since lowered, but never past this one.
    max_limit: u32,
    pub max_message_size: u64,
    assembly: Option<Assembly>,
    detach_sent: bool,
    next_tag: u64,
}

/// How we answer a peer's attach.
#[derive(Debug, Clone, Default)]
pub struct AttachReply {
    pub source: Option<Source>,
    pub target: Option<Target>,
    pub snd_settle_mode: Option<SenderSettleMode>,
    pub rcv_settle_mode: Option<ReceiverSettleMode>,
    pub offered_capabilities: Vec<&'static str>,
    /// The answer's link properties.
    pub properties: Option<Fields>,
}

impl AttachReply {
    /// An answer with the peer's own source and target (a receiving end
    /// that takes the link as asked).
    pub fn mirroring(attach: &Attach) -> AttachReply {
        AttachReply {
            source: attach.source.as_deref().cloned(),
            target: match attach.target.as_deref() {
                Some(TargetArchetype::Target(t)) => Some(t.clone()),
                #[allow(unreachable_patterns)]
                _ => None,
            },
            ..Default::default()
        }
    }
}

/// One connection's protocol state.
pub struct Connection {
    cfg: ConnectionConfig,
    out: BytesMut,
    open_sent: bool,
    open_received: bool,
    close_sent: bool,
    close_received: bool,
    remote_max_frame_size: u32,
    remote_channel_max: u16,
    remote_idle_timeout: Option<Duration>,
    sessions: Vec<Option<Session>>,
    /// peer channel -> our channel
    remote_channels: HashMap<u16, u16>,
    links: HashMap<LinkId, Link>,
    next_link: u32,
    last_received: Instant,
    last_sent: Instant,
    deferred_begins: Vec<u16>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("links", &self.links.len())
            .finish()
    }
}

impl Connection {
    pub fn new(cfg: ConnectionConfig) -> Self {
        let now = Instant::now();
        Connection {
            cfg,
            out: BytesMut::with_capacity(64 * 1024),
            open_sent: false,
            open_received: false,
            close_sent: false,
            close_received: false,
            remote_max_frame_size: frame::MIN_MAX_FRAME_SIZE,
            remote_channel_max: 0,
            remote_idle_timeout: None,
            sessions: Vec::new(),
            remote_channels: HashMap::new(),
            links: HashMap::new(),
            next_link: 0,
            last_received: now,
            last_sent: now,
            deferred_begins: Vec::new(),
        }
    }

    pub fn config(&self) -> &ConnectionConfig {
        &self.cfg
    }

    /// Changes the settings before our Open is sent.
    pub fn config_mut(&mut self) -> &mut ConnectionConfig {
        &mut self.cfg
    }

    /// The largest frame we accept right now.
    pub fn max_frame_size(&self) -> u32 {
        self.cfg.max_frame_size
    }

    /// Frames waiting to be written (dispositions are coalesced first, and
    /// half-used session windows refreshed).
    pub fn take_output(&mut self) -> BytesMut {
        self.flush_dispositions();
        self.refresh_windows();
        if !self.out.is_empty() {
            self.last_sent = Instant::now();
        }
        self.out.split()
    }

    /// True when frames are waiting to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
            || self
                .sessions
                .iter()
                .flatten()
                .any(|s| !s.pending_dispositions.is_empty() || (s.refresh_due && !s.end_sent))
    }

    /// Writes a Flow for every session whose incoming window is half used.
    fn refresh_windows(&mut self) {
        let due: Vec<u16> = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(ch, s)| {
                s.as_ref()
                    .filter(|s| s.refresh_due && !s.end_sent)
                    .map(|_| ch as u16)
            })
            .collect();
        for ch in due {
            self.write_flow(ch, None);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.close_sent && self.close_received
    }

    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    pub fn link(&self, id: LinkId) -> Option<&Link> {
        self.links.get(&id)
    }

    /// How many links the connection has (all sessions).
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    pub fn links(&self) -> impl Iterator<Item = (LinkId, &Link)> {
        self.links.iter().map(|(k, v)| (*k, v))
    }

    /// Sends our Open.
    pub fn open(&mut self) {
        if self.open_sent {
            return;
        }
        self.open_sent = true;
        let caps: Vec<_> = self
            .cfg
            .offered_capabilities
            .iter()
            .map(|c| (*c).into())
            .collect();
        let open = Open {
            container_id: self.cfg.container_id.clone(),
            hostname: self.cfg.hostname.clone(),
            max_frame_size: MaxFrameSize(self.cfg.max_frame_size),
            channel_max: ChannelMax(self.cfg.channel_max),
            // Announce half the silence we tolerate: peers heartbeat at
            // some fraction of what we announce, some late (C Proton's
            // blocking clients were seen at the full period), and a peer
            // a little late must not be cut off.
            idle_time_out: self
                .cfg
                .idle_timeout
                .map(|d| (d.as_millis() / 2).max(1) as u32),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: (!caps.is_empty()).then(|| caps.into()),
            desired_capabilities: None,
            properties: None,
        };
        frame::encode_performative(&mut self.out, 0, &Performative::Open(Box::new(open)));
        for ch in std::mem::take(&mut self.deferred_begins) {
            if self
                .sessions
                .get(usize::from(ch))
                .is_some_and(Option::is_some)
            {
                self.write_begin(ch);
            }
        }
    }

    /// Closes the connection, with `error` if it is an error. Opens first if
    /// we had not (AMQP 1.0 §2.4.5: Close must follow Open).
    pub fn close(&mut self, error: Option<AmqpErrorBody>) {
        if self.close_sent {
            return;
        }
        self.open();
        // Settlements decided before the Close still go out, ahead of it.
        self.flush_dispositions();
        self.close_sent = true;
        frame::encode_performative(&mut self.out, 0, &Performative::Close(Close { error }));
    }

    /// Handles one frame.
    ///
    /// # Errors
    /// A protocol violation; the owner closes the connection with it.
    pub fn handle_frame(
        &mut self,
        frame: Frame,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        self.last_received = Instant::now();
        let (channel, performative, payload) = match frame {
            Frame::Empty { .. } => return Ok(()),
            Frame::Sasl(_) => {
                return Err(violation(
                    ConnectionError::FramingError,
                    "SASL frame after SASL completed",
                ))
            }
            Frame::Amqp {
                channel,
                performative,
                payload,
            } => (channel, performative, payload),
        };
        if self.close_received {
            return Ok(());
        }
        if self.close_sent && !matches!(performative, Performative::Close(_)) {
            // After our Close nothing else may be sent (AMQP 1.0 §2.7.9):
            // only the peer's Close matters now.
            return Ok(());
        }
        match performative {
            Performative::Open(open) => self.on_open(open, events),
            _ if !self.open_received => Err(violation(AmqpError::IllegalState, "expected Open")),
            Performative::Close(close) => {
                self.close_received = true;
                self.close(None);
                events.push(Event::Close { error: close.error });
                Ok(())
            }
            Performative::Begin(begin) => self.on_begin(channel, begin, events),
            p => {
                let local = *self.remote_channels.get(&channel).ok_or_else(|| {
                    violation(
                        AmqpError::NotAllowed,
                        format!("frame on channel {channel}, which has no session"),
                    )
                })?;
                if self.session(local).end_sent && !matches!(p, Performative::End(_)) {
                    // We ended this session: until the peer's End, what it
                    // still sends on the channel is moot.
                    return Ok(());
                }
                match p {
                    Performative::Attach(a) => self.on_attach(local, a, events),
                    Performative::Flow(f) => self.on_flow(local, f, events),
                    Performative::Transfer(t) => self.on_transfer(local, t, payload, events),
                    Performative::Disposition(d) => self.on_disposition(local, d, events),
                    Performative::Detach(d) => self.on_detach(local, d, events),
                    Performative::End(_) => self.on_end(local, channel, events),
                    // Open, Close and Begin are handled above.
                    _ => Ok(()),
                }
            }
        }
    }

    fn on_open(&mut self, open: Box<Open>, events: &mut Vec<Event>) -> Result<(), ProtocolError> {
        if self.open_received {
            return Err(violation(AmqpError::IllegalState, "second Open"));
        }
        self.open_received = true;
        self.remote_max_frame_size = open.max_frame_size.0.max(frame::MIN_MAX_FRAME_SIZE);
        self.remote_channel_max = open.channel_max.0;
        // A peer may not make us send a frame every millisecond: its
        // idle-time-out counts as at least MIN_IDLE_TIMEOUT.
        self.remote_idle_timeout = open
            .idle_time_out
            .filter(|t| *t > 0)
            .map(|t| Duration::from_millis(u64::from(t)).max(MIN_IDLE_TIMEOUT));
        events.push(Event::Open(open));
        Ok(())
    }

    fn session(&mut self, ch: u16) -> &mut Session {
        // Callers only pass channels from `remote_channels` or ones they
        // allocated, which always hold a session.
        self.sessions[usize::from(ch)]
            .as_mut()
            .expect("mapped channel has a session")
    }

    fn new_session(&mut self, remote_channel: Option<u16>) -> Option<u16> {
        let limit = usize::from(
            self.cfg
                .channel_max
                .min(
                    self.remote_channel_max
                        .max(if self.open_received { 0 } else { u16::MAX }),
                ),
        ) + 1;
        let ch = match self.sessions.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.sessions.len() < limit => {
                self.sessions.push(None);
                self.sessions.len() - 1
            }
            None => return None,
        };
        if ch >= limit {
            return None;
        }
        self.sessions[ch] = Some(Session {
            remote_channel,
            next_outgoing_id: 0,
            remote_incoming_window: 0,
            next_incoming_id: 0,
            incoming_window: INCOMING_WINDOW,
            next_delivery_id: 0,
            remote_handles: HashMap::new(),
            local_handles: Vec::new(),
            unsettled: HashMap::new(),
            blocked: Default::default(),
            pending_dispositions: Vec::new(),
            refresh_due: false,
            end_sent: false,
        });
        Some(ch as u16)
    }

    fn write_begin(&mut self, ch: u16) {
        let s = self.session(ch);
        let begin = Begin {
            remote_channel: s.remote_channel,
            next_outgoing_id: s.next_outgoing_id,
            incoming_window: s.incoming_window,
            outgoing_window: OUTGOING_WINDOW,
            handle_max: Handle(u32::MAX),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        frame::encode_performative(&mut self.out, ch, &Performative::Begin(begin));
    }

    /// True once the peer answered our Begin on `ch`.
    pub fn session_answered(&self, ch: u16) -> bool {
        self.sessions
            .get(usize::from(ch))
            .and_then(Option::as_ref)
            .is_some_and(|s| s.remote_channel.is_some())
    }

    /// Begins a session (client side); returns its channel.
    pub fn begin(&mut self) -> Option<u16> {
        let ch = self.new_session(None)?;
        self.write_begin(ch);
        Some(ch)
    }

    fn on_begin(
        &mut self,
        channel: u16,
        begin: Begin,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        if self.remote_channels.contains_key(&channel) {
            return Err(violation(
                AmqpError::NotAllowed,
                format!("channel {channel} already has a session"),
            ));
        }
        let local = match begin.remote_channel {
            Some(ours) => {
                let ok = self
                    .sessions
                    .get(usize::from(ours))
                    .is_some_and(|s| s.as_ref().is_some_and(|s| s.remote_channel.is_none()));
                if !ok {
                    return Err(violation(
                        AmqpError::NotAllowed,
                        format!("Begin answers channel {ours}, which we did not begin"),
                    ));
                }
                let s = self.session(ours);
                s.remote_channel = Some(channel);
                ours
            }
            None => {
                if channel > self.cfg.channel_max {
                    return Err(violation(
                        ConnectionError::FramingError,
                        format!(
                            "channel {channel} above channel-max {}",
                            self.cfg.channel_max
                        ),
                    ));
                }
                self.new_session(Some(channel)).ok_or_else(|| {
                    violation(
                        AmqpError::ResourceLimitExceeded,
                        "no free channel for another session",
                    )
                })?
            }
        };
        self.remote_channels.insert(channel, local);
        let s = self.session(local);
        s.next_incoming_id = begin.next_outgoing_id;
        s.remote_incoming_window = begin.incoming_window;
        if begin.remote_channel.is_none() {
            // Our Begin must follow our Open (a server opens once it has
            // looked at the peer's Open).
            if self.open_sent {
                self.write_begin(local);
            } else {
                self.deferred_begins.push(local);
            }
        }
        events.push(Event::Begin {
            channel: local,
            answer: begin.remote_channel.is_some(),
        });
        Ok(())
    }

    fn alloc_handle(&mut self, ch: u16) -> u32 {
        let s = self.session(ch);
        match s.local_handles.iter().position(|used| !used) {
            Some(i) => {
                s.local_handles[i] = true;
                i as u32
            }
            None => {
                s.local_handles.push(true);
                (s.local_handles.len() - 1) as u32
            }
        }
    }

    fn free_handle(&mut self, ch: u16, handle: Option<u32>) {
        if let (Some(Some(s)), Some(h)) = (self.sessions.get_mut(usize::from(ch)), handle) {
            if let Some(slot) = s.local_handles.get_mut(h as usize) {
                *slot = false;
            }
        }
    }

    fn new_link(&mut self, ch: u16, name: String, role: Role) -> LinkId {
        let id = LinkId(self.next_link);
        self.next_link += 1;
        self.links.insert(
            id,
            Link {
                channel: ch,
                name,
                role,
                local_handle: None,
                remote_handle: None,
                snd_settle_mode: SenderSettleMode::Mixed,
                rcv_settle_mode: ReceiverSettleMode::First,
                credit: 0,
                delivery_count: 0,
                drain: false,
                available: 0,
                max_limit: 0,
                max_message_size: self.cfg.max_message_size,
                assembly: None,
                detach_sent: false,
                next_tag: 0,
            },
        );
        id
    }

    fn on_attach(
        &mut self,
        ch: u16,
        attach: Box<Attach>,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        let handle = attach.handle.0;
        if self.session(ch).remote_handles.contains_key(&handle) {
            return Err(violation(
                SessionError::HandleInUse,
                format!("handle {handle} is in use"),
            ));
        }
        // Our role is the opposite of the peer's.
        let our_role = match attach.role {
            Role::Sender => Role::Receiver,
            Role::Receiver => Role::Sender,
        };
        let answer = self
            .links
            .iter()
            .find(|(_, l)| {
                l.channel == ch
                    && l.remote_handle.is_none()
                    && l.local_handle.is_some()
                    && l.role == our_role
                    && l.name == attach.name
            })
            .map(|(id, _)| *id);
        let (link, reply) = match answer {
            Some(id) => (id, true),
            None => {
                if self.links.len() >= self.cfg.max_links {
                    return Err(violation(
                        AmqpError::ResourceLimitExceeded,
                        format!("more than {} links on one connection", self.cfg.max_links),
                    ));
                }
                (
                    self.new_link(ch, attach.name.clone(), our_role.clone()),
                    false,
                )
            }
        };
        self.session(ch).remote_handles.insert(handle, link);
        let l = self.links.get_mut(&link).expect("link just found or made");
        l.remote_handle = Some(handle);
        match our_role {
            Role::Receiver => {
                // The peer sends: its initial delivery-count is authoritative.
                l.delivery_count = attach.initial_delivery_count.unwrap_or(0);
                l.max_limit = l.delivery_count.wrapping_add(l.credit);
                if !reply {
                    l.snd_settle_mode = attach.snd_settle_mode.clone();
                    l.rcv_settle_mode = attach.rcv_settle_mode.clone();
                }
            }
            Role::Sender => {
                if !reply {
                    l.snd_settle_mode = attach.snd_settle_mode.clone();
                    l.rcv_settle_mode = attach.rcv_settle_mode.clone();
                }
                if let Some(m) = attach.max_message_size.filter(|m| *m > 0) {
                    l.max_message_size = m;
                }
            }
        }
        // The answer to an attach we detached since: the owner forgot it.
        if !(reply && l.detach_sent) {
            events.push(Event::Attach {
                link,
                attach,
                reply,
            });
        }
        Ok(())
    }

    /// Attaches a link we start (client side). `role` is our role.
    pub fn attach(
        &mut self,
        ch: u16,
        name: &str,
        role: Role,
        source: Option<Source>,
        target: Option<Target>,
        snd: SenderSettleMode,
        rcv: ReceiverSettleMode,
    ) -> LinkId {
        let id = self.new_link(ch, name.to_string(), role.clone());
        let handle = self.alloc_handle(ch);
        let l = self.links.get_mut(&id).expect("link just made");
        l.local_handle = Some(handle);
        l.snd_settle_mode = snd.clone();
        l.rcv_settle_mode = rcv.clone();
        let attach = Attach {
            name: name.to_string(),
            handle: Handle(handle),
            role: role.clone(),
            snd_settle_mode: snd,
            rcv_settle_mode: rcv,
            source: source.map(Box::new),
            target: target.map(|t| Box::new(TargetArchetype::Target(t))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: matches!(role, Role::Sender).then_some(0),
            max_message_size: (self.cfg.max_message_size > 0).then_some(self.cfg.max_message_size),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        frame::encode_performative(&mut self.out, ch, &Performative::Attach(Box::new(attach)));
        id
    }

    /// Attaches a link we start from a whole attach (link routing): its
    /// name, role (ours), termini, settle modes, capabilities and
    /// properties go out as given, with our handle and delivery count.
    pub fn attach_as(&mut self, ch: u16, mut attach: Attach) -> LinkId {
        let id = self.new_link(ch, attach.name.clone(), attach.role.clone());
        let handle = self.alloc_handle(ch);
        let l = self.links.get_mut(&id).expect("link just made");
        l.local_handle = Some(handle);
        l.snd_settle_mode = attach.snd_settle_mode.clone();
        l.rcv_settle_mode = attach.rcv_settle_mode.clone();
        attach.handle = Handle(handle);
        attach.initial_delivery_count = matches!(attach.role, Role::Sender).then_some(0);
        attach.unsettled = None;
        attach.incomplete_unsettled = false;
        attach.max_message_size =
            (self.cfg.max_message_size > 0).then_some(self.cfg.max_message_size);
        frame::encode_performative(&mut self.out, ch, &Performative::Attach(Box::new(attach)));
        id
    }

    /// Answers a peer's attach with the termini, settle modes,
    /// capabilities and properties of `answer` (link routing: the answer
    /// of the far end).
    pub fn accept_attach_as(&mut self, link: LinkId, answer: &Attach) {
        let Some(l) = self.links.get(&link) else {
            return;
        };
        let ch = l.channel;
        let handle = self.alloc_handle(ch);
        let l = self.links.get_mut(&link).expect("checked above");
        l.local_handle = Some(handle);
        l.snd_settle_mode = answer.snd_settle_mode.clone();
        l.rcv_settle_mode = answer.rcv_settle_mode.clone();
        let attach = Attach {
            name: l.name.clone(),
            handle: Handle(handle),
            role: l.role.clone(),
            snd_settle_mode: l.snd_settle_mode.clone(),
            rcv_settle_mode: l.rcv_settle_mode.clone(),
            source: answer.source.clone(),
            target: answer.target.clone(),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: matches!(l.role, Role::Sender).then_some(l.delivery_count),
            max_message_size: match l.role {
                Role::Receiver => (l.max_message_size > 0).then_some(l.max_message_size),
                Role::Sender => {
                    (self.cfg.max_message_size > 0).then_some(self.cfg.max_message_size)
                }
            },
            offered_capabilities: answer.offered_capabilities.clone(),
            desired_capabilities: answer.desired_capabilities.clone(),
            properties: answer.properties.clone(),
        };
        frame::encode_performative(&mut self.out, ch, &Performative::Attach(Box::new(attach)));
    }

    /// Changes how many links this connection may have (a router raises
    /// it for the MQTT gateway, which multiplexes many clients' links).
    pub fn set_max_links(&mut self, max: usize) {
        self.cfg.max_links = max;
    }

    /// Lowers the largest message a receiving link takes (before it is
    /// answered, so the answer announces it): a message past it detaches
    /// the link with `amqp:link:message-size-exceeded`, also while it is
    /// still arriving in pieces.
    pub fn limit_message_size(&mut self, link: LinkId, max: u64) {
        if let Some(l) = self.links.get_mut(&link) {
            if max > 0 && (l.max_message_size == 0 || max < l.max_message_size) {
                l.max_message_size = max;
            }
        }
    }

    /// Answers a peer's attach, taking the link.
    pub fn accept_attach(&mut self, link: LinkId, reply: AttachReply) {
        let Some(l) = self.links.get(&link) else {
            return;
        };
        let caps: Vec<_> = reply
            .offered_capabilities
            .iter()
            .map(|c| (*c).into())
            .collect();
        let answer = Attach {
            name: String::new(),
            handle: Handle(0),
            role: l.role.clone(),
            snd_settle_mode: reply
                .snd_settle_mode
                .unwrap_or_else(|| l.snd_settle_mode.clone()),
            rcv_settle_mode: reply
                .rcv_settle_mode
                .unwrap_or_else(|| l.rcv_settle_mode.clone()),
            source: reply.source.map(Box::new),
            target: reply.target.map(|t| Box::new(TargetArchetype::Target(t))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: (!caps.is_empty()).then(|| caps.into()),
            desired_capabilities: None,
            properties: reply.properties,
        };
        self.accept_attach_as(link, &answer);
    }

    /// Refuses a peer's attach: an attach with no terminus, then a closing
    /// detach with `error` (AMQP 1.0 §2.6.3). The link is gone afterwards.
    pub fn refuse_attach(&mut self, link: LinkId, error: AmqpErrorBody) {
        self.accept_attach(link, AttachReply::default());
        self.detach(link, Some(error));
    }

    /// Detaches (closes) a link. The link is forgotten at once; its
    /// unsettled outgoing deliveries' tokens are returned.
    pub fn detach(&mut self, link: LinkId, error: Option<AmqpErrorBody>) -> Vec<u64> {
        self.detach_with(link, true, error)
    }

    /// Detaches a link, closing it or not (`closed: false` keeps a durable
    /// terminus, e.g. a durable subscription, for a later attach).
    pub fn detach_with(
        &mut self,
        link: LinkId,
        closed: bool,
        error: Option<AmqpErrorBody>,
    ) -> Vec<u64> {
        // Outcomes decided before the detach go out before it.
        self.flush_dispositions();
        let Some(l) = self.links.get_mut(&link) else {
            return Vec::new();
        };
        let ch = l.channel;
        let handle = l.local_handle;
        if !l.detach_sent {
            l.detach_sent = true;
            if let Some(h) = handle {
                let d = Detach {
                    handle: Handle(h),
                    closed,
                    error,
                };
                frame::encode_performative(&mut self.out, ch, &Performative::Detach(d));
            }
        }
        // Wait for the peer's detach to free the handles, even when our
        // attach is not answered yet: the answer is still coming, and must
        // not be taken for a new link. Report the deliveries finished now.
        self.take_unsettled(ch, link)
    }

    fn take_unsettled(&mut self, ch: u16, link: LinkId) -> Vec<u64> {
        let Some(Some(s)) = self.sessions.get_mut(usize::from(ch)) else {
            return Vec::new();
        };
        // Its transfers still waiting for the window must not follow its
        // detach; they were never sent, so they take no transfer-id.
        let before = s.blocked.len();
        s.blocked.retain(|(l, _)| *l != link);
        let dropped = (before - s.blocked.len()) as u32;
        s.next_outgoing_id = s.next_outgoing_id.wrapping_sub(dropped);
        let mut tokens = Vec::new();
        s.unsettled.retain(|_, (l, t)| {
            if *l == link {
                tokens.push(*t);
                false
            } else {
                true
            }
        });
        tokens
    }

    fn forget_link(&mut self, link: LinkId) -> Vec<u64> {
        let Some(l) = self.links.remove(&link) else {
            return Vec::new();
        };
        if let Some(Some(s)) = self.sessions.get_mut(usize::from(l.channel)) {
            if let Some(h) = l.remote_handle {
                s.remote_handles.remove(&h);
            }
        }
        self.free_handle(l.channel, l.local_handle);
        self.take_unsettled(l.channel, link)
    }

    fn on_detach(
        &mut self,
        ch: u16,
        d: Detach,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        let Some(&link) = self.session(ch).remote_handles.get(&d.handle.0) else {
            return Err(violation(
                SessionError::UnattachedHandle,
                format!("detach of unattached handle {}", d.handle.0),
            ));
        };
        let was_ours = self.links.get(&link).is_some_and(|l| l.detach_sent);
        if !was_ours {
            if self
                .links
                .get(&link)
                .is_some_and(|l| l.local_handle.is_none())
            {
                // Not answered yet: attach (with no terminus) before the
                // detach, or the peer never hears back (AMQP 1.0 §2.6.3).
                self.accept_attach(link, AttachReply::default());
            }
            let l = self
                .links
                .get_mut(&link)
                .expect("handle maps to a live link");
            l.detach_sent = true;
            if let Some(h) = l.local_handle {
                let reply = Detach {
                    handle: Handle(h),
                    closed: d.closed,
                    error: None,
                };
                frame::encode_performative(&mut self.out, ch, &Performative::Detach(reply));
            }
        }
        let unsettled = self.forget_link(link);
        if !was_ours {
            events.push(Event::Detach {
                link,
                closed: d.closed,
                error: d.error,
                unsettled,
            });
        }
        Ok(())
    }

    fn on_end(
        &mut self,
        ch: u16,
        remote_channel: u16,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        self.forget_session_links(ch, events);
        if !self.session(ch).end_sent {
            frame::encode_performative(&mut self.out, ch, &Performative::End(End { error: None }));
        }
        self.remote_channels.remove(&remote_channel);
        self.sessions[usize::from(ch)] = None;
        events.push(Event::End { channel: ch });
        Ok(())
    }

    fn on_flow(&mut self, ch: u16, f: Flow, events: &mut Vec<Event>) -> Result<(), ProtocolError> {
        let s = self.session(ch);
        let next_in = f.next_incoming_id.unwrap_or(0);
        // AMQP 1.0 §2.5.6: next-incoming-id + incoming-window - the id of the
        // next transfer we write. Blocked transfers have ids but are unsent.
        let sent = s.next_outgoing_id.wrapping_sub(s.blocked.len() as u32);
        let in_flight = sent.wrapping_sub(next_in);
        s.remote_incoming_window = if in_flight > 1 << 31 {
            // next-incoming-id ahead of what we sent: treat as the window itself.
            f.incoming_window
        } else {
            // A window shrunk below what is in flight leaves no room.
            f.incoming_window.saturating_sub(in_flight)
        };
        let mut echo = f.echo && f.handle.is_none();
        let mut echo_link = None;
        if let Some(h) = &f.handle {
            let Some(&link) = s.remote_handles.get(&h.0) else {
                return Err(violation(
                    SessionError::UnattachedHandle,
                    format!("flow on unattached handle {}", h.0),
                ));
            };
            let l = self
                .links
                .get_mut(&link)
                .expect("handle maps to a live link");
            match l.role {
                Role::Sender => {
                    // AMQP 1.0 §2.6.7: credit = peer's delivery-count + credit - ours.
                    let limit = f
                        .delivery_count
                        .unwrap_or(0)
                        .wrapping_add(f.link_credit.unwrap_or(0));
                    l.credit = credit_between(l.delivery_count, limit);
                    l.drain = f.drain;
                }
                Role::Receiver => {
                    // The sender's delivery-count is authoritative; what we
                    // allowed stays the limit (a drain advances the count).
                    if let Some(dc) = f.delivery_count {
                        let limit = l.delivery_count.wrapping_add(l.credit);
                        l.delivery_count = dc;
                        l.credit = credit_between(dc, limit);
                        // A count past every limit we gave is the peer's
                        // business; it buys no credit.
                        if credit_between(l.max_limit, dc) > 0 {
                            l.max_limit = dc;
                        }
                    }
                    l.available = f.available.unwrap_or(0);
                }
            }
            echo = f.echo;
            echo_link = Some(link);
            events.push(Event::Flow { link });
        }
        self.release_blocked(ch);
        if echo {
            self.write_flow(ch, echo_link);
        }
        Ok(())
    }

    fn write_flow(&mut self, ch: u16, link: Option<LinkId>) {
        let (handle, dc, credit, drain) = match link.and_then(|id| self.links.get(&id)) {
            Some(l) => (
                l.local_handle.map(Handle),
                Some(l.delivery_count),
                Some(l.credit),
                l.drain && l.role == Role::Receiver,
            ),
            None => (None, None, None, false),
        };
        let s = self.session(ch);
        s.incoming_window = INCOMING_WINDOW;
        s.refresh_due = false;
        let flow = Flow {
            next_incoming_id: s.remote_channel.map(|_| s.next_incoming_id),
            incoming_window: s.incoming_window,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: OUTGOING_WINDOW,
            handle,
            delivery_count: dc,
            link_credit: credit,
            available: None,
            drain,
            echo: false,
            properties: None,
        };
        frame::encode_performative(&mut self.out, ch, &Performative::Flow(flow));
    }

    /// Sets the credit of a receiving link to `credit` and tells the peer.
    pub fn flow(&mut self, link: LinkId, credit: u32, drain: bool) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if l.role != Role::Receiver || l.detach_sent {
            return;
        }
        l.credit = credit;
        l.drain = drain;
        let limit = l.delivery_count.wrapping_add(credit);
        if credit_between(l.max_limit, limit) > 0 {
            l.max_limit = limit;
        }
        let ch = l.channel;
        self.write_flow(ch, Some(link));
    }

    /// A sending link answers a drain request: its remaining credit is used
    /// up by advancing the delivery-count (AMQP 1.0 §2.6.7).
    pub fn drained(&mut self, link: LinkId) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if l.role != Role::Sender || !l.drain {
            return;
        }
        l.delivery_count = l.delivery_count.wrapping_add(l.credit);
        l.credit = 0;
        let ch = l.channel;
        self.write_flow(ch, Some(link));
        if let Some(l) = self.links.get_mut(&link) {
            l.drain = false;
        }
    }

    fn on_transfer(
        &mut self,
        ch: u16,
        t: Transfer,
        payload: Bytes,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        let s = self.session(ch);
        if s.end_sent {
            // We ended the session (an error): only the peer's End counts.
            return Ok(());
        }
        if s.incoming_window == 0 {
            // AMQP 1.0 §2.5.6: a transfer beyond the window we gave.
            self.end_with_error(
                ch,
                amqp_error(
                    SessionError::WindowViolation,
                    "transfer beyond the session's incoming window",
                ),
                events,
            );
            return Ok(());
        }
        s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
        s.incoming_window -= 1;
        // Refreshed once the frames read so far are handled (when output
        // is next taken), not per frame.
        s.refresh_due |= s.incoming_window < INCOMING_WINDOW / 2;
        let Some(&link) = s.remote_handles.get(&t.handle.0) else {
            return Err(violation(
                SessionError::UnattachedHandle,
                format!("transfer on unattached handle {}", t.handle.0),
            ));
        };
        let l = self
            .links
            .get_mut(&link)
            .expect("handle maps to a live link");
        if l.role != Role::Receiver {
            return Err(violation(
                AmqpError::NotAllowed,
                "transfer on a link where the peer is the receiver",
            ));
        }
        if l.detach_sent {
            if let Some(DeliveryState::TransactionalState(ts)) = &t.state {
                events.push(Event::Discarded {
                    txn: Bytes::copy_from_slice(ts.txn_id.as_slice()),
                });
            }
            return Ok(());
        }
        let settled = t.settled.unwrap_or(false);
        let too_big = |size: usize, max: u64| max > 0 && size as u64 > max;
        if t.aborted {
            l.assembly = None;
            return Ok(());
        }
        match l.assembly.as_mut() {
            None if credit_between(l.delivery_count, l.max_limit) == 0 => {
                // A new delivery beyond any credit we ever gave (AMQP 1.0
                // §2.6.7): the peer ignores flow control.
                let e = amqp_error(
                    LinkError::TransferLimitExceeded,
                    "transfer beyond the link credit given",
                );
                self.detach(link, Some(e));
                events.push(Event::Detach {
                    link,
                    closed: true,
                    error: None,
                    unsettled: Vec::new(),
                });
                return Ok(());
            }
            None => {
                let id = t.delivery_id.ok_or_else(|| {
                    violation(
                        AmqpError::InvalidField,
                        "first transfer of a delivery has no delivery-id",
                    )
                })?;
                let tag = Bytes::from(t.delivery_tag.map(ByteBuf::into_vec).unwrap_or_default());
                l.delivery_count = l.delivery_count.wrapping_add(1);
                l.credit = l.credit.saturating_sub(1);
                let format = t.message_format.unwrap_or(0);
                if too_big(payload.len(), l.max_message_size) {
                    let max = l.max_message_size;
                    self.refuse_oversized(link, max, events);
                    return Ok(());
                }
                if t.more {
                    let mut buf = BytesMut::with_capacity(payload.len() * 2);
                    buf.extend_from_slice(&payload);
                    l.assembly = Some(Assembly {
                        id,
                        tag,
                        settled,
                        format,
                        buf,
                        state: t.state,
                    });
                } else {
                    let delivery = Delivery {
                        id: DeliveryRef {
                            channel: ch,
                            delivery_id: id,
                        },
                        tag,
                        settled,
                        message_format: format,
                        payload,
                        state: t.state,
                    };
                    events.push(Event::Delivery { link, delivery });
                }
            }
            Some(a) => {
                a.settled |= settled;
                if t.state.is_some() {
                    a.state = t.state;
                }
                a.buf.extend_from_slice(&payload);
                if too_big(a.buf.len(), l.max_message_size) {
                    let max = l.max_message_size;
                    l.assembly = None;
                    self.refuse_oversized(link, max, events);
                    return Ok(());
                }
                if !t.more {
                    let a = l.assembly.take().expect("matched Some");
                    let delivery = Delivery {
                        id: DeliveryRef {
                            channel: ch,
                            delivery_id: a.id,
                        },
                        tag: a.tag,
                        settled: a.settled,
                        message_format: a.format,
                        payload: a.buf.freeze(),
                        state: a.state,
                    };
                    events.push(Event::Delivery { link, delivery });
                }
            }
        }
        Ok(())
    }

    /// Detaches a receiving link whose message exceeds max-message-size
    /// (AMQP 1.0 §2.7.3), and tells the owner the link is gone.
    fn refuse_oversized(&mut self, link: LinkId, max: u64, events: &mut Vec<Event>) {
        let e = amqp_error(
            LinkError::MessageSizeExceeded,
            format!("message larger than {max} bytes"),
        );
        self.detach(link, Some(e));
        events.push(Event::Detach {
            link,
            closed: true,
            error: None,
            unsettled: Vec::new(),
        });
    }

    /// Settles an incoming delivery with `state`. Dispositions are coalesced
    /// into ranges when output is taken.
    pub fn settle(&mut self, d: DeliveryRef, state: DeliveryState) {
        if let Some(Some(s)) = self.sessions.get_mut(usize::from(d.channel)) {
            s.pending_dispositions.push((d.delivery_id, state));
        }
    }

    fn flush_dispositions(&mut self) {
        for (ch, s) in self.sessions.iter_mut().enumerate() {
            let Some(s) = s else { continue };
            if s.pending_dispositions.is_empty() {
                continue;
            }
            let mut pending = std::mem::take(&mut s.pending_dispositions);
            pending.sort_by_key(|(id, _)| *id);
            let mut i = 0;
            while i < pending.len() {
                let (first, state) = &pending[i];
                let mut j = i + 1;
                while j < pending.len()
                    && pending[j].0 == pending[j - 1].0.wrapping_add(1)
                    && &pending[j].1 == state
                {
                    j += 1;
                }
                let last = pending[j - 1].0;
                let d = Disposition {
                    role: Role::Receiver,
                    first: *first,
                    last: (last != *first).then_some(last),
                    settled: true,
                    state: Some(state.clone()),
                    batchable: false,
                };
                frame::encode_performative(&mut self.out, ch as u16, &Performative::Disposition(d));
                i = j;
            }
        }
    }

    fn on_disposition(
        &mut self,
        ch: u16,
        d: Disposition,
        events: &mut Vec<Event>,
    ) -> Result<(), ProtocolError> {
        if d.role == Role::Sender {
            // The peer settles deliveries it sent us; we settle on our first
            // disposition (receiver-settle-mode first), so nothing to do.
            return Ok(());
        }
        let s = self.session(ch);
        let last = d.last.unwrap_or(d.first);
        let span = last.wrapping_sub(d.first) as usize;
        let mut hit = |id: u32, s: &mut Session| {
            let entry = if d.settled {
                s.unsettled.remove(&id)
            } else {
                s.unsettled.get(&id).copied()
            };
            if let Some((link, token)) = entry {
                events.push(Event::Outcome {
                    link,
                    token,
                    state: d.state.clone(),
                    settled: d.settled,
                });
            }
        };
        if span < s.unsettled.len().max(64) {
            for i in 0..=span {
                hit(d.first.wrapping_add(i as u32), s);
            }
        } else {
            let mut ids: Vec<u32> = s
                .unsettled
                .keys()
                .copied()
                .filter(|id| id.wrapping_sub(d.first) <= span as u32)
                .collect();
            ids.sort_by_key(|id| id.wrapping_sub(d.first));
            for id in ids {
                hit(id, s);
            }
        }
        Ok(())
    }

    /// Sends a message on a sending link, using one credit. Returns false
    /// (and sends nothing) when the link has no credit or is gone. `token`
    /// comes back in [`Event::Outcome`] (unsettled sends) or in the detach's
    /// `unsettled` list.
    pub fn send(&mut self, link: LinkId, payload: &[u8], settled: bool, token: u64) -> bool {
        self.send_parts(link, &[payload], settled, token)
    }

    /// [`Connection::send`] for a message in pieces (sent as their
    /// concatenation).
    pub fn send_parts(&mut self, link: LinkId, parts: &[&[u8]], settled: bool, token: u64) -> bool {
        self.send_with_state(link, parts, settled, token, None)
    }

    /// [`Connection::send_parts`] with a delivery state on the transfer
    /// (a `transactional-state` relayed from the sender's own transfer).
    pub fn send_with_state(
        &mut self,
        link: LinkId,
        parts: &[&[u8]],
        settled: bool,
        token: u64,
        state: Option<&DeliveryState>,
    ) -> bool {
        let state = state.and_then(|s| serde_amqp::to_vec(s).ok());
        let state = state.as_deref();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let Some(l) = self.links.get_mut(&link) else {
            return false;
        };
        if l.role != Role::Sender || l.credit == 0 || l.detach_sent || l.local_handle.is_none() {
            return false;
        }
        if l.max_message_size > 0 && total as u64 > l.max_message_size {
            return false;
        }
        l.credit -= 1;
        l.delivery_count = l.delivery_count.wrapping_add(1);
        let settled = settled || l.snd_settle_mode == SenderSettleMode::Settled;
        let tag = l.next_tag.to_be_bytes();
        l.next_tag += 1;
        let handle = l.local_handle.expect("checked above");
        let ch = l.channel;
        let max_frame = self.remote_max_frame_size as usize;
        let s = self.sessions[usize::from(ch)]
            .as_mut()
            .expect("link's session exists");
        let id = s.next_delivery_id;
        s.next_delivery_id = s.next_delivery_id.wrapping_add(1);
        if !settled {
            s.unsettled.insert(id, (link, token));
        }
        let room = max_frame
            .saturating_sub(frame::transfer_overhead(tag.len()))
            .saturating_sub(state.map_or(0, |s| s.len() + 2))
            .max(64);
        let single = total <= room;
        let hdr = |first: bool, more: bool| TransferHeader {
            handle,
            first: first.then_some((id, &tag[..])),
            message_format: 0,
            settled,
            more,
        };
        if single && s.remote_incoming_window > 0 && s.blocked.is_empty() {
            // The common case: one frame, straight into the output.
            s.next_outgoing_id = s.next_outgoing_id.wrapping_add(1);
            s.remote_incoming_window -= 1;
            frame::encode_transfer_with_state(&mut self.out, ch, &hdr(true, false), state, parts);
            return true;
        }
        let joined: Vec<u8>;
        let payload: &[u8] = if parts.len() == 1 {
            parts[0]
        } else {
            joined = parts.concat();
            &joined
        };
        let mut rest = payload;
        let mut first = true;
        loop {
            let n = rest.len().min(room);
            let more = n < rest.len();
            s.next_outgoing_id = s.next_outgoing_id.wrapping_add(1);
            let st = if first { state } else { None };
            if s.remote_incoming_window > 0 && s.blocked.is_empty() {
                s.remote_incoming_window -= 1;
                frame::encode_transfer_with_state(
                    &mut self.out,
                    ch,
                    &hdr(first, more),
                    st,
                    &[&rest[..n]],
                );
            } else {
                let mut b = BytesMut::with_capacity(n + 64);
                frame::encode_transfer_with_state(&mut b, ch, &hdr(first, more), st, &[&rest[..n]]);
                s.blocked.push_back((link, b.freeze()));
            }
            rest = &rest[n..];
            first = false;
            if !more {
                break;
            }
        }
        true
    }

    fn release_blocked(&mut self, ch: u16) {
        let s = self.sessions[usize::from(ch)]
            .as_mut()
            .expect("caller checked");
        while s.remote_incoming_window > 0 {
            let Some((_, b)) = s.blocked.pop_front() else {
                break;
            };
            s.remote_incoming_window -= 1;
            self.out.extend_from_slice(&b);
        }
    }

    /// Forgets every link of the session on `ch`; the owner hears of each
    /// it had not detached itself, with its unsettled deliveries.
    fn forget_session_links(&mut self, ch: u16, events: &mut Vec<Event>) {
        let ids: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.channel == ch)
            .map(|(id, _)| *id)
            .collect();
        for link in ids {
            let was_ours = self.links.get(&link).is_some_and(|l| l.detach_sent);
            let unsettled = self.forget_link(link);
            if !was_ours {
                events.push(Event::Detach {
                    link,
                    closed: false,
                    error: None,
                    unsettled,
                });
            }
        }
    }

    /// Ends a session the peer broke (a window violation): its links are
    /// gone (the owner hears of each), End with `error` goes out, and the
    /// session is forgotten when the peer's End comes.
    fn end_with_error(&mut self, ch: u16, error: AmqpErrorBody, events: &mut Vec<Event>) {
        self.forget_session_links(ch, events);
        let s = self.session(ch);
        s.end_sent = true;
        s.blocked.clear();
        s.remote_handles.clear();
        frame::encode_performative(
            &mut self.out,
            ch,
            &Performative::End(End { error: Some(error) }),
        );
    }

    /// Ends a session (client side).
    pub fn end(&mut self, ch: u16) {
        self.flush_dispositions();
        if let Some(Some(s)) = self.sessions.get_mut(usize::from(ch)) {
            if !s.end_sent {
                s.end_sent = true;
                // Nothing may follow the End on this channel.
                s.blocked.clear();
                frame::encode_performative(
                    &mut self.out,
                    ch,
                    &Performative::End(End { error: None }),
                );
            }
        }
    }

    /// Tokens of every unsettled delivery we sent, for a connection that is
    /// going away.
    pub fn take_all_unsettled(&mut self) -> Vec<(LinkId, u64)> {
        self.sessions
            .iter_mut()
            .flatten()
            .flat_map(|s| s.unsettled.drain().map(|(_, v)| v))
            .collect()
    }

    /// When the peer's idle timeout next needs a frame from us (half of
    /// it after the last we sent), once its Open has told us.
    pub fn heartbeat_due(&self) -> Option<Instant> {
        self.remote_idle_timeout.map(|r| self.last_sent + r / 2)
    }

    /// Heartbeats and idle timeout. Returns when to call again.
    ///
    /// # Errors
    /// Nothing arrived within our idle timeout.
    pub fn tick(&mut self, now: Instant) -> Result<Instant, ProtocolError> {
        let mut next = now + Duration::from_secs(3600);
        if let Some(idle) = self.cfg.idle_timeout {
            let deadline = self.last_received + idle;
            if now >= deadline {
                return Err(violation(
                    AmqpError::ResourceLimitExceeded,
                    format!(
                        "local-idle-timeout expired ({} ms with no frame)",
                        idle.as_millis()
                    ),
                ));
            }
            next = next.min(deadline);
        }
        if let Some(remote) = self.remote_idle_timeout {
            // Send at half the peer's timeout, as most implementations do.
            let every = remote / 2;
            if self.out.is_empty() && now >= self.last_sent + every {
                frame::encode_empty(&mut self.out);
                self.last_sent = now;
            }
            next = next.min(self.last_sent + every);
        }
        Ok(next)
    }
}
