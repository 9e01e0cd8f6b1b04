//! README "Metrics and probes", observed on a running `hookfleet-worker`: every metric the README
//! names appears on `/metrics` with the labels it names and a value the scenario explains, and
//! every hookfleet metric on `/metrics` is one the README names. The scenario gives each metric a
//! cause: deliveries that succeed, retry and die; a webhook held back by its rate limit; an open
//! circuit with due rows waiting behind it; an attempt held open (in flight, in the depth sample)
//! whose webhook is deleted meanwhile (a lost lease); webhook loads that fail (a database error).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use hookfleet_core::webhooks::{NewWebhook, WebhookView};
use hookfleet_test_support::{database, metric_value, Receiver, Reply, TestDatabase, WorkerProcess};

const DEADLINE: Duration = Duration::from_secs(30);
/// How long the receiver holds the attempt whose webhook is deleted: over two 5 s depth samples.
const HOLD: Duration = Duration::from_secs(11);

fn worker_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hookfleet-worker"))
}

async fn webhook(db: &TestDatabase, new: NewWebhook) -> WebhookView {
    db.create_webhook(NewWebhook { enabled: true, ..new }).await
}

/// The metrics README's "Metrics and probes" paragraph names: each backticked `name{labels}` or
/// `name` with a hookfleet prefix, label names (`webhook_id`) excepted; name → label names.
fn readme_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let readme = include_str!("../../../README.md");
    let start = readme.find("### Metrics and probes").expect("README has a \"Metrics and probes\" section");
    let section = &readme[start..];
    let paragraph = &section[..section.find("\n\n").unwrap_or(section.len())];
    let mut named = BTreeMap::new();
    for (index, token) in paragraph.split('`').enumerate() {
        // Odd pieces are inside backticks.
        if index % 2 == 0 {
            continue;
        }
        let (name, labels) = match token.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').unwrap_or(labels)),
            None => (token, ""),
        };
        let is_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        if is_name && ["webhook_", "worker_", "hookfleet_"].iter().any(|prefix| name.starts_with(prefix)) {
            let labels: BTreeSet<String> = labels.split(',').filter(|l| !l.is_empty()).map(str::to_owned).collect();
            named.insert(name.to_owned(), labels);
        }
    }
    let label_names: BTreeSet<String> = named.values().flatten().cloned().collect();
    named.retain(|name, _| !label_names.contains(name));
    named
}

/// Every metric family on an exposition (`# TYPE` lines): name → type.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect()
}

/// The label names of every sample of family `name` (a histogram's `_bucket`, `_sum`, `_count`
/// included, `le` left out).
fn sample_labels(exposition: &str, name: &str) -> Vec<BTreeSet<String>> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let series = line.split_whitespace().next()?;
            let (family, labels) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| family.strip_suffix(suffix).filter(|base| *base == name))
                .unwrap_or(family);
            (family == name).then(|| {
                labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|pair| pair.split_once('=').map(|(label, _)| label.to_owned()))
                    .filter(|label| label != "le")
                    .collect()
            })
        })
        .collect()
}

/// The values label `label` takes in the samples of family `name`.
fn label_values(exposition: &str, name: &str, label: &str) -> BTreeSet<String> {
    let prefix = format!("{name}{{");
    let key = format!("{label}=\"");
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|labels| {
            let start = labels.find(&key)? + key.len();
            let value = &labels[start..];
            Some(value[..value.find('"')?].to_owned())
        })
        .collect()
}

/// Waits until the worker's `/metrics` satisfies `check`; the exposition then. On timeout, the
/// panic shows the last exposition, so a missing series is visible.
async fn metrics_until(worker: &WorkerProcess, what: &str, check: impl Fn(&str) -> bool) -> String {
    let until = std::time::Instant::now() + DEADLINE;
    let mut last = String::new();
    loop {
        if let Some((_, body)) = worker.get("/metrics").await {
            if check(&body) {
                return body;
            }
            last = body;
        }
        assert!(std::time::Instant::now() < until, "timed out waiting for {what}; last /metrics:\n{last}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn at_least(body: &str, series: &str, least: f64) -> bool {
    metric_value(body, series).is_some_and(|value| value >= least)
}

#[test]
fn the_readme_names_the_metrics_this_test_expects() {
    let named = readme_metrics();
    // A guard on the parser, not on the product: the paragraph is found and read.
    assert!(named.len() >= 14, "too few metric names parsed from README: {named:?}");
    assert_eq!(
        named.get("webhook_deliveries_total"),
        Some(&BTreeSet::from(["status".to_owned(), "webhook_id".to_owned()]))
    );
    assert!(!named.contains_key("webhook_id"), "label names are not metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_metric_is_exported_with_a_meaningful_value_and_no_other() {
    let db = database().await;
    let ok = Receiver::ok().await;
    let failing = Receiver::start(|_, _| Reply::status(500)).await;
    let holding = Receiver::start(|_, _| Reply::status(200).after(HOLD)).await;
    let delivered = webhook(&db, NewWebhook { url: ok.url("/ok"), ..Default::default() }).await;
    // Fails twice: a retry, then dead; its circuit (default threshold 5) stays closed.
    let retried =
        webhook(&db, NewWebhook { url: failing.url("/retried"), max_retries: Some(1), ..Default::default() }).await;
    // One failure opens its circuit for a minute; its other rows wait, due, behind it.
    let opened = webhook(
        &db,
        NewWebhook {
            url: failing.url("/opened"),
            max_retries: Some(0),
            circuit_breaker_failure_threshold: Some(1),
            ..Default::default()
        },
    )
    .await;
    let limited = webhook(
        &db,
        NewWebhook {
            url: ok.url("/limited"),
            rate_limit_rps: Some(1.0),
            rate_limit_burst: Some(1),
            ..Default::default()
        },
    )
    .await;
    let doomed = webhook(&db, NewWebhook { url: holding.url("/doomed"), ..Default::default() }).await;
    // Attempts may last the whole hold; the lease outlives them.
    let worker = WorkerProcess::spawn(
        worker_binary(),
        &db,
        "w-observed",
        &[("HTTP_TIMEOUT", "20s"), ("HOOKFLEET_LEASE", "40s")],
    );
    let client = db.client().await;

    // A database error: loading a webhook fails while its column is away.
    client
        .batch_execute("ALTER TABLE hookfleet.webhooks RENAME COLUMN url_encrypted TO url_encrypted_away")
        .await
        .expect("break the webhook load");
    let first = db.insert_delivery(delivered.webhook_id, "{}").await;
    let load_errors = "hookfleet_database_errors_total{operation=\"load_webhooks\"}";
    metrics_until(&worker, "a failed webhook load counted", |body| at_least(body, load_errors, 1.0)).await;
    client
        .batch_execute("ALTER TABLE hookfleet.webhooks RENAME COLUMN url_encrypted_away TO url_encrypted")
        .await
        .expect("mend the webhook load");
    db.wait_for_status(first, "delivered").await;

    db.insert_deliveries(delivered.webhook_id, 4).await;
    let dying = db.insert_delivery(retried.webhook_id, "{}").await;
    let opening = db.insert_delivery(opened.webhook_id, "{}").await;
    db.wait_for_status(dying, "dead").await;
    db.wait_for_status(opening, "dead").await;
    // Inserted after its circuit opened: these wait, due and pending, for the minute it stays open.
    db.insert_deliveries(opened.webhook_id, 2).await;
    db.insert_deliveries(limited.webhook_id, 5).await;
    let held = db.insert_delivery(doomed.webhook_id, "{}").await;

    // While the held attempt is out: it is in flight in the worker and in the fleet's sample.
    let id = |hook: &WebhookView| hook.webhook_id;
    let during = metrics_until(&worker, "the held attempt in flight, in the depth sample", |body| {
        at_least(body, "worker_in_flight", 1.0)
            && at_least(body, "worker_slots_held", 1.0)
            && at_least(body, "webhook_queue_depth{status=\"in_flight\"}", 1.0)
            && at_least(body, "webhook_queue_depth{status=\"pending\"}", 1.0)
            && at_least(body, "webhook_queue_depth{status=\"dead\"}", 1.0)
            && at_least(body, "webhook_queue_oldest_due_age_seconds", 0.001)
            && metric_value(body, &format!("webhook_circuit_state{{webhook_id=\"{}\"}}", id(&opened))) == Some(1.0)
    })
    .await;
    assert_eq!(db.delivery(held).await.0, "in_flight", "the sample above was taken while the attempt was out");
    // Deleting the webhook takes its row: the attempt's write-back will match nothing.
    client.execute("DELETE FROM hookfleet.webhooks WHERE webhook_id = $1", &[&id(&doomed)]).await.expect("delete");
    let after = metrics_until(&worker, "the lost lease counted", |body| {
        metric_value(body, "webhook_lease_lost_total") == Some(1.0)
            && at_least(body, &format!("webhook_rate_limited_total{{webhook_id=\"{}\"}}", id(&limited)), 1.0)
    })
    .await;

    let expectations: Vec<(&str, String, f64)> = vec![
        (
            "delivered",
            format!("webhook_deliveries_total{{status=\"delivered\",webhook_id=\"{}\"}}", id(&delivered)),
            5.0,
        ),
        ("a retry", format!("webhook_deliveries_total{{status=\"retry\",webhook_id=\"{}\"}}", id(&retried)), 1.0),
        ("dead", format!("webhook_deliveries_total{{status=\"dead\",webhook_id=\"{}\"}}", id(&retried)), 1.0),
        ("dead", format!("webhook_deliveries_total{{status=\"dead\",webhook_id=\"{}\"}}", id(&opened)), 1.0),
        ("retries", format!("webhook_retries_total{{webhook_id=\"{}\"}}", id(&retried)), 1.0),
        ("durations", format!("webhook_delivery_duration_seconds_count{{webhook_id=\"{}\"}}", id(&delivered)), 5.0),
        ("durations", format!("webhook_delivery_duration_seconds_sum{{webhook_id=\"{}\"}}", id(&delivered)), 1e-6),
        ("claims timed", "webhook_claim_duration_seconds_count".to_owned(), 1.0),
        ("claims timed", "webhook_claim_duration_seconds_sum".to_owned(), 1e-6),
        ("health", "worker_health_status{worker_id=\"w-observed\"}".to_owned(), 1.0),
        ("a database error", load_errors.to_owned(), 1.0),
        ("build", format!("hookfleet_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1.0),
        ("process", "process_resident_memory_bytes".to_owned(), 1.0),
        ("process", "process_cpu_seconds_total".to_owned(), 0.0),
        ("process", "process_open_fds".to_owned(), 1.0),
        ("process", "process_start_time_seconds".to_owned(), 1.0),
    ];
    for (what, series, least) in &expectations {
        let value = metric_value(&after, series);
        assert!(
            value.is_some_and(|value| value >= *least),
            "{what}: {series} is {value:?}, expected ≥ {least}\n{after}"
        );
    }
    // Everything that was in flight has been settled or given up: the gauges came back down.
    let settled = metrics_until(&worker, "nothing in flight", |body| {
        metric_value(body, "worker_in_flight") == Some(0.0) && metric_value(body, "worker_slots_held") == Some(0.0)
    })
    .await;

    // README and exposition agree both ways, labels included.
    let named = readme_metrics();
    for exposition in [&during, &after, &settled] {
        let exported = families(exposition);
        for (name, labels) in &named {
            assert!(exported.contains_key(name), "README names {name}, /metrics lacks it:\n{exposition}");
            let samples = sample_labels(exposition, name);
            assert!(!samples.is_empty(), "{name} has no sample:\n{exposition}");
            for sample in samples {
                assert_eq!(&sample, labels, "{name}'s labels differ from README's");
            }
        }
        let unnamed: Vec<&String> = exported
            .keys()
            .filter(|name| ["webhook_", "worker_", "hookfleet_"].iter().any(|prefix| name.starts_with(prefix)))
            .filter(|name| !named.contains_key(*name))
            .collect();
        assert!(
            unnamed.is_empty(),
            "/metrics exports {unnamed:?}, which README's \"Metrics and probes\" does not name"
        );
        assert!(exported.keys().any(|name| name.starts_with("process_")), "the process metrics are exported");
        // The label values README lists: depth by `pending`, `in_flight`, `dead`; attempts by outcome.
        assert_eq!(
            label_values(exposition, "webhook_queue_depth", "status"),
            BTreeSet::from(["dead", "in_flight", "pending"].map(str::to_owned))
        );
        let outcomes = label_values(exposition, "webhook_deliveries_total", "status");
        assert_eq!(outcomes, BTreeSet::from(["dead", "delivered", "retry"].map(str::to_owned)));
    }
}
