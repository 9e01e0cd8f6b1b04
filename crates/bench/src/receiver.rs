//! The loopback receiver: an axum server in this process (HTTP/1.1 keep-alive, or HTTPS with a
//! throwaway CA where ALPN picks HTTP/2) that answers 200 to everything and records each request's
//! webhook (the URL path `/w/<n>`), `webhook-id`, arrival time and, when the body carries the
//! producer's `sent_at_us`, the enqueue→arrival latency measured against this process's own clock
//! (same machine, same clock as the producer). The path `/fail/<n>` answers 500 and is only
//! counted: the skewed scenario's failing webhooks point there, so they retry and their circuits open.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use hookfleet_test_support::LoopbackTls;
use serde::Deserialize;

/// One request as the receiver saw it.
#[derive(Clone)]
pub struct Arrival {
    /// Which webhook: the `<n>` of the URL path `/w/<n>` (0 for any other path).
    pub hook: u16,
    pub id: Box<str>,
    pub at: Instant,
    /// Receiver clock minus the body's `sent_at_us`, in microseconds.
    pub latency_us: Option<i64>,
}

#[derive(Default)]
pub struct Receiver {
    arrivals: Mutex<Vec<Arrival>>,
    requests: AtomicU64,
    /// Requests to `/fail/<n>` (answered 500, not recorded as arrivals).
    failures: AtomicU64,
}

#[derive(Deserialize)]
struct Probe {
    sent_at_us: Option<i64>,
}

impl Receiver {
    /// Serves on an ephemeral loopback port until the process exits, over TLS with `tls`'s
    /// certificate when given; returns the base URL (`http://127.0.0.1:<port>` or `https://…`).
    pub async fn start(tls: Option<&LoopbackTls>) -> anyhow::Result<(Arc<Receiver>, String)> {
        let receiver = Arc::new(Receiver::default());
        let app = axum::Router::new().fallback(receive).with_state(receiver.clone());
        let base = match tls {
            None => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                tokio::spawn(async move { axum::serve(listener, app).await });
                format!("http://{addr}")
            }
            Some(tls) => {
                let listener = tls.bind().await?;
                let addr = axum::serve::Listener::local_addr(&listener)?;
                tokio::spawn(async move { axum::serve(listener, app).await });
                format!("https://{addr}")
            }
        };
        Ok((receiver, base))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arrival>> {
        self.arrivals.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Requests seen since the last `take`.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests answered 500 (`/fail/<n>`) since the last `take`.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Distinct (webhook, webhook-id) pairs seen since the last `take`.
    pub fn unique(&self) -> u64 {
        self.unique_matching(|_| true)
    }

    /// Distinct (webhook, webhook-id) pairs of the webhooks `keep` accepts, since the last `take`.
    pub fn unique_matching(&self, keep: impl Fn(u16) -> bool) -> u64 {
        let arrivals = self.lock();
        arrivals.iter().filter(|a| keep(a.hook)).map(|a| (a.hook, &*a.id)).collect::<HashSet<_>>().len() as u64
    }

    /// Everything recorded so far; starts a fresh record.
    pub fn take(&self) -> Vec<Arrival> {
        let mut arrivals = self.lock();
        self.requests.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        std::mem::take(&mut *arrivals)
    }
}

pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

async fn receive(State(receiver): State<Arc<Receiver>>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    if uri.path().starts_with("/fail/") {
        receiver.failures.fetch_add(1, Ordering::Relaxed);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let received_us = now_us();
    let at = Instant::now();
    let id = headers.get("webhook-id").and_then(|value| value.to_str().ok()).unwrap_or_default();
    let hook = uri.path().strip_prefix("/w/").and_then(|n| n.parse().ok()).unwrap_or(0);
    let latency_us =
        serde_json::from_slice::<Probe>(&body).ok().and_then(|probe| probe.sent_at_us).map(|sent| received_us - sent);
    let arrival = Arrival { hook, id: id.into(), at, latency_us };
    receiver.lock().push(arrival);
    receiver.requests.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

/// What a scenario's arrivals amount to.
pub struct Summary {
    pub requests: u64,
    pub unique: u64,
    pub duplicates: u64,
    /// First to last arrival, seconds.
    pub seconds: f64,
    pub first: Option<Instant>,
    /// Latency percentiles in milliseconds (p50, p95, p99, max), over arrivals that carried
    /// `sent_at_us`.
    pub latency_ms: Option<[f64; 4]>,
}

pub fn summarize(arrivals: &[Arrival]) -> Summary {
    let unique = arrivals.iter().map(|a| (a.hook, &*a.id)).collect::<HashSet<_>>().len() as u64;
    let first = arrivals.iter().map(|a| a.at).min();
    let last = arrivals.iter().map(|a| a.at).max();
    let seconds = match (first, last) {
        (Some(first), Some(last)) => (last - first).as_secs_f64(),
        _ => 0.0,
    };
    let mut latencies: Vec<i64> = arrivals.iter().filter_map(|a| a.latency_us).collect();
    latencies.sort_unstable();
    let latency_ms = (!latencies.is_empty()).then(|| {
        let at = |p: f64| {
            let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
            latencies[rank - 1] as f64 / 1000.0
        };
        [at(0.50), at(0.95), at(0.99), *latencies.last().unwrap_or(&0) as f64 / 1000.0]
    });
    Summary {
        requests: arrivals.len() as u64,
        unique,
        duplicates: arrivals.len() as u64 - unique,
        seconds,
        first,
        latency_ms,
    }
}
