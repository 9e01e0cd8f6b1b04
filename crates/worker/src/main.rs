//! `hookfleet-worker`: claims due deliveries from PostgreSQL and delivers them. Everything it does
//! lives in `hookfleet_core::worker`; this binary answers `--help` and `--version`, loads the
//! configuration, sets up logging, checks that it can work with the database's schema, turns
//! SIGTERM/SIGINT into the shutdown token and reports how it ended.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hookfleet_core::config::Config;
use hookfleet_core::db::DbError;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

/// How long a worker started before its database is up keeps trying to reach it. A worker often
/// starts together with PostgreSQL (compose, a node reboot), which takes seconds to accept
/// connections; much longer means something is wrong, and an exit says so to the supervisor.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);

/// Takes no arguments: `--help` and `--version` only, so that asking for help never starts a worker.
#[derive(Parser)]
#[command(
    name = "hookfleet-worker",
    version,
    about = "hookfleet worker: claims due deliveries from the PostgreSQL queue and delivers them",
    after_help = "Configured by environment variables (DATABASE_URL, BATCH_SIZE, METRICS_ADDR, WORKER_ID, …) and an \
                  optional TOML file named by HOOKFLEET_CONFIG; `hookfleet settings` lists every setting.\n\
                  The database must have been migrated by `hookfleet migrate` from this release or a compatible \
                  newer one; the worker checks at start-up and refuses otherwise."
)]
struct Arguments {}

fn main() -> ExitCode {
    Arguments::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hookfleet-worker: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(start());
    // A name lookup stuck in getaddrinfo (a mute nameserver) holds a blocking thread the attempt
    // has long given up on; dropping the runtime would wait for it, past the orchestrator's kill.
    runtime.shutdown_timeout(RUNTIME_STOP_LIMIT);
    code
}

/// How long the exit waits for blocking threads still running (see `main`).
const RUNTIME_STOP_LIMIT: Duration = Duration::from_millis(500);

async fn start() -> ExitCode {
    // Until logging is set up, stderr is the only channel; afterwards every message goes through
    // the log (text or JSON, as LOG_FORMAT says), once.
    let config = match Config::load() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("hookfleet-worker: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = hookfleet_core::telemetry::init(&config.log_level, config.log_format) {
        eprintln!("hookfleet-worker: {error}");
        return ExitCode::from(2);
    }
    let Some(url) = config.database_url.as_ref().map(|url| url.expose_secret().to_owned()) else {
        tracing::error!("hookfleet-worker cannot start: {}", DbError::MissingUrl);
        return ExitCode::from(2);
    };
    // Before the signal handlers: Ctrl-C while waiting for the database ends the process at once.
    if let Err(error) = hookfleet_core::schema::connect_checked(&url, "hookfleet-worker", STARTUP_PATIENCE).await {
        tracing::error!("hookfleet-worker cannot start: {error}");
        return ExitCode::FAILURE;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match hookfleet_core::worker::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("hookfleet-worker stopped: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop the worker with SIGKILL");
        return;
    };
    for round in 0..2 {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        if round == 0 {
            tracing::info!(signal = name, "shutting down gracefully");
            shutdown.cancel();
        } else {
            tracing::warn!(signal = name, "second signal: exiting now; held deliveries return after their lease");
            std::process::exit(130);
        }
    }
}
