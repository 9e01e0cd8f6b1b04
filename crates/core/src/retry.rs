//! What happens after an attempt: delivered, retried later (and when), or dead.
//!
//! Success is any 2xx. 5xx, 408, 425, 429, timeouts and connection-level errors are retried with
//! exponential backoff and full jitter (delay uniform in `[0, min(max, base * 2^retry)]`, which
//! spreads a failing webhook's retries so they don't arrive as a thundering herd); a `Retry-After`
//! header replaces the backoff, capped at `max`. Other 4xx, 3xx (redirects are never followed), a
//! refused address and an invalid URL are dead at once: repeating them cannot succeed.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::delivery::{DeliveryError, ErrorClass, Response};
use crate::queue::Outcome;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// `HOOKFLEET_RETRY_BASE`
    pub base: Duration,
    /// `HOOKFLEET_RETRY_MAX`
    pub max: Duration,
}

/// The decision for one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The row's `retry_count` after this attempt.
    pub retry_count: u32,
    /// Delay before the next attempt (zero unless `outcome` is `Retry`).
    pub delay: Duration,
}

impl RetryPolicy {
    /// The upper bound of the jittered delay before retry number `retry + 1`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 2u32.checked_pow(retry.min(31)).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).unwrap_or(self.max).min(self.max)
    }

    /// Full jitter: uniform in `[0, ceiling(retry)]`.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(rng.random_range(0.0..=ceiling.as_secs_f64()))
    }

    /// Decides what an attempt's result means for its row. `retry_count` is the row's count before
    /// the attempt; `max_retries` how many retries the row may use in all.
    pub fn decide(
        &self,
        result: &Result<Response, DeliveryError>,
        retry_count: u32,
        max_retries: u32,
        now: SystemTime,
        rng: &mut impl Rng,
    ) -> Decision {
        let retryable = match result {
            Ok(response) if (200..300).contains(&response.status) => {
                return Decision { outcome: Outcome::Delivered, retry_count, delay: Duration::ZERO };
            }
            Ok(response) => is_retryable_status(response.status),
            Err(error) => is_retryable_error(error.class),
        };
        if !retryable {
            return Decision { outcome: Outcome::Dead, retry_count, delay: Duration::ZERO };
        }
        let retry_after = match result {
            Ok(response) => response.retry_after.as_deref().and_then(|value| parse_retry_after(value, now)),
            Err(_) => None,
        };
        match retry_after {
            Some(wait) if retry_count < max_retries => {
                Decision { outcome: Outcome::Retry, retry_count: retry_count + 1, delay: wait.min(self.max) }
            }
            _ => self.decide_retryable_failure(retry_count, max_retries, rng),
        }
    }

    /// A failure worth retrying: another attempt after the jittered backoff while the budget
    /// lasts, dead after.
    pub fn decide_retryable_failure(&self, retry_count: u32, max_retries: u32, rng: &mut impl Rng) -> Decision {
        if retry_count >= max_retries {
            return Decision { outcome: Outcome::Dead, retry_count, delay: Duration::ZERO };
        }
        Decision { outcome: Outcome::Retry, retry_count: retry_count + 1, delay: self.backoff(retry_count, rng) }
    }
}

/// 5xx and the 4xx that mean "try again later".
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500..=599)
}

pub fn is_retryable_error(class: ErrorClass) -> bool {
    !matches!(class, ErrorClass::Blocked | ErrorClass::InvalidUrl)
}

/// The error class recorded for an attempt: `None` on 2xx, `http_3xx`/`http_4xx`/`http_5xx`
/// for other statuses, else the transport error's class.
pub fn error_class(result: &Result<Response, DeliveryError>) -> Option<&'static str> {
    match result {
        Ok(response) => match response.status {
            200..=299 => None,
            300..=399 => Some("http_3xx"),
            400..=499 => Some("http_4xx"),
            500..=599 => Some("http_5xx"),
            _ => Some("http_other"),
        },
        Err(error) => Some(error.class.as_str()),
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3). A date in the past means
/// "now"; anything unparseable is ignored (the backoff applies).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|byte| byte.is_ascii_digit()) {
        // Absurdly long digit strings saturate instead of failing: they still mean "much later".
        return Some(Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn policy() -> RetryPolicy {
        RetryPolicy { base: Duration::from_secs(5), max: Duration::from_secs(3600) }
    }

    fn response(status: u16, retry_after: Option<&str>) -> Result<Response, DeliveryError> {
        Ok(Response { status, retry_after: retry_after.map(str::to_owned), body_excerpt: String::new() })
    }

    fn error(class: ErrorClass) -> Result<Response, DeliveryError> {
        Err(DeliveryError { class, message: "x".into() })
    }

    fn decide(result: &Result<Response, DeliveryError>, retry_count: u32, max_retries: u32) -> Decision {
        policy().decide(result, retry_count, max_retries, SystemTime::now(), &mut StdRng::seed_from_u64(7))
    }

    #[test]
    fn ceiling_doubles_from_base_and_stops_at_max() {
        let p = policy();
        assert_eq!(p.ceiling(0), Duration::from_secs(5));
        assert_eq!(p.ceiling(1), Duration::from_secs(10));
        assert_eq!(p.ceiling(3), Duration::from_secs(40));
        assert_eq!(p.ceiling(10), Duration::from_secs(3600));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(3600));
    }

    #[test]
    fn every_2xx_is_delivered() {
        for status in [200, 201, 202, 204, 299] {
            let decision = decide(&response(status, None), 2, 3);
            assert_eq!(decision, Decision { outcome: Outcome::Delivered, retry_count: 2, delay: Duration::ZERO });
        }
    }

    #[test]
    fn retryable_statuses_retry_until_the_budget_is_spent() {
        for status in [408, 425, 429, 500, 502, 503, 504, 599] {
            let first = decide(&response(status, None), 0, 3);
            assert_eq!(first.outcome, Outcome::Retry, "status {status}");
            assert_eq!(first.retry_count, 1);
            assert!(first.delay <= Duration::from_secs(5));
            let last = decide(&response(status, None), 3, 3);
            assert_eq!(last.outcome, Outcome::Dead, "status {status} after the last retry");
            assert_eq!(last.retry_count, 3);
        }
    }

    #[test]
    fn other_4xx_and_3xx_are_dead_at_once() {
        for status in [301, 302, 307, 400, 401, 403, 404, 410, 422] {
            let decision = decide(&response(status, None), 0, 3);
            assert_eq!(decision.outcome, Outcome::Dead, "status {status}");
            assert_eq!(decision.retry_count, 0);
        }
    }

    #[test]
    fn zero_max_retries_means_one_attempt() {
        assert_eq!(decide(&response(503, None), 0, 0).outcome, Outcome::Dead);
    }

    #[test]
    fn transport_errors_retry_except_blocked_and_invalid_url() {
        for class in [ErrorClass::Timeout, ErrorClass::Connect, ErrorClass::Tls, ErrorClass::Dns, ErrorClass::Protocol]
        {
            assert_eq!(decide(&error(class), 0, 3).outcome, Outcome::Retry, "{class:?}");
        }
        for class in [ErrorClass::Blocked, ErrorClass::InvalidUrl] {
            assert_eq!(decide(&error(class), 0, 3).outcome, Outcome::Dead, "{class:?}");
        }
    }

    #[test]
    fn retry_after_seconds_replaces_the_backoff_up_to_the_cap() {
        assert_eq!(decide(&response(429, Some("7")), 0, 3).delay, Duration::from_secs(7));
        assert_eq!(decide(&response(503, Some("99999")), 0, 3).delay, Duration::from_secs(3600));
        // Unparseable: the jittered backoff applies.
        assert!(decide(&response(429, Some("soon")), 0, 3).delay <= Duration::from_secs(5));
    }

    #[test]
    fn retry_after_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::from_secs(u64::MAX)));
    }

    #[test]
    fn error_classes() {
        assert_eq!(error_class(&response(204, None)), None);
        assert_eq!(error_class(&response(302, None)), Some("http_3xx"));
        assert_eq!(error_class(&response(404, None)), Some("http_4xx"));
        assert_eq!(error_class(&response(503, None)), Some("http_5xx"));
        assert_eq!(error_class(&error(ErrorClass::Blocked)), Some("blocked"));
    }

    proptest! {
        #[test]
        fn backoff_stays_within_the_ceiling(retry in 0u32..64, seed in any::<u64>(),
                                            base_ms in 1u64..10_000, max_s in 1u64..7_200) {
            let p = RetryPolicy { base: Duration::from_millis(base_ms), max: Duration::from_secs(max_s) };
            let delay = p.backoff(retry, &mut StdRng::seed_from_u64(seed));
            prop_assert!(delay <= p.ceiling(retry));
            prop_assert!(p.ceiling(retry) <= p.max);
        }

        #[test]
        fn retry_after_never_panics(value in ".{0,64}") {
            let _ = parse_retry_after(&value, SystemTime::now());
        }
    }

    #[test]
    fn full_jitter_spreads_delays() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..200).map(|_| p.backoff(2, &mut rng)).collect();
        let low = delays.iter().filter(|d| **d < Duration::from_secs(10)).count();
        let high = delays.len() - low;
        // Uniform over [0, 20 s]: both halves get a fair share.
        assert!(low > 60 && high > 60, "low {low} high {high}");
    }
}
