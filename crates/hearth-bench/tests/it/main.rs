//! The load generator's smoke run: small enough for every `cargo test`, so
//! the benchmark cannot rot between the runs that fill BENCHMARKS.md.

use std::path::PathBuf;
use std::time::Duration;

use hearth_bench::device::Target;
use hearth_bench::run::{run, Config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_run_links_every_device_answers_every_command_and_reconnects_after_a_restart() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_hearth-bench"));
    let mosquitto = PathBuf::from("/usr/sbin/mosquitto");
    let mut targets = vec![Target::Hearth];
    if mosquitto.exists() {
        targets.push(Target::Mqtt);
    } else {
        eprintln!("skipping the Mosquitto baseline: {} is not installed", mosquitto.display());
    }
    let cfg = Config {
        devices: 50,
        controllers: 2,
        // Two workers, so the process split is exercised too.
        workers: 2,
        rate: 50.0,
        command: hearth_bench::controller::Kind::Toggle,
        cloud_env: Vec::new(),
        seconds: 2.0,
        ramp: 16,
        settle: 0.3,
        restart: true,
        targets: targets.clone(),
        // The cloud is this crate's binary (`serve-cloud`, the same library
        // call as `hearth cloud serve`), so the test needs no other build.
        cloud_cmd: vec![exe.clone().into(), "serve-cloud".into()],
        bench_exe: exe,
        mosquitto,
        link_timeout: Duration::from_secs(20),
        cluster: None,
    };
    let reports = tokio::time::timeout(Duration::from_secs(55), run(&cfg)).await.expect("the smoke run took too long").unwrap();
    assert_eq!(reports.len(), targets.len());
    for r in &reports {
        assert_eq!(r.linked, 50, "{:?}", r.target);
        let load = r.load.as_ref().expect("a load phase");
        // 50/s for 2 s, give or take the last tick.
        assert!((95..=101).contains(&load.sent), "{:?}: sent {}", r.target, load.sent);
        assert_eq!(load.answered, load.sent, "{:?}: every command answered and verified", r.target);
        assert_eq!((load.lost, load.errors, r.device_errors), (0, 0, 0), "{:?}", r.target);
        assert_eq!(r.device_commands, load.sent, "{:?}: devices executed each command once", r.target);
        assert_eq!(load.hist.len(), load.answered);
        assert!(load.hist.value_at_quantile(0.99) > 0);
        assert!(r.handshakes_per_sec > 0.0 && r.rss_after_kib > 0);
        assert!(r.reconnect_secs.is_some(), "{:?}: every device came back after the restart", r.target);
    }
    let md = hearth_bench::report::markdown(&cfg, "smoke", &reports);
    assert!(md.contains("| round trip p99, ms |"), "{md}");
    if targets.len() == 2 {
        assert!(md.contains("Hearth / Mosquitto"), "{md}");
    }
}

/// Cluster mode (issue 8): three nodes on a throwaway PostgreSQL schema and
/// one NATS, devices dealt over all three, controllers on node 3, so most
/// commands cross nodes; node 1 is killed and restarted. Needs
/// HEARTH_TEST_POSTGRES and HEARTH_TEST_NATS (CI sets both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_three_node_run_answers_every_command_across_nodes() {
    let (Ok(postgres), Ok(nats)) = (std::env::var("HEARTH_TEST_POSTGRES"), std::env::var("HEARTH_TEST_NATS")) else {
        eprintln!("skipping the three-node bench smoke run: HEARTH_TEST_POSTGRES or HEARTH_TEST_NATS is unset");
        return;
    };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_hearth-bench"));
    let cfg = Config {
        devices: 30,
        controllers: 2,
        // One worker per node.
        workers: 3,
        rate: 30.0,
        command: hearth_bench::controller::Kind::Toggle,
        cloud_env: Vec::new(),
        seconds: 2.0,
        ramp: 16,
        settle: 0.3,
        restart: true,
        targets: vec![Target::Hearth],
        cloud_cmd: vec![exe.clone().into(), "serve-cloud".into()],
        bench_exe: exe,
        mosquitto: PathBuf::from("/usr/sbin/mosquitto"),
        link_timeout: Duration::from_secs(20),
        cluster: Some(hearth_bench::run::Cluster { nodes: 3, postgres, nats, spread: true }),
    };
    let reports = tokio::time::timeout(Duration::from_secs(55), run(&cfg)).await.expect("the cluster smoke run took too long").unwrap();
    let [r] = &reports[..] else { panic!("one report expected, got {}", reports.len()) };
    assert_eq!(r.linked, 30);
    assert_eq!(r.nodes.iter().map(|n| n.devices).collect::<Vec<_>>(), [10, 10, 10], "every node holds a third of the devices");
    assert!(r.nodes.iter().all(|n| n.before_kib > 0 && n.after_kib > 0));
    let load = r.load.as_ref().expect("a load phase");
    assert!((55..=61).contains(&load.sent), "sent {}", load.sent);
    assert_eq!(load.answered, load.sent, "every command answered and verified, across nodes");
    assert_eq!((load.lost, load.errors, r.device_errors), (0, 0, 0));
    assert_eq!(r.device_commands, load.sent, "devices executed each command once");
    assert!(r.reconnect_secs.is_some(), "node 1's devices came back after its restart");
    let md = hearth_bench::report::markdown(&cfg, "smoke", &reports);
    assert!(md.contains("3 node(s) on one PostgreSQL schema"), "{md}");
    assert!(md.contains("| 3 | 10 |"), "{md}");
}
