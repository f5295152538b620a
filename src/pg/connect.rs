//! TEMPORARY minimal stand-in (plain connections only) until the TLS-capable module lands.

use std::fmt;

/// Which side a URL belongs to, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The local database.
    Source,
    /// The cloud mirror.
    Mirror,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Mirror => "mirror",
        })
    }
}

/// A database URL with its secrets kept out of Display/Debug.
#[derive(Clone)]
pub struct DbUrl {
    role: Role,
    config: tokio_postgres::Config,
}

/// Connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Bad URL.
    #[error("invalid {role} URL")]
    Parse {
        /// Which side.
        role: Role,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Could not connect.
    #[error("could not connect to the {role} at {target}")]
    Connect {
        /// Which side.
        role: Role,
        /// host:port/db
        target: String,
        /// Cause.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ConnectError {
    /// Worth retrying.
    pub fn is_transient(&self) -> bool {
        matches!(self, ConnectError::Connect { .. })
    }
}

impl DbUrl {
    /// Parses a URL.
    pub fn parse(role: Role, url: &str) -> Result<DbUrl, ConnectError> {
        let config = url
            .parse::<tokio_postgres::Config>()
            .map_err(|source| ConnectError::Parse { role, source })?;
        Ok(DbUrl { role, config })
    }
    /// Which side.
    pub fn role(&self) -> Role {
        self.role
    }
    /// First host.
    pub fn host(&self) -> String {
        match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        }
    }
    /// First port.
    pub fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }
    /// Database name.
    pub fn dbname(&self) -> String {
        self.config
            .get_dbname()
            .map(str::to_string)
            .unwrap_or_else(|| self.user())
    }
    /// User name.
    pub fn user(&self) -> String {
        self.config.get_user().unwrap_or("postgres").to_string()
    }
    /// CA file.
    pub fn with_ca_file(self, _path: std::path::PathBuf) -> DbUrl {
        self
    }
    /// host:port/db
    pub fn target(&self) -> String {
        format!("{}:{}/{}", self.host(), self.port(), self.dbname())
    }
    /// Connects.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, ConnectError> {
        let (client, conn) =
            self.config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|source| ConnectError::Connect {
                    role: self.role,
                    target: self.target(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
        Ok(client)
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgres://{}:***@{}", self.user(), self.target())
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
