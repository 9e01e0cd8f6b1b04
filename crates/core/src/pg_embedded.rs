//! A throwaway PostgreSQL server started from the machine's own server binaries.
//!
//! This module owns everything about that server: finding the binaries, making a private
//! cluster in a fresh temp dir, starting it, stopping or crashing it (crash tests restart
//! PostgreSQL under load) and cleaning up afterwards. The test harness (one server per test
//! binary), `hookfleet demo` and the benchmark all use it.
//!
//! Why it exists instead of a crate: the embedded-PostgreSQL crates download binaries at build
//! or run time and testcontainers needs Docker; neither works here (ECOSYSTEM §2.2). Debian's
//! server binaries are already on the machine, so we drive them directly.
//!
//! Three rules shape the code:
//! - `initdb` refuses to run as root, and sessions and CI run as root. So when the effective
//!   uid is 0 the temp dir is chowned to the `postgres` user and `initdb`/`postgres` run as
//!   that user (`CommandExt::uid/gid`).
//! - Never touch a cluster we did not start: a private temp dir, a Unix socket inside it and
//!   `listen_addresses=''`, so no TCP port is opened and parallel test binaries cannot clash
//!   even though they all use the same port number.
//! - Nothing is left behind: `Drop` stops the server and removes the temp dir, and for owners
//!   that are never dropped (a `static` in the test harness) an optional watchdog process does
//!   the same once the owning process has exited.
//!
//! `initdb` takes a good part of a second on a busy machine and every test binary starts a
//! server, so the test harness starts from a cache instead
//! ([`EmbeddedPostgres::start_from_initdb_cache`]): one data dir initialised per server build,
//! initdb options and owner, made atomically (built aside, then renamed into place) and copied
//! into each new cluster's temp dir. `hookfleet demo` and the benchmark keep a plain `initdb`.
//!
//! Everything here is blocking (`std::process`); async callers use `spawn_blocking`.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Environment variable that names the folder holding `initdb` and `postgres`.
const BINDIR_ENV: &str = "HOOKFLEET_PG_BINDIR";
/// Where Debian installs one folder per server major version.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// Any fixed port works: the socket lives in a private dir and no TCP port is opened.
const DEFAULT_PORT: u16 = 5432;
/// The superuser `initdb` creates, and the OS user the server runs as when we are root.
const SUPERUSER: &str = "postgres";
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// `stop_server`/`crash_server` wait this long; a fast shutdown with fsync off takes well under
/// a second, a durable one may have to write a checkpoint first.
const STOP_DEADLINE: Duration = Duration::from_secs(60);
/// `Drop` must not hang a test binary for long; after this it falls back to SIGKILL.
const DROP_STOP_DEADLINE: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// `sun_path` holds 108 bytes on Linux; stay well below it.
const MAX_SOCKET_PATH: usize = 100;
const DATA_DIR: &str = "data";
/// Short on purpose: the socket path must stay under `MAX_SOCKET_PATH`.
const SOCKET_DIR: &str = "s";
const LOG_FILE: &str = "server.log";
/// How much of the server log an error carries.
const LOG_TAIL_LINES: usize = 20;
/// Every cluster is made with these (the data dir comes first, `-D <dir>`).
const INITDB_ARGS: [&str; 7] = ["--no-sync", "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"];
/// Raise when the cache's layout or what goes into its key changes: older entries are then
/// simply never used again.
const INITDB_CACHE_FORMAT: u32 = 1;
/// In a cache entry, beside `data`: how many files and bytes `data` held when it was made, so
/// that an entry a temp-dir cleaner has thinned out is noticed and replaced.
const CACHE_MANIFEST: &str = "manifest";

/// Stops the server and removes the temp dir once the owner process has exited.
///
/// Arguments: `$1` owner pid, `$2` temp dir, `$3` data dir. It also quits as soon as the temp
/// dir is gone (the owner dropped the server normally). The server pid is read from
/// `postmaster.pid` at that moment, so the watchdog follows `start_again` restarts; the
/// `/proc/<pid>/cmdline` check makes sure a stale pid file never gets an unrelated process
/// (whose pid was reused) signalled. Like `pg_ctl`, it treats the pid file's removal as "the
/// server has stopped": a postmaster whose parent is still alive stays a zombie, and a zombie
/// still answers `kill -0`.
const WATCHDOG_SCRIPT: &str = r#"
owner=$1; dir=$2; data=$3
while kill -0 "$owner" 2>/dev/null && [ -d "$dir" ]; do sleep 1; done
[ -d "$dir" ] || exit 0
if [ -f "$data/postmaster.pid" ]; then
  pid=$(head -n 1 "$data/postmaster.pid")
  if [ -n "$pid" ] && grep -aqF -- "$data" "/proc/$pid/cmdline" 2>/dev/null; then
    kill -INT "$pid" 2>/dev/null
    i=0
    while [ -f "$data/postmaster.pid" ] && kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
      sleep 0.1; i=$((i+1))
    done
    [ -f "$data/postmaster.pid" ] && kill -KILL "$pid" 2>/dev/null
  fi
fi
rm -rf "$dir"
"#;

/// What went wrong starting, stopping or finding the server; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries (initdb and postgres) found; looked at: {looked_at}. \
         Install the PostgreSQL server: apt-get install -y postgresql \
         (or set HOOKFLEET_PG_BINDIR to the folder holding initdb and postgres)"
    )]
    BindirNotFound { looked_at: String },
    #[error(
        "HOOKFLEET_PG_BINDIR={} does not contain initdb and postgres; point it at the server's \
         bin folder (e.g. /usr/lib/postgresql/15/bin) or unset it",
        path.display()
    )]
    BindirOverrideInvalid { path: PathBuf },
    #[error(
        "running as root, so PostgreSQL must run as the `postgres` user, which does not exist; \
         install the PostgreSQL server: apt-get install -y postgresql"
    )]
    PostgresUserMissing,
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed { command: String, status: ExitStatus, output: String },
    #[error("PostgreSQL exited during start-up ({status}); server log tail:\n{log_tail}")]
    ServerExited { status: ExitStatus, log_tail: String },
    #[error(
        "PostgreSQL did not accept connections within {waited:?} and was stopped; \
         server log tail:\n{log_tail}"
    )]
    NotReady { waited: Duration, log_tail: String },
    #[error("PostgreSQL did not stop within {waited:?} after SIG{signal}; it was killed (SIGKILL)")]
    StopTimeout { signal: &'static str, waited: Duration },
    #[error("the embedded PostgreSQL server is not running; call start_again first")]
    NotRunning,
    #[error("the embedded PostgreSQL server is already running; call stop_server or crash_server first")]
    AlreadyRunning,
}

fn io_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> EmbeddedError {
    let action = action.into();
    move |source| EmbeddedError::Io { action, source }
}

/// How to start an [`EmbeddedPostgres`].
#[derive(Clone, Debug, Default)]
pub struct EmbeddedOptions {
    /// false (tests, bench) → fsync=off, synchronous_commit=off, full_page_writes=off for speed;
    /// true → PostgreSQL's defaults.
    pub durable: bool,
    /// When set, a watchdog process (`sh -c` loop with `kill -0 <pid>` every second) stops the
    /// server (SIGINT, i.e. fast shutdown) and removes the temp dir once process <pid> has
    /// exited. The test harness passes its own pid because a `static` server is never dropped;
    /// that keeps CI free of orphans.
    pub stop_when_process_exits: Option<u32>,
    /// Extra `-c name=value` server settings (e.g. max_connections=200).
    pub settings: Vec<(String, String)>,
}

/// The OS user the server runs as when we are root.
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A private PostgreSQL cluster in a temp dir, reachable only through its Unix socket.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bindir: PathBuf,
    /// Holds the data dir, the socket dir and the server log; removed on drop.
    root_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    /// `-c name=value` arguments, kept so `start_again` starts the server exactly as before.
    server_settings: Vec<OsString>,
    /// `None` while stopped (between `stop_server`/`crash_server` and `start_again`).
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl EmbeddedPostgres {
    /// HOOKFLEET_PG_BINDIR, else `pg_config --bindir` (if it contains initdb and postgres), else
    /// the highest version under /usr/lib/postgresql/*/bin. The error says how to install.
    pub fn find_bindir() -> Result<PathBuf, EmbeddedError> {
        let sources = BindirSources {
            env_override: std::env::var_os(BINDIR_ENV).map(PathBuf::from),
            pg_config_bindir: pg_config_bindir(),
            versioned: installed_versions(Path::new(DEBIAN_PG_ROOT)),
        };
        choose_bindir(sources, is_server_bindir)
    }

    /// Creates a fresh cluster (`initdb`), starts `postgres` with `options` and waits (up to
    /// 30 s) until it accepts connections. Blocking: call it from `spawn_blocking` in async code.
    pub fn start(options: EmbeddedOptions) -> Result<Self, EmbeddedError> {
        Self::start_on_port(options, DEFAULT_PORT, DataSource::Initdb)
    }

    /// [`EmbeddedPostgres::start`], but the new cluster is a copy of a data dir that `initdb`
    /// made once for this server build, these options and this owner, cached in the temp dir
    /// (`hookfleet-initdb-cache-<uid>`); `initdb` runs only when there is no such copy yet (or
    /// it was damaged). Each call still gets a cluster of its own (every copy shares the
    /// system identifier, which nothing here uses). When the cache cannot be used at all it
    /// falls back to `initdb` and logs why. For the test harness, which starts a server per
    /// test binary.
    pub fn start_from_initdb_cache(options: EmbeddedOptions) -> Result<Self, EmbeddedError> {
        Self::start_on_port(options, DEFAULT_PORT, DataSource::Cache { root: None })
    }

    fn start_on_port(options: EmbeddedOptions, port: u16, source: DataSource) -> Result<Self, EmbeddedError> {
        let started = Instant::now();
        let bindir = Self::find_bindir()?;
        let run_as = server_user()?;
        let base = temp_base(port, run_as.is_some());
        let root_dir = create_root_dir(&base)?;
        // From here on every early return drops `server`, which removes the temp dir again.
        let mut server = EmbeddedPostgres {
            bindir,
            data_dir: root_dir.join(DATA_DIR),
            socket_dir: root_dir.join(SOCKET_DIR),
            log_path: root_dir.join(LOG_FILE),
            root_dir,
            port,
            run_as,
            server_settings: server_settings(&options),
            child: None,
            watchdog: None,
        };
        // The watchdog goes first so that even a start interrupted by the owner's death
        // leaves nothing behind.
        if let Some(owner) = options.stop_when_process_exits {
            server.watchdog = Some(spawn_watchdog(owner, &server.root_dir, &server.data_dir)?);
        }
        let copied = match source {
            DataSource::Initdb => false,
            DataSource::Cache { root } => {
                let root = root.unwrap_or_else(|| base.join(format!("hookfleet-initdb-cache-{}", effective_uid())));
                match InitdbCache::new(root, &server.bindir, run_as).and_then(|cache| cache.copy_into(&server.data_dir))
                {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(%error, "initdb cache unusable; running initdb");
                        remove_if_present(&server.data_dir)?;
                        false
                    }
                }
            }
        };
        server.prepare_root_dir()?;
        if !copied {
            server.initdb()?;
        }
        server.launch()?;
        tracing::debug!(
            socket_dir = %server.socket_dir.display(),
            port,
            from_cache = copied,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "embedded PostgreSQL started"
        );
        Ok(server)
    }

    /// libpq key/value form usable by `tokio_postgres::Config::from_str`:
    /// "host=<socket dir> port=<port> user=postgres dbname=<dbname>".
    pub fn connection_string(&self, dbname: &str) -> String {
        key_value_connection_string(&self.socket_dir, self.port, dbname)
    }

    /// postgresql:// URL form (socket dir percent-encoded as host) for printing a `psql` command.
    pub fn url(&self, dbname: &str) -> String {
        url_connection_string(&self.socket_dir, self.port, dbname)
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Fast shutdown (SIGINT) and wait; keeps the data dir so `start_again` can bring the same
    /// cluster back. Used by crash tests that restart PostgreSQL under load. Blocking.
    pub fn stop_server(&mut self) -> Result<(), EmbeddedError> {
        let mut child = self.child.take().ok_or(EmbeddedError::NotRunning)?;
        stop_process(&mut child, "INT", STOP_DEADLINE).map(drop)
    }

    /// Immediate shutdown (SIGQUIT), simulating a crash: no checkpoint, so the next start runs
    /// crash recovery. Keeps the data dir. Blocking.
    pub fn crash_server(&mut self) -> Result<(), EmbeddedError> {
        let mut child = self.child.take().ok_or(EmbeddedError::NotRunning)?;
        stop_process(&mut child, "QUIT", STOP_DEADLINE).map(drop)
    }

    /// Starts the same cluster again (same socket dir, port and settings) after `stop_server`
    /// or `crash_server`, and waits until it accepts connections. Blocking.
    pub fn start_again(&mut self) -> Result<(), EmbeddedError> {
        if let Some(child) = self.child.as_mut() {
            let exited = child.try_wait().map_err(io_error("check whether PostgreSQL is running"))?;
            if exited.is_none() {
                return Err(EmbeddedError::AlreadyRunning);
            }
            // It died on its own (killed from outside); starting it again is what was asked.
            self.child = None;
        }
        self.launch()
    }

    /// A command for one of the server binaries, run as the server user with the temp dir as
    /// its cwd (postgres must be able to read its cwd, and ours may be root-only).
    fn command(&self, program: &str) -> Command {
        server_command(&self.bindir, self.run_as, &self.root_dir, program)
    }

    /// Makes the socket dir and the log file, then hands the whole tree to the server user.
    fn prepare_root_dir(&self) -> Result<(), EmbeddedError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.socket_dir)
            .map_err(io_error(format!("create {}", self.socket_dir.display())))?;
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_error(format!("create {}", self.log_path.display())))?;
        if let Some(run_as) = self.run_as {
            chown_tree(&self.root_dir, run_as)?;
        }
        Ok(())
    }

    fn initdb(&self) -> Result<(), EmbeddedError> {
        run_initdb(&self.bindir, self.run_as, &self.root_dir, &self.data_dir)
    }

    /// Spawns `postgres` (output appended to the log file) and waits until it is ready.
    fn launch(&mut self) -> Result<(), EmbeddedError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io_error(format!("open {}", self.log_path.display())))?;
        let log_for_stderr = log.try_clone().map_err(io_error(format!("open {}", self.log_path.display())))?;
        let mut command = self.command("postgres");
        command.arg("-D").arg(&self.data_dir).arg("-p").arg(self.port.to_string());
        for setting in &self.server_settings {
            command.arg("-c").arg(setting);
        }
        // After the caller's settings, so nothing can re-enable TCP or move the socket.
        command
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-c", "listen_addresses=", "-c", "unix_socket_permissions=0777"])
            .stdout(log)
            .stderr(log_for_stderr)
            // Its own process group: a Ctrl-C in the terminal goes to the owner, which decides
            // when the server stops (the demo drains its workers first).
            .process_group(0);
        let child = command.spawn().map_err(io_error(format!("start {}", self.bindir.join("postgres").display())))?;
        self.child = Some(child);
        self.wait_until_ready()
    }

    /// Polls `postmaster.pid` the way `pg_ctl -w` does: its status line says `ready` once the
    /// server accepts connections (after crash recovery, when there is one). Cheaper than
    /// spawning `pg_isready` every few milliseconds and needs no client binaries.
    fn wait_until_ready(&mut self) -> Result<(), EmbeddedError> {
        let started = Instant::now();
        let socket = self.socket_dir.join(format!(".s.PGSQL.{}", self.port));
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(EmbeddedError::NotRunning);
            };
            let exited = child.try_wait().map_err(io_error("check whether PostgreSQL is running"))?;
            if let Some(status) = exited {
                self.child = None;
                return Err(EmbeddedError::ServerExited { status, log_tail: log_tail(&self.log_path) });
            }
            if postmaster_ready(&self.data_dir, child.id()) && socket.exists() {
                return Ok(());
            }
            if started.elapsed() >= READY_DEADLINE {
                if let Err(error) = stop_process(child, "QUIT", DROP_STOP_DEADLINE) {
                    tracing::warn!(%error, "stopping a PostgreSQL that never became ready");
                }
                self.child = None;
                return Err(EmbeddedError::NotReady { waited: READY_DEADLINE, log_tail: log_tail(&self.log_path) });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for EmbeddedPostgres {
    /// Stops the server (SIGINT, SIGKILL after ~10 s), removes the temp dir, then ends the
    /// watchdog; in that order so that a process killed halfway still has its watchdog.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(error) = stop_process(&mut child, "INT", DROP_STOP_DEADLINE) {
                tracing::warn!(%error, "stopping embedded PostgreSQL");
            }
        }
        match fs::remove_dir_all(&self.root_dir) {
            Ok(()) => {}
            // The watchdog may have removed it already (its owner exited first).
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(
                %error,
                dir = %self.root_dir.display(),
                "removing embedded PostgreSQL temp dir"
            ),
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            // Killing an already-exited (unreaped) watchdog is harmless; wait() reaps it.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

/// Where a new cluster's data dir comes from.
enum DataSource {
    /// `initdb`, every time.
    Initdb,
    /// A copy from the initdb cache under `root` (`None`: the default place in the temp dir).
    Cache { root: Option<PathBuf> },
}

/// `program` from `bindir`, run as `run_as` (when we are root) in `cwd`, which that user must be
/// able to read.
fn server_command(bindir: &Path, run_as: Option<RunAs>, cwd: &Path, program: &str) -> Command {
    let mut command = Command::new(bindir.join(program));
    command.current_dir(cwd).stdin(Stdio::null());
    if let Some(run_as) = run_as {
        // std also drops root's supplementary groups when uid is set from root.
        command.uid(run_as.uid).gid(run_as.gid);
    }
    command
}

/// `initdb -D data_dir` with [`INITDB_ARGS`]; `cwd` and the parent of `data_dir` must belong to
/// `run_as` when it is set.
fn run_initdb(bindir: &Path, run_as: Option<RunAs>, cwd: &Path, data_dir: &Path) -> Result<(), EmbeddedError> {
    let mut command = server_command(bindir, run_as, cwd, "initdb");
    command.arg("-D").arg(data_dir).args(INITDB_ARGS);
    let output = command.output().map_err(io_error(format!("run {}", bindir.join("initdb").display())))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(EmbeddedError::CommandFailed {
        command: format!("initdb -D {}", data_dir.display()),
        status: output.status,
        output: text.trim().to_owned(),
    })
}

/// Our effective uid (`id -u`), or `u32::MAX` if it cannot be told (the cache then lives under
/// a name no real user has, checked like any other).
fn effective_uid() -> u32 {
    run_id(&["-u"]).ok().flatten().unwrap_or(u32::MAX)
}

fn remove_if_present(path: &Path) -> Result<(), EmbeddedError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(io_error(format!("remove {}", path.display()))(error)),
    }
}

/// Initialised data dirs, one per [`InitdbCache::key`], under a folder of our own.
///
/// An entry is `<root>/<key>/` holding `data/` (a cluster `initdb` made and nobody ever started)
/// and [`CACHE_MANIFEST`]. It is built in `<root>/building-<pid>-<n>/` and renamed into place
/// whole, so a reader sees either no entry or a complete one; when two processes build at once,
/// the first rename wins and the other discards its copy. Nothing but `rename` ever changes an
/// entry, so readers need no lock.
struct InitdbCache {
    root: PathBuf,
    bindir: PathBuf,
    run_as: Option<RunAs>,
    entry: PathBuf,
}

/// What [`CACHE_MANIFEST`] records: files (and symlinks) and their bytes.
#[derive(Debug, Default, PartialEq, Eq)]
struct TreeSize {
    files: u64,
    bytes: u64,
}

impl InitdbCache {
    /// Opens (creating it if needed) the cache folder `root`, which must be ours and writable by
    /// nobody else (it sits in a shared temp dir, and what it holds becomes a superuser's
    /// cluster).
    fn new(root: PathBuf, bindir: &Path, run_as: Option<RunAs>) -> Result<Self, EmbeddedError> {
        // As root, the server user builds entries inside it, so it must be able to pass through.
        let mode = if run_as.is_some() { 0o711 } else { 0o700 };
        match fs::DirBuilder::new().mode(mode).create(&root) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(io_error(format!("create {}", root.display()))(error)),
        }
        let metadata = fs::symlink_metadata(&root).map_err(io_error(format!("inspect {}", root.display())))?;
        let ours = std::os::unix::fs::MetadataExt::uid(&metadata) == effective_uid();
        if !metadata.is_dir() || !ours || metadata.permissions().mode() & 0o022 != 0 {
            return Err(EmbeddedError::Io {
                action: format!("use the initdb cache {}", root.display()),
                source: io::Error::other("it is not a directory of ours that only we can write; remove it"),
            });
        }
        let entry = root.join(Self::key(bindir, run_as)?);
        Ok(InitdbCache { root, bindir: bindir.to_owned(), run_as, entry })
    }

    /// Names everything that changes what `initdb` writes: the server build (its version line,
    /// and the size and modification time of `initdb` and `postgres`), the options, the owner,
    /// and `TZ` (initdb writes the time zone into postgresql.conf). As
    /// `pg<major>-<64-bit FNV-1a hash>`.
    fn key(bindir: &Path, run_as: Option<RunAs>) -> Result<String, EmbeddedError> {
        let postgres = bindir.join("postgres");
        let output = Command::new(&postgres)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(io_error(format!("run {} --version", postgres.display())))?;
        let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let mut described = format!(
            "format {INITDB_CACHE_FORMAT}\n{version}\n{}\n{INITDB_ARGS:?}\n{:?}\nTZ={:?}\n",
            bindir.display(),
            run_as.map(|run_as| (run_as.uid, run_as.gid)),
            std::env::var_os("TZ"),
        );
        for program in ["initdb", "postgres"] {
            let path = bindir.join(program);
            let metadata = fs::metadata(&path).map_err(io_error(format!("inspect {}", path.display())))?;
            let modified = metadata.modified().ok().and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok());
            described.push_str(&format!("{program} {} {modified:?}\n", metadata.len()));
        }
        let major: String = version
            .rsplit(' ')
            .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
            .and_then(|number| number.split('.').next())
            .unwrap_or("unknown")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        Ok(format!("pg{major}-{:016x}", fnv1a(described.as_bytes())))
    }

    /// Copies the entry's data dir to `data_dir` (which must not exist), building the entry
    /// first if there is none, and again once if the copy finds it damaged.
    fn copy_into(&self, data_dir: &Path) -> Result<(), EmbeddedError> {
        if !self.entry.exists() {
            self.build()?;
        }
        match self.try_copy(data_dir)? {
            true => Ok(()),
            false => {
                tracing::warn!(entry = %self.entry.display(), "initdb cache entry damaged; rebuilding it");
                remove_if_present(data_dir)?;
                self.discard_entry()?;
                self.build()?;
                if self.try_copy(data_dir)? {
                    Ok(())
                } else {
                    Err(EmbeddedError::Io {
                        action: format!("copy the initdb cache entry {}", self.entry.display()),
                        source: io::Error::other("the entry changed while it was copied"),
                    })
                }
            }
        }
    }

    /// Copies; false when the copy does not match the entry's manifest (files were removed).
    fn try_copy(&self, data_dir: &Path) -> Result<bool, EmbeddedError> {
        let manifest_path = self.entry.join(CACHE_MANIFEST);
        let manifest = fs::read_to_string(&manifest_path).ok().and_then(|text| TreeSize::parse(&text));
        let Some(expected) = manifest else {
            return Ok(false);
        };
        let mut copied = TreeSize::default();
        match copy_tree(&self.entry.join(DATA_DIR), data_dir, &mut copied) {
            Ok(()) => Ok(copied == expected),
            // Removed under us (a temp-dir cleaner, or a process replacing a damaged entry).
            Err(EmbeddedError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Runs `initdb` in a building dir of our own and renames it into place; a concurrent
    /// builder's entry, if it got there first, is kept and ours removed.
    fn build(&self) -> Result<(), EmbeddedError> {
        let building = create_named_dir(&self.root, "building")?;
        let result = (|| {
            if let Some(run_as) = self.run_as {
                chown_tree(&building, run_as)?;
            }
            let data_dir = building.join(DATA_DIR);
            run_initdb(&self.bindir, self.run_as, &building, &data_dir)?;
            let mut size = TreeSize::default();
            measure_tree(&data_dir, &mut size)?;
            let manifest = building.join(CACHE_MANIFEST);
            fs::write(&manifest, size.to_text()).map_err(io_error(format!("write {}", manifest.display())))?;
            match fs::rename(&building, &self.entry) {
                Ok(()) => Ok(()),
                // Another process renamed its entry into place first: use that one.
                Err(_) if self.entry.join(CACHE_MANIFEST).exists() => Ok(()),
                Err(error) => Err(io_error(format!("rename {} into place", building.display()))(error)),
            }
        })();
        // Gone when the rename succeeded; ours to clean otherwise.
        remove_if_present(&building)?;
        result
    }

    /// Moves a damaged entry aside (one rename, so no reader sees it half removed) and removes it.
    fn discard_entry(&self) -> Result<(), EmbeddedError> {
        let discarded = create_named_dir(&self.root, "discarded")?;
        let moved = discarded.join("entry");
        match fs::rename(&self.entry, &moved) {
            Ok(()) => {}
            // Someone else discarded it already.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error(format!("move {} aside", self.entry.display()))(error)),
        }
        remove_if_present(&discarded)
    }
}

impl TreeSize {
    fn to_text(&self) -> String {
        format!("files {}\nbytes {}\n", self.files, self.bytes)
    }

    fn parse(text: &str) -> Option<TreeSize> {
        let mut lines = text.lines();
        let files = lines.next()?.strip_prefix("files ")?.parse().ok()?;
        let bytes = lines.next()?.strip_prefix("bytes ")?.parse().ok()?;
        Some(TreeSize { files, bytes })
    }
}

/// 64-bit FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases, and the
/// cache outlives a build).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Creates a fresh `<prefix>-<pid>-<n>` dir (mode 0700) in `parent`.
fn create_named_dir(parent: &Path, prefix: &str) -> Result<PathBuf, EmbeddedError> {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("{prefix}-{}-{n}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(io_error(format!("create {}", dir.display()))(error)),
        }
    }
}

/// Copies the tree at `from` to `to` (which must not exist): folders made 0700 (PostgreSQL's
/// own mode for a data dir and what it holds), files with their permission bits, symlinks as
/// symlinks. Counts what it copied into `size`. Ownership is the caller's (`chown_tree`).
fn copy_tree(from: &Path, to: &Path, size: &mut TreeSize) -> Result<(), EmbeddedError> {
    fs::DirBuilder::new().mode(0o700).create(to).map_err(io_error(format!("create {}", to.display())))?;
    let entries = fs::read_dir(from).map_err(io_error(format!("list {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_error(format!("list {}", from.display())))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(io_error(format!("inspect {}", source.display())))?;
        if kind.is_dir() {
            copy_tree(&source, &target, size)?;
        } else if kind.is_symlink() {
            let link = fs::read_link(&source).map_err(io_error(format!("read {}", source.display())))?;
            std::os::unix::fs::symlink(&link, &target).map_err(io_error(format!("link {}", target.display())))?;
            size.files += 1;
        } else {
            size.bytes += fs::copy(&source, &target).map_err(io_error(format!("copy {}", source.display())))?;
            size.files += 1;
        }
    }
    Ok(())
}

/// Counts files (and symlinks) and their bytes under `dir`, as `copy_tree` does.
fn measure_tree(dir: &Path, size: &mut TreeSize) -> Result<(), EmbeddedError> {
    let entries = fs::read_dir(dir).map_err(io_error(format!("list {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_error(format!("list {}", dir.display())))?;
        let kind = entry.file_type().map_err(io_error(format!("inspect {}", entry.path().display())))?;
        if kind.is_dir() {
            measure_tree(&entry.path(), size)?;
        } else {
            size.files += 1;
            if !kind.is_symlink() {
                size.bytes += entry.metadata().map_err(io_error(format!("inspect {}", entry.path().display())))?.len();
            }
        }
    }
    Ok(())
}

/// The `-c name=value` settings for `options`, durability first so the caller can override it.
fn server_settings(options: &EmbeddedOptions) -> Vec<OsString> {
    let mut settings = Vec::new();
    if !options.durable {
        // Losing the last transactions in an OS crash is fine for a throwaway cluster; these
        // make tests and the benchmark measure hookfleet rather than the disk.
        for name in ["fsync", "synchronous_commit", "full_page_writes"] {
            settings.push(OsString::from(format!("{name}=off")));
        }
    }
    for (name, value) in &options.settings {
        settings.push(OsString::from(format!("{name}={value}")));
    }
    settings
}

/// `id -u` says who we are; as root, `id -u/-g postgres` says whom to run the server as.
fn server_user() -> Result<Option<RunAs>, EmbeddedError> {
    let euid = run_id(&["-u"])?.ok_or_else(|| EmbeddedError::Io {
        action: "run `id -u` to find the current user".to_owned(),
        source: io::Error::other("`id -u` failed"),
    })?;
    if euid != 0 {
        return Ok(None);
    }
    let uid = run_id(&["-u", SUPERUSER])?.ok_or(EmbeddedError::PostgresUserMissing)?;
    let gid = run_id(&["-g", SUPERUSER])?.ok_or(EmbeddedError::PostgresUserMissing)?;
    Ok(Some(RunAs { uid, gid }))
}

/// Runs `id <args>`; `None` when it exits unsuccessfully (e.g. no such user).
fn run_id(args: &[&str]) -> Result<Option<u32>, EmbeddedError> {
    let command = format!("id {}", args.join(" "));
    let output =
        Command::new("id").args(args).stdin(Stdio::null()).output().map_err(io_error(format!("run `{command}`")))?;
    if !output.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim().parse().map(Some).map_err(|_| EmbeddedError::CommandFailed {
        command,
        status: output.status,
        output: format!("expected a number, got {:?}", text.trim()),
    })
}

/// Chooses where the temp dir goes: `std::env::temp_dir()` unless the socket path would be too
/// long there, or (when the server runs as `postgres`) that user could not reach it; then /tmp.
fn temp_base(port: u16, runs_as_other_user: bool) -> PathBuf {
    let fallback = PathBuf::from("/tmp");
    [std::env::temp_dir(), fallback.clone()]
        .into_iter()
        .find(|base| socket_path_fits(base, port) && (!runs_as_other_user || reachable_by_others(base)))
        .unwrap_or(fallback)
}

fn socket_path_fits(base: &Path, port: u16) -> bool {
    let longest =
        base.join(format!("hookfleet-pg-{}-{}", u32::MAX, u32::MAX)).join(SOCKET_DIR).join(format!(".s.PGSQL.{port}"));
    longest.as_os_str().len() < MAX_SOCKET_PATH
}

/// Whether every folder on the way to `dir` lets other users pass (o+x).
fn reachable_by_others(dir: &Path) -> bool {
    let Ok(dir) = fs::canonicalize(dir) else {
        return false;
    };
    dir.ancestors()
        .all(|folder| fs::metadata(folder).map(|metadata| metadata.permissions().mode() & 0o001 != 0).unwrap_or(false))
}

/// Creates a fresh `hookfleet-pg-<pid>-<n>` dir (mode 0700) under `base`.
fn create_root_dir(base: &Path) -> Result<PathBuf, EmbeddedError> {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("hookfleet-pg-{}-{n}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            // Left behind by an earlier process that had our pid: never reuse it, take the next.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(io_error(format!("create {}", dir.display()))(error)),
        }
    }
}

fn chown_tree(path: &Path, run_as: RunAs) -> Result<(), EmbeddedError> {
    std::os::unix::fs::lchown(path, Some(run_as.uid), Some(run_as.gid))
        .map_err(io_error(format!("chown {} to postgres", path.display())))?;
    let metadata = fs::symlink_metadata(path).map_err(io_error(format!("inspect {}", path.display())))?;
    if metadata.is_dir() {
        let entries = fs::read_dir(path).map_err(io_error(format!("list {}", path.display())))?;
        for entry in entries {
            let entry = entry.map_err(io_error(format!("list {}", path.display())))?;
            chown_tree(&entry.path(), run_as)?;
        }
    }
    Ok(())
}

fn spawn_watchdog(owner: u32, root_dir: &Path, data_dir: &Path) -> Result<Child, EmbeddedError> {
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("hookfleet-pg-watchdog")
        .arg(owner.to_string())
        .arg(root_dir)
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group, so a Ctrl-C aimed at the owner does not kill the cleaner too.
        .process_group(0)
        .spawn()
        .map_err(io_error("start the embedded PostgreSQL watchdog (sh)"))
}

/// Sends `SIG<signal>` through the shell's `kill` builtin (no libc dependency).
fn send_signal(pid: u32, signal: &str) -> Result<(), EmbeddedError> {
    // A failed kill (the process is already gone) is fine: the caller waits for the exit next.
    Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\" 2>/dev/null", "sh", signal])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .status()
        .map(drop)
        .map_err(io_error(format!("send SIG{signal} to PostgreSQL (pid {pid})")))
}

/// Signals `child` and waits up to `deadline` for it to exit; past that, SIGKILL and an error.
fn stop_process(child: &mut Child, signal: &'static str, deadline: Duration) -> Result<ExitStatus, EmbeddedError> {
    let pid = child.id();
    let wait_error = || io_error(format!("wait for PostgreSQL (pid {pid}) to exit"));
    if let Some(status) = child.try_wait().map_err(wait_error())? {
        return Ok(status);
    }
    send_signal(pid, signal)?;
    let started = Instant::now();
    while started.elapsed() < deadline {
        if let Some(status) = child.try_wait().map_err(wait_error())? {
            return Ok(status);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    // Backends notice the postmaster's death and exit on their own.
    let _ = child.kill();
    child.wait().map_err(wait_error())?;
    Err(EmbeddedError::StopTimeout { signal, waited: deadline })
}

/// Whether `postmaster.pid` belongs to `pid` and its status line (the 8th) says `ready`.
fn postmaster_ready(data_dir: &Path, pid: u32) -> bool {
    let Ok(contents) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = contents.lines().collect();
    lines.first().map(|line| line.trim()) == Some(pid.to_string().as_str())
        && lines.get(7).map(|line| line.trim()) == Some("ready")
}

/// The last lines of the server log, for error messages.
fn log_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 8 * 1024;
    let read = || -> io::Result<String> {
        let mut file = fs::File::open(path)?;
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let first = lines.len().saturating_sub(LOG_TAIL_LINES);
            lines[first..].join("\n")
        }
        Err(error) => format!("(could not read {}: {error})", path.display()),
    }
}

/// Everything `find_bindir` looks at, gathered first so the choice is a pure function.
#[derive(Debug, Default)]
struct BindirSources {
    /// `HOOKFLEET_PG_BINDIR`, if set.
    env_override: Option<PathBuf>,
    /// What `pg_config --bindir` printed, if it ran.
    pg_config_bindir: Option<PathBuf>,
    /// `(version folder name, its bin folder)` for each `/usr/lib/postgresql/<version>`.
    versioned: Vec<(String, PathBuf)>,
}

/// The override wins (and must be valid: a wrong override is an error, not a silent
/// fallback); then `pg_config`, which on a client-only install points at a folder without a
/// server; then the highest installed version.
fn choose_bindir(sources: BindirSources, is_server_bindir: impl Fn(&Path) -> bool) -> Result<PathBuf, EmbeddedError> {
    if let Some(path) = sources.env_override.filter(|p| !p.as_os_str().is_empty()) {
        return if is_server_bindir(&path) { Ok(path) } else { Err(EmbeddedError::BindirOverrideInvalid { path }) };
    }
    let mut looked_at = vec![format!("{BINDIR_ENV} (unset)")];
    match sources.pg_config_bindir {
        Some(path) if is_server_bindir(&path) => return Ok(path),
        Some(path) => looked_at.push(format!("pg_config --bindir ({})", path.display())),
        None => looked_at.push("pg_config --bindir (not available)".to_owned()),
    }
    let mut versioned: Vec<(Vec<u32>, PathBuf)> =
        sources.versioned.into_iter().filter_map(|(name, path)| Some((parse_version(&name)?, path))).collect();
    versioned.sort();
    if let Some((_, path)) = versioned.iter().rev().find(|(_, path)| is_server_bindir(path)) {
        return Ok(path.clone());
    }
    looked_at.push(format!("{DEBIAN_PG_ROOT}/*/bin"));
    Err(EmbeddedError::BindirNotFound { looked_at: looked_at.join(", ") })
}

/// "15" → [15], "9.6" → [9, 6]; anything else is not a version folder.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_server_bindir(path: &Path) -> bool {
    path.join("initdb").is_file() && path.join("postgres").is_file()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !text.is_empty()).then(|| PathBuf::from(text))
}

fn installed_versions(root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, entry.path().join("bin"))
        })
        .collect()
}

fn key_value_connection_string(socket_dir: &Path, port: u16, dbname: &str) -> String {
    format!(
        "host={} port={port} user={SUPERUSER} dbname={}",
        libpq_value(&socket_dir.to_string_lossy()),
        libpq_value(dbname)
    )
}

/// Quotes a libpq key/value value when it needs it (empty, whitespace, quote or backslash).
fn libpq_value(value: &str) -> String {
    let needs_quotes = value.is_empty() || value.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if !needs_quotes {
        return value.to_owned();
    }
    let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
    format!("'{escaped}'")
}

fn url_connection_string(socket_dir: &Path, port: u16, dbname: &str) -> String {
    format!(
        "postgresql://{SUPERUSER}@{}:{port}/{}",
        percent_encode(&socket_dir.to_string_lossy()),
        percent_encode(dbname)
    )
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::NoTls;

    async fn start(options: EmbeddedOptions) -> EmbeddedPostgres {
        tokio::task::spawn_blocking(move || EmbeddedPostgres::start(options))
            .await
            .expect("join start")
            .expect("start embedded PostgreSQL")
    }

    /// Runs a blocking method on a blocking thread, as async callers are meant to.
    async fn blocking<T: Send + 'static>(
        mut server: EmbeddedPostgres,
        f: impl FnOnce(&mut EmbeddedPostgres) -> T + Send + 'static,
    ) -> (EmbeddedPostgres, T) {
        tokio::task::spawn_blocking(move || {
            let result = f(&mut server);
            (server, result)
        })
        .await
        .expect("join blocking call")
    }

    async fn connect(server: &EmbeddedPostgres, dbname: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&server.connection_string(dbname), NoTls)
            .await
            .expect("connect over the Unix socket");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
        client.query_one(&format!("SHOW {setting}"), &[]).await.expect("SHOW").get(0)
    }

    fn process_alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    fn server_pid(server: &EmbeddedPostgres) -> u32 {
        server.child.as_ref().expect("server running").id()
    }

    #[tokio::test]
    async fn starts_a_server_that_accepts_queries_and_creates_databases() {
        let started = Instant::now();
        let server = start(EmbeddedOptions {
            settings: vec![("max_connections".into(), "37".into())],
            ..EmbeddedOptions::default()
        })
        .await;
        eprintln!("EmbeddedPostgres::start took {:?}", started.elapsed());

        let client = connect(&server, "postgres").await;
        let one: i32 = client.query_one("SELECT 1", &[]).await.expect("SELECT 1").get(0);
        assert_eq!(one, 1);
        assert_eq!(show(&client, "fsync").await, "off");
        assert_eq!(show(&client, "synchronous_commit").await, "off");
        assert_eq!(show(&client, "full_page_writes").await, "off");
        assert_eq!(show(&client, "max_connections").await, "37");
        assert_eq!(show(&client, "listen_addresses").await, "");

        client.batch_execute("CREATE DATABASE app").await.expect("CREATE DATABASE");
        let app = connect(&server, "app").await;
        let name: String = app.query_one("SELECT current_database()", &[]).await.expect("current_database").get(0);
        assert_eq!(name, "app");

        // The URL form is what the demo prints for psql; prove psql accepts it.
        let url = server.url("app");
        let output = Command::new(server.bindir().join("psql"))
            .args([url.as_str(), "-XAtc", "SELECT current_database()"])
            .output()
            .expect("run psql");
        assert!(output.status.success(), "psql {url}: {output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "app");
    }

    #[tokio::test]
    async fn stop_server_and_start_again_keep_the_data() {
        let server = start(EmbeddedOptions::default()).await;
        let client = connect(&server, "postgres").await;
        client.batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)").await.expect("create table");
        drop(client);
        let old_pid = server_pid(&server);

        let (server, stopped) = blocking(server, |s| s.stop_server()).await;
        stopped.expect("stop_server");
        assert!(!process_alive(old_pid), "postmaster still running after stop_server");
        assert!(server.data_dir.join("PG_VERSION").exists(), "data dir kept");
        let (server, again) = blocking(server, |s| s.stop_server()).await;
        assert!(matches!(again, Err(EmbeddedError::NotRunning)), "{again:?}");

        let (server, restarted) = blocking(server, |s| s.start_again()).await;
        restarted.expect("start_again");
        let (server, twice) = blocking(server, |s| s.start_again()).await;
        assert!(matches!(twice, Err(EmbeddedError::AlreadyRunning)), "{twice:?}");

        let client = connect(&server, "postgres").await;
        let id: i32 = client.query_one("SELECT id FROM kept", &[]).await.expect("table survives a restart").get(0);
        assert_eq!(id, 7);
    }

    #[tokio::test]
    async fn crash_server_and_start_again_recover_committed_data() {
        let server = start(EmbeddedOptions::default()).await;
        let client = connect(&server, "postgres").await;
        // synchronous_commit is off server-wide; turn it on here so the commit is in the WAL
        // (the OS page cache survives a process crash) before we pull the plug.
        client
            .batch_execute(
                "SET synchronous_commit = on; CREATE TABLE survivor (id int); \
                 INSERT INTO survivor VALUES (42)",
            )
            .await
            .expect("create table");
        drop(client);

        let (server, crashed) = blocking(server, |s| s.crash_server()).await;
        crashed.expect("crash_server");
        let (server, restarted) = blocking(server, |s| s.start_again()).await;
        restarted.expect("start_again after a crash");

        let log = fs::read_to_string(&server.log_path).expect("read server log");
        assert!(log.contains("was not properly shut down"), "expected crash recovery in the log:\n{log}");
        let client = connect(&server, "postgres").await;
        let id: i32 =
            client.query_one("SELECT id FROM survivor", &[]).await.expect("committed row survives a crash").get(0);
        assert_eq!(id, 42);
    }

    #[tokio::test]
    async fn drop_stops_the_server_and_removes_the_temp_dir() {
        let server = start(EmbeddedOptions::default()).await;
        let pid = server_pid(&server);
        let root_dir = server.root_dir.clone();
        assert!(root_dir.exists());
        assert!(
            server.socket_dir().as_os_str().len() + ".s.PGSQL.5432".len() < MAX_SOCKET_PATH,
            "socket path too long: {}",
            server.socket_dir().display()
        );

        tokio::task::spawn_blocking(move || drop(server)).await.expect("join drop");
        assert!(!root_dir.exists(), "{} left behind", root_dir.display());
        assert!(!process_alive(pid), "postmaster {pid} still running");
    }

    /// A cache folder of its own for one test (removed on drop), where the cache would go.
    struct TestCache(PathBuf);

    impl TestCache {
        fn new() -> Self {
            static SEQUENCE: AtomicU32 = AtomicU32::new(0);
            let root = temp_base(DEFAULT_PORT, server_user().expect("id").is_some()).join(format!(
                "hookfleet-initdb-cache-test-{}-{}",
                std::process::id(),
                SEQUENCE.fetch_add(1, Ordering::Relaxed)
            ));
            TestCache(root)
        }

        async fn start(&self) -> EmbeddedPostgres {
            let root = self.0.clone();
            tokio::task::spawn_blocking(move || {
                EmbeddedPostgres::start_on_port(
                    EmbeddedOptions::default(),
                    DEFAULT_PORT,
                    DataSource::Cache { root: Some(root) },
                )
            })
            .await
            .expect("join start")
            .expect("start from the initdb cache")
        }

        /// The cache's entries and anything else in its folder.
        fn contents(&self) -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&self.0)
                .expect("cache folder")
                .map(|entry| entry.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }

        fn entry(&self) -> PathBuf {
            let names = self.contents();
            assert_eq!(names.len(), 1, "one entry and nothing left over: {names:?}");
            self.0.join(&names[0])
        }
    }

    impl Drop for TestCache {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    async fn system_identifier(server: &EmbeddedPostgres) -> i64 {
        connect(server, "postgres")
            .await
            .query_one("SELECT system_identifier FROM pg_control_system()", &[])
            .await
            .expect("pg_control_system")
            .get(0)
    }

    /// Each start gets a cluster of its own, copied from the one `initdb` made (same system
    /// identifier, unlike a plain start's), 0700 and owned by the server user.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starts_from_the_initdb_cache_copy_one_initdb_into_clusters_of_their_own() {
        let cache = TestCache::new();
        let first = cache.start().await;
        let entry = cache.entry();
        assert!(entry.file_name().expect("name").to_string_lossy().starts_with("pg"), "{}", entry.display());
        let second = cache.start().await;
        assert_eq!(cache.entry(), entry, "the second start used the first one's entry");
        let plain = start(EmbeddedOptions::default()).await;

        let (a, b) = (system_identifier(&first).await, system_identifier(&second).await);
        assert_eq!(a, b, "both are copies of one initdb");
        assert_ne!(a, system_identifier(&plain).await, "a plain start runs initdb");
        connect(&first, "postgres").await.batch_execute("CREATE TABLE only_in_first (id int)").await.expect("create");
        let missing = connect(&second, "postgres").await.query_one("SELECT 'only_in_first'::regclass::text", &[]).await;
        assert!(missing.is_err(), "the copies are separate clusters");
        assert!(connect(&first, "postgres")
            .await
            .query_one("SELECT 'only_in_first'::regclass::text", &[])
            .await
            .is_ok());

        let expected_owner = server_user().expect("id").map(|run_as| run_as.uid);
        for server in [&first, &second] {
            let metadata = fs::metadata(&server.data_dir).expect("data dir");
            assert_eq!(metadata.permissions().mode() & 0o777, 0o700);
            let control = fs::metadata(server.data_dir.join("global/pg_control")).expect("pg_control");
            if let Some(uid) = expected_owner {
                use std::os::unix::fs::MetadataExt;
                assert_eq!((metadata.uid(), control.uid()), (uid, uid), "owned by the server user");
            }
        }
        // The entry is never started: no server files in it.
        assert!(!entry.join(DATA_DIR).join("postmaster.pid").exists());
        assert!(!entry.join(DATA_DIR).join("postmaster.opts").exists());
    }

    /// A cache entry a temp-dir cleaner thinned out is noticed, replaced, and the start works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_initdb_cache_entry_is_rebuilt() {
        let cache = TestCache::new();
        drop(cache.start().await);
        let entry = cache.entry();
        let control = entry.join(DATA_DIR).join("global/pg_control");
        fs::remove_file(&control).expect("damage the entry");
        let server = cache.start().await;
        assert_eq!(cache.entry(), entry);
        assert!(control.exists(), "rebuilt");
        let one: i32 = connect(&server, "postgres").await.query_one("SELECT 1", &[]).await.expect("query").get(0);
        assert_eq!(one, 1);
        let next = cache.start().await;
        assert_eq!(system_identifier(&server).await, system_identifier(&next).await, "copied from the rebuilt entry");
    }

    /// Test binaries start at the same moment: the first builds race, one entry wins, all start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_starts_from_the_initdb_cache_all_work_and_leave_one_entry() {
        let cache = TestCache::new();
        let (a, b, c) = tokio::join!(cache.start(), cache.start(), cache.start());
        let _entry = cache.entry();
        let identifiers = [system_identifier(&a).await, system_identifier(&b).await, system_identifier(&c).await];
        assert!(identifiers.iter().all(|id| *id == identifiers[0]), "all copies of the winning entry: {identifiers:?}");
    }

    /// The cache sits in a shared temp dir and becomes a superuser's cluster: a folder that
    /// others may write is refused, and the start falls back to initdb.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_initdb_cache_folder_others_may_write_is_not_used() {
        let cache = TestCache::new();
        fs::DirBuilder::new().mode(0o777).create(&cache.0).expect("create");
        fs::set_permissions(&cache.0, fs::Permissions::from_mode(0o777)).expect("chmod");
        let refused = InitdbCache::new(cache.0.clone(), &EmbeddedPostgres::find_bindir().expect("bindir"), None);
        assert!(refused.is_err());
        let server = cache.start().await;
        assert!(cache.contents().is_empty(), "nothing was built in it: {:?}", cache.contents());
        let one: i32 = connect(&server, "postgres").await.query_one("SELECT 1", &[]).await.expect("query").get(0);
        assert_eq!(one, 1);
    }

    #[test]
    fn the_initdb_cache_key_names_the_major_version_and_changes_with_the_owner() {
        let bindir = EmbeddedPostgres::find_bindir().expect("bindir");
        let as_self = InitdbCache::key(&bindir, None).expect("key");
        let as_other = InitdbCache::key(&bindir, Some(RunAs { uid: 4242, gid: 4242 })).expect("key");
        assert_ne!(as_self, as_other);
        assert_eq!(as_self, InitdbCache::key(&bindir, None).expect("key"), "stable");
        let major = bindir.parent().and_then(Path::file_name).map(|name| name.to_string_lossy().into_owned());
        if let Some(major) = major.filter(|name| name.chars().all(|c| c.is_ascii_digit())) {
            assert!(as_self.starts_with(&format!("pg{major}-")), "{as_self}");
        }
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[tokio::test]
    async fn two_servers_run_side_by_side_without_clashing() {
        let (first, second) = tokio::join!(
            start(EmbeddedOptions::default()),
            start(EmbeddedOptions { durable: true, ..EmbeddedOptions::default() })
        );
        assert_eq!(first.port(), second.port(), "same port, private sockets");
        assert_ne!(first.socket_dir(), second.socket_dir());

        let a = connect(&first, "postgres").await;
        let b = connect(&second, "postgres").await;
        a.batch_execute("CREATE TABLE only_in_first (id int)").await.expect("create in first");
        let missing = b.query_one("SELECT 'only_in_first'::regclass::text", &[]).await;
        assert!(missing.is_err(), "the second server sees the first one's table");
        assert_eq!(show(&a, "fsync").await, "off");
        assert_eq!(show(&b, "fsync").await, "on", "durable keeps the defaults");
    }

    #[tokio::test]
    async fn watchdog_stops_the_server_when_the_owner_exits() {
        let mut owner = Command::new("sleep").arg("0.2").spawn().expect("spawn sleep");
        let server =
            start(EmbeddedOptions { stop_when_process_exits: Some(owner.id()), ..EmbeddedOptions::default() }).await;
        let pid = server_pid(&server);
        let root_dir = server.root_dir.clone();
        owner.wait().expect("reap the owner");

        let deadline = Instant::now() + Duration::from_secs(20);
        while (root_dir.exists() || process_alive_unreaped(pid)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!root_dir.exists(), "watchdog did not remove {}", root_dir.display());
        assert!(!process_alive_unreaped(pid), "watchdog did not stop {pid}");
        // Dropping after the watchdog cleaned up must be quiet and complete.
        tokio::task::spawn_blocking(move || drop(server)).await.expect("join drop");
        assert!(!process_alive(pid));
    }

    /// Our child stays a zombie until we reap it; count a zombie as gone.
    fn process_alive_unreaped(pid: u32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn a_server_that_fails_to_start_reports_its_log() {
        let result = tokio::task::spawn_blocking(|| {
            EmbeddedPostgres::start(EmbeddedOptions {
                settings: vec![("no_such_setting".into(), "1".into())],
                ..EmbeddedOptions::default()
            })
        })
        .await
        .expect("join start");
        match result {
            Err(EmbeddedError::ServerExited { log_tail, .. }) => {
                assert!(log_tail.contains("no_such_setting"), "{log_tail}")
            }
            other => panic!("expected ServerExited, got {other:?}"),
        }
    }

    #[test]
    fn find_bindir_finds_this_machines_server() {
        let bindir = EmbeddedPostgres::find_bindir().expect("server binaries installed");
        assert!(is_server_bindir(&bindir), "{}", bindir.display());
    }

    fn has_server(valid: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |path| valid.iter().any(|v| Path::new(v) == path)
    }

    #[test]
    fn bindir_override_wins_over_everything() {
        let sources = BindirSources {
            env_override: Some("/opt/pg/bin".into()),
            pg_config_bindir: Some("/usr/lib/postgresql/15/bin".into()),
            versioned: vec![("15".into(), "/usr/lib/postgresql/15/bin".into())],
        };
        let chosen = choose_bindir(sources, has_server(&["/opt/pg/bin", "/usr/lib/postgresql/15/bin"]));
        assert_eq!(chosen.expect("override"), PathBuf::from("/opt/pg/bin"));
    }

    #[test]
    fn bindir_override_without_a_server_is_an_error_not_a_fallback() {
        let sources = BindirSources {
            env_override: Some("/nowhere".into()),
            versioned: vec![("15".into(), "/usr/lib/postgresql/15/bin".into())],
            ..BindirSources::default()
        };
        let error = choose_bindir(sources, has_server(&["/usr/lib/postgresql/15/bin"])).expect_err("invalid override");
        assert!(matches!(error, EmbeddedError::BindirOverrideInvalid { .. }));
        assert!(error.to_string().contains("HOOKFLEET_PG_BINDIR=/nowhere"), "{error}");
    }

    #[test]
    fn empty_bindir_override_counts_as_unset() {
        let sources = BindirSources {
            env_override: Some("".into()),
            pg_config_bindir: Some("/usr/lib/postgresql/15/bin".into()),
            ..BindirSources::default()
        };
        let chosen = choose_bindir(sources, has_server(&["/usr/lib/postgresql/15/bin"]));
        assert_eq!(chosen.expect("pg_config"), PathBuf::from("/usr/lib/postgresql/15/bin"));
    }

    #[test]
    fn bindir_from_pg_config_when_it_holds_a_server() {
        let sources = BindirSources {
            pg_config_bindir: Some("/usr/lib/postgresql/15/bin".into()),
            versioned: vec![("16".into(), "/usr/lib/postgresql/16/bin".into())],
            ..BindirSources::default()
        };
        let chosen = choose_bindir(sources, has_server(&["/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin"]));
        assert_eq!(chosen.expect("pg_config"), PathBuf::from("/usr/lib/postgresql/15/bin"));
    }

    #[test]
    fn bindir_falls_back_to_the_highest_installed_version() {
        // pg_config from libpq-dev points at /usr/bin, which has no server.
        let sources = BindirSources {
            pg_config_bindir: Some("/usr/bin".into()),
            versioned: vec![
                ("9.6".into(), "/pg/9.6/bin".into()),
                ("16".into(), "/pg/16/bin".into()),
                ("10".into(), "/pg/10/bin".into()),
                ("17".into(), "/pg/17/bin".into()),
                ("README".into(), "/pg/README/bin".into()),
            ],
            ..BindirSources::default()
        };
        // 17 is a client-only leftover: no server binaries.
        let chosen = choose_bindir(sources, has_server(&["/pg/9.6/bin", "/pg/10/bin", "/pg/16/bin"]));
        assert_eq!(chosen.expect("highest"), PathBuf::from("/pg/16/bin"));
    }

    #[test]
    fn no_bindir_error_says_how_to_install() {
        let sources = BindirSources { pg_config_bindir: Some("/usr/bin".into()), ..BindirSources::default() };
        let error = choose_bindir(sources, |_| false).expect_err("nothing installed");
        let message = error.to_string();
        assert!(message.contains("apt-get install -y postgresql"), "{message}");
        assert!(message.contains("/usr/bin"), "{message}");
    }

    #[test]
    fn connection_strings_name_the_socket_dir() {
        let dir = Path::new("/tmp/hookfleet-pg-1-0/s");
        assert_eq!(
            key_value_connection_string(dir, 5432, "app"),
            "host=/tmp/hookfleet-pg-1-0/s port=5432 user=postgres dbname=app"
        );
        assert_eq!(
            url_connection_string(dir, 5432, "app"),
            "postgresql://postgres@%2Ftmp%2Fhookfleet-pg-1-0%2Fs:5432/app"
        );
        let odd = key_value_connection_string(Path::new("/tmp/a b/s"), 5432, "it's");
        assert_eq!(odd, r"host='/tmp/a b/s' port=5432 user=postgres dbname='it\'s'");
        let config: tokio_postgres::Config = odd.parse().expect("tokio-postgres parses it");
        assert_eq!(config.get_dbname(), Some("it's"));
    }
}
