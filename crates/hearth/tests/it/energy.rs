//! Issue 5 end to end: an energy plug's history, kept by the device, read
//! sealed through the cloud by `hearth energy` as a table and chart, CSV
//! and JSON.

use std::time::Duration;

use hearth_proto::acl::Refusal;

use crate::harness::*;

#[test]
fn energy_history_as_table_csv_and_json() {
    let w = World::new();
    let kettle = w.provision("kettle", "energy_plug");
    let _dev = w.run_device(&kettle);
    let plain = w.provision("lamp", "plug");
    let _lamp = w.run_device(&plain);
    let phone = w.controller("phone");
    phone.signup("fran@example.com");
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &kettle.code, "--name", "kettle"]).status.success()));
    assert!(eventually(Duration::from_secs(10), || phone.run(&["pair", &plain.code, "--name", "lamp"]).status.success()));
    phone.ok(&["on", "kettle"]);

    // The simulated 1.2 kW load is booked every second by the device itself.
    let mut doc = serde_json::Value::Null;
    assert!(eventually(Duration::from_secs(15), || {
        doc = serde_json::from_str(&phone.ok(&["energy", "kettle", "--since", "1h", "--json"])).unwrap();
        doc["total_mwh"].as_u64().unwrap_or(0) > 0
    }));
    assert_eq!((doc["verified"].as_bool(), doc["resolution"].as_str(), doc["power_mw"].as_u64()), (Some(true), Some("minute"), Some(1_200_000)));
    let buckets = doc["buckets"].as_array().unwrap();
    assert!((60..=62).contains(&buckets.len()), "an hour of minutes: {}", buckets.len());
    let booked: u64 = buckets.iter().map(|b| b["energy_mwh"].as_u64().unwrap()).sum();
    assert_eq!(booked, doc["total_mwh"].as_u64().unwrap(), "all of it in the last hour");

    let table = phone.ok(&["energy", "kettle"]);
    assert!(table.starts_with("kettle: 1200.0 W now (signed by the device"), "{table}");
    assert!(table.contains("today: ") && table.contains("START") && table.contains(" Wh ┤"), "{table}");

    let csv = phone.ok(&["energy", "kettle", "--since", "2d", "--csv"]);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("start,energy_wh,on_secs"));
    let rows: Vec<&str> = lines.collect();
    assert!((48..=50).contains(&rows.len()), "two days of hours: {}", rows.len());
    assert!(rows.iter().all(|r| r.split(',').count() == 3), "{csv}");

    let days = phone.ok(&["energy", "kettle", "--since", "1000d", "--by", "day", "--csv"]);
    assert_eq!(days.lines().count(), 1 + 730, "two years of days at most");

    // A plug without a meter says so (signed), and bad options are refused before sending.
    let out = phone.run(&["energy", "lamp"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(Refusal::Unsupported.explain()));
    assert!(!phone.run(&["energy", "kettle", "--by", "week"]).status.success());
}
