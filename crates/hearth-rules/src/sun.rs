//! Sunrise and sunset, computed on the device.
//!
//! Source: NOAA Global Monitoring Laboratory, "NOAA Solar Calculator" and its
//! spreadsheet `NOAA_Solar_Calculations_day.xls` (the formulas follow Jean
//! Meeus, *Astronomical Algorithms*, 2nd ed., ch. 22–28). Each step below
//! names the spreadsheet column it implements. Accuracy is about a minute for
//! latitudes within ±72° and degrades near the polar circles, where a small
//! error in declination moves the time a lot — which is also where the
//! published tables disagree with each other.
//!
//! "Sunrise" is when the upper limb of the sun crosses the horizon with
//! standard refraction: solar zenith 90.833° (NOAA's convention).
//!
//! A day is a *solar* day: the events are those around the solar noon
//! nearest local noon of the requested date. That gives every date exactly
//! one sunrise and one sunset (or a polar answer), which is what a schedule
//! needs; on the rare dates where sunset falls after local midnight (e.g.
//! Reykjavík in June) the sunset instant is on the next calendar day.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::Location;

/// The sun's behaviour on one local date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DayLight {
    /// The sun rises and sets.
    Normal {
        /// Sunrise instant.
        sunrise: Timestamp,
        /// Sunset instant.
        sunset: Timestamp,
    },
    /// Midnight sun: the sun does not set on this date.
    AlwaysUp,
    /// Polar night: the sun does not rise on this date.
    AlwaysDown,
}

/// Solar zenith at sunrise/sunset: 90° + 50′ (34′ refraction + 16′ radius).
const ZENITH_DEG: f64 = 90.833;

fn julian_day(t: Timestamp) -> f64 {
    t.as_second() as f64 / 86_400.0 + 2_440_587.5
}

/// Equation of time (minutes) and declination (degrees) at an instant.
fn solar_params(t: Timestamp) -> (f64, f64) {
    // Column G: Julian century.
    let jc = (julian_day(t) - 2_451_545.0) / 36_525.0;
    // I: geometric mean longitude of the sun (deg).
    let l0 = (280.46646 + jc * (36000.76983 + jc * 0.0003032)).rem_euclid(360.0);
    // J: geometric mean anomaly (deg).
    let m = 357.52911 + jc * (35999.05029 - 0.0001537 * jc);
    // K: eccentricity of Earth's orbit.
    let e = 0.016708634 - jc * (0.000042037 + 0.0000001267 * jc);
    // L: equation of centre (deg).
    let mr = m.to_radians();
    let c = mr.sin() * (1.914602 - jc * (0.004817 + 0.000014 * jc))
        + (2.0 * mr).sin() * (0.019993 - 0.000101 * jc)
        + (3.0 * mr).sin() * 0.000289;
    // M: true longitude; P: apparent longitude (deg).
    let omega = (125.04 - 1934.136 * jc).to_radians();
    let app_long = l0 + c - 0.00569 - 0.00478 * omega.sin();
    // Q: mean obliquity of the ecliptic; R: corrected obliquity (deg).
    let obliq0 = 23.0 + (26.0 + (21.448 - jc * (46.815 + jc * (0.00059 - jc * 0.001813))) / 60.0) / 60.0;
    let obliq = obliq0 + 0.00256 * omega.cos();
    // T: declination (deg).
    let decl = (obliq.to_radians().sin() * app_long.to_radians().sin()).asin().to_degrees();
    // U: var y; V: equation of time (minutes).
    let y = (obliq.to_radians() / 2.0).tan().powi(2);
    let l0r = l0.to_radians();
    let eot = 4.0
        * (y * (2.0 * l0r).sin() - 2.0 * e * mr.sin() + 4.0 * e * y * mr.sin() * (2.0 * l0r).cos()
            - 0.5 * y * y * (4.0 * l0r).sin()
            - 1.25 * e * e * (2.0 * mr).sin())
        .to_degrees();
    (eot, decl)
}

/// W: cosine of the sunrise hour angle (outside [-1, 1] means polar).
fn cos_hour_angle(lat: f64, decl: f64) -> f64 {
    let (lat, decl) = (lat.to_radians(), decl.to_radians());
    ZENITH_DEG.to_radians().cos() / (lat.cos() * decl.cos()) - lat.tan() * decl.tan()
}

fn add_minutes(t: Timestamp, min: f64) -> Timestamp {
    let secs = (min * 60.0).round() as i64;
    // The offsets here are bounded by a few days, far inside jiff's range.
    Timestamp::from_second(t.as_second().saturating_add(secs)).unwrap_or(t)
}

/// X: solar noon nearest `anchor`, refined at its own instant.
fn solar_noon(anchor: Timestamp, lon: f64) -> Timestamp {
    let day_start = anchor.as_second().div_euclid(86_400) * 86_400;
    let mut noon = anchor;
    for _ in 0..2 {
        let (eot, _) = solar_params(noon);
        let mut secs = day_start + ((720.0 - 4.0 * lon - eot) * 60.0).round() as i64;
        // Pick the solar noon within half a day of the anchor.
        while secs - anchor.as_second() > 43_200 {
            secs -= 86_400;
        }
        while anchor.as_second() - secs > 43_200 {
            secs += 86_400;
        }
        noon = Timestamp::from_second(secs).unwrap_or(anchor);
    }
    noon
}

/// One event: `sign = -1` sunrise, `+1` sunset; `None` if the iteration
/// leaves the horizon-crossing range (polar edge).
fn event(noon: Timestamp, loc: Location, sign: f64) -> Option<Timestamp> {
    let mut t = noon;
    // Three refinements: each re-evaluates declination and equation of time
    // at the current estimate (NOAA's spreadsheet evaluates once at the
    // requested time; iterating removes the ~1 min error of using noon's
    // declination for a morning event).
    for _ in 0..3 {
        let (eot, decl) = solar_params(t);
        let cos_ha = cos_hour_angle(loc.lat, decl);
        if !(-1.0..=1.0).contains(&cos_ha) {
            return None;
        }
        let ha = cos_ha.acos().to_degrees();
        let (eot_noon, _) = solar_params(noon);
        // Noon moves with the equation of time; correct it for the event time.
        let noon_here = add_minutes(noon, eot_noon - eot);
        t = add_minutes(noon_here, sign * 4.0 * ha);
    }
    Some(t)
}

/// Sunrise and sunset for `loc` on the local `date` in `tz`.
pub fn day_light(loc: Location, date: Date, tz: &TimeZone) -> DayLight {
    let local_noon = date
        .at(12, 0, 0, 0)
        .to_zoned_datetime(tz.clone())
        .map(|z| z.timestamp())
        // Noon is never inside a DST gap in any real zone; fall back to UTC
        // noon if a strange zone says otherwise.
        .unwrap_or_else(|_| Timestamp::from_second(days_from_civil(date) * 86_400 + 43_200).unwrap_or(Timestamp::UNIX_EPOCH));
    let noon = solar_noon(local_noon, loc.lon);
    let (_, decl_noon) = solar_params(noon);
    let classify = || if cos_hour_angle(loc.lat, decl_noon) < -1.0 { DayLight::AlwaysUp } else { DayLight::AlwaysDown };
    // A latitude of exactly ±90 makes tan() blow up; the poles are polar by definition.
    if loc.lat.abs() > 89.99 {
        return if decl_noon * loc.lat > 0.0 { DayLight::AlwaysUp } else { DayLight::AlwaysDown };
    }
    match (event(noon, loc, -1.0), event(noon, loc, 1.0)) {
        (Some(sunrise), Some(sunset)) => DayLight::Normal { sunrise, sunset },
        _ => classify(),
    }
}

/// Whether the sun is down at `now` (between sunset and the next sunrise).
pub fn is_dark(loc: Location, tz: &TimeZone, now: Timestamp) -> bool {
    let date = now.to_zoned_datetime(tz.clone()).date();
    match day_light(loc, date, tz) {
        DayLight::AlwaysUp => false,
        DayLight::AlwaysDown => true,
        DayLight::Normal { sunrise, sunset } => now < sunrise || now >= sunset,
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
pub(crate) fn days_from_civil(d: Date) -> i64 {
    let (y, m, day) = (i64::from(d.year()), i64::from(d.month()), i64::from(d.day()));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
