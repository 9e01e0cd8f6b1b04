//! Database side of a run: a fresh migrated database per scenario, webhooks pointing at the
//! receiver, pre-filled queues, and the queue's size and dead tuples.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hookfleet_core::crypto::{EncryptionKey, Keyring};
use hookfleet_core::delivery::{ClientOptions, DeliveryClient};
use hookfleet_core::webhooks::{NewWebhook, WebhookStore};
use secrecy::SecretString;
use serde::Serialize;
use tokio_postgres::Client;

/// Body padding, so rows are about the size of a small real event (~250 bytes of JSON).
pub const PAD: usize = 200;
/// Rows per pre-fill INSERT.
const PREFILL_BATCH: u32 = 10_000;

/// A fresh database with the schema, its webhooks and the key the workers need.
pub struct BenchDb {
    pub name: String,
    pub url: String,
    pub client: Client,
    pub encryption_key: String,
    pub webhook_ids: Vec<i64>,
    /// pg_stat_statements is loaded (`--statements`): report the top statements.
    pub statements: bool,
    /// pg_stat_statements is loaded for the claim's figures (wide scenarios).
    pub claims: bool,
}

/// How one webhook of a run is set up.
#[derive(Clone, Copy, Debug, Default)]
pub struct HookSpec {
    /// `rate_limit_rps`; `None`: a limit that never binds (the limiter's bookkeeping is measured,
    /// not its waits).
    pub rate_limit_rps: Option<f64>,
    /// Points at the receiver's `/fail/<n>` (HTTP 500) rather than `/w/<n>`.
    pub fails: bool,
}

/// Which pg_stat_statements figures a database gives (the library must be preloaded).
#[derive(Clone, Copy, Debug, Default)]
pub struct StatementStats {
    /// `--statements`: each run's top statements.
    pub top: bool,
    /// The claim statement's calls, rows and buffers (the wide scenarios).
    pub claims: bool,
}

/// Sessions creating webhooks at once: 10,000 creations take seconds, not minutes.
const CREATE_SESSIONS: usize = 8;

/// Creates database `name` (dropping a leftover), migrates it and creates `webhooks` webhooks
/// pointing at `<receiver>/w/<n>` (`receiver` is the receiver's base URL), subscribed to
/// `event_types` (empty: every event).
pub async fn create(
    server_url: impl Fn(&str) -> String,
    name: &str,
    receiver: &str,
    webhooks: u16,
    event_types: &[&str],
    statements: bool,
) -> anyhow::Result<BenchDb> {
    let hooks = vec![HookSpec::default(); usize::from(webhooks)];
    let stats = StatementStats { top: statements, claims: false };
    create_with(server_url, name, receiver, &hooks, event_types, stats).await
}

/// [`create`] with one webhook per `hooks` entry (webhook `n`, 1-based, is `hooks[n - 1]`).
///
/// Every webhook is made by core's own `WebhookStore::create` (URL check, encrypted URL and
/// secret bound to its id, the trigger's health and rate-limit rows), from `CREATE_SESSIONS`
/// sessions at once that commit without waiting for the WAL flush (`ALTER DATABASE … SET
/// synchronous_commit = off` while they run, reset before anything else connects): about 2,000
/// webhooks a second here rather than one fsync each.
pub async fn create_with(
    server_url: impl Fn(&str) -> String,
    name: &str,
    receiver: &str,
    hooks: &[HookSpec],
    event_types: &[&str],
    stats: StatementStats,
) -> anyhow::Result<BenchDb> {
    anyhow::ensure!(hooks.len() <= usize::from(u16::MAX), "at most {} webhooks per run", u16::MAX);
    let admin = hookfleet_core::db::connect(&server_url("postgres"), "bench").await?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    let url = server_url(name);
    let mut client = hookfleet_core::db::connect(&url, "bench").await?;
    hookfleet_core::db::migrate(&mut client, 262_144).await?;
    if stats.top || stats.claims {
        client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await?;
    }
    let encryption_key = EncryptionKey::generate_base64();
    let keyring = Keyring::from_settings(Some(&SecretString::from(encryption_key.clone())), &[])?;
    let bulk = hooks.len() > CREATE_SESSIONS;
    if bulk {
        admin.batch_execute(&format!("ALTER DATABASE {name} SET synchronous_commit = off")).await?;
    }
    let sessions = if bulk { CREATE_SESSIONS } else { 1 };
    let store = WebhookStore::new(hookfleet_core::db::pool(&url, "bench", sessions)?, Arc::new(keyring));
    let http = Arc::new(DeliveryClient::new(ClientOptions {
        allow_http: true,
        allowed_cidrs: vec!["127.0.0.0/8".parse()?],
        connect_timeout: Duration::from_secs(2),
        response_body_cap: 1024,
        user_agent: "hookfleet-bench".into(),
        extra_root_certificates: Vec::new(),
    })?);
    let event_types: Vec<String> = event_types.iter().map(|t| (*t).to_owned()).collect();
    // Session k creates webhooks k+1, k+1+sessions, …; the ids are put back in webhook order.
    let mut tasks = tokio::task::JoinSet::new();
    for first in 0..sessions {
        let (store, http, event_types) = (store.clone(), http.clone(), event_types.clone());
        let mine: Vec<(usize, HookSpec)> = hooks.iter().copied().enumerate().skip(first).step_by(sessions).collect();
        let receiver = receiver.to_owned();
        tasks.spawn(async move {
            let mut made = Vec::with_capacity(mine.len());
            for (index, hook) in mine {
                let n = index + 1;
                let path = if hook.fails { "fail" } else { "w" };
                let webhook = store
                    .create(
                        NewWebhook {
                            name: Some(format!("bench-{n}")),
                            url: format!("{receiver}/{path}/{n}"),
                            event_types: event_types.clone(),
                            enabled: true,
                            rate_limit_rps: Some(hook.rate_limit_rps.unwrap_or(1_000_000.0)),
                            ..NewWebhook::default()
                        },
                        &http,
                    )
                    .await
                    .context("create webhook")?;
                made.push((index, webhook.webhook_id));
            }
            anyhow::Ok(made)
        });
    }
    let mut webhook_ids = vec![0i64; hooks.len()];
    while let Some(made) = tasks.join_next().await {
        for (index, id) in made.context("webhook creation task")?? {
            webhook_ids[index] = id;
        }
    }
    if bulk {
        admin.batch_execute(&format!("ALTER DATABASE {name} RESET synchronous_commit")).await?;
    }
    Ok(BenchDb {
        name: name.to_owned(),
        url,
        client,
        encryption_key,
        webhook_ids,
        statements: stats.top,
        claims: stats.claims,
    })
}

impl BenchDb {
    /// `rows` pending rows for the first webhook, in batched INSERTs, then VACUUM ANALYZE.
    pub async fn prefill(&self, rows: u32) -> anyhow::Result<()> {
        self.insert_pending(rows).await?;
        self.settle_storage().await
    }

    /// `rows` pending rows for the first webhook, in batched INSERTs, storage left as it is.
    pub async fn insert_pending(&self, rows: u32) -> anyhow::Result<()> {
        for first in (0..rows).step_by(PREFILL_BATCH as usize) {
            let last = (first + PREFILL_BATCH).min(rows);
            self.client
                .execute(
                    "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
                     SELECT $1, jsonb_build_object('n', n, 'pad', repeat('x', $4::int)) \
                     FROM generate_series($2::int, $3::int) n",
                    &[&self.webhook_ids[0], &(first as i32 + 1), &(last as i32), &(PAD as i32)],
                )
                .await?;
        }
        Ok(())
    }

    /// VACUUM ANALYZE the queue and CHECKPOINT, so a run starts from the same storage state and
    /// no checkpoint left over from the set-up lands in the measurement.
    pub async fn settle_storage(&self) -> anyhow::Result<()> {
        self.client.batch_execute("VACUUM ANALYZE hookfleet.delivery_queue").await?;
        self.client.batch_execute("CHECKPOINT").await?;
        Ok(())
    }

    /// The server process (parent of our backend), for CPU accounting.
    pub async fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let backend: i32 = self.client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        crate::procs::parent(backend as u32).context("cannot find the postmaster in /proc")
    }

    /// Rows not yet settled (pending or in flight), through the partial index.
    pub async fn unsettled(&self) -> anyhow::Result<i64> {
        Ok(self
            .client
            .query_one(
                "SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status IN ('pending', 'in_flight')",
                &[],
            )
            .await?
            .get(0))
    }

    pub async fn delivered(&self) -> anyhow::Result<i64> {
        Ok(self
            .client
            .query_one("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'delivered'", &[])
            .await?
            .get(0))
    }

    /// Waits (up to `limit`) until `count` workers are registered and listening.
    pub async fn wait_for_workers(&self, count: u32, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let row = self
                .client
                .query_one(
                    "SELECT (SELECT count(*) FROM hookfleet.workers), \
                            (SELECT count(*) FROM pg_stat_activity \
                             WHERE datname = current_database() AND query = 'LISTEN hookfleet_deliveries')",
                    &[],
                )
                .await?;
            let (registered, listening): (i64, i64) = (row.get(0), row.get(1));
            if registered >= i64::from(count) && listening >= i64::from(count) {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "only {registered} of {count} workers registered ({listening} listening) after {limit:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to `limit`) until no other session is connected to this database, so that every
    /// backend that touched the queue has exited and flushed its statistics.
    pub async fn wait_for_sessions_to_end(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let others: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                    &[],
                )
                .await?
                .get(0);
            if others == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub async fn queue_size(&self) -> anyhow::Result<QueueSize> {
        let row = self
            .client
            .query_one(
                "SELECT pg_total_relation_size('hookfleet.delivery_queue'), pg_indexes_size('hookfleet.delivery_queue')",
                &[],
            )
            .await?;
        let (total, indexes): (i64, i64) = (row.get(0), row.get(1));
        Ok(QueueSize { total_mb: mb(total), indexes_mb: mb(indexes) })
    }

    /// `n_dead_tup` of the queue, after every other session ended (their statistics are flushed
    /// at exit) and our own pending statistics were flushed.
    pub async fn dead_tuples(&self) -> anyhow::Result<i64> {
        self.wait_for_sessions_to_end(Duration::from_secs(10)).await?;
        // PostgreSQL 15+: flush this session's statistics when it next goes idle.
        let _ = self.client.batch_execute("SELECT pg_stat_force_next_flush()").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let row = self
            .client
            .query_opt(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'hookfleet' AND relname = 'delivery_queue'",
                &[],
            )
            .await?;
        Ok(row.map(|row| row.get(0)).unwrap_or(0))
    }

    /// Where a delivered row's time went, by the database's timestamps (ms, p50 and p99):
    /// `created_at` (the producer's transaction start) → `last_attempt_at` (the worker started
    /// the HTTP attempt), and `last_attempt_at` → `delivered_at` (the write-back committed).
    pub async fn latency_split(&self) -> anyhow::Result<Option<LatencySplit>> {
        let row = self
            .client
            .query_one(
                "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP \
                            (ORDER BY extract(epoch FROM last_attempt_at - created_at) * 1000), \
                        percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP \
                            (ORDER BY extract(epoch FROM delivered_at - last_attempt_at) * 1000), \
                        (SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY duration_ms) \
                         FROM hookfleet.delivery_attempts) \
                 FROM hookfleet.delivery_queue WHERE delivery_status = 'delivered'",
                &[],
            )
            .await?;
        // Each column is [p50, p99], or NULL when nothing was delivered.
        let percentiles = |column: usize| row.get::<_, Option<Vec<f64>>>(column);
        let (wait, settle, http) = (percentiles(0), percentiles(1), percentiles(2));
        Ok(match (wait.as_deref(), settle.as_deref(), http.as_deref()) {
            (Some(&[wait_p50, wait_p99]), Some(&[settle_p50, settle_p99]), Some(&[http_p50, http_p99])) => {
                Some(LatencySplit { wait_p50, wait_p99, settle_p50, settle_p99, http_p50, http_p99 })
            }
            _ => None,
        })
    }

    /// Starts pg_stat_statements' counts afresh (no-op when it is not loaded).
    pub async fn reset_statements(&self) -> anyhow::Result<()> {
        if self.statements || self.claims {
            self.client.batch_execute("SELECT pg_stat_statements_reset()").await?;
        }
        Ok(())
    }

    /// This database's statements by total execution time (empty without `--statements`).
    pub async fn top_statements(&self, limit: i64) -> anyhow::Result<Vec<Statement>> {
        if !self.statements {
            return Ok(Vec::new());
        }
        let rows = self
            .client
            .query(
                "SELECT calls, total_exec_time + total_plan_time, total_plan_time, rows, toplevel, \
                        left(regexp_replace(query, '\\s+', ' ', 'g'), 160) \
                 FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 ORDER BY total_exec_time + total_plan_time DESC LIMIT $1",
                &[&limit],
            )
            .await?;
        Ok(rows.iter().map(statement_of).collect())
    }

    /// The workers' claim statement (`sql/queries/claim.sql`, top level) since the last reset:
    /// calls, rows returned, buffers (`shared_blks_hit + shared_blks_read`, which include the
    /// statements run inside the function) and execution time. `None` when pg_stat_statements is
    /// not loaded or no claim ran.
    pub async fn claim_statement(&self) -> anyhow::Result<Option<ClaimStatement>> {
        if !self.claims && !self.statements {
            return Ok(None);
        }
        let row = self
            .client
            .query_one(
                "SELECT sum(calls)::bigint, sum(rows)::bigint, sum(shared_blks_hit + shared_blks_read)::bigint, \
                        sum(total_exec_time)::float8 \
                 FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND toplevel AND query LIKE '%FROM hookfleet.claim_deliveries(%'",
                &[],
            )
            .await?;
        let calls: Option<i64> = row.get(0);
        Ok(calls.filter(|calls| *calls > 0).map(|calls| ClaimStatement {
            calls,
            rows: row.get::<_, Option<i64>>(1).unwrap_or(0),
            buffers: row.get::<_, Option<i64>>(2).unwrap_or(0),
            exec_ms: row.get::<_, Option<f64>>(3).unwrap_or(0.0),
        }))
    }

    /// The statements run inside the claim, by total execution time (`--statements` only):
    /// nested statements whose text (up to its first parameter, whitespace folded) is part of
    /// the source of `hookfleet.claim_deliveries` or of a `hookfleet` function that source calls.
    /// pg_stat_statements does not record the caller, so this matches by text.
    pub async fn claim_inner_statements(&self, limit: usize) -> anyhow::Result<Vec<Statement>> {
        if !self.statements {
            return Ok(Vec::new());
        }
        let sources: Vec<String> = self
            .client
            .query(
                "WITH claim AS (SELECT prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                                WHERE n.nspname = 'hookfleet' AND p.proname = 'claim_deliveries') \
                 SELECT regexp_replace(p.prosrc, '\\s+', ' ', 'g') FROM pg_proc p \
                 JOIN pg_namespace n ON n.oid = p.pronamespace, claim \
                 WHERE n.nspname = 'hookfleet' \
                   AND (p.proname = 'claim_deliveries' OR claim.prosrc LIKE '%hookfleet.' || p.proname || '(%')",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let nested = self.statements_matching(false, 1000).await?;
        let mut inside: Vec<Statement> = nested
            .into_iter()
            .filter(|statement| {
                // PL/pgSQL sends `PERFORM …` as `SELECT …`, drops `INTO …` and wraps a condition
                // in `SELECT`: compare the first 40 characters, with and without that `SELECT`.
                let prefix: String = statement.query.split('$').next().unwrap_or_default().chars().take(40).collect();
                let prefix = prefix.trim();
                let bare = prefix.strip_prefix("SELECT ").map(str::trim);
                let mut candidates = vec![prefix.to_owned()];
                if let Some(bare) = bare {
                    candidates.push(format!("PERFORM {bare}"));
                    if bare.len() >= 20 {
                        candidates.push(bare.to_owned());
                    }
                }
                statement.calls > 0
                    && prefix.len() >= 20
                    && candidates.iter().any(|text| sources.iter().any(|source| source.contains(text.as_str())))
            })
            .collect();
        inside.truncate(limit);
        Ok(inside)
    }

    /// This database's statements by total execution time (empty without `--statements`).
    async fn statements_matching(&self, toplevel: bool, limit: i64) -> anyhow::Result<Vec<Statement>> {
        let rows = self
            .client
            .query(
                "SELECT calls, total_exec_time + total_plan_time, total_plan_time, rows, toplevel, \
                        regexp_replace(query, '\\s+', ' ', 'g') \
                 FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND toplevel = $2 \
                 ORDER BY total_exec_time + total_plan_time DESC LIMIT $1",
                &[&limit, &toplevel],
            )
            .await?;
        Ok(rows.iter().map(statement_of).collect())
    }

    /// Drops this database (from the `postgres` database) once a scenario is done with it.
    pub async fn drop_database(self, server_url: impl Fn(&str) -> String) -> anyhow::Result<()> {
        let BenchDb { name, client, .. } = self;
        drop(client);
        let admin = hookfleet_core::db::connect(&server_url("postgres"), "bench").await?;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        Ok(())
    }
}

/// Latency by the database's clock, ms: created → attempt started, attempt started → settled, and
/// the HTTP attempt itself as the worker timed it.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct LatencySplit {
    pub wait_p50: f64,
    pub wait_p99: f64,
    pub settle_p50: f64,
    pub settle_p99: f64,
    pub http_p50: f64,
    pub http_p99: f64,
}

fn statement_of(row: &tokio_postgres::Row) -> Statement {
    let calls: i64 = row.get(0);
    let total_ms: f64 = row.get(1);
    let query: String = row.get(5);
    Statement {
        calls,
        total_ms,
        plan_ms: row.get(2),
        mean_ms: total_ms / calls.max(1) as f64,
        rows: row.get(3),
        toplevel: row.get(4),
        query: query.chars().take(160).collect(),
    }
}

/// The workers' claim statement in pg_stat_statements.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct ClaimStatement {
    pub calls: i64,
    /// Rows returned (deliveries claimed, and one per webhook held back).
    pub rows: i64,
    /// shared_blks_hit + shared_blks_read, nested statements included.
    pub buffers: i64,
    pub exec_ms: f64,
}

/// One line of pg_stat_statements.
#[derive(Serialize, Clone, Debug)]
pub struct Statement {
    pub calls: i64,
    /// Planning and execution.
    pub total_ms: f64,
    /// Of which planning (`pg_stat_statements.track_planning`).
    pub plan_ms: f64,
    pub mean_ms: f64,
    pub rows: i64,
    /// false: run inside a function (its time is also inside the caller's).
    pub toplevel: bool,
    pub query: String,
}

#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct QueueSize {
    /// `pg_total_relation_size` (heap + indexes + TOAST), MB.
    pub total_mb: f64,
    /// `pg_indexes_size`, MB.
    pub indexes_mb: f64,
}

fn mb(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
