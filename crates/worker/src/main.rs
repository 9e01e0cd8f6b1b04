//! `hookfleet-worker`: claims due deliveries from PostgreSQL and delivers them. Everything it does
//! lives in `hookfleet_core::worker`; this binary loads the configuration, sets up logging, turns
//! SIGTERM/SIGINT into the shutdown token and reports how it ended.

use std::process::ExitCode;

use hookfleet_core::config::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
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
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match hookfleet_core::worker::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "hookfleet-worker stopped");
            eprintln!("hookfleet-worker: {error}");
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
