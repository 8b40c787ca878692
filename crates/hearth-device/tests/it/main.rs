//! Integration tests for the device agent: a real agent, a fake cloud on
//! 127.0.0.1, real mutual TLS.
// A failed unwrap is a failed test, with the error printed: exactly what a test wants.
#![allow(clippy::unwrap_used)]

mod adversary;
mod binary;
mod button;
mod commands;
mod dimmer;
mod energy;
mod link;
mod pairing;
mod provisioning;
mod rogue;
mod sandbox;
mod walk;
mod support;
