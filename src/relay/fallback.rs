//! The AI fallback: when the restaurant's backend has not taken a customer's message within
//! `relay.ai.deadline`, the relay answers it once with an AI reply built from the mirror.
//!
//! [`run`] polls the inbox every [`POLL_EVERY`]. A round:
//! 1. **Claim** due messages (`kind='message'`, still `delivery_state='pending'`,
//!    `received_at` older than the deadline, `ai_state` null) with one
//!    `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)`: replicas never claim the same
//!    row, and a claim is marked with this replica's name and the claim time (the *claim
//!    token*).
//! 2. **Plan** each customer's claimed rows ([`plan_group`], pure): one reply per burst, to the
//!    newest message; older ones are `skipped`/`superseded`, and so are all of them when a newer
//!    message of that customer is still waiting. Messages older (by Meta's timestamp) than
//!    `relay.ai.fresh_for` are `stale` (Meta replays up to 7 days of backlog), and nothing
//!    outside the 24-hour customer-service window is answered with free text.
//! 3. **Compose**: the context queries run on the mirror (each column read as text, one compact
//!    line per row, capped at `max_context_chars`; a failing query is left out), then the
//!    providers are asked in order; if none answers, `fallback_text` is sent (empty: nothing).
//! 4. **Send**: take the shared send slots, then in one statement move the row from `claimed`
//!    to `sending` (only if it is still pending and the claim token is still ours; if the
//!    backend took it meanwhile it becomes `skipped`/`backend took it`) and insert the
//!    `outbox` row; send through the Graph API quoting the customer's message; record
//!    `answered` with the reply's wamid, or `failed`.
//!
//! Invariants:
//! - **At most one reply per message, ever.** Only the claimer whose token still matches may
//!   move a row to `sending`, and a row in `sending` is never picked again: after a crash we
//!   cannot know whether Meta got the message. A claim left `claimed` longer than
//!   [`RECLAIM_AFTER`] (the claimer died before sending) may be claimed again; the old
//!   claimer, if it was only slow, then loses its token and sends nothing.
//! - Within one run a send is retried only when Meta certainly did not take it
//!   ([`GraphError::surely_not_sent`]): a timeout is never retried.
//! - `delivery_state` is never touched: the backend still gets every message.
//! - Staff come first: a message staff answered from the WhatsApp Business app (an echo,
//!   `ai_state = 'staff'`, set by the inbox in the echo's transaction) is never claimed, and a
//!   claim it overtook loses its token, so nothing is sent after a waiter replied. History
//!   imports (`history`) are changes, never `kind = 'message'` rows, and system messages are
//!   stored already `skipped`.
//! - A customer is one customer across a number or user id change: rows carry the customer key
//!   of `bite_sync.customer_aliases`, and the context queries are tried with each phone and
//!   user id the customer is known by.
//! - Nothing here logs message bodies, customer data, phone numbers, keys or tokens: logs
//!   carry inbox/outbox ids, states, provider names, status codes and SQLSTATEs.
//! - The database being down only costs rounds: the loop logs the outage once and goes on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::ai::{self, Prompt};
use super::db::{self, Conn};
use super::graph::{self, GraphClient, GraphError};
use super::ratelimit::{self, RateLimitError};
use super::settings::RelaySettings;

/// How often the inbox is polled.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// A claim older than this whose row never reached `sending` may be claimed again. Longer
/// than composing a reply can take (context, every provider's timeout, a send slot).
pub const RECLAIM_AFTER: Duration = Duration::from_secs(120);
/// Most rows claimed per round.
pub const CLAIM_BATCH: i64 = 16;
/// Customers answered at once.
const CONCURRENCY: usize = 4;
/// Graph attempts per reply (only repeated when Meta surely did not take it).
const SEND_ATTEMPTS: u32 = 3;
/// WhatsApp's customer-service window: free text only within it.
pub const SERVICE_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Each context query's statement timeout.
const CONTEXT_TIMEOUT_MS: u32 = 5000;
/// The most earlier messages of a burst put in the prompt.
const BURST_MAX: i64 = 10;

/// Why a round or a reply did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// No connection from the pool.
    #[error("no database connection: {0}")]
    Pool(String),
    /// A bookkeeping statement failed.
    #[error("failed to {what}")]
    Query {
        /// What the statement was for.
        what: &'static str,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No send slot.
    #[error(transparent)]
    RateLimit(#[from] RateLimitError),
}

impl FallbackError {
    /// Database trouble passes; the next round tries again.
    pub fn is_transient(&self) -> bool {
        match self {
            FallbackError::Pool(_) | FallbackError::Query { .. } => true,
            FallbackError::RateLimit(e) => e.is_transient(),
        }
    }
}

fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> FallbackError {
    move |source| FallbackError::Query { what, source }
}

/// A claimed inbox row: what composing and sending a reply needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// `inbox.id`.
    pub id: i64,
    /// `inbox.customer` (phone or user id).
    pub customer: String,
    /// The customer's wa_id, when Meta gave one.
    pub phone: Option<String>,
    /// The customer's BSUID, when Meta gave one.
    pub user_id: Option<String>,
    /// The WhatsApp profile name.
    pub name: Option<String>,
    /// The message's wamid (quoted by the reply).
    pub wamid: Option<String>,
    /// How long ago the customer sent it (Meta's timestamp, else when it was stored).
    pub age: Duration,
    /// The claim token: `ai_at` in microseconds since the epoch.
    pub token: i64,
}

impl Claimed {
    /// Who the reply goes to: the phone number if known, else the user id.
    pub fn recipient(&self) -> &str {
        self.phone
            .as_deref()
            .or(self.user_id.as_deref())
            .unwrap_or(&self.customer)
    }

    /// The `$1` of the context queries: the phone's digits, else the user id.
    pub fn customer_key(&self) -> String {
        match &self.phone {
            Some(p) => p.chars().filter(char::is_ascii_digit).collect(),
            None => self
                .user_id
                .clone()
                .unwrap_or_else(|| self.customer.clone()),
        }
    }
}

/// What to do with one claimed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Compose and send a reply.
    Answer,
    /// Mark `skipped` with this note.
    Skip(&'static str),
}

/// Decides for one customer's claimed rows (sorted or not). `newer_waiting`: a newer message
/// of this customer is still pending and not given up on, so this burst is not over.
pub fn plan_group(
    rows: &[Claimed],
    newer_waiting: bool,
    fresh_for: Duration,
) -> Vec<(i64, Decision)> {
    let newest = rows.iter().map(|r| r.id).max();
    rows.iter()
        .map(|r| {
            let decision = if r.age > SERVICE_WINDOW {
                Decision::Skip("outside the 24-hour window")
            } else if r.age > fresh_for {
                Decision::Skip("stale")
            } else if newer_waiting || Some(r.id) != newest {
                Decision::Skip("superseded")
            } else {
                Decision::Answer
            };
            (r.id, decision)
        })
        .collect()
}

/// The context block of the prompt: each part's title and lines, in order, cut at
/// `max_chars` characters (on a character boundary; whole lines when they fit).
pub fn render_context(parts: &[(&str, Vec<String>)], max_chars: usize) -> String {
    let mut out = String::new();
    let mut used = 0usize;
    'parts: for (title, lines) in parts {
        if lines.is_empty() {
            continue;
        }
        for (i, line) in lines.iter().enumerate() {
            let mut piece = String::new();
            if i == 0 {
                piece.push_str(title);
                piece.push_str(":\n");
            }
            piece.push_str("- ");
            piece.push_str(line.trim());
            piece.push('\n');
            let len = piece.chars().count();
            if used + len > max_chars {
                let room = max_chars.saturating_sub(used);
                if room > 0 {
                    out.extend(piece.chars().take(room));
                }
                break 'parts;
            }
            used += len;
            out.push_str(&piece);
        }
    }
    out
}

/// The user turn: the burst's messages, oldest first, one per line; media without a caption
/// shows as `[image]`, `[audio]`, …
pub fn render_messages(messages: &[(Option<String>, Option<String>)]) -> String {
    messages
        .iter()
        .map(|(item_type, body)| match body.as_deref().map(str::trim) {
            Some(b) if !b.is_empty() => b.to_string(),
            _ => format!("[{}]", item_type.as_deref().unwrap_or("message")),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The AI fallback worker. Returns when `cancel` fires, or at once (after one log line) when
/// the relay cannot send.
pub async fn run(pool: db::Pool, settings: Arc<RelaySettings>, cancel: CancellationToken) {
    let Some(graph) = GraphClient::from_settings(&settings) else {
        tracing::warn!(
            "AI fallback disabled: WHATSAPP_ACCESS_TOKEN or WHATSAPP_PHONE_NUMBER_ID is not set"
        );
        return;
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("a reqwest client with rustls builds");
    let worker = Worker {
        pool,
        settings,
        graph,
        http,
        cancel,
    };
    tracing::info!(
        providers = worker.settings.ai.providers.len(),
        deadline = ?worker.settings.ai.deadline,
        "AI fallback running"
    );
    let mut failing = false;
    loop {
        match worker.round().await {
            Ok(()) if failing => {
                tracing::info!("AI fallback: database reachable again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %crate::error_chain(&e), "AI fallback round failed; retrying every second");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = worker.cancel.cancelled() => break,
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
    tracing::info!("AI fallback stopped");
}

struct Worker {
    pool: db::Pool,
    settings: Arc<RelaySettings>,
    graph: GraphClient,
    http: reqwest::Client,
    cancel: CancellationToken,
}

const CLAIM_SQL: &str = "\
UPDATE bite_sync.inbox SET ai_state = 'claimed', ai_by = $1, ai_at = now(), ai_note = NULL
 WHERE id IN (SELECT id FROM bite_sync.inbox
               WHERE kind = 'message' AND delivery_state = 'pending'
                 AND received_at <= now() - make_interval(secs => $2)
                 AND (ai_state IS NULL
                      OR (ai_state = 'claimed' AND ai_at < now() - make_interval(secs => $3)))
               ORDER BY received_at, id
               LIMIT $4
               FOR UPDATE SKIP LOCKED)
   AND delivery_state = 'pending'
   AND (ai_state IS NULL OR ai_state = 'claimed')
RETURNING id, customer, customer_phone, customer_user_id, customer_name, wamid,
          extract(epoch FROM now() - coalesce(sent_at, received_at))::float8,
          (extract(epoch FROM ai_at) * 1000000)::bigint";

/// `ai_at` as the claim token, compared exactly in SQL.
const TOKEN_SQL: &str = "(extract(epoch FROM ai_at) * 1000000)::bigint";

impl Worker {
    async fn conn(&self) -> Result<Conn, FallbackError> {
        self.pool
            .get()
            .await
            .map_err(|e| FallbackError::Pool(db::describe(&e)))
    }

    async fn round(&self) -> Result<(), FallbackError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                CLAIM_SQL,
                &[
                    &self.settings.replica,
                    &self.settings.ai.deadline.as_secs_f64(),
                    &RECLAIM_AFTER.as_secs_f64(),
                    &CLAIM_BATCH,
                ],
            )
            .await
            .map_err(query("claim due messages"))?;
        drop(conn);
        if rows.is_empty() {
            return Ok(());
        }
        let mut groups: BTreeMap<String, Vec<Claimed>> = BTreeMap::new();
        for row in rows {
            let claimed = Claimed {
                id: row.get(0),
                customer: row.get(1),
                phone: row.get(2),
                user_id: row.get(3),
                name: row.get(4),
                wamid: row.get(5),
                age: Duration::from_secs_f64(row.get::<_, f64>(6).max(0.0)),
                token: row.get(7),
            };
            groups
                .entry(claimed.customer.clone())
                .or_default()
                .push(claimed);
        }
        tracing::debug!(
            customers = groups.len(),
            "claimed messages for the AI fallback"
        );
        futures_util::stream::iter(groups.into_values())
            .for_each_concurrent(CONCURRENCY, |group| async move {
                let newest = group.iter().map(|r| r.id).max().unwrap_or_default();
                let span = tracing::info_span!(
                    "ai_fallback",
                    inbox_id = newest,
                    outbox_id = tracing::field::Empty
                );
                if let Err(e) = self.handle_group(group).instrument(span.clone()).await {
                    span.in_scope(|| {
                        tracing::warn!(error = %crate::error_chain(&e), "AI fallback left a message claimed; it is retried after the reclaim delay")
                    });
                }
            })
            .await;
        Ok(())
    }

    async fn handle_group(&self, group: Vec<Claimed>) -> Result<(), FallbackError> {
        let conn = self.conn().await?;
        let newest = group
            .iter()
            .max_by_key(|r| r.id)
            .expect("groups are never empty");
        let newer_waiting: bool = conn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM bite_sync.inbox
                  WHERE customer = $1 AND kind = 'message' AND id > $2
                    AND delivery_state = 'pending'
                    AND (ai_state IS NULL OR ai_state IN ('claimed', 'sending', 'answered')))",
                &[&newest.customer, &newest.id],
            )
            .await
            .map_err(query("look for newer messages"))?
            .get(0);
        let mut answer = None;
        for (id, decision) in plan_group(&group, newer_waiting, self.settings.ai.fresh_for) {
            match decision {
                Decision::Skip(note) => {
                    let row = group
                        .iter()
                        .find(|r| r.id == id)
                        .expect("planned from group");
                    self.skip(&conn, row, note).await?;
                    tracing::info!(inbox_id = id, note, "AI fallback skipped a message");
                }
                Decision::Answer => answer = group.iter().find(|r| r.id == id),
            }
        }
        match answer {
            Some(row) => self.answer(conn, row).await,
            None => Ok(()),
        }
    }

    async fn skip(&self, conn: &Conn, row: &Claimed, note: &str) -> Result<(), FallbackError> {
        self.settle(conn, row, "skipped", note).await
    }

    /// Ends our claim on `row` with `state` ('skipped' or 'failed') and `note`; a claim taken
    /// over by another worker is left alone.
    async fn settle(
        &self,
        conn: &Conn,
        row: &Claimed,
        state: &'static str,
        note: &str,
    ) -> Result<(), FallbackError> {
        conn.execute(
            &format!(
                "UPDATE bite_sync.inbox SET ai_state = $5, ai_note = $4
                  WHERE id = $1 AND ai_state = 'claimed' AND ai_by = $2 AND {TOKEN_SQL} = $3"
            ),
            &[&row.id, &self.settings.replica, &row.token, &note, &state],
        )
        .await
        .map_err(query(if state == "failed" {
            "mark a message failed"
        } else {
            "mark a message skipped"
        }))?;
        Ok(())
    }

    /// The burst's messages, oldest first: this one and those it superseded since the
    /// customer's last reply.
    async fn burst(&self, conn: &Conn, row: &Claimed) -> Result<String, FallbackError> {
        let rows = conn
            .query(
                "SELECT item_type, body FROM bite_sync.inbox
                  WHERE customer = $1 AND kind = 'message' AND id <= $2
                    AND (id = $2 OR (ai_note = 'superseded' AND delivery_state = 'pending'))
                    AND id > coalesce((SELECT max(id) FROM bite_sync.inbox
                                        WHERE customer = $1 AND id < $2
                                          AND ai_state IN ('answered', 'sending', 'staff')), 0)
                  ORDER BY id DESC LIMIT $3",
                &[&row.customer, &row.id, &BURST_MAX],
            )
            .await
            .map_err(query("read the customer's messages"))?;
        let mut messages: Vec<(Option<String>, Option<String>)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        messages.reverse();
        Ok(render_messages(&messages))
    }

    /// One context query's rows, each rendered by Postgres as `column: value, …` (every
    /// column as text, nulls left out), under a statement timeout.
    async fn context_part(
        conn: &mut Conn,
        sql: &str,
        key: Option<&str>,
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        let wrapped = format!(
            "SELECT (SELECT string_agg(e.key || ': ' || e.value, ', ' ORDER BY e.n) \
               FROM json_each_text(row_to_json(q)) WITH ORDINALITY AS e(key, value, n) \
              WHERE e.value IS NOT NULL AND e.value <> '') \
             FROM ({}) AS q",
            sql.trim().trim_end_matches(';')
        );
        let tx = conn.transaction().await?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {CONTEXT_TIMEOUT_MS}"
        ))
        .await?;
        let rows = match key {
            Some(k) => tx.query(&wrapped, &[&k]).await?,
            None => tx.query(&wrapped, &[]).await?,
        };
        tx.commit().await?;
        Ok(rows
            .iter()
            .filter_map(|r| r.get::<_, Option<String>>(0))
            .collect())
    }

    /// Every key the customer can be found by in the mirror: the message's phone (digits),
    /// its user id, then the phones and user ids the customer had before (a number change,
    /// a username user who later showed a phone), newest first.
    async fn identity_keys(conn: &Conn, row: &Claimed) -> Vec<String> {
        let mut keys = vec![row.customer_key()];
        keys.extend(row.user_id.clone());
        let known = conn
            .query(
                "SELECT alias, kind FROM bite_sync.customer_aliases WHERE customer = $1 \
                 ORDER BY seen_at DESC, alias",
                &[&row.customer],
            )
            .await;
        for r in known.iter().flatten() {
            let (alias, kind): (String, String) = (r.get(0), r.get(1));
            let key = if kind == "phone" {
                alias.chars().filter(char::is_ascii_digit).collect()
            } else {
                alias
            };
            if !key.is_empty() {
                keys.push(key);
            }
        }
        let mut seen = std::collections::HashSet::new();
        keys.retain(|k| seen.insert(k.clone()));
        keys
    }

    async fn context(&self, conn: &mut Conn, row: &Claimed) -> String {
        let keys = Self::identity_keys(conn, row).await;
        let queries = &self.settings.ai.queries;
        let mut parts: Vec<(&str, Vec<String>)> = Vec::new();
        if let Some(name) = row.name.as_deref().filter(|n| !n.trim().is_empty()) {
            parts.push(("WhatsApp profile", vec![format!("name: {name}")]));
        }
        for (title, part, sql, by_customer) in [
            ("Customer", "customer", &queries.customer, true),
            ("Recent orders", "orders", &queries.orders, true),
            ("Menu", "menu", &queries.menu, false),
        ] {
            if sql.trim().is_empty() {
                continue;
            }
            // A customer query is tried with each key the customer is known by until one
            // finds rows: by phone or by user id, old ones included.
            let tries: Vec<Option<&str>> = if by_customer {
                keys.iter().map(|k| Some(k.as_str())).collect()
            } else {
                vec![None]
            };
            let mut found = Vec::new();
            for key in tries {
                match Self::context_part(conn, sql, key).await {
                    Ok(lines) if !lines.is_empty() => {
                        found = lines;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // The SQLSTATE only: a database message may quote a value.
                        let sqlstate = e.code().map(|c| c.code().to_string());
                        tracing::warn!(
                            part,
                            sqlstate = sqlstate.as_deref().unwrap_or("none"),
                            "context query failed; replying without it"
                        );
                        break;
                    }
                }
            }
            parts.push((title, found));
        }
        render_context(&parts, self.settings.ai.max_context_chars)
    }

    async fn compose(&self, prompt: &Prompt) -> Option<(String, String)> {
        let ai = &self.settings.ai;
        for provider in &ai.providers {
            let asked = ai::ask(
                &self.http,
                provider,
                prompt,
                ai.max_reply_tokens,
                ai.timeout,
            );
            let result = tokio::select! {
                _ = self.cancel.cancelled() => return None,
                r = asked => r,
            };
            match result {
                Ok(text) => return Some((text, provider.kind.name().to_string())),
                Err(e) => {
                    tracing::warn!(provider = provider.kind.name(), error = %crate::error_chain(&e), "AI provider failed; trying the next")
                }
            }
        }
        let text = ai.fallback_text.trim();
        (!text.is_empty()).then(|| (text.to_string(), "fallback".to_string()))
    }

    async fn answer(&self, mut conn: Conn, row: &Claimed) -> Result<(), FallbackError> {
        let user = self.burst(&conn, row).await?;
        let context = self.context(&mut conn, row).await;
        let mut system = self.settings.ai.system_prompt.clone();
        if !context.is_empty() {
            system.push_str("\n\n");
            system.push_str(&context);
        }
        let prompt = Prompt { system, user };
        let Some((text, provider)) = self.compose(&prompt).await else {
            if self.cancel.is_cancelled() {
                // Still claimed: reclaimed after the delay, by us or another replica.
                return Ok(());
            }
            self.skip(&conn, row, "no reply text").await?;
            tracing::info!("no provider answered and the fallback text is empty; not replying");
            return Ok(());
        };
        let request = match graph::text_request(row.recipient(), &text, row.wamid.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                self.fail(&conn, row, &format!("cannot address the customer: {e}"))
                    .await?;
                tracing::warn!(error = %e, "AI reply not sent");
                return Ok(());
            }
        };
        let (_, recipient) = graph::recipient_field(row.recipient()).unwrap_or_default();
        match ratelimit::acquire(&conn, &self.settings, Some(&recipient), &self.cancel).await {
            Ok(()) => {}
            Err(RateLimitError::Cancelled) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        // claimed → sending and the outbox row, atomically: either both or neither.
        let outbox: Option<i64> = conn
            .query_opt(
                &format!(
                    "WITH t AS (
                       UPDATE bite_sync.inbox
                          SET ai_state = CASE WHEN delivery_state = 'pending' THEN 'sending' ELSE 'skipped' END,
                              ai_note = CASE WHEN delivery_state = 'pending' THEN NULL ELSE 'backend took it' END,
                              ai_provider = $4
                        WHERE id = $1 AND ai_state = 'claimed' AND ai_by = $2 AND {TOKEN_SQL} = $3
                       RETURNING id, ai_state)
                     INSERT INTO bite_sync.outbox (origin, in_reply_to, recipient, kind, request, state)
                     SELECT 'ai', id, $5, 'text', $6, 'sending' FROM t WHERE ai_state = 'sending'
                     RETURNING id"
                ),
                &[
                    &row.id,
                    &self.settings.replica,
                    &row.token,
                    &provider,
                    &recipient,
                    &request,
                ],
            )
            .await
            .map_err(query("move a message to sending"))?
            .map(|r| r.get(0));
        let Some(outbox) = outbox else {
            tracing::info!(
                "not replying: the backend took the message, or another worker holds the claim"
            );
            return Ok(());
        };
        tracing::Span::current().record("outbox_id", outbox);
        let result = self.send(&request).await;
        let (inbox_state, outbox_state, wamid, error) = match &result {
            Ok(sent) => ("answered", "sent", sent.wamid.clone(), None),
            Err(e) => ("failed", "failed", None, Some(crate::error_chain(e))),
        };
        let note = result.as_ref().err().map(|e| match e.code() {
            Some(code) => format!("graph error {code}"),
            None => "graph api unreachable".to_string(),
        });
        conn.execute(
            "WITH o AS (UPDATE bite_sync.outbox
                           SET state = $2, wamid = $3, error = $4, finished_at = now()
                         WHERE id = $1)
             UPDATE bite_sync.inbox SET ai_state = $5, ai_reply_wamid = $3, ai_note = $6
              WHERE id = $7 AND ai_state = 'sending'",
            &[
                &outbox,
                &outbox_state,
                &wamid,
                &error,
                &inbox_state,
                &note,
                &row.id,
            ],
        )
        .await
        .map_err(query("record an AI reply"))?;
        match result {
            Ok(_) => tracing::info!(outbox_id = outbox, provider, "AI reply sent"),
            Err(e) => {
                tracing::warn!(outbox_id = outbox, code = ?e.code(), error = %e, "AI reply could not be sent")
            }
        }
        Ok(())
    }

    async fn send(&self, request: &Value) -> Result<graph::Sent, GraphError> {
        let mut attempt = 1;
        loop {
            match self.graph.send(request).await {
                Err(e) if e.is_transient() && e.surely_not_sent() && attempt < SEND_ATTEMPTS => {
                    tracing::info!(attempt, code = ?e.code(), "graph api send failed; retrying");
                    let pause = Duration::from_secs(u64::from(attempt));
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(e),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn fail(&self, conn: &Conn, row: &Claimed, note: &str) -> Result<(), FallbackError> {
        self.settle(conn, row, "failed", note).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, age_s: u64) -> Claimed {
        Claimed {
            id,
            customer: "34612345678".into(),
            phone: Some("34612345678".into()),
            user_id: None,
            name: None,
            wamid: Some(format!("wamid.{id}")),
            age: Duration::from_secs(age_s),
            token: 0,
        }
    }

    const FRESH: Duration = Duration::from_secs(600);

    #[test]
    fn one_reply_per_burst_to_the_newest() {
        let plan = plan_group(&[row(3, 30), row(1, 50), row(2, 40)], false, FRESH);
        assert_eq!(
            plan,
            vec![
                (3, Decision::Answer),
                (1, Decision::Skip("superseded")),
                (2, Decision::Skip("superseded"))
            ]
        );
        let plan = plan_group(&[row(3, 30)], true, FRESH);
        assert_eq!(plan, vec![(3, Decision::Skip("superseded"))]);
    }

    #[test]
    fn stale_and_out_of_window_messages_are_skipped() {
        assert_eq!(
            plan_group(&[row(1, 601)], false, FRESH),
            vec![(1, Decision::Skip("stale"))]
        );
        assert_eq!(
            plan_group(&[row(1, 25 * 3600)], false, Duration::from_secs(24 * 3600)),
            vec![(1, Decision::Skip("outside the 24-hour window"))]
        );
        assert_eq!(
            plan_group(&[row(1, 599)], false, FRESH),
            vec![(1, Decision::Answer)]
        );
    }

    #[test]
    fn context_is_capped_on_whole_lines_then_characters() {
        let parts = vec![
            ("Customer", vec!["name: Ana".to_string()]),
            (
                "Menu",
                vec![
                    "name: Paella".to_string(),
                    "name: Tortilla española".to_string(),
                ],
            ),
            ("Empty", vec![]),
        ];
        let full = render_context(&parts, 10_000);
        assert_eq!(
            full,
            "Customer:\n- name: Ana\nMenu:\n- name: Paella\n- name: Tortilla española\n"
        );
        let cut = render_context(&parts, 40);
        assert_eq!(cut.chars().count(), 40);
        assert!(full.starts_with(&cut));
        let tiny = render_context(&parts, 3);
        assert_eq!(tiny, "Cus");
    }

    #[test]
    fn media_without_text_is_named() {
        let text = render_messages(&[
            (Some("text".into()), Some("Hola".into())),
            (Some("image".into()), None),
            (Some("text".into()), Some(" ¿abrís hoy? ".into())),
        ]);
        assert_eq!(text, "Hola\n[image]\n¿abrís hoy?");
    }

    #[test]
    fn the_customer_key_is_the_phones_digits() {
        let mut r = row(1, 0);
        r.phone = Some("+34 612 345 678".into());
        assert_eq!(r.customer_key(), "34612345678");
        r.phone = None;
        r.user_id = Some("US.123".into());
        assert_eq!(r.customer_key(), "US.123");
        assert_eq!(r.recipient(), "US.123");
    }
}
