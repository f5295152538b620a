//! What a careless operator sees (issue 13): the real binary given the mistakes people make,
//! and what it says. Each message names what to fix and where it came from, and never prints a
//! secret.

mod support;

use std::process::{Command, Output};

use support::{FakeHttp, bite_sync, connect, test_dbs};

/// A URL nothing listens on.
const CLOSED: &str = "postgres://bite@127.0.0.1:1/bite?sslmode=disable";

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("bite-sync runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// `bite-sync` in a fresh directory holding `bite-sync.toml` with `config`.
fn with_config(config: &str) -> Command {
    let cmd = bite_sync();
    let dir = cmd.get_current_dir().expect("a working dir").to_path_buf();
    std::fs::write(dir.join("bite-sync.toml"), config).unwrap();
    cmd
}

#[test]
fn a_broken_config_file_is_described_by_line_and_key_never_quoted() {
    let secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY";
    for (config, expected) in [
        // A syntax error (an unterminated string): toml would print the line.
        (
            format!("[backup]\nsecret_key = \"{secret}\nregion = \"auto\"\n"),
            "bite-sync.toml: line 2, column 45: not valid TOML",
        ),
        // A wrong type: serde would print the value.
        (
            format!("[backup]\nsecret_key = [\"{secret}\"]\n"),
            "bite-sync.toml: line 2: backup.secret_key: expected a string, got a list",
        ),
        // An unknown key holding a password.
        (
            format!("[mirror]\nurl = \"postgres://app@db/bite\"\npassword = \"{secret}\"\n"),
            "bite-sync.toml: line 3: mirror.password: unknown key",
        ),
    ] {
        let out = run(with_config(&config).args(["sync", "--dry-run"]));
        assert_exit(&out, 2);
        let err = stderr(&out);
        assert!(!err.contains(&secret[..12]), "the secret leaked:\n{err}");
        assert!(err.contains(expected), "{expected:?} missing from:\n{err}");
    }
}

#[test]
fn every_problem_in_the_config_file_is_reported_at_once() {
    let config = "[source]\nurl = \"postgres://app@db/bite\"\n\n[sync]\njobs = \"four\"\ntabels = [\"orders\"]\nlock_timeout = \"soon\"\n\n[replication]\nbatch_rows = 0\n";
    let out = run(with_config(config).args(["sync", "--dry-run"]));
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.starts_with("error: invalid configuration (4 problems):"),
        "{err}"
    );
    for problem in [
        "bite-sync.toml: line 5: sync.jobs: expected an integer, got a string",
        "bite-sync.toml: line 6: sync.tabels: unknown key; did you mean tables?",
        "bite-sync.toml: line 7: sync.lock_timeout: expected a duration",
        "bite-sync.toml: line 10: replication.batch_rows: must be between 1 and 1000000, got 0",
    ] {
        assert!(err.contains(problem), "{problem:?} missing from:\n{err}");
    }
}

#[test]
fn an_empty_table_list_is_a_usage_error_for_every_command_that_takes_one() {
    let db = ["--source", CLOSED, "--mirror", CLOSED];
    let store = bite_sync().get_current_dir().unwrap().join("store");
    let store = format!("file://{}", store.display());
    for list in ["", ",", "customers,,orders", "customers,"] {
        for args in [
            vec!["sync"],
            vec!["sync", "--init"],
            vec!["run", "--init"],
            vec!["check"],
            vec!["backup", "--to", &store],
            vec!["restore", "latest", "--from", &store, "--target", CLOSED],
        ] {
            let mut cmd = bite_sync();
            cmd.args(&args).args(["--tables", list]);
            if args[0] != "backup" && args[0] != "restore" {
                cmd.args(db);
            } else if args[0] == "backup" {
                cmd.args(["--source", CLOSED]);
            }
            let out = run(&mut cmd);
            assert_exit(&out, 2);
            let err = stderr(&out);
            assert!(
                err.contains("--tables: the list is empty")
                    || err.contains("--tables: item ")
                        && err.contains("is empty: remove the extra comma"),
                "{args:?} --tables {list:?}: {err}"
            );
        }
    }
    // From the environment, the variable is named.
    let out = run(bite_sync().args(["sync"]).args(db).env("BITE_TABLES", ","));
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("BITE_TABLES: item 1"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_port_that_answers_http_is_not_a_postgresql_server() {
    let web = FakeHttp::start().await;
    let port = web.url.rsplit(':').next().unwrap().to_string();
    for mode in ["disable", "prefer", "require"] {
        let url = format!("postgres://bite@127.0.0.1:{port}/bite?sslmode={mode}");
        let out = tokio::task::spawn_blocking(move || {
            run(bite_sync().args(["sync", "--source", &url, "--mirror", &url]))
        })
        .await
        .unwrap();
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "at 127.0.0.1:{port} (database \"bite\", user \"bite\"): not a PostgreSQL server: something answering HTTP"
            )),
            "sslmode={mode}: {err}"
        );
        assert!(!err.contains("does not support TLS"), "{err}");
    }
}

#[test]
fn an_unknown_url_setting_is_named_with_the_close_one() {
    let out = run(bite_sync().args([
        "sync",
        "--source",
        "postgres://app:Sup3rS3cr3t@db.example.com/bite?sslmod=require",
        "--mirror",
        CLOSED,
    ]));
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains(
            "--source: the source URL has an unknown setting \"sslmod\"; did you mean sslmode?"
        ),
        "{err}"
    );
    assert!(!err.contains("Sup3rS3cr3t"), "{err}");
    // From the environment: the variable is named instead.
    let out = run(bite_sync()
        .args(["sync", "--mirror", CLOSED])
        .env("BITE_SOURCE_URL", "postgres://db/bite?sslmod=require"));
    assert!(
        stderr(&out).contains("BITE_SOURCE_URL: the source URL has an unknown setting"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_bad_port_variable_is_named_as_port() {
    let out = run(bite_sync().arg("relay").env("PORT", "abc"));
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains("PORT: expected a port number, got \"abc\""),
        "{err}"
    );
    assert!(!err.contains("--port"), "{err}");
}

#[test]
fn commands_that_need_no_configuration_ignore_a_broken_config_file() {
    let broken = "[backup\nsecret_key = \"x\"\n";
    let out = run(with_config(broken).args(["backups", "keygen"]));
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("AGE-SECRET-KEY-1"),
        "{}",
        stdout(&out)
    );
    // The demo gets as far as looking for PostgreSQL's binaries.
    let out = run(with_config(broken)
        .args(["demo", "--no-wait"])
        .env("PG_BIN_DIR", "/nonexistent/postgresql/bin"));
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("PG_BIN_DIR"), "{}", stderr(&out));
    // Commands that read it still say what is wrong.
    let out = run(with_config(broken).args(["sync", "--dry-run"]));
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("bite-sync.toml: line 1, column 8: not valid TOML"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_folder_store_that_cannot_be_made_names_the_folder() {
    let out = run(bite_sync().args(["backups", "list", "--from", "file:///proc/nope"]));
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("file:///proc/nope: cannot create the folder /proc/nope: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn replicated_tables_are_refused_in_a_sentence() {
    let one = bite_sync::sync::SyncError::Replicated {
        tables: vec!["menu_items".into()],
        slot: "bite_sync".into(),
    };
    assert!(
        one.to_string().starts_with(
            "menu_items is replicated continuously by `bite-sync run` (slot bite_sync)"
        ),
        "{one}"
    );
    let two = bite_sync::sync::SyncError::Replicated {
        tables: vec!["customers".into(), "orders".into()],
        slot: "bite_sync".into(),
    };
    assert!(
        two.to_string()
            .starts_with("customers, orders are replicated"),
        "{two}"
    );
}

/// One finished backup of a one-table database in a folder store; returns the store's URL.
async fn one_backup(name: &str) -> String {
    let dbs = test_dbs(name).await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
        .await
        .unwrap();
    let dir = bite_sync().get_current_dir().unwrap().join("store");
    let store = format!("file://{}", dir.display());
    let (url, to) = (dbs.source_url.clone(), store.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(bite_sync().args(["backup", "--source", &url, "--to", &to, "--tables", "t"]))
    })
    .await
    .unwrap();
    assert_exit(&out, 0);
    store
}

#[tokio::test]
async fn a_restore_target_is_called_the_restore_target_and_one_backup_is_singular() {
    let store = one_backup("messages_restore").await;
    let from = store.clone();
    let out = tokio::task::spawn_blocking(move || {
        run(bite_sync().args(["restore", "latest", "--from", &from, "--target", CLOSED]))
    })
    .await
    .unwrap();
    let err = stderr(&out);
    assert!(
        err.contains("could not connect to the restore target at 127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("mirror"), "{err}");

    let out = tokio::task::spawn_blocking(move || {
        run(bite_sync().args(["backups", "prune", "--dry-run", "--from", &store]))
    })
    .await
    .unwrap();
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("1 backup kept, 0 would delete"),
        "{}",
        stdout(&out)
    );
}

/// A child on a pseudo-terminal (what a person at a terminal gives it: progress bars are
/// drawn), with everything it writes collected.
struct OnTerminal {
    child: std::process::Child,
    output: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl OnTerminal {
    fn spawn(mut cmd: Command) -> OnTerminal {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two new descriptors, which are then owned by the Files below.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned by nothing else.
        let (master, slave) = unsafe {
            (
                std::fs::File::from_raw_fd(master),
                std::fs::File::from_raw_fd(slave),
            )
        };
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        let child = cmd.spawn().expect("bite-sync starts");
        drop(cmd);
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&output);
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut master = master;
            let mut buf = [0u8; 4096];
            // Reading fails (EIO) once the child and every copy of the terminal are gone.
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        OnTerminal {
            child,
            output,
            reader: Some(reader),
        }
    }

    /// What was written so far, without terminal control sequences.
    fn text(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.output.lock().unwrap()))
    }
}

/// Text without ANSI escape sequences (colours, cursor moves, line clears).
fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn ctrl_c_in_a_sync_on_a_terminal_says_it_was_interrupted_and_what_the_mirror_holds() {
    let dbs = test_dbs("messages_ctrl_c_tty").await;
    let source = connect(&dbs.source_url).await;
    source
        .batch_execute(
            "CREATE TABLE events (id bigint PRIMARY KEY, body text NOT NULL); \
             INSERT INTO events SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 400000) g",
        )
        .await
        .unwrap();
    let sync = |extra: &[&str]| {
        let mut cmd = bite_sync();
        cmd.args([
            "sync",
            "--source",
            &dbs.source_url,
            "--mirror",
            &dbs.mirror_url,
        ])
        .args(extra);
        cmd
    };
    assert_exit(&run(&mut sync(&["--init"])), 0);
    source
        .batch_execute("UPDATE events SET body = 'new' WHERE id % 2 = 0")
        .await
        .unwrap();
    let mirror = connect(&dbs.mirror_url).await;
    let before: i64 = mirror
        .query_one("SELECT count(*) FROM events WHERE body = 'new'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, 0);

    let mut terminal = OnTerminal::spawn(sync(&[]));
    support::wait_for(
        "the progress bar of the copy on the terminal",
        std::time::Duration::from_secs(60),
        || async { terminal.text().contains("events").then_some(()) },
    )
    .await;
    // What Ctrl-C sends.
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(terminal.child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let status = tokio::task::spawn_blocking({
        let mut child =
            std::mem::replace(&mut terminal.child, Command::new("true").spawn().unwrap());
        move || child.wait().unwrap()
    })
    .await
    .unwrap();
    if let Some(reader) = terminal.reader.take() {
        let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    }
    let text = terminal.text();
    assert_eq!(status.code(), Some(130), "{text}");
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert_eq!(
        last,
        "error: interrupted before the new tables were swapped in: the mirror still holds its previous rows (the next sync removes what this one staged)",
        "the last thing on the terminal:\n{text}"
    );
    let after: i64 = mirror
        .query_one("SELECT count(*) FROM events WHERE body = 'new'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, 0, "the mirror's rows changed");
}

#[test]
fn the_relays_own_settings_are_reported_with_the_rest_of_the_file() {
    let config = "[sync]\njobs = \"four\"\n\n[relay]\nport = 99999\n";
    let out = run(with_config(config).arg("relay"));
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains("bite-sync.toml: line 2: sync.jobs: expected an integer, got a string"),
        "{err}"
    );
    assert!(
        err.contains("bite-sync.toml: relay.port: expected 0 to 65535, got 99999"),
        "{err}"
    );
}
