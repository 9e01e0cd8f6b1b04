//! The test harness shared by every integration test.
//!
//! - [`database`]: a fresh database per test, cloned (`CREATE DATABASE … TEMPLATE`) from a
//!   template migrated once per test binary, on one throwaway PostgreSQL per test binary started
//!   from the machine's server binaries — or on the server `HOOKFLEET_TEST_DATABASE_URL` names.
//!   Its row helpers (`count`, `delivery`, `wait_for_status`, …) share one session per database.
//! - [`Receiver`]: a loopback HTTP receiver that records every request and answers as told.
//! - [`WorkerProcess`]: a real `hookfleet-worker` process pointed at a test database.
//! - [`eventually`]: waits for a condition with a deadline, instead of sleeping.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hookfleet_core::crypto::{EncryptionKey, Keyring};
use hookfleet_core::delivery::{ClientOptions, DeliveryClient};
use hookfleet_core::pg_embedded::{EmbeddedOptions, EmbeddedPostgres};
use hookfleet_core::webhooks::{NewWebhook, WebhookStore, WebhookView};
use secrecy::SecretString;

pub use hookfleet_core::loopback_tls::{LoopbackTls, TlsListener};

const TEMPLATE: &str = "hookfleet_template";

/// One PostgreSQL server per test binary and its migrated template.
pub struct Cluster {
    /// `None` when `HOOKFLEET_TEST_DATABASE_URL` points at a server we did not start.
    embedded: Option<Mutex<EmbeddedPostgres>>,
    admin: ConnectionTarget,
    template: String,
    next: AtomicU32,
    encryption_key: String,
}

/// How to build a connection string for a database on the test server.
enum ConnectionTarget {
    Embedded { socket_dir: PathBuf, port: u16 },
    External(String),
}

impl ConnectionTarget {
    fn for_database(&self, dbname: &str) -> String {
        match self {
            ConnectionTarget::Embedded { socket_dir, port } => {
                format!("host={} port={port} user=postgres dbname={dbname}", socket_dir.display())
            }
            ConnectionTarget::External(url) => with_database(url, dbname),
        }
    }
}

/// Replaces the database of a URL or key=value connection string.
fn with_database(url: &str, dbname: &str) -> String {
    if let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) {
        let (location, query) = rest.split_once('?').map_or((rest, None), |(l, q)| (l, Some(q)));
        let authority = location.split('/').next().unwrap_or(location);
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("postgresql://{authority}/{dbname}{query}")
    } else {
        format!("{url} dbname={dbname}")
    }
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The test binary's cluster, started (and its template migrated) on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        // Initialised on a plain thread with its own runtime: the caller may be inside any test's
        // runtime, and nothing made here may depend on that runtime staying alive.
        std::thread::spawn(start_cluster).join().expect("cluster start-up panicked")
    })
}

fn start_cluster() -> Cluster {
    let pid = std::process::id();
    let (embedded, admin) = match std::env::var("HOOKFLEET_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => (None, ConnectionTarget::External(url)),
        _ => {
            let options = EmbeddedOptions {
                stop_when_process_exits: Some(pid),
                settings: vec![("max_connections".into(), "300".into())],
                ..EmbeddedOptions::default()
            };
            let server = EmbeddedPostgres::start_from_initdb_cache(options)
                .unwrap_or_else(|error| panic!("cannot start PostgreSQL: {error}"));
            let target =
                ConnectionTarget::Embedded { socket_dir: server.socket_dir().to_path_buf(), port: server.port() };
            (Some(Mutex::new(server)), target)
        }
    };
    // Unique per test binary so that binaries sharing an external server don't collide.
    let template = format!("{TEMPLATE}_{pid}");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let admin_client = connect(&admin.for_database("postgres")).await;
        // Two statements: DROP/CREATE DATABASE refuse to run inside the implicit transaction of
        // a multi-statement query.
        admin_client.batch_execute(&format!("DROP DATABASE IF EXISTS {template}")).await.expect("drop old template");
        admin_client.batch_execute(&format!("CREATE DATABASE {template}")).await.expect("create template database");
        let mut client = connect(&admin.for_database(&template)).await;
        hookfleet_core::db::migrate(&mut client, 262_144).await.expect("migrate template database");
    });
    Cluster { embedded, admin, template, next: AtomicU32::new(0), encryption_key: EncryptionKey::generate_base64() }
}

async fn connect(connection_string: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(connection_string, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| panic!("cannot connect to test PostgreSQL: {error}"));
    tokio::spawn(connection);
    client
}

/// Opens a session named `application_name`; its connection task runs on the caller's runtime.
async fn try_connect(
    connection_string: &str,
    application_name: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = connection_string.parse()?;
    config.application_name(application_name);
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

impl Cluster {
    /// The embedded server, for tests that stop, crash or restart PostgreSQL.
    pub fn embedded(&self) -> Option<&Mutex<EmbeddedPostgres>> {
        self.embedded.as_ref()
    }

    /// The base64 encryption key every test process of this binary uses.
    pub fn encryption_key(&self) -> &str {
        &self.encryption_key
    }
}

/// `(delivery_status, retry_count, last_status_code, last_error)` of one delivery.
pub type DeliveryState = (String, i32, Option<i32>, Option<String>);

/// A fresh, migrated database for one test.
///
/// Its helpers (`count`, `delivery`, `wait_for_status`, `insert_delivery`, `insert_deliveries`)
/// share one session, opened on first use and opened again when it was lost (a PostgreSQL
/// restart or crash, a terminated backend): a test polling a row every 20 ms no longer opens 50
/// connections a second. [`TestDatabase::client`] still gives a dedicated session, for
/// transactions, locks and anything that changes session state.
pub struct TestDatabase {
    pub name: String,
    /// Connection string for `DATABASE_URL`.
    pub url: String,
}

/// The `application_name` of the helpers' shared session, so that it is never mistaken for a
/// hookfleet process's session (e.g. by [`TestDatabase::freeze_backends`]).
const HELPER_APPLICATION: &str = "hookfleet-test-support";

/// One test database's shared helper session: empty until first used, or after it was lost.
type HelperSlot = Arc<tokio::sync::Mutex<Option<tokio_postgres::Client>>>;

/// The helper sessions, one per test database URL. A map rather than a field of
/// `TestDatabase` because tests build `TestDatabase { name, url }` themselves (pointing at a
/// server that is not there, say). Each entry is used only by the test owning that database
/// (names are unique per test), its `Client` only sends requests to a connection task on the
/// runtime of the call that opened it, and when that runtime has gone the client reports
/// itself closed and the next call opens a new one. The session closes when the test's runtime
/// ends (it drops the connection task); what stays in the map is a closed client per test.
/// (`TestDatabase` has no `Drop` to remove it: tests move its fields out.)
fn helper_slots() -> &'static Mutex<HashMap<String, HelperSlot>> {
    static SLOTS: OnceLock<Mutex<HashMap<String, HelperSlot>>> = OnceLock::new();
    SLOTS.get_or_init(Mutex::default)
}

fn helper_slot(url: &str) -> HelperSlot {
    helper_slots().lock().unwrap_or_else(PoisonError::into_inner).entry(url.to_owned()).or_default().clone()
}

/// A session for one helper call: the shared one, or (when another helper call of the same test
/// holds it, e.g. one blocked on a lock) a session of its own, as every call had before.
enum HelperSession {
    Shared(tokio::sync::OwnedMutexGuard<Option<tokio_postgres::Client>>),
    Own(tokio_postgres::Client),
}

impl HelperSession {
    fn client(&self) -> &tokio_postgres::Client {
        match self {
            // Set (and checked open) by `TestDatabase::helper_session` before it hands the guard out.
            HelperSession::Shared(guard) => guard.as_ref().expect("an open helper session"),
            HelperSession::Own(client) => client,
        }
    }

    /// Forgets a lost shared session, so that the next call opens a new one.
    fn discard(self) {
        if let HelperSession::Shared(mut guard) = self {
            *guard = None;
        }
    }
}

/// Whether `error` means the session (or the attempt to open one) was lost rather than that the
/// statement failed: the connection closed or broke, or the server is shutting down, restarting
/// or terminated the backend (SQLSTATE class 57P, 08 connection exceptions).
fn session_lost(error: &tokio_postgres::Error) -> bool {
    let server_gone = error.code().is_some_and(|code| code.code().starts_with("57P") || code.code().starts_with("08"));
    let broken = std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>());
    error.is_closed() || server_gone || broken
}

/// Clones the migrated template into a new database for the calling test.
pub async fn database() -> TestDatabase {
    create_database("hookfleet_test", Some(&cluster().template)).await
}

/// A new, empty database (no schema): for testing migrations themselves.
pub async fn empty_database() -> TestDatabase {
    create_database("hookfleet_empty", None).await
}

async fn create_database(prefix: &str, template: Option<&str>) -> TestDatabase {
    let cluster = cluster();
    let n = cluster.next.fetch_add(1, Ordering::SeqCst);
    let name = format!("{prefix}_{}_{n}", std::process::id());
    let template = template.map(|template| format!(" TEMPLATE {template}")).unwrap_or_default();
    let admin = connect(&cluster.admin.for_database("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}{template}"))
        .await
        .unwrap_or_else(|error| panic!("cannot create test database {name}: {error}"));
    TestDatabase { url: cluster.admin.for_database(&name), name }
}

impl TestDatabase {
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// The single bigint a query returns (counts, ids).
    pub async fn count(&self, query: &str) -> i64 {
        self.helper_query_one(query, &[], query).await.get(0)
    }

    /// A producer's plain INSERT of `body` (JSON text) for `webhook_id`; the new delivery_id.
    pub async fn insert_delivery(&self, webhook_id: i64, body: &str) -> i64 {
        let body: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        self.helper_query_one(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) VALUES ($1, $2) RETURNING delivery_id",
            &[&webhook_id, &body],
            "insert delivery",
        )
        .await
        .get(0)
    }

    /// `rows` deliveries for `webhook_id` in one producer `INSERT` (bodies `{"n": 1}` … `{"n": rows}`).
    pub async fn insert_deliveries(&self, webhook_id: i64, rows: i64) {
        self.helper_query(
            "INSERT INTO hookfleet.delivery_queue (webhook_id, message_body) \
             SELECT $1, jsonb_build_object('n', n) FROM generate_series(1, $2::bigint) n",
            &[&webhook_id, &rows],
        )
        .await
        .unwrap_or_else(|error| panic!("insert deliveries: {error:?}"));
    }

    /// A delivery's status, retry count, last status code and last error.
    pub async fn delivery(&self, delivery_id: i64) -> DeliveryState {
        let row = self.try_delivery(delivery_id).await.unwrap_or_else(|error| panic!("delivery row: {error:?}"));
        row.unwrap_or_else(|| panic!("delivery row: delivery {delivery_id} does not exist"))
    }

    /// A delivery's state, `None` when there is no such row.
    async fn try_delivery(&self, delivery_id: i64) -> Result<Option<DeliveryState>, tokio_postgres::Error> {
        let rows = self
            .helper_query(
                "SELECT delivery_status, retry_count, last_status_code, last_error FROM hookfleet.delivery_queue \
                 WHERE delivery_id = $1",
                &[&delivery_id],
            )
            .await?;
        Ok(rows.first().map(|row| (row.get(0), row.get(1), row.get(2), row.get(3))))
    }

    /// Waits (30 s at most) until the delivery has `status`; its state then. A lost session (or
    /// a server not accepting connections yet) is tried again until the deadline.
    pub async fn wait_for_status(&self, delivery_id: i64, status: &str) -> DeliveryState {
        eventually(Duration::from_secs(30), &format!("delivery {delivery_id} to be {status}"), || async {
            match self.try_delivery(delivery_id).await {
                Ok(state) => {
                    let state = state.unwrap_or_else(|| panic!("delivery {delivery_id} does not exist"));
                    (state.0 == status).then_some(state)
                }
                Err(error) if session_lost(&error) => None,
                Err(error) => panic!("delivery row: {error:?}"),
            }
        })
        .await
    }

    /// The shared helper session (opened if it is not open), or a session of its own when
    /// another helper call of this test is using the shared one.
    async fn helper_session(&self) -> Result<HelperSession, tokio_postgres::Error> {
        match helper_slot(&self.url).try_lock_owned() {
            Ok(mut guard) => {
                if guard.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
                    *guard = None;
                    *guard = Some(try_connect(&self.url, HELPER_APPLICATION).await?);
                }
                Ok(HelperSession::Shared(guard))
            }
            Err(_busy) => Ok(HelperSession::Own(try_connect(&self.url, HELPER_APPLICATION).await?)),
        }
    }

    /// Runs one statement on the helper session. A session found lost when the statement is sent
    /// (the server restarted since the last call, a backend was terminated) is replaced and the
    /// statement sent once more; the server ended that session, so the first try did not
    /// commit (bar a crash between a commit and its reply, which no test here relies on).
    async fn helper_query(
        &self,
        query: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let session = self.helper_session().await?;
        match session.client().query(query, params).await {
            Err(error) if session_lost(&error) => {
                session.discard();
                let session = self.helper_session().await?;
                let result = session.client().query(query, params).await;
                if result.as_ref().is_err_and(session_lost) {
                    session.discard();
                }
                result
            }
            result => result,
        }
    }

    /// [`TestDatabase::helper_query`] for exactly one row; panics (naming `what`) otherwise.
    async fn helper_query_one(
        &self,
        query: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        what: &str,
    ) -> tokio_postgres::Row {
        let mut rows = self.helper_query(query, params).await.unwrap_or_else(|error| panic!("{what}: {error:?}"));
        assert_eq!(rows.len(), 1, "{what}: expected one row, got {}", rows.len());
        rows.remove(0)
    }

    /// The environment a process needs to use this database with loopback receivers.
    pub fn env(&self) -> HashMap<String, String> {
        let cluster = cluster();
        HashMap::from([
            ("DATABASE_URL".into(), self.url.clone()),
            ("HOOKFLEET_ENCRYPTION_KEY".into(), cluster.encryption_key.clone()),
            ("HOOKFLEET_ALLOW_HTTP".into(), "true".into()),
            ("HOOKFLEET_ALLOWED_CIDRS".into(), "127.0.0.0/8,::1/128".into()),
        ])
    }

    pub fn webhook_store(&self) -> WebhookStore {
        let pool = hookfleet_core::db::pool(&self.url, "hookfleet-test", 2).expect("pool");
        let key = SecretString::from(cluster().encryption_key.clone());
        let keyring = Keyring::from_settings(Some(&key), &[]).expect("keyring");
        WebhookStore::new(pool, Arc::new(keyring))
    }

    /// Creates a webhook the way `hookfleet webhooks create` does, allowing loopback URLs.
    pub async fn create_webhook(&self, new: NewWebhook) -> WebhookView {
        let client = loopback_client();
        self.webhook_store().create(new, &client).await.expect("create webhook")
    }
}

/// A delivery client that may reach loopback receivers, as tests configure workers.
pub fn loopback_client() -> DeliveryClient {
    DeliveryClient::new(ClientOptions {
        allow_http: true,
        allowed_cidrs: vec!["127.0.0.0/8".parse().expect("cidr"), "::1/128".parse().expect("cidr")],
        connect_timeout: Duration::from_secs(2),
        response_body_cap: 65_536,
        user_agent: "hookfleet-test".into(),
        extra_root_certificates: Vec::new(),
    })
    .expect("delivery client")
}

/// Polls `check` every 20 ms until it yields a value or `deadline` passes (then panics with `what`).
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < until, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct ReceivedRequest {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub received_at: Instant,
    pub version: axum::http::Version,
}

impl ReceivedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// What the receiver answers.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// How long to hold the request before answering.
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: String::new(), delay: Duration::ZERO }
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Responder = dyn Fn(&ReceivedRequest, usize) -> Reply + Send + Sync;

struct ReceiverState {
    requests: Mutex<Vec<ReceivedRequest>>,
    responder: Box<Responder>,
}

/// A loopback HTTP receiver on 127.0.0.1 that records every request.
pub struct Receiver {
    pub addr: SocketAddr,
    /// `http`, or `https` for [`Receiver::start_tls`].
    scheme: &'static str,
    state: Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Answers every request with 200.
    pub async fn ok() -> Self {
        Self::start(|_, _| Reply::status(200)).await
    }

    /// `responder` gets each request and how many requests came before it.
    pub async fn start(responder: impl Fn(&ReceivedRequest, usize) -> Reply + Send + Sync + 'static) -> Self {
        let state = Arc::new(ReceiverState { requests: Mutex::new(Vec::new()), responder: Box::new(responder) });
        let app = axum::Router::new().fallback(receive).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, scheme: "http", state, server }
    }

    /// The same over HTTPS (HTTP/2 or HTTP/1.1, as ALPN decides) with a certificate from `tls`'s CA.
    pub async fn start_tls(
        tls: &LoopbackTls,
        responder: impl Fn(&ReceivedRequest, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let state = Arc::new(ReceiverState { requests: Mutex::new(Vec::new()), responder: Box::new(responder) });
        let app = axum::Router::new().fallback(receive).with_state(state.clone());
        let listener = tls.bind().await.expect("bind TLS receiver");
        let addr = axum::serve::Listener::local_addr(&listener).expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, scheme: "https", state, server }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    pub fn requests(&self) -> Vec<ReceivedRequest> {
        self.state.requests.lock().expect("receiver lock").clone()
    }

    /// Waits until at least `count` requests arrived.
    pub async fn wait_for(&self, count: usize, deadline: Duration) -> Vec<ReceivedRequest> {
        eventually(deadline, &format!("{count} requests at the receiver"), || async {
            let requests = self.requests();
            (requests.len() >= count).then_some(requests)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(State(state): State<Arc<ReceiverState>>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 16 * 1024 * 1024).await.unwrap_or_default();
    let received = ReceivedRequest {
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
        received_at: Instant::now(),
        version: parts.version,
    };
    let reply = {
        let mut requests = state.requests.lock().expect("receiver lock");
        let reply = (state.responder)(&received, requests.len());
        requests.push(received);
        reply
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = (StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK), reply.body).into_response();
    for (name, value) in reply.headers {
        if let (Ok(name), Ok(value)) = (name.parse::<axum::http::HeaderName>(), value.parse()) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// A running `hookfleet-worker` process; killed on drop.
pub struct WorkerProcess {
    child: Child,
    pub worker_id: String,
    pub metrics_addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

/// Settings that make workers quick in tests: short polls and retries, loopback allowed.
pub fn test_worker_env(db: &TestDatabase, worker_id: &str, metrics_addr: SocketAddr) -> HashMap<String, String> {
    let mut env = db.env();
    env.extend([
        ("WORKER_ID".to_owned(), worker_id.to_owned()),
        ("METRICS_ADDR".to_owned(), metrics_addr.to_string()),
        ("POLL_INTERVAL".to_owned(), "200ms".to_owned()),
        ("HOOKFLEET_RETRY_BASE".to_owned(), "100ms".to_owned()),
        ("HOOKFLEET_RETRY_MAX".to_owned(), "2s".to_owned()),
        ("HOOKFLEET_HEARTBEAT_INTERVAL".to_owned(), "1s".to_owned()),
        ("HTTP_TIMEOUT".to_owned(), "2s".to_owned()),
        ("HOOKFLEET_LEASE".to_owned(), "10s".to_owned()),
        ("LOG_LEVEL".to_owned(), "info".to_owned()),
        // Tests that are not about rate limits must not wait for the default 10/s.
        ("RATE_LIMIT_RPS".to_owned(), "100000".to_owned()),
    ]);
    env
}

/// A free loopback port for a process's METRICS_ADDR.
pub fn free_loopback_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// How many ports [`WorkerProcess::spawn`] tries before it gives up.
const METRICS_PORT_TRIES: u32 = 5;
/// How long [`WorkerProcess::spawn`] waits for a worker to bind METRICS_ADDR (or to exit, or to
/// say that it waits for the database) before it returns with the worker still starting.
const METRICS_BIND_PATIENCE: Duration = Duration::from_secs(10);

/// How one start of a worker process went, as far as its METRICS_ADDR is concerned.
enum Start {
    /// It serves METRICS_ADDR, exited for another reason, or is still starting: hand it over.
    Settled,
    /// It exited because another socket took the port between [`free_loopback_addr`] and its bind.
    PortTaken,
}

impl WorkerProcess {
    /// Starts `binary` with `test_worker_env` plus `overrides`. The port it gets for METRICS_ADDR
    /// is free when picked but released before the worker binds it, so another socket may take
    /// it first: then the worker exits saying so and is started again on another port.
    pub fn spawn(binary: &Path, db: &TestDatabase, worker_id: &str, overrides: &[(&str, &str)]) -> Self {
        Self::spawn_preferring(binary, db, worker_id, overrides, free_loopback_addr())
    }

    /// [`WorkerProcess::spawn`], trying `metrics_addr` first (the harness's own tests pass a
    /// taken one). An override of METRICS_ADDR is used as given, never retried.
    pub fn spawn_preferring(
        binary: &Path,
        db: &TestDatabase,
        worker_id: &str,
        overrides: &[(&str, &str)],
        metrics_addr: SocketAddr,
    ) -> Self {
        let fixed = overrides.iter().any(|(name, _)| *name == "METRICS_ADDR");
        let mut metrics_addr = metrics_addr;
        let mut taken = Vec::new();
        for _ in 0..METRICS_PORT_TRIES {
            let mut env = test_worker_env(db, worker_id, metrics_addr);
            for (name, value) in overrides {
                env.insert((*name).to_owned(), (*value).to_owned());
            }
            let log = tempfile::NamedTempFile::new().expect("log file");
            let child = Command::new(binary)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(&env)
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log"))
                .stderr(log.reopen().expect("log"))
                .spawn()
                .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
            let mut worker = Self { child, worker_id: worker_id.to_owned(), metrics_addr, log };
            match worker.wait_for_metrics_bind() {
                Start::PortTaken if !fixed => {
                    taken.push(metrics_addr);
                    metrics_addr = free_loopback_addr();
                }
                _ => return worker,
            }
        }
        panic!("{worker_id}: every METRICS_ADDR tried was taken before the worker could bind it: {taken:?}")
    }

    /// Waits (bounded by [`METRICS_BIND_PATIENCE`]) until the worker serves its METRICS_ADDR, exits,
    /// or logs that it waits for the database (it binds only once connected). Blocks the thread:
    /// `spawn` is not async, so on a multi-threaded runtime the runtime is told (`block_in_place`).
    fn wait_for_metrics_bind(&mut self) -> Start {
        let taken = format!("cannot listen on METRICS_ADDR {}", self.metrics_addr);
        let mut wait = || {
            let until = Instant::now() + METRICS_BIND_PATIENCE;
            loop {
                let exited = self.child.try_wait().expect("try_wait").is_some();
                let log = self.log();
                if exited {
                    let port_taken = log.contains(&taken) && log.contains("in use");
                    return if port_taken { Start::PortTaken } else { Start::Settled };
                }
                let waiting_for_database = log.contains("cannot reach the database yet");
                if log.contains("serving /metrics") || waiting_for_database || Instant::now() >= until {
                    return Start::Settled;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|status| status.success()), "kill -{signal} failed");
    }

    /// Waits for the process to exit, up to `deadline`.
    pub async fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let child = &mut self.child;
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < until, "worker did not exit within {deadline:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GETs a path from the worker's metrics server (plain HTTP/1.0 over loopback).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr).await.ok()?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
        Some((status, body))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Verifies a received request with the official `standardwebhooks` Python package.
pub fn verify_with_python(secret: &str, request: &ReceivedRequest) -> Result<(), String> {
    let headers: serde_json::Map<String, serde_json::Value> = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .map(|name| ((*name).to_owned(), serde_json::Value::from(request.header(name).unwrap_or_default())))
        .collect();
    let input = serde_json::json!({
        "secret": secret,
        "headers": headers,
        "body": String::from_utf8_lossy(&request.body),
    });
    let script = "import json, sys\n\
from standardwebhooks.webhooks import Webhook\n\
data = json.load(sys.stdin)\n\
Webhook(data['secret']).verify(data['body'], data['headers'])\n\
print('verified')\n";
    // scripts/test points this at a virtualenv when the system Python lacks the package.
    let python = std::env::var("HOOKFLEET_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run python3: {error}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        stdin.write_all(input.to_string().as_bytes()).map_err(|error| error.to_string())?;
    }
    let output = child.wait_with_output().map_err(|error| error.to_string())?;
    if output.status.success() && String::from_utf8_lossy(&output.stdout).contains("verified") {
        Ok(())
    } else {
        Err(format!(
            "standardwebhooks refused the request: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Claims up to `n` rows through `hookfleet.get_ready_deliveries` as `worker` with a 60 s lease, on
/// a client or in an open transaction (a claim at a `psql` prompt); the ids in the order returned.
pub async fn psql_claim(client: &impl tokio_postgres::GenericClient, worker: &str, n: i32) -> Vec<i64> {
    client
        .query("SELECT delivery_id FROM hookfleet.get_ready_deliveries($1, $2, interval '60 seconds')", &[&worker, &n])
        .await
        .expect("claim")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Opens `webhook_id`'s circuit with one failure (threshold 1, open for 60 s); its health status.
pub async fn open_circuit(client: &tokio_postgres::Client, webhook_id: i64) -> Option<String> {
    client
        .query_one("SELECT hookfleet.update_webhook_health($1, 500, 1, 'x', 1, 60)", &[&webhook_id])
        .await
        .expect("open the circuit")
        .get(0)
}

/// Moves a webhook's open period into the past, as if its timeout had run out.
pub async fn pass_open_period(client: &tokio_postgres::Client, webhook_id: i64) {
    client
        .execute(
            "UPDATE hookfleet.webhook_health_metrics SET circuit_open_until = now() - interval '1 second' \
             WHERE webhook_id = $1",
            &[&webhook_id],
        )
        .await
        .expect("let the open period pass");
}

impl TestDatabase {
    /// Waits until a session of this database whose statement contains `statement` waits for a
    /// lock (or until `done` says the statement finished without waiting); true when it waits.
    pub async fn wait_for_lock_wait(&self, statement: &str, done: impl Fn() -> bool) -> bool {
        let observer = self.client().await;
        let pattern = format!("%{statement}%");
        eventually(Duration::from_secs(30), &format!("a statement with {statement:?} to wait for a lock"), || async {
            if done() {
                return Some(false);
            }
            observer
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' \
                     AND query LIKE $1 AND pid <> pg_backend_pid()::bigint",
                    &[&pattern],
                )
                .await
                .expect("pg_stat_activity")
                .map(|_| true)
        })
        .await
    }
}

/// PostgreSQL backends stopped with SIGSTOP: a server that accepts connections and never answers
/// on them (a frozen primary, a partition that drops without resetting). Their sessions resume
/// (SIGCONT) when this is dropped, panics included, so the cluster can still shut down.
pub struct FrozenBackends {
    pids: Vec<i32>,
}

impl FrozenBackends {
    pub fn pids(&self) -> &[i32] {
        &self.pids
    }
}

impl Drop for FrozenBackends {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = Command::new("kill").arg("-CONT").arg(pid.to_string()).status();
        }
    }
}

impl TestDatabase {
    /// Freezes every backend of this database whose `application_name` is exactly
    /// `application_name` (only this test's processes use this database).
    pub async fn freeze_backends(&self, application_name: &str) -> FrozenBackends {
        let pids: Vec<i32> = self
            .client()
            .await
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
                &[&application_name],
            )
            .await
            .expect("backends")
            .iter()
            .map(|row| row.get(0))
            .collect();
        let frozen = FrozenBackends { pids };
        for pid in frozen.pids() {
            let status = Command::new("kill").arg("-STOP").arg(pid.to_string()).status();
            assert!(status.is_ok_and(|status| status.success()), "kill -STOP {pid} failed");
        }
        frozen
    }
}

/// One sample's value from a Prometheus text exposition: the line that starts with `series`
/// (name and labels, exactly as exported).
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{cluster, database, with_database, HELPER_APPLICATION};

    /// These tests restart this binary's PostgreSQL or terminate sessions: one at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn loopback_webhook(db: &super::TestDatabase) -> i64 {
        let new = hookfleet_core::webhooks::NewWebhook { url: "http://127.0.0.1:9/".into(), ..Default::default() };
        db.create_webhook(new).await.webhook_id
    }

    /// Sessions of `db` opened by the helpers, seen from a dedicated session.
    async fn helper_sessions(db: &super::TestDatabase) -> i64 {
        db.client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
                &[&HELPER_APPLICATION],
            )
            .await
            .expect("pg_stat_activity")
            .get(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn helpers_share_one_session_and_open_another_when_it_is_terminated() {
        let _serial = SERIAL.lock().await;
        let db = database().await;
        let webhook = loopback_webhook(&db).await;
        let first = db.count("SELECT pg_backend_pid()::bigint").await;
        let id = db.insert_delivery(webhook, "{}").await;
        for _ in 0..20 {
            assert_eq!(db.count("SELECT pg_backend_pid()::bigint").await, first, "every helper call uses one session");
            assert_eq!(db.delivery(id).await.0, "pending");
        }
        assert_eq!(helper_sessions(&db).await, 1);

        // Ended from outside (as tests end workers' sessions): the next call opens a new one.
        let ended: bool = db
            .client()
            .await
            .query_one("SELECT pg_terminate_backend($1::bigint::int, 5000)", &[&first])
            .await
            .expect("terminate")
            .get(0);
        assert!(ended);
        let second = db.count("SELECT pg_backend_pid()::bigint").await;
        assert_ne!(second, first);
        assert_eq!(db.wait_for_status(id, "pending").await.0, "pending");
        assert_eq!(helper_sessions(&db).await, 1);
    }

    /// A helper call blocked on a lock holds the shared session; another helper call of the same
    /// test (here: the one that watches for the wait) must not queue behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_helper_call_while_another_waits_on_a_lock_gets_a_session_of_its_own() {
        let _serial = SERIAL.lock().await;
        let db = database().await;
        let mut holder = db.client().await;
        let transaction = holder.transaction().await.expect("begin");
        transaction.batch_execute("LOCK TABLE hookfleet.delivery_queue IN ACCESS EXCLUSIVE MODE").await.expect("lock");
        let blocked = db.count("SELECT count(*) FROM hookfleet.delivery_queue");
        let release = async {
            super::eventually(Duration::from_secs(30), "the blocked count to wait for the lock", || async {
                let waiting = db
                    .count(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                         AND wait_event_type = 'Lock' AND query LIKE 'SELECT count(*) FROM hookfleet.delivery_queue'",
                    )
                    .await;
                (waiting == 1).then_some(())
            })
            .await;
            transaction.commit().await.expect("commit");
        };
        let (count, ()) = tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(blocked, release) })
            .await
            .expect("the second helper call waited behind the first: a deadlock");
        assert_eq!(count, 0);
    }

    /// PostgreSQL restarted under a test: the helpers reconnect, and a wait with a deadline rides
    /// out the outage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn helpers_reconnect_after_postgres_restarts() {
        let _serial = SERIAL.lock().await;
        let Some(server) = cluster().embedded() else {
            eprintln!(
                "\n*** helpers_reconnect_after_postgres_restarts: SKIPPED against HOOKFLEET_TEST_DATABASE_URL ***\n"
            );
            return;
        };
        let db = database().await;
        let id = db.insert_delivery(loopback_webhook(&db).await, "{}").await;
        let before = db.count("SELECT pg_backend_pid()::bigint").await;
        tokio::task::spawn_blocking(move || {
            let mut server = server.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            server.stop_server().expect("stop_server");
            server.start_again().expect("start_again");
        })
        .await
        .expect("restart");
        assert_ne!(db.count("SELECT pg_backend_pid()::bigint").await, before, "a new session after a restart");
        assert_eq!(db.delivery(id).await.0, "pending");

        // Down when the wait starts (its first tries fail to connect), back while it waits.
        let stopped = tokio::task::spawn_blocking(move || {
            server.lock().unwrap_or_else(std::sync::PoisonError::into_inner).crash_server().expect("crash_server")
        });
        stopped.await.expect("crash");
        let start = tokio::task::spawn_blocking(move || {
            server.lock().unwrap_or_else(std::sync::PoisonError::into_inner).start_again().expect("start_again")
        });
        let (state, started) = tokio::join!(db.wait_for_status(id, "pending"), start);
        started.expect("start again");
        assert_eq!(state.0, "pending");
    }

    #[test]
    fn replaces_the_database_of_either_form() {
        assert_eq!(
            with_database("postgresql://u:p@h:5432/db?sslmode=disable", "t1"),
            "postgresql://u:p@h:5432/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t1"), "postgresql://h/t1");
        assert_eq!(with_database("host=/tmp port=5432", "t1"), "host=/tmp port=5432 dbname=t1");
    }
}
