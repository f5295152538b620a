//! Cron expressions: the standard 5-field crontab, checked here, and the next fire time in a
//! job's time zone.
//!
//! # Syntax
//! `minute hour day-of-month month day-of-week`, as in `crontab(5)` (Vixie cron, cronie): `*`,
//! numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b-c`, month names `jan`-`dec`,
//! day names `sun`-`sat` (case-insensitive), day-of-week 0 and 7 both Sunday, and the shortcuts
//! `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`. There is
//! no seconds field. The parser is ours, not croner's, because croner accepts things cron does
//! not and reads them differently: a name anywhere in the text (`0 0 * mon *` is January), empty
//! list items (`, * * * *` never fires, after a minute-long search), `0 0 30 2 *` (the search
//! gives up after a long walk). Croner's extensions (`L`, `W`, `#`, `?`, `+`) are refused, so a
//! schedule means the same here as in any crontab. Only the checked, numeric form reaches croner.
//!
//! # Day of month and day of week
//! As in cron: when both fields are restricted a day matches if *either* does (`0 0 1,15 * mon`
//! is the 1st, the 15th and every Monday). A field that starts with `*` counts as unrestricted,
//! `*/2` included (cron's rule, kept for compatibility): `0 0 */2 * mon` is the odd-numbered days
//! that are Mondays.
//!
//! # Daylight saving time
//! Croner walks wall-clock times (carried as UTC, which has no DST); [`CronSchedule::next_after`]
//! maps each to real instants in the job's time zone with cron's rules, which split schedules
//! into *fixed-time* ones (neither minute nor hour starts with `*`: `30 2 * * *`,
//! `0 3,15 * * *`) and *wildcard* ones (`0 */6 * * *`, `*/15 * * * *`, `@hourly`):
//! - a wall time that does not exist (spring forward, `02:30` in New York): a fixed-time
//!   schedule fires once at the first instant after the gap (`03:00` local), so a daily job
//!   never loses a day; a wildcard schedule skips it, since its next slot is soon anyway.
//! - a wall time that happens twice (fall back, `01:30` in New York): a fixed-time schedule
//!   fires once, at the first; a wildcard schedule fires at both, keeping its real-time
//!   interval (`*/30` still fires every 30 minutes).
//! - several wall times that land on one instant fire once.
//!
//! Croner's own time-zone search has the same rules, but counts only single-value minutes and
//! hours as fixed-time: `30 2,14 * * *` would lose its 02:30 run on the spring-forward day.

use std::fmt;

use chrono::{DateTime, LocalResult, NaiveDateTime, Offset as _, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// One of the five fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// 0-59.
    Minute,
    /// 0-23.
    Hour,
    /// 1-31.
    DayOfMonth,
    /// 1-12 or `jan`-`dec`.
    Month,
    /// 0-7 (0 and 7 are Sunday) or `sun`-`sat`.
    DayOfWeek,
}

impl Field {
    const ALL: [Field; 5] = [
        Field::Minute,
        Field::Hour,
        Field::DayOfMonth,
        Field::Month,
        Field::DayOfWeek,
    ];

    /// The lowest and highest value written in the field.
    fn bounds(self) -> (u32, u32) {
        match self {
            Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            Field::DayOfWeek => (0, 7),
        }
    }

    fn names(self) -> &'static [&'static str] {
        match self {
            Field::Month => &MONTHS,
            Field::DayOfWeek => &DAYS,
            _ => &[],
        }
    }

    /// The value of `names()[0]`.
    fn first_named(self) -> u32 {
        match self {
            Field::Month => 1,
            _ => 0,
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        })
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Why a cron expression was refused. Messages are meant to follow `cron "<text>": `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// Nothing but spaces.
    #[error("is empty: expected 5 fields (minute hour day-of-month month day-of-week)")]
    Empty,
    /// Not five fields.
    #[error(
        "expected 5 fields (minute hour day-of-month month day-of-week), got {got}{}",
        if *got == 6 { ": schedules have no seconds field" } else { "" }
    )]
    FieldCount {
        /// How many there were.
        got: usize,
    },
    /// `@something` that is not a known shortcut.
    #[error(
        "unknown shortcut {0:?}: use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly"
    )]
    UnknownShortcut(String),
    /// `@reboot`.
    #[error("@reboot is not supported: a schedule names times of day, not start-up")]
    Reboot,
    /// One field is wrong.
    #[error("{field} {text:?}: {problem}")]
    Field {
        /// Which field.
        field: Field,
        /// The field as written.
        text: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Well-formed, but names no day that exists (`0 0 30 2 *`).
    #[error("never fires: {0}")]
    NeverFires(String),
    /// Croner refused the checked pattern (a bug in the checks here).
    #[error("not understood: {0}")]
    Unsupported(String),
}

/// A checked cron expression.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    text: String,
    cron: Cron,
    fixed_time: bool,
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Longer than any UTC offset change (the largest DST shift in use is 2 hours), and shorter
/// than the time between two changes in one zone: a window of ±SLACK around an instant holds
/// at most one change, so its offsets are those at its ends.
const SLACK: TimeDelta = TimeDelta::hours(3);

/// Wall-clock matches examined by one [`CronSchedule::next_after`] at most; a guard, never
/// reached by a schedule that fires (an every-minute one looks at three).
const MAX_STEPS: usize = 100_000;

/// The UTC offsets in effect within SLACK of `t`: (smallest, largest).
fn offsets_near(tz: Tz, t: DateTime<Utc>) -> (TimeDelta, TimeDelta) {
    let offset = |t: DateTime<Utc>| {
        TimeDelta::seconds(i64::from(
            tz.offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc(),
        ))
    };
    let all = [offset(t - SLACK), offset(t), offset(t + SLACK)];
    (
        all.into_iter().min().unwrap_or_default(),
        all.into_iter().max().unwrap_or_default(),
    )
}

impl CronSchedule {
    /// Parses and checks a 5-field expression or shortcut.
    pub fn parse(text: &str) -> Result<CronSchedule, CronError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(CronError::Empty);
        }
        let expanded = if trimmed.starts_with('@') {
            expand_shortcut(trimmed)?
        } else {
            trimmed
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError::FieldCount { got: parts.len() });
        }
        let mut fields = Vec::with_capacity(5);
        for (field, part) in Field::ALL.into_iter().zip(&parts) {
            fields.push(parse_field(field, part)?);
        }
        // cron: a day-of-month or day-of-week field starting with `*` is unrestricted, and then
        // the day must match both fields (one of which matches every day); otherwise either.
        let dom_star = parts[2].starts_with('*');
        let dow_star = parts[4].starts_with('*');
        let and_days = dom_star || dow_star;
        if and_days {
            check_days_exist(&fields[2], &fields[3])?;
        }
        let numeric: Vec<&str> = fields.iter().map(|f| f.numeric.as_str()).collect();
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .dom_and_dow(and_days)
            .build()
            .parse(&numeric.join(" "))
            .map_err(|e| CronError::Unsupported(e.to_string()))?;
        Ok(CronSchedule {
            text: trimmed.to_string(),
            cron,
            fixed_time: !parts[0].starts_with('*') && !parts[1].starts_with('*'),
        })
    }

    /// The expression as written (trimmed).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether cron treats it as fixed-time (neither minute nor hour starts with `*`), which
    /// decides what it does at DST changes (see the module documentation).
    pub fn is_fixed_time(&self) -> bool {
        self.fixed_time
    }

    /// The first fire time strictly after `after`, with wall-clock times read in `tz`. `None`
    /// only if there is none before the year 5000.
    pub fn next_after(&self, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Croner yields wall times in order, but near a DST change their instants are not: the
        // second pass of a repeated hour comes after a later wall time's first. So the walk
        // starts at the earliest wall time any offset near `after` could put after it, and
        // stops once no offset near the best instant found could put a wall time before it.
        let (low, _) = offsets_near(tz, after);
        let mut wall = after + low;
        let mut inclusive = true;
        let mut best: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
        for _ in 0..MAX_STEPS {
            // `DateTime<Utc>` carries wall times: UTC has no DST, so croner does no mapping.
            wall = self.cron.find_next_occurrence(&wall, inclusive).ok()?;
            inclusive = false;
            if let Some((_, last_wall)) = best
                && wall > last_wall
            {
                break;
            }
            for t in self.instants(tz, wall.naive_utc()).into_iter().flatten() {
                if t > after && best.is_none_or(|(b, _)| t < b) {
                    let (_, high) = offsets_near(tz, t);
                    best = Some((t, t + high));
                }
            }
        }
        best.map(|(t, _)| t)
    }

    /// The instants at which the wall time `wall` in `tz` fires (see the module documentation).
    fn instants(&self, tz: Tz, wall: NaiveDateTime) -> [Option<DateTime<Utc>>; 2] {
        match tz.from_local_datetime(&wall) {
            LocalResult::Single(t) => [Some(t.to_utc()), None],
            LocalResult::Ambiguous(first, _) if self.fixed_time => [Some(first.to_utc()), None],
            LocalResult::Ambiguous(first, second) => [Some(first.to_utc()), Some(second.to_utc())],
            LocalResult::None if self.fixed_time => [gap_end(tz, wall), None],
            LocalResult::None => [None, None],
        }
    }
}

/// The first instant whose wall-clock time in `tz` is at or past `wall`, a time inside a gap:
/// the moment the clocks jumped over it.
fn gap_end(tz: Tz, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
    // UTC offsets lie within ±15 h, so the answer lies within 15 h of `wall` read as UTC, and a
    // 30-hour window holds only this transition: the wall clock only moves forward in it.
    let reaches = |t: i64| {
        DateTime::from_timestamp(t, 0).is_some_and(|t| t.with_timezone(&tz).naive_local() >= wall)
    };
    let centre = wall.and_utc().timestamp();
    let (mut lo, mut hi) = (centre - 15 * 3600, centre + 15 * 3600);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if reaches(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::from_timestamp(hi, 0)
}

fn expand_shortcut(text: &str) -> Result<&'static str, CronError> {
    Ok(match text.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        "@reboot" => return Err(CronError::Reboot),
        _ => return Err(CronError::UnknownShortcut(text.to_string())),
    })
}

/// One field: the values it allows and its numeric form for croner.
struct ParsedField {
    /// Bit `v` set when value `v` is allowed (day-of-week 7 folded into 0).
    values: u64,
    numeric: String,
}

impl ParsedField {
    fn has(&self, value: u32) -> bool {
        self.values & (1 << value) != 0
    }
}

fn parse_field(field: Field, text: &str) -> Result<ParsedField, CronError> {
    let problem = |problem: String| CronError::Field {
        field,
        text: text.to_string(),
        problem,
    };
    if let Some(c) = text.chars().find(|c| matches!(c, '#' | '?' | '+')) {
        return Err(problem(extension(c)));
    }
    if let Some(c) = text
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !matches!(c, '*' | ',' | '-' | '/'))
    {
        return Err(problem(format!("unexpected character {c:?}")));
    }
    let (min, max) = field.bounds();
    let mut values = 0u64;
    let mut numeric = Vec::new();
    for item in text.split(',') {
        if item.is_empty() {
            return Err(problem(
                "empty list item (a comma at either end or two in a row)".into(),
            ));
        }
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let step = match step {
            None => 1,
            Some(s) => match s.parse::<u32>() {
                Ok(0) => return Err(problem(format!("step 0 in {item:?}: a step is at least 1"))),
                Ok(n) if n <= max - min => n,
                Ok(n) => {
                    return Err(problem(format!(
                        "step {n} in {item:?} is larger than the field's range {min}-{max}"
                    )));
                }
                Err(_) => {
                    return Err(problem(format!("step {s:?} in {item:?} is not a number")));
                }
            },
        };
        let (lo, hi, star) = if range == "*" {
            (min, max, true)
        } else if let Some((a, b)) = range.split_once('-') {
            let lo = value(field, a, false).map_err(&problem)?;
            let hi = value(field, b, true).map_err(&problem)?;
            if lo > hi {
                return Err(problem(format!(
                    "range {a}-{b} goes backwards: write the smaller value first"
                )));
            }
            (lo, hi, false)
        } else {
            let v = value(field, range, false).map_err(&problem)?;
            if item.contains('/') {
                return Err(problem(format!(
                    "{item:?} steps from a single value, which crontabs read differently: \
                     write */{step} or {range}-{max}/{step}"
                )));
            }
            (v, v, false)
        };
        let mut v = lo;
        while v <= hi {
            let folded = if field == Field::DayOfWeek && v == 7 {
                0
            } else {
                v
            };
            values |= 1 << folded;
            v += step;
        }
        numeric.push(match (star, step) {
            (true, 1) => "*".to_string(),
            (true, s) => format!("*/{s}"),
            (false, 1) if lo == hi => lo.to_string(),
            (false, 1) => format!("{lo}-{hi}"),
            (false, s) => format!("{lo}-{hi}/{s}"),
        });
    }
    Ok(ParsedField {
        values,
        numeric: numeric.join(","),
    })
}

/// One value: a number within the field's bounds, or a month or day name where allowed.
/// `range_end`: `sun` at the end of a range is 7 (`fri-sun`).
fn value(field: Field, token: &str, range_end: bool) -> Result<u32, String> {
    let (min, max) = field.bounds();
    if token.is_empty() {
        return Err("a range needs a value on both sides of '-'".into());
    }
    if token.bytes().all(|b| b.is_ascii_digit()) {
        return match token.parse::<u32>() {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(format!("{token} is out of range {min}-{max}")),
        };
    }
    let lower = token.to_ascii_lowercase();
    if let Some(i) = field.names().iter().position(|n| *n == lower) {
        let v = field.first_named() + i as u32;
        return Ok(if field == Field::DayOfWeek && v == 0 && range_end {
            7
        } else {
            v
        });
    }
    let names = |list: &[&str]| format!("{}-{}", list[0], list[list.len() - 1]);
    let upper = token.to_ascii_uppercase();
    let digits = upper.trim_end_matches(['L', 'W']);
    if matches!(field, Field::DayOfMonth | Field::DayOfWeek)
        && digits.len() < upper.len()
        && digits.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(extension(upper.chars().last().unwrap_or('L')));
    }
    Err(match field {
        Field::Month if DAYS.iter().any(|d| lower.starts_with(d)) => {
            format!(
                "{token:?} is a day name; months are {} or 1-12",
                names(&MONTHS)
            )
        }
        Field::DayOfWeek if MONTHS.iter().any(|m| lower.starts_with(m)) => {
            format!(
                "{token:?} is a month name; days are {} or 0-7",
                names(&DAYS)
            )
        }
        Field::Month | Field::DayOfWeek => {
            match field.names().iter().find(|n| lower.starts_with(*n)) {
                Some(short) => format!("{token:?}: write names with three letters ({short})"),
                None => format!(
                    "unknown name {token:?}: use {} or {min}-{max}",
                    field.names().join(", ")
                ),
            }
        }
        Field::Minute | Field::Hour | Field::DayOfMonth => {
            format!("{token:?} is not a number in {min}-{max}")
        }
    })
}

fn extension(c: char) -> String {
    format!("{c:?} is not crontab syntax (croner's L, W, #, ? and + extensions are not accepted)")
}

/// With day-of-month and day-of-week combined by AND, some allowed month must have some
/// allowed day (every date falls on every weekday sooner or later, 29 February included).
fn check_days_exist(days: &ParsedField, months: &ParsedField) -> Result<(), CronError> {
    const LONGEST: [u32; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let exists = (1..=12u32)
        .filter(|m| months.has(*m))
        .any(|m| (1..=LONGEST[m as usize - 1]).any(|d| days.has(d)));
    if exists {
        Ok(())
    } else {
        Err(CronError::NeverFires(format!(
            "day-of-month {} never falls in month {}",
            days.numeric, months.numeric
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match CronSchedule::parse(text) {
            Ok(_) => panic!("{text:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    /// The next `n` fire times in UTC from 2026-01-01 00:00 UTC.
    fn fires(text: &str, n: usize) -> Vec<String> {
        let schedule = CronSchedule::parse(text).unwrap();
        let mut at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        (0..n)
            .map(|_| {
                at = schedule.next_after(Tz::UTC, at).unwrap();
                at.format("%a %d %b %H:%M").to_string()
            })
            .collect()
    }

    #[test]
    fn field_counts_are_explained() {
        assert_eq!(
            err("0 */6 * *"),
            "expected 5 fields (minute hour day-of-month month day-of-week), got 4"
        );
        assert_eq!(
            err("0 0 */6 * * *"),
            "expected 5 fields (minute hour day-of-month month day-of-week), got 6: schedules have no seconds field"
        );
        assert!(err("   ").starts_with("is empty"));
    }

    #[test]
    fn each_field_problem_names_the_field() {
        let cases = [
            ("61 * * * *", "minute \"61\": 61 is out of range 0-59"),
            ("0 24 * * *", "hour \"24\": 24 is out of range 0-23"),
            ("0 0 0 * *", "day-of-month \"0\": 0 is out of range 1-31"),
            ("0 0 * 13 *", "month \"13\": 13 is out of range 1-12"),
            ("0 0 * * 8", "day-of-week \"8\": 8 is out of range 0-7"),
            (
                ", * * * *",
                "minute \",\": empty list item (a comma at either end or two in a row)",
            ),
            (
                "1,,2 * * * *",
                "minute \"1,,2\": empty list item (a comma at either end or two in a row)",
            ),
            (
                "0 5-1 * * *",
                "hour \"5-1\": range 5-1 goes backwards: write the smaller value first",
            ),
            (
                "*/0 * * * *",
                "minute \"*/0\": step 0 in \"*/0\": a step is at least 1",
            ),
            (
                "*/60 * * * *",
                "minute \"*/60\": step 60 in \"*/60\" is larger than the field's range 0-59",
            ),
            (
                "0/15 * * * *",
                "minute \"0/15\": \"0/15\" steps from a single value, which crontabs read differently: write */15 or 0-59/15",
            ),
            (
                "0 0 * mon *",
                "month \"mon\": \"mon\" is a day name; months are jan-dec or 1-12",
            ),
            (
                "0 0 * * jan",
                "day-of-week \"jan\": \"jan\" is a month name; days are sun-sat or 0-7",
            ),
            (
                "0 0 * * monday",
                "day-of-week \"monday\": \"monday\": write names with three letters (mon)",
            ),
            (
                "0 0 * * xyz",
                "day-of-week \"xyz\": unknown name \"xyz\": use sun, mon, tue, wed, thu, fri, sat or 0-7",
            ),
            (
                "mon 0 * * *",
                "minute \"mon\": \"mon\" is not a number in 0-59",
            ),
            (
                "0 0 1- * *",
                "day-of-month \"1-\": a range needs a value on both sides of '-'",
            ),
            (
                "0 0 * * 1.5",
                "day-of-week \"1.5\": unexpected character '.'",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(err(text), expected, "for {text:?}");
        }
    }

    #[test]
    fn croner_extensions_are_refused() {
        for text in [
            "0 0 L * *",
            "0 0 15W * *",
            "0 0 * * 5L",
            "0 0 * * 5#2",
            "0 0 ? * *",
            "0 0 1 * +1",
        ] {
            assert!(
                err(text).contains("is not crontab syntax"),
                "{text:?}: {}",
                err(text)
            );
        }
    }

    #[test]
    fn shortcuts() {
        assert_eq!(
            fires("@hourly", 2),
            ["Thu 01 Jan 01:00", "Thu 01 Jan 02:00"]
        );
        assert_eq!(fires("@daily", 2), ["Fri 02 Jan 00:00", "Sat 03 Jan 00:00"]);
        assert_eq!(fires("@midnight", 1), ["Fri 02 Jan 00:00"]);
        assert_eq!(
            fires("@weekly", 2),
            ["Sun 04 Jan 00:00", "Sun 11 Jan 00:00"]
        );
        assert_eq!(
            fires("@monthly", 2),
            ["Sun 01 Feb 00:00", "Sun 01 Mar 00:00"]
        );
        assert_eq!(fires("@YEARLY", 1), ["Fri 01 Jan 00:00"]);
        assert_eq!(fires("@annually", 1), fires("@yearly", 1));
        assert_eq!(
            err("@reboot"),
            "@reboot is not supported: a schedule names times of day, not start-up"
        );
        assert!(err("@fortnightly").starts_with("unknown shortcut \"@fortnightly\""));
        assert!(!CronSchedule::parse("@hourly").unwrap().is_fixed_time());
        assert!(CronSchedule::parse("@daily").unwrap().is_fixed_time());
    }

    #[test]
    fn names_ranges_steps_and_lists() {
        assert_eq!(
            fires("30 9 * jan-mar mon-fri", 3),
            ["Thu 01 Jan 09:30", "Fri 02 Jan 09:30", "Mon 05 Jan 09:30"]
        );
        assert_eq!(
            fires("0 8-18/5 * * *", 4),
            [
                "Thu 01 Jan 08:00",
                "Thu 01 Jan 13:00",
                "Thu 01 Jan 18:00",
                "Fri 02 Jan 08:00"
            ]
        );
        assert_eq!(
            fires("0,20,40 0 * * *", 3),
            ["Thu 01 Jan 00:20", "Thu 01 Jan 00:40", "Fri 02 Jan 00:00"]
        );
        assert_eq!(
            fires("0 0 * * FRI-SUN", 3),
            ["Fri 02 Jan 00:00", "Sat 03 Jan 00:00", "Sun 04 Jan 00:00"]
        );
    }

    #[test]
    fn sunday_is_0_and_7() {
        let sundays = fires("0 12 * * 0", 3);
        assert_eq!(
            sundays,
            ["Sun 04 Jan 12:00", "Sun 11 Jan 12:00", "Sun 18 Jan 12:00"]
        );
        assert_eq!(fires("0 12 * * 7", 3), sundays);
        assert_eq!(fires("0 12 * * sun", 3), sundays);
        assert_eq!(
            fires("0 12 * * 5-7", 3),
            ["Fri 02 Jan 12:00", "Sat 03 Jan 12:00", "Sun 04 Jan 12:00"]
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_are_restricted() {
        // The 13th, and every Friday (cron's rule), not only Friday the 13th.
        assert_eq!(
            fires("0 0 13 * fri", 4),
            [
                "Fri 02 Jan 00:00",
                "Fri 09 Jan 00:00",
                "Tue 13 Jan 00:00",
                "Fri 16 Jan 00:00"
            ]
        );
        // 1st and 15th or Monday.
        assert_eq!(
            fires("0 0 1,15 * 1", 4),
            [
                "Mon 05 Jan 00:00",
                "Mon 12 Jan 00:00",
                "Thu 15 Jan 00:00",
                "Mon 19 Jan 00:00"
            ]
        );
    }

    #[test]
    fn a_field_starting_with_a_star_counts_as_unrestricted_as_in_cron() {
        // Only the Mondays, every day of the month allowed.
        assert_eq!(
            fires("0 0 * * mon", 2),
            ["Mon 05 Jan 00:00", "Mon 12 Jan 00:00"]
        );
        // `*/2` starts with `*`: odd-numbered days that are Mondays, as cron does (the 2nd of
        // February is a Monday, but even).
        assert_eq!(
            fires("0 0 */2 * mon", 3),
            ["Mon 05 Jan 00:00", "Mon 19 Jan 00:00", "Mon 09 Feb 00:00"]
        );
    }

    #[test]
    fn schedules_that_never_fire_are_refused() {
        assert_eq!(
            err("0 0 30 2 *"),
            "never fires: day-of-month 30 never falls in month 2"
        );
        assert_eq!(
            err("0 0 31 apr,jun *"),
            "never fires: day-of-month 31 never falls in month 4,6"
        );
        // These do fire: 29 February in leap years, and the OR rule adds every Monday.
        assert!(CronSchedule::parse("0 0 29 2 *").is_ok());
        assert!(CronSchedule::parse("0 0 30 2 mon").is_ok());
        assert!(CronSchedule::parse("0 0 31 4,5 *").is_ok());
    }

    #[test]
    fn fixed_time_is_crons_definition() {
        for (text, fixed) in [
            ("30 2 * * *", true),
            ("30 2,14 * * *", true),
            ("0 1-3 * * *", true),
            ("0 */6 * * *", false),
            ("*/15 2 * * *", false),
            ("* * * * *", false),
        ] {
            assert_eq!(
                CronSchedule::parse(text).unwrap().is_fixed_time(),
                fixed,
                "{text}"
            );
        }
    }

    #[test]
    fn the_text_is_kept_as_written() {
        let s = CronSchedule::parse("  0 3 * * mon-fri ").unwrap();
        assert_eq!(s.text(), "0 3 * * mon-fri");
        assert_eq!(s.to_string(), "0 3 * * mon-fri");
    }
}
