//! `bite-sync schedules` through the real binary: schedule files in a temp dir, the exit codes,
//! and last runs read from a real mirror's `bite_sync.job_runs`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};

use std::time::Duration;

use bite_sync::pg::connect::{DbUrl, Role};
use bite_sync::schedule::{JobOutcome, PgRunLog, RunLog, RunState};
use support::{bite_sync, connect, test_dbs, wait_for};

const GOOD: &str = r#"
[[job]]
name = "nightly-backup"
cron = "30 3 * * *"
time_zone = "Europe/Madrid"
kind = "backup"
to = "s3://bucket/bite"

[[job]]
name = "weekly-prune"
cron = "0 5 * * sun"
kind = "prune"
enabled = false
"#;

/// `bite-sync schedules <args>` with the files in `<cwd>/schedules/`; returns the output and
/// the schedules directory.
fn schedules(files: &[(&str, &str)], args: &[&str]) -> (Output, PathBuf) {
    let mut cmd = bite_sync();
    let dir = cmd
        .get_current_dir()
        .expect("bite_sync() sets a working dir")
        .join("schedules");
    write_files(&dir, files);
    // The backup job needs a source to be runnable, as `bite-sync run` checks (connecting to
    // it is not needed to list the jobs).
    cmd.env(
        "BITE_SOURCE_URL",
        "postgres://bite@127.0.0.1:1/bite?sslmode=disable",
    );
    let out = run(cmd.arg("schedules").args(args));
    (out, dir)
}

fn write_files(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("bite-sync runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

fn json(o: &Output) -> Vec<serde_json::Value> {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not a JSON array ({e}): {}", stdout(o)))
}

fn time(value: &serde_json::Value) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"));
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
        .to_utc()
}

#[test]
fn lists_the_jobs_as_json_with_their_next_run() {
    let before = Utc::now();
    let (out, _) = schedules(&[("nightly.toml", GOOD)], &["--json"]);
    assert_exit(&out, 0);
    let jobs = json(&out);
    assert_eq!(jobs.len(), 2, "{jobs:?}");

    let backup = &jobs[0];
    assert_eq!(backup["name"], "nightly-backup");
    assert_eq!(backup["kind"], "backup");
    assert_eq!(backup["cron"], "30 3 * * *");
    assert_eq!(backup["time_zone"], "Europe/Madrid");
    assert_eq!(backup["file"], "schedules/nightly.toml");
    assert_eq!(backup["arguments"]["to"], "s3://bucket/bite");
    // The next run is within a day, at 03:30 Madrid time, and both forms are the same instant.
    let next = time(&backup["next_run_utc"]);
    assert!(
        next > before && next <= before + TimeDelta::hours(25),
        "{next}"
    );
    assert_eq!(time(&backup["next_run"]), next);
    let local = backup["next_run"].as_str().unwrap();
    assert!(local.contains("T03:30:00+0"), "{local}");
    assert_eq!(backup["last_run_known"], false);
    assert!(backup["last_run"].is_null());

    let prune = &jobs[1];
    assert_eq!(prune["enabled"], false);
    assert_eq!(prune["time_zone"], "UTC");
    assert!(
        prune["next_run"].is_null(),
        "a disabled job has no next run"
    );

    assert!(
        stderr(&out).contains("note: last runs unknown: no mirror configured"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_text_listing_shows_local_and_utc_times() {
    let (out, _) = schedules(&[("nightly.toml", GOOD)], &[]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains("nightly-backup (backup to s3://bucket/bite)\n"),
        "{text}"
    );
    assert!(
        text.contains("  cron:     30 3 * * *  in Europe/Madrid\n"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("  next run: ")
            && l.contains(" 03:30 CE")
            && l.ends_with(" UTC)")),
        "{text}"
    );
    assert!(text.contains("weekly-prune (prune), disabled\n"), "{text}");
    assert!(text.contains("  last run: unknown\n"), "{text}");
}

#[test]
fn bad_files_exit_2_with_every_problem_naming_file_job_and_field() {
    let bad = "[[job]]\nname = \"backup\"\ncron = \"0 */6 * *\"\nkind = \"backup\"\n";
    let worse = "[[job]]\nname = \"sync\"\ncron = \"0 3 * * *\"\nkind = \"sync\"\ntime_zone = \"Europe/Madird\"\n";
    let (out, _) = schedules(&[("a.toml", bad), ("b.toml", worse)], &["--json"]);
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.starts_with("error: invalid schedules (2 problems):"),
        "{err}"
    );
    assert!(
        err.contains(
            "schedules/a.toml: job \"backup\": cron \"0 */6 * *\": expected 5 fields (minute hour day-of-month month day-of-week), got 4"
        ),
        "{err}"
    );
    assert!(
        err.contains(
            "schedules/b.toml: job \"sync\": time_zone \"Europe/Madird\": unknown time zone; did you mean Europe/Madrid?"
        ),
        "{err}"
    );
    assert!(stdout(&out).is_empty(), "nothing listed: {}", stdout(&out));
}

#[test]
fn a_missing_dir_named_with_dir_is_an_error_and_the_default_one_is_not() {
    let mut cmd = bite_sync();
    let out = run(cmd.args(["schedules", "--dir", "/nonexistent/schedules"]));
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("/nonexistent/schedules: cannot read the schedules directory"),
        "{}",
        stderr(&out)
    );

    let mut cmd = bite_sync();
    let out = run(cmd.args(["schedules", "--json"]));
    assert_exit(&out, 0);
    assert_eq!(json(&out), Vec::<serde_json::Value>::new());
    assert!(
        stderr(&out).contains("schedules does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unreachable_mirror_is_a_note_and_the_listing_still_works() {
    let (out, _) = schedules(
        &[("nightly.toml", GOOD)],
        &[
            "--mirror",
            "postgres://bite@127.0.0.1:1/bite?sslmode=disable",
        ],
    );
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("  last run: unknown\n"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("note: last runs unknown: the mirror is unreachable"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn last_runs_come_from_the_mirrors_bookkeeping() {
    let dbs = test_dbs("schedules_last_runs").await;
    let files = [("nightly.toml", GOOD)];

    // A mirror without bite_sync.job_runs: unknown, and the note says why.
    let (out, _) = schedules(&files, &["--json", "--mirror", &dbs.mirror_url]);
    assert_exit(&out, 0);
    assert_eq!(json(&out)[0]["last_run_known"], false);
    assert!(
        stderr(&out).contains("no run history yet"),
        "{}",
        stderr(&out)
    );

    let mut admin = connect(&dbs.mirror_url).await;
    bite_sync::bookkeeping::migrate(&mut admin).await.unwrap();
    let log = PgRunLog::new(connect(&dbs.mirror_url).await);
    let t0 = Utc.with_ymd_and_hms(2026, 3, 7, 2, 30, 0).unwrap() + TimeDelta::microseconds(123_456);
    let old = log.record_start("nightly-backup", t0).await.unwrap();
    log.record_end(old, t0 + TimeDelta::minutes(1), Err("disk full".into()))
        .await
        .unwrap();
    let t1 = t0 + TimeDelta::days(1);
    let new = log.record_start("nightly-backup", t1).await.unwrap();
    let outcome = JobOutcome {
        bytes: Some(5_000_000),
        detail: "12 tables".into(),
    };
    log.record_end(new, t1 + TimeDelta::seconds(192), Ok(outcome))
        .await
        .unwrap();

    // Times come back to the microsecond.
    let last = log.last_run("nightly-backup").await.unwrap().unwrap();
    assert_eq!(last.id, new);
    assert_eq!(last.started_at, t1);
    assert_eq!(last.finished_at, Some(t1 + TimeDelta::seconds(192)));
    assert_eq!(last.state, RunState::Ok);
    assert_eq!(last.bytes, Some(5_000_000));
    assert!(log.last_run("weekly-prune").await.unwrap().is_none());

    let (out, _) = schedules(&files, &["--json", "--mirror", &dbs.mirror_url]);
    assert_exit(&out, 0);
    let jobs = json(&out);
    let backup = &jobs[0];
    assert_eq!(backup["last_run_known"], true);
    assert_eq!(backup["last_run"]["outcome"], "ok");
    assert_eq!(backup["last_run"]["bytes"], 5_000_000);
    assert_eq!(backup["last_run"]["detail"], "12 tables");
    assert_eq!(time(&backup["last_run"]["started_at"]), t1);
    assert!(jobs[1]["last_run"].is_null(), "weekly-prune never ran");
    assert!(!stderr(&out).contains("note:"), "{}", stderr(&out));

    let (out, _) = schedules(&files, &["--mirror", &dbs.mirror_url]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out)
            .contains("  last run: 2026-03-08 03:30 CET: ok after 3m 12s, 4.8 MiB: 12 tables\n"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("  last run: never\n"),
        "{}",
        stdout(&out)
    );
}

/// Ends every other session on `db` of the admin's cluster (the mirror restarting, a failover,
/// a proxy dropping idle connections) and waits until they are gone.
async fn kill_other_sessions(admin: &tokio_postgres::Client, db: &str) {
    admin
        .execute(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_catalog.pg_backend_pid()",
            &[&db],
        )
        .await
        .unwrap();
    wait_for(
        "the killed sessions to be gone",
        Duration::from_secs(10),
        || async {
            let left: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_catalog.pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_catalog.pg_backend_pid()",
                    &[&db],
                )
                .await
                .unwrap()
                .get(0);
            (left == 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_reconnecting_history_outlives_its_connection_and_a_fixed_one_does_not() {
    let dbs = test_dbs("schedules_reconnect").await;
    let mut admin = connect(&dbs.mirror_url).await;
    bite_sync::bookkeeping::migrate(&mut admin).await.unwrap();
    let url = DbUrl::parse(Role::Mirror, &dbs.mirror_url).unwrap();
    let fixed = PgRunLog::new(connect(&dbs.mirror_url).await);
    let log = PgRunLog::reconnecting(url.clone(), Some(url.connect().await.unwrap()));

    let t0 = Utc.with_ymd_and_hms(2026, 3, 7, 2, 30, 0).unwrap();
    let first = log.record_start("nightly", t0).await.unwrap();
    assert_eq!(fixed.last_run("nightly").await.unwrap().unwrap().id, first);

    kill_other_sessions(&admin, &dbs.name).await;
    let lost = fixed.last_run("nightly").await;
    assert!(
        lost.is_err(),
        "a fixed log cannot outlive its connection: {lost:?}"
    );
    // The run that started before the connection died is still completed...
    let outcome = JobOutcome {
        bytes: Some(42),
        detail: "done".into(),
    };
    log.record_end(first, t0 + TimeDelta::minutes(3), Ok(outcome))
        .await
        .unwrap();
    // ... and the next one recorded, after another loss.
    kill_other_sessions(&admin, &dbs.name).await;
    let t1 = t0 + TimeDelta::days(1);
    let second = log.record_start("nightly", t1).await.unwrap();
    kill_other_sessions(&admin, &dbs.name).await;
    let last = log.last_run("nightly").await.unwrap().unwrap();
    assert_eq!((last.id, last.started_at), (second, t1));

    let rows: Vec<(String, Option<i64>)> = admin
        .query(
            "SELECT outcome, bytes FROM bite_sync.job_runs ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        [("ok".to_string(), Some(42)), ("running".to_string(), None)]
    );

    // A log that starts while the mirror is away connects on first use.
    let lazy = PgRunLog::reconnecting(url, None);
    assert_eq!(lazy.last_run("nightly").await.unwrap().unwrap().id, second);
}
