//! Schedule files: `schedules/*.toml`, each with one or more `[[job]]` tables, read into
//! checked [`Job`]s.
//!
//! Like the config file, the files are strict (unknown keys, arguments another kind of job
//! takes, wrong types are all errors) and every problem in every file is reported at once,
//! each line naming the file, the job and the key. Job names are unique across the files.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono_tz::Tz;
use serde::Deserialize;

use super::cron::CronSchedule;
use super::{Job, JobKind};
use crate::config::KeySeg;
use crate::pg::ident::parse_pattern;

/// The directory looked in, next to the config file (or in the working directory).
pub const DEFAULT_DIR: &str = "schedules";

/// Where the schedule files are unless said otherwise: [`DEFAULT_DIR`] next to the config
/// file, or in the working directory when there is none (a relative path, so messages stay
/// short).
pub fn default_dir(config_file: Option<&Path>) -> PathBuf {
    match config_file.and_then(Path::parent) {
        Some(dir) => dir.join(DEFAULT_DIR),
        None => PathBuf::from(DEFAULT_DIR),
    }
}

/// The jobs of the schedules directory in use, and which directory that is.
#[derive(Debug)]
pub struct Loaded {
    /// The directory read (or looked for).
    pub dir: PathBuf,
    /// Its jobs, in file order.
    pub jobs: Vec<Job>,
    /// The default directory does not exist (so there are no jobs).
    pub missing_default: bool,
}

/// Reads `explicit` (`--dir`, `--schedules`, `BITE_SCHEDULES_DIR`), which must exist, or the
/// [`default_dir`] for `config_file`, whose absence only means no jobs.
pub fn load_configured(
    explicit: Option<&Path>,
    config_file: Option<&Path>,
) -> Result<Loaded, ScheduleError> {
    let dir = explicit.map_or_else(|| default_dir(config_file), Path::to_path_buf);
    if explicit.is_none() && !dir.exists() {
        return Ok(Loaded {
            dir,
            jobs: Vec::new(),
            missing_default: true,
        });
    }
    let jobs = load_dir(&dir)?;
    Ok(Loaded {
        dir,
        jobs,
        missing_default: false,
    })
}

/// The committed example files, which a test loads. They live in `schedules.example/`, not
/// in the [`DEFAULT_DIR`], so a checkout of the project runs no jobs nobody asked for; copy the
/// directory to `schedules/` to use them.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "schedules.example/backup.toml",
        include_str!("../../schedules.example/backup.toml"),
    ),
    (
        "schedules.example/sync.toml",
        include_str!("../../schedules.example/sync.toml"),
    ),
];

/// A schedule file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    /// `[[job]]` tables.
    #[serde(default)]
    job: Vec<RawJob>,
}

/// One `[[job]]` as written (every key optional here; checking says what is missing).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    /// Unique name.
    pub name: Option<String>,
    /// 5-field crontab expression.
    pub cron: Option<String>,
    /// IANA time zone; default UTC.
    pub time_zone: Option<String>,
    /// `backup`, `sync`, `verify` or `prune`.
    pub kind: Option<String>,
    /// backup: destination.
    pub to: Option<String>,
    /// backup, sync: tables.
    pub tables: Option<Vec<String>>,
    /// verify, prune: backup location.
    pub from: Option<String>,
    /// verify: which backup.
    pub backup: Option<String>,
    /// Default true.
    pub enabled: Option<bool>,
}

/// Everything wrong with the schedule files, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError {
    /// `file: job "name": key: problem` lines.
    pub problems: Vec<String>,
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid schedules: {one}"),
            many => {
                write!(f, "invalid schedules ({} problems):", many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ScheduleError {}

/// Reads every `*.toml` file in `dir` (in name order; other files are ignored). A directory that
/// cannot be read is an error; an empty one holds no jobs.
pub fn load_dir(dir: &Path) -> Result<Vec<Job>, ScheduleError> {
    let one = |problem: String| ScheduleError {
        problems: vec![problem],
    };
    let entries = std::fs::read_dir(dir).map_err(|e| {
        one(format!(
            "{}: cannot read the schedules directory: {e}",
            dir.display()
        ))
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| one(format!("{}: {e}", dir.display())))?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    let mut problems = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => files.push((path, text)),
            Err(e) => problems.push(format!("{}: cannot read: {e}", path.display())),
        }
    }
    match parse_files(&files) {
        Ok(jobs) if problems.is_empty() => Ok(jobs),
        Ok(_) => Err(ScheduleError { problems }),
        Err(e) => {
            problems.extend(e.problems);
            Err(ScheduleError { problems })
        }
    }
}

/// Checks the files' contents together (`(path for messages, text)`): each file on its own,
/// then that no job name is used twice.
pub fn parse_files(files: &[(PathBuf, String)]) -> Result<Vec<Job>, ScheduleError> {
    let mut problems = Vec::new();
    let mut jobs: Vec<Job> = Vec::new();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for (path, text) in files {
        for job in parse_file(path, text, &mut problems) {
            match seen.get(&job.name) {
                Some(first) if first == path => problems.push(format!(
                    "{}: job {:?}: name used twice in this file",
                    path.display(),
                    job.name
                )),
                Some(first) => problems.push(format!(
                    "{}: job {:?}: name already used in {}",
                    path.display(),
                    job.name,
                    first.display()
                )),
                None => {
                    seen.insert(job.name.clone(), path.clone());
                    jobs.push(job);
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(jobs)
    } else {
        Err(ScheduleError { problems })
    }
}

/// The jobs of one file that are fine; the others' problems go to `problems`. Problems are
/// pointed at by file, line, job and key, never quoted from the file.
fn parse_file(path: &Path, text: &str, problems: &mut Vec<String>) -> Vec<Job> {
    let file = path.display();
    let read = crate::config::read_toml::<RawFile>(text);
    // Each job is named in messages by its name where it has one that reads.
    let names: Vec<Option<String>> = toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| t.get("job").and_then(|j| j.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .map(|job| job.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .collect();
    let label = |i: usize| match names.get(i) {
        Some(Some(name)) => format!("job {name:?}"),
        _ => format!("job #{}", i + 1),
    };
    let mut broken = std::collections::HashSet::new();
    for p in &read.problems {
        let at = p.line.map(|n| format!("line {n}: ")).unwrap_or_default();
        problems.push(match p.path.0.as_slice() {
            [KeySeg::Key(job), KeySeg::Index(i), rest @ ..] if job == "job" && !rest.is_empty() => {
                broken.insert(*i);
                format!(
                    "{file}: {at}{}: {}: {}",
                    label(*i),
                    crate::config::KeyPath(rest.to_vec()),
                    p.message
                )
            }
            [KeySeg::Key(job)] if job == "job" && p.message.ends_with("got a table") => {
                format!("{file}: {at}job: write [[job]] (two brackets) above each job")
            }
            _ => format!("{file}: {p}"),
        });
    }
    let Some(raw) = read.value else {
        return Vec::new();
    };
    if raw.job.is_empty() && read.problems.is_empty() {
        problems.push(format!(
            "{file}: no jobs: each job is a [[job]] table with name, cron and kind"
        ));
    }
    let mut jobs = Vec::new();
    for (i, job) in raw.job.into_iter().enumerate() {
        if let Some(job) = check_job(path, &label(i), job, problems)
            && !broken.contains(&i)
        {
            jobs.push(job);
        }
    }
    jobs
}

/// Checks one job, pushing every problem found; the job if there were none.
fn check_job(path: &Path, label: &str, raw: RawJob, problems: &mut Vec<String>) -> Option<Job> {
    let before = problems.len();
    let mut problem = |key: &str, text: String| {
        problems.push(format!("{}: {label}: {key}{text}", path.display()));
    };

    let name = match raw.name {
        None => {
            problem("name", ": missing".into());
            None
        }
        Some(name) => match check_name(&name) {
            Ok(()) => Some(name),
            Err(e) => {
                problem("name", format!(" {name:?}: {e}"));
                None
            }
        },
    };
    let cron = match raw.cron {
        None => {
            problem(
                "cron",
                ": missing: a 5-field crontab expression, e.g. \"30 3 * * *\" for 03:30 daily"
                    .into(),
            );
            None
        }
        Some(text) => match CronSchedule::parse(&text) {
            Ok(c) => Some(c),
            Err(e) => {
                problem("cron", format!(" {text:?}: {e}"));
                None
            }
        },
    };
    let time_zone = match raw.time_zone {
        None => Some(Tz::UTC),
        Some(text) => match text.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                problem(
                    "time_zone",
                    format!(" {text:?}: {}", unknown_time_zone(&text)),
                );
                None
            }
        },
    };

    // Which kinds take which argument.
    let takes = |kind: &str, key: &str| match key {
        "to" => kind == "backup",
        "tables" => kind == "backup" || kind == "sync",
        "from" => kind == "verify" || kind == "prune",
        "backup" => kind == "verify",
        _ => false,
    };
    let given: Vec<&str> = [
        ("to", raw.to.is_some()),
        ("tables", raw.tables.is_some()),
        ("from", raw.from.is_some()),
        ("backup", raw.backup.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect();
    let kind_name = match raw.kind.as_deref() {
        None => {
            problem("kind", ": missing: backup, sync, verify or prune".into());
            None
        }
        Some(k @ ("backup" | "sync" | "verify" | "prune")) => Some(k.to_string()),
        Some(other) => {
            problem(
                "kind",
                format!(" {other:?}: expected backup, sync, verify or prune"),
            );
            None
        }
    };
    if let Some(kind) = &kind_name {
        for key in given.iter().filter(|key| !takes(kind, key)) {
            let users: Vec<&str> = ["backup", "sync", "verify", "prune"]
                .into_iter()
                .filter(|k| takes(k, key))
                .collect();
            problem(
                key,
                format!(
                    ": not used by kind {kind:?} (only by {})",
                    users.join(" and ")
                ),
            );
        }
    }

    let mut tables = Vec::new();
    for (i, text) in raw.tables.iter().flatten().enumerate() {
        match parse_pattern(text) {
            Ok(p) => tables.push(p),
            Err(e) => problem(&format!("tables[{i}]"), format!(": {e}")),
        }
    }
    let mut location = |key: &str, value: Option<String>| -> Option<String> {
        let url = value?;
        if let Err(e) = check_location(&url) {
            problem(key, format!(" {url:?}: {e}"));
        }
        Some(url)
    };
    let to = location("to", raw.to);
    let from = location("from", raw.from);
    let backup = raw.backup.unwrap_or_else(|| "latest".to_string());
    if backup.is_empty() || backup.contains(|c: char| c.is_whitespace() || c == '/') {
        problem(
            "backup",
            format!(" {backup:?}: expected \"latest\" or a backup's name"),
        );
    }

    if problems.len() > before {
        return None;
    }
    let kind = match kind_name?.as_str() {
        "backup" => JobKind::Backup { to, tables },
        "sync" => JobKind::Sync { tables },
        "verify" => JobKind::Verify { from, backup },
        _ => JobKind::Prune { from },
    };
    Some(Job {
        name: name?,
        file: path.to_path_buf(),
        cron: cron?,
        time_zone: time_zone?,
        kind,
        enabled: raw.enabled.unwrap_or(true),
    })
}

/// Job names: what a log line, a file name and a metric label can all carry.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters long".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err("may contain only lower-case letters, digits, '-' and '_'".into());
    }
    Ok(())
}

/// The forms the backup store opens (a pure check; the store reports what it cannot reach).
fn check_location(url: &str) -> Result<(), String> {
    if let Some(path) = url.strip_prefix("file://") {
        if path.len() > 1 && path.starts_with('/') {
            return Ok(());
        }
        return Err("a file URL needs an absolute path: file:///var/backups/bite-sync".into());
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        if rest.split('/').next().is_some_and(|b| !b.is_empty()) {
            return Ok(());
        }
        return Err("an S3 URL needs a bucket: s3://bucket/prefix".into());
    }
    Err("expected file:///dir or s3://bucket/prefix".into())
}

/// "unknown time zone" with up to three close IANA names.
fn unknown_time_zone(typed: &str) -> String {
    let near = near_time_zones(typed);
    match near.as_slice() {
        [] => "unknown time zone: use an IANA name such as America/Mexico_City or UTC".into(),
        [one] => format!("unknown time zone; did you mean {one}?"),
        many => format!(
            "unknown time zone; did you mean one of: {}?",
            many.join(", ")
        ),
    }
}

/// IANA names close to `typed` (fewest edits, ignoring case, reading spaces as `_`), compared
/// both whole and by their last part, so `Mexico City` finds `America/Mexico_City`.
pub fn near_time_zones(typed: &str) -> Vec<&'static str> {
    let key = typed.trim().to_lowercase().replace(' ', "_");
    let limit = (key.chars().count() / 5).max(2);
    let mut scored: Vec<(usize, &'static str)> = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|tz| {
            let name = tz.name();
            let lower = name.to_lowercase();
            let city = lower.rsplit('/').next().unwrap_or(&lower);
            let distance = strsim::levenshtein(&key, &lower).min(strsim::levenshtein(&key, city));
            (distance, name)
        })
        .filter(|(distance, _)| *distance <= limit)
        .collect();
    scored.sort();
    let best = scored.first().map_or(0, |s| s.0);
    scored
        .into_iter()
        .take_while(|(distance, _)| *distance == best)
        .take(3)
        .map(|(_, name)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(files: &[(&str, &str)]) -> Result<Vec<Job>, ScheduleError> {
        let owned: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        parse_files(&owned)
    }

    fn problems(files: &[(&str, &str)]) -> Vec<String> {
        match parse(files) {
            Ok(jobs) => panic!("expected problems, got {} jobs", jobs.len()),
            Err(e) => e.problems,
        }
    }

    #[test]
    fn the_committed_examples_load() {
        let jobs = parse(EXAMPLES).expect("the examples are valid");
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["backup", "verify", "prune", "menu-nightly"]);
        let by_name = |n: &str| jobs.iter().find(|j| j.name == n).unwrap();
        let backup = by_name("backup");
        assert_eq!(backup.cron.text(), "0 */6 * * *");
        assert_eq!(backup.time_zone, chrono_tz::America::Mexico_City);
        assert_eq!(backup.file, PathBuf::from("schedules.example/backup.toml"));
        assert!(backup.enabled);
        assert_eq!(by_name("verify").cron.text(), "30 4 * * *");
        assert_eq!(
            by_name("verify").kind,
            JobKind::Verify {
                from: None,
                backup: "latest".into()
            }
        );
        assert_eq!(by_name("prune").kind, JobKind::Prune { from: None });
        let sync = by_name("menu-nightly");
        assert_eq!(
            sync.kind,
            JobKind::Sync {
                tables: vec![parse_pattern("menu_items").unwrap()]
            }
        );
        assert_eq!(sync.cron.text(), "0 3 * * *");
        assert!(
            !sync.enabled,
            "the example sync is off until someone turns it on"
        );
    }

    #[test]
    fn a_bad_cron_names_file_job_and_field() {
        let p = problems(&[(
            "schedules/backup.toml",
            "[[job]]\nname = \"backup\"\ncron = \"0 */6 * *\"\nkind = \"backup\"\n",
        )]);
        assert_eq!(
            p,
            [
                "schedules/backup.toml: job \"backup\": cron \"0 */6 * *\": expected 5 fields (minute hour day-of-month month day-of-week), got 4"
            ]
        );
    }

    #[test]
    fn every_problem_in_every_file_is_reported() {
        let p = problems(&[
            (
                "a.toml",
                "[[job]]\nname = \"Nightly Backup\"\ncron = \"61 3 * * *\"\nkind = \"backups\"\n\
                 time_zone = \"America/Mexico_Cty\"\n\
                 [[job]]\nname = \"s\"\ncron = \"0 3 * * *\"\nkind = \"sync\"\nfrom = \"s3://b\"\ntables = [\"a.b.c\"]\n",
            ),
            (
                "b.toml",
                "[[job]]\nname = \"x\"\ncron = \"@daily\"\nkind = \"prune\"\ntabels = []\n",
            ),
            ("c.toml", "[[job]\n"),
        ]);
        let text = p.join("\n");
        let expected = [
            "a.toml: job \"Nightly Backup\": name \"Nightly Backup\": may contain only",
            "a.toml: job \"Nightly Backup\": cron \"61 3 * * *\": minute \"61\": 61 is out of range 0-59",
            "a.toml: job \"Nightly Backup\": time_zone \"America/Mexico_Cty\": unknown time zone; did you mean America/Mexico_City?",
            "a.toml: job \"Nightly Backup\": kind \"backups\": expected backup, sync, verify or prune",
            "a.toml: job \"s\": from: not used by kind \"sync\" (only by verify and prune)",
            "a.toml: job \"s\": tables[0]: too many dots",
            "b.toml: line 5: job \"x\": tabels: unknown key; did you mean tables?",
            "c.toml: line 1, column 6: not valid TOML",
        ];
        for e in expected {
            assert!(text.contains(e), "missing {e:?} in:\n{text}");
        }
        assert_eq!(p.len(), expected.len(), "{text}");
    }

    #[test]
    fn problems_point_at_line_and_key_and_never_quote_the_file() {
        let secret = "wJalrXUtnFEMI-K7MDENG";
        let p = problems(&[
            (
                "a.toml",
                &format!(
                    "[[job]]\nname = \"b\"\ncron = \"@daily\"\nkind = \"backup\"\nto = \"s3://b/{secret}\n"
                ),
            ),
            (
                "b.toml",
                &format!(
                    "[[job]]\nname = \"b2\"\ncron = \"@daily\"\nkind = \"backup\"\nsecret = \"{secret}\"\nenabled = \"{secret}\"\ntables = [1, 2]\n"
                ),
            ),
        ]);
        let text = p.join("\n");
        assert!(!text.contains(&secret[4..12]), "the secret leaked: {text}");
        assert_eq!(
            p,
            [
                "a.toml: line 5, column 35: not valid TOML: invalid basic string",
                "b.toml: line 5: job \"b2\": secret: unknown key; the keys here are name, cron, time_zone, kind, to, tables, from, backup, enabled",
                "b.toml: line 6: job \"b2\": enabled: expected a boolean, got a string",
                "b.toml: line 7: job \"b2\": tables[0]: expected a string, got an integer",
            ]
        );
    }

    #[test]
    fn a_name_used_twice_names_both_files() {
        let job = "[[job]]\nname = \"backup\"\ncron = \"0 3 * * *\"\nkind = \"backup\"\n";
        let p = problems(&[("schedules/a.toml", job), ("schedules/b.toml", job)]);
        assert_eq!(
            p,
            ["schedules/b.toml: job \"backup\": name already used in schedules/a.toml"]
        );
        let twice = format!("{job}{job}");
        let p = problems(&[("schedules/a.toml", &twice)]);
        assert_eq!(
            p,
            ["schedules/a.toml: job \"backup\": name used twice in this file"]
        );
    }

    #[test]
    fn missing_keys_and_wrong_types_are_named() {
        let p = problems(&[(
            "f.toml",
            "[[job]]\ncron = \"0 3 * * *\"\n[[job]]\nname = \"y\"\ncron = \"0 3 * * *\"\nkind = \"sync\"\nenabled = \"yes\"\n",
        )]);
        let text = p.join("\n");
        assert!(text.contains("f.toml: job #1: name: missing"), "{text}");
        assert!(text.contains("f.toml: job #1: kind: missing"), "{text}");
        assert!(
            text.contains("f.toml: line 7: job \"y\": enabled: expected a boolean, got a string"),
            "{text}"
        );
        let p = problems(&[("g.toml", "[job]\nname = \"x\"\n")]);
        assert_eq!(
            p,
            ["g.toml: line 1: job: write [[job]] (two brackets) above each job"]
        );
        let p = problems(&[("h.toml", "# nothing yet\n")]);
        assert!(p[0].starts_with("h.toml: no jobs"), "{p:?}");
    }

    #[test]
    fn locations_and_backup_names_are_checked() {
        let p = problems(&[(
            "f.toml",
            "[[job]]\nname = \"b\"\ncron = \"0 3 * * *\"\nkind = \"backup\"\nto = \"/var/backups\"\n\
             [[job]]\nname = \"v\"\ncron = \"0 4 * * *\"\nkind = \"verify\"\nfrom = \"file://relative\"\nbackup = \"\"\n",
        )]);
        let text = p.join("\n");
        assert!(
            text.contains(
                "job \"b\": to \"/var/backups\": expected file:///dir or s3://bucket/prefix"
            ),
            "{text}"
        );
        assert!(
            text.contains("job \"v\": from \"file://relative\": a file URL needs an absolute path"),
            "{text}"
        );
        assert!(
            text.contains("job \"v\": backup \"\": expected \"latest\""),
            "{text}"
        );
        let jobs = parse(&[(
            "f.toml",
            "[[job]]\nname = \"b\"\ncron = \"0 3 * * *\"\nkind = \"backup\"\nto = \"s3://bucket/bite\"\ntables = [\"customers\", \"sales.*\"]\n",
        )])
        .unwrap();
        assert_eq!(
            jobs[0].kind,
            JobKind::Backup {
                to: Some("s3://bucket/bite".into()),
                tables: vec![
                    parse_pattern("customers").unwrap(),
                    parse_pattern("sales.*").unwrap()
                ]
            }
        );
        assert_eq!(jobs[0].time_zone, Tz::UTC, "UTC unless said otherwise");
    }

    #[test]
    fn the_default_dir_is_next_to_the_config_file() {
        assert_eq!(default_dir(None), PathBuf::from("schedules"));
        assert_eq!(
            default_dir(Some(Path::new("bite-sync.toml"))),
            PathBuf::from("schedules")
        );
        assert_eq!(
            default_dir(Some(Path::new("/etc/bite-sync/bite-sync.toml"))),
            PathBuf::from("/etc/bite-sync/schedules")
        );
    }

    #[test]
    fn time_zone_hints() {
        assert_eq!(near_time_zones("america/new_york"), ["America/New_York"]);
        assert!(near_time_zones("Mexico City").contains(&"America/Mexico_City"));
        assert!(near_time_zones("Europe/Madird").contains(&"Europe/Madrid"));
        assert!(unknown_time_zone("Nowhere/Qwxz").contains("use an IANA name"));
    }

    #[test]
    fn load_dir_reads_toml_files_in_name_order_and_ignores_others() {
        let dir = tempfile::tempdir().unwrap();
        let job = |name: &str| {
            format!("[[job]]\nname = \"{name}\"\ncron = \"0 3 * * *\"\nkind = \"prune\"\n")
        };
        std::fs::write(dir.path().join("b.toml"), job("second")).unwrap();
        std::fs::write(dir.path().join("a.toml"), job("first")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a schedule").unwrap();
        let jobs = load_dir(dir.path()).unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["first", "second"]);
        assert_eq!(jobs[0].file, dir.path().join("a.toml"));

        let missing = dir.path().join("nope");
        let err = load_dir(&missing).unwrap_err().to_string();
        assert!(err.contains("cannot read the schedules directory"), "{err}");
    }
}
