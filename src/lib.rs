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
//! | [`repl`] | continuous replication: the replication connection, pgoutput decoding, exactly-once batched apply |
//! | [`sync`] | on-demand table sync: catalog → DDL → staged binary COPY → atomic swap |
//! | [`sample`] | the sample restaurant schema and data generator |
//! | [`demo`] | `bite-sync demo`: a throwaway source/mirror pair with the sample restaurant |
//! | [`backup`] | `bite-sync backup`, `backups`, `restore`: dumps to a folder or S3, manifest, retention |
//! | [`schedule`] | cron schedules (`schedules/*.toml`): DST-correct next fire times, the scheduler loop, `bite-sync schedules` |
//! | [`bench`] | `bite-sync bench`: bite-sync against `pg_dump \| psql` on the same clusters |
//! | [`relay`] | `bite-sync relay`: the WhatsApp webhook endpoint, its durable inbox, delivery to the backend, the AI fallback |
//! | [`proxy`] | a delaying TCP proxy that simulates a WAN and connection cuts (tests, bench) |

pub mod alert;
pub mod backup;
pub mod bench;
pub mod bookkeeping;
pub mod cli;
pub mod config;
pub mod demo;
pub mod pg;
pub mod proxy;
pub mod relay;
pub mod repl;
pub mod sample;
pub mod schedule;
pub mod sync;

/// Like `println!`, but a closed standard output (`bite-sync sync --json | head`) is ignored
/// instead of panicking. The process keeps SIGPIPE ignored (Rust's default) because its
/// long-lived database sockets must see a reset as an error, not die of the signal.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Like `print!`, with [`outln!`]'s handling of a closed standard output.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// An error and its causes on one line, `outer: inner: root`, as the CLI prints them and the
/// bookkeeping stores them. A cause whose text the message already ends with is not repeated
/// (`#[error(transparent)]`-style wrappers).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
