//! A simulated network for node tests.
