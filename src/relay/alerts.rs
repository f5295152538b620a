//! An alert when Meta's webhooks stop passing the signature check.
//!
//! A wrong or rotated `META_APP_SECRET` makes every genuine webhook fail with 401, and Meta
//! keeps retrying for 7 days while customers get no answer: a log line is not enough. Every
//! `relay.signature_alert_window` (60 s) the relay looks at what it saw in that window:
//! [`SIGNATURE_FAILURES_TO_ALERT`] or more refused webhooks and not one valid one opens the
//! incident `relay:signature` (the alert webhook of `[alerts]` hears about it once, through the
//! same incident state as the daemon's alerts, in the database, so replicas and restarts do not
//! repeat it); a window with valid webhooks resolves it. A quiet window changes nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alert::{Alerter, Observation, PgIncidents};
use crate::pg::connect::DbUrl;
use crate::relay::inbox::Counters;

/// Refused webhooks in one window, with none valid, that open the incident.
pub const SIGNATURE_FAILURES_TO_ALERT: u64 = 5;

/// The incident's key in `bite_sync.alerts`.
pub const INCIDENT: &str = "relay:signature";

/// What one window says about the incident: failing (with why), fine, or nothing to tell.
pub fn judge(failures: u64, valid: u64, window: Duration) -> Option<Option<String>> {
    if valid > 0 {
        Some(None)
    } else if failures >= SIGNATURE_FAILURES_TO_ALERT {
        Some(Some(format!(
            "the WhatsApp relay refused {failures} webhooks in the last {}s for a missing or wrong X-Hub-Signature-256 and accepted none: check META_APP_SECRET (App settings > Basic > App secret, not the verify or access token); Meta retries refused webhooks for 7 days",
            window.as_secs()
        )))
    } else {
        None
    }
}

/// Watches the counters until `cancel`; does nothing without an alert webhook.
pub async fn watch_signatures(
    database: DbUrl,
    webhook: Option<crate::alert::WebhookUrl>,
    counters: Arc<Counters>,
    window: Duration,
    cancel: CancellationToken,
) {
    let Some(webhook) = webhook else {
        tracing::debug!(
            "no alert webhook ([alerts] webhook_url): signature failures are only counted"
        );
        return;
    };
    tracing::debug!(window = ?window, "watching for runs of signature failures");
    let alerter = Alerter::new(Arc::new(PgIncidents::new(database)), webhook);
    loop {
        tokio::select! {
            () = tokio::time::sleep(window) => {}
            () = cancel.cancelled() => return,
        }
        let failures = counters.window_failures.swap(0, Ordering::Relaxed);
        let valid = counters.window_valid.swap(0, Ordering::Relaxed);
        tracing::trace!(failures, valid, "signature window");
        if let Some(failing) = judge(failures, valid, window) {
            let observation = Observation {
                key: INCIDENT.to_string(),
                job: "relay".to_string(),
                failing,
            };
            alerter.observe(&observation, chrono::Utc::now()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_without_a_valid_webhook_is_an_incident() {
        let w = Duration::from_secs(60);
        assert!(judge(5, 0, w).unwrap().unwrap().contains("META_APP_SECRET"));
        assert_eq!(
            judge(50, 1, w),
            Some(None),
            "a valid webhook means the secret is right"
        );
        assert_eq!(judge(0, 3, w), Some(None));
        assert_eq!(judge(4, 0, w), None, "a few strays are not an incident");
        assert_eq!(judge(0, 0, w), None, "a quiet window says nothing");
    }
}
