//! The engine fed well-formed performatives in any order, with fields
//! chosen by the fuzzer (channels, handles, ids, credit, windows, settle
//! flags, multi-frame transfers): protocol errors are fine, panics and
//! unbounded growth are not.
#![no_main]

use arbitrary::Arbitrary;
use bytes::BytesMut;
use flotilla_amqp::connection::{Connection, ConnectionConfig, Event};
use flotilla_amqp::frame::{self, Performative, TransferHeader};
use flotilla_amqp::types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use flotilla_amqp::types::messaging::{Accepted, DeliveryState, Source, Target, TargetArchetype};
use flotilla_amqp::types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Open { max_frame: u16, idle: u8 },
    Begin { ch: u8, remote: Option<u8>, window: u16 },
    Attach { ch: u8, handle: u8, name: u8, sender: bool, dc: Option<u8> },
    Flow { ch: u8, handle: Option<u8>, dc: u16, credit: u16, window: u16, next_in: u16, drain: bool, echo: bool },
    Transfer { ch: u8, handle: u8, id: Option<u16>, settled: bool, more: bool, aborted: bool, len: u8 },
    Disposition { ch: u8, first: u16, span: u8, settled: bool, receiver: bool },
    Detach { ch: u8, handle: u8, closed: bool },
    End { ch: u8 },
    Close,
    /// The owner acts: takes output, settles, grants credit.
    Owner { credit: u8 },
}

fn perf(out: &mut BytesMut, ch: u8, p: Performative) {
    frame::encode_performative(out, u16::from(ch % 4), &p);
}

fn encode(op: &Op, out: &mut BytesMut) {
    match *op {
        Op::Open { max_frame, idle } => perf(out, 0, Performative::Open(Box::new(Open {
            container_id: "fuzz".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(u32::from(max_frame).max(512)),
            channel_max: ChannelMax(7),
            idle_time_out: (idle > 0).then_some(u32::from(idle)),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }))),
        Op::Begin { ch, remote, window } => perf(out, ch, Performative::Begin(Begin {
            remote_channel: remote.map(|r| u16::from(r % 4)),
            next_outgoing_id: 0,
            incoming_window: u32::from(window),
            outgoing_window: 1 << 20,
            handle_max: Handle(15),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })),
        Op::Attach { ch, handle, name, sender, dc } => perf(out, ch, Performative::Attach(Box::new(Attach {
            name: format!("l{}", name % 4),
            handle: Handle(u32::from(handle % 8)),
            role: if sender { Role::Sender } else { Role::Receiver },
            snd_settle_mode: SenderSettleMode::Mixed,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source { address: Some("a".into()), ..Default::default() })),
            target: Some(Box::new(TargetArchetype::Target(Target { address: Some("a".into()), ..Default::default() }))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: dc.map(u32::from),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }))),
        Op::Flow { ch, handle, dc, credit, window, next_in, drain, echo } => perf(out, ch, Performative::Flow(Flow {
            next_incoming_id: Some(u32::from(next_in)),
            incoming_window: u32::from(window),
            next_outgoing_id: 0,
            outgoing_window: 1 << 20,
            handle: handle.map(|h| Handle(u32::from(h % 8))),
            delivery_count: handle.map(|_| u32::from(dc)),
            link_credit: handle.map(|_| u32::from(credit)),
            available: None,
            drain,
            echo,
            properties: None,
        })),
        Op::Transfer { ch, handle, id, settled, more, aborted, len } => {
            let body = vec![0x41u8; usize::from(len)];
            let tag = [1u8, 2];
            frame::encode_transfer(out, u16::from(ch % 4), &TransferHeader {
                handle: u32::from(handle % 8),
                first: id.map(|i| (u32::from(i), &tag[..])),
                message_format: 0,
                settled,
                more: more && !aborted,
            }, &body);
        }
        Op::Disposition { ch, first, span, settled, receiver } => perf(out, ch, Performative::Disposition(Disposition {
            role: if receiver { Role::Receiver } else { Role::Sender },
            first: u32::from(first),
            last: Some(u32::from(first) + u32::from(span)),
            settled,
            state: Some(DeliveryState::Accepted(Accepted {})),
            batchable: false,
        })),
        Op::Detach { ch, handle, closed } => perf(out, ch, Performative::Detach(Detach {
            handle: Handle(u32::from(handle % 8)),
            closed,
            error: None,
        })),
        Op::End { ch } => perf(out, ch, Performative::End(End { error: None })),
        Op::Close => perf(out, 0, Performative::Close(Close { error: None })),
        Op::Owner { .. } => {}
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut conn = Connection::new(ConnectionConfig {
        max_frame_size: 4096,
        channel_max: 7,
        max_links: 16,
        ..Default::default()
    });
    let mut events = Vec::new();
    let mut receiving = Vec::new();
    for op in ops.iter().take(2000) {
        if let Op::Owner { credit } = op {
            for d in receiving.drain(..) {
                conn.settle(d, DeliveryState::Accepted(Accepted {}));
            }
            let links: Vec<_> = conn.links().map(|(id, _)| id).collect();
            for l in links {
                conn.flow(l, u32::from(*credit), false);
                let _ = conn.send(l, b"\x00\x53\x77\xa1\x01x", false, 0);
            }
            let out = conn.take_output();
            assert!(out.len() < 64 << 20, "output bounded");
            continue;
        }
        let mut buf = BytesMut::new();
        encode(op, &mut buf);
        let Ok(Some(f)) = frame::decode_frame(&mut buf, 1 << 16) else {
            continue;
        };
        if conn.handle_frame(f, &mut events).is_err() {
            return;
        }
        for e in events.drain(..) {
            match e {
                Event::Open(_) => conn.open(),
                Event::Attach { link, reply: false, .. } => {
                    conn.accept_attach(link, Default::default());
                    conn.flow(link, 3, false);
                }
                Event::Delivery { delivery, .. } if !delivery.settled => {
                    receiving.push(delivery.id)
                }
                _ => {}
            }
        }
    }
});
