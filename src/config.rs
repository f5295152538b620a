//! Configuration: `bite-sync.toml`, environment variables and flags, merged and validated.
//!
//! Precedence, highest first: command-line flag, its environment variable (clap reads both),
//! the config file, the built-in default. The file is parsed into raw serde structs that
//! reject unknown keys, then validated into [`Config`]; validation collects every problem and
//! reports them together, each with the file and key, so one run shows everything to fix.
//! URLs are held as [`DbUrl`], whose `Display`/`Debug` never show passwords.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pg::connect::{DbUrl, Role};
use crate::pg::ident::{TablePattern, parse_pattern};

/// The file looked for in the working directory when `--config` is not given.
pub const DEFAULT_FILE: &str = "bite-sync.toml";

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
/// if present, else nothing.
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
    let raw = parse(&text).map_err(|e| ConfigError {
        problems: vec![format!("{}: {e}", path.display())],
    })?;
    Ok((Some(path), raw))
}

/// Parses TOML text into the raw structs (unknown keys are errors).
pub fn parse(text: &str) -> Result<RawConfig, toml::de::Error> {
    toml::from_str(text)
}

/// Merges overrides into the file's values and validates the result.
pub fn resolve(
    file: Option<PathBuf>,
    raw: RawConfig,
    overrides: Overrides,
) -> Result<Config, ConfigError> {
    let where_ = |key: &str| match &file {
        Some(f) => format!("{}: {key}", f.display()),
        None => key.to_string(),
    };
    let mut problems = Vec::new();

    let mut database = |role: Role, flag: Option<String>, raw: RawDatabase, env: &str| {
        let key = format!("{role}.url");
        let (url, from) = match (flag, raw.url) {
            (Some(u), _) => (u, format!("--{role} / {env}")),
            (None, Some(u)) => (u, where_(&key)),
            (None, None) => return None,
        };
        match DbUrl::parse(role, &url) {
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
                problems.push(format!("{from}: {e}"));
                None
            }
        }
    };
    let source = database(
        Role::Source,
        overrides.source_url,
        raw.source,
        "BITE_SOURCE_URL",
    );
    let mirror = database(
        Role::Mirror,
        overrides.mirror_url,
        raw.mirror,
        "BITE_MIRROR_URL",
    );

    let mut patterns = |key: &str, list: Option<Vec<String>>| -> Vec<TablePattern> {
        let mut out = Vec::new();
        for (i, item) in list.unwrap_or_default().iter().enumerate() {
            match parse_pattern(item) {
                Ok(p) => out.push(p),
                Err(e) => problems.push(format!("{}[{i}]: {e}", where_(key))),
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
    if let Some(url) = &raw.backup.url
        && !(url.starts_with("s3://") || url.starts_with("file:///"))
    {
        problems.push(format!(
            "{}: expected s3://bucket/prefix or file:///dir, got {url:?}",
            where_("backup.url")
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
        url: raw.backup.url,
        s3: crate::backup::store::S3Settings {
            endpoint: raw.backup.endpoint,
            region: raw.backup.region,
            path_style: raw.backup.path_style.unwrap_or(false),
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
        (Some(u), _) => Some((u, "BITE_ALERT_WEBHOOK".to_string())),
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
            "conf.toml: source.url",
            "conf.toml: sync.jobs",
            "conf.toml: sync.lock_timeout",
            "conf.toml: sync.tables[0]",
            "conf.toml: log.format",
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
            "b.toml: replication.slot",
            "b.toml: replication.batch_rows",
            "b.toml: replication.batch_delay",
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
            assert!(msg.contains("c.toml: backup.encrypt_to"), "{msg}");
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
