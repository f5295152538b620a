//! Rendering a [`SyncReport`] for people (the `--json` form is its serde serialization).

use std::fmt::Write;

use indicatif::HumanBytes;

use super::{SyncReport, TableAction};

/// The human-readable summary printed after a sync or a dry run.
pub fn render(report: &SyncReport) -> String {
    let mut out = String::new();
    if report.dry_run {
        let _ = writeln!(out, "Plan (dry run, nothing changed):");
        if report.initialized_mirror {
            let _ = writeln!(
                out,
                "  the mirror has no bite_sync bookkeeping yet: the real run needs --init"
            );
        }
        if !report.prepare.is_empty() {
            let _ = writeln!(out, "\n  prepare the mirror:");
            for s in &report.prepare {
                let _ = writeln!(out, "    {s};");
            }
        }
        for (i, t) in report.tables.iter().enumerate() {
            let _ = writeln!(out, "\n  {}. {} ({})", i + 1, t.table, describe(&t.action));
            for s in &t.ddl {
                for line in s.lines() {
                    let _ = writeln!(out, "    {line}");
                }
            }
        }
        let _ = writeln!(
            out,
            "\n  then swap all {} table(s) in, in one transaction",
            report.tables.len()
        );
    } else {
        let width = report
            .tables
            .iter()
            .map(|t| t.table.chars().count())
            .max()
            .unwrap_or(5)
            .max(5);
        for t in &report.tables {
            let _ = writeln!(
                out,
                "  {:<width$}  {:<22}  {:>12} rows  {:>10}  {:>6.1}s",
                t.table,
                describe(&t.action),
                group(t.rows),
                HumanBytes(t.bytes).to_string(),
                t.duration_ms as f64 / 1000.0,
            );
        }
        let _ = writeln!(
            out,
            "synced {} table(s): {} rows, {} in {:.1}s{}",
            report.tables.len(),
            group(report.rows),
            HumanBytes(report.bytes),
            report.duration_ms as f64 / 1000.0,
            report
                .run_id
                .map(|id| format!(" (run {id})"))
                .unwrap_or_default()
        );
    }
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

fn describe(action: &TableAction) -> String {
    match action {
        TableAction::Create => "new table".into(),
        TableAction::Replace { added_columns } if added_columns.is_empty() => "replaced".into(),
        TableAction::Replace { added_columns } => {
            format!("replaced, +{} column(s)", added_columns.len())
        }
        TableAction::AddColumns { columns } if columns.is_empty() => "unchanged".into(),
        TableAction::AddColumns { columns } => format!("add {}", columns.join(", ")),
    }
}

/// 1234567 → "1,234,567".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_digits() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }
}
