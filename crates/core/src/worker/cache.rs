//! The claim loop's cache of decrypted webhook targets. Each claimed row carries its webhook's
//! `version`; a missing or stale entry is loaded (all misses of a batch in one query) and
//! decrypted once, so the hot path neither decrypts nor queries webhooks per delivery. Only the
//! claim loop uses it, so it needs no lock.

use std::collections::HashMap;
use std::sync::Arc;

use super::Targets;
use crate::queue::ClaimedDelivery;
use crate::webhooks::{WebhookError, WebhookStore, WebhookTarget};

pub(super) struct WebhookCache {
    store: WebhookStore,
    entries: HashMap<i64, Arc<WebhookTarget>>,
}

impl WebhookCache {
    pub(super) fn new(store: WebhookStore) -> Self {
        Self { store, entries: HashMap::new() }
    }

    pub(super) async fn resolve(&mut self, claimed: &[ClaimedDelivery]) -> Result<Targets, WebhookError> {
        let mut stale: Vec<i64> = claimed
            .iter()
            .filter(|delivery| {
                self.entries.get(&delivery.webhook_id).is_none_or(|target| target.version != delivery.webhook_version)
            })
            .map(|delivery| delivery.webhook_id)
            .collect();
        stale.sort_unstable();
        stale.dedup();
        let mut targets = Targets::new();
        if !stale.is_empty() {
            // A webhook the load does not return was deleted: its entry must not be served again
            // (a webhook created later under the same id starts its versions over).
            for webhook_id in &stale {
                self.entries.remove(webhook_id);
            }
            for (webhook_id, loaded) in self.store.load_targets(&stale).await? {
                match &loaded {
                    Ok(target) => {
                        self.entries.insert(webhook_id, target.clone());
                    }
                    Err(message) => {
                        tracing::error!(webhook_id, error = %message, "cannot use webhook; its deliveries will fail until this is fixed");
                        self.entries.remove(&webhook_id);
                    }
                }
                targets.insert(webhook_id, loaded);
            }
        }
        for delivery in claimed {
            if let (false, Some(target)) =
                (targets.contains_key(&delivery.webhook_id), self.entries.get(&delivery.webhook_id))
            {
                targets.insert(delivery.webhook_id, Ok(target.clone()));
            }
        }
        Ok(targets)
    }

    /// Each cached webhook's id and version.
    pub(super) fn versions(&self) -> Vec<(i64, i64)> {
        self.entries.iter().map(|(webhook_id, target)| (*webhook_id, target.version)).collect()
    }

    pub(super) fn evict(&mut self, webhook_id: i64) {
        self.entries.remove(&webhook_id);
    }
}
