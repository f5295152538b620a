//! Decoding the `pgoutput` logical replication protocol (versions 1 and 2), as pure functions
//! over bytes.
//!
//! Each XLogData payload of the replication stream is one message. Reference:
//! <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>.
//!
//! Invariants:
//! - Decoding never panics and never allocates more than the input justifies: every length and
//!   count is checked against the bytes that are left before it is used.
//! - Column values are slices of the input ([`Bytes`]), not copies.
//! - Inside a streamed transaction (between Stream Start and Stream Stop, protocol version 2)
//!   change messages carry the transaction id; the caller says whether it is inside one.

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
        /// The type's OID.
        oid: u32,
        /// Its schema.
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
    /// A chunk of an in-progress transaction starts ('S', version 2).
    StreamStart {
        /// The transaction.
        xid: u32,
        /// Whether this is the transaction's first chunk.
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
    /// A streamed transaction, or one of its subtransactions, aborted ('A', version 2).
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
