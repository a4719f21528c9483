//! Tracing initialisation shared by every `flotilla` command: `EnvFilter`
//! from `RUST_LOG` (default `info`), human-readable or JSON lines, on stderr
//! so that tools keep stdout for their output.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call once per process.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.with_ansi(false).try_init()
    };
    // A second init (e.g. in tests) keeps the first subscriber; nothing to do.
    let _ = result;
}
