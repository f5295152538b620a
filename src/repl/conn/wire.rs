//! The replication connection's wire format as pure functions over bytes: cutting backend
//! messages out of a read buffer, the CopyData payloads of a replication stream (XLogData,
//! primary keepalive), the standby status update, server error fields, result rows, the
//! `tls-server-end-point` channel binding and the text of replication commands. No I/O here.
//!
//! Invariants:
//! - [`next_frame`] takes a message out of the buffer only when all of it is there; until then
//!   the buffer is left as it was, so a reader that is interrupted between reads loses nothing.
//! - A message that claims more than [`MAX_FRAME_LEN`] is refused before anything is reserved
//!   for it: a corrupt length never turns into a 4 GiB allocation.
//! - Nothing here panics on input: every short or malformed message is a [`ProtocolError`].

use std::fmt;
use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, ErrorFields, Message};
use sha2::Digest;

use super::ReplicationMessage;
use crate::pg::ident;
use crate::repl::Lsn;

/// PostgreSQL never sends a message larger than 1 GiB (its `MaxAllocSize`); a larger length
/// means a corrupt stream or something that is not PostgreSQL.
pub const MAX_FRAME_LEN: usize = 1 << 30;

/// Read at least this much at a time, so small messages do not cost a system call each.
pub const READ_CHUNK: usize = 64 * 1024;

/// The most [`next_frame`] reserves at once for a large message still arriving.
const MAX_RESERVE: usize = 4 << 20;

const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
const XLOG_DATA_TAG: u8 = b'w';
const KEEPALIVE_TAG: u8 = b'k';
const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';
/// 'w', then WAL start, WAL end and server clock, 8 bytes each.
const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// 'k', WAL end, server clock, reply-requested.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;

/// Seconds from the Unix epoch to PostgreSQL's, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// One message from the server.
pub enum Backend {
    /// Anything `postgres-protocol` parses.
    Message(Message),
    /// The server entered COPY BOTH mode (START_REPLICATION succeeded); `postgres-protocol`
    /// does not know this message.
    CopyBothResponse,
}

/// The server sent something the protocol does not allow here.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A length larger than any message PostgreSQL sends.
    #[error("a message claims {len} bytes, more than the 1 GiB PostgreSQL ever sends")]
    FrameTooLarge {
        /// The claimed length.
        len: u64,
    },
    /// A length shorter than the length field itself.
    #[error("a message claims an impossible length of {len} bytes")]
    FrameTooShort {
        /// The claimed length.
        len: u32,
    },
    /// `postgres-protocol` could not parse a message.
    #[error("a malformed message (tag {tag:?})")]
    Malformed {
        /// The message's type byte.
        tag: char,
        /// The parser's complaint.
        #[source]
        source: io::Error,
    },
    /// A message that makes no sense at this point of the conversation.
    #[error("unexpected {got} message while {during}")]
    Unexpected {
        /// The message's name.
        got: &'static str,
        /// What the connection was doing.
        during: &'static str,
    },
    /// A replication message shorter than its fixed layout.
    #[error(
        "a replication message of type {tag:?} has {len} bytes, fewer than its {need}-byte layout"
    )]
    ShortReplicationMessage {
        /// The message's type byte.
        tag: char,
        /// Its length.
        len: usize,
        /// The length its layout needs.
        need: usize,
    },
    /// A CopyData payload that is neither XLogData nor a keepalive.
    #[error("an unknown replication message type {tag:?}")]
    UnknownReplicationMessage {
        /// The payload's first byte.
        tag: char,
    },
    /// A CopyData message without a payload.
    #[error("an empty replication message")]
    EmptyReplicationMessage,
    /// A result that does not have the shape the command returns.
    #[error("{command} returned {problem}")]
    UnexpectedResult {
        /// The command.
        command: &'static str,
        /// What was wrong with the result.
        problem: String,
    },
}

/// Takes the next complete message out of `buf`, or returns `None` (leaving `buf` untouched
/// but with room reserved for the rest of the message) when it is not all there yet.
pub fn next_frame(buf: &mut BytesMut) -> Result<Option<Backend>, ProtocolError> {
    let Some((tag, len)) = peek_header(buf)? else {
        buf.reserve(READ_CHUNK);
        return Ok(None);
    };
    let total = len + 1;
    if buf.len() < total {
        // Room for a read's worth, or for more of a large message as it arrives: memory grows
        // with the bytes actually received, not with what a length field claims.
        buf.reserve((total - buf.len()).clamp(READ_CHUNK, MAX_RESERVE));
        return Ok(None);
    }
    if tag == COPY_BOTH_RESPONSE_TAG {
        // Overall format, column count and per-column formats: nothing we need.
        buf.advance(total);
        return Ok(Some(Backend::CopyBothResponse));
    }
    match Message::parse(buf) {
        Ok(Some(message)) => Ok(Some(Backend::Message(message))),
        // Unreachable: the whole message is in the buffer.
        Ok(None) => Ok(None),
        Err(source) => Err(ProtocolError::Malformed {
            tag: char::from(tag),
            source,
        }),
    }
}

/// The type byte and the length (excluding the type byte) of the message at the start of
/// `buf`, once its 5-byte header is there.
fn peek_header(buf: &[u8]) -> Result<Option<(u8, usize)>, ProtocolError> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(ProtocolError::FrameTooShort { len });
    }
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len: u64::from(len),
        });
    }
    Ok(Some((header[0], len_usize)))
}

/// Reads the CopyData payload of a replication stream: XLogData (`w`) or primary keepalive
/// (`k`), laid out as in PostgreSQL's "Streaming Replication Protocol".
pub fn parse_replication_message(mut payload: Bytes) -> Result<ReplicationMessage, ProtocolError> {
    let Some(&tag) = payload.first() else {
        return Err(ProtocolError::EmptyReplicationMessage);
    };
    let need = match tag {
        XLOG_DATA_TAG => XLOG_DATA_HEADER_LEN,
        KEEPALIVE_TAG => KEEPALIVE_LEN,
        _ => {
            return Err(ProtocolError::UnknownReplicationMessage {
                tag: char::from(tag),
            });
        }
    };
    if payload.len() < need {
        return Err(ProtocolError::ShortReplicationMessage {
            tag: char::from(tag),
            len: payload.len(),
            need,
        });
    }
    payload.advance(1);
    if tag == XLOG_DATA_TAG {
        let wal_start = Lsn(payload.get_u64());
        let wal_end = Lsn(payload.get_u64());
        let server_time = payload.get_i64();
        Ok(ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            server_time,
            data: payload,
        })
    } else {
        let wal_end = Lsn(payload.get_u64());
        let server_time = payload.get_i64();
        let reply_requested = payload.get_u8() != 0;
        Ok(ReplicationMessage::Keepalive {
            wal_end,
            server_time,
            reply_requested,
        })
    }
}

/// Appends a standby status update (`r`) as a CopyData message: the positions written,
/// flushed and applied, the client's clock in µs since 2000-01-01 and whether the server
/// should answer at once.
pub fn put_standby_status(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    client_time: i64,
    reply_requested: bool,
    out: &mut BytesMut,
) {
    const PAYLOAD_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;
    out.reserve(5 + PAYLOAD_LEN);
    out.put_u8(b'd');
    out.put_u32((4 + PAYLOAD_LEN) as u32);
    out.put_u8(STANDBY_STATUS_UPDATE_TAG);
    out.put_u64(write.0);
    out.put_u64(flush.0);
    out.put_u64(apply.0);
    out.put_i64(client_time);
    out.put_u8(u8::from(reply_requested));
}

/// Microseconds since PostgreSQL's epoch (2000-01-01 UTC), the clock of replication messages.
pub fn pg_time(now: SystemTime) -> i64 {
    let since_unix = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let since_pg = since_unix.saturating_sub(Duration::from_secs(PG_EPOCH_UNIX_SECS));
    i64::try_from(since_pg.as_micros()).unwrap_or(i64::MAX)
}

/// An error or notice the server sent, with the fields people act on. Its text is the
/// server's: it never contains the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ServerError {
    /// ERROR, FATAL, PANIC (or WARNING, NOTICE... for notices), not localized.
    pub severity: String,
    /// The SQLSTATE, e.g. `42704`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The optional detail.
    pub detail: Option<String>,
    /// The optional hint: what to do.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

impl ServerError {
    /// Reads the fields of an ErrorResponse or NoticeResponse. Fields it does not know are
    /// skipped; text that is not UTF-8 is shown with replacement characters.
    pub fn parse(mut fields: ErrorFields<'_>) -> Result<ServerError, io::Error> {
        let mut error = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        let mut localized_severity = String::new();
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => error.severity = value,
                b'S' => localized_severity = value,
                b'C' => error.code = value,
                b'M' => error.message = value,
                b'D' => error.detail = Some(value),
                b'H' => error.hint = Some(value),
                _ => {}
            }
        }
        if error.severity.is_empty() {
            // Servers before 9.6 send only the localized severity.
            error.severity = localized_severity;
        }
        Ok(error)
    }
}

/// The columns of a DataRow as text, NULL as `None`.
pub fn row_text(row: &DataRowBody) -> Result<Vec<Option<String>>, io::Error> {
    let buffer = row.buffer();
    row.ranges()
        .map(|range| {
            range
                .map(|range| {
                    let bytes = buffer.get(range).ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "a column beyond the row")
                    })?;
                    String::from_utf8(bytes.to_vec()).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "a column is not UTF-8 text")
                    })
                })
                .transpose()
        })
        .collect()
}

/// A message's name for errors.
pub fn message_name(message: &Message) -> &'static str {
    match message {
        Message::AuthenticationCleartextPassword
        | Message::AuthenticationGss
        | Message::AuthenticationKerberosV5
        | Message::AuthenticationMd5Password(_)
        | Message::AuthenticationOk
        | Message::AuthenticationScmCredential
        | Message::AuthenticationSspi
        | Message::AuthenticationGssContinue(_)
        | Message::AuthenticationSasl(_)
        | Message::AuthenticationSaslContinue(_)
        | Message::AuthenticationSaslFinal(_) => "Authentication",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "unknown",
    }
}

/// `server_version` as the server reports it (`15.4 (Debian 15.4-1.pgdg120+1)`, `9.6.24`,
/// `16beta1`) → `server_version_num` (150004, 90624, 160000).
pub fn server_version_num(version: &str) -> Option<u32> {
    let numeric: String = version
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    if major >= 10 {
        return major.checked_mul(10_000)?.checked_add(minor);
    }
    let patch: u32 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    Some(major * 10_000 + minor * 100 + patch)
}

/// The `tls-server-end-point` channel binding (RFC 5929) of the server's certificate: its hash
/// with the hash function of its signature algorithm, SHA-256 for MD5 and SHA-1. `None` for
/// algorithms without a single hash (RSA-PSS, Ed25519), for which PostgreSQL offers no binding
/// either.
pub fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_algorithm_oid(certificate)?;
    // The DER contents of the OIDs (no tag or length).
    const RSA_PREFIX: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x01];
    const ECDSA_SHA2_PREFIX: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03];
    let bits = match oid {
        _ if oid == ECDSA_SHA1 => 256,
        [prefix @ .., last] if prefix == RSA_PREFIX => match last {
            // md5, sha1, sha256 with RSA
            0x04 | 0x05 | 0x0B => 256,
            0x0C => 384,
            0x0D => 512,
            _ => return None,
        },
        [prefix @ .., last] if prefix == ECDSA_SHA2_PREFIX => match last {
            0x02 => 256,
            0x03 => 384,
            0x04 => 512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match bits {
        256 => sha2::Sha256::digest(certificate).to_vec(),
        384 => sha2::Sha384::digest(certificate).to_vec(),
        _ => sha2::Sha512::digest(certificate).to_vec(),
    })
}

/// The OID of `signatureAlgorithm` in a DER X.509 certificate:
/// `SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, ... }, ... }`.
fn signature_algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (_, after_tbs) = der_element(certificate, 0x30)?;
    let (algorithm, _) = der_element(after_tbs, 0x30)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    Some(oid)
}

/// Splits a DER element with the expected tag off the front of `input`: (contents, rest).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len_byte, mut rest) = rest.split_first()?;
    let len = if len_byte < 0x80 {
        usize::from(len_byte)
    } else {
        let count = usize::from(len_byte & 0x7F);
        if count == 0 || count > 4 {
            return None;
        }
        let (len_bytes, after) = rest.split_at_checked(count)?;
        rest = after;
        len_bytes
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b))
    };
    rest.split_at_checked(len)
}

/// Why a replication command could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} contains a NUL byte, which PostgreSQL's protocol cannot carry")]
pub struct NulInCommand {
    /// Which argument.
    pub what: &'static str,
}

fn no_nul(what: &'static str, text: &str) -> Result<(), NulInCommand> {
    if text.contains('\0') {
        Err(NulInCommand { what })
    } else {
        Ok(())
    }
}

/// `CREATE_REPLICATION_SLOT` for a pgoutput slot that exports a snapshot, in the syntax the
/// server understands: PG15 has the parenthesized options (the old keywords still work, but
/// only until they are removed); PG14 and older only know `EXPORT_SNAPSHOT`.
pub fn create_slot_command(
    name: &str,
    temporary: bool,
    server_version_num: u32,
) -> Result<String, NulInCommand> {
    no_nul("the slot name", name)?;
    let temporary = if temporary { " TEMPORARY" } else { "" };
    let export = if server_version_num >= 150_000 {
        "(SNAPSHOT 'export')"
    } else {
        "EXPORT_SNAPSHOT"
    };
    Ok(format!(
        "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput {export}",
        ident::quote(name)
    ))
}

/// `DROP_REPLICATION_SLOT`, waiting for a slot in use to be released (PG13+; older servers
/// fail at once, as they did before `WAIT` existed).
pub fn drop_slot_command(name: &str, server_version_num: u32) -> Result<String, NulInCommand> {
    no_nul("the slot name", name)?;
    let wait = if server_version_num >= 130_000 {
        " WAIT"
    } else {
        ""
    };
    Ok(format!(
        "DROP_REPLICATION_SLOT {}{wait}",
        ident::quote(name)
    ))
}

/// `START_REPLICATION SLOT "slot" LOGICAL <lsn> ("name" 'value', ...)`.
pub fn start_replication_command(
    slot: &str,
    start: Lsn,
    options: &[(&str, &str)],
) -> Result<String, NulInCommand> {
    no_nul("the slot name", slot)?;
    let mut command = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        ident::quote(slot)
    );
    if !options.is_empty() {
        let mut list = Vec::with_capacity(options.len());
        for (name, value) in options {
            no_nul("a plugin option name", name)?;
            no_nul("a plugin option value", value)?;
            list.push(format!("{} {}", ident::quote(name), ident::literal(value)));
        }
        command.push_str(" (");
        command.push_str(&list.join(", "));
        command.push(')');
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn xlog(start: u64, end: u64, time: i64, data: &[u8]) -> Vec<u8> {
        let mut payload = vec![b'w'];
        payload.extend_from_slice(&start.to_be_bytes());
        payload.extend_from_slice(&end.to_be_bytes());
        payload.extend_from_slice(&time.to_be_bytes());
        payload.extend_from_slice(data);
        frame(b'd', &payload)
    }

    fn copy_payload(backend: Backend) -> Bytes {
        match backend {
            Backend::Message(Message::CopyData(body)) => body.into_bytes(),
            _ => panic!("not CopyData"),
        }
    }

    #[test]
    fn frames_come_out_only_when_complete() {
        let wire = xlog(0x10, 0x20, 7, b"BEGIN");
        let mut buf = BytesMut::new();
        for (i, byte) in wire.iter().enumerate() {
            assert!(next_frame(&mut buf).unwrap().is_none(), "after {i} bytes");
            assert_eq!(buf.len(), i, "an incomplete frame stays in the buffer");
            buf.put_u8(*byte);
        }
        let payload = copy_payload(next_frame(&mut buf).unwrap().unwrap());
        assert!(buf.is_empty());
        match parse_replication_message(payload).unwrap() {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            } => {
                assert_eq!((wal_start, wal_end, server_time), (Lsn(0x10), Lsn(0x20), 7));
                assert_eq!(&data[..], b"BEGIN");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keepalives_and_copy_both_are_read() {
        let mut payload = vec![b'k'];
        payload.extend_from_slice(&0x1234u64.to_be_bytes());
        payload.extend_from_slice(&99i64.to_be_bytes());
        payload.push(1);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b'W', &[0, 0, 0]));
        buf.extend_from_slice(&frame(b'd', &payload));
        buf.extend_from_slice(&frame(b'c', &[]));
        assert!(matches!(
            next_frame(&mut buf).unwrap(),
            Some(Backend::CopyBothResponse)
        ));
        let keepalive =
            parse_replication_message(copy_payload(next_frame(&mut buf).unwrap().unwrap()));
        assert_eq!(
            keepalive.unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x1234),
                server_time: 99,
                reply_requested: true
            }
        );
        assert!(matches!(
            next_frame(&mut buf).unwrap(),
            Some(Backend::Message(Message::CopyDone))
        ));
        assert!(next_frame(&mut buf).unwrap().is_none());
    }

    #[test]
    fn absurd_lengths_are_refused_before_allocating() {
        let mut buf = BytesMut::from(&[b'd', 0x7F, 0xFF, 0xFF, 0xFF][..]);
        let error = next_frame(&mut buf).err().unwrap();
        assert!(matches!(error, ProtocolError::FrameTooLarge { len } if len == 0x7FFF_FFFF));
        assert!(buf.capacity() < 1 << 20, "nothing was reserved for it");

        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(matches!(
            next_frame(&mut buf),
            Err(ProtocolError::FrameTooShort { len: 3 })
        ));

        let mut buf = BytesMut::from(&[b'd', 0x40, 0, 0, 0][..]);
        assert!(
            next_frame(&mut buf).unwrap().is_none(),
            "exactly 1 GiB is allowed"
        );
        assert!(
            buf.capacity() <= 2 * MAX_RESERVE,
            "room grows as the message arrives, not all at once: {}",
            buf.capacity()
        );
    }

    #[test]
    fn short_and_unknown_replication_messages_are_errors() {
        for (payload, expected) in [
            (&b""[..], "an empty replication message"),
            (&b"w\0\0"[..], "fewer than its 25-byte layout"),
            (&b"k\0"[..], "fewer than its 18-byte layout"),
            (&b"x123"[..], "unknown replication message type 'x'"),
        ] {
            let error = parse_replication_message(Bytes::copy_from_slice(payload)).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
    }

    #[test]
    fn standby_status_update_layout() {
        let mut out = BytesMut::new();
        put_standby_status(Lsn(1), Lsn(2), Lsn(3), 4, true, &mut out);
        let mut expected = vec![b'd', 0, 0, 0, 38, b'r'];
        for n in [1u64, 2, 3, 4] {
            expected.extend_from_slice(&n.to_be_bytes());
        }
        expected.push(1);
        assert_eq!(&out[..], &expected[..]);
    }

    #[test]
    fn pg_time_counts_from_2000() {
        let y2k = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        assert_eq!(pg_time(y2k), 0);
        assert_eq!(pg_time(y2k + Duration::from_micros(1_500_000)), 1_500_000);
        assert_eq!(
            pg_time(UNIX_EPOCH),
            0,
            "clocks before 2000 do not go negative"
        );
    }

    #[test]
    fn server_errors_keep_their_fields() {
        let body =
            b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0Hcreate it\0\0";
        let mut buf = BytesMut::from(&frame(b'E', body)[..]);
        let Some(Backend::Message(Message::ErrorResponse(body))) = next_frame(&mut buf).unwrap()
        else {
            panic!("not an ErrorResponse");
        };
        let error = ServerError::parse(body.fields()).unwrap();
        assert_eq!(error.code, "42704");
        assert_eq!(error.severity, "ERROR");
        assert_eq!(
            error.to_string(),
            "replication slot \"x\" does not exist (SQLSTATE 42704); hint: create it"
        );
    }

    #[test]
    fn versions_become_numbers() {
        assert_eq!(
            server_version_num("15.4 (Debian 15.4-1.pgdg120+1)"),
            Some(150_004)
        );
        assert_eq!(server_version_num("16beta1"), Some(160_000));
        assert_eq!(server_version_num("9.6.24"), Some(90_624));
        assert_eq!(server_version_num("17devel"), Some(170_000));
        assert_eq!(server_version_num("x"), None);
    }

    #[test]
    fn commands_quote_names_and_values() {
        assert_eq!(
            create_slot_command("s\"1", true, 150_004).unwrap(),
            "CREATE_REPLICATION_SLOT \"s\"\"1\" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_slot_command("s", false, 140_000).unwrap(),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
        assert_eq!(
            drop_slot_command("s", 150_000).unwrap(),
            "DROP_REPLICATION_SLOT \"s\" WAIT"
        );
        assert_eq!(
            drop_slot_command("s", 120_000).unwrap(),
            "DROP_REPLICATION_SLOT \"s\""
        );
        assert_eq!(
            start_replication_command(
                "s",
                Lsn(0x1_0000_00A0),
                &[("proto_version", "2"), ("publication_names", "it's")]
            )
            .unwrap(),
            "START_REPLICATION SLOT \"s\" LOGICAL 1/A0 (\"proto_version\" '2', \
             \"publication_names\" 'it''s')"
        );
        assert_eq!(
            start_replication_command("s", Lsn::ZERO, &[]).unwrap(),
            "START_REPLICATION SLOT \"s\" LOGICAL 0/0"
        );
        assert_eq!(
            start_replication_command("s", Lsn::ZERO, &[("a", "b\0")]).unwrap_err(),
            NulInCommand {
                what: "a plugin option value"
            }
        );
    }

    #[test]
    fn rows_are_text_and_null() {
        let mut body = Vec::new();
        body.extend_from_slice(&2u16.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        let mut buf = BytesMut::from(&frame(b'D', &body)[..]);
        let Some(Backend::Message(Message::DataRow(row))) = next_frame(&mut buf).unwrap() else {
            panic!("not a DataRow");
        };
        assert_eq!(row_text(&row).unwrap(), vec![Some("abc".to_owned()), None]);
    }

    #[test]
    fn channel_binding_hashes_the_certificate_by_its_signature_algorithm() {
        let self_signed = |algorithm| {
            let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
            rcgen::CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap()
                .self_signed(&key)
                .unwrap()
                .der()
                .to_vec()
        };
        let der = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            tls_server_end_point(&der).unwrap(),
            sha2::Sha256::digest(&der).to_vec()
        );
        let der = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            tls_server_end_point(&der).unwrap(),
            sha2::Sha384::digest(&der).to_vec()
        );
        assert_eq!(
            tls_server_end_point(&self_signed(&rcgen::PKCS_ED25519)),
            None
        );
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }

    #[test]
    fn frontend_copy_done_is_what_the_stream_sends() {
        // The stream ends with postgres-protocol's CopyDone; make sure our framing reads it.
        let mut out = BytesMut::new();
        frontend::copy_done(&mut out);
        assert!(matches!(
            next_frame(&mut out).unwrap(),
            Some(Backend::Message(Message::CopyDone))
        ));
    }

    proptest! {
        /// Whatever bytes arrive, framing and payload parsing return errors, never panic, and
        /// never take a partial frame.
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(backend)) = next_frame(&mut buf) {
                if let Backend::Message(Message::CopyData(body)) = backend {
                    let _ = parse_replication_message(body.into_bytes());
                }
            }
            let _ = parse_replication_message(Bytes::from(bytes));
        }
    }
}
