//! flotilla-core: what every Flotilla component shares and none of them owns —
//! the address model (address spaces, addresses, messaging users), address
//! patterns, credentials and authorization, config files and telemetry.
//!
//! # Layout
//!
//! - [`resources`]: the Kubernetes-shaped objects (`AddressSpace`, `Address`,
//!   `MessagingUser`) and their validation.
//! - [`pattern`]: `/`- and `.`-separated address patterns with `+`, `*`, `#`.
//! - [`placement`]: which broker holds a queue or topic.
//! - [`config`]: loading `--config` files (several YAML documents) into a
//!   validated [`config::Tenancy`].
//! - [`auth`]: SCRAM-SHA-256 salted keys, password checks and authorization.
//! - [`telemetry`]: tracing initialisation shared by every command.
//! - `crd` (feature `kube`): the kinds that exist only on Kubernetes
//!   (`Flotilla`, `AddressSpacePlan`) and every CRD.
//! - [`metrics`]: the Prometheus series of the components' live reports.
//! - [`ops`]: a component's `--http` listener: `/metrics`, `/healthz`,
//!   `/readyz`.

#![forbid(unsafe_code)]

pub use imbl;
pub mod auth;
pub mod config;
#[cfg(feature = "kube")]
pub mod crd;
pub mod metrics;
pub mod oidc;
pub mod ops;
pub mod pattern;
pub mod placement;
pub mod redial;
pub mod resources;
pub mod telemetry;
pub mod time;
pub mod watch;
