//! flotilla-broker: store-and-forward for queues and topics (DESIGN.md
//! "Broker"). So far it holds the journal the broker will keep its messages
//! in; the AMQP server, queues and topics are issue #4's remaining work.
//!
//! # Layout
//!
//! - [`journal`]: segmented append-only files, a CRC per record, group
//!   commit, recovery by replay, retirement of acknowledged segments.

#![forbid(unsafe_code)]

pub mod journal;
