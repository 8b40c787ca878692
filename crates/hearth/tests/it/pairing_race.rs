//! The 20-attempt pairing cap holds under concurrent attempts (issue 7,
//! "Brute force and abuse"): many `hearth pair` processes with wrong codes
//! at once, through the real cloud, against a real device agent.

use std::time::Duration;

use crate::harness::{eventually, World};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn concurrent_wrong_codes_cannot_exceed_twenty_attempts() {
    let w = World::new();
    let plug = w.provision("plug", "plug");
    let _dev = w.run_device(&plug);
    let c = w.controller("c");
    c.signup("race@example.com");
    let wrong = hearth_proto::pairing::SetupLabel {
        device: Some(plug.id.parse().unwrap()),
        secret: hearth_proto::pairing::SetupSecret::from_bytes([9; 16]),
    }
    .qr_payload();
    // One attempt once the device is linked: 19 left.
    assert!(eventually(Duration::from_secs(10), || stderr(&c.run(&["pair", &wrong])).contains("19 tries left")));

    // 30 at once, each its own process and connection.
    let outcomes: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..30).map(|_| s.spawn(|| stderr(&c.run(&["pair", &wrong])))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut left: Vec<u32> = outcomes
        .iter()
        .filter_map(|e| e.split("wrong setup code, ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    left.sort_unstable();
    let locked = outcomes.iter().filter(|e| e.contains("not in setup mode")).count();
    eprintln!("{} counted wrong attempts, {locked} refused as locked, of {}", left.len(), outcomes.len());
    // Each remaining try was used exactly once: no attempt was lost or counted twice.
    assert_eq!(left, (0..19).collect::<Vec<u32>>(), "{outcomes:#?}");
    assert_eq!(left.len() + locked, outcomes.len(), "{outcomes:#?}");

    // The right code is refused too now: only the physical reset reopens setup mode.
    let right = hearth_proto::pairing::SetupLabel {
        device: Some(plug.id.parse().unwrap()),
        secret: hearth_proto::pairing::SetupSecret::from_code(&plug.code).unwrap(),
    }
    .qr_payload();
    let out = c.run(&["pair", &right, "--name", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not in setup mode"), "{}", stderr(&out));
}
