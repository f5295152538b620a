//! Send rate limits shared by every relay replica, kept in `bite_sync.send_slots`.
//!
//! Meta allows a number about 80 messages a second ([`GLOBAL_KEY`], `relay.send_rate`) and one
//! message every ~6 s to the same user (`relay.customer_interval`); going over costs errors
//! 130429 and 131056. A send takes its slot in two steps, each one atomic call of a function in
//! `sql/migrations/0007_relay_sends.sql`:
//! 1. [`reserve`]: a place in the customer's queue (their row's `next_at` moves one interval
//!    on), only if the send can go within `max_wait`, the number's backlog counted; otherwise
//!    nothing changes and the caller answers 429. The sender sleeps until its place comes.
//! 2. [`take`], once the place has come: the number's next slot (`next_at` of [`GLOBAL_KEY`]),
//!    never sooner than one customer interval after the customer's previous send
//!    (`last_sent_at`). The sender sleeps the (short) wait and sends.
//!
//! Invariants:
//! - A refused request reserves nothing, so refusals never push anyone's slots further away.
//! - Two sends to one customer start at least one customer interval apart, and two sends of
//!   the number one global interval apart, whatever the number of replicas: both are decided
//!   in step 2 under the rows' locks, from when the sends actually go.
//! - A send waiting for its customer holds no slot of the number, so it never delays other
//!   customers.
//! - Times are the database's (`clock_timestamp()` after the locks), so replicas' clocks do not
//!   matter; only a wait, a duration, crosses to the sender.
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

/// What step 1 decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// A place in the customer's queue: wait this long, then [`take`].
    Queued(Duration),
    /// The send could not go within the allowed wait; nothing was reserved.
    Refused {
        /// About how long until the send could go.
        retry_after: Duration,
        /// The customer's spacing is what holds it back (else the number's throughput).
        by_customer: bool,
    },
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The customer's key when the settings space a customer's sends.
fn customer_key<'a>(settings: &RelaySettings, customer: Option<&'a str>) -> Option<&'a str> {
    customer.filter(|c| !c.is_empty() && !settings.customer_interval.is_zero())
}

/// Step 1: a place in `customer`'s queue if the send can go within `max_wait`. Without a
/// customer (or with `relay.customer_interval = 0s`) only the number's backlog is judged.
pub async fn reserve(
    client: &Client,
    settings: &RelaySettings,
    customer: Option<&str>,
    max_wait: Duration,
) -> Result<Reservation, RateLimitError> {
    let max = if max_wait == Duration::MAX {
        f64::INFINITY
    } else {
        max_wait.as_secs_f64()
    };
    let (customer_wait, wait, reserved) = match customer_key(settings, customer) {
        Some(customer) => {
            let row = client
                .query_one(
                    "SELECT customer_wait, wait, reserved \
                     FROM bite_sync.reserve_customer_slot($1, $2, $3, $4)",
                    &[
                        &customer,
                        &settings.customer_interval.as_secs_f64(),
                        &GLOBAL_KEY,
                        &max,
                    ],
                )
                .await
                .map_err(RateLimitError::Database)?;
            (row.get::<_, f64>(0), row.get::<_, f64>(1), row.get(2))
        }
        None => {
            let row = client
                .query_one(
                    "SELECT COALESCE(extract(epoch FROM max(next_at) - clock_timestamp())::float8, 0) \
                     FROM bite_sync.send_slots WHERE key = $1",
                    &[&GLOBAL_KEY],
                )
                .await
                .map_err(RateLimitError::Database)?;
            let wait: f64 = row.get(0);
            (0.0, wait, wait <= max)
        }
    };
    Ok(if reserved {
        Reservation::Queued(seconds(customer_wait))
    } else {
        Reservation::Refused {
            retry_after: seconds(wait),
            by_customer: customer_wait >= wait,
        }
    })
}

/// Step 2, when the send is about to go: the number's next slot, no sooner than one customer
/// interval after the customer's previous send. Returns the wait until the send may start.
pub async fn take(
    client: &Client,
    settings: &RelaySettings,
    customer: Option<&str>,
) -> Result<Duration, RateLimitError> {
    let row = client
        .query_one(
            "SELECT wait FROM bite_sync.take_send_slot($1, $2, $3, $4)",
            &[
                &customer_key(settings, customer),
                &settings.customer_interval.as_secs_f64(),
                &GLOBAL_KEY,
                &global_interval(settings.send_rate).as_secs_f64(),
            ],
        )
        .await
        .map_err(RateLimitError::Database)?;
    Ok(seconds(row.get(0)))
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

/// Both steps and their waits, however long: returns when the send may go.
pub async fn acquire(
    client: &Client,
    settings: &RelaySettings,
    customer: Option<&str>,
    cancel: &CancellationToken,
) -> Result<(), RateLimitError> {
    if let Reservation::Queued(wait) = reserve(client, settings, customer, Duration::MAX).await? {
        wait_for_slot(wait, cancel).await?;
    }
    let wait = take(client, settings, customer).await?;
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
