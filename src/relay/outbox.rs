//! `bite_sync.outbox` rows for the backend's sends, and the `Idempotency-Key` they hold.
//!
//! A send through the relay's API is written here (state `sending`) before it reaches Meta
//! and finished with its outcome after. A send with an `Idempotency-Key` keeps the key and the
//! answer it got, so a retry is answered from the row and never sent again. Invariants:
//! - A key is unique among rows that hold one (a unique index); of two concurrent requests
//!   with one key, one inserts and sends, the other finds the key taken and sends nothing.
//! - A row keeps its key when the message was sent, was refused by Meta, or may have been sent
//!   (state `unknown`: the request reached Meta and no answer came). Only a send that surely
//!   did not reach Meta lets its key go, so a retry with the same key can send.
//! - A row left `sending` longer than [`IN_FLIGHT_LIMIT`] is a send whose outcome nobody will
//!   learn (the relay died mid-send): it is answered as unknown, never sent again.

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

/// Longer than any send takes (the slot wait plus Graph's timeout, with room to spare).
pub const IN_FLIGHT_LIMIT: Duration = Duration::from_secs(60);

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// What an earlier request with the same key left.
#[derive(Debug, Clone, PartialEq)]
pub enum Earlier {
    /// It was answered; this is the answer (HTTP status and body).
    Answered {
        /// Its outbox row.
        id: i64,
        /// The HTTP status.
        status: u16,
        /// The body.
        body: Value,
    },
    /// It is being sent right now.
    InFlight {
        /// Its outbox row.
        id: i64,
    },
    /// It may or may not have been sent, and nobody will know more.
    Unknown {
        /// Its outbox row.
        id: i64,
    },
}

/// Checks an `Idempotency-Key` header value: 1 to [`MAX_KEY_LEN`] visible ASCII characters.
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.iter().all(|b| (0x21..0x7f).contains(b))
}

/// The row holding `key`, if one does.
pub async fn earlier(client: &Client, key: &str) -> Result<Option<Earlier>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT id, state, answer, \
                    extract(epoch FROM clock_timestamp() - created_at)::float8 \
             FROM bite_sync.outbox WHERE idempotency_key = $1",
            &[&key],
        )
        .await?;
    Ok(row.map(|row| {
        let id: i64 = row.get(0);
        let state: String = row.get(1);
        let answer: Option<Value> = row.get(2);
        let age: f64 = row.get(3);
        let answered = answer.as_ref().and_then(|a| {
            let status = a.get("status")?.as_u64()?;
            Some((u16::try_from(status).ok()?, a.get("body")?.clone()))
        });
        match (state.as_str(), answered) {
            (_, Some((status, body))) => Earlier::Answered { id, status, body },
            ("sending", None) if age < IN_FLIGHT_LIMIT.as_secs_f64() => Earlier::InFlight { id },
            _ => Earlier::Unknown { id },
        }
    }))
}

/// Writes the row of a send about to go (state `sending`), holding `key` when given. None:
/// another request took the key in the meantime.
pub async fn insert(
    client: &Client,
    recipient: &str,
    kind: &str,
    request: &Value,
    key: Option<&str>,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "INSERT INTO bite_sync.outbox (origin, recipient, kind, request, state, idempotency_key) \
             VALUES ('api', $1, $2, $3, 'sending', $4) \
             ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
             RETURNING id",
            &[&recipient, &kind, request, &key],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// How a send ended, for its row.
#[derive(Debug, Clone)]
pub struct Finished<'a> {
    /// `sent`, `failed` or `unknown`.
    pub state: &'static str,
    /// Meta's id for the message, when it gave one.
    pub wamid: Option<&'a str>,
    /// Why it failed (no secret, no customer data).
    pub error: Option<&'a str>,
    /// The answer given, kept for retries with the same key.
    pub answer: (u16, &'a Value),
    /// The message surely did not reach Meta: let the key go, so a retry can send.
    pub release_key: bool,
}

/// Records a send's outcome.
pub async fn finish(
    client: &Client,
    id: i64,
    done: &Finished<'_>,
) -> Result<(), tokio_postgres::Error> {
    let answer = serde_json::json!({"status": done.answer.0, "body": done.answer.1});
    client
        .execute(
            "UPDATE bite_sync.outbox SET state = $2, wamid = $3, error = $4, finished_at = now(), \
                 answer = CASE WHEN $5 OR idempotency_key IS NULL THEN NULL ELSE $6::jsonb END, \
                 idempotency_key = CASE WHEN $5 THEN NULL ELSE idempotency_key END \
             WHERE id = $1",
            &[
                &id,
                &done.state,
                &done.wamid,
                &done.error,
                &done.release_key,
                &answer,
            ],
        )
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert!(valid_key(b"order-17-ready"));
        assert!(valid_key(b"550e8400-e29b-41d4-a716-446655440000"));
        assert!(!valid_key(b""));
        assert!(!valid_key(b"has space"));
        assert!(!valid_key("ñ".as_bytes()));
        assert!(!valid_key(&[b'a'; 256]));
        assert!(valid_key(&[b'a'; 255]));
    }
}
