//! How hookfleet reaches PostgreSQL: one connection pool per process, and the embedded schema
//! migrations (`sql/migrations/V*.sql`, then the function and view definitions of
//! [`crate::definitions`]) that `hookfleet migrate`, the test harness and the demo all run.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

refinery::embed_migrations!("../../sql/migrations");

/// Any two `hookfleet migrate` runs (a CLI and the compose job, say) serialise on this lock.
const MIGRATION_LOCK_KEY: i64 = 0x686f_6f6b_666c_6565; // "hookflee"

/// Where refinery records the applied migrations: always schema-qualified. Refinery pastes the
/// name into its SQL as is, and left unqualified (its default) the table is created in, and read
/// from, the first schema of the session's `search_path`. For a role named `hookfleet` that
/// `search_path` (`"$user", public`) means `public` on the first run, before the `hookfleet`
/// schema exists, and `hookfleet` on every later run: an empty history there, V0001 applied
/// again, `relation "settings" already exists`.
pub(crate) const HISTORY_TABLE: &str = "hookfleet.refinery_schema_history";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not set: point it at the PostgreSQL database hookfleet should use")]
    MissingUrl,
    #[error("DATABASE_URL is not a valid PostgreSQL connection string: {0}")]
    InvalidUrl(String),
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("database error: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("cannot get a database connection: {0}")]
    Checkout(#[from] deadpool_postgres::PoolError),
    #[error("the database connection closed")]
    ConnectionClosed,
    #[error("the database did not answer within {0:?}; the connection was dropped")]
    TimedOut(Duration),
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

/// A PostgreSQL error as a person needs it: the server's message, detail and hint, not just
/// "db error".
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = db.message().to_owned();
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

/// How long data sent to the server may stay unacknowledged before the connection is failed.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);

/// The server-side statement limit of the pools when the caller has no setting at hand.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A session stuck in a transaction would hold row locks that block claims fleet-wide.
const SESSION_OPTIONS: &str = "-c idle_in_transaction_session_timeout=60000";

/// Parses `DATABASE_URL` (URL or key=value form) and tags the sessions with `application_name`.
pub fn connection_config(url: &str, application_name: &str) -> Result<tokio_postgres::Config, DbError> {
    connection_config_with_options(url, application_name, SESSION_OPTIONS)
}

/// [`connection_config`] with hookfleet's own session `options` (`-c name=value …`). Options the
/// URL already carries (a managed service's endpoint, a search path) are kept: they come after
/// ours, so an operator's setting of the same name wins.
pub fn connection_config_with_options(
    url: &str,
    application_name: &str,
    options: &str,
) -> Result<tokio_postgres::Config, DbError> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|error| DbError::InvalidUrl(error.to_string()))?;
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    let combined = match config.get_options().map(str::trim) {
        Some(theirs) if !theirs.is_empty() => format!("{options} {theirs}"),
        _ => options.to_owned(),
    };
    config.options(combined);
    config.connect_timeout(Duration::from_secs(10));
    // Notice a database that vanished without closing the connection (failover, partition): an
    // idle connection is probed after 10 s and given up after 3 unanswered probes 5 s apart, and
    // data sent but never acknowledged fails the connection after 20 s instead of the kernel's
    // ~15 minutes of retransmissions. Neither notices a server that acknowledges and never
    // answers; callers bound their calls for that (`queue::Queue`).
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    Ok(config)
}

/// The process-wide pool. `RecyclingMethod::Fast` skips the per-checkout health query; a broken
/// connection is detected by the failing statement and dropped by deadpool.
pub fn pool(url: &str, application_name: &str, max_size: usize) -> Result<Pool, DbError> {
    build_pool(url, application_name, max_size, DEFAULT_STATEMENT_TIMEOUT, "")
}

/// The worker's pool, its statements limited to `statement_timeout` (`HOOKFLEET_DATABASE_TIMEOUT`).
/// Its sessions commit asynchronously (no wait for the WAL flush): a worker's
/// commit lost in a PostgreSQL crash only puts a row back to `in_flight` or `pending`, where the
/// lease rescue finds it and it is delivered again with the same `webhook-id` — the duplicate
/// around a crash that at-least-once allows — while each claim and write-back saves a disk flush.
/// Producers' inserts and admin writes keep the server's durability.
pub fn worker_pool(url: &str, max_size: usize, statement_timeout: Duration) -> Result<Pool, DbError> {
    build_pool(url, "hookfleet-worker", max_size, statement_timeout, " -c synchronous_commit=off")
}

fn build_pool(
    url: &str,
    application_name: &str,
    max_size: usize,
    statement_timeout: Duration,
    extra_options: &str,
) -> Result<Pool, DbError> {
    // The fleet's own statements take milliseconds; one that runs for long is stuck (or behind a
    // lock someone forgot), and failing it lets the caller's retry logic take over.
    let options =
        format!("{SESSION_OPTIONS} -c statement_timeout={}{extra_options}", statement_timeout.as_millis().max(1));
    let config = connection_config_with_options(url, application_name, &options)?;
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|error| DbError::Pool(error.to_string()))
}

/// One dedicated connection outside the pool (migrations, LISTEN). The connection task runs on
/// the current runtime and ends when the client is dropped.
pub async fn connect(url: &str, application_name: &str) -> Result<tokio_postgres::Client, DbError> {
    connect_with_options(url, application_name, SESSION_OPTIONS).await
}

/// [`connect`] with hookfleet's own session `options` (see [`connection_config_with_options`]).
pub async fn connect_with_options(
    url: &str,
    application_name: &str,
    options: &str,
) -> Result<tokio_postgres::Client, DbError> {
    let config = connection_config_with_options(url, application_name, options)?;
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "database connection closed");
        }
    });
    Ok(client)
}

/// The migrations embedded in this binary: what [`crate::schema`] compares a database's history with.
pub(crate) fn embedded_migrations() -> Vec<refinery::Migration> {
    migrations::runner().get_migrations().clone()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Names of the migrations this run applied (empty when the schema was already current).
    pub applied: Vec<String>,
    /// The function and view files this run applied (`sql/functions`, `sql/views`), in order.
    pub definitions: Vec<String>,
}

/// Applies the embedded migrations (each in its own transaction, recorded by refinery) under an
/// advisory lock, then the function and view definitions that changed (one transaction), then
/// writes the limits the database enforces itself into `hookfleet.settings`.
pub async fn migrate(client: &mut tokio_postgres::Client, max_body_bytes: u32) -> Result<MigrationReport, DbError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    let result = apply_migrations(client, max_body_bytes).await;
    // Unlock even when the migration failed; the session ending would release it anyway.
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]).await;
    let report = result?;
    unlock?;
    Ok(report)
}

async fn apply_migrations(
    client: &mut tokio_postgres::Client,
    max_body_bytes: u32,
) -> Result<MigrationReport, DbError> {
    let mut runner = migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    adopt_unqualified_history(client, &runner).await?;
    let report = runner.run_async(client).await?;
    let applied = report.applied_migrations().iter().map(|migration| migration.to_string()).collect();
    let definitions = crate::definitions::apply(client).await?;
    client
        .execute(
            "INSERT INTO hookfleet.settings (name, value) VALUES ('max_body_bytes', $1) \
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now() \
             WHERE hookfleet.settings.value IS DISTINCT FROM EXCLUDED.value",
            &[&max_body_bytes.to_string()],
        )
        .await?;
    Ok(MigrationReport { applied, definitions })
}

/// Prepares [`HISTORY_TABLE`] before refinery runs, under the migration lock and in one
/// transaction, so that concurrent runs see either the old layout or the new one, never half.
///
/// Releases before the history was qualified left it at `public.refinery_schema_history` (the
/// first schema of the default `search_path` when the `hookfleet` schema did not exist yet, or
/// for any role without a schema of its own name). Such a history moves into the `hookfleet`
/// schema, replacing the empty one a failed second run of those releases left there. A history in
/// `public` is taken only when it records this project's V0001 (version, name and checksum):
/// `refinery_schema_history` is refinery's default name, and another application sharing the
/// database may own one. A non-empty `hookfleet.refinery_schema_history` is never replaced.
async fn adopt_unqualified_history(
    client: &mut tokio_postgres::Client,
    runner: &refinery::Runner,
) -> Result<(), DbError> {
    let transaction = client.transaction().await?;
    // Refinery creates its table before V0001 could create the schema. Checked first because
    // `CREATE SCHEMA IF NOT EXISTS` demands the database's CREATE privilege even when the schema
    // exists, which a role that only owns the schema may lack.
    let schema_exists: bool = transaction
        .query_one("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'hookfleet')", &[])
        .await?
        .get(0);
    if !schema_exists {
        transaction.batch_execute("CREATE SCHEMA IF NOT EXISTS hookfleet").await?;
    }
    // The catalog, not `to_regclass`: an unqualified name would resolve through `search_path`.
    let present: Vec<String> = transaction
        .query(
            "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'refinery_schema_history' AND c.relkind = 'r' AND n.nspname IN ('public', 'hookfleet')",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if !present.iter().any(|schema| schema == "public") {
        return Ok(transaction.commit().await?);
    }
    let Some(first) = runner.get_migrations().iter().min_by_key(|migration| migration.version()) else {
        return Ok(transaction.commit().await?);
    };
    let ours: bool = transaction
        .query_one(
            "SELECT EXISTS (SELECT FROM public.refinery_schema_history WHERE version = $1 AND name = $2 AND checksum = $3)",
            &[&first.version(), &first.name(), &first.checksum().to_string()],
        )
        .await?
        .get(0);
    if !ours {
        return Ok(transaction.commit().await?);
    }
    if present.iter().any(|schema| schema == "hookfleet") {
        let empty: bool = transaction
            .query_one("SELECT NOT EXISTS (SELECT FROM hookfleet.refinery_schema_history)", &[])
            .await?
            .get(0);
        if !empty {
            tracing::warn!(
                "both public.refinery_schema_history and {HISTORY_TABLE} hold migrations; using {HISTORY_TABLE} \
                 and leaving the one in public alone"
            );
            return Ok(transaction.commit().await?);
        }
        transaction.batch_execute("DROP TABLE hookfleet.refinery_schema_history").await?;
    }
    transaction.batch_execute("ALTER TABLE public.refinery_schema_history SET SCHEMA hookfleet").await?;
    tracing::info!("moved the migration history from public.refinery_schema_history to {HISTORY_TABLE}");
    Ok(transaction.commit().await?)
}
