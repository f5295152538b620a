//! Rotating the relay's secrets without downtime: which value of each secret verifies
//! requests.
//!
//! Each of `META_APP_SECRET`, `SYNC_API_KEY` and `JWT_SECRET` may have a `*_PREVIOUS` value
//! beside it during a rotation: requests are checked against both, only the current value
//! signs. Every verification is counted here by secret and by value (current or previous),
//! flushed per replica and minute to `bite_sync.relay_secret_uses`, and summed over the last
//! hour for `/api/webhook/status` and `bite-sync status`: when the previous value has verified
//! nothing for a while, it can be removed. Nothing here holds or shows a secret's value.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::db::{self, Pool};

/// A rotatable secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotated {
    /// `META_APP_SECRET`: Meta's webhook signatures.
    MetaAppSecret,
    /// `SYNC_API_KEY`: the backend's calls to the relay's API.
    SyncApiKey,
    /// `JWT_SECRET`: the backend's JWTs.
    JwtSecret,
}

impl Rotated {
    /// Every rotatable secret.
    pub const ALL: [Rotated; 3] = [
        Rotated::MetaAppSecret,
        Rotated::SyncApiKey,
        Rotated::JwtSecret,
    ];

    /// The environment variable of the current value.
    pub fn name(self) -> &'static str {
        match self {
            Rotated::MetaAppSecret => "META_APP_SECRET",
            Rotated::SyncApiKey => "SYNC_API_KEY",
            Rotated::JwtSecret => "JWT_SECRET",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Verifications not yet flushed: per secret, by the current and by the previous value.
#[derive(Debug, Default)]
pub struct Uses {
    counts: [[AtomicU64; 2]; 3],
}

impl Uses {
    /// One request verified by `secret`'s current (or `previous`) value.
    pub fn record(&self, secret: Rotated, previous: bool) {
        self.counts[secret.index()][usize::from(previous)].fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self, secret: Rotated) -> [u64; 2] {
        let c = &self.counts[secret.index()];
        [
            c[0].swap(0, Ordering::Relaxed),
            c[1].swap(0, Ordering::Relaxed),
        ]
    }

    fn put_back(&self, secret: Rotated, n: [u64; 2]) {
        let c = &self.counts[secret.index()];
        c[0].fetch_add(n[0], Ordering::Relaxed);
        c[1].fetch_add(n[1], Ordering::Relaxed);
    }
}

/// How often counts are flushed.
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Adds the counts to `bite_sync.relay_secret_uses` every few seconds (and at shutdown), and
/// drops rows older than a day.
pub async fn flush(pool: Pool, uses: Arc<Uses>, replica: String, cancel: CancellationToken) {
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(FLUSH_INTERVAL) => false,
            () = cancel.cancelled() => true,
        };
        let taken: Vec<(Rotated, [u64; 2])> = Rotated::ALL
            .into_iter()
            .map(|s| (s, uses.take(s)))
            .filter(|(_, n)| n[0] + n[1] > 0)
            .collect();
        if !taken.is_empty() {
            let result = match pool.get().await {
                Ok(conn) => write(&conn, &replica, &taken).await,
                Err(e) => Err(db::describe(&e)),
            };
            if let Err(e) = result {
                for (s, n) in taken {
                    uses.put_back(s, n);
                }
                tracing::debug!(error = %e, "could not record the secret counters");
            }
        }
        if stop {
            return;
        }
    }
}

async fn write(
    client: &tokio_postgres::Client,
    replica: &str,
    taken: &[(Rotated, [u64; 2])],
) -> Result<(), String> {
    for (secret, [current, previous]) in taken {
        client
            .execute(
                "INSERT INTO bite_sync.relay_secret_uses (replica, secret, minute, current_uses, previous_uses) \
                 VALUES ($1, $2, date_trunc('minute', now()), $3, $4) \
                 ON CONFLICT (replica, secret, minute) DO UPDATE SET \
                     current_uses = relay_secret_uses.current_uses + excluded.current_uses, \
                     previous_uses = relay_secret_uses.previous_uses + excluded.previous_uses",
                &[&replica, &secret.name(), &(*current as i64), &(*previous as i64)],
            )
            .await
            .map_err(|e| crate::error_chain(&e))?;
    }
    client
        .execute(
            "DELETE FROM bite_sync.relay_secret_uses WHERE minute < now() - interval '1 day'",
            &[],
        )
        .await
        .map_err(|e| crate::error_chain(&e))?;
    Ok(())
}

/// One secret's use over the last hour, every replica together.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SecretUse {
    /// `META_APP_SECRET`, `SYNC_API_KEY` or `JWT_SECRET`.
    pub secret: String,
    /// Requests the current value verified in the last hour.
    pub current_last_hour: i64,
    /// Requests the `*_PREVIOUS` value verified in the last hour.
    pub previous_last_hour: i64,
    /// The last minute the previous value verified anything (within the last day).
    pub previous_last_used_at: Option<String>,
}

/// The last hour's uses per secret (only secrets used in the last day).
pub async fn last_hour(
    client: &tokio_postgres::Client,
) -> Result<Vec<SecretUse>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT secret, \
                    COALESCE(sum(current_uses) FILTER (WHERE minute >= now() - interval '1 hour'), 0)::bigint, \
                    COALESCE(sum(previous_uses) FILTER (WHERE minute >= now() - interval '1 hour'), 0)::bigint, \
                    to_char(max(minute) FILTER (WHERE previous_uses > 0) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI\"Z\"') \
             FROM bite_sync.relay_secret_uses WHERE minute >= now() - interval '1 day' \
             GROUP BY secret ORDER BY secret",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SecretUse {
            secret: r.get(0),
            current_last_hour: r.get(1),
            previous_last_hour: r.get(2),
            previous_last_used_at: r.get(3),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_kept_per_secret_and_value() {
        let uses = Uses::default();
        uses.record(Rotated::MetaAppSecret, false);
        uses.record(Rotated::MetaAppSecret, true);
        uses.record(Rotated::MetaAppSecret, true);
        uses.record(Rotated::JwtSecret, false);
        assert_eq!(uses.take(Rotated::MetaAppSecret), [1, 2]);
        assert_eq!(uses.take(Rotated::MetaAppSecret), [0, 0]);
        assert_eq!(uses.take(Rotated::SyncApiKey), [0, 0]);
        uses.put_back(Rotated::JwtSecret, [2, 3]);
        assert_eq!(uses.take(Rotated::JwtSecret), [3, 3]);
    }
}
