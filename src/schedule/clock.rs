//! The scheduler's clock: wall time to decide what is due, and a way to wait for a wall time.
//!
//! Cron times are wall-clock instants, but tokio's timers run on the monotonic clock, which
//! stops while the machine sleeps and does not follow clock corrections. [`SystemClock`]
//! therefore sleeps in chunks of at most a minute and reads the wall clock after each, so a
//! laptop that wakes up or an NTP step is noticed within a minute. [`TokioClock`] is wall time
//! derived from tokio's clock, for tests in paused time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

/// Wall time and waiting for it.
pub trait Clock: Send + Sync {
    /// The current wall time.
    fn now(&self) -> DateTime<Utc>;
    /// Resolves once [`Clock::now`] is at or past `at` (at once if it already is).
    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()>;
}

/// The longest single sleep of [`SystemClock`] before it looks at the wall clock again.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The machine's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            while let Some(nap) = nap(at - Utc::now()) {
                tokio::time::sleep(nap).await;
            }
        })
    }
}

/// How long to sleep with `left` to go: none when due, else at most [`MAX_SLEEP`].
fn nap(left: chrono::TimeDelta) -> Option<Duration> {
    match left.to_std() {
        Ok(left) if !left.is_zero() => Some(left.min(MAX_SLEEP)),
        // Negative (to_std refuses it) or zero: due.
        _ => None,
    }
}

/// Wall time that starts at a chosen instant and advances with tokio's clock, so under
/// `tokio::time::pause()` (`#[tokio::test(start_paused = true)]`) days pass in milliseconds
/// and sleeps end exactly when due.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: DateTime<Utc>,
    started: tokio::time::Instant,
}

impl TokioClock {
    /// A clock that reads `start` now.
    pub fn starting_at(start: DateTime<Utc>) -> TokioClock {
        TokioClock {
            start,
            started: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = self.started.elapsed();
        self.start + chrono::TimeDelta::from_std(elapsed).unwrap_or(chrono::TimeDelta::MAX)
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()> {
        let offset = (at - self.start).to_std().unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep_until(self.started + offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let start = Utc.with_ymd_and_hms(2026, 3, 8, 6, 0, 0).unwrap();
        let clock = TokioClock::starting_at(start);
        assert_eq!(clock.now(), start);
        let at = start + chrono::TimeDelta::hours(5);
        clock.sleep_until(at).await;
        assert_eq!(clock.now(), at);
        // A time already past returns at once.
        clock.sleep_until(start).await;
        assert_eq!(clock.now(), at);
    }

    #[test]
    fn system_clock_naps_at_most_a_minute_so_it_notices_clock_jumps() {
        use chrono::TimeDelta;
        assert_eq!(nap(TimeDelta::hours(6)), Some(MAX_SLEEP));
        assert_eq!(nap(TimeDelta::seconds(10)), Some(Duration::from_secs(10)));
        assert_eq!(nap(TimeDelta::zero()), None);
        assert_eq!(nap(TimeDelta::seconds(-5)), None);
    }
}
