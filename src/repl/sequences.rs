//! Keeping the mirror's sequences at or above the source's.
//!
//! Logical replication does not carry sequences. Rows arrive with their ids, but a mirror
//! promoted after an outage would hand out ids the source already used. So the daemon moves
//! every sequence the replicated tables use up to the source's value: after the first copy,
//! every few seconds while streaming (with the next batch when one is on its way), and at
//! shutdown; never down (`max(id)` is not used, the sequence's own value is).
//!
//! "Every sequence the tables use" is found the way a sync finds what a table needs
//! ([`crate::sync::depends`]): each sequence a column default draws from, directly
//! (`serial`, `nextval('guest_id_seq')`) or through a function it calls, whether or not it is
//! `OWNED BY` a column, and each identity column's sequence.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::pg::ident::{QualifiedName, literal};
use crate::sync::{catalog, depends};

/// One source sequence value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceValue {
    /// The sequence (same name on both sides).
    pub name: QualifiedName,
    /// Its last value on the source.
    pub value: i64,
}

/// Every sequence the tables `tables` (partitions included) use; see the module docs.
/// `search_path` is the source's usual one (names in function bodies are resolved with it).
pub async fn used_by(
    source: &Client,
    tables: &[QualifiedName],
    search_path: &[String],
) -> Result<Vec<QualifiedName>, tokio_postgres::Error> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let cat = catalog::read_tables(source, tables).await?;
    let oids: Vec<u32> = cat
        .tables
        .values()
        .flat_map(|t| t.tree().map(|d| d.oid))
        .collect();
    let mut out: BTreeSet<QualifiedName> = depends::read(source, &oids, search_path)
        .await?
        .into_iter()
        .filter_map(|n| match n {
            depends::Need::Sequence(s) => Some(s.name),
            _ => None,
        })
        .collect();
    for def in cat.tables.values().flat_map(|t| t.tree()) {
        for column in &def.columns {
            if let Some(identity) = &column.identity {
                out.insert(identity.sequence.name.clone());
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Where `sequences` stand on a database (sequences never used, or missing, are left out).
pub async fn read(
    client: &Client,
    sequences: &[QualifiedName],
) -> Result<Vec<SequenceValue>, tokio_postgres::Error> {
    if sequences.is_empty() {
        return Ok(Vec::new());
    }
    let (schemas, names) = QualifiedName::split(sequences);
    let rows = client
        .query(
            "SELECT s.schemaname::text, s.sequencename::text, s.last_value \
             FROM unnest($1::text[], $2::text[]) AS want(schema, name) \
             JOIN pg_catalog.pg_sequences s ON s.schemaname = want.schema AND s.sequencename = want.name \
             WHERE s.last_value IS NOT NULL \
             ORDER BY 1, 2",
            &[&schemas, &names],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SequenceValue {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            value: r.get(2),
        })
        .collect())
}

/// One statement that moves every mirror sequence that is behind up to the source's value;
/// `None` when there are none.
pub fn catch_up_sql(values: &[SequenceValue]) -> Option<String> {
    if values.is_empty() {
        return None;
    }
    let rows: Vec<String> = values
        .iter()
        .map(|v| {
            format!(
                "({}, {}, {}::bigint)",
                literal(&v.name.schema),
                literal(&v.name.name),
                v.value
            )
        })
        .collect();
    Some(format!(
        "SELECT pg_catalog.setval(pg_catalog.format('%I.%I', s.schemaname, s.sequencename)::regclass, v.value) \
         FROM (VALUES {}) AS v(schema, name, value) \
         JOIN pg_catalog.pg_sequences s ON s.schemaname = v.schema AND s.sequencename = v.name \
         WHERE s.last_value IS NULL OR s.last_value < v.value",
        rows.join(", ")
    ))
}

/// Reads the source's values of `sequences` and moves the mirror's up; returns how many were
/// read.
pub async fn catch_up(
    source: &Client,
    mirror: &Client,
    sequences: &[QualifiedName],
) -> Result<usize, tokio_postgres::Error> {
    let values = read(source, sequences).await?;
    if let Some(sql) = catch_up_sql(&values) {
        mirror.batch_execute(&sql).await?;
    }
    Ok(values.len())
}

/// How the mirror's sequences stand against the source's, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SequenceStatus {
    /// Sequences the replicated tables use.
    pub total: usize,
    /// Those at or above the source's value on the mirror.
    pub in_step: usize,
    /// The others: `name (mirror N, source M)`.
    pub behind: Vec<String>,
}

/// Compares the sequences' positions on both sides (pure): a sequence is in step when the
/// mirror's value is at or above the source's, or the source never used it.
pub fn compare(
    sequences: &[QualifiedName],
    source: &[SequenceValue],
    mirror: &[SequenceValue],
) -> SequenceStatus {
    let mut behind = Vec::new();
    for name in sequences {
        let Some(s) = source.iter().find(|v| &v.name == name) else {
            continue;
        };
        match mirror.iter().find(|v| &v.name == name) {
            Some(m) if m.value >= s.value => {}
            Some(m) => behind.push(format!("{name} (mirror {}, source {})", m.value, s.value)),
            None => behind.push(format!(
                "{name} (mirror unused or missing, source {})",
                s.value
            )),
        }
    }
    SequenceStatus {
        total: sequences.len(),
        in_step: sequences.len() - behind.len(),
        behind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_do_is_no_statement() {
        assert_eq!(catch_up_sql(&[]), None);
    }

    #[test]
    fn names_are_literals_and_values_numbers() {
        let sql = catch_up_sql(&[SequenceValue {
            name: QualifiedName::new("public", "it's_seq"),
            value: 42,
        }])
        .unwrap();
        assert!(sql.contains("('public', 'it''s_seq', 42::bigint)"), "{sql}");
        assert!(
            sql.contains("s.last_value < v.value"),
            "never moves a sequence down: {sql}"
        );
    }

    #[test]
    fn in_step_means_at_or_above_the_source() {
        let n = |s: &str| QualifiedName::new("public", s);
        let v = |s: &str, value| SequenceValue { name: n(s), value };
        let names = [n("a"), n("b"), n("c"), n("never")];
        let status = compare(
            &names,
            &[v("a", 10), v("b", 10), v("c", 3)],
            &[v("a", 10), v("b", 9)],
        );
        assert_eq!(status.total, 4);
        assert_eq!(status.in_step, 2);
        assert_eq!(
            status.behind,
            [
                "b (mirror 9, source 10)",
                "c (mirror unused or missing, source 3)"
            ]
        );
    }
}
