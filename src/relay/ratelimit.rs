//! Send rate limits shared by every relay replica, kept in `bite_sync.send_slots`.
//!
//! Meta allows a number about 80 messages a second ([`GLOBAL_KEY`], `relay.send_rate`) and one
//! message every ~6 s to the same user (`relay.customer_interval`); going over costs errors
//! 130429 and 131056. Each key's row holds the earliest time the next send may go. A sender
//! reserves a slot with one atomic upsert that moves `next_at` past its slot and returns the
//! slot's start, then sleeps until then. Invariants:
//! - Reservations for one key never overlap, whatever the number of replicas: the upsert takes
//!   the row lock, so two reservations are serialized by Postgres and each gets its own slot.
//! - Times are the database's (`now()`), so replicas' clocks do not matter; only the wait, a
//!   duration, crosses to the sender.
//! - The customer's slot is reserved first and the global slot no earlier than it, so a send
//!   held back for the customer does not waste a global slot meant for someone else.
//! - A reservation abandoned (cancellation, crash) only delays later sends; it never lets two
//!   sends through at once.

use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::settings::RelaySettings;

/// The key of the business number's own limit.
pub const GLOBAL_KEY: &str = "*";

/// Reserving a slot failed.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// The database did not answer.
    #[error("failed to reserve a send slot")]
    Database(#[source] tokio_postgres::Error),
    /// Shutdown came while waiting for the slot.
    #[error("cancelled while waiting for a send slot")]
    Cancelled,
}

impl RateLimitError {
    /// Database trouble is worth retrying later; a shutdown is not.
    pub fn is_transient(&self) -> bool {
        matches!(self, RateLimitError::Database(_))
    }
}

/// The minimum spacing of sends for the whole number: `1 / send_rate` seconds.
pub fn global_interval(send_rate: u32) -> Duration {
    Duration::from_secs_f64(1.0 / f64::from(send_rate.max(1)))
}

/// Reserves the next slot of `key`, `interval` wide, starting no earlier than
/// `now() + not_before`. Returns how long to wait until the slot starts.
pub async fn reserve(
    client: &Client,
    key: &str,
    interval: Duration,
    not_before: Duration,
) -> Result<Duration, tokio_postgres::Error> {
    let row = client
        .query_one(
            "INSERT INTO bite_sync.send_slots AS s (key, next_at) \
             VALUES ($1, now() + make_interval(secs => $3) + make_interval(secs => $2)) \
             ON CONFLICT (key) DO UPDATE \
               SET next_at = GREATEST(s.next_at, now() + make_interval(secs => $3)) \
                             + make_interval(secs => $2) \
             RETURNING extract(epoch FROM s.next_at - make_interval(secs => $2) - now())::float8",
            &[&key, &interval.as_secs_f64(), &not_before.as_secs_f64()],
        )
        .await?;
    let wait: f64 = row.get(0);
    Ok(Duration::from_secs_f64(wait.max(0.0)))
}

/// Reserves the customer's slot (when the settings space a customer's sends) and then the
/// number's; returns the wait until both allow the send.
pub async fn reserve_send(
    client: &Client,
    settings: &RelaySettings,
    customer: Option<&str>,
) -> Result<Duration, RateLimitError> {
    let mut wait = Duration::ZERO;
    if let Some(customer) = customer.filter(|c| !c.is_empty())
        && !settings.customer_interval.is_zero()
    {
        wait = reserve(client, customer, settings.customer_interval, Duration::ZERO)
            .await
            .map_err(RateLimitError::Database)?;
    }
    let global = reserve(
        client,
        GLOBAL_KEY,
        global_interval(settings.send_rate),
        wait,
    )
    .await
    .map_err(RateLimitError::Database)?;
    Ok(wait.max(global))
}

/// Sleeps `wait`, or returns [`RateLimitError::Cancelled`] as soon as `cancel` fires.
pub async fn wait_for_slot(
    wait: Duration,
    cancel: &CancellationToken,
) -> Result<(), RateLimitError> {
    if wait.is_zero() {
        return Ok(());
    }
    tokio::select! {
        _ = cancel.cancelled() => Err(RateLimitError::Cancelled),
        _ = tokio::time::sleep(wait) => Ok(()),
    }
}

/// [`reserve_send`] then [`wait_for_slot`].
pub async fn acquire(
    client: &Client,
    settings: &RelaySettings,
    customer: Option<&str>,
    cancel: &CancellationToken,
) -> Result<(), RateLimitError> {
    let wait = reserve_send(client, settings, customer).await?;
    wait_for_slot(wait, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_interval_follows_the_rate() {
        assert_eq!(global_interval(80), Duration::from_micros(12_500));
        assert_eq!(global_interval(1), Duration::from_secs(1));
        assert_eq!(global_interval(0), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_stops_at_cancellation() {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            c.cancel();
        });
        let r = wait_for_slot(Duration::from_secs(3600), &cancel).await;
        assert!(matches!(r, Err(RateLimitError::Cancelled)));
        assert!(wait_for_slot(Duration::ZERO, &cancel).await.is_ok());
    }
}
