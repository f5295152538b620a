//! bite-sync: keeps a restaurant's cloud PostgreSQL mirror in step with its local database.
//!
//! Everything testable lives in this library; `main.rs` only parses the command line, loads
//! configuration, sets up logging and maps errors to exit codes.
//!
//! | module | job |
//! |---|---|
//! | [`cli`] | the command line (clap derive) |
//! | [`config`] | `bite-sync.toml` + environment + flags, validated into one [`config::Config`] |
//! | [`pg`] | shared PostgreSQL primitives: connecting (TLS, redacted URLs), identifiers, throwaway clusters |
//! | [`bookkeeping`] | the `bite_sync` schema on the mirror: migrations and run records |
//! | [`sync`] | on-demand table sync: catalog → DDL → staged binary COPY → atomic swap |
//! | [`sample`] | the sample restaurant schema and data generator |
//! | [`demo`] | `bite-sync demo`: a throwaway source/mirror pair with the sample restaurant |
//! | [`bench`] | `bite-sync bench`: bite-sync against `pg_dump \| psql` on the same clusters |

pub mod bench;
pub mod bookkeeping;
pub mod cli;
pub mod config;
pub mod demo;
pub mod pg;
pub mod sample;
pub mod sync;
