//! Figures of every run, the targets next to them, and the JSON + Markdown files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::db::{ClaimStatement, LatencySplit, QueueSize, Statement};

/// One measured run (a scenario at one setting). Fields that do not apply are `None`.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Run {
    /// ceiling, drain, steady, outbox or fanout.
    pub scenario: String,
    /// Human label, e.g. "steady 500/s".
    pub label: String,
    pub workers: u32,
    /// Deliveries the run asked for (rows inserted; for fanout events × webhooks).
    pub rows: u64,
    /// Distinct deliveries that arrived (for ceiling: rows claimed and marked delivered).
    pub delivered: u64,
    /// Every asked-for delivery arrived within the run's bounds.
    pub complete: bool,
    /// First to last arrival (ceiling: pgbench's run time).
    pub seconds: f64,
    pub deliveries_per_second: f64,
    /// `deliveries_per_second` / the ceiling's rows/s (drain and contract).
    pub ratio_to_ceiling: Option<f64>,
    /// `deliveries_per_second` / the contract cycle's rows/s (drain only).
    pub ratio_to_contract: Option<f64>,
    /// Offered producer rate (rows or, for fanout, deliveries per second).
    pub offered_rate: Option<f64>,
    /// What the producer actually inserted per second.
    pub achieved_rate: Option<f64>,
    /// Enqueue→arrival latency percentiles, ms.
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    /// The same latency split by the database's timestamps (paced runs).
    pub latency_split_ms: Option<LatencySplit>,
    /// Workers started (drain) or producer stopped (paced) → every row settled in the database.
    pub settled_seconds: Option<f64>,
    pub worker_cpu_seconds_per_1000: Option<f64>,
    pub postgres_cpu_seconds_per_1000: Option<f64>,
    /// This process: receiver, producers and polling.
    pub bench_cpu_seconds_per_1000: Option<f64>,
    /// The whole machine's CPU use over the measured window, % of all cores: near 100, the run
    /// was bound by the machine rather than by waiting.
    pub machine_busy_percent: Option<f64>,
    /// Largest VmHWM of any worker, MB.
    pub worker_rss_peak_mb: Option<f64>,
    /// Largest VmRSS of any worker at the end of the run, MB.
    pub worker_rss_end_mb: Option<f64>,
    pub queue_before: Option<QueueSize>,
    pub queue_after: Option<QueueSize>,
    /// `pg_stat_user_tables.n_dead_tup` of the queue after the run.
    pub dead_tuples_after: Option<i64>,
    /// Requests − distinct (webhook, webhook-id).
    pub requests: u64,
    pub duplicates: Option<u64>,
    /// pgbench: transactions per second (each claims up to 100 rows).
    pub tps: Option<f64>,
    /// aged: mean claim latency (ms) in a fresh table, after the deliveries, after VACUUM, and
    /// after retention pruned them; and how fast it pruned.
    pub claim_ms_fresh: Option<f64>,
    pub claim_ms_aged: Option<f64>,
    pub claim_ms_vacuumed: Option<f64>,
    pub claim_ms_pruned: Option<f64>,
    pub prune_rows_per_second: Option<f64>,
    /// Wide scenarios: webhooks the traffic was spread over.
    pub webhooks: Option<u32>,
    /// Wide scenarios: claims in the measured window (pg_stat_statements calls of the claim
    /// statement, else the workers' claim histogram count).
    pub claims: Option<u64>,
    /// Mean claim duration (the workers' `webhook_claim_duration_seconds`), ms.
    pub claim_mean_ms: Option<f64>,
    /// Upper bound of the histogram bucket holding the p99 claim duration, ms.
    pub claim_p99_bound_ms: Option<f64>,
    /// Attempts (requests at the receiver, failing path included) per claim.
    pub rows_per_claim: Option<f64>,
    /// shared_blks_hit + shared_blks_read of the claim statement per attempt.
    pub buffers_per_claimed_row: Option<f64>,
    pub claim_statement: Option<ClaimStatement>,
    /// publish: from the publish's commit to the last arrival, s; arrivals' p50/p99 since it, ms.
    pub publish_last_arrival_s: Option<f64>,
    pub publish_arrival_p50_ms: Option<f64>,
    pub publish_arrival_p99_ms: Option<f64>,
    pub note: String,
    /// `--statements`, wide scenarios: the statements run inside the claim.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claim_statements: Vec<Statement>,
    /// `--statements`: this run's statements by total execution time (pg_stat_statements).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub statements: Vec<Statement>,
}

/// What the run was made with.
#[derive(Serialize, Debug)]
pub struct Context {
    pub started_at: String,
    pub command: String,
    pub cpus: usize,
    pub postgres: String,
    pub durable: bool,
    pub batch_size: u32,
    pub max_in_flight: u32,
    pub drain_rows: u32,
    pub ceiling_rows: u32,
    pub paced_seconds: f64,
    /// How long the wide and skewed producers ran.
    pub wide_seconds: f64,
    pub settle_timeout_seconds: f64,
    pub timeout_seconds: f64,
    pub receiver: &'static str,
}

#[derive(Serialize, Debug)]
pub struct Target {
    pub target: &'static str,
    pub measured: String,
    /// "pass", "fail" or "—" (not measured in this run, or report-only).
    pub verdict: &'static str,
}

#[derive(Serialize)]
struct Document<'a> {
    context: &'a Context,
    runs: &'a [Run],
    targets: &'a [Target],
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:.decimals$}"))
}

fn size(value: Option<QueueSize>) -> String {
    value.map_or_else(|| "—".to_owned(), |s| format!("{:.1} / {:.1}", s.total_mb, s.indexes_mb))
}

pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Run {
    /// This pgbench cycle's rate as a share of the ceiling's (when both ran).
    fn ratio_of(&self, runs: &[Run]) -> Option<f64> {
        let ceiling = runs.iter().find(|r| r.scenario == "ceiling")?.deliveries_per_second;
        (ceiling > 0.0).then(|| self.deliveries_per_second / ceiling)
    }
}

/// Fills in each drain's ratios to the ceiling and to the contract cycle (those that ran).
pub fn apply_ceiling(runs: &mut [Run]) {
    let rate = |scenario: &str| {
        runs.iter().find(|r| r.scenario == scenario).map(|r| r.deliveries_per_second).filter(|c| *c > 0.0)
    };
    let (ceiling, contract) = (rate("ceiling"), rate("contract"));
    for run in runs.iter_mut() {
        match run.scenario.as_str() {
            "drain" => {
                run.ratio_to_ceiling = ceiling.map(|c| run.deliveries_per_second / c);
                run.ratio_to_contract = contract.map(|c| run.deliveries_per_second / c);
            }
            "contract" => run.ratio_to_ceiling = ceiling.map(|c| run.deliveries_per_second / c),
            _ => {}
        }
    }
}

/// The targets, each with what this run measured (never asserted; report only).
pub fn targets(runs: &[Run]) -> Vec<Target> {
    let mut out = Vec::new();
    let verdict = |ok: bool| if ok { "pass" } else { "fail" };
    let drain = |workers: u32| runs.iter().find(|r| r.scenario == "drain" && r.workers == workers && r.complete);
    let steady = |rate: f64| runs.iter().find(|r| r.scenario == "steady" && r.offered_rate == Some(rate));

    out.push(match drain(1).and_then(|r| Some((r.ratio_to_ceiling?, r.ratio_to_contract))) {
        Some((ratio, contract)) => Target {
            target: "drain, 1 worker ≥ 50 % of the PostgreSQL ceiling",
            measured: match (contract, runs.iter().find(|r| r.scenario == "contract").and_then(|c| c.ratio_of(runs))) {
                (Some(to_contract), Some(contract_to_ceiling)) => format!(
                    "{:.0} % (the contract cycle alone reaches {:.0} % of the ceiling; the drain {:.0} % of it)",
                    ratio * 100.0,
                    contract_to_ceiling * 100.0,
                    to_contract * 100.0
                ),
                _ => format!("{:.0} %", ratio * 100.0),
            },
            verdict: verdict(ratio >= 0.5),
        },
        None => Target {
            target: "drain, 1 worker ≥ 50 % of the PostgreSQL ceiling",
            measured: "not run".into(),
            verdict: "—",
        },
    });
    out.push(match (drain(1), drain(3)) {
        (Some(one), Some(three)) if one.deliveries_per_second > 0.0 => {
            let scale = three.deliveries_per_second / one.deliveries_per_second;
            // The target holds "until the database is the bottleneck": on a machine whose cores are
            // all busy, more workers only share them.
            let busy = |r: &Run| r.machine_busy_percent.map_or_else(|| "—".to_owned(), |p| format!("{p:.0} %"));
            let postgres_cores = three.postgres_cpu_seconds_per_1000.map(|s| s * three.deliveries_per_second / 1000.0);
            let saturated = three.machine_busy_percent.is_some_and(|p| p >= 90.0);
            Target {
                target: "drain, 3 workers vs 1 ≥ 1.8×",
                measured: format!(
                    "{scale:.2}×; machine CPU busy {} at 1 worker, {} at 3 (PostgreSQL {} cores)",
                    busy(one),
                    busy(three),
                    postgres_cores.map_or_else(|| "—".to_owned(), |c| format!("{c:.2}"))
                ),
                verdict: if scale >= 1.8 {
                    "pass"
                } else if saturated {
                    "fail: machine-bound"
                } else {
                    "fail"
                },
            }
        }
        _ => Target { target: "drain, 3 workers vs 1 ≥ 1.8×", measured: "not run".into(), verdict: "—" },
    });
    out.push(match steady(500.0) {
        Some(r) => match (r.latency_p50_ms, r.latency_p99_ms) {
            (Some(p50), Some(p99)) => Target {
                target: "steady 500/s: p50 ≤ 5 ms and p99 ≤ 25 ms",
                measured: format!("p50 {p50:.1} ms, p99 {p99:.1} ms{}", if r.complete { "" } else { " (incomplete)" }),
                verdict: verdict(p50 <= 5.0 && p99 <= 25.0 && r.complete),
            },
            _ => Target {
                target: "steady 500/s: p50 ≤ 5 ms and p99 ≤ 25 ms",
                measured: "no arrivals".into(),
                verdict: "fail",
            },
        },
        None => Target {
            target: "steady 500/s: p50 ≤ 5 ms and p99 ≤ 25 ms", measured: "not run".into(), verdict: "—"
        },
    });
    out.push(match steady(5000.0) {
        Some(r) => {
            let achieved = r.achieved_rate.unwrap_or(0.0);
            let p99 = r.latency_p99_ms.unwrap_or(f64::INFINITY);
            let sustained = achieved >= 0.95 * 5000.0 && r.complete;
            Target {
                target: "steady 5,000/s sustained (≥ 95 % offered, all delivered) with p99 ≤ 100 ms",
                measured: format!(
                    "inserted {achieved:.0}/s, delivered {} of {}, p99 {}",
                    thousands(r.delivered),
                    thousands(r.rows),
                    opt(r.latency_p99_ms, 1) + " ms"
                ),
                verdict: verdict(sustained && p99 <= 100.0),
            }
        }
        None => Target {
            target: "steady 5,000/s sustained (≥ 95 % offered, all delivered) with p99 ≤ 100 ms",
            measured: "not run".into(),
            verdict: "—",
        },
    });
    let steady_rss =
        runs.iter().filter(|r| r.scenario == "steady").filter_map(|r| r.worker_rss_end_mb).reduce(f64::max);
    out.push(match steady_rss {
        Some(rss) => Target {
            target: "worker RSS at steady state ≤ 40 MB",
            measured: format!("{rss:.1} MB (largest VmRSS at the end of the steady runs)"),
            verdict: verdict(rss <= 40.0),
        },
        None => Target { target: "worker RSS at steady state ≤ 40 MB", measured: "not run".into(), verdict: "—" },
    });
    let cpu: Vec<String> = runs
        .iter()
        .filter(|r| r.workers > 0)
        .filter_map(|r| Some(format!("{} {:.3}", r.label, r.worker_cpu_seconds_per_1000?)))
        .collect();
    out.push(Target {
        target: "worker CPU s per 1,000 deliveries (reported)",
        measured: if cpu.is_empty() { "not run".into() } else { cpu.join("; ") },
        verdict: "—",
    });
    // Issue 15: many webhooks, each at a low rate.
    let wide = |webhooks: u32, rate: f64| {
        runs.iter().find(|r| r.scenario == "wide" && r.webhooks == Some(webhooks) && r.offered_rate == Some(rate))
    };
    for (webhooks, rate, p50_max, p99_max, target) in [
        (1_000, 1_000.0, Some(5.0), 25.0, "wide 1,000 webhooks at 1,000/s: p50 ≤ 5 ms and p99 ≤ 25 ms"),
        (10_000, 1_000.0, Some(5.0), 25.0, "wide 10,000 webhooks at 1,000/s: p50 ≤ 5 ms and p99 ≤ 25 ms"),
        (200, 500.0, None, 10.0, "wide 200 webhooks at 500/s: p99 ≤ 10 ms (Svix measured 19–21 ms)"),
    ] {
        out.push(match wide(webhooks, rate) {
            Some(r) => match (r.latency_p50_ms, r.latency_p99_ms) {
                (Some(p50), Some(p99)) => Target {
                    target,
                    measured: format!(
                        "p50 {p50:.1} ms, p99 {p99:.1} ms{}",
                        if r.complete { "" } else { " (incomplete)" }
                    ),
                    verdict: verdict(p50_max.is_none_or(|max| p50 <= max) && p99 <= p99_max && r.complete),
                },
                _ => Target { target, measured: "no arrivals".into(), verdict: "fail" },
            },
            None => Target { target, measured: "not run".into(), verdict: "—" },
        });
    }
    const WIDE_CPU: &str = "wide runs: PostgreSQL CPU per 1,000 deliveries within 1.2× of steady 1,000/s";
    let steady_cpu = steady(1000.0).and_then(|r| r.postgres_cpu_seconds_per_1000).filter(|c| *c > 0.0);
    let wide_cpu: Vec<(&Run, f64)> = runs
        .iter()
        .filter(|r| matches!(r.scenario.as_str(), "wide" | "skewed" | "publish"))
        .filter_map(|r| Some((r, r.postgres_cpu_seconds_per_1000?)))
        .collect();
    out.push(match (steady_cpu, wide_cpu.is_empty()) {
        (Some(base), false) => {
            // The publish run measures a single burst, not a rate: reported, judged on the paced ones.
            let judged = wide_cpu.iter().filter(|(r, _)| r.scenario != "publish").all(|(_, cpu)| *cpu <= 1.2 * base);
            Target {
                target: WIDE_CPU,
                measured: format!(
                    "steady {base:.3} s; {}",
                    wide_cpu
                        .iter()
                        .map(|(r, cpu)| format!("{} {cpu:.3} s ({:.2}×)", r.label, cpu / base))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                verdict: verdict(judged),
            }
        }
        (None, false) => {
            Target { target: WIDE_CPU, measured: "steady 1,000/s not run in this invocation".into(), verdict: "—" }
        }
        _ => Target { target: WIDE_CPU, measured: "not run".into(), verdict: "—" },
    });
    const PUBLISH: &str = "publish to 10,000 webhooks: last arrival ≤ 2 s after its commit";
    out.push(match runs.iter().find(|r| r.scenario == "publish" && r.webhooks == Some(10_000)) {
        Some(r) => match r.publish_last_arrival_s {
            Some(last) => Target {
                target: PUBLISH,
                measured: format!(
                    "{} of {} arrived, the last {last:.2} s after the commit",
                    thousands(r.delivered),
                    thousands(r.rows)
                ),
                verdict: verdict(last <= 2.0 && r.complete),
            },
            None => Target { target: PUBLISH, measured: "no arrivals".into(), verdict: "fail" },
        },
        None => Target { target: PUBLISH, measured: "not run".into(), verdict: "—" },
    });
    // Judged as autovacuum keeps the table (after VACUUM); the figure before any VACUUM, with a
    // million dead index entries at the head of the pending indexes, is shown as the worst case.
    const AGED: &str =
        "queue table after 1,000,000 deliveries: claim latency within 2× of an empty queue (after VACUUM)";
    out.push(match runs.iter().find(|r| r.scenario == "aged") {
        Some(r) => match (r.claim_ms_fresh, r.claim_ms_aged, r.claim_ms_vacuumed) {
            (Some(fresh), Some(aged), Some(vacuumed)) => Target {
                target: AGED,
                measured: format!(
                    "after {} deliveries {aged:.3} ms before VACUUM, {vacuumed:.3} ms after, vs {fresh:.3} ms fresh \
                     ({:.2}× / {:.2}×)",
                    thousands(r.rows),
                    aged / fresh,
                    vacuumed / fresh
                ),
                verdict: verdict(r.rows >= 1_000_000 && vacuumed <= 2.0 * fresh),
            },
            _ => Target { target: AGED, measured: "incomplete".into(), verdict: "—" },
        },
        None => Target { target: AGED, measured: "not run".into(), verdict: "—" },
    });
    out
}

pub fn markdown(context: &Context, runs: &[Run], targets: &[Target]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# hookfleet benchmark, {}\n", context.started_at);
    let _ = writeln!(
        md,
        "`{}` — {} CPUs, PostgreSQL {} ({}), receiver {}, BATCH_SIZE={}, HOOKFLEET_MAX_IN_FLIGHT={}; \
         PostgreSQL, the workers, the receiver and the producers share this machine.\n",
        context.command,
        context.cpus,
        context.postgres,
        if context.durable { "durable: fsync and synchronous_commit on" } else { "not durable" },
        context.receiver,
        context.batch_size,
        context.max_in_flight
    );
    md.push_str("## Throughput and latency\n\n");
    md.push_str(
        "| run | workers | rows | delivered | s | deliveries/s | × ceiling | × contract | offered/s | inserted/s | p50 ms | p95 ms | p99 ms | max ms | settled s | duplicates |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs.iter().filter(|r| r.scenario != "aged") {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {}{} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            if r.workers == 0 { "pgbench -c 3".to_owned() } else { r.workers.to_string() },
            thousands(r.rows),
            thousands(r.delivered),
            if r.complete { "" } else { " (incomplete)" },
            r.seconds,
            r.deliveries_per_second,
            r.ratio_to_ceiling.map_or_else(|| "—".to_owned(), |x| format!("{:.0} %", x * 100.0)),
            r.ratio_to_contract.map_or_else(|| "—".to_owned(), |x| format!("{:.0} %", x * 100.0)),
            opt(r.offered_rate, 0),
            opt(r.achieved_rate, 0),
            opt(r.latency_p50_ms, 1),
            opt(r.latency_p95_ms, 1),
            opt(r.latency_p99_ms, 1),
            opt(r.latency_max_ms, 1),
            opt(r.settled_seconds, 2),
            r.duplicates.map_or_else(|| "—".to_owned(), |d| d.to_string()),
        );
    }
    for r in runs.iter().filter(|r| r.scenario == "aged") {
        let _ = write!(
            md,
            "\n## Claims on an aged queue\n\n\
             Mean of 1,000 of the workers' claims of 50 rows among 100,000 due rows (pgbench, one client), ms.\n\n\
             | fresh table | after {} deliveries | after VACUUM | after retention pruned them | pruned rows/s |\n\
             |---|---|---|---|---|\n| {} | {} | {} | {} | {} |\n",
            thousands(r.rows),
            opt(r.claim_ms_fresh, 3),
            opt(r.claim_ms_aged, 3),
            opt(r.claim_ms_vacuumed, 3),
            opt(r.claim_ms_pruned, 3),
            opt(r.prune_rows_per_second, 0),
        );
    }
    if runs.iter().any(|r| r.latency_split_ms.is_some()) {
        md.push_str(
            "\n## Where the latency goes (database timestamps, ms)\n\n\
             `created_at` is the producer's transaction start, `last_attempt_at` the worker's start of the \
             HTTP attempt, `delivered_at` the commit of its write-back; the HTTP attempt is the worker's \
             own timing (`delivery_attempts.duration_ms`). In a drain, created → attempt is time spent in \
             the backlog.\n\n\
             | run | created → attempt p50 | p99 | attempt → settled p50 | p99 | of which HTTP p50 | p99 |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for r in runs {
            if let Some(split) = r.latency_split_ms {
                let _ = writeln!(
                    md,
                    "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    r.label,
                    split.wait_p50,
                    split.wait_p99,
                    split.settle_p50,
                    split.settle_p99,
                    split.http_p50,
                    split.http_p99
                );
            }
        }
    }
    let wide: Vec<&Run> = runs.iter().filter(|r| r.webhooks.is_some()).collect();
    if !wide.is_empty() {
        md.push_str(
            "\n## Wide runs: what a claim costs\n\n\
             Claims in the measured window (pg_stat_statements calls of the workers' claim statement, else the \
             workers' `webhook_claim_duration_seconds` count); claim time from that histogram, summed over the \
             workers' `/metrics` (p99: upper bound of its bucket); attempts are every request at the receiver \
             (failing path included); buffers are the claim statement's `shared_blks_hit + shared_blks_read`, \
             statements inside the function included. Skewed: latency of the free webhooks only. Publish: \
             measured from the publish's commit.\n\n\
             | run | webhooks | p50 ms | p99 ms | max ms | PostgreSQL CPU s / 1000 | worker CPU s / 1000 | claims | claim mean ms | claim p99 ms ≤ | attempts per claim | buffers per claimed row | publish: last arrival s | arrival p50 / p99 ms |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in wide {
            let _ = writeln!(
                md,
                "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.label,
                if r.complete { "" } else { " (incomplete)" },
                r.webhooks.map_or_else(|| "—".to_owned(), |w| thousands(u64::from(w))),
                opt(r.latency_p50_ms, 1),
                opt(r.latency_p99_ms, 1),
                opt(r.latency_max_ms, 1),
                opt(r.postgres_cpu_seconds_per_1000, 3),
                opt(r.worker_cpu_seconds_per_1000, 3),
                r.claims.map_or_else(|| "—".to_owned(), thousands),
                opt(r.claim_mean_ms, 2),
                opt(r.claim_p99_bound_ms, 1),
                opt(r.rows_per_claim, 2),
                opt(r.buffers_per_claimed_row, 1),
                opt(r.publish_last_arrival_s, 2),
                match (r.publish_arrival_p50_ms, r.publish_arrival_p99_ms) {
                    (Some(p50), Some(p99)) => format!("{p50:.0} / {p99:.0}"),
                    _ => "—".to_owned(),
                },
            );
        }
    }
    md.push_str("\n## Resources\n\n");
    md.push_str(
        "| run | worker CPU s / 1000 | PostgreSQL CPU s / 1000 | bench CPU s / 1000 | machine CPU busy | worker RSS peak MB | worker RSS end MB | queue before MB (total / indexes) | queue after MB (total / indexes) | dead tuples after |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            opt(r.worker_cpu_seconds_per_1000, 3),
            opt(r.postgres_cpu_seconds_per_1000, 3),
            opt(r.bench_cpu_seconds_per_1000, 3),
            r.machine_busy_percent.map_or_else(|| "—".to_owned(), |p| format!("{p:.0} %")),
            opt(r.worker_rss_peak_mb, 1),
            opt(r.worker_rss_end_mb, 1),
            size(r.queue_before),
            size(r.queue_after),
            r.dead_tuples_after.map_or_else(|| "—".to_owned(), |d| thousands(d.max(0) as u64)),
        );
    }
    md.push_str("\n## Targets (reported, never asserted)\n\n| target | measured | verdict |\n|---|---|---|\n");
    for t in targets {
        let _ = writeln!(md, "| {} | {} | {} |", t.target, t.measured, t.verdict);
    }
    if runs.iter().any(|r| !r.statements.is_empty()) {
        md.push_str(
            "\n## Where PostgreSQL's time goes (pg_stat_statements, track = all, planning included)\n\n\
             Statements run inside a function (top level: no) are also counted in their caller.\n",
        );
        for r in runs.iter().filter(|r| !r.statements.is_empty()) {
            let total: f64 = r.statements.iter().filter(|s| s.toplevel).map(|s| s.total_ms).sum();
            let _ = writeln!(
                md,
                "\n### {}\n\n| total ms | of which planning | share of top level | calls | mean ms | rows | top level | statement |\n|---|---|---|---|---|---|---|---|",
                r.label
            );
            for s in &r.statements {
                let _ = writeln!(
                    md,
                    "| {:.0} | {:.0} | {:.0} % | {} | {:.3} | {} | {} | `{}` |",
                    s.total_ms,
                    s.plan_ms,
                    s.total_ms / total.max(1e-9) * 100.0,
                    thousands(s.calls.max(0) as u64),
                    s.mean_ms,
                    thousands(s.rows.max(0) as u64),
                    if s.toplevel { "yes" } else { "no" },
                    s.query.replace('|', "\\|").replace('`', "'"),
                );
            }
        }
    }
    if runs.iter().any(|r| !r.claim_statements.is_empty()) {
        md.push_str(
            "\n## Inside the claim (pg_stat_statements, `--statements`)\n\n\
             Statements run inside `hookfleet.claim_deliveries` (matched by their text against its source and \
             the functions it calls), by total time; the claim's own line is the top-level statement.\n",
        );
        for r in runs.iter().filter(|r| !r.claim_statements.is_empty()) {
            let _ = writeln!(
                md,
                "\n### {}\n\n| total ms | calls | mean ms | rows | statement |\n|---|---|---|---|---|",
                r.label
            );
            if let Some(claim) = r.claim_statement {
                let _ = writeln!(
                    md,
                    "| {:.0} | {} | {:.3} | {} | the claim (`sql/queries/claim.sql`), {} buffers |",
                    claim.exec_ms,
                    thousands(claim.calls.max(0) as u64),
                    claim.exec_ms / claim.calls.max(1) as f64,
                    thousands(claim.rows.max(0) as u64),
                    thousands(claim.buffers.max(0) as u64),
                );
            }
            for s in &r.claim_statements {
                let _ = writeln!(
                    md,
                    "| {:.0} | {} | {:.3} | {} | `{}` |",
                    s.total_ms,
                    thousands(s.calls.max(0) as u64),
                    s.mean_ms,
                    thousands(s.rows.max(0) as u64),
                    s.query.replace('|', "\\|").replace('`', "'"),
                );
            }
        }
    }
    let notes: Vec<String> =
        runs.iter().filter(|r| !r.note.is_empty()).map(|r| format!("- {}: {}", r.label, r.note)).collect();
    if !notes.is_empty() {
        let _ = writeln!(md, "\n## Notes\n\n{}", notes.join("\n"));
    }
    md
}

/// Writes `<dir>/<timestamp>.json` and `.md`; returns their paths.
pub fn write(dir: &Path, context: &Context, runs: &[Run], targets: &[Target]) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
    let json = dir.join(format!("{stamp}.json"));
    let md = dir.join(format!("{stamp}.md"));
    std::fs::write(&json, serde_json::to_string_pretty(&Document { context, runs, targets })? + "\n")?;
    std::fs::write(&md, markdown(context, runs, targets))?;
    Ok((json, md))
}
