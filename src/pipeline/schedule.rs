//! The schedule of an ImagePipeline: a cron expression read the way a Kubernetes
//! CronJob reads it, evaluated in the wall-clock time of an IANA time zone.
//!
//! The syntax is robfig/cron v3's `ParseStandard`, which the apiserver validates
//! CronJob schedules with, so a schedule copied from a CronJob means the same here.
//! Where this parser differs, it is on purpose:
//!
//! - Day-of-week accepts `7` for Sunday (as Vixie cron does; robfig refuses it), in a
//!   value or at the end of a range (`5-7` is Friday to Sunday), because people write
//!   it. `*` and `a/n` still stop at 6, so they select the same days as in robfig
//!   (`1/2` is Monday, Wednesday, Friday, not also Sunday).
//! - What robfig lets through but nobody means is refused: an empty list element
//!   (`1,,2`, `5,`; robfig drops it, but it is more likely a value lost in editing),
//!   `*-5` (robfig reads `*`) and `+5`.
//! - `TZ=`/`CRON_TZ=` prefixes are refused, as the apiserver refuses them for CronJob:
//!   the resource has its own time zone field.
//! - `@every` is refused although CronJob takes it: it counts from whenever the last
//!   run was computed, not from the wall clock, so it ignores the time zone and
//!   drifts; `0 */6 * * *` says the same thing predictably.
//!
//! Days: when both day fields are restricted a day matches if either matches (Vixie
//! cron's rule), otherwise both must. "Unrestricted" follows robfig, not the first
//! character: a field is unrestricted when one of its list elements is `*` or `?`
//! without a step (or with step 1). So `*/2` restricts: `0 0 */2 * 1` runs on odd days
//! and on Mondays, as a CronJob does.
//!
//! Daylight saving time, decided per wall-clock time (a civil minute matched by the
//! fields):
//!
//! - A time that does not exist (the spring-forward gap) is skipped: `30 2 * * *` does
//!   not run on that day in Europe/Berlin. robfig (and so CronJob) does the same,
//!   because it advances hour by hour in absolute time and never sees 02:xx. Vixie
//!   cron would run it just after the gap instead.
//! - A time that happens twice (the fall-back fold) runs once, at the earlier instant.
//!   robfig runs it twice, which would build the same images twice for a nightly
//!   schedule. The repeated hour starts no run of its own, so `*/15 * * * *` is quiet
//!   for that hour: acceptable for image builds, and one rule for every schedule.
//!
//! Searches are bounded: a schedule that can match at all matches at least once
//! every 8 years (the rarest is Feb 29 across a century year that is not a leap
//! year, 2096 to 2104), so looking 9 years ahead or back loses nothing, and
//! impossible dates such as Feb 30 end the search instead of looping. Whole months
//! and days that cannot match are skipped, so even the impossible ones cost a few
//! thousand cheap steps.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, TimeZone, TimeZoneDatabase};
use jiff::{SignedDuration, Timestamp, ToSpan};

/// See the module documentation: 8 years is the longest gap between two matches.
const SEARCH_YEARS: i16 = 9;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("the schedule is empty")]
    Empty,
    #[error("{0}= prefix: set the time zone in the timeZone field instead")]
    TimeZonePrefix(&'static str),
    #[error("@every is not supported: write a cron expression such as \"0 */6 * * *\"")]
    Every,
    #[error(
        "unknown descriptor {0:?}: expected @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly"
    )]
    UnknownDescriptor(String),
    #[error(
        "6 fields: a seconds field is not supported; expected 5 fields: minute hour day-of-month month day-of-week"
    )]
    SecondsField,
    #[error("{0} fields; expected 5: minute hour day-of-month month day-of-week")]
    FieldCount(usize),
    #[error("{field} field {text:?}: {problem}")]
    Field {
        field: Field,
        /// The part of the field the problem is in: the value, the list element or
        /// the whole field.
        text: String,
        problem: FieldProblem,
    },
    #[error("the time zone is empty")]
    EmptyTimeZone,
    #[error(
        "unknown time zone {0:?}: expected an IANA time zone name such as Europe/Berlin or UTC"
    )]
    UnknownTimeZone(String),
    #[error("time zone {name:?} is spelled {canonical:?}")]
    TimeZoneSpelling { name: String, canonical: String },
}

/// The five fields, in the order they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldProblem {
    #[error("empty list element")]
    EmptyElement,
    #[error("not a number")]
    NotANumber,
    #[error("not a number or a name {0}")]
    NotANumberOrName(&'static str),
    #[error("out of range {min}-{max}")]
    OutOfRange { min: u32, max: u32 },
    #[error("range is reversed ({start} is after {end})")]
    Reversed { start: u32, end: u32 },
    #[error(
        "range is reversed ({start} is after 0); end a range on Sunday with 7, as in {start}-7"
    )]
    ReversedToSunday { start: u32 },
    #[error("step must be at least 1")]
    ZeroStep,
    #[error("step is not a number")]
    BadStep,
    #[error("more than one '/'")]
    TooManySlashes,
    #[error("more than one '-'")]
    TooManyHyphens,
    #[error("a range needs a start and an end")]
    MissingBound,
    #[error("'*' and '?' cannot be a range bound")]
    StarBound,
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

const MONTH_NAMES: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Field {
    /// The values that may be written.
    fn bounds(self) -> (u32, u32) {
        match self {
            Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            Field::DayOfWeek => (0, 7),
        }
    }

    /// Where `*` and `a/n` end: 6 for day-of-week, so that `*/2` and `1/2` keep
    /// robfig's meaning and do not gain a Sunday through 7.
    fn open_end(self) -> u32 {
        match self {
            Field::DayOfWeek => 6,
            _ => self.bounds().1,
        }
    }

    fn names(self) -> Option<(&'static [&'static str], u32, &'static str)> {
        match self {
            Field::Month => Some((&MONTH_NAMES, 1, "JAN-DEC")),
            Field::DayOfWeek => Some((&DAY_NAMES, 0, "SUN-SAT")),
            _ => None,
        }
    }

    fn error(self, text: &str, problem: FieldProblem) -> ScheduleError {
        ScheduleError::Field {
            field: self,
            text: text.to_string(),
            problem,
        }
    }

    fn value(self, token: &str) -> Result<u32, ScheduleError> {
        let (min, max) = self.bounds();
        if let Some(n) = number(token) {
            if n < min || n > max {
                return Err(self.error(token, FieldProblem::OutOfRange { min, max }));
            }
            return Ok(n);
        }
        match self.names() {
            Some((names, first, hint)) => names
                .iter()
                .zip(first..)
                .find(|(name, _)| name.eq_ignore_ascii_case(token))
                .map(|(_, value)| value)
                .ok_or_else(|| self.error(token, FieldProblem::NotANumberOrName(hint))),
            None => Err(self.error(token, FieldProblem::NotANumber)),
        }
    }

    /// A whole field: its bits, and whether it is unrestricted in robfig's sense.
    fn parse(self, text: &str) -> Result<(u64, bool), ScheduleError> {
        let mut bits = 0;
        let mut star = false;
        for element in text.split(',') {
            if element.is_empty() {
                return Err(self.error(text, FieldProblem::EmptyElement));
            }
            let (element_bits, element_star) = self.parse_element(element)?;
            bits |= element_bits;
            star |= element_star;
        }
        if self == Field::DayOfWeek && bits & (1 << 7) != 0 {
            bits = (bits & !(1 << 7)) | 1;
        }
        Ok((bits, star))
    }

    fn parse_element(self, element: &str) -> Result<(u64, bool), ScheduleError> {
        let (range, step) = match element.split_once('/') {
            None => (element, None),
            Some((_, step)) if step.contains('/') => {
                return Err(self.error(element, FieldProblem::TooManySlashes));
            }
            Some((range, step)) => (range, Some(step)),
        };
        let step_size = match step.map(number) {
            None => 1,
            Some(Some(0)) => return Err(self.error(element, FieldProblem::ZeroStep)),
            Some(Some(n)) => n,
            Some(None) => return Err(self.error(element, FieldProblem::BadStep)),
        };
        let is_star = |s: &str| s == "*" || s == "?";
        let (start, end, star) = if is_star(range) {
            (self.bounds().0, self.open_end(), true)
        } else if let Some((low, high)) = range.split_once('-') {
            if high.contains('-') {
                return Err(self.error(element, FieldProblem::TooManyHyphens));
            }
            if low.is_empty() || high.is_empty() {
                return Err(self.error(element, FieldProblem::MissingBound));
            }
            if is_star(low) || is_star(high) {
                return Err(self.error(element, FieldProblem::StarBound));
            }
            (self.value(low)?, self.value(high)?, false)
        } else {
            let start = self.value(range)?;
            // `a/n` runs to the end of the field, as robfig and Vixie read it.
            let end = if step.is_some() {
                self.open_end().max(start)
            } else {
                start
            };
            (start, end, false)
        };
        if start > end {
            let problem = if self == Field::DayOfWeek && end == 0 {
                FieldProblem::ReversedToSunday { start }
            } else {
                FieldProblem::Reversed { start, end }
            };
            return Err(self.error(element, problem));
        }
        let bits = (start..=end)
            .step_by(usize::try_from(step_size).unwrap_or(usize::MAX))
            .fold(0u64, |bits, value| bits | (1 << value));
        // robfig: a step over `*` makes the field restricted for the day rule.
        Ok((bits, star && step_size == 1))
    }
}

/// Decimal digits only: robfig's Atoi would also take `+5`, which nobody means.
/// Saturates, so a huge number reads as out of range rather than as not a number.
fn number(token: &str) -> Option<u32> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(token.bytes().fold(0u32, |n, b| {
        n.saturating_mul(10).saturating_add(u32::from(b - b'0'))
    }))
}

fn has(bits: u64, value: i8) -> bool {
    u32::try_from(value).is_ok_and(|v| v < 64 && bits & (1 << v) != 0)
}

fn lowest_at_or_above(bits: u64, from: u32) -> Option<u32> {
    if from >= 64 {
        return None;
    }
    let masked = bits & (u64::MAX << from);
    (masked != 0).then(|| masked.trailing_zeros())
}

fn highest_at_or_below(bits: u64, upto: u32) -> Option<u32> {
    let masked = if upto >= 63 {
        bits
    } else {
        bits & ((1u64 << (upto + 1)) - 1)
    };
    (masked != 0).then(|| 63 - masked.leading_zeros())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    /// Bit 0 is Sunday; a written 7 is stored there.
    days_of_week: u64,
    days_of_month_unrestricted: bool,
    days_of_week_unrestricted: bool,
}

impl Cron {
    /// Standard 5-field syntax as a Kubernetes CronJob accepts it (robfig/cron v3
    /// `ParseStandard`): minute hour day-of-month month day-of-week, with `*`, `?`,
    /// lists `a,b`, ranges `a-b`, steps `*/n`, `a-b/n` and `a/n` (a to the field's
    /// end), month names JAN-DEC and day names SUN-SAT in any case, day-of-week 0-6
    /// with 0 = Sunday and also 7 = Sunday, and the descriptors @yearly, @annually,
    /// @monthly, @weekly, @daily, @midnight and @hourly. The module documentation
    /// lists the deliberate differences from robfig.
    pub fn parse(expr: &str) -> Result<Cron, ScheduleError> {
        let expr = expr.trim();
        if expr.is_empty() {
            return Err(ScheduleError::Empty);
        }
        for prefix in ["TZ", "CRON_TZ"] {
            let written = expr.get(..=prefix.len());
            if written.is_some_and(|w| w.eq_ignore_ascii_case(&format!("{prefix}="))) {
                return Err(ScheduleError::TimeZonePrefix(prefix));
            }
        }
        if expr.starts_with('@') {
            return Self::descriptor(expr);
        }
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let [minute, hour, day_of_month, month, day_of_week] = fields[..] else {
            return Err(match fields.len() {
                6 => ScheduleError::SecondsField,
                n => ScheduleError::FieldCount(n),
            });
        };
        let (minutes, _) = Field::Minute.parse(minute)?;
        let (hours, _) = Field::Hour.parse(hour)?;
        let (days_of_month, days_of_month_unrestricted) = Field::DayOfMonth.parse(day_of_month)?;
        let (months, _) = Field::Month.parse(month)?;
        let (days_of_week, days_of_week_unrestricted) = Field::DayOfWeek.parse(day_of_week)?;
        Ok(Cron {
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            days_of_month_unrestricted,
            days_of_week_unrestricted,
        })
    }

    fn descriptor(expr: &str) -> Result<Cron, ScheduleError> {
        let equivalent = match expr {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ if expr.split_whitespace().next() == Some("@every") => {
                return Err(ScheduleError::Every);
            }
            _ => return Err(ScheduleError::UnknownDescriptor(expr.to_string())),
        };
        Self::parse(equivalent)
    }

    /// The first matching minute strictly after `after`, evaluated in the wall-clock
    /// time of `tz`. None only when nothing matches within 9 years, which means never
    /// (Feb 30, or Apr 31).
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let mut from = minute_of(tz.to_datetime(after));
        let limit = from.date().saturating_add(SEARCH_YEARS.years());
        loop {
            let candidate = self.next_wall_clock(from, limit)?;
            // Rejected: `after`'s own minute, readings in a gap, and the first pass
            // of a fold `after` is already past; at most an hour of them on the
            // usual daylight saving days.
            if let Some(at) = earliest_instant(tz, candidate)
                && at > after
            {
                return Some(at);
            }
            from = candidate.checked_add(1.minute()).ok()?;
        }
    }

    /// The most recent matching time at or before `now` and after `since`: the run a
    /// controller missed, if any (CronJob's startingDeadlineSeconds). Scans backward
    /// day by day from `now`, so a long outage costs no more than a short one.
    pub fn last_at_or_before(
        &self,
        since: Timestamp,
        now: Timestamp,
        tz: &TimeZone,
    ) -> Option<Timestamp> {
        if now <= since {
            return None;
        }
        let mut from = minute_of(latest_wall_clock(now, tz));
        let since_day = tz.to_datetime(since).date().saturating_sub(2.days());
        let low = since_day.max(from.date().saturating_sub(SEARCH_YEARS.years()));
        loop {
            let candidate = self.previous_wall_clock(from, low)?;
            // Candidates come latest first and map to instants in the same order
            // (a fold maps to its earlier pass), so the first one in range is it.
            match earliest_instant(tz, candidate) {
                Some(at) if at <= since => return None,
                Some(at) if at <= now => return Some(at),
                _ => {}
            }
            from = candidate.checked_sub(1.minute()).ok()?;
        }
    }

    fn month_matches(&self, date: Date) -> bool {
        has(self.months, date.month())
    }

    fn day_matches(&self, date: Date) -> bool {
        let day_of_month = has(self.days_of_month, date.day());
        let day_of_week = has(self.days_of_week, date.weekday().to_sunday_zero_offset());
        if self.days_of_month_unrestricted || self.days_of_week_unrestricted {
            day_of_month && day_of_week
        } else {
            day_of_month || day_of_week
        }
    }

    /// The first matching time of day at or after hour:minute.
    fn first_time_from(&self, hour: u32, minute: u32) -> Option<Time> {
        let first_minute = lowest_at_or_above(self.minutes, 0)?;
        let (h, m) = match lowest_at_or_above(self.hours, hour)? {
            h if h == hour => match lowest_at_or_above(self.minutes, minute) {
                Some(m) => (h, m),
                None => (lowest_at_or_above(self.hours, hour + 1)?, first_minute),
            },
            h => (h, first_minute),
        };
        civil_time(h, m)
    }

    /// The last matching time of day at or before hour:minute.
    fn last_time_upto(&self, hour: u32, minute: u32) -> Option<Time> {
        let last_minute = highest_at_or_below(self.minutes, 59)?;
        let (h, m) = match highest_at_or_below(self.hours, hour)? {
            h if h == hour => match highest_at_or_below(self.minutes, minute) {
                Some(m) => (h, m),
                None => (
                    highest_at_or_below(self.hours, hour.checked_sub(1)?)?,
                    last_minute,
                ),
            },
            h => (h, last_minute),
        };
        civil_time(h, m)
    }

    /// The first matching wall-clock minute at or after `from`, up to `limit`.
    fn next_wall_clock(&self, from: DateTime, limit: Date) -> Option<DateTime> {
        let mut date = from.date();
        let mut hour = u32::try_from(from.hour()).ok()?;
        let mut minute = u32::try_from(from.minute()).ok()?;
        while date <= limit {
            if !self.month_matches(date) {
                date = date.last_of_month().tomorrow().ok()?;
            } else {
                if self.day_matches(date)
                    && let Some(time) = self.first_time_from(hour, minute)
                {
                    return Some(date.to_datetime(time));
                }
                date = date.tomorrow().ok()?;
            }
            (hour, minute) = (0, 0);
        }
        None
    }

    /// The last matching wall-clock minute at or before `from`, down to `low`.
    fn previous_wall_clock(&self, from: DateTime, low: Date) -> Option<DateTime> {
        let mut date = from.date();
        let mut hour = u32::try_from(from.hour()).ok()?;
        let mut minute = u32::try_from(from.minute()).ok()?;
        while date >= low {
            if !self.month_matches(date) {
                date = date.first_of_month().yesterday().ok()?;
            } else {
                if self.day_matches(date)
                    && let Some(time) = self.last_time_upto(hour, minute)
                {
                    return Some(date.to_datetime(time));
                }
                date = date.yesterday().ok()?;
            }
            (hour, minute) = (23, 59);
        }
        None
    }
}

impl FromStr for Cron {
    type Err = ScheduleError;

    fn from_str(expr: &str) -> Result<Cron, ScheduleError> {
        Cron::parse(expr)
    }
}

fn civil_time(hour: u32, minute: u32) -> Option<Time> {
    Time::new(i8::try_from(hour).ok()?, i8::try_from(minute).ok()?, 0, 0).ok()
}

fn minute_of(dt: DateTime) -> DateTime {
    dt.date().at(dt.hour(), dt.minute(), 0, 0)
}

/// When a wall-clock time runs: never in a gap, at the earlier instant in a fold.
fn earliest_instant(tz: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    match tz.to_ambiguous_timestamp(dt).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset.to_timestamp(dt).ok(),
        AmbiguousOffset::Gap { .. } => None,
        AmbiguousOffset::Fold { before, after } => {
            match (before.to_timestamp(dt).ok(), after.to_timestamp(dt).ok()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
    }
}

/// The latest wall-clock reading at any instant up to `now`. Right after a fall back
/// it is later than `now`'s own reading: at 02:10 in the repeated hour, 02:30 has
/// already run (in the first pass), and a backward scan must start above it.
fn latest_wall_clock(now: Timestamp, tz: &TimeZone) -> DateTime {
    let mut latest = tz.to_datetime(now);
    let Ok(horizon) = now.checked_sub(SignedDuration::from_hours(48)) else {
        return latest;
    };
    let Ok(upto) = now.checked_add(SignedDuration::from_nanos(1)) else {
        return latest;
    };
    // A fold's repeated span is at most a day, so only transitions in the last two
    // days can lift the reading above now's.
    for transition in tz.preceding(upto) {
        let at = transition.timestamp();
        if at < horizon {
            break;
        }
        if let Ok(just_before) = at.checked_sub(SignedDuration::from_nanos(1)) {
            latest = latest.max(tz.to_datetime(just_before));
        }
    }
    latest
}

/// An IANA zone name (`Europe/Berlin`, `Etc/UTC`, `UTC`), as CronJob's timeZone.
///
/// A name is valid when the IANA database bundled into kiln has it, spelled as there,
/// so validity does not depend on the image: the system database's extra files
/// (`localtime`, `posixrules`, `right/...`) are refused, and `localtime` would be
/// the controller's zone, not a fixed one. The rules come from the system database
/// when it has the zone, which is updated more often than a build of kiln, and from
/// the bundled copy otherwise (a distroless image has no /usr/share/zoneinfo).
pub fn time_zone(name: &str) -> Result<TimeZone, ScheduleError> {
    if name.is_empty() {
        return Err(ScheduleError::EmptyTimeZone);
    }
    let bundled = TimeZoneDatabase::bundled()
        .get(name)
        .map_err(|_| ScheduleError::UnknownTimeZone(name.to_string()))?;
    if let Some(canonical) = bundled.iana_name()
        && canonical != name
    {
        return Err(ScheduleError::TimeZoneSpelling {
            name: name.to_string(),
            canonical: canonical.to_string(),
        });
    }
    Ok(jiff::tz::db().get(name).unwrap_or(bundled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(expr: &str) -> Cron {
        Cron::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    fn err(expr: &str) -> String {
        match Cron::parse(expr) {
            Ok(c) => panic!("{expr} parsed as {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn tz(name: &str) -> TimeZone {
        time_zone(name).unwrap()
    }

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    fn bits(values: &[u32]) -> u64 {
        values.iter().fold(0, |b, v| b | (1 << v))
    }

    /// The next `n` runs after `start`, as RFC 3339 UTC strings.
    fn runs(expr: &str, start: &str, zone: &TimeZone, n: usize) -> Vec<String> {
        let c = cron(expr);
        let mut at = ts(start);
        let mut out = Vec::new();
        for _ in 0..n {
            at = c.next_after(at, zone).unwrap();
            out.push(at.to_string());
        }
        out
    }

    // ---- parsing ----

    #[test]
    fn every_minute_and_whitespace() {
        let c = cron("* * * * *");
        assert_eq!(c.minutes, bits(&(0..60).collect::<Vec<_>>()));
        assert_eq!(c.hours, bits(&(0..24).collect::<Vec<_>>()));
        assert_eq!(c.days_of_month, bits(&(1..32).collect::<Vec<_>>()));
        assert_eq!(c.months, bits(&(1..13).collect::<Vec<_>>()));
        assert_eq!(c.days_of_week, bits(&(0..7).collect::<Vec<_>>()));
        assert!(c.days_of_month_unrestricted && c.days_of_week_unrestricted);
        assert_eq!(cron("  0\t9  * *   *\n"), cron("0 9 * * *"));
        assert_eq!("0 9 * * *".parse::<Cron>(), Ok(cron("0 9 * * *")));
    }

    #[test]
    fn lists_ranges_and_steps() {
        let c = cron("1,2,5-7 */6 10-20/5 */3 1-5");
        assert_eq!(c.minutes, bits(&[1, 2, 5, 6, 7]));
        assert_eq!(c.hours, bits(&[0, 6, 12, 18]));
        assert_eq!(c.days_of_month, bits(&[10, 15, 20]));
        assert_eq!(c.months, bits(&[1, 4, 7, 10]));
        assert_eq!(c.days_of_week, bits(&[1, 2, 3, 4, 5]));
        assert_eq!(cron("*/15 * * * *").minutes, bits(&[0, 15, 30, 45]));
        assert_eq!(cron("10-50/20 * * * *").minutes, bits(&[10, 30, 50]));
        // `a/n` runs to the field's end.
        assert_eq!(cron("5/20 * * * *").minutes, bits(&[5, 25, 45]));
        assert_eq!(cron("0 20/2 * * *").hours, bits(&[20, 22]));
        assert_eq!(cron("0 0 */10 * *").days_of_month, bits(&[1, 11, 21, 31]));
        assert_eq!(cron("0 0 * * */2").days_of_week, bits(&[0, 2, 4, 6]));
        assert_eq!(cron("0 0 * * 1/2").days_of_week, bits(&[1, 3, 5]));
        // A step larger than the range keeps the start only.
        assert_eq!(cron("*/100 * * * *").minutes, bits(&[0]));
        assert_eq!(cron("7/100 * * * *").minutes, bits(&[7]));
        // Leading zeros and single-value ranges.
        assert_eq!(cron("05 09 * * *"), cron("5 9 * * *"));
        assert_eq!(cron("5-5 * * * *").minutes, bits(&[5]));
        // Overlapping elements.
        assert_eq!(
            cron("0-10,5-15 * * * *").minutes,
            bits(&(0..16).collect::<Vec<_>>())
        );
    }

    #[test]
    fn question_mark_is_star() {
        assert_eq!(cron("0 0 ? * *"), cron("0 0 * * *"));
        assert_eq!(cron("0 0 1 * ?"), cron("0 0 1 * *"));
        // robfig takes it in every field.
        assert_eq!(cron("? ? ? ? ?"), cron("* * * * *"));
        assert_eq!(cron("?/15 * * * *"), cron("*/15 * * * *"));
    }

    #[test]
    fn names_in_any_case() {
        assert_eq!(cron("0 0 * JAN,jUl mon-FRI"), cron("0 0 * 1,7 1-5"));
        assert_eq!(
            cron("0 0 * jan-dec sun,mon,tue,wed,thu,fri,sat").months,
            cron("0 0 * * *").months
        );
        assert_eq!(cron("0 0 * feb-aug/2 *").months, bits(&[2, 4, 6, 8]));
        assert_eq!(cron("0 0 * * SAT").days_of_week, bits(&[6]));
        assert_eq!(cron("0 0 * may/3 *").months, bits(&[5, 8, 11]));
        assert_eq!(cron("0 0 * * mon-5"), cron("0 0 * * 1-5"));
    }

    #[test]
    fn seven_is_sunday() {
        assert_eq!(cron("0 0 * * 7"), cron("0 0 * * 0"));
        assert_eq!(cron("0 0 * * 7"), cron("0 0 * * sun"));
        assert_eq!(cron("0 0 * * 5-7").days_of_week, bits(&[0, 5, 6]));
        assert_eq!(
            cron("0 0 * * 0-7").days_of_week,
            bits(&(0..7).collect::<Vec<_>>())
        );
        assert_eq!(cron("0 0 * * 1-7/2").days_of_week, bits(&[0, 1, 3, 5]));
        assert_eq!(cron("0 0 * * fri-7"), cron("0 0 * * 5,6,0"));
        // `*` and `a/n` end at 6, keeping robfig's meaning.
        assert_eq!(cron("0 0 * * 6/1").days_of_week, bits(&[6]));
        assert_eq!(cron("0 0 * * 7/2").days_of_week, bits(&[0]));
        // Sunday 2026-03-01.
        assert_eq!(
            runs("0 0 * * 7", "2026-02-27T00:00:00Z", &utc(), 2),
            ["2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z"]
        );
    }

    #[test]
    fn descriptors() {
        assert_eq!(cron("@yearly"), cron("0 0 1 1 *"));
        assert_eq!(cron("@annually"), cron("0 0 1 1 *"));
        assert_eq!(cron("@monthly"), cron("0 0 1 * *"));
        assert_eq!(cron("@weekly"), cron("0 0 * * 0"));
        assert_eq!(cron("@daily"), cron("0 0 * * *"));
        assert_eq!(cron("@midnight"), cron("0 0 * * *"));
        assert_eq!(cron("@hourly"), cron("0 * * * *"));
        assert_eq!(cron(" @daily "), cron("@daily"));
        let start = "2026-05-13T10:20:00Z";
        let next = |expr| runs(expr, start, &utc(), 1).remove(0);
        assert_eq!(next("@yearly"), "2027-01-01T00:00:00Z");
        assert_eq!(next("@annually"), "2027-01-01T00:00:00Z");
        assert_eq!(next("@monthly"), "2026-06-01T00:00:00Z");
        assert_eq!(next("@weekly"), "2026-05-17T00:00:00Z");
        assert_eq!(next("@daily"), "2026-05-14T00:00:00Z");
        assert_eq!(next("@midnight"), "2026-05-14T00:00:00Z");
        assert_eq!(next("@hourly"), "2026-05-13T11:00:00Z");
    }

    #[test]
    fn refusals_of_the_whole_expression() {
        assert_eq!(Cron::parse(""), Err(ScheduleError::Empty));
        assert_eq!(Cron::parse(" \t "), Err(ScheduleError::Empty));
        assert_eq!(
            Cron::parse("TZ=UTC 0 9 * * *"),
            Err(ScheduleError::TimeZonePrefix("TZ"))
        );
        assert_eq!(
            Cron::parse("CRON_TZ=Europe/Berlin 0 9 * * *"),
            Err(ScheduleError::TimeZonePrefix("CRON_TZ"))
        );
        assert_eq!(
            Cron::parse("cron_tz=UTC @daily"),
            Err(ScheduleError::TimeZonePrefix("CRON_TZ"))
        );
        assert_eq!(
            err("TZ=UTC 0 9 * * *"),
            "TZ= prefix: set the time zone in the timeZone field instead"
        );
        assert_eq!(Cron::parse("@every 1h"), Err(ScheduleError::Every));
        assert_eq!(Cron::parse("@every"), Err(ScheduleError::Every));
        for unknown in ["@reboot", "@", "@Daily", "@daily 0", "@weekdays"] {
            assert_eq!(
                Cron::parse(unknown),
                Err(ScheduleError::UnknownDescriptor(unknown.to_string())),
                "{unknown}"
            );
        }
        assert_eq!(Cron::parse("0 0 9 * * *"), Err(ScheduleError::SecondsField));
        assert_eq!(
            err("0 0 9 * * *"),
            "6 fields: a seconds field is not supported; expected 5 fields: minute hour day-of-month month day-of-week"
        );
        assert_eq!(Cron::parse("0 9 * *"), Err(ScheduleError::FieldCount(4)));
        assert_eq!(Cron::parse("0"), Err(ScheduleError::FieldCount(1)));
        assert_eq!(
            Cron::parse("0 0 9 * * * 2026"),
            Err(ScheduleError::FieldCount(7))
        );
    }

    #[test]
    fn refusals_within_a_field() {
        use FieldProblem::*;
        let field = |field, text: &str, problem| {
            Err::<Cron, _>(ScheduleError::Field {
                field,
                text: text.to_string(),
                problem,
            })
        };
        let cases = [
            (
                "61 * * * *",
                field(Field::Minute, "61", OutOfRange { min: 0, max: 59 }),
            ),
            (
                "60 * * * *",
                field(Field::Minute, "60", OutOfRange { min: 0, max: 59 }),
            ),
            (
                "0 24 * * *",
                field(Field::Hour, "24", OutOfRange { min: 0, max: 23 }),
            ),
            (
                "0 0 0 * *",
                field(Field::DayOfMonth, "0", OutOfRange { min: 1, max: 31 }),
            ),
            (
                "0 0 32 * *",
                field(Field::DayOfMonth, "32", OutOfRange { min: 1, max: 31 }),
            ),
            (
                "0 0 * 0 *",
                field(Field::Month, "0", OutOfRange { min: 1, max: 12 }),
            ),
            (
                "0 0 * 13 *",
                field(Field::Month, "13", OutOfRange { min: 1, max: 12 }),
            ),
            (
                "0 0 * * 8",
                field(Field::DayOfWeek, "8", OutOfRange { min: 0, max: 7 }),
            ),
            (
                "0 0 * * 1-8",
                field(Field::DayOfWeek, "8", OutOfRange { min: 0, max: 7 }),
            ),
            (
                "99999999999 * * * *",
                field(Field::Minute, "99999999999", OutOfRange { min: 0, max: 59 }),
            ),
            ("1,,2 * * * *", field(Field::Minute, "1,,2", EmptyElement)),
            ("5, * * * *", field(Field::Minute, "5,", EmptyElement)),
            ("0 ,5 * * *", field(Field::Hour, ",5", EmptyElement)),
            ("*/0 * * * *", field(Field::Minute, "*/0", ZeroStep)),
            ("0 1-5/0 * * *", field(Field::Hour, "1-5/0", ZeroStep)),
            ("*/x * * * *", field(Field::Minute, "*/x", BadStep)),
            ("*/ * * * *", field(Field::Minute, "*/", BadStep)),
            ("*/-1 * * * *", field(Field::Minute, "*/-1", BadStep)),
            (
                "1/2/3 * * * *",
                field(Field::Minute, "1/2/3", TooManySlashes),
            ),
            (
                "1-2-3 * * * *",
                field(Field::Minute, "1-2-3", TooManyHyphens),
            ),
            (
                "5-3 * * * *",
                field(Field::Minute, "5-3", Reversed { start: 5, end: 3 }),
            ),
            (
                "0 0 * dec-jan *",
                field(Field::Month, "dec-jan", Reversed { start: 12, end: 1 }),
            ),
            (
                "0 0 * * fri-mon",
                field(Field::DayOfWeek, "fri-mon", Reversed { start: 5, end: 1 }),
            ),
            (
                "0 0 * * fri-sun",
                field(Field::DayOfWeek, "fri-sun", ReversedToSunday { start: 5 }),
            ),
            ("-5 * * * *", field(Field::Minute, "-5", MissingBound)),
            ("5- * * * *", field(Field::Minute, "5-", MissingBound)),
            ("*-5 * * * *", field(Field::Minute, "*-5", StarBound)),
            ("0 0 1-? * *", field(Field::DayOfMonth, "1-?", StarBound)),
            ("x * * * *", field(Field::Minute, "x", NotANumber)),
            ("+5 * * * *", field(Field::Minute, "+5", NotANumber)),
            ("5x * * * *", field(Field::Minute, "5x", NotANumber)),
            ("0 mon * * *", field(Field::Hour, "mon", NotANumber)),
            ("0 0 jan * *", field(Field::DayOfMonth, "jan", NotANumber)),
            (
                "0 0 * mon *",
                field(Field::Month, "mon", NotANumberOrName("JAN-DEC")),
            ),
            (
                "0 0 * january *",
                field(Field::Month, "january", NotANumberOrName("JAN-DEC")),
            ),
            (
                "0 0 * * jan",
                field(Field::DayOfWeek, "jan", NotANumberOrName("SUN-SAT")),
            ),
            (
                "0 0 * * L",
                field(Field::DayOfWeek, "L", NotANumberOrName("SUN-SAT")),
            ),
            ("0 0 L * *", field(Field::DayOfMonth, "L", NotANumber)),
            ("** * * * *", field(Field::Minute, "**", NotANumber)),
        ];
        for (expr, want) in cases {
            assert_eq!(Cron::parse(expr), want, "{expr}");
        }
    }

    #[test]
    fn error_messages_name_the_field_and_the_problem() {
        assert_eq!(err("61 * * * *"), "minute field \"61\": out of range 0-59");
        assert_eq!(
            err("0 0 * * 8"),
            "day-of-week field \"8\": out of range 0-7"
        );
        assert_eq!(
            err("0 0 1,,2 * *"),
            "day-of-month field \"1,,2\": empty list element"
        );
        assert_eq!(
            err("*/0 * * * *"),
            "minute field \"*/0\": step must be at least 1"
        );
        assert_eq!(
            err("0 5-3 * * *"),
            "hour field \"5-3\": range is reversed (5 is after 3)"
        );
        assert_eq!(
            err("0 0 * * fri-sun"),
            "day-of-week field \"fri-sun\": range is reversed (5 is after 0); end a range on Sunday with 7, as in 5-7"
        );
        assert_eq!(
            err("0 0 * foo *"),
            "month field \"foo\": not a number or a name JAN-DEC"
        );
    }

    #[test]
    fn unrestricted_day_fields_follow_robfig() {
        let c = cron("0 0 * * *");
        assert!(c.days_of_month_unrestricted && c.days_of_week_unrestricted);
        assert!(cron("0 0 */1 * *").days_of_month_unrestricted);
        assert!(cron("0 0 ? * *").days_of_month_unrestricted);
        // A list holding `*` is all days anyway.
        assert!(cron("0 0 1,* * 1").days_of_month_unrestricted);
        assert!(!cron("0 0 */2 * *").days_of_month_unrestricted);
        assert!(!cron("0 0 1-31 * *").days_of_month_unrestricted);
        assert!(!cron("0 0 * * */2").days_of_week_unrestricted);
        assert!(!cron("0 0 * * 0-6").days_of_week_unrestricted);
    }

    // ---- evaluation ----

    #[test]
    fn next_after_is_strictly_after() {
        let z = utc();
        let c = cron("0 9 * * *");
        let next = |at| c.next_after(ts(at), &z).unwrap().to_string();
        assert_eq!(next("2026-05-13T08:59:59.999Z"), "2026-05-13T09:00:00Z");
        assert_eq!(next("2026-05-13T09:00:00Z"), "2026-05-14T09:00:00Z");
        assert_eq!(
            next("2026-05-13T09:00:00.000000001Z"),
            "2026-05-14T09:00:00Z"
        );
        assert_eq!(next("2026-05-13T09:00:30Z"), "2026-05-14T09:00:00Z");
        assert_eq!(
            runs("* * * * *", "2026-05-13T12:00:30Z", &z, 2),
            ["2026-05-13T12:01:00Z", "2026-05-13T12:02:00Z"]
        );
        assert_eq!(
            runs("*/15 * * * *", "2026-05-13T12:07:00Z", &z, 4),
            [
                "2026-05-13T12:15:00Z",
                "2026-05-13T12:30:00Z",
                "2026-05-13T12:45:00Z",
                "2026-05-13T13:00:00Z"
            ]
        );
    }

    #[test]
    fn rolls_over_hours_days_months_and_years() {
        let z = utc();
        assert_eq!(
            runs("59 23 31 12 *", "2026-12-31T23:59:00Z", &z, 1),
            ["2027-12-31T23:59:00Z"]
        );
        assert_eq!(
            runs("0 0 1 1 *", "2026-06-01T00:00:00Z", &z, 1),
            ["2027-01-01T00:00:00Z"]
        );
        assert_eq!(
            runs("30 22-23 * * *", "2026-01-31T23:30:00Z", &z, 2),
            ["2026-02-01T22:30:00Z", "2026-02-01T23:30:00Z"]
        );
        assert_eq!(
            runs("0 12 31 * *", "2026-01-31T12:00:00Z", &z, 3),
            [
                "2026-03-31T12:00:00Z",
                "2026-05-31T12:00:00Z",
                "2026-07-31T12:00:00Z"
            ]
        );
        assert_eq!(
            runs("15 10 * 2,11 mon", "2026-02-23T10:15:00Z", &z, 2),
            ["2026-11-02T10:15:00Z", "2026-11-09T10:15:00Z"]
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_restricted() {
        let z = utc();
        // The 13th or any Friday.
        assert_eq!(
            runs("0 0 13 * 5", "2026-03-01T00:00:00Z", &z, 8),
            [
                "2026-03-06T00:00:00Z",
                "2026-03-13T00:00:00Z",
                "2026-03-20T00:00:00Z",
                "2026-03-27T00:00:00Z",
                "2026-04-03T00:00:00Z",
                "2026-04-10T00:00:00Z",
                "2026-04-13T00:00:00Z",
                "2026-04-17T00:00:00Z"
            ]
        );
        // One field unrestricted: the other alone decides.
        assert_eq!(
            runs("0 0 * * 5", "2026-03-01T00:00:00Z", &z, 2),
            ["2026-03-06T00:00:00Z", "2026-03-13T00:00:00Z"]
        );
        assert_eq!(
            runs("0 0 13 * *", "2026-03-01T00:00:00Z", &z, 2),
            ["2026-03-13T00:00:00Z", "2026-04-13T00:00:00Z"]
        );
        assert_eq!(
            runs("0 0 13 * ?", "2026-03-01T00:00:00Z", &z, 1),
            ["2026-03-13T00:00:00Z"]
        );
        // `*/2` restricts (robfig): odd days or Mondays.
        assert_eq!(
            runs("0 0 */2 * 1", "2026-03-01T00:00:00Z", &z, 8),
            [
                "2026-03-02T00:00:00Z",
                "2026-03-03T00:00:00Z",
                "2026-03-05T00:00:00Z",
                "2026-03-07T00:00:00Z",
                "2026-03-09T00:00:00Z",
                "2026-03-11T00:00:00Z",
                "2026-03-13T00:00:00Z",
                "2026-03-15T00:00:00Z"
            ]
        );
        // A list holding `*` is unrestricted: Mondays only.
        assert_eq!(
            runs("0 0 1,* * 1", "2026-03-01T00:00:00Z", &z, 2),
            ["2026-03-02T00:00:00Z", "2026-03-09T00:00:00Z"]
        );
    }

    #[test]
    fn leap_days() {
        let z = utc();
        assert_eq!(
            runs("0 0 29 2 *", "2026-01-01T00:00:00Z", &z, 3),
            [
                "2028-02-29T00:00:00Z",
                "2032-02-29T00:00:00Z",
                "2036-02-29T00:00:00Z"
            ]
        );
        // 2100 is not a leap year: the longest wait, 8 years, is inside the bound.
        assert_eq!(
            runs("0 0 29 2 *", "2096-03-01T00:00:00Z", &z, 1),
            ["2104-02-29T00:00:00Z"]
        );
        let c = cron("0 0 29 2 *");
        assert_eq!(
            c.last_at_or_before(ts("2000-01-01T00:00:00Z"), ts("2103-12-31T00:00:00Z"), &z),
            Some(ts("2096-02-29T00:00:00Z"))
        );
        assert_eq!(
            runs("0 0 28 2 *", "2100-02-28T00:00:00Z", &z, 1),
            ["2101-02-28T00:00:00Z"]
        );
    }

    #[test]
    fn impossible_dates_end_quickly() {
        let z = tz("Europe/Berlin");
        let started = std::time::Instant::now();
        for expr in [
            "0 0 30 2 *",
            "0 0 31 2 *",
            "0 0 31 4,6,9,11 *",
            "* * 30,31 feb *",
        ] {
            let c = cron(expr);
            assert_eq!(c.next_after(ts("2026-01-01T00:00:00Z"), &z), None, "{expr}");
            assert_eq!(
                c.last_at_or_before(Timestamp::MIN, ts("2026-01-01T00:00:00Z"), &z),
                None,
                "{expr}"
            );
        }
        // Generous for a debug build: the search is a few thousand day checks.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // Apr 31 never, but the OR with a weekday still runs.
        assert_eq!(
            runs("0 0 31 4 1", "2026-03-31T00:00:00Z", &utc(), 1),
            ["2026-04-06T00:00:00Z"]
        );
    }

    #[test]
    fn ends_of_the_representable_range() {
        let z = utc();
        assert_eq!(cron("0 0 * * *").next_after(Timestamp::MAX, &z), None);
        // The last representable instant is 9999-12-30T22:00:00Z.
        assert_eq!(
            cron("* * * * *").next_after(ts("9999-12-30T21:58:00Z"), &z),
            Some(ts("9999-12-30T21:59:00Z"))
        );
        assert_eq!(
            cron("0 23 * * *").next_after(ts("9999-12-29T23:00:00Z"), &z),
            None
        );
        assert_eq!(
            cron("0 0 1 1 *").next_after(ts("9999-06-01T00:00:00Z"), &z),
            None
        );
        let first = Timestamp::MIN;
        assert_eq!(
            cron("* * * * *").last_at_or_before(first, first + SignedDuration::from_mins(30), &z),
            Some(ts("-009999-01-02T02:29:00Z"))
        );
        assert_eq!(
            cron("0 0 * * *").last_at_or_before(first, first + SignedDuration::from_mins(30), &z),
            None
        );
    }

    #[test]
    fn time_zone_wall_clock() {
        let berlin = tz("Europe/Berlin");
        // 09:00 CEST (UTC+2) is 07:00 UTC; 09:00 CET (UTC+1) is 08:00 UTC.
        assert_eq!(
            runs("0 9 * * *", "2026-07-01T00:00:00Z", &berlin, 1),
            ["2026-07-01T07:00:00Z"]
        );
        assert_eq!(
            runs("0 9 * * *", "2026-01-15T00:00:00Z", &berlin, 1),
            ["2026-01-15T08:00:00Z"]
        );
        // Across the spring change the UTC time moves by an hour.
        assert_eq!(
            runs("0 9 * * *", "2026-03-28T00:00:00Z", &berlin, 2),
            ["2026-03-28T08:00:00Z", "2026-03-29T07:00:00Z"]
        );
        // Midnight in Berlin is the previous UTC day: the day fields are local.
        assert_eq!(
            runs("0 0 1 * *", "2026-06-15T00:00:00Z", &berlin, 1),
            ["2026-06-30T22:00:00Z"]
        );
        assert_eq!(
            runs("0 0 * * mon", "2026-06-15T00:00:00Z", &berlin, 1),
            ["2026-06-21T22:00:00Z"]
        );
        let kolkata = tz("Asia/Kolkata");
        assert_eq!(
            runs("0 9 * * *", "2026-01-15T00:00:00Z", &kolkata, 1),
            ["2026-01-15T03:30:00Z"]
        );
        let new_york = tz("America/New_York");
        assert_eq!(
            runs("0 9 * * *", "2026-01-15T00:00:00Z", &new_york, 1),
            ["2026-01-15T14:00:00Z"]
        );
    }

    #[test]
    fn spring_forward_gap_is_skipped() {
        let berlin = tz("Europe/Berlin");
        // 2026-03-29 02:00 CET jumps to 03:00 CEST: 02:30 does not exist that day.
        assert_eq!(
            runs("30 2 * * *", "2026-03-28T02:00:00Z", &berlin, 2),
            ["2026-03-30T00:30:00Z", "2026-03-31T00:30:00Z"]
        );
        // Hourly: 01:30 CET, then 03:30 CEST, an hour later in real time.
        assert_eq!(
            runs("30 * * * *", "2026-03-29T00:00:00Z", &berlin, 2),
            ["2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z"]
        );
        // 03:00 exists: it is the first instant after the gap.
        assert_eq!(
            runs("0 3 * * *", "2026-03-28T12:00:00Z", &berlin, 1),
            ["2026-03-29T01:00:00Z"]
        );
        // Every minute: 01:59 CET is followed by 03:00 CEST.
        assert_eq!(
            runs("* * * * *", "2026-03-29T00:58:00Z", &berlin, 2),
            ["2026-03-29T00:59:00Z", "2026-03-29T01:00:00Z"]
        );
        // The missed-run look-up skips the gap too: the last 02:30 was the day before.
        let c = cron("30 2 * * *");
        assert_eq!(
            c.last_at_or_before(
                ts("2026-03-01T00:00:00Z"),
                ts("2026-03-29T12:00:00Z"),
                &berlin
            ),
            Some(ts("2026-03-28T01:30:00Z"))
        );
    }

    #[test]
    fn fall_back_fold_runs_once_at_the_earlier_instant() {
        let berlin = tz("Europe/Berlin");
        // 2026-10-25 03:00 CEST falls back to 02:00 CET: 02:30 happens twice.
        assert_eq!(
            runs("30 2 * * *", "2026-10-24T12:00:00Z", &berlin, 2),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
        );
        let c = cron("30 2 * * *");
        // From inside the second pass of the hour: not again that day.
        assert_eq!(
            c.next_after(ts("2026-10-25T01:10:00Z"), &berlin),
            Some(ts("2026-10-26T01:30:00Z"))
        );
        // Sub-hourly schedules are quiet for the repeated hour.
        assert_eq!(
            runs("*/30 * * * *", "2026-10-24T23:59:00Z", &berlin, 4),
            [
                "2026-10-25T00:00:00Z",
                "2026-10-25T00:30:00Z",
                "2026-10-25T02:00:00Z",
                "2026-10-25T02:30:00Z"
            ]
        );
        // The missed-run look-up from inside the second pass finds the first pass,
        // although its wall-clock reading (02:30) is later than now's (02:10).
        let since = ts("2026-10-24T12:00:00Z");
        assert_eq!(
            c.last_at_or_before(since, ts("2026-10-25T01:10:00Z"), &berlin),
            Some(ts("2026-10-25T00:30:00Z"))
        );
        assert_eq!(
            c.last_at_or_before(since, ts("2026-10-25T01:45:00Z"), &berlin),
            Some(ts("2026-10-25T00:30:00Z"))
        );
        assert_eq!(
            c.last_at_or_before(
                ts("2026-10-25T00:40:00Z"),
                ts("2026-10-25T01:45:00Z"),
                &berlin
            ),
            None
        );
        assert_eq!(
            cron("45 2 * * *").last_at_or_before(
                ts("2026-10-25T00:40:00Z"),
                ts("2026-10-25T01:10:00Z"),
                &berlin
            ),
            Some(ts("2026-10-25T00:45:00Z"))
        );
    }

    #[test]
    fn last_at_or_before_bounds() {
        let z = utc();
        let c = cron("0 9 * * *");
        let last = |since, now| c.last_at_or_before(ts(since), ts(now), &z);
        assert_eq!(
            last("2026-01-01T00:00:00Z", "2026-01-10T12:00:00Z"),
            Some(ts("2026-01-10T09:00:00Z"))
        );
        // At `now` counts, at `since` does not.
        assert_eq!(
            last("2026-01-01T00:00:00Z", "2026-01-10T09:00:00Z"),
            Some(ts("2026-01-10T09:00:00Z"))
        );
        assert_eq!(
            last("2026-01-01T00:00:00Z", "2026-01-10T08:59:59Z"),
            Some(ts("2026-01-09T09:00:00Z"))
        );
        assert_eq!(last("2026-01-10T09:00:00Z", "2026-01-10T12:00:00Z"), None);
        assert_eq!(
            last("2026-01-10T08:59:59Z", "2026-01-10T12:00:00Z"),
            Some(ts("2026-01-10T09:00:00Z"))
        );
        assert_eq!(last("2026-01-10T12:00:00Z", "2026-01-10T12:00:00Z"), None);
        assert_eq!(last("2026-01-11T00:00:00Z", "2026-01-10T12:00:00Z"), None);
        // A long outage is no slower than a short one.
        let started = std::time::Instant::now();
        assert_eq!(
            cron("* * * * *").last_at_or_before(Timestamp::MIN, ts("2026-01-10T12:34:56Z"), &z),
            Some(ts("2026-01-10T12:34:00Z"))
        );
        assert_eq!(
            cron("0 0 29 2 *").last_at_or_before(Timestamp::MIN, ts("2027-06-01T00:00:00Z"), &z),
            Some(ts("2024-02-29T00:00:00Z"))
        );
        assert_eq!(
            cron("0 0 29 2 *").last_at_or_before(
                ts("2024-02-29T00:00:00Z"),
                ts("2027-06-01T00:00:00Z"),
                &z
            ),
            None
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            cron("30 22 * * fri").last_at_or_before(
                ts("2026-01-01T00:00:00Z"),
                ts("2026-03-11T10:00:00Z"),
                &tz("Europe/Berlin")
            ),
            Some(ts("2026-03-06T21:30:00Z"))
        );
    }

    /// Independent of the search: every UTC minute of a window, kept if its wall-clock
    /// reading matches and it is the earlier instant of that reading (jiff's rule).
    fn brute_force(c: &Cron, zone: &TimeZone, start: Timestamp, minutes: i64) -> Vec<Timestamp> {
        (1..=minutes)
            .map(|i| start + SignedDuration::from_mins(i))
            .filter(|&t| {
                let dt = zone.to_datetime(t);
                has(c.minutes, dt.minute())
                    && has(c.hours, dt.hour())
                    && has(c.months, dt.month())
                    && c.day_matches(dt.date())
                    && zone.to_ambiguous_timestamp(dt).earlier().ok() == Some(t)
            })
            .collect()
    }

    #[test]
    fn agrees_with_minute_by_minute_evaluation_around_transitions() {
        let exprs = [
            "* * * * *",
            "*/7 * * * *",
            "30 2 * * *",
            "0,30 1-3 * * *",
            "15 */2 * * *",
            "0 0 * * *",
            "45 23 * * 6",
            "0 0 13 * 5",
            "5 4 */2 * 1",
            "0 12 1 * *",
            "59 1 * * *",
            "0 2 * * *",
        ];
        let windows = [
            ("UTC", "2026-02-26T00:00:00Z"),
            ("Europe/Berlin", "2026-03-28T00:00:00Z"),
            ("Europe/Berlin", "2026-10-24T00:00:00Z"),
            ("America/New_York", "2026-03-07T12:00:00Z"),
            ("America/New_York", "2026-10-31T12:00:00Z"),
            // Half-hour daylight saving time.
            ("Australia/Lord_Howe", "2026-04-04T00:00:00Z"),
            ("Australia/Lord_Howe", "2026-10-03T00:00:00Z"),
        ];
        let minutes = 3 * 24 * 60;
        for (zone_name, start) in windows {
            let zone = tz(zone_name);
            let start = ts(start);
            let end = start + SignedDuration::from_mins(minutes);
            for expr in exprs {
                let c = cron(expr);
                let want = brute_force(&c, &zone, start, minutes);
                let mut got = Vec::new();
                let mut at = start;
                while let Some(next) = c.next_after(at, &zone).filter(|&t| t <= end) {
                    got.push(next);
                    at = next;
                }
                assert_eq!(got, want, "{expr} in {zone_name} from {start}");
                for i in (0..=minutes).step_by(13) {
                    let now = start + SignedDuration::from_mins(i) + SignedDuration::from_secs(17);
                    let expected = want.iter().rev().find(|&&t| t <= now).copied();
                    assert_eq!(
                        c.last_at_or_before(start, now, &zone),
                        expected,
                        "{expr} in {zone_name} at {now}"
                    );
                }
            }
        }
    }

    // ---- time zones ----

    #[test]
    fn time_zone_names() {
        assert_eq!(tz("Europe/Berlin").iana_name(), Some("Europe/Berlin"));
        assert_eq!(tz("UTC"), TimeZone::UTC);
        assert_eq!(
            tz("Etc/UTC").to_offset(ts("2026-01-01T00:00:00Z")),
            jiff::tz::Offset::UTC
        );
        assert!(tz("America/Argentina/Buenos_Aires").iana_name().is_some());
        assert_eq!(time_zone(""), Err(ScheduleError::EmptyTimeZone));
        for unknown in [
            "Mars/Olympus_Mons",
            "Local",
            "localtime",
            "posixrules",
            "Europe/",
            "/Europe/Berlin",
            "../zoneinfo/UTC",
            "/usr/share/zoneinfo/UTC",
            " UTC",
            "Europe/Berlin ",
            "CET-1CEST,M3.5.0,M10.5.0/3",
            "+02:00",
        ] {
            assert_eq!(
                time_zone(unknown),
                Err(ScheduleError::UnknownTimeZone(unknown.to_string())),
                "{unknown}"
            );
        }
        assert_eq!(
            time_zone("europe/berlin"),
            Err(ScheduleError::TimeZoneSpelling {
                name: "europe/berlin".to_string(),
                canonical: "Europe/Berlin".to_string()
            })
        );
        assert_eq!(
            time_zone("utc").map_err(|e| e.to_string()),
            Err("time zone \"utc\" is spelled \"UTC\"".to_string())
        );
        assert_eq!(
            time_zone("Mars/Olympus_Mons").map_err(|e| e.to_string()),
            Err("unknown time zone \"Mars/Olympus_Mons\": expected an IANA time zone name such as Europe/Berlin or UTC".to_string())
        );
    }

    #[test]
    fn bundled_database_has_the_zones() {
        // What a distroless image, without /usr/share/zoneinfo, relies on.
        let bundled = TimeZoneDatabase::bundled();
        for name in [
            "Europe/Berlin",
            "America/New_York",
            "Asia/Kolkata",
            "Etc/UTC",
            "UTC",
        ] {
            assert!(bundled.get(name).is_ok(), "{name}");
        }
        let zone = bundled.get("Europe/Berlin").unwrap();
        assert_eq!(
            runs("0 9 * * *", "2026-07-01T00:00:00Z", &zone, 1),
            ["2026-07-01T07:00:00Z"]
        );
    }
}
