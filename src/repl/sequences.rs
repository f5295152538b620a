//! Keeping the mirror's sequences at or above the source's.
//!
//! Logical replication does not carry sequences. Rows arrive with their ids, but a mirror
//! promoted after an outage would hand out ids the source already used. So every few seconds,
//! and at shutdown, the sequences owned by replicated tables (serial and identity columns) are
//! read on the source and any mirror sequence behind is moved up to the source's value (never
//! down: `max(id)` is not used, the sequence's own value is).

use tokio_postgres::Client;

use crate::pg::ident::{QualifiedName, literal};

/// One source sequence value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceValue {
    /// The sequence (same name on both sides).
    pub name: QualifiedName,
    /// Its last value on the source.
    pub value: i64,
}

/// Reads the values of the sequences owned by `tables` on the source (sequences never used
/// yet are left out).
pub async fn read(
    source: &Client,
    tables: &[QualifiedName],
) -> Result<Vec<SequenceValue>, tokio_postgres::Error> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let (schemas, names) = QualifiedName::split(tables);
    let rows = source
        .query(
            "SELECT s.schemaname::text, s.sequencename::text, s.last_value \
             FROM unnest($1::text[], $2::text[]) AS t(schema, name) \
             JOIN pg_catalog.pg_namespace tn ON tn.nspname = t.schema \
             JOIN pg_catalog.pg_class tc ON tc.relnamespace = tn.oid AND tc.relname = t.name \
             JOIN pg_catalog.pg_depend d ON d.refobjid = tc.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                  AND d.classid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i') \
             JOIN pg_catalog.pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S' \
             JOIN pg_catalog.pg_namespace sn ON sn.oid = sc.relnamespace \
             JOIN pg_catalog.pg_sequences s ON s.schemaname = sn.nspname AND s.sequencename = sc.relname \
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

/// Reads the source's values and moves the mirror's up; returns how many were read.
pub async fn catch_up(
    source: &Client,
    mirror: &Client,
    tables: &[QualifiedName],
) -> Result<usize, tokio_postgres::Error> {
    let values = read(source, tables).await?;
    if let Some(sql) = catch_up_sql(&values) {
        mirror.batch_execute(&sql).await?;
    }
    Ok(values.len())
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
}
