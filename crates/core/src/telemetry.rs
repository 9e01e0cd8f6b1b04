//! How logs are formatted and filtered (`LOG_FORMAT`, `LOG_LEVEL`, `RUST_LOG`).
//!
//! Every binary calls [`init`] once, right after loading its configuration. This module owns
//! what the log settings mean; `config` calls `check_directives` and `parse_format` to
//! validate them, and nothing here depends on `config`.
//!
//! Logs always go to stderr: stdout belongs to command output (the CLI prints JSON there, and
//! a log line in the middle would corrupt it).
//!
//! `LOG_FORMAT=json` writes one JSON object per event with the event's fields at the top level
//! and the current span plus the span list, so `delivery_id`, `webhook_id` and `worker_id` from
//! enclosing spans reach the log shipper. `pretty` writes human-readable lines, coloured only
//! when stderr is a terminal.

use std::io::IsTerminal;

use tracing::level_filters::LevelFilter;
use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How log lines are written (`LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, event fields flattened, for log shippers.
    Json,
    /// Human-readable lines, for terminals.
    Pretty,
}

/// Reads `LOG_FORMAT` (for `config`, which owns the settings table but not what logs mean).
pub(crate) fn parse_format(text: &str) -> Result<LogFormat, String> {
    match text.to_ascii_lowercase().as_str() {
        "json" => Ok(LogFormat::Json),
        "pretty" => Ok(LogFormat::Pretty),
        _ => Err(format!("{text:?} is not a log format; use json or pretty")),
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `LOG_LEVEL` or `RUST_LOG` is not a valid filter.
    #[error("invalid {setting}: {problem}")]
    InvalidFilter { setting: &'static str, problem: String },
    /// Something (an earlier `init`, a test harness) already installed a global subscriber.
    #[error("a global tracing subscriber is already installed; call telemetry::init once per process")]
    AlreadyInstalled,
}

/// Installs the global tracing subscriber writing to stderr. The filter comes from `log_level`
/// (the `LOG_LEVEL` setting) unless `RUST_LOG` is set, which wins: developers expect it to.
pub fn init(log_level: &str, format: LogFormat) -> Result<(), TelemetryError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(log_level, rust_log.as_deref())?;
    let ansi = std::io::stderr().is_terminal();
    subscriber(filter, format, ansi, std::io::stderr).try_init().map_err(|_| TelemetryError::AlreadyInstalled)
}

/// Checks `LOG_LEVEL` at configuration time and returns it normalised (blank directives and
/// spaces around commas removed, since `EnvFilter` would read " foo" as a target with a
/// leading space).
///
/// Stricter than `EnvFilter`: a bare word that is not a level (`verbose`) is a valid
/// directive there, meaning "everything from target `verbose`", which silently turns off all
/// other logs. In `LOG_LEVEL` that is almost always a typo, so it is refused; targets are
/// still available as `target=level`.
pub(crate) fn check_directives(text: &str) -> Result<String, String> {
    let normalised = normalise(text);
    for directive in normalised.split(',') {
        let bare = !directive.contains(['=', '[', '{']);
        if bare && directive.parse::<LevelFilter>().is_err() {
            return Err(format!(
                "{directive:?} is not a level; use trace, debug, info, warn, error or off, \
                 optionally with target=level directives (info,hookfleet_core=debug)"
            ));
        }
    }
    EnvFilter::builder()
        .parse(&normalised)
        .map_err(|error| format!("{text:?} is not a log filter ({error}); use e.g. info,hookfleet_core=debug"))?;
    Ok(normalised)
}

fn normalise(directives: &str) -> String {
    directives.split(',').map(str::trim).filter(|directive| !directive.is_empty()).collect::<Vec<_>>().join(",")
}

/// The filter in force: `RUST_LOG` when set and non-empty, else `LOG_LEVEL`.
fn filter(log_level: &str, rust_log: Option<&str>) -> Result<EnvFilter, TelemetryError> {
    let (setting, directives) = match rust_log.map(str::trim).filter(|value| !value.is_empty()) {
        Some(rust_log) => ("RUST_LOG", normalise(rust_log)),
        None => (
            "LOG_LEVEL",
            check_directives(log_level)
                .map_err(|problem| TelemetryError::InvalidFilter { setting: "LOG_LEVEL", problem })?,
        ),
    };
    EnvFilter::builder().parse(&directives).map_err(|error| TelemetryError::InvalidFilter {
        setting,
        problem: format!("{directives:?} is not a log filter: {error}"),
    })
}

/// The subscriber for `format`, writing through `writer` (stderr in production, a buffer in
/// tests). Boxed because the two formats are different types.
fn subscriber<W>(filter: EnvFilter, format: LogFormat, ansi: bool, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(writer),
            ),
        ),
        LogFormat::Pretty => {
            Box::new(registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects everything the subscriber writes.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn capture(level: &str, format: LogFormat, emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(filter(level, None).unwrap(), format, false, move || writer.clone());
        tracing::subscriber::with_default(subscriber, emit);
        buffer.text()
    }

    #[test]
    fn json_lines_flatten_fields_and_carry_spans() {
        let output = capture("info", LogFormat::Json, || {
            let span = tracing::info_span!("attempt", delivery_id = 42, worker_id = "w-1");
            let _entered = span.enter();
            tracing::info!(status_code = 503, "delivery failed");
            tracing::debug!("filtered out");
        });
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines.len(), 1, "{output}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["message"], "delivery failed");
        assert_eq!(line["status_code"], 503);
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["span"]["delivery_id"], 42);
        assert_eq!(line["spans"][0]["worker_id"], "w-1");
    }

    #[test]
    fn pretty_lines_are_plain_text() {
        let output = capture("warn", LogFormat::Pretty, || {
            tracing::warn!(webhook_id = 7, "breaker opened");
            tracing::info!("filtered out");
        });
        assert!(output.contains("WARN") && output.contains("breaker opened"), "{output}");
        assert!(output.contains("webhook_id=7"), "{output}");
        assert!(!output.contains("filtered out"), "{output}");
        assert!(!output.contains('\u{1b}'), "no colour codes when not a terminal: {output}");
    }

    #[test]
    fn target_directives_apply() {
        let output = capture("warn,hookfleet_core=debug", LogFormat::Pretty, || {
            tracing::debug!("from this crate");
            tracing::debug!(target: "other", "from elsewhere");
        });
        assert!(output.contains("from this crate"), "{output}");
        assert!(!output.contains("from elsewhere"), "{output}");
    }

    #[test]
    fn rust_log_wins_over_log_level() {
        let filter = filter("info", Some("trace")).unwrap();
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::TRACE));
        let filter = filter_or_panic("info", Some("  "));
        assert_eq!(filter.max_level_hint(), Some(LevelFilter::INFO));
    }

    fn filter_or_panic(level: &str, rust_log: Option<&str>) -> EnvFilter {
        filter(level, rust_log).unwrap()
    }

    #[test]
    fn invalid_filters_are_errors_naming_the_variable() {
        let error = filter("verbose", None).unwrap_err().to_string();
        assert!(error.starts_with("invalid LOG_LEVEL: \"verbose\" is not a level"), "{error}");
        let error = filter("info,hookfleet=loud", None).unwrap_err().to_string();
        assert!(error.starts_with("invalid LOG_LEVEL"), "{error}");
        let error = filter("info", Some("hookfleet=loud")).unwrap_err().to_string();
        assert!(error.starts_with("invalid RUST_LOG"), "{error}");
        // A bad LOG_LEVEL does not matter when RUST_LOG overrides it.
        assert!(filter("verbose", Some("debug")).is_ok());
    }

    #[test]
    fn check_directives_normalises() {
        assert_eq!(check_directives(" info , hookfleet_core=debug,").unwrap(), "info,hookfleet_core=debug");
        assert_eq!(check_directives("OFF").unwrap(), "OFF");
        assert!(check_directives("hookfleet_core[attempt]=trace").is_ok());
    }

    #[test]
    fn init_refuses_a_second_subscriber() {
        // Another test in this binary may already have installed one; either way the second
        // call must report it rather than panic.
        let first = init("off", LogFormat::Pretty);
        assert!(matches!(first, Ok(()) | Err(TelemetryError::AlreadyInstalled)), "{first:?}");
        assert!(matches!(init("off", LogFormat::Json), Err(TelemetryError::AlreadyInstalled)));
    }
}
