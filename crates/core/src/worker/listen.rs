//! Wake-ups: a dedicated connection LISTENs on `hookfleet_deliveries` (notified once per
//! inserting statement) and wakes the claim loop, so latency doesn't wait for `POLL_INTERVAL`.
//! Polling stays the fallback; the listener reconnects with backoff when its connection drops.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::sleep_or_shutdown;
use crate::db::{self, DbError};

const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LISTEN_LIMIT: Duration = Duration::from_secs(10);

pub(super) async fn run(database_url: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut outage = Outage { pause: FIRST_PAUSE, failures: 0 };
    loop {
        match listen(&database_url, &wake, &shutdown, &mut outage).await {
            Ok(()) => return,
            Err(error) => {
                outage.failures += 1;
                if outage.failures == 1 {
                    tracing::warn!(%error, "wake-up listener disconnected; polling every POLL_INTERVAL until it reconnects");
                } else {
                    tracing::debug!(%error, retry_in = ?outage.pause, "wake-up listener still cannot connect");
                }
            }
        }
        if sleep_or_shutdown(outage.pause, &shutdown).await {
            return;
        }
        outage.pause = (outage.pause * 2).min(Duration::from_secs(10));
    }
}

/// The reconnect state: backoff grows within one outage and starts over once connected again.
struct Outage {
    pause: Duration,
    failures: u32,
}

/// Listens until shutdown (Ok) or until the connection fails (Err).
async fn listen(
    database_url: &str,
    wake: &Notify,
    shutdown: &CancellationToken,
    outage: &mut Outage,
) -> Result<(), DbError> {
    let config = db::connection_config(database_url, "hookfleet-worker-listen")?;
    let (client, mut connection) = config.connect(NoTls).await?;
    let (notifications, mut received) = mpsc::unbounded_channel();
    // The connection must be polled for the client to work at all; this task does that and
    // forwards notifications. It ends when the connection does.
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if notifications.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    });
    // Bounded: a server that accepts the connection and never answers would leave the worker
    // without wake-ups, and this loop without any reason to reconnect.
    tokio::time::timeout(LISTEN_LIMIT, client.batch_execute("LISTEN hookfleet_deliveries"))
        .await
        .map_err(|_| DbError::TimedOut(LISTEN_LIMIT))??;
    if outage.failures > 0 {
        tracing::info!(attempts = outage.failures, "wake-up listener reconnected");
    } else {
        tracing::debug!("listening for new deliveries");
    }
    *outage = Outage { pause: FIRST_PAUSE, failures: 0 };
    // Rows may have arrived while nobody was listening.
    wake.notify_one();
    let outcome = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            message = received.recv() => match message {
                Some(()) => wake.notify_one(),
                None => break Err(DbError::ConnectionClosed),
            },
        }
    };
    drop(client);
    driver.abort();
    outcome
}
