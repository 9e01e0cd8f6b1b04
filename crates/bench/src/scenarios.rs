//! The scenarios. Each one gets a fresh database on the shared throwaway server, is bounded in
//! rows and seconds, and returns its figures as a [`Run`] (an incomplete run is reported as such,
//! never turned into a failure).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hookfleet_core::pg_embedded::EmbeddedPostgres;
use tokio::time::MissedTickBehavior;
use tokio_postgres::Client;

use crate::db::{self, BenchDb, PAD};
use crate::procs::{self, Fleet, WorkerSpec};
use crate::receiver::{self, Receiver, Summary};
use crate::report::Run;

/// Everything the scenarios share.
pub struct Env<'a> {
    pub server: &'a EmbeddedPostgres,
    pub receiver: Arc<Receiver>,
    /// The receiver's base URL, `http://…` or `https://…`.
    pub receiver_url: String,
    /// The receiver's CA certificate file when it speaks HTTPS.
    pub ca_file: Option<PathBuf>,
    pub worker_binary: PathBuf,
    pub batch_size: u32,
    pub max_in_flight: u32,
    /// Longest a drain (or the ceiling) may take.
    pub timeout: Duration,
    /// Longest the paced scenarios wait after the producer stopped for the last arrival.
    pub settle_timeout: Duration,
    pub tick: Duration,
    /// pg_stat_statements is loaded: report each run's top statements.
    pub statements: bool,
    /// pg_stat_statements is loaded for the wide scenarios' claim figures.
    pub claim_stats: bool,
}

impl Env<'_> {
    pub(crate) fn url(&self) -> impl Fn(&str) -> String + '_ {
        |name| self.server.connection_string(name)
    }

    pub(crate) fn spec<'b>(&'b self, db: &'b BenchDb) -> WorkerSpec<'b> {
        WorkerSpec {
            binary: &self.worker_binary,
            database_url: &db.url,
            encryption_key: &db.encryption_key,
            batch_size: self.batch_size,
            max_in_flight: self.max_in_flight,
            ca_certificates: self.ca_file.as_deref(),
        }
    }
}

/// CPU counters at the start of a measured window.
pub(crate) struct Meter {
    postmaster: u32,
    workers: f64,
    server: f64,
    bench: f64,
    machine: Option<(u64, u64)>,
}

impl Meter {
    pub(crate) fn start(postmaster: u32, fleet: Option<&Fleet>) -> Meter {
        Meter {
            postmaster,
            workers: fleet.map_or(0.0, Fleet::cpu_seconds),
            server: procs::server_cpu_seconds(postmaster),
            bench: procs::own_cpu_seconds(),
            machine: procs::machine_ticks(),
        }
    }

    /// Fills the CPU (per 1,000 deliveries) and RSS figures of `run`.
    pub(crate) fn finish(&self, fleet: Option<&Fleet>, deliveries: u64, run: &mut Run) {
        let per_1000 = |seconds: f64| seconds / (deliveries.max(1) as f64) * 1000.0;
        if let Some(fleet) = fleet {
            run.worker_cpu_seconds_per_1000 = Some(per_1000(fleet.cpu_seconds() - self.workers));
            let (peak, now) = fleet.rss_kb();
            run.worker_rss_peak_mb = Some(peak as f64 / 1024.0);
            run.worker_rss_end_mb = Some(now as f64 / 1024.0);
        }
        run.postgres_cpu_seconds_per_1000 = Some(per_1000(procs::server_cpu_seconds(self.postmaster) - self.server));
        run.bench_cpu_seconds_per_1000 = Some(per_1000(procs::own_cpu_seconds() - self.bench));
        if let (Some((busy_before, total_before)), Some((busy, total))) = (self.machine, procs::machine_ticks()) {
            if total > total_before {
                run.machine_busy_percent = Some((busy - busy_before) as f64 / (total - total_before) as f64 * 100.0);
            }
        }
    }
}

pub(crate) fn apply_summary(run: &mut Run, summary: &Summary) {
    run.requests = summary.requests;
    run.delivered = summary.unique;
    run.duplicates = Some(summary.duplicates);
    run.seconds = summary.seconds;
    run.deliveries_per_second = summary.unique as f64 / summary.seconds.max(1e-9);
    if let Some([p50, p95, p99, max]) = summary.latency_ms {
        run.latency_p50_ms = Some(p50);
        run.latency_p95_ms = Some(p95);
        run.latency_p99_ms = Some(p99);
        run.latency_max_ms = Some(max);
    }
}

/// Waits until `expected` distinct deliveries arrived or `deadline` passed; stops early when a
/// worker died. Returns whether everything arrived.
async fn wait_for_arrivals(env: &Env<'_>, fleet: &mut Fleet, expected: u64, deadline: Instant) -> anyhow::Result<bool> {
    loop {
        // Counting requests is free; the distinct count is only taken once it can be enough, and
        // then (duplicates arrived) only every quarter second.
        let mut pause = Duration::from_millis(20);
        if env.receiver.requests() >= expected {
            if env.receiver.unique() >= expected {
                return Ok(true);
            }
            pause = Duration::from_millis(250);
        }
        if let Some(problem) = fleet.exited() {
            bail!(problem);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
    }
}

/// Waits until no row is pending or in flight, or `deadline`; returns when that happened.
pub(crate) async fn wait_for_settled(db: &BenchDb, deadline: Instant) -> anyhow::Result<Option<Instant>> {
    loop {
        if db.unsettled().await? == 0 {
            return Ok(Some(Instant::now()));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the workers stopped: dead tuples and the queue's size, then the database goes.
pub(crate) async fn close(env: &Env<'_>, db: BenchDb, run: &mut Run) -> anyhow::Result<()> {
    run.statements = db.top_statements(20).await?;
    run.dead_tuples_after = Some(db.dead_tuples().await?);
    run.queue_after = Some(db.queue_size().await?);
    db.drop_database(env.url()).await
}

/// **drain**: `rows` pre-inserted rows for one webhook, then `workers` workers; deliveries/s from
/// the first to the last arrival.
pub async fn drain(env: &Env<'_>, rows: u32, workers: u32) -> anyhow::Result<Run> {
    let db =
        db::create(env.url(), &format!("bench_drain_{workers}"), &env.receiver_url, 1, &[], env.statements).await?;
    db.prefill(rows).await?;
    let mut run = Run {
        scenario: "drain".into(),
        label: format!("drain, {workers} worker{}", if workers == 1 { "" } else { "s" }),
        workers,
        rows: u64::from(rows),
        queue_before: Some(db.queue_size().await?),
        ..Run::default()
    };
    let postmaster = db.postmaster_pid().await?;
    env.receiver.take();
    db.reset_statements().await?;
    let meter = Meter::start(postmaster, None);
    let start = Instant::now();
    let mut fleet = Fleet::start(&env.spec(&db), workers, &format!("drain{workers}"))?;
    let deadline = start + env.timeout;
    let arrived = wait_for_arrivals(env, &mut fleet, u64::from(rows), deadline).await?;
    let settled = wait_for_settled(&db, deadline).await?;
    // The workers' CPU since they started (they were started inside the window).
    meter.finish(Some(&fleet), u64::from(rows), &mut run);
    fleet.stop();
    let arrivals = env.receiver.take();
    let summary = receiver::summarize(&arrivals);
    apply_summary(&mut run, &summary);
    run.settled_seconds = settled.map(|at| (at - start).as_secs_f64());
    run.complete = arrived && settled.is_some();
    if let Some(first) = summary.first {
        run.note = format!("first arrival {:.2} s after the workers were started", (first - start).as_secs_f64());
    }
    if !run.complete {
        run.note = format!("stopped after {:?}; {}", env.timeout, run.note);
    }
    run.latency_split_ms = db.latency_split().await?;
    close(env, db, &mut run).await?;
    Ok(run)
}

/// How the paced producer enqueues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// One multi-row INSERT per tick.
    Steady,
    /// Transactions of 10 single-row INSERTs.
    Outbox,
    /// `hookfleet.publish` to every subscribed webhook, one statement per tick.
    Fanout,
    /// One multi-row INSERT per tick, each row to the next webhook of a [`Spread`].
    Wide,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Load::Steady => "steady",
            Load::Outbox => "outbox",
            Load::Fanout => "fanout",
            Load::Wide => "wide",
        }
    }
}

pub const FANOUT_EVENT: &str = "bench.fanout";
const OUTBOX_TRANSACTION_ROWS: u64 = 10;

/// What a paced scenario is asked to do.
pub struct Paced {
    pub load: Load,
    /// Rows (steady, outbox) or events (fanout) per second, over all producers.
    pub rate: f64,
    pub duration: Duration,
    pub workers: u32,
    pub producers: u32,
    /// Webhooks subscribed to the fanout event (1 for steady and outbox).
    pub webhooks: u16,
}

/// **steady / outbox / fanout**: workers running first, then producers at a fixed offered rate
/// for a fixed time; enqueue→arrival latency from `sent_at_us` in the body.
pub async fn paced(env: &Env<'_>, paced: &Paced) -> anyhow::Result<Run> {
    let name = paced.load.name();
    let events: &[&str] = if paced.load == Load::Fanout { &[FANOUT_EVENT] } else { &[] };
    let db = db::create(
        env.url(),
        &format!("bench_{name}_{}", paced.rate as u64),
        &env.receiver_url,
        paced.webhooks,
        events,
        env.statements,
    )
    .await?;
    db.settle_storage().await?;
    let per_event = if paced.load == Load::Fanout { u64::from(paced.webhooks) } else { 1 };
    let mut run = Run {
        scenario: name.into(),
        label: match paced.load {
            Load::Fanout => format!("fanout {}/s × {} webhooks", paced.rate, paced.webhooks),
            _ => format!("{name} {}/s", paced.rate),
        },
        workers: paced.workers,
        offered_rate: Some(paced.rate * per_event as f64),
        queue_before: Some(db.queue_size().await?),
        ..Run::default()
    };
    let postmaster = db.postmaster_pid().await?;
    let mut fleet = Fleet::start(&env.spec(&db), paced.workers, name)?;
    db.wait_for_workers(paced.workers, Duration::from_secs(30)).await?;
    env.receiver.take();
    db.reset_statements().await?;
    let meter = Meter::start(postmaster, Some(&fleet));

    let mut producers = Vec::new();
    for n in 0..paced.producers {
        let client = hookfleet_core::db::connect(&db.url, "bench-producer").await?;
        let producer = Producer {
            client,
            load: paced.load,
            webhook_id: db.webhook_ids[0],
            spread: None,
            rate: paced.rate / f64::from(paced.producers),
            duration: paced.duration,
            tick: env.tick,
            first_seq: i64::from(n) * 1_000_000_000,
        };
        producers.push(tokio::spawn(producer.run()));
    }
    let start = Instant::now();
    let mut inserted = 0u64;
    let mut units = 0u64;
    let mut producer_seconds: f64 = paced.duration.as_secs_f64();
    for producer in producers {
        let done = producer.await.context("producer task")??;
        inserted += done.deliveries;
        units += done.units;
        producer_seconds = producer_seconds.max(done.seconds);
    }
    let produced_at = Instant::now();
    run.rows = inserted;
    run.achieved_rate = Some(units as f64 * per_event as f64 / producer_seconds);
    let deadline = produced_at + env.settle_timeout;
    let arrived = wait_for_arrivals(env, &mut fleet, inserted, deadline).await?;
    let settled = wait_for_settled(&db, deadline).await?;
    meter.finish(Some(&fleet), inserted, &mut run);
    fleet.stop();
    run.latency_split_ms = db.latency_split().await?;
    let arrivals = env.receiver.take();
    let summary = receiver::summarize(&arrivals);
    apply_summary(&mut run, &summary);
    run.settled_seconds = settled.map(|at| (at - produced_at).as_secs_f64());
    run.complete = arrived && settled.is_some();
    run.note = format!(
        "producer ran {:.1} s ({} connection{}); settled {} after it stopped",
        (produced_at - start).as_secs_f64(),
        paced.producers,
        if paced.producers == 1 { "" } else { "s" },
        run.settled_seconds.map_or_else(|| format!("not within {:?}", env.settle_timeout), |s| format!("{s:.2} s")),
    );
    if !run.complete {
        run.note += "; latency percentiles cover only the deliveries that arrived";
    }
    close(env, db, &mut run).await?;
    Ok(run)
}

pub(crate) struct Producer {
    pub client: Client,
    pub load: Load,
    pub webhook_id: i64,
    /// Load::Wide: the webhooks its rows go to.
    pub spread: Option<Arc<Spread>>,
    /// Units (rows, or events for fanout) per second for this producer.
    pub rate: f64,
    pub duration: Duration,
    pub tick: Duration,
    pub first_seq: i64,
}

pub(crate) struct Produced {
    /// Rows inserted into the queue (fanout: events × subscribed webhooks).
    pub deliveries: u64,
    /// Rows or events the producer issued.
    pub units: u64,
    pub seconds: f64,
    /// Load::Wide: rows inserted per webhook (index as in the spread).
    pub per_webhook: Vec<u64>,
}

/// The webhooks a wide producer spreads its rows over: round-robin, or drawn at random (a fixed
/// seed, so every run draws the same sequence) from a cumulative distribution.
pub(crate) struct Spread {
    pub webhook_ids: Vec<i64>,
    /// `None`: row `seq` goes to webhook `seq mod n`. Else `cdf[i]` = P(webhook ≤ i).
    pub cdf: Option<Vec<f64>>,
}

impl Spread {
    /// The webhook index of row `seq`; `state` is the random generator's (splitmix64).
    fn pick(&self, seq: i64, state: &mut u64) -> usize {
        match &self.cdf {
            None => seq.rem_euclid(self.webhook_ids.len() as i64) as usize,
            Some(cdf) => {
                *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = *state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let u = (z >> 11) as f64 / (1u64 << 53) as f64;
                cdf.partition_point(|&p| p <= u).min(cdf.len() - 1)
            }
        }
    }
}

impl Producer {
    /// Open loop: at every tick, issue whatever the offered rate makes due by now (so a slow
    /// statement is caught up on at the next tick rather than silently lowering the rate).
    pub(crate) async fn run(mut self) -> anyhow::Result<Produced> {
        let steady = self
            .client
            .prepare(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
                 SELECT $1, jsonb_build_object('sent_at_us', $2::bigint, 'seq', s, 'pad', repeat('x', $5::int)) \
                 FROM generate_series($3::bigint, $4::bigint) s",
            )
            .await?;
        let single = self
            .client
            .prepare(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
                 VALUES ($1, jsonb_build_object('sent_at_us', $2::bigint, 'seq', $3::bigint, 'pad', repeat('x', $4::int)))",
            )
            .await?;
        let publish = self
            .client
            .prepare(&format!(
                "SELECT COALESCE(sum(hookfleet.publish('{FANOUT_EVENT}', \
                 jsonb_build_object('sent_at_us', $1::bigint, 'seq', s, 'pad', repeat('x', $4::int)))), 0)::bigint \
                 FROM generate_series($2::bigint, $3::bigint) s"
            ))
            .await?;
        let wide = self
            .client
            .prepare(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
                 SELECT w, jsonb_build_object('sent_at_us', $1::bigint, 'seq', s, 'pad', repeat('x', $4::int)) \
                 FROM unnest($2::bigint[], $3::bigint[]) AS t(w, s)",
            )
            .await?;
        let mut per_webhook = vec![0u64; self.spread.as_ref().map_or(0, |spread| spread.webhook_ids.len())];
        let mut random_state = 0x5EED_u64;
        let pad = PAD as i32;
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let start = Instant::now();
        let (mut units, mut deliveries) = (0u64, 0u64);
        let mut seq = self.first_seq;
        loop {
            ticker.tick().await;
            let elapsed = start.elapsed().min(self.duration);
            let due = ((self.rate * elapsed.as_secs_f64()) as u64).saturating_sub(units);
            match self.load {
                Load::Steady if due > 0 => {
                    let (first, last) = (seq + 1, seq + due as i64);
                    self.client.execute(&steady, &[&self.webhook_id, &receiver::now_us(), &first, &last, &pad]).await?;
                    seq = last;
                    units += due;
                    deliveries += due;
                }
                Load::Outbox => {
                    for _ in 0..due / OUTBOX_TRANSACTION_ROWS {
                        // A producer that fell behind stops at the end of its time, not once it
                        // caught up: what it achieved is the figure.
                        if start.elapsed() >= self.duration {
                            break;
                        }
                        let transaction = self.client.transaction().await?;
                        for _ in 0..OUTBOX_TRANSACTION_ROWS {
                            seq += 1;
                            transaction.execute(&single, &[&self.webhook_id, &receiver::now_us(), &seq, &pad]).await?;
                        }
                        transaction.commit().await?;
                        units += OUTBOX_TRANSACTION_ROWS;
                        deliveries += OUTBOX_TRANSACTION_ROWS;
                    }
                }
                Load::Wide if due > 0 => {
                    let spread = self.spread.as_deref().context("a wide producer needs its webhooks")?;
                    let seqs: Vec<i64> = (seq + 1..=seq + due as i64).collect();
                    let hooks: Vec<i64> = seqs
                        .iter()
                        .map(|&s| {
                            let index = spread.pick(s, &mut random_state);
                            per_webhook[index] += 1;
                            spread.webhook_ids[index]
                        })
                        .collect();
                    self.client.execute(&wide, &[&receiver::now_us(), &hooks, &seqs, &pad]).await?;
                    seq += due as i64;
                    units += due;
                    deliveries += due;
                }
                Load::Fanout if due > 0 => {
                    let (first, last) = (seq + 1, seq + due as i64);
                    let rows: i64 =
                        self.client.query_one(&publish, &[&receiver::now_us(), &first, &last, &pad]).await?.get(0);
                    seq = last;
                    units += due;
                    deliveries += rows.max(0) as u64;
                }
                _ => {}
            }
            if start.elapsed() >= self.duration {
                break;
            }
        }
        Ok(Produced { deliveries, units, seconds: start.elapsed().as_secs_f64(), per_webhook })
    }
}

/// The claim → complete statement pgbench runs: claim 100 due rows in the fleet's order with
/// SKIP LOCKED and mark them delivered, in one statement. `retry_count >= 0` (true of every row)
/// is how a statement walking the whole claim order matches delivery_queue_due_idx (V0014);
/// without it this walk sorted the whole queue, and the ceiling read 4,519 rows/s instead of
/// about 50,000.
const CEILING_SQL: &str = "WITH c AS (SELECT delivery_id FROM hookfleet.delivery_queue \
WHERE delivery_status = 'pending' AND retry_count >= 0 AND next_attempt_at <= now() \
ORDER BY priority DESC, next_attempt_at, delivery_id LIMIT 100 FOR UPDATE SKIP LOCKED) \
UPDATE hookfleet.delivery_queue q SET delivery_status = 'delivered', delivered_at = now() \
FROM c WHERE q.delivery_id = c.delivery_id;\n";
/// The writes the data model asks of every delivery, by pgbench, in two transactions per batch as
/// a worker commits them: claim 100 due rows into `in_flight` under a lease; then settle them,
/// record one attempt row each and add them to the webhook's health row, in one statement. No
/// HTTP, no flow control: what PostgreSQL can do for this schema's contract on this machine.
const CONTRACT_SQL: &str = "WITH c AS (SELECT delivery_id FROM hookfleet.delivery_queue \
WHERE delivery_status = 'pending' AND retry_count >= 0 AND next_attempt_at <= now() \
ORDER BY priority DESC, next_attempt_at, delivery_id LIMIT 100 FOR UPDATE SKIP LOCKED) \
UPDATE hookfleet.delivery_queue q SET delivery_status = 'in_flight', locked_by = 'pgbench-' || :client_id, \
locked_until = now() + interval '60 seconds' FROM c WHERE q.delivery_id = c.delivery_id;\n\
WITH s AS (UPDATE hookfleet.delivery_queue q SET delivery_status = 'delivered', delivered_at = now(), \
last_attempt_at = now(), last_status_code = 200, locked_by = NULL, locked_until = NULL \
WHERE q.locked_by = 'pgbench-' || :client_id AND q.delivery_status = 'in_flight' \
RETURNING q.delivery_id, q.webhook_id), \
a AS (INSERT INTO hookfleet.delivery_attempts (delivery_id, webhook_id, attempt_number, worker_id, started_at, \
duration_ms, status_code, outcome) SELECT delivery_id, webhook_id, 1, 'pgbench', clock_timestamp(), 1.0, 200, \
'delivered' FROM s RETURNING webhook_id) \
UPDATE hookfleet.webhook_health_metrics h SET total_attempts = h.total_attempts + n.attempts, \
successful_attempts = h.successful_attempts + n.attempts, last_success_at = now(), updated_at = now() \
FROM (SELECT webhook_id, count(*) AS attempts FROM a GROUP BY webhook_id) n WHERE h.webhook_id = n.webhook_id;\n";
const CEILING_CLIENTS: u32 = 3;
const CEILING_CLAIM: u32 = 100;

/// Which claim → complete cycle pgbench measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cycle {
    /// The ceiling: claim and mark delivered in one statement.
    Ceiling,
    /// The data model's writes: lease, settle, attempt row, health.
    Contract,
}

/// **ceiling** and **contract**: PostgreSQL's own claim→complete rate for this schema on this
/// machine, measured by pgbench (`-c 3 -j 2`, `-t` bounded so the clients never run out of rows)
/// against a queue pre-filled like the drain's; rows/s = tps × 100.
pub async fn ceiling(env: &Env<'_>, rows: u32, cycle: Cycle) -> anyhow::Result<Run> {
    let pgbench = env.server.bindir().join("pgbench");
    if !pgbench.exists() {
        bail!(
            "{} not found: install the PostgreSQL server package (apt-get install postgresql postgresql-contrib)",
            pgbench.display()
        );
    }
    let (scenario, label, sql) = match cycle {
        Cycle::Ceiling => ("ceiling", "ceiling (pgbench claim 100 + mark delivered)", CEILING_SQL),
        Cycle::Contract => {
            ("contract", "contract (pgbench claim 100 to in_flight; settle + attempt rows + health)", CONTRACT_SQL)
        }
    };
    let db = db::create(env.url(), &format!("bench_{scenario}"), &env.receiver_url, 1, &[], env.statements).await?;
    db.prefill(rows).await?;
    if cycle == Cycle::Contract {
        db.client
            .batch_execute(
                "INSERT INTO hookfleet.webhook_health_metrics (webhook_id) SELECT webhook_id FROM hookfleet.webhooks \
                 ON CONFLICT DO NOTHING",
            )
            .await?;
    }
    let transactions = (rows / CEILING_CLAIM / CEILING_CLIENTS).max(1);
    let mut run = Run {
        scenario: scenario.into(),
        label: label.into(),
        workers: 0,
        rows: u64::from(transactions * CEILING_CLAIM * CEILING_CLIENTS),
        queue_before: Some(db.queue_size().await?),
        ..Run::default()
    };
    let dir = std::env::temp_dir().join(format!("hookfleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("claim_complete.sql");
    std::fs::write(&script, sql)?;

    let postmaster = db.postmaster_pid().await?;
    db.reset_statements().await?;
    let meter = Meter::start(postmaster, None);
    let command = pgbench_command(
        env,
        &db,
        &script,
        &["-c", &CEILING_CLIENTS.to_string(), "-j", "2", "-t", &transactions.to_string()],
    );
    let timeout = env.timeout;
    let (elapsed, output) = tokio::task::spawn_blocking(move || run_bounded(command, timeout)).await??;
    let _ = std::fs::remove_dir_all(&dir);
    let delivered = db.delivered().await?;
    meter.finish(None, delivered.max(0) as u64, &mut run);
    run.delivered = delivered.max(0) as u64;
    run.seconds = elapsed.as_secs_f64();
    match output {
        Some(stdout) => {
            let tps = stdout
                .lines()
                .find_map(|line| line.trim().strip_prefix("tps = ")?.split_whitespace().next()?.parse::<f64>().ok())
                .with_context(|| format!("no `tps = ` in pgbench's output:\n{stdout}"))?;
            run.tps = Some(tps);
            run.deliveries_per_second = tps * f64::from(CEILING_CLAIM);
            run.complete = delivered >= i64::from(transactions * CEILING_CLAIM * CEILING_CLIENTS);
            run.note = format!(
                "pgbench -c {CEILING_CLIENTS} -j 2 -t {transactions}: {tps:.1} tps × {CEILING_CLAIM} rows; \
                 {delivered} rows marked delivered in {:.2} s wall ({:.0} rows/s incl. connecting)",
                run.seconds,
                delivered as f64 / run.seconds.max(1e-9)
            );
        }
        None => {
            run.deliveries_per_second = delivered as f64 / run.seconds.max(1e-9);
            run.note = format!("pgbench killed after {timeout:?}; rows/s from the rows it marked delivered");
        }
    }
    close(env, db, &mut run).await?;
    Ok(run)
}

/// The workers' claim of one batch (a rate limit that never binds), committed: each measured
/// claim takes 50 new rows and walks past those the previous claims took, as workers' claims do.
const AGED_CLAIM_SQL: &str = "SELECT count(*) FROM hookfleet.claim_deliveries('bench-aged', 50, \
interval '1 hour', 10, NULL, 128, '{}', '{}');\n";
/// Claims per measurement, and the due rows put in front of them (twice what they take).
const AGED_CLAIMS: u32 = 1_000;
const AGED_PENDING: u32 = 100_000;
/// Rows inserted and settled per round while aging the queue.
const AGED_BATCH: u32 = 100_000;
/// Rows per pruning statement, as the workers' prune service uses.
const AGED_PRUNE_BATCH: u32 = 10_000;

/// **aged**: does a queue that delivered `settled` rows still claim as fast as a fresh one? pgbench
/// runs 1,000 of the workers' claims of 50 rows against 100,000 due rows: in a fresh table; after
/// `settled` more rows went through it (inserted as producers do, then settled, leaving two row
/// versions each, as the fleet does); after VACUUM; and after retention pruned the settled rows
/// (with how fast it pruned them). Before each measurement the previous one's rows are settled.
pub async fn aged(env: &Env<'_>, settled: u32) -> anyhow::Result<Run> {
    let db = db::create(env.url(), "bench_aged", &env.receiver_url, 1, &[], env.statements).await?;
    let settle_all = || {
        db.client.execute(
            "UPDATE hookfleet.delivery_queue SET delivery_status = 'delivered', delivered_at = now(), \
             locked_by = NULL, locked_until = NULL WHERE delivery_status IN ('pending', 'in_flight')",
            &[],
        )
    };
    db.prefill(AGED_PENDING).await?;
    let queue_before = db.queue_size().await?;
    let fresh = claim_latency(env, &db).await?;

    let aging = Instant::now();
    let mut done = 0u32;
    while done < settled {
        settle_all().await?;
        let rows = AGED_BATCH.min(settled - done);
        db.insert_pending(rows).await?;
        done += rows;
        if aging.elapsed() > env.timeout {
            bail!("aging the queue took longer than {:?} ({done} of {settled} rows)", env.timeout);
        }
    }
    settle_all().await?;
    let aging_seconds = aging.elapsed().as_secs_f64();
    db.insert_pending(AGED_PENDING).await?;
    let aged_size = db.queue_size().await?;
    let aged = claim_latency(env, &db).await?;
    settle_all().await?;
    db.client.batch_execute("VACUUM ANALYZE hookfleet.delivery_queue").await?;
    db.insert_pending(AGED_PENDING).await?;
    let vacuumed = claim_latency(env, &db).await?;
    settle_all().await?;

    let queue = hookfleet_core::queue::Queue::new(hookfleet_core::db::pool(&db.url, "bench", 1)?);
    let pruning = Instant::now();
    let mut pruned = 0u64;
    loop {
        let rows = queue.prune_deliveries(Duration::ZERO, Duration::ZERO, AGED_PRUNE_BATCH).await?;
        pruned += rows;
        if rows < u64::from(AGED_PRUNE_BATCH) || pruning.elapsed() > env.timeout {
            break;
        }
    }
    let prune_seconds = pruning.elapsed().as_secs_f64();
    db.insert_pending(AGED_PENDING).await?;
    let after_prune = claim_latency(env, &db).await?;

    let history = u64::from(settled) + 3 * u64::from(AGED_PENDING);
    let mut run = Run {
        scenario: "aged".into(),
        label: format!("claim after {} deliveries", crate::report::thousands(u64::from(settled))),
        rows: u64::from(settled),
        complete: pruned >= history,
        queue_before: Some(queue_before),
        claim_ms_fresh: Some(fresh),
        claim_ms_aged: Some(aged),
        claim_ms_vacuumed: Some(vacuumed),
        claim_ms_pruned: Some(after_prune),
        prune_rows_per_second: Some(pruned as f64 / prune_seconds.max(1e-9)),
        note: format!(
            "{AGED_CLAIMS} claims of 50 among {AGED_PENDING} due rows (pgbench, 1 client): fresh {fresh:.3} ms; \
             after {settled} rows went through ({aging_seconds:.1} s to age; table {:.0} MB, indexes {:.0} MB) \
             {aged:.3} ms, after VACUUM {vacuumed:.3} ms; retention pruned {pruned} rows in {prune_seconds:.1} s, \
             then {after_prune:.3} ms (before any VACUUM)",
            aged_size.total_mb, aged_size.indexes_mb
        ),
        ..Run::default()
    };
    close(env, db, &mut run).await?;
    Ok(run)
}

/// Mean latency (ms) of `AGED_CLAIMS` of the workers' claims, by pgbench with one client.
async fn claim_latency(env: &Env<'_>, db: &BenchDb) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("hookfleet-bench-aged-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("claim.sql");
    std::fs::write(&script, AGED_CLAIM_SQL)?;
    let command = pgbench_command(env, db, &script, &["-c", "1", "-t", &AGED_CLAIMS.to_string()]);
    let limit = env.timeout;
    let (_, output) = tokio::task::spawn_blocking(move || run_bounded(command, limit)).await??;
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = output.context("pgbench did not finish within --timeout")?;
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("latency average = ")?.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("no `latency average = ` in pgbench's output:\n{stdout}"))
}

/// pgbench against `db` on the run's server over its socket, running `script` with `args`
/// (clients, transactions), without vacuuming first.
fn pgbench_command(env: &Env<'_>, db: &BenchDb, script: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(env.server.bindir().join("pgbench"));
    command
        .arg("-h")
        .arg(env.server.socket_dir())
        .arg("-p")
        .arg(env.server.port().to_string())
        .args(["-U", "postgres", "-n"])
        .args(args)
        .arg("-f")
        .arg(script)
        .arg(&db.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Runs `command` to completion, or kills it after `limit` (then `None`). Blocking.
fn run_bounded(mut command: Command, limit: Duration) -> anyhow::Result<(Duration, Option<String>)> {
    let start = Instant::now();
    let mut child = command.spawn().context("start pgbench")?;
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = start.elapsed();
            let output = child.wait_with_output()?;
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            if !status.success() {
                bail!("pgbench failed ({status}): {}{}", stdout, String::from_utf8_lossy(&output.stderr));
            }
            return Ok((elapsed, Some(stdout)));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((start.elapsed(), None));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
