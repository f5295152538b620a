//! Turning decoded changes into as few mirror statements as possible (pure).
//!
//! Over a 50–150 ms WAN one statement per round trip caps apply at a dozen rows a second, so
//! changes are grouped and a whole batch goes to the mirror in one round trip:
//! - consecutive inserts into a table become one multi-row `INSERT ... VALUES`;
//! - consecutive updates of a table that set the same columns become one
//!   `UPDATE ... FROM (VALUES ...)`, as long as no row is updated twice in the group (a join
//!   would apply only one of the two);
//! - consecutive deletes from a table become one `DELETE ... WHERE key IN (...)`.
//!
//! Invariants:
//! - The changes of one table are applied in source order. Changes of different tables are
//!   grouped per table (and so reordered between tables) only when the mirror session does not
//!   check foreign keys or fire triggers (`session_replication_role = replica`): then the
//!   order between tables cannot change the state at commit, which is all readers see.
//!   Otherwise statements keep the global order and only neighbours merge.
//! - TRUNCATE and schema changes are barriers: everything before them is emitted first.
//! - Values are sent as quoted literals of the source's text output, and every literal that is
//!   not assigned straight to a column carries the column's type (`'(terraza,1)'::public.seat`):
//!   an untyped literal compared with a composite column is read as an anonymous record, which
//!   PostgreSQL cannot parse, and comparisons of other types would silently depend on operator
//!   resolution. Inserted values and `SET` values are assigned to their column, which types
//!   them. A grouped update types its first row, which types the whole `VALUES` list. A TOASTed
//!   value that did not change ([`Datum::UnchangedToast`]) is left
//!   out of the `SET` list, so the mirror keeps its value. Nothing here panics on odd input: a
//!   change that cannot be expressed is an [`ApplyError`].

use std::collections::HashMap;

use super::pgoutput::{Datum, OldTuple, Tuple};
use crate::pg::ident::{QualifiedName, literal, quote};

/// Rows merged into one statement at most (keeps statements, and the errors about them, of a
/// readable size).
const MAX_GROUP_ROWS: usize = 2_000;

/// A replicated table as the apply needs it: the source's column list (from its Relation
/// message) with the mirror's type for each column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableShape {
    /// The source relation's OID (the key changes refer to it by).
    pub oid: u32,
    /// The table, same name on both sides.
    pub name: QualifiedName,
    /// In the order tuples list them.
    pub columns: Vec<ShapeColumn>,
    /// REPLICA IDENTITY FULL: old rows come whole and have no key.
    pub identity_full: bool,
    /// The mirror's table is partitioned (a TRUNCATE must reach its partitions).
    pub partitioned: bool,
}

/// One column of a [`TableShape`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeColumn {
    /// Its name.
    pub name: String,
    /// Part of the replica identity.
    pub key: bool,
    /// The mirror's type, as `format_type` prints it (for casts in grouped updates).
    pub mirror_type: String,
    /// `GENERATED ALWAYS AS IDENTITY` on the mirror: inserts override it, updates leave it
    /// alone (the source cannot set it to a value either).
    pub identity_always: bool,
}

/// A change that cannot be turned into SQL; the table's changes must stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The tuple does not match the relation's column count.
    #[error("{table}: a row has {got} values but the table has {expected} replicated columns")]
    Arity {
        /// The table.
        table: QualifiedName,
        /// Values in the row.
        got: usize,
        /// Columns in the Relation message.
        expected: usize,
    },
    /// An update or delete without a key to find the row by.
    #[error(
        "{table}: cannot find the row to {action}: the table has no primary key or replica identity on the source; fix it on the source with ALTER TABLE {quoted} REPLICA IDENTITY FULL, or add a primary key"
    )]
    NoKey {
        /// The table.
        table: QualifiedName,
        /// Its quoted name.
        quoted: String,
        /// "update" or "delete".
        action: &'static str,
    },
    /// A value in binary format (the stream is requested in text).
    #[error("{table}.{column}: got a binary value, but bite-sync asks for text values")]
    Binary {
        /// The table.
        table: QualifiedName,
        /// The column.
        column: String,
    },
    /// A value that is not UTF-8 text.
    #[error("{table}.{column}: a value is not valid UTF-8; bite-sync needs a UTF8 source database")]
    NotUtf8 {
        /// The table.
        table: QualifiedName,
        /// The column.
        column: String,
    },
    /// An unchanged-TOAST marker where a value is needed (a new row, or a key).
    #[error("{table}.{column}: the source sent no value for a column it must send")]
    MissingValue {
        /// The table.
        table: QualifiedName,
        /// The column.
        column: String,
    },
}

/// One statement to send, with the tables it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The source OIDs of the tables it changes (several for a TRUNCATE of several).
    pub tables: Vec<u32>,
    /// The SQL; with [`Statement::copy`], a `COPY ... FROM STDIN` to send that data to.
    pub sql: String,
    /// Rows in COPY's text format, for a `COPY` statement.
    pub copy: Option<String>,
    /// Source rows it applies.
    pub rows: usize,
}

/// How a batch merges changes into statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One statement per change, in source order: how a batch the mirror rejected is retried,
    /// so that exactly the change the mirror refuses fails.
    None,
    /// Neighbouring changes of one kind to one table merge; the source order is kept (for a
    /// mirror that checks foreign keys and fires triggers).
    Neighbours,
    /// Per table, inserts, updates (by the columns they set) and deletes of distinct rows
    /// merge; a row changed twice starts a new segment of the table (for a mirror session with
    /// `session_replication_role = replica`).
    PerTable,
}

/// What kind of change a segment holds (for [`Grouping::Neighbours`], one kind only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Insert,
    Update,
    Delete,
    Single,
}

/// Merged updates that set the same columns.
#[derive(Debug)]
struct UpdateGroup {
    set: Vec<bool>,
    /// The mirror types of the VALUES columns (keys, then the columns set), for casts in the
    /// first row.
    types: Vec<String>,
    /// `k0, k1, c0, ...`: the names of the VALUES columns.
    alias: String,
    /// `"status" = v.c0, ...`.
    assignments: String,
    /// `t."id" = v.k0 AND ...`.
    join: String,
    /// Per row, its literals (keys, then the columns set).
    rows: Vec<Vec<String>>,
}

/// Changes to one table that may be applied in any order among themselves: each row is
/// touched once.
#[derive(Debug)]
struct Segment {
    oid: u32,
    quoted: String,
    kind: Kind,
    /// Keys of the rows touched, as literals, with where the row's change is.
    keys: HashMap<String, Slot>,
    /// No change may join (a change whose row cannot be told apart from others).
    closed: bool,
    /// Insert column list and rows (SQL tuples, or COPY lines when `copy`).
    inserts: Option<(String, Vec<String>)>,
    /// Inserts are loaded with COPY.
    copy: bool,
    updates: Vec<UpdateGroup>,
    /// Key expression and keys.
    deletes: Option<(String, Vec<String>)>,
    /// Statements that merge with nothing (SQL, and COPY data for a COPY).
    singles: Vec<(String, Option<String>)>,
    rows: usize,
}

impl Segment {
    /// Statements in an order that is safe for rows touched once: deletes first (freeing
    /// unique values), then key changes and whole-row matches, updates, and inserts last.
    fn render(self) -> Vec<Statement> {
        let t = &self.quoted;
        let mut out = Vec::new();
        let mut push = |sql: String, copy: Option<String>, rows: usize| {
            out.push(Statement {
                tables: vec![self.oid],
                sql,
                copy,
                rows,
            })
        };
        if let Some((key, keys)) = self.deletes {
            let rows = keys.len();
            push(
                format!("DELETE FROM {t} WHERE {key} IN ({})", keys.join(", ")),
                None,
                rows,
            );
        }
        for (sql, copy) in self.singles {
            push(sql, copy, 1);
        }
        for group in self.updates {
            let rows = group.rows.len();
            let values: Vec<String> = group
                .rows
                .iter()
                .enumerate()
                .map(|(i, row)| {
                    let items: Vec<String> = row
                        .iter()
                        .zip(&group.types)
                        .map(|(v, ty)| {
                            if i == 0 {
                                format!("{v}::{ty}")
                            } else {
                                v.clone()
                            }
                        })
                        .collect();
                    format!("({})", items.join(", "))
                })
                .collect();
            push(
                format!(
                    "UPDATE {t} AS t SET {} FROM (VALUES {}) AS v({}) WHERE {}",
                    group.assignments,
                    values.join(", "),
                    group.alias,
                    group.join
                ),
                None,
                rows,
            );
        }
        if let Some((columns, values)) = self.inserts {
            let rows = values.len();
            if self.copy {
                // COPY gives identity columns the values it is given, as inserts do with
                // OVERRIDING SYSTEM VALUE.
                push(copy_sql(t, &columns), Some(values.concat()), rows);
            } else {
                push(insert_sql(t, &columns, &values), None, rows);
            }
        }
        out
    }
}

/// Where a segment holds the change of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Row `n` of the merged inserts.
    Insert(usize),
    /// Row `n` of update group `g`.
    Update { group: usize, row: usize },
    /// Anywhere else (a delete, a key change, a single statement).
    Other,
}

/// One change on its way into a segment.
enum Op {
    Insert { columns: String, row: String },
    Update { set: Vec<bool>, row: Vec<String> },
    Delete { row: String },
    Single { sql: String },
}

impl Op {
    fn kind(&self) -> Kind {
        match self {
            Op::Insert { .. } => Kind::Insert,
            Op::Update { .. } => Kind::Update,
            Op::Delete { .. } => Kind::Delete,
            Op::Single { .. } => Kind::Single,
        }
    }
}

/// Collects a batch's changes and renders them as grouped statements.
#[derive(Debug)]
pub struct BatchBuilder {
    grouping: Grouping,
    /// Merged inserts are loaded with COPY (cheaper for the mirror than a multi-row INSERT,
    /// but a few more round trips).
    copy: bool,
    /// Queues of segments: one per table with [`Grouping::PerTable`], else one for all, in
    /// the order their first change arrived; the last segment of a queue is the open one.
    queues: Vec<(u32, Vec<Segment>)>,
    /// Statements already rendered (before a barrier).
    out: Vec<Statement>,
    rows: usize,
    bytes: usize,
}

impl BatchBuilder {
    /// An empty batch that groups as `grouping` says.
    pub fn new(grouping: Grouping) -> BatchBuilder {
        BatchBuilder {
            grouping,
            copy: false,
            queues: Vec::new(),
            out: Vec::new(),
            rows: 0,
            bytes: 0,
        }
    }

    /// How this batch groups.
    pub fn grouping(&self) -> Grouping {
        self.grouping
    }

    /// Changes how changes collected from now on are grouped (the batch must be empty).
    pub fn set_grouping(&mut self, grouping: Grouping) {
        debug_assert!(self.is_empty());
        self.grouping = grouping;
    }

    /// Loads merged inserts with COPY from now on (never in [`Grouping::None`], where every
    /// change is its own statement).
    pub fn set_copy(&mut self, copy: bool) {
        self.copy = copy;
    }

    /// Source rows collected so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of SQL collected so far (about).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Nothing collected.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty() && self.queues.is_empty()
    }

    /// A row inserted.
    pub fn insert(&mut self, shape: &TableShape, new: &Tuple) -> Result<(), ApplyError> {
        check_arity(shape, new)?;
        let row = insert_row(shape, new, self.copies())?;
        // A row of a table without a key cannot be named; a placeholder unique in the batch
        // lets such inserts merge while whole-row updates and deletes still stand alone.
        let keys = vec![row_key(shape, new).unwrap_or_else(|| format!("\0{}", self.rows))];
        let columns = column_list(shape.columns.iter());
        self.add(shape, Op::Insert { columns, row }, keys);
        Ok(())
    }

    /// A row updated: found by its old key (when the key changed) or its new key, or by its
    /// whole old row under REPLICA IDENTITY FULL.
    pub fn update(
        &mut self,
        shape: &TableShape,
        old: Option<&OldTuple>,
        new: &Tuple,
    ) -> Result<(), ApplyError> {
        check_arity(shape, new)?;
        // Without an old key the key did not change, so only the other columns are set.
        let set: Vec<bool> = shape
            .columns
            .iter()
            .zip(&new.0)
            .map(|(c, d)| {
                !matches!(d, Datum::UnchangedToast)
                    && !c.identity_always
                    && (old.is_some() || !c.key)
            })
            .collect();
        if !set.iter().any(|s| *s) {
            return Ok(());
        }
        match old {
            Some(OldTuple::Full(old)) => {
                check_arity(shape, old)?;
                // The row's physical address names it: (tableoid, ctid), as a ctid alone is
                // unique only within one partition of a partitioned mirror table.
                let sql = format!(
                    "UPDATE {t} SET {assignments} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {t} WHERE {filter} LIMIT 1)",
                    t = shape.name.quoted(),
                    assignments = assignments(shape, new)?,
                    filter = whole_row_filter(shape, old)?,
                );
                self.add(shape, Op::Single { sql }, Vec::new());
            }
            Some(OldTuple::Key(old)) => {
                check_arity(shape, old)?;
                let sql = format!(
                    "UPDATE {} SET {} WHERE {}",
                    shape.name.quoted(),
                    assignments(shape, new)?,
                    key_filter(shape, old, "update")?
                );
                let keys = [row_key(shape, old), row_key(shape, new)]
                    .into_iter()
                    .flatten()
                    .collect();
                self.add(shape, Op::Single { sql }, keys);
            }
            None => {
                let key = key_values(shape, new, "update")?;
                if self.grouping == Grouping::None {
                    let sql = format!(
                        "UPDATE {} SET {} WHERE {}",
                        shape.name.quoted(),
                        assignments(shape, new)?,
                        key_filter(shape, new, "update")?
                    );
                    self.add(shape, Op::Single { sql }, vec![key]);
                    return Ok(());
                }
                let mut row = Vec::new();
                for (column, datum) in key_columns(shape).zip(key_datums(shape, new)) {
                    row.push(value(shape, column, datum)?);
                }
                for ((column, datum), set) in shape.columns.iter().zip(&new.0).zip(&set) {
                    if *set {
                        row.push(value(shape, column, datum)?);
                    }
                }
                if self.merge_update(shape, &key, new, &set, &mut row)? {
                    return Ok(());
                }
                self.add(shape, Op::Update { set, row }, vec![key]);
            }
        }
        Ok(())
    }

    /// A row deleted: found by its key, or by its whole row under REPLICA IDENTITY FULL.
    pub fn delete(&mut self, shape: &TableShape, old: &OldTuple) -> Result<(), ApplyError> {
        match old {
            OldTuple::Full(old) => {
                check_arity(shape, old)?;
                // (tableoid, ctid): see `update`.
                let sql = format!(
                    "DELETE FROM {t} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {t} WHERE {filter} LIMIT 1)",
                    t = shape.name.quoted(),
                    filter = whole_row_filter(shape, old)?,
                );
                self.add(shape, Op::Single { sql }, Vec::new());
            }
            OldTuple::Key(old) => {
                check_arity(shape, old)?;
                let key = key_values(shape, old, "delete")?;
                let row = typed_key_values(shape, old, "delete")?;
                self.add(shape, Op::Delete { row }, vec![key]);
            }
        }
        Ok(())
    }

    /// Tables truncated together: one statement, after everything before it. Never CASCADE:
    /// the source lists every published table its cascade reached, and mirror tables that
    /// were not asked for must not be emptied.
    pub fn truncate(&mut self, shapes: &[&TableShape], restart_identity: bool) {
        if shapes.is_empty() {
            return;
        }
        // ONLY keeps mirror tables that inherit from these out of it; a partitioned table's
        // partitions are its rows, and must be in.
        let names: Vec<String> = shapes
            .iter()
            .map(|s| {
                if s.partitioned {
                    s.name.quoted()
                } else {
                    format!("ONLY {}", s.name.quoted())
                }
            })
            .collect();
        let sql = format!(
            "TRUNCATE {}{}",
            names.join(", "),
            if restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            }
        );
        self.barrier(Statement {
            tables: shapes.iter().map(|s| s.oid).collect(),
            sql,
            copy: None,
            rows: 1,
        });
    }

    /// A statement that must run after everything collected so far and before anything
    /// after it (schema changes, bookkeeping).
    pub fn barrier(&mut self, statement: Statement) {
        self.render_pending();
        self.bytes += statement.sql.len();
        self.rows += statement.rows;
        self.out.push(statement);
    }

    /// The statements, in the order they must run; the builder is empty afterwards.
    pub fn take(&mut self) -> Vec<Statement> {
        self.render_pending();
        self.rows = 0;
        self.bytes = 0;
        std::mem::take(&mut self.out)
    }

    fn copies(&self) -> bool {
        self.copy && self.grouping != Grouping::None
    }

    /// Adds a change touching the rows `keys` (empty: rows that cannot be told apart, so
    /// the change stands alone, in order).
    fn add(&mut self, shape: &TableShape, op: Op, keys: Vec<String>) {
        self.rows += 1;
        self.bytes += match &op {
            Op::Insert { row, .. } | Op::Delete { row } => row.len() + 2,
            Op::Update { row, .. } => row.iter().map(|v| v.len() + 2).sum(),
            Op::Single { sql } => sql.len(),
        };
        let queue = if self.grouping == Grouping::PerTable {
            shape.oid
        } else {
            0
        };
        let grouping = self.grouping;
        let copy = self.copies();
        let index = match self.queues.iter().position(|(q, _)| *q == queue) {
            Some(i) => i,
            None => {
                self.queues.push((queue, Vec::new()));
                self.queues.len() - 1
            }
        };
        let segments = &mut self.queues[index].1;
        let kind = op.kind();
        let joins = segments.last().is_some_and(|seg| {
            seg.oid == shape.oid
                && !seg.closed
                && seg.rows < MAX_GROUP_ROWS
                && !keys.is_empty()
                && !keys.iter().any(|k| seg.keys.contains_key(k))
                && match grouping {
                    Grouping::None => false,
                    Grouping::Neighbours => seg.kind == kind && kind != Kind::Single,
                    Grouping::PerTable => true,
                }
        });
        if !joins {
            segments.push(Segment {
                oid: shape.oid,
                quoted: shape.name.quoted(),
                kind,
                keys: HashMap::new(),
                closed: keys.is_empty(),
                inserts: None,
                copy,
                updates: Vec::new(),
                deletes: None,
                singles: Vec::new(),
                rows: 0,
            });
        }
        let seg = segments.last_mut().expect("a segment was just ensured");
        seg.rows += 1;
        let slot = match &op {
            Op::Insert { columns, .. } => match &seg.inserts {
                Some((open, rows)) if open == columns => Slot::Insert(rows.len()),
                Some(_) => Slot::Other,
                None => Slot::Insert(0),
            },
            Op::Update { set, .. } => match seg.updates.iter().position(|g| g.set == *set) {
                Some(group) => Slot::Update {
                    group,
                    row: seg.updates[group].rows.len(),
                },
                None => Slot::Update {
                    group: seg.updates.len(),
                    row: 0,
                },
            },
            Op::Delete { .. } | Op::Single { .. } => Slot::Other,
        };
        seg.keys.extend(keys.into_iter().map(|k| (k, slot)));
        match op {
            Op::Insert { columns, row } => {
                match &mut seg.inserts {
                    Some((open, rows)) if *open == columns => rows.push(row),
                    Some(_) => {
                        // Another column list (a column was added): its own segment next time.
                        seg.closed = true;
                        seg.singles.push(if seg.copy {
                            (copy_sql(&seg.quoted, &columns), Some(row))
                        } else {
                            (insert_sql(&seg.quoted, &columns, &[row]), None)
                        });
                    }
                    None => seg.inserts = Some((columns, vec![row])),
                }
            }
            Op::Update { set, row } => match seg.updates.iter_mut().find(|g| g.set == set) {
                Some(group) => group.rows.push(row),
                None => {
                    let (alias, assignments, join) = update_clauses(shape, &set);
                    let types = key_columns(shape)
                        .chain(
                            shape
                                .columns
                                .iter()
                                .zip(&set)
                                .filter(|(_, s)| **s)
                                .map(|(c, _)| c),
                        )
                        .map(|c| c.mirror_type.clone())
                        .collect();
                    seg.updates.push(UpdateGroup {
                        set,
                        types,
                        alias,
                        assignments,
                        join,
                        rows: vec![row],
                    });
                }
            },
            Op::Delete { row } => match &mut seg.deletes {
                Some((_, keys)) => keys.push(row),
                None => {
                    let names: Vec<String> = key_columns(shape).map(|c| quote(&c.name)).collect();
                    let key_expr = match names.len() {
                        1 => names[0].clone(),
                        _ => format!("({})", names.join(", ")),
                    };
                    seg.deletes = Some((key_expr, vec![row]));
                }
            },
            Op::Single { sql } => seg.singles.push((sql, None)),
        }
    }

    /// Folds an update of a row (found by a key that did not change) into the open segment's
    /// change of that row, if it has one: into its insert (inserted with its final values, when
    /// the update carries every value) or into its update that sets the same columns. Only
    /// with [`Grouping::PerTable`], where the mirror fires no ordinary triggers, so one change
    /// per row in place of two is not observable at commit. Without this, a row inserted and
    /// then updated in one batch (an order, then its status) would cut the table's segment in
    /// two at every such row.
    fn merge_update(
        &mut self,
        shape: &TableShape,
        key: &str,
        new: &Tuple,
        set: &[bool],
        row: &mut Vec<String>,
    ) -> Result<bool, ApplyError> {
        if self.grouping != Grouping::PerTable {
            return Ok(false);
        }
        let Some(seg) = self
            .queues
            .iter_mut()
            .find(|(q, _)| *q == shape.oid)
            .and_then(|(_, segments)| segments.last_mut())
        else {
            return Ok(false);
        };
        if seg.oid != shape.oid {
            return Ok(false);
        }
        let merged_bytes = match seg.keys.get(key) {
            Some(Slot::Insert(i)) => {
                let Some((columns, rows)) = &mut seg.inserts else {
                    return Ok(false);
                };
                if new.0.iter().any(|d| matches!(d, Datum::UnchangedToast))
                    || *columns != column_list(shape.columns.iter())
                {
                    return Ok(false);
                }
                let line = insert_row(shape, new, seg.copy)?;
                let bytes = line.len() + 2;
                rows[*i] = line;
                bytes
            }
            Some(Slot::Update { group, row: r }) => {
                let Some(group) = seg.updates.get_mut(*group) else {
                    return Ok(false);
                };
                if group.set != set {
                    return Ok(false);
                }
                let bytes = row.iter().map(|v| v.len() + 2).sum();
                group.rows[*r] = std::mem::take(row);
                bytes
            }
            Some(Slot::Other) | None => return Ok(false),
        };
        self.rows += 1;
        self.bytes += merged_bytes;
        Ok(true)
    }

    fn render_pending(&mut self) {
        for (_, segments) in std::mem::take(&mut self.queues) {
            for segment in segments {
                self.out.extend(segment.render());
            }
        }
    }
}

/// `COPY` of merged inserts; a table without columns takes no column list (its rows are
/// empty lines).
fn copy_sql(table: &str, columns: &str) -> String {
    if columns.is_empty() {
        format!("COPY {table} FROM STDIN")
    } else {
        format!("COPY {table} ({columns}) FROM STDIN")
    }
}

/// A multi-row `INSERT` of `rows` (tuples of literals). `OVERRIDING SYSTEM VALUE`: identity
/// columns take the source's values. A table without columns has no `VALUES` to list: its
/// rows are made by a select of nothing.
fn insert_sql(table: &str, columns: &str, rows: &[String]) -> String {
    if columns.is_empty() {
        format!(
            "INSERT INTO {table} SELECT FROM pg_catalog.generate_series(1, {})",
            rows.len()
        )
    } else {
        format!(
            "INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE VALUES {}",
            rows.join(", ")
        )
    }
}

/// The parts of a grouped update that depend only on the table and the columns set.
fn update_clauses(shape: &TableShape, set: &[bool]) -> (String, String, String) {
    let keys: Vec<&ShapeColumn> = key_columns(shape).collect();
    let mut alias: Vec<String> = (0..keys.len()).map(|i| format!("k{i}")).collect();
    let mut assignments = Vec::new();
    for (i, column) in shape
        .columns
        .iter()
        .zip(set)
        .filter(|(_, set)| **set)
        .map(|(c, _)| c)
        .enumerate()
    {
        alias.push(format!("c{i}"));
        assignments.push(format!("{} = v.c{i}", quote(&column.name)));
    }
    let join: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, c)| format!("t.{} = v.k{i}", quote(&c.name)))
        .collect();
    (alias.join(", "), assignments.join(", "), join.join(" AND "))
}

/// A new row as merged inserts carry it: a COPY line, or a `(...)` tuple of literals.
fn insert_row(shape: &TableShape, new: &Tuple, copy: bool) -> Result<String, ApplyError> {
    if copy {
        return copy_line(shape, new);
    }
    let mut row = String::from("(");
    for (i, (column, datum)) in shape.columns.iter().zip(&new.0).enumerate() {
        if i > 0 {
            row.push_str(", ");
        }
        match datum {
            Datum::UnchangedToast => return Err(missing(shape, column)),
            d => row.push_str(&value(shape, column, d)?),
        }
    }
    row.push(')');
    Ok(row)
}

/// A row as a line of COPY's text format: tab-separated, `\N` for NULL, and backslash, tab,
/// newline and carriage return escaped.
fn copy_line(shape: &TableShape, tuple: &Tuple) -> Result<String, ApplyError> {
    let mut line = String::new();
    for (i, (column, datum)) in shape.columns.iter().zip(&tuple.0).enumerate() {
        if i > 0 {
            line.push('\t');
        }
        match datum {
            Datum::Null => line.push_str("\\N"),
            Datum::Text(bytes) => {
                let text = std::str::from_utf8(bytes).map_err(|_| ApplyError::NotUtf8 {
                    table: shape.name.clone(),
                    column: column.name.clone(),
                })?;
                for c in text.chars() {
                    match c {
                        '\\' => line.push_str("\\\\"),
                        '\t' => line.push_str("\\t"),
                        '\n' => line.push_str("\\n"),
                        '\r' => line.push_str("\\r"),
                        c => line.push(c),
                    }
                }
            }
            d => {
                value(shape, column, d)?;
            }
        }
    }
    line.push('\n');
    Ok(line)
}

/// The key of a row as a literal, when the table has a key and the row carries it.
fn row_key(shape: &TableShape, tuple: &Tuple) -> Option<String> {
    key_values(shape, tuple, "update").ok()
}

fn check_arity(shape: &TableShape, tuple: &Tuple) -> Result<(), ApplyError> {
    if tuple.0.len() == shape.columns.len() {
        Ok(())
    } else {
        Err(ApplyError::Arity {
            table: shape.name.clone(),
            got: tuple.0.len(),
            expected: shape.columns.len(),
        })
    }
}

fn missing(shape: &TableShape, column: &ShapeColumn) -> ApplyError {
    ApplyError::MissingValue {
        table: shape.name.clone(),
        column: column.name.clone(),
    }
}

/// A datum as SQL: `NULL` or a quoted literal.
fn value(shape: &TableShape, column: &ShapeColumn, datum: &Datum) -> Result<String, ApplyError> {
    match datum {
        Datum::Null => Ok("NULL".into()),
        Datum::Text(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Ok(literal(text)),
            Err(_) => Err(ApplyError::NotUtf8 {
                table: shape.name.clone(),
                column: column.name.clone(),
            }),
        },
        Datum::Binary(_) => Err(ApplyError::Binary {
            table: shape.name.clone(),
            column: column.name.clone(),
        }),
        Datum::UnchangedToast => Err(missing(shape, column)),
    }
}

/// A datum as SQL carrying the column's type: `NULL` or `'(terraza,1)'::public.seat`.
fn typed(shape: &TableShape, column: &ShapeColumn, datum: &Datum) -> Result<String, ApplyError> {
    let v = value(shape, column, datum)?;
    if column.mirror_type.is_empty() || matches!(datum, Datum::Null) {
        return Ok(v);
    }
    Ok(format!("{v}::{}", column.mirror_type))
}

fn column_list<'a>(columns: impl Iterator<Item = &'a ShapeColumn>) -> String {
    columns
        .map(|c| quote(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_columns(shape: &TableShape) -> impl Iterator<Item = &ShapeColumn> {
    shape.columns.iter().filter(|c| c.key)
}

fn key_datums<'a>(shape: &'a TableShape, tuple: &'a Tuple) -> impl Iterator<Item = &'a Datum> {
    shape
        .columns
        .iter()
        .zip(&tuple.0)
        .filter(|(c, _)| c.key)
        .map(|(_, d)| d)
}

/// The key of a row as one literal (`'7'`) or a row of literals (`('7', '2')`); also the
/// identity of the row within a group.
fn key_values(
    shape: &TableShape,
    tuple: &Tuple,
    action: &'static str,
) -> Result<String, ApplyError> {
    key_row(shape, tuple, action, value)
}

/// [`key_values`] with every value typed, as a delete's `IN` list needs it (a row of untyped
/// literals is compared column by column, and a composite column then fails).
fn typed_key_values(
    shape: &TableShape,
    tuple: &Tuple,
    action: &'static str,
) -> Result<String, ApplyError> {
    key_row(shape, tuple, action, typed)
}

/// The key's values, each rendered by `render`, as one value or a row of them.
fn key_row(
    shape: &TableShape,
    tuple: &Tuple,
    action: &'static str,
    render: fn(&TableShape, &ShapeColumn, &Datum) -> Result<String, ApplyError>,
) -> Result<String, ApplyError> {
    let mut parts = Vec::new();
    for (column, datum) in key_columns(shape).zip(key_datums(shape, tuple)) {
        match datum {
            Datum::Null | Datum::UnchangedToast => return Err(missing(shape, column)),
            d => parts.push(render(shape, column, d)?),
        }
    }
    match parts.len() {
        0 => Err(ApplyError::NoKey {
            table: shape.name.clone(),
            quoted: shape.name.quoted(),
            action,
        }),
        1 => Ok(parts.remove(0)),
        _ => Ok(format!("({})", parts.join(", "))),
    }
}

/// `"k1" = '1'::integer AND "k2" = '2'::integer` from a row's key columns.
fn key_filter(
    shape: &TableShape,
    tuple: &Tuple,
    action: &'static str,
) -> Result<String, ApplyError> {
    let mut parts = Vec::new();
    for (column, datum) in key_columns(shape).zip(key_datums(shape, tuple)) {
        match datum {
            Datum::Null | Datum::UnchangedToast => return Err(missing(shape, column)),
            d => parts.push(format!(
                "{} = {}",
                quote(&column.name),
                typed(shape, column, d)?
            )),
        }
    }
    if parts.is_empty() {
        return Err(ApplyError::NoKey {
            table: shape.name.clone(),
            quoted: shape.name.quoted(),
            action,
        });
    }
    Ok(parts.join(" AND "))
}

/// Every column of a whole old row (REPLICA IDENTITY FULL); unchanged TOAST values are left
/// out, NULLs compare with `IS NULL`.
fn whole_row_filter(shape: &TableShape, tuple: &Tuple) -> Result<String, ApplyError> {
    let mut parts = Vec::new();
    for (column, datum) in shape.columns.iter().zip(&tuple.0) {
        let name = quote(&column.name);
        match datum {
            Datum::UnchangedToast => {}
            Datum::Null => parts.push(format!("{name} IS NULL")),
            d => parts.push(format!("{name} = {}", typed(shape, column, d)?)),
        }
    }
    if parts.is_empty() {
        return Ok("true".into());
    }
    Ok(parts.join(" AND "))
}

/// `"a" = '1', "b" = NULL` for every column the new row carries.
fn assignments(shape: &TableShape, new: &Tuple) -> Result<String, ApplyError> {
    let mut parts = Vec::new();
    for (column, datum) in shape.columns.iter().zip(&new.0) {
        if matches!(datum, Datum::UnchangedToast) || column.identity_always {
            continue;
        }
        parts.push(format!(
            "{} = {}",
            quote(&column.name),
            value(shape, column, datum)?
        ));
    }
    Ok(parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn shape(oid: u32, name: &str, columns: &[(&str, bool, &str)]) -> TableShape {
        TableShape {
            oid,
            name: QualifiedName::new("public", name),
            columns: columns
                .iter()
                .map(|(n, key, ty)| ShapeColumn {
                    name: n.to_string(),
                    key: *key,
                    mirror_type: ty.to_string(),
                    identity_always: false,
                })
                .collect(),
            identity_full: false,
            partitioned: false,
        }
    }

    fn orders() -> TableShape {
        shape(
            1,
            "orders",
            &[
                ("id", true, "bigint"),
                ("status", false, "public.order_status"),
                ("note", false, "text"),
            ],
        )
    }

    fn items() -> TableShape {
        shape(
            2,
            "Order Items",
            &[("order_id", true, "bigint"), ("line", true, "integer")],
        )
    }

    fn row(values: &[Option<&str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| match v {
                    Some("<toast>") => Datum::UnchangedToast,
                    Some(v) => Datum::Text(Bytes::copy_from_slice(v.as_bytes())),
                    None => Datum::Null,
                })
                .collect(),
        )
    }

    fn sql(b: &mut BatchBuilder) -> Vec<String> {
        b.take().into_iter().map(|s| s.sql).collect()
    }

    #[test]
    fn consecutive_inserts_become_one_statement_with_quoted_values() {
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.insert(&orders(), &row(&[Some("1"), Some("new"), Some("it's")]))
            .unwrap();
        b.insert(&orders(), &row(&[Some("2"), Some("paid"), None]))
            .unwrap();
        assert_eq!(b.rows(), 2);
        assert_eq!(
            sql(&mut b),
            [
                r#"INSERT INTO "public"."orders" ("id", "status", "note") OVERRIDING SYSTEM VALUE VALUES ('1', 'new', 'it''s'), ('2', 'paid', NULL)"#
            ]
        );
        assert!(b.is_empty());
    }

    #[test]
    fn without_reordering_only_neighbours_merge() {
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.insert(&orders(), &row(&[Some("1"), Some("new"), None]))
            .unwrap();
        b.insert(&items(), &row(&[Some("1"), Some("1")])).unwrap();
        b.insert(&orders(), &row(&[Some("2"), Some("new"), None]))
            .unwrap();
        let out = sql(&mut b);
        assert_eq!(out.len(), 3, "{out:#?}");
        assert!(out[1].starts_with(r#"INSERT INTO "public"."Order Items""#));
    }

    #[test]
    fn with_reordering_each_table_merges_and_keeps_its_own_order() {
        let mut b = BatchBuilder::new(Grouping::PerTable);
        for i in 1..=3 {
            let id = i.to_string();
            b.insert(&orders(), &row(&[Some(&id), Some("new"), None]))
                .unwrap();
            b.insert(&items(), &row(&[Some(&id), Some("1")])).unwrap();
            b.update(
                &orders(),
                None,
                &row(&[Some(&id), Some("paid"), Some("<toast>")]),
            )
            .unwrap();
        }
        let out = sql(&mut b);
        // orders: insert, update, insert, update ... would not merge; per table they still
        // alternate, so only the items merge fully.
        let items: Vec<&String> = out.iter().filter(|s| s.contains("Order Items")).collect();
        assert_eq!(items.len(), 1, "{out:#?}");
        let first_order = out.iter().position(|s| s.contains("orders")).unwrap();
        assert!(out[first_order].starts_with("INSERT"), "{out:#?}");
    }

    #[test]
    fn per_table_inserts_and_updates_of_distinct_rows_merge_across_each_other() {
        let mut b = BatchBuilder::new(Grouping::PerTable);
        for (new, updated) in [("3", "1"), ("4", "2")] {
            b.insert(&orders(), &row(&[Some(new), Some("new"), None]))
                .unwrap();
            b.update(
                &orders(),
                None,
                &row(&[Some(updated), Some("paid"), Some("<toast>")]),
            )
            .unwrap();
        }
        let out = sql(&mut b);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(
            out[0].starts_with("UPDATE") && out[0].contains("('2', 'paid')"),
            "{out:#?}"
        );
        assert!(
            out[1].starts_with("INSERT") && out[1].contains("('4', 'new', NULL)"),
            "{out:#?}"
        );
    }

    #[test]
    fn per_table_a_row_changed_twice_keeps_its_order() {
        let mut b = BatchBuilder::new(Grouping::PerTable);
        b.insert(&orders(), &row(&[Some("1"), Some("new"), None]))
            .unwrap();
        b.update(&orders(), None, &row(&[Some("1"), Some("paid"), None]))
            .unwrap();
        b.delete(&orders(), &OldTuple::Key(row(&[Some("1"), None, None])))
            .unwrap();
        let out = sql(&mut b);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(
            out[0].starts_with("INSERT") && out[0].contains("'paid'"),
            "the update folds into the insert: {out:#?}"
        );
        assert!(out[1].starts_with("DELETE"));
    }

    #[test]
    fn per_table_a_row_updated_again_keeps_only_its_last_values() {
        let mut b = BatchBuilder::new(Grouping::PerTable);
        for (id, status) in [("1", "paid"), ("2", "paid"), ("1", "done")] {
            b.update(&orders(), None, &row(&[Some(id), Some(status), None]))
                .unwrap();
        }
        let out = sql(&mut b);
        assert_eq!(out.len(), 1, "{out:#?}");
        assert!(
            out[0].contains(
                "('1'::bigint, 'done'::public.order_status, NULL::text), ('2', 'paid', NULL)"
            ),
            "{out:#?}"
        );
        assert_eq!(b.rows(), 0);
    }

    #[test]
    fn per_table_updates_that_cannot_fold_keep_their_order() {
        // Unchanged TOAST: the inserted row's value is needed, so the update stays.
        let mut b = BatchBuilder::new(Grouping::PerTable);
        b.insert(&orders(), &row(&[Some("1"), Some("new"), Some("note")]))
            .unwrap();
        let mut toast = row(&[Some("1"), Some("paid"), None]);
        toast.0[2] = Datum::UnchangedToast;
        b.update(&orders(), None, &toast).unwrap();
        let out = sql(&mut b);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(out[0].starts_with("INSERT") && out[0].contains("'new'"));
        assert!(out[1].starts_with("UPDATE") && out[1].contains("'paid'"));
        // Other columns set: two groups, in order.
        b.update(&orders(), None, &toast).unwrap();
        b.update(&orders(), None, &row(&[Some("1"), Some("done"), Some("x")]))
            .unwrap();
        let out = sql(&mut b);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(out[0].contains("'paid'") && out[1].contains("'done'"));
        // Without reordering, nothing folds (the mirror fires triggers per change).
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.insert(&orders(), &row(&[Some("1"), Some("new"), None]))
            .unwrap();
        b.update(&orders(), None, &row(&[Some("1"), Some("paid"), None]))
            .unwrap();
        assert_eq!(sql(&mut b).len(), 2);
    }

    #[test]
    fn merged_inserts_can_load_with_copy_in_its_text_format() {
        let mut b = BatchBuilder::new(Grouping::PerTable);
        b.set_copy(true);
        b.insert(
            &orders(),
            &row(&[
                Some("1"),
                Some("new"),
                Some("tab\there\nline \\ back\rslash"),
            ]),
        )
        .unwrap();
        b.insert(&orders(), &row(&[Some("2"), Some("new"), None]))
            .unwrap();
        let out = b.take();
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(
            out[0].sql,
            r#"COPY "public"."orders" ("id", "status", "note") FROM STDIN"#
        );
        assert_eq!(
            out[0].copy.as_deref(),
            Some("1\tnew\ttab\\there\\nline \\\\ back\\rslash\n2\tnew\t\\N\n")
        );
        // A careful batch never copies: every change is its own statement.
        let mut careful = BatchBuilder::new(Grouping::None);
        careful.set_copy(true);
        careful
            .insert(&orders(), &row(&[Some("1"), Some("new"), None]))
            .unwrap();
        assert!(careful.take()[0].copy.is_none());
    }

    #[test]
    fn careful_batches_send_every_change_alone_in_source_order() {
        let mut b = BatchBuilder::new(Grouping::None);
        b.insert(&orders(), &row(&[Some("1"), Some("new"), None]))
            .unwrap();
        b.insert(&orders(), &row(&[Some("2"), Some("new"), None]))
            .unwrap();
        b.update(&orders(), None, &row(&[Some("1"), Some("paid"), None]))
            .unwrap();
        b.delete(&orders(), &OldTuple::Key(row(&[Some("2"), None, None])))
            .unwrap();
        assert_eq!(
            sql(&mut b),
            [
                r#"INSERT INTO "public"."orders" ("id", "status", "note") OVERRIDING SYSTEM VALUE VALUES ('1', 'new', NULL)"#,
                r#"INSERT INTO "public"."orders" ("id", "status", "note") OVERRIDING SYSTEM VALUE VALUES ('2', 'new', NULL)"#,
                r#"UPDATE "public"."orders" SET "id" = '1', "status" = 'paid', "note" = NULL WHERE "id" = '1'::bigint"#,
                r#"DELETE FROM "public"."orders" WHERE "id" IN ('2'::bigint)"#,
            ]
        );
    }

    #[test]
    fn inserts_into_a_table_without_a_key_still_merge() {
        let mut t = shape(3, "log", &[("line", false, "text")]);
        t.identity_full = true;
        let mut b = BatchBuilder::new(Grouping::PerTable);
        b.insert(&t, &row(&[Some("a")])).unwrap();
        b.insert(&t, &row(&[Some("a")])).unwrap();
        b.delete(&t, &OldTuple::Full(row(&[Some("a")]))).unwrap();
        b.insert(&t, &row(&[Some("b")])).unwrap();
        let out = sql(&mut b);
        assert_eq!(out.len(), 3, "{out:#?}");
        assert!(out[0].ends_with("VALUES ('a'), ('a')"), "{out:#?}");
        assert!(out[1].starts_with("DELETE"), "{out:#?}");
        assert!(out[2].ends_with("VALUES ('b')"), "{out:#?}");
    }

    #[test]
    fn updates_of_distinct_rows_merge_and_leave_unchanged_toast_alone() {
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.update(
            &orders(),
            None,
            &row(&[Some("1"), Some("paid"), Some("<toast>")]),
        )
        .unwrap();
        b.update(
            &orders(),
            None,
            &row(&[Some("2"), Some("done"), Some("<toast>")]),
        )
        .unwrap();
        assert_eq!(
            sql(&mut b),
            [
                r#"UPDATE "public"."orders" AS t SET "status" = v.c0 FROM (VALUES ('1'::bigint, 'paid'::public.order_status), ('2', 'done')) AS v(k0, c0) WHERE t."id" = v.k0"#
            ]
        );
    }

    #[test]
    fn a_row_updated_twice_starts_a_new_group() {
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.update(&orders(), None, &row(&[Some("1"), Some("paid"), None]))
            .unwrap();
        b.update(&orders(), None, &row(&[Some("1"), Some("done"), None]))
            .unwrap();
        let out = sql(&mut b);
        assert_eq!(out.len(), 2, "{out:#?}");
        assert!(
            out[1].contains("'done'::public.order_status"),
            "second group casts again: {out:#?}"
        );
    }

    #[test]
    fn updates_setting_different_columns_do_not_merge() {
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.update(&orders(), None, &row(&[Some("1"), Some("paid"), None]))
            .unwrap();
        b.update(
            &orders(),
            None,
            &row(&[Some("2"), Some("paid"), Some("<toast>")]),
        )
        .unwrap();
        assert_eq!(sql(&mut b).len(), 2);
    }

    #[test]
    fn a_key_change_updates_the_row_found_by_its_old_key() {
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.update(
            &items(),
            Some(&OldTuple::Key(row(&[Some("1"), Some("1")]))),
            &row(&[Some("1"), Some("2")]),
        )
        .unwrap();
        assert_eq!(
            sql(&mut b),
            [
                r#"UPDATE "public"."Order Items" SET "order_id" = '1', "line" = '2' WHERE "order_id" = '1'::bigint AND "line" = '1'::integer"#
            ]
        );
    }

    #[test]
    fn deletes_merge_by_key_single_and_composite() {
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.delete(&orders(), &OldTuple::Key(row(&[Some("1"), None, None])))
            .unwrap();
        b.delete(&orders(), &OldTuple::Key(row(&[Some("2"), None, None])))
            .unwrap();
        b.delete(&items(), &OldTuple::Key(row(&[Some("1"), Some("1")])))
            .unwrap();
        b.delete(&items(), &OldTuple::Key(row(&[Some("1"), Some("2")])))
            .unwrap();
        assert_eq!(
            sql(&mut b),
            [
                r#"DELETE FROM "public"."orders" WHERE "id" IN ('1'::bigint, '2'::bigint)"#,
                r#"DELETE FROM "public"."Order Items" WHERE ("order_id", "line") IN (('1'::bigint, '1'::integer), ('1'::bigint, '2'::integer))"#,
            ]
        );
    }

    #[test]
    fn replica_identity_full_finds_one_row_by_all_its_values() {
        let mut t = shape(3, "log", &[("a", false, "text"), ("b", false, "integer")]);
        t.identity_full = true;
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        b.delete(&t, &OldTuple::Full(row(&[Some("x"), None])))
            .unwrap();
        assert_eq!(
            sql(&mut b),
            [
                r#"DELETE FROM "public"."log" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM "public"."log" WHERE "a" = 'x'::text AND "b" IS NULL LIMIT 1)"#
            ]
        );
    }

    #[test]
    fn every_compared_value_carries_its_column_type() {
        // A composite key and a whole-row identity over a composite column: an untyped
        // '(terraza,1)' compared with them is an anonymous record, which the mirror refuses.
        let seating = shape(
            4,
            "seating",
            &[
                ("place", true, "public.seat"),
                ("capacity", false, "integer"),
            ],
        );
        let mut b = BatchBuilder::new(Grouping::PerTable);
        b.delete(&seating, &OldTuple::Key(row(&[Some("(terraza,1)"), None])))
            .unwrap();
        b.update(
            &seating,
            Some(&OldTuple::Key(row(&[Some("(salón,1)"), None]))),
            &row(&[Some("(salón,2)"), Some("6")]),
        )
        .unwrap();
        let mut log = shape(
            5,
            "seat_log",
            &[("place", false, "public.seat"), ("note", false, "text")],
        );
        log.identity_full = true;
        b.update(
            &log,
            Some(&OldTuple::Full(row(&[Some("(terraza,1)"), None]))),
            &row(&[Some("(terraza,1)"), Some("moved")]),
        )
        .unwrap();
        b.delete(&log, &OldTuple::Full(row(&[Some("(salón,1)"), Some("x")])))
            .unwrap();
        let out = sql(&mut b);
        assert_eq!(
            out,
            [
                r#"DELETE FROM "public"."seating" WHERE "place" IN ('(terraza,1)'::public.seat)"#,
                r#"UPDATE "public"."seating" SET "place" = '(salón,2)', "capacity" = '6' WHERE "place" = '(salón,1)'::public.seat"#,
                r#"UPDATE "public"."seat_log" SET "place" = '(terraza,1)', "note" = 'moved' WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM "public"."seat_log" WHERE "place" = '(terraza,1)'::public.seat AND "note" IS NULL LIMIT 1)"#,
                r#"DELETE FROM "public"."seat_log" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM "public"."seat_log" WHERE "place" = '(salón,1)'::public.seat AND "note" = 'x'::text LIMIT 1)"#,
            ]
        );
    }

    #[test]
    fn a_table_without_columns_inserts_and_deletes_rows() {
        let mut marker = shape(6, "marker", &[]);
        marker.identity_full = true;
        let empty = Tuple(Vec::new());
        let mut b = BatchBuilder::new(Grouping::PerTable);
        b.insert(&marker, &empty).unwrap();
        b.insert(&marker, &empty).unwrap();
        b.delete(&marker, &OldTuple::Full(Tuple(Vec::new())))
            .unwrap();
        assert_eq!(
            sql(&mut b),
            [
                r#"INSERT INTO "public"."marker" SELECT FROM pg_catalog.generate_series(1, 2)"#,
                r#"DELETE FROM "public"."marker" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM "public"."marker" WHERE true LIMIT 1)"#,
            ]
        );
        b.set_copy(true);
        b.insert(&marker, &empty).unwrap();
        b.insert(&marker, &empty).unwrap();
        let out = b.take();
        assert_eq!(out[0].sql, r#"COPY "public"."marker" FROM STDIN"#);
        assert_eq!(out[0].copy.as_deref(), Some("\n\n"));
    }

    #[test]
    fn a_table_without_key_is_refused_with_the_fix() {
        let t = shape(3, "log", &[("a", false, "text")]);
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        let err = b.update(&t, None, &row(&[Some("x")])).unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"ALTER TABLE "public"."log" REPLICA IDENTITY FULL"#),
            "{err}"
        );
        let err = b.delete(&t, &OldTuple::Key(row(&[None]))).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::NoKey {
                    action: "delete",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncate_is_a_barrier_and_never_cascades() {
        let mut b = BatchBuilder::new(Grouping::PerTable);
        b.insert(&orders(), &row(&[Some("1"), Some("new"), None]))
            .unwrap();
        let mut partitioned = items();
        partitioned.partitioned = true;
        b.truncate(&[&partitioned, &orders()], true);
        b.insert(&orders(), &row(&[Some("2"), Some("new"), None]))
            .unwrap();
        let out = sql(&mut b);
        assert_eq!(out.len(), 3, "{out:#?}");
        assert_eq!(
            out[1], r#"TRUNCATE "public"."Order Items", ONLY "public"."orders" RESTART IDENTITY"#,
            "a partitioned table is truncated with its partitions"
        );
        assert!(out[2].contains("'2'"));
    }

    #[test]
    fn bad_rows_are_errors_not_panics() {
        let mut b = BatchBuilder::new(Grouping::Neighbours);
        assert!(matches!(
            b.insert(&orders(), &row(&[Some("1")])),
            Err(ApplyError::Arity {
                got: 1,
                expected: 3,
                ..
            })
        ));
        assert!(matches!(
            b.insert(&orders(), &row(&[Some("1"), Some("<toast>"), None])),
            Err(ApplyError::MissingValue { .. })
        ));
        let binary = Tuple(vec![
            Datum::Binary(Bytes::from_static(b"\x00")),
            Datum::Null,
            Datum::Null,
        ]);
        assert!(matches!(
            b.insert(&orders(), &binary),
            Err(ApplyError::Binary { .. })
        ));
        let latin1 = Tuple(vec![
            Datum::Text(Bytes::from_static(b"\xe9")),
            Datum::Null,
            Datum::Null,
        ]);
        assert!(matches!(
            b.insert(&orders(), &latin1),
            Err(ApplyError::NotUtf8 { .. })
        ));
        assert!(b.is_empty(), "a refused change adds nothing");
    }
}
