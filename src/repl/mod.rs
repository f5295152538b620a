//! Continuous replication (`bite-sync run`): the source's logical replication stream
//! (pgoutput), decoded by us and applied to the mirror exactly once.
//!
//! - [`lsn`]: WAL positions.
//! - [`pgoutput`]: the pgoutput protocol decoded, as pure functions over bytes.

pub mod apply;
pub mod batch;
pub mod lsn;
pub mod pgoutput;

pub use lsn::Lsn;
