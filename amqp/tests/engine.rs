//! Tests of the connection engine through its public API: two
//! [`Connection`]s wired back to back in memory, every byte one writes
//! decoded with [`decode_frame`] and fed to the other, as a connection task
//! would; and hand-made frames from a fake peer for protocol violations and
//! session flow control (AMQP 1.0 §2.4–§2.7).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flotilla_amqp::connection::{
    amqp_error, AttachReply, Connection, ConnectionConfig, Delivery, DeliveryRef, Event, LinkId,
    ProtocolError,
};
use flotilla_amqp::frame::{self, decode_frame, Frame, Performative, TransferHeader};
use flotilla_amqp::types::definitions::{
    AmqpError, ErrorCondition, Handle, LinkError, ReceiverSettleMode, Role, SenderSettleMode,
    SessionError,
};
use flotilla_amqp::types::messaging::{Accepted, DeliveryState, Rejected, Released};
use flotilla_amqp::types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open,
};
use proptest::prelude::*;

/// Rounds [`Pair::pump`] allows before calling the engines stuck.
const MAX_ROUNDS: usize = 10_000;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// One end of an in-memory connection.
struct Side {
    conn: Connection,
    /// Bytes the other side wrote that have not reached this side yet.
    wire: BytesMut,
    /// Bytes that reached this side but do not yet make a whole frame.
    inbox: BytesMut,
    /// Every byte that reached this side, in order.
    received: Vec<u8>,
    /// Transfer frames that reached this side.
    transfer_frames: usize,
    events: Vec<Event>,
    /// Answer the peer's attaches with `accept_attach`, as a router does.
    auto_accept: bool,
    /// Give each link the peer sends on this much credit as it attaches.
    auto_credit: u32,
}

impl Side {
    fn new(cfg: ConnectionConfig) -> Self {
        Side {
            conn: Connection::new(cfg),
            wire: BytesMut::new(),
            inbox: BytesMut::new(),
            received: Vec::new(),
            transfer_frames: 0,
            events: Vec::new(),
            auto_accept: true,
            auto_credit: 0,
        }
    }

    /// Moves up to `n` bytes from the wire into this side and handles every
    /// whole frame they complete.
    fn receive(&mut self, n: usize) -> Result<(), ProtocolError> {
        let n = n.min(self.wire.len());
        let chunk = self.wire.split_to(n);
        self.received.extend_from_slice(&chunk);
        self.inbox.extend_from_slice(&chunk);
        while let Some(f) = decode_frame(&mut self.inbox, self.conn.max_frame_size())
            .unwrap_or_else(|e| panic!("the peer wrote an undecodable frame: {e}"))
        {
            if matches!(
                f,
                Frame::Amqp {
                    performative: Performative::Transfer(_),
                    ..
                }
            ) {
                self.transfer_frames += 1;
            }
            let start = self.events.len();
            self.conn.handle_frame(f, &mut self.events)?;
            self.react(start);
        }
        Ok(())
    }

    /// What an owner does without being asked: answer Open, accept attaches.
    fn react(&mut self, start: usize) {
        let mut open = false;
        let mut accept = Vec::new();
        let mut credit = Vec::new();
        for e in &self.events[start..] {
            match e {
                Event::Open(_) => open = true,
                Event::Attach {
                    link,
                    attach,
                    reply: false,
                } => {
                    if self.auto_accept {
                        accept.push(*link);
                    }
                    if self.auto_credit > 0 && attach.role == Role::Sender {
                        credit.push(*link);
                    }
                }
                _ => {}
            }
        }
        if open {
            self.conn.open();
        }
        for link in accept {
            self.conn.accept_attach(link, AttachReply::default());
        }
        for link in credit {
            self.conn.flow(link, self.auto_credit, false);
        }
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn credit(&self, link: LinkId) -> u32 {
        self.conn.link(link).expect("link exists").credit
    }
}

/// A client and a server engine connected back to back.
struct Pair {
    client: Side,
    server: Side,
}

impl Pair {
    fn new(client: ConnectionConfig, server: ConnectionConfig) -> Self {
        Pair {
            client: Side::new(client),
            server: Side::new(server),
        }
    }

    /// Puts what each engine wrote on the wire toward the other.
    fn flush(&mut self) {
        let c = self.client.conn.take_output();
        self.server.wire.extend_from_slice(&c);
        let s = self.server.conn.take_output();
        self.client.wire.extend_from_slice(&s);
    }

    /// Lets `n` bytes through toward the server (or the client), splitting
    /// the stream wherever `n` falls.
    fn deliver(&mut self, to_server: bool, n: usize) -> Result<(), ProtocolError> {
        self.flush();
        if to_server {
            self.server.receive(n)?;
        } else {
            self.client.receive(n)?;
        }
        self.flush();
        Ok(())
    }

    /// Runs both engines until neither has anything more to say.
    ///
    /// # Panics
    /// Either side reports a protocol error, or they never go quiet.
    fn pump(&mut self) {
        for _ in 0..MAX_ROUNDS {
            self.flush();
            if self.client.wire.is_empty() && self.server.wire.is_empty() {
                assert!(!self.client.conn.has_output() && !self.server.conn.has_output());
                return;
            }
            self.server
                .receive(usize::MAX)
                .expect("server: protocol error");
            self.client
                .receive(usize::MAX)
                .expect("client: protocol error");
        }
        panic!("engines did not go quiet after {MAX_ROUNDS} rounds");
    }
}

fn server_config() -> ConnectionConfig {
    ConnectionConfig {
        container_id: "server".into(),
        ..ConnectionConfig::default()
    }
}

fn client_config() -> ConnectionConfig {
    ConnectionConfig {
        container_id: "client".into(),
        hostname: Some("localhost".into()),
        ..ConnectionConfig::default()
    }
}

/// A pair with the connection open and one session begun by the client;
/// returns the session's channel on the client and on the server.
fn connected(client: ConnectionConfig, server: ConnectionConfig) -> (Pair, u16, u16) {
    let mut p = Pair::new(client, server);
    p.client.conn.open();
    let ch = p.client.conn.begin().expect("a free channel");
    p.pump();
    let server_ch = p
        .server
        .take_events()
        .into_iter()
        .find_map(|e| match e {
            Event::Begin {
                channel,
                answer: false,
            } => Some(channel),
            _ => None,
        })
        .expect("server saw the Begin");
    p.client.take_events();
    assert!(p.client.conn.session_answered(ch));
    (p, ch, server_ch)
}

/// Attaches a link from the client (`role` is the client's role) and returns
/// its id on the client and on the server.
fn attach(p: &mut Pair, ch: u16, name: &str, role: Role) -> (LinkId, LinkId) {
    let c = p.client.conn.attach(
        ch,
        name,
        role,
        None,
        None,
        SenderSettleMode::Mixed,
        ReceiverSettleMode::First,
    );
    p.pump();
    let s = p
        .server
        .take_events()
        .into_iter()
        .find_map(|e| match e {
            Event::Attach {
                link,
                attach,
                reply: false,
            } if attach.name == name => Some(link),
            _ => None,
        })
        .expect("server saw the attach");
    let answered = p.client.take_events().into_iter().any(|e| {
        matches!(e, Event::Attach { link, reply: true, ref attach } if link == c && attach.name == name)
    });
    assert!(answered, "client saw the answer to {name}");
    (c, s)
}

fn deliveries(events: &[Event]) -> Vec<(LinkId, &Delivery)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Delivery { link, delivery } => Some((*link, delivery)),
            _ => None,
        })
        .collect()
}

/// (token, state, settled) of every outcome.
fn outcomes(events: &[Event]) -> Vec<(u64, Option<DeliveryState>, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Outcome {
                token,
                state,
                settled,
                ..
            } => Some((*token, state.clone(), *settled)),
            _ => None,
        })
        .collect()
}

/// A payload that differs for every (token, length).
fn payload(token: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (token as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

fn accepted() -> DeliveryState {
    DeliveryState::Accepted(Accepted {})
}

// ---------------------------------------------------------------------------
// Hand-made frames (a fake peer)
// ---------------------------------------------------------------------------

/// `p` encoded and decoded again, as it would reach an engine.
fn frame_of(channel: u16, p: Performative) -> Frame {
    let mut b = BytesMut::new();
    frame::encode_performative(&mut b, channel, &p);
    decode_frame(&mut b, u32::MAX)
        .expect("decodes")
        .expect("whole")
}

fn open_frame(max_frame_size: u32) -> Frame {
    frame_of(
        0,
        Performative::Open(Box::new(Open {
            container_id: "peer".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(max_frame_size),
            channel_max: ChannelMax(255),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })),
    )
}

fn begin_frame(channel: u16, remote_channel: Option<u16>, incoming_window: u32) -> Frame {
    frame_of(
        channel,
        Performative::Begin(Begin {
            remote_channel,
            next_outgoing_id: 0,
            incoming_window,
            outgoing_window: 1 << 20,
            handle_max: Handle(u32::MAX),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
    )
}

fn attach_frame(channel: u16, name: &str, handle: u32, role: Role) -> Frame {
    let sender = role == Role::Sender;
    frame_of(
        channel,
        Performative::Attach(Box::new(Attach {
            name: name.into(),
            handle: Handle(handle),
            role,
            snd_settle_mode: SenderSettleMode::Mixed,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: None,
            target: None,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: sender.then_some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })),
    )
}

/// A Flow; `link` is (handle, delivery-count, link-credit).
fn flow_frame(
    channel: u16,
    next_incoming_id: Option<u32>,
    incoming_window: u32,
    link: Option<(u32, u32, u32)>,
) -> Frame {
    frame_of(
        channel,
        Performative::Flow(Flow {
            next_incoming_id,
            incoming_window,
            next_outgoing_id: 0,
            outgoing_window: 1 << 20,
            handle: link.map(|l| Handle(l.0)),
            delivery_count: link.map(|l| l.1),
            link_credit: link.map(|l| l.2),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        }),
    )
}

fn transfer_frame(channel: u16, handle: u32, delivery_id: Option<u32>, more: bool) -> Frame {
    let mut b = BytesMut::new();
    frame::encode_transfer(
        &mut b,
        channel,
        &TransferHeader {
            handle,
            first: delivery_id.map(|id| (id, &b"t"[..])),
            message_format: 0,
            settled: false,
            more,
        },
        b"payload",
    );
    decode_frame(&mut b, u32::MAX)
        .expect("decodes")
        .expect("whole")
}

/// Every frame in `bytes` (which must hold whole frames only).
fn decode_all(bytes: &[u8], max_frame_size: u32) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = decode_frame(&mut buf, max_frame_size).expect("engine output decodes") {
        out.push(f);
    }
    assert!(buf.is_empty(), "engine output ends mid-frame");
    out
}

/// Delivery-ids of the first frames of the transfers in `frames`, and how
/// many transfer frames there are.
fn transfer_ids(frames: &[Frame]) -> (Vec<u32>, usize) {
    let mut ids = Vec::new();
    let mut n = 0;
    for f in frames {
        if let Frame::Amqp {
            performative: Performative::Transfer(t),
            ..
        } = f
        {
            n += 1;
            ids.extend(t.delivery_id);
        }
    }
    (ids, n)
}

// ---------------------------------------------------------------------------
// 1. Handshake
// ---------------------------------------------------------------------------

#[test]
fn handshake_opens_and_begins() {
    let mut p = Pair::new(client_config(), server_config());
    p.client.conn.open();
    let ch = p.client.conn.begin().expect("a free channel");
    assert!(!p.client.conn.session_answered(ch));
    p.pump();

    let server_events = p.server.take_events();
    match &server_events[..] {
        [Event::Open(open), Event::Begin {
            channel,
            answer: false,
        }] => {
            assert_eq!(open.container_id, "client");
            assert_eq!(open.hostname.as_deref(), Some("localhost"));
            assert!(p.server.conn.session_answered(*channel));
        }
        other => panic!("server events: {other:?}"),
    }
    let client_events = p.client.take_events();
    match &client_events[..] {
        [Event::Open(open), Event::Begin { answer: true, .. }] => {
            assert_eq!(open.container_id, "server");
            assert_eq!(open.max_frame_size.0, 65536);
        }
        other => panic!("client events: {other:?}"),
    }
    assert!(p.client.conn.session_answered(ch));
    assert!(!p.client.conn.is_closed());

    // A second session gets its own channel.
    let ch2 = p.client.conn.begin().expect("a free channel");
    assert_ne!(ch, ch2);
    p.pump();
    assert!(p.client.conn.session_answered(ch2));

    p.client.conn.close(None);
    p.pump();
    assert!(p.client.conn.is_closed() && p.server.conn.is_closed());
    assert!(matches!(
        &p.server.take_events()[..],
        [Event::Begin { .. }, Event::Close { error: None }]
    ));
}

#[test]
fn server_begin_waits_for_its_open() {
    // A server that has not yet opened defers its Begin answer until it does.
    let mut p = Pair::new(client_config(), server_config());
    p.server.auto_accept = false;
    p.client.conn.open();
    let ch = p.client.conn.begin().expect("a free channel");
    p.flush();
    p.server.receive(usize::MAX).expect("no error");
    // `react` opened the server on Event::Open, so the Begin went out after it.
    let out = p.server.conn.take_output();
    let frames = decode_all(&out, 65536);
    assert!(matches!(
        &frames[..],
        [
            Frame::Amqp {
                performative: Performative::Open(_),
                ..
            },
            Frame::Amqp {
                performative: Performative::Begin(b),
                ..
            }
        ] if b.remote_channel == Some(ch)
    ));
}

// ---------------------------------------------------------------------------
// 2. Links
// ---------------------------------------------------------------------------

#[test]
fn links_attach_in_both_directions() {
    let (mut p, ch, server_ch) = connected(client_config(), server_config());
    let (c_out, s_in) = attach(&mut p, ch, "to-server", Role::Sender);
    let (c_in, s_out) = attach(&mut p, ch, "to-client", Role::Receiver);
    assert_eq!(p.server.conn.link(s_in).unwrap().role, Role::Receiver);
    assert_eq!(p.server.conn.link(s_out).unwrap().role, Role::Sender);

    // The server starts a link too; the client accepts it.
    let s_push = p.server.conn.attach(
        server_ch,
        "pushed",
        Role::Sender,
        None,
        None,
        SenderSettleMode::Mixed,
        ReceiverSettleMode::First,
    );
    p.pump();
    let c_push = p
        .client
        .take_events()
        .into_iter()
        .find_map(|e| match e {
            Event::Attach {
                link,
                reply: false,
                attach,
            } if attach.name == "pushed" => Some(link),
            _ => None,
        })
        .expect("client saw the server's attach");
    assert!(p
        .server
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::Attach { link, reply: true, .. } if *link == s_push)));
    assert_eq!(p.client.conn.link(c_push).unwrap().role, Role::Receiver);

    // Messages flow on all three.
    p.server.conn.flow(s_in, 1, false);
    p.client.conn.flow(c_in, 1, false);
    p.client.conn.flow(c_push, 1, false);
    p.pump();
    assert!(p.client.conn.send(c_out, b"up", true, 0));
    assert!(p.server.conn.send(s_out, b"down", true, 0));
    assert!(p.server.conn.send(s_push, b"pushed", true, 0));
    p.pump();
    let se = p.server.take_events();
    let got: Vec<_> = deliveries(&se)
        .into_iter()
        .map(|(l, d)| (l, d.payload.to_vec()))
        .collect();
    assert_eq!(got, vec![(s_in, b"up".to_vec())]);
    let ce = p.client.take_events();
    let mut got: Vec<_> = deliveries(&ce)
        .into_iter()
        .map(|(l, d)| (l, d.payload.to_vec()))
        .collect();
    got.sort();
    let mut want = vec![(c_in, b"down".to_vec()), (c_push, b"pushed".to_vec())];
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn sender_and_receiver_with_the_same_name_are_two_links() {
    let (mut p, ch, _) = connected(client_config(), server_config());
    let (c_snd, s_rcv) = attach(&mut p, ch, "x", Role::Sender);
    let (c_rcv, s_snd) = attach(&mut p, ch, "x", Role::Receiver);
    assert_ne!(c_snd, c_rcv);
    assert_ne!(s_rcv, s_snd);
    assert_eq!(p.client.conn.link(c_snd).unwrap().role, Role::Sender);
    assert_eq!(p.client.conn.link(c_rcv).unwrap().role, Role::Receiver);
    assert_eq!(p.server.conn.link(s_rcv).unwrap().role, Role::Receiver);
    assert_eq!(p.server.conn.link(s_snd).unwrap().role, Role::Sender);
    for l in [c_snd, c_rcv] {
        let l = p.client.conn.link(l).unwrap();
        assert!(l.local_handle.is_some() && l.remote_handle.is_some());
    }
    assert_ne!(
        p.client.conn.link(c_snd).unwrap().local_handle,
        p.client.conn.link(c_rcv).unwrap().local_handle
    );

    // Both work, each to the right place.
    p.server.conn.flow(s_rcv, 5, false);
    p.client.conn.flow(c_rcv, 5, false);
    p.pump();
    assert_eq!(p.client.credit(c_snd), 5);
    assert_eq!(p.server.credit(s_snd), 5);
    assert!(p.client.conn.send(c_snd, b"from client", false, 7));
    assert!(p.server.conn.send(s_snd, b"from server", false, 9));
    p.pump();
    let se = p.server.take_events();
    let ce = p.client.take_events();
    let sd = deliveries(&se);
    let cd = deliveries(&ce);
    assert_eq!(sd.len(), 1);
    assert_eq!(cd.len(), 1);
    assert_eq!(
        (sd[0].0, &sd[0].1.payload[..]),
        (s_rcv, &b"from client"[..])
    );
    assert_eq!(
        (cd[0].0, &cd[0].1.payload[..]),
        (c_rcv, &b"from server"[..])
    );
    let (sref, cref) = (sd[0].1.id, cd[0].1.id);
    p.server.conn.settle(sref, accepted());
    p.client.conn.settle(cref, accepted());
    p.pump();
    assert_eq!(
        outcomes(&p.client.take_events()),
        vec![(7, Some(accepted()), true)]
    );
    assert_eq!(
        outcomes(&p.server.take_events()),
        vec![(9, Some(accepted()), true)]
    );

    // Detaching one leaves the other working.
    p.client.conn.detach(c_snd, None);
    p.pump();
    assert!(p.client.conn.link(c_snd).is_none());
    assert!(p.server.conn.link(s_rcv).is_none());
    assert!(p.server.conn.send(s_snd, b"still here", true, 10));
    p.pump();
    let ce = p.client.take_events();
    assert_eq!(deliveries(&ce).len(), 1);
}

// ---------------------------------------------------------------------------
// 3. Credit
// ---------------------------------------------------------------------------

#[test]
fn sender_sends_exactly_the_credit_it_was_given() {
    let (mut p, ch, _) = connected(client_config(), server_config());
    let (c, s) = attach(&mut p, ch, "credit", Role::Sender);
    assert_eq!(p.client.credit(c), 0);
    assert!(!p.client.conn.send(c, b"none yet", true, 0));

    const N: u32 = 5;
    p.server.conn.flow(s, N, false);
    p.pump();
    assert_eq!(p.client.credit(c), N);
    for i in 0..N {
        assert!(p.client.conn.send(c, b"m", true, u64::from(i)), "send {i}");
        assert_eq!(p.client.credit(c), N - 1 - i);
    }
    assert!(!p.client.conn.send(c, b"m", true, 99), "send N+1");
    assert_eq!(p.client.credit(c), 0);
    p.pump();
    assert_eq!(deliveries(&p.server.take_events()).len(), N as usize);
    assert_eq!(p.server.credit(s), 0);
    assert_eq!(p.server.conn.link(s).unwrap().delivery_count, N);

    // More credit: sending resumes, exactly as far.
    p.server.conn.flow(s, 3, false);
    p.pump();
    assert_eq!(p.client.credit(c), 3);
    for i in 0..3 {
        assert!(p.client.conn.send(c, b"m", true, 100 + i));
    }
    assert!(!p.client.conn.send(c, b"m", true, 199));
    p.pump();
    assert_eq!(deliveries(&p.server.take_events()).len(), 3);
    assert_eq!(p.server.credit(s), 0);
    assert_eq!(p.client.conn.link(c).unwrap().delivery_count, N + 3);
}

#[test]
fn credit_never_wraps_when_a_grant_crosses_transfers() {
    let (mut p, ch, _) = connected(client_config(), server_config());
    let (c, s) = attach(&mut p, ch, "crossing", Role::Sender);
    p.server.conn.flow(s, 5, false);
    p.pump();
    for i in 0..5 {
        assert!(p.client.conn.send(c, b"m", true, i));
    }
    // The receiver lowers its grant to 2 before the five transfers reach it:
    // its limit is 0 + 2, and the sender is already at 5.
    p.server.conn.flow(s, 2, false);
    p.flush();
    p.client.receive(usize::MAX).unwrap();
    assert_eq!(p.client.credit(c), 0, "limit behind the count is no credit");
    assert!(!p.client.conn.send(c, b"m", true, 9));
    p.pump();
    assert_eq!(p.server.credit(s), 0);
    assert_eq!(p.client.credit(c), 0);
    assert_eq!(deliveries(&p.server.take_events()).len(), 5);
    // A fresh grant counts from where the receiver is now.
    p.server.conn.flow(s, 1, false);
    p.pump();
    assert_eq!(p.client.credit(c), 1);
}

#[test]
fn drain_uses_up_the_credit_on_both_sides() {
    let (mut p, ch, _) = connected(client_config(), server_config());
    let (c, s) = attach(&mut p, ch, "drain", Role::Sender);
    p.server.conn.flow(s, 10, true);
    p.pump();
    {
        let l = p.client.conn.link(c).unwrap();
        assert_eq!(l.credit, 10);
        assert!(l.drain);
    }
    assert!(p
        .client
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::Flow { link } if *link == c)));
    assert!(p.client.conn.send(c, b"a", true, 0));
    assert!(p.client.conn.send(c, b"b", true, 1));
    p.client.conn.drained(c);
    {
        let l = p.client.conn.link(c).unwrap();
        assert_eq!(l.credit, 0);
        assert!(!l.drain);
        assert_eq!(l.delivery_count, 10);
    }
    assert!(!p.client.conn.send(c, b"c", true, 2));
    p.pump();
    assert_eq!(deliveries(&p.server.take_events()).len(), 2);
    let r = p.server.conn.link(s).unwrap();
    assert_eq!(r.credit, 0, "receiver sees the drained credit as gone");
    assert_eq!(r.delivery_count, 10);

    // Credit granted after a drain counts from the advanced delivery-count.
    p.server.conn.flow(s, 4, false);
    p.pump();
    assert_eq!(p.client.credit(c), 4);
    assert!(!p.client.conn.link(c).unwrap().drain);
}

// ---------------------------------------------------------------------------
// 4. Settlement (property)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Send { len: usize, settled: bool },
    Settle { pick: usize, outcome: u8 },
    Grant(u32),
    Deliver { to_server: bool, n: usize },
    Pump,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..1600, any::<bool>()).prop_map(|(len, settled)| Op::Send { len, settled }),
        3 => (any::<usize>(), 0u8..4).prop_map(|(pick, outcome)| Op::Settle { pick, outcome }),
        2 => (0u32..6).prop_map(Op::Grant),
        4 => (any::<bool>(), 1usize..700).prop_map(|(to_server, n)| Op::Deliver { to_server, n }),
        1 => Just(Op::Pump),
    ]
}

fn outcome_state(k: u8) -> DeliveryState {
    match k % 4 {
        0 => accepted(),
        1 => DeliveryState::Rejected(Rejected { error: None }),
        2 => DeliveryState::Rejected(Rejected {
            error: Some(amqp_error(AmqpError::NotAllowed, "no thanks")),
        }),
        _ => DeliveryState::Released(Released {}),
    }
}

/// What the test expects, built up as operations run.
#[derive(Default)]
struct Model {
    /// (payload, settled) of every successful send; the token is the index.
    sent: Vec<(Vec<u8>, bool)>,
    /// Deliveries the receiver got, in order.
    arrived: usize,
    /// Receiver-side deliveries not yet settled, with their token.
    pending: Vec<(DeliveryRef, u64)>,
    chosen: HashMap<u64, DeliveryState>,
    outcomes: HashMap<u64, Vec<(Option<DeliveryState>, bool)>>,
    max_grant: u32,
    max_limit: u32,
}

impl Model {
    /// Takes both sides' events into the model, checking order and payloads
    /// of deliveries and the credit invariants.
    fn collect(&mut self, p: &mut Pair, c: LinkId, s: LinkId) {
        for e in p.server.take_events() {
            match e {
                Event::Delivery { link, delivery } => {
                    assert_eq!(link, s);
                    let token = self.arrived as u64;
                    let (want, settled) = self
                        .sent
                        .get(self.arrived)
                        .expect("a delivery that was never sent");
                    assert_eq!(&delivery.payload[..], &want[..], "delivery {token} payload");
                    assert_eq!(delivery.settled, *settled, "delivery {token} settled");
                    assert_eq!(&delivery.tag[..], &token.to_be_bytes()[..]);
                    if !delivery.settled {
                        self.pending.push((delivery.id, token));
                    }
                    self.arrived += 1;
                }
                Event::Flow { .. } => {}
                other => panic!("unexpected server event {other:?}"),
            }
        }
        for e in p.client.take_events() {
            match e {
                Event::Outcome {
                    link,
                    token,
                    state,
                    settled,
                } => {
                    assert_eq!(link, c);
                    self.outcomes
                        .entry(token)
                        .or_default()
                        .push((state, settled));
                }
                Event::Flow { .. } => {}
                other => panic!("unexpected client event {other:?}"),
            }
        }
        // Credit is never negative (it would wrap to a huge u32) and never
        // more than the receiver ever granted.
        let sc = p.client.credit(c);
        let rc = p.server.credit(s);
        assert!(
            sc <= self.max_grant,
            "sender credit {sc} > {}",
            self.max_grant
        );
        assert!(
            rc <= self.max_grant,
            "receiver credit {rc} > {}",
            self.max_grant
        );
        assert!(self.sent.len() as u32 <= self.max_limit);
    }
}

fn run_settlement(ops: &[Op]) {
    let server = ConnectionConfig {
        max_frame_size: 512,
        ..server_config()
    };
    let (mut p, ch, _) = connected(client_config(), server);
    let (c, s) = attach(&mut p, ch, "settle", Role::Sender);
    let mut m = Model::default();
    for op in ops {
        match *op {
            Op::Send { len, settled } => {
                let token = m.sent.len() as u64;
                let body = payload(token, len);
                let credit = p.client.credit(c);
                let ok = p.client.conn.send(c, &body, settled, token);
                assert_eq!(ok, credit > 0, "send with {credit} credit");
                if ok {
                    assert_eq!(p.client.credit(c), credit - 1);
                    m.sent.push((body, settled));
                }
            }
            Op::Settle { pick, outcome } => {
                if !m.pending.is_empty() {
                    let (r, token) = m.pending.remove(pick % m.pending.len());
                    let state = outcome_state(outcome);
                    p.server.conn.settle(r, state.clone());
                    m.chosen.insert(token, state);
                }
            }
            Op::Grant(n) => {
                let dc = p.server.conn.link(s).unwrap().delivery_count;
                m.max_grant = m.max_grant.max(n);
                m.max_limit = m.max_limit.max(dc + n);
                p.server.conn.flow(s, n, false);
            }
            Op::Deliver { to_server, n } => p.deliver(to_server, n).expect("no protocol error"),
            Op::Pump => p.pump(),
        }
        p.flush();
        m.collect(&mut p, c, s);
    }
    p.pump();
    m.collect(&mut p, c, s);
    assert_eq!(m.arrived, m.sent.len(), "every sent delivery arrived");
    let mut k = 0u8;
    while let Some((r, token)) = m.pending.pop() {
        let state = outcome_state(k);
        k = k.wrapping_add(1);
        p.server.conn.settle(r, state.clone());
        m.chosen.insert(token, state);
    }
    p.pump();
    m.collect(&mut p, c, s);

    for (token, (body, settled)) in m.sent.iter().enumerate() {
        let token = token as u64;
        let got = m.outcomes.get(&token);
        if *settled {
            assert!(got.is_none(), "pre-settled {token} got outcomes {got:?}");
        } else {
            let want = vec![(Some(m.chosen[&token].clone()), true)];
            assert_eq!(
                got,
                Some(&want),
                "outcome of {token} ({} bytes)",
                body.len()
            );
        }
    }
    assert_eq!(m.outcomes.len(), m.sent.iter().filter(|s| !s.1).count());
    assert!(p.client.conn.take_all_unsettled().is_empty());
}

#[test]
fn settlement_of_multi_frame_messages() {
    use Op::*;
    run_settlement(&[
        Grant(4),
        Send {
            len: 1500,
            settled: false,
        },
        Send {
            len: 10,
            settled: true,
        },
        Send {
            len: 463,
            settled: false,
        },
        Deliver {
            to_server: true,
            n: 700,
        },
        Settle {
            pick: 0,
            outcome: 1,
        },
        Pump,
        Settle {
            pick: 0,
            outcome: 3,
        },
        Send {
            len: 0,
            settled: false,
        },
        Pump,
    ]);
}

#[test]
fn large_transfers_split_by_the_peer_max_frame_size() {
    let server = ConnectionConfig {
        max_frame_size: 512,
        ..server_config()
    };
    let (mut p, ch, _) = connected(client_config(), server);
    let (c, s) = attach(&mut p, ch, "big", Role::Sender);
    p.server.conn.flow(s, 10, false);
    p.pump();
    let before = p.server.transfer_frames;
    let sizes = [0usize, 1, 400, 462, 463, 511, 512, 513, 1024, 5000];
    for (i, len) in sizes.iter().enumerate() {
        assert!(p
            .client
            .conn
            .send(c, &payload(i as u64, *len), false, i as u64));
    }
    p.pump();
    let frames = p.server.transfer_frames - before;
    assert!(
        frames > sizes.len() + 10,
        "only {frames} transfer frames for {} messages",
        sizes.len()
    );
    let se = p.server.take_events();
    let got = deliveries(&se);
    assert_eq!(got.len(), sizes.len());
    for (i, (_, d)) in got.iter().enumerate() {
        assert_eq!(
            &d.payload[..],
            &payload(i as u64, sizes[i])[..],
            "message {i}"
        );
        p.server.conn.settle(d.id, accepted());
    }
    p.pump();
    let mut tokens: Vec<u64> = outcomes(&p.client.take_events())
        .into_iter()
        .map(|o| o.0)
        .collect();
    tokens.sort();
    assert_eq!(tokens, (0..sizes.len() as u64).collect::<Vec<_>>());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_unsettled_delivery_is_settled_exactly_once(ops in proptest::collection::vec(op(), 1..60)) {
        run_settlement(&ops);
    }
}

// ---------------------------------------------------------------------------
// 5. A whole session's byte stream, split at every position
// ---------------------------------------------------------------------------

/// Runs a session that uses every performative and returns the bytes the
/// server received and the bytes the client received.
fn record_session() -> (Vec<u8>, Vec<u8>) {
    let server = ConnectionConfig {
        max_frame_size: 512,
        ..server_config()
    };
    let (mut p, ch, _) = connected(client_config(), server);
    let (c_out, s_in) = attach(&mut p, ch, "up", Role::Sender);
    let (c_in, s_out) = attach(&mut p, ch, "down", Role::Receiver);
    p.server.conn.flow(s_in, 3, false);
    p.client.conn.flow(c_in, 2, false);
    p.pump();
    assert!(p.client.conn.send(c_out, &payload(0, 1200), false, 0));
    assert!(p.client.conn.send(c_out, &payload(1, 20), true, 1));
    assert!(p.client.conn.send(c_out, &payload(2, 30), false, 2));
    assert!(p.server.conn.send(s_out, &payload(3, 40), false, 3));
    assert!(p.server.conn.send(s_out, &payload(4, 3000), false, 4));
    p.pump();
    for side in [&mut p.client, &mut p.server] {
        let events = side.take_events();
        for (_, d) in deliveries(&events) {
            if !d.settled {
                side.conn.settle(d.id, accepted());
            }
        }
    }
    p.pump();
    p.client.conn.detach(c_out, None);
    p.server.conn.detach(s_out, None);
    p.pump();
    p.client.conn.end(ch);
    p.pump();
    p.client.conn.close(None);
    p.pump();
    assert!(p.client.conn.is_closed() && p.server.conn.is_closed());
    (p.server.received, p.client.received)
}

fn frame_strings(whole: &[u8], cut: usize, max: u32) -> Vec<String> {
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for part in [&whole[..cut], &whole[cut..]] {
        buf.extend_from_slice(part);
        while let Some(f) = decode_frame(&mut buf, max).expect("decodes") {
            got.push(format!("{f:?}"));
        }
    }
    assert!(buf.is_empty(), "cut at {cut}: bytes left over");
    got
}

/// Feeds `whole` to a fresh server split at `cut`; its events, as text.
fn replay(whole: &[u8], cut: usize) -> Vec<String> {
    let mut side = Side::new(ConnectionConfig {
        max_frame_size: 512,
        ..server_config()
    });
    // Credit for each sender as it attaches, as the recorded server gave
    // (transfers past credit would end the link).
    side.auto_credit = 1000;
    for part in [&whole[..cut], &whole[cut..]] {
        side.wire.extend_from_slice(part);
        side.receive(usize::MAX).expect("replay is valid");
        side.conn.take_output();
    }
    side.events.iter().map(|e| format!("{e:?}")).collect()
}

#[test]
fn a_session_split_at_every_byte_decodes_the_same() {
    let (to_server, to_client) = record_session();
    for (stream, max) in [(&to_server, 512), (&to_client, 65536)] {
        let whole = frame_strings(stream, stream.len(), max);
        assert!(whole.len() > 10);
        for cut in 0..=stream.len() {
            assert_eq!(frame_strings(stream, cut, max), whole, "cut at {cut}");
        }
    }
    // The engine itself sees the same session wherever the stream is cut.
    let whole = replay(&to_server, to_server.len());
    assert!(whole.iter().any(|e| e.starts_with("Delivery")));
    assert!(whole.iter().any(|e| e.starts_with("Close")));
    for cut in 0..=to_server.len() {
        assert_eq!(replay(&to_server, cut), whole, "cut at {cut}");
    }
}

// ---------------------------------------------------------------------------
// 6. Detach with unsettled deliveries
// ---------------------------------------------------------------------------

/// Sends three unsettled deliveries (tokens 1, 2, 3) and has the receiver
/// settle token 2.
fn three_sent_one_settled() -> (Pair, u16, LinkId, LinkId) {
    let (mut p, ch, _) = connected(client_config(), server_config());
    let (c, s) = attach(&mut p, ch, "unsettled", Role::Sender);
    p.server.conn.flow(s, 10, false);
    p.pump();
    for t in 1..=3 {
        assert!(p.client.conn.send(c, b"m", false, t));
    }
    p.pump();
    let se = p.server.take_events();
    let d = deliveries(&se);
    assert_eq!(d.len(), 3);
    p.server.conn.settle(d[1].1.id, accepted());
    p.pump();
    assert_eq!(
        outcomes(&p.client.take_events()),
        vec![(2, Some(accepted()), true)]
    );
    (p, ch, c, s)
}

#[test]
fn sender_detach_returns_its_unsettled_tokens() {
    let (mut p, _, c, s) = three_sent_one_settled();
    let mut tokens = p.client.conn.detach(c, None);
    tokens.sort();
    assert_eq!(tokens, vec![1, 3]);
    p.pump();
    assert!(
        p.client.take_events().is_empty(),
        "our own detach is no event"
    );
    assert!(p
        .server
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::Detach { link, closed: true, .. } if *link == s)));
    assert!(p.client.conn.link(c).is_none() && p.server.conn.link(s).is_none());
    assert!(p.client.conn.take_all_unsettled().is_empty());
}

#[test]
fn receiver_detach_reports_the_senders_unsettled_tokens() {
    let (mut p, _, c, s) = three_sent_one_settled();
    assert!(p.server.conn.detach(s, None).is_empty());
    p.pump();
    let ce = p.client.take_events();
    match &ce[..] {
        [Event::Detach {
            link,
            closed: true,
            error: None,
            unsettled,
        }] => {
            assert_eq!(*link, c);
            let mut u = unsettled.clone();
            u.sort();
            assert_eq!(u, vec![1, 3]);
        }
        other => panic!("client events: {other:?}"),
    }
    assert!(p.client.conn.take_all_unsettled().is_empty());
}

#[test]
fn ending_a_session_reports_its_unsettled_tokens() {
    let (mut p, ch, c, _) = three_sent_one_settled();
    p.client.conn.end(ch);
    p.pump();
    let ce = p.client.take_events();
    let mut detached = None;
    for e in &ce {
        if let Event::Detach {
            link, unsettled, ..
        } = e
        {
            assert_eq!(*link, c);
            let mut u = unsettled.clone();
            u.sort();
            detached = Some(u);
        }
    }
    assert_eq!(detached, Some(vec![1, 3]));
    assert!(ce
        .iter()
        .any(|e| matches!(e, Event::End { channel } if *channel == ch)));
    assert!(!p.client.conn.session_answered(ch));
}

/// Nothing left of any link on either side, and no ghost attaches.
fn assert_no_links(p: &mut Pair) {
    let names =
        |c: &Connection| -> Vec<String> { c.links().map(|(_, l)| l.name.clone()).collect() };
    assert!(
        names(&p.client.conn).is_empty(),
        "client links {:?}",
        names(&p.client.conn)
    );
    assert!(
        names(&p.server.conn).is_empty(),
        "server links {:?}",
        names(&p.server.conn)
    );
    let ghost = |e: &Event| matches!(e, Event::Attach { .. } | Event::Delivery { .. });
    assert!(
        !p.client.take_events().iter().any(ghost),
        "client saw an attach it never asked for"
    );
}

#[test]
fn detach_before_the_attach_is_answered_leaves_no_ghost_link() {
    // The server's owner answers each attach as soon as it sees it.
    let (mut p, ch, _) = connected(client_config(), server_config());
    let c = p.client.conn.attach(
        ch,
        "x",
        Role::Sender,
        None,
        None,
        SenderSettleMode::Mixed,
        ReceiverSettleMode::First,
    );
    assert!(p.client.conn.detach(c, None).is_empty());
    p.pump();
    assert_no_links(&mut p);
    let se = p.server.take_events();
    assert!(matches!(
        &se[..],
        [
            Event::Attach { reply: false, .. },
            Event::Detach { closed: true, .. }
        ]
    ));
    // The handle is free again and a new link of the same name works.
    let (c, s) = attach(&mut p, ch, "x", Role::Sender);
    assert_eq!(p.client.conn.link(c).unwrap().local_handle, Some(0));
    p.server.conn.flow(s, 1, false);
    p.pump();
    assert!(p.client.conn.send(c, b"m", true, 0));
    p.pump();
    assert_eq!(deliveries(&p.server.take_events()).len(), 1);
}

#[test]
fn detach_reaching_an_unanswered_attach_still_completes() {
    // The server's owner reads the attach and the detach in one batch and
    // only then answers the attach, as a connection task does.
    let (mut p, ch, _) = connected(client_config(), server_config());
    p.server.auto_accept = false;
    let c = p.client.conn.attach(
        ch,
        "x",
        Role::Receiver,
        None,
        None,
        SenderSettleMode::Mixed,
        ReceiverSettleMode::First,
    );
    p.client.conn.detach(c, None);
    p.flush();
    p.server.receive(usize::MAX).unwrap();
    for e in p.server.take_events() {
        if let Event::Attach { link, .. } = e {
            p.server.conn.accept_attach(link, AttachReply::default());
        }
    }
    p.pump();
    assert_no_links(&mut p);
}

// ---------------------------------------------------------------------------
// 7. Protocol violations are errors, not panics
// ---------------------------------------------------------------------------

fn condition(e: ProtocolError) -> ErrorCondition {
    e.0.condition
}

#[test]
fn transfer_before_open_is_an_error() {
    let mut c = Connection::new(server_config());
    let mut ev = Vec::new();
    let e = c
        .handle_frame(transfer_frame(0, 0, Some(0), false), &mut ev)
        .unwrap_err();
    assert_eq!(condition(e), AmqpError::IllegalState.into());
    let e = c
        .handle_frame(begin_frame(0, None, 10), &mut ev)
        .unwrap_err();
    assert_eq!(condition(e), AmqpError::IllegalState.into());
    assert!(ev.is_empty());
}

#[test]
fn second_open_is_an_error() {
    let mut c = Connection::new(server_config());
    let mut ev = Vec::new();
    c.handle_frame(open_frame(65536), &mut ev).unwrap();
    let e = c.handle_frame(open_frame(65536), &mut ev).unwrap_err();
    assert_eq!(condition(e), AmqpError::IllegalState.into());
    assert_eq!(ev.len(), 1);
}

#[test]
fn frames_on_a_channel_without_a_session_are_errors() {
    let mut c = Connection::new(server_config());
    let mut ev = Vec::new();
    c.handle_frame(open_frame(65536), &mut ev).unwrap();
    c.open();
    let frames = [
        attach_frame(3, "a", 0, Role::Sender),
        flow_frame(3, None, 10, Some((0, 0, 1))),
        transfer_frame(3, 0, Some(0), false),
        frame_of(
            3,
            Performative::Disposition(Disposition {
                role: Role::Receiver,
                first: 0,
                last: None,
                settled: true,
                state: None,
                batchable: false,
            }),
        ),
        frame_of(
            3,
            Performative::Detach(Detach {
                handle: Handle(0),
                closed: true,
                error: None,
            }),
        ),
        frame_of(3, Performative::End(End { error: None })),
    ];
    for f in frames {
        let e = c.handle_frame(f, &mut ev).unwrap_err();
        assert_eq!(condition(e), AmqpError::NotAllowed.into());
    }
    // Begin answering a channel we never began.
    let e = c
        .handle_frame(begin_frame(0, Some(4), 10), &mut ev)
        .unwrap_err();
    assert_eq!(condition(e), AmqpError::NotAllowed.into());
    assert!(matches!(&ev[..], [Event::Open(_)]));
}

#[test]
fn link_frames_on_unattached_handles_are_errors() {
    let (mut p, ch, _) = connected(client_config(), server_config());
    let mut ev = Vec::new();
    let server = &mut p.server.conn;
    // The server knows the client's session by the client's channel.
    let e = server
        .handle_frame(transfer_frame(ch, 9, Some(0), false), &mut ev)
        .unwrap_err();
    assert_eq!(condition(e), SessionError::UnattachedHandle.into());
    let e = server
        .handle_frame(flow_frame(ch, Some(0), 10, Some((9, 0, 1))), &mut ev)
        .unwrap_err();
    assert_eq!(condition(e), SessionError::UnattachedHandle.into());
    let e = server
        .handle_frame(
            frame_of(
                ch,
                Performative::Detach(Detach {
                    handle: Handle(9),
                    closed: true,
                    error: None,
                }),
            ),
            &mut ev,
        )
        .unwrap_err();
    assert_eq!(condition(e), SessionError::UnattachedHandle.into());
    // A second Begin on a channel that has a session.
    let e = server
        .handle_frame(begin_frame(ch, None, 10), &mut ev)
        .unwrap_err();
    assert_eq!(condition(e), AmqpError::NotAllowed.into());
    assert!(ev.is_empty());

    // The owner closes with the error; the peer hears it.
    server.close(Some(amqp_error(SessionError::UnattachedHandle, "handle 9")));
    p.pump();
    assert!(p.client.take_events().iter().any(|e| matches!(
        e,
        Event::Close { error: Some(err) } if err.condition == SessionError::UnattachedHandle.into()
    )));
    assert!(p.client.conn.is_closed() && p.server.conn.is_closed());
}

#[test]
fn transfer_to_a_sender_and_reused_handles_are_errors() {
    let (mut p, ch, _) = connected(client_config(), server_config());
    // The client attaches a receiver: the server's link is a sender, and the
    // client's handle 0 is taken.
    let (_, _) = attach(&mut p, ch, "r", Role::Receiver);
    let mut ev = Vec::new();
    let server = &mut p.server.conn;
    let e = server
        .handle_frame(transfer_frame(ch, 0, Some(0), false), &mut ev)
        .unwrap_err();
    assert_eq!(condition(e), AmqpError::NotAllowed.into());
    let e = server
        .handle_frame(attach_frame(ch, "again", 0, Role::Sender), &mut ev)
        .unwrap_err();
    assert_eq!(condition(e), SessionError::HandleInUse.into());
    // A disposition for deliveries that do not exist is harmless.
    server
        .handle_frame(
            frame_of(
                ch,
                Performative::Disposition(Disposition {
                    role: Role::Receiver,
                    first: 0,
                    last: Some(u32::MAX),
                    settled: true,
                    state: Some(accepted()),
                    batchable: false,
                }),
            ),
            &mut ev,
        )
        .unwrap();
    assert!(ev.is_empty());
}

/// A frame a hostile or broken peer might send.
#[derive(Debug, Clone)]
enum Hostile {
    Open,
    Begin {
        ch: u16,
        remote: Option<u16>,
        window: u32,
    },
    Attach {
        ch: u16,
        name: bool,
        handle: u32,
        sender: bool,
    },
    Flow {
        ch: u16,
        next_in: Option<u32>,
        window: u32,
        link: Option<(u32, u32, u32)>,
        drain: bool,
    },
    Transfer {
        ch: u16,
        handle: u32,
        id: Option<u32>,
        more: bool,
    },
    Disposition {
        ch: u16,
        receiver: bool,
        first: u32,
        last: Option<u32>,
        settled: bool,
    },
    Detach {
        ch: u16,
        handle: u32,
    },
    End {
        ch: u16,
    },
    Close,
    Empty,
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let ch = prop_oneof![3 => Just(0u16), 1 => Just(1)];
    let small = prop_oneof![3 => 0u32..2, 1 => 2u32..4];
    prop_oneof![
        1 => Just(Hostile::Open),
        2 => (ch.clone(), proptest::option::of(0u16..3), prop_oneof![Just(0u32), Just(1), Just(2), Just(1 << 20), Just(u32::MAX)])
            .prop_map(|(ch, remote, window)| Hostile::Begin { ch, remote, window }),
        3 => (ch.clone(), any::<bool>(), small.clone(), any::<bool>())
            .prop_map(|(ch, name, handle, sender)| Hostile::Attach { ch, name, handle, sender }),
        3 => (ch.clone(), proptest::option::of(0u32..8), prop_oneof![Just(0u32), Just(2), Just(u32::MAX)],
              proptest::option::of((small.clone(), prop_oneof![Just(0u32), Just(3), Just(u32::MAX)], prop_oneof![Just(0u32), Just(2), Just(u32::MAX)])),
              any::<bool>())
            .prop_map(|(ch, next_in, window, link, drain)| Hostile::Flow { ch, next_in, window, link, drain }),
        4 => (ch.clone(), small.clone(), proptest::option::of(0u32..6), any::<bool>())
            .prop_map(|(ch, handle, id, more)| Hostile::Transfer { ch, handle, id, more }),
        2 => (ch.clone(), any::<bool>(), 0u32..6, proptest::option::of(prop_oneof![0u32..8, Just(u32::MAX)]), any::<bool>())
            .prop_map(|(ch, receiver, first, last, settled)| Hostile::Disposition { ch, receiver, first, last, settled }),
        2 => (ch.clone(), small).prop_map(|(ch, handle)| Hostile::Detach { ch, handle }),
        1 => ch.prop_map(|ch| Hostile::End { ch }),
        1 => Just(Hostile::Close),
        1 => Just(Hostile::Empty),
    ]
}

fn hostile_frame(h: &Hostile) -> Frame {
    match *h {
        Hostile::Open => open_frame(512),
        Hostile::Begin { ch, remote, window } => begin_frame(ch, remote, window),
        Hostile::Attach {
            ch,
            name,
            handle,
            sender,
        } => attach_frame(
            ch,
            if name { "a" } else { "b" },
            handle,
            if sender { Role::Sender } else { Role::Receiver },
        ),
        Hostile::Flow {
            ch,
            next_in,
            window,
            link,
            drain,
        } => {
            let mut f = flow_frame(ch, next_in, window, link);
            if let Frame::Amqp {
                performative: Performative::Flow(flow),
                ..
            } = &mut f
            {
                flow.drain = drain;
            }
            f
        }
        Hostile::Transfer {
            ch,
            handle,
            id,
            more,
        } => transfer_frame(ch, handle, id, more),
        Hostile::Disposition {
            ch,
            receiver,
            first,
            last,
            settled,
        } => frame_of(
            ch,
            Performative::Disposition(Disposition {
                role: if receiver {
                    Role::Receiver
                } else {
                    Role::Sender
                },
                first,
                last,
                settled,
                state: Some(accepted()),
                batchable: false,
            }),
        ),
        Hostile::Detach { ch, handle } => frame_of(
            ch,
            Performative::Detach(Detach {
                handle: Handle(handle),
                closed: true,
                error: None,
            }),
        ),
        Hostile::End { ch } => frame_of(ch, Performative::End(End { error: None })),
        Hostile::Close => frame_of(0, Performative::Close(Close { error: None })),
        Hostile::Empty => Frame::Empty { channel: 0 },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a peer sends, the engine answers with events or an error,
    /// never a panic, and everything it writes is a valid frame no larger
    /// than the peer allows.
    #[test]
    fn hostile_frames_never_panic(
        frames in proptest::collection::vec(hostile(), 1..40),
        start in 0u8..3,
    ) {
        let mut c = Connection::new(ConnectionConfig { max_links: 4, ..server_config() });
        let mut ev = Vec::new();
        // Start fresh, opened, or with a session and a link each way that
        // has credit, so the random frames reach deep states too.
        let preamble = [
            Hostile::Open,
            Hostile::Begin { ch: 0, remote: None, window: 1 << 20 },
            Hostile::Attach { ch: 0, name: true, handle: 0, sender: false },
            Hostile::Attach { ch: 0, name: false, handle: 1, sender: true },
            Hostile::Flow { ch: 0, next_in: Some(0), window: 1 << 20, link: Some((0, 0, 5)), drain: false },
        ];
        let preamble = match start {
            0 => &preamble[..0],
            1 => &preamble[..1],
            _ => &preamble[..],
        };
        for h in preamble.iter().chain(&frames) {
            let start = ev.len();
            if c.handle_frame(hostile_frame(h), &mut ev).is_err() {
                // The owner closes, and reads on until the peer's Close.
                c.close(Some(amqp_error(AmqpError::InternalError, "closing")));
            }
            // Act as an owner would on what happened.
            let mut accept = Vec::new();
            let mut settle = Vec::new();
            for e in &ev[start..] {
                match e {
                    Event::Open(_) => c.open(),
                    Event::Attach { link, reply: false, .. } => accept.push(*link),
                    Event::Delivery { delivery, .. } if !delivery.settled => settle.push(delivery.id),
                    _ => {}
                }
            }
            for l in accept {
                c.accept_attach(l, AttachReply::default());
            }
            for d in settle {
                c.settle(d, accepted());
            }
            let links: Vec<(LinkId, Role, bool)> =
                c.links().map(|(id, l)| (id, l.role.clone(), l.drain)).collect();
            for (id, role, drain) in links {
                match role {
                    Role::Sender => {
                        c.send(id, &[7u8; 700], false, 1);
                        if drain {
                            c.drained(id);
                        }
                    }
                    Role::Receiver => c.flow(id, 2, false),
                }
            }
            c.tick(Instant::now()).unwrap();
            decode_all(&c.take_output(), 512);
        }
    }
}

// ---------------------------------------------------------------------------
// Session flow control against a peer with a small window (AMQP 1.0 §2.5.6)
// ---------------------------------------------------------------------------

/// A client with one sending link, facing a fake peer that began the session
/// with `window` and gave `credit`. Returns the engine, its channel and link.
fn client_facing_small_window(window: u32, credit: u32) -> (Connection, u16, LinkId) {
    let mut c = Connection::new(client_config());
    let mut ev = Vec::new();
    c.open();
    let ch = c.begin().expect("a free channel");
    let link = c.attach(
        ch,
        "w",
        Role::Sender,
        None,
        None,
        SenderSettleMode::Mixed,
        ReceiverSettleMode::First,
    );
    c.take_output();
    // The fake peer uses channel 5 for the session.
    for f in [
        open_frame(65536),
        begin_frame(5, Some(ch), window),
        attach_frame(5, "w", 0, Role::Receiver),
        flow_frame(5, Some(0), window, Some((0, 0, credit))),
    ] {
        c.handle_frame(f, &mut ev).expect("valid peer");
    }
    assert!(c.take_output().is_empty());
    (c, ch, link)
}

#[test]
fn blocked_transfers_go_out_when_the_peer_window_reopens() {
    let (mut c, _, link) = client_facing_small_window(2, 10);
    let mut ev = Vec::new();
    for t in 0..4 {
        assert!(c.send(link, b"m", true, t));
    }
    let (ids, _) = transfer_ids(&decode_all(&c.take_output(), 65536));
    assert_eq!(ids, vec![0, 1], "two fit the peer's window");
    // The peer took transfers 0 and 1 and has room for two more: 2 and 3.
    c.handle_frame(flow_frame(5, Some(2), 2, None), &mut ev)
        .unwrap();
    let (ids, _) = transfer_ids(&decode_all(&c.take_output(), 65536));
    assert_eq!(ids, vec![2, 3], "the blocked transfers go out");
    // The window is used up again.
    assert!(c.send(link, b"m", true, 4));
    let (ids, _) = transfer_ids(&decode_all(&c.take_output(), 65536));
    assert!(ids.is_empty());
    c.handle_frame(flow_frame(5, Some(4), 2, None), &mut ev)
        .unwrap();
    let (ids, _) = transfer_ids(&decode_all(&c.take_output(), 65536));
    assert_eq!(ids, vec![4]);
}

#[test]
fn a_shrunk_peer_window_stops_transfers() {
    let (mut c, _, link) = client_facing_small_window(10, 20);
    let mut ev = Vec::new();
    for t in 0..6 {
        assert!(c.send(link, b"m", true, t));
    }
    let (ids, _) = transfer_ids(&decode_all(&c.take_output(), 65536));
    assert_eq!(ids, (0..6).collect::<Vec<_>>());
    // Having taken only transfers 0 and 1, the peer shrinks its window to
    // two: it will take transfers 2 and 3, which are already sent.
    c.handle_frame(flow_frame(5, Some(2), 2, None), &mut ev)
        .unwrap();
    assert!(c.send(link, b"m", true, 6));
    let (ids, _) = transfer_ids(&decode_all(&c.take_output(), 65536));
    assert!(ids.is_empty(), "sent {ids:?} past the peer's window");
    // Once it has taken all six, transfer 6 fits.
    c.handle_frame(flow_frame(5, Some(6), 2, None), &mut ev)
        .unwrap();
    let (ids, _) = transfer_ids(&decode_all(&c.take_output(), 65536));
    assert_eq!(ids, vec![6]);
}

#[test]
fn a_huge_peer_window_is_not_mistaken_for_a_negative_one() {
    let (mut c, _, link) = client_facing_small_window(u32::MAX, 20);
    for t in 0..3 {
        assert!(c.send(link, b"m", true, t));
    }
    let mut ev = Vec::new();
    c.handle_frame(flow_frame(5, Some(1), u32::MAX, None), &mut ev)
        .unwrap();
    assert!(c.send(link, b"m", true, 3));
    let (ids, _) = transfer_ids(&decode_all(&c.take_output(), 65536));
    assert_eq!(ids, vec![0, 1, 2, 3]);
}

/// Handles of the transfer frames in `frames`, and whether any transfer
/// comes after a Detach or End.
fn transfers_after_detach(frames: &[Frame]) -> (Vec<u32>, bool) {
    let mut handles = Vec::new();
    let mut after = false;
    let mut detached = false;
    for f in frames {
        match f {
            Frame::Amqp {
                performative: Performative::Transfer(t),
                ..
            } => {
                handles.push(t.handle.0);
                after |= detached;
            }
            Frame::Amqp {
                performative: Performative::Detach(_) | Performative::End(_),
                ..
            } => detached = true,
            _ => {}
        }
    }
    (handles, after)
}

#[test]
fn transfers_waiting_for_the_window_do_not_follow_our_detach() {
    let (mut c, ch, link) = client_facing_small_window(1, 10);
    let mut ev = Vec::new();
    assert!(c.send(link, b"a", false, 1));
    assert!(c.send(link, &[0u8; 2000], false, 2));
    assert!(c.send(link, b"c", true, 3));
    let (handles, _) = transfers_after_detach(&decode_all(&c.take_output(), 65536));
    assert_eq!(handles, vec![0]);
    let mut tokens = c.detach(link, None);
    tokens.sort();
    assert_eq!(tokens, vec![1, 2], "the unsettled sends come back");
    // The peer opens its window, then answers the detach.
    c.handle_frame(flow_frame(5, Some(1), 10, None), &mut ev)
        .unwrap();
    let frames = decode_all(&c.take_output(), 65536);
    let (handles, after) = transfers_after_detach(&frames);
    assert!(!after, "transfers {handles:?} sent after the detach");
    assert!(handles.is_empty(), "the owner was told these are gone");
    c.handle_frame(
        frame_of(
            5,
            Performative::Detach(Detach {
                handle: Handle(0),
                closed: true,
                error: None,
            }),
        ),
        &mut ev,
    )
    .unwrap();
    assert!(c.link(link).is_none());
    // The window the dropped transfers held is the peer's again: a new link
    // on the same handle sends at once, and only its own message.
    let l2 = c.attach(
        ch,
        "w2",
        Role::Sender,
        None,
        None,
        SenderSettleMode::Mixed,
        ReceiverSettleMode::First,
    );
    assert_eq!(c.link(l2).unwrap().local_handle, Some(0));
    c.handle_frame(attach_frame(5, "w2", 1, Role::Receiver), &mut ev)
        .unwrap();
    c.handle_frame(flow_frame(5, Some(1), 1, Some((1, 0, 5))), &mut ev)
        .unwrap();
    assert!(c.send(l2, b"new", true, 4));
    let (handles, _) = transfers_after_detach(&decode_all(&c.take_output(), 65536));
    assert_eq!(handles, vec![0]);
}

#[test]
fn transfers_waiting_for_the_window_do_not_follow_the_peers_detach() {
    let (mut c, _, link) = client_facing_small_window(1, 10);
    let mut ev = Vec::new();
    for t in 0..3 {
        assert!(c.send(link, b"m", false, t));
    }
    c.take_output();
    c.handle_frame(
        frame_of(
            5,
            Performative::Detach(Detach {
                handle: Handle(0),
                closed: true,
                error: None,
            }),
        ),
        &mut ev,
    )
    .unwrap();
    assert!(matches!(&ev[..], [Event::Detach { unsettled, .. }] if unsettled.len() == 3));
    c.handle_frame(flow_frame(5, Some(1), 10, None), &mut ev)
        .unwrap();
    let (handles, _) = transfers_after_detach(&decode_all(&c.take_output(), 65536));
    assert!(
        handles.is_empty(),
        "transfers on a detached handle: {handles:?}"
    );
}

#[test]
fn transfers_waiting_for_the_window_do_not_follow_our_end() {
    let (mut c, ch, link) = client_facing_small_window(1, 10);
    let mut ev = Vec::new();
    for t in 0..3 {
        assert!(c.send(link, b"m", true, t));
    }
    c.take_output();
    c.end(ch);
    c.handle_frame(flow_frame(5, Some(1), 10, None), &mut ev)
        .unwrap();
    let (handles, after) = transfers_after_detach(&decode_all(&c.take_output(), 65536));
    assert!(!after, "transfers {handles:?} after the End");
}

// ---------------------------------------------------------------------------
// 8. Idle timeout and heartbeats (AMQP 1.0 §2.4.5)
// ---------------------------------------------------------------------------

#[test]
fn silence_past_the_idle_timeout_is_an_error() {
    let server = ConnectionConfig {
        idle_timeout: Some(Duration::from_secs(1)),
        ..server_config()
    };
    let (mut p, _, _) = connected(client_config(), server);
    let now = Instant::now();
    let next = p.server.conn.tick(now).expect("not yet");
    assert!(next <= now + Duration::from_secs(1));
    let e = p
        .server
        .conn
        .tick(now + Duration::from_secs(2))
        .unwrap_err();
    assert_eq!(condition(e), AmqpError::ResourceLimitExceeded.into());

    // No idle timeout of our own: silence is fine.
    let quiet = ConnectionConfig {
        idle_timeout: None,
        ..server_config()
    };
    let (mut p, _, _) = connected(
        ConnectionConfig {
            idle_timeout: None,
            ..client_config()
        },
        quiet,
    );
    assert!(p
        .server
        .conn
        .tick(Instant::now() + Duration::from_secs(86_400))
        .is_ok());
    assert!(
        p.server.conn.take_output().is_empty(),
        "client asked for no heartbeats"
    );
}

#[test]
fn peer_idle_timeout_makes_us_send_heartbeats() {
    let client = ConnectionConfig {
        idle_timeout: None,
        ..client_config()
    };
    let server = ConnectionConfig {
        idle_timeout: Some(Duration::from_secs(10)),
        ..server_config()
    };
    let mut p = Pair::new(client, server);
    p.client.conn.open();
    p.client.conn.begin().expect("a free channel");
    p.pump();
    let announced = p
        .client
        .take_events()
        .into_iter()
        .find_map(|e| match e {
            Event::Open(o) => o.idle_time_out,
            _ => None,
        })
        .expect("the server announces an idle-time-out");
    // The peer must hear from us before the server's own timeout runs out.
    assert!(
        announced > 0 && announced <= 10_000,
        "announced {announced} ms"
    );
    let period = Duration::from_millis(u64::from(announced)) / 2;
    p.server.take_events();

    let now = Instant::now();
    p.client.conn.tick(now + period / 4).unwrap();
    assert!(p.client.conn.take_output().is_empty(), "too early");
    let at = now + period + period / 5;
    let next = p.client.conn.tick(at).unwrap();
    assert_eq!(next, at + period, "next at half the peer's timeout");
    // Once only, however often tick runs meanwhile.
    p.client.conn.tick(at).unwrap();
    p.client.conn.tick(at + period / 2).unwrap();
    let out = p.client.conn.take_output();
    assert_eq!(&out[..], &[0, 0, 0, 8, 2, 0, 0, 0], "one empty frame");
    // The server takes it without events.
    p.server.wire.extend_from_slice(&out);
    p.server.receive(usize::MAX).unwrap();
    assert!(p.server.take_events().is_empty());
    assert!(p.server.conn.tick(Instant::now()).is_ok());
}

/// An aborted delivery (AMQP 1.0 §2.6.14) is dropped whole; the next one
/// arrives intact.
#[test]
fn an_aborted_delivery_is_discarded_and_the_next_arrives() {
    use flotilla_amqp::frame::{
        encode_performative, encode_transfer, Performative, TransferHeader,
    };
    use flotilla_amqp::types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
    use flotilla_amqp::types::messaging::{Source, Target, TargetArchetype};
    use flotilla_amqp::types::performatives::{
        Attach, Begin, ChannelMax, MaxFrameSize, Open, Transfer,
    };

    let mut server = Connection::new(ConnectionConfig::default());
    let mut wire = bytes::BytesMut::new();
    let open = Open {
        container_id: "peer".into(),
        hostname: None,
        max_frame_size: MaxFrameSize(65536),
        channel_max: ChannelMax(10),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    encode_performative(&mut wire, 0, &Performative::Open(Box::new(open)));
    let begin = Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 100,
        outgoing_window: 100,
        handle_max: Handle(10),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    encode_performative(&mut wire, 0, &Performative::Begin(begin));
    let attach = Attach {
        name: "sender".into(),
        handle: Handle(0),
        role: Role::Sender,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::new(Source::default())),
        target: Some(Box::new(TargetArchetype::Target(Target::default()))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    encode_performative(&mut wire, 0, &Performative::Attach(Box::new(attach)));
    // First frame of delivery 0, then its abort, then a whole delivery 1.
    encode_transfer(
        &mut wire,
        0,
        &TransferHeader {
            handle: 0,
            first: Some((0, b"t0")),
            message_format: 0,
            settled: false,
            more: true,
        },
        b"part",
    );
    let abort = Transfer {
        handle: Handle(0),
        delivery_id: None,
        delivery_tag: None,
        message_format: None,
        settled: Some(true),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: true,
        batchable: false,
    };
    encode_performative(&mut wire, 0, &Performative::Transfer(abort));
    encode_transfer(
        &mut wire,
        0,
        &TransferHeader {
            handle: 0,
            first: Some((1, b"t1")),
            message_format: 0,
            settled: false,
            more: false,
        },
        b"whole",
    );

    let mut events = Vec::new();
    let mut got = Vec::new();
    while let Some(f) = flotilla_amqp::frame::decode_frame(&mut wire, 65536).expect("valid frames")
    {
        server
            .handle_frame(f, &mut events)
            .expect("no protocol error");
        for e in events.drain(..) {
            match e {
                Event::Open(_) => server.open(),
                Event::Attach {
                    link, reply: false, ..
                } => {
                    server.accept_attach(link, Default::default());
                    server.flow(link, 10, false);
                }
                Event::Delivery { delivery, .. } => got.push(delivery),
                _ => {}
            }
        }
    }
    assert_eq!(got.len(), 1, "only the whole delivery arrives: {got:?}");
    assert_eq!(&got[0].payload[..], b"whole");
    assert_eq!(got[0].id.delivery_id, 1);
}

// ---------------------------------------------------------------------------
// 9. Flow control enforced: credit, the session window, heartbeats
// ---------------------------------------------------------------------------

/// The client's sender on `ch` is the server's handle 0: hand-made
/// transfers on it go past whatever credit the server gave.
fn raw_transfers(p: &mut Pair, ch: u16, first_id: u32, n: u32) -> Vec<Event> {
    let mut ev = Vec::new();
    for i in 0..n {
        p.server
            .conn
            .handle_frame(transfer_frame(ch, 0, Some(first_id + i), false), &mut ev)
            .expect("not a connection error");
    }
    ev
}

#[test]
fn a_transfer_past_the_credit_detaches_the_link() {
    let (mut p, ch, _) = connected(client_config(), server_config());
    let (_, s_in) = attach(&mut p, ch, "greedy", Role::Sender);
    p.server.conn.flow(s_in, 2, false);
    p.pump();
    let ev = raw_transfers(&mut p, ch, 0, 3);
    assert_eq!(deliveries(&ev).len(), 2, "the credit given is taken");
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Detach { link, .. } if *link == s_in)),
        "{ev:?}"
    );
    p.pump();
    let detached = p.client.take_events().into_iter().find_map(|e| match e {
        Event::Detach { error, .. } => Some(error),
        _ => None,
    });
    assert_eq!(
        detached.flatten().map(|e| e.condition),
        Some(LinkError::TransferLimitExceeded.into())
    );
}

#[test]
fn transfers_in_flight_when_credit_is_withdrawn_are_taken() {
    // The peer may have sent under the credit it had before our Flow with
    // less arrived: only what is past every credit we gave is a violation.
    let (mut p, ch, _) = connected(client_config(), server_config());
    let (_, s_in) = attach(&mut p, ch, "late", Role::Sender);
    p.server.conn.flow(s_in, 5, false);
    p.pump();
    p.server.conn.flow(s_in, 0, false);
    let ev = raw_transfers(&mut p, ch, 0, 5);
    assert_eq!(deliveries(&ev).len(), 5, "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Event::Detach { .. })));
    let ev = raw_transfers(&mut p, ch, 5, 1);
    assert!(ev.iter().any(|e| matches!(e, Event::Detach { .. })));
}

#[test]
fn a_transfer_past_the_session_window_ends_the_session() {
    // A hand-made peer that never reads our Flows, so it never sees the
    // window refreshed: past the window we gave, the session ends (a
    // session error, not the connection's).
    let mut side = Side::new(server_config());
    let mut ev = Vec::new();
    side.conn.handle_frame(open_frame(65536), &mut ev).unwrap();
    side.conn
        .handle_frame(begin_frame(0, None, 10), &mut ev)
        .unwrap();
    side.conn
        .handle_frame(attach_frame(0, "flood", 0, Role::Sender), &mut ev)
        .unwrap();
    let link = ev
        .iter()
        .find_map(|e| match e {
            Event::Attach { link, .. } => Some(*link),
            _ => None,
        })
        .expect("attached");
    // Credit enough that the window is what stops it (every Flow we write
    // also refreshes the window, so none is written while it runs).
    side.conn.flow(link, 200_000, false);
    ev.clear();
    let mut n = 0;
    while !ev.iter().any(|e| matches!(e, Event::Detach { .. })) && n < 200_000 {
        side.conn
            .handle_frame(transfer_frame(0, 0, Some(n), false), &mut ev)
            .expect("a session error, not a connection error");
        n += 1;
    }
    assert_eq!(n, (1 << 16) + 1, "the window was enforced");
    let out = side.conn.take_output();
    let end = decode_all(&out, u32::MAX)
        .into_iter()
        .find_map(|f| match f {
            Frame::Amqp {
                performative: Performative::End(e),
                ..
            } => Some(e),
            _ => None,
        });
    assert_eq!(
        end.and_then(|e| e.error).map(|e| e.condition),
        Some(SessionError::WindowViolation.into())
    );
}

#[test]
fn a_peer_asking_for_millisecond_heartbeats_gets_them_every_half_second() {
    let mut side = Side::new(server_config());
    let mut ev = Vec::new();
    let mut open = open_frame(65536);
    if let Frame::Amqp {
        performative: Performative::Open(o),
        ..
    } = &mut open
    {
        o.idle_time_out = Some(1);
    }
    side.conn.handle_frame(open, &mut ev).unwrap();
    side.conn.open();
    side.conn.take_output();
    let now = std::time::Instant::now();
    let next = side.conn.tick(now).unwrap();
    assert!(
        next >= now + std::time::Duration::from_millis(499),
        "next heartbeat in {:?}",
        next - now
    );
}
