//! Logging: `tracing` to stderr (as upstream's klog), filtered by `--log-level` or
//! `RUST_LOG`, with the `log` facade bridged in (tracing-log) so aya/aya-log messages
//! appear too. `--log-format=json` writes one JSON object per line instead.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::cli::LogFormat;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The filter string does not parse.
    #[error("--log-level {value:?} is not a valid log filter: {reason}")]
    Filter {
        /// The filter as given.
        value: String,
        /// The parser's message.
        reason: String,
    },
    /// A global subscriber or logger was already installed.
    #[error("logging already initialised: {0}")]
    AlreadyInit(String),
}

/// Installs the global subscriber, writing `format` lines. `RUST_LOG`, when set, wins over
/// `filter`.
pub fn init(filter: &str, format: LogFormat) -> Result<(), Error> {
    let value = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| filter.to_owned());
    let env_filter = EnvFilter::try_new(&value).map_err(|e| Error::Filter {
        value: value.clone(),
        reason: e.to_string(),
    })?;
    let text = (format == LogFormat::Text).then(|| {
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(true)
    });
    let json = (format == LogFormat::Json).then(|| {
        fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_target(true)
    });
    // `try_init` also installs the `log` → `tracing` bridge (tracing-subscriber's default
    // `tracing-log` feature), so aya-log records reach the same output.
    tracing_subscriber::registry()
        .with(env_filter)
        .with(text)
        .with(json)
        .try_init()
        .map_err(|e| Error::AlreadyInit(e.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bad_filter_is_named() {
        let err = tracing_subscriber::EnvFilter::try_new("flannel=[").map(|_| ());
        assert!(err.is_err());
        let msg = super::Error::Filter {
            value: "flannel=[".into(),
            reason: "x".into(),
        }
        .to_string();
        assert!(msg.contains("flannel=["));
    }
}
