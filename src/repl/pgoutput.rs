//! Decoding the `pgoutput` logical replication protocol (versions 1 and 2), as pure functions
//! over bytes.
//!
//! Each XLogData payload of the replication stream is one message; [`decode`] turns one into a
//! [`Message`], and [`StreamState`] remembers whether the stream is inside a streamed
//! transaction's chunk so that each message is decoded with the right layout. Reference:
//! <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html> and
//! PostgreSQL's `src/backend/replication/logical/proto.c`.
//!
//! Invariants:
//! - Decoding never panics and never allocates more than the input justifies: every length and
//!   count is checked against the bytes that are left before it is used.
//! - Column values are slices of the input ([`Bytes`]), not copies.
//! - Inside a streamed transaction (between Stream Start and Stream Stop, protocol version 2)
//!   change messages carry the transaction id; the caller says whether it is inside one.
//! - Decoding is exact: a message decodes only if every byte belongs to it, and flag bits the
//!   protocol does not define are errors rather than silently dropped, so a decoded message
//!   says everything its bytes said.
//! - Names (relations, columns, types, origins, message prefixes) must be UTF-8, which they are
//!   when the source database's encoding is UTF8; column values are kept as bytes.
//! - Every [`DecodeError`] names the message, the field and the byte offset (from the type byte,
//!   offset 0) where decoding stopped.

use std::fmt;
use std::str::Utf8Error;

use bytes::Bytes;

use super::Lsn;

/// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's timestamp epoch.
pub type PgTimestamp = i64;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A transaction starts ('B').
    Begin {
        /// The LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// When it committed on the source.
        commit_time: PgTimestamp,
        /// Its transaction id.
        xid: u32,
    },
    /// A transaction ends ('C').
    Commit {
        /// Unused flags (zero).
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The LSN just past the commit record: where a restart resumes after it.
        end_lsn: Lsn,
        /// When it committed on the source.
        commit_time: PgTimestamp,
    },
    /// The changes that follow came from another node ('O').
    Origin {
        /// The commit LSN on the origin server.
        lsn: Lsn,
        /// The origin's name.
        name: String,
    },
    /// The layout of a relation, sent before its first change and after it changes ('R').
    Relation(Relation),
    /// A data type's name, sent before a relation that uses a non-built-in type ('Y').
    Type {
        /// Transaction id, only inside a streamed transaction.
        xid: Option<u32>,
        /// The type's OID, as the relation's columns give it.
        oid: u32,
        /// Its schema ("" means pg_catalog). For a domain, PostgreSQL sends the base type's
        /// schema and name under the domain's OID (a domain over integer: "", "int4").
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A row inserted ('I').
    Insert {
        /// Transaction id, only inside a streamed transaction.
        xid: Option<u32>,
        /// The relation's OID (as in its Relation message).
        relation: u32,
        /// The new row.
        new: Tuple,
    },
    /// A row updated ('U').
    Update {
        /// Transaction id, only inside a streamed transaction.
        xid: Option<u32>,
        /// The relation's OID.
        relation: u32,
        /// The old key ('K', when a replica identity column changed) or the whole old row
        /// ('O', REPLICA IDENTITY FULL); absent when the key did not change.
        old: Option<OldTuple>,
        /// The new row; unchanged TOASTed values are [`Datum::UnchangedToast`].
        new: Tuple,
    },
    /// A row deleted ('D').
    Delete {
        /// Transaction id, only inside a streamed transaction.
        xid: Option<u32>,
        /// The relation's OID.
        relation: u32,
        /// The deleted row's key, or the whole row under REPLICA IDENTITY FULL.
        old: OldTuple,
    },
    /// Tables truncated together ('T').
    Truncate {
        /// Transaction id, only inside a streamed transaction.
        xid: Option<u32>,
        /// `TRUNCATE ... CASCADE`.
        cascade: bool,
        /// `TRUNCATE ... RESTART IDENTITY`.
        restart_identity: bool,
        /// The relations' OIDs.
        relations: Vec<u32>,
    },
    /// A message written with `pg_logical_emit_message` ('M'); bite-sync ignores these.
    LogicalMessage {
        /// Transaction id, only inside a streamed transaction.
        xid: Option<u32>,
        /// Written inside a transaction (delivered at its commit) or not.
        transactional: bool,
        /// The LSN of the message.
        lsn: Lsn,
        /// The prefix given by the writer.
        prefix: String,
        /// The content.
        content: Bytes,
    },
    /// A chunk of an in-progress transaction starts ('S', version 2). A chunk can be empty
    /// (PostgreSQL stops streaming a transaction when a catalog lookup finds it aborted).
    StreamStart {
        /// The transaction.
        xid: u32,
        /// Whether this is the transaction's first chunk in this decoding session. A new
        /// session (a reconnect) streams an unfinished transaction again from its start, or
        /// sends it whole between Begin and Commit once it commits: chunks of unfinished
        /// transactions received before a reconnect must be dropped.
        first_segment: bool,
    },
    /// The chunk ends ('E', version 2).
    StreamStop,
    /// A streamed transaction committed ('c', version 2).
    StreamCommit {
        /// The transaction.
        xid: u32,
        /// Unused flags (zero).
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The LSN just past the commit record.
        end_lsn: Lsn,
        /// When it committed on the source.
        commit_time: PgTimestamp,
    },
    /// A streamed transaction, or one of its subtransactions, aborted ('A', version 2). Changes
    /// in a chunk carry the xid of the subtransaction that made them, so `subxid` names the
    /// changes to drop.
    StreamAbort {
        /// The top-level transaction.
        xid: u32,
        /// The aborted subtransaction; equal to `xid` when the whole transaction aborted.
        subxid: u32,
    },
}

/// A relation's layout as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Transaction id, only inside a streamed transaction.
    pub xid: Option<u32>,
    /// The relation's OID on the source.
    pub oid: u32,
    /// Its schema ("" means pg_catalog, as the protocol says).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `relreplident`: 'd' default (primary key), 'n' nothing, 'f' full, 'i' index.
    pub replica_identity: u8,
    /// The published columns, in the order tuples list them.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (key) or not.
    pub key: bool,
    /// The column's name.
    pub name: String,
    /// Its type's OID.
    pub type_oid: u32,
    /// Its type modifier (-1 when none).
    pub type_modifier: i32,
}

/// A row's values, one per column of its relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<Datum>);

/// An update's or delete's old row: only the key columns, or all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': the replica identity columns (other columns are [`Datum::Null`]).
    Key(Tuple),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

/// One column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// 'n': SQL NULL.
    Null,
    /// 'u': a TOASTed value that did not change; the subscriber keeps what it has.
    UnchangedToast,
    /// 't': the value in the type's text output format.
    Text(Bytes),
    /// 'b': the value in the type's binary format (only with the `binary` option).
    Binary(Bytes),
}

/// Which kind of message a [`DecodeError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// 'B'
    Begin,
    /// 'C'
    Commit,
    /// 'O'
    Origin,
    /// 'R'
    Relation,
    /// 'Y'
    Type,
    /// 'I'
    Insert,
    /// 'U'
    Update,
    /// 'D'
    Delete,
    /// 'T'
    Truncate,
    /// 'M'
    LogicalMessage,
    /// 'S'
    StreamStart,
    /// 'E'
    StreamStop,
    /// 'c'
    StreamCommit,
    /// 'A'
    StreamAbort,
}

impl MessageKind {
    /// The kind a type byte announces; `None` for bytes pgoutput does not send to bite-sync
    /// (including the two-phase commit messages, which it never requests).
    fn from_type_byte(byte: u8) -> Option<MessageKind> {
        Some(match byte {
            b'B' => MessageKind::Begin,
            b'C' => MessageKind::Commit,
            b'O' => MessageKind::Origin,
            b'R' => MessageKind::Relation,
            b'Y' => MessageKind::Type,
            b'I' => MessageKind::Insert,
            b'U' => MessageKind::Update,
            b'D' => MessageKind::Delete,
            b'T' => MessageKind::Truncate,
            b'M' => MessageKind::LogicalMessage,
            b'S' => MessageKind::StreamStart,
            b'E' => MessageKind::StreamStop,
            b'c' => MessageKind::StreamCommit,
            b'A' => MessageKind::StreamAbort,
            _ => return None,
        })
    }
}

impl fmt::Display for MessageKind {
    /// The name the protocol documentation uses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MessageKind::Begin => "Begin",
            MessageKind::Commit => "Commit",
            MessageKind::Origin => "Origin",
            MessageKind::Relation => "Relation",
            MessageKind::Type => "Type",
            MessageKind::Insert => "Insert",
            MessageKind::Update => "Update",
            MessageKind::Delete => "Delete",
            MessageKind::Truncate => "Truncate",
            MessageKind::LogicalMessage => "Message",
            MessageKind::StreamStart => "Stream Start",
            MessageKind::StreamStop => "Stream Stop",
            MessageKind::StreamCommit => "Stream Commit",
            MessageKind::StreamAbort => "Stream Abort",
        })
    }
}

/// A field of a message as errors name it: `xid`, `name of column 2`, `new tuple column 3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// What the field is.
    pub name: &'static str,
    /// Which one of a repeated field (columns, truncated relations), counting from 1.
    pub number: Option<usize>,
}

impl Field {
    const fn named(name: &'static str) -> Field {
        Field { name, number: None }
    }

    const fn numbered(name: &'static str, number: usize) -> Field {
        Field {
            name,
            number: Some(number),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.number {
            Some(number) => write!(f, "{} {number}", self.name),
            None => f.write_str(self.name),
        }
    }
}

/// A byte shown for a human: `'K' (0x4b)` when printable, else `0x00`.
struct ShownByte(u8);

impl fmt::Display for ShownByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' ({:#04x})", char::from(self.0), self.0)
        } else {
            write!(f, "{:#04x}", self.0)
        }
    }
}

/// `1 byte`, `12 bytes`.
struct ByteCount(usize);

impl fmt::Display for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            1 => f.write_str("1 byte"),
            n => write!(f, "{n} bytes"),
        }
    }
}

/// Why a message could not be decoded. Offsets count from the message's type byte (offset 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload has no bytes at all.
    #[error("empty message: no type byte")]
    Empty,
    /// The first byte is not a message type pgoutput sends to bite-sync.
    #[error("unknown message type byte {} at offset 0", ShownByte(*byte))]
    UnknownMessageType {
        /// The type byte.
        byte: u8,
    },
    /// The message ends before a field does.
    #[error(
        "truncated {message} message: {field} needs {} at offset {offset}, {left} left",
        ByteCount(*needed)
    )]
    Truncated {
        /// The message being decoded.
        message: MessageKind,
        /// The field that does not fit.
        field: Field,
        /// The bytes the field needs.
        needed: usize,
        /// Where the field starts.
        offset: usize,
        /// The bytes left from there.
        left: usize,
    },
    /// A string runs to the end of the message without its NUL terminator.
    #[error("truncated {message} message: {field} at offset {offset} has no terminating NUL")]
    Unterminated {
        /// The message being decoded.
        message: MessageKind,
        /// The string field.
        field: Field,
        /// Where the string starts.
        offset: usize,
    },
    /// A name is not UTF-8.
    #[error("{message} message: {field} is not UTF-8 (invalid byte at offset {offset})")]
    InvalidUtf8 {
        /// The message being decoded.
        message: MessageKind,
        /// The string field.
        field: Field,
        /// Where the first invalid byte is.
        offset: usize,
        /// What is wrong with it.
        #[source]
        source: Utf8Error,
    },
    /// A length or count that must not be negative is.
    #[error("{message} message: {field} at offset {offset} is negative ({value})")]
    Negative {
        /// The message being decoded.
        message: MessageKind,
        /// The length or count field.
        field: Field,
        /// Its value.
        value: i32,
        /// Where it starts.
        offset: usize,
    },
    /// A count promises more items than the bytes that are left could hold.
    #[error(
        "{message} message: {field} {count} at offset {offset} needs at least {}, {left} left after it",
        ByteCount(*needed)
    )]
    CountTooLarge {
        /// The message being decoded.
        message: MessageKind,
        /// The count field.
        field: Field,
        /// Its value.
        count: usize,
        /// The fewest bytes that many items take.
        needed: usize,
        /// Where the count starts.
        offset: usize,
        /// The bytes left after the count.
        left: usize,
    },
    /// A tuple column's kind is not 'n', 'u', 't' or 'b'.
    #[error(
        "{message} message: {field} has unknown kind byte {} at offset {offset} (expected 'n', 'u', 't' or 'b')",
        ShownByte(*byte)
    )]
    UnknownTupleKind {
        /// The message being decoded.
        message: MessageKind,
        /// The column.
        field: Field,
        /// The kind byte.
        byte: u8,
        /// Where it is.
        offset: usize,
    },
    /// The byte announcing which tuple follows ('N', 'K' or 'O') is not one this message allows.
    #[error("{message} message: expected {expected} at offset {offset}, found {}", ShownByte(*byte))]
    UnexpectedTupleMarker {
        /// The message being decoded.
        message: MessageKind,
        /// The markers allowed here.
        expected: &'static str,
        /// The byte found.
        byte: u8,
        /// Where it is.
        offset: usize,
    },
    /// A flags byte has bits the protocol does not define.
    #[error("{message} message: {field} at offset {offset} is {value:#04x}; {allowed}")]
    InvalidFlags {
        /// The message being decoded.
        message: MessageKind,
        /// The flags field.
        field: Field,
        /// Its value.
        value: u8,
        /// Where it is.
        offset: usize,
        /// The values the protocol defines.
        allowed: &'static str,
    },
    /// Bytes follow a complete message.
    #[error("{message} message: {} left over after the complete message at offset {offset}", ByteCount(*count))]
    TrailingBytes {
        /// The message decoded.
        message: MessageKind,
        /// Where the extra bytes start.
        offset: usize,
        /// How many there are.
        count: usize,
    },
    /// A Stream Start arrived while another transaction's chunk was still open.
    #[error(
        "Stream Start for transaction {xid} while the chunk of transaction {open} is still open"
    )]
    NestedStreamStart {
        /// The transaction the new Stream Start names.
        xid: u32,
        /// The transaction whose chunk is open.
        open: u32,
    },
    /// A Stream Stop arrived outside a streamed chunk.
    #[error("Stream Stop without a Stream Start")]
    StreamStopWithoutStart,
}

/// Decodes one pgoutput message. `in_stream` says whether it arrived between a Stream Start
/// and its Stream Stop, where change messages carry a transaction id ([`StreamState`] tracks
/// this).
pub fn decode(data: &Bytes, in_stream: bool) -> Result<Message, DecodeError> {
    let &type_byte = data.first().ok_or(DecodeError::Empty)?;
    let kind = MessageKind::from_type_byte(type_byte)
        .ok_or(DecodeError::UnknownMessageType { byte: type_byte })?;
    let mut r = Reader {
        data,
        pos: 1,
        message: kind,
    };
    let message = match kind {
        MessageKind::Begin => begin(&mut r)?,
        MessageKind::Commit => commit(&mut r)?,
        MessageKind::Origin => origin(&mut r)?,
        MessageKind::Relation => Message::Relation(relation(&mut r, in_stream)?),
        MessageKind::Type => type_message(&mut r, in_stream)?,
        MessageKind::Insert => insert(&mut r, in_stream)?,
        MessageKind::Update => update(&mut r, in_stream)?,
        MessageKind::Delete => delete(&mut r, in_stream)?,
        MessageKind::Truncate => truncate(&mut r, in_stream)?,
        MessageKind::LogicalMessage => logical_message(&mut r, in_stream)?,
        MessageKind::StreamStart => stream_start(&mut r)?,
        MessageKind::StreamStop => Message::StreamStop,
        MessageKind::StreamCommit => stream_commit(&mut r)?,
        MessageKind::StreamAbort => stream_abort(&mut r)?,
    };
    r.finish()?;
    Ok(message)
}

/// Where the stream is: inside a streamed transaction's chunk (between Stream Start and Stream
/// Stop) or not. Feed it every message of the stream, in order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamState {
    /// The transaction whose chunk is open.
    open: Option<u32>,
}

impl StreamState {
    /// The transaction whose chunk is being streamed, if any.
    pub fn streaming_xid(&self) -> Option<u32> {
        self.open
    }

    /// Decodes the next message of the stream and moves past Stream Start and Stream Stop.
    /// A Stream Start inside a chunk or a Stream Stop outside one is an error; an error leaves
    /// the state as it was.
    pub fn decode(&mut self, data: &Bytes) -> Result<Message, DecodeError> {
        let message = decode(data, self.open.is_some())?;
        match (&message, self.open) {
            (&Message::StreamStart { xid, .. }, Some(open)) => {
                return Err(DecodeError::NestedStreamStart { xid, open });
            }
            (&Message::StreamStart { xid, .. }, None) => self.open = Some(xid),
            (Message::StreamStop, None) => return Err(DecodeError::StreamStopWithoutStart),
            (Message::StreamStop, Some(_)) => self.open = None,
            _ => {}
        }
        Ok(message)
    }
}

const XID: Field = Field::named("xid");
const SUBXID: Field = Field::named("subtransaction xid");
const FLAGS: Field = Field::named("flags");
const FINAL_LSN: Field = Field::named("final LSN");
const COMMIT_LSN: Field = Field::named("commit LSN");
const END_LSN: Field = Field::named("end LSN");
const COMMIT_TIME: Field = Field::named("commit timestamp");
const ORIGIN_LSN: Field = Field::named("origin LSN");
const ORIGIN_NAME: Field = Field::named("origin name");
const RELATION_OID: Field = Field::named("relation OID");
const NAMESPACE: Field = Field::named("namespace");
const RELATION_NAME: Field = Field::named("relation name");
const REPLICA_IDENTITY: Field = Field::named("replica identity");
const COLUMN_COUNT: Field = Field::named("column count");
const TYPE_OID: Field = Field::named("type OID");
const TYPE_NAME: Field = Field::named("type name");
const TUPLE_MARKER: Field = Field::named("tuple marker");
const RELATION_COUNT: Field = Field::named("relation count");
const TRUNCATE_OPTIONS: Field = Field::named("options");
const MESSAGE_LSN: Field = Field::named("message LSN");
const PREFIX: Field = Field::named("prefix");
const CONTENT_LENGTH: Field = Field::named("content length");
const CONTENT: Field = Field::named("content");
const FIRST_SEGMENT: Field = Field::named("first segment flag");

/// The fewest bytes a Relation column takes: flags, an empty name's NUL, type OID, modifier.
const MIN_COLUMN_BYTES: usize = 1 + 1 + 4 + 4;

/// A cursor over one message. `pos` never passes the end of `data`.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    message: MessageKind,
}

impl<'a> Reader<'a> {
    fn rest(&self) -> &'a [u8] {
        let data: &'a [u8] = self.data;
        data.get(self.pos..).unwrap_or_default()
    }

    fn truncated(&self, field: Field, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
            needed,
            offset: self.pos,
            left: self.rest().len(),
        }
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], DecodeError> {
        let chunk = *self
            .rest()
            .first_chunk::<N>()
            .ok_or_else(|| self.truncated(field, N))?;
        self.pos += N;
        Ok(chunk)
    }

    fn u8(&mut self, field: Field) -> Result<u8, DecodeError> {
        let [byte] = self.array(field)?;
        Ok(byte)
    }

    fn u16(&mut self, field: Field) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: Field) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: Field) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn i64(&mut self, field: Field) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, field: Field) -> Result<Lsn, DecodeError> {
        self.array(field)
            .map(|bytes| Lsn(u64::from_be_bytes(bytes)))
    }

    /// The transaction id that change messages carry inside a streamed chunk only.
    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        in_stream.then(|| self.u32(XID)).transpose()
    }

    /// A flags byte whose bits must all be within `defined`; `allowed` says which those are.
    fn flags(
        &mut self,
        field: Field,
        defined: u8,
        allowed: &'static str,
    ) -> Result<u8, DecodeError> {
        let offset = self.pos;
        let value = self.u8(field)?;
        if value & !defined != 0 {
            return Err(DecodeError::InvalidFlags {
                message: self.message,
                field,
                value,
                offset,
                allowed,
            });
        }
        Ok(value)
    }

    /// An Int32 length or count, which must not be negative.
    fn length(&mut self, field: Field) -> Result<usize, DecodeError> {
        let offset = self.pos;
        let value = self.i32(field)?;
        usize::try_from(value).map_err(|_| DecodeError::Negative {
            message: self.message,
            field,
            value,
            offset,
        })
    }

    /// Checks that `count` items of at least `min_each` bytes fit in what is left, before
    /// anything is allocated for them. `offset` is where the count was read.
    fn check_count(
        &self,
        field: Field,
        count: usize,
        min_each: usize,
        offset: usize,
    ) -> Result<(), DecodeError> {
        let needed = count.saturating_mul(min_each);
        let left = self.rest().len();
        if needed > left {
            return Err(DecodeError::CountTooLarge {
                message: self.message,
                field,
                count,
                needed,
                offset,
                left,
            });
        }
        Ok(())
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: Field) -> Result<String, DecodeError> {
        let rest = self.rest();
        let text = rest
            .iter()
            .position(|&b| b == 0)
            .and_then(|nul| rest.get(..nul))
            .ok_or(DecodeError::Unterminated {
                message: self.message,
                field,
                offset: self.pos,
            })?;
        let text = std::str::from_utf8(text).map_err(|source| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
            offset: self.pos + source.valid_up_to(),
            source,
        })?;
        self.pos += text.len() + 1;
        Ok(text.to_owned())
    }

    /// `len` bytes as a slice of the message, not a copy.
    fn bytes(&mut self, len: usize, field: Field) -> Result<Bytes, DecodeError> {
        if len > self.rest().len() {
            return Err(self.truncated(field, len));
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.data.slice(start..self.pos))
    }

    /// Succeeds when the whole message has been read.
    fn finish(self) -> Result<(), DecodeError> {
        match self.rest().len() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes {
                message: self.message,
                offset: self.pos,
                count,
            }),
        }
    }
}

fn begin(r: &mut Reader) -> Result<Message, DecodeError> {
    Ok(Message::Begin {
        final_lsn: r.lsn(FINAL_LSN)?,
        commit_time: r.i64(COMMIT_TIME)?,
        xid: r.u32(XID)?,
    })
}

fn commit(r: &mut Reader) -> Result<Message, DecodeError> {
    Ok(Message::Commit {
        flags: r.u8(FLAGS)?,
        commit_lsn: r.lsn(COMMIT_LSN)?,
        end_lsn: r.lsn(END_LSN)?,
        commit_time: r.i64(COMMIT_TIME)?,
    })
}

fn origin(r: &mut Reader) -> Result<Message, DecodeError> {
    Ok(Message::Origin {
        lsn: r.lsn(ORIGIN_LSN)?,
        name: r.string(ORIGIN_NAME)?,
    })
}

fn relation(r: &mut Reader, in_stream: bool) -> Result<Relation, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let oid = r.u32(RELATION_OID)?;
    let namespace = r.string(NAMESPACE)?;
    let name = r.string(RELATION_NAME)?;
    let replica_identity = r.u8(REPLICA_IDENTITY)?;
    let offset = r.pos;
    let count = usize::from(r.u16(COLUMN_COUNT)?);
    r.check_count(COLUMN_COUNT, count, MIN_COLUMN_BYTES, offset)?;
    let mut columns = Vec::with_capacity(count);
    for number in 1..=count {
        columns.push(column(r, number)?);
    }
    Ok(Relation {
        xid,
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn column(r: &mut Reader, number: usize) -> Result<Column, DecodeError> {
    let flags = r.flags(
        Field::numbered("flags of column", number),
        1,
        "only 0x01 (part of the replica identity) is defined",
    )?;
    Ok(Column {
        key: flags == 1,
        name: r.string(Field::numbered("name of column", number))?,
        type_oid: r.u32(Field::numbered("type OID of column", number))?,
        type_modifier: r.i32(Field::numbered("type modifier of column", number))?,
    })
}

fn type_message(r: &mut Reader, in_stream: bool) -> Result<Message, DecodeError> {
    Ok(Message::Type {
        xid: r.stream_xid(in_stream)?,
        oid: r.u32(TYPE_OID)?,
        namespace: r.string(NAMESPACE)?,
        name: r.string(TYPE_NAME)?,
    })
}

fn insert(r: &mut Reader, in_stream: bool) -> Result<Message, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let relation = r.u32(RELATION_OID)?;
    let offset = r.pos;
    match r.u8(TUPLE_MARKER)? {
        b'N' => Ok(Message::Insert {
            xid,
            relation,
            new: tuple(r, TupleRole::New)?,
        }),
        byte => Err(unexpected_marker(r, "'N'", byte, offset)),
    }
}

fn update(r: &mut Reader, in_stream: bool) -> Result<Message, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let relation = r.u32(RELATION_OID)?;
    let offset = r.pos;
    let old = match r.u8(TUPLE_MARKER)? {
        b'N' => None,
        byte => {
            let old = old_tuple(r, byte, "'K', 'O' or 'N'", offset)?;
            let offset = r.pos;
            match r.u8(TUPLE_MARKER)? {
                b'N' => Some(old),
                byte => return Err(unexpected_marker(r, "'N'", byte, offset)),
            }
        }
    };
    Ok(Message::Update {
        xid,
        relation,
        old,
        new: tuple(r, TupleRole::New)?,
    })
}

fn delete(r: &mut Reader, in_stream: bool) -> Result<Message, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let relation = r.u32(RELATION_OID)?;
    let offset = r.pos;
    let marker = r.u8(TUPLE_MARKER)?;
    Ok(Message::Delete {
        xid,
        relation,
        old: old_tuple(r, marker, "'K' or 'O'", offset)?,
    })
}

/// The old tuple that `marker` (read at `offset`) announces: 'K' key or 'O' whole row.
fn old_tuple(
    r: &mut Reader,
    marker: u8,
    expected: &'static str,
    offset: usize,
) -> Result<OldTuple, DecodeError> {
    match marker {
        b'K' => Ok(OldTuple::Key(tuple(r, TupleRole::OldKey)?)),
        b'O' => Ok(OldTuple::Full(tuple(r, TupleRole::OldFull)?)),
        byte => Err(unexpected_marker(r, expected, byte, offset)),
    }
}

fn unexpected_marker(r: &Reader, expected: &'static str, byte: u8, offset: usize) -> DecodeError {
    DecodeError::UnexpectedTupleMarker {
        message: r.message,
        expected,
        byte,
        offset,
    }
}

/// Which tuple of a message is being read, for naming its fields in errors.
#[derive(Clone, Copy)]
enum TupleRole {
    New,
    OldKey,
    OldFull,
}

impl TupleRole {
    fn column_count(self) -> Field {
        Field::named(match self {
            TupleRole::New => "new tuple column count",
            TupleRole::OldKey => "old key column count",
            TupleRole::OldFull => "old tuple column count",
        })
    }

    fn kind_of(self, number: usize) -> Field {
        let name = match self {
            TupleRole::New => "kind of new tuple column",
            TupleRole::OldKey => "kind of old key column",
            TupleRole::OldFull => "kind of old tuple column",
        };
        Field::numbered(name, number)
    }

    fn length_of(self, number: usize) -> Field {
        let name = match self {
            TupleRole::New => "length of new tuple column",
            TupleRole::OldKey => "length of old key column",
            TupleRole::OldFull => "length of old tuple column",
        };
        Field::numbered(name, number)
    }

    fn column(self, number: usize) -> Field {
        let name = match self {
            TupleRole::New => "new tuple column",
            TupleRole::OldKey => "old key column",
            TupleRole::OldFull => "old tuple column",
        };
        Field::numbered(name, number)
    }
}

/// TupleData: an Int16 column count, then each column's kind and value.
fn tuple(r: &mut Reader, role: TupleRole) -> Result<Tuple, DecodeError> {
    let offset = r.pos;
    let count = usize::from(r.u16(role.column_count())?);
    // Every column takes at least its kind byte.
    r.check_count(role.column_count(), count, 1, offset)?;
    let mut values = Vec::with_capacity(count);
    for number in 1..=count {
        values.push(datum(r, role, number)?);
    }
    Ok(Tuple(values))
}

fn datum(r: &mut Reader, role: TupleRole, number: usize) -> Result<Datum, DecodeError> {
    let offset = r.pos;
    match r.u8(role.kind_of(number))? {
        b'n' => Ok(Datum::Null),
        b'u' => Ok(Datum::UnchangedToast),
        b't' => Ok(Datum::Text(value(r, role, number)?)),
        b'b' => Ok(Datum::Binary(value(r, role, number)?)),
        byte => Err(DecodeError::UnknownTupleKind {
            message: r.message,
            field: role.column(number),
            byte,
            offset,
        }),
    }
}

fn value(r: &mut Reader, role: TupleRole, number: usize) -> Result<Bytes, DecodeError> {
    let len = r.length(role.length_of(number))?;
    r.bytes(len, role.column(number))
}

fn truncate(r: &mut Reader, in_stream: bool) -> Result<Message, DecodeError> {
    const CASCADE: u8 = 1;
    const RESTART_IDENTITY: u8 = 2;
    let xid = r.stream_xid(in_stream)?;
    let count_offset = r.pos;
    let count = r.length(RELATION_COUNT)?;
    let options = r.flags(
        TRUNCATE_OPTIONS,
        CASCADE | RESTART_IDENTITY,
        "only 0x01 (CASCADE) and 0x02 (RESTART IDENTITY) are defined",
    )?;
    r.check_count(RELATION_COUNT, count, 4, count_offset)?;
    let mut relations = Vec::with_capacity(count);
    for number in 1..=count {
        relations.push(r.u32(Field::numbered("OID of relation", number))?);
    }
    Ok(Message::Truncate {
        xid,
        cascade: options & CASCADE != 0,
        restart_identity: options & RESTART_IDENTITY != 0,
        relations,
    })
}

fn logical_message(r: &mut Reader, in_stream: bool) -> Result<Message, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let flags = r.flags(FLAGS, 1, "only 0x01 (transactional) is defined")?;
    let lsn = r.lsn(MESSAGE_LSN)?;
    let prefix = r.string(PREFIX)?;
    let len = r.length(CONTENT_LENGTH)?;
    Ok(Message::LogicalMessage {
        xid,
        transactional: flags == 1,
        lsn,
        prefix,
        content: r.bytes(len, CONTENT)?,
    })
}

fn stream_start(r: &mut Reader) -> Result<Message, DecodeError> {
    let xid = r.u32(XID)?;
    let first = r.flags(FIRST_SEGMENT, 1, "expected 0 or 1")?;
    Ok(Message::StreamStart {
        xid,
        first_segment: first == 1,
    })
}

fn stream_commit(r: &mut Reader) -> Result<Message, DecodeError> {
    Ok(Message::StreamCommit {
        xid: r.u32(XID)?,
        flags: r.u8(FLAGS)?,
        commit_lsn: r.lsn(COMMIT_LSN)?,
        end_lsn: r.lsn(END_LSN)?,
        commit_time: r.i64(COMMIT_TIME)?,
    })
}

fn stream_abort(r: &mut Reader) -> Result<Message, DecodeError> {
    Ok(Message::StreamAbort {
        xid: r.u32(XID)?,
        subxid: r.u32(SUBXID)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// The bytes pgoutput writes for `msg` (proto.c's `logicalrep_write_*`). Change messages
    /// carry an xid exactly when `in_stream`; a message that disagrees is a bug in the test.
    fn encode(msg: &Message, in_stream: bool) -> Vec<u8> {
        let mut out = Vec::new();
        match msg {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                out.push(b'B');
                out.extend(final_lsn.0.to_be_bytes());
                out.extend(commit_time.to_be_bytes());
                out.extend(xid.to_be_bytes());
            }
            Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            } => {
                out.push(b'C');
                out.push(*flags);
                out.extend(commit_lsn.0.to_be_bytes());
                out.extend(end_lsn.0.to_be_bytes());
                out.extend(commit_time.to_be_bytes());
            }
            Message::Origin { lsn, name } => {
                out.push(b'O');
                out.extend(lsn.0.to_be_bytes());
                put_str(&mut out, name);
            }
            Message::Relation(rel) => {
                out.push(b'R');
                put_stream_xid(&mut out, rel.xid, in_stream);
                out.extend(rel.oid.to_be_bytes());
                put_str(&mut out, &rel.namespace);
                put_str(&mut out, &rel.name);
                out.push(rel.replica_identity);
                put_count16(&mut out, rel.columns.len());
                for column in &rel.columns {
                    out.push(u8::from(column.key));
                    put_str(&mut out, &column.name);
                    out.extend(column.type_oid.to_be_bytes());
                    out.extend(column.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                xid,
                oid,
                namespace,
                name,
            } => {
                out.push(b'Y');
                put_stream_xid(&mut out, *xid, in_stream);
                out.extend(oid.to_be_bytes());
                put_str(&mut out, namespace);
                put_str(&mut out, name);
            }
            Message::Insert { xid, relation, new } => {
                out.push(b'I');
                put_stream_xid(&mut out, *xid, in_stream);
                out.extend(relation.to_be_bytes());
                out.push(b'N');
                put_tuple(&mut out, new);
            }
            Message::Update {
                xid,
                relation,
                old,
                new,
            } => {
                out.push(b'U');
                put_stream_xid(&mut out, *xid, in_stream);
                out.extend(relation.to_be_bytes());
                if let Some(old) = old {
                    put_old_tuple(&mut out, old);
                }
                out.push(b'N');
                put_tuple(&mut out, new);
            }
            Message::Delete { xid, relation, old } => {
                out.push(b'D');
                put_stream_xid(&mut out, *xid, in_stream);
                out.extend(relation.to_be_bytes());
                put_old_tuple(&mut out, old);
            }
            Message::Truncate {
                xid,
                cascade,
                restart_identity,
                relations,
            } => {
                out.push(b'T');
                put_stream_xid(&mut out, *xid, in_stream);
                put_len32(&mut out, relations.len());
                out.push(u8::from(*cascade) | u8::from(*restart_identity) << 1);
                for oid in relations {
                    out.extend(oid.to_be_bytes());
                }
            }
            Message::LogicalMessage {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            } => {
                out.push(b'M');
                put_stream_xid(&mut out, *xid, in_stream);
                out.push(u8::from(*transactional));
                out.extend(lsn.0.to_be_bytes());
                put_str(&mut out, prefix);
                put_len32(&mut out, content.len());
                out.extend_from_slice(content);
            }
            Message::StreamStart { xid, first_segment } => {
                out.push(b'S');
                out.extend(xid.to_be_bytes());
                out.push(u8::from(*first_segment));
            }
            Message::StreamStop => out.push(b'E'),
            Message::StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            } => {
                out.push(b'c');
                out.extend(xid.to_be_bytes());
                out.push(*flags);
                out.extend(commit_lsn.0.to_be_bytes());
                out.extend(end_lsn.0.to_be_bytes());
                out.extend(commit_time.to_be_bytes());
            }
            Message::StreamAbort { xid, subxid } => {
                out.push(b'A');
                out.extend(xid.to_be_bytes());
                out.extend(subxid.to_be_bytes());
            }
        }
        out
    }

    fn put_stream_xid(out: &mut Vec<u8>, xid: Option<u32>, in_stream: bool) {
        assert_eq!(
            xid.is_some(),
            in_stream,
            "xid {xid:?} with in_stream {in_stream}"
        );
        if let Some(xid) = xid {
            out.extend(xid.to_be_bytes());
        }
    }

    fn put_str(out: &mut Vec<u8>, text: &str) {
        assert!(
            !text.contains('\0'),
            "{text:?} cannot be sent NUL-terminated"
        );
        out.extend_from_slice(text.as_bytes());
        out.push(0);
    }

    fn put_count16(out: &mut Vec<u8>, count: usize) {
        out.extend(u16::try_from(count).expect("at most 65535").to_be_bytes());
    }

    fn put_len32(out: &mut Vec<u8>, len: usize) {
        out.extend(i32::try_from(len).expect("at most i32::MAX").to_be_bytes());
    }

    fn put_old_tuple(out: &mut Vec<u8>, old: &OldTuple) {
        let (marker, tuple) = match old {
            OldTuple::Key(tuple) => (b'K', tuple),
            OldTuple::Full(tuple) => (b'O', tuple),
        };
        out.push(marker);
        put_tuple(out, tuple);
    }

    fn put_tuple(out: &mut Vec<u8>, tuple: &Tuple) {
        put_count16(out, tuple.0.len());
        for datum in &tuple.0 {
            match datum {
                Datum::Null => out.push(b'n'),
                Datum::UnchangedToast => out.push(b'u'),
                Datum::Text(value) => put_value(out, b't', value),
                Datum::Binary(value) => put_value(out, b'b', value),
            }
        }
    }

    fn put_value(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
        out.push(kind);
        put_len32(out, value.len());
        out.extend_from_slice(value);
    }

    /// Bytes written for reading: groups of hex digits and "quoted" ASCII, separated by spaces.
    fn wire(text: &str) -> Bytes {
        let mut out = Vec::new();
        for token in text.split_whitespace() {
            if let Some(ascii) = token.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
                out.extend_from_slice(ascii.as_bytes());
                continue;
            }
            assert!(
                token.len() % 2 == 0,
                "odd number of hex digits in {token:?}"
            );
            for pair in token.as_bytes().chunks(2) {
                let pair = std::str::from_utf8(pair).unwrap();
                out.push(u8::from_str_radix(pair, 16).unwrap());
            }
        }
        Bytes::from(out)
    }

    fn text(value: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    #[track_caller]
    fn decoded(text: &str, in_stream: bool) -> Message {
        decode(&wire(text), in_stream).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[track_caller]
    fn error(text: &str, in_stream: bool) -> String {
        match decode(&wire(text), in_stream) {
            Ok(msg) => panic!("{text} decoded to {msg:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn decodes_begin_commit_and_origin() {
        let begin = r#""B" 00000016B374D848 0002A8C3F1D2E000 000002EA"#;
        assert_eq!(
            decoded(begin, false),
            Message::Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_time: 0x0002_A8C3_F1D2_E000,
                xid: 746,
            }
        );
        let commit = r#""C" 00 00000016B374D848 00000016B374D880 0002A8C3F1D2E000"#;
        assert_eq!(
            decoded(commit, false),
            Message::Commit {
                flags: 0,
                commit_lsn: Lsn(0x16_B374_D848),
                end_lsn: Lsn(0x16_B374_D880),
                commit_time: 0x0002_A8C3_F1D2_E000,
            }
        );
        let origin = r#""O" 0000000000ABCDEF "node_a" 00"#;
        assert_eq!(
            decoded(origin, false),
            Message::Origin {
                lsn: Lsn(0xAB_CDEF),
                name: "node_a".to_owned(),
            }
        );
    }

    #[test]
    fn decodes_a_relation_with_its_key_and_type_modifiers() {
        // id integer primary key, note varchar(20), total numeric(10,2); replica identity 'd'.
        let relation = r#""R" 00004001 "public" 00 "orders" 00 64 0003
            01 "id" 00 00000017 FFFFFFFF
            00 "note" 00 00000413 00000018
            00 "total" 00 000006A4 000A0006"#;
        let column = |key, name: &str, type_oid, type_modifier| Column {
            key,
            name: name.to_owned(),
            type_oid,
            type_modifier,
        };
        assert_eq!(
            decoded(relation, false),
            Message::Relation(Relation {
                xid: None,
                oid: 0x4001,
                namespace: "public".to_owned(),
                name: "orders".to_owned(),
                replica_identity: b'd',
                columns: vec![
                    column(true, "id", 23, -1),
                    column(false, "note", 1043, 24),
                    column(false, "total", 1700, (10 << 16 | 2) + 4),
                ],
            })
        );
    }

    #[test]
    fn change_messages_carry_an_xid_only_inside_a_stream() {
        let relation = r#""R" 000002EA 00004001 00 "t" 00 66 0000"#;
        assert_eq!(
            decoded(relation, true),
            Message::Relation(Relation {
                xid: Some(746),
                oid: 0x4001,
                namespace: String::new(),
                name: "t".to_owned(),
                replica_identity: b'f',
                columns: vec![],
            })
        );
        let insert = r#""I" 000002EB 00004001 "N" 0001 "n""#;
        let expected = Message::Insert {
            xid: Some(747),
            relation: 0x4001,
            new: Tuple(vec![Datum::Null]),
        };
        assert_eq!(decoded(insert, true), expected);
        // The same bytes outside a stream: the xid is read as the relation, and then 0x00
        // where the 'N' marker should be.
        assert_eq!(
            error(insert, false),
            "Insert message: expected 'N' at offset 5, found 0x00"
        );
        let typ = r#""Y" 000002EA 00004002 "public" 00 "mood" 00"#;
        assert_eq!(
            decoded(typ, true),
            Message::Type {
                xid: Some(746),
                oid: 0x4002,
                namespace: "public".to_owned(),
                name: "mood".to_owned(),
            }
        );
        let truncate = r#""T" 000002EA 00000001 00 00004001"#;
        assert!(matches!(
            decoded(truncate, true),
            Message::Truncate { xid: Some(746), .. }
        ));
        let message = r#""M" 000002EA 01 0000000001000000 "p" 00 00000000"#;
        assert!(matches!(
            decoded(message, true),
            Message::LogicalMessage { xid: Some(746), .. }
        ));
    }

    #[test]
    fn decodes_a_type() {
        assert_eq!(
            decoded(r#""Y" 00004002 "public" 00 "mood" 00"#, false),
            Message::Type {
                xid: None,
                oid: 0x4002,
                namespace: "public".to_owned(),
                name: "mood".to_owned(),
            }
        );
    }

    #[test]
    fn decodes_an_insert_with_every_column_kind() {
        let insert = r#""I" 00004001 "N" 0004 "t" 00000002 "42" "n" "u" "b" 00000003 00FF01"#;
        assert_eq!(
            decoded(insert, false),
            Message::Insert {
                xid: None,
                relation: 0x4001,
                new: Tuple(vec![
                    text("42"),
                    Datum::Null,
                    Datum::UnchangedToast,
                    Datum::Binary(Bytes::from_static(&[0, 0xFF, 1])),
                ]),
            }
        );
    }

    #[test]
    fn column_values_are_slices_of_the_input() {
        let data = wire(r#""I" 00004001 "N" 0002 "t" 00000005 "hello" "b" 00000002 BEEF"#);
        let Ok(Message::Insert { new, .. }) = decode(&data, false) else {
            panic!("not an insert");
        };
        let input = data.as_ptr_range();
        for datum in &new.0 {
            let (Datum::Text(value) | Datum::Binary(value)) = datum else {
                panic!("{datum:?} has no value");
            };
            let slice = value.as_ptr_range();
            assert!(
                input.start <= slice.start && slice.end <= input.end,
                "{datum:?} was copied"
            );
        }
    }

    #[test]
    fn decodes_updates_with_and_without_old_rows() {
        let new = Tuple(vec![text("2"), text("new")]);
        let plain = r#""U" 00004001 "N" 0002 "t" 00000001 "2" "t" 00000003 "new""#;
        assert_eq!(
            decoded(plain, false),
            Message::Update {
                xid: None,
                relation: 0x4001,
                old: None,
                new: new.clone(),
            }
        );
        let key = r#""U" 00004001 "K" 0002 "t" 00000001 "1" "n"
            "N" 0002 "t" 00000001 "2" "t" 00000003 "new""#;
        assert_eq!(
            decoded(key, false),
            Message::Update {
                xid: None,
                relation: 0x4001,
                old: Some(OldTuple::Key(Tuple(vec![text("1"), Datum::Null]))),
                new: new.clone(),
            }
        );
        let full = r#""U" 00004001 "O" 0002 "t" 00000001 "2" "t" 00000003 "old"
            "N" 0002 "t" 00000001 "2" "t" 00000003 "new""#;
        assert_eq!(
            decoded(full, false),
            Message::Update {
                xid: None,
                relation: 0x4001,
                old: Some(OldTuple::Full(Tuple(vec![text("2"), text("old")]))),
                new,
            }
        );
    }

    #[test]
    fn decodes_deletes_by_key_and_by_whole_row() {
        assert_eq!(
            decoded(r#""D" 00004001 "K" 0002 "t" 00000001 "7" "n""#, false),
            Message::Delete {
                xid: None,
                relation: 0x4001,
                old: OldTuple::Key(Tuple(vec![text("7"), Datum::Null])),
            }
        );
        assert_eq!(
            decoded(
                r#""D" 00004001 "O" 0002 "t" 00000001 "7" "t" 00000000"#,
                false
            ),
            Message::Delete {
                xid: None,
                relation: 0x4001,
                old: OldTuple::Full(Tuple(vec![text("7"), text("")])),
            }
        );
    }

    #[test]
    fn decodes_truncate_options() {
        let truncate = |options: &str| {
            decoded(
                &format!(r#""T" 00000002 {options} 00004001 00004003"#),
                false,
            )
        };
        for (options, cascade, restart_identity) in [
            ("00", false, false),
            ("01", true, false),
            ("02", false, true),
            ("03", true, true),
        ] {
            assert_eq!(
                truncate(options),
                Message::Truncate {
                    xid: None,
                    cascade,
                    restart_identity,
                    relations: vec![0x4001, 0x4003],
                },
                "options {options}"
            );
        }
    }

    #[test]
    fn decodes_logical_messages() {
        let transactional = r#""M" 01 0000000001000000 "bite" 00 00000003 00FF61"#;
        assert_eq!(
            decoded(transactional, false),
            Message::LogicalMessage {
                xid: None,
                transactional: true,
                lsn: Lsn(0x100_0000),
                prefix: "bite".to_owned(),
                content: Bytes::from_static(b"\x00\xFFa"),
            }
        );
        let not = r#""M" 00 0000000001000000 "bite" 00 00000000"#;
        assert!(matches!(
            decoded(not, false),
            Message::LogicalMessage { transactional: false, ref content, .. } if content.is_empty()
        ));
    }

    #[test]
    fn decodes_stream_control_messages() {
        assert_eq!(
            decoded(r#""S" 000002EA 01"#, false),
            Message::StreamStart {
                xid: 746,
                first_segment: true,
            }
        );
        assert_eq!(
            decoded(r#""S" 000002EA 00"#, false),
            Message::StreamStart {
                xid: 746,
                first_segment: false,
            }
        );
        assert_eq!(decoded(r#""E""#, true), Message::StreamStop);
        let commit = r#""c" 000002EA 00 00000016B374D848 00000016B374D880 0002A8C3F1D2E000"#;
        assert_eq!(
            decoded(commit, false),
            Message::StreamCommit {
                xid: 746,
                flags: 0,
                commit_lsn: Lsn(0x16_B374_D848),
                end_lsn: Lsn(0x16_B374_D880),
                commit_time: 0x0002_A8C3_F1D2_E000,
            }
        );
        assert_eq!(
            decoded(r#""A" 000002EA 000002EB"#, false),
            Message::StreamAbort {
                xid: 746,
                subxid: 747,
            }
        );
    }

    #[test]
    fn errors_say_which_message_field_and_offset() {
        // Column 3's value starts at offset 40 and claims 812 bytes; 12 are there.
        let short = r#""I" 00004001 "N" 0003 "t" 0000000A "0123456789" "t" 00000007 "abcdefg"
            "t" 0000032C "twelve_bytes""#;
        let cases = [
            (
                short,
                "truncated Insert message: new tuple column 3 needs 812 bytes at offset 40, 12 left",
            ),
            ("", "empty message: no type byte"),
            (r#""P""#, "unknown message type byte 'P' (0x50) at offset 0"),
            (
                r#""B" 00"#,
                "truncated Begin message: final LSN needs 8 bytes at offset 1, 1 left",
            ),
            (
                r#""I" 00004001 "N" 0001 "x""#,
                "Insert message: new tuple column 1 has unknown kind byte 'x' (0x78) at offset 8 \
                 (expected 'n', 'u', 't' or 'b')",
            ),
            (
                r#""E" 00"#,
                "Stream Stop message: 1 byte left over after the complete message at offset 1",
            ),
            (
                r#""I" 00004001 "N" 0001 "t" FFFFFFFF"#,
                "Insert message: length of new tuple column 1 at offset 9 is negative (-1)",
            ),
            (
                r#""T" 80000000 00"#,
                "Truncate message: relation count at offset 1 is negative (-2147483648)",
            ),
            (
                r#""R" 00004001 00 "t" 00 64 FFFF 01"#,
                "Relation message: column count 65535 at offset 9 needs at least 655350 bytes, \
                 1 left after it",
            ),
            (
                r#""T" 7FFFFFFF 00"#,
                "Truncate message: relation count 2147483647 at offset 1 needs at least \
                 8589934588 bytes, 0 left after it",
            ),
            (
                r#""U" 00004001 "N" 0100 "n""#,
                "Update message: new tuple column count 256 at offset 6 needs at least 256 bytes, \
                 1 left after it",
            ),
            (
                r#""O" 0000000000000000 "ab" FF 00"#,
                "Origin message: origin name is not UTF-8 (invalid byte at offset 11)",
            ),
            (
                r#""O" 0000000000000000 "ab""#,
                "truncated Origin message: origin name at offset 9 has no terminating NUL",
            ),
            (
                r#""D" 00004001 "N" 0000"#,
                "Delete message: expected 'K' or 'O' at offset 5, found 'N' (0x4e)",
            ),
            (
                r#""U" 00004001 "K" 0000 "K" 0000"#,
                "Update message: expected 'N' at offset 8, found 'K' (0x4b)",
            ),
            (
                r#""T" 00000000 04"#,
                "Truncate message: options at offset 5 is 0x04; only 0x01 (CASCADE) and 0x02 \
                 (RESTART IDENTITY) are defined",
            ),
            (
                r#""S" 00000001 02"#,
                "Stream Start message: first segment flag at offset 5 is 0x02; expected 0 or 1",
            ),
            (
                r#""R" 00004001 00 "t" 00 64 0001 03 "id" 00 00000017 FFFFFFFF"#,
                "Relation message: flags of column 1 at offset 11 is 0x03; only 0x01 (part of the \
                 replica identity) is defined",
            ),
            (
                r#""M" 02 0000000000000000 00 00000000"#,
                "Message message: flags at offset 1 is 0x02; only 0x01 (transactional) is defined",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(error(text, false), expected, "decoding {text}");
        }
    }

    #[test]
    fn invalid_utf8_keeps_its_cause() {
        let err = decode(&wire(r#""O" 0000000000000000 FF 00"#), false).unwrap_err();
        assert!(std::error::Error::source(&err).is_some(), "{err:?}");
    }

    #[test]
    fn stream_state_decodes_chunks_with_their_xids() {
        let mut state = StreamState::default();
        let insert = wire(r#""I" 000002EA 00004001 "N" 0001 "n""#);
        assert!(
            state.decode(&insert).is_err(),
            "outside a chunk there is no xid"
        );
        assert_eq!(
            state.decode(&wire(r#""S" 000002EA 01"#)),
            Ok(Message::StreamStart {
                xid: 746,
                first_segment: true,
            })
        );
        assert_eq!(state.streaming_xid(), Some(746));
        assert!(matches!(
            state.decode(&insert),
            Ok(Message::Insert { xid: Some(746), .. })
        ));
        assert_eq!(state.decode(&wire(r#""E""#)), Ok(Message::StreamStop));
        assert_eq!(state.streaming_xid(), None);
        assert!(matches!(
            state.decode(&wire(
                r#""c" 000002EA 00 0000000000000001 0000000000000002 0000000000000003"#
            )),
            Ok(Message::StreamCommit { xid: 746, .. })
        ));
    }

    #[test]
    fn stream_state_rejects_nesting_and_a_stop_without_a_start() {
        let mut state = StreamState::default();
        assert_eq!(
            state.decode(&wire(r#""E""#)),
            Err(DecodeError::StreamStopWithoutStart)
        );
        state.decode(&wire(r#""S" 00000001 01"#)).unwrap();
        let nested = state.decode(&wire(r#""S" 00000002 01"#)).unwrap_err();
        assert_eq!(
            nested.to_string(),
            "Stream Start for transaction 2 while the chunk of transaction 1 is still open"
        );
        assert_eq!(
            state.streaming_xid(),
            Some(1),
            "an error leaves the state alone"
        );
        assert!(state.decode(&wire(r#""Q""#)).is_err());
        assert_eq!(state.streaming_xid(), Some(1));
        assert_eq!(state.decode(&wire(r#""E""#)), Ok(Message::StreamStop));
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    fn name() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,8}"
    }

    fn content() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..12).prop_map(Bytes::from)
    }

    fn datum() -> impl Strategy<Value = Datum> {
        prop_oneof![
            Just(Datum::Null),
            Just(Datum::UnchangedToast),
            content().prop_map(Datum::Text),
            content().prop_map(Datum::Binary),
        ]
    }

    fn tuple() -> impl Strategy<Value = Tuple> {
        vec(datum(), 0..5).prop_map(Tuple)
    }

    fn old_tuple() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            tuple().prop_map(OldTuple::Key),
            tuple().prop_map(OldTuple::Full)
        ]
    }

    fn column() -> impl Strategy<Value = Column> {
        (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
            |(key, name, type_oid, type_modifier)| Column {
                key,
                name,
                type_oid,
                type_modifier,
            },
        )
    }

    /// Any message, with the `in_stream` it is sent with (change messages carry an xid
    /// exactly when in a stream; the rest look the same either way).
    fn message() -> impl Strategy<Value = (Message, bool)> {
        let xid = any::<Option<u32>>;
        prop_oneof![
            (lsn(), any::<i64>(), any::<u32>(), any::<bool>()).prop_map(
                |(final_lsn, commit_time, xid, in_stream)| {
                    let begin = Message::Begin {
                        final_lsn,
                        commit_time,
                        xid,
                    };
                    (begin, in_stream)
                }
            ),
            (any::<u8>(), lsn(), lsn(), any::<i64>(), any::<bool>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time, in_stream)| {
                    let commit = Message::Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    };
                    (commit, in_stream)
                }
            ),
            (lsn(), name(), any::<bool>())
                .prop_map(|(lsn, name, in_stream)| (Message::Origin { lsn, name }, in_stream)),
            (
                xid(),
                any::<u32>(),
                name(),
                name(),
                any::<u8>(),
                vec(column(), 0..4)
            )
                .prop_map(|(xid, oid, namespace, name, replica_identity, columns)| {
                    let relation = Relation {
                        xid,
                        oid,
                        namespace,
                        name,
                        replica_identity,
                        columns,
                    };
                    (Message::Relation(relation), xid.is_some())
                }),
            (xid(), any::<u32>(), name(), name()).prop_map(|(xid, oid, namespace, name)| {
                let typ = Message::Type {
                    xid,
                    oid,
                    namespace,
                    name,
                };
                (typ, xid.is_some())
            }),
            (xid(), any::<u32>(), tuple()).prop_map(|(xid, relation, new)| {
                (Message::Insert { xid, relation, new }, xid.is_some())
            }),
            (
                xid(),
                any::<u32>(),
                proptest::option::of(old_tuple()),
                tuple()
            )
                .prop_map(|(xid, relation, old, new)| {
                    let update = Message::Update {
                        xid,
                        relation,
                        old,
                        new,
                    };
                    (update, xid.is_some())
                }),
            (xid(), any::<u32>(), old_tuple()).prop_map(|(xid, relation, old)| {
                (Message::Delete { xid, relation, old }, xid.is_some())
            }),
            (xid(), any::<bool>(), any::<bool>(), vec(any::<u32>(), 0..4)).prop_map(
                |(xid, cascade, restart_identity, relations)| {
                    let truncate = Message::Truncate {
                        xid,
                        cascade,
                        restart_identity,
                        relations,
                    };
                    (truncate, xid.is_some())
                }
            ),
            (xid(), any::<bool>(), lsn(), name(), content()).prop_map(
                |(xid, transactional, lsn, prefix, content)| {
                    let message = Message::LogicalMessage {
                        xid,
                        transactional,
                        lsn,
                        prefix,
                        content,
                    };
                    (message, xid.is_some())
                }
            ),
            (any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
                |(xid, first_segment, in_stream)| {
                    (Message::StreamStart { xid, first_segment }, in_stream)
                }
            ),
            any::<bool>().prop_map(|in_stream| (Message::StreamStop, in_stream)),
            (
                any::<u32>(),
                any::<u8>(),
                lsn(),
                lsn(),
                any::<i64>(),
                any::<bool>()
            )
                .prop_map(
                    |(xid, flags, commit_lsn, end_lsn, commit_time, in_stream)| {
                        let commit = Message::StreamCommit {
                            xid,
                            flags,
                            commit_lsn,
                            end_lsn,
                            commit_time,
                        };
                        (commit, in_stream)
                    }
                ),
            (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(xid, subxid, in_stream)| {
                (Message::StreamAbort { xid, subxid }, in_stream)
            }),
        ]
    }

    /// One edit of a valid encoding, to reach the decoder's error paths.
    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(Index, u8),
        Insert(Index, u8),
        Remove(Index),
        Truncate(Index),
        /// Writes a big-endian Int32 over whatever is there: lengths and counts.
        Overwrite(Index, i32),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<Index>(), 1..=u8::MAX).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
            (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
            any::<Index>().prop_map(Mutation::Remove),
            any::<Index>().prop_map(Mutation::Truncate),
            (any::<Index>(), any::<i32>()).prop_map(|(at, value)| Mutation::Overwrite(at, value)),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
        let len = bytes.len();
        match mutation {
            Mutation::Flip(at, mask) if len > 0 => bytes[at.index(len)] ^= mask,
            Mutation::Insert(at, byte) => bytes.insert(at.index(len + 1), *byte),
            Mutation::Remove(at) if len > 0 => {
                bytes.remove(at.index(len));
            }
            Mutation::Truncate(at) => bytes.truncate(at.index(len + 1)),
            Mutation::Overwrite(at, value) if len >= 4 => {
                let start = at.index(len - 3);
                bytes[start..start + 4].copy_from_slice(&value.to_be_bytes());
            }
            _ => {}
        }
    }

    /// Decoding any bytes returns (never panics), and whatever decodes encodes back to exactly
    /// those bytes: nothing in the input was skipped or lost.
    fn check_exact(bytes: Vec<u8>) -> Result<(), TestCaseError> {
        let data = Bytes::from(bytes);
        for in_stream in [false, true] {
            if let Ok(msg) = decode(&data, in_stream) {
                prop_assert_eq!(&encode(&msg, in_stream)[..], &data[..], "{:?}", msg);
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn encoded_messages_decode_to_themselves((msg, in_stream) in message()) {
            let data = Bytes::from(encode(&msg, in_stream));
            prop_assert_eq!(decode(&data, in_stream), Ok(msg));
        }

        #[test]
        fn every_strict_prefix_is_an_error((msg, in_stream) in message()) {
            let data = Bytes::from(encode(&msg, in_stream));
            for len in 0..data.len() {
                let prefix = data.slice(..len);
                prop_assert!(decode(&prefix, in_stream).is_err(), "{:?} decoded", &prefix[..]);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn mutated_messages_decode_exactly_or_fail(
            (msg, in_stream) in message(),
            mutations in vec(mutation(), 1..4),
        ) {
            let mut bytes = encode(&msg, in_stream);
            for m in &mutations {
                apply(&mut bytes, m);
            }
            check_exact(bytes)?;
        }

        #[test]
        fn arbitrary_bytes_decode_exactly_or_fail(
            type_byte in prop_oneof![
                proptest::sample::select(b"BCORYIUDTMSEcA".to_vec()),
                any::<u8>(),
            ],
            rest in vec(any::<u8>(), 0..48),
        ) {
            let mut bytes = vec![type_byte];
            bytes.extend(rest);
            check_exact(bytes)?;
        }
    }
}
