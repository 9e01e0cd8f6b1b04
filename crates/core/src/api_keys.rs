//! API keys (SPEC §9, §11): what a key looks like, how it is stored and how a presented one is
//! checked. The HTTP API asks [`ApiKeyStore::verify`] about every `Authorization: Bearer` key;
//! `hookfleet api-keys create|list|revoke` manages them.
//!
//! A key is `hfk_` followed by 32 random bytes in unpadded base64url (43 characters), 47 characters
//! in all. The database keeps only the SHA-256 of the whole key (`hookfleet.api_keys.key_hash`,
//! `sql/migrations/V0015__api_keys.sql`) and its first 12 characters, which lists show so that an
//! operator can tell keys apart. 256 random bits need no slow password hash: nobody can search
//! them from a hash, so a presented key is hashed once and found by one probe of the unique index
//! on the hash. Comparing hashes in the index is not constant time, and need not be: what it can
//! leak about a hash gives nothing towards a key that hashes to it.
//!
//! A new key is shown once, in the answer to [`ApiKeyStore::create`], as a `SecretString` so that
//! `Debug` output and logs never carry it.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use deadpool_postgres::Pool;
use ring::digest;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use crate::crypto::random_bytes;
use crate::db::DbError;

const VERIFY_API_KEY: &str = include_str!("../../../sql/queries/verify_api_key.sql");
const REVOKE_API_KEY: &str = include_str!("../../../sql/queries/revoke_api_key.sql");
const COLUMNS: &str = "key_id, name, scope, key_prefix, created_at, last_used_at, revoked_at";

/// What every key starts with, so that a leaked one is recognisable (secret scanners, logs).
pub const TOKEN_PREFIX: &str = "hfk_";
/// The random part of a key, in bytes.
const TOKEN_RANDOM_BYTES: usize = 32;
/// 32 bytes in unpadded base64: 43 characters.
const TOKEN_RANDOM_CHARS: usize = 43;
/// The length of every key, in characters (ASCII, so bytes too).
pub const TOKEN_CHARS: usize = TOKEN_PREFIX.len() + TOKEN_RANDOM_CHARS;
/// How much of a key lists show: `hfk_` and 8 characters (48 of its 256 random bits).
pub const KEY_PREFIX_CHARS: usize = 12;
/// Longest key name, in characters: the `api_keys_name_length` check of V0015.
pub const MAX_NAME_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// What a caller asked for cannot be stored (a name too long, say).
    #[error("cannot create the api key: {0}")]
    Invalid(String),
    /// A row that breaks the table's own checks (edited by hand).
    #[error("hookfleet.api_keys row {key_id}: {message}")]
    Stored { key_id: i64, message: String },
    #[error(transparent)]
    Database(#[from] DbError),
}

impl From<tokio_postgres::Error> for ApiKeyError {
    fn from(error: tokio_postgres::Error) -> Self {
        ApiKeyError::Database(DbError::Postgres(error))
    }
}

impl From<deadpool_postgres::PoolError> for ApiKeyError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        ApiKeyError::Database(DbError::Checkout(error))
    }
}

/// What a key may do (SPEC §9): `admin` everything, `producer` post messages and read deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Admin,
    Producer,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Producer => "producer",
        }
    }

    /// Whether a key of this scope may do what needs `needed`: an admin key may do everything.
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || self == needed
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A scope's name is not `admin` or `producer`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}: expected admin (everything) or producer (post messages, read deliveries)")]
pub struct UnknownScope(String);

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "admin" => Ok(Scope::Admin),
            "producer" => Ok(Scope::Producer),
            other => Err(UnknownScope(other.to_owned())),
        }
    }
}

/// A key as lists show it: never the key itself or its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyView {
    pub key_id: i64,
    pub name: String,
    pub scope: Scope,
    /// The key's first 12 characters (`hfk_AbCdEfGh`).
    pub key_prefix: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// What [`ApiKeyStore::revoke`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    Revoked,
    /// It was revoked before; nothing changed.
    AlreadyRevoked,
    NotFound,
}

/// A new random key: `hfk_` and 32 bytes of the operating system's CSPRNG, base64url unpadded.
fn generate_token() -> SecretString {
    let bytes = secrecy::zeroize::Zeroizing::new(random_bytes::<TOKEN_RANDOM_BYTES>());
    SecretString::from(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes.as_slice())))
}

/// The stored form of a key: SHA-256 of the whole key, prefix included.
fn hash_token(token: &str) -> [u8; 32] {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    hash
}

/// The hash to look a presented key up by, or `None` when it cannot be a key this module made:
/// another prefix, another length, characters outside base64url, or base64 that does not decode to
/// exactly 32 bytes the canonical way (the unused low bits of the last character must be zero).
/// Refusing those without a query means garbage costs no database round trip.
fn lookup_hash(token: &str) -> Option<[u8; 32]> {
    let random = token.strip_prefix(TOKEN_PREFIX)?;
    if random.len() != TOKEN_RANDOM_CHARS {
        return None;
    }
    let mut decoded = secrecy::zeroize::Zeroizing::new([0u8; TOKEN_RANDOM_BYTES + 1]);
    match URL_SAFE_NO_PAD.decode_slice(random, decoded.as_mut_slice()) {
        Ok(TOKEN_RANDOM_BYTES) => Some(hash_token(token)),
        _ => None,
    }
}

fn check_name(name: &str) -> Result<(), ApiKeyError> {
    let invalid = |message: String| Err(ApiKeyError::Invalid(message));
    let length = name.chars().count();
    if length == 0 || length > MAX_NAME_CHARS {
        return invalid(format!("name: must be 1 to {MAX_NAME_CHARS} characters, got {length}"));
    }
    // Lists print the name in a table; a control character (a NUL PostgreSQL refuses, an escape
    // sequence a terminal obeys) has no business in it.
    if name.chars().any(char::is_control) {
        return invalid("name: must not contain control characters".into());
    }
    Ok(())
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn view(row: &tokio_postgres::Row) -> Result<ApiKeyView, ApiKeyError> {
    let key_id: i64 = row.try_get(0)?;
    let scope: String = row.try_get(2)?;
    // The api_keys_scope_known check admits only the two names.
    let scope =
        scope.parse().map_err(|error: UnknownScope| ApiKeyError::Stored { key_id, message: error.to_string() })?;
    Ok(ApiKeyView {
        key_id,
        name: row.try_get(1)?,
        scope,
        key_prefix: row.try_get(3)?,
        created_at: rfc3339(row.try_get(4)?),
        last_used_at: row.try_get::<_, Option<SystemTime>>(5)?.map(rfc3339),
        revoked_at: row.try_get::<_, Option<SystemTime>>(6)?.map(rfc3339),
    })
}

/// The `hookfleet.api_keys` table: the only code that reads or writes it.
#[derive(Clone)]
pub struct ApiKeyStore {
    pool: Pool,
}

impl ApiKeyStore {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Makes and stores a new key. The answer is the only time the key exists outside its holder:
    /// the database keeps its hash.
    pub async fn create(&self, name: &str, scope: Scope) -> Result<(ApiKeyView, SecretString), ApiKeyError> {
        check_name(name)?;
        let token = generate_token();
        let hash = hash_token(token.expose_secret());
        let prefix = &token.expose_secret()[..KEY_PREFIX_CHARS];
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                &format!(
                    "INSERT INTO hookfleet.api_keys (name, scope, key_hash, key_prefix) VALUES ($1, $2, $3, $4) \
                     RETURNING {COLUMNS}"
                ),
                &[&name, &scope.as_str(), &hash.as_slice(), &prefix],
            )
            .await?;
        Ok((view(&row)?, token))
    }

    /// Every key, revoked ones too, oldest first; never a key or its hash.
    pub async fn list(&self) -> Result<Vec<ApiKeyView>, ApiKeyError> {
        let client = self.pool.get().await?;
        let rows = client.query(&format!("SELECT {COLUMNS} FROM hookfleet.api_keys ORDER BY key_id"), &[]).await?;
        rows.iter().map(view).collect()
    }

    /// Revokes a key: it stops working at once and stays listed with its `revoked_at`. Revoking
    /// it again changes nothing and says so.
    pub async fn revoke(&self, key_id: i64) -> Result<RevokeOutcome, ApiKeyError> {
        let client = self.pool.get().await?;
        let row = client.query_one(REVOKE_API_KEY, &[&key_id]).await?;
        let (revoked, known): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
        Ok(match (revoked, known) {
            (true, _) => RevokeOutcome::Revoked,
            (false, true) => RevokeOutcome::AlreadyRevoked,
            (false, false) => RevokeOutcome::NotFound,
        })
    }

    /// The key a request presented, if it is one and not revoked; `None` for anything else (a
    /// malformed key without a query). Notes the use (at most once a minute per key).
    pub async fn verify(&self, token: &str) -> Result<Option<ApiKeyView>, ApiKeyError> {
        let Some(hash) = lookup_hash(token) else {
            return Ok(None);
        };
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(VERIFY_API_KEY).await?;
        let row = client.query_opt(&statement, &[&hash.as_slice()]).await?;
        row.as_ref().map(view).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_the_prefix_and_32_random_bytes_in_base64url() {
        let first = generate_token();
        let second = generate_token();
        for token in [first.expose_secret(), second.expose_secret()] {
            assert_eq!(token.len(), TOKEN_CHARS);
            assert_eq!(TOKEN_CHARS, 47);
            let random = token.strip_prefix("hfk_").expect("the prefix");
            assert!(random.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'));
            assert_eq!(URL_SAFE_NO_PAD.decode(random).expect("base64url").len(), 32);
            assert!(lookup_hash(token).is_some(), "a generated key is well formed");
        }
        assert_ne!(first.expose_secret(), second.expose_secret());
    }

    #[test]
    fn a_token_is_stored_as_the_sha256_of_the_whole_token() {
        // `printf %s "hfk_$(printf 'A%.0s' $(seq 43))" | sha256sum`
        let token = format!("hfk_{}", "A".repeat(43));
        let expected = "80daff0bd65080955d7bd00e7dceb42d1b22449ffebff955d08e800ed30e1ecf";
        assert_eq!(crate::crypto::hex_lower(&hash_token(&token)), expected);
        assert_eq!(lookup_hash(&token), Some(hash_token(&token)));
        // The prefix is part of what is hashed.
        assert_ne!(hash_token(&token), hash_token(&token[4..]));
    }

    #[test]
    fn malformed_tokens_are_refused_without_a_lookup() {
        let good = generate_token().expose_secret().to_owned();
        let random = &good[4..];
        let cases = [
            String::new(),
            "hfk_".to_owned(),
            format!("hfx_{random}"),
            format!("HFK_{random}"),
            format!("whsec_{random}"),
            random.to_owned(),
            good[..good.len() - 1].to_owned(),
            format!("{good}A"),
            format!(" {good}"),
            format!("{good}\n"),
            format!("Bearer {good}"),
            // Standard base64's characters are not base64url's.
            format!("hfk_{}+", &random[..42]),
            format!("hfk_{}/", &random[..42]),
            format!("hfk_{}=", &random[..42]),
            format!("hfk_{}é", &random[..41]),
            // 43 characters carry 258 bits: the last 2 must be zero, as an encoder writes them.
            format!("hfk_{}B", "A".repeat(42)),
            // Padded, as a standard encoder would write 32 bytes.
            format!("hfk_{}=", "A".repeat(43)),
        ];
        for token in &cases {
            assert_eq!(lookup_hash(token), None, "{token:?} was taken for a key");
        }
        assert_eq!(
            lookup_hash(&format!("hfk_{}A", "A".repeat(42))),
            Some(hash_token(&format!("hfk_{}", "A".repeat(43))))
        );
    }

    #[test]
    fn scopes_read_and_print_their_names() {
        for scope in [Scope::Admin, Scope::Producer] {
            assert_eq!(scope.to_string().parse::<Scope>(), Ok(scope));
            assert_eq!(serde_json::to_value(scope).expect("JSON"), serde_json::json!(scope.as_str()));
        }
        for bad in ["", "Admin", "ADMIN", "root", "producer ", "read"] {
            let error = bad.parse::<Scope>().expect_err(bad);
            assert!(error.to_string().contains("expected admin"), "{error}");
        }
        assert!(Scope::Admin.allows(Scope::Producer) && Scope::Admin.allows(Scope::Admin));
        assert!(Scope::Producer.allows(Scope::Producer) && !Scope::Producer.allows(Scope::Admin));
    }

    #[test]
    fn names_are_checked_as_the_database_would() {
        assert!(check_name("ci producer").is_ok());
        assert!(check_name(&"é".repeat(MAX_NAME_CHARS)).is_ok());
        for bad in [String::new(), "x".repeat(MAX_NAME_CHARS + 1), "a\0b".to_owned(), "bell\u{7}".to_owned()] {
            let error = check_name(&bad).expect_err("refused");
            assert!(error.to_string().starts_with("cannot create the api key: name: "), "{error}");
        }
    }
}
