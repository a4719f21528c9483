//! The one socket driver every AMQP connection runs on — the router's
//! connections (clients, neighbours, brokers), the broker's, the bench's
//! listening peer and the client library's. It owns the socket's two
//! halves, the read and write buffers, the heartbeat/idle timer and the
//! close; what differs between those connections is a [`Handler`].
//!
//! One wake-up ([`Driver::turn`]): wait for the first of (in this order)
//! room to write, a signal from outside the socket (the handler's other
//! tasks, shutdown), bytes to read, the timer; then decode every whole
//! frame read and hand the engine's events to the handler; let the handler
//! top up what it grants ([`Handler::on_turn`]); move everything the engine
//! produced into the write buffer, to go out in one write.
//!
//! Bounded by construction: while more than [`DriverConfig::high_water`]
//! bytes wait to be written, the driver reads nothing more from the peer
//! and tells the handler it is congested ([`Handler::on_congestion`]), so
//! the handler can stop taking work for this connection (a router routes
//! no more deliveries to a receiver that does not read).

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use bytes::BytesMut;
use fe2o3_amqp_types::definitions::Error as AmqpErrorBody;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Sleep;

use crate::connection::{Connection, Event, ProtocolError};
use crate::frame;
use crate::transport::BoxIo;

/// How a driver treats its socket.
#[derive(Debug, Clone, Copy)]
pub struct DriverConfig {
    /// Stop reading from the peer, and report congestion, while this many
    /// bytes wait to be written.
    pub high_water: usize,
    /// Room made in the read buffer before each read.
    pub read_chunk: usize,
    /// Most frames decoded in one wake-up before output is written (so a
    /// peer that pipelines a lot still sees answers).
    pub frames_per_turn: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            high_water: 4 * 1024 * 1024,
            read_chunk: 64 * 1024,
            frames_per_turn: 4096,
        }
    }
}

/// What differs between connections: what they do with the engine's
/// events and with the signals they get from outside the socket. The
/// handler owns (or borrows) the connection's engine.
pub trait Handler: Send {
    /// Something from outside the socket: other tasks' events, shutdown.
    type Signal: Send;

    /// The connection's engine.
    fn connection(&mut self) -> &mut Connection;

    /// Waits for the next signal; `None` when there will be none (the
    /// driver then stops asking).
    ///
    /// # Cancel safety
    /// Must be cancel safe: it is raced against the socket every wake-up.
    fn signal(&mut self) -> impl Future<Output = Option<Self::Signal>> + Send;

    /// One signal.
    fn on_signal(&mut self, signal: Self::Signal);

    /// One engine event from a frame the peer sent.
    fn on_event(&mut self, event: Event);

    /// The peer broke the protocol (or a frame did not decode, or it fell
    /// silent): by default the connection closes with that error.
    fn on_protocol_error(&mut self, error: AmqpErrorBody) {
        self.connection().close(Some(error));
    }

    /// Called every wake-up before output is taken (e.g. to top up credit).
    fn on_turn(&mut self) {}

    /// The write buffer went over (`true`) or back under (`false`) the
    /// high-water mark.
    fn on_congestion(&mut self, _congested: bool) {}

    /// True while the handler cannot take more of the peer's frames (what
    /// it must hand on is waiting for room): the driver stops reading
    /// until its signal makes room.
    fn paused(&self) -> bool {
        false
    }

    /// When the handler must act though nothing happened (a login's token
    /// expires): [`Handler::on_deadline`] is called once it has passed.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// The deadline passed; it must move it or clear it.
    fn on_deadline(&mut self) {}

    /// True once the handler has closed (or is closing) the connection:
    /// the driver ends after our Close is written.
    fn closing(&self) -> bool;
}

/// Why a driver stopped.
#[derive(Debug)]
pub enum Ended {
    /// Both Closes exchanged, or ours written while closing.
    Closed,
    /// The peer closed the socket.
    Eof,
    /// Reading or writing failed.
    Io(std::io::Error),
}

/// What woke a turn up.
enum Woke<S> {
    Wrote(std::io::Result<usize>),
    Signal(Option<S>),
    Read(std::io::Result<usize>),
    Timer,
}

/// One connection's socket, buffers and timer.
pub struct Driver {
    rd: ReadHalf<BoxIo>,
    wr: WriteHalf<BoxIo>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    cfg: DriverConfig,
    timer: Pin<Box<Sleep>>,
    next_tick: Instant,
    eof: bool,
    congested: bool,
    signals_done: bool,
    events: Vec<Event>,
}

impl Driver {
    /// A driver for `io`, whose first bytes (read past the handshake) are
    /// already in `rbuf`.
    pub fn new(io: BoxIo, rbuf: BytesMut, cfg: DriverConfig) -> Self {
        let (rd, wr) = tokio::io::split(io);
        let now = Instant::now();
        Driver {
            rd,
            wr,
            rbuf,
            wbuf: BytesMut::with_capacity(64 * 1024),
            cfg,
            timer: Box::pin(tokio::time::sleep_until(now.into())),
            next_tick: now,
            eof: false,
            congested: false,
            signals_done: false,
            events: Vec::new(),
        }
    }

    /// Bytes waiting to be written.
    pub fn pending_output(&self) -> usize {
        self.wbuf.len()
    }

    /// True when the peer closed its side of the socket.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// Decodes the frames already read and hands their events over
    /// (bounded per call; what is left is decoded on the next turn).
    pub fn process_input<H: Handler>(&mut self, h: &mut H) {
        self.decode_input(h);
        // The peer's Open may have just told us its idle timeout: the first
        // heartbeat may be due before the timer's deadline.
        if let Some(due) = h.connection().heartbeat_due() {
            self.next_tick = self.next_tick.min(due);
        }
    }

    fn decode_input<H: Handler>(&mut self, h: &mut H) {
        for _ in 0..self.cfg.frames_per_turn {
            let conn = h.connection();
            if conn.is_closed() {
                self.rbuf.clear();
                return;
            }
            let max = conn.max_frame_size();
            match frame::decode_frame(&mut self.rbuf, max) {
                Ok(Some(f)) => {
                    let r = conn.handle_frame(f, &mut self.events);
                    for e in self.events.drain(..) {
                        h.on_event(e);
                    }
                    if let Err(ProtocolError(e)) = r {
                        h.on_protocol_error(e);
                        self.rbuf.clear();
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    h.on_protocol_error(e.to_amqp_error());
                    self.rbuf.clear();
                    return;
                }
            }
        }
    }

    /// Moves the engine's output into the write buffer and reports
    /// congestion changes.
    fn collect_output<H: Handler>(&mut self, h: &mut H) {
        h.on_turn();
        let conn = h.connection();
        if conn.has_output() {
            let out = conn.take_output();
            if self.wbuf.is_empty() {
                self.wbuf = out;
            } else {
                self.wbuf.extend_from_slice(&out);
            }
        }
        let congested = self.wbuf.len() >= self.cfg.high_water;
        if congested != self.congested {
            self.congested = congested;
            h.on_congestion(congested);
        }
    }

    /// True when the connection is over: nothing left to write and both
    /// Closes exchanged, or ours sent while closing, or the peer gone.
    fn finished<H: Handler>(&self, h: &mut H) -> bool {
        let closing = h.closing();
        let conn = h.connection();
        self.wbuf.is_empty() && (conn.is_closed() || (closing && conn.close_sent()) || self.eof)
    }

    /// One wake-up. `Ok(true)`: go on; `Ok(false)`: the connection is over.
    ///
    /// # Errors
    /// The socket failed.
    ///
    /// # Cancel safety
    /// Not cancel safe: run it to completion.
    pub async fn turn<H: Handler>(&mut self, h: &mut H) -> Result<bool, std::io::Error> {
        // Before anything else: a peer whose socket is always readable
        // must not keep the timer from ever being polled.
        if h.deadline().is_some_and(|d| d <= Instant::now()) {
            h.on_deadline();
        }
        self.collect_output(h);
        if self.finished(h) {
            return Ok(false);
        }
        let can_read = !self.eof && !self.congested && !h.paused();
        if can_read && self.rbuf.capacity() - self.rbuf.len() < self.cfg.read_chunk / 4 {
            self.rbuf.reserve(self.cfg.read_chunk);
        }
        let wake = h
            .deadline()
            .map_or(self.next_tick, |d| d.min(self.next_tick));
        if self.timer.deadline() != wake.into() {
            self.timer.as_mut().reset(wake.into());
        }
        let signals = !self.signals_done;
        let woke = {
            let (rd, wr, rbuf, wbuf, timer) = (
                &mut self.rd,
                &mut self.wr,
                &mut self.rbuf,
                &self.wbuf,
                &mut self.timer,
            );
            tokio::select! {
                biased;
                r = wr.write(wbuf), if !wbuf.is_empty() => Woke::Wrote(r),
                s = h.signal(), if signals => Woke::Signal(s),
                r = rd.read_buf(rbuf), if can_read => Woke::Read(r),
                _ = timer.as_mut() => Woke::Timer,
            }
        };
        match woke {
            Woke::Wrote(r) => {
                let n = r?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                let _ = self.wbuf.split_to(n);
                if self.wbuf.is_empty() && self.wbuf.capacity() > 4 * self.cfg.read_chunk {
                    // Give back a buffer a burst made large.
                    self.wbuf = BytesMut::with_capacity(64 * 1024);
                }
            }
            Woke::Signal(Some(s)) => h.on_signal(s),
            Woke::Signal(None) => self.signals_done = true,
            Woke::Read(r) => match r? {
                0 => self.eof = true,
                _ => self.process_input(h),
            },
            Woke::Timer if h.deadline().is_some_and(|d| d <= Instant::now()) => h.on_deadline(),
            Woke::Timer => match h.connection().tick(Instant::now()) {
                Ok(t) => self.next_tick = t,
                Err(ProtocolError(e)) => {
                    h.on_protocol_error(e);
                    // Close frames out; the idle peer gets no more time.
                    self.next_tick = Instant::now() + std::time::Duration::from_secs(5);
                }
            },
        }
        Ok(true)
    }

    /// Runs turns until the connection is over, then flushes and shuts the
    /// socket down.
    pub async fn run<H: Handler>(mut self, h: &mut H) -> Ended {
        self.process_input(h);
        let ended = loop {
            match self.turn(h).await {
                Ok(true) => {}
                Ok(false) if self.eof => break Ended::Eof,
                Ok(false) => break Ended::Closed,
                Err(e) => break Ended::Io(e),
            }
        };
        self.shutdown().await;
        ended
    }

    /// Writes what is left (bounded) and shuts the socket down.
    pub async fn shutdown(&mut self) {
        if !self.wbuf.is_empty() {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                self.wr.write_all(&self.wbuf),
            )
            .await;
            self.wbuf.clear();
        }
        let _ = self.wr.flush().await;
        let _ = self.wr.shutdown().await;
    }

    /// Writes everything waiting (client side: before waiting for an
    /// answer).
    ///
    /// # Errors
    /// The socket failed.
    pub async fn flush(&mut self, conn: &mut Connection) -> std::io::Result<()> {
        if conn.has_output() {
            let out = conn.take_output();
            self.wbuf.extend_from_slice(&out);
        }
        if !self.wbuf.is_empty() {
            self.wr.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::ConnectionConfig;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection that opens first and then only waits.
    struct Quiet {
        conn: Connection,
    }

    impl Handler for Quiet {
        type Signal = ();

        fn connection(&mut self) -> &mut Connection {
            &mut self.conn
        }

        fn signal(&mut self) -> impl Future<Output = Option<()>> + Send {
            std::future::pending()
        }

        fn on_signal(&mut self, _: ()) {}

        fn on_event(&mut self, _: Event) {}

        fn closing(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn the_first_heartbeat_follows_the_peers_idle_timeout_not_ours() {
        // Our idle timeout is long (an hour); the peer's Open, which
        // arrives after our first timer tick, announces 1 s. An empty
        // frame must reach the peer within about half of that, long
        // before our own timer would have fired again.
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut conn = Connection::new(ConnectionConfig {
            idle_timeout: Some(Duration::from_secs(3600)),
            ..Default::default()
        });
        conn.open();
        let io: BoxIo = Box::new(ours);
        let task = tokio::spawn(async move {
            let mut h = Quiet { conn };
            Driver::new(io, BytesMut::new(), DriverConfig::default())
                .run(&mut h)
                .await
        });
        // Our Open comes first; the peer answers 50 ms later, as over a
        // network: by then our timer has ticked once, with no peer
        // timeout known yet.
        let mut buf = BytesMut::new();
        while frame::decode_frame(&mut buf, 1 << 20)
            .ok()
            .flatten()
            .is_none()
        {
            assert!(theirs.read_buf(&mut buf).await.expect("read") > 0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut peer = Connection::new(ConnectionConfig {
            idle_timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        });
        peer.open();
        theirs
            .write_all(&peer.take_output())
            .await
            .expect("write Open");
        let started = std::time::Instant::now();
        let heartbeat = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                if buf.len() >= 8 && buf[..8] == [0, 0, 0, 8, 2, 0, 0, 0] {
                    return;
                }
                if buf.len() >= 8 {
                    let size = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if buf.len() >= size {
                        let _ = buf.split_to(size);
                        continue;
                    }
                }
                assert!(theirs.read_buf(&mut buf).await.expect("read") > 0);
            }
        })
        .await;
        assert!(heartbeat.is_ok(), "no heartbeat within 3 s");
        assert!(started.elapsed() < Duration::from_millis(1500));
        task.abort();
    }
}
