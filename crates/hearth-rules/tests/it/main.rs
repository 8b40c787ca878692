//! The one integration-test binary of hearth-rules (STYLE.md §9).
//!
//! Every test is deterministic: instants are built from fixed civil times in
//! named zones (read from the system tzdb), never from the clock.

mod device_loop;
mod energy;
mod model;
mod robustness;
mod safety;
mod schedule;
mod sun;
mod tidy;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;

/// A zone from the system tzdb (Debian's `tzdata` is on every CI machine).
pub fn tz(name: &str) -> TimeZone {
    TimeZone::get(name).unwrap_or_else(|e| panic!("zone {name} missing from /usr/share/zoneinfo: {e}"))
}

/// A civil date.
pub fn date(y: i16, m: i8, d: i8) -> Date {
    Date::new(y, m, d).expect("valid date")
}

/// The instant of a local wall-clock time (earlier one in a fold).
pub fn at(zone: &str, y: i16, m: i8, d: i8, h: i8, min: i8) -> Timestamp {
    date(y, m, d).at(h, min, 0, 0).to_zoned_datetime(tz(zone)).expect("valid local time").timestamp()
}
