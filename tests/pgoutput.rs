//! The pgoutput decoder against the bytes PostgreSQL 15 really sends.
//!
//! Each test writes to its own database on the source cluster and reads the protocol messages
//! back through a logical slot with `pg_logical_slot_get_binary_changes` (the same pgoutput
//! plugin and options as a replication connection, `proto_version` 2 with streaming and logical
//! messages on), decoding every row with [`StreamState`].
//!
//! The slots are temporary, so a failing test's slot goes away with its connection; passing
//! tests also drop theirs explicitly.

mod support;

use std::time::Duration;

use bite_sync::repl::Lsn;
use bite_sync::repl::pgoutput::{Column, Datum, Message, OldTuple, Relation, StreamState, Tuple};
use bytes::Bytes;
use support::{TestDbs, connect, test_dbs};
use tokio_postgres::Client;

/// How long a test waits for the changes it expects to become readable.
const TIMEOUT: Duration = Duration::from_secs(30);

/// One slot row: the LSN PostgreSQL gave it and its decoded message.
type Change = (Lsn, Message);

/// A temporary pgoutput slot on a test database, read by the session that created it.
struct Slot {
    reader: Client,
    name: String,
    state: StreamState,
}

impl Slot {
    /// Creates the slot for the publication `pub`. `reader_settings` is SQL run first in the
    /// reading session (decoding runs there, with its settings).
    async fn create(dbs: &TestDbs, reader_settings: &str) -> Slot {
        let reader = connect(&dbs.source_url).await;
        // Fixed output for timestamptz values, whatever the server's default zone.
        reader
            .batch_execute(&format!("SET TimeZone = 'UTC'; {reader_settings}"))
            .await
            .expect("reader settings");
        // Slot names are cluster-wide; the database name is unique and a valid slot name.
        let name = dbs.name.clone();
        reader
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput', temporary => true)",
                &[&name],
            )
            .await
            .unwrap_or_else(|e| panic!("create slot {name}: {e}"));
        Slot {
            reader,
            name,
            state: StreamState::default(),
        }
    }

    /// The rows written since the last read, decoded in order.
    async fn read(&mut self) -> Vec<Change> {
        let rows = self
            .reader
            .query(
                "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
                 'proto_version', '2', 'publication_names', 'pub', 'streaming', 'on', \
                 'messages', 'true')",
                &[&self.name],
            )
            .await
            .unwrap_or_else(|e| panic!("read slot {}: {e}", self.name));
        rows.iter()
            .map(|row| {
                let lsn: String = row.get(0);
                let lsn: Lsn = lsn.parse().expect("PostgreSQL prints LSNs we parse");
                let data = Bytes::from(row.get::<_, Vec<u8>>(1));
                match self.state.decode(&data) {
                    Ok(message) => (lsn, message),
                    Err(e) => panic!("row at {lsn} does not decode: {e}\nbytes: {data:?}"),
                }
            })
            .collect()
    }

    /// Reads until `done` holds for everything read so far (the WAL of a rollback or a
    /// non-transactional message becomes readable only once it is flushed), then checks the
    /// framing every stream must have.
    async fn read_until(&mut self, what: &str, done: impl Fn(&[Change]) -> bool) -> Vec<Change> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut changes = Vec::new();
        loop {
            changes.extend(self.read().await);
            if done(&changes) {
                check_framing(&changes);
                return changes;
            }
            if tokio::time::Instant::now() >= deadline {
                let kinds: Vec<_> = changes.iter().map(|(_, m)| kind(m)).collect();
                panic!("timed out after {TIMEOUT:?} waiting for {what}; read {kinds:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drops the slot and checks that it is gone.
    async fn drop(self) {
        self.reader
            .execute("SELECT pg_drop_replication_slot($1)", &[&self.name])
            .await
            .unwrap_or_else(|e| panic!("drop slot {}: {e}", self.name));
        let left = self
            .reader
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .expect("slot count");
        assert_eq!(
            left.get::<_, i64>(0),
            0,
            "slot {} is still there",
            self.name
        );
    }
}

/// A fresh database with `schema` and a publication `pub` of all its tables, a client to write
/// with, and a slot whose reader ran `reader_settings`.
async fn source(test: &str, schema: &str, reader_settings: &str) -> (TestDbs, Client, Slot) {
    let dbs = test_dbs(test).await;
    let writer = connect(&dbs.source_url).await;
    writer
        .batch_execute(&format!("{schema}; CREATE PUBLICATION pub FOR ALL TABLES"))
        .await
        .expect("schema");
    let slot = Slot::create(&dbs, reader_settings).await;
    (dbs, writer, slot)
}

/// Runs each statement in a transaction of its own (a multi-statement batch is one transaction).
async fn run_each(client: &Client, statements: &[&str]) {
    for sql in statements {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// What a stream promises and the apply engine relies on: transactions do not overlap, a
/// Begin's final LSN is its Commit's commit LSN, a commit's row is at its end LSN (as is the
/// XLogData header's on a replication connection), and changes come only inside a transaction
/// or a streamed chunk (transactional logical messages too; non-transactional ones only
/// outside).
fn check_framing(changes: &[Change]) {
    let mut open: Option<Lsn> = None;
    let mut streaming = false;
    for (row_lsn, message) in changes {
        let inside = open.is_some() || streaming;
        match message {
            Message::Begin { final_lsn, .. } => {
                assert!(!inside, "Begin at {row_lsn} inside a transaction");
                open = Some(*final_lsn);
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                assert_eq!(open.take(), Some(*commit_lsn), "Commit at {row_lsn}");
                assert_eq!(row_lsn, end_lsn, "a Commit's row is at its end LSN");
                assert!(commit_lsn < end_lsn);
            }
            Message::StreamStart { .. } => {
                assert!(!inside, "Stream Start at {row_lsn} inside a transaction");
                streaming = true;
            }
            Message::StreamStop => streaming = false,
            Message::StreamCommit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                assert!(!inside, "Stream Commit at {row_lsn} inside a chunk");
                assert_eq!(row_lsn, end_lsn, "a Stream Commit's row is at its end LSN");
                assert!(commit_lsn < end_lsn);
            }
            Message::StreamAbort { .. } => assert!(!inside, "Stream Abort at {row_lsn} inside"),
            Message::LogicalMessage {
                transactional: false,
                ..
            } => assert!(!inside, "non-transactional message at {row_lsn} inside"),
            _ => assert!(
                inside,
                "{} at {row_lsn} outside a transaction",
                kind(message)
            ),
        }
    }
    assert!(
        open.is_none() && !streaming,
        "the last transaction is not finished"
    );
}

/// The message's name, for failure output.
fn kind(message: &Message) -> &'static str {
    match message {
        Message::Begin { .. } => "Begin",
        Message::Commit { .. } => "Commit",
        Message::Origin { .. } => "Origin",
        Message::Relation(_) => "Relation",
        Message::Type { .. } => "Type",
        Message::Insert { .. } => "Insert",
        Message::Update { .. } => "Update",
        Message::Delete { .. } => "Delete",
        Message::Truncate { .. } => "Truncate",
        Message::LogicalMessage { .. } => "Message",
        Message::StreamStart { .. } => "StreamStart",
        Message::StreamStop => "StreamStop",
        Message::StreamCommit { .. } => "StreamCommit",
        Message::StreamAbort { .. } => "StreamAbort",
    }
}

fn kinds(changes: &[Change]) -> Vec<&'static str> {
    changes.iter().map(|(_, m)| kind(m)).collect()
}

fn commits(changes: &[Change]) -> usize {
    changes
        .iter()
        .filter(|(_, m)| matches!(m, Message::Commit { .. }))
        .count()
}

fn text(value: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(value.as_bytes()))
}

fn column(key: bool, name: &str, type_oid: u32, type_modifier: i32) -> Column {
    Column {
        key,
        name: name.to_owned(),
        type_oid,
        type_modifier,
    }
}

/// A relation's or type's OID on the source.
async fn oid(client: &Client, regclass_or_type: &str) -> u32 {
    client
        .query_one(&format!("SELECT {regclass_or_type}::oid"), &[])
        .await
        .unwrap_or_else(|e| panic!("{regclass_or_type}: {e}"))
        .get(0)
}

/// The current transaction's id (epoch 0 on a fresh cluster, so it fits a u32).
async fn current_xid(client: &impl tokio_postgres::GenericClient) -> u32 {
    let xid: String = client
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("xid")
        .get(0);
    xid.parse().expect("a 32-bit xid")
}

/// `numeric(precision, scale)`'s type modifier.
fn numeric_typmod(precision: i32, scale: i32) -> i32 {
    (precision << 16 | scale) + 4
}

const DISH: &str = "CREATE TABLE dish (
    id integer PRIMARY KEY, name varchar(40) NOT NULL, price numeric(6,2), vegan boolean,
    tags text[], added timestamptz, photo bytea, info jsonb)";

#[tokio::test]
async fn rows_decode_with_their_values_and_nulls() {
    let (_dbs, writer, mut slot) = source("pgoutput_rows", DISH, "").await;
    // The row's transaction id and start time (PostgreSQL's epoch, microseconds).
    let first = writer
        .query_one(
            "INSERT INTO dish VALUES (1, 'Pad Thai', 11.5, false, '{noodles,\"spicy hot\"}', \
             '2024-05-01 14:00:00+02', '\\x00ff', '{\"kcal\": 640}') \
             RETURNING pg_current_xact_id()::text, \
             (extract(epoch FROM now() - '2000-01-01 00:00:00+00') * 1000000)::bigint",
            &[],
        )
        .await
        .expect("insert");
    let (xid, started): (String, i64) = (first.get(0), first.get(1));
    run_each(
        &writer,
        &[
            "INSERT INTO dish (id, name) VALUES (2, 'Water')",
            "UPDATE dish SET price = 12, vegan = NULL WHERE id = 1",
            "DELETE FROM dish WHERE id = 2",
        ],
    )
    .await;
    let changes = slot
        .read_until("four transactions", |c| commits(c) == 4)
        .await;

    assert_eq!(
        kinds(&changes),
        [
            "Begin", "Relation", "Insert", "Commit", "Begin", "Insert", "Commit", "Begin",
            "Update", "Commit", "Begin", "Delete", "Commit"
        ]
    );
    let Message::Begin {
        xid: begin_xid,
        commit_time,
        ..
    } = &changes[0].1
    else {
        unreachable!("checked above");
    };
    assert_eq!(begin_xid.to_string(), xid);
    assert!(
        (started..started + 60_000_000).contains(commit_time),
        "commit time {commit_time} is not just after the transaction's start {started}"
    );
    let dish = oid(&writer, "'dish'::regclass").await;
    assert_eq!(
        changes[1].1,
        Message::Relation(Relation {
            xid: None,
            oid: dish,
            namespace: "public".to_owned(),
            name: "dish".to_owned(),
            replica_identity: b'd',
            columns: vec![
                column(true, "id", 23, -1),
                column(false, "name", 1043, 40 + 4),
                column(false, "price", 1700, numeric_typmod(6, 2)),
                column(false, "vegan", 16, -1),
                column(false, "tags", 1009, -1),
                column(false, "added", 1184, -1),
                column(false, "photo", 17, -1),
                column(false, "info", 3802, -1),
            ],
        })
    );
    let full_row = |price: &str, vegan: Datum| {
        Tuple(vec![
            text("1"),
            text("Pad Thai"),
            text(price),
            vegan,
            text("{noodles,\"spicy hot\"}"),
            text("2024-05-01 12:00:00+00"),
            text("\\x00ff"),
            text("{\"kcal\": 640}"),
        ])
    };
    assert_eq!(
        changes[2].1,
        Message::Insert {
            xid: None,
            relation: dish,
            new: full_row("11.50", text("f")),
        }
    );
    let mut water = vec![Datum::Null; 8];
    water[0] = text("2");
    water[1] = text("Water");
    assert_eq!(
        changes[5].1,
        Message::Insert {
            xid: None,
            relation: dish,
            new: Tuple(water),
        }
    );
    // The key did not change: no old row.
    assert_eq!(
        changes[8].1,
        Message::Update {
            xid: None,
            relation: dish,
            old: None,
            new: full_row("12.00", Datum::Null),
        }
    );
    // Default replica identity: the key, and NULL for every other column.
    let mut key = vec![Datum::Null; 8];
    key[0] = text("2");
    assert_eq!(
        changes[11].1,
        Message::Delete {
            xid: None,
            relation: dish,
            old: OldTuple::Key(Tuple(key)),
        }
    );
    slot.drop().await;
}

#[tokio::test]
async fn an_update_of_the_key_sends_the_old_key() {
    let schema = "CREATE TABLE seat (id integer PRIMARY KEY, label text, taken boolean)";
    let (_dbs, writer, mut slot) = source("pgoutput_key_update", schema, "").await;
    run_each(
        &writer,
        &[
            "INSERT INTO seat VALUES (1, 'window', false)",
            "UPDATE seat SET id = 10, taken = true WHERE id = 1",
        ],
    )
    .await;
    let changes = slot
        .read_until("two transactions", |c| commits(c) == 2)
        .await;

    let seat = oid(&writer, "'seat'::regclass").await;
    let update = changes
        .iter()
        .find(|(_, m)| matches!(m, Message::Update { .. }))
        .map(|(_, m)| m);
    assert_eq!(
        update,
        Some(&Message::Update {
            xid: None,
            relation: seat,
            old: Some(OldTuple::Key(Tuple(vec![
                text("1"),
                Datum::Null,
                Datum::Null
            ]))),
            new: Tuple(vec![text("10"), text("window"), text("t")]),
        })
    );
    slot.drop().await;
}

#[tokio::test]
async fn replica_identity_full_sends_whole_old_rows() {
    let schema = "CREATE TABLE tip (waiter text, amount numeric, note text);
                  ALTER TABLE tip REPLICA IDENTITY FULL";
    let (_dbs, writer, mut slot) = source("pgoutput_identity_full", schema, "").await;
    run_each(
        &writer,
        &[
            "INSERT INTO tip VALUES ('ana', 2.5, NULL)",
            "UPDATE tip SET amount = 3",
            "DELETE FROM tip",
        ],
    )
    .await;
    let changes = slot
        .read_until("three transactions", |c| commits(c) == 3)
        .await;

    let tip = oid(&writer, "'tip'::regclass").await;
    // pgoutput sends a Relation again whenever its cache entry was invalidated (an analyze
    // between the transactions does it), so each message is found by kind, not by position.
    let messages: Vec<&Message> = changes.iter().map(|(_, m)| m).collect();
    let first = |kind: fn(&Message) -> bool| *messages.iter().find(|m| kind(m)).unwrap();
    assert_eq!(
        first(|m| matches!(m, Message::Relation(_))),
        &Message::Relation(Relation {
            xid: None,
            oid: tip,
            namespace: "public".to_owned(),
            name: "tip".to_owned(),
            replica_identity: b'f',
            // Under FULL every column is part of the identity.
            columns: vec![
                column(true, "waiter", 25, -1),
                column(true, "amount", 1700, -1),
                column(true, "note", 25, -1),
            ],
        })
    );
    let row = |amount| Tuple(vec![text("ana"), text(amount), Datum::Null]);
    assert_eq!(
        first(|m| matches!(m, Message::Update { .. })),
        &Message::Update {
            xid: None,
            relation: tip,
            old: Some(OldTuple::Full(row("2.5"))),
            new: row("3"),
        }
    );
    assert_eq!(
        first(|m| matches!(m, Message::Delete { .. })),
        &Message::Delete {
            xid: None,
            relation: tip,
            old: OldTuple::Full(row("3")),
        }
    );
    slot.drop().await;
}

#[tokio::test]
async fn an_unchanged_toast_value_decodes_as_unchanged() {
    let schema = "CREATE TABLE menu (id integer PRIMARY KEY, body text, version integer)";
    let (_dbs, writer, mut slot) = source("pgoutput_toast", schema, "").await;
    // 100 kB of hex digests: pglz cannot shrink it by the quarter it requires, so it is stored
    // out of line as it is.
    writer
        .batch_execute(
            "INSERT INTO menu SELECT 1, string_agg(md5(g::text), ''), 1 FROM generate_series(1, 3200) g",
        )
        .await
        .expect("insert");
    let stored = writer
        .query_one(
            "SELECT body, pg_column_compression(body) IS NULL FROM menu",
            &[],
        )
        .await
        .expect("stored body");
    let (body, uncompressed): (String, bool) = (stored.get(0), stored.get(1));
    assert_eq!(body.len(), 102_400);
    assert!(uncompressed, "the body was compressed");
    run_each(
        &writer,
        &[
            "UPDATE menu SET version = 2",
            "UPDATE menu SET body = 'closed', version = 3",
        ],
    )
    .await;
    let changes = slot
        .read_until("three transactions", |c| commits(c) == 3)
        .await;

    let rows: Vec<&Tuple> = changes
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Insert { new, .. } | Message::Update { new, .. } => Some(new),
            _ => None,
        })
        .collect();
    assert_eq!(
        rows,
        [
            &Tuple(vec![text("1"), text(&body), text("1")]),
            // Only `version` changed: the TOASTed body is not sent again.
            &Tuple(vec![text("1"), Datum::UnchangedToast, text("2")]),
            &Tuple(vec![text("1"), text("closed"), text("3")]),
        ]
    );
    slot.drop().await;
}

#[tokio::test]
async fn truncate_sends_its_tables_and_options() {
    let schema = "CREATE TABLE orders (id integer PRIMARY KEY);
        CREATE TABLE order_lines (id serial PRIMARY KEY, order_id integer REFERENCES orders);
        CREATE TABLE tickets (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY);
        CREATE TABLE notes (id serial PRIMARY KEY)";
    let (_dbs, writer, mut slot) = source("pgoutput_truncate", schema, "").await;
    run_each(
        &writer,
        &[
            "TRUNCATE tickets, notes RESTART IDENTITY",
            "TRUNCATE orders CASCADE",
            "TRUNCATE orders RESTART IDENTITY CASCADE",
        ],
    )
    .await;
    let changes = slot
        .read_until("three transactions", |c| commits(c) == 3)
        .await;

    let [orders, order_lines, tickets, notes] = [
        oid(&writer, "'orders'::regclass").await,
        oid(&writer, "'order_lines'::regclass").await,
        oid(&writer, "'tickets'::regclass").await,
        oid(&writer, "'notes'::regclass").await,
    ];
    let truncate = |cascade, restart_identity, relations: &[u32]| Message::Truncate {
        xid: None,
        cascade,
        restart_identity,
        relations: relations.to_vec(),
    };
    let truncates: Vec<&Message> = changes
        .iter()
        .map(|(_, m)| m)
        .filter(|m| matches!(m, Message::Truncate { .. }))
        .collect();
    // CASCADE: PostgreSQL lists the tables the cascade reached after the named one.
    assert_eq!(
        truncates,
        [
            &truncate(false, true, &[tickets, notes]),
            &truncate(true, false, &[orders, order_lines]),
            &truncate(true, true, &[orders, order_lines]),
        ]
    );
    // Each transaction describes the tables again (a truncated table has a new file, which
    // resets pgoutput's record of what it sent) before truncating them.
    let transactions: Vec<&[Change]> = changes
        .split(|(_, m)| matches!(m, Message::Commit { .. }))
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(transactions.len(), 3);
    for transaction in transactions {
        let described: Vec<u32> = transaction
            .iter()
            .filter_map(|(_, m)| match m {
                Message::Relation(r) => Some(r.oid),
                _ => None,
            })
            .collect();
        let Some((_, Message::Truncate { relations, .. })) = transaction.last() else {
            panic!("a transaction that does not end in its Truncate: {transaction:?}");
        };
        assert_eq!(&described, relations);
    }
    slot.drop().await;
}

#[tokio::test]
async fn a_custom_type_column_is_preceded_by_its_type() {
    let schema = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE DOMAIN stars AS integer CHECK (VALUE BETWEEN 1 AND 5);
        CREATE TABLE review (id integer PRIMARY KEY, mood mood, moods mood[], rating stars)";
    let (_dbs, writer, mut slot) = source("pgoutput_types", schema, "").await;
    writer
        .batch_execute("INSERT INTO review VALUES (1, 'happy', '{sad,ok}', 4)")
        .await
        .expect("insert");
    let changes = slot.read_until("the insert", |c| commits(c) == 1).await;

    let [mood, moods, stars] = [
        oid(&writer, "'mood'::regtype").await,
        oid(&writer, "'mood[]'::regtype").await,
        oid(&writer, "'stars'::regtype").await,
    ];
    let typ = |oid, namespace: &str, name: &str| Message::Type {
        xid: None,
        oid,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let messages: Vec<&Message> = changes.iter().map(|(_, m)| m).collect();
    assert_eq!(
        messages[1..4],
        [
            &typ(mood, "public", "mood"),
            &typ(moods, "public", "_mood"),
            // A domain is sent under its own OID but with its base type's name ("" is
            // pg_catalog).
            &typ(stars, "", "int4"),
        ]
    );
    let Message::Relation(relation) = messages[4] else {
        panic!(
            "expected the Relation after the types, got {:?}",
            messages[4]
        );
    };
    let type_oids: Vec<u32> = relation.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(type_oids, [23, mood, moods, stars]);
    assert!(matches!(
        messages[5],
        Message::Insert { new, .. }
            if *new == Tuple(vec![text("1"), text("happy"), text("{sad,ok}"), text("4")])
    ));
    slot.drop().await;
}

#[tokio::test]
async fn logical_messages_decode_in_and_out_of_transactions() {
    let (_dbs, mut writer, mut slot) = source("pgoutput_messages", "SELECT 1", "").await;
    let lsn_of =
        |row: tokio_postgres::Row| -> Lsn { row.get::<_, String>(0).parse().expect("an LSN") };
    let outside = lsn_of(
        writer
            .query_one(
                "SELECT pg_logical_emit_message(false, 'bite-sync', 'kitchen open')::text",
                &[],
            )
            .await
            .expect("non-transactional message"),
    );
    let tx = writer.transaction().await.expect("begin");
    let inside = lsn_of(
        tx.query_one(
            "SELECT pg_logical_emit_message(true, 'bite-sync', '\\x00ff01'::bytea)::text",
            &[],
        )
        .await
        .expect("transactional message"),
    );
    let xid = current_xid(&tx).await;
    tx.commit().await.expect("commit");
    let changes = slot
        .read_until("both messages", |c| {
            c.iter()
                .filter(|(_, m)| matches!(m, Message::LogicalMessage { .. }))
                .count()
                == 2
                && commits(c) == 1
        })
        .await;

    let message = |transactional, lsn, content: &'static [u8]| Message::LogicalMessage {
        xid: None,
        transactional,
        lsn,
        prefix: "bite-sync".to_owned(),
        content: Bytes::from_static(content),
    };
    let messages: Vec<&Message> = changes.iter().map(|(_, m)| m).collect();
    assert_eq!(messages.len(), 4, "{messages:?}");
    // The non-transactional message comes alone, at the LSN pg_logical_emit_message returned.
    assert_eq!(messages[0], &message(false, outside, b"kitchen open"));
    assert!(matches!(messages[1], Message::Begin { xid: x, .. } if *x == xid));
    assert_eq!(messages[2], &message(true, inside, b"\x00\xff\x01"));
    slot.drop().await;
}

/// Rows inserted by `INSERT ... generate_series` in a test table: enough to pass 64kB of
/// logical_decoding_work_mem many times over.
const MANY: usize = 20_000;
const STREAMING: &str = "SET logical_decoding_work_mem = '64kB'";
const LINE: &str = "CREATE TABLE line (id integer PRIMARY KEY, item text)";

fn inserts_by_xid(changes: &[Change], xid: u32) -> usize {
    changes
        .iter()
        .filter(|(_, m)| matches!(m, Message::Insert { xid: Some(x), .. } if *x == xid))
        .count()
}

#[tokio::test]
async fn a_large_transaction_is_streamed_in_chunks() {
    let (_dbs, mut writer, mut slot) = source("pgoutput_stream", LINE, STREAMING).await;
    let tx = writer.transaction().await.expect("begin");
    tx.execute(
        &format!("INSERT INTO line SELECT g, 'item ' || g FROM generate_series(1, {MANY}) g"),
        &[],
    )
    .await
    .expect("insert");
    let xid = current_xid(&tx).await;
    tx.commit().await.expect("commit");
    let changes = slot
        .read_until("the Stream Commit", |c| {
            c.iter()
                .any(|(_, m)| matches!(m, Message::StreamCommit { .. }))
        })
        .await;

    let starts: Vec<bool> = changes
        .iter()
        .filter_map(|(_, m)| match m {
            Message::StreamStart {
                xid: x,
                first_segment,
            } => {
                assert_eq!(*x, xid);
                Some(*first_segment)
            }
            _ => None,
        })
        .collect();
    assert!(starts.len() > 1, "{} chunks", starts.len());
    assert!(starts[0] && starts[1..].iter().all(|first| !first));
    let stops = changes
        .iter()
        .filter(|(_, m)| matches!(m, Message::StreamStop))
        .count();
    assert_eq!(stops, starts.len());
    assert!(matches!(
        &changes[1].1,
        Message::Relation(Relation { xid: Some(x), .. }) if *x == xid
    ));
    // Every row once, in order, tagged with the transaction.
    let ids: Vec<usize> = changes
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Insert {
                xid: Some(x), new, ..
            } if *x == xid => match new.0.first() {
                Some(Datum::Text(id)) => std::str::from_utf8(id).ok()?.parse().ok(),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(ids, (1..=MANY).collect::<Vec<_>>());
    assert!(
        !kinds(&changes).contains(&"Begin"),
        "a streamed transaction has no Begin"
    );
    assert!(matches!(
        changes.last(),
        Some((_, Message::StreamCommit { xid: x, flags: 0, .. })) if *x == xid
    ));
    slot.drop().await;
}

#[tokio::test]
async fn a_rolled_back_savepoint_aborts_only_its_subtransaction() {
    let (_dbs, mut writer, mut slot) = source("pgoutput_savepoint", LINE, STREAMING).await;
    // The first row also has the table looked up before the rows of the subtransaction, which
    // has aborted by the time they are decoded (see the rollback test below).
    let tx = writer.transaction().await.expect("begin");
    tx.batch_execute(&format!(
        "INSERT INTO line VALUES (-1, 'before');
         SAVEPOINT s;
         INSERT INTO line SELECT g, 'dropped ' || g FROM generate_series(1, {MANY}) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO line VALUES (-2, 'after');"
    ))
    .await
    .expect("writes");
    let xid = current_xid(&tx).await;
    tx.commit().await.expect("commit");
    let changes = slot
        .read_until("the Stream Commit", |c| {
            c.iter()
                .any(|(_, m)| matches!(m, Message::StreamCommit { .. }))
        })
        .await;

    let aborts: Vec<(u32, u32)> = changes
        .iter()
        .filter_map(|(_, m)| match m {
            Message::StreamAbort { xid, subxid } => Some((*xid, *subxid)),
            _ => None,
        })
        .collect();
    let [(abort_xid, subxid)] = aborts[..] else {
        panic!("expected one Stream Abort, got {aborts:?}");
    };
    assert_eq!(abort_xid, xid);
    assert_ne!(subxid, xid);
    // Streamed changes carry the xid of the subtransaction that made them. The rows streamed
    // before the rollback are the aborted subtransaction's; the rest were never sent.
    let dropped = inserts_by_xid(&changes, subxid);
    assert!(
        dropped > 0 && dropped <= MANY,
        "{dropped} rows of the aborted subtransaction"
    );
    assert_eq!(inserts_by_xid(&changes, xid), 1, "the row before SAVEPOINT");
    // ROLLBACK TO keeps the savepoint: the last row is in a new subtransaction of its own.
    let after = changes.iter().rev().find_map(|(_, m)| match m {
        Message::Insert { xid: Some(x), .. } => Some(*x),
        _ => None,
    });
    assert!(
        after.is_some_and(|x| x != xid && x != subxid),
        "the last row's xid {after:?}"
    );
    let position = |wanted: fn(&Message) -> bool| changes.iter().position(|(_, m)| wanted(m));
    assert!(
        position(|m| matches!(m, Message::StreamAbort { .. }))
            < position(|m| matches!(m, Message::StreamCommit { .. }))
    );
    assert!(matches!(
        changes.last(),
        Some((_, Message::StreamCommit { xid: x, .. })) if *x == xid
    ));
    slot.drop().await;
}

#[tokio::test]
async fn a_streamed_transaction_that_rolls_back_ends_with_an_abort() {
    let (_dbs, mut writer, mut slot) = source("pgoutput_rollback", LINE, STREAMING).await;
    // Decoding happens after the rollback. Had the table not been looked up already in the
    // same decoding call (the first row does that), PostgreSQL would notice the abort at that
    // catalog lookup and send the rolled-back rows as an empty chunk instead.
    writer
        .batch_execute("INSERT INTO line VALUES (0, 'kept')")
        .await
        .expect("first row");
    let tx = writer.transaction().await.expect("begin");
    tx.execute(
        &format!("INSERT INTO line SELECT g, 'item ' || g FROM generate_series(1, {MANY}) g"),
        &[],
    )
    .await
    .expect("insert");
    let xid = current_xid(&tx).await;
    tx.rollback().await.expect("rollback");
    // A rollback's WAL is not flushed at once; this commit flushes it, so one read decodes
    // everything (each read is a decoding session of its own, and a later one does not
    // continue an earlier one's stream of an unfinished transaction).
    writer
        .batch_execute("INSERT INTO line VALUES (-1, 'flush')")
        .await
        .expect("last row");
    let changes = slot
        .read_until("the Stream Abort and the last row", |c| {
            c.iter()
                .any(|(_, m)| matches!(m, Message::StreamAbort { .. }))
                && commits(c) == 2
        })
        .await;

    let aborts: Vec<&Message> = changes
        .iter()
        .map(|(_, m)| m)
        .filter(|m| matches!(m, Message::StreamAbort { .. }))
        .collect();
    // The whole transaction aborted: subxid is the transaction itself.
    assert_eq!(aborts, [&Message::StreamAbort { xid, subxid: xid }]);
    let streamed = inserts_by_xid(&changes, xid);
    assert!(
        streamed > 0 && streamed <= MANY,
        "{streamed} rows streamed before the abort"
    );
    assert!(!kinds(&changes).contains(&"StreamCommit"));
    slot.drop().await;
}

#[tokio::test]
async fn an_origin_message_says_where_changes_came_from() {
    // At 64kB the second transaction is streamed, the first is not.
    let (dbs, mut writer, mut slot) = source("pgoutput_origin", LINE, STREAMING).await;
    // Origins are cluster-wide; the database name is unique.
    let origin = dbs.name.clone();
    writer
        .execute("SELECT pg_replication_origin_create($1)", &[&origin])
        .await
        .expect("create origin");
    writer
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .expect("origin session");
    let tx = writer.transaction().await.expect("begin");
    tx.batch_execute(
        "SELECT pg_replication_origin_xact_setup('0/ABCDEF', now());
         INSERT INTO line VALUES (0, 'replayed');",
    )
    .await
    .expect("replayed insert");
    tx.commit().await.expect("commit");
    writer
        .batch_execute(&format!(
            "INSERT INTO line SELECT g, 'item ' || g FROM generate_series(1, {MANY}) g"
        ))
        .await
        .expect("streamed insert");
    let changes = slot
        .read_until("a Commit and a Stream Commit", |c| {
            commits(c) == 1
                && c.iter()
                    .any(|(_, m)| matches!(m, Message::StreamCommit { .. }))
        })
        .await;
    writer
        .execute("SELECT pg_replication_origin_session_reset()", &[])
        .await
        .expect("origin reset");
    writer
        .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
        .await
        .expect("drop origin");

    let origins: Vec<(usize, &Message)> = changes
        .iter()
        .enumerate()
        .filter(|(_, (_, m))| matches!(m, Message::Origin { .. }))
        .map(|(i, (_, m))| (i, m))
        .collect();
    // After the Begin, with the origin's commit LSN; in a stream, after the first Stream Start,
    // where PostgreSQL 15 sends no LSN (0/0).
    assert_eq!(
        origins,
        [
            (
                1,
                &Message::Origin {
                    lsn: Lsn(0xAB_CDEF),
                    name: origin.clone(),
                }
            ),
            (
                changes
                    .iter()
                    .position(|(_, m)| matches!(m, Message::StreamStart { .. }))
                    .expect("a Stream Start")
                    + 1,
                &Message::Origin {
                    lsn: Lsn::ZERO,
                    name: origin.clone(),
                }
            ),
        ]
    );
    slot.drop().await;
}
