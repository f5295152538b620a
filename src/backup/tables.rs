//! Which tables a backup holds: every table of the database that has rows of its own, and the
//! partitioned tables above them.
//!
//! A whole-database backup holds every table pg_dump's schema creates, whatever it is: plain,
//! unlogged, inheritance children, zero-column, and each partition of a partitioned table
//! (sub-partitions included). As pg_dump does, the rows of a partitioned table are stored per
//! leaf partition (a partitioned table has no storage of its own), so large partitions are cut
//! into chunks like any table and load straight into their partition. Tables that belong to an
//! extension are left to `CREATE EXTENSION`, except its configuration tables
//! (`pg_extension_config_dump`), whose rows are kept with the extension's filter, as pg_dump
//! keeps them.
//!
//! `--tables` names top-level tables; a partitioned one brings its whole partition tree.

use tokio_postgres::Client;

use crate::pg::ident::{QualifiedName, TablePattern};
use crate::sync::catalog::{self, TableEntry};
use crate::sync::plan::{self, PlanError};

/// One table of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTable {
    /// Schema and name.
    pub name: QualifiedName,
    /// `r`: it holds rows; `p`: partitioned (its rows are its partitions').
    pub kind: char,
    /// The partitioned table it is a partition of.
    pub parent: Option<QualifiedName>,
    /// For an extension's configuration table, the filter pg_dump applies to its rows (`WHERE
    /// ...`, or empty for all of them).
    pub extension_filter: Option<String>,
}

/// What a backup covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Tables with rows, in name order: each gets data objects.
    pub data: Vec<SourceTable>,
    /// Partitioned tables, each after the one it is a partition of.
    pub partitioned: Vec<SourceTable>,
}

impl Selection {
    /// The top-level partitioned table `table` belongs to (itself when it is one), if any.
    pub fn root_of(&self, table: &QualifiedName) -> Option<QualifiedName> {
        let all: Vec<SourceTable> = self.data.iter().chain(&self.partitioned).cloned().collect();
        let top = top_of(&all, table);
        (top != table || self.partitioned.iter().any(|p| &p.name == table)).then(|| top.clone())
    }
}

/// The top of `table`'s partition tree: its root, or itself when it is no partition.
fn top_of<'a>(all: &'a [SourceTable], table: &'a QualifiedName) -> &'a QualifiedName {
    let mut at = table;
    // Bounded by the table count: a catalog never has a cycle, but a loop must not hang.
    for _ in 0..=all.len() {
        match all
            .iter()
            .find(|t| &t.name == at)
            .and_then(|t| t.parent.as_ref())
        {
            Some(up) => at = up,
            None => break,
        }
    }
    at
}

/// Every table of the source in user schemas (not bite-sync's own, which pg_dump is told to
/// leave out too), with the partition tree.
pub async fn list(client: &Client) -> Result<Vec<SourceTable>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname, c.relkind::text, pn.nspname, p.relname, \
                    (SELECT coalesce(x.extcondition[array_position(x.extconfig, c.oid)], '') \
                       FROM pg_catalog.pg_extension x \
                      WHERE c.oid = ANY (x.extconfig)) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_inherits i ON c.relispartition AND i.inhrelid = c.oid \
             LEFT JOIN pg_catalog.pg_class p ON p.oid = i.inhparent \
             LEFT JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace \
             WHERE c.relkind IN ('r', 'p') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
               AND NOT starts_with(n.nspname, 'bite_sync') \
               AND (NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                                 WHERE d.classid = 'pg_catalog.pg_class'::regclass \
                                   AND d.objid = c.oid AND d.deptype = 'e') \
                    OR EXISTS (SELECT 1 FROM pg_catalog.pg_extension x WHERE c.oid = ANY (x.extconfig))) \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SourceTable {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            kind: r.get::<_, String>(2).chars().next().unwrap_or('r'),
            parent: r
                .get::<_, Option<String>>(3)
                .zip(r.get::<_, Option<String>>(4))
                .map(|(s, n)| QualifiedName::new(s, n)),
            extension_filter: r.get(5),
        })
        .collect())
}

/// The tables `patterns` name (none: every table), resolved like `sync` resolves them, each
/// partitioned table with its whole partition tree. Partitions are not named on their own.
pub fn select(
    all: &[SourceTable],
    search_path: &[String],
    patterns: &[TablePattern],
) -> Result<Selection, PlanError> {
    let chosen: Vec<&SourceTable> = if patterns.is_empty() {
        all.iter().collect()
    } else {
        // The kind does not matter for a backup: a partitioned table is backed up whole.
        let top: Vec<TableEntry> = all
            .iter()
            .filter(|t| t.parent.is_none())
            .map(|t| TableEntry {
                name: t.name.clone(),
                kind: 'r',
                root: None,
            })
            .collect();
        let named = plan::resolve(&top, search_path, patterns, &[])?;
        all.iter()
            .filter(|t| {
                let root = top_of(all, &t.name);
                named.iter().any(|n| n.name == *root)
            })
            .collect()
    };
    let mut selection = Selection {
        data: chosen
            .iter()
            .filter(|t| t.kind != 'p')
            .map(|t| (*t).clone())
            .collect(),
        partitioned: Vec::new(),
    };
    // Parents first: by depth in the tree, then by name.
    let depth = |t: &SourceTable| {
        let mut d = 0;
        let mut at = t.parent.as_ref();
        while let Some(p) = at.filter(|_| d <= all.len()) {
            d += 1;
            at = all
                .iter()
                .find(|x| &x.name == p)
                .and_then(|x| x.parent.as_ref());
        }
        d
    };
    let mut partitioned: Vec<(usize, SourceTable)> = chosen
        .iter()
        .filter(|t| t.kind == 'p')
        .map(|t| (depth(t), (*t).clone()))
        .collect();
    partitioned.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.name.cmp(&b.1.name)));
    selection.partitioned = partitioned.into_iter().map(|(_, t)| t).collect();
    Ok(selection)
}

/// The search path `--tables` names are looked up in.
pub async fn search_path(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    catalog::search_path(client).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::ident::parse_pattern_list;

    fn table(name: &str, kind: char, parent: Option<&str>) -> SourceTable {
        SourceTable {
            name: QualifiedName::new("public", name),
            kind,
            parent: parent.map(|p| QualifiedName::new("public", p)),
            extension_filter: None,
        }
    }

    fn sample() -> Vec<SourceTable> {
        vec![
            table("guests", 'r', None),
            table("orders", 'p', None),
            table("orders_web", 'p', Some("orders")),
            table("orders_web_2026", 'r', Some("orders_web")),
            table("orders_counter", 'r', Some("orders")),
            table("marker", 'r', None),
        ]
    }

    fn names(tables: &[SourceTable]) -> Vec<&str> {
        tables.iter().map(|t| t.name.name.as_str()).collect()
    }

    #[test]
    fn the_whole_database_is_every_table_with_partitions_as_data() {
        let s = select(&sample(), &["public".into()], &[]).unwrap();
        assert_eq!(
            names(&s.data),
            ["guests", "orders_web_2026", "orders_counter", "marker"]
        );
        assert_eq!(names(&s.partitioned), ["orders", "orders_web"]);
        assert_eq!(
            s.root_of(&QualifiedName::new("public", "orders_web_2026")),
            Some(QualifiedName::new("public", "orders"))
        );
        assert_eq!(s.root_of(&QualifiedName::new("public", "guests")), None);
    }

    #[test]
    fn naming_a_partitioned_table_brings_its_whole_tree() {
        let patterns = parse_pattern_list("orders,marker").unwrap();
        let s = select(&sample(), &["public".into()], &patterns).unwrap();
        assert_eq!(
            names(&s.data),
            ["orders_web_2026", "orders_counter", "marker"]
        );
        assert_eq!(names(&s.partitioned), ["orders", "orders_web"]);
        let patterns = parse_pattern_list("guests").unwrap();
        let s = select(&sample(), &["public".into()], &patterns).unwrap();
        assert_eq!(names(&s.data), ["guests"]);
        assert!(s.partitioned.is_empty());
    }
}
