//! Configuration: `bite-sync.toml`, environment variables and flags, merged and validated.
//!
//! Precedence, highest first: command-line flag, its environment variable (clap reads both),
//! the config file, the built-in default. The file is parsed into raw serde structs that
//! reject unknown keys, then validated into [`Config`]; validation collects every problem and
//! reports them together, each with the file and key, so one run shows everything to fix.
//! URLs are held as [`DbUrl`], whose `Display`/`Debug` never show passwords.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pg::connect::{DbUrl, Role};
use crate::pg::ident::{TablePattern, parse_pattern};

/// The file looked for in the working directory when `--config` is not given.
pub const DEFAULT_FILE: &str = "bite-sync.toml";

/// The environment variable naming where alerts go (`alerts.webhook_url`); the relay reads it
/// too, for its signature alerts.
pub const ALERT_WEBHOOK_VAR: &str = "BITE_ALERT_WEBHOOK";

/// The commented example configuration, kept in the repository and parsed by a test.
pub const EXAMPLE: &str = include_str!("../bite-sync.example.toml");

/// The file as written (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[source]`
    #[serde(default)]
    pub source: RawDatabase,
    /// `[mirror]`
    #[serde(default)]
    pub mirror: RawDatabase,
    /// `[sync]`
    #[serde(default)]
    pub sync: RawSync,
    /// `[replication]`
    #[serde(default)]
    pub replication: RawReplication,
    /// `[log]`
    #[serde(default)]
    pub log: RawLog,
    /// `[backup]`
    #[serde(default)]
    pub backup: RawBackup,
    /// `[alerts]`
    #[serde(default)]
    pub alerts: RawAlerts,
    /// `[relay]`
    #[serde(default)]
    pub relay: crate::relay::settings::RawRelay,
    /// `[delivery]`
    #[serde(default)]
    pub delivery: crate::relay::settings::RawDelivery,
    /// Where each key was written, for messages.
    #[serde(skip)]
    pub lines: KeyLines,
    /// What was wrong with the file itself (syntax, unknown keys, wrong types), already
    /// naming file, line and key; [`resolve`] reports them with the values' problems.
    #[serde(skip)]
    pub problems: Vec<String>,
}

/// `[alerts]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Where alerts are POSTed (JSON with a Slack-compatible `text`).
    pub webhook_url: Option<String>,
}

/// `[backup]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    /// Where backups go: `s3://bucket/prefix` or `file:///dir`.
    pub url: Option<String>,
    /// S3 endpoint for non-AWS stores.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// Path-style S3 URLs.
    pub path_style: Option<bool>,
    /// S3 access key id.
    pub access_key: Option<String>,
    /// S3 secret key.
    pub secret_key: Option<String>,
    /// Parallel connections for backup and restore.
    pub jobs: Option<i64>,
    /// The pg_dump to use.
    pub pg_dump: Option<PathBuf>,
    /// Retention: the newest N backups.
    pub keep_last: Option<i64>,
    /// Retention: the newest of each of the last N days.
    pub keep_daily: Option<i64>,
    /// Retention: the newest of each of the last N ISO weeks.
    pub keep_weekly: Option<i64>,
    /// Retention: the newest of each of the last N months.
    pub keep_monthly: Option<i64>,
    /// age recipient (public key) every backup object is encrypted to.
    pub encrypt_to: Option<String>,
    /// File holding the age identity (secret key) for restore and verify.
    pub identity_file: Option<PathBuf>,
}

/// `[source]` / `[mirror]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// Connection URL.
    pub url: Option<String>,
    /// CA certificate file (PEM) for verifying the server.
    pub ca_file: Option<PathBuf>,
}

/// `[sync]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    /// Tables to sync.
    pub tables: Option<Vec<String>>,
    /// Tables to leave out.
    pub exclude: Option<Vec<String>>,
    /// Parallel workers.
    pub jobs: Option<i64>,
    /// How long the swap waits for readers, e.g. "10s".
    pub lock_timeout: Option<String>,
    /// Memory for index builds on the mirror, e.g. "256MB".
    pub maintenance_work_mem: Option<String>,
    /// Build partitioned tables as one plain table on the mirror.
    pub flatten_partitions: Option<bool>,
}

/// `[replication]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplication {
    /// Tables `bite-sync run` replicates.
    pub tables: Option<Vec<String>>,
    /// The source publication's name.
    pub publication: Option<String>,
    /// The source replication slot's name.
    pub slot: Option<String>,
    /// Source rows per mirror transaction, at most.
    pub batch_rows: Option<i64>,
    /// How long a change may wait for more to join its batch, e.g. "100ms".
    pub batch_delay: Option<String>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `text` or `json`.
    pub format: Option<String>,
}

/// Values given on the command line or in the environment; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--source` / `BITE_SOURCE_URL`.
    pub source_url: Option<String>,
    /// `--mirror` / `BITE_MIRROR_URL`.
    pub mirror_url: Option<String>,
    /// `--tables`, already split.
    pub tables: Option<Vec<TablePattern>>,
    /// `--exclude`, already split.
    pub exclude: Option<Vec<TablePattern>>,
    /// `--jobs`.
    pub jobs: Option<usize>,
    /// `--lock-timeout`.
    pub lock_timeout: Option<Duration>,
    /// `bite-sync run --tables`, already split.
    pub replication_tables: Option<Vec<TablePattern>>,
    /// `--slot`.
    pub slot: Option<String>,
    /// `--publication`.
    pub publication: Option<String>,
    /// `BITE_ALERT_WEBHOOK`.
    pub alert_webhook: Option<String>,
    /// `BITE_BACKUP_URL`: where backups go, over `backup.url` (scheduled jobs included).
    pub backup_url: Option<String>,
    /// Where `source_url` came from (`--source` or `BITE_SOURCE_URL`), for messages.
    pub source_from: Option<String>,
    /// Where `mirror_url` came from (`--mirror` or `BITE_MIRROR_URL`), for messages.
    pub mirror_from: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (for messages), if from a file.
    pub file: Option<PathBuf>,
    /// The local database.
    pub source: Option<DbUrl>,
    /// The mirror.
    pub mirror: Option<DbUrl>,
    /// `[sync]` settings.
    pub sync: SyncSettings,
    /// `[replication]` settings.
    pub replication: ReplicationSettings,
    /// `[log]` settings.
    pub log_format: Option<LogFormat>,
    /// `[backup]` settings.
    pub backup: BackupSettings,
    /// `[alerts]`: where alerts go, if anywhere.
    pub alert_webhook: Option<crate::alert::WebhookUrl>,
    /// `[relay]` as written: resolved with the environment by
    /// [`crate::relay::settings::RelaySettings::resolve`] when the relay runs.
    pub relay: crate::relay::settings::RawRelay,
    /// `[delivery]` as written (see [`crate::relay::settings::DeliverySettings::resolve`]).
    pub delivery: crate::relay::settings::RawDelivery,
}

/// Validated `[backup]`.
#[derive(Debug, Clone)]
pub struct BackupSettings {
    /// Where backups go (`--to`/`--from` win).
    pub url: Option<String>,
    /// How to reach an S3-compatible store.
    pub s3: crate::backup::store::S3Settings,
    /// Parallel connections.
    pub jobs: usize,
    /// The pg_dump to use; none: found automatically.
    pub pg_dump: Option<PathBuf>,
    /// What `backups prune` keeps.
    pub retention: crate::backup::prune::Retention,
    /// Encrypt every object to this age recipient; none: not encrypted.
    pub encrypt_to: Option<crate::backup::crypt::Recipient>,
    /// The age identity's file for restore and verify (read only then, so a machine that
    /// only backs up never needs it; `BITE_BACKUP_IDENTITY` wins).
    pub identity_file: Option<PathBuf>,
}

/// Validated `[sync]`.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Tables to sync (empty: all).
    pub tables: Vec<TablePattern>,
    /// Tables to leave out.
    pub exclude: Vec<TablePattern>,
    /// Parallel workers.
    pub jobs: usize,
    /// Swap lock timeout.
    pub lock_timeout: Duration,
    /// `maintenance_work_mem` on the mirror.
    pub maintenance_work_mem: String,
    /// Partitioned tables become one plain table on the mirror (by `sync` and `run`).
    pub flatten_partitions: bool,
}

/// Validated `[replication]`.
#[derive(Debug, Clone)]
pub struct ReplicationSettings {
    /// Tables to replicate (empty: replication is not configured).
    pub tables: Vec<TablePattern>,
    /// Publication name on the source.
    pub publication: String,
    /// Replication slot name on the source.
    pub slot: String,
    /// Source rows per mirror transaction, at most.
    pub batch_rows: usize,
    /// How long a change may wait for more to join its batch.
    pub batch_delay: Duration,
}

/// The default publication and slot name.
pub const DEFAULT_REPLICATION_NAME: &str = "bite_sync";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything wrong with a configuration, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file: key: problem` lines.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads the config file: `explicit` if given (it must exist), else [`DEFAULT_FILE`] in `dir`
/// if present, else nothing. What is wrong inside the file is kept in
/// [`RawConfig::problems`], for [`resolve`] to report with everything else.
pub fn read_file(
    explicit: Option<&Path>,
    dir: &Path,
) -> Result<(Option<PathBuf>, RawConfig), ConfigError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let default = dir.join(DEFAULT_FILE);
            if !default.exists() {
                return Ok((None, RawConfig::default()));
            }
            default
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
        problems: vec![format!("{}: cannot read: {e}", path.display())],
    })?;
    let raw = parse_in(&path.display().to_string(), &text);
    Ok((Some(path), raw))
}

/// Parses TOML text into the raw structs; any unknown key, wrong type or syntax error is an
/// error (every one of them).
pub fn parse(text: &str) -> Result<RawConfig, ConfigError> {
    let raw = parse_in("", text);
    if raw.problems.is_empty() {
        Ok(raw)
    } else {
        Err(ConfigError {
            problems: raw.problems,
        })
    }
}

/// What could be read of `text`, with its problems prefixed by `file` (when not empty).
fn parse_in(file: &str, text: &str) -> RawConfig {
    let read = read_toml::<RawConfig>(text);
    let mut raw = read.value.unwrap_or_default();
    raw.lines = read.lines;
    raw.problems = read
        .problems
        .iter()
        .map(|p| {
            if file.is_empty() {
                p.to_string()
            } else {
                format!("{file}: {p}")
            }
        })
        .collect();
    raw
}

/// Merges overrides into the file's values and validates the result.
pub fn resolve(
    file: Option<PathBuf>,
    mut raw: RawConfig,
    overrides: Overrides,
) -> Result<Config, ConfigError> {
    let lines = std::mem::take(&mut raw.lines);
    let where_ = |key: &str| {
        let line = lines
            .line(key)
            .map(|n| format!("line {n}: "))
            .unwrap_or_default();
        match &file {
            Some(f) => format!("{}: {line}{key}", f.display()),
            None => format!("{line}{key}"),
        }
    };
    let mut problems = std::mem::take(&mut raw.problems);

    let mut database = |role: Role,
                        flag: Option<String>,
                        flag_from: Option<String>,
                        raw: RawDatabase,
                        env: &str| {
        let key = format!("{role}.url");
        let (url, from, origin) = match (flag, raw.url) {
            (Some(u), _) => {
                let from = flag_from.unwrap_or_else(|| format!("--{role} / {env}"));
                (u, from.clone(), from)
            }
            (None, Some(u)) => {
                let origin = match &file {
                    Some(f) => format!("{key} in {}", f.display()),
                    None => key.clone(),
                };
                (u, where_(&key), origin)
            }
            (None, None) => return None,
        };
        match DbUrl::parse(role, &url).map(|db| db.with_origin(origin)) {
            Ok(db) => Some(match raw.ca_file {
                Some(ca) => {
                    if !ca.exists() {
                        problems.push(format!(
                            "{}: file {} does not exist",
                            where_(&format!("{role}.ca_file")),
                            ca.display()
                        ));
                    }
                    db.with_ca_file(ca)
                }
                None => db,
            }),
            Err(e) => {
                problems.push(format!("{from}: {}", crate::error_chain(&e)));
                None
            }
        }
    };
    let source = database(
        Role::Source,
        overrides.source_url,
        overrides.source_from,
        raw.source,
        "BITE_SOURCE_URL",
    );
    let mirror = database(
        Role::Mirror,
        overrides.mirror_url,
        overrides.mirror_from,
        raw.mirror,
        "BITE_MIRROR_URL",
    );

    let mut patterns = |key: &str, list: Option<Vec<String>>| -> Vec<TablePattern> {
        let mut out = Vec::new();
        for (i, item) in list.unwrap_or_default().iter().enumerate() {
            match parse_pattern(item) {
                Ok(p) => out.push(p),
                Err(e) => problems.push(format!("{}: {e}", where_(&format!("{key}[{i}]")))),
            }
        }
        out
    };
    let file_tables = patterns("sync.tables", raw.sync.tables);
    let file_exclude = patterns("sync.exclude", raw.sync.exclude);
    let replication_tables = patterns("replication.tables", raw.replication.tables);

    let jobs = match (overrides.jobs, raw.sync.jobs) {
        (Some(j), _) => j,
        (None, Some(j)) if (1..=64).contains(&j) => j as usize,
        (None, Some(j)) => {
            problems.push(format!(
                "{}: must be between 1 and 64, got {j}",
                where_("sync.jobs")
            ));
            2
        }
        (None, None) => 2,
    };
    let lock_timeout = match (overrides.lock_timeout, raw.sync.lock_timeout) {
        (Some(d), _) => d,
        (None, Some(text)) => match parse_duration(&text) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("{}: {e}", where_("sync.lock_timeout")));
                Duration::from_secs(10)
            }
        },
        (None, None) => Duration::from_secs(10),
    };
    let maintenance_work_mem = match raw.sync.maintenance_work_mem {
        Some(m) if valid_memory(&m) => m,
        Some(m) => {
            problems.push(format!(
                "{}: expected a size like \"256MB\" or \"1GB\", got {m:?}",
                where_("sync.maintenance_work_mem")
            ));
            "128MB".into()
        }
        None => "128MB".into(),
    };
    let mut name = |key: &str, flag: Option<String>, file: Option<String>| {
        let (value, from) = match (flag, file) {
            (Some(v), _) => (v, format!("--{}", key.trim_start_matches("replication."))),
            (None, Some(v)) => (v, where_(key)),
            (None, None) => return DEFAULT_REPLICATION_NAME.to_string(),
        };
        if let Err(e) = check_slot_name(&value) {
            problems.push(format!("{from}: {e}"));
        }
        value
    };
    let slot = name("replication.slot", overrides.slot, raw.replication.slot);
    let publication = name(
        "replication.publication",
        overrides.publication,
        raw.replication.publication,
    );
    let batch_rows = match raw.replication.batch_rows {
        None => 20_000,
        Some(n) if (1..=1_000_000).contains(&n) => n as usize,
        Some(n) => {
            problems.push(format!(
                "{}: must be between 1 and 1000000, got {n}",
                where_("replication.batch_rows")
            ));
            20_000
        }
    };
    let batch_delay = match raw.replication.batch_delay {
        None => Duration::from_millis(100),
        Some(text) => match parse_duration(&text) {
            Ok(d) if d <= Duration::from_secs(60) => d,
            Ok(_) => {
                problems.push(format!(
                    "{}: must be at most 60s, got {text:?}",
                    where_("replication.batch_delay")
                ));
                Duration::from_millis(100)
            }
            Err(e) => {
                problems.push(format!("{}: {e}", where_("replication.batch_delay")));
                Duration::from_millis(100)
            }
        },
    };
    let log_format = match raw.log.format.as_deref() {
        None => None,
        Some("text") => Some(LogFormat::Text),
        Some("json") => Some(LogFormat::Json),
        Some(other) => {
            problems.push(format!(
                "{}: expected \"text\" or \"json\", got {other:?}",
                where_("log.format")
            ));
            None
        }
    };

    let backup_jobs = match raw.backup.jobs {
        None => 2,
        Some(n) if (1..=64).contains(&n) => n as usize,
        Some(n) => {
            problems.push(format!(
                "{}: expected 1 to 64, got {n}",
                where_("backup.jobs")
            ));
            2
        }
    };
    let backup_url = match (overrides.backup_url, raw.backup.url) {
        (Some(url), _) => Some((url, "BITE_BACKUP_URL".to_string())),
        (None, Some(url)) => Some((url, where_("backup.url"))),
        (None, None) => None,
    };
    if let Some((url, from)) = &backup_url
        && !(url.starts_with("s3://") || url.starts_with("file:///"))
    {
        // Not repeated: a URL may carry credentials.
        problems.push(format!(
            "{from}: expected s3://bucket/prefix or file:///dir"
        ));
    }
    let defaults = crate::backup::prune::Retention::default();
    let mut keep = |key: &str, value: Option<i64>, default: u32| match value {
        None => default,
        Some(n) if (0..=10_000).contains(&n) => n as u32,
        Some(n) => {
            problems.push(format!(
                "{}: expected 0 to 10000, got {n}",
                where_(&format!("backup.{key}"))
            ));
            default
        }
    };
    let retention = crate::backup::prune::Retention {
        keep_last: keep("keep_last", raw.backup.keep_last, defaults.keep_last),
        keep_daily: keep("keep_daily", raw.backup.keep_daily, defaults.keep_daily),
        keep_weekly: keep("keep_weekly", raw.backup.keep_weekly, defaults.keep_weekly),
        keep_monthly: keep(
            "keep_monthly",
            raw.backup.keep_monthly,
            defaults.keep_monthly,
        ),
    };
    let encrypt_to = raw.backup.encrypt_to.as_deref().and_then(|text| {
        crate::backup::crypt::Recipient::parse(text)
            .map_err(|e| problems.push(format!("{}: {e}", where_("backup.encrypt_to"))))
            .ok()
    });
    let backup = BackupSettings {
        url: backup_url.map(|(url, _)| url),
        s3: crate::backup::store::S3Settings {
            endpoint: raw.backup.endpoint,
            region: raw.backup.region,
            path_style: raw.backup.path_style,
            access_key: raw.backup.access_key,
            secret_key: raw.backup.secret_key,
        },
        jobs: backup_jobs,
        pg_dump: raw.backup.pg_dump,
        retention,
        encrypt_to,
        identity_file: raw.backup.identity_file,
    };

    let alert_webhook = match (overrides.alert_webhook, raw.alerts.webhook_url) {
        (Some(u), _) => Some((u, ALERT_WEBHOOK_VAR.to_string())),
        (None, Some(u)) => Some((u, where_("alerts.webhook_url"))),
        (None, None) => None,
    }
    .and_then(|(url, from)| match crate::alert::WebhookUrl::parse(&url) {
        Ok(w) => Some(w),
        Err(e) => {
            problems.push(format!("{from}: {e}"));
            None
        }
    });

    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    Ok(Config {
        file,
        source,
        mirror,
        sync: SyncSettings {
            tables: overrides.tables.unwrap_or(file_tables),
            exclude: overrides.exclude.unwrap_or(file_exclude),
            jobs,
            lock_timeout,
            maintenance_work_mem,
            flatten_partitions: raw.sync.flatten_partitions.unwrap_or(false),
        },
        replication: ReplicationSettings {
            tables: overrides.replication_tables.unwrap_or(replication_tables),
            publication,
            slot,
            batch_rows,
            batch_delay,
        },
        log_format,
        backup,
        alert_webhook,
        relay: raw.relay,
        delivery: raw.delivery,
    })
}

impl BackupSettings {
    /// The identity that decrypts encrypted backups: `BITE_BACKUP_IDENTITY`, else
    /// `identity_file`; none when neither is set.
    pub fn identity(
        &self,
    ) -> Result<Option<crate::backup::crypt::Identity>, crate::backup::crypt::KeyError> {
        crate::backup::crypt::Identity::load(self.identity_file.as_deref(), |k| {
            std::env::var(k).ok()
        })
    }
}

impl Config {
    /// The source URL, or a configuration error saying every way to set it.
    pub fn require_source(&self) -> Result<DbUrl, ConfigError> {
        self.source.clone().ok_or_else(|| ConfigError {
            problems: vec![
                "no source database: pass --source URL, set BITE_SOURCE_URL, or set source.url in bite-sync.toml".into(),
            ],
        })
    }

    /// The mirror URL, or a configuration error saying every way to set it.
    pub fn require_mirror(&self) -> Result<DbUrl, ConfigError> {
        self.mirror.clone().ok_or_else(|| ConfigError {
            problems: vec![
                "no mirror database: pass --mirror URL, set BITE_MIRROR_URL, or set mirror.url in bite-sync.toml".into(),
            ],
        })
    }

    /// Both URLs, reporting both if both are missing.
    pub fn require_both(&self) -> Result<(DbUrl, DbUrl), ConfigError> {
        match (self.require_source(), self.require_mirror()) {
            (Ok(s), Ok(m)) => Ok((s, m)),
            (s, m) => Err(ConfigError {
                problems: s
                    .err()
                    .into_iter()
                    .chain(m.err())
                    .flat_map(|e| e.problems)
                    .collect(),
            }),
        }
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h` (a bare number means seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration like \"10s\" or \"500ms\", got {text:?}"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    Ok(d)
}

/// Slot and publication names: what PostgreSQL allows for slots (lower-case letters,
/// digits and underscores, at most 63 bytes), so one name rule covers both.
pub fn check_slot_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("{name:?} must be 1 to 63 characters long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "{name:?} may contain only lower-case letters, digits and underscores"
        ));
    }
    Ok(())
}

fn valid_memory(text: &str) -> bool {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    !n.is_empty() && matches!(unit, "kB" | "MB" | "GB" | "")
}

// ---- reading TOML files strictly, and never quoting them ----------------------------------
//
// A config or schedule file holds passwords and S3 secrets, so a problem in it is pointed at
// (file, line, key) and described, never quoted: the toml crate's own messages print the
// offending line, and serde's repeat the value.

/// One step of a key's place in a TOML file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySeg {
    /// A table key.
    Key(String),
    /// An element of an array (or array of tables), from 0.
    Index(usize),
}

/// A key's place in a TOML file: `sync.jobs`, `job[1].cron`, `sync.tables[0]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct KeyPath(pub Vec<KeySeg>);

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                KeySeg::Key(k) if i == 0 => write!(f, "{k}")?,
                KeySeg::Key(k) => write!(f, ".{k}")?,
                KeySeg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

impl KeyPath {
    fn child(&self, seg: KeySeg) -> KeyPath {
        let mut path = self.clone();
        path.0.push(seg);
        path
    }
}

/// Where each key of a TOML file is written (1-based lines), so that problems can point at it.
#[derive(Debug, Clone, Default)]
pub struct KeyLines(HashMap<String, usize>);

impl KeyLines {
    /// The line `key` (`sync.jobs`, `job[1].cron`) is written on, if it is in the file.
    pub fn line(&self, key: &str) -> Option<usize> {
        self.0.get(key).copied()
    }
}

/// A problem in a TOML file: where, and what, in words that never repeat the file's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlProblem {
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// The 1-based column, for a syntax error.
    pub column: Option<usize>,
    /// The key, when the problem is about one (empty for a syntax error).
    pub path: KeyPath,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TomlProblem {
    /// `line 4: sync.jobs: expected an integer, got a string`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(f, "line {line}, column {column}: ")?,
            (Some(line), None) => write!(f, "line {line}: ")?,
            _ => {}
        }
        if !self.path.0.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// A TOML file read into `T`: its value without the keys that had problems (so that the
/// values' own checks can still run and be reported together), where each key is, and every
/// unknown key or wrongly typed value. `value` is `None` only when the file is not TOML at all.
#[derive(Debug)]
pub struct StrictToml<T> {
    /// What could be read.
    pub value: Option<T>,
    /// Lines of the keys.
    pub lines: KeyLines,
    /// Every problem found.
    pub problems: Vec<TomlProblem>,
}

/// Reads `text` into `T`, whose structs reject unknown keys. serde stops at the first problem,
/// so each one found is recorded and its key taken out, and the rest read again, until
/// everything left reads: every unknown key and wrongly typed value is reported at once.
pub fn read_toml<T: serde::de::DeserializeOwned>(text: &str) -> StrictToml<T> {
    let original = match toml_edit::ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            return StrictToml {
                value: None,
                lines: KeyLines::default(),
                problems: vec![syntax_problem(text, e.span(), e.message())],
            };
        }
    };
    let mut lines = KeyLines::default();
    for (path, key, value) in spans(original.as_table()) {
        if let Some(span) = key.or(value) {
            lines
                .0
                .entry(path.to_string())
                .or_insert_with(|| line_of(text, span.start));
        }
    }
    let mut doc = original.into_mut();
    let mut problems = Vec::new();
    loop {
        let current = doc.to_string();
        let error = match toml::from_str::<T>(&current) {
            Ok(value) => {
                return StrictToml {
                    value: Some(value),
                    lines,
                    problems,
                };
            }
            Err(e) => e,
        };
        let at = error.span().map(|s| s.start);
        let path = at.and_then(|at| path_at(&current, at));
        let line = match &path {
            Some(p) => lines.line(&p.to_string()),
            None => None,
        };
        problems.push(TomlProblem {
            line,
            column: None,
            path: path.clone().unwrap_or_default(),
            message: describe_serde_error(error.message()),
        });
        // Take out the key the problem is about (a whole list for a bad element, so that its
        // other elements do not move up and repeat the problem), and read the rest again.
        let removable = path.map(|p| {
            let keep =
                p.0.iter()
                    .rposition(|s| matches!(s, KeySeg::Key(_)))
                    .map_or(0, |i| i + 1);
            KeyPath(p.0[..keep].to_vec())
        });
        match removable {
            Some(p) if remove_key(doc.as_table_mut(), &p.0) => {}
            _ => {
                return StrictToml {
                    value: None,
                    lines,
                    problems,
                };
            }
        }
    }
}

/// A syntax error by line and column, with the parser's description (which names what it
/// expected, never the text it found).
fn syntax_problem(text: &str, span: Option<Range<usize>>, message: &str) -> TomlProblem {
    let column = span.as_ref().map(|s| {
        text.get(..s.start)
            .unwrap_or(text)
            .rsplit('\n')
            .next()
            .map_or(0, |l| l.chars().count())
            + 1
    });
    TomlProblem {
        line: span.map(|s| line_of(text, s.start)),
        column,
        path: KeyPath::default(),
        message: format!("not valid TOML: {}", message.trim().replace('\n', " ")),
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Every key, table and array element of a parsed document, with the span of its key (where
/// it has one) and of its value.
type Spans = Vec<(KeyPath, Option<Range<usize>>, Option<Range<usize>>)>;

fn spans(root: &toml_edit::Table) -> Spans {
    fn value(path: &KeyPath, v: &toml_edit::Value, out: &mut Spans) {
        match v {
            toml_edit::Value::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    let p = path.child(KeySeg::Index(i));
                    out.push((p.clone(), None, e.span()));
                    value(&p, e, out);
                }
            }
            toml_edit::Value::InlineTable(t) => {
                for (k, e) in t.iter() {
                    let p = path.child(KeySeg::Key(k.to_string()));
                    out.push((p.clone(), t.key(k).and_then(toml_edit::Key::span), e.span()));
                    value(&p, e, out);
                }
            }
            _ => {}
        }
    }
    fn table(path: &KeyPath, t: &toml_edit::Table, out: &mut Spans) {
        for (k, item) in t.iter() {
            let p = path.child(KeySeg::Key(k.to_string()));
            out.push((
                p.clone(),
                t.key(k).and_then(toml_edit::Key::span),
                item.span(),
            ));
            match item {
                toml_edit::Item::Value(v) => value(&p, v, out),
                toml_edit::Item::Table(sub) => table(&p, sub, out),
                toml_edit::Item::ArrayOfTables(a) => {
                    for (i, sub) in a.iter().enumerate() {
                        let pi = p.child(KeySeg::Index(i));
                        out.push((pi.clone(), None, sub.span()));
                        table(&pi, sub, out);
                    }
                }
                toml_edit::Item::None => {}
            }
        }
    }
    let mut out = Vec::new();
    table(&KeyPath::default(), root, &mut out);
    out
}

/// The deepest key whose key or value holds byte `offset` of `text`.
fn path_at(text: &str, offset: usize) -> Option<KeyPath> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let holds = |s: &Option<Range<usize>>| {
        s.as_ref()
            .is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
    };
    spans(doc.as_table())
        .into_iter()
        .filter(|(_, key, value)| holds(key) || holds(value))
        .max_by_key(|(path, _, _)| path.0.len())
        .map(|(path, _, _)| path)
}

/// Removes the key at `path` (which ends in a key) from a table; false if it is not there.
fn remove_key(table: &mut dyn toml_edit::TableLike, path: &[KeySeg]) -> bool {
    match path {
        [KeySeg::Key(last)] => table.remove(last).is_some(),
        [KeySeg::Key(k), rest @ ..] => match table.get_mut(k) {
            Some(toml_edit::Item::ArrayOfTables(a)) => match rest {
                [KeySeg::Index(i), rest @ ..] => a.get_mut(*i).is_some_and(|t| remove_key(t, rest)),
                _ => false,
            },
            Some(toml_edit::Item::Value(toml_edit::Value::Array(a))) => match rest {
                [KeySeg::Index(i), rest @ ..] => a
                    .get_mut(*i)
                    .and_then(toml_edit::Value::as_inline_table_mut)
                    .is_some_and(|t| remove_key(t, rest)),
                _ => false,
            },
            Some(item) => item
                .as_table_like_mut()
                .is_some_and(|t| remove_key(t, rest)),
            None => false,
        },
        _ => false,
    }
}

/// serde's message about a value, without the value: `invalid type: string "hunter2",
/// expected i64` becomes `expected an integer, got a string`; an unknown key gets the nearest
/// known one.
pub fn describe_serde_error(message: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((typed, known)) = rest.split_once('`')
    {
        let known: Vec<&str> = known.split('`').skip(1).step_by(2).collect();
        return unknown_key(typed, &known);
    }
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((got, expected)) = rest.rsplit_once(", expected ")
    {
        return format!(
            "expected {}, got {}",
            expected_kind(expected),
            got_kind(got)
        );
    }
    if let Some(rest) = message.strip_prefix("invalid value: ")
        && let Some((got, expected)) = rest.rsplit_once(", expected ")
    {
        return format!(
            "expected {}, got {} out of range",
            expected_kind(expected),
            got_kind(got)
        );
    }
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((_, known)) = rest.split_once('`')
    {
        let known: Vec<&str> = known.split('`').skip(1).step_by(2).collect();
        return format!("expected one of {}", known.join(", "));
    }
    if message.contains(['`', '"', '\'']) {
        // Some other serde message, which may repeat the value: say only that it is wrong.
        "invalid value".to_string()
    } else {
        message.to_string()
    }
}

/// `unknown key; did you mean tables?` (or the keys there are, when none is close).
pub fn unknown_key(typed: &str, known: &[&str]) -> String {
    match known
        .iter()
        .filter(|k| strsim::levenshtein(typed, k) <= 2.max(typed.len() / 4))
        .min_by_key(|k| strsim::levenshtein(typed, k))
    {
        Some(near) => format!("unknown key; did you mean {near}?"),
        None if known.is_empty() => "unknown key".to_string(),
        None => format!("unknown key; the keys here are {}", known.join(", ")),
    }
}

/// serde's "expected" in words.
fn expected_kind(expected: &str) -> String {
    match expected.trim() {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" | "isize" => {
            "an integer".into()
        }
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list".into(),
        "path string" => "a path (a string)".into(),
        "a map" => "a table".into(),
        other if other.starts_with("struct ") => "a table".into(),
        other => other.to_string(),
    }
}

/// What serde found, without its value: `string "x"` → `a string`.
fn got_kind(got: &str) -> &'static str {
    let got = got.trim();
    if got.starts_with("string") {
        "a string"
    } else if got.starts_with("integer") {
        "an integer"
    } else if got.starts_with("floating point") {
        "a decimal number"
    } else if got.starts_with("boolean") {
        "a boolean"
    } else if got.starts_with("sequence") {
        "a list"
    } else if got.starts_with("map") {
        "a table"
    } else if got.starts_with("char") {
        "a character"
    } else {
        "another kind of value"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_example_parses_and_validates() {
        let raw = parse(EXAMPLE).expect("example parses");
        let config = resolve(
            Some("bite-sync.example.toml".into()),
            raw,
            Overrides::default(),
        )
        .expect("example validates");
        assert_eq!(config.sync.jobs, 2);
        assert!(!config.sync.tables.is_empty());
        assert!(config.source.is_some() && config.mirror.is_some());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse("[sync]\ntabels = [\"x\"]\n").unwrap_err().to_string();
        assert!(err.contains("tabels"), "{err}");
    }

    /// What a config file with `secret` in it must never print, whatever is wrong with it.
    fn problems_of(text: &str) -> Vec<String> {
        let raw = parse_in("bite-sync.toml", text);
        match resolve(Some("bite-sync.toml".into()), raw, Overrides::default()) {
            Ok(_) => panic!("{text} should not validate"),
            Err(e) => e.problems,
        }
    }

    #[test]
    fn problems_in_the_file_point_at_line_and_key_and_never_quote_it() {
        let secret = "wJalrXUtnFEMI-K7MDENG";
        for (text, expected) in [
            // A syntax error: the toml crate would print the whole line.
            (
                format!("[backup]\nsecret_key = \"{secret}\nregion = \"auto\"\n"),
                "bite-sync.toml: line 2, column 36: not valid TOML",
            ),
            (
                format!("[mirror]\nurl = postgres://u:{secret}@h/db\n"),
                "bite-sync.toml: line 2, column 7: not valid TOML",
            ),
            // A wrong type: serde would repeat the value.
            (
                format!("[backup]\nsecret_key = [\"{secret}\"]\n"),
                "bite-sync.toml: line 2: backup.secret_key: expected a string, got a list",
            ),
            (
                format!("[relay.ai]\nmax_reply_tokens = \"{secret}\"\n"),
                "bite-sync.toml: line 2: relay.ai.max_reply_tokens: expected an integer, got a string",
            ),
            // An unknown key holding a secret.
            (
                format!("[mirror]\npassword = \"{secret}\"\n"),
                "bite-sync.toml: line 2: mirror.password: unknown key; the keys here are url, ca_file",
            ),
            (
                format!("[backup]\nsecret_kye = \"{secret}\"\n"),
                "bite-sync.toml: line 2: backup.secret_kye: unknown key; did you mean secret_key?",
            ),
        ] {
            let problems = problems_of(&text);
            let all = problems.join("\n");
            assert!(!all.contains(&secret[4..12]), "the secret leaked: {all}");
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected:?} not in:\n{all}"
            );
        }
    }

    #[test]
    fn unknown_keys_wrong_types_and_bad_values_are_reported_together() {
        let problems = problems_of(
            "[source]\nurl = \"postgres://u@h/db?sslmod=require\"\nuser = \"bite\"\n\
             [sync]\njobs = \"four\"\ntabels = [\"orders\"]\nlock_timeout = \"soon\"\n\
             [replication]\nbatch_rows = 0\n[backup]\npath_style = \"yes\"\n[relay.ai]\ndeadlin = \"5s\"\n",
        );
        let all = problems.join("\n");
        for expected in [
            "bite-sync.toml: line 3: source.user: unknown key",
            "bite-sync.toml: line 5: sync.jobs: expected an integer, got a string",
            "bite-sync.toml: line 6: sync.tabels: unknown key; did you mean tables?",
            "bite-sync.toml: line 11: backup.path_style: expected a boolean, got a string",
            "bite-sync.toml: line 13: relay.ai.deadlin: unknown key; did you mean deadline?",
            "bite-sync.toml: line 2: source.url: the source URL has an unknown setting \"sslmod\"; did you mean sslmode?",
            "bite-sync.toml: line 7: sync.lock_timeout: expected a duration",
            "bite-sync.toml: line 9: replication.batch_rows: must be between 1 and 1000000",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected:?} not in:\n{all}"
            );
        }
        assert_eq!(problems.len(), 8, "{all}");
    }

    #[test]
    fn every_problem_is_reported_with_file_and_key() {
        let raw = parse(
            "[source]\nurl = \"mysql://nope\"\n[sync]\njobs = 0\nlock_timeout = \"soon\"\ntables = [\"a.b.c\"]\n[log]\nformat = \"xml\"\n",
        )
        .unwrap();
        let err = resolve(Some("conf.toml".into()), raw, Overrides::default()).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 5, "{text}");
        for key in [
            "conf.toml: line 2: source.url",
            "conf.toml: line 4: sync.jobs",
            "conf.toml: line 5: sync.lock_timeout",
            "conf.toml: line 6: sync.tables[0]",
            "conf.toml: line 8: log.format",
        ] {
            assert!(text.contains(key), "missing {key} in {text}");
        }
    }

    #[test]
    fn flags_win_over_the_file() {
        let raw = parse(
            "[source]\nurl = \"postgres://a@file-host/db\"\n[sync]\njobs = 3\ntables = [\"x\"]\n",
        )
        .unwrap();
        let config = resolve(
            None,
            raw,
            Overrides {
                source_url: Some("postgres://a@flag-host/db".into()),
                jobs: Some(5),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(config.source.unwrap().host(), "flag-host");
        assert_eq!(config.sync.jobs, 5);
        assert_eq!(config.sync.tables.len(), 1);
    }

    #[test]
    fn missing_urls_say_how_to_set_them() {
        let config = resolve(None, RawConfig::default(), Overrides::default()).unwrap();
        let err = config.require_both().unwrap_err();
        assert_eq!(err.problems.len(), 2);
        assert!(err.to_string().contains("BITE_SOURCE_URL"));
        assert!(err.to_string().contains("BITE_MIRROR_URL"));
    }

    #[test]
    fn passwords_never_appear_in_problems() {
        let raw = parse("[mirror]\nurl = \"postgres://u:hunter2@h/db?sslmode=bogus\"\n").unwrap();
        let err = resolve(None, raw, Overrides::default());
        if let Err(e) = err {
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn replication_settings_have_defaults_and_checked_names() {
        let config = resolve(None, RawConfig::default(), Overrides::default()).unwrap();
        assert_eq!(config.replication.slot, "bite_sync");
        assert_eq!(config.replication.publication, "bite_sync");
        assert!(config.replication.tables.is_empty());
        let raw = parse(
            "[replication]\ntables = [\"orders\"]\nslot = \"Bad-Slot\"\nbatch_rows = 0\nbatch_delay = \"soon\"\n",
        )
        .unwrap();
        let err = resolve(Some("b.toml".into()), raw, Overrides::default()).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 3, "{text}");
        for key in [
            "b.toml: line 3: replication.slot",
            "b.toml: line 4: replication.batch_rows",
            "b.toml: line 5: replication.batch_delay",
        ] {
            assert!(text.contains(key), "missing {key} in {text}");
        }
    }

    #[test]
    fn a_bad_recipient_is_named_by_its_key_and_a_secret_is_not_echoed() {
        let identity = crate::backup::crypt::Identity::generate();
        let good = format!(
            "[backup]\nencrypt_to = \"{}\"\nidentity_file = \"/keys/bite.txt\"\n",
            identity.recipient()
        );
        let config = resolve(None, parse(&good).unwrap(), Overrides::default()).unwrap();
        assert_eq!(config.backup.encrypt_to, Some(identity.recipient()));
        assert_eq!(
            config.backup.identity_file.as_deref(),
            Some(Path::new("/keys/bite.txt"))
        );

        let text = identity.file_text(chrono::Utc::now());
        let secret = text.lines().last().unwrap();
        for value in ["age1typo", secret] {
            let raw = parse(&format!("[backup]\nencrypt_to = \"{value}\"\n")).unwrap();
            let err = resolve(Some("c.toml".into()), raw, Overrides::default()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("c.toml: line 2: backup.encrypt_to"), "{msg}");
            assert!(!msg.contains(&secret[16..]), "the secret leaked: {msg}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
