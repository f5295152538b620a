//! The replication connection (`bite_sync::repl::conn`) against real PostgreSQL 15 clusters:
//! connecting (trust, passwords, TLS, unix socket), slots with exported snapshots, streaming,
//! status updates, cancel safety and the errors a retry loop must tell apart.
//!
//! Trust tests use the shared logical source cluster (`support::test_dbs`). Password and TLS
//! tests share one more cluster of this binary's own ([`auth_cluster`]): started with trust,
//! then given a pg_hba.conf that demands passwords, a test CA's certificate and `ssl=on`, all
//! inside its own directory so its watchdog removes them with it. Every test uses its own
//! database and slot names and drops its slots.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use bite_sync::pg::cluster::{ClusterOptions, TempCluster};
use bite_sync::pg::connect::{ConnectError, ConnectFailure, DbUrl, Role};
use bite_sync::proxy::Proxy;
use bite_sync::repl::Lsn;
use bite_sync::repl::conn::{ReplError, ReplicationClient, ReplicationMessage, ReplicationStream};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use support::{connect, test_dbs, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

fn source_url(url: &str) -> DbUrl {
    DbUrl::parse(Role::Source, url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

async fn repl(url: &str) -> ReplicationClient {
    ReplicationClient::connect(&source_url(url))
        .await
        .unwrap_or_else(|e| panic!("replication connection to {url}: {}", chain(&e)))
}

/// The error chain as `main` prints it.
fn chain(error: &dyn std::error::Error) -> String {
    bite_sync::error_chain(error)
}

/// A pgoutput stream of publication `publication` from the slot's start.
async fn stream(url: &str, slot: &str, start: Lsn, publication: &str) -> ReplicationStream {
    repl(url)
        .await
        .start_replication(
            slot,
            start,
            &[("proto_version", "2"), ("publication_names", publication)],
        )
        .await
        .unwrap_or_else(|e| panic!("START_REPLICATION {slot}: {}", chain(&e)))
}

async fn slot_state(client: &tokio_postgres::Client, slot: &str) -> Option<(bool, Option<Lsn>)> {
    let row = client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()?;
    let lsn: Option<String> = row.get(1);
    Some((row.get(0), lsn.map(|text| text.parse().unwrap())))
}

/// Reads until `done` says so, answering keepalives that ask for a reply; panics after 30 s.
async fn read_until(
    stream: &mut ReplicationStream,
    mut done: impl FnMut(&ReplicationMessage) -> bool,
) -> Vec<ReplicationMessage> {
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            let message = stream
                .next()
                .await
                .unwrap_or_else(|e| panic!("{}", chain(&e)))
                .expect("the server ended the stream early");
            let stop = done(&message);
            seen.push(message);
            if stop {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out; saw {} messages", seen.len()));
    seen
}

fn kinds(messages: &[ReplicationMessage]) -> String {
    messages
        .iter()
        .filter_map(|m| match m {
            ReplicationMessage::XLogData { data, .. } => data.first().map(|b| char::from(*b)),
            ReplicationMessage::Keepalive { .. } => None,
        })
        .collect()
}

#[tokio::test]
async fn identify_system_matches_the_control_file() {
    let dbs = test_dbs("identify_system").await;
    let mut client = repl(&dbs.source_url).await;
    assert!(
        client.server_version_num() >= 150_000,
        "{}",
        client.server_version_num()
    );
    let info = client.identify_system().await.unwrap();

    let sql = connect(&dbs.source_url).await;
    let row = sql
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
             pg_current_wal_lsn()::text, (SELECT timeline_id FROM pg_control_checkpoint())",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(info.systemid, row.get::<_, String>(0));
    assert_eq!(info.timeline, row.get::<_, i32>(2) as u32);
    let now: Lsn = row.get::<_, String>(1).parse().unwrap();
    assert!(info.xlogpos > Lsn::ZERO && info.xlogpos <= now, "{info:?}");
    assert_eq!(info.dbname.as_deref(), Some(dbs.name.as_str()));

    let rows = client
        .simple_query("SELECT 1, NULL::text, 'ü'")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![vec![Some("1".to_owned()), None, Some("ü".to_owned())]]
    );
    let error = client.simple_query("SELECT * FROM nope").await.unwrap_err();
    assert_eq!(error.code(), Some("42P01"), "{}", chain(&error));
    assert!(!error.is_transient());
    // The connection is still in step after an error.
    assert_eq!(
        client.identify_system().await.unwrap().systemid,
        info.systemid
    );

    // A command abandoned midway leaves the answer unread: later commands refuse to run
    // rather than read it as theirs.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        client.simple_query("SELECT pg_sleep(2)"),
    )
    .await;
    assert!(abandoned.is_err(), "pg_sleep(2) cannot finish in 50 ms");
    let error = client.identify_system().await.unwrap_err();
    assert!(
        matches!(error, ReplError::Interrupted { .. }),
        "{}",
        chain(&error)
    );
    assert!(chain(&error).contains("open a new connection"));
}

#[tokio::test]
async fn unix_socket_connections_work() {
    let dbs = test_dbs("unix_socket").await;
    let cluster = &support::clusters().source;
    let dir = cluster.data_dir().parent().unwrap().display().to_string();
    let url = format!(
        "host='{dir}' port={} user=postgres dbname={} sslmode=require",
        cluster.port(),
        dbs.name
    );
    let mut client = repl(&url).await;
    let info = client.identify_system().await.unwrap();
    assert_eq!(info.dbname.as_deref(), Some(dbs.name.as_str()));
}

#[tokio::test]
async fn a_slot_exports_its_snapshot_then_streams_what_follows() {
    let dbs = test_dbs("slot_snapshot_stream").await;
    let slot = dbs.name.as_str();
    let sql = connect(&dbs.source_url).await;
    sql.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, item text);
         INSERT INTO orders SELECT i, 'before ' || i FROM generate_series(1, 3) i;
         CREATE PUBLICATION pub FOR TABLE orders;",
    )
    .await
    .unwrap();

    let mut client = repl(&dbs.source_url).await;
    let created = client.create_slot(slot, false).await.unwrap();
    assert_eq!(created.slot_name, slot);
    let snapshot = created.snapshot_name.clone().expect("an exported snapshot");
    sql.batch_execute(
        "INSERT INTO orders VALUES (4, 'after 4');
         INSERT INTO orders VALUES (5, 'after 5');",
    )
    .await
    .unwrap();

    // The snapshot is valid until the next command on `client`: import it first.
    let importer = connect(&dbs.source_url).await;
    importer
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .unwrap();
    let ids: Vec<i32> = importer
        .query("SELECT id FROM orders ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        ids,
        [1, 2, 3],
        "the snapshot sees exactly the rows before the slot"
    );
    importer.batch_execute("COMMIT").await.unwrap();
    drop(client);

    let mut stream = stream(&dbs.source_url, slot, created.consistent_point, "pub").await;
    let mut inserts = 0;
    let messages = read_until(&mut stream, |m| {
        if let ReplicationMessage::XLogData { data, .. } = m {
            inserts += usize::from(data.first() == Some(&b'I'));
            return inserts == 2 && data.first() == Some(&b'C');
        }
        false
    })
    .await;
    let kinds = kinds(&messages);
    assert!(kinds.starts_with("BRI"), "{kinds}");
    assert_eq!(kinds.matches('I').count(), 2, "{kinds}");
    assert!(kinds.ends_with('C'), "{kinds}");

    // Ask for a keepalive and confirm the position it reports.
    stream
        .send_status(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, true)
        .await
        .unwrap();
    let keepalive = read_until(&mut stream, |m| {
        matches!(m, ReplicationMessage::Keepalive { .. })
    })
    .await;
    let Some(ReplicationMessage::Keepalive { wal_end, .. }) = keepalive.last().cloned() else {
        unreachable!()
    };
    assert!(wal_end > created.consistent_point);
    stream
        .send_status(wal_end, wal_end, wal_end, false)
        .await
        .unwrap();
    wait_for("confirmed_flush_lsn to follow the status update", WAIT, || {
        let sql = &sql;
        async move {
            (slot_state(sql, slot).await == Some((true, Some(wal_end)))).then_some(())
        }
    })
    .await;

    stream.finish().await.unwrap();
    wait_for("the slot to become inactive", WAIT, || {
        let sql = &sql;
        async move { matches!(slot_state(sql, slot).await, Some((false, _))).then_some(()) }
    })
    .await;
    repl(&dbs.source_url).await.drop_slot(slot).await.unwrap();
    assert_eq!(slot_state(&sql, slot).await, None, "the slot is gone");
}

/// The first column of a pgoutput Insert (`I`, relation id, `N`, column count, then `t`,
/// length, text per column) as a number, and the second column's length.
fn insert_row(data: &[u8]) -> (u32, usize) {
    let mut at = 1 + 4 + 1 + 2;
    let mut column = || {
        assert_eq!(data[at], b't', "a text column");
        let len = u32::from_be_bytes(data[at + 1..at + 5].try_into().unwrap()) as usize;
        let text = &data[at + 5..at + 5 + len];
        at += 5 + len;
        text.to_vec()
    };
    let id = String::from_utf8(column()).unwrap().parse().unwrap();
    (id, column().len())
}

#[tokio::test]
async fn next_is_cancel_safe_in_select_against_a_timer() {
    const ROWS: u32 = 400;
    let dbs = test_dbs("cancel_safe").await;
    let slot = dbs.name.as_str();
    let sql = connect(&dbs.source_url).await;
    sql.batch_execute(
        "CREATE TABLE notes (id int PRIMARY KEY, body text);
         ALTER TABLE notes ALTER body SET STORAGE EXTERNAL;
         CREATE PUBLICATION pub FOR TABLE notes;",
    )
    .await
    .unwrap();
    let created = repl(&dbs.source_url)
        .await
        .create_slot(slot, false)
        .await
        .unwrap();
    let mut stream = stream(&dbs.source_url, slot, created.consistent_point, "pub").await;

    // Rows up to 120 KB, so messages span many reads, in transactions of 20.
    let url = dbs.source_url.clone();
    let workload = tokio::spawn(async move {
        let sql = connect(&url).await;
        for first in (1..=ROWS).step_by(20) {
            sql.execute(
                "INSERT INTO notes SELECT i, repeat(md5(i::text), (i * 37) % 3750) \
                 FROM generate_series($1::int, $1::int + 19) i",
                &[&(first as i32)],
            )
            .await
            .unwrap();
        }
    });

    let mut ids = Vec::new();
    let mut cancelled = 0u32;
    let mut commits = 0;
    tokio::time::timeout(Duration::from_secs(120), async {
        while ids.len() < ROWS as usize {
            tokio::select! {
                message = stream.next() => match message.unwrap().expect("stream open") {
                    ReplicationMessage::XLogData { data, .. } => match data.first() {
                        Some(b'I') => {
                            let (id, len) = insert_row(&data);
                            assert_eq!(len, (id as usize * 37) % 3750 * 32, "row {id} intact");
                            ids.push(id);
                        }
                        Some(b'C') => commits += 1,
                        _ => {}
                    },
                    ReplicationMessage::Keepalive { wal_end, reply_requested: true, .. } => {
                        stream.send_status(wal_end, wal_end, wal_end, false).await.unwrap();
                    }
                    ReplicationMessage::Keepalive { .. } => {}
                },
                () = tokio::time::sleep(Duration::from_millis(1)) => cancelled += 1,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out with {} of {ROWS} rows", ids.len()));
    workload.await.unwrap();

    let expected: Vec<u32> = (1..=ROWS).collect();
    assert_eq!(ids, expected, "every row once, in order");
    assert!(commits >= 1);
    assert!(cancelled > 0, "the timer never won, so nothing was tested");

    stream.finish().await.unwrap();
    repl(&dbs.source_url).await.drop_slot(slot).await.unwrap();
}

#[tokio::test]
async fn missing_slots_and_terminated_walsenders_are_told_apart() {
    let dbs = test_dbs("repl_errors").await;
    let missing = format!("{}_missing", &dbs.name[..dbs.name.len().min(50)]);
    let error = repl(&dbs.source_url)
        .await
        .start_replication(&missing, Lsn::ZERO, &[("proto_version", "2")])
        .await
        .expect_err("no such slot");
    assert_eq!(error.code(), Some("42704"), "{}", chain(&error));
    assert!(!error.is_transient());
    let text = chain(&error);
    assert!(
        text.contains(&missing) && text.contains("does not exist"),
        "{text}"
    );

    let error = repl(&dbs.source_url)
        .await
        .drop_slot(&missing)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("42704"), "{}", chain(&error));

    // A slot created twice.
    let slot = dbs.name.as_str();
    let mut client = repl(&dbs.source_url).await;
    let created = client.create_slot(slot, false).await.unwrap();
    let error = client.create_slot(slot, false).await.unwrap_err();
    assert_eq!(error.code(), Some("42710"), "{}", chain(&error));
    assert!(!error.is_transient());

    // A missing plugin option is definite (pgoutput refuses to start without publications).
    let sql = connect(&dbs.source_url).await;
    sql.batch_execute("CREATE PUBLICATION pub_none")
        .await
        .unwrap();
    let error = repl(&dbs.source_url)
        .await
        .start_replication(slot, created.consistent_point, &[("proto_version", "2")])
        .await
        .expect_err("publication_names is required");
    assert!(!error.is_transient(), "{}", chain(&error));
    assert_eq!(error.code(), Some("22023"), "{}", chain(&error));
    assert!(
        chain(&error).contains("publication_names"),
        "{}",
        chain(&error)
    );

    // A walsender terminated by an administrator is worth reconnecting to.
    let mut stream = stream(&dbs.source_url, slot, created.consistent_point, "pub_none").await;
    wait_for("the slot to be active", WAIT, || {
        let sql = &sql;
        async move { matches!(slot_state(sql, slot).await, Some((true, _))).then_some(()) }
    })
    .await;
    let active = repl(&dbs.source_url)
        .await
        .start_replication(slot, created.consistent_point, &[("proto_version", "2")])
        .await
        .expect_err("the slot is in use");
    assert_eq!(active.code(), Some("55006"), "{}", chain(&active));
    assert!(active.is_transient());

    sql.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap();
    let error = tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await {
                Err(error) => return error,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
            }
        }
    })
    .await
    .unwrap();
    assert!(error.is_transient(), "{}", chain(&error));
    assert!(
        matches!(error.code(), Some("57P01")) || matches!(error, ReplError::ConnectionLost { .. }),
        "{}",
        chain(&error)
    );
    client.drop_slot(slot).await.unwrap();
}

#[tokio::test]
async fn a_refused_connection_is_transient_and_names_the_server() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://app:S3cret-pw@127.0.0.1:{port}/shop?sslmode=disable");
    let error = ReplicationClient::connect(&source_url(&url))
        .await
        .expect_err("nothing listens there");
    let text = chain(&error);
    assert!(error.is_transient(), "{text}");
    assert!(
        text.starts_with(&format!(
            "could not connect to the source at 127.0.0.1:{port} (database \"shop\", user \"app\"): \
             connection refused"
        )),
        "{text}"
    );
    assert!(!text.contains("S3cret-pw"), "{text}");
}

#[tokio::test]
async fn a_cut_mid_stream_is_a_transient_connection_loss() {
    let dbs = test_dbs("cut_mid_stream").await;
    let slot = dbs.name.as_str();
    let cluster = &support::clusters().source;
    let target: SocketAddr = format!("127.0.0.1:{}", cluster.port()).parse().unwrap();
    let proxy = Proxy::start(target).await.unwrap();
    proxy.set_delay(Duration::from_millis(20));
    let via_proxy = format!(
        "postgres://postgres@{}/{}?sslmode=disable",
        proxy.addr(),
        dbs.name
    );

    connect(&dbs.source_url)
        .await
        .batch_execute("CREATE PUBLICATION pub_none")
        .await
        .unwrap();
    let created = repl(&via_proxy)
        .await
        .create_slot(slot, false)
        .await
        .unwrap();
    let mut stream = stream(&via_proxy, slot, created.consistent_point, "pub_none").await;
    stream
        .send_status(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, true)
        .await
        .unwrap();
    read_until(&mut stream, |m| {
        matches!(m, ReplicationMessage::Keepalive { .. })
    })
    .await;
    assert_eq!(proxy.connections(), 1);

    proxy.cut();
    // What was already through the proxy may still arrive; then the loss.
    let error = tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a cut connection ended cleanly"),
                Err(error) => return error,
            }
        }
    })
    .await
    .expect("a cut is noticed");
    assert!(
        matches!(error, ReplError::ConnectionLost { .. }),
        "{}",
        chain(&error)
    );
    assert!(error.is_transient());
    let text = chain(&error);
    assert!(
        text.starts_with(&format!(
            "lost the replication connection to {}/{}",
            proxy.addr(),
            dbs.name
        )),
        "{text}"
    );

    // While the far side is down, connecting is refused in a way worth retrying.
    proxy.set_refusing(true);
    let error = ReplicationClient::connect(&source_url(&via_proxy))
        .await
        .expect_err("refused");
    assert!(error.is_transient(), "{}", chain(&error));
    proxy.set_refusing(false);

    // The server lets go of the slot once it notices; DROP ... WAIT waits for that.
    repl(&dbs.source_url).await.drop_slot(slot).await.unwrap();
}

/// A fake server that reads the startup message and answers with `reply` (raw bytes), or
/// never answers when `reply` is empty; then holds the connection until the client leaves.
async fn fake_server(reply: &'static [u8]) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut len = [0u8; 4];
        socket.read_exact(&mut len).await.unwrap();
        let mut startup = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        socket.read_exact(&mut startup).await.unwrap();
        assert!(
            startup
                .windows(b"replication\0database\0".len())
                .any(|w| w == b"replication\0database\0"),
            "the startup message asks for replication=database"
        );
        if !reply.is_empty() {
            socket.write_all(reply).await.unwrap();
        }
        let mut rest = [0u8; 64];
        while matches!(socket.read(&mut rest).await, Ok(n) if n > 0) {}
    });
    port
}

#[tokio::test]
async fn unsupported_authentication_is_named() {
    // AuthenticationGSS: 'R', length 8, code 7.
    let port = fake_server(&[b'R', 0, 0, 0, 8, 0, 0, 0, 7]).await;
    let url = format!("postgres://app:pw@127.0.0.1:{port}/shop?sslmode=disable");
    let error = ReplicationClient::connect(&source_url(&url))
        .await
        .unwrap_err();
    let text = chain(&error);
    assert!(
        text.contains(
            "the server asks for GSSAPI authentication, which bite-sync does not support"
        ),
        "{text}"
    );
    assert!(!error.is_transient());
}

#[tokio::test]
async fn a_server_that_stalls_in_startup_times_out() {
    let port = fake_server(b"").await;
    let url = format!("postgres://app@127.0.0.1:{port}/shop?sslmode=disable&connect_timeout=1");
    let started = std::time::Instant::now();
    let error = ReplicationClient::connect(&source_url(&url))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    let ReplError::Connect(connect) = &error else {
        panic!("{}", chain(&error));
    };
    assert!(
        matches!(connect.failure(), Some(ConnectFailure::TimedOut { .. })),
        "{}",
        chain(&error)
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(error.is_transient());
}

// ---- The password and TLS cluster ----------------------------------------------------------

const PASSWORD: &str = "Corr3ct-h0rse_Battery";

/// One cluster for this binary's password and TLS tests (see the module docs), with the test
/// CA's file.
struct AuthCluster {
    cluster: TempCluster,
    ca: PathBuf,
}

/// Started by the first test that asks; the others wait for it (tokio's OnceCell works across
/// the tests' runtimes). A static, so its watchdog stops it once the process exits.
static AUTH: tokio::sync::OnceCell<AuthCluster> = tokio::sync::OnceCell::const_new();

async fn auth_cluster() -> &'static AuthCluster {
    AUTH.get_or_init(|| async {
        let cluster = tokio::task::spawn_blocking(|| {
            TempCluster::start(&ClusterOptions {
                name: "auth".to_owned(),
                logical: true,
                ..ClusterOptions::default()
            })
            .expect("start the auth cluster")
        })
        .await
        .unwrap();
        let ca = configure_auth(&cluster).await;
        AuthCluster { cluster, ca }
    })
    .await
}

async fn configure_auth(cluster: &TempCluster) -> PathBuf {
    let data = cluster.data_dir();
    let owner = std::fs::metadata(data).unwrap();
    let write = |name: &str, text: &str, mode: u32| {
        let path = data.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        path
    };

    let (ca, ca_key) = certificate_authority();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server = params.signed_by(&server_key, &ca, &ca_key).unwrap();
    let ca_path = write("test-ca.pem", &ca.pem(), 0o644);
    write("server.crt", &server.pem(), 0o644);
    // PostgreSQL refuses a private key others can read.
    write("server.key", &server_key.serialize_pem(), 0o600);
    write(
        "pg_hba.conf",
        "local all         all                    trust\n\
         local replication all                    trust\n\
         host  all         postgres  127.0.0.1/32 trust\n\
         host  replication postgres  127.0.0.1/32 trust\n\
         host  all         md5_user  127.0.0.1/32 md5\n\
         host  replication md5_user  127.0.0.1/32 md5\n\
         host  all         text_user 127.0.0.1/32 password\n\
         host  all         no_priv   127.0.0.1/32 trust\n\
         host  replication no_priv   127.0.0.1/32 trust\n\
         host  all         scram_user 127.0.0.1/32 scram-sha-256\n\
         host  replication scram_user 127.0.0.1/32 scram-sha-256\n",
        0o600,
    );

    let admin = connect(&cluster.url("postgres")).await;
    // One statement at a time: ALTER SYSTEM refuses the implicit transaction of a batch.
    for statement in [
        format!("CREATE ROLE scram_user LOGIN REPLICATION PASSWORD '{PASSWORD}'"),
        "SET password_encryption = 'md5'".to_owned(),
        format!("CREATE ROLE md5_user LOGIN REPLICATION PASSWORD '{PASSWORD}'"),
        format!("CREATE ROLE text_user LOGIN REPLICATION PASSWORD '{PASSWORD}'"),
        "CREATE ROLE no_hba LOGIN REPLICATION".to_owned(),
        "CREATE ROLE no_priv LOGIN".to_owned(),
        "CREATE PUBLICATION no_tables".to_owned(),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "ALTER SYSTEM SET ssl_cert_file = 'server.crt'".to_owned(),
        "ALTER SYSTEM SET ssl_key_file = 'server.key'".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        admin
            .batch_execute(&statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    // The postmaster reloads pg_hba.conf and TLS together: once TLS works, both are in force.
    let tls_url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=require",
        cluster.port()
    );
    wait_for("the auth cluster to reload with TLS", WAIT, || {
        let url = source_url(&tls_url);
        async move { url.connect().await.ok().map(drop) }
    })
    .await;
    ca_path
}

fn certificate_authority() -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "bite-sync replication test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

impl AuthCluster {
    /// A URL for `user` (with `:password` if given) on this cluster's `postgres` database.
    fn url(&self, user: &str, host: &str, query: &str) -> String {
        format!(
            "postgres://{user}@{host}:{}/postgres?{query}",
            self.cluster.port()
        )
    }
}

/// Whether the replication connection is encrypted, as the server sees it.
async fn uses_tls(client: &mut ReplicationClient) -> bool {
    let rows = client
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    rows == [[Some("t".to_owned())]]
}

async fn connect_err(url: &str) -> ReplError {
    match ReplicationClient::connect(&source_url(url)).await {
        Ok(_) => panic!("{url}: connected, but should have failed"),
        Err(error) => error,
    }
}

fn connect_failure(error: &ReplError) -> Option<&ConnectFailure> {
    match error {
        ReplError::Connect(error) => ConnectError::failure(error),
        _ => None,
    }
}

/// text_user's only pg_hba.conf line is `host all`: logical replication connections need no
/// `host replication` line.
#[tokio::test]
async fn md5_scram_and_cleartext_passwords_are_accepted() {
    let auth = auth_cluster().await;
    for user in ["md5_user", "scram_user", "text_user"] {
        let url = auth.url(
            &format!("{user}:{PASSWORD}"),
            "127.0.0.1",
            "sslmode=disable",
        );
        let mut client = repl(&url).await;
        let rows = client.simple_query("SELECT current_user").await.unwrap();
        assert_eq!(rows, [[Some(user.to_owned())]]);
        assert!(!uses_tls(&mut client).await);
        client.identify_system().await.unwrap();
    }
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_definite_error() {
    let auth = auth_cluster().await;
    let wrong = "Wr0ng-Passw0rd_42";
    for user in ["md5_user", "scram_user", "text_user"] {
        for mode in ["disable", "require"] {
            let url = auth.url(
                &format!("{user}:{wrong}"),
                "127.0.0.1",
                &format!("sslmode={mode}"),
            );
            let error = connect_err(&url).await;
            let text = chain(&error);
            assert!(
                matches!(
                    connect_failure(&error),
                    Some(ConnectFailure::PasswordRejected { .. })
                ),
                "{text}"
            );
            assert!(
                text.starts_with(&format!(
                    "could not connect to the source at 127.0.0.1:{} (database \"postgres\", \
                     user \"{user}\"): password authentication failed: check the user and \
                     password in the URL (BITE_SOURCE_URL or the config file)",
                    auth.cluster.port()
                )),
                "{text}"
            );
            assert_eq!(error.code(), Some("28P01"));
            assert!(
                !text.contains(wrong) && !format!("{error:?}").contains(wrong),
                "{text}"
            );
            assert!(!error.is_transient());
        }
    }

    let error = connect_err(&auth.url("scram_user", "127.0.0.1", "sslmode=disable")).await;
    assert!(
        matches!(
            connect_failure(&error),
            Some(ConnectFailure::PasswordMissing { .. })
        ),
        "{}",
        chain(&error)
    );
}

#[tokio::test]
async fn tls_require_and_verify_full_with_scram_channel_binding() {
    let auth = auth_cluster().await;
    let ca = auth.ca.display().to_string();
    let user = format!("scram_user:{PASSWORD}");
    for (host, query) in [
        ("127.0.0.1", "sslmode=require".to_owned()),
        ("127.0.0.1", "sslmode=prefer".to_owned()),
        ("localhost", format!("sslmode=verify-full&sslrootcert={ca}")),
        ("127.0.0.1", format!("sslmode=verify-ca&sslrootcert={ca}")),
        // SCRAM-SHA-256-PLUS or nothing: proves the channel binding is right.
        (
            "localhost",
            format!("sslmode=verify-full&sslrootcert={ca}&channel_binding=require"),
        ),
    ] {
        let url = auth.url(&user, host, &query);
        let mut client = repl(&url).await;
        assert!(uses_tls(&mut client).await, "{query}");
        client.identify_system().await.unwrap();
    }

    // md5 over TLS, and a stream over TLS.
    let mut client = repl(&auth.url(
        &format!("md5_user:{PASSWORD}"),
        "127.0.0.1",
        "sslmode=require",
    ))
    .await;
    assert!(uses_tls(&mut client).await);

    let url = auth.url(&user, "127.0.0.1", "sslmode=require");
    let slot = "tls_stream_slot";
    let mut client = repl(&url).await;
    let created = client.create_slot(slot, true).await.unwrap();
    let mut stream = client
        .start_replication(
            slot,
            created.consistent_point,
            &[("proto_version", "2"), ("publication_names", "no_tables")],
        )
        .await
        .unwrap();
    stream
        .send_status(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, true)
        .await
        .unwrap();
    read_until(&mut stream, |m| {
        matches!(m, ReplicationMessage::Keepalive { .. })
    })
    .await;
    // A temporary slot goes with its connection.
    stream.finish().await.unwrap();

    // A certificate the URL's CA did not sign, or a host it does not name.
    let error = connect_err(&auth.url(&user, "localhost", "sslmode=verify-full")).await;
    assert!(
        matches!(
            connect_failure(&error),
            Some(ConnectFailure::CertificateUntrusted { .. })
        ),
        "{}",
        chain(&error)
    );
    assert!(!error.is_transient());
    let error = connect_err(&auth.url(
        &user,
        "wrong-name.invalid",
        &format!("hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(
        matches!(
            connect_failure(&error),
            Some(ConnectFailure::CertificateWrongHost { .. })
        ),
        "{}",
        chain(&error)
    );
    assert!(!chain(&error).contains(PASSWORD));
}

#[tokio::test]
async fn replication_refusals_say_what_to_change() {
    let auth = auth_cluster().await;
    // A logical replication connection matches pg_hba.conf by its database, like any other
    // (text_user has no `replication` line and still gets in, see above); without a line for
    // it, the refusal is the ordinary one.
    let error = connect_err(&auth.url("no_hba", "127.0.0.1", "sslmode=disable")).await;
    let text = chain(&error);
    assert!(
        matches!(
            connect_failure(&error),
            Some(ConnectFailure::AccessDenied { .. })
        ),
        "{text}"
    );
    assert!(text.contains("the server's pg_hba.conf"), "{text}");
    assert!(text.contains("no pg_hba.conf entry for host"), "{text}");
    assert_eq!(error.code(), Some("28000"));
    assert!(!error.is_transient());

    let error = connect_err(&auth.url("no_priv", "127.0.0.1", "sslmode=disable")).await;
    let text = chain(&error);
    assert!(
        matches!(
            connect_failure(&error),
            Some(ConnectFailure::NoReplicationPrivilege { .. })
        ),
        "{text}"
    );
    assert!(
        text.contains("ALTER ROLE \"no_priv\" REPLICATION"),
        "{text}"
    );
    assert!(!error.is_transient());
}
