//! Integration tests for the device agent.
