//! `bite-sync backup`, `backups list`, `backups verify` and `restore`, against real clusters
//! and a folder store (the S3 store has its own tests in `backup_store.rs`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::{EVERY_TYPE_ROWS, EVERY_TYPE_SCHEMA, bite_sync, clusters, connect, test_dbs};

/// Odd names, a view, a function and a trigger: what a whole-database backup must bring back.
const EXTRAS: &str = r#"
CREATE SCHEMA "Sales Dept";
CREATE TABLE "Sales Dept"."Order ""Items""" (id int PRIMARY KEY, "select" text, note text);
INSERT INTO "Sales Dept"."Order ""Items""" SELECT g, 'row ' || g, E'a\tb\nc\\d' FROM generate_series(1, 500) g;
CREATE VIEW recent_orders AS SELECT id, status FROM orders WHERE id > 10;
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.updated_at := now(); RETURN NEW; END $$;
CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch();
"#;

const TABLES: [&str; 6] = [
    "public.customers",
    "public.menu_items",
    "public.orders",
    "public.order_items",
    "public.everything",
    r#""Sales Dept"."Order ""Items""""#,
];

async fn sample_source(url: &str) -> tokio_postgres::Client {
    let client = connect(url).await;
    bite_sync::sample::load(&client, bite_sync::sample::SampleSize::DEMO)
        .await
        .expect("sample loads");
    client
        .batch_execute(&format!("{EVERY_TYPE_SCHEMA}{EVERY_TYPE_ROWS}{EXTRAS}"))
        .await
        .expect("extras load");
    client
}

/// Count and md5 of a table's rows as text, sorted: independent of bite-sync's own checksum.
async fn digest(client: &tokio_postgres::Client, table: &str) -> (i64, String) {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("digest of {table}: {e}"));
    (row.get(0), row.get(1))
}

async fn assert_same_tables(source: &tokio_postgres::Client, restored: &tokio_postgres::Client) {
    for table in TABLES {
        assert_eq!(
            digest(source, table).await,
            digest(restored, table).await,
            "{table} differs after the restore"
        );
    }
}

/// Runs `pipeline | psql -X -q -v ON_ERROR_STOP=1 -d target` (the stock-tool restore) and
/// asserts it succeeded.
fn into_psql(pipeline: &str, target: &str) {
    let psql = clusters().source.bin_dir().join("psql");
    let script = format!(
        "{pipeline} | '{}' -X -q -v ON_ERROR_STOP=1 -d '{target}'",
        psql.display()
    );
    let status = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{script}");
}

fn store_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bite-sync-backup-test-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn url_of(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn run(args: &[&str]) -> Output {
    let out = bite_sync().args(args).output().expect("bite-sync runs");
    eprintln!(
        "bite-sync {}\n-- stdout:\n{}\n-- stderr:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The backup's folder (the only one in the store).
fn backup_folder(dir: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("store dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.remove(0)
}

#[tokio::test]
async fn a_backup_lists_verifies_and_restores_equal_row_by_row() {
    let dbs = test_dbs("backup_round_trip").await;
    let source = sample_source(&dbs.source_url).await;
    let dir = store_dir("round-trip");
    let to = url_of(&dir);

    let out = run(&["backup", "--source", &dbs.source_url, "--to", &to, "--json"]);
    assert!(out.status.success());
    let report = json(&out);
    let id = report["id"].as_str().unwrap().to_owned();
    assert_eq!(report["tables"], 6);
    let folder = backup_folder(&dir);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["id"], id.as_str());
    assert_eq!(manifest["source"]["database"], dbs.name.as_str());
    assert!(manifest["snapshot"]["lsn"].as_str().unwrap().contains('/'));
    let orders = manifest["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "orders")
        .unwrap();
    assert_eq!(orders["rows"], 5000);
    for object in manifest["objects"].as_array().unwrap() {
        let data = std::fs::read(folder.join(object["name"].as_str().unwrap())).unwrap();
        assert_eq!(object["size"], data.len() as u64);
        use sha2::Digest as _;
        assert_eq!(object["sha256"], hex::encode(sha2::Sha256::digest(&data)));
    }

    let out = run(&["backups", "list", "--from", &to, "--json"]);
    assert!(out.status.success());
    let list = json(&out);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["state"], "good");

    let out = run(&[
        "backups",
        "verify",
        &id,
        "--from",
        &to,
        "--source",
        &dbs.source_url,
        "--json",
    ]);
    assert!(out.status.success());
    let verified = json(&out);
    assert_eq!(verified["ok"], true);
    assert_eq!(verified["tables"].as_array().unwrap().len(), 6);
    // The scratch database is gone.
    let scratch = verified["scratch_database"].as_str().unwrap();
    let exists: bool = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            &[&scratch],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "{scratch} was left behind");

    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert!(out.status.success());
    let restored = connect(&dbs.mirror_url).await;
    assert_same_tables(&source, &restored).await;
    // The schema came whole: view, trigger, keys, sequences where the source left them.
    let row = restored
        .query_one(
            "SELECT (SELECT count(*) FROM recent_orders), \
                    (SELECT count(*) FROM pg_trigger WHERE tgname = 'orders_touch'), \
                    (SELECT count(*) FROM pg_constraint WHERE contype = 'f'), \
                    (SELECT last_value FROM orders_id_seq)",
            &[],
        )
        .await
        .unwrap();
    let source_row = source
        .query_one(
            "SELECT last_value, (SELECT count(*) FROM pg_constraint WHERE contype = 'f') FROM orders_id_seq",
            &[],
        )
        .await
        .unwrap();
    let (source_seq, source_fks): (i64, i64) = (source_row.get(0), source_row.get(1));
    assert_eq!(row.get::<_, i64>(0), 4990);
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(
        row.get::<_, i64>(2),
        source_fks,
        "every foreign key restored"
    );
    assert_eq!(row.get::<_, i64>(3), source_seq);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn stock_gunzip_and_psql_restore_a_backup() {
    let dbs = test_dbs("backup_stock_restore").await;
    let source = sample_source(&dbs.source_url).await;
    let dir = store_dir("stock");
    let out = run(&["backup", "--source", &dbs.source_url, "--to", &url_of(&dir)]);
    assert!(out.status.success());
    let folder = backup_folder(&dir);
    // The README's one line: gunzip -c DIR/*.sql.gz | psql -X -v ON_ERROR_STOP=1 -d URL
    into_psql(
        &format!("gunzip -c '{}'/*.sql.gz", folder.display()),
        &dbs.mirror_url,
    );
    let restored = connect(&dbs.mirror_url).await;
    assert_same_tables(&source, &restored).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_corrupted_object_is_caught_by_verify_and_never_restored() {
    let dbs = test_dbs("backup_corrupt").await;
    sample_source(&dbs.source_url).await;
    let dir = store_dir("corrupt");
    let to = url_of(&dir);
    assert!(
        run(&["backup", "--source", &dbs.source_url, "--to", &to])
            .status
            .success()
    );
    let folder = backup_folder(&dir);
    let victim = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("public.orders."))
        .unwrap();
    let mut data = std::fs::read(&victim).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0x55;
    std::fs::write(&victim, &data).unwrap();

    let out = run(&[
        "backups",
        "verify",
        "--from",
        &to,
        "--source",
        &dbs.source_url,
    ]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("corrupt") && stderr.contains("public.orders"),
        "{stderr}"
    );

    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the target is as it was"), "{stderr}");
    let restored = connect(&dbs.mirror_url).await;
    assert_eq!(
        table_count(&restored).await,
        0,
        "nothing of the restore was committed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_killed_backup_is_never_listed_as_good_nor_restored() {
    let dbs = test_dbs("backup_killed").await;
    let source = connect(&dbs.source_url).await;
    // Big enough that the backup takes a while: about 150 MB of rows.
    source
        .batch_execute(
            "CREATE TABLE big (id bigint PRIMARY KEY, payload text); \
             INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 1000000) g;",
        )
        .await
        .unwrap();
    let dir = store_dir("killed");
    let to = url_of(&dir);
    let mut child = bite_sync()
        .args(["backup", "--source", &dbs.source_url, "--to", &to])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has started writing data.
    support::wait_for(
        "the backup to start writing",
        Duration::from_secs(60),
        || {
            let dir = dir.clone();
            async move {
                let started = std::fs::read_dir(&dir).ok()?.flatten().any(|d| {
                    std::fs::read_dir(d.path())
                        .map(|f| {
                            f.flatten()
                                .any(|f| f.file_name().to_string_lossy().contains("data"))
                        })
                        .unwrap_or(false)
                });
                started.then_some(())
            }
        },
    )
    .await;
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    child.wait().unwrap();
    let folder = backup_folder(&dir);
    assert!(
        !folder.join("manifest.json").exists(),
        "the backup finished before the kill; make the table bigger"
    );

    // Listed as incomplete (some objects were finished) or not at all (only partial ones),
    // never as good.
    let out = run(&["backups", "list", "--from", &to, "--json"]);
    assert!(out.status.success());
    let list = json(&out);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "incomplete"),
        "{list}"
    );

    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no finished backup"));
    let out = run(&[
        "restore",
        folder.file_name().unwrap().to_str().unwrap(),
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no manifest"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_tables_backup_brings_its_tables_types_keys_and_foreign_keys() {
    let dbs = test_dbs("backup_tables").await;
    let source = sample_source(&dbs.source_url).await;
    let dir = store_dir("tables");
    let to = url_of(&dir);
    let out = run(&[
        "backup",
        "--source",
        &dbs.source_url,
        "--to",
        &to,
        "--tables",
        "customers,orders,everything",
        "--json",
    ]);
    assert!(out.status.success());
    assert_eq!(json(&out)["tables"], 3);
    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert!(out.status.success());
    let restored = connect(&dbs.mirror_url).await;
    for table in ["public.customers", "public.orders", "public.everything"] {
        assert_eq!(
            digest(&source, table).await,
            digest(&restored, table).await,
            "{table}"
        );
    }
    let row = restored
        .query_one(
            "SELECT to_regclass('public.menu_items') IS NULL, \
                    (SELECT count(*) FROM pg_constraint WHERE conname = 'orders_customer_id_fkey'), \
                    (SELECT count(*) FROM pg_constraint WHERE contype = 'p' AND connamespace = 'public'::regnamespace), \
                    (SELECT count(*) FROM pg_type WHERE typname IN ('order_status', 'mood', 'positive_price'))",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "only the tables asked for");
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(row.get::<_, i64>(2), 3);
    assert_eq!(row.get::<_, i64>(3), 3);
    // Inserting without an id continues after the source's rows.
    restored
        .batch_execute("INSERT INTO customers (phone, name) VALUES ('+34 600 000 999', 'New')")
        .await
        .expect("the sequence follows the source");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn restore_refuses_a_target_with_tables_unless_clean() {
    let dbs = test_dbs("backup_clean").await;
    let source = sample_source(&dbs.source_url).await;
    let dir = store_dir("clean");
    let to = url_of(&dir);
    assert!(
        run(&["backup", "--source", &dbs.source_url, "--to", &to])
            .status
            .success()
    );
    let target = connect(&dbs.mirror_url).await;
    target
        .batch_execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (1);")
        .await
        .unwrap();
    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not empty") && stderr.contains("--clean"),
        "{stderr}"
    );
    let still: i64 = target
        .query_one("SELECT count(*) FROM precious", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1, "a refused restore touched nothing");

    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
        "--clean",
    ]);
    assert!(out.status.success());
    let restored = connect(&dbs.mirror_url).await;
    assert_same_tables(&source, &restored).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn config_mistakes_and_a_missing_pg_dump_are_clear_errors() {
    let dbs = test_dbs("backup_errors").await;
    sample_source(&dbs.source_url).await;
    // No location at all.
    let out = run(&["backup", "--source", &dbs.source_url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backup.url"));
    // A location of another kind.
    let out = run(&["backup", "--source", &dbs.source_url, "--to", "ftp://x/y"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("s3://"));
    // pg_dump that is not there.
    let dir = store_dir("errors");
    let mut cmd = bite_sync();
    let cwd = cmd.get_current_dir().unwrap().to_path_buf();
    std::fs::write(
        cwd.join("bite-sync.toml"),
        format!(
            "[backup]\nurl = \"{}\"\npg_dump = \"/nonexistent/pg_dump\"\n",
            url_of(&dir)
        ),
    )
    .unwrap();
    let out = cmd
        .args(["backup", "--source", &dbs.source_url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no pg_dump") && stderr.contains("/nonexistent/pg_dump"),
        "{stderr}"
    );
    // Nothing listed from the failed attempt.
    let out = run(&["backups", "list", "--from", &url_of(&dir), "--json"]);
    assert_eq!(json(&out), serde_json::json!([]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_backup_round_trips_with_signed_requests() {
    let dbs = test_dbs("backup_s3").await;
    let source = sample_source(&dbs.source_url).await;
    let server = support::S3Server::start().await;
    // Endpoint and style from the config file, credentials from the usual AWS_* variables.
    let config = format!(
        "[backup]\nurl = \"{}\"\nendpoint = \"{}\"\npath_style = true\nregion = \"us-east-1\"\n",
        server.url("restaurant/nightly"),
        server.endpoint()
    );
    let s3_run = move |args: Vec<String>, secret: &'static str| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let mut cmd = bite_sync();
            let cwd = cmd.get_current_dir().unwrap().to_path_buf();
            std::fs::write(cwd.join("bite-sync.toml"), &config).unwrap();
            let out = cmd
                .args(&args)
                .env("AWS_ACCESS_KEY_ID", support::S3Server::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", secret)
                .output()
                .unwrap();
            eprintln!(
                "bite-sync {}\n-- stdout:\n{}\n-- stderr:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out
        })
    };
    let secret = support::S3Server::SECRET_KEY;
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let out = s3_run(
        args(&["backup", "--source", &dbs.source_url, "--json"]),
        secret,
    )
    .await
    .unwrap();
    assert!(out.status.success());
    let id = json(&out)["id"].as_str().unwrap().to_owned();

    let out = s3_run(args(&["backups", "list", "--json"]), secret)
        .await
        .unwrap();
    let list = json(&out);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["state"], "good");

    let out = s3_run(
        args(&["backups", "verify", "--source", &dbs.source_url, "--json"]),
        secret,
    )
    .await
    .unwrap();
    assert!(out.status.success());
    assert_eq!(json(&out)["ok"], true);

    let out = s3_run(args(&["restore", &id, "--target", &dbs.mirror_url]), secret)
        .await
        .unwrap();
    assert!(out.status.success());
    let restored = connect(&dbs.mirror_url).await;
    assert_same_tables(&source, &restored).await;

    // A wrong secret: refused by the server's signature check, and never printed.
    let out = s3_run(args(&["backups", "list"]), "wrong-secret-value-123")
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SignatureDoesNotMatch"), "{stderr}");
    assert!(!stderr.contains("wrong-secret-value-123"), "{stderr}");
}

/// Copies a finished backup's folder to another id, as if it had been taken then.
fn clone_backup(from: &Path, store: &Path, id: &str) {
    let to = store.join(id);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if name == "manifest.json" {
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            m["id"] = id.into();
            std::fs::write(to.join(&name), serde_json::to_vec(&m).unwrap()).unwrap();
        } else {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

#[tokio::test]
async fn prune_keeps_exactly_what_the_policy_says() {
    let dbs = test_dbs("backup_prune").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
        .await
        .unwrap();
    let dir = store_dir("prune");
    let to = url_of(&dir);
    assert!(
        run(&["backup", "--source", &dbs.source_url, "--to", &to])
            .status
            .success()
    );
    let real = backup_folder(&dir);
    // Two backups a day at 00:00 and 12:00 for ten days, ending yesterday.
    let yesterday = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let mut fake = Vec::new();
    for d in 0..10u64 {
        let day = yesterday - chrono::Days::new(d);
        for hour in ["000000", "120000"] {
            let id = format!("{}T{hour}Z", day.format("%Y%m%d"));
            clone_backup(&real, &dir, &id);
            fake.push(id);
        }
    }
    // A backup that died three days ago, and one that may still be running.
    let dead = format!(
        "{}T060000Z",
        (yesterday - chrono::Days::new(2)).format("%Y%m%d")
    );
    std::fs::create_dir_all(dir.join(&dead)).unwrap();
    std::fs::write(dir.join(&dead).join("0-pre-data.sql.gz"), b"x").unwrap();
    let running = chrono::Utc::now().format("%Y%m%dT%H%M%SZ-9").to_string();
    std::fs::create_dir_all(dir.join(&running)).unwrap();
    std::fs::write(dir.join(&running).join("0-pre-data.sql.gz"), b"x").unwrap();

    let policy = [
        "--keep-last",
        "3",
        "--keep-daily",
        "4",
        "--keep-weekly",
        "0",
        "--keep-monthly",
        "0",
    ];
    let mut args = vec!["backups", "prune", "--from", &to, "--json", "--dry-run"];
    args.extend(policy);
    let out = run(&args);
    assert!(out.status.success());
    let dry = json(&out);
    assert_eq!(dry["dry_run"], true);
    let left = |dir: &Path| {
        let mut ids: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(left(&dir).len(), 1 + 20 + 2, "a dry run deletes nothing");

    args.retain(|a| *a != "--dry-run");
    let out = run(&args);
    assert!(out.status.success());
    let report = json(&out);
    // Kept: the real one (newest, today) and yesterday's two (the last 3), and the newest
    // (12:00) of the two days before that (4 days with today's); the running one.
    let mut expected = vec![
        real.file_name().unwrap().to_string_lossy().into_owned(),
        fake[0].clone(),
        fake[1].clone(),
        fake[3].clone(),
        fake[5].clone(),
        running.clone(),
    ];
    expected.sort();
    assert_eq!(left(&dir), expected, "{report}");
    assert_eq!(report["deleted"].as_array().unwrap().len(), 20 - 4);
    assert_eq!(report["incomplete_deleted"], serde_json::json!([dead]));
    // What is left still restores.
    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 11.11: retention used to count every backup together, so two newer backups of two
/// tables pushed the only whole-database backup out. Each coverage is counted on its own,
/// and the newest whole-database backup always stays.
#[tokio::test]
async fn prune_counts_each_coverage_on_its_own_and_keeps_the_whole_database() {
    let dbs = test_dbs("backup_prune_coverage").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); \
             CREATE TABLE c (id int PRIMARY KEY); INSERT INTO a VALUES (1); INSERT INTO b VALUES (2);",
        )
        .await
        .unwrap();
    let dir = store_dir("prune-coverage");
    let to = url_of(&dir);
    let backup = |extra: &[&str]| {
        let mut args = vec!["backup", "--source", &dbs.source_url, "--to", &to, "--json"];
        args.extend(extra);
        let out = run(&args);
        assert!(out.status.success());
        json(&out)["id"].as_str().unwrap().to_owned()
    };
    let whole = backup(&[]);
    let two_old = backup(&["--tables", "a,b"]);
    // The same set named in another order is the same coverage.
    let two_new = backup(&["--tables", "b,a"]);
    let one = backup(&["--tables", "c"]);
    let policy = [
        "--keep-last",
        "1",
        "--keep-daily",
        "0",
        "--keep-weekly",
        "0",
        "--keep-monthly",
        "0",
    ];
    let mut args = vec!["backups", "prune", "--from", &to, "--json"];
    args.extend(policy);
    let out = run(&args);
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["deleted"], serde_json::json!([two_old]), "{report}");
    for kept in [&whole, &two_new, &one] {
        assert!(
            report["kept"].get(kept.as_str()).is_some(),
            "{kept}: {report}"
        );
        assert!(dir.join(kept).join("manifest.json").exists(), "{kept}");
    }
    assert!(!dir.join(&two_old).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bite-sync` run in a directory whose `bite-sync.toml` is `config`.
fn with_config(config: &str) -> std::process::Command {
    let cmd = bite_sync();
    let cwd = cmd.get_current_dir().unwrap().to_path_buf();
    std::fs::write(cwd.join("bite-sync.toml"), config).unwrap();
    cmd
}

fn run_cmd(mut cmd: std::process::Command, args: &[&str]) -> Output {
    let out = cmd.args(args).output().expect("bite-sync runs");
    eprintln!(
        "bite-sync {}\n-- stdout:\n{}\n-- stderr:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Count of tables in the target's public schema: what a refused restore must not touch.
async fn table_count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_encrypted_backup_hides_its_rows_and_restores_only_with_its_identity() {
    use bite_sync::backup::crypt::Identity;
    let dbs = test_dbs("backup_encrypted").await;
    let source = sample_source(&dbs.source_url).await;
    let dir = store_dir("encrypted");
    let to = url_of(&dir);
    let identity = Identity::generate();
    let recipient = identity.recipient().to_string();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("key.txt");
    std::fs::write(&key_file, identity.file_text(chrono::Utc::now())).unwrap();

    // The machine that backs up knows only the public key.
    let out = run_cmd(
        with_config(&format!(
            "[backup]\nurl = \"{to}\"\nencrypt_to = \"{recipient}\"\n"
        )),
        &["backup", "--source", &dbs.source_url, "--json"],
    );
    assert!(out.status.success());
    let id = json(&out)["id"].as_str().unwrap().to_owned();
    let folder = backup_folder(&dir);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["encryption"], "age");
    assert_eq!(manifest["recipient"], recipient.as_str());
    let objects = manifest["objects"].as_array().unwrap();
    assert!(objects.len() >= 9, "{objects:?}");
    for object in objects {
        let name = object["name"].as_str().unwrap();
        assert!(name.ends_with(".sql.gz.age"), "{name}");
        let data = std::fs::read(folder.join(name)).unwrap();
        // The manifest's size and SHA-256 are of the stored, encrypted bytes.
        assert_eq!(object["size"], data.len() as u64);
        use sha2::Digest as _;
        assert_eq!(object["sha256"], hex::encode(sha2::Sha256::digest(&data)));
        assert!(data.starts_with(b"age-encryption.org/v1\n"), "{name}");
        assert_ne!(&data[..2], &[0x1f, 0x8b], "{name} is plain gzip");
        for plain in [&b"row 250"[..], b"CREATE TABLE", b"setval"] {
            assert!(
                !data.windows(plain.len()).any(|w| w == plain),
                "{name} shows {:?}",
                String::from_utf8_lossy(plain)
            );
        }
    }
    // Still listed (the manifest needs no key).
    let out = run(&["backups", "list", "--from", &to, "--json"]);
    assert_eq!(json(&out)[0]["state"], "good");

    // No identity: a clear refusal, and the target untouched.
    let mirror = connect(&dbs.mirror_url).await;
    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("encrypted")
            && stderr.contains("backup.identity_file")
            && stderr.contains("BITE_BACKUP_IDENTITY")
            && stderr.contains(&recipient),
        "{stderr}"
    );
    assert_eq!(table_count(&mirror).await, 0);

    // Another identity: refused, naming the recipient it needs; its secret never shown.
    let other = Identity::generate().file_text(chrono::Utc::now());
    let other_secret = other.lines().last().unwrap().to_owned();
    let mut cmd = bite_sync();
    cmd.env("BITE_BACKUP_IDENTITY", &other);
    let out = run_cmd(
        cmd,
        &[
            "restore",
            &id,
            "--from",
            &to,
            "--target",
            &dbs.mirror_url,
            "--clean",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("this backup was encrypted to {recipient}"))
            && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(!stderr.contains(&other_secret[16..]), "{stderr}");
    assert_eq!(table_count(&mirror).await, 0);

    // The identity from backup.identity_file: verify proves it restores.
    let out = run_cmd(
        with_config(&format!(
            "[backup]\nurl = \"{to}\"\nidentity_file = \"{}\"\n",
            key_file.display()
        )),
        &["backups", "verify", "--source", &dbs.source_url, "--json"],
    );
    assert!(out.status.success());
    let verified = json(&out);
    assert_eq!(verified["ok"], true);
    assert_eq!(verified["tables"].as_array().unwrap().len(), 6);

    // The identity from BITE_BACKUP_IDENTITY: restore brings every row back.
    let mut cmd = bite_sync();
    cmd.env(
        "BITE_BACKUP_IDENTITY",
        identity.file_text(chrono::Utc::now()),
    );
    let out = run_cmd(
        cmd,
        &["restore", &id, "--from", &to, "--target", &dbs.mirror_url],
    );
    assert!(out.status.success());
    assert_same_tables(&source, &mirror).await;

    // An altered byte in an encrypted object: corrupt (exit 4), as for a plain one.
    let victim = objects
        .iter()
        .map(|o| folder.join(o["name"].as_str().unwrap()))
        .find(|p| p.to_string_lossy().contains("public.orders."))
        .unwrap();
    let mut data = std::fs::read(&victim).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0x55;
    std::fs::write(&victim, &data).unwrap();
    let out = run_cmd(
        with_config(&format!(
            "[backup]\nurl = \"{to}\"\nidentity_file = \"{}\"\n",
            key_file.display()
        )),
        &["backups", "verify", "--source", &dbs.source_url],
    );
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("corrupt") && stderr.contains("public.orders"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's stock restore of an encrypted backup:
/// `for f in DIR/*.age; do age -d -i key.txt "$f"; done | gunzip -c | psql ...`. With the
/// `age` CLI when it is installed; otherwise each object is decrypted by the age crate into a
/// file first, which checks the same thing (standard age files, in glob order, whose
/// plaintexts concatenate into one gzip stream psql runs).
#[tokio::test]
async fn stock_age_gunzip_and_psql_restore_an_encrypted_backup() {
    use bite_sync::backup::crypt::{self, Identity};
    let dbs = test_dbs("backup_stock_age").await;
    let source = sample_source(&dbs.source_url).await;
    let dir = store_dir("stock-age");
    let identity = Identity::generate();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("key.txt");
    std::fs::write(&key_file, identity.file_text(chrono::Utc::now())).unwrap();
    let out = run_cmd(
        with_config(&format!(
            "[backup]\nencrypt_to = \"{}\"\n",
            identity.recipient()
        )),
        &["backup", "--source", &dbs.source_url, "--to", &url_of(&dir)],
    );
    assert!(out.status.success());
    let folder = backup_folder(&dir);
    let has_age = std::process::Command::new("age")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let decrypt = if has_age {
        format!("age -d -i '{}' \"$f\"", key_file.display())
    } else {
        eprintln!("no `age` on PATH: decrypting with the age crate instead of the CLI");
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "age") {
                let plain = crypt::decrypt(&std::fs::read(&path).unwrap(), &identity).unwrap();
                std::fs::write(path.with_extension("age.plain"), plain).unwrap();
            }
        }
        "cat \"$f.plain\"".to_owned()
    };
    into_psql(
        &format!(
            "for f in '{}'/*.age; do {decrypt}; done | gunzip -c",
            folder.display()
        ),
        &dbs.mirror_url,
    );
    let restored = connect(&dbs.mirror_url).await;
    assert_same_tables(&source, &restored).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn keygen_writes_a_private_identity_and_prints_its_public_key() {
    use std::os::unix::fs::PermissionsExt as _;
    let keys = tempfile::tempdir().unwrap();
    let path = keys.path().join("key.txt");
    let out = run(&["backups", "keygen", "--out", path.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty(), "the secret went to the file only");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let identity = bite_sync::backup::crypt::Identity::parse(&text, "key.txt").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("Public key: {}", identity.recipient())),
        "{stderr}"
    );
    // Never overwrites a key: it may be the only way into old backups.
    let out = run(&["backups", "keygen", "--out", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // Without --out: the identity on stdout, readable by `age -d -i`.
    let out = run(&["backups", "keygen"]);
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    bite_sync::backup::crypt::Identity::parse(&printed, "stdout").unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("AGE-SECRET-KEY"));
}

#[tokio::test]
async fn some_tables_restore_out_of_a_whole_database_backup() {
    let dbs = test_dbs("backup_restore_tables").await;
    let source = sample_source(&dbs.source_url).await;
    let dir = store_dir("restore-tables");
    let to = url_of(&dir);
    assert!(
        run(&["backup", "--source", &dbs.source_url, "--to", &to])
            .status
            .success()
    );

    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
        "--tables",
        "customers,orders",
    ]);
    assert!(out.status.success());
    let restored = connect(&dbs.mirror_url).await;
    for table in ["public.customers", "public.orders"] {
        assert_eq!(
            digest(&source, table).await,
            digest(&restored, table).await,
            "{table}"
        );
    }
    let row = restored
        .query_one(
            "SELECT to_regclass('public.menu_items') IS NULL, \
                    (SELECT count(*) FROM pg_constraint WHERE conname = 'orders_customer_id_fkey'), \
                    (SELECT last_value FROM orders_id_seq)",
            &[],
        )
        .await
        .unwrap();
    let source_seq: i64 = source
        .query_one("SELECT last_value FROM orders_id_seq", &[])
        .await
        .unwrap()
        .get(0);
    assert!(row.get::<_, bool>(0), "only the tables asked for");
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(row.get::<_, i64>(2), source_seq);

    // Another table into the same database: the ones already there are not in the way.
    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
        "--tables",
        "order_items,menu_items",
    ]);
    assert!(out.status.success());
    for table in ["public.order_items", "public.menu_items"] {
        assert_eq!(
            digest(&source, table).await,
            digest(&restored, table).await,
            "{table}"
        );
    }
    // A table that is there again is refused, and replaced with --clean.
    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
        "--tables",
        "menu_items",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("public.menu_items"));
    let out = run(&[
        "restore",
        "latest",
        "--from",
        &to,
        "--target",
        &dbs.mirror_url,
        "--tables",
        "nope",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_mid_upload_to_s3_is_never_listed_as_good() {
    let dbs = test_dbs("backup_s3_killed").await;
    let source = connect(&dbs.source_url).await;
    // Big enough for multipart uploads (8 MiB parts) of several chunks.
    source
        .batch_execute(
            "CREATE TABLE big (id bigint PRIMARY KEY, payload text); \
             INSERT INTO big SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) \
             FROM generate_series(1, 800000) g;",
        )
        .await
        .unwrap();
    let server = support::S3Server::start().await;
    let config = format!(
        "[backup]\nurl = \"{}\"\nendpoint = \"{}\"\npath_style = true\naccess_key = \"{}\"\nsecret_key = \"{}\"\n",
        server.url("killed"),
        server.endpoint(),
        support::S3Server::ACCESS_KEY,
        support::S3Server::SECRET_KEY
    );
    let mut cmd = bite_sync();
    let cwd = cmd.get_current_dir().unwrap().to_path_buf();
    std::fs::write(cwd.join("bite-sync.toml"), &config).unwrap();
    let mut child = cmd
        .args(["backup", "--source", &dbs.source_url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it while a multipart upload is open.
    support::wait_for(
        "a multipart upload to start",
        Duration::from_secs(60),
        || {
            let pending = server.pending_uploads();
            async move { (pending > 0).then_some(()) }
        },
    )
    .await;
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();

    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = bite_sync();
        let cwd = cmd.get_current_dir().unwrap().to_path_buf();
        std::fs::write(cwd.join("bite-sync.toml"), &config).unwrap();
        cmd.args(["backups", "list", "--json"]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = json(&out);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "incomplete"),
        "{list}"
    );
}
