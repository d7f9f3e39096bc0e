//! meshgate-config
