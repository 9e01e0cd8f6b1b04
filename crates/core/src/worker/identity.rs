//! One live process per `WORKER_ID`. Rows are leased to a worker id, and a worker releases what
//! its id holds at shutdown, so two processes sharing an id would release (and fence off) each
//! other's rows. Each worker therefore holds a session-level advisory lock on its id, on a
//! connection of its own, for as long as it runs: a second process with a live id is refused at
//! start. A worker that dies loses its connection and with it the lock (at once for `kill -9`;
//! within about a minute for a host that vanished, by the server-side keepalives set below), so a
//! restart under the same id is not refused.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::WorkerError;
use crate::db::{self, DbError};

/// Advisory-lock class of worker ids (the two-key form, apart from every one-key lock hookfleet
/// takes): "hook".
const WORKER_ID_LOCK_CLASS: i32 = 0x686f_6f6b;
/// A process restarted under its old id may start before the server has noticed that the old
/// connection closed: how long to wait for the lock before refusing.
const TAKE_PATIENCE: Duration = Duration::from_secs(3);
/// How often the holder checks its connection, and how soon it retries after losing it.
const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How long the check may take before the connection counts as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The lock on this process's `WORKER_ID`, while it runs.
pub(super) struct WorkerIdLock {
    url: String,
    worker_id: String,
    client: Option<tokio_postgres::Client>,
    /// The server process of the session that holds (or last held) the lock.
    backend_pid: Option<i32>,
}

impl WorkerIdLock {
    /// Takes the lock, or refuses when another live process holds it. When the database cannot
    /// be reached now, the worker starts anyway (it retries everything) and [`Self::keep`] takes
    /// the lock once it can.
    pub(super) async fn take(url: &str, worker_id: &str) -> Result<Self, WorkerError> {
        let mut lock = Self { url: url.to_owned(), worker_id: worker_id.to_owned(), client: None, backend_pid: None };
        let give_up = Instant::now() + TAKE_PATIENCE;
        loop {
            let taken = tokio::time::timeout(CHECK_TIMEOUT * 3, lock.try_take())
                .await
                .unwrap_or(Err(DbError::TimedOut(CHECK_TIMEOUT * 3)));
            match taken {
                Ok(true) => return Ok(lock),
                Ok(false) if Instant::now() < give_up => tokio::time::sleep(Duration::from_millis(100)).await,
                Ok(false) => return Err(WorkerError::WorkerIdInUse(lock.worker_id)),
                Err(error) => {
                    tracing::warn!(%error, "cannot reach the database to lock WORKER_ID yet; will keep trying");
                    return Ok(lock);
                }
            }
        }
    }

    /// Holds the lock for as long as the process runs (the caller aborts this task after the
    /// worker deregistered: holding it through the drain keeps a restarted process under the same
    /// id from claiming while this one still releases what its id holds). Checks its connection
    /// with a query, so that a server that vanished without closing the socket is noticed within
    /// seconds. When the connection is lost (a database restart or failover releases every lock),
    /// takes the lock again; if another process holds it by then, fires `lost` and stops this
    /// worker, which then releases nothing: two processes with one id would release each other's
    /// rows.
    pub(super) async fn keep(mut self, shutdown: CancellationToken, lost: CancellationToken) {
        loop {
            tokio::time::sleep(CHECK_INTERVAL).await;
            if let Some(client) = &self.client {
                let alive = tokio::time::timeout(CHECK_TIMEOUT, client.simple_query("SELECT 1")).await;
                if matches!(alive, Ok(Ok(_))) {
                    continue;
                }
                tracing::warn!(worker_id = %self.worker_id, "the WORKER_ID lock's connection is gone; taking the lock again");
                self.client = None;
            }
            // Bounded: a server that stops answering must not stall the keeper for good.
            let taken = tokio::time::timeout(CHECK_TIMEOUT * 3, self.try_take())
                .await
                .unwrap_or(Err(DbError::TimedOut(CHECK_TIMEOUT * 3)));
            match taken {
                Ok(true) => tracing::info!(worker_id = %self.worker_id, "WORKER_ID lock taken again"),
                Ok(false) => {
                    tracing::error!(
                        worker_id = %self.worker_id,
                        "another live process took this WORKER_ID while the database was out of reach; stopping"
                    );
                    lost.cancel();
                    shutdown.cancel();
                    return;
                }
                Err(error) => tracing::debug!(%error, "cannot lock WORKER_ID yet"),
            }
        }
    }

    /// Tries to take the lock on a new connection. When it is held by this process's own earlier
    /// session (a connection that broke while the server still thinks it alive), ends that
    /// session and tries again; held by any other session, it is another process's.
    async fn try_take(&mut self) -> Result<bool, DbError> {
        // Server-side keepalives: a lock held by a host that vanished must not outlive it by the
        // kernel default of two hours.
        let client = db::connect_with_options(
            &self.url,
            "hookfleet-worker-id",
            "-c idle_in_transaction_session_timeout=60000 -c tcp_keepalives_idle=20 \
             -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3",
        )
        .await?;
        for _ in 0..2 {
            let row = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1::int4, hashtext($2::text)), pg_backend_pid(), \
                            (SELECT l.pid FROM pg_locks l \
                             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                               AND l.classid::bigint = $1::int4::bigint \
                               AND l.objid::bigint = (hashtext($2::text)::bigint & 4294967295) \
                               AND l.pid <> pg_backend_pid() LIMIT 1)",
                    &[&WORKER_ID_LOCK_CLASS, &self.worker_id],
                )
                .await?;
            let taken: bool = row.try_get(0)?;
            if taken {
                self.backend_pid = Some(row.try_get(1)?);
                self.client = Some(client);
                return Ok(true);
            }
            let holder: Option<i32> = row.try_get(2)?;
            match (holder, self.backend_pid) {
                (Some(holder), Some(ours)) if holder == ours => {
                    tracing::warn!(
                        pid = holder,
                        "ending this worker's own stale session that still holds its WORKER_ID lock"
                    );
                    client.execute("SELECT pg_terminate_backend($1, 5000)", &[&holder]).await?;
                }
                _ => return Ok(false),
            }
        }
        Ok(false)
    }
}
