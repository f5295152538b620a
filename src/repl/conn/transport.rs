//! Moving bytes for the replication connection: dialing the socket (TCP with keepalives, or a
//! unix socket), TLS per `sslmode` (negotiated with SSLRequest, configured by
//! [`DbUrl::tls_config`] exactly as for ordinary connections), and [`Wire`], the socket with its
//! read and write buffers.
//!
//! Invariants:
//! - [`Wire::read`] is cancel-safe: bytes are only ever moved from the socket into the read
//!   buffer (tokio's `read_buf` either reads or does not), and a message leaves the buffer only
//!   when it is complete and returned in the same poll. Dropping the future loses nothing.
//! - Writes go through the write buffer: if a write is interrupted, the unsent rest stays there
//!   and goes out first on the next write, so messages are never cut or reordered.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::wire::{self, Backend, ProtocolError};
use crate::pg::connect::{
    ConnectError, ConnectFailure, DbUrl, Endpoint, SslMode, TcpSettings, io_failure,
};

/// A byte stream to the server: TCP, unix socket or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A freshly opened socket, before the startup message.
pub struct Dialed {
    /// The stream, TLS or not.
    pub io: Box<dyn Io>,
    /// The `tls-server-end-point` channel binding of the server's certificate, when on TLS and
    /// the certificate's signature algorithm allows one.
    pub channel_binding: Option<Vec<u8>>,
    /// Whether the connection uses TLS.
    pub tls: bool,
}

/// Opens the socket and, if `tls` is given, negotiates TLS. `sslmode=prefer` goes on in plain
/// when the server declines TLS; retrying after a failed handshake is the caller's job.
pub async fn dial(url: &DbUrl, tls: Option<Arc<ClientConfig>>) -> Result<Dialed, ConnectError> {
    let failed =
        |failure, source: io::Error| url.connect_error(failure, Some(Box::new(source) as _));
    let io_error = |source: io::Error| {
        let failure =
            io_failure(&source, url.connect_timeout().as_ref()).unwrap_or(ConnectFailure::Other);
        failed(failure, source)
    };
    match url.endpoint_to_dial() {
        Endpoint::Unix { path } => {
            let stream = UnixStream::connect(&path).await.map_err(io_error)?;
            Ok(Dialed {
                io: Box::new(stream),
                channel_binding: None,
                tls: false,
            })
        }
        Endpoint::Tcp {
            host,
            hostaddr,
            port,
        } => {
            let mut stream = connect_tcp(&host, hostaddr, port).await.map_err(io_error)?;
            configure_tcp(&stream, url.tcp_settings()).map_err(io_error)?;
            let Some(config) = tls else {
                return Ok(plain(stream));
            };
            if !server_accepts_tls(&mut stream).await.map_err(io_error)? {
                return match url.ssl_mode() {
                    SslMode::Prefer => Ok(plain(stream)),
                    ssl_mode => {
                        Err(url.connect_error(ConnectFailure::TlsNotSupported { ssl_mode }, None))
                    }
                };
            }
            start_tls(url, &host, stream, config).await
        }
    }
}

fn plain(stream: TcpStream) -> Dialed {
    Dialed {
        io: Box::new(stream),
        channel_binding: None,
        tls: false,
    }
}

/// Connects to `hostaddr` if given, else to each address `host` resolves to in turn.
async fn connect_tcp(
    host: &str,
    hostaddr: Option<std::net::IpAddr>,
    port: u16,
) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = match hostaddr {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => tokio::net::lookup_host((host, port)).await?.collect(),
    };
    let mut last_error = io::Error::other("could not resolve any addresses");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// No Nagle delay (status updates are small and should go at once), keepalives so a silent
/// peer is noticed, and `TCP_USER_TIMEOUT` when the URL asks for it.
fn configure_tcp(stream: &TcpStream, settings: TcpSettings) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    if let Some(keepalives) = settings.keepalives {
        let mut params = TcpKeepalive::new().with_time(keepalives.idle);
        if let Some(interval) = keepalives.interval {
            params = params.with_interval(interval);
        }
        if let Some(retries) = keepalives.retries {
            params = params.with_retries(retries);
        }
        socket.set_tcp_keepalive(&params)?;
    }
    if let Some(timeout) = settings.user_timeout {
        socket.set_tcp_user_timeout(Some(timeout))?;
    }
    Ok(())
}

/// Sends SSLRequest and reads the one-byte answer: `S` yes, anything else no.
async fn server_accepts_tls(stream: &mut TcpStream) -> io::Result<bool> {
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await?;
    let mut answer = [0u8];
    stream.read_exact(&mut answer).await?;
    Ok(answer[0] == b'S')
}

async fn start_tls(
    url: &DbUrl,
    host: &str,
    stream: TcpStream,
    config: Arc<ClientConfig>,
) -> Result<Dialed, ConnectError> {
    // As tokio-postgres does: the certificate is checked against the host as written, even
    // when `hostaddr` says where to connect.
    let name = ServerName::try_from(host.to_owned()).map_err(|source| {
        url.connect_error(
            ConnectFailure::TlsHandshake {
                ssl_mode: url.ssl_mode(),
            },
            Some(Box::new(source)),
        )
    })?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|source| {
            // tokio-rustls wraps rustls's verdict in an io::Error.
            let failure = match source
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(tls) => url.tls_failure(tls),
                None => io_failure(&source, url.connect_timeout().as_ref()).unwrap_or(
                    ConnectFailure::TlsHandshake {
                        ssl_mode: url.ssl_mode(),
                    },
                ),
            };
            url.connect_error(failure, Some(Box::new(source)))
        })?;
    let channel_binding = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| wire::tls_server_end_point(cert));
    Ok(Dialed {
        io: Box::new(stream),
        channel_binding,
        tls: true,
    })
}

/// Why reading or writing failed.
#[derive(Debug)]
pub enum WireError {
    /// The socket failed, or the server closed it (`UnexpectedEof`).
    Io(io::Error),
    /// The server sent something that is not a valid message.
    Protocol(ProtocolError),
}

/// The socket with a read buffer (complete messages are cut out of it) and a write buffer.
pub struct Wire {
    io: Box<dyn Io>,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

impl Wire {
    /// Wraps a dialed socket.
    pub fn new(io: Box<dyn Io>) -> Wire {
        Wire {
            io,
            read_buf: BytesMut::with_capacity(wire::READ_CHUNK),
            write_buf: BytesMut::new(),
        }
    }

    /// The next message from the server. Cancel-safe (see the module docs).
    pub async fn read(&mut self) -> Result<Backend, WireError> {
        loop {
            if let Some(message) =
                wire::next_frame(&mut self.read_buf).map_err(WireError::Protocol)?
            {
                return Ok(message);
            }
            let read = self
                .io
                .read_buf(&mut self.read_buf)
                .await
                .map_err(WireError::Io)?;
            if read == 0 {
                return Err(WireError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    /// Queues a message to send; [`Wire::flush`] sends it.
    pub fn queue(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// Sends everything queued, including what an interrupted earlier flush left behind.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        while !self.write_buf.is_empty() {
            let written = self
                .io
                .write_buf(&mut self.write_buf)
                .await
                .map_err(WireError::Io)?;
            if written == 0 {
                return Err(WireError::Io(io::ErrorKind::WriteZero.into()));
            }
        }
        self.io.flush().await.map_err(WireError::Io)
    }

    /// Closes the sending side (TLS close_notify, then FIN).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}
