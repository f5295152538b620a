//! `bite-sync backups prune`: retention by keep-last, daily, weekly and monthly counts.
//!
//! The rule, as restic and borg apply it: backups are taken newest first; `keep_last` keeps
//! the newest N; `keep_daily` keeps the newest backup of each of the newest N days that have
//! one (days in UTC), and likewise weekly (ISO weeks) and monthly. A backup kept by any rule
//! stays. Folders without a manifest older than a day are deleted (a backup that died; a
//! younger one may still be running).
//!
//! Backups of different coverage do not stand in for each other: a backup of two tables is no
//! substitute for one of the whole database. So the policy is applied to each coverage on its
//! own (the whole database; each set of tables, whatever order they were named in), and the
//! newest good backup of each coverage always stays, whatever the policy: above all, the
//! newest whole-database backup is never deleted.
//!
//! A backup is deleted manifest first, so one interrupted half way is an incomplete folder,
//! never a backup that looks good and is not.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Duration, Utc};
use serde::Serialize;

use super::manifest::{MANIFEST, Scope, id_time};
use super::restore::{RestoreError, list};
use super::store::Store;

/// How many backups to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Retention {
    /// The newest N.
    pub keep_last: u32,
    /// The newest of each of the last N days with a backup.
    pub keep_daily: u32,
    /// The newest of each of the last N ISO weeks with a backup.
    pub keep_weekly: u32,
    /// The newest of each of the last N months with a backup.
    pub keep_monthly: u32,
}

impl Default for Retention {
    /// A day of 6-hourly backups, a week of dailies, a month of weeklies, half a year of
    /// monthlies.
    fn default() -> Retention {
        Retention {
            keep_last: 4,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 6,
        }
    }
}

/// What a backup covers, as retention groups backups.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Coverage {
    /// Every table of the database.
    Database,
    /// These tables (`schema.name`), in any order.
    Tables(BTreeSet<String>),
}

impl Coverage {
    /// The coverage of a manifest's scope.
    pub fn of(scope: &Scope) -> Coverage {
        match scope {
            Scope::Database => Coverage::Database,
            Scope::Tables(tables) => Coverage::Tables(tables.iter().cloned().collect()),
        }
    }

    /// For the reasons a backup is kept: `tables a, b` (nothing for the whole database).
    fn label(&self) -> Option<String> {
        match self {
            Coverage::Database => None,
            Coverage::Tables(t) => Some(format!(
                "tables {}",
                t.iter().cloned().collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

/// The period a backup falls in, for one rule (`2026-11-29`, `2026-W48`, `2026-11`).
type Bucket = fn(&DateTime<Utc>) -> String;

/// The backups a policy keeps, with why; `backups` are (id, time, coverage) of good backups.
/// Each coverage is counted on its own and keeps at least its newest backup.
pub fn kept(
    backups: &[(String, DateTime<Utc>, Coverage)],
    policy: &Retention,
) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<&Coverage, Vec<(String, DateTime<Utc>)>> = BTreeMap::new();
    for (id, time, coverage) in backups {
        groups
            .entry(coverage)
            .or_default()
            .push((id.clone(), *time));
    }
    let mut reasons = BTreeMap::new();
    for (coverage, group) in groups {
        for (id, mut why) in kept_of_one_coverage(&group, policy) {
            if let Some(label) = coverage.label() {
                why.insert(0, label);
            }
            reasons.insert(id, why);
        }
    }
    reasons
}

/// [`kept`] for backups of one coverage.
fn kept_of_one_coverage(
    backups: &[(String, DateTime<Utc>)],
    policy: &Retention,
) -> BTreeMap<String, Vec<String>> {
    let mut newest_first: Vec<&(String, DateTime<Utc>)> = backups.iter().collect();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut keep = |id: &str, why: String| reasons.entry(id.to_owned()).or_default().push(why);
    if let Some((id, _)) = newest_first.first() {
        keep(id, "newest".into());
    }
    for (id, _) in newest_first.iter().take(policy.keep_last as usize) {
        keep(id, "last".into());
    }
    let rules: [(&str, u32, Bucket); 3] = [
        ("daily", policy.keep_daily, |t| {
            t.format("%Y-%m-%d").to_string()
        }),
        ("weekly", policy.keep_weekly, |t| {
            let w = t.iso_week();
            format!("{}-W{:02}", w.year(), w.week())
        }),
        ("monthly", policy.keep_monthly, |t| {
            t.format("%Y-%m").to_string()
        }),
    ];
    for (rule, count, bucket) in rules {
        let mut seen = BTreeSet::new();
        for (id, time) in &newest_first {
            if seen.len() as u32 >= count {
                break;
            }
            let b = bucket(time);
            if seen.insert(b.clone()) {
                keep(id, format!("{rule} {b}"));
            }
        }
    }
    reasons
}

/// What a prune did (or would do, with `dry_run`).
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// The policy applied.
    pub policy: Retention,
    /// Nothing was deleted.
    pub dry_run: bool,
    /// Good backups kept, with the rules that keep them.
    pub kept: BTreeMap<String, Vec<String>>,
    /// Good backups deleted.
    pub deleted: Vec<String>,
    /// Incomplete folders (over a day old) deleted.
    pub incomplete_deleted: Vec<String>,
    /// Bytes freed.
    pub bytes_freed: u64,
}

impl PruneReport {
    /// `4 backups kept, 1 deleted, 0 incomplete deleted` (`would delete` for a dry run), for
    /// people: `1 backup kept`.
    pub fn counts(&self) -> String {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        let kept = self.kept.len();
        format!(
            "{kept} {} kept, {} {verb}, {} incomplete {verb}",
            if kept == 1 { "backup" } else { "backups" },
            self.deleted.len(),
            self.incomplete_deleted.len()
        )
    }
}

/// Applies `policy` to the store.
pub async fn prune(
    store: &Store,
    policy: &Retention,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<PruneReport, RestoreError> {
    let listed = list(store).await?;
    let good: Vec<(String, DateTime<Utc>, Coverage)> = listed
        .iter()
        .filter(|b| b.state == "good")
        .filter_map(|b| Some((b.id.clone(), id_time(&b.id)?, b.coverage.clone()?)))
        .collect();
    let keep = kept(&good, policy);
    let mut report = PruneReport {
        policy: *policy,
        dry_run,
        kept: keep.clone(),
        deleted: Vec::new(),
        incomplete_deleted: Vec::new(),
        bytes_freed: 0,
    };
    for b in &listed {
        let old_incomplete =
            b.state != "good" && id_time(&b.id).is_some_and(|t| now - t > Duration::hours(24));
        let drop_good = b.state == "good" && !keep.contains_key(&b.id);
        if !(old_incomplete || drop_good) {
            continue;
        }
        if !dry_run {
            delete_backup(store, &b.id).await?;
        }
        report.bytes_freed += b.bytes;
        if drop_good {
            report.deleted.push(b.id.clone());
        } else {
            report.incomplete_deleted.push(b.id.clone());
        }
    }
    Ok(report)
}

/// Deletes a backup's objects, its manifest first.
async fn delete_backup(store: &Store, id: &str) -> Result<(), RestoreError> {
    store.delete(&format!("{id}/{MANIFEST}")).await?;
    for object in store.list(&format!("{id}/")).await? {
        store.delete(&object.key).await?;
    }
    tracing::info!(backup = %id, "deleted by the retention policy");
    Ok(())
}

#[cfg(test)]
mod counts {
    use super::*;

    #[test]
    fn one_backup_is_singular() {
        let mut report = PruneReport {
            policy: Retention::default(),
            dry_run: false,
            kept: BTreeMap::from([("20261129T060000Z".to_string(), vec!["last".to_string()])]),
            deleted: vec!["20261128T060000Z".into()],
            incomplete_deleted: Vec::new(),
            bytes_freed: 0,
        };
        assert_eq!(
            report.counts(),
            "1 backup kept, 1 deleted, 0 incomplete deleted"
        );
        report.dry_run = true;
        report.kept.insert("20261129T120000Z".into(), Vec::new());
        assert_eq!(
            report.counts(),
            "2 backups kept, 1 would delete, 0 incomplete would delete"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    /// Every 6 hours for `days` days up to 2026-11-29T18:00Z, of the whole database.
    fn six_hourly(days: i64) -> Vec<(String, DateTime<Utc>, Coverage)> {
        let end = at("2026-11-29T18:00:00Z");
        (0..days * 4)
            .map(|i| {
                let t = end - Duration::hours(6 * i);
                (super::super::manifest::backup_id(t), t, Coverage::Database)
            })
            .collect()
    }

    fn tables(names: &[&str]) -> Coverage {
        Coverage::Tables(names.iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn each_coverage_is_counted_on_its_own() {
        // The only whole-database backup, then newer backups of two tables and of one.
        let backups = vec![
            (
                "20261101T000000Z".to_owned(),
                at("2026-11-01T00:00:00Z"),
                Coverage::Database,
            ),
            (
                "20261128T000000Z".to_owned(),
                at("2026-11-28T00:00:00Z"),
                tables(&["public.orders", "public.customers"]),
            ),
            (
                "20261129T000000Z".to_owned(),
                at("2026-11-29T00:00:00Z"),
                tables(&["public.customers", "public.orders"]),
            ),
            (
                "20261129T060000Z".to_owned(),
                at("2026-11-29T06:00:00Z"),
                tables(&["public.menu"]),
            ),
        ];
        let policy = Retention {
            keep_last: 1,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        };
        let k = kept(&backups, &policy);
        assert_eq!(
            ids(&k),
            ["20261101T000000Z", "20261129T000000Z", "20261129T060000Z"]
        );
        assert_eq!(k["20261101T000000Z"], ["newest", "last"]);
        assert_eq!(
            k["20261129T000000Z"],
            ["tables public.customers, public.orders", "newest", "last"]
        );
        // Even a policy that keeps nothing keeps the newest of each coverage.
        let nothing = Retention {
            keep_last: 0,
            ..policy
        };
        assert_eq!(ids(&kept(&backups, &nothing)), ids(&k));
    }

    fn ids(kept: &BTreeMap<String, Vec<String>>) -> Vec<&str> {
        kept.keys().map(String::as_str).collect()
    }

    #[test]
    fn keep_last_keeps_exactly_the_newest() {
        let backups = six_hourly(3);
        let policy = Retention {
            keep_last: 3,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        };
        assert_eq!(
            ids(&kept(&backups, &policy)),
            ["20261129T060000Z", "20261129T120000Z", "20261129T180000Z"]
        );
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let backups = six_hourly(5);
        let policy = Retention {
            keep_last: 0,
            keep_daily: 3,
            keep_weekly: 0,
            keep_monthly: 0,
        };
        assert_eq!(
            ids(&kept(&backups, &policy)),
            ["20261127T180000Z", "20261128T180000Z", "20261129T180000Z"]
        );
    }

    #[test]
    fn weekly_and_monthly_use_iso_weeks_and_months() {
        let backups = six_hourly(70);
        let policy = Retention {
            keep_last: 0,
            keep_daily: 0,
            keep_weekly: 2,
            keep_monthly: 3,
        };
        let k = kept(&backups, &policy);
        // 2026-11-29 is a Sunday: the newest of ISO week 48 is today's, of week 47 last Sunday's.
        assert!(k["20261129T180000Z"].contains(&"weekly 2026-W48".to_owned()));
        assert!(k["20261122T180000Z"].contains(&"weekly 2026-W47".to_owned()));
        // Months: November (today), October's last, September's last.
        assert!(k["20261031T180000Z"].contains(&"monthly 2026-10".to_owned()));
        assert!(k["20260930T180000Z"].contains(&"monthly 2026-09".to_owned()));
        assert_eq!(k.len(), 4, "{k:?}");
    }

    #[test]
    fn rules_add_up_and_the_newest_always_stays() {
        let backups = six_hourly(10);
        let k = kept(&backups, &Retention::default());
        // 4 last (today's), 7 dailies (one of them today's newest), the weekly of ISO week 47
        // (the 22nd); November's monthly is today's newest.
        assert!(k.contains_key("20261129T000000Z"));
        assert!(k.contains_key("20261123T180000Z"));
        assert!(!k.contains_key("20261123T120000Z"));
        assert!(k.contains_key("20261122T180000Z"));
        assert_eq!(k.len(), 4 + 6 + 1, "{k:?}");
        let nothing = Retention {
            keep_last: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
        };
        assert_eq!(ids(&kept(&backups, &nothing)), ["20261129T180000Z"]);
        assert!(kept(&[], &nothing).is_empty());
    }
}
