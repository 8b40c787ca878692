//! End-to-end tests: the real `hearth` and `hearth-device` programs on
//! 127.0.0.1, driven the way a person or a script would drive them.
#![allow(clippy::unwrap_used)] // Test code: a panic is the failure report.

mod harness;

mod cluster;
mod e2e;
mod firmware;
mod energy;
mod groups;
mod lan;
mod motion;
mod pairing_race;
mod passwd;
mod rules;
mod sharing;
mod tidy;
mod tls_posture;
