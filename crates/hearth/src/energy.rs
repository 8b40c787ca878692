//! `hearth energy`: an energy plug's history as the device reports it
//! (a sealed answer to `GetEnergy`, issue 5), rendered as a table with a
//! small terminal chart, or as CSV or JSON for scripts. Pure functions over
//! the verified report; `controller::energy` fetches it.

use hearth_proto::message::{EnergyReport, EnergyResolution};
use hearth_rules::energy::{cost_milli, Price};
use hearth_rules::jiff::{self, civil::Date, tz::TimeZone, Timestamp};
use serde_json::{json, Value};

/// How the history is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Summary, table of non-empty buckets and a chart.
    Table,
    /// One line per bucket: `start,energy_wh,on_secs`.
    Csv,
    /// One JSON document.
    Json,
}

/// Most table rows printed; the chart and CSV/JSON still cover everything.
pub const MAX_TABLE_ROWS: usize = 48;

fn resolution_name(r: Option<EnergyResolution>) -> &'static str {
    match r {
        Some(EnergyResolution::Minute) => "minute",
        Some(EnergyResolution::Hour) => "hour",
        Some(EnergyResolution::Day) => "day",
        None => "-",
    }
}

/// Parses `--by minute|hour|day`.
pub fn parse_resolution(text: &str) -> anyhow::Result<EnergyResolution> {
    Ok(match text {
        "minute" | "m" => EnergyResolution::Minute,
        "hour" | "h" => EnergyResolution::Hour,
        "day" | "d" => EnergyResolution::Day,
        other => anyhow::bail!("--by {other:?}: use minute, hour or day"),
    })
}

/// The start of bucket `bucket` as the device's local time: a timestamp
/// for minutes and hours, a local date for days.
pub fn bucket_label(res: Option<EnergyResolution>, bucket: i64, tz: &TimeZone) -> String {
    let at = |secs: i64| Timestamp::from_second(secs).map(|t| t.to_zoned_datetime(tz.clone()));
    match res {
        Some(EnergyResolution::Minute) | Some(EnergyResolution::Hour) => {
            let secs = bucket.saturating_mul(if res == Some(EnergyResolution::Minute) { 60 } else { 3600 });
            at(secs).map(|z| z.strftime("%Y-%m-%d %H:%M").to_string()).unwrap_or_else(|_| format!("#{bucket}"))
        }
        Some(EnergyResolution::Day) => {
            let epoch = Date::constant(1970, 1, 1);
            epoch.checked_add(jiff::Span::new().days(bucket)).map(|d| d.to_string()).unwrap_or_else(|_| format!("#{bucket}"))
        }
        None => format!("#{bucket}"),
    }
}

fn wh(mwh: u64) -> String {
    format!("{:.1}", mwh as f64 / 1000.0)
}

fn kwh(mwh: u64) -> String {
    format!("{:.3}", mwh as f64 / 1_000_000.0)
}

fn hm(secs: u64) -> String {
    format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
}

fn price(r: &EnergyReport) -> Option<Price> {
    Some(Price { per_kwh_milli: r.price_per_kwh_milli?, currency: r.currency.clone()? })
}

fn money(milli: u64, currency: &str) -> String {
    format!("{}.{:03} {currency}", milli / 1000, milli % 1000)
}

/// A bar chart `height` rows tall and at most `width` columns wide; the
/// buckets are summed into columns. Empty when there is nothing to draw.
pub fn chart(values: &[u32], width: usize, height: usize) -> String {
    if values.is_empty() || width == 0 || height == 0 {
        return String::new();
    }
    let per = values.len().div_ceil(width);
    let cols: Vec<u64> = values.chunks(per).map(|c| c.iter().map(|v| u64::from(*v)).sum()).collect();
    let max = cols.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return "(no energy in this period)\n".to_owned();
    }
    // Eighths of a row, so small values still show.
    const PARTS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let eighths: Vec<u64> = cols.iter().map(|v| (v * (height as u64) * 8).div_ceil(max)).collect();
    let mut out = String::new();
    for row in (0..height as u64).rev() {
        let label = if row + 1 == height as u64 { format!("{:>9} Wh ┤", wh(max)) } else { format!("{:>12} │", "") };
        out.push_str(&label);
        for e in &eighths {
            let filled = e.saturating_sub(row * 8).min(8);
            out.push(PARTS[filled as usize]);
        }
        out.push('\n');
    }
    out.push_str(&format!("{:>12} └{}\n", "0", "─".repeat(cols.len())));
    out
}

/// The whole printout for `format`.
pub fn render(device: &str, r: &EnergyReport, format: Format) -> String {
    let tz = TimeZone::get(&r.timezone).unwrap_or(TimeZone::UTC);
    let buckets = r.energy_mwh.iter().zip(&r.on_secs).enumerate().map(|(i, (e, on))| (r.first + i as i64, *e, *on));
    match format {
        Format::Csv => {
            let mut out = String::from("start,energy_wh,on_secs\n");
            for (b, e, on) in buckets {
                out.push_str(&format!("{},{},{on}\n", bucket_label(r.resolution, b, &tz), wh(u64::from(e))));
            }
            out
        }
        Format::Json => {
            let rows: Vec<Value> = buckets
                .map(|(b, e, on)| json!({"start": bucket_label(r.resolution, b, &tz), "bucket": b, "energy_mwh": e, "on_secs": on}))
                .collect();
            let doc = json!({
                "device": device,
                "verified": true,
                "resolution": resolution_name(r.resolution),
                "timezone": r.timezone,
                "power_mw": r.power_mw,
                "standby": r.standby,
                "today_mwh": r.today_mwh,
                "today_on_secs": r.today_on_secs,
                "total_mwh": r.total_mwh,
                "total_on_secs": r.total_on_secs,
                "price_per_kwh_milli": r.price_per_kwh_milli,
                "currency": r.currency,
                "buckets": rows,
            });
            format!("{doc}\n")
        }
        Format::Table => {
            let mut out = format!(
                "{device}: {:.1} W now{} (signed by the device, {} buckets per {})\n",
                r.power_mw as f64 / 1000.0,
                if r.standby { ", in standby" } else { "" },
                r.energy_mwh.len(),
                resolution_name(r.resolution),
            );
            let cost = |mwh| price(r).map(|p| format!(", {}", money(cost_milli(mwh, &p), &p.currency))).unwrap_or_default();
            out.push_str(&format!("today: {} kWh, on {}{}\n", kwh(r.today_mwh), hm(r.today_on_secs), cost(r.today_mwh)));
            out.push_str(&format!("total: {} kWh, on {}{}\n\n", kwh(r.total_mwh), hm(r.total_on_secs), cost(r.total_mwh)));
            let busy: Vec<(i64, u32, u32)> = buckets.filter(|(_, e, on)| *e > 0 || *on > 0).collect();
            out.push_str(&format!("{:<17} {:>10} {:>8}\n", "START", "ENERGY Wh", "ON"));
            let skip = busy.len().saturating_sub(MAX_TABLE_ROWS);
            if skip > 0 {
                out.push_str(&format!("… {skip} earlier buckets with energy (see --csv)\n"));
            }
            for (b, e, on) in &busy[skip..] {
                out.push_str(&format!("{:<17} {:>10} {:>8}\n", bucket_label(r.resolution, *b, &tz), wh(u64::from(*e)), hm(u64::from(*on))));
            }
            if busy.is_empty() {
                out.push_str("(no energy in this period)\n");
            }
            out.push('\n');
            out.push_str(&chart(&r.energy_mwh, 60, 6));
            if let (Some(first), Some(last)) = (r.energy_mwh.first().map(|_| r.first), r.energy_mwh.len().checked_sub(1)) {
                out.push_str(&format!(
                    "{:>14}{} … {}\n",
                    "",
                    bucket_label(r.resolution, first, &tz),
                    bucket_label(r.resolution, first + last as i64, &tz)
                ));
            }
            out
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn report() -> EnergyReport {
        EnergyReport {
            resolution: Some(EnergyResolution::Hour),
            // 2027-01-15 07:00 UTC = 08:00 in Berlin.
            first: 1_799_999_999 / 3600 - (1_799_999_999 / 3600) % 24 + 7,
            energy_mwh: vec![0, 1500, 0, 250_000],
            on_secs: vec![0, 60, 0, 3600],
            today_mwh: 251_500,
            today_on_secs: 3660,
            total_mwh: 2_000_000,
            total_on_secs: 7200,
            power_mw: 1_200_000,
            standby: false,
            timezone: "Europe/Berlin".into(),
            price_per_kwh_milli: Some(315),
            currency: Some("EUR".into()),
        }
    }

    #[test]
    fn labels_are_the_devices_local_time() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        let r = report();
        assert_eq!(bucket_label(r.resolution, r.first, &tz), "2027-01-15 08:00");
        assert_eq!(bucket_label(Some(EnergyResolution::Minute), 1_800_000_000 / 60, &TimeZone::UTC), "2027-01-15 08:00");
        assert_eq!(bucket_label(Some(EnergyResolution::Day), 20_833, &tz), "2027-01-15");
    }

    #[test]
    fn the_table_sums_prices_and_skips_empty_buckets() {
        let out = render("kettle", &report(), Format::Table);
        assert!(out.starts_with("kettle: 1200.0 W now"), "{out}");
        // 2 kWh at 0.315 EUR/kWh.
        assert!(out.contains("total: 2.000 kWh, on 2h00m, 0.630 EUR"), "{out}");
        assert!(out.contains("2027-01-15 09:00         1.5    0h01m"), "{out}");
        assert!(out.contains("2027-01-15 11:00       250.0    1h00m"), "{out}");
        assert!(!out.contains("2027-01-15 10:00"), "empty bucket listed: {out}");
        // The chart: the tallest column is the 250 Wh hour.
        assert!(out.contains("250.0 Wh ┤"), "{out}");
        assert!(out.contains('█'), "{out}");
    }

    #[test]
    fn csv_and_json_list_every_bucket() {
        let csv = render("kettle", &report(), Format::Csv);
        assert_eq!(csv.lines().count(), 5, "{csv}");
        assert_eq!(csv.lines().nth(4), Some("2027-01-15 11:00,250.0,3600"));
        let json: Value = serde_json::from_str(&render("kettle", &report(), Format::Json)).unwrap();
        assert_eq!(json["buckets"].as_array().unwrap().len(), 4);
        assert_eq!(json["buckets"][1]["energy_mwh"], 1500);
        assert_eq!((json["total_mwh"].as_u64(), json["resolution"].as_str()), (Some(2_000_000), Some("hour")));
    }

    #[test]
    fn the_chart_is_bounded_and_shows_small_values() {
        let values: Vec<u32> = (0..1440).map(|i| if i == 700 { 1 } else { 0 }).collect();
        let c = chart(&values, 60, 6);
        assert!(c.lines().all(|l| l.chars().count() <= 14 + 60), "{c}");
        assert_eq!(c.lines().count(), 7);
        assert_eq!(chart(&[0, 0], 60, 6), "(no energy in this period)\n");
        assert_eq!(chart(&[], 60, 6), "");
    }
}
