//! Database URLs and connecting: the one place bite-sync opens a connection to the source (the
//! restaurant's local PostgreSQL) or the mirror (the cloud copy, reached over the internet).
//!
//! [`DbUrl`] reads `postgres://` URLs and libpq `key=value` strings. It takes out the settings
//! tokio-postgres does not know (`sslmode=verify-ca`/`verify-full`, `sslrootcert`), applies
//! bite-sync's defaults (10 s connect timeout, TCP keepalives, `application_name`) and connects
//! with TLS chosen per `sslmode`, as libpq does:
//!
//! | `sslmode` | TLS | certificate check |
//! |---|---|---|
//! | `disable` | never | none |
//! | `allow`, `prefer` (default) | if the server offers it, else plain | none |
//! | `require` | always | none, or the chain if a CA file is given (as libpq) |
//! | `verify-ca` | always | chain against the roots |
//! | `verify-full` | always | chain and host name |
//!
//! Roots are the CA file (`sslrootcert=` in the URL, else [`DbUrl::with_ca_file`]) or, without
//! one, the system's roots plus the bundled Mozilla roots. Unix-socket connections never use TLS
//! (the server does not offer it there; libpq ignores `sslmode` for them too).
//!
//! [`ConnectError`] names role, host, port, database and user, says what to do, and tells the
//! retry loop whether trying again can help ([`ConnectError::is_transient`]).
//!
//! The replication connection (`repl::conn`), which tokio-postgres cannot open, dials by hand
//! but takes everything that decides security and messages from here: the rustls
//! configuration (`DbUrl::tls_config`), the endpoint and TCP settings, and the
//! classification of socket, TLS and server failures into a [`ConnectFailure`].
//!
//! Invariants:
//! - Secrets are never printed. `Display`/`Debug` of a [`DbUrl`] show the password as `***`;
//!   errors never contain the URL or the password; URL errors describe the problem without echoing
//!   the input. tokio-postgres only ever parses a `key='value'` string rebuilt here, so its own
//!   parse errors (kept as sources) can only name a setting, never repeat a value.
//! - Verification is never weaker than the `sslmode` asks, and every mode that uses TLS still
//!   checks the handshake signatures against the certificate the server presented.

use std::error::Error as _;
use std::fmt::{self, Write as _};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The underlying cause of a connection failure, whichever layer it came from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Shown in `pg_stat_activity` so a DBA can tell bite-sync's sessions apart.
const APPLICATION_NAME: &str = "bite-sync";
/// libpq waits forever by default; a daemon must notice a dead network instead.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// NAT boxes and cloud load balancers drop idle flows after a few minutes; probing after a minute
/// keeps a quiet replication connection alive and notices a dead peer.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(60);
const DEFAULT_PORT: u16 = 5432;
const SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

/// Which database a URL is for, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The restaurant's local database, read from.
    Source,
    /// The cloud database, written to.
    Mirror,
    /// The database `bite-sync restore` restores into.
    Target,
    /// The server `bite-sync backups verify` makes its scratch database on.
    Scratch,
}

impl Role {
    /// Where this role's URL comes from when nobody said ([`DbUrl::with_origin`]): named in
    /// messages that ask the user to fix the URL.
    pub fn default_origin(self) -> &'static str {
        match self {
            Role::Source => "BITE_SOURCE_URL or the config file",
            Role::Mirror => "BITE_MIRROR_URL or the config file",
            Role::Target => "--target",
            Role::Scratch => "--scratch",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Mirror => "mirror",
            Role::Target => "restore target",
            Role::Scratch => "scratch server",
        })
    }
}

/// How much TLS a connection demands, as libpq's `sslmode` (`allow` is read as `prefer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS without verification if the server offers it, else plain (libpq's default).
    Prefer,
    /// TLS without verification, unless a CA file is given: then the chain is checked.
    Require,
    /// TLS; the certificate chain must lead to a trusted root; the host name is not checked.
    VerifyCa,
    /// TLS; the chain must lead to a trusted root and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    /// The `sslmode` value as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn from_param(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries plain first and TLS second; nothing bite-sync talks to
            // refuses TLS while accepting plain, so trying TLS first loses nothing.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// What to check on the server's certificate; `None` means no TLS at all.
    fn verification(self, has_ca_file: bool) -> Option<Verification> {
        match self {
            SslMode::Disable => None,
            SslMode::Prefer => Some(Verification::None),
            SslMode::Require if has_ca_file => Some(Verification::Chain),
            SslMode::Require => Some(Verification::None),
            SslMode::VerifyCa => Some(Verification::Chain),
            SslMode::VerifyFull => Some(Verification::ChainAndName),
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    None,
    Chain,
    ChainAndName,
}

/// The connection half that [`DbUrl::connect_unspawned`] hands back: a future that drives the
/// socket and must be polled (usually spawned) for the client to make progress.
pub type PgConnection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// tokio-postgres asks for a TLS connector before it knows whether TLS will be used, and for
/// unix sockets it passes an empty host name, which rustls rejects as a server name. It never
/// starts TLS without a host name (it fails with "no hostname provided" first), so a stand-in
/// name is never checked against a certificate.
#[derive(Clone)]
struct Tls(MakeRustlsConnect);

impl MakeTlsConnect<Socket> for Tls {
    type Stream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let hostname = if hostname.is_empty() {
            "localhost"
        } else {
            hostname
        };
        MakeTlsConnect::<Socket>::make_tls_connect(&mut self.0, hostname)
    }
}

/// A parsed database URL for one side, safe to print: `Display` and `Debug` show the password
/// as `***`.
#[derive(Clone)]
pub struct DbUrl {
    role: Role,
    /// Everything tokio-postgres understands, with bite-sync's defaults applied.
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    ca_file: Option<PathBuf>,
    /// The URL chose the roots (`sslrootcert`), so the config file's `ca_file` must not override.
    roots_from_url: bool,
    /// The input as written, password replaced by `***`.
    redacted: String,
    /// Where the URL came from (`--source`, `BITE_SOURCE_URL`, `source.url in FILE`), for
    /// messages that ask to fix it; none: [`Role::default_origin`].
    origin: Option<String>,
}

impl DbUrl {
    /// Parses a postgres:// or postgresql:// URL (and libpq "key=value" connection strings).
    ///
    /// Extracts and removes `sslmode` (disable, allow (treated as prefer), prefer, require,
    /// verify-ca, verify-full; default prefer as libpq) and `sslrootcert` (a CA file path, or
    /// `system` for the system's roots, which implies verify-full as in libpq) before handing the
    /// rest to `tokio_postgres::Config` (which does not know verify-ca/verify-full). Fills in what
    /// libpq would default: the user from the environment, the database from the user, the local
    /// socket directory as host, port 5432.
    pub fn parse(role: Role, url: &str) -> Result<DbUrl, ConnectError> {
        let invalid = |problem| ConnectError::InvalidUrl { role, problem };
        let parsed = parse_text(url.trim()).map_err(invalid)?;

        let mut ssl_mode_value = None;
        let mut root_cert = None;
        let mut params = Vec::with_capacity(parsed.params.len());
        for (key, value) in parsed.params {
            match key.as_str() {
                "sslmode" => ssl_mode_value = Some(value),
                "sslrootcert" => root_cert = Some(value),
                _ => params.push((key, value)),
            }
        }

        for (key, _) in &params {
            check_setting_name(role, key)?;
        }
        let system_roots = root_cert.as_deref() == Some("system");
        let ssl_mode = match ssl_mode_value {
            Some(value) => match SslMode::from_param(&value) {
                Some(mode) => mode,
                None => return Err(ConnectError::InvalidSslMode { role, value }),
            },
            None if system_roots => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if system_roots && ssl_mode != SslMode::VerifyFull {
            // libpq refuses this too: asking for the public roots only makes sense with a name check.
            return Err(ConnectError::WeakSslModeWithSystemRoots { role, ssl_mode });
        }
        let ca_file = match root_cert.as_deref() {
            Some("system") | Some("") | None => None,
            Some(path) => Some(PathBuf::from(path)),
        };

        let mut conninfo = String::new();
        for (key, value) in &params {
            // Keys are checked to be [A-Za-z0-9_] and values quoted, so tokio-postgres's parser
            // can only object to a setting's name or meaning, never echo a value.
            let _ = write!(conninfo, "{key}='{}' ", escape_conninfo(value));
        }
        let mut config: tokio_postgres::Config = conninfo
            .parse()
            .map_err(|source| ConnectError::BadSettingValue { role, source })?;

        let user = match config.get_user() {
            Some(user) if !user.is_empty() => user.to_owned(),
            _ => {
                let user = process_user().ok_or_else(|| invalid(UrlProblem::NoUser))?;
                config.user(&user);
                user
            }
        };
        if config.get_dbname().is_none_or(str::is_empty) {
            config.dbname(user);
        }
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            config.host(default_socket_dir());
        }
        let given = |name: &str| params.iter().any(|(key, _)| key == name);
        if !given("connect_timeout") {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if !given("keepalives_idle") {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        if !given("application_name") {
            config.application_name(APPLICATION_NAME);
        }

        Ok(DbUrl {
            role,
            config,
            ssl_mode,
            ca_file,
            roots_from_url: root_cert.is_some(),
            redacted: parsed.redacted,
            origin: None,
        })
    }

    /// Which side this URL is for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Says where the URL came from (`--source`, `BITE_SOURCE_URL`, `source.url in FILE`),
    /// so that messages asking to fix it point there.
    pub fn with_origin(mut self, origin: impl Into<String>) -> DbUrl {
        self.origin = Some(origin.into());
        self
    }

    /// Where the URL came from, as messages name it.
    pub fn origin(&self) -> String {
        self.origin
            .clone()
            .unwrap_or_else(|| self.role.default_origin().to_string())
    }

    /// The first host: a name, an IP address, or the unix socket directory.
    pub fn host(&self) -> String {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(dir)) => dir.display().to_string(),
            None => self
                .config
                .get_hostaddrs()
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }

    /// The port of the first host.
    pub fn port(&self) -> u16 {
        self.config
            .get_ports()
            .first()
            .copied()
            .unwrap_or(DEFAULT_PORT)
    }

    /// The database name; defaults as libpq: the user name.
    pub fn dbname(&self) -> String {
        self.config.get_dbname().unwrap_or_default().to_owned()
    }

    /// The user name; defaults as libpq: the name of the user running bite-sync.
    pub fn user(&self) -> String {
        self.config.get_user().unwrap_or_default().to_owned()
    }

    /// The `sslmode` in effect.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The CA file that verification will trust, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// Uses this CA file unless the URL named one with sslrootcert.
    pub fn with_ca_file(mut self, path: PathBuf) -> DbUrl {
        if !self.roots_from_url {
            self.ca_file = Some(path);
        }
        self
    }

    /// "host:port/dbname" – safe to print.
    pub fn target(&self) -> String {
        format!("{}/{}", self.host_port(), self.dbname())
    }

    fn host_port(&self) -> String {
        let host = self.host();
        if host.contains(':') && !host.starts_with('/') {
            format!("[{host}]:{}", self.port())
        } else {
            format!("{host}:{}", self.port())
        }
    }

    /// Where the connection goes, as users know it: host:port, or the socket file.
    fn endpoint(&self) -> String {
        match self.config.get_hosts().first() {
            Some(Host::Unix(dir)) => format!("{}/.s.PGSQL.{}", dir.display(), self.port()),
            _ => self.host_port(),
        }
    }

    /// The server offers no TLS on unix sockets, and libpq ignores `sslmode` there.
    fn only_unix_sockets(&self) -> bool {
        self.config.get_hostaddrs().is_empty()
            && self
                .config
                .get_hosts()
                .iter()
                .all(|host| matches!(host, Host::Unix(_)))
    }

    /// The first host as the replication connection reaches it by hand (it does not try
    /// further hosts): a unix socket file, or a TCP host with an optional `hostaddr`.
    pub(crate) fn endpoint_to_dial(&self) -> Endpoint {
        let port = self.port();
        let hostaddr = self.config.get_hostaddrs().first().copied();
        match self.config.get_hosts().first() {
            Some(Host::Unix(dir)) => Endpoint::Unix {
                path: dir.join(format!(".s.PGSQL.{port}")),
            },
            Some(Host::Tcp(host)) => Endpoint::Tcp {
                host: host.clone(),
                hostaddr,
                port,
            },
            None => Endpoint::Tcp {
                host: hostaddr.map(|ip| ip.to_string()).unwrap_or_default(),
                hostaddr,
                port,
            },
        }
    }

    /// The same server and credentials, another database (a scratch database to restore into).
    pub fn with_dbname(&self, dbname: &str) -> DbUrl {
        let mut url = self.clone();
        url.config.dbname(dbname);
        url.redacted = format!(
            "postgres://{}@{}/{}",
            percent_encode(&self.user()),
            self.host_port(),
            percent_encode(dbname)
        );
        url
    }

    /// The connection as libpq environment variables, for running `pg_dump` or `psql`: the
    /// password goes in `PGPASSWORD`, never on a command line other users can read.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PGHOST", self.host()),
            ("PGPORT", self.port().to_string()),
            ("PGUSER", self.user()),
            ("PGDATABASE", self.dbname()),
            ("PGSSLMODE", self.ssl_mode.as_str().to_owned()),
            ("PGAPPNAME", "bite-sync".to_owned()),
            ("PGCONNECT_TIMEOUT", "10".to_owned()),
        ];
        if let Some(password) = self.password() {
            env.push(("PGPASSWORD", String::from_utf8_lossy(password).into_owned()));
        }
        if let Some(ca) = &self.ca_file {
            env.push(("PGSSLROOTCERT", ca.display().to_string()));
        }
        env
    }

    /// The password, if the URL has one. Never print it.
    pub(crate) fn password(&self) -> Option<&[u8]> {
        self.config.get_password()
    }

    /// `application_name` (bite-sync's default unless the URL set one).
    pub(crate) fn application_name(&self) -> Option<&str> {
        self.config.get_application_name()
    }

    /// The `options` setting (command-line options for the server), if any.
    pub(crate) fn server_options(&self) -> Option<&str> {
        self.config.get_options()
    }

    /// How long one connection attempt may take from the first packet to ready; `None` is
    /// forever (`connect_timeout=0`).
    pub(crate) fn connect_timeout(&self) -> Option<Duration> {
        self.config.get_connect_timeout().copied()
    }

    /// The TCP settings the URL asks for: keepalives (idle, interval, retries) and
    /// `tcp_user_timeout`.
    pub(crate) fn tcp_settings(&self) -> TcpSettings {
        TcpSettings {
            keepalives: self.config.get_keepalives().then(|| Keepalives {
                idle: self.config.get_keepalives_idle(),
                interval: self.config.get_keepalives_interval(),
                retries: self.config.get_keepalives_retries(),
            }),
            user_timeout: self.config.get_tcp_user_timeout().copied(),
        }
    }

    /// The URL's `channel_binding` setting.
    pub(crate) fn channel_binding(&self) -> tokio_postgres::config::ChannelBinding {
        self.config.get_channel_binding()
    }

    fn verification(&self) -> Option<Verification> {
        if self.only_unix_sockets() {
            None
        } else {
            self.ssl_mode.verification(self.ca_file.is_some())
        }
    }

    /// Connects: TLS per sslmode, TCP keepalives (keepalives_idle 60 s), connect_timeout 10 s
    /// unless the URL set one, application_name "bite-sync" unless set. Spawns the connection task
    /// (logging its error at debug level) and returns the client.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let (client, connection) = self.connect_unspawned().await?;
        let role = self.role;
        let target = self.target();
        tokio::spawn(async move {
            // The client sees the same failure on its next call and reports it with context;
            // this is only a breadcrumb.
            if let Err(error) = connection.await {
                tracing::debug!(%role, %target, %error, "database connection ended with an error");
            }
        });
        Ok(client)
    }

    /// Same as [`DbUrl::connect`], but returns the connection future instead of spawning it, for
    /// callers that must drive it themselves (replication).
    pub async fn connect_unspawned(&self) -> Result<(Client, PgConnection), ConnectError> {
        let verification = self.verification();
        let mut config = self.config.clone();
        config.ssl_mode(match verification {
            None => tokio_postgres::config::SslMode::Disable,
            Some(_) if self.ssl_mode == SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            Some(_) => tokio_postgres::config::SslMode::Require,
        });
        let tls = self
            .tls_connector(verification.unwrap_or(Verification::None))
            .await?;
        tracing::debug!(role = %self.role, target = %self.target(), ssl_mode = %self.ssl_mode, "connecting");

        match self.attempt(&config, tls.clone()).await {
            // libpq's `prefer` falls back to plain when the TLS handshake fails, not only when
            // the server declines TLS (which tokio-postgres already handles).
            Err(error) if self.ssl_mode == SslMode::Prefer && error.is_tls_failure() => {
                tracing::debug!(role = %self.role, target = %self.target(), %error, "TLS failed with sslmode=prefer, retrying without TLS");
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                self.attempt(&config, tls).await
            }
            result => result,
        }
    }

    async fn attempt(
        &self,
        config: &tokio_postgres::Config,
        tls: Tls,
    ) -> Result<(Client, PgConnection), ConnectError> {
        let connecting = config.connect(tls);
        // tokio-postgres's connect_timeout only bounds the TCP connect; libpq's bounds the whole
        // attempt per host, which is what protects against a server that accepts and then stalls
        // (DNS, TLS handshake, authentication).
        let result = match config.get_connect_timeout() {
            Some(per_host) => {
                let hosts = config
                    .get_hosts()
                    .len()
                    .max(config.get_hostaddrs().len())
                    .max(1);
                let budget = per_host.saturating_mul(u32::try_from(hosts).unwrap_or(u32::MAX));
                match tokio::time::timeout(budget, connecting).await {
                    Ok(result) => result,
                    Err(_) => {
                        return Err(
                            self.connect_error(ConnectFailure::TimedOut { after: budget }, None)
                        );
                    }
                }
            }
            None => connecting.await,
        };
        match result {
            Ok(pair) => Ok(pair),
            Err(source) => {
                let failure = self.classify(&source);
                // A reply that made no sense to the PostgreSQL client may come from a server of
                // another kind (a web server on that port): asking it directly tells them apart.
                if matches!(
                    failure,
                    ConnectFailure::Other
                        | ConnectFailure::Reset
                        | ConnectFailure::TlsNotSupported { .. }
                        | ConnectFailure::TlsHandshake { .. }
                ) && let Some(other) = self.probe_protocol().await
                {
                    // The client's own words ("server does not support TLS") would mislead.
                    return Err(self.connect_error(other, None));
                }
                Err(self.connect_error(failure, Some(source.into())))
            }
        }
    }

    /// Asks the TCP endpoint what it is, the way a PostgreSQL client opens (an SSLRequest), and
    /// reads the first bytes of the answer: [`ConnectFailure::NotPostgres`] when it is not
    /// PostgreSQL's one-byte `S`/`N` (or an error message), none when it is or nothing came.
    async fn probe_protocol(&self) -> Option<ConnectFailure> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        const WAIT: Duration = Duration::from_secs(3);
        let Endpoint::Tcp {
            host,
            hostaddr,
            port,
        } = self.endpoint_to_dial()
        else {
            return None;
        };
        let probe = async {
            let mut stream = match hostaddr {
                Some(ip) => tokio::net::TcpStream::connect((ip, port)).await,
                None => tokio::net::TcpStream::connect((host.as_str(), port)).await,
            }
            .ok()?;
            stream.write_all(&SSL_REQUEST).await.ok()?;
            let mut answer = [0u8; 5];
            let mut read = 0;
            while read < answer.len() {
                match stream.read(&mut answer[read..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
                if matches!(answer[0], b'S' | b'N' | b'E') {
                    return None;
                }
            }
            Some(answer[..read].to_vec())
        };
        let answer = tokio::time::timeout(WAIT, probe).await.ok().flatten()?;
        match answer.as_slice() {
            [] => None,
            [b'S' | b'N' | b'E', ..] => None,
            http if http.starts_with(b"HTTP/") || b"HTTP/".starts_with(http) => {
                Some(ConnectFailure::NotPostgres { http: true })
            }
            _ => Some(ConnectFailure::NotPostgres { http: false }),
        }
    }

    /// The error for a failed connection to this URL: names role, endpoint, database and user.
    pub(crate) fn connect_error(
        &self,
        failure: ConnectFailure,
        source: Option<BoxError>,
    ) -> ConnectError {
        ConnectError::Connect {
            role: self.role,
            endpoint: self.endpoint(),
            dbname: self.dbname(),
            user: self.user(),
            failure,
            source: source.map(|error| ConnectCause(Box::new(error))),
        }
    }

    async fn tls_connector(&self, verification: Verification) -> Result<Tls, ConnectError> {
        Ok(Tls(MakeRustlsConnect::new(
            self.tls_client_config(verification).await?,
        )))
    }

    /// The rustls configuration this URL's `sslmode` calls for, or `None` when the connection
    /// must not use TLS (`sslmode=disable`, unix sockets). For connections made by hand (the
    /// replication connection); the same configuration [`DbUrl::connect`] uses.
    pub(crate) async fn tls_config(&self) -> Result<Option<ClientConfig>, ConnectError> {
        match self.verification() {
            Some(verification) => Ok(Some(self.tls_client_config(verification).await?)),
            None => Ok(None),
        }
    }

    async fn tls_client_config(
        &self,
        verification: Verification,
    ) -> Result<ClientConfig, ConnectError> {
        let role = self.role;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match verification {
            Verification::None => Arc::new(NoCertificateCheck {
                provider: provider.clone(),
            }),
            Verification::Chain => Arc::new(ChainOnly {
                inner: self.webpki_verifier(&provider).await?,
            }),
            Verification::ChainAndName => self.webpki_verifier(&provider).await?,
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| ConnectError::TlsSetup {
                role,
                source: Box::new(source),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(config)
    }

    async fn webpki_verifier(
        &self,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<WebPkiServerVerifier>, ConnectError> {
        let roots = match &self.ca_file {
            Some(path) => Arc::new(load_ca_file(self.role, path).await?),
            None => system_roots(),
        };
        WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|source| ConnectError::TlsSetup {
                role: self.role,
                source: Box::new(source),
            })
    }

    /// Turns tokio-postgres's error into what the user should hear. tokio-postgres keeps its
    /// error kind private, so this reads the SQLSTATE, the io/rustls errors in the source chain
    /// and, for the few failures that carry neither, the fixed texts tokio-postgres uses.
    fn classify(&self, error: &tokio_postgres::Error) -> ConnectFailure {
        let origin = self.origin();
        if let Some(db) = error.as_db_error() {
            return self.server_failure(db.code().code(), db.message());
        }

        let mut cause = error.source();
        while let Some(err) = cause {
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return self.tls_failure(tls);
            }
            if let Some(io) = err.downcast_ref::<io::Error>() {
                // tokio-rustls wraps the rustls error in an io::Error, whose `source()` skips it.
                if let Some(tls) = io
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    return self.tls_failure(tls);
                }
                if let Some(failure) = io_failure(io, self.config.get_connect_timeout()) {
                    return failure;
                }
            }
            match err.to_string().as_str() {
                "server does not support TLS" => {
                    return ConnectFailure::TlsNotSupported {
                        ssl_mode: self.ssl_mode,
                    };
                }
                "password missing" => return ConnectFailure::PasswordMissing { origin },
                _ => {}
            }
            cause = err.source();
        }

        if error.is_closed() {
            return ConnectFailure::Reset;
        }
        match error.to_string().as_str() {
            "error performing TLS handshake" => ConnectFailure::TlsHandshake {
                ssl_mode: self.ssl_mode,
            },
            "authentication error" => ConnectFailure::AuthenticationExchange { origin },
            _ => ConnectFailure::Other,
        }
    }

    /// What a server's refusal during connection setup means, from its SQLSTATE (and, where
    /// one code covers several causes, its message).
    pub(crate) fn server_failure(&self, code: &str, message: &str) -> ConnectFailure {
        let origin = self.origin();
        let user = self.user();
        if code == SqlState::INVALID_PASSWORD.code() {
            ConnectFailure::PasswordRejected { origin }
        } else if code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION.code()
            && message.contains("replication connection")
        {
            ConnectFailure::ReplicationNotAllowed { user }
        } else if code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION.code() {
            ConnectFailure::AccessDenied { origin }
        } else if code == SqlState::INSUFFICIENT_PRIVILEGE.code()
            && (message.contains("WAL sender") || message.contains("walsender"))
        {
            ConnectFailure::NoReplicationPrivilege { user }
        } else if code == SqlState::UNDEFINED_DATABASE.code() {
            ConnectFailure::NoSuchDatabase
        } else if code == SqlState::CANNOT_CONNECT_NOW.code() {
            ConnectFailure::StartingUp
        } else if code == SqlState::ADMIN_SHUTDOWN.code() || code == SqlState::CRASH_SHUTDOWN.code()
        {
            ConnectFailure::ShuttingDown
        } else if code == SqlState::TOO_MANY_CONNECTIONS.code() {
            ConnectFailure::TooManyConnections
        } else {
            ConnectFailure::Rejected
        }
    }

    /// What a failed TLS handshake means for the user: which certificate check failed, if any.
    pub(crate) fn tls_failure(&self, error: &rustls::Error) -> ConnectFailure {
        let ssl_mode = self.ssl_mode;
        let rustls::Error::InvalidCertificate(problem) = error else {
            return ConnectFailure::TlsHandshake { ssl_mode };
        };
        match problem {
            CertificateError::UnknownIssuer => ConnectFailure::CertificateUntrusted {
                ssl_mode,
                ca_file: self.ca_file.clone(),
            },
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                ConnectFailure::CertificateWrongHost {
                    ssl_mode,
                    host: self.host(),
                }
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                ConnectFailure::CertificateExpired { ssl_mode }
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                ConnectFailure::CertificateNotYetValid { ssl_mode }
            }
            _ => ConnectFailure::CertificateInvalid {
                ssl_mode,
                ca_file: self.ca_file.clone(),
            },
        }
    }
}

/// What a socket error while connecting means, if it is one of the well-known ones.
pub(crate) fn io_failure(
    error: &io::Error,
    connect_timeout: Option<&Duration>,
) -> Option<ConnectFailure> {
    use io::ErrorKind as K;
    Some(match error.kind() {
        K::ConnectionRefused => ConnectFailure::Refused,
        K::TimedOut => ConnectFailure::TimedOut {
            after: connect_timeout.copied().unwrap_or_default(),
        },
        K::ConnectionReset
        | K::ConnectionAborted
        | K::BrokenPipe
        | K::UnexpectedEof
        | K::NotConnected => ConnectFailure::Reset,
        K::NetworkUnreachable | K::HostUnreachable | K::NetworkDown | K::AddrNotAvailable => {
            ConnectFailure::Unreachable
        }
        // Only unix sockets fail this way: TCP has no files.
        K::NotFound => ConnectFailure::NoSocket,
        K::PermissionDenied => ConnectFailure::SocketPermission,
        _ => {
            // The resolver's errors have no stable kind; std and tokio-postgres give these texts.
            let text = error.to_string();
            if text.contains("failed to lookup address information")
                || text.contains("could not resolve any addresses")
            {
                if text.to_ascii_lowercase().contains("temporary") {
                    ConnectFailure::DnsTemporary
                } else {
                    ConnectFailure::UnknownHost
                }
            } else {
                return None;
            }
        }
    })
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbUrl")
            .field("role", &self.role)
            .field("url", &self.redacted)
            .field("ssl_mode", &self.ssl_mode)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Where a connection made by hand goes (see [`DbUrl::endpoint_to_dial`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// A unix socket file, `<dir>/.s.PGSQL.<port>`.
    Unix {
        /// The socket file.
        path: PathBuf,
    },
    /// A TCP host.
    Tcp {
        /// The host name or IP address: resolved unless `hostaddr` is given, and always the
        /// name TLS checks the certificate against.
        host: String,
        /// Where to connect instead of resolving `host`.
        hostaddr: Option<std::net::IpAddr>,
        /// The port.
        port: u16,
    },
}

/// TCP keepalive probing, as libpq's `keepalives_*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keepalives {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes; the system's default if `None`.
    pub interval: Option<Duration>,
    /// Unanswered probes before the connection is dropped; the system's default if `None`.
    pub retries: Option<u32>,
}

/// The TCP options a URL asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpSettings {
    /// Keepalive probing, unless `keepalives=0`.
    pub keepalives: Option<Keepalives>,
    /// Linux's `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged.
    pub user_timeout: Option<Duration>,
}

/// Why a database URL could not be read. None of these repeat any part of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlProblem {
    /// Nothing was given.
    Empty,
    /// Neither a postgres:// URL nor key=value settings.
    NotAUrl,
    /// A key=value setting or query parameter without `=`.
    MissingEquals,
    /// A key=value setting with nothing after `=`.
    MissingValue,
    /// A quoted value without its closing quote.
    UnterminatedQuote,
    /// A setting name with characters no setting has.
    BadSettingName,
    /// A `%` escape that is malformed or not UTF-8.
    BadPercentEncoding,
    /// A port that is not a number from 1 to 65535.
    BadPort,
    /// An `@` after the credentials, usually from a password with an unescaped `@`.
    AtInHost,
    /// An IPv6 address opened with `[` but not closed.
    UnclosedBracket,
    /// No user in the URL and no user name for this process.
    NoUser,
}

impl fmt::Display for UrlProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UrlProblem::Empty => "it is empty",
            UrlProblem::NotAUrl => {
                "expected a postgres:// or postgresql:// URL, or key=value settings such as \
                 host=db.example.com dbname=bite"
            }
            UrlProblem::MissingEquals => "a setting has no '=' (settings are written key=value)",
            UrlProblem::MissingValue => {
                "a setting has no value after '=' (write key='' for an empty value)"
            }
            UrlProblem::UnterminatedQuote => "a quoted value has no closing quote",
            UrlProblem::BadSettingName => "a setting name may contain only letters, digits and '_'",
            UrlProblem::BadPercentEncoding => {
                "a %-escape is not two hex digits or does not decode to UTF-8 text"
            }
            UrlProblem::BadPort => {
                "a port is not a number from 1 to 65535 (if the password contains '/', '?' or \
                 '@', percent-encode them as %2F, %3F and %40)"
            }
            UrlProblem::AtInHost => {
                "the host part contains '@': percent-encode '@' in the user name or password \
                 as %40"
            }
            UrlProblem::UnclosedBracket => "an IPv6 address opened with '[' has no closing ']'",
            UrlProblem::NoUser => {
                "it names no user and this process's user name is unknown: add one, as in \
                 postgres://USER@HOST/DBNAME"
            }
        })
    }
}

/// What went wrong while connecting, as the user should hear it: each names the cause and what
/// to do. The server's or the system's own words follow in the error's source chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens on that port.
    Refused,
    /// No socket file in the unix socket directory.
    NoSocket,
    /// The socket file exists but this user may not use it.
    SocketPermission,
    /// No complete answer within the time limit.
    TimedOut {
        /// How long bite-sync waited.
        after: Duration,
    },
    /// DNS says the host name does not exist.
    UnknownHost,
    /// DNS could not answer right now.
    DnsTemporary,
    /// No route to the host.
    Unreachable,
    /// The server or something in between closed the connection during setup.
    Reset,
    /// SQLSTATE 28P01: wrong password (or no such user).
    PasswordRejected {
        /// Where the URL came from.
        origin: String,
    },
    /// The server wants a password and the URL has none.
    PasswordMissing {
        /// Where the URL came from.
        origin: String,
    },
    /// SQLSTATE 28000: pg_hba.conf or the role does not allow this login.
    AccessDenied {
        /// Where the URL came from.
        origin: String,
    },
    /// The SASL/SCRAM exchange failed on the client side.
    AuthenticationExchange {
        /// Where the URL came from.
        origin: String,
    },
    /// SQLSTATE 28000 for a physical replication connection: no `replication` line in
    /// pg_hba.conf lets it in. (Logical replication connections, `replication=database`, match
    /// pg_hba.conf by database like any other and get [`ConnectFailure::AccessDenied`].)
    ReplicationNotAllowed {
        /// The user that asked.
        user: String,
    },
    /// SQLSTATE 42501 on a replication connection: the role lacks the REPLICATION attribute.
    NoReplicationPrivilege {
        /// The user that asked.
        user: String,
    },
    /// The server asks for an authentication method bite-sync does not implement.
    UnsupportedAuthentication {
        /// The method's name, as PostgreSQL calls it.
        method: String,
    },
    /// `channel_binding=require`, but the exchange the server offered has none.
    ChannelBindingUnavailable,
    /// SQLSTATE 3D000.
    NoSuchDatabase,
    /// SQLSTATE 57P03: starting up or in recovery.
    StartingUp,
    /// SQLSTATE 57P01/57P02: shutting down.
    ShuttingDown,
    /// SQLSTATE 53300: max_connections reached.
    TooManyConnections,
    /// The server declined TLS, which the sslmode requires.
    TlsNotSupported {
        /// The sslmode in effect.
        ssl_mode: SslMode,
    },
    /// The certificate does not lead to a trusted root.
    CertificateUntrusted {
        /// The sslmode in effect.
        ssl_mode: SslMode,
        /// The CA file that was trusted, if any.
        ca_file: Option<PathBuf>,
    },
    /// The certificate does not name the host.
    CertificateWrongHost {
        /// The sslmode in effect.
        ssl_mode: SslMode,
        /// The host name that was checked.
        host: String,
    },
    /// The certificate has expired.
    CertificateExpired {
        /// The sslmode in effect.
        ssl_mode: SslMode,
    },
    /// The certificate is not valid yet.
    CertificateNotYetValid {
        /// The sslmode in effect.
        ssl_mode: SslMode,
    },
    /// The certificate was rejected for another reason.
    CertificateInvalid {
        /// The sslmode in effect.
        ssl_mode: SslMode,
        /// The CA file that was trusted, if any.
        ca_file: Option<PathBuf>,
    },
    /// The TLS handshake failed for a reason other than the certificate.
    TlsHandshake {
        /// The sslmode in effect.
        ssl_mode: SslMode,
    },
    /// Something else answers on that port: it does not speak PostgreSQL's protocol.
    NotPostgres {
        /// It answered HTTP: a web server.
        http: bool,
    },
    /// The server refused with another SQLSTATE.
    Rejected,
    /// Anything else.
    Other,
}

const SKIP_VERIFICATION_HINT: &str = "or use sslmode=require to skip verification";

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectFailure::Refused => f.write_str(
                "connection refused: is PostgreSQL running there and accepting TCP connections?",
            ),
            ConnectFailure::NoSocket => f.write_str(
                "no PostgreSQL socket there: is the server running, and is this its socket \
                 directory?",
            ),
            ConnectFailure::SocketPermission => f.write_str(
                "permission denied on the socket: run bite-sync as a user allowed to use it",
            ),
            ConnectFailure::TimedOut { after } => write!(
                f,
                "timed out after {} s: check the host and port, and that no firewall blocks the \
                 connection (connect_timeout=SECONDS in the URL changes the limit)",
                after.as_secs_f32()
            ),
            ConnectFailure::UnknownHost => {
                f.write_str("the host name could not be found: check the host in the URL")
            }
            ConnectFailure::DnsTemporary => f.write_str(
                "the host name could not be looked up right now (temporary DNS failure): check \
                 this machine's network connection",
            ),
            ConnectFailure::Unreachable => f.write_str(
                "the network or host is unreachable: check this machine's network connection",
            ),
            ConnectFailure::Reset => f.write_str(
                "the connection was closed before it was ready: check that the port belongs to \
                 PostgreSQL, and look at the server's log",
            ),
            ConnectFailure::PasswordRejected { origin } => write!(
                f,
                "password authentication failed: check the user and password in the URL \
                 ({origin})"
            ),
            ConnectFailure::PasswordMissing { origin } => write!(
                f,
                "the server asks for a password but the URL has none: add it as \
                 postgres://USER:PASSWORD@HOST/DBNAME ({origin})"
            ),
            ConnectFailure::AccessDenied { origin } => write!(
                f,
                "the server does not let this user in: check the user in the URL ({origin}) and \
                 the server's pg_hba.conf; if it only allows TLS (hostssl), use sslmode=require"
            ),
            ConnectFailure::AuthenticationExchange { origin } => write!(
                f,
                "authentication failed: check the password in the URL ({origin}) and the \
                 server's authentication method"
            ),
            ConnectFailure::ReplicationNotAllowed { user } => write!(
                f,
                "the server's pg_hba.conf does not allow replication connections for user \
                 \"{user}\" from this host: add a line such as `host replication {user} \
                 <this host's address>/32 scram-sha-256` (the database `all` does not cover \
                 physical replication) and reload the server"
            ),
            ConnectFailure::NoReplicationPrivilege { user } => write!(
                f,
                "user \"{user}\" may not open replication connections: run `ALTER ROLE \
                 \"{user}\" REPLICATION` as a superuser"
            ),
            ConnectFailure::UnsupportedAuthentication { method } => write!(
                f,
                "the server asks for {method} authentication, which bite-sync does not support: \
                 use scram-sha-256, md5, password or trust for this user in the server's \
                 pg_hba.conf"
            ),
            ConnectFailure::ChannelBindingUnavailable => f.write_str(
                "channel_binding=require, but the server offered no channel binding: connect \
                 with TLS (sslmode=require or stricter) to a server using scram-sha-256, or \
                 drop channel_binding=require",
            ),
            ConnectFailure::NoSuchDatabase => f.write_str(
                "the database does not exist: create it (createdb) or fix the database name in \
                 the URL",
            ),
            ConnectFailure::StartingUp => {
                f.write_str("the server is starting up: try again in a moment")
            }
            ConnectFailure::ShuttingDown => {
                f.write_str("the server is shutting down: try again once it is back")
            }
            ConnectFailure::TooManyConnections => f.write_str(
                "the server has no free connection slots: close idle clients or raise \
                 max_connections",
            ),
            ConnectFailure::TlsNotSupported { ssl_mode } => write!(
                f,
                "the server does not support TLS, but sslmode={ssl_mode} requires it: turn on \
                 ssl in the server's postgresql.conf, or use sslmode=prefer only on a network \
                 you trust"
            ),
            ConnectFailure::CertificateUntrusted { ssl_mode, ca_file } => {
                write!(
                    f,
                    "the server's TLS certificate was rejected (sslmode={ssl_mode}): "
                )?;
                match ca_file {
                    Some(path) => write!(
                        f,
                        "it is not signed by the CA in {}: point sslrootcert=/path/ca.pem in the \
                         URL (or ca_file in the config) at the CA that signed the server's \
                         certificate, or use sslmode=require without a CA file to skip \
                         verification",
                        path.display()
                    ),
                    None => write!(
                        f,
                        "it is not signed by a CA this machine trusts: if the server uses its own \
                         CA, add sslrootcert=/path/ca.pem to the URL or set ca_file in the \
                         config, {SKIP_VERIFICATION_HINT}"
                    ),
                }
            }
            ConnectFailure::CertificateWrongHost { ssl_mode, host } => write!(
                f,
                "the server's TLS certificate was rejected (sslmode={ssl_mode}): it is not \
                 issued for \"{host}\": connect using a host name the certificate lists, or use \
                 sslmode=verify-ca to check only the CA"
            ),
            ConnectFailure::CertificateExpired { ssl_mode } => write!(
                f,
                "the server's TLS certificate was rejected (sslmode={ssl_mode}): it has expired \
                 (or this machine's clock is wrong): the server needs a new certificate, \
                 {SKIP_VERIFICATION_HINT}"
            ),
            ConnectFailure::CertificateNotYetValid { ssl_mode } => write!(
                f,
                "the server's TLS certificate was rejected (sslmode={ssl_mode}): it is not valid \
                 yet: check this machine's clock"
            ),
            ConnectFailure::CertificateInvalid { ssl_mode, ca_file } => {
                write!(
                    f,
                    "the server's TLS certificate was rejected (sslmode={ssl_mode}): "
                )?;
                match ca_file {
                    Some(path) => write!(
                        f,
                        "it does not verify against the CA in {}: check sslrootcert in the URL \
                         or ca_file in the config, {SKIP_VERIFICATION_HINT}",
                        path.display()
                    ),
                    None => write!(
                        f,
                        "it does not verify: add sslrootcert=/path/ca.pem to the URL or set \
                         ca_file in the config, {SKIP_VERIFICATION_HINT}"
                    ),
                }
            }
            ConnectFailure::TlsHandshake { ssl_mode } => write!(
                f,
                "the TLS handshake failed (sslmode={ssl_mode}): check that host and port \
                 belong to a PostgreSQL server"
            ),
            ConnectFailure::NotPostgres { http: true } => f.write_str(
                "not a PostgreSQL server: something answering HTTP (a web server) listens on \
                 that port: check the host and port in the URL (PostgreSQL's default port is \
                 5432; on Railway, use the database's TCP proxy host and port, not a web \
                 domain)",
            ),
            ConnectFailure::NotPostgres { http: false } => f.write_str(
                "not a PostgreSQL server: what listens on that port does not speak PostgreSQL's \
                 protocol: check the host and port in the URL",
            ),
            ConnectFailure::Rejected => f.write_str("the server refused the connection"),
            ConnectFailure::Other => f.write_str("the connection failed"),
        }
    }
}

impl ConnectFailure {
    /// Whether waiting and trying again can succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            // The restaurant's uplink or the server going away for a while: the daemon should
            // ride these out.
            ConnectFailure::Refused
            | ConnectFailure::NoSocket
            | ConnectFailure::TimedOut { .. }
            | ConnectFailure::DnsTemporary
            | ConnectFailure::Unreachable
            | ConnectFailure::Reset
            | ConnectFailure::StartingUp
            | ConnectFailure::ShuttingDown
            | ConnectFailure::TooManyConnections => true,
            // Someone has to fix a URL, a password, a database or a certificate; retrying would
            // only hide that (and repeated bad passwords can trip fail2ban-style lockouts).
            ConnectFailure::SocketPermission
            | ConnectFailure::UnknownHost
            | ConnectFailure::PasswordRejected { .. }
            | ConnectFailure::PasswordMissing { .. }
            | ConnectFailure::AccessDenied { .. }
            | ConnectFailure::AuthenticationExchange { .. }
            | ConnectFailure::ReplicationNotAllowed { .. }
            | ConnectFailure::NoReplicationPrivilege { .. }
            | ConnectFailure::UnsupportedAuthentication { .. }
            | ConnectFailure::ChannelBindingUnavailable
            | ConnectFailure::NoSuchDatabase
            | ConnectFailure::TlsNotSupported { .. }
            | ConnectFailure::CertificateUntrusted { .. }
            | ConnectFailure::CertificateWrongHost { .. }
            | ConnectFailure::CertificateExpired { .. }
            | ConnectFailure::CertificateNotYetValid { .. }
            | ConnectFailure::CertificateInvalid { .. }
            | ConnectFailure::TlsHandshake { .. }
            | ConnectFailure::NotPostgres { .. }
            | ConnectFailure::Rejected
            | ConnectFailure::Other => false,
        }
    }

    fn is_tls(&self) -> bool {
        matches!(
            self,
            ConnectFailure::TlsHandshake { .. }
                | ConnectFailure::CertificateUntrusted { .. }
                | ConnectFailure::CertificateWrongHost { .. }
                | ConnectFailure::CertificateExpired { .. }
                | ConnectFailure::CertificateNotYetValid { .. }
                | ConnectFailure::CertificateInvalid { .. }
        )
    }
}

/// Why a database URL could not be used or a connection not be made. Messages name the role,
/// host, port, database and user, never the password or the URL.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL could not be read.
    #[error("the {role} URL is not valid: {problem}")]
    InvalidUrl {
        /// Which side.
        role: Role,
        /// What is wrong.
        problem: UrlProblem,
    },
    /// tokio-postgres rejected a setting's value; its error names the setting.
    #[error("the {role} URL has a setting with a value bite-sync cannot use")]
    BadSettingValue {
        /// Which side.
        role: Role,
        /// tokio-postgres's parse error, naming the setting.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A setting no PostgreSQL client knows (a typo, usually).
    #[error(
        "the {role} URL has an unknown setting \"{name}\"{}",
        .near.map(|n| format!("; did you mean {n}?")).unwrap_or_default()
    )]
    UnknownSetting {
        /// Which side.
        role: Role,
        /// The setting's name (never its value).
        name: String,
        /// The known setting closest to it.
        near: Option<&'static str>,
    },
    /// A libpq setting bite-sync does not implement.
    #[error("the {role} URL sets {name}, which bite-sync does not support: remove it")]
    UnsupportedSetting {
        /// Which side.
        role: Role,
        /// The setting's name.
        name: String,
    },
    /// `sslmode` has a value libpq does not know.
    #[error(
        "invalid sslmode \"{value}\" in the {role} URL: use one of disable, allow, prefer, \
         require, verify-ca, verify-full"
    )]
    InvalidSslMode {
        /// Which side.
        role: Role,
        /// The value given.
        value: String,
    },
    /// `sslrootcert=system` with a mode that does not check the host name.
    #[error(
        "sslrootcert=system in the {role} URL needs sslmode=verify-full, not sslmode={ssl_mode}: \
         trusting public CAs without checking the host name proves nothing"
    )]
    WeakSslModeWithSystemRoots {
        /// Which side.
        role: Role,
        /// The weaker mode given.
        ssl_mode: SslMode,
    },
    /// The CA file could not be read.
    #[error("could not read the CA file {} for the {role}: check sslrootcert in the URL or ca_file in the config", .path.display())]
    CaFileRead {
        /// Which side.
        role: Role,
        /// The CA file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The CA file has a malformed PEM block.
    #[error("the CA file {} for the {role} is not valid PEM", .path.display())]
    CaFileMalformed {
        /// Which side.
        role: Role,
        /// The CA file.
        path: PathBuf,
        /// The PEM decoding error.
        #[source]
        source: io::Error,
    },
    /// The CA file holds no certificate.
    #[error(
        "the CA file {} for the {role} holds no certificate: it should contain one or more \
         -----BEGIN CERTIFICATE----- blocks", .path.display()
    )]
    CaFileEmpty {
        /// Which side.
        role: Role,
        /// The CA file.
        path: PathBuf,
    },
    /// A certificate in the CA file cannot serve as a trust root.
    #[error("the CA file {} for the {role} holds a certificate that cannot be used as a trusted root", .path.display())]
    CaFileInvalid {
        /// Which side.
        role: Role,
        /// The CA file.
        path: PathBuf,
        /// rustls's reason.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the TLS configuration (no roots, or no protocol version in common with the
    /// crypto provider).
    #[error("could not set up TLS for the {role}")]
    TlsSetup {
        /// Which side.
        role: Role,
        /// rustls's reason.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Connecting failed.
    #[error(
        "could not connect to the {role} at {endpoint} (database \"{dbname}\", user \"{user}\"): {failure}"
    )]
    Connect {
        /// Which side.
        role: Role,
        /// host:port, or the unix socket file.
        endpoint: String,
        /// The database.
        dbname: String,
        /// The user.
        user: String,
        /// What went wrong, with advice.
        failure: ConnectFailure,
        /// The underlying error: tokio-postgres's, the socket's, TLS's or the server's; absent
        /// when bite-sync's own deadline expired.
        #[source]
        source: Option<ConnectCause>,
    },
}

/// The underlying cause of a failed connection, whichever layer it came from. It reads as the
/// error it holds (same text, same sources); boxed once more only to keep [`ConnectError`]
/// small enough to return by value.
pub struct ConnectCause(Box<BoxError>);

impl ConnectCause {
    /// The error itself, for downcasting (`tokio_postgres::Error`, `io::Error`, ...).
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &**self.0
    }
}

impl fmt::Debug for ConnectCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for ConnectCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for ConnectCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl ConnectError {
    /// Whether retrying later can succeed with nothing changed: connection refused, timeouts,
    /// resets, temporary DNS failures, a server starting or shutting down. Bad URLs, wrong
    /// passwords, missing databases and rejected certificates are not.
    pub fn is_transient(&self) -> bool {
        self.failure().is_some_and(ConnectFailure::is_transient)
    }

    /// What went wrong while connecting, if it got that far.
    pub fn failure(&self) -> Option<&ConnectFailure> {
        match self {
            ConnectError::Connect { failure, .. } => Some(failure),
            _ => None,
        }
    }

    /// Whether the TLS handshake failed, which `sslmode=prefer` answers by retrying in plain.
    pub(crate) fn is_tls_failure(&self) -> bool {
        self.failure().is_some_and(ConnectFailure::is_tls)
    }
}

/// Accepts any certificate, as libpq's `prefer` and `require` do without a CA file. The
/// handshake signatures are still checked, so the server must hold the key of the certificate it
/// presents.
#[derive(Debug)]
struct NoCertificateCheck {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// libpq's `verify-ca`: the chain must lead to a trusted root, the host name may differ.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // WebPkiServerVerifier checks the chain (and revocation) before the name, so a name
            // error means everything verify-ca cares about has already passed.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Read on every connect rather than cached, so a rotated CA file takes effect on reconnect.
async fn load_ca_file(role: Role, path: &Path) -> Result<RootCertStore, ConnectError> {
    let pem = tokio::fs::read(path)
        .await
        .map_err(|source| ConnectError::CaFileRead {
            role,
            path: path.to_owned(),
            source,
        })?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|source| ConnectError::CaFileMalformed {
            role,
            path: path.to_owned(),
            source,
        })?;
        roots
            .add(cert)
            .map_err(|source| ConnectError::CaFileInvalid {
                role,
                path: path.to_owned(),
                source,
            })?;
    }
    if roots.is_empty() {
        return Err(ConnectError::CaFileEmpty {
            role,
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// The system's roots plus the bundled Mozilla roots, loaded once: reading the system store
/// walks directories, and a daemon reconnects often.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::debug!(%error, "skipping part of the system certificate store");
            }
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            tracing::debug!(added, ignored, "loaded system root certificates");
            // Minimal containers often have no CA bundle; the bundled roots keep verify-full
            // working against public CAs there.
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            Arc::new(roots)
        })
        .clone()
}

/// libpq's compiled-in default socket directory: Debian-family builds use /var/run/postgresql,
/// upstream builds /tmp.
fn default_socket_dir() -> &'static str {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql"
    } else {
        "/tmp"
    }
}

fn process_user() -> Option<String> {
    ["USER", "LOGNAME"]
        .into_iter()
        .filter_map(|name| std::env::var(name).ok())
        .find(|user| !user.is_empty())
}

/// The settings of a URL or key=value string, in order, and the input as written with the
/// password replaced by `***`.
#[derive(Debug)]
struct ParsedText {
    params: Vec<(String, String)>,
    redacted: String,
}

fn parse_text(text: &str) -> Result<ParsedText, UrlProblem> {
    if text.is_empty() {
        return Err(UrlProblem::Empty);
    }
    for scheme in SCHEMES {
        if let Some(rest) = text.strip_prefix(scheme) {
            return parse_url(scheme, rest);
        }
    }
    // Some other scheme (`mysql://...`): a URL, but not ours. Only a scheme at the very
    // start counts; `://` inside a quoted key=value password is just text.
    if let Some(at) = text.find("://") {
        let scheme = &text[..at];
        let is_scheme = scheme
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if is_scheme {
            return Err(UrlProblem::NotAUrl);
        }
    }
    parse_key_value(text)
}

/// Splits a URL the way libpq does: `user:password@` ends at the first `@` before any `/` or
/// `?`; hosts are comma-separated with optional ports and `[ipv6]`; then `/dbname` and
/// `?key=value&...`. Query settings come after the URL's parts, so they override them.
fn parse_url(scheme: &str, rest: &str) -> Result<ParsedText, UrlProblem> {
    let mut params: Vec<(String, String)> = Vec::new();
    let mut redacted = String::from(scheme);

    let rest = match rest.find(['@', '/', '?']) {
        Some(at) if rest.as_bytes()[at] == b'@' => {
            let userinfo = &rest[..at];
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                params.push(("user".into(), percent_decode(user)?));
            }
            redacted.push_str(user);
            if let Some(password) = password {
                params.push(("password".into(), percent_decode(password)?));
                redacted.push_str(":***");
            }
            redacted.push('@');
            &rest[at + 1..]
        }
        _ => rest,
    };

    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (hostspec, rest) = rest.split_at(host_end);
    // A second '@' means an unescaped '@' in the credentials, and whatever follows the first one
    // (part of the password) would be taken for a host name and shown in messages.
    if hostspec.contains('@') {
        return Err(UrlProblem::AtInHost);
    }
    redacted.push_str(hostspec);
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for chunk in hostspec.split(',') {
            let (host, port) = match chunk.strip_prefix('[') {
                Some(inner) => {
                    let close = inner.find(']').ok_or(UrlProblem::UnclosedBracket)?;
                    let after = &inner[close + 1..];
                    let port = match after.strip_prefix(':') {
                        Some(port) => Some(port),
                        None if after.is_empty() => None,
                        None => return Err(UrlProblem::BadPort),
                    };
                    (&inner[..close], port)
                }
                None => match chunk.split_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (chunk, None),
                },
            };
            hosts.push(percent_decode(host)?);
            ports.push(match port {
                Some(port) => checked_port(percent_decode(port)?)?,
                None => String::new(),
            });
        }
        if hosts.iter().any(|host| !host.is_empty()) {
            params.push(("host".into(), hosts.join(",")));
        }
        if ports.iter().any(|port| !port.is_empty()) {
            params.push(("port".into(), ports.join(",")));
        }
    }

    let rest = match rest.strip_prefix('/') {
        Some(path) => {
            let end = path.find('?').unwrap_or(path.len());
            let dbname = &path[..end];
            redacted.push('/');
            redacted.push_str(dbname);
            if !dbname.is_empty() {
                params.push(("dbname".into(), percent_decode(dbname)?));
            }
            &path[end..]
        }
        None => rest,
    };

    if let Some(query) = rest.strip_prefix('?') {
        let mut separator = '?';
        for setting in query.split('&').filter(|setting| !setting.is_empty()) {
            let (raw_key, raw_value) = setting.split_once('=').ok_or(UrlProblem::MissingEquals)?;
            let key = checked_key(percent_decode(raw_key)?)?;
            let value = percent_decode(raw_value)?;
            redacted.push(separator);
            separator = '&';
            redacted.push_str(raw_key);
            redacted.push('=');
            redacted.push_str(if key == "password" { "***" } else { raw_value });
            params.push((key, value));
        }
    }

    Ok(ParsedText { params, redacted })
}

/// Reads libpq's `key = value` settings: values may be single-quoted, and a backslash escapes
/// the next character in either form (the same rules tokio-postgres applies).
fn parse_key_value(text: &str) -> Result<ParsedText, UrlProblem> {
    let mut params = Vec::new();
    let mut chars = text.chars().peekable();
    let skip_whitespace = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_whitespace(&mut chars);
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|&c| !c.is_whitespace() && c != '=') {
            key.push(c);
        }
        skip_whitespace(&mut chars);
        if chars.next() != Some('=') {
            // A lone word is most likely a host name or a mistyped URL, not a broken setting.
            return Err(if params.is_empty() {
                UrlProblem::NotAUrl
            } else {
                UrlProblem::MissingEquals
            });
        }
        skip_whitespace(&mut chars);
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(UrlProblem::UnterminatedQuote),
                    Some('\'') => break,
                    Some('\\') => value.push(chars.next().ok_or(UrlProblem::UnterminatedQuote)?),
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(UrlProblem::MissingValue);
            }
        }
        params.push((checked_key(key)?, value));
    }

    let redacted = params
        .iter()
        .map(|(key, value)| {
            if key == "password" {
                format!("{key}=***")
            } else if value.is_empty()
                || value
                    .chars()
                    .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
            {
                format!("{key}='{}'", escape_conninfo(value))
            } else {
                format!("{key}={value}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    Ok(ParsedText { params, redacted })
}

/// The settings tokio-postgres takes, plus the two bite-sync handles itself.
const SETTINGS: [&str; 21] = [
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslrootcert",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
    "replication",
];

/// libpq settings bite-sync does not implement (named as such rather than as unknown).
const LIBPQ_ONLY: [&str; 22] = [
    "passfile",
    "require_auth",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "fallback_application_name",
    "requiressl",
    "client_encoding",
    "hostaddrs",
];

/// A setting name is one bite-sync knows, or an error naming it (setting names are never
/// secret; their values may be) with the closest known name.
fn check_setting_name(role: Role, key: &str) -> Result<(), ConnectError> {
    if key == "replication" {
        // bite-sync opens its replication connections itself.
        return Err(ConnectError::UnsupportedSetting {
            role,
            name: key.to_string(),
        });
    }
    if SETTINGS.contains(&key) {
        return Ok(());
    }
    if LIBPQ_ONLY.contains(&key) {
        return Err(ConnectError::UnsupportedSetting {
            role,
            name: key.to_string(),
        });
    }
    let near = SETTINGS
        .iter()
        .chain(LIBPQ_ONLY.iter())
        .filter(|known| **known != "replication")
        .map(|known| {
            (
                strsim::levenshtein(&key.to_ascii_lowercase(), known),
                *known,
            )
        })
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, known)| known);
    Err(ConnectError::UnknownSetting {
        role,
        name: key.to_string(),
        near,
    })
}

fn checked_key(key: String) -> Result<String, UrlProblem> {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(key)
    } else {
        Err(UrlProblem::BadSettingName)
    }
}

fn checked_port(port: String) -> Result<String, UrlProblem> {
    match port.parse::<u16>() {
        _ if port.is_empty() => Ok(port),
        Ok(number) if number != 0 => Ok(port),
        _ => Err(UrlProblem::BadPort),
    }
}

fn escape_conninfo(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

fn percent_decode(text: &str) -> Result<String, UrlProblem> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let digit = |at: usize| {
                bytes
                    .get(at)
                    .and_then(|&b| char::from(b).to_digit(16))
                    .ok_or(UrlProblem::BadPercentEncoding)
            };
            // Both digits are below 16, so the byte cannot overflow.
            out.push((digit(i + 1)? * 16 + digit(i + 2)?) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlProblem::BadPercentEncoding)
}

/// Percent-encodes `text` for a URL part, leaving only RFC 3986's unreserved characters
/// as they are.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mirror(url: &str) -> DbUrl {
        DbUrl::parse(Role::Mirror, url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn password(url: &DbUrl) -> Option<String> {
        url.config
            .get_password()
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
    }

    fn url_problem(url: &str) -> UrlProblem {
        match DbUrl::parse(Role::Source, url) {
            Err(ConnectError::InvalidUrl { problem, .. }) => problem,
            other => panic!("{url}: expected an invalid-URL error, got {other:?}"),
        }
    }

    /// The whole chain, as main.rs prints it with `{:#}`.
    fn chain(error: &dyn std::error::Error) -> String {
        let mut text = error.to_string();
        let mut cause = error.source();
        while let Some(err) = cause {
            text.push_str(": ");
            text.push_str(&err.to_string());
            cause = err.source();
        }
        text
    }

    #[test]
    fn url_with_password_is_parsed_and_redacted() {
        let url = mirror("postgres://app:s3cret@db.example.com:5432/bite?sslmode=require");
        assert_eq!(url.role(), Role::Mirror);
        assert_eq!(url.host(), "db.example.com");
        assert_eq!(url.port(), 5432);
        assert_eq!(url.dbname(), "bite");
        assert_eq!(url.user(), "app");
        assert_eq!(url.ssl_mode(), SslMode::Require);
        assert_eq!(password(&url).as_deref(), Some("s3cret"));
        assert_eq!(
            url.to_string(),
            "postgres://app:***@db.example.com:5432/bite?sslmode=require"
        );
        let debug = format!("{url:?}");
        assert!(
            debug.contains("postgres://app:***@db.example.com:5432/bite"),
            "{debug}"
        );
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn url_without_password_is_shown_as_written() {
        let url = mirror("postgresql://app@db.example.com/bite");
        assert_eq!(password(&url), None);
        assert_eq!(url.port(), 5432);
        assert_eq!(url.ssl_mode(), SslMode::Prefer, "libpq's default");
        assert_eq!(url.to_string(), "postgresql://app@db.example.com/bite");
    }

    #[test]
    fn percent_encoded_parts_are_decoded() {
        let url = mirror("postgres://app%2Bx:p%40ss%3Aw%2Fo%25rd@db.example.com:6543/my%20db");
        assert_eq!(url.user(), "app+x");
        assert_eq!(password(&url).as_deref(), Some("p@ss:w/o%rd"));
        assert_eq!(url.dbname(), "my db");
        assert_eq!(url.port(), 6543);
        assert_eq!(
            url.to_string(),
            "postgres://app%2Bx:***@db.example.com:6543/my%20db"
        );
    }

    #[test]
    fn password_in_the_query_is_redacted() {
        let url =
            mirror("postgres://db.example.com/bite?user=app&password=hunter2&sslmode=verify-full");
        assert_eq!(password(&url).as_deref(), Some("hunter2"));
        assert_eq!(url.user(), "app");
        assert_eq!(
            url.to_string(),
            "postgres://db.example.com/bite?user=app&password=***&sslmode=verify-full"
        );
    }

    #[test]
    fn every_sslmode_is_understood() {
        for (value, mode) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Prefer),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let url = mirror(&format!(
                "postgres://app@db.example.com/bite?sslmode={value}"
            ));
            assert_eq!(url.ssl_mode(), mode, "{value}");
            assert!(
                url.to_string().ends_with(&format!("sslmode={value}")),
                "{url}"
            );
            let url = mirror(&format!("host=db.example.com user=app sslmode={value}"));
            assert_eq!(url.ssl_mode(), mode, "key=value {value}");
        }
    }

    #[test]
    fn tls_verification_follows_libpq() {
        let url = |mode: &str| {
            mirror(&format!(
                "postgres://app@db.example.com/bite?sslmode={mode}"
            ))
        };
        let ca = PathBuf::from("/etc/bite/ca.pem");
        assert_eq!(url("disable").verification(), None);
        assert_eq!(url("prefer").verification(), Some(Verification::None));
        assert_eq!(url("require").verification(), Some(Verification::None));
        assert_eq!(
            url("require").with_ca_file(ca.clone()).verification(),
            Some(Verification::Chain),
            "libpq verifies the chain under require when a CA file is given"
        );
        assert_eq!(url("verify-ca").verification(), Some(Verification::Chain));
        assert_eq!(
            url("verify-full").verification(),
            Some(Verification::ChainAndName)
        );
        let socket = mirror("postgres://app@%2Fvar%2Frun%2Fpostgresql/bite?sslmode=verify-full");
        assert_eq!(socket.host(), "/var/run/postgresql");
        assert_eq!(socket.verification(), None, "no TLS over unix sockets");
    }

    #[test]
    fn unknown_sslmode_is_rejected_clearly() {
        let error = DbUrl::parse(
            Role::Mirror,
            "postgres://app:pw123456@db.example.com/bite?sslmode=verify_full",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid sslmode \"verify_full\" in the mirror URL: use one of disable, allow, \
             prefer, require, verify-ca, verify-full"
        );
        assert!(!error.is_transient());
    }

    #[test]
    fn sslrootcert_is_taken_out_and_wins_over_the_config_file() {
        let url = mirror(
            "postgres://app@db.example.com/bite?sslmode=verify-ca&sslrootcert=/etc/bite/railway.pem",
        );
        assert_eq!(url.ca_file(), Some(Path::new("/etc/bite/railway.pem")));
        assert_eq!(url.ssl_mode(), SslMode::VerifyCa);
        let url = url.with_ca_file(PathBuf::from("/other/ca.pem"));
        assert_eq!(url.ca_file(), Some(Path::new("/etc/bite/railway.pem")));
        assert!(
            url.to_string()
                .contains("sslrootcert=/etc/bite/railway.pem"),
            "{url}"
        );

        let url = mirror("postgres://app@db.example.com/bite?sslmode=verify-full")
            .with_ca_file(PathBuf::from("/other/ca.pem"));
        assert_eq!(url.ca_file(), Some(Path::new("/other/ca.pem")));
    }

    #[test]
    fn sslrootcert_system_means_public_roots_and_verify_full() {
        let url = mirror("postgres://app@db.example.com/bite?sslrootcert=system");
        assert_eq!(url.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(url.ca_file(), None);
        let url = url.with_ca_file(PathBuf::from("/other/ca.pem"));
        assert_eq!(url.ca_file(), None, "the URL chose the system roots");
        let error = DbUrl::parse(
            Role::Mirror,
            "postgres://app@db.example.com/bite?sslrootcert=system&sslmode=require",
        )
        .unwrap_err();
        assert!(
            matches!(error, ConnectError::WeakSslModeWithSystemRoots { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn key_value_strings_are_parsed_and_redacted() {
        let url = mirror(
            r"host=db.example.com port=6543 user=app password='it\'s a secret' dbname = bite sslmode=verify-full application_name='my app'",
        );
        assert_eq!(url.host(), "db.example.com");
        assert_eq!(url.port(), 6543);
        assert_eq!(url.user(), "app");
        assert_eq!(url.dbname(), "bite");
        assert_eq!(url.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(password(&url).as_deref(), Some("it's a secret"));
        assert_eq!(url.config.get_application_name(), Some("my app"));
        assert_eq!(
            url.to_string(),
            "host=db.example.com port=6543 user=app password=*** dbname=bite sslmode=verify-full application_name='my app'"
        );
    }

    #[test]
    fn libpq_defaults_are_filled_in() {
        let url = mirror("postgres://app@db.example.com");
        assert_eq!(
            url.dbname(),
            "app",
            "the database defaults to the user name"
        );
        assert_eq!(url.target(), "db.example.com:5432/app");
        assert_eq!(
            url.config.get_connect_timeout(),
            Some(&DEFAULT_CONNECT_TIMEOUT)
        );
        assert_eq!(url.config.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert!(url.config.get_keepalives());
        assert_eq!(url.config.get_application_name(), Some("bite-sync"));

        let url = mirror(
            "postgres://app@db.example.com/bite?connect_timeout=3&application_name=pos&keepalives_idle=30",
        );
        assert_eq!(
            url.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        assert_eq!(url.config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(url.config.get_application_name(), Some("pos"));

        let url = mirror("postgres://app@db.example.com/bite?connect_timeout=0");
        assert_eq!(
            url.config.get_connect_timeout(),
            None,
            "0 means wait forever in libpq"
        );
    }

    #[test]
    fn target_names_host_port_and_database_only() {
        assert_eq!(
            mirror("postgres://app:pw@db.example.com:6543/bite").target(),
            "db.example.com:6543/bite"
        );
        assert_eq!(
            mirror("postgres://app@[::1]:5433/bite").target(),
            "[::1]:5433/bite"
        );
        assert_eq!(mirror("postgres://app@[::1]/bite").host(), "::1");
        let many = mirror("postgres://app@a.example.com:5433,b.example.com:5434/bite");
        assert_eq!(many.target(), "a.example.com:5433/bite");
        assert_eq!(many.config.get_ports(), &[5433, 5434]);
        let socket = mirror("host=/tmp user=app dbname=bite port=5999");
        assert_eq!(socket.target(), "/tmp:5999/bite");
        assert_eq!(socket.endpoint(), "/tmp/.s.PGSQL.5999");
    }

    #[test]
    fn malformed_urls_are_explained_without_echoing_them() {
        let secret = "Sup3rS3cr3t";
        for (url, problem) in [
            ("", UrlProblem::Empty),
            ("db.example.com", UrlProblem::NotAUrl),
            (
                "mysql://app:Sup3rS3cr3t@db.example.com/bite",
                UrlProblem::NotAUrl,
            ),
            (
                "postgres://app:Sup3rS3cr3t@db.example.com:54x2/bite",
                UrlProblem::BadPort,
            ),
            (
                "postgres://app:Sup3rS3cr3t@db.example.com:70000/bite",
                UrlProblem::BadPort,
            ),
            (
                "postgres://app:Sup3r/S3cr3t@db.example.com/bite",
                UrlProblem::BadPort,
            ),
            (
                "postgres://app:Sup3r@S3cr3t@db.example.com/bite",
                UrlProblem::AtInHost,
            ),
            (
                "postgres://app:Sup3rS3cr3t%zz@db.example.com/bite",
                UrlProblem::BadPercentEncoding,
            ),
            (
                "postgres://app:Sup3rS3cr3t%+1@db.example.com/bite",
                UrlProblem::BadPercentEncoding,
            ),
            (
                "postgres://app:Sup3rS3cr3t@[::1/bite",
                UrlProblem::UnclosedBracket,
            ),
            (
                "postgres://app:Sup3rS3cr3t@db.example.com/bite?Sup3rS3cr3t",
                UrlProblem::MissingEquals,
            ),
            (
                "postgres://app@db.example.com/bite?bad%20key=1",
                UrlProblem::BadSettingName,
            ),
            (
                "host=db.example.com password='Sup3rS3cr3t",
                UrlProblem::UnterminatedQuote,
            ),
            ("host=db.example.com password=", UrlProblem::MissingValue),
            ("host=db.example.com Sup3rS3cr3t", UrlProblem::MissingEquals),
        ] {
            assert_eq!(url_problem(url), problem, "{url}");
            let error = DbUrl::parse(Role::Source, url).unwrap_err();
            let text = chain(&error);
            assert!(text.starts_with("the source URL is not valid: "), "{text}");
            assert!(!text.contains(secret) && !text.contains("Sup3r"), "{text}");
            assert!(!error.is_transient());
        }
    }

    #[test]
    fn an_unknown_setting_is_named_with_the_close_one() {
        for url in [
            "postgres://app:Sup3rS3cr3t@db.example.com/bite?sslmod=require",
            "host=db.example.com password=Sup3rS3cr3t sslmod=require",
        ] {
            let error = DbUrl::parse(Role::Source, url).unwrap_err();
            assert_eq!(
                chain(&error),
                "the source URL has an unknown setting \"sslmod\"; did you mean sslmode?"
            );
        }
        let error = DbUrl::parse(Role::Mirror, "postgres://db/bite?conect_timeout=5").unwrap_err();
        assert!(
            chain(&error).ends_with("did you mean connect_timeout?"),
            "{error}"
        );
        let error = DbUrl::parse(Role::Mirror, "postgres://db/bite?zzzzzz=1").unwrap_err();
        assert_eq!(
            chain(&error),
            "the mirror URL has an unknown setting \"zzzzzz\""
        );
    }

    #[test]
    fn settings_tokio_postgres_rejects_are_named_without_values() {
        let error = DbUrl::parse(
            Role::Mirror,
            "postgres://app:Sup3rS3cr3t@db.example.com/bite?sslcert=/x.pem",
        )
        .unwrap_err();
        assert!(
            matches!(error, ConnectError::UnsupportedSetting { .. }),
            "{error:?}"
        );
        let text = chain(&error);
        assert!(text.contains("sslcert"), "the setting is named: {text}");
        assert!(!text.contains("Sup3rS3cr3t"), "{text}");

        let error = DbUrl::parse(
            Role::Mirror,
            "postgres://app:Sup3rS3cr3t@db.example.com/bite?port=abc",
        )
        .unwrap_err();
        let text = chain(&error);
        assert!(
            text.contains("port") && !text.contains("abc") && !text.contains("Sup3r"),
            "{text}"
        );
    }

    #[test]
    fn connect_errors_name_everything_but_the_password() {
        let url = mirror("postgres://app:Sup3rS3cr3t@db.example.com:5432/bite?sslmode=require");
        let error = url.connect_error(ConnectFailure::Refused, None);
        assert_eq!(
            error.to_string(),
            "could not connect to the mirror at db.example.com:5432 (database \"bite\", user \
             \"app\"): connection refused: is PostgreSQL running there and accepting TCP \
             connections?"
        );
        assert!(error.is_transient());

        let source_url = DbUrl::parse(Role::Source, "postgres://pos:x@127.0.0.1/shop").unwrap();
        let error = source_url.connect_error(
            ConnectFailure::PasswordRejected {
                origin: source_url.origin(),
            },
            None,
        );
        assert!(error.to_string().contains("BITE_SOURCE_URL"), "{error}");
        assert!(!error.is_transient());
    }

    #[test]
    fn only_passing_conditions_are_transient() {
        let ssl_mode = SslMode::VerifyFull;
        for failure in [
            ConnectFailure::Refused,
            ConnectFailure::TimedOut {
                after: Duration::from_secs(10),
            },
            ConnectFailure::Reset,
            ConnectFailure::DnsTemporary,
            ConnectFailure::Unreachable,
            ConnectFailure::StartingUp,
            ConnectFailure::ShuttingDown,
            ConnectFailure::TooManyConnections,
        ] {
            assert!(failure.is_transient(), "{failure}");
        }
        for failure in [
            ConnectFailure::UnknownHost,
            ConnectFailure::PasswordRejected {
                origin: "BITE_MIRROR_URL".into(),
            },
            ConnectFailure::AccessDenied {
                origin: "BITE_MIRROR_URL".into(),
            },
            ConnectFailure::NoSuchDatabase,
            ConnectFailure::ReplicationNotAllowed { user: "app".into() },
            ConnectFailure::NoReplicationPrivilege { user: "app".into() },
            ConnectFailure::UnsupportedAuthentication {
                method: "GSSAPI".into(),
            },
            ConnectFailure::ChannelBindingUnavailable,
            ConnectFailure::TlsNotSupported { ssl_mode },
            ConnectFailure::CertificateUntrusted {
                ssl_mode,
                ca_file: None,
            },
            ConnectFailure::CertificateWrongHost {
                ssl_mode,
                host: "x".into(),
            },
        ] {
            assert!(!failure.is_transient(), "{failure}");
        }
    }

    #[test]
    fn server_refusals_are_read_from_sqlstate_and_message() {
        let url = DbUrl::parse(Role::Source, "postgres://pos@127.0.0.1/shop").unwrap();
        assert_eq!(
            url.server_failure(
                "28000",
                "no pg_hba.conf entry for replication connection from host \"10.0.0.2\", \
                 user \"pos\", no encryption"
            ),
            ConnectFailure::ReplicationNotAllowed { user: "pos".into() }
        );
        assert_eq!(
            url.server_failure(
                "28000",
                "no pg_hba.conf entry for host \"10.0.0.2\", user \"pos\", database \"shop\""
            ),
            ConnectFailure::AccessDenied {
                origin: "BITE_SOURCE_URL or the config file".into()
            }
        );
        assert_eq!(
            url.server_failure(
                "42501",
                "must be superuser or replication role to start walsender"
            ),
            ConnectFailure::NoReplicationPrivilege { user: "pos".into() }
        );
        assert_eq!(
            url.server_failure("42501", "permission denied for database \"shop\""),
            ConnectFailure::Rejected
        );
        assert_eq!(
            url.server_failure("57P03", "the database system is starting up"),
            ConnectFailure::StartingUp
        );
        let advice = ConnectFailure::ReplicationNotAllowed { user: "pos".into() }.to_string();
        assert!(advice.contains("`host replication pos "), "{advice}");
    }

    #[test]
    fn resolver_errors_are_told_apart() {
        let lookup = |text: &str| io_failure(&io::Error::other(text.to_owned()), None);
        assert_eq!(
            lookup("failed to lookup address information: Name or service not known"),
            Some(ConnectFailure::UnknownHost)
        );
        assert_eq!(
            lookup("failed to lookup address information: Temporary failure in name resolution"),
            Some(ConnectFailure::DnsTemporary)
        );
        assert_eq!(lookup("something else"), None);
        assert_eq!(
            io_failure(&io::ErrorKind::ConnectionRefused.into(), None),
            Some(ConnectFailure::Refused)
        );
    }

    #[test]
    fn roles_read_as_words() {
        assert_eq!(Role::Source.to_string(), "source");
        assert_eq!(Role::Mirror.to_string(), "mirror");
        assert_eq!(SslMode::VerifyCa.to_string(), "verify-ca");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the password, and however it is written, no printed form contains it.
        #[test]
        fn printed_forms_never_contain_the_password(
            secret in "[ -~\u{e9}\u{1F600}]{6,24}",
        ) {
            // A password that is part of the fixed text around it would "leak" trivially.
            let surroundings = "postgresql://app:***@db.example.com:5432/bite?sslmode=require\
                                &password=***&user=app host= dbname= DbUrl { role: Mirror, \
                                url: ssl_mode: Prefer, ca_file: None } could not connect to the \
                                mirror (database \"bite\", user \"app\"): connection refused: is \
                                PostgreSQL running there and accepting TCP connections?";
            prop_assume!(!surroundings.contains(&secret));
            let encoded = percent_encode(&secret);
            let quoted = escape_conninfo(&secret);
            let forms = [
                format!("postgres://app:{encoded}@db.example.com:5432/bite?sslmode=require"),
                format!("postgresql://db.example.com/bite?password={encoded}&user=app"),
                format!("host=db.example.com user=app password='{quoted}' dbname=bite"),
            ];
            for form in forms {
                let url = DbUrl::parse(Role::Mirror, &form).unwrap();
                prop_assert_eq!(password(&url), Some(secret.clone()));
                let shown = [
                    url.to_string(),
                    format!("{url:?}"),
                    url.target(),
                    url.connect_error(ConnectFailure::Refused, None).to_string(),
                ];
                for text in shown {
                    prop_assert!(!text.contains(&secret), "{} shows the password in {}", form, text);
                    prop_assert!(!text.contains(&encoded), "{} shows the password in {}", form, text);
                    prop_assert!(!text.contains(&quoted), "{} shows the password in {}", form, text);
                }
            }
        }
    }
}
