//! Continuous replication (`bite-sync run`): the source's logical replication stream
//! (pgoutput), decoded by us and applied to the mirror exactly once.
//!
//! - [`lsn`]: WAL positions.
//! - [`conn`]: the replication connection (`replication=database`): slots, exported
//!   snapshots, `START_REPLICATION` and a cancel-safe stream of WAL messages.
//! - [`pgoutput`]: the pgoutput protocol decoded, as pure functions over bytes.
//! - [`batch`]: decoded changes turned into few grouped statements (pure).
//! - [`apply`]: batches applied to the mirror, each with the source position it reaches.
//! - [`preflight`]: every precondition of a start, checked before anything changes.
//! - [`setup`]: publication, slot, table copies, and where the stream starts.
//! - [`daemon`]: the `bite-sync run` loop: sessions, retries, feedback, stopping.
//! - [`sequences`]: the mirror's sequences kept at or above the source's.
//! - [`status`], [`check`]: `bite-sync status` and `bite-sync check`; [`privileges`]: the
//!   privileges each command needs, which `check` tests.

pub mod apply;
pub mod batch;
pub mod check;
pub mod conn;
pub mod daemon;
pub mod lsn;
pub mod pgoutput;
pub mod preflight;
pub mod privileges;
pub mod sequences;
pub mod setup;
pub mod status;

pub use lsn::Lsn;
