//! The `hearth` program's library: the controller side (HTTPS/WSS client,
//! local key and session, the commands) plus the thin wrappers that run the
//! cloud and the demo. The binary in `main.rs` only parses arguments.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod controller;
pub mod demo;
pub mod energy;
pub mod groups;
pub mod lan;
pub mod server;
#[doc(hidden)]
pub mod webvectors;
