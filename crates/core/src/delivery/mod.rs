//! The HTTP delivery client: one POST per attempt, with the limits spec §3 and §11 ask for.
//!
//! One [`DeliveryClient`] is shared by every task of a worker so that keep-alive connections
//! (HTTP/1.1, or HTTP/2 when the receiver offers it over ALPN) are pooled per receiver. An
//! attempt is bounded everywhere a receiver could hold us: the connect timeout (around lookup,
//! TCP connect and TLS handshake together), one total timeout around connect + send + response,
//! and a cap on how much response body is read. What outlives an attempt is bounded too: idle
//! connections per receiver, and getaddrinfo calls still running (`lookup`). Redirects are
//! never followed (the legacy hyper client does not follow them; a 3xx is returned as is).
//!
//! SSRF (ECOSYSTEM §2.3): a URL is parsed and its scheme checked, a literal IP host is checked
//! against the [`AddressPolicy`] here, and a hostname goes through `GuardedResolver`, which
//! hands the connector only the addresses the policy allows. The connector dials exactly those,
//! so there is no second lookup an attacker's DNS could answer differently.

pub mod guard;
mod lookup;

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use url::{Host, Url};

use self::guard::{AddressPolicy, RefusedRanges};
use self::lookup::{LookupError, LookupLimiter};

/// Longest webhook URL accepted (spec §11: limits on every input), in bytes, both as typed and
/// once normalised.
pub const MAX_URL_LENGTH: usize = 2048;

/// Longest hostname DNS can carry (RFC 1035: 255 octets on the wire, 253 as text without the
/// trailing dot). A longer one can never resolve, so it is refused when the webhook is created
/// rather than dead at its first attempt.
pub const MAX_HOST_LENGTH: usize = 253;

/// How much of a response body is kept for the attempt log.
pub const BODY_EXCERPT_LIMIT: usize = 1024;

/// Idle pooled connections are closed after this long; receivers usually drop theirs sooner.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Idle connections kept per receiver (scheme, host, port). A burst to one receiver opens as
/// many connections as there are attempts in flight (up to `HOOKFLEET_MAX_IN_FLIGHT`, 64 by
/// default, all to one host in the worst case); unbounded, every one of them would then sit
/// idle for [`POOL_IDLE_TIMEOUT`], a file descriptor and a TLS session each. 32 keeps steady
/// traffic to a busy receiver on warm connections (HTTP/2 needs only one) and lets a burst's
/// surplus close as soon as it is done.
const POOL_MAX_IDLE_PER_HOST: usize = 32;

/// getaddrinfo calls running at once. Only a new connection needs a lookup (a pooled one does
/// not) and a healthy resolver answers in milliseconds, so 16 at a time serve far more new
/// connections per second than a worker opens; what the bound is for is a stalled nameserver,
/// where each lookup pins a blocking-pool thread until the system resolver gives up
/// (`lookup` explains).
const MAX_CONCURRENT_LOOKUPS: usize = 16;

/// The HTTP/2 flow-control window per stream can be no smaller than the protocol's initial
/// 65,535 bytes and no larger than 2^31 - 1.
const HTTP2_MIN_WINDOW: u32 = 65_535;
const HTTP2_MAX_WINDOW: u32 = (1 << 31) - 1;

/// hyper's default connection window (5 MiB); raised only if one stream's window is larger, so
/// that a single capped body is never held back by the connection's window.
const HTTP2_CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// How the delivery client is built; filled from configuration by the worker.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `HOOKFLEET_ALLOW_HTTP`: http:// URLs allowed (else https only).
    pub allow_http: bool,
    /// `HOOKFLEET_ALLOWED_CIDRS`: special-purpose ranges that may be reached anyway.
    pub allowed_cidrs: Vec<ipnet::IpNet>,
    pub connect_timeout: Duration,
    /// Bytes of response body read at most; the rest is never read.
    pub response_body_cap: usize,
    /// `hookfleet/<version>`.
    pub user_agent: String,
    /// Trust anchors added to the public webpki roots (tests, private CAs).
    pub extra_root_certificates: Vec<CertificateDer<'static>>,
}

/// Why a [`DeliveryClient`] could not be built; all are configuration mistakes.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("extra root certificate #{index} is not a usable trust anchor: {source}")]
    RootCertificate {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("user agent {0:?} is not a valid HTTP header value")]
    UserAgent(String),
}

/// One attempt's input.
pub struct DeliveryRequest {
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Bound on the whole attempt: DNS, connect, TLS, send, response head and capped body.
    pub timeout: Duration,
}

/// What one attempt produced and how long it took.
#[derive(Debug)]
pub struct AttemptOutcome {
    pub duration: Duration,
    pub result: Result<Response, DeliveryError>,
}

/// A receiver's answer. Any status is a `Response`, including 3xx and 5xx: judging it is the
/// retry policy's job, not the client's.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The raw `Retry-After` header value, parsed by the retry policy.
    pub retry_after: Option<String>,
    /// The first [`BODY_EXCERPT_LIMIT`] bytes or fewer of the body, lossy UTF-8.
    pub body_excerpt: String,
}

/// An attempt that got no usable response. `message` names at most `scheme://host:port`:
/// query strings and userinfo can carry secrets and must never reach a log or a row.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{class}: {message}")]
pub struct DeliveryError {
    pub class: ErrorClass,
    pub message: String,
}

impl DeliveryError {
    fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self { class, message: message.into() }
    }
}

/// The failure classes stored with attempts and used as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The attempt's total timeout fired.
    Timeout,
    /// Refused, reset or timed-out connection.
    Connect,
    Tls,
    /// Lookup failed or returned nothing.
    Dns,
    /// The address guard refused every address.
    Blocked,
    InvalidUrl,
    /// The receiver spoke something that is not HTTP, or closed mid-response.
    Protocol,
}

impl ErrorClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::Tls => "tls",
            Self::Dns => "dns",
            Self::Blocked => "blocked",
            Self::InvalidUrl => "invalid_url",
            Self::Protocol => "protocol",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

type Connector = BoundedConnector<HttpsConnector<HttpConnector<GuardedResolver>>>;

/// The shared HTTP client. Cloning is cheap and shares the connection pool.
#[derive(Clone)]
pub struct DeliveryClient {
    client: Client<Connector, Full<Bytes>>,
    policy: Arc<AddressPolicy>,
    allow_http: bool,
    response_body_cap: usize,
    user_agent: HeaderValue,
}

impl std::fmt::Debug for DeliveryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryClient")
            .field("policy", &self.policy)
            .field("allow_http", &self.allow_http)
            .field("response_body_cap", &self.response_body_cap)
            .finish_non_exhaustive()
    }
}

impl DeliveryClient {
    /// Builds the client. TLS uses rustls with the ring provider handed in explicitly, so no
    /// process-wide default provider has to be installed first.
    ///
    /// Trust: the webpki (Mozilla) roots plus `extra_root_certificates`.
    pub fn new(options: ClientOptions) -> Result<Self, ClientBuildError> {
        let user_agent = HeaderValue::from_str(&options.user_agent)
            .map_err(|_| ClientBuildError::UserAgent(options.user_agent.clone()))?;
        let tls = tls_config(&options.extra_root_certificates)?;
        let policy = Arc::new(AddressPolicy::new(options.allowed_cidrs));

        // The same limit as the connector's below, which covers the lookup too; this one keeps
        // the resolver bounded on its own, waiting for a free slot included.
        let lookups = Arc::new(LookupLimiter::new(MAX_CONCURRENT_LOOKUPS, options.connect_timeout));
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { policy: Arc::clone(&policy), lookups });
        // The https connector wraps this one, so it must accept https:// URIs too.
        http.enforce_http(false);
        http.set_connect_timeout(Some(options.connect_timeout));
        http.set_nodelay(true);

        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let connector = BoundedConnector { inner: https, timeout: options.connect_timeout };

        // A body is read up to the cap and no further, so a window the size of the cap lets the
        // receiver send all of it without waiting for window updates, and no more than it.
        let stream_window = u32::try_from(options.response_body_cap)
            .unwrap_or(HTTP2_MAX_WINDOW)
            .clamp(HTTP2_MIN_WINDOW, HTTP2_MAX_WINDOW);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .http2_initial_stream_window_size(stream_window)
            .http2_initial_connection_window_size(stream_window.max(HTTP2_CONNECTION_WINDOW))
            .build(connector);

        Ok(Self {
            client,
            policy,
            allow_http: options.allow_http,
            response_body_cap: options.response_body_cap,
            user_agent,
        })
    }

    /// Validates a webhook URL before it is stored or used: parse, scheme (https, or http when
    /// allowed), has a host of at most 253 bytes, no userinfo credentials, length <= 2048 as
    /// typed and once normalised, and a literal-IP host checked by the policy. Hostnames are
    /// checked when they are resolved, at send time, because what they resolve to can change.
    ///
    /// The answer is the normalised URL: the form that is stored and checked again before every
    /// attempt, so whatever passes here passes there.
    pub fn check_url(&self, url: &str) -> Result<Url, DeliveryError> {
        let invalid = |message: String| DeliveryError::new(ErrorClass::InvalidUrl, message);
        // Bounds the parser's work; the limit that decides is the one on the normalised form.
        if url.len() > MAX_URL_LENGTH {
            return Err(invalid(format!("URL is {} bytes long; the limit is {MAX_URL_LENGTH}", url.len())));
        }
        let parsed = Url::parse(url).map_err(|e| invalid(format!("not a valid URL: {e}")))?;
        // Percent-encoding can make a URL three times longer than typed (each non-ASCII byte
        // becomes %XX), and the long form is the one stored and re-checked at send time: a
        // check of the typed form alone would admit a webhook that can never be sent.
        let normalised = parsed.as_str().len();
        if normalised > MAX_URL_LENGTH {
            return Err(invalid(format!(
                "URL is {normalised} bytes long once normalised (percent-encoded); the limit is {MAX_URL_LENGTH}"
            )));
        }
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            // Refused by policy like a refused address (SPEC §11), not malformed: `blocked`.
            "http" => {
                return Err(DeliveryError::new(
                    ErrorClass::Blocked,
                    "http:// URLs are refused; use https:// (HOOKFLEET_ALLOW_HTTP=true allows \
                     http for development)",
                ))
            }
            other => return Err(invalid(format!("scheme {other:?} is not supported; use https://"))),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid("URL must not contain credentials (user:password@); send them in a header".to_owned()));
        }
        let literal = match parsed.host() {
            None => return Err(invalid("URL has no host".to_owned())),
            Some(Host::Domain(domain)) => {
                let length = domain.strip_suffix('.').unwrap_or(domain).len();
                if length > MAX_HOST_LENGTH {
                    return Err(invalid(format!(
                        "host is {length} bytes long; DNS names are at most {MAX_HOST_LENGTH}"
                    )));
                }
                None
            }
            Some(Host::Ipv4(ip)) => Some(ip.into()),
            Some(Host::Ipv6(ip)) => Some(ip.into()),
        };
        // HttpConnector does not call the resolver for a literal IP, so this is the only check
        // such a URL gets.
        if let Some(ip) = literal {
            self.policy.check(ip).map_err(|blocked| {
                DeliveryError::new(ErrorClass::Blocked, format!("{}: {blocked}", target_of(&parsed)))
            })?;
        }
        Ok(parsed)
    }

    /// One attempt: POST body with headers to url, within `timeout` for the whole attempt
    /// (connect, send, response head and capped body read). Never follows redirects.
    pub async fn send(&self, request: DeliveryRequest) -> AttemptOutcome {
        let started = Instant::now();
        let result = self.attempt(request).await;
        AttemptOutcome { duration: started.elapsed(), result }
    }

    async fn attempt(&self, request: DeliveryRequest) -> Result<Response, DeliveryError> {
        let DeliveryRequest { url, headers, body, timeout } = request;
        let mut url = self.check_url(&url)?;
        // Fragments are client-side only and never sent.
        url.set_fragment(None);
        let target = target_of(&url);
        let uri: http::Uri = url.as_str().parse().map_err(|e| {
            DeliveryError::new(ErrorClass::InvalidUrl, format!("{target}: not a valid request URI: {e}"))
        })?;

        let mut http_request = http::Request::new(Full::new(body));
        *http_request.method_mut() = Method::POST;
        *http_request.uri_mut() = uri;
        *http_request.headers_mut() = headers;
        let request_headers = http_request.headers_mut();
        if !request_headers.contains_key(CONTENT_TYPE) {
            request_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        request_headers.insert(USER_AGENT, self.user_agent.clone());

        let exchange = async {
            let response = self.client.request(http_request).await.map_err(|e| request_error(&e, &target))?;
            let status = response.status().as_u16();
            let retry_after =
                response.headers().get(RETRY_AFTER).map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
            let body = read_capped(response.into_body(), self.response_body_cap).await.map_err(|e| {
                DeliveryError::new(
                    ErrorClass::Protocol,
                    format!("{target}: response body failed after status {status}: {}", chain_message(&*e)),
                )
            })?;
            if body.read >= self.response_body_cap {
                tracing::debug!(
                    target = %target,
                    status,
                    cap = self.response_body_cap,
                    "response body reached the cap; the rest is not read"
                );
            }
            Ok(Response { status, retry_after, body_excerpt: excerpt(&body.excerpt) })
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(DeliveryError::new(
                ErrorClass::Timeout,
                format!("{target}: no complete response within {timeout:?}"),
            )),
        };
        result.map_err(|e| redact(e, &url))
    }
}

/// Bounds everything a connector does for one connection — lookup, TCP connect and TLS
/// handshake — by the connect timeout.
///
/// HttpConnector's own timeout covers the TCP connect only, so a receiver that accepts and then
/// never answers the ClientHello held an attempt until its total timeout. Worse, when a request
/// is served by a pooled connection that freed up while a new one was still being made,
/// hyper-util lets the losing connect finish in the background, outside any attempt's timeout:
/// without this bound, such a handshake could hold its socket forever.
#[derive(Clone, Debug)]
struct BoundedConnector<C> {
    inner: C,
    timeout: Duration,
}

/// The connector ran out of time; hyper reports it as a connect error.
#[derive(Debug, thiserror::Error)]
#[error("no connection within {0:?} (DNS lookup, TCP connect and TLS handshake; HOOKFLEET_CONNECT_TIMEOUT)")]
struct ConnectTimeout(Duration);

type BoxError = Box<dyn StdError + Send + Sync>;

impl<C> tower_service::Service<http::Uri> for BoundedConnector<C>
where
    C: tower_service::Service<http::Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            // Dropping `connecting` on timeout closes the half-made connection.
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(ConnectTimeout(timeout)) as BoxError),
            }
        })
    }
}

/// rustls with ring, TLS 1.2 and 1.3; ALPN is filled in by hyper-rustls (h2, http/1.1).
fn tls_config(extra_roots: &[CertificateDer<'static>]) -> Result<rustls::ClientConfig, ClientBuildError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for (index, certificate) in extra_roots.iter().enumerate() {
        roots.add(certificate.clone()).map_err(|source| ClientBuildError::RootCertificate { index, source })?;
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// The only part of a URL that may appear in messages: query and userinfo can hold secrets.
fn target_of(url: &Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port_or_known_default() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

/// Defence in depth: error texts come from several libraries, so strip the query string if
/// one of them ever echoes the URL back.
fn redact(mut error: DeliveryError, url: &Url) -> DeliveryError {
    if let Some(query) = url.query().filter(|q| !q.is_empty()) {
        if error.message.contains(query) {
            error.message = error.message.replace(query, "[redacted]");
        }
    }
    error
}

/// Sorts a failed request into a class by what is in its error chain, most specific first: a
/// refusal by our resolver, then TLS, then anything during connect.
fn request_error(error: &hyper_util::client::legacy::Error, target: &str) -> DeliveryError {
    let class = if let Some(resolve) = find_cause::<ResolveError>(error) {
        match resolve {
            ResolveError::Blocked { .. } => ErrorClass::Blocked,
            ResolveError::Lookup { .. } | ResolveError::NoAddresses { .. } => ErrorClass::Dns,
        }
    } else if find_cause::<rustls::Error>(error).is_some() {
        ErrorClass::Tls
    } else if error.is_connect() || is_connection_failure(error) {
        ErrorClass::Connect
    } else {
        ErrorClass::Protocol
    };
    // The client's own text ("client error (Connect)") only repeats the class; start below it.
    let detail = match error.source() {
        Some(cause) => chain_message(cause),
        None => chain_message(error),
    };
    DeliveryError::new(class, format!("{target}: {detail}"))
}

/// A pooled connection the receiver reset before answering is a connection problem, not the
/// receiver speaking bad HTTP.
fn is_connection_failure(error: &(dyn StdError + 'static)) -> bool {
    find_cause::<io::Error>(error).is_some_and(|io| {
        matches!(
            io.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::NotConnected
        )
    })
}

/// Finds a `T` anywhere in an error chain. `io::Error::source` skips the error it wraps (it
/// returns that error's source), so wrapped io errors are opened with `get_ref` as well.
fn find_cause<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = current.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(found) = find_cause::<T>(inner) {
                return Some(found);
            }
        }
        next = current.source();
    }
    None
}

/// "outer: inner: innermost", skipping repeats (wrappers often repeat their cause's text).
fn chain_message(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(current) = next {
        let text = current.to_string();
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        next = current.source();
    }
    parts.join(": ")
}

/// What was read of a response body.
struct CappedBody {
    /// At most [`BODY_EXCERPT_LIMIT`] bytes.
    excerpt: Vec<u8>,
    /// Bytes consumed, never more than the cap.
    read: usize,
}

/// Reads at most `cap` bytes and keeps the first [`BODY_EXCERPT_LIMIT`]. Reading past the
/// excerpt (up to the cap) lets a normal-sized body finish so its connection can be pooled
/// again; a body over the cap is dropped unread, which closes its connection.
async fn read_capped<B>(body: B, cap: usize) -> Result<CappedBody, Box<dyn StdError + Send + Sync + 'static>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync + 'static>>,
{
    let mut body = std::pin::pin!(body);
    let mut excerpt = Vec::new();
    let mut read = 0usize;
    while read < cap {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(Into::into)?;
        // Trailers are not part of the body.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let take = data.len().min(cap - read);
        let keep = take.min(BODY_EXCERPT_LIMIT.saturating_sub(excerpt.len()));
        excerpt.extend_from_slice(&data[..keep]);
        read += take;
    }
    Ok(CappedBody { excerpt, read })
}

/// Lossy UTF-8 can grow (each bad byte becomes a 3-byte U+FFFD), so cut again afterwards, on a
/// character boundary, to keep the promise of at most [`BODY_EXCERPT_LIMIT`] bytes.
fn excerpt(bytes: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.len() > BODY_EXCERPT_LIMIT {
        let mut end = BODY_EXCERPT_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Resolves hostnames with getaddrinfo (`/etc/hosts`, compose service names), through the
/// shared [`LookupLimiter`], and returns only the addresses the policy allows; the connector
/// dials exactly what it gets back.
#[derive(Clone, Debug)]
struct GuardedResolver {
    policy: Arc<AddressPolicy>,
    lookups: Arc<LookupLimiter>,
}

/// Why a hostname gave nothing to dial. Found again by [`request_error`] in the error chain.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("could not resolve {host}")]
    Lookup {
        host: String,
        #[source]
        source: LookupError,
    },
    #[error("{host} resolved to no addresses")]
    NoAddresses { host: String },
    /// Ranges and counts only: this text reaches the registrant (see [`guard::BlockedAddress`]).
    #[error("{host} resolves only to addresses in refused ranges: {refused}")]
    Blocked { host: String, refused: RefusedRanges },
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = Arc::clone(&self.policy);
        let lookups = Arc::clone(&self.lookups);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // Port 0: HttpConnector puts the URL's port on every address it gets back.
            let resolved = match lookups.lookup(&host).await {
                Ok(addresses) => addresses,
                Err(source) => return Err(ResolveError::Lookup { host, source }),
            };
            if resolved.is_empty() {
                return Err(ResolveError::NoAddresses { host });
            }
            let mut allowed = Vec::with_capacity(resolved.len());
            let mut refused = RefusedRanges::default();
            for address in resolved {
                match policy.check(address.ip()) {
                    Ok(()) => allowed.push(address),
                    Err(blocked) => refused.add(blocked),
                }
            }
            if !refused.is_empty() {
                tracing::debug!(
                    host = %host,
                    refused = %refused,
                    allowed = allowed.len(),
                    "address guard dropped resolved addresses"
                );
            }
            if allowed.is_empty() {
                // `resolved` was not empty, so every address was refused.
                return Err(ResolveError::Blocked { host, refused });
            }
            Ok(allowed.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    //! Every connection here goes to 127.0.0.1 (or `localhost`, which /etc/hosts maps to it):
    //! receivers are started by the tests themselves. Refusals of other addresses are shown
    //! with `check_url` and the resolver, which never dial.

    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::{StatusCode, Version};
    use hyper::body::{Frame, Incoming};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    const SHORT: Duration = Duration::from_secs(5);

    fn options(loopback_allowed: bool) -> ClientOptions {
        let allowed_cidrs = if loopback_allowed {
            vec!["127.0.0.0/8".parse().expect("cidr"), "::1/128".parse().expect("cidr")]
        } else {
            Vec::new()
        };
        ClientOptions {
            allow_http: true,
            allowed_cidrs,
            connect_timeout: Duration::from_secs(2),
            response_body_cap: 64 * 1024,
            user_agent: "hookfleet/test".to_owned(),
            extra_root_certificates: Vec::new(),
        }
    }

    fn client(options: ClientOptions) -> DeliveryClient {
        DeliveryClient::new(options).expect("client builds")
    }

    fn post(url: impl Into<String>, timeout: Duration) -> DeliveryRequest {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_static("msg_1"));
        DeliveryRequest { url: url.into(), headers, body: Bytes::from_static(br#"{"type":"ping"}"#), timeout }
    }

    fn class_of(outcome: &AttemptOutcome) -> Option<ErrorClass> {
        outcome.result.as_ref().err().map(|e| e.class)
    }

    /// What a test receiver saw.
    #[derive(Debug)]
    struct Received {
        method: Method,
        version: Version,
        path_and_query: String,
        headers: HeaderMap,
        body: Bytes,
    }

    struct Receiver {
        address: SocketAddr,
        requests: mpsc::UnboundedReceiver<Received>,
        connections: Arc<AtomicUsize>,
    }

    impl Receiver {
        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.address)
        }

        async fn next_request(&mut self) -> Received {
            tokio::time::timeout(SHORT, self.requests.recv())
                .await
                .expect("a request arrives in time")
                .expect("receiver still running")
        }
    }

    type Respond = fn() -> http::Response<Full<Bytes>>;

    async fn handle(
        request: http::Request<Incoming>,
        seen: mpsc::UnboundedSender<Received>,
        respond: Respond,
    ) -> Result<http::Response<Full<Bytes>>, Infallible> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map(|collected| collected.to_bytes()).unwrap_or_default();
        let _ = seen.send(Received {
            method: parts.method,
            version: parts.version,
            path_and_query: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            headers: parts.headers,
            body,
        });
        Ok(respond())
    }

    /// An HTTP/1.1 receiver on 127.0.0.1:0, or HTTPS (h2 or http/1.1 by ALPN) when given a TLS
    /// acceptor.
    async fn start_receiver(respond: Respond, tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let (seen, requests) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| handle(request, seen.clone(), respond));
                    match tls {
                        None => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let io = TokioIo::new(stream);
                            if h2 {
                                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                    .serve_connection(io, service)
                                    .await;
                            } else {
                                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                            }
                        }
                    }
                });
            }
        });
        Receiver { address, requests, connections }
    }

    fn ok() -> http::Response<Full<Bytes>> {
        http::Response::new(Full::new(Bytes::from_static(b"thanks")))
    }

    /// A raw TCP receiver: reads the request head, writes `reply` (if any), half-closes when
    /// asked, and otherwise just holds the connection.
    async fn start_raw_receiver(reply: Option<&'static [u8]>, half_close: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(raw_connection(stream, reply, half_close));
            }
        });
        address
    }

    async fn raw_connection(mut stream: TcpStream, reply: Option<&'static [u8]>, half_close: bool) {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
        if let Some(reply) = reply {
            let _ = stream.write_all(reply).await;
        }
        if half_close {
            let _ = stream.shutdown().await;
        }
        // Keep the connection open (and drain it) until the client gives up: closing with
        // unread bytes would reset the connection and hide what the client made of the reply.
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    #[test]
    fn error_classes_have_stable_names() {
        let names: Vec<&str> = [
            ErrorClass::Timeout,
            ErrorClass::Connect,
            ErrorClass::Tls,
            ErrorClass::Dns,
            ErrorClass::Blocked,
            ErrorClass::InvalidUrl,
            ErrorClass::Protocol,
        ]
        .iter()
        .map(ErrorClass::as_str)
        .collect();
        assert_eq!(names, ["timeout", "connect", "tls", "dns", "blocked", "invalid_url", "protocol"]);
        let error = DeliveryError::new(ErrorClass::InvalidUrl, "no host");
        assert_eq!(error.to_string(), "invalid_url: no host");
    }

    #[test]
    fn invalid_user_agent_is_a_build_error() {
        let mut options = options(false);
        options.user_agent = "hookfleet/\n1".to_owned();
        assert!(matches!(DeliveryClient::new(options), Err(ClientBuildError::UserAgent(_))));
    }

    #[tokio::test]
    async fn check_url_refuses_bad_urls_by_default() {
        let client = client(ClientOptions { allow_http: false, ..options(false) });
        let class = |url: &str| client.check_url(url).err().map(|e| e.class);

        assert!(client.check_url("https://example.com/hooks?x=1").is_ok());
        assert!(client.check_url("https://8.8.8.8/hook").is_ok());
        assert!(client.check_url("https://[2606:4700::1111]/hook").is_ok());

        assert_eq!(class("http://example.com/hook"), Some(ErrorClass::Blocked));
        assert_eq!(class("ftp://example.com/hook"), Some(ErrorClass::InvalidUrl));
        assert_eq!(class("not a url"), Some(ErrorClass::InvalidUrl));
        assert_eq!(class("https://"), Some(ErrorClass::InvalidUrl));
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LENGTH));
        assert_eq!(class(&long), Some(ErrorClass::InvalidUrl));

        let credentials = client.check_url("https://user:hunter2@example.com/hook").expect_err("userinfo refused");
        assert_eq!(credentials.class, ErrorClass::InvalidUrl);
        assert!(!credentials.to_string().contains("hunter2"));
        assert_eq!(class("https://token@example.com/hook"), Some(ErrorClass::InvalidUrl));

        for literal in [
            "https://127.0.0.1/hook",
            "https://10.0.0.1/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://[fd00::1]/hook",
            // The URL parser normalises these spellings to 127.0.0.1 before we see the host.
            "https://2130706433/hook",
            "https://0x7f.1/hook",
        ] {
            assert_eq!(class(literal), Some(ErrorClass::Blocked), "{literal}");
        }
        let blocked = client.check_url("https://10.0.0.1:8443/hook?token=s3cret").expect_err("private address refused");
        // Names the range, never the address: the same words whether the address was typed or
        // resolved (a resolved one would map internal DNS for the registrant).
        assert_eq!(blocked.message, "https://10.0.0.1:8443: address in a refused range (private, RFC 1918)");
    }

    #[tokio::test]
    async fn the_length_limit_applies_to_the_normalised_url() {
        let client = client(ClientOptions { allow_http: false, ..options(false) });
        // 1,420 bytes as typed; percent-encoding makes each 2-byte "é" 6 bytes (4,220 in all).
        let grows = format!("https://example.com/{}", "é".repeat(700));
        assert!(grows.len() < MAX_URL_LENGTH);
        let error = client.check_url(&grows).expect_err("normalised form is over the limit");
        assert_eq!(error.class, ErrorClass::InvalidUrl);
        assert!(error.message.contains("normalised") && error.message.contains("2048"), "{error}");

        // What is admitted is what gets stored and checked again at send time: it must pass again.
        let fits = format!("https://example.com/{}", "é".repeat((MAX_URL_LENGTH - 20) / 6));
        let admitted = client.check_url(&fits).expect("fits once normalised");
        assert!(admitted.as_str().len() <= MAX_URL_LENGTH);
        assert_eq!(client.check_url(admitted.as_str()).expect("admitted again"), admitted);
    }

    #[tokio::test]
    async fn a_host_longer_than_dns_allows_is_refused() {
        let client = client(ClientOptions { allow_http: false, ..options(false) });
        let label = "a".repeat(63);
        // 4 labels of 63 and 3 dots: 255 bytes, over DNS's 253.
        let long = format!("https://{label}.{label}.{label}.{label}/hook");
        let error = client.check_url(&long).expect_err("no resolver answers for this name");
        assert_eq!(error.class, ErrorClass::InvalidUrl);
        assert!(error.message.contains("253"), "{error}");
        let longest = format!("https://{label}.{label}.{label}.{}/hook", "a".repeat(61));
        assert!(client.check_url(&longest).is_ok());
        assert!(client.check_url(&format!("https://{label}.{label}.{label}.{}./hook", "a".repeat(61))).is_ok());
    }

    #[tokio::test]
    async fn check_url_follows_allow_http_and_allowed_cidrs() {
        let loopback = client(options(true));
        assert!(loopback.check_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(loopback.check_url("http://[::1]:8080/hook").is_ok());
        assert!(loopback.check_url("http://localhost:8080/hook").is_ok());
        assert_eq!(loopback.check_url("http://10.0.0.1/hook").err().map(|e| e.class), Some(ErrorClass::Blocked));

        let http_only = client(options(false));
        assert_eq!(http_only.check_url("http://127.0.0.1/hook").err().map(|e| e.class), Some(ErrorClass::Blocked));
        // Hostnames pass here and are judged by what they resolve to, at send time.
        assert!(http_only.check_url("http://localhost/hook").is_ok());

        let https_only = client(ClientOptions { allow_http: false, ..options(true) });
        assert_eq!(https_only.check_url("http://127.0.0.1/hook").err().map(|e| e.class), Some(ErrorClass::Blocked));
        assert!(https_only.check_url("https://127.0.0.1/hook").is_ok());
    }

    #[tokio::test]
    async fn delivers_a_post_and_returns_status_and_body() {
        let mut receiver = start_receiver(ok, None).await;
        let client = client(options(true));

        let outcome = client.send(post(receiver.url("/hook?a=1"), SHORT)).await;
        let response = outcome.result.expect("delivered");
        assert_eq!(response.status, 200);
        assert_eq!(response.body_excerpt, "thanks");
        assert_eq!(response.retry_after, None);

        let received = receiver.next_request().await;
        assert_eq!(received.method, Method::POST);
        assert_eq!(received.version, Version::HTTP_11);
        assert_eq!(received.path_and_query, "/hook?a=1");
        assert_eq!(received.body, Bytes::from_static(br#"{"type":"ping"}"#));
        assert_eq!(received.headers[CONTENT_TYPE], "application/json");
        assert_eq!(received.headers[USER_AGENT], "hookfleet/test");
        assert_eq!(received.headers["webhook-id"], "msg_1");
    }

    #[tokio::test]
    async fn callers_content_type_is_kept_and_user_agent_is_ours() {
        let mut receiver = start_receiver(ok, None).await;
        let client = client(options(true));
        let mut request = post(receiver.url("/hook"), SHORT);
        request.headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        request.headers.insert(USER_AGENT, HeaderValue::from_static("somebody-else"));

        assert!(client.send(request).await.result.is_ok());
        let received = receiver.next_request().await;
        assert_eq!(received.headers[CONTENT_TYPE], "text/plain");
        assert_eq!(received.headers[USER_AGENT], "hookfleet/test");
    }

    #[tokio::test]
    async fn retry_after_is_returned_raw() {
        fn busy() -> http::Response<Full<Bytes>> {
            let mut response = http::Response::new(Full::new(Bytes::from_static(b"slow down")));
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("120"));
            response
        }
        let receiver = start_receiver(busy, None).await;
        let outcome = client(options(true)).send(post(receiver.url("/hook"), SHORT)).await;
        let response = outcome.result.expect("a response");
        assert_eq!(response.status, 429);
        assert_eq!(response.retry_after.as_deref(), Some("120"));
    }

    #[tokio::test]
    async fn redirects_are_returned_not_followed() {
        fn redirect() -> http::Response<Full<Bytes>> {
            let mut response = http::Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::FOUND;
            response.headers_mut().insert("location", HeaderValue::from_static("/elsewhere"));
            response
        }
        let mut receiver = start_receiver(redirect, None).await;
        let outcome = client(options(true)).send(post(receiver.url("/hook"), SHORT)).await;
        assert_eq!(outcome.result.expect("a response").status, 302);
        assert_eq!(receiver.next_request().await.path_and_query, "/hook");
        assert!(receiver.requests.try_recv().is_err(), "redirect was followed");
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused() {
        let mut receiver = start_receiver(ok, None).await;
        let client = client(options(true));
        for _ in 0..3 {
            let outcome = client.send(post(receiver.url("/hook"), SHORT)).await;
            assert_eq!(outcome.result.expect("delivered").status, 200);
            receiver.next_request().await;
        }
        assert_eq!(receiver.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_silent_receiver_times_out() {
        let address = start_raw_receiver(None, false).await;
        let timeout = Duration::from_millis(300);
        let outcome = client(options(true)).send(post(format!("http://{address}/hook"), timeout)).await;
        assert_eq!(class_of(&outcome), Some(ErrorClass::Timeout));
        assert!(outcome.duration >= timeout);
        assert!(outcome.duration < SHORT, "took {:?}", outcome.duration);
    }

    /// Polls `check` every 10 ms until it holds; panics with `what` once `deadline` has passed.
    async fn eventually(deadline: Duration, what: &str, check: impl Fn() -> bool) {
        let until = Instant::now() + deadline;
        while !check() {
            assert!(Instant::now() < until, "not within {deadline:?}: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A listener on 127.0.0.1:0 that accepts and then says nothing: it reads and discards what
    /// it is sent (a ClientHello, say) until the client closes. Counts connections that closed.
    async fn start_mute_receiver() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let closed = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&closed);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    while let Ok(1..) = stream.read(&mut buffer).await {}
                    counter.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (address, closed)
    }

    #[tokio::test]
    async fn a_tls_handshake_that_never_completes_is_bounded_by_the_connect_timeout() {
        let (address, closed) = start_mute_receiver().await;
        let connect_timeout = Duration::from_millis(300);
        let client = client(ClientOptions { allow_http: false, connect_timeout, ..options(true) });
        let attempt_timeout = Duration::from_secs(20);

        let outcome = client.send(post(format!("https://{address}/hook"), attempt_timeout)).await;
        // TCP connects at once; only the handshake hangs. Bounded, it ends near 300 ms; unbounded,
        // only the attempt's 20 s would end it. 5 s leaves room for a loaded machine.
        assert!(outcome.duration < Duration::from_secs(5), "took {:?}: {outcome:?}", outcome.duration);
        let error = outcome.result.expect_err("no handshake, no response");
        assert_eq!(error.class, ErrorClass::Connect, "{error}");
        assert!(error.message.contains("300ms"), "{error}");
        // The half-open TLS connection is dropped, not left to finish in the background.
        eventually(SHORT, "the client closes the stalled connection", || closed.load(Ordering::SeqCst) == 1).await;
    }

    #[tokio::test]
    async fn idle_connections_per_host_are_capped() {
        // One more than the cap in flight at once: each response waits until all have arrived,
        // so HTTP/1.1 needs that many connections, and all of them then go idle together.
        const IN_FLIGHT: usize = POOL_MAX_IDLE_PER_HOST + 2;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let all_arrived = Arc::new(tokio::sync::Barrier::new(IN_FLIGHT));
        let requests = Arc::new(AtomicUsize::new(0));
        let (accepted_by_server, closed_by_client) = (Arc::clone(&accepted), Arc::clone(&closed));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted_by_server.fetch_add(1, Ordering::SeqCst);
                let closed = Arc::clone(&closed_by_client);
                let (all_arrived, requests) = (Arc::clone(&all_arrived), Arc::clone(&requests));
                tokio::spawn(async move {
                    let service = service_fn(move |_request: http::Request<Incoming>| {
                        let all_arrived = Arc::clone(&all_arrived);
                        // Only the first burst waits; later requests are answered at once.
                        let in_burst = requests.fetch_add(1, Ordering::SeqCst) < IN_FLIGHT;
                        async move {
                            if in_burst {
                                all_arrived.wait().await;
                            }
                            Ok::<_, Infallible>(ok())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });

        let client = client(options(true));
        let url = format!("http://{address}/hook");
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT {
            let (client, request) = (client.clone(), post(url.as_str(), SHORT));
            attempts.spawn(async move { client.send(request).await });
        }
        while let Some(outcome) = attempts.join_next().await {
            assert_eq!(outcome.expect("attempt task").result.expect("delivered").status, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), IN_FLIGHT);
        // The pool keeps the cap and closes the rest; unbounded, it would keep all of them.
        eventually(SHORT, "connections over the idle cap are closed", || {
            closed.load(Ordering::SeqCst) == IN_FLIGHT - POOL_MAX_IDLE_PER_HOST
        })
        .await;
        // The ones kept are live and reused: no new connection for the next request.
        assert_eq!(client.send(post(url.as_str(), SHORT)).await.result.expect("delivered").status, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), IN_FLIGHT);
        assert_eq!(closed.load(Ordering::SeqCst), IN_FLIGHT - POOL_MAX_IDLE_PER_HOST);
    }

    #[tokio::test]
    async fn http2_stream_window_follows_the_response_body_cap() {
        // Reads what the client sends first on an h2 connection (preface, then SETTINGS) and
        // hands back its SETTINGS_INITIAL_WINDOW_SIZE (0x4), if it sent one.
        let (ca, acceptor) = test_pki();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let (window_tx, mut window_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else { return };
            let Ok(mut stream) = acceptor.accept(stream).await else { return };
            assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            let mut preface = [0u8; 24];
            stream.read_exact(&mut preface).await.expect("preface");
            assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            let mut header = [0u8; 9];
            stream.read_exact(&mut header).await.expect("frame header");
            assert_eq!(header[3], 0x4, "the first frame is SETTINGS");
            let length = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let mut payload = vec![0u8; length];
            stream.read_exact(&mut payload).await.expect("settings payload");
            let window = payload
                .chunks_exact(6)
                .find(|setting| setting[..2] == [0, 4])
                .map(|setting| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]));
            let _ = window_tx.send(window);
        });

        let cap = 1024 * 1024;
        let client = client(ClientOptions {
            allow_http: false,
            response_body_cap: cap,
            extra_root_certificates: vec![ca],
            ..options(true)
        });
        let sending = client.send(post(format!("https://localhost:{port}/hook"), SHORT));
        let window = tokio::select! {
            window = window_rx.recv() => window.expect("the receiver read the settings"),
            outcome = sending => panic!("the attempt ended before the settings were read: {outcome:?}"),
        };
        assert_eq!(window, Some(u32::try_from(cap).expect("small cap")));
    }

    #[tokio::test]
    async fn an_oversized_body_is_capped_not_an_error() {
        fn huge() -> http::Response<Full<Bytes>> {
            http::Response::new(Full::new(Bytes::from(vec![b'a'; 10 * 1024 * 1024])))
        }
        let receiver = start_receiver(huge, None).await;
        let outcome = client(options(true)).send(post(receiver.url("/hook"), SHORT)).await;
        let response = outcome.result.expect("status counts despite the body");
        assert_eq!(response.status, 200);
        assert_eq!(response.body_excerpt.len(), BODY_EXCERPT_LIMIT);
        assert!(response.body_excerpt.bytes().all(|b| b == b'a'));
    }

    /// A body of `frames` frames of `chunk` bytes that counts how many frames were pulled.
    struct CountingBody {
        frames: usize,
        chunk: usize,
        pulled: Arc<AtomicUsize>,
    }

    impl Body for CountingBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.frames == 0 {
                return Poll::Ready(None);
            }
            self.frames -= 1;
            self.pulled.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; self.chunk])))))
        }
    }

    #[tokio::test]
    async fn read_capped_stops_pulling_at_the_cap() {
        const CHUNK: usize = 16 * 1024;
        let pulled = Arc::new(AtomicUsize::new(0));
        let cap = 100 * 1024;
        // 10 MiB offered; the reader must stop asking once it has the cap.
        let huge = CountingBody { frames: 640, chunk: CHUNK, pulled: Arc::clone(&pulled) };
        let body = read_capped(huge, cap).await.expect("body reads");
        assert_eq!(body.read, cap);
        assert_eq!(body.excerpt.len(), BODY_EXCERPT_LIMIT);
        assert_eq!(pulled.load(Ordering::SeqCst), cap.div_ceil(CHUNK));

        let small = Full::new(Bytes::from_static(b"short"));
        let body = read_capped(small, cap).await.expect("body reads");
        assert_eq!((body.read, body.excerpt.as_slice()), (5, &b"short"[..]));
    }

    #[test]
    fn excerpt_stays_within_the_limit_after_lossy_decoding() {
        let invalid = vec![0xffu8; BODY_EXCERPT_LIMIT];
        let text = excerpt(&invalid);
        assert!(text.len() <= BODY_EXCERPT_LIMIT);
        assert!(text.chars().all(|c| c == char::REPLACEMENT_CHARACTER));
        assert_eq!(excerpt("héllo".as_bytes()), "héllo");
    }

    #[tokio::test]
    async fn a_garbage_response_is_a_protocol_error() {
        let address = start_raw_receiver(Some(b"this is not http\r\n\r\n"), false).await;
        let outcome = client(options(true)).send(post(format!("http://{address}/hook"), SHORT)).await;
        assert_eq!(class_of(&outcome), Some(ErrorClass::Protocol), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_response_cut_short_is_a_protocol_error() {
        let address =
            start_raw_receiver(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly a few bytes"), true).await;
        let outcome = client(options(true)).send(post(format!("http://{address}/hook"), SHORT)).await;
        assert_eq!(class_of(&outcome), Some(ErrorClass::Protocol), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error_without_the_query() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        drop(listener);
        let outcome = client(options(true)).send(post(format!("http://{address}/hook?token=s3cret#frag"), SHORT)).await;
        let error = outcome.result.expect_err("nothing listens");
        assert_eq!(error.class, ErrorClass::Connect, "{error}");
        assert!(error.message.starts_with(&format!("http://{address}: ")));
        assert!(!error.message.contains("s3cret"));
        assert!(!error.message.contains("/hook"));
    }

    #[tokio::test]
    async fn localhost_is_blocked_by_the_resolver_when_loopback_is_not_allowed() {
        // Port 9 (discard): if the guard let it through we would see `connect`, not `blocked`.
        let outcome = client(options(false)).send(post("http://localhost:9/hook", SHORT)).await;
        let error = outcome.result.expect_err("loopback refused");
        assert_eq!(error.class, ErrorClass::Blocked, "{error}");
        // The range and a count, not the address the name resolved to.
        assert!(error.message.contains("localhost resolves only to addresses in refused ranges: "), "{error}");
        assert!(error.message.contains("loopback, 127.0.0.0/8 (1 address"), "{error}");
        assert!(!error.message.contains("127.0.0.1"), "{error}");
    }

    #[tokio::test]
    async fn resolver_returns_only_allowed_addresses() {
        use tower_service::Service;
        let name = |host: &str| host.parse::<Name>().expect("name");

        let lookups = Arc::new(LookupLimiter::new(MAX_CONCURRENT_LOOKUPS, SHORT));
        let resolver = |allowed: Vec<ipnet::IpNet>| GuardedResolver {
            policy: Arc::new(AddressPolicy::new(allowed)),
            lookups: Arc::clone(&lookups),
        };
        let mut open = resolver(vec!["127.0.0.0/8".parse().expect("cidr")]);
        let addresses: Vec<SocketAddr> = open.call(name("localhost")).await.expect("localhost allowed").collect();
        assert!(!addresses.is_empty());
        assert!(addresses.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()));

        let mut closed = resolver(Vec::new());
        let error = closed.call(name("localhost")).await.expect_err("loopback refused");
        match error {
            ResolveError::Blocked { refused, .. } => assert!(refused.total() >= 1, "{refused}"),
            other => panic!("expected Blocked, got {other:?}"),
        }
    }

    #[test]
    fn causes_are_found_inside_io_errors() {
        let inner = ResolveError::NoAddresses { host: "example.test".to_owned() };
        let wrapped = io::Error::other(io::Error::other(inner));
        let found = find_cause::<ResolveError>(&wrapped);
        assert!(matches!(found, Some(ResolveError::NoAddresses { .. })));
        assert!(find_cause::<rustls::Error>(&wrapped).is_none());
        assert_eq!(chain_message(&wrapped), "example.test resolved to no addresses");
    }

    #[tokio::test]
    async fn loopback_delivers_when_allowed_by_literal_and_by_name() {
        let mut receiver = start_receiver(ok, None).await;
        let client = client(options(true));
        let port = receiver.address.port();
        for url in [format!("http://127.0.0.1:{port}/hook"), format!("http://localhost:{port}/hook")] {
            let outcome = client.send(post(url.as_str(), SHORT)).await;
            assert_eq!(outcome.result.expect("delivered").status, 200, "{url}");
            receiver.next_request().await;
        }
    }

    /// A throwaway CA and the server side of a leaf for `localhost` / 127.0.0.1 signed by it.
    fn test_pki() -> (CertificateDer<'static>, tokio_rustls::TlsAcceptor) {
        let tls = crate::loopback_tls::LoopbackTls::generate().expect("loopback PKI");
        (tls.ca_der.clone(), tls.acceptor())
    }

    #[tokio::test]
    async fn https_negotiates_http2_with_a_private_ca() {
        let (ca, acceptor) = test_pki();
        let mut receiver = start_receiver(ok, Some(acceptor)).await;
        let client = client(ClientOptions { allow_http: false, extra_root_certificates: vec![ca], ..options(true) });
        let port = receiver.address.port();
        for url in [format!("https://localhost:{port}/hook"), format!("https://127.0.0.1:{port}/hook")] {
            let outcome = client.send(post(url.as_str(), SHORT)).await;
            let response = outcome.result.expect("delivered over TLS");
            assert_eq!((response.status, response.body_excerpt.as_str()), (200, "thanks"));
            let received = receiver.next_request().await;
            assert_eq!(received.version, Version::HTTP_2, "{url}");
            assert_eq!(received.headers[CONTENT_TYPE], "application/json");
        }
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_a_tls_error() {
        let (_, acceptor) = test_pki();
        let receiver = start_receiver(ok, Some(acceptor)).await;
        // Public roots only: the test CA is unknown.
        let client = client(ClientOptions { allow_http: false, ..options(true) });
        let url = format!("https://localhost:{}/hook", receiver.address.port());
        let outcome = client.send(post(url, SHORT)).await;
        assert_eq!(class_of(&outcome), Some(ErrorClass::Tls), "{outcome:?}");
    }
}
