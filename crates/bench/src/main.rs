//! `hookfleet-bench`: measures the fleet on this machine. The **drain** scenario pre-inserts rows,
//! starts N real `hookfleet-worker` processes against a throwaway PostgreSQL and a loopback
//! receiver in this process, and reports deliveries/s from the first to the last arrival, worker
//! CPU seconds per 1,000 deliveries and worker peak RSS. Results go to stdout and, as JSON and
//! Markdown, to `bench/results/`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use clap::Parser;
use hookfleet_core::crypto::{EncryptionKey, Keyring};
use hookfleet_core::pg_embedded::{EmbeddedOptions, EmbeddedPostgres};
use hookfleet_core::webhooks::{NewWebhook, WebhookStore};
use secrecy::SecretString;
use serde::Serialize;

#[derive(Parser)]
#[command(about = "Measure hookfleet: drain a pre-filled queue with 1..N workers")]
struct Args {
    /// Rows to pre-insert per run.
    #[arg(long, default_value_t = 20_000)]
    rows: u32,
    /// Worker counts to run, one drain each (e.g. 1,3).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    workers: Vec<u32>,
    #[arg(long, default_value_t = 50)]
    batch_size: u32,
    #[arg(long, default_value_t = 256)]
    max_in_flight: u32,
    /// Give up on a run after this long.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Where the JSON and Markdown results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// Arrivals at the receiver: (webhook-id, when).
#[derive(Default)]
struct Arrivals {
    seen: Mutex<Vec<(String, Instant)>>,
}

#[derive(Serialize)]
struct DrainResult {
    scenario: &'static str,
    workers: u32,
    rows: u32,
    batch_size: u32,
    max_in_flight: u32,
    /// First to last arrival at the receiver.
    seconds: f64,
    deliveries_per_second: f64,
    /// Until every row was `delivered` in the database (write-back included).
    settled_seconds: f64,
    duplicates: usize,
    worker_cpu_seconds_per_1000: f64,
    worker_peak_rss_mb: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let worker_binary = std::env::current_exe()?.with_file_name("hookfleet-worker");
    if !worker_binary.exists() {
        bail!(
            "{} not found: build with `cargo build --release -p hookfleet-worker -p hookfleet-bench`",
            worker_binary.display()
        );
    }
    println!("starting a throwaway PostgreSQL …");
    let options = EmbeddedOptions {
        durable: true,
        stop_when_process_exits: Some(std::process::id()),
        settings: vec![("max_connections".into(), "200".into()), ("shared_buffers".into(), "256MB".into())],
    };
    let server = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(options)).await??;

    let arrivals = Arc::new(Arrivals::default());
    let app = axum::Router::new().fallback(receive).with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut results = Vec::new();
    for (run, &workers) in args.workers.iter().enumerate() {
        let dbname = format!("bench_{run}");
        let admin = hookfleet_core::db::connect(&server.connection_string("postgres"), "bench").await?;
        admin.batch_execute(&format!("CREATE DATABASE {dbname}")).await?;
        let url = server.connection_string(&dbname);
        arrivals.seen.lock().map_err(|_| anyhow::anyhow!("lock"))?.clear();
        let result = drain(&args, &url, workers, receiver, &worker_binary, &arrivals).await?;
        println!(
            "drain: {} workers, {} rows: {:.0} deliveries/s ({:.2} s first→last arrival, settled in {:.2} s), {:.3} worker CPU s per 1000, peak RSS {:.1} MB, {} duplicates",
            result.workers,
            result.rows,
            result.deliveries_per_second,
            result.seconds,
            result.settled_seconds,
            result.worker_cpu_seconds_per_1000,
            result.worker_peak_rss_mb,
            result.duplicates
        );
        results.push(result);
    }
    write_results(&args.out, &results)?;
    drop(server);
    Ok(())
}

async fn drain(
    args: &Args,
    url: &str,
    workers: u32,
    receiver: std::net::SocketAddr,
    worker_binary: &Path,
    arrivals: &Arrivals,
) -> anyhow::Result<DrainResult> {
    let mut client = hookfleet_core::db::connect(url, "bench").await?;
    hookfleet_core::db::migrate(&mut client, 262_144).await?;
    let key = EncryptionKey::generate_base64();
    let keyring = Keyring::from_settings(Some(&SecretString::from(key.clone())), &[])?;
    let store = WebhookStore::new(hookfleet_core::db::pool(url, "bench", 2)?, Arc::new(keyring));
    let http = hookfleet_core::delivery::DeliveryClient::new(hookfleet_core::delivery::ClientOptions {
        allow_http: true,
        allowed_cidrs: vec!["127.0.0.0/8".parse()?],
        connect_timeout: Duration::from_secs(2),
        response_body_cap: 1024,
        user_agent: "hookfleet-bench".into(),
        extra_root_certificates: Vec::new(),
    })?;
    let webhook = store
        .create(NewWebhook { url: format!("http://{receiver}/"), enabled: true, ..NewWebhook::default() }, &http)
        .await?;
    for first in (0..args.rows).step_by(10_000) {
        let last = (first + 10_000).min(args.rows);
        client
            .execute(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
                 SELECT $1, jsonb_build_object('n', n, 'pad', repeat('x', 200)) FROM generate_series($2::int, $3::int) n",
                &[&webhook.webhook_id, &(first as i32 + 1), &(last as i32)],
            )
            .await?;
    }
    client.batch_execute("VACUUM ANALYZE hookfleet.delivery_queue").await?;

    let start = Instant::now();
    let mut children: Vec<Child> = (1..=workers)
        .map(|n| {
            Command::new(worker_binary)
                .env("DATABASE_URL", url)
                .env("HOOKFLEET_ENCRYPTION_KEY", &key)
                .env("HOOKFLEET_ALLOW_HTTP", "true")
                .env("HOOKFLEET_ALLOWED_CIDRS", "127.0.0.0/8")
                .env("WORKER_ID", format!("bench-{n}"))
                .env("METRICS_ADDR", "127.0.0.1:0")
                .env("BATCH_SIZE", args.batch_size.to_string())
                .env("HOOKFLEET_MAX_IN_FLIGHT", args.max_in_flight.to_string())
                .env("LOG_LEVEL", "warn")
                .stdin(Stdio::null())
                .spawn()
                .context("start hookfleet-worker")
        })
        .collect::<Result<_, _>>()?;

    let deadline = start + args.timeout;
    let settled = loop {
        let delivered: i64 = client
            .query_one("SELECT count(*) FROM hookfleet.delivery_queue WHERE delivery_status = 'delivered'", &[])
            .await?
            .get(0);
        if delivered >= i64::from(args.rows) {
            break start.elapsed();
        }
        if Instant::now() > deadline {
            bail!("drain with {workers} workers: only {delivered} of {} delivered after {:?}", args.rows, args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (cpu_seconds, peak_rss_kb) =
        children.iter().map(|child| process_usage(child.id())).fold((0.0, 0u64), |a, b| (a.0 + b.0, a.1.max(b.1)));
    for child in &children {
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    }
    for child in &mut children {
        let _ = child.wait();
    }

    let seen = arrivals.seen.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let first = seen.iter().map(|(_, at)| *at).min().context("no arrivals")?;
    let last = seen.iter().map(|(_, at)| *at).max().context("no arrivals")?;
    let unique: HashSet<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
    let seconds = (last - first).as_secs_f64();
    println!("  first arrival {:.2} s after the workers started", (first - start).as_secs_f64());
    Ok(DrainResult {
        scenario: "drain",
        workers,
        rows: args.rows,
        batch_size: args.batch_size,
        max_in_flight: args.max_in_flight,
        seconds,
        deliveries_per_second: f64::from(args.rows) / seconds.max(1e-9),
        settled_seconds: settled.as_secs_f64(),
        duplicates: seen.len() - unique.len(),
        worker_cpu_seconds_per_1000: cpu_seconds / f64::from(args.rows) * 1000.0,
        worker_peak_rss_mb: peak_rss_kb as f64 / 1024.0,
    })
}

/// CPU seconds (user + system) and peak RSS (kB) of a live process, from /proc.
fn process_usage(pid: u32) -> (f64, u64) {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / ticks_per_second)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find(|line| line.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0);
    (cpu, rss)
}

async fn receive(State(arrivals): State<Arc<Arrivals>>, headers: HeaderMap) -> StatusCode {
    let id = headers.get("webhook-id").and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned();
    if let Ok(mut seen) = arrivals.seen.lock() {
        seen.push((id, Instant::now()));
    }
    StatusCode::OK
}

fn write_results(dir: &Path, results: &[DrainResult]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
    let mut markdown = String::from(
        "| scenario | workers | rows | deliveries/s | first→last (s) | settled (s) | worker CPU s / 1000 | worker peak RSS (MB) | duplicates |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        markdown.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.3} | {:.1} | {} |\n",
            r.scenario,
            r.workers,
            r.rows,
            r.deliveries_per_second,
            r.seconds,
            r.settled_seconds,
            r.worker_cpu_seconds_per_1000,
            r.worker_peak_rss_mb,
            r.duplicates
        ));
    }
    std::fs::write(dir.join(format!("drain-{stamp}.json")), serde_json::to_string_pretty(results)?)?;
    std::fs::write(dir.join(format!("drain-{stamp}.md")), &markdown)?;
    println!("\n{markdown}");
    Ok(())
}
