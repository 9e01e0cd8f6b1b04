//! `hookfleet`: the operator's command line — migrations, webhook admin, status dashboards,
//! replay and cancel, API keys, key generation. Each command is a thin call into `hookfleet_core`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use hookfleet_core::api_keys::{ApiKeyStore, RevokeOutcome, Scope};
use hookfleet_core::config::Config;
use hookfleet_core::crypto::{EncryptionKey, Keyring};
use hookfleet_core::db;
use hookfleet_core::delivery::DeliveryClient;
use hookfleet_core::schema::{self, Compatibility, SchemaError};
use hookfleet_core::webhooks::{NewWebhook, WebhookStore};
use secrecy::{ExposeSecret, SecretString};

#[derive(Parser)]
#[command(name = "hookfleet", version, about = "hookfleet: webhook delivery on PostgreSQL")]
struct Cli {
    /// PostgreSQL connection string (URL or key=value form).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the schema (idempotent; safe when several run at once).
    Migrate,
    /// Manage webhooks.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Manage the HTTP API's keys (stored as SHA-256 hashes: a key is shown once, when created).
    #[command(subcommand)]
    ApiKeys(ApiKeysCommand),
    /// Show the queue, webhook health, performance and live workers.
    Status,
    /// Reset a dead (or cancelled, or delivered) delivery to pending.
    Replay { delivery_id: i64 },
    /// Cancel a pending delivery.
    Cancel { delivery_id: i64 },
    /// Print a fresh HOOKFLEET_ENCRYPTION_KEY (32 random bytes, base64).
    Keygen,
    /// Run the whole system on this machine: throwaway PostgreSQL, receiver, three workers, sample events.
    Demo {
        /// Messages to publish (each goes to two webhooks).
        #[arg(long, default_value_t = 1000)]
        messages: u32,
        #[arg(long, default_value_t = 3)]
        workers: u32,
        /// Exit once everything is delivered instead of waiting for Ctrl-C.
        #[arg(long)]
        exit_when_done: bool,
    },
    /// Print every setting (environment name, config-file key, default) as a Markdown table.
    Settings,
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// Create a webhook and print it as JSON, with its signing secret.
    Create(CreateArgs),
    /// List webhooks. URLs are shown without their query string (often a receiver's token) unless
    /// --show-urls is given.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show each URL whole, query string included.
        #[arg(long)]
        show_urls: bool,
    },
}

#[derive(Subcommand)]
enum ApiKeysCommand {
    /// Create a key and print it once, as JSON (key_id, name, scope, key_prefix, created_at, key).
    Create {
        /// What the key is for, shown in lists (1 to 200 characters).
        #[arg(long)]
        name: String,
        /// admin (everything) or producer (post messages, read deliveries).
        #[arg(long)]
        scope: Scope,
    },
    /// List keys (never the keys themselves): prefix, scope, created, last used, revoked.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: it stops working at once (revoking it again changes nothing).
    Revoke { key_id: i64 },
}

#[derive(Args)]
struct CreateArgs {
    #[arg(long)]
    url: String,
    /// whsec_<base64>; generated when absent. A command line shows up in `ps` and in shell history:
    /// prefer HOOKFLEET_WEBHOOK_SECRET or --secret-stdin.
    #[arg(long, env = "HOOKFLEET_WEBHOOK_SECRET", hide_env_values = true, conflicts_with = "secret_stdin")]
    secret: Option<String>,
    /// Read the secret from standard input (its first line).
    #[arg(long)]
    secret_stdin: bool,
    /// Event types to subscribe to, comma-separated (none: all).
    #[arg(long, value_delimiter = ',')]
    events: Vec<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    rate_limit_rps: Option<f64>,
    #[arg(long)]
    rate_limit_burst: Option<u32>,
    #[arg(long)]
    max_retries: Option<u32>,
    #[arg(long)]
    timeout_ms: Option<u32>,
    #[arg(long)]
    max_in_flight: Option<u32>,
    /// Consecutive failures that open its circuit [default: CIRCUIT_BREAKER_FAILURE_THRESHOLD].
    #[arg(long)]
    circuit_breaker_threshold: Option<u32>,
    /// How long its circuit stays open before one probe, e.g. 30s [default: CIRCUIT_BREAKER_TIMEOUT_SECONDS].
    #[arg(long, value_parser = hookfleet_core::config::parse_duration)]
    circuit_breaker_timeout: Option<std::time::Duration>,
    /// Create it disabled (its deliveries wait until it is enabled).
    #[arg(long)]
    disabled: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hookfleet: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen => {
            println!("{}", EncryptionKey::generate_base64());
            return Ok(());
        }
        Command::Settings => {
            println!("| environment | file key | default | meaning |\n|---|---|---|---|");
            for setting in Config::settings() {
                let key = if setting.key.is_empty() { "—" } else { setting.key };
                println!("| `{}` | `{key}` | {} | {} |", setting.env, setting.default, setting.description);
            }
            return Ok(());
        }
        Command::Demo { messages, workers, exit_when_done } => {
            let mut config = Config::load()?;
            if let Some(url) = cli.database_url {
                config.database_url = Some(SecretString::from(url));
            }
            let worker_binary = std::env::current_exe()?.with_file_name("hookfleet-worker");
            let shutdown = tokio_util::sync::CancellationToken::new();
            let on_signal = shutdown.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    on_signal.cancel();
                }
            });
            let options = hookfleet_core::demo::DemoOptions { messages, workers, exit_when_done, worker_binary };
            hookfleet_core::demo::run(config, options, shutdown).await?;
            return Ok(());
        }
        _ => {}
    }
    let mut config = Config::load()?;
    if let Some(url) = cli.database_url {
        config.database_url = Some(SecretString::from(url));
    }
    hookfleet_core::telemetry::init(&config.log_level, config.log_format)?;
    let url = config
        .database_url
        .as_ref()
        .context("DATABASE_URL is not set: pass --database-url or set DATABASE_URL")?
        .expose_secret()
        .to_owned();
    match cli.command {
        Command::Keygen | Command::Settings | Command::Demo { .. } => unreachable!("handled above"),
        Command::Migrate => migrate(&url, &config).await,
        Command::Webhooks(WebhooksCommand::Create(args)) => create_webhook(&url, &config, args).await,
        Command::Webhooks(WebhooksCommand::List { json, show_urls }) => {
            list_webhooks(&url, &config, json, show_urls).await
        }
        Command::ApiKeys(command) => api_keys(&url, command).await,
        Command::Status => status(&url).await,
        Command::Replay { delivery_id } => {
            let client = checked_connection(&url).await?;
            let row = client
                .query_one("SELECT hookfleet.replay_delivery($1)", &[&delivery_id])
                .await
                .map_err(|error| anyhow::anyhow!(db::describe(&error)))?;
            let status: String = row.try_get(0)?;
            println!("delivery {delivery_id} is {status} again");
            Ok(())
        }
        Command::Cancel { delivery_id } => {
            let client = checked_connection(&url).await?;
            let row = client
                .query_one("SELECT cancelled, delivery_status FROM hookfleet.cancel_delivery($1)", &[&delivery_id])
                .await
                .map_err(|error| anyhow::anyhow!(db::describe(&error)))?;
            let (cancelled, status): (bool, String) = (row.try_get(0)?, row.try_get(1)?);
            if !cancelled {
                bail!("delivery {delivery_id} is {status}; only pending deliveries can be cancelled");
            }
            println!("delivery {delivery_id} cancelled");
            Ok(())
        }
    }
}

/// A connection to a database whose schema this build can work with (see `hookfleet_core::schema`).
/// A person runs the CLI, so a database that is down is reported at once, not waited for.
async fn checked_connection(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    Ok(schema::connect_checked(url, "hookfleet", std::time::Duration::ZERO).await?)
}

async fn migrate(url: &str, config: &Config) -> anyhow::Result<()> {
    let mut client = db::connect(url, "hookfleet-migrate").await?;
    // An older release's `migrate` in a rolling upgrade (an old pod's init step, say) meets a
    // schema already migrated further. Refinery would fail on the migrations it does not know;
    // while the schema still accepts this release there is nothing to do, and when it does not,
    // the check says what to run instead.
    match schema::check(&client, "hookfleet").await {
        Ok(Compatibility::Newer { database_level, .. }) => {
            println!("schema is up to date (V{database_level:04}, newer than this release's, which it still accepts)");
            return Ok(());
        }
        Err(error @ (SchemaError::TooOld { .. } | SchemaError::UnknownCompatibility { .. })) => {
            return Err(error.into())
        }
        // Never migrated, behind, current: refinery applies what is missing (or refuses a history
        // that is not this build's, with its own message).
        _ => {}
    }
    let report = db::migrate(&mut client, config.max_body_bytes).await?;
    if report.applied.is_empty() && report.definitions.is_empty() {
        println!("schema is up to date");
    }
    if !report.applied.is_empty() {
        println!("applied {} migration(s): {}", report.applied.len(), report.applied.join(", "));
    }
    if !report.definitions.is_empty() {
        println!("applied {} function and view file(s): {}", report.definitions.len(), report.definitions.join(", "));
    }
    Ok(())
}

async fn webhook_store(url: &str, config: &Config) -> anyhow::Result<WebhookStore> {
    checked_connection(url).await?;
    let keyring = Keyring::from_settings(config.encryption_key.as_ref(), &config.previous_encryption_keys)?;
    let pool = db::pool(url, "hookfleet-cli", 2)?;
    Ok(WebhookStore::new(pool, Arc::new(keyring)))
}

/// The secret of `webhooks create --secret-stdin`: the first line of standard input.
fn secret_from_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("cannot read the secret from standard input")?;
    let secret = line.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        anyhow::bail!("--secret-stdin: standard input held no secret (expected whsec_… on its first line)");
    }
    Ok(secret)
}

/// A URL as lists show it: without its query string and fragment, which often carry a receiver's
/// token, and without credentials (refused at creation; an older row may have them).
fn masked_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            let hidden = parsed.query().is_some() || parsed.fragment().is_some();
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.set_query(None);
            parsed.set_fragment(None);
            let mut shown = parsed.to_string();
            if hidden {
                shown.push_str("?…");
            }
            shown
        }
        // Not a URL the store would hold; show none of it rather than guess what is secret.
        Err(_) => "(not a valid URL)".to_owned(),
    }
}

async fn create_webhook(url: &str, config: &Config, mut args: CreateArgs) -> anyhow::Result<()> {
    if args.secret_stdin {
        args.secret = Some(secret_from_stdin()?);
    }
    let store = webhook_store(url, config).await?;
    let client = DeliveryClient::new(hookfleet_core::worker::client_options(config))
        .map_err(|error| anyhow::anyhow!("cannot build the HTTP client: {error}"))?;
    let new = NewWebhook {
        name: args.name,
        url: args.url,
        secret: args.secret,
        event_types: args.events.into_iter().filter(|event| !event.is_empty()).collect(),
        rate_limit_rps: args.rate_limit_rps,
        rate_limit_burst: args.rate_limit_burst,
        max_retries: args.max_retries,
        timeout_ms: args.timeout_ms,
        max_in_flight: args.max_in_flight,
        circuit_breaker_failure_threshold: args.circuit_breaker_threshold,
        circuit_breaker_timeout: args.circuit_breaker_timeout,
        enabled: !args.disabled,
    };
    let webhook = store.create(new, &client).await?;
    println!("{}", serde_json::to_string_pretty(&webhook)?);
    Ok(())
}

async fn list_webhooks(url: &str, config: &Config, json: bool, show_urls: bool) -> anyhow::Result<()> {
    let mut webhooks = webhook_store(url, config).await?.list().await?;
    if !show_urls {
        for webhook in &mut webhooks {
            webhook.url = masked_url(&webhook.url);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&webhooks)?);
        return Ok(());
    }
    let mut table = new_table(&["webhook_id", "name", "url", "event_types", "enabled", "created_at"]);
    for webhook in webhooks {
        table.add_row(vec![
            webhook.webhook_id.to_string(),
            webhook.name,
            webhook.url,
            if webhook.event_types.is_empty() { "(all)".into() } else { webhook.event_types.join(",") },
            webhook.enabled.to_string(),
            webhook.created_at,
        ]);
    }
    println!("{table}");
    Ok(())
}

async fn api_keys(url: &str, command: ApiKeysCommand) -> anyhow::Result<()> {
    checked_connection(url).await?;
    let store = ApiKeyStore::new(db::pool(url, "hookfleet-cli", 2)?);
    match command {
        ApiKeysCommand::Create { name, scope } => {
            let (key, token) = store.create(&name, scope).await?;
            let mut shown = serde_json::to_value(&key)?;
            shown["key"] = serde_json::Value::String(token.expose_secret().to_owned());
            println!("{}", serde_json::to_string_pretty(&shown)?);
            eprintln!(
                "hookfleet: this is the only time key {} is shown: hookfleet keeps only its SHA-256 hash, so store it now",
                key.key_id
            );
        }
        ApiKeysCommand::List { json } => {
            let keys = store.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
                return Ok(());
            }
            let mut table =
                new_table(&["key_id", "name", "scope", "key_prefix", "created_at", "last_used_at", "revoked_at"]);
            for key in keys {
                table.add_row(vec![
                    key.key_id.to_string(),
                    key.name,
                    key.scope.to_string(),
                    key.key_prefix,
                    key.created_at,
                    key.last_used_at.unwrap_or_else(|| "never".into()),
                    key.revoked_at.unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{table}");
        }
        ApiKeysCommand::Revoke { key_id } => match store.revoke(key_id).await? {
            RevokeOutcome::Revoked => println!("api key {key_id} revoked"),
            RevokeOutcome::AlreadyRevoked => println!("api key {key_id} was already revoked; nothing changed"),
            RevokeOutcome::NotFound => {
                bail!("api key {key_id} does not exist (`hookfleet api-keys list` shows every key)")
            }
        },
    }
    Ok(())
}

/// The dashboard views, each printed as a table.
async fn status(url: &str) -> anyhow::Result<()> {
    let client = checked_connection(url).await?;
    let sections = [
        ("Queue", "SELECT delivery_status, deliveries, round(oldest_due_age_seconds::numeric, 1) AS oldest_due_age_seconds FROM hookfleet.v_queue_depth"),
        ("Webhooks", "SELECT webhook_id, name, enabled, health_status, circuit_state, success_rate_pct, avg_response_time_ms, pending, in_flight, consecutive_failures, last_status_code, left(last_error, 60) AS last_error FROM hookfleet.v_webhook_health_dashboard ORDER BY webhook_id"),
        ("Performance", "SELECT * FROM hookfleet.v_webhook_performance ORDER BY webhook_id, window_name"),
        ("Workers", "SELECT worker_id, host, pid, version, in_flight, seconds_since_heartbeat FROM hookfleet.v_workers"),
    ];
    for (title, query) in sections {
        let messages = client.simple_query(query).await.map_err(|error| anyhow::anyhow!(db::describe(&error)))?;
        let mut table: Option<Table> = None;
        for message in messages {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                let table = table.get_or_insert_with(|| {
                    new_table(&row.columns().iter().map(|column| column.name()).collect::<Vec<_>>())
                });
                table.add_row((0..row.len()).map(|i| row.get(i).unwrap_or("").to_owned()).collect::<Vec<_>>());
            }
        }
        println!("{title}");
        match table {
            Some(table) => println!("{table}\n"),
            None => println!("  (none)\n"),
        }
    }
    Ok(())
}

fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    table
}
