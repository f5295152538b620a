//! Reading table definitions from a database's catalog.
//!
//! The source's catalog is read inside the sync's snapshot transaction, so the definitions
//! match the data that is copied. Every query runs with an empty `search_path` (set by the
//! caller), so `format_type`, `pg_get_expr` and `pg_get_constraintdef` qualify every name
//! outside `pg_catalog`: the text they return means the same thing on the mirror.
//!
//! This module only runs queries and fills plain structs; deciding what to do with them is
//! [`super::plan`]'s job and turning them into SQL is [`super::ddl`]'s.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::pg::ident::QualifiedName;

/// The first OID PostgreSQL hands to user objects; anything below is built in and has the same
/// OID on every cluster of a major version.
pub const FIRST_USER_OID: u32 = 16384;

/// A table as the catalog describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TableDef {
    /// The table's OID on the database it was read from.
    pub oid: u32,
    /// Schema and name.
    pub name: QualifiedName,
    /// Columns in `attnum` order, dropped columns left out.
    pub columns: Vec<ColumnDef>,
    /// Primary key, unique, check and exclusion constraints.
    pub constraints: Vec<ConstraintDef>,
    /// Foreign keys declared on this table.
    pub foreign_keys: Vec<ForeignKeyDef>,
    /// Indexes that do not back a constraint.
    pub indexes: Vec<IndexDef>,
    /// `pg_class.reltuples`: the planner's row estimate, for progress bars and scheduling.
    pub estimated_rows: i64,
    /// Heap size in bytes, for scheduling the biggest tables first.
    pub estimated_bytes: i64,
    /// Partitioned on the source: its rows live in its partitions, and are read through it.
    pub partitioned: bool,
    /// `PARTITION BY` clause (`RANGE (paid_at)`) the mirror's table is built with; `None` for a
    /// plain table, or a partitioned one the mirror flattens into one plain table.
    pub partition_key: Option<String>,
    /// Its partitions, each after its parent (sub-partitions follow theirs), built on the
    /// mirror as on the source; empty for a plain or flattened table.
    pub partitions: Vec<Partition>,
    /// `REPLICA IDENTITY` other than the default: `FULL`, `NOTHING` or `USING INDEX "name"`
    /// (a mirror promoted after a failover publishes its changes the same way).
    pub replica_identity: Option<String>,
}

/// A partition of a partitioned table, with its own definition: its columns (their order and
/// defaults may differ from its parent's), constraints and indexes, those inherited from the
/// parent included (they say which of the parent's they are attached to).
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// The table it is a partition of (the root, or a sub-partitioned partition).
    pub parent: QualifiedName,
    /// `FOR VALUES ...` or `DEFAULT`, as `pg_get_expr` prints it.
    pub bound: String,
    /// Its definition; `partition_key` is set when it is sub-partitioned.
    pub def: TableDef,
}

impl TableDef {
    /// The table as one plain table (`[sync] flatten_partitions`): its own columns, keys,
    /// indexes and foreign keys, no partitions; rows are still read through it.
    pub fn flattened(mut self) -> TableDef {
        self.partition_key = None;
        self.partitions.clear();
        self
    }

    /// The table and its partitions, each after its parent.
    pub fn tree(&self) -> impl Iterator<Item = &TableDef> {
        std::iter::once(self).chain(self.partitions.iter().map(|p| &p.def))
    }

    /// Whether the mirror's table is built partitioned.
    pub fn is_partitioned_on_mirror(&self) -> bool {
        self.partition_key.is_some()
    }
}

/// One column.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnDef {
    /// Column name.
    pub name: String,
    /// The type as SQL text (`format_type`), e.g. `numeric(10,2)`, `"public"."order_status"[]`.
    pub type_sql: String,
    /// The type's OID.
    pub type_oid: u32,
    /// For arrays, the element type's OID; 0 otherwise.
    pub element_type_oid: u32,
    /// `NOT NULL`.
    pub not_null: bool,
    /// The default expression, if any (not for identity or generated columns).
    pub default: Option<String>,
    /// `COLLATE` clause text when the column's collation differs from its type's default.
    pub collation: Option<String>,
    /// Identity column settings.
    pub identity: Option<Identity>,
    /// Expression of a stored generated column.
    pub generated: Option<String>,
}

impl ColumnDef {
    /// Whether COPY carries this column (stored generated columns are recomputed instead).
    pub fn is_copied(&self) -> bool {
        self.generated.is_none()
    }
}

/// `GENERATED { ALWAYS | BY DEFAULT } AS IDENTITY`.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// `ALWAYS` rather than `BY DEFAULT`.
    pub always: bool,
    /// The identity's sequence.
    pub sequence: SequenceDef,
}

/// A sequence: its parameters and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceDef {
    /// Schema and name.
    pub name: QualifiedName,
    /// `smallint`, `integer` or `bigint`.
    pub data_type: String,
    /// `START WITH`.
    pub start: i64,
    /// `INCREMENT BY`.
    pub increment: i64,
    /// `MINVALUE`.
    pub min: i64,
    /// `MAXVALUE`.
    pub max: i64,
    /// `CACHE`.
    pub cache: i64,
    /// `CYCLE`.
    pub cycle: bool,
    /// Current position (`last_value`, or `None` when never used).
    pub last_value: Option<i64>,
    /// The table column that owns it (`OWNED BY`), if any.
    pub owned_by: Option<(QualifiedName, String)>,
}

/// A primary key, unique, check or exclusion constraint.
#[derive(Debug, Clone, PartialEq)]
pub struct ConstraintDef {
    /// Constraint name.
    pub name: String,
    /// `p`, `u`, `c` or `x`, as in `pg_constraint.contype`.
    pub kind: char,
    /// `pg_get_constraintdef` text, e.g. `PRIMARY KEY (id)`, `CHECK ((price >= (0)::numeric))`.
    pub definition: String,
    /// For primary keys and unique constraints, the backing index's `USING ...` clause, so the
    /// index can be built on its own (in parallel with others) and attached afterwards.
    pub index_using: Option<String>,
    /// `DEFERRABLE`.
    pub deferrable: bool,
    /// `INITIALLY DEFERRED`.
    pub initially_deferred: bool,
    /// On a partition, the parent's index this constraint's index is attached to (the
    /// constraint is the partition's part of its parent's).
    pub attached_to: Option<String>,
}

/// A foreign key.
#[derive(Debug, Clone, PartialEq)]
pub struct ForeignKeyDef {
    /// Constraint name.
    pub name: String,
    /// Referencing columns, in key order.
    pub columns: Vec<String>,
    /// The referenced table.
    pub referenced: QualifiedName,
    /// Referenced columns, in key order.
    pub referenced_columns: Vec<String>,
    /// `pg_constraint.confupdtype`.
    pub on_update: char,
    /// `pg_constraint.confdeltype`.
    pub on_delete: char,
    /// `MATCH FULL`.
    pub match_full: bool,
    /// `DEFERRABLE`.
    pub deferrable: bool,
    /// `INITIALLY DEFERRED`.
    pub initially_deferred: bool,
    /// Validated; `false` for a key added `NOT VALID` on the source, whose old rows may break it.
    pub validated: bool,
}

/// A plain index (one that does not back a constraint).
#[derive(Debug, Clone, PartialEq)]
pub struct IndexDef {
    /// Index name.
    pub name: String,
    /// Everything after `ON <table>` in `pg_get_indexdef`: ` USING btree (customer_id)`.
    pub using: String,
    /// `CREATE UNIQUE INDEX`.
    pub unique: bool,
    /// On a partition, the parent's index this one is attached to.
    pub attached_to: Option<String>,
}

/// A user-defined type a synced column depends on.
#[derive(Debug, Clone, PartialEq)]
pub enum TypeDef {
    /// `CREATE TYPE ... AS ENUM`.
    Enum {
        /// Schema and name.
        name: QualifiedName,
        /// Labels in sort order.
        labels: Vec<String>,
    },
    /// `CREATE DOMAIN`.
    Domain {
        /// Schema and name.
        name: QualifiedName,
        /// The base type as SQL text.
        base_type: String,
        /// `NOT NULL`.
        not_null: bool,
        /// `DEFAULT` expression.
        default: Option<String>,
        /// `COLLATE` clause text.
        collation: Option<String>,
        /// Named `CHECK` constraints: (name, definition).
        checks: Vec<(String, String)>,
    },
    /// `CREATE TYPE ... AS (...)`.
    Composite {
        /// Schema and name.
        name: QualifiedName,
        /// Attributes: name, type as SQL text, `COLLATE` clause text when not the type's.
        attributes: Vec<(String, String, Option<String>)>,
    },
    /// `CREATE TYPE ... AS RANGE (...)`.
    Range {
        /// Schema and name.
        name: QualifiedName,
        /// The options: `subtype = ...`, `subtype_opclass = ...`, ...
        options: Vec<String>,
    },
    /// A type the mirror must already have (a base type written in C, from an extension or
    /// not): bite-sync does not create it, only checks that it exists.
    External {
        /// Schema and name.
        name: QualifiedName,
        /// What kind of type, for the message: `composite`, `range`, `base` ...
        kind: &'static str,
        /// The extension that provides it, if any.
        extension: Option<String>,
    },
}

impl TypeDef {
    /// The type's name.
    pub fn name(&self) -> &QualifiedName {
        match self {
            TypeDef::Enum { name, .. }
            | TypeDef::Domain { name, .. }
            | TypeDef::Composite { name, .. }
            | TypeDef::Range { name, .. }
            | TypeDef::External { name, .. } => name,
        }
    }
}

/// Everything the source's catalog says about the tables of one sync.
#[derive(Debug, Clone, Default)]
pub struct SourceCatalog {
    /// The selected tables, by name.
    pub tables: BTreeMap<QualifiedName, TableDef>,
    /// What the tables need on the mirror besides themselves (types, collations, functions,
    /// extensions, sequences), in dependency order ([`read_needs`]; empty until then).
    pub needs: Vec<super::depends::Need>,
    /// The user types among `needs`, dependencies first.
    pub types: Vec<TypeDef>,
    /// The sequences among `needs`: those column defaults draw from, directly (`serial`,
    /// `nextval('...')`) or through a function they call.
    pub sequences: Vec<SequenceDef>,
}

/// A table that exists, with its kind, for resolving `--tables` patterns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableEntry {
    /// Schema and name.
    pub name: QualifiedName,
    /// `r` (table) or `p` (partitioned table).
    pub kind: char,
    /// For a partition, the partitioned table at the top of its tree (which is what is
    /// synced and replicated).
    pub root: Option<QualifiedName>,
}

/// Schemas that never hold user tables to sync.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'bite_sync', 'pg_toast') \
     AND n.nspname NOT LIKE 'pg_temp_%' AND n.nspname NOT LIKE 'pg_toast_temp_%' \
     AND NOT starts_with(n.nspname, 'bite_sync_stage_')";

/// Lists every user table of the database, partitions included (with their root).
pub async fn list_tables(client: &Client) -> Result<Vec<TableEntry>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT n.nspname, c.relname, c.relkind::text, rn.nspname, rc.relname \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_catalog.pg_class rc ON c.relispartition AND rc.oid = pg_catalog.pg_partition_root(c.oid) \
         LEFT JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS} \
         ORDER BY 1, 2"
    );
    let rows = client.query(&sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| TableEntry {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            kind: r.get::<_, String>(2).chars().next().unwrap_or('r'),
            root: match (r.get::<_, Option<String>>(3), r.get::<_, Option<String>>(4)) {
                (Some(schema), Some(name)) => Some(QualifiedName::new(schema, name)),
                _ => None,
            },
        })
        .collect())
}

/// The schemas an unqualified table name is looked up in, in order (`current_schemas(false)`).
pub async fn search_path(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT pg_catalog.current_schemas(false)::text[]", &[])
        .await?;
    Ok(row.get(0))
}

/// Reads the full definitions of `names` (which must exist), partitioned tables with every
/// partition under them. What they need besides ([`SourceCatalog::needs`]) is read by
/// [`read_needs`].
pub async fn read_tables(
    client: &Client,
    names: &[QualifiedName],
) -> Result<SourceCatalog, tokio_postgres::Error> {
    let (schemas, tables) = QualifiedName::split(names);
    // Every selected table and the partitions under it, parents before their partitions.
    let rows = client
        .query(
            "WITH roots AS (SELECT c.oid FROM unnest($1::text[], $2::text[]) AS want(schema, name) \
                            JOIN pg_catalog.pg_namespace n ON n.nspname = want.schema \
                            JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = want.name \
                            WHERE c.relkind IN ('r', 'p')), \
                  tree AS (SELECT r.oid AS root, r.oid AS relid, NULL::oid AS parentrelid, 0 AS level FROM roots r \
                           UNION ALL \
                           SELECT r.oid, t.relid::oid, t.parentrelid::oid, t.level \
                           FROM roots r, pg_catalog.pg_partition_tree(r.oid) t WHERE t.level > 0) \
             SELECT tree.root, c.oid, n.nspname, c.relname, c.relkind::text, tree.parentrelid, \
                    pg_catalog.pg_get_expr(c.relpartbound, c.oid), \
                    CASE WHEN c.relkind = 'p' THEN pg_catalog.pg_get_partkeydef(c.oid) END, \
                    GREATEST(c.reltuples, 0)::int8, pg_catalog.pg_relation_size(c.oid), \
                    CASE c.relreplident WHEN 'f' THEN 'FULL' WHEN 'n' THEN 'NOTHING' \
                         WHEN 'i' THEN 'USING INDEX ' || pg_catalog.quote_ident((SELECT ic.relname FROM pg_catalog.pg_index i \
                              JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = c.oid AND i.indisreplident)) END \
             FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             ORDER BY tree.root, tree.level, c.oid",
            &[&schemas, &tables],
        )
        .await?;
    struct Member {
        root: u32,
        parent: Option<u32>,
        bound: Option<String>,
    }
    let mut by_oid: BTreeMap<u32, TableDef> = BTreeMap::new();
    let mut members: Vec<(u32, Member)> = Vec::new();
    for r in &rows {
        let root: u32 = r.get(0);
        let oid: u32 = r.get(1);
        let kind: String = r.get(4);
        by_oid.insert(
            oid,
            TableDef {
                oid,
                name: QualifiedName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
                columns: Vec::new(),
                constraints: Vec::new(),
                foreign_keys: Vec::new(),
                indexes: Vec::new(),
                estimated_rows: r.get(8),
                estimated_bytes: r.get(9),
                partitioned: kind == "p",
                partition_key: r.get(7),
                partitions: Vec::new(),
                replica_identity: r.get(10),
            },
        );
        members.push((
            oid,
            Member {
                root,
                parent: r.get(5),
                bound: r.get(6),
            },
        ));
    }
    let oids: Vec<u32> = by_oid.keys().copied().collect();
    read_columns(client, &oids, &mut by_oid).await?;
    read_constraints(client, &oids, &mut by_oid).await?;
    read_indexes(client, &oids, &mut by_oid).await?;

    let names_by_oid: BTreeMap<u32, QualifiedName> = by_oid
        .iter()
        .map(|(oid, def)| (*oid, def.name.clone()))
        .collect();
    let mut roots: BTreeMap<u32, TableDef> = BTreeMap::new();
    for (oid, member) in members {
        let def = by_oid.remove(&oid).expect("read above");
        if oid == member.root {
            roots.insert(oid, def);
            continue;
        }
        let Some(root) = roots.get_mut(&member.root) else {
            continue;
        };
        root.estimated_rows += def.estimated_rows;
        root.estimated_bytes += def.estimated_bytes;
        let parent = member
            .parent
            .and_then(|p| names_by_oid.get(&p).cloned())
            .unwrap_or_else(|| root.name.clone());
        root.partitions.push(Partition {
            parent,
            bound: member.bound.unwrap_or_default(),
            def,
        });
    }
    Ok(SourceCatalog {
        tables: roots.into_values().map(|t| (t.name.clone(), t)).collect(),
        needs: Vec::new(),
        types: Vec::new(),
        sequences: Vec::new(),
    })
}

/// Fills in what the catalog's tables need on the mirror ([`super::depends::read`]).
/// `search_path` is the source's usual one, to resolve names in function bodies.
pub async fn read_needs(
    client: &Client,
    catalog: &mut SourceCatalog,
    search_path: &[String],
) -> Result<(), tokio_postgres::Error> {
    let oids: Vec<u32> = catalog
        .tables
        .values()
        .flat_map(|t| t.tree().map(|d| d.oid))
        .collect();
    catalog.needs = super::depends::read(client, &oids, search_path).await?;
    catalog.sequences = catalog
        .needs
        .iter()
        .filter_map(|n| match n {
            super::depends::Need::Sequence(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    catalog.sequences.sort_by(|a, b| a.name.cmp(&b.name));
    catalog.types = catalog
        .needs
        .iter()
        .filter_map(|n| match n {
            super::depends::Need::Type(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    Ok(())
}

/// A column the source added to a replicated table, with what the mirror needs to add it the
/// same: its definition (type, collation, default, `NOT NULL`, identity), the check and unique
/// constraints over it, and the sequences its default draws from.
#[derive(Debug, Clone, PartialEq)]
pub struct AddedColumn {
    /// The column.
    pub column: ColumnDef,
    /// Check and unique constraints that involve it.
    pub constraints: Vec<ConstraintDef>,
    /// Sequences its default calls (`serial`, hand-written `nextval`).
    pub sequences: Vec<SequenceDef>,
}

/// Reads column `column` of table `table_oid` and what it needs (see [`AddedColumn`]); `None`
/// when the table has no such column (any more).
pub async fn read_added_column(
    client: &Client,
    table_oid: u32,
    column: &str,
) -> Result<Option<AddedColumn>, tokio_postgres::Error> {
    let placeholder = TableDef {
        oid: table_oid,
        name: QualifiedName::new("", ""),
        columns: Vec::new(),
        constraints: Vec::new(),
        foreign_keys: Vec::new(),
        indexes: Vec::new(),
        estimated_rows: 0,
        estimated_bytes: 0,
        partitioned: false,
        partition_key: None,
        partitions: Vec::new(),
        replica_identity: None,
    };
    let mut tables = BTreeMap::from([(table_oid, placeholder)]);
    read_columns(client, &[table_oid], &mut tables).await?;
    read_constraints(client, &[table_oid], &mut tables).await?;
    let table = tables.remove(&table_oid).expect("inserted above");
    let Some(def) = table.columns.into_iter().find(|c| c.name == column) else {
        return Ok(None);
    };
    let involved: Vec<String> = client
        .query(
            "SELECT con.conname::text FROM pg_catalog.pg_constraint con \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attname = $2 \
             WHERE con.conrelid = $1 AND con.contype IN ('c', 'u') AND a.attnum = ANY (con.conkey)",
            &[&table_oid, &column],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let constraints = table
        .constraints
        .into_iter()
        .filter(|c| involved.contains(&c.name))
        .collect();
    let rows = client
        .query(
            "SELECT DISTINCT dep.refobjid \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum \
             JOIN pg_catalog.pg_depend dep ON dep.classid = 'pg_catalog.pg_attrdef'::regclass \
                  AND dep.objid = ad.oid AND dep.refclassid = 'pg_catalog.pg_class'::regclass \
             JOIN pg_catalog.pg_class s ON s.oid = dep.refobjid AND s.relkind = 'S' \
             WHERE a.attrelid = $1 AND a.attname = $2",
            &[&table_oid, &column],
        )
        .await?;
    let mut sequences = Vec::new();
    for r in &rows {
        if let Some(seq) = read_sequence(client, r.get(0)).await? {
            sequences.push(seq);
        }
    }
    Ok(Some(AddedColumn {
        column: def,
        constraints,
        sequences,
    }))
}

async fn read_columns(
    client: &Client,
    oids: &[u32],
    tables: &mut BTreeMap<u32, TableDef>,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attrelid, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                    a.atttypid, CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END, \
                    a.attnotnull, \
                    CASE WHEN a.attgenerated = '' AND a.attidentity = '' \
                         THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END, \
                    CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 \
                         THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END, \
                    a.attidentity::text, \
                    CASE WHEN a.attgenerated = 's' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END, \
                    pg_catalog.pg_get_serial_sequence(pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname), a.attname)::regclass::oid \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation \
             LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace \
             WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attrelid, a.attnum",
            &[&oids],
        )
        .await?;
    for r in &rows {
        let relid: u32 = r.get(0);
        let identity_kind: String = r.get(8);
        let identity = match identity_kind.as_str() {
            "a" | "d" => {
                let seq_oid: Option<u32> = r.get(10);
                let sequence = match seq_oid {
                    Some(oid) => read_sequence(client, oid).await?,
                    None => None,
                };
                sequence.map(|sequence| Identity {
                    always: identity_kind == "a",
                    sequence,
                })
            }
            _ => None,
        };
        let column = ColumnDef {
            name: r.get(1),
            type_sql: r.get(2),
            type_oid: r.get(3),
            element_type_oid: r.get(4),
            not_null: r.get(5),
            default: r.get(6),
            collation: r.get(7),
            identity,
            generated: r.get(9),
        };
        if let Some(t) = tables.get_mut(&relid) {
            t.columns.push(column);
        }
    }
    Ok(())
}

async fn read_constraints(
    client: &Client,
    oids: &[u32],
    tables: &mut BTreeMap<u32, TableDef>,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT con.conrelid, con.conname, con.contype::text, \
                    pg_catalog.pg_get_constraintdef(con.oid), \
                    fn.nspname, fc.relname, \
                    ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(num, ord) \
                          JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num \
                          ORDER BY k.ord)::text[], \
                    ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(num, ord) \
                          JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num \
                          ORDER BY k.ord)::text[], \
                    con.confupdtype::text, con.confdeltype::text, con.confmatchtype::text, \
                    con.condeferrable, con.condeferred, \
                    CASE WHEN con.contype IN ('p', 'u') THEN pg_catalog.pg_get_indexdef(con.conindid) END, \
                    pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(cc.relname), \
                    con.convalidated, \
                    (SELECT pi.relname::text FROM pg_catalog.pg_constraint pcon \
                     JOIN pg_catalog.pg_class pi ON pi.oid = pcon.conindid WHERE pcon.oid = con.conparentid) \
             FROM pg_catalog.pg_constraint con \
             JOIN pg_catalog.pg_class cc ON cc.oid = con.conrelid \
             JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace \
             LEFT JOIN pg_catalog.pg_class fc ON fc.oid = con.confrelid \
             LEFT JOIN pg_catalog.pg_namespace fn ON fn.oid = fc.relnamespace \
             WHERE con.conrelid = ANY($1) AND con.contype IN ('p', 'u', 'c', 'x', 'f') \
               AND (con.conparentid = 0 OR con.contype <> 'f') \
             ORDER BY con.conrelid, con.contype, con.conname",
            &[&oids],
        )
        .await?;
    for r in &rows {
        let relid: u32 = r.get(0);
        let Some(table) = tables.get_mut(&relid) else {
            continue;
        };
        let kind = first_char(r.get(2));
        let name: String = r.get(1);
        if kind == 'f' {
            table.foreign_keys.push(ForeignKeyDef {
                name,
                columns: r.get(6),
                referenced: QualifiedName::new(r.get::<_, String>(4), r.get::<_, String>(5)),
                referenced_columns: r.get(7),
                on_update: first_char(r.get(8)),
                on_delete: first_char(r.get(9)),
                match_full: first_char(r.get(10)) == 'f',
                deferrable: r.get(11),
                initially_deferred: r.get(12),
                validated: r.get(15),
            });
        } else {
            let index_def: Option<String> = r.get(13);
            let qualified_table: String = r.get(14);
            table.constraints.push(ConstraintDef {
                name,
                kind,
                definition: r.get(3),
                index_using: index_def.and_then(|d| using_clause(&d, &qualified_table)),
                deferrable: r.get(11),
                initially_deferred: r.get(12),
                attached_to: r.get(16),
            });
        }
    }
    Ok(())
}

async fn read_indexes(
    client: &Client,
    oids: &[u32],
    tables: &mut BTreeMap<u32, TableDef>,
) -> Result<(), tokio_postgres::Error> {
    // Indexes backing a constraint come with the constraint; the rest are rebuilt from
    // pg_get_indexdef, whose text is `CREATE [UNIQUE] INDEX <name> ON [ONLY] <table> USING ...`.
    let rows = client
        .query(
            "SELECT i.indrelid, ic.relname, i.indisunique, pg_catalog.pg_get_indexdef(i.indexrelid), \
                    pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(tc.relname), \
                    (SELECT pi.relname::text FROM pg_catalog.pg_inherits inh \
                     JOIN pg_catalog.pg_class pi ON pi.oid = inh.inhparent WHERE inh.inhrelid = i.indexrelid) \
             FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
             JOIN pg_catalog.pg_class tc ON tc.oid = i.indrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = tc.relnamespace \
             WHERE i.indrelid = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint con WHERE con.conindid = i.indexrelid \
                               AND con.conrelid = i.indrelid) \
             ORDER BY i.indrelid, ic.relname",
            &[&oids],
        )
        .await?;
    for r in &rows {
        let relid: u32 = r.get(0);
        let Some(table) = tables.get_mut(&relid) else {
            continue;
        };
        let definition: String = r.get(3);
        let qualified_table: String = r.get(4);
        let name: String = r.get(1);
        let Some(using) = using_clause(&definition, &qualified_table) else {
            tracing::warn!(index = name, table = %table.name, "cannot read the index definition; it is not copied");
            continue;
        };
        table.indexes.push(IndexDef {
            name,
            using,
            unique: r.get(2),
            attached_to: r.get(5),
        });
    }
    Ok(())
}

/// The part of a `pg_get_indexdef` text after the table name: ` USING btree (id)`. The text
/// is `CREATE [UNIQUE] INDEX <name> ON [ONLY] <qualified table> USING ...`, and the qualified
/// table name is given exactly as PostgreSQL quotes it, so it can be found without parsing.
pub fn using_clause(definition: &str, qualified_table: &str) -> Option<String> {
    let at = definition
        .find(&format!(" ON {qualified_table} USING "))
        .map(|at| at + " ON ".len() + qualified_table.len())
        .or_else(|| {
            definition
                .find(&format!(" ON ONLY {qualified_table} USING "))
                .map(|at| at + " ON ONLY ".len() + qualified_table.len())
        })?;
    Some(definition[at..].to_string())
}

/// A sequence's definition and position; `None` when there is no such sequence.
pub(super) async fn read_sequence(
    client: &Client,
    oid: u32,
) -> Result<Option<SequenceDef>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT n.nspname, c.relname, pg_catalog.format_type(s.seqtypid, NULL), s.seqstart, \
                    s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle, \
                    (SELECT CASE WHEN ps.last_value IS NOT NULL THEN ps.last_value END \
                       FROM pg_catalog.pg_sequences ps WHERE ps.schemaname = n.nspname AND ps.sequencename = c.relname), \
                    on_.nspname, oc.relname, oa.attname \
             FROM pg_catalog.pg_sequence s \
             JOIN pg_catalog.pg_class c ON c.oid = s.seqrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid \
                  AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0 \
             LEFT JOIN pg_catalog.pg_class oc ON oc.oid = d.refobjid \
             LEFT JOIN pg_catalog.pg_namespace on_ ON on_.oid = oc.relnamespace \
             LEFT JOIN pg_catalog.pg_attribute oa ON oa.attrelid = d.refobjid AND oa.attnum = d.refobjsubid \
             WHERE s.seqrelid = $1",
            &[&oid],
        )
        .await?;
    Ok(row.map(|r| SequenceDef {
        name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
        data_type: r.get(2),
        start: r.get(3),
        increment: r.get(4),
        min: r.get(5),
        max: r.get(6),
        cache: r.get(7),
        cycle: r.get(8),
        last_value: r.get(9),
        owned_by: match (
            r.get::<_, Option<String>>(10),
            r.get::<_, Option<String>>(11),
            r.get::<_, Option<String>>(12),
        ) {
            (Some(s), Some(t), Some(c)) => Some((QualifiedName::new(s, t), c)),
            _ => None,
        },
    }))
}

/// A user type's definition (the extension that provides it, if any, makes it external).
pub(super) async fn read_type(client: &Client, oid: u32) -> Result<TypeDef, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT n.nspname, t.typname, t.typtype::text, \
                    pg_catalog.format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault, \
                    CASE WHEN t.typcollation <> 0 AND t.typcollation <> bt.typcollation \
                         THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END, \
                    (SELECT e.extname FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid \
                      WHERE d.classid = 'pg_catalog.pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e' LIMIT 1) \
             FROM pg_catalog.pg_type t \
             JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
             LEFT JOIN pg_catalog.pg_type bt ON bt.oid = t.typbasetype \
             LEFT JOIN pg_catalog.pg_collation co ON co.oid = t.typcollation \
             LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace \
             WHERE t.oid = $1",
            &[&oid],
        )
        .await?;
    let name = QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1));
    let extension: Option<String> = row.get(7);
    let typtype = first_char(row.get(2));
    if extension.is_some() {
        return Ok(TypeDef::External {
            name,
            kind: "extension",
            extension,
        });
    }
    Ok(match typtype {
        'e' => {
            let labels = client
                .query(
                    "SELECT enumlabel::text FROM pg_catalog.pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            TypeDef::Enum { name, labels }
        }
        'd' => {
            let checks = client
                .query(
                    "SELECT conname::text, pg_catalog.pg_get_constraintdef(oid) FROM pg_catalog.pg_constraint \
                     WHERE contypid = $1 AND contype = 'c' ORDER BY conname",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            TypeDef::Domain {
                name,
                base_type: row.get(3),
                not_null: row.get(4),
                default: row.get(5),
                collation: row.get(6),
                checks,
            }
        }
        'c' => {
            let attributes = client
                .query(
                    "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                            CASE WHEN a.attcollation <> at.typcollation AND a.attcollation <> 0 \
                                 THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END \
                     FROM pg_catalog.pg_type t \
                     JOIN pg_catalog.pg_attribute a ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped \
                     JOIN pg_catalog.pg_type at ON at.oid = a.atttypid \
                     LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation \
                     LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace \
                     WHERE t.oid = $1 ORDER BY a.attnum",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            TypeDef::Composite { name, attributes }
        }
        'r' => {
            let r = client
                .query_one(
                    "SELECT pg_catalog.format_type(r.rngsubtype, NULL), \
                            pg_catalog.quote_ident(on_.nspname) || '.' || pg_catalog.quote_ident(opc.opcname), \
                            CASE WHEN r.rngcollation <> 0 THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END, \
                            r.rngcanonical <> 0, \
                            CASE WHEN r.rngsubdiff <> 0 THEN r.rngsubdiff::regprocedure::text END, \
                            (SELECT pg_catalog.quote_ident(mn.nspname) || '.' || pg_catalog.quote_ident(mt.typname) \
                             FROM pg_catalog.pg_type mt JOIN pg_catalog.pg_namespace mn ON mn.oid = mt.typnamespace \
                             WHERE mt.oid = r.rngmultitypid) \
                     FROM pg_catalog.pg_range r \
                     JOIN pg_catalog.pg_opclass opc ON opc.oid = r.rngsubopc \
                     JOIN pg_catalog.pg_namespace on_ ON on_.oid = opc.opcnamespace \
                     LEFT JOIN pg_catalog.pg_collation co ON co.oid = r.rngcollation \
                     LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace \
                     WHERE r.rngtypid = $1",
                    &[&oid],
                )
                .await?;
            let canonical: bool = r.get(3);
            if canonical {
                // A canonical function is written in C: it comes with an extension.
                return Ok(TypeDef::External {
                    name,
                    kind: "range",
                    extension: None,
                });
            }
            let mut options = vec![
                format!("subtype = {}", r.get::<_, String>(0)),
                format!("subtype_opclass = {}", r.get::<_, String>(1)),
            ];
            if let Some(c) = r.get::<_, Option<String>>(2) {
                options.push(format!("collation = {c}"));
            }
            if let Some(d) = r.get::<_, Option<String>>(4) {
                // regprocedure text: the function name is what the option takes.
                let name = d.split('(').next().unwrap_or(&d).to_string();
                options.push(format!("subtype_diff = {name}"));
            }
            if let Some(m) = r.get::<_, Option<String>>(5) {
                options.push(format!("multirange_type_name = {m}"));
            }
            TypeDef::Range { name, options }
        }
        _ => TypeDef::External {
            name,
            kind: "base",
            extension: None,
        },
    })
}

fn first_char(s: String) -> char {
    s.chars().next().unwrap_or(' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn using_clause_is_found_after_the_exact_table_name() {
        assert_eq!(
            using_clause(
                "CREATE UNIQUE INDEX \"a ON b\" ON public.\"Order Items\" USING btree (id) INCLUDE (x)",
                "public.\"Order Items\""
            )
            .as_deref(),
            Some(" USING btree (id) INCLUDE (x)")
        );
        assert_eq!(
            using_clause("CREATE INDEX i ON ONLY s.t USING btree (a)", "s.t").as_deref(),
            Some(" USING btree (a)")
        );
        assert_eq!(
            using_clause("CREATE INDEX i ON s.other USING btree (a)", "s.t"),
            None
        );
    }
}
