//! The command line (clap derive). Every flag can also come from an environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;

/// Keeps a restaurant's cloud PostgreSQL mirror in step with its local database.
///
/// bite-sync runs next to the restaurant's database and only ever dials out. Start with
/// `bite-sync demo` to see it work on two throwaway local databases.
#[derive(Debug, Parser)]
#[command(name = "bite-sync", version, propagate_version = true)]
pub struct Cli {
    /// Config file [default: ./bite-sync.toml if present]
    #[arg(long, global = true, env = "BITE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// More log output (-v debug, -vv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Only warnings and errors
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Log format on stderr
    #[arg(
        long,
        global = true,
        env = "BITE_LOG_FORMAT",
        value_enum,
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormat>,

    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
///
/// Prose in their doc comments is reflowed by clap to the terminal's width; examples, lists
/// and exit codes, whose lines must not be reflowed, are in `after_long_help` constants,
/// each line short enough for an 80-column terminal (a test checks both).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy tables (schema and data) from the local database to the mirror, atomically
    ///
    /// All tables are read from one snapshot of the source, built beside the mirror's
    /// current tables, and swapped in together in one short transaction: readers of the
    /// mirror see the old rows until then, never an empty or half-filled table. A run that
    /// is interrupted leaves the mirror as it was.
    #[command(after_long_help = SYNC_HELP)]
    Sync(SyncArgs),

    /// Keep the mirror in step with the local database continuously (the daemon); also run
    /// the scheduled jobs and deliver WhatsApp messages to the backend
    ///
    /// Streams the source's changes (logical replication, dialing out only) and applies them
    /// to the mirror in batches, each recorded with the source position it reaches, so a
    /// restart after a crash neither loses nor repeats a change. On first start it creates a
    /// publication and a replication slot on the source and copies the tables; a table added
    /// to the list later is copied at the next start. Lost connections are retried with
    /// backoff; SIGTERM or Ctrl-C finishes the batch in flight and exits 0.
    ///
    /// Tables come from --tables or replication.tables in bite-sync.toml. Check the set-up
    /// first with `bite-sync check`; watch it with `bite-sync status`.
    ///
    /// It also runs the scheduled jobs of schedules/*.toml (see `bite-sync schedules
    /// --help`), checked before anything connects: a bad file or a job the configuration
    /// cannot run exits 2 naming the file, the job and the key. A job never runs twice at
    /// once; one whose last run was missed while bite-sync was down runs once at start.
    /// Every run (start, end, outcome, size) is recorded in the mirror's bite_sync.job_runs
    /// when the mirror has bite-sync's bookkeeping (or --init creates it); otherwise in
    /// memory, with a warning. Without tables to replicate it runs the schedules (and
    /// delivery) only. SIGTERM or Ctrl-C lets a backup or backup check in progress finish (a
    /// sync in progress is abandoned, leaving the mirror as it was).
    ///
    /// With LOCAL_BACKEND_URL (or delivery.backend_url) set and SYNC_ENABLED not false, it
    /// also delivers the WhatsApp messages, statuses and changes that `bite-sync relay`
    /// stored in the mirror's inbox: each one POSTed to LOCAL_BACKEND_URL +
    /// /cloud-sync/webhook in Meta's webhook shape, with idempotency-key (the message id)
    /// and, with SYNC_API_KEY set, x-api-key and x-bite-signature-256 (HMAC-SHA256 of the
    /// body). Dialing out only, it LISTENs on the mirror for new rows and also looks every
    /// second. Delivery is at least once and in order per customer: a row the backend
    /// refuses (not 2xx, timeout, down) is retried after 1 s, 2 s, 4 s ... up to
    /// delivery.max_backoff, and holds back that customer's later rows only. Several daemons
    /// (and the relay in push mode) can deliver from one inbox at once. A mirror without the
    /// inbox is reported and retried until the relay (or --init) creates it. SIGTERM or
    /// Ctrl-C finishes the requests in flight. Delivery may be all it runs: no tables and no
    /// schedules needed.
    #[command(after_long_help = RUN_HELP)]
    Run(RunArgs),

    /// Back up the local database to S3-compatible storage or a folder
    ///
    /// Reads every table (or --tables) from one consistent snapshot, several at a time
    /// (partitioned tables partition by partition; a --tables name brings all its partitions),
    /// compresses them with gzip straight into the store (no temporary files), and writes a
    /// manifest last: bite-sync's version, the source, the snapshot's time and WAL position,
    /// each table's row count and checksum, each object's size and SHA-256. A backup without
    /// its manifest never finished and is never listed as good nor restored.
    ///
    /// The schema comes from pg_dump (found automatically; functions, triggers and views
    /// included); a --tables backup generates its tables' schema itself.
    #[command(after_long_help = BACKUP_HELP)]
    Backup(BackupArgs),

    /// List, verify and prune backups; make a key for encrypted ones
    #[command(subcommand)]
    Backups(BackupsCommand),

    /// Restore a backup into a database
    ///
    /// Creates the schema, loads the tables, builds indexes and keys, adds foreign keys,
    /// refreshes the materialized views the source had populated and sets the sequences, all
    /// in one transaction: the target ends with the whole backup or, when anything fails (an
    /// object the target cannot create, a lost connection, a corrupt object), as it was; the
    /// message says which. Every object's SHA-256 is checked as it streams in. Refuses a
    /// target that already has tables unless --clean, which first empties the target of
    /// everything a backup creates: every schema and the publications, event triggers and
    /// extensions (the backup's tables only, for a --tables backup). An encrypted backup needs
    /// its identity: backup.identity_file or BITE_BACKUP_IDENTITY.
    #[command(after_long_help = RESTORE_HELP)]
    Restore(RestoreArgs),

    /// Show replication: slot, retained WAL, lag, per-table state, last error
    ///
    /// Reads the source's replication slot and the mirror's bookkeeping; works while
    /// `bite-sync run` is running or not. Exit code 0 when streaming and healthy, 1 when
    /// something needs attention (a paused table, a lost slot, an error), 2 on bad usage.
    Status(StatusArgs),

    /// Check that source and mirror are ready for replication
    ///
    /// Checks reachability, server versions, wal_level, replication slots and WAL senders,
    /// the privileges each command needs (on the source: REPLICATION, reading the tables,
    /// creating the publication; on the mirror: creating in the database and its schemas,
    /// owning bite_sync and the synced tables) and that every table has a primary key or
    /// replica identity. Each line says OK or what to change, with the exact GRANT or ALTER
    /// to run. Exit code 0 when everything is OK, 1 otherwise.
    Check(CheckArgs),

    /// List scheduled jobs: when each runs next and how its last run went
    ///
    /// Jobs are [[job]] tables in schedules/*.toml (next to the config file, else in the
    /// working directory); `bite-sync run` runs them. Each has a name, a 5-field crontab
    /// expression read in its time_zone, a kind (backup, sync, verify or prune) and the
    /// kind's arguments (see below).
    ///
    /// Cron is crontab's: ranges (1-5), steps (*/15), lists (1,15), names (mon, jan), 0 or 7
    /// for Sunday, @hourly/@daily/@weekly/@monthly/@yearly; day-of-month and day-of-week
    /// both restricted means either. On a DST change a fixed time that does not exist runs
    /// once right after the jump and one that happens twice runs once.
    ///
    /// Every file is checked, and every job against the configuration as `bite-sync run`
    /// checks it (a backup needs a location: its own, backup.url or BITE_BACKUP_URL); every
    /// problem is listed, each with its file, job and key. The last run comes from the
    /// mirror's bookkeeping (bite_sync.job_runs); without a reachable mirror it shows as
    /// unknown and a note on stderr says why.
    #[command(after_long_help = SCHEDULES_HELP)]
    Schedules(SchedulesArgs),

    /// Serve WhatsApp Business webhooks (the cloud half, on Railway)
    ///
    /// The endpoint Meta calls: `GET /api/webhook` answers Meta's verification with
    /// WHATSAPP_VERIFY_TOKEN; `POST /api/webhook` checks X-Hub-Signature-256 with
    /// META_APP_SECRET on the raw body (401 if missing or wrong), stores every message,
    /// status and change of the batch in the database's durable inbox (bite_sync.inbox,
    /// deduplicated by WhatsApp's ids) in one transaction, and only then answers 200. A
    /// signed body it cannot read is kept as a dead letter and answered 200 so Meta does not
    /// retry it.
    ///
    /// Messages reach the restaurant's backend from the inbox: pulled by `bite-sync run` at
    /// the restaurant (the default; no open port needed there), or pushed by the relay when
    /// DELIVERY_MODE=push and LOCAL_BACKEND_URL is reachable from the cloud. A message the
    /// backend has not taken within 20 s gets one AI reply built from the mirror (OpenAI,
    /// Gemini or Anthropic, whichever key is set).
    ///
    /// Also: `GET /api/sync/health` (200 with mirror freshness; 503 when the database is
    /// down; Railway's health check), `GET /api/webhook/status` (counters), and for the
    /// backend `POST /api/messages` and Meta's own `POST /{version}/{phone_number_id}/messages`
    /// and `/media` (send WhatsApp messages through the relay, without Meta's token).
    #[command(after_long_help = RELAY_HELP)]
    Relay(RelayArgs),

    /// Run bite-sync on two throwaway local databases with a sample restaurant
    ///
    /// Starts a local PostgreSQL pair in a temporary directory (needs PostgreSQL's server
    /// binaries, e.g. Debian's postgresql-15), loads the sample restaurant, syncs it, and
    /// shows how to look at the result. Ctrl-C stops and removes everything it made.
    Demo(DemoArgs),

    /// Benchmark bite-sync on throwaway local databases
    ///
    /// `bench sync` (the default) races `bite-sync sync` against `pg_dump | psql`; `bench
    /// replication` races `bite-sync run` against PostgreSQL's native logical replication
    /// and measures catch-up over a WAN, steady-state lag and memory; `bench backup` races
    /// `bite-sync backup` and `restore` against `pg_dump | gzip` and `gunzip | psql`; `bench
    /// relay` posts signed webhooks to `bite-sync relay` and to a no-op handler: ack
    /// latency, loss, peak durable throughput and memory.
    #[command(after_long_help = BENCH_HELP)]
    Bench(BenchArgs),
}

const SYNC_HELP: &str = "\
Examples:
  bite-sync sync --tables customers,orders
  bite-sync sync --tables 'sales.*' --exclude sales.audit_log --jobs 4
  bite-sync sync --dry-run       # show the plan and the DDL, change nothing
  bite-sync sync --init          # first sync into a fresh mirror database

Exit codes: 0 success, 1 failure, 2 usage or configuration error,
130 interrupted (the mirror keeps its previous rows).";

const RUN_HELP: &str = "\
Examples:
  bite-sync run --init --tables customers,menu_items,orders,order_items
  bite-sync run                  # tables, slot and URLs from bite-sync.toml
  bite-sync run --schedules /etc/bite-sync/schedules
  LOCAL_BACKEND_URL=http://localhost:3000/api \\
    bite-sync run --mirror URL   # delivery only

Exit codes: 0 stopped by a signal, 1 failure, 2 usage or configuration
error (also: no tables to replicate, no scheduled jobs and no delivery).";

const BACKUP_HELP: &str = "\
Restore with `bite-sync restore`, or with stock tools from a copy of a backup:
  gunzip -c 20261129T060000Z/*.sql.gz | psql -X -v ON_ERROR_STOP=1 -d newdb

Examples:
  bite-sync backup --to s3://my-bucket/bite-sync   # AWS_* for credentials
  bite-sync backup --to file:///var/backups/bite-sync --tables customers,orders
  bite-sync backup --json        # where to: backup.url in bite-sync.toml

Exit codes: 0 success, 1 failure, 2 usage or configuration error, 3 the
store or the database could not be reached (worth retrying).";

const RESTORE_HELP: &str = "\
Examples:
  bite-sync restore latest --target postgres://postgres@localhost/restored
  bite-sync restore 20261129T060000Z --from s3://my-bucket/bite-sync \\
    --target URL --clean
  bite-sync restore latest --tables customers,orders --target URL

Exit codes: 0 success, 1 failure, 2 usage or configuration error (or no
or the wrong identity), 3 unreachable, 4 the backup is corrupt.";

const SCHEDULES_HELP: &str = "\
A job:
  [[job]]
  name = \"backup\"
  cron = \"0 */6 * * *\"              # minute hour day-of-month month weekday
  time_zone = \"America/Mexico_City\" # IANA name; default UTC
  kind = \"backup\"
  to = \"s3://my-bucket/bite-sync\"   # optional; backup: to, tables;
                                    # sync: tables; verify: from, backup;
                                    # prune: from
  enabled = true                    # optional

Examples:
  bite-sync schedules            # schedules/*.toml, as text
  bite-sync schedules --json     # a JSON array, one object per job
  bite-sync schedules --dir /etc/bite-sync/schedules
  bite-sync schedules --dir schedules.example   # the committed examples

Exit codes: 0 listed, 2 a schedule file is invalid or a job could not run
(or another usage error).";

const RELAY_HELP: &str = "\
Settings are the old guide's environment variables:
  DATABASE_URL            the cloud database (required)
  WHATSAPP_VERIFY_TOKEN   the Verify token typed in Meta's dashboard (required)
  META_APP_SECRET         the App secret (required)
  WHATSAPP_ACCESS_TOKEN, WHATSAPP_PHONE_NUMBER_ID
                          to send replies
  OPENAI_API_KEY, GEMINI_API_KEY, ANTHROPIC_API_KEY
                          AI fallback (the first set is used)
  LOCAL_BACKEND_URL, SYNC_API_KEY, SYNC_ENABLED
                          delivery to the backend
  JWT_SECRET              accepted on POST /api/messages besides SYNC_API_KEY
  META_APP_SECRET_PREVIOUS, SYNC_API_KEY_PREVIOUS, JWT_SECRET_PREVIOUS
                          also accepted while a secret is rotated (README)
  PORT                    default 5000
and [relay]/[delivery] in bite-sync.toml for the rest (bite-sync.example.toml).

Examples:
  PORT=5000 DATABASE_URL=postgres://… WHATSAPP_VERIFY_TOKEN=… \\
    META_APP_SECRET=… bite-sync relay
  bite-sync relay --bind 127.0.0.1   # this machine only
  curl -G localhost:5000/api/webhook -d hub.mode=subscribe \\
    -d hub.verify_token=… -d hub.challenge=42   # 42, as Meta expects

Exit codes: 0 stopped by a signal (requests in flight are answered first),
1 failure, 2 configuration error (every problem listed), 3 the database is
unreachable at start.";

const BENCH_HELP: &str = "\
Examples:
  bite-sync bench                # the sync benchmark, default size
  bite-sync bench sync --rounds 1
  bite-sync bench replication
  bite-sync bench replication --transactions 5000 --duration 10s --json
  bite-sync bench relay          # 500 webhooks/s for 60 s, then the peak";

/// Where the two databases are.
#[derive(Debug, Args, Clone, Default)]
pub struct DatabaseArgs {
    /// The local database URL, e.g. postgres://bite@localhost/bite
    #[arg(
        long,
        env = "BITE_SOURCE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub source: Option<String>,

    /// The mirror database URL (Railway's), e.g. postgres://...?sslmode=verify-full
    #[arg(
        long,
        env = "BITE_MIRROR_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub mirror: Option<String>,
}

/// `bite-sync sync`.
#[derive(Debug, Args, Clone, Default)]
pub struct SyncArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DatabaseArgs,

    /// Tables to sync, comma-separated: customers,orders  sales.orders  '"Order Items"'  'archive.*'
    /// [default: sync.tables from the config file, else every table]
    #[arg(long, short = 't', env = "BITE_TABLES", value_name = "LIST")]
    pub tables: Option<String>,

    /// Tables to leave out, same syntax as --tables
    #[arg(long, env = "BITE_EXCLUDE", value_name = "LIST")]
    pub exclude: Option<String>,

    /// Create missing tables and add missing columns; copy no rows
    #[arg(long, conflicts_with = "data_only")]
    pub schema_only: bool,

    /// Copy rows only; the mirror's tables must already exist with the source's columns
    #[arg(long)]
    pub data_only: bool,

    /// Tables built in parallel (each uses one connection per database) [default: 2]
    #[arg(long, short = 'j', env = "BITE_JOBS", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: Option<u16>,

    /// Show the plan (tables, order, DDL) and change nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Print a machine-readable JSON summary on stdout
    #[arg(long)]
    pub json: bool,

    /// Allow the first sync into a database that has no bite_sync bookkeeping yet
    #[arg(long)]
    pub init: bool,

    /// How long the final swap waits for readers' locks before retrying, e.g. 10s
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub lock_timeout: Option<std::time::Duration>,
}

/// `bite-sync backup`.
#[derive(Debug, Args, Clone, Default)]
pub struct BackupArgs {
    /// The local database URL [default: source.url in bite-sync.toml]
    #[arg(
        long,
        env = "BITE_SOURCE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub source: Option<String>,

    /// Where to: s3://bucket/prefix or file:///dir [default: backup.url in bite-sync.toml]
    #[arg(long, env = "BITE_BACKUP_URL", value_name = "URL")]
    pub to: Option<String>,

    /// Only these tables, comma-separated [default: the whole database]
    #[arg(long, short = 't', value_name = "LIST")]
    pub tables: Option<String>,

    /// Parallel connections [default: backup.jobs, else 2]
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<u16>,

    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// Where backups are read from.
#[derive(Debug, Args, Clone, Default)]
pub struct FromArgs {
    /// The backups' location: s3://bucket/prefix or file:///dir [default: backup.url]
    #[arg(long, env = "BITE_BACKUP_URL", value_name = "URL")]
    pub from: Option<String>,
}

/// `bite-sync backups ...`.
#[derive(Debug, Subcommand, Clone)]
pub enum BackupsCommand {
    /// List backups, oldest first; `incomplete` ones never finished and are not restorable
    #[command(after_long_help = "\
Examples:
  bite-sync backups list
  bite-sync backups list --from s3://my-bucket/bite-sync --json")]
    List(BackupsListArgs),

    /// Prove a backup restores: check every SHA-256, restore it into a scratch database,
    /// compare every table's rows and checksum with the manifest, drop the scratch database
    ///
    /// The scratch database is created on the server of --scratch (default: the source's
    /// server), so its user needs CREATEDB. An encrypted backup needs its identity:
    /// backup.identity_file or BITE_BACKUP_IDENTITY.
    #[command(after_long_help = "\
Examples:
  bite-sync backups verify       # the newest backup
  bite-sync backups verify 20261129T060000Z --json

Exit codes: 0 verified, 1 a table differs or it failed, 2 no or the wrong
identity, 4 an object is corrupt.")]
    Verify(BackupsVerifyArgs),

    /// Delete backups the retention policy does not keep
    ///
    /// Keeps the newest --keep-last backups, plus the newest backup of each of the last
    /// --keep-daily days, --keep-weekly ISO weeks and --keep-monthly months that have one
    /// (UTC). The newest good backup is always kept. Folders of backups that never finished
    /// are deleted once they are a day old. Defaults: backup.keep_* in bite-sync.toml, else
    /// 4 last, 7 daily, 4 weekly, 6 monthly.
    #[command(after_long_help = "\
Examples:
  bite-sync backups prune --dry-run   # what would go, and why the rest stays
  bite-sync backups prune --keep-daily 14 --json")]
    Prune(BackupsPruneArgs),

    /// Make a new age key pair for encrypted backups: the identity (secret) on stdout or in
    /// --out FILE (mode 0600), its public key on stderr
    ///
    /// The public key goes in backup.encrypt_to on the machine that backs up; the identity
    /// (backup.identity_file or BITE_BACKUP_IDENTITY) is needed only to restore or verify,
    /// so keep it elsewhere. `age-keygen` makes the same kind of key. Needs no
    /// configuration.
    #[command(after_long_help = "\
Examples:
  bite-sync backups keygen --out bite-backup-key.txt
  bite-sync backups keygen > key.txt")]
    Keygen(BackupsKeygenArgs),
}

/// `bite-sync backups keygen`.
#[derive(Debug, Args, Clone, Default)]
pub struct BackupsKeygenArgs {
    /// Write the identity to this new file (mode 0600; an existing file is never overwritten)
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
}

/// `bite-sync backups prune`.
#[derive(Debug, Args, Clone, Default)]
pub struct BackupsPruneArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub from: FromArgs,

    /// Keep the newest N backups
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,

    /// Keep the newest backup of each of the last N days
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,

    /// Keep the newest backup of each of the last N weeks
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,

    /// Keep the newest backup of each of the last N months
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,

    /// Show what would be deleted; delete nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync backups list`.
#[derive(Debug, Args, Clone, Default)]
pub struct BackupsListArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub from: FromArgs,

    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync backups verify`.
#[derive(Debug, Args, Clone, Default)]
pub struct BackupsVerifyArgs {
    /// The backup's id, or `latest`
    #[arg(default_value = "latest")]
    pub id: String,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub from: FromArgs,

    /// A database URL on the server to restore into a scratch database [default: the source's]
    #[arg(long, value_name = "URL", hide_env_values = true)]
    pub scratch: Option<String>,

    /// The local database URL (its server hosts the scratch database by default)
    #[arg(
        long,
        env = "BITE_SOURCE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub source: Option<String>,

    /// Parallel connections [default: backup.jobs, else 2]
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<u16>,

    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync restore`.
#[derive(Debug, Args, Clone, Default)]
pub struct RestoreArgs {
    /// The backup's id (see `bite-sync backups list`), or `latest`
    pub id: String,

    /// The database to restore into
    #[arg(long, value_name = "URL", hide_env_values = true)]
    pub target: String,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub from: FromArgs,

    /// Only these tables of the backup, comma-separated, with their types, sequences, keys,
    /// indexes, and foreign keys between them [default: everything in the backup]
    #[arg(long, short = 't', value_name = "LIST")]
    pub tables: Option<String>,

    /// Drop what is in the target first (every schema, publication, event trigger and
    /// extension; with --tables or a --tables backup, those tables only), in the restore's
    /// transaction
    #[arg(long)]
    pub clean: bool,

    /// Accepted for scripts: a restore runs in one transaction, on one connection
    /// (`backups verify` restores into its scratch database with backup.jobs connections)
    #[arg(long, short = 'j', value_name = "N")]
    pub jobs: Option<u16>,

    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync run`.
#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DatabaseArgs,

    /// Tables to replicate, comma-separated (same syntax as sync --tables)
    /// [default: replication.tables from the config file]
    #[arg(long, short = 't', env = "BITE_TABLES", value_name = "LIST")]
    pub tables: Option<String>,

    /// Allow the first write into a database that has no bite_sync bookkeeping yet
    #[arg(long)]
    pub init: bool,

    /// Replication slot on the source [default: replication.slot, else bite_sync]
    #[arg(long, env = "BITE_SLOT", value_name = "NAME")]
    pub slot: Option<String>,

    /// Publication on the source [default: replication.publication, else bite_sync]
    #[arg(long, env = "BITE_PUBLICATION", value_name = "NAME")]
    pub publication: Option<String>,

    /// Directory of schedule files (*.toml) whose jobs to run
    /// [default: schedules/ next to the config file, else in the working directory]
    #[arg(long, env = "BITE_SCHEDULES_DIR", value_name = "DIR")]
    pub schedules: Option<PathBuf>,
}

/// `bite-sync status`.
#[derive(Debug, Args, Clone, Default)]
pub struct StatusArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DatabaseArgs,

    /// Replication slot on the source [default: replication.slot, else bite_sync]
    #[arg(long, env = "BITE_SLOT", value_name = "NAME")]
    pub slot: Option<String>,

    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,

    /// Directory of schedule files whose jobs' runs and backups to check
    /// [default: schedules/ next to the config file, else in the working directory]
    #[arg(long, env = "BITE_SCHEDULES_DIR", value_name = "DIR")]
    pub schedules: Option<PathBuf>,
}

/// `bite-sync check`.
#[derive(Debug, Args, Clone, Default)]
pub struct CheckArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DatabaseArgs,

    /// Tables to check, comma-separated [default: replication.tables from the config file]
    #[arg(long, short = 't', env = "BITE_TABLES", value_name = "LIST")]
    pub tables: Option<String>,

    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync schedules`.
#[derive(Debug, Args, Clone, Default)]
pub struct SchedulesArgs {
    /// Directory of schedule files (*.toml)
    /// [default: schedules/ next to the config file, else in the working directory]
    #[arg(long, env = "BITE_SCHEDULES_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// The databases the jobs use (their last runs are in the mirror's bite_sync.job_runs)
    #[command(flatten)]
    pub db: DatabaseArgs,

    /// Print a JSON array on stdout, one object per job
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync relay`.
#[derive(Debug, Args, Clone)]
pub struct RelayArgs {
    /// Port to listen on, over PORT [default: PORT, else relay.port, else 5000]
    // Not `env = "PORT"`: the relay's settings read PORT, so a bad value is reported as PORT.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,

    /// Address to listen on, e.g. 127.0.0.1 for this machine only [default: every interface,
    /// IPv6 and IPv4 ([::], else 0.0.0.0), as Railway needs]
    #[arg(long, value_name = "ADDRESS")]
    pub bind: Option<std::net::IpAddr>,
}

/// `bite-sync demo`.
#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Customers in the sample restaurant
    #[arg(long, default_value_t = 1_000)]
    pub customers: u64,

    /// Orders in the sample restaurant
    #[arg(long, default_value_t = 5_000)]
    pub orders: u64,

    /// Run the demo and exit instead of waiting for Ctrl-C
    #[arg(long)]
    pub no_wait: bool,
}

/// `bite-sync bench`: which benchmark, with the sync benchmark's flags when none is named (so
/// `bite-sync bench --rounds 1` keeps working).
#[derive(Debug, Args, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Which benchmark [default: sync]
    #[command(subcommand)]
    pub command: Option<BenchCommand>,

    #[command(flatten)]
    #[allow(missing_docs)]
    pub sync: SyncBenchArgs,
}

/// The benchmarks.
#[derive(Debug, Subcommand, Clone)]
pub enum BenchCommand {
    /// `bite-sync sync` against `pg_dump | psql` (the default)
    Sync(SyncBenchArgs),
    /// `bite-sync run` against native logical replication: catch-up, WAN, lag, memory
    Replication(ReplicationBenchArgs),
    /// `bite-sync backup` and `restore` against `pg_dump | gzip` and `gunzip | psql`
    Backup(BackupBenchArgs),
    /// `bite-sync relay` under signed webhooks, against a no-op handler: latency, loss, peak
    Relay(RelayBenchArgs),
}

/// `bite-sync bench relay`.
#[derive(Debug, Args, Clone)]
pub struct RelayBenchArgs {
    /// Webhooks per second in the fixed-rate phase (open loop)
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,

    /// How long the fixed-rate phase runs, for the no-op handler and then the relay
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub duration: std::time::Duration,

    /// How long the peak phase (closed loop, as fast as the relay acknowledges) runs
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub peak_duration: std::time::Duration,

    /// Concurrent keep-alive connections of the load generator
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub connections: u16,

    /// Keep the relay's log (stderr) in this directory [default: a temp dir, removed at the
    /// end]
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,

    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync bench backup`.
#[derive(Debug, Args, Clone)]
pub struct BackupBenchArgs {
    /// Customers to generate
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub customers: u64,

    /// Orders to generate (three items each)
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub orders: u64,

    /// Parallel jobs for bite-sync
    #[arg(long, default_value_t = 2)]
    pub jobs: u16,

    /// Rounds; each time printed is the median of its rounds
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub rounds: u16,

    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync bench sync`.
#[derive(Debug, Args, Clone)]
pub struct SyncBenchArgs {
    /// Customers to generate
    #[arg(long, default_value_t = 100_000)]
    pub customers: u64,

    /// Orders to generate (three items each)
    #[arg(long, default_value_t = 1_000_000)]
    pub orders: u64,

    /// Parallel jobs for bite-sync
    #[arg(long, default_value_t = 2)]
    pub jobs: u16,

    /// Rounds of A, B, C and D; each time printed is the median of its rounds
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub rounds: u16,

    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

/// `bite-sync bench replication`.
#[derive(Debug, Args, Clone)]
pub struct ReplicationBenchArgs {
    /// Customers to generate
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub customers: u64,

    /// Orders to generate (three items each)
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub orders: u64,

    /// Source transactions in each backlog (5 row changes each)
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub transactions: u64,

    /// How long the steady-state workload runs, e.g. 20s
    #[arg(long, default_value = "20s", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub duration: std::time::Duration,

    /// pgbench clients for the steady-state workload
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub clients: u32,

    /// Rows inserted by the single large transaction
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub big_rows: u64,

    /// Latency the WAN step adds in each direction between bite-sync and the mirror
    #[arg(long, default_value = "50ms", value_name = "DURATION", value_parser = parse_duration_arg)]
    pub wan_delay: std::time::Duration,

    /// Keep each bite-sync process's log (stderr) in this directory [default: a temp dir,
    /// removed at the end]
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,

    /// Print the results as JSON
    #[arg(long)]
    pub json: bool,
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every subcommand, however deep, with its name path.
    fn every_command(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            let name = format!("{path} {}", sub.get_name());
            out.push((name.clone(), sub.clone()));
            every_command(sub, name, out);
        }
    }

    /// `--help` on an 80-column terminal never breaks a line mid-phrase: prose is reflowed
    /// by clap, and the verbatim blocks (examples, lists, exit codes) fit as written.
    #[test]
    fn long_help_fits_an_80_column_terminal_without_breaking_phrases() {
        let mut commands = Vec::new();
        every_command(&Cli::command(), "bite-sync".into(), &mut commands);
        assert!(commands.len() > 10);
        for (name, cmd) in commands {
            if let Some(after) = cmd.get_after_long_help() {
                for line in after.to_string().lines() {
                    assert!(
                        line.chars().count() <= 79,
                        "`{name} --help`: {} columns: {line}",
                        line.chars().count()
                    );
                }
            }
            for width in [80, 100] {
                let help = cmd.clone().term_width(width).render_long_help().to_string();
                let lines: Vec<&str> = help.lines().collect();
                for (i, line) in lines.iter().enumerate() {
                    assert!(line.chars().count() <= width, "`{name} --help`: {line}");
                    // A short line inside a paragraph, after a full one: a verbatim line too
                    // long for the terminal, broken by clap where it ran out of room.
                    let inside = i > 0
                        && !lines[i - 1].trim().is_empty()
                        && lines.get(i + 1).is_some_and(|next| !next.trim().is_empty());
                    let orphan = inside
                        && !line.trim().is_empty()
                        && !line.starts_with(' ')
                        && line.chars().count() < 25
                        && lines[i - 1].chars().count() > width - 25;
                    assert!(
                        !orphan,
                        "`{name} --help` at {width} columns breaks a line mid-phrase:\n{}\n{line}",
                        lines[i - 1]
                    );
                }
            }
        }
    }

    #[test]
    fn sync_flags_parse() {
        let cli = Cli::try_parse_from([
            "bite-sync",
            "sync",
            "--tables",
            "customers,orders",
            "--jobs",
            "4",
            "--dry-run",
            "--json",
        ])
        .unwrap();
        let Command::Sync(args) = cli.command else {
            panic!("not sync")
        };
        assert_eq!(args.tables.as_deref(), Some("customers,orders"));
        assert_eq!(args.jobs, Some(4));
        assert!(args.dry_run && args.json);
        assert!(
            Cli::try_parse_from(["bite-sync", "sync", "--schema-only", "--data-only"]).is_err()
        );
        assert!(Cli::try_parse_from(["bite-sync", "sync", "--jobs", "0"]).is_err());
    }

    #[test]
    fn schedules_flags_parse() {
        let cli = Cli::try_parse_from(["bite-sync", "schedules", "--json", "--dir", "/etc/sched"])
            .unwrap();
        let Command::Schedules(args) = cli.command else {
            panic!("not schedules")
        };
        assert!(args.json);
        assert_eq!(args.dir, Some(PathBuf::from("/etc/sched")));
    }

    fn bench(args: &[&str]) -> BenchArgs {
        let cli = Cli::try_parse_from(["bite-sync", "bench"].iter().chain(args)).unwrap();
        let Command::Bench(args) = cli.command else {
            panic!("not bench")
        };
        args
    }

    #[test]
    fn bench_without_a_name_is_the_sync_benchmark_with_its_flags() {
        let args = bench(&["--customers", "2000", "--orders", "10000", "--rounds", "1"]);
        assert!(args.command.is_none());
        assert_eq!(
            (args.sync.customers, args.sync.orders, args.sync.rounds),
            (2000, 10000, 1)
        );
        let Some(BenchCommand::Sync(named)) = bench(&["sync", "--rounds", "2"]).command else {
            panic!("not bench sync")
        };
        assert_eq!(named.rounds, 2);
    }

    #[test]
    fn bench_replication_flags_parse() {
        let Some(BenchCommand::Replication(args)) = bench(&[
            "replication",
            "--transactions",
            "200",
            "--duration",
            "2s",
            "--big-rows",
            "10000",
            "--wan-delay",
            "100ms",
        ])
        .command
        else {
            panic!("not bench replication")
        };
        assert_eq!(args.transactions, 200);
        assert_eq!(args.duration, std::time::Duration::from_secs(2));
        assert_eq!(args.big_rows, 10_000);
        assert_eq!(args.wan_delay, std::time::Duration::from_millis(100));
        assert_eq!(
            (args.customers, args.orders, args.clients),
            (10_000, 100_000, 2)
        );
        let Some(BenchCommand::Relay(relay)) = bench(&[
            "relay",
            "--rate",
            "50",
            "--duration",
            "3s",
            "--peak-duration",
            "1s",
            "--connections",
            "8",
        ])
        .command
        else {
            panic!("not bench relay")
        };
        assert_eq!(
            (
                relay.rate,
                relay.duration,
                relay.peak_duration,
                relay.connections
            ),
            (
                50,
                std::time::Duration::from_secs(3),
                std::time::Duration::from_secs(1),
                8
            )
        );
        let Some(BenchCommand::Relay(defaults)) = bench(&["relay"]).command else {
            panic!("not bench relay")
        };
        assert_eq!(
            (defaults.rate, defaults.duration, defaults.peak_duration),
            (
                500,
                std::time::Duration::from_secs(60),
                std::time::Duration::from_secs(15)
            )
        );
        assert!(Cli::try_parse_from(["bite-sync", "bench", "relay", "--rate", "0"]).is_err());
        // The replication benchmark's flags belong to it, not to `bench` itself.
        assert!(Cli::try_parse_from(["bite-sync", "bench", "--transactions", "5"]).is_err());
        assert!(
            Cli::try_parse_from(["bite-sync", "bench", "--rounds", "1", "replication"]).is_err()
        );
    }
}
