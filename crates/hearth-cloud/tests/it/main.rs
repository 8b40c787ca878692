//! Integration tests: a real cloud on 127.0.0.1 with a throwaway PKI,
//! driven over TLS by a raw HTTP client, a WebSocket client and simulated
//! devices.
#![allow(clippy::unwrap_used)]

mod api;
mod backpressure;
mod device_to_device;
mod devices;
mod fuzz_bodies;
mod headers;
mod limits;
mod pg;
mod tokens;
mod support;
