//! DDL for the mirror, generated from source catalog structs (no `pg_dump`).
//!
//! Pure functions: a catalog struct in, SQL text out. Identifiers are always quoted with
//! [`quote`]; expressions (defaults, checks, index definitions) are PostgreSQL's own
//! deparsed text, read with an empty `search_path` so every name in them is qualified.
//! Each function takes the table name to create *at*, because a sync builds tables in a
//! staging schema and moves them into place later.

use crate::pg::ident::{QualifiedName, literal, quote};

use super::catalog::{
    ColumnDef, ConstraintDef, ForeignKeyDef, IndexDef, Partition, SequenceDef, TableDef, TypeDef,
};

/// `CREATE TYPE` / `CREATE DOMAIN` for a type the mirror lacks; `None` for types bite-sync does
/// not create.
pub fn create_type(def: &TypeDef) -> Option<String> {
    match def {
        TypeDef::Enum { name, labels } => Some(format!(
            "CREATE TYPE {} AS ENUM ({})",
            name.quoted(),
            labels
                .iter()
                .map(|l| literal(l))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        TypeDef::Domain {
            name,
            base_type,
            not_null,
            default,
            collation,
            checks,
        } => {
            let mut sql = format!("CREATE DOMAIN {} AS {base_type}", name.quoted());
            if let Some(c) = collation {
                sql.push_str(&format!(" COLLATE {c}"));
            }
            if let Some(d) = default {
                sql.push_str(&format!(" DEFAULT {d}"));
            }
            if *not_null {
                sql.push_str(" NOT NULL");
            }
            for (check_name, check) in checks {
                sql.push_str(&format!(" CONSTRAINT {} {check}", quote(check_name)));
            }
            Some(sql)
        }
        TypeDef::Composite { name, attributes } => Some(format!(
            "CREATE TYPE {} AS ({})",
            name.quoted(),
            attributes
                .iter()
                .map(|(attr, type_sql, collation)| match collation {
                    Some(c) => format!("{} {type_sql} COLLATE {c}", quote(attr)),
                    None => format!("{} {type_sql}", quote(attr)),
                })
                .collect::<Vec<_>>()
                .join(", ")
        )),
        TypeDef::Range { name, options } => Some(format!(
            "CREATE TYPE {} AS RANGE ({})",
            name.quoted(),
            options.join(", ")
        )),
        TypeDef::External { .. } => None,
    }
}

/// Statements that add the labels of `source_labels` that `mirror_labels` lacks, each placed
/// after its predecessor in the source's order so comparisons agree with the source's.
pub fn add_enum_labels(
    name: &QualifiedName,
    source_labels: &[String],
    mirror_labels: &[String],
) -> Vec<String> {
    let mut known: Vec<&String> = mirror_labels.iter().collect();
    let mut out = Vec::new();
    for (i, label) in source_labels.iter().enumerate() {
        if known.contains(&label) {
            continue;
        }
        let position = match i.checked_sub(1).map(|p| &source_labels[p]) {
            Some(prev) => format!(" AFTER {}", literal(prev)),
            None => match known.first() {
                Some(first) => format!(" BEFORE {}", literal(first)),
                None => String::new(),
            },
        };
        out.push(format!(
            "ALTER TYPE {} ADD VALUE IF NOT EXISTS {}{position}",
            name.quoted(),
            literal(label)
        ));
        known.push(label);
    }
    out
}

/// Sequence options shared by `CREATE SEQUENCE` and identity columns.
fn sequence_options(seq: &SequenceDef) -> String {
    format!(
        "INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} CACHE {} {}",
        seq.increment,
        seq.min,
        seq.max,
        seq.start,
        seq.cache,
        if seq.cycle { "CYCLE" } else { "NO CYCLE" }
    )
}

/// `CREATE SEQUENCE IF NOT EXISTS` for a sequence a column default calls.
pub fn create_sequence(seq: &SequenceDef) -> String {
    format!(
        "CREATE SEQUENCE IF NOT EXISTS {} AS {} {}",
        seq.name.quoted(),
        seq.data_type,
        sequence_options(seq)
    )
}

/// Moves sequence `at` to where the source's stands (never used: back to its start).
pub fn set_sequence(at: &QualifiedName, seq: &SequenceDef) -> String {
    match seq.last_value {
        Some(v) => format!(
            "SELECT pg_catalog.setval({}, {v}, true)",
            literal(&at.quoted())
        ),
        None => format!(
            "SELECT pg_catalog.setval({}, {}, false)",
            literal(&at.quoted()),
            seq.start
        ),
    }
}

/// One column's definition as it appears in `CREATE TABLE` or `ADD COLUMN`.
pub fn column_sql(column: &ColumnDef) -> String {
    let mut sql = format!("{} {}", quote(&column.name), column.type_sql);
    if let Some(c) = &column.collation {
        sql.push_str(&format!(" COLLATE {c}"));
    }
    if let Some(identity) = &column.identity {
        sql.push_str(&format!(
            " GENERATED {} AS IDENTITY (SEQUENCE NAME {} {})",
            if identity.always {
                "ALWAYS"
            } else {
                "BY DEFAULT"
            },
            // Unqualified: the sequence lives in the table's schema and moves with it.
            quote(&identity.sequence.name.name),
            sequence_options(&identity.sequence)
        ));
    } else if let Some(expr) = &column.generated {
        sql.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED"));
    } else if let Some(d) = &column.default {
        sql.push_str(&format!(" DEFAULT {d}"));
    }
    if column.not_null {
        sql.push_str(" NOT NULL");
    }
    sql
}

/// `CREATE TABLE` with columns, defaults, identity, generated columns and check constraints.
/// Keys, indexes and foreign keys come later, after the data is in.
pub fn create_table(def: &TableDef, at: &QualifiedName) -> String {
    let mut parts: Vec<String> = def.columns.iter().map(column_sql).collect();
    for c in def
        .constraints
        .iter()
        .filter(|c| c.kind == 'c' && !is_not_valid(c))
    {
        parts.push(format!("CONSTRAINT {} {}", quote(&c.name), c.definition));
    }
    let mut sql = format!(
        "CREATE TABLE {} (\n    {}\n)",
        at.quoted(),
        parts.join(",\n    ")
    );
    if let Some(key) = &def.partition_key {
        sql.push_str(&format!(" PARTITION BY {key}"));
    }
    sql
}

/// Makes `child` a partition of `parent`: `bound` is `FOR VALUES ...` or `DEFAULT`. `ONLY`:
/// the parent's indexes are attached separately (as `pg_dump` does), so a partition keeps
/// the source's index names.
pub fn attach_partition(parent: &QualifiedName, child: &QualifiedName, bound: &str) -> String {
    format!(
        "ALTER TABLE ONLY {} ATTACH PARTITION {} {bound}",
        parent.quoted(),
        child.quoted()
    )
}

/// The statements that add partition `p` to its parent where the parent exists with rows (a
/// partition the source created while replication runs): the table with its own columns,
/// then its keys and indexes named as on the source (so attaching it matches them to the
/// parent's instead of making new ones), the attachment, its own foreign keys to the
/// `referenced` tables, and its replica identity.
pub fn new_partition(p: &Partition, referenced: &[QualifiedName]) -> Vec<String> {
    let def = &p.def;
    let at = &def.name;
    let partitioned = def.is_partitioned_on_mirror();
    let mut out = vec![
        format!("CREATE SCHEMA IF NOT EXISTS {}", quote(&at.schema)),
        create_table(def, at),
    ];
    for c in &def.constraints {
        match c.kind {
            'p' | 'u' | 'x' if partitioned => out.push(add_key_only(at, c)),
            'p' | 'u' | 'x' => out.push(add_key(at, c)),
            'c' if is_not_valid(c) => out.push(add_key(at, c)),
            _ => {}
        }
    }
    for i in &def.indexes {
        out.push(if partitioned {
            create_index_only(at, i)
        } else {
            create_index(at, i)
        });
    }
    out.push(format!(
        "ALTER TABLE {} ATTACH PARTITION {} {}",
        p.parent.quoted(),
        at.quoted(),
        p.bound
    ));
    for fk in def
        .foreign_keys
        .iter()
        .filter(|fk| referenced.contains(&fk.referenced))
    {
        out.push(add_foreign_key(at, fk, &fk.referenced));
    }
    if let Some(identity) = &def.replica_identity {
        out.push(format!(
            "ALTER TABLE ONLY {} REPLICA IDENTITY {identity}",
            at.quoted()
        ));
    }
    out
}

/// A primary key, unique or exclusion constraint of a partitioned table itself: its index is
/// made invalid and empty, and becomes valid once every partition's index is attached to it.
pub fn add_key_only(at: &QualifiedName, constraint: &ConstraintDef) -> String {
    format!(
        "ALTER TABLE ONLY {} ADD CONSTRAINT {} {}",
        at.quoted(),
        quote(&constraint.name),
        constraint.definition
    )
}

/// An index of a partitioned table itself, to which its partitions' indexes are attached.
pub fn create_index_only(at: &QualifiedName, index: &IndexDef) -> String {
    format!(
        "CREATE {}INDEX {} ON ONLY {}{}",
        if index.unique { "UNIQUE " } else { "" },
        quote(&index.name),
        at.quoted(),
        index.using
    )
}

/// Attaches a partition's index to its parent's.
pub fn attach_index(parent_index: &QualifiedName, child_index: &QualifiedName) -> String {
    format!(
        "ALTER INDEX {} ATTACH PARTITION {}",
        parent_index.quoted(),
        child_index.quoted()
    )
}

/// A check constraint the source holds `NOT VALID`: old rows may break it, so it cannot be
/// part of `CREATE TABLE` (COPY would reject them); it is added `NOT VALID` after the load,
/// like on the source.
pub fn is_not_valid(constraint: &ConstraintDef) -> bool {
    constraint.kind == 'c' && constraint.definition.ends_with(" NOT VALID")
}

/// Primary key, unique and exclusion constraints, built whole (the constraint builds its own
/// index); also `NOT VALID` checks, whose definition says so.
pub fn add_key(at: &QualifiedName, constraint: &ConstraintDef) -> String {
    format!(
        "ALTER TABLE {} ADD CONSTRAINT {} {}",
        at.quoted(),
        quote(&constraint.name),
        constraint.definition
    )
}

/// The unique index behind a primary key or unique constraint, built on its own so several
/// indexes of one table can be built at once; [`attach_key`] turns it into the constraint.
/// `None` for constraints that must be built whole (exclusion, checks).
pub fn key_index(at: &QualifiedName, constraint: &ConstraintDef) -> Option<String> {
    let using = constraint.index_using.as_ref()?;
    matches!(constraint.kind, 'p' | 'u').then(|| {
        format!(
            "CREATE UNIQUE INDEX {} ON {}{using}",
            quote(&constraint.name),
            at.quoted()
        )
    })
}

/// Makes a primary key or unique constraint of the index [`key_index`] built (a catalog
/// change, no scan), or builds the constraint whole when it has no separate index.
pub fn attach_key(at: &QualifiedName, constraint: &ConstraintDef) -> String {
    if key_index(at, constraint).is_none() {
        return add_key(at, constraint);
    }
    let mut sql = format!(
        "ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}",
        at.quoted(),
        quote(&constraint.name),
        if constraint.kind == 'p' {
            "PRIMARY KEY"
        } else {
            "UNIQUE"
        },
        quote(&constraint.name)
    );
    if constraint.deferrable {
        sql.push_str(" DEFERRABLE");
        if constraint.initially_deferred {
            sql.push_str(" INITIALLY DEFERRED");
        }
    }
    sql
}

/// A plain index.
pub fn create_index(at: &QualifiedName, index: &IndexDef) -> String {
    format!(
        "CREATE {}INDEX {} ON {}{}",
        if index.unique { "UNIQUE " } else { "" },
        quote(&index.name),
        at.quoted(),
        index.using
    )
}

fn fk_action(code: char) -> &'static str {
    match code {
        'r' => "RESTRICT",
        'c' => "CASCADE",
        'n' => "SET NULL",
        'd' => "SET DEFAULT",
        _ => "NO ACTION",
    }
}

/// A foreign key from `at` to `referenced_at`.
pub fn add_foreign_key(
    at: &QualifiedName,
    fk: &ForeignKeyDef,
    referenced_at: &QualifiedName,
) -> String {
    let cols = |c: &[String]| c.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ");
    let mut sql = format!(
        "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({})",
        at.quoted(),
        quote(&fk.name),
        cols(&fk.columns),
        referenced_at.quoted(),
        cols(&fk.referenced_columns)
    );
    if fk.match_full {
        sql.push_str(" MATCH FULL");
    }
    sql.push_str(&format!(
        " ON UPDATE {} ON DELETE {}",
        fk_action(fk.on_update),
        fk_action(fk.on_delete)
    ));
    if fk.deferrable {
        sql.push_str(" DEFERRABLE");
        if fk.initially_deferred {
            sql.push_str(" INITIALLY DEFERRED");
        }
    }
    if !fk.validated {
        sql.push_str(" NOT VALID");
    }
    sql
}

/// `ALTER TABLE ... ADD COLUMN` for a column the mirror lacks.
pub fn add_column(at: &QualifiedName, column: &ColumnDef) -> String {
    format!(
        "ALTER TABLE {} ADD COLUMN {}",
        at.quoted(),
        column_sql(column)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::catalog::Identity;

    fn seq(name: &str) -> SequenceDef {
        SequenceDef {
            name: QualifiedName::new("public", name),
            data_type: "bigint".into(),
            start: 1,
            increment: 1,
            min: 1,
            max: i64::MAX,
            cache: 1,
            cycle: false,
            last_value: Some(42),
            owned_by: None,
        }
    }

    fn col(name: &str, type_sql: &str) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            type_sql: type_sql.into(),
            type_oid: 0,
            element_type_oid: 0,
            not_null: false,
            default: None,
            collation: None,
            identity: None,
            generated: None,
        }
    }

    #[test]
    fn enum_and_domain_types() {
        let e = TypeDef::Enum {
            name: QualifiedName::new("public", "order status"),
            labels: vec!["new".into(), "it's done".into()],
        };
        assert_eq!(
            create_type(&e).unwrap(),
            "CREATE TYPE \"public\".\"order status\" AS ENUM ('new', 'it''s done')"
        );
        let d = TypeDef::Domain {
            name: QualifiedName::new("public", "price"),
            base_type: "numeric(10,2)".into(),
            not_null: true,
            default: Some("0".into()),
            collation: None,
            checks: vec![(
                "price_check".into(),
                "CHECK ((VALUE >= (0)::numeric))".into(),
            )],
        };
        assert_eq!(
            create_type(&d).unwrap(),
            "CREATE DOMAIN \"public\".\"price\" AS numeric(10,2) DEFAULT 0 NOT NULL CONSTRAINT \"price_check\" CHECK ((VALUE >= (0)::numeric))"
        );
    }

    #[test]
    fn enum_labels_are_added_in_source_order() {
        let name = QualifiedName::new("public", "s");
        let src: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let mirror: Vec<String> = ["b", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            add_enum_labels(&name, &src, &mirror),
            vec![
                "ALTER TYPE \"public\".\"s\" ADD VALUE IF NOT EXISTS 'a' BEFORE 'b'",
                "ALTER TYPE \"public\".\"s\" ADD VALUE IF NOT EXISTS 'c' AFTER 'b'",
            ]
        );
        assert!(add_enum_labels(&name, &src, &src).is_empty());
    }

    #[test]
    fn table_with_identity_generated_default_collation_and_check() {
        let mut id = col("id", "bigint");
        id.not_null = true;
        id.identity = Some(Identity {
            always: true,
            sequence: seq("Order Items_id_seq"),
        });
        let mut total = col("total", "numeric(12,2)");
        total.default = Some("0".into());
        let mut doubled = col("doubled", "numeric");
        doubled.generated = Some("(total * (2)::numeric)".into());
        let mut name = col("select", "text");
        name.collation = Some("pg_catalog.\"C\"".into());
        let def = TableDef {
            oid: 1,
            name: QualifiedName::new("public", "Order Items"),
            columns: vec![id, total, doubled, name],
            constraints: vec![
                ConstraintDef {
                    name: "total_check".into(),
                    kind: 'c',
                    definition: "CHECK ((total >= (0)::numeric)) NOT VALID".into(),
                    index_using: None,
                    deferrable: false,
                    initially_deferred: false,
                    attached_to: None,
                },
                ConstraintDef {
                    name: "Order Items_pkey".into(),
                    kind: 'p',
                    definition: "PRIMARY KEY (id)".into(),
                    index_using: Some(" USING btree (id)".into()),
                    deferrable: false,
                    initially_deferred: false,
                    attached_to: None,
                },
            ],
            foreign_keys: vec![],
            indexes: vec![],
            estimated_rows: 0,
            estimated_bytes: 0,
            partitioned: false,
            partition_key: None,
            partitions: Vec::new(),
            replica_identity: None,
        };
        let at = QualifiedName::new("bite_sync_stage_7_0", "Order Items");
        assert_eq!(
            create_table(&def, &at),
            "CREATE TABLE \"bite_sync_stage_7_0\".\"Order Items\" (\n    \
             \"id\" bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME \"Order Items_id_seq\" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1 NO CYCLE) NOT NULL,\n    \
             \"total\" numeric(12,2) DEFAULT 0,\n    \
             \"doubled\" numeric GENERATED ALWAYS AS ((total * (2)::numeric)) STORED,\n    \
             \"select\" text COLLATE pg_catalog.\"C\"\n)"
        );
        assert_eq!(
            add_key(&at, &def.constraints[1]),
            "ALTER TABLE \"bite_sync_stage_7_0\".\"Order Items\" ADD CONSTRAINT \"Order Items_pkey\" PRIMARY KEY (id)"
        );
        assert_eq!(
            key_index(&at, &def.constraints[1]).unwrap(),
            "CREATE UNIQUE INDEX \"Order Items_pkey\" ON \"bite_sync_stage_7_0\".\"Order Items\" USING btree (id)"
        );
        assert_eq!(
            attach_key(&at, &def.constraints[1]),
            "ALTER TABLE \"bite_sync_stage_7_0\".\"Order Items\" ADD CONSTRAINT \"Order Items_pkey\" PRIMARY KEY USING INDEX \"Order Items_pkey\""
        );
        let deferred = ConstraintDef {
            kind: 'u',
            deferrable: true,
            initially_deferred: true,
            ..def.constraints[1].clone()
        };
        assert!(
            attach_key(&at, &deferred)
                .ends_with("UNIQUE USING INDEX \"Order Items_pkey\" DEFERRABLE INITIALLY DEFERRED")
        );
        let exclusion = ConstraintDef {
            kind: 'x',
            definition: "EXCLUDE USING gist (r WITH &&)".into(),
            index_using: None,
            ..def.constraints[1].clone()
        };
        assert_eq!(key_index(&at, &exclusion), None);
        assert!(attach_key(&at, &exclusion).ends_with("EXCLUDE USING gist (r WITH &&)"));
    }

    #[test]
    fn foreign_keys_indexes_and_sequences() {
        let fk = ForeignKeyDef {
            name: "fk".into(),
            columns: vec!["order_id".into(), "line".into()],
            referenced: QualifiedName::new("public", "orders"),
            referenced_columns: vec!["id".into(), "line".into()],
            on_update: 'a',
            on_delete: 'c',
            match_full: true,
            deferrable: true,
            initially_deferred: true,
            validated: true,
        };
        let at = QualifiedName::new("s", "items");
        assert_eq!(
            add_foreign_key(&at, &fk, &QualifiedName::new("s", "orders")),
            "ALTER TABLE \"s\".\"items\" ADD CONSTRAINT \"fk\" FOREIGN KEY (\"order_id\", \"line\") REFERENCES \"s\".\"orders\" (\"id\", \"line\") MATCH FULL ON UPDATE NO ACTION ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED"
        );
        let idx = IndexDef {
            name: "items_created".into(),
            using: " USING btree (created_at DESC)".into(),
            unique: false,
            attached_to: None,
        };
        assert_eq!(
            create_index(&at, &idx),
            "CREATE INDEX \"items_created\" ON \"s\".\"items\" USING btree (created_at DESC)"
        );
        let s = seq("orders_id_seq");
        assert_eq!(
            create_sequence(&s),
            "CREATE SEQUENCE IF NOT EXISTS \"public\".\"orders_id_seq\" AS bigint INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1 NO CYCLE"
        );
        assert_eq!(
            set_sequence(&s.name, &s),
            "SELECT pg_catalog.setval('\"public\".\"orders_id_seq\"', 42, true)"
        );
        let fresh = SequenceDef {
            last_value: None,
            ..s.clone()
        };
        assert_eq!(
            set_sequence(&s.name, &fresh),
            "SELECT pg_catalog.setval('\"public\".\"orders_id_seq\"', 1, false)"
        );
    }
}
