//! Deciding what a sync does: which tables, in which order, and what happens to each.
//!
//! Pure functions over catalog structs, so every decision is unit-tested without a server:
//! - [`resolve`] turns `--tables` / `--exclude` patterns into table names, suggesting near
//!   names for typos;
//! - [`fk_order`] orders tables so referenced tables come before the tables that point at them;
//! - [`compare`] decides, per table, whether the mirror's table is created, replaced or
//!   extended, and refuses changes that would lose data or cannot be applied.

use std::collections::{BTreeMap, BTreeSet};

use crate::pg::ident::{QualifiedName, TablePattern};

use super::catalog::{TableDef, TableEntry};

/// What parts of the tables a sync copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Schema and data (the default).
    #[default]
    Full,
    /// Create missing tables and add missing columns; copy no rows.
    SchemaOnly,
    /// Copy rows into tables that already exist on the mirror with the source's columns.
    DataOnly,
}

impl Mode {
    /// The name used in `--json` and the run records.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::SchemaOnly => "schema-only",
            Mode::DataOnly => "data-only",
        }
    }
}

/// Why a sync cannot go ahead as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A `--tables` / `--exclude` entry matches no table.
    #[error("no table {pattern} on the source{}", suggestion_text(.suggestions))]
    UnknownTable {
        /// What the user typed, normalized.
        pattern: String,
        /// Near names, best first.
        suggestions: Vec<String>,
    },
    /// `schema.*` names a schema with no tables.
    #[error("no tables in schema {schema} on the source{}", suggestion_text(.suggestions))]
    UnknownSchema {
        /// The schema.
        schema: String,
        /// Near schema names.
        suggestions: Vec<String>,
    },
    /// Everything was excluded, or the source has no tables.
    #[error("no tables to sync: the selection is empty")]
    NothingSelected,
    /// A partition named on its own: its partitioned table is what is synced.
    #[error(
        "{partition} is a partition of {root}: partitions are synced and replicated with their partitioned table, as one table; name {root} instead (every partition comes with it)"
    )]
    Partition {
        /// The partition, as typed.
        partition: QualifiedName,
        /// The partitioned table at the top of its tree.
        root: QualifiedName,
    },
    /// Same column, different type.
    #[error(
        "column {column} of {table} is {source_type} on the source but {mirror_type} on the mirror: change it on the mirror (ALTER TABLE ... ALTER COLUMN ... TYPE) or drop the mirror table, then sync again"
    )]
    IncompatibleColumn {
        /// The table.
        table: QualifiedName,
        /// The column.
        column: String,
        /// Its type on the source.
        source_type: String,
        /// Its type on the mirror.
        mirror_type: String,
    },
    /// A column only the mirror has would be lost.
    #[error(
        "column {column} of {table} exists on the mirror but not on the source, and a sync would drop it: drop it on the mirror or add it on the source"
    )]
    ExtraMirrorColumn {
        /// The table.
        table: QualifiedName,
        /// The column.
        column: String,
    },
    /// `--data-only` into a table the mirror lacks.
    #[error("table {0} does not exist on the mirror: run without --data-only to create it")]
    MissingOnMirror(QualifiedName),
    /// `--data-only` into a table that lacks columns.
    #[error("table {table} on the mirror lacks column(s) {}: run without --data-only to add them", .columns.join(", "))]
    MissingColumns {
        /// The table.
        table: QualifiedName,
        /// The missing columns.
        columns: Vec<String>,
    },
}

impl PlanError {
    /// Whether the mistake is in what the user asked for (exit code 2) rather than in the
    /// databases' state (exit code 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            PlanError::UnknownTable { .. }
                | PlanError::UnknownSchema { .. }
                | PlanError::NothingSelected
                | PlanError::Partition { .. }
        )
    }
}

fn suggestion_text(suggestions: &[String]) -> String {
    match suggestions {
        [] => String::new(),
        [one] => format!("; did you mean {one}?"),
        many => format!("; did you mean one of: {}?", many.join(", ")),
    }
}

/// Turns patterns into the sorted list of tables they select. No `include` patterns means every
/// user table. Unqualified names are looked up along `search_path`, then in any schema where
/// the name is unique. A partitioned table stands for its whole tree: its partitions are never
/// selected on their own (a schema pattern leaves them out, a name is refused naming the
/// partitioned table).
pub fn resolve(
    all: &[TableEntry],
    search_path: &[String],
    include: &[TablePattern],
    exclude: &[TablePattern],
) -> Result<Vec<TableEntry>, PlanError> {
    let mut selected: BTreeSet<&TableEntry> = BTreeSet::new();
    if include.is_empty() {
        selected.extend(all.iter().filter(|e| e.root.is_none()));
    }
    for pattern in include {
        selected.extend(matching(all, search_path, pattern)?);
    }
    for pattern in exclude {
        for entry in matching(all, search_path, pattern)? {
            selected.remove(entry);
        }
    }
    if selected.is_empty() {
        return Err(PlanError::NothingSelected);
    }
    Ok(selected.into_iter().cloned().collect())
}

fn matching<'a>(
    all: &'a [TableEntry],
    search_path: &[String],
    pattern: &TablePattern,
) -> Result<Vec<&'a TableEntry>, PlanError> {
    let found = matching_any(all, search_path, pattern)?;
    if let TablePattern::Table { .. } = pattern
        && let [entry] = found.as_slice()
        && let Some(root) = &entry.root
    {
        return Err(PlanError::Partition {
            partition: entry.name.clone(),
            root: root.clone(),
        });
    }
    Ok(found.into_iter().filter(|e| e.root.is_none()).collect())
}

fn matching_any<'a>(
    all: &'a [TableEntry],
    search_path: &[String],
    pattern: &TablePattern,
) -> Result<Vec<&'a TableEntry>, PlanError> {
    match pattern {
        TablePattern::Schema(schema) => {
            let found: Vec<_> = all
                .iter()
                .filter(|e| &e.name.schema == schema && e.root.is_none())
                .collect();
            if found.is_empty() {
                let schemas: BTreeSet<&str> = all.iter().map(|e| e.name.schema.as_str()).collect();
                return Err(PlanError::UnknownSchema {
                    schema: schema.clone(),
                    suggestions: near(schema, schemas.into_iter().map(str::to_string)),
                });
            }
            Ok(found)
        }
        TablePattern::Table {
            schema: Some(schema),
            name,
        } => match all
            .iter()
            .find(|e| &e.name.schema == schema && &e.name.name == name)
        {
            Some(e) => Ok(vec![e]),
            None => Err(unknown(all, pattern)),
        },
        TablePattern::Table { schema: None, name } => {
            for schema in search_path {
                if let Some(e) = all
                    .iter()
                    .find(|e| &e.name.schema == schema && &e.name.name == name)
                {
                    return Ok(vec![e]);
                }
            }
            let elsewhere: Vec<_> = all.iter().filter(|e| &e.name.name == name).collect();
            match elsewhere.as_slice() {
                [one] => Ok(vec![*one]),
                [] => Err(unknown(all, pattern)),
                many => Err(PlanError::UnknownTable {
                    pattern: pattern.to_string(),
                    suggestions: many.iter().map(|e| qualified_display(&e.name)).collect(),
                }),
            }
        }
    }
}

fn unknown(all: &[TableEntry], pattern: &TablePattern) -> PlanError {
    PlanError::UnknownTable {
        pattern: pattern.to_string(),
        suggestions: near(
            &pattern.to_string(),
            all.iter()
                .filter(|e| e.root.is_none())
                .map(|e| e.name.to_string()),
        ),
    }
}

fn qualified_display(name: &QualifiedName) -> String {
    if name.schema == "public" {
        format!("public.{name}")
    } else {
        name.to_string()
    }
}

/// Up to three candidates close to `typed` (edit distance, ignoring case and quotes).
fn near(typed: &str, candidates: impl Iterator<Item = String>) -> Vec<String> {
    let key = |s: &str| s.to_lowercase().replace('"', "");
    let typed_key = key(typed);
    let limit = (typed_key.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, String)> = candidates
        .map(|c| (strsim::levenshtein(&typed_key, &key(&c)), c))
        .filter(|(d, _)| *d <= limit)
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, c)| c).collect()
}

/// Orders tables so that a table comes after every table it references (foreign keys among
/// the given tables only). Cycles are broken deterministically; the sync adds foreign keys
/// after all data is loaded, so the order matters for scheduling and for humans, not for
/// correctness.
pub fn fk_order(tables: &BTreeMap<QualifiedName, TableDef>) -> Vec<QualifiedName> {
    let mut remaining: BTreeMap<&QualifiedName, BTreeSet<&QualifiedName>> = tables
        .iter()
        .map(|(name, def)| {
            let parents = def
                .foreign_keys
                .iter()
                .map(|fk| &fk.referenced)
                .filter(|p| *p != name && tables.contains_key(*p))
                .collect();
            (name, parents)
        })
        .collect();
    let mut order = Vec::with_capacity(tables.len());
    while !remaining.is_empty() {
        let ready: Vec<&QualifiedName> = remaining
            .iter()
            .filter(|(_, parents)| parents.is_empty())
            .map(|(name, _)| *name)
            .collect();
        // A cycle: take the first remaining table by name.
        let next = if ready.is_empty() {
            vec![*remaining.keys().next().expect("non-empty")]
        } else {
            ready
        };
        for name in next {
            remaining.remove(name);
            for parents in remaining.values_mut() {
                parents.remove(name);
            }
            order.push(name.clone());
        }
    }
    order
}

/// What a sync does to one mirror table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum TableAction {
    /// The mirror has no such table: create it (and fill it unless schema-only).
    Create,
    /// Build a new copy beside the old one and swap it in; `added_columns` are columns the
    /// mirror's table lacked.
    Replace {
        /// Columns new to the mirror.
        added_columns: Vec<String>,
    },
    /// Schema-only on an existing table: add the columns it lacks (possibly none).
    AddColumns {
        /// Columns to add.
        columns: Vec<String>,
    },
}

impl TableAction {
    /// The name used in `--json` and the run records.
    pub fn as_str(&self) -> &'static str {
        match self {
            TableAction::Create => "create",
            TableAction::Replace { .. } => "replace",
            TableAction::AddColumns { .. } => "add-columns",
        }
    }
}

/// Decides what happens to one table, refusing differences that cannot be applied safely.
pub fn compare(
    source: &TableDef,
    mirror: Option<&TableDef>,
    mode: Mode,
) -> Result<TableAction, PlanError> {
    let Some(mirror) = mirror else {
        return match mode {
            Mode::DataOnly => Err(PlanError::MissingOnMirror(source.name.clone())),
            Mode::Full | Mode::SchemaOnly => Ok(TableAction::Create),
        };
    };
    let mut missing = Vec::new();
    for column in &source.columns {
        match mirror.columns.iter().find(|c| c.name == column.name) {
            None => missing.push(column.name.clone()),
            Some(m) if m.type_sql != column.type_sql => {
                return Err(PlanError::IncompatibleColumn {
                    table: source.name.clone(),
                    column: column.name.clone(),
                    source_type: column.type_sql.clone(),
                    mirror_type: m.type_sql.clone(),
                });
            }
            Some(_) => {}
        }
    }
    if mode != Mode::SchemaOnly {
        if let Some(extra) = mirror
            .columns
            .iter()
            .find(|m| !source.columns.iter().any(|c| c.name == m.name))
        {
            return Err(PlanError::ExtraMirrorColumn {
                table: source.name.clone(),
                column: extra.name.clone(),
            });
        }
    }
    match mode {
        Mode::Full => Ok(TableAction::Replace {
            added_columns: missing,
        }),
        Mode::SchemaOnly => Ok(TableAction::AddColumns { columns: missing }),
        Mode::DataOnly if missing.is_empty() => Ok(TableAction::Replace {
            added_columns: Vec::new(),
        }),
        Mode::DataOnly => Err(PlanError::MissingColumns {
            table: source.name.clone(),
            columns: missing,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::ident::parse_pattern_list;
    use crate::sync::catalog::{ColumnDef, ForeignKeyDef};

    fn entry(schema: &str, name: &str) -> TableEntry {
        TableEntry {
            name: QualifiedName::new(schema, name),
            kind: 'r',
            root: None,
        }
    }

    fn sample() -> Vec<TableEntry> {
        vec![
            entry("public", "customers"),
            entry("public", "orders"),
            entry("public", "order_items"),
            entry("public", "Order Items"),
            entry("sales", "orders"),
            entry("sales", "invoices"),
            entry("archive", "select"),
        ]
    }

    fn names(entries: Vec<TableEntry>) -> Vec<String> {
        entries.into_iter().map(|e| e.name.to_string()).collect()
    }

    fn path() -> Vec<String> {
        vec!["public".into()]
    }

    #[test]
    fn resolves_plain_qualified_quoted_and_schema_patterns() {
        let include = parse_pattern_list("customers, sales.*, \"Order Items\", select").unwrap();
        let got = names(resolve(&sample(), &path(), &include, &[]).unwrap());
        assert_eq!(
            got,
            vec![
                "archive.select",
                "\"Order Items\"",
                "customers",
                "sales.invoices",
                "sales.orders"
            ]
        );
    }

    #[test]
    fn search_path_wins_for_unqualified_names() {
        let include = parse_pattern_list("orders").unwrap();
        let got = names(resolve(&sample(), &path(), &include, &[]).unwrap());
        assert_eq!(got, vec!["orders"]);
    }

    #[test]
    fn exclude_removes_and_empty_include_means_all() {
        let exclude = parse_pattern_list("sales.*,archive.select").unwrap();
        let got = names(resolve(&sample(), &path(), &[], &exclude).unwrap());
        assert_eq!(
            got,
            vec!["\"Order Items\"", "customers", "order_items", "orders"]
        );
        let everything = parse_pattern_list("public.*, sales.*, archive.*").unwrap();
        assert_eq!(
            resolve(&sample(), &path(), &[], &everything),
            Err(PlanError::NothingSelected)
        );
    }

    #[test]
    fn a_partitioned_table_stands_for_its_partitions() {
        let payments = QualifiedName::new("public", "payments");
        let mut all = sample();
        all.push(TableEntry {
            name: payments.clone(),
            kind: 'p',
            root: None,
        });
        for month in ["payments_2026_10", "payments_2026_11"] {
            all.push(TableEntry {
                name: QualifiedName::new("public", month),
                kind: 'r',
                root: Some(payments.clone()),
            });
        }
        let got =
            names(resolve(&all, &path(), &parse_pattern_list("public.*").unwrap(), &[]).unwrap());
        assert!(got.contains(&"payments".to_string()), "{got:?}");
        assert!(!got.iter().any(|n| n.starts_with("payments_")), "{got:?}");
        assert!(
            !names(resolve(&all, &path(), &[], &[]).unwrap())
                .iter()
                .any(|n| n.starts_with("payments_"))
        );
        let err = resolve(
            &all,
            &path(),
            &parse_pattern_list("payments_2026_11").unwrap(),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "payments_2026_11 is a partition of payments: partitions are synced and replicated with their partitioned table, as one table; name payments instead (every partition comes with it)"
        );
        assert!(err.is_usage());
        assert!(matches!(
            resolve(
                &all,
                &path(),
                &[],
                &parse_pattern_list("payments_2026_10").unwrap()
            ),
            Err(PlanError::Partition { .. })
        ));
    }

    #[test]
    fn typos_get_suggestions() {
        let include = parse_pattern_list("custmers").unwrap();
        let err = resolve(&sample(), &path(), &include, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no table custmers on the source; did you mean customers?"
        );
        assert!(err.is_usage());
        let err = resolve(
            &sample(),
            &path(),
            &parse_pattern_list("sale.*").unwrap(),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("did you mean sales?"), "{err}");
        let err = resolve(
            &sample(),
            &path(),
            &parse_pattern_list("zzzzzzzzzz").unwrap(),
            &[],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no table zzzzzzzzzz on the source");
    }

    fn column(name: &str, type_sql: &str) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            type_sql: type_sql.into(),
            type_oid: 25,
            element_type_oid: 0,
            not_null: false,
            default: None,
            collation: None,
            identity: None,
            generated: None,
        }
    }

    fn table(name: &str, columns: Vec<ColumnDef>, refs: &[&str]) -> TableDef {
        TableDef {
            oid: 1,
            name: QualifiedName::new("public", name),
            columns,
            constraints: vec![],
            foreign_keys: refs
                .iter()
                .map(|r| ForeignKeyDef {
                    name: format!("{name}_{r}_fkey"),
                    columns: vec!["x".into()],
                    referenced: QualifiedName::new("public", *r),
                    referenced_columns: vec!["id".into()],
                    on_update: 'a',
                    on_delete: 'a',
                    match_full: false,
                    deferrable: false,
                    initially_deferred: false,
                    validated: true,
                })
                .collect(),
            indexes: vec![],
            estimated_rows: 0,
            estimated_bytes: 0,
            partitioned: false,
            partition_key: None,
            partitions: Vec::new(),
            replica_identity: None,
        }
    }

    #[test]
    fn parents_come_before_children_and_cycles_terminate() {
        let mut tables = BTreeMap::new();
        for t in [
            table("order_items", vec![], &["orders", "menu_items"]),
            table("orders", vec![], &["customers"]),
            table("customers", vec![], &["customers"]),
            table("menu_items", vec![], &["not_synced"]),
        ] {
            tables.insert(t.name.clone(), t);
        }
        let order: Vec<String> = fk_order(&tables).iter().map(|n| n.to_string()).collect();
        let pos = |n: &str| order.iter().position(|o| o == n).unwrap();
        assert!(pos("customers") < pos("orders"));
        assert!(pos("orders") < pos("order_items"));
        assert!(pos("menu_items") < pos("order_items"));

        let mut cycle = BTreeMap::new();
        for t in [table("a", vec![], &["b"]), table("b", vec![], &["a"])] {
            cycle.insert(t.name.clone(), t);
        }
        assert_eq!(fk_order(&cycle).len(), 2);
    }

    #[test]
    fn compare_creates_replaces_extends_and_refuses() {
        let src = table(
            "orders",
            vec![column("id", "bigint"), column("notes", "text")],
            &[],
        );
        assert_eq!(compare(&src, None, Mode::Full), Ok(TableAction::Create));
        assert_eq!(
            compare(&src, None, Mode::DataOnly),
            Err(PlanError::MissingOnMirror(src.name.clone()))
        );

        let older = table("orders", vec![column("id", "bigint")], &[]);
        assert_eq!(
            compare(&src, Some(&older), Mode::Full),
            Ok(TableAction::Replace {
                added_columns: vec!["notes".into()]
            })
        );
        assert_eq!(
            compare(&src, Some(&older), Mode::SchemaOnly),
            Ok(TableAction::AddColumns {
                columns: vec!["notes".into()]
            })
        );
        assert!(matches!(
            compare(&src, Some(&older), Mode::DataOnly),
            Err(PlanError::MissingColumns { .. })
        ));

        let changed = table(
            "orders",
            vec![column("id", "integer"), column("notes", "text")],
            &[],
        );
        let err = compare(&src, Some(&changed), Mode::Full).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column id of orders is bigint on the source but integer on the mirror: change it on the mirror (ALTER TABLE ... ALTER COLUMN ... TYPE) or drop the mirror table, then sync again"
        );

        let wider = table(
            "orders",
            vec![
                column("id", "bigint"),
                column("notes", "text"),
                column("local_only", "text"),
            ],
            &[],
        );
        assert!(matches!(
            compare(&src, Some(&wider), Mode::Full),
            Err(PlanError::ExtraMirrorColumn { .. })
        ));
    }
}
