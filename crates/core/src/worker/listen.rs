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

pub(super) async fn run(database_url: String, wake: Arc<Notify>, shutdown: CancellationToken) {
    let mut pause = Duration::from_millis(100);
    loop {
        match listen(&database_url, &wake, &shutdown).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?pause, "wake-up listener disconnected; polling every POLL_INTERVAL until it reconnects");
            }
        }
        if sleep_or_shutdown(pause, &shutdown).await {
            return;
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

/// Listens until shutdown (Ok) or until the connection fails (Err).
async fn listen(database_url: &str, wake: &Notify, shutdown: &CancellationToken) -> Result<(), DbError> {
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
    client.batch_execute("LISTEN hookfleet_deliveries").await?;
    tracing::debug!("listening for new deliveries");
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
