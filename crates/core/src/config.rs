//! Which settings exist, their defaults, how they layer and how they are validated.
//!
//! Everything a hookfleet process can be configured with is one [`Config`], loaded once at
//! start-up and validated before anything else happens, so a bad value stops the process
//! with a message naming the setting instead of surfacing later as a confusing runtime error.
//!
//! Layering (spec §8): defaults < the TOML file named by `HOOKFLEET_CONFIG` < environment.
//! The environment names are the spec's (`DATABASE_URL`, `BATCH_SIZE`, `HOOKFLEET_LEASE`, …);
//! the file uses the field names as keys (`database_url`, `batch_size`, `lease`, …). Both are
//! fed through the `config` crate, but only after the environment has been narrowed to the
//! known names and re-keyed to the file keys, so the two layers share one key space and
//! unrelated variables (`PATH`, `HOME`, …) never enter it.
//!
//! [`SETTINGS`] is the single source of truth: the env map is built from it, the file's keys are
//! checked against it, the documented defaults in it are the values actually parsed, and the
//! README table and `--help` are generated from it.
//!
//! Values are read back as text and parsed here rather than by serde, because serde's errors
//! name neither the environment variable nor the expected form. Secrets are never echoed.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use rustls::pki_types::CertificateDer;
use secrecy::SecretString;

use crate::telemetry::{self, LogFormat};

/// One row of the settings table: the README's configuration table and `--help` come from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettingDoc {
    /// The environment variable.
    pub env: &'static str,
    /// The key in the `HOOKFLEET_CONFIG` file; empty for `HOOKFLEET_CONFIG` itself, which only
    /// the environment can set.
    pub key: &'static str,
    /// The default as written in the docs; for most settings this exact text is what gets
    /// parsed when nothing sets the value. Empty means "unset".
    pub default: &'static str,
    /// One sentence for operators.
    pub description: &'static str,
}

const CONFIG_FILE: SettingDoc = SettingDoc {
    env: "HOOKFLEET_CONFIG",
    key: "",
    default: "",
    description: "Path of an optional TOML file whose keys are the file keys of this table; \
                  the environment overrides it. A path that does not exist is an error.",
};
const DATABASE_URL: SettingDoc = SettingDoc {
    env: "DATABASE_URL",
    key: "database_url",
    default: "",
    description: "PostgreSQL connection URL (secret). Required by every command that talks \
                  to the database.",
};
const BATCH_SIZE: SettingDoc = SettingDoc {
    env: "BATCH_SIZE",
    key: "batch_size",
    default: "10",
    description: "How many deliveries a worker claims per round trip (1 to 1000).",
};
const POLL_INTERVAL: SettingDoc = SettingDoc {
    env: "POLL_INTERVAL",
    key: "poll_interval",
    default: "1s",
    description: "How often an idle worker polls when no NOTIFY arrives (at least 10ms).",
};
const HTTP_TIMEOUT: SettingDoc = SettingDoc {
    env: "HTTP_TIMEOUT",
    key: "http_timeout",
    default: "5s",
    description: "Total time allowed for one delivery attempt (more than 0, at most 5m); \
                  webhooks may override it.",
};
const CONNECT_TIMEOUT: SettingDoc = SettingDoc {
    env: "HOOKFLEET_CONNECT_TIMEOUT",
    key: "connect_timeout",
    default: "2s",
    description: "Time allowed to open a connection to a receiver: name lookup, TCP connect and \
                  TLS handshake together (more than 0); never longer than the \
                  attempt's total timeout.",
};
const RATE_LIMIT_RPS: SettingDoc = SettingDoc {
    env: "RATE_LIMIT_RPS",
    key: "rate_limit_rps",
    default: "10",
    description: "Default fleet-wide requests per second per webhook (more than 0).",
};
const RATE_LIMIT_BURST: SettingDoc = SettingDoc {
    env: "HOOKFLEET_RATE_LIMIT_BURST",
    key: "rate_limit_burst",
    default: "",
    description: "Default token-bucket burst per webhook (at least 1); unset means half \
                  of the webhook's rate, rounded up, which keeps any 10 s window within the \
                  rate + 10 %.",
};
const BREAKER_THRESHOLD: SettingDoc = SettingDoc {
    env: "CIRCUIT_BREAKER_FAILURE_THRESHOLD",
    key: "circuit_breaker_failure_threshold",
    default: "5",
    description: "Consecutive failures that open a webhook's circuit (at least 1).",
};
const BREAKER_TIMEOUT: SettingDoc = SettingDoc {
    env: "CIRCUIT_BREAKER_TIMEOUT_SECONDS",
    key: "circuit_breaker_timeout",
    default: "60",
    description: "How long an open circuit stays open before one probe is allowed \
                  (seconds or a duration, more than 0).",
};
const LOG_LEVEL: SettingDoc = SettingDoc {
    env: "LOG_LEVEL",
    key: "log_level",
    default: "info",
    description: "Log filter: a level (trace, debug, info, warn, error, off) and/or \
                  target=level directives; RUST_LOG, when set, wins.",
};
const LOG_FORMAT: SettingDoc = SettingDoc {
    env: "LOG_FORMAT",
    key: "log_format",
    default: "pretty",
    description: "Log format on stderr: json or pretty.",
};
const METRICS_ADDR: SettingDoc = SettingDoc {
    env: "METRICS_ADDR",
    key: "metrics_addr",
    default: "0.0.0.0:9090",
    description: "Where the worker serves /metrics, /healthz and /readyz (IP:port).",
};
const WORKER_ID: SettingDoc = SettingDoc {
    env: "WORKER_ID",
    key: "worker_id",
    default: "<hostname>-<pid>",
    description: "This worker's name in leases, logs and hookfleet.workers \
                  (1 to 128 characters, no whitespace).",
};
const MAX_BODY_BYTES: SettingDoc = SettingDoc {
    env: "HOOKFLEET_MAX_BODY_BYTES",
    key: "max_body_bytes",
    default: "262144",
    description: "Largest message body accepted, in bytes of JSON text (1 to 67108864 = \
                  64 MiB); written into the database by `hookfleet migrate`.",
};
const RETRY_BASE: SettingDoc = SettingDoc {
    env: "HOOKFLEET_RETRY_BASE",
    key: "retry_base",
    default: "5s",
    description: "First retry delay; it doubles per attempt, with full jitter.",
};
const RETRY_MAX: SettingDoc = SettingDoc {
    env: "HOOKFLEET_RETRY_MAX",
    key: "retry_max",
    default: "1h",
    description: "Cap on the retry delay, Retry-After included (at least HOOKFLEET_RETRY_BASE).",
};
const MAX_RETRIES: SettingDoc = SettingDoc {
    env: "HOOKFLEET_MAX_RETRIES",
    key: "max_retries",
    default: "3",
    description: "Default retries after the first attempt (0 to 100); webhooks and \
                  messages may override it.",
};
const LEASE: SettingDoc = SettingDoc {
    env: "HOOKFLEET_LEASE",
    key: "lease",
    default: "60s",
    description: "How long a claim is held before another worker may take the row \
                  (at least 1s, more than HTTP_TIMEOUT).",
};
const API_ADDR: SettingDoc = SettingDoc {
    env: "HOOKFLEET_API_ADDR",
    key: "api_addr",
    default: "0.0.0.0:8080",
    description: "Where hookfleet-api listens (IP:port).",
};
const ENCRYPTION_KEY: SettingDoc = SettingDoc {
    env: "HOOKFLEET_ENCRYPTION_KEY",
    key: "encryption_key",
    default: "",
    description: "Key for webhook URLs and secrets at rest: 32 random bytes, base64 (secret); \
                  `hookfleet keygen` prints one.",
};
const PREVIOUS_ENCRYPTION_KEYS: SettingDoc = SettingDoc {
    env: "HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS",
    key: "previous_encryption_keys",
    default: "",
    description: "Comma-separated older keys, still accepted for decryption during a \
                  rotation (secret).",
};
const MAX_IN_FLIGHT: SettingDoc = SettingDoc {
    env: "HOOKFLEET_MAX_IN_FLIGHT",
    key: "max_in_flight",
    default: "64",
    description: "Concurrent delivery attempts per worker (1 to 10000).",
};
const MAX_IN_FLIGHT_PER_WEBHOOK: SettingDoc = SettingDoc {
    env: "HOOKFLEET_MAX_IN_FLIGHT_PER_WEBHOOK",
    key: "max_in_flight_per_webhook",
    default: "",
    description: "Most of one worker's attempts that a single webhook may hold (1 to 10000), so a \
                  slow webhook cannot take every slot; unset means half of \
                  HOOKFLEET_MAX_IN_FLIGHT, rounded up.",
};
const SHUTDOWN_GRACE: SettingDoc = SettingDoc {
    env: "HOOKFLEET_SHUTDOWN_GRACE",
    key: "shutdown_grace",
    default: "25s",
    description: "On SIGTERM/SIGINT, how long in-flight attempts may finish before the \
                  worker releases its leases and exits.",
};
const ALLOW_HTTP: SettingDoc = SettingDoc {
    env: "HOOKFLEET_ALLOW_HTTP",
    key: "allow_http",
    default: "false",
    description: "Allow plain http:// webhook URLs (development and tests): true or false.",
};
const ALLOWED_CIDRS: SettingDoc = SettingDoc {
    env: "HOOKFLEET_ALLOWED_CIDRS",
    key: "allowed_cidrs",
    default: "",
    description: "Comma-separated networks exempt from the SSRF guard, e.g. \
                  127.0.0.0/8,::1/128 (a bare IP means that one address).",
};
const API_KEY: SettingDoc = SettingDoc {
    env: "HOOKFLEET_API_KEY",
    key: "api_key",
    default: "",
    description: "Bootstrap bearer key for the producer API (secret).",
};
const ATTEMPT_RETENTION: SettingDoc = SettingDoc {
    env: "HOOKFLEET_ATTEMPT_RETENTION",
    key: "attempt_retention",
    default: "7d",
    description: "How long delivery attempt rows are kept before pruning (more than 0).",
};
const DELIVERY_RETENTION: SettingDoc = SettingDoc {
    env: "HOOKFLEET_DELIVERY_RETENTION",
    key: "delivery_retention",
    default: "7d",
    description: "How long delivered and cancelled rows stay in delivery_queue after they \
                  settled (more than 0).",
};
const DEAD_RETENTION: SettingDoc = SettingDoc {
    env: "HOOKFLEET_DEAD_RETENTION",
    key: "dead_retention",
    default: "30d",
    description: "How long dead deliveries stay in delivery_queue, replayable, before pruning \
                  (more than 0).",
};
const RESPONSE_BODY_CAP: SettingDoc = SettingDoc {
    env: "HOOKFLEET_RESPONSE_BODY_CAP",
    key: "response_body_cap",
    default: "65536",
    description: "Bytes of a receiver's response body read per attempt \
                  (0 to 16777216 = 16 MiB); the rest is dropped.",
};
const HEARTBEAT_INTERVAL: SettingDoc = SettingDoc {
    env: "HOOKFLEET_HEARTBEAT_INTERVAL",
    key: "heartbeat_interval",
    default: "5s",
    description: "How often a worker refreshes its row in hookfleet.workers \
                  (more than 0, less than HOOKFLEET_LEASE).",
};
const DB_POOL_SIZE: SettingDoc = SettingDoc {
    env: "HOOKFLEET_DB_POOL_SIZE",
    key: "db_pool_size",
    default: "8",
    description: "PostgreSQL connections per process (1 to 256).",
};
const DATABASE_TIMEOUT: SettingDoc = SettingDoc {
    env: "HOOKFLEET_DATABASE_TIMEOUT",
    key: "database_timeout",
    default: "30s",
    description: "Longest one database call may take (1s to 5m): the server's statement_timeout \
                  for hookfleet's sessions, and the worker's own limit (2s more) for a server \
                  that stops answering, after which the connection is dropped and the call \
                  retried on a new one.",
};
const CA_CERTIFICATES: SettingDoc = SettingDoc {
    env: "HOOKFLEET_CA_CERTIFICATES",
    key: "ca_certificates",
    default: "",
    description: "Path of a PEM file of CA certificates that receivers' TLS certificates may \
                  chain to, besides the public (webpki) roots: for receivers behind a private \
                  CA. Unset: public roots only.",
};

/// Every setting, in the order the docs list them. The loader can only see environment
/// variables and file keys listed here (see [`Config::from_env_map`]).
static SETTINGS: [SettingDoc; 36] = [
    CONFIG_FILE,
    DATABASE_URL,
    BATCH_SIZE,
    POLL_INTERVAL,
    HTTP_TIMEOUT,
    CONNECT_TIMEOUT,
    RATE_LIMIT_RPS,
    RATE_LIMIT_BURST,
    BREAKER_THRESHOLD,
    BREAKER_TIMEOUT,
    LOG_LEVEL,
    LOG_FORMAT,
    METRICS_ADDR,
    WORKER_ID,
    MAX_BODY_BYTES,
    RETRY_BASE,
    RETRY_MAX,
    MAX_RETRIES,
    LEASE,
    API_ADDR,
    ENCRYPTION_KEY,
    PREVIOUS_ENCRYPTION_KEYS,
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_PER_WEBHOOK,
    SHUTDOWN_GRACE,
    ALLOW_HTTP,
    ALLOWED_CIDRS,
    API_KEY,
    ATTEMPT_RETENTION,
    DELIVERY_RETENTION,
    DEAD_RETENTION,
    RESPONSE_BODY_CAP,
    HEARTBEAT_INTERVAL,
    DB_POOL_SIZE,
    DATABASE_TIMEOUT,
    CA_CERTIFICATES,
];

/// The whole configuration of a hookfleet process. See [`Config::settings`] for what each
/// field means; secrets are `SecretString`s so `Debug` output redacts them.
#[derive(Clone, Debug)]
pub struct Config {
    /// `DATABASE_URL`; optional because `hookfleet keygen` needs no database.
    pub database_url: Option<SecretString>,
    pub batch_size: u32,
    pub poll_interval: Duration,
    pub http_timeout: Duration,
    /// Not checked against `http_timeout`: the delivery client clamps it per attempt, because
    /// a webhook may override the total timeout.
    pub connect_timeout: Duration,
    pub rate_limit_rps: f64,
    /// `None` means "half of the webhook's rate, rounded up".
    pub rate_limit_burst: Option<u32>,
    pub circuit_breaker_failure_threshold: u32,
    pub circuit_breaker_timeout: Duration,
    /// Validated as tracing filter directives; normalised (spaces around commas removed).
    pub log_level: String,
    pub log_format: LogFormat,
    pub metrics_addr: SocketAddr,
    pub worker_id: String,
    pub max_body_bytes: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub max_retries: u32,
    pub lease: Duration,
    pub api_addr: SocketAddr,
    /// Only present/absent here; its format is checked by `crypto`, which knows what a key is.
    pub encryption_key: Option<SecretString>,
    pub previous_encryption_keys: Vec<SecretString>,
    pub max_in_flight: u32,
    /// Resolved: the setting, else half of `max_in_flight` rounded up; never above `max_in_flight`.
    pub max_in_flight_per_webhook: u32,
    pub shutdown_grace: Duration,
    pub allow_http: bool,
    pub allowed_cidrs: Vec<IpNet>,
    pub api_key: Option<SecretString>,
    pub attempt_retention: Duration,
    pub delivery_retention: Duration,
    pub dead_retention: Duration,
    pub response_body_cap: usize,
    pub heartbeat_interval: Duration,
    pub db_pool_size: u32,
    pub database_timeout: Duration,
    /// `HOOKFLEET_CA_CERTIFICATES`, read and checked at load: trusted besides the public roots.
    pub ca_certificates: Vec<CertificateDer<'static>>,
}

/// Why the configuration was refused. Every message names the setting (or `HOOKFLEET_CONFIG`
/// and the file) and never contains a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting's value is malformed, out of range, or conflicts with another setting.
    #[error("invalid {env} (file key \"{key}\"): {problem}")]
    Invalid { env: &'static str, key: &'static str, problem: String },
    /// `HOOKFLEET_CONFIG` names a file that does not exist or cannot be read.
    #[error(
        "invalid HOOKFLEET_CONFIG: cannot read {}: {reason}; fix the path or unset HOOKFLEET_CONFIG",
        path.display()
    )]
    FileUnreadable { path: PathBuf, reason: String },
    /// The file is not valid TOML, or has a key that is not a setting.
    #[error("invalid HOOKFLEET_CONFIG file {}: {problem}", path.display())]
    FileInvalid { path: PathBuf, problem: String },
    /// An environment variable hookfleet reads is not valid UTF-8.
    #[error("invalid {env}: the value is not valid UTF-8")]
    NotUnicode { env: &'static str },
    /// The `config` crate refused to merge the layers (not expected: both layers are plain maps).
    #[error("could not merge the configuration layers: {0}")]
    Layering(String),
}

impl Config {
    /// Loads from the process environment and the optional `HOOKFLEET_CONFIG` file.
    pub fn load() -> Result<Config, ConfigError> {
        // Only the known names are read, so the rest of the environment (which may hold
        // unrelated secrets) never enters the configuration layers.
        let mut env = HashMap::new();
        for setting in &SETTINGS {
            if let Some(value) = std::env::var_os(setting.env) {
                let value = value.into_string().map_err(|_| ConfigError::NotUnicode { env: setting.env })?;
                env.insert(setting.env.to_owned(), value);
            }
        }
        Self::from_env_map(&env)
    }

    /// Loads from an explicit environment (keys are the environment names, e.g.
    /// `HOOKFLEET_LEASE`) plus the file it names in `HOOKFLEET_CONFIG`, if any. Names that are
    /// not settings are ignored; empty values count as unset.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let set =
            |setting: &SettingDoc| env.get(setting.env).map(|value| value.trim()).filter(|value| !value.is_empty());

        let file = match set(&CONFIG_FILE) {
            Some(path) => Some(read_file(Path::new(path))?),
            None => None,
        };

        // The environment layer, re-keyed to the file keys so both layers share one key space.
        let environment: config::Map<String, String> = SETTINGS
            .iter()
            .filter(|setting| !setting.key.is_empty())
            .filter_map(|setting| set(setting).map(|value| (setting.key.to_owned(), value.into())))
            .collect();

        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(file);
        }
        let layered = builder
            .add_source(config::Environment::default().source(Some(environment)))
            .build()
            .and_then(|layered| layered.try_deserialize::<HashMap<String, config::Value>>())
            .map_err(|error| ConfigError::Layering(error.to_string()))?;

        let reader = Reader { values: layered, consumed: RefCell::new(BTreeSet::from([CONFIG_FILE.env])) };
        Self::from_reader(&reader)
    }

    /// The settings table (environment name, file key, default, description) for every
    /// setting, `HOOKFLEET_CONFIG` included.
    pub fn settings() -> &'static [SettingDoc] {
        &SETTINGS
    }

    fn from_reader(reader: &Reader) -> Result<Config, ConfigError> {
        let http_timeout = reader
            .value(&HTTP_TIMEOUT, |text| duration_within(text, Minimum::AboveZero, Some(Duration::from_secs(300))))?;
        let lease =
            reader.value(&LEASE, |text| duration_within(text, Minimum::AtLeast(Duration::from_secs(1)), None))?;
        // A lease shorter than an attempt would let a second worker claim a row whose first
        // attempt is still running: duplicates without any crash.
        if lease <= http_timeout {
            return Err(invalid(
                &LEASE,
                format!(
                    "{} is not longer than HTTP_TIMEOUT ({}); a lease must outlast an attempt, \
                     so raise {} or lower HTTP_TIMEOUT",
                    show(lease),
                    show(http_timeout),
                    LEASE.env
                ),
            ));
        }
        let max_in_flight = reader.value(&MAX_IN_FLIGHT, |text| whole_number(text, 1, 10_000))?;
        let heartbeat_interval =
            reader.value(&HEARTBEAT_INTERVAL, |text| duration_within(text, Minimum::AboveZero, None))?;
        if heartbeat_interval >= lease {
            return Err(invalid(
                &HEARTBEAT_INTERVAL,
                format!(
                    "{} is not shorter than HOOKFLEET_LEASE ({}); lower it or raise HOOKFLEET_LEASE",
                    show(heartbeat_interval),
                    show(lease)
                ),
            ));
        }
        let retry_base = reader.value(&RETRY_BASE, |text| duration_within(text, Minimum::Zero, None))?;
        let retry_max = reader.value(&RETRY_MAX, |text| duration_within(text, Minimum::Zero, None))?;
        if retry_max < retry_base {
            return Err(invalid(
                &RETRY_MAX,
                format!(
                    "{} is less than HOOKFLEET_RETRY_BASE ({}); raise it or lower HOOKFLEET_RETRY_BASE",
                    show(retry_max),
                    show(retry_base)
                ),
            ));
        }

        Ok(Config {
            database_url: reader.secret(&DATABASE_URL)?,
            batch_size: reader.value(&BATCH_SIZE, |text| whole_number(text, 1, 1000))?,
            poll_interval: reader.value(&POLL_INTERVAL, |text| {
                duration_within(text, Minimum::AtLeast(Duration::from_millis(10)), None)
            })?,
            http_timeout,
            connect_timeout: reader.value(&CONNECT_TIMEOUT, |text| duration_within(text, Minimum::AboveZero, None))?,
            rate_limit_rps: reader.value(&RATE_LIMIT_RPS, positive_number)?,
            rate_limit_burst: reader.optional(&RATE_LIMIT_BURST, |text| whole_number(text, 1, u64::from(u32::MAX)))?,
            circuit_breaker_failure_threshold: reader
                .value(&BREAKER_THRESHOLD, |text| whole_number(text, 1, u64::from(u32::MAX)))?,
            circuit_breaker_timeout: reader
                .value(&BREAKER_TIMEOUT, |text| duration_within(text, Minimum::AboveZero, None))?,
            log_level: reader.value(&LOG_LEVEL, telemetry::check_directives)?,
            log_format: reader.value(&LOG_FORMAT, telemetry::parse_format)?,
            metrics_addr: reader.value(&METRICS_ADDR, socket_address)?,
            worker_id: match reader.optional(&WORKER_ID, worker_id)? {
                Some(worker_id) => worker_id,
                None => default_worker_id(),
            },
            max_body_bytes: reader.value(&MAX_BODY_BYTES, |text| whole_number(text, 1, 64 * 1024 * 1024))?,
            retry_base,
            retry_max,
            max_retries: reader.value(&MAX_RETRIES, |text| whole_number(text, 0, 100))?,
            lease,
            api_addr: reader.value(&API_ADDR, socket_address)?,
            encryption_key: reader.secret(&ENCRYPTION_KEY)?,
            previous_encryption_keys: reader.list(&PREVIOUS_ENCRYPTION_KEYS, |entry| Ok(SecretString::from(entry)))?,
            max_in_flight,
            max_in_flight_per_webhook: reader
                .optional(&MAX_IN_FLIGHT_PER_WEBHOOK, |text| whole_number(text, 1, 10_000))?
                .unwrap_or(max_in_flight.div_ceil(2))
                .min(max_in_flight),
            shutdown_grace: reader.value(&SHUTDOWN_GRACE, |text| duration_within(text, Minimum::Zero, None))?,
            allow_http: reader.value(&ALLOW_HTTP, boolean)?,
            allowed_cidrs: reader.list(&ALLOWED_CIDRS, network)?,
            api_key: reader.secret(&API_KEY)?,
            attempt_retention: reader
                .value(&ATTEMPT_RETENTION, |text| duration_within(text, Minimum::AboveZero, None))?,
            delivery_retention: reader
                .value(&DELIVERY_RETENTION, |text| duration_within(text, Minimum::AboveZero, None))?,
            dead_retention: reader.value(&DEAD_RETENTION, |text| duration_within(text, Minimum::AboveZero, None))?,
            response_body_cap: reader.value(&RESPONSE_BODY_CAP, |text| whole_number(text, 0, 16 * 1024 * 1024))?,
            heartbeat_interval,
            db_pool_size: reader.value(&DB_POOL_SIZE, |text| whole_number(text, 1, 256))?,
            database_timeout: reader.value(&DATABASE_TIMEOUT, |text| {
                duration_within(text, Minimum::AtLeast(Duration::from_secs(1)), Some(Duration::from_secs(300)))
            })?,
            ca_certificates: reader.optional(&CA_CERTIFICATES, ca_certificates)?.unwrap_or_default(),
        })
    }
}

/// Reads a PEM file of CA certificates and checks that each can anchor a chain, so that a wrong
/// file stops start-up here rather than every TLS delivery later.
fn ca_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let bytes = std::fs::read(path).map_err(|error| format!("cannot read {path:?}: {error}"))?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{path:?} is not a PEM file of certificates: {error}"))?;
    if certificates.is_empty() {
        return Err(format!("{path:?} holds no certificate (expected -----BEGIN CERTIFICATE----- blocks)"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (index, certificate) in certificates.iter().enumerate() {
        roots
            .add(certificate.clone())
            .map_err(|error| format!("certificate {} of {path:?} cannot be a trust anchor: {error}", index + 1))?;
    }
    Ok(certificates)
}

/// Parses a duration: a number of seconds (`1.5`, `2`) or a humantime string (`200ms`, `5s`,
/// `1h`, `1m 30s`). Negative, NaN and infinite values are refused. The error says what was
/// wrong and what is expected, and quotes the input (so don't pass secrets).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const EXPECTED: &str = "use seconds (1.5) or a unit (200ms, 5s, 1h)";
    let trimmed = text.trim();
    if let Ok(seconds) = trimmed.parse::<f64>() {
        if seconds.is_nan() || seconds.is_infinite() {
            return Err(format!("{text:?} is not a duration; {EXPECTED}"));
        }
        if seconds < 0.0 {
            return Err(format!("{text:?} is negative; {EXPECTED}"));
        }
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{text:?} is too long a duration; {EXPECTED}"));
    }
    humantime::parse_duration(trimmed).map_err(|_| format!("{text:?} is not a duration; {EXPECTED}"))
}

/// Reads settings out of the merged layers, falling back to the documented default, and
/// turns parse failures into [`ConfigError::Invalid`] naming the setting.
struct Reader {
    values: HashMap<String, config::Value>,
    /// Which settings the loader asked for: lets a test prove the loader reads exactly the
    /// settings in [`SETTINGS`], no more, no fewer.
    consumed: RefCell<BTreeSet<&'static str>>,
}

/// What a setting's merged value turned out to be, before parsing.
enum Raw {
    Unset,
    Text(String),
    List(Vec<String>),
}

impl Reader {
    fn raw(&self, setting: &'static SettingDoc) -> Result<Raw, ConfigError> {
        self.consumed.borrow_mut().insert(setting.env);
        let Some(value) = self.values.get(setting.key) else {
            return Ok(Raw::Unset);
        };
        match &value.kind {
            config::ValueKind::Array(items) => {
                let mut entries = Vec::with_capacity(items.len());
                for item in items {
                    if let Some(text) = scalar_text(&item.kind).map_err(|problem| invalid(setting, problem))? {
                        entries.push(text);
                    }
                }
                Ok(Raw::List(entries))
            }
            kind => match scalar_text(kind).map_err(|problem| invalid(setting, problem))? {
                Some(text) => Ok(Raw::Text(text)),
                None => Ok(Raw::Unset),
            },
        }
    }

    /// The value as one piece of text, `None` when unset (empty counts as unset).
    fn text(&self, setting: &'static SettingDoc) -> Result<Option<String>, ConfigError> {
        match self.raw(setting)? {
            Raw::Unset => Ok(None),
            Raw::Text(text) => Ok(Some(text)),
            Raw::List(_) => Err(invalid(setting, "expected one value, found a list".into())),
        }
    }

    /// A setting with a default: the set value or else the documented default, parsed.
    fn value<T>(
        &self,
        setting: &'static SettingDoc,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let text = self.text(setting)?;
        parse(text.as_deref().unwrap_or(setting.default)).map_err(|problem| invalid(setting, problem))
    }

    /// A setting without a default value.
    fn optional<T>(
        &self,
        setting: &'static SettingDoc,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.text(setting)? {
            Some(text) => parse(&text).map(Some).map_err(|problem| invalid(setting, problem)),
            None => Ok(None),
        }
    }

    /// A secret: taken as is, and never quoted in an error.
    fn secret(&self, setting: &'static SettingDoc) -> Result<Option<SecretString>, ConfigError> {
        Ok(self.text(setting)?.map(SecretString::from))
    }

    /// A comma-separated list in the environment, a comma-separated string or an array in the
    /// file. Blank entries are skipped, so a trailing comma is harmless.
    fn list<T>(
        &self,
        setting: &'static SettingDoc,
        parse_entry: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, ConfigError> {
        let entries = match self.raw(setting)? {
            Raw::Unset => Vec::new(),
            Raw::Text(text) => text.split(',').map(str::to_owned).collect(),
            Raw::List(items) => items,
        };
        entries
            .iter()
            .map(|entry| entry.trim())
            .filter(|entry| !entry.is_empty())
            .map(|entry| parse_entry(entry).map_err(|problem| invalid(setting, problem)))
            .collect()
    }
}

/// A file value or environment string as trimmed text; `None` for empty. The error never
/// includes the value, so it is safe for secrets.
fn scalar_text(kind: &config::ValueKind) -> Result<Option<String>, String> {
    use config::ValueKind;
    let text = match kind {
        ValueKind::Nil => return Ok(None),
        ValueKind::Boolean(value) => value.to_string(),
        ValueKind::I64(value) => value.to_string(),
        ValueKind::I128(value) => value.to_string(),
        ValueKind::U64(value) => value.to_string(),
        ValueKind::U128(value) => value.to_string(),
        ValueKind::Float(value) => value.to_string(),
        ValueKind::String(value) => value.trim().to_owned(),
        ValueKind::Table(_) => return Err("expected a value, found a table".into()),
        ValueKind::Array(_) => return Err("expected a value, found a nested list".into()),
    };
    Ok(Some(text).filter(|text| !text.is_empty()))
}

/// Reads and parses the `HOOKFLEET_CONFIG` file, refusing keys that are not settings (a typo
/// in a file key would otherwise silently leave the default in force).
fn read_file(path: &Path) -> Result<config::Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::FileUnreadable {
        path: path.to_owned(),
        reason: match error.kind() {
            std::io::ErrorKind::NotFound => "the file does not exist".into(),
            _ => error.to_string(),
        },
    })?;
    let file_invalid = |problem: String| ConfigError::FileInvalid { path: path.to_owned(), problem };
    let parsed = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .map_err(|error| file_invalid(toml_problem(&error.to_string())))?;
    let keys = parsed
        .clone()
        .try_deserialize::<HashMap<String, config::Value>>()
        .map_err(|error| file_invalid(toml_problem(&error.to_string())))?;
    let mut unknown: Vec<&String> = keys
        .keys()
        .filter(|key| key.is_empty() || !SETTINGS.iter().any(|setting| setting.key == key.as_str()))
        .collect();
    unknown.sort();
    if let Some(key) = unknown.first() {
        let known: Vec<&str> = SETTINGS.iter().map(|setting| setting.key).filter(|key| !key.is_empty()).collect();
        return Err(file_invalid(format!("unknown key {key:?}; the keys are: {}", known.join(", "))));
    }
    Ok(parsed)
}

/// The TOML parser's message without its source excerpt: the excerpt quotes the offending
/// line, which may hold a secret such as `database_url`. Line and column are kept.
fn toml_problem(message: &str) -> String {
    let kept: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.contains('|') && !line.starts_with('^'))
        .collect();
    if kept.is_empty() {
        "not valid TOML".into()
    } else {
        kept.join(": ")
    }
}

fn invalid(setting: &'static SettingDoc, problem: String) -> ConfigError {
    ConfigError::Invalid { env: setting.env, key: setting.key, problem }
}

fn show(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// The lower bound of a duration setting.
#[derive(Clone, Copy)]
enum Minimum {
    Zero,
    AboveZero,
    AtLeast(Duration),
}

fn duration_within(text: &str, minimum: Minimum, maximum: Option<Duration>) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    match minimum {
        Minimum::Zero => {}
        Minimum::AboveZero if duration.is_zero() => {
            return Err(format!("{text:?} is zero; expected more than 0"));
        }
        Minimum::AboveZero => {}
        Minimum::AtLeast(minimum) if duration < minimum => {
            return Err(format!("{text:?} is too short; expected at least {}", show(minimum)));
        }
        Minimum::AtLeast(_) => {}
    }
    match maximum {
        Some(maximum) if duration > maximum => Err(format!("{text:?} is too long; expected at most {}", show(maximum))),
        _ => Ok(duration),
    }
}

/// A whole number in `minimum..=maximum`, converted to the field's type.
fn whole_number<T: TryFrom<u64>>(text: &str, minimum: u64, maximum: u64) -> Result<T, String> {
    let expected = format!("expected a whole number from {minimum} to {maximum}");
    let number: u64 = text.parse().map_err(|_| format!("{text:?} is not a whole number; {expected}"))?;
    if !(minimum..=maximum).contains(&number) {
        return Err(format!("{number} is out of range; {expected}"));
    }
    // The callers' maxima fit their target types, so this only fails on a programming error;
    // it still reports rather than panics.
    T::try_from(number).map_err(|_| format!("{number} is out of range; {expected}"))
}

fn positive_number(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(number) if number.is_finite() && number > 0.0 => Ok(number),
        Ok(_) => Err(format!("{text:?} is out of range; expected a number above 0 (0.5, 10)")),
        Err(_) => Err(format!("{text:?} is not a number; expected a number above 0 (0.5, 10)")),
    }
}

fn boolean(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{text:?} is not a boolean; use true or false (or 1/0, yes/no)")),
    }
}

fn socket_address(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| format!("{text:?} is not an address; use IP:port, such as 0.0.0.0:9090 or [::]:9090"))
}

fn worker_id(text: &str) -> Result<String, String> {
    let length = text.chars().count();
    if length > 128 {
        return Err(format!("{text:?} has {length} characters; expected at most 128"));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{text:?} contains whitespace or control characters; expected none"));
    }
    Ok(text.to_owned())
}

/// `<hostname>-<pid>`: unique per live process on a host, and readable in `hookfleet.workers`.
fn default_worker_id() -> String {
    let pid = std::process::id().to_string();
    let host: String = hostname::get()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "hookfleet".into())
        .chars()
        .map(|c| if c.is_whitespace() || c.is_control() { '-' } else { c })
        // Long FQDNs are cut so the whole id stays within WORKER_ID's 128-character limit.
        .take(128 - 1 - pid.len())
        .collect();
    format!("{host}-{pid}")
}

/// An allowed network: CIDR notation, or a bare address meaning just that address.
fn network(entry: &str) -> Result<IpNet, String> {
    if let Ok(network) = entry.parse::<IpNet>() {
        // Canonical form (host bits cleared) so logs and comparisons show the real network.
        return Ok(network.trunc());
    }
    entry
        .parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("entry {entry:?} is not a network; use CIDR (10.0.0.0/8, ::1/128) or an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect()
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_env_map(&env(pairs))
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        match load(pairs) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn toml_file(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().expect("temp file");
        file.write_all(contents.as_bytes()).expect("write");
        file
    }

    fn path_of(file: &tempfile::NamedTempFile) -> String {
        file.path().to_str().expect("utf-8 path").to_owned()
    }

    #[test]
    fn defaults() {
        let config = load(&[]).expect("defaults are valid");
        assert!(config.database_url.is_none());
        assert_eq!(config.batch_size, 10);
        assert_eq!(config.poll_interval, Duration::from_secs(1));
        assert_eq!(config.http_timeout, Duration::from_secs(5));
        assert_eq!(config.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.rate_limit_rps, 10.0);
        assert_eq!(config.rate_limit_burst, None);
        assert_eq!(config.circuit_breaker_failure_threshold, 5);
        assert_eq!(config.circuit_breaker_timeout, Duration::from_secs(60));
        assert_eq!(config.log_level, "info");
        assert_eq!(config.log_format, LogFormat::Pretty);
        assert_eq!(config.metrics_addr, "0.0.0.0:9090".parse().unwrap());
        let pid = format!("-{}", std::process::id());
        assert!(config.worker_id.ends_with(&pid), "{}", config.worker_id);
        assert!(worker_id(&config.worker_id).is_ok());
        assert_eq!(config.max_body_bytes, 262_144);
        assert_eq!(config.retry_base, Duration::from_secs(5));
        assert_eq!(config.retry_max, Duration::from_secs(3600));
        assert_eq!(config.max_retries, 3);
        assert_eq!(config.lease, Duration::from_secs(60));
        assert_eq!(config.api_addr, "0.0.0.0:8080".parse().unwrap());
        assert!(config.encryption_key.is_none());
        assert!(config.previous_encryption_keys.is_empty());
        assert_eq!(config.max_in_flight, 64);
        assert_eq!(config.max_in_flight_per_webhook, 32);
        assert_eq!(config.shutdown_grace, Duration::from_secs(25));
        assert!(!config.allow_http);
        assert!(config.allowed_cidrs.is_empty());
        assert!(config.api_key.is_none());
        assert_eq!(config.attempt_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(config.delivery_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(config.dead_retention, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(config.response_body_cap, 65_536);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.db_pool_size, 8);
        assert_eq!(config.database_timeout, Duration::from_secs(30));
        assert!(config.ca_certificates.is_empty());
    }

    /// One non-default value for every setting except HOOKFLEET_CONFIG.
    const EVERY_SETTING: &[(&str, &str)] = &[
        ("DATABASE_URL", "postgres://app:hunter2@db/hookfleet"),
        ("BATCH_SIZE", "50"),
        ("POLL_INTERVAL", "250ms"),
        ("HTTP_TIMEOUT", "1.5"),
        ("HOOKFLEET_CONNECT_TIMEOUT", "500ms"),
        ("RATE_LIMIT_RPS", "2.5"),
        ("HOOKFLEET_RATE_LIMIT_BURST", "7"),
        ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "9"),
        ("CIRCUIT_BREAKER_TIMEOUT_SECONDS", "30"),
        ("LOG_LEVEL", "warn, hookfleet_core=debug"),
        ("LOG_FORMAT", "JSON"),
        ("METRICS_ADDR", "127.0.0.1:9191"),
        ("WORKER_ID", "worker-a"),
        ("HOOKFLEET_MAX_BODY_BYTES", "1024"),
        ("HOOKFLEET_RETRY_BASE", "1s"),
        ("HOOKFLEET_RETRY_MAX", "10m"),
        ("HOOKFLEET_MAX_RETRIES", "0"),
        ("HOOKFLEET_LEASE", "2m"),
        ("HOOKFLEET_API_ADDR", "[::1]:8181"),
        ("HOOKFLEET_ENCRYPTION_KEY", "current-key"),
        ("HOOKFLEET_PREVIOUS_ENCRYPTION_KEYS", "old-1, old-2,"),
        ("HOOKFLEET_DATABASE_TIMEOUT", "45s"),
        ("HOOKFLEET_MAX_IN_FLIGHT", "10000"),
        ("HOOKFLEET_MAX_IN_FLIGHT_PER_WEBHOOK", "300"),
        ("HOOKFLEET_SHUTDOWN_GRACE", "1m 30s"),
        ("HOOKFLEET_ALLOW_HTTP", "yes"),
        ("HOOKFLEET_ALLOWED_CIDRS", "127.0.0.0/8, ::1/128,10.1.2.3"),
        ("HOOKFLEET_API_KEY", "bootstrap-key"),
        ("HOOKFLEET_ATTEMPT_RETENTION", "1h"),
        ("HOOKFLEET_DELIVERY_RETENTION", "2h"),
        ("HOOKFLEET_DEAD_RETENTION", "3d"),
        ("HOOKFLEET_RESPONSE_BODY_CAP", "0"),
        ("HOOKFLEET_HEARTBEAT_INTERVAL", "10s"),
        ("HOOKFLEET_DB_POOL_SIZE", "256"),
        // A CA certificate only (its key was discarded when it was made).
        ("HOOKFLEET_CA_CERTIFICATES", concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/private-ca.pem")),
    ];

    #[test]
    fn every_setting_parsed_from_env_map() {
        let config = load(EVERY_SETTING).expect("valid");
        let secret = |value: &Option<SecretString>| value.as_ref().map(|s| s.expose_secret().to_owned());
        assert_eq!(secret(&config.database_url).as_deref(), Some("postgres://app:hunter2@db/hookfleet"));
        assert_eq!(config.batch_size, 50);
        assert_eq!(config.poll_interval, Duration::from_millis(250));
        assert_eq!(config.http_timeout, Duration::from_millis(1500));
        assert_eq!(config.connect_timeout, Duration::from_millis(500));
        assert_eq!(config.rate_limit_rps, 2.5);
        assert_eq!(config.rate_limit_burst, Some(7));
        assert_eq!(config.circuit_breaker_failure_threshold, 9);
        assert_eq!(config.circuit_breaker_timeout, Duration::from_secs(30));
        assert_eq!(config.log_level, "warn,hookfleet_core=debug");
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.metrics_addr, "127.0.0.1:9191".parse().unwrap());
        assert_eq!(config.worker_id, "worker-a");
        assert_eq!(config.max_body_bytes, 1024);
        assert_eq!(config.retry_base, Duration::from_secs(1));
        assert_eq!(config.retry_max, Duration::from_secs(600));
        assert_eq!(config.max_retries, 0);
        assert_eq!(config.lease, Duration::from_secs(120));
        assert_eq!(config.api_addr, "[::1]:8181".parse().unwrap());
        assert_eq!(secret(&config.encryption_key).as_deref(), Some("current-key"));
        let previous: Vec<&str> = config.previous_encryption_keys.iter().map(|key| key.expose_secret()).collect();
        assert_eq!(previous, ["old-1", "old-2"]);
        assert_eq!(config.max_in_flight, 10_000);
        assert_eq!(config.max_in_flight_per_webhook, 300);
        assert_eq!(config.shutdown_grace, Duration::from_secs(90));
        assert!(config.allow_http);
        let cidrs: Vec<String> = config.allowed_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, ["127.0.0.0/8", "::1/128", "10.1.2.3/32"]);
        assert_eq!(secret(&config.api_key).as_deref(), Some("bootstrap-key"));
        assert_eq!(config.attempt_retention, Duration::from_secs(3600));
        assert_eq!(config.delivery_retention, Duration::from_secs(7200));
        assert_eq!(config.dead_retention, Duration::from_secs(3 * 24 * 3600));
        assert_eq!(config.response_body_cap, 0);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(config.db_pool_size, 256);
        assert_eq!(config.database_timeout, Duration::from_secs(45));
        assert_eq!(config.ca_certificates.len(), 1);
    }

    #[test]
    fn every_setting_in_the_table_is_exercised_by_the_env_map_test() {
        let tested: BTreeSet<&str> = EVERY_SETTING.iter().map(|(name, _)| *name).collect();
        let documented: BTreeSet<&str> =
            SETTINGS.iter().map(|setting| setting.env).filter(|name| *name != CONFIG_FILE.env).collect();
        assert_eq!(tested, documented);
    }

    #[test]
    fn settings_have_distinct_names_and_keys() {
        let names: BTreeSet<&str> = SETTINGS.iter().map(|setting| setting.env).collect();
        assert_eq!(names.len(), SETTINGS.len(), "duplicate environment name");
        let keys: BTreeSet<&str> = SETTINGS.iter().map(|setting| setting.key).collect();
        assert_eq!(keys.len(), SETTINGS.len(), "duplicate file key");
        for setting in Config::settings() {
            assert!(!setting.description.is_empty(), "{} has no description", setting.env);
            if setting.env != CONFIG_FILE.env {
                // The file key is the environment name without the HOOKFLEET_ prefix, except
                // CIRCUIT_BREAKER_TIMEOUT_SECONDS, whose key drops the unit (it takes units).
                let expected = setting.env.trim_start_matches("HOOKFLEET_").to_lowercase();
                assert!(
                    setting.key == expected || setting.env == BREAKER_TIMEOUT.env,
                    "{} has key {}",
                    setting.env,
                    setting.key
                );
            }
        }
    }

    #[test]
    fn loader_reads_exactly_the_settings_in_the_table() {
        let reader = Reader { values: HashMap::new(), consumed: RefCell::new(BTreeSet::from([CONFIG_FILE.env])) };
        Config::from_reader(&reader).expect("defaults are valid");
        let documented: BTreeSet<&str> = SETTINGS.iter().map(|setting| setting.env).collect();
        assert_eq!(*reader.consumed.borrow(), documented);
    }

    #[test]
    fn documented_defaults_parse() {
        // Every non-empty default (except WORKER_ID's placeholder) is the exact text that is
        // parsed, so setting it explicitly must give the same config as leaving it unset.
        let explicit: Vec<(&str, &str)> = SETTINGS
            .iter()
            .filter(|setting| !setting.default.is_empty() && setting.env != WORKER_ID.env)
            .map(|setting| (setting.env, setting.default))
            .collect();
        let explicit = load(&explicit).expect("documented defaults are valid");
        let implicit = load(&[]).expect("defaults are valid");
        assert_eq!(format!("{explicit:?}"), format!("{implicit:?}"));
    }

    #[test]
    fn unknown_environment_names_are_ignored() {
        let config =
            load(&[("PATH", "/bin"), ("hookfleet_lease", "1"), ("LEASE", "1")]).expect("unknown names ignored");
        assert_eq!(config.lease, Duration::from_secs(60));
    }

    #[test]
    fn empty_env_values_count_as_unset() {
        let config = load(&[("BATCH_SIZE", ""), ("HOOKFLEET_LEASE", "   "), ("DATABASE_URL", ""), ("WORKER_ID", "")])
            .expect("empty = unset");
        assert_eq!(config.batch_size, 10);
        assert_eq!(config.lease, Duration::from_secs(60));
        assert!(config.database_url.is_none());
        assert!(!config.worker_id.is_empty());
    }

    #[test]
    fn durations_in_both_forms() {
        for (text, expected) in [
            ("1.5", Duration::from_millis(1500)),
            ("2", Duration::from_secs(2)),
            ("0", Duration::ZERO),
            ("0.01", Duration::from_millis(10)),
            ("200ms", Duration::from_millis(200)),
            ("5s", Duration::from_secs(5)),
            ("1h", Duration::from_secs(3600)),
            ("1m 30s", Duration::from_secs(90)),
            (" 7d ", Duration::from_secs(7 * 86_400)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn refused_durations() {
        for text in ["", "abc", "-1", "-0.5", "NaN", "inf", "-5s", "5 parsecs", "1e400", "5s-"] {
            let problem = parse_duration(text).expect_err(text);
            assert!(problem.contains(&format!("{text:?}")), "{problem}");
            assert!(problem.contains("use seconds (1.5) or a unit (200ms, 5s, 1h)"), "{problem}");
        }
    }

    #[test]
    fn duration_error_names_setting_key_value_and_form() {
        assert_eq!(
            error(&[("HOOKFLEET_LEASE", "abc")]),
            "invalid HOOKFLEET_LEASE (file key \"lease\"): \"abc\" is not a duration; \
             use seconds (1.5) or a unit (200ms, 5s, 1h)"
        );
    }

    #[test]
    fn duration_bounds() {
        assert!(error(&[("POLL_INTERVAL", "5ms")]).contains("POLL_INTERVAL"));
        assert!(load(&[("POLL_INTERVAL", "10ms")]).is_ok());
        assert!(error(&[("HTTP_TIMEOUT", "0")]).contains("HTTP_TIMEOUT"));
        assert!(error(&[("HTTP_TIMEOUT", "301"), ("HOOKFLEET_LEASE", "1h")]).contains("expected at most 5m"));
        assert!(error(&[("HOOKFLEET_CONNECT_TIMEOUT", "0s")]).contains("HOOKFLEET_CONNECT_TIMEOUT"));
        assert!(error(&[("CIRCUIT_BREAKER_TIMEOUT_SECONDS", "0")]).contains("CIRCUIT_BREAKER_TIMEOUT_SECONDS"));
        assert!(error(&[("HOOKFLEET_ATTEMPT_RETENTION", "0")]).contains("HOOKFLEET_ATTEMPT_RETENTION"));
        assert!(error(&[("HOOKFLEET_LEASE", "0.5"), ("HTTP_TIMEOUT", "0.1")]).contains("expected at least 1s"));
        let config =
            load(&[("CIRCUIT_BREAKER_TIMEOUT_SECONDS", "90s"), ("HOOKFLEET_SHUTDOWN_GRACE", "0")]).expect("valid");
        assert_eq!(config.circuit_breaker_timeout, Duration::from_secs(90));
        assert_eq!(config.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn number_bounds_and_errors() {
        for (name, bad) in [
            ("BATCH_SIZE", "0"),
            ("BATCH_SIZE", "1001"),
            ("BATCH_SIZE", "ten"),
            ("BATCH_SIZE", "-1"),
            ("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "0"),
            ("HOOKFLEET_RATE_LIMIT_BURST", "0"),
            ("HOOKFLEET_MAX_BODY_BYTES", "67108865"),
            ("HOOKFLEET_MAX_RETRIES", "101"),
            ("HOOKFLEET_MAX_IN_FLIGHT", "10001"),
            ("HOOKFLEET_MAX_IN_FLIGHT_PER_WEBHOOK", "0"),
            ("HOOKFLEET_RESPONSE_BODY_CAP", "16777217"),
            ("HOOKFLEET_DB_POOL_SIZE", "257"),
            ("RATE_LIMIT_RPS", "0"),
            ("RATE_LIMIT_RPS", "-2"),
            ("RATE_LIMIT_RPS", "NaN"),
            ("RATE_LIMIT_RPS", "fast"),
        ] {
            let message = error(&[(name, bad)]);
            assert!(message.starts_with(&format!("invalid {name} (file key ")), "{message}");
            assert!(message.contains(bad), "{message}");
        }
        assert_eq!(
            error(&[("BATCH_SIZE", "1001")]),
            "invalid BATCH_SIZE (file key \"batch_size\"): 1001 is out of range; \
             expected a whole number from 1 to 1000"
        );
        let config = load(&[("HOOKFLEET_MAX_BODY_BYTES", "67108864"), ("BATCH_SIZE", "1")]).expect("valid");
        assert_eq!(config.max_body_bytes, 64 * 1024 * 1024);
        assert_eq!(config.batch_size, 1);
    }

    #[test]
    fn booleans() {
        for (text, expected) in [
            ("true", true),
            ("TRUE", true),
            ("1", true),
            ("yes", true),
            ("Yes", true),
            ("false", false),
            ("0", false),
            ("no", false),
            ("False", false),
        ] {
            let config = load(&[("HOOKFLEET_ALLOW_HTTP", text)]).expect(text);
            assert_eq!(config.allow_http, expected, "{text}");
        }
        let message = error(&[("HOOKFLEET_ALLOW_HTTP", "maybe")]);
        assert!(message.contains("HOOKFLEET_ALLOW_HTTP") && message.contains("\"maybe\""), "{message}");
    }

    #[test]
    fn cidr_lists() {
        let config = load(&[("HOOKFLEET_ALLOWED_CIDRS", "127.0.0.0/8,::1/128")]).expect("valid");
        let cidrs: Vec<String> = config.allowed_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, ["127.0.0.0/8", "::1/128"]);

        let config = load(&[("HOOKFLEET_ALLOWED_CIDRS", "::1, 192.168.1.7/16")]).expect("valid");
        let cidrs: Vec<String> = config.allowed_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, ["::1/128", "192.168.0.0/16"]);

        let message = error(&[("HOOKFLEET_ALLOWED_CIDRS", "10.0.0.0/8,10.0.0.0/33,::1")]);
        assert!(message.starts_with("invalid HOOKFLEET_ALLOWED_CIDRS"), "{message}");
        assert!(message.contains("\"10.0.0.0/33\""), "{message}");
        assert!(error(&[("HOOKFLEET_ALLOWED_CIDRS", "localhost")]).contains("\"localhost\""));
    }

    #[test]
    fn addresses_formats_levels_and_worker_ids() {
        let message = error(&[("METRICS_ADDR", "localhost:9090")]);
        assert!(message.contains("METRICS_ADDR") && message.contains("IP:port"), "{message}");
        assert!(error(&[("HOOKFLEET_API_ADDR", "8080")]).contains("HOOKFLEET_API_ADDR"));
        assert!(error(&[("LOG_FORMAT", "xml")]).contains("use json or pretty"));
        assert!(error(&[("LOG_LEVEL", "verbose")]).contains("LOG_LEVEL"));
        assert!(error(&[("LOG_LEVEL", "hookfleet=loud")]).contains("LOG_LEVEL"));
        assert!(load(&[("LOG_LEVEL", "debug,tokio_postgres=warn")]).is_ok());
        assert!(error(&[("WORKER_ID", "worker a")]).contains("WORKER_ID"));
        assert!(error(&[("WORKER_ID", &"w".repeat(129))]).contains("at most 128"));
        assert!(load(&[("WORKER_ID", &"w".repeat(128))]).is_ok());
    }

    #[test]
    fn cross_field_checks() {
        let message = error(&[("HOOKFLEET_RETRY_BASE", "10s"), ("HOOKFLEET_RETRY_MAX", "5s")]);
        assert!(message.starts_with("invalid HOOKFLEET_RETRY_MAX"), "{message}");
        assert!(message.contains("HOOKFLEET_RETRY_BASE (10s)"), "{message}");
        assert!(load(&[("HOOKFLEET_RETRY_BASE", "5s"), ("HOOKFLEET_RETRY_MAX", "5s")]).is_ok());

        let message = error(&[("HOOKFLEET_LEASE", "5s"), ("HTTP_TIMEOUT", "5s")]);
        assert!(message.starts_with("invalid HOOKFLEET_LEASE"), "{message}");
        assert!(message.contains("HTTP_TIMEOUT (5s)"), "{message}");
        assert!(
            load(&[("HOOKFLEET_LEASE", "6s"), ("HTTP_TIMEOUT", "5s"), ("HOOKFLEET_HEARTBEAT_INTERVAL", "1s")]).is_ok()
        );

        let message = error(&[("HOOKFLEET_LEASE", "6s"), ("HOOKFLEET_HEARTBEAT_INTERVAL", "6s")]);
        assert!(message.starts_with("invalid HOOKFLEET_HEARTBEAT_INTERVAL"), "{message}");

        // connect_timeout is clamped at use, not checked against http_timeout.
        assert!(load(&[("HOOKFLEET_CONNECT_TIMEOUT", "30s")]).is_ok());
    }

    #[test]
    fn file_layering() {
        let file = toml_file(
            r#"
            lease = "90s"
            batch_size = 20
            http_timeout = 2.5
            allow_http = true
            allowed_cidrs = ["127.0.0.0/8", "::1"]
            previous_encryption_keys = "a,b"
            database_url = "postgres://file/db"
            circuit_breaker_timeout = "2m"
            "#,
        );
        let path = path_of(&file);

        // The file overrides defaults.
        let config = load(&[("HOOKFLEET_CONFIG", &path)]).expect("valid");
        assert_eq!(config.lease, Duration::from_secs(90));
        assert_eq!(config.batch_size, 20);
        assert_eq!(config.http_timeout, Duration::from_millis(2500));
        assert!(config.allow_http);
        assert_eq!(config.allowed_cidrs.len(), 2);
        assert_eq!(config.previous_encryption_keys.len(), 2);
        assert_eq!(config.circuit_breaker_timeout, Duration::from_secs(120));
        assert_eq!(config.database_url.as_ref().map(|url| url.expose_secret()), Some("postgres://file/db"));
        assert_eq!(config.poll_interval, Duration::from_secs(1), "default kept");

        // The environment overrides the file; an empty env value does not.
        let config = load(&[
            ("HOOKFLEET_CONFIG", &path),
            ("HOOKFLEET_LEASE", "2m"),
            ("HOOKFLEET_ALLOWED_CIDRS", "10.0.0.0/8"),
            ("BATCH_SIZE", ""),
        ])
        .expect("valid");
        assert_eq!(config.lease, Duration::from_secs(120));
        assert_eq!(config.allowed_cidrs.len(), 1);
        assert_eq!(config.batch_size, 20);
    }

    #[test]
    fn file_errors_name_the_file_key() {
        let file = toml_file("lease = \"forever\"\n");
        let message = error(&[("HOOKFLEET_CONFIG", &path_of(&file))]);
        assert!(message.starts_with("invalid HOOKFLEET_LEASE (file key \"lease\")"), "{message}");

        let file = toml_file("[lease]\nseconds = 5\n");
        let message = error(&[("HOOKFLEET_CONFIG", &path_of(&file))]);
        assert!(message.contains("HOOKFLEET_LEASE") && message.contains("table"), "{message}");
    }

    #[test]
    fn missing_file() {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("absent.toml");
        let path = path.to_str().expect("utf-8");
        let message = error(&[("HOOKFLEET_CONFIG", path)]);
        assert!(message.contains("HOOKFLEET_CONFIG"), "{message}");
        assert!(message.contains(path), "{message}");
        assert!(message.contains("does not exist"), "{message}");
    }

    #[test]
    fn invalid_file() {
        let file = toml_file("batch_size = 10\ndatabase_url = \"postgres://app:hunter2@db\n");
        let path = path_of(&file);
        let message = error(&[("HOOKFLEET_CONFIG", &path)]);
        assert!(message.contains("HOOKFLEET_CONFIG") && message.contains(&path), "{message}");
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains("hunter2"), "secret leaked: {message}");
    }

    #[test]
    fn unknown_file_key() {
        let file = toml_file("leese = \"60s\"\n");
        let path = path_of(&file);
        let message = error(&[("HOOKFLEET_CONFIG", &path)]);
        assert!(message.contains(&path) && message.contains("\"leese\""), "{message}");
        assert!(message.contains("lease"), "{message}");
    }

    #[test]
    fn secrets_absent_from_errors_and_debug() {
        let config = load(EVERY_SETTING).expect("valid");
        let debug = format!("{config:?}");
        for secret in ["hunter2", "current-key", "old-1", "old-2", "bootstrap-key"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }

        // A secret in a list or a table position is refused without being quoted.
        let file = toml_file("api_key = [\"s3cr3t-in-list\"]\nencryption_key = { v = \"s3cr3t-in-table\" }\n");
        let message = error(&[("HOOKFLEET_CONFIG", &path_of(&file))]);
        assert!(!message.contains("s3cr3t"), "{message}");
        let file = toml_file("encryption_key = { v = \"s3cr3t-in-table\" }\n");
        let message = error(&[("HOOKFLEET_CONFIG", &path_of(&file))]);
        assert!(message.contains("HOOKFLEET_ENCRYPTION_KEY") && !message.contains("s3cr3t"), "{message}");

        // An error in another setting does not drag secrets along.
        let mut pairs = EVERY_SETTING.to_vec();
        pairs.push(("BATCH_SIZE", "0"));
        let message = error(&pairs);
        for secret in ["hunter2", "current-key", "old-1", "bootstrap-key"] {
            assert!(!message.contains(secret), "{message}");
        }
    }

    #[test]
    fn ca_certificates_are_read_and_checked_at_load() {
        let directory = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, contents: &[u8]| {
            let path = directory.path().join(name);
            std::fs::write(&path, contents).expect("write");
            path.to_string_lossy().into_owned()
        };
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("ca");
        let second =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("params").self_signed(&key).expect("second");

        let two = write("two.pem", format!("{}\n{}", ca.pem(), second.pem()).as_bytes());
        let config = load(&[("HOOKFLEET_CA_CERTIFICATES", &two)]).expect("valid");
        assert_eq!(config.ca_certificates, vec![ca.der().clone(), second.der().clone()]);
        assert!(load(&[]).expect("defaults").ca_certificates.is_empty());

        let missing = directory.path().join("absent.pem").to_string_lossy().into_owned();
        let empty = write("empty.pem", b"no certificates here\n");
        let key_only = write("key.pem", key.serialize_pem().as_bytes());
        let broken = write("broken.pem", b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
        let not_der = write("garbage.pem", b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n");
        for (path, expected) in [
            (&missing, "cannot read"),
            (&empty, "holds no certificate"),
            (&key_only, "holds no certificate"),
            (&broken, "is not a PEM file of certificates"),
            (&not_der, "cannot be a trust anchor"),
        ] {
            let message = error(&[("HOOKFLEET_CA_CERTIFICATES", path)]);
            assert!(
                message.starts_with("invalid HOOKFLEET_CA_CERTIFICATES (file key \"ca_certificates\"): "),
                "{message}"
            );
            assert!(message.contains(expected), "{path}: {message}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_duration_round_trips_whole_seconds(seconds in 0u64..=10_000_000_000) {
            proptest::prop_assert_eq!(parse_duration(&seconds.to_string()), Ok(Duration::from_secs(seconds)));
            proptest::prop_assert_eq!(parse_duration(&format!("{seconds}s")), Ok(Duration::from_secs(seconds)));
        }

        #[test]
        fn parse_duration_round_trips_fractional_seconds(millis in 0u64..=10_000_000_000) {
            let text = format!("{}.{:03}", millis / 1000, millis % 1000);
            let parsed = parse_duration(&text).map_err(proptest::test_runner::TestCaseError::fail)?;
            let expected = Duration::from_millis(millis);
            let difference = parsed.abs_diff(expected);
            proptest::prop_assert!(difference <= Duration::from_micros(1), "{text} -> {parsed:?}");
        }

        #[test]
        fn parse_duration_round_trips_humantime_format(nanos in 0u64..=u64::MAX / 2) {
            let duration = Duration::from_nanos(nanos);
            proptest::prop_assert_eq!(parse_duration(&show(duration)), Ok(duration));
        }
    }
}
