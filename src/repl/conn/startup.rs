//! Opening a replication connection: dial (with TLS per `sslmode`), send the startup message
//! with `replication=database`, authenticate (trust, cleartext password, md5, SCRAM-SHA-256
//! with `tls-server-end-point` channel binding on TLS) and read the server's parameters up to
//! the first ReadyForQuery.
//!
//! Invariants:
//! - One deadline (`connect_timeout`) covers each whole attempt, from the TCP connect to
//!   ReadyForQuery, as libpq's does: a server that accepts and then stalls is a timeout, not a
//!   hang.
//! - Every failure is a [`ConnectError`] that names the endpoint, database and user, never the
//!   password, and says whether retrying can help.

use std::collections::HashMap;

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{AuthenticationSaslBody, Message};
use postgres_protocol::message::frontend;
use tokio_postgres::config::ChannelBinding as ChannelBindingSetting;

use super::transport::{self, Wire, WireError};
use super::wire::{Backend, ProtocolError, ServerError, message_name};
use crate::pg::connect::{BoxError, ConnectError, ConnectFailure, DbUrl, SslMode, io_failure};

/// A connection that has reached its first ReadyForQuery.
pub struct Started {
    /// The socket and its buffers.
    pub wire: Wire,
    /// The ParameterStatus values the server reported (`server_version`, ...).
    pub parameters: HashMap<String, String>,
}

/// Connects as [`DbUrl::connect`] would (TLS per `sslmode`, `prefer` falling back to plain when
/// the handshake fails, the whole attempt bounded by `connect_timeout`), but with
/// `replication=database` in the startup message.
pub async fn connect(url: &DbUrl) -> Result<Started, ConnectError> {
    let tls = url.tls_config().await?.map(std::sync::Arc::new);
    tracing::debug!(role = %url.role(), target = %url.target(), ssl_mode = %url.ssl_mode(), "opening a replication connection");
    match attempt(url, tls.clone()).await {
        Err(error)
            if tls.is_some() && url.ssl_mode() == SslMode::Prefer && error.is_tls_failure() =>
        {
            tracing::debug!(role = %url.role(), target = %url.target(), %error, "TLS failed with sslmode=prefer, retrying without TLS");
            attempt(url, None).await
        }
        result => result,
    }
}

async fn attempt(
    url: &DbUrl,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<Started, ConnectError> {
    let steps = async {
        let dialed = transport::dial(url, tls).await?;
        let mut wire = Wire::new(dialed.io);
        send_startup(url, &mut wire).await?;
        authenticate(url, &mut wire, dialed.channel_binding, dialed.tls).await?;
        let parameters = read_until_ready(url, &mut wire).await?;
        Ok(Started { wire, parameters })
    };
    match url.connect_timeout() {
        Some(after) => match tokio::time::timeout(after, steps).await {
            Ok(result) => result,
            Err(_) => Err(url.connect_error(ConnectFailure::TimedOut { after }, None)),
        },
        None => steps.await,
    }
}

async fn send_startup(url: &DbUrl, wire: &mut Wire) -> Result<(), ConnectError> {
    let user = url.user();
    let dbname = url.dbname();
    let mut params = vec![
        ("user", user.as_str()),
        ("database", dbname.as_str()),
        ("replication", "database"),
        ("client_encoding", "UTF8"),
    ];
    if let Some(name) = url.application_name() {
        params.push(("application_name", name));
    }
    if let Some(options) = url.server_options() {
        params.push(("options", options));
    }
    frontend::startup_message(params, wire.queue())
        .map_err(|source| url.connect_error(ConnectFailure::Other, Some(Box::new(source))))?;
    flush(url, wire).await
}

async fn authenticate(
    url: &DbUrl,
    wire: &mut Wire,
    channel_binding: Option<Vec<u8>>,
    on_tls: bool,
) -> Result<(), ConnectError> {
    let password = || {
        url.password().ok_or_else(|| {
            url.connect_error(
                ConnectFailure::PasswordMissing {
                    origin: url.origin(),
                },
                None,
            )
        })
    };
    let without_binding = || match url.channel_binding() {
        ChannelBindingSetting::Require => {
            Err(url.connect_error(ConnectFailure::ChannelBindingUnavailable, None))
        }
        _ => Ok(()),
    };
    match read(url, wire, "authenticating").await? {
        Message::AuthenticationOk => return without_binding(),
        Message::AuthenticationCleartextPassword => {
            without_binding()?;
            send_password(url, wire, password()?).await?;
        }
        Message::AuthenticationMd5Password(body) => {
            without_binding()?;
            let hash = authentication::md5_hash(url.user().as_bytes(), password()?, body.salt());
            send_password(url, wire, hash.as_bytes()).await?;
        }
        Message::AuthenticationSasl(body) => {
            let channel_binding = match url.channel_binding() {
                ChannelBindingSetting::Disable => None,
                _ => channel_binding,
            };
            scram(url, wire, &body, password()?, channel_binding, on_tls).await?;
        }
        other => return Err(unsupported(url, &other)),
    }
    match read(url, wire, "authenticating").await? {
        Message::AuthenticationOk => Ok(()),
        other => Err(unexpected(url, &other, "authenticating")),
    }
}

async fn send_password(url: &DbUrl, wire: &mut Wire, password: &[u8]) -> Result<(), ConnectError> {
    frontend::password_message(password, wire.queue())
        .map_err(|source| url.connect_error(ConnectFailure::Other, Some(Box::new(source))))?;
    flush(url, wire).await
}

/// SCRAM-SHA-256, with channel binding (SCRAM-SHA-256-PLUS) when on TLS with a certificate
/// that allows one. The choices follow RFC 5802 as libpq makes them: `p` when binding, `y`
/// ("I could bind, the server seems not to") when on TLS but the server offers no PLUS, `n`
/// otherwise.
async fn scram(
    url: &DbUrl,
    wire: &mut Wire,
    body: &AuthenticationSaslBody,
    password: &[u8],
    binding_data: Option<Vec<u8>>,
    on_tls: bool,
) -> Result<(), ConnectError> {
    let mut offered = Vec::new();
    let mut mechanisms = body.mechanisms();
    while let Some(mechanism) = mechanisms
        .next()
        .map_err(|source| url.connect_error(ConnectFailure::Other, Some(Box::new(source))))?
    {
        offered.push(mechanism.to_owned());
    }
    let has = |name: &str| offered.iter().any(|m| m == name);
    let (mechanism, binding) = match binding_data {
        Some(data) if has(sasl::SCRAM_SHA_256_PLUS) => (
            sasl::SCRAM_SHA_256_PLUS,
            ChannelBinding::tls_server_end_point(data),
        ),
        Some(_) if has(sasl::SCRAM_SHA_256) => (sasl::SCRAM_SHA_256, ChannelBinding::unrequested()),
        None if has(sasl::SCRAM_SHA_256) => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
        _ => {
            return Err(url.connect_error(
                ConnectFailure::UnsupportedAuthentication {
                    method: format!("SASL ({})", offered.join(", ")),
                },
                None,
            ));
        }
    };
    if mechanism != sasl::SCRAM_SHA_256_PLUS
        && url.channel_binding() == ChannelBindingSetting::Require
    {
        return Err(url.connect_error(ConnectFailure::ChannelBindingUnavailable, None));
    }
    tracing::debug!(mechanism, on_tls, "SCRAM authentication");
    let exchange_failed = |source: std::io::Error| {
        url.connect_error(
            ConnectFailure::AuthenticationExchange {
                origin: url.origin(),
            },
            Some(Box::new(source)),
        )
    };

    let mut scram = ScramSha256::new(password, binding);
    frontend::sasl_initial_response(mechanism, scram.message(), wire.queue())
        .map_err(exchange_failed)?;
    flush(url, wire).await?;
    let challenge = match read(url, wire, "authenticating with SCRAM").await? {
        Message::AuthenticationSaslContinue(body) => body,
        other => return Err(unexpected(url, &other, "authenticating with SCRAM")),
    };
    scram.update(challenge.data()).map_err(exchange_failed)?;
    frontend::sasl_response(scram.message(), wire.queue()).map_err(exchange_failed)?;
    flush(url, wire).await?;
    let outcome = match read(url, wire, "authenticating with SCRAM").await? {
        Message::AuthenticationSaslFinal(body) => body,
        other => return Err(unexpected(url, &other, "authenticating with SCRAM")),
    };
    // The server proves it knows the password too; a mismatch means an impostor.
    scram.finish(outcome.data()).map_err(exchange_failed)
}

/// Reads ParameterStatus, BackendKeyData and notices up to ReadyForQuery.
async fn read_until_ready(
    url: &DbUrl,
    wire: &mut Wire,
) -> Result<HashMap<String, String>, ConnectError> {
    let mut parameters = HashMap::new();
    loop {
        match read(url, wire, "starting up").await? {
            Message::ParameterStatus(body) => {
                let (Ok(name), Ok(value)) = (body.name(), body.value()) else {
                    continue;
                };
                parameters.insert(name.to_owned(), value.to_owned());
            }
            Message::BackendKeyData(_) => {}
            Message::ReadyForQuery(_) => return Ok(parameters),
            other => return Err(unexpected(url, &other, "starting up")),
        }
    }
}

/// The next message during startup; notices are logged and skipped, an ErrorResponse becomes
/// the failure its SQLSTATE means.
async fn read(url: &DbUrl, wire: &mut Wire, during: &'static str) -> Result<Message, ConnectError> {
    loop {
        let message = match wire.read().await {
            Ok(Backend::Message(message)) => message,
            Ok(Backend::CopyBothResponse) => {
                return Err(protocol(
                    url,
                    ProtocolError::Unexpected {
                        got: "CopyBothResponse",
                        during,
                    },
                ));
            }
            Err(error) => return Err(wire_failure(url, error)),
        };
        match message {
            Message::NoticeResponse(body) => {
                if let Ok(notice) = ServerError::parse(body.fields()) {
                    tracing::debug!(target = %url.target(), %notice, "server notice during startup");
                }
            }
            Message::ErrorResponse(body) => {
                return Err(match ServerError::parse(body.fields()) {
                    Ok(error) => url.connect_error(
                        url.server_failure(&error.code, &error.message),
                        Some(Box::new(error)),
                    ),
                    Err(source) => url.connect_error(ConnectFailure::Other, Some(Box::new(source))),
                });
            }
            message => return Ok(message),
        }
    }
}

async fn flush(url: &DbUrl, wire: &mut Wire) -> Result<(), ConnectError> {
    wire.flush().await.map_err(|error| wire_failure(url, error))
}

fn wire_failure(url: &DbUrl, error: WireError) -> ConnectError {
    match error {
        WireError::Io(source) => {
            let failure = io_failure(&source, url.connect_timeout().as_ref())
                .unwrap_or(ConnectFailure::Reset);
            url.connect_error(failure, Some(Box::new(source)))
        }
        WireError::Protocol(source) => protocol(url, source),
    }
}

fn protocol(url: &DbUrl, source: ProtocolError) -> ConnectError {
    let source: BoxError = Box::new(source);
    url.connect_error(ConnectFailure::Other, Some(source))
}

fn unexpected(url: &DbUrl, message: &Message, during: &'static str) -> ConnectError {
    protocol(
        url,
        ProtocolError::Unexpected {
            got: message_name(message),
            during,
        },
    )
}

/// An authentication request for a method bite-sync does not implement.
fn unsupported(url: &DbUrl, message: &Message) -> ConnectError {
    let method = match message {
        Message::AuthenticationKerberosV5 => "Kerberos V5",
        Message::AuthenticationScmCredential => "SCM credential",
        Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => "GSSAPI",
        Message::AuthenticationSspi => "SSPI",
        other => return unexpected(url, other, "authenticating"),
    };
    url.connect_error(
        ConnectFailure::UnsupportedAuthentication {
            method: method.to_owned(),
        },
        None,
    )
}
