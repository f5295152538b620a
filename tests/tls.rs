//! `sslmode`, certificate checks and connection errors against a real PostgreSQL 15 with
//! `ssl=on` on loopback, plus tiny fake servers for what a real one will not do (decline TLS,
//! never answer).
//!
//! Self-contained on purpose: each test starts its own throwaway cluster (rcgen CA and server
//! certificate, scram-sha-256 for `app`, trust for `postgres`) and a guard stops it and removes
//! its directory even when the test fails.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bite_sync::pg::connect::{ConnectError, ConnectFailure, DbUrl, Role, SslMode};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const APP_PASSWORD: &str = "Corr3ct-h0rse_Battery";

/// A running throwaway cluster. Dropping it stops the server, then removes its directory.
struct Cluster {
    port: u16,
    data: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    /// initdb refuses to run as root, so as root everything runs as `postgres`.
    server_user: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("bite-sync-tls-")
            .tempdir()
            .expect("create a temp dir for the cluster");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let is_root = unsafe { libc::geteuid() } == 0;
        let cluster = Cluster {
            port: free_port(),
            data: dir.path().join("data"),
            ca: dir.path().join("ca.pem"),
            other_ca: dir.path().join("other-ca.pem"),
            server_user: is_root.then(postgres_ids),
            dir,
        };
        cluster.write_certificates();
        if let Some((uid, gid)) = cluster.server_user {
            chown_all(cluster.dir.path(), uid, gid);
        }

        run(
            cluster
                .command("initdb")
                .arg("-D")
                .arg(&cluster.data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
                .args(["--no-sync", "--no-instructions"]),
            "initdb",
        );
        let dir = cluster.dir.path().display().to_string();
        append(
            &cluster.data.join("postgresql.conf"),
            &format!(
                "port = {port}\n\
                 listen_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{dir}'\n\
                 ssl = on\n\
                 ssl_cert_file = '{dir}/server.crt'\n\
                 ssl_key_file = '{dir}/server.key'\n\
                 password_encryption = 'scram-sha-256'\n\
                 fsync = off\n",
                port = cluster.port
            ),
        );
        std::fs::write(
            cluster.data.join("pg_hba.conf"),
            "local   all  postgres                trust\n\
             host    all  postgres  127.0.0.1/32  trust\n\
             hostssl all  app       127.0.0.1/32  scram-sha-256\n\
             host    all  app       127.0.0.1/32  scram-sha-256\n",
        )
        .expect("write pg_hba.conf");

        let log = cluster.dir.path().join("server.log");
        let started = cluster
            .command("pg_ctl")
            .arg("-D")
            .arg(&cluster.data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(
            started.success(),
            "pg_ctl start failed; server log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );

        let admin = cluster
            .url("postgres", "127.0.0.1", "sslmode=disable")
            .replace("/bite?", "/postgres?");
        let client = DbUrl::parse(Role::Source, &admin)
            .unwrap()
            .connect()
            .await
            .expect("connect as postgres over trust");
        // Separate statements: CREATE DATABASE refuses to run in the implicit transaction of
        // a multi-statement query.
        for statement in [
            format!("CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'"),
            "CREATE DATABASE bite OWNER app".to_owned(),
        ] {
            client
                .batch_execute(&statement)
                .await
                .unwrap_or_else(|error| panic!("{statement}: {error}"));
        }
        cluster
    }

    /// A URL for `bite` on this server; `user` may carry `:password`.
    fn url(&self, user: &str, host: &str, query: &str) -> String {
        format!("postgres://{user}@{host}:{}/bite?{query}", self.port)
    }

    fn app_url(&self, host: &str, query: &str) -> String {
        self.url(&format!("app:{APP_PASSWORD}"), host, query)
    }

    fn command(&self, program: &str) -> Command {
        let program = format!("{PG_BIN}/{program}");
        let mut command = match self.server_user {
            Some(_) => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--", &program]);
                command
            }
            None => Command::new(program),
        };
        // The postgres user may not be allowed into the directory the tests run from.
        command.current_dir(self.dir.path());
        command
    }

    fn write_certificates(&self) {
        let dir = self.dir.path();
        let (ca, ca_key) = certificate_authority("bite-sync test CA");
        let (other_ca, _) = certificate_authority("some other CA");

        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().unwrap();
        let server = params.signed_by(&server_key, &ca, &ca_key).unwrap();

        std::fs::write(&self.ca, ca.pem()).unwrap();
        std::fs::write(&self.other_ca, other_ca.pem()).unwrap();
        std::fs::write(dir.join("server.crt"), server.pem()).unwrap();
        let key_path = dir.join("server.key");
        std::fs::write(&key_path, server_key.serialize_pem()).unwrap();
        // PostgreSQL refuses a private key that others can read.
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Immediate: nothing here is worth a checkpoint, and the temp dir goes next anyway.
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn certificate_authority(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("could not run {what}: {error}"));
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            output.status.success(),
            "there is no postgres user to run the server as"
        );
        String::from_utf8(output.stdout)
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    (id("-u"), id("-g"))
}

fn chown_all(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_all(&entry.unwrap().path(), uid, gid);
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The error chain as `main` prints it.
fn chain(error: &ConnectError) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(err) = cause {
        text.push_str(": ");
        text.push_str(&err.to_string());
        cause = err.source();
    }
    text
}

async fn connect(url: DbUrl) -> Result<tokio_postgres::Client, ConnectError> {
    url.connect().await
}

/// Whether the server sees this session as TLS-encrypted.
async fn uses_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0)
}

async fn connect_ok(url: DbUrl) -> bool {
    let shown = url.to_string();
    let client = connect(url)
        .await
        .unwrap_or_else(|error| panic!("{shown}: {}", chain(&error)));
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "app", "{shown}");
    uses_tls(&client).await
}

fn mirror(url: &str) -> DbUrl {
    DbUrl::parse(Role::Mirror, url).unwrap()
}

async fn connect_err(url: DbUrl) -> ConnectError {
    let shown = url.to_string();
    match connect(url).await {
        Ok(_) => panic!("{shown}: connected, but should have failed"),
        Err(error) => error,
    }
}

#[tokio::test]
async fn each_sslmode_connects_as_libpq_would() {
    let server = Cluster::start().await;
    let ca = server.ca.display().to_string();

    assert!(
        !connect_ok(mirror(&server.app_url("127.0.0.1", "sslmode=disable"))).await,
        "sslmode=disable must not use TLS"
    );
    assert!(
        connect_ok(mirror(&server.app_url("127.0.0.1", "sslmode=prefer"))).await,
        "sslmode=prefer uses TLS when the server offers it"
    );
    assert!(
        connect_ok(mirror(&server.app_url("127.0.0.1", "sslmode=require"))).await,
        "sslmode=require needs no CA"
    );
    assert!(
        connect_ok(mirror(&server.app_url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}")
        )))
        .await
    );
    assert!(
        connect_ok(
            mirror(&server.app_url("localhost", "sslmode=verify-full"))
                .with_ca_file(server.ca.clone())
        )
        .await,
        "with_ca_file supplies the CA"
    );
    assert!(
        connect_ok(mirror(&server.app_url(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={ca}")
        )))
        .await,
        "the certificate's IP address SAN matches"
    );

    // The server offers no TLS on unix sockets; libpq ignores sslmode there, and so must we.
    let socket = mirror(&format!(
        "host='{}' port={} user=postgres dbname=postgres sslmode=verify-full",
        server.dir.path().display(),
        server.port
    ));
    let client = connect(socket)
        .await
        .unwrap_or_else(|error| panic!("unix socket: {}", chain(&error)));
    assert!(!uses_tls(&client).await);

    // hostaddr sends TCP to loopback while TLS checks the host name, which the certificate
    // does not list.
    let mismatched = |mode: &str| {
        mirror(&server.app_url(
            "wrong-name.invalid",
            &format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}"),
        ))
    };
    assert!(
        connect_ok(mismatched("verify-ca")).await,
        "verify-ca ignores the host name"
    );
    let error = connect_err(mismatched("verify-full")).await;
    assert!(
        matches!(
            error.failure(),
            Some(ConnectFailure::CertificateWrongHost {
                ssl_mode: SslMode::VerifyFull,
                ..
            })
        ),
        "{}",
        chain(&error)
    );
    assert!(
        error.to_string().contains("sslmode=verify-ca"),
        "suggests checking only the CA: {error}"
    );
}

#[tokio::test]
async fn certificates_from_an_untrusted_ca_are_rejected() {
    let server = Cluster::start().await;
    let other = server.other_ca.display().to_string();

    for mode in ["verify-full", "verify-ca", "require"] {
        let url =
            mirror(&server.app_url("localhost", &format!("sslmode={mode}&sslrootcert={other}")));
        let error = connect_err(url).await;
        let text = chain(&error);
        assert!(
            matches!(
                error.failure(),
                Some(ConnectFailure::CertificateUntrusted { .. })
            ),
            "{mode}: {text}"
        );
        assert!(
            text.starts_with(&format!(
                "could not connect to the mirror at localhost:{} (database \"bite\", user \"app\"): \
                 the server's TLS certificate was rejected (sslmode={mode})",
                server.port
            )),
            "{text}"
        );
        assert!(text.contains("sslrootcert=/path/ca.pem"), "{text}");
        assert!(text.contains(&other), "names the CA file it tried: {text}");
        assert!(!text.contains(APP_PASSWORD), "{text}");
        assert!(!error.is_transient(), "{text}");
    }

    // Without a CA file the system and bundled roots are used, and they do not know this CA.
    let error = connect_err(mirror(&server.app_url("localhost", "sslmode=verify-full"))).await;
    let text = chain(&error);
    assert!(
        text.contains("(sslmode=verify-full): it is not signed by a CA this machine trusts"),
        "{text}"
    );
    assert!(text.contains("add sslrootcert=/path/ca.pem"), "{text}");
    assert!(
        text.contains("sslmode=require to skip verification"),
        "{text}"
    );
}

#[tokio::test]
async fn authentication_and_database_errors_say_what_to_fix() {
    let server = Cluster::start().await;
    let wrong = "Wr0ng-Passw0rd_42";

    for mode in ["disable", "require"] {
        let url = mirror(&server.url(
            &format!("app:{wrong}"),
            "127.0.0.1",
            &format!("sslmode={mode}"),
        ));
        let error = connect_err(url).await;
        let text = chain(&error);
        assert!(
            matches!(
                error.failure(),
                Some(ConnectFailure::PasswordRejected { .. })
            ),
            "{text}"
        );
        assert!(
            text.starts_with(&format!(
                "could not connect to the mirror at 127.0.0.1:{} (database \"bite\", user \"app\"): \
                 password authentication failed: check the user and password in the URL \
                 (BITE_MIRROR_URL or the config file)",
                server.port
            )),
            "{text}"
        );
        assert!(!text.contains(wrong), "{text}");
        assert!(!format!("{error:?}").contains(wrong), "{error:?}");
        assert!(!error.is_transient());
    }

    let error = connect_err(mirror(&server.url("app", "127.0.0.1", "sslmode=require"))).await;
    assert!(
        matches!(
            error.failure(),
            Some(ConnectFailure::PasswordMissing { .. })
        ),
        "{}",
        chain(&error)
    );

    let url = mirror(
        &server
            .app_url("127.0.0.1", "sslmode=require")
            .replace("/bite?", "/nosuchdb?"),
    );
    let error = connect_err(url).await;
    let text = chain(&error);
    assert!(
        text.starts_with(&format!(
            "could not connect to the mirror at 127.0.0.1:{} (database \"nosuchdb\", user \"app\"): \
             the database does not exist",
            server.port
        )),
        "{text}"
    );
    assert!(!error.is_transient());
}

#[tokio::test]
async fn a_closed_port_is_refused_and_worth_retrying() {
    let port = free_port();
    let url = mirror(&format!(
        "postgres://app:{APP_PASSWORD}@127.0.0.1:{port}/bite?sslmode=require"
    ));
    let error = connect_err(url).await;
    assert_eq!(
        error.to_string(),
        format!(
            "could not connect to the mirror at 127.0.0.1:{port} (database \"bite\", user \
             \"app\"): connection refused: is PostgreSQL running there and accepting TCP \
             connections?"
        )
    );
    assert!(error.is_transient());
    assert!(!chain(&error).contains(APP_PASSWORD));
}

/// Serves one connection: reads the 8-byte SSLRequest and answers with `reply`, or with nothing
/// when `reply` is `None`; then holds the connection open until the client leaves.
async fn fake_server(reply: Option<u8>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 8];
        if stream.read_exact(&mut request).await.is_err() {
            return;
        }
        if let Some(reply) = reply {
            let _ = stream.write_all(&[reply]).await;
        }
        let mut rest = [0u8; 256];
        while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
    });
    port
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required() {
    let port = fake_server(Some(b'N')).await;
    let url = mirror(&format!(
        "postgres://app:{APP_PASSWORD}@127.0.0.1:{port}/bite?sslmode=verify-full"
    ));
    let error = connect_err(url).await;
    let text = chain(&error);
    assert!(
        text.starts_with(&format!(
            "could not connect to the mirror at 127.0.0.1:{port} (database \"bite\", user \"app\"): \
             the server does not support TLS, but sslmode=verify-full requires it"
        )),
        "{text}"
    );
    assert!(!error.is_transient());
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_per_connect_timeout() {
    let port = fake_server(None).await;
    let url = mirror(&format!(
        "postgres://app:{APP_PASSWORD}@127.0.0.1:{port}/bite?sslmode=require&connect_timeout=1"
    ));
    let started = Instant::now();
    let error = connect_err(url).await;
    let waited = started.elapsed();
    assert!(
        matches!(error.failure(), Some(ConnectFailure::TimedOut { .. })),
        "{}",
        chain(&error)
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "gave up after {waited:?}, connect_timeout=1"
    );
    assert!(error.to_string().contains("timed out after 1 s"), "{error}");
    assert!(error.is_transient());
}

#[tokio::test]
async fn a_rejected_password_names_where_the_url_came_from() {
    let server = Cluster::start().await;
    let wrong = "Wr0ng-Passw0rd_42";
    let url = server.url(&format!("app:{wrong}"), "127.0.0.1", "sslmode=disable");
    let dir = tempfile::tempdir().unwrap();
    let check = |setup: &dyn Fn(&mut Command)| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bite-sync"));
        cmd.current_dir(dir.path())
            .env_remove("BITE_SOURCE_URL")
            .env_remove("BITE_MIRROR_URL")
            .env_remove("BITE_CONFIG")
            .args(["check", "--tables", "t"]);
        setup(&mut cmd);
        let out = cmd.output().expect("bite-sync runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let reachable = |report: &str, side: &str| -> String {
        report
            .lines()
            .find(|l| l.starts_with(&format!("FIX  {side}  reachable")))
            .unwrap_or_else(|| panic!("no {side} reachable line in:\n{report}"))
            .to_string()
    };

    let report = check(&|cmd| {
        cmd.args(["--source", &url, "--mirror", &url]);
    });
    assert!(
        reachable(&report, "source").contains("check the user and password in the URL (--source)"),
        "{report}"
    );
    assert!(
        reachable(&report, "mirror").contains("in the URL (--mirror)"),
        "{report}"
    );

    let report = check(&|cmd| {
        cmd.env("BITE_SOURCE_URL", &url)
            .env("BITE_MIRROR_URL", &url);
    });
    assert!(
        reachable(&report, "source").contains("in the URL (BITE_SOURCE_URL)"),
        "{report}"
    );
    assert!(
        reachable(&report, "mirror").contains("in the URL (BITE_MIRROR_URL)"),
        "{report}"
    );

    let config = dir.path().join("bite-sync.toml");
    std::fs::write(
        &config,
        format!("[source]\nurl = \"{url}\"\n\n[mirror]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let report = check(&|_| {});
    assert!(
        reachable(&report, "source")
            .contains(&format!("in the URL (source.url in {})", config.display())),
        "{report}"
    );
    assert!(!report.contains(wrong), "{report}");
}
