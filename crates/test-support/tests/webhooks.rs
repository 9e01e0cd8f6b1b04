//! Creating webhooks against the real schema: whatever `WebhookStore::create` admits must fit
//! the table's constraints (`sql/migrations/V0001__schema.sql`) and still pass the URL check at send time.
//!
//! Nothing here talks to a receiver: the URLs are never contacted.

use hookfleet_core::delivery::MAX_URL_LENGTH;
use hookfleet_core::webhooks::{NewWebhook, WebhookError, MAX_NAME_CHARS};
use hookfleet_test_support::{database, loopback_client};

fn unnamed(url: String) -> NewWebhook {
    NewWebhook { url, enabled: true, ..NewWebhook::default() }
}

#[tokio::test]
async fn a_long_host_gives_a_default_name_that_fits_the_name_constraint() {
    let db = database().await;
    let client = loopback_client();
    let label = "a".repeat(63);
    // 240 bytes: a legal DNS name, longer than webhooks_name_length's 200 characters.
    let host = format!("{label}.{label}.{label}.{}.example", "b".repeat(40));
    assert_eq!(host.len(), 240);

    let created = db.webhook_store().create(unnamed(format!("https://{host}/hook")), &client).await;
    let created = created.expect("a URL the check admits is stored");
    assert_eq!(created.name, host[..MAX_NAME_CHARS]);
    let listed = db.webhook_store().list().await.expect("list");
    assert_eq!(listed.iter().map(|hook| hook.name.as_str()).collect::<Vec<_>>(), [&host[..MAX_NAME_CHARS]]);
}

#[tokio::test]
async fn a_url_that_grows_past_the_limit_when_normalised_is_refused_at_create() {
    let db = database().await;
    let client = loopback_client();
    let store = db.webhook_store();

    // Under the limit as typed, three times over it once percent-encoded.
    let grows = format!("https://example.com/{}", "é".repeat(700));
    assert!(grows.len() < MAX_URL_LENGTH);
    match store.create(unnamed(grows), &client).await {
        Err(WebhookError::Invalid(message)) => assert!(message.contains("normalised"), "{message}"),
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(view) => panic!("expected Invalid, got a webhook with a {}-byte URL", view.url.len()),
    }
    assert_eq!(db.count("SELECT count(*) FROM hookfleet.webhooks").await, 0);

    // One that fits once normalised is stored normalised, and the stored form passes the check
    // the worker makes before every attempt.
    let fits = format!("https://example.com/{}", "é".repeat((MAX_URL_LENGTH - 20) / 6));
    let created = store.create(unnamed(fits), &client).await.expect("fits once normalised");
    assert!(created.url.len() <= MAX_URL_LENGTH);
    let stored = store.load_targets(&[created.webhook_id]).await.expect("load");
    let target = stored[&created.webhook_id].as_ref().expect("decrypts");
    assert_eq!(target.url, created.url);
    assert!(client.check_url(&target.url).is_ok());
}
