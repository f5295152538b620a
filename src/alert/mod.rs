//! Alerts: a failed job or a stale backup opens an *incident*, and the alert webhook hears
//! about it once when it opens and once when it resolves.
//!
//! Incidents are keyed `job:<name>` (opened by a failed run, resolved by the job's next
//! successful one) and `backup-stale:<job>` (opened when a backup job's newest good backup is
//! older than twice its period, see [`freshness`]; resolved when a fresh one exists). What to
//! do with each observation is the pure [`step`]; [`Alerter`] applies it with the incident
//! state in an [`IncidentStore`] and the webhook ([`http`]).
//!
//! Invariants:
//! - An open incident is alerted once: its state records that the webhook took the alert
//!   (`notified_at`), and the state lives in the mirror's `bite_sync.alerts` when there is a
//!   mirror ([`PgIncidents`]), so a restarted daemon does not alert again. Without a mirror it
//!   is in memory ([`MemoryIncidents`]).
//! - A webhook that fails is retried a few times with backoff; if it still fails, the incident
//!   stays open and un-notified, and the next observation of it tries again. Nothing here
//!   stops the daemon.
//! - A "resolved" alert is sent only for an incident whose "open" alert was sent.
//! - The webhook URL is never logged in full: its path (where Slack and others put the token)
//!   shows as `***` ([`WebhookUrl`]'s `Display` and `Debug`).

pub mod freshness;
pub mod http;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::future::BoxFuture;
use serde::Serialize;

use crate::pg::connect::DbUrl;

/// A validated `http://` or `https://` webhook URL. `Display`/`Debug` redact the path and
/// query, which often hold a token.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    https: bool,
    host: String,
    port: u16,
    /// Path and query, starting with `/`.
    target: String,
}

impl WebhookUrl {
    /// Parses `http[s]://host[:port][/path][?query]`; no user info, no fragment.
    pub fn parse(text: &str) -> Result<WebhookUrl, String> {
        let (https, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("expected an http:// or https:// URL".into());
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(split);
        if authority.contains('@') {
            return Err("user names and passwords in the URL are not supported".into());
        }
        if target.contains('#') || target.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the URL's path has a fragment, spaces or control characters".into());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("invalid port {p:?}"))?;
                (h, port)
            }
            _ => (authority, if https { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let target = if target.starts_with('/') {
            target.to_string()
        } else {
            format!("/{target}")
        };
        Ok(WebhookUrl {
            https,
            host: host.to_string(),
            port,
            target,
        })
    }

    /// `https://`.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The host name or address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Path and query, for the request line (never logged).
    pub fn request_target(&self) -> &str {
        &self.target
    }

    /// The `Host` header.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        let path = if self.target == "/" { "/" } else { "/***" };
        write!(f, "{scheme}://{}{path}", self.host_header())
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({self})")
    }
}

/// An incident that is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenIncident {
    /// When it opened.
    pub opened_at: DateTime<Utc>,
    /// Whether the webhook took its "open" alert.
    pub notified: bool,
}

/// What an observation of a condition calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing changes.
    Nothing,
    /// Open the incident and alert.
    Open,
    /// Still failing, and the "open" alert never got through: try it again.
    RetryOpenAlert,
    /// Resolve the incident; alert only if its opening was alerted.
    Resolve {
        /// Send a "resolved" alert.
        notify: bool,
    },
}

/// The transition for an incident in state `open` (none: not open) when its condition is
/// observed `failing` or not.
pub fn step(open: Option<&OpenIncident>, failing: bool) -> Step {
    match (open, failing) {
        (None, true) => Step::Open,
        (None, false) => Step::Nothing,
        (Some(o), true) if !o.notified => Step::RetryOpenAlert,
        (Some(_), true) => Step::Nothing,
        (Some(o), false) => Step::Resolve { notify: o.notified },
    }
}

/// Reading or writing incident state failed.
#[derive(Debug, thiserror::Error)]
pub enum AlertStateError {
    /// The mirror could not be reached.
    #[error("failed to connect to the mirror for the alert state")]
    Connect(#[source] Box<crate::pg::connect::ConnectError>),
    /// A statement failed.
    #[error("{context}")]
    Query {
        /// What was being done.
        context: &'static str,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The mirror did not answer in time.
    #[error("the mirror did not answer within {} s", .0.as_secs())]
    TimedOut(Duration),
}

/// Where incident state is kept.
pub trait IncidentStore: Send + Sync {
    /// The incident, if open.
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OpenIncident>, AlertStateError>>;
    /// Opens it (or reopens a resolved one), not notified.
    fn open<'a>(
        &'a self,
        key: &'a str,
        at: DateTime<Utc>,
        detail: &'a str,
    ) -> BoxFuture<'a, Result<(), AlertStateError>>;
    /// Records that its "open" alert got through.
    fn notified<'a>(
        &'a self,
        key: &'a str,
        at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<(), AlertStateError>>;
    /// Resolves it.
    fn resolve<'a>(
        &'a self,
        key: &'a str,
        at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<(), AlertStateError>>;
}

/// Incident state in memory: forgotten at exit.
#[derive(Debug, Default)]
pub struct MemoryIncidents {
    open: Mutex<HashMap<String, OpenIncident>>,
}

impl MemoryIncidents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, OpenIncident>> {
        // Only whole values are inserted or removed, so a poisoned map is still consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl IncidentStore for MemoryIncidents {
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OpenIncident>, AlertStateError>> {
        Box::pin(async move { Ok(self.lock().get(key).cloned()) })
    }

    fn open<'a>(
        &'a self,
        key: &'a str,
        at: DateTime<Utc>,
        _detail: &'a str,
    ) -> BoxFuture<'a, Result<(), AlertStateError>> {
        Box::pin(async move {
            self.lock().insert(
                key.to_string(),
                OpenIncident {
                    opened_at: at,
                    notified: false,
                },
            );
            Ok(())
        })
    }

    fn notified<'a>(
        &'a self,
        key: &'a str,
        _at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<(), AlertStateError>> {
        Box::pin(async move {
            if let Some(o) = self.lock().get_mut(key) {
                o.notified = true;
            }
            Ok(())
        })
    }

    fn resolve<'a>(
        &'a self,
        key: &'a str,
        _at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<(), AlertStateError>> {
        Box::pin(async move {
            self.lock().remove(key);
            Ok(())
        })
    }
}

/// Incident state in the mirror's `bite_sync.alerts` (migration 4), one connection per call:
/// incidents are rare, and a fresh connection survives the mirror restarting in between.
pub struct PgIncidents {
    url: DbUrl,
}

/// How long one state statement, its connect included, may take.
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

impl PgIncidents {
    /// State in `url`'s `bite_sync.alerts`, whose bookkeeping must be migrated.
    pub fn new(url: DbUrl) -> PgIncidents {
        PgIncidents { url }
    }

    async fn with_client<T, F, Fut>(&self, statement: F) -> Result<T, AlertStateError>
    where
        F: FnOnce(tokio_postgres::Client) -> Fut,
        Fut: Future<Output = Result<T, AlertStateError>>,
    {
        let attempt = async {
            let client = self
                .url
                .connect()
                .await
                .map_err(|e| AlertStateError::Connect(Box::new(e)))?;
            statement(client).await
        };
        tokio::time::timeout(STATE_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(AlertStateError::TimedOut(STATE_TIMEOUT)))
    }

    async fn execute(
        &self,
        sql: &'static str,
        key: &str,
        at: DateTime<Utc>,
        detail: Option<&str>,
        context: &'static str,
    ) -> Result<(), AlertStateError> {
        let at = at.to_rfc3339_opts(SecondsFormat::Micros, true);
        self.with_client(|client| async move {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&key, &at, &detail];
            let n = sql.matches('$').count();
            client
                .execute(sql, &params[..n])
                .await
                .map_err(|source| AlertStateError::Query { context, source })?;
            Ok(())
        })
        .await
    }
}

impl IncidentStore for PgIncidents {
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OpenIncident>, AlertStateError>> {
        Box::pin(self.with_client(move |client| async move {
            let row = client
                .query_opt(
                    "SELECT to_char(opened_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                            notified_at IS NOT NULL \
                     FROM bite_sync.alerts WHERE incident = $1 AND resolved_at IS NULL",
                    &[&key],
                )
                .await
                .map_err(|source| AlertStateError::Query {
                    context: "failed to read an incident",
                    source,
                })?;
            Ok(row.map(|r| OpenIncident {
                opened_at: DateTime::parse_from_rfc3339(r.get(0))
                    .map(|t| t.to_utc())
                    .unwrap_or_default(),
                notified: r.get(1),
            }))
        }))
    }

    fn open<'a>(
        &'a self,
        key: &'a str,
        at: DateTime<Utc>,
        detail: &'a str,
    ) -> BoxFuture<'a, Result<(), AlertStateError>> {
        Box::pin(self.execute(
            "INSERT INTO bite_sync.alerts (incident, opened_at, detail) \
             VALUES ($1, $2::text::timestamptz, $3) \
             ON CONFLICT (incident) DO UPDATE SET opened_at = EXCLUDED.opened_at, \
                 notified_at = NULL, resolved_at = NULL, detail = EXCLUDED.detail",
            key,
            at,
            Some(detail),
            "failed to record an incident",
        ))
    }

    fn notified<'a>(
        &'a self,
        key: &'a str,
        at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<(), AlertStateError>> {
        Box::pin(self.execute(
            "UPDATE bite_sync.alerts SET notified_at = $2::text::timestamptz \
             WHERE incident = $1 AND resolved_at IS NULL",
            key,
            at,
            None,
            "failed to record an alert",
        ))
    }

    fn resolve<'a>(
        &'a self,
        key: &'a str,
        at: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<(), AlertStateError>> {
        Box::pin(self.execute(
            "UPDATE bite_sync.alerts SET resolved_at = $2::text::timestamptz \
             WHERE incident = $1 AND resolved_at IS NULL",
            key,
            at,
            None,
            "failed to resolve an incident",
        ))
    }
}

/// The JSON the webhook receives. `text` is what Slack (and compatible chat webhooks) show.
#[derive(Debug, Clone, Serialize)]
pub struct Payload {
    /// A one-line message for people.
    pub text: String,
    /// The incident's key.
    pub incident: String,
    /// `open` or `resolved`.
    pub state: &'static str,
    /// The job concerned.
    pub job: String,
    /// When this was observed (RFC 3339, UTC).
    pub at: String,
}

/// A condition observed now: is incident `key`, about `job`, failing?
#[derive(Debug, Clone)]
pub struct Observation {
    /// `job:<name>` or `backup-stale:<job>`.
    pub key: String,
    /// The job.
    pub job: String,
    /// `Some(what is wrong)` when failing.
    pub failing: Option<String>,
}

impl Observation {
    /// A finished run of `job`.
    pub fn run(job: &str, outcome: &Result<crate::schedule::JobOutcome, String>) -> Observation {
        Observation {
            key: format!("job:{job}"),
            job: job.to_string(),
            failing: outcome
                .as_ref()
                .err()
                .map(|e| format!("job \"{job}\" failed: {e}")),
        }
    }

    /// A freshness check of a backup job; `None` when it could not tell (store unreachable).
    pub fn freshness(check: &freshness::BackupFreshness) -> Option<Observation> {
        if check.problem.is_some() {
            return None;
        }
        Some(Observation {
            key: format!("backup-stale:{}", check.job),
            job: check.job.clone(),
            failing: check.warning(),
        })
    }
}

/// How often and how patiently the webhook is tried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all.
    pub attempts: u32,
    /// The wait after the first failure; doubled after each.
    pub first_backoff: Duration,
    /// Each attempt's time limit.
    pub timeout: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            attempts: 4,
            first_backoff: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Applies observations to incidents and calls the webhook.
pub struct Alerter {
    store: Arc<dyn IncidentStore>,
    webhook: WebhookUrl,
    retry: Retry,
}

impl Alerter {
    /// Alerts `webhook`, with incident state in `store`.
    pub fn new(store: Arc<dyn IncidentStore>, webhook: WebhookUrl) -> Alerter {
        Alerter {
            store,
            webhook,
            retry: Retry::default(),
        }
    }

    /// Other retry settings (tests).
    pub fn with_retry(mut self, retry: Retry) -> Alerter {
        self.retry = retry;
        self
    }

    /// Applies one observation at `now`. Failures are logged here, never returned: alerting
    /// must not stop what observed.
    pub async fn observe(&self, o: &Observation, now: DateTime<Utc>) {
        let span = tracing::info_span!("alert", incident = %o.key);
        let _ = tracing::Instrument::instrument(self.apply(o, now), span).await;
    }

    async fn apply(&self, o: &Observation, now: DateTime<Utc>) -> Option<()> {
        let logged = |what: &'static str| {
            move |e: AlertStateError| {
                tracing::warn!(error = %crate::error_chain(&e), "could not {what}; the alert waits for the next check");
            }
        };
        let open = self
            .store
            .get(&o.key)
            .await
            .map_err(logged("read the incident state"))
            .ok()?;
        let payload = |state, text: String| Payload {
            text: format!("bite-sync: {text}"),
            incident: o.key.clone(),
            state,
            job: o.job.clone(),
            at: now.to_rfc3339_opts(SecondsFormat::Secs, true),
        };
        match step(open.as_ref(), o.failing.is_some()) {
            Step::Nothing => {}
            step @ (Step::Open | Step::RetryOpenAlert) => {
                let detail = o.failing.clone().unwrap_or_default();
                if step == Step::Open {
                    tracing::warn!(detail = %detail, "incident opened");
                    self.store
                        .open(&o.key, now, &detail)
                        .await
                        .map_err(logged("record the incident"))
                        .ok()?;
                }
                if self.send(&payload("open", detail)).await {
                    self.store
                        .notified(&o.key, now)
                        .await
                        .map_err(logged("record that the alert was sent"))
                        .ok()?;
                }
            }
            Step::Resolve { notify } => {
                tracing::info!("incident resolved");
                self.store
                    .resolve(&o.key, now)
                    .await
                    .map_err(logged("resolve the incident"))
                    .ok()?;
                if notify {
                    let text = if o.key.starts_with("backup-stale:") {
                        format!("job \"{}\" has a fresh backup again", o.job)
                    } else {
                        format!("job \"{}\" ran successfully again", o.job)
                    };
                    self.send(&payload("resolved", text)).await;
                }
            }
        }
        Some(())
    }

    /// POSTs `payload`, retrying transient failures with backoff; whether it got through.
    async fn send(&self, payload: &Payload) -> bool {
        let body = serde_json::to_vec(payload).expect("the payload serializes");
        let mut backoff = self.retry.first_backoff;
        for attempt in 1..=self.retry.attempts.max(1) {
            match http::post_json(&self.webhook, &body, self.retry.timeout).await {
                Ok(status) => {
                    tracing::info!(webhook = %self.webhook, status, state = payload.state, "alert sent");
                    return true;
                }
                Err(e) if e.is_transient() && attempt < self.retry.attempts => {
                    tracing::warn!(error = %crate::error_chain(&e), attempt, retry_in = ?backoff, "alert not sent; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), attempt, "alert not sent; it is tried again at the next check");
                    return false;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incidents_open_once_retry_unsent_alerts_and_resolve() {
        let t = Utc::now();
        let sent = OpenIncident {
            opened_at: t,
            notified: true,
        };
        let unsent = OpenIncident {
            opened_at: t,
            notified: false,
        };
        assert_eq!(step(None, true), Step::Open);
        assert_eq!(step(None, false), Step::Nothing);
        assert_eq!(step(Some(&sent), true), Step::Nothing, "no second alert");
        assert_eq!(step(Some(&unsent), true), Step::RetryOpenAlert);
        assert_eq!(step(Some(&sent), false), Step::Resolve { notify: true });
        assert_eq!(step(Some(&unsent), false), Step::Resolve { notify: false });
    }

    #[test]
    fn webhook_urls_are_checked_and_their_token_never_shown() {
        let slack =
            WebhookUrl::parse("https://hooks.slack.com/services/T000/B000/XXXXSECRET").unwrap();
        assert_eq!(slack.to_string(), "https://hooks.slack.com/***");
        assert!(!format!("{slack:?}").contains("SECRET"));
        assert_eq!(slack.port(), 443);
        assert_eq!(slack.request_target(), "/services/T000/B000/XXXXSECRET");
        let local = WebhookUrl::parse("http://127.0.0.1:8080?token=abc").unwrap();
        assert_eq!(local.to_string(), "http://127.0.0.1:8080/***");
        assert_eq!(local.request_target(), "/?token=abc");
        assert_eq!(local.host_header(), "127.0.0.1:8080");
        assert_eq!(
            WebhookUrl::parse("http://[::1]:9/x").unwrap().host_header(),
            "[::1]:9"
        );
        for bad in [
            "ftp://x/y",
            "hooks.slack.com/x",
            "https://",
            "https://u:p@h/x",
            "http://h:99999/",
            "http://h/a#b",
        ] {
            assert!(WebhookUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_run_is_an_observation_of_its_job_incident() {
        let failed = Observation::run("backup", &Err("disk full".into()));
        assert_eq!(failed.key, "job:backup");
        assert_eq!(
            failed.failing.as_deref(),
            Some("job \"backup\" failed: disk full")
        );
        let ok = Observation::run("backup", &Ok(Default::default()));
        assert!(ok.failing.is_none());
    }
}
