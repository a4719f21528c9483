//! flotilla-amqp: the AMQP 1.0 connection engine every Flotilla server and
//! tool shares — framing, TLS, SASL, sessions, links, credit and settlement,
//! with no routing. Performatives are `fe2o3-amqp-types` structs encoded by
//! `serde_amqp`; payloads stay `Bytes` from the read buffer.
//!
//! # Layout
//!
//! - [`admission`]: connection rates, handshakes and connections bounded
//!   per listener.
//! - [`frame`]: protocol headers and frames, bytes in, frames out (no I/O).
//! - [`message`]: finding `to`/`reply-to` and bodies in encoded messages.
//! - [`connection`]: one connection's state machine: events in, frames out.
//! - [`driver`]: the one socket driver every connection runs on, with a
//!   handler for what differs.
//! - [`transport`]: TLS detection, SASL (ANONYMOUS, PLAIN, SCRAM-SHA-256)
//!   and protocol headers, for accepting and connecting.
//! - [`tls`]: rustls configuration from PEM files.
//! - [`client`]: a small client on the same engine, for tools and benchmarks.
//! - [`txn`]: local transactions on the wire (coordinator messages, states).

#![forbid(unsafe_code)]

pub mod admission;
pub mod client;
pub mod connection;
pub mod driver;
pub mod frame;
pub mod message;
pub mod policy;
pub mod tls;
pub mod transport;
pub mod txn;

pub use fe2o3_amqp_types as types;
