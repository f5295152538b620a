//! Continuous replication (`bite-sync run`): the source's logical replication stream
//! (pgoutput), decoded by us and applied to the mirror exactly once.
//!
//! - [`lsn`]: WAL positions.

pub mod lsn;

pub use lsn::Lsn;
