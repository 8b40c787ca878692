//! `hearth passwd` (issue 7): the current password is required, every
//! session of the account ends, and the controller that changed it is
//! logged in again with the new one.

use crate::harness::{World, PASSWORD};

const NEW: &str = "a brand new passphrase";

#[test]
fn passwd_needs_the_current_password_and_logs_out_every_other_session() {
    let world = World::new();
    let phone = world.controller("phone");
    let laptop = world.controller("laptop");
    phone.signup("owner@example.com");
    laptop.login("owner@example.com");
    phone.ok(&["ls"]);
    laptop.ok(&["ls"]);

    // A wrong current password changes nothing.
    let out = run_passwd(&phone, "not the password", NEW);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("current password is wrong"), "{out:?}");
    laptop.ok(&["ls"]);

    let out = run_passwd(&phone, PASSWORD, NEW);
    assert!(out.status.success(), "{out:?}");
    // The phone logged in again; the laptop's session is gone.
    phone.ok(&["ls"]);
    let out = laptop.run(&["ls"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("log in again"), "{out:?}");
    // The old password no longer logs in; the new one does.
    let cloud = format!("https://{}", laptop.api);
    let ca = laptop.pki.join("cloud-ca.pem");
    let login = |password: &str| {
        crate::harness::run(laptop.cmd().env("HEARTH_PASSWORD", password).args([
            "login",
            "--cloud",
            &cloud,
            "--ca",
            ca.to_str().unwrap(),
            "--email",
            "owner@example.com",
        ]))
    };
    assert!(!login(PASSWORD).status.success());
    assert!(login(NEW).status.success());
    laptop.ok(&["ls"]);
}

fn run_passwd(c: &crate::harness::Controller, current: &str, new: &str) -> std::process::Output {
    crate::harness::run(c.cmd().env("HEARTH_PASSWORD", current).env("HEARTH_NEW_PASSWORD", new).arg("passwd"))
}
