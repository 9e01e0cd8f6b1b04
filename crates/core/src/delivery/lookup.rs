//! Bounded hostname lookups: getaddrinfo, at most a few at once, never waited on past a limit.
//!
//! getaddrinfo blocks, so it runs on Tokio's blocking pool, and a blocking call cannot be
//! cancelled: a caller that gives up only stops waiting, while the thread stays in getaddrinfo
//! until the system resolver's own timeouts end it (seconds, per nameserver, per attempt). With
//! a stalled nameserver every new connection would pin one more thread that way, and the
//! runtime waits for those threads when it shuts down. So each lookup holds a permit for as long
//! as getaddrinfo runs (not merely as long as its caller waits), which bounds the stuck threads
//! to the permit count, and the caller races the lookup against the time limit.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

/// Why a lookup gave no addresses.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{0}")]
    Failed(#[source] io::Error),
    #[error("no answer within {limit:?}")]
    TimedOut { limit: Duration },
    #[error("no lookup slot free within {limit:?} ({concurrent} lookups run at once at most)")]
    Busy { concurrent: usize, limit: Duration },
}

/// Runs lookups on the blocking pool, at most `concurrent` at once, each waited on for at most
/// `limit` (waiting for a slot included).
#[derive(Debug)]
pub struct LookupLimiter {
    permits: Arc<Semaphore>,
    concurrent: usize,
    limit: Duration,
}

impl LookupLimiter {
    pub fn new(concurrent: usize, limit: Duration) -> Self {
        Self { permits: Arc::new(Semaphore::new(concurrent)), concurrent, limit }
    }

    /// The addresses `host` resolves to, port 0 on each.
    pub async fn lookup(&self, host: &str) -> Result<Vec<SocketAddr>, LookupError> {
        let host = host.to_owned();
        self.run(move || (host.as_str(), 0).to_socket_addrs().map(Iterator::collect)).await
    }

    /// Runs the blocking `job` under the limits; `lookup` is the one job in production.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, LookupError> {
        let deadline = tokio::time::Instant::now() + self.limit;
        let busy = LookupError::Busy { concurrent: self.concurrent, limit: self.limit };
        let permit = match tokio::time::timeout_at(deadline, Arc::clone(&self.permits).acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            // Err(_) inside: the semaphore was closed, which nothing does; treat it as full.
            Ok(Err(_)) | Err(_) => return Err(busy),
        };
        // The permit moves into the job: it is released when getaddrinfo returns, however long
        // after the caller below stopped waiting.
        let running = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        });
        match tokio::time::timeout_at(deadline, running).await {
            Ok(Ok(result)) => result.map_err(LookupError::Failed),
            Ok(Err(join)) => Err(LookupError::Failed(io::Error::other(join))),
            // Dropping the handle detaches the job; it keeps its permit until it ends.
            Err(_) => Err(LookupError::TimedOut { limit: self.limit }),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The limiter with jobs the test holds up: no name is looked up, nothing touches the network.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    /// Polls `check` every 10 ms until it holds; panics with `what` once `deadline` has passed.
    async fn eventually(deadline: Duration, what: &str, check: impl Fn() -> bool) {
        let until = Instant::now() + deadline;
        while !check() {
            assert!(Instant::now() < until, "not within {deadline:?}: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn lookups_are_bounded_and_callers_do_not_wait_for_stalled_ones() {
        let limit = Duration::from_millis(200);
        let limiter = LookupLimiter::new(2, limit);
        let started = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        // A stalled resolver: every job blocks until the test lets go of the gate.
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let stalled = || {
            let (gate, started, finished) = (Arc::clone(&gate), Arc::clone(&started), Arc::clone(&finished));
            move || {
                started.fetch_add(1, Ordering::SeqCst);
                drop(gate.blocking_read());
                finished.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        };
        let closed = gate.write().await;

        // Three callers for two slots: all three give up near the limit (5 s is the bound a
        // loaded machine gets), though none of the lookups has finished.
        let callers = async { tokio::join!(limiter.run(stalled()), limiter.run(stalled()), limiter.run(stalled())) };
        let (first, second, third) = tokio::time::timeout(Duration::from_secs(5), callers)
            .await
            .expect("callers return without waiting for stalled lookups");
        for result in [first, second, third] {
            assert!(matches!(result, Err(LookupError::TimedOut { .. } | LookupError::Busy { .. })), "{result:?}");
        }
        eventually(Duration::from_secs(5), "two lookups start", || started.load(Ordering::SeqCst) == 2).await;

        // The slots stay taken while getaddrinfo would still be running, callers gone or not.
        let refused = limiter.run(stalled()).await;
        assert!(matches!(refused, Err(LookupError::Busy { concurrent: 2, .. })), "{refused:?}");
        assert_eq!((started.load(Ordering::SeqCst), finished.load(Ordering::SeqCst)), (2, 0));

        // Once the stalled ones end, their slots come back.
        drop(closed);
        eventually(Duration::from_secs(5), "the stalled lookups end", || finished.load(Ordering::SeqCst) == 2).await;
        assert_eq!(limiter.run(|| Ok(7)).await.expect("a free slot"), 7);
        assert_eq!(started.load(Ordering::SeqCst), 2, "a refused lookup never ran");
    }

    #[tokio::test]
    async fn a_lookup_error_is_passed_on() {
        let limiter = LookupLimiter::new(1, Duration::from_secs(5));
        let failed = limiter.run(|| Err::<(), _>(io::Error::other("no such host"))).await;
        assert!(matches!(failed, Err(LookupError::Failed(_))), "{failed:?}");
        // localhost comes from /etc/hosts: no nameserver is asked.
        let addresses = limiter.lookup("localhost").await.expect("localhost resolves");
        assert!(addresses.iter().all(|address| address.ip().is_loopback() && address.port() == 0));
    }
}
