//! The socket driver with a server-like handler, fed arbitrary bytes as
//! the peer's side of an in-memory stream (then end of stream): the
//! driver and engine never panic, and every run ends.
#![no_main]

use bytes::BytesMut;
use flotilla_amqp::connection::{Connection, ConnectionConfig, Event};
use flotilla_amqp::driver::{Driver, DriverConfig, Handler};
use flotilla_amqp::types::messaging::{Accepted, DeliveryState};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

struct Server {
    conn: Connection,
    closing: bool,
}

impl Handler for Server {
    type Signal = ();

    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn signal(&mut self) -> impl std::future::Future<Output = Option<()>> + Send {
        std::future::ready(None)
    }

    fn on_signal(&mut self, _: ()) {}

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Open(_) => self.conn.open(),
            Event::Attach { link, reply: false, .. } => {
                self.conn.accept_attach(link, Default::default());
                self.conn.flow(link, 10, false);
                let _ = self.conn.send(link, b"\x00\x53\x77\xa1\x02hi", false, 1);
            }
            Event::Delivery { delivery, .. } => {
                self.conn
                    .settle(delivery.id, DeliveryState::Accepted(Accepted {}));
            }
            Event::Close { .. } => self.closing = true,
            _ => {}
        }
    }

    fn closing(&self) -> bool {
        self.closing
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let input = data.to_vec();
        let peer = tokio::spawn(async move {
            let _ = theirs.write_all(&input).await;
            let _ = theirs.shutdown().await;
            // Read (and drop) whatever the driver writes, to the end.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut theirs, &mut sink).await;
        });
        let mut server = Server {
            conn: Connection::new(ConnectionConfig {
                max_frame_size: 4096,
                ..Default::default()
            }),
            closing: false,
        };
        let driver = Driver::new(Box::new(ours), BytesMut::new(), DriverConfig::default());
        // Time is paused: idle timeouts fire at once instead of waiting.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), driver.run(&mut server)).await;
        drop(server);
        let _ = peer.await;
    });
});
