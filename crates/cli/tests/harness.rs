//! The test harness's own promises that need the real `hookfleet-worker` binary (built beside
//! `hookfleet` by `cargo test --workspace`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hookfleet_test_support::{database, WorkerProcess};

fn worker_binary() -> PathBuf {
    let worker = Path::new(env!("CARGO_BIN_EXE_hookfleet")).with_file_name("hookfleet-worker");
    assert!(worker.exists(), "{} is missing: run the tests with `cargo test --workspace`", worker.display());
    worker
}

/// `WorkerProcess::spawn` picks a free port and releases it before the worker binds it; when
/// another socket takes it in between, the worker is started again on another port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_metrics_port_was_taken_is_started_again_on_another() {
    let db = database().await;
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = squatter.local_addr().expect("addr");

    let worker = WorkerProcess::spawn_preferring(&worker_binary(), &db, "w-moved", &[], taken);
    assert_ne!(worker.metrics_addr, taken, "the worker moved to another port");
    let (status, body) = worker.get("/healthz").await.unwrap_or_else(|| panic!("no /healthz:\n{}", worker.log()));
    assert_eq!(status, 200, "{body}");
    assert!(!worker.log().contains("cannot listen"), "the log is the running worker's own:\n{}", worker.log());

    // What the retry recognises: the worker's own report of a taken METRICS_ADDR (an address the
    // test sets is used as given, so this one exits).
    let fixed = taken.to_string();
    let mut refused = WorkerProcess::spawn(&worker_binary(), &db, "w-fixed", &[("METRICS_ADDR", &fixed)]);
    let exit = refused.wait(Duration::from_secs(30)).await;
    let log = refused.log();
    assert!(!exit.success(), "{log}");
    assert!(log.contains(&format!("cannot listen on METRICS_ADDR {taken}")) && log.contains("in use"), "{log}");
    drop(squatter);
}
