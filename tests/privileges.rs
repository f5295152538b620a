//! `bite-sync check` tests the privileges each command needs and prints the exact statements
//! that grant them (issue 13): with users that lack them, `check` names each missing one and
//! `sync` fails naming the same fix; run as a superuser, the printed statements are enough for
//! `check` to say ready and for `sync` and `run` to work as those users.

mod support;

use std::process::Output;
use std::time::Duration;

use support::{bite_sync, connect, test_dbs, wait_for};

/// `url` (a superuser's, from the test support) for `user` instead.
fn as_user(url: &str, user: &str) -> String {
    url.replacen("postgres://postgres@", &format!("postgres://{user}@"), 1)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every `GRANT ...;` and `ALTER ...;` in `line`.
fn statements(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(start) = ["GRANT ", "ALTER "]
        .iter()
        .filter_map(|k| rest.find(k))
        .min()
    {
        let tail = &rest[start..];
        let end = tail.find(';').expect("statements end with ;");
        out.push(tail[..=end].to_string());
        rest = &tail[end + 1..];
    }
    out
}

#[tokio::test]
async fn check_names_each_missing_privilege_with_the_statement_that_grants_it() {
    let dbs = test_dbs("privileges").await;
    let (reader, writer) = (format!("{}_src", dbs.name), format!("{}_mir", dbs.name));
    let source_admin = connect(&dbs.source_url).await;
    source_admin
        .batch_execute(&format!(
            "CREATE TABLE orders (id serial PRIMARY KEY, total numeric NOT NULL); \
             INSERT INTO orders (total) SELECT g FROM generate_series(1, 50) g; \
             CREATE ROLE \"{reader}\" LOGIN REPLICATION;"
        ))
        .await
        .unwrap();
    // The mirror as a superuser made it; then a read-only user for it.
    let first = bite_sync()
        .args([
            "sync",
            "--init",
            "--source",
            &dbs.source_url,
            "--mirror",
            &dbs.mirror_url,
        ])
        .output()
        .unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let mirror_admin = connect(&dbs.mirror_url).await;
    mirror_admin
        .batch_execute(&format!(
            "CREATE ROLE \"{writer}\" LOGIN; GRANT SELECT ON orders TO \"{writer}\";"
        ))
        .await
        .unwrap();
    let (source, mirror) = (
        as_user(&dbs.source_url, &reader),
        as_user(&dbs.mirror_url, &writer),
    );
    let check = || {
        bite_sync()
            .args([
                "check", "--source", &source, "--mirror", &mirror, "--tables", "orders",
            ])
            .output()
            .unwrap()
    };

    let out = check();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let db = &dbs.name;
    for (what, fix) in [
        (
            "source  read privilege",
            format!(
                "GRANT SELECT ON TABLE \"public\".\"orders\" TO \"{reader}\"; GRANT SELECT ON SEQUENCE \"public\".\"orders_id_seq\" TO \"{reader}\";"
            ),
        ),
        (
            "source  publication",
            format!(
                "ALTER TABLE \"public\".\"orders\" OWNER TO \"{reader}\"; GRANT CREATE ON DATABASE \"{db}\" TO \"{reader}\";"
            ),
        ),
        (
            "mirror  CREATE privilege",
            format!("GRANT CREATE ON DATABASE \"{db}\" TO \"{writer}\";"),
        ),
        (
            "mirror  owns bite_sync",
            format!("ALTER SCHEMA \"bite_sync\" OWNER TO \"{writer}\"; ALTER TABLE \"bite_sync\"."),
        ),
        (
            "mirror  target schemas",
            format!("GRANT USAGE, CREATE ON SCHEMA \"public\" TO \"{writer}\";"),
        ),
        (
            "mirror  owns the tables",
            format!("ALTER TABLE \"public\".\"orders\" OWNER TO \"{writer}\";"),
        ),
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&format!("FIX  {what}")) && l.contains(&fix)),
            "FIX {what} with {fix:?} missing from:\n{report}"
        );
    }
    assert!(!report.contains("ready for"), "{report}");

    // `sync` fails as these users, and says the same.
    let out = bite_sync()
        .args([
            "sync", "--source", &source, "--mirror", &mirror, "--tables", "orders",
        ])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("permission denied"), "{said}");
    assert!(
        said.contains(&format!(
            "hint: run as a superuser or the owner on the mirror (database \"{db}\"): ALTER SCHEMA \"bite_sync\" OWNER TO \"{writer}\";"
        )),
        "{said}"
    );

    // `run` as the source's reader (the mirror's superuser): creating the publication is
    // refused, and the error says what to grant on the source.
    let out = bite_sync()
        .args([
            "run",
            "--init",
            "--source",
            &source,
            "--mirror",
            &dbs.mirror_url,
            "--tables",
            "orders",
            "--slot",
            &dbs.name,
            "--publication",
            &dbs.name,
        ])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "hint: run as a superuser or the owner on the source (database \"{db}\"): GRANT CREATE ON DATABASE \"{db}\" TO \"{reader}\";"
        )),
        "{said}"
    );

    // Every statement check printed, run where it says, is all it takes.
    for line in report.lines().filter(|l| l.starts_with("FIX")) {
        let admin = if line.starts_with("FIX  source") {
            &source_admin
        } else {
            &mirror_admin
        };
        for statement in statements(line) {
            admin
                .batch_execute(&statement)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
    }
    let out = check();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(report.contains("ready for `bite-sync run`"), "{report}");

    let out = bite_sync()
        .args([
            "sync", "--source", &source, "--mirror", &mirror, "--tables", "orders",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // And `run` replicates as them.
    let mut daemon = bite_sync()
        .args([
            "run",
            "--source",
            &source,
            "--mirror",
            &mirror,
            "--tables",
            "orders",
            "--slot",
            &dbs.name,
            "--publication",
            &dbs.name,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    source_admin
        .batch_execute("INSERT INTO orders (total) VALUES (1000)")
        .await
        .unwrap();
    let mirror_reader = connect(&dbs.mirror_url).await;
    let replicated = tokio::time::timeout(
        Duration::from_secs(60),
        wait_for(
            "the new order on the mirror",
            Duration::from_secs(60),
            || async {
                let n: i64 = mirror_reader
                    .query_one("SELECT count(*) FROM orders WHERE total = 1000", &[])
                    .await
                    .unwrap()
                    .get(0);
                (n == 1).then_some(())
            },
        ),
    )
    .await;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
    let out = daemon.wait_with_output_mut();
    assert!(replicated.is_ok(), "{out}");
}

trait WaitWithOutput {
    fn wait_with_output_mut(&mut self) -> String;
}

impl WaitWithOutput for std::process::Child {
    fn wait_with_output_mut(&mut self) -> String {
        let _ = self.wait();
        let mut err = String::new();
        if let Some(mut stderr) = self.stderr.take() {
            use std::io::Read;
            let _ = stderr.read_to_string(&mut err);
        }
        err
    }
}
