//! Continuous replication (`bite-sync run`): the source's logical replication stream
//! (pgoutput), decoded by us and applied to the mirror exactly once.
//!
//! - [`lsn`]: WAL positions.
//! - [`conn`]: the replication connection (`replication=database`): slots, exported
//!   snapshots, `START_REPLICATION` and a cancel-safe stream of WAL messages.
//! - [`pgoutput`]: the pgoutput protocol decoded, as pure functions over bytes.

pub mod conn;
pub mod lsn;
pub mod pgoutput;

pub use lsn::Lsn;
