//! A small pool of connections to the relay's database (`DATABASE_URL`), on deadpool.
//!
//! Connections are made with [`DbUrl::connect`] (TLS per sslmode, keepalives, redacted errors)
//! and a closed one is dropped at checkout, so a database restart costs the requests in flight,
//! not the relay. Waiting for a connection is bounded: a request that cannot get one in time
//! fails (the webhook answers 503, Meta retries) instead of queueing forever.

use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult, Timeouts};
use tokio_postgres::Client;

use crate::pg::connect::{ConnectError, DbUrl};

/// Makes and checks connections for the pool.
#[derive(Debug)]
pub struct Manager {
    url: DbUrl,
}

impl managed::Manager for Manager {
    type Type = Client;
    type Error = ConnectError;

    async fn create(&self) -> Result<Client, ConnectError> {
        self.url.connect().await
    }

    async fn recycle(&self, client: &mut Client, _: &Metrics) -> RecycleResult<ConnectError> {
        if client.is_closed() {
            return Err(RecycleError::message("the connection is closed"));
        }
        Ok(())
    }
}

/// The pool.
pub type Pool = managed::Pool<Manager>;
/// A checked-out connection (derefs to [`Client`]; returned to the pool on drop).
pub type Conn = managed::Object<Manager>;
/// Checking out failed: no connection in time, or connecting failed.
pub type PoolError = managed::PoolError<ConnectError>;

/// A pool of at most `size` connections to `url`; checkout waits at most `wait`.
pub fn pool(url: &DbUrl, size: usize, wait: Duration) -> Pool {
    managed::Pool::builder(Manager { url: url.clone() })
        .max_size(size)
        .timeouts(Timeouts {
            wait: Some(wait),
            create: Some(Duration::from_secs(10)),
            recycle: Some(Duration::from_secs(5)),
        })
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .expect("a pool with a runtime and timeouts builds")
}

/// One line for a pool error, with the connect error's redacted chain.
pub fn describe(error: &PoolError) -> String {
    match error {
        managed::PoolError::Backend(e) => crate::error_chain(e),
        managed::PoolError::Timeout(_) => "timed out waiting for a database connection".into(),
        other => other.to_string(),
    }
}
