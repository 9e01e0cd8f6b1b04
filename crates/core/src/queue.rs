//! The only code that reads or writes the queue tables (`delivery_queue`, `delivery_attempts`,
//! `workers`): claim a batch, write a batch of results back, release what this worker still
//! holds, rescue expired leases, prune old attempts, sample depth, heartbeat.
//!
//! Every write-back is fenced on `locked_by` = this worker and the claim's `locked_until` (the row
//! in flight, or rescued since and not claimed again), so a worker whose lease expired can never
//! overwrite the outcome of the claim that took the row over.

use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;

use crate::db::DbError;

const CLAIM: &str = include_str!("../../../sql/queries/claim.sql");
const COMPLETE_MANY: &str = include_str!("../../../sql/queries/complete_many.sql");
const RELEASE: &str = include_str!("../../../sql/queries/release.sql");
const RELEASE_HELD: &str = include_str!("../../../sql/queries/release_held.sql");
const DEFER: &str = include_str!("../../../sql/queries/defer.sql");
const RESCUE_EXPIRED: &str = include_str!("../../../sql/queries/rescue_expired.sql");
const PRUNE_ATTEMPTS: &str = include_str!("../../../sql/queries/prune_attempts.sql");
const PRUNE_DELIVERIES: &str = include_str!("../../../sql/queries/prune_deliveries.sql");
const PRUNE_WORKERS: &str = include_str!("../../../sql/queries/prune_workers.sql");
const HEARTBEAT: &str = include_str!("../../../sql/queries/heartbeat.sql");
const QUEUE_DEPTH: &str = include_str!("../../../sql/queries/queue_depth.sql");

/// A delivery this worker holds under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub delivery_id: i64,
    pub webhook_id: i64,
    pub webhook_version: i64,
    pub message_id: String,
    pub event_type: Option<String>,
    /// The JSON text of `message_body`, sent as is.
    pub body: String,
    pub retry_count: u32,
    /// From the row, else the webhook; `None` means the worker's default applies.
    pub max_retries: Option<u32>,
    pub created_at: SystemTime,
    /// The claim's lease expiry, which also identifies the claim: write-backs are fenced on it.
    pub locked_until: SystemTime,
    /// When the lease ends by this process's monotonic clock, counted conservatively (from the
    /// moment the claim's answer arrived, with what the database said was left at the end of the
    /// claim): an attempt must be over well before it.
    pub lease_deadline: Instant,
}

/// What this worker passes to the claim besides the batch size: the fleet's rate-limit defaults
/// for webhooks that set none, and its own per-webhook cap.
#[derive(Debug, Clone, Default)]
pub struct ClaimLimits {
    /// `RATE_LIMIT_RPS`; `None` leaves webhooks without their own limit unlimited.
    pub default_rate_limit_rps: Option<f64>,
    /// `HOOKFLEET_RATE_LIMIT_BURST`; `None` means half of each webhook's rate, rounded up.
    pub default_rate_limit_burst: Option<u32>,
    /// At most this many of this worker's attempts per webhook (`None`: no cap).
    pub webhook_slots: Option<u32>,
    /// This worker's attempts per webhook that still hold their row (started, not yet written back).
    pub busy: Vec<(i64, u32)>,
}

/// What one claim returned.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    pub deliveries: Vec<ClaimedDelivery>,
    /// Webhooks whose due deliveries the rate limit held back in this claim, and when each one's
    /// next token is due.
    pub rate_limited: Vec<(i64, Option<SystemTime>)>,
    /// Webhooks with due deliveries held back because they are at `max_in_flight` or at this
    /// worker's per-webhook cap: a finished attempt may let them go.
    pub held_for_capacity: Vec<i64>,
    /// Webhooks skipped because another claim was deciding for them at the same moment.
    pub contended: Vec<i64>,
    /// Webhooks whose half-open probe this claim took (one delivery each).
    pub probes: Vec<i64>,
}

/// How an attempt settles its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Failed, back to `pending` after `retry_delay`.
    Retry,
    Dead,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retry => "retry",
            Outcome::Dead => "dead",
        }
    }
}

/// One finished attempt, waiting to be written back.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: i64,
    pub webhook_id: i64,
    pub outcome: Outcome,
    /// The row's `retry_count` after this attempt.
    pub retry_count: u32,
    pub retry_delay: Duration,
    pub attempt_number: u32,
    pub status_code: Option<u16>,
    pub started_at: SystemTime,
    pub duration: Duration,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    pub response_excerpt: Option<String>,
    /// The claim this attempt belongs to (`ClaimedDelivery::locked_until`).
    pub locked_until: SystemTime,
}

/// Circuit-breaker thresholds passed to `hookfleet.update_webhook_health`.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub open_for: Duration,
}

/// What a batch write-back did.
#[derive(Debug, Clone, Default)]
pub struct CompletionReport {
    /// Rows settled by this worker.
    pub settled: usize,
    /// Attempts whose row this worker no longer held (lease expired and taken over, or deleted),
    /// not counting attempts an earlier try of the same batch already recorded.
    pub lost_leases: usize,
    /// Their delivery ids.
    pub lost: Vec<i64>,
    /// Each webhook's `health_status` after this batch (`unavailable` = circuit open).
    pub health: Vec<(i64, String)>,
}

/// Pooled access to the queue tables.
#[derive(Clone)]
pub struct Queue {
    pool: Pool,
    call_limit: Duration,
}

/// How much longer than the server's `statement_timeout` a call may take before the client gives
/// up on it: long enough for the server's own cancel (a clean error) to arrive first.
pub const CALL_LIMIT_MARGIN: Duration = Duration::from_secs(2);
/// How long the cancel request of a call cut off may take (it opens a connection of its own).
const CANCEL_LIMIT: Duration = Duration::from_secs(5);

impl Queue {
    /// A queue whose calls each end within the pools' default statement timeout plus
    /// [`CALL_LIMIT_MARGIN`].
    pub fn new(pool: Pool) -> Self {
        Self::with_call_limit(pool, crate::db::DEFAULT_STATEMENT_TIMEOUT + CALL_LIMIT_MARGIN)
    }

    /// A queue whose every call (the checkout included) ends within `call_limit`, answered or not:
    /// `statement_timeout` is enforced by the server, so a server that stops answering (a primary
    /// frozen or cut off without a reset) would otherwise hang a call, and with it every attempt
    /// slot waiting on a write-back, for as long as TCP takes to give up.
    pub fn with_call_limit(pool: Pool, call_limit: Duration) -> Self {
        Self { pool, call_limit }
    }

    /// Runs `work` on a pooled connection within the call limit. A call cut off leaves its session
    /// in an unknown state (the reply may still arrive), so that connection is closed rather than
    /// returned to the pool, and so is every idle one: a server that stopped answering one session
    /// has most likely stopped answering all (a failover), and the next call should connect afresh.
    async fn call<T>(
        &self,
        work: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let limit = self.call_limit;
        // One deadline for the checkout and the work together.
        let deadline = tokio::time::Instant::now() + limit;
        let client = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(client) => client?,
            Err(_) => {
                self.pool.retain(|_, _| false);
                return Err(DbError::TimedOut(limit));
            }
        };
        let outcome = tokio::time::timeout_at(deadline, work(&client)).await;
        match outcome {
            Ok(result) => result,
            Err(_) => {
                // Asks the server to cancel the statement too: a frozen backend that resumes
                // would otherwise still run it (a claim would hold rows nobody attempts).
                let cancel = client.cancel_token();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CANCEL_LIMIT, cancel.cancel_query(tokio_postgres::NoTls)).await;
                });
                drop(deadpool_postgres::Object::take(client));
                self.pool.retain(|_, _| false);
                Err(DbError::TimedOut(limit))
            }
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Claims up to `batch_size` due rows through `hookfleet.claim_deliveries`, within the fleet's
    /// flow control: rate limits, `max_in_flight`, one half-open probe, and `limits`' per-webhook
    /// cap for this worker.
    pub async fn claim(
        &self,
        worker_id: &str,
        batch_size: u32,
        lease: Duration,
        limits: &ClaimLimits,
    ) -> Result<Claim, DbError> {
        self.call(async |client| {
            let statement = client.prepare_cached(CLAIM).await?;
            let batch_size = i32::try_from(batch_size).unwrap_or(i32::MAX);
            let burst = limits.default_rate_limit_burst.map(saturating_i32);
            let webhook_slots = limits.webhook_slots.map(saturating_i32);
            let (busy_ids, busy_counts): (Vec<i64>, Vec<i32>) =
                limits.busy.iter().map(|(webhook_id, busy)| (*webhook_id, saturating_i32(*busy))).unzip();
            let rows = client
                .query(
                    &statement,
                    &[
                        &worker_id,
                        &batch_size,
                        &lease.as_secs_f64(),
                        &limits.default_rate_limit_rps,
                        &burst,
                        &webhook_slots,
                        &busy_ids,
                        &busy_counts,
                    ],
                )
                .await?;
            let answered = Instant::now();
            let mut claim = Claim { deliveries: Vec::with_capacity(rows.len()), ..Claim::default() };
            for row in &rows {
                let Some(delivery_id) = row.try_get::<_, Option<i64>>(0)? else {
                    let webhook_id = row.try_get(1)?;
                    match row.try_get::<_, Option<&str>>(11)? {
                        Some("rate_limit") => claim.rate_limited.push((webhook_id, row.try_get(9)?)),
                        Some("contended") => claim.contended.push(webhook_id),
                        _ => claim.held_for_capacity.push(webhook_id),
                    }
                    continue;
                };
                let delivery = ClaimedDelivery {
                    delivery_id,
                    webhook_id: row.try_get(1)?,
                    webhook_version: row.try_get(2)?,
                    message_id: row.try_get(3)?,
                    event_type: row.try_get(4)?,
                    body: row.try_get(5)?,
                    retry_count: non_negative(row.try_get::<_, i32>(6)?),
                    max_retries: row.try_get::<_, Option<i32>>(7)?.map(non_negative),
                    created_at: row.try_get(8)?,
                    locked_until: row.try_get(9)?,
                    lease_deadline: answered + Duration::try_from_secs_f64(row.try_get(12)?).unwrap_or(Duration::ZERO),
                };
                if row.try_get::<_, bool>(10)? {
                    claim.probes.push(delivery.webhook_id);
                }
                claim.deliveries.push(delivery);
            }
            Ok(claim)
        })
        .await
    }

    /// Writes a batch of attempts back in one statement (see `complete_many.sql`).
    pub async fn complete_many(
        &self,
        worker_id: &str,
        records: &[AttemptRecord],
        breaker: BreakerSettings,
    ) -> Result<CompletionReport, DbError> {
        if records.is_empty() {
            return Ok(CompletionReport::default());
        }
        let mut delivery_ids = Vec::with_capacity(records.len());
        let mut webhook_ids = Vec::with_capacity(records.len());
        let mut outcomes = Vec::with_capacity(records.len());
        let mut retry_counts = Vec::with_capacity(records.len());
        let mut retry_delays_ms = Vec::with_capacity(records.len());
        let mut attempt_numbers = Vec::with_capacity(records.len());
        let mut status_codes = Vec::with_capacity(records.len());
        let mut started_ats = Vec::with_capacity(records.len());
        let mut durations_ms = Vec::with_capacity(records.len());
        let mut error_classes = Vec::with_capacity(records.len());
        let mut error_messages = Vec::with_capacity(records.len());
        let mut excerpts = Vec::with_capacity(records.len());
        let mut locked_untils = Vec::with_capacity(records.len());
        for record in records {
            delivery_ids.push(record.delivery_id);
            webhook_ids.push(record.webhook_id);
            outcomes.push(record.outcome.as_str());
            retry_counts.push(saturating_i32(record.retry_count));
            retry_delays_ms.push(record.retry_delay.as_secs_f64() * 1000.0);
            attempt_numbers.push(saturating_i32(record.attempt_number));
            status_codes.push(record.status_code.map(i32::from));
            started_ats.push(record.started_at);
            durations_ms.push(record.duration.as_secs_f64() * 1000.0);
            error_classes.push(record.error_class.as_deref().map(storable));
            error_messages.push(record.error_message.as_deref().map(storable));
            excerpts.push(record.response_excerpt.as_deref().map(storable));
            locked_untils.push(record.locked_until);
        }
        let threshold = saturating_i32(breaker.failure_threshold);
        let open_seconds = breaker.open_for.as_secs_f64();
        self.call(async |client| {
            let statement = client.prepare_cached(COMPLETE_MANY).await?;
            let row = client
                .query_one(
                    &statement,
                    &[
                        &worker_id,
                        &delivery_ids,
                        &webhook_ids,
                        &outcomes,
                        &retry_counts,
                        &retry_delays_ms,
                        &attempt_numbers,
                        &status_codes,
                        &started_ats,
                        &durations_ms,
                        &error_classes,
                        &error_messages,
                        &excerpts,
                        &threshold,
                        &open_seconds,
                        &locked_untils,
                    ],
                )
                .await?;
            let settled: Vec<i64> = row.try_get(0)?;
            let webhook_ids: Vec<i64> = row.try_get(1)?;
            // NULL when the webhook was deleted meanwhile.
            let statuses: Vec<Option<String>> = row.try_get(2)?;
            let health = webhook_ids.into_iter().zip(statuses).filter_map(|(id, status)| Some((id, status?))).collect();
            let lost: Vec<i64> = row.try_get(3)?;
            Ok(CompletionReport { settled: settled.len(), lost_leases: lost.len(), lost, health })
        })
        .await
    }

    /// Puts rows this worker holds but cannot attempt back to `pending`, due after `delay`, with
    /// `reason` as their `last_error`; their retry budget is untouched.
    pub async fn defer(
        &self,
        worker_id: &str,
        delivery_ids: &[i64],
        delay: Duration,
        reason: &str,
    ) -> Result<u64, DbError> {
        self.call(async |client| {
            Ok(client.execute(DEFER, &[&worker_id, &delivery_ids, &delay.as_secs_f64(), &storable(reason)]).await?)
        })
        .await
    }

    /// Returns the given rows, `(delivery_id, the claim's locked_until)`, to `pending` without an
    /// attempt, if this worker still holds them under that claim.
    pub async fn release(&self, worker_id: &str, claims: &[(i64, SystemTime)]) -> Result<u64, DbError> {
        let (delivery_ids, locked_untils): (Vec<i64>, Vec<SystemTime>) = claims.iter().copied().unzip();
        self.call(async |client| Ok(client.execute(RELEASE, &[&worker_id, &delivery_ids, &locked_untils]).await?)).await
    }

    /// Returns every row this worker still holds in flight to `pending` (graceful shutdown),
    /// except `sent`: attempts that finished but whose results are not written.
    pub async fn release_held(&self, worker_id: &str, sent: &[i64]) -> Result<u64, DbError> {
        self.call(async |client| Ok(client.execute(RELEASE_HELD, &[&worker_id, &sent]).await?)).await
    }

    /// Returns up to `limit` rows whose lease expired to `pending`, or `dead` once their lease has
    /// expired `max_lease_expiries` times (see `rescue_expired.sql`). The number rescued.
    pub async fn rescue_expired(&self, limit: u32, max_lease_expiries: u32) -> Result<u64, DbError> {
        self.call(async |client| {
            let statement = client.prepare_cached(RESCUE_EXPIRED).await?;
            Ok(client.execute(&statement, &[&saturating_i32(limit), &saturating_i32(max_lease_expiries)]).await?)
        })
        .await
    }

    /// Deletes up to `limit` attempts older than `retention`; the number deleted.
    pub async fn prune_attempts(&self, retention: Duration, limit: u32) -> Result<u64, DbError> {
        self.call(async |client| {
            Ok(client.execute(PRUNE_ATTEMPTS, &[&retention.as_secs_f64(), &saturating_i32(limit)]).await?)
        })
        .await
    }

    /// Deletes at most `limit` settled deliveries past their retention (`prune_deliveries.sql`).
    pub async fn prune_deliveries(
        &self,
        retention: Duration,
        dead_retention: Duration,
        limit: u32,
    ) -> Result<u64, DbError> {
        self.call(async |client| {
            let statement = client.prepare_cached(PRUNE_DELIVERIES).await?;
            Ok(client
                .execute(&statement, &[&retention.as_secs_f64(), &dead_retention.as_secs_f64(), &saturating_i32(limit)])
                .await?)
        })
        .await
    }

    /// Removes registry rows of workers not seen for `silence` (killed without deregistering).
    pub async fn prune_workers(&self, silence: Duration) -> Result<u64, DbError> {
        self.call(async |client| Ok(client.execute(PRUNE_WORKERS, &[&silence.as_secs_f64()]).await?)).await
    }

    /// The fleet's depth sample (pending, in_flight, dead, and the age of the oldest due row),
    /// recounted by this call only if it is older than `max_age` and no other worker is at it.
    pub async fn depth(&self, max_age: Duration) -> Result<QueueDepth, DbError> {
        self.call(async |client| {
            let statement = client.prepare_cached(QUEUE_DEPTH).await?;
            let rows = client.query(&statement, &[&max_age.as_secs_f64()]).await?;
            let mut depth = QueueDepth::default();
            for row in rows {
                let status: String = row.try_get(0)?;
                let count: i64 = row.try_get(1)?;
                if let Some(age) = row.try_get::<_, Option<f64>>(2)? {
                    // Never panic on what the database answers (an infinite or NaN age).
                    depth.oldest_due_age = Duration::try_from_secs_f64(age.max(0.0)).unwrap_or(Duration::MAX);
                }
                depth.by_status.push((status, count));
            }
            Ok(depth)
        })
        .await
    }

    /// Registers or refreshes this worker in `hookfleet.workers`.
    pub async fn heartbeat(&self, worker: &WorkerIdentity, in_flight: u32) -> Result<(), DbError> {
        self.call(async |client| {
            let statement = client.prepare_cached(HEARTBEAT).await?;
            client
                .execute(
                    &statement,
                    &[&worker.worker_id, &worker.host, &worker.pid, &crate::VERSION, &saturating_i32(in_flight)],
                )
                .await?;
            Ok(())
        })
        .await
    }

    /// The current version of each of `webhook_ids` that still exists.
    pub async fn webhook_versions(&self, webhook_ids: &[i64]) -> Result<std::collections::HashMap<i64, i64>, DbError> {
        self.call(async |client| {
            let rows = client
                .query("SELECT webhook_id, version FROM hookfleet.webhooks WHERE webhook_id = ANY($1)", &[&webhook_ids])
                .await?;
            rows.iter().map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).collect()
        })
        .await
    }

    /// The circuit of every enabled webhook whose circuit is not closed, fleet-wide (`open` or
    /// `half_open`), as the health rows say; open circuits idle for 15 minutes past their open
    /// period are left out.
    pub async fn open_circuits(&self) -> Result<Vec<(i64, String)>, DbError> {
        self.call(async |client| {
            let rows = client
                .query(
                    // An open circuit whose open period ended long ago without a probe has had
                    // no traffic since (a due row is probed at once): nothing to report, and
                    // neither has a disabled webhook.
                    "SELECT h.webhook_id, h.circuit_state FROM hookfleet.webhook_health_metrics h \
                     JOIN hookfleet.webhooks w USING (webhook_id) \
                     WHERE h.circuit_state <> 'closed' AND w.enabled \
                       AND (h.circuit_state = 'half_open' OR h.circuit_open_until > now() - interval '15 minutes')",
                    &[],
                )
                .await?;
            rows.iter().map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).collect()
        })
        .await
    }

    /// Removes this worker from the registry (graceful shutdown).
    pub async fn deregister(&self, worker_id: &str) -> Result<(), DbError> {
        self.call(async |client| {
            client.execute("DELETE FROM hookfleet.workers WHERE worker_id = $1", &[&worker_id]).await?;
            Ok(())
        })
        .await
    }
}

/// Who this worker is, as recorded in `hookfleet.workers`.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub worker_id: String,
    pub host: String,
    pub pid: i32,
}

#[derive(Debug, Clone, Default)]
pub struct QueueDepth {
    pub by_status: Vec<(String, i64)>,
    pub oldest_due_age: Duration,
}

/// PostgreSQL text cannot hold NUL, and receivers' answers can contain anything: one such byte
/// must not make a whole batch's write-back fail.
fn storable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

fn non_negative(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

fn saturating_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}
