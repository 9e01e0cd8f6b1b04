//! `hookfleet webhooks create --rate-limit-burst N --max-in-flight N`: the README says these flags
//! set columns of `hookfleet.webhooks` and that an unset flag leaves the fleet's setting in force.
//! The JSON the command prints is not enough: the claim reads the columns, so the test reads them.

use std::collections::HashMap;
use std::process::{Command, Output};

use hookfleet_test_support::database;

fn hookfleet(env: &HashMap<String, String>, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hookfleet"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .args(args)
        .output()
        .expect("run hookfleet")
}

fn created_webhook_id(output: Output) -> i64 {
    assert!(
        output.status.success(),
        "hookfleet failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let webhook: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    webhook["webhook_id"].as_i64().expect("webhook_id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_burst_and_max_in_flight_flags_are_stored_in_the_webhook() {
    let db = database().await;
    let env = db.env();
    let with_flags = created_webhook_id(hookfleet(
        &env,
        &[
            "webhooks",
            "create",
            "--url",
            "http://127.0.0.1:9/flags",
            "--rate-limit-rps",
            "20",
            "--rate-limit-burst",
            "7",
            "--max-in-flight",
            "3",
        ],
    ));
    let without_flags =
        created_webhook_id(hookfleet(&env, &["webhooks", "create", "--url", "http://127.0.0.1:9/plain"]));

    let client = db.client().await;
    let columns = |webhook_id: i64| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT rate_limit_burst::bigint, max_in_flight::bigint FROM hookfleet.webhooks WHERE webhook_id = $1",
                    &[&webhook_id],
                )
                .await
                .expect("webhook row");
            (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
        }
    };
    assert_eq!(columns(with_flags).await, (Some(7), Some(3)), "the flags' values are in the row the claim reads");
    // Unset means the fleet's settings (RATE_LIMIT_RPS's burst, no fleet-wide cap): NULL, not a default copied in.
    assert_eq!(columns(without_flags).await, (None, None));
}
