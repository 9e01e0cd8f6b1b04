//! The worker engine. One claim loop takes batches of due deliveries (as many as there are free
//! attempt slots, up to `BATCH_SIZE`), starts one task per delivery, and a single completer writes
//! results back in batches: whatever finished while the previous write-back ran goes in the next
//! one, so under load a round trip settles many rows and when idle a result is written at once.
//!
//! Shutdown is an explicit path: the token stops claiming and the services; in-flight attempts get
//! `HOOKFLEET_SHUTDOWN_GRACE` to finish and be written back; whatever this worker still holds is
//! released to `pending`; the worker deregisters.

mod cache;
mod depth;
mod heartbeat;
mod identity;
mod listen;
mod prune;
mod rescue;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use secrecy::ExposeSecret;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::crypto::Keyring;
use crate::db::{self, DbError};
use crate::delivery::{ClientOptions, DeliveryClient, DeliveryError, DeliveryRequest, Response};
use crate::metrics::{self, Metrics, ReadinessCheck, WebhookMetrics};
use crate::queue::{
    AttemptRecord, BreakerSettings, Claim, ClaimLimits, ClaimedDelivery, Outcome, Queue, WorkerIdentity,
};
use crate::retry::{self, RetryPolicy};
use crate::signing;
use crate::webhooks::{WebhookError, WebhookStore, WebhookTarget};

/// Largest write-back batch; bigger backlogs are written in several statements.
const MAX_COMPLETE_BATCH: usize = 1000;
/// The time each step of the drain may take besides the grace: a claim in progress at the signal,
/// and after the grace the final write-back, the release of what is held, the services' stop, the
/// deregistration. Together 4 s (and the binary's 0.5 s for blocking threads), so that the whole
/// drain ends within the grace + 4.5 s of the signal, before the orchestrator's kill (grace + 5 s
/// in the shipped manifests). Whatever is still held then comes back through its lease.
const CLAIM_FINISH_LIMIT: Duration = Duration::from_secs(1);
const FINAL_WRITE_BACK_LIMIT: Duration = Duration::from_secs(1);
const RELEASE_LIMIT: Duration = Duration::from_secs(1);
const DEREGISTER_LIMIT: Duration = Duration::from_millis(500);
const SERVICES_STOP_LIMIT: Duration = Duration::from_millis(500);
/// How long a single release from an attempt task (a lease too short to start) may take.
const ATTEMPT_RELEASE_LIMIT: Duration = Duration::from_secs(3);
/// Write-backs through an outage retry at least this often: when the database is back, the
/// results should land before a rescue hands the rows to another claim (which would send them
/// again).
const WRITE_BACK_RETRY_MAX: Duration = Duration::from_secs(1);
/// Within the metrics server's 2 s limit for `/readyz`.
const READINESS_LIMIT: Duration = Duration::from_millis(1500);
/// Tries of a single result the database refuses for a reason that may pass (see `FailureKind`).
const REFUSED_TRIES: u32 = 3;
/// How often the claim loop looks again while write-backs fail.
const WRITE_BACK_WAIT: Duration = Duration::from_millis(50);
/// How long rows of a webhook this worker cannot use (e.g. undecryptable) wait before another try.
const UNUSABLE_WEBHOOK_DELAY: Duration = Duration::from_secs(30);
/// Shortest sleep before claiming again for a rate-limited webhook: a claim costs a round trip,
/// so very high rates are served in small bursts rather than one claim per token.
const MIN_TOKEN_WAIT: Duration = Duration::from_millis(5);
/// When another claim was deciding for a webhook at the same moment: look again soon. A webhook
/// that stays contended (another session holds its row: an operator's open transaction, a
/// delete's cascade) is looked at less and less often, down to every [`CONTENDED_WAIT_MAX`].
const CONTENDED_WAIT: Duration = Duration::from_millis(2);
const CONTENDED_WAIT_MAX: Duration = Duration::from_millis(100);
/// While a webhook waits for capacity other workers may free: how soon to look again.
const CAPACITY_RECHECK: Duration = Duration::from_millis(100);
/// The least time an attempt starts with (less when its own timeout is shorter): a claimed row whose
/// lease has less left is given back untouched rather than attempted in a rush and failed.
pub const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on METRICS_ADDR {addr}: {source}")]
    MetricsBind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error(
        "WORKER_ID {0:?} is in use by a live worker (see hookfleet.v_workers): give each worker process its own \
         WORKER_ID, or leave it unset (host and pid)"
    )]
    WorkerIdInUse(String),
    #[error(
        "stopped while still holding {held}: they return to pending when their lease (HOOKFLEET_LEASE, {lease:?}) \
         expires"
    )]
    LeftHeld { held: StillHeld, lease: Duration },
    #[error(
        "the write-back task stopped unexpectedly, so no result could be recorded; the worker stopped, and the \
         deliveries it held return to pending when their lease expires"
    )]
    WriteBackDied,
}

/// The settings the engine runs with, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub identity: WorkerIdentity,
    pub batch_size: u32,
    pub poll_interval: Duration,
    pub lease: Duration,
    pub max_in_flight: u32,
    /// Most of this worker's attempts one webhook may hold.
    pub max_in_flight_per_webhook: u32,
    /// `RATE_LIMIT_RPS` and `HOOKFLEET_RATE_LIMIT_BURST`: the fleet-wide limit of webhooks that set none.
    pub rate_limit_rps: f64,
    pub rate_limit_burst: Option<u32>,
    pub http_timeout: Duration,
    pub retry: RetryPolicy,
    pub default_max_retries: u32,
    pub breaker: BreakerSettings,
    pub shutdown_grace: Duration,
    /// The longest one database call may take before it is given up and its connection dropped
    /// (`HOOKFLEET_DATABASE_TIMEOUT` + [`crate::queue::CALL_LIMIT_MARGIN`]).
    pub call_limit: Duration,
    pub heartbeat_interval: Duration,
    pub attempt_retention: Duration,
    pub delivery_retention: Duration,
    pub dead_retention: Duration,
}

impl WorkerSettings {
    /// The attempt's total timeout, given what is left of its lease: the webhook's timeout, else
    /// `HTTP_TIMEOUT`, but ending a fifth of the lease before the lease does, so that an attempt
    /// never outlives its claim (and is sent again by another worker while it is still running)
    /// and its result has time to be written back. `None` when less than
    /// [`MIN_ATTEMPT_TIME`] (or the whole timeout, if shorter) would be left: such an attempt
    /// must not start.
    pub fn attempt_timeout(&self, webhook_timeout: Option<Duration>, lease_left: Duration) -> Option<Duration> {
        let wanted = webhook_timeout.unwrap_or(self.http_timeout);
        let available = lease_left.saturating_sub(self.lease / 5);
        (available >= wanted.min(MIN_ATTEMPT_TIME)).then(|| wanted.min(available))
    }

    pub fn from_config(config: &Config) -> Self {
        Self {
            identity: WorkerIdentity {
                worker_id: config.worker_id.clone(),
                host: hostname::get().map(|host| host.to_string_lossy().into_owned()).unwrap_or_default(),
                pid: i32::try_from(std::process::id()).unwrap_or(0),
            },
            batch_size: config.batch_size,
            poll_interval: config.poll_interval,
            lease: config.lease,
            max_in_flight: config.max_in_flight,
            max_in_flight_per_webhook: config.max_in_flight_per_webhook,
            rate_limit_rps: config.rate_limit_rps,
            rate_limit_burst: config.rate_limit_burst,
            http_timeout: config.http_timeout,
            retry: RetryPolicy { base: config.retry_base, max: config.retry_max },
            default_max_retries: config.max_retries,
            breaker: BreakerSettings {
                failure_threshold: config.circuit_breaker_failure_threshold,
                open_for: config.circuit_breaker_timeout,
            },
            shutdown_grace: config.shutdown_grace,
            call_limit: config.database_timeout + crate::queue::CALL_LIMIT_MARGIN,
            heartbeat_interval: config.heartbeat_interval,
            attempt_retention: config.attempt_retention,
            delivery_retention: config.delivery_retention,
            dead_retention: config.dead_retention,
        }
    }
}

/// Runs a worker from configuration until `shutdown` fires and the drain is complete: the
/// metrics server, the maintenance services and the engine.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let database_url = config.database_url.as_ref().ok_or(DbError::MissingUrl)?.expose_secret().to_owned();
    let keyring = Arc::new(Keyring::from_settings(config.encryption_key.as_ref(), &config.previous_encryption_keys)?);
    let identity = identity::WorkerIdLock::take(&database_url, &config.worker_id).await?;
    let pool = db::worker_pool(&database_url, config.db_pool_size as usize, config.database_timeout)?;
    let client =
        DeliveryClient::new(client_options(&config)).map_err(|error| WorkerError::Client(error.to_string()))?;
    let metrics = Arc::new(Metrics::new()?);

    let ready_pool = pool.clone();
    let ready: ReadinessCheck = Arc::new(move || {
        let pool = ready_pool.clone();
        Box::pin(async move {
            let probe = async {
                match pool.get().await {
                    Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
                    Err(_) => false,
                }
            };
            match tokio::time::timeout(READINESS_LIMIT, probe).await {
                Ok(ready) => ready,
                Err(_) => {
                    // The connection it hung on went back to the pool with the query pending:
                    // drop it (and the other idle ones) rather than let a write-back meet it.
                    pool.retain(|_, _| false);
                    false
                }
            }
        })
    });
    let (metrics_addr, metrics_server) =
        metrics::serve(config.metrics_addr, metrics::router(metrics.clone(), ready), shutdown.clone())
            .await
            .map_err(|source| WorkerError::MetricsBind { addr: config.metrics_addr, source })?;
    tracing::info!(%metrics_addr, "serving /metrics, /healthz and /readyz");

    let settings = WorkerSettings::from_config(&config);
    let queue = Queue::with_call_limit(pool.clone(), settings.call_limit);
    let store = WebhookStore::new(pool, keyring);
    let engine = Engine { settings: Arc::new(settings), queue, store, client, metrics, database_url };
    let id_lost = CancellationToken::new();
    let keeper = tokio::spawn(identity.keep(shutdown.clone(), id_lost.clone()));
    let ended = engine.run(shutdown.clone(), &id_lost).await;
    keeper.abort();
    // The engine may have stopped on its own (its write-back task died): stop the server too.
    shutdown.cancel();
    if let Ok(Err(error)) = metrics_server.await {
        tracing::warn!(%error, "metrics server stopped with an error");
    }
    if id_lost.is_cancelled() {
        return Err(WorkerError::WorkerIdInUse(config.worker_id.clone()));
    }
    match ended? {
        StillHeld::None => Ok(()),
        held => Err(WorkerError::LeftHeld { held, lease: config.lease }),
    }
}

/// What a worker still held when it stopped: rows that come back only through their lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StillHeld {
    None,
    Rows(usize),
    /// The release failed, so how many is not known.
    Unknown,
}

impl std::fmt::Display for StillHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StillHeld::None => f.write_str("no deliveries"),
            StillHeld::Rows(1) => f.write_str("1 delivery"),
            StillHeld::Rows(rows) => write!(f, "{rows} deliveries"),
            StillHeld::Unknown => f.write_str("deliveries (the release failed, so how many is not known)"),
        }
    }
}

/// The delivery client options a process derives from its configuration.
pub fn client_options(config: &Config) -> ClientOptions {
    ClientOptions {
        allow_http: config.allow_http,
        allowed_cidrs: config.allowed_cidrs.clone(),
        connect_timeout: config.connect_timeout.min(config.http_timeout),
        response_body_cap: config.response_body_cap,
        user_agent: format!("hookfleet/{}", crate::VERSION),
        extra_root_certificates: config.ca_certificates.clone(),
    }
}

/// Everything one attempt task needs, shared by all of them.
struct AttemptContext {
    settings: Arc<WorkerSettings>,
    client: DeliveryClient,
    metrics: Arc<Metrics>,
    /// Each result travels with its attempt slot, which is freed only once the result is written
    /// back: a stalled write-back stops new claims instead of piling up results whose leases
    /// expire.
    results: mpsc::UnboundedSender<(AttemptRecord, Slot)>,
    /// Fired when the shutdown grace runs out: unfinished attempts are abandoned (their rows are
    /// released, so they are delivered again: at least once).
    abandon: CancellationToken,
    /// To give back a row whose lease ran too short before its attempt could start.
    queue: Queue,
    /// Deliveries whose attempt finished and whose result is not written back yet: at shutdown
    /// these are never released to `pending` (they were sent).
    unwritten: Arc<Unwritten>,
}

pub struct Engine {
    settings: Arc<WorkerSettings>,
    queue: Queue,
    store: WebhookStore,
    client: DeliveryClient,
    metrics: Arc<Metrics>,
    database_url: String,
}

impl Engine {
    /// Runs until `shutdown`, or until the write-back task dies (then `Err`). `id_lost` fires
    /// when another live process took this `WORKER_ID`: then whatever that id holds may be the
    /// other process's, so nothing is released or deregistered on the way out.
    ///
    /// The drain is measured from the signal: attempts get the shutdown grace, and the last steps
    /// each a fixed share of 4 s, whatever the database does meanwhile.
    pub async fn run(self, shutdown: CancellationToken, id_lost: &CancellationToken) -> Result<StillHeld, WorkerError> {
        let settings = self.settings.clone();
        let worker_id = settings.identity.worker_id.clone();
        let wake = Arc::new(Notify::new());
        let settled = Arc::new(Notify::new());
        // Everything stops on `stop`: the shutdown signal, or the write-back task dying.
        let stop = shutdown.child_token();
        let writes_failing = Arc::new(AtomicBool::new(false));

        let services = TaskTracker::new();
        match until_shutdown(self.queue.heartbeat(&settings.identity, 0), &stop).await {
            Some(Ok(())) | None => {}
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot register in hookfleet.workers yet; the heartbeat keeps trying")
            }
        }
        services.spawn(heartbeat::run(self.queue.clone(), settings.clone(), self.metrics.clone(), stop.clone()));
        services.spawn(rescue::run(
            self.queue.clone(),
            settings.clone(),
            self.metrics.clone(),
            writes_failing.clone(),
            stop.clone(),
        ));
        services.spawn(depth::run(self.queue.clone(), self.metrics.clone(), stop.clone()));
        services.spawn(prune::run(self.queue.clone(), settings.clone(), stop.clone()));
        services.spawn(listen::run(self.database_url.clone(), wake.clone(), stop.clone()));
        services.close();

        let (results, results_rx) = mpsc::unbounded_channel();
        let unwritten = Arc::new(Unwritten::default());
        let completer = Completer {
            queue: self.queue.clone(),
            settings: settings.clone(),
            metrics: self.metrics.clone(),
            settled: settled.clone(),
            unwritten: unwritten.clone(),
            writes_failing: writes_failing.clone(),
        };
        let died = Died::new(stop.clone());
        let completer_died = died.flag.clone();
        let completer = tokio::spawn(complete(completer, results_rx, died));
        let context = Arc::new(AttemptContext {
            settings: settings.clone(),
            client: self.client.clone(),
            metrics: self.metrics.clone(),
            results,
            abandon: CancellationToken::new(),
            queue: self.queue.clone(),
            unwritten: unwritten.clone(),
        });
        let attempts = TaskTracker::new();
        tracing::info!(%worker_id, batch_size = settings.batch_size, max_in_flight = settings.max_in_flight, "worker started");

        let claims = self.claim_loop(&context, &attempts, &wake, &settled, &writes_failing, &stop).await;
        let completer_died = completer_died.load(Ordering::Acquire);
        stop.cancel();

        if completer_died {
            tracing::error!(
                "the write-back task died; stopping without waiting for attempts, whose results cannot be recorded"
            );
            context.abandon.cancel();
        } else {
            tracing::info!(in_flight = attempts.len(), grace = ?settings.shutdown_grace, "stopping: no more claims, finishing attempts");
        }
        attempts.close();
        if tokio::time::timeout(settings.shutdown_grace, attempts.wait()).await.is_err() {
            tracing::warn!(abandoned = attempts.len(), "shutdown grace ran out; abandoning unfinished attempts");
            context.abandon.cancel();
            attempts.wait().await;
        }
        // The completer ends once every sender (the context's and the tasks') is gone.
        drop(context);
        let abort_completer = completer.abort_handle();
        match tokio::time::timeout(FINAL_WRITE_BACK_LIMIT, completer).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "write-back task failed"),
            Err(_) => {
                abort_completer.abort();
                tracing::warn!("the final write-back did not finish in time; those rows return after their lease");
            }
        }
        if id_lost.is_cancelled() {
            tracing::error!(%worker_id, "stopped without releasing or deregistering: another process now has this WORKER_ID");
            stop_services(&services).await;
            return Ok(StillHeld::Unknown);
        }
        // Released before waiting for anything else: every moment a row stays held is a moment no
        // other worker can deliver it.
        let sent = unwritten.ids();
        if !sent.is_empty() {
            tracing::warn!(
                unwritten = sent.len(),
                delivery_ids = ?&sent[..sent.len().min(20)],
                "results not written back; those deliveries stay in flight (not released) and return after their lease"
            );
        }
        let mut still_held = match (claims, sent.len()) {
            (ClaimLoopEnd::ClaimCutOff, _) => {
                tracing::warn!(
                    "a claim in progress at the signal did not answer in time; what it took waits for its lease"
                );
                StillHeld::Unknown
            }
            (ClaimLoopEnd::Settled, 0) => StillHeld::None,
            (ClaimLoopEnd::Settled, unwritten) => StillHeld::Rows(unwritten),
        };
        match tokio::time::timeout(RELEASE_LIMIT, self.queue.release_held(&worker_id, &sent)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(released)) => tracing::info!(released, "released unfinished deliveries to pending"),
            Ok(Err(error)) => {
                still_held = StillHeld::Unknown;
                tracing::warn!(%error, "cannot release held deliveries; their leases will expire");
            }
            Err(_) => {
                still_held = StillHeld::Unknown;
                tracing::warn!("releasing held deliveries timed out; their leases will expire");
            }
        }
        // The services first, so that no heartbeat of theirs lands after the deregistration.
        stop_services(&services).await;
        match tokio::time::timeout(DEREGISTER_LIMIT, self.queue.deregister(&worker_id)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot deregister from hookfleet.workers"),
            Err(_) => tracing::warn!("deregistering timed out; the registry forgets silent workers"),
        }
        tracing::info!(%worker_id, "worker stopped");
        if completer_died {
            return Err(WorkerError::WriteBackDied);
        }
        Ok(still_held)
    }

    async fn claim_loop(
        &self,
        context: &Arc<AttemptContext>,
        attempts: &TaskTracker,
        wake: &Notify,
        settled: &Notify,
        writes_failing: &AtomicBool,
        shutdown: &CancellationToken,
    ) -> ClaimLoopEnd {
        let settings = &self.settings;
        let slots = Arc::new(Semaphore::new(settings.max_in_flight as usize));
        let mut webhooks = PerWebhook::new(
            Arc::new(Busy::new(self.metrics.worker_slots_held.clone())),
            cache::WebhookCache::new(self.store.clone()),
        );
        let mut failures = 0u32;
        let mut load_failures = 0u32;
        // Consecutive claims in which each webhook was contended.
        let mut contended_for: HashMap<i64, u32> = HashMap::new();
        loop {
            if Instant::now() >= webhooks.next_sweep {
                self.sweep(&mut webhooks, shutdown).await;
            }
            // While results cannot be written back, more work would only add results that cannot
            // be written either; and when the database is back the waiting results must land
            // before this worker claims (or rescues) their rows again and sends them a second time.
            if writes_failing.load(Ordering::Acquire) {
                if sleep_or_shutdown(WRITE_BACK_WAIT, shutdown).await {
                    return ClaimLoopEnd::Settled;
                }
                continue;
            }
            // Wait for one free slot, then take whatever else is free, up to a batch.
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return ClaimLoopEnd::Settled,
                permit = slots.clone().acquire_owned() => match permit { Ok(permit) => permit, Err(_) => return ClaimLoopEnd::Settled },
            };
            let mut permits = vec![first];
            while permits.len() < settings.batch_size as usize {
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let requested = permits.len();
            let started = Instant::now();
            let limits = ClaimLimits {
                default_rate_limit_rps: Some(settings.rate_limit_rps),
                default_rate_limit_burst: settings.rate_limit_burst,
                webhook_slots: Some(settings.max_in_flight_per_webhook),
                busy: webhooks.busy.snapshot(),
            };
            // Raced against shutdown, but not dropped at once: a claim already sent may still
            // commit, and its rows must be held before the drain's release looks for them, or they
            // would wait a whole lease. It gets a moment to finish.
            let claim_call = self.queue.claim(&settings.identity.worker_id, requested as u32, settings.lease, &limits);
            tokio::pin!(claim_call);
            let claimed = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    return match tokio::time::timeout(CLAIM_FINISH_LIMIT, &mut claim_call).await {
                        Ok(_) => ClaimLoopEnd::Settled,
                        Err(_) => ClaimLoopEnd::ClaimCutOff,
                    };
                }
                claimed = &mut claim_call => claimed,
            };
            let claim = match claimed {
                Ok(claim) => {
                    if failures > 0 {
                        tracing::info!(failed_claims = failures, "database reachable again; claiming");
                    }
                    failures = 0;
                    claim
                }
                Err(error) => {
                    drop(permits);
                    failures += 1;
                    self.metrics.database_errors_total.with_label_values(&["claim"]).inc();
                    let pause = database_backoff(failures);
                    tracing::warn!(%error, retry_in = ?pause, "claim failed; the database may be restarting");
                    if sleep_or_shutdown(pause, shutdown).await {
                        return ClaimLoopEnd::Settled;
                    }
                    continue;
                }
            };
            self.metrics.claim_duration_seconds.observe(started.elapsed().as_secs_f64());
            self.record_holds(&claim, &mut webhooks);
            let Claim { deliveries, rate_limited, held_for_capacity, contended, .. } = claim;
            let drained = deliveries.len() < requested;
            contended_for.retain(|webhook_id, _| contended.contains(webhook_id));
            for webhook_id in &contended {
                let claims = contended_for.entry(*webhook_id).or_default();
                *claims = claims.saturating_add(1);
            }
            permits.truncate(deliveries.len());
            if !deliveries.is_empty()
                && !self.start_attempts(deliveries, permits, &mut webhooks, context, attempts, shutdown).await
            {
                // The webhooks could not be loaded (the rows went back): back off like a failed
                // claim rather than claim, fail and release in a loop that spends the webhooks'
                // tokens and probes.
                load_failures += 1;
                let pause = database_backoff(load_failures);
                if sleep_or_shutdown(pause, shutdown).await {
                    return ClaimLoopEnd::Settled;
                }
                continue;
            }
            load_failures = 0;
            if drained {
                // Nothing more may start now: sleep until an INSERT notifies us, the next token of
                // a rate-limited webhook is due, one of our attempts settles while a webhook waits
                // for capacity, or the poll interval passes.
                // A time already past (the database's clock, or a token due during the round trip)
                // means "now".
                let now = SystemTime::now();
                let next_token = rate_limited
                    .iter()
                    .filter_map(|(_, until)| until.map(|until| until.duration_since(now).unwrap_or(Duration::ZERO)))
                    .min();
                let mut pause = next_token
                    .map_or(settings.poll_interval, |wait| wait.max(MIN_TOKEN_WAIT).min(settings.poll_interval));
                // The least contended webhook decides: one another session holds for long must not
                // slow the look at one that only met another claim.
                if let Some(claims) = contended_for.values().min() {
                    let wait = CONTENDED_WAIT.saturating_mul(1 << (*claims).min(10).saturating_sub(1));
                    pause = pause.min(wait.min(CONTENDED_WAIT_MAX));
                }
                // Our own attempts settling wake us at once; capacity freed by other workers (a
                // fleet-wide max_in_flight) is looked for again soon.
                let capacity_wait = !held_for_capacity.is_empty();
                if capacity_wait {
                    pause = pause.min(CAPACITY_RECHECK);
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return ClaimLoopEnd::Settled,
                    _ = wake.notified() => {}
                    _ = settled.notified(), if capacity_wait => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Forgets what the database no longer returns (deleted webhooks; cached versions that
    /// changed) and what has been idle for [`IDLE_EVICTION`]: the decrypted URL and secrets, and
    /// the metric series. A webhook with an attempt still holding its row is kept.
    async fn sweep(&self, webhooks: &mut PerWebhook, shutdown: &CancellationToken) {
        let now = Instant::now();
        webhooks.next_sweep = now + SWEEP_INTERVAL;
        webhooks.evict_idle(now, &self.metrics);
        let cached = webhooks.targets.versions();
        if cached.is_empty() {
            return;
        }
        let ids: Vec<i64> = cached.iter().map(|(webhook_id, _)| *webhook_id).collect();
        let current = match until_shutdown(self.queue.webhook_versions(&ids), shutdown).await {
            Some(Ok(current)) => current,
            Some(Err(error)) => {
                tracing::debug!(%error, "cannot check the cached webhooks; trying again at the next sweep");
                return;
            }
            None => return,
        };
        for (webhook_id, version) in cached {
            match current.get(&webhook_id) {
                Some(current) if *current == version => {}
                // Changed: reloaded when its next row is claimed (the row carries the new version).
                Some(_) => webhooks.targets.evict(webhook_id),
                None if !webhooks.busy.is_busy(webhook_id) => webhooks.forget(webhook_id, &self.metrics),
                None => webhooks.targets.evict(webhook_id),
            }
        }
    }

    /// Metrics for what the claim held back or probed. A webhook held back is in use: its series
    /// is evicted like any other once it has been idle for long.
    fn record_holds(&self, claim: &Claim, webhooks: &mut PerWebhook) {
        let now = Instant::now();
        for (webhook_id, _) in &claim.rate_limited {
            self.metrics.rate_limited_total.with_label_values(&[&webhook_id.to_string()]).inc();
            webhooks.last_used.insert(*webhook_id, now);
        }
        for webhook_id in &claim.probes {
            tracing::info!(webhook_id, "circuit half-open: sending one probe");
        }
    }

    /// Starts an attempt for each claimed delivery that can have one. False when the webhooks
    /// could not be loaded (the rows were given back).
    async fn start_attempts(
        &self,
        claimed: Vec<ClaimedDelivery>,
        permits: Vec<OwnedSemaphorePermit>,
        webhooks: &mut PerWebhook,
        context: &Arc<AttemptContext>,
        attempts: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> bool {
        // Raced against shutdown and bounded like any database call; rows left claimed are given
        // back by the release at the end of the drain.
        let resolved = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return true,
            resolved = tokio::time::timeout(self.settings.call_limit, webhooks.targets.resolve(&claimed)) => resolved,
        };
        let resolved = resolved.unwrap_or_else(|_| {
            // As in `Queue::call`: the connection it hung on is back in the pool, unusable.
            self.queue.pool().retain(|_, _| false);
            Err(WebhookError::Database(DbError::TimedOut(self.settings.call_limit)))
        });
        let targets = match resolved {
            Ok(targets) => targets,
            Err(error) => {
                // Give the rows back untouched rather than burn their retries on our own trouble.
                self.metrics.database_errors_total.with_label_values(&["load_webhooks"]).inc();
                tracing::warn!(%error, "cannot load webhooks; releasing the claimed deliveries");
                let claims: Vec<_> =
                    claimed.iter().map(|delivery| (delivery.delivery_id, delivery.locked_until)).collect();
                let release = self.queue.release(&self.settings.identity.worker_id, &claims);
                if let Some(Err(error)) = until_shutdown(release, shutdown).await {
                    tracing::warn!(%error, "cannot release deliveries; their leases will expire");
                }
                return false;
            }
        };
        let worker_id = &self.settings.identity.worker_id;
        let mut disabled = Vec::new();
        let mut out_of_time = Vec::new();
        let mut unusable: HashMap<String, Vec<i64>> = HashMap::new();
        let now = Instant::now();
        for (delivery, permit) in claimed.into_iter().zip(permits) {
            webhooks.last_used.insert(delivery.webhook_id, now);
            let target = match targets.get(&delivery.webhook_id) {
                // The claim or the webhook load took so long that too little of the lease is left:
                // not an attempt, so give the row back untouched.
                Some(Ok(target))
                    if self
                        .settings
                        .attempt_timeout(target.timeout, delivery.lease_deadline.saturating_duration_since(now))
                        .is_none() =>
                {
                    out_of_time.push((delivery.delivery_id, delivery.locked_until));
                    continue;
                }
                Some(Ok(target)) if target.enabled => target.clone(),
                Some(Ok(_)) => {
                    disabled.push((delivery.delivery_id, delivery.locked_until));
                    continue;
                }
                Some(Err(reason)) => {
                    unusable.entry(reason.clone()).or_default().push(delivery.delivery_id);
                    continue;
                }
                // Deleted after the claim: its rows went with it (ON DELETE CASCADE).
                None => continue,
            };
            let span = tracing::info_span!(
                "attempt",
                delivery_id = delivery.delivery_id,
                webhook_id = delivery.webhook_id,
                message_id = %delivery.message_id
            );
            let slot = webhooks.busy.hold(delivery.webhook_id, permit);
            let webhook_metrics = webhooks
                .series
                .entry(delivery.webhook_id)
                .or_insert_with(|| Arc::new(WebhookMetrics::new(&self.metrics, delivery.webhook_id)))
                .clone();
            attempts.spawn(attempt(context.clone(), delivery, target, webhook_metrics, slot).instrument(span));
        }
        if !disabled.is_empty() {
            if let Some(Err(error)) = until_shutdown(self.queue.release(worker_id, &disabled), shutdown).await {
                tracing::warn!(%error, "cannot release deliveries of disabled webhooks");
            }
        }
        if !out_of_time.is_empty() {
            tracing::warn!(
                deliveries = out_of_time.len(),
                "claimed deliveries have too little of their lease left to attempt; releasing them"
            );
            if let Some(Err(error)) = until_shutdown(self.queue.release(worker_id, &out_of_time), shutdown).await {
                tracing::warn!(%error, "cannot release deliveries; their leases will expire");
            }
        }
        // Not an attempt and not the receiver's fault: the rows wait, their retries untouched,
        // until this worker (or another with the right keys) can use the webhook.
        for (reason, ids) in unusable {
            self.metrics.database_errors_total.with_label_values(&["unusable_webhook"]).inc();
            let defer = self.queue.defer(worker_id, &ids, UNUSABLE_WEBHOOK_DELAY, &reason);
            if let Some(Err(error)) = until_shutdown(defer, shutdown).await {
                tracing::warn!(%error, "cannot defer deliveries of an unusable webhook");
            }
        }
        true
    }
}

/// One delivery attempt: sign, send, decide, hand the result to the completer.
async fn attempt(
    context: Arc<AttemptContext>,
    mut delivery: ClaimedDelivery,
    target: Arc<WebhookTarget>,
    webhook_metrics: Arc<WebhookMetrics>,
    slot: Slot,
) {
    let metrics = &context.metrics;
    let settings = &context.settings;
    // Counted down however the task ends, a panic included.
    let _in_flight = InFlight::start(&metrics.worker_in_flight);
    let started_at = SystemTime::now();
    let started = Instant::now();
    let max_retries = delivery.max_retries.unwrap_or(settings.default_max_retries);

    let timestamp = started_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let body = Bytes::from(std::mem::take(&mut delivery.body));
    // Checked now, at each attempt: a cached target's rotated-out secret stops signing at its
    // expiry without any change to the webhook.
    let secrets = target.signing_secrets(timestamp);
    let result = match signing::signature_headers(secrets, &delivery.message_id, timestamp, &body) {
        Ok(headers) => {
            // The claim loop checked that enough of the lease was left; checked again here, at the
            // last moment before sending, since the task may have waited for a thread.
            let lease_left = delivery.lease_deadline.saturating_duration_since(Instant::now());
            let Some(timeout) = settings.attempt_timeout(target.timeout, lease_left) else {
                tracing::warn!("too little of the lease is left to attempt; releasing the delivery");
                let claim = [(delivery.delivery_id, delivery.locked_until)];
                let release = context.queue.release(&settings.identity.worker_id, &claim);
                tokio::select! {
                    released = tokio::time::timeout(ATTEMPT_RELEASE_LIMIT, release) => match released {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => tracing::warn!(%error, "cannot release the delivery; its lease will expire"),
                        Err(_) => tracing::warn!("releasing the delivery timed out; its lease will expire"),
                    },
                    // Shutdown's own release gives the row back.
                    _ = context.abandon.cancelled() => {}
                }
                return;
            };
            let request = DeliveryRequest { url: target.url.clone(), headers, body, timeout };
            tokio::select! {
                outcome = context.client.send(request) => outcome.result,
                _ = context.abandon.cancelled() => return,
            }
        }
        // The schema only admits message ids that are valid header values; this is defence.
        Err(error) => Err(DeliveryError { class: crate::delivery::ErrorClass::Protocol, message: error.to_string() }),
    };
    let decision =
        settings.retry.decide(&result, delivery.retry_count, max_retries, SystemTime::now(), &mut rand::rng());
    let duration = started.elapsed();

    webhook_metrics.attempt(decision.outcome, duration);

    let error_class = retry::error_class(&result).map(str::to_owned);
    let (status_code, error_message, excerpt) = match result {
        Ok(response) => (
            Some(response.status),
            status_error(&response),
            Some(response.body_excerpt).filter(|excerpt| !excerpt.is_empty()),
        ),
        Err(error) => (None, Some(error.to_string()), None),
    };
    // Per-attempt outcomes are counted (webhook_deliveries_total) and logged at debug only: many
    // failing webhooks must not flood the log. What an operator acts on, a circuit opening, is
    // logged by the circuit sampler.
    match decision.outcome {
        Outcome::Delivered => tracing::debug!(status = status_code, ?duration, "delivered"),
        Outcome::Retry => {
            tracing::debug!(status = status_code, error = error_message.as_deref(), retry_in = ?decision.delay, "attempt failed; will retry")
        }
        Outcome::Dead => tracing::debug!(status = status_code, error = error_message.as_deref(), "delivery is dead"),
    }
    let record = AttemptRecord {
        delivery_id: delivery.delivery_id,
        webhook_id: delivery.webhook_id,
        outcome: decision.outcome,
        retry_count: decision.retry_count,
        retry_delay: decision.delay,
        attempt_number: delivery.retry_count + 1,
        status_code,
        started_at,
        duration,
        error_class,
        error_message,
        response_excerpt: excerpt,
        locked_until: delivery.locked_until,
    };
    context.unwritten.add(record.delivery_id);
    // The completer ends only when the last sender is dropped, so a send fails only if it died:
    // then the engine is stopping (see `Engine::run`) and this result cannot be recorded; its row
    // stays held, not released, and returns after its lease.
    if let Err(mpsc::error::SendError((record, _slot))) = context.results.send((record, slot)) {
        tracing::error!(
            delivery_id = record.delivery_id,
            "the write-back task is gone; this attempt's result is lost and the delivery returns after its lease"
        );
    }
}

/// Holds one count of `worker_in_flight` for as long as it lives.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn start(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `last_error` for a non-2xx answer.
fn status_error(response: &Response) -> Option<String> {
    (!(200..300).contains(&response.status)).then(|| format!("HTTP {}", response.status))
}

/// Stops the engine when dropped armed (the completer's future ended without its channel closing:
/// a panic, an abort), saying so in `flag` before `stop` fires, so that whoever wakes on `stop`
/// can tell.
struct Died {
    stop: CancellationToken,
    flag: Arc<AtomicBool>,
    armed: bool,
}

impl Died {
    fn new(stop: CancellationToken) -> Self {
        Self { stop, flag: Arc::new(AtomicBool::new(false)), armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Died {
    fn drop(&mut self) {
        if self.armed {
            self.flag.store(true, Ordering::Release);
            self.stop.cancel();
        }
    }
}

/// What the single writer of results works with.
struct Completer {
    queue: Queue,
    settings: Arc<WorkerSettings>,
    metrics: Arc<Metrics>,
    /// Notified after each batch: the claim loop may be waiting for capacity.
    settled: Arc<Notify>,
    unwritten: Arc<Unwritten>,
    /// True while write-backs fail for want of a database: claims and rescues wait.
    writes_failing: Arc<AtomicBool>,
}

/// The single writer of results: batches whatever has finished and writes it in one statement.
/// `died` stops the engine if this task ends any other way than its channel closing (a panic, an
/// abort): every later result would be lost.
async fn complete(completer: Completer, mut results: mpsc::UnboundedReceiver<(AttemptRecord, Slot)>, died: Died) {
    let Completer { queue, settings, metrics, settled, unwritten, writes_failing } = completer;
    let mut batch = Vec::with_capacity(MAX_COMPLETE_BATCH);
    while results.recv_many(&mut batch, MAX_COMPLETE_BATCH).await > 0 {
        let (records, slots): (Vec<AttemptRecord>, Vec<Slot>) = batch.drain(..).unzip();
        write_back(&queue, &settings, &metrics, &writes_failing, &records).await;
        // The database answered. Claims and rescues resume only once every result that waited
        // through the outage is written: the rows of those still queued may have expired leases.
        if results.is_empty() {
            writes_failing.store(false, Ordering::Release);
        }
        // Written, or given up on (those rows come back through their lease): either way no
        // longer waiting, and never to be reported as held at shutdown.
        let ids: Vec<i64> = records.iter().map(|record| record.delivery_id).collect();
        unwritten.remove(&ids);
        drop(slots);
        settled.notify_one();
    }
    died.disarm();
}

/// Writes one batch, retrying through database outages for as long as they last: while the
/// database is unreachable no other worker can rescue the rows either, and the fence still
/// matches when it is back, so giving up would only send every waiting message again and lose its
/// attempt history and breaker input. The retry ends when the write lands (settling the rows, or
/// reporting their leases lost), or when the shutdown's last steps abort it. A batch the database
/// refuses as data (SQLSTATE classes 22 and 23) is split, so that one bad record cannot keep the
/// others from settling.
async fn write_back(
    queue: &Queue,
    settings: &WorkerSettings,
    metrics: &Metrics,
    writes_failing: &AtomicBool,
    batch: &[AttemptRecord],
) {
    let mut failures = 0;
    let mut failing_since = None;
    loop {
        match queue.complete_many(&settings.identity.worker_id, batch, settings.breaker).await {
            Ok(report) => {
                if let Some(since) = failing_since {
                    tracing::info!(rows = batch.len(), failures, after = ?Instant::now().duration_since(since), "results written back after the database came back");
                }
                if !report.lost.is_empty() {
                    metrics.lease_lost_total.inc_by(report.lost.len() as u64);
                    tracing::warn!(
                        lost = report.lost.len(),
                        delivery_ids = ?&report.lost[..report.lost.len().min(20)],
                        "write-back matched no row for some attempts: lease lost (expired and taken by another claim, or the webhook was deleted)"
                    );
                }
                return;
            }
            Err(error) => match failure_kind(&error) {
                // Refused as data, or refused for now (a statement timeout behind a row another
                // session holds, a deadlock): split, so that one bad or blocked row cannot keep
                // the others from settling. Claims go on meanwhile: the database answers.
                FailureKind::Data | FailureKind::Refused if batch.len() > 1 => {
                    metrics.database_errors_total.with_label_values(&["complete"]).inc();
                    tracing::warn!(%error, rows = batch.len(), "the database refuses a batch; writing it back in halves");
                    let (left, right) = batch.split_at(batch.len() / 2);
                    Box::pin(write_back(queue, settings, metrics, writes_failing, left)).await;
                    Box::pin(write_back(queue, settings, metrics, writes_failing, right)).await;
                    return;
                }
                FailureKind::Data => {
                    metrics.database_errors_total.with_label_values(&["complete"]).inc();
                    let delivery_id = batch.first().map(|record| record.delivery_id);
                    tracing::error!(%error, ?delivery_id, "the database refuses this result; the row returns after its lease");
                    return;
                }
                // One result the database will not take now (its row held by another session, say):
                // tried a few times, then given up, since every result behind it waits meanwhile.
                // The row comes back after its lease and is delivered again (at least once).
                FailureKind::Refused => {
                    failures += 1;
                    metrics.database_errors_total.with_label_values(&["complete"]).inc();
                    let delivery_id = batch.first().map(|record| record.delivery_id);
                    if failures >= REFUSED_TRIES {
                        tracing::error!(%error, ?delivery_id, "giving up writing this result back; the row will be delivered again after its lease");
                        return;
                    }
                    tracing::warn!(%error, ?delivery_id, failures, "the database refuses this result for now; retrying");
                    tokio::time::sleep(database_backoff(failures).min(WRITE_BACK_RETRY_MAX)).await;
                }
                FailureKind::Unreachable => {
                    failures += 1;
                    failing_since.get_or_insert_with(Instant::now);
                    writes_failing.store(true, Ordering::Release);
                    metrics.database_errors_total.with_label_values(&["complete"]).inc();
                    let pause = database_backoff(failures).min(WRITE_BACK_RETRY_MAX);
                    // Loud at first, then once in a while: an outage must not flood the log.
                    if failures <= 3 || failures % 30 == 0 {
                        tracing::warn!(%error, rows = batch.len(), failures, retry_in = ?pause, "cannot write results back; retrying until the database answers");
                    }
                    tokio::time::sleep(pause).await;
                }
            },
        }
    }
}

/// Why a write-back failed, as far as what to do next goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// The database cannot be reached or cannot write (down, restarting, failing over, a
    /// read-only standby, out of connections, not answering): retried for as long as it lasts,
    /// with claims and rescues paused.
    Unreachable,
    /// Refused as data (SQLSTATE classes 22 and 23): retrying cannot help.
    Data,
    /// Refused by a reachable database for a reason that may pass (a statement timeout behind a
    /// lock, a deadlock, a permission): retried, but without holding the fleet's work back.
    Refused,
}

fn failure_kind(error: &DbError) -> FailureKind {
    let DbError::Postgres(error) = error else {
        // Checkout, timed out, closed: nothing answered.
        return FailureKind::Unreachable;
    };
    let Some(code) = error.code().map(|code| code.code()) else {
        // No SQLSTATE: the connection failed, not the statement.
        return FailureKind::Unreachable;
    };
    match code {
        _ if code.starts_with("22") || code.starts_with("23") => FailureKind::Data,
        // Connection exceptions; admin shutdown, crash shutdown, cannot connect now; too many
        // connections; a read-only transaction (connected to a standby during a failover).
        _ if code.starts_with("08") || code.starts_with("57P") => FailureKind::Unreachable,
        "53300" | "25006" => FailureKind::Unreachable,
        _ => FailureKind::Refused,
    }
}

/// 100 ms doubling to 5 s: fast enough to notice a restarted database, slow enough not to hammer it.
fn database_backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}

/// Waits a moment for the services, which stop at once on `stop` (their ticks race it); one
/// stuck in something that ignores cancellation is left behind rather than delaying the exit.
async fn stop_services(services: &TaskTracker) {
    if tokio::time::timeout(SERVICES_STOP_LIMIT, services.wait()).await.is_err() {
        tracing::warn!(services = services.len(), "maintenance services did not stop in time; leaving them");
    }
}

/// `work`'s result, unless shutdown fires first (`None`).
async fn until_shutdown<T>(work: impl Future<Output = T>, shutdown: &CancellationToken) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        done = work => Some(done),
    }
}

/// Sleeps unless shutdown fires first; true when it did.
async fn sleep_or_shutdown(pause: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(pause) => false,
    }
}

/// Runs `tick` every `interval` until shutdown; the shape of every maintenance service.
async fn run_every<F, Fut>(name: &'static str, interval: Duration, shutdown: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = timer.tick() => {}
        }
        // A tick in progress (its database call) never holds up the shutdown.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            () = tick() => {}
        }
    }
    tracing::debug!(service = name, "stopped");
}

/// How the claim loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimLoopEnd {
    /// Every claim it sent has answered: what it took is held by this worker.
    Settled,
    /// A claim did not answer within [`CLAIM_FINISH_LIMIT`] of the signal: it may still commit,
    /// after the drain's release, and hold rows until their lease.
    ClaimCutOff,
}

/// Targets by webhook id, as the cache hands them out.
type Targets = HashMap<i64, Result<Arc<WebhookTarget>, String>>;

/// How often the claim loop sweeps its per-webhook state (see `Engine::sweep`).
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// A webhook with no claimed row for this long is forgotten by this worker (decrypted target and
/// metric series); its next row loads it again.
const IDLE_EVICTION: Duration = Duration::from_secs(15 * 60);

/// What the claim loop keeps per webhook: its attempts in progress, its decrypted target, its
/// metric series, and when one of its rows was last claimed.
struct PerWebhook {
    busy: Arc<Busy>,
    targets: cache::WebhookCache,
    series: HashMap<i64, Arc<WebhookMetrics>>,
    last_used: HashMap<i64, Instant>,
    next_sweep: Instant,
}

impl PerWebhook {
    fn new(busy: Arc<Busy>, targets: cache::WebhookCache) -> Self {
        Self {
            busy,
            targets,
            series: HashMap::new(),
            last_used: HashMap::new(),
            next_sweep: Instant::now() + SWEEP_INTERVAL,
        }
    }

    /// Forgets the webhooks idle for [`IDLE_EVICTION`] at `now`, unless an attempt of theirs still
    /// holds its row (its result would count into a removed series).
    fn evict_idle(&mut self, now: Instant, metrics: &Metrics) {
        let idle: Vec<i64> = self
            .last_used
            .iter()
            .filter(|(webhook_id, used)| {
                now.saturating_duration_since(**used) >= IDLE_EVICTION && !self.busy.is_busy(**webhook_id)
            })
            .map(|(webhook_id, _)| *webhook_id)
            .collect();
        for webhook_id in idle {
            self.forget(webhook_id, metrics);
        }
    }

    fn forget(&mut self, webhook_id: i64, metrics: &Metrics) {
        self.targets.evict(webhook_id);
        self.last_used.remove(&webhook_id);
        self.series.remove(&webhook_id);
        metrics.remove_webhook(webhook_id);
    }
}

/// This worker's attempts per webhook that still hold their row (started and not yet written
/// back): what the claim compares with `HOOKFLEET_MAX_IN_FLIGHT_PER_WEBHOOK`. `held` is their sum,
/// exported as `worker_slots_held`.
struct Busy {
    counts: std::sync::Mutex<HashMap<i64, u32>>,
    held: prometheus::IntGauge,
}

impl Busy {
    fn new(held: prometheus::IntGauge) -> Self {
        Self { counts: std::sync::Mutex::default(), held }
    }

    fn is_busy(&self, webhook_id: i64) -> bool {
        self.counts().contains_key(&webhook_id)
    }

    fn snapshot(&self) -> Vec<(i64, u32)> {
        self.counts().iter().map(|(webhook_id, busy)| (*webhook_id, *busy)).collect()
    }

    fn hold(self: &Arc<Self>, webhook_id: i64, permit: OwnedSemaphorePermit) -> Slot {
        *self.counts().entry(webhook_id).or_default() += 1;
        self.held.inc();
        Slot { _permit: permit, busy: self.clone(), webhook_id }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<i64, u32>> {
        // The map stays consistent whatever panicked while holding it: every change is one step.
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Deliveries whose attempt finished and whose result the completer has not taken up yet, counted
/// per delivery because one process may hold an expired claim's result and a newer claim's of the
/// same row.
#[derive(Default)]
struct Unwritten(std::sync::Mutex<HashMap<i64, u32>>);

impl Unwritten {
    fn add(&self, delivery_id: i64) {
        *self.counts().entry(delivery_id).or_default() += 1;
    }

    fn remove(&self, delivery_ids: &[i64]) {
        let mut counts = self.counts();
        for delivery_id in delivery_ids {
            if let Some(count) = counts.get_mut(delivery_id) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(delivery_id);
                }
            }
        }
    }

    fn ids(&self) -> Vec<i64> {
        self.counts().keys().copied().collect()
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<i64, u32>> {
        // Every change is one step on one entry, so the map is consistent whatever panicked.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One attempt slot: a permit of `HOOKFLEET_MAX_IN_FLIGHT`, counted against its webhook until the
/// attempt's result is written back.
struct Slot {
    _permit: OwnedSemaphorePermit,
    busy: Arc<Busy>,
    webhook_id: i64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy.held.dec();
        let mut counts = self.busy.counts();
        if let Some(busy) = counts.get_mut(&self.webhook_id) {
            *busy -= 1;
            if *busy == 0 {
                counts.remove(&self.webhook_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool that is never used: building one does not connect.
    fn idle_pool() -> deadpool_postgres::Pool {
        db::worker_pool("host=/nonexistent dbname=none", 1, Duration::from_secs(1)).expect("pool")
    }

    fn settings() -> Arc<WorkerSettings> {
        let config = Config::from_env_map(&HashMap::new()).expect("defaults");
        Arc::new(WorkerSettings::from_config(&config))
    }

    #[tokio::test]
    async fn a_panicking_attempt_gives_its_in_flight_count_back() {
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        let held = gauge.clone();
        let task = tokio::spawn(async move {
            let _in_flight = InFlight::start(&held);
            assert_eq!(held.get(), 1);
            panic!("an attempt that panics");
        });
        assert!(task.await.is_err());
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn a_completer_that_dies_stops_the_engine_and_one_that_drains_does_not() {
        let completer = || Completer {
            queue: Queue::new(idle_pool()),
            settings: settings(),
            metrics: Arc::new(Metrics::new().unwrap()),
            settled: Arc::new(Notify::new()),
            unwritten: Arc::new(Unwritten::default()),
            writes_failing: Arc::new(AtomicBool::new(false)),
        };
        // Dies (aborted here, as a panic would end it): the engine's stop fires.
        let stop = CancellationToken::new();
        let (_results, receiver) = mpsc::unbounded_channel();
        let died = Died::new(stop.clone());
        let flag = died.flag.clone();
        let task = tokio::spawn(complete(completer(), receiver, died));
        task.abort();
        let _ = task.await;
        assert!(stop.is_cancelled(), "a dead completer must stop the engine");
        assert!(flag.load(Ordering::Acquire), "and say that it died");
        // Ends because every sender is gone (the normal end of a drain): nothing fires.
        let stop = CancellationToken::new();
        let (results, receiver) = mpsc::unbounded_channel();
        drop(results);
        let died = Died::new(stop.clone());
        let flag = died.flag.clone();
        complete(completer(), receiver, died).await;
        assert!(!stop.is_cancelled());
        assert!(!flag.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn idle_webhooks_are_forgotten_with_their_series_unless_an_attempt_holds_a_row() {
        let metrics = Metrics::new().unwrap();
        let keyring = Keyring::from_settings(Some(&crate::crypto::EncryptionKey::generate_base64().into()), &[])
            .expect("keyring");
        let store = WebhookStore::new(idle_pool(), Arc::new(keyring));
        let busy = Arc::new(Busy::new(metrics.worker_slots_held.clone()));
        let mut webhooks = PerWebhook::new(busy.clone(), cache::WebhookCache::new(store));
        let start = Instant::now();
        for webhook_id in [7, 8, 9] {
            let series = Arc::new(WebhookMetrics::new(&metrics, webhook_id));
            series.attempt(Outcome::Delivered, Duration::from_millis(3));
            webhooks.series.insert(webhook_id, series);
            webhooks.last_used.insert(webhook_id, start);
        }
        webhooks.last_used.insert(9, start + IDLE_EVICTION);
        let semaphore = Arc::new(Semaphore::new(1));
        let slot = busy.hold(8, semaphore.try_acquire_owned().unwrap());
        assert_eq!(metrics.worker_slots_held.get(), 1);

        webhooks.evict_idle(start + IDLE_EVICTION, &metrics);
        let text = metrics.render();
        assert!(!text.contains("webhook_id=\"7\""), "idle webhook 7 keeps its series:\n{text}");
        assert!(text.contains("webhook_id=\"8\""), "webhook 8 has an attempt holding its row");
        assert!(text.contains("webhook_id=\"9\""), "webhook 9 was used recently");
        assert_eq!(webhooks.series.len(), 2);

        drop(slot);
        assert_eq!(metrics.worker_slots_held.get(), 0);
        webhooks.evict_idle(start + IDLE_EVICTION, &metrics);
        assert!(!metrics.render().contains("webhook_id=\"8\""));
    }

    #[test]
    fn the_duration_histogram_covers_the_longest_attempt_allowed() {
        let metrics = Metrics::new().unwrap();
        metrics.delivery_duration_seconds.with_label_values(&["1"]).observe(299.0);
        let text = metrics.render();
        let bucket = text
            .lines()
            .filter(|line| line.starts_with("webhook_delivery_duration_seconds_bucket"))
            .find(|line| !line.contains("+Inf") && line.ends_with(" 1"));
        assert!(bucket.is_some(), "a 5-minute attempt lands only in +Inf:\n{text}");
    }
}
