//! Repository-wide checks that keep architecture invariants true.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// CVE-2013-6948 was an XML external-entity injection: Hearth has no XML
/// parser anywhere in its dependency tree.
#[test]
fn no_xml_parser_in_the_dependency_tree() {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).unwrap();
    let banned = ["quick-xml", "xml-rs", "roxmltree", "xmlparser", "serde-xml-rs", "minidom", "xml5ever", "sxd-document", "libxml"];
    for line in lock.lines() {
        if let Some(name) = line.strip_prefix("name = ") {
            let name = name.trim_matches('"');
            assert!(!banned.contains(&name), "XML parser {name} entered the dependency tree");
        }
    }
}

/// Every Hearth crate forbids unsafe code at its root.
#[test]
fn every_crate_forbids_unsafe_code() {
    for entry in std::fs::read_dir(root().join("crates")).unwrap() {
        let dir = entry.unwrap().path();
        for root_file in ["src/lib.rs", "src/main.rs"] {
            let p = dir.join(root_file);
            if let Ok(text) = std::fs::read_to_string(&p) {
                assert!(text.contains("#![forbid(unsafe_code)]"), "{} lacks #![forbid(unsafe_code)]", p.display());
            }
        }
    }
}

/// The protocol core stays sans-IO: no tokio, no TLS, no HTTP.
#[test]
fn protocol_core_has_no_io_dependencies() {
    let manifest = std::fs::read_to_string(root().join("crates/hearth-proto/Cargo.toml")).unwrap();
    let deps = manifest.split("[dependencies]").nth(1).unwrap().split("\n[").next().unwrap();
    for banned in ["tokio", "rustls", "hyper", "axum", "rusqlite"] {
        assert!(!deps.contains(banned), "hearth-proto depends on {banned}");
    }
}
