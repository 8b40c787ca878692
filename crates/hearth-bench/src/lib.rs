//! The Hearth load generator (issue 8): N simulated devices on real
//! mutual-TLS links, spread over worker processes and source addresses, and
//! M controllers sending signed commands at a fixed rate, against the
//! Hearth cloud and, as a baseline, against Mosquitto with mutual TLS and a
//! per-device ACL. Reports round trips (HDR histogram), throughput, errors,
//! handshakes per second, server RSS per idle link and the time to
//! reconnect every device after a server restart. See BENCHMARKS.md.
//!
//! * [`plan`] — throwaway CAs and identities, and seeding the cloud's database;
//! * [`device`] — the simulated device (the real [`hearth_device::DeviceCore`]);
//! * [`worker`] — a worker process holding a share of the devices;
//! * [`controller`] — the simulated controllers and the latency histogram;
//! * [`mqtt`] — the few MQTT 3.1.1 packets the baseline needs;
//! * [`run`] — the orchestrator; [`report`] — Markdown for BENCHMARKS.md.
#![forbid(unsafe_code)]

pub mod controller;
pub mod device;
pub mod mqtt;
pub mod plan;
pub mod report;
pub mod run;
pub mod worker;
