//! hookfleet-core: everything the binaries share. The binaries only parse configuration, set
//! up telemetry and wire these pieces together.
//!
//! Module map (one decision per module):
//! - `config`      — which settings exist, their defaults, how they layer and validate.
//! - `telemetry`   — how logs are formatted and filtered (`LOG_FORMAT`, `LOG_LEVEL`).
//! - `db`          — how we connect (pool) and how the schema is migrated.
//! - `definitions` — the one current definition of each SQL function and view, applied by migrate.
//! - `schema`      — whether this binary may run against a database's schema (the start-up check).
//! - `queue`       — the only code that reads or writes the queue tables: claim, complete, release, rescue.
//! - `webhooks`    — creating, listing and loading webhooks (URL and secrets encrypted at rest).
//! - `api_keys`    — the HTTP API's keys: their form, stored as SHA-256 hashes, scopes, revocation.
//! - `crypto`      — encryption at rest (AES-256-GCM, key ids for rotation).
//! - `signing`     — Standard Webhooks signatures and the simpler `X-Webhook-Signature`.
//! - `delivery`    — the HTTP client: timeouts, body caps, no redirects, the SSRF address guard.
//! - `retry`       — what is retryable and when the next attempt happens.
//! - `metrics`     — the Prometheus registry and the `/metrics`, `/healthz`, `/readyz` endpoints.
//! - `worker`      — the worker engine: claim loop, attempts, batched write-back, maintenance services.
//! - `demo`        — `hookfleet demo`: the whole system on one machine.
//! - `pg_embedded` — a throwaway PostgreSQL from the machine's server binaries (tests, demo, bench).

pub mod api_keys;
pub mod config;
pub mod crypto;
pub mod db;
pub mod definitions;
pub mod delivery;
pub mod demo;
#[cfg(any(test, feature = "loopback-tls"))]
pub mod loopback_tls;
pub mod metrics;
pub mod pg_embedded;
pub mod queue;
pub mod retry;
pub mod schema;
pub mod signing;
pub mod telemetry;
pub mod webhooks;
pub mod worker;

/// The version every binary reports (`User-Agent`, `hookfleet_build_info`, `hookfleet.workers`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
