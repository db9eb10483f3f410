//! Logging of the daemons: to the systemd journal with fields, as JSON lines, or as text.

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    /// One JSON object per line, with the request's spans (caller, request id, seal).
    Json,
    Journald,
}

/// Logging to the journal (with fields), as JSON lines, or as text; level from $SEALGATE_LOG.
pub fn init(format: LogFormat, identifier: &str) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEALGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // systemd sets JOURNAL_STREAM when stderr is connected to the journal.
    let journal = format == LogFormat::Journald
        || (format == LogFormat::Auto && std::env::var_os("JOURNAL_STREAM").is_some());
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                registry
                    .with(layer.with_syslog_identifier(identifier.into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("{identifier}: no systemd journal ({e}); logging to stderr"),
        }
    }
    if format == LogFormat::Json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init();
    }
}
