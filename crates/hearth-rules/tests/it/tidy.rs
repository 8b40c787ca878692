//! The crate stays sans-IO (ADR 0005): no I/O crates, no clock, no OS
//! randomness, no file or network access in the library source.

use std::path::Path;

#[test]
fn rules_core_is_sans_io() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("manifest");
    let deps = manifest.split("[dependencies]").nth(1).expect("deps").split("\n[").next().expect("deps");
    let names: Vec<&str> = deps.lines().filter_map(|l| l.split('.').next()).map(str::trim).filter(|n| !n.is_empty()).collect();
    assert_eq!(names, ["jiff", "serde", "serde_json", "thiserror"], "hearth-rules gained a dependency; keep it sans-IO");
    let banned = ["std::fs", "std::net", "std::time::SystemTime", "Timestamp::now", "Zoned::now", "std::thread", "std::env", "tokio::", "rand::"];
    for entry in std::fs::read_dir(root.join("src")).expect("src") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("source");
        for b in banned {
            assert!(!text.contains(b), "{} uses {b}", path.display());
        }
    }
}
