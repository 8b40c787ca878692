//! Untrusted inputs never panic: mutated rule sets and history images.
//!
//! Rule sets arrive over the network (signed, but from a controller that may
//! be buggy); history images come from flash that may be torn. A stable-Rust
//! stand-in for a fuzzer: thousands of deterministic mutations of valid
//! inputs, each of which must parse or fail with an error.

use hearth_rules::energy::History;
use hearth_rules::model::RuleSet;
use hearth_rules::rng::SplitMix64;
use jiff::Timestamp;

fn mutate(base: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.range(1, 8) {
        if v.is_empty() {
            break;
        }
        let i = rng.range(0, v.len() as u32 - 1) as usize;
        match rng.range(0, 3) {
            0 => v[i] = rng.next_u64() as u8,
            1 => {
                v.remove(i);
            }
            2 => v.insert(i, b"{}[]\":,0-9eE"[rng.range(0, 11) as usize]),
            _ => v.truncate(i),
        }
    }
    v
}

#[test]
fn mutated_rule_sets_never_panic() {
    let base = br#"{"version":2,"timezone":"Europe/Berlin","location":{"lat":52.5,"lon":13.4},"power_on":"last",
        "interlocks":{"max_on_secs":7200,"max_toggles_per_min":6,"over_power":{"limit_w":2000,"for_secs":5,"retry_after_secs":60,"max_retries":2}},
        "energy":{"standby_below_mw":3000,"long_on_hours":4,"price":{"per_kwh_milli":315,"currency":"EUR"}},
        "rules":[{"id":1,"name":"a","kind":{"schedule":{"days":["mon","sun"],"at":{"sunset":-15},"action":{"on_until":{"clock":"23:00"}}}}},
        {"id":2,"name":"b","kind":{"away":{"days":["fri"],"start":{"clock":"18:00"},"end":{"clock":"01:00"},"min_on_mins":30,"max_on_mins":60,"seed":9}}},
        {"id":3,"name":"c","kind":{"motion":{"sensor":"s","off_after_secs":60,"when":{"between":{"start":"22:00","end":"06:00"}}}}},
        {"id":4,"name":"d","kind":{"button":{"press":"long","action":{"on_for":60}}}}]}"#;
    RuleSet::from_json(base).expect("the base input is valid");
    let mut rng = SplitMix64::new(5);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let input = mutate(base, &mut rng);
        if let Ok(set) = RuleSet::from_json(&input) {
            // Whatever parses also validates and round-trips.
            assert_eq!(set.validate(), Ok(()));
            assert_eq!(RuleSet::from_json(&set.to_json()).as_ref(), Ok(&set));
            accepted += 1;
        }
    }
    // Most mutations are refused, a few (names, digits) stay valid.
    assert!(accepted > 0 && accepted < 20_000, "{accepted}");
}

#[test]
fn mutated_history_images_never_panic() {
    let mut h = History::default();
    for s in (0..100_000).step_by(45) {
        h.add(Timestamp::from_second(1_750_000_000 + s).expect("ts"), 20_254 + s / 86_400, 100, 45);
    }
    let img = h.to_bytes(3);
    let mut rng = SplitMix64::new(6);
    for _ in 0..300 {
        let bad = mutate(&img, &mut rng);
        // Any change is caught by the length or the checksum.
        assert!(History::from_bytes(&bad).is_err() || bad == img);
    }
    // A correct checksum over nonsense content is still refused, not trusted.
    let mut forged = img.clone();
    let slot0 = 8 + 8 + 27 + 16 + 4; // on_secs of the first minute slot
    forged[slot0..slot0 + 4].copy_from_slice(&1000u32.to_le_bytes());
    let n = forged.len() - 4;
    let crc = crc32(&forged[..n]);
    forged[n..].copy_from_slice(&crc.to_le_bytes());
    assert!(History::from_bytes(&forged).is_err(), "61+ s of on-time in a minute is impossible");
}

/// Same CRC as the crate (IEEE), to forge a checksum in the test above.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
