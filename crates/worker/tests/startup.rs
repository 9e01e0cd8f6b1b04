//! Start-up as a new user meets it: `--help` and `--version` answer without a database, and a
//! worker refuses a database it cannot work with (never migrated, behind its migrations,
//! migrated by another build, or by a newer release that no longer accepts it) with one message
//! that says what to do, while a newer schema that still accepts it runs with a warning. A
//! database that is not up yet is waited for, for a bounded while.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use hookfleet_test_support::{database, empty_database, free_loopback_addr, TestDatabase, WorkerProcess};

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

/// Long enough for a loaded machine; a refusal takes one connection and two queries.
const PROMPTLY: Duration = Duration::from_secs(20);

/// Runs the worker binary with `args` and only `env` (no database unless given), bounded.
fn run(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut child = Command::new(worker_binary())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hookfleet-worker");
    let deadline = std::time::Instant::now() + PROMPTLY;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("hookfleet-worker {args:?} still running after {PROMPTLY:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Starts a worker on `db`, waits for it to exit; its status and log.
async fn refused(db: &TestDatabase, overrides: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut worker = WorkerProcess::spawn(worker_binary(), db, "startup", overrides);
    let status = worker.wait(PROMPTLY).await;
    (status, worker.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_database_that_was_never_migrated_and_says_so_once() {
    let db = empty_database().await;
    for format in ["pretty", "json"] {
        let (status, log) = refused(&db, &[("LOG_FORMAT", format)]).await;
        assert!(!status.success(), "{format}: exited {status}:\n{log}");
        assert_eq!(log.matches("no hookfleet schema").count(), 1, "{format}: said once:\n{log}");
        assert_eq!(log.matches("run `hookfleet migrate`").count(), 1, "{format}: said once:\n{log}");
        assert!(log.contains(&db.name), "{format}: names the database:\n{log}");
        assert!(!log.contains("claim failed"), "{format}: never claims:\n{log}");
        if format == "json" {
            for line in log.lines().filter(|line| !line.trim().is_empty()) {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|error| panic!("not a JSON log line ({error}): {line}"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_database_behind_its_migrations() {
    let db = database().await;
    let client = db.client().await;
    let newest = client
        .query_one(
            "DELETE FROM hookfleet.refinery_schema_history \
             WHERE version = (SELECT max(version) FROM hookfleet.refinery_schema_history) RETURNING version, name",
            &[],
        )
        .await
        .expect("forget the newest migration");
    let (version, name): (i32, String) = (newest.get(0), newest.get(1));
    let (status, log) = refused(&db, &[]).await;
    assert!(!status.success(), "exited {status}:\n{log}");
    assert!(log.contains(&format!("V{version:04}__{name} not applied")), "names the migration:\n{log}");
    assert_eq!(log.matches("run `hookfleet migrate` from this release").count(), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_database_migrated_by_a_different_build() {
    let db = database().await;
    db.client()
        .await
        .batch_execute("UPDATE hookfleet.refinery_schema_history SET checksum = '42' WHERE version = 1")
        .await
        .expect("another build's V0001");
    let (status, log) = refused(&db, &[]).await;
    assert!(!status.success(), "exited {status}:\n{log}");
    assert_eq!(log.matches("a different hookfleet build migrated this database").count(), 1, "{log}");
    assert!(log.contains("checksum 42"), "shows what the database recorded:\n{log}");
}

/// Records a migration newer than any this build has, as a later release's `migrate` would.
async fn migrate_from_the_future(db: &TestDatabase) -> i32 {
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO hookfleet.refinery_schema_history (version, name, applied_on, checksum) \
             VALUES (9999, 'from_a_later_release', '2030-01-01T00:00:00Z', '1')",
        )
        .await
        .expect("a later release's migration");
    9999
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_with_a_warning_against_a_newer_schema_that_still_accepts_it() {
    let db = database().await;
    migrate_from_the_future(&db).await;
    let worker = WorkerProcess::spawn(worker_binary(), &db, "older", &[]);
    hookfleet_test_support::eventually(Duration::from_secs(30), "the older worker to register", || async {
        (db.count("SELECT count(*) FROM hookfleet.workers WHERE worker_id = 'older'").await == 1).then_some(())
    })
    .await;
    let log = worker.log();
    assert!(log.contains("newer than this hookfleet-worker's"), "warns:\n{log}");
    assert!(log.contains("worker started"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_newer_schema_whose_floor_is_above_it() {
    let db = database().await;
    let future = migrate_from_the_future(&db).await;
    db.client()
        .await
        .execute(
            "UPDATE hookfleet.settings SET value = $1 WHERE name = 'oldest_compatible_migration'",
            &[&future.to_string()],
        )
        .await
        .expect("the later release raised the floor");
    let (status, log) = refused(&db, &[]).await;
    assert!(!status.success(), "exited {status}:\n{log}");
    assert_eq!(log.matches("binaries before schema V9999 cannot work with").count(), 1, "{log}");
    assert!(log.contains("run hookfleet-worker from the release that ran `hookfleet migrate`"), "{log}");
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.workers").await, 0, "never registered");
}

#[test]
fn help_and_version_answer_without_a_database() {
    // A database nothing listens on: answering must not try it.
    let env = [("DATABASE_URL", "postgresql://hookfleet@127.0.0.1:1/none")];
    for flag in ["--help", "-h"] {
        let (status, stdout, stderr) = run(&[flag], &env);
        assert!(status.success(), "{flag}: {status} {stdout}{stderr}");
        for needed in ["hookfleet-worker", "environment", "hookfleet settings", "--version"] {
            assert!(stdout.contains(needed), "{flag}: {needed:?} missing from:\n{stdout}");
        }
        assert!(stderr.is_empty(), "{flag}: {stderr}");
    }
    for flag in ["--version", "-V"] {
        let (status, stdout, stderr) = run(&[flag], &env);
        assert!(status.success(), "{flag}: {status} {stdout}{stderr}");
        assert_eq!(stdout, format!("hookfleet-worker {}\n", env!("CARGO_PKG_VERSION")), "{flag}");
    }
}

#[test]
fn an_unknown_argument_is_a_usage_error() {
    let env = [("DATABASE_URL", "postgresql://hookfleet@127.0.0.1:1/none")];
    for args in [&["--bogus"][..], &["run"][..]] {
        let (status, stdout, stderr) = run(args, &env);
        assert_eq!(status.code(), Some(2), "{args:?}: {status} {stdout}{stderr}");
        assert!(stderr.contains("--help"), "{args:?} points to --help: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_a_bounded_while_for_a_database_that_is_not_up() {
    // Nothing listens there: refused connections, as while PostgreSQL is starting.
    let addr = free_loopback_addr();
    let nowhere = TestDatabase {
        name: "nowhere".into(),
        url: format!("host={} port={} user=postgres dbname=nowhere", addr.ip(), addr.port()),
    };
    let mut worker = WorkerProcess::spawn(worker_binary(), &nowhere, "patient", &[]);
    let status = worker.wait(Duration::from_secs(60)).await;
    let log = worker.log();
    assert!(!status.success(), "exited {status}:\n{log}");
    assert!(log.matches("trying again").count() >= 2, "kept trying, saying so:\n{log}");
    assert_eq!(log.matches("cannot reach the database after trying for").count(), 1, "gave up once:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_pointed_at_a_database_that_does_not_exist_exits_at_once() {
    let db = database().await;
    let missing = TestDatabase { name: "missing".into(), url: format!("{} dbname=hookfleet_missing", db.url) };
    let (status, log) = refused(&missing, &[]).await;
    assert!(!status.success(), "exited {status}:\n{log}");
    assert!(log.contains("\"hookfleet_missing\" does not exist"), "{log}");
    assert!(!log.contains("trying again"), "not retried: it will not fix itself:\n{log}");
}
