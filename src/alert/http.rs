//! A minimal HTTP/1.1 client for one thing: POSTing a small JSON body to the alert webhook
//! and reading the status code back. `http://` goes over a plain TCP stream, `https://` over
//! rustls with the bundled web PKI roots (webhook hosts are public services: Slack, Discord,
//! ntfy, a team's own endpoint). One request per connection (`Connection: close`), so there
//! is no pooling, chunking or keep-alive to get wrong; the whole exchange is bounded by a
//! timeout. Response parsing is a pure function ([`parse_status_line`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::WebhookUrl;

/// The response head read at most (a status line longer than this is not HTTP).
const MAX_HEAD: usize = 8 * 1024;

/// A POST that did not get a 2xx answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting, sending or receiving failed.
    #[error("failed to reach the webhook at {url}")]
    Io {
        /// The redacted URL.
        url: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The webhook host is not a valid TLS server name.
    #[error("{host:?} is not a valid TLS server name")]
    ServerName {
        /// The host.
        host: String,
    },
    /// No answer in time.
    #[error("the webhook at {url} did not answer within {} s", .timeout.as_secs())]
    TimedOut {
        /// The redacted URL.
        url: String,
        /// How long was waited.
        timeout: Duration,
    },
    /// The answer was not HTTP.
    #[error("the webhook at {url} answered something that is not HTTP")]
    BadResponse {
        /// The redacted URL.
        url: String,
    },
    /// The webhook refused the alert.
    #[error("the webhook at {url} answered HTTP {status}")]
    Status {
        /// The redacted URL.
        url: String,
        /// The status code.
        status: u16,
    },
}

impl HttpError {
    /// Whether trying again may help: network trouble, timeouts, 5xx and 429. A 4xx means
    /// the URL or the payload is wrong, and repeating it will not change the answer.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpError::Io { .. } | HttpError::TimedOut { .. } | HttpError::BadResponse { .. } => {
                true
            }
            HttpError::ServerName { .. } => false,
            HttpError::Status { status, .. } => *status >= 500 || *status == 429,
        }
    }
}

/// POSTs `body` (JSON) to `url`; `Ok` with the status code when it is 2xx.
pub async fn post_json(url: &WebhookUrl, body: &[u8], timeout: Duration) -> Result<u16, HttpError> {
    match tokio::time::timeout(timeout, exchange(url, body)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::TimedOut {
            url: url.to_string(),
            timeout,
        }),
    }
}

async fn exchange(url: &WebhookUrl, body: &[u8]) -> Result<u16, HttpError> {
    let io = |source| HttpError::Io {
        url: url.to_string(),
        source,
    };
    let tcp = TcpStream::connect((url.host(), url.port()))
        .await
        .map_err(io)?;
    let status = if url.is_https() {
        let name =
            rustls::pki_types::ServerName::try_from(url.host().to_string()).map_err(|_| {
                HttpError::ServerName {
                    host: url.host().to_string(),
                }
            })?;
        let tls = tokio_rustls::TlsConnector::from(tls_config())
            .connect(name, tcp)
            .await
            .map_err(io)?;
        send(tls, url, body).await.map_err(io)?
    } else {
        send(tcp, url, body).await.map_err(io)?
    };
    let status = parse_status_line(&status).ok_or_else(|| HttpError::BadResponse {
        url: url.to_string(),
    })?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(HttpError::Status {
            url: url.to_string(),
            status,
        })
    }
}

/// Writes the request and returns the response's bytes up to the end of its status line.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    url: &WebhookUrl,
    body: &[u8],
) -> std::io::Result<Vec<u8>> {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bite-sync/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        url.request_target(),
        url.host_header(),
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"\r\n") && got.len() < MAX_HEAD {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(got)
}

/// The status code of an HTTP/1.x response starting `HTTP/1.1 200 OK\r\n`.
pub fn parse_status_line(response: &[u8]) -> Option<u16> {
    let end = response.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&response[..end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..600).contains(c))
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_and_anything_else_is_not() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 404 Not Found\r\nx"), Some(404));
        assert_eq!(parse_status_line(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 OK"),
            None,
            "no line end yet"
        );
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 abc OK\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[test]
    fn only_server_trouble_is_worth_retrying() {
        let status = |status| HttpError::Status {
            url: "u".into(),
            status,
        };
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(404).is_transient());
        assert!(!status(400).is_transient());
    }
}
