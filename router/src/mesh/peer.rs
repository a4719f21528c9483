//! Inter-router connections: a [`crate::connection::ConnectionTask`] in
//! peer mode. Each router attaches two sending links to the other: a
//! control link (HELLO, link-state and address records, JSON) and a data
//! link. A message on the data link is a routing header followed by the
//! message exactly as the client sent it:
//!
//! ```text
//! 0xF1 | flags (bit 0: multicast) | u16 len + space | u16 len + address
//!      | u16 len + ingress router | u8 count, then u16 len + router id each (trace)
//! ```
//!
//! The receiving router strips the header (a slice, no copy) and routes
//! the message as if a local sender had sent it, except that it never
//! sends it back towards a router in the trace. Outcomes of unsettled
//! deliveries travel back hop by hop on the same links.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use flotilla_amqp::connection::{amqp_error, AttachReply, Delivery, LinkId};
use flotilla_amqp::message::{self, MessageParts};
use flotilla_amqp::types::definitions::{AmqpError, ReceiverSettleMode, Role, SenderSettleMode};
use flotilla_amqp::types::messaging::{Source, Target, TargetArchetype};
use flotilla_core::resources::AddressType;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::{Control, MeshEvent, MeshHandle, PeerCommand};
use crate::connection::{ConnRole, ConnectionTask};
use crate::core::{AddressState, Hops, Origin, Routed};

/// Offered in the Open of every inter-router connection, both ways.
pub const INTER_ROUTER_CAPABILITY: &str = "flotilla.inter-router";
const CONTROL_ADDRESS: &str = "$flotilla/control";
const DATA_ADDRESS: &str = "$flotilla/data";
/// Credit we give a neighbour's data link (per-address windows bound what
/// it may really have in flight).
const DATA_CREDIT: u32 = 5000;
const CONTROL_CREDIT: u32 = 1000;
/// Multicast copies held for a neighbour without credit before new ones
/// are dropped (multicast is at-most-once).
const MULTICAST_PENDING: usize = 10_000;
/// Control messages kept before the mesh hears of the connection.
const EARLY_MAX: usize = 10_000;

/// A meshed message's routing header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub multicast: bool,
    pub space: String,
    pub address: String,
    pub ingress: String,
    pub trace: Vec<String>,
}

fn put_str(out: &mut BytesMut, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

impl Header {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Writes the header into `out` (cleared first).
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.clear();
        out.put_u8(0xF1);
        out.put_u8(u8::from(self.multicast));
        put_str(out, &self.space);
        put_str(out, &self.address);
        put_str(out, &self.ingress);
        out.put_u8(self.trace.len().min(255) as u8);
        for t in self.trace.iter().take(255) {
            put_str(out, t);
        }
    }

    /// The header at the front of `b` and its length; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<(Header, usize)> {
        let mut at = 0;
        let byte = |at: &mut usize| -> Option<u8> {
            let v = *b.get(*at)?;
            *at += 1;
            Some(v)
        };
        let string = |at: &mut usize| -> Option<String> {
            let len = u16::from_be_bytes([*b.get(*at)?, *b.get(*at + 1)?]) as usize;
            let s = std::str::from_utf8(b.get(*at + 2..*at + 2 + len)?)
                .ok()?
                .to_string();
            *at += 2 + len;
            Some(s)
        };
        if byte(&mut at)? != 0xF1 {
            return None;
        }
        let flags = byte(&mut at)?;
        let space = string(&mut at)?;
        let address = string(&mut at)?;
        let ingress = string(&mut at)?;
        let n = byte(&mut at)?;
        let mut trace = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            trace.push(string(&mut at)?);
        }
        Some((
            Header {
                multicast: flags & 1 != 0,
                space,
                address,
                ingress,
                trace,
            },
            at,
        ))
    }
}

/// The peer-mode state of a connection task.
pub(crate) struct PeerLink {
    pub(crate) mesh: MeshHandle,
    /// We opened the connection (we begin the session).
    outbound: bool,
    remote_id: Option<String>,
    control_out: Option<LinkId>,
    pub(crate) data_out: Option<LinkId>,
    control_in: Option<LinkId>,
    data_in: Option<LinkId>,
    out_attached: (bool, bool),
    announced: bool,
    control_tx: mpsc::UnboundedSender<PeerCommand>,
    pub(crate) commands: Option<mpsc::UnboundedReceiver<PeerCommand>>,
    control_queue: VecDeque<Bytes>,
    /// Messages for the neighbour waiting for data-link credit.
    pending: VecDeque<(Routed, Arc<AddressState>, Arc<AtomicU32>)>,
    /// Scratch space for routing headers.
    header_buf: BytesMut,
    /// Control messages that came before we told the mesh about this
    /// connection (the mesh ignores unknown connections).
    early: Vec<Control>,
    /// Messages from the neighbour waiting in this router for credit.
    held: u32,
}

impl PeerLink {
    pub(crate) fn new(mesh: MeshHandle, outbound: bool) -> Self {
        let (control_tx, commands) = mpsc::unbounded_channel();
        PeerLink {
            mesh,
            outbound,
            remote_id: None,
            control_out: None,
            data_out: None,
            control_in: None,
            data_in: None,
            out_attached: (false, false),
            announced: false,
            control_tx,
            commands: Some(commands),
            control_queue: VecDeque::new(),
            pending: VecDeque::new(),
            header_buf: BytesMut::new(),
            early: Vec::new(),
            held: 0,
        }
    }
}

/// The peer state of an inter-router connection's role.
fn peer_of(role: &mut ConnRole) -> Option<&mut PeerLink> {
    match role {
        ConnRole::Peer(p) => Some(p),
        _ => None,
    }
}

impl ConnectionTask {
    /// Starts an outbound inter-router connection: Open, Begin, and our two
    /// sending links.
    pub(crate) fn peer_start(&mut self) {
        if !peer_of(&mut self.role).is_some_and(|p| p.outbound) {
            return;
        }
        self.conn.open();
        if let Some(ch) = self.conn.begin() {
            self.peer_attach_senders(ch);
            self.route_session_ready(ch);
        }
    }

    fn peer_attach_senders(&mut self, ch: u16) {
        let id = self.shared.cfg.container_id.clone();
        let attach = |conn: &mut flotilla_amqp::connection::Connection,
                      name: &str,
                      address: &str,
                      settled: bool| {
            let target = Target {
                address: Some(address.to_string()),
                ..Default::default()
            };
            let snd = if settled {
                SenderSettleMode::Settled
            } else {
                SenderSettleMode::Mixed
            };
            conn.attach(
                ch,
                &format!("{id}/{name}"),
                Role::Sender,
                Some(Source::default()),
                Some(target),
                snd,
                ReceiverSettleMode::First,
            )
        };
        let control = attach(&mut self.conn, "control", CONTROL_ADDRESS, true);
        let data = attach(&mut self.conn, "data", DATA_ADDRESS, false);
        if let Some(p) = peer_of(&mut self.role) {
            p.control_out = Some(control);
            p.data_out = Some(data);
        }
    }

    /// Makes this connection an inter-router one.
    pub(crate) fn make_peer(&mut self, mesh: MeshHandle, outbound: bool) {
        self.conn.config_mut().offered_capabilities = vec![INTER_ROUTER_CAPABILITY];
        let mut p = PeerLink::new(mesh, outbound);
        self.peer_commands = p.commands.take();
        self.role = ConnRole::Peer(Box::new(p));
    }

    pub(crate) fn peer_on_open(&mut self, open: &flotilla_amqp::types::performatives::Open) {
        let is_router = open
            .offered_capabilities
            .as_ref()
            .is_some_and(|c| c.0.iter().any(|s| s.as_str() == INTER_ROUTER_CAPABILITY));
        if !is_router {
            info!(conn.id = self.id.0, container = %open.container_id, "refused: not a Flotilla router");
            self.closing = Some(crate::connection::CloseReason::Unauthorized);
            self.conn.close(Some(amqp_error(
                AmqpError::NotAllowed,
                format!("this port is for routers; Open must offer {INTER_ROUTER_CAPABILITY}"),
            )));
            return;
        }
        let container_id = open.container_id.as_str();
        if container_id == self.shared.cfg.container_id {
            // A headless service lists this router too; or another router
            // has our id, which the mesh cannot tell from us.
            info!(conn.id = self.id.0, addr = %self.peer, "inter-router connection to this router itself (or to another router with the same --router-id); not used");
            if peer_of(&mut self.role).is_some_and(|p| p.outbound) {
                self.shared
                    .self_addrs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(self.peer);
            }
            self.closing = Some(crate::connection::CloseReason::Unauthorized);
            self.conn.close(Some(amqp_error(
                AmqpError::NotAllowed,
                "this is the router's own inter-router port",
            )));
            return;
        }
        info!(
            conn.id = self.id.0,
            router = container_id,
            "inter-router connection open"
        );
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        p.remote_id = Some(container_id.to_string());
        if !p.outbound {
            self.conn.open();
        }
    }

    pub(crate) fn peer_on_begin(&mut self, channel: u16, answer: bool) {
        let first = peer_of(&mut self.role).is_some_and(|p| !p.outbound && p.control_out.is_none());
        if !answer && first {
            self.peer_attach_senders(channel);
            self.route_session_ready(channel);
        }
    }

    pub(crate) fn peer_on_attach(
        &mut self,
        link: LinkId,
        attach: flotilla_amqp::types::performatives::Attach,
        reply: bool,
    ) {
        if !reply {
            // A link routed through us towards a broker.
            if let Some(info) = crate::linkroute::RouteInfo::from_attach(&attach) {
                return self.route_attach(link, attach, info);
            }
        }
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        if reply {
            if Some(link) == p.control_out {
                p.out_attached.0 = true;
            } else if Some(link) == p.data_out {
                p.out_attached.1 = true;
            }
            self.peer_announce();
            return;
        }
        let address = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.clone(),
            _ => None,
        };
        match (&attach.role, address.as_deref()) {
            (Role::Sender, Some(a @ (CONTROL_ADDRESS | DATA_ADDRESS))) => {
                let target = Target {
                    address: Some(a.to_string()),
                    ..Default::default()
                };
                if a == CONTROL_ADDRESS {
                    p.control_in = Some(link);
                } else {
                    p.data_in = Some(link);
                }
                self.conn.accept_attach(
                    link,
                    AttachReply {
                        source: attach.source.as_deref().cloned(),
                        target: Some(target),
                        ..Default::default()
                    },
                );
                let credit = if a == CONTROL_ADDRESS {
                    CONTROL_CREDIT
                } else {
                    DATA_CREDIT
                };
                self.conn.flow(link, credit, false);
            }
            _ => self.conn.refuse_attach(
                link,
                amqp_error(
                    AmqpError::NotAllowed,
                    "inter-router connections carry only the mesh's own links",
                ),
            ),
        }
    }

    /// Tells the mesh once both our links are attached.
    fn peer_announce(&mut self) {
        let handle = self.handle.clone();
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        if p.announced || p.out_attached != (true, true) {
            return;
        }
        let (Some(id), Some(data)) = (p.remote_id.clone(), p.data_out) else {
            return;
        };
        p.announced = true;
        let conn = handle.id().0;
        let ev = MeshEvent::PeerUp {
            id: id.clone(),
            conn: handle,
            control: p.control_tx.clone(),
            data,
        };
        p.mesh.send(ev);
        for msg in std::mem::take(&mut p.early) {
            p.mesh.send(MeshEvent::Control {
                from: id.clone(),
                conn,
                msg,
            });
        }
    }

    pub(crate) fn peer_on_flow(&mut self, link: LinkId) {
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        if Some(link) == p.control_out {
            self.flush_control();
        } else if Some(link) == p.data_out {
            self.flush_pending();
        }
    }

    pub(crate) fn peer_command(&mut self, cmd: PeerCommand) {
        match cmd {
            PeerCommand::Send(c) => {
                let body = match serde_json::to_vec(&c) {
                    Ok(b) => b,
                    Err(e) => return debug!(error = %e, "cannot encode control message"),
                };
                let msg = message::encode_message(&MessageParts {
                    body: &body,
                    ..Default::default()
                });
                if let Some(p) = peer_of(&mut self.role) {
                    p.control_queue.push_back(msg);
                }
                self.flush_control();
            }
            PeerCommand::Close => {
                info!(
                    conn.id = self.id.0,
                    "closing inter-router connection: neighbour silent"
                );
                self.closing = Some(crate::connection::CloseReason::Shutdown);
                self.conn.close(Some(amqp_error(
                    AmqpError::ResourceLimitExceeded,
                    "no HELLO for 3 periods",
                )));
            }
        }
    }

    fn flush_control(&mut self) {
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        let Some(link) = p.control_out else {
            return;
        };
        while self.conn.link(link).is_some_and(|l| l.credit > 0) {
            let Some(m) = p.control_queue.pop_front() else {
                break;
            };
            self.conn.send(link, &m, true, 0);
        }
    }

    /// A message for the neighbour: header, then the message as it came.
    pub(crate) fn deliver_to_peer(
        &mut self,
        msg: Routed,
        address: &Arc<AddressState>,
        outstanding: &Arc<AtomicU32>,
    ) {
        let Some(p) = peer_of(&mut self.role) else {
            return msg.release();
        };
        if address.kind == AddressType::Multicast && p.pending.len() >= MULTICAST_PENDING {
            address
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        p.pending
            .push_back((msg, address.clone(), outstanding.clone()));
        self.flush_pending();
    }

    fn flush_pending(&mut self) {
        let me = self.shared.cfg.container_id.clone();
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        let Some(link) = p.data_out else {
            return;
        };
        while self.conn.link(link).is_some_and(|l| l.credit > 0) {
            let Some((msg, address, outstanding)) = p.pending.pop_front() else {
                break;
            };
            let (ingress, mut trace) = match &msg.hops {
                Some(h) => (h.ingress.clone(), h.trace.clone()),
                None => (me.clone(), Vec::new()),
            };
            trace.push(me.clone());
            let header = Header {
                multicast: address.kind == AddressType::Multicast,
                space: address.space.clone(),
                address: address.address.clone(),
                ingress,
                trace,
            };
            header.encode_into(&mut p.header_buf);
            let hdr = p.header_buf.split();
            let token = self.next_token;
            self.next_token += 1;
            if !self
                .conn
                .send_parts(link, &[&hdr, &msg.payload], msg.settled, token)
            {
                address.unsend(self.id, link, msg);
                continue;
            }
            if !msg.settled {
                self.unsettled.insert(
                    token,
                    crate::connection::Unsettled {
                        origin: msg.origin,
                        outstanding: outstanding.clone(),
                        lost: crate::connection::Lost::Released,
                        receiver: Some((link, address.clone())),
                    },
                );
            }
            if address.kind != AddressType::Multicast {
                // The neighbour took one: widen this consumer's window (what
                // waited for it comes back through our channel, in order).
                address.widen(&outstanding, 1);
            }
        }
    }

    /// A delivery from the neighbour: control messages go to the mesh,
    /// data is routed.
    pub(crate) fn peer_on_delivery(&mut self, link: LinkId, d: Delivery) {
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        let from = p.remote_id.clone().unwrap_or_default();
        if Some(link) == p.control_in {
            match message::body_bytes(&d.payload)
                .and_then(|b| serde_json::from_slice::<Control>(&b).ok())
            {
                Some(msg) => {
                    let conn = self.id.0;
                    if p.announced {
                        p.mesh.send(MeshEvent::Control { from, conn, msg });
                    } else if p.early.len() < EARLY_MAX {
                        p.early.push(msg);
                    }
                }
                None => debug!(conn.id = self.id.0, "undecodable control message ignored"),
            }
            if self
                .conn
                .link(link)
                .is_some_and(|l| l.credit < CONTROL_CREDIT / 2)
            {
                self.conn.flow(link, CONTROL_CREDIT, false);
            }
            return;
        }
        if Some(link) != p.data_in {
            return;
        }
        let Some((h, len)) = Header::decode(&d.payload) else {
            return self.reject(
                &d.id,
                d.settled,
                amqp_error(AmqpError::DecodeError, "bad inter-router routing header"),
            );
        };
        let kind = if h.multicast {
            AddressType::Multicast
        } else {
            AddressType::Anycast
        };
        // Routing never makes an address's state: with none, no receiver
        // is here (the neighbour's view was stale), and the message goes
        // back or is dropped like any without a receiver.
        let state = match self.shared.table.get(&h.space, &h.address) {
            Some(s) if s.kind == kind => s,
            // Multicast may pass through on its tree without a receiver
            // here: a state of its own, not in the table.
            _ if kind == AddressType::Multicast => {
                Arc::new(AddressState::unlisted(&h.space, &h.address, kind))
            }
            _ => return self.no_receiver(&d.id, d.settled),
        };
        let origin = (!d.settled).then(|| Origin {
            conn: self.handle.core.clone(),
            delivery: d.id,
        });
        let routed = Routed {
            payload: d.payload.slice(len..),
            settled: d.settled,
            origin,
            // Messages that wait here for a receiver's credit hold the data
            // link's credit until they leave (see `peer_top_up`).
            sender: Some((self.handle.core.clone(), link)),
            hops: Some(Arc::new(Hops {
                ingress: h.ingress,
                trace: h.trace,
            })),
        };
        self.route(&state, routed, d.id, link);
    }

    /// Credit for the neighbour's data link: [`DATA_CREDIT`] less the
    /// messages of it that wait in this router for a receiver's credit, so
    /// a stalled receiver anywhere stops its senders instead of filling
    /// this router's memory.
    pub(crate) fn peer_top_up(&mut self) {
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        let (Some(link), held) = (p.data_in, p.held) else {
            return;
        };
        let Some(l) = self.conn.link(link) else {
            return;
        };
        let want = DATA_CREDIT.saturating_sub(held);
        if l.credit + held <= DATA_CREDIT / 2 && want > l.credit {
            self.conn.flow(link, want, false);
        }
    }

    /// Messages from the neighbour started or stopped waiting here.
    pub(crate) fn peer_held(&mut self, link: LinkId, queued: u32, returned: u32) -> bool {
        let Some(p) = peer_of(&mut self.role) else {
            return false;
        };
        if p.data_in != Some(link) {
            return false;
        }
        p.held = (p.held + queued).saturating_sub(returned);
        true
    }

    /// The connection is gone: tell the mesh, give back what waited.
    pub(crate) fn peer_cleanup(&mut self) {
        let Some(p) = peer_of(&mut self.role) else {
            return;
        };
        if let Some(id) = p.remote_id.clone() {
            p.mesh.send(MeshEvent::PeerDown {
                id,
                conn: self.id.0,
            });
        }
        let link = p.data_out.unwrap_or(LinkId(u32::MAX));
        for (msg, address, _) in std::mem::take(&mut p.pending) {
            address.unsend(self.id, link, msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_garbage() {
        let h = Header {
            multicast: true,
            space: "default".into(),
            address: "a/b".into(),
            ingress: "r1".into(),
            trace: vec!["r1".into(), "r2".into()],
        };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(b"message");
        let (d, len) = Header::decode(&b).unwrap();
        assert_eq!(d, h);
        assert_eq!(&b[len..], b"message");
        for cut in 0..len {
            assert!(Header::decode(&b[..cut]).is_none());
        }
        assert!(Header::decode(b"\x00").is_none());
    }
}
