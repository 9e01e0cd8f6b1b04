//! `hookfleet-bench`: measures the fleet on this machine against a throwaway (durable) PostgreSQL,
//! a loopback receiver in this process and real `hookfleet-worker` processes started from the
//! binary next to this one. Scenarios (each bounded in rows and seconds, each on a fresh
//! database of the same server):
//!
//! - **ceiling**: pgbench runs the bare claim→complete statement on a pre-filled queue: what
//!   PostgreSQL itself can do with this schema here, the yardstick of the drains.
//! - **contract**: pgbench runs only the writes the data model asks of each delivery (lease,
//!   settle, attempt row, health), in two transactions per batch: what hookfleet adds on top.
//! - **drain**: a pre-filled queue drained by 1, then 3 workers.
//! - **steady**, **outbox**, **fanout**: producers at a fixed offered rate (multi-row INSERTs,
//!   transactions of 10 INSERTs, `hookfleet.publish` to 10 webhooks) with the workers running;
//!   enqueue→arrival latency percentiles.
//! - **wide**, **skewed**, **publish** (issue 15, many webhooks at a low rate each): a producer at
//!   a fixed rate spread evenly over 1,000 and 10,000 webhooks (1,000/s) and over 200 (500/s);
//!   a Zipf spread over 10,000 webhooks with binding rate limits and failing receivers, latency
//!   of the free webhooks; one `hookfleet.publish` to 10,000 webhooks (commit → last arrival).
//!   Each also reports claims, claim time, attempts per claim and buffers per claimed row
//!   (pg_stat_statements is loaded for them, and each worker's /metrics is scraped).
//! - **aged**: the workers' claim measured by pgbench in a fresh table, after 1,000,000 rows went
//!   through the queue, after VACUUM, and after retention pruned them.
//!
//! Every run also reports worker, PostgreSQL and bench CPU per 1,000 deliveries, how busy the
//! machine was, worker RSS, the queue's size and dead tuples, and duplicates. The receiver speaks
//! HTTP/1.1, or HTTP/2 over TLS with `--receiver http2`. Figures go to stdout and, as JSON and Markdown,
//! to `bench/results/<timestamp>.{json,md}`. Targets are reported next to them, never asserted.

mod db;
mod procs;
mod receiver;
mod report;
mod scenarios;
mod wide;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::bail;
use clap::{Parser, ValueEnum};
use hookfleet_core::pg_embedded::{EmbeddedOptions, EmbeddedPostgres};
use hookfleet_test_support::LoopbackTls;

use crate::report::Run;
use crate::scenarios::{Cycle, Env, Load, Paced};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Ceiling,
    Contract,
    Aged,
    Drain,
    Steady,
    Outbox,
    Fanout,
    Wide,
    Skewed,
    Publish,
}

/// A wide run's size: `<webhooks>x<deliveries/s>`, e.g. `10000x1000`.
#[derive(Clone, Copy, Debug)]
struct WideSize {
    webhooks: u32,
    rate: f64,
}

fn wide_size(text: &str) -> Result<WideSize, String> {
    let (webhooks, rate) =
        text.split_once(['x', 'X']).ok_or_else(|| format!("`{text}`: expected <webhooks>x<rate>, e.g. 1000x1000"))?;
    let webhooks: u32 = webhooks.trim().parse().map_err(|_| format!("`{text}`: webhooks must be a whole number"))?;
    let rate: f64 = rate.trim().parse().map_err(|_| format!("`{text}`: rate must be a number"))?;
    if webhooks == 0 || webhooks > u32::from(u16::MAX) || !rate.is_finite() || rate <= 0.0 {
        return Err(format!("`{text}`: webhooks must be 1 to 65535 and the rate positive"));
    }
    Ok(WideSize { webhooks, rate })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ReceiverKind {
    Http1,
    Http2,
}

#[derive(Parser)]
#[command(
    about = "Measure hookfleet on this machine: ceiling, contract, drain, steady, outbox, fanout, wide, skewed, publish and aged scenarios"
)]
struct Args {
    /// Small sizes for a smoke run of well under a minute (once built): 10,000 drain rows, 5 s per
    /// paced run, tighter bounds. Explicit options still win.
    #[arg(long)]
    quick: bool,
    /// Which scenarios to run, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ceiling,contract,drain,steady,outbox,fanout,wide,skewed,publish,aged"
    )]
    scenarios: Vec<Scenario>,
    /// Worker counts of the drain runs, one drain each.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    workers: Vec<u32>,
    /// Workers serving the paced scenarios (steady, outbox, fanout) [default: 3].
    #[arg(long, default_value_t = 3)]
    load_workers: u32,
    /// Rows pre-inserted for each drain [default: 200000; --quick 10000].
    #[arg(long)]
    rows: Option<u32>,
    /// Rows pre-inserted for the ceiling [default: as --rows].
    #[arg(long)]
    ceiling_rows: Option<u32>,
    /// Settled rows pushed through the queue before the aged claims [default: 1000000; --quick 100000].
    #[arg(long)]
    aged_rows: Option<u32>,
    /// Offered rates (rows/s) of the steady and outbox runs, one run each.
    #[arg(long, value_delimiter = ',', default_value = "500,5000")]
    rates: Vec<f64>,
    /// Offered rate of the fanout run, in events/s (each event is delivered to every webhook).
    #[arg(long, default_value_t = 100.0)]
    fanout_rate: f64,
    /// Webhooks subscribed to the fanout event.
    #[arg(long, default_value_t = 10)]
    fanout_webhooks: u16,
    /// Wide runs, one each: <webhooks>x<deliveries/s>, traffic spread evenly (round-robin)
    /// [default: 1000x1000,10000x1000,200x500; --quick 1000x1000,200x500].
    #[arg(long, value_delimiter = ',', value_parser = wide_size)]
    wide: Vec<WideSize>,
    /// The skewed run: <webhooks>x<deliveries/s>, Zipf spread [default: 10000x1000; --quick 1000x1000].
    #[arg(long, value_parser = wide_size)]
    skewed: Option<WideSize>,
    /// Webhooks the publish run fans one event out to [default: 10000; --quick 1000].
    #[arg(long)]
    publish_webhooks: Option<u32>,
    /// How long the wide and skewed producers run [default: 30s; --quick 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    wide_duration: Option<Duration>,
    /// How long each paced producer runs [default: 60s; --quick 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// After a paced producer stopped, how long to wait for the last arrival [default: 60s; --quick 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    settle_timeout: Option<Duration>,
    /// Upper bound of each drain and of the ceiling [default: 600s; --quick 120s].
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Producer connections of the outbox runs (steady and fanout use one).
    #[arg(long, default_value_t = 4)]
    outbox_producers: u32,
    /// The producers' pacing tick: every tick inserts what the rate made due.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    tick: Duration,
    /// Worker BATCH_SIZE: the ceiling's claim size.
    #[arg(long, default_value_t = 100)]
    batch_size: u32,
    /// Worker HOOKFLEET_MAX_IN_FLIGHT: enough that a single webhook (half of it) is not held back
    /// by its per-webhook cap at loopback latencies.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: u32,
    /// What the loopback receiver speaks: HTTP/1.1 keep-alive, or HTTPS where ALPN picks HTTP/2
    /// (a throwaway CA the workers trust through HOOKFLEET_CA_CERTIFICATES).
    #[arg(long, value_enum, default_value = "http1")]
    receiver: ReceiverKind,
    /// Load pg_stat_statements (track = all) and report each run's top statements by execution
    /// time: where PostgreSQL's time goes. Adds a little overhead to every statement.
    #[arg(long)]
    statements: bool,
    /// Where the JSON and Markdown results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let quick = args.quick;
    let rows = args.rows.unwrap_or(if quick { 10_000 } else { 200_000 });
    let ceiling_rows = args.ceiling_rows.unwrap_or(rows);
    let aged_rows = args.aged_rows.unwrap_or(if quick { 100_000 } else { 1_000_000 });
    let duration = args.duration.unwrap_or(Duration::from_secs(if quick { 5 } else { 60 }));
    let settle_timeout = args.settle_timeout.unwrap_or(Duration::from_secs(if quick { 10 } else { 60 }));
    let timeout = args.timeout.unwrap_or(Duration::from_secs(if quick { 120 } else { 600 }));
    let wide_sizes = if args.wide.is_empty() {
        let size = |webhooks, rate| WideSize { webhooks, rate };
        if quick {
            vec![size(1_000, 1_000.0), size(200, 500.0)]
        } else {
            vec![size(1_000, 1_000.0), size(10_000, 1_000.0), size(200, 500.0)]
        }
    } else {
        args.wide.clone()
    };
    let skewed = args.skewed.unwrap_or(WideSize { webhooks: if quick { 1_000 } else { 10_000 }, rate: 1_000.0 });
    let publish_webhooks = args.publish_webhooks.unwrap_or(if quick { 1_000 } else { 10_000 });
    let wide_duration = args.wide_duration.unwrap_or(Duration::from_secs(if quick { 5 } else { 30 }));
    if publish_webhooks == 0 || publish_webhooks > u32::from(u16::MAX) {
        bail!("--publish-webhooks must be 1 to 65535");
    }
    if rows == 0 || ceiling_rows < 300 || args.workers.contains(&0) || args.load_workers == 0 {
        bail!("--rows, --ceiling-rows (at least 300), --workers and --load-workers must be positive");
    }
    if args.rates.iter().chain([&args.fanout_rate]).any(|rate| !rate.is_finite() || *rate <= 0.0)
        || args.outbox_producers == 0
    {
        bail!("rates and --outbox-producers must be positive");
    }

    let worker_binary = std::env::current_exe()?.with_file_name("hookfleet-worker");
    if !worker_binary.exists() {
        bail!(
            "{} not found: build with `cargo build --release -p hookfleet-worker -p hookfleet-bench` (or use bench/run)",
            worker_binary.display()
        );
    }
    let mut settings: Vec<(String, String)> =
        vec![("max_connections".into(), "200".into()), ("shared_buffers".into(), "256MB".into())];
    // The wide scenarios always report the claim statement's calls, rows and buffers.
    let wants_claims =
        args.scenarios.iter().any(|s| matches!(s, Scenario::Wide | Scenario::Skewed | Scenario::Publish));
    let mut claim_stats = false;
    if args.statements || wants_claims {
        let bindir = EmbeddedPostgres::find_bindir()?;
        let library = bindir.parent().map(|dir| dir.join("lib/pg_stat_statements.so"));
        let available = library.as_ref().is_some_and(|path| path.exists());
        if !available && args.statements {
            bail!(
                "--statements needs pg_stat_statements next to {} (apt-get install postgresql-contrib)",
                bindir.display()
            );
        }
        if !available {
            println!(
                "pg_stat_statements not found next to {}: the wide runs report no claim counts or buffers \
                 (apt-get install postgresql-contrib)",
                bindir.display()
            );
        }
        claim_stats = available && wants_claims;
    }
    if args.statements || claim_stats {
        settings.push(("shared_preload_libraries".into(), "pg_stat_statements".into()));
        settings.push(("pg_stat_statements.track".into(), "all".into()));
        settings.push(("pg_stat_statements.track_planning".into(), "on".into()));
    }
    println!("starting a throwaway PostgreSQL (durable) …");
    let options = EmbeddedOptions { durable: true, stop_when_process_exits: Some(std::process::id()), settings };
    let server = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(options)).await??;
    let postgres_version: String = hookfleet_core::db::connect(&server.connection_string("postgres"), "bench")
        .await?
        .query_one("SHOW server_version", &[])
        .await?
        .get(0);
    // The CA file lives as long as this process needs it; the directory goes when it drops.
    let ca_dir = tempfile::tempdir()?;
    let (tls, ca_file) = match args.receiver {
        ReceiverKind::Http1 => (None, None),
        ReceiverKind::Http2 => {
            let tls = LoopbackTls::generate()?;
            let ca_file = tls.write_ca(ca_dir.path())?;
            (Some(tls), Some(ca_file))
        }
    };
    let (receiver, receiver_url) = receiver::Receiver::start(tls.as_ref()).await?;
    let context = report::Context {
        started_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        postgres: postgres_version,
        durable: true,
        batch_size: args.batch_size,
        max_in_flight: args.max_in_flight,
        drain_rows: rows,
        ceiling_rows,
        paced_seconds: duration.as_secs_f64(),
        wide_seconds: wide_duration.as_secs_f64(),
        settle_timeout_seconds: settle_timeout.as_secs_f64(),
        timeout_seconds: timeout.as_secs_f64(),
        receiver: match args.receiver {
            ReceiverKind::Http1 => "HTTP/1.1 keep-alive (axum)",
            ReceiverKind::Http2 => {
                "HTTP/2 over TLS (axum, ALPN h2; the workers trust the bench's throwaway CA through HOOKFLEET_CA_CERTIFICATES)"
            }
        },
    };
    let env = Env {
        server: &server,
        receiver,
        receiver_url,
        ca_file,
        worker_binary,
        batch_size: args.batch_size,
        max_in_flight: args.max_in_flight,
        timeout,
        settle_timeout,
        tick: args.tick,
        statements: args.statements,
        claim_stats,
    };

    let mut runs: Vec<Run> = Vec::new();
    let mut failures = Vec::new();
    for &scenario in &args.scenarios {
        let mut plan: Vec<(String, Job)> = Vec::new();
        let wide_job = |name: &str, size: WideSize, skewed: bool| {
            (
                format!(
                    "{name} {} webhooks × {}/s for {wide_duration:?}, {} workers",
                    size.webhooks, size.rate, args.load_workers
                ),
                Job::Wide(wide::Wide {
                    webhooks: size.webhooks,
                    rate: size.rate,
                    duration: wide_duration,
                    workers: args.load_workers,
                    skewed,
                }),
            )
        };
        match scenario {
            Scenario::Ceiling => plan.push((format!("ceiling, {ceiling_rows} rows"), Job::Ceiling(Cycle::Ceiling))),
            Scenario::Contract => plan.push((format!("contract, {ceiling_rows} rows"), Job::Ceiling(Cycle::Contract))),
            Scenario::Aged => plan.push((format!("aged, {aged_rows} settled rows"), Job::Aged)),
            Scenario::Drain => {
                for &workers in &args.workers {
                    plan.push((format!("drain, {rows} rows, {workers} workers"), Job::Drain(workers)));
                }
            }
            Scenario::Steady | Scenario::Outbox => {
                let load = if scenario == Scenario::Steady { Load::Steady } else { Load::Outbox };
                for &rate in &args.rates {
                    plan.push((
                        format!("{} {rate}/s for {duration:?}, {} workers", load.name(), args.load_workers),
                        Job::Paced(Paced {
                            load,
                            rate,
                            duration,
                            workers: args.load_workers,
                            producers: if load == Load::Outbox { args.outbox_producers } else { 1 },
                            webhooks: 1,
                        }),
                    ));
                }
            }
            Scenario::Fanout => plan.push((
                format!(
                    "fanout {}/s × {} webhooks for {duration:?}, {} workers",
                    args.fanout_rate, args.fanout_webhooks, args.load_workers
                ),
                Job::Paced(Paced {
                    load: Load::Fanout,
                    rate: args.fanout_rate,
                    duration,
                    workers: args.load_workers,
                    producers: 1,
                    webhooks: args.fanout_webhooks.max(1),
                }),
            )),
            Scenario::Wide => {
                for size in &wide_sizes {
                    plan.push(wide_job("wide", *size, false));
                }
            }
            Scenario::Skewed => plan.push(wide_job("skewed", skewed, true)),
            Scenario::Publish => plan.push((
                format!("publish to {publish_webhooks} webhooks, {} workers", args.load_workers),
                Job::Publish(publish_webhooks),
            )),
        }
        for (title, job) in plan {
            println!("{title} …");
            let began = std::time::Instant::now();
            let result = match &job {
                Job::Ceiling(cycle) => scenarios::ceiling(&env, ceiling_rows, *cycle).await,
                Job::Aged => scenarios::aged(&env, aged_rows).await,
                Job::Drain(workers) => scenarios::drain(&env, rows, *workers).await,
                Job::Paced(paced) => scenarios::paced(&env, paced).await,
                Job::Wide(size) => wide::wide(&env, size).await,
                Job::Publish(webhooks) => wide::publish(&env, *webhooks, args.load_workers).await,
            };
            match result {
                Ok(run) => {
                    println!("  {} [{:.1} s]", one_line(&run), began.elapsed().as_secs_f64());
                    runs.push(run);
                }
                Err(error) => {
                    println!("  FAILED: {error:#}");
                    failures.push(format!("{title}: {error:#}"));
                }
            }
        }
    }

    report::apply_ceiling(&mut runs);
    let targets = report::targets(&runs);
    let markdown = report::markdown(&context, &runs, &targets);
    println!("\n{markdown}");
    let (json, md) = report::write(&args.out, &context, &runs, &targets)?;
    println!("wrote {} and {}", json.display(), md.display());
    drop(env);
    tokio::task::spawn_blocking(move || drop(server)).await?;
    if !failures.is_empty() {
        bail!("{} run(s) failed:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(())
}

enum Job {
    Ceiling(Cycle),
    Aged,
    Drain(u32),
    Paced(Paced),
    Wide(wide::Wide),
    Publish(u32),
}

fn one_line(run: &Run) -> String {
    if run.scenario == "aged" {
        return run.note.clone();
    }
    let mut line = format!(
        "{} of {} delivered, {:.0}/s over {:.2} s",
        run.delivered, run.rows, run.deliveries_per_second, run.seconds
    );
    if let (Some(p50), Some(p99), Some(max)) = (run.latency_p50_ms, run.latency_p99_ms, run.latency_max_ms) {
        line += &format!(", latency p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms");
    }
    if let Some(achieved) = run.achieved_rate {
        line += &format!(", inserted {achieved:.0}/s");
    }
    if let Some(cpu) = run.worker_cpu_seconds_per_1000 {
        line += &format!(", worker CPU {cpu:.3} s/1000");
    }
    if let Some(claims) = run.claims {
        line += &format!(", {claims} claims");
    }
    if let Some(mean) = run.claim_mean_ms {
        line += &format!(" of {mean:.2} ms mean");
    }
    if let Some(last) = run.publish_last_arrival_s {
        line += &format!(", last arrival {last:.2} s after the publish");
    }
    if !run.complete {
        line += " (incomplete)";
    }
    line
}
