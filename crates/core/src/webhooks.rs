//! Webhooks: creating and listing them (URL and signing secrets encrypted at rest, bound to their
//! row by AAD), and loading the decrypted delivery target a worker needs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};

use crate::crypto::Keyring;
use crate::db::DbError;
use crate::delivery::DeliveryClient;
use crate::signing::SigningSecret;

const LOAD_WEBHOOKS: &str = include_str!("../../../sql/queries/load_webhooks.sql");
const MAX_EVENT_TYPES: usize = 100;

/// Longest webhook name, in characters: the `webhooks_name_length` check in
/// `sql/migrations/V0001__schema.sql`, which a default name must meet as well as a given one.
pub const MAX_NAME_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid webhook: {0}")]
    Invalid(String),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("cannot decrypt webhook {webhook_id}: {message}")]
    Decrypt { webhook_id: i64, message: String },
    #[error("webhook {0} does not exist")]
    NotFound(i64),
}

impl From<tokio_postgres::Error> for WebhookError {
    fn from(error: tokio_postgres::Error) -> Self {
        WebhookError::Database(DbError::Postgres(error))
    }
}

impl From<deadpool_postgres::PoolError> for WebhookError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        WebhookError::Database(DbError::Checkout(error))
    }
}

/// What a caller supplies to create a webhook; `None` fields fall back to configured defaults.
#[derive(Debug, Clone, Default)]
pub struct NewWebhook {
    pub name: Option<String>,
    pub url: String,
    /// `whsec_...`; generated when absent.
    pub secret: Option<String>,
    pub event_types: Vec<String>,
    pub rate_limit_rps: Option<f64>,
    pub rate_limit_burst: Option<u32>,
    pub max_retries: Option<u32>,
    pub timeout_ms: Option<u32>,
    pub max_in_flight: Option<u32>,
    /// Consecutive failures that open this webhook's circuit (else `CIRCUIT_BREAKER_FAILURE_THRESHOLD`).
    pub circuit_breaker_failure_threshold: Option<u32>,
    /// How long its circuit stays open (else `CIRCUIT_BREAKER_TIMEOUT_SECONDS`).
    pub circuit_breaker_timeout: Option<Duration>,
    pub enabled: bool,
}

/// A webhook as users see it (SPEC §9); `secret` only in the answer to create.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WebhookView {
    pub webhook_id: i64,
    pub name: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub rate_limit_rps: Option<f64>,
    pub rate_limit_burst: Option<u32>,
    pub max_retries: Option<u32>,
    pub timeout_ms: Option<u32>,
    pub max_in_flight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub circuit_breaker_failure_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub circuit_breaker_timeout_seconds: Option<f64>,
    pub enabled: bool,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secret: Option<String>,
}

/// What a worker needs to deliver to one webhook, decrypted.
pub struct WebhookTarget {
    pub webhook_id: i64,
    pub version: i64,
    pub url: String,
    /// Current secret first; older ones still inside their rotation window follow, with the unix
    /// second at which each stops signing. A target stays cached until its webhook changes, so
    /// the expiry is checked at each attempt ([`WebhookTarget::signing_secrets`]), not at load.
    pub secrets: Vec<(SigningSecret, Option<i64>)>,
    pub timeout: Option<Duration>,
    pub max_retries: Option<u32>,
    pub enabled: bool,
}

impl WebhookTarget {
    /// The secrets that sign a request made at `now` (unix seconds): the current one and every
    /// rotated-out one that has not expired yet.
    pub fn signing_secrets(&self, now: i64) -> impl Iterator<Item = &SigningSecret> {
        self.secrets
            .iter()
            .filter(move |(_, expires_at)| expires_at.is_none_or(|expires_at| expires_at > now))
            .map(|(secret, _)| secret)
    }
}

/// Longest a rotated-out secret may keep signing beside the new one (SPEC §9).
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The signing secrets as stored (inside the ciphertext).
#[derive(Serialize, Deserialize)]
struct StoredSecret {
    secret: String,
    /// Unix seconds after which an old secret is no longer used; `None` for the current one.
    expires_at: Option<i64>,
}

fn url_aad(webhook_id: i64) -> Vec<u8> {
    format!("hookfleet.webhooks:{webhook_id}:url").into_bytes()
}

fn secrets_aad(webhook_id: i64) -> Vec<u8> {
    format!("hookfleet.webhooks:{webhook_id}:secrets").into_bytes()
}

#[derive(Clone)]
pub struct WebhookStore {
    pool: Pool,
    keyring: Arc<Keyring>,
}

impl WebhookStore {
    pub fn new(pool: Pool, keyring: Arc<Keyring>) -> Self {
        Self { pool, keyring }
    }

    /// Validates and stores a new webhook. `client` checks the URL against the address policy, so
    /// a URL that could never be delivered is refused now rather than dead later.
    pub async fn create(&self, new: NewWebhook, client: &DeliveryClient) -> Result<WebhookView, WebhookError> {
        let url =
            client.check_url(&new.url).map_err(|error| WebhookError::Invalid(format!("url: {}", error.message)))?;
        validate(&new)?;
        let secret = match &new.secret {
            Some(text) => {
                SigningSecret::parse(text).map_err(|error| WebhookError::Invalid(format!("secret: {error}")))?
            }
            None => SigningSecret::generate(),
        };
        let name = match &new.name {
            Some(name) => name.clone(),
            // A hostname may be up to 253 bytes (`check_url` allows no more); the name column
            // allows 200 characters, so a long host is cut rather than refused by the database.
            None => url.host_str().unwrap_or("webhook").chars().take(MAX_NAME_CHARS).collect(),
        };
        let stored = vec![StoredSecret { secret: secret.to_whsec(), expires_at: None }];
        let secrets_json = serde_json::to_vec(&stored).map_err(|error| WebhookError::Invalid(error.to_string()))?;

        let client = self.pool.get().await?;
        // The id is taken first because it is part of the ciphertexts' AAD.
        let row =
            client.query_one("SELECT nextval(pg_get_serial_sequence('hookfleet.webhooks', 'webhook_id'))", &[]).await?;
        let webhook_id: i64 = row.try_get(0)?;
        let url_encrypted = self.keyring.encrypt(url.as_str().as_bytes(), &url_aad(webhook_id));
        let secrets_encrypted = self.keyring.encrypt(&secrets_json, &secrets_aad(webhook_id));
        let row = client
            .query_one(
                "INSERT INTO hookfleet.webhooks (webhook_id, name, url_encrypted, secrets_encrypted, encryption_key_id, \
                 event_types, rate_limit_rps, rate_limit_burst, max_retries, timeout_ms, max_in_flight, enabled, \
                 circuit_breaker_failure_threshold, circuit_breaker_timeout_seconds) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING created_at",
                &[
                    &webhook_id,
                    &name,
                    &url_encrypted,
                    &secrets_encrypted,
                    &self.keyring.current_key_id(),
                    &new.event_types,
                    &new.rate_limit_rps,
                    &new.rate_limit_burst.map(to_i32),
                    &new.max_retries.map(to_i32),
                    &new.timeout_ms.map(to_i32),
                    &new.max_in_flight.map(to_i32),
                    &new.enabled,
                    &new.circuit_breaker_failure_threshold.map(to_i32),
                    &new.circuit_breaker_timeout.map(|timeout| timeout.as_secs_f64()),
                ],
            )
            .await?;
        let created_at: SystemTime = row.try_get(0)?;
        Ok(WebhookView {
            webhook_id,
            name,
            url: url.to_string(),
            event_types: new.event_types,
            rate_limit_rps: new.rate_limit_rps,
            rate_limit_burst: new.rate_limit_burst,
            max_retries: new.max_retries,
            timeout_ms: new.timeout_ms,
            max_in_flight: new.max_in_flight,
            circuit_breaker_failure_threshold: new.circuit_breaker_failure_threshold,
            circuit_breaker_timeout_seconds: new.circuit_breaker_timeout.map(|timeout| timeout.as_secs_f64()),
            enabled: new.enabled,
            created_at: humantime::format_rfc3339_seconds(created_at).to_string(),
            secret: Some(secret.to_whsec()),
        })
    }

    /// Every webhook, URL decrypted, secrets left out.
    pub async fn list(&self) -> Result<Vec<WebhookView>, WebhookError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT webhook_id, name, url_encrypted, event_types, rate_limit_rps, rate_limit_burst, max_retries, \
                 timeout_ms, max_in_flight, enabled, created_at, circuit_breaker_failure_threshold, \
                 circuit_breaker_timeout_seconds FROM hookfleet.webhooks ORDER BY webhook_id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let webhook_id: i64 = row.try_get(0)?;
                let url = self.decrypt_text(webhook_id, row.try_get(2)?, &url_aad(webhook_id))?;
                let created_at: SystemTime = row.try_get(10)?;
                Ok(WebhookView {
                    webhook_id,
                    name: row.try_get(1)?,
                    url,
                    event_types: row.try_get(3)?,
                    rate_limit_rps: row.try_get(4)?,
                    rate_limit_burst: row.try_get::<_, Option<i32>>(5)?.map(to_u32),
                    max_retries: row.try_get::<_, Option<i32>>(6)?.map(to_u32),
                    timeout_ms: row.try_get::<_, Option<i32>>(7)?.map(to_u32),
                    max_in_flight: row.try_get::<_, Option<i32>>(8)?.map(to_u32),
                    circuit_breaker_failure_threshold: row.try_get::<_, Option<i32>>(11)?.map(to_u32),
                    circuit_breaker_timeout_seconds: row.try_get(12)?,
                    enabled: row.try_get(9)?,
                    created_at: humantime::format_rfc3339_seconds(created_at).to_string(),
                    secret: None,
                })
            })
            .collect()
    }

    /// Decrypted delivery targets for the given webhooks. A webhook that cannot be decrypted maps
    /// to an error message (its deliveries fail with that reason); a deleted one is absent.
    pub async fn load_targets(
        &self,
        webhook_ids: &[i64],
    ) -> Result<HashMap<i64, Result<Arc<WebhookTarget>, String>>, WebhookError> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(LOAD_WEBHOOKS).await?;
        let rows = client.query(&statement, &[&webhook_ids]).await?;
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let mut targets = HashMap::with_capacity(rows.len());
        for row in rows {
            let webhook_id: i64 = row.try_get(0)?;
            let target = self.decrypt_target(&row, webhook_id, now).map(Arc::new).map_err(|error| error.to_string());
            targets.insert(webhook_id, target);
        }
        Ok(targets)
    }

    fn decrypt_target(
        &self,
        row: &tokio_postgres::Row,
        webhook_id: i64,
        now: i64,
    ) -> Result<WebhookTarget, WebhookError> {
        let url = self.decrypt_text(webhook_id, row.try_get(2)?, &url_aad(webhook_id))?;
        let secrets_json = self.decrypt_text(webhook_id, row.try_get(3)?, &secrets_aad(webhook_id))?;
        let stored: Vec<StoredSecret> = serde_json::from_str(&secrets_json)
            .map_err(|error| WebhookError::Decrypt { webhook_id, message: format!("malformed secrets: {error}") })?;
        let secrets = stored
            .iter()
            .filter(|secret| secret.expires_at.is_none_or(|expires_at| expires_at > now))
            .map(|secret| SigningSecret::parse(&secret.secret).map(|parsed| (parsed, secret.expires_at)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| WebhookError::Decrypt { webhook_id, message: error.to_string() })?;
        if secrets.is_empty() {
            return Err(WebhookError::Decrypt { webhook_id, message: "no signing secret".into() });
        }
        Ok(WebhookTarget {
            webhook_id,
            version: row.try_get(1)?,
            url,
            secrets,
            timeout: row.try_get::<_, Option<i32>>(4)?.map(|ms| Duration::from_millis(u64::from(to_u32(ms)))),
            max_retries: row.try_get::<_, Option<i32>>(5)?.map(to_u32),
            enabled: row.try_get(6)?,
        })
    }

    /// Rotates a webhook's signing secret: `new_secret` (generated when `None`) signs from now on,
    /// and the secret it replaces keeps signing beside it for `expire_after` (at most
    /// [`MAX_ROTATION_GRACE`]); secrets already expired are dropped. The change bumps the
    /// webhook's version, so running workers pick it up with their next claim. Answers the new
    /// secret (`whsec_…`).
    pub async fn rotate_secret(
        &self,
        webhook_id: i64,
        expire_after: Duration,
        new_secret: Option<&str>,
    ) -> Result<String, WebhookError> {
        if expire_after > MAX_ROTATION_GRACE {
            return Err(WebhookError::Invalid(format!(
                "expire_after: at most {} seconds (7 days), got {}",
                MAX_ROTATION_GRACE.as_secs(),
                expire_after.as_secs_f64()
            )));
        }
        let secret = match new_secret {
            Some(text) => {
                SigningSecret::parse(text).map_err(|error| WebhookError::Invalid(format!("secret: {error}")))?
            }
            None => SigningSecret::generate(),
        };
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        let row = transaction
            .query_opt(
                "SELECT secrets_encrypted, extract(epoch FROM now())::float8 FROM hookfleet.webhooks                  WHERE webhook_id = $1 FOR NO KEY UPDATE",
                &[&webhook_id],
            )
            .await?
            .ok_or(WebhookError::NotFound(webhook_id))?;
        let now: f64 = row.try_get(1)?;
        let now = now.floor() as i64;
        let stored_json = self.decrypt_text(webhook_id, row.try_get(0)?, &secrets_aad(webhook_id))?;
        let stored: Vec<StoredSecret> = serde_json::from_str(&stored_json)
            .map_err(|error| WebhookError::Decrypt { webhook_id, message: format!("malformed secrets: {error}") })?;
        let until = now + i64::try_from(expire_after.as_secs()).unwrap_or(i64::MAX);
        let mut rotated = vec![StoredSecret { secret: secret.to_whsec(), expires_at: None }];
        rotated.extend(stored.into_iter().filter_map(|old| match old.expires_at {
            // The one that was current until now.
            None => Some(StoredSecret { secret: old.secret, expires_at: Some(until) }),
            Some(expires_at) if expires_at > now => Some(old),
            Some(_) => None,
        }));
        let json = serde_json::to_vec(&rotated).map_err(|error| WebhookError::Invalid(error.to_string()))?;
        let encrypted = self.keyring.encrypt(&json, &secrets_aad(webhook_id));
        transaction
            .execute(
                "UPDATE hookfleet.webhooks SET secrets_encrypted = $2 WHERE webhook_id = $1",
                &[&webhook_id, &encrypted],
            )
            .await?;
        transaction.commit().await?;
        Ok(secret.to_whsec())
    }

    fn decrypt_text(&self, webhook_id: i64, blob: &[u8], aad: &[u8]) -> Result<String, WebhookError> {
        let plain = self
            .keyring
            .decrypt(blob, aad)
            .map_err(|error| WebhookError::Decrypt { webhook_id, message: error.to_string() })?;
        String::from_utf8(plain).map_err(|_| WebhookError::Decrypt { webhook_id, message: "not UTF-8".into() })
    }
}

fn validate(new: &NewWebhook) -> Result<(), WebhookError> {
    let invalid = |message: String| Err(WebhookError::Invalid(message));
    if let Some(name) = &new.name {
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
            return invalid(format!("name: must be 1 to {MAX_NAME_CHARS} characters"));
        }
    }
    if new.event_types.len() > MAX_EVENT_TYPES {
        return invalid(format!("event_types: at most {MAX_EVENT_TYPES} event types, got {}", new.event_types.len()));
    }
    if let Some(bad) = new.event_types.iter().find(|event| event.is_empty() || event.len() > 256) {
        return invalid(format!("event_types: {bad:?} must be 1 to 256 bytes"));
    }
    if let Some(rps) = new.rate_limit_rps {
        if !(rps.is_finite() && rps > 0.0) {
            return invalid(format!("rate_limit_rps: must be a positive number, got {rps}"));
        }
    }
    if new.rate_limit_burst == Some(0) {
        return invalid("rate_limit_burst: must be at least 1".into());
    }
    if new.max_retries.is_some_and(|retries| retries > 100) {
        return invalid("max_retries: must be between 0 and 100".into());
    }
    if new.timeout_ms.is_some_and(|ms| ms == 0 || ms > 300_000) {
        return invalid("timeout_ms: must be between 1 and 300000".into());
    }
    if new.max_in_flight == Some(0) {
        return invalid("max_in_flight: must be at least 1".into());
    }
    if new.circuit_breaker_failure_threshold.is_some_and(|threshold| threshold == 0 || threshold > 1000) {
        return invalid("circuit_breaker_failure_threshold: must be between 1 and 1000".into());
    }
    if new.circuit_breaker_timeout.is_some_and(|timeout| timeout.is_zero() || timeout > Duration::from_secs(86_400)) {
        return invalid("circuit_breaker_timeout: must be more than 0 and at most 1 day".into());
    }
    Ok(())
}

fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn to_u32(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}
