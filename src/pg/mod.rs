//! Shared PostgreSQL primitives used by every part of bite-sync.
//!
//! - [`ident`]: quoting identifiers and parsing table names and patterns (pure).
//! - [`connect`]: database URLs (with secrets redacted), `sslmode`/TLS, and connecting with
//!   errors that name host, port and database but never the password.
//! - [`grants`]: the exact `GRANT` / `ALTER ... OWNER` statements that give a user what a
//!   command needs, with the real names, and what a `permission denied` means to fix (pure).
//! - [`cluster`]: throwaway local clusters (`initdb` + `pg_ctl`) for the demo, tests and benchmark.

pub mod cluster;
pub mod connect;
pub mod grants;
pub mod ident;
