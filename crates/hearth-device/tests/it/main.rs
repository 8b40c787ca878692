//! Integration tests for the device agent: a real agent, a fake cloud on
//! 127.0.0.1, real mutual TLS.

mod binary;
mod commands;
mod link;
mod pairing;
mod provisioning;
mod rogue;
mod support;
