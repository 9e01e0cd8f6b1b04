//! The wide scenarios (issue 15): the same traffic spread over many webhooks, each at a low rate,
//! which is a webhook service's real workload.
//!
//! - **wide**: a producer at a fixed offered rate, each row to the next webhook (round-robin).
//! - **skewed**: a Zipf spread (exponent 1) over many webhooks: a few hot, most cold; 5 of the
//!   hottest 50 have rate limits that bind (a quarter of their offered share) and 20 point at the
//!   receiver's failing path (HTTP 500), so they retry and their circuits open. Latency is reported
//!   for the free webhooks only: held-back rows are late by design.
//! - **publish**: one `hookfleet.publish` fanned out to every webhook at once; the time from its
//!   commit to the last arrival.
//!
//! Besides the figures every run has, each reports what a claim costs: claims in the window, mean
//! and p99 claim time (the workers' `webhook_claim_duration_seconds`, scraped from each worker's
//! `/metrics` at the start and the end of the window), attempts per claim, and buffers read per
//! claimed row (the claim statement's `shared_blks_hit + shared_blks_read` in pg_stat_statements,
//! which the bench loads for these runs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::db::{self, BenchDb, HookSpec, StatementStats, PAD};
use crate::procs::{ClaimHistogram, Fleet};
use crate::receiver::{self, Arrival};
use crate::report::{thousands, Run};
use crate::scenarios::{self, Env, Load, Meter, Producer, Spread};

/// The event every webhook of the publish run subscribes to.
pub const PUBLISH_EVENT: &str = "bench.publish";
/// Zipf exponent of the skewed spread: webhook of rank k gets a share ∝ 1/k.
const ZIPF_EXPONENT: f64 = 1.0;
/// Ranks (1 = hottest) of the skewed run's rate-limited webhooks: 5 of the hottest 50.
const LIMITED_RANKS: [usize; 5] = [2, 5, 10, 20, 50];
/// A limited webhook's `rate_limit_rps` as a share of its offered rate: well below, so it binds.
const LIMIT_SHARE: f64 = 0.25;
/// Ranks of the skewed run's failing webhooks (20 lukewarm ones, so they see traffic).
const FAILING_RANKS: std::ops::RangeInclusive<usize> = 101..=120;
/// How long the workers may take to register and listen (they load every webhook first).
const WORKERS_READY: Duration = Duration::from_secs(60);

/// What a wide or skewed run is asked to do.
pub struct Wide {
    pub webhooks: u32,
    /// Deliveries per second over all webhooks.
    pub rate: f64,
    pub duration: Duration,
    pub workers: u32,
    /// Zipf spread with limited and failing webhooks, rather than even.
    pub skewed: bool,
}

/// What each webhook of a skewed run is: its share of the traffic and its set-up.
struct Mix {
    cdf: Vec<f64>,
    shares: Vec<f64>,
    hooks: Vec<HookSpec>,
}

fn skewed_mix(webhooks: usize, rate: f64) -> Mix {
    let weights: Vec<f64> = (1..=webhooks).map(|rank| 1.0 / (rank as f64).powf(ZIPF_EXPONENT)).collect();
    let total: f64 = weights.iter().sum();
    let shares: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let mut cdf = Vec::with_capacity(webhooks);
    let mut running = 0.0;
    for share in &shares {
        running += share;
        cdf.push(running);
    }
    let mut hooks = vec![HookSpec::default(); webhooks];
    for rank in LIMITED_RANKS.into_iter().filter(|rank| *rank <= webhooks) {
        hooks[rank - 1].rate_limit_rps = Some(shares[rank - 1] * rate * LIMIT_SHARE);
    }
    for rank in FAILING_RANKS.filter(|rank| *rank <= webhooks) {
        hooks[rank - 1].fails = true;
    }
    Mix { cdf, shares, hooks }
}

/// Free: no binding limit, not failing (the receiver's `/w/<n>`, n = index + 1).
fn is_free(hooks: &[HookSpec], hook: u16) -> bool {
    let index = usize::from(hook).wrapping_sub(1);
    hooks.get(index).is_some_and(|spec| spec.rate_limit_rps.is_none() && !spec.fails)
}

/// Claims since `before`, and what they cost, into `run` (`attempts`: requests at the receiver).
async fn claim_figures(db: &BenchDb, fleet: &Fleet, before: &ClaimHistogram, attempts: u64, run: &mut Run) {
    let histogram = fleet.claim_histogram().await.since(before);
    run.claim_mean_ms = histogram.mean_ms();
    run.claim_p99_bound_ms = histogram.p99_bound_ms();
    let statement = db.claim_statement().await.ok().flatten();
    run.claim_statement = statement;
    let claims = statement.map(|s| s.calls as u64).or((histogram.count > 0.0).then_some(histogram.count as u64));
    run.claims = claims;
    run.rows_per_claim = claims.filter(|c| *c > 0).map(|c| attempts as f64 / c as f64);
    run.buffers_per_claimed_row = statement.filter(|_| attempts > 0).map(|s| s.buffers as f64 / attempts as f64);
    run.claim_statements = db.claim_inner_statements(15).await.unwrap_or_default();
}

/// Waits until `expected` distinct deliveries of the webhooks `keep` accepts arrived, or
/// `deadline`; stops early when a worker died.
async fn wait_for(
    env: &Env<'_>,
    fleet: &mut Fleet,
    expected: u64,
    keep: impl Fn(u16) -> bool,
    deadline: Instant,
) -> anyhow::Result<bool> {
    loop {
        if env.receiver.requests() >= expected && env.receiver.unique_matching(&keep) >= expected {
            return Ok(true);
        }
        if let Some(problem) = fleet.exited() {
            bail!(problem);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Distinct arrivals of `hook`.
fn distinct(arrivals: &[&Arrival]) -> u64 {
    arrivals.iter().map(|a| (a.hook, &*a.id)).collect::<std::collections::HashSet<_>>().len() as u64
}

/// **wide** and **skewed**: the workers start and listen, then one producer inserts at `rate`
/// for `duration`, each row to the next webhook (wide) or to one drawn from the Zipf spread
/// (skewed); then the run waits (up to `--settle-timeout`) for every row of the free webhooks.
pub async fn wide(env: &Env<'_>, wide: &Wide) -> anyhow::Result<Run> {
    let count = wide.webhooks as usize;
    let (kind, mix) = if wide.skewed {
        ("skewed", skewed_mix(count, wide.rate))
    } else {
        let even = 1.0 / count as f64;
        ("wide", Mix { cdf: Vec::new(), shares: vec![even; count], hooks: vec![HookSpec::default(); count] })
    };
    let creating = Instant::now();
    let stats = StatementStats { top: env.statements, claims: env.claim_stats };
    let name = format!("bench_{kind}_{}_{}", wide.webhooks, wide.rate as u64);
    let db = db::create_with(env.url(), &name, &env.receiver_url, &mix.hooks, &[], stats).await?;
    let created_seconds = creating.elapsed().as_secs_f64();
    db.client.batch_execute("ANALYZE").await?;
    db.settle_storage().await?;
    let mut run = Run {
        scenario: kind.into(),
        label: format!("{kind} {} webhooks × {}/s", thousands(u64::from(wide.webhooks)), wide.rate),
        workers: wide.workers,
        webhooks: Some(wide.webhooks),
        offered_rate: Some(wide.rate),
        queue_before: Some(db.queue_size().await?),
        ..Run::default()
    };
    let postmaster = db.postmaster_pid().await?;
    let mut fleet = Fleet::start(&env.spec(&db), wide.workers, kind)?;
    db.wait_for_workers(wide.workers, WORKERS_READY).await?;
    env.receiver.take();
    db.reset_statements().await?;
    let before = fleet.claim_histogram().await;
    let meter = Meter::start(postmaster, Some(&fleet));

    let producer = Producer {
        client: hookfleet_core::db::connect(&db.url, "bench-producer").await?,
        load: Load::Wide,
        webhook_id: db.webhook_ids[0],
        spread: Some(Arc::new(Spread {
            webhook_ids: db.webhook_ids.clone(),
            cdf: wide.skewed.then(|| mix.cdf.clone()),
        })),
        rate: wide.rate,
        duration: wide.duration,
        tick: env.tick,
        first_seq: 0,
    };
    let start = Instant::now();
    let produced = producer.run().await?;
    let produced_at = Instant::now();
    run.rows = produced.deliveries;
    run.achieved_rate = Some(produced.units as f64 / produced.seconds.max(1e-9));
    let hooks = &mix.hooks;
    let free_rows: u64 = produced
        .per_webhook
        .iter()
        .enumerate()
        .filter(|(index, _)| is_free(hooks, (index + 1) as u16))
        .map(|(_, rows)| rows)
        .sum();
    let deadline = produced_at + env.settle_timeout;
    let arrived = wait_for(env, &mut fleet, free_rows, |hook| is_free(hooks, hook), deadline).await?;
    // Rows of limited and failing webhooks are not waited for: they are late or retried by design.
    let settled = if wide.skewed { None } else { scenarios::wait_for_settled(&db, deadline).await? };
    let measured_at = Instant::now();
    let delivered_all = env.receiver.unique();
    let attempts = env.receiver.requests() + env.receiver.failures();
    let failures = env.receiver.failures();
    meter.finish(Some(&fleet), delivered_all, &mut run);
    claim_figures(&db, &fleet, &before, attempts, &mut run).await;
    let open_circuits: i64 = db
        .client
        .query_one("SELECT count(*) FROM hookfleet.webhook_health_metrics WHERE circuit_state <> 'closed'", &[])
        .await?
        .get(0);
    fleet.stop();
    run.latency_split_ms = db.latency_split().await?;
    let arrivals = env.receiver.take();
    let free: Vec<Arrival> = arrivals.iter().filter(|a| is_free(hooks, a.hook)).cloned().collect();
    let summary = receiver::summarize(&free);
    scenarios::apply_summary(&mut run, &summary);
    run.requests = attempts;
    run.complete = arrived && (wide.skewed || settled.is_some());
    run.settled_seconds = settled.map(|at| (at - produced_at).as_secs_f64());
    run.note = format!(
        "{} webhooks created in {created_seconds:.1} s; producer ran {:.1} s; {} of {} rows delivered in all",
        thousands(u64::from(wide.webhooks)),
        (produced_at - start).as_secs_f64(),
        thousands(delivered_all),
        thousands(produced.deliveries),
    );
    if wide.skewed {
        let window = (measured_at - start).as_secs_f64();
        let limited: Vec<String> = LIMITED_RANKS
            .iter()
            .filter(|rank| **rank <= count)
            .map(|&rank| {
                let hook = rank as u16;
                let got: Vec<&Arrival> = arrivals.iter().filter(|a| a.hook == hook).collect();
                format!(
                    "rank {rank} offered {:.1}/s, limit {:.1}/s, delivered {:.1}/s ({} of {})",
                    mix.shares[rank - 1] * wide.rate,
                    hooks[rank - 1].rate_limit_rps.unwrap_or(0.0),
                    distinct(&got) as f64 / window,
                    distinct(&got),
                    produced.per_webhook[rank - 1],
                )
            })
            .collect();
        let held: Vec<Arrival> = arrivals
            .iter()
            .filter(|a| hooks.get(usize::from(a.hook).wrapping_sub(1)).is_some_and(|s| s.rate_limit_rps.is_some()))
            .cloned()
            .collect();
        let held_latency = receiver::summarize(&held).latency_ms;
        let failing_rows: u64 =
            FAILING_RANKS.filter(|rank| *rank <= count).map(|rank| produced.per_webhook[rank - 1]).sum();
        run.note += &format!(
            "; latency is of the {} free webhooks' {} rows; rate-limited (over {window:.1} s): {}; their latency \
             p50 {} / p99 {} ms; {} failing webhooks: {} rows, {} attempts answered 500, {} circuits not closed at \
             the end",
            thousands(hooks.iter().filter(|h| h.rate_limit_rps.is_none() && !h.fails).count() as u64),
            thousands(free_rows),
            limited.join(", "),
            held_latency.map_or_else(|| "—".to_owned(), |l| format!("{:.0}", l[0])),
            held_latency.map_or_else(|| "—".to_owned(), |l| format!("{:.0}", l[2])),
            FAILING_RANKS.filter(|rank| *rank <= count).count(),
            thousands(failing_rows),
            thousands(failures),
            open_circuits,
        );
    }
    if !run.complete {
        run.note += "; incomplete: latency percentiles cover only the deliveries that arrived";
    }
    scenarios::close(env, db, &mut run).await?;
    Ok(run)
}

/// **publish**: `webhooks` webhooks subscribed to one event type, the workers listening; one
/// `hookfleet.publish` inserts a delivery for each at once. Reported: from the publish's commit
/// (the moment its statement returned) to the last arrival, and the arrivals' p50/p99 since then.
pub async fn publish(env: &Env<'_>, webhooks: u32, workers: u32) -> anyhow::Result<Run> {
    let hooks = vec![HookSpec::default(); webhooks as usize];
    let creating = Instant::now();
    let stats = StatementStats { top: env.statements, claims: env.claim_stats };
    let name = format!("bench_publish_{webhooks}");
    let db = db::create_with(env.url(), &name, &env.receiver_url, &hooks, &[PUBLISH_EVENT], stats).await?;
    let created_seconds = creating.elapsed().as_secs_f64();
    db.client.batch_execute("ANALYZE").await?;
    db.settle_storage().await?;
    let mut run = Run {
        scenario: "publish".into(),
        label: format!("publish to {} webhooks", thousands(u64::from(webhooks))),
        workers,
        webhooks: Some(webhooks),
        queue_before: Some(db.queue_size().await?),
        ..Run::default()
    };
    let postmaster = db.postmaster_pid().await?;
    let mut fleet = Fleet::start(&env.spec(&db), workers, "publish")?;
    db.wait_for_workers(workers, WORKERS_READY).await?;
    let producer = hookfleet_core::db::connect(&db.url, "bench-producer").await?;
    let statement = producer
        .prepare(
            "SELECT hookfleet.publish($1::text, jsonb_build_object('sent_at_us', $2::bigint, 'pad', repeat('x', $3::int)))",
        )
        .await?;
    env.receiver.take();
    db.reset_statements().await?;
    let before = fleet.claim_histogram().await;
    let meter = Meter::start(postmaster, Some(&fleet));
    let began = Instant::now();
    let inserted: i32 =
        producer.query_one(&statement, &[&PUBLISH_EVENT, &receiver::now_us(), &(PAD as i32)]).await?.get(0);
    let committed = Instant::now();
    let inserted = u64::try_from(inserted).unwrap_or(0);
    run.rows = inserted;
    let deadline = committed + env.settle_timeout;
    let arrived = wait_for(env, &mut fleet, inserted, |_| true, deadline).await?;
    let settled = scenarios::wait_for_settled(&db, deadline).await?;
    let attempts = env.receiver.requests() + env.receiver.failures();
    meter.finish(Some(&fleet), env.receiver.unique(), &mut run);
    claim_figures(&db, &fleet, &before, attempts, &mut run).await;
    fleet.stop();
    run.latency_split_ms = db.latency_split().await?;
    let arrivals = env.receiver.take();
    let summary = receiver::summarize(&arrivals);
    scenarios::apply_summary(&mut run, &summary);
    let mut since: Vec<f64> =
        arrivals.iter().map(|a| a.at.saturating_duration_since(committed).as_secs_f64() * 1000.0).collect();
    since.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let rank = ((p * since.len() as f64).ceil() as usize).clamp(1, since.len());
        since[rank - 1]
    };
    if !since.is_empty() {
        run.publish_arrival_p50_ms = Some(at(0.50));
        run.publish_arrival_p99_ms = Some(at(0.99));
        run.publish_last_arrival_s = Some(at(1.0) / 1000.0);
    }
    run.complete = arrived && settled.is_some();
    run.settled_seconds = settled.map(|at| (at - committed).as_secs_f64());
    run.note = format!(
        "{} webhooks created in {created_seconds:.1} s; the publish statement took {:.1} ms and inserted {} rows; \
         settled {} after its commit",
        thousands(u64::from(webhooks)),
        (committed - began).as_secs_f64() * 1000.0,
        thousands(inserted),
        run.settled_seconds.map_or_else(|| format!("not within {:?}", env.settle_timeout), |s| format!("{s:.2} s")),
    );
    if !run.complete {
        run.note += "; incomplete: figures cover only the deliveries that arrived";
    }
    scenarios::close(env, db, &mut run).await?;
    Ok(run)
}
