//! `hookfleet demo`: the whole system on one machine in one command. A throwaway PostgreSQL (unless
//! `DATABASE_URL` is set), the schema, a loopback receiver that verifies every signature, two
//! webhooks (one always healthy, one that answers 503 to every fifth request so retries show),
//! three `hookfleet-worker` processes, and a stream of sample events inserted by plain SQL.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::crypto::{EncryptionKey, Keyring};
use crate::delivery::DeliveryClient;
use crate::pg_embedded::{EmbeddedOptions, EmbeddedPostgres};
use crate::signing::{self, SigningSecret};
use crate::webhooks::{NewWebhook, WebhookStore};

pub struct DemoOptions {
    pub messages: u32,
    pub workers: u32,
    /// Stop once every message is settled instead of waiting for Ctrl-C.
    pub exit_when_done: bool,
    /// Where `hookfleet-worker` lives (normally next to `hookfleet`).
    pub worker_binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("demo: {0}")]
pub struct DemoError(String);

fn fail<E: std::fmt::Display>(context: &str) -> impl Fn(E) -> DemoError + '_ {
    move |error| DemoError(format!("{context}: {error}"))
}

/// What the demo receiver saw.
#[derive(Default)]
struct ReceiverStats {
    received: AtomicU64,
    verified: AtomicU64,
    refused_503: AtomicU64,
    secrets: Mutex<Vec<(String, SigningSecret)>>,
}

pub async fn run(config: Config, options: DemoOptions, shutdown: CancellationToken) -> Result<(), DemoError> {
    if !options.worker_binary.exists() {
        return Err(DemoError(format!(
            "{} not found: build it with `cargo build --release -p hookfleet-worker`",
            options.worker_binary.display()
        )));
    }
    // 1. PostgreSQL: the configured one, or a throwaway server that lives as long as the demo.
    let (database_url, server, psql) = match &config.database_url {
        Some(url) => (url.expose_secret().to_owned(), None, "psql \"$DATABASE_URL\"".to_owned()),
        None => {
            println!(
                "starting a throwaway PostgreSQL from {} …",
                EmbeddedPostgres::find_bindir().map_err(fail("PostgreSQL"))?.display()
            );
            let options = EmbeddedOptions {
                durable: true,
                stop_when_process_exits: Some(std::process::id()),
                ..EmbeddedOptions::default()
            };
            let server = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(options))
                .await
                .map_err(fail("PostgreSQL"))?
                .map_err(fail("PostgreSQL"))?;
            let admin = crate::db::connect(&server.connection_string("postgres"), "hookfleet-demo")
                .await
                .map_err(fail("connect"))?;
            admin
                .batch_execute("CREATE DATABASE hookfleet")
                .await
                .map_err(|error| DemoError(format!("create database: {}", crate::db::describe(&error))))?;
            let psql = format!("psql \"{}\"", server.url("hookfleet"));
            (server.connection_string("hookfleet"), Some(server), psql)
        }
    };
    let mut client = crate::db::connect(&database_url, "hookfleet-demo").await.map_err(fail("connect"))?;
    crate::db::migrate(&mut client, config.max_body_bytes).await.map_err(fail("migrate"))?;
    println!("schema migrated");

    // 2. A receiver on loopback that checks every signature.
    let stats = Arc::new(ReceiverStats::default());
    let app = axum::Router::new().fallback(receive).with_state(stats.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(fail("receiver"))?;
    let receiver_addr = listener.local_addr().map_err(fail("receiver"))?;
    let receiver_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let _ =
            axum::serve(listener, app).with_graceful_shutdown(async move { receiver_shutdown.cancelled().await }).await;
    });

    // 3. Two webhooks, created the way `hookfleet webhooks create` does.
    let key = match &config.encryption_key {
        Some(key) => key.clone(),
        None => SecretString::from(EncryptionKey::generate_base64()),
    };
    let keyring =
        Keyring::from_settings(Some(&key), &config.previous_encryption_keys).map_err(fail("encryption key"))?;
    let pool = crate::db::pool(&database_url, "hookfleet-demo", 2).map_err(fail("pool"))?;
    let store = WebhookStore::new(pool, Arc::new(keyring));
    let mut demo_config = config.clone();
    demo_config.allow_http = true;
    demo_config.allowed_cidrs = vec!["127.0.0.0/8".parse().map_err(fail("cidr"))?];
    let http = DeliveryClient::new(crate::worker::client_options(&demo_config)).map_err(fail("http client"))?;
    let mut webhook_ids = Vec::new();
    // The flaky one gets a retry budget that outlasts its 20 % failure rate. Each has its own
    // fleet-wide rate limit (the default, RATE_LIMIT_RPS, is 10/s).
    for (name, path, max_retries, rate) in [("orders", "/orders", None, 1000.0), ("flaky", "/flaky", Some(10), 200.0)] {
        let webhook = store
            .create(
                NewWebhook {
                    name: Some(name.into()),
                    url: format!("http://{receiver_addr}{path}"),
                    max_retries,
                    rate_limit_rps: Some(rate),
                    enabled: true,
                    ..NewWebhook::default()
                },
                &http,
            )
            .await
            .map_err(fail("create webhook"))?;
        let secret = SigningSecret::parse(webhook.secret.as_deref().unwrap_or_default()).map_err(fail("secret"))?;
        stats.secrets.lock().map_err(fail("lock"))?.push((path.to_owned(), secret));
        println!("webhook {} ({name}, at most {rate}/s) → http://{receiver_addr}{path}", webhook.webhook_id);
        webhook_ids.push(webhook.webhook_id);
    }

    // 4. The fleet.
    let mut workers = Vec::new();
    let mut metrics_addrs = Vec::new();
    for n in 1..=options.workers {
        let metrics_addr = metrics_addr(n).map_err(fail("metrics port"))?;
        let child = Command::new(&options.worker_binary)
            .env("DATABASE_URL", &database_url)
            .env("HOOKFLEET_ENCRYPTION_KEY", key.expose_secret())
            .env("HOOKFLEET_ALLOW_HTTP", "true")
            .env("HOOKFLEET_ALLOWED_CIDRS", "127.0.0.0/8,::1/128")
            .env("HOOKFLEET_RETRY_BASE", "500ms")
            .env("HOOKFLEET_RETRY_MAX", "5s")
            .env("WORKER_ID", format!("demo-worker-{n}"))
            .env("METRICS_ADDR", &metrics_addr)
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .spawn()
            .map_err(fail("start hookfleet-worker"))?;
        println!("worker demo-worker-{n} (pid {}) → metrics at http://{metrics_addr}/metrics", child.id());
        workers.push(child);
        metrics_addrs.push(metrics_addr);
    }

    // 5. Sample events: plain INSERTs in transactions of 100, as a producer's outbox would.
    let started = Instant::now();
    let total = u64::from(options.messages) * webhook_ids.len() as u64;
    for first in (0..options.messages).step_by(100) {
        let last = (first + 100).min(options.messages);
        client
            .execute(
                "INSERT INTO hookfleet.delivery_queue (webhook_id, event_type, message_body) \
                 SELECT w, 'order.created', jsonb_build_object('order_id', n, 'amount_cents', n * 100) \
                 FROM unnest($1::bigint[]) w, generate_series($2::int, $3::int) n",
                &[&webhook_ids, &(first as i32 + 1), &(last as i32)],
            )
            .await
            .map_err(|error| DemoError(format!("insert: {}", crate::db::describe(&error))))?;
    }
    println!("inserted {total} deliveries ({} messages × {} webhooks)\n", options.messages, webhook_ids.len());

    // 6. Live progress until everything is settled.
    let settled = loop {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE delivery_status = 'delivered'), count(*) FILTER (WHERE delivery_status = 'dead'), \
                 count(*) FILTER (WHERE delivery_status IN ('pending', 'in_flight')) FROM hookfleet.delivery_queue",
                &[],
            )
            .await
            .map_err(|error| DemoError(format!("progress: {}", crate::db::describe(&error))))?;
        let (delivered, dead, waiting): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        print!(
            "\r{delivered}/{total} delivered, {dead} dead, {waiting} waiting; receiver: {} requests, {} signatures verified, {} answered 503   ",
            stats.received.load(Ordering::Relaxed),
            stats.verified.load(Ordering::Relaxed),
            stats.refused_503.load(Ordering::Relaxed)
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if waiting == 0 {
            break delivered;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break delivered,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    };
    println!("\n\n{settled}/{total} delivered in {:.1} s\n", started.elapsed().as_secs_f64());
    println!("Look around:");
    println!("  {psql}");
    println!("    SELECT * FROM hookfleet.v_queue_depth;");
    println!("    SELECT * FROM hookfleet.v_webhook_health_dashboard;");
    println!("    SELECT * FROM hookfleet.v_webhook_performance;");
    println!(
        "    INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES ({}, '{{\"type\":\"test\"}}');",
        webhook_ids[0]
    );
    // Only the throwaway server's address is printed: a configured DATABASE_URL may hold a password.
    match &server {
        Some(_) => println!("  hookfleet status --database-url '{database_url}'"),
        None => println!("  hookfleet status    # with DATABASE_URL set"),
    }
    for (n, addr) in metrics_addrs.iter().enumerate() {
        println!("  curl http://{addr}/metrics    # demo-worker-{}", n + 1);
    }
    if !options.exit_when_done {
        println!("\nPress Ctrl-C to stop (the throwaway database goes with it).");
        shutdown.cancelled().await;
    }

    // 7. Graceful stop: SIGTERM each worker, wait, then the database.
    for worker in &workers {
        let _ = Command::new("kill").arg("-TERM").arg(worker.id().to_string()).status();
    }
    for worker in &mut workers {
        wait_for_exit(worker, Duration::from_secs(30)).await;
    }
    drop(client);
    if let Some(server) = server {
        tokio::task::spawn_blocking(move || drop(server)).await.map_err(fail("stop PostgreSQL"))?;
    }
    if u64::try_from(settled).unwrap_or(0) != total {
        return Err(DemoError(format!("only {settled} of {total} deliveries were delivered")));
    }
    Ok(())
}

/// 127.0.0.1:909n when free (easy to remember), else any free port.
fn metrics_addr(n: u32) -> std::io::Result<String> {
    let preferred = u16::try_from(9090 + n).unwrap_or(0);
    let listener = std::net::TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))?;
    Ok(listener.local_addr()?.to_string())
}

async fn wait_for_exit(child: &mut Child, deadline: Duration) {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Verifies the signature, then answers 200, or 503 to every fifth request on `/flaky`.
async fn receive(
    State(stats): State<Arc<ReceiverStats>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let seen = stats.received.fetch_add(1, Ordering::Relaxed);
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned();
    let timestamp = header("webhook-timestamp").parse::<i64>().unwrap_or_default();
    let verified = stats.secrets.lock().map(|secrets| {
        secrets.iter().any(|(path, secret)| {
            path == uri.path()
                && signing::verify_v1(secret, &header("webhook-id"), timestamp, &body, &header("webhook-signature"))
        })
    });
    if !verified.unwrap_or(false) {
        return StatusCode::UNAUTHORIZED;
    }
    stats.verified.fetch_add(1, Ordering::Relaxed);
    if uri.path() == "/flaky" && seen % 5 == 4 {
        stats.refused_503.fetch_add(1, Ordering::Relaxed);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::OK
}
