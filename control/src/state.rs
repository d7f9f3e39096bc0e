//! Atomic state files.
