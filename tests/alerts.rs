//! Alerts end to end: a fake webhook on loopback records what bite-sync POSTs; incident state
//! in a real mirror's `bite_sync.alerts`; `bite-sync status` over a folder store holding an
//! old backup.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bite_sync::alert::{Alerter, Observation, PgIncidents, Retry, WebhookUrl};
use bite_sync::backup::manifest::{self, Manifest};
use bite_sync::pg::connect::{DbUrl, Role};
use chrono::Utc;
use support::{FakeWebhook, bite_sync, connect, test_dbs};

fn alerter(mirror_url: &str, webhook: &FakeWebhook) -> Alerter {
    let store = PgIncidents::new(DbUrl::parse(Role::Mirror, mirror_url).unwrap());
    Alerter::new(Arc::new(store), WebhookUrl::parse(&webhook.url).unwrap()).with_retry(Retry {
        attempts: 2,
        first_backoff: Duration::from_millis(10),
        timeout: Duration::from_secs(5),
    })
}

#[tokio::test]
async fn a_failing_job_alerts_once_even_across_a_restart_and_once_more_when_it_recovers() {
    let dbs = test_dbs("alerts_once").await;
    let mut mirror = connect(&dbs.mirror_url).await;
    bite_sync::bookkeeping::migrate(&mut mirror)
        .await
        .expect("migrate");
    let webhook = FakeWebhook::start().await;
    let failed = Observation::run("backup", &Err("disk full".into()));

    let first = alerter(&dbs.mirror_url, &webhook);
    for _ in 0..3 {
        first.observe(&failed, Utc::now()).await;
    }
    let bodies = webhook.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:#?}");
    assert_eq!(bodies[0]["state"], "open");
    assert_eq!(bodies[0]["incident"], "job:backup");
    assert_eq!(bodies[0]["job"], "backup");
    assert!(
        bodies[0]["text"]
            .as_str()
            .unwrap()
            .contains("job \"backup\" failed: disk full"),
        "{bodies:#?}"
    );

    // A new process over the same mirror: the incident is open and was alerted.
    let restarted = alerter(&dbs.mirror_url, &webhook);
    restarted.observe(&failed, Utc::now()).await;
    assert_eq!(webhook.bodies().len(), 1, "{:#?}", webhook.bodies());

    let ok = Observation::run("backup", &Ok(Default::default()));
    restarted.observe(&ok, Utc::now()).await;
    restarted.observe(&ok, Utc::now()).await;
    let bodies = webhook.bodies();
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    assert_eq!(bodies[1]["state"], "resolved");
    assert_eq!(bodies[1]["incident"], "job:backup");

    // Failing again is a new incident.
    restarted.observe(&failed, Utc::now()).await;
    assert_eq!(webhook.bodies().len(), 3);
    let resolved: Option<bool> = mirror
        .query_one(
            "SELECT resolved_at IS NULL FROM bite_sync.alerts WHERE incident = 'job:backup'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .ok();
    assert_eq!(resolved, Some(true), "the reopened incident is open");
}

/// Writes a backup folder `id` holding only a manifest (enough for `backups list` to call it
/// good).
fn fake_backup(store: &std::path::Path, id: &str) {
    let m = Manifest {
        format: manifest::FORMAT,
        id: id.to_string(),
        bite_sync_version: "test".into(),
        started_at: "2020-01-01T00:00:00Z".into(),
        finished_at: "2020-01-01T00:00:01Z".into(),
        source: manifest::Source {
            system_identifier: "1".into(),
            database: "db".into(),
            server_version: "17".into(),
            server_version_num: 170000,
        },
        snapshot: manifest::Snapshot {
            time: "2020-01-01T00:00:00Z".into(),
            lsn: "0/1".into(),
        },
        scope: manifest::Scope::Database,
        compression: "gzip".into(),
        encryption: None,
        recipient: None,
        tables: Vec::new(),
        partitioned: Vec::new(),
        large_objects: None,
        objects: Vec::new(),
    };
    let dir = store.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(manifest::MANIFEST),
        serde_json::to_vec(&m).unwrap(),
    )
    .unwrap();
}

#[test]
fn status_warns_about_a_stale_backup_and_not_a_fresh_one() {
    let status = |store: &std::path::Path| {
        let mut cmd = bite_sync();
        let dir = cmd.get_current_dir().unwrap().to_path_buf();
        std::fs::write(
            dir.join("bite-sync.toml"),
            format!("[backup]\nurl = \"file://{}\"\n", store.display()),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("schedules")).unwrap();
        std::fs::write(
            dir.join("schedules/backup.toml"),
            "[[job]]\nname = \"nightly\"\ncron = \"0 3 * * *\"\nkind = \"backup\"\n",
        )
        .unwrap();
        let out = cmd.args(["status", "--json"]).output().expect("status");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (out.status.code(), json)
    };
    let store = tempfile::tempdir().unwrap();
    fake_backup(store.path(), "20200101T000000Z");
    let (code, json) = status(store.path());
    assert_eq!(code, Some(1));
    assert_eq!(json["healthy"], false);
    assert_eq!(json["backups"][0]["job"], "nightly");
    assert_eq!(json["backups"][0]["newest"], "20200101T000000Z");
    assert_eq!(json["backups"][0]["stale"], true);
    assert_eq!(json["backups"][0]["period_seconds"], 86_400);
    let warnings = json["warnings"].to_string();
    assert!(
        warnings.contains("the newest backup of job \\\"nightly\\\" (20200101T000000Z) is")
            && warnings.contains("more than twice its schedule's period (1d 0h)"),
        "{warnings}"
    );

    fake_backup(store.path(), &manifest::backup_id(Utc::now()));
    let (_, json) = status(store.path());
    assert_eq!(json["backups"][0]["stale"], false, "{json:#}");
    assert!(
        !json["warnings"].to_string().contains("newest backup"),
        "{json:#}"
    );

    let empty = tempfile::tempdir().unwrap();
    let (_, json) = status(empty.path());
    assert!(
        json["warnings"]
            .to_string()
            .contains("job \\\"nightly\\\" has no good backup"),
        "{json:#}"
    );
}
