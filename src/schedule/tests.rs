//! [`next_fire`] and [`missed`] in real time zones, around DST changes.

use chrono::{NaiveDate, TimeDelta, TimeZone, Timelike};
use chrono_tz::Tz;
use proptest::prelude::*;

use super::*;

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
}

fn job(cron: &str, tz: &str) -> Job {
    Job::new(
        "j",
        cron,
        tz.parse().unwrap(),
        JobKind::Prune { from: None },
    )
    .unwrap()
}

/// Fire times in `[from, to)`.
fn fires_between(job: &Job, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut at = from - TimeDelta::seconds(1);
    while let Some(next) = next_fire(job, at)
        && next < to
    {
        out.push(next);
        at = next;
    }
    out
}

fn local(t: DateTime<Utc>, tz: &str) -> String {
    let tz: Tz = tz.parse().unwrap();
    t.with_timezone(&tz).format("%m-%d %H:%M %Z").to_string()
}

/// The fire times in `[from, to)` of `cron` in `tz`, shown in `tz` (`03-08 03:00 EDT`).
fn local_fires(cron: &str, tz: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<String> {
    fires_between(&job(cron, tz), from, to)
        .iter()
        .map(|t| local(*t, tz))
        .collect()
}

#[test]
fn next_fire_is_strictly_after() {
    let j = job("0 3 * * *", "UTC");
    assert_eq!(
        next_fire(&j, utc(2026, 3, 1, 2, 59)),
        Some(utc(2026, 3, 1, 3, 0))
    );
    assert_eq!(
        next_fire(&j, utc(2026, 3, 1, 3, 0)),
        Some(utc(2026, 3, 2, 3, 0))
    );
    let mid_second = utc(2026, 3, 1, 3, 0) - TimeDelta::milliseconds(1);
    assert_eq!(next_fire(&j, mid_second), Some(utc(2026, 3, 1, 3, 0)));
}

#[test]
fn the_expression_is_read_in_the_jobs_time_zone() {
    // 03:00 in Mexico City (UTC-6, no DST since 2022) is 09:00 UTC.
    let j = job("0 3 * * *", "America/Mexico_City");
    assert_eq!(
        next_fire(&j, utc(2026, 7, 1, 12, 0)),
        Some(utc(2026, 7, 2, 9, 0))
    );
}

#[test]
fn spring_forward_a_daily_time_in_the_gap_fires_once_right_after_the_jump() {
    // 8 March 2026, New York: 02:00 EST becomes 03:00 EDT.
    let j = job("30 2 * * *", "America/New_York");
    let fires = fires_between(&j, utc(2026, 3, 7, 0, 0), utc(2026, 3, 10, 0, 0));
    let shown: Vec<String> = fires
        .iter()
        .map(|t| local(*t, "America/New_York"))
        .collect();
    assert_eq!(
        shown,
        ["03-07 02:30 EST", "03-08 03:00 EDT", "03-09 02:30 EDT"]
    );
    assert_eq!(fires[1], utc(2026, 3, 8, 7, 0));

    // 29 March 2026, Madrid: 02:00 CET becomes 03:00 CEST.
    let shown = local_fires(
        "30 2 * * *",
        "Europe/Madrid",
        utc(2026, 3, 28, 0, 0),
        utc(2026, 3, 31, 0, 0),
    );
    assert_eq!(
        shown,
        ["03-28 02:30 CET", "03-29 03:00 CEST", "03-30 02:30 CEST"]
    );
}

#[test]
fn spring_forward_a_list_of_hours_keeps_its_time_in_the_gap_too() {
    // Croner alone counts `2,14` as an interval and would drop the 02:30 run on 8 March.
    let shown = local_fires(
        "30 2,14 * * *",
        "America/New_York",
        utc(2026, 3, 8, 0, 0),
        utc(2026, 3, 9, 0, 0),
    );
    assert_eq!(shown, ["03-08 03:00 EDT", "03-08 14:30 EDT"]);
}

#[test]
fn spring_forward_times_landing_on_one_instant_fire_once() {
    // 02:00 and 02:30 both move to 03:00; 03:00 itself is also scheduled.
    let shown = local_fires(
        "0,30 2,3 * * *",
        "America/New_York",
        utc(2026, 3, 8, 5, 0),
        utc(2026, 3, 8, 9, 0),
    );
    assert_eq!(shown, ["03-08 03:00 EDT", "03-08 03:30 EDT"]);
}

#[test]
fn spring_forward_a_wildcard_schedule_skips_the_missing_hour() {
    // As in cron: `*/15 2` has no 02:xx on the day 02:xx does not exist.
    let shown = local_fires(
        "*/15 2 * * *",
        "America/New_York",
        utc(2026, 3, 8, 0, 0),
        utc(2026, 3, 9, 12, 0),
    );
    assert_eq!(
        shown,
        [
            "03-09 02:00 EDT",
            "03-09 02:15 EDT",
            "03-09 02:30 EDT",
            "03-09 02:45 EDT"
        ]
    );
}

#[test]
fn fall_back_a_daily_time_in_the_repeated_hour_fires_exactly_once() {
    // 1 November 2026, New York: 01:00-02:00 happens twice (EDT, then EST).
    let j = job("30 1 * * *", "America/New_York");
    let fires = fires_between(&j, utc(2026, 10, 31, 0, 0), utc(2026, 11, 3, 0, 0));
    let shown: Vec<String> = fires
        .iter()
        .map(|t| local(*t, "America/New_York"))
        .collect();
    assert_eq!(
        shown,
        ["10-31 01:30 EDT", "11-01 01:30 EDT", "11-02 01:30 EST"]
    );
    // Asked from inside the second 01:00-02:00 (01:10 EST, before the second 01:30), the next
    // fire is tomorrow's: the day's 01:30 already happened.
    assert_eq!(
        next_fire(&j, utc(2026, 11, 1, 6, 10)),
        Some(utc(2026, 11, 2, 6, 30))
    );
    // Madrid, 25 October 2026: 02:00-03:00 twice.
    let shown = local_fires(
        "30 2 * * *",
        "Europe/Madrid",
        utc(2026, 10, 24, 0, 0),
        utc(2026, 10, 27, 0, 0),
    );
    assert_eq!(
        shown,
        ["10-24 02:30 CEST", "10-25 02:30 CEST", "10-26 02:30 CET"]
    );
}

#[test]
fn fall_back_a_wildcard_schedule_keeps_its_real_interval() {
    let j = job("*/30 * * * *", "America/New_York");
    let fires = fires_between(&j, utc(2026, 11, 1, 4, 0), utc(2026, 11, 1, 7, 1));
    let shown: Vec<String> = fires
        .iter()
        .map(|t| local(*t, "America/New_York"))
        .collect();
    assert_eq!(
        shown,
        [
            "11-01 00:00 EDT",
            "11-01 00:30 EDT",
            "11-01 01:00 EDT",
            "11-01 01:30 EDT",
            "11-01 01:00 EST",
            "11-01 01:30 EST",
            "11-01 02:00 EST"
        ]
    );
    for pair in fires.windows(2) {
        assert_eq!(pair[1] - pair[0], TimeDelta::minutes(30));
    }
}

#[test]
fn every_six_hours_fires_at_local_0_6_12_18_across_both_changes() {
    for (tz, spring, fall) in [
        ("America/New_York", (3, 8), (11, 1)),
        ("Europe/Madrid", (3, 29), (10, 25)),
    ] {
        let j = job("0 */6 * * *", tz);
        let zone: Tz = tz.parse().unwrap();
        for (month, day) in [spring, fall] {
            let change = NaiveDate::from_ymd_opt(2026, month, day).unwrap();
            // The day before, the day of the change (23 or 25 hours long) and the day after.
            let days = [
                change.pred_opt().unwrap(),
                change,
                change.succ_opt().unwrap(),
            ];
            let midnight = |d: NaiveDate| {
                zone.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap())
                    .unwrap()
                    .to_utc()
            };
            let end = midnight(days[2].succ_opt().unwrap());
            let fires = fires_between(&j, midnight(days[0]), end);
            let local: Vec<(NaiveDate, u32)> = fires
                .iter()
                .map(|t| {
                    let l = t.with_timezone(&zone);
                    (l.date_naive(), l.hour())
                })
                .collect();
            let expected: Vec<(NaiveDate, u32)> = days
                .iter()
                .flat_map(|d| [0, 6, 12, 18].map(|h| (*d, h)))
                .collect();
            assert_eq!(local, expected, "{tz} around {change}");
            assert!(fires.iter().all(|t| t.minute() == 0));
        }
    }
}

#[test]
fn a_daily_job_fires_exactly_once_on_every_local_day_of_the_year() {
    // Including the days with a gap or a repeated hour, in zones that change at 02:00, at 01:00
    // (London), at midnight (Santiago) and by 30 minutes (Lord Howe).
    for tz in [
        "America/New_York",
        "Europe/London",
        "America/Santiago",
        "Australia/Lord_Howe",
    ] {
        let zone: Tz = tz.parse().unwrap();
        for time in ["0 0", "30 1", "15 2"] {
            let j = job(&format!("{time} * * *"), tz);
            let start = zone.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap().to_utc()
                - TimeDelta::seconds(1);
            let end = zone.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap().to_utc()
                - TimeDelta::seconds(1);
            let fires = fires_between(&j, start, end);
            let days: Vec<NaiveDate> = fires
                .iter()
                .map(|t| t.with_timezone(&zone).date_naive())
                .collect();
            let all: Vec<NaiveDate> = NaiveDate::from_ymd_opt(2026, 1, 1)
                .unwrap()
                .iter_days()
                .take(365)
                .collect();
            assert_eq!(days, all, "{tz} at {time}");
        }
    }
}

#[test]
fn missed_means_a_fire_time_in_the_last_run_to_now_interval() {
    let j = job("0 * * * *", "UTC");
    let now = utc(2026, 3, 1, 10, 20);
    assert!(
        !missed(&j, None, now),
        "no history: wait for the next fire time"
    );
    assert!(missed(&j, Some(utc(2026, 3, 1, 9, 0)), now), "10:00 passed");
    assert!(missed(&j, Some(utc(2026, 3, 1, 1, 0)), now));
    assert!(
        !missed(&j, Some(utc(2026, 3, 1, 10, 0)), now),
        "10:00 is the last run"
    );
    assert!(!missed(&j, Some(utc(2026, 3, 1, 10, 5)), now));
    assert!(
        missed(&j, Some(utc(2026, 3, 1, 9, 30)), utc(2026, 3, 1, 10, 0)),
        "a fire time at now counts"
    );
    assert!(
        !missed(&j, Some(utc(2026, 3, 1, 11, 0)), now),
        "a last run in the future (clock went back)"
    );
}

/// Patterns for which croner's own time-zone search follows the same rules (its fixed-time
/// class is single-value minute and hour, which cron also counts as fixed).
const ORACLE_PATTERNS: [&str; 10] = [
    "30 2 * * *",
    "0 0 * * *",
    "15 1 * * *",
    "45 23 * * 5",
    "0 0 1 * *",
    "0 */6 * * *",
    "*/30 * * * *",
    "0 * * * *",
    "*/7 1 * * *",
    "* 2 * * *",
];

const ORACLE_ZONES: [&str; 6] = [
    "America/New_York",
    "Europe/Madrid",
    "America/Santiago",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/Mexico_City",
];

/// The instants in `year` at which `tz`'s UTC offset changes.
fn transitions(tz: Tz, year: i32) -> Vec<i64> {
    use chrono::Offset as _;
    let offset = |t: i64| {
        let at = DateTime::from_timestamp(t, 0).unwrap().naive_utc();
        tz.offset_from_utc_datetime(&at).fix().local_minus_utc()
    };
    let start = utc(year, 1, 1, 0, 0).timestamp();
    let mut found = Vec::new();
    for day in 0..366 {
        let (mut lo, mut hi) = (start + day * 86_400, start + (day + 1) * 86_400);
        if offset(lo) == offset(hi) {
            continue;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if offset(mid) == offset(lo) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        found.push(hi);
    }
    found
}

proptest! {
    // Enough cases that each pattern meets each zone's gap and repeated hour several times.
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn next_fire_agrees_with_croners_own_time_zone_search(
        pattern in 0..ORACLE_PATTERNS.len(),
        zone in 0..ORACLE_ZONES.len(),
        year in 2024..2029i32,
        which in 0..2usize,
        // Within 30 hours of a DST change, to the second, where the rules matter.
        offset in -30 * 3600..30 * 3600i64,
    ) {
        use std::str::FromStr as _;
        let text = ORACLE_PATTERNS[pattern];
        let tz: Tz = ORACLE_ZONES[zone].parse().unwrap();
        let changes = transitions(tz, year);
        // A zone without DST: anywhere in the year.
        let base = changes
            .get(which)
            .copied()
            .unwrap_or(utc(year, 6, 1, 0, 0).timestamp());
        let j = Job::new("j", text, tz, JobKind::Prune { from: None }).unwrap();
        let after = DateTime::from_timestamp(base + offset, 0).unwrap();
        let theirs = croner::Cron::from_str(text)
            .unwrap()
            .find_next_occurrence(&after.with_timezone(&tz), false)
            .unwrap()
            .to_utc();
        prop_assert_eq!(next_fire(&j, after), Some(theirs), "{} in {} after {}", text, tz, after);
    }
}

#[test]
fn transitions_are_found() {
    let ny: Tz = "America/New_York".parse().unwrap();
    assert_eq!(
        transitions(ny, 2026),
        [
            utc(2026, 3, 8, 7, 0).timestamp(),
            utc(2026, 11, 1, 6, 0).timestamp()
        ]
    );
}
